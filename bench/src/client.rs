//! The client side of the protocol, kept as cheap as possible: connect, join with an ack id,
//! and the benchmark payload (`"<run> <seq> <unix_nanos> "` padded to the message size).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

pub type Ws = WebSocketStream<TcpStream>;

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
        let (ws, _) =
            client_async_with_config(endpoint.url.as_str(), stream, Some(ws_config())).await?;
        Ok::<_, anyhow::Error>(ws)
    };
    tokio::time::timeout(SETUP_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", endpoint.url))?
        .with_context(|| format!("connecting to {}", endpoint.url))
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
