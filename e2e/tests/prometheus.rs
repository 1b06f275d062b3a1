//! A real Prometheus scraping two real gateway processes (sharing a real redis-server), each
//! relabelled with the namespace, WsCluster and pod it stands for, as Kubernetes service discovery
//! would. The exact PromQL of the chart's alerts and of the prometheus-adapter rule in
//! `docs/kubernetes.md` must return the expected per-pod values, and every query of the chart's
//! Grafana dashboard must evaluate (its connection and broker panels to the expected values).

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
    /// `targets`: (address, namespace, WsCluster, pod).
    fn start(targets: &[(String, &str, &str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("wsgate-prom-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        // Each target carries the labels Kubernetes service discovery would give the pod (the
        // WsCluster is its app.kubernetes.io/instance label, as a labelmap names it).
        let mut scrape = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: wsgate\n    static_configs:\n",
        );
        for (addr, namespace, cluster, pod) in targets {
            scrape.push_str(&format!(
                "      - targets: ['{addr}']\n        labels: {{ namespace: {namespace}, app_kubernetes_io_instance: {cluster}, pod: {pod} }}\n"
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

impl Prometheus {
    /// Waits until every series `selector` returns carries `label` = `value`, as a Grafana
    /// variable listing that label's values would show.
    async fn wait_for_label(&self, selector: &str, label: &str, value: &str) {
        let start = Instant::now();
        let mut last = Vec::new();
        while start.elapsed() < DEADLINE {
            if let Some(result) = self.query(selector).await {
                last = result
                    .iter()
                    .map(|r| r["metric"][label].as_str().unwrap_or_default().to_owned())
                    .collect();
                if !last.is_empty() && last.iter().all(|v| v == value) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{selector}: expected every {label} to be {value:?}, last answer {last:?}");
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

/// Every query of the chart's Grafana dashboard, `(where, expr)`: panel targets in order, then
/// the template variables (`variable NAME`, their `label_values(…)` query).
fn dashboard_queries() -> Vec<(String, String)> {
    let path = root().join("charts/wsgate-operator/dashboards/wsgate.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let (Some(title), Some(expr)) = (p["title"].as_str(), t["expr"].as_str()) {
                out.push((title.to_owned(), expr.to_owned()));
            }
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let (Some(name), Some(query)) = (v["name"].as_str(), v["query"]["query"].as_str()) {
            out.push((format!("variable {name}"), query.to_owned()));
        }
    }
    assert!(
        out.len() >= 20,
        "dashboard queries not found in {}",
        path.display()
    );
    out
}

/// The queries of the dashboard panel titled `title`, in order.
fn panel(queries: &[(String, String)], title: &str) -> Vec<String> {
    let found: Vec<String> = queries
        .iter()
        .filter(|(t, _)| t == title)
        .map(|(_, e)| e.clone())
        .collect();
    assert!(!found.is_empty(), "the dashboard has no panel {title:?}");
    found
}

/// A variable's `label_values(SELECTOR, LABEL)` query as the PromQL selector Grafana runs,
/// over every namespace and WsCluster.
fn variable_query(queries: &[(String, String)], name: &str) -> String {
    grafana(&panel(queries, &format!("variable {name}"))[0], ".*", ".*")
}

/// `expr` with Grafana's variables filled in as Grafana would (a 1-minute rate window).
/// `label_values(…)` variable queries are evaluated as their selector.
fn grafana(expr: &str, namespace: &str, cluster: &str) -> String {
    let expr = match expr
        .strip_prefix("label_values(")
        .and_then(|q| q.rsplit_once(','))
    {
        Some((selector, _)) => selector,
        None => expr,
    };
    expr.replace("$__rate_interval", "1m")
        .replace("$namespace", namespace)
        .replace("$wscluster", cluster)
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
        (a.addr.to_string(), "apps", "chat", "chat-0"),
        (b.addr.to_string(), "apps", "chat", "chat-1"),
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

    // Every query of the Grafana dashboard evaluates; the connection panels show the fleet.
    let dashboard = dashboard_queries();
    for (place, expr) in &dashboard {
        let promql = grafana(expr, "apps", "chat");
        assert!(
            prom.query(&promql).await.is_some(),
            "{place}: no answer to {promql}"
        );
    }
    // Panels titled "Connections": the overview figure and the graph, total and per pod.
    for expr in panel(&dashboard, "Connections") {
        let per_pod = expr.contains("by (namespace, pod)");
        let want: &[(&str, f64)] = if per_pod {
            &[("chat-0", 3.0), ("chat-1", 5.0)]
        } else {
            &[("", 8.0)]
        };
        prom.wait_for(&grafana(&expr, "apps", "chat"), want).await;
        // The WsCluster variable selects: another cluster's dashboard shows none of these pods.
        prom.wait_for(&grafana(&expr, "apps", "other"), &[]).await;
    }
    for (variable, label, want) in [
        ("namespace", "namespace", "apps"),
        ("wscluster", "app_kubernetes_io_instance", "chat"),
    ] {
        prom.wait_for_label(&variable_query(&dashboard, variable), label, want)
            .await;
    }
    let broker_down_pods = panel(&dashboard, "Pods with broker down");
    prom.wait_for(&grafana(&broker_down_pods[0], "apps", "chat"), &[("", 0.0)])
        .await;

    // Redis goes away: both pods lose their broker, and the alert's expression names each pod.
    redis.kill();
    prom.wait_for(&broker_down, &[("chat-0", 0.0), ("chat-1", 0.0)])
        .await;
    prom.wait_for(&grafana(&broker_down_pods[0], "apps", "chat"), &[("", 2.0)])
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
