//! The gateway Deployment.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, SleepAction, TopologySpreadConstraint, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Defaults, HTTP_PORT, Identity, METRICS_PORT, PRE_STOP_SLEEP_SECONDS, TERMINATION_SLACK_SECONDS,
    drain_step_seconds, effective_key_prefix,
};
use crate::crd::{AuthSpec, KeyRef, SecretKeyRef, WsCluster};

/// Where the authentication key is mounted in the gateway container (a whole volume, not a
/// subPath, so that the kubelet's updates of the Secret or ConfigMap reach the file).
pub const AUTH_KEY_DIR: &str = "/etc/wsgate/auth";
/// The key's file name in [`AUTH_KEY_DIR`].
pub const AUTH_KEY_FILE: &str = "key";
const AUTH_VOLUME: &str = "auth-key";

/// The authentication key's volume: its Secret or ConfigMap, the one key as [`AUTH_KEY_FILE`].
fn auth_volume(auth: &AuthSpec) -> Option<Volume> {
    let item = |key: &str| {
        Some(vec![KeyToPath {
            key: key.to_owned(),
            path: AUTH_KEY_FILE.into(),
            mode: None,
        }])
    };
    let secret = |r: &SecretKeyRef| Volume {
        name: AUTH_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(r.name.clone()),
            items: item(&r.key),
            default_mode: Some(0o444),
            optional: Some(false),
        }),
        ..Volume::default()
    };
    let key_ref = |r: &KeyRef| match (&r.secret_key_ref, &r.config_map_key_ref) {
        (Some(s), _) => Some(secret(s)),
        (None, Some(c)) => Some(Volume {
            name: AUTH_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: c.name.clone(),
                items: item(&c.key),
                default_mode: Some(0o444),
                optional: Some(false),
            }),
            ..Volume::default()
        }),
        (None, None) => None,
    };
    match (&auth.hmac_secret_ref, &auth.public_key, &auth.jwks) {
        (Some(s), _, _) => Some(secret(s)),
        (None, Some(k), _) | (None, None, Some(k)) => key_ref(k),
        (None, None, None) => None,
    }
}

/// The gateway's authentication flags for `auth`.
fn auth_env(auth: &AuthSpec, env: &mut Vec<EnvVar>) {
    let file = format!("{AUTH_KEY_DIR}/{AUTH_KEY_FILE}");
    env.push(plain("WSGATE_AUTH", auth.mode.flag_value().into()));
    let key_var = if auth.hmac_secret_ref.is_some() {
        "WSGATE_JWT_SECRET_FILE"
    } else if auth.public_key.is_some() {
        "WSGATE_JWT_PUBLIC_KEY_FILE"
    } else {
        "WSGATE_JWT_JWKS_FILE"
    };
    env.push(plain(key_var, file));
    if let Some(aud) = &auth.audience {
        env.push(plain("WSGATE_JWT_AUDIENCE", aud.clone()));
    }
    if let Some(iss) = &auth.issuer {
        env.push(plain("WSGATE_JWT_ISSUER", iss.clone()));
    }
    if let Some(topics) = &auth.anonymous_topics {
        env.push(plain("WSGATE_ANONYMOUS_TOPICS", topics.join(",")));
    }
    if let Some(origins) = &auth.allowed_origins {
        env.push(plain("WSGATE_ALLOWED_ORIGINS", origins.join(",")));
    }
    if let Some(ms) = auth.timeout_ms {
        env.push(plain("WSGATE_AUTH_TIMEOUT_MS", ms.to_string()));
    }
}
use crate::names::{self, API_KEY_SECRET_KEY};

/// UID and GID the gateway runs as (the distroless `nonroot` user).
pub const RUN_AS_USER: i64 = 65532;

