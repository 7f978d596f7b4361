//! FlutterFlow fidelity: documents shaped the way FlutterFlow projects write them behave as with
//! the generated functions, or better, never in a way that surprises an app.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use ffpush::model::Slice;
use ffpush::store;

use crate::{TestApp, assert_succeeded, int, num, s, text, wait_until};

const CONSOLE: &str = "ff_push_notifications";

/// A token document under the user document at `user` (any document path).
async fn token_at(app: &TestApp, user: &str, id: &str, token: &str, device: &str) {
    let mut f = HashMap::new();
    f.insert("fcm_token".to_string(), s(token));
    f.insert("device_type".to_string(), s(device));
    f.insert("created_at".to_string(), store::timestamp(Utc::now()));
    app.store
        .set(&format!("{user}/fcm_tokens/{id}"), f)
        .await
        .expect("writing a token");
}

fn delivered_to(app: &TestApp, title: &str) -> Vec<String> {
    let mut tokens: Vec<String> = app
        .delivered()
        .into_iter()
        .filter(|(_, t)| t == title)
        .map(|(token, _)| token)
        .collect();
    tokens.sort();
    tokens
}

fn title_text(title: &str) -> Vec<(&'static str, ffpush::model::pb::Value)> {
    vec![
        ("notification_title", s(title)),
        ("notification_text", s("x")),
    ]
}

#[tokio::test]
async fn a_document_without_an_audience_reaches_nobody_and_says_how_to_address_it() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    for (user, device) in [("u1", "Android"), ("u2", "iOS"), ("u3", "all"), ("u4", "")] {
        token_at(
            &app,
            &format!("users/{user}"),
            "t",
            &format!("{p}-{user}"),
            device,
        )
        .await;
    }
    let (worker, _) = app.start_worker().await;
    let nothing = app.write(CONSOLE, title_text("nothing")).await;
    let empty = app
        .write(
            CONSOLE,
            [
                title_text("empty"),
                vec![("user_refs", s("")), ("target_audience", s(""))],
            ]
            .concat(),
        )
        .await;
    let batch = app
        .write(
            CONSOLE,
            [
                title_text("batch"),
                vec![("batch_index", int(0)), ("num_batches", int(2))],
            ]
            .concat(),
        )
        .await;
    for doc in [&nothing, &empty, &batch] {
        let done = app.finished(doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("failed"), "{doc}");
        let error = text(&done, "error").unwrap_or_default();
        for says in ["user_refs", "target_audience", "All", "iOS", "Android"] {
            assert!(error.contains(says), "{doc}: {error:?} should name {says}");
        }
        assert!(!error.contains('\n'), "{error:?}");
    }
    assert!(
        app.fcm().attempts(&p).is_empty(),
        "a document without an audience must not reach FCM at all"
    );

    // "All" exactly is everyone; any other value is a device_type, matched exactly.
    let lower = app
        .write(
            CONSOLE,
            [title_text("lower"), vec![("target_audience", s("all"))]].concat(),
        )
        .await;
    let all = app
        .write(
            CONSOLE,
            [title_text("All"), vec![("target_audience", s("All"))]].concat(),
        )
        .await;
    let done = app.finished(&lower).await;
    assert_eq!(
        num(&done, "num_sent"),
        Some(1),
        "{:?}",
        text(&done, "error")
    );
    assert_eq!(delivered_to(&app, "lower"), vec![format!("{p}-u3")]);
    let done = app.finished(&all).await;
    assert_eq!(
        num(&done, "num_sent"),
        Some(4),
        "{:?}",
        text(&done, "error")
    );
    let nobody = app
        .write(
            CONSOLE,
            [title_text("web"), vec![("target_audience", s("Web"))]].concat(),
        )
        .await;
    let done = app.finished(&nobody).await;
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    let error = text(&done, "error").unwrap_or_default();
    assert!(error.contains("\"Web\""), "{error:?}");
    worker.stop().await;
}

/// Ids across the alphabet, at and around FlutterFlow's bounds for 10 batches.
const IDS: [&str; 12] = [
    "0", "00", "5x", "Ia", "Ib", "Ib0", "Zz", "a", "m", "tm", "tn", "zz",
];

