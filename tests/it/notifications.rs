//! FlutterFlow's documents end to end: Firestore emulator → ffpush → FCM emulator → status.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use ffpush::dev::fcm_emulator::Script;
use ffpush::store;

use crate::{TestApp, assert_succeeded, int, num, s, text};

const CONSOLE: &str = "ff_push_notifications";
const APP: &str = "ff_user_push_notifications";

/// The fixture's three token documents.
async fn fixture_tokens(app: &TestApp, prefix: &str) {
    app.add_token("u1", "t1", &format!("{prefix}-u1-android"), "Android")
        .await;
    app.add_token("u1", "t2", &format!("{prefix}-u1-ios"), "iOS")
        .await;
    app.add_token("u2", "t1", &format!("{prefix}-u2-ios"), "iOS")
        .await;
}

fn tokens_of(delivered: &[(String, String)], title: &str) -> Vec<String> {
    let mut t: Vec<String> = delivered
        .iter()
        .filter(|(_, ti)| ti == title)
        .map(|(t, _)| t.clone())
        .collect();
    t.sort();
    t
}

#[tokio::test]
async fn console_targeted_reaches_every_device_of_both_users_with_flutterflows_message() {
    let app = TestApp::new().await;
    let p = &app.project.clone();
    fixture_tokens(&app, p).await;
    let (worker, _) = app.start_worker().await;
    let doc = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Hello")),
                ("notification_text", s("Just for you two")),
                ("user_refs", s("users/u1,users/u2")),
                ("initial_page_name", s("ChatPage")),
                ("parameter_data", s("{\"chatRef\":\"chats/c42\"}")),
            ],
        )
        .await;
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some(3));
    assert_eq!(num(&done, "num_tokens"), Some(3));
    assert_eq!(num(&done, "num_failed"), Some(0));
    assert_eq!(num(&done, "num_tokens_removed"), Some(0));
    assert!(store::timestamp_field(&done, "started_at").is_some());
    assert!(store::timestamp_field(&done, "completed_at").is_some());
    assert!(!done.fields.contains_key("error"));
    assert!(!done.fields.contains_key("ffpush_lease_expires_at"));
    let messages = app.fcm().messages(p);
    assert_eq!(messages.len(), 3);
    let m = messages
        .iter()
        .find(|m| m.token.as_deref() == Some(&format!("{p}-u2-ios")))
        .expect("u2 got it");
    assert_eq!(
        m.message,
        serde_json::json!({
            "token": format!("{p}-u2-ios"),
            "notification": {"title": "Hello", "body": "Just for you two"},
            "data": {"initialPageName": "ChatPage", "parameterData": "{\"chatRef\":\"chats/c42\"}"}
        })
    );
    worker.stop().await;
}

#[tokio::test]
async fn console_broadcast_sends_image_and_sound_to_every_token() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    fixture_tokens(&app, &p).await;
    let (worker, _) = app.start_worker().await;
    let doc = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Big news")),
                ("notification_text", s("Version 2 is out")),
                (
                    "notification_image_url",
                    s("https://example.com/banner.png"),
                ),
                ("notification_sound", s("default")),
                ("target_audience", s("All")),
                ("initial_page_name", s("HomePage")),
                ("parameter_data", s("{}")),
            ],
        )
        .await;
    let done = app.finished(&doc).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    assert_eq!(num(&done, "num_sent"), Some(3));
    let messages = app.fcm().messages(&p);
    assert_eq!(messages.len(), 3);
    for m in messages {
        assert_eq!(
            m.message["notification"]["image"],
            "https://example.com/banner.png"
        );
        assert_eq!(m.message["android"]["notification"]["sound"], "default");
        assert_eq!(m.message["apns"]["payload"]["aps"]["sound"], "default");
        assert_eq!(m.message["data"]["initialPageName"], "HomePage");
    }
    worker.stop().await;
}

