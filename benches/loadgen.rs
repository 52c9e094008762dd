//! End-to-end load generator. Starts `sluice` (or uses one already running, with `--addr`
//! and `--pid`), sends PackedForward frames of Docker-style events over N connections,
//! each keeping a window of chunks in flight and counting their acks, and reports acked
//! events per second and sluice's CPU seconds per million events (from /proc, so it counts
//! every thread of sluice). `--window 0` asks for no acks, as the Docker driver and Fluent
//! Bit do by default: with `--gib`, frames go out back to back, then sluice is stopped and
//! the run ends when it has drained and exited.
//!
//! `--sink` picks what sluice sends to: `null`, or `kinesis`, `kinesis-agg` (KPL
//! aggregation), `firehose` (line packing) or `firehose-records` (one event per record) at
//! the fast fake endpoint of `tests/support/fake_aws.rs`, run in this process with
//! `--shards` shards. Acks then mean the fake accepted the records. `--tls` makes the fake
//! speak TLS, as the real endpoints do, with a certificate from a CA made for the run that
//! sluice trusts through `SSL_CERT_FILE`, as a user trusts a private CA. `--throttle P`
//! makes the fake throttle a share P of the records; `--capacity` makes each shard (the
//! whole delivery stream, for Firehose) take at most 1,000 records and 1 MiB a second, as
//! the service does, and reports the accepted and throttled records second by second. `--gib X` sends a fixed volume instead of running for a
//! time: X GiB of events sized so that each becomes a record (a JSON line) of exactly
//! `--event-bytes`, and reports the requests, records and Kinesis PUT payload units (25 KiB
//! each) the fake was sent, against the minimum, X GiB / 25 KiB.
//!
//!   cargo bench --bench loadgen -- [--sink null] [--connections 4] [--seconds 10]
//!       [--warmup 2] [--events-per-frame 1000] [--event-bytes 200] [--window 8]
//!       [--workers N] [--shards 2048] [--gib X] [--tls] [--throttle P] [--capacity]
//!       [--sluice PATH] [--sink-option 'KEY = VALUE'] [--io uring|epoll] [--wal-sync 20ms]
//!       [--addr HOST:PORT --pid PID]
//!
//! `--sluice` starts another build of sluice than this one, to compare two builds in one
//! session.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it makes three short smoke
//! runs: to the null sink, 0.01 GiB aggregated into the fake over TLS, and 0.01 GiB without
//! acks line-packed into the fake Firehose; it checks that every chunk is acked and every
//! byte arrived.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone)]
struct Args {
    sink: String,
    connections: usize,
    seconds: f64,
    warmup: f64,
    events_per_frame: usize,
    event_bytes: usize,
    window: usize,
    workers: Option<usize>,
    /// `engine.io` for the sluice this starts (its default, `auto`, if not given).
    io: Option<String>,
    /// With a write-ahead log, synced this often (`--wal-sync 20ms`).
    wal_sync: Option<String>,
    shards: usize,
    gib: Option<f64>,
    tls: bool,
    throttle: f64,
    capacity: bool,
    /// The sluice binary to start: this build's, or another (to compare two builds).
    sluice: String,
    /// Extra lines for the sink's config section (`--sink-option 'max_concurrency = 8'`).
    sink_options: Vec<String>,
    addr: Option<SocketAddr>,
    pid: Option<u32>,
}

