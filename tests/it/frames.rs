//! A Forward client for the tests: connect, read acks, tell a server-side close. The
//! frames themselves come from `tests/support/forward.rs`.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub use crate::support::{MODES, Mode, Opts, Time, gzip, record};

/// A frame with the `size` option and, if given, `chunk`.
pub fn frame(
    mode: Mode,
    tag: &str,
    events: &[(Time, rmpv::Value)],
    chunk: Option<&str>,
) -> Vec<u8> {
    crate::support::frame(
        mode,
        tag,
        events,
        Opts {
            chunk,
            size: true,
            nil_options: false,
        },
    )
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(super::harness::PATIENCE)).unwrap();
    s
}

/// Reads `{"ack": chunk}` replies from a connection, keeping whatever arrived past the
/// last whole reply for the next call.
pub struct AckReader {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl AckReader {
    pub fn new(conn: TcpStream) -> Self {
        AckReader { conn, buf: vec![] }
    }

    /// Waits for at least one reply; returns every whole one that has arrived.
    pub fn some(&mut self) -> Vec<String> {
        let mut tmp = [0u8; 4096];
        loop {
            let mut acks = vec![];
            loop {
                let mut r = &self.buf[..];
                let Ok(v) = rmpv::decode::read_value(&mut r) else {
                    break;
                };
                let used = self.buf.len() - r.len();
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
                self.buf.drain(..used);
            }
            if !acks.is_empty() {
                return acks;
            }
            let k = self.conn.read(&mut tmp).expect("reading acks");
            assert!(k > 0, "connection closed while waiting for acks");
            self.buf.extend_from_slice(&tmp[..k]);
        }
    }
}

/// Reads `{"ack": chunk}` replies until at least `n` have arrived; returns their chunk ids.
pub fn read_acks(s: &mut TcpStream, n: usize) -> Vec<String> {
    let mut r = AckReader::new(s.try_clone().unwrap());
    let mut acks = vec![];
    while acks.len() < n {
        acks.extend(r.some());
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
