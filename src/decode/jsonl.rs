//! Newline-delimited JSON: line framing with a length bound, and simd-json parsing in
//! place into a reused tape.
//!
//! simd-json parses the line where it lies in the connection's buffer (it unescapes
//! strings in place), so a line is never copied before it is encoded into a batch.

use simd_json::{Buffers, Node, Tape};

use super::DecodeError;
use crate::limits::{JSON_PADDING, MAX_DEPTH};

/// One step of [`Lines::next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framed {
    /// A line of `len` bytes (without its newline); drop `consumed` bytes after use.
    Line { len: usize, consumed: usize },
    /// Drop `consumed` bytes of an over-long line. `error` is set once per such line.
    Discard {
        consumed: usize,
        error: Option<DecodeError>,
    },
    /// No complete line yet.
    NeedMore,
}

/// Splits a byte stream into lines no longer than `max_line` bytes.
#[derive(Debug)]
pub struct Lines {
    max_line: usize,
    /// Bytes at the front of the buffer already searched for a newline.
    scanned: usize,
    /// Inside an over-long line: drop bytes up to its newline.
    discarding: bool,
}

impl Lines {
    pub fn new(max_line: usize) -> Self {
        Lines {
            max_line,
            scanned: 0,
            discarding: false,
        }
    }

    /// Finds the next line at the start of `buf`. Between calls `buf` keeps its start,
    /// unless the caller drops the bytes this returned as consumed.
    pub fn next(&mut self, buf: &[u8]) -> Framed {
        if buf.len() <= self.scanned {
            return Framed::NeedMore;
        }
        match memchr::memchr(b'\n', &buf[self.scanned.min(buf.len())..]) {
            Some(i) => {
                let nl = self.scanned + i;
                self.scanned = 0;
                if self.discarding {
                    self.discarding = false;
                    return Framed::Discard {
                        consumed: nl + 1,
                        error: None,
                    };
                }
                if nl > self.max_line {
                    return Framed::Discard {
                        consumed: nl + 1,
                        error: Some(DecodeError::LineTooLong(self.max_line)),
                    };
                }
                Framed::Line {
                    len: nl,
                    consumed: nl + 1,
                }
            }
            None if self.discarding => {
                self.scanned = 0;
                Framed::Discard {
                    consumed: buf.len(),
                    error: None,
                }
            }
            None if buf.len() > self.max_line => {
                self.discarding = true;
                self.scanned = 0;
                Framed::Discard {
                    consumed: buf.len(),
                    error: Some(DecodeError::LineTooLong(self.max_line)),
                }
            }
            None => {
                self.scanned = buf.len();
                Framed::NeedMore
            }
        }
    }

    /// At end of input, the unterminated rest of the stream is a last line, unless it
    /// belongs to an over-long line already refused.
    pub fn finish(&mut self, buf: &[u8]) -> Option<usize> {
        let discarding = std::mem::replace(&mut self.discarding, false);
        self.scanned = 0;
        (!discarding && !buf.is_empty()).then_some(buf.len())
    }
}

/// A JSON object parsed in place: the object node followed by its contents.
pub type Object<'t, 'a> = &'t [Node<'a>];

/// Parses lines with simd-json, reusing its buffers and tape between lines.
pub struct JsonParser {
    buffers: Buffers,
    tape: Tape<'static>,
}

impl Default for JsonParser {
    fn default() -> Self {
        JsonParser {
            buffers: Buffers::with_max_depth(4096, MAX_DEPTH),
            tape: Tape(Vec::new()),
        }
    }
}

