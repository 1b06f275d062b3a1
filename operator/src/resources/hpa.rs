//! The HorizontalPodAutoscaler (autoscaling/v2), only while `spec.autoscaling` is set.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::Identity;
use crate::crd::WsCluster;

/// Name of the per-pod metric the connections target uses (served by a custom-metrics adapter
/// from the gateway's gauge of the same name).
pub const CONNECTIONS_METRIC: &str = "wsgate_connections";

/// The HPA scaling the gateway Deployment, or `None` when autoscaling is off.
///
/// It targets the Deployment rather than the WsCluster, so the HPA and the operator never write
/// the same field: the operator leaves `Deployment.spec.replicas` out while this exists.
#[must_use]
pub fn hpa(wsc: &WsCluster, id: &Identity) -> Option<HorizontalPodAutoscaler> {
    let auto = wsc.spec.autoscaling.as_ref()?;
    let scale_down_period = super::drain_step_seconds(wsc)
        .and_then(|s| i32::try_from(s).ok())
        .map_or(60, |s| s.clamp(60, 1800));
    let mut metrics = Vec::new();
    if let Some(cpu) = auto.target_cpu_utilization_percentage {
        metrics.push(MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(cpu),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    if let Some(connections) = auto.target_connections_per_pod {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: CONNECTIONS_METRIC.into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(connections.to_string())),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    Some(HorizontalPodAutoscaler {
        metadata: id.child_meta(&id.name),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: id.name.clone(),
            },
            min_replicas: Some(auto.min_replicas),
            max_replicas: auto.max_replicas,
            metrics: Some(metrics),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                // Scale down slowly, one pod a minute (with paced draining, one per drain step,
                // at most the 30 minutes the API allows) after a long stabilisation window:
                // every removed pod disconnects its clients, who then reconnect to the others.
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(auto.scale_down_stabilization_seconds),
                    select_policy: Some("Min".into()),
                    policies: Some(vec![HPAScalingPolicy {
                        type_: "Pods".into(),
                        value: 1,
                        period_seconds: scale_down_period,
                    }]),
                    ..HPAScalingRules::default()
                }),
                // Scale up fast: new pods only take new connections.
                scale_up: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(0),
                    select_policy: Some("Max".into()),
                    policies: Some(vec![
                        HPAScalingPolicy {
                            type_: "Percent".into(),
                            value: 100,
                            period_seconds: 60,
                        },
                        HPAScalingPolicy {
                            type_: "Pods".into(),
                            value: 4,
                            period_seconds: 60,
                        },
                    ]),
                    ..HPAScalingRules::default()
                }),
            }),
        },
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AutoscalingSpec, RedisSpec, WsClusterSpec};
    use crate::resources::testing::{assert_owned_and_labelled, cluster, id};

    fn autoscaled(cpu: Option<i32>, conns: Option<i64>) -> WsCluster {
        cluster(WsClusterSpec {
            redis: Some(RedisSpec {
                url: Some("redis://r:6379".into()),
                url_secret_ref: None,
                socket_channels: None,
                sentinel: None,
                cluster: None,
            }),
            autoscaling: Some(AutoscalingSpec {
                min_replicas: 2,
                max_replicas: 20,
                target_cpu_utilization_percentage: cpu,
                target_connections_per_pod: conns,
                scale_down_stabilization_seconds: 600,
            }),
            ..WsClusterSpec::default()
        })
    }

    #[test]
    fn no_hpa_without_autoscaling() {
        let wsc = cluster(WsClusterSpec::default());
        assert!(hpa(&wsc, &id(&wsc)).is_none());
    }

    #[test]
    fn hpa_targets_the_deployment_within_min_and_max() {
        let wsc = autoscaled(Some(70), None);
        let h = hpa(&wsc, &id(&wsc)).expect("hpa");
        assert_owned_and_labelled(&h.metadata);
        let spec = h.spec;
        assert_eq!(spec.scale_target_ref.kind, "Deployment");
        assert_eq!(spec.scale_target_ref.name, "chat");
        assert_eq!(
            spec.scale_target_ref.api_version.as_deref(),
            Some("apps/v1")
        );
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 20));
    }

    #[test]
    fn hpa_scales_on_cpu_and_on_connections_per_pod() {
        let wsc = autoscaled(Some(70), Some(5000));
        let metrics = hpa(&wsc, &id(&wsc)).and_then(|h| h.spec.metrics);
        let metrics = metrics.unwrap_or_default();
        assert_eq!(metrics.len(), 2);
        let cpu = metrics[0].resource.clone().expect("cpu metric");
        assert_eq!(cpu.name, "cpu");
        assert_eq!(cpu.target.type_, "Utilization");
        assert_eq!(cpu.target.average_utilization, Some(70));
        let pods = metrics[1].pods.clone().expect("pods metric");
        assert_eq!(pods.metric.name, "wsgate_connections");
        assert_eq!(pods.target.type_, "AverageValue");
        assert_eq!(pods.target.average_value, Some(Quantity("5000".into())));
    }

    #[test]
    fn hpa_with_only_a_connections_target_has_no_cpu_metric() {
        let wsc = autoscaled(None, Some(100));
        let metrics = hpa(&wsc, &id(&wsc)).and_then(|h| h.spec.metrics);
        let types: Vec<_> = metrics
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.type_)
            .collect();
        assert_eq!(types, vec!["Pods".to_owned()]);
    }

    #[test]
    fn hpa_scales_down_slowly_after_a_long_stabilisation_window() {
        let wsc = autoscaled(Some(70), None);
        let behavior = hpa(&wsc, &id(&wsc)).and_then(|h| h.spec.behavior);
        let down = behavior
            .and_then(|b| b.scale_down)
            .expect("scale down rules");
        assert!(down.stabilization_window_seconds.is_some_and(|s| s >= 600));
        let policies = down.policies.unwrap_or_default();
        assert_eq!(policies.len(), 1);
        assert_eq!((policies[0].type_.as_str(), policies[0].value), ("Pods", 1));
        assert_eq!(policies[0].period_seconds, 60);
    }

    #[test]
    fn paced_draining_removes_one_pod_per_drain_step_within_the_api_limit() {
        let period = |drain_timeout_seconds: u32| {
            let mut wsc = autoscaled(Some(70), None);
            wsc.spec.drain = Some(crate::crd::DrainSpec {
                max_reconnects_per_second: 500,
            });
            wsc.spec.drain_timeout_seconds = drain_timeout_seconds;
            let down = hpa(&wsc, &id(&wsc))
                .and_then(|h| h.spec.behavior?.scale_down)
                .expect("scale down rules");
            down.policies.unwrap_or_default()[0].period_seconds
        };
        assert_eq!(period(120), 125, "preStop 5 s + the drain window");
        assert_eq!(period(10), 60, "never faster than without pacing");
        assert_eq!(period(3600), 1800, "the API's longest period");
    }
}