#[tokio::test]
async fn broadcast_to_one_device_type_only() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    fixture_tokens(&app, &p).await;
    let (worker, _) = app.start_worker().await;
    let doc = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("iOS only")),
                ("notification_text", s("x")),
                ("target_audience", s("iOS")),
            ],
        )
        .await;
    let done = app.finished(&doc).await;
    assert_eq!(num(&done, "num_sent"), Some(2));
    assert_eq!(
        tokens_of(&app.delivered(), "iOS only"),
        vec![format!("{p}-u1-ios"), format!("{p}-u2-ios")]
    );
    worker.stop().await;
}

#[tokio::test]
async fn app_action_goes_to_the_listed_user_and_app_documents_are_never_broadcast() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    fixture_tokens(&app, &p).await;
    let (worker, _) = app.start_worker().await;
    let sender = store::reference(app.store.doc_name("users/u2"));
    let action = app
        .write(
            APP,
            vec![
                ("notification_title", s("New comment")),
                ("notification_text", s("Ana commented on your post")),
                ("user_refs", s("users/u1")),
                ("initial_page_name", s("PostPage")),
                ("parameter_data", s("{\"postRef\":\"posts/p7\"}")),
                ("sender", sender),
                ("timestamp", store::timestamp(Utc::now())),
            ],
        )
        .await;
    let broadcast = app
        .write(
            APP,
            vec![
                ("notification_title", s("Everyone!")),
                ("notification_text", s("x")),
            ],
        )
        .await;
    let done = app.finished(&action).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    assert_eq!(num(&done, "num_sent"), Some(2));
    let refused = app.finished(&broadcast).await;
    assert_eq!(text(&refused, "status").as_deref(), Some("failed"));
    assert!(
        text(&refused, "error")
            .unwrap_or_default()
            .contains("never broadcast")
    );
    assert!(tokens_of(&app.delivered(), "Everyone!").is_empty());
    assert_eq!(
        tokens_of(&app.delivered(), "New comment"),
        vec![format!("{p}-u1-android"), format!("{p}-u1-ios")]
    );
    worker.stop().await;
}

#[tokio::test]
async fn scheduled_in_the_past_is_sent_and_in_the_future_is_not_sent_early() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    fixture_tokens(&app, &p).await;
    let (worker, _) = app.start_worker().await;
    let past = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Reminder")),
                ("notification_text", s("Your appointment is in one hour")),
                ("user_refs", s("users/u2")),
                (
                    "scheduled_time",
                    store::timestamp(Utc::now() - chrono::Duration::minutes(5)),
                ),
            ],
        )
        .await;
    let due = Utc::now() + chrono::Duration::seconds(3);
    let future = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Later")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u2")),
                ("scheduled_time", store::timestamp(due)),
            ],
        )
        .await;
    let done = app.finished(&past).await;
    assert_eq!(num(&done, "num_sent"), Some(1));
    let early = app.store.get(&future).await.unwrap().unwrap();
    assert!(
        text(&early, "status").is_none(),
        "a future notification must not be touched before its time"
    );
    let sent = app.finished(&future).await;
    assert_eq!(text(&sent, "status").as_deref(), Some("succeeded"));
    let message = app
        .fcm()
        .messages(&p)
        .into_iter()
        .find(|m| m.message["notification"]["title"] == "Later")
        .unwrap();
    assert!(
        message.received_at >= due,
        "sent at {} before its time {due}",
        message.received_at
    );
    worker.stop().await;
}

