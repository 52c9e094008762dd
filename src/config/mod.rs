//! Config stage: the TOML file's serde types, and their validation into [`Config`], the
//! engine's only input. Errors name the offending key. The hot path never sees this module's
//! file types; it reads the validated values the engine was built from.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::batch::BatchLimits;
use crate::batch::shape::{Format, Literal, ShapeConfig, TimeFormat};
use crate::limits::MAX_FRAME_CEILING;

/// The configuration `sluice` runs when given none.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// A configuration error: the key it concerns and what to change.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct ConfigError {
    pub key: String,
    pub msg: String,
}

fn err(key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        msg: msg.into(),
    }
}

// ---- the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    engine: EngineFile,
    #[serde(default)]
    inputs: BTreeMap<String, toml::Table>,
    #[serde(default)]
    sinks: BTreeMap<String, toml::Table>,
    #[serde(default)]
    routes: Vec<toml::Table>,
    wal: Option<WalFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WalFile {
    dir: PathBuf,
    sync_interval: Option<Dur>,
    sync_bytes: Option<Size>,
    max_bytes: Option<Size>,
    full: Option<WalFull>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EngineFile {
    workers: Option<usize>,
    stats_interval: Option<Dur>,
    input_grace: Option<Dur>,
    drain_timeout: Option<Dur>,
    ring_capacity: Option<usize>,
    memory_limit: Option<Size>,
    dead_letter_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    io: Option<IoBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardFile {
    address: Option<String>,
    max_frame_bytes: Option<Size>,
    max_decompressed_bytes: Option<Size>,
    heartbeat: Option<bool>,
    max_connections: Option<usize>,
    ack: Option<AckPolicy>,
    max_unacked_bytes: Option<Size>,
    idle_timeout: Option<Dur>,
    frame_timeout: Option<Dur>,
    max_events_per_frame: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLinesFile {
    address: Option<String>,
    tcp: Option<bool>,
    udp: Option<bool>,
    tag: Option<String>,
    tag_key: Option<String>,
    max_line_bytes: Option<Size>,
    max_connections: Option<usize>,
    idle_timeout: Option<Dur>,
    frame_timeout: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    address: Option<String>,
    max_body_bytes: Option<Size>,
    max_connections: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdoutFile {
    batch_bytes: Option<Size>,
    linger: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSinkFile {
    path: PathBuf,
    rotate_bytes: Option<Size>,
    rotate_age: Option<Dur>,
    batch_bytes: Option<Size>,
    linger: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullFile {
    batch_bytes: Option<Size>,
    linger: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KinesisFile {
    stream: String,
    region: Option<String>,
    endpoint: Option<String>,
    role_arn: Option<String>,
    partition_key: Option<String>,
    partition_key_field: Option<String>,
    aggregate: Option<bool>,
    compression: Option<String>,
    max_record_bytes: Option<Size>,
    max_request_bytes: Option<Size>,
    linger: Option<Dur>,
    max_concurrency: Option<usize>,
    shard_refresh: Option<Dur>,
    shard_headroom: Option<f64>,
    request_timeout: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FirehoseFile {
    delivery_stream: String,
    region: Option<String>,
    endpoint: Option<String>,
    role_arn: Option<String>,
    line_packing: Option<Packing>,
    linger: Option<Dur>,
    max_concurrency: Option<usize>,
    request_timeout: Option<Dur>,
}

/// `line_packing = "auto"`, `true` or `false`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Packing {
    On(bool),
    Word(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    #[serde(rename = "match")]
    patterns: Patterns,
    sinks: OneOrMany,
    format: Option<String>,
    tag_key: Option<String>,
    time_key: Option<String>,
    time_format: Option<String>,
    log_key: Option<String>,
    #[serde(default)]
    remove_keys: Vec<String>,
    #[serde(default)]
    add_fields: BTreeMap<String, toml::Value>,
    fallback: Option<String>,
}

/// `"a.* b.**"` or `["a.*", "b.**"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Patterns {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A duration such as `"200ms"` or `"1h"`.
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. \"200ms\", \"5s\" or \"1h\""
            ))
        })
    }
}

/// A byte size: an integer, or a string such as `"512KiB"`, `"8MiB"`, `"1GB"`.
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {s:?}; write a number of bytes or e.g. \"512KiB\", \"8MiB\", \"1GB\""
                ))
            }),
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

// ---- the validated config ----

/// A validated configuration: the engine's only input.
#[derive(Clone, Debug)]
pub struct Config {
    pub engine: Engine,
    pub inputs: Vec<Input>,
    pub sinks: Vec<Sink>,
    pub routes: Vec<Route>,
    /// The write-ahead log, if one is configured.
    pub wal: Option<Wal>,
}

/// `[wal]`: where and how often what is read is journaled.
#[derive(Clone, Debug)]
pub struct Wal {
    pub dir: PathBuf,
    /// Group commit: entries are written and synced at least this often...
    pub sync_interval: Duration,
    /// ...or as soon as this many bytes are pending.
    pub sync_bytes: usize,
    /// The most the journal holds on disk.
    pub max_bytes: u64,
    pub full: WalFull,
}

/// What a full write-ahead log does: `"block"` (the default) stops reading until
/// deliveries free space; `"drop_oldest"` deletes its oldest segment, counted and logged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalFull {
    #[default]
    Block,
    DropOldest,
}

/// When a Forward chunk is acked: `"durable"` once it is in the write-ahead log (the
/// default with a `[wal]`), `"delivered"` once every sink has it (the default without).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckPolicy {
    Durable,
    Delivered,
}

