//! End-to-end load generator. Starts `sluice` (or uses one already running, with `--addr`
//! and `--pid`), sends PackedForward frames of Docker-style events over N connections,
//! each keeping a window of chunks in flight and counting their acks, and reports acked
//! events per second and sluice's CPU seconds per million events (from /proc, so it counts
//! every thread of sluice). `--window 0` asks for no acks, as the Docker driver and Fluent
//! Bit do by default: with `--gib`, frames go out back to back, then sluice is stopped and
//! the run ends when it has drained and exited.
//!
//! `--sink` picks what sluice sends to: `null`, or `kinesis`, `kinesis-agg` (KPL
//! aggregation) or `firehose` (line packing) at the fast fake endpoint of
//! `tests/support/fake_aws.rs`, run in this process with `--shards` shards. Acks then mean
//! the fake accepted the records. `--gib X` sends a fixed volume instead of running for a
//! time: X GiB of events sized so that each becomes a record (a JSON line) of exactly
//! `--event-bytes`, and reports the requests, records and Kinesis PUT payload units (25 KiB
//! each) the fake was sent, against the minimum, X GiB / 25 KiB.
//!
//!   cargo bench --bench loadgen -- [--sink null] [--connections 4] [--seconds 10]
//!       [--warmup 2] [--events-per-frame 1000] [--event-bytes 200] [--window 8]
//!       [--workers N] [--shards 8192] [--gib X] [--addr HOST:PORT --pid PID]
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it makes three short smoke
//! runs: to the null sink, 0.01 GiB aggregated into the fake, and 0.01 GiB without acks
//! line-packed into the fake Firehose; it checks that every chunk is acked and every byte
//! arrived.

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
    shards: usize,
    gib: Option<f64>,
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
        shards: 8192,
        gib: None,
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
            "--shards" => a.shards = v().parse().unwrap(),
            "--gib" => a.gib = Some(v().parse().unwrap()),
            "--addr" => a.addr = Some(v().parse().unwrap()),
            "--pid" => a.pid = Some(v().parse().unwrap()),
            // cargo and libtest flags we do not use
            _ => {}
        }
    }
    assert!(
        ["null", "kinesis", "kinesis-agg", "firehose"].contains(&a.sink.as_str()),
        "--sink is null, kinesis, kinesis-agg or firehose"
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

/// `{"ack": "<16 chars>"}`: fixmap, fixstr "ack", fixstr of 16.
const ACK_LEN: usize = 1 + 4 + 1 + 16;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // USER_HZ: /proc reports 100 ticks a second on every Linux ABI.
    ticks as f64 / 100.0
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
        other => unreachable!("{other}"),
    }
}

fn start_sluice(a: &Args, fake: Option<&Fake>) -> (Child, SocketAddr) {
    let dir = std::env::temp_dir().join(format!("sluice-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("sluice.toml");
    let workers = a
        .workers
        .map(|w| format!("workers = {w}\n"))
        .unwrap_or_default();
    let sink = sink_config(&a.sink, fake);
    let dead = dir.join("dead");
    std::fs::write(
        &cfg,
        format!(
            "[engine]\n{workers}stats_interval = \"60s\"\ndead_letter_dir = {dead:?}\n\n\
             [inputs.fwd]\ntype = \"forward\"\naddress = \"127.0.0.1:0\"\n\n\
             [sinks.out]\n{sink}\n\n[[routes]]\nmatch = \"**\"\nsinks = \"out\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
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
        }
    });
    (child, addr.expect("sluice printed its address"))
}

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
    let fake = (a.sink != "null").then(|| Fake::start(a.shards, &["load"], false));
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
    let l0 = cpu_seconds(std::process::id());
    if a.gib.is_none() {
        std::thread::sleep(Duration::from_secs_f64(a.seconds));
    } else if a.window == 0 {
        // Nothing is acked: every frame is sent, then sluice is stopped and drains.
        while !threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
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
    let c1 = drained.or_else(|| pid.map(cpu_seconds));
    let l1 = cpu_seconds(std::process::id());
    sending.store(false, Ordering::Relaxed);
    let frames: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();

    let secs = (t1 - t0).as_secs_f64();
    let events = (e1 - e0) as f64;
    let rate = events / secs;
    let wire = plan.frame.0.len() as f64 / plan.per as f64;
    println!(
        "loadgen: sink {}, {} connections, PackedForward frames of {} events ({:.0} B on the wire each, {} B records), window {}",
        a.sink, a.connections, plan.per, wire, plan.record, a.window
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
}
