//! WsCluster status: counts from the Deployment and the `Ready`, `Progressing` and `Degraded`
//! conditions.
//!
//! Pure functions of what the controller observed plus a clock reading, so the condition rules
//! are testable as data. A condition keeps its `lastTransitionTime` until its status flips, which
//! also means an unchanged world produces an identical status and the controller writes nothing.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{PodFigures, WsCluster, WsClusterStatus};
use crate::validate::InvalidSpec;

/// Condition: the cluster serves traffic with the desired number of ready pods.
pub const READY: &str = "Ready";
/// Condition: a rollout or scale is under way.
pub const PROGRESSING: &str = "Progressing";
/// Condition: something needs attention (unavailable pods, a stuck rollout, a missing
/// ServiceMonitor CRD, an invalid spec).
pub const DEGRADED: &str = "Degraded";

/// Everything the status is computed from, besides the WsCluster itself.
#[derive(Debug, Clone, Default)]
pub struct Observed<'a> {
    /// The gateway Deployment as last read, if it exists.
    pub deployment: Option<&'a Deployment>,
    /// Set when the spec cannot be reconciled.
    pub invalid: Option<&'a InvalidSpec>,
    /// A ServiceMonitor was asked for but the monitoring.coreos.com CRD is not installed.
    pub service_monitor_crd_missing: bool,
    /// The key prefix in effect.
    pub key_prefix: Option<String>,
    /// The pod label selector string.
    pub selector: Option<String>,
}

/// The status the WsCluster should have now.
#[must_use]
pub fn desired_status(wsc: &WsCluster, observed: &Observed<'_>, now: &Time) -> WsClusterStatus {
    let previous = wsc.status.clone().unwrap_or_default();
    let generation = wsc.metadata.generation;
    let dep_status = observed
        .deployment
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let mut status = WsClusterStatus {
        replicas: dep_status.replicas.unwrap_or(0),
        ready_replicas: dep_status.ready_replicas.unwrap_or(0),
        selector: observed.selector.clone().or(previous.selector.clone()),
        observed_generation: generation,
        key_prefix: observed.key_prefix.clone().or(previous.key_prefix.clone()),
        conditions: previous.conditions.clone(),
        // The live figures belong to the fleet reader (`crate::fleet`): carried over untouched.
        connections: previous.connections,
        topics: previous.topics,
        pods: previous.pods.clone(),
    };
    let mut set = |type_: &str, value: bool, reason: &str, message: String| {
        set_condition(
            &mut status.conditions,
            type_,
            value,
            reason,
            &message,
            generation,
            now,
        );
    };

    if let Some(invalid) = observed.invalid {
        set(READY, false, invalid.reason, invalid.message.clone());
        set(
            PROGRESSING,
            false,
            "InvalidSpec",
            "waiting for a valid spec".into(),
        );
        set(DEGRADED, true, invalid.reason, invalid.message.clone());
        return status;
    }

    let Some(deployment) = observed.deployment else {
        set(
            READY,
            false,
            "Creating",
            "the gateway Deployment does not exist yet".into(),
        );
        set(
            PROGRESSING,
            true,
            "Creating",
            "creating the gateway Deployment".into(),
        );
        set(DEGRADED, false, "AsExpected", "no problem detected".into());
        return status;
    };

    // While an HPA owns the pod count, the Deployment's spec is the desired count.
    let desired = if wsc.spec.autoscaling.is_some() {
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1)
    } else {
        wsc.spec.replicas
    };
    let ready = status.ready_replicas;
    let updated = dep_status.updated_replicas.unwrap_or(0);
    let observed_current = match (
        dep_status.observed_generation,
        deployment.metadata.generation,
    ) {
        (Some(seen), Some(current)) => seen >= current,
        (_, None) => true,
        (None, Some(_)) => false,
    };
    let rolled_out = observed_current && updated >= desired && status.replicas == desired;
    let stuck = dep_status
        .conditions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|c| {
            c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        });

    if desired == 0 {
        set(READY, true, "ScaledToZero", "scaled to zero pods".into());
    } else if ready >= desired {
        set(
            READY,
            true,
            "AllReplicasReady",
            format!("{ready}/{desired} gateway pods ready"),
        );
    } else {
        set(
            READY,
            false,
            "ReplicasNotReady",
            format!("{ready}/{desired} gateway pods ready"),
        );
    }

    if rolled_out {
        set(
            PROGRESSING,
            false,
            "RolloutComplete",
            "all gateway pods run the current spec".into(),
        );
    } else {
        set(
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "{updated}/{desired} gateway pods updated, {} exist",
                status.replicas
            ),
        );
    }

    if stuck {
        set(
            DEGRADED,
            true,
            "RolloutStuck",
            "the gateway rollout exceeded its progress deadline".into(),
        );
    } else if observed.service_monitor_crd_missing {
        set(
            DEGRADED,
            true,
            "ServiceMonitorCRDMissing",
            "spec.metrics.serviceMonitor is true but the monitoring.coreos.com/v1 ServiceMonitor \
             CRD is not installed"
                .into(),
        );
    } else if let Some(message) = drain_too_short(wsc, previous.pods.as_deref()) {
        set(DEGRADED, true, "DrainWindowTooShort", message);
    } else if rolled_out && ready < desired {
        set(
            DEGRADED,
            true,
            "ReplicasUnavailable",
            format!("{ready}/{desired} gateway pods ready"),
        );
    } else {
        set(DEGRADED, false, "AsExpected", "no problem detected".into());
    }
    status
}