#[derive(Clone, Debug)]
pub struct Engine {
    /// Cores to run, each with its own listeners.
    pub workers: usize,
    pub stats_interval: Duration,
    /// After a shutdown signal, how long open connections are still read.
    pub input_grace: Duration,
    /// The most a shutdown takes, from the signal to exit: input grace, delivery, final
    /// acks and counters.
    pub drain_timeout: Duration,
    /// Batches each core may have queued for each sink.
    pub ring_capacity: usize,
    /// What the data path's buffers may hold in all: batches, request bodies, answers.
    pub memory_limit: usize,
    /// Where records a service refuses for good are written, one file per batch.
    pub dead_letter_dir: PathBuf,
    /// How sluice's own logs are written to stderr.
    pub log_format: LogFormat,
    /// Which I/O backend runs the cores.
    pub io: IoBackend,
}

/// `io = "auto"` (the default: io_uring where the host allows it, else epoll), `"uring"`
/// (io_uring or a start-up error that says what to change) or `"epoll"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    #[default]
    Auto,
    Uring,
    Epoll,
}

/// `log_format = "text"` (the default: one human line per event) or `"json"` (one JSON
/// object per line, for CloudWatch Logs, Loki and the like).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct Input {
    pub name: String,
    pub address: SocketAddr,
    pub max_connections: usize,
    /// A connection that sends nothing (and waits for no ack) this long is closed.
    pub idle_timeout: Duration,
    /// A frame or line, once started, must arrive whole within this.
    pub frame_timeout: Duration,
    pub kind: InputKind,
}

#[derive(Clone, Debug)]
pub enum InputKind {
    Forward {
        max_frame_bytes: usize,
        max_decompressed_bytes: usize,
        /// Answer UDP heartbeats on the same port.
        heartbeat: bool,
        ack: AckPolicy,
        /// Bytes of chunks a connection may have unacked before it stops being read.
        max_unacked_bytes: usize,
        max_events_per_frame: u64,
    },
    JsonLines {
        tcp: bool,
        udp: bool,
        tag: String,
        tag_key: Option<String>,
        max_line_bytes: usize,
    },
    /// Fluentd `in_http` ingest, with `/health`, `/ready` and `/metrics`.
    Http { max_body_bytes: usize },
}

#[derive(Clone, Debug)]
pub struct Sink {
    pub name: String,
    pub kind: SinkKind,
    pub batch: BatchLimits,
    /// Index of the sink that takes records this one's service refuses for good, instead
    /// of the dead-letter directory (set by a route's `fallback`).
    pub fallback: Option<usize>,
}

#[derive(Clone, Debug)]
pub enum SinkKind {
    Stdout,
    File {
        path: PathBuf,
        rotate_bytes: Option<u64>,
        rotate_age: Option<Duration>,
    },
    Null,
    Kinesis(KinesisSink),
    Firehose(FirehoseSink),
}

/// What every AWS sink has.
#[derive(Clone, Debug)]
pub struct Aws {
    /// `None`: from the environment (`AWS_REGION`, the profile, IMDS).
    pub region: Option<String>,
    /// Overrides the service endpoint (an emulator, a VPC endpoint).
    pub endpoint: Option<String>,
    /// A role to assume with the credentials of the standard chain.
    pub role_arn: Option<String>,
    /// Ceiling of the requests in flight (the AIMD limit moves below it).
    pub max_concurrency: usize,
    pub request_timeout: Duration,
}

/// How Kinesis records get their partition key.
#[derive(Clone, Debug, PartialEq)]
pub enum PartitionKey {
    /// A random key per record (per aggregate when aggregating).
    Random,
    /// Explicit hash keys that spread records evenly over the shards' hash ranges.
    Explicit,
    /// The value of a record field (a random key when the field is missing).
    Field(String),
}

#[derive(Clone, Debug)]
pub struct KinesisSink {
    /// A stream name or ARN.
    pub stream: String,
    pub aws: Aws,
    pub key: PartitionKey,
    /// KPL aggregation.
    pub aggregate: bool,
    /// Compression of each record (or each aggregated record).
    pub compression: Option<crate::decode::Codec>,
    /// The stream's maximum record size, data plus partition key.
    pub max_record: usize,
    /// Maximum PutRecords request size, data plus partition keys.
    pub max_request: usize,
    pub shard_refresh: Duration,
    /// Fraction of a shard's 1,000 records/s and 1 MiB/s to aim for.
    pub shard_headroom: f64,
}

/// Whether Firehose records pack many newline-terminated events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinePacking {
    /// Pack when every destination of the delivery stream is S3.
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug)]
pub struct FirehoseSink {
    pub delivery_stream: String,
    pub aws: Aws,
    pub packing: LinePacking,
}

#[derive(Clone, Debug)]
pub struct Route {
    pub patterns: Vec<String>,
    /// Indexes into [`Config::sinks`].
    pub sinks: Vec<usize>,
    pub shape: ShapeConfig,
}

impl Config {
    /// Parses and validates a config file's text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_on(text, &Host::SYSTEM)
    }

    /// Parses and validates, asking `host` what validation needs of the machine.
    pub fn parse_on(text: &str, host: &Host) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text)
            .map_err(|e| err("config", e.to_string().trim_end().to_string()))?;
        validate(file, host)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
        Config::parse(&text)
    }

    /// The embedded default.
    pub fn default_config() -> Config {
        Config::parse(DEFAULT_CONFIG).expect("the embedded default config is valid")
    }
}

/// What validation asks of the machine: resolving listen addresses, and whether the
/// directories it will write are writable. [`Host::PURE`] asks nothing, for the fuzz target.
#[derive(Clone, Copy)]
pub struct Host {
    resolve: fn(&str) -> Option<SocketAddr>,
    writable: fn(&Path) -> Result<(), String>,
}

