//! `ffpush run`: connect, listen, sweep, serve health, and drain on shutdown. `main` and the
//! tests drive the same [`start`].

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::fcm::Sender;
use crate::instances::Membership;
use crate::intake::{self, ListenState};
use crate::metrics::Metrics;
use crate::server;
use crate::store::Store;
use crate::worker::Worker;

/// A running daemon.
pub struct Daemon {
    pub worker: Arc<Worker>,
    pub listen: Arc<ListenState>,
    /// Where `/healthz`, `/readyz` and `/metrics` answer.
    pub http_addr: SocketAddr,
    stop: CancellationToken,
    background: Vec<JoinHandle<()>>,
    /// This instance's heartbeat and share of FFPUSH_FCM_RATE.
    membership: Membership,
}

/// Connects (waiting for Firestore if it is down), starts listening and serving.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Daemon> {
    use anyhow::Context as _;
    let store = Store::connect_with_retry(&settings, &shutdown)
        .await
        .context("connecting to Firestore")?;
    let sender = Arc::new(Sender::new(&settings).await.context("setting up FCM")?);
    // Opens the connections and finds out which HTTP FCM_ENDPOINT speaks. One that answers in
    // no HTTP ffpush speaks stops the start with the reason (every send would fail); one not
    // reachable yet is warned about, and sends retry until it is.
    sender.connect().await?;
    let metrics = Arc::new(Metrics::with_fcm(sender.metrics()));
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", settings.port))
        .await
        .with_context(|| format!("binding the health port {} (PORT)", settings.port))?;
    let http_addr = listener.local_addr()?;
    // Before anything is sent: this instance's share of FFPUSH_FCM_RATE, agreed with the
    // project's other instances through their heartbeats. Last of what may fail, so that a
    // start that fails leaves no heartbeat renewed behind.
    let membership = Membership::join(
        store.clone(),
        sender.clone(),
        metrics.clone(),
        &settings,
        &shutdown,
    )
    .await
    .context("joining the project's other instances (ffpush_instances)")?;
    let stop = shutdown.child_token();
    let (worker, due) = Worker::new(
        settings.clone(),
        store,
        sender.clone(),
        metrics.clone(),
        stop.clone(),
    );
    let listen = Arc::new(ListenState::default());
    let mut background = Vec::new();
    for (slot, collection) in [
        settings.collection.clone(),
        settings.user_collection.clone(),
    ]
    .into_iter()
    .enumerate()
    {
        background.push(tokio::spawn(intake::listen(
            worker.clone(),
            collection,
            listen.clone(),
            slot,
        )));
    }
    background.push(tokio::spawn(intake::sweep(worker.clone())));
    background.push(tokio::spawn(worker.clone().wake(due)));
    background.push(tokio::spawn(worker.clone().dispatch()));
    let app = server::router(server::Health {
        metrics,
        listen: listen.clone(),
        sender: sender.clone(),
    });
    let http_stop = stop.clone();
    background.push(tokio::spawn(async move {
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "health server failed");
        }
    }));
    // The connections are open; the access token is fetched ahead, in the background.
    tokio::spawn(async move {
        let _ = sender.access_token().await;
    });
    tracing::info!(worker = %settings.worker_id, project = %settings.project, %http_addr, "ffpush running");
    Ok(Daemon {
        worker,
        listen,
        http_addr,
        stop,
        background,
        membership,
    })
}

impl Daemon {
    /// Waits until `shutdown` fires, then drains within the grace period.
    pub async fn run_until_stopped(self) {
        self.stop.cancelled().await;
        self.drain().await;
    }

    /// Stops taking work, lets in-flight sends finish and progress be written, within the
    /// grace period (a warning if it runs out).
    pub async fn stop(self) {
        self.stop.cancel();
        self.drain().await;
    }

    async fn drain(self) {
        let grace = self.worker.settings.shutdown_grace;
        self.worker.tasks.close();
        if tokio::time::timeout(grace, self.worker.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "shutdown grace ran out with work in flight; it will be resumed elsewhere"
            );
        }
        // Only now: its share goes to the others once nothing of this instance is in flight.
        self.membership.leave().await;
        for task in self.background {
            task.abort();
        }
        tracing::info!("ffpush stopped");
    }
}
