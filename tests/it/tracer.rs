//! The tracer test, after the published test of the Fluentd-on-Fargate aggregator: three
//! senders send numbered events steadily into moto's Kinesis while sluice is stopped five
//! times with SIGTERM and five times with SIGKILL, each time restarted on the same
//! write-ahead log; then every event is read back, and lost and duplicated events are
//! counted per sender and per kind of stop, with `ack = "durable"` and `"delivered"`.
//!
//! - `go-ack`: fluent-logger-golang (the Docker driver's library) with RequestAck.
//! - `raw`: a Forward client sending chunks of 10 events that resends what was not acked.
//! - `json`: JSON lines with no acks; what it writes while sluice is down is lost.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::emulators::{Emulator, free_port};
use crate::frames::{Mode, Time, frame, record};
use crate::harness::{Opts, Sluice, deps, scratch_dir, signal};

const CONFIG: &str = r#"
[engine]
workers = 2
stats_interval = "500ms"
input_grace = "1s"

[wal]
dir = "{dir}/wal"
sync_interval = "20ms"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:{fwd}"
ack = "{ack}"

[inputs.json]
type = "json_lines"
address = "127.0.0.1:{json}"
udp = false
tag = "tracer.json"

[sinks.stream]
type = "kinesis"
stream = "tracer"
endpoint = "{endpoint}"
linger = "100ms"
# moto's threaded server numbers the records of concurrent PutRecords on one shard
# racily (the same sequence number twice, one record overwriting the other), which
# would read as losses here; one request at a time keeps its count true.
max_concurrency = 1

[[routes]]
match = "tracer.**"
sinks = "stream"
time_key = "time"
time_format = "double"
"#;

/// Events per second of each sender.
const RATE: u64 = 100;
/// How long sluice runs between stops.
const UP: Duration = Duration::from_millis(2500);

/// When each event was sent (its first send), by seq; and what its sender knows.
#[derive(Default)]
struct Sent {
    at: Vec<SystemTime>,
    /// Events the sender saw acked.
    acked: Vec<bool>,
}

impl Sent {
    fn push(&mut self) -> usize {
        self.at.push(SystemTime::now());
        self.acked.push(false);
        self.at.len() - 1
    }
}

/// The raw Forward client: chunks of 10 events at RATE, a window of unacked chunks that
/// is sent again, in order, on every new connection.
fn raw_client(addr: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<Mutex<Sent>>) {
    let mut window: VecDeque<(String, Vec<u8>, std::ops::Range<usize>)> = VecDeque::new();
    let mut next_chunk = Instant::now();
    let mut c = 0usize;
    'connect: loop {
        if stop.load(Ordering::Relaxed) && window.is_empty() {
            return;
        }
        let Ok(mut conn) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        conn.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        for (_, f, _) in &window {
            if conn.write_all(f).is_err() {
                continue 'connect;
            }
        }
        let mut buf = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) && window.is_empty() {
                return;
            }
            if !stop.load(Ordering::Relaxed) && Instant::now() >= next_chunk {
                next_chunk += Duration::from_millis(1000 * 10 / RATE);
                let seqs = {
                    let mut s = sent.lock().unwrap();
                    let first = s.push();
                    for _ in 1..10 {
                        s.push();
                    }
                    first..first + 10
                };
                let events: Vec<_> = seqs
                    .clone()
                    .map(|i| (Time::Int(1_700_000_000), record("raw", i, 120)))
                    .collect();
                let id = format!("raw-{c}");
                c += 1;
                let f = frame(Mode::PackedBin, "tracer.raw", &events, Some(&id));
                window.push_back((id, f, seqs));
                if conn.write_all(&window.back().unwrap().1).is_err() {
                    continue 'connect;
                }
            }
            let mut tmp = [0u8; 4096];
            match conn.read(&mut tmp) {
                Ok(0) => continue 'connect,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => continue 'connect,
            }
            loop {
                let mut r = &buf[..];
                let Ok(v) = rmpv::decode::read_value(&mut r) else {
                    break;
                };
                let used = buf.len() - r.len();
                buf.drain(..used);
                let id = v
                    .as_map()
                    .and_then(|m| m[0].1.as_str().map(str::to_string))
                    .unwrap();
                if let Some(i) = window.iter().position(|(w, _, _)| *w == id) {
                    let (_, _, seqs) = window.remove(i).unwrap();
                    let mut s = sent.lock().unwrap();
                    for q in seqs {
                        s.acked[q] = true;
                    }
                }
            }
        }
    }
}

