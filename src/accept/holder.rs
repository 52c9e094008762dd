//! Who else listens on an address. SO_REUSEPORT lets every core of one sluice share a
//! port, but it would as well let a second sluice (same user) bind it and take half of
//! the new connections, silently. So before binding, the kernel's socket tables are read
//! for a socket already bound there, and its process found, where /proc lets us see it.

use std::net::{IpAddr, SocketAddr};

/// A socket bound where we want to bind, and its process if known.
#[derive(Debug, PartialEq, Eq)]
pub struct Holder {
    pub inode: u64,
    pub pid: Option<u32>,
    pub name: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pid, &self.name) {
            (Some(pid), Some(name)) => write!(f, "process {pid} ({name})"),
            (Some(pid), None) => write!(f, "process {pid}"),
            _ => write!(f, "another process (socket inode {})", self.inode),
        }
    }
}

/// The socket another process has bound to `addr` (TCP listening, or UDP), if any.
pub fn holder(addr: SocketAddr, udp: bool) -> Option<Holder> {
    let table = match (addr.is_ipv6(), udp) {
        (false, false) => "/proc/net/tcp",
        (true, false) => "/proc/net/tcp6",
        (false, true) => "/proc/net/udp",
        (true, true) => "/proc/net/udp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    // TCP_LISTEN; an unconnected UDP socket shows as TCP_CLOSE.
    let state = if udp { "07" } else { "0A" };
    let mine = sockets("/proc/self/fd");
    let inode = text
        .lines()
        .skip(1)
        .filter_map(parse_line)
        .find(|(local, st, inode)| st == state && overlaps(*local, addr) && !mine.contains(inode))?
        .2;
    let (pid, name) = owner(inode).unzip();
    Some(Holder { inode, pid, name })
}

/// The socket inodes among a process's descriptors.
fn sockets(fd_dir: impl AsRef<std::path::Path>) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(fd_dir) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let l = std::fs::read_link(fd.path()).ok()?;
            let l = l.to_str()?;
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// `(local address, state, inode)` of one line of a /proc/net table.
fn parse_line(line: &str) -> Option<(SocketAddr, String, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (ip, port) = f.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The address is in 32-bit words of host byte order.
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words[..] {
        [a] => IpAddr::from(a.to_be_bytes()),
        [a, b, c, d] => {
            let mut o = [0u8; 16];
            for (k, w) in [a, b, c, d].iter().enumerate() {
                o[k * 4..k * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            IpAddr::from(o)
        }
        _ => return None,
    };
    Some((
        SocketAddr::new(ip, port),
        f.get(3)?.to_string(),
        f.get(9)?.parse().ok()?,
    ))
}

/// Whether a socket bound to `bound` takes connections meant for `want`.
fn overlaps(bound: SocketAddr, want: SocketAddr) -> bool {
    bound.port() == want.port()
        && (bound.ip() == want.ip() || bound.ip().is_unspecified() || want.ip().is_unspecified())
}

/// The process holding socket `inode`, and its name, where /proc shows it.
fn owner(inode: u64) -> Option<(u32, String)> {
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if sockets(p.path().join("fd")).contains(&inode) {
            let name = std::fs::read_to_string(p.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            return Some((pid, name));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_tables() {
        let l = parse_line("   0: 0100007F:5EA0 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 156375 1 0000000074d7d5d3 100 0 0 10 0").unwrap();
        assert_eq!(l, ("127.0.0.1:24224".parse().unwrap(), "0A".into(), 156375));
        let l = parse_line("   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 42 1").unwrap();
        assert_eq!(l.0, "[::1]:8080".parse().unwrap());
        assert!(overlaps(
            "0.0.0.0:24224".parse().unwrap(),
            "127.0.0.1:24224".parse().unwrap()
        ));
        assert!(!overlaps(
            "127.0.0.2:24224".parse().unwrap(),
            "127.0.0.1:24224".parse().unwrap()
        ));
    }

    #[test]
    fn finds_our_own_listener_and_passes_it_over() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let inode = std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .filter_map(parse_line)
            .find(|(a, st, _)| *a == addr && st == "0A")
            .expect("our listener is in the table")
            .2;
        assert!(sockets("/proc/self/fd").contains(&inode));
        // Our own sockets are not another's (the integration tests start a second sluice).
        assert_eq!(holder(addr, false), None);
        drop(l);
    }
}
