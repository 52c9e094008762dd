//! Batch stage: per-core, per-sink buffers that events are encoded straight into, sealed
//! at the sink's size limit or after its linger time, and pushed to the emitter's ring.
//!
//! For Kinesis and Firehose a batch is shaped as the request it will become: its records
//! (one event each, packed lines, or KPL aggregates) with their partition keys, within
//! the service's record and request limits, counted exactly as the service counts them.
//! An event that does not fit is encoded again into the next record or batch; one larger
//! than a record is kept apart, never truncated, for the dead-letter directory.
//!
//! When the ring is full the sealed batch is held here, the shard reports itself blocked,
//! and its connections stop reading until the emitter makes room (ARCHITECTURE.md, rule 6).
//! Settled batches come back through the completion ring and their buffers are reused, so
//! the steady state allocates nothing.

pub mod json;
pub mod records;
pub mod shape;

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::ack::Ticket;
use crate::budget::Budget;
use crate::config::KINESIS_PUT_UNIT;
use crate::ring::Producer;
use crate::shards::{ShardMap, hash_key};
use records::{
    Compressor, Framing, KPL_MAGIC, KeyMode, MAX_RECORDS, RANDOM_KEY_LEN, RecordFraming,
    RecordShape, Rng,
};
use shape::{Encoded, Out};

/// One record of a request-shaped batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The record's bytes: `data[start..end]`.
    pub start: u32,
    pub end: u32,
    /// Its partition key: `keys[key_start..key_end]` (empty for Firehose).
    pub key_start: u32,
    pub key_end: u32,
    /// Its explicit hash key, when one was chosen.
    pub hash: Option<u128>,
    /// The hash key Kinesis routes it by: the explicit one, or the MD5 of the partition key
    /// (known without hashing for keys from the shard map's tables; 0 for Firehose).
    pub target: u128,
    pub events: u32,
    /// Larger than a record may be: never sent, dead-lettered.
    pub oversize: bool,
}

/// Encoded events on their way to one sink.
#[derive(Debug, Default)]
pub struct Batch {
    /// The events, encoded back to back (for request-shaped sinks, the records' bytes).
    pub data: Vec<u8>,
    /// Request-shaped sinks: the records, in order.
    pub records: Vec<Record>,
    /// The records' partition keys, back to back.
    pub keys: Vec<u8>,
    pub events: u32,
    /// Ack tickets of the chunks with events in this batch.
    pub tickets: Vec<Ticket>,
    /// The core that built it, which gets it back once it is settled.
    pub core: usize,
    /// What its buffers are charged to the memory budget: their capacity while the batch
    /// is open, held, in a ring or on its way; nothing while it waits as a spare.
    charged: usize,
}

impl Batch {
    fn new(core: usize, capacity: usize) -> Self {
        Batch {
            data: Vec::with_capacity(capacity),
            core,
            ..Batch::default()
        }
    }

    /// The bytes its buffers hold, by capacity.
    fn footprint(&self) -> usize {
        self.data.capacity()
            + self.keys.capacity()
            + self.records.capacity() * size_of::<Record>()
            + self.tickets.capacity() * size_of::<Ticket>()
    }

    /// Charges the budget for what its buffers have grown (or shrunk) to.
    fn charge(&mut self, budget: &Budget) {
        let now = self.footprint();
        budget.adjust(self.charged, now);
        self.charged = now;
    }

    fn clear(&mut self) {
        self.data.clear();
        self.records.clear();
        self.keys.clear();
        self.events = 0;
        self.tickets.clear();
    }

    /// A record's bytes.
    pub fn data_of(&self, r: &Record) -> &[u8] {
        &self.data[r.start as usize..r.end as usize]
    }

    /// A record's partition key (valid UTF-8 by construction).
    pub fn key_of(&self, r: &Record) -> &str {
        std::str::from_utf8(&self.keys[r.key_start as usize..r.key_end as usize])
            .unwrap_or_default()
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

/// `n` rounded down to whole Kinesis payload units, unless it is less than one.
fn unit_floor(n: usize) -> usize {
    if n >= KINESIS_PUT_UNIT {
        n - n % KINESIS_PUT_UNIT
    } else {
        n
    }
}

/// Room for one more event past `max_bytes`: a buffer that grew larger than twice this
/// much past it held an outsized event, and is not kept.
const SLACK: usize = 64 << 10;

/// A new buffer starts this large and grows with what it holds, so a batch holds the
/// memory it was filled with, not its limit's (a 5 MiB reservation per batch in flight
/// becomes resident with this allocator). Returned buffers are all kept and reused: how
/// many there are is bounded by how many were ever in flight.
const INITIAL_CAPACITY: usize = 64 << 10;

/// Room kept in a compressed record for the codec's worst-case growth.
const COMPRESSION_MARGIN: usize = 1024;

/// KPL aggregates end with the MD5 of their protobuf.
const MD5_LEN: usize = 16;

/// The outcome of [`Batcher::write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wrote {
    pub encoded: Encoded,
    /// The event's chunk ticket was attached to a batch that did not carry it yet: the
    /// ledger must count one more hold.
    pub new_hold: bool,
}

impl Wrote {
    fn not(encoded: Encoded) -> Self {
        Wrote {
            encoded,
            new_hold: false,
        }
    }
}

/// Counts a batcher keeps for the shard's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatcherCounts {
    /// Events larger than a record, set apart for the dead-letter directory.
    pub oversize: u64,
    /// Events whose partition key field was missing or unusable (a random key was used).
    pub key_missing: u64,
}