impl JsonParser {
    /// Parses `buf[..len]` as one JSON object and hands it to `f`. `buf` must extend at
    /// least [`JSON_PADDING`] bytes past `len` (any content; it is left unchanged).
    /// A trailing `\r` is ignored. Blank lines give `Ok(None)`.
    pub fn parse<'a, R>(
        &mut self,
        buf: &'a mut [u8],
        mut len: usize,
        f: impl FnOnce(Object<'_, 'a>) -> R,
    ) -> Result<Option<R>, DecodeError> {
        debug_assert!(buf.len() >= len + JSON_PADDING);
        if len > 0 && buf[len - 1] == b'\r' {
            len -= 1;
        }
        if buf[..len].iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(None);
        }
        self.with_tape(buf, len, |tape| match tape.first() {
            Some(Node::Object { .. }) => Ok(Some(f(tape))),
            _ => Err(DecodeError::NotAnObject),
        })
    }

    /// Parses `buf[..len]` as one JSON object or an array of objects (an HTTP body) and
    /// hands each object to `f`, once all are known to be objects. Returns how many.
    pub fn parse_each<'a>(
        &mut self,
        buf: &'a mut [u8],
        len: usize,
        mut f: impl FnMut(Object<'_, 'a>),
    ) -> Result<usize, DecodeError> {
        debug_assert!(buf.len() >= len + JSON_PADDING);
        self.with_tape(buf, len, |tape| match tape.first() {
            Some(Node::Object { .. }) => {
                f(tape);
                Ok(1)
            }
            Some(Node::Array { len, .. }) => {
                let mut pos = 1;
                for _ in 0..*len {
                    match tape.get(pos) {
                        Some(n @ Node::Object { .. }) => pos += node_span(n),
                        _ => return Err(DecodeError::NotAnObject),
                    }
                }
                let mut pos = 1;
                for _ in 0..*len {
                    let end = pos + node_span(&tape[pos]);
                    f(&tape[pos..end]);
                    pos = end;
                }
                Ok(*len)
            }
            _ => Err(DecodeError::NotAnObject),
        })
    }

    fn with_tape<'a, R>(
        &mut self,
        buf: &'a mut [u8],
        len: usize,
        f: impl FnOnce(&[Node<'a>]) -> Result<R, DecodeError>,
    ) -> Result<R, DecodeError> {
        let mut tape: Tape<'a> = std::mem::replace(&mut self.tape, Tape(Vec::new())).reset();
        let parsed = simd_json::fill_tape_padded(buf, len, &mut self.buffers, &mut tape);
        let out = match parsed {
            Ok(()) => f(&tape.0),
            Err(e) if is_depth_error(&e) => Err(DecodeError::TooDeep),
            Err(_) => Err(DecodeError::InvalidJson),
        };
        self.tape = tape.reset();
        out
    }
}

fn is_depth_error(e: &simd_json::Error) -> bool {
    matches!(e.error(), simd_json::ErrorType::DepthLimitExceeded)
}

/// The string value of a top-level field.
pub fn field_str<'a>(obj: Object<'_, 'a>, key: &str) -> Option<&'a str> {
    let mut fields = Fields::new(obj);
    while let Some((k, v)) = fields.next() {
        if k == key {
            return match v.first() {
                Some(Node::String(s)) => Some(s),
                _ => None,
            };
        }
    }
    None
}

/// Iterates the top-level `(key, value)` pairs of a parsed object; each value is the
/// slice of nodes it spans.
pub struct Fields<'t, 'a> {
    nodes: &'t [Node<'a>],
    left: usize,
    pos: usize,
}

impl<'t, 'a> Fields<'t, 'a> {
    pub fn new(obj: Object<'t, 'a>) -> Self {
        let left = match obj.first() {
            Some(Node::Object { len, .. }) => *len,
            _ => 0,
        };
        Fields {
            nodes: obj,
            left,
            pos: 1,
        }
    }

    #[allow(clippy::should_implement_trait)]
    #[inline]
    pub fn next(&mut self) -> Option<(&'a str, &'t [Node<'a>])> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let key = match self.nodes.get(self.pos)? {
            Node::String(s) => *s,
            _ => return None,
        };
        let start = self.pos + 1;
        let end = start + node_span(self.nodes.get(start)?);
        self.pos = end;
        Some((key, self.nodes.get(start..end)?))
    }
}

