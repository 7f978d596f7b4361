//! The Cloud Logging JSON log of `ffpush run`: every line about a notification carries its
//! path and id (from the notification's span) and names it as the entry's operation.

use std::process::Command;
use std::time::{Duration, Instant};

use ffpush::dev::fcm_emulator::Script;
use serde_json::{Value, json};

use crate::{TestApp, num, text};

/// Lines that are about a notification by what they say, whatever fields they carry.
const ABOUT_A_NOTIFICATION: [&str; 5] = [
    "claimed",
    "token page read",
    "retrying",
    "dead token: its documents removed",
    "notification finished",
];

#[tokio::test]
async fn every_line_about_a_notification_carries_its_doc_id_and_operation() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let flaky = format!("{p}-flaky");
    let dead = format!("{p}-dead");
    app.add_token("u1", "t1", &flaky, "iOS").await;
    app.add_token("u1", "t2", &dead, "Android").await;
    app.fcm().script(
        &flaky,
        Script::Unavailable {
            times: 1,
            retry_after_secs: None,
        },
    );
    app.fcm().script(&dead, Script::Unregistered);

    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("ffpush.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = app
        .run_command()
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn,ffpush=debug")
        .stderr(log)
        .spawn()
        .expect("starting ffpush run");

    let doc = app.notify("Logged", "users/u1").await;
    let done = app.finished(&doc).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    assert_eq!(num(&done, "num_sent"), Some(1));
    assert_eq!(num(&done, "num_tokens_removed"), Some(1));

    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("waiting for ffpush").is_none() {
        assert!(Instant::now() < deadline, "ffpush run did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let log = std::fs::read_to_string(&log_path).expect("reading the log");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let id = doc.rsplit('/').next().expect("a document id");
    let about: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            let message = l["message"].as_str().unwrap_or_default();
            ABOUT_A_NOTIFICATION.contains(&message) || l.to_string().contains(id)
        })
        .collect();
    for message in ABOUT_A_NOTIFICATION {
        assert!(
            about.iter().any(|l| l["message"] == message),
            "no {message:?} line in:\n{log}"
        );
    }
    for line in &about {
        assert_eq!(line["doc"], doc.as_str(), "{line}");
        assert_eq!(line["notification_id"], id, "{line}");
        assert_eq!(
            line["logging.googleapis.com/operation"],
            json!({"id": id, "producer": "ffpush"}),
            "{line}"
        );
    }
    assert!(
        !log.contains(&flaky) && !log.contains(&dead),
        "registration tokens appear whole in the log"
    );
}
