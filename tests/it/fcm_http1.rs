//! FCM endpoints that are not Google's front end: HTTP/1.1 only (mock servers, proxies), over
//! plain TCP and over TLS with ALPN `http/1.1`, and endpoints that do not speak HTTP at all.

use std::collections::HashSet;
use std::time::Duration;

use ffpush::config::{CaCert, Settings};
use ffpush::daemon;
use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator, Script};
use ffpush::fcm::{Action, Error, Outcome, SendError, Sender};
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::fcm_pool::body;
use crate::{TestApp, assert_succeeded, num};

const USERS: usize = 10;
const DEVICES: usize = 3;
/// Requests in flight: also the most HTTP/1.1 connections the pool may open.
const CONCURRENCY: usize = 4;

/// A worker sends a notification to `USERS × DEVICES` tokens through `emulator` (HTTP/1.1
/// only); every token gets it once, over HTTP/1.1, on at most `CONCURRENCY` connections.
async fn every_token_delivered_over_http1(emulator: FcmEmulator, ca: Option<CaCert>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.json");
    emulator
        .write_service_account(&key, "http1")
        .expect("service account");
    let app = TestApp::with(|s| {
        s.fcm_endpoint = emulator.url();
        s.credentials = Some(key.clone());
        s.fcm_ca_cert = ca;
        s.concurrency = CONCURRENCY;
    })
    .await;
    let p = app.project.clone();
    let mut expected = HashSet::new();
    for u in 0..USERS {
        for d in 0..DEVICES {
            let token = format!("{p}-u{u}-d{d}");
            app.add_token(&format!("u{u}"), &format!("d{d}"), &token, "Android")
                .await;
            expected.insert(token);
        }
    }
    let refs: Vec<String> = (0..USERS).map(|u| format!("users/u{u}")).collect();

    let (worker, _) = app.start_worker().await;
    let doc = app.notify("over HTTP/1.1", &refs.join(",")).await;
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some((USERS * DEVICES) as i64));
    let fcm = worker.worker.metrics.fcm.clone();
    worker.stop().await;

    let messages = emulator.messages(&p);
    let versions: HashSet<&str> = messages.iter().map(|m| m.http_version.as_str()).collect();
    assert_eq!(
        versions,
        HashSet::from(["HTTP/1.1"]),
        "every send over HTTP/1.1"
    );
    let delivered: Vec<String> = messages.iter().filter_map(|m| m.token.clone()).collect();
    assert_eq!(delivered.len(), USERS * DEVICES, "none delivered twice");
    assert_eq!(delivered.into_iter().collect::<HashSet<_>>(), expected);
    let stats = emulator.stats();
    assert_eq!(stats.http2, 0);
    assert!(
        (1..=CONCURRENCY as u64).contains(&stats.connections),
        "at most one connection per request in flight: {stats:?}"
    );
    // The pool's metrics count HTTP/1.1 connections as they count HTTP/2 ones.
    assert!((1..=CONCURRENCY as u64).contains(&fcm.connections_opened.get()));
    assert!(fcm.connections.get() <= CONCURRENCY as u64);
    assert_eq!(fcm.requests_in_flight.get(), 0);
}

#[tokio::test]
async fn an_http_endpoint_that_speaks_only_http1_gets_every_notification() {
    let emulator = FcmEmulator::start(
        ([127, 0, 0, 1], 0).into(),
        EmulatorOptions::default().http1_only(),
    )
    .await
    .expect("start the emulator");
    assert!(emulator.url().starts_with("http://"));
    every_token_delivered_over_http1(emulator, None).await;
}

#[tokio::test]
async fn an_https_endpoint_that_agrees_only_to_http1_by_alpn_gets_every_notification() {
    let (ca, cert, key) = crate::fcm_emulator::test_certificates();
    let emulator = FcmEmulator::start_tls(
        ([127, 0, 0, 1], 0).into(),
        EmulatorOptions::default().http1_only(),
        cert.as_bytes(),
        key.as_bytes(),
    )
    .await
    .expect("start the HTTPS emulator");
    assert!(emulator.url().starts_with("https://"));
    let ca = CaCert {
        path: "test-ca.pem".into(),
        pem: ca.into_bytes(),
    };
    every_token_delivered_over_http1(emulator, Some(ca)).await;
}

