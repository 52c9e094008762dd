//! The io_uring backend: a glommio executor per core, pinned to its CPU, whose sockets
//! complete through the core's own rings.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::io::BufferedFile;
use glommio::net::{TcpListener, TcpStream, UdpSocket};
use glommio::{LocalExecutorBuilder, Placement};

use super::serve::{self, CoreCtx, Runtime};
use crate::probe;

pub struct Uring;

impl Runtime for Uring {
    type Listener = TcpListener;
    type Stream = TcpStream;
    type Datagram = UdpSocket;
    type Task = glommio::Task<()>;

    fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
        // glommio sets SO_REUSEPORT itself.
        TcpListener::bind(addr).map_err(io::Error::from)
    }

    async fn accept(l: &TcpListener) -> io::Result<TcpStream> {
        l.accept().await.map_err(io::Error::from)
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
        Pin::new(s).poll_read(cx, buf)
    }

    fn poll_write(s: &mut TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(s).poll_write(cx, buf)
    }

    async fn flush(s: &mut TcpStream) {
        let _ = s.flush().await;
    }

    fn datagram(s: socket2::Socket) -> io::Result<UdpSocket> {
        Ok(UdpSocket::from(s))
    }

    async fn recv_from(s: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        s.recv_from(buf).await.map_err(io::Error::from)
    }

    async fn send_to(s: &UdpSocket, buf: &[u8], to: SocketAddr) {
        let _ = s.send_to(buf, to).await;
    }

    fn spawn(f: impl Future<Output = ()> + 'static) -> Self::Task {
        glommio::spawn_local(f)
    }

    fn spawn_detached(f: impl Future<Output = ()> + 'static) {
        glommio::spawn_local(f).detach();
    }

    async fn cancel(t: Self::Task) {
        t.cancel().await;
    }

    async fn sleep(d: Duration) {
        glommio::timer::sleep(d).await;
    }

    async fn yield_if_needed() {
        glommio::yield_if_needed().await;
    }

    type File = BufferedFile;

    async fn create(path: &Path) -> io::Result<BufferedFile> {
        BufferedFile::create(path).await.map_err(io::Error::from)
    }

    async fn write_sync(f: &BufferedFile, buf: &[u8], pos: u64) -> io::Result<()> {
        // glommio owns a write's buffer until it completes: a copy per group commit.
        let mut done = 0;
        while done < buf.len() {
            let n = f.write_at(buf[done..].to_vec(), pos + done as u64).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += n;
        }
        f.fdatasync().await.map_err(io::Error::from)
    }
}

/// Starts one core on its own glommio executor.
pub fn start(ctx: CoreCtx, cpu: Option<usize>) -> Result<super::CoreHandle, String> {
    let core = ctx.core;
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    let handle = LocalExecutorBuilder::new(placement)
        .name(&format!("sluice-core{core}"))
        .io_memory(probe::IO_MEMORY)
        .spawn(move || serve::run::<Uring>(ctx))
        .map_err(|e| format!("cannot start core {core}: {}", probe::classify(e)))?;
    Ok(Box::new(move || handle.join().map_err(|e| e.to_string())))
}
