//! Batch stage: per-core, per-sink buffers that events are encoded straight into, sealed
//! at the sink's size limit or after its linger time, and pushed to the emitter's ring.
//!
//! When the ring is full the sealed batch is held here, the shard reports itself blocked,
//! and its connections stop reading until the emitter makes room (DESIGN.md invariant 5).
//! Settled batches come back through the completion ring and their buffers are reused, so
//! the steady state allocates nothing.

pub mod json;
pub mod shape;

use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::ack::Ticket;
use crate::ring::Producer;
use shape::Encoded;

/// Encoded events on their way to one sink.
#[derive(Debug, Default)]
pub struct Batch {
    /// The events, encoded back to back.
    pub data: Vec<u8>,
    pub events: u32,
    /// Ack tickets of the chunks with events in this batch.
    pub tickets: Vec<Ticket>,
    /// The core that built it, which gets it back once it is settled.
    pub core: usize,
}

impl Batch {
    fn new(core: usize, capacity: usize) -> Self {
        Batch {
            data: Vec::with_capacity(capacity),
            events: 0,
            tickets: Vec::new(),
            core,
        }
    }

    fn clear(&mut self) {
        self.data.clear();
        self.events = 0;
        self.tickets.clear();
    }
}

/// A sink's batching limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// A batch is sealed when it reaches this size; only a single event larger than this
    /// makes a batch exceed it.
    pub max_bytes: usize,
    /// A batch holding events is sealed at the latest this long after its first event.
    pub linger: Duration,
}

/// Room for one more event past `max_bytes` before a buffer reallocates.
const SLACK: usize = 64 << 10;

/// Buffers kept for reuse beyond those in flight.
const SPARES: usize = 2;

/// The outcome of [`Batcher::write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wrote {
    pub encoded: Encoded,
    /// The event's chunk ticket was attached to a batch that did not carry it yet: the
    /// ledger must count one more hold.
    pub new_hold: bool,
}

/// Builds one sink's batches on one core.
pub struct Batcher {
    core: usize,
    limits: BatchLimits,
    open: Batch,
    opened_at: Option<Instant>,
    /// Sealed, waiting for room in the ring.
    held: VecDeque<Batch>,
    spare: Vec<Batch>,
    ring: Producer<Batch>,
    /// Pushed to the ring and not yet returned.
    in_flight: usize,
}

impl Batcher {
    pub fn new(core: usize, limits: BatchLimits, ring: Producer<Batch>) -> Self {
        Batcher {
            core,
            limits,
            open: Batch::new(core, limits.max_bytes + SLACK),
            opened_at: None,
            held: VecDeque::new(),
            spare: Vec::new(),
            ring,
            in_flight: 0,
        }
    }

    /// Encodes one event into the open batch with `encode`, which may be called twice: if
    /// the event does not fit, the batch is sealed without it and it is encoded again into
    /// the next one (encoding twice is cheaper than copying, and keeps every event a single
    /// copy of its source).
    #[inline]
    pub fn write(
        &mut self,
        ticket: Option<Ticket>,
        mut encode: impl FnMut(&mut Vec<u8>) -> Encoded,
    ) -> Wrote {
        let mark = self.open.data.len();
        let encoded = encode(&mut self.open.data);
        if encoded != Encoded::Written {
            self.open.data.truncate(mark);
            return Wrote {
                encoded,
                new_hold: false,
            };
        }
        if self.open.data.len() > self.limits.max_bytes && mark > 0 {
            self.open.data.truncate(mark);
            self.seal();
            encode(&mut self.open.data);
        }
        if self.open.events == 0 {
            self.opened_at = Some(Instant::now());
        }
        self.open.events += 1;
        let new_hold = match ticket {
            Some(t) if self.open.tickets.last() != Some(&t) => {
                self.open.tickets.push(t);
                true
            }
            _ => false,
        };
        if self.open.data.len() >= self.limits.max_bytes {
            self.seal();
        }
        Wrote { encoded, new_hold }
    }

    /// Seals the open batch, if it holds anything, and tries to push it.
    pub fn seal(&mut self) {
        if self.open.events == 0 {
            return;
        }
        let fresh = self
            .spare
            .pop()
            .unwrap_or_else(|| Batch::new(self.core, self.limits.max_bytes + SLACK));
        let sealed = std::mem::replace(&mut self.open, fresh);
        self.opened_at = None;
        self.held.push_back(sealed);
        self.push_held();
    }

