//! A borrowing msgpack reader: value heads, payload slices and skipping over `&[u8]`,
//! without allocation or recursion. The Forward decoder and the transcoder stand on it.

use crate::limits::MAX_DEPTH;

/// What a marker says about the value it starts. String, binary and ext payloads are
/// not read; the caller takes them with [`Reader::take`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Head {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(u32),
    Bin(u32),
    Array(u32),
    Map(u32),
    Ext { ty: i8, len: u32 },
}

/// Why a msgpack value could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The bytes end inside the value.
    Truncated,
    /// The never-used marker 0xc1.
    Reserved,
    /// Arrays and maps nest deeper than [`MAX_DEPTH`].
    TooDeep,
}

/// Parses the head at `buf[pos..]`: `Ok(None)` when the head itself is incomplete,
/// otherwise the head and its length in bytes.
#[inline]
pub fn parse_head(buf: &[u8], pos: usize) -> Result<Option<(Head, usize)>, Error> {
    let Some(&m) = buf.get(pos) else {
        return Ok(None);
    };
    let b = &buf[pos + 1..];
    macro_rules! be {
        ($t:ty, $n:expr) => {
            match b.get(..$n) {
                Some(s) => <$t>::from_be_bytes(s.try_into().unwrap()),
                None => return Ok(None),
            }
        };
    }
    let head = match m {
        0x00..=0x7f => (Head::Uint(m as u64), 1),
        0x80..=0x8f => (Head::Map((m & 0x0f) as u32), 1),
        0x90..=0x9f => (Head::Array((m & 0x0f) as u32), 1),
        0xa0..=0xbf => (Head::Str((m & 0x1f) as u32), 1),
        0xc0 => (Head::Nil, 1),
        0xc1 => return Err(Error::Reserved),
        0xc2 => (Head::Bool(false), 1),
        0xc3 => (Head::Bool(true), 1),
        0xc4 => (Head::Bin(be!(u8, 1) as u32), 2),
        0xc5 => (Head::Bin(be!(u16, 2) as u32), 3),
        0xc6 => (Head::Bin(be!(u32, 4)), 5),
        0xc7 => {
            let len = be!(u8, 1) as u32;
            let ty = match b.get(1) {
                Some(&t) => t as i8,
                None => return Ok(None),
            };
            (Head::Ext { ty, len }, 3)
        }
        0xc8 => {
            let len = be!(u16, 2) as u32;
            let ty = match b.get(2) {
                Some(&t) => t as i8,
                None => return Ok(None),
            };
            (Head::Ext { ty, len }, 4)
        }
        0xc9 => {
            let len = be!(u32, 4);
            let ty = match b.get(4) {
                Some(&t) => t as i8,
                None => return Ok(None),
            };
            (Head::Ext { ty, len }, 6)
        }
        0xca => (Head::F32(f32::from_bits(be!(u32, 4))), 5),
        0xcb => (Head::F64(f64::from_bits(be!(u64, 8))), 9),
        0xcc => (Head::Uint(be!(u8, 1) as u64), 2),
        0xcd => (Head::Uint(be!(u16, 2) as u64), 3),
        0xce => (Head::Uint(be!(u32, 4) as u64), 5),
        0xcf => (Head::Uint(be!(u64, 8)), 9),
        0xd0 => (Head::Int(be!(i8, 1) as i64), 2),
        0xd1 => (Head::Int(be!(i16, 2) as i64), 3),
        0xd2 => (Head::Int(be!(i32, 4) as i64), 5),
        0xd3 => (Head::Int(be!(i64, 8)), 9),
        0xd4..=0xd8 => {
            let ty = be!(i8, 1);
            (
                Head::Ext {
                    ty,
                    len: 1 << (m - 0xd4),
                },
                2,
            )
        }
        0xd9 => (Head::Str(be!(u8, 1) as u32), 2),
        0xda => (Head::Str(be!(u16, 2) as u32), 3),
        0xdb => (Head::Str(be!(u32, 4)), 5),
        0xdc => (Head::Array(be!(u16, 2) as u32), 3),
        0xdd => (Head::Array(be!(u32, 4)), 5),
        0xde => (Head::Map(be!(u16, 2) as u32), 3),
        0xdf => (Head::Map(be!(u32, 4)), 5),
        0xe0..=0xff => (Head::Int(m as i8 as i64), 1),
    };
    Ok(Some(head))
}

/// Bytes of payload that follow a head (strings, binaries and ext values).
#[inline]
pub fn payload_len(head: Head) -> usize {
    match head {
        Head::Str(n) | Head::Bin(n) | Head::Ext { len: n, .. } => n as usize,
        _ => 0,
    }
}

/// Number of values nested directly inside a head (arrays count elements, maps count
/// keys and values).
#[inline]
pub fn children(head: Head) -> u64 {
    match head {
        Head::Array(n) => n as u64,
        Head::Map(n) => 2 * n as u64,
        _ => 0,
    }
}

