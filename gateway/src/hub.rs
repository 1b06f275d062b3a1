//! The local registry: connections, topic subscriptions and the fan-out.
//!
//! [`Hub`] is a cheap cloneable handle on shared state. Connections live in sharded maps keyed
//! by socket id; topic subscriber lists live in sharded maps keyed by topic. Locks are held only
//! for short, non-async critical sections: a fan-out takes one shard's read lock, queues the
//! shared frame on each subscriber's outbox (a per-connection lock) and never touches a socket.
//!
//! The hub reports subscription edges to the broker — a channel's first local subscriber and its
//! last — while holding the shard lock that decided them, so the broker sees them in the same
//! order as the registry.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::hash::RandomState;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use std::cell::OnceCell;

use bytes::Bytes;
use serde_json::json;

use crate::broker::{Broker, BrokerError, Message, Sink};
use crate::deflate;
use crate::error::ClientError;
use crate::frame;
use crate::history::{Position, Recovery};
use crate::metrics::{CloseReason, Metrics};
use crate::outbox::{Kind, Outbox, Push, QueueLimits};
use crate::types::{Channel, SocketId, Topic, UserId};

const SHARDS: usize = 64;
/// Recipients of a fan-out whose memory is touched ahead of pushing to them (see
/// [`Outbox::warm`]).
const WARM_AHEAD: usize = 16;

/// Deliveries per 10 ms that may be written directly from the delivering thread (see
/// [`Hub::direct_fanout`]): 100,000 per second.
const DIRECT_BUDGET: u64 = 1000;

/// Per-connection limits the hub enforces.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Outbound queue bounds.
    pub queue: QueueLimits,
    /// Most topics one connection may join (not counting its automatic ones).
    pub max_topics_per_connection: usize,
    /// Most connections on this instance (0: unlimited).
    pub max_connections: usize,
    /// Messages smaller than this go uncompressed, even to connections that negotiated
    /// permessage-deflate.
    pub compression_threshold: usize,
}

/// One WebSocket connection as the registry sees it.
pub struct Conn {
    id: SocketId,
    /// The outbound queue and writer state.
    pub outbox: Outbox,
    topics: Mutex<ConnTopics>,
    /// Milliseconds since the hub started, at the last inbound frame.
    last_seen: AtomicU64,
}

#[derive(Default)]
struct ConnTopics {
    joined: HashSet<Topic>,
    /// The user a verified token says this connection is (`--auth`).
    user: Option<UserId>,
    /// Set by unregister: later joins are refused so nothing is left behind.
    gone: bool,
}

impl Conn {
    /// The connection's socket id.
    pub fn id(&self) -> SocketId {
        self.id
    }

    fn topics(&self) -> MutexGuard<'_, ConnTopics> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Topics this connection joined.
    pub fn joined(&self) -> Vec<Topic> {
        self.topics().joined.iter().cloned().collect()
    }
}

/// A topic's local subscribers.
#[derive(Default)]
struct Subscribers {
    /// Joined without `since`: the seed's plain frames.
    plain: Vec<Arc<Conn>>,
    /// Joined with `since`: positioned envelopes, after recovering what they missed.
    positioned: Vec<Arc<Positioned>>,
}

impl Subscribers {
    fn len(&self) -> usize {
        self.plain.len() + self.positioned.len()
    }

    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.positioned.is_empty()
    }

    /// Takes `conn` out, whichever way it joined. Returns whether it was there.
    fn remove(&mut self, conn: &Arc<Conn>) -> bool {
        if let Some(i) = self.plain.iter().position(|c| Arc::ptr_eq(c, conn)) {
            self.plain.swap_remove(i);
            return true;
        }
        if let Some(i) = self
            .positioned
            .iter()
            .position(|p| Arc::ptr_eq(&p.conn, conn))
        {
            let p = self.positioned.swap_remove(i);
            p.state().removed = true;
            return true;
        }
        false
    }
}

/// A connection that joined a topic with `since`.
///
/// While its recovery is read, live messages of the topic wait here; [`Hub::finish_recovery`]
/// then sends the acknowledgement, the recovered messages and the waiting ones, skipping any
/// that recovery already gave (by position), all under this state's lock so that nothing
/// delivered meanwhile can overtake them.
pub struct Positioned {
    conn: Arc<Conn>,
    topic: Topic,
    state: Mutex<PositionedState>,
}

#[derive(Default)]
struct PositionedState {
    /// `Some` while recovering: live messages waiting (`None` position: a message without one,
    /// e.g. from a seed instance).
    waiting: Option<Vec<(Option<Position>, Message)>>,
    /// More messages waited than the outbound queue may hold: the connection is closed when
    /// the recovery ends (it reconnects and recovers again).
    overflowed: bool,
    /// The last position sent: never send it, or an earlier one, again.
    last: Option<Position>,
    /// Left the topic (or joined it again): send nothing more.
    removed: bool,
}

