//! FCM's HTTP/2 connections: a pool sized from the instance's concurrency and the streams the
//! server allows on one connection; HTTP/1.1 connections when the endpoint speaks nothing newer.
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
//! A timeout also retires its connection: it is the only sign of a connection that died
//! without a word (a NAT or load balancer dropping it answers nothing, not even a reset), which
//! would otherwise take requests until the keep-alive `PING` noticed, up to [`KEEPALIVE`] +
//! [`PING_TIMEOUT`] later. A live connection whose one request was slow costs only a new
//! handshake; the requests still on it finish there.
//!
//! Every connection opens with a `PING` round trip, so its `SETTINGS` are known before it
//! takes a request, and the pool never opens more streams on it than it advertised (h2
//! itself would queue them rather than exceed the limit either). The first connection tells
//! the limit; the pool then opens `ceil(concurrency / limit)` connections (or the configured
//! count), replaces one that goes away, and keeps busy ones alive with `PING`s.
//!
//! # Which HTTP
//! Over TLS, ALPN offers `h2` and `http/1.1` and each connection speaks what the server picked
//! (no ALPN answer: HTTP/1.1). Over plain TCP (`http://`, an emulator or a mock) the first
//! connection tries HTTP/2 with prior knowledge; if the server answers that with anything but
//! HTTP/2, a second connection asks it `OPTIONS *` in HTTP/1.1, and if that is answered the
//! pool speaks HTTP/1.1 from then on. An endpoint that answers in neither is a
//! [`SendError::Protocol`]: no retry will fix it. An endpoint that does not answer at all
//! (refused, silent) is only unreachable for now.
//!
//! An HTTP/1.1 connection carries one request at a time (`http1`): the pool opens them as
//! requests wait, up to the configured count or `min(concurrency, 100)`, keeps them alive
//! between requests, and does not replace one the server closed until a request needs it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use axum::http::Request;
use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use super::exchange::{Answer, Failure, retry_after};
use super::http1;
use crate::metrics::FcmMetrics;

/// Streams per connection when the server does not say (and until its `SETTINGS` arrive).
/// RFC 9113 asks servers to allow at least 100; Google's front ends allow exactly that.
pub const DEFAULT_STREAMS: usize = 100;
/// The most connections the pool opens.
pub const MAX_CONNECTIONS: usize = 256;
/// The most HTTP/1.1 connections unless configured: as many requests at once as one HTTP/2
/// connection to Google carries.
pub const MAX_HTTP1_CONNECTIONS: usize = 100;
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

/// Which HTTP the endpoint speaks (found out by the first connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 over TLS, agreed by ALPN: FCM itself.
    H2,
    /// HTTP/2 over plain TCP with prior knowledge: a local emulator.
    H2c,
    /// HTTP/1.1, over TLS (ALPN `http/1.1`, or none) or plain TCP: a mock server, a proxy.
    Http1,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::H2 => "HTTP/2 (h2)",
            Protocol::H2c => "HTTP/2 (h2c)",
            Protocol::Http1 => "HTTP/1.1",
        })
    }
}

/// Where and how to connect.
pub struct PoolConfig {
    pub host: String,
    pub port: u16,
    /// For `https://`: the TLS client (offering ALPN `h2` and `http/1.1`) and the name to
    /// verify. `None`: plain TCP.
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Requests in flight the pool should carry at once: with the server's stream limit, this
    /// sizes the pool.
    pub concurrency: usize,
    /// A fixed number of connections instead of the computed one.
    pub connections: Option<usize>,
    /// One request, sent to answer read.
    pub timeout: Duration,
    /// TCP, TLS, HTTP/2 handshake and the first `PING` (or the HTTP/1.1 probe).
    pub connect_timeout: Duration,
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
    /// The connection or stream failed; FCM may or may not have processed it.
    #[error("connection error: {0}")]
    Failed(String),
    /// Refused unprocessed, as many times in a row as the pool tries: FCM never saw it.
    #[error("refused: {0}")]
    Refused(String),
    /// The endpoint answers, but not in HTTP/2 or HTTP/1.1 (or not in TLS for `https://`):
    /// no retry will fix it.
    #[error("{0}")]
    Protocol(String),
}

impl SendError {
    /// What happened, without the kind.
    fn detail(&self) -> String {
        match self {
            SendError::Connect(why)
            | SendError::Failed(why)
            | SendError::Refused(why)
            | SendError::Protocol(why) => why.clone(),
            SendError::Timeout => "timed out".to_string(),
        }
    }
}

/// An HTTP/1.1 connection's id, until its client half joins the pool.
struct Http1Conn(u64);

