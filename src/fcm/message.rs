//! The FCM message built from a [`Notification`] (docs/contract.md, "The FCM message"): the
//! body built once per notification, the token (or topic or condition) and the send time
//! spliced in per send, and FCM's 4096-byte limit checked before anything is sent.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::model::{Audience, Invalid, Notification, Priority};

/// FCM's limit on a message's payload.
pub const MAX_PAYLOAD: usize = 4096;

/// The request body for one notification, built once; the token (or the topic or condition)
/// is spliced in per send, and so is `apns-expiration`, which is the send time plus
/// `ttl_seconds`.
#[derive(Clone, Debug)]
pub struct MessageTemplate {
    /// `token`, `topic` or `condition`: the message field the target of [`Self::body_for`] goes in.
    target: &'static str,
    /// The message object without its target, serialized: `{"notification":…}`.
    rest: String,
    /// Where `apns-expiration`'s value (quoted) goes in `rest`, and the seconds to add to the
    /// send time.
    expiration: Option<(usize, u64)>,
}

impl MessageTemplate {
    /// The message with the notification's plain title and text.
    pub fn new(n: &Notification) -> Result<MessageTemplate, Invalid> {
        MessageTemplate::with_text(n, &n.title, &n.body)
    }

    /// The message with `title` and `body` in place of the notification's own (a language's
    /// translations): where they go, and the size check, are the same.
    pub fn with_text(
        n: &Notification,
        title: &str,
        body: &str,
    ) -> Result<MessageTemplate, Invalid> {
        let o = &n.options;
        let mut message = Map::new();
        if let Some(notification) = notification_config(n, title, body) {
            message.insert("notification".into(), Value::Object(notification));
        }
        message.insert("data".into(), Value::Object(data_config(n, title, body)));
        let android = android_config(n);
        if !android.is_empty() {
            message.insert("android".into(), Value::Object(android));
        }
        // A placeholder for `apns-expiration` no text of the document can contain (it is
        // random), cut out of the serialized message below.
        let placeholder = format!("ffpush-expiration-{:032x}", rand::random::<u128>());
        let expires = o.ttl_seconds.filter(|ttl| *ttl > 0);
        let apns = apns_config(n, expires.map(|_| placeholder.as_str()));
        if !apns.is_empty() {
            message.insert("apns".into(), Value::Object(apns));
        }
        if let Some(label) = &o.analytics_label {
            message.insert("fcm_options".into(), json!({"analytics_label": label}));
        }
        let mut rest = Value::Object(message).to_string();
        let expiration = cut_expiration(&mut rest, &placeholder, expires)?;
        // What the send will carry: with the quoted Unix time, today 10 digits.
        let size = rest.len() + expiration.map_or(0, |(_, ttl)| expiration_value(ttl).len());
        if size > MAX_PAYLOAD {
            return Err(Invalid(format!(
                "the message is {size} bytes, over FCM's {MAX_PAYLOAD}-byte limit: shorten parameter_data, data, the text or the image URL"
            )));
        }
        let target = match n.audience {
            Audience::Topic(_) => "topic",
            Audience::Condition(_) => "condition",
            Audience::Users(_) | Audience::Broadcast { .. } => "token",
        };
        Ok(MessageTemplate {
            target,
            rest,
            expiration,
        })
    }

