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
