//! `migrations/firestore.rules` as app clients meet it: a Firestore emulator of its own,
//! started with the rules (the shared one runs without), driven over REST the way a
//! FlutterFlow app's SDK does, with Firebase Auth ID tokens the emulator accepts unsigned.
//! Also the structural check of `migrations/firestore.indexes.json` against `src/store.rs`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ffpush::firestore_emulator::FirestoreEmulator;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn migrations_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations")
}

fn rules_emulator() -> &'static str {
    static EMULATOR: OnceLock<FirestoreEmulator> = OnceLock::new();
    EMULATOR
        .get_or_init(|| {
            FirestoreEmulator::start_with_rules(None, &migrations_dir().join("firestore.rules"))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .host_port()
}

/// Who a request is made as.
#[derive(Clone, Copy)]
enum As<'a> {
    /// A signed-in app user with this uid.
    User(&'a str),
    /// No `Authorization` header.
    Nobody,
    /// The emulator's owner token: bypasses the rules, like ffpush's service account.
    Server,
}

/// One project on the rules emulator.
struct Client {
    project: String,
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new() -> Client {
        let host = rules_emulator();
        let project = format!("rules-{:016x}", rand::random::<u64>());
        Client {
            base: format!("http://{host}/v1/projects/{project}/databases/(default)/documents"),
            project,
            http: reqwest::Client::new(),
        }
    }

    /// An unsigned (`alg: none`) Firebase Auth ID token, as the emulator accepts.
    fn id_token(&self, uid: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let header = json!({"alg": "none", "typ": "JWT"});
        let claims = json!({
            "sub": uid, "user_id": uid, "aud": self.project,
            "iss": format!("https://securetoken.google.com/{}", self.project),
            "iat": now, "exp": now + 3600, "auth_time": now,
            "firebase": {"sign_in_provider": "custom", "identities": {}},
        });
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", part(&header), part(&claims))
    }

    /// A reference value to `path` in this project, as the SDKs write references.
    fn reference(&self, path: &str) -> Value {
        json!({"referenceValue":
            format!("projects/{}/databases/(default)/documents/{path}", self.project)})
    }

    async fn call(&self, who: As<'_>, method: Method, url: String, body: Option<Value>) -> Answer {
        let mut request = self.http.request(method, url);
        match who {
            As::User(uid) => request = request.bearer_auth(self.id_token(uid)),
            As::Server => request = request.bearer_auth("owner"),
            As::Nobody => {}
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the rules emulator answers");
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        Answer { status, body }
    }

    /// Creates `path` (`collection/id`) with `fields` (Firestore REST values).
    async fn create(&self, who: As<'_>, path: &str, fields: Value) -> Answer {
        let (collection, id) = path.rsplit_once('/').expect("collection/id");
        let url = format!("{}/{collection}?documentId={id}", self.base);
        self.call(who, Method::POST, url, Some(json!({ "fields": fields })))
            .await
    }

    /// Writes `fields` onto `path` (a field mask of exactly those fields; creates if missing).
    async fn patch(&self, who: As<'_>, path: &str, fields: Value) -> Answer {
        let mask: Vec<String> = fields
            .as_object()
            .expect("fields")
            .keys()
            .map(|k| format!("updateMask.fieldPaths={k}"))
            .collect();
        let url = format!("{}/{path}?{}", self.base, mask.join("&"));
        self.call(who, Method::PATCH, url, Some(json!({ "fields": fields })))
            .await
    }

    async fn get(&self, who: As<'_>, path: &str) -> Answer {
        self.call(who, Method::GET, format!("{}/{path}", self.base), None)
            .await
    }

    async fn delete(&self, who: As<'_>, path: &str) -> Answer {
        self.call(who, Method::DELETE, format!("{}/{path}", self.base), None)
            .await
    }

    /// `collection` where `field == value` (all of it when `field` is `None`).
    async fn query(&self, who: As<'_>, collection: &str, filter: Option<(&str, Value)>) -> Answer {
        let mut query = json!({"from": [{"collectionId": collection}]});
        if let Some((field, value)) = filter {
            query["where"] = json!({"fieldFilter": {
                "field": {"fieldPath": field}, "op": "EQUAL", "value": value}});
        }
        let url = format!("{}:runQuery", self.base);
        self.call(
            who,
            Method::POST,
            url,
            Some(json!({"structuredQuery": query})),
        )
        .await
    }

    /// What an app writes to send a push: to `to`, from `sender`, plus `extra` fields.
    fn app_notification(&self, sender: &str, to: Value, extra: Value) -> Value {
        let mut fields = json!({
            "notification_title": {"stringValue": "Hi"},
            "notification_text": {"stringValue": "From the app"},
            "sender": self.reference(&format!("users/{sender}")),
            "timestamp": {"timestampValue": "2024-05-01T10:00:00Z"},
        });
        if !to.is_null() {
            fields["user_refs"] = to;
        }
        for (k, v) in extra.as_object().into_iter().flatten() {
            fields[k] = v.clone();
        }
        fields
    }
}

struct Answer {
    status: StatusCode,
    body: Value,
}

#[track_caller]
fn allowed(answer: &Answer, what: &str) {
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{what} should be allowed: {}",
        answer.body
    );
}

#[track_caller]
fn denied(answer: &Answer, what: &str) {
    assert_eq!(
        (answer.status, answer.body["error"]["status"].as_str()),
        (StatusCode::FORBIDDEN, Some("PERMISSION_DENIED")),
        "{what} should be denied: {}",
        answer.body
    );
}

fn refs(s: &str) -> Value {
    json!({ "stringValue": s })
}

#[tokio::test]
async fn an_app_user_may_send_to_named_users_as_themselves_and_read_it_back() {
    let c = Client::new();
    let as_string = c.app_notification("alice", refs("users/bob,users/carol"), json!({}));
    allowed(
        &c.create(
            As::User("alice"),
            "ff_user_push_notifications/n1",
            as_string,
        )
        .await,
        "a notification with user_refs, sent as oneself",
    );
    let as_array = c.app_notification(
        "alice",
        json!({"arrayValue": {"values": [c.reference("users/bob")]}}),
        json!({"scheduled_time": {"timestampValue": "2030-01-01T00:00:00Z"}}),
    );
    allowed(
        &c.create(As::User("alice"), "ff_user_push_notifications/n2", as_array)
            .await,
        "user_refs as an array of references, scheduled",
    );

    let stored = c
        .get(As::Server, "ff_user_push_notifications/n1")
        .await
        .body;
    assert_eq!(
        stored["fields"]["user_refs"]["stringValue"],
        "users/bob,users/carol"
    );
    allowed(
        &c.get(As::User("alice"), "ff_user_push_notifications/n1")
            .await,
        "reading one's own notification",
    );
    let mine = c
        .query(
            As::User("alice"),
            "ff_user_push_notifications",
            Some(("sender", c.reference("users/alice"))),
        )
        .await;
    allowed(&mine, "listing the notifications one sent");
    let names: Vec<&str> = mine
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["document"]["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    denied(
        &c.get(As::User("bob"), "ff_user_push_notifications/n1")
            .await,
        "reading someone else's notification",
    );
    denied(
        &c.query(As::User("bob"), "ff_user_push_notifications", None)
            .await,
        "listing every notification",
    );
}

#[tokio::test]
async fn an_app_notification_without_recipients_or_from_someone_else_is_denied() {
    let c = Client::new();
    let cases = [
        (
            "no user_refs",
            c.app_notification("alice", Value::Null, json!({})),
        ),
        (
            "empty user_refs",
            c.app_notification("alice", refs(""), json!({})),
        ),
        (
            "blank user_refs",
            c.app_notification("alice", refs(" , "), json!({})),
        ),
        (
            "an empty user_refs array",
            c.app_notification("alice", json!({"arrayValue": {}}), json!({})),
        ),
        (
            "another user as sender",
            c.app_notification("mallory", refs("users/bob"), json!({})),
        ),
        (
            "the sender as a string, not a reference",
            c.app_notification(
                "alice",
                refs("users/bob"),
                json!({"sender": {"stringValue": "users/alice"}}),
            ),
        ),
        (
            "no sender",
            c.app_notification("alice", refs("users/bob"), json!({}))
                .as_object()
                .map(|f| {
                    let mut f = f.clone();
                    f.remove("sender");
                    Value::Object(f)
                })
                .unwrap(),
        ),
    ];
    for (i, (what, fields)) in cases.into_iter().enumerate() {
        let path = format!("ff_user_push_notifications/bad{i}");
        denied(&c.create(As::User("alice"), &path, fields).await, what);
        assert_eq!(
            c.get(As::Server, &path).await.status,
            StatusCode::NOT_FOUND,
            "{what}"
        );
    }
}

#[tokio::test]
async fn an_app_user_may_not_write_the_fields_ffpush_writes() {
    let c = Client::new();
    let outcome_fields = [
        ("status", json!({"stringValue": "succeeded"})),
        ("num_sent", json!({"integerValue": "0"})),
        ("error", json!({"stringValue": "x"})),
        ("num_tokens", json!({"integerValue": "0"})),
        ("num_failed", json!({"integerValue": "0"})),
        ("num_tokens_removed", json!({"integerValue": "0"})),
        (
            "started_at",
            json!({"timestampValue": "2024-05-01T10:00:00Z"}),
        ),
        (
            "completed_at",
            json!({"timestampValue": "2024-05-01T10:00:00Z"}),
        ),
        ("warning", json!({"stringValue": "x"})),
        ("users_without_tokens", json!({"arrayValue": {}})),
        ("num_users_without_tokens", json!({"integerValue": "0"})),
        ("ffpush_worker", json!({"stringValue": "me"})),
        (
            "ffpush_lease_expires_at",
            json!({"timestampValue": "2099-01-01T00:00:00Z"}),
        ),
        ("ffpush_anything_new", json!({"nullValue": null})),
    ];
    for (field, value) in outcome_fields {
        let fields = c.app_notification("alice", refs("users/bob"), json!({ field: value }));
        let path = format!("ff_user_push_notifications/with_{field}");
        denied(
            &c.create(As::User("alice"), &path, fields).await,
            &format!("a notification carrying `{field}`"),
        );
    }
    // Only a prefix is reserved, not every name containing it.
    let fields = c.app_notification(
        "alice",
        refs("users/bob"),
        json!({"not_ffpush_": {"stringValue": "x"}}),
    );
    allowed(
        &c.create(As::User("alice"), "ff_user_push_notifications/ok", fields)
            .await,
        "a field that merely contains `ffpush_`",
    );
}

#[tokio::test]
async fn an_app_user_may_not_change_or_delete_a_notification() {
    let c = Client::new();
    let path = "ff_user_push_notifications/n1";
    let fields = c.app_notification("alice", refs("users/bob"), json!({}));
    allowed(
        &c.create(As::User("alice"), path, fields).await,
        "creating it",
    );

    let edits = [
        ("status", json!({"stringValue": "cancelled"})),
        ("notification_text", json!({"stringValue": "edited"})),
        ("user_refs", refs("users/everyone")),
    ];
    for (field, value) in edits {
        denied(
            &c.patch(As::User("alice"), path, json!({ field: value }))
                .await,
            &format!("the sender updating `{field}`"),
        );
    }
    denied(
        &c.delete(As::User("alice"), path).await,
        "the sender deleting it",
    );
    denied(
        &c.delete(As::User("bob"), path).await,
        "a recipient deleting it",
    );
    let stored = c.get(As::Server, path).await;
    assert_eq!(
        stored.body["fields"]["notification_text"]["stringValue"],
        "From the app"
    );
}

#[tokio::test]
async fn ff_push_notifications_is_closed_to_clients() {
    let c = Client::new();
    let broadcast = json!({
        "notification_title": {"stringValue": "Sale"},
        "notification_text": {"stringValue": "Everything must go"},
        "target_audience": {"stringValue": "All"},
    });
    denied(
        &c.create(
            As::User("alice"),
            "ff_push_notifications/b1",
            broadcast.clone(),
        )
        .await,
        "an app user creating a console notification",
    );
    let to_bob = c.app_notification("alice", refs("users/bob"), json!({}));
    denied(
        &c.create(As::User("alice"), "ff_push_notifications/b2", to_bob)
            .await,
        "even a well-formed one with user_refs and sender",
    );
    // The server (rules bypassed) writes it; clients still cannot read, change or delete it.
    allowed(
        &c.create(As::Server, "ff_push_notifications/b3", broadcast)
            .await,
        "the server",
    );
    denied(
        &c.get(As::User("alice"), "ff_push_notifications/b3").await,
        "reading it",
    );
    denied(
        &c.patch(
            As::User("alice"),
            "ff_push_notifications/b3",
            json!({"status": {"stringValue": "cancelled"}}),
        )
        .await,
        "cancelling it",
    );
    denied(
        &c.delete(As::User("alice"), "ff_push_notifications/b3")
            .await,
        "deleting it",
    );
}

#[tokio::test]
async fn unauthenticated_clients_are_denied_everything() {
    let c = Client::new();
    let fields = c.app_notification("alice", refs("users/bob"), json!({}));
    denied(
        &c.create(As::Nobody, "ff_user_push_notifications/n1", fields)
            .await,
        "an anonymous app notification",
    );
    let token = json!({"fcm_token": {"stringValue": "t"}, "device_type": {"stringValue": "iOS"}});
    denied(
        &c.create(As::Nobody, "users/alice/fcm_tokens/t1", token)
            .await,
        "an anonymous token write",
    );
    allowed(
        &c.patch(
            As::Server,
            "users/alice",
            json!({"display_name": {"stringValue": "A"}}),
        )
        .await,
        "the server seeding a user",
    );
    denied(
        &c.get(As::Nobody, "users/alice").await,
        "an anonymous read of a user",
    );
    denied(
        &c.get(As::Nobody, "ffpush_migrations/001").await,
        "an anonymous read elsewhere",
    );
}

#[tokio::test]
async fn users_manage_their_own_user_document_and_device_tokens_only() {
    let c = Client::new();
    let token = |t: &str| {
        json!({
            "fcm_token": {"stringValue": t},
            "device_type": {"stringValue": "Android"},
            "created_at": {"timestampValue": "2024-05-01T10:00:00Z"},
        })
    };
    allowed(
        &c.patch(
            As::User("alice"),
            "users/alice",
            json!({"email": {"stringValue": "a@x"}}),
        )
        .await,
        "writing one's own user document",
    );
    allowed(
        &c.create(
            As::User("alice"),
            "users/alice/fcm_tokens/t1",
            token("tok-a"),
        )
        .await,
        "writing one's own token",
    );
    allowed(
        &c.get(As::User("alice"), "users/alice/fcm_tokens/t1").await,
        "reading it",
    );
    allowed(
        &c.delete(As::User("alice"), "users/alice/fcm_tokens/t1")
            .await,
        "deleting one's own token (sign-out)",
    );

    allowed(
        &c.create(As::Server, "users/bob/fcm_tokens/t1", token("tok-b"))
            .await,
        "the server seeding bob's token",
    );
    denied(
        &c.create(As::User("alice"), "users/bob/fcm_tokens/t2", token("tok-a"))
            .await,
        "writing a token under another user",
    );
    denied(
        &c.get(As::User("alice"), "users/bob/fcm_tokens/t1").await,
        "reading another user's token",
    );
    denied(
        &c.delete(As::User("alice"), "users/bob/fcm_tokens/t1").await,
        "deleting another user's token",
    );
    denied(
        &c.patch(
            As::User("alice"),
            "users/bob",
            json!({"email": {"stringValue": "x"}}),
        )
        .await,
        "writing another user's document",
    );
    denied(
        &c.create(As::User("alice"), "ffpush_migrations/x", json!({}))
            .await,
        "writing a collection the rules do not name",
    );
}

/// Every query shape in `src/store.rs`, and the index entry that serves it.
const QUERY_SHAPES: &[(&str, &str, &str, &str)] = &[
    // (collection group, field, query scope, why)
    (
        "fcm_tokens",
        "fcm_token",
        "COLLECTION_GROUP",
        "dead-token lookup across users; 002's scan",
    ),
    (
        "fcm_tokens",
        "device_type",
        "COLLECTION_GROUP",
        "broadcast by device type, __name__ slices",
    ),
    (
        "ff_push_notifications",
        "status",
        "COLLECTION",
        "sweep: status IN",
    ),
    (
        "ff_user_push_notifications",
        "status",
        "COLLECTION",
        "sweep: status IN",
    ),
    (
        "ff_push_notifications",
        "scheduled_time",
        "COLLECTION",
        "due scheduled documents",
    ),
    (
        "ff_user_push_notifications",
        "scheduled_time",
        "COLLECTION",
        "due scheduled documents",
    ),
    // `ffpush status` (Store::recent).
    (
        "ff_push_notifications",
        "completed_at",
        "COLLECTION",
        "status: finished, newest first",
    ),
    (
        "ff_user_push_notifications",
        "completed_at",
        "COLLECTION",
        "status: finished, newest first",
    ),
    (
        "ff_push_notifications",
        "timestamp",
        "COLLECTION",
        "status: written with a timestamp, newest first",
    ),
    (
        "ff_user_push_notifications",
        "timestamp",
        "COLLECTION",
        "status: written with a timestamp, newest first",
    ),
];

#[test]
fn the_index_file_serves_every_query_in_the_store() {
    let text = std::fs::read_to_string(migrations_dir().join("firestore.indexes.json"))
        .expect("migrations/firestore.indexes.json");
    let file: Value = serde_json::from_str(&text).expect("the index file is JSON");
    assert!(file["indexes"].is_array(), "`indexes` must be an array");
    let overrides = file["fieldOverrides"]
        .as_array()
        .expect("`fieldOverrides` array");

    for o in overrides {
        for index in o["indexes"]
            .as_array()
            .expect("each override lists its indexes")
        {
            let scope = index["queryScope"].as_str().unwrap_or_default();
            assert!(
                matches!(scope, "COLLECTION" | "COLLECTION_GROUP"),
                "{index}"
            );
            assert!(
                matches!(index["order"].as_str(), Some("ASCENDING" | "DESCENDING"))
                    || index["arrayConfig"] == "CONTAINS",
                "{index}"
            );
        }
    }
    for (group, field, scope, why) in QUERY_SHAPES {
        let served = overrides.iter().any(|o| {
            o["collectionGroup"] == *group
                && o["fieldPath"] == *field
                && o["indexes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|i| i["queryScope"] == *scope && i["order"] == "ASCENDING")
        });
        assert!(
            served,
            "no {scope} ascending index on {group}.{field} ({why})"
        );
    }

    // `ffpush status --failed`: status == "failed" ordered by completed_at, newest first.
    for group in ["ff_push_notifications", "ff_user_push_notifications"] {
        let composite = serde_json::json!({
            "collectionGroup": group,
            "queryScope": "COLLECTION",
            "fields": [
                {"fieldPath": "status", "order": "ASCENDING"},
                {"fieldPath": "completed_at", "order": "DESCENDING"},
            ],
        });
        assert!(
            file["indexes"].as_array().unwrap().contains(&composite),
            "no composite index (status, completed_at desc) on {group}"
        );
    }

    // A field filtered or ordered on in store.rs that the table above does not know about is
    // a query whose index nobody has thought about.
    let store = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store.rs"))
        .unwrap();
    for (i, _) in store.match_indices("field_filter(") {
        let rest = &store[i + "field_filter(".len()..];
        // Calls name the field first; the function's own definition does not.
        let Some(start) = rest.find('"') else {
            continue;
        };
        if !rest[..start].trim().is_empty() {
            continue;
        }
        let name = &rest[start + 1..];
        let name = &name[..name.find('"').unwrap()];
        if name == "__name__" {
            continue;
        }
        assert!(
            QUERY_SHAPES.iter().any(|(_, field, _, _)| field == &name),
            "store.rs filters on `{name}`, which migrations/firestore.indexes.json does not cover"
        );
    }
}
