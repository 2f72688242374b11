//! Per-table leases in S3: exclusive across processes, expiring when a holder dies, and
//! fencing a holder that lost its lease out of the commit.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdc_worker::batch::{ApplyPlan, BatchFile, Ddl, LoadColumn, LoadExpr, LoadMode};
use cdc_worker::lease::LeaseManager;
use cdc_worker::warehouse::WarehouseError;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{Env, i, s};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Writes the env's config for child processes (credentials come from their environment).
fn child_config(env: &Env) -> std::path::PathBuf {
    let mut config = env.config.clone();
    config.aws.access_key_id = None;
    config.aws.secret_access_key = None;
    let path = env.dir.path().join("lease.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path
}

fn hold(
    config: &std::path::Path,
    table: &str,
    hold_for: &str,
    rounds: u32,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cdc-worker"))
        .args([
            "lease",
            "hold",
            table,
            "--for",
            hold_for,
            "--rounds",
            &rounds.to_string(),
            "--config",
        ])
        .arg(config)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("cdc-worker lease hold")
}

fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_are_exclusive_across_processes() {
    let env = Env::new("lease-excl", |c| c.lease.ttl = Duration::from_secs(3)).await;
    let config = child_config(&env);
    let children: Vec<_> = (0..3)
        .map(|_| hold(&config, "orders", "300ms", 4))
        .collect();
    let mut all = Vec::new();
    for child in children {
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success());
        all.extend(events(&String::from_utf8_lossy(&out.stdout)));
    }
    // Pair each acquisition with its release, per holder, in time order.
    let mut intervals: Vec<(u64, u64, u64, String)> = Vec::new();
    for e in all.iter().filter(|e| e["event"] == "acquired") {
        let holder = e["holder"].as_str().unwrap();
        let token = e["token"].as_u64().unwrap();
        let released = all
            .iter()
            .find(|r| r["event"] == "releasing" && r["holder"] == holder && r["token"] == token)
            .expect("every acquisition is released");
        intervals.push((
            e["at_ms"].as_u64().unwrap(),
            released["at_ms"].as_u64().unwrap(),
            token,
            holder.to_string(),
        ));
    }
    intervals.sort();
    assert_eq!(intervals.len(), 12);
    for pair in intervals.windows(2) {
        let ((_, released, token, _), (acquired, _, next_token, _)) = (&pair[0], &pair[1]);
        assert!(acquired >= released, "two holders at once: {pair:?}");
        assert_eq!(
            *next_token,
            token + 1,
            "each take-over raises the fencing token"
        );
    }
    let holders: std::collections::BTreeSet<_> = intervals.iter().map(|i| i.3.clone()).collect();
    assert_eq!(
        holders.len(),
        3,
        "all three processes got the lease in turn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_holders_lease_expires() {
    let ttl = Duration::from_secs(3);
    let env = Env::new("lease-kill", |c| c.lease.ttl = ttl).await;
    let config = child_config(&env);
    let mut first = hold(&config, "orders", "60s", 1);
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let acquired: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    // Let it renew a few times, then kill it where it stands.
    tokio::time::sleep(ttl * 2).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let killed_at = now_ms();
    let second = hold(&config, "orders", "100ms", 1);
    let out = second.wait_with_output().await.unwrap();
    let taken = events(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .find(|e| e["event"] == "acquired")
        .unwrap();
    let waited = taken["at_ms"].as_u64().unwrap() - killed_at;
    assert_eq!(
        taken["token"].as_u64().unwrap(),
        acquired["token"].as_u64().unwrap() + 1
    );
    // The dead holder renewed at most ttl/3 before dying; its lease lives until then + ttl.
    assert!(
        waited as u128 >= (ttl * 2 / 3).as_millis() - 300,
        "taken after {waited} ms: before the lease expired"
    );
    assert!(
        waited as u128 <= (ttl + Duration::from_secs(3)).as_millis(),
        "taken after {waited} ms: not promptly after expiry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_out_holder_cannot_commit() {
    let env = Env::new("lease-fence", |_| {}).await;
    let warehouse = cdc_worker::worker::open_warehouse(&env.config, env.store.clone())
        .await
        .unwrap();
    let columns = &[("id", "BIGINT"), ("v", "VARCHAR")];
    env.put_parquet(
        &env.key("t", "LOAD00000001.parquet"),
        columns,
        &[vec![i(1), s("from the stale holder")]],
    )
    .await;
    env.put_parquet(
        &env.key("t", "LOAD00000002.parquet"),
        columns,
        &[vec![i(2), s("from the new holder")]],
    )
    .await;
    let ttl = Duration::from_secs(1);
    let a = LeaseManager::new(
        env.store.clone(),
        &env.res.bucket,
        "cdc-worker",
        ttl,
        "worker-a",
    );
    let b = LeaseManager::new(
        env.store.clone(),
        &env.res.bucket,
        "cdc-worker",
        ttl,
        "worker-b",
    );

    let (env_ref, warehouse_ref) = (&env, &warehouse);
    let plan_for = |n: u32, fence| async move {
        let (env, warehouse) = (env_ref, warehouse_ref);
        let file = BatchFile {
            bucket: env.res.bucket.clone(),
            key: env.key("t", &format!("LOAD0000000{n}.parquet")),
            size: 0,
            etag: String::new(),
            order_key: format!("0/{n:08x}"),
            full_load: true,
        };
        let staged = warehouse.stage(&format!("fence{n}"), vec![file]).await;
        let ready = staged.files[0].as_ref().unwrap().clone();
        let cols = ready.schema.table.columns.clone();
        let plan = ApplyPlan {
            into: None,
            guard: None,
            history: None,
            batch_id: format!("fence{n}"),
            table: "t".into(),
            ddl: vec![Ddl::CreateTable {
                columns: cols.clone(),
                primary_key: vec![],
            }],
            load: cols
                .iter()
                .map(|c| LoadColumn {
                    target: c.name.clone(),
                    expr: LoadExpr::Column(c.name.clone()),
                })
                .collect(),
            mode: LoadMode::Append,
            op_column: None,
            ordering_column: None,
            staged_columns: cols,
            files: vec![ready.file.clone()],
            fence: Some(fence),
        };
        let result = warehouse.apply(&plan, &[ready]).await;
        drop(staged);
        result
    };

    let stale = a.acquire("t").await.unwrap().expect("a takes the lease");
    // A stalls past its TTL without renewing (a GC pause, a partition); B takes over.
    let started = Instant::now();
    let fresh = loop {
        if let Some(f) = b.acquire("t").await.unwrap() {
            break f;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(fresh.token, stale.token + 1);
    plan_for(2, fresh)
        .await
        .expect("the current holder commits");
    let err = plan_for(1, stale)
        .await
        .expect_err("the stale holder is fenced out");
    assert!(matches!(err, WarehouseError::Fenced(_)), "{err}");
    drop(warehouse);

    assert_eq!(
        env.rows("t", &["id", "v"]),
        vec![vec![Some("2".into()), Some("from the new holder".into())]]
    );
    let ledger: Vec<String> = {
        let db = env.db();
        let mut stmt = db.prepare("SELECT s3_key FROM _cdc_worker_ledger").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(ledger, vec![env.key("t", "LOAD00000002.parquet")]);
}
