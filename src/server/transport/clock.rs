//! A connection's clock: whether a request is in flight on it, and since when it has waited, so the
//! connection loop can close a connection a client stalls; and [`Watched`], the socket wrapper that tells the
//! clock when the first byte of a next request arrives.
//!
//! The rules (the connection loop closes the connection at [`Clock::expired`]):
//! - before its first request, a connection must send a complete request head within the header-read timeout
//!   of being accepted (a client connects because it has a request to send);
//! - between requests (kept alive, nothing in flight) it may sit silent for the idle timeout; once a byte of
//!   the next HTTP/1 request arrives, that head must be complete within the header-read timeout of the byte.
//!   HTTP/2 frames between requests (pings, settings) are not request heads: only the idle timeout applies;
//! - while a request is in flight nothing is timed here: its body has its own deadline (`body.rs`), and a
//!   response, a long stream included, is never cut.
//!
//! It knows nothing of hyper: the connection loop marks requests started and ended ([`Clock::request_started`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a connection was closed by its clock (the `timeout` label of the connection metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request head did not arrive in time.
    HeaderRead,
    /// A kept-alive connection sat with nothing in flight for the idle timeout.
    Idle,
}

impl Expiry {
    pub fn label(self) -> &'static str {
        match self {
            Self::HeaderRead => "header_read",
            Self::Idle => "idle",
        }
    }
}

/// The timeouts a clock enforces.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
}

#[derive(Debug)]
struct State {
    /// Requests whose response has not ended yet.
    in_flight: usize,
    /// When the connection last had nothing in flight: accepted, or its last response ended.
    idle_since: Instant,
    /// When the first byte after `idle_since` arrived (a request head is under way).
    head_since: Option<Instant>,
    /// Whether a request has been received: after the first, waiting is keep-alive idleness.
    served: bool,
    /// Whether the connection speaks HTTP/2 (known from its first request).
    http2: bool,
}

impl State {
    /// When the connection is to be closed and why; `None` while a request is in flight.
    fn deadline(&self, t: Timeouts) -> Option<(Instant, Expiry)> {
        if self.in_flight > 0 {
            return None;
        }
        if !self.served {
            return Some((self.idle_since + t.header_read, Expiry::HeaderRead));
        }
        match self.head_since {
            Some(at) if !self.http2 => Some((at + t.header_read, Expiry::HeaderRead)),
            _ => Some((self.idle_since + t.idle, Expiry::Idle)),
        }
    }
}

/// One connection's clock, shared by its socket wrapper, its requests and the connection loop.
#[derive(Debug)]
pub struct Clock {
    timeouts: Timeouts,
    state: Mutex<State>,
    /// True while nothing is in flight and no byte has arrived since: the only thing a read checks.
    awaiting_bytes: AtomicBool,
    /// Woken on every change of `state` ([`Clock::expired`] is its only waiter).
    changed: Notify,
}

impl Clock {
    /// The clock of a connection accepted now.
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            timeouts,
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
                head_since: None,
                served: false,
                http2: false,
            }),
            awaiting_bytes: AtomicBool::new(true),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state is still a set of plain fields.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a request received (its head is complete); the connection is busy until the returned guard drops,
    /// which the connection loop ties to the end of the response.
    pub fn request_started(self: &Arc<Self>, http2: bool) -> InFlight {
        let mut s = self.state();
        s.in_flight += 1;
        s.served = true;
        s.http2 |= http2;
        s.head_since = None;
        self.awaiting_bytes.store(false, Ordering::Relaxed);
        drop(s);
        self.changed.notify_one();
        InFlight { clock: self.clone() }
    }

    fn request_ended(&self) {
        let mut s = self.state();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            // Bytes of a pipelined next request read before this point are not seen as a head under way: such
            // a connection gets the idle timeout rather than the header-read timeout; still bounded.
            s.idle_since = Instant::now();
            s.head_since = None;
            self.awaiting_bytes.store(true, Ordering::Relaxed);
        }
        drop(s);
        self.changed.notify_one();
    }

    /// Called by [`Watched`] when bytes arrive while `awaiting_bytes` is set.
    fn bytes_arrived(&self) {
        if !self.awaiting_bytes.swap(false, Ordering::Relaxed) {
            return;
        }
        let mut s = self.state();
        if s.in_flight == 0 && s.head_since.is_none() {
            s.head_since = Some(Instant::now());
        }
        drop(s);
        self.changed.notify_one();
    }

    /// Whether no request is in flight (closing the connection now loses nothing).
    pub fn is_idle(&self) -> bool {
        self.state().in_flight == 0
    }

    /// Resolves when the connection should be closed, with the reason; never while a request is in flight.
    pub async fn expired(&self) -> Expiry {
        loop {
            let next = self.state().deadline(self.timeouts);
            match next {
                // `notify_one` keeps a wake-up for a change made between reading the state and waiting here.
                None => self.changed.notified().await,
                Some((at, why)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {
                            if self.state().deadline(self.timeouts) == Some((at, why)) {
                                return why;
                            }
                        }
                        () = self.changed.notified() => {}
                    }
                }
            }
        }
    }
}

