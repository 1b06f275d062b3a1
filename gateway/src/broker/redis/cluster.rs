//! Redis Cluster (DESIGN §11): sharded pub/sub.
//!
//! Every channel is a shard channel named `{prefix}:{<topic>}`: the braces make the topic its
//! hash tag, so a topic's channel, history stream and position share one slot and one master.
//! Publishes go through the redis crate's cluster connection (SPUBLISH; it follows MOVED, ASK
//! and failovers). Subscriptions are ours: one RESP3 connection per master that serves the
//! slot of a local channel, one SSUBSCRIBE or SUNSUBSCRIBE per channel (one command may only
//! name channels of one slot), pipelined.
//!
//! Redis's own answers drive the bookkeeping: an `ssubscribe` confirmation marks a channel
//! active on that master, an `sunsubscribe` inactive — including the one a master sends unasked
//! when the channel's slot moves away. Such a push, a MOVED answer or a lost connection makes
//! the slot map be read again (`CLUSTER SLOTS`, also every few seconds), and every channel
//! converges to its slot's current master: subscribed there while wanted, nowhere else.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, RedisError, Value};
use tokio::sync::{Notify, oneshot, watch};

use super::{BATCH, ChanState, FAILED_RETRY, Inner, State, lock, reconnect_delay, timeout_error};
use crate::broker::BrokerError;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// How often the slot map is read again when nothing asked for it.
const MAP_REFRESH: Duration = Duration::from_secs(5);
/// How often while some shard is unreachable (a failover is probably under way).
const MAP_REFRESH_DEGRADED: Duration = Duration::from_millis(200);
/// Most nodes kept to ask for the slot map.
const MAX_KNOWN_NODES: usize = 64;

/// The slot of a key or shard channel: CRC16 of its hash tag (the text between its first `{`
/// and the next `}`, when not empty), or of the whole name.
pub fn slot_of(name: &[u8]) -> u16 {
    let tag = name.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &name[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(name)) % SLOTS
}

/// Which master serves each slot, from `CLUSTER SLOTS`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// `(first, last, master)`, sorted, not overlapping.
    ranges: Vec<(u16, u16, Arc<str>)>,
    /// Every node named, masters and replicas (`host:port`).
    nodes: Vec<String>,
}

impl SlotMap {
    /// The master serving `slot`.
    pub fn owner(&self, slot: u16) -> Option<&Arc<str>> {
        let i = self.ranges.partition_point(|(first, _, _)| *first <= slot);
        let (first, last, addr) = self.ranges.get(i.checked_sub(1)?)?;
        (*first..=*last).contains(&slot).then_some(addr)
    }

    /// The master serving channel `name`.
    pub fn owner_of(&self, name: &str) -> Option<&Arc<str>> {
        self.owner(slot_of(name.as_bytes()))
    }

    /// The masters that serve at least one slot.
    pub fn masters(&self) -> HashSet<Arc<str>> {
        self.ranges.iter().map(|(_, _, a)| a.clone()).collect()
    }

    /// How many slots have a master.
    pub fn covered(&self) -> usize {
        self.ranges
            .iter()
            .map(|(f, l, _)| usize::from(l - f) + 1)
            .sum()
    }

