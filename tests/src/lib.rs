//! Test harness shared by the integration tests: gateways on port 0 (in-process or as child
//! processes), real WebSocket clients, an HTTP client, and a real `redis-server` on a free port
//! that can be killed, restarted and frozen, and headless Chromium through chromedriver
//! ([`webdriver`]). Everything spawned is killed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

pub mod churn;
pub mod hostile;
mod proxy;
mod redis_cluster;
mod redis_sentinel;
mod redis_server;
pub mod webdriver;
pub use proxy::TcpProxy;
pub use redis_cluster::RedisCluster;
pub use redis_sentinel::{SENTINEL_MASTER, SentinelGroup, info_field};
pub use redis_server::RedisServer;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous deadline for events that should happen promptly.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A gateway running inside the test process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: wsgate::Gateway,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<wsgate::Result<()>>>,
}

impl TestGateway {
    pub async fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, |gateway| gateway).await
    }

    /// A gateway whose WebSocket connections speak `handler`'s protocol instead of wsgate's.
    pub async fn start_with_handler(extra: &[&str], handler: impl wsgate::MessageHandler) -> Self {
        Self::start_with(extra, |gateway| gateway.with_message_handler(handler)).await
    }

    async fn start_with(
        extra: &[&str],
        customise: impl FnOnce(wsgate::Gateway) -> wsgate::Gateway,
    ) -> Self {
        let mut args = vec![
            "wsgate",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout-secs",
            "3",
        ];
        args.extend_from_slice(extra);
        let config = wsgate::Config::parse_args(args).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gateway = customise(wsgate::Gateway::start(config).await.unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(wsgate::serve_gateway(
            gateway.clone(),
            listener,
            None,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            gateway,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn http(&self) -> Http {
        Http::new(self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Triggers the drain and waits for serve to return.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A `wsgate` child process, killed on drop.
pub struct ProcessGateway {
    pub addr: SocketAddr,
    pub child: tokio::process::Child,
    pub pid: u32,
}

impl ProcessGateway {
    /// Spawns the `wsgate` binary built next to this test executable.
    pub async fn spawn(extra: &[&str]) -> Self {
        Self::spawn_bin(&wsgate_bin(), extra).await
    }

    /// Spawns the given `wsgate` binary.
    pub async fn spawn_bin(bin: &str, extra: &[&str]) -> Self {
        Self::spawn_bin_env(bin, extra, &[]).await
    }

    /// Spawns the given `wsgate` binary with `env` as its only environment variables.
    pub async fn spawn_bin_env(bin: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = tokio::process::Command::new(bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log",
                &std::env::var("WSGATE_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            ])
            .args(extra)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap();
                    return addr.parse::<SocketAddr>().unwrap();
                }
            }
            panic!("wsgate exited before listening");
        })
        .await
        .expect("wsgate did not start listening");
        // Keep draining stderr so the child never blocks on a full pipe.
        // (Set WSGATE_TEST_LOG=1 to see the gateways' logs.)
        let echo = std::env::var_os("WSGATE_TEST_LOG").is_some();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("[wsgate {pid}] {line}");
                }
            }
        });
        Self { addr, child, pid }
    }

    pub fn http(&self) -> Http {
        Http::new(self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Resident set size of the process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

/// Path of the `wsgate` binary: `$WSGATE_BIN`, or `wsgate` in the cargo target directory this
/// test was built into (`cargo test --workspace` builds it, because the gateway package has
/// integration tests of its own).
pub fn wsgate_bin() -> String {
    if let Ok(bin) = std::env::var("WSGATE_BIN") {
        return bin;
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/wsgate
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("wsgate");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p wsgate` (or cargo test --workspace)",
        bin.display()
    );
    bin.to_string_lossy().into_owned()
}

/// A small HTTP client for the gateway's API.
pub struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path))
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path))
    }

    /// POSTs JSON and returns (status, body).
    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self.post(path).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn publish(&self, topic: &str, message: &str) {
        let (status, body) = self
            .post_json(
                "/api/publish",
                serde_json::json!({"topic": topic, "message": message}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Publishes a text message and returns the status (0 when the request failed).
    pub async fn publish_status(&self, topic: &str, message: &str) -> u16 {
        self.post("/api/publish")
            .json(&serde_json::json!({"topic": topic, "message": message}))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    pub async fn send(&self, socket: &str, message: &str) {
        let (status, body) = self
            .post_json(
                "/api/send",
                serde_json::json!({"socketId": socket, "message": message}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.get(path).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn stats(&self) -> Value {
        let (status, body) = self.get_json("/api/stats").await;
        assert_eq!(status, 200);
        body
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls until `check` holds for the stats, or panics at the deadline.
    pub async fn wait_stats(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let s = self.stats().await;
            if check(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Value of a metric line (`name{labels} value`) in a Prometheus scrape.
pub fn metric(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A real WebSocket client.
pub struct Client {
    pub ws: Ws,
    pub socket_id: String,
}

/// A positioned envelope's data (a message of a topic joined with `since`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positioned {
    pub room: String,
    pub offset: u64,
    pub epoch: String,
    pub message: String,
    pub is_binary: bool,
}

impl Positioned {
    /// `{"offset":..,"epoch":..}`: what a client sends to recover after this message.
    pub fn since(&self) -> Value {
        serde_json::json!({"offset": self.offset, "epoch": self.epoch})
    }
}

/// What a client received.
#[derive(Debug, PartialEq)]
pub enum Received {
    Text(String),
    Binary(Vec<u8>),
    Close(Option<u16>, String),
    Ended,
}

impl Client {
    /// Connects to `path_and_query` (e.g. `/ws?token=…`), with `Authorization: Bearer` when
    /// `bearer` is given, and reads the session envelope; `Err` is the HTTP status of a
    /// refused upgrade and its body.
    pub async fn connect_with(
        addr: SocketAddr,
        path_and_query: &str,
        bearer: Option<&str>,
    ) -> Result<Self, (u16, String)> {
        let auth = bearer.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        Self::connect_with_headers(addr, path_and_query, &headers).await
    }

    /// As [`Client::connect_with`], with any request headers.
    pub async fn connect_with_headers(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, (u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut request = format!("ws://{addr}{path_and_query}")
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let ws = match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err((resp.status().as_u16(), body));
            }
            Err(e) => panic!("connect failed: {e}"),
        };
        let mut c = Self {
            ws,
            socket_id: String::new(),
        };
        let session = c.next_json().await;
        assert_eq!(session["name"], "session", "{session}");
        c.socket_id = session["data"]["socketId"].as_str().unwrap().to_owned();
        Ok(c)
    }

    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with(addr, "/ws", None)
            .await
            .unwrap_or_else(|(status, body)| panic!("upgrade refused: {status} {body}"))
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(WsMessage::text(text)).await.unwrap();
    }

    pub async fn next(&mut self) -> Received {
        let item = tokio::time::timeout(DEADLINE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Text(t))) => return Received::Text(t.as_str().to_owned()),
                    Some(Ok(WsMessage::Binary(b))) => return Received::Binary(b.to_vec()),
                    Some(Ok(WsMessage::Close(f))) => {
                        let (code, reason) =
                            f.map_or((None, String::new()), |CloseFrame { code, reason }| {
                                (Some(u16::from(code)), reason.as_str().to_owned())
                            });
                        return Received::Close(code, reason);
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Received::Ended,
                }
            }
        })
        .await;
        item.expect("no message within the deadline")
    }

    pub async fn next_text(&mut self) -> String {
        match self.next().await {
            Received::Text(t) => t,
            other => panic!("expected text, got {other:?}"),
        }
    }

    /// The text frames before `marker` (a message sent last, to know everything before it
    /// arrived), in order; the marker itself is consumed.
    pub async fn texts_until(&mut self, marker: &str) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let t = self.next_text().await;
            if t == marker {
                return got;
            }
            got.push(t);
        }
    }

    pub async fn next_json(&mut self) -> Value {
        serde_json::from_str(&self.next_text().await).unwrap()
    }

    /// Joins with an ack id and waits for `room.joined`.
    pub async fn join(&mut self, topic: &str) {
        self.send_text(
            &serde_json::json!({"type": "room.join", "room": topic, "id": topic}).to_string(),
        )
        .await;
        let ack = self.next_json().await;
        assert_eq!(ack["name"], "room.joined", "{ack}");
        assert_eq!(ack["data"]["room"], topic);
    }

    /// Joins with `since` (`{}` or `{"offset":..,"epoch":..}`) and an ack id; returns the
    /// `room.joined` data (`recovered`, `offset`, `epoch`).
    pub async fn join_since(&mut self, topic: &str, since: Value) -> Value {
        self.send_text(
            &serde_json::json!({"type": "room.join", "room": topic, "id": topic, "since": since})
                .to_string(),
        )
        .await;
        let ack = self.next_json().await;
        assert_eq!(ack["name"], "room.joined", "{ack}");
        assert_eq!(ack["data"]["room"], topic);
        ack["data"].clone()
    }

    /// The next frame, which must be a positioned envelope (`room.message`).
    pub async fn next_positioned(&mut self) -> Positioned {
        let v = self.next_json().await;
        assert_eq!(v["name"], "room.message", "{v}");
        let d = &v["data"];
        Positioned {
            room: d["room"].as_str().unwrap().to_owned(),
            offset: d["offset"].as_u64().unwrap(),
            epoch: d["epoch"].as_str().unwrap().to_owned(),
            message: d["message"].as_str().unwrap().to_owned(),
            is_binary: d["isBinary"].as_bool().unwrap(),
        }
    }

    /// Leaves with an ack id and waits for `room.left`.
    pub async fn leave(&mut self, topic: &str) {
        self.send_text(
            &serde_json::json!({"type": "room.leave", "room": topic, "id": 1}).to_string(),
        )
        .await;
        let ack = self.next_json().await;
        assert_eq!(ack["name"], "room.left", "{ack}");
    }

    /// Sends a command and expects an error envelope with `code`.
    pub async fn expect_error(&mut self, frame: &str, code: &str) {
        self.send_text(frame).await;
        let e = self.next_json().await;
        assert_eq!(e["name"], "error", "{frame} -> {e}");
        assert_eq!(e["data"]["code"], code, "{frame} -> {e}");
        assert!(e["data"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    /// Proves the connection still works: `2` gets `3`.
    pub async fn assert_alive(&mut self) {
        self.send_text("2").await;
        assert_eq!(self.next_text().await, "3");
    }
}

/// A WebSocket client written on a bare TCP socket, for what a well-behaved client library
/// will not do: send forbidden close codes, vanish with a FIN or a reset, keep sending after
/// the server closed.
pub struct RawClient {
    pub stream: TcpStream,
    /// Bytes read past the last parsed frame.
    buf: Vec<u8>,
    pub socket_id: String,
    /// The server's handshake response: status line and headers.
    pub response: String,
}

/// A frame the server sent: (opcode, payload).
pub type RawFrame = (u8, Vec<u8>);

impl RawClient {
    /// Opens `/ws` and waits for the `session` envelope.
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut c = Self::handshake(addr, "/ws").await;
        let (op, payload) = c.next_frame().await.expect("no session envelope");
        assert_eq!(op, 1);
        let session: Value = serde_json::from_slice(&payload).unwrap();
        c.socket_id = session["data"]["socketId"].as_str().unwrap().to_owned();
        c
    }

    /// Opens `path` and returns once the server switched protocols, without waiting for any
    /// frame (for gateways speaking an embedder's protocol, which send no `session`).
    pub async fn handshake(addr: SocketAddr, path: &str) -> Self {
        Self::handshake_with(addr, path, None).await
    }

    /// Opens `/ws` offering `extensions` (a `Sec-WebSocket-Extensions` value) and waits for
    /// the `session` envelope.
    pub async fn connect_offering(addr: SocketAddr, extensions: &str) -> Self {
        let mut c = Self::handshake_with(addr, "/ws", Some(extensions)).await;
        let (op, payload) = c.next_frame().await.expect("no session envelope");
        assert_eq!(op, 1);
        let session: Value = serde_json::from_slice(&payload).unwrap();
        c.socket_id = session["data"]["socketId"].as_str().unwrap().to_owned();
        c
    }

    /// The server's `Sec-WebSocket-Extensions` answer, if any.
    pub fn extensions(&self) -> Option<String> {
        self.response.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        })
    }

    /// [`RawClient::handshake`], offering `extensions` when given.
    pub async fn handshake_with(addr: SocketAddr, path: &str, extensions: Option<&str>) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let offer = extensions
            .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return end + 4;
                }
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed during the handshake");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("no handshake response within the deadline");
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        Self {
            stream,
            buf,
            socket_id: String::new(),
            response: head,
        }
    }

    /// A final, masked client frame.
    pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        Self::fragment(true, opcode, payload)
    }

    /// A final, masked frame carrying `message` compressed with permessage-deflate (RSV1 set).
    pub fn compressed_frame(opcode: u8, message: &[u8]) -> Vec<u8> {
        Self::fragment(true, 0x40 | opcode, &deflate(message))
    }

    /// A masked client frame, final or not (opcode 0 continues a fragmented message).
    pub fn fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask: [u8; 4] = rand::random();
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// A close frame carrying `code` and `reason`.
    pub fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        Self::frame(8, &payload)
    }

    /// Writes raw bytes; false once the server no longer takes them.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> bool {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) -> bool {
        self.send_raw(&Self::frame(1, text.as_bytes())).await
    }

    /// Joins `topic` with an ack id and waits for `room.joined` (the join barrier).
    pub async fn join(&mut self, topic: &str) {
        let cmd = serde_json::json!({"type": "room.join", "room": topic, "id": topic});
        assert!(self.send_text(&cmd.to_string()).await);
        let (op, payload) = self.next_frame().await.expect("no join ack");
        assert_eq!(op, 1);
        let ack: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(ack["name"], "room.joined", "{ack}");
    }

    /// The next frame, or `None` at end of stream or on a reset.
    pub async fn next_frame(&mut self) -> Option<RawFrame> {
        self.next_frame_bits()
            .await
            .map(|(b0, payload)| (b0 & 0x0F, payload))
    }

    /// The next frame with its whole first byte (FIN, RSV1-3, opcode), or `None` at end of
    /// stream or on a reset.
    pub async fn next_frame_bits(&mut self) -> Option<RawFrame> {
        tokio::time::timeout(DEADLINE, self.read_frame())
            .await
            .expect("no frame and no end of stream within the deadline")
    }

    /// The next data message of a connection that negotiated permessage-deflate: (opcode,
    /// whether it came compressed, the message inflated).
    pub async fn next_message(&mut self) -> Option<(u8, bool, Vec<u8>)> {
        let (b0, payload) = self.next_frame_bits().await?;
        assert_eq!(b0 & 0xB0, 0x80, "unexpected FIN/RSV bits {b0:#x}");
        let compressed = b0 & 0x40 != 0;
        let message = if compressed {
            inflate(&payload)
        } else {
            payload
        };
        Some((b0 & 0x0F, compressed, message))
    }

    async fn read_frame(&mut self) -> Option<RawFrame> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until the server's close frame: every frame before it, and its code (`None` for
    /// an empty close payload). Panics if the stream ends without a close frame.
    pub async fn until_close(&mut self) -> (Vec<RawFrame>, Option<u16>) {
        let mut before = Vec::new();
        loop {
            match self.next_frame().await {
                Some((8, payload)) => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return (before, code);
                }
                Some(frame) => before.push(frame),
                None => panic!(
                    "the stream ended without a close frame (after {} frames)",
                    before.len()
                ),
            }
        }
    }

    /// Waits for the server to end the stream (FIN or reset), discarding what arrives.
    pub async fn wait_end(&mut self) {
        while self.next_frame().await.is_some() {}
    }

    /// Closes the socket with a FIN and no close frame.
    pub fn drop_with_fin(self) {
        drop(self.stream);
    }

    /// Closes the socket with a TCP reset (SO_LINGER 0) and no close frame.
    pub fn drop_with_reset(self) {
        self.stream.set_zero_linger().unwrap();
        drop(self.stream);
    }
}

/// Compresses `message` as a permessage-deflate sender does (RFC 7692 §7.2.1: a raw deflate
/// stream, flushed, without the final `00 00 ff ff`), with flate2 rather than the gateway's
/// own code.
pub fn deflate(message: &[u8]) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(message.len() + 64);
    c.compress_vec(message, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert_eq!(
        c.total_in(),
        message.len() as u64,
        "output buffer too small"
    );
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Inflates a permessage-deflate message (RFC 7692 §7.2.2) as a client does.
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(16 << 20);
    d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .unwrap();
    assert_eq!(d.total_in(), input.len() as u64, "not all input inflated");
    out
}

/// Parses one unmasked server frame from the front of `buf`: (frame with its whole first
/// byte, bytes used).
fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0];
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, at) = match buf[1] & 0x7F {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => {
            let raw: [u8; 8] = buf.get(2..10)?.try_into().unwrap();
            (u64::from_be_bytes(raw) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some(((opcode, payload), at + len))
}

/// `n` gateway processes on one Redis with key prefix `prefix`, each ready.
pub async fn fleet(
    redis: &RedisServer,
    n: usize,
    prefix: &str,
    extra: &[&str],
) -> Vec<ProcessGateway> {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str(), "--key-prefix", prefix];
    if !extra.contains(&"--connect-timeout-ms") {
        args.extend_from_slice(&["--connect-timeout-ms", "1000"]);
    }
    args.extend_from_slice(extra);
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(ProcessGateway::spawn(&args).await);
    }
    for gw in &out {
        wait_ready(&gw.http(), 200).await;
    }
    out
}

/// Polls `check` every 50 ms (blocking the thread) until it holds; panics after `limit`.
/// For the Redis topology helpers, which ask the servers with blocking connections.
pub(crate) fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: never happened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `/readyz` answers `want`.
pub async fn wait_ready(http: &Http, want: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = http
            .get("/readyz")
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never became {want} (last {status})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
