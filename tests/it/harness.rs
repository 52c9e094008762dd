//! Starts the real `sluice` binary on loopback ports and watches it: its log lines, its
//! counters, its output files and its memory. Every helper waits with a generous timeout
//! and fails loudly; none asserts a time.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// How long any wait may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A fresh directory under the target dir for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Where `tests/deps.sh` put the client programs.
pub fn deps() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let deps = target.join("test-deps");
    assert!(
        deps.join("venv/bin/python").exists() && deps.join("fluent-go-client").exists(),
        "the test clients are missing from {}: run tests/run.sh (or tests/deps.sh) first",
        deps.display()
    );
    deps
}

pub struct Sluice {
    child: Child,
    pub dir: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    addrs: HashMap<String, SocketAddr>,
    pub stdout: Option<ChildStdout>,
}

#[derive(Default)]
pub struct Opts {
    /// Leave stdout piped for the test to read (or not read); otherwise it is discarded.
    pub pipe_stdout: bool,
    /// More environment for the process.
    pub env: Vec<(&'static str, String)>,
    /// Return once the process has started, not once it is ready.
    pub no_wait: bool,
}

impl Sluice {
    /// Starts sluice on `config`, in which `{dir}` stands for a fresh scratch directory,
    /// and waits until it is ready.
    pub fn start(name: &str, config: &str) -> Sluice {
        Sluice::start_with(name, config, Opts::default())
    }

    pub fn start_with(name: &str, config: &str, opts: Opts) -> Sluice {
        Sluice::start_in(scratch_dir(name), config, opts)
    }

    /// Starts sluice on `config` in `dir` (again, for a restart on the same files).
    pub fn start_in(dir: PathBuf, config: &str, opts: Opts) -> Sluice {
        let config = config.replace("{dir}", dir.to_str().unwrap());
        let path = dir.join("sluice.toml");
        std::fs::write(&path, config).unwrap();
        let args = ["run".into(), "--config".into(), path.into_os_string()];
        Sluice::spawn(dir, &args, opts)
    }

    /// Starts `sluice ARGS...` and waits until it is ready.
    pub fn spawn(dir: PathBuf, args: &[std::ffi::OsString], opts: Opts) -> Sluice {
        Sluice::spawn_wrapped(dir, Path::new(BIN), args, opts)
    }