/// The JSON-lines client: a line every 1/RATE s; a failed write loses what it wrote, and
/// it reconnects and goes on.
fn json_client(addr: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<Mutex<Sent>>) {
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += Duration::from_millis(1000 / RATE);
            let seq = sent.lock().unwrap().push();
            let line = format!("{{\"seq\":{seq},\"client\":\"json\",\"msg\":\"tracer line\"}}\n");
            if conn.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
    }
}

/// Losses and duplicates of one sender, per stop (0..10; 10 is the final, clean stop).
struct Tally {
    sent: usize,
    acked: usize,
    lost_acked: usize,
    /// Seqs of the first few acked events lost, for the failure message.
    lost_acked_seqs: Vec<(usize, usize)>,
    lost: [usize; 11],
    dups: [usize; 11],
}

fn tally(sent: &Sent, delivered: &HashMap<u64, usize>, stops: &[SystemTime]) -> Tally {
    let mut t = Tally {
        sent: sent.at.len(),
        acked: sent.acked.iter().filter(|a| **a).count(),
        lost_acked: 0,
        lost_acked_seqs: vec![],
        lost: [0; 11],
        dups: [0; 11],
    };
    for (seq, at) in sent.at.iter().enumerate() {
        let stop = stops.iter().filter(|s| *s <= at).count();
        match delivered.get(&(seq as u64)).copied().unwrap_or(0) {
            0 if sent.acked[seq] => {
                t.lost_acked += 1;
                if t.lost_acked_seqs.len() < 20 {
                    t.lost_acked_seqs.push((seq, stop));
                }
            }
            0 => t.lost[stop] += 1,
            1 => {}
            n => t.dups[stop] += n - 1,
        }
    }
    t
}

/// Sums over the SIGTERM stops (even) and the SIGKILL stops (odd), and the final stop.
fn by_kind(per: &[usize; 11]) -> (usize, usize, usize) {
    let term = (0..10).step_by(2).map(|i| per[i]).sum();
    let kill = (1..10).step_by(2).map(|i| per[i]).sum();
    (term, kill, per[10])
}

