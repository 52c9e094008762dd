//! Whole-input drivers over the decoders and encoders, for fuzz targets and tests. They
//! run the functions the connection loops run, minus the sockets, and check what must
//! always hold: the same result however the bytes are split, and valid JSON out.

use crate::batch::shape::{Format, Shape, ShapeConfig, TimeFormat};
use crate::decode::DecodeError;
use crate::decode::forward::Decoded::{Frame, Keepalive, NeedMore};
use crate::decode::forward::Decoder;
use crate::decode::jsonl::{Framed, JsonParser, Lines};
use crate::limits::JSON_PADDING;

fn shapes() -> Vec<Shape> {
    let base = ShapeConfig {
        tag_key: Some("tag".into()),
        time_key: Some("time".into()),
        remove_keys: vec!["drop".into()],
        ..ShapeConfig::default()
    };
    vec![
        Shape::new(&base),
        Shape::new(&ShapeConfig {
            format: Format::Msgpack,
            time_format: TimeFormat::Double,
            ..base.clone()
        }),
        Shape::new(&ShapeConfig {
            format: Format::Text,
            log_key: Some("log".into()),
            ..base
        }),
    ]
}

/// What a stream decoded to: JSON lines, the other formats' output, and the error that
/// ended the stream, if any.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub json: Vec<u8>,
    pub other: Vec<u8>,
    pub error: Option<DecodeError>,
}

/// Decodes `data` as a Forward stream that arrives in two reads, split at `split`, and
/// encodes every event in each format.
pub fn forward_stream(data: &[u8], split: usize) -> Decoded {
    let split = split.min(data.len());
    let mut dec = Decoder::new(1 << 20);
    let mut shapes = shapes();
    let mut out = Decoded {
        json: Vec::new(),
        other: Vec::new(),
        error: None,
    };
    let mut scratch = crate::decode::forward::Scratch::default();
    let mut buf: Vec<u8> = data[..split].to_vec();
    let mut fed_all = split == data.len();
    let mut pos = 0;
    loop {
        let error = match dec.decode(&buf[pos..]) {
            Ok(Frame(frame, len)) => match frame.events(&mut scratch, 4 << 20) {
                Ok(events) => {
                    for ev in events {
                        let (json, rest) = shapes.split_at_mut(1);
                        json[0].encode_msgpack(&mut out.json, frame.tag, ev.time, ev.record);
                        for s in rest {
                            s.encode_msgpack(&mut out.other, frame.tag, ev.time, ev.record);
                        }
                    }
                    pos += len;
                    continue;
                }
                Err(e) => Some(e),
            },
            Ok(Keepalive) => {
                pos += 1;
                continue;
            }
            Ok(NeedMore(_)) if !fed_all => {
                buf.extend_from_slice(&data[split..]);
                fed_all = true;
                continue;
            }
            Ok(NeedMore(_)) => (pos < buf.len()).then_some(DecodeError::Truncated),
            Err(e) => Some(e),
        };
        out.error = error;
        return out;
    }
}

/// Fuzz target body: a Forward stream decodes the same whole or split, never panics, and
/// every JSON line it produces parses.
pub fn fuzz_forward(data: &[u8]) {
    let split = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let whole = forward_stream(data, data.len());
    assert_eq!(
        whole,
        forward_stream(data, split),
        "split at {split} changed the result"
    );
    check_json_lines(&whole.json);
}

/// Frames and parses JSON lines, encoding every object; returns the JSON output and the
/// errors met.
pub fn json_lines_stream(data: &[u8], max_line: usize) -> (Vec<u8>, Vec<DecodeError>) {
    let mut lines = Lines::new(max_line);
    let mut parser = JsonParser::default();
    let mut shape = shapes().swap_remove(0);
    let mut buf = data.to_vec();
    buf.resize(data.len() + JSON_PADDING, 0);
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    let mut pos = 0;
    let now = crate::decode::EventTime::default();
    let mut parse =
        |buf: &mut [u8], len: usize, out: &mut Vec<u8>, errors: &mut Vec<DecodeError>| {
            if let Err(e) = parser.parse(buf, len, |obj| shape.encode_json(out, "t", now, obj)) {
                errors.push(e);
            }
        };
    loop {
        match lines.next(&buf[pos..data.len()]) {
            Framed::Line { len, consumed } => {
                parse(&mut buf[pos..], len, &mut out, &mut errors);
                pos += consumed;
            }
            Framed::Discard { consumed, error } => {
                errors.extend(error);
                pos += consumed;
            }
            Framed::NeedMore => break,
        }
    }
    if let Some(len) = lines.finish(&buf[pos..data.len()]) {
        parse(&mut buf[pos..], len, &mut out, &mut errors);
    }
    (out, errors)
}

