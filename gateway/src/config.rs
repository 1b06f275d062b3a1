//! Configuration: command-line flags with `WSGATE_*` environment twins, validated before
//! anything binds. A bad setting is reported as one line naming it.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::error::Error;
use crate::types::KeyPrefix;

/// Default WebSocket + API listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default broker key prefix.
pub const DEFAULT_KEY_PREFIX: &str = "ws";
/// Default broker connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2000;
/// Default drain window on SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;
/// Default largest inbound WebSocket message.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;
/// Default largest published message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Default connection limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default topics per connection.
pub const DEFAULT_MAX_TOPICS_PER_CONNECTION: usize = 100;
/// Default inbound messages per second per connection.
pub const DEFAULT_MAX_INBOUND_RATE: u32 = 100;
/// Default idle timeout.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 120;
/// Default outbound queue length.
pub const DEFAULT_QUEUE_MESSAGES: usize = 1024;
/// Default outbound queue bytes.
pub const DEFAULT_QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// Default most messages in one batch publish.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 1000;
/// Default largest batch publish body.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Default size below which messages go uncompressed to clients that negotiated
/// permessage-deflate: under about this size, deflate saves a few dozen bytes at best — less
/// than the TCP/IP headers of the packet carrying it — and still costs a compression.
pub const DEFAULT_COMPRESSION_THRESHOLD_BYTES: usize = 128;

/// Default time a closing connection gets to flush its close frame.
pub const DEFAULT_CLOSE_TIMEOUT_MS: u64 = 5000;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// How direct messages (`/api/send`, `/api/disconnect`) find their connection's replica
/// through Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketChannels {
    /// One channel per replica (`{prefix}:__direct__:<tag>`, the tag being the first 32 bits
    /// of its socket ids): connecting costs Redis nothing.
    PerReplica,
    /// Also one channel per connection (`{prefix}:__socket__:<id>`), as the seed does: for
    /// fleets where seed instances send to this replica's connections.
    PerSocket,
}

