//! Reconcile: one WsCluster in, its children applied and its status written.
//!
//! Children are server-side applied with one field manager ([`names::FIELD_MANAGER`]). Before
//! applying, the controller compares a hash of the desired object (stored in an annotation on the
//! child) and checks the live object still contains every desired field: when both hold, nothing
//! is written, so a reconcile with nothing changed makes zero writes.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::crd::WsCluster;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::names::{self, FIELD_MANAGER};
use crate::resources::{self, Defaults, Identity};
use crate::status::{self, Observed};
use crate::validate::{InvalidSpec, validate_spec};

/// Annotation holding the hash of the object the operator last applied to a child.
pub const SPEC_HASH_ANNOTATION: &str = "wsgate.io/spec-hash";
/// Field manager that keeps `Deployment.spec.replicas` owned while handing it to an HPA, so
/// the API server does not reset it when the operator stops applying it.
pub const REPLICAS_HANDOFF_MANAGER: &str = "wsgate-operator-replicas-handoff";
/// How often a healthy WsCluster is reconciled even when nothing changes (drift repair).
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a transient error; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How long the operator trusts that the ServiceMonitor API is absent before asking again.
pub const MONITOR_API_RECHECK: Duration = Duration::from_secs(300);

/// Shared state of the controller.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Operator-wide defaults (gateway image).
    pub defaults: Defaults,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Consecutive transient failures per WsCluster (namespace/name), for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// When the API server last said it serves no ServiceMonitors (prometheus-operator's CRD
    /// is not installed). Until [`MONITOR_API_RECHECK`] has passed, clusters that want no
    /// ServiceMonitor do not ask for one to delete: every such GET is a 404 the client logs.
    monitor_api_absent: Mutex<Option<Instant>>,
}

impl Context {
    /// A context for `client`.
    #[must_use]
    pub fn new(client: Client, defaults: Defaults, metrics: Metrics, reporter: Reporter) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            client,
            defaults,
            metrics,
            recorder,
            failures: Mutex::new(HashMap::new()),
            monitor_api_absent: Mutex::new(None),
        }
    }

    fn record_failure(&self, key: &str) -> u32 {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = failures.entry(key.to_owned()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    fn clear_failures(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

/// Runs the controller until `shutdown` completes: watches WsClusters and the children it
/// owns (selected by the `managed-by` label), reconciles each change, and keeps the
/// `wsgate_operator_managed_wsclusters` gauge current.
pub async fn run(
    client: Client,
    ctx: Arc<Context>,
    fleet: Option<crate::fleet::Settings>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let owned =
        || watcher::Config::default().labels("app.kubernetes.io/managed-by=wsgate-operator");
    let monitors = service_monitors_served(&client).await;
    let mut controller = Controller::new(
        Api::<WsCluster>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Deployment>::all(client.clone()), owned())
    .owns(Api::<Service>::all(client.clone()), owned())
    .owns(Api::<HorizontalPodAutoscaler>::all(client.clone()), owned())
    .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned());
    if monitors {
        // Drift of a ServiceMonitor is repaired on its watch event, like the other children's.
        // Without prometheus-operator's CRD at start-up there is nothing to watch (a watch
        // would fail and retry forever); ServiceMonitors are then repaired at the resync.
        let ar = resources::servicemonitor::api_resource();
        controller = controller.owns_with(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            ar,
            owned(),
        );
    }
    info!(service_monitors_watched = monitors, "controller started");
    let store = controller.store();
    let metrics = ctx.metrics.clone();
    // The fleet reader shares the controller's WsCluster cache and stops with it; if it ends
    // early (it cannot start), the controller carries on.
    let fleet = {
        let (client, store, metrics) = (client.clone(), store.clone(), metrics.clone());
        async move {
            if let Some(settings) = fleet {
                crate::fleet::run(client, store, settings, metrics).await;
            }
            std::future::pending::<()>().await;
        }
    };
    let controller = controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            metrics
                .managed
                .set(i64::try_from(store.state().len()).unwrap_or(i64::MAX));
            if let Err(e) = result {
                // Reconcile errors are logged by the error policy; these are watch and queue
                // errors, which the runtime retries.
                warn!(error = %e, "controller event");
            }
            futures::future::ready(())
        });
    tokio::select! {
        () = controller => {}
        () = fleet => {}
    }
}

/// Whether the API server serves ServiceMonitors (prometheus-operator's CRD is installed).
async fn service_monitors_served(client: &Client) -> bool {
    let ar = resources::servicemonitor::api_resource();
    match client.list_api_group_resources(&ar.api_version).await {
        Ok(list) => list.resources.iter().any(|r| r.name == ar.plural),
        Err(_) => false,
    }
}