/// Fuzz target body: JSON lines never panic and re-encode to valid JSON.
pub fn fuzz_json_lines(data: &[u8]) {
    let (out, _) = json_lines_stream(data, 4096);
    check_json_lines(&out);
}

/// Fuzz target body: an HTTP request (a Content-Type chosen by the first byte, then the
/// path and query up to a newline, then the body) never panics, and what it takes
/// re-encodes to valid JSON, all of it or none.
pub fn fuzz_http(data: &[u8]) {
    use crate::decode::http::{Payload, msgpack_records, parse};
    let Some((&ty, rest)) = data.split_first() else {
        return;
    };
    let ty = [
        None,
        Some("application/json"),
        Some("application/msgpack"),
        Some("application/x-www-form-urlencoded"),
    ][ty as usize % 4];
    let (target, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let target = String::from_utf8_lossy(target);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (&*target, None),
    };
    let Ok(mut req) = parse(path, query, ty, body.to_vec()) else {
        return;
    };
    let mut shape = shapes().swap_remove(0);
    let now = crate::decode::EventTime::default();
    let mut out = Vec::new();
    match req.payload {
        Payload::Json => {
            let len = req.len();
            let _ = JsonParser::default().parse_each(&mut req.records, len, |obj| {
                shape.encode_json(&mut out, &req.tag, now, obj);
            });
        }
        Payload::Msgpack => {
            if let Ok(records) = msgpack_records(&req.records) {
                for r in records {
                    shape.encode_msgpack(&mut out, &req.tag, now, r);
                }
            }
        }
    }
    check_json_lines(&out);
}

/// Fuzz target body: a write-ahead log segment of any bytes is read without a panic;
/// the sound entries and the damage cover it in order without overlap, and each sound
/// entry encodes back to exactly its bytes.
pub fn fuzz_wal(data: &[u8]) {
    use crate::wal::entry;
    let (entries, damage) = entry::read_all(data);
    let mut spans: Vec<(usize, usize)> = damage.iter().map(|d| (d.at, d.at + d.bytes)).collect();
    for (at, e) in &entries {
        let mut again = Vec::new();
        entry::encode(&mut again, e.kind, e.input, e.time, e.payload);
        assert_eq!(&data[*at..*at + again.len()], &again[..], "entry at {at}");
        spans.push((*at, at + again.len()));
    }
    spans.sort();
    let mut end = 0;
    for (a, b) in spans {
        assert_eq!(a, end, "a gap or an overlap at {a}");
        end = b;
    }
    assert_eq!(end, data.len(), "the scan covers the segment");
}

/// Every line of JSON output parses as an object.
fn check_json_lines(out: &[u8]) {
    assert!(
        out.is_empty() || out.ends_with(b"\n"),
        "JSON output must end with a newline"
    );
    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let mut copy = line.to_vec();
        let ok = matches!(simd_json::to_tape(&mut copy), Ok(t) if matches!(t.0.first(), Some(simd_json::Node::Object { .. })));
        assert!(
            ok,
            "invalid JSON written: {}",
            String::from_utf8_lossy(line)
        );
    }
}

/// Fuzz target body: inflating any bytes (gzip or zstd, chosen by the first byte) never
/// panics, never gives more than the limit, and gives what a plain reader of the same
/// stream gives.
pub fn fuzz_inflate(data: &[u8]) {
    use crate::decode::Codec;
    use crate::decode::forward::inflate;
    use std::io::Read;
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let codec = if which & 1 == 0 {
        Codec::Gzip
    } else {
        Codec::Zstd
    };
    const MAX: usize = 1 << 20;
    let mut out = Vec::new();
    let ours = inflate(codec, body, &mut out, MAX);
    assert!(
        out.capacity() <= 2 * MAX + (64 << 10),
        "grew to {}",
        out.capacity()
    );
    let mut reference = Vec::new();
    let theirs = match codec {
        Codec::Gzip => flate2::read::MultiGzDecoder::new(body)
            .take(MAX as u64 + 1)
            .read_to_end(&mut reference),
        Codec::Zstd => zstd::stream::read::Decoder::with_buffer(body).and_then(|mut d| {
            d.window_log_max(21)?;
            d.take(MAX as u64 + 1).read_to_end(&mut reference)
        }),
    };
    match (ours, theirs) {
        (Ok(()), Ok(_)) => assert_eq!(out, reference),
        (Err(DecodeError::DecompressedTooLarge(_)), Ok(_)) => assert!(reference.len() > MAX),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("inflate gave {a:?}, a plain reader {b:?}"),
    }
}

