//! Connection state between reads: the read buffer, the decoder's place in it, and the
//! [`Link`] through which the shard wakes a connection and hands it acks. The I/O loops
//! (`accept::serve`) own the sockets; everything here is plain code over bytes, so the same
//! logic serves every I/O backend and the tests.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

use crate::ack::Ticket;
use crate::budget::Budget;
use crate::config::{Config, InputKind};
use crate::decode::forward::{Decoded, Decoder, Event, Scratch};
use crate::decode::http::{Ingest, Payload, msgpack_records};
use crate::decode::jsonl::{Framed, JsonParser, Lines, field_str};
use crate::decode::{Codec, DecodeError, EventTime};
use crate::limits::{JSON_PADDING, READ_CHUNK};
use crate::shard::{Ingested, Shard};
use crate::wal::entry::{self, Scanned};
use crate::wal::{Kind, SegId};

/// Where one input's connection buffers on a core come from: the peers' share of the
/// memory budget, and a few base buffers kept between reads, so that an idle connection
/// holds no buffer at all.
#[derive(Clone)]
pub struct Mem {
    pub budget: Arc<Budget>,
    pool: Rc<RefCell<Vec<Vec<u8>>>>,
}

/// Base buffers a [`Mem`] keeps for the next reads (uncharged while kept).
const POOLED: usize = 16;

impl Mem {
    pub fn new(budget: Arc<Budget>) -> Self {
        Mem {
            budget,
            pool: Rc::default(),
        }
    }

    /// For tests and tools: never runs out.
    pub fn unlimited() -> Self {
        Mem::new(Budget::unlimited())
    }
}

/// A growable read buffer: unread bytes live in `buf[start..end]`, and `pad` bytes past
/// the usable capacity are always readable (simd-json parses in place and needs them).
/// Its bytes are charged to the peers' share of the budget; it has none while empty and
/// idle, and grows only while the share has room.
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes consumed in all.
    taken: u64,
    pad: usize,
    initial: usize,
    max: usize,
    mem: Mem,
}

impl ReadBuf {
    pub fn new(initial: usize, max: usize, pad: usize, mem: Mem) -> Self {
        ReadBuf {
            buf: Vec::new(),
            start: 0,
            end: 0,
            taken: 0,
            pad,
            initial,
            max: max.max(initial),
            mem,
        }
    }

    /// Bytes this buffer holds (and is charged for).
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    fn cap(&self) -> usize {
        self.buf.len().saturating_sub(self.pad)
    }

    /// Grows the usable capacity to `cap`, if the budget has room.
    fn grow(&mut self, cap: usize) -> bool {
        let len = cap + self.pad;
        let more = len.saturating_sub(self.buf.len());
        if more == 0 || !self.mem.budget.try_hold(more) {
            return more == 0;
        }
        if self.buf.is_empty() && len == self.initial + self.pad {
            self.buf = self
                .mem
                .pool
                .borrow_mut()
                .pop()
                .unwrap_or_else(|| vec![0; len]);
            return true;
        }
        // Exact, so that the allocation is what is charged.
        self.buf.reserve_exact(more);
        self.buf.resize(len, 0);
        true
    }

    /// Gives the buffer back: a base one to the pool, a grown one to the allocator.
    fn release(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.start = 0;
        self.end = 0;
        self.mem.budget.unhold(buf.len());
        if buf.len() == self.initial + self.pad {
            let mut pool = self.mem.pool.borrow_mut();
            if pool.len() < POOLED {
                pool.push(buf);
            }
        }
    }

    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The unread bytes followed by at least `pad` more.
    #[inline]
    pub fn data_padded(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }

    /// Bytes consumed in all, to tell a new unfinished frame from the same one.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.taken += n as u64;
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Space for the next read, at least `want` bytes where the limit allows: unread bytes
    /// move to the front, and the buffer grows up to its maximum. Empty when it needs to
    /// grow and the peers' share of the budget has no room.
    pub fn spare(&mut self, want: usize) -> &mut [u8] {
        let cap = self.cap();
        if cap - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if cap - self.end < want && cap < self.max {
            let least = (self.end + want).max(self.initial).min(self.max);
            let new_cap = least.max(cap * 2).min(self.max);
            if !self.grow(new_cap) {
                self.grow(least);
            }
        }
        let cap = self.cap();
        &mut self.buf[self.end..cap]
    }

    #[inline]
    pub fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Gives the buffer back once it is empty.
    pub fn shrink(&mut self) {
        if self.start == self.end && !self.buf.is_empty() {
            self.release();
        }
    }

    /// Drops what is unread and gives the buffer back.
    pub fn discard(&mut self) {
        self.release();
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        self.release();
    }
}

