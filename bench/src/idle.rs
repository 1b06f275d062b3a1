//! The idle scenario: N joined connections that do nothing; what they cost each gateway in
//! resident memory, and what they cost Redis in channels and memory.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::cli::IdleArgs;
use crate::connect::{open_joined, topic_count};
use crate::deployment::Deployment;
use crate::procfs::{self, Role};
use crate::report::{self, Output};
use crate::resp;

#[derive(Debug, Clone, Serialize)]
pub struct ProcessMemory {
    pub name: String,
    pub pid: u32,
    pub role: Role,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    /// Connections on this process (for `--pid` processes: all of them, as the replica a pid
    /// serves is unknown).
    pub connections: u64,
    pub bytes_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisMemory {
    /// Channels of this run (`{prefix}:idle-<pid>-*`).
    pub channels: u64,
    /// All channels with a subscriber.
    pub channels_total: u64,
    pub used_memory_before: u64,
    pub used_memory_after: u64,
    pub bytes_per_connection: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub replicas: usize,
    pub connections: usize,
    pub topics: usize,
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub processes: Vec<ProcessMemory>,
    /// Gateway RSS growth summed over the gateways (spawned and `--pid`), per connection.
    pub gateway_bytes_per_connection: Option<f64>,
    pub redis: Option<RedisMemory>,
    pub bench_rss: Option<u64>,
    /// Bench processes that held the connections (more than one past the open-file limit).
    pub bench_processes: usize,
}

impl IdleReport {
    fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "idle: {} connections on {} replica(s), {} topic(s); {} joined, {} failed",
            report::count(self.connections as u64),
            self.replicas,
            report::count(self.topics as u64),
            report::count(self.ok),
            self.failed
        );
        if let Some(e) = &self.first_error {
            let _ = writeln!(o, "  first error: {e}");
        }
        let _ = writeln!(
            o,
            "  {:<28} {:>11} {:>11} {:>8} {:>11}",
            "process", "rss before", "rss after", "conns", "per conn"
        );
        let opt = |v: Option<u64>| v.map_or("n/a".into(), |b| report::bytes(b as f64));
        for p in &self.processes {
            let _ = writeln!(
                o,
                "  {:<28} {:>11} {:>11} {:>8} {:>11}",
                format!("{} (pid {})", p.name, p.pid),
                opt(p.rss_before),
                opt(p.rss_after),
                p.connections,
                p.bytes_per_connection.map_or("n/a".into(), report::bytes)
            );
        }
        match self.gateway_bytes_per_connection {
            Some(b) => {
                let _ = writeln!(
                    o,
                    "  gateway RSS per connection, all replicas summed: {}",
                    report::bytes(b)
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "  gateway RSS: unknown (give --pid for gateways the bench did not start)"
                );
            }
        }
        if let Some(r) = &self.redis {
            let _ = writeln!(
                o,
                "  redis: {} channels for this run ({} in all), used_memory {} → {} ({} per \
                 connection)",
                report::count(r.channels),
                report::count(r.channels_total),
                report::bytes(r.used_memory_before as f64),
                report::bytes(r.used_memory_after as f64),
                report::bytes(r.bytes_per_connection)
            );
        }
        if let Some(b) = self.bench_rss {
            let _ = writeln!(o, "  (bench RSS {})", report::bytes(b as f64));
        }
        if self.bench_processes > 1 {
            let _ = writeln!(
                o,
                "  ({} bench processes held the connections)",
                self.bench_processes
            );
        }
        o
    }
}

async fn redis_state(dep: &Deployment, pattern: &str) -> Option<(u64, u64, u64)> {
    let target = dep.redis.as_ref()?;
    let inspect = async {
        let mut c = resp::Client::connect(target).await?;
        let ours = c.channel_count(pattern).await?;
        let all = c.channel_count("*").await?;
        let mem = c.used_memory().await?;
        Ok::<_, anyhow::Error>((ours, all, mem))
    };
    match inspect.await {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("warning: cannot inspect redis: {e:#}");
            None
        }
    }
}

/// `idle`.
///
/// # Errors
/// Setup failures.
pub async fn idle(
    dep: &Deployment,
    args: &IdleArgs,
    (concurrency, per_process): (usize, Option<u64>),
    out: Output,
) -> Result<IdleReport> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let t = topic_count(args.topics, args.connections);
    let base = format!("idle-{}", std::process::id());
    let pattern = if t == 1 {
        format!("{}:{base}", dep.key_prefix)
    } else {
        format!("{}:{base}-*", dep.key_prefix)
    };
    dep.warn_fd_limits(args.connections.div_ceil(dep.replicas.len()));
    let measured: Vec<_> = dep
        .processes
        .iter()
        .filter(|p| p.role != Role::Bench)
        .cloned()
        .collect();
    let rss_before: Vec<Option<u64>> = measured
        .iter()
        .map(|p| procfs::rss_bytes(p.pid).ok())
        .collect();
    let redis_before = redis_state(dep, &pattern).await;

    let opened = open_joined(
        dep,
        args.connections,
        (&base, t),
        (concurrency, per_process),
        "idle",
    )
    .await?;
    eprintln!("[idle] settling for {:.1}s", args.settle_secs);
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs.max(0.0))).await;

    let ok = opened.ok();
    let redis_after = redis_state(dep, &pattern).await;
    let mut gateway_index = 0;
    let mut gateway_delta: Option<i64> = None;
    let processes: Vec<ProcessMemory> = measured
        .iter()
        .zip(rss_before)
        .map(|(p, before)| {
            let after = procfs::rss_bytes(p.pid).ok();
            let connections = match p.role {
                Role::Gateway => {
                    let c = opened.per_replica.get(gateway_index).copied().unwrap_or(0);
                    gateway_index += 1;
                    c
                }
                Role::Redis => 0,
                _ => ok,
            };
            let delta = match (before, after) {
                (Some(b), Some(a)) => Some(a as i64 - b as i64),
                _ => None,
            };
            if p.role != Role::Redis
                && let Some(d) = delta
            {
                *gateway_delta.get_or_insert(0) += d;
            }
            ProcessMemory {
                name: p.name.clone(),
                pid: p.pid,
                role: p.role,
                rss_before: before,
                rss_after: after,
                connections,
                bytes_per_connection: delta
                    .filter(|_| connections > 0)
                    .map(|d| d as f64 / connections as f64),
            }
        })
        .collect();
    let redis = match (redis_before, redis_after) {
        (Some((_, _, mem_before)), Some((ours, all, mem_after))) => Some(RedisMemory {
            channels: ours,
            channels_total: all,
            used_memory_before: mem_before,
            used_memory_after: mem_after,
            bytes_per_connection: (mem_after as f64 - mem_before as f64) / ok.max(1) as f64,
        }),
        _ => None,
    };
    let report = IdleReport {
        scenario: "idle",
        replicas: dep.replicas.len(),
        connections: args.connections,
        topics: t,
        ok,
        failed: opened.failed,
        first_error: opened.first_error.clone(),
        processes,
        gateway_bytes_per_connection: gateway_delta
            .filter(|_| ok > 0)
            .map(|d| d as f64 / ok as f64),
        redis,
        bench_rss: procfs::rss_bytes(std::process::id()).ok(),
        bench_processes: 1 + opened.helper_processes(),
    };
    drop(opened);
    out.emit(&report, || report.human());
    Ok(report)
}
