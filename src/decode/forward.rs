//! Forward protocol v1: frame boundaries, the four modes, options and events.
//!
//! [`Decoder::decode`] finds one frame in a byte stream that arrives in pieces and reads
//! its tag, mode and options. [`Frame::events`] then validates every entry, the `size`
//! option and the nesting depth in one pass, noting where each record lies, before it
//! hands out the first event: a bad frame is refused before any of it is routed. Events
//! borrow the connection's buffer (or, for CompressedPackedForward, the per-core buffer
//! the entries were inflated into).
//!
//! Spec: <https://github.com/fluent/fluentd/wiki/Forward-Protocol-Specification-v1>

use std::io::Read;

use super::msgpack::{Head, Reader, Scan, ScanError, Step};
use super::{Codec, DecodeError, EventTime};
use crate::limits::{EVENT_TIME_EXT, MAX_CHUNK_ID, MAX_TAG};

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
    /// Forward and PackedForward modes: concatenated `[time, record]` entries.
    /// CompressedPackedForward: the compressed bytes. Validated by [`Frame::events`].
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
        Head::Str(len) if len as usize > MAX_TAG => return Err(DecodeError::TagTooLong),
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
        // Entries are validated, and counted against `size`, by `Frame::events`.
        (Mode::Packed(body), codec) => Entries::Stream { body, codec },
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

/// Inflates CompressedPackedForward entries into `out`, refusing more than `max` bytes.
/// `out` grows geometrically but never past `max` (plus one byte, to see there is more).
pub fn inflate(
    codec: Codec,
    body: &[u8],
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), DecodeError> {
    out.clear();
    let read = match codec {
        // Fluent Bit and Fluentd may send several gzip members back to back.
        Codec::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(body), out, max),
        // zstd frames declare their window; refuse windows larger than the limit itself.
        Codec::Zstd => zstd::stream::read::Decoder::with_buffer(body).and_then(|mut d| {
            let log = (usize::BITS - max.leading_zeros()).clamp(10, 31);
            d.window_log_max(log)?;
            read_bounded(d, out, max)
        }),
    };
    match read {
        Ok(()) if out.len() > max => Err(DecodeError::DecompressedTooLarge(max)),
        Ok(()) => Ok(()),
        Err(_) => Err(DecodeError::Decompress(codec)),
    }
}

/// Reads `r` to its end or to `max + 1` bytes into `out`, growing it only within that.
fn read_bounded(mut r: impl Read, out: &mut Vec<u8>, max: usize) -> std::io::Result<()> {
    loop {
        let room = out.capacity() - out.len();
        if room == 0 {
            if out.len() > max {
                return Ok(());
            }
            let grow = out.capacity().max(64 << 10).min(max + 1 - out.len());
            out.reserve_exact(grow);
            continue;
        }
        // Bounded by the room, read_to_end never grows `out` itself.
        let n = (&mut r).take(room as u64).read_to_end(out)?;
        if n < room {
            return Ok(());
        }
    }
}

/// Where one validated entry's record lies in the entries.
#[derive(Clone, Copy, Debug)]
struct Span {
    time: EventTime,
    start: u32,
    end: u32,
}

/// Most entries noted per frame; a frame with more (only a hostile one has millions of
/// tiny entries) has the rest parsed a second time instead of noted.
const MAX_SPANS: usize = 1 << 16;

/// Per-core buffers that frames are validated and inflated into, reused frame after frame.
#[derive(Debug, Default)]
pub struct Scratch {
    inflated: Vec<u8>,
    spans: Vec<Span>,
    /// Entries in the frame last validated.
    count: u64,
}

impl Scratch {
    /// Events in the frame last validated.
    pub fn events(&self) -> u64 {
        self.count
    }

    /// Bytes the frame last validated inflated to (0 if it was not compressed).
    pub fn inflated_len(&self) -> usize {
        self.inflated.len()
    }

    /// What the inflate buffer holds.
    pub fn inflated_capacity(&self) -> usize {
        self.inflated.capacity()
    }

    /// Gives back the inflate buffer if it holds more than `keep` bytes.
    pub fn trim(&mut self, keep: usize) {
        if self.inflated.capacity() > keep {
            self.inflated = Vec::new();
        }
    }
}

