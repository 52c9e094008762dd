//! AWS sink tasks. A sink takes batches from every core while its AIMD limit allows, and
//! delivers each one: a request per attempt, admitted by the concurrency limit and (for
//! Kinesis) the per-shard token buckets; only the records that failed are sent again, with
//! their keys: at once (a few ms of jitter) after an answer that accepted others, after a
//! full-jitter backoff while answers accept nothing; records refused for good go to the
//! route's fallback sink or the dead-letter directory. A batch goes back to its core once
//! every record is accepted or set down, which is when its chunks are acked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};

use super::aws::{Firehose, Kinesis};
use super::body::Wire;
use super::limiter::ShardLimiter;
use super::retry::{Aimd, Outcome, Verdict, backoff, classify};
use super::{Inbox, Ports, REPORT_EVERY, give_back};
use crate::batch::records::Rng;
use crate::batch::{Batch, Record};
use crate::budget::Budget;
use crate::metrics::{Report, Reporter, SinkCounters};
use crate::shards::ShardMap;

/// Retries start this long and wait at most this long.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// The longest wait before resending the records an answer failed, when it took others.
const PROGRESS_JITTER: Duration = Duration::from_millis(1);

/// How soon after a throttle the concurrency limit may be halved again.
const AIMD_COOLDOWN: Duration = Duration::from_millis(500);

/// Each record's predicted shard, what a request takes from each shard (shard, records,
/// bytes), and the map the prediction is from.
type Prediction = (Vec<usize>, Vec<(usize, u64, u64)>, Arc<ShardMap>);

/// Records handed to a fallback sink, and word back once they are written.
pub struct Fallback {
    pub data: Vec<u8>,
    pub records: u64,
    pub done: oneshot::Sender<()>,
}

pub enum Service {
    Kinesis(Kinesis),
    Firehose(Firehose),
}

/// What a request in flight is charged besides its body and answer: its connection's TLS
/// and HTTP buffers and the SDK's per-request state, which are not ours to measure. About
/// what heaptrack shows them holding; four times this bound the concurrency so tightly
/// that CPU per event rose (BENCHMARKS.md, "Memory: one budget").
pub const REQUEST_OVERHEAD: usize = 128 << 10;

/// One AWS sink's shared state.
pub struct AwsSink {
    pub index: usize,
    pub name: String,
    pub service: Service,
    pub dead_dir: PathBuf,
    pub fallback: Option<mpsc::Sender<Fallback>>,
    pub shard_refresh: Duration,
    /// Each core's feed of shard maps (Kinesis).
    pub feeds: Vec<crossbeam_channel::Sender<Arc<ShardMap>>>,
    state: Mutex<State>,
    /// A record went to another shard than predicted: the map is stale.
    stale: Notify,
    /// Charged for the request bodies and answers; no request starts while it is spent
    /// and another is on its way.
    budget: Arc<Budget>,
}

struct State {
    aimd: Aimd,
    limiter: Option<ShardLimiter>,
    shards: Arc<ShardMap>,
    in_flight: usize,
    c: SinkCounters,
    failed: BTreeMap<String, u64>,
    dead_seq: u64,
    rng: Rng,
    /// Request buffers not in use (at most one per delivery in flight).
    wires: Vec<Wire>,
}

/// Slows down each of `shards` (which throttled) once; returns them sorted and deduplicated.
fn slow_down(s: &mut State, shards: &[usize], now: Instant) -> Vec<usize> {
    let mut hot = shards.to_vec();
    hot.sort_unstable();
    hot.dedup();
    if let Some(l) = &mut s.limiter {
        for &sh in &hot {
            if l.throttled(sh, now) {
                s.c.shard_cuts += 1;
            }
        }
    }
    hot
}

