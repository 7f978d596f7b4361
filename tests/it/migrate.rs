//! `ffpush::migrate` against a project of its own on the shared Firestore emulator.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeZone, Utc};
use ffpush::migrate::{self, MigrateOptions, MigrationReport, MigrationStatus};
use ffpush::store::{self, TokenQuery};

use crate::{TestApp, s, text};

const TOKENS_ARRAY: &str = "001_tokens_array_to_fcm_tokens";
const DUPLICATES: &str = "002_remove_duplicate_tokens";

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 10, minute, 0).unwrap()
}

async fn user_with_array(app: &TestApp, uid: &str, tokens: &[&str]) {
    let mut f = HashMap::new();
    f.insert("display_name".to_string(), s(uid));
    f.insert(
        "tokens".to_string(),
        store::array(tokens.iter().map(|t| s(t)).collect()),
    );
    app.store.set(&format!("users/{uid}"), f).await.unwrap();
}

/// A token document at `path` (`users/u/fcm_tokens/id`); `created` `None` leaves the field out.
async fn token_doc(app: &TestApp, path: &str, token: &str, created: Option<DateTime<Utc>>) {
    let mut f = HashMap::new();
    f.insert("fcm_token".to_string(), s(token));
    f.insert("device_type".to_string(), s("iOS"));
    if let Some(t) = created {
        f.insert("created_at".to_string(), store::timestamp(t));
    }
    app.store.set(path, f).await.unwrap();
}

/// Every token document in the project: relative path → token.
async fn all_tokens(app: &TestApp) -> BTreeMap<String, String> {
    let q = TokenQuery {
        page_size: 10_000,
        ..Default::default()
    };
    app.store
        .token_page(&q, None)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (app.store.relative(&t.doc_name).to_string(), t.token))
        .collect()
}

async fn run(
    app: &TestApp,
    only: Option<&str>,
    dry_run: bool,
    destructive: bool,
) -> Vec<MigrationReport> {
    let opts = MigrateOptions {
        dry_run,
        allow_destructive: destructive,
        only: only.map(str::to_string),
    };
    migrate::run(&app.store, &opts).await.expect("migrating")
}

async fn recorded(app: &TestApp, id: &str) -> Option<ffpush::model::pb::Document> {
    app.store
        .get(&format!("{}/{id}", migrate::MIGRATIONS_COLLECTION))
        .await
        .unwrap()
}

/// u1 has `a` as a document and `a`, `b` in its array; u2 only the array; u3 nothing; `dup`
/// is under u4 (older) and u5 (newer).
async fn legacy_project(app: &TestApp) {
    user_with_array(app, "u1", &["a", "b", "b", ""]).await;
    token_doc(app, "users/u1/fcm_tokens/x", "a", Some(at(0))).await;
    user_with_array(app, "u2", &["c"]).await;
    user_with_array(app, "u3", &[]).await;
    token_doc(app, "users/u4/fcm_tokens/d", "dup", Some(at(1))).await;
    token_doc(app, "users/u5/fcm_tokens/d", "dup", Some(at(2))).await;
}

#[tokio::test]
async fn a_dry_run_reports_the_plan_and_writes_nothing() {
    let app = TestApp::new().await;
    legacy_project(&app).await;
    let before = all_tokens(&app).await;

    let reports = run(&app, None, true, false).await;

    let statuses: Vec<_> = reports.iter().map(|r| (r.id, r.status)).collect();
    assert_eq!(
        statuses,
        [
            (TOKENS_ARRAY, MigrationStatus::Planned),
            (DUPLICATES, MigrationStatus::Planned)
        ]
    );
    assert_eq!((reports[0].created, reports[0].deleted), (2, 0));
    let planned: Vec<&str> = reports[0]
        .sample
        .iter()
        .map(|p| p.rsplit_once('/').unwrap().0)
        .collect();
    assert_eq!(planned, ["users/u1/fcm_tokens", "users/u2/fcm_tokens"]);
    assert!(
        reports[0].to_string().contains("left in place"),
        "{}",
        reports[0]
    );
    assert_eq!((reports[1].created, reports[1].deleted), (0, 1));
    assert_eq!(reports[1].sample, ["users/u4/fcm_tokens/d"]);

    assert_eq!(all_tokens(&app).await, before);
    assert!(recorded(&app, TOKENS_ARRAY).await.is_none());
    assert!(recorded(&app, DUPLICATES).await.is_none());
}

