//! Peers that attack rather than err: many connections holding unfinished frames,
//! decompression bombs, idle and slow connections. Each runs while a good acked client on
//! another connection sends, and that client must get every event through exactly once.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::frames::{Mode, Time, connect, frame, read_acks, record};
use crate::harness::{PATIENCE, Sluice, assert_exactly_once, wait_json_lines};

const MIB: u64 = 1 << 20;

/// What README ("Memory") gives as the most the process holds beyond `memory_limit` on two
/// workers when peers churn through buffers: the binary and threads, and what the
/// allocator keeps of freed buffers for a while.
const OVERHEAD_MIB: u64 = 96;

fn config(memory_limit_mib: u64, forward: &str) -> String {
    format!(
        r#"
[engine]
workers = 2
stats_interval = "1s"
memory_limit = "{memory_limit_mib}MiB"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"
{forward}

[sinks.out]
type = "file"
path = "{{dir}}/out.ndjson"
linger = "20ms"

[[routes]]
match = "**"
sinks = "out"
tag_key = "tag"
"#
    )
}

/// A client sending acked frames of 20 events (one at a time, waiting for each ack) until
/// `stop`, and at least `min` events; returns how many it sent.
fn good_client(addr: SocketAddr, stop: Arc<AtomicBool>, min: usize) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut conn = connect(addr);
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) || sent < min {
            let events: Vec<_> = (sent..sent + 20)
                .map(|k| (Time::Int(1), record("good", k, 200)))
                .collect();
            let chunk = format!("g{sent}");
            conn.write_all(&frame(Mode::PackedBin, "good", &events, Some(&chunk)))
                .unwrap();
            assert_eq!(read_acks(&mut conn, 1), [chunk]);
            sent += 20;
        }
        sent
    })
}

