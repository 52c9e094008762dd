//! The `sluice` command as a user meets it: help, validate, the embedded default config,
//! the example configs, and start-up failures that say what to change.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::emulators::Emulator;
use crate::harness::{
    BIN, Opts, Sluice, assert_exactly_once, read_stdout, scratch_dir, wait_json_lines,
};
use crate::kinesis::{exactly_once, send_acked};

fn sluice(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run sluice")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_explains_each_subcommand() {
    let o = sluice(&["--help"]);
    assert!(o.status.success());
    let t = text(&o);
    for want in [
        "run",
        "validate",
        "default-config",
        "24224",
        "5170",
        "SLUICE_LOG",
    ] {
        assert!(t.contains(want), "--help lacks {want}:\n{t}");
    }
    let t = text(&sluice(&["run", "--help"]));
    assert!(t.contains("--config") && t.contains("SIGTERM"), "{t}");
    let t = text(&sluice(&["validate", "--help"]));
    assert!(t.contains("Exits 0"), "{t}");
}

#[test]
fn validate_accepts_good_files_and_names_the_key_in_bad_ones() {
    let dir = scratch_dir("validate");
    let good = dir.join("good.toml");
    let o = Command::new(BIN).arg("default-config").output().unwrap();
    std::fs::write(&good, &o.stdout).unwrap();
    let o = sluice(&["validate", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("is valid") && t.contains("input forward: forward on 0.0.0.0:24224"),
        "{t}"
    );
    assert!(t.contains("route 0: ** -> stdout"), "{t}");

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("sinks = \"stdout\"", "sinks = \"s3\""),
    )
    .unwrap();
    let o = sluice(&["validate", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains("routes[0].sinks[0]: no sink is named \"s3\""),
        "{t}"
    );
}

/// The example and the embedded default both listen on 24224, so they take turns.
static PORT_24224: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The classic Fargate aggregator, translated: it validates, and it runs against moto
/// with nothing changed but the endpoint, which comes from the SDK's own
/// `AWS_ENDPOINT_URL`.
#[test]
fn fargate_example_validates_and_runs_against_moto() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fargate-aggregator.toml");
    let o = sluice(&["validate", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for want in [
        "sink elasticsearch: firehose delivery stream elasticsearch-delivery-stream",
        "route 2: health* -> drop",
    ] {
        assert!(t.contains(want), "validate lacks {want:?}:\n{t}");
    }

    let moto = Emulator::moto();
    for (stream, bucket) in [
        ("elasticsearch-delivery-stream", "frontend-logs"),
        ("s3-delivery-stream", "backend-logs"),
    ] {
        moto.tool(&["create-bucket", bucket]);
        moto.tool(&["create-delivery-stream", stream, bucket]);
    }
    let _port = PORT_24224.lock().unwrap_or_else(|e| e.into_inner());
    let s = Sluice::spawn(
        scratch_dir("fargate"),
        &["run".into(), "--config".into(), path.into_os_string()],
        Opts {
            env: vec![("AWS_ENDPOINT_URL", moto.endpoint.clone())],
            ..Opts::default()
        },
    );
    assert_eq!(s.addr("forward").port(), 24224);
    assert_eq!(s.addr("http").port(), 8888);
    // The container health check the seed's Fluentd used, exactly.
    let o = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg("http://localhost:8888/healthcheck?json=%7B%22log%22%3A+%22health+check%22%7D")
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "{}", text(&o));
    let fwd = s.addr("forward");
    std::thread::scope(|scope| {
        for (tag, n) in [
            ("frontend-web", 300),
            ("backend-api", 200),
            ("health-check", 50),
        ] {
            scope.spawn(move || send_acked(fwd, tag, tag, n));
        }
    });
    for (bucket, client, n) in [
        ("frontend-logs", "frontend-web", 300),
        ("backend-logs", "backend-api", 200),
    ] {
        let data = moto.tool(&["read-bucket", bucket]);
        let records = vec![serde_json::json!({"shard": bucket, "data": data})];
        exactly_once(&records, client, n);
        assert!(!data.contains("health-check"), "health events go nowhere");
    }
    // The example keeps the default stats interval (a minute); the final line has it all.
    let (status, logs) = s.stop();
    assert!(status.success(), "{status}\n{}", logs.join("\n"));
    let last = logs.iter().find(|l| l.contains("Final stats")).unwrap();
    // The health check's event went to `drop` with the Forward health events, nowhere else.
    for want in [
        "http_requests=1",
        "sink.drop.events=51",
        "sink.elasticsearch.events=300",
        "sink.s3.events=200",
    ] {
        assert!(last.contains(want), "{want}: {last}");
    }
}

#[test]
fn local_example_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/local.toml");
    let o = sluice(&["validate", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

/// `sluice` with no arguments: Forward on 24224 and JSON lines on 5170, to stdout.
#[test]
fn embedded_default_config_prints_events_to_stdout() {
    let _port = PORT_24224.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Sluice::spawn(
        scratch_dir("default"),
        &[],
        Opts {
            pipe_stdout: true,
            ..Opts::default()
        },
    );
    let mut j = TcpStream::connect("127.0.0.1:5170").unwrap();
    j.write_all(b"{\"tag\":\"app.web\",\"msg\":\"hello from nc\"}\n")
        .unwrap();
    drop(j);
    let mut v = serde_json::Value::Null;
    let n = read_stdout(s.stdout.take().unwrap(), s.pid(), 1, |e| v = e);
    assert_eq!(n, 1, "the line came out on stdout");
    assert_eq!(v["tag"], "app.web");
    assert_eq!(v["msg"], "hello from nc");
    assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
    assert_eq!(s.addr("forward").port(), 24224);
    let h = s.addr("http");
    assert_eq!(h.port(), 9880);
    assert_eq!(crate::http::request(h, "GET", "/health", None, b"").0, 200);
    let (status, logs) = s.stop();
    assert!(
        status.success(),
        "graceful exit on SIGTERM: {status}\n{}",
        logs.join("\n")
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("Final stats") && l.contains("events_in=1")),
        "{}",
        logs.join("\n")
    );
}

/// The forward test config with the engine's `io` set.
fn config_with_io(name: &str, io: &str) -> PathBuf {
    let dir = scratch_dir(name);
    let cfg = dir.join("c.toml");
    let text = crate::forward::ROUTES
        .replace("{dir}", dir.to_str().unwrap())
        .replace("[engine]\n", &format!("[engine]\nio = \"{io}\"\n"));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `io = "uring"` where io_uring cannot run: exit 1 with what to change.
fn start_fails(cmd: &mut Command) -> String {
    let cfg = config_with_io("startfail", "uring");
    let o = cmd
        .arg(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    text(&o)
}

/// The seccomp helper: runs a command with the io_uring calls refused (EPERM), as
/// Docker's default profile and Fargate do.
#[cfg(target_arch = "x86_64")]
pub fn no_uring() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let helper = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no_uring");
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/helpers/no_uring.c");
            let tmp = helper.with_extension(format!("{}", std::process::id()));
            let o = Command::new("cc")
                .arg("-o")
                .arg(&tmp)
                .arg(&src)
                .output()
                .expect("a C compiler (cc)");
            assert!(o.status.success(), "building no_uring: {}", text(&o));
            std::fs::rename(&tmp, &helper).unwrap();
            helper
        })
        .clone()
}

#[test]
fn too_little_locked_memory_is_explained() {
    let t = start_fails(Command::new("prlimit").arg("--memlock=0"));
    assert!(
        t.contains("RLIMIT_MEMLOCK") && t.contains("ulimit -l"),
        "{t}"
    );
}

/// As under Docker's default seccomp profile: the io_uring calls fail with EPERM.
#[cfg(target_arch = "x86_64")]
#[test]
fn blocked_io_uring_is_explained() {
    let t = start_fails(&mut Command::new(no_uring()));
    assert!(
        t.contains("io_uring_setup was refused") && t.contains("seccomp"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
}

/// Where io_uring is refused, `io = "auto"` (the default) runs epoll, says why, and
/// serves: a Forward event arrives and is acked.
#[cfg(target_arch = "x86_64")]
#[test]
fn auto_falls_back_to_epoll_under_seccomp_and_says_why() {
    let cfg = config_with_io("auto-epoll", "auto");
    let dir = cfg.parent().unwrap().to_path_buf();
    auto_serves_on_epoll(
        no_uring(),
        &[],
        dir,
        &cfg,
        "io_uring refused by seccomp (EPERM): using epoll",
    );
}

/// Locked memory too small for io_uring: `auto` runs epoll, which needs none.
#[test]
fn auto_falls_back_to_epoll_without_locked_memory() {
    let cfg = config_with_io("auto-memlock", "auto");
    let dir = cfg.parent().unwrap().to_path_buf();
    auto_serves_on_epoll(
        "prlimit".into(),
        &["--memlock=0"],
        dir,
        &cfg,
        "locked-memory limit 0 bytes is below io_uring's 524288: using epoll",
    );
}

fn auto_serves_on_epoll(
    wrapper: PathBuf,
    wrapper_args: &[&str],
    dir: PathBuf,
    cfg: &Path,
    why: &str,
) {
    let mut args: Vec<std::ffi::OsString> = wrapper_args.iter().map(Into::into).collect();
    args.push(BIN.into());
    args.extend(["run".into(), "--config".into(), cfg.as_os_str().to_owned()]);
    let mut s = Sluice::spawn_wrapped(dir, &wrapper, &args, Opts::default());
    let logs = s.logs().join("\n");
    assert!(logs.contains(why), "{logs}");
    let ready = s.wait_log("ready", |l| l.contains("Sluice is ready"));
    assert!(ready.contains("io=\"epoll\""), "{ready}");
    send_acked(s.addr("fwd"), "frontend", "auto", 250);
    let lines = wait_json_lines(&mut s, "front", 250);
    assert_exactly_once(&lines, "frontend", "auto", 250);
    s.assert_healthy();
}

#[test]
fn a_taken_port_is_reported_with_its_input() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = crate::forward::ROUTES.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let dir = scratch_dir("taken");
    let path = dir.join("c.toml");
    std::fs::write(&path, cfg.replace("{dir}", dir.to_str().unwrap())).unwrap();
    let o = sluice(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains(&format!(
            "inputs.fwd.address: cannot bind 127.0.0.1:{port} (TCP)"
        )),
        "{t}"
    );
}

/// Every line on stderr parses as a JSON object with a time, a level and a message.
fn json_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    let t = String::from_utf8_lossy(stderr);
    let lines: Vec<serde_json::Value> = t
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{t}")))
        .collect();
    for v in &lines {
        assert!(
            v["timestamp"].as_str().is_some_and(|s| s.ends_with('Z')),
            "{v}"
        );
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{v}"
        );
    }
    lines
}

