//! The Redis broker: cluster-wide fan-out over Redis pub/sub.
//!
//! Two connections, as in the seed: a publisher (PUBLISH) and a dedicated subscriber
//! (SUBSCRIBE/UNSUBSCRIBE + receive). Channels are `{prefix}:{topic}`,
//! `{prefix}:__broadcast__`, and for direct messages `{prefix}:__direct__:{tag}` — one per
//! replica, whose socket ids start with its 32-bit tag — and, with
//! [`SocketChannels::PerSocket`], the seed's `{prefix}:__socket__:{id}` per connection too.
//!
//! A direct message goes to the channel the mode prefers (the replica's, or the socket's) and,
//! when Redis reports no receiver there, to the other: so wsgate replicas in either mode and
//! seed instances reach each other's connections, while a fleet of per-replica wsgate
//! replicas subscribes nothing per connection.
//!
//! Subscriptions are level-triggered: the hub records which channels are *wanted* (first/last
//! local subscriber edges), and one subscriber task converges Redis to that set — SUBSCRIBE what
//! is wanted and not active, UNSUBSCRIBE what is active and no longer wanted — so any
//! interleaving of joins, leaves and disconnects ends with exactly the wanted channels. When the
//! connection is lost, or a command is not answered in time (a frozen Redis), the connection is
//! dropped and a fresh one resubscribes the wanted set in batches: Redis forgets a closed
//! connection's subscriptions, so nothing is orphaned and nothing is missed.
//!
//! History topics (DESIGN §9) append to a stream, `{prefix}:__history__:{topic}`, and publish
//! in one Lua script, which also keeps the topic's position (`{prefix}:__history_meta__:{topic}`:
//! its epoch and last offset) so that every message gets the next offset. The subscriber keeps,
//! per history channel, the last position it delivered; after a reconnect, before it delivers
//! anything live, it reads each stream from there and delivers what it missed ("gap fill"),
//! dropping live messages whose position it already delivered.
//!
//! Replicas announce themselves on `{prefix}:__replicas__` twice a second, and at once when
//! their subscriber is back after a reconnect. A replica that lost Redis refuses to publish,
//! once it is back, until every replica it heard from before the outage has announced itself
//! again (or [`BARRIER_MAX`] has passed): otherwise a message accepted while another replica is
//! still resubscribing would silently miss that replica's clients.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use redis::aio::{MultiplexedConnection, PubSubSink};
use redis::{AsyncConnectionConfig, RedisError};
use serde_json::json;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant as Deadline;

use super::{BoxFuture, Broker, BrokerError, Message, Sink, wire};

mod cluster;
use crate::config::SocketChannels;
use crate::history::{
    HistorySettings, Position, Recovery, RecoveryFailure, Since, Snapshot, new_epoch, valid_epoch,
};
use crate::metrics::{BrokerMetrics, DropReason, Metrics};
use crate::types::{Channel, DIRECT_TOPIC_PREFIX, KeyPrefix, SocketId, Topic};
pub use cluster::{SLOTS, SlotMap, slot_of};

/// Most channels in one SUBSCRIBE/UNSUBSCRIBE.
pub const BATCH: usize = 1000;
/// SUBSCRIBE attempts before a channel is marked failed (it is retried later, never dropped).
pub const SUBSCRIBE_ATTEMPTS: u32 = 3;
/// How often channels whose subscribe failed are retried while connected.
const FAILED_RETRY: Duration = Duration::from_secs(5);
/// How often a replica announces itself.
const HEARTBEAT: Duration = Duration::from_millis(500);
/// A replica not heard from for this long is presumed gone.
const PEER_TTL: Duration = Duration::from_secs(2);
/// Longest a replica back from a Redis outage waits for the others before publishing anyway.
pub const BARRIER_MAX: Duration = Duration::from_secs(3);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_millis(250);

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// Channel namespace.
    pub key_prefix: KeyPrefix,
    /// How direct messages reach a connection's replica.
    pub socket_channels: SocketChannels,
    /// Connect and command timeout.
    pub timeout: Duration,
    /// Largest payload accepted from Redis.
    pub max_payload: usize,
    /// PEM root certificates for `rediss://` (default: the system's).
    pub ca_pem: Option<Vec<u8>>,
    /// Topics that keep a history, and how much of it.
    pub history: Option<HistorySettings>,
    /// Find the master through Redis Sentinel instead of connecting to `url`'s host (whose
    /// user, password, database and TLS setting still apply).
    pub sentinel: Option<SentinelSettings>,
    /// Use a Redis Cluster with sharded pub/sub (`url` then supplies only the user, password
    /// and TLS setting).
    pub cluster: Option<ClusterSettings>,
}

/// Redis Cluster: where to ask for the slot map first.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `host:port` of some nodes of the cluster.
    pub nodes: Vec<String>,
}

/// Redis Sentinel: where the sentinels are and which master they watch.
#[derive(Debug, Clone)]
pub struct SentinelSettings {
    /// `host:port` of each sentinel.
    pub sentinels: Vec<String>,
    /// The master's name (`sentinel monitor <name> …`).
    pub master: String,
}

/// Where connections go: one server, or the current master of a Sentinel-watched group,
/// asked for again on every connect (so a reconnect after a failover finds the new master).
enum Target {
    Direct(redis::Client),
    Sentinel {
        sentinel: tokio::sync::Mutex<redis::sentinel::Sentinel>,
        master: String,
        node: redis::sentinel::SentinelNodeConnectionInfo,
        /// `host:port` of each sentinel (for `+switch-master`).
        addrs: Vec<String>,
    },
    /// A Redis Cluster: see [`cluster`].
    Cluster,
}

/// How much longer than its messages a topic's position (epoch and last offset) is kept, so
/// that a client caught up with a topic that went quiet still recovers (with nothing to send)
/// after the messages themselves expired.
const POSITION_TTL_FACTOR: u32 = 10;
/// History streams read at a time during a gap fill.
const GAP_FILL_CONCURRENCY: usize = 32;
/// History streams measured per `wsgate_history_bytes` update.
const MEASURED_STREAMS: usize = 1000;
/// Heartbeats between two `wsgate_history_bytes` updates (the first comes after two).
const MEASURE_EVERY: u32 = 10;

/// Appends one message to a topic's history and publishes it, in one atomic step. Trimming by
/// age costs about a third of the script, so it runs every 16th message only: a message may
/// outlive the TTL by 15 messages (the stream itself expires TTL after its last message).
/// KEYS: the stream, the position hash. ARGV: the channel, the envelope without its closing
/// brace, messages kept, ms kept, ms the position is kept, a fresh epoch (used when the
/// position is missing or not one we wrote).
const APPEND_AND_PUBLISH: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local last = redis.call('HGET', KEYS[2], 'offset')
if not epoch or #epoch > 64 or not string.match(epoch, '^[%w_%-]+$')
   or (last and not string.match(last, '^%d+$')) then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
local envelope = ARGV[2] .. ',"offset":' .. string.format('%d', offset) .. ',"epoch":"' .. epoch .. '"}'
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'o', offset, 'm', envelope)
if offset % 16 == 0 then
  local now = redis.call('TIME')
  local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[4])
  if cutoff > 0 then
    redis.call('XTRIM', KEYS[1], 'MINID', cutoff)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[1], envelope)
return offset
"#;

/// Reads a topic's position and its newest messages: those after ARGV[1] when ARGV[2] is the
/// current epoch, else (unless ARGV[4] is 1) the whole history; at most ARGV[3]. KEYS: the
/// stream, the position.
/// Answers `{}` when there is no position, else `{epoch, offset, entries newest first}`.
const READ_HISTORY: &str = r#"
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'offset')
if not meta[1] then
  return {}
end
local want = tonumber(ARGV[3])
if meta[1] == ARGV[2] then
  local behind = (tonumber(meta[2]) or 0) - tonumber(ARGV[1])
  if behind < want then
    want = behind
  end
elseif ARGV[4] == '1' then
  want = 0
end
local entries = {}
if want > 0 then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', want)
end
return {meta[1], meta[2] or '0', entries}
"#;

/// The last position delivered on a history channel, or read when it was subscribed.
#[derive(Debug, Clone)]
struct Cursor {
    position: Position,
    /// Delivered (later copies are duplicates), not merely read as the starting point.
    delivered: bool,
}

#[derive(Default)]
struct ChanState {
    /// A local subscriber exists.
    wanted: bool,
    /// Redis confirmed the SUBSCRIBE on the current connection.
    active: bool,
    /// SUBSCRIBE failed after every attempt; retried on reconnect and periodically.
    failed: bool,
    /// Join acknowledgements waiting for `active`.
    waiters: Vec<oneshot::Sender<Result<(), BrokerError>>>,
    /// The topic, when it keeps a history.
    history: Option<Topic>,
    /// Where delivery stands on a history channel (for the gap fill after a reconnect).
    cursor: Option<Cursor>,
    /// Cluster: the masters that confirmed the subscription (one, but two while a slot
    /// moves).
    on: Vec<Arc<str>>,
}

impl ChanState {
    /// Nothing left to track: not wanted, not subscribed, nobody waiting.
    fn is_idle(&self) -> bool {
        !self.wanted && !self.active && self.waiters.is_empty()
    }
}

#[derive(Default)]
struct State {
    channels: HashMap<String, ChanState>,
    /// Channels changed since the last sync pass.
    dirty: HashSet<String>,
    /// Channels with `active` set.
    active: usize,
    sink: Option<Arc<dyn Sink>>,
    /// Cluster: channels changed since each master's subscriber last looked.
    shard_dirty: HashMap<Arc<str>, HashSet<String>>,
    /// Cluster: the masters whose subscriber is connected.
    shards_up: HashSet<Arc<str>>,
}

