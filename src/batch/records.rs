//! The pieces of request-shaped batches: how a sink frames events into records, random
//! partition keys, protobuf varints for KPL aggregation, and per-record compression with
//! reused contexts.

use std::io::Write;

use crate::config::{
    FIREHOSE_MAX_RECORD, FIREHOSE_MAX_REQUEST, KINESIS_MAX_RECORD, KINESIS_MAX_REQUEST,
};
use crate::decode::Codec;

/// The KPL aggregated record's magic prefix.
/// <https://github.com/awslabs/amazon-kinesis-producer/blob/master/aggregation-format.md>
pub const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// PutRecords and PutRecordBatch take at most this many records.
pub const MAX_RECORDS: usize = 500;

/// How a sink's batches hold events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Local sinks: events back to back, no records.
    Stream,
    /// Request-shaped: records within a service's limits.
    Records(RecordFraming),
}

/// A service's record and request limits, and how events become records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordFraming {
    /// Largest record, data plus partition key.
    pub max_record: usize,
    /// Largest request, data plus partition keys.
    pub max_request: usize,
    pub keys: KeyMode,
    pub shape: RecordShape,
    pub compression: Option<Codec>,
}

impl RecordFraming {
    /// PutRecords at the default limits: a record per event, random partition keys.
    pub const KINESIS: Self = Self {
        max_record: KINESIS_MAX_RECORD as usize,
        max_request: KINESIS_MAX_REQUEST as usize,
        keys: KeyMode::Random,
        shape: RecordShape::Single,
        compression: None,
    };
    /// PutRecordBatch with lines packed into records.
    pub const FIREHOSE: Self = Self {
        max_record: FIREHOSE_MAX_RECORD,
        max_request: FIREHOSE_MAX_REQUEST,
        keys: KeyMode::None,
        shape: RecordShape::Lines,
        compression: None,
    };
}

/// How events are grouped into records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordShape {
    /// One event per record.
    Single,
    /// Newline-terminated events packed into records up to the record limit (Firehose).
    Lines,
    /// KPL aggregated records, each sent to one shard (Kinesis).
    Aggregated,
}

/// Where a record's partition key comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyMode {
    /// No keys (Firehose).
    None,
    /// A random key per record.
    Random,
    /// A random key, and an explicit hash key that spreads records over the shards.
    Explicit,
    /// A record field's value (random when missing).
    Field,
}

/// Longest partition key Kinesis takes, in characters.
pub const MAX_KEY_CHARS: usize = 256;

/// Whether `key` can be a partition key: 1 to 256 characters of UTF-8.
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty()
        && match std::str::from_utf8(key) {
            Ok(s) => key.len() <= MAX_KEY_CHARS || s.chars().count() <= MAX_KEY_CHARS,
            Err(_) => false,
        }
}

/// The length of a random partition key.
pub const RANDOM_KEY_LEN: usize = 32;

/// A fast, non-cryptographic generator for keys and hash spreading (xorshift64*).
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn next_u128(&mut self) -> u128 {
        ((self.next_u64() as u128) << 64) | self.next_u64() as u128
    }

    /// Writes a random partition key: `RANDOM_KEY_LEN` hex digits.
    pub fn key(&mut self, out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for _ in 0..2 {
            let mut x = self.next_u64();
            for _ in 0..16 {
                out.push(HEX[(x & 15) as usize]);
                x >>= 4;
            }
        }
    }
}

/// Bytes a protobuf varint of `v` takes.
#[inline]
pub fn varint_len(v: usize) -> usize {
    let bits = usize::BITS - (v | 1).leading_zeros();
    bits.div_ceil(7) as usize
}

/// Writes `v` as a protobuf varint into `out`, which must be exactly `varint_len(v)` long.
#[inline]
pub fn put_varint(out: &mut [u8], mut v: usize) {
    let n = out.len();
    for (i, b) in out.iter_mut().enumerate() {
        *b = (v & 0x7f) as u8 | if i + 1 < n { 0x80 } else { 0 };
        v >>= 7;
    }
}

