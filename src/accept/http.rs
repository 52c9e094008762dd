//! The HTTP input: `GET /health`, `/ready` and `/metrics`, and Fluentd `in_http` ingest
//! whose records a core routes like any other input's. One thread serves every HTTP input
//! with hyper on a current-thread tokio runtime. It starts before the sinks are known, so
//! `/ready` can say "not yet", and stops after the cores have drained, so `/health` says
//! "draining" for as long as a load balancer may still ask.

use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot, watch};

use crate::decode::DecodeError;
use crate::decode::http::{self as in_http, Ingest};
use crate::metrics::Scrape;

/// What `/health` and `/ready` report.
#[derive(Debug, Default)]
pub struct Status {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Status {
    /// Every listener is up.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Shutdown has begun: health checks fail from now on, so load balancers move away.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining()
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// One request's records, for a core to route; the answer is how many were taken.
pub struct Job {
    /// The HTTP input's index in the config.
    pub input: usize,
    pub ingest: Ingest,
    pub reply: oneshot::Sender<Result<usize, DecodeError>>,
}

/// Requests each core takes at a time before the HTTP thread waits.
pub const JOB_QUEUE: usize = 16;

/// An HTTP input's listener, bound already.
pub struct Listener {
    pub input: String,
    pub index: usize,
    pub socket: std::net::TcpListener,
    pub max_body: usize,
    pub max_connections: usize,
}

/// The running HTTP thread.
pub struct Server {
    thread: std::thread::JoinHandle<()>,
    stop: watch::Sender<bool>,
    /// Where ingest goes, once the cores run.
    pub cores: Arc<OnceLock<Vec<mpsc::Sender<Job>>>>,
}

impl Server {
    /// Stops listening and waits for the thread.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.thread.join();
    }
}

/// How long a client may take to send a request's headers, and then its body.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

struct Ctx {
    status: Arc<Status>,
    scrape: Scrape,
    cores: Arc<OnceLock<Vec<mpsc::Sender<Job>>>>,
    next_core: Cell<usize>,
}

pub fn start(listeners: Vec<Listener>, status: Arc<Status>, scrape: Scrape) -> io::Result<Server> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let (stop, stop_rx) = watch::channel(false);
    let cores = Arc::new(OnceLock::new());
    let shared = cores.clone();
    let sockets = listeners
        .into_iter()
        .map(|l| {
            l.socket.set_nonblocking(true)?;
            Ok((l.input, l.index, l.socket, l.max_body, l.max_connections))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let thread = std::thread::Builder::new()
        .name("sluice-http".into())
        .spawn(move || {
            let ctx = Rc::new(Ctx {
                status,
                scrape,
                cores: shared,
                next_core: Cell::new(0),
            });
            tokio::task::LocalSet::new().block_on(&rt, async move {
                for (input, index, socket, max_body, max_connections) in sockets {
                    let listener = match tokio::net::TcpListener::from_std(socket) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(input, error = %e, "HTTP input cannot listen");
                            continue;
                        }
                    };
                    tokio::task::spawn_local(accept(
                        listener,
                        index,
                        ctx.clone(),
                        max_body,
                        max_connections,
                    ));
                }
                let mut stop_rx = stop_rx;
                let _ = stop_rx.wait_for(|s| *s).await;
            });
        })?;
    Ok(Server {
        thread,
        stop,
        cores,
    })
}

async fn accept(
    listener: tokio::net::TcpListener,
    input: usize,
    ctx: Rc<Ctx>,
    max_body: usize,
    max_connections: usize,
) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.get() >= max_connections {
            tracing::warn!(
                limit = max_connections,
                "Refusing an HTTP connection: the input is at max_connections"
            );
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.set(open.get() + 1);
        let (ctx, open) = (ctx.clone(), open.clone());
        tokio::task::spawn_local(async move {
            let svc = hyper::service::service_fn(|req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(req, &ctx, input, max_body).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            open.set(open.get() - 1);
        });
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    ctx: &Ctx,
    input: usize,
    max_body: usize,
) -> Response<Full<Bytes>> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/health" if get => match ctx.status.draining() {
            false => reply(StatusCode::OK, "ok\n"),
            true => reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        },
        "/ready" if get => match ctx.status.ready() {
            true => reply(StatusCode::OK, "ready\n"),
            false if ctx.status.draining() => reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            false => reply(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        },
        "/metrics" if get => {
            let mut r = reply(StatusCode::OK, ctx.scrape.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => ingest(req, ctx, input, max_body).await,
    }
}

/// Fluentd `in_http`: 200 once a core has routed the records, 400 with the reason when
/// they cannot be read, 413 past `max_body_bytes`, 503 while starting or draining.
async fn ingest(
    req: Request<Incoming>,
    ctx: &Ctx,
    input: usize,
    max_body: usize,
) -> Response<Full<Bytes>> {
    if ctx.status.draining() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    let too_large = || {
        reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than max_body_bytes ({max_body} bytes)\n"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, max_body).collect())
        .await
    {
        Err(_) => return reply(StatusCode::REQUEST_TIMEOUT, "the body came too slowly\n"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => return reply(StatusCode::BAD_REQUEST, format!("reading the body: {e}\n")),
        Ok(Ok(b)) => b.to_bytes(),
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let ingest = match in_http::parse(
        parts.uri.path(),
        parts.uri.query(),
        content_type,
        Vec::from(body),
    ) {
        Ok(i) => i,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let Some(cores) = ctx.cores.get() else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "starting\n");
    };
    let i = ctx.next_core.get();
    ctx.next_core.set((i + 1) % cores.len());
    let (tx, rx) = oneshot::channel();
    let job = Job {
        input,
        ingest,
        reply: tx,
    };
    if cores[i].send(job).await.is_err() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    match rx.await {
        Ok(Ok(_)) => reply(StatusCode::OK, ""),
        Ok(Err(e)) => reply(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
    }
}
