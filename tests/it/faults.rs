//! What the emulators cannot do, against the fault-injecting fake: partial failures,
//! throttled requests, 5xx, a 10 s outage, permanent refusals, and a service that answers
//! slowly. Nothing is lost, nothing accepted is sent twice, the concurrency limit and the
//! shard rates drop and recover, refused records land in the dead-letter directory or the
//! route's fallback sink, and a slow service holds memory at its bound.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::fake_aws::{Fake, Faults, wait_seen};
use crate::frames::{AckReader, Mode, Time, connect, frame, read_acks, record};
use crate::harness::{PATIENCE, Sluice};

const CONFIG: &str = r#"
[engine]
workers = 2
stats_interval = "250ms"
dead_letter_dir = "{dir}/dead"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.events]
type = "kinesis"
stream = "events"
endpoint = "{endpoint}"
linger = "50ms"
max_concurrency = 32

[sinks.gone]
type = "kinesis"
stream = "missing"
endpoint = "{endpoint}"
linger = "50ms"

[sinks.gone_too]
type = "firehose"
delivery_stream = "also-missing"
endpoint = "{endpoint}"
line_packing = false
linger = "50ms"

[sinks.spill]
type = "file"
path = "{dir}/spill.ndjson"
linger = "50ms"

[[routes]]
match = "gone.**"
sinks = "gone"

[[routes]]
match = "spill.**"
sinks = "gone_too"
fallback = "spill"

[[routes]]
match = "**"
sinks = "events"
"#;

/// Sends acked frames of 25 events about 20 times a second until `stop`; returns how
/// many events it sent (all acked by then).
pub fn keep_sending(addr: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicUsize>) -> usize {
    let mut conn = connect(addr);
    let frames = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (mut acks, frames, stop) = (
            AckReader::new(conn.try_clone().unwrap()),
            frames.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut n = 0;
            while !(stop.load(Ordering::Relaxed) && n >= frames.load(Ordering::Relaxed)) {
                if n < frames.load(Ordering::Relaxed) {
                    n += acks.some().len();
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            n
        })
    };
    while !stop.load(Ordering::Relaxed) {
        let base = sent.load(Ordering::Relaxed);
        let events: Vec<_> = (base..base + 25)
            .map(|k| (Time::Int(1), record("f", k, 200)))
            .collect();
        let f = frames.load(Ordering::Relaxed);
        conn.write_all(&frame(
            Mode::PackedBin,
            "app",
            &events,
            Some(&format!("c{f}")),
        ))
        .unwrap();
        sent.fetch_add(25, Ordering::Relaxed);
        frames.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        reader.join().unwrap(),
        frames.load(Ordering::Relaxed),
        "every chunk acked"
    );
    sent.load(Ordering::Relaxed)
}

/// Every value of the counter `key` in every Stats line so far, in order.
fn series(s: &Sluice, key: &str) -> Vec<u64> {
    s.logs()
        .iter()
        .filter(|l| l.contains("Stats "))
        .filter_map(|l| crate::harness::field(l, key).and_then(|v| v.parse().ok()))
        .collect()
}