impl Positioned {
    fn state(&self) -> MutexGuard<'_, PositionedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

type TopicShard = RwLock<HashMap<Topic, Subscribers>>;

struct Shared {
    conns: Vec<RwLock<HashMap<SocketId, Arc<Conn>>>>,
    /// Each user's local connections (`--auth`).
    users: Vec<RwLock<HashMap<UserId, Vec<Arc<Conn>>>>>,
    topics: Vec<TopicShard>,
    hasher: RandomState,
    /// Open connections; also decides the broadcast channel's edges.
    members: Mutex<usize>,
    reserved: AtomicUsize,
    subscriptions: AtomicUsize,
    topic_count: AtomicUsize,
    draining: AtomicBool,
    started: Instant,
    /// Current 10 ms window and the deliveries made in it (for [`Hub::direct_fanout`]).
    window: AtomicU64,
    window_deliveries: AtomicU64,
    limits: HubLimits,
    broker: Arc<dyn Broker>,
    metrics: Metrics,
}

/// Handle on the local registry.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// A reserved connection slot: counts against the connection limit until dropped.
pub struct Slot {
    hub: Hub,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.shared.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    /// A hub sending cluster-wide traffic through `broker`.
    pub fn new(limits: HubLimits, broker: Arc<dyn Broker>, metrics: Metrics) -> Self {
        Self {
            shared: Arc::new(Shared {
                conns: (0..SHARDS).map(|_| RwLock::default()).collect(),
                users: (0..SHARDS).map(|_| RwLock::default()).collect(),
                topics: (0..SHARDS).map(|_| RwLock::default()).collect(),
                hasher: RandomState::new(),
                members: Mutex::new(0),
                reserved: AtomicUsize::new(0),
                subscriptions: AtomicUsize::new(0),
                topic_count: AtomicUsize::new(0),
                draining: AtomicBool::new(false),
                started: Instant::now(),
                window: AtomicU64::new(0),
                window_deliveries: AtomicU64::new(0),
                limits,
                broker,
                metrics,
            }),
        }
    }

    /// The broker behind this hub.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.shared.broker
    }

    /// The metrics this hub reports to.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The limits in force.
    pub fn limits(&self) -> &HubLimits {
        &self.shared.limits
    }

    fn conn_shard(&self, id: SocketId) -> &RwLock<HashMap<SocketId, Arc<Conn>>> {
        &self.shared.conns[(id.as_u128() as usize) % SHARDS]
    }

    fn user_shard(&self, user: &UserId) -> &RwLock<HashMap<UserId, Vec<Arc<Conn>>>> {
        let h = self.shared.hasher.hash_one(user.as_str());
        &self.shared.users[(h as usize) % SHARDS]
    }

    /// Records that `conn` is `user`'s, so that messages to the user reach it; the user's
    /// channel is subscribed with its first local connection. A connection is one user's for
    /// its whole life: a second call with another user is refused (`false`), as it is once
    /// the connection is gone.
    pub fn set_user(&self, conn: &Arc<Conn>, user: &UserId) -> bool {
        let mut t = conn.topics();
        match &t.user {
            Some(current) => return current == user,
            None if t.gone => return false,
            None => t.user = Some(user.clone()),
        }
        let mut shard = write(self.user_shard(user));
        let conns = shard.entry(user.clone()).or_default();
        conns.push(conn.clone());
        if conns.len() == 1 {
            self.shared
                .broker
                .channel_added(&Channel::User(user.clone()));
        }
        true
    }

    /// Takes `conn` out of its user's connections (when it is unregistered).
    fn remove_user(&self, conn: &Arc<Conn>, user: &UserId) {
        let mut shard = write(self.user_shard(user));
        if let Some(conns) = shard.get_mut(user) {
            conns.retain(|c| !Arc::ptr_eq(c, conn));
            if conns.is_empty() {
                shard.remove(user);
                self.shared
                    .broker
                    .channel_removed(&Channel::User(user.clone()));
            }
        }
    }

