//! Reconcile-time validation of a WsCluster spec.
//!
//! The CRD schema and its CEL rules reject these specs at admission on current clusters. The
//! operator checks again because objects can predate a CRD upgrade, CEL needs Kubernetes 1.25+, and
//! a spec the gateway would refuse must end as a `Ready=False` condition, never as a crash-looping
//! Deployment.

use crate::crd::WsClusterSpec;
use crate::names::is_valid_key_prefix;

/// Why a spec cannot be reconciled. `reason` is a CamelCase condition/Event reason (a closed set);
/// `message` is for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec {
    /// Condition and Event reason.
    pub reason: &'static str,
    /// Human-readable explanation naming the field.
    pub message: String,
}

impl InvalidSpec {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// A topic pattern as the gateway reads it: a name, optionally ending in `*`, or `*` alone.
fn valid_pattern(p: &str) -> bool {
    let stem = p.strip_suffix('*').unwrap_or(p);
    (p == "*" || !stem.is_empty())
        && stem.len() <= 256
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
}

fn validate_auth(auth: &crate::crd::AuthSpec) -> Result<(), InvalidSpec> {
    let invalid = |message: &str| Err(InvalidSpec::new("InvalidAuth", message));
    let keys = [
        auth.hmac_secret_ref.is_some(),
        auth.public_key.is_some(),
        auth.jwks.is_some(),
    ];
    if keys.iter().filter(|k| **k).count() != 1 {
        return invalid("set exactly one of auth.hmacSecretRef, auth.publicKey and auth.jwks");
    }
    for key in [&auth.public_key, &auth.jwks].into_iter().flatten() {
        if key.secret_key_ref.is_some() == key.config_map_key_ref.is_some() {
            return invalid("set exactly one of secretKeyRef and configMapKeyRef");
        }
    }
    if let Some(topics) = &auth.anonymous_topics {
        if auth.mode != crate::crd::AuthMode::Optional {
            return invalid("auth.anonymousTopics needs auth.mode Optional");
        }
        if topics.is_empty() || topics.len() > 256 || !topics.iter().all(|p| valid_pattern(p)) {
            return invalid(
                "auth.anonymousTopics must be 1 to 256 patterns: a topic name, optionally \
                 ending in *, or * alone",
            );
        }
    }
    if let Some(origins) = &auth.allowed_origins {
        let valid = |o: &str| {
            o.split_once("://").is_some_and(|(scheme, host)| {
                let host = host.strip_prefix("*.").unwrap_or(host);
                matches!(scheme, "http" | "https")
                    && !host.is_empty()
                    && host.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                    })
            })
        };
        if origins.is_empty() || origins.len() > 64 || !origins.iter().all(|o| valid(o)) {
            return invalid(
                "auth.allowedOrigins must be 1 to 64 origins: http(s)://host[:port] or \
                 http(s)://*.domain",
            );
        }
    }
    if auth
        .timeout_ms
        .is_some_and(|ms| !(100..=600_000).contains(&ms))
    {
        return invalid("auth.timeoutMs must be 100..=600000");
    }
    Ok(())
}