/// With paced draining: whether the busiest pod (by the live figures) holds more connections
/// than the drain rate can close within the drain window, less the gateway's margin for the
/// close handshakes (a tenth of the window, at most 2 s). The message names no live figure, so
/// it does not change, and cause writes, as the figures move.
fn drain_too_short(wsc: &WsCluster, pods: Option<&[PodFigures]>) -> Option<String> {
    let rate = wsc.spec.drain.as_ref()?.max_reconnects_per_second;
    let window = f64::from(wsc.spec.drain_timeout_seconds);
    let usable = window - (window / 10.0).min(2.0);
    let busiest = pods?.iter().filter_map(|p| p.connections).max()?;
    #[allow(clippy::cast_precision_loss)]
    let needed = busiest as f64 / f64::from(rate);
    (needed > usable).then(|| {
        format!(
            "a pod holds more connections (see status.pods) than drain.maxReconnectsPerSecond              ({rate}/s) can close within drainTimeoutSeconds ({} s): its last clients would be              closed faster than the budget; raise either",
            wsc.spec.drain_timeout_seconds
        )
    })
}

/// Sets one condition, keeping `lastTransitionTime` unless the status changes.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if value { "True" } else { "False" };
    let fresh = Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) if existing.status == status => {
            existing.reason = fresh.reason;
            existing.message = fresh.message;
            existing.observed_generation = fresh.observed_generation;
        }
        Some(existing) => *existing = fresh,
        None => conditions.push(fresh),
    }
}