/// A feature switch (`on` / `off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl Switch {
    /// Whether the feature is enabled.
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// wsgate: a WebSocket fan-out gateway. Clients join topics; backends publish over HTTP;
/// replicas share messages through Redis (or run alone on the in-process broker).
#[derive(Debug, Clone, Parser)]
#[command(name = "wsgate", version, about, long_about = None)]
pub struct Config {
    /// Address for WebSocket clients and the HTTP API.
    #[arg(long, env = "WSGATE_LISTEN", default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Separate address for /metrics, /healthz and /readyz (default: served on --listen).
    #[arg(long, env = "WSGATE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// WebSocket path.
    #[arg(
        long,
        env = "WSGATE_WS_PATH",
        default_value = "/ws",
        value_name = "PATH"
    )]
    pub ws_path: String,

    /// Redis URL (redis:// or rediss://); absent: the in-process broker (single instance).
    #[arg(
        long,
        env = "WSGATE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// Redis Sentinel: `host:port` of each sentinel, comma-separated. The gateway asks them
    /// for the current master on every connect and follows failovers; --redis-url, if given,
    /// then only supplies the user, password, database and TLS setting.
    #[arg(
        long,
        env = "WSGATE_REDIS_SENTINELS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub redis_sentinels: Vec<String>,

    /// The name of the master the sentinels watch (with --redis-sentinels).
    #[arg(long, env = "WSGATE_REDIS_SENTINEL_MASTER", value_name = "NAME")]
    pub redis_sentinel_master: Option<String>,

    /// Redis Cluster: `host:port` of some of its nodes, comma-separated. Topics then use
    /// sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7 or later), so each topic's traffic
    /// touches only its shard; --redis-url, if given, then only supplies the user, password
    /// and TLS setting.
    #[arg(
        long,
        env = "WSGATE_REDIS_CLUSTER_NODES",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub redis_cluster_nodes: Vec<String>,

    /// PEM file with the CA certificate(s) that sign the Redis server's certificate
    /// (rediss:// only; default: the system's root certificates).
    #[arg(long, env = "WSGATE_REDIS_CA_FILE", value_name = "PATH")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// Namespace of the broker channels ({prefix}:{topic}); 1-64 of a-z A-Z 0-9 _ : . -
    #[arg(long, env = "WSGATE_KEY_PREFIX", default_value = DEFAULT_KEY_PREFIX, value_name = "PREFIX")]
    pub key_prefix: String,

    /// How direct messages reach a connection's replica through Redis: per-replica (one
    /// channel per replica, nothing subscribed per connection) or per-socket (also the seed's
    /// channel per connection, for fleets where seed instances send to wsgate connections).
    #[arg(long, env = "WSGATE_SOCKET_CHANNELS", value_enum, default_value_t = SocketChannels::PerReplica, value_name = "per-replica|per-socket")]
    pub socket_channels: SocketChannels,

    /// Broker connect (and confirmation) timeout in milliseconds.
    #[arg(long, env = "WSGATE_CONNECT_TIMEOUT_MS", default_value_t = DEFAULT_CONNECT_TIMEOUT_MS, value_name = "MS")]
    pub connect_timeout_ms: u64,

    /// API key required as "Authorization: Bearer <key>" on /api/*; repeat it (or give a comma
    /// list in the environment) to accept several at once while rotating.
    #[arg(
        long,
        env = "WSGATE_API_KEY",
        value_name = "KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_key: Vec<String>,

    /// File of API keys, one per line (`#` comments allowed), re-read when it changes: rotate
    /// keys without a restart.
    #[arg(long, env = "WSGATE_API_KEYS_FILE", value_name = "PATH")]
    pub api_keys_file: Option<std::path::PathBuf>,

    /// Browser origins allowed to open WebSocket connections, comma-separated:
    /// `https://app.example.com`, `https://*.example.com` (default: any). Upgrades with another
    /// `Origin` get 403; clients that send none (not browsers) are not affected.
    #[arg(
        long,
        env = "WSGATE_ALLOWED_ORIGINS",
        default_value = "",
        value_name = "ORIGINS"
    )]
    pub allowed_origins: String,

    /// Without an API key, answer /api/* from any address (not just loopback).
    #[arg(long, env = "WSGATE_API_ALLOW_UNAUTHENTICATED")]
    pub api_allow_unauthenticated: bool,

    /// On SIGTERM: seconds to drain connections before exiting.
    #[arg(long, env = "WSGATE_DRAIN_TIMEOUT_SECS", default_value_t = DEFAULT_DRAIN_TIMEOUT_SECS, value_name = "SECS")]
    pub drain_timeout_secs: u64,

    /// On SIGTERM: close at most this many connections per second, starting at once, so that
    /// their clients' reconnects reach the rest of the fleet at a paced rate (0: close them
    /// spread over the middle third of the drain window instead). When the drain window is too
    /// short for the rate, the window wins: the rest are closed faster so that every client
    /// gets its close frame before the gateway exits.
    #[arg(
        long,
        env = "WSGATE_DRAIN_RATE",
        default_value_t = 0,
        value_name = "PER_SEC"
    )]
    pub drain_rate: u32,

    /// Most simultaneous WebSocket connections (0: unlimited).
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: usize,

    /// Largest inbound WebSocket message in bytes.
    #[arg(long, env = "WSGATE_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES, value_name = "BYTES")]
    pub max_frame_bytes: usize,

    /// Largest message accepted by the publish API in bytes.
    #[arg(long, env = "WSGATE_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES, value_name = "BYTES")]
    pub max_message_bytes: usize,

    /// Most messages in one `POST /api/batch`.
    #[arg(long, env = "WSGATE_MAX_BATCH_MESSAGES", default_value_t = DEFAULT_MAX_BATCH_MESSAGES, value_name = "N")]
    pub max_batch_messages: usize,

    /// Largest `POST /api/batch` body in bytes.
    #[arg(long, env = "WSGATE_MAX_BATCH_BYTES", default_value_t = DEFAULT_MAX_BATCH_BYTES, value_name = "BYTES")]
    pub max_batch_bytes: usize,

    /// Most topics one connection may join.
    #[arg(long, env = "WSGATE_MAX_TOPICS_PER_CONNECTION", default_value_t = DEFAULT_MAX_TOPICS_PER_CONNECTION, value_name = "N")]
    pub max_topics_per_connection: usize,

    /// Inbound messages per second per connection (0: unlimited).
    #[arg(long, env = "WSGATE_MAX_INBOUND_RATE", default_value_t = DEFAULT_MAX_INBOUND_RATE, value_name = "N")]
    pub max_inbound_rate: u32,

    /// Close connections silent for this many seconds (0: never).
    #[arg(long, env = "WSGATE_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_IDLE_TIMEOUT_SECS, value_name = "SECS")]
    pub idle_timeout_secs: u64,

    /// Most messages waiting for one slow client before it is disconnected.
    #[arg(long, env = "WSGATE_OUTBOUND_QUEUE_MESSAGES", default_value_t = DEFAULT_QUEUE_MESSAGES, value_name = "N")]
    pub outbound_queue_messages: usize,

    /// Most bytes waiting for one slow client before it is disconnected.
    #[arg(long, env = "WSGATE_OUTBOUND_QUEUE_BYTES", default_value_t = DEFAULT_QUEUE_BYTES, value_name = "BYTES")]
    pub outbound_queue_bytes: usize,

    /// How long a closing connection may take to flush its close frame before the socket is
    /// cut, in milliseconds.
    #[arg(long, env = "WSGATE_CLOSE_TIMEOUT_MS", default_value_t = DEFAULT_CLOSE_TIMEOUT_MS, value_name = "MS")]
    pub close_timeout_ms: u64,

    /// Topics that keep a message history, so that clients can recover what they missed and
    /// replicas cut off from Redis fill their gap: comma-separated exact names (`news`),
    /// prefixes (`orders:*`) or `*` (default: none).
    #[arg(
        long,
        env = "WSGATE_HISTORY_TOPICS",
        default_value = "",
        value_name = "PATTERNS"
    )]
    pub history_topics: String,

    /// Messages kept per history topic.
    #[arg(long, env = "WSGATE_HISTORY_SIZE", default_value_t = crate::history::DEFAULT_SIZE, value_name = "N")]
    pub history_size: usize,

    /// Seconds a history message is kept (a topic's history also expires this long after its
    /// last message).
    #[arg(long, env = "WSGATE_HISTORY_TTL_SECS", default_value_t = crate::history::DEFAULT_TTL_SECS, value_name = "SECS")]
    pub history_ttl_secs: u64,

    /// Connection authentication: off (anyone joins anything), optional (connections without a
    /// token join only --anonymous-topics) or required (a JWT on the upgrade or in the first
    /// message).
    #[arg(long, env = "WSGATE_AUTH", value_enum, default_value_t = crate::auth::AuthMode::Off, value_name = "off|optional|required")]
    pub auth: crate::auth::AuthMode,

    /// File holding the HMAC secret tokens are signed with (HS256/384/512; at least 32 bytes).
    #[arg(long, env = "WSGATE_JWT_SECRET_FILE", value_name = "PATH")]
    pub jwt_secret_file: Option<std::path::PathBuf>,

    /// PEM file with the public key tokens are signed for (RSA, EC P-256/P-384 or Ed25519).
    #[arg(long, env = "WSGATE_JWT_PUBLIC_KEY_FILE", value_name = "PATH")]
    pub jwt_public_key_file: Option<std::path::PathBuf>,

    /// JWKS file with the keys tokens are signed for, picked by `kid`; re-read when it
    /// changes (rotation without restart).
    #[arg(long, env = "WSGATE_JWT_JWKS_FILE", value_name = "PATH")]
    pub jwt_jwks_file: Option<std::path::PathBuf>,

    /// Required `aud` claim.
    #[arg(long, env = "WSGATE_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim.
    #[arg(long, env = "WSGATE_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,

    /// Clock leeway, in seconds: tokens are accepted this long past `exp` (and before `nbf`),
    /// and connections kept this long past their token's `exp`.
    #[arg(long, env = "WSGATE_JWT_LEEWAY_SECS", default_value_t = crate::auth::DEFAULT_LEEWAY_SECS, value_name = "SECS")]
    pub jwt_leeway_secs: u64,

    /// Milliseconds a connection without a token on its upgrade has to send
    /// `{"type":"auth.authenticate","token":"…"}` (--auth required).
    #[arg(
        long,
        env = "WSGATE_AUTH_TIMEOUT_MS",
        default_value_t = 5000,
        value_name = "MS"
    )]
    pub auth_timeout_ms: u64,

    /// Topics connections without a token may join with --auth optional: comma-separated exact
    /// names, prefixes (`public:*`) or `*` (default: none).
    #[arg(
        long,
        env = "WSGATE_ANONYMOUS_TOPICS",
        default_value = "",
        value_name = "PATTERNS"
    )]
    pub anonymous_topics: String,

    /// permessage-deflate (RFC 7692) for clients that offer it: each published message is
    /// compressed once and the same compressed frame goes to every such recipient.
    #[arg(long, env = "WSGATE_COMPRESSION", value_enum, default_value_t = Switch::On, value_name = "on|off")]
    pub compression: Switch,

    /// Messages smaller than this many bytes go uncompressed even to clients that negotiated
    /// permessage-deflate.
    #[arg(long, env = "WSGATE_COMPRESSION_THRESHOLD_BYTES", default_value_t = DEFAULT_COMPRESSION_THRESHOLD_BYTES, value_name = "BYTES")]
    pub compression_threshold_bytes: usize,

    /// The built-in status page at `/` on --listen (live stats and a try-it panel).
    #[arg(long, env = "WSGATE_STATUS_PAGE", value_enum, default_value_t = Switch::On, value_name = "on|off")]
    pub status_page: Switch,

    /// Log format.
    #[arg(long, env = "WSGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing env-filter syntax).
    #[arg(
        long,
        env = "WSGATE_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,
}