impl Host {
    pub const SYSTEM: Host = Host {
        resolve: |s| s.to_socket_addrs().ok()?.next(),
        writable: writable_dir,
    };
    /// Numeric addresses only, and every directory writable.
    pub const PURE: Host = Host {
        resolve: |s| s.parse().ok(),
        writable: |_| Ok(()),
    };
}

const SINK_TYPES: &str = "\"stdout\", \"file\", \"null\", \"kinesis\" and \"firehose\"";

/// The service limits, with where they are specified.
mod service {
    /// PutRecords: 500 records and 5 MiB (data plus keys) per request; 1 MiB per record
    /// by default, up to 10 MiB on streams that raise it.
    /// <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecords.html>
    pub const KINESIS_MAX_RECORD: u64 = 1 << 20;
    pub const KINESIS_MAX_RECORD_CEILING: u64 = 10 << 20;
    pub const KINESIS_MAX_REQUEST: u64 = 5 << 20;
    /// PutRecordBatch: 500 records, 4 MiB per request, 1,000 KiB per record.
    /// <https://docs.aws.amazon.com/firehose/latest/APIReference/API_PutRecordBatch.html>
    pub const FIREHOSE_MAX_RECORD: usize = 1000 << 10;
    pub const FIREHOSE_MAX_REQUEST: usize = 4 << 20;
    /// Kinesis bills each record's data plus key in whole PUT payload units of 25 KiB.
    /// <https://aws.amazon.com/kinesis/data-streams/pricing/>
    pub const KINESIS_PUT_UNIT: usize = 25 << 10;
}
pub use service::*;

/// The share of a shard's 1,000 records/s and 1 MiB/s that its token bucket aims at: close
/// to the limit (a shard's own writes then throttle rarely), with room for clock skew
/// between our buckets and the service's accounting.
pub const DEFAULT_SHARD_HEADROOM: f64 = 0.95;

fn aws(
    key: &str,
    region: Option<String>,
    endpoint: Option<String>,
    role_arn: Option<String>,
    max_concurrency: Option<usize>,
    request_timeout: Option<Dur>,
) -> Result<Aws, ConfigError> {
    if let Some(e) = &endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(err(
            format!("{key}.endpoint"),
            format!("{e:?} is not an http:// or https:// URL"),
        ));
    }
    if let Some(r) = &role_arn
        && !r.starts_with("arn:")
    {
        return Err(err(
            format!("{key}.role_arn"),
            format!("{r:?} is not an ARN"),
        ));
    }
    let max_concurrency = max_concurrency.unwrap_or(64);
    if max_concurrency == 0 || max_concurrency > 1024 {
        return Err(err(
            format!("{key}.max_concurrency"),
            format!("{max_concurrency} is out of range (1 to 1024)"),
        ));
    }
    Ok(Aws {
        region,
        endpoint,
        role_arn,
        max_concurrency,
        request_timeout: request_timeout.map_or(Duration::from_secs(30), |d| d.0),
    })
}

/// AWS sinks batch for a second by default, as Vector and Fluent Bit do.
const AWS_LINGER: Duration = Duration::from_secs(1);

fn kinesis(key: &str, f: KinesisFile) -> Result<(SinkKind, BatchLimits), ConfigError> {
    if f.stream.is_empty() {
        return Err(err(format!("{key}.stream"), "is empty"));
    }
    let keymode = match (f.partition_key.as_deref(), f.partition_key_field) {
        (None | Some("random"), None) => PartitionKey::Random,
        (Some("explicit"), None) => PartitionKey::Explicit,
        (Some("field") | None, Some(field)) if !field.is_empty() => PartitionKey::Field(field),
        (Some("field"), _) => {
            return Err(err(
                format!("{key}.partition_key_field"),
                "partition_key = \"field\" needs the field to use",
            ));
        }
        (Some("random" | "explicit"), Some(_)) => {
            return Err(err(
                format!("{key}.partition_key_field"),
                "only applies to partition_key = \"field\"",
            ));
        }
        (Some(other), _) => {
            return Err(err(
                format!("{key}.partition_key"),
                format!(
                    "unknown partition key {other:?}; the choices are \"random\", \"explicit\" and \"field\""
                ),
            ));
        }
        (None, Some(_)) => return Err(err(format!("{key}.partition_key_field"), "is empty")),
    };
    let aggregate = f.aggregate.unwrap_or(false);
    if aggregate && matches!(keymode, PartitionKey::Field(_)) {
        return Err(err(
            format!("{key}.aggregate"),
            "aggregation keys each aggregate to the shard it goes to, so it cannot take keys from a field (leave partition_key out)",
        ));
    }
    let compression = match f.compression.as_deref() {
        None | Some("none") => None,
        Some("gzip") => Some(crate::decode::Codec::Gzip),
        Some("zstd") => Some(crate::decode::Codec::Zstd),
        Some(other) => {
            return Err(err(
                format!("{key}.compression"),
                format!(
                    "unknown compression {other:?}; the choices are \"none\", \"gzip\" and \"zstd\""
                ),
            ));
        }
    };
    let max_record = bounded(
        &format!("{key}.max_record_bytes"),
        f.max_record_bytes,
        KINESIS_MAX_RECORD,
        1024,
        KINESIS_MAX_RECORD_CEILING,
    )?;
    let max_request = bounded(
        &format!("{key}.max_request_bytes"),
        f.max_request_bytes,
        KINESIS_MAX_REQUEST,
        1024,
        64 << 20,
    )?;
    if max_record > max_request {
        return Err(err(
            format!("{key}.max_record_bytes"),
            "is larger than max_request_bytes",
        ));
    }
    let headroom = f.shard_headroom.unwrap_or(DEFAULT_SHARD_HEADROOM);
    if !(headroom > 0.0 && headroom <= 1.0) {
        return Err(err(
            format!("{key}.shard_headroom"),
            format!("{headroom} is not in (0, 1]"),
        ));
    }
    let sink = KinesisSink {
        stream: f.stream,
        aws: aws(
            key,
            f.region,
            f.endpoint,
            f.role_arn,
            f.max_concurrency,
            f.request_timeout,
        )?,
        key: keymode,
        aggregate,
        compression,
        max_record,
        max_request,
        shard_refresh: f.shard_refresh.map_or(Duration::from_secs(60), |d| d.0),
        shard_headroom: headroom,
    };
    let limits = BatchLimits {
        max_bytes: max_request,
        linger: f.linger.map_or(AWS_LINGER, |d| d.0),
    };
    Ok((SinkKind::Kinesis(sink), limits))
}

