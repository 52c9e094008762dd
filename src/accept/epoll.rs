//! The epoll backend, for hosts that refuse io_uring (ECS Fargate, Docker's and
//! containerd's default seccomp profiles): a current-thread tokio runtime per core, pinned
//! to its CPU, with the same SO_REUSEPORT listeners and the same per-core loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use super::serve::{self, CoreCtx, Runtime};

pub struct Epoll;

/// As glommio's listeners: a deep accept queue, for bursts of reconnecting clients.
const BACKLOG: i32 = 1024;

impl Runtime for Epoll {
    type Listener = TcpListener;
    type Stream = TcpStream;
    type Datagram = UdpSocket;
    type Task = JoinHandle<()>;

    fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_port(true)?;
        s.set_reuse_address(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        TcpListener::from_std(s.into())
    }

    async fn accept(l: &TcpListener) -> io::Result<TcpStream> {
        l.accept().await.map(|(s, _)| s)
    }

    fn prepare(s: &TcpStream) -> Option<SocketAddr> {
        let _ = s.set_nodelay(true);
        s.peer_addr().ok()
    }

    fn poll_read(
        s: &mut TcpStream,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(s.poll_read_ready(cx))?;
            match s.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write(s: &mut TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(s.poll_write_ready(cx))?;
            match s.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    async fn flush(_: &mut TcpStream) {
        // Writes go straight to the socket; nothing is buffered here.
    }

    fn datagram(s: Socket) -> io::Result<UdpSocket> {
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s.into())
    }

    async fn recv_from(s: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        s.recv_from(buf).await
    }

    async fn send_to(s: &UdpSocket, buf: &[u8], to: SocketAddr) {
        let _ = s.send_to(buf, to).await;
    }

    fn spawn(f: impl Future<Output = ()> + 'static) -> JoinHandle<()> {
        tokio::task::spawn_local(f)
    }

    fn spawn_detached(f: impl Future<Output = ()> + 'static) {
        drop(tokio::task::spawn_local(f));
    }

    async fn cancel(t: JoinHandle<()>) {
        t.abort();
        let _ = t.await;
    }

    async fn sleep(d: Duration) {
        tokio::time::sleep(d).await;
    }

    async fn yield_if_needed() {
        tokio::task::yield_now().await;
    }

    type File = Arc<std::fs::File>;

    async fn create(path: &Path) -> io::Result<Arc<std::fs::File>> {
        let path = path.to_owned();
        blocking(move || std::fs::File::create(path).map(Arc::new)).await
    }

    async fn write_sync(f: &Arc<std::fs::File>, buf: &[u8], pos: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (f, buf) = (f.clone(), buf.to_vec());
        blocking(move || {
            f.write_all_at(&buf, pos)?;
            f.sync_data()
        })
        .await
    }
}

/// Runs file I/O on tokio's blocking threads, off the core.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// Starts one core on its own thread and current-thread tokio runtime.
pub fn start(ctx: CoreCtx, cpu: Option<usize>) -> Result<super::CoreHandle, String> {
    let core = ctx.core;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start core {core}: {e}"))?;
    let thread = std::thread::Builder::new()
        .name(format!("sluice-core{core}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                let mut set = nix::sched::CpuSet::new();
                if set.set(cpu).is_ok() {
                    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
                }
            }
            tokio::task::LocalSet::new().block_on(&rt, serve::run::<Epoll>(ctx));
        })
        .map_err(|e| format!("cannot start core {core}: {e}"))?;
    Ok(Box::new(move || {
        thread.join().map_err(|_| format!("core {core} panicked"))
    }))
}
