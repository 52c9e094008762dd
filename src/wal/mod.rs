//! Journal stage: the write-ahead log of what was read, so that a crash or a kill loses
//! only what arrived in the last `sync_interval`.
//!
//! Each core journals the input it validated — whole Forward frames, the JSON lines of
//! each read, HTTP requests — before routing it, in segments of its own under `dir/core-N/`. An entry
//! stays live until every batch that took one of its events is settled (delivered or
//! dead-lettered); the ack ledger does that counting, as it does for chunks. A segment
//! whose entries are all settled is deleted. Entries are written in group commits: every
//! `sync_interval`, or sooner once `sync_bytes` are pending, one write and one fdatasync
//! per segment touched; `durable` acks go out when the commit holding their chunk ends.
//!
//! While a sink's batches are held (the service is slow or down), input is not parked:
//! it is journaled only, and acked `durable`, and the core's **backlog** is the log from
//! the first such entry on. A reader ingests the backlog in order as batches free up —
//! from the segment files, or from the pending buffer once it catches up — and new input
//! is ingested directly again only when the backlog is empty, so a core's order holds.
//! An earlier run's segments are the first backlog at start-up: replay and new input
//! share one order and one bound, `max_bytes`.
//!
//! This module is the bookkeeping, over no runtime: the core's journal task
//! (`accept::serve`) does the file I/O through the backend, and the backlog reader feeds
//! the entries read back through the same ingest path as a connection's.

pub mod entry;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::config::{Wal, WalFull};
use crate::decode::EventTime;
pub use entry::Kind;

/// A segment's place in its core's journal, carried by the ledger for each live entry.
pub type SegId = u32;

/// A segment takes new entries until it is this large (or a quarter of `max_bytes`)...
pub const SEGMENT_BYTES: u64 = 4 << 20;
/// ...or this old. An entry's bytes stay on disk until its whole segment is settled, and
/// after a crash a segment is replayed whole, so young segments bound what a crash sends
/// twice: about this long of input, plus what was not yet delivered.
pub const SEGMENT_AGE: Duration = Duration::from_millis(250);

struct Segment {
    id: SegId,
    path: PathBuf,
    /// Bytes given to it, written or pending.
    bytes: u64,
    /// Bytes written to its file.
    written: u64,
    /// Entries not yet settled.
    live: u32,
    /// Still taking entries, or still being replayed: not to be deleted yet.
    open: bool,
    /// Started by this run (not adopted for replay), so it may take entries.
    new: bool,
    started: Instant,
}

/// Entries bound for one segment file, from `pos`; a commit writes each piece, then syncs.
pub struct Piece {
    pub seg: SegId,
    pub path: PathBuf,
    /// Where in the file the bytes go; 0 means the file is new.
    pub pos: u64,
    pub buf: Vec<u8>,
}

/// One group commit: its pieces, and the last entry serial it makes durable.
pub struct Commit {
    pub pieces: Vec<Piece>,
    pub upto: u64,
}

/// What the journal counts, for the core's counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct WalCounts {
    pub entries: u64,
    pub bytes: u64,
    pub commits: u64,
    /// Entries skipped at start-up because they were damaged.
    pub damaged: u64,
    /// Segments dropped, unsettled, by `full = "drop_oldest"`, and their bytes.
    pub dropped_segments: u64,
    pub dropped_bytes: u64,
    pub write_errors: u64,
}

/// One core's journal.
pub struct Journal {
    core: usize,
    dir: PathBuf,
    cfg: Wal,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    next_id: SegId,
    next_seq: u64,
    pending: Vec<Piece>,
    pending_bytes: usize,
    first_pending: Option<Instant>,
    /// Start of the entry being written, in the last pending piece.
    writing: Option<usize>,
    /// Serials: entries appended, and the last one made durable.
    appended: u64,
    synced: u64,
    /// Bytes of the live segments, on disk or pending.
    total: u64,
    /// The journal task, to wake once `sync_bytes` are pending.
    task: Option<Waker>,
    /// The first entry not yet ingested, while there is a backlog.
    backlog: Option<(SegId, u64)>,
    /// A commit's pieces are being written: neither pending nor written yet.
    committing: bool,
    pub counts: WalCounts,
}