/// Sends `count` batch documents over the users collection `users` and checks each slice
/// reached exactly the users FlutterFlow's bounds put in it.
async fn batches_follow_flutterflows_bounds(app: &TestApp, users: &str, count: u32) {
    let p = app.project.clone();
    for id in IDS {
        token_at(
            app,
            &format!("{users}/{id}"),
            "t",
            &format!("{p}-{id}"),
            "iOS",
        )
        .await;
    }
    let title = format!("batch of {count}");
    let mut docs = Vec::new();
    for i in 0..count {
        let fields = [
            title_text(&title),
            vec![
                ("target_audience", s("All")),
                ("batch_index", int(i64::from(i))),
                ("num_batches", int(i64::from(count))),
            ],
        ]
        .concat();
        docs.push(app.write(CONSOLE, fields).await);
    }
    for (i, doc) in docs.iter().enumerate() {
        let slice = Slice {
            index: i as u32,
            count,
        };
        let expected = IDS.iter().filter(|id| slice.contains(id)).count() as i64;
        let done = app.finished(doc).await;
        assert_eq!(
            num(&done, "num_sent"),
            Some(expected),
            "{users}: batch {i} of {count}: {:?}",
            text(&done, "error")
        );
    }
    let delivered = delivered_to(app, &title);
    let mut expected: Vec<String> = IDS.iter().map(|id| format!("{p}-{id}")).collect();
    expected.sort();
    assert_eq!(delivered, expected, "{users}: every user exactly once");
}

