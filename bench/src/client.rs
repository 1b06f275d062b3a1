//! The client side of the protocol, kept as cheap as possible: connect, join with an ack id,
//! and the benchmark payload (`"<run> <seq> <unix_nanos> "` padded to the message size).

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use miniz_oxide::inflate::stream::{InflateState, MinReset, inflate};
use miniz_oxide::{DataFormat, MZFlush, MZStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

pub type Ws = WebSocketStream<Wire>;

/// Whether clients offer permessage-deflate (`--deflate`); set once, before any connection.
static DEFLATE: AtomicBool = AtomicBool::new(false);
/// Bytes every WebSocket client of this process read from its socket: what the gateways
/// sent, frame headers included (TCP/IP headers not).
static WIRE_BYTES: AtomicU64 = AtomicU64::new(0);

/// The offer, as browsers make it.
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Makes every client of this process offer permessage-deflate.
pub fn offer_deflate(on: bool) {
    DEFLATE.store(on, Ordering::Relaxed);
}

/// Whether clients offer permessage-deflate.
pub fn deflate_offered() -> bool {
    DEFLATE.load(Ordering::Relaxed)
}

/// Bytes the gateways sent to this process's WebSocket clients so far (see [`Wire`]).
pub fn wire_bytes() -> u64 {
    WIRE_BYTES.load(Ordering::Relaxed)
}

/// How long a connect, a handshake or a join acknowledgement may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Connections to one replica per loopback source address: past this, sockets bind
/// 127.0.0.2, .3, … so that many thousands of connections do not run out of ephemeral ports.
/// (Below it, the kernel picks ports per destination, so connections to different replicas
/// share the range; a bound source address takes its port for every destination, and a
/// previous run's TIME_WAIT sockets hold theirs for a minute.)
const CONNS_PER_SOURCE_IP: usize = 16_000;

/// One replica's WebSocket endpoint.
#[derive(Debug, Clone)]
pub struct WsEndpoint {
    pub addr: SocketAddr,
    pub url: String,
}

/// Small client buffers: the bench opens tens of thousands of connections that each receive
/// little, and its memory should not crowd the gateways out.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
}

/// Opens a WebSocket connection; `index`, the connection's number among those to this
/// endpoint, picks the loopback source address.
///
/// # Errors
/// Connect or handshake failures, or a time-out.
pub async fn connect(endpoint: &WsEndpoint, index: usize) -> Result<Ws> {
    let fut = async {
        let socket = if endpoint.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(src) = source_ip(endpoint.addr, index) {
            socket.bind(SocketAddr::new(src, 0))?;
        }
        let stream = socket.connect(endpoint.addr).await?;
        stream.set_nodelay(true)?;
        let deflate = deflate_offered();
        let mut request = endpoint.url.as_str().into_client_request()?;
        if deflate {
            request.headers_mut().insert(
                "Sec-WebSocket-Extensions",
                tokio_tungstenite::tungstenite::http::HeaderValue::from_static(DEFLATE_OFFER),
            );
        }
        let (ws, _) =
            client_async_with_config(request, Wire::new(stream, deflate), Some(ws_config()))
                .await?;
        Ok::<_, anyhow::Error>(ws)
    };
    tokio::time::timeout(SETUP_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", endpoint.url))?
        .with_context(|| format!("connecting to {}", endpoint.url))
}

/// A client's socket as tungstenite sees it. It counts the bytes read ([`wire_bytes`]); with `--deflate` it also turns each compressed frame (RSV1) into the
/// plain frame it stands for, since tungstenite has no permessage-deflate. The gateway never
/// fragments what it sends, so a compressed message is always one whole frame here; one
/// decompressor per thread, reset per message, as the gateway negotiated no context
/// takeover.
pub struct Wire {
    inner: TcpStream,
    inflate: bool,
    /// Past the HTTP response: bytes are frames.
    framing: bool,
    /// Read, not yet turned into `out` (an incomplete frame).
    raw: Vec<u8>,
    /// Ready for tungstenite, from `out_at`.
    out: Vec<u8>,
    out_at: usize,
}

thread_local! {
    /// The thread's decompressor and output buffer, reused for every message.
    static INFLATER: RefCell<(Box<InflateState>, Vec<u8>)> =
        RefCell::new((InflateState::new_boxed(DataFormat::Raw), vec![0; 64 * 1024]));
}

impl Wire {
    fn new(inner: TcpStream, inflate: bool) -> Self {
        Self {
            inner,
            inflate,
            framing: false,
            raw: Vec::new(),
            out: Vec::new(),
            out_at: 0,
        }
    }

    /// Moves what is complete from `raw` to `out`, inflating compressed frames.
    fn process(&mut self) -> std::io::Result<()> {
        if !self.framing {
            let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                return Ok(());
            };
            self.out.extend(self.raw.drain(..end + 4));
            self.framing = true;
        }
        let mut at = 0;
        while let Some((b0, header, len)) = frame_header(&self.raw[at..]) {
            let Some(payload) = self.raw.get(at + header..at + header + len) else {
                break;
            };
            if b0 & 0x40 == 0 {
                self.out.extend_from_slice(&self.raw[at..at + header + len]);
            } else {
                inflate_frame(&mut self.out, b0 & !0x40, payload)?;
            }
            at += header + len;
        }
        self.raw.drain(..at);
        Ok(())
    }
}