/// The Deployment running the gateway pods.
#[must_use]
pub fn deployment(wsc: &WsCluster, id: &Identity, defaults: &Defaults) -> Deployment {
    let spec = &wsc.spec;
    let selector = names::selector_labels(&id.name);
    // The HPA owns the pod count while autoscaling is on: leaving `replicas` out of the applied
    // object means the operator never fights it.
    let replicas = spec.autoscaling.is_none().then_some(spec.replicas);

    let mut annotations = spec.pod_annotations.clone().unwrap_or_default();
    annotations.insert("prometheus.io/scrape".into(), "true".into());
    annotations.insert("prometheus.io/port".into(), METRICS_PORT.to_string());
    annotations.insert("prometheus.io/path".into(), "/metrics".into());

    let drain = i64::from(spec.drain_timeout_seconds);
    // Paced draining replaces one pod at a time, and a new pod counts as available only a
    // drain step after it is ready: the next old pod is removed once the previous one has
    // drained. The progress deadline must outlast a step.
    let step = drain_step_seconds(wsc);
    let max_surge = if step.is_some() {
        IntOrString::Int(1)
    } else {
        IntOrString::String("25%".into())
    };
    let min_ready_seconds = step.and_then(|s| i32::try_from(s).ok());
    let progress_deadline_seconds = step.and_then(|s| i32::try_from((2 * s + 60).max(600)).ok());
    Deployment {
        metadata: id.child_meta(&id.name),
        spec: Some(DeploymentSpec {
            replicas,
            revision_history_limit: Some(5),
            min_ready_seconds,
            progress_deadline_seconds,
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            // Never drop below the desired capacity during a rollout: new pods come up before old
            // ones drain, so clients reconnect somewhere that has room.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(max_surge),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names::labels(&id.name)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // The gateway never talks to the Kubernetes API.
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(
                        PRE_STOP_SLEEP_SECONDS + drain + TERMINATION_SLACK_SECONDS,
                    ),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS_USER),
                        run_as_group: Some(RUN_AS_USER),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![gateway_container(wsc, id, defaults)],
                    volumes: spec.auth.as_ref().and_then(auth_volume).map(|v| vec![v]),
                    image_pull_secrets: spec.image_pull_secrets.clone(),
                    node_selector: spec.node_selector.clone(),
                    tolerations: spec.tolerations.clone(),
                    affinity: spec.affinity.clone(),
                    priority_class_name: spec.priority_class_name.clone(),
                    topology_spread_constraints: Some(
                        spec.topology_spread_constraints
                            .clone()
                            .unwrap_or_else(|| default_topology_spread(&selector)),
                    ),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn gateway_container(wsc: &WsCluster, id: &Identity, defaults: &Defaults) -> Container {
    let spec = &wsc.spec;
    Container {
        name: "gateway".into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| defaults.gateway_image.clone()),
        ),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        env: Some(env(wsc, id)),
        volume_mounts: spec.auth.as_ref().and_then(auth_volume).map(|_| {
            vec![VolumeMount {
                name: AUTH_VOLUME.into(),
                mount_path: AUTH_KEY_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]
        }),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        lifecycle: Some(Lifecycle {
            // The sleep action needs no shell in the image (distroless has none).
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// The gateway's configuration, as the `WSGATE_*` environment variables it reads.
fn env(wsc: &WsCluster, id: &Identity) -> Vec<EnvVar> {
    let spec = &wsc.spec;
    let mut env = vec![
        plain("WSGATE_LISTEN", format!("0.0.0.0:{HTTP_PORT}")),
        plain("WSGATE_METRICS_LISTEN", format!("0.0.0.0:{METRICS_PORT}")),
        plain("WSGATE_KEY_PREFIX", effective_key_prefix(wsc, id)),
        plain(
            "WSGATE_CONNECT_TIMEOUT_MS",
            spec.connect_timeout_ms.to_string(),
        ),
        plain(
            "WSGATE_DRAIN_TIMEOUT_SECS",
            spec.drain_timeout_seconds.to_string(),
        ),
        plain("WSGATE_LOG_FORMAT", "json".into()),
    ];
    if let Some(drain) = &spec.drain {
        env.push(plain(
            "WSGATE_DRAIN_RATE",
            drain.max_reconnects_per_second.to_string(),
        ));
    }
    if let Some(history) = &spec.history {
        env.push(plain("WSGATE_HISTORY_TOPICS", history.topics.join(",")));
        env.push(plain("WSGATE_HISTORY_SIZE", history.size.to_string()));
        env.push(plain(
            "WSGATE_HISTORY_TTL_SECS",
            history.ttl_seconds.to_string(),
        ));
    }
    if let Some(auth) = &spec.auth {
        auth_env(auth, &mut env);
    }
    if let Some(redis) = &spec.redis {
        if let Some(secret) = &redis.url_secret_ref {
            env.push(from_secret("WSGATE_REDIS_URL", secret));
        } else if let Some(url) = &redis.url {
            env.push(plain("WSGATE_REDIS_URL", url.clone()));
        }
        if let Some(sentinel) = &redis.sentinel {
            env.push(plain("WSGATE_REDIS_SENTINELS", sentinel.hosts.join(",")));
            env.push(plain(
                "WSGATE_REDIS_SENTINEL_MASTER",
                sentinel.master_name.clone(),
            ));
        }
        if let Some(cluster) = &redis.cluster {
            env.push(plain("WSGATE_REDIS_CLUSTER_NODES", cluster.nodes.join(",")));
        }
        if let Some(mode) = redis.socket_channels {
            env.push(plain("WSGATE_SOCKET_CHANNELS", mode.flag_value().into()));
        }
    }
    let api_key = spec
        .api_key_secret_ref
        .clone()
        .unwrap_or_else(|| SecretKeyRef {
            name: names::api_key_secret_name(&id.name),
            key: API_KEY_SECRET_KEY.into(),
        });
    env.push(from_secret("WSGATE_API_KEY", &api_key));
    env
}

fn plain(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn from_secret(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        success_threshold: Some(1),
        ..Probe::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

/// Requests that let the scheduler place the pods and the CPU-based HPA work, and a memory limit
/// so one runaway pod cannot starve a node. No CPU limit: throttling a fan-out process adds
/// latency to every connection on it.
fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("100m".into())),
            ("memory".to_owned(), Quantity("128Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("512Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// Spread across nodes and zones, best effort: a lost node or zone takes only its share of the
/// connections, and small clusters still schedule.
fn default_topology_spread(selector: &BTreeMap<String, String>) -> Vec<TopologySpreadConstraint> {
    ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        .into_iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AutoscalingSpec, RedisSpec, SocketChannels, WsClusterSpec};
    use crate::resources::testing::{assert_owned_and_labelled, cluster, defaults, id};

    fn build(spec: WsClusterSpec) -> Deployment {
        let wsc = cluster(spec);
        deployment(&wsc, &id(&wsc), &defaults())
    }

    fn pod(d: &Deployment) -> PodSpec {
        d.spec
            .clone()
            .and_then(|s| s.template.spec)
            .expect("pod spec")
    }

    fn container(d: &Deployment) -> Container {
        pod(d).containers.into_iter().next().expect("one container")
    }

    fn env_map(d: &Deployment) -> BTreeMap<String, EnvVar> {
        container(d)
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect()
    }

    fn env_value(d: &Deployment, name: &str) -> Option<String> {
        env_map(d).get(name).and_then(|e| e.value.clone())
    }

    #[test]
    fn deployment_is_named_after_the_cluster_owned_by_it_and_labelled() {
        let d = build(WsClusterSpec::default());
        assert_eq!(d.metadata.name.as_deref(), Some("chat"));
        assert_owned_and_labelled(&d.metadata);
        let spec = d.spec.clone().expect("spec");
        assert_eq!(
            spec.selector.match_labels,
            Some(names::selector_labels("chat"))
        );
        let template_labels = spec
            .template
            .metadata
            .and_then(|m| m.labels)
            .unwrap_or_default();
        assert_eq!(template_labels, names::labels("chat"));
    }

    #[test]
    fn deployment_uses_the_operator_default_image_unless_the_spec_names_one() {
        assert_eq!(
            container(&build(WsClusterSpec::default())).image.as_deref(),
            Some("ghcr.io/wsgate/wsgate:0.1.0")
        );
        let custom = build(WsClusterSpec {
            image: Some("wsgate:dev".into()),
            ..Default::default()
        });
        assert_eq!(container(&custom).image.as_deref(), Some("wsgate:dev"));
    }

    #[test]
    fn deployment_replicas_follow_the_spec_without_autoscaling() {
        let d = build(WsClusterSpec {
            replicas: 1,
            ..Default::default()
        });
        assert_eq!(d.spec.and_then(|s| s.replicas), Some(1));
    }

    #[test]
    fn deployment_leaves_replicas_to_the_hpa_when_autoscaling_is_on() {
        let d = build(WsClusterSpec {
            replicas: 3,
            redis: Some(RedisSpec {
                url: Some("redis://r:6379".into()),
                url_secret_ref: None,
                socket_channels: None,
                sentinel: None,
                cluster: None,
            }),
            autoscaling: Some(AutoscalingSpec {
                min_replicas: 2,
                max_replicas: 5,
                target_cpu_utilization_percentage: Some(70),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(d.spec.and_then(|s| s.replicas), None);
    }

    #[test]
    fn gateway_env_carries_listen_addresses_prefix_timeouts_and_json_logs() {
        let d = build(WsClusterSpec {
            connect_timeout_ms: 1500,
            drain_timeout_seconds: 45,
            ..Default::default()
        });
        assert_eq!(
            env_value(&d, "WSGATE_LISTEN").as_deref(),
            Some("0.0.0.0:8080")
        );
        assert_eq!(
            env_value(&d, "WSGATE_METRICS_LISTEN").as_deref(),
            Some("0.0.0.0:9090")
        );
        assert_eq!(
            env_value(&d, "WSGATE_KEY_PREFIX").as_deref(),
            Some("apps.chat")
        );
        assert_eq!(
            env_value(&d, "WSGATE_CONNECT_TIMEOUT_MS").as_deref(),
            Some("1500")
        );
        assert_eq!(
            env_value(&d, "WSGATE_DRAIN_TIMEOUT_SECS").as_deref(),
            Some("45")
        );
        assert_eq!(env_value(&d, "WSGATE_LOG_FORMAT").as_deref(), Some("json"));
        assert!(
            !env_map(&d).contains_key("WSGATE_REDIS_URL"),
            "no redis → memory broker"
        );
    }

    #[test]
    fn an_explicit_key_prefix_replaces_the_derived_one() {
        let d = build(WsClusterSpec {
            key_prefix: Some("apps-chat".into()),
            ..Default::default()
        });
        assert_eq!(
            env_value(&d, "WSGATE_KEY_PREFIX").as_deref(),
            Some("apps-chat")
        );
    }

    #[test]
    fn redis_url_is_passed_inline_or_from_its_secret() {
        let inline = build(WsClusterSpec {
            redis: Some(RedisSpec {
                url: Some("redis://r:6379".into()),
                url_secret_ref: None,
                socket_channels: None,
                sentinel: None,
                cluster: None,
            }),
            ..Default::default()
        });
        assert_eq!(
            env_value(&inline, "WSGATE_REDIS_URL").as_deref(),
            Some("redis://r:6379")
        );

        let secret = build(WsClusterSpec {
            redis: Some(RedisSpec {
                url: None,
                url_secret_ref: Some(SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                }),
                socket_channels: None,
                sentinel: None,
                cluster: None,
            }),
            ..Default::default()
        });
        let var = env_map(&secret)
            .remove("WSGATE_REDIS_URL")
            .expect("redis url env");
        assert_eq!(var.value, None);
        let sel = var
            .value_from
            .and_then(|v| v.secret_key_ref)
            .expect("secret ref");
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("redis", "url"));
    }

    #[test]
    fn auth_mounts_its_key_and_sets_the_gateway_flags() {
        use crate::crd::{AuthMode, AuthSpec, ConfigMapKeyRef, KeyRef};
        let d = build(WsClusterSpec {
            auth: Some(AuthSpec {
                mode: AuthMode::Optional,
                jwks: Some(KeyRef {
                    secret_key_ref: None,
                    config_map_key_ref: Some(ConfigMapKeyRef {
                        name: "idp".into(),
                        key: "jwks.json".into(),
                    }),
                }),
                audience: Some("chat".into()),
                anonymous_topics: Some(vec!["public:*".into(), "lobby".into()]),
                allowed_origins: Some(vec!["https://app.example.com".into()]),
                timeout_ms: Some(3000),
                ..AuthSpec::default()
            }),
            ..Default::default()
        });
        assert_eq!(env_value(&d, "WSGATE_AUTH").as_deref(), Some("optional"));
        assert_eq!(
            env_value(&d, "WSGATE_JWT_JWKS_FILE").as_deref(),
            Some("/etc/wsgate/auth/key")
        );
        assert_eq!(
            env_value(&d, "WSGATE_JWT_AUDIENCE").as_deref(),
            Some("chat")
        );
        assert_eq!(
            env_value(&d, "WSGATE_ANONYMOUS_TOPICS").as_deref(),
            Some("public:*,lobby")
        );
        assert_eq!(
            env_value(&d, "WSGATE_ALLOWED_ORIGINS").as_deref(),
            Some("https://app.example.com")
        );
        assert_eq!(
            env_value(&d, "WSGATE_AUTH_TIMEOUT_MS").as_deref(),
            Some("3000")
        );
        // The whole ConfigMap volume (not a subPath: the kubelet's updates reach the file).
        let volume = pod(&d).volumes.expect("volumes").remove(0);
        let cm = volume.config_map.expect("a ConfigMap volume");
        assert_eq!(cm.name, "idp");
        let items = cm.items.expect("items");
        assert_eq!(
            (items[0].key.as_str(), items[0].path.as_str()),
            ("jwks.json", "key")
        );
        let mount = container(&d).volume_mounts.expect("mounts").remove(0);
        assert_eq!(mount.mount_path, "/etc/wsgate/auth");
        assert_eq!(mount.sub_path, None);
        assert_eq!(mount.read_only, Some(true));

        // An HMAC secret comes from its Secret, readable by the non-root user.
        let d = build(WsClusterSpec {
            auth: Some(AuthSpec {
                hmac_secret_ref: Some(SecretKeyRef {
                    name: "jwt".into(),
                    key: "secret".into(),
                }),
                ..AuthSpec::default()
            }),
            ..Default::default()
        });
        assert_eq!(env_value(&d, "WSGATE_AUTH").as_deref(), Some("required"));
        assert_eq!(
            env_value(&d, "WSGATE_JWT_SECRET_FILE").as_deref(),
            Some("/etc/wsgate/auth/key")
        );
        let secret = pod(&d)
            .volumes
            .expect("volumes")
            .remove(0)
            .secret
            .expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("jwt"));
        assert_eq!(secret.default_mode, Some(0o444));
        // No auth: no volume, no flags.
        let d = build(WsClusterSpec::default());
        assert_eq!(pod(&d).volumes, None);
        assert_eq!(env_value(&d, "WSGATE_AUTH"), None);
    }

    #[test]
    fn sentinels_and_their_master_are_passed_with_the_url_for_credentials() {
        let d = build(WsClusterSpec {
            redis: Some(RedisSpec {
                url: None,
                url_secret_ref: Some(SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                }),
                socket_channels: None,
                sentinel: Some(crate::crd::SentinelSpec {
                    hosts: vec!["s1:26379".into(), "s2:26379".into()],
                    master_name: "chat".into(),
                }),
                cluster: None,
            }),
            ..Default::default()
        });
        assert_eq!(
            env_value(&d, "WSGATE_REDIS_SENTINELS").as_deref(),
            Some("s1:26379,s2:26379")
        );
        assert_eq!(
            env_value(&d, "WSGATE_REDIS_SENTINEL_MASTER").as_deref(),
            Some("chat")
        );
        assert!(env_map(&d).contains_key("WSGATE_REDIS_URL"));
    }

    #[test]
    fn cluster_nodes_are_passed_with_the_url_for_credentials() {
        let d = build(WsClusterSpec {
            redis: Some(RedisSpec {
                url: None,
                url_secret_ref: Some(SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                }),
                socket_channels: None,
                sentinel: None,
                cluster: Some(crate::crd::ClusterSpec {
                    nodes: vec!["r-0.r:6379".into(), "r-1.r:6379".into()],
                }),
            }),
            ..Default::default()
        });
        assert_eq!(
            env_value(&d, "WSGATE_REDIS_CLUSTER_NODES").as_deref(),
            Some("r-0.r:6379,r-1.r:6379")
        );
        assert_eq!(env_value(&d, "WSGATE_REDIS_SENTINELS"), None);
        assert!(env_map(&d).contains_key("WSGATE_REDIS_URL"));
    }

    #[test]
    fn the_socket_channel_mode_is_passed_only_when_set() {
        let redis = |mode| {
            build(WsClusterSpec {
                redis: Some(RedisSpec {
                    url: Some("redis://r:6379".into()),
                    url_secret_ref: None,
                    socket_channels: mode,
                    sentinel: None,
                    cluster: None,
                }),
                ..Default::default()
            })
        };
        assert_eq!(env_value(&redis(None), "WSGATE_SOCKET_CHANNELS"), None);
        assert_eq!(
            env_value(
                &redis(Some(SocketChannels::PerSocket)),
                "WSGATE_SOCKET_CHANNELS"
            )
            .as_deref(),
            Some("per-socket")
        );
        assert_eq!(
            env_value(
                &redis(Some(SocketChannels::PerReplica)),
                "WSGATE_SOCKET_CHANNELS"
            )
            .as_deref(),
            Some("per-replica")
        );
    }

    #[test]
    fn api_key_comes_from_the_generated_secret_by_default_and_from_the_named_one_otherwise() {
        let generated = env_map(&build(WsClusterSpec::default())).remove("WSGATE_API_KEY");
        let sel = generated
            .and_then(|v| v.value_from)
            .and_then(|v| v.secret_key_ref);
        assert_eq!(
            sel.map(|s| (s.name, s.key)),
            Some(("chat-api-key".into(), "key".into()))
        );

        let named = build(WsClusterSpec {
            api_key_secret_ref: Some(SecretKeyRef {
                name: "chat-api".into(),
                key: "k".into(),
            }),
            ..Default::default()
        });
        let sel = env_map(&named)
            .remove("WSGATE_API_KEY")
            .and_then(|v| v.value_from)
            .and_then(|v| v.secret_key_ref);
        assert_eq!(
            sel.map(|s| (s.name, s.key)),
            Some(("chat-api".into(), "k".into()))
        );
    }

    #[test]
    fn probes_hit_healthz_and_readyz_on_the_metrics_port() {
        let c = container(&build(WsClusterSpec::default()));
        let live = c.liveness_probe.and_then(|p| p.http_get).expect("liveness");
        let ready = c
            .readiness_probe
            .and_then(|p| p.http_get)
            .expect("readiness");
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(live.port, IntOrString::String("metrics".into()));
        assert_eq!(ready.port, IntOrString::String("metrics".into()));
        let ports: Vec<_> = c
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name, p.container_port))
            .collect();
        assert_eq!(
            ports,
            vec![(Some("http".into()), 8080), (Some("metrics".into()), 9090)]
        );
    }

    #[test]
    fn security_context_is_restricted() {
        let d = build(WsClusterSpec::default());
        let psc = pod(&d).security_context.expect("pod security context");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.map(|s| s.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let sc = container(&d)
            .security_context
            .expect("container security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(pod(&d).automount_service_account_token, Some(false));
    }

    #[test]
    fn grace_period_outlasts_the_prestop_sleep_plus_the_drain_window() {
        let d = build(WsClusterSpec {
            drain_timeout_seconds: 60,
            ..Default::default()
        });
        let grace = pod(&d)
            .termination_grace_period_seconds
            .expect("grace period");
        assert!(grace > 60 + PRE_STOP_SLEEP_SECONDS, "grace {grace}");
        let sleep = container(&d)
            .lifecycle
            .and_then(|l| l.pre_stop)
            .and_then(|h| h.sleep);
        assert_eq!(sleep.map(|s| s.seconds), Some(PRE_STOP_SLEEP_SECONDS));
    }

    #[test]
    fn pods_carry_prometheus_scrape_annotations_and_user_annotations() {
        let d = build(WsClusterSpec {
            pod_annotations: Some(BTreeMap::from([("team".into(), "chat".into())])),
            ..Default::default()
        });
        let ann = d
            .spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations);
        let ann = ann.unwrap_or_default();
        assert_eq!(ann["prometheus.io/scrape"], "true");
        assert_eq!(ann["prometheus.io/port"], "9090");
        assert_eq!(ann["prometheus.io/path"], "/metrics");
        assert_eq!(ann["team"], "chat");
    }

    #[test]
    fn pods_spread_across_nodes_and_zones_by_default_and_as_told_otherwise() {
        let d = build(WsClusterSpec::default());
        let keys: Vec<_> = pod(&d)
            .topology_spread_constraints
            .unwrap_or_default()
            .into_iter()
            .map(|t| (t.topology_key, t.when_unsatisfiable))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("kubernetes.io/hostname".into(), "ScheduleAnyway".into()),
                (
                    "topology.kubernetes.io/zone".into(),
                    "ScheduleAnyway".into()
                )
            ]
        );
        let custom = build(WsClusterSpec {
            topology_spread_constraints: Some(vec![]),
            node_selector: Some(BTreeMap::from([("pool".into(), "edge".into())])),
            ..Default::default()
        });
        assert_eq!(pod(&custom).topology_spread_constraints, Some(vec![]));
        assert_eq!(
            pod(&custom).node_selector.unwrap_or_default()["pool"],
            "edge"
        );
    }

    #[test]
    fn resources_default_to_requests_and_a_memory_limit_and_follow_the_spec() {
        let c = container(&build(WsClusterSpec::default()));
        let res = c.resources.expect("resources");
        assert!(res.requests.is_some_and(|r| r.contains_key("cpu")));
        assert!(res.limits.is_some_and(|l| l.contains_key("memory")));
        let custom = ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".into(), Quantity("2".into()))])),
            ..Default::default()
        };
        let c = container(&build(WsClusterSpec {
            resources: Some(custom.clone()),
            ..Default::default()
        }));
        assert_eq!(c.resources, Some(custom));
    }

    #[test]
    fn rollouts_never_reduce_capacity() {
        let d = build(WsClusterSpec::default());
        let ru = d
            .spec
            .and_then(|s| s.strategy)
            .and_then(|s| s.rolling_update)
            .expect("ru");
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(ru.max_surge, Some(IntOrString::String("25%".into())));
    }

    #[test]
    fn history_settings_reach_the_gateway_as_its_environment() {
        let env_of = |spec: WsClusterSpec| {
            build(spec)
                .spec
                .expect("spec")
                .template
                .spec
                .expect("pod")
                .containers[0]
                .env
                .clone()
                .unwrap_or_default()
        };
        let env = env_of(WsClusterSpec {
            history: Some(crate::crd::HistorySpec {
                topics: vec!["room:*".into(), "news".into()],
                size: 200,
                ttl_seconds: 600,
            }),
            ..Default::default()
        });
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            value("WSGATE_HISTORY_TOPICS").as_deref(),
            Some("room:*,news")
        );
        assert_eq!(value("WSGATE_HISTORY_SIZE").as_deref(), Some("200"));
        assert_eq!(value("WSGATE_HISTORY_TTL_SECS").as_deref(), Some("600"));
        let without = env_of(WsClusterSpec::default());
        assert!(!without.iter().any(|e| e.name.starts_with("WSGATE_HISTORY")));
    }

    #[test]
    fn paced_draining_sets_the_rate_and_replaces_one_pod_per_drain_step() {
        let d = build(WsClusterSpec {
            drain_timeout_seconds: 120,
            drain: Some(crate::crd::DrainSpec {
                max_reconnects_per_second: 500,
            }),
            ..Default::default()
        });
        let spec = d.spec.expect("spec");
        let pod = spec.template.spec.clone().expect("pod spec");
        let env = pod.containers[0].env.clone().unwrap_or_default();
        let rate = env.iter().find(|e| e.name == "WSGATE_DRAIN_RATE");
        assert_eq!(rate.and_then(|e| e.value.as_deref()), Some("500"));
        let ru = spec
            .strategy
            .and_then(|s| s.rolling_update)
            .expect("rolling update");
        assert_eq!(ru.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        // A new pod counts as available one step (preStop + drain window) after it is ready, so
        // the next old pod goes only once the previous one has drained.
        assert_eq!(spec.min_ready_seconds, Some(125));
        assert_eq!(spec.progress_deadline_seconds, Some(600));
        assert_eq!(pod.termination_grace_period_seconds, Some(5 + 120 + 10));

        let unpaced = build(WsClusterSpec::default()).spec.expect("spec");
        assert_eq!(unpaced.min_ready_seconds, None);
        let env = unpaced.template.spec.expect("pod").containers[0]
            .env
            .clone();
        assert!(
            !env.unwrap_or_default()
                .iter()
                .any(|e| e.name == "WSGATE_DRAIN_RATE")
        );
    }
}