/// A cursor over a complete msgpack byte string.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The first byte of the next value, if any.
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Reads the next head; a string, binary or ext payload is left for [`Reader::take`].
    /// The markers of typical records are decoded inline, which keeps the head in
    /// registers; the rest go through [`parse_head`].
    #[inline(always)]
    pub fn head(&mut self) -> Result<Head, Error> {
        let Some(&m) = self.buf.get(self.pos) else {
            return Err(Error::Truncated);
        };
        let head = match m {
            0x00..=0x7f => Head::Uint(m as u64),
            0xa0..=0xbf => Head::Str((m & 0x1f) as u32),
            0x80..=0x8f => Head::Map((m & 0x0f) as u32),
            0x90..=0x9f => Head::Array((m & 0x0f) as u32),
            0xd9 => match self.buf.get(self.pos + 1) {
                Some(&len) => {
                    self.pos += 2;
                    return Ok(Head::Str(len as u32));
                }
                None => return Err(Error::Truncated),
            },
            // fixext8: EventTime
            0xd7 => match self.buf.get(self.pos + 1) {
                Some(&ty) => {
                    self.pos += 2;
                    return Ok(Head::Ext {
                        ty: ty as i8,
                        len: 8,
                    });
                }
                None => return Err(Error::Truncated),
            },
            _ => return self.head_slow(),
        };
        self.pos += 1;
        Ok(head)
    }

    #[inline(never)]
    fn head_slow(&mut self) -> Result<Head, Error> {
        match parse_head(self.buf, self.pos)? {
            Some((head, len)) => {
                self.pos += len;
                Ok(head)
            }
            None => Err(Error::Truncated),
        }
    }

    /// Takes a string (fixstr, str8, str16 or str32) if one comes next; otherwise, or if
    /// it is cut short, stays put and returns `None`. Strings are most of a record, and
    /// this path keeps them out of [`Head`].
    #[inline(always)]
    pub fn str(&mut self) -> Option<&'a [u8]> {
        let b = self.buf;
        let p = self.pos;
        let (start, len) = match *b.get(p)? {
            m @ 0xa0..=0xbf => (p + 1, (m & 0x1f) as usize),
            0xd9 => (p + 2, *b.get(p + 1)? as usize),
            0xda => (
                p + 3,
                u16::from_be_bytes([*b.get(p + 1)?, *b.get(p + 2)?]) as usize,
            ),
            0xdb => (
                p + 5,
                u32::from_be_bytes(b.get(p + 1..p + 5)?.try_into().ok()?) as usize,
            ),
            _ => return None,
        };
        let s = b.get(start..start + len)?;
        self.pos = start + len;
        Some(s)
    }

    /// Reads the next head without moving.
    #[inline(always)]
    pub fn peek_head(&self) -> Result<Head, Error> {
        self.clone().head()
    }

    /// Takes the next `n` bytes.
    #[inline]
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).ok_or(Error::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(Error::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    /// Skips one whole value, refusing nesting deeper than [`MAX_DEPTH`].
    pub fn skip(&mut self) -> Result<(), Error> {
        let mut left = [0u64; MAX_DEPTH + 1];
        let mut depth = 0;
        left[0] = 1;
        loop {
            if left[depth] == 0 {
                if depth == 0 {
                    return Ok(());
                }
                depth -= 1;
                continue;
            }
            left[depth] -= 1;
            let (next, n) = self.step()?;
            self.pos = next;
            if n > 0 {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Error::TooDeep);
                }
                left[depth] = n;
            }
        }
    }

    /// The end of the value's head and payload, and how many values nest in it. The
    /// markers of typical records are decoded inline; the rest go through [`parse_head`].
    #[inline(always)]
    fn step(&self) -> Result<(usize, u64), Error> {
        let pos = self.pos;
        let Some(&m) = self.buf.get(pos) else {
            return Err(Error::Truncated);
        };
        let (end, n) = match m {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (pos + 1, 0),
            0xa0..=0xbf => (pos + 1 + (m & 0x1f) as usize, 0),
            0x80..=0x8f => (pos + 1, 2 * (m & 0x0f) as u64),
            0x90..=0x9f => (pos + 1, (m & 0x0f) as u64),
            0xd9 => match self.buf.get(pos + 1) {
                Some(&len) => (pos + 2 + len as usize, 0),
                None => return Err(Error::Truncated),
            },
            _ => match parse_head(self.buf, pos)? {
                Some((head, len)) => (pos + len + payload_len(head), children(head)),
                None => return Err(Error::Truncated),
            },
        };
        if end > self.buf.len() {
            return Err(Error::Truncated);
        }
        Ok((end, n))
    }

    /// Skips one whole value and returns its bytes.
    pub fn value(&mut self) -> Result<&'a [u8], Error> {
        let start = self.pos;
        self.skip()?;
        Ok(&self.buf[start..self.pos])
    }
}

