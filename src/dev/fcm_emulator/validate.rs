//! FCM's checks on a send request, answered as FCM answers them: 400 INVALID_ARGUMENT with a
//! `google.rpc.BadRequest` naming the offending field.
//!
//! Map entries (`data`, `headers`) are numbered in the iteration order of `serde_json::Map`,
//! which is sorted by key because the crate does not enable serde_json's `preserve_order`.
//! FCM numbers them in request order; the two agree whenever keys arrive sorted.

use serde_json::{Map, Value, json};

type Object = Map<String, Value>;

/// Largest payload FCM accepts, serialized message without its target.
const MAX_PAYLOAD: usize = 4096;
/// Topic messages get half.
const MAX_TOPIC_PAYLOAD: usize = 2048;
/// Four weeks, FCM's longest TTL.
const MAX_TTL_SECS: u64 = 2_419_200;

// Field names FCM knows at each level we model; anything else is an unknown name.
const TOP_LEVEL: &[&str] = &["message", "validate_only"];
#[rustfmt::skip]
const MESSAGE: &[&str] = &[
    "token", "topic", "condition", "name", "data", "notification", "android", "apns", "webpush",
    "fcm_options",
];
const NOTIFICATION: &[&str] = &["title", "body", "image"];
#[rustfmt::skip]
const ANDROID: &[&str] = &[
    "collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification",
    "fcm_options", "direct_boot_ok",
];
#[rustfmt::skip]
const ANDROID_NOTIFICATION: &[&str] = &[
    "title", "body", "icon", "color", "sound", "tag", "click_action", "body_loc_key",
    "body_loc_args", "title_loc_key", "title_loc_args", "channel_id", "ticker", "sticky",
    "event_time", "local_only", "notification_priority", "default_sound",
    "default_vibrate_timings", "default_light_settings", "vibrate_timings", "visibility",
    "notification_count", "light_settings", "image",
];
const APNS: &[&str] = &["headers", "payload", "fcm_options"];
const WEBPUSH: &[&str] = &["headers", "data", "notification", "fcm_options"];
const MESSAGE_FCM_OPTIONS: &[&str] = &["analytics_label"];
const ANDROID_FCM_OPTIONS: &[&str] = &["analytics_label"];
const APNS_FCM_OPTIONS: &[&str] = &["analytics_label", "image"];
const WEBPUSH_FCM_OPTIONS: &[&str] = &["link", "analytics_label"];

// `AndroidNotification`'s fields by type; the enums and nested messages are not checked
// (<https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#AndroidNotification>).
#[rustfmt::skip]
const ANDROID_NOTIFICATION_STRINGS: &[&str] = &[
    "title", "body", "icon", "color", "sound", "tag", "click_action", "body_loc_key",
    "title_loc_key", "channel_id", "ticker", "event_time", "image",
];
#[rustfmt::skip]
const ANDROID_NOTIFICATION_BOOLS: &[&str] = &[
    "sticky", "local_only", "default_sound", "default_vibrate_timings", "default_light_settings",
];
/// `AndroidMessagePriority`: its names, and the numbers proto3 JSON also takes for them
/// (<https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#AndroidMessagePriority>).
const ANDROID_PRIORITIES: &[&str] = &["NORMAL", "HIGH"];
// The APNs request headers' values
// (<https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns>).
/// `apns-priority` values APNs takes.
const APNS_PRIORITIES: &[&str] = &["10", "5", "1"];
/// `apns-push-type` values APNs takes.
#[rustfmt::skip]
const APNS_PUSH_TYPES: &[&str] = &[
    "alert", "background", "location", "voip", "complication", "fileprovider", "mdm",
    "liveactivity", "pushtokens",
];
/// Longest `apns-collapse-id` APNs takes, in bytes.
const MAX_APNS_COLLAPSE_ID: usize = 64;
/// `aps` keys that show, sound or badge: never in a background push.
const APS_SHOWN: &[&str] = &["alert", "badge", "sound"];

/// Data keys FCM keeps for itself (`data` in
/// <https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#Message>, and the
/// legacy protocol's list: `from`, `notification`, `message_type`, `google…`, `gcm…`).
const RESERVED_DATA_KEYS: &[&str] = &["from", "gcm", "notification", "message_type"];
const RESERVED_DATA_PREFIXES: &[&str] = &["google.", "gcm."];

