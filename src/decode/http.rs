//! Fluentd `in_http` requests, sans I/O: the tag from the path (`/app/web` is `app.web`),
//! the records from a JSON or msgpack body or from a `json=` or `msgpack=` form field or
//! query parameter, and an optional `time` parameter (seconds since the epoch).

use super::msgpack::{Head, Reader};
use super::{DecodeError, EventTime};
use crate::limits::JSON_PADDING;

/// How the records of a request are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A JSON object or an array of objects; `records` ends with [`JSON_PADDING`] bytes.
    Json,
    /// A msgpack map or an array of maps.
    Msgpack,
}

/// What one request carries.
#[derive(Debug)]
pub struct Ingest {
    pub tag: String,
    pub time: Option<EventTime>,
    pub payload: Payload,
    pub records: Vec<u8>,
}

impl Ingest {
    /// The records without the padding JSON parsing needs.
    pub fn len(&self) -> usize {
        match self.payload {
            Payload::Json => self.records.len() - JSON_PADDING,
            Payload::Msgpack => self.records.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no tag: send the records to /<tag>, as /app.web")]
    NoTag,
    #[error("the tag is not UTF-8")]
    BadTag,
    #[error("the tag is longer than {} bytes", crate::limits::MAX_TAG)]
    TagTooLong,
    #[error(
        "unsupported Content-Type {0:?}: use application/json, application/msgpack or a json= or msgpack= form field"
    )]
    ContentType(String),
    #[error("no records: send a JSON or msgpack body, or a json= or msgpack= parameter")]
    NoRecords,
    #[error("the time parameter {0:?} is not a number of seconds since the epoch")]
    BadTime(String),
}

/// The records of a msgpack body (a map, or an array of maps), checked whole before any
/// is taken, each as its bytes.
pub fn msgpack_records(body: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    let mut r = Reader::new(body);
    let first = body.first().copied().unwrap_or(0);
    let n = match r.peek_head()? {
        Head::Map(_) => 1,
        Head::Array(n) => {
            r.head()?;
            n
        }
        _ => return Err(DecodeError::BadRecord(first)),
    };
    let mut out = Vec::with_capacity((n as usize).min(body.len()));
    for _ in 0..n {
        let marker = r.peek().unwrap_or(0);
        if !matches!(r.peek_head()?, Head::Map(_)) {
            return Err(DecodeError::BadRecord(marker));
        }
        out.push(r.value()?);
    }
    if !r.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok(out)
}

/// Reads a request's path, query, `Content-Type` and body.
pub fn parse(
    path: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<Ingest, RequestError> {
    let tag = tag_of(path)?;
    let mut params: Vec<(Vec<u8>, Vec<u8>)> = query.map(|q| form(q.as_bytes())).unwrap_or_default();
    let mime = content_type
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let mut from_body = None;
    match mime.as_str() {
        "application/json" | "text/json" => from_body = Some((Payload::Json, body)),
        "application/msgpack" | "application/x-msgpack" => {
            from_body = Some((Payload::Msgpack, body))
        }
        // curl -d sends a form; so does a body with no type.
        "application/x-www-form-urlencoded" | "" => params.extend(form(&body)),
        other => return Err(RequestError::ContentType(other.to_string())),
    }
    let time = match param(&params, b"time") {
        Some(t) => Some(parse_time(t)?),
        None => None,
    };
    let (payload, mut records) = match from_body {
        Some(b) if !b.1.is_empty() => b,
        _ => match (param(&params, b"json"), param(&params, b"msgpack")) {
            (Some(j), _) => (Payload::Json, j.to_vec()),
            (None, Some(m)) => (Payload::Msgpack, m.to_vec()),
            (None, None) => return Err(RequestError::NoRecords),
        },
    };
    if records.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::NoRecords);
    }
    if payload == Payload::Json {
        records.resize(records.len() + JSON_PADDING, 0);
    }
    Ok(Ingest {
        tag,
        time,
        payload,
        records,
    })
}

