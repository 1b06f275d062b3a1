//! Opening many joined connections: the `connect` scenario (how fast), the helper the `idle`
//! scenario uses to hold them, and the helper processes that hold what one process cannot.

use std::fmt::Write as _;
use std::ops::Range;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cli::{ConnectArgs, HoldArgs};
use crate::client::{self, Ws, WsEndpoint};
use crate::deployment::{self, Deployment};
use crate::fanout::topic_names;
use crate::procfs::{self, CpuSnapshot, CpuUse};
use crate::report::{self, Latency, Output};
use crate::resp::{self, CommandCounts, RedisCommands};

/// Connections that are open and joined, per replica.
pub struct Opened {
    pub conns: Vec<Ws>,
    /// Connections held by helper processes (see [`open_joined`]).
    pub helper_conns: u64,
    /// Helper processes holding the rest; killed (closing their connections) on drop.
    helpers: Vec<Child>,
    pub per_replica: Vec<u64>,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Connect + handshake + acknowledged join, per connection.
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
}

impl Opened {
    /// Connections open and joined, in this process and its helpers.
    pub fn ok(&self) -> u64 {
        self.conns.len() as u64 + self.helper_conns
    }

    /// Processes holding connections besides this one.
    pub fn helper_processes(&self) -> usize {
        self.helpers.len()
    }
}

/// What a helper process reports once its share is open (one JSON line on its stdout).
#[derive(Debug, Serialize, Deserialize)]
struct HelperReport {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    per_replica: Vec<u64>,
    /// The latency histogram as (value µs, count) pairs.
    latency: Vec<(u64, u64)>,
}

/// Connections one bench process holds at most: `asked`, and never more than its open-file
/// limit, less a reserve, allows.
fn per_process_capacity(asked: Option<u64>) -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    let fits = soft.saturating_sub(256).max(64);
    usize::try_from(asked.map_or(fits, |a| a.min(fits))).unwrap_or(usize::MAX)
}

/// Opens `n` connections round-robin over the replicas, at most `concurrency` at a time per
/// process; connection `i` joins topic `i mod T` of `topic_names(topic_base, T)` and waits
/// for the acknowledgement. Failures are counted, not fatal.
///
/// More connections than this process may hold open files for are opened by helper
/// processes (this binary's hidden `hold` command), started at the same time, each with a
/// contiguous range of connection numbers; they keep their connections until the returned
/// value is dropped.
///
/// # Errors
/// When nothing could be set up at all, or a helper could not start or report.
pub async fn open_joined(
    dep: &Deployment,
    n: usize,
    (topic_base, t): (&str, usize),
    (concurrency, per_process): (usize, Option<u64>),
    label: &str,
) -> Result<Opened> {
    let topics = Arc::new(topic_names(Some(topic_base), t)?);
    let cap = per_process_capacity(per_process);
    let started = Instant::now();
    let mut helpers = Vec::new();
    let mut from = n.min(cap);
    while from < n {
        let to = (from + cap).min(n);
        helpers.push(spawn_helper(dep, from..to, (topic_base, t), concurrency)?);
        from = to;
    }
    if !helpers.is_empty() {
        eprintln!(
            "[{label}] {} connections per process at most (open-file limit): {} helper \
             process(es) open the rest",
            report::count(cap as u64),
            helpers.len()
        );
    }
    let mut opened = open_range(&dep.replicas, 0..n.min(cap), topics, concurrency, label).await?;
    for (mut child, range) in helpers {
        let line = match child.stdout.as_mut() {
            Some(out) => BufReader::new(out).lines().next_line().await?,
            None => None,
        };
        let Some(line) = line else {
            bail!("the helper for connections {range:?} ended without reporting");
        };
        let r: HelperReport = serde_json::from_str(&line)
            .with_context(|| format!("the helper for connections {range:?} reported {line:?}"))?;
        opened.helper_conns += r.ok;
        opened.failed += r.failed;
        if opened.first_error.is_none() {
            opened.first_error = r.first_error;
        }
        for (mine, theirs) in opened.per_replica.iter_mut().zip(&r.per_replica) {
            *mine += theirs;
        }
        for (value, count) in r.latency {
            let _ = opened.latency.record_n(value, count);
        }
        opened.helpers.push(child);
    }
    opened.elapsed = started.elapsed();
    Ok(opened)
}