/// What the shard shares with one connection task.
#[derive(Default)]
pub struct Link {
    /// Encoded `{"ack": chunk}` replies waiting to be written.
    acks: RefCell<Vec<u8>>,
    /// Chunks received and not yet acked, and their bytes.
    outstanding: Cell<u32>,
    unacked: Cell<usize>,
    waker: Cell<Option<Waker>>,
    /// Waiting in the shard's list of connections to wake when it unblocks.
    pub(crate) parked: Cell<bool>,
    /// The peer, for log lines.
    pub peer: Cell<Option<SocketAddr>>,
    /// The input (its index in the config) the connection came in on, for its counters.
    pub input: Cell<usize>,
    /// Bytes its buffers hold, for choosing whom to close when peers' memory is spent.
    pub held: Cell<usize>,
    /// Waiting in the shard's list of connections to wake when peers' memory is given back.
    pub(crate) memory_wait: Cell<bool>,
    /// Chosen to be closed: for its memory, its silence, its slowness, or its place.
    pub(crate) evicted: Cell<bool>,
    /// Waiting for the peer's bytes (not held back by the core): the time it waits counts.
    pub reading: Cell<bool>,
    /// When bytes last came (or the core last let it read again).
    pub heard: Cell<Option<std::time::Instant>>,
    /// When the unfinished frame or line in its buffer began, if there is one.
    pub started: Cell<Option<std::time::Instant>>,
}

impl Link {
    pub fn chunk_opened(&self, bytes: usize) {
        self.outstanding.set(self.outstanding.get() + 1);
        self.unacked.set(self.unacked.get() + bytes);
    }

    /// Queues the ack of a chunk and wakes the connection to write it.
    pub fn ack(&self, chunk: &[u8], bytes: usize) {
        crate::ack::encode_ack(&mut self.acks.borrow_mut(), chunk);
        self.chunk_dropped(bytes);
    }

    /// A chunk that will not be acked after all.
    pub fn chunk_dropped(&self, bytes: usize) {
        self.outstanding.set(self.outstanding.get() - 1);
        self.unacked.set(self.unacked.get() - bytes);
        self.wake();
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.get()
    }

    /// Bytes of the chunks not yet acked.
    pub fn unacked_bytes(&self) -> usize {
        self.unacked.get()
    }

    /// Ack bytes waiting to be written.
    pub fn pending_acks(&self) -> usize {
        self.acks.borrow().len()
    }

    pub fn has_acks(&self) -> bool {
        !self.acks.borrow().is_empty()
    }

    /// Runs `write` over the pending ack bytes and drops the bytes it reports written.
    pub fn write_acks<E>(&self, write: impl FnOnce(&[u8]) -> Result<usize, E>) -> Result<usize, E> {
        let mut acks = self.acks.borrow_mut();
        let n = write(&acks)?;
        acks.drain(..n);
        Ok(n)
    }

    /// Takes all pending ack bytes.
    pub fn take_acks(&self) -> Vec<u8> {
        std::mem::take(&mut self.acks.borrow_mut())
    }

    /// The task to wake; set on every poll of the connection.
    pub fn set_waker(&self, w: &Waker) {
        self.waker.set(Some(w.clone()));
    }

    pub fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Why a connection's processing stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Everything buffered is consumed; read more.
    Read,
    /// The core's batches are held: wait for the shard to unblock before going on.
    Blocked,
    /// Processed a turn's worth; yield to other tasks, then go on.
    Yield,
    /// Finished a frame that kept the core's other connections waiting: let them go
    /// first, then go on.
    Turn,
    /// Peers' share of the memory budget has no room for what the next frame needs: wait
    /// until some is given back.
    Memory,
    /// The input is broken: close the connection.
    Close(DecodeError),
}

/// A connection's protocol side, as the I/O loops drive it.
pub trait Conn {
    /// The connection's read buffer.
    fn buf(&self) -> &ReadBuf;
    fn buf_mut(&mut self) -> &mut ReadBuf;
    /// Where the next read goes.
    fn read_buf(&mut self) -> &mut [u8];
    /// `n` bytes were read into [`Conn::read_buf`].
    fn filled(&mut self, n: usize) {
        self.buf_mut().filled(n);
    }
    /// Decodes buffered input and hands its events to the shard.
    fn process(&mut self, shard: &mut Shard) -> Progress;
    /// The peer closed its side: deal with whatever is left.
    fn finish(&mut self, shard: &mut Shard);
    /// Nothing to read for now: give the buffer back if it is empty.
    fn idle(&mut self) {
        self.buf_mut().shrink();
    }
    /// Bytes its buffers hold.
    fn held(&self) -> usize {
        self.buf().held()
    }
    /// Unread bytes (an unfinished frame or line), and bytes consumed in all.
    fn unread(&self) -> (usize, u64) {
        (self.buf().data().len(), self.buf().taken())
    }
    /// Closing: drop unread input and give its memory back.
    fn discard(&mut self) {
        self.buf_mut().discard();
    }
    /// The connection is going away with input still unprocessed (shutdown, or a failed
    /// write): let go of anything held for it.
    fn abandon(&mut self, shard: &mut Shard);
    fn link(&self) -> &Rc<Link>;
    /// Whether more may be read now: not while the peer has too much unacked.
    fn may_read(&self) -> bool {
        true
    }
}

