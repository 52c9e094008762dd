//! Counters: plain integers owned by each core and each sink task, sent as snapshots to
//! one collector thread that merges them and logs the totals at an interval (a metrics
//! endpoint will read the same merged totals). Nothing on the hot path is shared.

use std::time::Duration;

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
        connections_opened,
        connections_closed,
        /// Connections closed at once because the input was at `max_connections`.
        connections_refused,
        acks_sent,
        heartbeats,
        /// Times a connection stopped reading because its core's batches were held.
        backpressure_waits,
        /// Events larger than their sink's record limit, dead-lettered.
        events_oversize,
        /// Events whose partition key field was missing or unusable (a random key was used).
        partition_key_missing,
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
    },
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
    pub sinks: Vec<SinkTotal>,
    /// The memory budget: charged now, the most it was, and its limit.
    pub memory: [u64; 3],
}

/// One sink's counters, by name, with their detail.
#[derive(Clone, Debug, Default)]
pub struct SinkTotal {
    pub name: String,
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
            counters,
            detail,
        } in &self.sinks
        {
            for (k, v) in counters.fields() {
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

/// Merges reports and logs the totals every `interval`, and once more when every sender
/// is gone. Returns the final totals.
pub fn collect(
    rx: Receiver<Report>,
    cores: usize,
    sink_names: Vec<String>,
    interval: Duration,
    budget: &Budget,
) -> Totals {
    let mut per_core = vec![(CoreCounters::default(), [0u64; DecodeError::NAMES.len()]); cores];
    let mut per_sink = vec![(SinkCounters::default(), Vec::new()); sink_names.len()];
    let totals = |per_core: &[(CoreCounters, ErrorCounts)],
                  per_sink: &[(SinkCounters, Vec<(String, u64)>)]| {
        let mut t = Totals {
            memory: [budget.used(), budget.peak(), budget.limit()].map(|n| n as u64),
            ..Totals::default()
        };
        for (c, e) in per_core {
            t.core.merge(c);
            for (a, b) in t.errors.iter_mut().zip(e) {
                *a += b;
            }
        }
        t.sinks = sink_names
            .iter()
            .zip(per_sink)
            .map(|(n, (c, d))| SinkTotal {
                name: n.clone(),
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
            }) => per_core[core] = (counters, errors),
            Ok(Report::Sink {
                sink,
                counters,
                detail,
            }) => per_sink[sink] = (counters, detail),
            Err(RecvTimeoutError::Timeout) => {
                tracing::info!(target: "sluice::stats", "Stats {}", totals(&per_core, &per_sink).line());
                next += interval;
            }
            Err(RecvTimeoutError::Disconnected) => {
                let t = totals(&per_core, &per_sink);
                tracing::info!(target: "sluice::stats", "Final stats {}", t.line());
                return t;
            }
        }
    }
}

/// A sender of reports, kept by each core and sink task.
pub type Reporter = Sender<Report>;