/// Writes `want` bytes of `body` (repeated) to each stream, round robin and without
/// blocking, until each has written them all or none got anywhere for `stall`. Returns
/// the bytes written to each.
fn push_all(conns: &mut [TcpStream], head: &[u8], want: u64, stall: Duration) -> Vec<u64> {
    let body = vec![0x61u8; 256 << 10];
    let mut written = vec![0u64; conns.len()];
    let mut last = Instant::now();
    for c in conns.iter_mut() {
        c.write_all(head).unwrap();
        c.set_nonblocking(true).unwrap();
    }
    while last.elapsed() < stall {
        let mut moved = false;
        for (c, w) in conns.iter_mut().zip(&mut written) {
            if *w >= want {
                continue;
            }
            let n = (want - *w).min(body.len() as u64) as usize;
            match c.write(&body[..n]) {
                Ok(k) if k > 0 => {
                    *w += k as u64;
                    moved = true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Closed by sluice, to give its memory to others.
                Err(_) => *w = want,
            }
        }
        if moved {
            last = Instant::now();
        } else if written.iter().all(|&w| w >= want) {
            break;
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    written
}

/// 200 connections each send 15 MiB of a 16 MiB frame and stop. Sluice holds no more for
/// them than peers' share of memory_limit, closes the largest holders while the good
/// client needs memory, and gives the memory back once they are gone.
#[test]
fn unfinished_frames_stay_within_the_memory_budget() {
    const LIMIT_MIB: u64 = 64;
    // Those left waiting for memory that only each other hold are closed by frame_timeout.
    let cfg = config(
        LIMIT_MIB,
        "max_frame_bytes = \"16MiB\"\nframe_timeout = \"5s\"",
    );
    let mut s = Sluice::start("hostile-unfinished", &cfg);
    let fwd = s.addr("fwd");
    let idle = s.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(fwd, stop.clone(), 2000);

    let mut hogs: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(fwd).unwrap()).collect();
    // [tag, bin32(16 MiB)...: a PackedForward frame whose entries never finish.
    let mut head = vec![0x92, 0xa3];
    head.extend(b"hog");
    head.push(0xc6);
    head.extend(((16 * MIB - 64) as u32).to_be_bytes());
    let written = push_all(&mut hogs, &head, 15 * MIB, Duration::from_secs(3));
    let total: u64 = written.iter().sum();
    let peak = s.peak_rss_kib();
    let stats = s.stats();
    eprintln!(
        "unfinished frames: {} MiB written by 200 peers; RSS idle {} MiB, peak {} MiB; evicted {:?}, memory waits {:?}, budget peak {:?}",
        total / MIB,
        idle / 1024,
        peak / 1024,
        stats.get("connections_evicted"),
        stats.get("memory_waits"),
        stats.get("memory_peak"),
    );
    // README ("Memory"): the overhead beyond memory_limit, with the allocator's slack
    // from 3 GB of buffers grown and freed in three seconds.
    assert!(
        peak < (LIMIT_MIB + OVERHEAD_MIB) * 1024,
        "peak RSS {peak} KiB against memory_limit {LIMIT_MIB} MiB; stats {stats:?}"
    );
    s.wait_stat("connections_evicted", |n| n > 0);
    s.wait_log("eviction", |l| {
        l.contains("Closing a connection: it holds the most of the input memory")
            && l.contains("peer=\"127.0.0.1:")
    });

    stop.store(true, Ordering::Relaxed);
    let sent = good.join().unwrap();
    drop(hogs);
    // Memory comes back once they are gone.
    let start = Instant::now();
    loop {
        let rss = s.rss_kib();
        let held = s.stats().get("memory_used").copied().unwrap_or(u64::MAX);
        if rss < idle + 24 * 1024 && held < 4 * MIB {
            eprintln!(
                "after the peers left: RSS {} MiB, budget used {held} bytes",
                rss / 1024
            );
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "memory not given back: RSS {rss} KiB (idle {idle} KiB), budget used {held}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s.wait_stat("connections_closed", |n| n == 201);
    let lines = wait_json_lines(&mut s, "out", sent);
    assert_eq!(lines.len(), sent, "only the good events");
    assert_exactly_once(&lines, "good", "good", sent);
    s.assert_healthy();
}

/// 12,000 connections that send nothing: at max_connections the longest idle ones make
/// room for new ones, idle_timeout closes the rest, and a new client is served.
#[test]
fn idle_crowds_do_not_lock_clients_out() {
    let cfg = config(32, "idle_timeout = \"3s\"");
    let mut s = Sluice::start("hostile-idle", &cfg);
    let fwd = s.addr("fwd");
    let start = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..12_000 {
        idle.push(TcpStream::connect(fwd).expect("connecting an idle peer"));
    }
    eprintln!(
        "12,000 idle connections in {:?}; RSS {} MiB",
        start.elapsed(),
        s.rss_kib() / 1024
    );
    // A new client is served while they are all still open (and some of them on its core).
    let stop = Arc::new(AtomicBool::new(true));
    let sent = good_client(fwd, stop, 200).join().unwrap();
    let stats = s.wait_stat("connections_replaced", |n| n >= 2_000);
    eprintln!(
        "replaced {:?}, refused {:?}; RSS {} MiB",
        stats.get("connections_replaced"),
        stats.get("connections_refused"),
        s.rss_kib() / 1024
    );
    assert_eq!(stats["connections_refused"], 0, "{stats:?}");
    // And the idle ones are closed by idle_timeout.
    s.wait_stat("connections_idle", |n| n >= 9_000);
    s.wait_log("idle close", |l| {
        l.contains("nothing came for its input's idle_timeout") && l.contains("peer=\"127.0.0.1:")
    });
    let mut probe = idle.pop().unwrap();
    assert!(crate::frames::closed_by_server(&mut probe));
    drop(idle);
    let lines = wait_json_lines(&mut s, "out", sent);
    assert_exactly_once(&lines, "good", "good", sent);
    s.assert_healthy();
}

/// A frame sent at a byte a second is closed within frame_timeout (and a second).
#[test]
fn a_slowloris_is_closed_within_frame_timeout() {
    let cfg = config(32, "frame_timeout = \"2s\"");
    let mut s = Sluice::start("hostile-slow", &cfg);
    let fwd = s.addr("fwd");
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(fwd, stop.clone(), 200);
    let whole = frame(
        Mode::Forward,
        "slow",
        &[(Time::Int(1), record("slow", 0, 200))],
        None,
    );
    let mut slow = connect(fwd);
    let begun = Instant::now();
    let mut closed = None;
    for b in &whole {
        if slow.write_all(&[*b]).is_err() {
            closed = Some(begun.elapsed());
            break;
        }
        slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut tmp = [0u8; 16];
        match std::io::Read::read(&mut slow, &mut tmp) {
            Ok(0) => {
                closed = Some(begun.elapsed());
                break;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                closed = Some(begun.elapsed());
                break;
            }
            _ => {}
        }
    }
    let closed = closed.expect("the slow frame was never closed");
    eprintln!("slowloris closed after {closed:?}");
    assert!(
        closed <= Duration::from_secs(3) + Duration::from_millis(500),
        "closed after {closed:?} (frame_timeout 2s)"
    );
    s.wait_stat("connections_slow", |n| n == 1);
    s.wait_log("slow close", |l| {
        l.contains("did not arrive whole within its input's frame_timeout")
    });
    stop.store(true, Ordering::Relaxed);
    let sent = good.join().unwrap();
    let lines = wait_json_lines(&mut s, "out", sent);
    assert_eq!(lines.len(), sent, "nothing of the slow frame");
    assert_exactly_once(&lines, "good", "good", sent);
    s.assert_healthy();
}

/// The acks owed for good frames are written before a bad frame closes the connection.
#[test]
fn acks_owed_are_written_before_a_bad_frame_closes() {
    let cfg = config(32, "");
    let mut s = Sluice::start("hostile-owed", &cfg);
    let mut c = connect(s.addr("fwd"));
    let mut bytes = Vec::new();
    for k in 0..5 {
        let events = [(Time::Int(1), record("owed", k, 200))];
        bytes.extend(frame(
            Mode::Forward,
            "owed",
            &events,
            Some(&format!("o{k}")),
        ));
    }
    // A frame whose tag is not a string.
    bytes.extend([0x93, 0x01, 0x01, 0x80]);
    c.write_all(&bytes).unwrap();
    let acks = read_acks(&mut c, 5);
    assert_eq!(acks, ["o0", "o1", "o2", "o3", "o4"]);
    assert!(crate::frames::closed_by_server(&mut c));
    s.wait_stat("errors.bad_tag", |n| n == 1);
    let lines = wait_json_lines(&mut s, "out", 5);
    assert_exactly_once(&lines, "owed", "owed", 5);
    s.assert_healthy();
}

/// `member` repeated until it inflates to 10 GiB: gzip members and zstd frames may follow
/// one another in one body.
fn bomb(codec: &str) -> Vec<u8> {
    let body = match codec {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::best());
            e.write_all(&vec![0u8; 64 << 20]).unwrap();
            e.finish().unwrap().repeat(160)
        }
        // Frames of 1 MiB, whose window is within what sluice accepts.
        _ => zstd::bulk::compress(&vec![0u8; 1 << 20], 19)
            .unwrap()
            .repeat(10 << 10),
    };
    // [tag, bin32(body), {"compressed": codec}]
    let mut f = vec![0x93, 0xa4];
    f.extend(b"bomb");
    f.push(0xc6);
    f.extend((body.len() as u32).to_be_bytes());
    f.extend(&body);
    f.extend([0x81, 0xaa]);
    f.extend(b"compressed");
    f.push(0xa0 | codec.len() as u8);
    f.extend(codec.as_bytes());
    f
}

/// Two 10 GiB gzip bombs at once and a zstd bomb: each is refused at
/// max_decompressed_bytes, and inflation never holds more than that.
#[test]
fn decompression_bombs_are_refused_within_the_budget() {
    const LIMIT_MIB: u64 = 64;
    // A bomb left waiting for memory that only the others hold is closed by frame_timeout.
    let cfg = config(
        LIMIT_MIB,
        "max_frame_bytes = \"16MiB\"\nframe_timeout = \"5s\"",
    );
    let mut s = Sluice::start("hostile-bombs", &cfg);
    let fwd = s.addr("fwd");
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(fwd, stop.clone(), 2000);
    let (gz, zst) = (bomb("gzip"), bomb("zstd"));
    eprintln!(
        "bombs: gzip {} KiB, zstd {} KiB, each 10 GiB inflated",
        gz.len() >> 10,
        zst.len() >> 10
    );
    let bombers: Vec<_> = [gz.clone(), gz, zst]
        .into_iter()
        .map(|b| {
            std::thread::spawn(move || {
                let mut c = connect(fwd);
                // Closed while still sending is as good as after.
                let _ = c.write_all(&b);
                crate::frames::closed_by_server(&mut c)
            })
        })
        .collect();
    for b in bombers {
        assert!(b.join().unwrap(), "a bomb's connection was closed");
    }
    // Refused as it inflates past the limit (or needs a window past it), closed for
    // holding the most of the input memory (a 10 MiB frame) while another connection
    // waits, or closed by frame_timeout while it waits for memory the others hold.
    let (refused, evicted) = s.wait_for("three bombs refused", |s| {
        let st = s.stats();
        let n = |k: &str| st.get(k).copied().unwrap_or(0);
        let r = (
            n("errors.decompressed_too_large") + n("errors.decompress"),
            n("connections_evicted") + n("connections_slow"),
        );
        (r.0 >= 1 && r.0 + r.1 >= 3).then_some(r)
    });
    eprintln!(
        "{refused} refused (too large, or a window too large), {evicted} closed waiting for memory"
    );
    stop.store(true, Ordering::Relaxed);
    let sent = good.join().unwrap();
    let peak = s.peak_rss_kib();
    eprintln!("bombs refused; peak RSS {} MiB", peak / 1024);
    assert!(
        peak < (LIMIT_MIB + OVERHEAD_MIB) * 1024,
        "peak RSS {peak} KiB against memory_limit {LIMIT_MIB} MiB"
    );
    let lines = wait_json_lines(&mut s, "out", sent);
    assert_eq!(lines.len(), sent, "only the good events");
    assert_exactly_once(&lines, "good", "good", sent);
    s.assert_healthy();
}

/// 10 senders that never wait and 10 that wait for each ack share a slow sink (a pipe
/// read at a limited pace): the connections held back take turns, so every acked client
/// keeps getting acks, none fewer than a tenth of the average.
#[test]
fn acked_clients_are_not_starved_by_blasters() {
    use std::io::BufRead;
    let cfg = r#"
[engine]
workers = 2
stats_interval = "1s"
ring_capacity = 2

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.out]
type = "stdout"
batch_bytes = "64KiB"
linger = "20ms"

[[routes]]
match = "**"
sinks = "out"
"#;
    let mut s = Sluice::start_with(
        "hostile-fair",
        cfg,
        crate::harness::Opts {
            pipe_stdout: true,
            ..Default::default()
        },
    );
    let fwd = s.addr("fwd");
    // The slow sink: about 25,000 lines a second are read.
    let target = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let stdout = s.stdout.take().unwrap();
    let reader = {
        let target = target.clone();
        std::thread::spawn(move || {
            let mut acked: Vec<Vec<u32>> = vec![Vec::new(); 10];
            let mut lines = 0;
            for line in std::io::BufReader::new(stdout).lines() {
                let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
                if let Some(c) = v["client"].as_str().and_then(|c| c.strip_prefix('a')) {
                    acked[c.parse::<usize>().unwrap()].push(v["seq"].as_u64().unwrap() as u32);
                }
                lines += 1;
                if lines % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(4));
                }
                if lines >= target.load(Ordering::Relaxed) {
                    break;
                }
            }
            (lines, acked)
        })
    };
    // Large frames: one paused half-way holds the core's other connections back until it
    // is finished.
    const BLAST: usize = 5000;
    let stop = Arc::new(AtomicBool::new(false));
    let blasters: Vec<_> = (0..10)
        .map(|b| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = connect(fwd);
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    let events: Vec<_> = (0..BLAST)
                        .map(|k| (Time::Int(1), record(&format!("b{b}"), sent + k, 100)))
                        .collect();
                    c.write_all(&frame(Mode::PackedBin, "blast", &events, None))
                        .unwrap();
                    sent += BLAST;
                }
                sent
            })
        })
        .collect();
    let acked: Vec<_> = (0..10)
        .map(|a| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = connect(fwd);
                let (mut sent, mut acks) = (0, Vec::new());
                let begun = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let events: Vec<_> = (0..10)
                        .map(|k| (Time::Int(1), record(&format!("a{a}"), sent + k, 100)))
                        .collect();
                    let chunk = format!("a{a}-{sent}");
                    c.write_all(&frame(Mode::PackedBin, "acked", &events, Some(&chunk)))
                        .unwrap();
                    assert_eq!(read_acks(&mut c, 1), [chunk]);
                    acks.push(begun.elapsed());
                    sent += 10;
                }
                (sent, acks)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(16));
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<(usize, Vec<Duration>)> = acked.into_iter().map(|t| t.join().unwrap()).collect();
    let blasted: usize = blasters.into_iter().map(|t| t.join().unwrap()).sum();
    let sent: usize = acked.iter().map(|a| a.0).sum();
    target.store(blasted + sent, Ordering::Relaxed);
    let (lines, seqs) = reader.join().unwrap();
    let counts: Vec<usize> = acked.iter().map(|a| a.1.len()).collect();
    // Acks in the second half of the run, when the blasters had long filled everything,
    // and before they stopped.
    let late: Vec<usize> = acked
        .iter()
        .map(|a| {
            let late = Duration::from_secs(8)..Duration::from_millis(15_500);
            a.1.iter().filter(|t| late.contains(*t)).count()
        })
        .collect();
    let avg = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
    eprintln!(
        "fairness: {blasted} blasted events, acks per acked client {counts:?} (avg {avg:.0}), in the second half {late:?}; {lines} lines read"
    );
    assert!(
        counts.iter().all(|&n| n as f64 >= avg / 10.0),
        "an acked client got less than a tenth of the average: {counts:?}"
    );
    assert!(
        late.iter().all(|&n| n > 0),
        "an acked client stopped getting acks: {late:?}"
    );
    assert_eq!(lines, blasted + sent, "every event, once");
    for (a, mut got) in seqs.into_iter().enumerate() {
        got.sort_unstable();
        let want: Vec<u32> = (0..acked[a].0 as u32).collect();
        assert_eq!(got, want, "acked client {a}: every event once");
    }
    s.assert_healthy();
}
