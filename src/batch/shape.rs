//! Record shaping: how a route turns one event into bytes in a batch. Tag and time keys,
//! `remove_keys`, `add_fields` and `log_key` are applied while encoding, in one pass that
//! writes straight into the batch buffer, with no intermediate value tree.

use simd_json::{Node, StaticNode};

use super::json::{self, Rfc3339};
use crate::decode::EventTime;
use crate::decode::jsonl::{Fields, Object};
use crate::decode::msgpack::{Head, Reader};
use crate::limits::EVENT_TIME_EXT;

/// How an event is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// One msgpack map per event, back to back.
    Msgpack,
    /// The value of `log_key` as a line of text.
    Text,
}

/// How the time key is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeFormat {
    /// RFC 3339 in UTC with nanoseconds: `2024-05-01T12:34:56.123456789Z`.
    Iso8601,
    /// Seconds with nine decimals: `1714566896.123456789`.
    Double,
    /// Whole seconds.
    Epoch,
}

/// A constant field added to every record.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// A route's validated output settings.
#[derive(Clone, Debug)]
pub struct ShapeConfig {
    pub format: Format,
    pub tag_key: Option<String>,
    pub time_key: Option<String>,
    pub time_format: TimeFormat,
    pub log_key: Option<String>,
    pub remove_keys: Vec<String>,
    pub add_fields: Vec<(String, Literal)>,
}

impl Default for ShapeConfig {
    fn default() -> Self {
        ShapeConfig {
            format: Format::Json,
            tag_key: None,
            time_key: None,
            time_format: TimeFormat::Iso8601,
            log_key: None,
            remove_keys: vec![],
            add_fields: vec![],
        }
    }
}

/// What an encoder gives a batcher: what became of the event, and its partition key field,
/// if the sink takes keys from a field and the record has it as a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Out<'a> {
    pub encoded: Encoded,
    pub key: Option<&'a [u8]>,
}

impl From<Encoded> for Out<'_> {
    fn from(encoded: Encoded) -> Self {
        Out { encoded, key: None }
    }
}

/// The string value of a top-level field of a msgpack record.
pub fn msgpack_field<'a>(record: &'a [u8], field: &[u8]) -> Option<&'a [u8]> {
    let mut r = Reader::new(record);
    let Ok(Head::Map(n)) = r.head() else {
        return None;
    };
    for _ in 0..n {
        let is_field = match r.str() {
            Some(k) => k == field,
            None => {
                r.skip().ok()?;
                false
            }
        };
        if is_field {
            return r.str();
        }
        r.skip().ok()?;
    }
    None
}

/// What became of one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoded {
    Written,
    /// `format = "text"` and the record has no `log_key` field: nothing was written.
    MissingLogKey,
}

/// A compiled [`ShapeConfig`], owned by one core.
#[derive(Debug)]
pub struct Shape {
    format: Format,
    tag_key: Option<Box<[u8]>>,
    time_key: Option<Box<[u8]>>,
    time_format: TimeFormat,
    log_key: Option<Box<[u8]>>,
    /// Record keys left out: `remove_keys`, and every key we inject ourselves, so that an
    /// injected value replaces the record's own rather than duplicating it.
    drop: Box<[Box<[u8]>]>,
    /// `add_fields` pre-encoded: `"k":v,"k2":v2` and msgpack key/value pairs.
    add_json: Box<[u8]>,
    add_msgpack: Box<[u8]>,
    add_count: u32,
    rfc3339: Rfc3339,
    /// Ext values other than EventTime written as JSON `null` (they have no JSON meaning).
    nulled: u64,
}

