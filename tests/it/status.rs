//! `ffpush status` as an operator runs it, against the Firestore emulator with notifications
//! that succeeded, failed, are scheduled, were never picked up, and finished long ago.

use std::io::Read as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chrono::Utc;
use ffpush::store;
use serde_json::Value;

use crate::{TestApp, s};

/// The binary with exactly this project's settings in its environment.
fn status(app: &TestApp, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ffpush"));
    for var in [
        "GOOGLE_APPLICATION_CREDENTIALS",
        "FCM_ENDPOINT",
        "FFPUSH_COLLECTION",
        "FFPUSH_USER_COLLECTION",
    ] {
        c.env_remove(var);
    }
    c.env("GOOGLE_CLOUD_PROJECT", &app.project)
        .env(
            "FIRESTORE_EMULATOR_HOST",
            app.settings.firestore_emulator_host.as_deref().unwrap(),
        )
        .arg("status")
        .args(args);
    c
}

fn run(app: &TestApp, args: &[&str]) -> Output {
    let out = status(app, args).output().expect("running ffpush status");
    assert!(
        out.status.success(),
        "ffpush status {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(app: &TestApp, args: &[&str]) -> Vec<Value> {
    let out = run(app, &[args, &["--json"]].concat());
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    parsed.as_array().expect("a JSON array").clone()
}

fn ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

fn id(path: &str) -> String {
    path.rsplit('/').next().unwrap().to_string()
}

#[tokio::test]
async fn status_lists_the_latest_notifications_of_both_collections() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    app.add_token("u1", "a", &format!("{p}-1"), "iOS").await;

    // Finished two hours ago (written as a worker would have left it).
    let mut old = std::collections::HashMap::new();
    let two_hours_ago = Utc::now() - chrono::Duration::hours(2);
    for (k, v) in [
        ("notification_title", s("old")),
        ("notification_text", s("x")),
        ("user_refs", s("users/u1")),
        ("status", s("succeeded")),
        ("num_sent", store::integer(1)),
        ("num_tokens", store::integer(1)),
        ("num_tokens_removed", store::integer(0)),
        (
            "started_at",
            store::timestamp(two_hours_ago - chrono::Duration::seconds(3)),
        ),
        ("completed_at", store::timestamp(two_hours_ago)),
    ] {
        old.insert(k.to_string(), v);
    }
    // Written as a worker writes it, with one device from another Firebase project.
    let mut counts = std::collections::HashMap::new();
    counts.insert("SENDER_ID_MISMATCH".to_string(), store::integer(1));
    old.insert(
        "error_counts".to_string(),
        ffpush::model::pb::Value {
            value_type: Some(ffpush::model::pb::value::ValueType::MapValue(
                ffpush::model::pb::MapValue { fields: counts },
            )),
        },
    );
    app.store
        .set("ff_push_notifications/old-one", old)
        .await
        .unwrap();

    let (worker, _) = app.start_worker().await;
    let succeeded = app.notify("hello", "users/u1").await;
    let failed = app.notify("to nobody", "users/ghost").await;
    let scheduled = app
        .write(
            "ff_push_notifications",
            vec![
                ("notification_title", s("later")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                (
                    "scheduled_time",
                    store::timestamp(Utc::now() + chrono::Duration::hours(3)),
                ),
            ],
        )
        .await;
    let from_app = app
        .write(
            "ff_user_push_notifications",
            vec![
                ("notification_title", s("from the app")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("timestamp", store::timestamp(Utc::now())),
            ],
        )
        .await;
    for doc in [&succeeded, &failed, &from_app] {
        app.finished(doc).await;
    }
    worker.stop().await;
    // Written while no worker runs: only its `timestamp` makes it findable.
    let waiting = app
        .write(
            "ff_user_push_notifications",
            vec![
                ("notification_title", s("nobody took me")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("timestamp", store::timestamp(Utc::now())),
            ],
        )
        .await;

    let all = json(&app, &[]);
    let by_id = |path: &str| -> Value {
        all.iter()
            .find(|e| e["id"] == id(path))
            .unwrap_or_else(|| panic!("{path} not listed in {all:#?}"))
            .clone()
    };
    assert_eq!(all.len(), 6, "{all:#?}");
    assert_eq!(ids(&all)[0], id(&waiting), "the most recent activity first");
    assert_eq!(ids(&all)[5], "old-one", "the oldest last");

    let ok = by_id(&succeeded);
    assert_eq!(ok["collection"], "ff_push_notifications");
    assert_eq!(ok["status"], "succeeded");
    assert_eq!(
        (ok["sent"].clone(), ok["tokens"].clone()),
        (1.into(), 1.into())
    );
    assert_eq!(ok["removed"], 0);
    assert!(
        ok["took_seconds"].as_f64().is_some_and(|t| t >= 0.0),
        "{ok}"
    );
    assert!(
        ok["created"].as_str().is_some_and(|c| c.starts_with("20")),
        "{ok}"
    );
    assert!(ok["error"].is_null());

    let bad = by_id(&failed);
    assert_eq!(bad["status"], "failed");
    assert!(
        bad["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("no device tokens") && e.contains("users/ghost")),
        "the whole error: {bad}"
    );

    let later = by_id(&scheduled);
    assert_eq!(later["status"], "scheduled");
    assert!(later["scheduled_time"].is_string(), "{later}");
    assert!(later["sent"].is_null() && later["took_seconds"].is_null());

    assert_eq!(by_id(&from_app)["collection"], "ff_user_push_notifications");
    assert_eq!(by_id(&from_app)["status"], "succeeded");
    assert_eq!(by_id(&waiting)["status"], "new");
    assert_eq!(by_id("ff_push_notifications/old-one")["took_seconds"], 3.0);
    assert_eq!(
        by_id("ff_push_notifications/old-one")["errors"],
        serde_json::json!({"SENDER_ID_MISMATCH": 1})
    );
    assert_eq!(ok["errors"], serde_json::json!({}));

    // --failed, --since, --limit.
    assert_eq!(ids(&json(&app, &["--failed"])), [id(&failed)]);
    let recent = ids(&json(&app, &["--since", "1h"]));
    assert_eq!(recent.len(), 5, "{recent:?}");
    assert!(!recent.contains(&"old-one".to_string()));
    assert_eq!(ids(&json(&app, &["--limit", "2"])), ids(&all)[..2].to_vec());
    assert!(json(&app, &["--failed", "--since", "1h"]).len() == 1);

    // The table: a header, then one line per notification.
    let table = String::from_utf8(run(&app, &[]).stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 7, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "COLLECTION",
            "CREATED",
            "(UTC)",
            "STATUS",
            "SENT/TOKENS",
            "REMOVED",
            "TOOK",
            "ERROR",
            "/",
            "NOTE"
        ]
    );
    let line = |path: &str| -> &str {
        lines
            .iter()
            .find(|l| l.starts_with(&id(path)))
            .unwrap_or_else(|| panic!("{path} not in\n{table}"))
    };
    let ok_line: Vec<&str> = line(&succeeded).split_whitespace().collect();
    assert_eq!(ok_line[1], "ff_push_notifications");
    assert_eq!(&ok_line[4..7], ["succeeded", "1/1", "0"]);
    assert!(
        line(&failed).contains(" failed ")
            && line(&failed).contains("no device tokens: none of the 1"),
        "{table}"
    );
    assert!(
        line(&scheduled).contains(" scheduled ") && line(&scheduled).contains("due 20"),
        "{table}"
    );
    assert!(line(&waiting).contains("not picked up yet"), "{table}");
    assert!(
        line("ff_push_notifications/old-one").contains("[SENDER_ID_MISMATCH 1]"),
        "{table}"
    );
    let column: Vec<usize> = lines[1..].iter().map(|l| l.find(" ff_").unwrap()).collect();
    assert!(
        column
            .iter()
            .all(|c| *c == lines[0].find(" COLLECTION").unwrap()),
        "aligned columns\n{table}"
    );
}

#[tokio::test]
async fn status_watch_refreshes_until_stopped_and_bad_options_exit_64() {
    let app = TestApp::new().await;
    app.write(
        "ff_push_notifications",
        vec![
            ("notification_title", s("t")),
            ("notification_text", s("x")),
            ("timestamp", store::timestamp(Utc::now())),
        ],
    )
    .await;
    let mut child = status(&app, &["--watch", "--interval", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ffpush status --watch");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        // Until two screens have been drawn (or the process ends).
        while seen.matches("ffpush status · project").count() < 2 {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !reader.is_finished() {
        assert!(std::time::Instant::now() < deadline, "no second refresh");
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = reader.join().unwrap();
    assert!(seen.contains("\x1b[H\x1b[2J"), "clears the screen like top");
    assert!(
        seen.contains(&app.project) && seen.contains(" new "),
        "{seen}"
    );
    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(
        child.wait().unwrap().success(),
        "Ctrl-C/SIGTERM ends it with 0"
    );

    let empty = String::from_utf8(run(&app, &["--failed"]).stdout).unwrap();
    assert!(empty.ends_with("(no notifications)\n"), "{empty}");
    assert_eq!(json(&app, &["--failed"]), Vec::<Value>::new());

    for bad in [
        &["--limit", "0"][..],
        &["--since", "soon"],
        &["--interval", "0s", "--watch"],
    ] {
        let out = status(&app, bad).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{bad:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(bad[0]), "{bad:?}: {stderr}");
    }
}
