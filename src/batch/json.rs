//! JSON output primitives: string escaping, numbers and timestamps, written straight
//! into a batch buffer.

use crate::decode::EventTime;

/// Writes `s` as a JSON string. Invalid UTF-8 becomes U+FFFD, so the output is always
/// valid JSON. ASCII text, the common case, takes one pass: escapes and non-ASCII bytes
/// are found together, eight bytes at a time, and only text past the first non-ASCII byte
/// is validated as UTF-8.
#[inline]
pub fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    if let Some(at) = escape(out, s, true) {
        // Everything before `at` was ASCII, so `at` starts a character.
        let rest = &s[at..];
        if simdutf8::basic::from_utf8(rest).is_ok() {
            escape(out, rest, false);
        } else {
            for chunk in rest.utf8_chunks() {
                escape(out, chunk.valid().as_bytes(), false);
                if !chunk.invalid().is_empty() {
                    out.extend_from_slice("\u{FFFD}".as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// High bit set in each byte of `w` that is zero (the lowest flagged byte is exact).
#[inline(always)]
fn zero_bytes(w: u64) -> u64 {
    w.wrapping_sub(LO) & !w & HI
}

/// High bit set in each byte that needs escaping: `"`, `\` or a control character.
#[inline(always)]
fn escapes(w: u64) -> u64 {
    let control = w.wrapping_sub(LO * 0x20) & !w & HI;
    control | zero_bytes(w ^ (LO * b'"' as u64)) | zero_bytes(w ^ (LO * b'\\' as u64))
}

/// Copies `s` with JSON escapes, eight bytes at a time between escapes. With `ascii`, it
/// stops at the first byte of 0x80 or above and returns its offset, having copied what
/// came before.
#[inline(always)]
fn escape(out: &mut Vec<u8>, s: &[u8], ascii: bool) -> Option<usize> {
    let stop = if ascii { HI } else { 0 };
    let mut start = 0;
    let mut i = 0;
    while i + 8 <= s.len() {
        let w = u64::from_le_bytes(s[i..i + 8].try_into().unwrap());
        let m = escapes(w) | (w & stop);
        if m == 0 {
            i += 8;
            continue;
        }
        let j = i + (m.trailing_zeros() / 8) as usize;
        out.extend_from_slice(&s[start..j]);
        if ascii && s[j] >= 0x80 {
            return Some(j);
        }
        escape_byte(out, s[j]);
        i = j + 1;
        start = i;
    }
    // The tail, padded with spaces (neither escaped nor stopped at), as one more word:
    // most strings are short, and a byte loop over their last few bytes cost more than
    // the words before them.
    if i < s.len() {
        let mut pad = [b' '; 8];
        pad[..s.len() - i].copy_from_slice(&s[i..]);
        let w = u64::from_le_bytes(pad);
        if escapes(w) | (w & stop) == 0 {
            out.extend_from_slice(&s[start..]);
            return None;
        }
    }
    while i < s.len() {
        let b = s[i];
        if ascii && b >= 0x80 {
            out.extend_from_slice(&s[start..i]);
            return Some(i);
        }
        if b < 0x20 || b == b'"' || b == b'\\' {
            out.extend_from_slice(&s[start..i]);
            escape_byte(out, b);
            start = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&s[start..]);
    None
}

#[cold]
fn escape_byte(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[(b >> 4) as usize],
            HEX[(b & 15) as usize],
        ]),
    }
}

#[inline]
pub fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

#[inline]
pub fn write_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Writes a float; JSON has no NaN or infinity, so those become `null`.
#[inline]
pub fn write_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// Seconds with nine decimals, as a JSON number (`1700000000.000000001`); an f64
/// cannot hold nanoseconds at today's epoch.
pub fn write_time_double(out: &mut Vec<u8>, t: EventTime) {
    if t.secs < 0 && t.nanos > 0 {
        // -5 s + 1 ns is -4.999999999.
        out.push(b'-');
        write_u64(out, t.secs.unsigned_abs() - 1);
        write_nanos(out, 1_000_000_000 - t.nanos);
    } else {
        write_i64(out, t.secs);
        write_nanos(out, t.nanos);
    }
}

fn write_nanos(out: &mut Vec<u8>, nanos: u32) {
    let mut d = [b'.', b'0', b'0', b'0', b'0', b'0', b'0', b'0', b'0', b'0'];
    let mut n = nanos.min(999_999_999);
    for slot in d[1..].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&d);
}

/// Formats RFC 3339 UTC timestamps, caching the date and time of the last second seen
/// (events in a frame share their second far more often than not).
#[derive(Debug, Default)]
pub struct Rfc3339 {
    secs: Option<i64>,
    /// `YYYY-MM-DDTHH:MM:SS`
    prefix: [u8; 19],
}

/// Latest second we format with four-digit years (9999-12-31T23:59:59Z).
const MAX_SECS: i64 = 253_402_300_799;

impl Rfc3339 {
    /// Length of every timestamp written.
    pub const LEN: u32 = 30;

    /// Writes `2024-05-01T12:34:56.123456789Z` (without quotes).
    /// Times before the epoch are written as the epoch, and times past year 9999 as its
    /// last nanosecond.
    pub fn write(&mut self, out: &mut Vec<u8>, t: EventTime) {
        let (secs, nanos) = match t.secs {
            s if s < 0 => (0, 0),
            s if s > MAX_SECS => (MAX_SECS, 999_999_999),
            s => (s, t.nanos),
        };
        if self.secs != Some(secs) {
            self.prefix = civil(secs);
            self.secs = Some(secs);
        }
        out.extend_from_slice(&self.prefix);
        write_nanos(out, nanos);
        out.push(b'Z');
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the epoch (Howard Hinnant's civil_from_days).
pub(crate) fn civil(secs: i64) -> [u8; 19] {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut b = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for k in (0..width).rev() {
            b[at + k] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, sod / 3600);
    put(14, 2, sod / 60 % 60);
    put(17, 2, sod % 60);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(input: &[u8]) -> String {
        let mut out = vec![];
        write_str(&mut out, input);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn times_out_of_range_are_clamped_whole() {
        let mut f = Rfc3339::default();
        let mut out = vec![];
        // -0.5 s: half a second before the epoch.
        f.write(
            &mut out,
            EventTime {
                secs: -1,
                nanos: 500_000_000,
            },
        );
        out.push(b' ');
        f.write(
            &mut out,
            EventTime {
                secs: MAX_SECS + 1,
                nanos: 5,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1970-01-01T00:00:00.000000000Z 9999-12-31T23:59:59.999999999Z"
        );
    }

    #[test]
    fn escapes_what_json_requires() {
        assert_eq!(s(b"plain ascii text"), r#""plain ascii text""#);
        assert_eq!(s(b"a\"b\\c\nd\te\x01"), r#""a\"b\\c\nd\te\u0001""#);
        // escapes inside and across 8-byte words
        assert_eq!(s(b"0123456\"89abcdef\n"), r#""0123456\"89abcdef\n""#);
        assert_eq!(s("héllo wörld ✓".as_bytes()), "\"héllo wörld ✓\"");
        // invalid UTF-8 is replaced, not passed through
        assert_eq!(s(b"ok\xffok"), "\"ok\u{FFFD}ok\"");
    }

    #[test]
    fn escape_agrees_with_serde_json_on_every_byte() {
        for b in 0u8..0x80 {
            let input = [b'x', b, b'y', b'y', b'y', b'y', b'y', b'y', b'y', b];
            let got = s(&input);
            let want = serde_json::to_string(std::str::from_utf8(&input).unwrap()).unwrap();
            let parsed: String = serde_json::from_str(&got).unwrap();
            assert_eq!(parsed.as_bytes(), input, "byte {b:#04x}: {got} vs {want}");
        }
    }

    proptest::proptest! {
        #[test]
        fn escape_agrees_with_serde_json_on_any_string(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    4 => 0x20u8..0x7f,
                    1 => proptest::prelude::any::<u8>(),
                    1 => proptest::prelude::Just(b'"'),
                    1 => proptest::prelude::Just(b'\\'),
                ],
                0..80,
            ),
            utf8 in proptest::prelude::any::<bool>(),
        ) {
            // Valid UTF-8 (with multi-byte characters at any offset) and arbitrary bytes,
            // whose invalid sequences become U+FFFD.
            let input: Vec<u8> = if utf8 {
                String::from_utf8_lossy(&bytes).replace('\u{7f}', "é").into_bytes()
            } else {
                bytes
            };
            let want = serde_json::to_string(&String::from_utf8_lossy(&input)).unwrap();
            proptest::prop_assert_eq!(s(&input), want);
        }
    }

    #[test]
    fn formats_times() {
        let mut out = vec![];
        let mut f = Rfc3339::default();
        f.write(&mut out, EventTime { secs: 0, nanos: 5 });
        out.push(b' ');
        f.write(
            &mut out,
            EventTime {
                secs: 1_709_251_199,
                nanos: 123_456_789,
            },
        );
        out.push(b' ');
        // 2024-02-29 (a leap day)
        f.write(
            &mut out,
            EventTime {
                secs: 1_709_164_800,
                nanos: 0,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1970-01-01T00:00:00.000000005Z 2024-02-29T23:59:59.123456789Z 2024-02-29T00:00:00.000000000Z"
        );
        let mut out = vec![];
        write_time_double(
            &mut out,
            EventTime {
                secs: 1_700_000_000,
                nanos: 1,
            },
        );
        assert_eq!(out, b"1700000000.000000001");
        let mut out = vec![];
        write_time_double(&mut out, EventTime { secs: -5, nanos: 1 });
        assert_eq!(out, b"-4.999999999");
    }
}