impl AwsSink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        name: String,
        service: Service,
        dead_dir: PathBuf,
        fallback: Option<mpsc::Sender<Fallback>>,
        max_concurrency: usize,
        shards: Option<(ShardMap, f64, Duration)>,
        feeds: Vec<crossbeam_channel::Sender<Arc<ShardMap>>>,
        budget: Arc<Budget>,
    ) -> Self {
        let now = Instant::now();
        let (map, limiter, refresh) = match shards {
            Some((map, headroom, refresh)) => {
                let l = ShardLimiter::new(map.len(), headroom, now);
                (map, Some(l), refresh)
            }
            None => (ShardMap::unknown(), None, Duration::MAX),
        };
        AwsSink {
            index,
            name,
            service,
            dead_dir,
            fallback,
            shard_refresh: refresh,
            feeds,
            state: Mutex::new(State {
                aimd: Aimd::new(4.min(max_concurrency), max_concurrency, AIMD_COOLDOWN),
                limiter,
                shards: Arc::new(map),
                in_flight: 0,
                c: SinkCounters::default(),
                failed: BTreeMap::new(),
                dead_seq: 0,
                rng: Rng::new(0x5eed ^ index as u64),
                wires: Vec::new(),
            }),
            stale: Notify::new(),
            budget,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes batches from the cores and delivers them until every core is gone and every
    /// batch is delivered.
    pub async fn run(self: Arc<Self>, ports: Ports, reporter: Reporter) {
        let mut inbox = Inbox {
            rings: ports.batches,
            next: 0,
        };
        let mut deliveries = tokio::task::JoinSet::new();
        let refresher = matches!(self.service, Service::Kinesis(_))
            .then(|| tokio::spawn(self.clone().refresh()));
        let mut next_report = tokio::time::Instant::now() + REPORT_EVERY;
        let mut closed = false;
        enum Ev {
            Batch(Option<Batch>),
            Done(Batch),
            Tick,
        }
        loop {
            let room = !closed
                && deliveries.len() < self.state().aimd.limit()
                && (deliveries.is_empty() || !self.budget.spent());
            let ev = futures_lite::future::or(
                async {
                    if room {
                        Ev::Batch(inbox.next().await)
                    } else {
                        std::future::pending().await
                    }
                },
                futures_lite::future::or(
                    async {
                        match deliveries.join_next().await {
                            Some(Ok(b)) => Ev::Done(b),
                            _ => std::future::pending().await,
                        }
                    },
                    async {
                        tokio::time::sleep_until(next_report).await;
                        Ev::Tick
                    },
                ),
            )
            .await;
            match ev {
                Ev::Batch(Some(b)) => {
                    // The request's buffers, reused from delivery to delivery, are charged
                    // now, before the task runs, so that the next batch's admission sees
                    // them.
                    let mut wire = self.state().wires.pop().unwrap_or_default();
                    let all: Vec<usize> = (0..b.records.len()).collect();
                    wire.reserve(&b, &all, &self.budget);
                    self.budget.adjust(0, REQUEST_OVERHEAD);
                    deliveries.spawn(self.clone().deliver(b, wire));
                }
                Ev::Batch(None) => closed = true,
                Ev::Done(b) => {
                    {
                        let mut s = self.state();
                        s.c.batches += 1;
                        s.c.events += b.events as u64;
                    }
                    give_back(&ports.done, b).await;
                }
                Ev::Tick => {
                    self.report(&reporter);
                    next_report += REPORT_EVERY;
                }
            }
            if closed && deliveries.is_empty() {
                break;
            }
        }
        if let Some(r) = refresher {
            r.abort();
        }
        self.report(&reporter);
    }

    fn report(&self, reporter: &Reporter) {
        let s = self.state();
        let mut c = s.c;
        c.concurrency = s.aimd.limit() as u64;
        let mut detail: Vec<(String, u64)> = s
            .failed
            .iter()
            .map(|(k, v)| (format!("failed.{k}"), *v))
            .collect();
        // Each shard's rate, for the shards slowed below the full rate: a stream may have
        // thousands, and a Stats line should not.
        if let Some(l) = &s.limiter {
            let full = l.full_rate();
            let mut slowed = 0;
            for (i, shard) in s.shards.shards().iter().enumerate() {
                let rate = l.rate(i);
                if rate < full {
                    slowed += 1;
                    let id = if shard.id.is_empty() {
                        "unknown"
                    } else {
                        &shard.id
                    };
                    detail.push((format!("shard.{id}.rate"), rate));
                }
            }
            detail.push(("shard_rate_full".into(), full));
            detail.push(("shards_slowed".into(), slowed));
        }
        let _ = reporter.send(Report::Sink {
            sink: self.index,
            counters: c,
            detail,
        });
    }

    /// Delivers one batch: every record accepted, or set down in the fallback sink or the
    /// dead-letter directory.
    async fn deliver(self: Arc<Self>, batch: Batch, mut wire: Wire) -> Batch {
        let oversize: Vec<Record> = batch
            .records
            .iter()
            .filter(|r| r.oversize)
            .copied()
            .collect();
        if !oversize.is_empty() {
            self.set_down(
                &batch,
                &oversize,
                "larger than the record limit (max_record_bytes)",
            )
            .await;
        }
        let mut pending: Vec<usize> = (0..batch.records.len())
            .filter(|&i| !batch.records[i].oversize)
            .collect();
        let mut attempt = 0u32;
        while !pending.is_empty() {
            let (shards, need, map) = self.predict(&batch, &pending);
            self.admit(&need).await;
            wire.reserve(&batch, &pending, &self.budget);
            let outcome = match &self.service {
                Service::Kinesis(k) => {
                    let predicted = |p: usize| {
                        let id = &map.shards().get(shards[p])?.id;
                        (!id.is_empty()).then_some(id.as_str())
                    };
                    let (outcome, stale) = k.put(&batch, &pending, &mut wire, &predicted).await;
                    if stale {
                        // A record went to another shard than predicted: the map is stale.
                        self.stale.notify_one();
                    }
                    outcome
                }
                Service::Firehose(f) => f.put(&batch, &pending, &mut wire).await,
            };
            wire.charge(&self.budget);
            let verdict = classify(&outcome);
            let now = Instant::now();
            // All bookkeeping under the lock; the waits come after it is released.
            let mut refused: Vec<(Vec<Record>, String)> = Vec::new();
            let wait = {
                let mut s = self.state();
                s.in_flight -= 1;
                s.c.requests += 1;
                if let Outcome::Records(codes) = &outcome {
                    for c in codes.iter().flatten() {
                        match s.failed.get_mut(c.as_ref()) {
                            Some(n) => *n += 1,
                            None => {
                                s.failed.insert(c.to_string(), 1);
                            }
                        }
                        s.c.failed += 1;
                    }
                }
                let unit = s.rng.next_u64() as f64 / u64::MAX as f64;
                match verdict {
                    Verdict::Done => {
                        self.accepted(&mut s, &batch, &pending, &shards, &need, &[], &[]);
                        s.aimd.success();
                        pending.clear();
                        None
                    }
                    Verdict::Partial {
                        retry,
                        dead,
                        throttled,
                    } => {
                        let skip: Vec<usize> = retry
                            .iter()
                            .copied()
                            .chain(dead.iter().map(|d| d.0))
                            .collect();
                        // A throttled record speaks of its shard, whose bucket slows; the
                        // stream-wide limit reacts only when most of an answer throttled.
                        if !throttled.is_empty() {
                            s.c.throttles += 1;
                        }
                        s.aimd.answered(now, throttled.len(), pending.len());
                        let hot: Vec<usize> = throttled.iter().map(|&p| shards[p]).collect();
                        self.accepted(&mut s, &batch, &pending, &shards, &need, &skip, &hot);
                        // One dead-letter file per error code, not per record.
                        for (p, code) in dead {
                            let reason = format!("refused by the service: {code}");
                            let record = batch.records[pending[p]];
                            match refused.iter_mut().find(|r| r.1 == reason) {
                                Some(r) => r.0.push(record),
                                None => refused.push((vec![record], reason)),
                            }
                        }
                        s.c.retries += retry.len() as u64;
                        // An answer that took records was progress: the retry waits only a
                        // short jitter (the shard buckets pace it), and the exponential
                        // backoff starts again. One that took none backs off further.
                        let took = pending.len() - skip.len();
                        attempt = if took > 0 { 0 } else { attempt + 1 };
                        pending = retry.iter().map(|&p| pending[p]).collect();
                        // Nothing to resend when every failure was for good.
                        (!pending.is_empty()).then(|| match attempt {
                            0 => PROGRESS_JITTER.mul_f64(unit),
                            a => backoff(a, BACKOFF_BASE, BACKOFF_CAP, unit),
                        })
                    }
                    Verdict::RetryAll { throttled } => {
                        if throttled {
                            s.c.throttles += 1;
                            s.aimd.throttled(now);
                            slow_down(&mut s, &shards, now);
                        }
                        s.c.retries += pending.len() as u64;
                        attempt += 1;
                        Some(backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, unit))
                    }
                    Verdict::GiveUp { reason } => {
                        let records: Vec<Record> =
                            pending.iter().map(|&i| batch.records[i]).collect();
                        tracing::error!(sink = %self.name, %reason, records = records.len(), "Records refused for good");
                        refused.push((records, reason));
                        pending.clear();
                        None
                    }
                }
            };
            for (records, reason) in refused {
                self.set_down(&batch, &records, &reason).await;
            }
            if let Some(w) = wait {
                tokio::time::sleep(w).await;
            }
        }
        wire.settle(&self.budget);
        self.state().wires.push(wire);
        self.budget.adjust(REQUEST_OVERHEAD, 0);
        batch
    }

    /// Counts accepted records (all of `pending` but the positions in `skip`), and moves
    /// each shard's bucket once for this answer (down for the shards in `hot`, which
    /// throttled, up for the others that took records).
    #[allow(clippy::too_many_arguments)]
    fn accepted(
        &self,
        s: &mut State,
        batch: &Batch,
        pending: &[usize],
        shards: &[usize],
        need: &[(usize, u64, u64)],
        skip: &[usize],
        hot: &[usize],
    ) {
        let hot = slow_down(s, hot, Instant::now());
        if skip.is_empty() {
            // Every record was taken: the shards are those the request asked of.
            for &i in pending {
                let r = &batch.records[i];
                s.c.bytes += (r.end - r.start) as u64;
            }
            s.c.records += pending.len() as u64;
            if let Some(l) = &mut s.limiter {
                for &(sh, _, _) in need.iter().filter(|n| hot.binary_search(&n.0).is_err()) {
                    l.succeeded(sh);
                }
            }
            return;
        }
        let mut skipped = vec![false; pending.len()];
        for &p in skip {
            skipped[p] = true;
        }
        let mut took: Vec<usize> = Vec::with_capacity(pending.len());
        for (p, &i) in pending.iter().enumerate() {
            if skipped[p] {
                continue;
            }
            let r = &batch.records[i];
            s.c.records += 1;
            s.c.bytes += (r.end - r.start) as u64;
            took.push(shards[p]);
        }
        if let Some(l) = &mut s.limiter {
            took.sort_unstable();
            took.dedup();
            for sh in took.into_iter().filter(|sh| hot.binary_search(sh).is_err()) {
                l.succeeded(sh);
            }
        }
    }

    /// Each pending record's predicted shard, what the request takes from each shard, and
    /// the map the prediction is from.
    fn predict(&self, batch: &Batch, pending: &[usize]) -> Prediction {
        let (map, limited) = {
            let s = self.state();
            (s.shards.clone(), s.limiter.is_some())
        };
        if !limited {
            return (vec![0; pending.len()], vec![], map);
        }
        let mut shards = Vec::with_capacity(pending.len());
        let mut each: Vec<(usize, u64)> = Vec::with_capacity(pending.len());
        for &i in pending {
            let r = &batch.records[i];
            let sh = map.shard_of(r.target);
            shards.push(sh);
            each.push((sh, (r.end - r.start + r.key_end - r.key_start) as u64));
        }
        // Sorted, so that a request over hundreds of shards stays linear to sum.
        each.sort_unstable_by_key(|e| e.0);
        let mut need: Vec<(usize, u64, u64)> = Vec::new();
        for (sh, bytes) in each {
            match need.last_mut() {
                Some(n) if n.0 == sh => {
                    n.1 += 1;
                    n.2 += bytes;
                }
                _ => need.push((sh, 1, bytes)),
            }
        }
        (shards, need, map)
    }

    /// Waits for a request slot under the concurrency limit and for the shards' tokens.
    async fn admit(&self, need: &[(usize, u64, u64)]) {
        loop {
            let wait = {
                let mut s = self.state();
                if s.in_flight >= s.aimd.limit() {
                    Duration::from_millis(5)
                } else {
                    let taken = match &mut s.limiter {
                        Some(l) => l.take(Instant::now(), need),
                        None => Ok(()),
                    };
                    match taken {
                        Ok(()) => {
                            s.in_flight += 1;
                            return;
                        }
                        Err(w) => w.max(Duration::from_millis(1)),
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Sets refused records down: in the fallback sink if the route names one, otherwise
    /// in the dead-letter directory. Retries until it succeeds: nothing is dropped.
    async fn set_down(&self, batch: &Batch, records: &[Record], reason: &str) {
        let n = records.len() as u64;
        if let Some(fb) = &self.fallback {
            let mut data = Vec::new();
            for r in records {
                data.extend_from_slice(batch.data_of(r));
                if data.last() != Some(&b'\n') {
                    data.push(b'\n');
                }
            }
            let (done, wait) = oneshot::channel();
            if fb
                .send(Fallback {
                    data,
                    records: n,
                    done,
                })
                .await
                .is_ok()
                && wait.await.is_ok()
            {
                self.state().c.fallback += n;
                return;
            }
            tracing::error!(sink = %self.name, "The fallback sink is gone; dead-lettering instead");
        }
        let mut attempt = 0;
        loop {
            let seq = {
                let mut s = self.state();
                s.dead_seq += 1;
                s.dead_seq
            };
            let written = tokio::task::block_in_place(|| {
                super::dead::write(&self.dead_dir, &self.name, reason, batch, records, seq)
            });
            match written {
                Ok(path) => {
                    self.state().c.dead_lettered += n;
                    tracing::warn!(sink = %self.name, records = n, %reason, path = %path.display(), "Dead-lettered records");
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::error!(sink = %self.name, error = %e, dir = %self.dead_dir.display(), "Cannot write to the dead-letter directory; retrying");
                    tokio::time::sleep(backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, 1.0)).await;
                }
            }
        }
    }

    /// Keeps the shard map current: on a schedule, and at once when a record lands on a
    /// shard other than the one predicted (a reshard happened).
    async fn refresh(self: Arc<Self>) {
        let Service::Kinesis(k) = &self.service else {
            return;
        };
        loop {
            let every = self.shard_refresh;
            futures_lite::future::or(self.stale.notified(), async {
                tokio::time::sleep(every).await;
            })
            .await;
            match k.shards().await {
                Ok(map) => self.adopt(map),
                Err(e) => {
                    tracing::warn!(sink = %self.name, error = %e, "Listing the stream's shards failed; keeping the old map");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Asks for the shard map at once (the first attempt failed).
    pub fn refresh_soon(&self) {
        self.stale.notify_one();
    }

    /// Takes a new shard map, here and on every core.
    pub fn adopt(&self, map: ShardMap) {
        let mut s = self.state();
        if *s.shards == map {
            return;
        }
        tracing::info!(sink = %self.name, shards = map.len(), "The stream's shards changed; using the new map");
        if let Some(l) = &mut s.limiter {
            l.reset(map.len(), Instant::now());
        }
        let map = Arc::new(map);
        s.shards = map.clone();
        s.c.shard_refreshes += 1;
        drop(s);
        for f in &self.feeds {
            let _ = f.send(map.clone());
        }
    }
}
