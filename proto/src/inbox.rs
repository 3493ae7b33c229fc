//! A circuit's inbound queue: what a link reader hands cells to without ever waiting.
//!
//! An unbounded tokio channel under an atomic item count capped at `cap`: the same bound as a
//! bounded channel, but one atomic add per item sent and one subtraction per batch received,
//! where tokio's bounded channel takes a semaphore lock for every item it releases. A full queue
//! is reported to the sender (the peer broke its windows, or the circuit is stalled), which then
//! drops that circuit alone.
//!
//! A queue made by [`inbox_accounted`] also adds its items' size to a [`QueueAccount`] shared by
//! every queue of the process (one more atomic add per item, one subtraction per batch), and
//! stamps the coarse time at which it last went from empty to non-empty: what an out-of-memory
//! handler needs to find the circuits holding the oldest queued data ([`InboxProbe`]). Items
//! still queued when the receiver is dropped are taken out of the account then.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// The total size of what is queued in every accounted queue, and the coarse clock they stamp
/// with (advanced by its owner, e.g. every 100 ms; a queue never reads the system clock).
#[derive(Debug, Default)]
pub struct QueueAccount {
    /// Bytes queued now.
    pub bytes: AtomicU64,
    /// The coarse clock, in milliseconds from any origin.
    pub clock_ms: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    queued: AtomicUsize,
    /// `account.clock_ms` when the queue last went from empty to non-empty.
    since: AtomicU64,
    account: Option<(Arc<QueueAccount>, u64)>,
}

impl Shared {
    fn taken(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.queued.fetch_sub(n, Ordering::AcqRel);
        if let Some((a, unit)) = &self.account {
            a.bytes
                .fetch_sub(unit.saturating_mul(n as u64), Ordering::Relaxed);
        }
    }
}

/// The sending end (the link reader's).
#[derive(Debug)]
pub struct InboxTx<T> {
    tx: mpsc::UnboundedSender<T>,
    shared: Arc<Shared>,
    cap: usize,
}

impl<T> Clone for InboxTx<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
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
        let s = &*self.shared;
        let before = s.queued.fetch_add(1, Ordering::AcqRel);
        if before >= self.cap {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(InboxFull::Full);
        }
        if let Some((a, unit)) = &s.account {
            a.bytes.fetch_add(*unit, Ordering::Relaxed);
            if before == 0 {
                s.since
                    .store(a.clock_ms.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        self.tx.send(item).map_err(|_| {
            s.taken(1);
            InboxFull::Closed
        })
    }

    /// Items queued now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// A read-only view of the queue's size and age (for an out-of-memory handler).
    pub fn probe(&self) -> InboxProbe {
        InboxProbe(Arc::clone(&self.shared))
    }
}

/// A read-only view of one queue: what it holds and since when.
#[derive(Debug, Clone)]
pub struct InboxProbe(Arc<Shared>);

impl InboxProbe {
    /// Bytes queued now (items times the unit; 0 for a queue without an account).
    pub fn queued_bytes(&self) -> u64 {
        let n = self.0.queued.load(Ordering::Acquire) as u64;
        self.0
            .account
            .as_ref()
            .map_or(0, |(_, u)| n.saturating_mul(*u))
    }

    /// The account's clock when the queue last went from empty to non-empty (meaningful while
    /// it holds something): the age of its oldest item, at most.
    pub fn nonempty_since(&self) -> u64 {
        self.0.since.load(Ordering::Relaxed)
    }
}

/// The receiving end (the circuit reactor's).
#[derive(Debug)]
pub struct InboxRx<T> {
    rx: mpsc::UnboundedReceiver<T>,
    shared: Arc<Shared>,
}

impl<T> InboxRx<T> {
    /// The next item, waiting for it; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let item = self.rx.recv().await;
        if item.is_some() {
            self.shared.taken(1);
        }
        item
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Result<T, mpsc::error::TryRecvError> {
        let item = self.rx.try_recv()?;
        self.shared.taken(1);
        Ok(item)
    }

    /// Take up to `limit` items into `buf`, waiting for at least one; 0 once every sender is gone.
    pub async fn recv_many(&mut self, buf: &mut Vec<T>, limit: usize) -> usize {
        let n = self.rx.recv_many(buf, limit).await;
        self.shared.taken(n);
        n
    }
}

impl<T> Drop for InboxRx<T> {
    fn drop(&mut self) {
        // No sender succeeds after `close`; what is left is counted out as it is dropped.
        self.rx.close();
        while self.rx.try_recv().is_ok() {
            self.shared.taken(1);
        }
    }
}

/// A queue holding at most `cap` items (at least 1).
pub fn inbox<T>(cap: usize) -> (InboxTx<T>, InboxRx<T>) {
    make(cap, None)
}

/// As [`inbox`], with every queued item counted as `unit` bytes in `account`.
pub fn inbox_accounted<T>(
    cap: usize,
    account: Arc<QueueAccount>,
    unit: u64,
) -> (InboxTx<T>, InboxRx<T>) {
    make(cap, Some((account, unit)))
}

fn make<T>(cap: usize, account: Option<(Arc<QueueAccount>, u64)>) -> (InboxTx<T>, InboxRx<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        since: AtomicU64::new(0),
        account,
    });
    (
        InboxTx {
            tx,
            shared: Arc::clone(&shared),
            cap: cap.max(1),
        },
        InboxRx { rx, shared },
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
        // What was left is drained on drop: the sender sees the receiver gone.
        assert_eq!(tx.try_send(6), Err(InboxFull::Closed));
        let (tx, rx) = inbox::<u32>(1);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(InboxFull::Closed));
        assert_eq!(tx.queued(), 0);
    }

    #[tokio::test]
    async fn the_account_follows_sends_receives_and_drops() {
        let acct = Arc::new(QueueAccount::default());
        acct.clock_ms.store(500, Ordering::Relaxed);
        let (tx, mut rx) = inbox_accounted::<u32>(10, Arc::clone(&acct), 100);
        let probe = tx.probe();
        for i in 0..4 {
            tx.try_send(i).unwrap();
        }
        assert_eq!(acct.bytes.load(Ordering::Relaxed), 400);
        assert_eq!(probe.queued_bytes(), 400);
        assert_eq!(probe.nonempty_since(), 500);
        acct.clock_ms.store(900, Ordering::Relaxed);
        let mut buf = Vec::new();
        rx.recv_many(&mut buf, 4).await;
        assert_eq!(acct.bytes.load(Ordering::Relaxed), 0);
        // Empty again: the next item restamps.
        tx.try_send(7).unwrap();
        tx.try_send(8).unwrap();
        assert_eq!(probe.nonempty_since(), 900);
        // Dropping the receiver takes the rest out of the account; later sends fail cleanly.
        drop(rx);
        assert_eq!(acct.bytes.load(Ordering::Relaxed), 0);
        assert_eq!(tx.try_send(9), Err(InboxFull::Closed));
        assert_eq!(acct.bytes.load(Ordering::Relaxed), 0);
        assert_eq!(tx.queued(), 0);
    }
}
