//! JSON lines over TCP and UDP through the real binary: tags from a field or the input,
//! lines split across writes, several lines per datagram, invalid and over-long lines
//! counted and skipped while the connection goes on, and record shaping.

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use crate::harness::{Sluice, assert_exactly_once, wait_json_lines};

const CONFIG: &str = r#"
[engine]
workers = 2
stats_interval = "1s"

[inputs.logs]
type = "json_lines"
address = "127.0.0.1:0"
tag = "logs"
tag_key = "tag"
max_line_bytes = 1024

[sinks.web]
type = "file"
path = "{dir}/web.ndjson"
linger = "50ms"

[sinks.rest]
type = "file"
path = "{dir}/rest.ndjson"
linger = "50ms"

[sinks.text]
type = "file"
path = "{dir}/text.log"
linger = "50ms"

[[routes]]
match = "app.web"
sinks = "web"
tag_key = "tag"
remove_keys = ["secret"]
add_fields = { env = "prod", shard = 3 }

[[routes]]
match = "plain.**"
sinks = "text"
log_key = "message"

[[routes]]
match = "**"
sinks = "rest"
tag_key = "tag"
"#;

#[test]
fn tcp_lines_split_anywhere_with_bad_lines_skipped() {
    let mut s = Sluice::start("jsonl-tcp", CONFIG);
    let mut conn = TcpStream::connect(s.addr("logs")).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut stream = Vec::new();
    for i in 0..500 {
        let tag = if i % 2 == 0 { "app.web" } else { "app.api" };
        stream.extend(format!("{{\"tag\":\"{tag}\",\"seq\":{i},\"client\":\"nc\",\"secret\":\"x\",\"msg\":\"a \\\"quoted\\\" line\"}}\n").bytes());
        if i == 100 {
            stream.extend(b"this is not json\n");
            stream.extend(b"[\"an\", \"array\"]\n");
            stream.extend(format!("{{\"big\":\"{}\"}}\n", "y".repeat(4000)).bytes());
        }
    }
    // Lines cut at every odd place.
    for (i, piece) in stream.chunks(13).enumerate() {
        conn.write_all(piece).unwrap();
        if i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The last line has no newline: it counts when the connection ends.
    conn.write_all(b"{\"tag\":\"app.api\",\"seq\":500,\"client\":\"nc\"}")
        .unwrap();
    drop(conn);

    let seqs = |lines: &[serde_json::Value], tag: &str| {
        let mut v: Vec<u64> = lines
            .iter()
            .filter(|l| l["tag"] == tag)
            .map(|l| l["seq"].as_u64().unwrap())
            .collect();
        v.sort();
        v
    };
    let web = wait_json_lines(&mut s, "web", 250);
    assert_eq!(
        seqs(&web, "app.web"),
        (0..500).step_by(2).collect::<Vec<u64>>(),
        "each once, in web"
    );
    for l in &web {
        assert!(l.get("secret").is_none(), "remove_keys: {l}");
        assert_eq!(l["env"], "prod");
        assert_eq!(l["shard"], 3);
        assert_eq!(l["msg"], "a \"quoted\" line");
    }
    let rest = wait_json_lines(&mut s, "rest", 251);
    let odd: Vec<u64> = (1..500).step_by(2).chain([500]).collect();
    assert_eq!(seqs(&rest, "app.api"), odd, "each once, in rest");
    let stats = s.wait_stat("errors.invalid_json", |n| n == 1);
    assert_eq!(stats.get("errors.not_an_object"), Some(&1));
    assert_eq!(stats.get("errors.line_too_long"), Some(&1));
    s.wait_log("invalid line report", |l| {
        l.contains("Skipping a line") && l.contains("invalid_json")
    });
    s.wait_log("long line report", |l| {
        l.contains("line_too_long") && l.contains("1024 bytes")
    });
    s.assert_healthy();
}

#[test]
fn udp_datagrams_with_one_or_many_lines() {
    let mut s = Sluice::start("jsonl-udp", CONFIG);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = s.addr("logs");
    let mut sent = 0;
    for d in 0..100 {
        // One line per datagram, or three, with and without the final newline.
        let mut dgram = String::new();
        let lines = if d % 2 == 0 { 1 } else { 3 };
        for _ in 0..lines {
            dgram.push_str(&format!(
                "{{\"metric\":\"cpu\",\"value\":0.5,\"seq\":{sent},\"client\":\"udp\"}}\n"
            ));
            sent += 1;
        }
        if d % 4 == 1 {
            dgram.pop();
        }
        udp.send_to(dgram.as_bytes(), to).unwrap();
        if d % 10 == 0 {
            // Loopback UDP is lossless below the socket buffer; pace to stay well below.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let rest = wait_json_lines(&mut s, "rest", sent);
    assert_eq!(rest.len(), sent);
    // No tag field: the input's own tag.
    assert_exactly_once(&rest, "logs", "udp", sent);
    s.assert_healthy();
}

#[test]
fn text_format_writes_one_field_and_counts_records_without_it() {
    let mut s = Sluice::start("jsonl-text", CONFIG);
    let mut conn = TcpStream::connect(s.addr("logs")).unwrap();
    for i in 0..20 {
        writeln!(conn, "{{\"tag\":\"plain.app\",\"message\":\"hello {i}\"}}").unwrap();
    }
    writeln!(conn, "{{\"tag\":\"plain.app\",\"other\":1}}").unwrap();
    writeln!(
        conn,
        "{{\"tag\":\"plain.app\",\"message\":{{\"nested\":true}}}}"
    )
    .unwrap();
    drop(conn);
    s.wait_stat("missing_log_key", |n| n == 1);
    let text = s.wait_for("21 lines in text.log", |s| {
        let t = std::fs::read_to_string(s.dir.join("text.log")).unwrap_or_default();
        (t.lines().count() >= 21).then_some(t)
    });
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 21);
    for i in 0..20 {
        assert!(lines.contains(&format!("hello {i}").as_str()));
    }
    assert!(
        lines.contains(&"{\"nested\":true}"),
        "a non-text value is written as JSON"
    );
    s.assert_healthy();
}