/// What the backlog reader is to do next.
#[derive(Debug)]
pub enum Next {
    /// No backlog: input is ingested as it is read.
    Idle,
    /// The next entries are in a commit being written.
    WaitCommit,
    /// Ingest the entries of `seg` from `from` to `to`: in its file, or in `bytes` when
    /// they are still pending. `adopted`: the segment is an earlier run's.
    Read {
        seg: SegId,
        path: PathBuf,
        from: u64,
        to: u64,
        bytes: Option<Vec<u8>>,
        adopted: bool,
    },
}

/// A segment file's sequence number, from its name.
fn seq_of(p: &Path) -> Option<u64> {
    let name = p.file_name()?.to_str()?;
    name.strip_suffix(".wal")?.parse().ok()
}

/// The segments left in `dir` by an earlier run, per core directory (`core-N`), oldest
/// first. A core of this run replays those of `core-N` for `N % workers == core`.
pub fn list(dir: &Path) -> std::io::Result<Vec<(usize, Vec<PathBuf>)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for d in rd {
        let d = d?;
        let Some(core) = d
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("core-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let mut segs: Vec<(u64, PathBuf)> = std::fs::read_dir(d.path())?
            .filter_map(|f| f.ok().map(|f| f.path()))
            .filter_map(|p| seq_of(&p).map(|s| (s, p)))
            .collect();
        segs.sort();
        out.push((core, segs.into_iter().map(|(_, p)| p).collect()));
    }
    out.sort();
    Ok(out)
}

impl Journal {
    /// The journal of `core`, one of `workers`, whose new segments follow the ones already
    /// in its directory. Each core's share of `max_bytes` is an equal part.
    pub fn new(core: usize, workers: usize, cfg: &Wal) -> std::io::Result<Self> {
        let mut cfg = cfg.clone();
        cfg.max_bytes = (cfg.max_bytes / workers.max(1) as u64).max(1 << 20);
        let dir = cfg.dir.join(format!("core-{core}"));
        std::fs::create_dir_all(&dir)?;
        let mut next_seq = 1;
        for f in std::fs::read_dir(&dir)? {
            if let Some(s) = seq_of(&f?.path()) {
                next_seq = next_seq.max(s + 1);
            }
        }
        Ok(Journal {
            core,
            dir,
            segment_bytes: SEGMENT_BYTES.min(cfg.max_bytes / 4).max(64 << 10),
            cfg,
            segments: VecDeque::new(),
            next_id: 0,
            next_seq,
            pending: Vec::new(),
            pending_bytes: 0,
            first_pending: None,
            writing: None,
            appended: 0,
            synced: 0,
            total: 0,
            task: None,
            backlog: None,
            committing: false,
            counts: WalCounts::default(),
        })
    }

    pub fn sync_interval(&self) -> Duration {
        self.cfg.sync_interval
    }

    /// Takes an earlier run's segment for replay, after those adopted before it: it is the
    /// backlog, and deleted once its entries are read back and settle.
    pub fn adopt(&mut self, path: PathBuf, bytes: u64) -> SegId {
        let id = self.next_id;
        self.next_id += 1;
        self.total += bytes;
        self.backlog.get_or_insert((id, 0));
        self.segments.push_back(Segment {
            id,
            path,
            bytes,
            written: bytes,
            live: 0,
            open: true,
            new: false,
            started: Instant::now(),
        });
        id
    }

    /// One more live entry: one read back from the backlog and ingested.
    pub fn hold(&mut self, id: SegId) {
        if let Some(s) = self.seg(id) {
            s.live += 1;
        }
    }

    /// Whether input is journaled only, for the backlog reader to ingest later.
    pub fn backlogged(&self) -> bool {
        self.backlog.is_some()
    }

    /// Starts a backlog (if there is none) at the next entry.
    pub fn start_backlog(&mut self) {
        if self.backlog.is_none() {
            let id = self.active();
            let at = self.segments.back().expect("active").bytes;
            self.backlog = Some((id, at));
        }
    }

