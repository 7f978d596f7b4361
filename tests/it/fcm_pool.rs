//! ffpush's FCM connection pool against an emulator as strict as Google's front end: a stream
//! limit per connection, latency, connections closed with GOAWAY.

use std::collections::HashSet;
use std::time::Duration;

use ffpush::config::Settings;
use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator, Script};
use ffpush::fcm::{Action, Error, Outcome, SendError, Sender};
use futures::future::join_all;

/// An emulator of its own, and settings for a sender that uses it (also the HTTP/1.1 tests').
pub(crate) async fn emulator(
    project: &str,
    options: EmulatorOptions,
    tune: impl FnOnce(&mut Settings),
) -> (FcmEmulator, Settings, tempfile::TempDir) {
    let emulator = FcmEmulator::start(([127, 0, 0, 1], 0).into(), options)
        .await
        .expect("start the emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.json");
    emulator
        .write_service_account(&key, project)
        .expect("service account");
    // Firestore is not used by a sender alone.
    let mut settings = Settings::for_emulators(project, "127.0.0.1:1", &emulator.url(), key)
        .expect("emulator settings");
    tune(&mut settings);
    (emulator, settings, dir)
}

/// An FCM send body for `token`.
pub(crate) fn body(token: &str) -> bytes::Bytes {
    format!(r#"{{"message":{{"token":"{token}","notification":{{"title":"Hi","body":"There"}}}}}}"#)
        .into()
}

/// Sends to `tokens` devices all at once through one sender.
async fn burst(sender: &Sender, prefix: &str, tokens: usize) -> Vec<Result<Outcome, Error>> {
    join_all((0..tokens).map(|i| sender.send(body(&format!("{prefix}-{i}"))))).await
}

fn delivered(emulator: &FcmEmulator, project: &str) -> Vec<String> {
    emulator
        .messages(project)
        .into_iter()
        .filter_map(|m| m.token)
        .collect()
}

#[tokio::test]
async fn connections_follow_the_concurrency_and_the_advertised_stream_limit() {
    let options = EmulatorOptions::default()
        .max_streams(10)
        .latency(Duration::from_millis(50), Duration::ZERO);
    let (emulator, settings, _dir) = emulator("pool-size", options, |s| s.concurrency = 40).await;
    let sender = Sender::new(&settings).await.expect("sender");
    sender.warm_up().await.expect("warm up");
    let metrics = sender.metrics();
    assert_eq!(
        metrics.connections.get(),
        4,
        "40 in flight at 10 streams each"
    );
    let results = burst(&sender, "device", 200).await;
    assert!(
        results.iter().all(|r| matches!(r, Ok(Outcome::Sent))),
        "{results:?}"
    );
    let tokens = delivered(&emulator, "pool-size");
    assert_eq!(tokens.len(), 200);
    assert_eq!(tokens.iter().collect::<HashSet<_>>().len(), 200);
    let stats = emulator.stats();
    assert_eq!(
        stats.connections, 4,
        "the warm connections carried the sends"
    );
    assert!(
        stats.peak_streams <= 10,
        "at most the advertised 10 streams per connection, saw {}",
        stats.peak_streams
    );
    assert_eq!(metrics.streams_refused.get(), 0, "no stream was refused");
    assert_eq!(metrics.connections_opened.get(), 4);
    assert_eq!(metrics.requests_in_flight.get(), 0);
}

#[tokio::test]
async fn connections_closed_by_goaway_are_replaced_without_losing_or_repeating_a_send() {
    // Every connection is closed gracefully after 25 sends, in the middle of the burst.
    let options = EmulatorOptions::default()
        .max_streams(10)
        .latency(Duration::from_millis(20), Duration::from_millis(10))
        .goaway_after(25);
    let (emulator, settings, _dir) = emulator("pool-goaway", options, |s| s.concurrency = 20).await;
    let sender = Sender::new(&settings).await.expect("sender");
    sender.warm_up().await.expect("warm up");
    let results = burst(&sender, "device", 300).await;
    assert!(
        results.iter().all(|r| matches!(r, Ok(Outcome::Sent))),
        "{results:?}"
    );
    let tokens = delivered(&emulator, "pool-goaway");
    let unique: HashSet<_> = tokens.iter().collect();
    assert_eq!(unique.len(), 300, "every send delivered");
    assert_eq!(tokens.len(), 300, "none delivered twice");
    // A connection carries its 25 sends plus what was already in flight when its GOAWAY went
    // out (at most the 10 streams it allows): at least ceil(300 / 35) = 9 connections, each
    // one replaced in turn. How many beyond that depends on timing (a loaded machine).
    assert!(emulator.stats().connections >= 9, "{:?}", emulator.stats());
    assert!(sender.metrics().connections_opened.get() >= 9);
    // Requests sent after a GOAWAY were never processed and went out again, uncounted by FCM.
    assert_eq!(emulator.attempts("pool-goaway").len(), 300);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_retryable_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let (_emulator, mut settings, _dir) =
        emulator("pool-unreachable", EmulatorOptions::default(), |s| {
            s.concurrency = 64
        })
        .await;
    settings.fcm_endpoint = format!("http://127.0.0.1:{port}");
    let sender = Sender::new(&settings).await.expect("sender");
    match sender.send(body("device")).await {
        Err(e @ Error::Transport(SendError::Connect(_))) => {
            assert!(e.to_string().starts_with("FCM request failed"), "{e}");
            assert!(matches!(e.action(), Action::Retry { quota: false, .. }));
        }
        other => panic!("{other:?}"),
    }
    assert!(sender.metrics().connect_errors.get() >= 1);
}

/// A stream refused unprocessed (`RST_STREAM(REFUSED_STREAM)`) is sent again at once, on
/// another connection than the one that refused it: that one may well refuse it again.
#[tokio::test]
async fn a_refused_stream_is_sent_again_on_another_connection() {
    let (emulator, settings, _dir) = emulator("pool-refused", EmulatorOptions::default(), |s| {
        s.fcm_connections = Some(3)
    })
    .await;
    let sender = Sender::new(&settings).await.expect("sender");
    sender.warm_up().await.expect("warm up");
    assert_eq!(sender.metrics().connections.get(), 3);
    emulator.script("refused-twice", Script::RefusedStream { times: 2 });

    let result = sender.send(body("refused-twice")).await;
    assert!(matches!(result, Ok(Outcome::Sent)), "{result:?}");
    let attempts = emulator.attempts("pool-refused");
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [0, 0, 200], "refused twice, then answered");
    let on: Vec<Option<u64>> = attempts.iter().map(|a| a.connection).collect();
    assert!(
        on[0] != on[1] && on[1] != on[2],
        "each retry on another connection than the one that refused it: {on:?}"
    );
    assert_eq!(sender.metrics().streams_refused.get(), 2);
    assert_eq!(delivered(&emulator, "pool-refused"), ["refused-twice"]);
}