/// The condition of the given type, if present.
#[must_use]
pub fn condition<'a>(status: &'a WsClusterStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WsClusterSpec;
    use crate::resources::testing::cluster;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid timestamp"))
    }

    fn deployment(replicas: i32, ready: i32, updated: i32) -> Deployment {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                observed_generation: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        d.metadata.generation = Some(1);
        d
    }

    fn ready_of(s: &WsClusterStatus) -> (String, String) {
        let c = condition(s, READY).expect("ready condition");
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn all_pods_ready_and_updated_means_ready_and_not_progressing() {
        let wsc = cluster(WsClusterSpec {
            replicas: 1,
            ..Default::default()
        });
        let d = deployment(1, 1, 1);
        let obs = Observed {
            deployment: Some(&d),
            ..Default::default()
        };
        let s = desired_status(&wsc, &obs, &at(100));
        assert_eq!(ready_of(&s), ("True".into(), "AllReplicasReady".into()));
        assert_eq!(
            condition(&s, PROGRESSING).map(|c| c.status.as_str()),
            Some("False")
        );
        assert_eq!(
            condition(&s, DEGRADED).map(|c| c.status.as_str()),
            Some("False")
        );
        assert_eq!(
            (s.replicas, s.ready_replicas, s.observed_generation),
            (1, 1, Some(1))
        );
    }

    #[test]
    fn pods_still_rolling_out_mean_progressing_and_not_ready() {
        let wsc = cluster(WsClusterSpec {
            replicas: 1,
            ..Default::default()
        });
        let d = deployment(1, 0, 0);
        let s = desired_status(
            &wsc,
            &Observed {
                deployment: Some(&d),
                ..Default::default()
            },
            &at(1),
        );
        assert_eq!(ready_of(&s), ("False".into(), "ReplicasNotReady".into()));
        let p = condition(&s, PROGRESSING).expect("progressing");
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", "RollingOut")
        );
    }

    #[test]
    fn invalid_spec_means_ready_false_with_the_validation_reason() {
        let wsc = cluster(WsClusterSpec::default());
        let invalid = InvalidSpec {
            reason: "InvalidAutoscaling",
            message: "min > max".into(),
        };
        let obs = Observed {
            invalid: Some(&invalid),
            ..Default::default()
        };
        let s = desired_status(&wsc, &obs, &at(1));
        assert_eq!(ready_of(&s), ("False".into(), "InvalidAutoscaling".into()));
        assert_eq!(
            condition(&s, READY).map(|c| c.message.as_str()),
            Some("min > max")
        );
        assert_eq!(
            condition(&s, DEGRADED).map(|c| c.status.as_str()),
            Some("True")
        );
    }

    #[test]
    fn a_drain_window_too_short_for_the_busiest_pod_is_degraded() {
        let status_with = |connections: i64| {
            let mut wsc = cluster(WsClusterSpec {
                drain_timeout_seconds: 30,
                drain: Some(crate::crd::DrainSpec {
                    max_reconnects_per_second: 100,
                }),
                ..Default::default()
            });
            wsc.status = Some(WsClusterStatus {
                pods: Some(vec![crate::crd::PodFigures {
                    name: "p".into(),
                    ready: true,
                    connections: Some(connections),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            let d = deployment(1, 1, 1);
            let obs = Observed {
                deployment: Some(&d),
                ..Default::default()
            };
            desired_status(&wsc, &obs, &at(1))
        };
        // 30 s less a 2 s margin at 100/s: 2,800 connections fit, 2,801 do not.
        let fits = status_with(2_800);
        assert_eq!(
            condition(&fits, DEGRADED).map(|c| c.reason.as_str()),
            Some("AsExpected")
        );
        let over = status_with(2_801);
        let c = condition(&over, DEGRADED).expect("degraded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "DrainWindowTooShort")
        );
        assert_eq!(
            c.message,
            condition(&status_with(90_000), DEGRADED)
                .expect("degraded")
                .message,
            "the message does not follow the live figures"
        );
        assert_eq!(ready_of(&over).0, "True");
    }

    #[test]
    fn missing_service_monitor_crd_is_reported_as_degraded_not_as_an_error() {
        let wsc = cluster(WsClusterSpec::default());
        let d = deployment(1, 1, 1);
        let obs = Observed {
            deployment: Some(&d),
            service_monitor_crd_missing: true,
            ..Default::default()
        };
        let s = desired_status(&wsc, &obs, &at(1));
        let c = condition(&s, DEGRADED).expect("degraded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ServiceMonitorCRDMissing")
        );
        assert_eq!(ready_of(&s).0, "True");
    }

    #[test]
    fn last_transition_time_only_moves_when_the_status_flips() {
        let mut wsc = cluster(WsClusterSpec {
            replicas: 1,
            ..Default::default()
        });
        let d = deployment(1, 1, 1);
        let obs = Observed {
            deployment: Some(&d),
            ..Default::default()
        };
        let first = desired_status(&wsc, &obs, &at(100));
        wsc.status = Some(first.clone());
        let second = desired_status(&wsc, &obs, &at(200));
        assert_eq!(
            first, second,
            "an unchanged world yields an identical status"
        );

        wsc.status = Some(second);
        let not_ready = deployment(1, 0, 1);
        let obs = Observed {
            deployment: Some(&not_ready),
            ..Default::default()
        };
        let third = desired_status(&wsc, &obs, &at(300));
        assert_eq!(
            condition(&third, READY).map(|c| c.last_transition_time.clone()),
            Some(at(300))
        );
        assert_eq!(
            condition(&third, PROGRESSING).map(|c| c.last_transition_time.clone()),
            Some(at(100))
        );
    }

    #[test]
    fn with_autoscaling_the_deployment_replicas_are_the_desired_count() {
        let wsc = cluster(WsClusterSpec {
            replicas: 1,
            autoscaling: Some(crate::crd::AutoscalingSpec {
                min_replicas: 2,
                max_replicas: 9,
                target_cpu_utilization_percentage: Some(50),
                ..Default::default()
            }),
            ..Default::default()
        });
        let d = deployment(4, 4, 4);
        let s = desired_status(
            &wsc,
            &Observed {
                deployment: Some(&d),
                ..Default::default()
            },
            &at(1),
        );
        assert_eq!(
            condition(&s, READY).map(|c| c.message.as_str()),
            Some("4/4 gateway pods ready")
        );
    }
}
