//! The in-process broker: one instance, zero dependencies.

use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;

use super::{BoxFuture, Broker, BrokerError, Message, Sink};
use crate::history::{HistorySettings, MemoryHistory, Recovery, Since};
use crate::metrics::BrokerMetrics;
use crate::types::{Channel, Topic};

/// Delivers every publish straight to the local hub; history topics go through an in-process
/// ring first.
pub struct MemoryBroker {
    sink: Mutex<Option<Arc<dyn Sink>>>,
    metrics: BrokerMetrics,
    history: Option<MemoryHistory>,
}

impl MemoryBroker {
    /// A stopped memory broker reporting through `metrics`.
    pub fn new(metrics: BrokerMetrics) -> Self {
        Self {
            sink: Mutex::new(None),
            metrics,
            history: None,
        }
    }

    /// The same, keeping a history of the topics `settings` names.
    #[must_use]
    pub fn with_history(mut self, settings: Option<HistorySettings>) -> Self {
        self.history = settings.map(MemoryHistory::new);
        self
    }

    fn sink(&self) -> Option<Arc<dyn Sink>> {
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn start(&self, sink: Arc<dyn Sink>) -> BoxFuture<'_, Result<(), BrokerError>> {
        *self.sink.lock().unwrap_or_else(PoisonError::into_inner) = Some(sink);
        self.metrics.up.set(1);
        Box::pin(async { Ok(()) })
    }

    fn channel_added(&self, _channel: &Channel) {
        self.metrics.channels.inc();
    }

    fn channel_removed(&self, _channel: &Channel) {
        self.metrics.channels.dec();
    }

    fn confirmed(&self, _channel: &Channel) -> BoxFuture<'_, Result<(), BrokerError>> {
        let up = self.sink().is_some();
        Box::pin(async move {
            if up {
                Ok(())
            } else {
                Err(BrokerError::Stopped)
            }
        })
    }

    fn publish(
        &self,
        channel: &Channel,
        message: Message,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        let result = match self.sink() {
            Some(sink) => {
                match self
                    .history
                    .as_ref()
                    .and_then(|h| Some((h, h.settings().topic(channel)?)))
                {
                    Some((history, topic)) => {
                        history.append(topic, message, |m, p| {
                            sink.deliver(channel, m, Some(p));
                        });
                        self.metrics.history.bytes.set(history.bytes());
                    }
                    None => sink.deliver(channel, message, None),
                }
                Ok(())
            }
            None => Err(BrokerError::Stopped),
        };
        Box::pin(async move { result })
    }

    fn history(&self) -> Option<&HistorySettings> {
        self.history.as_ref().map(MemoryHistory::settings)
    }

    fn recover(&self, topic: &Topic, since: Option<&Since>) -> BoxFuture<'_, Recovery> {
        let recovery = match &self.history {
            Some(h) if h.settings().patterns.matches(topic.as_str()) => {
                Recovery::decide(since, h.snapshot(topic))
            }
            _ => Recovery::failed(crate::history::RecoveryFailure::NoHistory),
        };
        Box::pin(async move { recovery })
    }

    fn is_up(&self) -> bool {
        self.sink().is_some()
    }

    fn stats(&self) -> serde_json::Value {
        json!({ "type": "memory", "up": self.is_up(), "channels": self.metrics.channels.get() })
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.metrics.up.set(0);
        Box::pin(async {})
    }
}