/// Checks the rules the schema alone cannot express (and re-checks the ones it can, for objects
/// admitted before the current CRD).
///
/// # Errors
/// The first rule the spec breaks.
pub fn validate_spec(spec: &WsClusterSpec) -> Result<(), InvalidSpec> {
    if spec.replicas < 0 {
        return Err(InvalidSpec::new(
            "InvalidReplicas",
            "spec.replicas must not be negative",
        ));
    }
    if let Some(prefix) = &spec.key_prefix
        && !is_valid_key_prefix(prefix)
    {
        return Err(InvalidSpec::new(
            "InvalidKeyPrefix",
            "spec.keyPrefix must be 1 to 64 characters from a-z A-Z 0-9 _ : . -",
        ));
    }
    if let Some(image) = &spec.image
        && image.trim().is_empty()
    {
        return Err(InvalidSpec::new(
            "InvalidImage",
            "spec.image must not be empty",
        ));
    }
    if let Some(redis) = &spec.redis {
        let host_port = |s: &str| {
            s.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains([',', ' '])
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            })
        };
        if let Some(cluster) = &redis.cluster {
            if redis.sentinel.is_some() {
                return Err(InvalidSpec::new(
                    "InvalidRedis",
                    "set at most one of redis.sentinel and redis.cluster",
                ));
            }
            if cluster.nodes.is_empty()
                || cluster.nodes.len() > 64
                || !cluster.nodes.iter().all(|h| host_port(h))
            {
                return Err(InvalidSpec::new(
                    "InvalidRedis",
                    "spec.redis.cluster needs 1 to 64 nodes as host:port",
                ));
            }
            if redis.socket_channels == Some(crate::crd::SocketChannels::PerSocket) {
                return Err(InvalidSpec::new(
                    "InvalidRedis",
                    "redis.cluster uses sharded pub/sub, which seed instances cannot share: socketChannels must be PerReplica",
                ));
            }
        }
        if let Some(sentinel) = &redis.sentinel
            && (sentinel.hosts.is_empty()
                || sentinel.hosts.len() > 16
                || !sentinel.hosts.iter().all(|h| host_port(h))
                || sentinel.master_name.is_empty()
                || sentinel.master_name.len() > 256)
        {
            return Err(InvalidSpec::new(
                "InvalidRedis",
                "spec.redis.sentinel needs 1 to 16 hosts as host:port and a masterName",
            ));
        }
        match (&redis.url, &redis.url_secret_ref) {
            (None, None) if redis.sentinel.is_some() || redis.cluster.is_some() => {}
            (Some(_), Some(_)) | (None, None) => {
                return Err(InvalidSpec::new(
                    "InvalidRedis",
                    "set exactly one of redis.url and redis.urlSecretRef",
                ));
            }
            (Some(url), None) if !(url.starts_with("redis://") || url.starts_with("rediss://")) => {
                return Err(InvalidSpec::new(
                    "InvalidRedis",
                    "spec.redis.url must start with redis:// or rediss://",
                ));
            }
            _ => {}
        }
    } else if spec.replicas > 1 || spec.autoscaling.is_some() {
        return Err(InvalidSpec::new(
            "RedisRequired",
            "without spec.redis the gateway uses its in-process broker, which cannot fan out \
             across pods: set spec.redis, or keep spec.replicas at most 1 and autoscaling unset",
        ));
    }
    if let Some(history) = &spec.history {
        let valid = valid_pattern;
        if history.topics.is_empty()
            || history.topics.len() > 256
            || !history.topics.iter().all(|p| valid(p))
        {
            return Err(InvalidSpec::new(
                "InvalidHistory",
                "spec.history.topics must be 1 to 256 patterns: a topic name, optionally ending \
                 in *, or * alone",
            ));
        }
        if !(1..=100_000).contains(&history.size) || !(1..=604_800).contains(&history.ttl_seconds) {
            return Err(InvalidSpec::new(
                "InvalidHistory",
                "spec.history.size must be 1..=100000 and ttlSeconds 1..=604800",
            ));
        }
    }
    if let Some(auth) = &spec.auth {
        validate_auth(auth)?;
    }
    if let Some(auto) = &spec.autoscaling {
        if auto.min_replicas < 1 {
            return Err(InvalidSpec::new(
                "InvalidAutoscaling",
                "autoscaling.minReplicas must be at least 1",
            ));
        }
        if auto.min_replicas > auto.max_replicas {
            return Err(InvalidSpec::new(
                "InvalidAutoscaling",
                "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
            ));
        }
        if auto.target_cpu_utilization_percentage.is_none()
            && auto.target_connections_per_pod.is_none()
        {
            return Err(InvalidSpec::new(
                "InvalidAutoscaling",
                "autoscaling needs targetCPUUtilizationPercentage, targetConnectionsPerPod or both",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AutoscalingSpec, RedisSpec, SecretKeyRef};

    fn redis() -> Option<RedisSpec> {
        Some(RedisSpec {
            url: Some("redis://redis:6379".into()),
            url_secret_ref: None,
            socket_channels: None,
            sentinel: None,
            cluster: None,
        })
    }

    #[test]
    fn the_default_spec_is_valid() {
        assert_eq!(validate_spec(&WsClusterSpec::default()), Ok(()));
    }

    #[test]
    fn min_replicas_above_max_replicas_is_invalid_autoscaling() {
        let spec = WsClusterSpec {
            redis: redis(),
            autoscaling: Some(AutoscalingSpec {
                min_replicas: 5,
                max_replicas: 2,
                target_cpu_utilization_percentage: Some(70),
                ..AutoscalingSpec::default()
            }),
            ..WsClusterSpec::default()
        };
        let err = validate_spec(&spec).err();
        assert_eq!(err.map(|e| e.reason), Some("InvalidAutoscaling"));
    }

    #[test]
    fn autoscaling_without_any_target_is_invalid() {
        let spec = WsClusterSpec {
            redis: redis(),
            autoscaling: Some(AutoscalingSpec {
                min_replicas: 1,
                max_replicas: 2,
                ..AutoscalingSpec::default()
            }),
            ..WsClusterSpec::default()
        };
        assert!(validate_spec(&spec).is_err());
    }

    #[test]
    fn a_prefix_with_a_slash_is_rejected_naming_the_field() {
        let spec = WsClusterSpec {
            key_prefix: Some("a/b".into()),
            ..WsClusterSpec::default()
        };
        let err = validate_spec(&spec).err();
        assert_eq!(err.as_ref().map(|e| e.reason), Some("InvalidKeyPrefix"));
        assert!(err.is_some_and(|e| e.message.contains("spec.keyPrefix")));
    }

    #[test]
    fn several_replicas_without_redis_are_rejected() {
        let spec = WsClusterSpec {
            replicas: 3,
            ..WsClusterSpec::default()
        };
        assert_eq!(
            validate_spec(&spec).err().map(|e| e.reason),
            Some("RedisRequired")
        );
    }

    #[test]
    fn sentinel_needs_hosts_and_a_master_and_takes_a_url_for_credentials_only() {
        use crate::crd::SentinelSpec;
        let check = |url: Option<&str>, hosts: &[&str], master: &str| {
            validate_spec(&WsClusterSpec {
                replicas: 3,
                redis: Some(RedisSpec {
                    url: url.map(str::to_owned),
                    url_secret_ref: None,
                    socket_channels: None,
                    sentinel: Some(SentinelSpec {
                        hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
                        master_name: master.to_owned(),
                    }),
                    cluster: None,
                }),
                ..WsClusterSpec::default()
            })
            .err()
            .map(|e| e.reason)
        };
        assert_eq!(check(None, &["s1:26379", "10.0.0.7:26379"], "chat"), None);
        assert_eq!(check(Some("redis://:pw@x/1"), &["s1:26379"], "chat"), None);
        for (hosts, master) in [
            (&[][..], "chat"),
            (&["s1"][..], "chat"),
            (&["s1:0"][..], "chat"),
            (&["s1:99999"][..], "chat"),
            (&["a,b:1"][..], "chat"),
            (&["s1:26379"][..], ""),
        ] {
            assert_eq!(
                check(None, hosts, master),
                Some("InvalidRedis"),
                "{hosts:?} {master:?}"
            );
        }
    }

    #[test]
    fn cluster_needs_nodes_excludes_sentinel_and_per_socket_channels() {
        use crate::crd::{ClusterSpec, SentinelSpec, SocketChannels};
        let spec = |nodes: &[&str], sentinel: bool, mode: Option<SocketChannels>| WsClusterSpec {
            replicas: 3,
            redis: Some(RedisSpec {
                url: None,
                url_secret_ref: None,
                socket_channels: mode,
                sentinel: sentinel.then(|| SentinelSpec {
                    hosts: vec!["s:26379".into()],
                    master_name: "m".into(),
                }),
                cluster: Some(ClusterSpec {
                    nodes: nodes.iter().map(|h| (*h).to_owned()).collect(),
                }),
            }),
            ..WsClusterSpec::default()
        };
        let check = |s: WsClusterSpec| validate_spec(&s).err().map(|e| e.reason);
        assert_eq!(
            check(spec(&["r-0.r:6379", "r-1.r:6379"], false, None)),
            None
        );
        assert_eq!(
            check(spec(&["r:6379"], false, Some(SocketChannels::PerReplica))),
            None
        );
        for bad in [
            spec(&[], false, None),
            spec(&["r"], false, None),
            spec(&["r:0"], false, None),
            spec(&["a b:1"], false, None),
            spec(&["r:6379"], true, None),
            spec(&["r:6379"], false, Some(SocketChannels::PerSocket)),
        ] {
            assert_eq!(check(bad.clone()), Some("InvalidRedis"), "{bad:?}");
        }
    }

    #[test]
    fn auth_needs_one_key_and_well_formed_topics_and_origins() {
        use crate::crd::{AuthMode, AuthSpec, KeyRef};
        let secret = || {
            Some(SecretKeyRef {
                name: "s".into(),
                key: "k".into(),
            })
        };
        let check = |auth: AuthSpec| {
            validate_spec(&WsClusterSpec {
                auth: Some(auth),
                ..WsClusterSpec::default()
            })
            .err()
            .map(|e| e.reason)
        };
        assert_eq!(
            check(AuthSpec {
                hmac_secret_ref: secret(),
                ..AuthSpec::default()
            }),
            None
        );
        for bad in [
            AuthSpec::default(),
            AuthSpec {
                hmac_secret_ref: secret(),
                jwks: Some(KeyRef {
                    secret_key_ref: secret(),
                    config_map_key_ref: None,
                }),
                ..AuthSpec::default()
            },
            AuthSpec {
                public_key: Some(KeyRef::default()),
                ..AuthSpec::default()
            },
            AuthSpec {
                hmac_secret_ref: secret(),
                anonymous_topics: Some(vec!["public:*".into()]),
                ..AuthSpec::default()
            },
            AuthSpec {
                mode: AuthMode::Optional,
                hmac_secret_ref: secret(),
                anonymous_topics: Some(vec!["a b".into()]),
                ..AuthSpec::default()
            },
            AuthSpec {
                hmac_secret_ref: secret(),
                allowed_origins: Some(vec!["example.com".into()]),
                ..AuthSpec::default()
            },
            AuthSpec {
                hmac_secret_ref: secret(),
                allowed_origins: Some(vec!["https://x/path".into()]),
                ..AuthSpec::default()
            },
            AuthSpec {
                hmac_secret_ref: secret(),
                timeout_ms: Some(10),
                ..AuthSpec::default()
            },
        ] {
            assert_eq!(check(bad.clone()), Some("InvalidAuth"), "{bad:?}");
        }
    }

    #[test]
    fn history_patterns_are_checked_like_the_gateway_checks_them() {
        use crate::crd::HistorySpec;
        let with = |topics: &[&str]| WsClusterSpec {
            redis: redis(),
            history: Some(HistorySpec {
                topics: topics.iter().map(|t| (*t).to_owned()).collect(),
                size: 100,
                ttl_seconds: 300,
            }),
            ..WsClusterSpec::default()
        };
        assert_eq!(validate_spec(&with(&["news", "orders:*", "*"])), Ok(()));
        for bad in [&[][..], &["a*b"], &["a b"], &[""], &["**"]] {
            let err = validate_spec(&with(bad)).unwrap_err();
            assert_eq!(err.reason, "InvalidHistory", "{bad:?}");
        }
    }

    #[test]
    fn redis_with_both_url_and_secret_is_rejected() {
        let spec = WsClusterSpec {
            redis: Some(RedisSpec {
                url: Some("redis://r".into()),
                url_secret_ref: Some(SecretKeyRef {
                    name: "s".into(),
                    key: "k".into(),
                }),
                socket_channels: None,
                sentinel: None,
                cluster: None,
            }),
            ..WsClusterSpec::default()
        };
        assert_eq!(
            validate_spec(&spec).err().map(|e| e.reason),
            Some("InvalidRedis")
        );
    }
}
