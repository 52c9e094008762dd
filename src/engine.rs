//! Start-up and shutdown. Chooses the I/O backend, binds the inputs, builds the rings,
//! starts the emitter and one core per worker (pinned to the CPUs this process may use),
//! and on SIGTERM or SIGINT runs the shutdown order in ARCHITECTURE.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accept::{self, epoll, http, serve, uring};
use crate::budget::Budget;
use crate::config::{Config, IoBackend};
use crate::emit::{Emitter, Ports};
use crate::metrics;
use crate::probe;
use crate::ring::ring;
use crate::shard::CoreSink;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error(transparent)]
    Bind(#[from] accept::BindError),
    #[error("{0}")]
    Start(String),
}

/// The backend the cores run on, and why.
fn choose(io: IoBackend) -> Result<(IoBackend, String), probe::ProbeError> {
    match io {
        IoBackend::Epoll => Ok((IoBackend::Epoll, "configured".into())),
        IoBackend::Uring => probe::check_uring().map(|()| (IoBackend::Uring, "configured".into())),
        IoBackend::Auto => match probe::check_uring() {
            Ok(()) => Ok((IoBackend::Uring, "io_uring available".into())),
            Err(e) => Ok((IoBackend::Epoll, e.reason())),
        },
    }
}

/// Runs until a shutdown signal has been handled.
pub fn run(cfg: Config) -> Result<(), EngineError> {
    let (io, why) = choose(cfg.engine.io)?;
    let io_name = match io {
        IoBackend::Epoll => "epoll",
        _ => "uring",
    };
    if cfg.engine.io == IoBackend::Auto && io == IoBackend::Epoll {
        tracing::info!("{why}: using epoll");
    }
    let mut bound = accept::bind(&cfg)?;
    // The HTTP inputs answer from now on: `/ready` says "starting" until the cores run.
    let status = Arc::new(http::Status::default());
    let scrape = metrics::Scrape::new(io_name);
    let http = match std::mem::take(&mut bound.http) {
        l if l.is_empty() => None,
        l => Some(
            http::start(l, status.clone(), scrape.clone())
                .map_err(|e| EngineError::Start(format!("cannot start the HTTP inputs: {e}")))?,
        ),
    };
    let cfg = Arc::new(cfg);
    let workers = cfg.engine.workers;

    let budget = Budget::new(cfg.engine.memory_limit, workers);
    // One ring each way per (core, sink).
    let cap = cfg.engine.ring_capacity;
    let mut core_rings: Vec<Vec<CoreSink>> = (0..workers).map(|_| Vec::new()).collect();
    let mut ports: Vec<Ports> = Vec::new();
    for _ in &cfg.sinks {
        let mut p = Ports {
            batches: Vec::new(),
            done: Vec::new(),
        };
        for rings in core_rings.iter_mut() {
            let (batches, batches_rx) = ring(cap);
            let (done_tx, done) = ring(2 * cap + 2);
            rings.push(CoreSink::stream(batches, done, budget.clone()));
            p.batches.push(batches_rx);
            p.done.push(done_tx);
        }
        ports.push(p);
    }

    let (reporter, reports) = crossbeam_channel::unbounded();
    let names = cfg
        .sinks
        .iter()
        .map(|s| {
            let aws = matches!(
                s.kind,
                crate::config::SinkKind::Kinesis(_) | crate::config::SinkKind::Firehose(_)
            );
            (s.name.clone(), aws)
        })
        .collect();
    let names = metrics::Names {
        sinks: names,
        inputs: cfg.inputs.iter().map(|i| i.name.clone()).collect(),
        routes: cfg.routes.iter().map(|r| r.patterns.join(" ")).collect(),
    };
    let interval = cfg.engine.stats_interval;
    let stats = std::thread::Builder::new()
        .name("sluice-stats".into())
        .spawn({
            let budget = budget.clone();
            move || metrics::collect(reports, workers, names, interval, &budget, &scrape)
        })
        .map_err(|e| EngineError::Start(format!("cannot start the stats thread: {e}")))?;
    let (emitter, mut plans) = Emitter::start(&cfg, ports, reporter.clone(), budget.clone())
        .map_err(|e| EngineError::Start(format!("cannot start the emitter: {e}")))?;
    // What the emitter learned from the services shapes each core's batches.
    for (core, sinks) in core_rings.iter_mut().enumerate() {
        for (sink, plan) in sinks.iter_mut().zip(plans.iter_mut()) {
            sink.framing = plan.framing;
            sink.key_field = plan.key_field.clone();
            sink.shards = plan.feeds[core].take();
        }
    }

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);
    watch_signals(stop.clone(), status.clone())?;

    // Each core replays the segments of `core-N` for N % workers == core.
    let mut replay: Vec<Vec<std::path::PathBuf>> = vec![Vec::new(); workers];
    if let Some(w) = &cfg.wal {
        let found = crate::wal::list(&w.dir).map_err(|e| {
            EngineError::Start(format!("wal.dir: cannot read {}: {e}", w.dir.display()))
        })?;
        for (n, segs) in found {
            replay[n % workers].extend(segs);
        }
    }
    let cpus = allowed_cpus();
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let mut cores = Vec::new();
    let mut http_jobs = Vec::new();
    for (core, (sockets, rings)) in bound.cores.into_iter().zip(core_rings).enumerate() {
        let (jobs, jobs_rx) = tokio::sync::mpsc::channel(http::JOB_QUEUE);
        http_jobs.push(jobs);
        let cpu = match cpus.get(core) {
            Some(&cpu) if cpus.len() >= workers => Some(cpu),
            _ => None,
        };
        let ctx = serve::CoreCtx {
            core,
            cfg: cfg.clone(),
            sockets,
            rings,
            reporter: reporter.clone(),
            shutdown: stop_rx.clone(),
            ready: ready_tx.clone(),
            http: jobs_rx,
            replay: std::mem::take(&mut replay[core]),
        };
        let handle = match io {
            IoBackend::Epoll => epoll::start(ctx, cpu),
            _ => uring::start(ctx, cpu),
        }
        .map_err(EngineError::Start)?;
        cores.push(handle);
    }
    // Kept to tell the collector the end has come, whatever the sinks are doing.
    let end = reporter.clone();
    drop(reporter);
    drop(ready_tx);

    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => {
                let _ = stop.send(true);
                return Err(EngineError::Start(msg));
            }
            Err(_) => {
                let _ = stop.send(true);
                return Err(EngineError::Start("a core stopped during start-up".into()));
            }
        }
    }
    drop(bound.reservations);
    if let Some(h) = &http {
        let _ = h.cores.set(http_jobs);
    }
    status.set_ready();
    for (input, addr) in cfg.inputs.iter().zip(&bound.addrs) {
        let tcp = accept::uses_tcp(&input.kind);
        let udp = accept::uses_udp(&input.kind);
        let protocols = match (tcp, udp) {
            _ if matches!(input.kind, crate::config::InputKind::Http { .. }) => "http",
            (true, true) => "tcp+udp",
            (true, false) => "tcp",
            _ => "udp",
        };
        tracing::info!(input = %input.name, address = %addr, protocols, "Listening");
    }
    tracing::info!(workers, io = io_name, reason = %why, "Sluice is ready");

    for (core, h) in cores.into_iter().enumerate() {
        if let Err(e) = h() {
            tracing::error!(core, error = %e, "Core stopped with an error");
        }
    }
    // The cores have drained: the HTTP inputs, which said "draining" meanwhile, close.
    if let Some(h) = http {
        h.stop();
    }
    // The cores have settled what they could; give the sinks what is left of the drain.
    let deadline = Instant::now() + Duration::from_secs(1);
    if !emitter.join(deadline) {
        tracing::warn!("Sinks still busy at the drain deadline; exiting without them");
    }
    // The final totals are logged either way.
    let _ = end.send(metrics::Report::End);
    let _ = stats.join();
    Ok(())
}

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
fn watch_signals(
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    status: Arc<http::Status>,
) -> Result<(), EngineError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| EngineError::Start(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("sluice-signals".into())
        .spawn(move || {
            let mut forever = signals.forever();
            if let Some(sig) = forever.next() {
                tracing::info!(
                    signal = sig,
                    "Shutting down: draining inputs and sinks (signal again to exit at once)"
                );
                status.set_draining();
                let _ = stop.send(true);
            }
            if let Some(sig) = forever.next() {
                tracing::warn!(signal = sig, "Exiting at once");
                std::process::exit(130);
            }
        })
        .map_err(|e| EngineError::Start(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}