/// The runs to make: the one asked for, or the smoke runs.
fn runs() -> Vec<Args> {
    let mut a = Args {
        sink: "null".into(),
        connections: 4,
        seconds: 10.0,
        warmup: 2.0,
        events_per_frame: 1000,
        event_bytes: 200,
        window: 8,
        workers: None,
        io: None,
        wal_sync: None,
        shards: 2048,
        gib: None,
        tls: false,
        throttle: 0.0,
        capacity: false,
        sluice: env!("CARGO_BIN_EXE_sluice").into(),
        sink_options: vec![],
        addr: None,
        pid: None,
    };
    let mut bench = false;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--bench" => bench = true,
            "--sink" => a.sink = v(),
            "--connections" => a.connections = v().parse().unwrap(),
            "--seconds" => a.seconds = v().parse().unwrap(),
            "--warmup" => a.warmup = v().parse().unwrap(),
            "--events-per-frame" => a.events_per_frame = v().parse().unwrap(),
            "--event-bytes" => a.event_bytes = v().parse().unwrap(),
            "--window" => a.window = v().parse().unwrap(),
            "--workers" => a.workers = Some(v().parse().unwrap()),
            "--io" => a.io = Some(v()),
            "--wal-sync" => a.wal_sync = Some(v()),
            "--shards" => a.shards = v().parse().unwrap(),
            "--gib" => a.gib = Some(v().parse().unwrap()),
            "--tls" => a.tls = true,
            "--throttle" => a.throttle = v().parse().unwrap(),
            "--capacity" => a.capacity = true,
            "--sluice" => a.sluice = v(),
            "--sink-option" => a.sink_options.push(v()),
            "--addr" => a.addr = Some(v().parse().unwrap()),
            "--pid" => a.pid = Some(v().parse().unwrap()),
            // cargo and libtest flags we do not use
            _ => {}
        }
    }
    assert!(
        [
            "null",
            "kinesis",
            "kinesis-agg",
            "firehose",
            "firehose-records"
        ]
        .contains(&a.sink.as_str()),
        "--sink is null, kinesis, kinesis-agg, firehose or firehose-records"
    );
    assert!(
        a.addr.is_none() || a.sink == "null",
        "--sink needs the sluice this starts; drop --addr"
    );
    assert!(
        a.window > 0 || (a.gib.is_some() && a.addr.is_none()),
        "--window 0 (no acks) needs --gib, and the sluice this starts: it ends when sluice has drained"
    );
    if bench {
        return vec![a];
    }
    let smoke = Args {
        connections: 2,
        seconds: 1.0,
        warmup: 0.0,
        events_per_frame: 100,
        shards: 64,
        ..a
    };
    vec![
        smoke.clone(),
        Args {
            sink: "kinesis-agg".into(),
            gib: Some(0.01),
            tls: true,
            ..smoke.clone()
        },
        Args {
            sink: "firehose".into(),
            gib: Some(0.01),
            window: 0,
            ..smoke
        },
    ]
}

#[path = "../tests/support/forward.rs"]
mod support;
use support::{Mode, Opts, Time, docker_record};

#[path = "../tests/support/fake_aws.rs"]
mod fake_aws;
use fake_aws::Fake;

/// A PackedForward frame and where its 16-digit chunk id sits (no id, and no ack asked
/// for, unless `ack`).
fn frame(events: usize, size: usize, ack: bool) -> (Vec<u8>, usize) {
    let events: Vec<_> = (0..events)
        .map(|i| {
            (
                Time::FixExt8(1_700_000_000, i as u32),
                docker_record(i, size),
            )
        })
        .collect();
    let id = b"0000000000000000";
    let opts = Opts {
        chunk: ack.then(|| std::str::from_utf8(id).unwrap()),
        size: true,
        nil_options: false,
    };
    let f = support::frame(Mode::PackedBin, "docker.web", &events, opts);
    let at = match ack {
        true => f.windows(id.len()).rposition(|w| w == id).unwrap(),
        false => 0,
    };
    (f, at)
}

/// The length of the record sluice writes for `docker_record(i, size)`: a JSON object
/// and its newline.
fn record_len(size: usize) -> usize {
    let rmpv::Value::Map(fields) = docker_record(0, size) else {
        unreachable!()
    };
    let obj: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
        .collect();
    serde_json::to_string(&obj).unwrap().len() + 1
}

/// The `docker_record` size whose record is exactly `bytes` long.
fn size_for_record(bytes: usize) -> usize {
    (8..4 * bytes)
        .find(|&s| record_len(s) == bytes)
        .unwrap_or_else(|| panic!("no Docker record becomes a {bytes} B record"))
}

/// What a Kinesis shard takes a second.
/// <https://docs.aws.amazon.com/streams/latest/dev/service-sizes-and-limits.html>
const SHARD_RECORDS_PER_SEC: f64 = 1000.0;
const SHARD_BYTES_PER_SEC: f64 = 1024.0 * 1024.0;

/// `{"ack": "<16 chars>"}`: fixmap, fixstr "ack", fixstr of 16.
const ACK_LEN: usize = 1 + 4 + 1 + 16;