    /// Parses a `CLUSTER SLOTS` answer from the node at `asked` (which stands in for a node
    /// whose host is not known to itself). Anything malformed is an error, never a panic.
    ///
    /// # Errors
    /// A description of what is wrong.
    pub fn parse(value: &Value, asked: &str) -> Result<Self, String> {
        let Value::Array(entries) = value else {
            return Err("CLUSTER SLOTS: not an array".into());
        };
        let asked_host = asked.rsplit_once(':').map_or(asked, |(h, _)| h);
        let node = |v: &Value| -> Result<String, String> {
            let Value::Array(parts) = v else {
                return Err("CLUSTER SLOTS: node is not an array".into());
            };
            let host = match parts.first() {
                Some(Value::BulkString(b)) => String::from_utf8(b.clone())
                    .map_err(|_| "CLUSTER SLOTS: host is not text".to_owned())?,
                Some(Value::SimpleString(s)) => s.clone(),
                Some(Value::Nil) => String::new(),
                _ => return Err("CLUSTER SLOTS: node without a host".into()),
            };
            let host = if host.is_empty() || host == "?" {
                asked_host.to_owned()
            } else {
                host
            };
            if host.len() > 255 || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err("CLUSTER SLOTS: bad host".into());
            }
            let port = match parts.get(1) {
                Some(Value::Int(p)) => u16::try_from(*p).ok().filter(|p| *p > 0),
                _ => None,
            }
            .ok_or("CLUSTER SLOTS: bad port")?;
            Ok(format!("{host}:{port}"))
        };
        let slot = |v: Option<&Value>| match v {
            Some(Value::Int(s)) => u16::try_from(*s).ok().filter(|s| *s < SLOTS),
            _ => None,
        };
        let mut map = Self::default();
        let mut interned: HashMap<String, Arc<str>> = HashMap::new();
        for entry in entries {
            let Value::Array(parts) = entry else {
                return Err("CLUSTER SLOTS: entry is not an array".into());
            };
            let (Some(first), Some(last)) = (slot(parts.first()), slot(parts.get(1))) else {
                return Err("CLUSTER SLOTS: bad slot range".into());
            };
            if first > last {
                return Err("CLUSTER SLOTS: bad slot range".into());
            }
            let master = node(
                parts
                    .get(2)
                    .ok_or("CLUSTER SLOTS: range without a master")?,
            )?;
            for replica in parts.iter().skip(3) {
                let r = node(replica)?;
                if !map.nodes.contains(&r) {
                    map.nodes.push(r);
                }
            }
            if !map.nodes.contains(&master) {
                map.nodes.push(master.clone());
            }
            let addr = interned
                .entry(master.clone())
                .or_insert_with(|| master.into())
                .clone();
            map.ranges.push((first, last, addr));
        }
        map.ranges.sort_by_key(|(f, _, _)| *f);
        if map.ranges.windows(2).any(|w| w[0].1 >= w[1].0) {
            return Err("CLUSTER SLOTS: overlapping slot ranges".into());
        }
        map.nodes.truncate(MAX_KNOWN_NODES);
        Ok(map)
    }
}

/// The cluster side of the Redis broker.
pub struct Cluster {
    /// `host:port` to ask for the slot map first.
    seeds: Vec<String>,
    /// Credentials, database and TLS of every connection (its address is replaced).
    base: redis::ConnectionInfo,
    ca_pem: Option<Vec<u8>>,
    /// The publisher's client (routes by slot itself).
    pub client: redis::cluster::ClusterClient,
    map: RwLock<Option<Arc<SlotMap>>>,
    /// The shard subscriber running for each master, with the handle that wakes it.
    tasks: Mutex<HashMap<Arc<str>, Arc<Notify>>>,
    /// Read the slot map again now.
    refresh: Notify,
    stop: watch::Sender<bool>,
    first_up: Mutex<Option<oneshot::Sender<()>>>,
}

