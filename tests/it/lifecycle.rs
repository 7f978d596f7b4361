//! Scheduling, crashes, graceful shutdown and outages: nothing lost, nothing sent twice.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chrono::Utc;
use ffpush::dev::fcm_emulator::Script;
use ffpush::dev::firestore_emulator::FirestoreEmulator;
use ffpush::store;

use crate::{TestApp, assert_succeeded, num, s, text, wait_until};

const CONSOLE: &str = "ff_push_notifications";

/// `ffpush run` as a separate process against the test's project.
struct WorkerProcess(Child);

impl WorkerProcess {
    fn start(app: &TestApp, env: &[(&str, &str)]) -> WorkerProcess {
        let mut cmd = app.run_command();
        for (k, v) in env {
            cmd.env(k, v);
        }
        WorkerProcess(cmd.spawn().expect("starting ffpush run"))
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit; returns how long that took.
    async fn exited_within(&mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.0.try_wait() {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "ffpush run did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 300 tokens for user `big`, each answered after `latency` by the FCM emulator.
async fn big_audience(app: &TestApp, latency: Duration) -> Vec<String> {
    let mut tokens = Vec::new();
    for i in 0..300 {
        let token = format!("{}-big-{i:03}", app.project);
        app.fcm().script(&token, Script::Latency(latency));
        app.add_token("big", &format!("t{i:03}"), &token, "Android")
            .await;
        tokens.push(token);
    }
    tokens
}

fn counts(delivered: &[(String, String)], title: &str) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for (token, t) in delivered {
        if t == title {
            *c.entry(token.clone()).or_insert(0) += 1;
        }
    }
    c
}

#[tokio::test]
async fn rescheduled_and_cancelled_notifications() {
    let app = TestApp::new().await;
    app.add_token("u1", "t", &format!("{}-u1", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let at = |secs: i64| store::timestamp(Utc::now() + chrono::Duration::seconds(secs));
    let later = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("moved")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("scheduled_time", at(2)),
            ],
        )
        .await;
    let deleted = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("deleted")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("scheduled_time", at(2)),
            ],
        )
        .await;
    let cancelled = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("cancelled")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("scheduled_time", at(2)),
            ],
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_time = Utc::now() + chrono::Duration::seconds(5);
    let mut moved = HashMap::new();
    moved.insert("scheduled_time".to_string(), store::timestamp(new_time));
    app.store
        .update_existing(&app.store.doc_name(&later), moved, &[])
        .await
        .unwrap();
    app.store
        .delete(&app.store.doc_name(&deleted))
        .await
        .unwrap();
    let mut cancel = HashMap::new();
    cancel.insert("status".to_string(), s("cancelled"));
    app.store
        .update_existing(&app.store.doc_name(&cancelled), cancel, &[])
        .await
        .unwrap();

    let done = app.finished(&later).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    let sent = app.fcm().messages(&app.project);
    let moved_msg = sent
        .iter()
        .find(|m| m.message["notification"]["title"] == "moved")
        .expect("sent");
    assert!(
        moved_msg.received_at >= new_time,
        "sent at {} before its new time {new_time}",
        moved_msg.received_at
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let titles: Vec<String> = app.delivered().into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        titles,
        vec!["moved".to_string()],
        "deleted and cancelled notifications must not be sent"
    );
    let c = app.store.get(&cancelled).await.unwrap().unwrap();
    assert_eq!(text(&c, "status").as_deref(), Some("cancelled"));
    worker.stop().await;
}

#[tokio::test]
async fn overdue_past_the_lateness_limit_is_failed_as_expired() {
    let app = TestApp::with(|s| s.max_lateness = Duration::from_secs(3600)).await;
    app.add_token("u1", "t", &format!("{}-u1", app.project), "iOS")
        .await;
    let old = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("stale")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                (
                    "scheduled_time",
                    store::timestamp(Utc::now() - chrono::Duration::hours(2)),
                ),
            ],
        )
        .await;
    let (worker, _) = app.start_worker().await;
    let done = app.finished(&old).await;
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    assert!(
        text(&done, "error")
            .unwrap_or_default()
            .starts_with("expired")
    );
    assert!(app.delivered().is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn a_worker_killed_mid_send_is_taken_over_and_resumed_within_the_bound() {
    let concurrency = 8;
    let latency = Duration::from_millis(50);
    let interval = Duration::from_millis(200);
    let app = TestApp::with(|s| {
        s.concurrency = concurrency;
        s.lease = Duration::from_secs(3);
        s.progress_interval = interval;
    })
    .await;
    let tokens = big_audience(&app, latency).await;
    let mut first = WorkerProcess::start(
        &app,
        &[
            ("FFPUSH_CONCURRENCY", "8"),
            ("FFPUSH_LEASE", "3s"),
            ("FFPUSH_PROGRESS_INTERVAL", "200ms"),
        ],
    );
    let doc = app.notify("crash", "users/big").await;
    wait_until(Duration::from_secs(60), || app.delivered().len() >= 100).await;
    first.signal("-KILL");
    first.exited_within(Duration::from_secs(10)).await;
    let before_takeover = app.delivered().len();
    assert!(
        before_takeover < 300,
        "the first worker finished before it was killed"
    );

    let (second, _) = app.start_worker().await;
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_tokens"), Some(300));
    assert_eq!(num(&done, "num_sent"), Some(300));
    let c = counts(&app.delivered(), "crash");
    for token in &tokens {
        assert!(
            c.get(token).copied().unwrap_or(0) >= 1,
            "{token} was never delivered"
        );
    }
    let duplicates: usize = c.values().map(|n| n - 1).sum();
    // The bound in docs/contract.md, "Guarantees": in flight (≤ concurrency) plus what
    // finished since the last progress write — at most concurrency/latency per second over one interval plus the write itself
    // (allowed 250 ms here).
    let rate = concurrency as f64 / latency.as_secs_f64();
    let bound = concurrency + (rate * (interval.as_secs_f64() + 0.25)).ceil() as usize;
    eprintln!("killed after {before_takeover} deliveries; {duplicates} duplicates (bound {bound})");
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, bound {bound}"
    );
    second.stop().await;
}

