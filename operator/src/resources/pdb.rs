//! The PodDisruptionBudget (on by default).

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Identity;
use crate::crd::WsCluster;
use crate::names;

/// The PDB limiting voluntary disruptions, or `None` when disabled in the spec.
#[must_use]
pub fn pdb(wsc: &WsCluster, id: &Identity) -> Option<PodDisruptionBudget> {
    let cfg = &wsc.spec.pod_disruption_budget;
    if !cfg.enabled {
        return None;
    }
    Some(PodDisruptionBudget {
        metadata: id.child_meta(&id.name),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(cfg.max_unavailable.clone().unwrap_or(IntOrString::Int(1))),
            selector: Some(LabelSelector {
                match_labels: Some(names::selector_labels(&id.name)),
                ..LabelSelector::default()
            }),
            // A pod that is not ready holds no connections worth protecting; letting drains
            // evict it keeps node maintenance from stalling on a crash-looping pod.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{PodDisruptionBudgetSpec as PdbCfg, WsClusterSpec};
    use crate::resources::testing::{assert_owned_and_labelled, cluster, id};

    #[test]
    fn pdb_is_on_by_default_allowing_one_pod_down_at_a_time() {
        let wsc = cluster(WsClusterSpec::default());
        let p = pdb(&wsc, &id(&wsc)).expect("pdb by default");
        assert_owned_and_labelled(&p.metadata);
        let spec = p.spec.expect("spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.min_available, None);
        assert_eq!(
            spec.selector.and_then(|s| s.match_labels),
            Some(names::selector_labels("chat"))
        );
    }

    #[test]
    fn pdb_max_unavailable_follows_the_spec_and_can_be_disabled() {
        let wsc = cluster(WsClusterSpec {
            pod_disruption_budget: PdbCfg {
                enabled: true,
                max_unavailable: Some(IntOrString::String("25%".into())),
            },
            ..WsClusterSpec::default()
        });
        let max = pdb(&wsc, &id(&wsc))
            .and_then(|p| p.spec)
            .and_then(|s| s.max_unavailable);
        assert_eq!(max, Some(IntOrString::String("25%".into())));

        let off = cluster(WsClusterSpec {
            pod_disruption_budget: PdbCfg {
                enabled: false,
                max_unavailable: None,
            },
            ..WsClusterSpec::default()
        });
        assert!(pdb(&off, &id(&off)).is_none());
    }
}
