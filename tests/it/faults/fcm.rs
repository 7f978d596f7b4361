//! FCM unavailable for a while, or hanging on one token.
//!
//! Each test runs a real worker against the FCM emulator and makes FCM misbehave mid-send, then
//! checks that every token got the notification once (or, for a token FCM never answers,
//! that it is counted), that the document finishes, and that the worker goes on sending. The
//! numbers (duplicates, time to finish) are printed: `cargo test --test it faults::fcm --
//! --nocapture` shows them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator, Script};
use futures::StreamExt;

use crate::{TestApp, assert_succeeded, num, text};

/// An emulator of its own (an outage stops every send it serves) and a test project whose
/// worker sends through it.
async fn app_on_own_emulator(
    options: EmulatorOptions,
    tune: impl FnOnce(&mut ffpush::config::Settings),
) -> (FcmEmulator, TestApp, tempfile::TempDir) {
    let emulator = FcmEmulator::start(([127, 0, 0, 1], 0).into(), options)
        .await
        .expect("start the emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.json");
    let app = TestApp::with(|s| {
        s.fcm_endpoint = emulator.url();
        s.credentials = Some(key.clone());
        tune(s);
    })
    .await;
    emulator
        .write_service_account(&key, &app.project)
        .expect("service account");
    (emulator, app, dir)
}

/// `users` users with one device each; returns their tokens and the `user_refs` naming them.
async fn audience(app: &TestApp, users: usize) -> (Vec<String>, String) {
    let p = app.project.clone();
    let tokens: Vec<String> = (0..users).map(|u| format!("{p}-u{u:04}")).collect();
    futures::stream::iter(tokens.iter().enumerate())
        .map(|(u, token)| async move {
            app.add_token(&format!("u{u:04}"), "phone", token, "Android")
                .await;
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let refs = (0..users)
        .map(|u| format!("users/u{u:04}"))
        .collect::<Vec<_>>()
        .join(",");
    (tokens, refs)
}

/// How often `emulator` accepted each token of `project`.
fn deliveries(emulator: &FcmEmulator, project: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in emulator.messages(project) {
        *counts.entry(m.token.unwrap_or_default()).or_insert(0) += 1;
    }
    counts
}

/// The worker still takes notifications: a new one to `user` is sent.
async fn still_sending(app: &TestApp, user: &str) {
    let doc = app
        .notify("after the fault", &format!("users/{user}"))
        .await;
    let done = app.finished_within(&doc, Duration::from_secs(60)).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some(1));
}

/// FCM answers 503 UNAVAILABLE to every send for 3 s while a notification to 300 devices is
/// going out (at 100 a second, so the outage falls mid-way). Every token is retried through
/// the outage and gets the message exactly once; the document succeeds; the worker goes on.
#[tokio::test]
async fn an_fcm_outage_mid_broadcast_delays_but_neither_loses_nor_repeats() {
    const USERS: usize = 300;
    const OUTAGE: Duration = Duration::from_secs(3);
    let (emulator, app, _dir) = app_on_own_emulator(EmulatorOptions::default(), |s| {
        s.fcm_rate = 100;
        s.concurrency = 20;
    })
    .await;
    let p = app.project.clone();
    let (tokens, refs) = audience(&app, USERS).await;

    let (worker, _) = app.start_worker().await;
    let doc = app.notify("through an outage", &refs).await;
    crate::wait_until(Duration::from_secs(60), || {
        emulator.messages(&p).len() >= USERS / 6
    })
    .await;
    emulator.outage(OUTAGE);
    let outage_began = Instant::now();
    let delivered_before = emulator.messages(&p).len();

    let done = app.finished_within(&doc, Duration::from_secs(120)).await;
    let outage_to_done = outage_began.elapsed();
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some(USERS as i64));
    assert_eq!(num(&done, "num_failed"), Some(0));

    let counts = deliveries(&emulator, &p);
    let refused = emulator
        .attempts(&p)
        .iter()
        .filter(|a| a.status == 503)
        .count();
    let duplicates: usize = counts.values().map(|n| n.saturating_sub(1)).sum();
    eprintln!(
        "FCM outage of {OUTAGE:?} mid-broadcast ({USERS} tokens at 100/s): {delivered_before} \
         delivered before it, {refused} sends answered 503, {duplicates} duplicates; the \
         document finished {:.1} s after the outage began",
        outage_to_done.as_secs_f64()
    );
    assert!(refused > 0, "the outage fell mid-broadcast");
    assert!(delivered_before < USERS, "the outage fell mid-broadcast");
    assert_eq!(counts.len(), USERS, "every token delivered");
    assert!(tokens.iter().all(|t| counts.contains_key(t)));
    assert_eq!(
        duplicates, 0,
        "a 503 is never delivered: no send repeats one that was"
    );

    still_sending(&app, "u0000").await;
    worker.stop().await;
}