#[test]
fn throttles_failures_and_an_outage_lose_nothing_and_resend_nothing_accepted() {
    let fake = Fake::start(2, &["events"], true);
    let mut s = Sluice::start("faults", &CONFIG.replace("{endpoint}", &fake.endpoint()));
    let (stop, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let client = {
        let (addr, stop, sent) = (s.addr("fwd"), stop.clone(), sent.clone());
        std::thread::spawn(move || keep_sending(addr, stop, sent))
    };
    // Each phase lasts `secs`, and then until the fake has injected its fault a few times.
    let phase =
        |what: &str, faults: Faults, secs: u64, enough: fn(&crate::fake_aws::Seen) -> bool| {
            eprintln!("phase: {what}");
            fake.set(faults);
            std::thread::sleep(Duration::from_secs(secs));
            wait_seen(&fake, what, PATIENCE, enough);
        };
    phase("normal", Faults::default(), 4, |_| true);
    let before = series(&s, "sink.events.concurrency");
    let warm = *before.iter().max().unwrap();
    let before_cuts = series(&s, "sink.events.shard_cuts")
        .last()
        .copied()
        .unwrap_or(0);
    phase(
        "30% of records throttled",
        Faults {
            throttle_records: 0.3,
            ..Faults::default()
        },
        4,
        |seen| seen.throttled_records >= 50,
    );
    let cuts_in_b = series(&s, "sink.events.shard_cuts");
    phase(
        "half the requests throttled",
        Faults {
            throttle_requests: 0.5,
            ..Faults::default()
        },
        3,
        |seen| seen.throttled_requests >= 5,
    );
    let during = series(&s, "sink.events.concurrency");
    phase(
        "half the requests fail with 500",
        Faults {
            server_errors: 0.5,
            ..Faults::default()
        },
        2,
        |seen| seen.server_errors >= 3,
    );
    phase(
        "a 10 s outage",
        Faults {
            outage_until: Some(Instant::now() + Duration::from_secs(10)),
            ..Faults::default()
        },
        10,
        |seen| seen.dropped_connections > 0,
    );
    phase("normal again", Faults::default(), 6, |_| true);
    stop.store(true, Ordering::Relaxed);
    let n = client.join().unwrap_or_else(|_| {
        let logs = s.logs();
        panic!(
            "the client failed; sluice's log ends:\n{}",
            logs[logs.len().saturating_sub(40)..].join("\n")
        )
    });

    // Every event accepted exactly once: nothing lost, nothing accepted sent again.
    wait_seen(&fake, "every event", PATIENCE, |seen| {
        seen.records as usize >= n
    });
    let seen = fake.seen.lock().unwrap();
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for d in &seen.data {
        let ev: serde_json::Value = serde_json::from_slice(d).unwrap();
        *count.entry(ev["seq"].as_u64().unwrap()).or_default() += 1;
    }
    assert_eq!(count.len(), n, "every event arrived");
    let twice: Vec<_> = count.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(twice.is_empty(), "accepted records sent again: {twice:?}");
    eprintln!(
        "{n} events; fake saw {} requests, {} records throttled, {} requests throttled, {} 500s, {} connections dropped",
        seen.requests,
        seen.throttled_records,
        seen.throttled_requests,
        seen.server_errors,
        seen.dropped_connections
    );
    assert!(
        seen.throttled_records > 0
            && seen.throttled_requests > 0
            && seen.server_errors > 0
            && seen.dropped_connections > 0
    );
    drop(seen);

    // The concurrency limit grew, fell under throttling, and grew back.
    let after = series(&s, "sink.events.concurrency");
    let low = *during[before.len()..].iter().min().unwrap();
    let end = *after.last().unwrap();
    eprintln!("concurrency: warm {warm}, low {low} while throttled, {end} at the end");
    assert!(warm > 4, "the limit grew while all went well: {before:?}");
    assert!(low < warm, "the limit fell under throttling");
    assert!(end > low, "the limit grew back: {after:?}");

    // The shard rates were cut on the throttled records (not the stream's concurrency, which
    // grew through that phase) and recovered: a shard's rate is reported while it is below
    // the full rate (950 records/s, 0.95 of 1000).
    let cut = cuts_in_b.last().copied().unwrap_or(0) - before_cuts;
    let slowed = series(&s, "sink.events.shards_slowed");
    eprintln!(
        "shard rates cut {cut} times while records were throttled; shards slowed: {slowed:?}"
    );
    assert!(
        cut > 0,
        "the throttled shards' rates were cut: {cuts_in_b:?}"
    );
    assert!(slowed.iter().any(|&n| n > 0));
    let stats = s.wait_stat("sink.events.shards_slowed", |n| n == 0);
    assert_eq!(stats["sink.events.shard_rate_full"], 950);
    assert!(
        !stats.contains_key("sink.events.shard.shardId-000000000000.rate"),
        "and recovered to the full rate"
    );
    assert!(stats["sink.events.throttles"] > 0 && stats["sink.events.retries"] > 0);
    assert!(stats["sink.events.failed.ProvisionedThroughputExceededException"] > 0);
    s.assert_healthy();
}

#[test]
fn permanent_refusals_go_to_the_dead_letter_directory_or_the_fallback() {
    let fake = Fake::start(2, &["events"], true);
    let mut s = Sluice::start("refused", &CONFIG.replace("{endpoint}", &fake.endpoint()));
    let mut conn = connect(s.addr("fwd"));
    let dead: Vec<_> = (0..60)
        .map(|k| (Time::Int(1), record("dead", k, 200)))
        .collect();
    conn.write_all(&frame(Mode::PackedBin, "gone.away", &dead, Some("d1")))
        .unwrap();
    let spilled: Vec<_> = (0..40)
        .map(|k| (Time::Int(1), record("spill", k, 200)))
        .collect();
    conn.write_all(&frame(Mode::Forward, "spill.over", &spilled, Some("s1")))
        .unwrap();
    // Records set down safely are acked like delivered ones.
    let mut acks = read_acks(&mut conn, 2);
    acks.sort();
    assert_eq!(acks, ["d1", "s1"]);

    // Kinesis said the stream does not exist: every record is in the dead-letter files.
    let dir = s.dir.join("dead/gone");
    let mut records = Vec::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        let mut lines = text.lines();
        let head: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert!(
            head["reason"]
                .as_str()
                .unwrap()
                .contains("ResourceNotFoundException"),
            "{head}"
        );
        for l in lines {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(r["partition_key"].as_str().unwrap().len(), 32);
            let data = aws_smithy_types::base64::decode(r["data"].as_str().unwrap()).unwrap();
            records.push(
                serde_json::json!({"shard": "dead", "data": String::from_utf8(data).unwrap()}),
            );
        }
    }
    crate::kinesis::exactly_once(&records, "dead", 60);
    let stats = s.wait_stat("sink.gone.dead_lettered", |n| n == 60);
    assert_eq!(
        stats["sink.gone.failed"], 0,
        "a refused request fails no record by code"
    );

    // Firehose refused too, and that route falls back to a file sink.
    let spill = crate::harness::wait_json_lines(&mut s, "spill", 40);
    crate::harness::assert_exactly_once(
        &spill
            .iter()
            .map(|v| serde_json::json!({"tag": "x", "client": v["client"], "seq": v["seq"]}))
            .collect::<Vec<_>>(),
        "x",
        "spill",
        40,
    );
    s.wait_stat("sink.gone_too.fallback", |n| n == 40);
    s.wait_log("dead-letter log", |l| {
        l.contains("Dead-lettered records") && l.contains("ResourceNotFoundException")
    });
    s.assert_healthy();
}