/// A request in flight on a connection (see [`Clock::request_started`]).
#[derive(Debug)]
pub struct InFlight {
    clock: Arc<Clock>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.clock.request_ended();
    }
}

/// A socket that tells its connection's clock when bytes arrive; everything else passes through.
#[derive(Debug)]
pub struct Watched<T> {
    io: T,
    clock: Arc<Clock>,
}

impl<T> Watched<T> {
    pub fn new(io: T, clock: Arc<Clock>) -> Self {
        Self { io, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before && this.clock.awaiting_bytes.load(Ordering::Relaxed) {
            this.clock.bytes_arrived();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    fn state(served: bool, http2: bool, head_after: Option<u64>) -> (State, Instant) {
        let start = Instant::now();
        let s = State {
            in_flight: 0,
            idle_since: start,
            head_since: head_after.map(|s| start + Duration::from_secs(s)),
            served,
            http2,
        };
        (s, start)
    }

    #[test]
    fn a_new_connection_must_send_its_first_head_within_the_header_timeout() {
        let (s, start) = state(false, false, None);
        assert_eq!(s.deadline(T), Some((start + T.header_read, Expiry::HeaderRead)));
        // Bytes that arrived later do not extend it.
        let (s, start) = state(false, false, Some(8));
        assert_eq!(s.deadline(T), Some((start + T.header_read, Expiry::HeaderRead)));
    }

    #[test]
    fn a_kept_alive_connection_idles_for_the_idle_timeout_then_gets_the_header_timeout_from_its_first_byte() {
        let (s, start) = state(true, false, None);
        assert_eq!(s.deadline(T), Some((start + T.idle, Expiry::Idle)));
        let (s, start) = state(true, false, Some(50));
        assert_eq!(
            s.deadline(T),
            Some((start + Duration::from_secs(60), Expiry::HeaderRead))
        );
    }

    #[test]
    fn http2_frames_between_requests_are_not_heads() {
        let (s, start) = state(true, true, Some(5));
        assert_eq!(s.deadline(T), Some((start + T.idle, Expiry::Idle)));
    }

    #[test]
    fn nothing_expires_while_a_request_is_in_flight() {
        let (mut s, _) = state(true, false, Some(5));
        s.in_flight = 1;
        assert_eq!(s.deadline(T), None);
    }

    #[test]
    fn the_clock_follows_requests_and_bytes() {
        let clock = Clock::new(T);
        assert!(clock.awaiting_bytes.load(Ordering::Relaxed));
        let a = clock.request_started(false);
        let b = clock.request_started(false);
        assert_eq!(clock.state().deadline(T), None);
        assert!(!clock.awaiting_bytes.load(Ordering::Relaxed));
        drop(a);
        assert_eq!(clock.state().deadline(T), None, "one still in flight");
        drop(b);
        let idle_since = clock.state().idle_since;
        assert_eq!(clock.state().deadline(T), Some((idle_since + T.idle, Expiry::Idle)));
        clock.bytes_arrived();
        let head = clock.state().head_since.expect("a head under way");
        assert_eq!(
            clock.state().deadline(T),
            Some((head + T.header_read, Expiry::HeaderRead))
        );
    }
}
