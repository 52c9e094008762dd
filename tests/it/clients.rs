//! Real clients against the real binary: Python's fluent-logger (PyPI) and the Docker
//! fluentd driver's fluent-logger-golang (Debian), in each of their modes.

use std::process::Command;

use crate::harness::{Sluice, assert_exactly_once, deps, wait_json_lines};

const CONFIG: &str = r#"
[engine]
workers = 2
stats_interval = "1s"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.apps]
type = "file"
path = "{dir}/apps.ndjson"
linger = "50ms"

[sinks.docker]
type = "file"
path = "{dir}/docker.ndjson"
linger = "50ms"

[[routes]]
match = "app.**"
sinks = "apps"
tag_key = "tag"
time_key = "time"

[[routes]]
match = "docker.**"
sinks = "docker"
tag_key = "tag"
time_key = "time"
"#;

const N: usize = 3000;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("start the client");
    assert!(
        out.status.success(),
        "client failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_fluent_logger_sync_async_and_nanosecond() {
    let deps = deps();
    let mut s = Sluice::start("py", CONFIG);
    let port = s.addr("fwd").port().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/fluent_send.py");
    let modes = ["sync", "async", "nanos"];
    for mode in modes {
        run(Command::new(deps.join("venv/bin/python")).args([
            script,
            "--port",
            &port,
            "--tag",
            &format!("py.{mode}"),
            "--count",
            &N.to_string(),
            "--mode",
            mode,
        ]));
    }
    let lines = wait_json_lines(&mut s, "apps", N * modes.len());
    assert_eq!(lines.len(), N * modes.len());
    for mode in modes {
        assert_exactly_once(
            &lines,
            &format!("app.py.{mode}"),
            &format!("python-{mode}"),
            N,
        );
    }
    s.assert_healthy();
}

#[test]
fn go_fluent_logger_sync_async_and_request_ack() {
    let deps = deps();
    let mut s = Sluice::start("go", CONFIG);
    let port = s.addr("fwd").port().to_string();
    let modes = ["sync", "async", "ack"];
    for mode in modes {
        run(Command::new(deps.join("fluent-go-client")).args([
            "-port",
            &port,
            "-tag",
            &format!("docker.{mode}"),
            "-count",
            &N.to_string(),
            "-mode",
            mode,
        ]));
    }
    let lines = wait_json_lines(&mut s, "docker", N * modes.len());
    assert_eq!(lines.len(), N * modes.len());
    for mode in modes {
        assert_exactly_once(&lines, &format!("docker.{mode}"), &format!("go-{mode}"), N);
    }
    // RequestAck waits for every ack before its next message: they were all sent.
    let stats = s.wait_stat("acks_sent", |n| n >= N as u64);
    assert_eq!(stats["acks_sent"], N as u64);
    s.assert_healthy();
}
