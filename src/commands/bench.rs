//! The benchmark: generates DMS output at scale, pushes it through LocalStack and the
//! worker, and prints throughput, latency, memory and statements per file.

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
