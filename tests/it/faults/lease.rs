//! The lease and the progress written with it, driven through the production `Claim`: a
//! panic while a claim is held, a claim from a copy without its update time, and progress
//! writes while one token stalls among very many.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ffpush::audience::TokenPages;
use ffpush::claim::{Claim, LeaseTerms};
use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator, Script};
use ffpush::fanout::{self, Context, Ledger, RetryPolicy};
use ffpush::fcm::{MessageTemplate, Sender};
use ffpush::language::Messages;
use ffpush::metrics::Metrics;
use ffpush::model::{Audience, Notification};
use ffpush::store::{self, DeviceToken};
use tokio_util::sync::CancellationToken;

use crate::{TestApp, text};

const LEASE: &str = "ffpush_lease_expires_at";

async fn lease_of(app: &TestApp, doc: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let doc = app.store.get(doc).await.unwrap().unwrap();
    store::timestamp_field(&doc, LEASE)
}

#[tokio::test]
async fn a_panic_while_a_claim_is_held_stops_its_lease_renewal() {
    let app = TestApp::new().await;
    let doc = app.notify("panic", "users/nobody").await;
    let read = app.store.get(&doc).await.unwrap().unwrap();
    let terms = LeaseTerms::new(Duration::from_secs(3), Duration::from_millis(100));
    let claim = Claim::take(&app.store, terms, "w1", &read)
        .await
        .unwrap()
        .expect("claimed");
    let renewal = claim.renew(
        Arc::new(Mutex::new(Ledger::default())),
        CancellationToken::new(),
    );
    let first = lease_of(&app, &doc).await;
    // A bug in processing: the task holding the renewal panics.
    let processing = tokio::spawn(async move {
        let _renewal = renewal;
        tokio::time::sleep(Duration::from_millis(350)).await;
        panic!("a bug while processing");
    });
    assert!(processing.await.unwrap_err().is_panic());
    assert_ne!(lease_of(&app, &doc).await, first, "renewed while held");
    // At most a write that was under way when it panicked lands after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_panic = lease_of(&app, &doc).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        lease_of(&app, &doc).await,
        after_panic,
        "the lease is still renewed after the task holding it panicked"
    );
}

#[tokio::test]
async fn a_claim_from_a_copy_without_its_update_time_cannot_take_a_claimed_document() {
    let app = TestApp::new().await;
    let doc = app.notify("claimed", "users/nobody").await;
    let read = app.store.get(&doc).await.unwrap().unwrap();
    let terms = LeaseTerms::new(Duration::from_secs(30), Duration::from_secs(1));
    let first = Claim::take(&app.store, terms, "first", &read)
        .await
        .unwrap();
    assert!(first.is_some(), "the first claim wins");
    let mut stale = read.clone();
    stale.update_time = None;
    let second = Claim::take(&app.store, terms, "second", &stale).await;
    assert!(
        !matches!(second, Ok(Some(_))),
        "a claim without an update-time precondition took a claimed document"
    );
    let now = app.store.get(&doc).await.unwrap().unwrap();
    assert_eq!(text(&now, "ffpush_worker").as_deref(), Some("first"));
}