    /// Where the backlog reader goes on. Ends the backlog when it has caught up with
    /// everything journaled.
    pub fn backlog_next(&mut self) -> Next {
        loop {
            let Some((id, at)) = self.backlog else {
                return Next::Idle;
            };
            // A segment dropped by drop_oldest: go on from the oldest left.
            let Some(i) = self.segments.iter().position(|s| s.id >= id) else {
                self.backlog = None;
                return Next::Idle;
            };
            let s = &self.segments[i];
            let at = if s.id == id { at } else { 0 };
            if at < s.written {
                return Next::Read {
                    seg: s.id,
                    path: s.path.clone(),
                    from: at,
                    to: s.written,
                    bytes: None,
                    adopted: !s.new,
                };
            }
            if at < s.bytes {
                if self.committing {
                    return Next::WaitCommit;
                }
                let p = self
                    .pending
                    .iter()
                    .find(|p| p.seg == s.id)
                    .expect("unwritten bytes are pending");
                return Next::Read {
                    seg: s.id,
                    path: s.path.clone(),
                    from: at,
                    to: s.bytes,
                    bytes: Some(p.buf[(at - p.pos) as usize..].to_vec()),
                    adopted: false,
                };
            }
            // This segment is read to its end.
            let (adopted, last) = (!s.new, i + 1 == self.segments.len());
            if adopted {
                self.segments[i].open = false;
            }
            if last {
                self.backlog = None;
                self.collect();
                return Next::Idle;
            }
            self.backlog = Some((self.segments[i + 1].id, 0));
            self.collect();
        }
    }

    /// The reader ingested `seg` up to `to`.
    pub fn backlog_done(&mut self, seg: SegId, to: u64) {
        if let Some((id, at)) = &mut self.backlog
            && *id == seg
        {
            *at = (*at).max(to);
        }
    }

    fn seg(&mut self, id: SegId) -> Option<&mut Segment> {
        self.segments.iter_mut().find(|s| s.id == id)
    }

    /// The segment taking entries, with room for more, started if need be.
    fn active(&mut self) -> SegId {
        let full = match self.segments.back() {
            Some(s) if s.open && s.new => {
                s.bytes >= self.segment_bytes || (s.bytes > 0 && s.started.elapsed() >= SEGMENT_AGE)
            }
            _ => true,
        };
        if full {
            if let Some(s) = self.segments.back_mut()
                && s.new
            {
                s.open = false;
            }
            let id = self.next_id;
            self.next_id += 1;
            let path = self.dir.join(format!("{:016}.wal", self.next_seq));
            self.next_seq += 1;
            self.segments.push_back(Segment {
                id,
                path,
                bytes: 0,
                written: 0,
                live: 0,
                open: true,
                new: true,
                started: Instant::now(),
            });
            self.collect();
        }
        self.segments.back().expect("just ensured").id
    }

    /// Starts an entry; the payload follows through [`Journal::extend`], and
    /// [`Journal::end`] completes it. Returns its segment and serial.
    pub fn begin(&mut self, kind: Kind, input: &str, time: EventTime) -> (SegId, u64) {
        debug_assert!(self.writing.is_none());
        if self.cfg.full == WalFull::DropOldest {
            self.drop_oldest();
        }
        let id = self.active();
        let diverted = self.backlog.is_some();
        let seg = self.segments.back_mut().expect("active");
        // A backlog entry is counted live when the reader ingests it.
        if !diverted {
            seg.live += 1;
        }
        let pos = seg.bytes;
        let path = seg.path.clone();
        let piece = match self.pending.last_mut() {
            Some(p) if p.seg == id => p,
            _ => {
                self.pending.push(Piece {
                    seg: id,
                    path,
                    pos,
                    buf: Vec::with_capacity(self.cfg.sync_bytes.min(1 << 20)),
                });
                self.pending.last_mut().unwrap()
            }
        };
        self.writing = Some(entry::begin(&mut piece.buf, kind, input, time));
        self.appended += 1;
        (id, self.appended)
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        debug_assert!(self.writing.is_some());
        if self.writing.is_none() {
            return;
        }
        if let Some(p) = self.pending.last_mut() {
            p.buf.extend_from_slice(bytes);
        }
    }

