//! Ring stage: bounded single-producer single-consumer rings between a core and the
//! emitter, with async wakeups at both ends. This is the only module that holds atomics.
//!
//! The slots are a crossbeam bounded channel used only through `try_send`/`try_recv`,
//! which are lock-free for the array flavour; waking goes through one [`AtomicWaker`]
//! per end, so either side may be a glommio task, a tokio task or a plain thread. The
//! ends are not `Clone`: one producer, one consumer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

#[derive(Default)]
struct Wakers {
    /// The consumer, waiting for an item.
    consumer: AtomicWaker,
    /// The producer, waiting for room.
    producer: AtomicWaker,
    /// Set when the consumer is dropped, so a producer waiting for room gives up.
    consumer_gone: AtomicBool,
}

/// Creates a ring holding at most `capacity` items.
pub fn ring<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity > 0, "a ring needs at least one slot");
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let wakers = Arc::new(Wakers::default());
    (
        Producer {
            tx: Some(tx),
            wakers: wakers.clone(),
        },
        Consumer { rx, wakers },
    )
}

/// The sending end.
pub struct Producer<T> {
    // An Option so that Drop can disconnect before it wakes the consumer.
    tx: Option<Sender<T>>,
    wakers: Arc<Wakers>,
}

impl<T> Producer<T> {
    /// Pushes an item, or gives it back when the ring is full or the consumer is gone.
    #[inline]
    pub fn push(&self, item: T) -> Result<(), T> {
        let Some(tx) = &self.tx else { return Err(item) };
        match tx.try_send(item) {
            Ok(()) => {
                self.wakers.consumer.wake();
                Ok(())
            }
            Err(TrySendError::Full(item) | TrySendError::Disconnected(item)) => Err(item),
        }
    }

    /// Items waiting in the ring.
    pub fn len(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the consumer is gone, so pushes can never succeed.
    pub fn is_closed(&self) -> bool {
        self.wakers.consumer_gone.load(Ordering::Acquire)
    }

    /// Ready once there is room for an item, or the consumer is gone.
    pub fn poll_space(&self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(tx) = &self.tx else {
            return Poll::Pending;
        };
        if !tx.is_full() || self.is_closed() {
            return Poll::Ready(());
        }
        self.wakers.producer.register(cx.waker());
        // Re-check after registering, or a pop in between would go unnoticed.
        if tx.is_full() && !self.is_closed() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl<T> Drop for Producer<T> {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.wakers.consumer.wake();
    }
}

/// The receiving end.
pub struct Consumer<T> {
    rx: Receiver<T>,
    wakers: Arc<Wakers>,
}

impl<T> Consumer<T> {
    /// Pops an item if one is there.
    #[inline]
    pub fn try_pop(&self) -> Option<T> {
        let item = self.rx.try_recv().ok();
        if item.is_some() {
            self.wakers.producer.wake();
        }
        item
    }

    /// Ready with an item, or with `None` once the producer is gone and the ring is empty.
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        for attempt in 0..2 {
            match self.rx.try_recv() {
                Ok(item) => {
                    self.wakers.producer.wake();
                    return Poll::Ready(Some(item));
                }
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) if attempt == 0 => {
                    // Register, then look again so a push in between is not missed.
                    self.wakers.consumer.register(cx.waker());
                }
                Err(TryRecvError::Empty) => {}
            }
        }
        Poll::Pending
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        self.wakers.consumer_gone.store(true, Ordering::Release);
        self.wakers.producer.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[test]
    fn full_ring_gives_the_item_back() {
        let (p, c) = ring(2);
        assert!(p.push(1).is_ok());
        assert!(p.push(2).is_ok());
        assert_eq!(p.push(3), Err(3));
        assert_eq!(c.try_pop(), Some(1));
        assert!(p.push(3).is_ok());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn producer_sees_a_gone_consumer() {
        let (p, c) = ring(1);
        p.push(1).unwrap();
        assert!(!p.is_closed());
        drop(c);
        assert!(p.is_closed());
        assert_eq!(p.push(2), Err(2));
        futures_lite::future::block_on(poll_fn(|cx| p.poll_space(cx)));
    }

    #[test]
    fn consumer_sees_the_end_after_the_last_item() {
        let (p, c) = ring(4);
        p.push(7).unwrap();
        drop(p);
        futures_lite::future::block_on(async {
            assert_eq!(poll_fn(|cx| c.poll_pop(cx)).await, Some(7));
            assert_eq!(poll_fn(|cx| c.poll_pop(cx)).await, None);
        });
    }

    #[test]
    fn wakes_across_threads_in_order_without_loss() {
        const N: u64 = 200_000;
        let (p, c) = ring::<u64>(8);
        let producer = std::thread::spawn(move || {
            futures_lite::future::block_on(async {
                for i in 0..N {
                    let mut item = i;
                    loop {
                        match p.push(item) {
                            Ok(()) => break,
                            Err(back) => {
                                item = back;
                                poll_fn(|cx| p.poll_space(cx)).await;
                            }
                        }
                    }
                }
            })
        });
        let got = futures_lite::future::block_on(async {
            let mut next = 0;
            while let Some(v) = poll_fn(|cx| c.poll_pop(cx)).await {
                assert_eq!(v, next);
                next += 1;
            }
            next
        });
        producer.join().unwrap();
        assert_eq!(got, N);
    }
}
