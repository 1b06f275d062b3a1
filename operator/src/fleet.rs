//! The live fleet: every few seconds, read each ready gateway pod's metrics, then write the
//! WsCluster's live status figures and each pod's `controller.kubernetes.io/pod-deletion-cost`.
//!
//! Both writes happen only when a figure moved by more than a threshold, so a steady fleet costs
//! the API server almost nothing. The loop runs beside the controller and never blocks a
//! reconcile: reads have a short timeout and bounded concurrency, and a pod that does not answer
//! is marked in the status rather than waited for.
//!
//! Scale-down: the ReplicaSet controller removes the pods with the lowest deletion cost first,
//! and here the cost is the pod's open connections, so the emptiest pods go and the fewest
//! clients have to reconnect.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::crd::{PodFigures, WsCluster, WsClusterStatus};
use crate::metrics::Metrics;
use crate::names::{self, APP_NAME, MANAGED_BY};
use crate::resources::METRICS_PORT;

/// Status fields this module owns; the reconciler's status writes leave them alone.
pub const LIVE_STATUS_FIELDS: &[&str] = &["connections", "topics", "pods"];
/// The annotation the ReplicaSet controller ranks pods by on scale-down (lowest first).
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Largest metrics answer read from a pod; a gateway's is a few KiB.
pub const MAX_METRICS_BYTES: usize = 1 << 20;
/// A figure is rewritten at once when it moved by more than this many…
pub const MIN_STEP: i64 = 10;
/// …and by more than this share of its last written value (percent).
pub const MIN_STEP_PERCENT: i64 = 10;
/// Smaller moves of the status figures are written after this many polls, so the status is
/// exact within a minute (at the default period) yet written at most that often for noise.
pub const STALE_POLLS: u32 = 6;

/// How the fleet is read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time between two reads of the fleet.
    pub poll: Duration,
    /// Longest wait for one pod's metrics.
    pub timeout: Duration,
    /// Pods read at once, across all clusters.
    pub concurrency: usize,
}

/// The figures read from one pod's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    /// `wsgate_connections`.
    pub connections: i64,
    /// `wsgate_topics`.
    pub topics: i64,
}

/// Reads `wsgate_connections` and `wsgate_topics` from a Prometheus text exposition. Values must
/// be finite, whole and non-negative; anything else is a bad answer, reported with a short,
/// stable reason (it ends up in the status, which must not churn on varying text).
///
/// # Errors
/// When either sample is missing or not a count.
pub fn parse_metrics(text: &str) -> Result<Figures, String> {
    let mut connections = None;
    let mut topics = None;
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_ascii_whitespace();
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let slot = match name {
            "wsgate_connections" => &mut connections,
            "wsgate_topics" => &mut topics,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(count(name, value)?);
        }
    }
    Ok(Figures {
        connections: connections.ok_or("no wsgate_connections sample")?,
        topics: topics.ok_or("no wsgate_topics sample")?,
    })
}

fn count(name: &str, value: &str) -> Result<i64, String> {
    let v: f64 = value
        .parse()
        .map_err(|_| format!("{name} is not a number"))?;
    // 2^53: every whole f64 below it is exact, and no gateway holds that many connections.
    if !(0.0..=9_007_199_254_740_992.0).contains(&v) || v.fract() != 0.0 {
        return Err(format!("{name} is not a count"));
    }
    #[allow(clippy::cast_possible_truncation)]
    Ok(v as i64)
}

/// Whether a pod takes connections: its Ready condition is true and it is not terminating.
#[must_use]
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Where a pod's metrics are: its IP, the port and path of its `prometheus.io/port` and
/// `prometheus.io/path` annotations (what Prometheus scrapes; the operator sets both on every
/// gateway pod), else the container port named `metrics`, else the gateway's default.
///
/// # Errors
/// When the pod has no valid IP yet.
pub fn metrics_url(pod: &Pod) -> Result<String, String> {
    let ip: IpAddr = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .ok_or("no pod IP")?
        .parse()
        .map_err(|_| "invalid pod IP".to_owned())?;
    let annotations = pod.annotations();
    let port = annotations
        .get("prometheus.io/port")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .or_else(|| named_metrics_port(pod))
        .unwrap_or(u16::try_from(METRICS_PORT).unwrap_or(9090));
    let path = annotations
        .get("prometheus.io/path")
        .filter(|p| p.starts_with('/') && p.len() <= 256 && p.bytes().all(|b| b.is_ascii_graphic()))
        .map_or("/metrics", String::as_str);
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Ok(format!("http://{host}:{port}{path}"))
}

