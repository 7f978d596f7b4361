//! Text in the user's language (README, "The document contract"): `notification_title_i18n` /
//! `notification_text_i18n` pick each recipient's text by the user document's language field,
//! read back from what the FCM emulator accepted per token; the user documents are read once
//! per user and only for documents with translations (`ffpush_user_documents_read_total`);
//! bad maps and a language over FCM's size limit fail the document before any send.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use ffpush::daemon::Daemon;
use ffpush::model::pb;
use ffpush::model::pb::value::ValueType;
use ffpush::store;

use crate::{TestApp, assert_succeeded, ffpush_send, num, s, text};

const CONSOLE: &str = "ff_push_notifications";
const APP: &str = "ff_user_push_notifications";

fn map(pairs: &[(&str, &str)]) -> pb::Value {
    let fields: HashMap<String, pb::Value> =
        pairs.iter().map(|(k, v)| (k.to_string(), s(v))).collect();
    pb::Value {
        value_type: Some(ValueType::MapValue(pb::MapValue { fields })),
    }
}

fn boolean(b: bool) -> pb::Value {
    pb::Value {
        value_type: Some(ValueType::BooleanValue(b)),
    }
}

/// German and Portuguese titles and texts; no French.
fn translations() -> Vec<(&'static str, pb::Value)> {
    vec![
        (
            "notification_title_i18n",
            map(&[("de", "Hallo"), ("pt", "Olá")]),
        ),
        (
            "notification_text_i18n",
            map(&[("de", "Neue Nachricht"), ("pt", "Nova mensagem")]),
        ),
    ]
}

/// The users of every test: ana (de, two devices), bruno (pt-BR: the `pt` text), chloe (fr:
/// no translation), dan (a user document without the field), eve (tokens, no user document).
const USERS: [(&str, Option<&str>); 5] = [
    ("ana", Some("de")),
    ("bruno", Some("pt-BR")),
    ("chloe", Some("fr")),
    ("dan", None),
    ("eve", None),
];

async fn users(app: &TestApp) {
    for (user, language) in USERS {
        if user != "eve" {
            let mut f = HashMap::new();
            f.insert("display_name".to_string(), s(user));
            if let Some(language) = language {
                f.insert("language".to_string(), s(language));
            }
            app.store
                .set(&format!("users/{user}"), f)
                .await
                .expect("writing a user");
        }
        app.add_token(user, "t1", &token(app, user, 1), "iOS").await;
    }
    app.add_token("ana", "t2", &token(app, "ana", 2), "Android")
        .await;
}

fn token(app: &TestApp, user: &str, n: u32) -> String {
    format!("{}-{user}-{n}", app.project)
}

/// (title, body) of each message FCM accepted (not validate-only) after the first `from`, by
/// token; `silent`: read from `data` instead of `notification`.
fn shown(app: &TestApp, from: usize, silent: bool) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for m in app.fcm().messages(&app.project).into_iter().skip(from) {
        if m.validate_only {
            continue;
        }
        let block = if silent {
            &m.message["data"]
        } else {
            &m.message["notification"]
        };
        let pair = (
            block["title"].as_str().unwrap_or_default().to_string(),
            block["body"].as_str().unwrap_or_default().to_string(),
        );
        let token = m.token.unwrap_or_default();
        assert!(
            out.insert(token.clone(), pair).is_none(),
            "{token} got two messages"
        );
    }
    out
}

/// What every user of [`USERS`] must have got from a document titled `plain` / `x`.
fn expected(app: &TestApp, plain: &str) -> BTreeMap<String, (String, String)> {
    let pair = |t: &str, b: &str| (t.to_string(), b.to_string());
    let german = pair("Hallo", "Neue Nachricht");
    [
        (token(app, "ana", 1), german.clone()),
        (token(app, "ana", 2), german),
        (token(app, "bruno", 1), pair("Olá", "Nova mensagem")),
        (token(app, "chloe", 1), pair(plain, "x")),
        (token(app, "dan", 1), pair(plain, "x")),
        (token(app, "eve", 1), pair(plain, "x")),
    ]
    .into()
}

