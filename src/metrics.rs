//! Counters: plain integers owned by each core and each sink task, sent as snapshots to
//! one collector thread that merges them and logs the totals at an interval. `/metrics`
//! renders the same merged totals in the Prometheus (OpenMetrics) text format. Nothing on
//! the hot path is shared.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::budget::Budget;
use crate::decode::DecodeError;

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name { $($(#[$fm])* pub $field: u64),* }

        impl $name {
            pub fn merge(&mut self, o: &Self) {
                $(self.$field += o.$field;)*
            }

            pub fn fields(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($field), self.$field)),*].into_iter()
            }
        }
    };
}

counters!(
    /// One core's input side.
    CoreCounters {
        /// Events decoded and handed to routing.
        events_in,
        bytes_in,
        frames_in,
        /// Events no route matched.
        events_unmatched,
        /// Events of `format = "text"` routes without their `log_key` field.
        missing_log_key,
        /// Ext values in records (other than EventTime) written as JSON `null`.
        ext_values_nulled,
        connections_opened,
        connections_closed,
        /// Connections closed at once because the input was at `max_connections`.
        connections_refused,
        /// Connections closed to give their buffers' memory to others.
        connections_evicted,
        /// Connections closed by `idle_timeout`, and by `frame_timeout`.
        connections_idle,
        connections_slow,
        /// Idle connections closed at `max_connections` to make room for a new one.
        connections_replaced,
        /// Times a connection waited for peers' share of the memory budget.
        memory_waits,
        acks_sent,
        heartbeats,
        /// Times a connection stopped reading because its core's batches were held.
        backpressure_waits,
        /// Events larger than their sink's record limit, dead-lettered.
        events_oversize,
        /// Events whose partition key field was missing or unusable (a random key was used).
        partition_key_missing,
        /// HTTP ingest requests whose records were routed.
        http_requests,
        /// Sealed batches in the cores' rings now, waiting for the emitter (a gauge).
        ring_batches,
        /// Sealed batches the cores hold back for want of ring room or budget (a gauge).
        held_batches,
        /// Events read but not confirmed delivered when the drain deadline came (set once,
        /// at shutdown).
        events_undelivered,
        /// Write-ahead log: entries journaled, their bytes, and group commits.
        wal_entries,
        wal_bytes,
        wal_commits,
        /// Entries read back and ingested again at start-up.
        wal_replayed,
        /// Damaged entries skipped at start-up.
        wal_damaged,
        /// Bytes of unsettled entries dropped by `full = "drop_oldest"`.
        wal_dropped_bytes,
        wal_write_errors,
        /// Bytes of the segments on disk, until they are settled and deleted (a gauge).
        wal_live_bytes,
    }
);

counters!(
    /// One sink's output side.
    SinkCounters {
        batches,
        events,
        bytes,
        write_errors,
        /// AWS sinks: records accepted by the service.
        records,
        requests,
        /// Records sent again (after a throttle, a failure or no answer).
        retries,
        /// Answers that said to slow down.
        throttles,
        /// Records the service failed, whatever became of them.
        failed,
        dead_lettered,
        /// Records set down in the route's fallback sink.
        fallback,
        /// The AIMD limit of requests in flight (a gauge).
        concurrency,
        shard_refreshes,
        /// Times a shard's rate was cut because its records were throttled.
        shard_cuts,
    }
);

impl SinkCounters {
    /// Whether a counter means anything for a sink of this kind: local sinks (stdout,
    /// file, null) write batches; only AWS sinks make requests.
    pub fn applies(field: &str, aws: bool) -> bool {
        match field {
            "batches" | "events" | "bytes" => true,
            "write_errors" => !aws,
            _ => aws,
        }
    }
}

counters!(
    /// One input's share of the core counters.
    InputCounters {
        events_in,
        bytes_in,
        connections_opened,
        connections_closed,
    }
);

/// Decode errors by kind, indexed by [`DecodeError::index`].
pub type ErrorCounts = [u64; DecodeError::NAMES.len()];

/// A snapshot sent to the collector (once a second per core and sink, so its size does
/// not matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Report {
    Core {
        core: usize,
        counters: CoreCounters,
        errors: ErrorCounts,
        /// By input, as the config lists them.
        inputs: Vec<InputCounters>,
        /// Events each route took, as the config lists them.
        routes: Vec<u64>,
    },
    /// Shutdown is over: log the final totals now, whoever has not reported.
    End,
    Sink {
        sink: usize,
        counters: SinkCounters,
        /// Named values that vary: failures by error code, each shard's rate.
        detail: Vec<(String, u64)>,
    },
}

