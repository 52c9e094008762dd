//! End-to-end load generator. Starts `sluice` on a null-sink config (or uses one already
//! running, with `--addr` and `--pid`), sends PackedForward frames of 200 B Docker-style
//! events over N connections, each keeping a window of chunks in flight and counting
//! their acks, and reports acked events per second and sluice's CPU seconds per million
//! events (from /proc, so it counts every thread of sluice).
//!
//!   cargo bench --bench loadgen -- [--connections 4] [--seconds 10] [--warmup 2]
//!       [--events-per-frame 1000] [--event-bytes 200] [--window 8] [--workers N]
//!       [--addr HOST:PORT --pid PID]
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it makes a short smoke run
//! and checks that every chunk is acked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Args {
    connections: usize,
    seconds: f64,
    warmup: f64,
    events_per_frame: usize,
    event_bytes: usize,
    window: usize,
    workers: Option<usize>,
    addr: Option<SocketAddr>,
    pid: Option<u32>,
    bench: bool,
}

fn args() -> Args {
    let mut a = Args {
        connections: 4,
        seconds: 10.0,
        warmup: 2.0,
        events_per_frame: 1000,
        event_bytes: 200,
        window: 8,
        workers: None,
        addr: None,
        pid: None,
        bench: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--bench" => a.bench = true,
            "--connections" => a.connections = v().parse().unwrap(),
            "--seconds" => a.seconds = v().parse().unwrap(),
            "--warmup" => a.warmup = v().parse().unwrap(),
            "--events-per-frame" => a.events_per_frame = v().parse().unwrap(),
            "--event-bytes" => a.event_bytes = v().parse().unwrap(),
            "--window" => a.window = v().parse().unwrap(),
            "--workers" => a.workers = Some(v().parse().unwrap()),
            "--addr" => a.addr = Some(v().parse().unwrap()),
            "--pid" => a.pid = Some(v().parse().unwrap()),
            // cargo and libtest flags we do not use
            _ => {}
        }
    }
    if !a.bench {
        a.connections = 2;
        a.seconds = 1.0;
        a.warmup = 0.0;
        a.events_per_frame = 100;
    }
    a
}

#[path = "../tests/support/forward.rs"]
mod support;
use support::{Mode, Opts, Time, docker_record};

/// A PackedForward frame and where its 16-digit chunk id sits.
fn frame(events: usize, size: usize) -> (Vec<u8>, usize) {
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
        chunk: Some(std::str::from_utf8(id).unwrap()),
        size: true,
        nil_options: false,
    };
    let f = support::frame(Mode::PackedBin, "docker.web", &events, opts);
    let at = f.windows(id.len()).rposition(|w| w == id).unwrap();
    (f, at)
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

fn start_sluice(workers: Option<usize>) -> (Child, SocketAddr) {
    let dir = std::env::temp_dir().join(format!("sluice-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("null.toml");
    let workers = workers
        .map(|w| format!("workers = {w}\n"))
        .unwrap_or_default();
    std::fs::write(
        &cfg,
        format!(
            "[engine]\n{workers}stats_interval = \"60s\"\n\n[inputs.fwd]\ntype = \"forward\"\naddress = \"127.0.0.1:0\"\n\n\
             [sinks.null]\ntype = \"null\"\n\n[[routes]]\nmatch = \"**\"\nsinks = \"null\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&cfg)
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
    // Keep draining its log so it never blocks on stderr.
    std::thread::spawn(move || for _ in lines {});
    (child, addr.expect("sluice printed its address"))
}

fn main() {
    let a = args();
    let (mut child, addr, pid) = match (a.addr, a.pid) {
        (Some(addr), pid) => (None, addr, pid),
        (None, _) => {
            let (c, addr) = start_sluice(a.workers);
            let pid = c.id();
            (Some(c), addr, Some(pid))
        }
    };
    let (template, chunk_at) = frame(a.events_per_frame, a.event_bytes);
    let acked = Arc::new(AtomicU64::new(0));
    let sending = Arc::new(AtomicBool::new(true));
    let threads: Vec<_> = (0..a.connections)
        .map(|c| {
            let (mut f, acked, sending) = (template.clone(), acked.clone(), sending.clone());
            let per = a.events_per_frame as u64;
            let window = a.window;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let (mut sent, mut acks, mut pending) = (0u64, 0u64, 0usize);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let go = sending.load(Ordering::Relaxed);
                    while go && (sent - acks) < window as u64 {
                        let id = format!("{:04x}{:012x}", c, sent);
                        f[chunk_at..chunk_at + 16].copy_from_slice(id.as_bytes());
                        s.write_all(&f).unwrap();
                        sent += 1;
                    }
                    if !go && acks == sent {
                        return sent;
                    }
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "sluice closed the connection");
                    pending += n;
                    let k = (pending / ACK_LEN) as u64;
                    pending %= ACK_LEN;
                    acks += k;
                    acked.fetch_add(k * per, Ordering::Relaxed);
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    let (e0, t0) = (acked.load(Ordering::Relaxed), Instant::now());
    let c0 = pid.map(cpu_seconds);
    let l0 = cpu_seconds(std::process::id());
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    let (e1, t1) = (acked.load(Ordering::Relaxed), Instant::now());
    let c1 = pid.map(cpu_seconds);
    let l1 = cpu_seconds(std::process::id());
    sending.store(false, Ordering::Relaxed);
    let frames: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();

    let secs = (t1 - t0).as_secs_f64();
    let events = (e1 - e0) as f64;
    let rate = events / secs;
    let wire = template.len() as f64 / a.events_per_frame as f64;
    println!(
        "loadgen: {} connections, PackedForward frames of {} events of {} B ({:.0} B on the wire each), window {}",
        a.connections, a.events_per_frame, a.event_bytes, wire, a.window
    );
    println!("  acked events/s:             {rate:>12.0}");
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
    println!("  loadgen CPU:                {:>12.2} s", l1 - l0);
    println!("  frames sent and acked:      {frames:>12}");

    if let Some(c) = child.as_mut() {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    assert!(e1 > 0, "no events were acked");
}