impl Shape {
    pub fn new(c: &ShapeConfig) -> Self {
        let bytes = |s: &String| s.as_bytes().to_vec().into_boxed_slice();
        let mut drop: Vec<Box<[u8]>> = c.remove_keys.iter().map(bytes).collect();
        drop.extend(c.add_fields.iter().map(|(k, _)| bytes(k)));
        drop.extend(c.tag_key.iter().map(bytes));
        drop.extend(c.time_key.iter().map(bytes));
        drop.sort();
        drop.dedup();
        let mut add_json = vec![];
        let mut add_msgpack = vec![];
        for (k, v) in &c.add_fields {
            if !add_json.is_empty() {
                add_json.push(b',');
            }
            json::write_str(&mut add_json, k.as_bytes());
            add_json.push(b':');
            rmp::encode::write_str(&mut add_msgpack, k).expect("Vec writes cannot fail");
            match v {
                Literal::Str(s) => {
                    json::write_str(&mut add_json, s.as_bytes());
                    rmp::encode::write_str(&mut add_msgpack, s).expect("Vec writes cannot fail");
                }
                Literal::Int(i) => {
                    json::write_i64(&mut add_json, *i);
                    rmp::encode::write_sint(&mut add_msgpack, *i).expect("Vec writes cannot fail");
                }
                Literal::Float(f) => {
                    json::write_f64(&mut add_json, *f);
                    rmp::encode::write_f64(&mut add_msgpack, *f).expect("Vec writes cannot fail");
                }
                Literal::Bool(b) => {
                    add_json.extend_from_slice(if *b { b"true" } else { b"false" });
                    rmp::encode::write_bool(&mut add_msgpack, *b).expect("Vec writes cannot fail");
                }
            }
        }
        Shape {
            format: c.format,
            tag_key: c.tag_key.as_ref().map(bytes),
            time_key: c.time_key.as_ref().map(bytes),
            time_format: c.time_format,
            log_key: c.log_key.as_ref().map(bytes),
            drop: drop.into_boxed_slice(),
            add_json: add_json.into_boxed_slice(),
            add_msgpack: add_msgpack.into_boxed_slice(),
            add_count: c.add_fields.len() as u32,
            rfc3339: Rfc3339::default(),
            nulled: 0,
        }
    }

    /// Ext values (other than EventTime) this shape has written as `null`.
    pub fn nulled(&self) -> u64 {
        self.nulled
    }

    #[inline]
    fn dropped(&self, key: &[u8]) -> bool {
        !self.drop.is_empty() && self.drop.iter().any(|d| **d == *key)
    }

    /// Encodes an event whose record is a msgpack map (from the Forward input). The
    /// record was validated by the decoder.
    pub fn encode_msgpack(
        &mut self,
        out: &mut Vec<u8>,
        tag: &str,
        time: EventTime,
        record: &[u8],
    ) -> Encoded {
        let mark = out.len();
        let r = match self.format {
            Format::Json => self.msgpack_to_json(out, tag, time, record),
            Format::Msgpack => self.msgpack_to_msgpack(out, tag, time, record),
            Format::Text => self.msgpack_to_text(out, record),
        };
        match r {
            Ok(e) => e,
            Err(_) => {
                // Unreachable for validated records; never leave half an event behind.
                debug_assert!(false, "the decoder passed a malformed record");
                out.truncate(mark);
                Encoded::MissingLogKey
            }
        }
    }

    /// Encodes an event whose record is a parsed JSON object (from the JSON-lines input).
    pub fn encode_json(
        &mut self,
        out: &mut Vec<u8>,
        tag: &str,
        time: EventTime,
        obj: Object<'_, '_>,
    ) -> Encoded {
        match self.format {
            Format::Json => {
                let mut first = self.json_open(out, tag, time);
                let mut fields = Fields::new(obj);
                while let Some((k, v)) = fields.next() {
                    if self.dropped(k.as_bytes()) {
                        continue;
                    }
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    json::write_str(out, k.as_bytes());
                    out.push(b':');
                    tape_to_json(out, v);
                }
                self.json_close(out, first);
                Encoded::Written
            }
            Format::Msgpack => {
                let at = self.msgpack_open(out, tag, time);
                let mut n = self.injected();
                let mut fields = Fields::new(obj);
                while let Some((k, v)) = fields.next() {
                    if self.dropped(k.as_bytes()) {
                        continue;
                    }
                    n += 1;
                    rmp::encode::write_str(out, k).expect("Vec writes cannot fail");
                    tape_to_msgpack(out, v);
                }
                self.msgpack_close(out, at, n);
                Encoded::Written
            }
            Format::Text => {
                let key = self.log_key.as_deref().unwrap_or_default();
                let mut fields = Fields::new(obj);
                while let Some((k, v)) = fields.next() {
                    if k.as_bytes() == key {
                        match v.first() {
                            Some(Node::String(s)) => write_line(out, s.as_bytes()),
                            _ => {
                                tape_to_json(out, v);
                                out.push(b'\n');
                            }
                        }
                        return Encoded::Written;
                    }
                }
                Encoded::MissingLogKey
            }
        }
    }