/// Bytes processed per turn before a connection yields.
const TURN: usize = 1 << 20;

/// One input's buffers on a core for validating and inflating frames, one frame at a
/// time, and the charge of the inflate buffer to the peers' share of the budget.
pub struct FrameScratch {
    scratch: Scratch,
    charged: usize,
    budget: Arc<Budget>,
}

/// Inflate buffers up to this size are kept for the next frame.
const KEEP_INFLATED: usize = 1 << 20;

impl FrameScratch {
    pub fn new(budget: Arc<Budget>) -> Self {
        FrameScratch {
            scratch: Scratch::default(),
            charged: 0,
            budget,
        }
    }

    /// What inflation may take: what the peers' share has room for, up to `max`.
    fn limit(&self, max: usize) -> usize {
        max.min(self.budget.peer_room() + self.charged)
    }

    /// Brings the charge up (or down) to what the inflate buffer holds. Inflation was
    /// bounded by the room the share had, so this stays within it.
    fn charge(&mut self) {
        let cap = self.scratch.inflated_capacity();
        if cap > self.charged {
            self.budget.hold(cap - self.charged);
        } else {
            self.budget.unhold(self.charged - cap);
        }
        self.charged = cap;
    }

    /// After a frame: gives a large inflate buffer back.
    fn trim(&mut self, keep: usize) {
        self.scratch.trim(keep);
        self.charge();
    }
}

impl Drop for FrameScratch {
    fn drop(&mut self) {
        self.budget.unhold(self.charged);
    }
}

/// What one Forward connection may make the core take.
#[derive(Clone, Copy, Debug)]
pub struct ForwardLimits {
    pub max_frame: usize,
    pub max_inflated: usize,
    /// Bytes of unacked chunks at which the connection stops being read.
    pub max_unacked: usize,
    /// Events in one frame: with the tag copied into each, what bounds how much output a
    /// frame's bytes can become.
    pub max_events: u64,
}

/// A Forward protocol connection.
pub struct ForwardConn {
    rb: ReadBuf,
    decoder: Decoder,
    /// The core's buffers for validating and inflating frames.
    scratch: Rc<RefCell<FrameScratch>>,
    max_inflated: usize,
    max_events: u64,
    /// Bytes the decoder needs before it can go on.
    need: usize,
    /// A frame whose ingestion paused on backpressure, still first in the buffer.
    paused: Option<Paused>,
    /// Bytes of unacked chunks at which the connection stops being read.
    max_unacked: usize,
    link: Rc<Link>,
}

/// Where a paused frame stopped.
#[derive(Clone, Copy, Debug)]
struct Paused {
    taken: u64,
    ticket: Option<Ticket>,
}

impl ForwardConn {
    pub fn new(limits: ForwardLimits, scratch: Rc<RefCell<FrameScratch>>, mem: Mem) -> Self {
        let ForwardLimits {
            max_frame,
            max_inflated,
            max_unacked,
            max_events,
        } = limits;
        ForwardConn {
            max_unacked,
            rb: ReadBuf::new(READ_CHUNK, max_frame + READ_CHUNK, 0, mem),
            decoder: Decoder::new(max_frame),
            scratch,
            max_inflated,
            max_events,
            need: 1,
            paused: None,
            link: Rc::new(Link::default()),
        }
    }
}

impl ForwardConn {
    fn count_ok(&self, n: u64) -> Result<u64, DecodeError> {
        if n > self.max_events {
            return Err(DecodeError::TooManyEvents(self.max_events));
        }
        Ok(n)
    }
}

impl Conn for ForwardConn {
    fn buf(&self) -> &ReadBuf {
        &self.rb
    }

    fn buf_mut(&mut self) -> &mut ReadBuf {
        &mut self.rb
    }