/// Totals merged from the latest snapshot of every core and sink.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub core: CoreCounters,
    pub errors: ErrorCounts,
    /// `(input name, its counters)`.
    pub inputs: Vec<(String, InputCounters)>,
    /// `(route index, its patterns, events it took)`.
    pub routes: Vec<(String, String, u64)>,
    pub sinks: Vec<SinkTotal>,
    /// The memory budget: charged now, the most it was, and its limit.
    pub memory: [u64; 3],
}

/// One sink's counters, by name, with their detail.
#[derive(Clone, Debug, Default)]
pub struct SinkTotal {
    pub name: String,
    /// A Kinesis or Firehose sink: it has requests, retries and the rest.
    pub aws: bool,
    pub counters: SinkCounters,
    pub detail: Vec<(String, u64)>,
}

impl Totals {
    /// `key=value` pairs, zero-valued error kinds left out.
    pub fn line(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for (k, v) in self.core.fields() {
            let _ = write!(s, "{k}={v} ");
        }
        let [used, peak, limit] = self.memory;
        let _ = write!(
            s,
            "memory_used={used} memory_peak={peak} memory_limit={limit} "
        );
        for (i, n) in self.errors.iter().enumerate() {
            if *n > 0 {
                let _ = write!(s, "errors.{}={n} ", DecodeError::NAMES[i]);
            }
        }
        for SinkTotal {
            name,
            aws,
            counters,
            detail,
        } in &self.sinks
        {
            for (k, v) in counters
                .fields()
                .filter(|(k, _)| SinkCounters::applies(k, *aws))
            {
                let _ = write!(s, "sink.{name}.{k}={v} ");
            }
            for (k, v) in detail {
                let _ = write!(s, "sink.{name}.{k}={v} ");
            }
        }
        s.pop();
        s
    }
}

/// The latest merged totals, for `/metrics`.
#[derive(Clone, Debug)]
pub struct Scrape {
    latest: Arc<Mutex<Totals>>,
    /// The I/O backend the cores run on.
    io: &'static str,
}

impl Scrape {
    pub fn new(io: &'static str) -> Self {
        Scrape {
            latest: Arc::default(),
            io,
        }
    }

    fn set(&self, t: Totals) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// The totals in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Help for the input counters, by field.
fn core_help(field: &str) -> &'static str {
    match field {
        "events_in" => "Events decoded and handed to routing",
        "bytes_in" => "Bytes read from inputs",
        "frames_in" => "Forward frames read",
        "events_unmatched" => "Events no route matched",
        "missing_log_key" => "Events of text routes without their log_key field",
        "ext_values_nulled" => "Ext values in records, other than EventTime, written as JSON null",
        "connections_opened" => "Connections accepted",
        "connections_closed" => "Connections ended",
        "connections_refused" => "Connections refused at max_connections",
        "connections_evicted" => "Connections closed to give their buffers' memory to others",
        "connections_idle" => "Connections closed by idle_timeout",
        "connections_slow" => "Connections closed by frame_timeout",
        "connections_replaced" => "Idle connections closed at max_connections for a new one",
        "memory_waits" => "Times a connection waited for the input memory",
        "acks_sent" => "Forward acks written",
        "heartbeats" => "Forward UDP heartbeats answered",
        "backpressure_waits" => "Times a connection waited for its core's batches",
        "events_oversize" => "Events larger than their sink's record limit",
        "partition_key_missing" => "Events whose partition key field was missing",
        "http_requests" => "HTTP ingest requests whose records were routed",
        "ring_batches" => "Sealed batches in the cores' rings, waiting for the emitter",
        "held_batches" => "Sealed batches held back for want of ring room or memory budget",
        "events_undelivered" => "Events not confirmed delivered at the drain deadline",
        "wal_entries" => "Entries written to the write-ahead log",
        "wal_bytes" => "Bytes written to the write-ahead log",
        "wal_commits" => "Group commits (write and fdatasync) of the write-ahead log",
        "wal_replayed" => "Write-ahead log entries replayed at start-up",
        "wal_damaged" => "Damaged write-ahead log entries skipped at start-up",
        "wal_dropped_bytes" => "Unsettled write-ahead log bytes dropped when it was full",
        "wal_write_errors" => "Write-ahead log commits that failed and were retried",
        "wal_live_bytes" => "Bytes of write-ahead log segments on disk, deleted once settled",
        _ => "",
    }
}