fn named_metrics_port(pod: &Pod) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("metrics"))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// Reads one pod's figures.
///
/// # Errors
/// A short, stable reason: timeout, refused, an HTTP status, an oversized or malformed answer.
pub async fn scrape(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Figures, String> {
    let read = async {
        let mut response = http.get(url).send().await.map_err(|e| {
            if e.is_connect() {
                "connection refused or unreachable".to_owned()
            } else {
                "request failed".to_owned()
            }
        })?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|_| "answer cut short".to_owned())?
        {
            if body.len() + chunk.len() > MAX_METRICS_BYTES {
                return Err("answer too large".to_owned());
            }
            body.extend_from_slice(&chunk);
        }
        let text = std::str::from_utf8(&body).map_err(|_| "answer is not UTF-8".to_owned())?;
        parse_metrics(text)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}

/// Whether `new` differs enough from the last written `old` to be written at once.
#[must_use]
pub fn significant(old: i64, new: i64) -> bool {
    let step = MIN_STEP.max(old.saturating_abs() / (100 / MIN_STEP_PERCENT));
    old.abs_diff(new) > step.unsigned_abs()
}

fn moved(old: Option<i64>, new: Option<i64>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => significant(o, n),
        (o, n) => o.is_some() != n.is_some(),
    }
}

/// What a poll found: the live status figures of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Live {
    /// Sum over the pods that answered; `None` when ready pods exist but none answered.
    pub connections: Option<i64>,
    /// The busiest pod's topics.
    pub topics: Option<i64>,
    /// Every pod, sorted by name.
    pub pods: Vec<PodFigures>,
}

impl Live {
    /// The figures of `pods` (name, ready, what reading it gave; `None` when not read).
    #[must_use]
    pub fn of(mut pods: Vec<PodFigures>) -> Self {
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        let answered: Vec<&PodFigures> = pods.iter().filter(|p| p.connections.is_some()).collect();
        let any_ready = pods.iter().any(|p| p.ready);
        let (connections, topics) = if answered.is_empty() {
            if any_ready {
                (None, None)
            } else {
                (Some(0), Some(0))
            }
        } else {
            (
                Some(answered.iter().filter_map(|p| p.connections).sum()),
                answered.iter().filter_map(|p| p.topics).max(),
            )
        };
        Self {
            connections,
            topics,
            pods,
        }
    }

    /// Whether the status must be rewritten now: a pod came, went, changed readiness or
    /// reachability, or a figure moved significantly — or any figure differs and the status has
    /// not been written for `stale` (then small moves are written too).
    #[must_use]
    pub fn needs_write(&self, status: Option<&WsClusterStatus>, stale: bool) -> bool {
        let empty = WsClusterStatus::default();
        let status = status.unwrap_or(&empty);
        let old_pods = status.pods.as_deref().unwrap_or_default();
        let shape = |p: &PodFigures| {
            (
                p.name.clone(),
                p.ready,
                p.error.clone(),
                p.connections.is_some(),
            )
        };
        if status.pods.is_none()
            || old_pods.len() != self.pods.len()
            || old_pods.iter().map(shape).ne(self.pods.iter().map(shape))
        {
            return true;
        }
        let big = moved(status.connections, self.connections)
            || moved(status.topics, self.topics)
            || old_pods
                .iter()
                .zip(&self.pods)
                .any(|(o, n)| moved(o.connections, n.connections) || moved(o.topics, n.topics));
        let any = status.connections != self.connections
            || status.topics != self.topics
            || old_pods != self.pods.as_slice();
        big || (stale && any)
    }

    /// The status merge patch (`null` clears a figure that became unknown).
    #[must_use]
    pub fn patch(&self) -> Value {
        json!({ "status": {
            "connections": self.connections,
            "topics": self.topics,
            "pods": self.pods,
        }})
    }
}

/// The deletion cost to write on a pod, if it needs writing: its connections (capped to the
/// annotation's int32 range), when the annotation is missing, unreadable, or off significantly.
#[must_use]
pub fn deletion_cost_update(pod: &Pod, connections: i64) -> Option<i32> {
    let cost = i32::try_from(connections.clamp(0, i64::from(i32::MAX))).unwrap_or(i32::MAX);
    let current = pod
        .annotations()
        .get(DELETION_COST_ANNOTATION)
        .and_then(|v| v.parse::<i32>().ok());
    match current {
        Some(c) if !significant(i64::from(c), i64::from(cost)) => None,
        _ => Some(cost),
    }
}