    /// Room for the rest of the frame, but growing at most as fast as bytes arrive: a
    /// peer that declares a large frame and stops sending gets no large buffer.
    fn read_buf(&mut self) -> &mut [u8] {
        let have = self.rb.data().len();
        let missing = self.need.saturating_sub(have).max(1);
        self.rb.spare(missing.min(have.max(READ_CHUNK)))
    }

    fn process(&mut self, shard: &mut Shard) -> Progress {
        let mut budget = TURN;
        loop {
            if shard.blocked_for(&self.link) {
                return Progress::Blocked;
            }
            if budget == 0 {
                return Progress::Yield;
            }
            let (frame, len) = match self.decoder.decode(self.rb.data()) {
                Ok(Decoded::Frame(frame, len)) => (frame, len),
                Ok(Decoded::Keepalive) => {
                    self.rb.consume(1);
                    continue;
                }
                Ok(Decoded::NeedMore(n)) => {
                    self.need = n;
                    return Progress::Read;
                }
                Err(e) => return Progress::Close(e),
            };
            let mut fs = self.scratch.borrow_mut();
            let limit = fs.limit(self.max_inflated);
            let resumed = self.paused.take();
            // Batches are held: the frame, validated, goes to the journal's backlog.
            if resumed.is_none() && shard.diverts(&self.link) {
                let events = frame
                    .events(&mut fs.scratch, limit)
                    .map(|e| e.count() as u64)
                    .and_then(|n| self.count_ok(n));
                fs.charge();
                let events = match events {
                    Ok(events) => events,
                    Err(e) => return refuse(e, limit < self.max_inflated, &mut fs),
                };
                shard.divert_frame(&frame, &self.link, &self.rb.data()[..len], events);
                budget = budget.saturating_sub(len + fs.scratch.inflated_len());
                fs.trim(KEEP_INFLATED);
                drop(fs);
                self.rb.consume(len);
                self.need = 1;
                continue;
            }
            let (events, ticket, taken) = match resumed {
                Some(p) => (frame.resume(&fs.scratch, p.taken), p.ticket, p.taken),
                None => {
                    // Validated (and inflated) first, so that the charge is known before
                    // its events are taken.
                    let checked = frame.events(&mut fs.scratch, limit).map(|_| ());
                    let checked = checked.and_then(|()| self.count_ok(fs.scratch.events()));
                    fs.charge();
                    if let Err(e) = checked {
                        return refuse(e, limit < self.max_inflated, &mut fs);
                    }
                    let raw = &self.rb.data()[..len];
                    let ticket = shard.open_frame(&frame, &self.link, raw);
                    (frame.resume(&fs.scratch, 0), ticket, 0)
                }
            };
            match shard.ingest_forward(self.link.input.get(), &frame, events, ticket) {
                Ingested::All => {
                    shard.close_frame(ticket);
                    if resumed.is_some() {
                        shard.end_pause();
                    }
                    budget = budget.saturating_sub(len + fs.scratch.inflated_len());
                    fs.trim(KEEP_INFLATED);
                    drop(fs);
                    self.rb.consume(len);
                    self.need = 1;
                    // A frame that held the others back gives them the next turn.
                    if resumed.is_some() {
                        return Progress::Turn;
                    }
                }
                Ingested::Paused(n) => {
                    self.paused = Some(Paused {
                        taken: taken + n,
                        ticket,
                    });
                    shard.pause_frame(&self.link);
                    return Progress::Blocked;
                }
            }
        }
    }

    fn abandon(&mut self, shard: &mut Shard) {
        if let Some(p) = self.paused.take() {
            shard.abandon_frame(p.ticket);
            shard.end_pause();
            self.scratch.borrow_mut().trim(KEEP_INFLATED);
        }
    }

    /// Bytes left over are a frame cut short.
    fn finish(&mut self, shard: &mut Shard) {
        if !self.rb.data().is_empty() {
            shard.refused(
                DecodeError::Truncated,
                "Dropping a frame cut short by the peer",
                self.link.peer.get(),
            );
            self.rb.consume(self.rb.data().len());
        }
    }

    fn link(&self) -> &Rc<Link> {
        &self.link
    }

    fn may_read(&self) -> bool {
        self.link.unacked_bytes() < self.max_unacked
    }
}

/// A frame that could not be taken: one that inflated past the room the peers' share had
/// (not past its limit) waits for memory; others close the connection.
fn refuse(e: DecodeError, short: bool, fs: &mut FrameScratch) -> Progress {
    fs.trim(0);
    match e {
        // zstd refuses a window larger than the room, too.
        DecodeError::DecompressedTooLarge(_) | DecodeError::Decompress(Codec::Zstd) if short => {
            Progress::Memory
        }
        e => Progress::Close(e),
    }
}

