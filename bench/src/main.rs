//! `wsgate-bench`: load generator and benchmark scenarios for wsgate.
//!
//! Components:
//! - [`cli`]: subcommands (one per scenario) and the shared deployment options.
//! - [`deployment`]: the gateways to talk to, from `--target`/`--api` (loopback only) or
//!   started by [`spawn`] (`--spawn N`: free ports, log-line discovery, killed on exit).
//! - [`client`]: connect, join with an ack id, the payload `"<run> <seq> <unix_nanos> "`.
//! - [`fanout`] and [`search`]: subscribers, a paced HTTP publisher, loss, duplicates and
//!   latency histograms; the search for the highest sustained rate.
//! - [`idle`] and [`connect`]: many joined connections: memory per connection, connect rate.
//! - [`floor`]: no gateway; the kernel's cost of one write per delivery on this machine.
//! - [`procfs`]: CPU time, RSS and open-file limits from `/proc`; [`resp`]: a tiny Redis
//!   client for channel counts and `used_memory`; [`report`]: tables and JSON lines.
//!
//! The bench is an application whose every error ends the run with a message, so errors are
//! `anyhow` throughout.

mod cli;
mod client;
mod connect;
mod deployment;
mod drain;
mod fanout;
mod floor;
mod idle;
mod procfs;
mod report;
mod resp;
mod search;
mod spawn;
mod token;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow};
use clap::Parser;

use cli::{Cli, Common, Scenario};
use deployment::Deployment;
use report::Output;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Tens of thousands of sockets: take the whole hard limit (spawned gateways inherit it).
    let nofile = procfs::raise_nofile();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Ctrl-C, SIGTERM or SIGHUP drops the scenario future, and with it every spawned
        // process.
        tokio::select! {
            r = run(cli, nofile) => r,
            s = interrupted() => Err(anyhow!("interrupted by {s}")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    // A signal whose handler cannot be installed simply never fires here.
    let wait = |kind: SignalKind| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        () = wait(SignalKind::terminate()) => "SIGTERM",
        () = wait(SignalKind::hangup()) => "SIGHUP",
    }
}

fn common(s: &Scenario) -> Option<&Common> {
    match s {
        Scenario::Fanout { common, .. }
        | Scenario::Search { common, .. }
        | Scenario::Idle { common, .. }
        | Scenario::Connect { common, .. }
        | Scenario::Drain { common, .. } => Some(common),
        Scenario::Floor { .. } | Scenario::Hold { .. } | Scenario::SignToken { .. } => None,
    }
}

/// Connections the bench itself holds at most.
fn connections_needed(s: &Scenario) -> usize {
    match s {
        Scenario::Fanout { load, .. } => load.subscribers + load.shape.publishers.unwrap_or(64),
        Scenario::Search { load, .. } => load.subscribers + load.shape.publishers.unwrap_or(64),
        Scenario::Idle { load, .. } => load.connections,
        Scenario::Connect { load, .. } => load.connections,
        // The old connections are dropped before their clients reconnect.
        Scenario::Drain { load, .. } => load.connections + load.connections / 8,
        // Both ends of every connection are in this process.
        Scenario::Floor { load } => load.connections * 2,
        Scenario::Hold { load } => load.to.saturating_sub(load.from),
        Scenario::SignToken { .. } => 0,
    }
}

async fn run(cli: Cli, nofile: u64) -> Result<()> {
    let needed = connections_needed(&cli.scenario) as u64 + 64;
    // Past the hard limit, only a privileged process can go further; spawned gateways
    // inherit whatever is reached here.
    let nofile = if needed > nofile {
        procfs::raise_nofile_to(needed)
    } else {
        nofile
    };
    // idle and connect hand what does not fit to helper processes.
    let spreads = matches!(
        cli.scenario,
        Scenario::Idle { .. } | Scenario::Connect { .. }
    );
    if needed > nofile && !spreads {
        return Err(anyhow!(
            "this run needs about {needed} file descriptors but the limit is {nofile}; raise the \
             hard limit (`ulimit -Hn`, or run as root with a higher `ulimit -n`)"
        ));
    }
    if let Scenario::SignToken {
        key,
        alg,
        exp_secs,
        sub,
    } = &cli.scenario
    {
        println!("{}", token::sign(key, alg, *exp_secs, sub)?);
        return Ok(());
    }
    if let Scenario::Hold { load } = &cli.scenario {
        client::offer_deflate(load.deflate);
        return connect::hold(load).await;
    }
    if let Scenario::Floor { load } = &cli.scenario {
        let run = floor::floor(load, Output { json: load.json });
        return match tokio::time::timeout(Duration::from_secs(load.duration_limit), run).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(anyhow!(
                "the scenario ran longer than --duration-limit {}s",
                load.duration_limit
            )),
        };
    }
    let Some(common) = common(&cli.scenario).cloned() else {
        return Err(anyhow!("this scenario needs no deployment"));
    };
    client::offer_deflate(common.deflate);
    let limit = Duration::from_secs(common.duration_limit);
    let dep = Deployment::open(&common).await?;
    let out = Output { json: common.json };
    let concurrency = common.concurrency;
    let per_process = common.conns_per_process;
    let scenario = async {
        match &cli.scenario {
            Scenario::Fanout { load, .. } => {
                fanout::fanout(&dep, load, concurrency, out).await.map(drop)
            }
            Scenario::Search { load, .. } => {
                search::search(&dep, load, concurrency, out).await.map(drop)
            }
            Scenario::Idle { load, .. } => idle::idle(&dep, load, (concurrency, per_process), out)
                .await
                .map(drop),
            Scenario::Connect { load, .. } => {
                connect::connect(&dep, load, (concurrency, per_process), out)
                    .await
                    .map(drop)
            }
            Scenario::Drain { load, .. } => {
                drain::drain(&dep, load, &common.gateway_args, concurrency, out)
                    .await
                    .map(drop)
            }
            Scenario::Floor { .. } | Scenario::Hold { .. } | Scenario::SignToken { .. } => {
                Err(anyhow!("this scenario runs without a deployment"))
            }
        }
    };
    // A signal during the scenario still goes through `close`, which kills and reaps the
    // children; during start-up, the select in `main` drops everything instead.
    let result = tokio::select! {
        r = tokio::time::timeout(limit, scenario) => match r {
            Ok(r) => r,
            Err(_) => Err(anyhow!(
                "the scenario ran longer than --duration-limit {}s",
                common.duration_limit
            )),
        },
        s = interrupted() => Err(anyhow!("interrupted by {s}")),
    };
    if dep.spawned() {
        eprintln!("[spawn] stopping what was started");
    }
    dep.close().await;
    result
}
