//! The `floor` scenario: what one `write()` per delivery costs on this machine, with no
//! gateway at all.
//!
//! A gateway that fans a message out to C WebSocket connections makes at least one socket write
//! per connection, and on loopback the kernel also runs the receiving side's TCP input and
//! wake-up in the sender's context. This scenario measures that floor the way `fanout` loads a
//! gateway: K sender threads (standing in for K replicas) each own C/K accepted loopback
//! connections and, R times a second, write the same pre-encoded WebSocket text frame to each
//! of them with a plain blocking `write`; the bench's receivers read, check and time every
//! frame. The senders' own thread CPU time divided by the frames written is the kernel's price
//! of a delivery, which no server can go below without writing fewer times.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::cli::FloorArgs;
use crate::client::{self, Ws};
use crate::procfs;
use crate::report::{self, Latency, Output};

/// Latency samples kept in memory (4 bytes each) before they are merged into a histogram.
const MAX_SAMPLES: u64 = 128 << 20;
/// After the senders finish, receivers get this long to read what is still in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// One sender thread's share of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SenderReport {
    pub sender: usize,
    pub connections: usize,
    pub writes: u64,
    pub cpu_seconds: f64,
    pub us_per_write: Option<f64>,
    /// How far the last round started behind its schedule.
    pub final_lag_ms: f64,
}

/// The floor run's results.
#[derive(Debug, Clone, Serialize)]
pub struct FloorReport {
    pub scenario: &'static str,
    pub senders: usize,
    pub connections: usize,
    pub rate: f64,
    pub messages: u64,
    pub size: usize,
    pub frame_bytes: usize,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub latency: Latency,
    pub per_sender: Vec<SenderReport>,
    /// Sender CPU (all threads) per delivery: the floor.
    pub us_per_delivery: Option<f64>,
    /// The rest of the bench process (receivers), per delivery.
    pub receivers_us_per_delivery: Option<f64>,
}

/// Runs the floor scenario and prints its report.
///
/// # Errors
/// Bad arguments, or sockets that cannot be set up.
pub async fn floor(args: &FloorArgs, out: Output) -> Result<FloorReport> {
    let (k, c, m) = (args.senders, args.connections, args.messages);
    if k == 0 || c < k {
        bail!("need at least one connection per sender (--senders {k}, -c {c})");
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    if m == 0 || m.saturating_mul(c as u64) > MAX_SAMPLES {
        bail!("messages × connections must be between 1 and {MAX_SAMPLES}");
    }
    if m as f64 / args.rate > 600.0 {
        bail!("a floor run is limited to 600 s of sending (messages / rate)");
    }
    let size = args
        .size
        .max(client::encode_payload(u32::MAX, m, u64::MAX, 0).len());
    let run = std::process::id();
    let frame_len = text_frame(&client::encode_payload(run, 0, 0, size)).len();

    // Listeners first, then the receivers connect, then each sender accepts its share.
    let mut listeners = Vec::with_capacity(k);
    for _ in 0..k {
        let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
        listeners.push(l);
    }
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<_>>()?;
    let mut start_tx = Vec::with_capacity(k);
    let mut threads = Vec::with_capacity(k);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<()>>();
    for (i, listener) in listeners.into_iter().enumerate() {
        let share = c / k + usize::from(i < c % k);
        let (tx, rx) = std_mpsc::channel::<Instant>();
        start_tx.push(tx);
        let ready = ready_tx.clone();
        let plan = Plan {
            sender: i,
            run,
            rate: args.rate,
            messages: m,
            size,
        };
        threads.push(thread::spawn(move || {
            sender(&listener, share, &plan, &ready, &rx)
        }));
    }
    drop(ready_tx);

    // A few connects at a time: the listeners keep the default backlog.
    let connecting = Arc::new(Semaphore::new(64));
    let mut receivers = Vec::with_capacity(c);
    for i in 0..c {
        let endpoint = client::WsEndpoint {
            addr: addrs[i % k],
            url: format!("ws://{}/ws", addrs[i % k]),
        };
        let connecting = connecting.clone();
        receivers.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await;
            let ws = client::connect(&endpoint, i / k).await;
            drop(permit);
            receiver(ws?, run, m, frame_len).await
        }));
    }
    for _ in 0..k {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(r)) => r?,
            Ok(None) => bail!("a sender thread ended before accepting its connections"),
            Err(_) => bail!("the sender threads did not accept their connections in time"),
        }
    }
    eprintln!(
        "[floor] {c} connections over {k} sender threads; writing {m} messages at {} msg/s",
        args.rate
    );
    let bench_before = procfs::cpu_ticks(std::process::id())?;
    let start = Instant::now() + Duration::from_millis(20);
    for tx in &start_tx {
        tx.send(start)
            .map_err(|_| anyhow!("a sender thread ended early"))?;
    }
    let mut per_sender = Vec::with_capacity(k);
    for (i, t) in threads.into_iter().enumerate() {
        let r = tokio::task::spawn_blocking(move || t.join())
            .await?
            .map_err(|_| anyhow!("sender thread {i} panicked"))??;
        per_sender.push(r);
    }
    let mut hist = report::new_histogram();
    let (mut received, mut duplicates) = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + DRAIN;
    for r in receivers {
        match tokio::time::timeout_at(deadline, r).await {
            Ok(Ok(Ok(got))) => {
                received += got.received;
                duplicates += got.duplicates;
                for us in got.latency_us {
                    hist.saturating_record(u64::from(us).max(1));
                }
            }
            Ok(Ok(Err(e))) => eprintln!("[floor] a receiver failed: {e:#}"),
            Ok(Err(e)) => eprintln!("[floor] a receiver task failed: {e}"),
            Err(_) => eprintln!("[floor] a receiver was still reading at the deadline"),
        }
    }
    let bench_after = procfs::cpu_ticks(std::process::id())?;
    let bench_cpu = bench_after.saturating_sub(bench_before) as f64 / procfs::clock_ticks() as f64;
    let report = summarize(
        args, size, frame_len, per_sender, received, duplicates, &hist, bench_cpu,
    );
    out.emit(&report, || human(&report));
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    args: &FloorArgs,
    size: usize,
    frame_bytes: usize,
    per_sender: Vec<SenderReport>,
    received: u64,
    duplicates: u64,
    hist: &Histogram<u64>,
    bench_cpu: f64,
) -> FloorReport {
    let expected = args.messages * args.connections as u64;
    let writes: u64 = per_sender.iter().map(|s| s.writes).sum();
    let sender_cpu: f64 = per_sender.iter().map(|s| s.cpu_seconds).sum();
    let per = |secs: f64| (writes > 0).then(|| secs * 1e6 / writes as f64);
    FloorReport {
        scenario: "floor",
        senders: args.senders,
        connections: args.connections,
        rate: args.rate,
        messages: args.messages,
        size,
        frame_bytes,
        expected,
        received,
        lost: expected.saturating_sub(received),
        duplicates,
        latency: Latency::of(hist),
        per_sender,
        us_per_delivery: per(sender_cpu),
        receivers_us_per_delivery: per((bench_cpu - sender_cpu).max(0.0)),
    }
}

