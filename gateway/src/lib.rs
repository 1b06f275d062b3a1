//! wsgate: a WebSocket fan-out gateway.
//!
//! Clients connect over WebSocket, join topics and receive every message published to those
//! topics, whichever replica they are connected to. Backends publish over HTTP (or, embedded,
//! through [`Gateway`]). Replicas share messages through a [`broker::Broker`].
//!
//! Components:
//! - [`config`]: flags and environment twins, validated before anything binds.
//! - [`types`]: validated newtypes (`Topic`, `SocketId`, `KeyPrefix`, `Channel`).
//! - [`frame`]: the WebSocket wire format; frames are encoded once and shared.
//! - [`deflate`]: permessage-deflate: negotiation, compress once per message, bounded inflate.
//! - [`protocol`]: client commands and the envelopes sent to clients.
//! - [`hub`]: the local registry of connections and topic subscriptions, and the fan-out.
//! - [`outbox`]: each connection's bounded queue and single writer.
//! - [`conn`]: the WebSocket handshake and a connection's reader loop.
//! - [`broker`]: the broker seam and the in-process broker.
//! - [`history`]: message history (offsets, epochs) and recovery.
//! - [`api`]: HTTP routes (WebSocket, `/api/*`, metrics and probes).
//! - [`server`]: the accept loop.
//! - [`status_page`]: the built-in status page at `/`.
//! - [`metrics`]: Prometheus metrics.
//!
//! # Embedding
//!
//! Mount the gateway in your own axum application and use the handle from your code:
//!
//! ```no_run
//! use wsgate::{Config, Gateway, Message};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::parse_args(["wsgate", "--key-prefix", "myapp"])?;
//! let gateway = Gateway::start(config).await?;
//!
//! // /ws, /api/*, /metrics, /healthz and /readyz, next to your own routes.
//! let app = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "my app" }))
//!     .merge(gateway.router());
//!
//! let handle = gateway.clone();
//! tokio::spawn(async move {
//!     let _ = handle.publish("news", Message::text("hello")).await;
//!     let _ = handle.broadcast(Message::binary(vec![1u8, 2, 3])).await;
//!     println!("{} connections, {} on news", handle.connection_count(),
//!         handle.topic_subscriber_count("news"));
//! });
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod conn;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod history;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod server;
pub mod status_page;
pub mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use broker::{BrokerError, Message};
pub use config::Config;
pub use conn::{Connection, MessageHandler};
pub use error::{Error, Result};
pub use types::{Channel, KeyPrefix, SocketId, Topic, UserId};

use broker::Broker;
use broker::memory::MemoryBroker;
use hub::{Hub, HubLimits};
use metrics::Metrics;
use outbox::QueueLimits;

impl Message {
    /// A text message.
    pub fn text(s: impl Into<String>) -> Self {
        Message::Text(Bytes::from(s.into()))
    }

    /// A binary message.
    pub fn binary(b: impl Into<Bytes>) -> Self {
        Message::Binary(b.into())
    }
}

/// A running gateway: the registry, the broker and the routes. Cloning is cheap; every clone
/// is a handle on the same gateway.
#[derive(Clone)]
pub struct Gateway {
    hub: Hub,
    config: Arc<Config>,
    key_prefix: KeyPrefix,
    auth: Arc<auth::AuthSettings>,
    api_keys: Arc<auth::ApiKeys>,
    allowed_origins: Arc<auth::Origins>,
    background: Arc<tokio::task::JoinHandle<()>>,
    handler: Option<Arc<dyn MessageHandler>>,
}