fn spawn_helper(
    dep: &Deployment,
    range: Range<usize>,
    (topic_base, t): (&str, usize),
    concurrency: usize,
) -> Result<(Child, Range<usize>)> {
    let exe = std::env::current_exe().context("locating this binary for a helper process")?;
    let mut cmd = Command::new(exe);
    cmd.arg("hold")
        .args([
            "--from",
            &range.start.to_string(),
            "--to",
            &range.end.to_string(),
        ])
        .args(["--topic-base", topic_base, "--topics", &t.to_string()])
        .args(["--concurrency", &concurrency.to_string()]);
    if client::deflate_offered() {
        cmd.arg("--deflate");
    }
    for r in &dep.replicas {
        cmd.args(["--target", &r.url]);
    }
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a helper process")?;
    Ok((child, range))
}

/// The hidden `hold` command: opens connections `from..to` like [`open_joined`], reports them
/// as one JSON line, and keeps them open until its stdin closes.
///
/// # Errors
/// Bad targets, or nothing could be set up.
pub async fn hold(args: &HoldArgs) -> Result<()> {
    let endpoints = args
        .targets
        .iter()
        .map(|t| deployment::ws_endpoint(t, "/ws"))
        .collect::<Result<Vec<_>>>()?;
    if endpoints.is_empty() || args.from >= args.to {
        bail!("hold needs at least one --target and --from < --to");
    }
    let topics = Arc::new(topic_names(Some(&args.topic_base), args.topics.max(1))?);
    let label = format!("helper {}..{}", args.from, args.to);
    let opened = open_range(
        &endpoints,
        args.from..args.to,
        topics,
        args.concurrency,
        &label,
    )
    .await?;
    let report = HelperReport {
        ok: opened.ok(),
        failed: opened.failed,
        first_error: opened.first_error.clone(),
        per_replica: opened.per_replica.clone(),
        latency: opened
            .latency
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect(),
    };
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
        out.flush()?;
    }
    // Hold the connections until the parent closes our stdin (or kills us).
    tokio::task::spawn_blocking(|| {
        use std::io::Read as _;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
    })
    .await?;
    drop(opened);
    Ok(())
}

/// Opens connections `range` (numbers decide replica, topic and source address) in this
/// process.
async fn open_range(
    replicas: &[WsEndpoint],
    range: Range<usize>,
    topics: Arc<Vec<String>>,
    concurrency: usize,
    label: &str,
) -> Result<Opened> {
    let n = range.len();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let replica_count = replicas.len();
    for i in range {
        let endpoint = replicas[i % replica_count].clone();
        let (sem, topics) = (sem.clone(), topics.clone());
        pending.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let t0 = Instant::now();
            let mut ws = client::connect(&endpoint, i / replica_count).await?;
            client::join(&mut ws, &topics[i % topics.len()], i as u64).await?;
            Ok::<_, anyhow::Error>((ws, i % replica_count, t0.elapsed()))
        }));
    }
    let mut opened = Opened {
        conns: Vec::with_capacity(n),
        helper_conns: 0,
        helpers: Vec::new(),
        per_replica: vec![0; replica_count],
        failed: 0,
        first_error: None,
        latency: report::new_histogram(),
        elapsed: Duration::ZERO,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            next = pending.next() => match next {
                None => break,
                Some(Ok(Ok((ws, replica, took)))) => {
                    opened.conns.push(ws);
                    opened.per_replica[replica] += 1;
                    opened
                        .latency
                        .saturating_record((took.as_micros() as u64).max(1));
                }
                Some(Ok(Err(e))) => {
                    opened.failed += 1;
                    if opened.first_error.is_none() {
                        opened.first_error = Some(format!("{e:#}"));
                    }
                }
                Some(Err(e)) => {
                    opened.failed += 1;
                    if opened.first_error.is_none() {
                        opened.first_error = Some(format!("task failed: {e}"));
                    }
                }
            },
            _ = tick.tick() => eprintln!(
                "[{label}] {}/{n} connected and joined, {} failed",
                opened.conns.len(),
                opened.failed
            ),
        }
    }
    opened.elapsed = started.elapsed();
    eprintln!(
        "[{label}] {}/{n} connected and joined in {:.2}s, {} failed",
        opened.conns.len(),
        opened.elapsed.as_secs_f64(),
        opened.failed
    );
    if opened.conns.is_empty() && n > 0 {
        bail!(
            "no connection could be set up: {}",
            opened.first_error.unwrap_or_default()
        );
    }
    Ok(opened)
}

