//! A bound on documents in progress per instance (`FFPUSH_MAX_DOCUMENTS`): due documents
//! beyond it wait unclaimed in a queue in due order and are read again when a slot frees.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use ffpush::dev::fcm_emulator::Script;
use ffpush::model::Status;
use ffpush::store;

use crate::{TestApp, s, text, wait_until};

const CONSOLE: &str = "ff_push_notifications";

/// How often FCM accepted each token of this project.
fn sends_per_token(app: &TestApp) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (token, _) in app.delivered() {
        *counts.entry(token).or_insert(0) += 1;
    }
    counts
}

/// A notification for `users/{user}`; returns its path.
async fn notify(
    app: &TestApp,
    title: &str,
    user: &str,
    scheduled: Option<chrono::DateTime<Utc>>,
) -> String {
    let mut fields = vec![
        ("notification_title", s(title)),
        ("notification_text", s("x")),
        ("user_refs", s(&format!("users/{user}"))),
    ];
    if let Some(at) = scheduled {
        fields.push(("scheduled_time", store::timestamp(at)));
    }
    app.write(CONSOLE, fields).await
}

/// Twenty-four documents, each to a token FCM answers after 300 ms, half written before the
/// worker starts (a backlog) and half while it runs, with at most 3 at once: no more than 3
/// are ever claimed (`status: started` in Firestore) or in progress (the gauge), the others
/// wait in the queue, and every one is sent once.
#[tokio::test]
async fn no_more_documents_are_claimed_at_once_than_the_limit_and_all_finish() {
    const N: usize = 24;
    const LIMIT: usize = 3;
    let app = TestApp::with(|s| s.max_documents = LIMIT).await;
    let p = app.project.clone();
    for i in 0..N {
        let token = format!("{p}-u{i}");
        app.add_token(&format!("u{i}"), "t", &token, "iOS").await;
        app.fcm()
            .script(&token, Script::Latency(Duration::from_millis(300)));
    }
    let mut docs = Vec::new();
    for i in 0..N / 2 {
        docs.push(notify(&app, &format!("n{i}"), &format!("u{i}"), None).await);
    }

    // Watches Firestore and the gauges until told to stop.
    let (worker, _) = app.start_worker().await;
    let metrics = worker.worker.metrics.clone();
    let most_claimed = Arc::new(AtomicUsize::new(0));
    let most_in_progress = Arc::new(AtomicUsize::new(0));
    let most_queued = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn({
        let (store, metrics) = (app.store.clone(), metrics.clone());
        let (claimed, in_progress, queued, done) = (
            most_claimed.clone(),
            most_in_progress.clone(),
            most_queued.clone(),
            done.clone(),
        );
        async move {
            while !done.load(Ordering::Relaxed) {
                in_progress.fetch_max(
                    metrics.documents_in_progress.get() as usize,
                    Ordering::Relaxed,
                );
                queued.fetch_max(metrics.documents_queued.get() as usize, Ordering::Relaxed);
                if let Ok(started) = store.with_status(CONSOLE, &[Status::Started]).await {
                    claimed.fetch_max(started.len(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    for i in N / 2..N {
        docs.push(notify(&app, &format!("n{i}"), &format!("u{i}"), None).await);
    }

    for doc in &docs {
        crate::assert_succeeded(&app.finished(doc).await);
    }
    done.store(true, Ordering::Relaxed);
    watch.await.expect("the watcher");

    let claimed = most_claimed.load(Ordering::Relaxed);
    let in_progress = most_in_progress.load(Ordering::Relaxed);
    assert!(
        (1..=LIMIT).contains(&claimed),
        "{claimed} documents claimed at once, limit {LIMIT}"
    );
    assert!(
        in_progress <= LIMIT,
        "{in_progress} documents in progress at once, limit {LIMIT}"
    );
    assert!(
        most_queued.load(Ordering::Relaxed) > 0,
        "documents beyond the limit wait in the queue"
    );
    let counts = sends_per_token(&app);
    assert_eq!(counts.len(), N);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    wait_until(Duration::from_secs(10), || {
        metrics.documents_in_progress.get() == 0 && metrics.documents_queued.get() == 0
    })
    .await;
    worker.stop().await;
}

/// With one document at a time and one in progress, documents that come due meanwhile are
/// sent in due order (`scheduled_time`, else when written), not in the order they were
/// written or offered.
#[tokio::test]
async fn queued_documents_are_sent_in_due_order() {
    let app = TestApp::with(|s| {
        s.max_documents = 1;
        s.fcm_timeout = Duration::from_secs(30);
    })
    .await;
    let p = app.project.clone();
    let blocker = format!("{p}-blocker");
    app.add_token("blocker", "t", &blocker, "iOS").await;
    // Holds the one slot for 20 s: long enough, on any machine, for the others to be written
    // and queued meanwhile.
    app.fcm()
        .script(&blocker, Script::Latency(Duration::from_secs(20)));
    for i in 0..5 {
        app.add_token(&format!("u{i}"), "t", &format!("{p}-u{i}"), "iOS")
            .await;
    }
    let (worker, _) = app.start_worker().await;
    let first = notify(&app, "blocker", "blocker", None).await;
    let claimed = || async {
        let doc = app
            .store
            .get(&first)
            .await
            .expect("reading")
            .expect("exists");
        text(&doc, "status").as_deref() == Some("started")
    };
    while !claimed().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Written last-due first; due 10, 9, 8, 7 and 6 minutes ago.
    let now = Utc::now();
    let mut docs = Vec::new();
    for i in (0..5).rev() {
        let due = now - chrono::Duration::minutes(10 - i as i64);
        docs.push(notify(&app, &format!("d{i}"), &format!("u{i}"), Some(due)).await);
    }
    let metrics = worker.worker.metrics.clone();
    wait_until(Duration::from_secs(18), || {
        metrics.documents_queued.get() == 5
    })
    .await;
    for doc in docs.iter().chain([&first]) {
        crate::assert_succeeded(&app.finished(doc).await);
    }
    let titles: Vec<String> = app.delivered().into_iter().map(|(_, t)| t).collect();
    assert_eq!(titles, ["blocker", "d0", "d1", "d2", "d3", "d4"]);
    worker.stop().await;
}

/// A document that waited in the queue past `FFPUSH_MAX_LATENESS` is failed as expired when
/// its turn comes, not sent late: it is checked again with what it holds then.
#[tokio::test]
async fn a_document_that_waited_past_the_lateness_limit_is_failed_as_expired() {
    let app = TestApp::with(|s| {
        s.max_documents = 1;
        s.max_lateness = Duration::from_secs(60);
        s.fcm_timeout = Duration::from_secs(60);
    })
    .await;
    let p = app.project.clone();
    let blocker = format!("{p}-blocker");
    app.add_token("blocker", "t", &blocker, "iOS").await;
    // Holds the one slot for 15 s.
    app.fcm()
        .script(&blocker, Script::Latency(Duration::from_secs(15)));
    app.add_token("late", "t", &format!("{p}-late"), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let first = notify(&app, "blocker", "blocker", None).await;
    loop {
        let doc = app
            .store
            .get(&first)
            .await
            .expect("reading")
            .expect("exists");
        if text(&doc, "status").as_deref() == Some("started") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Due 50 s ago: within the limit now, past it once the slot frees.
    let late = notify(
        &app,
        "late",
        "late",
        Some(Utc::now() - chrono::Duration::seconds(50)),
    )
    .await;
    let done = app.finished(&late).await;
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    assert!(
        text(&done, "error").is_some_and(|e| e.starts_with("expired")),
        "{:?}",
        text(&done, "error")
    );
    crate::assert_succeeded(&app.finished(&first).await);
    let titles: Vec<String> = app.delivered().into_iter().map(|(_, t)| t).collect();
    assert_eq!(titles, ["blocker"], "the late one is never sent");
    worker.stop().await;
}
