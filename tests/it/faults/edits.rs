//! Documents edited or deleted while they are offered, claimed or sent.

use std::collections::HashMap;
use std::time::Duration;

use ffpush::daemon::{self, Daemon};
use ffpush::model::pb;
use ffpush::store::{self, prost_types_timestamp::Timestamp};

use tokio_util::sync::CancellationToken;

use crate::{TestApp, s, text, wait_until};

const CONSOLE: &str = "ff_push_notifications";

/// Writes `n` console notifications in one commit, as app code writes one with `add()`:
/// `fields(i)` gives the title and the user of the `i`-th. Returns each one's full name and
/// the update time of this first version.
async fn create_all(
    app: &TestApp,
    n: usize,
    fields: impl Fn(usize) -> (String, String),
) -> Vec<(String, Timestamp)> {
    let writes = (0..n)
        .map(|i| {
            let (title, user) = fields(i);
            let fields = [
                ("notification_title", s(&title)),
                ("notification_text", s("x")),
                ("user_refs", s(&format!("users/{user}"))),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let id = format!("{:016x}", rand::random::<u64>());
            pb::Write {
                operation: Some(pb::write::Operation::Update(pb::Document {
                    name: app.store.doc_name(&format!("{CONSOLE}/{id}")),
                    fields,
                    ..Default::default()
                })),
                current_document: Some(pb::Precondition {
                    condition_type: Some(pb::precondition::ConditionType::Exists(false)),
                }),
                ..Default::default()
            }
        })
        .collect::<Vec<_>>();
    let names: Vec<String> = writes
        .iter()
        .filter_map(|w| match &w.operation {
            Some(pb::write::Operation::Update(d)) => Some(d.name.clone()),
            _ => None,
        })
        .collect();
    let request = pb::CommitRequest {
        database: app.store.database_path().to_string(),
        writes,
        ..Default::default()
    };
    let committed = app
        .store
        .client()
        .commit(request)
        .await
        .expect("writing the notifications")
        .into_inner();
    names
        .into_iter()
        .zip(committed.write_results)
        .map(|(name, result)| (name, result.update_time.expect("an update time")))
        .collect()
}

/// A TCP proxy in front of the Firestore emulator that delays every byte by `lag` each way:
/// a worker as far from Firestore as a Cloud Run instance can be, while the test (the app)
/// writes directly. Returns the `host:port` to give the worker.
async fn laggy_firestore(lag: Duration) -> String {
    let upstream = crate::shared().firestore_host.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the proxy");
    let addr = listener.local_addr().expect("the proxy's address");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(delayed_copy(client_read, server_write, lag));
                tokio::spawn(delayed_copy(server_read, client_write, lag));
            });
        }
    });
    addr.to_string()
}

/// Copies `from` to `to`, each chunk written `lag` after it was read, in order.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    lag: Duration,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((tokio::time::Instant::now() + lag, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Starts an in-process `ffpush run` for `app` that reaches Firestore through
/// [`laggy_firestore`]; the test's own reads and writes go direct.
async fn start_far_worker(app: &TestApp) -> Daemon {
    let mut settings = app.settings.clone();
    settings.firestore_emulator_host = Some(laggy_firestore(Duration::from_millis(LAG_MS)).await);
    let daemon = daemon::start(settings, CancellationToken::new())
        .await
        .expect("starting the worker");
    wait_until(Duration::from_secs(30), || daemon.listen.all_up()).await;
    daemon
}

/// One-way delay between the worker and Firestore in these tests.
const LAG_MS: u64 = 50;

/// How often FCM accepted each token of this project, and the titles it carried.
fn sent_per_token(app: &TestApp) -> HashMap<String, Vec<String>> {
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for (token, title) in app.delivered() {
        sent.entry(token).or_default().push(title);
    }
    sent
}