/// Number of tape nodes a value occupies, itself included.
#[inline]
pub fn node_span(n: &Node<'_>) -> usize {
    match n {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::shape::{Format, Shape, ShapeConfig};
    use crate::conn::ReadBuf;
    use crate::decode::EventTime;
    use proptest::prelude::*;
    use serde_json::Value as J;

    fn json() -> impl Strategy<Value = J> {
        let leaf = prop_oneof![
            Just(J::Null),
            any::<bool>().prop_map(J::Bool),
            any::<i64>().prop_map(J::from),
            any::<u64>().prop_map(J::from),
            (-1e300f64..1e300).prop_map(J::from),
            ".{0,30}".prop_map(J::String),
        ];
        leaf.prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(J::Array),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..5)
                    .prop_map(|m| J::Object(m.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = J> {
        proptest::collection::btree_map(".{1,10}", json(), 0..8)
            .prop_map(|m| J::Object(m.into_iter().collect()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Lines split anywhere across reads come out as the same objects, in JSON and in
        /// msgpack.
        #[test]
        fn lines_survive_any_split(objs in proptest::collection::vec(object(), 1..8), cuts in proptest::collection::vec(any::<usize>(), 0..10), crlf in any::<bool>()) {
            let mut stream = vec![];
            for o in &objs {
                stream.extend(serde_json::to_vec(o).unwrap());
                stream.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            }
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            bounds.push(stream.len());
            bounds.sort();
            let mut rb = ReadBuf::new(16, 1 << 20, JSON_PADDING, crate::conn::Mem::unlimited());
            let mut lines = Lines::new(1 << 20);
            let mut parser = JsonParser::default();
            let mut json = Shape::new(&ShapeConfig::default());
            let mut msgpack = Shape::new(&ShapeConfig { format: Format::Msgpack, ..ShapeConfig::default() });
            let (mut out_json, mut out_mp) = (vec![], vec![]);
            let mut fed = 0;
            for b in bounds {
                let piece = &stream[fed..b];
                fed = b;
                rb.spare(piece.len())[..piece.len()].copy_from_slice(piece);
                rb.filled(piece.len());
                while let Framed::Line { len, consumed } = lines.next(rb.data()) {
                    let r = parser.parse(rb.data_padded(), len, |o| {
                        json.encode_json(&mut out_json, "t", EventTime::default(), o);
                        msgpack.encode_json(&mut out_mp, "t", EventTime::default(), o);
                    });
                    prop_assert!(matches!(r, Ok(Some(()))));
                    rb.consume(consumed);
                }
            }
            let got: Vec<J> = out_json.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
            prop_assert_eq!(&got, &objs);
            let mut r = &out_mp[..];
            for o in &objs {
                let v = rmpv::decode::read_value(&mut r).unwrap();
                prop_assert_eq!(&crate::decode::msgpack_to_json(&v), o);
            }
        }
    }

    fn padded(s: &[u8]) -> Vec<u8> {
        let mut v = s.to_vec();
        v.resize(s.len() + JSON_PADDING, 0);
        v
    }

    #[test]
    fn frames_lines_across_reads() {
        let mut l = Lines::new(100);
        assert_eq!(l.next(b"{\"a\":1}"), Framed::NeedMore);
        assert_eq!(
            l.next(b"{\"a\":1}\n{\"b\""),
            Framed::Line {
                len: 7,
                consumed: 8
            }
        );
        assert_eq!(l.next(b"{\"b\""), Framed::NeedMore);
        assert_eq!(l.finish(b"{\"b\""), Some(4));
    }

    #[test]
    fn refuses_long_lines_once_and_resynchronises() {
        let mut l = Lines::new(4);
        assert_eq!(
            l.next(b"0123456"),
            Framed::Discard {
                consumed: 7,
                error: Some(DecodeError::LineTooLong(4))
            }
        );
        assert_eq!(
            l.next(b"89\n{}\n"),
            Framed::Discard {
                consumed: 3,
                error: None
            }
        );
        assert_eq!(
            l.next(b"{}\n"),
            Framed::Line {
                len: 2,
                consumed: 3
            }
        );
        // Everything of the long line so far was dropped: an empty buffer needs more input
        // (this once spun forever).
        assert_eq!(
            l.next(b"0123456789"),
            Framed::Discard {
                consumed: 10,
                error: Some(DecodeError::LineTooLong(4))
            }
        );
        assert_eq!(l.next(b""), Framed::NeedMore);
        assert_eq!(
            l.next(b"x\n"),
            Framed::Discard {
                consumed: 2,
                error: None
            }
        );
        // A long line whose newline is already buffered.
        assert_eq!(
            l.next(b"0123456\n"),
            Framed::Discard {
                consumed: 8,
                error: Some(DecodeError::LineTooLong(4))
            }
        );
    }

    #[test]
    fn parses_objects_and_classifies_the_rest() {
        let mut p = JsonParser::default();
        let mut b = padded(br#"{"tag":"app.web","n":[1,{"x":2}],"s":"a\"b"}"#);
        let len = b.len() - JSON_PADDING;
        let (tag, keys) = p
            .parse(&mut b, len, |o| {
                let mut keys = vec![];
                let mut f = Fields::new(o);
                while let Some((k, _)) = f.next() {
                    keys.push(k.to_string());
                }
                (field_str(o, "tag").map(str::to_string), keys)
            })
            .unwrap()
            .unwrap();
        assert_eq!(tag.as_deref(), Some("app.web"));
        assert_eq!(keys, ["tag", "n", "s"]);

        let mut b = padded(b"[1,2]");
        assert_eq!(p.parse(&mut b, 5, |_| ()), Err(DecodeError::NotAnObject));
        let mut b = padded(b"{\"a\":");
        assert_eq!(p.parse(&mut b, 5, |_| ()), Err(DecodeError::InvalidJson));
        let mut b = padded(b"  \r");
        assert_eq!(p.parse(&mut b, 3, |_| ()), Ok(None));
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        let mut b = padded(deep.as_bytes());
        assert_eq!(
            p.parse(&mut b, deep.len(), |_| ()),
            Err(DecodeError::TooDeep)
        );
    }
}