#[tokio::test]
async fn tokens_arrays_become_token_documents_once() {
    let app = TestApp::new().await;
    legacy_project(&app).await;

    let reports = run(&app, Some("001"), false, false).await;
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(
        (report.id, report.status),
        (TOKENS_ARRAY, MigrationStatus::Applied)
    );
    assert_eq!((report.created, report.deleted), (2, 0));

    let tokens = all_tokens(&app).await;
    let of = |uid: &str| -> Vec<&str> {
        let mut v: Vec<&str> = tokens
            .iter()
            .filter(|(path, _)| path.starts_with(&format!("users/{uid}/")))
            .map(|(_, t)| t.as_str())
            .collect();
        v.sort();
        v
    };
    assert_eq!(of("u1"), ["a", "b"]);
    assert_eq!(of("u2"), ["c"]);
    assert!(of("u3").is_empty());
    assert_eq!(tokens.len(), 5, "{tokens:?}");

    // The new document: the token, when the array was last written, where it came from.
    let u2_path = tokens
        .iter()
        .find(|(p, _)| p.starts_with("users/u2/"))
        .unwrap()
        .0;
    assert_eq!(&report.sample[1], u2_path);
    let doc = app.store.get(u2_path).await.unwrap().unwrap();
    assert_eq!(text(&doc, "fcm_token").as_deref(), Some("c"));
    assert_eq!(
        text(&doc, "ffpush_migration").as_deref(),
        Some(TOKENS_ARRAY)
    );
    assert!(!doc.fields.contains_key("device_type"));
    let user = app.store.get("users/u2").await.unwrap().unwrap();
    assert_eq!(
        store::timestamp_field(&doc, "created_at"),
        user.update_time.as_ref().and_then(store::from_timestamp)
    );
    assert!(
        user.fields.contains_key("tokens"),
        "the array is left in place"
    );

    let record = recorded(&app, TOKENS_ARRAY).await.expect("recorded");
    assert_eq!(store::integer_field(&record, "created"), Some(2));
    assert!(store::timestamp_field(&record, "applied_at").is_some());

    // Again: nothing to do, nothing done, even with a new array token in the meantime.
    user_with_array(&app, "u6", &["late"]).await;
    let again = run(&app, Some(TOKENS_ARRAY), false, true).await;
    assert_eq!(again[0].status, MigrationStatus::AlreadyApplied);
    assert_eq!((again[0].created, again[0].deleted), (0, 0));
    assert_eq!(
        again[0].applied_at,
        store::timestamp_field(&record, "applied_at")
    );
    assert_eq!(all_tokens(&app).await, tokens);
}