/// The one field FCM blames for a rejected request.
#[derive(Debug, PartialEq)]
pub(super) struct Violation {
    /// Path such as `message.data[0].value`; `None` for the request itself, where Google
    /// leaves the field out.
    pub field: Option<String>,
    pub description: String,
}

impl Violation {
    fn at(field: &str, description: impl Into<String>) -> Self {
        Violation {
            field: Some(field.to_owned()),
            description: description.into(),
        }
    }

    /// A field holding a value of the wrong type, worded as FCM words it.
    fn invalid_value(field: &str, expected: &str, value: &Value) -> Self {
        Violation::at(
            field,
            format!("Invalid value at '{field}' ({expected}), {value}"),
        )
    }

    fn unknown_name(parent: Option<&str>, name: &str) -> Self {
        match parent {
            Some(path) => Violation::at(
                path,
                format!(
                    "Invalid JSON payload received. Unknown name \"{name}\" at '{path}': Cannot find field."
                ),
            ),
            None => Violation {
                field: None,
                description: format!(
                    "Invalid JSON payload received. Unknown name \"{name}\": Cannot find field."
                ),
            },
        }
    }

    /// The 400 body, shaped like the fixture `INVALID_ARGUMENT_bad_value`.
    pub fn body(&self) -> Value {
        let mut violation = Map::new();
        if let Some(field) = &self.field {
            violation.insert("field".into(), json!(field));
        }
        violation.insert("description".into(), json!(self.description));
        json!({"error": {
            "code": 400,
            "message": self.description,
            "status": "INVALID_ARGUMENT",
            "details": [{
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [violation],
            }],
        }})
    }
}

/// A send request that passed every check.
#[derive(Debug)]
pub(super) struct SendRequest {
    pub message: Value,
    pub token: Option<String>,
    pub topic: Option<String>,
    pub validate_only: bool,
}

/// Checks a raw `messages:send` body.
pub(super) fn send_request(body: &[u8]) -> Result<SendRequest, Violation> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| Violation::at("message", format!("Invalid JSON payload received. {e}")))?;
    let Value::Object(request) = request else {
        return Err(Violation::at(
            "message",
            format!("Invalid JSON payload received. Expected an object, got {request}"),
        ));
    };
    known_fields(&request, None, TOP_LEVEL)?;
    let validate_only = match request.get("validate_only") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(Violation::invalid_value(
                "validate_only",
                "TYPE_BOOL",
                other,
            ));
        }
    };
    let message_value = request
        .get("message")
        .ok_or_else(|| Violation::at("message", "Request is missing required field 'message'"))?;
    let message = object(
        message_value,
        "message",
        "type.googleapis.com/google.firebase.fcm.v1.Message",
    )?;
    known_fields(message, Some("message"), MESSAGE)?;

    let token = optional_string(message, "message", "token")?;
    let topic = optional_string(message, "message", "topic")?;
    let condition = optional_string(message, "message", "condition")?;
    let targets = [&token, &topic, &condition]
        .iter()
        .filter(|t| t.is_some())
        .count();
    if targets != 1 {
        return Err(Violation::at(
            "message",
            format!(
                "Exactly one of token, topic or condition must be specified; the message has {targets}"
            ),
        ));
    }

    if let Some(topic) = &topic
        && !is_topic_name(topic)
    {
        return Err(Violation::at(
            "message.topic",
            format!(
                "Invalid topic name {topic:?}: a topic name matches [a-zA-Z0-9-_.~%]+ and is given without \"/topics/\""
            ),
        ));
    }
    if let Some(condition) = &condition
        && let Err(why) = crate::model::condition_topics(condition)
    {
        return Err(Violation::at(
            "message.condition",
            format!("Invalid condition expression provided: {why}"),
        ));
    }

    optional_string(message, "message", "name")?;
    if let Some(data) = message.get("data") {
        data_map(data, "message.data")?;
    }
    if let Some(notification) = message.get("notification") {
        let notification = child_object(notification, "message.notification", NOTIFICATION)?;
        for key in NOTIFICATION {
            optional_string(notification, "message.notification", key)?;
        }
    }
    if let Some(android) = message.get("android") {
        android_config(android)?;
    }
    if let Some(apns) = message.get("apns") {
        apns_config(apns, message.contains_key("notification"))?;
    }
    if let Some(webpush) = message.get("webpush") {
        let webpush = child_object(webpush, "message.webpush", WEBPUSH)?;
        if let Some(headers) = webpush.get("headers") {
            string_map(headers, "message.webpush.headers")?;
        }
        if let Some(data) = webpush.get("data") {
            string_map(data, "message.webpush.data")?;
        }
        if let Some(notification) = webpush.get("notification") {
            object(
                notification,
                "message.webpush.notification",
                "google.protobuf.Struct",
            )?;
        }
        if let Some(options) = webpush.get("fcm_options") {
            child_object(options, "message.webpush.fcm_options", WEBPUSH_FCM_OPTIONS)?;
        }
    }
    if let Some(options) = message.get("fcm_options") {
        let options = child_object(options, "message.fcm_options", MESSAGE_FCM_OPTIONS)?;
        analytics_label(options, "message.fcm_options")?;
    }

    let limit = if topic.is_some() {
        MAX_TOPIC_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    let size = payload_size(message);
    if size > limit {
        return Err(Violation::at(
            "message",
            format!("Message payload too large: {size} bytes, the limit is {limit}"),
        ));
    }

    Ok(SendRequest {
        message: message_value.clone(),
        token,
        topic,
        validate_only,
    })
}

