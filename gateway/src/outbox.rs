//! A connection's bounded outbound queue and its single writer.
//!
//! Publishers push pre-encoded frames (shared [`Bytes`], never copied per recipient) under a
//! short per-connection lock. When nothing is queued and the writer is idle, the frame is
//! written to the socket right away with a non-blocking write from the publishing thread — no
//! task wake-up, no context switch. Otherwise it is queued, and the writer task takes
//! everything queued in one go and writes it with vectored writes, so a burst costs one
//! wake-up and few syscalls. Order is kept because both paths decide under the same lock. A queue that would pass
//! its bound is a decision, not a silent drop: the backlog is discarded, a close frame is queued
//! and the connection is torn down with the reason recorded once.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::frame;
use crate::metrics::{CloseReason, DropReason, Metrics};

/// Most frames handed to one `writev` call.
const MAX_SLICES: usize = 16;

/// Bounds of each connection's outbound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most frames waiting to be written.
    pub max_messages: usize,
    /// Most payload bytes waiting to be written.
    pub max_bytes: usize,
}

/// What a queued frame is, for accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A published message (counts as delivered once written).
    Data,
    /// Protocol traffic: session, acks, errors, pongs.
    Control,
    /// The close frame: the writer stops after it.
    Close,
}

struct Item {
    frame: Bytes,
    kind: Kind,
    /// The frame's first bytes are already on the wire (a partial direct write): the rest
    /// must follow, or the stream is corrupt.
    started: bool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Item>,
    bytes: usize,
    /// Set once the connection started closing; no more frames are accepted.
    closing: Option<CloseReason>,
    /// The socket, for direct writes (TCP connections only; cleared when closing).
    direct: Option<Arc<TcpStream>>,
    /// The writer task holds a batch: frames must queue behind it.
    busy: bool,
    /// Nothing goes out until [`Outbox::release`]: the connection's first frame is not known
    /// yet.
    held: bool,
}

/// The result of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Push {
    /// Written to the socket directly.
    Written,
    /// Queued for the writer.
    Queued,
    /// The queue was full: the connection is now closing as a slow consumer.
    Overflow,
    /// The connection is already closing; the frame was dropped.
    Closed,
}

/// One connection's outbound side.
///
/// `closing_flag` comes first and sits next to the lock, so that [`Outbox::warm`] brings the
/// lock's cache line in with a plain load.
#[repr(C)]
pub struct Outbox {
    closing_flag: AtomicBool,
    /// The client negotiated permessage-deflate: data messages go to it compressed when that
    /// pays (here rather than beside the outbox: it fits this struct's padding, so a
    /// connection costs no more memory than without compression).
    compressed: bool,
    state: Mutex<State>,
    /// The socket of the direct writes, for [`Outbox::warm`] only: it does not keep the
    /// socket open.
    warm_socket: Weak<TcpStream>,
    wake_writer: Notify,
    closing: Notify,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// An empty, open outbox.
    pub fn new() -> Self {
        Self::with_socket(None)
    }

    /// The same outbox, for a client that negotiated permessage-deflate when `compressed`.
    #[must_use]
    pub fn with_compression(mut self, compressed: bool) -> Self {
        self.compressed = compressed;
        self
    }

    /// Whether the client takes compressed data messages (it negotiated permessage-deflate).
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// An outbox that may write to `socket` directly when its queue is empty.
    pub fn with_socket(socket: Option<Arc<TcpStream>>) -> Self {
        Self {
            closing_flag: AtomicBool::new(false),
            compressed: false,
            warm_socket: socket.as_ref().map_or_else(Weak::new, Arc::downgrade),
            state: Mutex::new(State {
                direct: socket,
                ..State::default()
            }),
            wake_writer: Notify::new(),
            closing: Notify::new(),
        }
    }