    /// Seals the open batch if it carries chunks waiting for their acks.
    pub fn seal_if_acks_wait(&mut self) {
        if !self.open.tickets.is_empty() {
            self.seal();
        }
    }

    /// Seals the open batch if it has lingered long enough.
    pub fn seal_if_due(&mut self, now: Instant) {
        if let Some(t) = self.opened_at {
            if now.duration_since(t) >= self.limits.linger {
                self.seal();
            }
        }
    }

    /// Pushes held batches while the ring has room; returns whether none are left.
    fn push_held(&mut self) -> bool {
        while let Some(b) = self.held.pop_front() {
            match self.ring.push(b) {
                Ok(()) => self.in_flight += 1,
                Err(b) => {
                    self.held.push_front(b);
                    return false;
                }
            }
        }
        true
    }

    /// Pushes held batches, registering for a wakeup if the ring is still full.
    pub fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.blocked() && self.ring.is_closed() {
            // The sink is gone (a panic aborts the process, so this is shutdown): nothing
            // will make room, and trying again would spin.
            return Poll::Pending;
        }
        loop {
            if self.push_held() {
                return Poll::Ready(());
            }
            if self.ring.poll_space(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Whether sealed batches wait for room, so the core must stop reading.
    #[inline]
    pub fn blocked(&self) -> bool {
        !self.held.is_empty()
    }

    /// Takes back a settled batch for reuse.
    pub fn recycle(&mut self, mut b: Batch) {
        self.in_flight -= 1;
        if self.spare.len() < SPARES && b.data.capacity() <= 2 * (self.limits.max_bytes + SLACK) {
            b.clear();
            self.spare.push(b);
        }
    }

    /// Batches not settled yet: open with events, held, or in flight.
    pub fn unsettled(&self) -> usize {
        usize::from(self.open.events > 0) + self.held.len() + self.in_flight
    }

    /// Nothing open, held or in flight.
    pub fn idle(&self) -> bool {
        self.open.events == 0 && self.held.is_empty() && self.in_flight == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::ring;

    fn put(b: &mut Batcher, bytes: &[u8], ticket: Option<Ticket>) -> Wrote {
        b.write(ticket, |out| {
            out.extend_from_slice(bytes);
            Encoded::Written
        })
    }

    #[test]
    fn seals_at_the_limit_without_splitting_an_event() {
        let (p, c) = ring(8);
        let limits = BatchLimits {
            max_bytes: 10,
            linger: Duration::from_secs(60),
        };
        let mut b = Batcher::new(0, limits, p);
        put(&mut b, b"aaaa\n", None);
        put(&mut b, b"bbbb\n", None); // exactly 10: sealed
        put(&mut b, b"cccc\n", None);
        put(&mut b, b"dddddd\n", None); // would make 12: moves to the next batch
        let first = c.try_pop().unwrap();
        assert_eq!(first.data, b"aaaa\nbbbb\n");
        let second = c.try_pop().unwrap();
        assert_eq!(second.data, b"cccc\n");
        assert!(c.try_pop().is_none());
        b.seal();
        assert_eq!(c.try_pop().unwrap().data, b"dddddd\n");
    }

    #[test]
    fn holds_sealed_batches_when_the_ring_is_full() {
        let (p, c) = ring(1);
        let limits = BatchLimits {
            max_bytes: 4,
            linger: Duration::from_secs(60),
        };
        let mut b = Batcher::new(0, limits, p);
        put(&mut b, b"1234", Some(7));
        assert!(!b.blocked());
        let w = put(&mut b, b"5678", Some(7));
        assert!(w.new_hold, "a new batch takes the ticket again");
        assert!(b.blocked());
        let first = c.try_pop().unwrap();
        assert_eq!(first.tickets, [7]);
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            Poll::Ready(cx.waker().clone())
        }));
        assert!(b.poll_push(&mut Context::from_waker(&waker)).is_ready());
        assert!(!b.blocked());
        b.recycle(first);
        assert_eq!(c.try_pop().unwrap().data, b"5678");
    }

    #[test]
    fn linger_seals_a_partial_batch() {
        let (p, c) = ring(2);
        let limits = BatchLimits {
            max_bytes: 1 << 20,
            linger: Duration::from_millis(0),
        };
        let mut b = Batcher::new(0, limits, p);
        put(&mut b, b"x\n", None);
        b.seal_if_due(Instant::now());
        assert_eq!(c.try_pop().unwrap().events, 1);
    }
}
