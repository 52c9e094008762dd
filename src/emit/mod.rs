//! Emit stage: the sink tasks. A tokio runtime beside the glommio cores, with a thread per
//! core, runs one task per sink; each takes sealed batches from every core's ring, writes or sends them, and hands
//! each one back to its core through the completion ring, which settles the batch's acks.
//!
//! Before the cores start, the emitter builds what they need from the services: each
//! Kinesis stream's shard map, and whether a Firehose stream packs lines.
//!
//! A local write that fails is retried with backoff, never dropped: a batch is only handed
//! back once its sink has it. AWS sinks are in `deliver`.

pub mod aws;
pub mod body;
mod dead;
mod deliver;
pub mod dlq;
mod file;
pub mod limiter;
pub mod request;
pub mod retry;

use std::future::poll_fn;
use std::io::Write;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::batch::Batch;
use crate::batch::records::{Framing, KeyMode, RecordFraming, RecordShape};
use crate::budget::Budget;
use crate::config::{Config, PartitionKey, Sink, SinkKind};
use crate::metrics::{Report, Reporter, SinkCounters};
use crate::ring::{Consumer, Producer};
use crate::shards::ShardMap;
use deliver::{AwsSink, Fallback, Service};

/// What each core needs to know of one sink.
pub struct Plan {
    pub framing: Framing,
    pub key_field: Option<Box<str>>,
    /// Per core: the feed of shard maps (Kinesis sinks), the current map already in it.
    pub feeds: Vec<Option<crossbeam_channel::Receiver<Arc<ShardMap>>>>,
}

/// One sink's ends of every core's rings, indexed by core.
pub struct Ports {
    pub batches: Vec<Consumer<Batch>>,
    pub done: Vec<Producer<Delivered>>,
}

/// A batch the emitter has settled: every record accepted by the service, or set down in
/// the dead-letter directory or the route's fallback, or written by a local sink. Only
/// the emitter makes one, so nothing else can release a batch's tickets (its chunks'
/// acks and its journal entries) by handing it back.
pub struct Delivered(Batch);

impl Delivered {
    fn new(batch: Batch) -> Self {
        Delivered(batch)
    }

    /// For the shard's unit tests, which play the emitter.
    #[cfg(test)]
    pub(crate) fn by_test(batch: Batch) -> Self {
        Delivered(batch)
    }

    /// The batch, to release its tickets and recycle its buffers.
    pub fn into_batch(self) -> Batch {
        self.0
    }
}

/// Where a sink's bytes go. Writes may block; they run on tokio's blocking pool.
trait Writer: Send + 'static {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()>;
    fn close(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Stdout;

impl Writer for Stdout {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(data)?;
        out.flush()
    }
}

/// The emitter: a runtime on its own thread that ends when every sink has drained.
pub struct Emitter {
    thread: std::thread::JoinHandle<()>,
}

/// How a sink's batches are framed into records.
fn framing(kind: &SinkKind, packs_lines: bool) -> Framing {
    match kind {
        SinkKind::Stdout | SinkKind::File { .. } | SinkKind::Null => Framing::Stream,
        SinkKind::Kinesis(k) => Framing::Records(RecordFraming {
            max_record: k.max_record,
            max_request: k.max_request,
            keys: match k.key {
                PartitionKey::Random => KeyMode::Random,
                PartitionKey::Explicit => KeyMode::Explicit,
                PartitionKey::Field(_) => KeyMode::Field,
            },
            shape: if k.aggregate {
                RecordShape::Aggregated
            } else {
                RecordShape::Single
            },
            compression: k.compression,
        }),
        SinkKind::Firehose(_) => Framing::Records(RecordFraming {
            shape: if packs_lines {
                RecordShape::Lines
            } else {
                RecordShape::Single
            },
            ..RecordFraming::FIREHOSE
        }),
    }
}

/// A sink ready to run.
enum Task {
    Local(Box<Sink>, Option<mpsc::Receiver<Fallback>>),
    Aws(Arc<AwsSink>),
}

