//! The search scenario: fan-out runs at rising rates (doubling from `--start-rate` until a run
//! fails, then bisecting between the best pass and the first failure) on one set of
//! subscribers; reports the highest rate that was sustained.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::cli::SearchArgs;
use crate::deployment::Deployment;
use crate::fanout::{FanoutReport, Session, topic_names};
use crate::report::{self, Output};

/// Runs never stop the search loop from ending: at most this many.
const MAX_STEPS: u32 = 40;
/// Bisection stops when the bracket is narrower than this fraction of the best rate.
const RESOLUTION: f64 = 0.05;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: f64,
    pub messages: u64,
    pub passed: bool,
    pub reason: Option<String>,
    pub loss_pct: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub deliveries_per_sec: f64,
    pub server_us_per_delivery: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchReport {
    pub scenario: &'static str,
    pub replicas: usize,
    pub subscribers: usize,
    pub topics: usize,
    /// Highest rate (msg/s) that passed; 0 when none did.
    pub sustained_rate: f64,
    pub sustained_deliveries_per_sec: f64,
    /// Lowest rate that failed, if any did.
    pub failed_rate: Option<f64>,
    pub reached_max_rate: bool,
    pub steps: Vec<Step>,
}

impl SearchReport {
    fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "search: {} subscribers on {} replica(s), {} topic(s)",
            report::count(self.subscribers as u64),
            self.replicas,
            self.topics
        );
        let _ = writeln!(
            o,
            "  {:>10} {:>9} {:>10} {:>9} {:>9} {:>12} {:>10}  result",
            "msg/s", "messages", "loss %", "p50", "p99", "deliveries/s", "µs/deliv"
        );
        for s in &self.steps {
            let _ = writeln!(
                o,
                "  {:>10.1} {:>9} {:>10.4} {:>9} {:>9} {:>12} {:>10}  {}",
                s.rate,
                s.messages,
                s.loss_pct,
                report::us(s.p50_us),
                report::us(s.p99_us),
                report::count(s.deliveries_per_sec as u64),
                s.server_us_per_delivery
                    .map_or("n/a".into(), |u| format!("{u:.2}")),
                match &s.reason {
                    None => "pass".to_string(),
                    Some(r) => format!("FAIL: {r}"),
                }
            );
        }
        let _ = writeln!(
            o,
            "  highest sustained rate: {:.1} msg/s ({}/s deliveries){}",
            self.sustained_rate,
            report::count(self.sustained_deliveries_per_sec as u64),
            if self.reached_max_rate {
                " — stopped at --max-rate"
            } else {
                ""
            }
        );
        o
    }
}

/// Runs the search.
///
/// # Errors
/// Setup failures, or a bad argument.
pub async fn search(
    dep: &Deployment,
    args: &SearchArgs,
    concurrency: usize,
    out: Output,
) -> Result<SearchReport> {
    if !(args.start_rate > 0.0 && args.max_rate >= args.start_rate && args.step_secs > 0.0) {
        bail!("need 0 < --start-rate <= --max-rate and --step-secs > 0");
    }
    if args.subscribers == 0 {
        bail!("--subscribers must be at least 1");
    }
    let topics = topic_names(args.shape.topic.as_deref(), args.shape.topics.max(1))?;
    dep.warn_fd_limits(args.subscribers.div_ceil(dep.replicas.len()));
    let max_p99_us = (args.max_p99_ms * 1000.0) as u64;
    let mut session = Session::open(dep, args.subscribers, topics.clone(), concurrency).await?;

    let mut best: Option<(f64, f64)> = None; // (rate, deliveries/s)
    let mut failed: Option<f64> = None;
    let mut steps = Vec::new();
    let mut rate = args.start_rate;
    let mut bisections = 0;
    let mut reached_max = false;
    for run_id in 1..=MAX_STEPS {
        if session.closed() > 0 {
            eprintln!("[search] some subscribers were disconnected; reconnecting all");
            session.close();
            session = Session::open(dep, args.subscribers, topics.clone(), concurrency).await?;
        }
        let messages = ((rate * args.step_secs).round() as u64).max(20);
        eprintln!("[search] step {run_id}: {rate:.1} msg/s × {messages} messages");
        let r: FanoutReport = session
            .run(dep, run_id, rate, messages, &args.shape)
            .await?;
        let reason = r.failure(args.max_loss_pct, max_p99_us);
        eprintln!(
            "[search] step {run_id}: {rate:.1} msg/s → {} (loss {:.4} %, p99 {})",
            reason.as_deref().unwrap_or("pass"),
            r.loss_pct,
            report::us(r.latency.p99_us)
        );
        if out.json {
            out.emit(&r, String::new);
        }
        steps.push(Step {
            rate,
            messages,
            passed: reason.is_none(),
            reason: reason.clone(),
            loss_pct: r.loss_pct,
            p50_us: r.latency.p50_us,
            p99_us: r.latency.p99_us,
            deliveries_per_sec: r.deliveries_per_sec,
            server_us_per_delivery: r.server_us_per_delivery,
        });
        if reason.is_none() {
            if best.is_none_or(|(b, _)| rate > b) {
                best = Some((rate, r.deliveries_per_sec));
            }
        } else if failed.is_none_or(|f| rate < f) {
            failed = Some(rate);
        }
        let lo = best.map_or(0.0, |(b, _)| b);
        rate = match failed {
            None => {
                if rate >= args.max_rate {
                    reached_max = true;
                    break;
                }
                (rate * 2.0).min(args.max_rate)
            }
            Some(hi) => {
                if bisections >= args.bisect_steps || hi - lo <= RESOLUTION * lo.max(1.0) {
                    break;
                }
                bisections += 1;
                (lo + hi) / 2.0
            }
        };
    }
    session.close();
    let report = SearchReport {
        scenario: "search",
        replicas: dep.replicas.len(),
        subscribers: args.subscribers,
        topics: topics.len(),
        sustained_rate: best.map_or(0.0, |(b, _)| b),
        sustained_deliveries_per_sec: best.map_or(0.0, |(_, d)| d),
        failed_rate: failed,
        reached_max_rate: reached_max,
        steps,
    };
    out.emit(&report, || report.human());
    Ok(report)
}
