//! The `WsCluster` custom resource (`wsgate.io/v1alpha1`).
//!
//! Doc comments on spec fields are user documentation: they become the CRD's `description`s, which
//! `kubectl explain wsc.spec` prints. Validation lives in three layers, strongest first:
//! the OpenAPI schema (types, ranges, patterns), CEL `x-kubernetes-validations` for rules that span
//! fields, and [`crate::validate::validate_spec`] for the same rules at reconcile time (clusters
//! older than CEL, objects written before the CRD was upgraded).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of the WsCluster resource.
pub const GROUP: &str = "wsgate.io";
/// Served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Default gateway replica count when `spec.replicas` is omitted.
pub const DEFAULT_REPLICAS: i32 = 1;
/// Default Redis connect timeout, as in the gateway.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 2000;
/// Default drain window, as in the gateway.
pub const DEFAULT_DRAIN_TIMEOUT_SECONDS: u32 = 30;
/// Default HPA scale-down stabilisation window: long enough that scale-down never cuts
/// connections in waves.
pub const DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS: i32 = 600;

/// Desired state of a WsCluster. The operator turns it into a Deployment, a Service, a
/// PodDisruptionBudget, an optional HorizontalPodAutoscaler and an optional ServiceMonitor, all
/// owned by the WsCluster and deleted with it.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wsgate.io",
    version = "v1alpha1",
    kind = "WsCluster",
    plural = "wsclusters",
    singular = "wscluster",
    shortname = "wsc",
    category = "wsgate",
    namespaced,
    status = "WsClusterStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "A fleet of wsgate WebSocket fan-out gateways managed by wsgate-operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired gateway pods (ignored while autoscaling is set)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Gateway pods ready to take connections"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.connections",
        description = "Open WebSocket connections across the ready pods (live, from their metrics)"
    ),
    printcolumn(
        name = "Prefix",
        type_ = "string",
        json_path = ".status.keyPrefix",
        description = "Redis channel key prefix in effect"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Reason of the Ready condition"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 50").message("metadata.name must be at most 50 characters so that pod and label names derived from it stay valid")
)]
#[x_kube(
    validation = Rule::new("has(self.redis) || (self.replicas <= 1 && !has(self.autoscaling))").message("without spec.redis the gateway uses its in-process broker, which cannot fan out across pods: set spec.redis, or keep spec.replicas at most 1 and autoscaling unset")
)]
#[serde(rename_all = "camelCase")]
pub struct WsClusterSpec {
    /// Number of gateway pods. `kubectl scale wsc NAME --replicas=N` sets it. Ignored while
    /// `autoscaling` is set: the HorizontalPodAutoscaler owns the pod count then.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Gateway container image. Defaults to the image the operator was configured with
    /// (`--gateway-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Image pull policy of the gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Secrets holding registry credentials for pulling `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,

    /// Redis that stitches the gateway pods together (pub/sub). Without it each pod runs an
    /// in-process broker, so the cluster is limited to one pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,

    /// Prefix of every Redis channel this cluster uses (`{keyPrefix}:{topic}`). Clusters sharing
    /// one Redis must use different prefixes. Default: `{namespace}.{name}`, shortened with a
    /// hash when longer than 64 characters, so clusters never collide by accident.
    /// Characters `a-z A-Z 0-9 _ : . -`, 1 to 64 of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-zA-Z0-9_:.\-]{1,64}$"),
        length(min = 1, max = 64)
    )]
    pub key_prefix: Option<String>,

    /// How long a gateway waits for Redis to accept a connection, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    #[schemars(range(min = 100, max = 60000))]
    pub connect_timeout_ms: u32,

    /// Secret key holding the bearer token backends must send to the gateway's `/api/*`.
    /// Default: the operator creates a Secret `{name}-api-key` with a random key, once, and never
    /// rotates it by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// Seconds a terminating gateway keeps existing connections before closing them with
    /// 1001 (going away). The pod's `terminationGracePeriodSeconds` is derived from it.
    #[serde(default = "default_drain_timeout_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_timeout_seconds: u32,

    /// Paced draining: how fast the clients of pods being removed (scale-down, rollouts) may
    /// come back to the rest of the fleet. Unset: each removed pod closes its connections over
    /// a third of `drainTimeoutSeconds`, and pods drain side by side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainSpec>,

    /// Message history: topics whose recent messages are kept (in Redis, or in the pod with the
    /// in-process broker), so that clients recover what they missed across a reconnect and pods
    /// cut off from Redis catch up once back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,

    /// Client authentication: WebSocket clients present a JWT, whose `topics` claim decides
    /// what they may join (the gateway's `--auth` and `--jwt-*` flags; docs/security.md).
    /// Absent: anyone who reaches the service may join any topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,

    /// Let a HorizontalPodAutoscaler (autoscaling/v2) size the cluster. Remove it to go back to
    /// `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// PodDisruptionBudget for the gateway pods (on by default).
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,

    /// Prometheus integration. Pods always carry `prometheus.io/*` scrape annotations.
    #[serde(default)]
    pub metrics: MetricsSpec,

    /// Compute resources of the gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels the gateway pods must run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity rules of the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Topology spread constraints. Default: spread across nodes and zones (`ScheduleAnyway`),
    /// so one node or zone failure drops only a share of the connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    /// PriorityClass of the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Extra annotations on the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,

    /// Type of the Service in front of the gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ServiceType>,
}

