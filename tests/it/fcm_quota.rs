//! Instance-wide pacing against an emulator that enforces a project quota, as FCM does.

use std::collections::HashSet;
use std::time::Duration;

use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator};
use futures::StreamExt;

use crate::{TestApp, assert_succeeded, num};

/// Two notifications fan out at once from one worker whose rate (FFPUSH_FCM_RATE) is twice the
/// project's quota, as when several instances share a project. The first 429 pauses every send
/// of the instance until the quota window ends (Retry-After), and the sends resume slower:
/// each window sees the quota plus at most a handful of refused sends, never one refusal per
/// token.
#[tokio::test]
async fn fan_outs_share_one_pace_and_pause_together_on_the_project_quota() {
    const QUOTA: u64 = 40;
    const WINDOW: Duration = Duration::from_secs(2);
    // Sends beyond the quota in one window: those already in flight or past the pacer when
    // the first 429 came back. At 40 sends/s over loopback that is one or two; a loaded
    // machine may hold answers back longer.
    const MARGIN: u64 = 8;
    const USERS: usize = 60;

    let emulator = FcmEmulator::start(
        ([127, 0, 0, 1], 0).into(),
        EmulatorOptions::default().quota(QUOTA, WINDOW),
    )
    .await
    .expect("start the emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.json");
    emulator
        .write_service_account(&key, "quota-test")
        .expect("service account");
    let app = TestApp::with(|s| {
        s.fcm_endpoint = emulator.url();
        s.credentials = Some(key.clone());
        // 40/s against a quota of 40 per 2 s.
        s.fcm_rate = 40;
    })
    .await;
    let p = app.project.clone();
    futures::stream::iter(0..USERS)
        .map(|u| {
            let app = &app;
            let p = &p;
            async move {
                for device in ["android", "ios"] {
                    app.add_token(
                        &format!("u{u:02}"),
                        device,
                        &format!("{p}-u{u:02}-{device}"),
                        "Android",
                    )
                    .await;
                }
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let refs = |users: std::ops::Range<usize>| {
        users
            .map(|u| format!("users/u{u:02}"))
            .collect::<Vec<_>>()
            .join(",")
    };

    let (worker, _) = app.start_worker().await;
    let first = app.notify("first", &refs(0..USERS / 2)).await;
    let second = app.notify("second", &refs(USERS / 2..USERS)).await;
    for doc in [&first, &second] {
        let done = app.finished(doc).await;
        assert_succeeded(&done);
        assert_eq!(num(&done, "num_sent"), Some(USERS as i64));
        assert_eq!(num(&done, "num_failed"), Some(0));
    }
    worker.stop().await;

    // Every token delivered, once.
    let delivered: Vec<String> = emulator
        .messages(&p)
        .into_iter()
        .filter_map(|m| m.token)
        .collect();
    assert_eq!(delivered.len(), 2 * USERS);
    assert_eq!(delivered.iter().collect::<HashSet<_>>().len(), 2 * USERS);
    // The quota was hit (the rate is twice the quota) and each window saw at most the quota
    // plus the margin.
    let windows = emulator.quota_windows(&p);
    assert!(
        windows.iter().any(|w| w.refused > 0),
        "the rate exceeds the quota: FCM must have said 429 ({windows:?})"
    );
    for w in &windows {
        assert!(w.admitted <= QUOTA, "{w:?}");
        assert!(
            w.refused <= MARGIN,
            "window {}: {} sends beyond the quota of {QUOTA} (at most {MARGIN}): {windows:?}",
            w.index,
            w.refused
        );
    }
}