/// The publisher connection's state.
///
/// Every publish has its own deadline, `timeout` after it arrived, and is answered by then
/// whatever the others do: nothing waits on a lock held across a connect or a command. A
/// PUBLISH left unanswered means Redis may be frozen or cut off; the connection is then
/// declared broken, so later publishes fail fast (503: not sent) instead of queueing behind
/// the unresponsive server, while one background task reconnects.
#[derive(Clone)]
enum PubConn {
    /// Not connected (why, for the error): the next publish connects, and waits for it
    /// within its own deadline.
    Closed(Arc<str>),
    /// A connect is under way; publishes wait for it within their own deadline.
    Connecting,
    /// Connected; the number tells connections apart, so that a late failure of an old one
    /// cannot break its replacement.
    Ready(Conn, u64),
    /// A PUBLISH went unanswered: publishes fail fast until the background reconnect succeeds.
    Broken,
}

/// The publisher's connection: to one server, or to a whole cluster (the redis crate's
/// cluster connection, which routes each command to its slot's master).
#[derive(Clone)]
enum Conn {
    Node(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
    /// The cluster connection, sending pipelines to the master of this slot (whatever
    /// slots their commands name: commands of slots it does not serve are answered MOVED).
    Routed(redis::cluster_async::ClusterConnection, u16),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) | Conn::Routed(c, _) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Routed(c, slot) => {
                let route = redis::cluster_routing::SingleNodeRoutingInfo::SpecificNode(
                    redis::cluster_routing::Route::new(
                        *slot,
                        redis::cluster_routing::SlotAddr::Master,
                    ),
                );
                Box::pin(c.route_pipeline(pipeline.clone(), offset, count, route))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) | Conn::Routed(c, _) => c.get_db(),
        }
    }
}

/// What a replica knows of the others.
#[derive(Default)]
struct Peers {
    last_seen: HashMap<uuid::Uuid, Instant>,
    /// Replicas alive when our subscriber went down, not heard from since it came back.
    waiting_for: HashSet<uuid::Uuid>,
    /// Until when publishing waits for them (`None`: until this replica is back in touch
    /// with Redis, when the wait starts).
    deadline: Option<Instant>,
    /// The question of the current wait: only an answer carrying it clears a replica, so an
    /// announcement sent before the outage and delivered after it cannot.
    nonce: Option<u64>,
    /// Questions other replicas asked us, answered in our next announcement.
    acks_owed: Vec<u64>,
}

/// Most unanswered questions kept (one per replica that came back recently).
const MAX_ACKS_OWED: usize = 64;

struct Inner {
    target: Target,
    /// Redis Cluster: the slot map and the shard subscribers.
    cluster: Option<cluster::Cluster>,
    /// `PUBLISH`, or `SPUBLISH` in a cluster.
    publish_cmd: &'static str,
    /// This replica's id on the replicas channel.
    replica: uuid::Uuid,
    /// The first 32 bits of this replica's socket ids, naming its direct channel.
    tag: u32,
    /// Also a channel per connection (the seed's), besides the replica's direct channel.
    per_socket: bool,
    peers: std::sync::Mutex<Peers>,
    announce: Notify,
    /// The next announcement asks the others to answer (a wait for them just started).
    ask_back: AtomicBool,
    prefix: String,
    timeout: Duration,
    max_payload: usize,
    metrics: BrokerMetrics,
    gateway_metrics: Option<Metrics>,
    state: Mutex<State>,
    wake: Notify,
    stop: Notify,
    /// Sentinel: the sentinels named another master; the subscriber reconnects.
    switched: Notify,
    stopped: AtomicBool,
    up: AtomicBool,
    /// The publisher connection; every publish reads it, only connects and failures change it.
    publisher: watch::Sender<PubConn>,
    last_warning_ms: AtomicU64,
    history: Option<HistorySettings>,
    append_script: redis::Script,
    read_script: redis::Script,
}

/// Cluster-wide broker over Redis pub/sub.
pub struct RedisBroker {
    inner: Arc<Inner>,
    task: Mutex<Option<JoinHandle<()>>>,
    heartbeat: Mutex<Option<JoinHandle<()>>>,
    /// Sentinel: the `+switch-master` listener.
    watcher: Mutex<Option<JoinHandle<()>>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `100 ms × 2^(attempt-1) × random(0.5..1.5)`.
pub fn subscribe_retry_delay(attempt: u32) -> Duration {
    let base = 100.0 * f64::from(1u32 << attempt.saturating_sub(1).min(16));
    Duration::from_secs_f64(base * rand::rng().random_range(0.5..1.5) / 1000.0)
}

/// Capped exponential backoff with full jitter around the middle: never above the cap.
pub fn reconnect_delay(failures: u32) -> Duration {
    let exp = BACKOFF_MIN.as_secs_f64() * f64::from(1u32 << failures.min(16));
    let capped = exp.min(BACKOFF_CAP.as_secs_f64());
    Duration::from_secs_f64(capped * rand::rng().random_range(0.5..1.0))
}

impl RedisBroker {
    /// A stopped broker for `settings`.
    ///
    /// # Errors
    /// [`BrokerError::Setup`] when the URL cannot be parsed.
    pub fn new(
        settings: RedisSettings,
        metrics: BrokerMetrics,
        gateway_metrics: Option<Metrics>,
    ) -> Result<Self, BrokerError> {
        let client = match &settings.ca_pem {
            None => redis::Client::open(settings.url.as_str()),
            Some(pem) => redis::Client::build_with_tls(
                settings.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
        }
        .map_err(|e| BrokerError::Setup(format!("invalid Redis URL or TLS settings: {e}")))?;
        let cluster = match settings.cluster {
            None => None,
            Some(c) => {
                if settings.socket_channels == SocketChannels::PerSocket {
                    return Err(BrokerError::Setup(
                        "per-socket channels are for seed instances, which cannot use a Redis Cluster's sharded pub/sub".into(),
                    ));
                }
                Some(
                    cluster::Cluster::new(
                        c.nodes,
                        client.get_connection_info().clone(),
                        settings.ca_pem.clone(),
                        settings.timeout,
                    )
                    .map_err(|e| {
                        BrokerError::Setup(format!("invalid Redis Cluster settings: {e}"))
                    })?,
                )
            }
        };
        let target = match settings.sentinel {
            None if cluster.is_some() => Target::Cluster,
            None => Target::Direct(client),
            Some(_) if cluster.is_some() => {
                return Err(BrokerError::Setup(
                    "Redis Sentinel and Redis Cluster exclude each other".into(),
                ));
            }
            Some(s) => {
                let info = client.get_connection_info();
                let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(info.redis_settings().clone());
                if let redis::ConnectionAddr::TcpTls { insecure, .. } = info.addr() {
                    node = node.set_tls_mode(if *insecure {
                        redis::TlsMode::Insecure
                    } else {
                        redis::TlsMode::Secure
                    });
                }
                let sentinels: Vec<String> = s
                    .sentinels
                    .iter()
                    .map(|hp| format!("redis://{hp}"))
                    .collect();
                let sentinel = redis::sentinel::Sentinel::build(sentinels)
                    .map_err(|e| BrokerError::Setup(format!("invalid --redis-sentinels: {e}")))?;
                Target::Sentinel {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    master: s.master,
                    node,
                    addrs: s.sentinels,
                }
            }
        };
        let publish_cmd = if cluster.is_some() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let append_script = if cluster.is_some() {
            redis::Script::new(&APPEND_AND_PUBLISH.replace("'PUBLISH'", "'SPUBLISH'"))
        } else {
            redis::Script::new(APPEND_AND_PUBLISH)
        };
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                cluster,
                publish_cmd,
                replica: uuid::Uuid::new_v4(),
                tag: rand::random(),
                per_socket: settings.socket_channels == SocketChannels::PerSocket,
                peers: std::sync::Mutex::default(),
                announce: Notify::new(),
                ask_back: AtomicBool::new(false),
                prefix: format!("{}:", settings.key_prefix),
                timeout: settings.timeout,
                max_payload: settings.max_payload,
                metrics,
                gateway_metrics,
                state: Mutex::default(),
                wake: Notify::new(),
                stop: Notify::new(),
                switched: Notify::new(),
                stopped: AtomicBool::new(false),
                up: AtomicBool::new(false),
                publisher: watch::Sender::new(PubConn::Closed("not connected yet".into())),
                last_warning_ms: AtomicU64::new(0),
                history: settings.history,
                append_script,
                read_script: redis::Script::new(READ_HISTORY),
            }),
            task: Mutex::new(None),
            heartbeat: Mutex::new(None),
            watcher: Mutex::new(None),
        })
    }

    /// The Redis channel for a gateway channel.
    pub fn channel_name(&self, channel: &Channel) -> String {
        self.inner.channel_name(channel)
    }
}

impl Inner {
    fn channel_name(&self, channel: &Channel) -> String {
        self.name_for(&channel.topic_name())
    }

    /// The Redis channel of a seed topic name: `{prefix}:{topic}`, or in a cluster
    /// `{prefix}:{<topic>}`, whose hash tag puts the topic's channel and history in one slot.
    fn name_for(&self, topic_name: &str) -> String {
        if self.cluster.is_some() {
            format!("{}{{{topic_name}}}", self.prefix)
        } else {
            format!("{}{topic_name}", self.prefix)
        }
    }

