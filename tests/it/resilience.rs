//! Start-up and connection behaviour.

use std::time::Duration;

use ffpush::config::{Settings, SettingsArgs};
use ffpush::fcm::Sender;
use ffpush::store::Store;

use crate::{TestApp, num, s, text};

/// Two rustls crypto providers in one build panic at the first TLS handshake; building the
/// production (https) clients and making a TLS attempt proves there is exactly one.
#[tokio::test]
async fn production_clients_build_without_a_crypto_provider_panic() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    crate::shared()
        .fcm
        .write_service_account(&key, "prod-check")
        .unwrap();
    let settings = Settings::from_args(&SettingsArgs {
        project: Some("prod-check".into()),
        credentials: Some(key.display().to_string()),
        ..Default::default()
    })
    .unwrap();
    assert!(settings.fcm_endpoint.starts_with("https://"));
    let sender = Sender::new(&settings).await.expect("the FCM client builds");
    // No network here: the https attempt must fail with an error, not a panic.
    let attempt = tokio::time::timeout(
        Duration::from_secs(20),
        sender.dry_run(serde_json::json!({"token": "t"})),
    )
    .await;
    assert!(!matches!(attempt, Ok(Ok(_))));
    let store = tokio::time::timeout(Duration::from_secs(20), Store::connect(&settings)).await;
    assert!(
        !matches!(store, Ok(Ok(_))),
        "no network: production Firestore cannot answer here"
    );
}

#[tokio::test]
async fn documents_written_while_no_worker_ran_are_sent_at_start() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    app.add_token("u1", "t", &format!("{p}-u1"), "iOS").await;
    let mut docs = Vec::new();
    for i in 0..3 {
        docs.push(
            app.write(
                "ff_user_push_notifications",
                vec![
                    ("notification_title", s(&format!("backlog-{i}"))),
                    ("notification_text", s("x")),
                    ("user_refs", s("users/u1")),
                ],
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.delivered().is_empty());
    let (worker, _) = app.start_worker().await;
    for doc in &docs {
        let done = app.finished(doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
        assert_eq!(num(&done, "num_sent"), Some(1));
    }
    assert_eq!(app.delivered().len(), 3);
    worker.stop().await;
}
