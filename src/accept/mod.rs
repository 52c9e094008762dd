//! Accept stage: the listening sockets. Each core gets its own SO_REUSEPORT listener for
//! every TCP input and its own socket for every UDP input, so the kernel spreads
//! connections and datagrams over the cores with no hand-off between them.
//!
//! Addresses are resolved once, up front: a reservation socket binds each input's address
//! (so port 0 becomes one real port for every core, and a taken port is reported before
//! any core starts), and is dropped once the cores have bound their own.

pub mod epoll;
pub mod holder;
pub mod http;
pub mod serve;
pub mod uring;

/// Waits for a started core to end.
pub type CoreHandle = Box<dyn FnOnce() -> Result<(), String> + Send>;

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, InputKind};

/// What one core listens on.
pub struct CoreSockets {
    /// `(input index, address)`: the core binds its own listener there.
    pub tcp: Vec<(usize, SocketAddr)>,
    /// `(input index, socket)`: bound already, one per core.
    pub udp: Vec<(usize, Socket)>,
}

/// The resolved addresses and each core's sockets.
pub struct Bound {
    /// Per input, the address actually bound.
    pub addrs: Vec<SocketAddr>,
    pub cores: Vec<CoreSockets>,
    /// Held until every core has bound its listeners.
    pub reservations: Vec<Socket>,
    /// The HTTP inputs' listeners, served by one thread of their own.
    pub http: Vec<http::Listener>,
}

#[derive(Debug, thiserror::Error)]
// `cause` is in the message, so it is not also a `source` (which would print it twice).
#[error("inputs.{input}.address: cannot bind {addr} ({proto}): {cause}")]
pub struct BindError {
    input: String,
    addr: SocketAddr,
    proto: &'static str,
    cause: std::io::Error,
}

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

pub fn uses_tcp(kind: &InputKind) -> bool {
    match kind {
        InputKind::Forward { .. } => true,
        InputKind::JsonLines { tcp, .. } => *tcp,
        InputKind::Http { .. } => false,
    }
}

pub fn uses_udp(kind: &InputKind) -> bool {
    match kind {
        InputKind::Forward { heartbeat, .. } => *heartbeat,
        InputKind::JsonLines { udp, .. } => *udp,
        InputKind::Http { .. } => false,
    }
}

/// Fails if another process has a socket bound to `addr` that SO_REUSEPORT would let
/// ours share.
fn taken(addr: SocketAddr, udp: bool) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    match holder::holder(addr, udp) {
        None => Ok(()),
        Some(h) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "already in use by {h}; is another sluice running? Two would split the connections between them"
            ),
        )),
    }
}

/// Resolves every input's address and creates each core's datagram sockets.
pub fn bind(cfg: &Config) -> Result<Bound, BindError> {
    let workers = cfg.engine.workers;
    let mut bound = Bound {
        addrs: Vec::new(),
        cores: (0..workers)
            .map(|_| CoreSockets {
                tcp: vec![],
                udp: vec![],
            })
            .collect(),
        reservations: Vec::new(),
        http: Vec::new(),
    };
    for (i, input) in cfg.inputs.iter().enumerate() {
        let fail = |addr, proto, cause| BindError {
            input: input.name.clone(),
            addr,
            proto,
            cause,
        };
        let mut addr = input.address;
        if let InputKind::Http { max_body_bytes } = input.kind {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .and_then(|s| {
                    s.set_reuse_address(true)?;
                    if addr.is_ipv6() {
                        s.set_only_v6(true)?;
                    }
                    s.bind(&addr.into())?;
                    s.listen(1024)?;
                    Ok(s)
                })
                .map_err(|e| fail(addr, "TCP", e))?;
            if let Some(a) = s.local_addr().ok().and_then(|a| a.as_socket()) {
                addr = a;
            }
            bound.http.push(http::Listener {
                input: input.name.clone(),
                index: i,
                socket: s.into(),
                max_body: max_body_bytes,
                max_connections: input.max_connections,
            });
        }
        if uses_tcp(&input.kind) {
            taken(addr, false).map_err(|e| fail(addr, "TCP", e))?;
            let r = socket(addr, Type::STREAM, Protocol::TCP).map_err(|e| fail(addr, "TCP", e))?;
            addr = r
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| fail(addr, "TCP", std::io::Error::other("no local address")))?;
            bound.reservations.push(r);
            for core in &mut bound.cores {
                core.tcp.push((i, addr));
            }
        }
        if uses_udp(&input.kind) {
            taken(addr, true).map_err(|e| fail(addr, "UDP", e))?;
            for core in &mut bound.cores {
                let s =
                    socket(addr, Type::DGRAM, Protocol::UDP).map_err(|e| fail(addr, "UDP", e))?;
                if addr.port() == 0 {
                    addr = s
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .ok_or_else(|| {
                            fail(addr, "UDP", std::io::Error::other("no local address"))
                        })?;
                }
                core.udp.push((i, s));
            }
        }
        bound.addrs.push(addr);
    }
    Ok(bound)
}