    /// Touches the memory a direct write is about to need — the lock's cache line and the
    /// socket's — with plain loads that do not depend on each other.
    ///
    /// A fan-out calls this for the next few recipients before pushing to them, so their
    /// cache misses overlap instead of each push stalling on its own in turn (at 100 messages
    /// a second per connection, every connection's memory has left the cache between two
    /// deliveries).
    pub fn warm(&self) {
        std::hint::black_box(self.closing_flag.load(Ordering::Relaxed));
        std::hint::black_box(self.warm_socket.strong_count());
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a frame: written directly when nothing is queued and the writer is idle,
    /// otherwise queued. Enforces `limits` for data frames.
    pub fn push(&self, frame: Bytes, kind: Kind, limits: &QueueLimits, metrics: &Metrics) -> Push {
        self.push_inner(frame, kind, limits, metrics, true)
    }

    /// Queues a frame for the writer task, never writing from the caller's thread: under a
    /// heavy fan-out this spreads the writes over the runtime's threads and lets each writer
    /// send many messages per syscall.
    pub fn push_batched(
        &self,
        frame: Bytes,
        kind: Kind,
        limits: &QueueLimits,
        metrics: &Metrics,
    ) -> Push {
        self.push_inner(frame, kind, limits, metrics, false)
    }

    fn push_inner(
        &self,
        frame: Bytes,
        kind: Kind,
        limits: &QueueLimits,
        metrics: &Metrics,
        direct: bool,
    ) -> Push {
        let mut st = self.lock();
        if st.closing.is_some() {
            drop(st);
            if kind == Kind::Data {
                metrics.dropped(DropReason::ConnectionClosed, 1);
            }
            return Push::Closed;
        }
        if kind == Kind::Data
            && (st.queue.len() >= limits.max_messages || st.bytes + frame.len() > limits.max_bytes)
        {
            let discarded = st
                .queue
                .iter()
                .filter(|i| i.kind == Kind::Data && !i.started)
                .count() as u64
                + 1;
            self.begin_close(
                &mut st,
                frame::close(
                    frame::close_code::POLICY_VIOLATION,
                    "slow consumer: outbound queue full",
                ),
                CloseReason::SlowConsumer,
                true,
            );
            drop(st);
            metrics.dropped(DropReason::SlowConsumer, discarded);
            return Push::Overflow;
        }
        let mut frame = frame;
        let mut started = false;
        let idle = st.queue.is_empty() && !st.busy && !st.held;
        if idle
            && direct
            && let Some(socket) = &st.direct
        {
            // A plain non-blocking send, not tokio's `try_write`: that would also read the
            // socket's readiness state, one more cache miss per delivery. Nothing is lost by
            // going around it: when this send would block, the frame is queued and the
            // writer's own write sees the full buffer, which clears the readiness it waits on.
            match socket2::SockRef::from(&**socket).send(&frame) {
                Ok(n) if n == frame.len() => {
                    drop(st);
                    if kind == Kind::Data {
                        metrics.delivered.inc();
                    }
                    return Push::Written;
                }
                // The rest waits for the writer (errors too: the writer reports them).
                Ok(n) => {
                    frame.advance(n);
                    started = n > 0;
                }
                Err(_) => {}
            }
        }
        st.bytes += frame.len();
        st.queue.push_back(Item {
            frame,
            kind,
            started,
        });
        drop(st);
        if idle {
            self.wake_writer.notify_one();
        }
        Push::Queued
    }

    /// Holds everything queued from now on until [`Outbox::release`].
    pub fn hold(&self) {
        self.lock().held = true;
    }

    /// Sends `first` (if any) ahead of everything queued while held, then lets the rest
    /// follow.
    pub fn release(&self, first: Option<Bytes>) {
        let mut st = self.lock();
        if !st.held {
            return;
        }
        st.held = false;
        if let Some(first) = first {
            st.bytes += first.len();
            st.queue.push_front(Item {
                frame: first,
                kind: Kind::Control,
                started: false,
            });
        }
        drop(st);
        self.wake_writer.notify_one();
    }

    /// Starts closing with `code`/`reason`, after the frames already queued unless `discard`.
    ///
    /// Returns false when the connection was already closing (the first reason wins).
    pub fn close(&self, code: u16, reason: &str, why: CloseReason, discard: bool) -> bool {
        let mut st = self.lock();
        if st.closing.is_some() {
            return false;
        }
        self.begin_close(&mut st, frame::close(code, reason), why, discard);
        true
    }

    /// Marks the connection as closing without sending anything (the socket is gone).
    pub fn abort(&self, why: CloseReason) {
        let mut st = self.lock();
        if st.closing.is_none() {
            st.closing = Some(why);
            st.queue.clear();
            st.bytes = 0;
            st.direct = None;
            drop(st);
            self.signal_closing();
            // An idle writer would otherwise sleep until the connection's close timeout.
            self.wake_writer.notify_one();
        }
    }

    fn begin_close(&self, st: &mut State, close_frame: Bytes, why: CloseReason, discard: bool) {
        if discard {
            // Only ever the queue's front can be partly written; that frame is finished, or
            // the close frame would land in the middle of its payload.
            let started = st.queue.pop_front().filter(|i| i.started);
            st.queue = VecDeque::new();
            st.bytes = started.as_ref().map_or(0, |i| i.frame.len());
            st.queue.extend(started);
        }
        st.closing = Some(why);
        // No more direct writes: the close frame must be the last thing on the wire, and the
        // writer alone should hold the socket so that it is shut down when the writer ends.
        st.direct = None;
        st.queue.push_back(Item {
            frame: close_frame,
            kind: Kind::Close,
            started: false,
        });
        self.wake_writer.notify_one();
        self.signal_closing();
    }

    fn signal_closing(&self) {
        self.closing_flag.store(true, Ordering::Release);
        self.closing.notify_waiters();
    }

    /// Why the connection is closing, if it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().closing
    }