/// Where JSON-lines events get their tag.
#[derive(Clone, Debug)]
pub struct JsonSource {
    /// The input's index in the config, for its counters.
    pub input: usize,
    /// The input's own tag, used when `tag_key` is unset or missing from a record.
    pub tag: String,
    pub tag_key: Option<String>,
}

/// A JSON-lines connection.
pub struct JsonConn {
    rb: ReadBuf,
    lines: Lines,
    parser: JsonParser,
    source: Rc<JsonSource>,
    link: Rc<Link>,
}

impl JsonConn {
    pub fn new(max_line: usize, source: Rc<JsonSource>, mem: Mem) -> Self {
        JsonConn {
            rb: ReadBuf::new(READ_CHUNK, max_line + READ_CHUNK, JSON_PADDING, mem),
            lines: Lines::new(max_line),
            parser: JsonParser::default(),
            source,
            link: Rc::new(Link::default()),
        }
    }
}

impl Conn for JsonConn {
    fn buf(&self) -> &ReadBuf {
        &self.rb
    }

    fn buf_mut(&mut self) -> &mut ReadBuf {
        &mut self.rb
    }

    fn read_buf(&mut self) -> &mut [u8] {
        self.rb.spare(READ_CHUNK)
    }

    /// Events are stamped with the time they are processed. With a write-ahead log, the
    /// lines of one call are one journal entry.
    fn process(&mut self, shard: &mut Shard) -> Progress {
        let now = EventTime::now();
        let mut budget = TURN;
        // The journal entry being written: whether it goes to the backlog, and the
        // ticket of its events if not.
        let mut entry: Option<(bool, Option<Ticket>)> = None;
        let progress = loop {
            if shard.blocked_for(&self.link) {
                break Progress::Blocked;
            }
            if budget == 0 {
                break Progress::Yield;
            }
            match self.lines.next(self.rb.data()) {
                Framed::Line { len, consumed } => {
                    let divert = shard.diverts(&self.link);
                    if let Some((d, t)) = entry
                        && d != divert
                    {
                        shard.end_lines(t);
                        entry = None;
                    }
                    let (diverted, ticket) = *entry.get_or_insert_with(|| {
                        (divert, shard.open_lines(self.source.input, now, divert))
                    });
                    let peer = self.link.peer.get();
                    let line = Line { len, now, peer };
                    take_line(
                        shard,
                        &mut self.parser,
                        self.rb.data_padded(),
                        &self.source,
                        line,
                        (diverted, ticket),
                    );
                    self.rb.consume(consumed);
                    budget = budget.saturating_sub(consumed);
                }
                Framed::Discard { consumed, error } => {
                    if let Some(e) = error {
                        shard.refused(e, "Skipping a line", self.link.peer.get());
                    }
                    self.rb.consume(consumed);
                    budget = budget.saturating_sub(consumed);
                }
                Framed::NeedMore => break Progress::Read,
            }
        };
        if let Some((_, ticket)) = entry {
            shard.end_lines(ticket);
        }
        progress
    }

    /// An unterminated last line still counts.
    fn finish(&mut self, shard: &mut Shard) {
        if let Some(len) = self.lines.finish(self.rb.data()) {
            let (now, peer) = (EventTime::now(), self.link.peer.get());
            let divert = shard.diverts(&self.link);
            let ticket = shard.open_lines(self.source.input, now, divert);
            let line = Line { len, now, peer };
            take_line(
                shard,
                &mut self.parser,
                self.rb.data_padded(),
                &self.source,
                line,
                (divert, ticket),
            );
            shard.end_lines(ticket);
            self.rb.consume(len);
        }
    }

    /// Lines are ingested whole or not at all: nothing is held.
    fn abandon(&mut self, _: &mut Shard) {}

    fn link(&self) -> &Rc<Link> {
        &self.link
    }
}

/// Ingests the lines of one datagram. `buf[..len]` is the datagram and `buf` extends at
/// least [`JSON_PADDING`] bytes past it.
pub fn ingest_datagram(
    shard: &mut Shard,
    parser: &mut JsonParser,
    buf: &mut [u8],
    len: usize,
    link: &Link,
    source: &JsonSource,
    peer: SocketAddr,
) {
    let now = EventTime::now();
    let divert = shard.diverts(link);
    let ticket = shard.open_lines(source.input, now, divert);
    let mut start = 0;
    while start < len {
        let end = memchr::memchr(b'\n', &buf[start..len]).map_or(len, |i| start + i);
        let line = Line {
            len: end - start,
            now,
            peer: Some(peer),
        };
        take_line(
            shard,
            parser,
            &mut buf[start..],
            source,
            line,
            (divert, ticket),
        );
        start = end + 1;
    }
    shard.end_lines(ticket);
}

