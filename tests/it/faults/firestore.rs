//! The connection between a worker and Firestore cut (idle, mid-send, longer than the lease).
//!
//! Worker A reaches Firestore through a [`Proxy`] the test cuts or blackholes; FCM stays
//! reachable, as when a worker loses its route to Firestore but not to Google's front end. A
//! second worker B, where there is one, reaches Firestore directly and sends to an FCM
//! emulator of its own, so that each send is known to be A's or B's.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ffpush::config::Settings;
use ffpush::daemon::{self, Daemon};
use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator};
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;
use crate::{TestApp, assert_succeeded, num, text, wait_until};

/// Sends are paced at this rate, so that what a worker sends in a given time is bounded
/// however loaded the machine is.
const RATE: u32 = 40;
const CONCURRENCY: usize = 8;
const INTERVAL: Duration = Duration::from_millis(250);
const LEASE: Duration = Duration::from_secs(3);

fn tune(s: &mut Settings) {
    s.concurrency = CONCURRENCY;
    s.fcm_rate = RATE;
    s.lease = LEASE;
    s.progress_interval = INTERVAL;
}

/// What a worker may send once its progress writes fail: the requests in flight, plus the
/// paced rate over the window until it stops (two progress intervals), plus the pacer's burst
/// after idling (50 ms worth).
fn stop_window_bound() -> usize {
    let window = 2.0 * INTERVAL.as_secs_f64() + 0.05;
    CONCURRENCY + (f64::from(RATE) * window).ceil() as usize
}

/// A worker like `ffpush run` with these settings; started once both listen streams are up.
async fn start(settings: Settings) -> (Daemon, CancellationToken) {
    let shutdown = CancellationToken::new();
    let daemon = daemon::start(settings, shutdown.clone())
        .await
        .expect("starting a worker");
    wait_until(Duration::from_secs(30), || daemon.listen.all_up()).await;
    (daemon, shutdown)
}

/// Worker A's settings: Firestore through `proxy`.
fn through(app: &TestApp, proxy: &Proxy) -> Settings {
    let mut s = app.settings.clone();
    s.firestore_emulator_host = Some(proxy.host());
    s.worker_id = "worker-a".into();
    s
}