fn human(r: &FloorReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "floor: one write() per delivery, no gateway — {} sender threads, {} connections, \
         {} msg/s × {} messages, {} B frames",
        r.senders, r.connections, r.rate, r.messages, r.frame_bytes
    );
    let _ = writeln!(
        s,
        "  delivery  {}/{} received, {} lost, {} duplicates",
        report::count(r.received),
        report::count(r.expected),
        report::count(r.lost),
        report::count(r.duplicates)
    );
    let l = &r.latency;
    let _ = writeln!(
        s,
        "  latency   p50 {}, p99 {}, p99.9 {}, max {}",
        report::us(l.p50_us),
        report::us(l.p99_us),
        report::us(l.p999_us),
        report::us(l.max_us)
    );
    let _ = writeln!(s, "  {:<28} {:>9} {:>14}", "cpu", "seconds", "µs/delivery");
    let fmt = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}"));
    for p in &r.per_sender {
        let _ = writeln!(
            s,
            "  {:<28} {:>9.3} {:>14}   (last round {:.1} ms behind schedule)",
            format!("sender-{}", p.sender),
            p.cpu_seconds,
            fmt(p.us_per_write),
            p.final_lag_ms
        );
    }
    let total: f64 = r.per_sender.iter().map(|p| p.cpu_seconds).sum();
    let _ = writeln!(
        s,
        "  {:<28} {total:>9.3} {:>14}",
        "senders total (the floor)",
        fmt(r.us_per_delivery)
    );
    let _ = writeln!(
        s,
        "  {:<28} {:>9} {:>14}",
        "receivers (rest of the bench)",
        "",
        fmt(r.receivers_us_per_delivery)
    );
    s
}

struct Plan {
    sender: usize,
    run: u32,
    rate: f64,
    messages: u64,
    size: usize,
}

