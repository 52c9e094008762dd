//! One core's pipeline between its sockets and its rings: routing, encoding into batches,
//! the ack ledger, completions, backpressure and counters. It is single-threaded and knows
//! no runtime; the I/O loops drive it.

use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::collections::VecDeque;
use std::sync::Arc;

use crate::ack::{AckLedger, Settled, Ticket};
use crate::wal::{Journal, Kind, SegId};

use crate::batch::records::Framing;
use crate::batch::shape::{Encoded, Out, Shape, msgpack_field};
use crate::batch::{Batch, Batcher};
use crate::budget::Budget;
use crate::config::{AckPolicy, Config, InputKind};
use crate::conn::Link;
use crate::decode::forward::{Event, Events, Frame};
use crate::decode::http::Payload;
use crate::decode::jsonl::Object;
use crate::decode::{DecodeError, EventTime};
use crate::emit::Delivered;
use crate::metrics::{CoreCounters, ErrorCounts, InputCounters, Report, Reporter};
use crate::ring::{Consumer, Producer};
use crate::route::Router;
use crate::shards::ShardMap;

/// A route as one core runs it.
struct RouteOut {
    shape: Shape,
    sinks: Box<[usize]>,
}

/// One sink as a core sees it: its rings, how its batches are shaped, and, for Kinesis,
/// the shard maps the emitter learns.
pub struct CoreSink {
    pub batches: Producer<Batch>,
    pub done: Consumer<Delivered>,
    pub framing: Framing,
    /// The field partition keys come from, if any.
    pub key_field: Option<Box<str>>,
    /// Shard map updates (the current map arrives first).
    pub shards: Option<crossbeam_channel::Receiver<Arc<ShardMap>>>,
    pub budget: Arc<Budget>,
}

impl CoreSink {
    /// A sink whose batches are plain streams of events.
    pub fn stream(
        batches: Producer<Batch>,
        done: Consumer<Delivered>,
        budget: Arc<Budget>,
    ) -> Self {
        CoreSink {
            batches,
            done,
            framing: Framing::Stream,
            key_field: None,
            shards: None,
            budget,
        }
    }
}

/// How far [`Shard::ingest_forward`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    All,
    /// It took this many events, then found a sink's batches held.
    Paused(u64),
}

/// Where the core is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Shutting down: connections stop reading and wait for their acks.
    Draining,
    /// Out of time or done: connections write what acks they have and close.
    Closing,
}

/// One core's pipeline state.
pub struct Shard {
    pub core: usize,
    router: Router,
    routes: Vec<RouteOut>,
    batchers: Vec<Batcher>,
    done: Vec<Consumer<Delivered>>,
    /// Per sink: the partition key field, and shard map updates.
    key_fields: Vec<Option<Box<str>>>,
    shard_feeds: Vec<Option<crossbeam_channel::Receiver<Arc<ShardMap>>>>,
    ledger: AckLedger,
    pub counters: CoreCounters,
    pub errors: ErrorCounts,
    /// Connections waiting for the shard to unblock.
    parked: Vec<Rc<Link>>,
    wake_turn: usize,
    /// The memory budget, whose peers' share the connections' buffers come from.
    budget: Arc<Budget>,
    /// Connections waiting for peers' memory to be given back, and the release count
    /// last seen.
    memory_waits: Vec<Rc<Link>>,
    releases_seen: usize,
    /// By input: its idle and frame timeouts.
    timeouts: Vec<(Duration, Duration)>,
    /// Every open connection, to wake when the phase changes.
    links: Vec<Rc<Link>>,
    pub phase: Phase,
    /// The pump task, woken when a connection finds the shard blocked.
    pump: Option<std::task::Waker>,
    /// The pump last found batches held, so parked connections wait on it.
    pump_blocked: bool,
    /// The Forward connection paused in the middle of a frame, if any.
    mid_frame: Option<Rc<Link>>,
    warn: Warnings,
    /// Counters by input, indexed as the config's inputs; the core totals of these fields
    /// are their sums (see [`Shard::totals`]), not counted twice.
    per_input: Vec<InputCounters>,
    /// Events each route took, indexed as the config's routes.
    route_events: Vec<u64>,
    /// The write-ahead log, if there is one.
    journal: Option<Journal>,
    /// By input: its name (for journal entries), and whether everything it reads is
    /// journaled (JSON lines, and Forward acked `durable`), so that a backlog may take it.
    inputs: Vec<(Box<str>, bool)>,
    /// Durable chunks waiting for their group commit.
    durable_waits: VecDeque<DurableWait>,
    /// Events this run put in the backlog and has not read back yet.
    backlog_events: u64,
    /// The input of the JSON-lines entry being diverted, whose lines count as read.
    diverting_lines: Option<usize>,
    /// What the backlog reader is ingesting: `Some(adopted)` (an earlier run's entries,
    /// or this run's) while it does. Its events were counted when they were read.
    pub replaying: Option<bool>,
}