/// One token stalls (FCM never answers it in time, so it is retried) while `n` others are
/// sent: the progress written with every lease renewal stays small and is accepted.
async fn one_stalled_token_among(n: usize) {
    let fcm = FcmEmulator::start_on_thread(
        ([127, 0, 0, 1], 0).into(),
        EmulatorOptions::default().count_only(),
    )
    .expect("an FCM emulator that keeps counts only");
    let app = TestApp::with(|s| {
        let key = s.credentials.clone().unwrap();
        fcm.write_service_account(&key, &s.project).unwrap();
        s.fcm_endpoint = fcm.url();
        s.fcm_rate = 0;
        s.concurrency = 256;
        s.fcm_timeout = Duration::from_secs(1);
    })
    .await;
    let p = app.project.clone();
    let sender = Sender::new(&app.settings).await.expect("the FCM client");
    let metrics = Metrics::default();
    let ctx = Context {
        sender: &sender,
        store: &app.store,
        metrics: &metrics,
        concurrency: app.settings.concurrency,
        retry: RetryPolicy {
            max_attempts: 100,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            quota_floor: Duration::from_millis(200),
            budget: Duration::from_secs(600),
        },
        gate: None,
    };
    let template: Messages = MessageTemplate::new(&Notification {
        title: "Stalled".into(),
        body: "x".into(),
        image: None,
        sound: None,
        initial_page: None,
        parameter_data: None,
        audience: Audience::Users(vec!["users/big".into()]),
        scheduled_time: None,
        options: Default::default(),
    })
    .expect("a valid message")
    .into();
    let stalled = format!("{p}-000000");
    fcm.script(&stalled, Script::Latency(Duration::from_secs(600)));

    let doc = app.notify("Stalled", "users/big").await;
    let read = app.store.get(&doc).await.unwrap().unwrap();
    let terms = LeaseTerms::new(Duration::from_secs(3), Duration::from_millis(200));
    let claim = Claim::take(&app.store, terms, "w1", &read)
        .await
        .unwrap()
        .expect("claimed");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let renewal = claim.renew(ledger.clone(), stop.clone());

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let pages = TokenPages {
        pages: rx,
        without_tokens: Default::default(),
    };
    let store = app.store.clone();
    let feed = tokio::spawn(async move {
        for first in (0..n).step_by(500) {
            let page: Vec<DeviceToken> = (first..(first + 500).min(n))
                .map(|i| DeviceToken {
                    doc_name: store.doc_name(&format!("users/big/fcm_tokens/{i:06}")),
                    token: format!("{p}-{i:06}"),
                })
                .collect();
            if tx.send(Ok(page.into())).await.is_err() {
                return;
            }
        }
    });
    // Watches what the renewals write, and lets the stalled token through once every other
    // token was sent.
    let watch = {
        let store = app.store.clone();
        let doc = doc.clone();
        let fcm = fcm.clone();
        let stalled = stalled.clone();
        tokio::spawn(async move {
            let mut largest = 0usize;
            let mut released = false;
            loop {
                if let Ok(Some(d)) = store.get(&doc).await
                    && let Some(progress) = d.fields.get("ffpush_progress")
                {
                    largest =
                        largest.max(firestore::gcloud_sdk::prost::Message::encoded_len(progress));
                }
                if !released && fcm.stats().accepted >= n as u64 - 1 {
                    fcm.script(&stalled, Script::Latency(Duration::ZERO));
                    released = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if released && fcm.stats().accepted >= n as u64 {
                    return largest;
                }
            }
        })
    };
    // What the ledger holds in memory, sampled while it sends.
    let done_sending = CancellationToken::new();
    let held = {
        let ledger = ledger.clone();
        let done_sending = done_sending.clone();
        tokio::spawn(async move {
            let mut most = 0;
            while !done_sending.is_cancelled() {
                most = most.max(ledger.lock().unwrap().held());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            most
        })
    };
    let ctx = Context {
        gate: Some(claim.gate()),
        ..ctx
    };
    let started = std::time::Instant::now();
    let result = fanout::fan_out(&ctx, &template, pages, ledger.clone(), stop).await;
    let took = started.elapsed();
    done_sending.cancel();
    feed.await.unwrap();
    let largest = watch.await.unwrap();
    let renewed = renewal.finish().await;
    let held = held.await.unwrap();
    let tally = result.expect("every token sent");
    assert_eq!(tally.sent, n as u64);
    eprintln!(
        "{n} tokens, one stalled, sent in {took:?}: the largest progress written was {largest} bytes; the ledger held at most {held} token names; {} progress writes failed",
        renewed.failed_writes
    );
    assert!(renewed.lost.is_none(), "{renewed:?}");
    assert_eq!(renewed.failed_writes, 0, "every progress write succeeded");
    assert!(
        largest < 64 * 1024,
        "a progress write of {largest} bytes with one token stalled"
    );
    assert!(
        held <= app.settings.concurrency,
        "the ledger held {held} names: memory grows with the stall"
    );
    fcm.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_stalled_among_100_000_keeps_every_progress_write_small() {
    one_stalled_token_among(100_000).await;
}

/// A rolling deploy: an older ffpush saved its progress (a cursor, and every token finished
/// past it listed in `beyond`) and stopped; this version takes the document over and sends
/// exactly the tokens the older one had not finished.
#[tokio::test]
async fn progress_an_older_version_saved_is_resumed_exactly() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let tokens: Vec<String> = (0..10).map(|i| format!("{p}-old-{i}")).collect();
    for (i, token) in tokens.iter().enumerate() {
        app.add_token("big", &format!("t{i:03}"), token, "Android")
            .await;
    }
    let token_doc =
        |i: usize| store::string(&app.store.doc_name(&format!("users/big/fcm_tokens/t{i:03}")));
    let mut progress = std::collections::HashMap::new();
    progress.insert("cursor".to_string(), token_doc(2));
    progress.insert(
        "beyond".to_string(),
        store::array(vec![token_doc(4), token_doc(7)]),
    );
    progress.insert("tokens".to_string(), crate::int(5));
    progress.insert("sent".to_string(), crate::int(5));
    let now = chrono::Utc::now();
    let doc = app
        .write(
            "ff_push_notifications",
            vec![
                ("notification_title", crate::s("Rolling")),
                ("notification_text", crate::s("x")),
                ("user_refs", crate::s("users/big")),
                ("status", crate::s("started")),
                ("started_at", store::timestamp(now)),
                ("ffpush_worker", crate::s("an-older-ffpush")),
                (LEASE, store::timestamp(now - chrono::Duration::seconds(1))),
                (
                    "ffpush_progress",
                    ffpush::model::pb::Value {
                        value_type: Some(ffpush::model::pb::value::ValueType::MapValue(
                            ffpush::model::pb::MapValue { fields: progress },
                        )),
                    },
                ),
            ],
        )
        .await;
    let (worker, _) = app.start_worker().await;
    let done = app.finished(&doc).await;
    crate::assert_succeeded(&done);
    assert_eq!(crate::num(&done, "num_sent"), Some(10));
    assert_eq!(crate::num(&done, "num_tokens"), Some(10));
    let mut sent: Vec<String> = app.delivered().into_iter().map(|(t, _)| t).collect();
    sent.sort();
    let expected: Vec<String> = [3, 5, 6, 8, 9].iter().map(|i| tokens[*i].clone()).collect();
    assert_eq!(
        sent, expected,
        "exactly what the older version had not finished"
    );
    worker.stop().await;
}

/// The error counts a worker that died had saved in its progress are carried by the worker
/// that takes over, and added to: `error_counts` covers every token's final answer.
#[tokio::test]
async fn error_counts_saved_in_the_progress_survive_a_takeover() {
    use ffpush::model::pb;
    let app = TestApp::new().await;
    let p = app.project.clone();
    let tokens: Vec<String> = (0..4).map(|i| format!("{p}-taken-{i}")).collect();
    for (i, token) in tokens.iter().enumerate() {
        app.add_token("big", &format!("t{i:03}"), token, "Android")
            .await;
    }
    app.fcm().script(&tokens[3], Script::SenderIdMismatch);
    let map = |entries: Vec<(&str, pb::Value)>| pb::Value {
        value_type: Some(pb::value::ValueType::MapValue(pb::MapValue {
            fields: entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        })),
    };
    // The dead worker finished the first two: one sent, one refused by APNs.
    let progress = map(vec![
        (
            "cursor",
            store::string(&app.store.doc_name("users/big/fcm_tokens/t001")),
        ),
        ("tokens", crate::int(2)),
        ("sent", crate::int(1)),
        ("third_party_auth", crate::int(1)),
        (
            "error_counts",
            map(vec![("THIRD_PARTY_AUTH_ERROR", crate::int(1))]),
        ),
    ]);
    let now = chrono::Utc::now();
    let doc = app
        .write(
            "ff_push_notifications",
            vec![
                ("notification_title", crate::s("Taken over")),
                ("notification_text", crate::s("x")),
                ("user_refs", crate::s("users/big")),
                ("status", crate::s("started")),
                ("started_at", store::timestamp(now)),
                ("ffpush_worker", crate::s("a-dead-worker")),
                (LEASE, store::timestamp(now - chrono::Duration::seconds(1))),
                ("ffpush_progress", progress),
            ],
        )
        .await;
    let (worker, _) = app.start_worker().await;
    let done = app.finished(&doc).await;
    app.fcm().clear_script(&tokens[3]);
    assert_eq!(crate::num(&done, "num_tokens"), Some(4));
    assert_eq!(crate::num(&done, "num_sent"), Some(2));
    let Some(pb::value::ValueType::MapValue(counts)) = done
        .fields
        .get("error_counts")
        .and_then(|v| v.value_type.as_ref())
    else {
        panic!("no error_counts: {:?}", done.fields)
    };
    let mut counts: Vec<(String, i64)> = counts
        .fields
        .iter()
        .map(|(k, v)| match v.value_type {
            Some(pb::value::ValueType::IntegerValue(n)) => (k.clone(), n),
            _ => (k.clone(), -1),
        })
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("SENDER_ID_MISMATCH".to_string(), 1),
            ("THIRD_PARTY_AUTH_ERROR".to_string(), 1)
        ]
    );
    worker.stop().await;
}
