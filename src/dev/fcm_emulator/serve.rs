//! Accepting and serving connections, plain or TLS: hyper-util's auto server speaks HTTP/1.1,
//! h2c with prior knowledge (plain) and h2 by ALPN (TLS), and advertises the configured
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; or HTTP/1.1 alone (`http1_only`). A connection can be
//! silenced (a hang script) and a stream refused (`REFUSED_STREAM`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use axum::{Extension, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{EmulatorOptions, Shared};

/// How long in-flight connections get to finish after shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// The sends of one connection: counted for [`super::Stats`], and the connection closed
/// gracefully after `goaway_after` of them, or silenced while a send holds it so.
pub(super) struct ConnectionSends {
    /// The connection's number, in accept order from 0.
    pub(super) id: u64,
    /// Sends that hold the connection silent ([`ConnectionSends::silence`]).
    silenced: watch::Sender<u32>,
    count: AtomicU64,
    in_progress: AtomicU64,
    goaway_after: Option<u64>,
    close: Notify,
}

/// One send in progress on a connection; dropped when it is answered (or abandoned).
pub(super) struct InProgress(Arc<ConnectionSends>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A send holding its connection silent; it speaks again when the last one is dropped.
pub(super) struct Silence(Arc<ConnectionSends>);

impl Drop for Silence {
    fn drop(&mut self) {
        self.0.silenced.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Put into a response's extensions: the stream is reset with `REFUSED_STREAM` instead of
/// answered (on HTTP/1.1 the connection is closed unanswered).
#[derive(Clone, Copy, Debug)]
pub(super) struct RefusedStream;

impl ConnectionSends {
    /// Nothing more is read from or written to the connection (no answers, no `PING`
    /// acknowledgements) until the returned guard is dropped.
    pub(super) fn silence(self: &Arc<Self>) -> Silence {
        self.silenced.send_modify(|n| *n += 1);
        tracing::debug!(connection = self.id, "FCM emulator: connection silenced");
        Silence(Arc::clone(self))
    }

    /// Called by the send handler for every send request on this connection.
    pub(super) fn start(self: &Arc<Self>, shared: &Shared) -> InProgress {
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if count == 1 {
            shared.connections.fetch_add(1, Ordering::Relaxed);
        }
        if Some(count) == self.goaway_after {
            self.close.notify_one();
        }
        let now = self.in_progress.fetch_add(1, Ordering::Relaxed) + 1;
        shared.peak_streams.fetch_max(now, Ordering::Relaxed);
        InProgress(Arc::clone(self))
    }
}

/// Accepts until `stop`, then lets open connections finish (up to [`DRAIN`]).
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    options: EmulatorOptions,
    stop: CancellationToken,
) {
    let mut server = auto::Builder::new(TokioExecutor::new());
    if options.http1_only {
        server = server.http1_only();
    }
    server.http2().max_concurrent_streams(options.max_streams);
    let connections = TaskTracker::new();
    let mut accepted = 0u64;
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "FCM emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // No Nagle delay: answers are small and latency is measured.
        let _ = tcp.set_nodelay(true);
        let sends = Arc::new(ConnectionSends {
            id: accepted,
            silenced: watch::Sender::new(0),
            count: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            goaway_after: options.goaway_after,
            close: Notify::new(),
        });
        accepted += 1;
        let app = app.clone().layer(Extension(Arc::clone(&sends)));
        let server = server.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => connection(&server, tls, app, sends, stop).await,
                    Err(e) => tracing::debug!(error = %e, "FCM emulator: TLS handshake failed"),
                },
                None => connection(&server, tcp, app, sends, stop).await,
            }
        });
    }
    // Refuse new connections at once; give the open ones a moment to finish.
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(DRAIN, connections.wait()).await;
}

/// Serves one connection until it ends; closes it gracefully (GOAWAY for HTTP/2) on `stop` or
/// after its allowed number of sends.
async fn connection<I>(
    server: &auto::Builder<TokioExecutor>,
    io: I,
    app: Router,
    sends: Arc<ConnectionSends>,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = Refusing(TowerToHyperService::new(app));
    let connection = server.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let recycle = sends.close.notified();
    tokio::pin!(recycle);
    let mut silenced = sends.silenced.subscribe();
    let mut closing = false;
    loop {
        if *silenced.borrow_and_update() > 0 {
            // Silent: the connection is not driven at all, so nothing is read or written.
            tokio::select! {
                _ = silenced.changed() => continue,
                _ = stop.cancelled() => return,
            }
        }
        tokio::select! {
            _ = silenced.changed() => {}
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "FCM emulator: connection ended with an error");
                }
                return;
            }
            _ = stop.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = &mut recycle, if !closing => {
                tracing::debug!("FCM emulator: connection recycled (GOAWAY)");
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The router, with [`RefusedStream`] answers turned into a service error carrying
/// `REFUSED_STREAM`: hyper's HTTP/2 server resets the stream with the h2 reason it finds in a
/// service error, and its HTTP/1.1 server closes the connection.
#[derive(Clone)]
struct Refusing<S>(S);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> hyper::service::Service<Request<Incoming>> for Refusing<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move {
            let response = answer.await.map_err(Into::into)?;
            if response.extensions().get::<RefusedStream>().is_some() {
                return Err(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)) as BoxError);
            }
            Ok(response)
        })
    }
}
