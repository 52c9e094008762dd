//! Forward protocol v1: frame boundaries, the four modes, options and events.
//!
//! [`Decoder::decode`] finds one frame in a byte stream that arrives in pieces and
//! validates it whole: every entry, the `size` option, the nesting depth. Only then does
//! the caller iterate its events, so a bad frame is refused before any of it is routed.
//! Events borrow the connection's buffer (or, for CompressedPackedForward, the buffer the
//! entries were inflated into).
//!
//! Spec: <https://github.com/fluent/fluentd/wiki/Forward-Protocol-Specification-v1>

use std::io::Read;

use super::msgpack::{Head, Reader, Scan, ScanError, Step};
use super::{Codec, DecodeError, EventTime};
use crate::limits::{EVENT_TIME_EXT, MAX_CHUNK_ID};

/// One event: its time and its record, a msgpack map still in wire form.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Event<'a> {
    pub time: EventTime,
    pub record: &'a [u8],
}

/// The entries of a frame.
#[derive(Clone, Copy, Debug)]
pub enum Entries<'a> {
    /// Message mode: a single event.
    Message(Event<'a>),
    /// Forward and PackedForward modes: concatenated `[time, record]` entries, validated.
    /// CompressedPackedForward: the compressed bytes, validated once inflated.
    Stream {
        body: &'a [u8],
        codec: Option<Codec>,
    },
}

/// A decoded, validated frame.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub tag: &'a str,
    pub entries: Entries<'a>,
    /// The `chunk` option: reply `{"ack": chunk}` once the events are safe.
    pub chunk: Option<&'a [u8]>,
    /// The `size` option, if the client sent one.
    pub size: Option<u64>,
}

/// The result of one [`Decoder::decode`] call.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A frame and the number of bytes it spans.
    Frame(Frame<'a>, usize),
    /// A lone `nil`, which Fluentd tolerates as a keepalive; skip one byte.
    Keepalive,
    /// Not a whole frame yet: at least this many bytes are needed.
    NeedMore(usize),
}

/// Finds and validates frames in a connection's byte stream.
#[derive(Debug)]
pub struct Decoder {
    scan: Scan,
    max_frame: usize,
}

impl Decoder {
    pub fn new(max_frame: usize) -> Self {
        Decoder {
            scan: Scan::default(),
            max_frame,
        }
    }

    /// Decodes the frame at the start of `buf`. Between calls `buf` must keep starting at
    /// the same frame, with more bytes appended; after a frame, the caller drops its bytes.
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Decoded<'a>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(Decoded::NeedMore(1));
        };
        match first {
            0xc0 => return Ok(Decoded::Keepalive),
            // fixarray of 2 to 4 elements, or array16/array32 (checked in full below)
            0x92..=0x94 | 0xdc | 0xdd => {}
            _ => return Err(DecodeError::NotAFrame(first)),
        }
        match self.scan.resume(buf, self.max_frame) {
            Ok(Step::Complete(n)) => Ok(Decoded::Frame(parse_frame(&buf[..n])?, n)),
            Ok(Step::Need(n)) => Ok(Decoded::NeedMore(n)),
            Err(ScanError::Reserved) => {
                self.scan.reset();
                Err(DecodeError::Reserved)
            }
            Err(ScanError::TooLarge) => {
                self.scan.reset();
                Err(DecodeError::FrameTooLarge(self.max_frame))
            }
        }
    }
}

