//! The `ffpush` binary as an operator runs it.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::{TestApp, ffpush, shared, wait_until};

#[test]
fn invalid_settings_exit_64_with_one_line_naming_the_setting() {
    let out = ffpush()
        .args(["run", "--project", "p", "--port", "http"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("PORT") && stderr.contains("whole number"),
        "{stderr}"
    );

    let out = ffpush().args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GOOGLE_CLOUD_PROJECT"));

    let out = ffpush()
        .args(["run", "--project", "p"])
        .env("FFPUSH_CONCURRENCY", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FFPUSH_CONCURRENCY"));
}

#[test]
fn every_invalid_setting_is_named_at_once_one_line_each() {
    let out = ffpush()
        .args(["run", "--project", "p"])
        .env("FFPUSH_CONCURRENCY", "lots")
        .env("FFPUSH_LEASE", "soon")
        .env("LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    for (line, setting) in lines
        .iter()
        .zip(["FFPUSH_CONCURRENCY", "FFPUSH_LEASE", "LOG_FORMAT"])
    {
        assert!(
            line.starts_with("ffpush: ") && line.contains(setting),
            "{setting} in {stderr}"
        );
    }
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_fcm_emulator_command_answers_an_outside_client() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    let _child = Child(
        ffpush()
            .args([
                "fcm-emulator",
                "--port",
                &port.to_string(),
                "--project",
                "outside",
            ])
            .arg("--write-key")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(30), || {
        key.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let url = format!("http://127.0.0.1:{port}/v1/projects/outside/messages:send");
    let http = reqwest::Client::new();

    let r = http
        .post(&url)
        .json(&json!({"message": {"token": "t", "notification": {"title": "x"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED");

    let sa = yup_oauth2::read_service_account_key(&key).await.unwrap();
    let auth = yup_oauth2::ServiceAccountAuthenticator::builder(sa)
        .build()
        .await
        .unwrap();
    let token = auth
        .token(&["https://www.googleapis.com/auth/firebase.messaging"])
        .await
        .unwrap();
    let bearer = format!("Bearer {}", token.token().unwrap());

    let send = |body: serde_json::Value| {
        http.post(&url)
            .header("Authorization", &bearer)
            .json(&body)
            .send()
    };
    let ok = send(json!({"message": {"token": "t", "notification": {"title": "x", "body": "y"}, "data": {"a": "b"}}})).await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let name: serde_json::Value = ok.json().await.unwrap();
    assert!(
        name["name"]
            .as_str()
            .unwrap()
            .starts_with("projects/outside/messages/")
    );

    for bad in [
        json!({"message": {"token": "t", "data": {"n": 12}}}),
        json!({"message": {"token": "t", "topic": "news", "notification": {"title": "x"}}}),
        json!({"message": {"token": "t", "data": {"big": "z".repeat(5000)}}}),
    ] {
        let r = send(bad).await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
        assert_eq!(
            body["error"]["details"][0]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
    }
}

#[tokio::test]
async fn send_writes_a_flutterflow_document_and_wait_prints_the_outcome() {
    let app = TestApp::new().await;
    app.add_token("alice", "t1", &format!("{}-alice", app.project), "Android")
        .await;
    let (worker, _) = app.start_worker().await;
    let project = app.project.clone();
    let host = shared().firestore_host.clone();
    let out = tokio::task::spawn_blocking(move || {
        ffpush()
            .args([
                "send",
                "--title",
                "Hello",
                "--text",
                "From ffpush",
                "--user",
                "users/alice",
                "--page",
                "HomePage",
                "--wait",
            ])
            .env("GOOGLE_CLOUD_PROJECT", project)
            .env("FIRESTORE_EMULATOR_HOST", host)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    assert!(
        lines
            .next()
            .unwrap_or_default()
            .starts_with("ff_push_notifications/")
    );
    let outcome: serde_json::Value =
        serde_json::from_str(lines.next().unwrap_or_default()).unwrap();
    assert_eq!(outcome["status"], "succeeded");
    assert_eq!(outcome["num_sent"], 1);
    let delivered = app.delivered();
    assert_eq!(
        delivered,
        vec![(format!("{}-alice", app.project), "Hello".to_string())]
    );

    // --dry-run: counted and validated, nothing more delivered; `validated` exits 0.
    let project = app.project.clone();
    let host = shared().firestore_host.clone();
    let out = tokio::task::spawn_blocking(move || {
        ffpush()
            .args([
                "send",
                "--title",
                "Check",
                "--text",
                "first",
                "--user",
                "users/alice",
                "--user",
                "users/nobody",
                "--dry-run",
                "--wait",
            ])
            .env("GOOGLE_CLOUD_PROJECT", project)
            .env("FIRESTORE_EMULATOR_HOST", host)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: serde_json::Value =
        serde_json::from_str(stdout.lines().nth(1).unwrap_or_default()).unwrap();
    assert_eq!(outcome["status"], "validated", "{outcome}");
    assert_eq!(outcome["num_tokens"], 1);
    assert_eq!(outcome["num_sent"], 0);
    assert_eq!(outcome["num_users_without_tokens"], 1);
    assert_eq!(app.delivered().len(), 1, "the dry run delivered nothing");
    worker.stop().await;

    let out = ffpush()
        .args([
            "send",
            "--title",
            "x",
            "--text",
            "y",
            "--user",
            "users/a/posts",
        ])
        .env("GOOGLE_CLOUD_PROJECT", "p")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("users/a/posts"));
}

#[tokio::test]
async fn migrate_lists_plans_and_applies() {
    let app = TestApp::new().await;
    let mut user = std::collections::HashMap::new();
    user.insert(
        "tokens".to_string(),
        ffpush::store::array(vec![crate::s("legacy-token-1")]),
    );
    app.store.set("users/old", user).await.unwrap();
    let run = |args: &'static [&'static str]| {
        let project = app.project.clone();
        let host = shared().firestore_host.clone();
        tokio::task::spawn_blocking(move || {
            ffpush()
                .arg("migrate")
                .args(args)
                .env("GOOGLE_CLOUD_PROJECT", project)
                .env("FIRESTORE_EMULATOR_HOST", host)
                .output()
                .unwrap()
        })
    };
    let list = run(&["--list"]).await.unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("001_tokens_array_to_fcm_tokens")
            && listed.contains("002_remove_duplicate_tokens (destructive)"),
        "{listed}"
    );

    let plan = run(&["--dry-run", "--only", "001"]).await.unwrap();
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(
        app.token_docs("old").await.is_empty(),
        "a dry run writes nothing"
    );

    let applied = run(&["--only", "001"]).await.unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert_eq!(
        app.token_docs("old").await,
        vec!["legacy-token-1".to_string()]
    );

    let unknown = run(&["--only", "999"]).await.unwrap();
    assert_eq!(unknown.status.code(), Some(64));
}