#[tokio::test]
async fn dead_tokens_are_removed_and_other_token_errors_counted() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let t = |n: &str| format!("{p}-{n}");
    app.add_token("u1", "a", &t("unregistered"), "Android")
        .await;
    app.add_token("u1", "b", &t("invalid"), "iOS").await;
    app.add_token("u1", "c", &t("mismatch"), "Android").await;
    app.add_token("u1", "d", &t("apns"), "iOS").await;
    app.add_token("u1", "e", &t("quota"), "iOS").await;
    app.add_token("u1", "f", &t("unavailable"), "iOS").await;
    app.add_token("u1", "g", &t("internal"), "iOS").await;
    app.add_token("u1", "h", &t("fine"), "iOS").await;
    // The same dead token under another user is dead there too.
    app.add_token("u2", "a", &t("unregistered"), "Android")
        .await;
    let fcm = app.fcm();
    fcm.script(&t("unregistered"), Script::Unregistered);
    fcm.script(&t("invalid"), Script::InvalidToken);
    fcm.script(&t("mismatch"), Script::SenderIdMismatch);
    fcm.script(&t("apns"), Script::ThirdPartyAuthError);
    fcm.script(
        &t("quota"),
        Script::QuotaExceeded {
            retry_after_secs: 1,
            times: 1,
        },
    );
    fcm.script(
        &t("unavailable"),
        Script::Unavailable {
            times: 2,
            retry_after_secs: None,
        },
    );
    fcm.script(&t("internal"), Script::Internal { times: 1 });
    let (worker, _) = app.start_worker().await;
    let doc = app.notify("Mixed", "users/u1").await;
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_tokens"), Some(8));
    assert_eq!(
        num(&done, "num_sent"),
        Some(4),
        "quota, unavailable and internal recover after retries"
    );
    assert_eq!(num(&done, "num_failed"), Some(4));
    assert_eq!(
        num(&done, "num_tokens_removed"),
        Some(3),
        "both documents of the unregistered token and the invalid one"
    );
    let warning = text(&done, "warning").unwrap_or_default();
    assert!(
        warning.contains("THIRD_PARTY_AUTH_ERROR") && warning.contains("SENDER_ID_MISMATCH"),
        "{warning}"
    );
    let mut left = app.token_docs("u1").await;
    left.sort();
    let mut expected = vec![
        t("apns"),
        t("fine"),
        t("internal"),
        t("mismatch"),
        t("quota"),
        t("unavailable"),
    ];
    expected.sort();
    assert_eq!(left, expected);
    assert!(app.token_docs("u2").await.is_empty());
    let attempts = fcm.attempts(&p);
    let count = |tok: &str| {
        attempts
            .iter()
            .filter(|a| a.token.as_deref() == Some(tok))
            .count()
    };
    assert_eq!(count(&t("unavailable")), 3);
    assert_eq!(count(&t("quota")), 2);
    assert_eq!(count(&t("mismatch")), 1, "a final answer is not retried");
    assert_eq!(
        error_counts(&done),
        [
            ("INVALID_ARGUMENT", 1),
            ("SENDER_ID_MISMATCH", 1),
            ("THIRD_PARTY_AUTH_ERROR", 1),
            ("UNREGISTERED", 1),
        ]
        .map(|(c, n)| (c.to_string(), n))
        .into(),
        "final answers only: the retried ones that recovered are not counted"
    );
    worker.stop().await;
}

/// The `error_counts` map of a finished document (empty when it has none).
fn error_counts(doc: &ffpush::model::pb::Document) -> std::collections::BTreeMap<String, i64> {
    use ffpush::model::pb::value::ValueType;
    match doc
        .fields
        .get("error_counts")
        .and_then(|v| v.value_type.as_ref())
    {
        Some(ValueType::MapValue(m)) => m
            .fields
            .iter()
            .map(|(k, v)| match v.value_type {
                Some(ValueType::IntegerValue(n)) => (k.clone(), n),
                _ => panic!("{k} is not a count: {v:?}"),
            })
            .collect(),
        None => Default::default(),
        other => panic!("error_counts is not a map: {other:?}"),
    }
}