/// Fuzz target body: a tag pattern (up to the first newline) and a tag. Compiling never
/// panics, and the router (with its cache) agrees with the pattern on whether it matches.
pub fn fuzz_route(data: &[u8]) {
    use crate::route::{Pattern, Router};
    let text = String::from_utf8_lossy(data);
    let (pat, tag) = text.split_once('\n').unwrap_or((&text, ""));
    if pat.len() > 256 || Pattern::check(pat).is_err() {
        return;
    }
    let p = Pattern::new(pat);
    let matched = p.matches(tag);
    let mut router = Router::new(vec![vec![Pattern::new(pat)]]);
    for _ in 0..2 {
        assert_eq!(router.route(tag) == Some(0), matched, "{pat:?} on {tag:?}");
    }
}

/// Fuzz target body: events (the bytes after two choice bytes, split at newlines) batched
/// as Kinesis or Firehose records — one an event, lines packed, or KPL aggregates — come
/// back whole. Each request body parses as JSON with each record's data in base64; each
/// aggregate reads back, with an independent reader, to its events; and together the
/// records hold every event once.
pub fn fuzz_records(data: &[u8]) {
    use crate::batch::records::Framing;
    use crate::batch::records::{KPL_MAGIC, RecordFraming, RecordShape};
    use crate::batch::shape::{Encoded, Out};
    use crate::batch::{BatchLimits, Batcher};
    use crate::emit::body::{Target, write};
    use simd_json::prelude::*;
    let [shape, size, rest @ ..] = data else {
        return;
    };
    let shape = [
        RecordShape::Single,
        RecordShape::Lines,
        RecordShape::Aggregated,
    ][*shape as usize % 3];
    let f = RecordFraming {
        max_record: [64, 300, 4096][*size as usize % 3],
        shape,
        ..RecordFraming::KINESIS
    };
    let (p, c) = crate::ring::ring(1024);
    let limits = BatchLimits {
        max_bytes: f.max_request,
        linger: std::time::Duration::from_secs(60),
    };
    let mut b = Batcher::new(
        0,
        limits,
        Framing::Records(f),
        p,
        crate::budget::Budget::unlimited(),
    );
    b.set_shards(std::sync::Arc::new(crate::shards::ShardMap::even(4)));
    // Events end with a newline, as every shape writes them.
    let mut events: Vec<Vec<u8>> = rest
        .split(|&b| b == b'\n')
        .map(|e| [e, b"\n"].concat())
        .collect();
    for e in &events {
        b.write(None, |out| {
            out.extend_from_slice(e);
            Out {
                encoded: Encoded::Written,
                key: None,
            }
        });
    }
    b.seal();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut body = Vec::new();
    while let Some(batch) = c.try_pop() {
        let idx: Vec<usize> = (0..batch.records.len()).collect();
        write(&mut body, Target::StreamName("s"), &batch, &idx);
        let mut parsed = body.clone();
        let v = simd_json::to_borrowed_value(&mut parsed).expect("a body is JSON");
        let records = v
            .get("Records")
            .and_then(|r| r.as_array())
            .expect("Records");
        assert_eq!(records.len(), batch.records.len());
        for (r, j) in batch.records.iter().zip(records) {
            let data = base64_simd::STANDARD
                .decode_to_vec(j.get_str("Data").expect("Data"))
                .expect("base64");
            assert_eq!(data, batch.data_of(r));
            assert_eq!(j.get_str("PartitionKey"), Some(batch.key_of(r)));
            match shape {
                _ if r.oversize => got.push(data),
                // As the KCL reads them: the magic and a matching MD5 make an aggregate;
                // anything else is a record of its own (an event may begin with the magic).
                RecordShape::Aggregated if data.starts_with(&KPL_MAGIC) => {
                    match kpl_records(&data) {
                        Some(inner) => {
                            assert_eq!(inner.len(), r.events as usize);
                            got.extend(inner);
                        }
                        None => {
                            assert_eq!(r.events, 1, "an aggregate that does not read back");
                            got.push(data);
                        }
                    }
                }
                RecordShape::Lines => {
                    got.extend(data.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec));
                }
                _ => got.push(data),
            }
        }
    }
    events.sort();
    got.sort();
    assert_eq!(got, events, "every event once");
}

