//! Dead-letter replay (`sluice dlq list|replay`): reads the files `dead` writes and sends
//! their records again, with their partition and explicit hash keys, through the sink's
//! own SDK client, once the cause is fixed. A file is removed only when every one of its
//! records is accepted; one the service still refuses stays, and the command says why.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::{Config, SinkKind};

/// One dead-letter file, read.
pub struct DeadFile {
    pub path: PathBuf,
    pub sink: String,
    pub reason: String,
    pub records: Vec<DeadRecord>,
}

pub struct DeadRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

/// The complete dead-letter files of `sink` (or of every sink), oldest first, written at
/// or after `since`.
pub fn files(
    dir: &Path,
    sink: Option<&str>,
    since: Option<SystemTime>,
) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let sinks = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for s in sinks {
        let s = s?;
        if sink.is_some_and(|want| s.file_name().to_str() != Some(want)) || !s.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(s.path())? {
            let p = f?.path();
            if p.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            let mtime = std::fs::metadata(&p)?.modified()?;
            if since.is_none_or(|t| mtime >= t) {
                out.push((mtime, p));
            }
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

fn str_field(v: &simd_json::OwnedValue, k: &str) -> Option<String> {
    use simd_json::prelude::*;
    v.get(k).and_then(|s| s.as_str()).map(str::to_string)
}

/// Reads a dead-letter file: its header line, then one line per record.
pub fn read(path: &Path) -> Result<DeadFile, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |line: usize, what: &str| format!("{}:{line}: {what}", path.display());
    let mut lines = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate();
    let parse = |l: &[u8]| simd_json::to_owned_value(&mut l.to_vec()).ok();
    let (_, head) = lines.next().ok_or_else(|| bad(1, "empty"))?;
    let head = parse(head).ok_or_else(|| bad(1, "not JSON"))?;
    let mut file = DeadFile {
        path: path.to_owned(),
        sink: str_field(&head, "sink").ok_or_else(|| bad(1, "no sink"))?,
        reason: str_field(&head, "reason").unwrap_or_default(),
        records: Vec::new(),
    };
    for (i, l) in lines {
        let v = parse(l).ok_or_else(|| bad(i + 1, "not JSON"))?;
        let data = str_field(&v, "data").ok_or_else(|| bad(i + 1, "no data"))?;
        file.records.push(DeadRecord {
            partition_key: str_field(&v, "partition_key").unwrap_or_default(),
            explicit_hash_key: str_field(&v, "explicit_hash_key"),
            data: aws_smithy_types::base64::decode(&data).map_err(|_| bad(i + 1, "bad base64"))?,
        });
    }
    Ok(file)
}

/// Sends a file's records to its sink, resending those the service fails (a throttle, a
/// moment's error) up to a few times. Returns how many were sent; the file is removed.
pub async fn replay(cfg: &Config, file: &DeadFile) -> Result<usize, String> {
    let sink = cfg
        .sinks
        .iter()
        .find(|s| s.name == file.sink)
        .ok_or_else(|| format!("the config has no sink {:?} to send to", file.sink))?;
    enum Client {
        Kinesis(super::aws::Kinesis),
        Firehose(super::aws::Firehose),
    }
    let client = match &sink.kind {
        SinkKind::Kinesis(k) => Client::Kinesis(super::aws::Kinesis::new(k).await?),
        SinkKind::Firehose(f) => Client::Firehose(super::aws::Firehose::new(f).await?),
        _ => {
            return Err(format!(
                "sink {} is not a Kinesis or Firehose sink",
                sink.name
            ));
        }
    };
    let mut pending: Vec<&DeadRecord> = file.records.iter().collect();
    let mut attempt = 0;
    while !pending.is_empty() {
        let mut failed = Vec::new();
        let mut last = String::new();
        // The services' request limits: 500 records, and 5 MiB (Kinesis) or 4 MiB.
        let mut start = 0;
        while start < pending.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < pending.len()
                && end - start < 500
                && bytes + pending[end].data.len() + 256 <= 4 << 20
            {
                bytes += pending[end].data.len() + pending[end].partition_key.len();
                end += 1;
            }
            let end = end.max(start + 1);
            let part = &pending[start..end];
            let codes = match &client {
                Client::Kinesis(k) => k.put_sdk(part).await?,
                Client::Firehose(f) => f.put_sdk(part).await?,
            };
            for (r, code) in part.iter().zip(codes) {
                if let Some(code) = code {
                    last = code;
                    failed.push(*r);
                }
            }
            start = end;
        }
        pending = failed;
        attempt += 1;
        if !pending.is_empty() {
            if attempt == 8 {
                return Err(format!(
                    "{} of {} records still fail ({last}); the file is kept",
                    pending.len(),
                    file.records.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }
    std::fs::remove_file(&file.path).map_err(|e| format!("{}: {e}", file.path.display()))?;
    Ok(file.records.len())
}
