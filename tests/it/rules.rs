//! `migrations/firestore.rules` as app clients meet it: a Firestore emulator of its own,
//! started with the rules (the shared one runs without), driven over REST the way a
//! FlutterFlow app's SDK does, with Firebase Auth ID tokens the emulator accepts unsigned.
//! First what FlutterFlow apps write, which must pass; then each restriction, shown with the
//! write it stops. Also the structural check of `migrations/firestore.indexes.json` against
//! the queries in `src/store/`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use ffpush::dev::firestore_emulator::FirestoreEmulator;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

// The limits `migrations/firestore.rules` sets at its top (checked against the file by
// `the_limits_these_tests_assume_are_the_rules_files`).
const MAX_RECIPIENTS: usize = 100;
const SCHEDULE_HORIZON_DAYS: i64 = 30;
const MAX_TITLE: usize = 1024;
const MAX_TEXT: usize = 4096;
const MAX_PARAMETER_DATA: usize = 4096;
const MAX_URL: usize = 2048;
const MAX_NAME: usize = 256;
const MAX_USER_ID: usize = 128;
const MAX_TOKEN: usize = 4096;
const MAX_CLOCK_SKEW_MINUTES: i64 = 5;
const MAX_DATA_ENTRIES: usize = 16;
const MAX_DATA_LENGTH: usize = 2048;
const MAX_TRANSLATIONS: usize = 16;
const MAX_TRANSLATIONS_LENGTH: usize = 2048;

fn migrations_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations")
}

fn rules_file() -> PathBuf {
    migrations_dir().join("firestore.rules")
}