fn firehose(key: &str, f: FirehoseFile) -> Result<(SinkKind, BatchLimits), ConfigError> {
    if f.delivery_stream.is_empty() {
        return Err(err(format!("{key}.delivery_stream"), "is empty"));
    }
    let packing = match f.line_packing {
        None => LinePacking::Auto,
        Some(Packing::On(true)) => LinePacking::On,
        Some(Packing::On(false)) => LinePacking::Off,
        Some(Packing::Word(w)) if w == "auto" => LinePacking::Auto,
        Some(Packing::Word(w)) => {
            return Err(err(
                format!("{key}.line_packing"),
                format!("{w:?} is not \"auto\", true or false"),
            ));
        }
    };
    let sink = FirehoseSink {
        delivery_stream: f.delivery_stream,
        aws: aws(
            key,
            f.region,
            f.endpoint,
            f.role_arn,
            f.max_concurrency,
            f.request_timeout,
        )?,
        packing,
    };
    let limits = BatchLimits {
        max_bytes: FIREHOSE_MAX_REQUEST,
        linger: f.linger.map_or(AWS_LINGER, |d| d.0),
    };
    Ok((SinkKind::Firehose(sink), limits))
}

/// Deserializes one table of the file, naming it in errors.
fn typed<T: DeserializeOwned>(key: &str, table: toml::Table) -> Result<T, ConfigError> {
    T::deserialize(toml::Value::Table(table))
        .map_err(|e| err(key, e.to_string().trim_end().to_string()))
}

/// The file's directory exists and is writable, or could be created: its nearest
/// existing ancestor is a writable directory.
fn writable_dir(path: &Path) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => at = Path::new("."),
        }
    }
    if !at.is_dir() {
        return Err(format!("{} is not a directory", at.display()));
    }
    if nix::unistd::access(at, nix::unistd::AccessFlags::W_OK).is_err() {
        return Err(match at == dir {
            true => format!("directory {} is not writable by this user", dir.display()),
            false => format!(
                "directory {} does not exist, and {} is not writable to create it",
                dir.display(),
                at.display()
            ),
        });
    }
    Ok(())
}

fn take_type(key: &str, table: &mut toml::Table) -> Result<String, ConfigError> {
    match table.remove("type") {
        Some(toml::Value::String(s)) => Ok(s),
        Some(_) => Err(err(format!("{key}.type"), "must be a string")),
        None => Err(err(format!("{key}.type"), "missing")),
    }
}

fn address(
    host: &Host,
    key: &str,
    s: Option<String>,
    port: u16,
) -> Result<SocketAddr, ConfigError> {
    let s = s.unwrap_or_else(|| format!("0.0.0.0:{port}"));
    (host.resolve)(&s).ok_or_else(|| {
        err(
            format!("{key}.address"),
            format!("{s:?} is not a host:port address"),
        )
    })
}

