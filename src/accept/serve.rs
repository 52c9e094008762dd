//! The per-core loop, the same on every I/O backend: one core's listeners, connections and
//! datagram sockets, the pump that moves its batches and completions, and the shutdown
//! order. A backend ([`Runtime`]) supplies only sockets, tasks and timers; everything
//! between the socket and the ring is the runtime-free code in `conn` and `shard`.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::CoreSockets;
use super::http::Job;
use crate::config::{Config, InputKind};
use crate::conn::{
    Conn, ForwardConn, ForwardLimits, FrameScratch, JsonConn, JsonSource, Link, Mem, Progress,
    Replay, ingest_datagram, ingest_http,
};
use crate::decode::jsonl::JsonParser;
use crate::limits::{HEARTBEAT_REPLY, JSON_PADDING, MAX_DATAGRAM};
use crate::metrics::Reporter;
use crate::shard::{CoreSink, Phase, Shard};
use crate::wal::{Commit, Journal, Next, SegId};

/// What an I/O backend gives the per-core loop: SO_REUSEPORT listeners, streams read and
/// written by polling, datagram sockets, local tasks and timers. Every call happens on
/// the core's own thread.
pub trait Runtime: 'static {
    type Listener: 'static;
    type Stream: 'static;
    type Datagram: 'static;
    type Task: 'static;

    /// A listener on `addr` that shares the port with the other cores' (SO_REUSEPORT).
    fn listen(addr: SocketAddr) -> io::Result<Self::Listener>;
    fn accept(l: &Self::Listener) -> impl Future<Output = io::Result<Self::Stream>>;
    /// Sets up an accepted stream (no Nagle) and says who the peer is.
    fn prepare(s: &Self::Stream) -> Option<SocketAddr>;
    fn poll_read(
        s: &mut Self::Stream,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>>;
    fn poll_write(
        s: &mut Self::Stream,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>>;
    fn flush(s: &mut Self::Stream) -> impl Future<Output = ()>;
    fn datagram(s: socket2::Socket) -> io::Result<Self::Datagram>;
    fn recv_from(
        s: &Self::Datagram,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>>;
    fn send_to(s: &Self::Datagram, buf: &[u8], to: SocketAddr) -> impl Future<Output = ()>;
    /// Spawns a task whose handle cancels it.
    fn spawn(f: impl Future<Output = ()> + 'static) -> Self::Task;
    /// Spawns a task that runs until it ends, or until the core does.
    fn spawn_detached(f: impl Future<Output = ()> + 'static);
    /// Cancels a task and waits until it is gone (its sockets closed).
    fn cancel(t: Self::Task) -> impl Future<Output = ()>;
    fn sleep(d: Duration) -> impl Future<Output = ()>;
    /// Lets the core's other tasks run if this one has had its share.
    fn yield_if_needed() -> impl Future<Output = ()>;

    /// A journal segment file, written at positions and synced.
    type File: 'static;
    /// Creates (or truncates) a file for writing.
    fn create(path: &Path) -> impl Future<Output = io::Result<Self::File>>;
    /// Writes all of `buf` at `pos`, then fdatasyncs.
    fn write_sync(f: &Self::File, buf: &[u8], pos: u64) -> impl Future<Output = io::Result<()>>;
}

/// Everything one core starts from.
pub struct CoreCtx {
    pub core: usize,
    pub cfg: Arc<Config>,
    pub sockets: CoreSockets,
    pub rings: Vec<CoreSink>,
    pub reporter: Reporter,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub ready: crossbeam_channel::Sender<Result<(), String>>,
    /// Requests of the HTTP inputs, for this core to route.
    pub http: tokio::sync::mpsc::Receiver<Job>,
    /// An earlier run's journal segments for this core to replay, oldest first.
    pub replay: Vec<std::path::PathBuf>,
}

type Shared = Rc<RefCell<Shard>>;

/// Runs one core until shutdown has run its course.
pub async fn run<R: Runtime>(ctx: CoreCtx) {
    let CoreCtx {
        core,
        cfg,
        sockets,
        rings,
        reporter,
        mut shutdown,
        ready,
        http,
        replay: segments,
    } = ctx;
    let shard: Shared = Rc::new(RefCell::new(Shard::new(core, &cfg, rings)));
    if let Some(w) = &cfg.wal {
        match Journal::new(core, cfg.engine.workers, w) {
            Ok(mut j) => {
                // An earlier run's segments are the first backlog.
                let mut bytes = 0;
                for path in &segments {
                    let len = std::fs::metadata(path).map_or(0, |m| m.len());
                    bytes += len;
                    j.adopt(path.clone(), len);
                }
                if !segments.is_empty() {
                    tracing::info!(
                        core,
                        segments = segments.len(),
                        bytes,
                        "Replaying the write-ahead log an earlier run left, before new input"
                    );
                }
                shard.borrow_mut().set_journal(j);
            }
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "wal.dir: core {core} cannot use {}: {e}",
                    w.dir.display()
                )));
                return;
            }
        }
    }
    let tasks = Tasks::default();
    let mut listeners = Vec::new();
    for (i, addr) in sockets.tcp {
        let input = &cfg.inputs[i];
        let listener = match R::listen(addr) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "inputs.{}.address: core {core} cannot listen on {addr}: {e}",
                    input.name
                )));
                return;
            }
        };
        listeners.push((i, listener));
    }
    let mut datagram_socks = Vec::new();
    for (i, sock) in sockets.udp {
        let sock = match R::datagram(sock) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "inputs.{}.address: core {core} cannot use its UDP socket: {e}",
                    cfg.inputs[i].name
                )));
                return;
            }
        };
        datagram_socks.push((i, sock));
    }
    let report_every = cfg.engine.stats_interval.min(Duration::from_secs(1));
    let pump = R::spawn(pump::<R>(
        shard.clone(),
        reporter.clone(),
        Shard::tick(&cfg),
        report_every,
    ));
    let journal_stop = Rc::new(Cell::new(false));
    let journal_done = Rc::new(Cell::new(cfg.wal.is_none()));
    let mut reader = None;
    if cfg.wal.is_some() {
        R::spawn_detached(journal::<R>(
            shard.clone(),
            journal_stop.clone(),
            journal_done.clone(),
        ));
        reader = Some(R::spawn(backlog::<R>(shard.clone(), cfg.clone())));
    }
    let mut inputs = Vec::new();
    for (i, listener) in listeners {
        let input = &cfg.inputs[i];
        let limit = input.max_connections.div_ceil(cfg.engine.workers);
        inputs.push(R::spawn(accept::<R>(
            listener,
            i,
            input.kind.clone(),
            limit,
            shard.clone(),
            tasks.clone(),
        )));
    }
    for (i, sock) in datagram_socks {
        let source = match Proto::of(i, &cfg.inputs[i].kind) {
            Proto::Json { source, .. } => Some(source),
            Proto::Forward(_) => None,
        };
        inputs.push(R::spawn(datagrams::<R>(sock, i, source, shard.clone())));
    }
    inputs.push(R::spawn(http_jobs::<R>(http, shard.clone())));
    let _ = ready.send(Ok(()));

    let _ = shutdown.wait_for(|stop| *stop).await;

    // The documented order: stop accepting, read open connections for the input grace,
    // seal everything, drain until the deadline, write the final acks, leave. The whole
    // of it fits in drain_timeout from the signal, final acks and counters included.
    let deadline = Instant::now() + cfg.engine.drain_timeout.saturating_sub(FINAL_MARGIN);
    for t in inputs {
        R::cancel(t).await;
    }
    let grace_end = (Instant::now() + cfg.engine.input_grace).min(deadline);
    while Instant::now() < grace_end && shard.borrow().connections() > 0 {
        R::sleep(Duration::from_millis(10)).await;
    }
    shard.borrow_mut().set_phase(Phase::Draining);
    shard.borrow_mut().seal_all();
    while Instant::now() < deadline && !shard.borrow().idle() {
        R::sleep(Duration::from_millis(10)).await;
    }
    if !shard.borrow().idle() {
        let (batches, events, chunks) = shard.borrow().unsettled();
        shard.borrow_mut().counters.events_undelivered = events;
        if cfg.wal.is_some() {
            tracing::warn!(
                core,
                events,
                batches,
                chunks,
                "Drain deadline reached: {events} events read here (counted once per sink) are not confirmed delivered; they stay in the write-ahead log and are sent at the next start"
            );
        } else {
            tracing::error!(
                core,
                events,
                batches,
                chunks,
                "Drain deadline reached: {events} events read here (counted once per sink) are not confirmed delivered. Senders that use acks send their {chunks} unacked chunks again; events from other senders are lost"
            );
        }
    }
    shard.borrow_mut().set_phase(Phase::Closing);
    if let Some(r) = reader {
        R::cancel(r).await;
    }
    // Every connection now writes what acks it has and ends.
    while tasks.0.get() > 0 {
        R::sleep(Duration::from_millis(1)).await;
    }
    // The last group commit, then the settled segments go.
    journal_stop.set(true);
    let last = Instant::now() + FINAL_MARGIN / 2;
    while !journal_done.get() && Instant::now() < last {
        R::sleep(Duration::from_millis(1)).await;
    }
    if let Some(j) = shard.borrow_mut().journal() {
        j.close();
    }
    R::cancel(pump).await;
    shard.borrow().report(&reporter);
}

