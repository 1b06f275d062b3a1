//! Reconcile against the in-memory Kubernetes API (`kube-fake-client`).
//!
//! The fake has no watches, so each test calls `reconcile` directly, the way the controller
//! would after a change. Every write (create, patch, replace, delete, status) goes through an
//! interceptor that records it, so "nothing changed → nothing written" is checked exactly.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::{Client, CustomResource, Resource, ResourceExt};
use kube_fake_client::{ClientBuilder, interceptor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use wsgate_operator::controller::{self, Context};
use wsgate_operator::crd::{
    AutoscalingSpec, MetricsSpec, RedisSpec, WsCluster, WsClusterSpec, WsClusterStatus,
};
use wsgate_operator::metrics::Metrics;
use wsgate_operator::resources::Defaults;
use wsgate_operator::status::{self, DEGRADED, READY};

const NS: &str = "apps";
const NAME: &str = "chat";

/// Stand-in for prometheus-operator's CRD, registered only by tests that "install" it.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[kube(
    group = "monitoring.coreos.com",
    version = "v1",
    kind = "ServiceMonitor",
    namespaced
)]
struct ServiceMonitorSpec {
    #[serde(default)]
    endpoints: Vec<serde_json::Value>,
}

type Writes = Arc<Mutex<Vec<String>>>;

/// `(api group, resource[/subresource], RBAC verb)` of every request the operator made.
type Requests = Arc<Mutex<std::collections::BTreeSet<(String, String, String)>>>;

/// Wraps the in-memory client so that every HTTP request is also recorded as the RBAC
/// permission it needs.
fn recording(inner: Client, requests: Requests) -> Client {
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        if let Some(permission) = rbac_permission(&req) {
            requests.lock().expect("requests lock").extend(permission);
        }
        let inner = inner.clone();
        async move { inner.send(req).await }
    });
    Client::new(service, "default")
}

/// The RBAC permissions an API request needs. Server-side apply may create the object, so it
/// needs `create` as well as `patch`.
fn rbac_permission<B>(req: &http::Request<B>) -> Option<Vec<(String, String, String)>> {
    let parts: Vec<&str> = req
        .uri()
        .path()
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => return None, // /version and discovery need no RBAC rule of ours
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let query = req.uri().query().unwrap_or_default();
    let apply = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/apply-patch"));
    let verbs: Vec<&str> = match (req.method().as_str(), named) {
        ("GET", true) => vec!["get"],
        ("GET", false) if query.contains("watch=true") => vec!["watch"],
        ("GET", false) => vec!["list"],
        ("POST", _) => vec!["create"],
        ("PUT", _) => vec!["update"],
        ("PATCH", _) if apply => vec!["patch", "create"],
        ("PATCH", _) => vec!["patch"],
        ("DELETE", _) => vec!["delete"],
        _ => return None,
    };
    Some(
        verbs
            .into_iter()
            .map(|v| (group.clone(), resource.clone(), v.to_owned()))
            .collect(),
    )
}

struct World {
    /// Plain in-memory client: what the test itself reads and writes (not recorded).
    client: Client,
    /// What the operator uses: the same API, with every request recorded in `requests`.
    operator_client: Client,
    requests: Requests,
    ctx: Arc<Context>,
    writes: Writes,
    /// When set, every spec write fails with this HTTP status (to simulate API trouble).
    fail_writes: Arc<Mutex<Option<u16>>>,
}

/// The write failure a test asked for, if any (an injected API error with that code).
fn injected<T>(fail: &Mutex<Option<u16>>) -> Result<Option<T>, kube_fake_client::Error> {
    match *fail.lock().expect("fail lock") {
        Some(code) => Err(kube_fake_client::Error::Internal(format!(
            "injected {code}"
        ))),
        None => Ok(None),
    }
}

impl World {
    async fn new(spec: WsClusterSpec) -> Self {
        Self::build(spec, false).await
    }

    async fn build(spec: WsClusterSpec, with_service_monitor_crd: bool) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let writes: Writes = Arc::default();
        let fail_writes: Arc<Mutex<Option<u16>>> = Arc::default();
        let mut wsc = WsCluster::new(NAME, spec);
        wsc.metadata.namespace = Some(NS.into());