/// Waits (a generous while) until `name` has a final status; panics if it never gets one.
async fn finished(app: &TestApp, name: &str, what: &str) -> pb::Document {
    let relative = app.store.relative(name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let doc = app
            .store
            .get(relative)
            .await
            .expect("reading a notification")
            .expect("the notification exists");
        if ffpush::model::Status::of(&doc).is_finished() {
            return doc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{relative} ({what}) never got a final status: {:?}",
            text(&doc, "status")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// App code often writes a notification and updates it a moment later (`set`, then `update`
/// of the title). The update races the worker's claim: when it lands between the worker's
/// read of the first version and its claim, the claim's precondition fails. That must not be
/// the end of it: the document is read again and sent once, with what it holds when claimed.
///
/// The worker is 50 ms from Firestore and the app next to it, so the update usually lands
/// first. It is conditioned on the first version, so the test knows which came first: when it
/// succeeds, no claim preceded it (a claim is a write) and the message must carry the new
/// title; when it fails, the claim came first and the first title is what must be sent. (An
/// edit that lands while the document is being sent is another test's fault.)
///
/// One document at a time, each waited for: the Firestore emulator's listen stream resends
/// the whole collection on every write, so the next document's write would offer a lost
/// version again as a side effect (production Firestore sends only what changed).
#[tokio::test]
async fn a_document_edited_right_after_it_was_written_is_sent_once_with_what_it_held_when_claimed()
{
    const N: usize = 8;
    let app = TestApp::new().await;
    let p = app.project.clone();
    for i in 0..N {
        app.add_token(&format!("u{i}"), "t", &format!("{p}-u{i}"), "iOS")
            .await;
    }
    let worker = start_far_worker(&app).await;

    let mut edited_first = 0;
    for i in 0..N {
        let created = create_all(&app, 1, |_| (format!("first {i}"), format!("u{i}"))).await;
        let (name, first) = &created[0];
        let mut edit = HashMap::new();
        edit.insert("notification_title".to_string(), s(&format!("edited {i}")));
        let title = match app.store.update_fields(name, edit, &[], *first).await {
            Ok(_) => {
                edited_first += 1;
                format!("edited {i}")
            }
            Err(store::Error::Conflict) => format!("first {i}"),
            Err(e) => panic!("updating {name}: {e:?}"),
        };
        let what = format!("document {} of {N}, titled {title:?} when claimed", i + 1);
        crate::assert_succeeded(&finished(&app, name, &what).await);
        assert_eq!(
            sent_per_token(&app).get(&format!("{p}-u{i}")),
            Some(&vec![title.clone()]),
            "{what}: one message, with that title"
        );
    }
    assert!(
        edited_first > 0,
        "no update landed before its claim: the race was not run"
    );
    worker.stop().await;
}

/// Documents deleted right after they were written, by a worker next to Firestore (its claim
/// usually lands first: it sends, then meets a deleted document) and by one 50 ms away (the
/// deletion lands first). Each is sent at most once, nothing writes it back into existence
/// (every write is conditioned), and the worker is left with nothing in progress and sends
/// what comes next.
#[tokio::test]
async fn a_document_deleted_right_after_it_was_written_ends_consistently() {
    tokio::join!(
        deleted_right_after_written(false),
        deleted_right_after_written(true)
    );
}

async fn deleted_right_after_written(far: bool) {
    const N: usize = 20;
    let app = TestApp::new().await;
    let p = app.project.clone();
    for i in 0..N {
        app.add_token(&format!("u{i}"), "t", &format!("{p}-u{i}"), "iOS")
            .await;
    }
    let worker = if far {
        start_far_worker(&app).await
    } else {
        app.start_worker().await.0
    };

    let created = create_all(&app, N, |i| (format!("gone {i}"), format!("u{i}"))).await;
    let store = &app.store;
    let deletes = created.iter().map(|(name, _)| async move {
        // As the SDKs do, a write the emulator aborts (lock contention) is tried again.
        let mut tries = 0;
        while let Err(e) = store.delete(name).await {
            tries += 1;
            assert!(tries < 5 && e.is_transient(), "deleting {name}: {e:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        name.clone()
    });
    let names: Vec<String> = futures::future::join_all(deletes).await;

    // Whatever was under way ends.
    let metrics = worker.worker.metrics.clone();
    wait_until(Duration::from_secs(30), || {
        metrics.documents_in_progress.get() == 0
    })
    .await;
    // Two sweeps: anything left for a later look has had it.
    tokio::time::sleep(app.settings.sweep_interval * 2).await;
    for name in &names {
        let doc = app
            .store
            .get(app.store.relative(name))
            .await
            .expect("reading");
        assert!(
            doc.is_none(),
            "{} was written back after its deletion: {:?}",
            app.store.relative(name),
            doc.map(|d| d.fields.keys().cloned().collect::<Vec<_>>())
        );
    }
    let sent = sent_per_token(&app);
    assert!(
        sent.values().all(|titles| titles.len() == 1),
        "a deleted notification sent twice: {sent:?}"
    );

    // Still working.
    app.add_token("next", "t", &format!("{p}-next"), "iOS")
        .await;
    let next = app.notify("next", "users/next").await;
    crate::assert_succeeded(&app.finished(&next).await);
    assert_eq!(
        sent_per_token(&app).get(&format!("{p}-next")),
        Some(&vec!["next".to_string()])
    );
    assert_eq!(metrics.documents_in_progress.get(), 0);
    worker.stop().await;
}

mod mid_send {
    //! Edited or deleted while being sent: the lease keeper's next write meets a precondition
    //! failure that is not a takeover.

    use std::collections::HashMap;
    use std::time::Duration;

    use ffpush::config::Settings;

    use crate::{TestApp, assert_succeeded, num, s, text, wait_until};

    const RATE: u32 = 40;
    const CONCURRENCY: usize = 8;
    const INTERVAL: Duration = Duration::from_millis(200);

    fn tune(s: &mut Settings) {
        s.concurrency = CONCURRENCY;
        s.fcm_rate = RATE;
        s.lease = Duration::from_secs(3);
        s.progress_interval = INTERVAL;
    }

    fn per_token(app: &TestApp) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (token, _) in app.delivered() {
            *counts.entry(token).or_insert(0) += 1;
        }
        counts
    }

    /// An app or console write to the document while it is sent (another field, or the
    /// title): the lease is still ours, so the send goes on and nothing is sent twice.
    #[tokio::test]
    async fn a_document_edited_while_it_is_sent_is_finished_by_its_worker_without_duplicates() {
        let app = TestApp::with(tune).await;
        let tokens = crate::faults::big_audience(&app, 120).await;
        let (worker, _) = app.start_worker().await;
        let doc = app.notify("edited", "users/big").await;
        let name = app.store.doc_name(&doc);
        for (at, field, value) in [
            (30, "note", "edited by the app"),
            (60, "notification_title", "edited title"),
        ] {
            wait_until(Duration::from_secs(60), || app.delivered().len() >= at).await;
            let mut f = HashMap::new();
            f.insert(field.to_string(), s(value));
            app.store
                .update_existing(&name, f, &[])
                .await
                .expect("the app's edit");
        }
        let done = app.finished(&doc).await;
        assert_succeeded(&done);
        assert_eq!(num(&done, "num_sent"), Some(120));
        assert_eq!(
            text(&done, "ffpush_worker"),
            Some(app.settings.worker_id.clone()),
            "finished by the worker that claimed it"
        );
        let counts = per_token(&app);
        assert_eq!(counts.len(), tokens.len(), "every token got it");
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "sent twice: {twice:?}");
        worker.stop().await;
    }

    /// Deleted while sent: sending stops at the next lease write, nothing is written back
    /// (the document is not recreated), and the worker goes on with other work.
    #[tokio::test]
    async fn a_document_deleted_while_it_is_sent_stops_the_send_and_is_not_recreated() {
        let app = TestApp::with(tune).await;
        crate::faults::big_audience(&app, 120).await;
        let (worker, _) = app.start_worker().await;
        let doc = app.notify("deleted", "users/big").await;
        wait_until(Duration::from_secs(60), || app.delivered().len() >= 30).await;
        app.store
            .delete(&app.store.doc_name(&doc))
            .await
            .expect("deleting it");
        let at_delete = app.delivered().len();
        wait_until(Duration::from_secs(30), || worker.worker.tasks.is_empty()).await;
        let after = app.delivered().len() - at_delete;
        // In flight, plus the paced rate until the next lease write finds it gone.
        let bound =
            CONCURRENCY + (f64::from(RATE) * (2.0 * INTERVAL.as_secs_f64() + 0.05)).ceil() as usize;
        eprintln!("deleted mid-send: {after} sends after the delete (bound {bound})");
        assert!(
            after <= bound,
            "{after} sends after the delete (bound {bound})"
        );
        assert!(app.delivered().len() < 120, "the send was stopped");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            app.store.get(&doc).await.unwrap().is_none(),
            "the deleted document must not be recreated"
        );

        app.add_token("solo", "t", &format!("{}-solo", app.project), "iOS")
            .await;
        let next = app.notify("next", "users/solo").await;
        assert_succeeded(&app.finished(&next).await);
        worker.stop().await;
    }
}