/// The records' data of a KPL aggregate (magic, protobuf `AggregatedRecord`, MD5), read
/// as the KPL's format document describes it, apart from the code that writes it.
/// <https://github.com/awslabs/amazon-kinesis-producer/blob/master/aggregation-format.md>
fn kpl_records(agg: &[u8]) -> Option<Vec<Vec<u8>>> {
    use md5::{Digest, Md5};
    let body = agg.get(4..)?;
    let (proto, sum) = body.split_at(body.len().checked_sub(16)?);
    if Md5::digest(proto).as_slice() != sum {
        return None;
    }
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let x = *b.get(*at)?;
            *at += 1;
            v |= u64::from(x & 0x7f) << shift;
            if x & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    // (field, bytes) of each length-delimited field; varint fields are skipped.
    fn fields(b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
        let (mut at, mut out) = (0, Vec::new());
        while at < b.len() {
            let key = varint(b, &mut at)?;
            match key & 7 {
                0 => {
                    varint(b, &mut at)?;
                }
                2 => {
                    let n = varint(b, &mut at)? as usize;
                    out.push((key >> 3, b.get(at..at.checked_add(n)?)?));
                    at += n;
                }
                _ => return None,
            }
        }
        Some(out)
    }
    let mut data = Vec::new();
    for (field, value) in fields(proto)? {
        if field == 3 {
            let inner = fields(value)?;
            data.push(inner.iter().find(|f| f.0 == 3)?.1.to_vec());
        }
    }
    Some(data)
}

