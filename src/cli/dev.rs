//! `ffpush dev`: the Firestore emulator, the FCM emulator, a key for it and the worker, locally.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::{Usage, terminated};
use crate::config::{Settings, SettingsArgs};
use crate::daemon;
use crate::dev::fcm_emulator::{EmulatorOptions, FcmEmulator};
use crate::dev::firestore_emulator::FirestoreEmulator;
use crate::dev::seed;
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub(super) struct DevArgs {
    /// Create demo users with device tokens (users/alice, users/bob, users/carol without tokens).
    #[arg(long)]
    seed: bool,
    /// The users collection the demo users go into and batches are bounded by.
    #[arg(long = "users-collection", env = "FFPUSH_USERS_COLLECTION")]
    users_collection: Option<String>,
    /// Port of the Firestore emulator started here (ignored when FIRESTORE_EMULATOR_HOST is set).
    #[arg(long, default_value_t = 8681)]
    firestore_port: u16,
    /// Port of the FCM emulator.
    #[arg(long, default_value_t = 8682)]
    fcm_port: u16,
    /// Project id used on the emulators.
    #[arg(long, default_value = "demo-ffpush")]
    project: String,
    /// Port for health and metrics.
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

pub(super) async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let users_collection = crate::config::collection_name(
        &crate::config::USERS_COLLECTION,
        &SettingsArgs {
            users_collection: args.users_collection.clone(),
            ..Default::default()
        },
    )
    .map_err(|e| Usage(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("ffpush-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let external = std::env::var("FIRESTORE_EMULATOR_HOST")
        .ok()
        .filter(|h| !h.is_empty());
    let (firestore_host, _firestore) = match external {
        Some(host) => (host, None),
        None => {
            eprintln!(
                "starting the Firestore emulator on 127.0.0.1:{} …",
                args.firestore_port
            );
            let port = args.firestore_port;
            let emulator =
                tokio::task::spawn_blocking(move || FirestoreEmulator::start(Some(port))).await??;
            (emulator.host_port().to_string(), Some(emulator))
        }
    };
    let fcm = FcmEmulator::start(
        SocketAddr::from(([127, 0, 0, 1], args.fcm_port)),
        EmulatorOptions::default(),
    )
    .await
    .with_context(|| format!("starting the FCM emulator on port {}", args.fcm_port))?;
    let key = dir.join("service-account.json");
    fcm.write_service_account(&key, &args.project)?;
    let mut settings =
        Settings::for_emulators(&args.project, &firestore_host, &fcm.url(), key.clone())?;
    settings.port = args.port;
    settings.users_collection = users_collection.clone();
    if args.seed {
        let store = Store::connect(&settings).await?;
        seed::demo(&store).await?;
    }
    let shutdown = CancellationToken::new();
    let daemon = daemon::start(settings, shutdown.clone()).await?;
    eprintln!(
        "\nffpush dev is running (Ctrl-C stops everything):\n  Firestore emulator   {firestore_host} (project {project})\n  FCM emulator         {fcm_url}  — sent messages: {fcm_url}/emulator/messages\n  health / metrics     http://{http}/readyz  http://{http}/metrics\n  service-account key  {key}\n\nSend a notification from another terminal:\n  FIRESTORE_EMULATOR_HOST={firestore_host} GOOGLE_CLOUD_PROJECT={project} ffpush send --title Hello --text 'From ffpush' --user {users}/alice --wait\n",
        project = args.project,
        fcm_url = fcm.url(),
        http = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.http_addr.port())),
        key = key.display(),
        users = users_collection,
    );
    terminated().await;
    eprintln!("stopping …");
    shutdown.cancel();
    daemon.run_until_stopped().await;
    fcm.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
