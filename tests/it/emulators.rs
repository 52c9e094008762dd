//! AWS emulators, one per test on a free loopback port: moto server (Kinesis, Firehose and
//! S3) and kinesis-local (a second, independent Kinesis); and `aws_tool.py`, which creates
//! and reads their resources with boto3 and AWS's own KPL deaggregator.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{PATIENCE, deps};

pub struct Emulator {
    child: Child,
    pub endpoint: String,
    name: &'static str,
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before listening on {port}");
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{what} never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Emulator {
    /// moto server: Kinesis, Firehose and S3 behind one endpoint.
    pub fn moto() -> Emulator {
        let port = free_port();
        let mut child = Command::new(deps().join("venv/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server (run tests/deps.sh)");
        wait_listening(port, &mut child, "moto_server");
        Emulator {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            name: "moto",
        }
    }

    /// kinesis-local, plain HTTP, with instant stream operations.
    pub fn kinesis_local() -> Emulator {
        let (plain, tls) = (free_port(), free_port());
        let dir: PathBuf = deps().join("node/node_modules/kinesis-local");
        let mut child = Command::new("node")
            .arg(dir.join("main.js"))
            .current_dir(&dir)
            .env("KINESIS_MOCK_PLAIN_PORT", plain.to_string())
            .env("KINESIS_MOCK_TLS_PORT", tls.to_string())
            .env("CREATE_STREAM_DURATION", "0ms")
            .env("UPDATE_SHARD_COUNT_DURATION", "0ms")
            .env("SPLIT_SHARD_DURATION", "0ms")
            .env("MERGE_SHARDS_DURATION", "0ms")
            .env("LOG_LEVEL", "WARN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kinesis-local (run tests/deps.sh)");
        wait_listening(plain, &mut child, "kinesis-local");
        Emulator {
            child,
            endpoint: format!("http://127.0.0.1:{plain}"),
            name: "kinesis-local",
        }
    }

    /// Runs `aws_tool.py` against this emulator; returns its output.
    pub fn tool(&self, args: &[&str]) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/aws_tool.py");
        let out = Command::new(deps().join("venv/bin/python"))
            .arg(script)
            .arg(&self.endpoint)
            .args(args)
            .output()
            .expect("run aws_tool.py");
        assert!(
            out.status.success(),
            "aws_tool.py {args:?} on {} failed:\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every user record of a stream, as `aws_tool.py read-stream` prints them.
    pub fn read_stream(&self, stream: &str, compression: Option<&str>) -> Vec<serde_json::Value> {
        let mut args = vec!["read-stream", stream];
        if let Some(c) = compression {
            args.extend(["--compression", c]);
        }
        self.tool(&args)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