/// Reads the fleet every `settings.poll` until dropped: watches the gateway pods (by the labels
/// the operator puts on them) and uses the controller's WsCluster store.
pub async fn run(client: Client, clusters: Store<WsCluster>, settings: Settings, metrics: Metrics) {
    let (pods, writer) = reflector::store::<Pod>();
    let selector =
        format!("app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/name={APP_NAME}");
    let watch = reflector::reflector(
        writer,
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(&selector),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|event| {
        if let Err(e) = event {
            warn!(error = %e, "gateway pod watch");
        }
        futures::future::ready(())
    });
    let http = match reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(settings.timeout)
        .pool_max_idle_per_host(1)
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            warn!(error = %e, "cannot build the HTTP client; live fleet figures are off");
            return;
        }
    };
    let polls = async {
        if pods.wait_until_ready().await.is_err() || clusters.wait_until_ready().await.is_err() {
            return;
        }
        let mut reader = Reader {
            client,
            http,
            settings: settings.clone(),
            metrics,
            last_status_write: HashMap::new(),
        };
        let mut interval = tokio::time::interval(settings.poll);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            reader.poll(&clusters, &pods).await;
        }
    };
    tokio::join!(watch, polls);
}

struct Reader {
    client: Client,
    http: reqwest::Client,
    settings: Settings,
    metrics: Metrics,
    /// When each cluster's (namespace/name) live status was last written.
    last_status_write: HashMap<String, Instant>,
}

impl Reader {
    async fn poll(&mut self, clusters: &Store<WsCluster>, pods: &Store<Pod>) {
        // Gateway pods by (namespace, instance label).
        let mut by_cluster: HashMap<(String, String), Vec<Arc<Pod>>> = HashMap::new();
        for pod in pods.state() {
            if let (Some(ns), Some(instance)) = (
                pod.namespace(),
                pod.labels().get("app.kubernetes.io/instance").cloned(),
            ) {
                by_cluster.entry((ns, instance)).or_default().push(pod);
            }
        }
        let clusters: Vec<Arc<WsCluster>> = clusters
            .state()
            .into_iter()
            .filter(|w| w.metadata.deletion_timestamp.is_none() && w.namespace().is_some())
            .collect();

        // Read every ready pod of every cluster, `concurrency` at a time.
        let mut reads = Vec::new();
        for (index, wsc) in clusters.iter().enumerate() {
            let key = (wsc.namespace().unwrap_or_default(), wsc.name_any());
            let selector = names::selector_labels(&key.1);
            for pod in by_cluster.get(&key).into_iter().flatten() {
                let labels = pod.labels();
                if selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                    reads.push((index, Arc::clone(pod)));
                }
            }
        }
        let (http, timeout) = (&self.http, self.settings.timeout);
        let results: Vec<(usize, Arc<Pod>, Read)> = futures::stream::iter(reads)
            .map(|(index, pod)| async move {
                let figures = if is_ready(&pod) {
                    Some(match metrics_url(&pod) {
                        Ok(url) => scrape(http, &url, timeout).await,
                        Err(e) => Err(e),
                    })
                } else {
                    None
                };
                (index, pod, figures)
            })
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;