/// Peak resident memory of `pid` in bytes (VmHWM), while it runs.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU seconds of each of `pid`'s threads, summed by thread name.
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let name = &stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()];
        // Numbered threads (glommio's executors, tokio's workers) count under one name.
        let name = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        *by.entry(name.to_string()).or_insert(0.0) += stat_seconds(&stat);
    }
    by
}

/// utime + stime from a /proc stat line.
fn stat_seconds(stat: &str) -> f64 {
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // USER_HZ: /proc reports 100 ticks a second on every Linux ABI.
    ticks as f64 / 100.0
}

fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// The sink section of sluice's config for `--sink`.
fn sink_config(sink: &str, fake: Option<&Fake>) -> String {
    let endpoint = fake.map(Fake::endpoint).unwrap_or_default();
    match sink {
        "null" => "type = \"null\"".into(),
        "kinesis" => format!("type = \"kinesis\"\nstream = \"load\"\nendpoint = \"{endpoint}\""),
        "kinesis-agg" => format!(
            "type = \"kinesis\"\nstream = \"load\"\nendpoint = \"{endpoint}\"\naggregate = true"
        ),
        "firehose" => format!(
            "type = \"firehose\"\ndelivery_stream = \"load\"\nendpoint = \"{endpoint}\"\nline_packing = true"
        ),
        "firehose-records" => format!(
            "type = \"firehose\"\ndelivery_stream = \"load\"\nendpoint = \"{endpoint}\"\nline_packing = false"
        ),
        other => unreachable!("{other}"),
    }
}

/// Where a run's config, CA and dead letters go; removed once the runs are done.
fn scratch() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sluice-loadgen-{}", std::process::id()))
}

