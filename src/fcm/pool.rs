//! FCM's HTTP/2 connections: a pool sized from the instance's concurrency and the streams the
//! server allows on one connection.
//!
//! A single HTTP/2 connection carries at most the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! requests at once (100 at Google's front end); with tens of milliseconds per send, that caps
//! an instance near 100 ÷ latency whatever its concurrency. hyper's and reqwest's clients put
//! every request to a host on one HTTP/2 connection and queue the rest, so the pool drives
//! the `h2` crate directly: it needs each connection's advertised limit, and it needs to know
//! when a request failed *unprocessed* — refused with `RST_STREAM(REFUSED_STREAM)`, above the
//! last stream id of a `GOAWAY`, or never sent because the connection was already going away.
//! Such a request is sent again on another connection at once: FCM never saw it, so this
//! neither loses nor duplicates a message. A request whose fate is unknown (a reset
//! connection, a timeout) is reported as an error, and the caller's retry policy decides.
//!
//! Every connection opens with a `PING` round trip, so its `SETTINGS` are known before it
//! takes a request, and the pool never opens more streams on it than it advertised (h2
//! itself would queue them rather than exceed the limit either). The first connection tells
//! the limit; the pool then opens `ceil(concurrency / limit)` connections (or the configured
//! count), replaces one that goes away, and keeps busy ones alive with `PING`s.
//!
//! [`Protocol`] leaves room for an HTTP/1.1 transport: a connection would then carry one
//! request at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use axum::http::{Request, header};
use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use crate::metrics::FcmMetrics;

/// Streams per connection when the server does not say (and until its `SETTINGS` arrive).
/// RFC 9113 asks servers to allow at least 100; Google's front ends allow exactly that.
pub const DEFAULT_STREAMS: usize = 100;
/// The most connections the pool opens.
pub const MAX_CONNECTIONS: usize = 256;
/// Times one request refused unprocessed is sent again before the refusal is reported.
const REFUSALS: u32 = 5;
/// A busy connection is pinged this often, and dropped if the answer takes longer than
/// [`PING_TIMEOUT`].
const KEEPALIVE: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// A connection that lived at least this long is replaced at once when it goes away; one that
/// died younger is replaced only when a request needs it (no reconnect loop against a server
/// that drops every connection).
const REPLACE_IF_LIVED: Duration = Duration::from_secs(1);

/// How requests reach the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 over TLS, agreed by ALPN: FCM itself.
    H2,
    /// HTTP/2 over plain TCP with prior knowledge: a local emulator.
    H2c,
}

/// Where and how to connect.
pub struct PoolConfig {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    /// For [`Protocol::H2`]: the TLS client (offering ALPN `h2`) and the name to verify.
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Requests in flight the pool should carry at once: with the server's stream limit, this
    /// sizes the pool.
    pub concurrency: usize,
    /// A fixed number of connections instead of the computed one.
    pub connections: Option<usize>,
    /// One request, sent to answer read.
    pub timeout: Duration,
    /// TCP, TLS, HTTP/2 handshake and the first `PING`.
    pub connect_timeout: Duration,
}

/// An answer, whatever its status.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// Why a request got no answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// No answer within the timeout; FCM may or may not have processed it.
    #[error("request timed out")]
    Timeout,
    /// The connection or stream failed; FCM may or may not have processed it. Also: refused
    /// unprocessed too many times in a row.
    #[error("connection error: {0}")]
    Failed(String),
}

struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    /// Streams opened on it at most: what the server advertised.
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    /// Out of the pool (going away or broken); its open streams still finish.
    retired: AtomicBool,
    opened: Instant,
}