fn sink_help(field: &str) -> &'static str {
    match field {
        "batches" => "Batches sent",
        "events" => "Events sent",
        "bytes" => "Bytes sent",
        "write_errors" => "Local sinks: writes that failed",
        "records" => "AWS sinks: records the service accepted",
        "requests" => "AWS sinks: requests made",
        "retries" => "Records sent again",
        "throttles" => "Answers that said to slow down",
        "failed" => "Records the service failed",
        "dead_lettered" => "Records written to the dead-letter directory",
        "fallback" => "Records set down in the route's fallback sink",
        "concurrency" => "The AIMD limit of requests in flight",
        "shard_refreshes" => "Times the stream's shards were listed again",
        "shard_cuts" => "Times a shard's rate was cut after a throttle",
        _ => "",
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One family with a value per label set.
fn family<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: impl Iterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in rows {
        let m = m.encode_family(&labels)?;
        match ty {
            MetricType::Counter => ConstCounter::new(v).encode(m)?,
            _ => ConstGauge::new(v as i64).encode(m)?,
        }
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let t = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (k, v) in t.core.fields() {
            match k {
                "ring_batches" | "held_batches" | "wal_live_bytes" => {
                    gauge(&mut e, &format!("sluice_{k}"), core_help(k), v)?
                }
                _ => counter(&mut e, &format!("sluice_{k}"), core_help(k), v)?,
            }
        }
        let open = t
            .core
            .connections_opened
            .saturating_sub(t.core.connections_closed);
        gauge(
            &mut e,
            "sluice_connections_open",
            "Connections open now",
            open,
        )?;
        family(
            &mut e,
            "sluice_input_errors",
            "Input refused, by kind",
            MetricType::Counter,
            t.errors
                .iter()
                .enumerate()
                .map(|(i, n)| (vec![("kind", DecodeError::NAMES[i])], *n)),
        )?;
        let fields: Vec<&'static str> = InputCounters::default().fields().map(|(k, _)| k).collect();
        for (i, k) in fields.iter().enumerate() {
            let rows = t.inputs.iter().map(|(name, c)| {
                let v = c.fields().nth(i).map_or(0, |(_, v)| v);
                (vec![("input", name.as_str())], v)
            });
            let name = format!("sluice_input_{k}");
            family(&mut e, &name, core_help(k), MetricType::Counter, rows)?;
        }
        family(
            &mut e,
            "sluice_route_events",
            "Events each route took",
            MetricType::Counter,
            t.routes
                .iter()
                .map(|(i, m, n)| (vec![("route", i.as_str()), ("match", m.as_str())], *n)),
        )?;
        let [used, peak, limit] = t.memory;
        gauge(
            &mut e,
            "sluice_memory_used_bytes",
            "Memory budget charged now",
            used,
        )?;
        gauge(
            &mut e,
            "sluice_memory_peak_bytes",
            "Most memory budget ever charged",
            peak,
        )?;
        gauge(
            &mut e,
            "sluice_memory_limit_bytes",
            "engine.memory_limit",
            limit,
        )?;
        family(
            &mut e,
            "sluice_io_backend",
            "The I/O backend the cores run on",
            MetricType::Gauge,
            std::iter::once((vec![("backend", self.io)], 1)),
        )?;
        let fields: Vec<&'static str> = SinkCounters::default().fields().map(|(k, _)| k).collect();
        for (i, k) in fields.iter().enumerate() {
            let ty = match *k {
                "concurrency" => MetricType::Gauge,
                _ => MetricType::Counter,
            };
            let rows = t
                .sinks
                .iter()
                .filter(|s| SinkCounters::applies(k, s.aws))
                .map(|s| {
                    let v = s.counters.fields().nth(i).map_or(0, |(_, v)| v);
                    (vec![("sink", s.name.as_str())], v)
                });
            family(&mut e, &format!("sluice_sink_{k}"), sink_help(k), ty, rows)?;
        }
        family(
            &mut e,
            "sluice_sink_failed_by_code",
            "Records the service failed, by error code",
            MetricType::Counter,
            t.sinks.iter().flat_map(|s| {
                s.detail.iter().filter_map(|(k, v)| {
                    let code = k.strip_prefix("failed.")?;
                    Some((vec![("sink", s.name.as_str()), ("code", code)], *v))
                })
            }),
        )?;
        family(
            &mut e,
            "sluice_sink_shard_rate",
            "Records a second allowed to a shard slowed below the full rate",
            MetricType::Gauge,
            t.sinks.iter().flat_map(|s| {
                s.detail.iter().filter_map(|(k, v)| {
                    let shard = k.strip_prefix("shard.")?.strip_suffix(".rate")?;
                    Some((vec![("sink", s.name.as_str()), ("shard", shard)], *v))
                })
            }),
        )?;
        Ok(())
    }
}