fn start_sluice(a: &Args, fake: Option<&Fake>) -> (Child, SocketAddr) {
    let dir = scratch();
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("sluice.toml");
    let mut workers = a
        .workers
        .map(|w| format!("workers = {w}\n"))
        .unwrap_or_default();
    if let Some(io) = &a.io {
        workers.push_str(&format!("io = {io:?}\n"));
    }
    let mut sink = sink_config(&a.sink, fake);
    for o in &a.sink_options {
        sink.push('\n');
        sink.push_str(o);
    }
    let dead = dir.join("dead");
    let wal = match &a.wal_sync {
        Some(sync) => format!(
            "[wal]\ndir = {:?}\nsync_interval = {sync:?}\n\n",
            dir.join("wal")
        ),
        None => String::new(),
    };
    std::fs::write(
        &cfg,
        format!(
            "[engine]\n{workers}stats_interval = \"1s\"\ndead_letter_dir = {dead:?}\n\n{wal}\
             [inputs.fwd]\ntype = \"forward\"\naddress = \"127.0.0.1:0\"\n\n\
             [sinks.out]\n{sink}\n\n[[routes]]\nmatch = \"**\"\nsinks = \"out\"\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&a.sluice);
    if let Some(pem) = fake.and_then(|f| f.ca_pem.as_ref()) {
        // Trusted the way a user trusts a private CA: the SDK's TLS client reads the roots
        // from SSL_CERT_FILE.
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, pem).unwrap();
        cmd.env("SSL_CERT_FILE", ca);
    }
    let mut child = cmd
        .args(["run", "--config"])
        .arg(&cfg)
        .env("AWS_ACCESS_KEY_ID", "loadgen")
        .env("AWS_SECRET_ACCESS_KEY", "loadgen")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        eprintln!("sluice: {line}");
        if let Some(at) = line.find("address=") {
            addr = line[at + 8..]
                .split_whitespace()
                .next()
                .and_then(|a| a.parse().ok());
        }
        if line.contains("Sluice is ready") {
            break;
        }
    }
    // Keep draining its log so it never blocks on stderr; show warnings and errors.
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if l.contains("WARN") || l.contains("ERROR") {
                eprintln!("sluice: {l}");
            }
            if let Some(v) = l.split("memory_peak=").nth(1) {
                let n = v
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                MEMORY_PEAK.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    (child, addr.expect("sluice printed its address"))
}

/// The most sluice's memory budget was charged, from its stats lines.
static MEMORY_PEAK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The frames to send: a template of `events_per_frame` events, and for a fixed volume,
/// how many frames and a last, shorter one.
struct Plan {
    frame: (Vec<u8>, usize),
    per: u64,
    /// Total frames, for a fixed volume.
    frames: Option<u64>,
    last: Option<((Vec<u8>, usize), u64)>,
    /// Events in all, for a fixed volume.
    events: u64,
    /// The size of each event's record (JSON and a newline).
    record: usize,
}

fn plan(a: &Args) -> Plan {
    let Some(gib) = a.gib else {
        return Plan {
            frame: frame(a.events_per_frame, a.event_bytes, a.window > 0),
            per: a.events_per_frame as u64,
            frames: None,
            last: None,
            events: 0,
            record: record_len(a.event_bytes),
        };
    };
    let size = size_for_record(a.event_bytes);
    let events = (gib * (1u64 << 30) as f64 / a.event_bytes as f64).round() as u64;
    let per = a.events_per_frame as u64;
    let rem = events % per;
    Plan {
        frame: frame(a.events_per_frame, size, a.window > 0),
        per,
        frames: Some(events.div_ceil(per)),
        last: (rem > 0).then(|| (frame(rem as usize, size, a.window > 0), rem)),
        events,
        record: a.event_bytes,
    }
}

fn run(a: &Args) {
    let fake = (a.sink != "null").then(|| {
        let f = Fake::start_with(a.shards, &["load"], false, a.tls);
        f.set(fake_aws::Faults {
            throttle_records: a.throttle,
            capacity: a
                .capacity
                .then_some((SHARD_RECORDS_PER_SEC, SHARD_BYTES_PER_SEC)),
            ..Default::default()
        });
        f
    });
    let (mut child, addr, pid) = match (a.addr, a.pid) {
        (Some(addr), pid) => (None, addr, pid),
        (None, _) => {
            let (c, addr) = start_sluice(a, fake.as_ref());
            let pid = c.id();
            (Some(Stop(c)), addr, Some(pid))
        }
    };
    let plan = Arc::new(plan(a));
    let acked = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let sending = Arc::new(AtomicBool::new(true));
    let threads: Vec<_> = (0..a.connections)
        .map(|c| {
            let (plan, acked, next, sending) =
                (plan.clone(), acked.clone(), next.clone(), sending.clone());
            // Without acks (`--window 0`), frames go out back to back.
            let window = if a.window == 0 { usize::MAX } else { a.window };
            let acks = a.window > 0;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let (mut f, mut last) = (plan.frame.clone(), plan.last.clone());
                let (mut sent, mut pending) = (0u64, 0usize);
                let mut inflight = VecDeque::new();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let mut go = sending.load(Ordering::Relaxed);
                    while go && inflight.len() < window {
                        let (frame, at, n) = match plan.frames {
                            None => (&mut f.0, f.1, plan.per),
                            Some(total) => match next.fetch_add(1, Ordering::Relaxed) {
                                i if i >= total => {
                                    go = false;
                                    break;
                                }
                                i if i + 1 == total && last.is_some() => {
                                    let ((frame, at), n) = last.as_mut().unwrap();
                                    (frame, *at, *n)
                                }
                                _ => (&mut f.0, f.1, plan.per),
                            },
                        };
                        if acks {
                            let id = format!("{:04x}{:012x}", c, sent);
                            frame[at..at + 16].copy_from_slice(id.as_bytes());
                            inflight.push_back(n);
                        }
                        s.write_all(frame).unwrap();
                        sent += 1;
                    }
                    if !go {
                        sending.store(false, Ordering::Relaxed);
                        if inflight.is_empty() {
                            return sent;
                        }
                    }
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "sluice closed the connection");
                    pending += n;
                    for _ in 0..pending / ACK_LEN {
                        acked.fetch_add(inflight.pop_front().unwrap(), Ordering::Relaxed);
                    }
                    pending %= ACK_LEN;
                }
            })
        })
        .collect();

    // A fixed volume is timed from the first frame to the last ack; otherwise over
    // `seconds` after a warm-up.
    let warmup = if a.gib.is_some() { 0.0 } else { a.warmup };
    let mut drained = None;
    std::thread::sleep(Duration::from_secs_f64(warmup));
    let (e0, t0) = (acked.load(Ordering::Relaxed), Instant::now());
    let c0 = pid.map(cpu_seconds);
    let th0 = pid.map(thread_cpu).unwrap_or_default();
    let l0 = cpu_seconds(std::process::id());
    // Read while sluice runs: a drained sluice's threads and memory are gone.
    let (mut th1, mut rss) = (Default::default(), None);
    if a.gib.is_none() {
        std::thread::sleep(Duration::from_secs_f64(a.seconds));
    } else if a.window == 0 {
        // Nothing is acked: every frame is sent, then sluice is stopped and drains.
        while !threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(p) = pid {
            (th1, rss) = (thread_cpu(p), peak_rss(p));
        }
        drained = Some(child.take().unwrap().drain());
        acked.store(plan.events, Ordering::Relaxed);
    } else {
        // Until every event is acked, or every connection has ended (a failure, reported
        // when joined).
        while (sending.load(Ordering::Relaxed) || acked.load(Ordering::Relaxed) < plan.events)
            && !threads.iter().all(|t| t.is_finished())
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (e1, t1) = (acked.load(Ordering::Relaxed), Instant::now());
    if let (Some(p), None) = (pid, drained) {
        (th1, rss) = (thread_cpu(p), peak_rss(p));
    }
    let c1 = drained.or_else(|| pid.map(cpu_seconds));
    let l1 = cpu_seconds(std::process::id());
    sending.store(false, Ordering::Relaxed);
    let frames: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();

    let secs = (t1 - t0).as_secs_f64();
    let events = (e1 - e0) as f64;
    let rate = events / secs;
    let wire = plan.frame.0.len() as f64 / plan.per as f64;
    println!(
        "loadgen: sink {}{}, {} connections, PackedForward frames of {} events ({:.0} B on the wire each, {} B records), window {}",
        a.sink,
        if a.tls { " over TLS" } else { "" },
        a.connections,
        plan.per,
        wire,
        plan.record,
        a.window
    );
    match a.window {
        0 => println!("  events/s, sent to drained:  {rate:>12.0}"),
        _ => println!("  acked events/s:             {rate:>12.0}"),
    }
    println!("  input MB/s:                 {:>12.1}", rate * wire / 1e6);
    if let (Some(c0), Some(c1)) = (c0, c1) {
        let cpu = c1 - c0;
        println!(
            "  sluice CPU:                 {cpu:>12.2} s over {secs:.2} s ({:.2} cores busy)",
            cpu / secs
        );
        println!(
            "  sluice CPU s per M events:  {:>12.3}",
            cpu / (events / 1e6)
        );
        println!("  events per sluice CPU-s:    {:>12.0}", events / cpu);
        let split: Vec<String> = th1
            .iter()
            .map(|(name, c)| (name, c - th0.get(name).copied().unwrap_or(0.0)))
            .filter(|(_, c)| *c >= 0.01)
            .map(|(name, c)| format!("{name} {:.0}%", 100.0 * c / cpu))
            .collect();
        let upto = if drained.is_some() {
            " (until the drain)"
        } else {
            ""
        };
        println!("  CPU by thread{upto}: {}", split.join(", "));
    }
    if let Some(r) = rss {
        println!(
            "  sluice peak RSS:            {:>9.1} MiB",
            r as f64 / (1 << 20) as f64
        );
    }
    let budget = MEMORY_PEAK.load(std::sync::atomic::Ordering::Relaxed);
    if budget > 0 {
        println!(
            "  memory budget peak:         {:>9.1} MiB",
            budget as f64 / (1 << 20) as f64
        );
    }
    let who = if fake.is_some() {
        "loadgen + fake CPU"
    } else {
        "loadgen CPU"
    };
    println!("  {who:<28}{:>12.2} s", l1 - l0);
    let acked = if a.window > 0 { " and acked" } else { "" };
    println!("  {:<28}{frames:>12}", format!("frames sent{acked}:"));
    assert!(e1 > 0, "no events were acked");
    if let Some(fake) = &fake {
        report_throttling(a, fake);
    }

    if let (Some(fake), Some(gib)) = (&fake, a.gib) {
        assert_eq!(e1, plan.events, "every event acked");
        let seen = fake.seen.lock().unwrap();
        let data = plan.events * plan.record as u64;
        let min = ((gib * (1u64 << 30) as f64) / (25.0 * 1024.0)).ceil() as u64;
        println!(
            "  volume:                     {gib} GiB: {} events of {} B records, {data} B",
            plan.events, plan.record
        );
        println!("  requests:                   {:>12}", seen.requests);
        println!("  records:                    {:>12}", seen.records);
        println!("  record bytes:               {:>12}", seen.bytes);
        println!("  PUT payload units:          {:>12}", seen.payload_units);
        println!(
            "  minimum ({gib} GiB / 25 KiB): {min:>11}  (units are {:.4}x the minimum)",
            seen.payload_units as f64 / min as f64
        );
        assert!(seen.bytes >= data, "every byte arrived");
        if a.sink == "firehose" {
            assert_eq!(seen.bytes, data, "line packing adds nothing to the events");
        }
        if a.sink == "kinesis" {
            assert_eq!(seen.records, plan.events);
            assert_eq!(
                seen.bytes, data,
                "each event is one record of {} B",
                plan.record
            );
        }
    }
}