/// Validates concatenated entries, noting where each record lies; returns their number.
fn note_entries(body: &[u8], spans: &mut Vec<Span>) -> Result<u64, DecodeError> {
    spans.clear();
    let mut r = Reader::new(body);
    let mut n = 0;
    while !r.is_empty() {
        let ev = next_entry(&mut r)?;
        if spans.len() < MAX_SPANS {
            let end = r.pos();
            spans.push(Span {
                time: ev.time,
                start: (end - ev.record.len()) as u32,
                end: end as u32,
            });
        }
        n += 1;
    }
    Ok(n)
}

impl<'a> Frame<'a> {
    /// Validates the frame's entries and returns its events. Compressed entries are
    /// inflated into `scratch` first (at most `max_inflated` bytes).
    pub fn events<'b>(
        &self,
        scratch: &'b mut Scratch,
        max_inflated: usize,
    ) -> Result<Events<'b>, DecodeError>
    where
        'a: 'b,
    {
        scratch.inflated.clear();
        let body = match self.entries {
            Entries::Message(ev) => {
                scratch.count = 1;
                return Ok(Events {
                    body: &[],
                    spans: [].iter(),
                    rest: Reader::new(&[]),
                    one: Some(ev),
                });
            }
            Entries::Stream { body, codec: None } => body,
            Entries::Stream {
                body,
                codec: Some(codec),
            } => {
                inflate(codec, body, &mut scratch.inflated, max_inflated)?;
                &scratch.inflated[..]
            }
        };
        let count = note_entries(body, &mut scratch.spans)?;
        check_size(self.size, count)?;
        scratch.count = count;
        let rest = match scratch.spans.last() {
            Some(last) if count as usize > scratch.spans.len() => {
                Reader::new(&body[last.end as usize..])
            }
            _ => Reader::new(&[]),
        };
        Ok(Events {
            body,
            spans: scratch.spans.iter(),
            rest,
            one: None,
        })
    }
}

impl<'a> Frame<'a> {
    /// The events of a frame after the first `taken`, from the `scratch` that
    /// [`Frame::events`] filled for it: nothing is validated or inflated again. For a
    /// frame whose ingestion paused and now goes on.
    pub fn resume<'b>(&self, scratch: &'b Scratch, taken: u64) -> Events<'b>
    where
        'a: 'b,
    {
        let body = match self.entries {
            Entries::Message(ev) => {
                return Events {
                    body: &[],
                    spans: [].iter(),
                    rest: Reader::new(&[]),
                    one: (taken == 0).then_some(ev),
                };
            }
            Entries::Stream { body, codec: None } => body,
            Entries::Stream { codec: Some(_), .. } => &scratch.inflated[..],
        };
        let noted = scratch.spans.len();
        let rest = match scratch.spans.last() {
            Some(last) if scratch.count as usize > noted => Reader::new(&body[last.end as usize..]),
            _ => Reader::new(&[]),
        };
        let mut events = Events {
            body,
            spans: scratch.spans[(taken as usize).min(noted)..].iter(),
            rest,
            one: None,
        };
        for _ in noted as u64..taken {
            events.next();
        }
        events
    }
}

/// The events of a validated frame, in order.
#[derive(Debug)]
pub struct Events<'a> {
    body: &'a [u8],
    spans: std::slice::Iter<'a, Span>,
    /// Entries past the noted ones, parsed as they are read.
    rest: Reader<'a>,
    one: Option<Event<'a>>,
}

impl<'a> Iterator for Events<'a> {
    type Item = Event<'a>;

    #[inline]
    fn next(&mut self) -> Option<Event<'a>> {
        if let Some(s) = self.spans.next() {
            return Some(Event {
                time: s.time,
                record: &self.body[s.start as usize..s.end as usize],
            });
        }
        if let Some(ev) = self.one.take() {
            return Some(ev);
        }
        if self.rest.is_empty() {
            return None;
        }
        // Validated already, so this cannot fail; if it did, the stream would just end.
        next_entry(&mut self.rest).ok()
    }
}

#[cfg(test)]
mod tests {
    //! The decoder against a naive reference built on rmpv, over every mode, random
    //! records and random split points; and the transcoder against serde_json.

