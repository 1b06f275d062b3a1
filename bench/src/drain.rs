//! `drain`: what one gateway's SIGTERM does to the rest of the fleet.
//!
//! C connections are opened on the first replica, each joined to a topic. Each behaves like the
//! seed's browser client (`@orijs/websocket-client`): after a close it waits `500 ms + a random
//! share of min(20 s, 500 ms × 2^attempt)` — 0.5 to 1 s the first time — and reconnects, here to
//! the next replica (where a Service would send it: the draining pod is no longer ready), and
//! rejoins its topic. Then the first replica gets SIGTERM. Reported: how fast the closes came,
//! the peak reconnect rate the other replicas took (in any 1 s and any 100 ms window), and how
//! long until every client was back.
//!
//! The drain itself is the gateway's: pass its settings with `--gateway-arg`, e.g.
//! `--gateway-arg=--drain-timeout-secs=30 --gateway-arg=--drain-rate=500`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cli::DrainArgs;
use crate::client::{self, WsEndpoint};
use crate::connect::topic_count;
use crate::deployment::Deployment;
use crate::procfs::Role;
use crate::report::{self, Output};

/// The seed client's first reconnect delay and its cap.
const SEED_MIN_DELAY_MS: u64 = 500;
const SEED_MAX_DELAY_MS: u64 = 20_000;

/// One client's drain, in milliseconds after the SIGTERM.
#[derive(Debug, Clone, Copy)]
struct Moved {
    closed_ms: f64,
    back_ms: f64,
    attempts: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    pub scenario: &'static str,
    pub connections: usize,
    pub topics: usize,
    /// The `--gateway-arg`s the gateways ran with.
    pub gateway_args: Vec<String>,
    /// Clients closed by the draining replica and back on another one.
    pub moved: usize,
    /// Clients whose close never came, or that could not get back.
    pub lost: usize,
    /// From the first close to the last, in seconds.
    pub closing_secs: f64,
    /// Most closes in any 1 s window.
    pub peak_closes_per_sec: usize,
    /// Most reconnects (connected and joined) in any 1 s window.
    pub peak_reconnects_per_sec: usize,
    /// Most reconnects in any 100 ms window, times ten.
    pub peak_reconnects_per_sec_100ms: usize,
    /// From SIGTERM until the last client was back, in seconds.
    pub all_back_secs: f64,
    /// Clients that needed more than one attempt to get back.
    pub retried: usize,
}

impl DrainReport {
    fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "drain: {} connections on replica 1 ({} topics), SIGTERM; gateway args: {}",
            report::count(self.connections as u64),
            report::count(self.topics as u64),
            if self.gateway_args.is_empty() {
                "(defaults)".to_owned()
            } else {
                self.gateway_args.join(" ")
            }
        );
        let _ = writeln!(
            o,
            "  closes over {:.2} s, peak {}/s; {} back on the other replica(s), {} lost, {} retried",
            self.closing_secs,
            report::count(self.peak_closes_per_sec as u64),
            report::count(self.moved as u64),
            self.lost,
            self.retried
        );
        let _ = writeln!(
            o,
            "  peak reconnect rate: {}/s in any 1 s, {}/s in any 100 ms; all back {:.2} s after SIGTERM",
            report::count(self.peak_reconnects_per_sec as u64),
            report::count(self.peak_reconnects_per_sec_100ms as u64),
            self.all_back_secs
        );
        o
    }
}

/// The seed client's reconnect delay before attempt `attempt` (0-based), with `unit` in [0, 1)
/// as its random draw.
fn seed_delay(attempt: u32, unit: f64) -> Duration {
    let ceiling = SEED_MAX_DELAY_MS.min(SEED_MIN_DELAY_MS.saturating_mul(1 << attempt.min(31)));
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let jitter = (unit * ceiling as f64) as u64;
    Duration::from_millis(SEED_MAX_DELAY_MS.min(SEED_MIN_DELAY_MS + jitter))
}

