//! A circuit's inbound queue: what a link reader hands cells to without ever waiting.
//!
//! An unbounded tokio channel under an atomic item count capped at `cap`: the same bound as a
//! bounded channel, but one atomic add per item sent and one subtraction per batch received,
//! where tokio's bounded channel takes a semaphore lock for every item it releases. A full queue
//! is reported to the sender (the peer broke its windows, or the circuit is stalled), which then
//! drops that circuit alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// The sending end (the link reader's).
#[derive(Debug)]
pub struct InboxTx<T> {
    tx: mpsc::UnboundedSender<T>,
    queued: Arc<AtomicUsize>,
    cap: usize,
}

impl<T> Clone for InboxTx<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            queued: Arc::clone(&self.queued),
            cap: self.cap,
        }
    }
}

/// Why an item could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum InboxFull {
    /// `cap` items are queued already.
    Full,
    /// The receiver is gone.
    Closed,
}

impl<T> InboxTx<T> {
    /// Queue an item without waiting.
    pub fn try_send(&self, item: T) -> Result<(), InboxFull> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(InboxFull::Full);
        }
        self.tx.send(item).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            InboxFull::Closed
        })
    }

    /// Items queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// The receiving end (the circuit reactor's).
#[derive(Debug)]
pub struct InboxRx<T> {
    rx: mpsc::UnboundedReceiver<T>,
    queued: Arc<AtomicUsize>,
}

impl<T> InboxRx<T> {
    /// The next item, waiting for it; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let item = self.rx.recv().await;
        if item.is_some() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        item
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Result<T, mpsc::error::TryRecvError> {
        let item = self.rx.try_recv()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Ok(item)
    }

    /// Take up to `limit` items into `buf`, waiting for at least one; 0 once every sender is gone.
    pub async fn recv_many(&mut self, buf: &mut Vec<T>, limit: usize) -> usize {
        let n = self.rx.recv_many(buf, limit).await;
        self.queued.fetch_sub(n, Ordering::AcqRel);
        n
    }
}

/// A queue holding at most `cap` items (at least 1).
pub fn inbox<T>(cap: usize) -> (InboxTx<T>, InboxRx<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        InboxTx {
            tx,
            queued: Arc::clone(&queued),
            cap: cap.max(1),
        },
        InboxRx { rx, queued },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cap_holds_and_frees_as_items_are_taken() {
        let (tx, mut rx) = inbox::<u32>(3);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        assert_eq!(tx.try_send(9), Err(InboxFull::Full));
        assert_eq!(tx.queued(), 3);
        let mut buf = Vec::new();
        assert_eq!(rx.recv_many(&mut buf, 2).await, 2);
        assert_eq!(buf, vec![0, 1]);
        tx.try_send(3).unwrap();
        tx.try_send(4).unwrap();
        assert_eq!(tx.try_send(5), Err(InboxFull::Full));
        drop(rx);
        assert_eq!(tx.try_send(6), Err(InboxFull::Full));
        let (tx, rx) = inbox::<u32>(1);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(InboxFull::Closed));
        assert_eq!(tx.queued(), 0);
    }
}
