//! Prometheus metrics (`wsgate_` prefix, base units, `_total` counters, closed label sets).

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::error::{ApiError, ClientError};

/// This build's version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit this binary was built from, when the build set `WSGATE_GIT_COMMIT` (the
/// container build passes it as a build argument).
pub fn git_commit() -> Option<&'static str> {
    option_env!("WSGATE_GIT_COMMIT").filter(|c| !c.trim().is_empty())
}

/// Why a connection closed (the `reason` label of `wsgate_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed or went away.
    Client,
    /// The client could not keep up with its outbound queue.
    SlowConsumer,
    /// No inbound traffic within the idle timeout.
    IdleTimeout,
    /// The gateway is shutting down.
    Shutdown,
    /// A backend asked for it (`/api/disconnect`).
    Disconnected,
    /// The client broke the WebSocket protocol.
    ProtocolError,
    /// The client exceeded the inbound message rate too often.
    RateLimited,
    /// A socket error.
    IoError,
    /// No valid token in time, or a refused one (`--auth`).
    Unauthorized,
    /// The connection's token expired without a refresh.
    TokenExpired,
}

impl CloseReason {
    /// All reasons (label values).
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Client,
        CloseReason::SlowConsumer,
        CloseReason::IdleTimeout,
        CloseReason::Shutdown,
        CloseReason::Disconnected,
        CloseReason::ProtocolError,
        CloseReason::RateLimited,
        CloseReason::IoError,
        CloseReason::Unauthorized,
        CloseReason::TokenExpired,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Disconnected => "disconnected",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::IoError => "io_error",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::TokenExpired => "token_expired",
        }
    }
}

/// Why a message was not delivered (the `reason` label of `wsgate_messages_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Discarded from (or refused by) a full outbound queue.
    SlowConsumer,
    /// The recipient was already closing.
    ConnectionClosed,
    /// A broker payload failed validation.
    InvalidPayload,
}

impl DropReason {
    /// All reasons (label values).
    pub const ALL: [DropReason; 3] = [
        DropReason::SlowConsumer,
        DropReason::ConnectionClosed,
        DropReason::InvalidPayload,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::ConnectionClosed => "connection_closed",
            DropReason::InvalidPayload => "invalid_payload",
        }
    }
}

/// Metrics a broker reports.
#[derive(Clone)]
pub struct BrokerMetrics {
    /// `wsgate_broker_up`.
    pub up: IntGauge,
    /// `wsgate_broker_reconnects_total`.
    pub reconnects: IntCounter,
    /// `wsgate_broker_channels`.
    pub channels: IntGauge,
    /// `wsgate_broker_payloads_rejected_total`.
    pub rejected: IntCounter,
    /// `wsgate_broker_subscribe_failures_total`.
    pub subscribe_failures: IntCounter,
    /// Message history and recovery.
    pub history: HistoryMetrics,
}

/// Metrics of message history and recovery (DESIGN §9).
#[derive(Clone)]
pub struct HistoryMetrics {
    /// `wsgate_history_recoveries_total`: joins with `since` that got everything missed.
    pub recoveries: IntCounter,
    /// `wsgate_history_recovered_messages_total`.
    pub recovered: IntCounter,
    /// `wsgate_history_recovery_failures_total{reason}`.
    failures: IntCounterVec,
    /// `wsgate_history_gap_filled_messages_total`: messages this replica missed while cut off
    /// from the broker and delivered from the history once back.
    pub gap_filled: IntCounter,
    /// `wsgate_history_gap_fill_failures_total`: topics whose gap could not be filled whole
    /// (history lost or trimmed, or unreadable).
    pub gap_fill_failures: IntCounter,
    /// `wsgate_history_bytes`: bytes the history of this instance's topics takes in the broker.
    pub bytes: IntGauge,
}

impl HistoryMetrics {
    /// Counts a recovery that did not give the client everything it missed.
    pub fn recovery_failed(&self, why: crate::history::RecoveryFailure) {
        self.failures.with_label_values(&[why.label()]).inc();
    }

    /// Failed recoveries for one reason (for tests).
    pub fn failures(&self, why: crate::history::RecoveryFailure) -> u64 {
        self.failures.with_label_values(&[why.label()]).get()
    }
}

/// Every gateway metric, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub topics: IntGauge,
    pub subscriptions: IntGauge,
    pub published: IntCounter,
    pub delivered: IntCounter,
    dropped: IntCounterVec,
    pub opened: IntCounter,
    closed: IntCounterVec,
    client_errors: IntCounterVec,
    http_errors: IntCounterVec,
    auth_failures: IntCounterVec,
    pub forbidden_joins: IntCounter,
    pub broker: BrokerMetrics,
}