/// A server frame's first byte, header length and payload length, once the header is in.
fn frame_header(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    Some(match b1 & 0x7F {
        126 => (
            b0,
            4,
            usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
        ),
        127 => {
            let raw: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (b0, 10, usize::try_from(u64::from_be_bytes(raw)).ok()?)
        }
        n => (b0, 2, usize::from(n)),
    })
}

fn put_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8]) {
    out.push(b0);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Inflates a compressed message (RFC 7692 §7.2.2: with the flush marker the sender removed
/// appended) and puts it on `out` as a plain frame. The bench stands in for many clients and
/// must cost the machine as little as it can, so the decompressor is reset without zeroing its
/// window: the gateway's messages do not reach back before their own start.
fn inflate_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8]) -> std::io::Result<()> {
    INFLATER.with(|cell| {
        let (state, buf) = &mut *cell.borrow_mut();
        state.reset_as(MinReset);
        let mut written = 0;
        for input in [payload, &[0, 0, 0xff, 0xff][..]] {
            let mut used = 0;
            loop {
                if written == buf.len() {
                    if buf.len() >= 64 << 20 {
                        return Err(std::io::Error::other("inflated message over 64 MiB"));
                    }
                    buf.resize(buf.len() * 2, 0);
                }
                let r = inflate(state, &input[used..], &mut buf[written..], MZFlush::Sync);
                used += r.bytes_consumed;
                written += r.bytes_written;
                let status = r
                    .status
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                if status == MZStatus::StreamEnd || (used == input.len() && written < buf.len()) {
                    break;
                }
            }
        }
        put_frame(out, b0, &buf[..written]);
        Ok(())
    })
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.inflate {
            let before = buf.filled().len();
            let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            WIRE_BYTES.fetch_add(n as u64, Ordering::Relaxed);
            return poll;
        }
        loop {
            if this.out_at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_at);
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                if this.out_at == this.out.len() {
                    this.out.clear();
                    this.out_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    WIRE_BYTES.fetch_add(n as u64, Ordering::Relaxed);
                    this.raw.extend_from_slice(read.filled());
                    this.process()?;
                }
                other => return other,
            }
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn source_ip(target: SocketAddr, index: usize) -> Option<IpAddr> {
    let spread = index / CONNS_PER_SOURCE_IP;
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() && spread > 0 => {
            // 127.0.0.2 ..= 127.0.0.254, never the broadcast-looking .255.
            let last = 1 + (spread % 253) as u8;
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        }
        _ => None,
    }
}

/// Joins `topic` with ack id `id` and waits for `room.joined` (skipping `session` and any
/// other message that arrives first).
///
/// # Errors
/// An error envelope, a close, or no acknowledgement in time.
pub async fn join(ws: &mut Ws, topic: &str, id: u64) -> Result<()> {
    // Topics are checked against the protocol's character set before any run, so the JSON
    // needs no escaping.
    let cmd = format!(r#"{{"type":"room.join","room":"{topic}","id":{id}}}"#);
    let wait = async {
        ws.send(Message::text(cmd)).await?;
        while let Some(msg) = ws.next().await {
            let text = match msg? {
                Message::Text(t) => t,
                Message::Close(c) => bail!("closed by the gateway before the join ack: {c:?}"),
                _ => continue,
            };
            let v: serde_json::Value = match serde_json::from_str(text.as_str()) {
                Ok(v) => v,
                Err(_) => continue,
            };
            match v["name"].as_str() {
                Some("room.joined") if v["data"]["id"].as_u64() == Some(id) => return Ok(()),
                Some("error") => bail!("join refused: {}", v["data"]),
                _ => {}
            }
        }
        bail!("connection ended before the join ack")
    };
    tokio::time::timeout(SETUP_TIMEOUT, wait)
        .await
        .map_err(|_| anyhow!("no room.joined for {topic} in time"))?
}

/// Whether `topic` follows the gateway's topic rules.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 256
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
        && !topic.starts_with("__broadcast__")
        && !topic.starts_with("__socket__")
}

pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `"<run> <seq> <unix_nanos> "`, padded with `x` to `size` bytes (never shorter than the
/// header). Only digits, spaces and `x`: safe inside a JSON string as is.
pub fn encode_payload(run: u32, seq: u64, nanos: u64, size: usize) -> String {
    let mut s = format!("{run} {seq} {nanos} ");
    if s.len() < size {
        s.extend(std::iter::repeat_n('x', size - s.len()));
    }
    s
}

/// The same header, then a JSON object of pseudo-random records (ids, symbols, prices,
/// quantities, times: what a backend publishes, and compressing like it), cut to `size` bytes
/// where it can be (it ends with a whole record and closes the object).
pub fn encode_json_payload(run: u32, seq: u64, nanos: u64, size: usize) -> String {
    let mut s = format!(r#"{run} {seq} {nanos} {{"seq":{seq},"items":["#);
    // xorshift, seeded by the message: every message differs, runs repeat.
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    const SIDES: [&str; 2] = ["buy", "sell"];
    let mut first = true;
    loop {
        let r = next();
        let symbol: String = (0..4)
            .map(|i| char::from(b'A' + ((r >> (i * 5)) % 26) as u8))
            .collect();
        let record = format!(
            r#"{}{{"id":{},"symbol":"{symbol}","side":"{}","price":{}.{:02},"qty":{},"ts":{}}}"#,
            if first { "" } else { "," },
            r % 1_000_000,
            SIDES[(r >> 20) as usize % 2],
            (r >> 24) % 1000,
            (r >> 34) % 100,
            (r >> 41) % 500 + 1,
            nanos / 1_000_000 + (r >> 50) % 1000,
        );
        if s.len() + record.len() + 2 > size && !first {
            break;
        }
        s.push_str(&record);
        first = false;
    }
    s.push_str("]}");
    s
}

/// The leading run, sequence number and send time of a payload; None when it is not one.
pub fn parse_payload(bytes: &[u8]) -> Option<(u32, u64, u64)> {
    let mut it = bytes.split(|&b| b == b' ');
    let mut num = || -> Option<u64> {
        let field = it.next()?;
        if field.is_empty() || field.len() > 20 {
            return None;
        }
        field.iter().try_fold(0u64, |acc, &b| {
            if b.is_ascii_digit() {
                acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
            } else {
                None
            }
        })
    };
    let run = u32::try_from(num()?).ok()?;
    Some((run, num()?, num()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_are_padded_to_size() {
        let p = encode_payload(3, 17, 1_764_316_800_123_456_789, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(
            parse_payload(p.as_bytes()),
            Some((3, 17, 1_764_316_800_123_456_789))
        );
        let short = encode_payload(1, 2, 3, 1);
        assert_eq!(short, "1 2 3 ");
        assert_eq!(parse_payload(short.as_bytes()), Some((1, 2, 3)));
    }

    #[test]
    fn json_payloads_carry_the_header_and_a_json_object_of_about_the_size() {
        let p = encode_json_payload(3, 17, 1_764_316_800_123_456_789, 1024);
        assert!((900..=1024).contains(&p.len()), "{}", p.len());
        assert_eq!(
            parse_payload(p.as_bytes()),
            Some((3, 17, 1_764_316_800_123_456_789))
        );
        let body = p.splitn(4, ' ').nth(3).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["seq"], 17);
        assert_ne!(
            p,
            encode_json_payload(3, 18, 1_764_316_800_123_456_789, 1024)
        );
    }

    #[test]
    fn foreign_messages_are_not_payloads() {
        for bad in [
            &b""[..],
            b"hello",
            b"{\"name\":\"x\"}",
            b"1 2",
            b"1 -2 3 ",
            b"99999999999 1 1 ",
            b"1 2 99999999999999999999999 ",
        ] {
            assert_eq!(parse_payload(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn topic_rules_match_the_gateway() {
        assert!(valid_topic("bench-1:a.b_c"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("a b"));
        assert!(!valid_topic("é"));
        assert!(!valid_topic("__broadcast__"));
        assert!(!valid_topic(&"a".repeat(257)));
    }

    #[test]
    fn sources_spread_over_loopback_only_past_the_first_block() {
        let lo: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(source_ip(lo, 0), None);
        assert_eq!(
            source_ip(lo, CONNS_PER_SOURCE_IP),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        );
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(source_ip(v6, CONNS_PER_SOURCE_IP * 3), None);
    }
}