    /// The local connections of `user`.
    pub fn user_connections(&self, user: &UserId) -> Vec<Arc<Conn>> {
        read(self.user_shard(user))
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    fn topic_shard(&self, topic: &Topic) -> &TopicShard {
        let h = self.shared.hasher.hash_one(topic.as_str());
        &self.shared.topics[(h as usize) % SHARDS]
    }

    /// Milliseconds since the hub started (a cheap monotonic clock for idle tracking).
    pub fn now_ms(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    /// Whether the gateway is draining (shutting down).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Reserves a connection slot, or `None` at the connection limit.
    pub fn try_reserve(&self) -> Option<Slot> {
        let max = self.shared.limits.max_connections;
        let prev = self.shared.reserved.fetch_add(1, Ordering::AcqRel);
        let slot = Slot { hub: self.clone() };
        if max != 0 && prev >= max {
            return None; // dropping the slot gives the count back
        }
        Some(slot)
    }

    /// Registers a new connection under a fresh socket id, subscribed to the broadcast channel
    /// and its own direct channel. Its outbox holds everything until [`Hub::open`] sends the
    /// `session` envelope. With `socket`, frames are written to it directly whenever nothing
    /// is queued.
    pub fn register(&self, socket: Option<Arc<tokio::net::TcpStream>>) -> Arc<Conn> {
        self.register_compressed(socket, false)
    }

    /// [`Hub::register`] for a connection that may receive compressed data messages (it
    /// negotiated permessage-deflate) when `compressed`.
    pub fn register_compressed(
        &self,
        socket: Option<Arc<tokio::net::TcpStream>>,
        compressed: bool,
    ) -> Arc<Conn> {
        let id = SocketId::generate_tagged(self.shared.broker.socket_tag());
        let conn = Arc::new(Conn {
            id,
            outbox: Outbox::with_socket(socket).with_compression(compressed),
            topics: Mutex::default(),
            last_seen: AtomicU64::new(self.now_ms()),
        });
        let m = &self.shared.metrics;
        // Nothing reaches the client before its `session` envelope (see `Hub::open`).
        conn.outbox.hold();
        {
            let mut shard = write(self.conn_shard(id));
            shard.insert(id, conn.clone());
            self.shared.broker.channel_added(&Channel::Socket(id));
        }
        {
            let mut members = self
                .shared
                .members
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *members += 1;
            if *members == 1 {
                self.shared.broker.channel_added(&Channel::Broadcast);
            }
        }
        m.connections.inc();
        m.opened.inc();
        conn
    }

    /// Sends the `session` envelope — the connection's first frame — once its direct and
    /// broadcast channels are live cluster-wide, so that a backend told this socket id can
    /// reach it at once. If the broker cannot confirm in time, the session goes out anyway
    /// (the connection works locally, and the broker keeps trying).
    pub async fn open(&self, conn: &Conn) {
        let broker = &self.shared.broker;
        let direct = Channel::Socket(conn.id);
        let (a, b) = tokio::join!(
            broker.confirmed(&direct),
            broker.confirmed(&Channel::Broadcast)
        );
        if let Err(e) = a.and(b) {
            tracing::debug!(error = %e, "session sent before the broker confirmed its channels");
        }
        conn.outbox
            .release(Some(crate::protocol::session_frame(conn.id)));
    }

    /// Opens a connection that speaks an embedder's protocol (see
    /// [`crate::conn::MessageHandler`]): no `session` envelope; what was held goes out now.
    pub fn open_without_session(&self, conn: &Conn) {
        conn.outbox.release(None);
    }

    /// Removes a connection and all its subscriptions; counts its close reason.
    pub fn unregister(&self, conn: &Arc<Conn>) {
        let (topics, user) = {
            let mut t = conn.topics();
            t.gone = true;
            (std::mem::take(&mut t.joined), t.user.take())
        };
        for topic in &topics {
            self.remove_subscriber(conn, topic);
        }
        if let Some(user) = &user {
            self.remove_user(conn, user);
        }
        {
            let mut shard = write(self.conn_shard(conn.id));
            if shard.remove(&conn.id).is_none() {
                return;
            }
            self.shared
                .broker
                .channel_removed(&Channel::Socket(conn.id));
        }
        {
            let mut members = self
                .shared
                .members
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *members -= 1;
            if *members == 0 {
                self.shared.broker.channel_removed(&Channel::Broadcast);
            }
        }
        let m = &self.shared.metrics;
        m.connections.dec();
        m.connection_closed(conn.outbox.close_reason().unwrap_or(CloseReason::Client));
    }

    /// Subscribes `conn` to `topic`. Returns whether it was newly joined.
    ///
    /// # Errors
    /// [`ClientError::TooManyTopics`] at the per-connection limit.
    pub fn join(&self, conn: &Arc<Conn>, topic: &Topic) -> Result<bool, ClientError> {
        let mut t = conn.topics();
        if t.gone || t.joined.contains(topic) {
            return Ok(false);
        }
        let max = self.shared.limits.max_topics_per_connection;
        if t.joined.len() >= max {
            return Err(ClientError::TooManyTopics(max));
        }
        t.joined.insert(topic.clone());
        self.add_subscriber(topic, |subs| subs.plain.push(conn.clone()));
        Ok(true)
    }

    /// Adds a subscriber to `topic` with `add`, reporting the topic's first-subscriber edge.
    fn add_subscriber(&self, topic: &Topic, add: impl FnOnce(&mut Subscribers)) {
        {
            let mut shard = write(self.topic_shard(topic));
            match shard.entry(topic.clone()) {
                Entry::Occupied(mut e) => add(e.get_mut()),
                Entry::Vacant(e) => {
                    add(e.insert(Subscribers::default()));
                    self.shared.topic_count.fetch_add(1, Ordering::Relaxed);
                    self.shared.metrics.topics.inc();
                    self.shared
                        .broker
                        .channel_added(&Channel::Topic(topic.clone()));
                }
            }
        }
        self.shared.subscriptions.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.subscriptions.inc();
    }

    /// Subscribes `conn` to `topic` for positioned envelopes, recovering: live messages wait
    /// until [`Hub::finish_recovery`]. A connection that had joined already is switched over
    /// (it stays subscribed throughout). `None` when the connection is gone.
    ///
    /// # Errors
    /// [`ClientError::TooManyTopics`] at the per-connection limit.
    pub fn join_positioned(
        &self,
        conn: &Arc<Conn>,
        topic: &Topic,
    ) -> Result<Option<Arc<Positioned>>, ClientError> {
        let mut t = conn.topics();
        if t.gone {
            return Ok(None);
        }
        let positioned = Arc::new(Positioned {
            conn: conn.clone(),
            topic: topic.clone(),
            state: Mutex::new(PositionedState {
                waiting: Some(Vec::new()),
                ..PositionedState::default()
            }),
        });
        if t.joined.contains(topic) {
            let mut shard = write(self.topic_shard(topic));
            if let Some(subs) = shard.get_mut(topic) {
                subs.remove(conn);
                subs.positioned.push(positioned.clone());
            }
            return Ok(Some(positioned));
        }
        let max = self.shared.limits.max_topics_per_connection;
        if t.joined.len() >= max {
            return Err(ClientError::TooManyTopics(max));
        }
        t.joined.insert(topic.clone());
        self.add_subscriber(topic, |subs| subs.positioned.push(positioned.clone()));
        Ok(Some(positioned))
    }

    /// Ends a recovery: sends `ack` (if any), the recovered messages, then the live ones that
    /// waited — each position once, in order — and from then on delivers live. A connection
    /// that fell too far behind meanwhile is closed as a slow consumer instead.
    pub fn finish_recovery(
        &self,
        positioned: &Positioned,
        ack: Option<Bytes>,
        recovery: &Recovery,
    ) {
        let conn = &positioned.conn;
        let limits = &self.shared.limits.queue;
        let m = &self.shared.metrics;
        let mut st = positioned.state();
        let waiting = st.waiting.take().unwrap_or_default();
        if st.overflowed {
            conn.outbox.close(
                frame::close_code::TRY_AGAIN_LATER,
                "too far behind while recovering",
                CloseReason::SlowConsumer,
                false,
            );
            return;
        }
        if let Some(ack) = ack {
            conn.outbox.push(ack, Kind::Control, limits, m);
        }
        if st.removed {
            return;
        }
        let sent = recovery.entries.iter().map(|(p, msg)| (Some(p), msg));
        let waited = waiting.iter().map(|(p, msg)| (p.as_ref(), msg));
        for (p, msg) in sent.chain(waited) {
            let frame = match (p, msg) {
                (_, Message::Disconnect) => continue,
                (Some(p), _) => {
                    if st.last.as_ref().is_some_and(|last| !p.is_after(last)) {
                        continue;
                    }
                    st.last = Some(p.clone());
                    self.positioned(&positioned.topic, p, msg)
                }
                (None, Message::Text(b)) => self.lazy(frame::OpCode::Text, b.clone()),
                (None, Message::Binary(b)) => self.lazy(frame::OpCode::Binary, b.clone()),
            };
            conn.outbox
                .push(frame.for_conn(conn).clone(), Kind::Data, limits, m);
        }
    }

    /// Unsubscribes `conn` from `topic`. Returns whether it had joined.
    pub fn leave(&self, conn: &Arc<Conn>, topic: &Topic) -> bool {
        let mut t = conn.topics();
        if !t.joined.remove(topic) {
            return false;
        }
        self.remove_subscriber(conn, topic);
        drop(t);
        true
    }

    /// Unsubscribes `conn` from every topic it joined.
    pub fn leave_all(&self, conn: &Arc<Conn>) -> usize {
        let mut t = conn.topics();
        let topics = std::mem::take(&mut t.joined);
        for topic in &topics {
            self.remove_subscriber(conn, topic);
        }
        topics.len()
    }

    fn remove_subscriber(&self, conn: &Arc<Conn>, topic: &Topic) {
        let mut shard = write(self.topic_shard(topic));
        let Some(subs) = shard.get_mut(topic) else {
            return;
        };
        if !subs.remove(conn) {
            return;
        }
        if subs.is_empty() {
            shard.remove(topic);
            self.shared.topic_count.fetch_sub(1, Ordering::Relaxed);
            self.shared.metrics.topics.dec();
            self.shared
                .broker
                .channel_removed(&Channel::Topic(topic.clone()));
        }
        self.shared.subscriptions.fetch_sub(1, Ordering::Relaxed);
        self.shared.metrics.subscriptions.dec();
    }

    /// Looks up a local connection.
    pub fn connection(&self, id: SocketId) -> Option<Arc<Conn>> {
        read(self.conn_shard(id)).get(&id).cloned()
    }

    /// Open connections on this instance.
    pub fn connection_count(&self) -> usize {
        *self
            .shared
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Local subscribers of `topic`.
    pub fn subscriber_count(&self, topic: &Topic) -> usize {
        read(self.topic_shard(topic))
            .get(topic)
            .map_or(0, Subscribers::len)
    }

    /// Topics with at least one local subscriber.
    pub fn topic_count(&self) -> usize {
        self.shared.topic_count.load(Ordering::Relaxed)
    }

    /// Local (connection, topic) subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.shared.subscriptions.load(Ordering::Relaxed)
    }

    /// `/api/stats` body.
    pub fn stats(&self) -> serde_json::Value {
        json!({
            "connections": self.connection_count(),
            "topics": self.topic_count(),
            "subscriptions": self.subscription_count(),
            "draining": self.is_draining(),
            "broker": self.shared.broker.stats(),
            "build": {
                "version": crate::metrics::VERSION,
                "commit": crate::metrics::git_commit(),
            },
        })
    }

    /// Publishes through the broker (cluster-wide) and counts it.
    ///
    /// # Errors
    /// The broker's error when it did not accept the message.
    pub async fn publish(&self, channel: &Channel, message: Message) -> Result<(), BrokerError> {
        self.shared.broker.publish(channel, message).await?;
        self.shared.metrics.published.inc();
        Ok(())
    }

    /// Publishes every item in order (with Redis: one pipeline, one round trip); each item
    /// gets its own answer, in order, and is counted when accepted.
    pub async fn publish_batch(
        &self,
        items: Vec<(Channel, Message)>,
    ) -> Vec<Result<(), BrokerError>> {
        let results = self.shared.broker.publish_batch(items).await;
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        self.shared.metrics.published.inc_by(accepted as u64);
        results
    }

    /// Records inbound activity on `conn` (for the idle timeout).
    pub fn touch(&self, conn: &Conn) {
        conn.last_seen.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Pushes `frame` to every connection of `conns`, touching each group of
    /// [`WARM_AHEAD`] recipients' memory before pushing to them (see [`Outbox::warm`]).
    fn push_all<'a>(&self, conns: impl Iterator<Item = &'a Arc<Conn>>, frame: &Lazy, direct: bool) {
        let mut conns = conns;
        let mut ahead: [Option<&Arc<Conn>>; WARM_AHEAD] = [None; WARM_AHEAD];
        loop {
            let mut n = 0;
            for (slot, conn) in ahead.iter_mut().zip(conns.by_ref()) {
                conn.outbox.warm();
                *slot = Some(conn);
                n += 1;
            }
            if n == 0 {
                return;
            }
            for conn in ahead[..n].iter().flatten() {
                self.push(conn, frame, direct);
            }
        }
    }

    fn push(&self, conn: &Conn, frame: &Lazy, direct: bool) {
        let limits = &self.shared.limits.queue;
        let m = &self.shared.metrics;
        let frame = frame.for_conn(conn);
        if direct {
            conn.outbox.push(frame.clone(), Kind::Data, limits, m);
        } else {
            conn.outbox
                .push_batched(frame.clone(), Kind::Data, limits, m);
        }
    }

    /// Whether a fan-out to `recipients` should write to sockets from this thread.
    ///
    /// Writing directly saves a task wake-up per delivery, which dominates at moderate rates;
    /// but one thread then makes every syscall, one message at a time. Past
    /// [`DIRECT_BUDGET`] deliveries in a 10 ms window, fan-outs go through the writer tasks
    /// instead, which run on every core and send many messages per syscall.
    fn direct_fanout(&self, recipients: usize) -> bool {
        let now = self.now_ms();
        let window = now / 10;
        let sh = &self.shared;
        if sh.window.load(Ordering::Relaxed) != window {
            sh.window.store(window, Ordering::Relaxed);
            sh.window_deliveries.store(0, Ordering::Relaxed);
        }
        let before = sh
            .window_deliveries
            .fetch_add(recipients as u64, Ordering::Relaxed);
        before + recipients as u64 <= DIRECT_BUDGET
    }

    /// Sends a data message to one local connection, behind what is already queued and under
    /// the outbound queue limits (a client that does not read is closed as a slow consumer).
    /// [`Message::Disconnect`] closes the connection normally.
    pub fn send_message(&self, conn: &Conn, message: Message) -> Push {
        let frame = match message {
            Message::Text(b) => self.lazy(frame::OpCode::Text, b),
            Message::Binary(b) => self.lazy(frame::OpCode::Binary, b),
            Message::Disconnect => {
                return if conn.outbox.close(
                    frame::close_code::NORMAL,
                    "",
                    CloseReason::Disconnected,
                    false,
                ) {
                    Push::Queued
                } else {
                    Push::Closed
                };
            }
        };
        let limits = &self.shared.limits.queue;
        conn.outbox.push(
            frame.for_conn(conn).clone(),
            Kind::Data,
            limits,
            &self.shared.metrics,
        )
    }

    /// The positioned envelope of `message`, as a text message to encode per recipient.
    fn positioned(&self, topic: &Topic, position: &Position, message: &Message) -> Lazy {
        let text = crate::protocol::positioned_envelope(topic, position, message);
        self.lazy(frame::OpCode::Text, Bytes::from(text))
    }

    fn lazy(&self, opcode: frame::OpCode, payload: Bytes) -> Lazy {
        Lazy {
            opcode,
            payload,
            threshold: self.shared.limits.compression_threshold,
            plain: OnceCell::new(),
            compressed: OnceCell::new(),
        }
    }

    /// Sends a protocol frame (ack, error, pong) to one connection.
    pub fn send_control(&self, conn: &Conn, frame: Bytes) {
        let limits = &self.shared.limits.queue;
        conn.outbox
            .push(frame, Kind::Control, limits, &self.shared.metrics);
    }

    fn all_connections(&self) -> Vec<Arc<Conn>> {
        let mut out = Vec::with_capacity(self.connection_count());
        for shard in &self.shared.conns {
            out.extend(read(shard).values().cloned());
        }
        out
    }

    /// Closes connections that sent nothing for `timeout`. Returns how many.
    pub fn close_idle(&self, timeout: Duration) -> usize {
        let now = self.now_ms();
        let limit = timeout.as_millis() as u64;
        let mut closed = 0;
        for shard in &self.shared.conns {
            for conn in read(shard).values() {
                let seen = conn.last_seen.load(Ordering::Relaxed);
                if now.saturating_sub(seen) >= limit
                    && conn.outbox.close(
                        frame::close_code::GOING_AWAY,
                        "idle timeout",
                        CloseReason::IdleTimeout,
                        false,
                    )
                {
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Marks the gateway as draining: readiness fails and new upgrades are refused.
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::Release);
    }

    /// Closes every connection with 1001, spread evenly over `spread` so that clients do not
    /// all reconnect at once. Returns when every close has been queued.
    pub async fn close_all_spread(&self, spread: Duration) {
        let conns = self.all_connections();
        if conns.is_empty() {
            return;
        }
        // At most ~100 batches, each closing an equal share.
        let batches = conns.len().clamp(1, 100);
        let per_batch = conns.len().div_ceil(batches);
        let pause = spread / batches as u32;
        for (i, chunk) in conns.chunks(per_batch).enumerate() {
            if i > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            for conn in chunk {
                conn.outbox.close(
                    frame::close_code::GOING_AWAY,
                    "server shutting down",
                    CloseReason::Shutdown,
                    false,
                );
            }
        }
    }

    /// Closes every connection with 1001 at no more than `per_second`, starting at once, unless
    /// that would not finish by `finish_by`: then faster, just enough to finish by then.
    /// Connections that close by themselves meanwhile do not use up the rate. Returns when every
    /// close has been queued.
    pub async fn close_all_paced(&self, per_second: u32, finish_by: tokio::time::Instant) {
        const TICK: Duration = Duration::from_millis(10);
        let conns = self.all_connections();
        let mut next = conns.iter();
        let mut left = conns.len();
        // Closes earned but not yet made; one may go at once.
        let mut allowance = 1.0_f64;
        let mut last = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        while left > 0 {
            let now = tokio::time::Instant::now();
            let time_left = finish_by.saturating_duration_since(now).as_secs_f64();
            let needed = if time_left > 0.0 {
                left as f64 / time_left
            } else {
                f64::INFINITY
            };
            if needed > f64::from(per_second) && !warned {
                warned = true;
                tracing::warn!(
                    left,
                    per_second,
                    "the drain window is too short for --drain-rate: closing faster"
                );
            }
            let rate = needed.max(f64::from(per_second));
            allowance += rate * now.duration_since(last).as_secs_f64();
            last = now;
            while allowance >= 1.0 && left > 0 {
                let Some(conn) = next.next() else {
                    left = 0;
                    break;
                };
                left -= 1;
                if conn.outbox.close(
                    frame::close_code::GOING_AWAY,
                    "server shutting down",
                    CloseReason::Shutdown,
                    false,
                ) {
                    allowance -= 1.0;
                }
            }
            if left > 0 {
                tick.tick().await;
            }
        }
    }

    /// Closes one connection (a backend asked for it).
    pub fn disconnect(&self, id: SocketId) -> bool {
        self.connection(id)
            .is_some_and(|conn| close_disconnected(&conn))
    }
}

impl Hub {
    /// Offers a message to a positioned subscriber: it waits while the subscriber recovers,
    /// is skipped when its position was sent already, and is pushed otherwise.
    fn offer(
        &self,
        sub: &Positioned,
        position: Option<&Position>,
        message: &Message,
        frame: &mut impl FnMut(&Conn) -> Bytes,
    ) {
        let mut guard = sub.state();
        let st = &mut *guard;
        if st.removed {
            return;
        }
        if let Some(waiting) = &mut st.waiting {
            if st.overflowed {
                return;
            }
            if waiting.len() >= self.shared.limits.queue.max_messages {
                st.overflowed = true;
                waiting.clear();
                return;
            }
            waiting.push((position.cloned(), message.clone()));
            return;
        }
        if let Some(p) = position {
            if st.last.as_ref().is_some_and(|last| !p.is_after(last)) {
                return;
            }
            st.last = Some(p.clone());
        }
        let limits = &self.shared.limits.queue;
        sub.conn
            .outbox
            .push(frame(&sub.conn), Kind::Data, limits, &self.shared.metrics);
    }
}

impl Sink for Hub {
    fn deliver(&self, channel: &Channel, message: Message, position: Option<&Position>) {
        let frame = match &message {
            Message::Disconnect => {
                match channel {
                    Channel::Socket(id) => {
                        self.disconnect(*id);
                    }
                    Channel::User(user) => {
                        for conn in self.user_connections(user) {
                            close_disconnected(&conn);
                        }
                    }
                    Channel::Topic(_) | Channel::Broadcast => {}
                }
                return;
            }
            Message::Text(b) => self.lazy(frame::OpCode::Text, b.clone()),
            Message::Binary(b) => self.lazy(frame::OpCode::Binary, b.clone()),
        };
        match channel {
            Channel::Topic(topic) => {
                let shard = read(self.topic_shard(topic));
                if let Some(subs) = shard.get(topic) {
                    let direct = self.direct_fanout(subs.len());
                    if !subs.plain.is_empty() {
                        self.push_all(subs.plain.iter(), &frame, direct);
                    }
                    if !subs.positioned.is_empty() {
                        match position {
                            Some(p) => {
                                let enveloped = OnceCell::new();
                                let mut positioned_frame = |conn: &Conn| {
                                    enveloped
                                        .get_or_init(|| self.positioned(topic, p, &message))
                                        .for_conn(conn)
                                        .clone()
                                };
                                for sub in &subs.positioned {
                                    self.offer(sub, position, &message, &mut positioned_frame);
                                }
                            }
                            // Without a position (a topic with no history, or a message from
                            // a seed instance), positioned subscribers get the plain frame.
                            None => {
                                let mut plain_frame = |conn: &Conn| frame.for_conn(conn).clone();
                                for sub in &subs.positioned {
                                    self.offer(sub, None, &message, &mut plain_frame);
                                }
                            }
                        }
                    }
                }
            }
            Channel::Socket(id) => {
                if let Some(conn) = self.connection(*id) {
                    let direct = self.direct_fanout(1);
                    self.push(&conn, &frame, direct);
                }
            }
            Channel::User(user) => {
                let shard = read(self.user_shard(user));
                if let Some(conns) = shard.get(user) {
                    let direct = self.direct_fanout(conns.len());
                    self.push_all(conns.iter(), &frame, direct);
                }
            }
            Channel::Broadcast => {
                let direct = self.direct_fanout(self.connection_count());
                for shard in &self.shared.conns {
                    self.push_all(read(shard).values(), &frame, direct);
                }
            }
        }
    }
}

/// Closes a connection a backend asked to disconnect.
fn close_disconnected(conn: &Conn) -> bool {
    conn.outbox.close(
        frame::close_code::NORMAL,
        "disconnected by server",
        CloseReason::Disconnected,
        false,
    )
}

/// A payload encoded into frames only once a recipient is known: at most one plain frame and
/// one compressed frame per message, each made once and shared by every recipient of its kind.
struct Lazy {
    opcode: frame::OpCode,
    payload: Bytes,
    /// Smaller payloads are never compressed.
    threshold: usize,
    plain: OnceCell<Bytes>,
    /// `None` inside: compressing would not make it smaller (or it is under the threshold).
    compressed: OnceCell<Option<Bytes>>,
}

impl Lazy {
    /// The frame for `conn`: the compressed one when it negotiated permessage-deflate and
    /// compressing pays, the plain one otherwise.
    fn for_conn(&self, conn: &Conn) -> &Bytes {
        if conn.outbox.compressed()
            && let Some(frame) = self
                .compressed
                .get_or_init(|| {
                    if self.payload.len() < self.threshold {
                        return None;
                    }
                    let packed = deflate::compress(&self.payload)?;
                    Some(frame::encode_compressed(self.opcode, &packed))
                })
                .as_ref()
        {
            return frame;
        }
        self.plain
            .get_or_init(|| frame::encode(self.opcode, &self.payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;

    fn hub() -> Hub {
        let m = Metrics::new();
        let limits = HubLimits {
            queue: QueueLimits {
                max_messages: 10,
                max_bytes: 1000,
            },
            max_topics_per_connection: 2,
            max_connections: 1,
            compression_threshold: 0,
        };
        Hub::new(limits, Arc::new(MemoryBroker::new(m.broker.clone())), m)
    }

    #[test]
    fn heavy_fanouts_switch_from_direct_writes_to_the_writer_tasks() {
        let hub = hub();
        // A window may be crossed between calls; within one, the budget is enforced.
        let mut saw_batched = false;
        for _ in 0..10 {
            assert!(hub.direct_fanout(10) || saw_batched);
            saw_batched |= !hub.direct_fanout(DIRECT_BUDGET as usize);
        }
        assert!(saw_batched);
    }

    #[test]
    fn joins_report_first_and_last_subscriber_edges_and_enforce_the_topic_limit() {
        let hub = hub();
        let conn = hub.register(None);
        let (a, b, c) = (
            Topic::new("a").unwrap(),
            Topic::new("b").unwrap(),
            Topic::new("c").unwrap(),
        );
        assert_eq!(hub.join(&conn, &a), Ok(true));
        assert_eq!(hub.join(&conn, &a), Ok(false));
        assert_eq!(hub.join(&conn, &b), Ok(true));
        assert_eq!(hub.join(&conn, &c), Err(ClientError::TooManyTopics(2)));
        assert_eq!((hub.topic_count(), hub.subscription_count()), (2, 2));
        // The broker saw: socket channel, broadcast, a, b.
        assert_eq!(hub.metrics().broker.channels.get(), 4);
        assert!(hub.leave(&conn, &a));
        assert!(!hub.leave(&conn, &a));
        hub.unregister(&conn);
        assert_eq!(
            (
                hub.topic_count(),
                hub.subscription_count(),
                hub.connection_count()
            ),
            (0, 0, 0)
        );
        assert_eq!(hub.metrics().broker.channels.get(), 0);
        // A connection that is gone cannot join again.
        assert_eq!(hub.join(&conn, &a), Ok(false));
        assert_eq!(hub.topic_count(), 0);
    }

    fn text(s: &str) -> Message {
        Message::Text(Bytes::from(s.to_owned()))
    }

    fn at(offset: u64) -> Position {
        Position {
            offset,
            epoch: "e".into(),
        }
    }

    /// Closes `conn` and returns every frame its writer sends: (opcode, payload).
    async fn frames_of(hub: &Hub, conn: &Conn) -> Vec<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        conn.outbox.close(1000, "", CloseReason::Client, false);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        conn.outbox.run_writer(server, hub.metrics()).await;
        let mut raw = Vec::new();
        client.read_to_end(&mut raw).await.unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while at < raw.len() {
            let opcode = raw[at] & 0x0f;
            let (len, header) = match raw[at + 1] & 0x7f {
                126 => (
                    usize::from(u16::from_be_bytes([raw[at + 2], raw[at + 3]])),
                    4,
                ),
                127 => unreachable!("no frame that large here"),
                n => (usize::from(n), 2),
            };
            out.push((opcode, raw[at + header..at + header + len].to_vec()));
            at += header + len;
        }
        out
    }

    fn offset_of(payload: &[u8]) -> Option<u64> {
        let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
        v["data"]["offset"].as_u64()
    }

    #[tokio::test]
    async fn a_recovery_sends_the_ack_the_missed_then_the_waiting_messages_each_once() {
        let hub = hub();
        let conn = hub.register(None);
        hub.open_without_session(&conn);
        let t = Topic::new("t").unwrap();
        let p = hub.join_positioned(&conn, &t).unwrap().unwrap();
        let channel = Channel::Topic(t.clone());
        // Published while the history was being read: 2 and 3 are also in what it returns.
        for k in 2..=4 {
            hub.deliver(&channel, text(&format!("m{k}")), Some(&at(k)));
        }
        let recovery = Recovery {
            top: Some(at(3)),
            entries: (1..=3).map(|k| (at(k), text(&format!("m{k}")))).collect(),
            outcome: Ok(()),
        };
        hub.finish_recovery(&p, Some(frame::text(b"ack")), &recovery);
        // Live again: a copy of 4 is skipped, 5 goes out.
        hub.deliver(&channel, text("m4"), Some(&at(4)));
        hub.deliver(&channel, text("m5"), Some(&at(5)));
        let frames = frames_of(&hub, &conn).await;
        assert_eq!(frames[0], (1, b"ack".to_vec()));
        let offsets: Vec<Option<u64>> = frames[1..frames.len() - 1]
            .iter()
            .map(|(_, payload)| offset_of(payload))
            .collect();
        assert_eq!(offsets, [1, 2, 3, 4, 5].map(Some));
        assert_eq!(frames.last().unwrap().0, 8, "ends with the close");
    }

    #[tokio::test]
    async fn a_connection_too_far_behind_while_recovering_is_closed_with_1013() {
        let hub = hub();
        let conn = hub.register(None);
        hub.open_without_session(&conn);
        let t = Topic::new("t").unwrap();
        let p = hub.join_positioned(&conn, &t).unwrap().unwrap();
        let channel = Channel::Topic(t);
        // The queue holds 10 messages; 11 wait.
        for k in 1..=11 {
            hub.deliver(&channel, text("m"), Some(&at(k)));
        }
        hub.finish_recovery(
            &p,
            None,
            &Recovery::failed(crate::history::RecoveryFailure::TooOld),
        );
        assert_eq!(conn.outbox.close_reason(), Some(CloseReason::SlowConsumer));
        let frames = frames_of(&hub, &conn).await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, 8);
        assert_eq!(
            u16::from_be_bytes([frames[0].1[0], frames[0].1[1]]),
            frame::close_code::TRY_AGAIN_LATER
        );
    }

    #[test]
    fn the_connection_limit_is_enforced_by_slots() {
        let hub = hub();
        let first = hub.try_reserve();
        assert!(first.is_some());
        assert!(hub.try_reserve().is_none());
        drop(first);
        assert!(hub.try_reserve().is_some());
    }
}