/// When the kubelet pulls the gateway image.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ImagePullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the image is not on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl ImagePullPolicy {
    /// The Kubernetes spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// How the gateway Service is exposed.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ServiceType {
    /// Cluster-internal virtual IP (default).
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// A cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Kubernetes spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Where the gateways find Redis: exactly one of `url` and `urlSecretRef`; or `sentinel` or
/// `cluster` (not both), with at most one of them for the credentials and TLS setting.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(has(self.sentinel) || has(self.cluster)) ? !(has(self.url) && has(self.urlSecretRef)) : has(self.url) != has(self.urlSecretRef)").message("set exactly one of redis.url and redis.urlSecretRef"),
    validation = Rule::new("!(has(self.sentinel) && has(self.cluster))").message("set at most one of redis.sentinel and redis.cluster"),
    validation = Rule::new("!has(self.cluster) || !has(self.socketChannels) || self.socketChannels == 'PerReplica'").message("redis.cluster uses sharded pub/sub, which seed instances cannot share: socketChannels must be PerReplica")
)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Redis URL, `redis://host:6379` or `rediss://` for TLS. Put URLs that carry a password in a
    /// Secret and use `urlSecretRef` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^rediss?://.+"), length(max = 2048))]
    pub url: Option<String>,

    /// Secret key whose value is the Redis URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,

    /// Redis Sentinel: the gateways ask these sentinels for the current master on every
    /// connect, and follow failovers. `url` / `urlSecretRef`, if set, then supply only the
    /// user, password, database and TLS setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<SentinelSpec>,

    /// Redis Cluster: topics use sharded pub/sub (Redis 7 or later), so each topic's traffic
    /// touches only its shard. `url` / `urlSecretRef`, if set, then supply only the user,
    /// password and TLS setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSpec>,

    /// How direct messages (`/api/send`, `/api/disconnect`) reach a connection's pod:
    /// `PerReplica` (the default: one Redis channel per pod, nothing subscribed per
    /// connection) or `PerSocket` (also the seed's channel per connection — for a fleet where
    /// `@orijs/websocket-redis` instances send to this cluster's connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_channels: Option<SocketChannels>,
}

/// Redis Sentinel settings (the gateway's `--redis-sentinels` and `--redis-sentinel-master`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SentinelSpec {
    /// `host:port` of each sentinel.
    #[schemars(
        length(min = 1, max = 16),
        inner(regex(pattern = r"^[^\s:,]+:[0-9]{1,5}$"))
    )]
    pub hosts: Vec<String>,
    /// The master's name in the sentinels' `sentinel monitor`.
    #[schemars(length(min = 1, max = 256))]
    pub master_name: String,
}

/// Redis Cluster settings (the gateway's `--redis-cluster-nodes`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// `host:port` of some nodes of the cluster (any of them tells where the others are).
    #[schemars(
        length(min = 1, max = 64),
        inner(regex(pattern = r"^[^\s:,]+:[0-9]{1,5}$"))
    )]
    pub nodes: Vec<String>,
}