/// `/app/web` is the tag `app.web`, as in Fluentd.
fn tag_of(path: &str) -> Result<String, RequestError> {
    let raw = percent_decode(path.trim_start_matches('/').as_bytes(), false);
    let tag = String::from_utf8(raw).map_err(|_| RequestError::BadTag)?;
    let tag = tag.trim_end_matches('/').replace('/', ".");
    if tag.is_empty() {
        return Err(RequestError::NoTag);
    }
    if tag.len() > crate::limits::MAX_TAG {
        return Err(RequestError::TagTooLong);
    }
    Ok(tag)
}

fn param<'a>(params: &'a [(Vec<u8>, Vec<u8>)], key: &[u8]) -> Option<&'a [u8]> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

/// `a=1&b=2`, percent-decoded to bytes: a msgpack field is binary, not UTF-8.
fn form(s: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    s.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = match p.iter().position(|&b| b == b'=') {
                Some(i) => (&p[..i], &p[i + 1..]),
                None => (p, &[][..]),
            };
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

fn percent_decode(s: &[u8], plus_is_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        match s[i] {
            b'%' => match (
                s.get(i + 1).and_then(|&b| hex(b)),
                s.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn parse_time(t: &[u8]) -> Result<EventTime, RequestError> {
    let bad = || RequestError::BadTime(String::from_utf8_lossy(t).into_owned());
    let s = std::str::from_utf8(t).map_err(|_| bad())?.trim();
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = whole.parse().map_err(|_| bad())?;
    if secs < 0 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let mut nanos = 0u32;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += (d - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    Ok(EventTime { secs, nanos })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpadded(i: &Ingest) -> &[u8] {
        &i.records[..i.len()]
    }

    #[test]
    fn the_seeds_health_check() {
        let i = parse(
            "/healthcheck",
            Some("json=%7B%22log%22%3A+%22health+check%22%7D"),
            None,
            vec![],
        )
        .unwrap();
        assert_eq!(i.tag, "healthcheck");
        assert_eq!(i.payload, Payload::Json);
        assert_eq!(unpadded(&i), br#"{"log": "health check"}"#);
        assert_eq!(i.time, None);
    }

    #[test]
    fn bodies_forms_and_time() {
        let i = parse(
            "/app/web",
            None,
            Some("application/json; charset=utf-8"),
            b"[{}]".to_vec(),
        )
        .unwrap();
        assert_eq!((i.tag.as_str(), i.payload), ("app.web", Payload::Json));
        assert_eq!(i.records.len(), 4 + JSON_PADDING);
        let i = parse("/a", None, Some("application/msgpack"), vec![0x80]).unwrap();
        assert_eq!((i.payload, unpadded(&i)), (Payload::Msgpack, &[0x80][..]));
        let i = parse(
            "/a",
            Some("time=1700000000.5"),
            Some("application/x-www-form-urlencoded"),
            b"msgpack=%81%A1a%01".to_vec(),
        )
        .unwrap();
        assert_eq!(unpadded(&i), &[0x81, 0xa1, b'a', 0x01]);
        assert_eq!(
            i.time,
            Some(EventTime {
                secs: 1_700_000_000,
                nanos: 500_000_000
            })
        );
    }

    #[test]
    fn what_is_refused_says_why() {
        assert_eq!(
            parse("/", Some("json={}"), None, vec![]).unwrap_err(),
            RequestError::NoTag
        );
        assert_eq!(
            parse("/a", None, None, vec![]).unwrap_err(),
            RequestError::NoRecords
        );
        assert_eq!(
            parse("/a", Some("json={}&time=yesterday"), None, vec![]).unwrap_err(),
            RequestError::BadTime("yesterday".into())
        );
        assert!(matches!(
            parse("/a", None, Some("text/plain"), b"x".to_vec()).unwrap_err(),
            RequestError::ContentType(_)
        ));
        assert_eq!(percent_decode(b"100%", false), b"100%");
        assert_eq!(msgpack_records(&[0x92, 0x80, 0x80]).unwrap().len(), 2);
        assert_eq!(
            msgpack_records(&[0x91, 0x01]).unwrap_err(),
            DecodeError::BadRecord(1)
        );
        assert_eq!(
            msgpack_records(&[0x80, 0x80]).unwrap_err(),
            DecodeError::Trailing
        );
        assert_eq!(
            msgpack_records(&[0x92, 0x80]).unwrap_err(),
            DecodeError::Truncated
        );
        assert_eq!(percent_decode(b"%zz%4", false), b"%zz%4");
    }
}