/// The core's group commits: every `sync_interval`, or once `sync_bytes` are pending, the
/// pending entries are written and synced, and the durable chunks among them acked.
/// Ends, after a last commit, once `stop` is set.
async fn journal<R: Runtime>(shard: Shared, stop: Rc<Cell<bool>>, done: Rc<Cell<bool>>) {
    let interval = match shard.borrow_mut().journal() {
        Some(j) => j.sync_interval(),
        None => return done.set(true),
    };
    let mut file: Option<(SegId, R::File)> = None;
    loop {
        let due = shard
            .borrow_mut()
            .journal()
            .and_then(|j| j.until_due(Instant::now()));
        match due {
            None if stop.get() => break,
            None => {
                R::sleep(interval.min(Duration::from_millis(10))).await;
                continue;
            }
            Some(d) if !d.is_zero() && !stop.get() => {
                futures_lite::future::or(
                    R::sleep(d),
                    poll_fn(|cx| match shard.borrow_mut().journal() {
                        Some(j) => j.poll_bytes(cx),
                        None => Poll::Ready(()),
                    }),
                )
                .await;
                continue;
            }
            Some(_) => {}
        }
        let Some(commit) = shard.borrow_mut().journal().and_then(Journal::take_commit) else {
            continue;
        };
        while let Err(e) = write_commit::<R>(&commit, &mut file).await {
            {
                let mut s = shard.borrow_mut();
                let core = s.core;
                if let Some(j) = s.journal() {
                    j.counts.write_errors += 1;
                }
                tracing::error!(core, error = %e, "Writing the write-ahead log failed; retrying in 1s (durable acks wait)");
            }
            file = None;
            R::sleep(Duration::from_secs(1)).await;
        }
        let mut s = shard.borrow_mut();
        if let Some(upto) = s.journal().map(|j| j.committed(&commit)) {
            s.synced(upto);
        }
    }
    done.set(true);
}