async fn user_reads(daemon: &Daemon) -> f64 {
    let series = "ffpush_user_documents_read_total";
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

fn refs() -> pb::Value {
    store::array(
        USERS
            .iter()
            .map(|(u, _)| s(&format!("users/{u}")))
            .collect(),
    )
}

#[tokio::test]
async fn each_user_gets_the_text_of_their_language_else_of_its_primary_subtag_else_the_plain_one() {
    let app = TestApp::new().await;
    users(&app).await;
    let (worker, _) = app.start_worker().await;
    // Without translations: nobody's language is read.
    let plain = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Plain")),
                ("notification_text", s("x")),
                ("user_refs", refs()),
            ],
        )
        .await;
    assert_succeeded(&app.finished(&plain).await);
    assert_eq!(user_reads(&worker).await, 0.0);
    let from = app.fcm().messages(&app.project).len();

    // fay speaks German but has no device: her document is not read.
    let mut fay = HashMap::new();
    fay.insert("language".to_string(), s("de"));
    app.store
        .set("users/fay", fay)
        .await
        .expect("writing a user");
    let mut with_fay = USERS.map(|(u, _)| format!("users/{u}")).to_vec();
    with_fay.push("users/fay".into());
    let doc = app
        .write(
            CONSOLE,
            [
                vec![
                    ("notification_title", s("Hello")),
                    ("notification_text", s("x")),
                    ("user_refs", s(&with_fay.join(","))),
                ],
                translations(),
            ]
            .concat(),
        )
        .await;
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some(6));
    assert_eq!(shown(&app, from, false), expected(&app, "Hello"));
    // Each listed user's document with a device once (eve's, missing, too).
    assert_eq!(user_reads(&worker).await, 5.0);
}

#[tokio::test]
async fn a_broadcast_reads_each_users_language_once_and_only_when_it_has_translations() {
    let app = TestApp::new().await;
    users(&app).await;
    let (worker, _) = app.start_worker().await;
    let plain = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Plain")),
                ("notification_text", s("x")),
                ("target_audience", s("All")),
            ],
        )
        .await;
    assert_succeeded(&app.finished(&plain).await);
    assert_eq!(shown(&app, 0, false).len(), 6);
    assert_eq!(
        user_reads(&worker).await,
        0.0,
        "a plain broadcast reads no user"
    );
    let from = app.fcm().messages(&app.project).len();

    let doc = app
        .write(
            CONSOLE,
            [
                vec![
                    ("notification_title", s("Everyone")),
                    ("notification_text", s("x")),
                    ("target_audience", s("All")),
                ],
                translations(),
            ]
            .concat(),
        )
        .await;
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(shown(&app, from, false), expected(&app, "Everyone"));
    // Five users, ana with two devices: read once each.
    assert_eq!(user_reads(&worker).await, 5.0);
}

