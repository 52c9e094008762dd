//! Criterion benchmarks of request building, one core, no I/O: 200 B JSON records (a
//! Docker log line each) written into request-shaped batches as the core does it, with
//! exact accounting of the service limits (records, bytes of data plus partition keys):
//! - `kinesis/records`: a PutRecords record per event, each with a random partition key;
//! - `kinesis/records+body`: the same, plus the PutRecords body the emitter writes from each
//!   sealed batch (base64 data and keys, into a reused buffer);
//! - `kinesis/aggregated`: KPL aggregates, one shard each, MD5 trailer included;
//! - `kinesis/aggregated+zstd` and `+gzip`: compressed aggregates;
//! - `kinesis/records+zstd`: each record compressed alone;
//! - `firehose/lines`: newline-joined lines packed into PutRecordBatch records, plus the
//!   request body.
//!
//! Throughput is in event bytes. Then, per request of 500 such records:
//! - `sign/put_records_signed`: a pre-built PutRecords body made into the HTTP request that
//!   goes on the wire (its SHA-256, SigV4 signing, headers);
//! - `sign/sha256`: the SHA-256 of the same body alone, the part of signing that is per byte.
//!
//! Run with `cargo bench --bench requests`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::batch::records::{Framing, RecordFraming, RecordShape};
use sluice::batch::shape::Encoded;
use sluice::batch::{Batch, BatchLimits, Batcher};
use sluice::budget::Budget;
use sluice::decode::Codec;
use sluice::emit::body::{self, Target};
use sluice::emit::request::Request;
use sluice::ring::{Consumer, ring};
use sluice::shards::ShardMap;

const EVENTS: usize = 10_000;

/// `EVENTS` Docker-style JSON lines of exactly 200 bytes each.
fn events() -> Vec<Vec<u8>> {
    (0..EVENTS)
        .map(|i| {
            let head = format!(
                "{{\"container_id\":\"4f1a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8\",\"container_name\":\"/web-1\",\"source\":\"stdout\",\"log\":\"{i:08} GET /api/items?page={i} HTTP/1.1 200 "
            );
            let mut line = head.into_bytes();
            line.resize(200 - 3, b'x');
            line.extend_from_slice(b"\"}\n");
            line
        })
        .collect()
}

fn batcher(f: RecordFraming) -> (Batcher, Consumer<Batch>) {
    let (p, c) = ring(64);
    let limits = BatchLimits {
        max_bytes: f.max_request,
        linger: Duration::from_secs(60),
    };
    let mut b = Batcher::new(0, limits, Framing::Records(f), p, Budget::unlimited());
    b.set_shards(Arc::new(ShardMap::even(4)));
    (b, c)
}

/// Writes every event, seals, and hands each sealed batch to `sent` before reusing it.
fn build(
    b: &mut Batcher,
    c: &Consumer<Batch>,
    events: &[Vec<u8>],
    mut sent: impl FnMut(&Batch),
) -> usize {
    let mut records = 0;
    let mut drain = |b: &mut Batcher| {
        while let Some(batch) = c.try_pop() {
            records += batch.records.len();
            sent(&batch);
            b.recycle(batch);
        }
    };
    for e in events {
        b.write(None, |out| {
            out.extend_from_slice(e);
            Encoded::Written.into()
        });
        drain(b);
    }
    b.seal();
    drain(b);
    records
}

fn requests(c: &mut Criterion) {
    let events = events();
    let bytes: usize = events.iter().map(Vec::len).sum();
    let mut g = c.benchmark_group("kinesis");
    g.throughput(Throughput::Bytes(bytes as u64));
    let aggregated = RecordFraming {
        shape: RecordShape::Aggregated,
        ..RecordFraming::KINESIS
    };
    let cases = [
        ("records", RecordFraming::KINESIS, false),
        ("records+body", RecordFraming::KINESIS, true),
        ("aggregated", aggregated, false),
        (
            "aggregated+zstd",
            RecordFraming {
                compression: Some(Codec::Zstd),
                ..aggregated
            },
            false,
        ),
        (
            "aggregated+gzip",
            RecordFraming {
                compression: Some(Codec::Gzip),
                ..aggregated
            },
            false,
        ),
        (
            "records+zstd",
            RecordFraming {
                compression: Some(Codec::Zstd),
                ..RecordFraming::KINESIS
            },
            false,
        ),
    ];
    let mut out = Vec::new();
    for (name, framing, with_body) in cases {
        let (mut b, c) = batcher(framing);
        g.bench_function(name, |bench| {
            bench.iter(|| {
                build(&mut b, &c, &events, |batch| {
                    if with_body {
                        let all: Vec<usize> = (0..batch.records.len()).collect();
                        body::write(&mut out, Target::StreamName("load"), batch, &all);
                        black_box(&out);
                    }
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("firehose");
    g.throughput(Throughput::Bytes(bytes as u64));
    let (mut b, c) = batcher(RecordFraming::FIREHOSE);
    g.bench_function("lines", |bench| {
        bench.iter(|| {
            build(&mut b, &c, &events, |batch| {
                let all: Vec<usize> = (0..batch.records.len()).collect();
                body::write(&mut out, Target::DeliveryStream("load"), batch, &all);
                black_box(&out);
            })
        })
    });
    g.finish();
}

/// One 500-record PutRecords request made ready for the wire: its body hashed, signed, and
/// put in an HTTP request (`request::Request::signed`), everything a request costs before
/// TLS and the socket.
fn sign(c: &mut Criterion) {
    use aws_credential_types::Credentials;
    let events = events();
    let (mut b, ring) = batcher(RecordFraming::KINESIS);
    let mut body = Vec::new();
    build(&mut b, &ring, &events[..500], |batch| {
        let all: Vec<usize> = (0..batch.records.len()).collect();
        body::write(&mut body, Target::StreamName("load"), batch, &all);
    });
    let body = bytes::Bytes::from(body);
    let req = Request::new(
        "https://kinesis.us-east-1.amazonaws.com",
        "us-east-1".into(),
        "kinesis",
        "Kinesis_20131202.PutRecords",
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    let id = Credentials::new("a", "b", None, None, "bench").into();
    let mut g = c.benchmark_group("sign");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("put_records_signed", |bench| {
        bench.iter(|| black_box(req.signed(body.clone(), &id, std::time::SystemTime::now())))
    });
    g.bench_function("sha256", |bench| {
        use sha2::Digest;
        bench.iter(|| black_box(sha2::Sha256::digest(&body)))
    });
    g.finish();
}

criterion_group!(benches, requests, sign);
criterion_main!(benches);