fn invalid(setting: &'static str, message: impl Into<String>) -> Error {
    Error::Config {
        setting,
        message: message.into(),
    }
}

impl Config {
    /// Parses flags (and environment twins) from an explicit argument list.
    ///
    /// # Errors
    /// A [`clap::Error`] for unknown flags or unparsable values.
    pub fn parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(args)
    }

    /// Checks cross-field rules and ranges.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), Error> {
        KeyPrefix::new(&self.key_prefix).map_err(|e| {
            invalid(
                "--key-prefix (WSGATE_KEY_PREFIX)",
                format!("{:?} {e}", self.key_prefix),
            )
        })?;
        if !self.ws_path.starts_with('/') || self.ws_path.starts_with("/api") {
            return Err(invalid(
                "--ws-path (WSGATE_WS_PATH)",
                "must start with / and not be under /api",
            ));
        }
        if !(1..=600_000).contains(&self.connect_timeout_ms) {
            return Err(invalid(
                "--connect-timeout-ms (WSGATE_CONNECT_TIMEOUT_MS)",
                "must be 1..=600000",
            ));
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(invalid(
                "--redis-url (WSGATE_REDIS_URL)",
                "must start with redis:// or rediss://",
            ));
        }
        if self.redis_ca_file.is_some()
            && !self
                .redis_url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
        {
            return Err(invalid(
                "--redis-ca-file (WSGATE_REDIS_CA_FILE)",
                "only applies to a rediss:// --redis-url",
            ));
        }
        crate::auth::Origins::parse(&self.allowed_origins)
            .map_err(|e| invalid("--allowed-origins (WSGATE_ALLOWED_ORIGINS)", e))?;
        let host_port = |s: &str| {
            s.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.chars().any(|c| c.is_whitespace() || c.is_control())
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            })
        };
        if !self.redis_cluster_nodes.is_empty() {
            let setting = "--redis-cluster-nodes (WSGATE_REDIS_CLUSTER_NODES)";
            if self.redis_cluster_nodes.len() > 64
                || !self.redis_cluster_nodes.iter().all(|s| host_port(s))
            {
                return Err(invalid(setting, "must be 1 to 64 host:port"));
            }
            if !self.redis_sentinels.is_empty() || self.redis_sentinel_master.is_some() {
                return Err(invalid(setting, "excludes --redis-sentinels"));
            }
            if self.socket_channels == SocketChannels::PerSocket {
                return Err(invalid(
                    setting,
                    "excludes --socket-channels per-socket (seed instances cannot use sharded pub/sub)",
                ));
            }
        }
        match (self.redis_sentinels.is_empty(), &self.redis_sentinel_master) {
            (true, None) => {}
            (false, Some(name)) => {
                if self.redis_sentinels.len() > 16
                    || !self.redis_sentinels.iter().all(|s| host_port(s))
                {
                    return Err(invalid(
                        "--redis-sentinels (WSGATE_REDIS_SENTINELS)",
                        "must be 1 to 16 host:port",
                    ));
                }
                if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                    return Err(invalid(
                        "--redis-sentinel-master (WSGATE_REDIS_SENTINEL_MASTER)",
                        "must be 1 to 256 characters",
                    ));
                }
            }
            (true, Some(_)) => {
                return Err(invalid(
                    "--redis-sentinel-master (WSGATE_REDIS_SENTINEL_MASTER)",
                    "needs --redis-sentinels",
                ));
            }
            (false, None) => {
                return Err(invalid(
                    "--redis-sentinels (WSGATE_REDIS_SENTINELS)",
                    "needs --redis-sentinel-master",
                ));
            }
        }
        // The file is read when the gateway starts (`api_keys`); the flags are checked here.
        crate::auth::ApiKeys::new(self.api_key.clone(), None)
            .map_err(|e| invalid("--api-key (WSGATE_API_KEY)", e))?;
        if !(1..=600_000).contains(&self.close_timeout_ms) {
            return Err(invalid(
                "--close-timeout-ms (WSGATE_CLOSE_TIMEOUT_MS)",
                "must be 1..=600000",
            ));
        }
        if self.drain_timeout_secs > 3600 {
            return Err(invalid(
                "--drain-timeout-secs (WSGATE_DRAIN_TIMEOUT_SECS)",
                "must be at most 3600",
            ));
        }
        if self.drain_rate > 1_000_000 {
            return Err(invalid(
                "--drain-rate (WSGATE_DRAIN_RATE)",
                "must be at most 1000000",
            ));
        }
        if !(16..=64 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(invalid(
                "--max-frame-bytes (WSGATE_MAX_FRAME_BYTES)",
                "must be 16..=67108864",
            ));
        }
        if !(1..=256 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(invalid(
                "--max-message-bytes (WSGATE_MAX_MESSAGE_BYTES)",
                "must be 1..=268435456",
            ));
        }
        if !(1..=100_000).contains(&self.max_batch_messages) {
            return Err(invalid(
                "--max-batch-messages (WSGATE_MAX_BATCH_MESSAGES)",
                "must be 1..=100000",
            ));
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.max_batch_bytes) {
            return Err(invalid(
                "--max-batch-bytes (WSGATE_MAX_BATCH_BYTES)",
                "must be 1024..=268435456",
            ));
        }
        if self.max_topics_per_connection == 0 {
            return Err(invalid(
                "--max-topics-per-connection (WSGATE_MAX_TOPICS_PER_CONNECTION)",
                "must be at least 1",
            ));
        }
        if self.outbound_queue_messages == 0 {
            return Err(invalid(
                "--outbound-queue-messages (WSGATE_OUTBOUND_QUEUE_MESSAGES)",
                "must be at least 1",
            ));
        }
        if self.outbound_queue_bytes < self.max_message_bytes + 16 {
            return Err(invalid(
                "--outbound-queue-bytes (WSGATE_OUTBOUND_QUEUE_BYTES)",
                "must be larger than --max-message-bytes, or no message could ever be queued",
            ));
        }
        if let Some(m) = self.metrics_listen
            && m == self.listen
        {
            return Err(invalid(
                "--metrics-listen (WSGATE_METRICS_LISTEN)",
                "must differ from --listen",
            ));
        }
        crate::history::Patterns::parse(&self.history_topics)
            .map_err(|e| invalid("--history-topics (WSGATE_HISTORY_TOPICS)", e))?;
        if !(1..=crate::history::MAX_SIZE).contains(&self.history_size) {
            return Err(invalid(
                "--history-size (WSGATE_HISTORY_SIZE)",
                format!("must be 1..={}", crate::history::MAX_SIZE),
            ));
        }
        if !(1..=7 * 24 * 3600).contains(&self.history_ttl_secs) {
            return Err(invalid(
                "--history-ttl-secs (WSGATE_HISTORY_TTL_SECS)",
                "must be 1..=604800 (a week)",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
            return Err(invalid(
                "--log (WSGATE_LOG)",
                format!("{:?} is not a valid log filter", self.log),
            ));
        }
        Ok(())
    }

    /// The validated key prefix.
    ///
    /// # Errors
    /// [`Error::Config`] when it is invalid.
    pub fn key_prefix(&self) -> Result<KeyPrefix, Error> {
        KeyPrefix::new(&self.key_prefix)
            .map_err(|e| invalid("--key-prefix (WSGATE_KEY_PREFIX)", e.to_string()))
    }

    /// The history settings, when some topics keep one.
    ///
    /// # Errors
    /// [`Error::Config`] when the patterns are invalid.
    pub fn history(&self) -> Result<Option<crate::history::HistorySettings>, Error> {
        let patterns = crate::history::Patterns::parse(&self.history_topics)
            .map_err(|e| invalid("--history-topics (WSGATE_HISTORY_TOPICS)", e))?;
        Ok(
            (!patterns.is_empty()).then(|| crate::history::HistorySettings {
                patterns,
                size: self.history_size,
                ttl: Duration::from_secs(self.history_ttl_secs),
            }),
        )
    }

    /// The Sentinel settings, when the sentinels and the master are given (see `validate`).
    pub fn sentinel(&self) -> Option<crate::broker::redis::SentinelSettings> {
        let master = self.redis_sentinel_master.clone()?;
        (!self.redis_sentinels.is_empty()).then(|| crate::broker::redis::SentinelSettings {
            sentinels: self.redis_sentinels.clone(),
            master,
        })
    }

    /// The Redis Cluster settings, when nodes are given.
    pub fn cluster(&self) -> Option<crate::broker::redis::ClusterSettings> {
        (!self.redis_cluster_nodes.is_empty()).then(|| crate::broker::redis::ClusterSettings {
            nodes: self.redis_cluster_nodes.clone(),
        })
    }

    /// The API keys, reading `--api-keys-file`.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad key or an unreadable file.
    pub fn api_keys(&self) -> Result<crate::auth::ApiKeys, Error> {
        crate::auth::ApiKeys::new(self.api_key.clone(), self.api_keys_file.clone()).map_err(|e| {
            invalid(
                "--api-key / --api-keys-file (WSGATE_API_KEY / WSGATE_API_KEYS_FILE)",
                e,
            )
        })
    }

    /// The allowed browser origins (empty: any).
    ///
    /// # Errors
    /// [`Error::Config`] for a bad origin.
    pub fn allowed_origins(&self) -> Result<crate::auth::Origins, Error> {
        crate::auth::Origins::parse(&self.allowed_origins)
            .map_err(|e| invalid("--allowed-origins (WSGATE_ALLOWED_ORIGINS)", e))
    }

    /// The authentication settings, with the verifier built from the key file.
    ///
    /// # Errors
    /// [`Error::Config`] for a missing, extra or unreadable key, or bad patterns.
    pub fn auth(&self) -> Result<crate::auth::AuthSettings, Error> {
        use crate::auth::{AuthMode, KeySource, Verifier};
        const KEYS: &str = "--jwt-secret-file / --jwt-public-key-file / --jwt-jwks-file";
        let sources: Vec<KeySource> = [
            self.jwt_secret_file.clone().map(KeySource::Secret),
            self.jwt_public_key_file.clone().map(KeySource::PublicKey),
            self.jwt_jwks_file.clone().map(KeySource::Jwks),
        ]
        .into_iter()
        .flatten()
        .collect();
        let anonymous = crate::history::Patterns::parse(&self.anonymous_topics)
            .map_err(|e| invalid("--anonymous-topics (WSGATE_ANONYMOUS_TOPICS)", e))?;
        if self.auth != AuthMode::Optional && !anonymous.is_empty() {
            return Err(invalid(
                "--anonymous-topics (WSGATE_ANONYMOUS_TOPICS)",
                "only applies with --auth optional",
            ));
        }
        let verifier = match (self.auth, sources.as_slice()) {
            (AuthMode::Off, []) => None,
            (AuthMode::Off, _) => {
                return Err(invalid(KEYS, "a key needs --auth optional or required"));
            }
            (_, [source]) => Some(std::sync::Arc::new(
                Verifier::new(
                    source,
                    self.jwt_audience.clone(),
                    self.jwt_issuer.clone(),
                    self.jwt_leeway_secs,
                )
                .map_err(|e| invalid(KEYS, e))?,
            )),
            (_, []) => return Err(invalid(KEYS, "--auth needs one key")),
            (_, _) => return Err(invalid(KEYS, "give exactly one key")),
        };
        if self.jwt_leeway_secs > 300 {
            return Err(invalid(
                "--jwt-leeway-secs (WSGATE_JWT_LEEWAY_SECS)",
                "must be 0..=300",
            ));
        }
        if !(100..=600_000).contains(&self.auth_timeout_ms) {
            return Err(invalid(
                "--auth-timeout-ms (WSGATE_AUTH_TIMEOUT_MS)",
                "must be 100..=600000",
            ));
        }
        Ok(crate::auth::AuthSettings {
            mode: self.auth,
            verifier,
            anonymous_topics: anonymous,
            timeout: Duration::from_millis(self.auth_timeout_ms),
            leeway: Duration::from_secs(self.jwt_leeway_secs),
        })
    }

    /// Broker connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Drain window.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// Idle timeout, if enabled.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }
}

