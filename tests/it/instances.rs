//! Several instances of one project: they find each other through their heartbeats in
//! `ffpush_instances`, share `FFPUSH_FCM_RATE`, and rebalance as one joins, leaves or crashes;
//! three of them send a broadcast in FlutterFlow's batch documents against an FCM emulator that
//! enforces a project quota, without one 429.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use ffpush::daemon::{self, Daemon};
use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator};
use ffpush::dev::firestore_emulator::FirestoreEmulator;
use ffpush::instances;
use ffpush::model::pb;
use ffpush::store;
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use crate::{TestApp, assert_succeeded, int, num, s, text, wait_until};

/// Renewals in these tests: a lifetime of 2.5 s.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// `ffpush run` in this process as the instance `worker`.
async fn start(app: &TestApp, worker: &str) -> Daemon {
    let mut settings = app.settings.clone();
    settings.worker_id = worker.to_string();
    let daemon = daemon::start(settings, CancellationToken::new())
        .await
        .expect("starting an instance");
    wait_until(Duration::from_secs(30), || daemon.listen.all_up()).await;
    daemon
}

/// The live instances' shares by worker id, as Firestore holds them.
async fn shares(app: &TestApp) -> BTreeMap<String, u64> {
    let (heartbeats, now) = instances::read(&app.store)
        .await
        .expect("reading the heartbeats");
    heartbeats
        .into_iter()
        .filter(|h| h.alive_at(&now))
        .map(|h| (h.worker, h.share as u64))
        .collect()
}

/// Heartbeat documents, live or not.
async fn heartbeats(app: &TestApp) -> Vec<String> {
    let (heartbeats, _) = instances::read(&app.store)
        .await
        .expect("reading the heartbeats");
    heartbeats.into_iter().map(|h| h.worker).collect()
}

/// Waits until the shares are what `expected` says of them (`limit` is generous: the shares
/// follow within a few renewals on any machine), and returns how long that took.
async fn shares_become(
    app: &TestApp,
    limit: Duration,
    expected: impl Fn(&BTreeMap<String, u64>) -> bool,
) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        let now = shares(app).await;
        if expected(&now) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "shares not as expected after {limit:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A value of an instance's `/metrics`.
