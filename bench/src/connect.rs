//! Opening many joined connections: the `connect` scenario (how fast) and the helper the
//! `idle` scenario uses to hold them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cli::ConnectArgs;
use crate::client::{self, Ws};
use crate::deployment::Deployment;
use crate::fanout::topic_names;
use crate::procfs::{self, CpuSnapshot, CpuUse};
use crate::report::{self, Latency, Output};

/// Connections that are open and joined, per replica.
pub struct Opened {
    pub conns: Vec<Ws>,
    pub per_replica: Vec<u64>,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Connect + handshake + acknowledged join, per connection.
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
}

/// Opens `n` connections round-robin over the replicas, at most `concurrency` at a time;
/// connection `i` joins `topics[i mod T]` and waits for the acknowledgement. Failures are
/// counted, not fatal.
///
/// # Errors
/// Only when nothing could be set up at all.
pub async fn open_joined(
    dep: &Deployment,
    n: usize,
    topics: Arc<Vec<String>>,
    concurrency: usize,
    label: &str,
) -> Result<Opened> {
    let replicas = dep.replicas.len();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        let endpoint = dep.replicas[i % replicas].clone();
        let (sem, topics) = (sem.clone(), topics.clone());
        pending.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let t0 = Instant::now();
            let mut ws = client::connect(&endpoint, i).await?;
            client::join(&mut ws, &topics[i % topics.len()], i as u64).await?;
            Ok::<_, anyhow::Error>((ws, i % replicas, t0.elapsed()))
        }));
    }
    let mut opened = Opened {
        conns: Vec::with_capacity(n),
        per_replica: vec![0; replicas],
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
        report::cpu_table(&mut o, &self.cpu, "conn");
        o
    }
}

/// `connect`.
///
/// # Errors
/// Setup failures.
pub async fn connect(
    dep: &Deployment,
    args: &ConnectArgs,
    concurrency: usize,
    out: Output,
) -> Result<ConnectReport> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let t = topic_count(args.topics, args.connections);
    let topics = Arc::new(topic_names(
        Some(&format!("conn-{}", std::process::id())),
        t,
    )?);
    dep.warn_fd_limits(args.connections.div_ceil(dep.replicas.len()));
    let overflows_before = procfs::listen_overflows();
    let before = CpuSnapshot::take(&dep.processes);
    let opened = open_joined(dep, args.connections, topics, concurrency, "connect").await?;
    let after = CpuSnapshot::take(&dep.processes);
    let listen_overflows = procfs::listen_overflows()
        .zip(overflows_before)
        .map(|(a, b)| a.saturating_sub(b));
    let ok = opened.conns.len() as u64;
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
        cpu: procfs::cpu_use(&dep.processes, &before, &after, ok),
    };
    drop(opened);
    out.emit(&report, || report.human());
    Ok(report)
}