impl Cluster {
    /// # Errors
    /// A message for the flag, when the settings cannot make a client.
    pub fn new(
        seeds: Vec<String>,
        base: redis::ConnectionInfo,
        ca_pem: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Self, String> {
        if base.redis_settings().db() != 0 {
            return Err("Redis Cluster has only database 0".into());
        }
        let infos: Vec<redis::ConnectionInfo> = seeds
            .iter()
            .map(|s| node_info(&base, s))
            .collect::<Result<_, _>>()?;
        let mut builder = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(100);
        if let Some(pem) = &ca_pem {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        let client = builder.build().map_err(|e| e.to_string())?;
        Ok(Self {
            seeds,
            base,
            ca_pem,
            client,
            map: RwLock::new(None),
            tasks: Mutex::default(),
            refresh: Notify::new(),
            stop: watch::Sender::new(false),
            first_up: Mutex::new(None),
        })
    }

    /// The current slot map (none before it was first read).
    pub fn map(&self) -> Option<Arc<SlotMap>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Becomes true when the broker stops.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// The master serving channel `name` now.
    fn owner_of(&self, name: &str) -> Option<Arc<str>> {
        self.map()?.owner_of(name).cloned()
    }

    /// Asks for the slot map to be read again.
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Shard subscribers running.
    pub fn shards(&self) -> usize {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// A client for the node at `addr`, speaking RESP3 (pushes carry the messages and the
    /// subscription changes).
    fn shard_client(&self, addr: &str) -> Result<redis::Client, RedisError> {
        let info = node_info(&self.base, addr)
            .map_err(|e| RedisError::from((redis::ErrorKind::InvalidClientConfig, "node", e)))?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        match &self.ca_pem {
            None => redis::Client::open(info),
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
        }
    }

    /// Reads the slot map from the first node that answers: the seeds, then every node the
    /// last map named.
    async fn read_map(&self, timeout: Duration) -> Result<SlotMap, String> {
        let mut candidates: Vec<String> = self.seeds.clone();
        if let Some(map) = self.map() {
            for n in &map.nodes {
                if !candidates.contains(n) {
                    candidates.push(n.clone());
                }
            }
        }
        let mut last = "no node to ask".to_owned();
        for addr in candidates {
            let attempt = async {
                let client = self.shard_client(&addr).map_err(|e| e.to_string())?;
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(
                        &redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(timeout))
                            .set_response_timeout(Some(timeout)),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let value: Value = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                SlotMap::parse(&value, &addr)
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(map)) if map.covered() > 0 => return Ok(map),
                Ok(Ok(_)) => last = format!("{addr}: no slot is served"),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer in time"),
            }
        }
        Err(last)
    }
}

/// Resolves when the broker stops (the guard `wait_for` gives must not be held across
/// awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// `base` with its address replaced by `addr` (`host:port`), keeping TLS.
fn node_info(base: &redis::ConnectionInfo, addr: &str) -> Result<redis::ConnectionInfo, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|p| *p > 0)?)))
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addr = match base.addr() {
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => redis::ConnectionAddr::Tcp(host, port),
    };
    Ok(base.clone().set_addr(addr))
}

impl ChanState {
    /// Records that the master at `addr` confirmed the subscription; true when the channel
    /// was not active anywhere before.
    fn add_shard(&mut self, addr: &Arc<str>) -> bool {
        if self.on.iter().any(|a| a == addr) {
            return false;
        }
        self.on.push(addr.clone());
        let became = !self.active;
        self.active = true;
        became
    }

    /// Records that the master at `addr` no longer has the subscription; true when the
    /// channel is now active nowhere.
    fn remove_shard(&mut self, addr: &str) -> bool {
        let before = self.on.len();
        self.on.retain(|a| &**a != addr);
        let became = before > 0 && self.on.is_empty() && self.active;
        if self.on.is_empty() {
            self.active = false;
        }
        became
    }
}

impl Inner {
    pub(super) fn cluster(&self) -> &Cluster {
        match &self.cluster {
            Some(c) => c,
            None => unreachable!("cluster code runs only in cluster mode"),
        }
    }

    /// Marks `name` for the shards that must act on it (its slot's master, and any master
    /// where it is subscribed); returns them, to be woken once the state lock is released.
    pub(super) fn route_dirty(&self, st: &mut State, name: &str, wake: &mut Vec<Arc<str>>) {
        let cluster = self.cluster();
        let mut targets: Vec<Arc<str>> = Vec::new();
        if let Some(owner) = cluster.owner_of(name) {
            targets.push(owner);
        }
        if let Some(c) = st.channels.get(name) {
            for a in &c.on {
                if !targets.contains(a) {
                    targets.push(a.clone());
                }
            }
        }
        for t in targets {
            st.shard_dirty
                .entry(t.clone())
                .or_default()
                .insert(name.to_owned());
            if !wake.contains(&t) {
                wake.push(t);
            }
        }
    }

    /// Wakes (starting them if needed) the shard subscribers of `addrs`.
    pub(super) fn wake_shards(self: &Arc<Self>, addrs: Vec<Arc<str>>) {
        let cluster = self.cluster();
        if *cluster.stop.borrow() {
            return;
        }
        let mut tasks = cluster.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        for addr in addrs {
            if let Some(wake) = tasks.get(&addr) {
                wake.notify_one();
            } else {
                let wake = Arc::new(Notify::new());
                tasks.insert(addr.clone(), wake.clone());
                tokio::spawn(self.clone().run_shard(addr, wake));
            }
        }
    }

    /// Starts the cluster side: the slot map reader, which starts the shard subscribers.
    pub(super) fn start_cluster(self: &Arc<Self>, first_up: oneshot::Sender<()>) {
        let cluster = self.cluster();
        cluster.stop.send_replace(false);
        *cluster
            .first_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(first_up);
        tokio::spawn(self.clone().run_topology());
    }