#[tokio::test]
async fn a_users_collection_named_users_capitalised_is_targeted_and_batched() {
    let app = TestApp::with(|s| s.users_collection = "Users".into()).await;
    let p = app.project.clone();
    let (worker, _) = app.start_worker().await;
    batches_follow_flutterflows_bounds(&app, "Users", 10).await;

    let reference = store::reference(app.store.doc_name("Users/Ib"));
    let as_string = app.notify("string refs", "Users/a, Users/Zz").await;
    let as_refs = app
        .write(
            CONSOLE,
            [
                title_text("reference refs"),
                vec![("user_refs", store::array(vec![reference, s("Users/m")]))],
            ]
            .concat(),
        )
        .await;
    let done = app.finished(&as_string).await;
    assert_eq!(
        num(&done, "num_sent"),
        Some(2),
        "{:?}",
        text(&done, "error")
    );
    assert_eq!(
        delivered_to(&app, "string refs"),
        vec![format!("{p}-Zz"), format!("{p}-a")]
    );
    let done = app.finished(&as_refs).await;
    assert_eq!(
        num(&done, "num_sent"),
        Some(2),
        "{:?}",
        text(&done, "error")
    );
    assert_eq!(
        delivered_to(&app, "reference refs"),
        vec![format!("{p}-Ib"), format!("{p}-m")]
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_users_collection_named_user_data_and_any_document_path_in_user_refs() {
    let app = TestApp::with(|s| s.users_collection = "user_data".into()).await;
    let p = app.project.clone();
    token_at(
        &app,
        "orgs/o1/members/m1",
        "t",
        &format!("{p}-member"),
        "iOS",
    )
    .await;
    let (worker, _) = app.start_worker().await;
    batches_follow_flutterflows_bounds(&app, "user_data", 3).await;

    // FlutterFlow reads `<path>/fcm_tokens` for whatever document path is listed.
    let mixed = app
        .notify("mixed", "user_data/a,orgs/o1/members/m1, users/nobody")
        .await;
    let done = app.finished(&mixed).await;
    assert_succeeded(&done);
    assert_eq!(
        delivered_to(&app, "mixed"),
        vec![format!("{p}-a"), format!("{p}-member")]
    );
    assert_eq!(
        done.fields.get("users_without_tokens"),
        Some(&store::array(vec![s("users/nobody")]))
    );

    // What is not a document path is still refused, naming it.
    for bad in [
        "user_data",
        "user_data/a/fcm_tokens",
        "user_data//a",
        "user_data/__a__",
        "user_data/a/fcm_tokens/t",
    ] {
        let doc = app.notify("bad", &format!("user_data/m,{bad}")).await;
        let done = app.finished(&doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("failed"), "{bad}");
        let error = text(&done, "error").unwrap_or_default();
        assert!(error.contains(&format!("{bad:?}")), "{bad}: {error:?}");
    }
    assert!(delivered_to(&app, "bad").is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn a_title_or_text_of_spaces_is_sent_and_only_missing_or_empty_fails() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    token_at(&app, "users/u1", "t", &format!("{p}-u1"), "iOS").await;
    let (worker, _) = app.start_worker().await;
    let body_only = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("   ")),
                ("notification_text", s("Body only")),
                ("user_refs", s("users/u1")),
            ],
        )
        .await;
    let title_only = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("Title only")),
                ("notification_text", s(" ")),
                ("user_refs", s("users/u1")),
            ],
        )
        .await;
    let empty = app
        .write(
            CONSOLE,
            vec![
                ("notification_title", s("")),
                ("notification_text", s("x")),
                ("user_refs", s("users/u1")),
            ],
        )
        .await;
    for doc in [&body_only, &title_only] {
        let done = app.finished(doc).await;
        assert_succeeded(&done);
    }
    let done = app.finished(&empty).await;
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    let messages = app.fcm().messages(&p);
    let mut sent: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            (
                m.message["notification"]["title"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                m.message["notification"]["body"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        vec![
            ("   ".to_string(), "Body only".to_string()),
            ("Title only".to_string(), " ".to_string()),
        ]
    );
    worker.stop().await;
}

/// `ffpush run` as its own process, its log in a file.
struct Logged {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Logged {
    fn start(app: &TestApp, env: &[(&str, &str)], dir: &std::path::Path) -> Logged {
        let log = dir.join("ffpush.log");
        let file = std::fs::File::create(&log).expect("creating the log file");
        let mut cmd = app.run_command();
        cmd.env("LOG_FORMAT", "text")
            .env_remove("K_SERVICE")
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Logged {
            child: cmd.spawn().expect("starting ffpush run"),
            log,
        }
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn old_documents_are_never_sent_late_whatever_their_status() {
    let app = TestApp::new().await;
    let p = app.project.clone();
    token_at(&app, "users/u1", "t", &format!("{p}-u1"), "iOS").await;
    let ago = |hours: i64| store::timestamp(Utc::now() - chrono::Duration::hours(hours));
    let targeted = |title: &str| [title_text(title), vec![("user_refs", s("users/u1"))]].concat();
    // Left at "started" days ago by FlutterFlow's console, never sent.
    let stuck = app
        .write(
            CONSOLE,
            [
                targeted("stuck"),
                vec![("status", s("started")), ("scheduled_time", ago(48))],
            ]
            .concat(),
        )
        .await;
    let blank = app
        .write(
            CONSOLE,
            [
                targeted("blank"),
                vec![("status", s("")), ("scheduled_time", ago(2))],
            ]
            .concat(),
        )
        .await;
    let absent = app
        .write(
            CONSOLE,
            [targeted("absent"), vec![("scheduled_time", ago(2))]].concat(),
        )
        .await;
    // Held by a live lease of another worker: left alone until the lease runs out.
    let lease_until = Utc::now() + chrono::Duration::seconds(6);
    let held = app
        .write(
            CONSOLE,
            [
                targeted("held"),
                vec![
                    ("status", s("started")),
                    ("scheduled_time", ago(48)),
                    ("ffpush_worker", s("another/1/00000000")),
                    ("ffpush_lease_expires_at", store::timestamp(lease_until)),
                ],
            ]
            .concat(),
        )
        .await;
    // Left at "started" a moment ago: within the limit, so it is sent.
    let recent = app
        .write(
            CONSOLE,
            [targeted("recent"), vec![("status", s("started"))]].concat(),
        )
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let worker = Logged::start(&app, &[("FFPUSH_MAX_LATENESS", "1h")], dir.path());
    let done = app.finished(&recent).await;
    assert_succeeded(&done);
    for doc in [&stuck, &blank, &absent] {
        let done = app.finished(doc).await;
        assert_eq!(text(&done, "status").as_deref(), Some("failed"), "{doc}");
        let error = text(&done, "error").unwrap_or_default();
        assert!(error.starts_with("expired: "), "{doc}: {error:?}");
        assert!(error.contains("FFPUSH_MAX_LATENESS"), "{error:?}");
    }
    let before = app.store.get(&held).await.unwrap().unwrap();
    assert_eq!(text(&before, "status").as_deref(), Some("started"));
    assert!(
        Utc::now() < lease_until,
        "the machine is too slow for this test's lease"
    );
    let done = app.finished(&held).await;
    assert!(Utc::now() >= lease_until, "taken from a live lease");
    assert!(
        text(&done, "error")
            .unwrap_or_default()
            .starts_with("expired: "),
        "{:?}",
        text(&done, "error")
    );
    assert_eq!(delivered_to(&app, "recent"), vec![format!("{p}-u1")]);
    assert_eq!(app.delivered().len(), 1, "nothing old was sent");
    // The start-up line counts what was expired by the time both replays were handed over;
    // due documents now pass through the bounded queue (FFPUSH_MAX_DOCUMENTS) first, so that
    // count may still be short of the three failed above.
    wait_until(Duration::from_secs(10), || {
        worker
            .lines()
            .iter()
            .any(|l| l.contains("caught up at start: "))
    })
    .await;
}

#[tokio::test]
async fn lateness_of_an_unscheduled_started_document_is_judged_by_its_create_time() {
    let app = TestApp::with(|s| s.max_lateness = Duration::from_secs(2)).await;
    let p = app.project.clone();
    token_at(&app, "users/u1", "t", &format!("{p}-u1"), "iOS").await;
    let doc = app
        .write(
            CONSOLE,
            [
                title_text("created long ago"),
                vec![("user_refs", s("users/u1")), ("status", s("started"))],
            ]
            .concat(),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (worker, _) = app.start_worker().await;
    let done = app.finished(&doc).await;
    assert_eq!(text(&done, "status").as_deref(), Some("failed"));
    assert!(
        text(&done, "error")
            .unwrap_or_default()
            .starts_with("expired: "),
        "{:?}",
        text(&done, "error")
    );
    assert!(app.fcm().attempts(&p).is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn send_doctor_seed_and_migrations_use_the_users_collection() {
    let app = TestApp::with(|s| s.users_collection = "Users".into()).await;
    // `ffpush dev --seed`
    ffpush::dev::seed::demo(&app.store).await.expect("seeding");
    assert!(app.store.get("Users/alice").await.unwrap().is_some());
    assert!(app.store.get("users/alice").await.unwrap().is_none());
    assert_eq!(app.token_docs("alice").await.len(), 2);

    // `ffpush doctor --users-collection Users --user alice`
    let settings = &app.settings;
    let args = ffpush::config::SettingsArgs {
        project: Some(settings.project.clone()),
        firestore_emulator_host: settings.firestore_emulator_host.clone(),
        credentials: settings
            .credentials
            .as_ref()
            .map(|c| c.display().to_string()),
        fcm_endpoint: Some(settings.fcm_endpoint.clone()),
        users_collection: Some("Users".into()),
        ..Default::default()
    };
    let checks = ffpush::doctor::run(&args, Some("alice")).await;
    for name in ["user document", "device tokens"] {
        let check = checks.iter().find(|c| c.name == name).expect(name);
        assert!(check.passed, "{check}");
        assert!(check.detail.contains("Users/alice"), "{check}");
    }

    // `ffpush migrate --only 001`: a legacy `tokens` array on a user of `Users`.
    let mut legacy = HashMap::new();
    legacy.insert("tokens".to_string(), store::array(vec![s("legacy-token")]));
    app.store.set("Users/legacy", legacy).await.unwrap();
    let options = ffpush::migrate::MigrateOptions {
        only: Some("001".into()),
        ..Default::default()
    };
    let reports = ffpush::migrate::run(&app.store, &options).await.unwrap();
    assert_eq!(reports[0].created, 1, "{}", reports[0]);
    assert_eq!(app.token_docs("legacy").await, vec!["legacy-token"]);

    // `ffpush send --users-collection Users --user bob`
    let (project, host) = (
        settings.project.clone(),
        settings.firestore_emulator_host.clone(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ffpush"))
            .args(["send", "--title", "Hi", "--text", "x", "--user", "bob"])
            .args(["--users-collection", "Users"])
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env_remove("FCM_ENDPOINT")
            .env("GOOGLE_CLOUD_PROJECT", project)
            .env("FIRESTORE_EMULATOR_HOST", host.unwrap_or_default())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = app
        .store
        .get(stdout.lines().next().unwrap_or_default())
        .await
        .unwrap()
        .expect("the written notification");
    assert_eq!(text(&doc, "user_refs").as_deref(), Some("Users/bob"));
}
