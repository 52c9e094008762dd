//! Criterion benchmarks of the per-core hot path, one core, no I/O:
//! - `forward_decode/<mode>/<size>`: find, validate and iterate the events of Forward
//!   frames in every mode, with 200 B and 2 KiB Docker-style records;
//! - `packed_to_json/<size>`: PackedForward decode plus transcoding to JSON lines, the
//!   path a Docker log takes to a JSON sink (`200B` is the 1 GB/s per core bar), and
//!   `200B+tag+time` with the tag and an RFC 3339 time added to each event;
//! - `transcode/<size>`: msgpack → JSON of records alone;
//! - `json_lines/<size>`: line framing, simd-json validation and re-encoding.
//!
//! Throughput is in input bytes. Run with `cargo bench --bench decode`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rmpv::Value;
use sluice::batch::shape::{Shape, ShapeConfig};
use sluice::decode::EventTime;
use sluice::decode::forward::{Decoded, Decoder, Scratch};
use sluice::decode::jsonl::{Framed, JsonParser, Lines};
use sluice::limits::JSON_PADDING;

#[path = "../tests/support/forward.rs"]
mod support;
use support::{Mode, Opts, Time, docker_record, frame};

const EVENTS_PER_FRAME: usize = 1000;

/// A stream of frames holding about 1 MiB of records of `size` bytes.
fn stream(mode: Mode, size: usize) -> Vec<u8> {
    let per = if mode == Mode::Message {
        1
    } else {
        EVENTS_PER_FRAME
    };
    let events: Vec<_> = (0..per)
        .map(|i| {
            (
                Time::FixExt8(1_700_000_000, i as u32),
                docker_record(i, size),
            )
        })
        .collect();
    let one = frame(mode, "docker.web", &events, Opts::default());
    one.repeat(((1 << 20) / (size * per)).max(1))
}

/// Decodes a stream and calls `f` for each event; returns the event count.
fn decode(
    stream: &[u8],
    scratch: &mut Scratch,
    mut f: impl FnMut(&str, EventTime, &[u8]),
) -> usize {
    let mut dec = Decoder::new(64 << 20);
    let mut pos = 0;
    let mut n = 0;
    while pos < stream.len() {
        match dec.decode(&stream[pos..]).unwrap() {
            Decoded::Frame(frame, len) => {
                for ev in frame.events(scratch, 64 << 20).unwrap() {
                    f(frame.tag, ev.time, ev.record);
                    n += 1;
                }
                pos += len;
            }
            other => panic!("{other:?}"),
        }
    }
    n
}

fn forward_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward_decode");
    let modes = [
        ("message", Mode::Message),
        ("forward", Mode::Forward),
        ("packed", Mode::PackedBin),
        ("gzip", Mode::Gzip),
        ("zstd", Mode::Zstd),
    ];
    for (name, mode) in modes {
        for size in [200, 2048] {
            let input = stream(mode, size);
            g.throughput(Throughput::Bytes(input.len() as u64));
            let mut scratch = Scratch::default();
            g.bench_function(format!("{name}/{size}B"), |b| {
                b.iter(|| {
                    decode(black_box(&input), &mut scratch, |_, t, r| {
                        black_box((t, r));
                    })
                })
            });
        }
    }
    g.finish();
}

fn packed_to_json(c: &mut Criterion) {
    let mut g = c.benchmark_group("packed_to_json");
    for size in [200, 2048] {
        let input = stream(Mode::PackedBin, size);
        g.throughput(Throughput::Bytes(input.len() as u64));
        let mut shape = Shape::new(&ShapeConfig::default());
        let mut out = Vec::with_capacity(4 * input.len());
        let mut scratch = Scratch::default();
        g.bench_function(format!("{size}B"), |b| {
            b.iter(|| {
                out.clear();
                decode(black_box(&input), &mut scratch, |tag, t, r| {
                    shape.encode_msgpack(&mut out, tag, t, r);
                })
            })
        });
    }
    // With the tag and an RFC 3339 time injected, as the default config writes.
    let input = stream(Mode::PackedBin, 200);
    g.throughput(Throughput::Bytes(input.len() as u64));
    let mut shape = Shape::new(&ShapeConfig {
        tag_key: Some("tag".into()),
        time_key: Some("time".into()),
        ..ShapeConfig::default()
    });
    let mut out = Vec::with_capacity(4 * input.len());
    let mut scratch = Scratch::default();
    g.bench_function("200B+tag+time", |b| {
        b.iter(|| {
            out.clear();
            decode(black_box(&input), &mut scratch, |tag, t, r| {
                shape.encode_msgpack(&mut out, tag, t, r);
            })
        })
    });
    g.finish();
}

fn transcode(c: &mut Criterion) {
    let mut g = c.benchmark_group("transcode");
    for size in [200, 2048] {
        let records: Vec<Vec<u8>> = (0..EVENTS_PER_FRAME)
            .map(|i| {
                let mut v = vec![];
                rmpv::encode::write_value(&mut v, &docker_record(i, size)).unwrap();
                v
            })
            .collect();
        let bytes: usize = records.iter().map(Vec::len).sum();
        g.throughput(Throughput::Bytes(bytes as u64));
        let mut shape = Shape::new(&ShapeConfig::default());
        let mut out = Vec::with_capacity(4 * bytes);
        g.bench_function(format!("{size}B"), |b| {
            b.iter(|| {
                out.clear();
                for r in &records {
                    shape.encode_msgpack(&mut out, "t", EventTime::default(), black_box(r));
                }
            })
        });
    }
    g.finish();
}

fn json_lines(c: &mut Criterion) {
    let mut g = c.benchmark_group("json_lines");
    for size in [200, 2048] {
        let mut input = Vec::new();
        while input.len() < 1 << 20 {
            input.extend(docker_json(input.len(), size).as_bytes());
            input.push(b'\n');
        }
        let len = input.len();
        g.throughput(Throughput::Bytes(len as u64));
        let mut shape = Shape::new(&ShapeConfig::default());
        let mut parser = JsonParser::default();
        let mut out = Vec::with_capacity(2 * len);
        let mut buf = input.clone();
        buf.resize(len + JSON_PADDING, 0);
        g.bench_function(format!("{size}B"), |b| {
            b.iter(|| {
                // simd-json unescapes in place; these lines have no escapes, so the buffer
                // is the same every round.
                out.clear();
                let mut lines = Lines::new(1 << 20);
                let mut pos = 0;
                while let Framed::Line { len, consumed } = lines.next(&buf[pos..len]) {
                    parser
                        .parse(&mut buf[pos..], len, |o| {
                            shape.encode_json(&mut out, "t", EventTime::default(), o);
                        })
                        .unwrap();
                    pos += consumed;
                }
                black_box(&out);
            })
        });
    }
    g.finish();
}

/// The JSON text of a Docker record (its fields are all strings).
fn docker_json(i: usize, size: usize) -> String {
    let Value::Map(fields) = docker_record(i, size) else {
        unreachable!()
    };
    let obj: serde_json::Map<String, serde_json::Value> = fields
        .into_iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().into()))
        .collect();
    serde_json::to_string(&obj).unwrap()
}

criterion_group!(
    benches,
    forward_decode,
    packed_to_json,
    transcode,
    json_lines
);
criterion_main!(benches);