impl Conn {
    /// Takes a stream slot if one is free. Only called with the pool's lock held, so two
    /// callers never take the last slot twice (slots are given back without the lock, which
    /// only makes the check conservative).
    fn try_take(&self) -> bool {
        if self.in_flight.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed) {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

struct State {
    live: Vec<Arc<Conn>>,
    connecting: usize,
    /// Connections wanted.
    target: usize,
    /// Whether `target` is final: set once a connection told the stream limit, or at once
    /// when the count is configured.
    sized: bool,
    /// Failed attempts to connect, and the last one's error.
    failures: u64,
    last_error: String,
    /// Where the next search for a free stream starts (spreads requests over connections).
    next: usize,
}

impl State {
    fn pick(&mut self) -> Option<Arc<Conn>> {
        let n = self.live.len();
        for i in 0..n {
            let at = (self.next + i) % n;
            if self.live[at].try_take() {
                self.next = at + 1;
                return Some(Arc::clone(&self.live[at]));
            }
        }
        None
    }
}

pub struct Pool {
    config: PoolConfig,
    state: Mutex<State>,
    /// A stream slot was freed, or a connection opened or failed to.
    changed: Notify,
    metrics: Arc<FcmMetrics>,
    ids: AtomicU64,
    me: Weak<Pool>,
}

/// A stream slot on a connection, given back when dropped.
struct Lease<'a> {
    pool: &'a Pool,
    conn: Arc<Conn>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.pool.metrics.requests_in_flight.add(-1);
        self.pool.changed.notify_one();
    }
}

/// What went wrong on one exchange.
struct Failure {
    reason: String,
    /// FCM never processed the request: it may be sent again.
    unprocessed: bool,
    /// The connection takes no more requests.
    connection_gone: bool,
}