/// Writes and syncs each piece of a commit, opening segment files as they begin.
async fn write_commit<R: Runtime>(
    c: &Commit,
    file: &mut Option<(SegId, R::File)>,
) -> io::Result<()> {
    for p in &c.pieces {
        if file.as_ref().map(|f| f.0) != Some(p.seg) {
            let f = R::create(&p.path).await?;
            // The new file's name must survive a power cut as well as its data.
            if let Some(dir) = p.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            *file = Some((p.seg, f));
        }
        let (_, f) = file.as_ref().expect("just opened");
        R::write_sync(f, &p.buf, p.pos).await?;
    }
    Ok(())
}

/// The backlog reader: ingests what the journal holds but batches have not taken — an
/// earlier run's segments, then what was journaled while batches were held — in order,
/// as batches free up.
async fn backlog<R: Runtime>(shard: Shared, cfg: Arc<Config>) {
    let mut r = Replay::new(&cfg);
    let core = shard.borrow().core;
    let interval = cfg
        .wal
        .as_ref()
        .map_or(Duration::from_millis(20), |w| w.sync_interval);
    loop {
        wait_while(r.link(), &shard, Shard::reader_blocked).await;
        let next = match shard.borrow_mut().journal() {
            Some(j) => j.backlog_next(),
            None => return,
        };
        let (seg, path, from, to, bytes, adopted) = match next {
            Next::Idle => {
                R::sleep(interval.min(Duration::from_millis(10))).await;
                continue;
            }
            Next::WaitCommit => {
                R::sleep(Duration::from_millis(1)).await;
                continue;
            }
            Next::Read {
                seg,
                path,
                from,
                to,
                bytes,
                adopted,
            } => {
                if adopted && from == 0 {
                    tracing::info!(core, path = %path.display(), bytes = to, "Replaying a write-ahead log segment");
                }
                (seg, path, from, to, bytes, adopted)
            }
        };
        let buf = match bytes {
            Some(b) => b,
            None => match read_at(&path, from, to) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(core, path = %path.display(), error = %e, "Cannot read the write-ahead log back; retrying in 1s");
                    R::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        r.load(buf, from, seg, path, adopted);
        loop {
            let progress = r.process(&mut shard.borrow_mut());
            match progress {
                Progress::Read => break,
                Progress::Blocked => wait_while(r.link(), &shard, Shard::reader_blocked).await,
                _ => R::yield_if_needed().await,
            }
        }
        if let Some(j) = shard.borrow_mut().journal() {
            j.backlog_done(seg, to);
        }
    }
}

/// Reads `from..to` of a segment. These are bytes the core wrote moments ago, so they come
/// from the page cache; a plain pread on the core is cheaper than a hand-off.
fn read_at(path: &Path, from: u64, to: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0; (to - from) as usize];
    f.read_exact_at(&mut buf, from)?;
    Ok(buf)
}

