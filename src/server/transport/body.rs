//! A deadline on reading a request body (`--body-read-timeout-secs`), counted from the request head: a body
//! that trickles in, stops short of its `Content-Length`, or is chunked and never ends, fails with
//! [`BodyReadTimeout`] instead of holding its request (and shutdown) open. Handlers see it as a body error;
//! the JSON extractor answers it with 408 ([`timed_out`] finds it in an error's chain).
//!
//! Only the request body is timed; responses never are.

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn Error + Send + Sync>;

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {secs} s of its head (--body-read-timeout-secs)")]
pub struct BodyReadTimeout {
    secs: u64,
}

/// The [`BodyReadTimeout`] in `err`'s chain of sources, if there is one (extractors wrap body errors).
pub fn timed_out<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a BodyReadTimeout> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<BodyReadTimeout>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

/// A request body that fails with [`BodyReadTimeout`] once its deadline passes.
#[derive(Debug)]
pub struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    limit: Duration,
    /// Made on the first poll that has to wait, so bodies read at once (or empty) cost no timer.
    timer: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

impl DeadlineBody {
    /// `inner` must arrive within `limit` from now (the head has just been read).
    pub fn new(inner: Incoming, limit: Duration) -> Self {
        Self {
            inner,
            deadline: Instant::now() + limit,
            limit,
            timer: None,
            expired: false,
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(BoxError::from)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.expired = true;
                let secs = this.limit.as_secs();
                Poll::Ready(Some(Err(Box::new(BodyReadTimeout { secs }))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_timeout_under_wrappers() {
        let inner: BoxError = Box::new(BodyReadTimeout { secs: 3 });
        let wrapped = axum::Error::new(axum::Error::new(inner));
        let found = timed_out(&wrapped).expect("found");
        assert!(found.to_string().contains("3 s"), "{found}");
        let other = axum::Error::new(std::io::Error::other("reset"));
        assert!(timed_out(&other).is_none());
    }
}