impl Gateway {
    /// Validates `config`, starts the broker and the background sweeper.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad setting, [`Error::Broker`] when the broker cannot start.
    pub async fn start(config: Config) -> Result<Self> {
        config.validate()?;
        let key_prefix = config.key_prefix()?;
        let metrics = Metrics::new();
        let history = config.history()?;
        let auth = Arc::new(config.auth()?);
        let api_keys = Arc::new(config.api_keys()?);
        let allowed_origins = Arc::new(config.allowed_origins()?);
        let sentinel = config.sentinel();
        let cluster = config.cluster();
        let redis_url = match (&config.redis_url, sentinel.is_some() || cluster.is_some()) {
            (Some(url), _) => Some(url.clone()),
            // With Sentinel or a cluster the URL only carries credentials, database and TLS;
            // none here.
            (None, true) => Some("redis://127.0.0.1".to_owned()),
            (None, false) => None,
        };
        let broker: Arc<dyn Broker> = match &redis_url {
            None => Arc::new(MemoryBroker::new(metrics.broker.clone()).with_history(history)),
            Some(url) => {
                let ca_pem = match &config.redis_ca_file {
                    None => None,
                    Some(path) => Some(std::fs::read(path).map_err(|e| Error::Config {
                        setting: "--redis-ca-file (WSGATE_REDIS_CA_FILE)",
                        message: format!("cannot read {}: {e}", path.display()),
                    })?),
                };
                let settings = broker::redis::RedisSettings {
                    ca_pem,
                    history,
                    sentinel,
                    cluster,
                    url: url.clone(),
                    key_prefix: key_prefix.clone(),
                    socket_channels: config.socket_channels,
                    timeout: config.connect_timeout(),
                    // Base64 and JSON escaping can double a message; allow for it.
                    max_payload: config
                        .max_message_bytes
                        .saturating_mul(2)
                        .saturating_add(4096),
                };
                let redis = broker::redis::RedisBroker::new(
                    settings,
                    metrics.broker.clone(),
                    Some(metrics.clone()),
                )
                .map_err(|e| Error::Config {
                    setting: "--redis-url (WSGATE_REDIS_URL)",
                    message: e.to_string(),
                })?;
                Arc::new(redis)
            }
        };
        let limits = HubLimits {
            queue: QueueLimits {
                max_messages: config.outbound_queue_messages,
                max_bytes: config.outbound_queue_bytes,
            },
            max_topics_per_connection: config.max_topics_per_connection,
            max_connections: config.max_connections,
            compression_threshold: config.compression_threshold_bytes,
        };
        let hub = Hub::new(limits, broker.clone(), metrics);
        broker.start(Arc::new(hub.clone())).await?;
        let background = tokio::spawn(sweep_idle(hub.clone(), config.idle_timeout()));
        Ok(Self {
            hub,
            config: Arc::new(config),
            key_prefix,
            auth,
            api_keys,
            allowed_origins,
            background: Arc::new(background),
            handler: None,
        })
    }

    /// Makes WebSocket connections speak `handler`'s protocol instead of wsgate's: each
    /// complete text or binary message a client sends goes to the handler, which may answer on
    /// the same connection (see [`MessageHandler`]). Applies to the routers made afterwards.
    #[must_use]
    pub fn with_message_handler(mut self, handler: impl MessageHandler) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    fn conn_settings(&self) -> conn::ConnSettings {
        conn::ConnSettings {
            max_frame_bytes: self.config.max_frame_bytes,
            max_inbound_rate: self.config.max_inbound_rate,
            close_timeout: Duration::from_millis(self.config.close_timeout_ms),
            compression: self.config.compression.is_on(),
        }
    }

    /// Routes for clients and backends (WebSocket + `/api/*`) and, unless the configuration
    /// has a separate metrics address, `/metrics`, `/healthz` and `/readyz`.
    pub fn router(&self) -> axum::Router {
        let main = self.client_router();
        if self.config.metrics_listen.is_some() {
            main
        } else {
            main.merge(self.ops_router())
        }
    }

    /// Only the WebSocket route and `/api/*`.
    pub fn client_router(&self) -> axum::Router {
        let api = api::ApiSettings {
            api_keys: self.api_keys.clone(),
            allowed_origins: self.allowed_origins.clone(),
            allow_unauthenticated: self.config.api_allow_unauthenticated,
            max_message_bytes: self.config.max_message_bytes,
            max_batch_messages: self.config.max_batch_messages,
            max_batch_bytes: self.config.max_batch_bytes,
            ws_path: self.config.ws_path.clone(),
            auth: self.auth.clone(),
        };
        api::router(
            self.hub.clone(),
            api,
            self.conn_settings(),
            self.handler.clone(),
        )
    }