/// Routes the records of one HTTP request, all or none: every record is checked before
/// any is taken. Returns how many there were, and with a write-ahead log the serial of
/// its journal entry, whose commit the reply waits for.
pub fn ingest_http(
    shard: &mut Shard,
    parser: &mut JsonParser,
    input: usize,
    req: &mut Ingest,
) -> (Result<usize, DecodeError>, Option<u64>) {
    let time = req.time.unwrap_or_else(EventTime::now);
    shard.read(input, req.len());
    let len = req.len();
    let entry = shard.open_http(input, time, req.payload, &req.tag, &req.records[..len]);
    let ticket = entry.map(|e| e.0);
    let taken = route_request(
        shard,
        parser,
        input,
        &req.tag,
        time,
        req.payload,
        &mut req.records,
        len,
        ticket,
    );
    shard.close_frame(ticket);
    match taken {
        Ok(_) => shard.counters.http_requests += 1,
        Err(e) => shard.refused(e, "Refusing an HTTP request", None),
    }
    (taken, entry.map(|e| e.1))
}

/// Routes an HTTP request's records (`records[..len]`, padded for JSON), all or none.
#[allow(clippy::too_many_arguments)]
fn route_request(
    shard: &mut Shard,
    parser: &mut JsonParser,
    input: usize,
    tag: &str,
    time: EventTime,
    payload: Payload,
    records: &mut [u8],
    len: usize,
    ticket: Option<Ticket>,
) -> Result<usize, DecodeError> {
    match payload {
        Payload::Json => parser.parse_each(records, len, |obj| {
            shard.ingest_json(input, tag, time, obj, ticket);
        }),
        Payload::Msgpack => msgpack_records(&records[..len]).map(|records| {
            let mut events = records.iter().map(|&record| Event { time, record });
            // A held batch pauses a Forward frame; a request is taken whole, as a JSON
            // line is, so its body (bounded by max_body_bytes) is the most it overshoots.
            while let Ingested::Paused(_) =
                shard.ingest_msgpack(input, tag, events.by_ref(), ticket)
            {}
            records.len()
        }),
    }
}

/// Journal entries read back — the backlog, and an earlier run's segments — ingested as a
/// connection's input is: Forward frames decoded and routed (pausing on backpressure as
/// a connection does), JSON lines parsed with their input's tag and the time they were
/// first read.
pub struct Replay {
    buf: Vec<u8>,
    /// Where `buf` starts in its segment file.
    base: u64,
    at: usize,
    seg: SegId,
    path: std::path::PathBuf,
    decoder: Decoder,
    scratch: Scratch,
    parser: JsonParser,
    /// A JSON-lines entry's payload, copied with simd-json's padding.
    lines: Vec<u8>,
    paused: Option<Paused>,
    /// The entries are an earlier run's.
    adopted: bool,
    /// By input: the Forward inflate limit, or the JSON-lines tag source.
    inputs: Vec<ReplayInput>,
    link: Rc<Link>,
}

enum ReplayInput {
    Forward { max_inflated: usize },
    Json(JsonSource),
    Other,
}