/// Accepts `n` connections, answers their WebSocket handshakes, waits for the start signal,
/// then writes every round's frame to each connection in turn.
fn sender(
    listener: &TcpListener,
    n: usize,
    plan: &Plan,
    ready: &tokio::sync::mpsc::UnboundedSender<Result<()>>,
    start: &std_mpsc::Receiver<Instant>,
) -> Result<SenderReport> {
    let accepted = (|| {
        let mut socks = Vec::with_capacity(n);
        for _ in 0..n {
            let (mut s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            handshake(&mut s)?;
            socks.push(s);
        }
        Ok::<_, anyhow::Error>(socks)
    })();
    let mut socks = match accepted {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = ready.send(Err(e));
            bail!("sender {}: {msg}", plan.sender);
        }
    };
    let start = start
        .recv()
        .map_err(|_| anyhow!("sender {}: no start signal", plan.sender))?;
    let before = thread_cpu_ticks()?;
    let mut lag = Duration::ZERO;
    for seq in 0..plan.messages {
        let due = start + Duration::from_secs_f64(seq as f64 / plan.rate);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        } else {
            lag = now - due;
        }
        // Encoded once per round and written to every connection, as a gateway does.
        let frame = text_frame(&client::encode_payload(
            plan.run,
            seq,
            client::unix_nanos(),
            plan.size,
        ));
        for s in &mut socks {
            s.write_all(&frame)
                .with_context(|| format!("sender {}: write", plan.sender))?;
        }
    }
    let after = thread_cpu_ticks()?;
    drop(socks);
    let cpu = after.saturating_sub(before) as f64 / procfs::clock_ticks() as f64;
    let writes = plan.messages * n as u64;
    Ok(SenderReport {
        sender: plan.sender,
        connections: n,
        writes,
        cpu_seconds: cpu,
        us_per_write: (writes > 0).then(|| cpu * 1e6 / writes as f64),
        final_lag_ms: lag.as_secs_f64() * 1e3,
    })
}

/// Reads one HTTP upgrade request (bounded) and answers 101 with the accept key.
fn handshake(s: &mut TcpStream) -> Result<()> {
    use std::io::Read as _;
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        if req.len() > 8192 {
            bail!("handshake request too large");
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed during the handshake");
        }
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req);
    let key = text
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .ok_or_else(|| anyhow!("handshake without Sec-WebSocket-Key"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    write!(
        s,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )?;
    Ok(())
}

/// An unmasked, final text frame (server to client).
fn text_frame(payload: &str) -> Vec<u8> {
    let len = payload.len();
    let mut f = Vec::with_capacity(len + 10);
    f.push(0x81);
    if len < 126 {
        f.push(len as u8);
    } else if len <= 0xFFFF {
        f.push(126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(payload.as_bytes());
    f
}

struct Received {
    received: u64,
    duplicates: u64,
    latency_us: Vec<u32>,
}

/// Reads a connection opened with the bench's WebSocket client as a raw stream: every frame has the
/// same length, so frames are cut by length and their payload checked and timed.
async fn receiver(mut ws: Ws, run: u32, messages: u64, frame_len: usize) -> Result<Received> {
    // The handshake is done and nothing was sent yet; from here on the frames are read from
    // the socket without the WebSocket library, so the receivers cost as little as possible.
    let stream = ws.get_mut();
    let mut seen = vec![0u64; messages.div_ceil(64) as usize];
    let mut got = Received {
        received: 0,
        duplicates: 0,
        latency_us: Vec::with_capacity(messages as usize),
    };
    let mut buf: Vec<u8> = Vec::with_capacity(frame_len * 16);
    loop {
        let n = stream.read_buf(&mut buf).await?;
        let mut at = 0;
        while buf.len() - at >= frame_len {
            let frame = &buf[at..at + frame_len];
            at += frame_len;
            let header = frame_len - payload_len(frame_len);
            let now = client::unix_nanos();
            match client::parse_payload(&frame[header..]) {
                Some((r, seq, sent)) if r == run && seq < messages => {
                    let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                    if seen[word] & bit != 0 {
                        got.duplicates += 1;
                        continue;
                    }
                    seen[word] |= bit;
                    got.received += 1;
                    let us = now.saturating_sub(sent) / 1000;
                    got.latency_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                _ => bail!("unexpected frame from the sender"),
            }
        }
        buf.drain(..at);
        if n == 0 || got.received == messages {
            return Ok(got);
        }
    }
}

/// The payload length inside a frame of `frame_len` bytes (the inverse of [`text_frame`]).
fn payload_len(frame_len: usize) -> usize {
    if frame_len < 2 + 126 {
        frame_len - 2
    } else if frame_len <= 4 + 0xFFFF {
        frame_len - 4
    } else {
        frame_len - 10
    }
}

/// utime + stime of the calling thread, in clock ticks.
fn thread_cpu_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")
        .context("reading /proc/thread-self/stat")?;
    procfs::parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("unexpected /proc/thread-self/stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_their_payload_lengths_agree() {
        for len in [0, 1, 64, 125, 126, 127, 1000, 65_535, 65_536, 100_000] {
            let payload = "x".repeat(len);
            let f = text_frame(&payload);
            assert_eq!(payload_len(f.len()), len, "payload of {len} bytes");
            assert_eq!(f[0], 0x81);
        }
    }
}