        let record = |writes: &Writes, what: String| {
            writes.lock().expect("writes lock").push(what);
        };
        let (w1, w2, w3, w4, w5, w6, w7) = (
            writes.clone(),
            writes.clone(),
            writes.clone(),
            writes.clone(),
            writes.clone(),
            writes.clone(),
            writes.clone(),
        );
        let (f1, f2) = (fail_writes.clone(), fail_writes.clone());
        let funcs = interceptor::Funcs::new()
            .create(move |c| {
                let kind = c.object["kind"].as_str().unwrap_or("?").to_owned();
                record(&w1, format!("create {kind}"));
                Ok(None)
            })
            .patch(move |c| {
                record(&w2, format!("patch {}", c.name));
                injected(&f1)
            })
            .update(move |c| {
                record(&w3, format!("update {}", c.object["kind"]));
                Ok(None)
            })
            .replace(move |c| {
                record(&w4, format!("replace {}", c.name));
                injected(&f2)
            })
            .delete(move |c| {
                record(&w5, format!("delete {}", c.name));
                Ok(None)
            })
            .patch_status(move |c| {
                record(&w6, format!("patch-status {}", c.name));
                Ok(None)
            })
            .replace_status(move |c| {
                record(&w7, format!("replace-status {}", c.name));
                Ok(None)
            });
        let mut builder = ClientBuilder::new()
            .with_resource::<WsCluster>()
            .with_status_subresource::<WsCluster>()
            .with_status_subresource::<Deployment>()
            .with_return_managed_fields()
            .with_object(wsc);
        if with_service_monitor_crd {
            builder = builder.with_resource::<ServiceMonitor>();
        }
        let client = builder
            .with_interceptor_funcs(funcs)
            .build()
            .await
            .expect("fake client");
        let requests: Requests = Arc::default();
        let operator_client = recording(client.clone(), requests.clone());
        let ctx = Arc::new(Context::new(
            operator_client.clone(),
            Defaults {
                gateway_image: "ghcr.io/wsgate/wsgate:0.1.0".into(),
            },
            Metrics::new().expect("metrics"),
            Reporter {
                controller: "wsgate-operator".into(),
                instance: Some("test".into()),
            },
        ));
        Self {
            client,
            operator_client,
            requests,
            ctx,
            writes,
            fail_writes,
        }
    }

    fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope>>(&self) -> Api<K>
    where
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), NS)
    }

    async fn wsc(&self) -> WsCluster {
        self.api::<WsCluster>()
            .get(NAME)
            .await
            .expect("wscluster exists")
    }

    async fn reconcile(&self) -> Result<Action, wsgate_operator::Error> {
        controller::reconcile(Arc::new(self.wsc().await), self.ctx.clone()).await
    }

    async fn reconcile_ok(&self) {
        self.reconcile().await.expect("reconcile succeeds");
    }

    fn take_writes(&self) -> Vec<String> {
        std::mem::take(&mut *self.writes.lock().expect("writes lock"))
    }

    async fn edit_spec(&self, patch: serde_json::Value) {
        self.api::<WsCluster>()
            .patch(
                NAME,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": patch })),
            )
            .await
            .expect("spec patch");
        self.take_writes();
    }

    async fn deployment(&self) -> Deployment {
        self.api::<Deployment>()
            .get(NAME)
            .await
            .expect("deployment exists")
    }

    async fn status(&self) -> WsClusterStatus {
        self.wsc().await.status.expect("status written")
    }
}

fn redis() -> Option<RedisSpec> {
    Some(RedisSpec {
        url: Some("redis://redis:6379".into()),
        url_secret_ref: None,
        socket_channels: None,
        sentinel: None,
        cluster: None,
    })
}

fn autoscaling() -> Option<AutoscalingSpec> {
    Some(AutoscalingSpec {
        min_replicas: 2,
        max_replicas: 10,
        target_cpu_utilization_percentage: Some(70),
        target_connections_per_pod: Some(5000),
        scale_down_stabilization_seconds: 600,
    })
}

