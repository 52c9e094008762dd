//! Decode stage: sans-I/O decoders that turn bytes from a connection into borrowed events.
//!
//! Decoders take `&[u8]` and return a frame, "need more", or a small `Copy` error. They
//! own no socket and allocate nothing per event; the same functions serve the connection
//! loop, tests, fuzz targets and benchmarks.

pub mod forward;
pub mod http;
pub mod jsonl;
pub mod msgpack;

use thiserror::Error;

/// An event's timestamp: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventTime {
    pub secs: i64,
    pub nanos: u32,
}

impl EventTime {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        EventTime {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

/// Compression of CompressedPackedForward entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Zstd,
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
        })
    }
}

/// Why input was refused. Each variant is one counter; the message says what was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("frame is not a msgpack array of 2 to 4 elements (first byte {0:#04x})")]
    NotAFrame(u8),
    #[error("frame ends inside a value")]
    Truncated,
    #[error("invalid msgpack marker 0xc1")]
    Reserved,
    #[error("frame is larger than max_frame_bytes ({0} bytes)")]
    FrameTooLarge(usize),
    #[error("tag is not a UTF-8 string (marker {0:#04x})")]
    BadTag(u8),
    #[error("tag is longer than {} bytes", crate::limits::MAX_TAG)]
    TagTooLong,
    #[error("second element is not a time, an entries array or packed entries (marker {0:#04x})")]
    BadMode(u8),
    #[error("event time is not an integer, float or EventTime (marker {0:#04x})")]
    BadTime(u8),
    #[error("event time has ext type {0}, but EventTime is ext type 0 with 8 bytes")]
    BadExtType(i8),
    #[error("entry is not a [time, record] pair (marker {0:#04x})")]
    BadEntry(u8),
    #[error("record is not a map (marker {0:#04x})")]
    BadRecord(u8),
    #[error("nesting is deeper than {} levels", crate::limits::MAX_DEPTH)]
    TooDeep,
    #[error("option is not a map or nil (marker {0:#04x})")]
    BadOption(u8),
    #[error("option `{0}` has the wrong type")]
    BadOptionValue(&'static str),
    #[error("option `chunk` is longer than {} bytes", crate::limits::MAX_CHUNK_ID)]
    ChunkTooLong,
    #[error("option `compressed` names a codec other than gzip or zstd")]
    UnknownCompression,
    #[error("option `size` is {expected} but the frame holds {actual} events")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("{0} entries do not decompress")]
    Decompress(Codec),
    #[error("decompressed entries exceed max_decompressed_bytes ({0} bytes)")]
    DecompressedTooLarge(usize),
    #[error("line is not valid JSON")]
    InvalidJson,
    #[error("line is JSON but not an object")]
    NotAnObject,
    #[error("line is longer than max_line_bytes ({0} bytes)")]
    LineTooLong(usize),
    #[error("bytes follow the records")]
    Trailing,
    #[error("frame holds more than max_events_per_frame ({0}) events")]
    TooManyEvents(u64),
}

impl DecodeError {
    /// Counter names, indexed by [`DecodeError::index`].
    pub const NAMES: [&'static str; 24] = [
        "not_a_frame",
        "truncated",
        "reserved_marker",
        "frame_too_large",
        "bad_tag",
        "bad_mode",
        "bad_time",
        "bad_ext_type",
        "bad_entry",
        "bad_record",
        "too_deep",
        "bad_option",
        "bad_option_value",
        "chunk_too_long",
        "unknown_compression",
        "size_mismatch",
        "decompress",
        "decompressed_too_large",
        "invalid_json",
        "not_an_object",
        "line_too_long",
        "tag_too_long",
        "trailing",
        "too_many_events",
    ];

    pub fn index(&self) -> usize {
        match self {
            DecodeError::NotAFrame(_) => 0,
            DecodeError::Truncated => 1,
            DecodeError::Reserved => 2,
            DecodeError::FrameTooLarge(_) => 3,
            DecodeError::BadTag(_) => 4,
            DecodeError::BadMode(_) => 5,
            DecodeError::BadTime(_) => 6,
            DecodeError::BadExtType(_) => 7,
            DecodeError::BadEntry(_) => 8,
            DecodeError::BadRecord(_) => 9,
            DecodeError::TooDeep => 10,
            DecodeError::BadOption(_) => 11,
            DecodeError::BadOptionValue(_) => 12,
            DecodeError::ChunkTooLong => 13,
            DecodeError::UnknownCompression => 14,
            DecodeError::SizeMismatch { .. } => 15,
            DecodeError::Decompress(_) => 16,
            DecodeError::DecompressedTooLarge(_) => 17,
            DecodeError::InvalidJson => 18,
            DecodeError::NotAnObject => 19,
            DecodeError::LineTooLong(_) => 20,
            DecodeError::TagTooLong => 21,
            DecodeError::Trailing => 22,
            DecodeError::TooManyEvents(_) => 23,
        }
    }

    pub fn name(&self) -> &'static str {
        Self::NAMES[self.index()]
    }
}

impl From<msgpack::Error> for DecodeError {
    fn from(e: msgpack::Error) -> Self {
        match e {
            msgpack::Error::Truncated => DecodeError::Truncated,
            msgpack::Error::Reserved => DecodeError::Reserved,
            msgpack::Error::TooDeep => DecodeError::TooDeep,
        }
    }
}

/// What serde_json should read back from our transcoding of a msgpack value (tests only).
#[cfg(test)]
pub(crate) fn msgpack_to_json(v: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value;
    use serde_json::Value as J;
    match v {
        Value::Nil => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Integer(i) => match i.as_u64() {
            Some(u) => J::from(u),
            None => J::from(i.as_i64().expect("an integer is u64 or i64")),
        },
        Value::F32(f) => J::from(*f as f64),
        Value::F64(f) => J::from(*f),
        Value::String(s) => J::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Value::Binary(b) => J::String(String::from_utf8_lossy(b).into_owned()),
        Value::Array(a) => J::Array(a.iter().map(msgpack_to_json).collect()),
        Value::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k.as_str().unwrap_or_default().as_bytes())
                            .into_owned(),
                        msgpack_to_json(v),
                    )
                })
                .collect(),
        ),
        Value::Ext(..) => J::Null,
    }
}
