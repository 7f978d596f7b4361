//! FCM emulator: speaks the FCM HTTP v1 send API and the OAuth2 token endpoint.
//!
//! Google ships no FCM emulator, so tests and `ffpush dev` run this one. It answers with the
//! real response bodies (`fixtures/fcm_errors.json`), validates messages the way FCM does, and
//! lets a caller choose per registration token what FCM answers ([`Script`]).
//!
//! # Layout
//! - `mod.rs`: the [`FcmEmulator`] handle, shared state and the router.
//! - `send`: `POST /v1/projects/{project}/messages:send`.
//! - `validate`: FCM's checks on a send request.
//! - `oauth`: `POST /token`, the JWT check, access tokens and the service-account key writer.
//! - `script`: per-token scripted answers and the `/emulator/tokens/{token}` control routes.
//! - `serve`: connections: HTTP/1.1 and HTTP/2 (h2c, or h2 over TLS), the advertised stream
//!   limit, and GOAWAY after a number of requests.
//! - `tls`: the HTTPS mode (rustls, ALPN `h2` and `http/1.1`).
//!
//! # Behaving like Google's front end
//! [`EmulatorOptions`] can make the emulator as slow and as strict as the real service:
//! - `max_streams`: the `SETTINGS_MAX_CONCURRENT_STREAMS` each HTTP/2 connection advertises
//!   (100, as Google's front ends do). A client that opens more streams than that gets each
//!   extra stream refused with `RST_STREAM(REFUSED_STREAM)`, which is what hyper's h2 server
//!   does; after 1024 such refusals on one connection h2 closes it with
//!   `GOAWAY(ENHANCE_YOUR_CALM, "too_many_internal_resets")`. Google's front end is harsher and
//!   sends `GOAWAY` (debug data `exceeded_max_concurrent_streams`) at once. Either way the
//!   refused streams were never processed.
//! - `latency` ± `jitter`: how long each send takes to be answered (tens of milliseconds at
//!   Google).
//! - `quota` per `quota_window`: send requests per project per window (FCM's default is
//!   600 000 per minute); beyond it, 429 `QUOTA_EXCEEDED` with `Retry-After` until the window
//!   ends, as FCM answers.
//! - `goaway_after`: a graceful `GOAWAY` after that many sends on one connection, as front ends
//!   recycling their connections do.
//!
//! # Bad days
//! What a production incident looks like from the client, on demand (handle methods and
//! control routes, so a test or a person with `curl` can cause it mid-send):
//! - [`FcmEmulator::outage`]: every send answered `503 UNAVAILABLE` with FCM's body for a while.
//! - [`Script::Hang`]: one token's sends never answered, as by a stuck backend;
//!   [`Script::HangConnection`]: and the connection carrying it goes silent, as one that died
//!   without a word.
//! - [`Script::RefusedStream`]: one token's sends refused unprocessed (`REFUSED_STREAM`).
//!
//! And, unlike Google, as plain as a mock server or an old proxy: `http1_only` serves HTTP/1.1
//! alone (no h2c; over TLS, ALPN offers only `http/1.1`).
//!
//! # Lifetime
//! The server runs until [`FcmEmulator::shutdown`] is called or the last clone of the handle is
//! dropped, whichever comes first; in-flight requests are finished first.

mod oauth;
mod script;
mod send;
mod serve;
mod tls;
mod validate;