/// One token of 200 is never answered (a stuck FCM backend). The others are sent once each;
/// the hung one is tried `FFPUSH_MAX_ATTEMPTS` times, each ending in a timeout, and counted
/// as timed out (it may have been delivered); the document finishes and the worker goes on.
#[tokio::test]
async fn a_hung_token_among_many_is_counted_and_holds_up_nothing_else() {
    const USERS: usize = 200;
    const ATTEMPTS: u32 = 3;
    const TIMEOUT: Duration = Duration::from_secs(2);
    let app = TestApp::with(|s| {
        s.fcm_timeout = TIMEOUT;
        s.max_attempts = ATTEMPTS;
        s.concurrency = 20;
    })
    .await;
    let p = app.project.clone();
    let fcm = app.fcm();
    let (tokens, refs) = audience(&app, USERS).await;
    let hung = &tokens[USERS / 2];
    fcm.script(hung, Script::Hang);

    let (worker, _) = app.start_worker().await;
    let started = Instant::now();
    let doc = app.notify("one token hangs", &refs).await;
    let done = app.finished_within(&doc, Duration::from_secs(120)).await;
    let took = started.elapsed();
    fcm.clear_script(hung);
    let timeouts = worker.worker.metrics.fcm_outcome("retryable");

    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    assert_eq!(num(&done, "num_sent"), Some(USERS as i64 - 1));
    assert_eq!(num(&done, "num_failed"), Some(1));
    let error = text(&done, "error").unwrap_or_default();
    assert!(
        error.contains("1 timed out; they may have been delivered"),
        "{error}"
    );

    let counts = deliveries(fcm, &p);
    let duplicates: usize = counts.values().map(|n| n.saturating_sub(1)).sum();
    let held = fcm
        .attempts(&p)
        .iter()
        .filter(|a| a.token.as_deref() == Some(hung.as_str()))
        .count();
    eprintln!(
        "hung token among {USERS}: {} delivered, {duplicates} duplicates, the hung token tried \
         {held} times, {timeouts} sends timed out; the document finished in {:.1} s",
        counts.len(),
        took.as_secs_f64()
    );
    assert_eq!(counts.len(), USERS - 1, "every other token delivered");
    assert!(
        !counts.contains_key(hung),
        "the hung token was never answered"
    );
    assert_eq!(held, ATTEMPTS as usize, "each attempt hung and timed out");
    // Only a request that timed out can be repeated (FCM may have processed it). Here that is
    // the hung token alone, unless a loaded machine held an ordinary answer past the timeout.
    let others_timed_out = timeouts.saturating_sub(u64::from(ATTEMPTS));
    assert!(
        duplicates as u64 <= others_timed_out,
        "{duplicates} duplicates, {others_timed_out} other sends timed out"
    );

    still_sending(&app, "u0000").await;
    worker.stop().await;
}