/// A uniform draw in [0, 1) from (client, attempt): runs are repeatable.
fn draw(client: usize, attempt: u32) -> f64 {
    let mut z = (client as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(u64::from(attempt).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    #[allow(clippy::cast_precision_loss)]
    let unit = (z >> 11) as f64 / (1_u64 << 53) as f64;
    unit
}

/// Most of `times` (milliseconds, sorted) within any window of `window_ms`.
fn peak(times: &[f64], window_ms: f64) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= window_ms {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

/// `drain`.
///
/// # Errors
/// Fewer than two spawned replicas, or set-up failures.
pub async fn drain(
    dep: &Deployment,
    args: &DrainArgs,
    gateway_args: &[String],
    concurrency: usize,
    out: Output,
) -> Result<DrainReport> {
    if dep.replicas.len() < 2 {
        bail!("drain needs at least two replicas: --spawn 2 (or more)");
    }
    let Some(pid) = dep
        .processes
        .iter()
        .find(|p| p.role == Role::Gateway)
        .map(|p| p.pid)
        .filter(|_| dep.spawned())
    else {
        bail!("drain signals the first gateway itself: start the gateways with --spawn");
    };
    let t = topic_count(args.topics, args.connections);
    let base = format!("drain-{}", std::process::id());
    let topics: Arc<Vec<String>> = Arc::new((0..t).map(|i| format!("{base}-{i}")).collect());
    let first = dep.replicas[0].clone();
    let others: Arc<Vec<WsEndpoint>> = Arc::new(dep.replicas[1..].to_vec());

    // Open and join everything on the first replica, `concurrency` at a time.
    eprintln!("[drain] opening {} connections", args.connections);
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut opening = futures_util::stream::FuturesUnordered::new();
    for i in 0..args.connections {
        let (gate, first, topics) = (Arc::clone(&gate), first.clone(), Arc::clone(&topics));
        opening.push(async move {
            let _permit = gate.acquire().await;
            let topic = &topics[i % topics.len()];
            let mut ws = client::connect(&first, i).await?;
            client::join(&mut ws, topic, 1).await?;
            Ok::<_, anyhow::Error>((i, ws))
        });
    }
    let mut held = Vec::with_capacity(args.connections);
    while let Some(r) = opening.next().await {
        held.push(r?);
    }
    drop(opening);

    // Every client waits for its close, then comes back like the seed's client.
    let sigterm = Instant::now();
    let mut lives = Vec::with_capacity(held.len());
    for (i, mut ws) in held {
        let (others, topics) = (Arc::clone(&others), Arc::clone(&topics));
        lives.push(tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
            drop(ws);
            let closed_ms = sigterm.elapsed().as_secs_f64() * 1e3;
            let topic = &topics[i % topics.len()];
            for attempt in 0..16 {
                tokio::time::sleep(seed_delay(attempt, draw(i, attempt))).await;
                let target = &others[(i + attempt as usize) % others.len()];
                let Ok(mut ws) = client::connect(target, i).await else {
                    continue;
                };
                if client::join(&mut ws, topic, 2).await.is_ok() {
                    let moved = Moved {
                        closed_ms,
                        back_ms: sigterm.elapsed().as_secs_f64() * 1e3,
                        attempts: attempt + 1,
                    };
                    return Some((moved, ws));
                }
            }
            None
        }));
    }
    eprintln!("[drain] SIGTERM to pid {pid}");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if !status.success() {
        return Err(anyhow!("kill -TERM {pid} failed"));
    }

    let mut moved = Vec::with_capacity(lives.len());
    let mut back = Vec::with_capacity(lives.len());
    let mut lost = 0;
    for life in lives {
        match life.await {
            Ok(Some((m, ws))) => {
                moved.push(m);
                back.push(ws);
            }
            _ => lost += 1,
        }
    }
    drop(back);
    let mut closes: Vec<f64> = moved.iter().map(|m| m.closed_ms).collect();
    let mut reconnects: Vec<f64> = moved.iter().map(|m| m.back_ms).collect();
    closes.sort_by(f64::total_cmp);
    reconnects.sort_by(f64::total_cmp);
    let report = DrainReport {
        scenario: "drain",
        connections: args.connections,
        topics: t,
        gateway_args: gateway_args.to_vec(),
        moved: moved.len(),
        lost,
        closing_secs: match (closes.first(), closes.last()) {
            (Some(a), Some(b)) => (b - a) / 1e3,
            _ => 0.0,
        },
        peak_closes_per_sec: peak(&closes, 1000.0),
        peak_reconnects_per_sec: peak(&reconnects, 1000.0),
        peak_reconnects_per_sec_100ms: peak(&reconnects, 100.0) * 10,
        all_back_secs: reconnects.last().copied().unwrap_or(0.0) / 1e3,
        retried: moved.iter().filter(|m| m.attempts > 1).count(),
    };
    out.emit(&report, || report.human());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_backoff_waits_half_a_second_to_a_second_first_then_doubles_up_to_20_s() {
        assert_eq!(seed_delay(0, 0.0), Duration::from_millis(500));
        assert_eq!(seed_delay(0, 0.999), Duration::from_millis(999));
        assert_eq!(seed_delay(1, 0.5), Duration::from_millis(1000));
        assert_eq!(seed_delay(10, 0.99), Duration::from_millis(20_000));
        assert_eq!(seed_delay(40, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn draws_are_uniform_enough_and_repeatable() {
        let n = 10_000;
        let mean = (0..n).map(|i| draw(i, 0)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert!((0..n).all(|i| (0.0..1.0).contains(&draw(i, 3))));
        assert_eq!(draw(7, 1).to_bits(), draw(7, 1).to_bits());
    }

    #[test]
    fn the_peak_counts_the_busiest_window() {
        assert_eq!(peak(&[], 1000.0), 0);
        assert_eq!(peak(&[0.0, 10.0, 999.0, 1000.0, 1500.0, 1600.0], 1000.0), 4);
        assert_eq!(peak(&[0.0, 50.0, 99.0, 100.0], 100.0), 3);
    }
}