/// Fuzz target body: config validation never panics or touches the machine, and what it
/// accepts the engine can build: routes and fallbacks name sinks that exist, patterns
/// compile, what connections may hold fits in their share of the budget, and each route's
/// shape writes valid JSON.
pub fn fuzz_config(data: &[u8]) {
    use crate::config::{Config, Host, InputKind};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse_on(text, &Host::PURE) else {
        return;
    };
    let share = config.engine.memory_limit / crate::budget::PEER_SHARE;
    for input in &config.inputs {
        let held = match input.kind {
            InputKind::Forward {
                max_frame_bytes,
                max_decompressed_bytes,
                ..
            } => max_frame_bytes.max(max_decompressed_bytes),
            InputKind::JsonLines { max_line_bytes, .. } => max_line_bytes,
            InputKind::Http { .. } => 0,
        };
        assert!(held <= share, "{}: {held} > {share}", input.name);
    }
    let n = config.sinks.len();
    for (i, s) in config.sinks.iter().enumerate() {
        assert!(s.fallback.is_none_or(|f| f < n && f != i), "{}", s.name);
        assert!(s.batch.max_bytes > 0, "{}", s.name);
    }
    let mut router = crate::route::Router::of(&config.routes);
    router.route("a.b");
    // {"log": "x"}
    let record = [0x81, 0xa3, b'l', b'o', b'g', 0xa1, b'x'];
    for r in &config.routes {
        assert!(!r.sinks.is_empty() && r.sinks.iter().all(|&s| s < n));
        if r.shape.format == Format::Json {
            let mut out = Vec::new();
            let time = crate::decode::EventTime::default();
            Shape::new(&r.shape).encode_msgpack(&mut out, "a.b", time, &record);
            check_json_lines(&out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Random bodies behind each Content-Type, and random bytes in the seeds' places.
        #[test]
        fn http_requests_never_panic(ty in 0u8..4, body in proptest::collection::vec(any::<u8>(), 0..300),
                                     noise in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut data = vec![ty];
            data.extend_from_slice(b"/app.web?time=1.5&json=");
            data.extend_from_slice(&noise);
            data.push(b'\n');
            data.extend_from_slice(&body);
            fuzz_http(&data);
        }

        /// A sound segment with bytes overwritten, cut or inserted anywhere.
        #[test]
        fn damaged_wal_segments_never_panic(at in 0usize..200, noise in proptest::collection::vec(any::<u8>(), 0..40),
                                            cut in 0usize..200, insert in any::<bool>()) {
            let mut seg = Vec::new();
            for (i, p) in [&b"{\"a\":1}"[..], b"{\"b\":2}\n{\"c\":3}", b"x"].iter().enumerate() {
                let kind = if i == 0 { crate::wal::Kind::Forward } else { crate::wal::Kind::JsonLines };
                crate::wal::entry::encode(&mut seg, kind, "in", crate::decode::EventTime::default(), p);
            }
            let at = at.min(seg.len());
            if insert {
                seg.splice(at..at, noise);
            } else {
                let end = (at + noise.len()).min(seg.len());
                seg.splice(at..end, noise);
            }
            seg.truncate(seg.len() - cut.min(seg.len()));
            fuzz_wal(&seg);
        }
    }

    /// The files of `fuzz/<kind>/<target>`: `seeds` are hand-written, `corpus` is
    /// libFuzzer's (minimized) finds.
    fn files(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind)
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect()
    }

    /// The seed `name` of `target`.
    fn seed(target: &str, name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/seeds")
                .join(target)
                .join(name),
        )
        .unwrap_or_else(|e| panic!("seed {target}/{name}: {e}"))
    }

    /// Found by the `wal` target: an entry with its reserved header bytes set and a
    /// checksum to match was read as sound, and did not encode back to its bytes.
    #[test]
    fn regression_wal_entry_with_reserved_bytes_set_is_damage() {
        let data = seed("wal", "reserved_bytes_set");
        fuzz_wal(&data);
        let (entries, damage) = crate::wal::entry::read_all(&data);
        assert_eq!(&data[11..15], b"SLW1");
        assert!(
            entries.iter().all(|(at, _)| *at != 11) && damage.iter().any(|d| d.at == 0),
            "the entry at 11 is part of the damage: {damage:?}"
        );
    }

    /// Found by the `wal` target as a slow unit (70 s for 2 KB): a resynchronising scan
    /// over entries that are unsound despite their checksums rescanned the rest of the
    /// segment from each (see `wal::entry`'s regression test of the work).
    #[test]
    fn regression_wal_exponential_resync() {
        let data = seed("wal", "exponential_resync");
        fuzz_wal(&data);
    }

    /// Found by the `records` target: an event beginning with the KPL magic, sent as a
    /// record of its own, must read back as itself (its MD5 does not match).
    #[test]
    fn regression_plain_record_beginning_with_the_kpl_magic() {
        let data = seed("records", "plain_event_with_kpl_magic");
        assert_eq!(data[2..6], crate::batch::records::KPL_MAGIC);
        fuzz_records(&data);
    }

    /// A fuzz target's body.
    type Body = fn(&[u8]);

    /// Every fuzz target's body, by target name.
    const TARGETS: [(&str, Body); 8] = [
        ("forward", fuzz_forward),
        ("json_lines", fuzz_json_lines),
        ("http", fuzz_http),
        ("inflate", fuzz_inflate),
        ("route", fuzz_route),
        ("records", fuzz_records),
        ("wal", fuzz_wal),
        ("config", fuzz_config),
    ];

    /// The checked-in seeds and corpus run through the fuzz targets' bodies; every
    /// hand-written Forward seed is a valid stream and decodes whole, and every config
    /// seed is valid.
    #[test]
    fn the_fuzz_corpus_replays_cleanly() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        // Each target is one line over its harness, and each is replayed here.
        let mut names: Vec<String> = files("fuzz_targets", "")
            .into_iter()
            .map(|(name, text)| {
                let target = name.trim_end_matches(".rs").to_string();
                let call = format!("sluice::harness::fuzz_{target}(data)");
                assert!(String::from_utf8(text).unwrap().contains(&call), "{name}");
                target
            })
            .collect();
        names.sort();
        let mut listed: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
        listed.sort();
        assert_eq!(names, listed);
        for (target, body) in TARGETS {
            let seeds = files("seeds", target);
            assert!(seeds.len() >= 2, "{target} has {} seeds", seeds.len());
            let corpus = match root.join("corpus").join(target).is_dir() {
                true => files("corpus", target),
                false => Vec::new(),
            };
            for (_, data) in seeds.iter().chain(&corpus) {
                body(data);
            }
        }
        let seeds = files("seeds", "forward");
        assert!(seeds.len() >= 10);
        for (name, data) in &seeds {
            let got = forward_stream(data, data.len());
            assert_eq!(got.error, None, "seed {name}");
            assert!(!got.json.is_empty(), "seed {name} has events");
        }
        for (name, data) in files("seeds", "config") {
            let text = std::str::from_utf8(&data).unwrap();
            if let Err(e) = crate::config::Config::parse_on(text, &crate::config::Host::PURE) {
                panic!("seed {name}: {e}");
            }
        }
        let (out, errors) = json_lines_stream(&seed("json_lines", "bad_lines"), 4096);
        assert_eq!(
            errors,
            [
                DecodeError::InvalidJson,
                DecodeError::NotAnObject,
                DecodeError::InvalidJson
            ]
        );
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
    }
}
