//! The broker seam: how messages travel between gateway instances.
//!
//! The local registry ([`crate::hub`]) owns connections and topic subscriptions. It tells the
//! broker when a channel gains its first local subscriber ([`Broker::channel_added`]) and loses
//! its last ([`Broker::channel_removed`]); these calls are made in registry order, while the
//! registry's shard lock is held, so they must only record intent and never block. The broker
//! hands every inbound message to a [`Sink`] (the hub), which fans it out locally.
//!
//! Every publish goes through [`Broker::publish`], including publishes addressed to this very
//! instance, so that a broker with history (stream offsets) has exactly one place to add them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::history::{HistorySettings, Position, Recovery, RecoveryFailure, Since};
use crate::types::{Channel, Topic};

pub mod memory;
pub mod redis;
pub mod wire;

/// A boxed, sendable future (brokers are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What travels on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message; always valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// Close the addressed connection (only meaningful on [`Channel::Socket`]).
    Disconnect,
}

impl Message {
    /// Payload length in bytes (0 for control messages).
    pub fn len(&self) -> usize {
        match self {
            Message::Text(b) | Message::Binary(b) => b.len(),
            Message::Disconnect => 0,
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Broker failures, as seen by publishers and join acknowledgements.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot take the request now (not connected, refused): nothing was sent.
    #[error("{0}")]
    Unavailable(String),
    /// The request was sent but not confirmed in time: the outcome is unknown.
    #[error("no confirmation within the timeout")]
    Timeout,
    /// The broker was stopped.
    #[error("broker stopped")]
    Stopped,
    /// The broker could not be configured or started.
    #[error("{0}")]
    Setup(String),
}

/// Receives messages arriving from the broker and delivers them to local connections.
pub trait Sink: Send + Sync + 'static {
    /// Delivers `message` to every local subscriber of `channel`. Messages of a history topic
    /// carry their `position`, and arrive in offset order, each once.
    fn deliver(&self, channel: &Channel, message: Message, position: Option<&Position>);
}

/// A message transport between gateway instances.
pub trait Broker: Send + Sync + 'static {
    /// A short name for logs and stats (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Starts the broker; inbound messages go to `sink` from then on. Idempotent.
    fn start(&self, sink: Arc<dyn Sink>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// `channel` gained its first local subscriber. Must not block.
    fn channel_added(&self, channel: &Channel);

    /// `channel` lost its last local subscriber. Must not block.
    fn channel_removed(&self, channel: &Channel);

    /// Resolves once messages published on `channel` anywhere reach this instance (the join
    /// barrier), or fails when the broker cannot confirm it.
    fn confirmed(&self, channel: &Channel) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Publishes `message` on `channel` cluster-wide. `Ok` means the broker accepted it.
    fn publish(
        &self,
        channel: &Channel,
        message: Message,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// The history settings, when some topics keep a history.
    fn history(&self) -> Option<&HistorySettings> {
        None
    }

    /// Reads `topic`'s history for a client positioned at `since` (see [`Recovery::decide`]).
    /// Call it once the topic's channel is [`confirmed`](Broker::confirmed): every message
    /// after what it returns then arrives live.
    fn recover(&self, topic: &Topic, since: Option<&Since>) -> BoxFuture<'_, Recovery> {
        let _ = (topic, since);
        Box::pin(async { Recovery::failed(RecoveryFailure::NoHistory) })
    }

    /// Publishes every item; each gets its own answer, in order. Items are handed to the
    /// broker in order, so messages to one topic keep their order.
    fn publish_batch(
        &self,
        items: Vec<(Channel, Message)>,
    ) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (channel, message) in items {
                out.push(self.publish(&channel, message).await);
            }
            out
        })
    }

    /// The tag this replica puts in the first 32 bits of its socket ids (see
    /// [`crate::types::SocketId::generate_tagged`]), when its broker routes direct messages
    /// by replica.
    fn socket_tag(&self) -> Option<u32> {
        None
    }

    /// Whether the broker is connected and able to deliver.
    fn is_up(&self) -> bool;

    /// Broker details for `/api/stats`.
    fn stats(&self) -> serde_json::Value;

    /// Stops the broker and releases its connections. Idempotent.
    fn stop(&self) -> BoxFuture<'_, ()>;
}
