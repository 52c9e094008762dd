//! The one integration-test binary: it starts the real `sluice` binary on loopback ports
//! and talks to it with real clients. Run it through `tests/run.sh`, which installs the
//! clients first.

mod backpressure;
mod bad_input;
mod cli;
mod clients;
mod emulators;
#[path = "../support/fake_aws.rs"]
mod fake_aws;
mod faults;
mod forward;
mod frames;
mod harness;
mod hostile;
mod http;
mod json_lines;
mod kinesis;
#[path = "../support/forward.rs"]
mod support;
mod tracer;
mod wal;
