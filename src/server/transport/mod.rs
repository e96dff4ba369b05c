//! The HTTP connection loop: accepts TCP connections up to `--max-connections`, serves each with hyper
//! (HTTP/1.1, and HTTP/2 to a client that opens with its preface, h2c), and closes connections that clients
//! stall. Everything about requests (routes, auth, readiness) is the router's; this module only moves bytes.
//!
//! Why its own clock: hyper's HTTP/1 header-read timeout also runs while a kept-alive connection waits for its
//! next request (so it would double as a short idle timeout), and hyper-util's protocol sniffing waits for the
//! first bytes forever. So each connection has a [`clock::Clock`] that knows whether a request is in flight:
//! the first request head must arrive within `--header-read-timeout-secs` of the accept; a kept-alive
//! connection may then sit idle for `--idle-timeout-secs`, and a next head, once started, gets the header
//! timeout again. Request bodies have a deadline of their own ([`body`], `--body-read-timeout-secs`, answered
//! 408). Responses are never timed: a stream lasts as long as its generation (which `--request-timeout-ms`
//! bounds).
//!
//! Over the connection cap, the loop stops accepting until a connection closes: new clients wait in the
//! listen backlog and are served when a slot frees, rather than being accepted and closed (which a proxy in
//! front reports as an error, while waiting only adds latency). The timeouts above bound how long stalled
//! clients can hold slots.
//!
//! Graceful shutdown: once `shutdown` resolves, nothing new is accepted, connections with nothing in flight
//! (idle, silent, mid-head) are closed at once, the others are told to finish (HTTP/1: close after the
//! response in flight; HTTP/2: GOAWAY, streams in flight go on), and [`serve`] returns when all are closed.

pub mod body;
mod clock;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::Version;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics::ConnectionMetrics;
use clock::{Clock, InFlight, Timeouts, Watched};

/// What the connection loop allows a client (`--header-read-timeout-secs` and the flags after it).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let builder = Arc::new(builder(&limits));
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut warned_full: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_closed) => break, // never closed; nothing to serve with
            },
        };
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        if slots.available_permits() == 0 && warned_full.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            tracing::warn!(
                max_connections = limits.max_connections,
                "connection limit reached; new connections wait until one closes (--max-connections)"
            );
            warned_full = Some(tokio::time::Instant::now());
        }
        let connection = Connection {
            app: app.clone(),
            builder: builder.clone(),
            limits,
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        connections.spawn(async move {
            let _slot = permit;
            connection.run(stream).await;
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// hyper's connection settings; its own header-read timeout is off because the clock keeps it (see above).
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams);
    b
}

/// Like hyper's server of old: connection errors are the client's; others (out of file descriptors) get a
/// pause before the next accept, so the loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "cannot accept a connection; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// What one connection task needs.
struct Connection {
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Limits,
    metrics: ConnectionMetrics,
    stop: CancellationToken,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        // Stream events are small writes that should leave at once.
        let _ = stream.set_nodelay(true);
        self.metrics.open.inc();
        let clock = Clock::new(Timeouts {
            header_read: self.limits.header_read_timeout,
            idle: self.limits.idle_timeout,
        });
        let io = TokioIo::new(Watched::new(stream, clock.clone()));
        let (app, body_limit, requests) = (self.app, self.limits.body_read_timeout, clock.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let in_flight = requests.request_started(req.version() == Version::HTTP_2);
            let req: Request = req.map(|b| Body::new(body::DeadlineBody::new(b, body_limit)));
            let app = app.clone();
            async move {
                let resp = match app.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(resp.map(|b| Tracked {
                    inner: b,
                    _in_flight: in_flight,
                }))
            }
        });
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        let expired = clock.expired();
        tokio::pin!(expired);
        let mut stopping = false;
        loop {
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                () = self.stop.cancelled(), if !stopping => {
                    // Idle, silent or mid-head (hyper would wait for a first head to complete): close now.
                    if clock.is_idle() {
                        break;
                    }
                    conn.as_mut().graceful_shutdown();
                    stopping = true;
                }
                why = &mut expired => {
                    // Nothing is in flight: dropping the connection only closes the socket.
                    tracing::debug!(timeout = why.label(), "closing a stalled connection");
                    self.metrics.timed_out.with_label_values(&[why.label()]).inc();
                    break;
                }
            }
        }
        self.metrics.open.dec();
    }
}

/// A response body that keeps its request counted as in flight on the connection until it has been sent
/// (or dropped).
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