/// What the slow-service test pushes through: far more than the memory bound below.
const SLOW_FRAMES: usize = 45;
const SLOW_PER_FRAME: usize = 1000;
/// Events of 4 KB make batches of 2 MB (500 records) and request bodies of 2.7 MB: at 32
/// requests in flight, unbounded, that would be 150 MB.
const SLOW_EVENT_BYTES: usize = 4000;
const SLOW_MEMORY_LIMIT: u64 = 16 << 20;

/// What README ("Memory") gives as the most the process holds beyond `memory_limit` on two
/// workers: what it holds at start, the allocator's slack, the input's frame buffers.
const OVERHEAD_BOUND: u64 = 64 << 20;

/// How far the budget may go past its limit: a batch's growth on each core and one
/// request's body (README, "Memory").
const BUDGET_OVERSHOOT: u64 = 2 * (4 << 20) + (3 << 20);

#[test]
fn a_slow_service_holds_memory_to_its_bound_and_loses_nothing() {
    // Shards enough that their rates (950 records/s, 1 MiB/s each) do not set the pace:
    // the slow answers do.
    let fake = Fake::start(256, &["events"], true);
    fake.set(Faults {
        delay: Some(Duration::from_millis(250)),
        ..Faults::default()
    });
    let config = CONFIG.replace("{endpoint}", &fake.endpoint()).replace(
        "workers = 2\n",
        &format!("workers = 2\nmemory_limit = {SLOW_MEMORY_LIMIT}\n"),
    );
    let mut s = Sluice::start("slow", &config);
    let idle = s.rss_kib() * 1024;
    let frames: Vec<Vec<u8>> = (0..SLOW_FRAMES)
        .map(|f| {
            let events: Vec<_> = (0..SLOW_PER_FRAME)
                .map(|k| {
                    let seq = f * SLOW_PER_FRAME + k;
                    (Time::Int(1), record("slow", seq, SLOW_EVENT_BYTES))
                })
                .collect();
            frame(Mode::PackedBin, "app", &events, Some(&format!("s{f}")))
        })
        .collect();
    let wire: usize = frames.iter().map(Vec::len).sum();
    // Every frame at once: TCP holds the client back, not an ack window.
    let mut conn = connect(s.addr("fwd"));
    let mut acks_conn = conn.try_clone().unwrap();
    let acks = std::thread::spawn(move || read_acks(&mut acks_conn, SLOW_FRAMES).len());
    let client = std::thread::spawn(move || {
        for f in &frames {
            conn.write_all(f).expect("the connection stays open");
        }
        conn
    });
    let n = SLOW_FRAMES * SLOW_PER_FRAME;
    wait_seen(&fake, "every event", PATIENCE * 4, |seen| {
        seen.records as usize >= n
    });
    assert_eq!(acks.join().unwrap(), SLOW_FRAMES, "every chunk acked");
    drop(client.join().unwrap());
    let peak = s.peak_rss_kib() * 1024;
    let budget = s.wait_stat("memory_peak", |n| n > 0)["memory_peak"];

    let seen = fake.seen.lock().unwrap();
    let mut count = vec![0u8; n];
    for d in &seen.data {
        let ev: serde_json::Value = serde_json::from_slice(d).unwrap();
        count[ev["seq"].as_u64().unwrap() as usize] += 1;
    }
    let (missing, twice) = (
        count.iter().filter(|&&c| c == 0).count(),
        count.iter().filter(|&&c| c > 1).count(),
    );
    eprintln!(
        "slow service: {wire} bytes sent as {n} events in {} requests; memory_limit {SLOW_MEMORY_LIMIT}, budget peak {budget}, sluice RSS at start {idle}, peak {peak}",
        seen.requests
    );
    assert_eq!((missing, twice), (0, 0), "every event exactly once");
    assert!(
        wire as u64 > 10 * SLOW_MEMORY_LIMIT,
        "the test pushes far more than memory_limit through"
    );
    assert!(
        budget <= SLOW_MEMORY_LIMIT + BUDGET_OVERSHOOT,
        "the budget's peak {budget} is past its limit by more than the documented overshoot"
    );
    assert!(
        peak <= SLOW_MEMORY_LIMIT + OVERHEAD_BOUND,
        "peak RSS {peak}, bound {}",
        SLOW_MEMORY_LIMIT + OVERHEAD_BOUND
    );
    drop(seen);
    s.assert_healthy();
}