#[tokio::test]
async fn duplicate_removal_needs_the_flag_and_keeps_the_newest_copy() {
    let app = TestApp::new().await;
    // Twice under one user: the newer stays.
    token_doc(&app, "users/u1/fcm_tokens/old", "t1", Some(at(1))).await;
    token_doc(&app, "users/u1/fcm_tokens/new", "t1", Some(at(5))).await;
    // Under three users: the newest stays, wherever it is.
    token_doc(&app, "users/u2/fcm_tokens/a", "t2", Some(at(9))).await;
    token_doc(&app, "users/u3/fcm_tokens/a", "t2", Some(at(3))).await;
    token_doc(&app, "users/u4/fcm_tokens/a", "t2", Some(at(7))).await;
    // Same created_at: the lexicographically last name stays.
    token_doc(&app, "users/u5/fcm_tokens/b", "t3", Some(at(4))).await;
    token_doc(&app, "users/u5/fcm_tokens/a", "t3", Some(at(4))).await;
    // No created_at counts as oldest.
    token_doc(&app, "users/u6/fcm_tokens/z", "t4", None).await;
    token_doc(&app, "users/u6/fcm_tokens/a", "t4", Some(at(0))).await;
    // Unique tokens are left alone.
    token_doc(&app, "users/u7/fcm_tokens/a", "t5", Some(at(0))).await;
    token_doc(&app, "users/u8/fcm_tokens/a", "t6", None).await;
    let before = all_tokens(&app).await;

    let refused = run(&app, Some(DUPLICATES), false, false).await;
    assert_eq!(refused[0].status, MigrationStatus::RefusedDestructive);
    assert_eq!(refused[0].deleted, 5);
    assert!(refused[0].to_string().contains("--allow-destructive"));
    assert_eq!(all_tokens(&app).await, before, "refused means untouched");
    assert!(recorded(&app, DUPLICATES).await.is_none());

    let applied = run(&app, Some(DUPLICATES), false, true).await;
    assert_eq!(applied[0].status, MigrationStatus::Applied);
    assert_eq!((applied[0].created, applied[0].deleted), (0, 5));
    let mut deleted = applied[0].sample.clone();
    deleted.sort();
    assert_eq!(
        deleted,
        [
            "users/u1/fcm_tokens/old",
            "users/u3/fcm_tokens/a",
            "users/u4/fcm_tokens/a",
            "users/u5/fcm_tokens/a",
            "users/u6/fcm_tokens/z",
        ]
    );
    let left: Vec<String> = all_tokens(&app).await.into_keys().collect();
    assert_eq!(
        left,
        [
            "users/u1/fcm_tokens/new",
            "users/u2/fcm_tokens/a",
            "users/u5/fcm_tokens/b",
            "users/u6/fcm_tokens/a",
            "users/u7/fcm_tokens/a",
            "users/u8/fcm_tokens/a",
        ]
    );
    let record = recorded(&app, DUPLICATES).await.expect("recorded");
    assert_eq!(store::integer_field(&record, "deleted"), Some(5));

    let again = run(&app, Some(DUPLICATES), false, true).await;
    assert_eq!(again[0].status, MigrationStatus::AlreadyApplied);
    assert_eq!(all_tokens(&app).await.len(), 6);
}

#[tokio::test]
async fn a_full_run_applies_what_it_may_and_refuses_the_rest() {
    let app = TestApp::new().await;
    legacy_project(&app).await;

    let reports = run(&app, None, false, false).await;
    let statuses: Vec<_> = reports.iter().map(|r| (r.id, r.status)).collect();
    assert_eq!(
        statuses,
        [
            (TOKENS_ARRAY, MigrationStatus::Applied),
            (DUPLICATES, MigrationStatus::RefusedDestructive)
        ]
    );
    assert_eq!(all_tokens(&app).await.len(), 5);

    let reports = run(&app, None, false, true).await;
    let statuses: Vec<_> = reports.iter().map(|r| (r.status, r.deleted)).collect();
    assert_eq!(
        statuses,
        [
            (MigrationStatus::AlreadyApplied, 0),
            (MigrationStatus::Applied, 1)
        ]
    );
    assert!(!all_tokens(&app).await.contains_key("users/u4/fcm_tokens/d"));
}

#[tokio::test]
async fn an_unknown_migration_is_an_error_naming_the_known_ones() {
    let app = TestApp::new().await;
    let opts = MigrateOptions {
        only: Some("003".into()),
        ..Default::default()
    };
    let err = migrate::run(&app.store, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("003") && err.contains(TOKENS_ARRAY), "{err}");
    assert_eq!(migrate::list().len(), 2);
    assert!(migrate::list()[1].2, "002 is destructive");
}
