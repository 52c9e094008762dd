//! Forward protocol frames for tests and benchmarks, built with rmp and rmpv, never with
//! the code under test. Included by path from the library's unit tests, the integration
//! tests and the benchmarks, each of which uses part of it.
#![allow(dead_code)]

use std::io::Write;

use rmpv::Value;

/// The four modes, with both encodings of PackedForward entries and both codecs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Message,
    Forward,
    PackedBin,
    PackedStr,
    Gzip,
    Zstd,
}

pub const MODES: [Mode; 6] = [
    Mode::Message,
    Mode::Forward,
    Mode::PackedBin,
    Mode::PackedStr,
    Mode::Gzip,
    Mode::Zstd,
];

/// How an event time is written.
#[derive(Clone, Copy, Debug)]
pub enum Time {
    Int(u32),
    FixExt8(u32, u32),
    Ext8(u32, u32),
    /// `s + 0.5` as a float64.
    Float(u32),
    /// Fluent Bit 2.1+'s `[time, metadata]`; only inside entries.
    WithMeta(u32),
}

pub fn put_time(out: &mut Vec<u8>, t: Time) {
    match t {
        Time::Int(s) => drop(rmp::encode::write_uint(out, s as u64).unwrap()),
        Time::FixExt8(s, n) => {
            out.extend_from_slice(&[0xd7, 0x00]);
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
        }
        Time::Ext8(s, n) => {
            out.extend_from_slice(&[0xc7, 0x08, 0x00]);
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
        }
        Time::Float(s) => rmp::encode::write_f64(out, s as f64 + 0.5).unwrap(),
        Time::WithMeta(s) => {
            out.push(0x92);
            rmp::encode::write_uint(out, s as u64).unwrap();
            rmpv::encode::write_value(out, &Value::Map(vec![("k".into(), 1.into())])).unwrap();
        }
    }
}

/// A frame's options: `size` and `chunk`; with neither, `nil_options` sends a nil option
/// (as Docker's driver may) instead of none.
#[derive(Clone, Copy, Debug, Default)]
pub struct Opts<'a> {
    pub chunk: Option<&'a str>,
    pub size: bool,
    pub nil_options: bool,
}

/// Concatenated `[time, record]` entries.
pub fn entries(events: &[(Time, Value)]) -> Vec<u8> {
    let mut out = vec![];
    for (t, r) in events {
        out.push(0x92);
        put_time(&mut out, *t);
        rmpv::encode::write_value(&mut out, r).unwrap();
    }
    out
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// One frame carrying `events` in `mode`. Compressed entries go in two gzip members or two
/// zstd frames, as Fluent Bit may send them.
pub fn frame(mode: Mode, tag: &str, events: &[(Time, Value)], opts: Opts<'_>) -> Vec<u8> {
    let mut o: Vec<(Value, Value)> = vec![];
    if opts.size {
        o.push(("size".into(), Value::from(events.len() as u64)));
    }
    if let Some(c) = opts.chunk {
        o.push(("chunk".into(), c.into()));
    }
    match mode {
        Mode::Gzip => o.push(("compressed".into(), "gzip".into())),
        Mode::Zstd => o.push(("compressed".into(), "zstd".into())),
        _ => {}
    }
    let option = match (o.is_empty(), opts.nil_options) {
        (false, _) => Some(Value::Map(o)),
        (true, true) => Some(Value::Nil),
        (true, false) => None,
    };
    let mut out = vec![];
    let n = 2 + (mode == Mode::Message) as u32 + option.is_some() as u32;
    rmp::encode::write_array_len(&mut out, n).unwrap();
    rmp::encode::write_str(&mut out, tag).unwrap();
    let body = entries(events);
    match mode {
        Mode::Message => {
            assert_eq!(events.len(), 1, "Message mode carries one event");
            // The entry without its array head: [tag, time, record]
            out.extend(&body[1..]);
        }
        Mode::Forward => {
            rmp::encode::write_array_len(&mut out, events.len() as u32).unwrap();
            out.extend(body);
        }
        Mode::PackedBin => rmp::encode::write_bin(&mut out, &body).unwrap(),
        Mode::PackedStr => {
            rmp::encode::write_str_len(&mut out, body.len() as u32).unwrap();
            out.extend(body);
        }
        Mode::Gzip | Mode::Zstd => {
            let (a, b) = body.split_at(body.len() / 2);
            let mut z = vec![];
            for part in [a, b] {
                match mode {
                    Mode::Gzip => z.extend(gzip(part)),
                    _ => z.extend(zstd::encode_all(part, 3).unwrap()),
                }
            }
            rmp::encode::write_bin(&mut out, &z).unwrap();
        }
    }
    if let Some(o) = option {
        rmpv::encode::write_value(&mut out, &o).unwrap();
    }
    out
}

/// A record as Docker's fluentd driver sends it, about `size` bytes of msgpack:
/// `container_id`, `container_name`, `source`, and `log` padded to size.
pub fn docker_record(i: usize, size: usize) -> Value {
    let base = 135;
    let log: String = format!("{i:08} GET /api/items?page={i} HTTP/1.1 200 ")
        .chars()
        .chain(std::iter::repeat('x'))
        .take(size.saturating_sub(base).max(8))
        .collect();
    Value::Map(vec![
        (
            "container_id".into(),
            "4f1a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8".into(),
        ),
        ("container_name".into(), "/web-1".into()),
        ("source".into(), "stdout".into()),
        ("log".into(), log.into()),
    ])
}

/// A Docker record that also carries `seq` and `client`, so a test can check that every
/// event arrived exactly once.
pub fn record(client: &str, seq: usize, size: usize) -> Value {
    let Value::Map(mut fields) = docker_record(seq, size.saturating_sub(30)) else {
        unreachable!()
    };
    fields.push(("seq".into(), Value::from(seq as u64)));
    fields.push(("client".into(), client.into()));
    Value::Map(fields)
}
