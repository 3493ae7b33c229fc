//! A tracing layer that feeds log records to control connections (NOTICE/WARN/INFO/... events).
//!
//! The binary adds [`layer`] to its subscriber; control connections [`subscribe`]. Records are
//! formatted only while someone listens. Severities map as: `error` → ERR, `warn` → WARN,
//! `info` → NOTICE (Allium's info is lifecycle and progress, Tor's notice), `debug` → INFO,
//! `trace` → DEBUG. The channel is bounded: a slow controller loses old records, never blocks
//! logging.

use std::fmt::Write as _;
use std::sync::OnceLock;

use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

use crate::session::LogRecord;

/// Records buffered per subscriber.
pub const FEED_CAPACITY: usize = 256;
/// Longest message passed on (longer ones are cut).
pub const MAX_MESSAGE: usize = 2048;

fn feed() -> &'static broadcast::Sender<LogRecord> {
    static FEED: OnceLock<broadcast::Sender<LogRecord>> = OnceLock::new();
    FEED.get_or_init(|| broadcast::channel(FEED_CAPACITY).0)
}

/// Receive log records from now on.
pub fn subscribe() -> broadcast::Receiver<LogRecord> {
    feed().subscribe()
}

/// The layer to add to the process's subscriber.
pub fn layer() -> LogLayer {
    LogLayer { _priv: () }
}

/// See [`layer`].
#[derive(Debug)]
pub struct LogLayer {
    _priv: (),
}

/// Tor's severity name for a tracing level.
pub fn severity(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "ERR",
        tracing::Level::WARN => "WARN",
        tracing::Level::INFO => "NOTICE",
        tracing::Level::DEBUG => "INFO",
        tracing::Level::TRACE => "DEBUG",
    }
}

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.0.len() > MAX_MESSAGE {
            return;
        }
        if field.name() == "message" {
            let mut m = format!("{value:?}");
            if !self.0.is_empty() {
                m.push(' ');
                m.push_str(&self.0);
            }
            self.0 = m;
        } else {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let tx = feed();
        if tx.receiver_count() == 0 {
            return;
        }
        let mut v = MessageVisitor(String::new());
        event.record(&mut v);
        let mut message = crate::reply::one_line(&v.0);
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let _ = tx.send(LogRecord {
            severity: severity(event.metadata().level()),
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn records_reach_subscribers() {
        let mut rx = subscribe();
        let sub = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(sub, || {
            tracing::info!(circuits = 3, "relay started\nsecond line");
            tracing::warn!("look here");
        });
        let a = rx.try_recv().unwrap();
        assert_eq!(a.severity, "NOTICE");
        assert_eq!(a.message, "relay started second line circuits=3");
        let b = rx.try_recv().unwrap();
        assert_eq!((b.severity, b.message.as_str()), ("WARN", "look here"));
    }
}
