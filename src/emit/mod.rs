//! Emit stage: the sink tasks. A tokio runtime beside the glommio cores runs one task per
//! sink; each takes sealed batches from every core's ring, writes them, and hands each
//! one back to its core through the completion ring, which settles the batch's acks.
//!
//! A write that fails is retried with backoff, never dropped: a batch is only handed back
//! once its sink has it.

mod file;

use std::future::poll_fn;
use std::io::Write;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::batch::Batch;
use crate::config::{Sink, SinkKind};
use crate::metrics::{Report, Reporter, SinkCounters};
use crate::ring::{Consumer, Producer};

/// One sink's ends of every core's rings, indexed by core.
pub struct Ports {
    pub batches: Vec<Consumer<Batch>>,
    pub done: Vec<Producer<Batch>>,
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

impl Emitter {
    /// Starts one task per sink.
    pub fn start(
        sinks: Vec<Sink>,
        ports: Vec<Ports>,
        reporter: Reporter,
    ) -> std::io::Result<Emitter> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-emit")
            .enable_time()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("sluice-emitter".into())
            .spawn(move || {
                rt.block_on(async move {
                    let tasks: Vec<_> = sinks
                        .into_iter()
                        .zip(ports)
                        .enumerate()
                        .map(|(i, (sink, ports))| {
                            tokio::spawn(run_sink(i, sink, ports, reporter.clone()))
                        })
                        .collect();
                    drop(reporter);
                    for t in tasks {
                        let _ = t.await;
                    }
                });
                // Writers still blocked past the drain deadline are abandoned, not awaited.
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(Emitter { thread })
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

const REPORT_EVERY: Duration = Duration::from_secs(1);

async fn run_sink(index: usize, sink: Sink, ports: Ports, reporter: Reporter) {
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
    };
    let mut inbox = Inbox {
        rings: ports.batches,
        next: 0,
    };
    let mut c = SinkCounters::default();
    let mut next_report = tokio::time::Instant::now() + REPORT_EVERY;
    loop {
        let next = futures_lite::future::or(async { Some(inbox.next().await) }, async {
            tokio::time::sleep_until(next_report).await;
            None
        })
        .await;
        let mut batch = match next {
            Some(Some(b)) => b,
            Some(None) => break,
            None => {
                let _ = reporter.send(Report::Sink {
                    sink: index,
                    counters: c,
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
            });
            next_report += REPORT_EVERY;
        }
    }
    if let Some(mut w) = writer {
        if let Err(e) = w.close() {
            tracing::error!(sink = %sink.name, error = %e, "Closing the sink failed");
        }
    }
    let _ = reporter.send(Report::Sink {
        sink: index,
        counters: c,
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
async fn give_back(done: &[Producer<Batch>], batch: Batch) {
    let ring = &done[batch.core];
    let mut batch = batch;
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
