//! Ack stage: which Forward chunks still wait on which batches, and the `{"ack": chunk}`
//! reply once every batch that carries a chunk's events is settled.
//!
//! A chunk opens with one hold for the frame being ingested; each batch that takes one of
//! its events adds a hold, and each settled batch releases one. When the last hold goes,
//! the reply is queued on the chunk's connection. Acks are pipelined: a connection may
//! have any number of chunks outstanding, and replies go out as they settle.
//!
//! With a write-ahead log a ticket also stands for a journal entry (a frame or a read of
//! JSON lines, with or without a chunk): when it settles the entry is released. A chunk
//! acked `durable` is acked when its entry's group commit ends, usually long before.

use std::rc::Rc;
use std::sync::Arc;

use crate::budget::Budget;
use crate::conn::Link;
use crate::wal::SegId;

/// A chunk's place in the ledger, carried by every batch holding its events.
pub type Ticket = u32;

#[derive(Default)]
struct Slot {
    holds: u32,
    /// The connection to ack, until the ack is queued.
    link: Option<Rc<Link>>,
    /// The client's chunk id; the Vec is reused by later chunks.
    chunk: Vec<u8>,
    /// The frame's bytes, charged to its connection's unacked bytes.
    bytes: usize,
    /// The journal entry's segment, if the input was journaled.
    seg: Option<SegId>,
    /// Told apart from every earlier and later chunk, for a durable ack.
    generation: u32,
    /// What this chunk is charged to the budget: its slot and its id's buffer.
    charged: usize,
}

/// What settling a ticket did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// An ack was queued.
    pub acked: bool,
    /// This journal entry is released.
    pub seg: Option<SegId>,
}

/// One core's outstanding chunks. Each waiting chunk is charged to the memory budget, so
/// a flood of tiny frames with long chunk ids stops being read like any other load,
/// instead of growing the ledger past the budget.
pub struct AckLedger {
    slots: Vec<Slot>,
    free: Vec<Ticket>,
    budget: Arc<Budget>,
    generation: u32,
}

/// A ledger with more slots than this is given back whole when it empties.
const KEEP_SLOTS: usize = 4096;

impl AckLedger {
    pub fn new(budget: Arc<Budget>) -> Self {
        AckLedger {
            slots: Vec::new(),
            free: Vec::new(),
            budget,
            generation: 0,
        }
    }

    /// Opens a ticket with the hold of the frame being ingested: for a chunk to ack on
    /// `link` (a frame of `bytes`), for a journal entry in `seg`, or both.
    pub fn open(
        &mut self,
        ack: Option<(&Rc<Link>, &[u8])>,
        bytes: usize,
        seg: Option<SegId>,
    ) -> Ticket {
        let t = match self.free.pop() {
            Some(t) => t,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as Ticket
            }
        };
        let slot = &mut self.slots[t as usize];
        slot.holds = 1;
        slot.seg = seg;
        self.generation = self.generation.wrapping_add(1);
        slot.generation = self.generation;
        slot.chunk.clear();
        slot.bytes = 0;
        if let Some((link, chunk)) = ack {
            slot.link = Some(link.clone());
            slot.chunk.extend_from_slice(chunk);
            slot.bytes = bytes;
            link.chunk_opened(bytes);
        }
        slot.charged = std::mem::size_of::<Slot>() + slot.chunk.capacity();
        self.budget.adjust(0, slot.charged);
        t
    }

    /// The generation of a ticket's current chunk, to name it in [`AckLedger::durable`].
    pub fn generation(&self, t: Ticket) -> u32 {
        self.slots[t as usize].generation
    }

    /// The chunk's journal entry is synced: ack it now, if it is still waiting. Returns
    /// whether an ack was queued.
    pub fn durable(&mut self, t: Ticket, generation: u32) -> bool {
        // The ledger may have been given back since: the ticket is then gone.
        let Some(slot) = self.slots.get_mut(t as usize) else {
            return false;
        };
        if slot.generation != generation {
            return false;
        }
        match slot.link.take() {
            Some(link) => {
                link.ack(&slot.chunk, slot.bytes);
                true
            }
            None => false,
        }
    }

    /// A batch took some of the chunk's events.
    pub fn hold(&mut self, t: Ticket) {
        self.slots[t as usize].holds += 1;
    }

    /// A batch carrying the ticket settled, or the frame finished ingesting. On the last
    /// hold, the chunk is acked if it is still waiting (not abandoned, not acked durable)
    /// and the journal entry is released.
    pub fn release(&mut self, t: Ticket) -> Settled {
        let slot = &mut self.slots[t as usize];
        slot.holds -= 1;
        if slot.holds > 0 {
            return Settled::default();
        }
        let link = slot.link.take();
        if let Some(link) = &link {
            link.ack(&slot.chunk, slot.bytes);
        }
        self.budget.adjust(std::mem::take(&mut slot.charged), 0);
        let settled = Settled {
            acked: link.is_some(),
            seg: slot.seg.take(),
        };
        self.free.push(t);
        if self.free.len() == self.slots.len() && self.slots.len() > KEEP_SLOTS {
            // Empty after a burst: give the burst's slots and chunk buffers back.
            self.slots = Vec::new();
            self.free = Vec::new();
        }
        settled
    }

    /// Gives up on a frame whose events will not all be ingested (its connection went
    /// away mid-frame): no ack will be sent, so the client sends the chunk again; and a
    /// journal entry stays live, so the next start replays it whole.
    pub fn abandon(&mut self, t: Ticket) {
        let slot = &mut self.slots[t as usize];
        if let Some(link) = slot.link.take() {
            link.chunk_dropped(slot.bytes);
        }
        slot.seg = None;
        self.release(t);
    }

    /// Chunks not yet acked.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// Encodes the reply `{"ack": chunk}`.