fn container_image(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .clone()
}

fn env_value(d: &Deployment, name: &str) -> Option<String> {
    let containers = &d.spec.as_ref()?.template.spec.as_ref()?.containers;
    containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

fn owned_by(meta: &kube::api::ObjectMeta, wsc: &WsCluster) -> bool {
    meta.owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|o| {
            Some(&o.uid) == wsc.metadata.uid.as_ref()
                && o.kind == "WsCluster"
                && o.controller == Some(true)
        })
}

#[tokio::test]
async fn first_reconcile_creates_every_child_owned_by_the_wscluster() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        replicas: 3,
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    let wsc = world.wsc().await;

    let d = world.deployment().await;
    assert!(owned_by(&d.metadata, &wsc));
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));
    assert_eq!(
        d.labels()["app.kubernetes.io/managed-by"],
        "wsgate-operator"
    );
    let svc = world.api::<Service>().get(NAME).await.expect("service");
    assert!(owned_by(&svc.metadata, &wsc));
    let pdb = world
        .api::<PodDisruptionBudget>()
        .get(NAME)
        .await
        .expect("pdb");
    assert!(owned_by(&pdb.metadata, &wsc));
    let secret = world
        .api::<Secret>()
        .get("chat-api-key")
        .await
        .expect("api key secret");
    assert!(owned_by(&secret.metadata, &wsc));
    let no_hpa = world
        .api::<HorizontalPodAutoscaler>()
        .get_opt(NAME)
        .await
        .expect("get hpa");
    assert!(no_hpa.is_none(), "no HPA without spec.autoscaling");

    // Children are applied with the operator's field manager.
    let managers: Vec<String> = d
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "wsgate-operator"),
        "{managers:?}"
    );

    let status = world.status().await;
    assert_eq!(status.key_prefix.as_deref(), Some("apps.chat"));
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=chat,app.kubernetes.io/name=wsgate")
    );
    assert_eq!(status.observed_generation, wsc.metadata.generation);
}

#[tokio::test]
async fn second_reconcile_with_nothing_changed_writes_nothing() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        autoscaling: autoscaling(),
        metrics: MetricsSpec {
            service_monitor: true,
            interval: None,
        },
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    assert!(
        !world.take_writes().is_empty(),
        "the first reconcile creates children"
    );
    world.reconcile_ok().await;
    assert_eq!(world.take_writes(), Vec::<String>::new());
}

#[tokio::test]
async fn changing_replicas_prefix_and_image_updates_the_deployment() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        replicas: 2,
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    world
        .edit_spec(json!({ "replicas": 5, "keyPrefix": "chat-v2", "image": "wsgate:0.2.0" }))
        .await;
    world.reconcile_ok().await;
    let writes = world.take_writes();
    assert!(writes.contains(&"patch chat".to_owned()), "{writes:?}");

    let d = world.deployment().await;
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(5));
    assert_eq!(container_image(&d).as_deref(), Some("wsgate:0.2.0"));
    assert_eq!(
        env_value(&d, "WSGATE_KEY_PREFIX").as_deref(),
        Some("chat-v2")
    );
    assert_eq!(world.status().await.key_prefix.as_deref(), Some("chat-v2"));
}

#[tokio::test]
async fn scaling_the_wscluster_like_kubectl_scale_resizes_the_deployment() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        replicas: 2,
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    // `kubectl scale wsc chat --replicas=4` writes .spec.replicas through the scale subresource.
    world.edit_spec(json!({ "replicas": 4 })).await;
    world.reconcile_ok().await;
    assert_eq!(
        world.deployment().await.spec.and_then(|s| s.replicas),
        Some(4)
    );
}