/// Topic count for `--topics` (default: one per connection).
pub fn topic_count(topics: Option<usize>, connections: usize) -> usize {
    topics.unwrap_or(connections).clamp(1, connections.max(1))
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    pub scenario: &'static str,
    pub replicas: usize,
    pub connections: usize,
    pub topics: usize,
    pub concurrency: usize,
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub elapsed_secs: f64,
    /// Connections opened and joins acknowledged per second.
    pub per_sec: f64,
    /// Connect + handshake + acknowledged join, per connection.
    pub latency: Latency,
    pub per_replica: Vec<u64>,
    /// Machine-wide listen-queue overflows during the run (SYNs dropped by a full accept
    /// queue: those clients waited for a retransmission).
    pub listen_overflows: Option<u64>,
    /// Bench processes that held the connections (more than one past the open-file limit;
    /// the bench's CPU line covers the first only).
    pub bench_processes: usize,
    /// What Redis ran meanwhile (with Redis; replicas' heartbeats included, two a second each).
    pub redis: Option<RedisCommands>,
    pub cpu: Vec<CpuUse>,
}

impl ConnectReport {
    fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "connect: {} connections on {} replica(s), {} topic(s), {} at a time",
            report::count(self.connections as u64),
            self.replicas,
            report::count(self.topics as u64),
            self.concurrency
        );
        let _ = writeln!(
            o,
            "  {} joined, {} failed in {:.2} s: {} connections+joins/s",
            report::count(self.ok),
            self.failed,
            self.elapsed_secs,
            report::count(self.per_sec as u64)
        );
        if let Some(e) = &self.first_error {
            let _ = writeln!(o, "  first error: {e}");
        }
        let _ = writeln!(
            o,
            "  connect+join latency: p50 {}, p99 {}, max {}",
            report::us(self.latency.p50_us),
            report::us(self.latency.p99_us),
            report::us(self.latency.max_us)
        );
        if let Some(n) = self.listen_overflows.filter(|&n| n > 0) {
            let _ = writeln!(
                o,
                "  {n} listen-queue overflows on this machine during the run: those SYNs were \
                 dropped and retried after 1 s (see docs/performance.md)"
            );
        }
        if let Some(r) = &self.redis {
            let _ = writeln!(
                o,
                "  redis: {} commands ({} SUBSCRIBE, {} UNSUBSCRIBE calls), {:+} channels",
                report::count(r.total),
                report::count(r.subscribe),
                report::count(r.unsubscribe),
                r.channels_added
            );
        }
        report::cpu_table(&mut o, &self.cpu, "conn");
        if self.bench_processes > 1 {
            let _ = writeln!(
                o,
                "  ({} bench processes held the connections; the bench line is the first one's)",
                self.bench_processes
            );
        }
        o
    }
}

/// Redis's command counters, when the deployment has a Redis to inspect.
async fn redis_counts(dep: &Deployment) -> Option<CommandCounts> {
    let target = dep.redis.as_ref()?;
    let read = async { resp::Client::connect(target).await?.command_counts().await };
    match read.await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("warning: cannot read redis's command counters: {e:#}");
            None
        }
    }
}

/// `connect`.
///
/// # Errors
/// Setup failures.
pub async fn connect(
    dep: &Deployment,
    args: &ConnectArgs,
    (concurrency, per_process): (usize, Option<u64>),
    out: Output,
) -> Result<ConnectReport> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let t = topic_count(args.topics, args.connections);
    let base = format!("conn-{}", std::process::id());
    dep.warn_fd_limits(args.connections.div_ceil(dep.replicas.len()));
    let overflows_before = procfs::listen_overflows();
    let redis_before = redis_counts(dep).await;
    let before = CpuSnapshot::take(&dep.processes);
    let opened = open_joined(
        dep,
        args.connections,
        (&base, t),
        (concurrency, per_process),
        "connect",
    )
    .await?;
    let after = CpuSnapshot::take(&dep.processes);
    let redis = match (redis_before, redis_counts(dep).await) {
        (Some(b), Some(a)) => Some(b.until(&a)),
        _ => None,
    };
    let listen_overflows = procfs::listen_overflows()
        .zip(overflows_before)
        .map(|(a, b)| a.saturating_sub(b));
    let ok = opened.ok();
    let elapsed = opened.elapsed.as_secs_f64().max(1e-9);
    let report = ConnectReport {
        scenario: "connect",
        replicas: dep.replicas.len(),
        connections: args.connections,
        topics: t,
        concurrency,
        ok,
        failed: opened.failed,
        first_error: opened.first_error.clone(),
        elapsed_secs: elapsed,
        per_sec: ok as f64 / elapsed,
        latency: Latency::of(&opened.latency),
        per_replica: opened.per_replica.clone(),
        listen_overflows,
        bench_processes: 1 + opened.helper_processes(),
        redis,
        cpu: procfs::cpu_use(&dep.processes, &before, &after, ok),
    };
    drop(opened);
    out.emit(&report, || report.human());
    Ok(report)
}