/// What the drain leaves of drain_timeout for the final acks, the sinks' last answers
/// and the final counters.
const FINAL_MARGIN: Duration = Duration::from_millis(1500);

/// How often connections are checked against their timeouts.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Moves batches and completions, seals lingering batches, closes timed-out connections,
/// and reports counters.
async fn pump<R: Runtime>(
    shard: Shared,
    reporter: Reporter,
    tick: Duration,
    report_every: Duration,
) {
    let mut next_report = Instant::now() + report_every;
    let mut next_sweep = Instant::now() + SWEEP_EVERY;
    loop {
        // The pump does its work whenever a ring wakes it; the timer bounds linger.
        futures_lite::future::or(
            poll_fn(|cx| {
                shard.borrow_mut().poll_pump(cx);
                Poll::<()>::Pending
            }),
            R::sleep(tick),
        )
        .await;
        let now = Instant::now();
        shard.borrow_mut().seal_due(now);
        if now >= next_sweep {
            shard.borrow_mut().sweep(now);
            next_sweep = now + SWEEP_EVERY;
        }
        if now >= next_report {
            shard.borrow().report(&reporter);
            next_report = now + report_every;
        }
    }
}

/// How an input's connections speak, fixed when its listener starts.
enum Proto {
    Forward(ForwardLimits),
    Json {
        max_line: usize,
        source: Rc<JsonSource>,
    },
}

impl Proto {
    fn of(input: usize, kind: &InputKind) -> Proto {
        match kind {
            InputKind::Forward {
                max_frame_bytes,
                max_decompressed_bytes,
                max_unacked_bytes,
                max_events_per_frame,
                ..
            } => Proto::Forward(ForwardLimits {
                max_frame: *max_frame_bytes,
                max_inflated: *max_decompressed_bytes,
                max_unacked: *max_unacked_bytes,
                max_events: *max_events_per_frame,
            }),
            InputKind::JsonLines {
                max_line_bytes,
                tag,
                tag_key,
                ..
            } => Proto::Json {
                max_line: *max_line_bytes,
                source: Rc::new(JsonSource {
                    input,
                    tag: tag.clone(),
                    tag_key: tag_key.clone(),
                }),
            },
            // `accept::bind` gives HTTP inputs to the HTTP thread, never to a core.
            InputKind::Http { .. } => unreachable!("an HTTP input on a core"),
        }
    }
}

/// Counts a core's connection tasks, so that shutdown can wait for them.
#[derive(Clone, Default)]
struct Tasks(Rc<Cell<usize>>);

/// Held by a connection task; dropped when it ends or is cancelled.
struct TaskGuard(Tasks);

