//! The prometheus-operator ServiceMonitor, when `spec.metrics.serviceMonitor` is true.
//!
//! Built as a `DynamicObject` so the operator does not depend on prometheus-operator's types; the
//! controller treats a missing CRD as a condition, not an error.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::Identity;
use crate::crd::WsCluster;
use crate::names;

/// Group, version and kind of ServiceMonitor.
#[must_use]
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// The ServiceMonitor scraping the Service's metrics port, or `None` when not asked for.
#[must_use]
pub fn service_monitor(wsc: &WsCluster, id: &Identity) -> Option<DynamicObject> {
    if !wsc.spec.metrics.service_monitor {
        return None;
    }
    let mut endpoint = json!({ "port": "metrics", "path": "/metrics", "scheme": "http" });
    if let Some(interval) = &wsc.spec.metrics.interval {
        endpoint["interval"] = json!(interval);
    }
    let mut obj = DynamicObject::new(&id.name, &api_resource()).within(&id.namespace);
    obj.metadata = id.child_meta(&id.name);
    obj.data = json!({
        "spec": {
            "selector": { "matchLabels": names::selector_labels(&id.name) },
            "endpoints": [endpoint],
            // Series carry the pod's WsCluster (`app_kubernetes_io_instance`), as with
            // annotation-based scraping: the chart's dashboard and alerts select on it.
            "podTargetLabels": ["app.kubernetes.io/instance"],
        }
    });
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{MetricsSpec, WsClusterSpec};
    use crate::resources::testing::{assert_owned_and_labelled, cluster, id};

    #[test]
    fn no_service_monitor_unless_asked_for() {
        let wsc = cluster(WsClusterSpec::default());
        assert!(service_monitor(&wsc, &id(&wsc)).is_none());
    }

    #[test]
    fn service_monitor_scrapes_the_metrics_port_of_the_gateway_service() {
        let wsc = cluster(WsClusterSpec {
            metrics: MetricsSpec {
                service_monitor: true,
                interval: Some("15s".into()),
            },
            ..WsClusterSpec::default()
        });
        let sm = service_monitor(&wsc, &id(&wsc)).expect("service monitor");
        assert_owned_and_labelled(&sm.metadata);
        let types = sm.types.clone().expect("types");
        assert_eq!(
            (types.api_version.as_str(), types.kind.as_str()),
            ("monitoring.coreos.com/v1", "ServiceMonitor")
        );
        assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(sm.data["spec"]["endpoints"][0]["interval"], "15s");
        assert_eq!(
            sm.data["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
            "chat"
        );
        assert_eq!(
            sm.data["spec"]["podTargetLabels"],
            json!(["app.kubernetes.io/instance"])
        );
    }
}