/// Delay before retrying after `failures` consecutive transient errors: 2 s, 4 s, 8 s … 300 s.
#[must_use]
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1_u32 << exp).min(BACKOFF_MAX)
}

fn key_of(wsc: &WsCluster) -> String {
    format!("{}/{}", wsc.namespace().unwrap_or_default(), wsc.name_any())
}

/// Reconciles one WsCluster. Invalid specs are not errors: they end as `Ready=False` plus an
/// Event, and the controller waits for the next change.
///
/// # Errors
/// API failures (retried with backoff by [`error_policy`]) and malformed objects.
pub async fn reconcile(wsc: Arc<WsCluster>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let outcome = reconcile_inner(&wsc, &ctx).await;
    let result = match &outcome {
        Ok(Outcome::Applied(_)) => "success",
        Ok(Outcome::InvalidSpec) => "invalid_spec",
        Err(e) => e.metric_reason(),
    };
    ctx.metrics.observe(result, started.elapsed().as_secs_f64());
    match outcome {
        Ok(Outcome::Applied(next_step)) => {
            ctx.clear_failures(&key_of(&wsc));
            Ok(Action::requeue(next_step.map_or(RESYNC, |d| d.min(RESYNC))))
        }
        Ok(Outcome::InvalidSpec) => {
            ctx.clear_failures(&key_of(&wsc));
            Ok(Action::await_change())
        }
        Err(e) => Err(e),
    }
}

/// What the controller does after a failed reconcile: transient errors retry with exponential
/// backoff per object; permanent ones wait for the object to change.
pub fn error_policy(wsc: Arc<WsCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_transient() {
        let failures = ctx.record_failure(&key_of(&wsc));
        let delay = backoff(failures);
        warn!(wscluster = %key_of(&wsc), error = %error.chain(), failures, retry_in_secs = delay.as_secs(), "reconcile failed, retrying");
        Action::requeue(delay)
    } else {
        warn!(wscluster = %key_of(&wsc), error = %error.chain(), "reconcile failed, waiting for a change");
        Action::await_change()
    }
}

enum Outcome {
    /// Applied; with a paced scale-down under way, when its next step is due.
    Applied(Option<Duration>),
    InvalidSpec,
}

async fn reconcile_inner(wsc: &WsCluster, ctx: &Context) -> Result<Outcome> {
    let id = Identity::of(wsc)?;
    let client = &ctx.client;
    let ns = id.namespace.as_str();
    let wscs: Api<WsCluster> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);

    if let Err(invalid) = validate_spec(&wsc.spec) {
        // Nothing is applied: the children keep running the last valid spec.
        let current = deployments.get_opt(&id.name).await?;
        let observed = Observed {
            deployment: current.as_ref(),
            invalid: Some(&invalid),
            ..Observed::default()
        };
        let changed = write_status(&wscs, wsc, &observed).await?;
        if changed {
            publish_invalid(ctx, wsc, &invalid).await;
        }
        return Ok(Outcome::InvalidSpec);
    }

    let key_prefix = resources::effective_key_prefix(wsc, &id);

    // The API key Secret is created once and never re-applied: rotating it behind the users'
    // backs would lock them out.
    if let Some(secret) = resources::secret::api_key_secret(wsc, &id) {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let name = names::api_key_secret_name(&id.name);
        if secrets.get_opt(&name).await?.is_none() {
            secrets
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &secret,
                )
                .await?;
            info!(wscluster = %key_of(wsc), secret = %name, "created api key secret");
        }
    }

    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    apply(&services, resources::service::service(wsc, &id)).await?;

    let mut desired_deployment = resources::deployment::deployment(wsc, &id, &ctx.defaults);
    let paced = pace_scale_down(wsc, &deployments, &id.name, &mut desired_deployment).await?;
    if wsc.spec.autoscaling.is_some() {
        hand_replicas_to_hpa(&deployments, &id.name).await?;
    }
    let deployment = apply(&deployments, desired_deployment).await?;

    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    match resources::pdb::pdb(wsc, &id) {
        Some(pdb) => drop(apply(&pdbs, pdb).await?),
        None => delete_owned(&pdbs, &id).await?,
    }

    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    match resources::hpa::hpa(wsc, &id) {
        Some(hpa) => drop(apply(&hpas, hpa).await?),
        None => delete_owned(&hpas, &id).await?,
    }

    let service_monitor_crd_missing = reconcile_service_monitor(ctx, wsc, &id).await?;

    let observed = Observed {
        deployment: Some(&deployment),
        invalid: None,
        service_monitor_crd_missing,
        key_prefix: Some(key_prefix),
        selector: Some(names::selector_string(&id.name)),
    };
    write_status(&wscs, wsc, &observed).await?;
    Ok(Outcome::Applied(paced.wait))
}

