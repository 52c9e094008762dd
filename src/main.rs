//! The `sluice` command: run, validate a config, or print the embedded default.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::config::{Config, DEFAULT_CONFIG, InputKind, LogFormat, SinkKind};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice: a thread-per-core log forwarder.
///
/// Receives the Fluentd Forward protocol (Docker's fluentd log driver, Fluent Bit, Fluentd,
/// fluent-logger), newline-delimited JSON over TCP and UDP, and Fluentd-style HTTP, routes
/// events by tag with Fluentd's match patterns, and writes them in batches to its sinks.
///
/// With no command, sluice runs its embedded default config: Forward on 24224, JSON lines
/// on 5170 (TCP and UDP), HTTP on 9880 (/health, /metrics, ingest), everything to stdout. Logs go to stderr; set SLUICE_LOG (for
/// example `debug` or `info,sluice::stats=warn`) to change how much.
#[derive(Parser)]
#[command(name = "sluice", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run sluice: with --config FILE, on that config; without, on the embedded default.
    ///
    /// SIGTERM or SIGINT shuts down gracefully, within engine.drain_timeout: stop
    /// accepting, read open connections for engine.input_grace, seal every batch, deliver,
    /// write the final acks and counters, exit 0. A second signal exits at once.
    Run {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a config file: print what it defines, or the first error with its key.
    ///
    /// Exits 0 when the file is valid and 1 when it is not. Nothing is bound or started.
    Validate {
        /// The TOML config file.
        file: PathBuf,
    },
    /// Print the embedded default config, a starting point for your own.
    DefaultConfig,
    /// List or send again the records in the dead-letter directory (engine.dead_letter_dir).
    Dlq {
        #[command(subcommand)]
        action: Dlq,
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// List the dead-letter files: sink, records and the reason they were refused.
    List {
        /// The TOML config file (for engine.dead_letter_dir).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Only this sink's files.
        #[arg(long)]
        sink: Option<String>,
    },
    /// Send the dead-lettered records again, with their keys, to the sink that refused
    /// them (as the config now defines it), once the cause is fixed. Each file is removed
    /// once all its records are accepted; a file still refused is kept, and the command
    /// exits 1.
    Replay {
        /// The TOML config file: the dead-letter directory and the sinks.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Only this sink's files.
        #[arg(long)]
        sink: Option<String>,
        /// Only files written since: an RFC 3339 time, or an age such as "2h".
        #[arg(long)]
        since: Option<String>,
    },
}

fn main() -> ExitCode {
    // No transparent huge pages: the allocator asks for them, and each 2 MiB page a few
    // bytes touch is then resident whole, which made peak RSS several times what the
    // engine holds. The memory is small enough that TLB reach does not matter.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(None),
        Some(Command::Run { config }) => run(config),
        Some(Command::Validate { file }) => validate(&file),
        Some(Command::DefaultConfig) => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Some(Command::Dlq { action }) => dlq(action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match LOG_FORMAT.get() {
                // A log pipeline reading JSON gets the reason as one more JSON line.
                Some(LogFormat::Json) => tracing::error!(error = format!("{e:#}"), "Exiting"),
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The format logging was set up with, once it was.
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Sluice's own logs go to stderr, never through its pipeline, as `format` says.
fn init_logging(format: LogFormat) {
    let _ = LOG_FORMAT.set(format);
    use std::io::IsTerminal;
    let filter = std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info".into());
    let targets: tracing_subscriber::filter::Targets = filter.parse().unwrap_or_else(|e| {
        eprintln!("SLUICE_LOG={filter:?} is not a valid filter ({e}); using \"info\"");
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => layer.json().with_current_span(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(targets)
        .init();
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p).with_context(|| format!("invalid config {}", p.display())),
        None => Ok(Config::default_config()),
    }
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = load(config.as_ref())?;
    init_logging(cfg.engine.log_format);
    match &config {
        Some(p) => tracing::info!(config = %p.display(), "Starting"),
        None => {
            tracing::info!("Starting on the embedded default config (see `sluice default-config`)")
        }
    }
    sluice::engine::run(cfg)?;
    Ok(())
}

fn dlq(action: Dlq) -> anyhow::Result<()> {
    use sluice::emit::dlq;
    let (config, sink, since) = match &action {
        Dlq::List { config, sink } => (config, sink, None),
        Dlq::Replay {
            config,
            sink,
            since,
        } => (config, sink, since.as_deref()),
    };
    let cfg = load(Some(config))?;
    let since = since
        .map(|s| {
            humantime::parse_rfc3339_weak(s)
                .or_else(|_| humantime::parse_duration(s).map(|d| std::time::SystemTime::now() - d))
                .map_err(|_| {
                    anyhow::anyhow!("--since {s:?}: give an RFC 3339 time or an age like \"2h\"")
                })
        })
        .transpose()?;
    let dir = &cfg.engine.dead_letter_dir;
    let files = dlq::files(dir, sink.as_deref(), since)
        .with_context(|| format!("cannot read the dead-letter directory {}", dir.display()))?;
    if files.is_empty() {
        println!("No dead-letter files in {}.", dir.display());
        return Ok(());
    }
    if let Dlq::List { .. } = action {
        for f in &files {
            let d = dlq::read(f).map_err(anyhow::Error::msg)?;
            println!(
                "{}\tsink={}\trecords={}\treason={}",
                f.display(),
                d.sink,
                d.records.len(),
                d.reason
            );
        }
        return Ok(());
    }
    init_logging(cfg.engine.log_format);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let (mut sent, mut kept) = (0, 0);
    for f in &files {
        let d = dlq::read(f).map_err(anyhow::Error::msg)?;
        match rt.block_on(dlq::replay(&cfg, &d)) {
            Ok(n) => {
                sent += n;
                println!("{}: {n} records sent, file removed", f.display());
            }
            Err(e) => {
                kept += 1;
                eprintln!("{}: {e}", f.display());
            }
        }
    }
    println!(
        "{sent} records sent again from {} files; {kept} files kept.",
        files.len() - kept
    );
    if kept > 0 {
        anyhow::bail!("{kept} dead-letter files could not be sent and were kept");
    }
    Ok(())
}

fn validate(file: &PathBuf) -> anyhow::Result<()> {
    let cfg = load(Some(file))?;
    println!("{} is valid.", file.display());
    println!("workers: {}", cfg.engine.workers);
    println!("memory_limit: {} bytes", cfg.engine.memory_limit);
    for i in &cfg.inputs {
        let what = match &i.kind {
            InputKind::Forward { .. } => "forward".to_string(),
            InputKind::Http { .. } => "http".to_string(),
            InputKind::JsonLines { tcp, udp, .. } => {
                format!(
                    "json_lines over {}",
                    if *tcp && *udp {
                        "tcp+udp"
                    } else if *tcp {
                        "tcp"
                    } else {
                        "udp"
                    }
                )
            }
        };
        println!("input {}: {what} on {}", i.name, i.address);
    }
    for s in &cfg.sinks {
        let what = match &s.kind {
            SinkKind::Stdout => "stdout".to_string(),
            SinkKind::File { path, .. } => format!("file {}", path.display()),
            SinkKind::Null => "null".to_string(),
            SinkKind::Kinesis(k) => {
                let mut w = format!("kinesis stream {}", k.stream);
                if k.aggregate {
                    w.push_str(", aggregated");
                }
                if let Some(c) = k.compression {
                    w.push_str(&format!(", {c}"));
                }
                w
            }
            SinkKind::Firehose(f) => format!("firehose delivery stream {}", f.delivery_stream),
        };
        let what = match s.fallback {
            Some(f) => format!("{what} (falls back to {})", cfg.sinks[f].name),
            None => what,
        };
        println!("sink {}: {what}", s.name);
    }
    for (n, r) in cfg.routes.iter().enumerate() {
        let sinks: Vec<&str> = r
            .sinks
            .iter()
            .map(|&i| cfg.sinks[i].name.as_str())
            .collect();
        println!(
            "route {n}: {} -> {}",
            r.patterns.join(" "),
            sinks.join(", ")
        );
    }
    Ok(())
}