fn rules_emulator() -> &'static str {
    static EMULATOR: OnceLock<FirestoreEmulator> = OnceLock::new();
    EMULATOR
        .get_or_init(|| {
            FirestoreEmulator::start_with_rules(None, &rules_file())
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .host_port()
}

/// Who a request is made as.
#[derive(Clone, Copy)]
enum As<'a> {
    /// A signed-in app user with this uid.
    User(&'a str),
    /// A user signed in with Firebase Auth's anonymous provider.
    Anonymous(&'a str),
    /// No `Authorization` header.
    Nobody,
    /// The emulator's owner token: bypasses the rules, like ffpush's service account.
    Server,
}

/// One project on a rules emulator.
struct Client {
    project: String,
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new() -> Client {
        Client::on(rules_emulator())
    }

    fn on(host: &str) -> Client {
        let project = format!("rules-{:016x}", rand::random::<u64>());
        Client {
            base: format!("http://{host}/v1/projects/{project}/databases/(default)/documents"),
            project,
            http: reqwest::Client::new(),
        }
    }

    /// An unsigned (`alg: none`) Firebase Auth ID token, as the emulator accepts.
    fn id_token(&self, uid: &str, provider: &str) -> String {
        let now = Utc::now().timestamp();
        let header = json!({"alg": "none", "typ": "JWT"});
        let claims = json!({
            "sub": uid, "user_id": uid, "aud": self.project,
            "iss": format!("https://securetoken.google.com/{}", self.project),
            "iat": now, "exp": now + 3600, "auth_time": now,
            "firebase": {"sign_in_provider": provider, "identities": {}},
        });
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", part(&header), part(&claims))
    }

    /// The full resource name of `path` in this project.
    fn name(&self, path: &str) -> String {
        format!(
            "projects/{}/databases/(default)/documents/{path}",
            self.project
        )
    }

    /// A reference value to `path` in this project, as the SDKs write references.
    fn reference(&self, path: &str) -> Value {
        json!({ "referenceValue": self.name(path) })
    }

    async fn call(&self, who: As<'_>, method: Method, url: String, body: Option<Value>) -> Answer {
        let mut request = self.http.request(method, url);
        match who {
            As::User(uid) => request = request.bearer_auth(self.id_token(uid, "custom")),
            As::Anonymous(uid) => request = request.bearer_auth(self.id_token(uid, "anonymous")),
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

    /// One atomic commit of `writes` (REST `Write`s): how the SDKs send `set`, `add` and
    /// batched writes.
    async fn commit(&self, who: As<'_>, writes: Vec<Value>) -> Answer {
        let url = format!("{}:commit", self.base);
        self.call(who, Method::POST, url, Some(json!({ "writes": writes })))
            .await
    }

    /// The write `doc(path).set(fields)` sends: the whole document, no precondition.
    fn set(&self, path: &str, fields: &Value) -> Value {
        json!({"update": {"name": self.name(path), "fields": fields}})
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

    /// How many documents `collection` holds (read past the rules).
    async fn stored(&self, collection: &str) -> usize {
        let answer = self.query(As::Server, collection, None).await;
        allowed(&answer, "the server listing a collection");
        answer
            .body
            .as_array()
            .into_iter()
            .flatten()
            .filter(|row| row.get("document").is_some())
            .count()
    }

    /// A minimal app notification: to `to`, from `sender`, plus `extra` fields.
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
        merge(&mut fields, extra);
        fields
    }

    /// What FlutterFlow's "Trigger Push Notification" action writes (its generated
    /// `triggerPushNotification`): title, text, `user_refs` (the recipients' paths joined
    /// with ","), `initial_page_name`, `parameter_data` (JSON text), `sender` (the current
    /// user's reference) and `timestamp` (the device's `DateTime.now()`); the image, sound
    /// and `scheduled_time` only when set (`extra`, which also overrides).
    fn flutterflow_action(&self, sender: &str, user_refs: &str, extra: Value) -> Value {
        let mut fields = json!({
            "notification_title": s("New comment"),
            "notification_text": s("Ana commented on your post"),
            "user_refs": s(user_refs),
            "initial_page_name": s("PostPage"),
            "parameter_data": s("{\"postRef\":\"posts/p7\"}"),
            "sender": self.reference(sender),
            "timestamp": ts(Utc::now()),
        });
        merge(&mut fields, extra);
        fields
    }
}

fn merge(fields: &mut Value, extra: Value) {
    for (k, v) in extra.as_object().into_iter().flatten() {
        fields[k] = v.clone();
    }
}

fn without(mut fields: Value, field: &str) -> Value {
    if let Some(f) = fields.as_object_mut() {
        f.remove(field);
    }
    fields
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

fn s(v: &str) -> Value {
    json!({ "stringValue": v })
}

fn refs(v: &str) -> Value {
    s(v)
}

fn ts(t: DateTime<Utc>) -> Value {
    json!({ "timestampValue": t.to_rfc3339_opts(SecondsFormat::Micros, true) })
}

fn int(n: i64) -> Value {
    json!({ "integerValue": n.to_string() })
}

/// `users/u0,users/u1,…`: `n` recipients as FlutterFlow joins them.
fn user_refs(n: usize) -> String {
    (0..n)
        .map(|i| format!("users/u{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test]
async fn documents_and_tokens_as_flutterflow_apps_write_them_are_allowed() {
    let c = Client::new();
    // The action's `doc().set(…)`, without and with the optional fields.
    let plain = c.flutterflow_action("users/alice", "users/u1", json!({}));
    allowed(
        &c.commit(
            As::User("alice"),
            vec![c.set("ff_user_push_notifications/plain", &plain)],
        )
        .await,
        "the action's document",
    );
    let full = c.flutterflow_action(
        "users/alice",
        "users/u1,users/u2",
        json!({
            "notification_image_url": s("https://example.com/banner.png"),
            "notification_sound": s("default"),
            "scheduled_time": ts(Utc::now() + Duration::hours(2)),
            "initial_page_name": s(""),
            "parameter_data": s("{}"),
        }),
    );
    allowed(
        &c.commit(
            As::User("alice"),
            vec![c.set("ff_user_push_notifications/full", &full)],
        )
        .await,
        "the action's document with an image, a sound and a schedule",
    );
    // As many recipients, as far ahead and texts as long as the rules allow.
    let most = c.flutterflow_action(
        "users/alice",
        &user_refs(MAX_RECIPIENTS),
        json!({
            "scheduled_time": ts(Utc::now() + Duration::days(SCHEDULE_HORIZON_DAYS)
                - Duration::hours(1)),
            "notification_title": s(&"t".repeat(MAX_TITLE)),
            "notification_text": s(&"x".repeat(MAX_TEXT)),
            "parameter_data": s(&"p".repeat(MAX_PARAMETER_DATA)),
            "notification_image_url": s(&"u".repeat(MAX_URL)),
            "initial_page_name": s(&"P".repeat(MAX_NAME)),
            "notification_sound": s(&"S".repeat(MAX_NAME)),
        }),
    );
    allowed(
        &c.create(As::User("alice"), "ff_user_push_notifications/most", most)
            .await,
        "a document at every limit",
    );
    let id_at_limit = format!("users/{}", "i".repeat(MAX_USER_ID));
    allowed(
        &c.create(
            As::User("alice"),
            "ff_user_push_notifications/long_id",
            c.flutterflow_action("users/alice", &id_at_limit, json!({})),
        )
        .await,
        "a recipient id of 128 characters",
    );
    assert_eq!(c.stored("ff_user_push_notifications").await, 4);
    let stored = c
        .get(As::Server, "ff_user_push_notifications/plain")
        .await
        .body;
    assert_eq!(stored["fields"], plain);

    // Device tokens as FlutterFlow's `addFcmToken` and app code add them: `created_at` from
    // the server's clock (`FieldValue.serverTimestamp()`), or from the device's.
    let mut add = c.set(
        "users/alice/fcm_tokens/t1",
        &json!({"fcm_token": s("tok-alice-ios"), "device_type": s("iOS")}),
    );
    add["updateTransforms"] =
        json!([{"fieldPath": "created_at", "setToServerValue": "REQUEST_TIME"}]);
    add["currentDocument"] = json!({"exists": false});
    allowed(
        &c.commit(As::User("alice"), vec![add]).await,
        "a token with a server timestamp",
    );
    allowed(
        &c.create(
            As::User("alice"),
            "users/alice/fcm_tokens/t2",
            json!({
                "fcm_token": s("tok-alice-android"),
                "device_type": s("Android"),
                "created_at": ts(Utc::now()),
            }),
        )
        .await,
        "a token with the device's time",
    );
    // A refreshed token is updated in place; signing out deletes it.
    allowed(
        &c.patch(
            As::User("alice"),
            "users/alice/fcm_tokens/t1",
            json!({"fcm_token": s("tok-alice-ios-2"), "device_type": s("iOS")}),
        )
        .await,
        "updating one's token",
    );
    let t1 = c.get(As::User("alice"), "users/alice/fcm_tokens/t1").await;
    allowed(&t1, "reading one's token");
    assert_eq!(
        t1.body["fields"]["fcm_token"]["stringValue"],
        "tok-alice-ios-2"
    );
    assert!(t1.body["fields"]["created_at"]["timestampValue"].is_string());
    allowed(
        &c.delete(As::User("alice"), "users/alice/fcm_tokens/t2")
            .await,
        "deleting one's token",
    );
}

#[tokio::test]
async fn one_commit_cannot_name_more_recipients_than_the_limit() {
    let c = Client::new();
    // 500 documents (a commit's most) naming one user too many each: 50 500 token reads.
    let one_too_many =
        c.flutterflow_action("users/alice", &user_refs(MAX_RECIPIENTS + 1), json!({}));
    let writes = (0..500)
        .map(|i| c.set(&format!("ff_user_push_notifications/n{i}"), &one_too_many))
        .collect();
    denied(
        &c.commit(As::User("alice"), writes).await,
        "a commit of 500 documents naming 101 users each",
    );
    // One document naming 29 000 users.
    let huge = c.flutterflow_action("users/alice", &user_refs(29_000), json!({}));
    denied(
        &c.create(As::User("alice"), "ff_user_push_notifications/huge", huge)
            .await,
        "a document naming 29 000 users",
    );
    assert_eq!(c.stored("ff_user_push_notifications").await, 0);
}

#[tokio::test]
async fn user_refs_is_a_list_of_user_document_paths_as_flutterflow_joins_them() {
    let c = Client::new();
    let cases = [
        (
            "a path outside the users collection",
            s("users/bob,posts/p1"),
        ),
        ("a path below a user document", s("users/bob/fcm_tokens/t1")),
        ("an empty entry", s("users/bob,,users/carol")),
        ("a trailing comma", s("users/bob,")),
        ("spaces around entries", s("users/bob, users/carol")),
        ("a leading slash", s("/users/bob")),
        (
            "a user id longer than Firebase Auth's 128 characters",
            s(&format!("users/{}", "i".repeat(MAX_USER_ID + 1))),
        ),
        (
            "an array of references",
            json!({"arrayValue": {"values": [c.reference("users/bob")]}}),
        ),
        (
            "an array of paths",
            json!({"arrayValue": {"values": [s("users/bob")]}}),
        ),
        ("a single reference", c.reference("users/bob")),
    ];
    for (i, (what, user_refs)) in cases.into_iter().enumerate() {
        let fields = c.flutterflow_action("users/alice", "", json!({ "user_refs": user_refs }));
        let path = format!("ff_user_push_notifications/bad{i}");
        denied(&c.create(As::User("alice"), &path, fields).await, what);
    }
    assert_eq!(c.stored("ff_user_push_notifications").await, 0);
}

#[tokio::test]
async fn scheduled_time_is_at_most_the_horizon_ahead() {
    let c = Client::new();
    let past_horizon = Utc::now() + Duration::days(SCHEDULE_HORIZON_DAYS) + Duration::hours(1);
    let cases = [
        (
            "the year 9999",
            json!({"timestampValue": "9999-12-31T23:59:59Z"}),
        ),
        ("an hour past the horizon", ts(past_horizon)),
        ("a string", s("2030-01-01T00:00:00Z")),
        ("null", json!({"nullValue": null})),
    ];
    for (i, (what, at)) in cases.into_iter().enumerate() {
        let fields =
            c.flutterflow_action("users/alice", "users/bob", json!({ "scheduled_time": at }));
        let path = format!("ff_user_push_notifications/bad{i}");
        denied(
            &c.create(As::User("alice"), &path, fields).await,
            &format!("scheduled_time {what}"),
        );
    }
    assert_eq!(c.stored("ff_user_push_notifications").await, 0);
    // A time already past is fine: ffpush sends it at once (or fails it as expired).
    let fields = c.flutterflow_action(
        "users/alice",
        "users/bob",
        json!({ "scheduled_time": ts(Utc::now() - Duration::hours(1)) }),
    );
    allowed(
        &c.create(As::User("alice"), "ff_user_push_notifications/past", fields)
            .await,
        "scheduled_time in the past",
    );
}

#[tokio::test]
async fn text_fields_have_their_types_and_bounded_sizes() {
    let c = Client::new();
    let long = |n: usize| s(&"x".repeat(n));
    let cases = [
        ("a 1 MB title", "notification_title", long(1_000_000)),
        (
            "a title over the limit",
            "notification_title",
            long(MAX_TITLE + 1),
        ),
        (
            "a text over the limit",
            "notification_text",
            long(MAX_TEXT + 1),
        ),
        (
            "parameter_data over the limit",
            "parameter_data",
            long(MAX_PARAMETER_DATA + 1),
        ),
        (
            "an image URL over the limit",
            "notification_image_url",
            long(MAX_URL + 1),
        ),
        (
            "a page name over the limit",
            "initial_page_name",
            long(MAX_NAME + 1),
        ),
        (
            "a sound over the limit",
            "notification_sound",
            long(MAX_NAME + 1),
        ),
        ("an empty title", "notification_title", s("")),
        ("an empty text", "notification_text", s("")),
        ("a title that is a number", "notification_title", int(1)),
        (
            "parameter_data as a map, not JSON text",
            "parameter_data",
            json!({"mapValue": {"fields": {"a": s("b")}}}),
        ),
        (
            "a null image URL",
            "notification_image_url",
            json!({"nullValue": null}),
        ),
        ("timestamp as a string", "timestamp", s("now")),
    ];
    for (i, (what, field, value)) in cases.into_iter().enumerate() {
        let fields = c.flutterflow_action("users/alice", "users/bob", json!({ field: value }));
        let path = format!("ff_user_push_notifications/bad{i}");
        denied(&c.create(As::User("alice"), &path, fields).await, what);
    }
    for required in ["notification_title", "notification_text"] {
        let fields = without(
            c.flutterflow_action("users/alice", "users/bob", json!({})),
            required,
        );
        let path = format!("ff_user_push_notifications/without_{required}");
        denied(
            &c.create(As::User("alice"), &path, fields).await,
            &format!("a notification without `{required}`"),
        );
    }
    assert_eq!(c.stored("ff_user_push_notifications").await, 0);
}

#[tokio::test]
async fn fields_flutterflow_does_not_write_are_denied() {
    let c = Client::new();
    let unknown = [
        ("target_audience", s("All")),
        ("batch_index", int(0)),
        ("num_batches", int(10)),
        ("not_ffpush_", s("x")),
        ("target_topic", s("news")),
        ("target_condition", s("'news' in topics")),
        ("notification_badges", int(1)),
        (
            "data",
            json!({"mapValue": {"fields": {"a": s(&"x".repeat(100_000))}}}),
        ),
    ];
    for (field, value) in unknown {
        let fields = c.flutterflow_action("users/alice", "users/bob", json!({ field: value }));
        let path = format!("ff_user_push_notifications/with_{field}");
        denied(
            &c.create(As::User("alice"), &path, fields).await,
            &format!("a notification carrying `{field}`"),
        );
    }
    assert_eq!(c.stored("ff_user_push_notifications").await, 0);
}

fn boolean(b: bool) -> Value {
    json!({ "booleanValue": b })
}

/// A `data` map of `pairs`, as the SDKs write a map.
fn data_map(pairs: &[(String, Value)]) -> Value {
    let fields: serde_json::Map<String, Value> = pairs.iter().cloned().collect();
    json!({ "mapValue": { "fields": fields } })
}

/// `n` entries whose keys and values come to `length` characters together.
fn data_of(n: usize, length: usize) -> Value {
    let keys: Vec<String> = (0..n).map(|i| format!("k{i:02}")).collect();
    let key_chars: usize = keys.iter().map(String::len).sum();
    let mut left = length - key_chars;
    let pairs: Vec<(String, Value)> = keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| {
            let size = if i + 1 == n { left } else { left / (n - i) };
            left -= size;
            (k, s(&"v".repeat(size)))
        })
        .collect();
    data_map(&pairs)
}

/// Every message option at its most.
fn all_options() -> Value {
    json!({
        "notification_badge": int(2147483647),
        "android_channel_id": s(&"c".repeat(MAX_NAME)),
        "priority": s("high"),
        "ttl_seconds": int(2419200),
        "collapse_key": s(&"k".repeat(64)),
        "silent": boolean(false),
        "data": data_of(MAX_DATA_ENTRIES, MAX_DATA_LENGTH),
        "analytics_label": s(&format!("Spring-sale_2.0~%{}", "x".repeat(33))),
        "dry_run": boolean(true),
    })
}

#[tokio::test]
async fn app_documents_may_set_the_message_options() {
    let c = Client::new();
    let cases = [
        ("every option at its most", all_options()),
        (
            "normal priority, nothing kept, no data",
            json!({"priority": s("normal"), "ttl_seconds": int(0), "notification_badge": int(0), "data": data_map(&[])}),
        ),
        (
            "a silent push with data",
            json!({"silent": boolean(true), "data": data_map(&[("sync".into(), s("inbox"))])}),
        ),
    ];
    for (i, (what, extra)) in cases.into_iter().enumerate() {
        let fields = c.flutterflow_action("users/alice", "users/bob", extra);
        let path = format!("ff_user_push_notifications/ok{i}");
        allowed(&c.create(As::User("alice"), &path, fields).await, what);
    }
    // A silent push shows nothing: its title and text may be left out.
    let silent = without(
        without(
            c.flutterflow_action("users/alice", "users/bob", json!({"silent": boolean(true)})),
            "notification_title",
        ),
        "notification_text",
    );
    allowed(
        &c.create(
            As::User("alice"),
            "ff_user_push_notifications/silent",
            silent,
        )
        .await,
        "a silent push without title and text",
    );
}

#[tokio::test]
async fn message_options_are_bounded_and_topics_are_for_trusted_back_ends() {
    let c = Client::new();
    let data = |key: &str, value: Value| data_map(&[(key.to_string(), value)]);
    let cases = [
        ("a negative badge", json!({"notification_badge": int(-1)})),
        (
            "a badge over int32",
            json!({"notification_badge": int(2147483648)}),
        ),
        ("a badge as text", json!({"notification_badge": s("3")})),
        (
            "a channel over the limit",
            json!({"android_channel_id": s(&"c".repeat(MAX_NAME + 1))}),
        ),
        ("priority in capitals", json!({"priority": s("HIGH")})),
        ("priority as a number", json!({"priority": int(10)})),
        ("a TTL over 28 days", json!({"ttl_seconds": int(2419201)})),
        ("a negative TTL", json!({"ttl_seconds": int(-1)})),
        (
            "a collapse key over 64",
            json!({"collapse_key": s(&"k".repeat(65))}),
        ),
        ("silent as text", json!({"silent": s("true")})),
        ("dry_run as text", json!({"dry_run": s("true")})),
        ("data as text", json!({"data": s("kind=chat")})),
        ("a number in data", json!({"data": data("n", int(1))})),
        (
            "a number as the last of the most entries",
            json!({"data": {"mapValue": {"fields": (0..MAX_DATA_ENTRIES)
                .map(|i| (format!("k{i:02}"), if i + 1 == MAX_DATA_ENTRIES { int(1) } else { s("v") }))
                .collect::<serde_json::Map<String, Value>>()}}}),
        ),
        (
            "a map in data",
            json!({"data": data("m", data("a", s("b")))}),
        ),
        (
            "data over its length",
            json!({"data": data_of(4, MAX_DATA_LENGTH + 1)}),
        ),
        (
            "data over its entries",
            json!({"data": data_of(MAX_DATA_ENTRIES + 1, 100)}),
        ),
        (
            "data: initialPageName",
            json!({"data": data("initialPageName", s("x"))}),
        ),
        (
            "data: parameterData",
            json!({"data": data("parameterData", s("x"))}),
        ),
        ("data: from", json!({"data": data("from", s("x"))})),
        (
            "data: notification",
            json!({"data": data("notification", s("x"))}),
        ),
        (
            "data: message_type",
            json!({"data": data("message_type", s("x"))}),
        ),
        (
            "data: google.*",
            json!({"data": data("google.c.a.e", s("1"))}),
        ),
        ("data: gcm.*", json!({"data": data("gcm.n.e", s("1"))})),
        (
            "an analytics label with a space",
            json!({"analytics_label": s("spring sale")}),
        ),
        (
            "an analytics label over 50",
            json!({"analytics_label": s(&"a".repeat(51))}),
        ),
        (
            "an empty analytics label",
            json!({"analytics_label": s("")}),
        ),
        (
            "a silent push with a sound",
            json!({"silent": boolean(true), "notification_sound": s("default")}),
        ),
        (
            "a silent push with a badge",
            json!({"silent": boolean(true), "notification_badge": int(1)}),
        ),
        ("a topic", json!({"target_topic": s("news")})),
        (
            "a condition",
            json!({"target_condition": s("'news' in topics")}),
        ),
    ];
    for (i, (what, extra)) in cases.into_iter().enumerate() {
        let fields = c.flutterflow_action("users/alice", "users/bob", extra);
        let path = format!("ff_user_push_notifications/bad{i}");
        denied(&c.create(As::User("alice"), &path, fields).await, what);
    }
    // Not silent: the title and text stay required.
    let untitled = without(
        c.flutterflow_action(
            "users/alice",
            "users/bob",
            json!({"silent": boolean(false)}),
        ),
        "notification_title",
    );
    denied(
        &c.create(
            As::User("alice"),
            "ff_user_push_notifications/untitled",
            untitled,
        )
        .await,
        "a notification without a title that is not silent",
    );
    // A topic without user_refs is no app notification either.
    let topic = without(
        c.flutterflow_action(
            "users/alice",
            "users/bob",
            json!({"target_topic": s("news")}),
        ),
        "user_refs",
    );
    denied(
        &c.create(As::User("alice"), "ff_user_push_notifications/topic", topic)
            .await,
        "a topic instead of user_refs",
    );
    assert_eq!(c.stored("ff_user_push_notifications").await, 0);
}

#[tokio::test]
async fn token_documents_hold_a_token_a_device_type_and_a_past_creation_time_only() {
    let c = Client::new();
    let token = |extra: Value| {
        let mut fields = json!({
            "fcm_token": s("tok-alice"),
            "device_type": s("iOS"),
            "created_at": ts(Utc::now() - Duration::days(1)),
        });
        merge(&mut fields, extra);
        fields
    };
    let cases = [
        ("an unknown field", token(json!({"owner": s("mallory")}))),
        ("an empty token", token(json!({"fcm_token": s("")}))),
        ("no token", without(token(json!({})), "fcm_token")),
        (
            "a token that is a number",
            token(json!({"fcm_token": int(1)})),
        ),
        (
            "a token over the size limit",
            token(json!({"fcm_token": s(&"t".repeat(MAX_TOKEN + 1))})),
        ),
        (
            "a device type that is a number",
            token(json!({"device_type": int(1)})),
        ),
        (
            "a device type over the size limit",
            token(json!({"device_type": s(&"d".repeat(MAX_NAME + 1))})),
        ),
        (
            "created_at in the year 9999",
            token(json!({"created_at": {"timestampValue": "9999-12-31T23:59:59Z"}})),
        ),
        (
            "created_at past the allowed clock skew",
            token(json!({"created_at": ts(Utc::now()
                + Duration::minutes(MAX_CLOCK_SKEW_MINUTES) + Duration::minutes(10))})),
        ),
        (
            "created_at as a string",
            token(json!({"created_at": s("2024-05-01")})),
        ),
    ];
    for (i, (what, fields)) in cases.into_iter().enumerate() {
        let path = format!("users/alice/fcm_tokens/bad{i}");
        denied(&c.create(As::User("alice"), &path, fields).await, what);
        assert_eq!(
            c.get(As::Server, &path).await.status,
            StatusCode::NOT_FOUND,
            "{what}"
        );
    }

    // A device whose clock runs a little fast still registers.
    allowed(
        &c.create(
            As::User("alice"),
            "users/alice/fcm_tokens/t1",
            token(json!({"created_at": ts(Utc::now() + Duration::minutes(1))})),
        )
        .await,
        "created_at a minute ahead",
    );
    let updates = [
        (
            "moving created_at to 9999",
            json!({"created_at": {"timestampValue": "9999-12-31T23:59:59Z"}}),
        ),
        ("adding a field", json!({"owner": s("mallory")})),
        ("emptying the token", json!({"fcm_token": s("")})),
    ];
    for (what, fields) in updates {
        denied(
            &c.patch(As::User("alice"), "users/alice/fcm_tokens/t1", fields)
                .await,
            what,
        );
    }
    let stored = c.get(As::Server, "users/alice/fcm_tokens/t1").await.body;
    assert_eq!(stored["fields"]["fcm_token"]["stringValue"], "tok-alice");
    assert!(stored["fields"].get("owner").is_none());
}

#[tokio::test]
async fn anonymous_users_may_register_tokens_but_not_send() {
    let c = Client::new();
    denied(
        &c.create(
            As::Anonymous("anon"),
            "ff_user_push_notifications/n1",
            c.flutterflow_action("users/anon", "users/bob", json!({})),
        )
        .await,
        "a notification from an anonymous user",
    );
    allowed(
        &c.create(
            As::Anonymous("anon"),
            "users/anon/fcm_tokens/t1",
            json!({"fcm_token": s("tok-anon"), "device_type": s("Android"), "created_at": ts(Utc::now())}),
        )
        .await,
        "an anonymous user registering their device",
    );
    assert_eq!(c.stored("ff_user_push_notifications").await, 0);
}

#[tokio::test]
async fn the_users_collection_and_anonymous_senders_are_set_at_the_top_of_the_rules() {
    // A project whose users collection is `Users`, letting anonymous users send: the two
    // one-line changes the rules file's header describes.
    let rules = std::fs::read_to_string(rules_file()).expect("migrations/firestore.rules");
    let edits = [
        (
            "function usersCollection() { return 'users'; }",
            "function usersCollection() { return 'Users'; }",
        ),
        (
            "function allowAnonymousSenders() { return false; }",
            "function allowAnonymousSenders() { return true; }",
        ),
    ];
    let mut adapted = rules.clone();
    for (from, to) in edits {
        assert!(
            adapted.contains(from),
            "the rules file should define `{from}`"
        );
        adapted = adapted.replacen(from, to, 1);
    }
    let dir = std::env::temp_dir().join(format!("ffpush-rules-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("firestore.rules");
    std::fs::write(&file, adapted).unwrap();
    let emulator =
        FirestoreEmulator::start_with_rules(None, &file).unwrap_or_else(|e| panic!("{e}"));
    let c = Client::on(emulator.host_port());

    allowed(
        &c.create(
            As::User("alice"),
            "ff_user_push_notifications/n1",
            c.flutterflow_action("Users/alice", "Users/u1,Users/u2", json!({})),
        )
        .await,
        "a notification within `Users`",
    );
    denied(
        &c.create(
            As::User("alice"),
            "ff_user_push_notifications/n2",
            c.flutterflow_action("Users/alice", "users/u1", json!({})),
        )
        .await,
        "recipients in `users`",
    );
    denied(
        &c.create(
            As::User("alice"),
            "ff_user_push_notifications/n3",
            c.flutterflow_action("users/alice", "Users/u1", json!({})),
        )
        .await,
        "a sender in `users`",
    );
    let token =
        json!({"fcm_token": s("tok"), "device_type": s("iOS"), "created_at": ts(Utc::now())});
    allowed(
        &c.create(
            As::User("alice"),
            "Users/alice/fcm_tokens/t1",
            token.clone(),
        )
        .await,
        "a token under `Users`",
    );
    denied(
        &c.create(As::User("alice"), "users/alice/fcm_tokens/t1", token)
            .await,
        "a token under `users`",
    );
    allowed(
        &c.create(
            As::Anonymous("anon"),
            "ff_user_push_notifications/n4",
            c.flutterflow_action("Users/anon", "Users/u1", json!({})),
        )
        .await,
        "an anonymous sender, once allowed",
    );
    drop(emulator);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `n` languages (`la`, `lb`, … `lz`, `ma`, …) whose codes and texts come to `length`
/// characters together. (A number as a text passes the rules, which cannot afford a type
/// check per entry beside `data`'s within their 1 000 expressions; the worker fails it,
/// naming the entry: tests/it/i18n.rs.)
fn translations_of(n: usize, length: usize) -> Value {
    let codes: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{}{}",
                (b'l' + (i / 26) as u8) as char,
                (b'a' + (i % 26) as u8) as char
            )
        })
        .collect();
    let mut left = length - codes.iter().map(String::len).sum::<usize>();
    let pairs: Vec<(String, Value)> = codes
        .into_iter()
        .enumerate()
        .map(|(i, code)| {
            let size = if i + 1 == n { left } else { left / (n - i) };
            left -= size;
            (code, s(&"t".repeat(size)))
        })
        .collect();
    data_map(&pairs)
}

#[tokio::test]
async fn app_documents_may_carry_translations_within_their_bounds() {
    let c = Client::new();
    let texts = |pairs: &[(&str, Value)]| {
        data_map(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<Vec<_>>(),
        )
    };
    let fine = [
        (
            "German and Brazilian Portuguese",
            json!({
                "notification_title_i18n": texts(&[("de", s("Hallo")), ("pt-BR", s("Oi")), ("zh_Hant", s("你好"))]),
                "notification_text_i18n": texts(&[("de", s("Neu"))]),
            }),
        ),
        (
            "both maps at their most",
            json!({
                "notification_title_i18n": translations_of(MAX_TRANSLATIONS, MAX_TRANSLATIONS_LENGTH),
                "notification_text_i18n": translations_of(MAX_TRANSLATIONS, MAX_TRANSLATIONS_LENGTH),
            }),
        ),
        (
            "an empty map",
            json!({"notification_text_i18n": texts(&[])}),
        ),
    ];
    for (i, (what, extra)) in fine.into_iter().enumerate() {
        let fields = c.flutterflow_action("users/alice", "users/bob", extra);
        let path = format!("ff_user_push_notifications/i18n_ok{i}");
        allowed(&c.create(As::User("alice"), &path, fields).await, what);
    }
    let refused = [
        (
            "a map as text",
            json!({"notification_title_i18n": s("Hallo")}),
        ),
        (
            "a name, not a code",
            json!({"notification_title_i18n": texts(&[("german", s("Hallo"))])}),
        ),
        (
            "a code with a space",
            json!({"notification_text_i18n": texts(&[("de", s("a")), ("pt BR", s("b"))])}),
        ),
        (
            "an empty text",
            json!({"notification_text_i18n": texts(&[("de", s(""))])}),
        ),
        (
            "a map as text",
            json!({"notification_title_i18n": texts(&[("de", texts(&[("a", s("b"))]))])}),
        ),
        (
            "too many languages",
            json!({"notification_title_i18n": translations_of(MAX_TRANSLATIONS + 1, 100)}),
        ),
        (
            "over the length",
            json!({"notification_text_i18n": translations_of(4, MAX_TRANSLATIONS_LENGTH + 1)}),
        ),
    ];
    for (i, (what, extra)) in refused.into_iter().enumerate() {
        let fields = c.flutterflow_action("users/alice", "users/bob", extra);
        let path = format!("ff_user_push_notifications/i18n_bad{i}");
        denied(&c.create(As::User("alice"), &path, fields).await, what);
    }
}

#[test]
fn the_limits_these_tests_assume_are_the_rules_files() {
    let rules = std::fs::read_to_string(rules_file()).expect("migrations/firestore.rules");
    let limits = [
        ("maxRecipients", MAX_RECIPIENTS.to_string()),
        ("scheduleHorizonDays", SCHEDULE_HORIZON_DAYS.to_string()),
        ("maxTitleLength", MAX_TITLE.to_string()),
        ("maxTextLength", MAX_TEXT.to_string()),
        ("maxParameterDataLength", MAX_PARAMETER_DATA.to_string()),
        ("maxUrlLength", MAX_URL.to_string()),
        ("maxNameLength", MAX_NAME.to_string()),
        ("maxUserIdLength", MAX_USER_ID.to_string()),
        ("maxTokenLength", MAX_TOKEN.to_string()),
        ("maxDataEntries", MAX_DATA_ENTRIES.to_string()),
        ("maxDataLength", MAX_DATA_LENGTH.to_string()),
        ("maxTranslations", MAX_TRANSLATIONS.to_string()),
        ("maxTranslationsLength", MAX_TRANSLATIONS_LENGTH.to_string()),
        (
            "maxClockSkew",
            format!("duration.value({MAX_CLOCK_SKEW_MINUTES}, 'm')"),
        ),
    ];
    for (function, value) in limits {
        let line = format!("function {function}() {{ return {value}; }}");
        assert!(
            rules.contains(&line),
            "migrations/firestore.rules should define `{line}`"
        );
    }
}

#[tokio::test]
async fn a_sender_may_cancel_their_notification_before_it_starts_and_change_nothing_else() {
    let c = Client::new();
    let path = "ff_user_push_notifications/n1";
    let scheduled = json!({ "scheduled_time": ts(Utc::now() + Duration::days(1)) });
    allowed(
        &c.create(
            As::User("alice"),
            path,
            c.flutterflow_action("users/alice", "users/bob", scheduled.clone()),
        )
        .await,
        "creating it",
    );
    let cancel = json!({"status": s("cancelled")});
    denied(
        &c.patch(As::User("bob"), path, cancel.clone()).await,
        "another user cancelling it",
    );
    let edits = [
        ("setting another status", json!({"status": s("succeeded")})),
        ("setting an empty status", json!({"status": s("")})),
        (
            "cancelling and editing at once",
            json!({"status": s("cancelled"), "notification_text": s("edited")}),
        ),
        (
            "editing the text",
            json!({"notification_text": s("edited")}),
        ),
        (
            "changing the recipients",
            json!({"user_refs": s("users/carol")}),
        ),
        (
            "moving the schedule",
            json!({"scheduled_time": ts(Utc::now() + Duration::days(2))}),
        ),
        ("writing an outcome field", json!({"num_sent": int(0)})),
    ];
    for (what, fields) in edits {
        denied(
            &c.patch(As::User("alice"), path, fields).await,
            &format!("the sender {what}"),
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

    allowed(
        &c.patch(As::User("alice"), path, cancel.clone()).await,
        "the sender cancelling it",
    );
    let stored = c.get(As::Server, path).await.body;
    assert_eq!(stored["fields"]["status"]["stringValue"], "cancelled");
    assert_eq!(
        stored["fields"]["notification_text"]["stringValue"],
        "Ana commented on your post"
    );
    denied(
        &c.patch(As::User("alice"), path, json!({"status": s("")}))
            .await,
        "the sender undoing the cancel",
    );

    // Once ffpush has started or finished it, it is too late.
    for status in ["started", "succeeded", "failed"] {
        let path = format!("ff_user_push_notifications/{status}");
        allowed(
            &c.create(
                As::User("alice"),
                &path,
                c.flutterflow_action("users/alice", "users/bob", scheduled.clone()),
            )
            .await,
            "creating it",
        );
        allowed(
            &c.patch(As::Server, &path, json!({"status": s(status)}))
                .await,
            "ffpush writing a status",
        );
        denied(
            &c.patch(As::User("alice"), &path, cancel.clone()).await,
            &format!("cancelling a {status} notification"),
        );
    }
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
    let scheduled = c.app_notification(
        "alice",
        refs("users/bob"),
        json!({"scheduled_time": ts(Utc::now() + Duration::days(1))}),
    );
    allowed(
        &c.create(
            As::User("alice"),
            "ff_user_push_notifications/n2",
            scheduled,
        )
        .await,
        "a scheduled notification",
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
    assert_eq!(c.stored("ff_user_push_notifications").await, 0);
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

/// The instances' heartbeats: what each paces at is none of an app user's business, and a
/// forged heartbeat would take a share of the project's FCM rate from the real ones.
#[tokio::test]
async fn ffpush_instances_is_closed_to_clients() {
    let c = Client::new();
    let heartbeat = json!({
        "worker": {"stringValue": "alice"},
        "rate": {"integerValue": "9500"},
        "share": {"doubleValue": 9500.0},
        "lifetime_ms": {"integerValue": "10000"},
    });
    allowed(
        &c.create(As::Server, "ffpush_instances/w1", heartbeat.clone())
            .await,
        "the server (an instance's service account)",
    );
    // Even under an id equal to the user's uid (the users' own rule is keyed by it).
    for path in ["ffpush_instances/alice", "ffpush_instances/w2"] {
        denied(
            &c.create(As::User("alice"), path, heartbeat.clone()).await,
            "an app user writing a heartbeat",
        );
    }
    denied(
        &c.get(As::User("alice"), "ffpush_instances/w1").await,
        "reading one",
    );
    denied(
        &c.query(As::User("alice"), "ffpush_instances", None).await,
        "listing them",
    );
    denied(
        &c.patch(
            As::User("alice"),
            "ffpush_instances/w1",
            json!({"share": {"doubleValue": 0.0}}),
        )
        .await,
        "changing one",
    );
    denied(
        &c.delete(As::User("alice"), "ffpush_instances/w1").await,
        "deleting one",
    );
    assert_eq!(c.stored("ffpush_instances").await, 1);
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

/// Every query shape in `src/store/`, and the index entry that serves it.
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

    // A field filtered or ordered on in src/store/ that the table above does not know about is
    // a query whose index nobody has thought about.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
    let mut store = String::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        store += &std::fs::read_to_string(entry.unwrap().path()).unwrap();
    }
    assert!(
        store.contains("field_filter("),
        "no queries found in {dir:?}"
    );
    // Field names spelled once in src/fields.rs: `pub const NAME: &str = "value";`.
    let consts =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fields.rs"))
            .unwrap();
    let constant = |ident: &str| {
        consts.lines().find_map(|line| {
            let rest = line.strip_prefix("pub const ")?.strip_prefix(ident)?;
            let value = rest.strip_prefix(": &str = \"")?;
            Some(value[..value.find('"')?].to_string())
        })
    };
    let mut checked = 0;
    for (i, _) in store.match_indices("field_filter(") {
        let rest = store[i + "field_filter(".len()..].trim_start();
        // Calls name the field first (a literal or a `fields::` constant); the function's own
        // definition does not.
        let name = if let Some(literal) = rest.strip_prefix('"') {
            literal[..literal.find('"').unwrap()].to_string()
        } else if let Some(path) = rest.strip_prefix("fields::") {
            let ident: String = path
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            constant(&ident).unwrap_or_else(|| panic!("fields::{ident} is not in src/fields.rs"))
        } else {
            continue;
        };
        checked += 1;
        if name == "__name__" {
            continue;
        }
        assert!(
            QUERY_SHAPES.iter().any(|(_, field, _, _)| field == &name),
            "src/store/ filters on `{name}`, which migrations/firestore.indexes.json does not cover"
        );
    }
    assert!(checked > 0, "no field_filter call's field read in {dir:?}");
}