#[tokio::test]
async fn tokens_whose_retries_ran_out_are_counted_by_their_last_answer() {
    let app = TestApp::with(|s| {
        s.max_attempts = 2;
        s.fcm_timeout = Duration::from_millis(700);
        s.max_backoff = Duration::from_millis(200);
        s.quota_floor = Duration::from_millis(100);
        s.retry_budget = Duration::from_secs(3);
    })
    .await;
    let p = app.project.clone();
    let t = |n: &str| format!("{p}-{n}");
    for (i, name) in ["quota", "unavailable", "internal", "hung", "fine"]
        .iter()
        .enumerate()
    {
        app.add_token("u1", &format!("t{i}"), &t(name), "iOS").await;
    }
    let fcm = app.fcm();
    fcm.script(
        &t("quota"),
        Script::QuotaExceeded {
            retry_after_secs: 1,
            times: 1000,
        },
    );
    fcm.script(
        &t("unavailable"),
        Script::Unavailable {
            times: 1000,
            retry_after_secs: None,
        },
    );
    fcm.script(&t("internal"), Script::Internal { times: 1000 });
    fcm.script(&t("hung"), Script::Hang);
    let (worker, _) = app.start_worker().await;
    let doc = app.notify("Retries run out", "users/u1").await;
    let done = app.finished(&doc).await;
    fcm.clear_script(&t("hung"));
    for name in ["quota", "unavailable", "internal"] {
        fcm.clear_script(&t(name));
    }
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    assert_eq!(num(&done, "num_sent"), Some(1));
    assert_eq!(num(&done, "num_tokens"), Some(5));
    assert_eq!(
        error_counts(&done),
        [
            ("INTERNAL", 1),
            ("QUOTA_EXCEEDED", 1),
            ("TIMEOUT", 1),
            ("UNAVAILABLE", 1),
        ]
        .map(|(c, n)| (c.to_string(), n))
        .into()
    );
    let error = text(&done, "error").unwrap_or_default();
    assert!(
        error.contains("3 undelivered")
            && error.contains("1 timed out; they may have been delivered"),
        "{error}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_token_shared_by_two_users_is_sent_once_and_users_without_tokens_are_listed() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let shared = format!("{p}-shared");
    app.add_token("u1", "a", &shared, "iOS").await;
    app.add_token("u2", "a", &shared, "iOS").await;
    app.add_token("u2", "b", &shared, "iOS").await;
    let (worker, _) = app.start_worker().await;
    let doc = app.notify("Once", "users/u1, users/u2, users/nobody").await;
    let done = app.finished(&doc).await;
    assert_eq!(num(&done, "num_sent"), Some(1));
    assert_eq!(num(&done, "num_tokens"), Some(1));
    assert_eq!(num(&done, "num_users_without_tokens"), Some(1));
    assert_eq!(tokens_of(&app.delivered(), "Once"), vec![shared]);
    let listed = done
        .fields
        .get("users_without_tokens")
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed, store::array(vec![s("users/nobody")]));

    let nobody = app.notify("Void", "users/nobody").await;
    let failed = app.finished(&nobody).await;
    assert_eq!(text(&failed, "status").as_deref(), Some("failed"));
    let error = text(&failed, "error").unwrap_or_default();
    assert!(
        error.contains("users/nobody") && error.contains("no device tokens"),
        "{error}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_user_with_hundreds_of_tokens_gets_every_one_once_among_other_users() {
    use futures::StreamExt as _;
    let app = TestApp::new().await;
    let p = app.project.clone();
    // More than a user's first page, and more than a full page after it.
    let many: Vec<String> = (0..650).map(|i| format!("{p}-many-{i:04}")).collect();
    futures::stream::iter(&many)
        .map(|t| app.add_token("u2", &t[t.len() - 4..], t, "Android"))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    app.add_token("u1", "a", &format!("{p}-u1"), "iOS").await;
    app.add_token("u3", "a", &format!("{p}-u3"), "iOS").await;
    let (worker, _) = app.start_worker().await;
    let doc = app.notify("Many", "users/u1,users/u2,users/u3").await;
    let done = app.finished(&doc).await;
    assert_eq!(num(&done, "num_sent"), Some(652));
    let mut expected = many.clone();
    expected.extend([format!("{p}-u1"), format!("{p}-u3")]);
    expected.sort();
    assert_eq!(tokens_of(&app.delivered(), "Many"), expected);
    worker.stop().await;
}

#[tokio::test]
async fn batch_slices_cover_every_user_exactly_once() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    // Ids across the alphabet, at and around FlutterFlow's bounds for 10 batches.
    let ids = [
        "0", "00", "5x", "Ia", "Ib", "Ib0", "Q", "Zz", "a", "ab", "m", "tm", "tn", "z", "zz", "~",
    ];
    for id in ids {
        app.add_token(id, "t", &format!("{p}-{id}"), "iOS").await;
    }
    let (worker, _) = app.start_worker().await;
    let mut docs = Vec::new();
    for i in 0..10 {
        docs.push(
            app.write(
                CONSOLE,
                vec![
                    ("notification_title", s("Batch")),
                    ("notification_text", s("x")),
                    ("target_audience", s("All")),
                    ("batch_index", int(i)),
                    ("num_batches", int(10)),
                ],
            )
            .await,
        );
    }
    let mut total = 0;
    for doc in &docs {
        let done = app.finished(doc).await;
        let sent = num(&done, "num_sent").unwrap_or(-1);
        if sent == 0 {
            assert_eq!(
                text(&done, "status").as_deref(),
                Some("failed"),
                "an empty slice says so"
            );
        }
        total += sent;
    }
    assert_eq!(total, ids.len() as i64);
    let mut delivered = tokens_of(&app.delivered(), "Batch");
    let before = delivered.len();
    delivered.dedup();
    assert_eq!(before, delivered.len(), "a token was sent by two slices");
    assert_eq!(delivered.len(), ids.len());
    worker.stop().await;
}