/// A chunk to ack once the group commit holding its entry ends.
struct DurableWait {
    serial: u64,
    ticket: Ticket,
    generation: u32,
    /// The chunk went to the backlog: its ticket has no other hold to wait for.
    release: bool,
}

impl Shard {
    pub fn new(core: usize, cfg: &Config, rings: Vec<CoreSink>) -> Self {
        let router = Router::of(&cfg.routes);
        let routes = cfg
            .routes
            .iter()
            .map(|r| RouteOut {
                shape: Shape::new(&r.shape),
                sinks: r.sinks.clone().into_boxed_slice(),
            })
            .collect();
        let budget = rings
            .first()
            .map_or_else(Budget::unlimited, |r| r.budget.clone());
        let mut batchers = Vec::new();
        let mut done = Vec::new();
        let mut key_fields = Vec::new();
        let mut shard_feeds = Vec::new();
        for (r, s) in rings.into_iter().zip(&cfg.sinks) {
            let mut b = Batcher::new(core, s.batch, r.framing, r.batches, r.budget);
            // The current shard map is already in the feed.
            if let Some(feed) = &r.shards {
                while let Ok(map) = feed.try_recv() {
                    b.set_shards(map);
                }
            }
            batchers.push(b);
            done.push(r.done);
            key_fields.push(r.key_field);
            shard_feeds.push(r.shards);
        }
        Shard {
            core,
            router,
            routes,
            batchers,
            done,
            key_fields,
            shard_feeds,
            ledger: AckLedger::new(budget.clone()),
            counters: CoreCounters::default(),
            errors: [0; DecodeError::NAMES.len()],
            parked: Vec::new(),
            wake_turn: 0,
            budget,
            memory_waits: Vec::new(),
            releases_seen: 0,
            timeouts: cfg
                .inputs
                .iter()
                .map(|i| (i.idle_timeout, i.frame_timeout))
                .collect(),
            links: Vec::new(),
            phase: Phase::Running,
            pump: None,
            pump_blocked: false,
            mid_frame: None,
            warn: Warnings::default(),
            per_input: vec![InputCounters::default(); cfg.inputs.len()],
            route_events: vec![0; cfg.routes.len()],
            journal: None,
            inputs: cfg
                .inputs
                .iter()
                .map(|i| {
                    let journaled = cfg.wal.is_some()
                        && matches!(
                            i.kind,
                            InputKind::JsonLines { .. }
                                | InputKind::Forward {
                                    ack: AckPolicy::Durable,
                                    ..
                                }
                        );
                    (i.name.as_str().into(), journaled)
                })
                .collect(),
            durable_waits: VecDeque::new(),
            backlog_events: 0,
            diverting_lines: None,
            replaying: None,
        }
    }

    /// Journals what this core reads from now on.
    pub fn set_journal(&mut self, j: Journal) {
        self.journal = Some(j);
    }

    pub fn journal(&mut self) -> Option<&mut Journal> {
        self.journal.as_mut()
    }

