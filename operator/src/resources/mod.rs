//! Pure builders: WsCluster → desired child objects.
//!
//! Nothing here talks to the API server, so each child can be unit-tested as data. The
//! controller applies what these functions return.

pub mod deployment;
pub mod hpa;
pub mod pdb;
pub mod secret;
pub mod service;
pub mod servicemonitor;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::crd::WsCluster;
use crate::error::{Error, Result};
use crate::names;

/// Port of the WebSocket endpoint and the HTTP API inside the pod.
pub const HTTP_PORT: i32 = 8080;
/// Port of `/metrics`, `/healthz` and `/readyz` inside the pod.
pub const METRICS_PORT: i32 = 9090;
/// Seconds the `preStop` hook waits so endpoints and load balancers stop routing new
/// connections to a pod before it starts draining.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Slack between the end of the drain window and the kubelet's SIGKILL.
pub const TERMINATION_SLACK_SECONDS: i64 = 10;

/// With paced draining, the seconds between two pods leaving the fleet: the preStop pause plus
/// the drain window, so that one pod has finished draining before the next starts. `None`
/// without `spec.drain`.
#[must_use]
pub fn drain_step_seconds(wsc: &WsCluster) -> Option<i64> {
    wsc.spec
        .drain
        .as_ref()
        .map(|_| PRE_STOP_SLEEP_SECONDS + i64::from(wsc.spec.drain_timeout_seconds))
}

/// Operator-wide settings the builders need.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Gateway image used when `spec.image` is unset.
    pub gateway_image: String,
}

/// Identity of a WsCluster, read once: every child shares name, namespace and owner.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Name of the WsCluster (and of most children).
    pub name: String,
    /// Namespace of the WsCluster and of all children.
    pub namespace: String,
    /// Controller owner reference pointing at the WsCluster.
    pub owner: OwnerReference,
}

impl Identity {
    /// Reads name, namespace and uid.
    ///
    /// # Errors
    /// [`Error::MissingObjectKey`] when the object was not read from an API server.
    pub fn of(wsc: &WsCluster) -> Result<Self> {
        let name = wsc
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingObjectKey(".metadata.name"))?;
        let namespace = wsc
            .metadata
            .namespace
            .clone()
            .ok_or(Error::MissingObjectKey(".metadata.namespace"))?;
        let mut owner = wsc
            .controller_owner_ref(&())
            .ok_or(Error::MissingObjectKey(".metadata.uid"))?;
        // Foreground deletion of the WsCluster waits for its children.
        owner.block_owner_deletion = Some(true);
        Ok(Self {
            name,
            namespace,
            owner,
        })
    }

    /// Metadata of a child: name, namespace, labels, owner reference.
    #[must_use]
    pub fn child_meta(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace.clone()),
            labels: Some(names::labels(&self.name)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// The key prefix in effect: the spec's, or one derived from namespace and name.
#[must_use]
pub fn effective_key_prefix(wsc: &WsCluster, id: &Identity) -> String {
    wsc.spec
        .key_prefix
        .clone()
        .unwrap_or_else(|| names::default_key_prefix(&id.namespace, &id.name))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Fixtures shared by the builder tests.
    use super::*;
    use crate::crd::WsClusterSpec;

    pub fn cluster(spec: WsClusterSpec) -> WsCluster {
        let mut wsc = WsCluster::new("chat", spec);
        wsc.metadata.namespace = Some("apps".into());
        wsc.metadata.uid = Some("1234-uid".into());
        wsc.metadata.generation = Some(1);
        wsc
    }

    pub fn defaults() -> Defaults {
        Defaults {
            gateway_image: "ghcr.io/wsgate/wsgate:0.1.0".into(),
        }
    }

    pub fn id(wsc: &WsCluster) -> Identity {
        Identity::of(wsc).expect("fixture has name, namespace and uid")
    }

    /// Asserts the owner reference and the app.kubernetes.io labels every child carries.
    pub fn assert_owned_and_labelled(meta: &ObjectMeta) {
        let owners = meta.owner_references.as_deref().unwrap_or_default();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "WsCluster");
        assert_eq!(owners[0].api_version, "wsgate.io/v1alpha1");
        assert_eq!(owners[0].name, "chat");
        assert_eq!(owners[0].uid, "1234-uid");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(labels["app.kubernetes.io/name"], "wsgate");
        assert_eq!(labels["app.kubernetes.io/instance"], "chat");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "wsgate-operator");
        assert_eq!(meta.namespace.as_deref(), Some("apps"));
    }
}
