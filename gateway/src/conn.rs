//! One WebSocket connection: the handshake, the reader loop and the writer task.
//!
//! The reader owns the read half and runs in the connection's task; the writer owns the write
//! half and runs in a task of its own, draining the connection's [`Outbox`]. When either side
//! ends, the other is stopped, and cleanup (unregistering, counting the close reason) happens in
//! one place at the end of [`run`].
//!
//! [`Outbox`]: crate::outbox::Outbox

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::auth::{AuthFailure, AuthMode, AuthSettings, Identity};
use crate::broker::{BrokerError, Message};
use crate::deflate::Negotiated;
use crate::error::{ApiError, ClientError};
use crate::frame::{self, FrameReader, Inbound, close_code};
use crate::history::{Recovery, RecoveryFailure};
use crate::hub::{Conn, Hub, Slot};
use crate::metrics::CloseReason;
use crate::outbox::Push;
use crate::protocol::{self, Command, JoinPosition};
use crate::types::{Channel, SocketId};

/// How much a read asks for at a time. The buffer exists only while bytes are being parsed.
const READ_CHUNK: usize = 4096;
/// The pong for the seed's `2` ping, encoded once.
static PONG_FRAME: &[u8] = &[0x81, 0x01, b'3'];

/// Per-connection settings taken from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// Largest inbound message accepted.
    pub max_frame_bytes: usize,
    /// Inbound messages per second (0: unlimited).
    pub max_inbound_rate: u32,
    /// How long a closing connection may take to flush its close frame.
    pub close_timeout: Duration,
    /// Negotiate permessage-deflate with clients that offer it.
    pub compression: bool,
}

/// An embedder's own application protocol, spoken over the gateway's WebSocket layer in place
/// of wsgate's client protocol.
///
/// The gateway still does everything below the messages — the handshake, frame parsing,
/// reassembly and UTF-8 checks, the size and rate limits, pings, the closing handshake, the
/// bounded outbox and its single writer — and hands each complete data message to the handler,
/// in order, from the connection's reader. Such connections get no `session` envelope and no
/// error envelopes; they are still registered, so [`crate::Gateway::send`] reaches them. A
/// message over `--max-frame-bytes` closes the connection with 1009.
pub trait MessageHandler: Send + Sync + 'static {
    /// Called for each complete text or binary message the client sent. Runs on the
    /// connection's reader: the next message is read once this returns.
    fn on_message(&self, conn: &Connection<'_>, message: Message);
}

/// The connection a [`MessageHandler`] was called for.
pub struct Connection<'a> {
    hub: &'a Hub,
    conn: &'a Conn,
}

impl Connection<'_> {
    /// The connection's socket id.
    pub fn id(&self) -> SocketId {
        self.conn.id()
    }

    /// Queues `message` on this connection's outbox, behind what is already queued and under
    /// the outbound queue limits. [`Message::Disconnect`] starts a normal close (1000).
    pub fn send(&self, message: Message) -> Push {
        self.hub.send_message(self.conn, message)
    }
}

/// Validates a WebSocket upgrade request and returns the `Sec-WebSocket-Accept` value.
///
/// # Errors
/// [`ApiError::BadRequest`] naming the missing or wrong header.
pub fn check_upgrade(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(ApiError::BadRequest(
            "expected a WebSocket upgrade request".into(),
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(ApiError::BadRequest(
            "Sec-WebSocket-Version must be 13".into(),
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.as_bytes())
                .is_ok_and(|d| d.len() == 16)
        })
        .ok_or_else(|| ApiError::BadRequest("missing or invalid Sec-WebSocket-Key".into()))?;
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    HeaderValue::from_str(&accept).map_err(|_| ApiError::BadRequest("bad key".into()))
}

/// The `101 Switching Protocols` response, with the extensions accepted (if any).
pub fn switching_protocols(accept: HeaderValue, extensions: Option<HeaderValue>) -> Response {
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(extensions) = extensions {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, extensions);
    }
    resp
}