#[tokio::test]
async fn autoscaling_on_creates_an_hpa_and_leaves_deployment_replicas_alone() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        replicas: 3,
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    world
        .edit_spec(json!({ "autoscaling": { "minReplicas": 2, "maxReplicas": 10, "targetCPUUtilizationPercentage": 70 } }))
        .await;
    world.reconcile_ok().await;

    let hpa = world
        .api::<HorizontalPodAutoscaler>()
        .get(NAME)
        .await
        .expect("hpa created");
    assert!(owned_by(&hpa.metadata, &world.wsc().await));
    assert_eq!(hpa.spec.scale_target_ref.kind, "Deployment");
    assert_eq!(hpa.spec.max_replicas, 10);
    // The replica count was handed over at its value, not reset: a second field manager owns it
    // so that dropping it from the operator's apply cannot make the API server default it to 1.
    let d = world.deployment().await;
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let managers: Vec<String> = d
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers
            .iter()
            .any(|m| m == controller::REPLICAS_HANDOFF_MANAGER),
        "{managers:?}"
    );

    // The HPA scales the Deployment; the operator must not undo it.
    world
        .api::<Deployment>()
        .patch(
            NAME,
            &PatchParams::apply("horizontal-pod-autoscaler").force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "spec": { "replicas": 7 }
            })),
        )
        .await
        .expect("hpa scales");
    world.take_writes();
    world.reconcile_ok().await;
    assert_eq!(
        world.deployment().await.spec.and_then(|s| s.replicas),
        Some(7)
    );
    let writes = world.take_writes();
    assert!(
        !writes.iter().any(|w| w == "patch chat"),
        "deployment untouched: {writes:?}"
    );
}

#[tokio::test]
async fn autoscaling_off_removes_the_hpa() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        autoscaling: autoscaling(),
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    assert!(
        world
            .api::<HorizontalPodAutoscaler>()
            .get_opt(NAME)
            .await
            .expect("get")
            .is_some()
    );

    world
        .api::<WsCluster>()
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "autoscaling": null, "replicas": 4 } })),
        )
        .await
        .expect("remove autoscaling");
    world.reconcile_ok().await;
    assert!(
        world
            .api::<HorizontalPodAutoscaler>()
            .get_opt(NAME)
            .await
            .expect("get")
            .is_none()
    );
    assert_eq!(
        world.deployment().await.spec.and_then(|s| s.replicas),
        Some(4)
    );
}

#[tokio::test]
async fn disabling_the_pdb_deletes_it() {
    let world = World::new(WsClusterSpec::default()).await;
    world.reconcile_ok().await;
    world
        .edit_spec(json!({ "podDisruptionBudget": { "enabled": false } }))
        .await;
    world.reconcile_ok().await;
    assert!(
        world
            .api::<PodDisruptionBudget>()
            .get_opt(NAME)
            .await
            .expect("get")
            .is_none()
    );
    assert!(world.take_writes().contains(&"delete chat".to_owned()));
}

#[tokio::test]
async fn invalid_spec_sets_ready_false_publishes_an_event_and_changes_no_children() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        replicas: 2,
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    let before = world.deployment().await;
    // What an API server without CEL (or an old CRD) would let through.
    world
        .edit_spec(json!({ "autoscaling": { "minReplicas": 9, "maxReplicas": 3, "targetCPUUtilizationPercentage": 70 } }))
        .await;

    let action = world
        .reconcile()
        .await
        .expect("an invalid spec is not a reconcile error");
    assert_eq!(
        action,
        Action::await_change(),
        "no retry loop on an invalid spec"
    );
    let writes = world.take_writes();
    assert!(
        writes
            .iter()
            .all(|w| w.starts_with("patch-status") || w == "create Event"),
        "only status and an event may be written: {writes:?}"
    );
    assert_eq!(world.deployment().await, before, "children untouched");
    assert!(
        world
            .api::<HorizontalPodAutoscaler>()
            .get_opt(NAME)
            .await
            .expect("get")
            .is_none()
    );

    let status = world.status().await;
    let ready = status::condition(&status, READY).expect("ready condition");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidAutoscaling")
    );
    assert!(ready.message.contains("minReplicas"));

    let events = world
        .api::<Event>()
        .list(&Default::default())
        .await
        .expect("events");
    let event = events
        .items
        .iter()
        .find(|e| e.reason.as_deref() == Some("InvalidAutoscaling"))
        .expect("a Warning event for the invalid spec");
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some(NAME)
    );

    // Reconciling the same invalid spec again neither rewrites the status nor repeats the event.
    world.reconcile().await.expect("reconcile");
    assert_eq!(world.take_writes(), Vec::<String>::new());
}