/// The log's segment files.
fn segments(wal: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for c in std::fs::read_dir(wal).unwrap() {
        for f in std::fs::read_dir(c.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out
}

fn run(ack: &str) -> Vec<(&'static str, Tally)> {
    let kinesis = Emulator::moto();
    kinesis.tool(&["create-stream", "tracer", "2"]);
    let (fwd, json) = (free_port(), free_port());
    let cfg = CONFIG
        .replace("{endpoint}", &kinesis.endpoint)
        .replace("{fwd}", &fwd.to_string())
        .replace("{json}", &json.to_string())
        .replace("{ack}", ack);
    let dir = scratch_dir(&format!("tracer-{ack}"));
    let mut s = Sluice::start_in(dir.clone(), &cfg, Opts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (raw_sent, json_sent) = (Arc::<Mutex<Sent>>::default(), Arc::<Mutex<Sent>>::default());
    let raw = {
        let (stop, sent) = (stop.clone(), raw_sent.clone());
        let addr: SocketAddr = ([127, 0, 0, 1], fwd).into();
        std::thread::spawn(move || raw_client(addr, stop, sent))
    };
    let jsonc = {
        let (stop, sent) = (stop.clone(), json_sent.clone());
        let addr: SocketAddr = ([127, 0, 0, 1], json).into();
        std::thread::spawn(move || json_client(addr, stop, sent))
    };
    // The Go client sends at RATE through the ten stops (it falls behind a little at each
    // restart, and catches up after); its event times say when.
    let go_count = RATE * (UP.as_secs_f64() * 10.0) as u64;
    let go_start = SystemTime::now();
    let go = Command::new(deps().join("fluent-go-client"))
        .args([
            "-port",
            &fwd.to_string(),
            "-tag",
            "tracer.go",
            "-mode",
            "ack",
            "-keep-going",
        ])
        .args(["-count", &go_count.to_string(), "-rate", &RATE.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the Go client");

    // An event belongs to the stop that ends the run it was sent in: sent before the
    // restart after that stop was ready (what a sender writes while sluice is down is that
    // stop's too).
    let mut stops = Vec::new();
    for i in 0..10 {
        std::thread::sleep(UP);
        if i % 2 == 0 {
            let (status, logs) = s.stop();
            assert!(
                status.success(),
                "SIGTERM {i}: {status}\n{}",
                logs.join("\n")
            );
            // The drain delivered everything: nothing is left to replay.
            let left = segments(&dir.join("wal"));
            assert!(
                left.is_empty(),
                "ack={ack}: left after SIGTERM {i}: {left:?}"
            );
        } else {
            signal(s.pid(), "KILL");
            s.wait_exit();
        }
        s = Sluice::start_in(dir.clone(), &cfg, Opts::default());
        stops.push(SystemTime::now());
    }
    let out = go.wait_with_output().unwrap();
    let go_out = String::from_utf8_lossy(&out.stdout).to_string();
    stop.store(true, Ordering::Relaxed);
    raw.join().unwrap();
    jsonc.join().unwrap();
    // The last, clean stop delivers everything read before it exits.
    std::thread::sleep(Duration::from_secs(1));
    stops.push(SystemTime::now());
    let (status, logs) = s.stop();
    assert!(status.success(), "{}", logs.join("\n"));
    for l in &logs {
        if l.contains("Final stats") || l.contains("WARN") || l.contains("ERROR") {
            eprintln!("last run: {l}");
        }
    }

    let mut delivered: HashMap<String, HashMap<u64, usize>> = HashMap::new();
    let mut go_times: HashMap<u64, f64> = HashMap::new();
    for r in kinesis.read_stream("tracer", None) {
        let r: serde_json::Value = serde_json::from_str(r["data"].as_str().unwrap()).unwrap();
        let client = r["client"].as_str().unwrap().to_string();
        let seq = match &r["seq"] {
            serde_json::Value::String(s) => s.parse().unwrap(),
            v => v.as_u64().unwrap(),
        };
        if client == "go-ack" {
            go_times.insert(seq, r["time"].as_f64().unwrap());
        }
        *delivered.entry(client).or_default().entry(seq).or_default() += 1;
    }
    // The Go client: every post it did not report failed was acked. Its send time is its
    // event time (the Go library stamps each post), or for one never delivered its
    // schedule.
    let failed: Vec<usize> = go_out
        .lines()
        .filter_map(|l| l.strip_prefix("failed ")?.parse().ok())
        .collect();
    let go_sent = Sent {
        at: (0..go_count)
            .map(|i| match go_times.get(&i) {
                Some(t) => SystemTime::UNIX_EPOCH + Duration::from_secs_f64(*t),
                None => go_start + Duration::from_secs_f64(i as f64 / RATE as f64),
            })
            .collect(),
        acked: (0..go_count as usize)
            .map(|i| !failed.contains(&i))
            .collect(),
    };
    let empty = HashMap::new();
    vec![
        (
            "go-ack",
            tally(&go_sent, delivered.get("go-ack").unwrap_or(&empty), &stops),
        ),
        (
            "raw",
            tally(
                &raw_sent.lock().unwrap(),
                delivered.get("raw").unwrap_or(&empty),
                &stops,
            ),
        ),
        (
            "json",
            tally(
                &json_sent.lock().unwrap(),
                delivered.get("json").unwrap_or(&empty),
                &stops,
            ),
        ),
    ]
}

#[test]
fn five_sigterms_and_five_sigkills_lose_no_acked_event() {
    // The two policies at once, each with its own emulator, ports and log.
    let runs: Vec<_> = ["durable", "delivered"]
        .into_iter()
        .map(|ack| (ack, std::thread::spawn(move || run(ack))))
        .collect();
    for (ack, run) in runs {
        let results = run.join().unwrap();
        for (sender, t) in &results {
            let (lt, lk, lf) = by_kind(&t.lost);
            let (dt, dk, df) = by_kind(&t.dups);
            eprintln!(
                "tracer ack={ack} sender={sender}: sent={} acked={} lost_acked={} \
                 lost: sigterm={lt} sigkill={lk} final={lf}; duplicated: sigterm={dt} sigkill={dk} final={df}",
                t.sent, t.acked, t.lost_acked
            );
        }
        for (sender, t) in &results {
            assert!(t.sent > 1000, "{sender} sent {}", t.sent);
            assert_eq!(
                t.lost_acked, 0,
                "ack={ack}: {sender} lost acked events; (seq, stop): {:?}",
                t.lost_acked_seqs
            );
            if *sender != "json" {
                assert_eq!(t.acked, t.sent, "ack={ack}: {sender} had every event acked");
            }
            let (lt, lk, lf) = by_kind(&t.lost);
            assert_eq!(lf, 0, "ack={ack}: {sender} lost events at the clean stop");
            // JSON lines: a SIGTERM loses what sat unread when input_grace ended and what
            // was written before the client saw the close; a SIGKILL, the last
            // sync_interval and the socket buffers. At RATE, a second's worth per stop
            // is far above either.
            assert!(
                lt + lk <= 10 * RATE as usize,
                "ack={ack}: {sender} lost {lt}+{lk}"
            );
        }
    }
}
