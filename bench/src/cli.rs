//! Command-line interface: one subcommand per scenario, each with the same deployment options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Load generator and benchmark scenarios for wsgate.
///
/// Runs against an existing deployment (`--target ws://127.0.0.1:PORT`, once per replica) or
/// starts its own gateways (and a redis-server) with `--spawn N`. Only loopback addresses are
/// accepted. Results go to stdout (a table, or JSON lines with `--json`), progress to stderr.
#[derive(Debug, Parser)]
#[command(name = "wsgate-bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// C subscribers on one topic (or spread over T topics), R msg/s published over HTTP for M
    /// messages: deliveries/s, loss, duplicates, latency percentiles, CPU per delivery.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: FanoutArgs,
    },
    /// Repeats fanout at increasing rates (doubling, then bisecting) until loss, latency or the
    /// publisher gives out; reports the highest sustained rate.
    Search {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: SearchArgs,
    },
    /// N connections, each joined to its own topic: gateway RSS per connection, Redis channels
    /// and memory.
    Idle {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: IdleArgs,
    },
    /// Opens N connections as fast as possible, each joining a topic and waiting for the
    /// acknowledgement: connections + acknowledged joins per second.
    Connect {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: ConnectArgs,
    },
    /// N connections on the first replica behaving like the seed's browser client (reconnect
    /// 0.5-1 s after a close, to another replica); SIGTERM to the first replica: the peak
    /// reconnect rate the others take. Needs --spawn 2 or more; pass the drain settings with
    /// --gateway-arg (e.g. --gateway-arg=--drain-rate=500).
    Drain {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: DrainArgs,
    },
    /// No gateway: K sender threads write each message to C loopback WebSocket connections with
    /// one plain write() per delivery, at R msg/s; their CPU per delivery is this machine's
    /// kernel floor for any server that writes once per delivery.
    Floor {
        #[command(flatten)]
        load: FloorArgs,
    },
    /// Internal: a helper process of `idle` and `connect` that opens and holds a range of
    /// connections when one process may not hold them all.
    #[command(hide = true)]
    Hold {
        #[command(flatten)]
        load: HoldArgs,
    },
    /// Prints a JWT for gateways with `--auth` (for `--token`): signed with an HMAC secret file
    /// (HS256) or a PEM private key (ES256, RS256, EdDSA), allowing every topic.
    SignToken {
        /// The key: the gateway's --jwt-secret-file for HS256, else a PKCS#8 PEM private key.
        #[arg(long, value_name = "PATH")]
        key: std::path::PathBuf,
        /// HS256, HS384, HS512, ES256, ES384, RS256, PS256 or EdDSA.
        #[arg(long, default_value = "HS256")]
        alg: String,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        exp_secs: u64,
        /// The `sub` claim.
        #[arg(long, default_value = "bench")]
        sub: String,
    },
}

/// Where the gateways are (or how to start them), what to measure, how to report.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// WebSocket URL of one replica (repeat per replica), e.g. ws://127.0.0.1:8080; the path
    /// defaults to --ws-path.
    #[arg(long = "target", value_name = "URL", conflicts_with = "spawn")]
    pub targets: Vec<String>,
    /// HTTP base URL used for publishing (default: the first target's host and port).
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// Bearer key for /api/* (only needed when the gateways have one).
    #[arg(long, env = "WSGATE_BENCH_API_KEY", value_name = "KEY")]
    pub api_key: Option<String>,
    /// Also measure the CPU and RSS of this process (repeatable), e.g. gateways or a
    /// redis-server the tool did not start.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Redis to inspect (channel count, memory) when running against an existing deployment.
    #[arg(long, value_name = "URL", conflicts_with = "spawn")]
    pub redis_url: Option<String>,
    /// Start N gateway processes (and a redis-server when N ≥ 2 or with --redis) on free
    /// loopback ports; everything started is killed on exit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub spawn: Option<u16>,
    /// With --spawn: use a redis-server (and the Redis broker) even for one gateway.
    #[arg(long, requires = "spawn")]
    pub redis: bool,
    /// With --spawn: a Redis Cluster of N masters (no replicas; made with `redis-cli
    /// --cluster create`, found next to --redis-server-bin) instead of one redis-server; the
    /// gateways use sharded pub/sub. Each node's CPU is reported.
    #[arg(long, value_name = "N", requires = "spawn", value_parser = clap::value_parser!(u16).range(3..=16))]
    pub redis_cluster: Option<u16>,
    /// With --spawn: the gateway binary (default: `wsgate` next to this binary).
    #[arg(long, value_name = "PATH")]
    pub wsgate_bin: Option<PathBuf>,
    /// With --spawn: the redis-server binary.
    #[arg(long, value_name = "PATH", default_value = "redis-server")]
    pub redis_server_bin: PathBuf,
    /// With --spawn: an extra argument for every gateway (repeatable), e.g.
    /// --gateway-arg=--max-connections=0.
    #[arg(long = "gateway-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Redis key prefix: passed to spawned gateways, and used to count the gateways' channels.
    #[arg(long, value_name = "PREFIX")]
    pub key_prefix: Option<String>,
    /// WebSocket path used when a target URL has none, and for spawned gateways.
    #[arg(long, default_value = "/ws", value_name = "PATH")]
    pub ws_path: String,
    /// How many connections are being opened at once while setting up (above a gateway's
    /// listen backlog — 128 with tokio's default — SYNs get dropped and retried after 1 s).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub concurrency: usize,
    /// Stop (with an error) when the whole scenario takes longer than this.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub duration_limit: u64,
    /// idle and connect: connections one bench process opens at most; the rest are opened by
    /// helper processes (default: what the open-file limit allows).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub conns_per_process: Option<u64>,
    /// Print results as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A JWT every connection presents on its upgrade (`?token=`), for gateways with `--auth`;
    /// `wsgate-bench sign-token` makes one.
    #[arg(long, value_name = "JWT")]
    pub token: Option<String>,
    /// Clients offer permessage-deflate (as browsers do) and inflate what comes compressed.
    #[arg(long)]
    pub deflate: bool,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Subscribers, spread round-robin over the replicas.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Messages published per second.
    #[arg(short = 'r', long, default_value_t = 100.0)]
    pub rate: f64,
    /// Messages published in total.
    #[arg(short = 'm', long, default_value_t = 2000)]
    pub messages: u64,
    #[command(flatten)]
    pub shape: Shape,
}