        let mut per_cluster: BTreeMap<usize, Vec<(Arc<Pod>, Read)>> =
            (0..clusters.len()).map(|i| (i, Vec::new())).collect();
        for (index, pod, figures) in results {
            let result = match &figures {
                Some(Ok(_)) => "ok",
                Some(Err(_)) => "error",
                None => "not_ready",
            };
            self.metrics.fleet_reads.with_label_values(&[result]).inc();
            per_cluster.entry(index).or_default().push((pod, figures));
        }
        for (index, members) in per_cluster {
            if let Some(wsc) = clusters.get(index) {
                self.write(wsc, &members).await;
            }
        }
        let live: Vec<String> = clusters.iter().map(|w| cluster_key(w)).collect();
        self.last_status_write.retain(|k, _| live.contains(k));
    }

    async fn write(&mut self, wsc: &WsCluster, members: &[(Arc<Pod>, Read)]) {
        let ns = wsc.namespace().unwrap_or_default();
        let key = cluster_key(wsc);
        let figures: Vec<PodFigures> = members
            .iter()
            .map(|(pod, read)| PodFigures {
                name: pod.name_any(),
                ready: read.is_some(),
                connections: read
                    .as_ref()
                    .and_then(|r| r.as_ref().ok())
                    .map(|f| f.connections),
                topics: read
                    .as_ref()
                    .and_then(|r| r.as_ref().ok())
                    .map(|f| f.topics),
                error: read.as_ref().and_then(|r| r.as_ref().err()).cloned(),
            })
            .collect();
        let live = Live::of(figures);
        let stale = self
            .last_status_write
            .get(&key)
            .is_none_or(|at| at.elapsed() >= self.settings.poll.saturating_mul(STALE_POLLS));
        if live.needs_write(wsc.status.as_ref(), stale) {
            let api: Api<WsCluster> = Api::namespaced(self.client.clone(), &ns);
            match api
                .patch_status(
                    &wsc.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(live.patch()),
                )
                .await
            {
                Ok(_) => {
                    self.last_status_write.insert(key.clone(), Instant::now());
                    self.metrics
                        .fleet_writes
                        .with_label_values(&["status"])
                        .inc();
                }
                Err(e) => warn!(wscluster = %key, error = %e, "cannot write live status"),
            }
        }

        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        for (pod, read) in members {
            let Some(Ok(figures)) = read else { continue };
            let Some(cost) = deletion_cost_update(pod, figures.connections) else {
                continue;
            };
            let patch = json!({ "metadata": { "annotations": {
                DELETION_COST_ANNOTATION: cost.to_string(),
            }}});
            match pods
                .patch(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    self.metrics
                        .fleet_writes
                        .with_label_values(&["deletion_cost"])
                        .inc();
                    debug!(pod = %pod.name_any(), cost, "deletion cost");
                }
                // Gone meanwhile: nothing to rank.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => warn!(pod = %pod.name_any(), error = %e, "cannot write deletion cost"),
            }
        }
    }
}

/// What reading one pod gave: `None` when it was not read (not ready).
type Read = Option<Result<Figures, String>>;

