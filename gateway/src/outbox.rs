//! A connection's bounded outbound queue and its single writer.
//!
//! Publishers push pre-encoded frames (shared [`Bytes`], never copied per recipient) under a
//! short per-connection lock. The writer task takes everything queued in one go and writes it
//! with vectored writes, so a burst costs one wake-up and few syscalls. A queue that would pass
//! its bound is a decision, not a silent drop: the backlog is discarded, a close frame is queued
//! and the connection is torn down with the reason recorded once.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::frame;
use crate::metrics::{CloseReason, DropReason, Metrics};

/// Most frames handed to one `writev` call.
const MAX_SLICES: usize = 16;
/// Queue capacity kept between bursts; larger buffers are released when the queue drains.
const KEEP_CAPACITY: usize = 16;

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
}

#[derive(Default)]
struct State {
    queue: VecDeque<Item>,
    bytes: usize,
    /// Set once the connection started closing; no more frames are accepted.
    closing: Option<CloseReason>,
}

/// The result of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued for the writer.
    Queued,
    /// The queue was full: the connection is now closing as a slow consumer.
    Overflow,
    /// The connection is already closing; the frame was dropped.
    Closed,
}

/// One connection's outbound side.
pub struct Outbox {
    state: Mutex<State>,
    wake_writer: Notify,
    closing: Notify,
    closing_flag: AtomicBool,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// An empty, open outbox.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            closing: Notify::new(),
            closing_flag: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame, enforcing `limits` for data frames.
    pub fn push(&self, frame: Bytes, kind: Kind, limits: &QueueLimits, metrics: &Metrics) -> Push {
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
            let discarded = st.queue.iter().filter(|i| i.kind == Kind::Data).count() as u64 + 1;
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
        let was_empty = st.queue.is_empty();
        st.bytes += frame.len();
        st.queue.push_back(Item { frame, kind });
        drop(st);
        if was_empty {
            self.wake_writer.notify_one();
        }
        Push::Queued
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
            drop(st);
            self.signal_closing();
        }
    }

    fn begin_close(&self, st: &mut State, close_frame: Bytes, why: CloseReason, discard: bool) {
        if discard {
            st.queue = VecDeque::new();
            st.bytes = 0;
        }
        st.closing = Some(why);
        st.queue.push_back(Item {
            frame: close_frame,
            kind: Kind::Close,
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
    pub async fn run_writer<W: AsyncWrite + Unpin>(&self, mut w: W, metrics: &Metrics) {
        let mut batch: VecDeque<Item> = VecDeque::new();
        loop {
            let took = {
                let mut st = self.lock();
                if st.queue.is_empty() {
                    false
                } else {
                    std::mem::swap(&mut st.queue, &mut batch);
                    st.bytes = 0;
                    true
                }
            };
            if !took {
                self.wake_writer.notified().await;
                continue;
            }
            match write_batch(&mut w, &mut batch).await {
                Ok((delivered, closed)) => {
                    metrics.delivered.inc_by(delivered);
                    if closed {
                        let _ = w.shutdown().await;
                        return;
                    }
                }
                Err(_) => {
                    self.abort(CloseReason::IoError);
                    return;
                }
            }
            if batch.capacity() > KEEP_CAPACITY {
                batch = VecDeque::new();
            }
        }
    }
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
            let mut count = 0;
            for item in batch.iter().take(MAX_SLICES) {
                slices[count] = IoSlice::new(&item.frame);
                count += 1;
                if item.kind == Kind::Close {
                    break;
                }
            }
            w.write_vectored(&slices[..count]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let Some(front) = batch.front_mut() else {
                break;
            };
            if left < front.frame.len() {
                front.frame.advance(left);
                break;
            }
            left -= front.frame.len();
            let kind = front.kind;
            batch.pop_front();
            match kind {
                Kind::Data => delivered += 1,
                Kind::Control => {}
                Kind::Close => {
                    batch.clear();
                    return Ok((delivered, true));
                }
            }
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