/// Appends `v` as a protobuf varint.
pub fn push_varint(out: &mut Vec<u8>, v: usize) {
    let at = out.len();
    out.resize(at + varint_len(v), 0);
    put_varint(&mut out[at..], v);
}

/// Compresses records in place, reusing its contexts: no allocation per record.
pub struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    deflate: flate2::Compress,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("codec", &self.codec)
            .finish()
    }
}

/// A gzip member's header: no name, no time, unknown OS (RFC 1952).
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

impl Compressor {
    pub fn new(codec: Codec) -> Self {
        Compressor {
            codec,
            zstd: match codec {
                Codec::Zstd => zstd::bulk::Compressor::new(3).ok(),
                Codec::Gzip => None,
            },
            deflate: flate2::Compress::new(flate2::Compression::fast(), false),
            scratch: Vec::new(),
        }
    }

    /// Replaces `data[from..]` with its compressed form. If the codec fails (it cannot on
    /// memory buffers), the bytes stay as they were.
    pub fn compress_tail(&mut self, data: &mut Vec<u8>, from: usize) {
        self.scratch.clear();
        let input = &data[from..];
        let ok = match self.codec {
            Codec::Zstd => match &mut self.zstd {
                Some(z) => {
                    self.scratch
                        .reserve(zstd::zstd_safe::compress_bound(input.len()));
                    z.compress_to_buffer(input, &mut self.scratch).is_ok()
                }
                None => false,
            },
            Codec::Gzip => self.gzip(from, data),
        };
        if ok {
            data.truncate(from);
            data.extend_from_slice(&self.scratch);
        }
    }

    fn gzip(&mut self, from: usize, data: &[u8]) -> bool {
        let input = &data[from..];
        self.deflate.reset();
        self.scratch.extend_from_slice(&GZIP_HEADER);
        // Deflate's worst case is a few bytes per 64 KiB block over the input.
        self.scratch.reserve(input.len() + input.len() / 1000 + 64);
        let status =
            self.deflate
                .compress_vec(input, &mut self.scratch, flate2::FlushCompress::Finish);
        if !matches!(status, Ok(flate2::Status::StreamEnd)) {
            return false;
        }
        let mut crc = flate2::Crc::new();
        crc.update(input);
        let _ = self.scratch.write_all(&crc.sum().to_le_bytes());
        let _ = self.scratch.write_all(&(input.len() as u32).to_le_bytes());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn varints_match_protobuf() {
        for (v, bytes) in [
            (0usize, &[0x00u8][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
        ] {
            let mut out = vec![];
            push_varint(&mut out, v);
            assert_eq!(out, bytes, "{v}");
            assert_eq!(varint_len(v), bytes.len());
        }
    }

    #[test]
    fn compresses_in_place_with_both_codecs() {
        let text = b"{\"log\":\"hello hello hello hello\"}\n".repeat(50);
        for codec in [Codec::Gzip, Codec::Zstd] {
            let mut c = Compressor::new(codec);
            for _ in 0..3 {
                let mut data = b"prefix".to_vec();
                data.extend_from_slice(&text);
                c.compress_tail(&mut data, 6);
                assert_eq!(&data[..6], b"prefix");
                assert!(data.len() < 6 + text.len() / 4, "{codec}: {}", data.len());
                let mut back = vec![];
                match codec {
                    Codec::Gzip => flate2::read::GzDecoder::new(&data[6..])
                        .read_to_end(&mut back)
                        .map(drop),
                    Codec::Zstd => zstd::stream::read::Decoder::new(&data[6..])
                        .and_then(|mut d| d.read_to_end(&mut back))
                        .map(drop),
                }
                .unwrap();
                assert_eq!(back, text);
            }
        }
    }

    #[test]
    fn keys_are_valid_and_random() {
        let mut r = Rng::new(7);
        let (mut a, mut b) = (vec![], vec![]);
        r.key(&mut a);
        r.key(&mut b);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(valid_key(&a));
        assert!(!valid_key(b""));
        assert!(!valid_key(&[0xff]));
        assert!(valid_key("é".repeat(256).as_bytes()));
        assert!(!valid_key("é".repeat(257).as_bytes()));
    }
}