/// Finds where one msgpack value ends in a byte stream that arrives in pieces. It keeps
/// its place between calls, so a large frame is scanned once however many reads it takes.
#[derive(Debug, Default)]
pub struct Scan {
    /// Offset of the next head to read (may point past the bytes seen so far when a
    /// payload is still arriving).
    pos: usize,
    /// Values still to skip before the outer value is complete.
    left: u64,
}

/// Progress of a [`Scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The value is complete and spans this many bytes.
    Complete(usize),
    /// At least this many bytes are needed before the scan can go on.
    Need(usize),
}

/// Why a [`Scan`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanError {
    Reserved,
    /// The value cannot fit in the given limit.
    TooLarge,
}

impl Scan {
    /// Continues over `buf`, which holds the value from its first byte on (and may hold
    /// more values after it). `limit` bounds the value's size.
    pub fn resume(&mut self, buf: &[u8], limit: usize) -> Result<Step, ScanError> {
        if self.pos == 0 && self.left == 0 {
            self.left = 1;
        }
        while self.left > 0 {
            let (head, len) = match parse_head(buf, self.pos) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(Step::Need(self.pos.max(buf.len()) + 1)),
                Err(_) => return Err(ScanError::Reserved),
            };
            self.left = self.left - 1 + children(head);
            self.pos += len + payload_len(head);
            // Every value still to come takes at least one byte.
            if (self.pos as u64).saturating_add(self.left) > limit as u64 {
                return Err(ScanError::TooLarge);
            }
        }
        if self.pos > buf.len() {
            return Ok(Step::Need(self.pos));
        }
        let n = self.pos;
        *self = Scan::default();
        Ok(Step::Complete(n))
    }

    /// Forgets any partial progress.
    pub fn reset(&mut self) {
        *self = Scan::default();
    }

    /// Whether a value has been started but not finished.
    pub fn in_progress(&self) -> bool {
        self.left > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        // fixmap{1}, fixarray[2], fixstr "a"
        assert_eq!(parse_head(&[0x81], 0), Ok(Some((Head::Map(1), 1))));
        assert_eq!(parse_head(&[0x92], 0), Ok(Some((Head::Array(2), 1))));
        assert_eq!(parse_head(&[0xa1, b'a'], 0), Ok(Some((Head::Str(1), 1))));
        // negative fixint -1, int16 -300
        assert_eq!(parse_head(&[0xff], 0), Ok(Some((Head::Int(-1), 1))));
        assert_eq!(
            parse_head(&[0xd1, 0xfe, 0xd4], 0),
            Ok(Some((Head::Int(-300), 3)))
        );
        // fixext8 type 0 (EventTime), ext8 len 8 type 0
        assert_eq!(
            parse_head(&[0xd7, 0x00], 0),
            Ok(Some((Head::Ext { ty: 0, len: 8 }, 2)))
        );
        assert_eq!(
            parse_head(&[0xc7, 0x08, 0x00], 0),
            Ok(Some((Head::Ext { ty: 0, len: 8 }, 3)))
        );
        // str32 header cut short
        assert_eq!(parse_head(&[0xdb, 0, 0], 0), Ok(None));
        assert_eq!(parse_head(&[0xc1], 0), Err(Error::Reserved));
    }

    #[test]
    fn skip_nested_and_truncated() {
        // {"a": [1, {"b": nil}]}
        let v = [0x81, 0xa1, b'a', 0x92, 0x01, 0x81, 0xa1, b'b', 0xc0, 0xff];
        let mut r = Reader::new(&v);
        assert_eq!(r.value().unwrap().len(), 9);
        assert_eq!(r.peek(), Some(0xff));
        let mut r = Reader::new(&v[..6]);
        assert_eq!(r.skip(), Err(Error::Truncated));
    }

    #[test]
    fn skip_refuses_deep_nesting() {
        let mut v = vec![0x91; MAX_DEPTH + 1];
        v.push(0xc0);
        assert_eq!(Reader::new(&v).skip(), Err(Error::TooDeep));
        let ok = &v[1..];
        assert!(Reader::new(ok).skip().is_ok());
    }

    #[test]
    fn scan_resumes_across_pieces() {
        // ["t", bin8 of 4 bytes]
        let v = [0x92, 0xa1, b't', 0xc4, 0x04, 1, 2, 3, 4, 0x90];
        let mut s = Scan::default();
        assert_eq!(s.resume(&v[..2], 100), Ok(Step::Need(4)));
        assert_eq!(s.resume(&v[..5], 100), Ok(Step::Need(9)));
        assert_eq!(s.resume(&v[..8], 100), Ok(Step::Need(9)));
        assert_eq!(s.resume(&v, 100), Ok(Step::Complete(9)));
        assert!(!s.in_progress());
    }

    #[test]
    fn scan_refuses_declared_sizes_over_the_limit() {
        // array32 claiming 2^32-1 elements
        let v = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            Scan::default().resume(&v, 1 << 20),
            Err(ScanError::TooLarge)
        );
        // bin32 claiming 4 GiB
        let v = [0xc6, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            Scan::default().resume(&v, 1 << 20),
            Err(ScanError::TooLarge)
        );
    }
}
