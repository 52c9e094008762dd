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

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    /// One per core, waiting for the budget to have room.
    waiting: Vec<AtomicWaker>,
}

impl Budget {
    pub fn new(limit: usize, cores: usize) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            waiting: (0..cores).map(|_| AtomicWaker::new()).collect(),
        })
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
