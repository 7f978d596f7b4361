//! The message options (docs/contract.md, "The document contract"): each field of a
//! notification document reaches FCM exactly where the contract maps it, read back from what
//! the FCM emulator (which validates them as FCM and APNs do) accepted; each bad value fails
//! the document with one line naming the field, and nothing is sent.

use std::collections::HashMap;

use chrono::Utc;
use ffpush::model::pb;
use ffpush::model::pb::value::ValueType;
use serde_json::{Value, json};

use crate::{TestApp, assert_succeeded, ffpush_send, int, num, s, text};

const CONSOLE: &str = "ff_push_notifications";
const APP: &str = "ff_user_push_notifications";

fn boolean(b: bool) -> pb::Value {
    pb::Value {
        value_type: Some(ValueType::BooleanValue(b)),
    }
}

fn map(pairs: &[(&str, pb::Value)]) -> pb::Value {
    let fields: HashMap<String, pb::Value> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    pb::Value {
        value_type: Some(ValueType::MapValue(pb::MapValue { fields })),
    }
}

fn to_alice(title: &str, extra: Vec<(&'static str, pb::Value)>) -> Vec<(&'static str, pb::Value)> {
    [
        vec![
            ("notification_title", s(title)),
            ("notification_text", s("x")),
            ("user_refs", s("users/alice")),
        ],
        extra,
    ]
    .concat()
}

/// The one message FCM accepted for `doc_title` (by `notification.title`, else `data.title`).
fn message_titled(app: &TestApp, doc_title: &str) -> Value {
    let found: Vec<Value> = app
        .fcm()
        .messages(&app.project)
        .into_iter()
        .map(|m| m.message)
        .filter(|m| m["notification"]["title"] == doc_title || m["data"]["title"] == doc_title)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one message titled {doc_title:?}: {found:?}"
    );
    found.into_iter().next().unwrap_or_default()
}

/// Replaces `apns-expiration` (the send time plus `ttl`) with `"<now+ttl>"` after checking it
/// lies between the two times given.
fn expiration_checked(mut message: Value, ttl: i64, from: i64, to: i64) -> Value {
    let header = &mut message["apns"]["headers"]["apns-expiration"];
    let at: i64 = header.as_str().unwrap_or_default().parse().unwrap_or(-1);
    assert!(
        (from + ttl..=to + ttl).contains(&at),
        "apns-expiration {at} should be the send time + {ttl} ({from}..={to})"
    );
    *header = json!(format!("<now+{ttl}>"));
    message
}