pub use script::Script;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How the emulator behaves where real FCM has no knob we can copy.
#[derive(Clone, Debug)]
pub struct EmulatorOptions {
    /// Lifetime of the access tokens `/token` issues. Google's is one hour; tests shorten it
    /// to exercise expiry.
    pub token_lifetime: Duration,
    /// Keep every accepted message and attempt (for [`FcmEmulator::messages`] and
    /// `/emulator/messages`). Off for load tests: memory then stays flat and only
    /// [`FcmEmulator::stats`] counts.
    pub record: bool,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` advertised on every HTTP/2 connection; streams beyond
    /// it are refused (`RST_STREAM(REFUSED_STREAM)`). Google's front ends advertise 100.
    pub max_streams: u32,
    /// How long a send takes to be answered. Zero (the default) for tests.
    pub latency: Duration,
    /// Each send's delay is drawn uniformly from `latency ± jitter` (never below zero).
    pub jitter: Duration,
    /// Send requests allowed per project per `quota_window`; beyond that, 429 QUOTA_EXCEEDED.
    /// `None`: no quota.
    pub quota: Option<u64>,
    /// The quota's window: a minute at FCM; tests shorten it. Windows are consecutive and
    /// start when the emulator starts.
    pub quota_window: Duration,
    /// After this many send requests on one connection, close it gracefully (`GOAWAY`; the
    /// requests already received are answered). `None`: connections live on.
    pub goaway_after: Option<u64>,
    /// Serve HTTP/1.1 only, as most mock servers and many proxies do: HTTP/2 with prior
    /// knowledge is not understood, and over TLS ALPN offers only `http/1.1`.
    pub http1_only: bool,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            token_lifetime: Duration::from_secs(3600),
            record: true,
            max_streams: 100,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            quota: None,
            quota_window: Duration::from_secs(60),
            goaway_after: None,
            http1_only: false,
        }
    }
}

impl EmulatorOptions {
    /// The advertised HTTP/2 stream limit per connection.
    pub fn max_streams(mut self, max_streams: u32) -> Self {
        self.max_streams = max_streams;
        self
    }

    /// Every send answered after `latency ± jitter`.
    pub fn latency(mut self, latency: Duration, jitter: Duration) -> Self {
        self.latency = latency;
        self.jitter = jitter;
        self
    }

    /// At most `per_window` send requests per project in each `window`.
    pub fn quota(mut self, per_window: u64, window: Duration) -> Self {
        self.quota = Some(per_window);
        self.quota_window = window;
        self
    }

    /// A graceful GOAWAY after `requests` sends on a connection.
    pub fn goaway_after(mut self, requests: u64) -> Self {
        self.goaway_after = Some(requests);
        self
    }

    /// HTTP/1.1 only (see [`EmulatorOptions::http1_only`]).
    pub fn http1_only(mut self) -> Self {
        self.http1_only = true;
        self
    }

    /// Keep counts only (see [`EmulatorOptions::record`]).
    pub fn count_only(mut self) -> Self {
        self.record = false;
        self
    }
}

/// Counts of send requests, kept whether or not messages are recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Sends answered 200.
    pub accepted: u64,
    /// Sends that passed authentication, whatever they were answered.
    pub attempts: u64,
    /// Of the attempts, those that came over HTTP/2 (h2 by ALPN, or h2c).
    pub http2: u64,
    /// Connections that carried at least one send.
    pub connections: u64,
    /// The most sends ever in progress at once on one connection.
    pub peak_streams: u64,
}

/// One quota window of one project (only kept when a quota is set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QuotaWindow {
    /// Windows are numbered from 0, the one starting when the emulator started.
    pub index: u64,
    /// Send requests counted against the quota in this window (at most the quota).
    pub admitted: u64,
    /// Send requests answered 429 QUOTA_EXCEEDED in this window.
    pub refused: u64,
}

/// A send FCM accepted (answered 200).
#[derive(Clone, Debug, Serialize)]
pub struct AcceptedMessage {
    pub project: String,
    pub token: Option<String>,
    pub topic: Option<String>,
    /// The full `message` object as received.
    pub message: serde_json::Value,
    /// The `name` answered, `projects/{project}/messages/{id}`.
    pub name: String,
    pub received_at: DateTime<Utc>,
    /// `validate_only` requests are checked and answered like real sends but deliver nothing.
    pub validate_only: bool,
    /// `HTTP/2.0` or `HTTP/1.1`: shows whether the client negotiated h2.
    pub http_version: String,
    /// The connection it came over, numbered from 0 in the order the emulator accepted them.
    pub connection: Option<u64>,
}

/// One send request that passed authentication, whatever it was answered.
#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    pub token: Option<String>,
    /// The status answered; 0 for a send not answered: held by [`Script::Hang`] (listed when
    /// it arrives; if released, it is answered and listed again) or refused with
    /// `REFUSED_STREAM`.
    pub status: u16,
    pub at: DateTime<Utc>,
    /// The connection it came over (see [`AcceptedMessage::connection`]).
    pub connection: Option<u64>,
}

/// Handle on a running emulator. Clones share the same server and state.
#[derive(Clone)]
pub struct FcmEmulator {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    /// Stops the server when the last handle goes away, so a test's emulator dies with it.
    _stop_on_drop: Arc<DropGuard>,
}

/// What the handlers and the handle share.
struct Shared {
    addr: SocketAddr,
    url: String,
    options: EmulatorOptions,
    /// Quota windows count from here.
    started: Instant,
    state: Mutex<EmulatorState>,
    /// [`Stats::connections`] and [`Stats::peak_streams`], kept outside the lock.
    connections: AtomicU64,
    peak_streams: AtomicU64,
    /// Told whenever a token's script is set or cleared: held sends look again.
    scripts_changed: Notify,
}

/// Every send answered 503 UNAVAILABLE until `until`.
#[derive(Clone, Copy)]
struct Outage {
    until: Instant,
    retry_after_secs: Option<u64>,
}

#[derive(Default)]
struct EmulatorState {
    credentials: oauth::Credentials,
    scripts: HashMap<String, Script>,
    outage: Option<Outage>,
    messages: Vec<AcceptedMessage>,
    /// (project, attempt); the project is kept apart because `Attempt` is per project already.
    attempts: Vec<(String, Attempt)>,
    stats: Stats,
    /// project → window index → counts, when a quota is set.
    quota: HashMap<String, BTreeMap<u64, QuotaWindow>>,
}

impl Shared {
    /// The state lock is never held across an await, and a panic while holding it leaves the
    /// state consistent enough for a test emulator, so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, EmulatorState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> Stats {
        Stats {
            connections: self.connections.load(Ordering::Relaxed),
            peak_streams: self.peak_streams.load(Ordering::Relaxed),
            ..self.state().stats
        }
    }

    fn token_uri(&self) -> String {
        format!("{}/token", self.url)
    }

    /// Sets (`Some`) or clears (`None`) the script of `token`, releasing sends it held.
    fn set_script(&self, token: String, script: Option<Script>) {
        {
            let mut state = self.state();
            match script {
                Some(script) => state.scripts.insert(token, script),
                None => state.scripts.remove(&token),
            };
        }
        self.scripts_changed.notify_waiters();
    }

    /// Waits until `token`'s script no longer holds its sends.
    async fn released(&self, token: &str) {
        loop {
            let changed = self.scripts_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !script::hangs(self.state().scripts.get(token)) {
                return;
            }
            changed.await;
        }
    }

    /// During an outage: the `Retry-After` its 503s carry (`Some(None)`: none).
    fn outage(&self) -> Option<Option<u64>> {
        let state = self.state();
        let outage = state.outage?;
        (Instant::now() < outage.until).then_some(outage.retry_after_secs)
    }

    fn start_outage(&self, duration: Duration, retry_after_secs: Option<u64>) {
        let until = Instant::now()
            .checked_add(duration)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
        tracing::debug!(?duration, "FCM emulator: outage");
        self.state().outage = Some(Outage {
            until,
            retry_after_secs,
        });
    }
}

impl FcmEmulator {
    /// Binds `addr` (port 0 picks a free port) and serves on the current tokio runtime, so the
    /// server dies with that runtime. Use [`FcmEmulator::start_on_thread`] for an emulator
    /// shared by many tests.
    pub async fn start(addr: SocketAddr, options: EmulatorOptions) -> std::io::Result<FcmEmulator> {
        let listener = TcpListener::bind(addr).await?;
        let (emulator, serve) = prepare(listener, options, None)?;
        tokio::spawn(serve);
        Ok(emulator)
    }

    /// Like [`FcmEmulator::start`], but HTTPS only, as FCM is: a rustls server offering `h2` and
    /// `http/1.1` by ALPN (only `http/1.1` with [`EmulatorOptions::http1_only`]), with the given certificate chain and private key (PEM). Clients trust
    /// it through `FFPUSH_FCM_CA_CERT`; [`FcmEmulator::url`] and the `token_uri` of written keys
    /// are `https://` URLs.
    pub async fn start_tls(
        addr: SocketAddr,
        options: EmulatorOptions,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> std::io::Result<FcmEmulator> {
        let acceptor = tls::acceptor(cert_pem, key_pem, options.http1_only)?;
        let listener = TcpListener::bind(addr).await?;
        let (emulator, serve) = prepare(listener, options, Some(acceptor))?;
        tokio::spawn(serve);
        Ok(emulator)
    }

    /// Binds `addr` and serves on a dedicated OS thread with its own single-threaded runtime,
    /// so the emulator outlives any one test's runtime. Blocks until the socket is bound;
    /// callable from sync and async code (e.g. a `OnceLock` initializer).
    pub fn start_on_thread(
        addr: SocketAddr,
        options: EmulatorOptions,
    ) -> std::io::Result<FcmEmulator> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("fcm-emulator".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let prepared = TcpListener::from_std(listener)
                        .and_then(|listener| prepare(listener, options, None));
                    match prepared {
                        Ok((emulator, serve)) => {
                            if ready_tx.send(Ok(emulator)).is_ok() {
                                serve.await;
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        ready_rx.recv().map_err(|_| {
            std::io::Error::other("the FCM emulator thread stopped before it was ready")
        })?
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT`: what `FCM_ENDPOINT` is set to.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// `{url}/token`, the OAuth2 token endpoint written into service-account files.
    pub fn token_uri(&self) -> String {
        self.shared.token_uri()
    }

    /// Sets what sends to `token` are answered; replaces an earlier script for that token
    /// (and releases sends a [`Script::Hang`] held, to be answered by the new one).
    pub fn script(&self, token: &str, answer: Script) {
        tracing::debug!(token = %redact(token), ?answer, "FCM emulator: script set");
        self.shared.set_script(token.to_owned(), Some(answer));
    }

    /// Back to plain success for `token`; sends a [`Script::Hang`] held are answered 200.
    pub fn clear_script(&self, token: &str) {
        tracing::debug!(token = %redact(token), "FCM emulator: script cleared");
        self.shared.set_script(token.to_owned(), None);
    }

    /// An outage: for `duration` from now, every send (of any project, whatever its token's
    /// script) is answered `503 UNAVAILABLE` with FCM's body and no `Retry-After`, as when
    /// FCM's backend is down. Replaces an outage under way.
    pub fn outage(&self, duration: Duration) {
        self.shared.start_outage(duration, None);
    }

    /// [`FcmEmulator::outage`] whose answers carry `Retry-After: retry_after_secs`.
    pub fn outage_with_retry_after(&self, duration: Duration, retry_after_secs: u64) {
        self.shared.start_outage(duration, Some(retry_after_secs));
    }

    /// Ends an outage at once.
    pub fn end_outage(&self) {
        self.shared.state().outage = None;
    }

    /// Sends to `project` answered 200, in the order they were received.
    pub fn messages(&self, project: &str) -> Vec<AcceptedMessage> {
        self.shared
            .state()
            .messages
            .iter()
            .filter(|m| m.project == project)
            .cloned()
            .collect()
    }

    /// Every send request to `project` that passed authentication, with the status answered.
    pub fn attempts(&self, project: &str) -> Vec<Attempt> {
        self.shared
            .state()
            .attempts
            .iter()
            .filter(|(p, _)| p == project)
            .map(|(_, attempt)| attempt.clone())
            .collect()
    }

    /// Counts of send requests so far (kept also when messages are not recorded).
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The quota windows of `project` that saw sends, oldest first (empty without a quota).
    pub fn quota_windows(&self, project: &str) -> Vec<QuotaWindow> {
        self.shared
            .state()
            .quota
            .get(project)
            .map(|windows| windows.values().copied().collect())
            .unwrap_or_default()
    }

    /// Invalidates every access token issued so far, as if Google had revoked them.
    pub fn revoke_access_tokens(&self) {
        self.shared.state().credentials.revoke_all();
    }

    /// How many access tokens `/token` has issued.
    pub fn tokens_issued(&self) -> usize {
        self.shared.state().credentials.issued()
    }

    /// Generates an RSA-2048 key, registers its public half with this emulator and writes a
    /// Google service-account JSON key file at `path` whose `token_uri` is this emulator.
    /// Key generation is CPU-bound (tens of milliseconds) and runs on the calling thread.
    pub fn write_service_account(&self, path: &Path, project: &str) -> std::io::Result<()> {
        oauth::write_service_account(&self.shared, path, project)
    }

    /// Stops accepting connections; in-flight requests are still answered.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for FcmEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmEmulator")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

/// Builds the handle and the server future for an already bound listener.
fn prepare(
    listener: TcpListener,
    options: EmulatorOptions,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<(FcmEmulator, impl Future<Output = ()> + Send + 'static)> {
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let shared = Arc::new(Shared {
        addr,
        url: format!("{scheme}://{}", reachable(addr)),
        options,
        started: Instant::now(),
        state: Mutex::new(EmulatorState::default()),
        connections: AtomicU64::new(0),
        peak_streams: AtomicU64::new(0),
        scripts_changed: Notify::new(),
    });
    let cancel = CancellationToken::new();
    let app = router(Arc::clone(&shared));
    let serve = serve::serve(listener, app, tls, shared.options.clone(), cancel.clone());
    let emulator = FcmEmulator {
        shared,
        _stop_on_drop: Arc::new(cancel.clone().drop_guard()),
        cancel,
    };
    Ok((emulator, serve))
}

/// The address clients should dial: a wildcard bind is reached through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        // `messages:send` is matched inside the handler rather than trusting a colon literal
        // in the route syntax.
        .route("/v1/projects/{project}/{action}", post(send::send))
        .route("/token", post(oauth::token))
        .route(
            "/emulator/tokens/{token}",
            post(script::set_script).delete(script::clear_script),
        )
        .route(
            "/emulator/outage",
            post(script::start_outage).delete(script::end_outage),
        )
        .route("/emulator/messages", get(list_messages))
        .route("/emulator/stats", get(stats))
        .route("/emulator/quota", get(quota_windows))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(shared)
}

#[derive(Deserialize)]
struct MessagesQuery {
    project: Option<String>,
}

/// `GET /emulator/messages[?project=p]`: accepted sends, for tests and for people watching a
/// local run.
async fn list_messages(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<MessagesQuery>,
) -> Json<Vec<AcceptedMessage>> {
    tracing::debug!(project = ?query.project, "FCM emulator: messages listed");
    let state = shared.state();
    let messages = state
        .messages
        .iter()
        .filter(|m| query.project.as_ref().is_none_or(|p| *p == m.project))
        .cloned()
        .collect();
    Json(messages)
}

/// `GET /emulator/stats`: counts of send requests, for load tests that do not record.
async fn stats(State(shared): State<Arc<Shared>>) -> Json<Stats> {
    Json(shared.stats())
}

/// `GET /emulator/quota?project=p`: what each quota window of `p` admitted and refused
/// ([`FcmEmulator::quota_windows`]), for a client in another process.
async fn quota_windows(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<MessagesQuery>,
) -> Json<Vec<QuotaWindow>> {
    let state = shared.state();
    let windows = query
        .project
        .and_then(|p| state.quota.get(&p))
        .map(|windows| windows.values().copied().collect())
        .unwrap_or_default();
    Json(windows)
}

async fn not_found(method: Method, uri: Uri) -> Response {
    no_route(&method, uri.path())
}

fn no_route(method: &Method, path: &str) -> Response {
    let logged = match path.strip_prefix("/emulator/tokens/") {
        Some(token) => format!("/emulator/tokens/{}", redact(token)),
        None => path.to_owned(),
    };
    tracing::debug!(%method, path = logged, "FCM emulator: no such route");
    let message = format!("No route for {method} {path}");
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"code": 404, "message": message, "status": "NOT_FOUND"}})),
    )
        .into_response()
}

/// Registration tokens are credentials of sorts; logs show only their start.
fn redact(token: &str) -> String {
    let mut shown: String = token.chars().take(8).collect();
    if shown.len() < token.len() {
        shown.push('…');
    }
    shown
}