/// Best-effort `message.token` of a request that failed validation, for the attempt log.
pub(super) fn token_hint(body: &[u8]) -> Option<String> {
    let request: Value = serde_json::from_slice(body).ok()?;
    request
        .get("message")?
        .get("token")?
        .as_str()
        .map(str::to_owned)
}

/// Size FCM counts against the limit: the message as compact JSON, without its target.
fn payload_size(message: &Object) -> usize {
    let payload: Object = message
        .iter()
        .filter(|(key, _)| !matches!(key.as_str(), "token" | "topic" | "condition"))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    serde_json::to_vec(&payload).map_or(usize::MAX, |bytes| bytes.len())
}

/// `message.android`, typed as `AndroidConfig` is
/// (<https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#AndroidConfig>).
fn android_config(android: &Value) -> Result<(), Violation> {
    let android = child_object(android, "message.android", ANDROID)?;
    for key in ["collapse_key", "restricted_package_name"] {
        optional_string(android, "message.android", key)?;
    }
    if let Some(priority) = android.get("priority") {
        let known = match priority {
            Value::String(name) => ANDROID_PRIORITIES.contains(&name.as_str()),
            Value::Number(n) => n
                .as_u64()
                .is_some_and(|n| (n as usize) < ANDROID_PRIORITIES.len()),
            _ => false,
        };
        if !known {
            return Err(Violation::invalid_value(
                "message.android.priority",
                "type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority",
                priority,
            ));
        }
    }
    if let Some(ttl) = android.get("ttl") {
        check_ttl(ttl)?;
    }
    if let Some(data) = android.get("data") {
        string_map(data, "message.android.data")?;
    }
    if let Some(notification) = android.get("notification") {
        const PATH: &str = "message.android.notification";
        let notification = child_object(notification, PATH, ANDROID_NOTIFICATION)?;
        for key in ANDROID_NOTIFICATION_STRINGS {
            optional_string(notification, PATH, key)?;
        }
        for key in ANDROID_NOTIFICATION_BOOLS {
            match notification.get(*key) {
                None | Some(Value::Null) | Some(Value::Bool(_)) => {}
                Some(other) => {
                    return Err(Violation::invalid_value(
                        &format!("{PATH}.{key}"),
                        "TYPE_BOOL",
                        other,
                    ));
                }
            }
        }
        if let Some(count) = notification.get("notification_count")
            && !is_int32(count)
        {
            return Err(Violation::invalid_value(
                &format!("{PATH}.notification_count"),
                "TYPE_INT32",
                count,
            ));
        }
    }
    if let Some(options) = android.get("fcm_options") {
        let options = child_object(options, "message.android.fcm_options", ANDROID_FCM_OPTIONS)?;
        analytics_label(options, "message.android.fcm_options")?;
    }
    Ok(())
}

/// An int32 as proto3 JSON reads one: a whole number, or a string of one, in range.
fn is_int32(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        Value::String(s) => s.parse::<i32>().is_ok(),
        _ => false,
    }
}