impl Replay {
    pub fn new(cfg: &Config) -> Self {
        let inputs = cfg
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| match &input.kind {
                InputKind::Forward {
                    max_decompressed_bytes,
                    ..
                } => ReplayInput::Forward {
                    max_inflated: *max_decompressed_bytes,
                },
                InputKind::JsonLines { tag, tag_key, .. } => ReplayInput::Json(JsonSource {
                    input: i,
                    tag: tag.clone(),
                    tag_key: tag_key.clone(),
                }),
                InputKind::Http { .. } => ReplayInput::Other,
            })
            .collect();
        Replay {
            buf: Vec::new(),
            base: 0,
            at: 0,
            seg: 0,
            path: Default::default(),
            decoder: Decoder::new(crate::limits::MAX_FRAME_CEILING),
            scratch: Scratch::default(),
            parser: JsonParser::default(),
            lines: Vec::new(),
            paused: None,
            adopted: false,
            inputs,
            link: Rc::new(Link::default()),
        }
    }

    pub fn link(&self) -> &Rc<Link> {
        &self.link
    }

    /// The entries to ingest next: `buf`, from offset `base` of segment `seg`.
    pub fn load(
        &mut self,
        buf: Vec<u8>,
        base: u64,
        seg: SegId,
        path: std::path::PathBuf,
        adopted: bool,
    ) {
        self.adopted = adopted;
        self.buf = buf;
        self.base = base;
        self.at = 0;
        self.seg = seg;
        self.path = path;
    }

    fn damaged(&self, shard: &mut Shard, at: usize, bytes: usize, why: &str) {
        if let Some(j) = shard.journal() {
            j.counts.damaged += 1;
        }
        tracing::warn!(
            core = shard.core,
            path = %self.path.display(),
            offset = self.base + at as u64,
            bytes,
            why,
            "Skipping damaged bytes of a write-ahead log segment"
        );
    }

    /// Ingests entries until they run out (`Read`), batches are held, or a turn's worth
    /// is done.
    pub fn process(&mut self, shard: &mut Shard) -> Progress {
        shard.replaying = Some(self.adopted);
        let p = self.ingest(shard);
        shard.replaying = None;
        p
    }

    fn ingest(&mut self, shard: &mut Shard) -> Progress {
        let mut budget = TURN;
        loop {
            if shard.reader_blocked(&self.link) {
                return Progress::Blocked;
            }
            if budget == 0 {
                return Progress::Yield;
            }
            let (entry, next) = match entry::scan(&self.buf, self.at) {
                Scanned::Entry { entry, next } => (entry, next),
                Scanned::Corrupt { at, next, why } => {
                    self.damaged(shard, at, next - at, why);
                    self.at = next;
                    continue;
                }
                Scanned::Torn { at } => {
                    self.damaged(shard, at, self.buf.len() - at, "torn tail");
                    self.at = self.buf.len();
                    continue;
                }
                Scanned::End => return Progress::Read,
            };
            budget = budget.saturating_sub(next - self.at);
            // An input renamed or removed since: its events still go out, counted as the
            // first input's.
            let input = shard.input_named(entry.input);
            match entry.kind {
                Kind::Forward => {
                    let max_inflated = match input.map(|i| &self.inputs[i]) {
                        Some(ReplayInput::Forward { max_inflated }) => *max_inflated,
                        _ => 64 << 20,
                    };
                    let frame = match self.decoder.decode(entry.payload) {
                        Ok(Decoded::Frame(frame, _)) => frame,
                        _ => {
                            self.damaged(shard, self.at, next - self.at, "not a Forward frame");
                            self.at = next;
                            continue;
                        }
                    };
                    let resumed = self.paused.take();
                    let (events, ticket, taken) = match resumed {
                        Some(p) => (frame.resume(&self.scratch, p.taken), p.ticket, p.taken),
                        None => match frame.events(&mut self.scratch, max_inflated) {
                            Ok(events) => (events, Some(shard.open_replayed(self.seg)), 0),
                            Err(_) => {
                                self.damaged(shard, self.at, next - self.at, "undecodable frame");
                                self.at = next;
                                continue;
                            }
                        },
                    };
                    match shard.ingest_forward(input.unwrap_or(0), &frame, events, ticket) {
                        Ingested::All => {
                            shard.close_frame(ticket);
                            if resumed.is_some() {
                                shard.end_pause();
                            }
                            self.at = next;
                        }
                        Ingested::Paused(n) => {
                            self.paused = Some(Paused {
                                taken: taken + n,
                                ticket,
                            });
                            shard.pause_frame(&self.link);
                            return Progress::Blocked;
                        }
                    }
                }
                Kind::Http => {
                    let Some((payload, tag, records)) = entry::http_payload(entry.payload) else {
                        self.damaged(shard, self.at, next - self.at, "not an HTTP request");
                        self.at = next;
                        continue;
                    };
                    self.lines.clear();
                    self.lines.extend_from_slice(records);
                    let len = self.lines.len();
                    self.lines.resize(len + JSON_PADDING, 0);
                    let ticket = Some(shard.open_replayed(self.seg));
                    let input = input.unwrap_or(0);
                    let tag = tag.to_string();
                    if let Err(e) = route_request(
                        shard,
                        &mut self.parser,
                        input,
                        &tag,
                        entry.time,
                        payload,
                        &mut self.lines,
                        len,
                        ticket,
                    ) {
                        shard.refused(e, "Refusing a replayed HTTP request", None);
                    }
                    shard.close_frame(ticket);
                    self.at = next;
                }
                Kind::JsonLines => {
                    let fallback;
                    let source = match input.map(|i| &self.inputs[i]) {
                        Some(ReplayInput::Json(s)) => s,
                        _ => {
                            fallback = JsonSource {
                                input: input.unwrap_or(0),
                                tag: entry.input.to_string(),
                                tag_key: None,
                            };
                            &fallback
                        }
                    };
                    self.lines.clear();
                    self.lines.extend_from_slice(entry.payload);
                    let len = self.lines.len();
                    self.lines.resize(len + JSON_PADDING, 0);
                    let ticket = Some(shard.open_replayed(self.seg));
                    let mut start = 0;
                    while start < len {
                        let end = memchr::memchr(b'\n', &self.lines[start..len])
                            .map_or(len, |i| start + i);
                        if end > start {
                            ingest_line(
                                shard,
                                &mut self.parser,
                                &mut self.lines[start..],
                                end - start,
                                source,
                                entry.time,
                                None,
                                ticket,
                            );
                        }
                        start = end + 1;
                    }
                    shard.close_frame(ticket);
                    self.at = next;
                }
            }
        }
    }

    /// Lets go of a frame paused half-way: its entry stays live, for the next start.
    pub fn abandon(&mut self, shard: &mut Shard) {
        if let Some(p) = self.paused.take() {
            shard.abandon_frame(p.ticket);
            shard.end_pause();
        }
    }
}

