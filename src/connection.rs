//! Per-connection timeouts of the HTTP server: how long a client may take to send a request's
//! headers (slow-loris protection), and how long a kept-alive connection may wait, idle, for its
//! next request.
//!
//! hyper has one setting for both: its header read timeout also runs while a kept-alive
//! connection waits for the next request. A bound short enough for slow loris (5 s) then closed
//! idle connections sooner than the clients' pools let them idle (Easemob's server SDKs keep idle
//! connections for 10 s), and a client that reused a connection just as the server closed it lost
//! that request: for Easemob's callback sender, a failed delivery. Here the two bounds are
//! separate, as in Go's `ReadHeaderTimeout` and `IdleTimeout`:
//! - a new connection, and a kept-alive one from the first byte of its next request, must deliver
//!   the request's headers within the header timeout;
//! - between a response and the first byte of the next request, the idle timeout applies;
//! - while a request is handled, neither (the request deadline layer bounds that).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Where a connection is in its request cycle, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request's headers (since the connection opened or the request's first byte).
    Headers(Instant),
    /// A request is being handled or its response written.
    Busy,
    /// Kept alive after a response, waiting for the next request's first byte.
    Idle(Instant),
}

/// Which bound a connection overstayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overstayed {
    /// Its request's headers did not arrive within the header timeout.
    Headers,
    /// It sat idle between requests for the idle timeout.
    Idle,
}

/// The phase of one connection, updated by its reads, its service and its response body.
#[derive(Debug)]
pub struct ConnectionClock {
    phase: Mutex<Phase>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl ConnectionClock {
    /// A clock for a connection accepted now: its first request's headers are due within
    /// `header_timeout`.
    pub fn new(header_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self { phase: Mutex::new(Phase::Headers(Instant::now())), header_timeout, idle_timeout })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: on an idle connection they start the next request's header timeout.
    fn bytes_arrived(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Headers(Instant::now());
        }
    }

    /// hyper has read a request's headers and handed it to the service.
    pub fn request_started(&self) {
        *self.phase() = Phase::Busy;
    }

    /// The response has been written (its body is done with): the connection is idle from now.
    fn response_done(&self) {
        *self.phase() = Phase::Idle(Instant::now());
    }

    /// Resolves once the connection overstays the bound of the phase it is in; never while a
    /// request is being handled.
    pub async fn overstayed(&self) -> Overstayed {
        loop {
            let phase = *self.phase();
            let now = Instant::now();
            let due = match phase {
                Phase::Headers(since) => Some((since + self.header_timeout, Overstayed::Headers)),
                Phase::Idle(since) => Some((since + self.idle_timeout, Overstayed::Idle)),
                Phase::Busy => None,
            };
            if let Some((deadline, which)) = due
                && now >= deadline
            {
                return which;
            }
            // Not woken when the phase changes (that would cost a wake-up per request), but looked
            // at again by the deadline or after one header timeout, whichever comes first: the
            // headers of a kept-alive connection's next request are cut within twice the header
            // timeout, at the cost of one timer per connection every few seconds.
            let next_look = now + self.header_timeout;
            tokio::time::sleep_until(due.map_or(next_look, |(deadline, _)| deadline.min(next_look))).await;
        }
    }
}

/// A connection's socket, reporting arriving bytes to its [`ConnectionClock`].
#[derive(Debug)]
pub struct TimedIo<S> {
    inner: S,
    clock: Arc<ConnectionClock>,
}

impl<S> TimedIo<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, clock: Arc<ConnectionClock>) -> Self {
        Self { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.bytes_arrived();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that marks its connection idle when hyper is done with it (written to the
/// end, or dropped with the connection).
#[derive(Debug)]
pub struct TrackedBody {
    inner: Body,
    clock: Arc<ConnectionClock>,
}

impl TrackedBody {
    /// Wraps a response's body.
    pub fn new(inner: Body, clock: Arc<ConnectionClock>) -> Self {
        Self { inner, clock }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.clock.response_done();
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADERS: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(75);

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_must_send_its_headers_within_the_header_timeout() {
        let clock = ConnectionClock::new(HEADERS, IDLE);
        let start = Instant::now();
        assert_eq!(clock.overstayed().await, Overstayed::Headers);
        assert_eq!(start.elapsed(), HEADERS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_being_handled_is_never_cut() {
        let clock = ConnectionClock::new(HEADERS, IDLE);
        clock.request_started();
        let watch = tokio::time::timeout(Duration::from_secs(3600), clock.overstayed()).await;
        assert!(watch.is_err(), "a busy connection overstayed: {watch:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_gets_the_idle_timeout() {
        let clock = ConnectionClock::new(HEADERS, IDLE);
        clock.request_started();
        drop(TrackedBody::new(Body::empty(), clock.clone()));
        let idle_from = Instant::now();
        assert_eq!(clock.overstayed().await, Overstayed::Idle);
        assert_eq!(idle_from.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_request_on_a_kept_alive_connection_gets_the_header_timeout() {
        let clock = ConnectionClock::new(HEADERS, IDLE);
        clock.request_started();
        clock.response_done();
        let idle_from = Instant::now();
        let watcher = tokio::spawn({
            let clock = clock.clone();
            async move { (clock.overstayed().await, Instant::now()) }
        });
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(30)).await;
        // The first byte of the next request, 30 s into the idle time; its headers never finish.
        clock.bytes_arrived();
        let (which, at) = watcher.await.expect("the watcher ends");
        assert_eq!(which, Overstayed::Headers);
        let cut_after = at - idle_from;
        assert!(
            cut_after >= Duration::from_secs(30) + HEADERS && cut_after <= Duration::from_secs(30) + 2 * HEADERS,
            "cut {cut_after:?} after the idle time began"
        );
    }
}