/// Annotation on the gateway Deployment: when the operator last removed a pod in a paced
/// scale-down (RFC 3339).
pub const SCALE_DOWN_STEP_ANNOTATION: &str = "wsgate.io/scale-down-step-at";

/// What a paced scale-down applies now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paced {
    /// Deployment replicas to apply.
    pub replicas: i32,
    /// The step time to keep on the Deployment.
    pub stamp: Option<Timestamp>,
    /// When to look again (a step is still to come).
    pub wait: Option<Duration>,
}

/// With paced draining, a scale-down removes one pod per `step`: from `live` Deployment replicas
/// towards `wanted`, the last pod having been removed at `last_step`. Scale-ups apply at once.
#[must_use]
pub fn paced_replicas(
    wanted: i32,
    live: Option<i32>,
    last_step: Option<Timestamp>,
    step: Duration,
    now: Timestamp,
) -> Paced {
    let Some(live) = live.filter(|live| wanted < *live) else {
        return Paced {
            replicas: wanted,
            stamp: last_step,
            wait: None,
        };
    };
    let elapsed = last_step
        .and_then(|at| Duration::try_from(now.duration_since(at)).ok())
        .unwrap_or(Duration::MAX);
    if elapsed >= step {
        let replicas = live - 1;
        Paced {
            replicas,
            stamp: Some(now),
            wait: (replicas > wanted).then_some(step),
        }
    } else {
        Paced {
            replicas: live,
            stamp: last_step,
            wait: Some(step - elapsed),
        }
    }
}

/// Sets the replicas (and the step annotation) of `desired` for a paced scale-down, when the
/// WsCluster drains at a paced rate and no HPA owns the count (the HPA's own scale-down policy
/// paces it then).
async fn pace_scale_down(
    wsc: &WsCluster,
    deployments: &Api<Deployment>,
    name: &str,
    desired: &mut Deployment,
) -> Result<Paced> {
    let Some(step) = resources::drain_step_seconds(wsc)
        .filter(|_| wsc.spec.autoscaling.is_none())
        .and_then(|s| u64::try_from(s).ok())
    else {
        return Ok(Paced {
            replicas: wsc.spec.replicas,
            stamp: None,
            wait: None,
        });
    };
    let live = deployments.get_opt(name).await?;
    let live_replicas = live.as_ref().and_then(|d| d.spec.as_ref()?.replicas);
    let last_step = live.as_ref().and_then(|d| {
        d.annotations()
            .get(SCALE_DOWN_STEP_ANNOTATION)?
            .parse()
            .ok()
    });
    let paced = paced_replicas(
        wsc.spec.replicas,
        live_replicas,
        last_step,
        Duration::from_secs(step),
        Timestamp::now(),
    );
    if let Some(spec) = desired.spec.as_mut() {
        spec.replicas = Some(paced.replicas);
    }
    if let Some(stamp) = paced.stamp {
        desired
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(SCALE_DOWN_STEP_ANNOTATION.into(), stamp.to_string());
    }
    if paced.replicas != wsc.spec.replicas {
        info!(wscluster = %key_of(wsc), replicas = paced.replicas, wanted = wsc.spec.replicas, "paced scale-down");
    }
    Ok(paced)
}

/// Applies or removes the ServiceMonitor. Returns whether one was wanted but its CRD is missing.
async fn reconcile_service_monitor(ctx: &Context, wsc: &WsCluster, id: &Identity) -> Result<bool> {
    let ar = resources::servicemonitor::api_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &id.namespace, &ar);
    let mut absent = ctx
        .monitor_api_absent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .filter(|since| since.elapsed() < MONITOR_API_RECHECK);
    let result = match resources::servicemonitor::service_monitor(wsc, id) {
        Some(sm) => match apply(&api, sm).await {
            Ok(_) => {
                absent = None;
                Ok(false)
            }
            Err(Error::Kube(kube::Error::Api(status))) if status.code == 404 => {
                absent = Some(Instant::now());
                Ok(true)
            }
            Err(e) => Err(e),
        },
        // Nothing can exist to delete while the API is absent.
        None if absent.is_some() => Ok(false),
        None => match delete_owned(&api, id).await {
            // A 404 for the object itself says "NotFound"; for a resource type the API server
            // does not serve, it has no reason.
            Err(Error::Kube(kube::Error::Api(status))) if status.code == 404 => {
                if status.reason != "NotFound" {
                    absent = Some(Instant::now());
                }
                Ok(false)
            }
            other => other.map(|()| false),
        },
    };
    *ctx.monitor_api_absent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = absent;
    result
}