    /// Stops every shard subscriber (each unsubscribes what it has) and waits for them,
    /// within `within`.
    pub(super) async fn stop_cluster(&self, within: Duration) {
        let cluster = self.cluster();
        cluster.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + within;
        while cluster.shards() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reads the slot map at start, when asked, and every few seconds; re-routes every
    /// channel when it changed.
    async fn run_topology(self: Arc<Self>) {
        let cluster = self.cluster();
        let mut stop = cluster.stop.subscribe();
        let mut failures: u32 = 0;
        loop {
            if *stop.borrow() {
                return;
            }
            match cluster.read_map(self.timeout).await {
                Ok(map) => {
                    failures = 0;
                    self.apply_map(map);
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        tracing::warn!(error = %e, "could not read the Redis Cluster slot map");
                    }
                }
            }
            let every = if self.up.load(Ordering::Acquire) && failures == 0 {
                MAP_REFRESH
            } else {
                MAP_REFRESH_DEGRADED.max(reconnect_delay(failures))
            };
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = cluster.refresh.notified() => {
                    // Several reasons to refresh often come together (a failover loses many
                    // subscriptions at once): one read answers them all.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                () = stopped(&mut stop) => return,
            }
        }
    }

    /// Installs a freshly read slot map; when it differs from the last one, every channel
    /// is routed again and every shard subscriber told.
    fn apply_map(self: &Arc<Self>, map: SlotMap) {
        let cluster = self.cluster();
        let changed = {
            let mut current = cluster.map.write().unwrap_or_else(PoisonError::into_inner);
            let changed = current.as_deref() != Some(&map);
            if changed {
                *current = Some(Arc::new(map));
            }
            changed
        };
        if !changed {
            // Shards that stopped on their own may be needed again (nothing else to do).
            self.recompute_up();
            return;
        }
        tracing::info!(
            masters = cluster.map().map_or(0, |m| m.masters().len()),
            "Redis Cluster slot map changed"
        );
        let mut wake: Vec<Arc<str>> = cluster
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        {
            let mut st = lock(&self.state);
            let names: Vec<String> = st
                .channels
                .iter()
                .filter(|(_, c)| c.wanted || !c.on.is_empty())
                .map(|(n, _)| n.clone())
                .collect();
            for name in names {
                self.route_dirty(&mut st, &name, &mut wake);
            }
        }
        self.wake_shards(wake);
        self.recompute_up();
    }

    /// Up when the slot map is known and every shard subscriber is connected; the first
    /// time, the broker's start stops waiting.
    pub(super) fn recompute_up(&self) {
        let cluster = self.cluster();
        let up = {
            let tasks = cluster.tasks.lock().unwrap_or_else(PoisonError::into_inner);
            let st = lock(&self.state);
            cluster.map().is_some()
                && !tasks.is_empty()
                && tasks.keys().all(|a| st.shards_up.contains(a))
        };
        if up != self.up.load(Ordering::Acquire) {
            self.set_up(up);
        }
        if up
            && let Some(tx) = cluster
                .first_up
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        {
            let _ = tx.send(());
        }
    }

    /// Nothing for the shard at `addr` to do (no local channel in its slots, nothing
    /// subscribed there): it is removed from the running ones, and true is returned.
    fn retire(&self, addr: &Arc<str>) -> bool {
        let cluster = self.cluster();
        let mut tasks = cluster.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let map = cluster.map();
        let busy = st.channels.iter().any(|(name, c)| {
            c.on.contains(addr)
                || (c.wanted && map.as_ref().and_then(|m| m.owner_of(name)) == Some(addr))
        });
        if busy && !*cluster.stop.borrow() {
            return false;
        }
        tasks.remove(addr);
        st.shard_dirty.remove(addr);
        st.shards_up.remove(addr);
        true
    }