    /// Whether the connection started closing.
    pub fn is_closing(&self) -> bool {
        self.closing_flag.load(Ordering::Acquire)
    }

    /// Resolves once the connection starts closing.
    pub async fn closing(&self) {
        let notified = self.closing.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_closing() {
            return;
        }
        notified.await;
    }

    /// Frames currently queued (for tests and stats).
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// The writer: drains the queue into `w` until the close frame is written or the socket
    /// fails. Runs as the connection's only writer.
    pub async fn run_writer<W: AsyncWrite + Unpin + Send>(&self, w: W, metrics: &Metrics) {
        self.drive(StreamSink(w), metrics).await;
    }
}

impl Outbox {
    /// Takes everything queued into `batch` (marking the writer busy), or marks it idle.
    fn take(&self, batch: &mut VecDeque<Item>) -> Take {
        let mut st = self.lock();
        if st.closing.is_some() && st.queue.is_empty() {
            // Closing leaves the close frame queued until the writer takes it, so an empty
            // queue here means the connection was aborted: there is nothing left to write.
            return Take::Done;
        }
        if st.held {
            return Take::Idle;
        }
        if st.queue.is_empty() {
            st.busy = false;
            Take::Idle
        } else {
            std::mem::swap(&mut st.queue, batch);
            st.bytes = 0;
            st.busy = true;
            Take::Batch
        }
    }

    /// The writer for a TCP connection whose socket is shared with [`Outbox::push`]'s direct
    /// writes and with the reader. Stops after the close frame (shutting down the sending
    /// side: FIN) or when the socket fails.
    pub async fn run_tcp_writer(&self, socket: Arc<TcpStream>, metrics: &Metrics) {
        self.drive(TcpSink(socket), metrics).await;
    }

    /// The writer loop shared by both kinds of socket.
    async fn drive<S: BatchSink>(&self, mut sink: S, metrics: &Metrics) {
        let mut batch: VecDeque<Item> = VecDeque::new();
        loop {
            match self.take(&mut batch) {
                Take::Batch => {}
                Take::Idle => {
                    self.wake_writer.notified().await;
                    continue;
                }
                Take::Done => return,
            }
            match sink.write(&mut batch).await {
                Ok((delivered, closed)) => {
                    metrics.delivered.inc_by(delivered);
                    if closed {
                        sink.finish().await;
                        return;
                    }
                }
                Err(_) => {
                    self.abort(CloseReason::IoError);
                    return;
                }
            }
            // Idle connections should hold no queue memory: give the buffer back. A busy
            // connection pays one small allocation per wake-up, not per message.
            batch = VecDeque::new();
        }
    }
}

