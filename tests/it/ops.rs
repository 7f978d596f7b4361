//! What an operator touches: health, readiness, metrics, doctor.

use std::process::Command;

use ffpush::config::SettingsArgs;
use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator, Script};
use ffpush::doctor;
use ffpush::store;

use crate::{TestApp, s};

async fn get(url: String) -> (u16, String) {
    let r = reqwest::get(url).await.expect("GET");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn health_readiness_and_metrics_over_http() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    app.add_token("u1", "a", &format!("{p}-ok"), "iOS").await;
    app.add_token("u1", "b", &format!("{p}-dead"), "iOS").await;
    app.fcm().script(&format!("{p}-dead"), Script::Unregistered);
    let (worker, _) = app.start_worker().await;
    let base = format!("http://127.0.0.1:{}", worker.http_addr.port());
    assert_eq!(get(format!("{base}/healthz")).await.0, 200);
    let (status, body) = get(format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let doc = app
        .write(
            "ff_push_notifications",
            vec![
                ("notification_title", s("m")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
            ],
        )
        .await;
    app.finished(&doc).await;
    let (status, metrics) = get(format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for line in [
        "ffpush_notifications_total{status=\"succeeded\"} 1",
        "ffpush_fcm_messages_total{outcome=\"sent\"} 1",
        "ffpush_fcm_messages_total{outcome=\"dead_token\"} 1",
        "ffpush_tokens_removed_total 1",
        "ffpush_documents_waiting{state=\"in_progress\"} 0",
        "ffpush_fcm_request_duration_seconds_count 2",
        "ffpush_ready 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    worker.stop().await;
}

#[tokio::test]
async fn not_ready_when_no_fcm_token_can_be_obtained() {
    // A key registered with another emulator: the shared one refuses its assertions.
    let stranger = FcmEmulator::start(([127, 0, 0, 1], 0).into(), EmulatorOptions::default())
        .await
        .unwrap();
    let app = TestApp::new().await;
    let key = app.settings.credentials.clone().unwrap();
    stranger.write_service_account(&key, &app.project).unwrap();
    let mut text = std::fs::read_to_string(&key).unwrap();
    text = text.replace(&stranger.token_uri(), &app.fcm().token_uri());
    std::fs::write(&key, text).unwrap();
    stranger.shutdown();
    let (worker, _) = app.start_worker().await;
    let (status, body) = get(format!(
        "http://127.0.0.1:{}/readyz",
        worker.http_addr.port()
    ))
    .await;
    assert_eq!(status, 503);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["ready"], false);
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("access token"),
        "{body}"
    );
    // The same answer on /metrics, where the alert on readiness reads it.
    let (_, metrics) = get(format!(
        "http://127.0.0.1:{}/metrics",
        worker.http_addr.port()
    ))
    .await;
    assert!(metrics.lines().any(|l| l == "ffpush_ready 0"), "{metrics}");
    worker.stop().await;
}

fn args(app: &TestApp) -> SettingsArgs {
    let s = &app.settings;
    SettingsArgs {
        project: Some(s.project.clone()),
        firestore_emulator_host: s.firestore_emulator_host.clone(),
        credentials: s.credentials.as_ref().map(|c| c.display().to_string()),
        fcm_endpoint: Some(s.fcm_endpoint.clone()),
        ..Default::default()
    }
}

#[tokio::test]
async fn doctor_passes_a_healthy_setup_and_names_each_mistake() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let mut user = std::collections::HashMap::new();
    user.insert("display_name".to_string(), s("Good"));
    app.store.set("users/good", user.clone()).await.unwrap();
    app.add_token("good", "t", &format!("{p}-good"), "iOS")
        .await;
    let checks = doctor::run(&args(&app), Some("users/good")).await;
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let permission = checks
        .iter()
        .find(|c| c.name == "FCM send permission")
        .expect("the send permission check");
    // The test emulator speaks HTTP/2 with prior knowledge; the operator sees which HTTP.
    assert!(
        permission.to_string().contains("HTTP/2 (h2c)"),
        "{permission}"
    );
    assert!(checks.iter().any(|c| c.name == "tokens valid"));

    // Every mistake of FlutterFlow's troubleshooting page at once.
    user.insert("tokens".to_string(), store::array(vec![s("legacy-token")]));
    app.store.set("users/messy", user).await.unwrap();
    let mut misnamed = std::collections::HashMap::new();
    misnamed.insert("fcm_token".to_string(), s("x"));
    app.store
        .set("users/messy/fcm_token/a", misnamed)
        .await
        .unwrap();
    app.add_token("messy", "empty", "", "iOS").await;
    app.add_token("messy", "shared", &format!("{p}-good"), "iOS")
        .await;
    app.add_token("messy", "dead", &format!("{p}-dead"), "iOS")
        .await;
    app.fcm().script(&format!("{p}-dead"), Script::Unregistered);
    let checks = doctor::run(&args(&app), Some("messy")).await;
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        failed,
        vec![
            "tokens array field",
            "subcollection name",
            "empty tokens",
            "tokens shared",
            "tokens valid"
        ]
    );
    for c in checks.iter().filter(|c| !c.passed) {
        assert!(c.fix.as_ref().is_some_and(|f| !f.is_empty()));
    }

    let checks = doctor::run(&args(&app), Some("users/nobody")).await;
    assert!(
        checks
            .iter()
            .any(|c| c.name == "user document" && !c.passed)
    );
}

#[test]
fn doctor_exit_code_is_zero_only_when_everything_passes() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    let fcm = &crate::shared().fcm;
    fcm.write_service_account(&key, "doctor-cli").unwrap();
    let doctor = |firestore: &str, key: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_ffpush"))
            .args([
                "doctor",
                "--project",
                "doctor-cli",
                "--firestore-emulator-host",
                firestore,
                "--fcm-endpoint",
                &fcm.url(),
            ])
            .arg("--credentials")
            .arg(key)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, stdout) = doctor(&crate::shared().firestore_host, &key);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or_default()
            .ends_with(" 0 failed"),
        "{stdout}"
    );

    let (code, stdout) = doctor("127.0.0.1:1", &key);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("PASS  FCM credentials") && stdout.contains("PASS  FCM send permission"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL  Firestore read/write")
            && stdout.contains("start the Firestore emulator"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or_default()
            .ends_with(" 1 failed"),
        "{stdout}"
    );

    let (code, stdout) = doctor("127.0.0.1:1", std::path::Path::new("/nonexistent.json"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL  settings") && stdout.contains("GOOGLE_APPLICATION_CREDENTIALS"),
        "{stdout}"
    );
}

#[tokio::test]
async fn doctor_runs_every_query_ffpush_needs_and_each_is_served() {
    // The Firestore emulator serves every query without indexes, so here each passes; the
    // missing-index answer of real Firestore is covered by store's unit tests.
    let app = TestApp::new().await;
    let checks = doctor::run(&args(&app), None).await;
    let indexes: Vec<&doctor::Check> = checks
        .iter()
        .filter(|c| c.name.starts_with("index: "))
        .collect();
    let names: Vec<&str> = indexes.iter().map(|c| c.name.as_str()).collect();
    for query in [
        "index: broadcast",
        "index: broadcast by device_type",
        "index: batch slice",
        "index: dead-token lookup",
        "index: sweep (status)",
        "index: sweep (scheduled_time)",
    ] {
        assert!(names.contains(&query), "{query} not in {names:?}");
    }
    for c in indexes {
        assert!(c.passed, "{c}");
    }
}
