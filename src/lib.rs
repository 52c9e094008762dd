//! Sluice: a thread-per-core log forwarder. Fluentd Forward and JSON lines in, routed by
//! tag, batched, and written to sinks.
//!
//! The modules follow the data path (see ARCHITECTURE.md): `accept` → `conn` → `decode` →
//! `route` → `batch` → `ring` → `emit` → `ack`, with `shard` holding one core's state
//! between them, `config` and `probe` before start-up, and `engine` tying it together.

pub mod accept;
pub mod ack;
pub mod batch;
pub mod budget;
pub mod config;
pub mod conn;
pub mod decode;
pub mod emit;
pub mod engine;
pub mod harness;
pub mod limits;
pub mod metrics;
pub mod probe;
pub mod ring;
pub mod route;
pub mod shard;
pub mod shards;
pub mod wal;

/// Forward frames built with rmp and rmpv, shared with the integration tests and benches.
#[cfg(test)]
#[path = "../tests/support/forward.rs"]
pub(crate) mod test_frames;