    /// The seed topic name of a Redis channel, when it is in our namespace.
    fn topic_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let rest = name.strip_prefix(&self.prefix)?;
        if self.cluster.is_some() {
            rest.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(rest)
        }
    }

    /// The direct channel of the replica whose socket ids start with `tag`.
    fn direct_channel(&self, tag: u32) -> String {
        self.name_for(&format!("{DIRECT_TOPIC_PREFIX}{tag:08x}"))
    }

    /// The Redis channel whose subscription a local channel needs: its own, except that a
    /// connection's direct messages arrive on the replica's channel unless per-socket.
    fn subscribed_name(&self, channel: &Channel) -> Option<String> {
        match channel {
            Channel::Socket(_) if !self.per_socket => None,
            _ => Some(self.channel_name(channel)),
        }
    }

    /// Where a direct message to `id` is published first, and where again when nobody
    /// received it there.
    fn direct_routes(&self, id: SocketId) -> (String, Option<String>) {
        let replica = self.direct_channel(id.tag());
        if self.cluster.is_some() {
            // No seed instance shares sharded pub/sub: only wsgate replicas to reach.
            return (replica, None);
        }
        let socket = self.channel_name(&Channel::Socket(id));
        if self.per_socket {
            (socket, Some(replica))
        } else {
            (replica, Some(socket))
        }
    }

    /// A client for the server to connect to now: the configured one, or the master the
    /// sentinels name at this moment.
    async fn client(&self) -> Result<redis::Client, RedisError> {
        match &self.target {
            Target::Direct(client) => Ok(client.clone()),
            // The cluster code connects each node itself.
            Target::Cluster => Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a cluster has no single server",
            ))),
            Target::Sentinel {
                sentinel,
                master,
                node,
                ..
            } => {
                let mut sentinel = sentinel.lock().await;
                sentinel.async_master_for(master, Some(node)).await
            }
        }
    }

    /// Marks `name` changed: for the subscriber, or in a cluster for the masters concerned
    /// (collected in `wake`).
    fn mark_dirty(&self, st: &mut State, name: String, wake: &mut Vec<Arc<str>>) {
        if self.cluster.is_some() {
            self.route_dirty(st, &name, wake);
        } else {
            st.dirty.insert(name);
        }
    }

    /// Wakes whoever acts on the channels just marked (once the state lock is released).
    fn wake_after(self: &Arc<Self>, wake: Vec<Arc<str>>) {
        if self.cluster.is_some() {
            self.wake_shards(wake);
        } else {
            self.wake.notify_one();
        }
    }

    /// Sentinel: listens for `+switch-master` on one sentinel after another. When the watched
    /// master changes, the subscriber and the publisher reconnect at once, to the master the
    /// sentinels now name, instead of staying on the old one until a command times out there
    /// (an idle subscriber on a frozen, not dead, master would never notice). Ends when the
    /// broker stops (the task is aborted).
    async fn watch_switches(self: Arc<Self>, addrs: Vec<String>, master: String) {
        let mut failures: u32 = 0;
        for addr in addrs.iter().cycle() {
            let listen = async {
                let mut pubsub = redis::Client::open(format!("redis://{addr}"))?
                    .get_async_pubsub()
                    .await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, RedisError>(pubsub)
            };
            let pubsub = match tokio::time::timeout(self.timeout, listen).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::debug!(sentinel = %addr, error = %e, "cannot listen to a sentinel");
                    failures += 1;
                    tokio::time::sleep(reconnect_delay(failures)).await;
                    continue;
                }
                Err(_) => {
                    failures += 1;
                    tokio::time::sleep(reconnect_delay(failures)).await;
                    continue;
                }
            };
            failures = 0;
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                // `<master name> <old ip> <old port> <new ip> <new port>`
                let payload = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                if payload.split(' ').next() == Some(master.as_str()) {
                    tracing::info!(sentinel = %addr, switch = %payload.chars().take(200).collect::<String>(), "the sentinels switched masters; reconnecting");
                    self.master_switched();
                }
            }
            tracing::debug!(sentinel = %addr, "lost the sentinel connection; listening to the next");
        }
    }

    /// The sentinels named another master: drop both connections to the old one.
    fn master_switched(&self) {
        self.publisher.send_if_modified(|st| {
            let ready = matches!(st, PubConn::Ready(..));
            if ready {
                *st = PubConn::Closed("the sentinels switched masters; reconnecting".into());
            }
            ready
        });
        self.switched.notify_waiters();
    }

    fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::AcqRel);
        self.metrics.up.set(i64::from(up));
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if was && !up {
            // Remember who was alive when we lost Redis: they must be back before we publish.
            Self::wait_for_alive(&mut peers, now, PEER_TTL);
        } else if !was && up {
            drop(peers);
            self.start_waiting();
        }
    }

    /// Adds the replicas heard from within `within` to those publishing must wait for; the
    /// wait itself starts with [`Inner::start_waiting`].
    fn wait_for_alive(peers: &mut Peers, now: Instant, within: Duration) {
        let alive: Vec<uuid::Uuid> = peers
            .last_seen
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) < within)
            .map(|(id, _)| *id)
            .collect();
        peers.waiting_for.extend(alive);
        peers.deadline = None;
        // A question nobody has been asked yet: nothing clears them before we ask.
        peers.nonce = Some(rand::rng().random());
    }

    /// Back in touch with Redis: ask the replicas we wait for to answer (each does once its
    /// own subscriber is up and resubscribed), for at most [`BARRIER_MAX`].
    fn start_waiting(&self) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.deadline = Some(Instant::now() + BARRIER_MAX);
        peers.nonce = Some(rand::rng().random());
        drop(peers);
        self.ask_back.store(true, Ordering::Release);
        self.announce.notify_one();
    }

    /// A PUBLISH went unanswered: Redis may be frozen, and another replica's subscriber may be
    /// dropping its connection meanwhile, to resubscribe on a new one once Redis is back. A
    /// message published before it has resubscribed would miss its clients, so once our
    /// publisher is back, publishing waits for the replicas alive lately to answer, as after
    /// an outage of our own.
    fn suspect_outage(&self) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        Self::wait_for_alive(&mut peers, Instant::now(), PEER_TTL + self.timeout);
    }

    fn replicas_channel(&self) -> String {
        self.name_for(crate::types::REPLICAS_TOPIC)
    }

    /// A replica announced itself: `{"replica":"<uuid>"}`.
    fn on_announce(&self, payload: &[u8]) -> Result<(), wire::Rejection> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Announce {
            replica: String,
            /// Sent by a replica whose subscriber just came back: others answer at once.
            #[serde(default)]
            back: bool,
            /// With `back`: the question the answers must carry.
            #[serde(default)]
            nonce: Option<u64>,
            /// Answers to questions of replicas that came back.
            #[serde(default)]
            acks: Vec<u64>,
        }
        if payload.len() > 2048 {
            return Err(wire::Rejection::TooLarge(payload.len()));
        }
        let a: Announce = serde_json::from_slice(payload)
            .map_err(|e| wire::Rejection::Malformed(e.to_string()))?;
        let id = uuid::Uuid::try_parse(&a.replica)
            .map_err(|_| wire::Rejection::Malformed("replica id is not a UUID".into()))?;
        if id != self.replica {
            let now = Instant::now();
            let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            let known = peers.last_seen.insert(id, now).is_some();
            // While we wait with a question, only its answer counts: an announcement
            // queued in a frozen Redis says nothing of the replica's state now.
            let answered = peers.nonce.is_none_or(|n| a.acks.contains(&n));
            if answered {
                peers.waiting_for.remove(&id);
            }
            if a.back
                && let Some(n) = a.nonce
                && !peers.acks_owed.contains(&n)
                && peers.acks_owed.len() < MAX_ACKS_OWED
            {
                peers.acks_owed.push(n);
            }
            peers
                .last_seen
                .retain(|_, seen| now.duration_since(*seen) < PEER_TTL * 10);
            drop(peers);
            // A replica that just came back, or one we did not know, learns of us at once.
            if a.back || !known {
                self.announce.notify_one();
            }
        }
        Ok(())
    }

    /// Other replicas heard from lately.
    fn replicas_seen(&self) -> usize {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        peers
            .last_seen
            .values()
            .filter(|seen| now.duration_since(**seen) < PEER_TTL)
            .count()
    }

    /// Why publishing must wait, if it must.
    fn barrier(&self) -> Option<usize> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.waiting_for.is_empty() {
            return None;
        }
        if peers.deadline.is_some_and(|d| Instant::now() >= d) {
            // They did not come back in time: presumed gone.
            peers.waiting_for.clear();
            return None;
        }
        Some(peers.waiting_for.len())
    }

    /// Announces this replica (only while its subscriber is up).
    async fn run_heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announced_up = false;
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if self.history.is_some() && ticks % MEASURE_EVERY == 2 && self.up.load(Ordering::Acquire) {
                        self.measure_history().await;
                    }
                }
                () = self.announce.notified() => {}
            }
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            let up = self.up.load(Ordering::Acquire);
            if up {
                // The first announcement after coming up, or after a wait for the others
                // started, asks them to answer at once.
                let asked = self.ask_back.swap(false, Ordering::AcqRel);
                let (back, nonce, acks) = {
                    let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
                    // While we wait, every announcement repeats the question: a replica
                    // whose subscriber was down when we first asked never heard it.
                    let waiting = peers.deadline.is_some() && !peers.waiting_for.is_empty();
                    let back = !announced_up || asked || waiting;
                    let nonce = if back { peers.nonce } else { None };
                    (back, nonce, std::mem::take(&mut peers.acks_owed))
                };
                // Sent only while our subscriber is up: an answer means "I receive again".
                let mut announcement = json!({"replica": self.replica.to_string(), "back": back});
                if let Some(n) = nonce {
                    announcement["nonce"] = json!(n);
                }
                if !acks.is_empty() {
                    announcement["acks"] = json!(acks);
                }
                let payload = announcement.to_string().into_bytes();
                // After an outage the publisher connection is usually stale: the first
                // attempt drops it, the second reconnects.
                let mut sent = false;
                for _ in 0..2 {
                    let deadline = Deadline::now() + self.timeout;
                    let attempt = self.send(self.replicas_channel(), payload.clone(), deadline);
                    if attempt.await.is_ok() {
                        sent = true;
                        break;
                    }
                }
                if sent {
                    announced_up = true;
                } else {
                    // Ask and answer again next time.
                    if asked {
                        self.ask_back.store(true, Ordering::Release);
                    }
                    let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
                    for n in acks {
                        if !peers.acks_owed.contains(&n) && peers.acks_owed.len() < MAX_ACKS_OWED {
                            peers.acks_owed.push(n);
                        }
                    }
                }
            } else {
                announced_up = false;
            }
        }
    }

    /// Warns at most once a second (hostile traffic must not flood the logs).
    fn warn_rejected(&self, channel: &str, why: &wire::Rejection) {
        let now = crate::protocol::now_ms();
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let channel: String = channel.chars().take(80).collect();
            tracing::warn!(%channel, reason = %why, "dropped a Redis payload");
        }
    }

    fn on_message(&self, msg: &redis::Msg) {
        let name = msg.get_channel_name();
        let reject = |why: wire::Rejection| {
            self.metrics.rejected.inc();
            if let Some(m) = &self.gateway_metrics {
                m.dropped(DropReason::InvalidPayload, 1);
            }
            self.warn_rejected(name, &why);
        };
        let topic_name = self.topic_of(name);
        if topic_name == Some(crate::types::REPLICAS_TOPIC) {
            if let Err(why) = self.on_announce(msg.get_payload_bytes()) {
                reject(why);
            }
            return;
        }
        let Some(topic_name) = topic_name else {
            return reject(wire::Rejection::Malformed(
                "channel outside our prefix".into(),
            ));
        };
        if topic_name.starts_with(DIRECT_TOPIC_PREFIX) {
            // Only our own direct channel is ever subscribed.
            return match wire::decode_direct(self.tag, msg.get_payload_bytes(), self.max_payload) {
                Ok((id, envelope)) => {
                    let sink = lock(&self.state).sink.clone();
                    if let Some(sink) = sink {
                        sink.deliver(&Channel::Socket(id), envelope.message, None);
                    }
                }
                Err(why) => reject(why),
            };
        }
        let Ok(channel) = Channel::from_topic_name(topic_name) else {
            return reject(wire::Rejection::Malformed(
                "channel is not a valid topic".into(),
            ));
        };
        match wire::decode(topic_name, msg.get_payload_bytes(), self.max_payload) {
            Ok(envelope) => {
                // A position delivered already (by the gap fill) is not delivered again.
                if let Some(p) = &envelope.position
                    && !self.advance(name, p)
                {
                    return;
                }
                let sink = lock(&self.state).sink.clone();
                if let Some(sink) = sink {
                    sink.deliver(&channel, envelope.message, envelope.position.as_ref());
                }
            }
            Err(why) => reject(why),
        }
    }

    /// Marks every channel inactive (the connection is gone) and updates the gauge.
    fn all_inactive(&self) {
        let mut st = lock(&self.state);
        st.channels.retain(|_, c| {
            c.active = false;
            c.waiters.retain(|w| !w.is_closed());
            c.wanted || !c.waiters.is_empty()
        });
        st.active = 0;
        self.metrics.channels.set(0);
    }

    /// Converges Redis to the wanted set. With `full`, every channel is considered (after a
    /// reconnect, or to retry failed ones); otherwise only channels changed since the last
    /// pass, so a burst of joins costs work in proportion to the burst, not to all channels.
    /// `Err` means the connection is unusable.
    async fn sync(self: &Arc<Self>, sink: &mut PubSubSink, full: bool) -> Result<(), RedisError> {
        let mut full = full;
        loop {
            let (subscribe, unsubscribe) = {
                let mut st = lock(&self.state);
                let names: Vec<String> = if full {
                    st.dirty.clear();
                    st.channels.keys().cloned().collect()
                } else {
                    st.dirty.drain().collect()
                };
                let mut sub = Vec::new();
                let mut unsub = Vec::new();
                for name in names {
                    let Some(c) = st.channels.get(&name) else {
                        continue;
                    };
                    if c.wanted && !c.active && (full || !c.failed) {
                        sub.push(name);
                    } else if !c.wanted && c.active {
                        unsub.push(name);
                    }
                }
                (sub, unsub)
            };
            full = false;
            if subscribe.is_empty() && unsubscribe.is_empty() {
                return Ok(());
            }
            for batch in unsubscribe.chunks(BATCH) {
                tokio::time::timeout(self.timeout, sink.unsubscribe(batch))
                    .await
                    .map_err(|_| timeout_error())??;
                let mut st = lock(&self.state);
                for name in batch {
                    if let Some(c) = st.channels.get_mut(name)
                        && c.active
                    {
                        c.active = false;
                        st.active -= 1;
                    }
                    if st.channels.get(name).is_some_and(ChanState::is_idle) {
                        st.channels.remove(name);
                    }
                }
                self.metrics.channels.set(st.active as i64);
            }
            if self.history.is_some() {
                self.read_starting_points(&subscribe).await;
            }
            for batch in subscribe.chunks(BATCH) {
                self.subscribe_batch(sink, batch).await?;
            }
        }
    }

    async fn subscribe_batch(
        &self,
        sink: &mut PubSubSink,
        batch: &[String],
    ) -> Result<(), RedisError> {
        let mut attempt = 1;
        loop {
            match tokio::time::timeout(self.timeout, sink.subscribe(batch)).await {
                Err(_) => return Err(timeout_error()),
                Ok(Ok(())) => {
                    let mut st = lock(&self.state);
                    let mut activated = 0;
                    for name in batch {
                        // Recorded from Redis's confirmation even when the channel's record
                        // is gone — its last subscriber left while the SUBSCRIBE was in
                        // flight (for seconds, under a frozen Redis): otherwise nothing would
                        // ever unsubscribe it.
                        let c = st.channels.entry(name.clone()).or_default();
                        if !c.active {
                            c.active = true;
                            activated += 1;
                        }
                        c.failed = false;
                        for w in c.waiters.drain(..) {
                            let _ = w.send(Ok(()));
                        }
                        // Left while we subscribed: the next pass unsubscribes it.
                        if !c.wanted {
                            st.dirty.insert(name.clone());
                        }
                    }
                    st.active += activated;
                    self.metrics.channels.set(st.active as i64);
                    return Ok(());
                }
                Ok(Err(e)) if is_connection_error(&e) => return Err(e),
                Ok(Err(e)) if attempt < SUBSCRIBE_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "SUBSCRIBE refused; retrying");
                    tokio::time::sleep(subscribe_retry_delay(attempt)).await;
                    attempt += 1;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, channels = batch.len(), "SUBSCRIBE failed after {SUBSCRIBE_ATTEMPTS} attempts; will retry");
                    self.metrics.subscribe_failures.inc_by(batch.len() as u64);
                    let mut st = lock(&self.state);
                    for name in batch {
                        if let Some(c) = st.channels.get_mut(name) {
                            c.failed = true;
                            for w in c.waiters.drain(..) {
                                let _ = w.send(Err(BrokerError::Unavailable(format!(
                                    "Redis refused SUBSCRIBE: {e}"
                                ))));
                            }
                        }
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The subscriber task: connect, resubscribe, receive and reconcile; reconnect on loss.
    async fn run_subscriber(self: Arc<Self>, first_up: oneshot::Sender<()>) {
        let mut first_up = Some(first_up);
        let mut failures: u32 = 0;
        let mut connected_before = false;
        while !self.stopped.load(Ordering::Acquire) {
            let connect = async { self.client().await?.get_async_pubsub().await };
            let pubsub = match tokio::time::timeout(self.timeout, connect).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "Redis subscriber connect failed");
                    failures += 1;
                    if self.pause(reconnect_delay(failures)).await {
                        break;
                    }
                    continue;
                }
                Err(_) => {
                    tracing::debug!("Redis subscriber connect timed out");
                    failures += 1;
                    if self.pause(reconnect_delay(failures)).await {
                        break;
                    }
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            if let Err(e) = self.sync(&mut sink, true).await {
                tracing::warn!(error = %e, "Redis resubscribe failed; reconnecting");
                self.all_inactive();
                failures += 1;
                if self.pause(reconnect_delay(failures)).await {
                    break;
                }
                continue;
            }
            if connected_before {
                self.metrics.reconnects.inc();
                tracing::info!("Redis subscriber reconnected and resubscribed");
                // Before anything live (it waits in `stream`): what this replica missed.
                if self.history.is_some() {
                    self.gap_fill(None, None).await;
                }
            }
            connected_before = true;
            failures = 0;
            self.set_up(true);
            if let Some(tx) = first_up.take() {
                let _ = tx.send(());
            }
            let mut retry = tokio::time::interval(FAILED_RETRY);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            retry.tick().await;
            let lost = loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(m) => self.on_message(&m),
                        None => break "connection closed",
                    },
                    () = self.switched.notified() => break "the sentinels switched masters",
                    () = self.wake.notified() => {
                        if let Err(e) = self.sync(&mut sink, false).await {
                            tracing::warn!(error = %e, "Redis subscribe/unsubscribe failed");
                            break "command failed";
                        }
                    }
                    _ = retry.tick() => {
                        if let Err(e) = self.sync(&mut sink, true).await {
                            tracing::warn!(error = %e, "Redis subscribe retry failed");
                            break "command failed";
                        }
                    }
                    () = self.stop.notified() => {
                        let active: Vec<String> = lock(&self.state).channels.iter().filter(|(_, c)| c.active).map(|(n, _)| n.clone()).collect();
                        for batch in active.chunks(BATCH) {
                            let _ = tokio::time::timeout(self.timeout, sink.unsubscribe(batch)).await;
                        }
                        break "stopped";
                    }
                }
            };
            self.set_up(false);
            self.all_inactive();
            if lost != "stopped" {
                tracing::warn!(
                    reason = lost,
                    "lost the Redis subscriber connection; reconnecting"
                );
            }
        }
        self.set_up(false);
        self.all_inactive();
    }

    /// Sleeps unless stopped first; returns true when stopped.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => self.stopped.load(Ordering::Acquire),
            () = self.stop.notified() => true,
        }
    }

    /// The publisher connection, connecting first if there is none; `Err` (nothing sent) when
    /// it is broken, the connect fails, or `deadline` passes first.
    async fn publisher(self: &Arc<Self>, deadline: Deadline) -> Result<(Conn, u64), BrokerError> {
        let mut start = false;
        self.publisher.send_if_modified(|st| {
            start = matches!(st, PubConn::Closed(_));
            if start {
                *st = PubConn::Connecting;
            }
            start
        });
        if start {
            tokio::spawn(self.clone().connect_publisher(false));
        }
        let mut rx = self.publisher.subscribe();
        let settled = tokio::time::timeout_at(
            deadline,
            rx.wait_for(|st| !matches!(st, PubConn::Connecting)),
        )
        .await;
        let state = match settled {
            Ok(Ok(st)) => st.clone(),
            Ok(Err(_)) => return Err(BrokerError::Stopped),
            Err(_) => {
                return Err(BrokerError::Unavailable(
                    "Redis connect did not finish in time".into(),
                ));
            }
        };
        match state {
            PubConn::Ready(conn, id) => Ok((conn, id)),
            PubConn::Broken => Err(BrokerError::Unavailable(
                "Redis did not answer a recent PUBLISH in time; reconnecting".into(),
            )),
            PubConn::Closed(why) => Err(BrokerError::Unavailable(why.to_string())),
            PubConn::Connecting => Err(BrokerError::Unavailable("Redis connect pending".into())),
        }
    }

    /// Connects the publisher. In the background (after a connection was declared broken) it
    /// keeps trying, with backoff, until it succeeds or the broker stops; otherwise one failed
    /// attempt leaves the state `Closed` and the next publish tries again.
    async fn connect_publisher(self: Arc<Self>, background: bool) {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut failures = 0;
        loop {
            if self.stopped.load(Ordering::Acquire) {
                self.publisher
                    .send_replace(PubConn::Closed("broker stopped".into()));
                return;
            }
            let connect = async {
                if let Some(cluster) = &self.cluster {
                    return cluster
                        .client
                        .get_async_connection()
                        .await
                        .map(Conn::Cluster);
                }
                self.client()
                    .await?
                    .get_multiplexed_async_connection_with_config(&self.connection_config())
                    .await
                    .map(Conn::Node)
            };
            let attempt = tokio::time::timeout(self.timeout, connect).await;
            let why = match attempt {
                Ok(Ok(_)) if self.stopped.load(Ordering::Acquire) => {
                    // Stopped while connecting: leave nothing open behind `stop`.
                    self.publisher
                        .send_replace(PubConn::Closed("broker stopped".into()));
                    return;
                }
                Ok(Ok(mut conn)) => {
                    if self.history.is_some() {
                        // Loaded now, so that a batch of history publishes is not split by
                        // NOSCRIPT answers (and the first publish needs no second trip).
                        let load = async {
                            self.append_script.load_async(&mut conn).await?;
                            self.read_script.load_async(&mut conn).await
                        };
                        if let Err(e) = tokio::time::timeout(self.timeout, load)
                            .await
                            .unwrap_or_else(|_| Err(timeout_error()))
                        {
                            tracing::debug!(error = %e, "could not load the history scripts yet");
                        }
                    }
                    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                    self.publisher.send_replace(PubConn::Ready(conn, id));
                    if background {
                        // Back after an unanswered PUBLISH: see `suspect_outage`.
                        self.start_waiting();
                    }
                    return;
                }
                Ok(Err(e)) => format!("Redis unreachable: {e}"),
                Err(_) => "Redis connect timed out".to_owned(),
            };
            if !background {
                self.publisher.send_replace(PubConn::Closed(why.into()));
                return;
            }
            tracing::debug!(reason = %why, "Redis publisher reconnect failed");
            failures += 1;
            if self.pause(reconnect_delay(failures)).await {
                self.publisher
                    .send_replace(PubConn::Closed("broker stopped".into()));
                return;
            }
        }
    }

    /// Records that connection `id` failed: broken (fail fast and reconnect in the background)
    /// after a timeout, closed (reconnect on the next publish) after any other error.
    fn publisher_failed(self: &Arc<Self>, id: u64, timed_out: bool, why: &str) {
        let replaced = self.publisher.send_if_modified(|st| {
            if !matches!(st, PubConn::Ready(_, current) if *current == id) {
                return false; // already replaced or being replaced
            }
            *st = if timed_out {
                PubConn::Broken
            } else {
                PubConn::Closed(why.into())
            };
            true
        });
        if replaced && timed_out {
            tracing::warn!("Redis did not answer a PUBLISH in time; reconnecting the publisher");
            self.suspect_outage();
            tokio::spawn(self.clone().connect_publisher(true));
        }
    }

    /// Why publishing must be refused now, if it must.
    fn refuse_publish(&self) -> Option<BrokerError> {
        if self.stopped.load(Ordering::Acquire) {
            return Some(BrokerError::Stopped);
        }
        // While this instance cannot receive, its own subscribers would miss the message:
        // refuse rather than answer success for something that is not delivered.
        if !self.up.load(Ordering::Acquire) {
            return Some(BrokerError::Unavailable(
                "not connected to Redis (reconnecting)".into(),
            ));
        }
        self.barrier().map(|n| {
            BrokerError::Unavailable(format!(
                "back from a Redis outage; waiting for {n} other replica(s) to resubscribe"
            ))
        })
    }

    /// Publishes `payload` on `channel`; with a `fallback`, publishes it there too when Redis
    /// reports that nobody received it on `channel` (a direct message, see
    /// [`Inner::direct_routes`]).
    async fn publish(
        self: Arc<Self>,
        channel: String,
        payload: Vec<u8>,
        fallback: Option<String>,
    ) -> Result<(), BrokerError> {
        // The publish's own deadline, counted from its arrival: it is answered by then.
        let deadline = Deadline::now() + self.timeout;
        if let Some(e) = self.refuse_publish() {
            return Err(e);
        }
        let Some(fallback) = fallback else {
            return self.send(channel, payload, deadline).await.map(drop);
        };
        if self.send(channel, payload.clone(), deadline).await? == 0 {
            self.send(fallback, payload, deadline).await?;
        }
        Ok(())
    }

    /// Appends to `topic`'s history and publishes, in one script (see [`APPEND_AND_PUBLISH`]).
    async fn publish_history(
        self: Arc<Self>,
        channel: String,
        topic: Topic,
        head: Vec<u8>,
    ) -> Result<(), BrokerError> {
        let deadline = Deadline::now() + self.timeout;
        if let Some(e) = self.refuse_publish() {
            return Err(e);
        }
        let Some(cmd) = self.append_command(&topic, &channel, head) else {
            return Err(BrokerError::Setup("no history settings".into()));
        };
        let offset: u64 = self
            .run(deadline, "history append", async |mut conn| {
                match cmd.query_async(&mut conn).await {
                    Err(e) if e.code() == Some("NOSCRIPT") => {
                        self.append_script.load_async(&mut conn).await?;
                        cmd.query_async(&mut conn).await
                    }
                    other => other,
                }
            })
            .await?;
        tracing::trace!(%channel, offset, "published with history");
        Ok(())
    }

    /// The `EVALSHA` of [`APPEND_AND_PUBLISH`] for one message of `topic` (`None` without
    /// history settings).
    fn append_command(&self, topic: &Topic, channel: &str, head: Vec<u8>) -> Option<redis::Cmd> {
        let settings = self.history.as_ref()?;
        let (stream, position) = self.history_keys(topic);
        let ttl_ms = settings.ttl.as_millis().max(1) as u64;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.append_script.get_hash())
            .arg(2)
            .arg(stream)
            .arg(position)
            .arg(channel)
            .arg(head)
            .arg(settings.size)
            .arg(ttl_ms)
            .arg(ttl_ms.saturating_mul(u64::from(POSITION_TTL_FACTOR)))
            .arg(&*new_epoch());
        Some(cmd)
    }

    /// Publishes `commands` (PUBLISH or the history script, one per message, with the slot
    /// of its channel) in one pipeline: one write, one round trip, executed in order. Each
    /// gets its own answer; when the pipeline is not answered by the deadline, every item is
    /// a `Timeout` (Redis may have run some of them: the outcome is unknown). An item with a
    /// fallback (a direct message) is published again there, in a second pipeline, when
    /// nobody received it. In a cluster, one pipeline per slot (a pipeline may not cross
    /// slots), all at once: each keeps its messages' order, which is per topic.
    async fn publish_pipeline(
        self: Arc<Self>,
        commands: Vec<(u16, redis::Cmd, Option<redis::Cmd>)>,
    ) -> Vec<Result<(), BrokerError>> {
        let deadline = Deadline::now() + self.timeout;
        let n = commands.len();
        if let Some(e) = self.refuse_publish() {
            return vec![Err(e); n];
        }
        let inner: &Inner = &self;
        let answers: Vec<Result<redis::Value, RedisError>> = match self
            .run(deadline, "pipelined publish", async |mut conn| {
                if inner.cluster.is_none() {
                    return inner.pipeline_once(&mut conn, &commands).await;
                }
                // One pipeline per master (as the last slot map read says), sent to the
                // master of its first item's slot.
                let map = inner.cluster().map();
                let mut groups: HashMap<Option<Arc<str>>, Vec<usize>> = HashMap::new();
                for (i, (slot, _, _)) in commands.iter().enumerate() {
                    let owner = map.as_ref().and_then(|m| m.owner(*slot)).cloned();
                    groups.entry(owner).or_default().push(i);
                }
                let Conn::Cluster(cluster_conn) = &conn else {
                    return inner.pipeline_once(&mut conn, &commands).await;
                };
                let runs = groups.into_values().map(|indexes| {
                    let hint = commands[indexes[0]].0;
                    let mut routed = Conn::Routed(cluster_conn.clone(), hint);
                    let mut plain = conn.clone();
                    let group: Vec<(u16, redis::Cmd, Option<redis::Cmd>)> =
                        indexes.iter().map(|i| commands[*i].clone()).collect();
                    async move {
                        let mut answers = inner.pipeline_once(&mut routed, &group).await;
                        // Items of slots that master does not serve (the map was stale, or a
                        // slot is moving): again one by one, in order, where the cluster
                        // connection finds their master. The items of one topic share a slot,
                        // so its order holds.
                        if let Ok(answers) = &mut answers {
                            for (k, answer) in answers.iter_mut().enumerate() {
                                if matches!(answer, Err(e) if is_redirect(e)) {
                                    *answer = inner
                                        .pipeline_once(&mut plain, &group[k..=k])
                                        .await
                                        .and_then(|mut a| a.pop().ok_or_else(timeout_error))
                                        .unwrap_or_else(Err);
                                }
                            }
                        }
                        (indexes, answers)
                    }
                });
                let mut answers: Vec<Result<redis::Value, RedisError>> =
                    vec![Err(timeout_error()); n];
                for (indexes, result) in futures_util::future::join_all(runs).await {
                    match result {
                        Ok(group) => {
                            for (i, a) in indexes.into_iter().zip(group) {
                                answers[i] = a;
                            }
                        }
                        Err(e) => {
                            for i in indexes {
                                answers[i] = Err(e.clone());
                            }
                        }
                    }
                }
                Ok(answers)
            })
            .await
        {
            Ok(a) => a,
            Err(e) => return vec![Err(e); n],
        };
        let mut out: Vec<Result<(), BrokerError>> = answers
            .into_iter()
            .map(|a| {
                a.map(drop).map_err(|e| {
                    if e.is_timeout() {
                        BrokerError::Timeout
                    } else {
                        BrokerError::Unavailable(format!("Redis refused: {e}"))
                    }
                })
            })
            .collect();
        out.resize(
            n,
            Err(BrokerError::Unavailable("no answer from Redis".into())),
        );
        out
    }

    /// Runs `commands` as one pipeline on `conn` (see [`Inner::publish_pipeline`]): loads the
    /// history script again and reruns the items Redis refused for the lack of it, then
    /// publishes the direct messages nobody received on their fallback channel.
    async fn pipeline_once(
        &self,
        conn: &mut Conn,
        commands: &[(u16, redis::Cmd, Option<redis::Cmd>)],
    ) -> Result<Vec<Result<redis::Value, RedisError>>, RedisError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (_, c, _) in commands {
            pipe.add_command(c.clone());
        }
        let mut answers: Vec<Result<redis::Value, RedisError>> = pipe.query_async(conn).await?;
        // The script is loaded on connect; if Redis lost it meanwhile, load it and run
        // again, in order, the items it refused (no other item of their topics ran).
        let refused: Vec<usize> = (0..answers.len())
            .filter(|i| matches!(&answers[*i], Err(e) if e.code() == Some("NOSCRIPT")))
            .collect();
        if !refused.is_empty() {
            self.append_script.load_async(conn).await?;
            let mut again = redis::pipe();
            again.ignore_errors();
            for i in &refused {
                again.add_command(commands[*i].1.clone());
            }
            let retried: Vec<Result<redis::Value, RedisError>> = again.query_async(conn).await?;
            for (i, r) in refused.into_iter().zip(retried) {
                answers[i] = r;
            }
        }
        // Direct messages nobody received on their first channel, in order.
        let unheard: Vec<usize> = (0..answers.len())
            .filter(|i| {
                commands.get(*i).is_some_and(|(_, _, f)| f.is_some())
                    && matches!(answers[*i], Ok(redis::Value::Int(0)))
            })
            .collect();
        if !unheard.is_empty() {
            let mut again = redis::pipe();
            again.ignore_errors();
            for i in &unheard {
                if let Some((_, _, Some(fallback))) = commands.get(*i) {
                    again.add_command(fallback.clone());
                }
            }
            let sent: Vec<Result<redis::Value, RedisError>> = again.query_async(conn).await?;
            for (i, r) in unheard.into_iter().zip(sent) {
                answers[i] = r;
            }
        }
        Ok(answers)
    }

    /// PUBLISH without the readiness checks, answered by `deadline`: `Unavailable` when
    /// nothing was sent, `Timeout` when it was sent and not answered in time.
    async fn send(
        self: &Arc<Self>,
        channel: String,
        payload: Vec<u8>,
        deadline: Deadline,
    ) -> Result<i64, BrokerError> {
        let receivers: i64 = self
            .run(deadline, self.publish_cmd, async |mut conn| {
                redis::cmd(self.publish_cmd)
                    .arg(&channel)
                    .arg(payload)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        tracing::trace!(%channel, receivers, "published");
        Ok(receivers)
    }

    /// Runs `command` on the publisher connection, answered by `deadline`: `Unavailable` when
    /// nothing was sent, `Timeout` when it was sent and not answered in time (the connection
    /// is then declared broken, see [`Inner::publisher_failed`]).
    async fn run<T>(
        self: &Arc<Self>,
        deadline: Deadline,
        what: &str,
        command: impl AsyncFnOnce(Conn) -> Result<T, RedisError>,
    ) -> Result<T, BrokerError> {
        let (conn, id) = self.publisher(deadline).await?;
        let result = tokio::time::timeout_at(deadline, command(conn))
            .await
            .unwrap_or_else(|_| Err(timeout_error()));
        match result {
            Ok(v) => Ok(v),
            Err(e) if e.is_timeout() => {
                self.publisher_failed(id, true, "");
                Err(BrokerError::Timeout)
            }
            Err(e) => {
                // Any other failure may leave the connection unusable: start fresh next time.
                let why = format!("Redis {what} failed: {e}");
                self.publisher_failed(id, false, &why);
                Err(BrokerError::Unavailable(why))
            }
        }
    }

    /// The stream and position keys of `topic`'s history.
    fn history_keys(&self, topic: &Topic) -> (String, String) {
        if self.cluster.is_some() {
            // The topic is the hash tag, as in its channel: one slot for all three.
            return (
                format!("{}__history__:{{{topic}}}", self.prefix),
                format!("{}__history_meta__:{{{topic}}}", self.prefix),
            );
        }
        (
            format!("{}__history__:{topic}", self.prefix),
            format!("{}__history_meta__:{topic}", self.prefix),
        )
    }

    /// Reads `topic`'s history: its position, and the messages after `after` when that is in
    /// the current epoch (else all it keeps).
    async fn read_history(
        self: &Arc<Self>,
        topic: &Topic,
        after: Option<&Position>,
        read: Read,
        deadline: Deadline,
    ) -> Result<Snapshot, BrokerError> {
        let Some(settings) = &self.history else {
            return Ok(Snapshot::default());
        };
        let (stream, position) = self.history_keys(topic);
        let mut invocation = self.read_script.prepare_invoke();
        invocation
            .key(stream)
            .key(position)
            .arg(after.map_or(0, |p| p.offset))
            .arg(after.map_or("", |p| &*p.epoch))
            .arg(if read == Read::PositionOnly {
                0
            } else {
                settings.size
            })
            .arg(if read == Read::SameEpochOnly {
                "1"
            } else {
                "0"
            });
        // After an outage the publisher connection is usually stale: the first attempt drops
        // it, the second reconnects (both within the same deadline).
        let mut attempt = 0;
        let value: redis::Value = loop {
            attempt += 1;
            match self
                .run(deadline, "history read", async |mut conn| {
                    invocation.invoke_async(&mut conn).await
                })
                .await
            {
                Err(BrokerError::Unavailable(e)) if attempt < 2 => {
                    tracing::debug!(error = %e, "history read failed; retrying on a fresh connection");
                    continue;
                }
                other => break other?,
            }
        };
        let channel_topic = Channel::Topic(topic.clone()).topic_name();
        parse_history(&channel_topic, value, self.max_payload).map_err(|why| {
            self.metrics.rejected.inc();
            self.warn_rejected(&channel_topic, &why);
            BrokerError::Unavailable(format!("unreadable history: {why}"))
        })
    }
}

/// What a history read asks for besides the position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Nothing else.
    PositionOnly,
    /// The messages after the given position, if it is in the current epoch.
    SameEpochOnly,
    /// Those messages, or the whole history when the epoch changed.
    AnyEpoch,
}

