//! What an app user writing `ff_user_push_notifications` can make the worker spend, with no
//! security rules in front of it: recipients per document, documents per minute per sender,
//! document size, what the outcome tells the sender, and memory for far-future schedules.

use std::time::Duration;

use chrono::Utc;
use ffpush::store;

use crate::{TestApp, num, s, text};

const CONSOLE: &str = "ff_push_notifications";
const APP: &str = "ff_user_push_notifications";

/// An app document as FlutterFlow's "Trigger Push Notification" action writes it.
async fn app_notification(
    app: &TestApp,
    title: &str,
    user_refs: &str,
    sender: Option<&str>,
) -> String {
    let mut fields = vec![
        ("notification_title", s(title)),
        ("notification_text", s("x")),
        ("user_refs", s(user_refs)),
        ("timestamp", store::timestamp(Utc::now())),
    ];
    if let Some(sender) = sender {
        fields.push(("sender", store::reference(app.store.doc_name(sender))));
    }
    app.write(APP, fields).await
}

fn titles(app: &TestApp) -> Vec<String> {
    let mut t: Vec<String> = app.delivered().into_iter().map(|(_, t)| t).collect();
    t.sort();
    t
}

#[tokio::test]
async fn app_documents_naming_more_users_than_the_cap_fail_unsent() {
    let app = TestApp::with(|s| s.max_app_recipients = 3).await;
    for u in ["u1", "u2", "u3", "u4"] {
        app.add_token(u, "t", &format!("{}-{u}", app.project), "iOS")
            .await;
    }
    let (worker, _) = app.start_worker().await;
    let over = app
        .write(
            APP,
            vec![
                ("notification_title", s("too many")),
                ("notification_text", s("x")),
                // Five entries, four users: the cap counts users.
                (
                    "user_refs",
                    s("users/u1,users/u2,users/u3,users/u4,users/u1"),
                ),
                ("sender", store::reference(app.store.doc_name("users/s1"))),
            ],
        )
        .await;
    let at_cap = app
        .write(
            APP,
            vec![
                ("notification_title", s("three")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1,users/u2,users/u3,users/u1")),
                ("sender", store::reference(app.store.doc_name("users/s1"))),
            ],
        )
        .await;
    let console = app
        .notify("console", "users/u1,users/u2,users/u3,users/u4")
        .await;

    let refused = app.finished(&over).await;
    assert_eq!(text(&refused, "status").as_deref(), Some("failed"));
    let error = text(&refused, "error").unwrap_or_default();
    assert!(
        error.contains("4 users") && error.contains("FFPUSH_MAX_APP_RECIPIENTS"),
        "{error}"
    );
    assert_eq!(num(&refused, "num_sent"), Some(0));
    let sent = app.finished(&at_cap).await;
    assert_eq!(text(&sent, "status").as_deref(), Some("succeeded"));
    let sent = app.finished(&console).await;
    assert_eq!(
        text(&sent, "status").as_deref(),
        Some("succeeded"),
        "the console collection has no cap"
    );
    let delivered = titles(&app);
    assert_eq!(delivered.iter().filter(|t| *t == "three").count(), 3);
    assert_eq!(delivered.iter().filter(|t| *t == "console").count(), 4);
    assert!(
        !delivered.iter().any(|t| t == "too many"),
        "nothing of the refused document is sent"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_sender_over_the_rate_gets_the_excess_failed_unsent() {
    let app = TestApp::with(|s| s.sender_rate = 2).await;
    app.add_token("u1", "t", &format!("{}-u1", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let mut chatty = Vec::new();
    for i in 0..5 {
        chatty
            .push(app_notification(&app, &format!("s1 #{i}"), "users/u1", Some("users/s1")).await);
    }
    let other = app_notification(&app, "s2", "users/u1", Some("users/s2")).await;
    let mut anonymous = Vec::new();
    for i in 0..3 {
        anonymous.push(app_notification(&app, &format!("none #{i}"), "users/u1", None).await);
    }

    let mut outcomes = Vec::new();
    for doc in chatty.iter().chain(&anonymous) {
        let done = app.finished(doc).await;
        outcomes.push((
            text(&done, "notification_title").unwrap_or_default(),
            text(&done, "status").unwrap_or_default(),
            text(&done, "error").unwrap_or_default(),
            num(&done, "num_sent"),
        ));
    }
    let succeeded = |prefix: &str| {
        outcomes
            .iter()
            .filter(|(t, status, _, _)| t.starts_with(prefix) && status == "succeeded")
            .count()
    };
    assert_eq!(succeeded("s1 #"), 2, "{outcomes:#?}");
    assert_eq!(
        succeeded("none #"),
        2,
        "documents without a sender share one allowance: {outcomes:#?}"
    );
    for (title, status, error, sent) in &outcomes {
        if status != "succeeded" {
            assert_eq!(status, "failed", "{title}");
            assert!(error.contains("FFPUSH_SENDER_RATE"), "{title}: {error}");
            assert_eq!(*sent, Some(0), "{title}");
        }
    }
    let done = app.finished(&other).await;
    assert_eq!(
        text(&done, "status").as_deref(),
        Some("succeeded"),
        "another sender has an allowance of its own"
    );
    let delivered = titles(&app);
    assert_eq!(
        delivered.len(),
        2 + 1 + 2,
        "only the admitted documents were sent: {delivered:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn app_documents_get_counts_of_users_without_tokens_never_their_names() {
    let app = TestApp::new().await;
    app.add_token("u1", "t", &format!("{}-u1", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let some = app_notification(&app, "some", "users/u1,users/ghost", Some("users/s1")).await;
    let none = app_notification(&app, "none", "users/ghost,users/phantom", Some("users/s1")).await;

    let done = app.finished(&some).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    assert_eq!(num(&done, "num_users_without_tokens"), Some(1));
    assert!(
        !done.fields.contains_key("users_without_tokens"),
        "{:?}",
        done.fields.get("users_without_tokens")
    );
    let warning = text(&done, "warning").unwrap_or_default();
    assert!(
        warning.contains("1 user(s) have no device token") && !warning.contains("ghost"),
        "{warning}"
    );

    let failed = app.finished(&none).await;
    assert_eq!(text(&failed, "status").as_deref(), Some("failed"));
    assert_eq!(num(&failed, "num_users_without_tokens"), Some(2));
    assert!(!failed.fields.contains_key("users_without_tokens"));
    let error = text(&failed, "error").unwrap_or_default();
    assert!(
        error.contains("no device tokens")
            && error.contains("2 user(s)")
            && !error.contains("ghost")
            && !error.contains("phantom"),
        "{error}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn oversize_app_documents_are_failed_before_their_audience_is_read() {
    let app = TestApp::new().await;
    app.add_token("u1", "t", &format!("{}-u1", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let sender = || store::reference(app.store.doc_name("users/s1"));
    // One user named 6 000 times: few recipients, but a 50 KB document.
    let repeated = vec!["users/u1"; 6000].join(",");
    let long_refs = app
        .write(
            APP,
            vec![
                ("notification_title", s("long refs")),
                ("notification_text", s("x")),
                ("user_refs", s(&repeated)),
                ("sender", sender()),
            ],
        )
        .await;
    let padded = app
        .write(
            APP,
            vec![
                ("notification_title", s("padded")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("sender", sender()),
                ("padding", s(&"p".repeat(100_000))),
            ],
        )
        .await;
    let long_title = app
        .write(
            APP,
            vec![
                ("notification_title", s(&"t".repeat(300_000))),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("sender", sender()),
            ],
        )
        .await;
    for doc in [&long_refs, &padded, &long_title] {
        let done = app.finished(doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("failed"), "{doc}");
        let error = text(&done, "error").unwrap_or_default();
        assert!(
            error.contains("bytes") && error.contains("at most"),
            "{doc}: {error}"
        );
        assert_eq!(num(&done, "num_sent"), Some(0));
        assert!(
            !done.fields.contains_key("num_tokens"),
            "{doc}: the audience was read"
        );
        assert!(
            !done.fields.contains_key("started_at"),
            "{doc}: the document was claimed"
        );
    }
    assert!(app.delivered().is_empty(), "{:?}", app.delivered());
    // The same padding on a console document is the operator's business.
    let console = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("console padded")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("padding", s(&"p".repeat(100_000))),
            ],
        )
        .await;
    let done = app.finished(&console).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    worker.stop().await;
}

#[tokio::test]
async fn far_future_documents_hold_no_timer_and_are_still_sent_when_due() {
    let app = TestApp::with(|s| {
        s.sweep_interval = Duration::from_millis(500);
        s.schedule_window = Duration::from_secs(2);
    })
    .await;
    app.add_token("u1", "t", &format!("{}-u1", app.project), "iOS")
        .await;
    let (worker, _) = app.start_worker().await;
    let due = Utc::now() + chrono::Duration::seconds(12);
    let later = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("later")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("scheduled_time", store::timestamp(due)),
            ],
        )
        .await;
    let years = app
        .write(
            APP,
            vec![
                ("notification_title", s("year 9999")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
                ("sender", store::reference(app.store.doc_name("users/s1"))),
                (
                    "scheduled_time",
                    store::timestamp(
                        "9999-01-01T00:00:00Z"
                            .parse::<chrono::DateTime<Utc>>()
                            .expect("a date"),
                    ),
                ),
            ],
        )
        .await;
    // Documents arrive in order on the listen stream: once this one is sent, the worker has
    // seen both scheduled ones.
    let now = app.notify("now", "users/u1").await;
    app.finished(&now).await;
    let scheduled = || worker.worker.metrics.documents_scheduled.get();
    assert_eq!(
        scheduled(),
        0,
        "documents due beyond FFPUSH_SCHEDULE_WINDOW must hold no timer"
    );

    let done = app.finished(&later).await;
    assert_eq!(text(&done, "status").as_deref(), Some("succeeded"));
    let sent = app
        .fcm()
        .messages(&app.project)
        .into_iter()
        .find(|m| m.message["notification"]["title"] == "later")
        .expect("sent when due");
    assert!(
        sent.received_at >= due,
        "sent at {} before its time {due}",
        sent.received_at
    );
    let far = app.store.get(&years).await.unwrap().unwrap();
    assert_eq!(text(&far, "status"), None, "the year-9999 one waits");
    assert_eq!(scheduled(), 0);
    worker.stop().await;
}
