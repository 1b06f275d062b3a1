//! The chart's Grafana dashboard against a live gateway's `/metrics`: every metric it queries is
//! exported, every label it groups by or matches on exists on those metrics, with the values
//! it matches. (tests/grafana/check-dashboard.sh checks the ConfigMap and the PromQL syntax;
//! e2e/tests/prometheus.rs evaluates every query on a real Prometheus.)
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use serde_json::Value;
use wsgate_tests::TestGateway;

/// Labels Prometheus adds to every series it scrapes from a pod (Kubernetes service discovery).
const TARGET_LABELS: &[&str] = &["namespace", "pod", "app_kubernetes_io_instance"];

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/wsgate-operator/dashboards/wsgate.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every query of the dashboard: panel targets and template variables, with where it is.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((format!("panel {title:?}"), expr.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_owned()));
        }
    }
    out
}

/// The `wsgate_*` metric names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.match_indices("wsgate_")
        .map(|(at, _)| {
            expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// Labels in `by (…)` clauses.
fn grouping_labels(expr: &str) -> Vec<String> {
    expr.split("by (")
        .skip(1)
        .flat_map(|rest| {
            let list = rest.split(')').next().unwrap_or_default();
            list.split(',')
                .map(|l| l.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `label=~"a|b"` / `label="a"` matchers on gateway labels: (label, values).
fn value_matchers(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for label in ["reason", "code", "version"] {
        for op in ["=~\"", "=\""] {
            for part in expr.split(&format!("{label}{op}")).skip(1) {
                let values = part.split('"').next().unwrap_or_default();
                out.push((
                    label.to_owned(),
                    values.split('|').map(str::to_owned).collect(),
                ));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_fleet_dashboard_queries_only_what_the_gateway_exports() {
    let gw = TestGateway::start(&[]).await;
    let scrape = gw.http().metrics().await;
    let exported: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let series_of = |metric: &str| -> Vec<&str> {
        scrape
            .lines()
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with([' ', '{']))
            .collect()
    };

    let dashboard = dashboard();
    let queries = queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut used = BTreeSet::new();
    for (place, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place} reads no wsgate metric: {expr}");
        for name in &names {
            assert!(
                exported.contains(name.as_str()),
                "{place} reads {name}, which the gateway does not export: {expr}"
            );
            used.insert(name.clone());
        }
        let series: Vec<&str> = names.iter().flat_map(|n| series_of(n)).collect();
        for label in grouping_labels(expr) {
            assert!(
                TARGET_LABELS.contains(&label.as_str())
                    || series.iter().any(|s| s.contains(&format!("{{{label}=\""))
                        || s.contains(&format!(",{label}=\""))),
                "{place} groups by {label:?}, which {names:?} do not carry: {expr}"
            );
        }
        for (label, values) in value_matchers(expr) {
            for value in values {
                assert!(
                    series
                        .iter()
                        .any(|s| s.contains(&format!("{label}=\"{value}\""))),
                    "{place} matches {label}={value:?}, which {names:?} never carry: {expr}"
                );
            }
        }
    }
    // The panels the fleet needs are there.
    for name in [
        "wsgate_connections",
        "wsgate_messages_delivered_total",
        "wsgate_messages_published_total",
        "wsgate_http_errors_total",
        "wsgate_messages_dropped_total",
        "wsgate_connections_closed_total",
        "wsgate_broker_up",
        "wsgate_broker_reconnects_total",
        "wsgate_broker_channels",
        "wsgate_topics",
    ] {
        assert!(used.contains(name), "no panel shows {name}");
    }
}
