//! The memory budget: one `engine.memory_limit` that every buffer the data path uses is
//! charged to, by capacity. Cores charge their batches (open, held, in rings and on their
//! way); the emitter charges each request in flight: its body, its kept answer and parse
//! buffers, and a fixed share for its connection. While it is spent, cores seal what they
//! hold and stop reading (TCP then holds the senders back), and the emitter starts no
//! request while another is on its way. Each side may go past the limit by what one event
//! or one request needs, so that something always moves.
//!
//! Settled buffers go back to pools uncharged: a pool never holds more buffers than were in
//! use at once, and freeing them under pressure only had the allocator keep the pieces.
//!
//! What peers make the engine hold (connection read buffers with their unfinished frames
//! and lines, and inflated frames) is charged too, but may take at most [`PEER_SHARE`] of
//! the limit and never goes past it: the batches always keep the rest, so a crowd of
//! half-sent frames cannot stop the good traffic on other connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// The share of the limit (one part in this many) that peers' buffers may hold.
pub const PEER_SHARE: usize = 2;

pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    /// One per core, waiting for the budget to have room.
    waiting: Vec<AtomicWaker>,
    /// Held for peers (also counted in `used`), and its bound.
    peers: AtomicUsize,
    peer_limit: usize,
    /// Bumped whenever peers' memory is given back, so that waiters wake on a release.
    released: AtomicUsize,
    /// One per core, waiting for peers' memory to be given back.
    peer_waiting: Vec<AtomicWaker>,
}

impl Budget {
    pub fn new(limit: usize, cores: usize) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            waiting: (0..cores).map(|_| AtomicWaker::new()).collect(),
            peers: AtomicUsize::new(0),
            peer_limit: limit / PEER_SHARE,
            released: AtomicUsize::new(0),
            peer_waiting: (0..cores).map(|_| AtomicWaker::new()).collect(),
        })
    }

    /// Holds `n` more bytes for peers if that stays within their share.
    pub fn try_hold(&self, n: usize) -> bool {
        let mut cur = self.peers.load(Ordering::Relaxed);
        loop {
            if cur.checked_add(n).is_none_or(|t| t > self.peer_limit) {
                return false;
            }
            match self.peers.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.adjust(0, n);
        true
    }

    /// Holds `n` more bytes for peers, room or not (for what was bounded by the room
    /// already).
    pub fn hold(&self, n: usize) {
        if n > 0 {
            self.peers.fetch_add(n, Ordering::Relaxed);
            self.adjust(0, n);
        }
    }

    /// Gives back `n` bytes held for peers, waking the cores that wait for some.
    pub fn unhold(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.peers.fetch_sub(n, Ordering::AcqRel);
        self.adjust(n, 0);
        self.released.fetch_add(1, Ordering::AcqRel);
        for w in &self.peer_waiting {
            w.wake();
        }
    }

    /// Bytes peers may still be given.
    pub fn peer_room(&self) -> usize {
        self.peer_limit
            .saturating_sub(self.peers.load(Ordering::Relaxed))
    }

    pub fn peers_held(&self) -> usize {
        self.peers.load(Ordering::Relaxed)
    }

    /// How many times peers' memory was given back; see [`Budget::poll_released`].
    pub fn releases(&self) -> usize {
        self.released.load(Ordering::Acquire)
    }

    /// Ready once peers' memory was given back since [`Budget::releases`] said `seen`.
    pub fn poll_released(&self, core: usize, seen: usize, cx: &mut Context<'_>) -> Poll<()> {
        let Some(w) = self.peer_waiting.get(core) else {
            return Poll::Ready(());
        };
        if self.releases() != seen {
            return Poll::Ready(());
        }
        w.register(cx.waker());
        if self.releases() != seen {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// A budget that is never spent, for benches and tests of other stages.
    pub fn unlimited() -> Arc<Self> {
        Budget::new(usize::MAX, 0)
    }

    /// Moves a charge from `from` bytes to `to`, waking the cores if that made room.
    #[inline]
    pub fn adjust(&self, from: usize, to: usize) {
        if to > from {
            let now = self.used.fetch_add(to - from, Ordering::Relaxed) + (to - from);
            self.peak.fetch_max(now, Ordering::Relaxed);
        } else if from > to {
            let before = self.used.fetch_sub(from - to, Ordering::AcqRel);
            if before >= self.limit && before - (from - to) < self.limit {
                for w in &self.waiting {
                    w.wake();
                }
            }
        }
    }

    #[inline]
    pub fn spent(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most it was ever charged.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Ready once the budget has room; otherwise `core`'s waker is woken when it does.
    pub fn poll_room(&self, core: usize, cx: &mut Context<'_>) -> Poll<()> {
        if !self.spent() {
            return Poll::Ready(());
        }
        let Some(w) = self.waiting.get(core) else {
            return Poll::Ready(());
        };
        w.register(cx.waker());
        // Re-check after registering, or a release in between would go unnoticed.
        if self.spent() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::task::{Wake, Waker};

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_spent_budget_wakes_its_cores_when_room_is_made() {
        let b = Budget::new(100, 2);
        b.adjust(0, 60);
        assert!(!b.spent());
        b.adjust(60, 120);
        assert!(b.spent());
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        assert!(
            b.poll_room(1, &mut Context::from_waker(&waker))
                .is_pending()
        );
        b.adjust(10, 5);
        assert!(b.spent() && !flag.0.load(Ordering::SeqCst), "still spent");
        b.adjust(30, 0);
        assert!(!b.spent());
        assert!(flag.0.load(Ordering::SeqCst), "woken");
        assert_eq!(b.used(), 85);
        assert!(b.poll_room(1, &mut Context::from_waker(&waker)).is_ready());
    }
}
