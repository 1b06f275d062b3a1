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
        match (&redis.url, &redis.url_secret_ref) {
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
        let valid = |p: &str| {
            let stem = p.strip_suffix('*').unwrap_or(p);
            (p == "*" || !stem.is_empty())
                && stem.len() <= 256
                && stem
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
        };
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
            }),
            ..WsClusterSpec::default()
        };
        assert_eq!(
            validate_spec(&spec).err().map(|e| e.reason),
            Some("InvalidRedis")
        );
    }
}