/// What the fake throttled, and under `--capacity`, the accepted rate second by second
/// against the capacity.
fn report_throttling(a: &Args, fake: &Fake) {
    let seen = fake.seen.lock().unwrap();
    let (acc, thr) = (&seen.accepted_per_sec, &seen.throttled_per_sec);
    let total = seen.records + seen.throttled_records;
    println!(
        "  fake: requests, records/req: {:>12} {:>8.1}",
        seen.requests,
        total as f64 / seen.requests.max(1) as f64
    );
    if seen.throttled_records > 0 || a.throttle > 0.0 {
        println!(
            "  records throttled:          {:>12}  ({:.2}% of {total} sent)",
            seen.throttled_records,
            100.0 * seen.throttled_records as f64 / total.max(1) as f64
        );
    }
    if !a.capacity {
        return;
    }
    let streams = if a.sink.starts_with("kinesis") {
        a.shards
    } else {
        1
    };
    let cap = SHARD_RECORDS_PER_SEC * streams as f64;
    println!("  capacity:                   {cap:>12.0} records/s");
    let mut reached = None;
    for (s, &n) in acc.iter().enumerate() {
        let t = thr.get(s).copied().unwrap_or(0);
        if reached.is_none() && n as f64 >= 0.9 * cap {
            reached = Some(s);
        }
        println!(
            "    second {s:>3}: accepted {n:>8} ({:>5.1}% of capacity), throttled {t:>7}",
            100.0 * n as f64 / cap
        );
    }
    // Steady state: every whole second after the first ten, the last (partial) one left out.
    let steady = 10..acc.len().saturating_sub(1);
    if !steady.is_empty() {
        let a: u64 = acc[steady.clone()].iter().sum();
        let t: u64 = steady.map(|s| thr.get(s).copied().unwrap_or(0)).sum();
        println!(
            "  steady state (s 10 on):      {:.1}% of capacity accepted, {:.2}% of records throttled",
            100.0 * a as f64 / (cap * (acc.len() - 11) as f64),
            100.0 * t as f64 / (a + t).max(1) as f64
        );
    }
    match reached {
        Some(s) => println!("  90% of capacity reached in second {s}"),
        None => println!("  90% of capacity never reached"),
    }
}

/// Stops the sluice this started, also when a check fails.
struct Stop(Child);

impl Stop {
    /// Stops sluice, waits for it to drain and exit, and returns its CPU seconds (read
    /// while it is a zombie, before it is reaped).
    fn drain(mut self) -> f64 {
        let pid = self.0.id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {pid}");
        let state = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            stat[stat.rfind(')').unwrap() + 2..].starts_with('Z')
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !state() {
            assert!(
                Instant::now() < deadline,
                "sluice did not drain within 2 minutes"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let cpu = cpu_seconds(pid);
        let status = self.0.wait().unwrap();
        assert!(
            status.success(),
            "sluice drained and exited cleanly: {status}"
        );
        cpu
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn main() {
    for a in runs() {
        run(&a);
    }
    let _ = std::fs::remove_dir_all(scratch());
}