    /// Writes `{` and the tag and time keys; returns whether nothing was written yet.
    fn json_open(&mut self, out: &mut Vec<u8>, tag: &str, time: EventTime) -> bool {
        out.push(b'{');
        let mut first = true;
        if let Some(k) = &self.tag_key {
            json::write_str(out, k);
            out.push(b':');
            json::write_str(out, tag.as_bytes());
            first = false;
        }
        if let Some(k) = &self.time_key {
            if !first {
                out.push(b',');
            }
            json::write_str(out, k);
            out.push(b':');
            match self.time_format {
                TimeFormat::Iso8601 => {
                    out.push(b'"');
                    self.rfc3339.write(out, time);
                    out.push(b'"');
                }
                TimeFormat::Double => json::write_time_double(out, time),
                TimeFormat::Epoch => json::write_i64(out, time.secs),
            }
            first = false;
        }
        first
    }

    fn json_close(&self, out: &mut Vec<u8>, first: bool) {
        if !self.add_json.is_empty() {
            if !first {
                out.push(b',');
            }
            out.extend_from_slice(&self.add_json);
        }
        out.extend_from_slice(b"}\n");
    }

    fn injected(&self) -> u32 {
        self.tag_key.is_some() as u32 + self.time_key.is_some() as u32
    }

    /// Writes a map32 head to be patched with the count, and the tag and time pairs;
    /// returns where the head is.
    fn msgpack_open(&mut self, out: &mut Vec<u8>, tag: &str, time: EventTime) -> usize {
        let at = out.len();
        out.extend_from_slice(&[0xdf, 0, 0, 0, 0]);
        if let Some(k) = &self.tag_key {
            write_msgpack_str(out, k);
            write_msgpack_str(out, tag.as_bytes());
        }
        if let Some(k) = &self.time_key {
            write_msgpack_str(out, k);
            match self.time_format {
                TimeFormat::Iso8601 => {
                    rmp::encode::write_str_len(out, Rfc3339::LEN).expect("Vec writes cannot fail");
                    self.rfc3339.write(out, time);
                }
                TimeFormat::Double => {
                    let f = time.secs as f64 + time.nanos as f64 / 1e9;
                    rmp::encode::write_f64(out, f).expect("Vec writes cannot fail");
                }
                TimeFormat::Epoch => {
                    rmp::encode::write_sint(out, time.secs).expect("Vec writes cannot fail");
                }
            }
        }
        at
    }

    fn msgpack_close(&self, out: &mut Vec<u8>, at: usize, n: u32) {
        out.extend_from_slice(&self.add_msgpack);
        let n = n + self.add_count;
        out[at + 1..at + 5].copy_from_slice(&n.to_be_bytes());
    }

    fn msgpack_to_json(
        &mut self,
        out: &mut Vec<u8>,
        tag: &str,
        time: EventTime,
        record: &[u8],
    ) -> Result<Encoded, Malformed> {
        let mut first = self.json_open(out, tag, time);
        let mut r = Reader::new(record);
        let Head::Map(n) = r.head()? else {
            return Err(Malformed);
        };
        for _ in 0..n {
            match r.str() {
                Some(key) if self.dropped(key) => {
                    r.skip()?;
                    continue;
                }
                Some(key) => {
                    if !first {
                        out.push(b',');
                    }
                    json::write_str(out, key);
                }
                None => {
                    if !first {
                        out.push(b',');
                    }
                    write_key_json(out, &mut r, false, &mut self.nulled)?;
                }
            }
            first = false;
            out.push(b':');
            transcode(out, &mut r, 0, false, &mut self.nulled)?;
        }
        self.json_close(out, first);
        Ok(Encoded::Written)
    }

    fn msgpack_to_msgpack(
        &mut self,
        out: &mut Vec<u8>,
        tag: &str,
        time: EventTime,
        record: &[u8],
    ) -> Result<Encoded, Malformed> {
        let mut r = Reader::new(record);
        let Head::Map(n) = r.head()? else {
            return Err(Malformed);
        };
        if self.drop.is_empty() && self.add_count == 0 && self.injected() == 0 {
            out.extend_from_slice(record);
            return Ok(Encoded::Written);
        }
        let at = self.msgpack_open(out, tag, time);
        let mut kept = self.injected();
        for _ in 0..n {
            let start = r.pos();
            let drop = match r.peek_head()? {
                Head::Str(len) => {
                    r.head()?;
                    self.dropped(r.take(len as usize)?)
                }
                _ => {
                    r.skip()?;
                    false
                }
            };
            r.skip()?;
            if !drop {
                out.extend_from_slice(&record[start..r.pos()]);
                kept += 1;
            }
        }
        self.msgpack_close(out, at, kept);
        Ok(Encoded::Written)
    }