/// Server-side applies `desired` unless the live object already matches it.
async fn apply<K>(api: &Api<K>, mut desired: K) -> Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = desired
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingObjectKey("child name"))?;
    let hash = spec_hash(&desired)?;
    desired
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(SPEC_HASH_ANNOTATION.into(), hash.clone());

    if let Some(live) = api.get_opt(&name).await? {
        let unchanged = live
            .meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(SPEC_HASH_ANNOTATION))
            == Some(&hash)
            && is_subset(
                &serde_json::to_value(&desired).map_err(Error::Serialize)?,
                &serde_json::to_value(&live).map_err(Error::Serialize)?,
            );
        if unchanged {
            return Ok(live);
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(&desired)).await?)
}

/// Before the first apply without `spec.replicas`, lets a second field manager co-own the field
/// at its current value. Server-side apply would otherwise remove the field the operator alone
/// owned, and the API server would default it to 1 — cutting connections until the HPA reacts.
async fn hand_replicas_to_hpa(deployments: &Api<Deployment>, name: &str) -> Result<()> {
    let Some(live) = deployments.get_opt(name).await? else {
        return Ok(());
    };
    let Some(replicas) = live.spec.as_ref().and_then(|s| s.replicas) else {
        return Ok(());
    };
    let managers = live.metadata.managed_fields.as_deref().unwrap_or_default();
    let operator_owns_replicas = managers.iter().any(|m| {
        m.manager.as_deref() == Some(FIELD_MANAGER)
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:spec"].get("f:replicas").is_some())
    });
    let handed_off = managers
        .iter()
        .any(|m| m.manager.as_deref() == Some(REPLICAS_HANDOFF_MANAGER));
    if operator_owns_replicas && !handed_off {
        let patch = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": name },
            "spec": { "replicas": replicas },
        });
        deployments
            .patch(
                name,
                // Forced: the field moves to the hand-off manager at its current value.
                &PatchParams::apply(REPLICAS_HANDOFF_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
    }
    Ok(())
}

/// Deletes the child named like the cluster if it exists and this WsCluster owns it.
async fn delete_owned<K>(api: &Api<K>, id: &Identity) -> Result<()>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    let Some(live) = api.get_opt(&id.name).await? else {
        return Ok(());
    };
    let owned = live
        .owner_references()
        .iter()
        .any(|o| o.uid == id.owner.uid);
    if owned {
        api.delete(&id.name, &DeleteParams::background()).await?;
        info!(child = %id.name, namespace = %id.namespace, "deleted child that is no longer wanted");
    }
    Ok(())
}

/// Writes the status when it differs from the current one. Returns whether it wrote.
async fn write_status(
    api: &Api<WsCluster>,
    wsc: &WsCluster,
    observed: &Observed<'_>,
) -> Result<bool> {
    let now = Time(Timestamp::now());
    let desired = status::desired_status(wsc, observed, &now);
    if wsc.status.as_ref() == Some(&desired) {
        return Ok(false);
    }
    let mut fields = serde_json::to_value(&desired).map_err(Error::Serialize)?;
    // The live figures are the fleet reader's: a status computed from a cached WsCluster must
    // not put back figures it has since replaced.
    if let Some(fields) = fields.as_object_mut() {
        for live in crate::fleet::LIVE_STATUS_FIELDS {
            fields.remove(*live);
        }
    }
    let patch = json!({ "status": fields });
    api.patch_status(
        &wsc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(true)
}

async fn publish_invalid(ctx: &Context, wsc: &WsCluster, invalid: &InvalidSpec) {
    let event = Event {
        type_: EventType::Warning,
        reason: invalid.reason.into(),
        note: Some(invalid.message.clone()),
        action: "Validate".into(),
        secondary: None,
    };
    // Events are best effort: failing to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &wsc.object_ref(&())).await {
        warn!(wscluster = %key_of(wsc), error = %e, "cannot publish event");
    }
}

/// Hash of the object the operator means to apply (FNV-1a of its JSON, which is deterministic:
/// struct fields in declaration order, maps sorted).
fn spec_hash<K: Serialize>(desired: &K) -> Result<String> {
    let bytes = serde_json::to_vec(desired).map_err(Error::Serialize)?;
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    Ok(format!("{hash:016x}"))
}

