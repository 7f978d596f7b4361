//! `ffpush doctor`: the checks of FlutterFlow's push troubleshooting page
//! (<https://intercom.help/flutterflow/en/articles/7037979-push-notifications-fcm_token-generation-failure>), done by
//! the program itself, each with PASS/FAIL and the fix in one line.

use std::collections::HashMap;
use std::fmt;

use chrono::Utc;

use crate::config::{Settings, SettingsArgs};
use crate::errors::Chain;
use crate::fcm::{self, Outcome, Sender, redact};
use crate::model::{pb, user_doc_path};
use crate::store::{self, Store, TokenQuery};

pub struct Check {
    pub name: String,
    pub passed: bool,
    /// What was found.
    pub detail: String,
    /// What to do about it, when failed.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            passed: true,
            detail: detail.into(),
            fix: None,
        }
    }
    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            passed: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.passed { "PASS" } else { "FAIL" };
        write!(f, "{mark}  {:<22} {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

/// Runs every check that can run; a check whose prerequisite failed is reported failed too.
pub async fn run(args: &SettingsArgs, user: Option<&str>) -> Vec<Check> {
    let mut checks = Vec::new();
    let settings = match Settings::from_args(args) {
        Ok(s) => {
            checks.push(Check::pass(
                "settings",
                format!(
                    "project {}, database {}, Firestore {}, FCM {}",
                    s.project,
                    s.database,
                    s.firestore_emulator_host
                        .as_deref()
                        .map(|h| format!("emulator at {h}"))
                        .unwrap_or_else(|| "firestore.googleapis.com".into()),
                    s.fcm_endpoint
                ),
            ));
            s
        }
        Err(errors) => {
            for e in errors.iter() {
                checks.push(Check::fail("settings", e.to_string(), e.fix.clone()));
            }
            return checks;
        }
    };
    let sender = check_fcm_token(&settings, &mut checks).await;
    let store = check_firestore(&settings, &mut checks).await;
    if let Some(store) = &store {
        check_indexes(store, &settings, &mut checks).await;
    }
    if let Some(sender) = &sender {
        checks.push(check_send_permission(sender).await);
    }
    if let Some(user) = user {
        match &store {
            Some(store) => check_user(store, sender.as_ref(), user, &mut checks).await,
            None => checks.push(Check::fail(
                "user",
                "skipped: Firestore is not reachable",
                "fix the Firestore check first",
            )),
        }
    }
    checks
}

async fn check_fcm_token(settings: &Settings, checks: &mut Vec<Check>) -> Option<Sender> {
    let credentials = match &settings.credentials {
        Some(path) => format!("service-account key {}", path.display()),
        None => "the metadata server (Application Default Credentials)".to_string(),
    };
    let fix = match &settings.credentials {
        Some(_) => {
            "check GOOGLE_APPLICATION_CREDENTIALS points at a valid service-account JSON key of this project (IAM → Service accounts → Keys)"
        }
        None => {
            "on Cloud Run give the service its own service account; elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a service-account key"
        }
    };
    let sender = match Sender::new(settings).await {
        Ok(sender) => sender,
        Err(e) => {
            checks.push(Check::fail(
                "FCM credentials",
                format!("{credentials}: {}", Chain(&e)),
                fix,
            ));
            return None;
        }
    };
    match sender.access_token().await {
        Ok(_) => {
            checks.push(Check::pass(
                "FCM credentials",
                format!("{credentials}: got an OAuth2 token for {}", fcm::SCOPE),
            ));
            Some(sender)
        }
        Err(e) => {
            checks.push(Check::fail(
                "FCM credentials",
                format!("{credentials}: {}", Chain(&e)),
                fix,
            ));
            None
        }
    }
}

async fn check_firestore(settings: &Settings, checks: &mut Vec<Check>) -> Option<Store> {
    let fix = match &settings.firestore_emulator_host {
        Some(host) => format!("start the Firestore emulator at {host} (`gcloud emulators firestore start --host-port={host}`) or fix FIRESTORE_EMULATOR_HOST"),
        None => "grant the service account roles/datastore.user, and check GOOGLE_CLOUD_PROJECT and FIRESTORE_DATABASE".to_string(),
    };
    let fix = fix.as_str();
    let store = match Store::connect(settings).await {
        Ok(store) => store,
        Err(e) => {
            checks.push(Check::fail(
                "Firestore read/write",
                Chain(&e).to_string(),
                fix,
            ));
            return None;
        }
    };
    let path = format!("ffpush_doctor/{:016x}", rand::random::<u64>());
    let mut fields = HashMap::new();
    fields.insert("checked_at".to_string(), store::timestamp(Utc::now()));
    let outcome = async {
        store.set(&path, fields).await?;
        let read = store.get(&path).await?;
        store.delete(&store.doc_name(&path)).await?;
        Ok::<bool, store::Error>(read.is_some())
    }
    .await;
    match outcome {
        Ok(true) => {
            checks.push(Check::pass(
                "Firestore read/write",
                format!("wrote, read and removed {path}"),
            ));
            Some(store)
        }
        Ok(false) => {
            checks.push(Check::fail(
                "Firestore read/write",
                format!("wrote {path} but could not read it back"),
                fix,
            ));
            None
        }
        Err(e) => {
            checks.push(Check::fail(
                "Firestore read/write",
                Chain(&e).to_string(),
                fix,
            ));
            None
        }
    }
}

/// A query ffpush makes, as a check names it, what it asks, and how Firestore served it.
type Served = (&'static str, String, Result<(), store::Error>);

/// Runs each query ffpush makes, limited to a page of one: a missing index fails here, with
/// Firestore's words for it and its link, instead of on a notification.
async fn check_indexes(store: &Store, settings: &Settings, checks: &mut Vec<Check>) {
    let mut results = token_queries(store).await;
    results.extend(sweep_queries(store, settings).await);
    for (name, query, result) in results {
        checks.push(match result {
            Ok(()) => Check::pass(name, format!("served: {query}")),
            Err(e @ store::Error::MissingIndex { .. }) => Check::fail(
                name,
                format!("{query}: {e}"),
                "run `firebase deploy --only firestore:indexes` from the ffpush repository (firebase.json names migrations/firestore.indexes.json), or open the link above",
            ),
            Err(e) => Check::fail(
                name,
                format!("{query}: {e}"),
                "retry; check the Firestore check above",
            ),
        });
    }
}

/// The queries of the fcm_tokens collection group: a broadcast's, a batch's, and the
/// dead-token lookup.
async fn token_queries(store: &Store) -> Vec<Served> {
    let tokens = |device_type: Option<&str>, slice: bool| TokenQuery {
        device_type: device_type.map(str::to_string),
        user_id_start: slice.then(|| "Ib".to_string()),
        user_id_end: slice.then(|| "V0".to_string()),
        page_size: 1,
        ..Default::default()
    };
    let users = store.users_collection();
    vec![
        (
            "index: broadcast",
            "fcm_tokens collection group in name order (target_audience All)".to_string(),
            store.token_page(&tokens(None, false), None).await.map(drop),
        ),
        (
            "index: broadcast by device_type",
            "fcm_tokens collection group where device_type == … (target_audience iOS, Android)"
                .to_string(),
            store
                .token_page(&tokens(Some("iOS"), false), None)
                .await
                .map(drop),
        ),
        (
            "index: batch slice",
            format!(
                "fcm_tokens collection group where device_type == … within a range of {users}/… (batch_index, num_batches)"
            ),
            store
                .token_page(&tokens(Some("iOS"), true), None)
                .await
                .map(drop),
        ),
        (
            "index: dead-token lookup",
            "fcm_tokens collection group where fcm_token == … (removing dead tokens)".to_string(),
            store.token_docs_with("ffpush-doctor-probe").await.map(drop),
        ),
    ]
}

/// The sweep's queries of both notification collections: by status, and by scheduled time.
async fn sweep_queries(store: &Store, settings: &Settings) -> Vec<Served> {
    let collections = [&settings.collection, &settings.user_collection];
    let mut status = Ok(());
    let mut due = Ok(());
    let now = Utc::now();
    for collection in collections {
        if status.is_ok() {
            status = store
                .with_status(collection, &[crate::model::Status::Started])
                .await
                .map(drop);
        }
        if due.is_ok() {
            due = store
                .due_between(collection, now, now, drop)
                .await
                .map(drop);
        }
    }
    let names = format!("{} and {}", collections[0], collections[1]);
    vec![
        (
            "index: sweep (status)",
            format!("{names} where status in [started]"),
            status,
        ),
        (
            "index: sweep (scheduled_time)",
            format!("{names} where scheduled_time in a range"),
            due,
        ),
    ]
}

/// A `validate_only` send: proves the credentials may send, without delivering anything.
async fn check_send_permission(sender: &Sender) -> Check {
    let message = serde_json::json!({
        "token": "ffpush-doctor-not-a-real-token",
        "notification": {"title": "ffpush doctor", "body": "dry run"}
    });
    match sender.dry_run(message).await {
        // An invalid-token answer means FCM accepted our credentials and looked at the token.
        Ok(_) => Check::pass(
            "FCM send permission",
            match sender.protocol() {
                Some(protocol) => format!("a validate_only send was accepted over {protocol}"),
                None => "a validate_only send was accepted".to_string(),
            },
        ),
        Err(e) => Check::fail(
            "FCM send permission",
            Chain(&e).to_string(),
            "enable the Firebase Cloud Messaging API and grant the service account roles/firebasecloudmessaging.admin",
        ),
    }
}

/// The checks of one user (`--user`): the user document, its tokens, and what FCM says of them.
async fn check_user(store: &Store, sender: Option<&Sender>, user: &str, checks: &mut Vec<Check>) {
    let Some(name) = user_name(store, user, checks) else {
        return;
    };
    if !check_user_document(store, &name, checks).await {
        return;
    }
    check_subcollection_name(store, &name, checks).await;
    let Some(tokens) = check_device_tokens(store, &name, checks).await else {
        return;
    };
    check_shared_tokens(store, &name, &tokens, checks).await;
    if let Some(sender) = sender {
        check_tokens_valid(sender, &tokens, checks).await;
    }
}

/// The user document's path from `--user` (a path, or a uid in the users collection).
fn user_name(store: &Store, user: &str, checks: &mut Vec<Check>) -> Option<String> {
    let users = store.users_collection();
    let path = if user.contains('/') {
        user.to_string()
    } else {
        format!("{users}/{user}")
    };
    match user_doc_path(&path) {
        Ok(name) => Some(name),
        Err(e) => {
            checks.push(Check::fail(
                "user",
                e.0,
                format!("pass --user {users}/UID, or the user's UID alone"),
            ));
            None
        }
    }
}

/// Whether the user document `name` exists, and holds no `tokens` array of an older app.
/// `false`: Firestore failed, nothing more can be checked.
async fn check_user_document(store: &Store, name: &str, checks: &mut Vec<Check>) -> bool {
    let users = store.users_collection();
    let doc = match store.get(name).await {
        Ok(Some(doc)) => {
            checks.push(Check::pass("user document", format!("{name} exists")));
            doc
        }
        Ok(None) => {
            checks.push(Check::fail(
                "user document",
                format!("{name} does not exist"),
                format!("check the uid (Firebase console → Authentication), that the app creates the user document on sign-up, and that the project's users collection is `{users}` (FFPUSH_USERS_COLLECTION)"),
            ));
            return true;
        }
        Err(e) => {
            checks.push(Check::fail(
                "user document",
                Chain(&e).to_string(),
                "retry; check Firestore",
            ));
            return false;
        }
    };
    if let Some(pb::value::ValueType::ArrayValue(a)) =
        doc.fields.get("tokens").and_then(|v| v.value_type.as_ref())
    {
        checks.push(Check::fail(
            "tokens array field",
            format!("{name} has a `tokens` array field ({} values): ffpush and FlutterFlow read the fcm_tokens subcollection", a.values.len()),
            "run `ffpush migrate --only 001_tokens_array_to_fcm_tokens` to copy them into fcm_tokens",
        ));
    }
    true
}

/// A page of the user's token documents in `collection` (`fcm_tokens`, or a misspelling).
fn user_tokens(name: &str, collection: &str) -> TokenQuery {
    TokenQuery {
        user: Some(name.to_string()),
        page_size: 1000,
        collection: collection.to_string(),
        ..Default::default()
    }
}

/// Tokens saved under `fcm_token` (singular), where nothing reads them.
async fn check_subcollection_name(store: &Store, name: &str, checks: &mut Vec<Check>) {
    match store.token_page(&user_tokens(name, "fcm_token"), None).await {
        Ok(misnamed) if !misnamed.is_empty() => checks.push(Check::fail(
            "subcollection name",
            format!("{name} has {} document(s) in `fcm_token` (singular)", misnamed.len()),
            "the subcollection must be named fcm_tokens; fix the app's token-saving code or move the documents",
        )),
        _ => {}
    }
}

/// The user's device tokens (those not empty); `None` when Firestore failed.
async fn check_device_tokens(
    store: &Store,
    name: &str,
    checks: &mut Vec<Check>,
) -> Option<Vec<String>> {
    let tokens = match store
        .token_page(&user_tokens(name, "fcm_tokens"), None)
        .await
    {
        Ok(tokens) => tokens,
        Err(e) => {
            checks.push(Check::fail(
                "device tokens",
                Chain(&e).to_string(),
                "retry; check Firestore",
            ));
            return None;
        }
    };
    let empty = tokens.iter().filter(|t| t.token.trim().is_empty()).count();
    let real: Vec<String> = tokens
        .into_iter()
        .filter(|t| !t.token.trim().is_empty())
        .map(|t| t.token)
        .collect();
    if real.is_empty() {
        checks.push(Check::fail(
            "device tokens",
            format!("{name}/fcm_tokens has no document with an fcm_token"),
            "the user must sign in on a physical device and allow notifications (FlutterFlow: enable push notifications in Settings → Push Notifications, and rebuild the app)",
        ));
    } else {
        checks.push(Check::pass(
            "device tokens",
            format!("{} token document(s) in {name}/fcm_tokens", real.len()),
        ));
    }
    if empty > 0 {
        checks.push(Check::fail(
            "empty tokens",
            format!("{empty} document(s) in {name}/fcm_tokens have an empty or missing fcm_token"),
            "delete them; they come from a failed token registration in the app",
        ));
    }
    Some(real)
}

/// Tokens of the user's that other users' documents hold too (a device shared by users).
async fn check_shared_tokens(
    store: &Store,
    name: &str,
    tokens: &[String],
    checks: &mut Vec<Check>,
) {
    let mut shared = Vec::new();
    for token in tokens {
        if let Ok(holders) = store.token_docs_with(token).await {
            let others: Vec<String> = holders
                .iter()
                .map(|h| store.relative(h).to_string())
                .filter(|h| !h.starts_with(&format!("{name}/")))
                .collect();
            if !others.is_empty() {
                shared.push(format!(
                    "{} also under {}",
                    redact(token),
                    others.join(", ")
                ));
            }
        }
    }
    if !shared.is_empty() {
        checks.push(Check::fail(
            "tokens shared",
            shared.join("; "),
            "a device signed in as several users keeps old tokens: remove the token on sign-out, or run `ffpush migrate --only 002_remove_duplicate_tokens --allow-destructive`",
        ));
    }
}

/// A `validate_only` send to each token: those FCM calls dead or invalid.
async fn check_tokens_valid(sender: &Sender, tokens: &[String], checks: &mut Vec<Check>) {
    let mut dead = Vec::new();
    for token in tokens {
        let message = serde_json::json!({"token": token, "notification": {"title": "ffpush doctor", "body": "dry run"}});
        if let Ok(Outcome::Dead | Outcome::InvalidToken) = sender.dry_run(message).await {
            dead.push(redact(token));
        }
    }
    if dead.is_empty() && !tokens.is_empty() {
        checks.push(Check::pass(
            "tokens valid",
            "FCM accepts every token (validate_only)",
        ));
    } else if !dead.is_empty() {
        checks.push(Check::fail(
            "tokens valid",
            format!("FCM says these are dead: {}", dead.join(", ")),
            "they will be removed on the next send; the user must open the app again to register a new token",
        ));
    }
}
