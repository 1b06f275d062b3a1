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

/// Seconds between two reads of the fleet's metrics.
pub const DEFAULT_FLEET_POLL_SECS: u64 = 10;
/// Longest wait for one pod's metrics.
pub const DEFAULT_FLEET_TIMEOUT_MS: u64 = 2000;
/// Pods read at once.
pub const DEFAULT_FLEET_CONCURRENCY: u64 = 16;

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

    /// Seconds between two reads of the gateway pods' metrics (live status and deletion
    /// costs); 0 turns the reading off.
    #[arg(long, env = "WSGATE_OPERATOR_FLEET_POLL_SECS", default_value_t = DEFAULT_FLEET_POLL_SECS, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub fleet_poll_secs: u64,

    /// Longest wait for one pod's metrics, in milliseconds.
    #[arg(long, env = "WSGATE_OPERATOR_FLEET_TIMEOUT_MS", default_value_t = DEFAULT_FLEET_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub fleet_timeout_ms: u64,

    /// Pods whose metrics are read at once, across all WsClusters.
    #[arg(long, env = "WSGATE_OPERATOR_FLEET_CONCURRENCY", default_value_t = DEFAULT_FLEET_CONCURRENCY, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub fleet_concurrency: u64,

    /// Log format.
    #[arg(long, env = "WSGATE_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

impl Config {
    /// How the fleet is read, or `None` when reading is off.
    #[must_use]
    pub fn fleet(&self) -> Option<crate::fleet::Settings> {
        (self.fleet_poll_secs > 0).then(|| crate::fleet::Settings {
            poll: Duration::from_secs(self.fleet_poll_secs),
            timeout: Duration::from_millis(self.fleet_timeout_ms),
            concurrency: usize::try_from(self.fleet_concurrency).unwrap_or(usize::MAX),
        })
    }

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
        let fleet = c.fleet().expect("fleet reading is on by default");
        assert_eq!(fleet.poll, Duration::from_secs(10));
        assert_eq!(fleet.timeout, Duration::from_secs(2));
        assert_eq!(fleet.concurrency, 16);
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

        let off =
            Config::try_parse_from(["wsgate-operator", "--fleet-poll-secs=0"]).expect("0 parses");
        assert!(off.fleet().is_none());
        let err = Config::try_parse_from(["wsgate-operator", "--fleet-concurrency=0"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--fleet-concurrency"), "{err}");
    }
}