/// Renders a clap error as one line (`error: invalid value ... for '--listen <ADDR>' ...`).
pub fn one_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    first.trim_start_matches("error: ").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cfg = Config::parse_args(std::iter::once("wsgate").chain(args.iter().copied()))
            .map_err(|e| one_line(&e))?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn defaults_match_the_design() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(cfg.key_prefix, "ws");
        assert_eq!(cfg.connect_timeout_ms, 2000);
        assert!(cfg.redis_url.is_none());
        assert_eq!(cfg.status_page, Switch::On);
        assert!(cfg.history().unwrap().is_none());
        let h = parse(&["--history-topics", "news,orders:*"])
            .unwrap()
            .history()
            .unwrap()
            .unwrap();
        assert_eq!((h.size, h.ttl.as_secs()), (100, 300));
        assert!(h.patterns.matches("orders:7") && !h.patterns.matches("other"));
    }

    #[test]
    fn compression_is_on_by_default_and_can_be_turned_off() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.compression, Switch::On);
        assert_eq!(
            cfg.compression_threshold_bytes,
            DEFAULT_COMPRESSION_THRESHOLD_BYTES
        );
        let cfg = parse(&["--compression", "off", "--compression-threshold-bytes", "0"]).unwrap();
        assert_eq!(cfg.compression, Switch::Off);
        assert_eq!(cfg.compression_threshold_bytes, 0);
        assert!(parse(&["--compression", "maybe"]).is_err());
    }

    #[test]
    fn the_status_page_can_be_turned_off() {
        assert_eq!(
            parse(&["--status-page", "off"]).unwrap().status_page,
            Switch::Off
        );
        assert_eq!(
            parse(&["--status-page=on"]).unwrap().status_page,
            Switch::On
        );
        let err = parse(&["--status-page", "maybe"]).unwrap_err();
        assert!(err.contains("--status-page"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting_in_one_line() {
        let cases: &[(&[&str], &str)] = &[
            (&["--listen", "nope"], "--listen"),
            (&["--key-prefix", "a b"], "--key-prefix"),
            (&["--key-prefix", ""], "--key-prefix"),
            (&["--connect-timeout-ms", "0"], "--connect-timeout-ms"),
            (&["--connect-timeout-ms=-5"], "--connect-timeout-ms"),
            (&["--redis-url", "http://x"], "--redis-url"),
            (&["--redis-ca-file", "/ca.pem"], "--redis-ca-file"),
            (
                &["--redis-url", "redis://x", "--redis-ca-file", "/ca.pem"],
                "--redis-ca-file",
            ),
            (&["--api-key", "short"], "--api-key"),
            (&["--max-frame-bytes", "1"], "--max-frame-bytes"),
            (&["--drain-rate", "2000000"], "--drain-rate"),
            (&["--drain-rate=-1"], "--drain-rate"),
            (
                &["--max-topics-per-connection", "0"],
                "--max-topics-per-connection",
            ),
            (&["--outbound-queue-bytes", "10"], "--outbound-queue-bytes"),
            (&["--ws-path", "ws"], "--ws-path"),
            (&["--log", "[[["], "--log"),
            (&["--status-page", "yes"], "--status-page"),
            (&["--history-topics", "a b"], "--history-topics"),
            (&["--history-topics", "a*b"], "--history-topics"),
            (&["--history-size", "0"], "--history-size"),
            (&["--max-batch-messages", "0"], "--max-batch-messages"),
            (&["--max-batch-bytes", "10"], "--max-batch-bytes"),
            (&["--history-size", "100001"], "--history-size"),
            (&["--history-ttl-secs", "0"], "--history-ttl-secs"),
            (&["--history-ttl-secs", "604801"], "--history-ttl-secs"),
            (&["--allowed-origins", "example.com"], "--allowed-origins"),
            (
                &["--redis-sentinels", "127.0.0.1:26379"],
                "--redis-sentinels",
            ),
            (&["--redis-sentinel-master", "m"], "--redis-sentinel-master"),
            (
                &["--redis-sentinels", "nope", "--redis-sentinel-master", "m"],
                "--redis-sentinels",
            ),
            (&["--redis-cluster-nodes", "nope"], "--redis-cluster-nodes"),
            (&["--redis-cluster-nodes", "h:0"], "--redis-cluster-nodes"),
            (&["--redis-cluster-nodes", "a b:1"], "--redis-cluster-nodes"),
            (
                &[
                    "--redis-cluster-nodes",
                    "h:1",
                    "--redis-sentinels",
                    "h:2",
                    "--redis-sentinel-master",
                    "m",
                ],
                "--redis-cluster-nodes",
            ),
            (
                &[
                    "--redis-cluster-nodes",
                    "h:1",
                    "--socket-channels",
                    "per-socket",
                ],
                "--redis-cluster-nodes",
            ),
            (&["--no-such-flag"], "--no-such-flag"),
        ];
        for (args, setting) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(setting), "{args:?}: {err}");
            assert!(!err.contains('\n'), "{args:?}: {err}");
        }
    }
}