    /// Starts `PROGRAM ARGS...`, a wrapper (prlimit, a seccomp filter) that runs sluice,
    /// and waits until sluice is ready.
    pub fn spawn_wrapped(
        dir: PathBuf,
        program: &Path,
        args: &[std::ffi::OsString],
        opts: Opts,
    ) -> Sluice {
        let mut child = Command::new(program)
            .args(args)
            .env("SLUICE_LOG", "info")
            // Emulators take any credentials; never look for real ones.
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(if opts.pipe_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the sluice binary");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take();
        let mut s = Sluice {
            child,
            dir,
            logs,
            addrs: HashMap::new(),
            stdout,
        };
        if !opts.no_wait {
            s.until_ready();
        }
        s
    }

    /// Waits until sluice says it is ready, and notes where its inputs listen.
    pub fn until_ready(&mut self) {
        let ready = self.wait_log("ready", |l| l.contains("Sluice is ready"));
        // tests/run.sh's second run: the backend chosen must be the one expected.
        if let Ok(io) = std::env::var("SLUICE_EXPECT_IO") {
            assert!(
                ready.contains(&format!("io=\"{io}\""))
                    || ready.contains(&format!("\"io\":\"{io}\"")),
                "expected the {io} backend: {ready}"
            );
        }
        for line in self.logs() {
            if let (Some(i), Some(a)) = (field(&line, "input"), field(&line, "address"))
                && line.contains("Listening")
            {
                self.addrs.insert(i, a.parse().unwrap());
            }
        }
    }

    /// The address an input listens on.
    pub fn addr(&self, input: &str) -> SocketAddr {
        *self
            .addrs
            .get(input)
            .unwrap_or_else(|| panic!("no input {input}: {:?}", self.addrs))
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Polls `check` until it gives a value; fails with the whole log if the process exits
    /// or the wait runs out.
    pub fn wait_for<T>(&mut self, what: &str, mut check: impl FnMut(&Self) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = check(self) {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "sluice exited ({status}) while waiting for {what}:\n{}",
                    self.logs().join("\n")
                );
            }
            assert!(
                start.elapsed() < PATIENCE,
                "never got {what}; last stats {:?}\n{}",
                self.stats(),
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a log line matching `pred`.
    pub fn wait_log(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for(what, |s| s.logs().into_iter().find(|l| pred(l)))
    }

    /// The counters of the latest stats line.
    pub fn stats(&self) -> HashMap<String, u64> {
        let logs = self.logs();
        let Some(line) = logs.iter().rev().find(|l| l.contains("Stats ")) else {
            return HashMap::new();
        };
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }

    /// Waits until counter `key` satisfies `pred`; returns all the counters then.
    pub fn wait_stat(&mut self, key: &str, pred: impl Fn(u64) -> bool) -> HashMap<String, u64> {
        self.wait_for(&format!("counter {key}"), |s| {
            let stats = s.stats();
            pred(stats.get(key).copied().unwrap_or(0)).then_some(stats)
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the process has had (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(self) -> (ExitStatus, Vec<String>) {
        signal(self.pid(), "TERM");
        self.wait_exit()
    }

    /// Waits for the process to end by itself.
    pub fn wait_exit(mut self) -> (ExitStatus, Vec<String>) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.logs());
            }
            assert!(
                start.elapsed() < PATIENCE,
                "sluice did not stop:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Checks the process is alive and never logged a panic.
    pub fn assert_healthy(&mut self) {
        assert!(
            self.is_running(),
            "sluice died:\n{}",
            self.logs().join("\n")
        );
        let logs = self.logs();
        assert!(
            !logs.iter().any(|l| l.contains("panicked")),
            "a panic:\n{}",
            logs.join("\n")
        );
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `n` JSON lines from sluice's piped stdout, handing each to `each`; returns how
/// many came. Should fewer come, a watchdog kills sluice after 3 × PATIENCE, so that the
/// read ends and the test fails rather than hangs.
pub fn read_stdout(
    stdout: ChildStdout,
    pid: u32,
    n: usize,
    mut each: impl FnMut(serde_json::Value),
) -> usize {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::Relaxed) {
                if start.elapsed() > 3 * PATIENCE {
                    signal(pid, "KILL");
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut lines = 0;
    for line in BufReader::new(stdout).lines().take(n) {
        let line = line.unwrap();
        each(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")));
        lines += 1;
    }
    done.store(true, Ordering::Relaxed);
    watchdog.join().unwrap();
    lines
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// `key=value` from a tracing log line (values may be quoted).
pub fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    let v = if let Some(q) = rest.strip_prefix('"') {
        &q[..q.find('"')?]
    } else {
        rest.split_whitespace().next()?
    };
    Some(v.to_string())
}

/// Every JSON line in files under `dir` whose name starts with `prefix` (rotated files
/// included).
pub fn read_json_lines(dir: &Path, prefix: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .collect();
    files.sort();
    for f in files {
        let mut text = String::new();
        std::fs::File::open(&f)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", f.display()));
            out.push(v);
        }
    }
    out
}

/// Waits until files starting with `prefix` hold at least `n` JSON lines; returns them.
pub fn wait_json_lines(s: &mut Sluice, prefix: &str, n: usize) -> Vec<serde_json::Value> {
    s.wait_for(&format!("{n} lines in {prefix}*"), |s| {
        let lines = read_json_lines(&s.dir, prefix);
        (lines.len() >= n).then_some(lines)
    })
}

/// Counts `(tag, client, seq)` triples and asserts each expected one appears exactly once.
pub fn assert_exactly_once(lines: &[serde_json::Value], tag: &str, client: &str, count: usize) {
    let mut seen = vec![0usize; count];
    for l in lines {
        if l["tag"] == tag && l["client"] == client {
            let seq = match &l["seq"] {
                serde_json::Value::Number(n) => n.as_u64().unwrap() as usize,
                serde_json::Value::String(s) => s.parse().unwrap(),
                other => panic!("bad seq {other}"),
            };
            seen[seq] += 1;
        }
    }
    let wrong: Vec<(usize, usize)> = seen
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "{client} on {tag}: (seq, times seen) not exactly once: {:?}",
        &wrong[..wrong.len().min(20)]
    );
}