#[tokio::test]
async fn bad_documents_fail_with_one_actionable_line_and_the_next_one_is_sent() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    fixture_tokens(&app, &p).await;
    let (worker, _) = app.start_worker().await;
    let cases: Vec<(Vec<(&str, ffpush::model::pb::Value)>, &str)> = vec![
        (
            vec![("notification_text", s("x")), ("user_refs", s("users/u1"))],
            "notification_title is missing",
        ),
        (
            vec![
                ("notification_title", s("")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
            ],
            "notification_title is missing",
        ),
        (
            vec![
                ("notification_title", s("t")),
                ("notification_text", int(5)),
                ("user_refs", s("users/u1")),
            ],
            "notification_text must be a string",
        ),
        (
            vec![
                ("notification_title", s("t")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1,chats")),
            ],
            "\"chats\" is not a user document path",
        ),
        (
            vec![
                ("notification_title", s("t")),
                ("notification_text", s("x")),
                ("user_refs", int(3)),
            ],
            "user_refs must be",
        ),
        (
            vec![
                ("notification_title", s("t")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("parameter_data", s(&"y".repeat(5000))),
            ],
            "4096-byte limit",
        ),
        (
            vec![
                ("notification_title", s("t")),
                ("notification_text", s("x")),
                ("batch_index", s("1")),
                ("num_batches", int(2)),
            ],
            "batch_index must be a whole number",
        ),
        (
            vec![
                ("notification_title", s("t")),
                ("notification_text", s("x")),
                ("num_batches", store::timestamp(Utc::now())),
            ],
            "num_batches must be a whole number",
        ),
        (
            vec![
                ("notification_title", s("t")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("scheduled_time", s("tomorrow")),
            ],
            "scheduled_time must be a Firestore timestamp",
        ),
    ];
    let mut written = Vec::new();
    for (fields, _) in &cases {
        written.push(app.write(CONSOLE, fields.clone()).await);
    }
    let good = app.notify("Still fine", "users/u2").await;
    for (doc, (_, expected)) in written.iter().zip(&cases) {
        let done = app.finished(doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("failed"));
        let error = text(&done, "error").unwrap_or_default();
        assert!(
            error.contains(expected),
            "{doc}: {error:?} should mention {expected:?}"
        );
        assert!(!error.contains('\n'));
    }
    let done = app.finished(&good).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    assert_eq!(
        tokens_of(&app.delivered(), "t"),
        Vec::<String>::new(),
        "nothing of the bad ones was sent"
    );
    worker.stop().await;
}

#[tokio::test]
async fn finished_documents_are_left_untouched() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    fixture_tokens(&app, &p).await;
    let old = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Old")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("status", s("succeeded")),
            ],
        )
        .await;
    let cancelled = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Nope")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("status", s("cancelled")),
            ],
        )
        .await;
    let before = app.store.get(&old).await.unwrap().unwrap().update_time;
    let (worker, _) = app.start_worker().await;
    let marker = app.notify("Marker", "users/u2").await;
    app.finished(&marker).await;
    assert_eq!(
        app.store.get(&old).await.unwrap().unwrap().update_time,
        before
    );
    assert_eq!(
        text(&app.store.get(&cancelled).await.unwrap().unwrap(), "status").as_deref(),
        Some("cancelled")
    );
    assert_eq!(app.delivered().len(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn two_workers_racing_on_twenty_documents_deliver_each_exactly_once() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    fixture_tokens(&app, &p).await;
    let (a, _) = app.start_worker().await;
    let (b, _) = app.start_worker().await;
    let mut docs = Vec::new();
    for i in 0..20 {
        docs.push(app.notify(&format!("race-{i}"), "users/u1,users/u2").await);
    }
    let mut workers = HashMap::new();
    for doc in &docs {
        let done = app.finished(doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
        *workers
            .entry(text(&done, "ffpush_worker").unwrap_or_default())
            .or_insert(0) += 1;
    }
    let delivered = app.delivered();
    for i in 0..20 {
        let tokens = tokens_of(&delivered, &format!("race-{i}"));
        assert_eq!(tokens.len(), 3, "race-{i}: {tokens:?}");
        let mut unique = tokens.clone();
        unique.dedup();
        assert_eq!(unique, tokens, "race-{i} was delivered twice to one token");
    }
    assert_eq!(delivered.len(), 60);
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_expired_access_token_is_refreshed_once_and_the_send_succeeds() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    fixture_tokens(&app, &p).await;
    let (worker, _) = app.start_worker().await;
    let first = app.notify("One", "users/u2").await;
    app.finished(&first).await;
    let issued = app.fcm().tokens_issued();
    app.fcm().revoke_access_tokens();
    let second = app.notify("Two", "users/u2").await;
    let done = app.finished(&second).await;
    assert_succeeded(&done);
    assert!(
        app.fcm().tokens_issued() > issued,
        "a new token was fetched from the token endpoint"
    );
    worker.stop().await;
}

/// A map field of string → string, as a notification's `data`.
fn string_map(entries: &[(&str, &str)]) -> ffpush::model::pb::Value {
    use ffpush::model::pb;
    pb::Value {
        value_type: Some(pb::value::ValueType::MapValue(pb::MapValue {
            fields: entries.iter().map(|(k, v)| (k.to_string(), s(v))).collect(),
        })),
    }
}

fn boolean(b: bool) -> ffpush::model::pb::Value {
    ffpush::model::pb::Value {
        value_type: Some(ffpush::model::pb::value::ValueType::BooleanValue(b)),
    }
}

#[tokio::test]
async fn a_dry_run_counts_the_devices_validates_the_message_and_delivers_nothing() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let t = |n: &str| format!("{p}-{n}");
    // The first token in path order is dead: the message is validated on the next one, and
    // the dead one is kept (a dry run removes nothing).
    app.add_token("u1", "a", &t("dead"), "Android").await;
    app.add_token("u1", "b", &t("u1-ios"), "iOS").await;
    app.add_token("u2", "a", &t("u1-ios"), "iOS").await;
    app.add_token("u2", "b", &t("u2-android"), "Android").await;
    let fcm = app.fcm();
    fcm.script(&t("dead"), Script::Unregistered);
    let (worker, _) = app.start_worker().await;
    let doc = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Check me")),
                ("notification_text", s("first")),
                ("user_refs", s("users/u1,users/u2,users/ghost")),
                ("dry_run", boolean(true)),
            ],
        )
        .await;
    let done = app.finished(&doc).await;
    assert_eq!(
        text(&done, "status").as_deref(),
        Some("validated"),
        "{:?}",
        text(&done, "error")
    );
    assert_eq!(
        num(&done, "num_tokens"),
        Some(3),
        "unique tokens, as a send"
    );
    assert_eq!(num(&done, "num_sent"), Some(0));
    assert_eq!(num(&done, "num_failed"), Some(0));
    assert_eq!(num(&done, "num_users_without_tokens"), Some(1));
    assert!(text(&done, "error").is_none());
    assert!(app.delivered().is_empty(), "nothing delivered");
    let validated: Vec<_> = fcm
        .messages(&p)
        .into_iter()
        .filter(|m| m.validate_only)
        .collect();
    assert_eq!(validated.len(), 1, "validated on one token");
    assert_eq!(validated[0].message["notification"]["title"], "Check me");
    assert_eq!(app.token_docs("u1").await.len(), 2, "the dead token kept");
    fcm.clear_script(&t("dead"));
    worker.stop().await;
}