impl Http1Conn {
    fn with(self, send: http1::SendRequest) -> (Arc<Conn>, Protocol) {
        let conn = Arc::new(Conn {
            id: self.0,
            link: Link::Http1(tokio::sync::Mutex::new(send)),
            limit: AtomicUsize::new(1),
            in_flight: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            opened: Instant::now(),
        });
        (conn, Protocol::Http1)
    }
}

/// How requests go out on one connection.
enum Link {
    H2(h2::client::SendRequest<Bytes>),
    /// One request at a time: the lock is never contended (the connection's limit is 1).
    Http1(tokio::sync::Mutex<http1::SendRequest>),
}

struct Conn {
    id: u64,
    link: Link,
    /// Requests on it at once at most: the streams the server advertised, 1 for HTTP/1.1.
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
    last_error: SendError,
    /// What the endpoint speaks, once a connection opened.
    protocol: Option<Protocol>,
    /// Requests waiting for a free connection (HTTP/1.1 connections are opened for them).
    waiting: usize,
}

impl State {
    /// The first connection with a free stream: connections fill in order, so requests share
    /// a connection's writes and wake-ups (BENCHMARKS.md, "Realistic FCM"); the pool's size
    /// still follows the concurrency. Not `avoid` (the connection that just refused the
    /// request), unless it is the only one there is or will be.
    fn pick(&self, avoid: Option<u64>) -> Option<Arc<Conn>> {
        let others = |c: &&Arc<Conn>| Some(c.id) != avoid;
        let conn = match self.live.iter().filter(others).find(|c| c.try_take()) {
            Some(conn) => conn,
            None if self.live.iter().all(|c| Some(c.id) == avoid) && self.connecting == 0 => {
                self.live.iter().find(|c| c.try_take())?
            }
            None => return None,
        };
        Some(Arc::clone(conn))
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

/// A request waiting for a free connection, counted while it waits.
struct Waiting<'a>(&'a Pool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.waiting = state.waiting.saturating_sub(1);
    }
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
                last_error: SendError::Connect(String::new()),
                protocol: None,
                waiting: 0,
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

    /// What the endpoint speaks, once a connection has opened.
    pub fn protocol(&self) -> Option<Protocol> {
        self.lock().protocol
    }

