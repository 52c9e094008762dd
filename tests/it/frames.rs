//! Forward protocol frames for the tests, built with rmpv (not with the code under test),
//! and a client that sends them and reads the acks back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rmpv::Value;

/// The four modes, with both encodings of PackedForward entries and both codecs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Message,
    Forward,
    PackedBin,
    PackedStr,
    Gzip,
    Zstd,
}

pub const MODES: [Mode; 6] = [
    Mode::Message,
    Mode::Forward,
    Mode::PackedBin,
    Mode::PackedStr,
    Mode::Gzip,
    Mode::Zstd,
];

/// How the event time is written.
#[derive(Clone, Copy, Debug)]
pub enum Time {
    Int(u32),
    FixExt8(u32, u32),
    Ext8(u32, u32),
}

pub fn put_time(out: &mut Vec<u8>, t: Time) {
    match t {
        Time::Int(s) => rmp::encode::write_uint(out, s as u64).map(drop).unwrap(),
        Time::FixExt8(s, n) => {
            out.extend_from_slice(&[0xd7, 0x00]);
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
        }
        Time::Ext8(s, n) => {
            out.extend_from_slice(&[0xc7, 0x08, 0x00]);
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// A record with `seq` and `client`, padded with a `log` field to about `size` bytes.
pub fn record(client: &str, seq: usize, size: usize) -> Value {
    let base = 80;
    let log = "x".repeat(size.saturating_sub(base));
    Value::Map(vec![
        (
            "container_id".into(),
            "4f1a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c".into(),
        ),
        ("container_name".into(), "/web-1".into()),
        ("source".into(), "stdout".into()),
        ("seq".into(), Value::from(seq as u64)),
        ("client".into(), client.into()),
        ("log".into(), log.into()),
    ])
}

/// One frame in `mode` carrying `events`, with the `chunk` option if given.
pub fn frame(mode: Mode, tag: &str, events: &[(Time, Value)], chunk: Option<&str>) -> Vec<u8> {
    let mut entries = vec![];
    for (t, r) in events {
        entries.push(0x92);
        put_time(&mut entries, *t);
        rmpv::encode::write_value(&mut entries, r).unwrap();
    }
    let mut opts: Vec<(Value, Value)> = vec![("size".into(), Value::from(events.len() as u64))];
    if let Some(c) = chunk {
        opts.push(("chunk".into(), c.into()));
    }
    let mut out = vec![];
    let n = if mode == Mode::Message { 4 } else { 3 };
    rmp::encode::write_array_len(&mut out, n).unwrap();
    rmp::encode::write_str(&mut out, tag).unwrap();
    match mode {
        Mode::Message => {
            assert_eq!(events.len(), 1, "Message mode carries one event");
            put_time(&mut out, events[0].0);
            rmpv::encode::write_value(&mut out, &events[0].1).unwrap();
        }
        Mode::Forward => {
            rmp::encode::write_array_len(&mut out, events.len() as u32).unwrap();
            out.extend(entries);
        }
        Mode::PackedBin => rmp::encode::write_bin(&mut out, &entries).unwrap(),
        Mode::PackedStr => {
            rmp::encode::write_str_len(&mut out, entries.len() as u32).unwrap();
            out.extend(entries);
        }
        Mode::Gzip => {
            // Two gzip members, as Fluent Bit may send.
            let (a, b) = entries.split_at(entries.len() / 2);
            let mut z = gzip(a);
            z.extend(gzip(b));
            rmp::encode::write_bin(&mut out, &z).unwrap();
            opts.push(("compressed".into(), "gzip".into()));
        }
        Mode::Zstd => {
            rmp::encode::write_bin(&mut out, &zstd::encode_all(&entries[..], 3).unwrap()).unwrap();
            opts.push(("compressed".into(), "zstd".into()));
        }
    }
    rmpv::encode::write_value(&mut out, &Value::Map(opts)).unwrap();
    out
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(super::harness::PATIENCE)).unwrap();
    s
}

/// Reads `{"ack": chunk}` replies until `n` have arrived; returns their chunk ids.
pub fn read_acks(s: &mut TcpStream, n: usize) -> Vec<String> {
    let mut buf = vec![];
    let mut acks = vec![];
    let mut tmp = [0u8; 4096];
    while acks.len() < n {
        let k = s.read(&mut tmp).expect("reading acks");
        assert!(k > 0, "connection closed after {} of {n} acks", acks.len());
        buf.extend_from_slice(&tmp[..k]);
        loop {
            let mut r = &buf[..];
            match rmpv::decode::read_value(&mut r) {
                Ok(v) => {
                    let used = buf.len() - r.len();
                    let map = v.as_map().expect("an ack is a map");
                    assert_eq!(map.len(), 1);
                    assert_eq!(map[0].0.as_str(), Some("ack"));
                    acks.push(
                        map[0]
                            .1
                            .as_str()
                            .expect("ack value is a string")
                            .to_string(),
                    );
                    buf.drain(..used);
                }
                Err(_) => break,
            }
        }
    }
    acks
}

/// Whether the server closed the connection (EOF or reset) within the patience.
pub fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tmp = [0u8; 256];
    loop {
        match s.read(&mut tmp) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}