#[derive(Debug, Clone, Args)]
pub struct SearchArgs {
    /// Subscribers, spread round-robin over the replicas.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// First rate tried (msg/s).
    #[arg(long, default_value_t = 100.0)]
    pub start_rate: f64,
    /// Never try more than this (msg/s).
    #[arg(long, default_value_t = 100_000.0)]
    pub max_rate: f64,
    /// Length of each step: messages = rate × this.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub step_secs: f64,
    /// Bisection steps after the first failing rate.
    #[arg(long, default_value_t = 4)]
    pub bisect_steps: u32,
    /// A step fails above this loss, in percent of expected deliveries.
    #[arg(long, default_value_t = 0.1, value_name = "PERCENT")]
    pub max_loss_pct: f64,
    /// A step fails when p99 latency exceeds this.
    #[arg(long, default_value_t = 1000.0, value_name = "MS")]
    pub max_p99_ms: f64,
    #[command(flatten)]
    pub shape: Shape,
}

/// How messages look and how they are published.
#[derive(Debug, Clone, Args)]
pub struct Shape {
    /// Message size in bytes (the "<run> <seq> <unix_nanos> " header, padded).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// What fills the message: `text` pads the header with `x` (compresses to almost
    /// nothing); `json` is a JSON object of pseudo-random records, as an application would
    /// publish, which compresses like one.
    #[arg(long, value_enum, default_value_t = Payload::Text)]
    pub payload: Payload,
    /// Topics: subscriber i joins topic (i / replicas) mod T, message n goes to topic n mod T.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Topic name (with --topics > 1: prefix, suffixed with -0, -1, …); default bench-<pid>.
    #[arg(long)]
    pub topic: Option<String>,
    /// Concurrent publisher tasks (default: enough for the rate).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Messages per publish request: above 1, consecutive messages go together in one
    /// `POST /api/batch` (the batch is due when its first message is).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// After the last publish, wait at most this long for missing deliveries.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub drain_secs: f64,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub connections: usize,
    /// Topics (default: one per connection); connection i joins topic i mod T.
    #[arg(long)]
    pub topics: Option<usize>,
    /// Wait this long after the last join before measuring memory.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    pub settle_secs: f64,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 5000)]
    pub connections: usize,
    /// Topics (default: one per connection); connection i joins topic i mod T.
    #[arg(long)]
    pub topics: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// Connections on the replica that drains.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub connections: usize,
    /// Topics (default: one per connection); connection i joins topic i mod T.
    #[arg(long)]
    pub topics: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Connections, spread over the sender threads.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// Sender threads (stand-ins for gateway replicas).
    #[arg(long, default_value_t = 2)]
    pub senders: usize,
    /// Messages per second.
    #[arg(short = 'r', long, default_value_t = 100.0)]
    pub rate: f64,
    /// Messages in total.
    #[arg(short = 'm', long, default_value_t = 2000)]
    pub messages: u64,
    /// Message size in bytes (as for fanout).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Stop (with an error) when the whole scenario takes longer than this.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub duration_limit: u64,
    /// Print results as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What fills a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct HoldArgs {
    /// WebSocket URL of each replica, in the parent's order.
    #[arg(long = "target", value_name = "URL")]
    pub targets: Vec<String>,
    /// First connection number (decides replica, topic and source address).
    #[arg(long)]
    pub from: usize,
    /// One past the last connection number.
    #[arg(long)]
    pub to: usize,
    /// Topic name prefix, as the parent's.
    #[arg(long)]
    pub topic_base: String,
    /// Topic count, as the parent's.
    #[arg(long)]
    pub topics: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Offer permessage-deflate, as the parent.
    #[arg(long)]
    pub deflate: bool,
}