fn bounded(
    key: &str,
    v: Option<Size>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<usize, ConfigError> {
    let v = v.map_or(default, |s| s.0);
    if v < min || v > max {
        return Err(err(
            key,
            format!("{v} is out of range ({min} to {max} bytes)"),
        ));
    }
    Ok(v as usize)
}

const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Long: a client that sends without acks loses what it writes into a connection closed
/// under it, and quiet containers are common. Crowds of idle peers are met by closing the
/// longest idle one at `max_connections` instead.
const DEFAULT_IDLE: Duration = Duration::from_secs(3600);
/// A minute for a frame of at most `max_frame_bytes` (8 MiB: about 1 Mbit/s).
const DEFAULT_FRAME: Duration = Duration::from_secs(60);

fn timeout(
    key: &str,
    field: &str,
    v: Option<Dur>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = v.map_or(default, |d| d.0);
    if d < Duration::from_millis(100) || d > Duration::from_secs(7 * 24 * 3600) {
        return Err(err(
            format!("{key}.{field}"),
            format!(
                "{} is out of range (100ms to 7 days)",
                humantime::format_duration(d)
            ),
        ));
    }
    Ok(d)
}

/// Fluent Bit's `in_forward` holds 6 MB (`buffer_max_size`); Fluent Bit and Fluentd send
/// chunks of a few MB. Lower where half of `memory_limit` is smaller.
const DEFAULT_MAX_FRAME: u64 = 8 << 20;
const DEFAULT_MAX_DECOMPRESSED: u64 = 16 << 20;
/// Enough for 16 MiB of the smallest real events (a few fields, ~16 B each inflated), so
/// that no client's chunk is refused; a frame of empty events and 1 KiB tags then makes at
/// most about 1 GiB of output, written as the sinks take it (a frame pauses half-way).
const DEFAULT_MAX_EVENTS: u64 = 1_000_000;

/// Enough for full speed on two cores with 200 B events (README, "Memory").
pub const DEFAULT_MEMORY_LIMIT: u64 = 32 << 20;

fn validate(file: FileConfig, host: &Host) -> Result<Config, ConfigError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let e = file.engine;
    let workers = e.workers.unwrap_or(cores);
    if workers == 0 || workers > 1024 {
        return Err(err(
            "engine.workers",
            format!("{workers} is out of range (1 to 1024)"),
        ));
    }
    let ring_capacity = e.ring_capacity.unwrap_or(4);
    if ring_capacity == 0 || ring_capacity > 1024 {
        return Err(err(
            "engine.ring_capacity",
            format!("{ring_capacity} is out of range (1 to 1024)"),
        ));
    }
    let memory_limit = bounded(
        "engine.memory_limit",
        e.memory_limit,
        DEFAULT_MEMORY_LIMIT,
        1 << 20,
        1 << 40,
    )?;
    let dead_letter_dir = e
        .dead_letter_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/sluice/dead-letter"));
    let stats_interval = e.stats_interval.map_or(Duration::from_secs(60), |d| d.0);
    if stats_interval.is_zero() {
        return Err(err("engine.stats_interval", "must be more than zero"));
    }
    // The whole drain, from the signal to exit: inside ECS's 30 s stop timeout by default.
    let drain_timeout = e.drain_timeout.map_or(Duration::from_secs(25), |d| d.0);
    let input_grace = e.input_grace.map_or(Duration::from_secs(2), |d| d.0);
    if input_grace >= drain_timeout {
        return Err(err(
            "engine.input_grace",
            format!(
                "must be shorter than engine.drain_timeout ({}), which bounds the whole drain",
                humantime::format_duration(drain_timeout)
            ),
        ));
    }
    let engine = Engine {
        workers,
        stats_interval,
        input_grace,
        drain_timeout,
        ring_capacity,
        memory_limit,
        dead_letter_dir,
        log_format: e.log_format.unwrap_or_default(),
        io: e.io.unwrap_or_default(),
    };

    let wal = match file.wal {
        None => None,
        Some(w) => {
            (host.writable)(&w.dir.join("core-0")).map_err(|e| err("wal.dir", e))?;
            let sync_interval = w.sync_interval.map_or(Duration::from_millis(20), |d| d.0);
            if sync_interval.is_zero() || sync_interval > Duration::from_secs(10) {
                return Err(err(
                    "wal.sync_interval",
                    "must be more than zero and at most 10s",
                ));
            }
            Some(Wal {
                dir: w.dir,
                sync_interval,
                sync_bytes: bounded("wal.sync_bytes", w.sync_bytes, 1 << 20, 4096, 256 << 20)?,
                max_bytes: bounded("wal.max_bytes", w.max_bytes, 1 << 30, 1 << 20, 1 << 50)? as u64,
                full: w.full.unwrap_or_default(),
            })
        }
    };
    // A frame, a line and an inflated frame must each fit in the peers' share of the
    // budget (with one read's slack), or they could never be taken.
    let share = (memory_limit / crate::budget::PEER_SHARE) as u64;
    let fits = |key: &str, v: Option<Size>, (default, min, max): (u64, u64, u64), slack: u64| {
        let room = share.saturating_sub(slack);
        let v = bounded(key, v, default.min(room).max(min), min, max)?;
        if v as u64 > room {
            return Err(err(
                key,
                format!(
                    "{v} bytes do not fit in what connections may hold: half of engine.memory_limit ({share} bytes){}; raise engine.memory_limit or lower this",
                    if slack > 0 {
                        ", less 64 KiB for a read"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(v)
    };
    let read = crate::limits::READ_CHUNK as u64;
    let mut inputs = Vec::new();
    for (name, mut table) in file.inputs {
        let key = format!("inputs.{name}");
        let kind = take_type(&key, &mut table)?;
        let input = match kind.as_str() {
            "forward" => {
                let f: ForwardFile = typed(&key, table)?;
                let max_frame_bytes = fits(
                    &format!("{key}.max_frame_bytes"),
                    f.max_frame_bytes,
                    (DEFAULT_MAX_FRAME, 1024, MAX_FRAME_CEILING as u64),
                    read,
                )?;
                Input {
                    address: address(host, &key, f.address, crate::limits::FORWARD_PORT)?,
                    max_connections: f.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                    idle_timeout: timeout(&key, "idle_timeout", f.idle_timeout, DEFAULT_IDLE)?,
                    frame_timeout: timeout(&key, "frame_timeout", f.frame_timeout, DEFAULT_FRAME)?,
                    kind: InputKind::Forward {
                        max_frame_bytes,
                        max_decompressed_bytes: fits(
                            &format!("{key}.max_decompressed_bytes"),
                            f.max_decompressed_bytes,
                            (DEFAULT_MAX_DECOMPRESSED, 1024, 4 * MAX_FRAME_CEILING as u64),
                            0,
                        )?,
                        heartbeat: f.heartbeat.unwrap_or(true),
                        ack: match (f.ack, &wal) {
                            (Some(AckPolicy::Durable), None) => {
                                return Err(err(
                                    format!("{key}.ack"),
                                    "\"durable\" acks need a write-ahead log: add a [wal] section with a dir, or use \"delivered\"",
                                ));
                            }
                            (Some(a), _) => a,
                            (None, Some(_)) => AckPolicy::Durable,
                            (None, None) => AckPolicy::Delivered,
                        },
                        max_events_per_frame: match f
                            .max_events_per_frame
                            .unwrap_or(DEFAULT_MAX_EVENTS)
                        {
                            0 => {
                                return Err(err(
                                    format!("{key}.max_events_per_frame"),
                                    "must be at least 1",
                                ));
                            }
                            n => n,
                        },
                        max_unacked_bytes: bounded(
                            &format!("{key}.max_unacked_bytes"),
                            f.max_unacked_bytes,
                            64 << 20,
                            1024,
                            1 << 40,
                        )?,
                    },
                    name,
                }
            }
            "json_lines" => {
                let f: JsonLinesFile = typed(&key, table)?;
                let (tcp, udp) = (f.tcp.unwrap_or(true), f.udp.unwrap_or(true));
                if !tcp && !udp {
                    return Err(err(
                        &key,
                        "tcp and udp are both false, so the input would never listen",
                    ));
                }
                Input {
                    address: address(host, &key, f.address, crate::limits::JSON_LINES_PORT)?,
                    max_connections: f.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                    idle_timeout: timeout(&key, "idle_timeout", f.idle_timeout, DEFAULT_IDLE)?,
                    frame_timeout: timeout(&key, "frame_timeout", f.frame_timeout, DEFAULT_FRAME)?,
                    kind: InputKind::JsonLines {
                        tcp,
                        udp,
                        tag: f.tag.unwrap_or_else(|| name.clone()),
                        tag_key: f.tag_key,
                        max_line_bytes: fits(
                            &format!("{key}.max_line_bytes"),
                            f.max_line_bytes,
                            (1 << 20, 64, MAX_FRAME_CEILING as u64),
                            read + crate::limits::JSON_PADDING as u64,
                        )?,
                    },
                    name,
                }
            }
            "http" => {
                let f: HttpFile = typed(&key, table)?;
                Input {
                    address: address(host, &key, f.address, crate::limits::HTTP_PORT)?,
                    max_connections: f.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                    // Not used: hyper bounds a request head by its header_read_timeout.
                    idle_timeout: DEFAULT_IDLE,
                    frame_timeout: DEFAULT_FRAME,
                    kind: InputKind::Http {
                        max_body_bytes: bounded(
                            &format!("{key}.max_body_bytes"),
                            f.max_body_bytes,
                            8 << 20,
                            64,
                            MAX_FRAME_CEILING as u64,
                        )?,
                    },
                    name,
                }
            }
            other => {
                return Err(err(
                    format!("{key}.type"),
                    format!(
                        "unknown input type {other:?}; the input types are \"forward\", \"json_lines\" and \"http\""
                    ),
                ));
            }
        };
        if input.max_connections == 0 {
            return Err(err(format!("{key}.max_connections"), "must be at least 1"));
        }
        inputs.push(input);
    }
    if inputs.is_empty() {
        return Err(err(
            "inputs",
            "no inputs are defined, so nothing would be received",
        ));
    }
    // Two inputs on one port would share its listeners, each taking the other's traffic.
    for (i, a) in inputs.iter().enumerate() {
        for b in &inputs[i + 1..] {
            if a.address.port() != 0 && a.address.port() == b.address.port() {
                return Err(err(
                    format!("inputs.{}.address", b.name),
                    format!(
                        "port {} is already used by inputs.{}",
                        b.address.port(),
                        a.name
                    ),
                ));
            }
        }
    }

    let mut sinks = Vec::new();
    for (name, mut table) in file.sinks {
        let key = format!("sinks.{name}");
        let kind = take_type(&key, &mut table)?;
        let limits = |bytes: Option<Size>,
                      linger: Option<Dur>|
         -> Result<BatchLimits, ConfigError> {
            Ok(BatchLimits {
                max_bytes: bounded(&format!("{key}.batch_bytes"), bytes, 1 << 20, 1024, 1 << 30)?,
                linger: linger.map_or(Duration::from_millis(200), |d| d.0),
            })
        };
        let (kind, batch) = match kind.as_str() {
            "stdout" => {
                let f: StdoutFile = typed(&key, table)?;
                (SinkKind::Stdout, limits(f.batch_bytes, f.linger)?)
            }
            "file" => {
                let f: FileSinkFile = typed(&key, table)?;
                if f.path.as_os_str().is_empty() || f.path.file_name().is_none() {
                    return Err(err(format!("{key}.path"), "must name a file"));
                }
                if let Some(Size(0)) = f.rotate_bytes {
                    return Err(err(format!("{key}.rotate_bytes"), "must be more than zero"));
                }
                (host.writable)(&f.path).map_err(|e| err(format!("{key}.path"), e))?;
                let kind = SinkKind::File {
                    path: f.path,
                    rotate_bytes: f.rotate_bytes.map(|s| s.0),
                    rotate_age: f.rotate_age.map(|d| d.0),
                };
                (kind, limits(f.batch_bytes, f.linger)?)
            }
            "null" => {
                let f: NullFile = typed(&key, table)?;
                (SinkKind::Null, limits(f.batch_bytes, f.linger)?)
            }
            "kinesis" => {
                let f: KinesisFile = typed(&key, table)?;
                kinesis(&key, f)?
            }
            "firehose" => {
                let f: FirehoseFile = typed(&key, table)?;
                firehose(&key, f)?
            }
            other => {
                return Err(err(
                    format!("{key}.type"),
                    format!("unknown sink type {other:?}; the sink types are {SINK_TYPES}"),
                ));
            }
        };
        sinks.push(Sink {
            name,
            kind,
            batch,
            fallback: None,
        });
    }

    let mut routes = Vec::new();
    for (i, table) in file.routes.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        let f: RouteFile = typed(&key, table)?;
        let patterns: Vec<String> = match f.patterns {
            Patterns::One(s) => s.split_whitespace().map(str::to_string).collect(),
            Patterns::Many(v) => v
                .iter()
                .flat_map(|s| s.split_whitespace())
                .map(str::to_string)
                .collect(),
        };
        if patterns.is_empty() {
            return Err(err(format!("{key}.match"), "lists no patterns"));
        }
        for p in &patterns {
            crate::route::Pattern::check(p).map_err(|e| err(format!("{key}.match"), e))?;
        }
        let names = match f.sinks {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        if names.is_empty() {
            return Err(err(
                format!("{key}.sinks"),
                "lists no sinks; route to a \"null\" sink to drop events",
            ));
        }
        let mut idx = Vec::new();
        for (j, n) in names.iter().enumerate() {
            let Some(s) = sinks.iter().position(|s| &s.name == n) else {
                let known: Vec<&str> = sinks.iter().map(|s| s.name.as_str()).collect();
                return Err(err(
                    format!("{key}.sinks[{j}]"),
                    format!(
                        "no sink is named {n:?} (the sinks are: {})",
                        known.join(", ")
                    ),
                ));
            };
            if idx.contains(&s) {
                return Err(err(
                    format!("{key}.sinks[{j}]"),
                    format!("sink {n:?} is listed twice"),
                ));
            }
            idx.push(s);
        }
        let format = match (f.format.as_deref(), &f.log_key) {
            (None, Some(_)) | (Some("text"), Some(_)) => Format::Text,
            (Some("text"), None) => {
                return Err(err(
                    format!("{key}.log_key"),
                    "format = \"text\" needs the field to write",
                ));
            }
            (None | Some("json"), None) => Format::Json,
            (Some("msgpack"), None) => Format::Msgpack,
            (Some("json" | "msgpack"), Some(_)) => {
                return Err(err(
                    format!("{key}.log_key"),
                    "only applies to format = \"text\"",
                ));
            }
            (Some(other), _) => {
                return Err(err(
                    format!("{key}.format"),
                    format!(
                        "unknown format {other:?}; the formats are \"json\", \"msgpack\" and \"text\""
                    ),
                ));
            }
        };
        let time_format = match f.time_format.as_deref() {
            None | Some("iso8601") => TimeFormat::Iso8601,
            Some("double") => TimeFormat::Double,
            Some("epoch") => TimeFormat::Epoch,
            Some(other) => {
                return Err(err(
                    format!("{key}.time_format"),
                    format!(
                        "unknown time format {other:?}; the formats are \"iso8601\", \"double\" and \"epoch\""
                    ),
                ));
            }
        };
        if f.time_format.is_some() && f.time_key.is_none() {
            return Err(err(
                format!("{key}.time_format"),
                "has no effect without time_key",
            ));
        }
        let mut add_fields = Vec::new();
        for (k, v) in f.add_fields {
            let lit = match v {
                toml::Value::String(s) => Literal::Str(s),
                toml::Value::Integer(i) => Literal::Int(i),
                toml::Value::Float(x) => Literal::Float(x),
                toml::Value::Boolean(b) => Literal::Bool(b),
                _ => {
                    return Err(err(
                        format!("{key}.add_fields.{k}"),
                        "must be a string, number or boolean",
                    ));
                }
            };
            add_fields.push((k, lit));
        }
        if let Some(fb) = &f.fallback {
            let Some(target) = sinks.iter().position(|s| &s.name == fb) else {
                return Err(err(
                    format!("{key}.fallback"),
                    format!("no sink is named {fb:?}"),
                ));
            };
            if !matches!(
                sinks[target].kind,
                SinkKind::Stdout | SinkKind::File { .. } | SinkKind::Null
            ) {
                return Err(err(
                    format!("{key}.fallback"),
                    format!(
                        "{fb:?} is not a stdout, file or null sink; a fallback must not fail in turn"
                    ),
                ));
            }
            for &i in &idx {
                if i == target {
                    return Err(err(
                        format!("{key}.fallback"),
                        format!("{fb:?} is also one of the route's sinks"),
                    ));
                }
                match sinks[i].fallback {
                    Some(other) if other != target => {
                        return Err(err(
                            format!("{key}.fallback"),
                            format!(
                                "sink {:?} already falls back to {:?} on another route; a sink has one fallback",
                                sinks[i].name, sinks[other].name
                            ),
                        ));
                    }
                    _ => sinks[i].fallback = Some(target),
                }
            }
        }
        routes.push(Route {
            patterns,
            sinks: idx,
            shape: ShapeConfig {
                format,
                tag_key: f.tag_key,
                time_key: f.time_key,
                time_format,
                log_key: f.log_key,
                remove_keys: f.remove_keys,
                add_fields,
            },
        });
    }
    if routes.is_empty() {
        return Err(err(
            "routes",
            "no routes are defined, so every event would be dropped",
        ));
    }
    for s in &sinks {
        let used = routes
            .iter()
            .any(|r| r.sinks.iter().any(|&i| sinks[i].name == s.name));
        if !used {
            tracing::warn!(sink = %s.name, "Sink is not used by any route");
        }
    }
    Ok(Config {
        engine,
        inputs,
        sinks,
        routes,
        wal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(s: &str) -> String {
        Config::parse(s).unwrap_err().to_string()
    }

    const MIN: &str = r#"
[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"
[sinks.out]
type = "stdout"
[[routes]]
match = "**"
sinks = "out"
"#;

    #[test]
    fn the_embedded_default_is_valid() {
        let c = Config::default_config();
        let ports: Vec<u16> = c.inputs.iter().map(|i| i.address.port()).collect();
        assert_eq!(ports, [24224, 9880, 5170], "forward, http, json");
    }

    /// The pure host resolves no names and checks no directories; the system's does both.
    #[test]
    fn the_pure_host_asks_nothing_of_the_machine() {
        let named = MIN.replace("127.0.0.1:0", "localhost:0");
        assert!(Config::parse(&named).is_ok());
        let e = Config::parse_on(&named, &Host::PURE).unwrap_err();
        assert_eq!(e.key, "inputs.fwd.address");
        let unwritable = format!("{MIN}[wal]\ndir = \"/etc/hostname/wal\"\n");
        assert_eq!(Config::parse(&unwritable).unwrap_err().key, "wal.dir");
        assert!(Config::parse_on(&unwritable, &Host::PURE).is_ok());
    }

    #[test]
    fn errors_name_the_key() {
        assert!(Config::parse(MIN).is_ok());
        let e = parse_err(&MIN.replace("address", "adress"));
        assert!(e.starts_with("inputs.fwd: unknown field `adress`"), "{e}");
        let e = parse_err(&MIN.replace("sinks = \"out\"", "sinks = [\"out\", \"nope\"]"));
        assert!(
            e.starts_with("routes[0].sinks[1]: no sink is named \"nope\""),
            "{e}"
        );
        let e = parse_err(&MIN.replace("\"stdout\"", "\"s3\""));
        assert!(
            e.starts_with("sinks.out.type: unknown sink type \"s3\""),
            "{e}"
        );
        let e = parse_err(&format!("{MIN}\n[engine]\nworkers = 0\n"));
        assert!(e.starts_with("engine.workers:"), "{e}");
        let e = parse_err(&MIN.replace("127.0.0.1:0", "nowhere"));
        assert!(e.starts_with("inputs.fwd.address:"), "{e}");
        let e = parse_err(&format!("{MIN}format = \"text\"\n"));
        assert!(e.starts_with("routes[0].log_key:"), "{e}");
        let e = parse_err(&format!(
            "{MIN}\n[sinks.f]\ntype = \"file\"\npath = \"/tmp/x\"\nlinger = \"soon\"\n"
        ));
        assert!(
            e.starts_with("sinks.f:") && e.contains("invalid duration"),
            "{e}"
        );
        let e = parse_err("inputs = 3");
        assert!(e.starts_with("config:") && e.contains("line 1"), "{e}");
        let e = parse_err(&format!("{MIN}\n[engine]\nlog_format = \"xml\"\n"));
        assert!(
            e.contains("unknown variant `xml`, expected `text` or `json`"),
            "{e}"
        );
        let c = Config::parse(&format!("{MIN}\n[engine]\nlog_format = \"json\"\n")).unwrap();
        assert_eq!(c.engine.log_format, LogFormat::Json);
        assert_eq!(
            Config::parse(MIN).unwrap().engine.log_format,
            LogFormat::Text
        );
        let e = parse_err(&format!("{MIN}\n[engine]\ninput_grace = \"30s\"\n"));
        assert!(
            e.contains("engine.input_grace")
                && e.contains("shorter than engine.drain_timeout (25s)"),
            "{e}"
        );
        let e = parse_err(&format!("{MIN}\n[engine]\nio = \"kqueue\"\n"));
        assert!(
            e.contains("unknown variant `kqueue`, expected one of `auto`, `uring`, `epoll`"),
            "{e}"
        );
        assert_eq!(Config::parse(MIN).unwrap().engine.io, IoBackend::Auto);
    }

    /// Frames, lines and inflated frames must fit in half of memory_limit; the defaults
    /// shrink to fit it.
    #[test]
    fn input_limits_fit_in_the_peers_share() {
        let small = |extra: &str| {
            MIN.replace(
                "address = \"127.0.0.1:0\"",
                &format!("address = \"127.0.0.1:0\"\n{extra}"),
            ) + "[engine]\nmemory_limit = \"8MiB\"\n"
        };
        let e = parse_err(&small("max_frame_bytes = \"4MiB\""));
        assert!(
            e.starts_with("inputs.fwd.max_frame_bytes: 4194304 bytes do not fit")
                && e.contains("half of engine.memory_limit (4194304 bytes), less 64 KiB"),
            "{e}"
        );
        let e = parse_err(&small("max_decompressed_bytes = \"5MiB\""));
        assert!(e.starts_with("inputs.fwd.max_decompressed_bytes:"), "{e}");
        let c = Config::parse(&small("")).unwrap();
        let InputKind::Forward {
            max_frame_bytes,
            max_decompressed_bytes,
            ..
        } = c.inputs[0].kind
        else {
            panic!("a forward input")
        };
        assert_eq!(
            (max_frame_bytes, max_decompressed_bytes),
            ((4 << 20) - (64 << 10), 4 << 20)
        );
        let c = Config::parse(MIN).unwrap();
        assert!(matches!(
            c.inputs[0].kind,
            InputKind::Forward {
                max_frame_bytes: 0x80_0000,
                max_decompressed_bytes: 0x100_0000,
                ..
            }
        ));
    }

    #[test]
    fn file_sinks_need_a_directory_they_can_write() {
        let cfg = |path: &str| {
            format!(
                "[inputs.f]\ntype = \"forward\"\n[sinks.f]\ntype = \"file\"\npath = {path:?}\n\
                 [[routes]]\nmatch = \"**\"\nsinks = \"f\"\n"
            )
        };
        let file = std::env::current_exe().unwrap();
        let under_a_file = file.join("logs/out.ndjson");
        let e = parse_err(&cfg(under_a_file.to_str().unwrap()));
        assert!(
            e.contains("sinks.f.path") && e.contains("is not a directory"),
            "{e}"
        );
        let dir = std::env::temp_dir().join("sluice-new-dir/out.ndjson");
        assert!(Config::parse(&cfg(dir.to_str().unwrap())).is_ok());
        let e = parse_err(&cfg("/tmp/x").replace("match = \"**\"", "match = \"a.{b\""));
        assert!(
            e.contains("routes[0].match") && e.contains("unclosed"),
            "{e}"
        );
    }

    #[test]
    fn sizes_and_patterns() {
        assert_eq!(parse_size("8MiB"), Some(8 << 20));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("1 PB"), None);
        let c = Config::parse(&MIN.replace("match = \"**\"", "match = \"a.* b.**\"")).unwrap();
        assert_eq!(c.routes[0].patterns, ["a.*", "b.**"]);
    }
}