    /// The index of the input called `name`, if the config still has it.
    pub fn input_named(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|(n, _)| &**n == name)
    }

    /// Starts ingesting a Forward frame (`raw`, as it came): counts it, journals it where
    /// that is what protects it, and opens its ticket, if it needs one, with the frame's
    /// own hold, which [`Shard::close_frame`] releases.
    ///
    /// A frame is journaled unless its chunk is acked `delivered`: then the client keeps
    /// it until the ack, and sends it again after a crash, so a journaled copy would only
    /// be a duplicate.
    pub fn open_frame(&mut self, frame: &Frame<'_>, link: &Rc<Link>, raw: &[u8]) -> Option<Ticket> {
        self.counters.frames_in += 1;
        let (name, durable) = &self.inputs[link.input.get()];
        let entry = match &mut self.journal {
            Some(j) if frame.chunk.is_none() || *durable => {
                Some(j.append(Kind::Forward, name, EventTime::now(), raw))
            }
            _ => None,
        };
        if frame.chunk.is_none() && entry.is_none() {
            return None;
        }
        let ack = frame.chunk.map(|c| (link, c));
        let t = self.ledger.open(ack, raw.len(), entry.map(|e| e.0));
        if let (Some((_, serial)), Some(_), true) = (entry, frame.chunk, *durable) {
            self.wait_durable(serial, t, false);
        }
        Some(t)
    }

    fn wait_durable(&mut self, serial: u64, ticket: Ticket, release: bool) {
        self.durable_waits.push_back(DurableWait {
            serial,
            ticket,
            generation: self.ledger.generation(ticket),
            release,
        });
    }

    /// Whether what `link` reads now goes to the backlog, journaled only: its input is
    /// journaled whole, and batches are held or a backlog is already waiting.
    pub fn diverts(&self, link: &Link) -> bool {
        self.inputs[link.input.get()].1 && self.diverting()
    }

    fn diverting(&self) -> bool {
        self.journal.as_ref().is_some_and(Journal::backlogged)
            || self.batchers.iter().any(Batcher::blocked)
    }

    /// Journals a validated Forward frame into the backlog, for the reader to ingest when
    /// batches free up; its chunk is acked when the entry is synced.
    pub fn divert_frame(&mut self, frame: &Frame<'_>, link: &Rc<Link>, raw: &[u8], events: u64) {
        self.counters.frames_in += 1;
        self.per_input[link.input.get()].events_in += events;
        self.backlog_events += events;
        let Some(j) = &mut self.journal else { return };
        j.start_backlog();
        let name = &self.inputs[link.input.get()].0;
        let (_, serial) = j.append(Kind::Forward, name, EventTime::now(), raw);
        if let Some(c) = frame.chunk {
            let t = self.ledger.open(Some((link, c)), raw.len(), None);
            self.wait_durable(serial, t, true);
        }
    }

    /// Starts a journal entry for JSON lines read on `input` at `time` (with a WAL):
    /// [`Shard::journal_line`] adds each line before it is parsed, and
    /// [`Shard::end_lines`] ends it. A `divert`ed entry goes to the backlog, its lines
    /// not ingested now; otherwise the ticket returned is for the lines' events.
    pub fn open_lines(&mut self, input: usize, time: EventTime, divert: bool) -> Option<Ticket> {
        let j = self.journal.as_mut()?;
        if divert {
            j.start_backlog();
            self.diverting_lines = Some(input);
        }
        let (seg, _) = j.begin(Kind::JsonLines, &self.inputs[input].0, time);
        (!divert).then(|| self.ledger.open(None, 0, Some(seg)))
    }

    /// Ends the JSON-lines entry [`Shard::open_lines`] started.
    pub fn end_lines(&mut self, ticket: Option<Ticket>) {
        self.diverting_lines = None;
        if let Some(j) = &mut self.journal {
            j.end();
        }
        if let Some(t) = ticket {
            self.settle(t);
        }
    }

    /// Journals an HTTP request's records (with a WAL) and opens the ticket for its events.
    /// Returns it with the entry's serial, which the reply waits to see synced.
    pub fn open_http(
        &mut self,
        input: usize,
        time: EventTime,
        payload: Payload,
        tag: &str,
        records: &[u8],
    ) -> Option<(Ticket, u64)> {
        let j = self.journal.as_mut()?;
        let (seg, serial) = j.begin(Kind::Http, &self.inputs[input].0, time);
        let mut head = Vec::with_capacity(3 + tag.len());
        crate::wal::entry::http_head(&mut head, payload, tag);
        j.extend(&head);
        j.extend(records);
        j.end();
        Some((self.ledger.open(None, 0, Some(seg)), serial))
    }

    /// The last journal serial a group commit made durable.
    pub fn durable_upto(&self) -> u64 {
        self.journal.as_ref().map_or(u64::MAX, Journal::synced)
    }

    /// Adds one line (without its newline) to the open JSON-lines entry.
    #[inline]
    pub fn journal_line(&mut self, line: &[u8]) {
        if let Some(j) = &mut self.journal {
            j.extend(line);
            j.extend(b"\n");
        }
        if let Some(input) = self.diverting_lines {
            self.per_input[input].events_in += 1;
            self.backlog_events += 1;
        }
    }

    /// Opens the ticket of an entry read back at start-up from segment `seg`.
    pub fn open_replayed(&mut self, seg: SegId) -> Ticket {
        if let Some(j) = &mut self.journal {
            j.hold(seg);
        }
        self.counters.wal_replayed += 1;
        self.ledger.open(None, 0, Some(seg))
    }

    /// A group commit ended: the durable chunks up to `upto` are acked, and connections
    /// that waited for the disk go on.
    pub fn synced(&mut self, upto: u64) {
        while let Some(w) = self.durable_waits.front() {
            if w.serial > upto {
                break;
            }
            let (t, generation, release) = (w.ticket, w.generation, w.release);
            self.durable_waits.pop_front();
            if self.ledger.durable(t, generation) {
                self.counters.acks_sent += 1;
            }
            if release {
                self.settle(t);
            }
        }
        if !self.blocked() {
            self.wake_parked();
        }
    }

    /// Wakes the parked connections, each time starting one further along: they run in
    /// the order woken, and the first ones fill what room there is, so no connection may
    /// always go first.
    fn wake_parked(&mut self) {
        if self.parked.len() > 1 {
            self.wake_turn = self.wake_turn.wrapping_add(1);
            let k = self.wake_turn % self.parked.len();
            self.parked.rotate_left(k);
        }
        for l in self.parked.drain(..) {
            l.parked.set(false);
            l.wake();
        }
    }

    /// Settles one hold of a ticket: an ack, a journal entry released, or neither.
    fn settle(&mut self, t: Ticket) {
        let Settled { acked, seg } = self.ledger.release(t);
        if acked {
            self.counters.acks_sent += 1;
        }
        if let (Some(seg), Some(j)) = (seg, &mut self.journal) {
            j.release(seg);
        }
    }

    /// Routes a frame's events and encodes them into their sinks' batches, until they run
    /// out or until a sink's batches are held: then it stops after that event, so a frame
    /// never queues more than one batch per sink beyond what the rings hold.
    pub fn ingest_forward(
        &mut self,
        input: usize,
        frame: &Frame<'_>,
        events: Events<'_>,
        ticket: Option<Ticket>,
    ) -> Ingested {
        self.ingest_msgpack(input, frame.tag, events, ticket)
    }

    /// Routes msgpack events (a Forward frame's, an HTTP request's) and encodes them into
    /// their sinks' batches, as [`Shard::ingest_forward`].
    pub fn ingest_msgpack<'a>(
        &mut self,
        input: usize,
        tag: &str,
        events: impl Iterator<Item = Event<'a>>,
        ticket: Option<Ticket>,
    ) -> Ingested {
        let Some(r) = self.router.route(tag) else {
            let n = events.count() as u64;
            self.count_in(input, None, n);
            self.unmatched(tag, n);
            return Ingested::All;
        };
        let route = &mut self.routes[r];
        let mut n = 0;
        for ev in events {
            n += 1;
            let mut held = false;
            for &s in route.sinks.iter() {
                let shape = &mut route.shape;
                let b = &mut self.batchers[s];
                let key = self.key_fields[s]
                    .as_deref()
                    .and_then(|f| msgpack_field(ev.record, f.as_bytes()));
                let w = b.write(ticket, |out| Out {
                    encoded: shape.encode_msgpack(out, tag, ev.time, ev.record),
                    key,
                });
                if let (true, Some(t)) = (w.new_hold, ticket) {
                    self.ledger.hold(t);
                }
                if w.encoded == Encoded::MissingLogKey {
                    self.counters.missing_log_key += 1;
                }
                held |= b.blocked();
            }
            if held {
                self.count_in(input, Some(r), n);
                return Ingested::Paused(n);
            }
        }
        self.count_in(input, Some(r), n);
        Ingested::All
    }

    /// Finishes a frame: releases its hold on its chunk, which is acked once the batches
    /// holding its events settle.
    pub fn close_frame(&mut self, ticket: Option<Ticket>) {
        if let Some(t) = ticket {
            self.settle(t);
        }
    }

    /// Gives up on a frame not wholly ingested (its connection went away): its chunk will
    /// not be acked, so the client sends it again.
    pub fn abandon_frame(&mut self, ticket: Option<Ticket>) {
        if let Some(t) = ticket {
            self.ledger.abandon(t);
        }
    }

    /// A connection paused in the middle of a frame. Until it finishes the frame, other
    /// connections of this core wait: the core's scratch holds that frame's entries.
    pub fn pause_frame(&mut self, link: &Rc<Link>) {
        self.mid_frame = Some(link.clone());
    }

    /// The paused frame is finished (or abandoned): the other connections may go on.
    pub fn end_pause(&mut self) {
        if self.mid_frame.take().is_some() {
            self.wake_parked();
        }
    }

    /// Routes one JSON-lines event and encodes it into its sinks' batches; `ticket` is
    /// its journal entry's, if it has one.
    pub fn ingest_json(
        &mut self,
        input: usize,
        tag: &str,
        time: EventTime,
        obj: Object<'_, '_>,
        ticket: Option<Ticket>,
    ) {
        let Some(r) = self.router.route(tag) else {
            self.count_in(input, None, 1);
            self.unmatched(tag, 1);
            return;
        };
        self.count_in(input, Some(r), 1);
        let route = &mut self.routes[r];
        for &s in route.sinks.iter() {
            let shape = &mut route.shape;
            let key = self.key_fields[s]
                .as_deref()
                .and_then(|f| crate::decode::jsonl::field_str(obj, f).map(str::as_bytes));
            let w = self.batchers[s].write(ticket, |out| Out {
                encoded: shape.encode_json(out, tag, time, obj),
                key,
            });
            if let (true, Some(t)) = (w.new_hold, ticket) {
                self.ledger.hold(t);
            }
            if w.encoded == Encoded::MissingLogKey {
                self.counters.missing_log_key += 1;
            }
        }
    }

    /// Counts `n` events in from `input`, taken by route `r` (or by none).
    #[inline]
    fn count_in(&mut self, input: usize, r: Option<usize>, n: u64) {
        match self.replaying {
            None => self.per_input[input].events_in += n,
            Some(false) => self.backlog_events = self.backlog_events.saturating_sub(n),
            Some(true) => {}
        }
        if let Some(r) = r {
            self.route_events[r] += n;
        }
    }

    /// Counts bytes read from `input`.
    #[inline]
    pub fn read(&mut self, input: usize, n: usize) {
        self.per_input[input].bytes_in += n as u64;
    }

    fn unmatched(&mut self, tag: &str, n: u64) {
        self.counters.events_unmatched += n;
        if let Some(suppressed) = self.warn.allow(Warn::Unmatched) {
            tracing::warn!(
                core = self.core,
                tag,
                events = n,
                suppressed,
                "No route matches the tag; events dropped"
            );
        }
    }

    /// Counts a connection refused at `max_connections`, with a rate-limited warning.
    pub fn refused_connection(&mut self, limit: usize) {
        self.counters.connections_refused += 1;
        if let Some(suppressed) = self.warn.allow(Warn::Connection) {
            tracing::warn!(
                limit,
                suppressed,
                core = self.core,
                "Refusing a connection: the input is at max_connections on this core"
            );
        }
    }

    /// Logs a failed accept (out of descriptors, say), at most once a second.
    pub fn accept_failed(&mut self, e: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.warn.allow(Warn::Accept) {
            tracing::warn!(error = %e, suppressed, core = self.core, "Accepting a connection failed");
        }
    }

    /// Counts refused input and logs it, at most once a second per kind of error.
    pub fn refused(&mut self, e: DecodeError, action: &str, peer: Option<std::net::SocketAddr>) {
        self.errors[e.index()] += 1;
        if let Some(suppressed) = self.warn.allow(Warn::Refused(e.index())) {
            let peer = peer.map(|p| p.to_string()).unwrap_or_default();
            tracing::warn!(
                kind = e.name(),
                peer,
                core = self.core,
                suppressed,
                "{action}: {e}"
            );
        }
    }

    /// Whether held batches mean connections must stop reading.
    #[inline]
    pub fn blocked(&self) -> bool {
        self.batchers.iter().any(Batcher::blocked)
            || self.journal.as_ref().is_some_and(Journal::blocks)
    }

    /// Whether this connection must wait: another connection is in the middle of a
    /// frame (which goes first); the journal is full or behind the disk; or, for an input
    /// the backlog cannot take, batches are held or a backlog waits.
    #[inline]
    pub fn blocked_for(&self, link: &Rc<Link>) -> bool {
        let journal = self.journal.as_ref();
        let waits = if self.inputs[link.input.get()].1 {
            journal.is_some_and(Journal::blocks)
        } else {
            self.blocked() || journal.is_some_and(Journal::backlogged)
        };
        waits || self.other_mid_frame(link)
    }

    fn other_mid_frame(&self, link: &Rc<Link>) -> bool {
        self.mid_frame
            .as_ref()
            .is_some_and(|l| !Rc::ptr_eq(l, link))
    }

    /// Whether the backlog reader must wait: batches are held, or a connection is in the
    /// middle of a frame. (A full journal does not stop it: it is what empties it.)
    pub fn reader_blocked(&self, link: &Rc<Link>) -> bool {
        self.batchers.iter().any(Batcher::blocked) || self.other_mid_frame(link)
    }

    /// Parks a connection until the shard unblocks.
    pub fn park(&mut self, link: &Rc<Link>) {
        if !link.parked.replace(true) {
            self.counters.backpressure_waits += 1;
            self.parked.push(link.clone());
            // The pump may not be waiting on the full ring yet. (A connection the journal
            // holds back is woken by a commit or a settled batch instead.)
            if self.batchers.iter().any(Batcher::blocked)
                && let Some(w) = &self.pump
            {
                w.wake_by_ref();
            }
        }
    }

    /// The memory budget the connections' buffers are charged to.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Parks a connection until peers' memory is given back. If the share is spent, the
    /// connection on this core holding the most (at least twice what this one holds, and
    /// more than a base buffer) is closed, so that a crowd of large unfinished frames
    /// cannot stall a peer that needs little.
    pub fn wait_memory(&mut self, link: &Rc<Link>) {
        if link.memory_wait.replace(true) {
            return;
        }
        self.counters.memory_waits += 1;
        self.memory_waits.push(link.clone());
        let least = (2 * link.held.get()).max(2 * crate::limits::READ_CHUNK + 1);
        let largest = self
            .links
            .iter()
            .filter(|l| !l.evicted.get() && !Rc::ptr_eq(l, link))
            .max_by_key(|l| l.held.get())
            .filter(|l| l.held.get() >= least)
            .cloned();
        if let Some(l) = largest {
            self.evict(&l, Warn::Memory);
        }
        if let Some(w) = &self.pump {
            w.wake_by_ref();
        }
    }

    /// Closes a connection (it notices when woken), counting and logging why.
    fn evict(&mut self, l: &Rc<Link>, why: Warn) {
        l.evicted.set(true);
        l.wake();
        let (counter, what) = match why {
            Warn::Memory => (
                &mut self.counters.connections_evicted,
                "Closing a connection: it holds the most of the input memory (half of engine.memory_limit), which is spent, while another connection waits for some",
            ),
            Warn::Idle => (
                &mut self.counters.connections_idle,
                "Closing a connection: nothing came for its input's idle_timeout",
            ),
            Warn::Slow => (
                &mut self.counters.connections_slow,
                "Closing a connection: a frame or line it began did not arrive whole within its input's frame_timeout",
            ),
            _ => (
                &mut self.counters.connections_replaced,
                "Closing the longest idle connection: its input is at max_connections on this core and a new one came",
            ),
        };
        *counter += 1;
        if let Some(suppressed) = self.warn.allow(why) {
            let peer = l.peer.get().map(|p| p.to_string()).unwrap_or_default();
            tracing::warn!(
                peer,
                held = l.held.get(),
                core = self.core,
                suppressed,
                "{what}"
            );
        }
    }

    /// Closes the connections whose peers went quiet for longer than their input's
    /// `idle_timeout`, or have sent part of a frame or line for longer than its
    /// `frame_timeout`. Only time spent waiting for the peer counts.
    pub fn sweep(&mut self, now: Instant) {
        let mut late = Vec::new();
        for l in &self.links {
            if l.evicted.get() || !l.reading.get() {
                continue;
            }
            let (idle, frame) = self.timeouts[l.input.get()];
            let over = |t: Option<Instant>, d| t.is_some_and(|t| now.duration_since(t) >= d);
            if over(l.started.get(), frame) {
                late.push((l.clone(), Warn::Slow));
            } else if l.started.get().is_none() && l.outstanding() == 0 && over(l.heard.get(), idle)
            {
                late.push((l.clone(), Warn::Idle));
            }
        }
        for (l, why) in late {
            self.evict(&l, why);
        }
    }

    /// At `max_connections`: closes the connection of `input` idle the longest, if one is
    /// idle (nothing unfinished, no ack owed). Says whether it did.
    pub fn replace_idle(&mut self, input: usize) -> bool {
        let idle = self
            .links
            .iter()
            .filter(|l| {
                l.input.get() == input
                    && l.reading.get()
                    && !l.evicted.get()
                    && l.started.get().is_none()
                    && l.outstanding() == 0
            })
            .min_by_key(|l| l.heard.get())
            .cloned();
        match idle {
            Some(l) => {
                self.evict(&l, Warn::Crowded);
                true
            }
            None => false,
        }
    }

    /// Wakes the connections waiting for peers' memory once some was given back.
    fn poll_memory(&mut self, cx: &mut Context<'_>) {
        if self.memory_waits.is_empty() {
            return;
        }
        if self
            .budget
            .poll_released(self.core, self.releases_seen, cx)
            .is_ready()
        {
            self.releases_seen = self.budget.releases();
            for l in self.memory_waits.drain(..) {
                l.memory_wait.set(false);
                l.wake();
            }
        }
    }

    /// Registers a new connection.
    pub fn open_link(&mut self, link: &Rc<Link>) {
        self.per_input[link.input.get()].connections_opened += 1;
        self.links.push(link.clone());
    }

    pub fn close_link(&mut self, link: &Rc<Link>) {
        self.per_input[link.input.get()].connections_closed += 1;
        self.links.retain(|l| !Rc::ptr_eq(l, link));
    }

    pub fn connections(&self) -> usize {
        self.links.len()
    }

    /// Moves to a later phase and wakes every connection to notice.
    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        for l in &self.links {
            l.wake();
        }
    }

    /// Takes back settled batches (acking their chunks), pushes held batches into rings
    /// with room, and wakes parked connections once nothing is held. Registers `cx` for
    /// whichever ring it waits on.
    pub fn poll_pump(&mut self, cx: &mut Context<'_>) {
        if !self.pump.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.pump = Some(cx.waker().clone());
        }
        self.poll_memory(cx);
        let mut settled = false;
        for s in 0..self.done.len() {
            while let Poll::Ready(Some(delivered)) = self.done[s].poll_pop(cx) {
                let batch = delivered.into_batch();
                settled = true;
                for &t in &batch.tickets {
                    self.settle(t);
                }
                self.batchers[s].recycle(batch);
            }
        }
        // Parked connections wake once batches flow again, or once something settled
        // (which may have made room in the journal); those the journal still holds back
        // park again. The backlog reader must wake even while the journal is full.
        let mut blocked = false;
        for b in &mut self.batchers {
            blocked |= b.poll_push(cx).is_pending();
        }
        if !blocked && (settled || std::mem::take(&mut self.pump_blocked)) {
            self.wake_parked();
        }
        self.pump_blocked |= blocked;
    }

    /// Seals batches that have lingered long enough, and takes in new shard maps.
    pub fn seal_due(&mut self, now: Instant) {
        for (b, feed) in self.batchers.iter_mut().zip(&self.shard_feeds) {
            if let Some(feed) = feed {
                while let Ok(map) = feed.try_recv() {
                    b.set_shards(map);
                }
            }
            b.seal_if_due(now);
        }
    }

    /// Seals the open batches that hold chunks still to be acked. A connection calls this
    /// when it has read everything and waits on acks: its sender is then most likely
    /// blocked on them, so lingering would only add latency.
    pub fn seal_for_acks(&mut self, link: &Link) {
        // Durable acks wait on the group commit, not on delivery.
        if self.inputs[link.input.get()].1 {
            return;
        }
        for b in &mut self.batchers {
            b.seal_if_acks_wait();
        }
    }

    /// Seals every open batch (at shutdown).
    pub fn seal_all(&mut self) {
        for b in &mut self.batchers {
            b.seal();
        }
    }

    /// How often the pump seals lingering batches: a quarter of the shortest linger.
    pub fn tick(cfg: &Config) -> Duration {
        let linger = cfg
            .sinks
            .iter()
            .map(|s| s.batch.linger)
            .min()
            .unwrap_or(Duration::from_millis(200));
        (linger / 4).clamp(Duration::from_millis(5), Duration::from_millis(100))
    }

    /// Batches not settled and chunks not acked, for the drain-deadline report.
    /// Batches not settled, their events (an event in two sinks' batches counts twice),
    /// and chunks not acked.
    pub fn unsettled(&self) -> (usize, u64, usize) {
        let (mut batches, mut events) = (0, self.backlog_events);
        for b in &self.batchers {
            let (n, e) = b.unsettled();
            batches += n;
            events += e;
        }
        (batches, events, self.ledger.outstanding())
    }

    /// Nothing open, held or in flight, no chunk waiting for its ack, and no backlog.
    pub fn idle(&self) -> bool {
        self.batchers.iter().all(Batcher::idle)
            && self.ledger.outstanding() == 0
            && !self.journal.as_ref().is_some_and(Journal::backlogged)
    }

    /// Sends this core's counters to the collector.
    /// The core's counters with what is kept elsewhere folded in: the per-input counts
    /// (the core totals are their sums) and the batchers' own.
    pub fn totals(&self) -> CoreCounters {
        let mut counters = self.counters;
        for i in &self.per_input {
            counters.events_in += i.events_in;
            counters.bytes_in += i.bytes_in;
            counters.connections_opened += i.connections_opened;
            counters.connections_closed += i.connections_closed;
        }
        for r in &self.routes {
            counters.ext_values_nulled += r.shape.nulled();
        }
        for b in &self.batchers {
            counters.events_oversize += b.counts.oversize;
            counters.partition_key_missing += b.counts.key_missing;
            let (ring, held) = b.queued();
            counters.ring_batches += ring as u64;
            counters.held_batches += held as u64;
        }
        if let Some(j) = &self.journal {
            let c = j.counts;
            counters.wal_entries = c.entries;
            counters.wal_bytes = c.bytes;
            counters.wal_commits = c.commits;
            counters.wal_damaged = c.damaged;
            counters.wal_dropped_bytes = c.dropped_bytes;
            counters.wal_write_errors = c.write_errors;
            counters.wal_live_bytes = j.size().1;
        }
        counters
    }

    pub fn report(&self, to: &Reporter) {
        let _ = to.send(Report::Core {
            core: self.core,
            counters: self.totals(),
            errors: self.errors,
            inputs: self.per_input.clone(),
            routes: self.route_events.clone(),
        });
    }
}