    /// `{"message":{"token":"…",<rest>}}` (or `"topic"` / `"condition"`): one allocation, the
    /// target escaped in place.
    pub fn body_for(&self, token: &str) -> Bytes {
        let inner = &self.rest.as_bytes()[1..];
        let mut body = Vec::with_capacity(self.rest.len() + token.len() + 48);
        body.extend_from_slice(br#"{"message":{""#);
        body.extend_from_slice(self.target.as_bytes());
        body.extend_from_slice(br#"":"#);
        // Writing JSON into a Vec cannot fail; a string always serializes.
        let _ = serde_json::to_writer(&mut body, token);
        body.push(b',');
        match self.expiration {
            None => body.extend_from_slice(inner),
            Some((at, ttl)) => {
                body.extend_from_slice(&inner[..at - 1]);
                body.extend_from_slice(expiration_value(ttl).as_bytes());
                body.extend_from_slice(&inner[at - 1..]);
            }
        }
        body.push(b'}');
        Bytes::from(body)
    }

    /// The message as a JSON value, for dry runs and tests.
    pub fn message_for(&self, token: &str) -> Value {
        serde_json::from_slice(&self.body_for(token)).unwrap_or(Value::Null)
    }
}

/// `message.notification`, or `None` for a silent message: the app then gets the text as data,
/// and shows what it likes.
fn notification_config(n: &Notification, title: &str, body: &str) -> Option<Map<String, Value>> {
    if n.options.silent {
        return None;
    }
    let mut notification = Map::new();
    notification.insert("title".into(), json!(title));
    notification.insert("body".into(), json!(body));
    if let Some(image) = &n.image {
        notification.insert("image".into(), json!(image));
    }
    Some(notification)
}

/// `message.data`: FlutterFlow's two keys, the document's `data`, and a silent message's text.
fn data_config(n: &Notification, title: &str, body: &str) -> Map<String, Value> {
    let mut data = Map::new();
    // FlutterFlow's function always sends both keys, "" when unset; app code reads them.
    data.insert(
        "initialPageName".into(),
        json!(n.initial_page.as_deref().unwrap_or_default()),
    );
    data.insert(
        "parameterData".into(),
        json!(n.parameter_data.as_deref().unwrap_or_default()),
    );
    for (key, value) in &n.options.data {
        data.insert(key.clone(), json!(value));
    }
    if n.options.silent {
        // No notification block: the app gets the text as data, and shows what it likes.
        for (key, text) in [("title", title), ("body", body)] {
            if !text.is_empty() {
                data.insert(key.into(), json!(text));
            }
        }
    }
    data
}

/// Cuts the quoted `placeholder` of `apns-expiration` out of the serialized message `rest`:
/// where the send time goes, and the seconds to add to it (`ttl`); `None` without a `ttl`.
fn cut_expiration(
    rest: &mut String,
    placeholder: &str,
    ttl: Option<u32>,
) -> Result<Option<(usize, u64)>, Invalid> {
    let Some(ttl) = ttl else {
        return Ok(None);
    };
    let quoted = format!("\"{placeholder}\"");
    let at = rest.find(&quoted).ok_or_else(|| {
        Invalid("internal error: the apns-expiration placeholder was not serialized".into())
    })?;
    rest.replace_range(at..at + quoted.len(), "");
    Ok(Some((at, u64::from(ttl))))
}

/// `apns-expiration` for a message sent now that lives `ttl` seconds: the Unix time it
/// expires, quoted (a header value is a string).
fn expiration_value(ttl: u64) -> String {
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or_default();
    format!("\"{}\"", now.saturating_add(ttl))
}

/// `message.android`: FlutterFlow's sound, and the options that map to Android
/// (<https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#AndroidConfig>).
fn android_config(n: &Notification) -> Map<String, Value> {
    let o = &n.options;
    let mut android = Map::new();
    let mut notification = Map::new();
    if let Some(sound) = &n.sound {
        notification.insert("sound".into(), json!(sound));
    }
    if let Some(channel) = &o.channel_id {
        notification.insert("channel_id".into(), json!(channel));
    }
    if let Some(badge) = o.badge {
        notification.insert("notification_count".into(), json!(badge));
    }
    if !notification.is_empty() {
        android.insert("notification".into(), Value::Object(notification));
    }
    if let Some(priority) = o.priority {
        let value = match priority {
            Priority::High => "HIGH",
            Priority::Normal => "NORMAL",
        };
        android.insert("priority".into(), json!(value));
    }
    if let Some(ttl) = o.ttl_seconds {
        android.insert("ttl".into(), json!(format!("{ttl}s")));
    }
    if let Some(key) = &o.collapse_key {
        android.insert("collapse_key".into(), json!(key));
    }
    android
}

/// `message.apns`: FlutterFlow's sound, and the options that map to APNs' headers and `aps`
/// (<https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns>,
/// <https://developer.apple.com/documentation/usernotifications/generating-a-remote-notification>).
/// `expiration`: the placeholder `apns-expiration` carries until the send time is known.
fn apns_config(n: &Notification, expiration: Option<&str>) -> Map<String, Value> {
    let o = &n.options;
    let mut headers = Map::new();
    let mut aps = Map::new();
    if let Some(sound) = &n.sound {
        aps.insert("sound".into(), json!(sound));
    }
    if let Some(badge) = o.badge {
        aps.insert("badge".into(), json!(badge));
    }
    let priority = if o.silent {
        // A background push: APNs wants priority 5 and push type background for it
        // (<https://developer.apple.com/documentation/usernotifications/pushing-background-updates-to-your-app>).
        aps.insert("content-available".into(), json!(1));
        headers.insert("apns-push-type".into(), json!("background"));
        Some("5")
    } else {
        o.priority.map(|p| match p {
            Priority::High => "10",
            Priority::Normal => "5",
        })
    };
    if let Some(priority) = priority {
        headers.insert("apns-priority".into(), json!(priority));
    }
    match (o.ttl_seconds, expiration) {
        // 0: deliver now or never, as APNs reads "0".
        (Some(0), _) => {
            headers.insert("apns-expiration".into(), json!("0"));
        }
        (Some(_), Some(placeholder)) => {
            headers.insert("apns-expiration".into(), json!(placeholder));
        }
        _ => {}
    }
    if let Some(key) = &o.collapse_key {
        headers.insert("apns-collapse-id".into(), json!(key));
    }
    let mut apns = Map::new();
    if !headers.is_empty() {
        apns.insert("headers".into(), Value::Object(headers));
    }
    if !aps.is_empty() {
        apns.insert("payload".into(), json!({ "aps": aps }));
    }
    apns
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification() -> Notification {
        Notification {
            title: "Hello".into(),
            body: "Just for you two".into(),
            image: Some("https://example.com/banner.png".into()),
            sound: Some("default".into()),
            initial_page: Some("ChatPage".into()),
            parameter_data: Some("{\"chatRef\":\"chats/c42\"}".into()),
            audience: Audience::Users(vec!["u1".into()]),
            scheduled_time: None,
            options: Default::default(),
        }
    }

    #[test]
    fn message_matches_flutterflow_exactly() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/flutterflow_documents.json"
        );
        let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let expected = all
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.starts_with("fcm_v1_message_built_for_each_token"))
            .unwrap()
            .1
            .clone();
        let template = MessageTemplate::new(&notification()).unwrap();
        assert_eq!(template.message_for("tok-u1-android"), expected);
    }

    #[test]
    fn optional_parts_are_left_out_but_data_keys_are_always_sent() {
        let mut n = notification();
        n.image = None;
        n.sound = None;
        n.initial_page = None;
        n.parameter_data = None;
        let m = MessageTemplate::new(&n).unwrap().message_for("t\"x");
        // FlutterFlow's function sends both data keys, "" when unset; app code reads them.
        assert_eq!(
            m,
            json!({"message": {"token": "t\"x", "notification": {"title": "Hello", "body": "Just for you two"},
                "data": {"initialPageName": "", "parameterData": ""}}})
        );
    }

    /// A document without any of the message options gets byte for byte the body FlutterFlow's
    /// function sends (the JSON of `message_matches_flutterflow_exactly`, keys in this order).
    #[test]
    fn without_options_the_body_is_byte_for_byte_todays() {
        let full = MessageTemplate::new(&notification()).unwrap();
        assert_eq!(
            std::str::from_utf8(&full.body_for("tok-u1-android")).unwrap(),
            r#"{"message":{"token":"tok-u1-android","android":{"notification":{"sound":"default"}},"apns":{"payload":{"aps":{"sound":"default"}}},"data":{"initialPageName":"ChatPage","parameterData":"{\"chatRef\":\"chats/c42\"}"},"notification":{"body":"Just for you two","image":"https://example.com/banner.png","title":"Hello"}}}"#
        );
        let mut n = notification();
        n.image = None;
        n.sound = None;
        n.initial_page = None;
        n.parameter_data = None;
        let bare = MessageTemplate::new(&n).unwrap();
        assert_eq!(
            std::str::from_utf8(&bare.body_for("t")).unwrap(),
            r#"{"message":{"token":"t","data":{"initialPageName":"","parameterData":""},"notification":{"body":"Just for you two","title":"Hello"}}}"#
        );
    }

    fn options() -> crate::model::MessageOptions {
        crate::model::MessageOptions {
            badge: Some(3),
            channel_id: Some("chat".into()),
            priority: Some(Priority::High),
            ttl_seconds: Some(3600),
            collapse_key: Some("score".into()),
            silent: false,
            data: [("kind".to_string(), "chat".to_string())].into(),
            analytics_label: Some("spring-sale".into()),
            dry_run: false,
            translations: Default::default(),
        }
    }

    #[test]
    fn every_option_lands_where_the_contract_says() {
        let mut n = notification();
        n.options = options();
        let template = MessageTemplate::new(&n).unwrap();
        let before = chrono::Utc::now().timestamp() as u64;
        let mut m = template.message_for("tok");
        let after = chrono::Utc::now().timestamp() as u64;
        let expiration: u64 = m["message"]["apns"]["headers"]["apns-expiration"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((before + 3600..=after + 3600).contains(&expiration));
        m["message"]["apns"]["headers"]["apns-expiration"] = json!("<now+3600>");
        assert_eq!(
            m,
            json!({"message": {"token": "tok",
                "notification": {"title": "Hello", "body": "Just for you two", "image": "https://example.com/banner.png"},
                "data": {"initialPageName": "ChatPage", "parameterData": "{\"chatRef\":\"chats/c42\"}", "kind": "chat"},
                "android": {"collapse_key": "score", "priority": "HIGH", "ttl": "3600s",
                    "notification": {"sound": "default", "channel_id": "chat", "notification_count": 3}},
                "apns": {"headers": {"apns-priority": "10", "apns-expiration": "<now+3600>", "apns-collapse-id": "score"},
                    "payload": {"aps": {"sound": "default", "badge": 3}}},
                "fcm_options": {"analytics_label": "spring-sale"}}})
        );
        // The send time is taken per body, not when the template was built.
        assert_eq!(template.expiration.map(|(_, ttl)| ttl), Some(3600));
    }

    #[test]
    fn normal_priority_and_a_ttl_of_zero() {
        let mut n = notification();
        n.sound = None;
        n.options.priority = Some(Priority::Normal);
        n.options.ttl_seconds = Some(0);
        let m = MessageTemplate::new(&n).unwrap().message_for("tok");
        assert_eq!(
            m["message"]["android"],
            json!({"priority": "NORMAL", "ttl": "0s"})
        );
        assert_eq!(
            m["message"]["apns"],
            json!({"headers": {"apns-priority": "5", "apns-expiration": "0"}})
        );
    }

    #[test]
    fn a_silent_message_is_data_only_and_a_background_push() {
        let mut n = notification();
        n.image = None;
        n.sound = None;
        n.options.silent = true;
        n.options.priority = Some(Priority::High);
        let m = MessageTemplate::new(&n).unwrap().message_for("tok");
        assert_eq!(
            m,
            json!({"message": {"token": "tok",
                "data": {"initialPageName": "ChatPage", "parameterData": "{\"chatRef\":\"chats/c42\"}",
                    "title": "Hello", "body": "Just for you two"},
                "android": {"priority": "HIGH"},
                "apns": {"headers": {"apns-priority": "5", "apns-push-type": "background"},
                    "payload": {"aps": {"content-available": 1}}}}})
        );
        n.title = String::new();
        n.body = String::new();
        let m = MessageTemplate::new(&n).unwrap().message_for("tok");
        assert_eq!(
            m["message"]["data"],
            json!({"initialPageName": "ChatPage", "parameterData": "{\"chatRef\":\"chats/c42\"}"})
        );
    }

    #[test]
    fn a_topic_or_condition_goes_in_its_own_field() {
        let mut n = notification();
        n.audience = Audience::Topic("news".into());
        let body = MessageTemplate::new(&n).unwrap().body_for("news");
        assert!(body.starts_with(br#"{"message":{"topic":"news","android""#));
        n.audience = Audience::Condition("'a' in topics".into());
        let m = MessageTemplate::new(&n)
            .unwrap()
            .message_for("'a' in topics");
        assert_eq!(m["message"]["condition"], "'a' in topics");
        assert!(m["message"].get("token").is_none());
    }

    #[test]
    fn the_payload_limit_counts_the_options_and_the_expiration() {
        let mut n = notification();
        let base = MessageTemplate::new(&n).unwrap().rest.len();
        n.options.data = [("pad".to_string(), "x".repeat(MAX_PAYLOAD - base))].into();
        // The key, its quotes, the colon and the comma tip it over.
        assert!(MessageTemplate::new(&n).is_err());
        let mut fits = notification();
        fits.options.ttl_seconds = Some(60);
        let with_ttl = MessageTemplate::new(&fits).unwrap();
        let sent = with_ttl.message_for("t")["message"]
            .as_object()
            .unwrap()
            .clone();
        let mut counted = sent.clone();
        counted.remove("token");
        let size = Value::Object(counted).to_string().len();
        // The size checked is the size sent: pad up to exactly the limit, then one over.
        let pad = MAX_PAYLOAD - size - r#","pad":"""#.len();
        fits.options.data = [("pad".to_string(), "x".repeat(pad))].into();
        assert!(
            MessageTemplate::new(&fits).is_ok(),
            "exactly {MAX_PAYLOAD} bytes"
        );
        fits.options.data = [("pad".to_string(), "x".repeat(pad + 1))].into();
        let err = MessageTemplate::new(&fits).unwrap_err();
        assert!(
            err.0.contains(&format!("{} bytes", MAX_PAYLOAD + 1)),
            "{err}"
        );
    }

    #[test]
    fn oversized_payload_is_refused_before_sending() {
        let mut n = notification();
        n.parameter_data = Some("x".repeat(4000));
        let err = MessageTemplate::new(&n).unwrap_err();
        assert!(err.0.contains("4096-byte limit"), "{err}");
    }
}