/// A record's partition key, `keys[start..end]`, with its explicit hash key if any and the
/// hash key it is routed by.
#[derive(Clone, Copy, Debug, Default)]
struct Key {
    start: u32,
    end: u32,
    hash: Option<u128>,
    target: u128,
}

/// The open record a batch is filling (packed lines or a KPL aggregate).
#[derive(Clone, Copy, Debug)]
struct Open {
    start: usize,
    events: u32,
    key: Key,
}

/// Builds one sink's batches on one core.
pub struct Batcher {
    core: usize,
    limits: BatchLimits,
    framing: Framing,
    open: Batch,
    opened_at: Option<Instant>,
    /// Request-shaped sinks: bytes (data plus keys) and records the open batch will send,
    /// the open record not included.
    req_bytes: usize,
    sendable: usize,
    record: Option<Open>,
    /// Predicted length of the next event, for KPL length prefixes.
    last_len: usize,
    rng: Rng,
    /// Next shard for explicit hash keys and aggregates.
    next_shard: usize,
    shards: Arc<ShardMap>,
    compressor: Option<Compressor>,
    pub counts: BatcherCounts,
    /// Sealed, waiting for room in the ring.
    held: VecDeque<Batch>,
    spare: Vec<Batch>,
    ring: Producer<Batch>,
    /// Pushed to the ring and not yet returned.
    in_flight: usize,
    /// The events of those batches.
    in_flight_events: u64,
    budget: Arc<Budget>,
}