impl Pool {
    pub fn new(config: PoolConfig, metrics: Arc<FcmMetrics>) -> Arc<Pool> {
        let fixed = config.connections.map(|n| n.clamp(1, MAX_CONNECTIONS));
        Arc::new_cyclic(|me| Pool {
            config,
            state: Mutex::new(State {
                live: Vec::new(),
                connecting: 0,
                target: fixed.unwrap_or(1),
                sized: fixed.is_some(),
                failures: 0,
                last_error: String::new(),
                next: 0,
            }),
            changed: Notify::new(),
            metrics,
            ids: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// The state is never left inconsistent across a panic: poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one request (`head` is called again for each try) and reads the answer. Requests
    /// the server refused unprocessed are sent again on another connection.
    pub async fn send(
        &self,
        head: impl Fn() -> Request<()>,
        body: Bytes,
    ) -> Result<Answer, SendError> {
        let mut refusals = 0;
        loop {
            let lease = self.acquire().await.map_err(SendError::Connect)?;
            let exchange = exchange(&lease.conn.send, head(), body.clone());
            let failure = match tokio::time::timeout(self.config.timeout, exchange).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(failure)) => failure,
                Err(_) => return Err(SendError::Timeout),
            };
            if failure.connection_gone {
                self.retire(&lease.conn, &failure.reason);
            }
            if !failure.unprocessed {
                return Err(SendError::Failed(failure.reason));
            }
            self.metrics.streams_refused.inc();
            if !failure.connection_gone {
                // A refused stream: the server may have lowered its limit since.
                let limit = lease.conn.send.current_max_send_streams();
                lease.conn.limit.store(limit.max(1), Ordering::Relaxed);
            }
            refusals += 1;
            tracing::debug!(connection = lease.conn.id, refusals, reason = %failure.reason, "FCM refused a request unprocessed; sending it again");
            if refusals >= REFUSALS {
                return Err(SendError::Failed(format!(
                    "refused unprocessed {refusals} times in a row, last: {}",
                    failure.reason
                )));
            }
        }
    }

    /// Opens the connections before a burst; returns how many are open.
    pub async fn warm_up(&self) -> Result<usize, String> {
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout * 2;
        let mut failures_seen = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.sized && state.live.len() >= state.target {
                    return Ok(state.live.len());
                }
                let seen = *failures_seen.get_or_insert(state.failures);
                if state.failures > seen {
                    return Err(state.last_error.clone());
                }
                self.grow(&mut state);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let open = self.lock().live.len();
                return Err(format!("only {open} FCM connections opened in time"));
            }
        }
    }

    /// A free stream slot, opening connections as needed. Fails when no connection is open
    /// and an attempt to open one failed while waiting.
    async fn acquire(&self) -> Result<Lease<'_>, String> {
        let mut failures_seen = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(conn) = state.pick() {
                    self.metrics.requests_in_flight.add(1);
                    return Ok(Lease { pool: self, conn });
                }
                let seen = *failures_seen.get_or_insert(state.failures);
                if state.failures > seen && state.live.is_empty() {
                    return Err(state.last_error.clone());
                }
                self.grow(&mut state);
            }
            notified.await;
        }
    }

    /// Starts opening connections until the target is met.
    fn grow(&self, state: &mut State) {
        while state.live.len() + state.connecting < state.target.max(1) {
            state.connecting += 1;
            let pool = self.me.clone();
            tokio::spawn(async move {
                if let Some(pool) = pool.upgrade() {
                    pool.open().await;
                }
            });
        }
    }

    /// Opens one connection and adds it to the pool (or records why it could not).
    async fn open(&self) {
        let result = self.connect().await;
        {
            let mut state = self.lock();
            state.connecting -= 1;
            match result {
                Ok(conn) => {
                    if !state.sized {
                        let limit = conn.limit.load(Ordering::Relaxed);
                        state.target = pool_size(self.config.concurrency, limit);
                        state.sized = true;
                        tracing::info!(
                            streams_per_connection = limit,
                            connections = state.target,
                            "FCM connection pool sized"
                        );
                    }
                    tracing::debug!(
                        connection = conn.id,
                        streams = conn.limit.load(Ordering::Relaxed),
                        "FCM connection open"
                    );
                    state.live.push(conn);
                    self.metrics.connections.set(state.live.len() as u64);
                    self.metrics.connections_opened.inc();
                    // The first connection told the size: open the rest now, warm.
                    self.grow(&mut state);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a connection to FCM");
                    state.failures += 1;
                    state.last_error = e;
                    self.metrics.connect_errors.inc();
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// Takes a connection out of the pool; its open streams finish on their own.
    fn retire(&self, conn: &Arc<Conn>, reason: &str) {
        if conn.retired.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::debug!(connection = conn.id, %reason, "FCM connection retired");
        let mut state = self.lock();
        state.live.retain(|c| !Arc::ptr_eq(c, conn));
        self.metrics.connections.set(state.live.len() as u64);
        if conn.opened.elapsed() >= REPLACE_IF_LIVED {
            self.grow(&mut state);
        }
    }

    fn retire_id(&self, id: u64, reason: &str) {
        let conn = self.lock().live.iter().find(|c| c.id == id).cloned();
        if let Some(conn) = conn {
            self.retire(&conn, reason);
        }
    }

    async fn connect(&self) -> Result<Arc<Conn>, String> {
        let c = &self.config;
        let (host, port) = (c.host.as_str(), c.port);
        let work = async {
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            match (&c.protocol, &c.tls) {
                (Protocol::H2, Some((connector, name))) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
                    if tls.get_ref().1.alpn_protocol() != Some(b"h2".as_slice()) {
                        return Err(format!("{host}:{port} did not agree to HTTP/2 (ALPN h2)"));
                    }
                    self.handshake(tls).await
                }
                (Protocol::H2, None) => Err("HTTPS without a TLS client".to_string()),
                (Protocol::H2c, _) => self.handshake(tcp).await,
            }
        };
        tokio::time::timeout(c.connect_timeout, work)
            .await
            .map_err(|_| {
                format!(
                    "connecting to {host}:{port} took longer than {:?}",
                    c.connect_timeout
                )
            })?
    }

    /// The HTTP/2 handshake, the connection's driver task, and a `PING` round trip so that
    /// the server's `SETTINGS` (sent before its `PING` answer) are known.
    async fn handshake<T>(&self, io: T) -> Result<Arc<Conn>, String>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_max_send_streams(DEFAULT_STREAMS)
            // Answers are small, but a hundred streams share the connection window.
            .initial_connection_window_size(1 << 20)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let ping_pong = connection
            .ping_pong()
            .ok_or_else(|| "HTTP/2 PING unavailable".to_string())?;
        let conn = Arc::new(Conn {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            send,
            limit: AtomicUsize::new(DEFAULT_STREAMS),
            in_flight: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            opened: Instant::now(),
        });
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(drive(
            connection,
            ping_pong,
            ready_tx,
            Arc::downgrade(&conn),
            self.me.clone(),
        ));
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("the connection closed during the handshake".into()),
        }
        let advertised = conn.send.current_max_send_streams();
        conn.limit.store(advertised.max(1), Ordering::Relaxed);
        Ok(conn)
    }
}

