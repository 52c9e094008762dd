//! The dead-letter directory: records a service refused for good, one file per batch, with
//! the reason. `<dir>/<sink>/<UTC time>-<n>.jsonl` holds a header line, then one line per
//! record with its partition key, explicit hash key and its bytes in base64, so it can be
//! read or sent again later.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::batch::{Batch, Record};

/// Writes `records` of `batch` with `reason`; returns the file written. `seq` keeps the
/// names of files written within one second apart.
pub fn write(
    dir: &Path,
    sink: &str,
    reason: &str,
    batch: &Batch,
    records: &[Record],
    seq: u64,
) -> std::io::Result<PathBuf> {
    let dir = dir.join(sink);
    std::fs::create_dir_all(&dir)?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let stamp: String = String::from_utf8_lossy(&crate::batch::json::civil(secs))
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let path = dir.join(format!("{stamp}Z-{}-{seq}.jsonl", std::process::id()));
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"sink\":");
    crate::batch::json::write_str(&mut out, sink.as_bytes());
    out.extend_from_slice(b",\"reason\":");
    crate::batch::json::write_str(&mut out, reason.as_bytes());
    out.extend_from_slice(b",\"records\":");
    crate::batch::json::write_u64(&mut out, records.len() as u64);
    out.extend_from_slice(b"}\n");
    for r in records {
        out.extend_from_slice(b"{\"partition_key\":");
        crate::batch::json::write_str(&mut out, batch.key_of(r).as_bytes());
        if let Some(h) = r.hash {
            out.extend_from_slice(b",\"explicit_hash_key\":\"");
            out.extend_from_slice(itoa::Buffer::new().format(h).as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b",\"events\":");
        crate::batch::json::write_u64(&mut out, r.events as u64);
        out.extend_from_slice(b",\"data\":\"");
        out.extend_from_slice(aws_smithy_types::base64::encode(batch.data_of(r)).as_bytes());
        out.extend_from_slice(b"\"}\n");
    }
    let tmp = path.with_extension("part");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&out)?;
    f.sync_data()?;
    // Complete files only: a crash mid-write leaves a .part, never a short .jsonl.
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