/// The documented metric names (checked against `/metrics` by a test).
pub const DOCUMENTED: &[&str] = &[
    "wsgate_connections",
    "wsgate_topics",
    "wsgate_subscriptions",
    "wsgate_messages_published_total",
    "wsgate_messages_delivered_total",
    "wsgate_messages_dropped_total",
    "wsgate_connections_opened_total",
    "wsgate_connections_closed_total",
    "wsgate_client_errors_total",
    "wsgate_http_errors_total",
    "wsgate_auth_failures_total",
    "wsgate_forbidden_joins_total",
    "wsgate_broker_up",
    "wsgate_broker_reconnects_total",
    "wsgate_broker_channels",
    "wsgate_broker_payloads_rejected_total",
    "wsgate_broker_subscribe_failures_total",
    "wsgate_history_recoveries_total",
    "wsgate_history_recovered_messages_total",
    "wsgate_history_recovery_failures_total",
    "wsgate_history_gap_filled_messages_total",
    "wsgate_history_gap_fill_failures_total",
    "wsgate_history_bytes",
    "wsgate_build_info",
];

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    // Export every label value from the start so rates work from the first scrape.
    for v in values {
        c.with_label_values(&[*v]);
    }
    c
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    ///
    /// # Panics
    /// Only on a programming error in the metric definitions (names are constants).
    pub fn new() -> Self {
        let r = Registry::new();
        let close_labels: Vec<&str> = CloseReason::ALL.iter().map(|r| r.label()).collect();
        let drop_labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.label()).collect();
        let recovery_labels: Vec<&str> = crate::history::RecoveryFailure::ALL
            .iter()
            .map(|r| r.label())
            .collect();
        let build = IntGauge::with_opts(
            Opts::new("wsgate_build_info", "Build information; always 1.")
                .const_label("version", VERSION),
        )
        .unwrap_or_else(|e| panic!("metric wsgate_build_info: {e}"));
        build.set(1);
        r.register(Box::new(build))
            .unwrap_or_else(|e| panic!("metric wsgate_build_info: {e}"));
        Self {
            connections: gauge(&r, "wsgate_connections", "Open WebSocket connections."),
            topics: gauge(
                &r,
                "wsgate_topics",
                "Topics with at least one local subscriber.",
            ),
            subscriptions: gauge(
                &r,
                "wsgate_subscriptions",
                "Local (connection, topic) subscriptions.",
            ),
            published: counter(
                &r,
                "wsgate_messages_published_total",
                "Messages accepted by the HTTP API or library for publishing.",
            ),
            delivered: counter(
                &r,
                "wsgate_messages_delivered_total",
                "Messages written to client sockets.",
            ),
            dropped: counter_vec(
                &r,
                "wsgate_messages_dropped_total",
                "Messages not delivered, by reason.",
                "reason",
                &drop_labels,
            ),
            opened: counter(
                &r,
                "wsgate_connections_opened_total",
                "WebSocket connections opened.",
            ),
            closed: counter_vec(
                &r,
                "wsgate_connections_closed_total",
                "WebSocket connections closed, by reason.",
                "reason",
                &close_labels,
            ),
            client_errors: counter_vec(
                &r,
                "wsgate_client_errors_total",
                "Error envelopes sent to clients, by code.",
                "code",
                ClientError::CODES,
            ),
            http_errors: counter_vec(
                &r,
                "wsgate_http_errors_total",
                "HTTP error responses (API calls and refused WebSocket upgrades), by code.",
                "code",
                ApiError::CODES,
            ),
            auth_failures: counter_vec(
                &r,
                "wsgate_auth_failures_total",
                "Tokens refused (or missing where required), by reason.",
                "reason",
                &crate::auth::AuthFailure::ALL
                    .iter()
                    .map(|f| f.label())
                    .collect::<Vec<_>>(),
            ),
            forbidden_joins: counter(
                &r,
                "wsgate_forbidden_joins_total",
                "Joins refused because the connection's token does not allow the topic.",
            ),
            broker: BrokerMetrics {
                up: gauge(
                    &r,
                    "wsgate_broker_up",
                    "1 when the broker is connected and delivering.",
                ),
                reconnects: counter(
                    &r,
                    "wsgate_broker_reconnects_total",
                    "Broker reconnections.",
                ),
                channels: gauge(
                    &r,
                    "wsgate_broker_channels",
                    "Broker channels this instance is subscribed to.",
                ),
                rejected: counter(
                    &r,
                    "wsgate_broker_payloads_rejected_total",
                    "Malformed or hostile broker payloads dropped.",
                ),
                subscribe_failures: counter(
                    &r,
                    "wsgate_broker_subscribe_failures_total",
                    "Broker subscribe attempts that failed after all retries.",
                ),
                history: HistoryMetrics {
                    recoveries: counter(
                        &r,
                        "wsgate_history_recoveries_total",
                        "Joins with a position that received every message missed since.",
                    ),
                    recovered: counter(
                        &r,
                        "wsgate_history_recovered_messages_total",
                        "Messages sent to clients from the history when they recovered.",
                    ),
                    failures: counter_vec(
                        &r,
                        "wsgate_history_recovery_failures_total",
                        "Joins with a position that could not recover, by reason.",
                        "reason",
                        &recovery_labels,
                    ),
                    gap_filled: counter(
                        &r,
                        "wsgate_history_gap_filled_messages_total",
                        "Messages missed while cut off from the broker, delivered from the history once back.",
                    ),
                    gap_fill_failures: counter(
                        &r,
                        "wsgate_history_gap_fill_failures_total",
                        "Topics whose missed messages could not all be read back after a broker outage.",
                    ),
                    bytes: gauge(
                        &r,
                        "wsgate_history_bytes",
                        "Bytes the history of this instance's topics takes in the broker.",
                    ),
                },
            },
            registry: r,
        }
    }

    /// Counts a closed connection.
    pub fn connection_closed(&self, reason: CloseReason) {
        self.closed.with_label_values(&[reason.label()]).inc();
    }

    /// Counts `n` undelivered messages.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped.with_label_values(&[reason.label()]).inc_by(n);
        }
    }

    /// Counts an error envelope.
    pub fn client_error(&self, error: &ClientError) {
        self.client_errors.with_label_values(&[error.code()]).inc();
    }

    /// Counts a refused token.
    pub fn auth_failed(&self, why: crate::auth::AuthFailure) {
        self.auth_failures.with_label_values(&[why.label()]).inc();
    }

    /// Counts an HTTP error response.
    pub fn http_error(&self, code: &str) {
        self.http_errors.with_label_values(&[code]).inc();
    }

    /// Closed-connection count for one reason (for tests and stats).
    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed.with_label_values(&[reason.label()]).get()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