/// Runs one connection until it ends: its first `PING` (reported on `ready`), then keep-alive
/// `PING`s while it has requests in flight. Takes it out of the pool when it ends.
async fn drive<T>(
    connection: h2::client::Connection<T, Bytes>,
    mut ping_pong: h2::PingPong,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    conn: Weak<Conn>,
    pool: Weak<Pool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = conn.upgrade().map(|c| c.id);
    let keepalive = async {
        let first = tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await;
        let first = match first {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("HTTP/2 PING: {e}")),
            Err(_) => Err("no answer to the first HTTP/2 PING".to_string()),
        };
        let failed = first.is_err();
        let _ = ready.send(first);
        if failed {
            return "no answer to the first PING".to_string();
        }
        loop {
            tokio::time::sleep(KEEPALIVE).await;
            let busy = match conn.upgrade() {
                Some(conn) => conn.in_flight.load(Ordering::Relaxed) > 0,
                // Out of the pool and unused: the connection closes by itself.
                None => return std::future::pending().await,
            };
            if busy {
                let pong =
                    tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await;
                if !matches!(pong, Ok(Ok(_))) {
                    return "keep-alive PING unanswered".to_string();
                }
            }
        }
    };
    let reason = tokio::select! {
        ended = connection => match ended {
            Ok(()) => "closed".to_string(),
            Err(e) => e.to_string(),
        },
        reason = keepalive => reason,
    };
    if let (Some(pool), Some(id)) = (pool.upgrade(), id) {
        pool.retire_id(id, &reason);
    }
}

/// One request and its answer on one connection.
async fn exchange(
    send: &h2::client::SendRequest<Bytes>,
    head: Request<()>,
    body: Bytes,
) -> Result<Answer, Failure> {
    // Errors before the stream exists mean the request never left: the connection is going
    // away (GOAWAY received) or gone.
    let unsent = |e: h2::Error| Failure {
        reason: e.to_string(),
        unprocessed: true,
        connection_gone: true,
    };
    let mut send = send.clone().ready().await.map_err(unsent)?;
    let (response, mut stream) = send.send_request(head, body.is_empty()).map_err(unsent)?;
    if !body.is_empty() {
        stream.send_data(body, true).map_err(failure)?;
    }
    let response = response.await.map_err(failure)?;
    let (parts, mut recv) = response.into_parts();
    let retry_after = parts
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut answer = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(failure)?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        answer.extend_from_slice(&chunk);
    }
    Ok(Answer {
        status: parts.status.as_u16(),
        retry_after,
        body: answer.freeze(),
    })
}

/// Connections for `concurrency` requests in flight at `limit` streams each.
fn pool_size(concurrency: usize, limit: usize) -> usize {
    concurrency.div_ceil(limit.max(1)).clamp(1, MAX_CONNECTIONS)
}

/// What an error on an open stream means.
fn failure(e: h2::Error) -> Failure {
    let refused = e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM);
    // A GOAWAY from the server fails only the streams above its last stream id: those it
    // will never process.
    let going_away = e.is_go_away() && e.is_remote();
    Failure {
        unprocessed: refused || going_away,
        connection_gone: going_away || e.is_io() || e.is_go_away(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_sized_from_concurrency_and_the_stream_limit() {
        assert_eq!(pool_size(1000, 100), 10);
        assert_eq!(pool_size(64, 100), 1);
        assert_eq!(pool_size(256, 100), 3);
        assert_eq!(pool_size(10_000, 1), MAX_CONNECTIONS);
        assert_eq!(pool_size(10, 0), 10, "a zero limit counts as one");
    }
}