/// Merges reports and logs the totals every `interval`, and once more when every sender
/// is gone; `scrape` always holds the latest. Returns the final totals.
/// What the collector labels its totals with.
pub struct Names {
    /// Each sink's name, and whether it is an AWS sink.
    pub sinks: Vec<(String, bool)>,
    pub inputs: Vec<String>,
    /// Each route's patterns.
    pub routes: Vec<String>,
}

type CoreSnapshot = (CoreCounters, ErrorCounts, Vec<InputCounters>, Vec<u64>);

pub fn collect(
    rx: Receiver<Report>,
    cores: usize,
    names: Names,
    interval: Duration,
    budget: &Budget,
    scrape: &Scrape,
) -> Totals {
    let Names {
        sinks: sink_names,
        inputs: input_names,
        routes: route_names,
    } = names;
    let empty: CoreSnapshot = (
        CoreCounters::default(),
        [0u64; DecodeError::NAMES.len()],
        vec![InputCounters::default(); input_names.len()],
        vec![0; route_names.len()],
    );
    let mut per_core = vec![empty; cores];
    let mut per_sink = vec![(SinkCounters::default(), Vec::new()); sink_names.len()];
    let totals = |per_core: &[CoreSnapshot], per_sink: &[(SinkCounters, Vec<(String, u64)>)]| {
        let mut t = Totals {
            memory: [budget.used(), budget.peak(), budget.limit()].map(|n| n as u64),
            ..Totals::default()
        };
        t.inputs = input_names
            .iter()
            .map(|n| (n.clone(), InputCounters::default()))
            .collect();
        t.routes = route_names
            .iter()
            .enumerate()
            .map(|(i, p)| (i.to_string(), p.clone(), 0))
            .collect();
        for (c, e, inputs, routes) in per_core {
            t.core.merge(c);
            for (a, b) in t.errors.iter_mut().zip(e) {
                *a += b;
            }
            for ((_, a), b) in t.inputs.iter_mut().zip(inputs) {
                a.merge(b);
            }
            for ((_, _, a), b) in t.routes.iter_mut().zip(routes) {
                *a += b;
            }
        }
        t.sinks = sink_names
            .iter()
            .zip(per_sink)
            .map(|((n, aws), (c, d))| SinkTotal {
                name: n.clone(),
                aws: *aws,
                counters: *c,
                detail: d.clone(),
            })
            .collect();
        t
    };
    let mut next = std::time::Instant::now() + interval;
    loop {
        let wait = next.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Report::Core {
                core,
                counters,
                errors,
                inputs,
                routes,
            }) => {
                per_core[core] = (counters, errors, inputs, routes);
                scrape.set(totals(&per_core, &per_sink));
            }
            Ok(Report::Sink {
                sink,
                counters,
                detail,
            }) => {
                per_sink[sink] = (counters, detail);
                scrape.set(totals(&per_core, &per_sink));
            }
            Err(RecvTimeoutError::Timeout) => {
                tracing::info!(target: "sluice::stats", "Stats {}", totals(&per_core, &per_sink).line());
                next += interval;
            }
            Ok(Report::End) | Err(RecvTimeoutError::Disconnected) => {
                let t = totals(&per_core, &per_sink);
                tracing::info!(target: "sluice::stats", "Final stats {}", t.line());
                return t;
            }
        }
    }
}

/// A sender of reports, kept by each core and sink task.
pub type Reporter = Sender<Report>;