/// The connection carrying one token's send goes silent (no answers, no PING replies), as a
/// connection a NAT dropped. Its other requests time out with unknown fate; the pool must stop
/// using it at the first timeout, so the retries and every later send go out on a fresh
/// connection: every other token is delivered, the hung one is counted, and duplicates stay
/// within what was in flight on the dead connection (FCM may have processed a request whose
/// answer never came back).
#[tokio::test]
async fn a_connection_gone_silent_is_dropped_at_the_first_timeout() {
    const USERS: usize = 300;
    const CONCURRENCY: usize = 20;
    const ATTEMPTS: u32 = 3;
    let (emulator, app, _dir) = app_on_own_emulator(EmulatorOptions::default(), |s| {
        s.fcm_timeout = Duration::from_secs(2);
        s.max_attempts = ATTEMPTS;
        s.concurrency = CONCURRENCY;
        s.fcm_rate = 200;
    })
    .await;
    let p = app.project.clone();
    let (tokens, refs) = audience(&app, USERS).await;
    let hung = &tokens[USERS / 3];
    emulator.script(hung, Script::HangConnection);

    let (worker, _) = app.start_worker().await;
    let started = Instant::now();
    let doc = app.notify("a connection dies", &refs).await;
    let done = app.finished_within(&doc, Duration::from_secs(120)).await;
    let took = started.elapsed();
    emulator.clear_script(hung);
    let timeouts = worker.worker.metrics.fcm_outcome("retryable");

    let counts = deliveries(&emulator, &p);
    let duplicates: usize = counts.values().map(|n| n.saturating_sub(1)).sum();
    let connections = emulator.stats().connections;
    eprintln!(
        "silent connection among {USERS} tokens: {} delivered, {duplicates} duplicates, \
         {timeouts} sends timed out, {connections} connections carried sends; the document \
         finished in {:.1} s: {:?} sent, {:?}",
        counts.len(),
        took.as_secs_f64(),
        num(&done, "num_sent"),
        text(&done, "error"),
    );
    assert_eq!(
        num(&done, "num_sent"),
        Some(USERS as i64 - 1),
        "every token but the hung one sent: {:?}",
        text(&done, "error")
    );
    assert_eq!(num(&done, "num_failed"), Some(1));
    assert_eq!(counts.len(), USERS - 1, "every other token delivered");
    assert!(!counts.contains_key(hung));
    // A duplicate is a request that timed out after FCM processed it: here, one in flight on
    // the dead connection (at most the concurrency), or an answer a loaded machine held past
    // the timeout. The hung token's own attempts are never delivered.
    let others_timed_out = timeouts.saturating_sub(u64::from(ATTEMPTS));
    assert!(
        duplicates as u64 <= others_timed_out,
        "{duplicates} duplicates, {others_timed_out} other sends timed out"
    );
    assert!(
        others_timed_out >= 1,
        "the requests on the dead connection timed out"
    );

    still_sending(&app, "u0000").await;
    worker.stop().await;
}

/// FCM (or a proxy in front of it) answers with a `Retry-After` no client can honour: the
/// largest number of seconds there is (on a 429 about the project's quota, which pauses the
/// whole instance) and a year (on a 503). ffpush reads either as at most its retry budget: no
/// panic, both tokens are given up within the budget and counted, the other tokens are sent,
/// and the instance sends again once the budget has passed, not in a year.
#[tokio::test]
async fn a_retry_after_beyond_the_retry_budget_is_read_as_the_budget() {
    const USERS: usize = 20;
    const BUDGET: Duration = Duration::from_secs(3);
    let app = TestApp::with(|s| {
        s.retry_budget = BUDGET;
        s.concurrency = 4;
    })
    .await;
    let fcm = app.fcm();
    let (tokens, refs) = audience(&app, USERS).await;
    fcm.script(
        &tokens[3],
        Script::QuotaExceeded {
            retry_after_secs: u64::MAX,
            times: 1,
        },
    );
    fcm.script(
        &tokens[7],
        Script::Unavailable {
            times: 1,
            retry_after_secs: Some(365 * 24 * 3600),
        },
    );

    let (worker, _) = app.start_worker().await;
    let started = Instant::now();
    let doc = app.notify("hostile Retry-After", &refs).await;
    let done = app.finished_within(&doc, Duration::from_secs(60)).await;
    eprintln!(
        "Retry-After of u64::MAX s (quota) and a year (503), budget {BUDGET:?}: finished in \
         {:.1} s, {:?} sent, {:?}",
        started.elapsed().as_secs_f64(),
        num(&done, "num_sent"),
        text(&done, "error")
    );
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    assert_eq!(num(&done, "num_sent"), Some(USERS as i64 - 2));
    let error = text(&done, "error").unwrap_or_default();
    assert!(error.contains("2 undelivered"), "{error}");

    still_sending(&app, "u0000").await;
    worker.stop().await;
}