fn cluster_key(wsc: &WsCluster) -> String {
    format!("{}/{}", wsc.namespace().unwrap_or_default(), wsc.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = "# HELP wsgate_connections Open WebSocket connections.\n\
        # TYPE wsgate_connections gauge\n\
        wsgate_connections 42\n\
        # TYPE wsgate_connections_opened_total counter\n\
        wsgate_connections_opened_total 50\n\
        wsgate_topics 7\n\
        wsgate_topic_subscribers{topic=\"a\"} 3\n";

    #[test]
    fn reads_the_two_gauges_and_ignores_lookalikes() {
        assert_eq!(
            parse_metrics(GATEWAY),
            Ok(Figures {
                connections: 42,
                topics: 7
            })
        );
        assert_eq!(
            parse_metrics("wsgate_connections 1e3\nwsgate_topics 0 1700000000000\n"),
            Ok(Figures {
                connections: 1000,
                topics: 0
            })
        );
    }

    #[test]
    fn hostile_answers_are_refused_with_a_short_reason() {
        for (text, reason) in [
            ("", "no wsgate_connections sample"),
            ("wsgate_connections 1\n", "no wsgate_topics sample"),
            (
                "wsgate_connections NaN\nwsgate_topics 1",
                "wsgate_connections is not a count",
            ),
            (
                "wsgate_connections -1\nwsgate_topics 1",
                "wsgate_connections is not a count",
            ),
            (
                "wsgate_connections +Inf\nwsgate_topics 1",
                "wsgate_connections is not a count",
            ),
            (
                "wsgate_connections 1.5\nwsgate_topics 1",
                "wsgate_connections is not a count",
            ),
            (
                "wsgate_connections 1e300\nwsgate_topics 1",
                "wsgate_connections is not a count",
            ),
            (
                "wsgate_connections x\nwsgate_topics 1",
                "wsgate_connections is not a number",
            ),
            ("<html>oops</html>", "no wsgate_connections sample"),
        ] {
            assert_eq!(parse_metrics(text), Err(reason.to_owned()), "{text:?}");
        }
    }

    #[test]
    fn small_moves_wait_and_big_ones_do_not() {
        assert!(!significant(100, 110));
        assert!(significant(100, 111));
        assert!(!significant(0, 10));
        assert!(significant(0, 11));
        assert!(!significant(10_000, 10_900));
        assert!(significant(10_000, 11_001));
        assert!(significant(10_000, 8_999));
    }

    fn pod_figures(name: &str, connections: Option<i64>) -> PodFigures {
        PodFigures {
            name: name.into(),
            ready: true,
            connections,
            topics: connections.map(|c| c / 10),
            error: connections.is_none().then(|| "timeout".to_owned()),
        }
    }

    fn written(live: &Live) -> WsClusterStatus {
        WsClusterStatus {
            connections: live.connections,
            topics: live.topics,
            pods: Some(live.pods.clone()),
            ..WsClusterStatus::default()
        }
    }

    #[test]
    fn totals_count_the_pods_that_answered_and_mark_the_others() {
        let live = Live::of(vec![
            pod_figures("b", Some(30)),
            pod_figures("a", Some(100)),
            pod_figures("c", None),
        ]);
        assert_eq!(live.connections, Some(130));
        assert_eq!(live.topics, Some(10));
        assert_eq!(
            live.pods
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );

        let silent = Live::of(vec![pod_figures("a", None)]);
        assert_eq!((silent.connections, silent.topics), (None, None));
        assert_eq!(silent.patch()["status"]["connections"], Value::Null);
        assert_eq!(Live::of(Vec::new()).connections, Some(0));
    }

    #[test]
    fn a_steady_fleet_is_not_rewritten_but_changes_of_shape_are() {
        let live = Live::of(vec![
            pod_figures("a", Some(100)),
            pod_figures("b", Some(200)),
        ]);
        assert!(live.needs_write(None, false));
        let status = written(&live);
        assert!(!live.needs_write(Some(&status), false));

        let noise = Live::of(vec![
            pod_figures("a", Some(105)),
            pod_figures("b", Some(195)),
        ]);
        assert!(!noise.needs_write(Some(&status), false));
        assert!(
            noise.needs_write(Some(&status), true),
            "small moves are written once stale"
        );
        assert!(
            !live.needs_write(Some(&status), true),
            "nothing differs: nothing to write"
        );

        let jump = Live::of(vec![
            pod_figures("a", Some(100)),
            pod_figures("b", Some(400)),
        ]);
        assert!(jump.needs_write(Some(&status), false));
        let gone = Live::of(vec![pod_figures("a", Some(100))]);
        assert!(gone.needs_write(Some(&status), false));
        let silent = Live::of(vec![pod_figures("a", Some(100)), pod_figures("b", None)]);
        assert!(silent.needs_write(Some(&status), false));
    }

    fn pod(annotations: &[(&str, &str)], ip: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: ip.map(str::to_owned),
            ..Default::default()
        });
        pod
    }

    #[test]
    fn the_metrics_address_follows_the_scrape_annotations() {
        assert_eq!(
            metrics_url(&pod(&[], Some("10.1.2.3"))),
            Ok("http://10.1.2.3:9090/metrics".to_owned())
        );
        assert_eq!(
            metrics_url(&pod(
                &[("prometheus.io/port", "9100"), ("prometheus.io/path", "/m")],
                Some("fd00::1")
            )),
            Ok("http://[fd00::1]:9100/m".to_owned())
        );
        // Hostile annotations fall back to the defaults.
        assert_eq!(
            metrics_url(&pod(
                &[
                    ("prometheus.io/port", "70000"),
                    ("prometheus.io/path", "x@evil/")
                ],
                Some("10.1.2.3")
            )),
            Ok("http://10.1.2.3:9090/metrics".to_owned())
        );
        assert_eq!(metrics_url(&pod(&[], None)), Err("no pod IP".to_owned()));
        assert_eq!(
            metrics_url(&pod(&[], Some("evil.example:80/"))),
            Err("invalid pod IP".to_owned())
        );
    }

    #[test]
    fn the_deletion_cost_follows_connections_with_hysteresis() {
        assert_eq!(deletion_cost_update(&pod(&[], None), 5), Some(5));
        let ranked = pod(&[(DELETION_COST_ANNOTATION, "100")], None);
        assert_eq!(deletion_cost_update(&ranked, 108), None);
        assert_eq!(deletion_cost_update(&ranked, 150), Some(150));
        assert_eq!(deletion_cost_update(&ranked, 20), Some(20));
        let garbage = pod(&[(DELETION_COST_ANNOTATION, "lots")], None);
        assert_eq!(deletion_cost_update(&garbage, 7), Some(7));
        assert_eq!(
            deletion_cost_update(&pod(&[], None), i64::MAX),
            Some(i32::MAX)
        );
    }
}