impl Tasks {
    fn enter(&self) -> TaskGuard {
        self.0.set(self.0.get() + 1);
        TaskGuard(self.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let n = &(self.0).0;
        n.set(n.get() - 1);
    }
}

async fn accept<R: Runtime>(
    listener: R::Listener,
    input: usize,
    kind: InputKind,
    limit: usize,
    shard: Shared,
    tasks: Tasks,
) {
    let proto = Proto::of(input, &kind);
    let budget = shard.borrow().budget().clone();
    let mem = Mem::new(budget.clone());
    let scratch = Rc::new(RefCell::new(FrameScratch::new(budget)));
    let open = Rc::new(Cell::new(0usize));
    loop {
        let stream = match R::accept(&listener).await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or similar: say so, back off, and go on.
                shard.borrow_mut().accept_failed(&e);
                R::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A full input makes room by closing its longest idle connection, if it has one.
        if open.get() >= limit && !shard.borrow_mut().replace_idle(input) {
            shard.borrow_mut().refused_connection(limit);
            continue;
        }
        open.set(open.get() + 1);
        let (shard, open, guard) = (shard.clone(), open.clone(), tasks.enter());
        match &proto {
            Proto::Forward(limits) => {
                let conn = ForwardConn::new(*limits, scratch.clone(), mem.clone());
                R::spawn_detached(async move {
                    serve::<R, _>(stream, input, conn, &shard).await;
                    open.set(open.get() - 1);
                    drop(guard);
                });
            }
            Proto::Json { max_line, source } => {
                let conn = JsonConn::new(*max_line, source.clone(), mem.clone());
                R::spawn_detached(async move {
                    serve::<R, _>(stream, input, conn, &shard).await;
                    open.set(open.get() - 1);
                    drop(guard);
                });
            }
        }
    }
}

/// What woke a connection.
enum Wake {
    Read(usize),
    Unblocked,
    Stop,
    /// Closed to give its memory to others.
    Evicted,
    Failed(std::io::Error),
}

/// What a connection waits for besides input.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Input,
    /// The shard to take input again.
    Unblocked,
    /// Peers' memory to be given back.
    Memory,
}

/// How long a connection closed for bad input or for memory may wait to write the acks
/// it owes for its earlier frames.
const OWED_ACKS: Duration = Duration::from_secs(10);

/// Serves one connection until the peer leaves, the input turns out broken, or shutdown.
async fn serve<R: Runtime, C: Conn>(
    mut stream: R::Stream,
    input: usize,
    mut conn: C,
    shard: &Shared,
) {
    let link = conn.link().clone();
    link.peer.set(R::prepare(&stream));
    link.input.set(input);
    link.heard.set(Some(Instant::now()));
    shard.borrow_mut().open_link(&link);
    let mut taken = 0;
    loop {
        // Acks the peer does not read stop the processing that makes them, not only the
        // reads: whatever brought the input in, unwritten acks stay within the bound.
        let mut waited = Want::Input;
        let wake = if link.pending_acks() > MAX_PENDING_ACKS {
            poll_fn(|cx| poll_drain_acks::<R>(cx, &mut stream, &link, shard)).await
        } else {
            let progress = conn.process(&mut shard.borrow_mut());
            // The frame clock restarts with each new unfinished frame or line.
            let (unread, now_taken) = conn.unread();
            if unread == 0 {
                link.started.set(None);
            } else if now_taken != taken || link.started.get().is_none() {
                link.started.set(Some(Instant::now()));
            }
            taken = now_taken;
            let want = match progress {
                Progress::Close(e) => {
                    shard
                        .borrow_mut()
                        .refused(e, "Closing a connection", link.peer.get());
                    // The acks owed for the good frames before it go out first.
                    conn.discard();
                    link.held.set(0);
                    owe_acks::<R>(&mut stream, &link, shard).await;
                    break;
                }
                Progress::Yield => {
                    R::yield_if_needed().await;
                    continue;
                }
                Progress::Turn => {
                    futures_lite::future::yield_now().await;
                    continue;
                }
                Progress::Memory => {
                    shard.borrow_mut().wait_memory(&link);
                    Want::Memory
                }
                Progress::Read if link.outstanding() > 0 => {
                    shard.borrow_mut().seal_for_acks(&link);
                    Want::Input
                }
                Progress::Read => Want::Input,
                Progress::Blocked => Want::Unblocked,
            };
            waited = want;
            poll_fn(|cx| poll_conn::<R, _>(cx, &mut stream, &mut conn, &link, shard, want)).await
        };
        match wake {
            Wake::Read(0) => {
                conn.finish(&mut shard.borrow_mut());
                settle_acks::<R>(&mut stream, &link, shard).await;
                break;
            }
            Wake::Read(n) => {
                conn.filled(n);
                link.held.set(conn.held());
                link.heard.set(Some(Instant::now()));
                shard.borrow_mut().read(input, n);
            }
            Wake::Evicted => {
                conn.abandon(&mut shard.borrow_mut());
                conn.discard();
                link.held.set(0);
                owe_acks::<R>(&mut stream, &link, shard).await;
                break;
            }
            Wake::Unblocked => {
                // Time held back by the core is not the peer's.
                if waited == Want::Unblocked {
                    let now = Instant::now();
                    link.heard.set(Some(now));
                    if link.started.get().is_some() {
                        link.started.set(Some(now));
                    }
                }
            }
            Wake::Stop => {
                // A frame paused half-way is given up (and not acked) before waiting on
                // the acks of the rest.
                conn.abandon(&mut shard.borrow_mut());
                settle_acks::<R>(&mut stream, &link, shard).await;
                break;
            }
            Wake::Failed(e) => {
                tracing::debug!(error = %e, "Connection failed");
                break;
            }
        }
    }
    let mut s = shard.borrow_mut();
    conn.abandon(&mut s);
    s.close_link(&link);
}