/// Waits for the HTTP layer to hand over the socket, then runs the connection.
///
/// With a `handler`, the connection speaks the embedder's protocol (see [`MessageHandler`]).
/// `deflate` is what the handshake agreed for permessage-deflate, if anything.
pub async fn serve_upgraded(
    hub: Hub,
    on_upgrade: OnUpgrade,
    slot: Slot,
    settings: ConnSettings,
    handler: Option<Arc<dyn MessageHandler>>,
    deflate: Option<Negotiated>,
    auth: ConnAuth,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return;
        }
    };
    // Our own server hands over a plain TCP stream: use its halves directly (no lock, and
    // reads wait for readiness without holding a buffer). Embedders' servers may wrap it.
    let start = |leftover| Start {
        leftover,
        slot,
        settings,
        handler,
        deflate,
        auth,
    };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let socket = Arc::new(parts.io.into_inner());
            let writer = Writer::Tcp(socket.clone());
            let reader = TcpReader(socket);
            run(hub, reader, writer, start(parts.read_buf)).await;
        }
        Err(upgraded) => {
            let (r, w) = tokio::io::split(TokioIo::new(upgraded));
            let writer = Writer::Generic(Box::new(w));
            let reader = GenericReader(r);
            run(hub, reader, writer, start(Bytes::new())).await;
        }
    }
}

/// What a connection knows of authentication when it opens: the settings, and the identity a
/// token on the upgrade request proved, if any.
pub struct ConnAuth {
    pub settings: Arc<AuthSettings>,
    pub identity: Option<Identity>,
}

impl ConnAuth {
    /// Authentication off.
    pub fn off() -> Self {
        Self {
            settings: Arc::new(AuthSettings::off()),
            identity: None,
        }
    }
}

/// Where a connection stands with authentication.
enum AuthState {
    /// `--auth off`: today's behaviour.
    Off,
    /// No token (`--auth optional`): `--anonymous-topics` only.
    Anonymous,
    /// No token yet (`--auth required`): only pings and `auth.authenticate`, until the deadline.
    Pending,
    /// A verified token.
    User(Identity),
}

/// Where the writer puts bytes.
enum Writer {
    /// A TCP socket, shared with the reader and with the outbox for direct writes.
    Tcp(Arc<TcpStream>),
    /// Any other stream (an embedder's server may wrap the socket).
    Generic(Box<dyn AsyncWrite + Unpin + Send>),
}

/// Where the reader gets bytes from.
trait ReadSource: Send {
    /// Appends at least one byte to `buf`, or returns 0 at end of stream.
    fn read_into(
        &mut self,
        buf: &mut BytesMut,
    ) -> impl Future<Output = std::io::Result<usize>> + Send;
}

struct TcpReader(Arc<TcpStream>);

impl ReadSource for TcpReader {
    async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        loop {
            // Wait for data before allocating, so idle connections hold no read buffer.
            self.0.readable().await?;
            buf.reserve(READ_CHUNK);
            match self.0.try_read_buf(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Stale readiness: don't keep the buffer while waiting for real data.
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

struct GenericReader<R>(R);

impl<R: AsyncRead + Unpin + Send> ReadSource for GenericReader<R> {
    async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        buf.reserve(READ_CHUNK);
        self.0.read_buf(buf).await
    }
}

/// Token bucket for the inbound message rate.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
    /// Rejections since the last accepted message.
    strikes: u32,
}

impl RateLimit {
    fn new(rate: u32) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
            strikes: 0,
        })
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

/// What a connection starts with besides its socket.
struct Start {
    /// Bytes the HTTP layer read past the upgrade request.
    leftover: Bytes,
    slot: Slot,
    settings: ConnSettings,
    handler: Option<Arc<dyn MessageHandler>>,
    /// permessage-deflate, if the handshake agreed it.
    deflate: Option<Negotiated>,
    auth: ConnAuth,
}