/// Sends of `title` per token over the given emulators' records of this project.
fn per_token(app: &TestApp, emulators: &[&FcmEmulator], title: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for emulator in emulators {
        for m in emulator.messages(&app.project) {
            if m.message["notification"]["title"] == title {
                *counts.entry(m.token.unwrap_or_default()).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// When each send of `title` reached the emulator.
fn arrivals(app: &TestApp, emulator: &FcmEmulator, title: &str) -> Vec<DateTime<Utc>> {
    emulator
        .messages(&app.project)
        .into_iter()
        .filter(|m| m.message["notification"]["title"] == title)
        .map(|m| m.received_at)
        .collect()
}

/// Every token got the message, and how many got it more than once.
fn duplicates(counts: &HashMap<String, usize>, tokens: &[String]) -> usize {
    for token in tokens {
        assert!(
            counts.get(token).copied().unwrap_or(0) >= 1,
            "{token} was never delivered"
        );
    }
    counts.values().map(|n| n - 1).sum()
}

/// The worker still takes work: a new notification to a user of one token is sent.
async fn still_running(app: &TestApp, title: &str) {
    app.add_token("solo", "t", &format!("{}-solo", app.project), "iOS")
        .await;
    let doc = app.notify(title, "users/solo").await;
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some(1));
}

#[tokio::test]
async fn cut_while_idle_then_documents_written_while_cut_and_after_healing_are_sent_once() {
    let app = TestApp::with(tune).await;
    let token = format!("{}-idle", app.project);
    app.add_token("u1", "t", &token, "iOS").await;
    let proxy = Proxy::start(app.settings.firestore_emulator_host.as_deref().unwrap()).await;
    let (a, _) = start(through(&app, &proxy)).await;

    proxy.cut();
    wait_until(Duration::from_secs(30), || !a.listen.all_up()).await;
    let during = app.notify("during the cut", "users/u1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(app.delivered().is_empty(), "nothing reaches A while cut");
    proxy.heal();
    let after = app.notify("after healing", "users/u1").await;

    for doc in [&during, &after] {
        let done = app.finished(doc).await;
        assert_succeeded(&done);
        assert_eq!(num(&done, "num_sent"), Some(1));
    }
    let delivered = app.delivered();
    assert_eq!(delivered.len(), 2, "each sent once: {delivered:?}");
    a.stop().await;
}

#[tokio::test]
async fn cut_while_sending_pauses_within_the_stop_window_and_finishes_once_healed() {
    let app = TestApp::with(tune).await;
    let tokens = super::big_audience(&app, 240).await;
    let proxy = Proxy::start(app.settings.firestore_emulator_host.as_deref().unwrap()).await;
    let (a, _) = start(through(&app, &proxy)).await;
    let doc = app.notify("cut", "users/big").await;
    wait_until(Duration::from_secs(60), || app.delivered().len() >= 40).await;

    let cut_at = Utc::now();
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let healed_at = Utc::now();
    proxy.heal();
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some(240));

    let during: Vec<_> = arrivals(&app, app.fcm(), "cut")
        .into_iter()
        .filter(|t| *t > cut_at && *t < healed_at)
        .collect();
    let last = during
        .iter()
        .max()
        .map(|t| (*t - cut_at).num_milliseconds());
    eprintln!(
        "cut while sending: {} sends during the 2 s cut (bound {}), the last {last:?} ms after it",
        during.len(),
        stop_window_bound()
    );
    assert!(
        during.len() <= stop_window_bound(),
        "{} sends while progress could not be saved (bound {})",
        during.len(),
        stop_window_bound()
    );
    let dups = duplicates(&per_token(&app, &[app.fcm()], "cut"), &tokens);
    assert_eq!(dups, 0, "nobody else took over: nothing is sent twice");
    still_running(&app, "after the cut").await;
    a.stop().await;
}

/// How the connection to Firestore fails in [`longer_than_the_lease`].
#[derive(Clone, Copy, Debug)]
enum Fault {
    Cut,
    Blackhole,
}

/// A loses Firestore for longer than its lease while sending; B takes the document over from
/// A's last saved progress; then A's connection heals.
async fn longer_than_the_lease(fault: Fault) {
    let app = TestApp::with(tune).await;
    let tokens = super::big_audience(&app, 240).await;
    let proxy = Proxy::start(app.settings.firestore_emulator_host.as_deref().unwrap()).await;
    let (a, _) = start(through(&app, &proxy)).await;
    // B sends to an FCM emulator of its own: each send is known to be A's or B's.
    let fcm_b = FcmEmulator::start_on_thread(
        ([127, 0, 0, 1], 0).into(),
        EmulatorOptions::default().latency(Duration::from_millis(20), Duration::ZERO),
    )
    .expect("B's FCM emulator");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("b.json");
    fcm_b.write_service_account(&key, &app.project).unwrap();
    let mut settings_b = app.settings.clone();
    settings_b.fcm_endpoint = fcm_b.url();
    settings_b.credentials = Some(key);
    settings_b.worker_id = "worker-b".into();

    let title = format!("lease {fault:?}");
    let doc = app.notify(&title, "users/big").await;
    wait_until(Duration::from_secs(60), || app.delivered().len() >= 40).await;
    let cut_at = Utc::now();
    match fault {
        Fault::Cut => proxy.cut(),
        Fault::Blackhole => proxy.blackhole(),
    }
    let (b, _) = start(settings_b).await;
    // B takes over once A's lease has run out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let current = app.store.get(&doc).await.unwrap().unwrap();
        if text(&current, "ffpush_worker").as_deref() == Some("worker-b") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "B never took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken_over_at = Utc::now();
    proxy.heal();
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some(240));

    let a_after: Vec<_> = arrivals(&app, app.fcm(), &title)
        .into_iter()
        .filter(|t| *t > cut_at)
        .collect();
    let a_last = a_after
        .iter()
        .max()
        .map(|t| (*t - cut_at).num_milliseconds());
    let a_after_takeover = a_after.iter().filter(|t| **t > taken_over_at).count();
    let b_sent = arrivals(&app, &fcm_b, &title).len();
    let dups = duplicates(&per_token(&app, &[app.fcm(), &fcm_b], &title), &tokens);
    eprintln!(
        "{fault:?} longer than the lease: A sent {} after it (the last {a_last:?} ms after; {a_after_takeover} after B took over), B sent {b_sent}; {dups} duplicates (bound {})",
        a_after.len(),
        stop_window_bound()
    );
    assert!(
        a_after.len() <= stop_window_bound(),
        "A sent {} after losing Firestore (bound {})",
        a_after.len(),
        stop_window_bound()
    );
    assert!(
        dups <= stop_window_bound(),
        "{dups} duplicates (bound {})",
        stop_window_bound()
    );

    // A stopped quietly and still works: with B gone, it sends the next notification.
    b.stop().await;
    fcm_b.shutdown();
    wait_until(Duration::from_secs(60), || a.listen.all_up()).await;
    let before = app.delivered().len();
    still_running(&app, "after the takeover").await;
    assert!(app.delivered().len() > before, "A sent it");
    a.stop().await;
}

#[tokio::test]
async fn cut_longer_than_the_lease_stops_sending_and_a_takeover_duplicates_within_the_bound() {
    longer_than_the_lease(Fault::Cut).await;
}

#[tokio::test]
async fn blackholed_longer_than_the_lease_stops_sending_and_a_takeover_duplicates_within_the_bound()
{
    longer_than_the_lease(Fault::Blackhole).await;
}