/// `message.apns`: FCM hands the headers and `aps` to APNs, whose refusals FCM passes on as
/// 400s; so they are checked as APNs checks them
/// (<https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns>,
/// <https://developer.apple.com/documentation/usernotifications/generating-a-remote-notification>).
/// `notification`: whether the message has a `notification` (FCM makes it the APNs alert).
fn apns_config(apns: &Value, notification: bool) -> Result<(), Violation> {
    let apns = child_object(apns, "message.apns", APNS)?;
    let mut aps = None;
    if let Some(payload) = apns.get("payload") {
        // Free-form, as APNs defines it; only `aps` has a shape FCM insists on.
        let payload = object(payload, "message.apns.payload", "google.protobuf.Struct")?;
        if let Some(value) = payload.get("aps") {
            let value = object(value, "message.apns.payload.aps", "google.protobuf.Struct")?;
            aps_keys(value)?;
            aps = Some(value);
        }
    }
    if let Some(headers) = apns.get("headers") {
        let headers = string_map(headers, "message.apns.headers")?;
        apns_headers(headers, aps, notification)?;
    }
    if let Some(options) = apns.get("fcm_options") {
        let options = child_object(options, "message.apns.fcm_options", APNS_FCM_OPTIONS)?;
        analytics_label(options, "message.apns.fcm_options")?;
    }
    Ok(())
}

/// `aps.badge` is a number of 0 or more, `aps.content-available` the number 1.
fn aps_keys(aps: &Object) -> Result<(), Violation> {
    let bad = |key: &str, what: &str, value: &Value| {
        Violation::at(
            "message.apns.payload.aps",
            format!("Invalid APNs payload: aps.{key} must be {what}, not {value}"),
        )
    };
    if let Some(badge) = aps.get("badge")
        && badge.as_u64().is_none()
    {
        return Err(bad("badge", "a whole number of 0 or more", badge));
    }
    if let Some(flag) = aps.get("content-available")
        && flag.as_u64() != Some(1)
    {
        return Err(bad("content-available", "the number 1", flag));
    }
    Ok(())
}

/// The APNs headers' values, and what a background push may carry: priority 5, nothing shown
/// (<https://developer.apple.com/documentation/usernotifications/pushing-background-updates-to-your-app>).
/// FCM adds that a data-only message to iOS may only be normal priority ("When sending
/// payloads containing only data fields to iOS devices, only normal priority
/// ("apns-priority": "5") is allowed": `data` in
/// <https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#Message>).
fn apns_headers(
    headers: &Object,
    aps: Option<&Object>,
    notification: bool,
) -> Result<(), Violation> {
    const PATH: &str = "message.apns.headers";
    let header = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| value.as_str())
    };
    let refused = |name: &str, value: &str, reason: &str, rule: &str| {
        Violation::at(
            PATH,
            format!("Invalid APNs header {name}: {value:?} (APNs: {reason}; {rule})"),
        )
    };
    let priority = header("apns-priority");
    if let Some(p) = priority
        && !APNS_PRIORITIES.contains(&p)
    {
        return Err(refused("apns-priority", p, "BadPriority", "use 10, 5 or 1"));
    }
    if let Some(e) = header("apns-expiration")
        && (e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit()) || e.parse::<u64>().is_err())
    {
        return Err(refused(
            "apns-expiration",
            e,
            "BadExpirationDate",
            "a UNIX time in seconds, or 0",
        ));
    }
    if let Some(id) = header("apns-collapse-id")
        && id.len() > MAX_APNS_COLLAPSE_ID
    {
        return Err(refused(
            "apns-collapse-id",
            id,
            "BadCollapseId",
            "at most 64 bytes",
        ));
    }
    let push_type = header("apns-push-type");
    if let Some(t) = push_type
        && !APNS_PUSH_TYPES.contains(&t)
    {
        return Err(refused(
            "apns-push-type",
            t,
            "InvalidPushType",
            "alert, background, location, voip, complication, fileprovider, mdm, liveactivity or pushtokens",
        ));
    }
    let alert = aps.is_some_and(|aps| aps.contains_key("alert"));
    if push_type == Some("background") {
        if let Some(p) = priority.filter(|p| *p != "5") {
            return Err(refused(
                "apns-priority",
                p,
                "BadPriority",
                "a background push must be sent with priority 5",
            ));
        }
        if notification {
            return Err(Violation::at(
                PATH,
                "A background push (apns-push-type background) must not show a notification, but the message has one",
            ));
        }
        if let Some(key) = aps.and_then(|aps| APS_SHOWN.iter().find(|k| aps.contains_key(**k))) {
            return Err(Violation::at(
                "message.apns.payload.aps",
                format!(
                    "A background push (apns-push-type background) must not show, sound or badge: aps.{key} is set"
                ),
            ));
        }
    }
    if !notification && !alert && priority == Some("10") {
        return Err(Violation::at(
            PATH,
            "A message with only data may be sent to iOS with apns-priority 5 only, not 10",
        ));
    }
    Ok(())
}