#[tokio::test]
async fn deployment_status_changes_flow_into_the_wscluster_status() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        replicas: 2,
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    let ready = status::condition(&world.status().await, READY)
        .cloned()
        .expect("ready");
    assert_eq!(ready.status, "False", "no pod is ready yet");

    let generation = world.deployment().await.metadata.generation;
    world
        .api::<Deployment>()
        .patch_status(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
                "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2,
                "observedGeneration": generation
            }})),
        )
        .await
        .expect("deployment status");
    world.reconcile_ok().await;

    let status = world.status().await;
    assert_eq!((status.replicas, status.ready_replicas), (2, 2));
    let ready = status::condition(&status, READY).expect("ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AllReplicasReady")
    );
    let degraded = status::condition(&status, DEGRADED).expect("degraded");
    assert_eq!(degraded.status, "False");
}

#[tokio::test]
async fn service_monitor_without_its_crd_is_a_degraded_condition_not_a_failure() {
    let world = World::new(WsClusterSpec {
        metrics: MetricsSpec {
            service_monitor: true,
            interval: None,
        },
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    let status = world.status().await;
    let degraded = status::condition(&status, DEGRADED).expect("degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ServiceMonitorCRDMissing")
    );
    assert!(
        world
            .api::<Service>()
            .get_opt(NAME)
            .await
            .expect("get")
            .is_some()
    );
}

#[tokio::test]
async fn service_monitor_is_applied_when_its_crd_exists_and_removed_when_turned_off() {
    let world = World::build(
        WsClusterSpec {
            metrics: MetricsSpec {
                service_monitor: true,
                interval: None,
            },
            ..Default::default()
        },
        true,
    )
    .await;
    world.reconcile_ok().await;
    let sm = world
        .api::<ServiceMonitor>()
        .get(NAME)
        .await
        .expect("service monitor");
    assert!(owned_by(&sm.metadata, &world.wsc().await));
    assert_eq!(sm.spec.endpoints[0]["port"], "metrics");

    world
        .edit_spec(json!({ "metrics": { "serviceMonitor": false } }))
        .await;
    world.reconcile_ok().await;
    assert!(
        world
            .api::<ServiceMonitor>()
            .get_opt(NAME)
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn transient_api_errors_are_returned_and_retried_with_growing_backoff() {
    let world = World::new(WsClusterSpec::default()).await;
    *world.fail_writes.lock().expect("lock") = Some(500);
    let wsc = Arc::new(world.wsc().await);
    let err = controller::reconcile(wsc.clone(), world.ctx.clone())
        .await
        .expect_err("api failure");
    assert!(err.is_transient());
    let first = controller::error_policy(wsc.clone(), &err, world.ctx.clone());
    let second = controller::error_policy(wsc.clone(), &err, world.ctx.clone());
    assert_eq!(first, Action::requeue(controller::backoff(1)));
    assert_eq!(second, Action::requeue(controller::backoff(2)));
    assert!(
        world
            .ctx
            .metrics
            .render()
            .contains("wsgate_operator_reconcile_total{result=\"api_error\"} 1")
    );

    // Once the API recovers, the next reconcile succeeds and the backoff resets.
    *world.fail_writes.lock().expect("lock") = None;
    world.reconcile_ok().await;
    assert_eq!(
        controller::error_policy(wsc, &err, world.ctx.clone()),
        Action::requeue(controller::backoff(1))
    );
}

#[tokio::test]
async fn the_generated_api_key_survives_later_reconciles() {
    let world = World::new(WsClusterSpec::default()).await;
    world.reconcile_ok().await;
    let key = world
        .api::<Secret>()
        .get("chat-api-key")
        .await
        .expect("secret")
        .data;
    world.edit_spec(json!({ "image": "wsgate:0.2.0" })).await;
    world.reconcile_ok().await;
    assert_eq!(
        world
            .api::<Secret>()
            .get("chat-api-key")
            .await
            .expect("secret")
            .data,
        key
    );
}

#[tokio::test]
async fn a_user_supplied_api_key_secret_is_used_and_none_is_generated() {
    let world = World::new(WsClusterSpec {
        api_key_secret_ref: Some(wsgate_operator::crd::SecretKeyRef {
            name: "mine".into(),
            key: "k".into(),
        }),
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    assert!(
        world
            .api::<Secret>()
            .get_opt("chat-api-key")
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn only_one_of_two_operator_replicas_holds_the_lease_until_it_expires_or_is_released() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::jiff::Timestamp;
    use std::time::Duration;
    use wsgate_operator::leader::LeaderElector;

    let world = World::new(WsClusterSpec::default()).await;
    let leases = || Api::<Lease>::namespaced(world.client.clone(), "wsgate-system");
    let a = LeaderElector::new(
        leases(),
        "wsgate-operator",
        "pod-a",
        Duration::from_secs(15),
    );
    let b = LeaderElector::new(
        leases(),
        "wsgate-operator",
        "pod-b",
        Duration::from_secs(15),
    );
    let t0 = Timestamp::from_second(1_800_000_000).expect("time");
    let at = |s: i64| t0 + k8s_openapi::jiff::SignedDuration::from_secs(s);

    assert!(a.try_acquire_or_renew(at(0)).await.expect("a"));
    assert!(
        !b.try_acquire_or_renew(at(1)).await.expect("b"),
        "b must not lead while a's lease is valid"
    );
    assert!(a.try_acquire_or_renew(at(5)).await.expect("a renews"));
    assert!(
        !b.try_acquire_or_renew(at(19)).await.expect("b"),
        "renewal extended a's lease"
    );
    assert!(
        b.try_acquire_or_renew(at(21))
            .await
            .expect("b takes over an expired lease")
    );
    assert!(
        !a.try_acquire_or_renew(at(22)).await.expect("a"),
        "a lost it"
    );

    b.release().await.expect("release");
    assert!(
        a.try_acquire_or_renew(at(23)).await.expect("a"),
        "a released lease is free at once"
    );
    let lease = leases().get("wsgate-operator").await.expect("lease");
    let spec = lease.spec.expect("lease spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_transitions, Some(2));
}

#[tokio::test]
async fn a_stale_lease_write_loses_instead_of_creating_two_leaders() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::jiff::Timestamp;
    use std::time::Duration;
    use wsgate_operator::leader::LeaderElector;

    let world = World::new(WsClusterSpec::default()).await;
    let leases = Api::<Lease>::namespaced(world.client.clone(), "wsgate-system");
    let a = LeaderElector::new(leases.clone(), "l", "pod-a", Duration::from_secs(15));
    let now = Timestamp::from_second(1_800_000_000).expect("time");
    assert!(a.try_acquire_or_renew(now).await.expect("a"));
    // Someone else read the lease, then a renewed: their write carries an old resourceVersion.
    let mut stale = leases.get("l").await.expect("lease");
    assert!(a.try_acquire_or_renew(now).await.expect("a renews"));
    if let Some(spec) = stale.spec.as_mut() {
        spec.holder_identity = Some("pod-b".into());
    }
    let err = leases
        .replace("l", &PostParams::default(), &stale)
        .await
        .expect_err("conflict");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
}

#[tokio::test]
async fn manual_edits_to_a_child_are_reverted_on_the_next_reconcile() {
    let world = World::new(WsClusterSpec {
        redis: redis(),
        replicas: 2,
        ..Default::default()
    })
    .await;
    world.reconcile_ok().await;
    // Someone edits the Deployment by hand.
    world
        .api::<Deployment>()
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 9, "template": { "spec": {
                "containers": [{ "name": "gateway", "image": "evil:latest" }] } } } })),
        )
        .await
        .expect("manual edit");
    world.take_writes();
    world.reconcile_ok().await;
    let d = world.deployment().await;
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    assert_eq!(
        container_image(&d).as_deref(),
        Some("ghcr.io/wsgate/wsgate:0.1.0")
    );
    assert_eq!(
        world.take_writes(),
        vec!["patch chat".to_owned()],
        "one apply repairs the drift"
    );
}

/// `(group, resource, verb)` granted by the chart's ClusterRole and leader-election Role.
fn chart_permissions() -> std::collections::BTreeSet<(String, String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/wsgate-operator/templates/rbac.yaml"
    );
    let template = std::fs::read_to_string(path).expect("rbac template");
    // Drop template control lines, blank out inline expressions: what remains is plain YAML.
    let yaml: String = template
        .lines()
        .filter(|l| !(l.trim_start().starts_with("{{") && l.trim_end().ends_with("}}")))
        .map(|l| match (l.find("{{"), l.rfind("}}")) {
            (Some(a), Some(b)) => format!("{}x{}\n", &l[..a], &l[b + 2..]),
            _ => format!("{l}\n"),
        })
        .collect();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).expect("rbac yaml");
    let mut granted = std::collections::BTreeSet::new();
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in doc["rules"].as_array().expect("rules") {
            for group in rule["apiGroups"].as_array().expect("apiGroups") {
                for resource in rule["resources"].as_array().expect("resources") {
                    for verb in rule["verbs"].as_array().expect("verbs") {
                        granted.insert((
                            group.as_str().unwrap_or_default().to_owned(),
                            resource.as_str().unwrap_or_default().to_owned(),
                            verb.as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                }
            }
        }
    }
    granted
}

#[tokio::test]
async fn the_chart_rbac_grants_exactly_the_permissions_the_operator_uses() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::jiff::Timestamp;
    use std::time::Duration;
    use wsgate_operator::leader::LeaderElector;

    // Drive every code path that talks to the API: create, HPA on and off, PDB off, a
    // ServiceMonitor, an invalid spec (status + Event), and the leader Lease.
    let world = World::build(
        WsClusterSpec {
            redis: redis(),
            metrics: MetricsSpec {
                service_monitor: true,
                interval: None,
            },
            ..Default::default()
        },
        true,
    )
    .await;
    world.reconcile_ok().await;
    world.edit_spec(json!({ "autoscaling": { "minReplicas": 2, "maxReplicas": 4, "targetCPUUtilizationPercentage": 70 } })).await;
    world.reconcile_ok().await;
    world
        .edit_spec(json!({ "autoscaling": null, "podDisruptionBudget": { "enabled": false }, "metrics": { "serviceMonitor": false } }))
        .await;
    world.reconcile_ok().await;
    world
        .edit_spec(json!({ "replicas": 3, "redis": null }))
        .await;
    world.reconcile().await.expect("invalid spec reconciles");
    let leases = Api::<Lease>::namespaced(world.operator_client.clone(), "wsgate-system");
    let elector = LeaderElector::new(leases, "wsgate-operator", "pod-a", Duration::from_secs(15));
    let now = Timestamp::from_second(1_800_000_000).expect("time");
    assert!(elector.try_acquire_or_renew(now).await.expect("acquire"));
    assert!(elector.try_acquire_or_renew(now).await.expect("renew"));
    elector.release().await.expect("release");

    let mut used = world.requests.lock().expect("requests").clone();
    // Requests the controller runtime makes in a real cluster, which the fake cannot serve:
    // list+watch of the WsClusters and of every owned kind.
    for (group, resource) in [
        ("wsgate.io", "wsclusters"),
        ("apps", "deployments"),
        ("", "services"),
        ("autoscaling", "horizontalpodautoscalers"),
        ("policy", "poddisruptionbudgets"),
        ("monitoring.coreos.com", "servicemonitors"),
    ] {
        for verb in ["list", "watch"] {
            used.insert((group.into(), resource.into(), verb.into()));
        }
    }
    // The fleet reader watches the gateway pods and patches their deletion cost; it needs real
    // pods with real metrics, so e2e/tests/fleet.rs drives it (and checks nothing is forbidden).
    for verb in ["list", "watch", "patch"] {
        used.insert((String::new(), "pods".into(), verb.into()));
    }
    // Needed by admission rather than requested: owner references with blockOwnerDeletion need
    // update on the owner's finalizers; the event recorder patches an event it repeats.
    used.insert((
        "wsgate.io".into(),
        "wsclusters/finalizers".into(),
        "update".into(),
    ));
    used.insert(("events.k8s.io".into(), "events".into(), "patch".into()));

    let granted = chart_permissions();
    let missing: Vec<_> = used.difference(&granted).collect();
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "the chart lacks permissions the operator uses: {missing:?}"
    );
    assert!(
        unused.is_empty(),
        "the chart grants permissions the operator never uses: {unused:?}"
    );
}