/// Parses [`READ_HISTORY`]'s answer. Every entry is the envelope that was published, checked
/// like any payload from Redis; entries of another epoch, or out of order, make it unreadable.
fn parse_history(
    channel_topic: &str,
    value: redis::Value,
    max_payload: usize,
) -> Result<Snapshot, wire::Rejection> {
    use redis::Value;
    let bad = |what: &str| wire::Rejection::Malformed(format!("history: {what}"));
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            _ => None,
        }
    };
    let Value::Array(parts) = value else {
        return Err(bad("not an array"));
    };
    let [epoch, offset, entries] = match <[Value; 3]>::try_from(parts) {
        Ok(p) => p,
        Err(p) if p.is_empty() => return Ok(Snapshot::default()),
        Err(_) => return Err(bad("wrong shape")),
    };
    let epoch = text(&epoch)
        .filter(|e| valid_epoch(e))
        .ok_or_else(|| bad("bad epoch"))?;
    let top = text(&offset)
        .and_then(|o| o.parse::<u64>().ok())
        .ok_or_else(|| bad("bad offset"))?;
    let Value::Array(entries) = entries else {
        return Err(bad("entries not an array"));
    };
    let mut out = Vec::with_capacity(entries.len());
    // Newest first: walk backwards for offset order.
    for entry in entries.into_iter().rev() {
        let Value::Array(id_fields) = entry else {
            return Err(bad("entry not an array"));
        };
        let Some(Value::Array(fields)) = id_fields.into_iter().nth(1) else {
            return Err(bad("entry without fields"));
        };
        let payload = fields
            .chunks(2)
            .find(|kv| text(&kv[0]).as_deref() == Some("m"))
            .and_then(|kv| match kv.get(1) {
                Some(Value::BulkString(b)) => Some(b.clone()),
                _ => None,
            })
            .ok_or_else(|| bad("entry without a message"))?;
        let envelope = wire::decode(channel_topic, &payload, max_payload)?;
        let Some(p) = envelope.position else {
            return Err(bad("entry without a position"));
        };
        if *p.epoch != *epoch || p.offset > top || out.last().is_some_and(|(o, _)| *o >= p.offset) {
            return Err(bad("entries out of order or of another epoch"));
        }
        out.push((p.offset, envelope.message));
    }
    Ok(Snapshot {
        top: (top > 0).then(|| Position {
            offset: top,
            epoch: epoch.into(),
        }),
        entries: out,
    })
}

