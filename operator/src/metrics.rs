//! The operator's own Prometheus metrics (`wsgate_operator_*`).
//!
//! Label values come from closed sets (reconcile results), never from object names.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric name this module exports, in the order they are documented.
pub const METRIC_NAMES: &[&str] = &[
    "wsgate_operator_reconcile_total",
    "wsgate_operator_reconcile_duration_seconds",
    "wsgate_operator_managed_wsclusters",
    "wsgate_operator_leader",
    "wsgate_operator_fleet_reads_total",
    "wsgate_operator_fleet_writes_total",
];

/// Outcomes of reading one gateway pod: the `result` label values.
pub const READ_RESULTS: &[&str] = &["ok", "error", "not_ready"];
/// What the fleet reader writes: the `kind` label values.
pub const WRITE_KINDS: &[&str] = &["status", "deletion_cost"];

/// Results a reconcile can end with: the `result` label values.
pub const RESULTS: &[&str] = &[
    "success",
    "invalid_spec",
    "api_error",
    "missing_metadata",
    "serialize_error",
];

/// Handle on the operator's metrics; cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result.
    pub reconcile_total: IntCounterVec,
    /// Reconcile duration in seconds.
    pub reconcile_duration: Histogram,
    /// WsClusters seen by the controller.
    pub managed: IntGauge,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
    /// Gateway pod metric reads by result.
    pub fleet_reads: IntCounterVec,
    /// Live-status and deletion-cost writes.
    pub fleet_writes: IntCounterVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry, with all `result` series pre-created at 0 so
    /// dashboards and alerts see them before the first error.
    ///
    /// # Errors
    /// When a metric is malformed (a programming error, caught by the unit tests).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconcile_total = IntCounterVec::new(
            Opts::new(
                "wsgate_operator_reconcile_total",
                "WsCluster reconciles by result.",
            ),
            &["result"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "wsgate_operator_reconcile_duration_seconds",
                "Time spent reconciling one WsCluster, in seconds.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let managed = IntGauge::new(
            "wsgate_operator_managed_wsclusters",
            "WsClusters this operator currently manages.",
        )?;
        let leader = IntGauge::new(
            "wsgate_operator_leader",
            "1 while this replica holds the leader Lease.",
        )?;
        let fleet_reads = IntCounterVec::new(
            Opts::new(
                "wsgate_operator_fleet_reads_total",
                "Reads of gateway pods' metrics for the live status, by result.",
            ),
            &["result"],
        )?;
        let fleet_writes = IntCounterVec::new(
            Opts::new(
                "wsgate_operator_fleet_writes_total",
                "Writes of live WsCluster status figures and pod deletion costs, by kind.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(reconcile_total.clone()))?;
        registry.register(Box::new(fleet_reads.clone()))?;
        registry.register(Box::new(fleet_writes.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(managed.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        for result in RESULTS {
            reconcile_total.with_label_values(&[*result]);
        }
        for result in READ_RESULTS {
            fleet_reads.with_label_values(&[*result]);
        }
        for kind in WRITE_KINDS {
            fleet_writes.with_label_values(&[*kind]);
        }
        Ok(Self {
            registry,
            reconcile_total,
            reconcile_duration,
            managed,
            leader,
            fleet_reads,
            fleet_writes,
        })
    }

    /// Counts one reconcile with its result and duration.
    pub fn observe(&self, result: &'static str, seconds: f64) {
        self.reconcile_total.with_label_values(&[result]).inc();
        self.reconcile_duration.observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding our own well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lists_exactly_the_documented_metrics() {
        let metrics = Metrics::new().expect("metrics");
        metrics.observe("success", 0.01);
        let text = metrics.render();
        let mut exported: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        exported.sort_unstable();
        let mut documented = METRIC_NAMES.to_vec();
        documented.sort_unstable();
        assert_eq!(exported, documented);
        assert!(text.contains("wsgate_operator_reconcile_total{result=\"success\"} 1"));
        assert!(text.contains("wsgate_operator_reconcile_total{result=\"api_error\"} 0"));
        assert!(text.contains("wsgate_operator_reconcile_duration_seconds_count 1"));
    }
}