/// A TCP server that answers every connection with a line that is not HTTP, and closes it.
async fn not_http() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.write_all(b"* OK IMAP4rev1 ready\r\n\r\n").await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// `ffpush run` against it refuses to start, with one line that names the endpoint and the
/// protocol problem; no notification is ever taken up.
#[tokio::test]
async fn an_endpoint_that_does_not_speak_http_stops_the_start_with_one_line() {
    let endpoint = not_http().await;
    let app = TestApp::with(|s| s.fcm_endpoint = endpoint.clone()).await;
    let started = tokio::time::timeout(
        Duration::from_secs(60),
        daemon::start(app.settings.clone(), CancellationToken::new()),
    )
    .await
    .expect("the start gives up at once, not after retries");
    let error = match started {
        Ok(daemon) => {
            daemon.stop().await;
            panic!("started against an endpoint that does not speak HTTP");
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(!error.contains('\n'), "one line: {error}");
    assert!(error.contains(&endpoint), "names FCM_ENDPOINT: {error}");
    assert!(
        error.contains("HTTP/2") && error.contains("HTTP/1.1"),
        "says which protocols were tried: {error}"
    );
}

/// A sender that never warmed up finds out at its first send, and the notification fails at
/// once with the reason (no retries against a server that will never speak HTTP).
#[tokio::test]
async fn without_warm_up_the_first_send_fails_with_the_protocol_problem() {
    let endpoint = not_http().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.json");
    let emulator = &crate::shared().fcm;
    emulator
        .write_service_account(&key, "not-http")
        .expect("service account");
    let settings =
        Settings::for_emulators("not-http", "127.0.0.1:1", &endpoint, key).expect("settings");
    let sender = Sender::new(&settings).await.expect("sender");
    let body = r#"{"message":{"token":"device","notification":{"title":"Hi","body":"There"}}}"#;
    match sender.send(body.into()).await {
        Err(e) => {
            let line = format!("{:#}", anyhow::Error::new(e.clone()));
            assert_eq!(e.action(), Action::Fatal, "{line}");
            assert!(line.contains("HTTP/1.1"), "{line}");
        }
        other => panic!("{other:?}"),
    }
}

/// A server that accepts and closes every connection without a byte (a port forwarder with
/// nothing behind it yet) says nothing about the protocol: unreachable for now, so the sender
/// warms up with a warning and sends get a retryable error.
#[tokio::test]
async fn an_endpoint_that_closes_without_a_word_is_unreachable_not_a_protocol_problem() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            drop(tcp);
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.json");
    crate::shared()
        .fcm
        .write_service_account(&key, "closes")
        .expect("service account");
    let settings =
        Settings::for_emulators("closes", "127.0.0.1:1", &endpoint, key).expect("settings");
    let sender = Sender::new(&settings).await.expect("sender");
    sender.warm_up().await.expect("only a warning");
    match sender.send(body("device")).await {
        Err(e @ Error::Transport(SendError::Connect(_))) => {
            assert!(matches!(e.action(), Action::Retry { .. }), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
}

/// `https://` pointed at a server that speaks plain HTTP: the start says so.
#[tokio::test]
async fn an_https_url_for_a_plain_http_server_stops_the_start_with_one_line() {
    let plain = crate::shared().fcm.url();
    let endpoint = plain.replacen("http://", "https://", 1);
    let app = TestApp::with(|s| s.fcm_endpoint = endpoint.clone()).await;
    let started = daemon::start(app.settings.clone(), CancellationToken::new()).await;
    let error = match started {
        Ok(daemon) => {
            daemon.stop().await;
            panic!("started with https:// against a plain HTTP server");
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(!error.contains('\n'), "one line: {error}");
    assert!(error.contains(&endpoint), "names FCM_ENDPOINT: {error}");
    assert!(error.contains("TLS"), "{error}");
}

/// A sender of its own on an HTTP/1.1-only emulator (no Firestore needed).
async fn http1_sender(
    project: &str,
    options: EmulatorOptions,
    tune: impl FnOnce(&mut Settings),
) -> (FcmEmulator, Sender, tempfile::TempDir) {
    let (emulator, settings, dir) =
        crate::fcm_pool::emulator(project, options.http1_only(), tune).await;
    let sender = Sender::new(&settings).await.expect("sender");
    sender.warm_up().await.expect("warm up");
    (emulator, sender, dir)
}

/// The server closes every HTTP/1.1 connection after 5 sends (`Connection: close`, as a
/// graceful GOAWAY is on HTTP/2): the pool opens others, and no send is lost or repeated.
#[tokio::test]
async fn http1_connections_the_server_closes_are_replaced_without_losing_or_repeating_a_send() {
    const SENDS: usize = 60;
    let options = EmulatorOptions::default()
        .latency(Duration::from_millis(5), Duration::from_millis(5))
        .goaway_after(5);
    let (emulator, sender, _dir) = http1_sender("h1-recycle", options, |s| s.concurrency = 8).await;
    let results =
        futures::future::join_all((0..SENDS).map(|i| sender.send(body(&format!("device-{i}")))))
            .await;
    assert!(
        results.iter().all(|r| matches!(r, Ok(Outcome::Sent))),
        "{results:?}"
    );
    let tokens: Vec<String> = emulator
        .messages("h1-recycle")
        .into_iter()
        .filter_map(|m| m.token)
        .collect();
    assert_eq!(tokens.len(), SENDS, "none delivered twice");
    assert_eq!(tokens.iter().collect::<HashSet<_>>().len(), SENDS);
    assert_eq!(emulator.attempts("h1-recycle").len(), SENDS);
    let stats = emulator.stats();
    assert_eq!(stats.http2, 0);
    assert!(stats.connections >= (SENDS / 5) as u64, "{stats:?}");
    assert!(
        stats.peak_streams <= 1,
        "one request at a time per connection: {stats:?}"
    );
    let metrics = sender.metrics();
    assert!(metrics.connections_opened.get() >= (SENDS / 5) as u64);
    assert!(metrics.connections.get() <= 8);
    assert_eq!(metrics.requests_in_flight.get(), 0);
}

/// A request that times out on HTTP/1.1 has an unknown fate: a retryable transport error, as
/// on HTTP/2. Its connection is closed, and the next send goes out on another. FCM's answers
/// keep their meaning over HTTP/1.1.
#[tokio::test]
async fn http1_timeouts_and_fcm_answers_are_typed_as_on_http2() {
    let (emulator, sender, _dir) = http1_sender("h1-typed", EmulatorOptions::default(), |s| {
        s.concurrency = 2;
        s.fcm_timeout = Duration::from_millis(300);
    })
    .await;
    emulator.script("slow", Script::Latency(Duration::from_secs(3)));
    match sender.send(body("slow")).await {
        Err(e @ Error::Transport(SendError::Timeout)) => {
            assert!(matches!(e.action(), Action::Retry { quota: false, .. }));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sender.send(body("fine")).await.ok(), Some(Outcome::Sent));
    emulator.script("gone", Script::Unregistered);
    assert_eq!(sender.send(body("gone")).await.ok(), Some(Outcome::Dead));
    emulator.script(
        "busy",
        Script::Unavailable {
            times: 1,
            retry_after_secs: Some(7),
        },
    );
    match sender.send(body("busy")).await {
        Err(Error::Retryable { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(7)));
        }
        other => panic!("{other:?}"),
    }
    let versions: HashSet<String> = emulator
        .messages("h1-typed")
        .into_iter()
        .map(|m| m.http_version)
        .collect();
    assert_eq!(versions, HashSet::from(["HTTP/1.1".to_string()]));
    assert!(
        sender.metrics().connections_opened.get() >= 2,
        "the timed-out connection was replaced"
    );
}
