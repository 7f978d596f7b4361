//! [`TestApp`]: a project of its own on the shared emulators, and the steps tests take on it.

use std::collections::HashMap;
use std::time::Duration;

use ffpush::config::Settings;
use ffpush::daemon::{self, Daemon};
use ffpush::dev::fcm_emulator::FcmEmulator;
use ffpush::model::pb;
use ffpush::store::{self, Store};
use tokio_util::sync::CancellationToken;

use super::{s, shared, wait_until};

/// A project of its own on the shared emulators, and what a test needs to drive it.
pub struct TestApp {
    pub project: String,
    pub settings: Settings,
    pub store: Store,
    _dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn new() -> TestApp {
        TestApp::with(|_| {}).await
    }

    /// A fresh project; `tune` adjusts the settings the daemons of this test will use.
    pub async fn with(tune: impl FnOnce(&mut Settings)) -> TestApp {
        let shared = shared();
        let project = format!("it-{:016x}", rand::random::<u64>());
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("key.json");
        shared
            .fcm
            .write_service_account(&key, &project)
            .expect("writing the service-account key");
        let mut settings =
            Settings::for_emulators(&project, &shared.firestore_host, &shared.fcm.url(), key)
                .expect("emulator settings");
        settings.quota_floor = Duration::from_millis(200);
        settings.max_backoff = Duration::from_secs(1);
        settings.sweep_interval = Duration::from_secs(2);
        tune(&mut settings);
        let store = Store::connect(&settings)
            .await
            .expect("connecting to the Firestore emulator");
        TestApp {
            project,
            settings,
            store,
            _dir: dir,
        }
    }

    /// `ffpush run` as a separate process, configured by environment for this test's project
    /// as Cloud Run would configure it (health port: any). Output goes nowhere until the
    /// caller says otherwise.
    pub fn run_command(&self) -> std::process::Command {
        let s = &self.settings;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ffpush"));
        cmd.arg("run")
            .env("GOOGLE_CLOUD_PROJECT", &s.project)
            .env(
                "FIRESTORE_EMULATOR_HOST",
                s.firestore_emulator_host.as_deref().unwrap_or_default(),
            )
            .env(
                "GOOGLE_APPLICATION_CREDENTIALS",
                s.credentials.as_deref().unwrap_or(std::path::Path::new("")),
            )
            .env("FCM_ENDPOINT", &s.fcm_endpoint)
            .env("PORT", "0")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    }

    pub fn fcm(&self) -> &'static FcmEmulator {
        &shared().fcm
    }

    /// Starts an in-process `ffpush run` against this project.
    pub async fn start_worker(&self) -> (Daemon, CancellationToken) {
        let shutdown = CancellationToken::new();
        let daemon = daemon::start(self.settings.clone(), shutdown.clone())
            .await
            .expect("starting the worker");
        wait_until(Duration::from_secs(30), || daemon.listen.all_up()).await;
        (daemon, shutdown)
    }

    pub async fn add_token(&self, user: &str, id: &str, token: &str, device: &str) {
        let mut f = HashMap::new();
        f.insert("fcm_token".to_string(), store::string(token));
        f.insert("device_type".to_string(), store::string(device));
        f.insert(
            "created_at".to_string(),
            store::timestamp(chrono::Utc::now()),
        );
        self.store
            .set(
                &format!("{}/{user}/fcm_tokens/{id}", self.settings.users_collection),
                f,
            )
            .await
            .expect("writing a token");
    }

    pub async fn token_docs(&self, user: &str) -> Vec<String> {
        let q = store::TokenQuery {
            user: Some(format!("{}/{user}", self.settings.users_collection)),
            page_size: 1000,
            ..Default::default()
        };
        self.store
            .token_page(&q, None)
            .await
            .expect("reading tokens")
            .into_iter()
            .map(|t| t.token)
            .collect()
    }

    pub async fn write(&self, collection: &str, fields: Vec<(&str, pb::Value)>) -> String {
        let fields = fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let name = self
            .store
            .create(collection, fields)
            .await
            .expect("writing a notification");
        self.store.relative(&name).to_string()
    }

    /// A console notification with `title` for `user_refs`; returns its path.
    pub async fn notify(&self, title: &str, user_refs: &str) -> String {
        self.write(
            "ff_push_notifications",
            vec![
                ("notification_title", s(title)),
                ("notification_text", s("x")),
                ("user_refs", s(user_refs)),
            ],
        )
        .await
    }

    /// Waits for `status` to become final and returns the document.
    pub async fn finished(&self, relative: &str) -> pb::Document {
        self.finished_within(relative, Duration::from_secs(90))
            .await
    }

    /// Waits (up to `limit`) for the document's `status` to become final; past it, fails
    /// showing the fields the document holds.
    pub async fn finished_within(&self, relative: &str, limit: Duration) -> pb::Document {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let doc = self
                .store
                .get(relative)
                .await
                .expect("reading the notification");
            if let Some(doc) = &doc
                && ffpush::model::Status::of(doc).is_finished()
            {
                return doc.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{relative} did not finish within {limit:?}: {:?}",
                doc.map(|d| d.fields)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Tokens FCM accepted for this project, with the title they carried.
    pub fn delivered(&self) -> Vec<(String, String)> {
        self.fcm()
            .messages(&self.project)
            .into_iter()
            .filter(|m| !m.validate_only)
            .map(|m| {
                let title = m.message["notification"]["title"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (m.token.unwrap_or_default(), title)
            })
            .collect()
    }
}
