//! The HTTP input through the real binary: Fluentd `in_http` ingest in every form it
//! takes, refusals with their status and reason, `/health` through a shutdown, `/ready`
//! through a slow start, and `/metrics` read by the Prometheus client library's parser.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::fake_aws::{Fake, Faults};
use crate::frames::{Mode, Time, connect, frame, read_acks, record};
use crate::harness::{Opts, PATIENCE, Sluice, assert_exactly_once, deps, signal, wait_json_lines};

/// One HTTP/1.1 request on a fresh connection: the status and the body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = content_type {
        head.push_str(&format!("Content-Type: {t}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path, None, b"")
}

/// `%XX` for every byte: a form field of any bytes.
fn pct(b: &[u8]) -> String {
    b.iter().map(|b| format!("%{b:02X}")).collect()
}

fn msgpack(v: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

fn event(seq: usize) -> rmpv::Value {
    rmpv::Value::Map(vec![
        ("client".into(), "http".into()),
        ("seq".into(), (seq as u64).into()),
    ])
}

const CONFIG: &str = r#"
[engine]
workers = 2
stats_interval = "1s"

[inputs.http]
type = "http"
address = "127.0.0.1:0"
max_body_bytes = "4KiB"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.app]
type = "file"
path = "{dir}/app.ndjson"
linger = "50ms"

[sinks.drop]
type = "null"

[[routes]]
match = "health*"
sinks = "drop"

[[routes]]
match = "app.**"
sinks = "app"
tag_key = "tag"
time_key = "time"
"#;

#[test]
fn in_http_bodies_forms_and_queries_arrive_once_on_their_route() {
    let mut s = Sluice::start("http-ingest", CONFIG);
    let a = s.addr("http");
    let json = |seq: usize| format!(r#"{{"client":"http","seq":{seq}}}"#);
    let ok = |r: (u16, String)| assert_eq!(r, (200, String::new()));
    // A JSON object, and an array of them.
    ok(request(
        a,
        "POST",
        "/app.web",
        Some("application/json"),
        json(0).as_bytes(),
    ));
    let array = format!("[{},{},{}]", json(1), json(2), json(3));
    ok(request(
        a,
        "POST",
        "/app.web",
        Some("application/json"),
        array.as_bytes(),
    ));
    // A msgpack map, and an array of them.
    ok(request(
        a,
        "POST",
        "/app.web",
        Some("application/msgpack"),
        &msgpack(&event(4)),
    ));
    let many = rmpv::Value::Array(vec![event(5), event(6)]);
    ok(request(
        a,
        "POST",
        "/app/web",
        Some("application/x-msgpack"),
        &msgpack(&many),
    ));
    // Form fields, JSON and (binary) msgpack, with a time.
    let form = format!("json={}&time=1700000000", pct(json(7).as_bytes()));
    ok(request(
        a,
        "POST",
        "/app.web",
        Some("application/x-www-form-urlencoded"),
        form.as_bytes(),
    ));
    let form = format!("msgpack={}", pct(&msgpack(&event(8))));
    ok(request(
        a,
        "POST",
        "/app.web",
        Some("application/x-www-form-urlencoded"),
        form.as_bytes(),
    ));
    // Query parameters, as a health check sends them.
    ok(get(
        a,
        &format!(
            "/app.web?json={}&time=1700000001.5",
            pct(json(9).as_bytes())
        ),
    ));
    ok(request(
        a,
        "POST",
        &format!("/app.web?msgpack={}", pct(&msgpack(&event(10)))),
        None,
        b"",
    ));

    let lines = wait_json_lines(&mut s, "app", 11);
    assert_exactly_once(&lines, "app.web", "http", 11);
    let time_of = |seq: u64| {
        lines
            .iter()
            .find(|l| l["seq"] == seq)
            .and_then(|l| l["time"].as_str().map(str::to_string))
            .unwrap()
    };
    assert_eq!(time_of(7), "2023-11-14T22:13:20.000000000Z");
    assert_eq!(time_of(9), "2023-11-14T22:13:21.500000000Z");

    // Refusals say why; nothing of theirs is taken.
    for (ty, body, want) in [
        (Some("application/json"), &b"{\"a\":"[..], "not valid JSON"),
        (
            Some("application/json"),
            &b"[{\"a\":1},2]"[..],
            "not an object",
        ),
        (
            Some("application/msgpack"),
            &[0x92, 0x80, 0x01][..],
            "not a map",
        ),
        (
            Some("text/plain"),
            &b"hello"[..],
            "unsupported Content-Type",
        ),
        (None, &b""[..], "no records"),
    ] {
        let (status, reason) = request(a, "POST", "/app.web", ty, body);
        assert_eq!(status, 400, "{ty:?} {body:?}: {reason}");
        assert!(reason.contains(want), "{ty:?}: {reason}");
    }
    let (status, reason) = get(a, "/?json={}");
    assert_eq!(status, 400);
    assert!(reason.contains("no tag"), "{reason}");
    let big = format!("[{}]", vec![json(99); 200].join(","));
    let (status, reason) = request(
        a,
        "POST",
        "/app.web",
        Some("application/json"),
        big.as_bytes(),
    );
    assert_eq!(status, 413, "{reason}");
    assert!(reason.contains("max_body_bytes (4096 bytes)"), "{reason}");

    // Health events go to the null sink and nowhere else.
    ok(get(
        a,
        "/healthcheck?json=%7B%22log%22%3A+%22health+check%22%7D",
    ));
    let stats = s.wait_stat("sink.drop.events", |n| n == 1);
    assert_eq!(stats["sink.app.events"], 11, "{stats:?}");
    s.assert_healthy();
}

/// `/metrics` read by the Prometheus client library's own parser, as a scraper would.
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, text) = get(addr, "/metrics");
    assert_eq!(status, 200);
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new(deps().join("venv/bin/python"))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn metrics_parse_as_openmetrics_and_count_what_was_sent() {
    let mut s = Sluice::start("http-metrics", CONFIG);
    let (h, f) = (s.addr("http"), s.addr("fwd"));
    // Forward: 3 acked frames of 10 events.
    let mut conn = connect(f);
    let mut bytes = 0;
    for k in 0..3 {
        let events: Vec<_> = (0..10)
            .map(|i| {
                (
                    Time::FixExt8(1_700_000_000, 0),
                    record("fwd", k * 10 + i, 100),
                )
            })
            .collect();
        let fr = frame(Mode::PackedBin, "app.fwd", &events, Some(&format!("c{k}")));
        bytes += fr.len();
        conn.write_all(&fr).unwrap();
    }
    assert_eq!(read_acks(&mut conn, 3).len(), 3);
    drop(conn);
    let fwd_bytes = bytes;
    // HTTP: 4 requests of 2 events.
    for k in 0..4 {
        let body = format!(r#"[{{"seq":{}}},{{"seq":{}}}]"#, 2 * k, 2 * k + 1);
        bytes += body.len();
        let r = request(
            h,
            "POST",
            "/app.web",
            Some("application/json"),
            body.as_bytes(),
        );
        assert_eq!(r.0, 200);
    }
    s.wait_stat("sink.app.events", |n| n == 38);
    // Counters reach /metrics within a report interval.
    let deadline = Instant::now() + PATIENCE;
    let m = loop {
        let m = scrape(h);
        // Cores and sinks report apart, each once a second: wait until both have.
        let settled = [
            ("sluice_sink_events_total{sink=app}", 38.0),
            ("sluice_events_in_total", 38.0),
            ("sluice_acks_sent_total", 3.0),
            ("sluice_ring_batches", 0.0),
        ]
        .iter()
        .all(|(k, v)| m.get(*k) == Some(v));
        if settled || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let want = [
        ("sluice_events_in_total", 38.0),
        ("sluice_bytes_in_total", bytes as f64),
        ("sluice_frames_in_total", 3.0),
        ("sluice_acks_sent_total", 3.0),
        ("sluice_http_requests_total", 4.0),
        ("sluice_connections_opened_total", 1.0),
        ("sluice_connections_open", 0.0),
        ("sluice_ring_batches", 0.0),
        ("sluice_held_batches", 0.0),
        ("sluice_sink_events_total{sink=app}", 38.0),
        ("sluice_sink_events_total{sink=drop}", 0.0),
        ("sluice_io_backend{backend=uring}", 0.0),
        // By input and by route.
        ("sluice_input_events_in_total{input=fwd}", 30.0),
        ("sluice_input_events_in_total{input=http}", 8.0),
        (
            "sluice_input_bytes_in_total{input=http}",
            (bytes - fwd_bytes) as f64,
        ),
        ("sluice_input_bytes_in_total{input=fwd}", fwd_bytes as f64),
        ("sluice_input_connections_opened_total{input=fwd}", 1.0),
        ("sluice_route_events_total{match=app.**,route=1}", 38.0),
        ("sluice_route_events_total{match=health*,route=0}", 0.0),
    ];
    for (k, v) in want {
        let got = m.get(k).copied();
        if k.starts_with("sluice_io_backend") {
            let io = if m.contains_key("sluice_io_backend{backend=epoll}") {
                "epoll"
            } else {
                "uring"
            };
            assert_eq!(
                m[&format!("sluice_io_backend{{backend={io}}}")],
                1.0,
                "{m:?}"
            );
            continue;
        }
        assert_eq!(got, Some(v), "{k} in {m:?}");
    }
    assert_eq!(
        m["sluice_memory_limit_bytes"],
        32.0 * 1024.0 * 1024.0,
        "the default memory_limit"
    );
    assert!(
        m.contains_key("sluice_input_errors_total{kind=invalid_json}"),
        "{m:?}"
    );
    s.assert_healthy();
}

#[test]
fn health_turns_503_at_sigterm_while_the_listeners_still_answer() {
    // A connection left open keeps the input grace running, and the HTTP listener with it.
    let cfg = CONFIG.replace(
        "stats_interval = \"1s\"",
        "stats_interval = \"1s\"\ninput_grace = \"30s\"\ndrain_timeout = \"40s\"",
    );
    let s = Sluice::start("http-health", &cfg);
    let (h, f) = (s.addr("http"), s.addr("fwd"));
    assert_eq!(get(h, "/health"), (200, "ok\n".into()));
    assert_eq!(get(h, "/ready"), (200, "ready\n".into()));
    let open = connect(f);
    signal(s.pid(), "TERM");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = get(h, "/health");
        if status == 503 {
            assert_eq!(body, "draining\n");
            break;
        }
        assert!(Instant::now() < deadline, "/health never said draining");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(get(h, "/ready").0, 503);
    let (status, body) = request(h, "POST", "/app.web", Some("application/json"), b"{}");
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    drop(open);
    let (status, logs) = s.wait_exit();
    assert!(status.success(), "{status}\n{}", logs.join("\n"));
}

#[test]
fn ready_is_503_until_the_listeners_are_up() {
    // The sink's ListShards answers slowly, so start-up waits on it with the HTTP input up.
    let fake = Fake::start(1, &["slow"], true);
    fake.set(Faults {
        delay: Some(Duration::from_secs(5)),
        ..Faults::default()
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = format!(
        r#"
[inputs.http]
type = "http"
address = "127.0.0.1:{port}"

[sinks.k]
type = "kinesis"
stream = "slow"
endpoint = "{}"

[[routes]]
match = "**"
sinks = "k"
"#,
        fake.endpoint()
    );
    let mut s = Sluice::start_with(
        "http-ready",
        &cfg,
        Opts {
            no_wait: true,
            ..Opts::default()
        },
    );
    let h: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(h).is_err() {
        assert!(Instant::now() < deadline, "the HTTP input never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(get(h, "/ready"), (503, "starting\n".into()));
    assert_eq!(get(h, "/health").0, 200, "alive while starting");
    assert!(!s.logs().iter().any(|l| l.contains("Sluice is ready")));
    s.until_ready();
    assert_eq!(get(h, "/ready"), (200, "ready\n".into()));
}
