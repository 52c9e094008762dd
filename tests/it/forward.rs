//! Forward protocol through the real binary: raw frames of every mode, pipelined acks,
//! routing by tag with fan-out, the null sink, unmatched tags, UDP heartbeats, and frames
//! split across many writes.

use std::io::Write;
use std::net::UdpSocket;
use std::time::Duration;

use crate::frames::{MODES, Mode, Time, connect, frame, read_acks, record};
use crate::harness::{Sluice, assert_exactly_once, wait_json_lines};

/// The classic aggregator routes, with local sinks standing in for the Firehose streams.
pub const ROUTES: &str = r#"
[engine]
workers = 2
stats_interval = "1s"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.front]
type = "file"
path = "{dir}/front.ndjson"
linger = "50ms"

[sinks.back]
type = "file"
path = "{dir}/back.ndjson"
linger = "50ms"

[sinks.archive]
type = "file"
path = "{dir}/archive.ndjson"
linger = "50ms"

[sinks.drop]
type = "null"

[[routes]]
match = "frontend*"
sinks = "front"
tag_key = "tag"
time_key = "time"
time_format = "double"

[[routes]]
match = "backend.*"
sinks = ["back", "archive"]
tag_key = "tag"

[[routes]]
match = "health.**"
sinks = "drop"
"#;

#[test]
fn every_mode_arrives_once_on_its_route_with_pipelined_acks() {
    let mut s = Sluice::start("fwd-modes", ROUTES);
    let mut conn = connect(s.addr("fwd"));
    let mut chunks = vec![];
    let mut want = 0;
    let mut seq = 0;
    let mut back = 0;
    // Every mode, with 200 B and 2 KiB records and each time encoding; all frames are
    // written before any ack is read.
    for (i, mode) in MODES.iter().enumerate() {
        for (j, size) in [200, 2048].into_iter().enumerate() {
            let n = if *mode == Mode::Message { 1 } else { 50 };
            let events: Vec<_> = (0..n)
                .map(|k| {
                    let t = match k % 3 {
                        0 => Time::Int(1_700_000_000),
                        1 => Time::FixExt8(1_700_000_001, 500_000_000),
                        _ => Time::Ext8(1_700_000_002, 7),
                    };
                    seq += 1;
                    (t, record("raw", seq - 1, size))
                })
                .collect();
            let chunk = format!("chunk-{i}-{j}");
            conn.write_all(&frame(*mode, "frontend-web", &events, Some(&chunk)))
                .unwrap();
            chunks.push(chunk);
            want += n;
            // The same events to the fan-out route.
            let chunk = format!("back-{i}-{j}");
            let renumbered: Vec<_> = events
                .iter()
                .enumerate()
                .map(|(k, (t, _))| (*t, record("raw", back + k, size)))
                .collect();
            back += n;
            conn.write_all(&frame(*mode, "backend.api", &renumbered, Some(&chunk)))
                .unwrap();
            chunks.push(chunk);
        }
    }
    let mut acks = read_acks(&mut conn, chunks.len());
    acks.sort();
    chunks.sort();
    assert_eq!(acks, chunks, "every chunk acked exactly once");

    // Acked means handed to the sinks: the lines are there already.
    let front = wait_json_lines(&mut s, "front", want);
    assert_eq!(front.len(), want);
    assert_exactly_once(&front, "frontend-web", "raw", want);
    // Integer, fixext8 and ext8 times, to the nanosecond (read as text: an f64 cannot).
    let text = std::fs::read_to_string(s.dir.join("front.ndjson")).unwrap();
    let counts: Vec<usize> = [
        "1700000000.000000000",
        "1700000001.500000000",
        "1700000002.000000007",
    ]
    .iter()
    .map(|t| text.matches(&format!("\"time\":{t},")).count())
    .collect();
    assert!(
        counts.iter().all(|&n| n > 0),
        "each time encoding seen: {counts:?}"
    );
    assert_eq!(counts.iter().sum::<usize>(), want);
    for file in ["back", "archive"] {
        let lines = wait_json_lines(&mut s, file, back);
        assert_eq!(lines.len(), back, "{file}");
        assert_exactly_once(&lines, "backend.api", "raw", back);
    }
    s.assert_healthy();
}

#[test]
fn null_sink_unmatched_tags_and_heartbeats() {
    let mut s = Sluice::start("fwd-null", ROUTES);
    let mut conn = connect(s.addr("fwd"));
    let events: Vec<_> = (0..40)
        .map(|k| (Time::Int(1), record("h", k, 200)))
        .collect();
    conn.write_all(&frame(Mode::PackedBin, "health.check", &events, Some("h1")))
        .unwrap();
    // "frontend.web" has a dot: `frontend*` does not match it, and nothing else does.
    conn.write_all(&frame(
        Mode::Forward,
        "frontend.web",
        &events[..7],
        Some("u1"),
    ))
    .unwrap();
    let mut acks = read_acks(&mut conn, 2);
    acks.sort();
    assert_eq!(
        acks,
        ["h1", "u1"],
        "dropped and unmatched chunks are acked too"
    );
    let stats = s.wait_stat("sink.drop.events", |n| n == 40);
    let stats = if stats.get("events_unmatched") == Some(&7) {
        stats
    } else {
        s.wait_stat("events_unmatched", |n| n == 7)
    };
    assert_eq!(stats["events_in"], 47);
    s.wait_log("unmatched warning", |l| {
        l.contains("No route matches the tag") && l.contains("frontend.web")
    });

    // A UDP heartbeat on the forward port is answered.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    udp.send_to(b"\0", s.addr("fwd")).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = udp.recv_from(&mut buf).expect("a heartbeat reply");
    assert_eq!(&buf[..n], b"\0");
    s.wait_stat("heartbeats", |n| n >= 1);
    s.assert_healthy();
}

#[test]
fn frames_split_across_many_writes_and_many_frames_per_write() {
    let mut s = Sluice::start("fwd-split", ROUTES);
    let mut conn = connect(s.addr("fwd"));
    // Many frames in one write...
    let mut stream = vec![];
    for k in 0..300 {
        let mode = MODES[k % MODES.len()];
        let ev = [(Time::FixExt8(1_700_000_000, 1), record("split", k, 300))];
        stream.extend(frame(mode, "frontend", &ev, None));
    }
    conn.write_all(&stream).unwrap();
    // ...and one stream dribbled out a few bytes at a time, so frames straddle reads.
    let mut stream = vec![];
    for k in 300..400 {
        let ev = [(Time::Int(1_700_000_000), record("split", k, 300))];
        stream.extend(frame(MODES[k % MODES.len()], "frontend", &ev, None));
    }
    for (i, piece) in stream.chunks(7).enumerate() {
        conn.write_all(piece).unwrap();
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let lines = wait_json_lines(&mut s, "front", 400);
    assert_eq!(lines.len(), 400);
    assert_exactly_once(&lines, "frontend", "split", 400);
    let stats = s.wait_stat("frames_in", |n| n == 400);
    assert_eq!(stats["events_in"], 400);
    s.assert_healthy();
}