    fn msgpack_to_text(&mut self, out: &mut Vec<u8>, record: &[u8]) -> Result<Encoded, Malformed> {
        let key = self.log_key.as_deref().unwrap_or_default();
        let mut r = Reader::new(record);
        let Head::Map(n) = r.head()? else {
            return Err(Malformed);
        };
        for _ in 0..n {
            let matches = match r.peek_head()? {
                Head::Str(len) => {
                    r.head()?;
                    r.take(len as usize)? == key
                }
                _ => {
                    r.skip()?;
                    false
                }
            };
            if !matches {
                r.skip()?;
                continue;
            }
            match r.head()? {
                Head::Str(len) | Head::Bin(len) => write_line(out, r.take(len as usize)?),
                head => {
                    // Not text: write the value as JSON instead.
                    transcode_head(out, &mut r, head, 0, false, &mut self.nulled)?;
                    out.push(b'\n');
                }
            }
            return Ok(Encoded::Written);
        }
        Ok(Encoded::MissingLogKey)
    }
}

/// A record the decoder should have refused.
#[derive(Debug)]
struct Malformed;

impl From<crate::decode::msgpack::Error> for Malformed {
    fn from(_: crate::decode::msgpack::Error) -> Self {
        Malformed
    }
}

/// Writes a text value as a line, adding the newline unless it already ends with one.
fn write_line(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    if s.last() != Some(&b'\n') {
        out.push(b'\n');
    }
}

fn write_msgpack_str(out: &mut Vec<u8>, s: &[u8]) {
    // Keys and tags come from our own config or a UTF-8-checked tag.
    let n = s.len() as u32;
    rmp::encode::write_str_len(out, n).expect("Vec writes cannot fail");
    out.extend_from_slice(s);
}

/// A map key that is not a string, written as a JSON string of its value. Inside such a
/// key (`in_key`), an array, map or ext key is written as a placeholder instead: each level
/// of stringifying escapes the level below again, so rendering them all would double the
/// output per level (a fuzzed 200-byte record once asked for gigabytes).
fn write_key_json(
    out: &mut Vec<u8>,
    r: &mut Reader<'_>,
    in_key: bool,
    nulled: &mut u64,
) -> Result<(), Malformed> {
    match r.head()? {
        Head::Bin(len) => json::write_str(out, r.take(len as usize)?),
        Head::Uint(v) => {
            out.push(b'"');
            json::write_u64(out, v);
            out.push(b'"');
        }
        Head::Int(v) => {
            out.push(b'"');
            json::write_i64(out, v);
            out.push(b'"');
        }
        Head::Bool(b) => out.extend_from_slice(if b { b"\"true\"" } else { b"\"false\"" }),
        Head::Nil => out.extend_from_slice(b"\"null\""),
        head @ (Head::Array(_) | Head::Map(_) | Head::Ext { .. }) if in_key => {
            skip_rest(r, head)?;
            out.extend_from_slice(match head {
                Head::Array(_) => b"\"<array>\"",
                Head::Map(_) => b"\"<map>\"",
                _ => b"\"<ext>\"",
            });
        }
        head => {
            // Floats, arrays, maps and ext values as keys are rare enough to render apart.
            let mut tmp = vec![];
            transcode_head(&mut tmp, r, head, 0, true, nulled)?;
            json::write_str(out, &tmp);
        }
    }
    Ok(())
}

/// Skips the rest of a value whose head was just read.
fn skip_rest(r: &mut Reader<'_>, head: Head) -> Result<(), Malformed> {
    match head {
        Head::Array(n) => (0..n).try_for_each(|_| r.skip())?,
        Head::Map(n) => (0..2 * n).try_for_each(|_| r.skip())?,
        Head::Str(len) | Head::Bin(len) | Head::Ext { len, .. } => drop(r.take(len as usize)?),
        _ => {}
    }
    Ok(())
}

/// Transcodes one msgpack value to JSON, advancing `r` past it. `in_key`: the value is
/// being rendered as a map key (see [`write_key_json`]); `nulled` counts ext values
/// written as `null`.
#[inline]
fn transcode(
    out: &mut Vec<u8>,
    r: &mut Reader<'_>,
    depth: usize,
    in_key: bool,
    nulled: &mut u64,
) -> Result<(), Malformed> {
    if let Some(s) = r.str() {
        json::write_str(out, s);
        return Ok(());
    }
    let head = r.head()?;
    transcode_head(out, r, head, depth, in_key, nulled)
}