impl Inner {
    /// Whether a positioned message on `name` is new; if so it is recorded as delivered.
    fn advance(&self, name: &str, position: &Position) -> bool {
        let mut st = lock(&self.state);
        let Some(c) = st.channels.get_mut(name) else {
            return true;
        };
        if let Some(cur) = &c.cursor
            && cur.delivered
            && !position.is_after(&cur.position)
        {
            return false;
        }
        c.cursor = Some(Cursor {
            position: position.clone(),
            delivered: true,
        });
        true
    }

    /// Before history channels are first subscribed, reads where their topics stand: after a
    /// reconnect, the gap fill starts there if nothing was delivered meanwhile.
    async fn read_starting_points(self: &Arc<Self>, names: &[String]) {
        let targets: Vec<(String, Topic)> = {
            let st = lock(&self.state);
            names
                .iter()
                .filter_map(|n| {
                    let c = st.channels.get(n)?;
                    if c.cursor.is_some() {
                        return None;
                    }
                    Some((n.clone(), c.history.clone()?))
                })
                .collect()
        };
        for chunk in targets.chunks(GAP_FILL_CONCURRENCY) {
            let deadline = Deadline::now() + self.timeout;
            let reads = futures_util::future::join_all(
                chunk
                    .iter()
                    .map(|(_, t)| self.read_history(t, None, Read::PositionOnly, deadline)),
            )
            .await;
            let mut st = lock(&self.state);
            for ((name, _), read) in chunk.iter().zip(reads) {
                let Ok(snapshot) = read else {
                    tracing::debug!(channel = %name, "could not read a history position before subscribing");
                    continue;
                };
                if let Some(c) = st.channels.get_mut(name)
                    && c.cursor.is_none()
                {
                    // No history yet: everything of the epoch to come is after this point.
                    let position = snapshot.top.unwrap_or(Position {
                        offset: 0,
                        epoch: "".into(),
                    });
                    c.cursor = Some(Cursor {
                        position,
                        delivered: false,
                    });
                }
            }
        }
    }