#[tokio::test]
async fn bad_translations_and_a_language_over_the_size_limit_fail_before_any_send() {
    let app = TestApp::new().await;
    users(&app).await;
    let (_worker, _) = app.start_worker().await;
    let long = "ü".repeat(2100);
    let cases: Vec<(pb::Value, pb::Value, &str)> = vec![
        (
            s("Hallo"),
            map(&[("de", "x")]),
            "notification_title_i18n must be a map from language code to text",
        ),
        (
            map(&[("de", "Hallo")]),
            map(&[("german", "x")]),
            "notification_text_i18n key \"german\" is not a language code",
        ),
        (
            map(&[("de", "")]),
            map(&[("de", "x")]),
            "notification_title_i18n.de is empty",
        ),
        (
            pb::Value {
                value_type: Some(ValueType::MapValue(pb::MapValue {
                    fields: [("de".to_string(), crate::int(1))].into(),
                })),
            },
            map(&[("de", "x")]),
            "notification_title_i18n.de must be a string, not an integer",
        ),
        (
            map(&[("de", "Hallo")]),
            map(&[("de", &long)]),
            "in notification_title_i18n.de with notification_text_i18n.de: the message is",
        ),
        (
            map(&[("de", "Hallo")]),
            map(&[("pt", &long)]),
            "in notification_text_i18n.pt: the message is",
        ),
    ];
    let mut docs = Vec::new();
    for (collection, (title, body, expected)) in [CONSOLE, APP].into_iter().cycle().zip(cases) {
        let mut fields = vec![
            ("notification_title", s("Hello")),
            ("notification_text", s("x")),
            ("user_refs", refs()),
            ("notification_title_i18n", title),
            ("notification_text_i18n", body),
        ];
        if collection == APP {
            fields.push(("sender", store::reference(app.store.doc_name("users/ana"))));
        }
        docs.push((app.write(collection, fields).await, expected));
    }
    for (doc, expected) in docs {
        let done = app.finished(&doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("failed"), "{doc}");
        let error = text(&done, "error").unwrap_or_default();
        assert!(error.starts_with(expected), "{doc}: {error}");
        assert!(!error.contains('\n'));
        assert_eq!(num(&done, "num_sent").unwrap_or(0), 0);
    }
    assert!(app.fcm().messages(&app.project).is_empty());
}

#[tokio::test]
async fn silent_scheduled_and_dry_run_documents_are_localized_too() {
    let app = TestApp::new().await;
    users(&app).await;
    let (worker, _) = app.start_worker().await;
    // Silent, from the app: the text goes to data.title / data.body, in the user's language.
    let silent = app
        .write(
            APP,
            [
                vec![
                    ("silent", boolean(true)),
                    ("notification_title", s("Quiet")),
                    ("notification_text", s("x")),
                    ("user_refs", refs()),
                    ("sender", store::reference(app.store.doc_name("users/dan"))),
                ],
                translations(),
            ]
            .concat(),
        )
        .await;
    assert_succeeded(&app.finished(&silent).await);
    assert_eq!(shown(&app, 0, true), expected(&app, "Quiet"));
    let from = app.fcm().messages(&app.project).len();

    // Scheduled a moment ahead.
    let scheduled = app
        .write(
            CONSOLE,
            [
                vec![
                    ("notification_title", s("Later")),
                    ("notification_text", s("x")),
                    ("user_refs", refs()),
                    (
                        "scheduled_time",
                        store::timestamp(Utc::now() + chrono::Duration::seconds(2)),
                    ),
                ],
                translations(),
            ]
            .concat(),
        )
        .await;
    assert_succeeded(&app.finished(&scheduled).await);
    assert_eq!(shown(&app, from, false), expected(&app, "Later"));
    let from = app.fcm().messages(&app.project).len();

    // A dry run validates the message its first recipient (ana) would get, reading the
    // language of the users it tries only: the first five tokens' (not eve's).
    let reads = user_reads(&worker).await;
    let dry = app
        .write(
            CONSOLE,
            [
                vec![
                    ("notification_title", s("Check")),
                    ("notification_text", s("x")),
                    ("user_refs", refs()),
                    ("dry_run", boolean(true)),
                ],
                translations(),
            ]
            .concat(),
        )
        .await;
    let done = app.finished(&dry).await;
    assert_eq!(text(&done, "status").as_deref(), Some("validated"));
    let validated: Vec<_> = app
        .fcm()
        .messages(&app.project)
        .into_iter()
        .skip(from)
        .map(|m| (m.validate_only, m.message["notification"]["title"].clone()))
        .collect();
    assert_eq!(validated, vec![(true, serde_json::json!("Hallo"))]);
    assert_eq!(num(&done, "num_tokens"), Some(6));
    assert_eq!(user_reads(&worker).await - reads, 4.0);
}

