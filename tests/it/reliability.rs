//! Reliability at the seams: a fan-out that fails mid-way, the sweep in a busy project, and
//! duplicate offers of one document racing each other.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use chrono::Utc;
use ffpush::audience::TokenPages;
use ffpush::dev::fcm_emulator::Script;
use ffpush::fanout::{self, Abort, Context, Ledger, RetryPolicy};
use ffpush::fcm::{MessageTemplate, Sender};
use ffpush::language::Messages;
use ffpush::metrics::Metrics;
use ffpush::model::{Audience, Notification};
use ffpush::store::{self, DeviceToken};
use firestore::gcloud_sdk::tonic;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{TestApp, num, s, text, wait_until};

const CONSOLE: &str = "ff_push_notifications";

/// How often FCM accepted each token of this project.
fn sends_per_token(app: &TestApp) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (token, _) in app.delivered() {
        *counts.entry(token).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn a_page_read_error_waits_for_the_sends_in_flight_so_a_resume_repeats_none() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let sender = Sender::new(&app.settings).await.expect("the FCM client");
    let metrics = Metrics::default();
    let ctx = Context {
        sender: &sender,
        store: &app.store,
        metrics: &metrics,
        concurrency: 4,
        retry: RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            quota_floor: Duration::from_millis(200),
            budget: Duration::from_secs(30),
        },
        gate: None,
    };
    let template: Messages = MessageTemplate::new(&Notification {
        title: "Resumed".into(),
        body: "x".into(),
        image: None,
        sound: None,
        initial_page: None,
        parameter_data: None,
        audience: Audience::Users(vec!["u".into()]),
        scheduled_time: None,
        options: Default::default(),
    })
    .expect("a valid message")
    .into();
    let tokens: Vec<DeviceToken> = (0..4)
        .map(|i| DeviceToken {
            doc_name: app.store.doc_name(&format!("users/u/fcm_tokens/{i}")),
            token: format!("{p}-t{i}"),
        })
        .collect();
    // t0 is answered at once and frees a slot, so the next page is read while t1..t3, answered
    // after 2 s, are still on the wire.
    for t in &tokens[1..] {
        app.fcm()
            .script(&t.token, Script::Latency(Duration::from_secs(2)));
    }

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let pages = TokenPages {
        pages: rx,
        without_tokens: Default::default(),
    };
    let feed = async {
        tx.send(Ok(tokens.clone().into()))
            .await
            .expect("the first page");
        // Every send has reached FCM (which may deliver it) before the next page read fails.
        wait_until(Duration::from_secs(30), || {
            app.fcm().messages(&p).len() == 4
        })
        .await;
        let outage = tonic::Status::unavailable("Firestore went away");
        tx.send(Err(store::Error::from(outage)))
            .await
            .expect("the failing page");
    };
    let stop = CancellationToken::new();
    let (first, ()) = tokio::join!(
        fanout::fan_out(&ctx, &template, pages, ledger.clone(), stop.clone()),
        feed
    );
    assert!(matches!(first, Err(Abort::Store(_))), "{first:?}");
    let progress = ledger.lock().expect("ledger").snapshot();
    assert_eq!(
        progress.tally.sent, 4,
        "the sends in flight finished and are in the progress"
    );

    // The next claim resumes from that progress: FCM gets nothing twice.
    let ledger = Arc::new(Mutex::new(Ledger::resume(&progress)));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Ok(tokens.clone().into())).await.expect("the page");
    drop(tx);
    let pages = TokenPages {
        pages: rx,
        without_tokens: Default::default(),
    };
    let second = fanout::fan_out(&ctx, &template, pages, ledger, stop).await;
    assert!(second.is_ok(), "{second:?}");
    let counts = sends_per_token(&app);
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
}

#[tokio::test]
async fn the_due_query_pages_past_any_number_of_finished_notifications() {
    let app = TestApp::new().await;
    let now = Utc::now();
    // A busy project: over a thousand notifications came due in the last hour and were sent…
    let writes = (0..1100).map(|i| {
        let store = app.store.clone();
        let at = now - chrono::Duration::hours(1) + chrono::Duration::seconds(i);
        async move {
            let fields = [
                ("notification_title", s("Old")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("status", s("succeeded")),
                ("scheduled_time", store::timestamp(at)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            store
                .create(CONSOLE, fields)
                .await
                .expect("a finished notification");
        }
    });
    futures::stream::iter(writes)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    // …and one, due after all of them, was never sent.
    let due = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Due")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                (
                    "scheduled_time",
                    store::timestamp(now - chrono::Duration::seconds(10)),
                ),
            ],
        )
        .await;
    let mut seen = Vec::new();
    let count = app
        .store
        .due_between(CONSOLE, now - chrono::Duration::hours(2), Utc::now(), |d| {
            seen.push(d.name)
        })
        .await
        .expect("the due query");
    assert_eq!(count, 1101);
    assert!(
        seen.iter().any(|name| app.store.relative(name) == due),
        "the due notification was cut off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_offers_of_one_document_start_one_process_and_keep_it_marked() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let token = format!("{p}-slow");
    app.add_token("u1", "t1", &token, "iOS").await;
    let (worker, _) = app.start_worker().await;
    for round in 0..5 {
        app.fcm()
            .script(&token, Script::Latency(Duration::from_millis(1500)));
        // Scheduled for later: the listener only sets a timer for it.
        let title = format!("Race {round}");
        let doc = app
            .write(
                CONSOLE,
                vec![
                    ("notification_title", s(&title)),
                    ("notification_text", s("x")),
                    ("user_refs", s("users/u1")),
                    (
                        "scheduled_time",
                        store::timestamp(Utc::now() + chrono::Duration::hours(1)),
                    ),
                ],
            )
            .await;
        // The same document as several sources deliver it, as if it had come due: offered
        // from several threads at once.
        let mut copy = app
            .store
            .get(&doc)
            .await
            .expect("reading it")
            .expect("it exists");
        copy.fields.remove("scheduled_time");
        let barrier = Arc::new(Barrier::new(8));
        let runtime = tokio::runtime::Handle::current();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (worker, copy, barrier, runtime) = (
                    worker.worker.clone(),
                    copy.clone(),
                    barrier.clone(),
                    runtime.clone(),
                );
                std::thread::spawn(move || {
                    let _runtime = runtime.enter();
                    barrier.wait();
                    worker.offer(copy);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("an offering thread");
        }
        assert_eq!(worker.worker.tasks.len(), 1, "round {round}: one process");
        // Duplicates that lost would be done by now; the winner is still sending. One more
        // offer must still find the document taken.
        tokio::time::sleep(Duration::from_millis(500)).await;
        worker.worker.offer(copy);
        assert_eq!(
            worker.worker.tasks.len(),
            1,
            "round {round}: still marked as processed here"
        );
        let done = app.finished(&doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
        assert_eq!(num(&done, "num_sent"), Some(1));
        wait_until(Duration::from_secs(10), || worker.worker.tasks.is_empty()).await;
    }
    let counts = sends_per_token(&app);
    assert_eq!(counts.get(&token), Some(&5), "one send per notification");
    worker.stop().await;
}