/// Whether every field of `desired` is present with the same value in `live`. Lists must have the
/// same length; fields only the API server adds (defaults, status, metadata) are ignored, and so
/// is the API server's rewriting of quantities (`0.5` is stored as `500m`, `1024Mi` as `1Gi`).
#[must_use]
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d
            .iter()
            .all(|(k, dv)| l.get(k).is_some_and(|lv| is_subset(dv, lv))),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(dv, lv)| is_subset(dv, lv))
        }
        (Value::String(d), Value::String(l)) => d == l || same_quantity(d, l),
        (d, l) => d == l,
    }
}

/// Whether two strings are the same Kubernetes quantity written differently. Only consulted
/// when the hash of what the operator applies is unchanged, so treating two equal numbers in
/// another field as equal can hide nothing the operator wants to change.
fn same_quantity(a: &str, b: &str) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * 16.0 * x.abs().max(y.abs()),
        _ => false,
    }
}

/// The value of a Kubernetes quantity (`<number><suffix>`, suffix binary `Ki`…`Ei`, decimal
/// `n u m k M G T P E`, or an exponent `e3`/`E3`), or `None` when `s` is not one.
fn quantity(s: &str) -> Option<f64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || !number.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024_f64,
        "Mi" => 1024_f64.powi(2),
        "Gi" => 1024_f64.powi(3),
        "Ti" => 1024_f64.powi(4),
        "Pi" => 1024_f64.powi(5),
        "Ei" => 1024_f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exp => {
            let digits = exp.strip_prefix(['e', 'E'])?;
            10_f64.powi(digits.parse::<i32>().ok()?)
        }
    };
    Some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_ignores_fields_the_server_adds_but_not_changed_values() {
        let desired = json!({"spec": {"replicas": 2, "ports": [{"port": 80}]}});
        let live = json!({"spec": {"replicas": 2, "ports": [{"port": 80, "protocol": "TCP"}]}, "status": {}});
        assert!(is_subset(&desired, &live));
        assert!(!is_subset(&json!({"spec": {"replicas": 3}}), &live));
        assert!(!is_subset(&json!({"spec": {"ports": []}}), &live));
    }

    #[test]
    fn quantities_the_api_server_rewrites_count_as_unchanged() {
        let desired = json!({"resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}}});
        let live = json!({"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}});
        assert!(is_subset(&desired, &live));
        assert!(!is_subset(&json!({"cpu": "0.6"}), &json!({"cpu": "500m"})));
        assert!(is_subset(&json!({"m": "1e3"}), &json!({"m": "1k"})));
        assert!(!is_subset(
            &json!({"image": "wsgate:1"}),
            &json!({"image": "wsgate:1.0"})
        ));
        assert!(!is_subset(
            &json!({"policy": "Always"}),
            &json!({"policy": "E"})
        ));
        assert_eq!(quantity("-"), None);
        assert_eq!(quantity("12Xi"), None);
        assert_eq!(quantity("2Ki"), Some(2048.0));
    }

    #[test]
    fn paced_scale_down_removes_one_pod_per_step_and_scale_up_is_immediate() {
        let step = Duration::from_secs(35);
        let t0: Timestamp = "2026-12-02T10:00:00Z".parse().expect("time");
        let later = |secs: i64| t0 + jiff_secs(secs);

        // 5 → 2: the first pod goes at once, the next after a step.
        let first = paced_replicas(2, Some(5), None, step, t0);
        assert_eq!(
            (first.replicas, first.stamp, first.wait),
            (4, Some(t0), Some(step))
        );
        let early = paced_replicas(2, Some(4), first.stamp, step, later(10));
        assert_eq!((early.replicas, early.stamp), (4, Some(t0)));
        assert_eq!(early.wait, Some(Duration::from_secs(25)));
        let second = paced_replicas(2, Some(4), first.stamp, step, later(35));
        assert_eq!((second.replicas, second.wait), (3, Some(step)));
        let last = paced_replicas(2, Some(3), second.stamp, step, later(70));
        assert_eq!(
            (last.replicas, last.wait),
            (2, None),
            "no step left: nothing to wait for"
        );

        // Up, equal, or a new Deployment: applied at once, the stamp kept.
        for live in [None, Some(2), Some(1)] {
            let now = paced_replicas(2, live, Some(t0), step, later(1));
            assert_eq!((now.replicas, now.stamp, now.wait), (2, Some(t0), None));
        }
        // A stamp in the future (another clock, skewed) cannot block the scale-down forever.
        let skewed = paced_replicas(1, Some(3), Some(later(3600)), step, t0);
        assert_eq!(skewed.replicas, 2);
    }

    fn jiff_secs(secs: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs(secs)
    }

    #[test]
    fn backoff_doubles_from_two_seconds_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
