//! The in-process broker: one instance, zero dependencies.

use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;

use super::{BoxFuture, Broker, BrokerError, Message, Sink};
use crate::metrics::BrokerMetrics;
use crate::types::Channel;

/// Delivers every publish straight to the local hub.
pub struct MemoryBroker {
    sink: Mutex<Option<Arc<dyn Sink>>>,
    metrics: BrokerMetrics,
}

impl MemoryBroker {
    /// A stopped memory broker reporting through `metrics`.
    pub fn new(metrics: BrokerMetrics) -> Self {
        Self {
            sink: Mutex::new(None),
            metrics,
        }
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
                sink.deliver(channel, message);
                Ok(())
            }
            None => Err(BrokerError::Stopped),
        };
        Box::pin(async move { result })
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