#[tokio::test]
async fn a_send_resumed_after_a_takeover_picks_the_same_languages() {
    let app = TestApp::new().await;
    users(&app).await;
    // Another worker claimed it, sent ana's first token, and died: its lease ran out.
    let done_before = app.store.doc_name("users/ana/fcm_tokens/t1");
    let progress = pb::Value {
        value_type: Some(ValueType::MapValue(pb::MapValue {
            fields: [
                ("cursor".to_string(), s(&done_before)),
                ("tokens".to_string(), crate::int(1)),
                ("sent".to_string(), crate::int(1)),
            ]
            .into(),
        })),
    };
    let doc = app
        .write(
            CONSOLE,
            [
                vec![
                    ("notification_title", s("Resumed")),
                    ("notification_text", s("x")),
                    ("user_refs", refs()),
                    ("status", s("started")),
                    ("ffpush_worker", s("another/1/00000000")),
                    (
                        "ffpush_lease_expires_at",
                        store::timestamp(Utc::now() - chrono::Duration::seconds(1)),
                    ),
                    ("ffpush_progress", progress),
                ],
                translations(),
            ]
            .concat(),
        )
        .await;
    let (_worker, _) = app.start_worker().await;
    let done = app.finished(&doc).await;
    assert_succeeded(&done);
    assert_eq!(num(&done, "num_sent"), Some(6));
    let mut rest = expected(&app, "Resumed");
    rest.remove(&token(&app, "ana", 1));
    assert_eq!(shown(&app, 0, false), rest);
}

#[tokio::test]
async fn ffpush_send_takes_the_translations_as_flags() {
    let app = TestApp::new().await;
    users(&app).await;
    let (_worker, _) = app.start_worker().await;
    let app = std::sync::Arc::new(app);
    let run = |args: &'static [&'static str]| {
        let app = app.clone();
        tokio::task::spawn_blocking(move || ffpush_send(&app, args))
    };
    let out = run(&[
        "--title",
        "Hello",
        "--text",
        "x",
        "--user",
        "ana",
        "--user",
        "bruno",
        "--user",
        "chloe",
        "--title-i18n",
        "de=Hallo",
        "--title-i18n",
        "pt=Olá",
        "--text-i18n",
        "de=Neue Nachricht",
        "--text-i18n",
        "pt=Nova mensagem",
        "--wait",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = expected(&app, "Hello");
    want.remove(&token(&app, "dan", 1));
    want.remove(&token(&app, "eve", 1));
    assert_eq!(shown(&app, 0, false), want);
    let out = run(&[
        "--title",
        "t",
        "--text",
        "x",
        "--user",
        "ana",
        "--text-i18n",
        "Hallo",
    ])
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--text-i18n \"Hallo\": use KEY=VALUE, e.g. --text-i18n pt-BR=Olá"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_user_whose_tokens_span_two_pages_is_read_once() {
    let app = TestApp::new().await;
    users(&app).await;
    let metrics = std::sync::Arc::new(ffpush::metrics::Metrics::default());
    let reader = ffpush::language::LanguageReader::new(
        app.store.clone(),
        "language".into(),
        metrics.clone(),
    );
    let page = |entries: &[(&str, u32)]| -> Vec<store::DeviceToken> {
        entries
            .iter()
            .map(|(user, n)| store::DeviceToken {
                doc_name: app.store.doc_name(&format!("users/{user}/fcm_tokens/t{n}")),
                token: token(&app, user, *n),
            })
            .collect()
    };
    let first = reader
        .languages(&page(&[("ana", 1), ("bruno", 1)]))
        .await
        .unwrap();
    let second = reader
        .languages(&page(&[("bruno", 2), ("chloe", 1), ("dan", 1), ("eve", 1)]))
        .await
        .unwrap();
    let codes = |l: Vec<ffpush::language::Language>| -> Vec<Option<String>> {
        l.into_iter().map(|c| c.map(|c| c.to_string())).collect()
    };
    assert_eq!(
        codes(first),
        vec![Some("de".to_string()), Some("pt-BR".to_string())]
    );
    assert_eq!(
        codes(second),
        vec![
            Some("pt-BR".to_string()),
            Some("fr".to_string()),
            None,
            None
        ]
    );
    // bruno, on both pages, once: five users, five documents.
    assert_eq!(metrics.user_documents_read.get(), 5);
}
