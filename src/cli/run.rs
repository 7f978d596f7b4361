//! `ffpush run`: the worker, until SIGTERM or SIGINT (the Cloud Run entry point).

use tokio_util::sync::CancellationToken;

use super::terminated;
use crate::config::Settings;
use crate::daemon;

pub(super) async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("shutdown requested; draining");
        trigger.cancel();
    });
    let daemon = daemon::start(settings, shutdown).await?;
    daemon.run_until_stopped().await;
    Ok(())
}