#[tokio::test]
async fn a_dry_run_of_a_message_fcm_refuses_fails_with_fcms_error() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    let (worker, _) = app.start_worker().await;
    // FCM takes at most 2048 bytes to a topic; ffpush checks the 4096 bytes of a token message.
    let pad = "x".repeat(3000);
    let doc = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Too big for a topic")),
                ("notification_text", s("x")),
                ("target_topic", s(&format!("{p}-news"))),
                ("data", string_map(&[("pad", &pad)])),
                ("dry_run", boolean(true)),
            ],
        )
        .await;
    let done = app.finished(&doc).await;
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    let error = text(&done, "error").unwrap_or_default();
    assert!(
        error.contains("FCM rejected the message") && error.contains("too large"),
        "{error}"
    );
    assert_eq!(num(&done, "num_sent"), Some(0));
    assert!(app.delivered().is_empty());
    worker.stop().await;
}

/// A mistaken broadcast can be stopped: `status: "cancelled"` set while it is being sent stops
/// the fan-out at the next lease renewal; the document keeps `cancelled` and gets the counts
/// of what was sent, and nothing more is sent.
#[tokio::test]
async fn a_notification_cancelled_while_it_is_sent_stops_and_keeps_its_counts() {
    use futures::StreamExt as _;
    const TOKENS: usize = 300;
    const RATE: u32 = 20;
    let app = TestApp::with(|s| {
        s.fcm_rate = RATE;
        s.concurrency = 4;
    })
    .await;
    let tokens: Vec<String> = (0..TOKENS)
        .map(|i| format!("{}-slow-{i:03}", app.project))
        .collect();
    futures::stream::iter(tokens.iter().enumerate())
        .for_each_concurrent(16, |(i, token)| {
            let app = &app;
            async move {
                app.add_token("many", &format!("t{i:03}"), token, "Android")
                    .await
            }
        })
        .await;
    let (worker, _) = app.start_worker().await;
    let doc = app.notify("Sent by mistake", "users/many").await;
    let name = app.store.doc_name(&doc);
    crate::wait_until(Duration::from_secs(60), || app.delivered().len() >= 10).await;
    let mut cancel = HashMap::new();
    cancel.insert("status".to_string(), s("cancelled"));
    app.store
        .update_existing(&name, cancel, &[])
        .await
        .expect("the console's cancel");
    let cancelled_at = Utc::now();
    // `cancelled` is final from the start: wait for the counts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let doc = app
            .store
            .get(&doc)
            .await
            .unwrap()
            .expect("the notification");
        if num(&doc, "num_sent").is_some() {
            break doc;
        }
        assert!(tokio::time::Instant::now() < deadline, "no counts written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Nothing goes out once the counts are written.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let messages = app.fcm().messages(&app.project);
    let last = messages.iter().map(|m| m.received_at).max().unwrap();
    let stopped_after = (last - cancelled_at).num_milliseconds() as f64 / 1000.0;
    eprintln!(
        "cancelled after {} of {TOKENS} sends at {RATE}/s: the last send arrived {stopped_after:.2} s after the cancel; {} sent in all",
        10,
        messages.len()
    );
    assert_eq!(text(&done, "status").as_deref(), Some("cancelled"));
    assert_eq!(
        num(&done, "num_sent"),
        Some(messages.len() as i64),
        "every send counted"
    );
    assert!(
        messages.len() < TOKENS / 2,
        "stopped long before the end: {} sent",
        messages.len()
    );
    assert!(text(&done, "ffpush_lease_expires_at").is_none());
    assert!(!done.fields.contains_key("ffpush_lease_expires_at"));
    assert!(!done.fields.contains_key("ffpush_progress"));
    assert!(text(&done, "error").is_none());
    worker.stop().await;
}