pub fn encode_ack(out: &mut Vec<u8>, chunk: &[u8]) {
    // fixmap{1}, fixstr "ack"
    out.extend_from_slice(&[0x81, 0xa3, b'a', b'c', b'k']);
    rmp::encode::write_str_len(out, chunk.len() as u32).expect("Vec writes cannot fail");
    out.extend_from_slice(chunk);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiting chunks are charged to the budget (a full budget stops the reading), the
    /// charge goes when they settle, and a burst's slots are given back once it is over.
    #[test]
    fn waiting_chunks_are_charged_to_the_budget() {
        let budget = Budget::new(64 << 20, 1);
        let mut l = AckLedger::new(budget.clone());
        let link = Rc::new(Link::default());
        let chunk = [b'c'; 100];
        let n = 3 * KEEP_SLOTS;
        let tickets: Vec<Ticket> = (0..n)
            .map(|_| l.open(Some((&link, &chunk)), 118, None))
            .collect();
        let per = budget.used() / n;
        assert!(
            per >= std::mem::size_of::<Slot>() + 100,
            "{per} bytes a chunk"
        );
        assert_eq!(budget.used(), n * per);
        for t in &tickets[1..] {
            l.release(*t);
        }
        assert_eq!(budget.used(), per);
        assert_eq!(l.slots.len(), n, "kept while a chunk waits");
        l.release(tickets[0]);
        assert_eq!(budget.used(), 0);
        assert_eq!((l.slots.capacity(), l.outstanding()), (0, 0));
        assert_eq!(
            link.pending_acks(),
            n * (chunk.len() + 7),
            "every chunk acked"
        );
    }

    #[test]
    fn acks_when_the_last_batch_settles() {
        let link = Rc::new(Link::default());
        let mut l = AckLedger::new(Budget::unlimited());
        let t = l.open(Some((&link, b"c1")), 10, None);
        l.hold(t); // batch A
        l.hold(t); // batch B (fan-out or a seal mid-frame)
        assert!(!l.release(t).acked); // frame done
        assert!(!l.release(t).acked); // A settled
        assert_eq!(link.outstanding(), 1);
        assert!(l.release(t).acked); // B settled
        assert_eq!(link.outstanding(), 0);
        let mut want = vec![];
        encode_ack(&mut want, b"c1");
        assert_eq!(link.take_acks(), want);
        // {"ack": "c1"} in msgpack
        assert_eq!(want, [0x81, 0xa3, b'a', b'c', b'k', 0xa2, b'c', b'1']);
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn an_abandoned_chunk_is_never_acked() {
        let link = Rc::new(Link::default());
        let mut l = AckLedger::new(Budget::unlimited());
        let t = l.open(Some((&link, b"c")), 10, None);
        l.hold(t); // a batch took some of its events
        l.abandon(t); // the rest never will be
        assert_eq!(link.outstanding(), 0);
        assert!(!l.release(t).acked, "the batch settles: no ack is queued");
        assert!(
            link.take_acks().is_empty(),
            "no ack for a chunk not fully ingested"
        );
        assert_eq!(l.outstanding(), 0);
        assert_eq!(
            l.open(Some((&link, b"d")), 10, None),
            t,
            "the slot is free again"
        );
    }

    #[test]
    fn a_chunk_that_reached_no_batch_acks_at_once() {
        let link = Rc::new(Link::default());
        let mut l = AckLedger::new(Budget::unlimited());
        let t = l.open(Some((&link, b"x")), 10, None);
        assert!(l.release(t).acked);
        assert!(!link.take_acks().is_empty());
        // The slot is reused.
        assert_eq!(l.open(Some((&link, b"y")), 10, None), t);
    }

    #[test]
    fn a_durable_chunk_acks_at_its_commit_and_releases_its_entry_at_delivery() {
        let link = Rc::new(Link::default());
        let mut l = AckLedger::new(Budget::unlimited());
        let t = l.open(Some((&link, b"c")), 100, Some(3));
        let g = l.generation(t);
        assert_eq!(link.unacked_bytes(), 100);
        l.hold(t); // a batch
        assert_eq!(l.release(t), Settled::default()); // frame done
        assert!(l.durable(t, g), "acked at the commit");
        assert_eq!(link.unacked_bytes(), 0);
        assert_eq!(link.outstanding(), 0);
        assert_eq!(
            l.release(t),
            Settled {
                acked: false,
                seg: Some(3)
            },
            "delivered: the entry goes, with no second ack"
        );
        // A commit that ends after delivery, and after the slot was reused, acks nothing.
        let t2 = l.open(Some((&link, b"d")), 1, None);
        assert_eq!(t2, t);
        assert!(!l.durable(t, g));
        assert!(l.release(t2).acked);
    }

    #[test]
    fn an_abandoned_entry_stays_in_the_journal() {
        let link = Rc::new(Link::default());
        let mut l = AckLedger::new(Budget::unlimited());
        let t = l.open(Some((&link, b"c")), 1, Some(1));
        l.hold(t);
        l.abandon(t);
        assert_eq!(
            l.release(t),
            Settled::default(),
            "replayed at the next start"
        );
    }
}