mod leadership {
    use super::*;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::Duration;
    use tokio::sync::watch;
    use wsgate_operator::leader::{Clock, LeaderElector};

    /// A wall clock the test moves by hand, starting at a fixed instant.
    fn manual_clock() -> (Clock, Arc<AtomicI64>) {
        let offset = Arc::new(AtomicI64::new(0));
        let o = offset.clone();
        let base = Timestamp::from_second(1_800_000_000).expect("time");
        let clock: Clock =
            Arc::new(move || base + SignedDuration::from_secs(o.load(Ordering::SeqCst)));
        (clock, offset)
    }

    fn elector(world: &World, who: &str, clock: &Clock) -> LeaderElector {
        let leases = Api::<Lease>::namespaced(world.operator_client.clone(), "wsgate-system");
        LeaderElector::new(leases, "wsgate-operator", who, Duration::from_secs(15))
            .with_clock(clock.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_loses_its_lease_stops_reconciling() {
        let world = World::new(WsClusterSpec::default()).await;
        let (clock, offset) = manual_clock();
        let a = elector(&world, "pod-a", &clock);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        assert!(a.acquire(stop_rx.clone()).await);
        let renewing = tokio::spawn({
            let a = a.clone();
            async move { a.keep_leadership(stop_tx).await }
        });

        // Another replica takes the Lease over (as if a's renewals had not reached the API).
        offset.store(30, Ordering::SeqCst);
        let b = elector(&world, "pod-b", &clock);
        let leases = Api::<Lease>::namespaced(world.client.clone(), "wsgate-system");
        let mut lease = leases.get("wsgate-operator").await.expect("lease");
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                Timestamp::from_second(1_800_000_000).expect("time"),
            ));
        }
        leases
            .replace("wsgate-operator", &PostParams::default(), &lease)
            .await
            .expect("expire");
        assert!(b.try_acquire_or_renew(clock()).await.expect("b takes over"));