/// Transcodes the value whose head was just read. Depth was bounded by the decoder; the
/// check here only keeps a decoder bug from becoming a stack overflow.
fn transcode_head(
    out: &mut Vec<u8>,
    r: &mut Reader<'_>,
    head: Head,
    depth: usize,
    in_key: bool,
    nulled: &mut u64,
) -> Result<(), Malformed> {
    if depth > crate::limits::MAX_DEPTH {
        return Err(Malformed);
    }
    match head {
        Head::Nil => out.extend_from_slice(b"null"),
        Head::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        Head::Uint(v) => json::write_u64(out, v),
        Head::Int(v) => json::write_i64(out, v),
        Head::F32(v) => json::write_f64(out, v as f64),
        Head::F64(v) => json::write_f64(out, v),
        Head::Str(len) | Head::Bin(len) => json::write_str(out, r.take(len as usize)?),
        Head::Array(n) => {
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                transcode(out, r, depth + 1, in_key, nulled)?;
            }
            out.push(b']');
        }
        Head::Map(n) => {
            out.push(b'{');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                match r.str() {
                    Some(key) => json::write_str(out, key),
                    None => write_key_json(out, r, in_key, nulled)?,
                }
                out.push(b':');
                transcode(out, r, depth + 1, in_key, nulled)?;
            }
            out.push(b'}');
        }
        Head::Ext { ty, len } => {
            let data = r.take(len as usize)?;
            if ty == EVENT_TIME_EXT && len == 8 {
                let secs = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let nanos = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
                json::write_time_double(
                    out,
                    EventTime {
                        secs: secs as i64,
                        nanos,
                    },
                );
            } else {
                // Other ext types have no JSON meaning.
                *nulled += 1;
                out.extend_from_slice(b"null");
            }
        }
    }
    Ok(())
}