impl Batcher {
    pub fn new(
        core: usize,
        limits: BatchLimits,
        framing: Framing,
        ring: Producer<Batch>,
        budget: Arc<Budget>,
    ) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ ((core as u64 + 1) << 48);
        let compressor = match framing {
            Framing::Records(RecordFraming {
                compression: Some(c),
                ..
            }) => Some(Compressor::new(c)),
            _ => None,
        };
        let mut rng = Rng::new(seed);
        // Each core starts its round robin over the shards somewhere of its own, so that
        // a few aggregates (or explicit keys) do not all land on the first shards.
        let next_shard = rng.next_u64() as usize;
        let mut open = Batch::new(core, INITIAL_CAPACITY.min(limits.max_bytes + SLACK));
        open.charge(&budget);
        Batcher {
            core,
            limits,
            framing,
            open,
            opened_at: None,
            req_bytes: 0,
            sendable: 0,
            record: None,
            last_len: 64,
            rng,
            next_shard,
            shards: Arc::new(ShardMap::unknown()),
            compressor,
            counts: BatcherCounts::default(),
            held: VecDeque::new(),
            spare: Vec::new(),
            ring,
            in_flight: 0,
            in_flight_events: 0,
            budget,
        }
    }

    /// The stream's shards, for explicit hash keys and aggregates.
    pub fn set_shards(&mut self, shards: Arc<ShardMap>) {
        self.shards = shards;
    }

    /// Encodes one event into the open batch with `encode`, which may be called again: if
    /// the event does not fit, the record or batch is closed without it and it is encoded
    /// again into the next one (encoding twice is cheaper than copying, and keeps every
    /// event a single copy of its source).
    #[inline]
    pub fn write<'k>(
        &mut self,
        ticket: Option<Ticket>,
        encode: impl FnMut(&mut Vec<u8>) -> Out<'k>,
    ) -> Wrote {
        self.make_room();
        match self.framing {
            Framing::Stream => self.write_stream(ticket, encode),
            Framing::Records(f) => match f.shape {
                RecordShape::Single => self.write_single(f, ticket, encode),
                RecordShape::Lines => self.write_lines(f, ticket, encode),
                RecordShape::Aggregated => self.write_aggregated(f, ticket, encode),
            },
        }
    }

    /// Keeps `SLACK` of room ahead of the open batch, growing it by doubling but never past
    /// its limit plus `SLACK`: the growth a `Vec` would choose on its own can double a
    /// buffer that is one event past its limit.
    #[inline]
    fn make_room(&mut self) {
        let d = &mut self.open.data;
        if d.capacity() - d.len() < SLACK {
            let cap = (d.capacity() * 2)
                .clamp(INITIAL_CAPACITY, self.limits.max_bytes + SLACK)
                .max(d.len() + SLACK);
            d.reserve_exact(cap - d.len());
            self.open.charge(&self.budget);
        }
    }

    fn write_stream<'k>(
        &mut self,
        ticket: Option<Ticket>,
        mut encode: impl FnMut(&mut Vec<u8>) -> Out<'k>,
    ) -> Wrote {
        let mark = self.open.data.len();
        let encoded = encode(&mut self.open.data).encoded;
        if encoded != Encoded::Written {
            self.open.data.truncate(mark);
            return Wrote::not(encoded);
        }
        if self.open.data.len() > self.limits.max_bytes && mark > 0 {
            self.open.data.truncate(mark);
            self.seal();
            encode(&mut self.open.data);
        }
        let w = self.took(ticket);
        if self.open.data.len() >= self.limits.max_bytes {
            self.seal();
        }
        w
    }

    /// Counts an event into the open batch and attaches its ticket.
    fn took(&mut self, ticket: Option<Ticket>) -> Wrote {
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
        Wrote {
            encoded: Encoded::Written,
            new_hold,
        }
    }

    /// Writes a partition key (and explicit hash key) for a new record. Random keys come
    /// from the next shard's table, round robin, so their shard is known without an MD5.
    fn key(&mut self, mode: KeyMode, field: Option<&[u8]>) -> Key {
        let start = self.open.keys.len();
        let (mut hash, mut target) = (None, None);
        match mode {
            KeyMode::None => target = Some(0),
            KeyMode::Random => {
                let i = self.next_shard();
                match self.shards.random_key(i, self.rng.next_u64()) {
                    Some((k, h)) => {
                        self.open.keys.extend_from_slice(k);
                        target = Some(h);
                    }
                    None => self.rng.key(&mut self.open.keys),
                }
            }
            KeyMode::Explicit => {
                self.rng.key(&mut self.open.keys);
                hash = Some(self.spread());
                target = hash;
            }
            KeyMode::Field => match field {
                Some(k) => self.open.keys.extend_from_slice(k),
                None => {
                    self.counts.key_missing += 1;
                    self.rng.key(&mut self.open.keys);
                }
            },
        }
        let target = target.unwrap_or_else(|| hash_key(&self.open.keys[start..]));
        Key {
            start: start as u32,
            end: self.open.keys.len() as u32,
            hash,
            target,
        }
    }

    /// An explicit hash key in the next shard, round robin, at a random point of its range.
    fn spread(&mut self) -> u128 {
        let i = self.next_shard();
        let r = self.rng.next_u128();
        self.shards.hash_in(i, r)
    }

    /// The next shard, round robin.
    fn next_shard(&mut self) -> usize {
        let i = self.next_shard % self.shards.len();
        self.next_shard = i + 1;
        i
    }

    /// Adds the record `data[start..end]`.
    fn push_record(&mut self, start: usize, end: usize, key: Key, events: u32, oversize: bool) {
        self.open.records.push(Record {
            start: start as u32,
            end: end as u32,
            key_start: key.start,
            key_end: key.end,
            hash: key.hash,
            target: key.target,
            events,
            oversize,
        });
        if oversize {
            self.counts.oversize += events as u64;
        } else {
            self.sendable += 1;
            self.req_bytes += end - start + (key.end - key.start) as usize;
        }
    }

    fn full(&self, f: RecordFraming) -> bool {
        self.sendable >= MAX_RECORDS || self.req_bytes >= f.max_request
    }

    /// One event per record (Kinesis, or Firehose without line packing).
    fn write_single<'k>(
        &mut self,
        f: RecordFraming,
        ticket: Option<Ticket>,
        mut encode: impl FnMut(&mut Vec<u8>) -> Out<'k>,
    ) -> Wrote {
        loop {
            let mark = self.open.data.len();
            let out = encode(&mut self.open.data);
            if out.encoded != Encoded::Written {
                self.open.data.truncate(mark);
                return Wrote::not(out.encoded);
            }
            if let Some(c) = &mut self.compressor {
                c.compress_tail(&mut self.open.data, mark);
            }
            // The key is drawn only once the record has its batch: drawing it counts a
            // missing field and moves the round robin on.
            let field = out
                .key
                .filter(|k| f.keys == KeyMode::Field && records::valid_key(k));
            let key_len = match f.keys {
                KeyMode::None => 0,
                KeyMode::Field => field.map_or(RANDOM_KEY_LEN, <[u8]>::len),
                KeyMode::Random | KeyMode::Explicit => RANDOM_KEY_LEN,
            };
            let size = self.open.data.len() - mark + key_len;
            let oversize = size > f.max_record;
            if !oversize
                && self.sendable > 0
                && (self.sendable + 1 > MAX_RECORDS || self.req_bytes + size > f.max_request)
            {
                self.open.data.truncate(mark);
                self.seal();
                continue;
            }
            let key = self.key(f.keys, field);
            self.push_record(mark, self.open.data.len(), key, 1, oversize);
            let w = self.took(ticket);
            if self.full(f) {
                self.seal();
            }
            return w;
        }
    }

    /// Newline-terminated events packed into records (Firehose).
    fn write_lines<'k>(
        &mut self,
        f: RecordFraming,
        ticket: Option<Ticket>,
        mut encode: impl FnMut(&mut Vec<u8>) -> Out<'k>,
    ) -> Wrote {
        loop {
            let mark = self.open.data.len();
            let out = encode(&mut self.open.data);
            if out.encoded != Encoded::Written {
                self.open.data.truncate(mark);
                return Wrote::not(out.encoded);
            }
            if self.open.data.len() - mark > f.max_record {
                // Too large for any record: close the open one before it, keep it apart.
                self.close_record(mark);
                self.push_record(mark, self.open.data.len(), Key::default(), 1, true);
                return self.took(ticket);
            }
            let record_start = self.record.map_or(mark, |r| r.start);
            let record_len = self.open.data.len() - record_start;
            if record_len > f.max_record {
                self.open.data.truncate(mark);
                self.close_record(mark);
                continue;
            }
            if self.sendable + 1 > MAX_RECORDS || self.req_bytes + record_len > f.max_request {
                self.open.data.truncate(mark);
                self.close_record(mark);
                self.seal();
                continue;
            }
            let open = self.record.get_or_insert(Open {
                start: mark,
                events: 0,
                key: Key::default(),
            });
            open.events += 1;
            return self.took(ticket);
        }
    }

    /// Closes the open packed record, which ends at `end`.
    fn close_record(&mut self, end: usize) {
        if let Some(r) = self.record.take() {
            self.push_record(r.start, end, r.key, r.events, false);
        }
    }

    /// KPL aggregated records, each for one shard (Kinesis; see `open_aggregate`). An
    /// aggregate is the magic, then the protobuf `AggregatedRecord`, then the MD5 of the
    /// protobuf. Aggregates end on payload-unit boundaries where they can; an event too
    /// large for an aggregate goes as a plain record, as the KPL sends it.
    fn write_aggregated<'k>(
        &mut self,
        f: RecordFraming,
        ticket: Option<Ticket>,
        mut encode: impl FnMut(&mut Vec<u8>) -> Out<'k>,
    ) -> Wrote {
        // Sizes are checked before compression, which may grow a record by the margin.
        let margin = if f.compression.is_some() {
            COMPRESSION_MARGIN
        } else {
            0
        };
        let full = f.max_record - margin;
        loop {
            if self.record.is_none() {
                // In the little room a request has left, a new aggregate would cost a whole
                // payload unit for a few events: they start the next request instead.
                let room = f.max_request.saturating_sub(self.req_bytes);
                if self.sendable + 1 > MAX_RECORDS || (self.sendable > 0 && room < KINESIS_PUT_UNIT)
                {
                    self.seal();
                }
                self.open_aggregate();
            }
            let agg = self.record.expect("opened above");
            let at = self.open.data.len();
            let Some(len) = self.encode_inner(agg.key.hash.is_some(), &mut encode) else {
                self.open.data.truncate(at);
                // Only text routes without their field write nothing.
                return Wrote::not(Encoded::MissingLogKey);
            };
            let key_len = (agg.key.end - agg.key.start) as usize;
            let size = self.open.data.len() - agg.start + MD5_LEN + key_len;
            let room = f
                .max_request
                .saturating_sub(self.req_bytes)
                .saturating_sub(margin);
            if agg.events == 0 {
                if size > full {
                    // Alone it does not fit an aggregate: it goes as a plain record under
                    // the aggregate's key. The aggregate's header stays behind in the
                    // buffer, unsent, rather than the event being copied over it.
                    self.record = None;
                    let body = self.open.data.len() - len;
                    if let Some(c) = &mut self.compressor {
                        c.compress_tail(&mut self.open.data, body);
                    }
                    let size = self.open.data.len() - body + key_len;
                    let oversize = size > f.max_record;
                    if !oversize && self.sendable > 0 && self.req_bytes + size > f.max_request {
                        self.open.data.truncate(agg.start);
                        self.open.keys.truncate(agg.key.start as usize);
                        self.seal();
                        continue;
                    }
                    self.push_record(body, self.open.data.len(), agg.key, 1, oversize);
                    let w = self.took(ticket);
                    if self.full(f) {
                        self.seal();
                    }
                    return w;
                }
                if size > room && self.sendable > 0 {
                    self.open.data.truncate(agg.start);
                    self.open.keys.truncate(agg.key.start as usize);
                    self.record = None;
                    self.seal();
                    continue;
                }
            } else if size > unit_floor(full.min(room)) {
                // Aggregates end on payload-unit boundaries where they can: Kinesis bills
                // each record in whole units.
                self.open.data.truncate(at);
                self.close_aggregate();
                continue;
            }
            self.last_len = len;
            if let Some(r) = &mut self.record {
                r.events += 1;
            }
            return self.took(ticket);
        }
    }

    /// Starts an aggregate for the next shard, round robin: the magic, then the key
    /// tables. The partition key is one whose MD5 lands on that shard, so the aggregate and
    /// every record in it map there with no explicit hash key, and each inner record costs
    /// 8 bytes of framing. For a shard too narrow to have such a key, a random key and an
    /// explicit hash key table, which inner records then point to as well.
    fn open_aggregate(&mut self) {
        let start = self.open.data.len();
        let key_start = self.open.keys.len() as u32;
        let i = self.next_shard();
        let (hash, target) = match self.shards.key_for(i) {
            Some((k, target)) => {
                self.open.keys.extend_from_slice(k);
                (None, target)
            }
            None => {
                self.rng.key(&mut self.open.keys);
                let h = self.shards.hash_in(i, self.rng.next_u128());
                (Some(h), h)
            }
        };
        let key_end = self.open.keys.len() as u32;
        let d = &mut self.open.data;
        d.extend_from_slice(&KPL_MAGIC);
        // field 1, partition_key_table: the aggregate's key
        d.push(0x0a);
        records::push_varint(d, (key_end - key_start) as usize);
        d.extend_from_slice(&self.open.keys[key_start as usize..key_end as usize]);
        if let Some(hash) = hash {
            // field 2, explicit_hash_key_table: the decimal hash key
            let mut buf = itoa::Buffer::new();
            let ehk = buf.format(hash).as_bytes();
            d.push(0x12);
            records::push_varint(d, ehk.len());
            d.extend_from_slice(ehk);
        }
        self.record = Some(Open {
            start,
            events: 0,
            key: Key {
                start: key_start,
                end: key_end,
                hash,
                target,
            },
        });
    }

    /// Encodes one inner record, `records` (field 3): `Record { partition_key_index: 0,
    /// [explicit_hash_key_index: 0,] data }`. The two length prefixes are sized from the
    /// last event's length, so the bytes move only when that guess is off. Returns the
    /// data length, or `None` if nothing was encoded.
    fn encode_inner<'k>(
        &mut self,
        ehk: bool,
        encode: &mut impl FnMut(&mut Vec<u8>) -> Out<'k>,
    ) -> Option<usize> {
        use records::{put_varint, varint_len};
        // partition_key_index 0, [explicit_hash_key_index 0,] then data's tag
        let head: &[u8] = if ehk {
            &[0x08, 0x00, 0x10, 0x00, 0x1a]
        } else {
            &[0x08, 0x00, 0x1a]
        };
        let h = head.len();
        let guess = self.last_len;
        let (vd, vr) = (varint_len(guess), varint_len(h + varint_len(guess) + guess));
        let d = &mut self.open.data;
        let at = d.len();
        d.push(0x1a);
        d.resize(d.len() + vr, 0);
        d.extend_from_slice(head);
        d.resize(d.len() + vd, 0);
        let body = d.len();
        if encode(d).encoded != Encoded::Written {
            return None;
        }
        let len = d.len() - body;
        let vd2 = varint_len(len);
        let rec_len = h + vd2 + len;
        let vr2 = varint_len(rec_len);
        if (vd2, vr2) != (vd, vr) {
            let new_body = at + 1 + vr2 + h + vd2;
            if new_body > body {
                d.resize(new_body + len, 0);
            }
            d.copy_within(body..body + len, new_body);
            d.truncate(new_body + len);
            d[at + 1 + vr2..at + 1 + vr2 + h].copy_from_slice(head);
        }
        put_varint(&mut d[at + 1..at + 1 + vr2], rec_len);
        put_varint(&mut d[at + 1 + vr2 + h..at + 1 + vr2 + h + vd2], len);
        Some(len)
    }

    /// Ends the open aggregate: the MD5 of its protobuf, then compression if configured.
    fn close_aggregate(&mut self) {
        use md5::{Digest, Md5};
        let Some(agg) = self.record.take() else {
            return;
        };
        if agg.events == 0 {
            self.open.data.truncate(agg.start);
            self.open.keys.truncate(agg.key.start as usize);
            return;
        }
        let digest = Md5::digest(&self.open.data[agg.start + KPL_MAGIC.len()..]);
        self.open.data.extend_from_slice(&digest);
        if let Some(c) = &mut self.compressor {
            c.compress_tail(&mut self.open.data, agg.start);
        }
        let end = self.open.data.len();
        self.push_record(agg.start, end, agg.key, agg.events, false);
    }

    /// Seals the open batch, if it holds anything, and tries to push it.
    pub fn seal(&mut self) {
        match self.framing {
            Framing::Records(RecordFraming {
                shape: RecordShape::Aggregated,
                ..
            }) => self.close_aggregate(),
            Framing::Records(RecordFraming {
                shape: RecordShape::Lines,
                ..
            }) => self.close_record(self.open.data.len()),
            _ => {}
        }
        if self.open.events == 0 {
            return;
        }
        self.open.charge(&self.budget);
        let mut fresh = self.spare.pop().unwrap_or_else(|| {
            Batch::new(
                self.core,
                INITIAL_CAPACITY.min(self.limits.max_bytes + SLACK),
            )
        });
        fresh.charge(&self.budget);
        let sealed = std::mem::replace(&mut self.open, fresh);
        self.opened_at = None;
        self.req_bytes = 0;
        self.sendable = 0;
        self.held.push_back(sealed);
        self.push_held();
    }

    /// Seals the open batch if it carries chunks waiting for their acks and nothing of
    /// this batcher is on its way. Otherwise the batch grows until the batches on their way
    /// come back (`recycle` seals it then): a group commit, so that senders waiting on acks
    /// get them within one round trip while busy sinks still get full requests.
    pub fn seal_if_acks_wait(&mut self) {
        if !self.open.tickets.is_empty() && self.in_flight == 0 && self.held.is_empty() {
            self.seal();
        }
    }

    /// Seals the open batch if it has lingered long enough.
    pub fn seal_if_due(&mut self, now: Instant) {
        if let Some(t) = self.opened_at
            && now.duration_since(t) >= self.limits.linger
        {
            self.seal();
        }
    }

    /// Pushes held batches while the ring has room; returns whether none are left.
    fn push_held(&mut self) -> bool {
        while let Some(b) = self.held.pop_front() {
            let events = u64::from(b.events);
            match self.ring.push(b) {
                Ok(()) => {
                    self.in_flight += 1;
                    self.in_flight_events += events;
                }
                Err(b) => {
                    self.held.push_front(b);
                    return false;
                }
            }
        }
        true
    }

    /// Pushes held batches, registering for a wakeup if the ring is still full or the
    /// memory budget is spent. While it is spent and nothing of this batcher is on its way,
    /// the open batch goes too, so that what it holds can be sent and settled.
    pub fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.blocked() && self.ring.is_closed() {
            // The sink is gone (a panic aborts the process, so this is shutdown): nothing
            // will make room, and trying again would spin.
            return Poll::Pending;
        }
        if self.budget.spent() && self.in_flight == 0 {
            self.seal();
        }
        loop {
            if self.push_held() {
                return self.budget.poll_room(self.core, cx);
            }
            if self.ring.poll_space(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Whether sealed batches wait for room, or the memory budget is spent: the core must
    /// stop reading.
    #[inline]
    pub fn blocked(&self) -> bool {
        !self.held.is_empty() || self.budget.spent()
    }

    /// Sealed batches in the ring, waiting for the emitter, and held back for want of room.
    pub fn queued(&self) -> (usize, usize) {
        (self.ring.len(), self.held.len())
    }

    /// Takes back a settled batch for reuse.
    pub fn recycle(&mut self, mut b: Batch) {
        self.in_flight -= 1;
        self.in_flight_events -= u64::from(b.events);
        self.budget.adjust(b.charged, 0);
        b.charged = 0;
        if b.data.capacity() <= 2 * (self.limits.max_bytes + SLACK) {
            b.clear();
            self.spare.push(b);
        }
        self.seal_if_acks_wait();
    }

    /// Batches not settled yet (open with events, held, or in flight), and their events.
    pub fn unsettled(&self) -> (usize, u64) {
        let batches = usize::from(self.open.events > 0) + self.held.len() + self.in_flight;
        let events = u64::from(self.open.events)
            + self.held.iter().map(|b| u64::from(b.events)).sum::<u64>()
            + self.in_flight_events;
        (batches, events)
    }

    /// Nothing open, held or in flight.
    pub fn idle(&self) -> bool {
        self.open.events == 0 && self.held.is_empty() && self.in_flight == 0
    }
}

impl Drop for Batcher {
    /// Gives back what the batches still here are charged (those on their way come back
    /// first: a core ends after its batches settle).
    fn drop(&mut self) {
        self.budget.adjust(self.open.charged, 0);
        for b in &self.held {
            self.budget.adjust(b.charged, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::ring;
    use crate::shards::hash_key;

    fn put(b: &mut Batcher, bytes: &[u8], ticket: Option<Ticket>) -> Wrote {
        b.write(ticket, |out| {
            out.extend_from_slice(bytes);
            Encoded::Written.into()
        })
    }

    #[test]
    fn seals_at_the_limit_without_splitting_an_event() {
        let (p, c) = ring(8);
        let limits = BatchLimits {
            max_bytes: 10,
            linger: Duration::from_secs(60),
        };
        let mut b = Batcher::new(0, limits, Framing::Stream, p, Budget::unlimited());
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
        let mut b = Batcher::new(0, limits, Framing::Stream, p, Budget::unlimited());
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
        let mut b = Batcher::new(0, limits, Framing::Stream, p, Budget::unlimited());
        put(&mut b, b"x\n", None);
        b.seal_if_due(Instant::now());
        assert_eq!(c.try_pop().unwrap().events, 1);
    }

    fn records(f: RecordFraming) -> (Batcher, crate::ring::Consumer<Batch>) {
        let (p, c) = ring(64);
        let limits = BatchLimits {
            max_bytes: f.max_request,
            linger: Duration::from_secs(60),
        };
        (
            Batcher::new(1, limits, Framing::Records(f), p, Budget::unlimited()),
            c,
        )
    }

    fn event(b: &mut Batcher, bytes: &[u8], key: Option<&[u8]>) -> Wrote {
        b.write(None, |out| {
            out.extend_from_slice(bytes);
            Out {
                encoded: Encoded::Written,
                key,
            }
        })
    }

    fn drain(c: &crate::ring::Consumer<Batch>) -> Vec<Batch> {
        std::iter::from_fn(|| c.try_pop()).collect()
    }

    #[test]
    fn kinesis_requests_hold_at_most_500_records() {
        let (mut b, c) = records(RecordFraming::KINESIS);
        for i in 0..1200 {
            event(&mut b, format!("{{\"n\":{i}}}\n").as_bytes(), None);
        }
        b.seal();
        let batches = drain(&c);
        let sizes: Vec<usize> = batches.iter().map(|b| b.records.len()).collect();
        assert_eq!(sizes, [500, 500, 200]);
        let mut n = 0;
        for batch in &batches {
            for r in &batch.records {
                assert_eq!(batch.data_of(r), format!("{{\"n\":{n}}}\n").as_bytes());
                assert_eq!(batch.key_of(r).len(), 32);
                n += 1;
            }
        }
    }

    #[test]
    fn kinesis_requests_count_data_and_keys_against_the_request_limit() {
        let f = RecordFraming {
            max_request: 10_000,
            ..RecordFraming::KINESIS
        };
        let (mut b, c) = records(f);
        let ev = vec![b'x'; 1000];
        for _ in 0..20 {
            event(&mut b, &ev, None);
        }
        b.seal();
        for batch in drain(&c) {
            let size: usize = batch
                .records
                .iter()
                .map(|r| (r.end - r.start + r.key_end - r.key_start) as usize)
                .sum();
            assert!(size <= 10_000, "{size}");
            // 9 records of 1,032 bytes fit, a tenth would not.
            assert!(
                batch.records.len() == 9 || batch.records.len() == 2,
                "{}",
                batch.records.len()
            );
        }
    }

    #[test]
    fn an_event_larger_than_a_record_is_kept_apart_whole() {
        let f = RecordFraming {
            max_record: 100,
            ..RecordFraming::KINESIS
        };
        let (mut b, c) = records(f);
        event(&mut b, b"small", None);
        event(&mut b, &[b'y'; 300], None);
        event(&mut b, b"small again", None);
        b.seal();
        let batch = drain(&c).pop().unwrap();
        assert_eq!(batch.records.len(), 3);
        let big = batch.records[1];
        assert!(big.oversize);
        assert_eq!(batch.data_of(&big), [b'y'; 300]);
        assert_eq!(b.counts.oversize, 1);
        assert_eq!(batch.events, 3);
    }

    #[test]
    fn keys_from_a_field_or_random_when_missing() {
        let f = RecordFraming {
            keys: KeyMode::Field,
            ..RecordFraming::KINESIS
        };
        let (mut b, c) = records(f);
        event(&mut b, b"a", Some(b"container-1"));
        event(&mut b, b"b", None);
        event(&mut b, b"c", Some(b""));
        b.seal();
        let batch = drain(&c).pop().unwrap();
        assert_eq!(batch.key_of(&batch.records[0]), "container-1");
        assert_eq!(batch.key_of(&batch.records[1]).len(), 32);
        assert_eq!(batch.key_of(&batch.records[2]).len(), 32);
        assert_eq!(b.counts.key_missing, 2);
    }

    fn four_shards() -> Arc<ShardMap> {
        Arc::new(ShardMap::even(4))
    }

    #[test]
    fn explicit_hash_keys_spread_records_evenly_over_the_shards() {
        let f = RecordFraming {
            keys: KeyMode::Explicit,
            ..RecordFraming::KINESIS
        };
        let (mut b, c) = records(f);
        let map = four_shards();
        b.set_shards(map.clone());
        // Across two batch boundaries (500 records each): the round robin skips no shard.
        for _ in 0..1300 {
            event(&mut b, b"e", None);
        }
        b.seal();
        let mut per = [0; 4];
        for batch in drain(&c) {
            for r in &batch.records {
                per[map.shard_of(r.hash.unwrap())] += 1;
            }
        }
        assert_eq!(per, [325; 4]);
    }

    #[test]
    fn firehose_packs_lines_up_to_the_record_limit() {
        let f = RecordFraming {
            max_record: 100,
            max_request: 4 << 20,
            keys: KeyMode::None,
            shape: RecordShape::Lines,
            compression: None,
        };
        let (mut b, c) = records(f);
        for i in 0..10 {
            event(&mut b, format!("{{\"line\":{i:012}}}\n").as_bytes(), None);
        }
        b.seal();
        let batch = drain(&c).pop().unwrap();
        let per: Vec<u32> = batch.records.iter().map(|r| r.events).collect();
        // 22-byte lines: four per 100-byte record.
        assert_eq!(per, [4, 4, 2]);
        let all: Vec<u8> = batch
            .records
            .iter()
            .flat_map(|r| batch.data_of(r).to_vec())
            .collect();
        let want: Vec<u8> = (0..10)
            .flat_map(|i| format!("{{\"line\":{i:012}}}\n").into_bytes())
            .collect();
        assert_eq!(all, want);
        assert!(
            batch
                .records
                .iter()
                .all(|r| r.end - r.start <= 100 && batch.key_of(r).is_empty())
        );
    }

    /// A minimal protobuf reader for the test: (field, wire type, value) triples.
    fn fields(mut b: &[u8]) -> Vec<(u64, u8, Vec<u8>)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            for shift in (0..).step_by(7) {
                let x = b[0];
                *b = &b[1..];
                v |= ((x & 0x7f) as u64) << shift;
                if x & 0x80 == 0 {
                    break;
                }
            }
            v
        }
        let mut out = vec![];
        while !b.is_empty() {
            let tag = varint(&mut b);
            let (field, wire) = (tag >> 3, (tag & 7) as u8);
            let value = match wire {
                0 => varint(&mut b).to_le_bytes().to_vec(),
                2 => {
                    let n = varint(&mut b) as usize;
                    let v = b[..n].to_vec();
                    b = &b[n..];
                    v
                }
                w => panic!("wire type {w}"),
            };
            out.push((field, wire, value));
        }
        out
    }

    /// Checks a KPL aggregate sent with `key` and `hash` and returns its inner records'
    /// data.
    fn deaggregate(agg: &[u8], key: &str, hash: Option<u128>) -> Vec<Vec<u8>> {
        use md5::{Digest, Md5};
        assert_eq!(agg[..4], KPL_MAGIC);
        let (proto, md5) = agg[4..].split_at(agg.len() - 4 - 16);
        assert_eq!(Md5::digest(proto).as_slice(), md5);
        let mut data = vec![];
        for (field, wire, value) in fields(proto) {
            match field {
                1 => assert_eq!(value, key.as_bytes(), "partition key table"),
                2 => assert_eq!(
                    std::str::from_utf8(&value).unwrap(),
                    hash.expect("a hash key table only with an explicit hash key")
                        .to_string()
                ),
                3 => {
                    assert_eq!(wire, 2);
                    let inner = fields(&value);
                    let want: &[u64] = if hash.is_some() { &[1, 2, 3] } else { &[1, 3] };
                    let got: Vec<u64> = inner.iter().map(|f| f.0).collect();
                    assert_eq!(
                        got, want,
                        "partition_key_index, [explicit_hash_key_index,] data"
                    );
                    assert!(
                        inner[..inner.len() - 1].iter().all(|f| f.2 == [0; 8]),
                        "index 0"
                    );
                    data.push(inner.last().unwrap().2.clone());
                }
                f => panic!("field {f}"),
            }
        }
        data
    }

    #[test]
    fn kpl_aggregates_hold_every_event_and_each_goes_to_one_shard() {
        let f = RecordFraming {
            max_record: 4096,
            shape: RecordShape::Aggregated,
            ..RecordFraming::KINESIS
        };
        // Four even shards, each with a key that lands on it; and one shard too narrow to
        // find a key for, whose aggregates carry an explicit hash key instead.
        let sliver = Arc::new(ShardMap::new(vec![
            crate::shards::Shard {
                id: "wide".into(),
                start: 0,
                end: u128::MAX - 1000,
            },
            crate::shards::Shard {
                id: "sliver".into(),
                start: u128::MAX - 999,
                end: u128::MAX,
            },
        ]));
        for map in [four_shards(), sliver] {
            let (mut b, c) = records(f);
            b.set_shards(map.clone());
            // Sizes around the varint boundaries (127/128, 16383/16384 are beyond a record).
            let events: Vec<Vec<u8>> = (0..300)
                .map(|i| vec![b'a' + (i % 26) as u8; [5, 126, 127, 128, 129, 300, 1000][i % 7]])
                .collect();
            for e in &events {
                event(&mut b, e, None);
            }
            b.seal();
            let mut got = vec![];
            let mut per = vec![0; map.len()];
            for batch in drain(&c) {
                for r in &batch.records {
                    assert!(!r.oversize);
                    assert!((r.end - r.start + r.key_end - r.key_start) as usize <= 4096);
                    let key = batch.key_of(r);
                    let shard = map.shard_of(r.hash.unwrap_or_else(|| hash_key(key.as_bytes())));
                    assert_eq!(r.hash.is_some(), map.key_for(shard).is_none());
                    assert_eq!(map.shard_of(r.target), shard, "routed as Kinesis will");
                    per[shard] += 1;
                    let inner = deaggregate(batch.data_of(r), key, r.hash);
                    assert_eq!(inner.len(), r.events as usize);
                    got.extend(inner);
                }
            }
            assert_eq!(got, events);
            assert!(
                per.iter().all(|&n| n > 0),
                "aggregates spread over the shards: {per:?}"
            );
        }
    }

    #[test]
    fn an_event_too_large_for_an_aggregate_goes_as_a_plain_record_on_its_shard() {
        let f = RecordFraming {
            max_record: 300,
            shape: RecordShape::Aggregated,
            ..RecordFraming::KINESIS
        };
        let (mut b, c) = records(f);
        let map = four_shards();
        b.set_shards(map.clone());
        // 260 B: too large with the aggregate's framing, fits a record with its 32 B key.
        // 290 B: fits nothing.
        event(&mut b, b"small", None);
        event(&mut b, &[b'p'; 260], None);
        event(&mut b, &[b'o'; 290], None);
        event(&mut b, b"small again", None);
        b.seal();
        let batch = drain(&c).pop().unwrap();
        let plain = batch
            .records
            .iter()
            .find(|r| batch.data_of(r) == [b'p'; 260])
            .expect("sent as it is, not aggregated");
        assert!(!plain.oversize);
        let key = batch.key_of(plain);
        assert_eq!(
            map.key_for(map.shard_of(hash_key(key.as_bytes()))),
            Some((key.as_bytes(), hash_key(key.as_bytes())))
        );
        assert_eq!(plain.target, hash_key(key.as_bytes()));
        let over: Vec<_> = batch.records.iter().filter(|r| r.oversize).collect();
        assert_eq!(over.len(), 1);
        assert_eq!(batch.data_of(over[0]), [b'o'; 290]);
        assert_eq!(b.counts.oversize, 1);
        assert_eq!(batch.events, 4);
    }

    #[test]
    fn aggregates_fill_whole_payload_units() {
        let f = RecordFraming {
            shape: RecordShape::Aggregated,
            ..RecordFraming::KINESIS
        };
        let (mut b, c) = records(f);
        b.set_shards(four_shards());
        let line = [b'x'; 200];
        for _ in 0..60_000 {
            event(&mut b, &line, None);
            // The ring holds 64 batches; keep it from filling.
            for batch in drain(&c) {
                let bytes = check_units(&batch);
                assert!(
                    bytes > (5 << 20) - KINESIS_PUT_UNIT,
                    "a full request: {bytes}"
                );
                b.recycle(batch);
            }
        }
        b.seal();
        drain(&c).iter().for_each(|b| {
            check_units(b);
        });

        /// Every aggregate but a batch's last wastes less than one inner record (208
        /// bytes) of its last payload unit; returns the request's bytes.
        fn check_units(batch: &Batch) -> usize {
            let mut bytes = 0;
            for (i, r) in batch.records.iter().enumerate() {
                let size = (r.end - r.start + r.key_end - r.key_start) as usize;
                bytes += size;
                let waste = size.div_ceil(KINESIS_PUT_UNIT) * KINESIS_PUT_UNIT - size;
                if i + 1 < batch.records.len() {
                    assert!(waste < 208, "record {i}: {size} B wastes {waste}");
                }
            }
            assert!(bytes <= 5 << 20);
            bytes
        }
    }

    #[test]
    fn compressed_aggregates_inflate_to_the_same_aggregate() {
        use std::io::Read;
        let f = RecordFraming {
            max_record: 1 << 20,
            shape: RecordShape::Aggregated,
            compression: Some(crate::decode::Codec::Zstd),
            ..RecordFraming::KINESIS
        };
        let (mut b, c) = records(f);
        let events: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("{{\"log\":\"line {i}\"}}\n").into_bytes())
            .collect();
        for e in &events {
            event(&mut b, e, None);
        }
        b.seal();
        let batch = drain(&c).pop().unwrap();
        assert_eq!(batch.records.len(), 1);
        let r = batch.records[0];
        let mut agg = vec![];
        zstd::stream::read::Decoder::new(batch.data_of(&r))
            .unwrap()
            .read_to_end(&mut agg)
            .unwrap();
        assert!(agg.len() > 3 * (r.end - r.start) as usize, "compressed");
        assert_eq!(deaggregate(&agg, batch.key_of(&r), r.hash), events);
    }
}