/// What the writer found in the queue.
enum Take {
    /// Frames to write, now in the writer's batch.
    Batch,
    /// Nothing to write yet.
    Idle,
    /// The connection was aborted: the writer is done.
    Done,
}

/// Where a writer sends its batches.
trait BatchSink: Send {
    /// Writes every frame of `batch` (emptying it): (data frames written, close written).
    fn write(
        &mut self,
        batch: &mut VecDeque<Item>,
    ) -> impl Future<Output = std::io::Result<(u64, bool)>> + Send;
    /// Ends the stream after the close frame.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// Any async stream, owned by the writer.
struct StreamSink<W>(W);

impl<W: AsyncWrite + Unpin + Send> BatchSink for StreamSink<W> {
    async fn write(&mut self, batch: &mut VecDeque<Item>) -> std::io::Result<(u64, bool)> {
        write_batch(&mut self.0, batch).await
    }

    async fn finish(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// A TCP socket shared with the outbox's direct writes and the reader.
struct TcpSink(Arc<TcpStream>);

impl BatchSink for TcpSink {
    async fn write(&mut self, batch: &mut VecDeque<Item>) -> std::io::Result<(u64, bool)> {
        write_batch_tcp(&self.0, batch).await
    }

    async fn finish(&mut self) {
        // The reader still holds the socket (it waits for the peer's close), so the sending
        // side is shut down explicitly. A socket that is already gone needs nothing.
        let _ = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
    }
}

/// Fills `slices` from the front of `batch`, stopping after a close frame.
fn fill<'a>(batch: &'a VecDeque<Item>, slices: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
    let mut count = 0;
    for item in batch.iter().take(MAX_SLICES) {
        slices[count] = IoSlice::new(&item.frame);
        count += 1;
        if item.kind == Kind::Close {
            break;
        }
    }
    count
}

/// Drops the first `n` written bytes from `batch`; returns (data frames done, close written).
fn advance(batch: &mut VecDeque<Item>, mut n: usize) -> (u64, bool) {
    let mut delivered = 0;
    while n > 0 {
        let Some(front) = batch.front_mut() else {
            break;
        };
        if n < front.frame.len() {
            front.frame.advance(n);
            break;
        }
        n -= front.frame.len();
        let kind = front.kind;
        batch.pop_front();
        match kind {
            Kind::Data => delivered += 1,
            Kind::Control => {}
            Kind::Close => {
                batch.clear();
                return (delivered, true);
            }
        }
    }
    (delivered, false)
}

async fn write_batch_tcp(
    socket: &TcpStream,
    batch: &mut VecDeque<Item>,
) -> std::io::Result<(u64, bool)> {
    let mut delivered = 0u64;
    while !batch.is_empty() {
        let written = {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = fill(batch, &mut slices);
            socket.try_write_vectored(&slices[..count])
        };
        match written {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                let (d, closed) = advance(batch, n);
                delivered += d;
                if closed {
                    return Ok((delivered, true));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok((delivered, false))
}

/// Writes every frame of `batch` (emptying it). Returns the data frames written and whether
/// the close frame was among them (frames after it are not written).
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut VecDeque<Item>,
) -> std::io::Result<(u64, bool)> {
    let mut delivered = 0u64;
    while !batch.is_empty() {
        let n = {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = fill(batch, &mut slices);
            w.write_vectored(&slices[..count]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let (d, closed) = advance(batch, n);
        delivered += d;
        if closed {
            return Ok((delivered, true));
        }
    }
    Ok((delivered, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const LIMITS: QueueLimits = QueueLimits {
        max_messages: 4,
        max_bytes: 1000,
    };

    #[tokio::test]
    async fn writer_writes_queued_frames_in_order_then_stops_after_close() {
        let metrics = Metrics::new();
        let outbox = Outbox::new();
        for i in 0..3u8 {
            assert_eq!(
                outbox.push(frame::text(&[b'0' + i]), Kind::Data, &LIMITS, &metrics),
                Push::Queued
            );
        }
        assert!(outbox.close(1000, "bye", CloseReason::Client, false));
        assert_eq!(
            outbox.push(frame::text(b"late"), Kind::Data, &LIMITS, &metrics),
            Push::Closed
        );
        let (client, server) = tokio::io::duplex(64);
        outbox.run_writer(server, &metrics).await;
        let mut got = Vec::new();
        let mut client = client;
        client.read_to_end(&mut got).await.unwrap();
        let mut want = [frame::text(b"0"), frame::text(b"1"), frame::text(b"2")].concat();
        want.extend_from_slice(&frame::close(1000, "bye"));
        assert_eq!(got, want);
        assert_eq!(metrics.delivered.get(), 3);
    }

    #[tokio::test]
    async fn a_held_outbox_sends_its_first_frame_ahead_of_everything_queued_meanwhile() {
        let metrics = Metrics::new();
        let outbox = Outbox::new();
        outbox.hold();
        assert_eq!(
            outbox.push(frame::text(b"early"), Kind::Data, &LIMITS, &metrics),
            Push::Queued
        );
        outbox.release(Some(frame::text(b"session")));
        outbox.close(1000, "", CloseReason::Client, false);
        let (mut client, server) = tokio::io::duplex(256);
        outbox.run_writer(server, &metrics).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let mut want = [frame::text(b"session"), frame::text(b"early")].concat();
        want.extend_from_slice(&frame::close(1000, ""));
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_full_queue_discards_the_backlog_and_closes_as_slow_consumer() {
        let metrics = Metrics::new();
        let outbox = Outbox::new();
        for _ in 0..4 {
            assert_eq!(
                outbox.push(frame::text(b"x"), Kind::Data, &LIMITS, &metrics),
                Push::Queued
            );
        }
        assert_eq!(
            outbox.push(frame::text(b"x"), Kind::Data, &LIMITS, &metrics),
            Push::Overflow
        );
        assert_eq!(outbox.close_reason(), Some(CloseReason::SlowConsumer));
        assert!(outbox.is_closing());
        // Only the close frame is left.
        assert_eq!(outbox.queued(), 1);
        assert!(
            metrics
                .render()
                .contains("wsgate_messages_dropped_total{reason=\"slow_consumer\"} 5")
        );
    }

    #[tokio::test]
    async fn the_byte_bound_applies_as_well_as_the_count() {
        let metrics = Metrics::new();
        let outbox = Outbox::new();
        let big = frame::binary(&[0u8; 600]);
        assert_eq!(
            outbox.push(big.clone(), Kind::Data, &LIMITS, &metrics),
            Push::Queued
        );
        assert_eq!(
            outbox.push(big, Kind::Data, &LIMITS, &metrics),
            Push::Overflow
        );
    }

    #[tokio::test]
    async fn control_frames_are_not_bounded_by_the_data_limits() {
        let metrics = Metrics::new();
        let outbox = Outbox::new();
        for _ in 0..10 {
            assert_eq!(
                outbox.push(frame::text(b"3"), Kind::Control, &LIMITS, &metrics),
                Push::Queued
            );
        }
    }

    #[tokio::test]
    async fn closing_resolves_for_waiters_registered_before_and_after() {
        let outbox = std::sync::Arc::new(Outbox::new());
        let waiter = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.closing().await }
        });
        tokio::task::yield_now().await;
        outbox.abort(CloseReason::IoError);
        waiter.await.unwrap();
        outbox.closing().await;
        assert_eq!(outbox.close_reason(), Some(CloseReason::IoError));
    }

    #[tokio::test]
    async fn an_idle_writer_stops_at_once_when_the_connection_is_aborted() {
        let metrics = Metrics::new();
        let outbox = std::sync::Arc::new(Outbox::new());
        let (_client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            let metrics = metrics.clone();
            async move { outbox.run_writer(server, &metrics).await }
        });
        tokio::task::yield_now().await;
        outbox.abort(CloseReason::Client);
        // Without a wake-up the writer would sleep forever here (the connection's close
        // timeout used to be what ended it).
        tokio::time::timeout(std::time::Duration::from_secs(10), writer)
            .await
            .expect("the writer did not stop")
            .unwrap();
    }

    #[tokio::test]
    async fn partial_writes_resume_mid_frame() {
        let metrics = Metrics::new();
        let outbox = Outbox::new();
        let limits = QueueLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
        };
        let payloads: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; 1000 + i]).collect();
        for p in &payloads {
            outbox.push(frame::binary(p), Kind::Data, &limits, &metrics);
        }
        outbox.close(1000, "", CloseReason::Client, false);
        // A tiny pipe forces many short writes.
        let (mut client, server) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        outbox.run_writer(server, &metrics).await;
        let got = reader.await.unwrap();
        let mut want: Vec<u8> = payloads
            .iter()
            .flat_map(|p| frame::binary(p).to_vec())
            .collect();
        want.extend_from_slice(&frame::close(1000, ""));
        assert_eq!(got, want);
    }
}

#[cfg(test)]
mod tcp_tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A connected pair on loopback: (the client's end, the server's end).
    async fn socket_pair() -> (TcpStream, Arc<TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, Arc::new(server))
    }

