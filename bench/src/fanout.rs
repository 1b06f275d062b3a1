//! The fan-out scenario: a session of subscribers that stays connected across runs, and runs
//! that publish at a paced rate and measure what arrives.
//!
//! Each run has an id carried in every payload, so a late message from an earlier run is
//! counted as stale instead of polluting the current one. Subscribers keep per-run state small:
//! a bitset of sequence numbers seen (for loss and duplicates) and shared, sharded latency
//! histograms per replica.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{Payload, Shape};
use crate::client::{self, Ws, WsEndpoint};
use crate::deployment::{Api, Deployment};
use crate::procfs::{self, CpuSnapshot, CpuUse, Role};
use crate::report::{self, Latency, Output};
use crate::resp;

/// Latency histogram shards per replica: subscribers lock one shard per message, so a few
/// shards keep the worker threads from meeting on one lock.
const SHARDS: usize = 8;
/// Subscribers send `{"type":"heartbeat"}` this often, so a gateway's idle timeout does not
/// close them during long runs (receiving does not count as activity).
const HEARTBEAT: Duration = Duration::from_secs(30);
/// A drain ends early when nothing arrived for this long after the last publish.
const STALL: Duration = Duration::from_secs(2);
/// Per-subscriber bitsets are bounded: messages per run × subscribers / 8 bytes.
const MAX_BITSET_BYTES: u64 = 2 << 30;

/// Subscribers connected to the deployment, joined, and reading.
pub struct Session {
    replicas: Vec<WsEndpoint>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    /// Subscribers per replica and topic: `[replica][topic]`.
    layout: Vec<Vec<u64>>,
    topics: Vec<String>,
}

struct Shared {
    current: Mutex<Option<Arc<Run>>>,
    /// Subscribers whose connection ended, per replica.
    closed: Vec<AtomicU64>,
    /// Payloads of another run, and messages that are no payload at all.
    stale: AtomicU64,
    foreign: AtomicU64,
}

struct Run {
    id: u32,
    messages: u64,
    replicas: Vec<ReplicaRun>,
}

struct ReplicaRun {
    received: AtomicU64,
    duplicates: AtomicU64,
    hist: Vec<Mutex<Histogram<u64>>>,
}

impl Run {
    fn new(id: u32, messages: u64, replicas: usize) -> Self {
        Self {
            id,
            messages,
            replicas: (0..replicas)
                .map(|_| ReplicaRun {
                    received: AtomicU64::new(0),
                    duplicates: AtomicU64::new(0),
                    hist: (0..SHARDS)
                        .map(|_| Mutex::new(report::new_histogram()))
                        .collect(),
                })
                .collect(),
        }
    }

    fn received(&self) -> u64 {
        self.replicas
            .iter()
            .map(|r| r.received.load(Ordering::Relaxed))
            .sum()
    }
}

/// Topic names for a run: `base` alone, or `base-0 … base-(T-1)`.
pub fn topic_names(base: Option<&str>, topics: usize) -> Result<Vec<String>> {
    let base = base.map_or_else(|| format!("bench-{}", std::process::id()), str::to_string);
    let names: Vec<String> = if topics <= 1 {
        vec![base]
    } else {
        (0..topics).map(|i| format!("{base}-{i}")).collect()
    };
    if let Some(bad) = names.iter().find(|t| !client::valid_topic(t)) {
        bail!("invalid topic {bad:?}: 1-256 of a-z A-Z 0-9 _ : . - (and not reserved)");
    }
    Ok(names)
}