/// How direct messages (`/api/send`, `/api/disconnect`) reach a connection's pod (the
/// gateway's `--socket-channels`): `PerReplica` (default) subscribes one Redis channel per pod;
/// `PerSocket` also the seed's channel per connection, for fleets where
/// `@orijs/websocket-redis` instances send to this cluster's connections.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum SocketChannels {
    /// One channel per pod.
    PerReplica,
    /// Also one channel per connection, as the seed keeps.
    PerSocket,
}

impl SocketChannels {
    /// The gateway's spelling of the mode.
    #[must_use]
    pub fn flag_value(self) -> &'static str {
        match self {
            Self::PerReplica => "per-replica",
            Self::PerSocket => "per-socket",
        }
    }
}

/// A key in a Secret in the WsCluster's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Paced draining settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Most reconnects per second the fleet should take from pods being removed. One pod
    /// drains at a time and closes its connections at this rate: rollouts replace one pod at a
    /// time and scale-downs remove one pod at a time, each waiting `drainTimeoutSeconds` plus
    /// the 5 s preStop pause before the next. Make `drainTimeoutSeconds` long enough for a
    /// pod's connections at this rate (a pod that cannot finish in time closes the rest faster
    /// at the end of the window, so that every client still gets its close frame).
    #[schemars(range(min = 1, max = 1000000))]
    pub max_reconnects_per_second: u32,
}

/// Client authentication settings. The key is mounted into the pods from its Secret or
/// ConfigMap, so an updated JWKS takes effect without a restart (a secret or public key is
/// read when a pod starts: rotate those with a rollout, or use a JWKS).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(has(self.hmacSecretRef) ? 1 : 0) + (has(self.publicKey) ? 1 : 0) + (has(self.jwks) ? 1 : 0) == 1").message("set exactly one of auth.hmacSecretRef, auth.publicKey and auth.jwks"),
    validation = Rule::new("!has(self.anonymousTopics) || self.mode == 'Optional'").message("auth.anonymousTopics needs auth.mode Optional")
)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// `Required`: every connection authenticates; `Optional`: connections without a token
    /// may join only `anonymousTopics`.
    #[serde(default)]
    pub mode: AuthMode,

    /// Secret key holding the HMAC secret (HS256/384/512 tokens; at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret_ref: Option<SecretKeyRef>,

    /// PEM public key (RSA, EC P-256/P-384, Ed25519) in a Secret or ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<KeyRef>,

    /// JSON Web Key Set in a Secret or ConfigMap; `kid` picks the key, and an update is picked
    /// up by the running pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<KeyRef>,

    /// Required `aud` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub audience: Option<String>,

    /// Required `iss` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: Option<String>,

    /// With mode `Optional`: what connections without a token may join — exact names,
    /// prefixes (`public:*`) or `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        inner(regex(pattern = r"^([a-zA-Z0-9_:.\-]{1,256}\*?|\*)$"))
    )]
    pub anonymous_topics: Option<Vec<String>>,

    /// Browser origins allowed to open WebSocket connections (`https://app.example.com`,
    /// `https://*.example.com`); others get 403. Default: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        inner(regex(pattern = r"^https?://(\*\.)?[a-zA-Z0-9.\-\[\]:]+$"))
    )]
    pub allowed_origins: Option<Vec<String>>,

    /// Milliseconds a connection without a token on its upgrade has to send
    /// `auth.authenticate` (mode `Required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 600000))]
    pub timeout_ms: Option<u32>,
}

/// Who must authenticate.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum AuthMode {
    /// Connections without a token join only `anonymousTopics`.
    Optional,
    /// Every connection authenticates.
    #[default]
    Required,
}

impl AuthMode {
    /// The gateway's spelling.
    #[must_use]
    pub fn flag_value(self) -> &'static str {
        match self {
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// A key in a Secret or a ConfigMap: exactly one of the two.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("has(self.secretKeyRef) != has(self.configMapKeyRef)").message("set exactly one of secretKeyRef and configMapKeyRef")
)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// A key in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
    /// A key in a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeyRef>,
}

