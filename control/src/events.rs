//! Events a node pushes as they happen (CIRC and STREAM), as opposed to the ones a session
//! finds by comparing snapshots once a second (BW, ORCONN, STATUS_CLIENT).
//!
//! The node publishes each change once on its [`EventBus`]; every control connection holds a
//! receiver and writes the events its controller subscribed to. The bus is bounded
//! ([`BUS_CAPACITY`]): a connection that falls that far behind loses the oldest events (it is
//! told nothing; Tor drops events for slow controllers too) instead of the node queueing without
//! bound. With no controller connected, publishing costs a formatted line and nothing is kept.

use std::sync::Arc;

use tokio::sync::broadcast;

/// Events buffered per connection before the oldest are dropped.
pub const BUS_CAPACITY: usize = 1024;

/// One event, without the `650 ` prefix: `kind` is its SETEVENTS name (`CIRC`, `STREAM`), `body`
/// the whole line after `650 ` (starting with the kind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The event's SETEVENTS name.
    pub kind: &'static str,
    /// The line after `650 `.
    pub body: String,
}

/// Where a node publishes its events.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus with no subscriber.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BUS_CAPACITY);
        Self { tx }
    }

    /// Whether any control connection listens (skip formatting events when not).
    pub fn has_listeners(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publish `body` (which starts with `kind`) to every connection.
    pub fn publish(&self, kind: &'static str, body: String) {
        // No receiver is not an error: nobody listens.
        let _ = self.tx.send(Arc::new(Event { kind, body }));
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn publish_reaches_subscribers_and_is_bounded() {
        let bus = EventBus::new();
        assert!(!bus.has_listeners());
        bus.publish("CIRC", "CIRC 1 LAUNCHED".into());
        let mut rx = bus.subscribe();
        assert!(bus.has_listeners());
        bus.publish("CIRC", "CIRC 2 LAUNCHED".into());
        assert_eq!(rx.try_recv().unwrap().body, "CIRC 2 LAUNCHED");
        for i in 0..BUS_CAPACITY + 5 {
            bus.publish("STREAM", format!("STREAM {i} NEW 0 a:1"));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(5))
        ));
        assert_eq!(rx.try_recv().unwrap().body, "STREAM 5 NEW 0 a:1");
    }
}