/// Writes pending acks, then waits for input, for the shard to unblock, or for shutdown.
fn poll_conn<R: Runtime, C: Conn>(
    cx: &mut Context<'_>,
    stream: &mut R::Stream,
    conn: &mut C,
    link: &Rc<Link>,
    shard: &Shared,
    want: Want,
) -> Poll<Wake> {
    link.set_waker(cx.waker());
    link.reading.set(false);
    if let Err(e) = poll_write_acks::<R>(cx, stream, link) {
        return Poll::Ready(Wake::Failed(e));
    }
    let mut s = shard.borrow_mut();
    if s.phase != Phase::Running {
        return Poll::Ready(Wake::Stop);
    }
    if link.evicted.get() {
        return Poll::Ready(Wake::Evicted);
    }
    if s.blocked_for(link) {
        s.park(link);
        return Poll::Pending;
    }
    match want {
        Want::Unblocked => return Poll::Ready(Wake::Unblocked),
        // Waiting for memory counts against frame_timeout: a stalled frame is closed.
        Want::Memory if link.memory_wait.get() => {
            link.reading.set(true);
            return Poll::Pending;
        }
        Want::Memory => return Poll::Ready(Wake::Unblocked),
        Want::Input => {}
    }
    // A peer that does not read its acks stops being read; the pending write wakes us.
    if link.pending_acks() > MAX_PENDING_ACKS {
        return Poll::Pending;
    }
    // Nor is a peer with max_unacked_bytes outstanding; its next ack wakes us.
    if !conn.may_read() {
        return Poll::Pending;
    }
    let buf = conn.read_buf();
    if buf.is_empty() {
        // Peers' memory is spent: wait for some to be given back.
        s.wait_memory(link);
        link.reading.set(true);
        return Poll::Pending;
    }
    drop(s);
    match R::poll_read(stream, cx, buf) {
        Poll::Ready(Ok(n)) => Poll::Ready(Wake::Read(n)),
        Poll::Ready(Err(e)) => Poll::Ready(Wake::Failed(e)),
        Poll::Pending => {
            // Neither backend keeps a hold on the buffer while it waits for readiness,
            // so an idle connection gives its buffer back.
            conn.idle();
            link.held.set(conn.held());
            link.reading.set(true);
            Poll::Pending
        }
    }
}

/// Writes the acks a connection owes before it is closed, for a while at most.
async fn owe_acks<R: Runtime>(stream: &mut R::Stream, link: &Rc<Link>, shard: &Shared) {
    futures_lite::future::or(settle_acks::<R>(stream, link, shard), R::sleep(OWED_ACKS)).await;
}

/// Unwritten ack bytes at which a connection stops being read and processed.
const MAX_PENDING_ACKS: usize = 64 << 10;