/// A key in a ConfigMap in the WsCluster's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Message history settings (the gateway's `--history-*` flags).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    /// Topics that keep a history: exact names (`news`), prefixes (`orders:*`) or `*` for all.
    #[schemars(
        length(min = 1, max = 256),
        inner(regex(pattern = r"^([a-zA-Z0-9_:.\-]{1,256}\*?|\*)$"))
    )]
    pub topics: Vec<String>,

    /// Messages kept per topic.
    #[serde(default = "default_history_size")]
    #[schemars(range(min = 1, max = 100000))]
    pub size: u32,

    /// Seconds a message is kept; a topic's history also expires this long after its last
    /// message.
    #[serde(default = "default_history_ttl_seconds")]
    #[schemars(range(min = 1, max = 604800))]
    pub ttl_seconds: u32,
}

fn default_history_size() -> u32 {
    100
}

fn default_history_ttl_seconds() -> u32 {
    300
}

/// HorizontalPodAutoscaler settings. At least one target must be set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
    validation = Rule::new("has(self.targetCPUUtilizationPercentage) || has(self.targetConnectionsPerPod)").message("autoscaling needs targetCPUUtilizationPercentage, targetConnectionsPerPod or both")
)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest gateway pods.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,

    /// Most gateway pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// Average CPU utilisation (percent of requests) to aim for. Needs `resources.requests.cpu`.
    #[serde(
        default,
        rename = "targetCPUUtilizationPercentage",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1000))]
    pub target_cpu_utilization_percentage: Option<i32>,

    /// Average open WebSocket connections per pod to aim for (the pods metric
    /// `wsgate_connections`; needs a custom-metrics adapter such as prometheus-adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000))]
    pub target_connections_per_pod: Option<i64>,

    /// Seconds the HPA waits before acting on a lower recommendation. Long windows avoid
    /// cutting connections in waves. Default 600.
    #[serde(default = "default_scale_down_stabilization_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
}

/// PodDisruptionBudget settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Create a PodDisruptionBudget. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Pods that voluntary disruptions (node drains) may take down at once: a number or a
    /// percentage. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: None,
        }
    }
}

/// Prometheus integration.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Create a prometheus-operator ServiceMonitor. Needs the monitoring.coreos.com CRDs; without
    /// them the operator reports a `Degraded` condition and carries on.
    #[serde(default)]
    pub service_monitor: bool,

    /// Scrape interval of the ServiceMonitor, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub interval: Option<String>,
}

/// Observed state, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WsClusterStatus {
    /// Gateway pods that exist (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,

    /// Gateway pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the gateway pods, for the scale subresource and HPAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The Redis key prefix in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,

    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// Open WebSocket connections across the pods that answered, read from their metrics every
    /// few seconds. Rewritten only when a figure moves by more than a threshold, so it may lag
    /// the exact count by a few percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,

    /// Topics with subscribers on the busiest pod. Pods share topics, so the fleet's distinct
    /// topics are at least this many; summing the pods' figures would overcount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<i64>,

    /// The gateway pods, by name, with their live figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<PodFigures>>,
}

/// One gateway pod as the operator last read it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodFigures {
    /// Pod name.
    pub name: String,

    /// Whether the pod is ready (and not terminating). Only ready pods are read.
    pub ready: bool,

    /// Open connections, when the pod answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,

    /// Topics with subscribers on this pod, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<i64>,

    /// Why the pod's figures could not be read (timeout, refused, bad answer); absent when they
    /// were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn default_replicas() -> i32 {
    DEFAULT_REPLICAS
}
fn default_connect_timeout_ms() -> u32 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn default_drain_timeout_seconds() -> u32 {
    DEFAULT_DRAIN_TIMEOUT_SECONDS
}
fn default_min_replicas() -> i32 {
    1
}
fn default_scale_down_stabilization_seconds() -> i32 {
    DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS
}
fn default_true() -> bool {
    true
}

impl Default for WsClusterSpec {
    fn default() -> Self {
        Self {
            replicas: DEFAULT_REPLICAS,
            image: None,
            image_pull_policy: None,
            image_pull_secrets: None,
            redis: None,
            key_prefix: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            api_key_secret_ref: None,
            drain_timeout_seconds: DEFAULT_DRAIN_TIMEOUT_SECONDS,
            drain: None,
            history: None,
            auth: None,
            autoscaling: None,
            pod_disruption_budget: PodDisruptionBudgetSpec::default(),
            metrics: MetricsSpec::default(),
            resources: None,
            node_selector: None,
            tolerations: None,
            affinity: None,
            topology_spread_constraints: None,
            priority_class_name: None,
            pod_annotations: None,
            service_type: None,
        }
    }
}