/// Parses and validates one complete frame.
pub fn parse_frame(frame: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let mut r = Reader::new(frame);
    let first = r.peek().unwrap_or(0);
    let n = match r.head()? {
        Head::Array(n @ 2..=4) => n,
        _ => return Err(DecodeError::NotAFrame(first)),
    };

    let m = r.peek().unwrap_or(0);
    let tag = match r.head()? {
        Head::Str(len) => {
            simdutf8::basic::from_utf8(r.take(len as usize)?).map_err(|_| DecodeError::BadTag(m))?
        }
        _ => return Err(DecodeError::BadTag(m)),
    };

    // The second element's type selects the mode.
    let m = r.peek().unwrap_or(0);
    let (mode, has_option) = match r.peek_head()? {
        Head::Array(count) if n <= 3 => {
            r.head()?;
            let start = r.pos();
            for _ in 0..count {
                next_entry(&mut r)?;
            }
            (Mode::Forward(&frame[start..r.pos()], count as u64), n == 3)
        }
        Head::Str(len) | Head::Bin(len) if n <= 3 => {
            r.head()?;
            (Mode::Packed(r.take(len as usize)?), n == 3)
        }
        Head::Uint(_) | Head::Int(_) | Head::F32(_) | Head::F64(_) | Head::Ext { .. } if n >= 3 => {
            let time = parse_time(&mut r)?;
            let record = parse_record(&mut r)?;
            (Mode::Message(Event { time, record }), n == 4)
        }
        _ => return Err(DecodeError::BadMode(m)),
    };
    let opts = if has_option {
        parse_options(&mut r)?
    } else {
        Options::default()
    };
    if !r.is_empty() {
        // The scan found one value; a well-formed frame fills it exactly.
        return Err(DecodeError::NotAFrame(first));
    }

    let entries = match (mode, opts.compressed) {
        (Mode::Message(ev), None) => {
            check_size(opts.size, 1)?;
            Entries::Message(ev)
        }
        (Mode::Forward(body, count), None) => {
            check_size(opts.size, count)?;
            Entries::Stream { body, codec: None }
        }
        (Mode::Packed(body), None) => {
            check_size(opts.size, count_entries(body)?)?;
            Entries::Stream { body, codec: None }
        }
        // Checked by `Frame::events` once inflated.
        (Mode::Packed(body), Some(codec)) => Entries::Stream {
            body,
            codec: Some(codec),
        },
        // Only PackedForward entries are bytes that can be compressed.
        (_, Some(_)) => return Err(DecodeError::BadOptionValue("compressed")),
    };
    Ok(Frame {
        tag,
        entries,
        chunk: opts.chunk,
        size: opts.size,
    })
}

enum Mode<'a> {
    Message(Event<'a>),
    Forward(&'a [u8], u64),
    Packed(&'a [u8]),
}

#[derive(Default)]
struct Options<'a> {
    size: Option<u64>,
    chunk: Option<&'a [u8]>,
    compressed: Option<Codec>,
}

fn parse_options<'a>(r: &mut Reader<'a>) -> Result<Options<'a>, DecodeError> {
    let mut opts = Options::default();
    let m = r.peek().unwrap_or(0);
    let pairs = match r.head()? {
        Head::Nil => return Ok(opts),
        Head::Map(k) => k,
        _ => return Err(DecodeError::BadOption(m)),
    };
    for _ in 0..pairs {
        let key = match r.peek_head()? {
            Head::Str(len) => {
                r.head()?;
                r.take(len as usize)?
            }
            _ => {
                // A key we cannot name is one we do not know: skip it and its value.
                r.skip()?;
                r.skip()?;
                continue;
            }
        };
        match key {
            b"size" => match r.head()? {
                Head::Uint(v) => opts.size = Some(v),
                _ => return Err(DecodeError::BadOptionValue("size")),
            },
            b"chunk" => match r.head()? {
                Head::Str(len) | Head::Bin(len) => {
                    if len as usize > MAX_CHUNK_ID {
                        return Err(DecodeError::ChunkTooLong);
                    }
                    opts.chunk = Some(r.take(len as usize)?);
                }
                _ => return Err(DecodeError::BadOptionValue("chunk")),
            },
            b"compressed" => match r.head()? {
                Head::Str(len) => {
                    opts.compressed = match r.take(len as usize)? {
                        b"gzip" => Some(Codec::Gzip),
                        b"zstd" => Some(Codec::Zstd),
                        b"text" => None,
                        _ => return Err(DecodeError::UnknownCompression),
                    }
                }
                _ => return Err(DecodeError::BadOptionValue("compressed")),
            },
            _ => r.skip()?,
        }
    }
    Ok(opts)
}

fn check_size(size: Option<u64>, actual: u64) -> Result<(), DecodeError> {
    match size {
        Some(expected) if expected != actual => Err(DecodeError::SizeMismatch { expected, actual }),
        _ => Ok(()),
    }
}

/// Reads an event time: an integer, a float, or EventTime (ext type 0, 8 bytes, as
/// fixext8 or ext8).
fn parse_time(r: &mut Reader<'_>) -> Result<EventTime, DecodeError> {
    let m = r.peek().unwrap_or(0);
    match r.head()? {
        Head::Uint(s) => Ok(EventTime {
            secs: s.min(i64::MAX as u64) as i64,
            nanos: 0,
        }),
        Head::Int(s) => Ok(EventTime { secs: s, nanos: 0 }),
        Head::F32(f) => float_time(f as f64).ok_or(DecodeError::BadTime(m)),
        Head::F64(f) => float_time(f).ok_or(DecodeError::BadTime(m)),
        Head::Ext { ty, len: 8 } if ty == EVENT_TIME_EXT => {
            let b = r.take(8)?;
            let secs = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let nanos = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            if nanos >= 1_000_000_000 {
                return Err(DecodeError::BadTime(m));
            }
            Ok(EventTime {
                secs: secs as i64,
                nanos,
            })
        }
        Head::Ext { ty, .. } if ty == EVENT_TIME_EXT => Err(DecodeError::BadTime(m)),
        Head::Ext { ty, .. } => Err(DecodeError::BadExtType(ty)),
        _ => Err(DecodeError::BadTime(m)),
    }
}