#[test]
fn own_logs_can_be_json_lines() {
    let dir = scratch_dir("jsonlogs");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = |addr: &str| {
        format!(
            "[engine]\nlog_format = \"json\"\nstats_interval = \"1s\"\n\
             [inputs.fwd]\ntype = \"forward\"\naddress = \"{addr}\"\n\
             [sinks.n]\ntype = \"null\"\n[[routes]]\nmatch = \"**\"\nsinks = [\"n\"]\n"
        )
    };
    // Running: the start-up lines, the stats, and the final counters, each a JSON line.
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg("127.0.0.1:0")).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read until it says it is ready (so its signal handler is in place), then stop it.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(
            n > 0,
            "sluice exited before it was ready:\n{}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(line.as_bytes());
        if line.contains("Sluice is ready") {
            break;
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::io::Read::read_to_end(&mut stderr, &mut seen).unwrap();
    let status = child.wait().unwrap();
    let all = String::from_utf8_lossy(&seen).to_string();
    assert!(status.success(), "{status}\n{all}");
    let lines = json_lines(&seen);
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap().to_string();
    let ready = lines
        .iter()
        .find(|v| message(v) == "Sluice is ready")
        .unwrap();
    assert_eq!(ready["level"], "INFO");
    assert!(ready["fields"]["workers"].is_u64(), "{ready}");
    assert!(
        lines.iter().any(|v| message(v).starts_with("Final stats")),
        "{all}"
    );
    // Failing to start: the reason is one more JSON line, and the exit code is 1.
    let path = dir.join("taken.toml");
    std::fs::write(&path, cfg(&format!("127.0.0.1:{port}"))).unwrap();
    let o = sluice(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let lines = json_lines(&o.stderr);
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["fields"]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("cannot bind 127.0.0.1:{port}")),
        "{last}"
    );
}

/// A second sluice on the address of a running one exits 1, naming the address and the
/// process; SO_REUSEPORT would otherwise have them split the connections.
#[test]
fn a_second_instance_on_the_same_address_fails() {
    let cfg = |addr: &str| {
        format!(
            "[inputs.fwd]\ntype = \"forward\"\naddress = \"{addr}\"\n\
             [sinks.out]\ntype = \"null\"\n[[routes]]\nmatch = \"**\"\nsinks = \"out\"\n"
        )
    };
    let mut first = Sluice::start("first-instance", &cfg("127.0.0.1:0"));
    let addr = first.addr("fwd");
    let dir = scratch_dir("second-instance");
    let path = dir.join("c.toml");
    std::fs::write(&path, cfg(&addr.to_string())).unwrap();
    let o = sluice(&["run", "--config", path.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("inputs.fwd.address: cannot bind {addr} (TCP)"))
            && t.contains(&format!(
                "already in use by process {} (sluice)",
                first.pid()
            )),
        "{t}"
    );
    // The first one still serves.
    send_acked(addr, "frontend", "first", 10);
    first.assert_healthy();
}