#[tokio::test]
async fn sigterm_mid_send_drains_within_the_grace_and_a_restart_finishes_without_duplicates() {
    let app = TestApp::with(|s| s.concurrency = 8).await;
    let tokens = big_audience(&app, Duration::from_millis(50)).await;
    let mut first = WorkerProcess::start(
        &app,
        &[("FFPUSH_CONCURRENCY", "8"), ("FFPUSH_SHUTDOWN_GRACE", "5s")],
    );
    let doc = app.notify("term", "users/big").await;
    wait_until(Duration::from_secs(60), || app.delivered().len() >= 60).await;
    first.signal("-TERM");
    let took = first.exited_within(Duration::from_secs(6)).await;
    eprintln!("exited {took:?} after SIGTERM");
    let interrupted = app.store.get(&doc).await.unwrap().unwrap();
    assert_eq!(text(&interrupted, "status").as_deref(), Some("started"));
    assert!(
        store::timestamp_field(&interrupted, "ffpush_lease_expires_at")
            .is_some_and(|t| t <= Utc::now()),
        "the lease is released on a graceful stop"
    );

    let (second, _) = app.start_worker().await;
    let done = app.finished(&doc).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    assert_eq!(num(&done, "num_sent"), Some(300));
    let c = counts(&app.delivered(), "term");
    assert_eq!(c.len(), tokens.len(), "every token delivered");
    let twice: Vec<_> = c.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "sent twice after a graceful stop: {twice:?}"
    );
    second.stop().await;
}

#[tokio::test]
async fn work_continues_after_the_firestore_emulator_restarts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let emulator = tokio::task::spawn_blocking(move || FirestoreEmulator::start(Some(port)))
        .await
        .unwrap()
        .unwrap();
    let host = emulator.host_port().to_string();
    let app = TestApp::with(|s| s.firestore_emulator_host = Some(host.clone())).await;
    app.add_token("u1", "t", &format!("{}-u1", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let first = app.notify("before", "users/u1").await;
    app.finished(&first).await;

    tokio::task::spawn_blocking(move || drop(emulator))
        .await
        .unwrap();
    let _restarted = tokio::task::spawn_blocking(move || FirestoreEmulator::start(Some(port)))
        .await
        .unwrap()
        .unwrap();
    // The emulator keeps nothing across restarts: the app writes its data again.
    app.add_token("u1", "t", &format!("{}-u1", app.project), "iOS")
        .await;
    let second = app.notify("after", "users/u1").await;
    let done = app.finished(&second).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    assert_eq!(counts(&app.delivered(), "after").len(), 1);
    assert!(worker.worker.metrics.listener_reconnects.get() >= 1);
    worker.stop().await;
}

#[tokio::test]
async fn the_worker_waits_for_firestore_at_start_and_then_works() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("127.0.0.1:{port}");
    let shared = crate::shared();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    let project = format!("it-wait-{:08x}", rand::random::<u32>());
    shared.fcm.write_service_account(&key, &project).unwrap();
    let settings = ffpush::config::Settings::for_emulators(&project, &host, &shared.fcm.url(), key)
        .expect("emulator settings");
    // Nothing listens on the port yet: start-up must wait, not fail.
    let starting = tokio::spawn(ffpush::daemon::start(
        settings.clone(),
        tokio_util::sync::CancellationToken::new(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !starting.is_finished(),
        "start-up gave up while Firestore was down"
    );
    let _emulator = tokio::task::spawn_blocking(move || FirestoreEmulator::start(Some(port)))
        .await
        .unwrap()
        .unwrap();
    let daemon = tokio::time::timeout(Duration::from_secs(60), starting)
        .await
        .expect("start-up finished")
        .unwrap()
        .unwrap();
    wait_until(Duration::from_secs(30), || daemon.listen.all_up()).await;
    let store = ffpush::store::Store::connect(&settings).await.unwrap();
    let mut token = HashMap::new();
    token.insert("fcm_token".to_string(), s(&format!("{project}-u1")));
    store.set("users/u1/fcm_tokens/t", token).await.unwrap();
    let mut fields = HashMap::new();
    fields.insert("notification_title".to_string(), s("late start"));
    fields.insert("notification_text".to_string(), s("x"));
    fields.insert("user_refs".to_string(), s("users/u1"));
    let name = store.create(CONSOLE, fields).await.unwrap();
    wait_until(Duration::from_secs(30), || {
        !shared.fcm.messages(&project).is_empty()
    })
    .await;
    let relative = store.relative(&name).to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc = store.get(&relative).await.unwrap().unwrap();
        if text(&doc, "status").as_deref() == Some("succeeded") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not finished: {:?}",
            text(&doc, "status")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
}