impl Emitter {
    /// Builds every sink (asking the services what the cores need to know), then runs one
    /// task per sink on a runtime of its own thread. Returns each sink's plan for the cores.
    pub fn start(
        cfg: &Config,
        ports: Vec<Ports>,
        reporter: Reporter,
        budget: Arc<Budget>,
    ) -> std::io::Result<(Emitter, Vec<Plan>)> {
        // As many threads as cores: the request work (signing, TLS, answers) of every core
        // lands here, and one thread would cap the whole process.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.engine.workers.max(1))
            .thread_name("sluice-emit")
            .enable_all()
            .build()?;
        let (tasks, plans) = rt.block_on(build(cfg, &budget))?;
        let thread = std::thread::Builder::new()
            .name("sluice-emitter".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut handles = Vec::new();
                    for (i, (task, ports)) in tasks.into_iter().zip(ports).enumerate() {
                        let reporter = reporter.clone();
                        handles.push(match task {
                            Task::Local(sink, fallback) => {
                                tokio::spawn(run_sink(i, *sink, ports, reporter, fallback))
                            }
                            Task::Aws(sink) => tokio::spawn(sink.run(ports, reporter)),
                        });
                    }
                    drop(reporter);
                    for h in handles {
                        let _ = h.await;
                    }
                });
                // Writers still blocked past the drain deadline are abandoned, not awaited.
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok((Emitter { thread }, plans))
    }

    /// Waits for every sink to drain, up to `deadline`; returns whether they did.
    pub fn join(self, deadline: Instant) -> bool {
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.thread.join().is_ok()
    }
}

/// Takes batches from every core in turn.
struct Inbox {
    rings: Vec<Consumer<Batch>>,
    next: usize,
}

