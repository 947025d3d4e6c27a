//! A small HTTP/1.1 load generator on hyper's client connections: closed loop (N connections,
//! each sends its next request when the previous answer arrives) or open loop (requests are
//! scheduled at a fixed rate and latency is measured from the scheduled time, so a stalled server
//! cannot hide its queueing: no coordinated omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Builds the request for the n-th send.
pub type MakeRequest = Arc<dyn Fn(u64) -> Request<Full<Bytes>> + Send + Sync>;

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Requests completed.
    pub completed: u64,
    /// Answers with a 2xx status.
    pub ok: u64,
    /// Other answers, and transport errors.
    pub errors: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
    /// Latencies in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl LoadResult {
    /// Completed requests per second.
    pub fn throughput(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile (0..=1) in milliseconds (nearest rank).
    pub fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((q * self.latencies_us.len() as f64).ceil() as usize).clamp(1, self.latencies_us.len());
        f64::from(self.latencies_us[rank - 1]) / 1000.0
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request on a connection; reconnects once if the connection was closed.
async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> bool {
    if sender.ready().await.is_err() {
        match connect(addr).await {
            Ok(s) => *sender = s,
            Err(_) => return false,
        }
    }
    match sender.send_request(req).await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            let _ = resp.into_body().collect().await;
            ok
        }
        Err(_) => false,
    }
}

/// Closed loop: `connections` workers, each sending back to back for `duration`.
pub async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
) -> anyhow::Result<LoadResult> {
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let make = make.clone();
        let counter = counter.clone();
        let mut sender = connect(addr).await?;
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            // At least one request per connection, however late the task starts: a phase always
            // measures something.
            loop {
                let req = make(counter.fetch_add(1, Ordering::Relaxed));
                tally.send(&mut sender, addr, req, Instant::now()).await;
                if Instant::now() >= deadline {
                    break;
                }
            }
            tally
        }));
    }
    gather(start, tasks).await
}

/// Open loop: requests scheduled at `rate` per second for `duration`, served by up to
/// `connections` connections; latency counts from the scheduled send time.
pub async fn open_loop(
    addr: SocketAddr,
    connections: usize,
    rate: u64,
    duration: Duration,
    make: MakeRequest,
) -> anyhow::Result<LoadResult> {
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let (tx, rx) = async_channel(total as usize);
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let rx = rx.clone();
        let make = make.clone();
        let mut sender = connect(addr).await?;
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let next = { rx.lock().await.recv().await };
                let Some((n, scheduled)) = next else { break };
                tally.send(&mut sender, addr, make(n), scheduled).await;
            }
            tally
        }));
    }
    drop(rx);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    for n in 0..total {
        let scheduled = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        if tx.send((n, scheduled)).await.is_err() {
            break;
        }
    }
    drop(tx);
    gather(start, tasks).await
}

/// What one connection's worker measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    ok: u64,
    errors: u64,
}

impl Tally {
    /// Sends one request and records its outcome, with its latency counted from `since` (the
    /// send time in a closed loop, the scheduled time in an open loop).
    async fn send(
        &mut self,
        sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        addr: SocketAddr,
        req: Request<Full<Bytes>>,
        since: Instant,
    ) {
        if send(sender, addr, req).await {
            self.ok += 1;
        } else {
            self.errors += 1;
        }
        let latency = Instant::now().saturating_duration_since(since);
        self.latencies_us.push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
    }
}

/// Waits for every worker and merges what they measured since `start`.
async fn gather(start: Instant, tasks: Vec<tokio::task::JoinHandle<Tally>>) -> anyhow::Result<LoadResult> {
    let mut result = LoadResult::default();
    for t in tasks {
        let tally = t.await?;
        result.latencies_us.extend(tally.latencies_us);
        result.ok += tally.ok;
        result.errors += tally.errors;
    }
    result.elapsed = start.elapsed();
    result.completed = result.ok + result.errors;
    result.latencies_us.sort_unstable();
    Ok(result)
}

type Shared<T> = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<T>>>;

fn async_channel<T>(cap: usize) -> (tokio::sync::mpsc::Sender<T>, Shared<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap.max(1));
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}