/// Writes pending acks until they are back within the bound (`Unblocked`), or shutdown.
fn poll_drain_acks<R: Runtime>(
    cx: &mut Context<'_>,
    stream: &mut R::Stream,
    link: &Rc<Link>,
    shard: &Shared,
) -> Poll<Wake> {
    link.set_waker(cx.waker());
    if let Err(e) = poll_write_acks::<R>(cx, stream, link) {
        return Poll::Ready(Wake::Failed(e));
    }
    if shard.borrow().phase != Phase::Running {
        return Poll::Ready(Wake::Stop);
    }
    if link.pending_acks() > MAX_PENDING_ACKS {
        return Poll::Pending;
    }
    Poll::Ready(Wake::Unblocked)
}

/// Writes as many pending ack bytes as the socket takes now.
fn poll_write_acks<R: Runtime>(
    cx: &mut Context<'_>,
    stream: &mut R::Stream,
    link: &Link,
) -> std::io::Result<()> {
    while link.has_acks() {
        let r = link.write_acks(|b| match R::poll_write(stream, cx, b) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(0),
        })?;
        if r == 0 {
            break;
        }
    }
    Ok(())
}

/// After the peer's end of input or at shutdown: waits until every chunk of this
/// connection is acked (or the core is out of time) and writes the acks.
async fn settle_acks<R: Runtime>(stream: &mut R::Stream, link: &Rc<Link>, shard: &Shared) {
    poll_fn(|cx| {
        link.set_waker(cx.waker());
        if poll_write_acks::<R>(cx, stream, link).is_err() {
            return Poll::Ready(());
        }
        let settled = link.outstanding() == 0 && !link.has_acks();
        if settled || shard.borrow().phase == Phase::Closing {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
    R::flush(stream).await;
}

/// Reads one UDP socket: Forward heartbeats are answered; JSON lines are ingested, one
/// or more per datagram. Stops reading while the shard is blocked (the kernel then drops
/// datagrams, as UDP allows).
async fn datagrams<R: Runtime>(
    sock: R::Datagram,
    input: usize,
    source: Option<Rc<JsonSource>>,
    shard: Shared,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM + JSON_PADDING];
    let mut parser = JsonParser::default();
    let link = Rc::new(Link::default());
    link.input.set(input);
    loop {
        unblocked(&link, &shard).await;
        let (n, peer) = match R::recv_from(&sock, &mut buf[..MAX_DATAGRAM]).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "Receiving a datagram failed");
                R::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match &source {
            None => {
                shard.borrow_mut().counters.heartbeats += 1;
                R::send_to(&sock, HEARTBEAT_REPLY, peer).await;
            }
            Some(source) => {
                let mut s = shard.borrow_mut();
                s.read(input, n);
                ingest_datagram(&mut s, &mut parser, &mut buf, n, &link, source, peer);
            }
        }
    }
}

/// Waits until the shard takes input from `link` again.
async fn unblocked(link: &Rc<Link>, shard: &Shared) {
    wait_while(link, shard, Shard::blocked_for).await
}

/// Waits, parked, while `blocked` says so.
async fn wait_while(link: &Rc<Link>, shard: &Shared, blocked: fn(&Shard, &Rc<Link>) -> bool) {
    poll_fn(|cx| {
        link.set_waker(cx.waker());
        let mut s = shard.borrow_mut();
        if blocked(&s, link) {
            s.park(link);
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
}

/// Routes the HTTP inputs' requests that the HTTP thread hands this core, one at a time,
/// waiting while the shard is blocked (the HTTP thread, and its client, wait with it).
/// With a write-ahead log, a request is answered once its entry is synced, as a durable
/// ack is, while the next one is routed.
async fn http_jobs<R: Runtime>(mut jobs: tokio::sync::mpsc::Receiver<Job>, shard: Shared) {
    let mut parser = JsonParser::default();
    let link = Rc::new(Link::default());
    while let Some(mut job) = jobs.recv().await {
        link.input.set(job.input);
        unblocked(&link, &shard).await;
        let (r, serial) = ingest_http(
            &mut shard.borrow_mut(),
            &mut parser,
            job.input,
            &mut job.ingest,
        );
        match serial {
            Some(serial) if r.is_ok() => {
                let shard = shard.clone();
                R::spawn_detached(async move {
                    while shard.borrow().durable_upto() < serial {
                        R::sleep(Duration::from_millis(2)).await;
                    }
                    let _ = job.reply.send(r);
                });
            }
            _ => {
                let _ = job.reply.send(r);
            }
        }
    }
}