impl Inbox {
    /// The next batch, or `None` once every core has gone and every ring is empty.
    async fn next(&mut self) -> Option<Batch> {
        poll_fn(|cx| {
            let n = self.rings.len();
            let mut open = 0;
            for k in 0..n {
                let i = (self.next + k) % n;
                match self.rings[i].poll_pop(cx) {
                    Poll::Ready(Some(b)) => {
                        self.next = i + 1;
                        return Poll::Ready(Some(b));
                    }
                    Poll::Ready(None) => {}
                    Poll::Pending => open += 1,
                }
            }
            if open == 0 {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Builds every sink: local ones as they are, AWS ones with their clients and the facts
/// the cores need (shard maps, line packing), each fallback wired to its target.
async fn build(cfg: &Config, budget: &Arc<Budget>) -> std::io::Result<(Vec<Task>, Vec<Plan>)> {
    let workers = cfg.engine.workers;
    let mut fallbacks: Vec<Option<mpsc::Sender<Fallback>>> = vec![None; cfg.sinks.len()];
    let mut fallback_rx: Vec<Option<mpsc::Receiver<Fallback>>> =
        (0..cfg.sinks.len()).map(|_| None).collect();
    for s in &cfg.sinks {
        if let Some(t) = s.fallback
            && fallbacks[t].is_none()
        {
            let (tx, rx) = mpsc::channel(16);
            fallbacks[t] = Some(tx);
            fallback_rx[t] = Some(rx);
        }
    }
    let mut tasks = Vec::new();
    let mut plans = Vec::new();
    for (i, sink) in cfg.sinks.iter().enumerate() {
        let fallback = sink.fallback.and_then(|t| fallbacks[t].clone());
        let no_feeds = || (0..workers).map(|_| None).collect();
        match &sink.kind {
            SinkKind::Stdout | SinkKind::File { .. } | SinkKind::Null => {
                tasks.push(Task::Local(Box::new(sink.clone()), fallback_rx[i].take()));
                plans.push(Plan {
                    framing: framing(&sink.kind, false),
                    key_field: None,
                    feeds: no_feeds(),
                });
            }
            SinkKind::Kinesis(k) => {
                let client = aws::Kinesis::new(k)
                    .await
                    .map_err(|e| std::io::Error::other(format!("sink {}: {e}", sink.name)))?;
                let known = match tokio::time::timeout(k.aws.request_timeout, client.shards()).await
                {
                    Ok(Ok(map)) => Some(map),
                    Ok(Err(e)) => {
                        tracing::warn!(sink = %sink.name, error = %e, "Cannot list the stream's shards yet; retrying in the background");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(sink = %sink.name, "Listing the stream's shards timed out; retrying in the background");
                        None
                    }
                };
                let map = known.clone().unwrap_or_else(ShardMap::unknown);
                let (txs, rxs): (Vec<_>, Vec<_>) =
                    (0..workers).map(|_| crossbeam_channel::unbounded()).unzip();
                let shared = Arc::new(map.clone());
                for tx in &txs {
                    let _ = tx.send(shared.clone());
                }
                tracing::info!(sink = %sink.name, stream = %k.stream, shards = map.len(), "Kinesis sink ready");
                let aws = AwsSink::new(
                    i,
                    sink.name.clone(),
                    Service::Kinesis(client),
                    cfg.engine.dead_letter_dir.clone(),
                    fallback,
                    k.aws.max_concurrency,
                    Some((map, k.shard_headroom, k.shard_refresh)),
                    txs,
                    budget.clone(),
                );
                if known.is_none() {
                    aws.refresh_soon();
                }
                tasks.push(Task::Aws(Arc::new(aws)));
                plans.push(Plan {
                    framing: framing(&sink.kind, false),
                    key_field: match &k.key {
                        PartitionKey::Field(f) => Some(f.as_str().into()),
                        _ => None,
                    },
                    feeds: rxs.into_iter().map(Some).collect(),
                });
            }
            SinkKind::Firehose(f) => {
                let client = aws::Firehose::new(f)
                    .await
                    .map_err(|e| std::io::Error::other(format!("sink {}: {e}", sink.name)))?;
                let packs = match tokio::time::timeout(
                    f.aws.request_timeout,
                    client.packs_lines(f.packing),
                )
                .await
                {
                    Ok(p) => p,
                    Err(_) => {
                        tracing::warn!(sink = %sink.name, "Describing the delivery stream timed out; line packing off");
                        false
                    }
                };
                tracing::info!(sink = %sink.name, stream = %f.delivery_stream, line_packing = packs, "Firehose sink ready");
                let aws = AwsSink::new(
                    i,
                    sink.name.clone(),
                    Service::Firehose(client),
                    cfg.engine.dead_letter_dir.clone(),
                    fallback,
                    f.aws.max_concurrency,
                    None,
                    vec![],
                    budget.clone(),
                );
                tasks.push(Task::Aws(Arc::new(aws)));
                plans.push(Plan {
                    framing: framing(&sink.kind, packs),
                    key_field: None,
                    feeds: no_feeds(),
                });
            }
        }
    }
    Ok((tasks, plans))
}

const REPORT_EVERY: Duration = Duration::from_secs(1);

async fn run_sink(
    index: usize,
    sink: Sink,
    ports: Ports,
    reporter: Reporter,
    mut fallback: Option<mpsc::Receiver<Fallback>>,
) {
    let mut writer: Option<Box<dyn Writer>> = match &sink.kind {
        SinkKind::Stdout => Some(Box::new(Stdout)),
        SinkKind::File {
            path,
            rotate_bytes,
            rotate_age,
        } => Some(Box::new(file::FileWriter::new(
            path.clone(),
            *rotate_bytes,
            *rotate_age,
        ))),
        SinkKind::Null => None,
        SinkKind::Kinesis(_) | SinkKind::Firehose(_) => unreachable!("AWS sinks run in deliver"),
    };
    let mut inbox = Inbox {
        rings: ports.batches,
        next: 0,
    };
    let mut c = SinkCounters::default();
    let mut next_report = tokio::time::Instant::now() + REPORT_EVERY;
    enum Ev {
        Batch(Option<Batch>),
        Fallback(Option<Fallback>),
        Tick,
    }
    // Runs until both its own inbox and the fallback channel are closed: the AWS sinks
    // that fall back here may still be draining after the cores are done.
    let mut inbox_open = true;
    loop {
        let ev = futures_lite::future::or(
            async {
                match inbox_open {
                    true => Ev::Batch(inbox.next().await),
                    false => std::future::pending().await,
                }
            },
            futures_lite::future::or(
                async {
                    match &mut fallback {
                        Some(rx) => Ev::Fallback(rx.recv().await),
                        None => std::future::pending().await,
                    }
                },
                async {
                    tokio::time::sleep_until(next_report).await;
                    Ev::Tick
                },
            ),
        )
        .await;
        let mut batch = match ev {
            Ev::Batch(Some(b)) => b,
            Ev::Batch(None) if fallback.is_none() => break,
            Ev::Batch(None) => {
                inbox_open = false;
                continue;
            }
            Ev::Fallback(None) if !inbox_open => break,
            Ev::Fallback(None) => {
                fallback = None;
                continue;
            }
            Ev::Fallback(Some(f)) => {
                // Records another sink could not deliver, written like a batch of ours.
                let mut b = Batch::default();
                b.data = f.data;
                b.events = f.records as u32;
                if let Some(w) = writer.take() {
                    let (w, back) = write_until_done(&sink.name, w, b, &mut c).await;
                    writer = Some(w);
                    b = back;
                }
                c.records += f.records;
                c.bytes += b.data.len() as u64;
                let _ = f.done.send(());
                continue;
            }
            Ev::Tick => {
                let _ = reporter.send(Report::Sink {
                    sink: index,
                    counters: c,
                    detail: vec![],
                });
                next_report += REPORT_EVERY;
                continue;
            }
        };
        if let Some(w) = writer.take() {
            let (w, b) = write_until_done(&sink.name, w, batch, &mut c).await;
            writer = Some(w);
            batch = b;
        }
        c.batches += 1;
        c.events += batch.events as u64;
        c.bytes += batch.data.len() as u64;
        give_back(&ports.done, batch).await;
        // A busy inbox always wins the race above; report between batches too.
        if tokio::time::Instant::now() >= next_report {
            let _ = reporter.send(Report::Sink {
                sink: index,
                counters: c,
                detail: vec![],
            });
            next_report += REPORT_EVERY;
        }
    }
    if let Some(mut w) = writer
        && let Err(e) = w.close()
    {
        tracing::error!(sink = %sink.name, error = %e, "Closing the sink failed");
    }
    let _ = reporter.send(Report::Sink {
        sink: index,
        counters: c,
        detail: vec![],
    });
}

/// Writes a batch, retrying with backoff until it succeeds.
async fn write_until_done(
    name: &str,
    mut w: Box<dyn Writer>,
    batch: Batch,
    c: &mut SinkCounters,
) -> (Box<dyn Writer>, Batch) {
    let mut backoff = Duration::from_millis(100);
    let mut batch = batch;
    loop {
        let (w2, b, r) = tokio::task::spawn_blocking(move || {
            let r = w.write(&batch.data);
            (w, batch, r)
        })
        .await
        .expect("sink writes do not panic");
        (w, batch) = (w2, b);
        match r {
            Ok(()) => return (w, batch),
            Err(e) => {
                c.write_errors += 1;
                tracing::warn!(sink = name, error = %e, retry_in = ?backoff, "Writing a batch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Returns a settled batch to its core.
async fn give_back(done: &[Producer<Delivered>], batch: Batch) {
    let ring = &done[batch.core];
    let mut batch = Delivered::new(batch);
    loop {
        match ring.push(batch) {
            Ok(()) => return,
            Err(b) => batch = b,
        }
        if ring.is_closed() {
            // The core is gone (past its drain deadline); nobody waits for this batch.
            return;
        }
        poll_fn(|cx| ring.poll_space(cx)).await;
    }
}