/// `fcm_options.analytics_label`: a string matching `^[a-zA-Z0-9-_.~%]{1,50}$`
/// (<https://firebase.google.com/docs/cloud-messaging/understand-delivery#adding-analytics-labels-to-messages>).
fn analytics_label(options: &Object, path: &str) -> Result<(), Violation> {
    let Some(label) = optional_string(options, path, "analytics_label")? else {
        return Ok(());
    };
    let ok = (1..=50).contains(&label.len()) && label.bytes().all(is_label_byte);
    if ok {
        return Ok(());
    }
    let field = format!("{path}.analytics_label");
    Err(Violation::at(
        &field,
        format!("Invalid analytics_label {label:?}: it must match ^[a-zA-Z0-9-_.~%]{{1,50}}$"),
    ))
}

/// `message.topic`: `[a-zA-Z0-9-_.~%]+`, without `/topics/` (`topic` in
/// <https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#Message>).
fn is_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.bytes().all(is_label_byte)
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%')
}

/// `ttl` is a protobuf Duration in JSON form: seconds with up to nine decimals and an `s`.
fn check_ttl(ttl: &Value) -> Result<(), Violation> {
    const FIELD: &str = "message.android.ttl";
    let invalid =
        || Violation::invalid_value(FIELD, "type.googleapis.com/google.protobuf.Duration", ttl);
    let text = ttl.as_str().ok_or_else(invalid)?;
    let number = text.strip_suffix('s').ok_or_else(invalid)?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let fraction_ok = !number.contains('.') || (1..=9).contains(&fraction.len());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || !fraction_ok {
        return Err(invalid());
    }
    let too_long = match whole.parse::<u64>() {
        Ok(secs) => {
            secs > MAX_TTL_SECS || (secs == MAX_TTL_SECS && fraction.bytes().any(|b| b != b'0'))
        }
        Err(_) => true,
    };
    if too_long {
        return Err(Violation::at(
            FIELD,
            format!("The TTL of the message is too long: {text}, the maximum is {MAX_TTL_SECS}s"),
        ));
    }
    Ok(())
}

/// `message.data`: a string map whose keys FCM does not keep for itself.
fn data_map(data: &Value, path: &str) -> Result<(), Violation> {
    let data = string_map(data, path)?;
    let reserved = data.keys().find(|key| {
        RESERVED_DATA_KEYS.contains(&key.as_str())
            || RESERVED_DATA_PREFIXES
                .iter()
                .any(|prefix| key.starts_with(prefix))
    });
    match reserved {
        Some(key) => Err(Violation::at(
            path,
            format!("Invalid data payload key at '{path}': \"{key}\" is reserved by FCM"),
        )),
        None => Ok(()),
    }
}

/// A `map<string, string>` field: an object whose values are all strings.
fn string_map<'a>(value: &'a Value, path: &str) -> Result<&'a Object, Violation> {
    let map = object(value, path, "map<string, string>")?;
    for (index, value) in map.values().enumerate() {
        if !value.is_string() {
            return Err(Violation::invalid_value(
                &format!("{path}[{index}].value"),
                "TYPE_STRING",
                value,
            ));
        }
    }
    Ok(map)
}

/// A nested message whose field names we know.
fn child_object<'a>(value: &'a Value, path: &str, known: &[&str]) -> Result<&'a Object, Violation> {
    let map = object(value, path, "object")?;
    known_fields(map, Some(path), known)?;
    Ok(map)
}

fn object<'a>(value: &'a Value, path: &str, expected: &str) -> Result<&'a Object, Violation> {
    value
        .as_object()
        .ok_or_else(|| Violation::invalid_value(path, expected, value))
}

fn known_fields(map: &Object, path: Option<&str>, known: &[&str]) -> Result<(), Violation> {
    match map.keys().find(|key| !known.contains(&key.as_str())) {
        Some(unknown) => Err(Violation::unknown_name(path, unknown)),
        None => Ok(()),
    }
}

fn optional_string(map: &Object, path: &str, key: &str) -> Result<Option<String>, Violation> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Violation::invalid_value(
            &format!("{path}.{key}"),
            "TYPE_STRING",
            other,
        )),
    }
}

#[cfg(test)]
mod tests;