impl Session {
    /// Connects `subscribers` connections round-robin over the replicas; subscriber `i` joins
    /// topic `(i / replicas) mod topics` and waits for its acknowledgement.
    ///
    /// # Errors
    /// The first connection or join that fails.
    pub async fn open(
        dep: &Deployment,
        subscribers: usize,
        topics: Vec<String>,
        concurrency: usize,
    ) -> Result<Self> {
        let n = dep.replicas.len();
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            closed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            stale: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        });
        let mut layout = vec![vec![0u64; topics.len()]; n];
        let sem = Arc::new(Semaphore::new(concurrency.max(1)));
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<()>>();
        let mut tasks = Vec::with_capacity(subscribers);
        for i in 0..subscribers {
            let replica = i % n;
            let topic_idx = (i / n) % topics.len();
            layout[replica][topic_idx] += 1;
            let endpoint = dep.replicas[replica].clone();
            let topic = topics[topic_idx].clone();
            let (sem, ready, shared) = (sem.clone(), ready_tx.clone(), shared.clone());
            tasks.push(tokio::spawn(async move {
                let permit = sem.acquire_owned().await;
                let setup = async {
                    let mut ws = client::connect(&endpoint, i / n).await?;
                    client::join(&mut ws, &topic, i as u64).await?;
                    Ok::<_, anyhow::Error>(ws)
                }
                .await;
                drop(permit);
                match setup {
                    Ok(ws) => {
                        let _ = ready.send(Ok(()));
                        subscriber(ws, i % SHARDS, replica, shared).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            }));
        }
        drop(ready_tx);
        let mut session = Self {
            replicas: dep.replicas.clone(),
            shared,
            tasks,
            layout,
            topics,
        };
        let started = Instant::now();
        let mut ready = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while ready < subscribers {
            tokio::select! {
                r = ready_rx.recv() => match r {
                    Some(Ok(())) => ready += 1,
                    Some(Err(e)) => {
                        session.close();
                        return Err(e.context(format!(
                            "subscriber setup failed after {ready} of {subscribers} joined"
                        )));
                    }
                    None => break,
                },
                _ = tick.tick() => eprintln!("[fanout] {ready}/{subscribers} subscribers joined"),
            }
        }
        eprintln!(
            "[fanout] {ready}/{subscribers} subscribers joined in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        Ok(session)
    }

    /// Subscribers whose connection has ended.
    pub fn closed(&self) -> u64 {
        self.shared
            .closed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Drops every connection.
    pub fn close(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Publishes `messages` messages at `rate` per second and measures their delivery.
    ///
    /// # Errors
    /// When the publisher cannot run at all (bad URL); publish failures are reported, not
    /// returned.
    pub async fn run(
        &self,
        dep: &Deployment,
        run_id: u32,
        rate: f64,
        messages: u64,
        shape: &Shape,
    ) -> Result<FanoutReport> {
        if !(rate > 0.0 && rate.is_finite()) {
            bail!("--rate must be a positive number");
        }
        let subscribers: u64 = self.layout.iter().flatten().sum();
        if messages.saturating_mul(subscribers) / 8 > MAX_BITSET_BYTES {
            bail!(
                "{messages} messages × {subscribers} subscribers needs more than {} of \
                 bookkeeping; use fewer messages per run",
                report::bytes(MAX_BITSET_BYTES as f64)
            );
        }
        let run = Arc::new(Run::new(run_id, messages, self.replicas.len()));
        *lock(&self.shared.current) = Some(run.clone());
        let stale_before = self.shared.stale.load(Ordering::Relaxed);
        let foreign_before = self.shared.foreign.load(Ordering::Relaxed);
        let closed_before: Vec<u64> = self
            .shared
            .closed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();

        let workers = shape
            .publishers
            .unwrap_or_else(|| ((rate / 50.0 / shape.batch as f64).ceil() as usize).clamp(2, 128))
            .max(1);
        let publisher = Publisher {
            api: dep.api.clone(),
            topics: Arc::new(self.topics.clone()),
            run: run_id,
            rate,
            messages,
            size: shape.size,
            batch: shape.batch,
            payload: shape.payload,
            sent: Arc::new(AtomicU64::new(0)),
        };
        let sent = publisher.sent.clone();
        let client = publisher.client(workers).await?;
        let cpu_before = CpuSnapshot::take(&dep.processes);
        let wire_before = client::wire_bytes();
        let start = Instant::now() + Duration::from_millis(20);
        let mut pub_task = tokio::spawn(publisher.run(client, start, workers));

        let drain_max = Duration::from_secs_f64(shape.drain_secs.max(0.0));
        let mut pub_done: Option<(PublishStats, Instant)> = None;
        let mut expected = u64::MAX;
        let mut last_total = 0;
        let mut last_change = Instant::now();
        let mut next_progress = Instant::now() + Duration::from_secs(1);
        loop {
            if pub_done.is_none() {
                tokio::select! {
                    r = &mut pub_task => {
                        let stats = r.context("publisher task failed")??;
                        expected = self.expected(&stats.ok_per_topic).iter().sum();
                        pub_done = Some((stats, Instant::now()));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let now = Instant::now();
            let total = run.received();
            if total != last_total {
                last_total = total;
                last_change = now;
            }
            if let Some((_, done_at)) = &pub_done {
                let waited = now - *done_at;
                if total >= expected
                    || waited >= drain_max
                    || (waited >= STALL && now - last_change >= STALL)
                {
                    break;
                }
            }
            if now >= next_progress {
                next_progress = now + Duration::from_secs(1);
                eprintln!(
                    "[fanout] run {run_id}: published {}/{messages}, received {}{}",
                    sent.load(Ordering::Relaxed),
                    report::count(total),
                    if expected == u64::MAX {
                        String::new()
                    } else {
                        format!("/{}", report::count(expected))
                    }
                );
            }
        }
        let cpu_after = CpuSnapshot::take(&dep.processes);
        let wire = client::wire_bytes() - wire_before;
        let Some((stats, _)) = pub_done else {
            bail!("publisher did not finish");
        };
        let elapsed = (last_change - start).as_secs_f64().max(1e-9);
        let received = run.received();
        let cpu = procfs::cpu_use(&dep.processes, &cpu_before, &cpu_after, received);
        Ok(self.report(
            &run,
            rate,
            shape,
            stats,
            elapsed,
            cpu,
            Counters {
                stale: self.shared.stale.load(Ordering::Relaxed) - stale_before,
                foreign: self.shared.foreign.load(Ordering::Relaxed) - foreign_before,
                closed_before,
                wire,
            },
        ))
    }

    /// Expected deliveries per replica, given successful publishes per topic.
    fn expected(&self, ok_per_topic: &[u64]) -> Vec<u64> {
        self.layout
            .iter()
            .map(|per_topic| {
                per_topic
                    .iter()
                    .zip(ok_per_topic)
                    .map(|(s, ok)| s * ok)
                    .sum()
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        run: &Run,
        rate: f64,
        shape: &Shape,
        stats: PublishStats,
        elapsed: f64,
        cpu: Vec<CpuUse>,
        counters: Counters,
    ) -> FanoutReport {
        let expected = self.expected(&stats.ok_per_topic);
        let mut all = report::new_histogram();
        let mut per_replica = Vec::new();
        for (i, r) in run.replicas.iter().enumerate() {
            let mut h = report::new_histogram();
            for shard in &r.hist {
                let _ = h.add(&*lock(shard));
            }
            let _ = all.add(&h);
            let received = r.received.load(Ordering::Relaxed);
            per_replica.push(ReplicaReport {
                replica: i,
                url: self.replicas[i].url.clone(),
                subscribers: self.layout[i].iter().sum(),
                expected: expected[i],
                received,
                lost: expected[i].saturating_sub(received),
                duplicates: r.duplicates.load(Ordering::Relaxed),
                closed: self.shared.closed[i].load(Ordering::Relaxed)
                    - counters.closed_before.get(i).copied().unwrap_or(0),
                latency: Latency::of(&h),
            });
        }
        let per_replica_closed = per_replica.iter().map(|r| r.closed).sum();
        let expected_total: u64 = expected.iter().sum();
        let received = run.received();
        let lost = expected_total.saturating_sub(received);
        let published = stats.ok_per_topic.iter().sum::<u64>();
        let attempts = published + stats.failed;
        let achieved = if attempts > 1 && stats.last_start > 0.0 {
            (attempts - 1) as f64 / stats.last_start
        } else {
            rate
        };
        // The rate is kept when the last message left at most 3 % of the run late (50 ms for
        // short runs): a publisher that cannot keep up falls further behind with every message,
        // while a brief stall of the machine does not fail a run.
        let scheduled = attempts.saturating_sub(1) as f64 / rate;
        let final_lag = (stats.last_start - scheduled).max(0.0);
        let kept_rate = stats.failed == 0 && final_lag <= (0.03 * scheduled).max(0.05);
        let server_cpu = cpu
            .iter()
            .find(|c| c.name == "servers total")
            .and_then(|c| c.us_per_unit);
        let bench_cpu = cpu
            .iter()
            .find(|c| c.role == Role::Bench)
            .and_then(|c| c.cpu_seconds);
        FanoutReport {
            scenario: "fanout",
            run: run.id,
            replicas: self.replicas.len(),
            subscribers: self.layout.iter().flatten().sum(),
            topics: self.topics.len(),
            rate,
            messages: run.messages,
            size: shape.size,
            published,
            publish_failed: stats.failed,
            publish_error: stats.first_error,
            achieved_rate: achieved,
            kept_rate,
            max_publish_lag_ms: stats.max_lag.as_secs_f64() * 1e3,
            publish_http: Latency::of(&stats.http),
            expected: expected_total,
            received,
            lost,
            loss_pct: if expected_total > 0 {
                lost as f64 * 100.0 / expected_total as f64
            } else {
                0.0
            },
            duplicates: run
                .replicas
                .iter()
                .map(|r| r.duplicates.load(Ordering::Relaxed))
                .sum(),
            stale: counters.stale,
            foreign: counters.foreign,
            closed_subscribers: per_replica_closed,
            elapsed_secs: elapsed,
            deliveries_per_sec: received as f64 / elapsed,
            latency: Latency::of(&all),
            per_replica,
            server_us_per_delivery: server_cpu,
            deflate: client::deflate_offered(),
            wire_bytes: counters.wire,
            wire_bytes_per_delivery: (received > 0).then(|| counters.wire as f64 / received as f64),
            bench_cpu_seconds: bench_cpu,
            bench_cpu_pct_of_one_core: bench_cpu.map(|s| s * 100.0 / elapsed),
            cpu,
            history: None,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

struct Counters {
    stale: u64,
    foreign: u64,
    /// Closed subscribers per replica when the run started.
    closed_before: Vec<u64>,
    /// Bytes the subscribers read during the run.
    wire: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a subscriber task panicked mid-record; the data is counts.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A subscriber's read loop: parse the leading numbers, check the bitset, record latency.
async fn subscriber(mut ws: Ws, shard: usize, replica: usize, shared: Arc<Shared>) {
    let mut run: Option<Arc<Run>> = None;
    let mut seen: Vec<u64> = Vec::new();
    let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = heartbeat.tick() => {
                if ws.send(Message::text(r#"{"type":"heartbeat"}"#)).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let bytes = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                shared.foreign.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let now = client::unix_nanos();
        let Some((run_id, seq, sent)) = client::parse_payload(bytes.as_bytes()) else {
            shared.foreign.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if run.as_ref().is_none_or(|r| r.id != run_id) {
            let current = lock(&shared.current).clone();
            match current {
                Some(r) if r.id == run_id => {
                    seen.clear();
                    seen.resize(r.messages.div_ceil(64) as usize, 0);
                    run = Some(r);
                }
                _ => {
                    shared.stale.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let Some(r) = &run else { continue };
        if seq >= r.messages {
            shared.foreign.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        let stats = &r.replicas[replica];
        if seen[word] & bit != 0 {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        seen[word] |= bit;
        stats.received.fetch_add(1, Ordering::Relaxed);
        let latency_us = now.saturating_sub(sent) / 1000;
        lock(&stats.hist[shard]).saturating_record(latency_us.max(1));
    }
    shared.closed[replica].fetch_add(1, Ordering::Relaxed);
}

/// Publishes a run: message `seq` is due at `start + seq / rate`; `workers` tasks take the
/// next sequence number, wait for its time, stamp it and POST it, so a slow request does not
/// hold back the schedule while other workers are free.
struct Publisher {
    api: Api,
    topics: Arc<Vec<String>>,
    run: u32,
    rate: f64,
    messages: u64,
    size: usize,
    /// Messages per request (`POST /api/batch` above 1).
    batch: u64,
    payload: Payload,
    sent: Arc<AtomicU64>,
}

struct PublishStats {
    ok_per_topic: Vec<u64>,
    failed: u64,
    first_error: Option<String>,
    max_lag: Duration,
    /// Seconds from the schedule's start to the start of the last request.
    last_start: f64,
    http: Histogram<u64>,
}

impl PublishStats {
    fn new(topics: usize) -> Self {
        Self {
            ok_per_topic: vec![0; topics],
            failed: 0,
            first_error: None,
            max_lag: Duration::ZERO,
            last_start: 0.0,
            http: report::new_histogram(),
        }
    }

    /// Waits for every publisher worker and adds up what they did.
    async fn gather(handles: Vec<JoinHandle<PublishStats>>, topics: usize) -> Result<Self> {
        let mut total = Self::new(topics);
        for h in handles {
            total.merge(
                h.await
                    .map_err(|e| anyhow!("publisher worker failed: {e}"))?,
            );
        }
        Ok(total)
    }

    fn merge(&mut self, other: PublishStats) {
        for (a, b) in self.ok_per_topic.iter_mut().zip(other.ok_per_topic) {
            *a += b;
        }
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.max_lag = self.max_lag.max(other.max_lag);
        self.last_start = self.last_start.max(other.last_start);
        let _ = self.http.add(&other.http);
    }
}

impl Publisher {
    /// An HTTP client with `workers` connections already open, so the first messages of the
    /// schedule do not pay for connection set-up.
    async fn client(&self, workers: usize) -> Result<reqwest::Client> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(workers)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let health = self.api.url("healthz")?;
        let warm = (0..workers).map(|_| {
            let (client, health) = (client.clone(), health.clone());
            async move {
                let resp = client.get(health).send().await?;
                let _ = resp.bytes().await;
                Ok::<_, reqwest::Error>(())
            }
        });
        for r in futures_util::future::join_all(warm).await {
            r.with_context(|| format!("cannot reach the API at {}", self.api.base))?;
        }
        Ok(client)
    }

    /// Publishes the schedule with `workers` tasks: one message per `POST /api/publish`, or
    /// `batch` consecutive ones per `POST /api/batch`, each item counted by its own answer.
    async fn run(
        self,
        client: reqwest::Client,
        start: Instant,
        workers: usize,
    ) -> Result<PublishStats> {
        let batched = self.batch > 1;
        let url = self
            .api
            .url(if batched { "api/batch" } else { "api/publish" })?;
        let next = Arc::new(AtomicU64::new(0));
        let this = Arc::new(self);
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (client, url, next, this) =
                (client.clone(), url.clone(), next.clone(), this.clone());
            handles.push(tokio::spawn(async move {
                let mut stats = PublishStats::new(this.topics.len());
                loop {
                    let first = next.fetch_add(this.batch, Ordering::Relaxed);
                    if first >= this.messages {
                        break;
                    }
                    let end = (first + this.batch).min(this.messages);
                    let due = start + Duration::from_secs_f64(first as f64 / this.rate);
                    tokio::time::sleep_until(due).await;
                    let begin = Instant::now();
                    stats.max_lag = stats.max_lag.max(begin - due);
                    stats.last_start = stats.last_start.max((begin - start).as_secs_f64());
                    let stamp = client::unix_nanos();
                    let items: Vec<String> =
                        (first..end).map(|seq| this.item(seq, stamp)).collect();
                    let body = if batched {
                        format!(r#"{{"messages":[{}]}}"#, items.join(","))
                    } else {
                        items.concat()
                    };
                    let mut req = client
                        .post(url.clone())
                        .header("content-type", "application/json")
                        .body(body);
                    if let Some(key) = &this.api.key {
                        req = req.bearer_auth(key);
                    }
                    let count = (end - first) as usize;
                    let outcome = match req.send().await {
                        Ok(resp) => answers(resp, batched, count).await,
                        Err(e) => vec![Err(format!("{e}")); count],
                    };
                    let took = begin.elapsed();
                    stats
                        .http
                        .saturating_record((took.as_micros() as u64).max(1));
                    for (seq, r) in (first..end).zip(outcome) {
                        match r {
                            Ok(()) => {
                                stats.ok_per_topic[(seq % this.topics.len() as u64) as usize] += 1;
                            }
                            Err(e) => {
                                stats.failed += 1;
                                if stats.first_error.is_none() {
                                    stats.first_error = Some(e);
                                }
                            }
                        }
                    }
                    this.sent.fetch_add(end - first, Ordering::Relaxed);
                }
                stats
            }));
        }
        PublishStats::gather(handles, this.topics.len()).await
    }

    /// Message `seq`'s publish body (or batch item), sent at `stamp`.
    fn item(&self, seq: u64, stamp: u64) -> String {
        let topic = &self.topics[(seq % self.topics.len() as u64) as usize];
        match self.payload {
            Payload::Text => format!(
                r#"{{"topic":"{topic}","message":"{}"}}"#,
                client::encode_payload(self.run, seq, stamp, self.size)
            ),
            Payload::Json => serde_json::json!({
                "topic": topic,
                "message": client::encode_json_payload(self.run, seq, stamp, self.size),
            })
            .to_string(),
        }
    }
}

/// Each message's answer: the response's status for a single publish; for a batch, each
/// item's own result.
async fn answers(resp: reqwest::Response, batched: bool, count: usize) -> Vec<Result<(), String>> {
    let status = resp.status();
    if !batched {
        if status.is_success() {
            let _ = resp.bytes().await;
            return vec![Ok(())];
        }
        let text = resp.text().await.unwrap_or_default();
        return vec![Err(format!("HTTP {status}: {}", text.trim()))];
    }
    let answer: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    match answer["results"].as_array() {
        Some(results) => results
            .iter()
            .map(|r| {
                if r["ok"] == true {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}: {}", r["error"]))
                }
            })
            .collect(),
        None => vec![Err(format!("HTTP {status}: {answer}")); count],
    }
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub run: u32,
    pub replicas: usize,
    pub subscribers: u64,
    pub topics: usize,
    pub rate: f64,
    pub messages: u64,
    pub size: usize,
    pub published: u64,
    pub publish_failed: u64,
    pub publish_error: Option<String>,
    pub achieved_rate: f64,
    pub kept_rate: bool,
    pub max_publish_lag_ms: f64,
    pub publish_http: Latency,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub duplicates: u64,
    pub stale: u64,
    pub foreign: u64,
    pub closed_subscribers: u64,
    pub elapsed_secs: f64,
    pub deliveries_per_sec: f64,
    pub latency: Latency,
    pub per_replica: Vec<ReplicaReport>,
    pub server_us_per_delivery: Option<f64>,
    /// The subscribers offered permessage-deflate.
    pub deflate: bool,
    /// What the subscribers read from their sockets during the run (frames, headers
    /// included; TCP/IP not), in total and per delivery.
    pub wire_bytes: u64,
    pub wire_bytes_per_delivery: Option<f64>,
    pub bench_cpu_seconds: Option<f64>,
    pub bench_cpu_pct_of_one_core: Option<f64>,
    pub cpu: Vec<CpuUse>,
    /// What the topics' histories hold in Redis after the run (gateways with
    /// `--history-topics`).
    pub history: Option<HistoryUse>,
}

/// The history streams in Redis: how many, the messages they keep, their memory.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryUse {
    pub streams: u64,
    pub messages_kept: u64,
    pub bytes: u64,
    pub bytes_per_1000_messages: Option<f64>,
}

/// Measures the history streams under `prefix` (`SCAN`, then `XLEN` and `MEMORY USAGE` of
/// each); `None` when there are none.
async fn history_use(dep: &Deployment) -> Option<HistoryUse> {
    let target = dep.redis.as_ref()?;
    let pattern = format!("{}:__history__:*", dep.key_prefix);
    let inspect = async {
        let mut c = resp::Client::connect(target).await?;
        let mut cursor = "0".to_owned();
        let mut keys = Vec::new();
        loop {
            let reply = c
                .command(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
                .await?;
            let resp::Reply::Array(Some(parts)) = reply else {
                anyhow::bail!("unexpected SCAN reply");
            };
            let mut parts = parts.into_iter();
            let (Some(resp::Reply::Bulk(Some(next))), Some(resp::Reply::Array(found))) =
                (parts.next(), parts.next())
            else {
                anyhow::bail!("unexpected SCAN reply");
            };
            for k in found.unwrap_or_default() {
                if let resp::Reply::Bulk(Some(k)) = k {
                    keys.push(String::from_utf8_lossy(&k).into_owned());
                }
            }
            cursor = String::from_utf8_lossy(&next).into_owned();
            if cursor == "0" {
                break;
            }
        }
        let (mut kept, mut bytes) = (0u64, 0u64);
        for k in &keys {
            if let resp::Reply::Int(n) = c.command(&["XLEN", k]).await? {
                kept += n.max(0) as u64;
            }
            if let resp::Reply::Int(n) = c.command(&["MEMORY", "USAGE", k]).await? {
                bytes += n.max(0) as u64;
            }
        }
        Ok::<_, anyhow::Error>((keys.len() as u64, kept, bytes))
    };
    match inspect.await {
        Ok((0, _, _)) => None,
        Ok((streams, kept, bytes)) => Some(HistoryUse {
            streams,
            messages_kept: kept,
            bytes,
            bytes_per_1000_messages: (kept > 0).then(|| bytes as f64 * 1000.0 / kept as f64),
        }),
        Err(e) => {
            eprintln!("warning: cannot measure the history in redis: {e:#}");
            None
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaReport {
    pub replica: usize,
    pub url: String,
    pub subscribers: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub closed: u64,
    pub latency: Latency,
}

impl FanoutReport {
    pub fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "fanout run {}: {} subscribers on {} replica(s), {} topic(s), {} msg/s × {} messages \
             of {} B",
            self.run,
            report::count(self.subscribers),
            self.replicas,
            self.topics,
            self.rate,
            report::count(self.messages),
            self.size
        );
        let _ = writeln!(
            o,
            "  publish   {} ok, {} failed; {:.1} msg/s achieved ({}), max lag {:.1} ms, HTTP p50 \
             {} p99 {}",
            report::count(self.published),
            self.publish_failed,
            self.achieved_rate,
            if self.kept_rate {
                "rate kept"
            } else {
                "RATE NOT KEPT"
            },
            self.max_publish_lag_ms,
            report::us(self.publish_http.p50_us),
            report::us(self.publish_http.p99_us),
        );
        if let Some(e) = &self.publish_error {
            let _ = writeln!(o, "  first publish error: {e}");
        }
        let _ = writeln!(
            o,
            "  delivery  {}/{} received, {} lost ({:.3} %), {} duplicates, {} subscribers \
             closed; {}/s over {:.2} s",
            report::count(self.received),
            report::count(self.expected),
            report::count(self.lost),
            self.loss_pct,
            self.duplicates,
            self.closed_subscribers,
            report::count(self.deliveries_per_sec as u64),
            self.elapsed_secs
        );
        if self.stale + self.foreign > 0 {
            let _ = writeln!(
                o,
                "  also      {} from earlier runs, {} not bench payloads",
                self.stale, self.foreign
            );
        }
        let _ = writeln!(
            o,
            "  {:<12} {:>7} {:>12} {:>9} {:>9} {:>9} {:>9}",
            "latency", "subs", "received", "p50", "p99", "p99.9", "max"
        );
        let row = |o: &mut String, name: &str, subs: u64, received: u64, l: &Latency| {
            let _ = writeln!(
                o,
                "  {:<12} {:>7} {:>12} {:>9} {:>9} {:>9} {:>9}",
                name,
                subs,
                received,
                report::us(l.p50_us),
                report::us(l.p99_us),
                report::us(l.p999_us),
                report::us(l.max_us)
            );
        };
        row(
            &mut o,
            "all",
            self.subscribers,
            self.received,
            &self.latency,
        );
        if self.per_replica.len() > 1 {
            for r in &self.per_replica {
                row(
                    &mut o,
                    &format!("replica {}", r.replica),
                    r.subscribers,
                    r.received,
                    &r.latency,
                );
            }
        }
        if let Some(per) = self.wire_bytes_per_delivery {
            let _ = writeln!(
                o,
                "  wire      {} B read by the subscribers, {per:.1} B per delivery ({})",
                report::count(self.wire_bytes),
                if self.deflate {
                    "permessage-deflate offered"
                } else {
                    "no compression offered"
                }
            );
        }
        report::cpu_table(&mut o, &self.cpu, "delivery");
        if let Some(h) = &self.history {
            let _ = writeln!(
                o,
                "  history   {} streams keep {} messages in {} of Redis memory ({} per 1,000 messages)",
                report::count(h.streams),
                report::count(h.messages_kept),
                report::bytes(h.bytes as f64),
                h.bytes_per_1000_messages
                    .map_or("n/a".into(), report::bytes)
            );
        }
        if let Some(pct) = self.bench_cpu_pct_of_one_core {
            let _ = writeln!(
                o,
                "  (the bench used {pct:.0} % of one core; it shares this machine's cores with \
                 the servers)"
            );
        }
        o
    }

    /// Why this run does not count as sustained, if it does not.
    pub fn failure(&self, max_loss_pct: f64, max_p99_us: u64) -> Option<String> {
        if self.publish_failed > 0 {
            return Some(format!("{} publishes failed", self.publish_failed));
        }
        if !self.kept_rate {
            return Some(format!(
                "publisher reached only {:.0} msg/s",
                self.achieved_rate
            ));
        }
        if self.loss_pct > max_loss_pct {
            return Some(format!("loss {:.3} %", self.loss_pct));
        }
        if self.latency.p99_us > max_p99_us {
            return Some(format!("p99 {}", report::us(self.latency.p99_us)));
        }
        if self.closed_subscribers > 0 {
            return Some(format!(
                "{} subscribers were disconnected",
                self.closed_subscribers
            ));
        }
        None
    }
}

/// `fanout`: one session, one run.
///
/// # Errors
/// Setup failures.
pub async fn fanout(
    dep: &Deployment,
    args: &crate::cli::FanoutArgs,
    concurrency: usize,
    out: Output,
) -> Result<FanoutReport> {
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    if args.subscribers == 0 {
        bail!("--subscribers must be at least 1");
    }
    let topics = topic_names(args.shape.topic.as_deref(), args.shape.topics.max(1))?;
    dep.warn_fd_limits(args.subscribers.div_ceil(dep.replicas.len()));
    let session = Session::open(dep, args.subscribers, topics, concurrency).await?;
    let mut report = session
        .run(dep, 1, args.rate, args.messages, &args.shape)
        .await?;
    report.history = history_use(dep).await;
    out.emit(&report, || report.human());
    Ok(report)
}