/// SIGTERM while the service is down, with no WAL: sluice still exits 0 by the default
/// deadline (drain_timeout, 25 s from the signal), prints its final counters, and says how
/// many events it read and could not deliver.
#[test]
fn sigterm_with_the_service_down_exits_0_and_counts_the_undelivered_events() {
    let fake = Fake::start(1, &["events"], true);
    let cfg = r#"
[engine]
workers = 2
stats_interval = "250ms"

[inputs.json]
type = "json_lines"
address = "127.0.0.1:0"
udp = false

[sinks.events]
type = "kinesis"
stream = "events"
endpoint = "{endpoint}"
linger = "50ms"

[[routes]]
match = "**"
sinks = "events"
"#;
    // The shard map is read at start-up, so the outage begins once sluice is ready.
    let mut s = Sluice::start(
        "down-at-sigterm",
        &cfg.replace("{endpoint}", &fake.endpoint()),
    );
    fake.set(Faults {
        outage_until: Some(Instant::now() + Duration::from_secs(3600)),
        ..Faults::default()
    });
    let mut c = std::net::TcpStream::connect(s.addr("json")).unwrap();
    for i in 0..300 {
        writeln!(c, r#"{{"seq":{i},"msg":"never delivered"}}"#).unwrap();
    }
    drop(c);
    s.wait_stat("events_in", |n| n == 300);
    wait_seen(&fake, "requests refused by the outage", PATIENCE, |s| {
        s.dropped_connections > 0
    });
    let signalled = Instant::now();
    let (status, logs) = s.stop();
    eprintln!(
        "exited {:.1} s after SIGTERM",
        signalled.elapsed().as_secs_f64()
    );
    let all = logs.join("\n");
    assert!(
        status.success(),
        "exit 0 after the deadline: {status}\n{all}"
    );
    let last = logs
        .iter()
        .find(|l| l.contains("Final stats"))
        .unwrap_or_else(|| panic!("no final counters:\n{all}"));
    assert!(last.contains("events_undelivered=300"), "{last}");
    assert!(last.contains("sink.events.records=0"), "{last}");
    let said: u64 = logs
        .iter()
        .filter(|l| l.contains("ERROR") && l.contains("Drain deadline reached"))
        .map(|l| {
            crate::harness::field(l, "events")
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(said, 300, "the error lines count every event:\n{all}");
}

/// Records dead-lettered because their stream did not exist are sent again by
/// `sluice dlq replay` once it does: each exactly once, and their files are removed, so a
/// second replay sends nothing.
#[test]
fn dlq_replay_sends_dead_letters_once_to_a_now_healthy_sink() {
    use crate::harness::BIN;
    use std::process::Command;
    let fake = Fake::start(1, &["events"], true);
    let mut s = Sluice::start("dlq", &CONFIG.replace("{endpoint}", &fake.endpoint()));
    let mut conn = connect(s.addr("fwd"));
    for c in 0..4 {
        let events: Vec<_> = (0..50)
            .map(|k| (Time::Int(1), record("dead", c * 50 + k, 200)))
            .collect();
        conn.write_all(&frame(
            Mode::PackedBin,
            "gone.away",
            &events,
            Some(&format!("d{c}")),
        ))
        .unwrap();
    }
    assert_eq!(read_acks(&mut conn, 4).len(), 4);
    s.wait_stat("sink.gone.dead_lettered", |n| n == 200);
    let dir = s.dir.clone();
    let (status, _) = s.stop();
    assert!(status.success());
    let cli = |config: &std::path::Path, args: &[&str]| {
        let out = Command::new(BIN)
            .args(["dlq"])
            .args(args)
            .arg("--config")
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, listed) = cli(&dir.join("sluice.toml"), &["list", "--sink", "gone"]);
    assert!(ok, "{listed}");
    let files = listed.lines().filter(|l| l.contains("sink=gone")).count();
    assert!(files >= 1, "{listed}");
    assert!(listed.contains("ResourceNotFoundException"), "{listed}");

    // The cause is fixed: the stream exists (on a new endpoint).
    let fixed = Fake::start(1, &["missing"], true);
    let config = dir.join("fixed.toml");
    std::fs::write(
        &config,
        CONFIG
            .replace("{endpoint}", &fixed.endpoint())
            .replace("{dir}", dir.to_str().unwrap()),
    )
    .unwrap();
    let (ok, out) = cli(&config, &["replay", "--sink", "gone", "--since", "1h"]);
    assert!(ok, "{out}");
    assert!(out.contains("200 records sent again"), "{out}");
    let seen = fixed.seen.lock().unwrap();
    let mut seqs: Vec<u64> = seen
        .data
        .iter()
        .map(|d| {
            serde_json::from_slice::<serde_json::Value>(d).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    drop(seen);
    seqs.sort();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>(), "each record once");
    let (ok, out) = cli(&config, &["replay"]);
    assert!(ok && out.contains("No dead-letter files"), "{out}");
    assert_eq!(fixed.seen.lock().unwrap().records, 200);
}

/// `max_unacked_bytes` bounds what one connection may have read and not yet acked: with
/// acks waiting on a slow service, sluice stops reading the connection at the cap (plus at
/// most one read) and goes on as acks come back.
#[test]
fn a_connection_stops_being_read_at_max_unacked_bytes() {
    let fake = Fake::start(4, &["events"], true);
    fake.set(Faults {
        delay: Some(Duration::from_secs(3)),
        ..Faults::default()
    });
    let config = CONFIG.replace("{endpoint}", &fake.endpoint()).replace(
        "[inputs.fwd]\ntype = \"forward\"\n",
        "[inputs.fwd]\ntype = \"forward\"\nmax_unacked_bytes = \"64KiB\"\n",
    );
    let mut s = Sluice::start("unacked", &config);
    let frames: Vec<Vec<u8>> = (0..30)
        .map(|f| {
            let events: Vec<_> = (0..10)
                .map(|k| (Time::Int(1), record("capped", f * 10 + k, 1000)))
                .collect();
            frame(Mode::PackedBin, "app", &events, Some(&format!("u{f}")))
        })
        .collect();
    let frame_bytes = frames[0].len();
    let mut conn = connect(s.addr("fwd"));
    let mut acks_conn = conn.try_clone().unwrap();
    let acks = std::thread::spawn(move || read_acks(&mut acks_conn, 30).len());
    std::thread::spawn(move || {
        for f in frames {
            conn.write_all(&f).unwrap();
        }
        conn
    });
    std::thread::sleep(Duration::from_millis(1500));
    let read = s.stats()["frames_in"];
    // The cap, plus what one 64 KiB read brought in past it.
    let bound = (128 << 10) / frame_bytes + 1;
    assert!(
        read as usize <= bound,
        "{read} frames of {frame_bytes} B read with acks pending; bound {bound}"
    );
    eprintln!("{read} frames of {frame_bytes} B read while their acks waited (bound {bound})");
    assert!(read > 0);
    assert_eq!(
        acks.join().unwrap(),
        30,
        "every chunk acked as the service answered"
    );
    let stats = s.wait_stat("sink.events.records", |n| n == 300);
    assert_eq!(stats["frames_in"], 30);
}