    use super::*;
    use crate::batch::shape::{Shape, ShapeConfig};
    use crate::test_frames::{Mode, Opts, Time, frame};
    use proptest::prelude::*;
    use rmpv::Value;
    use std::io::Write;

    #[derive(Clone, Debug)]
    struct Spec {
        tag: String,
        mode: Mode,
        events: Vec<(Time, Value)>,
        chunk: Option<String>,
        size: bool,
        nil_options: bool,
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Boolean),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e15f64..1e15).prop_map(Value::F64),
            (-1e6f32..1e6).prop_map(Value::F32),
            ".{0,40}".prop_map(Value::from),
            "[\"\\\\\n\t\u{1}a-z]{0,20}".prop_map(Value::from),
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(Value::Binary),
        ];
        leaf.prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec(("[a-z]{1,6}", inner), 0..5).prop_map(|kv| Value::Map(
                    kv.into_iter().map(|(k, v)| (Value::from(k), v)).collect()
                )),
            ]
        })
    }

    fn record() -> impl Strategy<Value = Value> {
        proptest::collection::vec(("[a-z_]{1,10}", value()), 0..8)
            .prop_map(|kv| Value::Map(kv.into_iter().map(|(k, v)| (Value::from(k), v)).collect()))
    }

    fn time() -> impl Strategy<Value = Time> {
        prop_oneof![
            any::<u32>().prop_map(Time::Int),
            (any::<u32>(), 0u32..1_000_000_000).prop_map(|(s, n)| Time::FixExt8(s, n)),
            (any::<u32>(), 0u32..1_000_000_000).prop_map(|(s, n)| Time::Ext8(s, n)),
            (0u32..1 << 30).prop_map(Time::Float),
            any::<u32>().prop_map(Time::WithMeta),
        ]
    }

    fn spec() -> impl Strategy<Value = Spec> {
        let mode = prop_oneof![
            Just(Mode::Message),
            Just(Mode::Forward),
            Just(Mode::PackedBin),
            Just(Mode::PackedStr),
            Just(Mode::Gzip),
            Just(Mode::Zstd),
        ];
        (
            "[a-z]{1,8}(\\.[a-z0-9]{1,8}){0,3}",
            mode,
            proptest::collection::vec((time(), record()), 1..6),
            proptest::option::of("[A-Za-z0-9+/]{24}"),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(tag, mode, mut events, chunk, size, nil_options)| {
                if matches!(mode, Mode::Message) {
                    // `[time, metadata]` exists only inside entries; in Message mode it
                    // would read as Forward mode.
                    events.truncate(1);
                    if let Time::WithMeta(s) = events[0].0 {
                        events[0].0 = Time::Int(s);
                    }
                }
                Spec {
                    tag,
                    mode,
                    events,
                    chunk,
                    size,
                    nil_options,
                }
            })
    }

    fn encode(s: &Spec) -> Vec<u8> {
        let opts = Opts {
            chunk: s.chunk.as_deref(),
            size: s.size,
            nil_options: s.nil_options,
        };
        frame(s.mode, &s.tag, &s.events, opts)
    }

    type Event = (String, EventTime, Value, Option<Vec<u8>>);

    fn ref_time(v: &Value) -> EventTime {
        match v {
            Value::Integer(i) => EventTime {
                secs: i.as_i64().unwrap(),
                nanos: 0,
            },
            Value::F64(f) => EventTime {
                secs: f.floor() as i64,
                nanos: ((f - f.floor()) * 1e9) as u32,
            },
            Value::Ext(0, b) => EventTime {
                secs: u32::from_be_bytes(b[..4].try_into().unwrap()) as i64,
                nanos: u32::from_be_bytes(b[4..].try_into().unwrap()),
            },
            Value::Array(a) => ref_time(&a[0]),
            other => panic!("reference: bad time {other:?}"),
        }
    }

    /// The naive reference: whole values through rmpv, modes told apart by type.
    fn reference(stream: &[u8]) -> Vec<Event> {
        let mut r = stream;
        let mut out = vec![];
        while !r.is_empty() {
            let a = match rmpv::decode::read_value(&mut r).unwrap() {
                Value::Array(a) => a,
                Value::Nil => continue,
                other => panic!("reference: not a frame: {other:?}"),
            };
            let tag = a[0].as_str().unwrap().to_string();
            let (opt_at, msg) = match &a[1] {
                Value::Array(_) | Value::Binary(_) | Value::String(_) => (2, false),
                _ => (3, true),
            };
            let opts = a
                .get(opt_at)
                .and_then(Value::as_map)
                .cloned()
                .unwrap_or_default();
            let get = |k: &str| {
                opts.iter()
                    .find(|(key, _)| key.as_str() == Some(k))
                    .map(|(_, v)| v.clone())
            };
            let chunk = get("chunk").map(|v| v.as_str().unwrap().as_bytes().to_vec());
            let mut pairs = vec![];
            if msg {
                pairs.push((a[1].clone(), a[2].clone()));
            } else {
                let body: Vec<Value> = match &a[1] {
                    Value::Array(items) => items.clone(),
                    packed => {
                        let bytes = match packed {
                            Value::Binary(b) => b.clone(),
                            Value::String(s) => s.as_bytes().to_vec(),
                            _ => unreachable!(),
                        };
                        let bytes = match get("compressed").as_ref().and_then(Value::as_str) {
                            Some("gzip") => {
                                let mut v = vec![];
                                std::io::Read::read_to_end(
                                    &mut flate2::read::MultiGzDecoder::new(&bytes[..]),
                                    &mut v,
                                )
                                .unwrap();
                                v
                            }
                            Some("zstd") => zstd::decode_all(&bytes[..]).unwrap(),
                            _ => bytes,
                        };
                        let mut b = &bytes[..];
                        let mut items = vec![];
                        while !b.is_empty() {
                            items.push(rmpv::decode::read_value(&mut b).unwrap());
                        }
                        items
                    }
                };
                for e in body {
                    let e = e.as_array().unwrap();
                    pairs.push((e[0].clone(), e[1].clone()));
                }
            }
            for (t, rec) in pairs {
                out.push((tag.clone(), ref_time(&t), rec, chunk.clone()));
            }
        }
        out
    }

    /// Our decoder, fed the stream in pieces cut at `cuts`, as a connection would be.
    fn ours(stream: &[u8], cuts: &[usize]) -> Vec<Event> {
        let mut dec = Decoder::new(1 << 24);
        let mut buf: Vec<u8> = vec![];
        let mut scratch = Scratch::default();
        let mut out = vec![];
        let mut fed = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        bounds.push(stream.len());
        bounds.sort();
        for b in bounds {
            buf.extend_from_slice(&stream[fed..b]);
            fed = b;
            loop {
                match dec.decode(&buf).unwrap() {
                    Decoded::Frame(frame, len) => {
                        for ev in frame.events(&mut scratch, 1 << 24).unwrap() {
                            let rec = rmpv::decode::read_value(&mut &ev.record[..]).unwrap();
                            out.push((
                                frame.tag.to_string(),
                                ev.time,
                                rec,
                                frame.chunk.map(<[u8]>::to_vec),
                            ));
                        }
                        buf.drain(..len);
                    }
                    Decoded::Keepalive => {
                        buf.drain(..1);
                    }
                    Decoded::NeedMore(n) => {
                        assert!(n > buf.len(), "asked for {n} with {} buffered", buf.len());
                        break;
                    }
                }
            }
        }
        assert!(buf.is_empty(), "bytes left over");
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn decoder_agrees_with_the_reference(
            specs in proptest::collection::vec(spec(), 1..5),
            keepalive in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut stream = vec![];
            for s in &specs {
                if keepalive {
                    stream.push(0xc0);
                }
                stream.extend(encode(s));
            }
            let want = reference(&stream);
            let total: usize = specs.iter().map(|s| s.events.len()).sum();
            prop_assert_eq!(want.len(), total);
            prop_assert_eq!(ours(&stream, &cuts), want);
        }

        #[test]
        fn transcoded_json_reads_back_as_the_record(rec in record()) {
            let mut bytes = vec![];
            rmpv::encode::write_value(&mut bytes, &rec).unwrap();
            let mut out = vec![];
            Shape::new(&ShapeConfig::default()).encode_msgpack(&mut out, "t", EventTime::default(), &bytes);
            prop_assert_eq!(out.last(), Some(&b'\n'));
            let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(got, crate::decode::msgpack_to_json(&rec));
        }
    }

    fn frame_err(bytes: &[u8]) -> DecodeError {
        let mut dec = Decoder::new(1 << 20);
        let frame = match dec.decode(bytes) {
            Err(e) => return e,
            Ok(Decoded::Frame(f, _)) => f,
            Ok(other) => panic!("no error: {other:?}"),
        };
        match frame.events(&mut Scratch::default(), 1 << 20) {
            Err(e) => e,
            Ok(_) => panic!("no error"),
        }
    }

    #[test]
    fn refuses_broken_frames_with_their_cause() {
        // ["t", 1, {}] with the tag as an int: [1, 1, {}]
        assert_eq!(
            frame_err(&[0x93, 0x01, 0x01, 0x80]),
            DecodeError::BadTag(0x01)
        );
        // ["t", fixext8 type 5, {}]
        let mut b = vec![0x93, 0xa1, b't', 0xd7, 0x05];
        b.extend([0; 8]);
        b.push(0x80);
        assert_eq!(frame_err(&b), DecodeError::BadExtType(5));
        // ["t", 1, "not a map"]
        assert_eq!(
            frame_err(&[0x93, 0xa1, b't', 0x01, 0xa1, b'x']),
            DecodeError::BadRecord(0xa1)
        );
        // ["t", bin "garbage", {"compressed": "gzip"}]
        let mut b = vec![0x93, 0xa1, b't', 0xc4, 0x03, 1, 2, 3, 0x81, 0xaa];
        b.extend(b"compressed");
        b.extend([0xa4, b'g', b'z', b'i', b'p']);
        assert_eq!(frame_err(&b), DecodeError::Decompress(Codec::Gzip));
        // ["t", [[1, {}]], {"size": 2}]
        let mut b = vec![0x93, 0xa1, b't', 0x91, 0x92, 0x01, 0x80, 0x81, 0xa4];
        b.extend(b"size");
        b.push(0x02);
        assert_eq!(
            frame_err(&b),
            DecodeError::SizeMismatch {
                expected: 2,
                actual: 1
            }
        );
        // A tag longer than MAX_TAG.
        let mut b = vec![0x92, 0xda];
        b.extend(2000u16.to_be_bytes());
        b.extend([b'a'; 2000]);
        b.extend([0x90]);
        assert_eq!(frame_err(&b), DecodeError::TagTooLong);
        // Not a frame at all: an HTTP request on the forward port.
        assert_eq!(
            frame_err(b"GET / HTTP/1.1\r\n"),
            DecodeError::NotAFrame(b'G')
        );
        // A frame declaring more bytes than max_frame_bytes is refused up front.
        assert_eq!(
            Decoder::new(1024)
                .decode(&[0x92, 0xa1, b't', 0xc6, 0x7f, 0xff, 0xff, 0xff])
                .unwrap_err(),
            DecodeError::FrameTooLarge(1024)
        );
    }

    #[test]
    fn frames_with_more_entries_than_noted_still_yield_them_all() {
        let n = MAX_SPANS + 1000;
        let mut body = vec![];
        for i in 0..n {
            body.extend([0x92]);
            rmp::encode::write_uint(&mut body, i as u64).unwrap();
            body.push(0x80);
        }
        let mut f = vec![0x92, 0xa1, b't'];
        rmp::encode::write_bin(&mut f, &body).unwrap();
        let Ok(Decoded::Frame(frame, _)) = Decoder::new(1 << 24).decode(&f) else {
            panic!("a frame")
        };
        let mut scratch = Scratch::default();
        let times: Vec<i64> = frame
            .events(&mut scratch, 0)
            .unwrap()
            .map(|e| e.time.secs)
            .collect();
        assert_eq!(times, (0..n as i64).collect::<Vec<_>>());
        assert_eq!(scratch.spans.len(), MAX_SPANS);
    }

    #[test]
    fn inflating_stops_at_the_limit() {
        let body = vec![0x92u8; 1 << 20];
        let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::best());
        e.write_all(&body).unwrap();
        let gz = e.finish().unwrap();
        let mut out = vec![];
        assert_eq!(
            inflate(Codec::Gzip, &gz, &mut out, 1000),
            Err(DecodeError::DecompressedTooLarge(1000))
        );
        assert!(out.len() <= 1001);
    }
}
