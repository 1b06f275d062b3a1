//! The bench binary end to end, cheaply: against a gateway started in this process (memory
//! broker), and — when a `wsgate` binary sits next to the bench binary — with `--spawn 1`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use serde_json::Value;
use tokio::sync::oneshot;

struct InProcess {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<wsgate::Result<()>>,
}

impl InProcess {
    async fn start() -> Self {
        let config = wsgate::Config::parse_args([
            "wsgate",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout-secs",
            "1",
        ])
        .unwrap();
        let gateway = wsgate::Gateway::start(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(wsgate::serve_gateway(gateway, listener, None, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            stop: Some(tx),
            server,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.server.await.unwrap().unwrap();
    }
}

async fn bench(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate-bench"))
        .args(args)
        .args(["--json", "--duration-limit", "30"])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// The last JSON line of a successful run.
fn result(out: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in:\n{stdout}\n{stderr}"));
    serde_json::from_str(line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reports_every_delivery_without_loss_or_duplicates() {
    let gw = InProcess::start().await;
    let target = format!("ws://{}", gw.addr);
    let out = bench(&[
        "fanout", "--target", &target, "-c", "20", "-r", "400", "-m", "100", "--size", "80",
    ])
    .await;
    let v = result(&out);
    assert_eq!(v["scenario"], "fanout");
    assert_eq!(v["published"], 100);
    assert_eq!(v["publish_failed"], 0);
    assert_eq!(v["expected"], 2000);
    assert_eq!(v["received"], 2000);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicates"], 0);
    assert_eq!(v["per_replica"][0]["received"], 2000);
    assert!(v["latency"]["p99_us"].as_u64().unwrap() > 0);
    assert!(v["latency"]["count"] == 2000);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_clients_read_compressed_json_and_count_fewer_bytes_on_the_wire() {
    let gw = InProcess::start().await;
    let target = format!("ws://{}", gw.addr);
    let args = [
        "fanout",
        "--target",
        &target,
        "-c",
        "10",
        "-r",
        "400",
        "-m",
        "50",
        "--size",
        "1024",
        "--payload",
        "json",
    ];
    let plain = result(&bench(&args).await);
    let mut with_deflate = args.to_vec();
    with_deflate.push("--deflate");
    let deflated = result(&bench(&with_deflate).await);
    for v in [&plain, &deflated] {
        assert_eq!(v["received"], 500);
        assert_eq!(v["lost"], 0);
    }
    let per = |v: &Value| v["wire_bytes_per_delivery"].as_f64().unwrap();
    assert!(per(&plain) > 1000.0, "{}", per(&plain));
    assert!(per(&deflated) < per(&plain) / 2.0, "{}", per(&deflated));
    assert_eq!(deflated["deflate"], true);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_writes_every_frame_once_and_reports_its_cost() {
    let out = bench(&[
        "floor",
        "-c",
        "30",
        "--senders",
        "3",
        "-r",
        "200",
        "-m",
        "50",
        "--size",
        "200",
    ])
    .await;
    let v = result(&out);
    assert_eq!(v["scenario"], "floor");
    assert_eq!(v["expected"], 1500);
    assert_eq!(v["received"], 1500);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicates"], 0);
    // 200-byte payloads need the 16-bit length form: 4 header bytes.
    assert_eq!(v["frame_bytes"], 204);
    let senders = v["per_sender"].as_array().unwrap();
    assert_eq!(senders.len(), 3);
    for s in senders {
        assert_eq!(s["connections"], 10);
        assert_eq!(s["writes"], 500);
    }
    assert_eq!(v["latency"]["count"], 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_refuses_impossible_shapes() {
    for args in [
        &["floor", "-c", "1", "--senders", "2"][..],
        &["floor", "-r", "0"],
        &["floor", "-m", "0"],
        &["floor", "-c", "10", "-m", "100000000"],
    ] {
        let out = bench(args).await;
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!out.stderr.is_empty(), "{args:?} should say why");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_connect_count_their_joined_connections() {
    let gw = InProcess::start().await;
    let target = format!("ws://{}", gw.addr);
    let me = std::process::id().to_string();
    let out = bench(&[
        "idle",
        "--target",
        &target,
        "-n",
        "50",
        "--settle-secs",
        "0.1",
        "--pid",
        &me,
    ])
    .await;
    let v = result(&out);
    assert_eq!(v["scenario"], "idle");
    assert_eq!(v["ok"], 50);
    assert_eq!(v["failed"], 0);
    assert_eq!(
        v["processes"][0]["pid"].as_u64(),
        Some(u64::from(std::process::id()))
    );
    assert!(v["gateway_bytes_per_connection"].is_number());

    let out = bench(&["connect", "--target", &target, "-n", "50", "--topics", "5"]).await;
    let v = result(&out);
    assert_eq!(v["scenario"], "connect");
    assert_eq!(v["ok"], 50);
    assert_eq!(v["topics"], 5);
    assert!(v["per_sec"].as_f64().unwrap() > 0.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_processes_hold_what_one_process_may_not_and_go_away_after() {
    let gw = InProcess::start().await;
    let target = format!("ws://{}", gw.addr);
    let stats = format!("http://{}/api/stats", gw.addr);
    for scenario in ["idle", "connect"] {
        let mut args = vec![
            scenario,
            "--target",
            &target,
            "-n",
            "50",
            "--conns-per-process",
            "15",
        ];
        if scenario == "idle" {
            args.extend(["--settle-secs", "0.1"]);
        }
        let out = bench(&args).await;
        let v = result(&out);
        assert_eq!(v["ok"], 50, "{scenario}");
        assert_eq!(v["failed"], 0, "{scenario}");
        // 15 + 15 + 15 + 5.
        assert_eq!(v["bench_processes"], 4, "{scenario}");
        if scenario == "connect" {
            assert_eq!(v["latency"]["count"], 50);
        }
        // Once the bench has exited, its helpers are gone and so are their connections.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let s: Value = reqwest::get(&stats).await.unwrap().json().await.unwrap();
            if s["connections"] == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{scenario}: connections left open: {s}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_stops_at_the_max_rate_when_every_step_passes() {
    let gw = InProcess::start().await;
    let target = format!("ws://{}", gw.addr);
    let out = bench(&[
        "search",
        "--target",
        &target,
        "-c",
        "5",
        "--start-rate",
        "50",
        "--max-rate",
        "100",
        "--step-secs",
        "0.5",
    ])
    .await;
    let v = result(&out);
    assert_eq!(v["scenario"], "search");
    assert_eq!(v["steps"].as_array().unwrap().len(), 2);
    assert_eq!(v["sustained_rate"], 100.0);
    assert_eq!(v["reached_max_rate"], true);
    // One fanout line per step precedes the summary.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let runs: Vec<Value> = stdout
        .lines()
        .filter(|l| l.contains("\"scenario\":\"fanout\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r["lost"] == 0 && r["stale"] == 0));
    gw.stop().await;
}

#[tokio::test]
async fn targets_off_this_machine_are_refused() {
    let out = bench(&["connect", "--target", "ws://10.1.2.3:8080", "-n", "1"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_gateway_is_measured_and_stopped() {
    let bin = Path::new(env!("CARGO_BIN_EXE_wsgate-bench")).with_file_name("wsgate");
    if !bin.exists() {
        eprintln!("skipped: no {} (cargo build -p wsgate)", bin.display());
        return;
    }
    let out = bench(&[
        "fanout", "--spawn", "1", "-c", "10", "-r", "200", "-m", "40",
    ])
    .await;
    let v = result(&out);
    assert_eq!(v["received"], 400);
    assert_eq!(v["lost"], 0);
    let gateway = v["cpu"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["role"] == "gateway")
        .unwrap();
    assert!(gateway["cpu_seconds"].is_number());
    let pid = gateway["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the spawned gateway {pid} outlived the bench"
    );
}
