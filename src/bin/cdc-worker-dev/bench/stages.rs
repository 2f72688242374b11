//! Where a file's time goes, from the worker's `cdc_worker_stage_seconds` histograms: the
//! p50 and p99 of each stage, estimated from the buckets as Prometheus's
//! `histogram_quantile` does (linear within the bucket).

use cdc_worker::telemetry::Stage;

/// One stage's observations: cumulative bucket counts by upper bound, and the total.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageHistogram {
    pub stage: String,
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
}

/// The stage histograms in a `/metrics` text, in [`Stage::ALL`] order (stages never observed
/// are left out).
pub fn parse(text: &str) -> Vec<StageHistogram> {
    Stage::ALL
        .iter()
        .map(|s| s.label())
        .filter_map(|stage| {
            let label = format!("stage=\"{stage}\"");
            let mut h = StageHistogram {
                stage: stage.to_string(),
                ..Default::default()
            };
            for line in text.lines().filter(|l| l.contains(&label)) {
                let value = line.rsplit(' ').next()?.parse::<f64>().ok()?;
                if line.starts_with("cdc_worker_stage_seconds_count") {
                    h.count = value;
                } else if line.starts_with("cdc_worker_stage_seconds_bucket") {
                    let le = line.split("le=\"").nth(1)?.split('"').next()?;
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    h.buckets.push((bound, value));
                }
            }
            h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            (h.count > 0.0).then_some(h)
        })
        .collect()
}

impl StageHistogram {
    /// The `q` quantile in seconds (the largest finite bound when it falls in +Inf).
    pub fn quantile(&self, q: f64) -> f64 {
        let rank = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(bound, cumulative) in &self.buckets {
            if cumulative >= rank {
                if bound.is_infinite() {
                    return lower;
                }
                let inside = cumulative - below;
                if inside <= 0.0 {
                    return bound;
                }
                return lower + (bound - lower) * (rank - below) / inside;
            }
            (lower, below) = (bound, cumulative);
        }
        lower
    }
}

/// `s3_to_sqs p50 0.03 s p99 0.09 s (40); ...`: each stage's figures and count.
pub fn summary(stages: &[StageHistogram]) -> String {
    stages
        .iter()
        .map(|h| {
            format!(
                "{} p50 {:.3} s p99 {:.3} s ({:.0})",
                h.stage,
                h.quantile(0.5),
                h.quantile(0.99),
                h.count
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP cdc_worker_stage_seconds Time of each stage
# TYPE cdc_worker_stage_seconds histogram
cdc_worker_stage_seconds_bucket{stage="batch_to_commit",le="0.1"} 0
cdc_worker_stage_seconds_bucket{stage="batch_to_commit",le="0.5"} 50
cdc_worker_stage_seconds_bucket{stage="batch_to_commit",le="1"} 100
cdc_worker_stage_seconds_bucket{stage="batch_to_commit",le="+Inf"} 100
cdc_worker_stage_seconds_sum{stage="batch_to_commit"} 40
cdc_worker_stage_seconds_count{stage="batch_to_commit"} 100
cdc_worker_stage_seconds_bucket{stage="s3_to_sqs",le="0.1"} 10
cdc_worker_stage_seconds_bucket{stage="s3_to_sqs",le="+Inf"} 10
cdc_worker_stage_seconds_count{stage="s3_to_sqs"} 10
"#;

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let stages = parse(TEXT);
        let names: Vec<&str> = stages.iter().map(|h| h.stage.as_str()).collect();
        assert_eq!(names, ["s3_to_sqs", "batch_to_commit"], "in a file's order");
        let commit = &stages[1];
        assert_eq!(commit.count, 100.0);
        assert!((commit.quantile(0.5) - 0.5).abs() < 1e-9);
        assert!((commit.quantile(0.99) - 0.99).abs() < 1e-9);
        assert!((commit.quantile(0.25) - 0.3).abs() < 1e-9);
        assert!((stages[0].quantile(0.99) - 0.099).abs() < 1e-9);
        assert_eq!(
            summary(&stages[..1]),
            "s3_to_sqs p50 0.050 s p99 0.099 s (10)"
        );
    }
}