    /// After a reconnect and before anything live: delivers, from each local history topic's
    /// stream, what was published after the last position delivered here, in order. In a
    /// cluster, for the channels subscribed on one master (`shard`), or `only` some of them.
    async fn gap_fill(self: &Arc<Self>, shard: Option<&Arc<str>>, only: Option<&HashSet<String>>) {
        let Some(sink) = lock(&self.state).sink.clone() else {
            return;
        };
        let targets: Vec<(String, Topic, Position)> = {
            let st = lock(&self.state);
            st.channels
                .iter()
                .filter(|(_, c)| c.wanted && c.active)
                .filter(|(_, c)| shard.is_none_or(|a| c.on.contains(a)))
                .filter(|(n, _)| only.is_none_or(|o| o.contains(*n)))
                .filter_map(|(n, c)| {
                    Some((
                        n.clone(),
                        c.history.clone()?,
                        c.cursor.as_ref()?.position.clone(),
                    ))
                })
                .collect()
        };
        let history = &self.metrics.history;
        for chunk in targets.chunks(GAP_FILL_CONCURRENCY) {
            let deadline = Deadline::now() + self.timeout;
            let reads =
                futures_util::future::join_all(chunk.iter().map(|(_, t, from)| {
                    self.read_history(t, Some(from), Read::AnyEpoch, deadline)
                }))
                .await;
            for ((name, topic, from), read) in chunk.iter().zip(reads) {
                let snapshot = match read {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%topic, error = %e, "could not read the history to fill the gap of an outage");
                        history.gap_fill_failures.inc();
                        continue;
                    }
                };
                // No position: nothing was published since the history was lost.
                let Some(top) = snapshot.top else { continue };
                let first = if top.epoch == from.epoch {
                    from.offset + 1
                } else {
                    1
                };
                let missed: Vec<(u64, Message)> = snapshot
                    .entries
                    .into_iter()
                    .filter(|(o, _)| *o >= first)
                    .collect();
                let whole = top.offset < first
                    || (missed.first().is_some_and(|(o, _)| *o == first)
                        && missed.len() as u64 == top.offset + 1 - first);
                if !whole {
                    tracing::warn!(%topic, "part of what was published during the outage is no longer in the history");
                    history.gap_fill_failures.inc();
                }
                let channel = Channel::Topic(topic.clone());
                for (offset, message) in missed {
                    let p = Position {
                        offset,
                        epoch: top.epoch.clone(),
                    };
                    if self.advance(name, &p) {
                        history.gap_filled.inc();
                        sink.deliver(&channel, message, Some(&p));
                    }
                }
            }
        }
    }

    /// Updates `wsgate_history_bytes`: what the streams of this replica's history topics take
    /// in Redis (`MEMORY USAGE`, for at most [`MEASURED_STREAMS`] of them).
    async fn measure_history(self: &Arc<Self>) {
        let keys: Vec<String> = {
            let st = lock(&self.state);
            st.channels
                .values()
                .filter(|c| c.wanted)
                .filter_map(|c| c.history.as_ref())
                .take(MEASURED_STREAMS)
                .map(|t| self.history_keys(t).0)
                .collect()
        };
        if keys.is_empty() {
            self.metrics.history.bytes.set(0);
            return;
        }
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.cmd("MEMORY").arg("USAGE").arg(k);
        }
        let deadline = Deadline::now() + self.timeout;
        let sizes: Result<Vec<Option<i64>>, _> = self
            .run(deadline, "MEMORY USAGE", async |mut conn| {
                if self.cluster.is_none() {
                    return pipe.query_async(&mut conn).await;
                }
                // The streams live on different masters: one command each, all at once.
                let each = keys.iter().map(|k| {
                    let mut conn = conn.clone();
                    async move {
                        redis::cmd("MEMORY")
                            .arg("USAGE")
                            .arg(k)
                            .query_async::<Option<i64>>(&mut conn)
                            .await
                    }
                });
                futures_util::future::join_all(each)
                    .await
                    .into_iter()
                    .collect()
            })
            .await;
        if let Ok(sizes) = sizes {
            self.metrics
                .history
                .bytes
                .set(sizes.into_iter().flatten().sum());
        }
    }
}