async fn run<R>(hub: Hub, mut reader: R, writer: Writer, start: Start)
where
    R: ReadSource,
{
    let Start {
        leftover,
        slot,
        settings,
        handler,
        deflate,
        auth,
    } = start;
    let socket = match &writer {
        Writer::Tcp(socket) => Some(socket.clone()),
        Writer::Generic(_) => None,
    };
    let compressed = deflate.is_some_and(|d| d.compress_outbound);
    let conn = hub.register_compressed(socket, compressed);
    let writer_task = tokio::spawn({
        let conn = conn.clone();
        let metrics = hub.metrics().clone();
        async move {
            match writer {
                Writer::Tcp(socket) => conn.outbox.run_tcp_writer(socket, &metrics).await,
                Writer::Generic(w) => conn.outbox.run_writer(w, &metrics).await,
            }
        }
    });

    let (state, deadline) = match (auth.settings.mode, auth.identity) {
        (AuthMode::Off, _) => (AuthState::Off, None),
        (_, Some(identity)) => {
            let until = expiry(&identity, &auth.settings);
            (AuthState::User(identity), Some(until))
        }
        (AuthMode::Optional, None) => (AuthState::Anonymous, None),
        (AuthMode::Required, None) => (
            AuthState::Pending,
            Some(tokio::time::Instant::now() + auth.settings.timeout),
        ),
    };
    if let AuthState::User(Identity {
        user: Some(user), ..
    }) = &state
    {
        // Reachable as the user before the session envelope goes out, like the socket id.
        hub.set_user(&conn, user);
        if let Err(e) = hub.broker().confirmed(&Channel::User(user.clone())).await {
            tracing::debug!(error = %e, "session sent before the user's channel was confirmed");
        }
    }
    if handler.is_some() {
        hub.open_without_session(&conn);
    } else {
        hub.open(&conn).await;
    }
    let mut session = Session {
        hub: &hub,
        conn: &conn,
        frames: FrameReader::new(settings.max_frame_bytes).with_deflate(deflate.is_some()),
        rate: RateLimit::new(settings.max_inbound_rate),
        settings,
        peer_closed: false,
        handler,
        auth: auth.settings,
        state,
        deadline,
    };
    // Copy what the HTTP layer read past the upgrade request, and let go of its buffer: the
    // `Bytes` may pin hyper's whole read buffer for the life of the connection.
    let mut buf = BytesMut::from(&leftover[..]);
    drop(leftover);
    // Whether the peer's side of the socket is gone (end of stream or an error).
    let mut peer_gone = false;
    'outer: loop {
        // Handle everything already buffered before waiting for more.
        loop {
            match session.frames.next(&mut buf) {
                Ok(Some(item)) => {
                    if session.handle(item).await.is_break() {
                        break 'outer;
                    }
                }
                Ok(None) => break,
                Err(v) => {
                    conn.outbox
                        .close(v.code, v.reason, CloseReason::ProtocolError, true);
                    break 'outer;
                }
            }
        }
        if buf.is_empty() {
            // Release the read buffer between messages.
            buf = BytesMut::new();
        }
        let deadline = session.deadline;
        tokio::select! {
            biased;
            () = conn.outbox.closing() => break,
            () = until(deadline) => {
                session.on_deadline();
                break;
            }
            r = reader.read_into(&mut buf) => match r {
                Ok(0) => {
                    // End of stream without a close frame: nothing left to send to.
                    conn.outbox.abort(CloseReason::Client);
                    peer_gone = true;
                    break;
                }
                Ok(_) => hub.touch(&conn),
                Err(_) => {
                    conn.outbox.abort(CloseReason::IoError);
                    peer_gone = true;
                    break;
                }
            },
        }
    }

    let mut writer_task = writer_task;
    if peer_gone {
        // A peer that sent FIN or a reset reads nothing more: stop the writer now (it may be
        // waiting on a full socket buffer). The close timeout is for peers still connected
        // that do not finish the closing handshake.
        writer_task.abort();
    } else {
        // A lingering close, within the close timeout: the writer flushes the close frame and
        // shuts down the sending side while the reader keeps taking what the peer still sends,
        // until its close frame or end of stream. Closing a socket with unread input makes
        // the kernel send a reset, and a reset makes the peer's kernel drop what it has not
        // read yet — our close frame and the error envelopes before it.
        let peer_closed = session.peer_closed;
        let frames = &mut session.frames;
        let flushed = async {
            let _ = (&mut writer_task).await;
        };
        let drained = async {
            if !peer_closed {
                linger(&mut reader, frames, &mut buf).await;
            }
        };
        let closed = tokio::time::timeout(settings.close_timeout, async {
            tokio::join!(flushed, drained);
        })
        .await;
        if closed.is_err() {
            writer_task.abort();
        }
    }
    // Counted until the closing handshake is over, so that a draining gateway does not exit
    // while close frames are still on their way.
    hub.unregister(&conn);
    drop(slot);
}

