//! Ack stage: which Forward chunks still wait on which batches, and the `{"ack": chunk}`
//! reply once every batch that carries a chunk's events is settled.
//!
//! A chunk opens with one hold for the frame being ingested; each batch that takes one of
//! its events adds a hold, and each settled batch releases one. When the last hold goes,
//! the reply is queued on the chunk's connection. Acks are pipelined: a connection may
//! have any number of chunks outstanding, and replies go out as they settle.

use std::rc::Rc;

use crate::conn::Link;

/// A chunk's place in the ledger, carried by every batch holding its events.
pub type Ticket = u32;

#[derive(Default)]
struct Slot {
    holds: u32,
    link: Option<Rc<Link>>,
    /// The client's chunk id; the Vec is reused by later chunks.
    chunk: Vec<u8>,
}

/// One core's outstanding chunks.
#[derive(Default)]
pub struct AckLedger {
    slots: Vec<Slot>,
    free: Vec<Ticket>,
}

impl AckLedger {
    /// Opens a chunk with the hold of the frame being ingested.
    pub fn open(&mut self, link: &Rc<Link>, chunk: &[u8]) -> Ticket {
        let t = match self.free.pop() {
            Some(t) => t,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as Ticket
            }
        };
        let slot = &mut self.slots[t as usize];
        slot.holds = 1;
        slot.link = Some(link.clone());
        slot.chunk.clear();
        slot.chunk.extend_from_slice(chunk);
        link.chunk_opened();
        t
    }

    /// A batch took some of the chunk's events.
    pub fn hold(&mut self, t: Ticket) {
        self.slots[t as usize].holds += 1;
    }

    /// A batch carrying the chunk settled, or the frame finished ingesting. Returns true
    /// when that was the last hold and the ack was queued (not for an abandoned chunk).
    pub fn release(&mut self, t: Ticket) -> bool {
        let slot = &mut self.slots[t as usize];
        slot.holds -= 1;
        if slot.holds > 0 {
            return false;
        }
        let link = slot.link.take();
        if let Some(link) = &link {
            link.ack(&slot.chunk);
        }
        self.free.push(t);
        link.is_some()
    }

    /// Gives up on a chunk whose events will not all be ingested (its connection went
    /// away mid-frame): no ack will be sent, so the client sends the chunk again.
    pub fn abandon(&mut self, t: Ticket) {
        if let Some(link) = self.slots[t as usize].link.take() {
            link.chunk_dropped();
        }
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

    #[test]
    fn acks_when_the_last_batch_settles() {
        let link = Rc::new(Link::default());
        let mut l = AckLedger::default();
        let t = l.open(&link, b"c1");
        l.hold(t); // batch A
        l.hold(t); // batch B (fan-out or a seal mid-frame)
        assert!(!l.release(t)); // frame done
        assert!(!l.release(t)); // A settled
        assert_eq!(link.outstanding(), 1);
        assert!(l.release(t)); // B settled
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
        let mut l = AckLedger::default();
        let t = l.open(&link, b"c");
        l.hold(t); // a batch took some of its events
        l.abandon(t); // the rest never will be
        assert_eq!(link.outstanding(), 0);
        assert!(!l.release(t), "the batch settles: no ack is queued");
        assert!(
            link.take_acks().is_empty(),
            "no ack for a chunk not fully ingested"
        );
        assert_eq!(l.outstanding(), 0);
        assert_eq!(l.open(&link, b"d"), t, "the slot is free again");
    }

    #[test]
    fn a_chunk_that_reached_no_batch_acks_at_once() {
        let link = Rc::new(Link::default());
        let mut l = AckLedger::default();
        let t = l.open(&link, b"x");
        assert!(l.release(t));
        assert!(!link.take_acks().is_empty());
        // The slot is reused.
        assert_eq!(l.open(&link, b"y"), t);
    }
}