    pub fn end(&mut self) {
        let (Some(at), Some(p)) = (self.writing.take(), self.pending.last_mut()) else {
            return;
        };
        let n = entry::finish(&mut p.buf, at) as u64;
        let seg = self.segments.back_mut().expect("active");
        seg.bytes += n;
        self.total += n;
        self.pending_bytes += n as usize;
        self.counts.entries += 1;
        self.counts.bytes += n;
        self.first_pending.get_or_insert_with(Instant::now);
        if self.pending_bytes >= self.cfg.sync_bytes
            && let Some(w) = self.task.take()
        {
            w.wake();
        }
    }

    /// A whole entry.
    pub fn append(
        &mut self,
        kind: Kind,
        input: &str,
        time: EventTime,
        payload: &[u8],
    ) -> (SegId, u64) {
        let r = self.begin(kind, input, time);
        self.extend(payload);
        self.end();
        r
    }

    /// An entry is settled: every batch with its events is delivered or dead-lettered.
    pub fn release(&mut self, id: SegId) {
        let full = self.full();
        if let Some(s) = self.seg(id) {
            s.live -= 1;
            // An idle segment that fills the journal gives way, so it can be deleted.
            if s.live == 0 && full {
                s.open = false;
            }
        }
        self.collect();
    }

    /// Deletes the segments with nothing live, nothing pending, no more to take, and no
    /// backlog still to read.
    fn collect(&mut self) {
        let keep_from = self.backlog.map_or(SegId::MAX, |(id, _)| id);
        let mut i = 0;
        while i < self.segments.len() {
            let s = &self.segments[i];
            if s.id < keep_from && !s.open && s.live == 0 && s.written == s.bytes {
                let s = self.segments.remove(i).expect("in range");
                self.total -= s.bytes;
                if let Err(e) = std::fs::remove_file(&s.path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::error!(core = self.core, path = %s.path.display(), error = %e, "Cannot delete a settled write-ahead log segment");
                }
            } else {
                i += 1;
            }
        }
    }

    /// `full = "drop_oldest"`: makes room by deleting the oldest written segments.
    fn drop_oldest(&mut self) {
        while self.total >= self.cfg.max_bytes && self.segments.len() > 1 {
            let s = &self.segments[0];
            if s.written != s.bytes {
                break;
            }
            let s = self.segments.pop_front().expect("checked");
            self.total -= s.bytes;
            if let Some((id, at)) = &mut self.backlog
                && *id == s.id
            {
                *id = self.segments[0].id;
                *at = 0;
            }
            self.counts.dropped_segments += 1;
            self.counts.dropped_bytes += s.bytes;
            let _ = std::fs::remove_file(&s.path);
            tracing::warn!(
                core = self.core,
                path = %s.path.display(),
                bytes = s.bytes,
                entries = s.live,
                "The write-ahead log is full (full = \"drop_oldest\"): dropped its oldest segment, whose events are no longer protected from a crash"
            );
        }
    }

    /// With `full = "block"`, whether the journal is at `max_bytes`, so reading stops.
    pub fn full(&self) -> bool {
        self.total >= self.cfg.max_bytes
    }

    /// Whether input must wait: the journal is full (and blocks), or its pending entries
    /// outrun the disk.
    pub fn blocks(&self) -> bool {
        (self.cfg.full == WalFull::Block && self.full())
            || self.pending_bytes >= 2 * self.cfg.sync_bytes.max(1 << 20)
    }

    /// Time until the next commit is due (zero: now), or `None` with nothing pending.
    pub fn until_due(&self, now: Instant) -> Option<Duration> {
        let first = self.first_pending?;
        if self.pending_bytes >= self.cfg.sync_bytes {
            return Some(Duration::ZERO);
        }
        Some((first + self.cfg.sync_interval).saturating_duration_since(now))
    }