/// Writes a parsed JSON value (its tape nodes) as JSON; returns the nodes it spanned.
/// Recursion is bounded by the parser's depth limit.
pub fn tape_to_json(out: &mut Vec<u8>, nodes: &[Node<'_>]) -> usize {
    match nodes.first() {
        Some(Node::String(s)) => {
            json::write_str(out, s.as_bytes());
            1
        }
        Some(Node::Static(s)) => {
            write_static_json(out, s);
            1
        }
        Some(Node::Object { len, .. }) => {
            out.push(b'{');
            let mut i = 1;
            for k in 0..*len {
                if k > 0 {
                    out.push(b',');
                }
                if let Some(Node::String(key)) = nodes.get(i) {
                    json::write_str(out, key.as_bytes());
                }
                out.push(b':');
                i += 1;
                i += tape_to_json(out, nodes.get(i..).unwrap_or_default());
            }
            out.push(b'}');
            i
        }
        Some(Node::Array { len, .. }) => {
            out.push(b'[');
            let mut i = 1;
            for k in 0..*len {
                if k > 0 {
                    out.push(b',');
                }
                i += tape_to_json(out, nodes.get(i..).unwrap_or_default());
            }
            out.push(b']');
            i
        }
        None => 0,
    }
}

fn write_static_json(out: &mut Vec<u8>, s: &StaticNode) {
    match s {
        StaticNode::Null => out.extend_from_slice(b"null"),
        StaticNode::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        StaticNode::I64(v) => json::write_i64(out, *v),
        StaticNode::U64(v) => json::write_u64(out, *v),
        StaticNode::F64(v) => json::write_f64(out, *v),
    }
}

/// Writes a parsed JSON value (its tape nodes) as msgpack.
pub fn tape_to_msgpack(out: &mut Vec<u8>, nodes: &[Node<'_>]) {
    const OK: &str = "Vec writes cannot fail";
    for node in nodes {
        match node {
            Node::String(s) => {
                rmp::encode::write_str(out, s).expect(OK);
            }
            Node::Object { len, .. } => {
                rmp::encode::write_map_len(out, *len as u32).expect(OK);
            }
            Node::Array { len, .. } => {
                rmp::encode::write_array_len(out, *len as u32).expect(OK);
            }
            Node::Static(StaticNode::Null) => rmp::encode::write_nil(out).expect(OK),
            Node::Static(StaticNode::Bool(b)) => rmp::encode::write_bool(out, *b).expect(OK),
            Node::Static(StaticNode::I64(v)) => {
                rmp::encode::write_sint(out, *v).expect(OK);
            }
            Node::Static(StaticNode::U64(v)) => {
                rmp::encode::write_uint(out, *v).expect(OK);
            }
            Node::Static(StaticNode::F64(v)) => rmp::encode::write_f64(out, *v).expect(OK),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(record: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        Shape::new(&ShapeConfig::default()).encode_msgpack(
            &mut out,
            "t",
            EventTime::default(),
            record,
        );
        out
    }

    #[test]
    fn non_string_keys_become_strings() {
        // {1: "a", nil: "b", [1, 2]: "c", {"k": {[3]: 4}}: "d"}
        let rec = [
            0x84, 0x01, 0xa1, b'a', 0xc0, 0xa1, b'b', 0x92, 0x01, 0x02, 0xa1, b'c', 0x81, 0xa1,
            b'k', 0x81, 0x91, 0x03, 0x04, 0xa1, b'd',
        ];
        let out = String::from_utf8(json(&rec)).unwrap();
        assert_eq!(
            out,
            "{\"1\":\"a\",\"null\":\"b\",\"[1,2]\":\"c\",\"{\\\"k\\\":{\\\"<array>\\\":4}}\":\"d\"}\n"
        );
    }

    /// An EventTime inside a record is a time; any other ext is `null`, and counted.
    #[test]
    fn ext_values_other_than_event_time_are_nulled_and_counted() {
        // {"t": EventTime(1, 500000000), "x": fixext1(type 5), "k": [fixext2(type 9)]}
        let rec = [
            0x83, 0xa1, b't', 0xd7, 0x00, 0, 0, 0, 1, 0x1d, 0xcd, 0x65, 0x00, 0xa1, b'x', 0xd4,
            0x05, 0xaa, 0xa1, b'k', 0x91, 0xd5, 0x09, 0x01, 0x02,
        ];
        let mut shape = Shape::new(&ShapeConfig::default());
        let mut out = vec![];
        shape.encode_msgpack(&mut out, "t", EventTime::default(), &rec);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(line, "{\"t\":1.500000000,\"x\":null,\"k\":[null]}\n");
        assert_eq!(shape.nulled(), 2);
    }

    #[test]
    fn msgpack_output_applies_the_same_shaping() {
        let cfg = ShapeConfig {
            format: Format::Msgpack,
            tag_key: Some("tag".into()),
            time_key: Some("time".into()),
            time_format: TimeFormat::Epoch,
            remove_keys: vec!["secret".into()],
            add_fields: vec![
                ("env".into(), Literal::Str("prod".into())),
                ("n".into(), Literal::Int(3)),
            ],
            ..ShapeConfig::default()
        };
        // {"log": "hi", "secret": "x", "env": "dev", 7: true}
        let rec = [
            0x84, 0xa3, b'l', b'o', b'g', 0xa2, b'h', b'i', 0xa6, b's', b'e', b'c', b'r', b'e',
            b't', 0xa1, b'x', 0xa3, b'e', b'n', b'v', 0xa3, b'd', b'e', b'v', 0x07, 0xc3,
        ];
        let mut out = vec![];
        let t = EventTime {
            secs: 1_700_000_000,
            nanos: 0,
        };
        Shape::new(&cfg).encode_msgpack(&mut out, "app", t, &rec);
        let v = rmpv::decode::read_value(&mut &out[..]).unwrap();
        let got: Vec<(String, String)> = v
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let want: Vec<(String, String)> = [
            ("\"tag\"", "\"app\""),
            ("\"time\"", "1700000000"),
            ("\"log\"", "\"hi\""),
            ("7", "true"),
            ("\"env\"", "\"prod\""),
            ("\"n\"", "3"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);

        // With nothing to change, the record's bytes go out as they came.
        let mut out = vec![];
        let plain = ShapeConfig {
            format: Format::Msgpack,
            ..ShapeConfig::default()
        };
        Shape::new(&plain).encode_msgpack(&mut out, "app", t, &rec);
        assert_eq!(out, rec);
    }

    /// Found by the `forward` fuzz target: maps as keys of maps as keys, 60 deep. Each level
    /// of stringified key used to escape the one below again, doubling the output per level.
    #[test]
    fn regression_nested_map_keys_do_not_amplify() {
        let depth = 60;
        let mut rec = vec![0x81; depth];
        rec.push(0x01); // the innermost key
        rec.extend(std::iter::repeat_n(0xc0, depth)); // every value nil
        assert!(crate::decode::msgpack::Reader::new(&rec).skip().is_ok());
        let out = json(&rec);
        assert!(
            out.len() < 10 * rec.len(),
            "{} bytes of JSON from {} of msgpack",
            out.len(),
            rec.len()
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.is_object());
    }
}