/// A line at the start of a buffer: its length, when it was read, and from whom.
struct Line {
    len: usize,
    now: EventTime,
    peer: Option<SocketAddr>,
}

/// Journals a line read live into the open entry, and routes it unless the entry goes to
/// the backlog (`entry`: diverted, and the ticket of its events).
fn take_line(
    shard: &mut Shard,
    parser: &mut JsonParser,
    buf: &mut [u8],
    source: &JsonSource,
    line: Line,
    entry: (bool, Option<Ticket>),
) {
    shard.journal_line(&buf[..line.len]);
    if !entry.0 {
        ingest_line(
            shard, parser, buf, line.len, source, line.now, line.peer, entry.1,
        );
    }
}

/// Parses one line in place and hands its event to the shard, or counts why not.
#[allow(clippy::too_many_arguments)]
fn ingest_line(
    shard: &mut Shard,
    parser: &mut JsonParser,
    buf: &mut [u8],
    len: usize,
    source: &JsonSource,
    now: EventTime,
    peer: Option<SocketAddr>,
    ticket: Option<Ticket>,
) {
    let mut long = false;
    let r = parser.parse(buf, len, |obj| {
        let tag = source
            .tag_key
            .as_deref()
            .and_then(|k| field_str(obj, k))
            .unwrap_or(&source.tag);
        // A tag is copied into every event's output: bounded as Forward tags are.
        if tag.len() > crate::limits::MAX_TAG {
            long = true;
            return;
        }
        shard.ingest_json(source.input, tag, now, obj, ticket);
    });
    let r = r.and_then(|v| {
        if long {
            Err(DecodeError::TagTooLong)
        } else {
            Ok(v)
        }
    });
    if let Err(e) = r {
        shard.refused(e, "Skipping a line", peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffer_compacts_grows_and_shrinks() {
        let mut rb = ReadBuf::new(8, 32, 4, Mem::unlimited());
        assert_eq!(rb.held(), 0, "no buffer until the first read");
        rb.spare(8)[..6].copy_from_slice(b"abcdef");
        rb.filled(6);
        rb.consume(4);
        assert_eq!(rb.data(), b"ef");
        // Asking for 7 compacts ("ef" to the front) and leaves 6, then grows.
        let s = rb.spare(7);
        assert!(s.len() >= 7);
        assert_eq!(rb.data(), b"ef");
        assert!(rb.data_padded().len() >= 2 + 4);
        let s = rb.spare(100);
        assert_eq!(s.len(), 30, "capped at the maximum");
        rb.consume(2);
        rb.shrink();
        assert_eq!(rb.held(), 0, "an empty buffer is given back");
        assert_eq!(rb.spare(1).len(), 8);
    }

    /// Buffers are charged to the peers' share, grow only within it, and give it back.
    #[test]
    fn read_buffers_stay_within_the_peers_share() {
        // A share of 100 bytes: 8 + 4 for a base buffer.
        let budget = Budget::new(200, 1);
        let mem = Mem::new(budget.clone());
        let mut a = ReadBuf::new(8, 1000, 4, mem.clone());
        let mut b = ReadBuf::new(8, 1000, 4, mem);
        a.spare(8);
        assert_eq!((a.held(), budget.peers_held()), (12, 12));
        a.filled(8);
        // Growing asks for twice the capacity, then for what the read needs at least.
        assert!(a.spare(60).len() >= 60);
        assert_eq!((a.held(), budget.peers_held()), (72, 72));
        a.filled(60);
        assert!(a.spare(100).is_empty(), "no room to grow: {}", a.held());
        assert!(b.spare(8).len() == 8, "a base buffer still fits");
        assert!(budget.peers_held() <= 100);
        a.discard();
        assert_eq!(budget.peers_held(), b.held());
        drop(b);
        assert_eq!((budget.peers_held(), budget.used()), (0, 0));
    }
}