    /// Sends one request (`head` is called again for each try) and reads the answer. Requests
    /// the server refused unprocessed are sent again on another connection.
    pub async fn send(
        &self,
        head: impl Fn() -> Request<()>,
        body: Bytes,
    ) -> Result<Answer, SendError> {
        let mut refusals = 0;
        let mut refused_by = None;
        loop {
            let lease = self.acquire(refused_by).await?;
            let exchange = async {
                match &lease.conn.link {
                    Link::H2(send) => exchange(send, head(), body.clone()).await,
                    Link::Http1(send) => http1::exchange(send, head(), body.clone()).await,
                }
            };
            let failure = match tokio::time::timeout(self.config.timeout, exchange).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(failure)) => failure,
                Err(_) => {
                    // HTTP/2: the connection may be dead (see the module's notes). HTTP/1.1:
                    // hyper closes a connection whose request was abandoned.
                    self.retire(&lease.conn, "a request timed out");
                    return Err(SendError::Timeout);
                }
            };
            if failure.connection_gone {
                self.retire(&lease.conn, &failure.reason);
            }
            if !failure.unprocessed {
                return Err(SendError::Failed(failure.reason));
            }
            self.metrics.streams_refused.inc();
            if !failure.connection_gone
                && let Link::H2(send) = &lease.conn.link
            {
                // A refused stream: the server may have lowered its limit since.
                let limit = send.current_max_send_streams();
                lease.conn.limit.store(limit.max(1), Ordering::Relaxed);
            }
            refusals += 1;
            // Another connection, if there is one: this one may refuse it again.
            refused_by = Some(lease.conn.id);
            tracing::debug!(connection = lease.conn.id, refusals, reason = %failure.reason, "FCM refused a request unprocessed; sending it again");
            if refusals >= REFUSALS {
                return Err(SendError::Refused(format!(
                    "unprocessed {refusals} times in a row, last: {}",
                    failure.reason
                )));
            }
        }
    }

    /// Opens the connections before a burst (HTTP/1.1: one, which found out the protocol);
    /// returns how many are open. Fails with [`SendError::Protocol`] when the endpoint speaks
    /// no HTTP the pool can use.
    pub async fn warm_up(&self) -> Result<usize, SendError> {
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout * 2;
        let mut failures_seen = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                let warm = match state.protocol {
                    // Opened as requests wait.
                    Some(Protocol::Http1) => true,
                    _ => state.sized && state.live.len() >= state.target,
                };
                if warm {
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
                return Err(SendError::Connect(format!(
                    "only {open} FCM connections opened in time"
                )));
            }
        }
    }

    /// A free stream slot, opening connections as needed, not on `avoid` if another connection
    /// is open or opening. Fails when no connection is open and an attempt to open one failed
    /// while waiting.
    async fn acquire(&self, avoid: Option<u64>) -> Result<Lease<'_>, SendError> {
        let mut failures_seen = None;
        let mut waiting = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(conn) = state.pick(avoid) {
                    self.metrics.requests_in_flight.add(1);
                    return Ok(Lease { pool: self, conn });
                }
                let seen = *failures_seen.get_or_insert(state.failures);
                if state.failures > seen && state.live.is_empty() {
                    return Err(state.last_error.clone());
                }
                if waiting.is_none() {
                    state.waiting += 1;
                    waiting = Some(Waiting(self));
                }
                self.grow(&mut state);
            }
            notified.await;
        }
    }

    /// Starts opening connections until the target is met; for HTTP/1.1, until every waiting
    /// request has a free or opening connection, within the target.
    fn grow(&self, state: &mut State) {
        let http1 = state.protocol == Some(Protocol::Http1);
        let free = if http1 {
            let idle = |c: &&Arc<Conn>| c.in_flight.load(Ordering::Relaxed) == 0;
            state.live.iter().filter(idle).count()
        } else {
            0
        };
        while state.live.len() + state.connecting < state.target.max(1)
            && (!http1 || free + state.connecting < state.waiting)
        {
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
                Ok((conn, protocol)) => {
                    if state.protocol.is_none() {
                        self.found(&mut state, protocol, &conn);
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

    /// The first connection told what the endpoint speaks: the pool's size follows, said once.
    fn found(&self, state: &mut State, protocol: Protocol, conn: &Conn) {
        state.protocol = Some(protocol);
        if protocol == Protocol::Http1 {
            if !state.sized {
                state.target = self
                    .config
                    .concurrency
                    .clamp(1, MAX_HTTP1_CONNECTIONS.min(MAX_CONNECTIONS));
                state.sized = true;
            }
            let how = if self.config.tls.is_some() {
                "FCM endpoint agreed only to HTTP/1.1 by ALPN"
            } else {
                "FCM endpoint speaks HTTP/1.1 only"
            };
            tracing::info!(
                protocol = %protocol,
                connections = state.target,
                "{how}; using up to {} HTTP/1.1 connections, one request each",
                state.target
            );
            return;
        }
        let limit = conn.limit.load(Ordering::Relaxed);
        if !state.sized {
            state.target = pool_size(self.config.concurrency, limit);
            state.sized = true;
        }
        tracing::info!(
            protocol = %protocol,
            streams_per_connection = limit,
            connections = state.target,
            "FCM connection pool sized"
        );
    }

    /// Takes a connection out of the pool; its open streams finish on their own.
    fn retire(&self, conn: &Arc<Conn>, reason: &str) {
        if conn.retired.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::debug!(connection = conn.id, %reason, "FCM connection retired");
        {
            let mut state = self.lock();
            state.live.retain(|c| !Arc::ptr_eq(c, conn));
            self.metrics.connections.set(state.live.len() as u64);
            if conn.opened.elapsed() >= REPLACE_IF_LIVED {
                self.grow(&mut state);
            }
        }
        // A request kept off the connection that refused it may now take it, or must open one.
        self.changed.notify_waiters();
    }

    fn retire_id(&self, id: u64, reason: &str) {
        let conn = self.lock().live.iter().find(|c| c.id == id).cloned();
        if let Some(conn) = conn {
            self.retire(&conn, reason);
        }
    }

    async fn connect(&self) -> Result<(Arc<Conn>, Protocol), SendError> {
        let c = &self.config;
        let (host, port) = (c.host.as_str(), c.port);
        let protocol = self.lock().protocol;
        let work = async {
            let tcp = self.tcp().await?;
            let Some((connector, name)) = &c.tls else {
                return match protocol {
                    Some(Protocol::Http1) => self.http1(tcp).await,
                    Some(_) => self.h2(tcp, Protocol::H2c).await,
                    None => self.h2c_or_http1(tcp).await,
                };
            };
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| tls_error(&self.endpoint(), e))?;
            match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => self.h2(tls, Protocol::H2).await,
                // A server that ignores ALPN speaks HTTP/1.1.
                Some(b"http/1.1") | None => self.http1(tls).await,
                Some(other) => Err(SendError::Protocol(format!(
                    "{} agreed by ALPN to {:?}, neither h2 nor http/1.1",
                    self.endpoint(),
                    String::from_utf8_lossy(other)
                ))),
            }
        };
        tokio::time::timeout(c.connect_timeout, work)
            .await
            .map_err(|_| {
                SendError::Connect(format!(
                    "connecting to {host}:{port} took longer than {:?}",
                    c.connect_timeout
                ))
            })?
    }

    async fn tcp(&self) -> Result<TcpStream, SendError> {
        let (host, port) = (self.config.host.as_str(), self.config.port);
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| SendError::Connect(format!("cannot connect to {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// A plain endpoint not yet known: HTTP/2 with prior knowledge, else HTTP/1.1 on a second
    /// connection, else the reason neither works.
    async fn h2c_or_http1(&self, tcp: TcpStream) -> Result<(Arc<Conn>, Protocol), SendError> {
        let h2c = match self.h2(tcp, Protocol::H2c).await {
            Ok(opened) => return Ok(opened),
            Err(e) => e.detail(),
        };
        tracing::debug!(error = %h2c, "FCM endpoint: no HTTP/2 with prior knowledge; trying HTTP/1.1");
        let tcp = self.tcp().await?;
        let (mut send, conn) = self.http1_conn(tcp).await?;
        match http1::probe(&mut send, &self.authority()).await {
            Ok(_) => Ok(conn.with(send)),
            // It answered, in neither: no retry will change that.
            Err(http1) if http1.not_http => Err(SendError::Protocol(format!(
                "{} speaks neither HTTP/2 with prior knowledge ({h2c}) nor HTTP/1.1 ({})",
                self.endpoint(),
                http1.reason
            ))),
            // Closed or reset without a word (a port forwarder with nothing behind it yet):
            // unreachable for now.
            Err(http1) => Err(SendError::Connect(format!(
                "{} answered neither HTTP/2 with prior knowledge ({h2c}) nor HTTP/1.1 ({})",
                self.endpoint(),
                http1.reason
            ))),
        }
    }

    /// `scheme://host:port`, for messages.
    fn endpoint(&self) -> String {
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.authority())
    }

    /// `host:port`, as `Host` wants it.
    fn authority(&self) -> String {
        let (host, port) = (&self.config.host, self.config.port);
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    async fn h2<T>(&self, io: T, protocol: Protocol) -> Result<(Arc<Conn>, Protocol), SendError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.handshake(io).await {
            Ok(conn) => Ok((conn, protocol)),
            Err(e) => Err(SendError::Connect(e)),
        }
    }

    /// An HTTP/1.1 connection.
    async fn http1<T>(&self, io: T) -> Result<(Arc<Conn>, Protocol), SendError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = self.http1_conn(io).await?;
        Ok(conn.with(send))
    }

    /// The client half of an HTTP/1.1 connection whose driver task runs (and takes it out of
    /// the pool when it ends), and what makes it a pool connection. Dropping the client half
    /// instead closes the connection.
    async fn http1_conn<T>(&self, io: T) -> Result<(http1::SendRequest, Http1Conn), SendError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = http1::handshake(io).await.map_err(SendError::Connect)?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let pool = self.me.clone();
        tokio::spawn(async move {
            let reason = match connection.await {
                Ok(()) => "closed".to_string(),
                Err(e) => e.to_string(),
            };
            if let Some(pool) = pool.upgrade() {
                pool.retire_id(id, &reason);
            }
        });
        Ok((send, Http1Conn(id)))
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
        let streams = send.clone();
        let conn = Arc::new(Conn {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            link: Link::H2(send),
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
        let advertised = streams.current_max_send_streams();
        conn.limit.store(advertised.max(1), Ordering::Relaxed);
        Ok(conn)
    }
}

/// Runs one connection until it ends: its first `PING` (reported on `ready`, as is the reason
/// the connection ended before it), then keep-alive `PING`s while it has requests in flight.
/// Takes it out of the pool when it ends.
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
    let mut ready = Some(ready);
    let keepalive = async {
        let first = tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await;
        let first = match first {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("HTTP/2 PING: {e}")),
            Err(_) => Err("no answer to the first HTTP/2 PING".to_string()),
        };
        let failed = first.is_err();
        if let Some(ready) = ready.take() {
            let _ = ready.send(first);
        }
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
    if let Some(ready) = ready.take() {
        let _ = ready.send(Err(format!("HTTP/2: {reason}")));
    }
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
    let retry_after = retry_after(&parts.headers);
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

/// A failed TLS handshake. A server that answers a TLS hello with something that is not TLS
/// (plain HTTP, most often) is a protocol problem; anything else (certificates, resets) is
/// reported as a connection failure.
fn tls_error(endpoint: &str, e: std::io::Error) -> SendError {
    let not_tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidMessage(_)));
    if not_tls {
        SendError::Protocol(format!(
            "{endpoint} does not speak TLS ({e}); a plain-HTTP endpoint takes an http:// URL"
        ))
    } else {
        let authority = endpoint.trim_start_matches("https://");
        SendError::Connect(format!("TLS with {authority}: {e}"))
    }
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