/// When a token that expires at `identity.expires_at` stops being accepted (the same clock
/// leeway as when it was verified).
fn expiry(identity: &Identity, settings: &AuthSettings) -> tokio::time::Instant {
    tokio::time::Instant::now() + identity.remaining() + settings.leeway
}

/// Resolves at `deadline`, or never.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Reads and discards what the peer sends until its close frame or the end of the stream.
/// Bytes that do not parse are discarded unparsed.
async fn linger<R: ReadSource>(reader: &mut R, frames: &mut FrameReader, buf: &mut BytesMut) {
    let mut parsing = true;
    loop {
        while parsing {
            match frames.next(buf) {
                Ok(Some(Inbound::Close(_))) => return,
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => parsing = false,
            }
        }
        if !parsing {
            buf.clear();
        }
        match reader.read_into(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

struct Session<'a> {
    hub: &'a Hub,
    conn: &'a Arc<Conn>,
    frames: FrameReader,
    rate: Option<RateLimit>,
    settings: ConnSettings,
    /// The peer sent its close frame: nothing more is expected from it.
    peer_closed: bool,
    /// The embedder's protocol, in place of wsgate's.
    handler: Option<Arc<dyn MessageHandler>>,
    auth: Arc<AuthSettings>,
    state: AuthState,
    /// When the connection is closed unless something happens first: the end of the time to
    /// authenticate, or the token's expiry.
    deadline: Option<tokio::time::Instant>,
}

impl Session<'_> {
    fn error(&self, error: &ClientError, id: Option<&protocol::AckId>) {
        self.hub.metrics().client_error(error);
        // Error envelopes are wsgate's protocol, not an embedder's.
        if self.handler.is_none() {
            self.hub
                .send_control(self.conn, protocol::error_frame(error, id));
        }
    }

    /// Handles one inbound item; `Break` ends the read loop.
    async fn handle(&mut self, item: Inbound) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::{Break, Continue};
        match item {
            Inbound::Text(_) | Inbound::Binary(_) | Inbound::TooLarge { .. } => {
                if let Some(rate) = &mut self.rate
                    && !rate.allow()
                {
                    let limit = rate.rate as u32;
                    if rate.strikes > limit.max(10) {
                        self.conn.outbox.close(
                            close_code::POLICY_VIOLATION,
                            "inbound message rate exceeded",
                            CloseReason::RateLimited,
                            false,
                        );
                        return Break(());
                    }
                    self.error(&ClientError::RateLimited(limit), None);
                    return Continue(());
                }
            }
            _ => {}
        }
        // An embedder's protocol takes the data messages; the WebSocket layer keeps the rest.
        let item = match (self.handler.as_deref(), item) {
            (Some(handler), Inbound::Text(text)) => {
                return self.to_handler(handler, Message::Text(text));
            }
            (Some(handler), Inbound::Binary(data)) => {
                return self.to_handler(handler, Message::Binary(data));
            }
            (Some(_), Inbound::TooLarge { .. }) => {
                self.conn.outbox.close(
                    close_code::MESSAGE_TOO_BIG,
                    "message too big",
                    CloseReason::ProtocolError,
                    false,
                );
                return Break(());
            }
            (_, item) => item,
        };
        match item {
            Inbound::Text(text) => return self.on_text(&text).await,
            Inbound::Binary(_) => self.error(&ClientError::UnsupportedBinary, None),
            Inbound::TooLarge { len } => self.error(
                &ClientError::MessageTooLarge {
                    len,
                    max: self.settings.max_frame_bytes,
                },
                None,
            ),
            Inbound::Ping(payload) => {
                self.hub
                    .send_control(self.conn, frame::encode(frame::OpCode::Pong, &payload));
            }
            Inbound::Pong => {}
            Inbound::Close(code) => {
                // Echo the close handshake with the client's code (the frame reader already
                // failed the connection for a code that may not be sent), after anything
                // already queued.
                let echo = code.unwrap_or(close_code::NORMAL);
                self.conn.outbox.close(echo, "", CloseReason::Client, false);
                self.peer_closed = true;
                return Break(());
            }
        }
        Continue(())
    }

    fn to_handler(
        &self,
        handler: &dyn MessageHandler,
        message: Message,
    ) -> std::ops::ControlFlow<()> {
        let conn = Connection {
            hub: self.hub,
            conn: self.conn,
        };
        handler.on_message(&conn, message);
        std::ops::ControlFlow::Continue(())
    }

    /// A join with `since`: subscribe (live messages wait), pass the join barrier, read the
    /// history, then send the acknowledgement, what was missed and what waited, in order.
    ///
    /// Why nothing is lost or doubled at the seam: the history is read only after the
    /// subscription is confirmed, so every message after what the read returns arrives live;
    /// live messages that the read also returned are recognised by their position and skipped.
    async fn join_positioned(
        &mut self,
        topic: crate::types::Topic,
        id: Option<protocol::AckId>,
        position: JoinPosition,
    ) {
        let positioned = match self.hub.join_positioned(self.conn, &topic) {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => return self.error(&e, id.as_ref()),
        };
        let broker = self.hub.broker().clone();
        let since = match &position {
            JoinPosition::Since(s) => Some(s),
            _ => None,
        };
        if let Err(e) = broker.confirmed(&Channel::Topic(topic.clone())).await {
            self.hub.finish_recovery(
                &positioned,
                None,
                &Recovery::failed(RecoveryFailure::Unavailable),
            );
            if since.is_some() {
                self.hub
                    .metrics()
                    .broker
                    .history
                    .recovery_failed(RecoveryFailure::Unavailable);
            }
            return self.error(&unconfirmed(e), id.as_ref());
        }
        let recovery = broker.recover(&topic, since).await;
        let history = &self.hub.metrics().broker.history;
        match recovery.outcome {
            Ok(()) => {
                history.recoveries.inc();
                history.recovered.inc_by(recovery.entries.len() as u64);
            }
            Err(Some(why)) if since.is_some() => history.recovery_failed(why),
            Err(_) => {}
        }
        let ack = id.map(|id| {
            protocol::recovery_ack_frame(
                &topic,
                &id,
                recovery.outcome.is_ok(),
                recovery.top.as_ref(),
            )
        });
        self.hub.finish_recovery(&positioned, ack, &recovery);
    }

    /// The connection's deadline passed: the time to authenticate, or the token's life.
    fn on_deadline(&mut self) {
        match self.state {
            AuthState::Pending => {
                let _ = self.refuse(AuthFailure::Timeout);
            }
            AuthState::User(_) => {
                self.conn.outbox.close(
                    close_code::TOKEN_EXPIRED,
                    "token expired",
                    CloseReason::TokenExpired,
                    false,
                );
            }
            AuthState::Off | AuthState::Anonymous => {}
        }
    }

    /// Refuses a token (or its absence): counted, an `unauthorized` error, close 1008.
    fn refuse(&mut self, why: AuthFailure) -> std::ops::ControlFlow<()> {
        self.hub.metrics().auth_failed(why);
        self.error(&ClientError::Unauthorized(why), None);
        self.conn.outbox.close(
            close_code::POLICY_VIOLATION,
            why.message(),
            CloseReason::Unauthorized,
            false,
        );
        std::ops::ControlFlow::Break(())
    }

    /// Whether this connection may join `topic`.
    fn may_join(&self, topic: &str) -> bool {
        let anonymous =
            || self.auth.mode == AuthMode::Optional && self.auth.anonymous_topics.matches(topic);
        match &self.state {
            AuthState::Off => true,
            AuthState::Pending => false,
            AuthState::Anonymous => anonymous(),
            AuthState::User(identity) => identity.topics.matches(topic) || anonymous(),
        }
    }

    /// `auth.authenticate`: a first token, or a fresh one before the current one expires.
    async fn authenticate(&mut self, token: &str) -> std::ops::ControlFlow<()> {
        let Some(verifier) = self.auth.verifier.clone() else {
            // Authentication off: the message means nothing, as before.
            self.error(&ClientError::UnknownType, None);
            return std::ops::ControlFlow::Continue(());
        };
        let identity = match verifier.verify(token) {
            Ok(identity) => identity,
            Err(why) => return self.refuse(why),
        };
        if let AuthState::User(current) = &self.state
            && current.user != identity.user
        {
            // A refresh continues the same user's connection; another user connects anew.
            return self.refuse(AuthFailure::Claims);
        }
        self.deadline = Some(expiry(&identity, &self.auth));
        let ok = protocol::auth_ok_frame(
            identity.user.as_ref().map(|u| u.as_str()),
            identity.expires_at,
        );
        let user = identity.user.clone();
        self.state = AuthState::User(identity);
        // Rooms the new token no longer allows are left, and the client told.
        for topic in self.conn.joined() {
            if !self.may_join(topic.as_str()) && self.hub.leave(self.conn, &topic) {
                self.hub
                    .send_control(self.conn, protocol::revoked_frame(&topic));
            }
        }
        if let Some(user) = user {
            // The same user as before, if any (checked above): nothing changes then. `auth.ok`
            // waits, like `room.joined`, until messages to the user reach this connection.
            self.hub.set_user(self.conn, &user);
            if let Err(e) = self.hub.broker().confirmed(&Channel::User(user)).await {
                tracing::debug!(error = %e, "auth.ok sent before the user's channel was confirmed");
            }
        }
        self.hub.send_control(self.conn, ok);
        std::ops::ControlFlow::Continue(())
    }

    async fn on_text(&mut self, text: &[u8]) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::Continue;
        let command = match protocol::parse_command(text) {
            Ok(c) => c,
            Err(rejected) => {
                if let (ClientError::Unauthorized(why), false) =
                    (&rejected.error, matches!(self.state, AuthState::Off))
                {
                    // An `auth.authenticate` without a usable token.
                    return self.refuse(*why);
                }
                self.error(&rejected.error, rejected.id.as_ref());
                return Continue(());
            }
        };
        if let AuthState::Pending = self.state {
            match &command {
                Command::Ping | Command::Heartbeat | Command::Authenticate { .. } => {}
                Command::Join { id, .. } | Command::Leave { id, .. } => {
                    self.error(&ClientError::AuthenticateFirst, id.as_ref());
                    return Continue(());
                }
            }
        }
        if let Command::Join { topic, id, .. } = &command
            && !self.may_join(topic.as_str())
        {
            self.hub.metrics().forbidden_joins.inc();
            self.error(&ClientError::Forbidden, id.as_ref());
            return Continue(());
        }
        match command {
            Command::Ping => self
                .hub
                .send_control(self.conn, Bytes::from_static(PONG_FRAME)),
            Command::Heartbeat => {}
            Command::Join {
                topic,
                id,
                position: JoinPosition::Plain,
            } => {
                if let Err(e) = self.hub.join(self.conn, &topic) {
                    self.error(&e, id.as_ref());
                    return Continue(());
                }
                let Some(id) = id else {
                    return Continue(());
                };
                // The join barrier: acknowledge only once delivery is active cluster-wide.
                let channel = Channel::Topic(topic.clone());
                match self.hub.broker().confirmed(&channel).await {
                    Ok(()) => self
                        .hub
                        .send_control(self.conn, protocol::ack_frame(true, &topic, &id)),
                    Err(e) => self.error(&unconfirmed(e), Some(&id)),
                }
            }
            Command::Join {
                topic,
                id,
                position,
            } => self.join_positioned(topic, id, position).await,
            Command::Leave { topic, id } => {
                self.hub.leave(self.conn, &topic);
                if let Some(id) = id {
                    self.hub
                        .send_control(self.conn, protocol::ack_frame(false, &topic, &id));
                }
            }
            Command::Authenticate { token } => return self.authenticate(&token).await,
        }
        Continue(())
    }
}

/// The client error for a join the broker did not confirm.
fn unconfirmed(e: BrokerError) -> ClientError {
    ClientError::Broker(match e {
        BrokerError::Timeout => "subscription not confirmed in time".to_owned(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_accept_key_matches_the_rfc_example() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(check_upgrade(&h).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn upgrade_requests_missing_headers_are_rejected() {
        let mut h = HeaderMap::new();
        assert!(check_upgrade(&h).is_err());
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(check_upgrade(&h).is_err());
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("short"));
        assert!(check_upgrade(&h).is_err());
    }

    #[test]
    fn rate_limit_allows_a_burst_then_refuses() {
        let mut r = RateLimit::new(5).unwrap();
        let allowed = (0..10).filter(|_| r.allow()).count();
        assert!((5..=6).contains(&allowed), "{allowed}");
        assert!(RateLimit::new(0).is_none());
    }
}