async fn metric(daemon: &Daemon, series: &str) -> f64 {
    let body = reqwest::get(format!("http://{}/metrics", daemon.http_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics"))
}

/// `ffpush run` as a child process: killed (SIGKILL, no graceful stop) when dropped.
struct Crashable(std::process::Child);

impl Drop for Crashable {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_the_rate_and_rebalance_as_one_joins_leaves_or_crashes() {
    const RATE: u64 = 900;
    let app = TestApp::with(|s| {
        s.fcm_rate = RATE as u32;
        s.heartbeat_interval = HEARTBEAT;
    })
    .await;
    let limit = Duration::from_secs(30);

    let a = start(&app, "a").await;
    // Alone from its first heartbeat on.
    assert_eq!(shares(&app).await, BTreeMap::from([("a".into(), RATE)]));
    assert_eq!(metric(&a, "ffpush_fcm_rate_share").await, RATE as f64);

    let b = start(&app, "b").await;
    let took = shares_become(&app, limit, |s| {
        s.len() == 2 && s.values().all(|&v| v == RATE / 2)
    })
    .await;
    eprintln!("b joined: halves after {took:?}");

    // A third instance in its own process, which will crash.
    let mut cmd = app.run_command();
    cmd.env("FFPUSH_FCM_RATE", RATE.to_string())
        .env("FFPUSH_HEARTBEAT_INTERVAL", "500ms");
    let c = Crashable(cmd.spawn().expect("starting ffpush run"));
    let took = shares_become(&app, limit, |s| {
        s.len() == 3 && s.values().all(|&v| v == RATE / 3)
    })
    .await;
    eprintln!("c joined: thirds after {took:?}");
    let c_worker = shares(&app)
        .await
        .into_keys()
        .find(|w| w != "a" && w != "b")
        .expect("the third instance");
    assert_eq!(metric(&a, "ffpush_instances").await, 3.0);
    assert_eq!(metric(&b, "ffpush_fcm_rate_share").await, (RATE / 3) as f64);

    // Crashed: its heartbeat expires (2.5 s after its last renewal) and its share returns.
    drop(c);
    let took = shares_become(&app, limit, |s| {
        *s == BTreeMap::from([("a".into(), RATE / 2), ("b".into(), RATE / 2)])
    })
    .await;
    eprintln!("c crashed: halves again after {took:?}");
    // The first instance to see it expired deleted it.
    let deadline = tokio::time::Instant::now() + limit;
    while heartbeats(&app).await.contains(&c_worker) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the crashed instance's heartbeat is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A graceful stop deletes the heartbeat before it returns.
    b.stop().await;
    assert!(!heartbeats(&app).await.contains(&"b".to_string()));
    let took = shares_become(&app, limit, |s| *s == BTreeMap::from([("a".into(), RATE)])).await;
    eprintln!("b stopped: whole rate after {took:?}");
    assert_eq!(metric(&a, "ffpush_instances").await, 1.0);
    let deadline = tokio::time::Instant::now() + limit;
    while metric(&a, "ffpush_fcm_rate_share").await != RATE as f64 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    assert!(heartbeats(&app).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_firestore_instances_keep_their_shares_then_hold_their_sends() {
    const RATE: u64 = 900;
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
    let app = TestApp::with(|s| {
        s.firestore_emulator_host = Some(host.clone());
        s.fcm_rate = RATE as u32;
        s.heartbeat_interval = HEARTBEAT;
    })
    .await;
    let a = start(&app, "a").await;
    let b = start(&app, "b").await;
    let limit = Duration::from_secs(60);
    shares_become(&app, limit, |s| {
        s.len() == 2 && s.values().all(|&v| v == RATE / 2)
    })
    .await;
    let both = |series: &'static str| {
        let (a, b) = (&a, &b);
        async move { [metric(a, series).await, metric(b, series).await] }
    };
    assert_eq!(both("ffpush_fcm_rate_share").await, [450.0; 2]);

    // Firestore gone: neither may take the other's half (neither can tell whether the other
    // is still there); once their own heartbeats have expired for the others, both hold.
    tokio::task::spawn_blocking(move || drop(emulator))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let shares = both("ffpush_fcm_rate_share").await;
        assert!(shares.iter().all(|&s| s <= 450.0), "{shares:?}");
        if shares == [0.0; 2] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{shares:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back (empty, as the emulator keeps nothing): each publishes its heartbeat again, and
    // the halves return.
    let _restarted = tokio::task::spawn_blocking(move || FirestoreEmulator::start(Some(port)))
        .await
        .unwrap()
        .unwrap();
    let deadline = tokio::time::Instant::now() + limit;
    while both("ffpush_fcm_rate_share").await != [450.0; 2] {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    b.stop().await;
}

/// FlutterFlow's user ids are Firestore auto-ids: spread over the alphabet its batch bounds cut.
fn user_id(i: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let prefix = i % (62 * 62);
    format!(
        "{}{}{i:06}",
        ALPHABET[prefix / 62] as char,
        ALPHABET[prefix % 62] as char
    )
}

/// One token document per user, `users/{id}/fcm_tokens/t0`, 500 per BatchWrite.
async fn seed_tokens(app: &TestApp, n: usize) {
    let documents = app.store.documents_path().to_string();
    let database = app.store.database_path().to_string();
    let p = &app.project;
    let requests: Vec<pb::BatchWriteRequest> = (0..n)
        .step_by(500)
        .map(|start| pb::BatchWriteRequest {
            database: database.clone(),
            writes: (start..(start + 500).min(n))
                .map(|i| {
                    let fields = HashMap::from([
                        ("fcm_token".to_string(), s(&format!("{p}-{i}"))),
                        ("device_type".to_string(), s("Android")),
                        (
                            "created_at".to_string(),
                            store::timestamp(chrono::Utc::now()),
                        ),
                    ]);
                    pb::Write {
                        operation: Some(pb::write::Operation::Update(pb::Document {
                            name: format!("{documents}/users/{}/fcm_tokens/t0", user_id(i)),
                            fields,
                            ..Default::default()
                        })),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    futures::stream::iter(requests)
        .map(|request| {
            let mut client = app.store.client();
            async move {
                let response = client.batch_write(request).await?.into_inner();
                assert!(response.status.iter().all(|s| s.code == 0));
                Ok::<_, firestore::gcloud_sdk::tonic::Status>(())
            }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
        .expect("seeding tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_send_a_batched_broadcast_within_one_quota_without_a_429() {
    // The project's quota, in windows of 10 s instead of FCM's minute: 3 000 (300/s).
    const QUOTA: u64 = 3_000;
    const WINDOW: Duration = Duration::from_secs(10);
    // What the default leaves under FCM's quota: 95 % (9 500 of 10 000/s).
    const RATE: u32 = 285;
    const TOKENS: usize = 6_000;
    const BATCHES: i64 = 12;

    let emulator = FcmEmulator::start_on_thread(
        ([127, 0, 0, 1], 0).into(),
        EmulatorOptions::default().quota(QUOTA, WINDOW),
    )
    .expect("start the emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.json");
    let app = TestApp::with(|s| {
        s.fcm_endpoint = emulator.url();
        s.credentials = Some(key.clone());
        s.fcm_rate = RATE;
        s.heartbeat_interval = HEARTBEAT;
        // The emulator counts a send against the quota when it handles it, and on a loaded
        // machine its thread may fall behind and then handle a backlog at once. FCM answers
        // in tens of milliseconds, so the default 1 000 in flight would never be used; 50
        // keeps such a backlog under the 5 % of headroom.
        s.concurrency = 50;
        // Twelve batch documents over three instances: at most four each at once, so the
        // first to see them cannot take them all and every instance sends some.
        s.max_documents = 4;
    })
    .await;
    let p = app.project.clone();
    emulator
        .write_service_account(&key, &p)
        .expect("service account");
    seed_tokens(&app, TOKENS).await;

    let workers = ["one", "two", "three"];
    let mut daemons = Vec::new();
    for worker in workers {
        daemons.push(start(&app, worker).await);
    }
    shares_become(&app, Duration::from_secs(30), |s| {
        s.len() == 3 && s.values().all(|&v| v == u64::from(RATE) / 3)
    })
    .await;

    let mut docs = Vec::new();
    for i in 0..BATCHES {
        docs.push(
            app.write(
                "ff_push_notifications",
                vec![
                    ("notification_title", s("Everyone")),
                    ("notification_text", s("x")),
                    ("target_audience", s("All")),
                    ("batch_index", int(i)),
                    ("num_batches", int(BATCHES)),
                ],
            )
            .await,
        );
    }
    let mut sent = 0;
    let mut claimed_by: BTreeMap<String, usize> = BTreeMap::new();
    for doc in &docs {
        let done = app.finished(doc).await;
        assert_succeeded(&done);
        assert_eq!(num(&done, "num_failed"), Some(0));
        sent += num(&done, "num_sent").unwrap_or_default();
        *claimed_by
            .entry(text(&done, "ffpush_worker").unwrap_or_default())
            .or_default() += 1;
    }
    for daemon in &daemons {
        assert_eq!(metric(daemon, "ffpush_fcm_quota_pauses_total").await, 0.0);
    }
    for daemon in daemons {
        daemon.stop().await;
    }

    // Every message delivered, once.
    assert_eq!(sent, TOKENS as i64);
    let delivered = emulator.messages(&p);
    let tokens: HashSet<&str> = delivered
        .iter()
        .filter_map(|m| m.token.as_deref())
        .collect();
    assert_eq!(delivered.len(), TOKENS);
    assert_eq!(tokens.len(), TOKENS, "a token was sent twice");

    // Not one 429, and the windows the broadcast filled whole got at least 90 % of the quota.
    let windows = emulator.quota_windows(&p);
    let refused: u64 = windows.iter().map(|w| w.refused).sum();
    assert_eq!(refused, 0, "FCM refused sends: {windows:?}");
    let first = delivered
        .iter()
        .map(|m| m.received_at)
        .min()
        .expect("sends");
    let last = delivered
        .iter()
        .map(|m| m.received_at)
        .max()
        .expect("sends");
    let secs = (last - first).num_milliseconds() as f64 / 1000.0;
    let per_window = TOKENS as f64 / secs * WINDOW.as_secs_f64();
    eprintln!(
        "{TOKENS} messages in {secs:.2} s: {per_window:.0} per window of {QUOTA} ({:.1} %); windows {windows:?}; documents by instance {claimed_by:?}",
        per_window * 100.0 / QUOTA as f64
    );
    let full = &windows[1..windows.len().saturating_sub(1)];
    assert!(!full.is_empty(), "no window was filled whole: {windows:?}");
    for w in full {
        assert!(
            w.admitted * 10 >= QUOTA * 9,
            "window {} admitted {} of {QUOTA}: {windows:?}",
            w.index,
            w.admitted
        );
    }
    assert_eq!(
        claimed_by.len(),
        workers.len(),
        "every instance sent some of the documents: {claimed_by:?}"
    );
}