    /// One master's subscriber: connect, subscribe what its slots need, receive, converge;
    /// reconnect on loss, and stop when the master serves no local channel any more.
    async fn run_shard(self: Arc<Self>, addr: Arc<str>, wake: Arc<Notify>) {
        let cluster = self.cluster();
        let mut stop = cluster.stop.subscribe();
        let mut failures: u32 = 0;
        loop {
            if self.retire(&addr) {
                break;
            }
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
            let connect = async {
                cluster
                    .shard_client(&addr)?
                    .get_multiplexed_async_connection_with_config(
                        &redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(self.timeout))
                            .set_response_timeout(Some(self.timeout))
                            .set_push_sender(tx),
                    )
                    .await
            };
            let mut conn = match tokio::time::timeout(self.timeout, connect).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!(node = %addr, error = %e, "Redis Cluster shard connect failed");
                    failures += 1;
                    cluster.request_refresh();
                    if self.shard_pause(&mut stop, &wake, failures).await {
                        break;
                    }
                    continue;
                }
                Err(_) => {
                    failures += 1;
                    cluster.request_refresh();
                    if self.shard_pause(&mut stop, &wake, failures).await {
                        break;
                    }
                    continue;
                }
            };
            let lost = self
                .serve_shard(&addr, &mut conn, &mut rx, &wake, &mut stop)
                .await;
            self.shard_lost(&addr);
            if lost == "stopped" {
                break;
            }
            tracing::warn!(node = %addr, reason = lost, "lost a Redis Cluster shard subscriber; reconnecting");
            failures += 1;
            cluster.request_refresh();
            if self.shard_pause(&mut stop, &wake, failures).await {
                break;
            }
        }
        self.shard_lost(&addr);
        let _ = self.retire(&addr);
        self.recompute_up();
    }

    /// Backoff before a reconnect; true when the broker stopped meanwhile. A wake (a new
    /// slot map) ends it early.
    async fn shard_pause(
        &self,
        stop: &mut watch::Receiver<bool>,
        wake: &Notify,
        failures: u32,
    ) -> bool {
        tokio::select! {
            () = tokio::time::sleep(reconnect_delay(failures)) => {}
            () = wake.notified() => {}
            () = stopped(stop) => return true,
        }
        *stop.borrow()
    }

    /// A connected shard subscriber's life; returns why it ended.
    async fn serve_shard(
        self: &Arc<Self>,
        addr: &Arc<str>,
        conn: &mut MultiplexedConnection,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<PushInfo>,
        wake: &Notify,
        stop: &mut watch::Receiver<bool>,
    ) -> &'static str {
        if let Err(e) = self.sync_shard(conn, addr, true).await {
            tracing::warn!(node = %addr, error = %e, "Redis Cluster resubscribe failed");
            return "command failed";
        }
        // Confirmations first (the history gap was filled by the sync); live messages after.
        let mut held = Vec::new();
        while let Ok(push) = rx.try_recv() {
            if push.kind == PushKind::Disconnection {
                return "connection closed";
            }
            self.on_shard_push(addr, push, Some(&mut held));
        }
        for msg in held {
            self.on_message(&msg);
        }
        lock(&self.state).shards_up.insert(addr.clone());
        self.recompute_up();
        let mut retry = tokio::time::interval(FAILED_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        retry.tick().await;
        loop {
            tokio::select! {
                push = rx.recv() => match push {
                    None => return "connection closed",
                    Some(p) if p.kind == PushKind::Disconnection => return "connection closed",
                    Some(p) => self.on_shard_push(addr, p, None),
                },
                () = wake.notified() => {
                    if let Err(e) = self.sync_shard(conn, addr, false).await {
                        tracing::warn!(node = %addr, error = %e, "Redis Cluster subscribe/unsubscribe failed");
                        return "command failed";
                    }
                    if self.retire(addr) {
                        return "stopped";
                    }
                }
                _ = retry.tick() => {
                    if let Err(e) = self.sync_shard(conn, addr, true).await {
                        tracing::warn!(node = %addr, error = %e, "Redis Cluster subscribe retry failed");
                        return "command failed";
                    }
                    if self.retire(addr) {
                        return "stopped";
                    }
                }
                () = stopped(stop) => {
                    let active: Vec<String> = lock(&self.state)
                        .channels
                        .iter()
                        .filter(|(_, c)| c.on.contains(addr))
                        .map(|(n, _)| n.clone())
                        .collect();
                    for chunk in active.chunks(BATCH) {
                        let mut pipe = redis::pipe();
                        pipe.ignore_errors();
                        for n in chunk {
                            pipe.cmd("SUNSUBSCRIBE").arg(n);
                        }
                        let _ = tokio::time::timeout(
                            self.timeout,
                            pipe.query_async::<Vec<Result<Value, RedisError>>>(conn),
                        )
                        .await;
                    }
                    return "stopped";
                }
            }
        }
    }

    /// A push from the master at `addr`: a message (held back while `held` is given), or a
    /// subscription change.
    fn on_shard_push(&self, addr: &Arc<str>, push: PushInfo, held: Option<&mut Vec<redis::Msg>>) {
        let channel = |push: &PushInfo| match push.data.first() {
            Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
            _ => None,
        };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if let Some(msg) = redis::Msg::from_push_info(push) {
                    match held {
                        Some(h) => h.push(msg),
                        None => self.on_message(&msg),
                    }
                }
            }
            PushKind::SSubscribe => {
                if let Some(name) = channel(&push) {
                    self.shard_subscribed(addr, &name);
                }
            }
            PushKind::SUnsubscribe => {
                if let Some(name) = channel(&push) {
                    self.shard_unsubscribed(addr, &name);
                }
            }
            _ => {}
        }
    }

    /// The master at `addr` confirmed a subscription.
    fn shard_subscribed(self: &Inner, addr: &Arc<str>, name: &str) {
        let mut st = lock(&self.state);
        let c = st.channels.entry(name.to_owned()).or_default();
        let became = c.add_shard(addr);
        c.failed = false;
        for w in c.waiters.drain(..) {
            let _ = w.send(Ok(()));
        }
        let unwanted = !c.wanted;
        if became {
            st.active += 1;
            self.metrics.channels.set(st.active as i64);
        }
        if unwanted {
            // Left while it was being subscribed: the next pass unsubscribes it.
            st.shard_dirty
                .entry(addr.clone())
                .or_default()
                .insert(name.to_owned());
            drop(st);
            if let Some(wake) = self
                .cluster()
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(addr)
            {
                wake.notify_one();
            }
        }
    }

    /// The master at `addr` dropped a subscription: asked to, or because the channel's slot
    /// moved away (then the slot map is read again and the new master subscribes it).
    fn shard_unsubscribed(&self, addr: &Arc<str>, name: &str) {
        let mut st = lock(&self.state);
        let Some(c) = st.channels.get_mut(name) else {
            return;
        };
        let became = c.remove_shard(addr);
        let still_wanted = c.wanted;
        if became {
            st.active -= 1;
            self.metrics.channels.set(st.active as i64);
        }
        if st.channels.get(name).is_some_and(ChanState::is_idle) {
            st.channels.remove(name);
        }
        drop(st);
        if still_wanted {
            let cluster = self.cluster();
            if cluster.owner_of(name).as_ref() == Some(addr) {
                // Not asked for: the slot moved (or the master is leaving).
                cluster.request_refresh();
            }
        }
    }

    /// The connection to `addr` is gone: so are its subscriptions.
    fn shard_lost(&self, addr: &Arc<str>) {
        let mut st = lock(&self.state);
        st.shards_up.remove(addr);
        let mut lost = 0;
        st.channels.retain(|_, c| {
            if c.remove_shard(addr) {
                lost += 1;
            }
            c.waiters.retain(|w| !w.is_closed());
            !c.is_idle()
        });
        st.active -= lost;
        self.metrics.channels.set(st.active as i64);
        drop(st);
        self.recompute_up();
    }

    /// Converges the master at `addr` to what its slots need: SSUBSCRIBE the wanted channels
    /// it serves, SUNSUBSCRIBE those it has that are not wanted or that it no longer serves.
    /// With `full`, every channel is considered; otherwise those marked for this shard.
    async fn sync_shard(
        self: &Arc<Self>,
        conn: &mut MultiplexedConnection,
        addr: &Arc<str>,
        full: bool,
    ) -> Result<(), RedisError> {
        let cluster = self.cluster();
        let mut full = full;
        loop {
            let Some(map) = cluster.map() else {
                return Ok(());
            };
            let (subscribe, unsubscribe) = {
                let mut st = lock(&self.state);
                let names: Vec<String> = if full {
                    st.shard_dirty.remove(addr);
                    st.channels.keys().cloned().collect()
                } else {
                    st.shard_dirty
                        .remove(addr)
                        .map(|d| d.into_iter().collect())
                        .unwrap_or_default()
                };
                let mut sub = Vec::new();
                let mut unsub = Vec::new();
                for name in names {
                    let Some(c) = st.channels.get(&name) else {
                        continue;
                    };
                    let ours = map.owner_of(&name) == Some(addr);
                    let here = c.on.contains(addr);
                    if c.wanted && ours && !here && (full || !c.failed) {
                        sub.push(name);
                    } else if here && (!c.wanted || !ours) {
                        unsub.push(name);
                    }
                }
                (sub, unsub)
            };
            full = false;
            if subscribe.is_empty() && unsubscribe.is_empty() {
                return Ok(());
            }
            for chunk in unsubscribe.chunks(BATCH) {
                let answers = self.shard_pipeline(conn, "SUNSUBSCRIBE", chunk).await?;
                for (name, answer) in chunk.iter().zip(answers) {
                    // Refused (the slot moved, and the master dropped it already) or done:
                    // either way it is not subscribed there any more.
                    if let Err(e) = answer {
                        tracing::debug!(node = %addr, channel = %name, error = %e, "SUNSUBSCRIBE refused");
                    }
                    self.shard_unsubscribed(addr, name);
                }
            }
            if self.history.is_some() {
                self.read_starting_points(&subscribe).await;
            }
            let mut refill = HashSet::new();
            for chunk in subscribe.chunks(BATCH) {
                let answers = self.shard_pipeline(conn, "SSUBSCRIBE", chunk).await?;
                let mut refused = Vec::new();
                for (name, answer) in chunk.iter().zip(answers) {
                    match answer {
                        Ok(_) => {
                            self.shard_subscribed(addr, name);
                            refill.insert(name.clone());
                        }
                        Err(e) => refused.push((name, e)),
                    }
                }
                if !refused.is_empty() {
                    self.shard_refused(refused);
                }
            }
            // History topics that were delivering before (this master's connection was lost,
            // or their slot moved here): what was published while they were not subscribed
            // comes from the history, before anything live (which waits in the push queue).
            if self.history.is_some() && !refill.is_empty() {
                {
                    let st = lock(&self.state);
                    refill.retain(|n| {
                        st.channels
                            .get(n)
                            .and_then(|c| c.cursor.as_ref())
                            .is_some_and(|c| c.delivered)
                    });
                }
                if !refill.is_empty() {
                    self.gap_fill(Some(addr), Some(&refill)).await;
                }
            }
        }
    }

    /// Channels a master refused to subscribe: a slot it does not serve (MOVED, ASK, a
    /// cluster that is down) makes the slot map be read again and they wait for it; any
    /// other refusal fails their waiting joins, and they are retried later.
    fn shard_refused(&self, refused: Vec<(&String, RedisError)>) {
        let cluster = self.cluster();
        let mut st = lock(&self.state);
        let mut failed = 0;
        for (name, e) in refused {
            let moved = matches!(
                e.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::Moved
                        | redis::ServerErrorKind::Ask
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::TryAgain
                )
            );
            if moved {
                cluster.request_refresh();
                continue;
            }
            tracing::warn!(channel = %name, error = %e, "SSUBSCRIBE refused; will retry");
            failed += 1;
            if let Some(c) = st.channels.get_mut(name) {
                c.failed = true;
                for w in c.waiters.drain(..) {
                    let _ = w.send(Err(BrokerError::Unavailable(format!(
                        "Redis refused SSUBSCRIBE: {e}"
                    ))));
                }
            }
        }
        self.metrics.subscribe_failures.inc_by(failed);
    }

    /// Sends `command` once per channel, pipelined; an answer per channel, `Err` for the
    /// whole when the connection failed or did not answer in time.
    async fn shard_pipeline(
        &self,
        conn: &mut MultiplexedConnection,
        command: &str,
        names: &[String],
    ) -> Result<Vec<Result<Value, RedisError>>, RedisError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for n in names {
            pipe.cmd(command).arg(n);
        }
        let answers: Vec<Result<Value, RedisError>> =
            tokio::time::timeout(self.timeout, pipe.query_async(conn))
                .await
                .map_err(|_| timeout_error())??;
        if let Some(Err(e)) = answers
            .iter()
            .find(|a| matches!(a, Err(e) if super::is_connection_error(e)))
        {
            return Err(e.clone());
        }
        Ok(answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from the Redis Cluster specification's examples.
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"ws:{news}"), slot_of(b"ws:__history__:{news}"));
        // An empty tag is no tag.
        assert_eq!(
            slot_of(b"{}x"),
            crc16::State::<crc16::XMODEM>::calculate(b"{}x") % SLOTS
        );
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert!(slot_of(b"") < SLOTS);
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn a_slot_map_is_parsed_and_answers_owners() {
        let value = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("10.0.0.2", 7001),
                node("10.0.0.5", 7004),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("", 7000)]),
        ]);
        let map = SlotMap::parse(&value, "127.0.0.1:7000").unwrap();
        assert_eq!(map.owner(0).map(|a| &**a), Some("127.0.0.1:7000"));
        assert_eq!(map.owner(5460).map(|a| &**a), Some("127.0.0.1:7000"));
        assert_eq!(map.owner(5461).map(|a| &**a), Some("10.0.0.2:7001"));
        assert_eq!(map.owner(16383).map(|a| &**a), Some("10.0.0.2:7001"));
        assert_eq!(map.covered(), 16384);
        assert_eq!(map.masters().len(), 2);
        assert!(map.nodes.contains(&"10.0.0.5:7004".to_owned()));
    }

    #[test]
    fn uncovered_slots_have_no_owner() {
        let value = Value::Array(vec![Value::Array(vec![
            Value::Int(100),
            Value::Int(200),
            node("h", 1),
        ])]);
        let map = SlotMap::parse(&value, "h:1").unwrap();
        assert!(map.owner(99).is_none());
        assert!(map.owner(201).is_none());
        assert_eq!(map.covered(), 101);
    }

    #[test]
    fn hostile_slot_maps_are_errors() {
        let bad = [
            Value::Nil,
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(5),
                Value::Int(1),
                node("h", 1),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(16384),
                node("h", 1),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(-1),
                Value::Int(3),
                node("h", 1),
            ])]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(3)])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(3),
                node("h", 0),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(3),
                node("h", 70000),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(3),
                node("a b", 1),
            ])]),
            Value::Array(vec![
                Value::Array(vec![Value::Int(0), Value::Int(10), node("h", 1)]),
                Value::Array(vec![Value::Int(10), Value::Int(20), node("h", 2)]),
            ]),
        ];
        for v in bad {
            assert!(SlotMap::parse(&v, "h:1").is_err(), "{v:?}");
        }
    }

    #[test]
    fn node_addresses_keep_credentials_and_tls() {
        let base = redis::Client::open("rediss://u:p@seed:6380/0")
            .unwrap()
            .get_connection_info()
            .clone();
        let info = node_info(&base, "10.1.2.3:7000").unwrap();
        assert!(
            matches!(info.addr(), redis::ConnectionAddr::TcpTls { host, port: 7000, .. } if host == "10.1.2.3")
        );
        assert_eq!(info.redis_settings().username(), Some("u"));
        assert_eq!(info.redis_settings().password(), Some("p"));
        for bad in ["nohost", ":1", "h:0", "h:x", "h:70000"] {
            assert!(node_info(&base, bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Any shape a server (or something posing as one) could answer `CLUSTER SLOTS` with.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<i64>().prop_map(Value::Int),
            (0i64..20000).prop_map(Value::Int),
            "[a-z0-9.:? ]{0,12}".prop_map(|s| Value::BulkString(s.into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::BulkString),
            "[a-z]{0,6}".prop_map(Value::SimpleString),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(Value::Array)
        })
    }

    proptest! {
        #[test]
        fn any_slot_map_answer_is_parsed_or_refused_never_a_panic(v in value()) {
            if let Ok(map) = SlotMap::parse(&v, "127.0.0.1:7000") {
                // What is accepted is consistent: ranges in order, not overlapping, and
                // every slot answered by the range that holds it.
                prop_assert!(map.ranges.windows(2).all(|w| w[0].1 < w[1].0));
                for (first, last, addr) in &map.ranges {
                    prop_assert!(first <= last && *last < SLOTS);
                    prop_assert_eq!(map.owner(*first), Some(addr));
                    prop_assert_eq!(map.owner(*last), Some(addr));
                }
            }
        }

        #[test]
        fn every_name_has_a_slot(name in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert!(slot_of(&name) < SLOTS);
        }
    }
}