fn timeout_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

/// MOVED or ASK: the command's slot is served elsewhere.
fn is_redirect(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask)
    )
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn start(&self, sink: Arc<dyn Sink>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let rx = {
                let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
                if task.is_some() {
                    return Ok(());
                }
                {
                    let mut st = lock(&self.inner.state);
                    st.sink = Some(sink);
                    // The channels every replica keeps: the announcements, and its direct
                    // messages.
                    for name in [
                        self.inner.replicas_channel(),
                        self.inner.direct_channel(self.inner.tag),
                    ] {
                        st.channels.entry(name.clone()).or_default().wanted = true;
                        st.dirty.insert(name);
                    }
                }
                self.inner.stopped.store(false, Ordering::Release);
                *self
                    .heartbeat
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some(tokio::spawn(self.inner.clone().run_heartbeat()));
                if let Target::Sentinel { addrs, master, .. } = &self.inner.target {
                    *self.watcher.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(tokio::spawn(
                            self.inner
                                .clone()
                                .watch_switches(addrs.clone(), master.clone()),
                        ));
                }
                let (tx, rx) = oneshot::channel();
                if self.inner.cluster.is_some() {
                    self.inner.start_cluster(tx);
                    // A handle that ends with the broker (`stop` stops the cluster tasks).
                    let inner = self.inner.clone();
                    *task = Some(tokio::spawn(async move {
                        let mut stopped = inner.cluster().stop_signal();
                        let _ = stopped.wait_for(|s| *s).await;
                    }));
                } else {
                    *task = Some(tokio::spawn(self.inner.clone().run_subscriber(tx)));
                }
                rx
            };
            // Wait briefly for the first connection; if Redis is not there yet the gateway
            // still starts (not ready) and keeps trying.
            if tokio::time::timeout(self.inner.timeout, rx).await.is_err() {
                tracing::warn!("Redis not reachable yet; starting unready and retrying");
            }
            Ok(())
        })
    }

    fn channel_added(&self, channel: &Channel) {
        let Some(name) = self.inner.subscribed_name(channel) else {
            return;
        };
        let history = self
            .inner
            .history
            .as_ref()
            .and_then(|h| h.topic(channel))
            .cloned();
        let mut wake = Vec::new();
        let mut st = lock(&self.inner.state);
        let c = st.channels.entry(name.clone()).or_default();
        c.wanted = true;
        c.failed = false;
        c.history = history;
        self.inner.mark_dirty(&mut st, name, &mut wake);
        drop(st);
        self.inner.wake_after(wake);
    }

    fn channel_removed(&self, channel: &Channel) {
        let Some(name) = self.inner.subscribed_name(channel) else {
            return;
        };
        let mut wake = Vec::new();
        let mut st = lock(&self.inner.state);
        if let Some(c) = st.channels.get_mut(&name) {
            c.wanted = false;
            c.waiters.retain(|w| !w.is_closed());
            if c.is_idle() {
                st.channels.remove(&name);
            } else {
                self.inner.mark_dirty(&mut st, name, &mut wake);
            }
        }
        drop(st);
        self.inner.wake_after(wake);
    }

    fn confirmed(&self, channel: &Channel) -> BoxFuture<'_, Result<(), BrokerError>> {
        let name = self
            .inner
            .subscribed_name(channel)
            .unwrap_or_else(|| self.inner.direct_channel(self.inner.tag));
        let rx = {
            let mut st = lock(&self.inner.state);
            let up = self.inner.up.load(Ordering::Acquire);
            let c = st.channels.entry(name).or_default();
            if c.active && up {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                c.waiters.push(tx);
                Some(rx)
            }
        };
        let timeout = self.inner.timeout;
        Box::pin(async move {
            let Some(rx) = rx else { return Ok(()) };
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(BrokerError::Stopped),
                Err(_) => Err(BrokerError::Timeout),
            }
        })
    }

    fn publish(
        &self,
        channel: &Channel,
        message: Message,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        let name = self.inner.channel_name(channel);
        if let Some(topic) = self.inner.history.as_ref().and_then(|h| h.topic(channel))
            && message != Message::Disconnect
        {
            let head = wire::encode_head(&channel.topic_name(), &message);
            return Box::pin(
                self.inner
                    .clone()
                    .publish_history(name, topic.clone(), head),
            );
        }
        let payload = wire::encode(&channel.topic_name(), &message);
        if let Channel::Socket(id) = channel {
            let (first, fallback) = self.inner.direct_routes(*id);
            return Box::pin(self.inner.clone().publish(first, payload, fallback));
        }
        Box::pin(self.inner.clone().publish(name, payload, None))
    }

    fn publish_batch(
        &self,
        items: Vec<(Channel, Message)>,
    ) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        let publish = |name: String, payload: &[u8]| {
            let mut cmd = redis::cmd(self.inner.publish_cmd);
            cmd.arg(name).arg(payload);
            cmd
        };
        // Only a cluster needs the slots (to split the pipeline).
        let slot = |name: &str| {
            if self.inner.cluster.is_some() {
                slot_of(name.as_bytes())
            } else {
                0
            }
        };
        let commands: Vec<(u16, redis::Cmd, Option<redis::Cmd>)> = items
            .iter()
            .map(|(channel, message)| {
                let name = self.inner.channel_name(channel);
                let topic_name = channel.topic_name();
                if let Channel::Socket(id) = channel {
                    let (first, fallback) = self.inner.direct_routes(*id);
                    let payload = wire::encode(&topic_name, message);
                    let fallback = fallback.map(|f| publish(f, &payload));
                    return (slot(&first), publish(first, &payload), fallback);
                }
                let slot = slot(&name);
                let history = self.inner.history.as_ref().and_then(|h| h.topic(channel));
                let cmd =
                    match history {
                        Some(topic) if *message != Message::Disconnect => self
                            .inner
                            .append_command(topic, &name, wire::encode_head(&topic_name, message)),
                        _ => None,
                    }
                    .unwrap_or_else(|| publish(name, &wire::encode(&topic_name, message)));
                (slot, cmd, None)
            })
            .collect();
        Box::pin(self.inner.clone().publish_pipeline(commands))
    }

    fn history(&self) -> Option<&HistorySettings> {
        self.inner.history.as_ref()
    }

    fn recover(&self, topic: &Topic, since: Option<&Since>) -> BoxFuture<'_, Recovery> {
        let keeps = self
            .inner
            .history
            .as_ref()
            .is_some_and(|h| h.patterns.matches(topic.as_str()));
        let topic = topic.clone();
        let since = since.cloned();
        Box::pin(async move {
            if !keeps {
                return Recovery::failed(RecoveryFailure::NoHistory);
            }
            let after = since.as_ref().map(|s| Position {
                offset: s.offset,
                epoch: s.epoch.as_str().into(),
            });
            let read = if after.is_some() {
                Read::SameEpochOnly
            } else {
                Read::PositionOnly
            };
            let deadline = Deadline::now() + self.inner.timeout;
            match self
                .inner
                .read_history(&topic, after.as_ref(), read, deadline)
                .await
            {
                Ok(snapshot) => Recovery::decide(since.as_ref(), snapshot),
                Err(e) => {
                    tracing::debug!(%topic, error = %e, "history read for a recovery failed");
                    Recovery::failed(RecoveryFailure::Unavailable)
                }
            }
        })
    }

    fn socket_tag(&self) -> Option<u32> {
        Some(self.inner.tag)
    }

    fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    fn stats(&self) -> serde_json::Value {
        let st = lock(&self.inner.state);
        let active = st.active;
        let wanted = st.channels.values().filter(|c| c.wanted).count();
        let failed = st.channels.values().filter(|c| c.failed).count();
        json!({
            "type": "redis",
            "up": self.is_up(),
            "keyPrefix": self.inner.prefix.trim_end_matches(':'),
            "channels": active,
            "wantedChannels": wanted,
            "failedChannels": failed,
            "reconnects": self.inner.metrics.reconnects.get(),
            "replica": self.inner.replica.to_string(),
            "socketChannels": if self.inner.per_socket { "per-socket" } else { "per-replica" },
            "socketTag": format!("{:08x}", self.inner.tag),
            "waitingForReplicas": self.inner.barrier().unwrap_or(0),
            "replicasSeen": self.inner.replicas_seen(),
            "cluster": self.inner.cluster.as_ref().map(|c| {
                let map = c.map();
                json!({
                    "masters": map.as_ref().map_or(0, |m| m.masters().len()),
                    "slotsCovered": map.as_ref().map_or(0, |m| m.covered()),
                    "shardSubscribers": c.shards(),
                })
            }),
        })
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let task = self
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            self.inner.stopped.store(true, Ordering::Release);
            self.inner.stop.notify_one();
            for handle in [&self.heartbeat, &self.watcher] {
                if let Some(h) = handle.lock().unwrap_or_else(PoisonError::into_inner).take() {
                    h.abort();
                }
            }
            if self.inner.cluster.is_some() {
                self.inner.stop_cluster(self.inner.timeout * 2).await;
            }
            if let Some(task) = task {
                let abort = task.abort_handle();
                if tokio::time::timeout(self.inner.timeout * 2, task)
                    .await
                    .is_err()
                {
                    abort.abort();
                }
            }
            self.inner
                .publisher
                .send_replace(PubConn::Closed("broker stopped".into()));
            lock(&self.inner.state).sink = None;
            self.inner.set_up(false);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_retry_delays_follow_the_seed_formula() {
        for attempt in 1..=3u32 {
            let base = 100.0 * f64::from(1u32 << (attempt - 1));
            for _ in 0..100 {
                let d = subscribe_retry_delay(attempt).as_secs_f64() * 1000.0;
                assert!(
                    d >= base * 0.5 && d <= base * 1.5,
                    "attempt {attempt}: {d} ms"
                );
            }
        }
    }

    fn broker() -> RedisBroker {
        let settings = RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            key_prefix: KeyPrefix::new("unit").unwrap(),
            socket_channels: SocketChannels::PerReplica,
            timeout: Duration::from_millis(500),
            max_payload: 1024,
            ca_pem: None,
            history: None,
            sentinel: None,
            cluster: None,
        };
        RedisBroker::new(settings, Metrics::new().broker, None).unwrap()
    }

    fn announce(inner: &Inner, body: serde_json::Value) {
        inner.on_announce(body.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn only_an_answer_to_the_current_question_ends_the_wait_after_an_outage() {
        let b = broker();
        let inner = &b.inner;
        let peer = uuid::Uuid::new_v4().to_string();
        announce(inner, json!({"replica": peer}));
        inner.set_up(true);
        inner.set_up(false);
        assert_eq!(inner.barrier(), Some(1));
        // An announcement delivered while we are still down (it may have waited in a frozen
        // Redis) says nothing of the peer's state now.
        announce(inner, json!({"replica": peer}));
        assert_eq!(inner.barrier(), Some(1));
        inner.set_up(true);
        let nonce = inner.peers.lock().unwrap().nonce.unwrap();
        announce(
            inner,
            json!({"replica": peer, "acks": [nonce.wrapping_add(1)]}),
        );
        assert_eq!(inner.barrier(), Some(1));
        announce(inner, json!({"replica": peer, "acks": [nonce]}));
        assert_eq!(inner.barrier(), None);
    }

    #[test]
    fn an_unanswered_publish_makes_publishing_wait_for_the_replicas_heard_lately() {
        let b = broker();
        let inner = &b.inner;
        let peer = uuid::Uuid::new_v4().to_string();
        announce(inner, json!({"replica": peer}));
        inner.suspect_outage();
        // Until the publisher is back, the wait has not started: it does not time out.
        assert_eq!(inner.barrier(), Some(1));
        inner.start_waiting();
        assert!(inner.ask_back.load(Ordering::Acquire));
        let nonce = inner.peers.lock().unwrap().nonce.unwrap();
        announce(inner, json!({"replica": peer, "acks": [nonce]}));
        assert_eq!(inner.barrier(), None);
    }

    #[test]
    fn questions_from_replicas_that_came_back_are_kept_to_be_answered() {
        let b = broker();
        let inner = &b.inner;
        let peer = uuid::Uuid::new_v4().to_string();
        announce(inner, json!({"replica": peer, "back": true, "nonce": 42}));
        announce(inner, json!({"replica": peer, "back": true, "nonce": 42}));
        assert_eq!(inner.peers.lock().unwrap().acks_owed, vec![42]);
        assert!(
            inner
                .on_announce(br#"{"replica":"x","nonce":"not a number"}"#)
                .is_err()
        );
    }

    #[test]
    fn reconnect_backoff_grows_and_stays_under_the_cap() {
        for failures in 0..40 {
            assert!(reconnect_delay(failures) <= BACKOFF_CAP);
        }
        assert!(reconnect_delay(1) < Duration::from_millis(101));
    }
}
