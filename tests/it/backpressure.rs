//! Backpressure through the real binary: the stdout sink writes into a pipe that the test
//! does not read, so the sink stalls. The rings fill, the cores stop reading, TCP pushes
//! back and the client blocks; the connection stays open and memory stays bounded. Once
//! the test reads the pipe, every event arrives, once, and every chunk is acked.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::frames::{Mode, Time, connect, frame, read_acks, record};
use crate::harness::{Opts, PATIENCE, Sluice, read_stdout};

const CONFIG: &str = r#"
[engine]
workers = 2
stats_interval = "1s"
ring_capacity = 2

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.out]
type = "stdout"
batch_bytes = "256KiB"
linger = "50ms"

[[routes]]
match = "**"
sinks = "out"
"#;

/// What the client tries to send: far more than the memory bound below.
const FRAMES: usize = 600;
const PER_FRAME: usize = 1000;
const EVENT_BYTES: usize = 200;

/// RSS the process must stay under while the sink is stalled.
const RSS_BOUND_KIB: u64 = 96 * 1024;

#[test]
fn a_stalled_sink_blocks_the_client_without_loss_or_growth() {
    let mut s = Sluice::start_with(
        "backpressure",
        CONFIG,
        Opts {
            pipe_stdout: true,
            ..Opts::default()
        },
    );
    let stdout = s.stdout.take().unwrap();
    let addr = s.addr("fwd");
    let frames: Vec<Vec<u8>> = (0..FRAMES)
        .map(|f| {
            let events: Vec<_> = (0..PER_FRAME)
                .map(|k| {
                    (
                        Time::Int(1_700_000_000),
                        record("bp", f * PER_FRAME + k, EVENT_BYTES),
                    )
                })
                .collect();
            frame(Mode::PackedBin, "bp", &events, Some(&format!("c{f}")))
        })
        .collect();
    let total_bytes: usize = frames.iter().map(Vec::len).sum();

    // The client writes every frame on one connection; a second thread reads its acks.
    let written = Arc::new(AtomicUsize::new(0));
    let mut conn = connect(addr);
    let mut acks_conn = conn.try_clone().unwrap();
    let acks = std::thread::spawn(move || read_acks(&mut acks_conn, FRAMES).len());
    let client = {
        let written = written.clone();
        std::thread::spawn(move || {
            for f in &frames {
                conn.write_all(f)
                    .expect("the connection stays open under backpressure");
                written.fetch_add(f.len(), Ordering::Relaxed);
            }
            conn
        })
    };

    // Wait until the client is stuck: no progress for two seconds, well short of the end.
    let start = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let w = written.load(Ordering::Relaxed);
        if w != last.0 {
            last = (w, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the client never blocked ({w} bytes written)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stuck_at = written.load(Ordering::Relaxed);
    assert!(
        stuck_at < total_bytes / 4,
        "the client should block early: {stuck_at} of {total_bytes} bytes written"
    );
    let rss = s.rss_kib();
    assert!(
        rss < RSS_BOUND_KIB,
        "RSS {rss} KiB while stalled, bound {RSS_BOUND_KIB} KiB"
    );
    let stats = s.wait_stat("backpressure_waits", |n| n > 0);
    assert_eq!(stats["connections_closed"], 0, "no connection was closed");
    assert!(
        !client.is_finished(),
        "the client is blocked in write, not done"
    );
    eprintln!(
        "stalled: client wrote {stuck_at} of {total_bytes} bytes; sluice RSS {rss} KiB; {} events in",
        stats["events_in"]
    );

    // The sink resumes: read everything.
    let mut seen = vec![0u8; FRAMES * PER_FRAME];
    let lines = read_stdout(stdout, s.pid(), FRAMES * PER_FRAME, |v| {
        seen[v["seq"].as_u64().unwrap() as usize] += 1;
    });
    assert_eq!(
        lines,
        FRAMES * PER_FRAME,
        "sluice was stopped before every event arrived"
    );
    assert!(seen.iter().all(|&n| n == 1), "every event exactly once");
    assert_eq!(acks.join().unwrap(), FRAMES, "every chunk acked");
    drop(client.join().unwrap());
    s.assert_healthy();
}

/// The same, with the tag and time added to every event (the route is the config's last
/// table, so its keys can be appended).
fn amplify() -> String {
    format!("{CONFIG}tag_key = \"tag\"\ntime_key = \"time\"\n")
}

/// Small compressed frames that inflate to many tiny events, each written out several
/// times larger (tag and time added): one frame alone would queue megabytes of batches if
/// backpressure were only checked between frames. The core pauses inside the frame instead.
#[test]
fn a_compressed_frame_pauses_mid_frame_instead_of_queueing() {
    const FRAMES: usize = 12;
    const PER_FRAME: usize = 200_000;
    let mut s = Sluice::start_with(
        "bp-amplify",
        &amplify(),
        Opts {
            pipe_stdout: true,
            ..Opts::default()
        },
    );
    let stdout = s.stdout.take().unwrap();
    let mut conn = connect(s.addr("fwd"));
    let mut acks_conn = conn.try_clone().unwrap();
    let acks = std::thread::spawn(move || read_acks(&mut acks_conn, FRAMES).len());
    let mut frames = vec![];
    for f in 0..FRAMES {
        // [time, {"s": seq}] entries, gzip-compressed: about 11 B each inflated, ~95 B out.
        let mut entries = vec![];
        for k in 0..PER_FRAME {
            entries.push(0x92);
            entries.push(0x01);
            entries.extend([0x81, 0xa1, b's']);
            rmp::encode::write_uint(&mut entries, (f * PER_FRAME + k) as u64).unwrap();
        }
        let mut frame = vec![0x93, 0xa3, b'a', b'm', b'p'];
        rmp::encode::write_bin(&mut frame, &crate::frames::gzip(&entries)).unwrap();
        rmpv::encode::write_value(
            &mut frame,
            &rmpv::Value::Map(vec![
                ("compressed".into(), "gzip".into()),
                ("chunk".into(), format!("z{f}").into()),
            ]),
        )
        .unwrap();
        frames.push(frame);
    }
    let wire: usize = frames.iter().map(Vec::len).sum();
    let client = std::thread::spawn(move || {
        for f in &frames {
            conn.write_all(f)
                .expect("the connection stays open under backpressure");
        }
    });
    // The sink is stalled: once the core has paused, memory and events in stay where they
    // are (the stats are read again after the wait).
    s.wait_stat("backpressure_waits", |n| n > 0);
    std::thread::sleep(Duration::from_secs(2));
    let stats = s.stats();
    let rss = s.rss_kib();
    eprintln!(
        "amplify: {wire} bytes on the wire for {} events; sluice RSS {rss} KiB while stalled, {} events in",
        FRAMES * PER_FRAME,
        stats["events_in"]
    );
    assert!(
        rss < 64 * 1024,
        "RSS {rss} KiB: batches queued inside a frame"
    );
    assert!(
        stats["events_in"] < PER_FRAME as u64,
        "the stalled core stopped inside the first frame, not after it ({} events in)",
        stats["events_in"]
    );

    let mut seen = vec![0u8; FRAMES * PER_FRAME];
    let lines = read_stdout(stdout, s.pid(), FRAMES * PER_FRAME, |v| {
        seen[v["s"].as_u64().unwrap() as usize] += 1;
    });
    assert_eq!(
        lines,
        FRAMES * PER_FRAME,
        "sluice was stopped before every event arrived"
    );
    assert!(seen.iter().all(|&n| n == 1), "every event exactly once");
    assert_eq!(acks.join().unwrap(), FRAMES, "every chunk acked");
    client.join().unwrap();
    s.assert_healthy();
}