    #[tokio::test]
    async fn a_slow_consumer_close_finishes_a_partly_written_frame_before_the_close_frame() {
        // Found while testing the echo of examples/autobahn_echo.rs: the backlog discarded on
        // overflow included the rest of a frame already partly sent directly, so the close
        // frame landed inside that frame's payload and the client saw garbage, not 1008.
        let (mut client, socket) = socket_pair().await;
        let outbox = Outbox::with_socket(Some(socket.clone()));
        let metrics = Metrics::new();
        let limits = QueueLimits {
            max_messages: 100,
            max_bytes: (16 << 20) + 64,
        };
        // Far more than the socket buffers take: written in part, the rest queued.
        let big = frame::binary(&vec![1u8; 16 << 20]);
        assert_eq!(
            outbox.push(big.clone(), Kind::Data, &limits, &metrics),
            Push::Queued
        );
        assert_eq!(outbox.queued(), 1);
        assert_eq!(
            outbox.push(big.clone(), Kind::Data, &limits, &metrics),
            Push::Overflow
        );
        // The started frame is delivered, not counted as dropped; the new one is dropped.
        assert_eq!(
            metric_value(
                &metrics,
                "wsgate_messages_dropped_total{reason=\"slow_consumer\"}"
            ),
            1
        );
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        outbox.run_tcp_writer(socket, &metrics).await;
        let got = reader.await.unwrap();
        let mut want = big.to_vec();
        want.extend_from_slice(&frame::close(
            frame::close_code::POLICY_VIOLATION,
            "slow consumer: outbound queue full",
        ));
        assert!(got == want, "{} bytes, want {}", got.len(), want.len());
    }