#[tokio::test]
async fn every_option_reaches_fcm_where_the_contract_maps_it_from_both_collections() {
    let app = TestApp::new().await;
    let token = format!("{}-alice", app.project);
    app.add_token("alice", "t1", &token, "iOS").await;
    let (worker, _) = app.start_worker().await;
    let options = || {
        vec![
            ("notification_sound", s("default")),
            ("initial_page_name", s("ChatPage")),
            ("notification_badge", int(3)),
            ("android_channel_id", s("chat")),
            ("priority", s("high")),
            ("ttl_seconds", int(3600)),
            ("collapse_key", s("score")),
            ("data", map(&[("kind", s("chat")), ("chatId", s("c42"))])),
            ("analytics_label", s("spring-sale")),
        ]
    };
    let before = Utc::now().timestamp();
    let console = app.write(CONSOLE, to_alice("console", options())).await;
    let mut from_app = to_alice("app", options());
    from_app.push((
        "sender",
        ffpush::store::reference(app.store.doc_name("users/bob")),
    ));
    let from_app = app.write(APP, from_app).await;
    let normal = app
        .write(
            CONSOLE,
            to_alice(
                "normal",
                vec![("priority", s("normal")), ("ttl_seconds", int(0))],
            ),
        )
        .await;
    for doc in [&console, &from_app, &normal] {
        let done = app.finished(doc).await;
        assert_succeeded(&done);
        assert_eq!(num(&done, "num_sent"), Some(1));
    }
    let after = Utc::now().timestamp();
    for title in ["console", "app"] {
        let message = expiration_checked(message_titled(&app, title), 3600, before, after);
        assert_eq!(
            message,
            json!({
                "token": token,
                "notification": {"title": title, "body": "x"},
                "data": {"initialPageName": "ChatPage", "parameterData": "", "kind": "chat", "chatId": "c42"},
                "android": {
                    "notification": {"sound": "default", "channel_id": "chat", "notification_count": 3},
                    "priority": "HIGH",
                    "ttl": "3600s",
                    "collapse_key": "score",
                },
                "apns": {
                    "headers": {"apns-priority": "10", "apns-expiration": "<now+3600>", "apns-collapse-id": "score"},
                    "payload": {"aps": {"sound": "default", "badge": 3}},
                },
                "fcm_options": {"analytics_label": "spring-sale"},
            }),
            "{title}"
        );
    }
    assert_eq!(
        message_titled(&app, "normal"),
        json!({
            "token": token,
            "notification": {"title": "normal", "body": "x"},
            "data": {"initialPageName": "", "parameterData": ""},
            "android": {"priority": "NORMAL", "ttl": "0s"},
            "apns": {"headers": {"apns-priority": "5", "apns-expiration": "0"}},
        })
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_document_without_options_sends_flutterflows_message() {
    let app = TestApp::new().await;
    let token = format!("{}-alice", app.project);
    app.add_token("alice", "t1", &token, "Android").await;
    let (worker, _) = app.start_worker().await;
    let doc = app
        .write(
            CONSOLE,
            to_alice(
                "plain",
                vec![
                    ("notification_image_url", s("https://example.com/a.png")),
                    ("notification_sound", s("default")),
                    ("parameter_data", s("{\"a\":1}")),
                ],
            ),
        )
        .await;
    assert_succeeded(&app.finished(&doc).await);
    assert_eq!(
        message_titled(&app, "plain"),
        json!({
            "token": token,
            "notification": {"title": "plain", "body": "x", "image": "https://example.com/a.png"},
            "data": {"initialPageName": "", "parameterData": "{\"a\":1}"},
            "android": {"notification": {"sound": "default"}},
            "apns": {"payload": {"aps": {"sound": "default"}}},
        })
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_silent_push_is_data_only_a_background_push_and_needs_no_text() {
    let app = TestApp::new().await;
    let token = format!("{}-alice", app.project);
    app.add_token("alice", "t1", &token, "iOS").await;
    let (worker, _) = app.start_worker().await;
    let with_text = app
        .write(
            CONSOLE,
            to_alice(
                "silent",
                vec![
                    ("silent", boolean(true)),
                    ("priority", s("high")),
                    ("data", map(&[("sync", s("inbox"))])),
                ],
            ),
        )
        .await;
    let bare = app
        .write(
            APP,
            vec![
                ("user_refs", s("users/alice")),
                ("silent", boolean(true)),
                ("collapse_key", s("bare-sync")),
            ],
        )
        .await;
    for doc in [&with_text, &bare] {
        assert_succeeded(&app.finished(doc).await);
    }
    assert_eq!(
        message_titled(&app, "silent"),
        json!({
            "token": token,
            "data": {"initialPageName": "", "parameterData": "", "sync": "inbox", "title": "silent", "body": "x"},
            "android": {"priority": "HIGH"},
            "apns": {
                "headers": {"apns-priority": "5", "apns-push-type": "background"},
                "payload": {"aps": {"content-available": 1}},
            },
        })
    );
    let bare: Vec<Value> = app
        .fcm()
        .messages(&app.project)
        .into_iter()
        .map(|m| m.message)
        .filter(|m| m["android"]["collapse_key"] == "bare-sync")
        .collect();
    assert_eq!(
        bare,
        vec![json!({
            "token": token,
            "data": {"initialPageName": "", "parameterData": ""},
            "android": {"collapse_key": "bare-sync"},
            "apns": {
                "headers": {"apns-priority": "5", "apns-push-type": "background", "apns-collapse-id": "bare-sync"},
                "payload": {"aps": {"content-available": 1}},
            },
        })]
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_topic_or_a_condition_is_one_request_and_never_beside_other_recipients() {
    let app = TestApp::new().await;
    // Tokens that a broadcast would reach: a topic must not.
    app.add_token("alice", "t1", &format!("{}-alice", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let title = |t: &str| vec![("notification_title", s(t)), ("notification_text", s("x"))];
    let topic = app
        .write(
            CONSOLE,
            [
                title("to a topic"),
                vec![("target_topic", s("news")), ("priority", s("high"))],
            ]
            .concat(),
        )
        .await;
    let condition_text = "'news' in topics && ('sport' in topics || 'music' in topics)";
    let condition = app
        .write(
            CONSOLE,
            [
                title("to a condition"),
                vec![("target_condition", s(condition_text))],
            ]
            .concat(),
        )
        .await;
    for doc in [&topic, &condition] {
        let done = app.finished(doc).await;
        assert_succeeded(&done);
        assert_eq!(
            (num(&done, "num_tokens"), num(&done, "num_sent")),
            (Some(1), Some(1)),
            "one request"
        );
    }
    assert_eq!(
        message_titled(&app, "to a topic"),
        json!({
            "topic": "news",
            "notification": {"title": "to a topic", "body": "x"},
            "data": {"initialPageName": "", "parameterData": ""},
            "android": {"priority": "HIGH"},
            "apns": {"headers": {"apns-priority": "10"}},
        })
    );
    assert_eq!(
        message_titled(&app, "to a condition"),
        json!({
            "condition": condition_text,
            "notification": {"title": "to a condition", "body": "x"},
            "data": {"initialPageName": "", "parameterData": ""},
        })
    );
    assert_eq!(
        app.fcm().attempts(&app.project).len(),
        2,
        "no token was sent"
    );

    let refused = [
        (
            CONSOLE,
            [
                title("beside users"),
                vec![("target_topic", s("news")), ("user_refs", s("users/alice"))],
            ]
            .concat(),
            "target_topic cannot be used with user_refs",
        ),
        (
            CONSOLE,
            [
                title("beside a broadcast"),
                vec![
                    ("target_condition", s("'news' in topics")),
                    ("target_audience", s("All")),
                ],
            ]
            .concat(),
            "target_condition cannot be used with target_audience",
        ),
        (
            APP,
            [
                title("from the app"),
                vec![("target_topic", s("news")), ("user_refs", s("users/alice"))],
            ]
            .concat(),
            "target_topic is for ff_push_notifications only",
        ),
        (
            APP,
            [
                title("from the app"),
                vec![("target_condition", s("'news' in topics"))],
            ]
            .concat(),
            "target_condition is for ff_push_notifications only",
        ),
    ];
    for (collection, fields, expected) in refused {
        let doc = app.write(collection, fields).await;
        let done = app.finished(&doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("failed"), "{doc}");
        let error = text(&done, "error").unwrap_or_default();
        assert!(error.starts_with(expected), "{doc}: {error}");
    }
    assert_eq!(
        app.fcm().attempts(&app.project).len(),
        2,
        "nothing more sent"
    );
    worker.stop().await;
}

#[tokio::test]
async fn each_bad_value_fails_the_document_with_one_line_and_nothing_is_sent() {
    let app = TestApp::new().await;
    app.add_token("alice", "t1", &format!("{}-alice", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let cases: Vec<(&str, pb::Value, &str)> = vec![
        (
            "notification_badge",
            int(-1),
            "notification_badge must be a whole number from 0 to 2147483647, not -1",
        ),
        (
            "notification_badge",
            s("3"),
            "notification_badge must be a whole number from 0 to 2147483647, not a string",
        ),
        (
            "android_channel_id",
            int(7),
            "android_channel_id must be a string, not an integer",
        ),
        (
            "priority",
            s("urgent"),
            "priority must be \"high\" or \"normal\", not \"urgent\"",
        ),
        (
            "ttl_seconds",
            int(2_419_201),
            "ttl_seconds must be a whole number from 0 to 2419200 seconds (28 days; 0: now or never), not 2419201",
        ),
        (
            "ttl_seconds",
            int(-5),
            "ttl_seconds must be a whole number from 0 to 2419200 seconds (28 days; 0: now or never), not -5",
        ),
        (
            "collapse_key",
            s(&"k".repeat(65)),
            "collapse_key must be at most 64 bytes (APNs' limit on apns-collapse-id), not 65 bytes",
        ),
        (
            "silent",
            s("yes"),
            "silent must be true or false, not a string",
        ),
        (
            "data",
            s("kind=chat"),
            "data must be a map of string values, not a string",
        ),
        (
            "data",
            map(&[("count", int(2))]),
            "data.count must be a string (FCM's data values are strings), not an integer",
        ),
        (
            "data",
            map(&[("initialPageName", s("Home"))]),
            "data key \"initialPageName\" cannot be used: it is set from initial_page_name / parameter_data; set those fields instead",
        ),
        (
            "data",
            map(&[("parameterData", s("{}"))]),
            "data key \"parameterData\" cannot be used",
        ),
        (
            "data",
            map(&[("from", s("x"))]),
            "data key \"from\" cannot be used: FCM reserves from, notification, message_type and keys starting with google or gcm",
        ),
        (
            "data",
            map(&[("notification", s("x"))]),
            "data key \"notification\" cannot be used: FCM reserves",
        ),
        (
            "data",
            map(&[("message_type", s("x"))]),
            "data key \"message_type\" cannot be used: FCM reserves",
        ),
        (
            "data",
            map(&[("google.c.a.e", s("1"))]),
            "data key \"google.c.a.e\" cannot be used: FCM reserves",
        ),
        (
            "data",
            map(&[("gcm.n.e", s("1"))]),
            "data key \"gcm.n.e\" cannot be used: FCM reserves",
        ),
        (
            "analytics_label",
            s("spring sale!"),
            "analytics_label must be 1 to 50 letters, digits or - _ . ~ % (FCM's ^[a-zA-Z0-9-_.~%]{1,50}$), not \"spring sale!\"",
        ),
        (
            "target_topic",
            s("/topics/news"),
            "target_topic must be a topic name of letters, digits and - _ . ~ % (e.g. news, without /topics/), not \"/topics/news\"",
        ),
        (
            "target_condition",
            s("news && sport"),
            "target_condition must be up to 5 topics as 'a' in topics, joined with && and || (and ! or parentheses), e.g. 'a' in topics && ('b' in topics || 'c' in topics); \"news && sport\": expected 'topic' in topics",
        ),
    ];
    let mut docs = Vec::new();
    for (field, value, expected) in &cases {
        let mut fields = vec![
            ("notification_title", s("bad")),
            ("notification_text", s("x")),
            (*field, value.clone()),
        ];
        // A topic or condition is its own audience; everything else goes to alice.
        if !field.starts_with("target_") {
            fields.push(("user_refs", s("users/alice")));
        }
        docs.push((app.write(CONSOLE, fields).await, *field, *expected));
    }
    // Silent messages show nothing: the parts that would are refused beside them.
    for field in [
        "notification_sound",
        "notification_image_url",
        "notification_badge",
        "android_channel_id",
    ] {
        let value = if field == "notification_badge" {
            int(1)
        } else {
            s("x")
        };
        let fields = to_alice("bad", vec![("silent", boolean(true)), (field, value)]);
        docs.push((app.write(CONSOLE, fields).await, field, "cannot be used with silent: true (a silent push shows nothing, plays no sound and sets no badge); remove one of them"));
    }
    for (doc, field, expected) in &docs {
        let done = app.finished(doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("failed"), "{field}");
        let error = text(&done, "error").unwrap_or_default();
        assert!(
            error.starts_with(expected) || error.starts_with(&format!("{field} {expected}")),
            "{field}: {error:?} should start with {expected:?}"
        );
        assert!(!error.contains('\n'), "{error:?}");
        assert_eq!(num(&done, "num_sent"), Some(0));
    }
    assert!(
        app.fcm().attempts(&app.project).is_empty(),
        "a bad value must not reach FCM"
    );
    worker.stop().await;
}

#[tokio::test]
async fn the_payload_check_counts_every_option_sent() {
    let app = TestApp::new().await;
    app.add_token("alice", "t1", &format!("{}-alice", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    // Fits without the options; over FCM's 4096 bytes with them.
    let fields = to_alice(
        "big",
        vec![
            ("parameter_data", s(&"p".repeat(3500))),
            ("data", map(&[("extra", s(&"d".repeat(300)))])),
            ("collapse_key", s(&"c".repeat(64))),
            ("analytics_label", s(&"a".repeat(50))),
            ("ttl_seconds", int(60)),
        ],
    );
    let doc = app.write(CONSOLE, fields).await;
    let done = app.finished(&doc).await;
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    let error = text(&done, "error").unwrap_or_default();
    assert!(
        error.starts_with("the message is ") && error.contains("over FCM's 4096-byte limit"),
        "{error}"
    );
    assert!(app.fcm().attempts(&app.project).is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn ffpush_send_has_a_flag_for_each_option() {
    let app = TestApp::new().await;
    let token = format!("{}-alice", app.project);
    app.add_token("alice", "t1", &token, "Android").await;
    let (worker, _) = app.start_worker().await;
    let app = std::sync::Arc::new(app);
    let run = |args: &'static [&'static str]| {
        let app = app.clone();
        tokio::task::spawn_blocking(move || ffpush_send(&app, args))
    };
    let before = Utc::now().timestamp();
    let out = run(&[
        "--title",
        "flags",
        "--text",
        "x",
        "--user",
        "alice",
        "--badge",
        "2",
        "--channel",
        "news",
        "--priority",
        "normal",
        "--ttl",
        "600",
        "--collapse-key",
        "k1",
        "--data",
        "kind=chat",
        "--data",
        "id=a=b",
        "--analytics-label",
        "cli",
        "--wait",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = Utc::now().timestamp();
    assert_eq!(
        expiration_checked(message_titled(&app, "flags"), 600, before, after),
        json!({
            "token": token,
            "notification": {"title": "flags", "body": "x"},
            "data": {"initialPageName": "", "parameterData": "", "kind": "chat", "id": "a=b"},
            "android": {
                "notification": {"channel_id": "news", "notification_count": 2},
                "priority": "NORMAL",
                "ttl": "600s",
                "collapse_key": "k1",
            },
            "apns": {
                "headers": {"apns-priority": "5", "apns-expiration": "<now+600>", "apns-collapse-id": "k1"},
                "payload": {"aps": {"badge": 2}},
            },
            "fcm_options": {"analytics_label": "cli"},
        })
    );
    let out = run(&["--silent", "--user", "alice", "--data", "sync=1", "--wait"])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "--title", "topic", "--text", "x", "--topic", "news", "--wait",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "--title",
        "condition",
        "--text",
        "x",
        "--condition",
        "'a' in topics || 'b' in topics",
        "--wait",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let messages = app.fcm().messages(&app.project);
    assert!(messages.iter().any(|m| m.message["data"]["sync"] == "1"
        && m.message.get("notification").is_none()
        && m.message["apns"]["headers"]["apns-push-type"] == "background"));
    assert!(messages.iter().any(|m| m.topic.as_deref() == Some("news")));
    assert!(
        messages
            .iter()
            .any(|m| m.message["condition"] == "'a' in topics || 'b' in topics")
    );

    // A bad value is refused before anything is written: exit 64, one line naming the field.
    for (args, says) in [
        (
            &[
                "--title",
                "t",
                "--text",
                "x",
                "--user",
                "alice",
                "--priority",
                "urgent",
            ][..],
            "priority must be \"high\" or \"normal\"",
        ),
        (
            &[
                "--title", "t", "--text", "x", "--user", "alice", "--ttl", "9999999",
            ][..],
            "ttl_seconds must be a whole number from 0 to 2419200",
        ),
        (
            &[
                "--title", "t", "--text", "x", "--user", "alice", "--data", "from=x",
            ][..],
            "data key \"from\" cannot be used",
        ),
        (
            &[
                "--title", "t", "--text", "x", "--user", "alice", "--data", "novalue",
            ][..],
            "--data \"novalue\": use KEY=VALUE",
        ),
        (
            &[
                "--title", "t", "--text", "x", "--topic", "news", "--user", "alice",
            ][..],
            "--topic and --condition are their own audience",
        ),
        (
            &["--title", "t", "--text", "x", "--topic", "/topics/news"][..],
            "target_topic must be a topic name",
        ),
        (
            &["--user", "alice"][..],
            "--title is required (except with --silent)",
        ),
    ] {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let app = app.clone();
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ffpush_send(&app, &args)
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{says}: {stderr}");
        assert!(stderr.contains(says), "{stderr:?} should say {says:?}");
    }
    assert_eq!(
        app.fcm().messages(&app.project).len(),
        4,
        "nothing more was written or sent"
    );
    worker.stop().await;
}