    /// Ready once `sync_bytes` are pending; otherwise the task is woken when they are.
    pub fn poll_bytes(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pending_bytes >= self.cfg.sync_bytes {
            return Poll::Ready(());
        }
        self.task = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Takes what is pending as one commit.
    pub fn take_commit(&mut self) -> Option<Commit> {
        debug_assert!(self.writing.is_none());
        if self.pending.is_empty() {
            return None;
        }
        self.pending_bytes = 0;
        self.first_pending = None;
        self.committing = true;
        Some(Commit {
            pieces: std::mem::take(&mut self.pending),
            upto: self.appended,
        })
    }

    /// A commit is written and synced. Returns the serial now durable.
    pub fn committed(&mut self, c: &Commit) -> u64 {
        for p in &c.pieces {
            if let Some(s) = self.seg(p.seg) {
                s.written = s.written.max(p.pos + p.buf.len() as u64);
            }
        }
        self.counts.commits += 1;
        self.committing = false;
        self.synced = c.upto;
        self.collect();
        self.synced
    }

    /// At exit: the active segment takes no more, and goes if it is settled.
    pub fn close(&mut self) {
        if let Some(s) = self.segments.back_mut() {
            s.open = false;
        }
        self.collect();
    }

    /// The last serial a group commit made durable.
    pub fn synced(&self) -> u64 {
        self.synced
    }

    /// Live segments, and their bytes.
    pub fn size(&self) -> (usize, u64) {
        (self.segments.len(), self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(name: &str, max_bytes: u64) -> Journal {
        let dir = std::env::temp_dir().join(format!("sluice-wal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = Wal {
            dir,
            sync_interval: Duration::from_millis(20),
            sync_bytes: 1 << 20,
            max_bytes,
            full: WalFull::Block,
        };
        Journal::new(0, 1, &cfg).unwrap()
    }

    const T: EventTime = EventTime { secs: 1, nanos: 0 };

    /// Writes a commit the way the journal task does.
    fn write(c: &Commit) {
        use std::os::unix::fs::FileExt;
        for p in &c.pieces {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(p.pos == 0)
                .open(&p.path)
                .unwrap();
            f.write_all_at(&p.buf, p.pos).unwrap();
        }
    }

    #[test]
    fn a_segment_goes_once_everything_in_it_settles_and_it_is_done() {
        let mut j = journal("settle", 1 << 30);
        let (a, s1) = j.append(Kind::Forward, "in", T, b"one");
        let (b, s2) = j.append(Kind::Forward, "in", T, b"two");
        assert_eq!((a, s1 + 1), (b, s2));
        let c = j.take_commit().unwrap();
        write(&c);
        assert_eq!(j.committed(&c), s2);
        let path = c.pieces[0].path.clone();
        assert!(path.exists());
        j.release(a);
        j.release(a);
        assert!(
            path.exists(),
            "the active segment stays while it takes entries"
        );
        j.close();
        assert!(!path.exists(), "settled and closed: deleted");
        assert_eq!(j.size(), (0, 0));
    }

    #[test]
    fn the_backlog_is_read_from_the_file_then_from_pending_and_then_ends() {
        let mut j = journal("backlog", 1 << 30);
        j.start_backlog();
        assert!(j.backlogged());
        j.append(Kind::JsonLines, "in", T, b"{\"a\":1}");
        let c = j.take_commit().unwrap();
        assert!(matches!(j.backlog_next(), Next::WaitCommit));
        write(&c);
        j.committed(&c);
        j.append(Kind::JsonLines, "in", T, b"{\"a\":2}");
        // The committed entry, from its file.
        let Next::Read {
            seg,
            from,
            to,
            bytes: None,
            ..
        } = j.backlog_next()
        else {
            panic!("expected a read from the file")
        };
        assert_eq!(from, 0);
        j.hold(seg);
        j.backlog_done(seg, to);
        // The pending one, from memory.
        let Next::Read {
            from: f2,
            bytes: Some(b),
            to: t2,
            ..
        } = j.backlog_next()
        else {
            panic!("expected the pending bytes")
        };
        assert_eq!(f2, to);
        assert!(matches!(entry::scan(&b, 0), entry::Scanned::Entry { .. }));
        j.backlog_done(seg, t2);
        assert!(matches!(j.backlog_next(), Next::Idle));
        assert!(!j.backlogged(), "caught up: input is routed directly again");
    }

    #[test]
    fn a_full_log_blocks_until_segments_settle() {
        let mut j = journal("full", 1 << 20);
        let big = vec![b'x'; 100 << 10];
        let mut held = Vec::new();
        while !j.blocks() {
            held.push(j.append(Kind::Forward, "in", T, &big).0);
            if let Some(c) = j.take_commit() {
                write(&c);
                j.committed(&c);
            }
        }
        assert!(j.full());
        for seg in held {
            j.release(seg);
        }
        assert!(
            !j.blocks(),
            "settled segments are deleted, and the log has room"
        );
    }
}
