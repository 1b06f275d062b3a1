//! Operator configuration: flags with `WSGATE_OPERATOR_*` environment twins.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Gateway image used when a WsCluster does not name one.
pub const DEFAULT_GATEWAY_IMAGE: &str = "ghcr.io/wsgate/wsgate:0.1.0";
/// Address of `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:8080";
/// Name of the leader-election Lease.
pub const DEFAULT_LEASE_NAME: &str = "wsgate-operator";
/// Seconds a Lease stays valid without renewal.
pub const DEFAULT_LEASE_DURATION_SECS: u64 = 15;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable text.
    Text,
}

/// wsgate-operator: reconciles WsCluster resources into wsgate gateway fleets.
#[derive(Debug, Clone, Parser)]
#[command(name = "wsgate-operator", version)]
pub struct Config {
    /// Gateway image for WsClusters that do not set spec.image.
    #[arg(long, env = "WSGATE_OPERATOR_GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
    pub gateway_image: String,

    /// Listen address of /metrics, /healthz and /readyz.
    #[arg(long, env = "WSGATE_OPERATOR_HTTP_LISTEN", default_value = DEFAULT_HTTP_LISTEN)]
    pub http_listen: SocketAddr,

    /// Elect a leader through a Lease so that only one replica reconciles.
    #[arg(long, env = "WSGATE_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "WSGATE_OPERATOR_LEASE_NAME", default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,

    /// Namespace of the leader-election Lease (the chart passes the pod's namespace).
    #[arg(
        long,
        env = "WSGATE_OPERATOR_LEASE_NAMESPACE",
        default_value = "default"
    )]
    pub lease_namespace: String,

    /// Identity of this replica in the Lease (the chart passes the pod name).
    #[arg(
        long,
        env = "WSGATE_OPERATOR_POD_NAME",
        default_value = "wsgate-operator"
    )]
    pub pod_name: String,

    /// Seconds the Lease stays valid without renewal; it is renewed every third of that.
    #[arg(long, env = "WSGATE_OPERATOR_LEASE_DURATION_SECS", default_value_t = DEFAULT_LEASE_DURATION_SECS, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub lease_duration_secs: u64,

    /// Log format.
    #[arg(long, env = "WSGATE_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

impl Config {
    /// How long a Lease stays valid without renewal.
    #[must_use]
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::try_parse_from(["wsgate-operator"]).expect("defaults parse");
        assert_eq!(c.gateway_image, DEFAULT_GATEWAY_IMAGE);
        assert_eq!(c.http_listen.to_string(), DEFAULT_HTTP_LISTEN);
        assert!(c.leader_election);
        assert_eq!(c.lease_duration(), Duration::from_secs(15));
    }

    #[test]
    fn flags_override_defaults_and_bad_values_name_the_flag() {
        let c = Config::try_parse_from([
            "wsgate-operator",
            "--gateway-image=wsgate:dev",
            "--leader-election=false",
            "--log-format=text",
        ])
        .expect("flags parse");
        assert_eq!(c.gateway_image, "wsgate:dev");
        assert!(!c.leader_election);
        assert_eq!(c.log_format, LogFormat::Text);

        let err = Config::try_parse_from(["wsgate-operator", "--lease-duration-secs=1"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--lease-duration-secs"), "{err}");
    }
}