/// Kinds of warning that are rate-limited.
#[derive(Clone, Copy)]
enum Warn {
    Memory,
    Idle,
    Slow,
    Crowded,
    Unmatched,
    Connection,
    Accept,
    Refused(usize),
}

/// Allows each kind of warning once a second, counting what it suppressed.
#[derive(Default)]
struct Warnings {
    last: Vec<(Option<Instant>, u64)>,
}

const WARN_EVERY: Duration = Duration::from_secs(1);

impl Warnings {
    /// `Some(suppressed since the last one)` if this warning may be logged now.
    fn allow(&mut self, w: Warn) -> Option<u64> {
        let i = match w {
            Warn::Unmatched => 0,
            Warn::Connection => 1,
            Warn::Accept => 2,
            Warn::Memory => 3,
            Warn::Idle => 4,
            Warn::Slow => 5,
            Warn::Crowded => 6,
            Warn::Refused(k) => 7 + k,
        };
        if self.last.len() <= i {
            self.last.resize(i + 1, (None, 0));
        }
        let (last, suppressed) = &mut self.last[i];
        let now = Instant::now();
        match last {
            Some(t) if now.duration_since(*t) < WARN_EVERY => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Conn, ForwardConn, Progress};
    use crate::conn::{FrameScratch, Mem};
    use crate::ring::ring;
    use crate::test_frames::{Mode, Opts, Time, docker_record, frame};
    use std::cell::RefCell;

    /// A PackedForward frame of 1000 Docker events of about 200 B, with a chunk.
    fn docker_frame() -> Vec<u8> {
        let events: Vec<_> = (0..1000)
            .map(|i| {
                (
                    Time::FixExt8(1_700_000_000, i as u32),
                    docker_record(i, 200),
                )
            })
            .collect();
        let opts = Opts {
            chunk: Some("chunk-01"),
            ..Opts::default()
        };
        frame(Mode::PackedBin, "web", &events, opts)
    }

    /// A shard with one null sink (adding tag and time), the emitter's ends of its rings,
    /// and a Forward connection.
    fn setup() -> (Shard, Consumer<Batch>, Producer<Delivered>, ForwardConn) {
        let cfg = Config::parse(
            "[inputs.fwd]\ntype = \"forward\"\naddress = \"127.0.0.1:0\"\n\
             [sinks.out]\ntype = \"null\"\n[[routes]]\nmatch = \"**\"\nsinks = \"out\"\ntag_key = \"tag\"\ntime_key = \"time\"\n",
        )
        .unwrap();
        let (batches, batches_rx) = ring(4);
        let (done_tx, done) = ring(10);
        let shard = Shard::new(
            0,
            &cfg,
            vec![CoreSink::stream(batches, done, Budget::unlimited())],
        );
        let limits = crate::conn::ForwardLimits {
            max_frame: 64 << 20,
            max_inflated: 64 << 20,
            max_unacked: 64 << 20,
            max_events: u64::MAX,
        };
        let conn = ForwardConn::new(
            limits,
            Rc::new(RefCell::new(FrameScratch::new(Budget::unlimited()))),
            Mem::unlimited(),
        );
        (shard, batches_rx, done_tx, conn)
    }

    /// A peer that declares a 48 MiB frame and sends 8 bytes gets a buffer sized by what
    /// it sent, not by what it declared.
    #[test]
    fn a_declared_frame_grows_the_buffer_only_as_bytes_arrive() {
        let (mut shard, _batches, _done, mut conn) = setup();
        // ["t", bin32 of 48 MiB ...
        let head = [0x92, 0xa1, b't', 0xc6, 0x03, 0x00, 0x00, 0x00];
        conn.read_buf()[..8].copy_from_slice(&head);
        conn.filled(8);
        assert_eq!(conn.process(&mut shard), Progress::Read);
        let room = conn.read_buf().len();
        assert!(
            room <= 2 * crate::limits::READ_CHUNK,
            "{room} bytes of buffer for 8 received"
        );
    }

    /// The hot path from a connection's read buffer to a settled batch: decode, route,
    /// transcode into the batch, seal, ring, completion, ack. In steady state it must not
    /// allocate per event; what allocates is per frame or per batch at most.
    #[test]
    fn steady_state_allocates_nothing_per_event() {
        let (mut shard, batches_rx, done_tx, mut conn) = setup();
        let frame = docker_frame();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut run = |frames: usize| {
            for _ in 0..frames {
                // Fed in socket-sized pieces, as reads would arrive.
                let mut off = 0;
                while off < frame.len() {
                    let buf = conn.read_buf();
                    let n = buf.len().min(frame.len() - off);
                    buf[..n].copy_from_slice(&frame[off..off + n]);
                    conn.filled(n);
                    off += n;
                    assert_eq!(conn.process(&mut shard), Progress::Read);
                }
                // The emitter: take every sealed batch and hand it back settled.
                while let Some(b) = batches_rx.try_pop() {
                    assert!(done_tx.push(Delivered::by_test(b)).is_ok());
                }
                shard.poll_pump(&mut cx);
                // The connection writes its acks.
                conn.link().write_acks(|b| Ok::<_, ()>(b.len())).unwrap();
            }
        };
        run(30);
        let frames = 100;
        let info = allocation_counter::measure(|| run(frames));
        let events = frames as u64 * 1000;
        eprintln!(
            "{} allocations ({} bytes) for {events} events",
            info.count_total, info.bytes_total
        );
        assert_eq!(shard.totals().events_in, 130_000);
        assert!(
            shard.counters.acks_sent > 100,
            "acks flowed: {}",
            shard.counters.acks_sent
        );
        assert!(
            info.count_total <= frames as u64,
            "{} allocations for {events} events in {frames} frames",
            info.count_total
        );
    }
}
