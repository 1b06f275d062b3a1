//! A real Prometheus scraping two real gateway processes (sharing a real redis-server), each
//! relabelled with the namespace and pod it stands for, as Kubernetes service discovery would.
//! The exact PromQL of the chart's alerts and of the prometheus-adapter rule in
//! `docs/kubernetes.md` must return the expected per-pod values.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wsgate_tests::{Client, ProcessGateway, RedisServer};

const DEADLINE: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A `prometheus` process on a free port with its own data folder; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(targets: &[(String, &str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("wsgate-prom-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        // Each target carries the labels Kubernetes service discovery would give the pod.
        let mut scrape = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: wsgate\n    static_configs:\n",
        );
        for (addr, namespace, pod) in targets {
            scrape.push_str(&format!(
                "      - targets: ['{addr}']\n        labels: {{ namespace: {namespace}, pod: {pod} }}\n"
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), scrape).expect("config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package `prometheus`) must be installed");
        Self { child, addr, dir }
    }

    /// The instant vector `promql` evaluates to, or `None` while Prometheus is not answering
    /// yet. A query Prometheus rejects fails the test.
    async fn query(&self, promql: &str) -> Option<Vec<Value>> {
        let response = reqwest::Client::new()
            .get(format!("http://{}/api/v1/query", self.addr))
            .query(&[("query", promql)])
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        assert_eq!(body["status"], "success", "{promql}: {body}");
        Some(
            body["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// Waits until `promql` returns exactly `expected` (pod → value), or panics with the last
    /// answer. Prometheus scrapes every second: this waits for its next scrapes, not a timer.
    async fn wait_for(&self, promql: &str, expected: &[(&str, f64)]) {
        let start = Instant::now();
        let mut last = Vec::new();
        while start.elapsed() < DEADLINE {
            if let Some(result) = self.query(promql).await {
                let mut got: Vec<(String, f64)> = result
                    .iter()
                    .map(|r| {
                        let pod = r["metric"]["pod"].as_str().unwrap_or_default().to_owned();
                        let value = r["value"][1]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(f64::NAN);
                        (pod, value)
                    })
                    .collect();
                got.sort_by(|a, b| a.0.cmp(&b.0));
                let want: Vec<(String, f64)> = expected
                    .iter()
                    .map(|(p, v)| ((*p).to_owned(), *v))
                    .collect();
                if got == want {
                    return;
                }
                last = got;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        panic!(
            "{promql}: expected {expected:?}, last answer {last:?}\nprometheus log tail:\n{}",
            &log[log.len().saturating_sub(2000)..]
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The chart's alerts, `name → expr`, rendered by the real helm.
fn chart_alerts() -> Vec<(String, String)> {
    let helm = std::env::var_os("E2E_BIN")
        .map(|b| PathBuf::from(b).join("helm"))
        .expect("E2E_BIN is not set: run `make e2e`");
    let out = Command::new(helm)
        .args(["template", "wsgate-operator"])
        .arg(root().join("charts/wsgate-operator"))
        .args([
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ])
        .output()
        .expect("helm");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The alerts are plain `- alert:` / `expr:` pairs; read them without a YAML parser.
    let mut alerts = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- alert: ") {
            name = Some(n.to_owned());
        } else if let (Some(expr), Some(n)) = (line.strip_prefix("expr: "), name.take()) {
            alerts.push((n, expr.to_owned()));
        }
    }
    assert!(alerts.len() >= 5, "alerts not found in:\n{text}");
    alerts
}

fn alert(alerts: &[(String, String)], name: &str) -> String {
    alerts
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, e)| e.clone())
        .unwrap_or_else(|| panic!("the chart has no alert {name}"))
}

/// The prometheus-adapter rule of docs/kubernetes.md, expanded as the adapter would for a
/// request about `pods` in `namespace` (its metricsQuery template filled in).
fn adapter_query(namespace: &str, pods: &[&str]) -> (String, String) {
    let doc = std::fs::read_to_string(root().join("docs/kubernetes.md")).expect("docs");
    let field = |key: &str| {
        doc.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(key)
                    .map(|v| v.trim().trim_matches('\'').to_owned())
            })
            .unwrap_or_else(|| panic!("docs/kubernetes.md has no adapter `{key}`"))
    };
    let series_query = field("- seriesQuery:");
    let metrics_query = field("metricsQuery:");
    let series = series_query
        .split('{')
        .next()
        .expect("series name")
        .to_owned();
    let matchers = format!("namespace=\"{namespace}\",pod=~\"{}\"", pods.join("|"));
    let query = metrics_query
        .replace("<<.Series>>", &series)
        .replace("<<.LabelMatchers>>", &matchers)
        .replace("<<.GroupBy>>", "pod");
    (series_query, query)
}

#[tokio::test]
#[ignore = "needs prometheus and the helm of `make e2e`"]
async fn prometheus_answers_the_chart_alerts_and_the_adapter_rule_per_pod() {
    let mut redis = RedisServer::start();
    let gateway_args = ["--redis-url", &redis.url(), "--key-prefix", "apps.chat"];
    let a = ProcessGateway::spawn(&gateway_args).await;
    let b = ProcessGateway::spawn(&gateway_args).await;
    let prom = Prometheus::start(&[
        (a.addr.to_string(), "apps", "chat-0"),
        (b.addr.to_string(), "apps", "chat-1"),
    ]);

    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(a.addr).await);
    }
    for _ in 0..5 {
        clients.push(Client::connect(b.addr).await);
    }

    // The adapter's series discovery finds both pods, and its query gives each its count.
    let (series_query, per_pod) = adapter_query("apps", &["chat-0", "chat-1"]);
    prom.wait_for(
        &format!("count by (pod) ({series_query})"),
        &[("chat-0", 1.0), ("chat-1", 1.0)],
    )
    .await;
    prom.wait_for(&per_pod, &[("chat-0", 3.0), ("chat-1", 5.0)])
        .await;

    let alerts = chart_alerts();
    let broker_down = alert(&alerts, "WsgateBrokerDown");
    let reconnecting = alert(&alerts, "WsgateBrokerReconnecting");
    let dropped = alert(&alerts, "WsgateMessagesDropped");
    // Healthy fleet: the alert expressions select nothing.
    prom.wait_for("wsgate_broker_up", &[("chat-0", 1.0), ("chat-1", 1.0)])
        .await;
    for expr in [&broker_down, &reconnecting, &dropped] {
        prom.wait_for(expr, &[]).await;
    }

    // Redis goes away: both pods lose their broker, and the alert's expression names each pod.
    redis.kill();
    prom.wait_for(&broker_down, &[("chat-0", 0.0), ("chat-1", 0.0)])
        .await;
    // A client leaving shows in the adapter's figure for its pod only.
    drop(clients.pop());
    prom.wait_for(&per_pod, &[("chat-0", 3.0), ("chat-1", 4.0)])
        .await;
    redis.restart();
    prom.wait_for(&broker_down, &[]).await;
    prom.wait_for(
        "wsgate_broker_reconnects_total > bool 0",
        &[("chat-0", 1.0), ("chat-1", 1.0)],
    )
    .await;
}