    fn metric_value(metrics: &Metrics, series: &str) -> u64 {
        let scrape = metrics.render();
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_writes_arrive_complete_and_in_order() {
        let (mut client, socket) = socket_pair().await;
        let outbox = Arc::new(Outbox::with_socket(Some(socket.clone())));
        let metrics = Metrics::new();
        let limits = QueueLimits {
            max_messages: 10_000,
            max_bytes: 1 << 30,
        };
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            let metrics = metrics.clone();
            async move { outbox.run_tcp_writer(socket, &metrics).await }
        });
        // Far more than the socket buffers hold: some frames go out directly, some partly,
        // the rest wait for the writer.
        let frames: Vec<Bytes> = (0..300u32)
            .map(|i| frame::binary(&vec![(i % 251) as u8; 40_000 + i as usize]))
            .collect();
        let mut outcomes = std::collections::HashSet::new();
        for f in &frames {
            outcomes.insert(outbox.push(f.clone(), Kind::Data, &limits, &metrics));
        }
        outbox.close(1000, "done", CloseReason::Client, false);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        let mut want: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        want.extend_from_slice(&frame::close(1000, "done"));
        assert!(
            got == want,
            "stream differs ({} vs {} bytes)",
            got.len(),
            want.len()
        );
        assert!(
            outcomes.contains(&Push::Written) && outcomes.contains(&Push::Queued),
            "{outcomes:?}"
        );
        assert_eq!(metrics.delivered.get(), 300);
    }
}