    /// The status page at `/` (empty when `--status-page off`, or when `--ws-path /` gives `/`
    /// to the WebSocket endpoint). [`serve_gateway`] mounts it on the main address;
    /// [`Gateway::router`] leaves it out, so that an application embedding the gateway keeps its
    /// own `/` (merge this router to add the page).
    pub fn status_router(&self) -> axum::Router {
        if self.config.status_page.is_on() && self.config.ws_path != "/" {
            status_page::router(&self.config.ws_path)
        } else {
            axum::Router::new()
        }
    }

    /// Only `/metrics`, `/healthz` and `/readyz`.
    pub fn ops_router(&self) -> axum::Router {
        api::ops_router(self.hub.clone())
    }

    /// The local registry.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Publishes to every subscriber of `topic` on every replica.
    ///
    /// # Errors
    /// [`Error::InvalidTopic`] for a bad topic; [`Error::Publish`] when the broker refused.
    pub async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let topic = Topic::new(topic).map_err(Error::InvalidTopic)?;
        Ok(self.hub.publish(&Channel::Topic(topic), message).await?)
    }

    /// Delivers to every connection on every replica.
    ///
    /// # Errors
    /// [`Error::Publish`] when the broker refused.
    pub async fn broadcast(&self, message: Message) -> Result<()> {
        Ok(self.hub.publish(&Channel::Broadcast, message).await?)
    }

    /// Delivers to one connection, wherever it is.
    ///
    /// # Errors
    /// [`Error::Publish`] when the broker refused.
    pub async fn send(&self, socket: SocketId, message: Message) -> Result<()> {
        Ok(self.hub.publish(&Channel::Socket(socket), message).await?)
    }

    /// Delivers to every connection of `user` (a verified token's `sub`), on every replica.
    ///
    /// # Errors
    /// [`Error::Publish`] when the broker refused.
    pub async fn send_to_user(&self, user: &UserId, message: Message) -> Result<()> {
        Ok(self
            .hub
            .publish(&Channel::User(user.clone()), message)
            .await?)
    }

    /// Closes every connection of `user`, on every replica (close 1000).
    ///
    /// # Errors
    /// [`Error::Publish`] when the broker refused.
    pub async fn disconnect_user(&self, user: &UserId) -> Result<()> {
        Ok(self
            .hub
            .publish(&Channel::User(user.clone()), Message::Disconnect)
            .await?)
    }

    /// Publishes many messages at once — to topics, to everyone ([`Channel::Broadcast`]) or to
    /// single connections — sent to the broker together (with Redis: pipelined on one
    /// connection, in order). Each gets its own answer, in the same order: `Ok` means the
    /// broker accepted that message.
    pub async fn publish_batch(&self, items: Vec<(Channel, Message)>) -> Vec<Result<()>> {
        self.hub
            .publish_batch(items)
            .await
            .into_iter()
            .map(|r| r.map_err(Error::from))
            .collect()
    }

    /// Subscribes a local connection to `topic`.
    ///
    /// # Errors
    /// [`Error::InvalidTopic`], [`Error::NotConnected`], or [`Error::TooManyTopics`].
    pub fn subscribe(&self, socket: SocketId, topic: &str) -> Result<()> {
        let topic = Topic::new(topic).map_err(Error::InvalidTopic)?;
        let conn = self
            .hub
            .connection(socket)
            .ok_or(Error::NotConnected(socket))?;
        self.hub
            .join(&conn, &topic)
            .map_err(|_| Error::TooManyTopics)?;
        Ok(())
    }

    /// Unsubscribes a local connection from `topic`.
    ///
    /// # Errors
    /// [`Error::InvalidTopic`] or [`Error::NotConnected`].
    pub fn unsubscribe(&self, socket: SocketId, topic: &str) -> Result<()> {
        let topic = Topic::new(topic).map_err(Error::InvalidTopic)?;
        let conn = self
            .hub
            .connection(socket)
            .ok_or(Error::NotConnected(socket))?;
        self.hub.leave(&conn, &topic);
        Ok(())
    }

    /// Unsubscribes a local connection from every topic it joined.
    ///
    /// # Errors
    /// [`Error::NotConnected`].
    pub fn unsubscribe_all(&self, socket: SocketId) -> Result<usize> {
        let conn = self
            .hub
            .connection(socket)
            .ok_or(Error::NotConnected(socket))?;
        Ok(self.hub.leave_all(&conn))
    }

    /// Whether `socket` is connected to this instance.
    pub fn is_connected(&self, socket: SocketId) -> bool {
        self.hub.connection(socket).is_some()
    }

    /// Connections on this instance.
    pub fn connection_count(&self) -> usize {
        self.hub.connection_count()
    }

    /// Local subscribers of `topic` (0 for an invalid topic).
    pub fn topic_subscriber_count(&self, topic: &str) -> usize {
        Topic::new(topic).map_or(0, |t| self.hub.subscriber_count(&t))
    }

    /// The broker key prefix.
    pub fn key_prefix(&self) -> &KeyPrefix {
        &self.key_prefix
    }

    /// The broker connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.config.connect_timeout()
    }

    /// Drains and stops: readiness fails and upgrades are refused at once; after a third of
    /// the drain window, connections are closed with 1001 spread over the next third — or, with
    /// a drain rate, at that rate from the start; returns when all are closed or the window has
    /// passed, after stopping the broker.
    pub async fn shutdown(&self) {
        let window = self.config.drain_timeout();
        let deadline = tokio::time::Instant::now() + window;
        self.hub.start_draining();
        tracing::info!(
            connections = self.hub.connection_count(),
            ?window,
            "draining"
        );
        let all_closed = async {
            while self.hub.connection_count() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let drain = async {
            if self.hub.connection_count() > 0 {
                match self.config.drain_rate {
                    0 => {
                        tokio::time::sleep(window / 3).await;
                        self.hub.close_all_spread(window / 3).await;
                    }
                    // Paced: the last close leaves a tenth of the window (at most 2 s) for
                    // the close handshakes.
                    rate => {
                        let margin = (window / 10).min(Duration::from_secs(2));
                        self.hub.close_all_paced(rate, deadline - margin).await;
                    }
                }
            }
            all_closed.await;
        };
        if tokio::time::timeout_at(deadline, drain).await.is_err() {
            tracing::warn!(
                left = self.hub.connection_count(),
                "drain window over; exiting"
            );
        }
        self.background.abort();
        self.hub.broker().stop().await;
    }
}