        stop_rx.changed().await.expect("a signals stop");
        assert!(
            *stop_rx.borrow(),
            "a stops its controller once b holds the lease"
        );
        renewing.await.expect("renewal loop ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_steps_down_before_its_lease_expires() {
        let world = World::new(WsClusterSpec::default()).await;
        let (clock, _) = manual_clock();
        let a = elector(&world, "pod-a", &clock);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        assert!(a.acquire(stop_rx.clone()).await);
        *world.fail_writes.lock().expect("lock") = Some(503);
        let started = tokio::time::Instant::now();
        let renewing = tokio::spawn({
            let a = a.clone();
            async move { a.keep_leadership(stop_tx).await }
        });
        stop_rx.changed().await.expect("stop");
        assert!(*stop_rx.borrow());
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "stepped down after {:?}, before the 15 s lease ran out",
            started.elapsed()
        );
        renewing.await.expect("renewal loop ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_waits_for_the_lease_and_gives_up_when_asked_to_stop() {
        let world = World::new(WsClusterSpec::default()).await;
        let (clock, _) = manual_clock();
        assert!(
            elector(&world, "pod-a", &clock)
                .try_acquire_or_renew(clock())
                .await
                .expect("a")
        );
        let b = elector(&world, "pod-b", &clock);
        let (stop_tx, stop_rx) = watch::channel(false);
        let waiting = tokio::spawn(async move { b.acquire(stop_rx).await });
        tokio::time::sleep(Duration::from_secs(60)).await; // b keeps following a valid lease
        assert!(!waiting.is_finished());
        stop_tx.send(true).expect("send stop");
        assert!(!waiting.await.expect("join"), "b never became leader");
    }
}