/// A request that times out says nothing about its own fate, but it is the only sign of a
/// connection that died silently (no reset, no FIN: a NAT dropped it), which would otherwise
/// take every request for the ~50 s the keep-alive `PING` needs to notice. The connection is
/// retired at the first timeout: the next sends go out on a fresh one and are answered.
#[tokio::test]
async fn a_timed_out_request_retires_its_connection() {
    let (emulator, settings, _dir) = emulator("pool-silent", EmulatorOptions::default(), |s| {
        s.fcm_connections = Some(1);
        s.fcm_timeout = Duration::from_millis(500);
    })
    .await;
    let sender = Sender::new(&settings).await.expect("sender");
    sender.warm_up().await.expect("warm up");
    emulator.script("silences", Script::HangConnection);

    let stuck = sender.send(body("silences")).await;
    assert!(
        matches!(stuck, Err(Error::Transport(SendError::Timeout))),
        "{stuck:?}"
    );
    // The connection is silent now. What comes next must not go to it.
    let results = burst(&sender, "after", 20).await;
    assert!(
        results.iter().all(|r| matches!(r, Ok(Outcome::Sent))),
        "{results:?}"
    );
    let dead = emulator
        .attempts("pool-silent")
        .first()
        .and_then(|a| a.connection);
    let after: HashSet<Option<u64>> = emulator
        .messages("pool-silent")
        .iter()
        .map(|m| m.connection)
        .collect();
    assert!(!after.contains(&dead), "{dead:?} in {after:?}");
    assert_eq!(delivered(&emulator, "pool-silent").len(), 20);
    assert!(sender.metrics().connections_opened.get() >= 2);
    emulator.clear_script("silences");
}