async fn sweep_idle(hub: Hub, idle: Option<Duration>) {
    let Some(idle) = idle else { return };
    let mut tick =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let n = hub.close_idle(idle);
        if n > 0 {
            tracing::debug!(closed = n, "closed idle connections");
        }
    }
}

/// Runs a gateway on `listener` until `shutdown` resolves, then drains and returns.
///
/// # Errors
/// [`Error`] when the configuration is invalid or the broker cannot start.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let gateway = Gateway::start(config).await?;
    serve_gateway(gateway, listener, None, shutdown).await
}

/// Runs an already started gateway on `listener` (and `/metrics` + probes on
/// `metrics_listener`, when given) until `shutdown` resolves, then drains.
///
/// # Errors
/// Currently infallible once started; kept fallible for future listeners.
pub async fn serve_gateway(
    gateway: Gateway,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    // The status page stays on the main address even when the probes have their own.
    let main_router = gateway.client_router().merge(gateway.status_router());
    let (main_router, ops) = match metrics_listener {
        Some(l) => (main_router, Some((l, gateway.ops_router()))),
        None => (main_router.merge(gateway.ops_router()), None),
    };
    let mut tasks = vec![tokio::spawn(server::accept_loop(
        listener,
        main_router,
        stop_rx.clone(),
    ))];
    if let Some((l, router)) = ops {
        tasks.push(tokio::spawn(server::accept_loop(l, router, stop_rx)));
    }
    shutdown.await;
    gateway.shutdown().await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