fn float_time(f: f64) -> Option<EventTime> {
    if !f.is_finite() || f.abs() >= i64::MAX as f64 {
        return None;
    }
    let secs = f.floor();
    let nanos = (((f - secs) * 1e9) as u32).min(999_999_999);
    Some(EventTime {
        secs: secs as i64,
        nanos,
    })
}

fn parse_record<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], DecodeError> {
    match r.peek() {
        Some(0x80..=0x8f | 0xde | 0xdf) => Ok(r.value()?),
        Some(m) => Err(DecodeError::BadRecord(m)),
        None => Err(DecodeError::Truncated),
    }
}

/// Reads one `[time, record]` entry. Fluent Bit 2.1+ may send `[[time, metadata], record]`;
/// the metadata is skipped.
fn next_entry<'a>(r: &mut Reader<'a>) -> Result<Event<'a>, DecodeError> {
    let m = r.peek().unwrap_or(0);
    if r.head()? != Head::Array(2) {
        return Err(DecodeError::BadEntry(m));
    }
    let time = if r.peek() == Some(0x92) {
        r.head()?;
        let t = parse_time(r)?;
        r.skip()?;
        t
    } else {
        parse_time(r)?
    };
    let record = parse_record(r)?;
    Ok(Event { time, record })
}

/// Validates concatenated entries and counts them.
pub fn count_entries(body: &[u8]) -> Result<u64, DecodeError> {
    let mut r = Reader::new(body);
    let mut n = 0;
    while !r.is_empty() {
        next_entry(&mut r)?;
        n += 1;
    }
    Ok(n)
}

/// Inflates CompressedPackedForward entries into `out`, refusing more than `max` bytes.
pub fn inflate(
    codec: Codec,
    body: &[u8],
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), DecodeError> {
    out.clear();
    let limit = max as u64 + 1;
    let read = match codec {
        // Fluent Bit and Fluentd may send several gzip members back to back.
        Codec::Gzip => flate2::read::MultiGzDecoder::new(body)
            .take(limit)
            .read_to_end(out),
        Codec::Zstd => zstd::stream::read::Decoder::with_buffer(body)
            .and_then(|d| d.take(limit).read_to_end(out)),
    };
    match read {
        Ok(_) if out.len() > max => Err(DecodeError::DecompressedTooLarge(max)),
        Ok(_) => Ok(()),
        Err(_) => Err(DecodeError::Decompress(codec)),
    }
}

impl<'a> Frame<'a> {
    /// The frame's events. Compressed entries are inflated into `scratch` (at most
    /// `max_inflated` bytes) and validated there first.
    pub fn events<'b>(
        &self,
        scratch: &'b mut Vec<u8>,
        max_inflated: usize,
    ) -> Result<Events<'b>, DecodeError>
    where
        'a: 'b,
    {
        match self.entries {
            Entries::Message(ev) => Ok(Events {
                r: Reader::new(&[]),
                one: Some(ev),
            }),
            Entries::Stream { body, codec: None } => Ok(Events {
                r: Reader::new(body),
                one: None,
            }),
            Entries::Stream {
                body,
                codec: Some(codec),
            } => {
                inflate(codec, body, scratch, max_inflated)?;
                let count = count_entries(scratch)?;
                check_size(self.size, count)?;
                Ok(Events {
                    r: Reader::new(scratch),
                    one: None,
                })
            }
        }
    }
}

/// The events of a validated frame, in order.
#[derive(Debug)]
pub struct Events<'a> {
    r: Reader<'a>,
    one: Option<Event<'a>>,
}

impl<'a> Iterator for Events<'a> {
    type Item = Event<'a>;

    #[inline]
    fn next(&mut self) -> Option<Event<'a>> {
        if let Some(ev) = self.one.take() {
            return Some(ev);
        }
        if self.r.is_empty() {
            return None;
        }
        // The entries were validated when the frame was decoded.
        next_entry(&mut self.r).ok()
    }
}
