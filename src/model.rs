//! The FlutterFlow documents as types. A notification document becomes a validated
//! [`Notification`] here, or a one-line [`Invalid`] reason that goes onto the document;
//! nothing downstream re-checks strings.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use firestore::gcloud_sdk::google::firestore::v1::{Document, Value, value};

use crate::fields;

pub use firestore::gcloud_sdk::google::firestore::v1 as pb;

/// Which collection a document came from; decides whether a broadcast is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `ff_push_notifications`: the console or a trusted back end.
    Console,
    /// `ff_user_push_notifications`: written by app users, never broadcast.
    App,
}

/// A notification document's `status`: FlutterFlow's values, read and written as this type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Absent or "": nobody has touched it.
    New,
    /// "started": claimed by someone (maybe a dead worker, maybe FlutterFlow's function).
    Started,
    /// "succeeded": sent (FlutterFlow's value, also when it reached nobody).
    Succeeded,
    /// "failed": not sent, or not to everyone; `error` says why.
    Failed,
    /// "cancelled": the sender withdrew it before it started, or stopped it while it was sent.
    Cancelled,
    /// "validated": a `dry_run`: recipients counted and the message validated by FCM, nothing
    /// delivered.
    Validated,
    /// Any other value, written by someone else: never processed (FlutterFlow skips it too).
    Other(String),
}

impl Status {
    pub fn of(doc: &Document) -> Status {
        Status::parse(
            doc.fields
                .get(fields::STATUS)
                .and_then(string_value)
                .unwrap_or(""),
        )
    }

    pub fn parse(value: &str) -> Status {
        match value {
            "" => Status::New,
            "started" => Status::Started,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            "validated" => Status::Validated,
            other => Status::Other(other.to_string()),
        }
    }

    /// The value stored in the document.
    pub fn as_str(&self) -> &str {
        match self {
            Status::New => "",
            Status::Started => "started",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Validated => "validated",
            Status::Other(other) => other,
        }
    }

    /// Anything but absent, "" or "started" is never processed again.
    pub fn is_finished(&self) -> bool {
        !matches!(self, Status::New | Status::Started)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One slice of a batched broadcast: `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub index: u32,
    pub count: u32,
}

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

impl Slice {
    /// FlutterFlow's bound: `None` means unbounded (before or after every id).
    pub fn bound(index: u32, count: u32) -> Option<String> {
        if index == 0 || index >= count {
            return None;
        }
        let x = u64::from(index) * 62 * 62 / u64::from(count);
        let first = ALPHABET[(x / 62) as usize] as char;
        let second = ALPHABET[(x % 62) as usize] as char;
        Some(format!("{first}{second}"))
    }

    /// `[start, end)` of user ids this slice covers.
    pub fn user_id_range(&self) -> (Option<String>, Option<String>) {
        (
            Slice::bound(self.index, self.count),
            Slice::bound(self.index + 1, self.count),
        )
    }

    pub fn contains(&self, user_id: &str) -> bool {
        let (start, end) = self.user_id_range();
        start.is_none_or(|s| user_id >= s.as_str()) && end.is_none_or(|e| user_id < e.as_str())
    }
}

/// Who receives the notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audience {
    /// User document paths relative to the database (`users/abc`, or any document path: the
    /// tokens are read from `<path>/fcm_tokens`, as FlutterFlow does), unique and in the order
    /// of their token documents, so that the token stream is in document-path order (progress
    /// is a cursor over it).
    Users(Vec<String>),
    /// Every token, optionally only one device type and one slice of the users collection.
    Broadcast {
        /// `None`: `target_audience` is `"All"`, every token. Otherwise only tokens whose
        /// `device_type` is exactly this (FlutterFlow's `device_type === target_audience`).
        device_type: Option<String>,
        slice: Option<Slice>,
    },
    /// `target_topic`: one request with `message.topic`; FCM reaches the topic's subscribers.
    Topic(String),
    /// `target_condition`: one request with `message.condition` (topics combined with `&&`,
    /// `||` and `!`).
    Condition(String),
}

/// The error of a document that addresses nobody: FlutterFlow would match no token at all.
const NO_AUDIENCE: &str = "no recipients: user_refs and target_audience are both missing or empty, so nobody is addressed (this is never a broadcast); set user_refs to the users' document paths (e.g. users/abc), or target_audience to All (every device), iOS or Android";

/// A validated notification.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub title: String,
    pub body: String,
    pub image: Option<String>,
    pub sound: Option<String>,
    pub initial_page: Option<String>,
    pub parameter_data: Option<String>,
    pub audience: Audience,
    pub scheduled_time: Option<DateTime<Utc>>,
    /// The message options beyond FlutterFlow's fields; all unset on FlutterFlow's documents.
    pub options: MessageOptions,
}

/// `priority`: Android's delivery priority and APNs' `apns-priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    High,
    Normal,
}

/// The optional message fields ffpush reads beyond FlutterFlow's (docs/contract.md, "The
/// document contract"). A document without them has them all unset, and its message is FlutterFlow's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageOptions {
    /// `notification_badge`: the app icon's badge count.
    pub badge: Option<u32>,
    /// `android_channel_id`.
    pub channel_id: Option<String>,
    pub priority: Option<Priority>,
    /// `ttl_seconds`: how long FCM and APNs keep trying an offline device.
    pub ttl_seconds: Option<u32>,
    /// `collapse_key`: a newer message with the same key replaces an undelivered older one.
    pub collapse_key: Option<String>,
    /// `silent`: a data-only (background) message; no notification is shown.
    pub silent: bool,
    /// `data`: merged into the message's `data`, next to FlutterFlow's two keys.
    pub data: BTreeMap<String, String>,
    /// `analytics_label`: `fcm_options.analytics_label`.
    pub analytics_label: Option<String>,
    /// `dry_run`: count the recipients and have FCM validate the message on one token
    /// (`validate_only`), delivering nothing.
    pub dry_run: bool,
    /// `notification_title_i18n` / `notification_text_i18n`: the text in other languages,
    /// picked per recipient by the user document's language field.
    pub translations: Translations,
}

/// Most languages one `notification_title_i18n` or `notification_text_i18n` map may hold:
/// more than an app ships, few enough that checking each language's payload stays cheap.
pub const MAX_LANGUAGES: usize = 100;

/// `notification_title_i18n` and `notification_text_i18n`: language code → text. Keys are
/// kept normalized (lower case, `-` between subtags), so that a user's `pt_BR`, `pt-br` or
/// `PT-BR` all find `pt-BR`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translations {
    pub title: BTreeMap<String, String>,
    pub text: BTreeMap<String, String>,
}

/// Which translations one recipient gets: the key of the title map and of the text map used,
/// `None` for the plain `notification_title` / `notification_text`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    pub title: Option<String>,
    pub text: Option<String>,
}

impl Translations {
    pub fn is_empty(&self) -> bool {
        self.title.is_empty() && self.text.is_empty()
    }

    /// What a user whose language field holds `language` gets, map by map: the exact code,
    /// else its primary subtag (`pt-BR` → `pt`), else the plain text. Codes are compared
    /// case-insensitively, `_` read as `-` (Flutter's `Locale.toString()` writes `pt_BR`).
    pub fn pick(&self, language: Option<&str>) -> Variant {
        let Some(code) = language.map(normalize_language).filter(|c| !c.is_empty()) else {
            return Variant::default();
        };
        let primary = code.split('-').next().unwrap_or_default();
        let find = |map: &BTreeMap<String, String>| {
            [code.as_str(), primary]
                .into_iter()
                .find(|k| map.contains_key(*k))
                .map(str::to_string)
        };
        Variant {
            title: find(&self.title),
            text: find(&self.text),
        }
    }

    /// Every variant some user can get, the plain one first: a user's language picks what
    /// one of the maps' keys picks, or the plain text.
    pub fn variants(&self) -> Vec<Variant> {
        let mut all = vec![Variant::default()];
        for code in self.title.keys().chain(self.text.keys()) {
            let variant = self.pick(Some(code));
            if !all.contains(&variant) {
                all.push(variant);
            }
        }
        all
    }
}

/// A language code as it is compared: trimmed, lower case, `_` read as `-`.
pub fn normalize_language(code: &str) -> String {
    code.trim().to_ascii_lowercase().replace('_', "-")
}

/// Whether `code` looks like a BCP 47 language tag (`de`, `pt-BR`, `zh-Hant-TW`, `es-419`):
/// a primary subtag of 2–3 letters, then subtags of 1–8 letters or digits, at most 35 bytes
/// in all (<https://www.rfc-editor.org/rfc/rfc5646#section-2.1>). `_` separates too.
pub fn is_language_code(code: &str) -> bool {
    let mut subtags = code.split(['-', '_']);
    let primary = subtags.next().unwrap_or_default();
    code.len() <= 35
        && (2..=3).contains(&primary.len())
        && primary.bytes().all(|b| b.is_ascii_alphabetic())
        && subtags
            .all(|s| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// One of the two maps: language code → non-empty text, at most [`MAX_LANGUAGES`] codes.
fn parse_translations(
    fields: &HashMap<String, Value>,
    name: &str,
) -> Result<BTreeMap<String, String>, Invalid> {
    let map = match fields.get(name).and_then(|v| v.value_type.as_ref()) {
        None | Some(value::ValueType::NullValue(_)) => return Ok(BTreeMap::new()),
        Some(value::ValueType::MapValue(map)) => map,
        Some(other) => {
            return Err(invalid(format!(
                "{name} must be a map from language code to text (e.g. {{\"de\": \"…\", \"pt-BR\": \"…\"}}), not {}",
                type_name(other)
            )));
        }
    };
    if map.fields.len() > MAX_LANGUAGES {
        return Err(invalid(format!(
            "{name} has {} languages, at most {MAX_LANGUAGES} are allowed",
            map.fields.len()
        )));
    }
    let mut out = BTreeMap::new();
    // In key order, so that the first bad key named is the same every time.
    let sorted: BTreeMap<&String, &Value> = map.fields.iter().collect();
    for (code, v) in sorted {
        if !is_language_code(code) {
            return Err(invalid(format!(
                "{name} key {code:?} is not a language code: use one like de, pt-BR or zh-Hant (the value of the users' language field)"
            )));
        }
        let text = match v.value_type.as_ref() {
            Some(value::ValueType::StringValue(s)) if !s.is_empty() => s,
            Some(value::ValueType::StringValue(_)) => {
                return Err(invalid(format!(
                    "{name}.{code} is empty: leave the language out, and its users get the plain text"
                )));
            }
            other => {
                return Err(invalid(format!(
                    "{name}.{code} must be a string, not {}",
                    other.map(type_name).unwrap_or("nothing")
                )));
            }
        };
        let key = normalize_language(code);
        if out.insert(key.clone(), text.clone()).is_some() {
            return Err(invalid(format!(
                "{name} has {key:?} twice (language codes are compared ignoring case, and _ as -): keep one"
            )));
        }
    }
    Ok(out)
}

/// FCM's longest time to live, 28 days ("ttl", maximum four weeks:
/// <https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#AndroidConfig>).
pub const MAX_TTL_SECONDS: u32 = 2_419_200;
/// APNs refuses an `apns-collapse-id` longer than this (BadCollapseId:
/// <https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns>).
pub const MAX_COLLAPSE_KEY_BYTES: usize = 64;
/// `notification_count` is an int32 in FCM's `AndroidNotification`
/// (<https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#AndroidNotification>).
const MAX_BADGE: i64 = i32::MAX as i64;
/// Topics FCM allows in one condition ("You can include up to five topics in your conditional
/// expression": <https://firebase.google.com/docs/cloud-messaging/send-message#send-messages-to-topics>).
pub const MAX_CONDITION_TOPICS: usize = 5;
/// FlutterFlow's two data keys, filled from `initial_page_name` and `parameter_data`.
const FLUTTERFLOW_DATA_KEYS: [&str; 2] = ["initialPageName", "parameterData"];

/// Why a document cannot be sent, in words for the `error` field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// A field that is `true`, `false`, or absent (false).
fn optional_bool(fields: &HashMap<String, Value>, name: &str) -> Result<bool, Invalid> {
    match fields.get(name).and_then(|v| v.value_type.as_ref()) {
        None | Some(value::ValueType::NullValue(_)) => Ok(false),
        Some(value::ValueType::BooleanValue(b)) => Ok(*b),
        Some(other) => Err(invalid(format!(
            "{name} must be true or false, not {}",
            type_name(other)
        ))),
    }
}

impl Notification {
    pub fn parse(source: Source, fields: &HashMap<String, Value>) -> Result<Self, Invalid> {
        let options = MessageOptions::parse(fields)?;
        // A silent message shows nothing: its title and text are optional data for the app.
        let (title, body) = if options.silent {
            (
                silent_text(fields, "notification_title")?,
                silent_text(fields, "notification_text")?,
            )
        } else {
            (
                required_text(fields, "notification_title")?,
                required_text(fields, "notification_text")?,
            )
        };
        let image = optional_text(fields, "notification_image_url")?;
        let sound = optional_text(fields, "notification_sound")?;
        if options.silent {
            options.refuse_shown_parts(image.is_some(), sound.is_some())?;
        }
        let initial_page = optional_text(fields, "initial_page_name")?;
        let parameter_data = optional_text(fields, "parameter_data")?;
        let scheduled_time = match fields
            .get("scheduled_time")
            .and_then(|v| v.value_type.as_ref())
        {
            None | Some(value::ValueType::NullValue(_)) => None,
            Some(value::ValueType::TimestampValue(ts)) => Some(
                DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32)
                    .ok_or_else(|| invalid("scheduled_time is out of range"))?,
            ),
            Some(other) => {
                return Err(invalid(format!(
                    "scheduled_time must be a Firestore timestamp, not {}",
                    type_name(other)
                )));
            }
        };
        let users = parse_user_refs(fields.get("user_refs"))?;
        let audience = if let Some(target) = parse_target(source, fields, users.is_empty())? {
            target
        } else if !users.is_empty() {
            Audience::Users(users)
        } else if source == Source::App {
            return Err(invalid(
                "user_refs is empty: notifications from the app are only sent to listed users, never broadcast",
            ));
        } else {
            let index = optional_int(fields, "batch_index")?;
            let count = optional_int(fields, "num_batches")?;
            let slice = match (index, count) {
                (_, None) | (_, Some(0)) => None,
                (index, Some(count)) => {
                    let index = index.unwrap_or(0);
                    if index >= count {
                        return Err(invalid(format!(
                            "batch_index {index} is out of range for num_batches {count} (use 0..{})",
                            count - 1
                        )));
                    }
                    Some(Slice { index, count })
                }
            };
            // FlutterFlow: `target_audience === "All" || device_type === target_audience`.
            let device_type = match optional_text(fields, "target_audience")? {
                None => return Err(invalid(NO_AUDIENCE)),
                Some(all) if all == "All" => None,
                Some(device_type) => Some(device_type),
            };
            Audience::Broadcast { device_type, slice }
        };
        if let Audience::Topic(_) | Audience::Condition(_) = audience
            && !options.translations.is_empty()
        {
            return Err(invalid(
                "notification_title_i18n and notification_text_i18n cannot be used with target_topic or target_condition: FCM sends one message to a topic's subscribers, whose languages ffpush does not know; send one notification per language topic instead",
            ));
        }
        Ok(Notification {
            title,
            body,
            image,
            sound,
            initial_page,
            parameter_data,
            audience,
            scheduled_time,
            options,
        })
    }
}

impl MessageOptions {
    /// The options of a notification document; the first bad one fails it, in one line naming
    /// the field and what it may be.
    pub fn parse(fields: &HashMap<String, Value>) -> Result<MessageOptions, Invalid> {
        let badge =
            optional_whole(fields, "notification_badge", 0, MAX_BADGE, "")?.map(|n| n as u32);
        let channel_id = optional_text(fields, "android_channel_id")?;
        let priority = match fields.get("priority").and_then(|v| v.value_type.as_ref()) {
            None | Some(value::ValueType::NullValue(_)) => None,
            Some(value::ValueType::StringValue(s)) if s == "high" => Some(Priority::High),
            Some(value::ValueType::StringValue(s)) if s == "normal" => Some(Priority::Normal),
            Some(other) => {
                let what = match other {
                    value::ValueType::StringValue(s) => format!("{s:?}"),
                    other => type_name(other).to_string(),
                };
                return Err(invalid(format!(
                    "priority must be \"high\" or \"normal\", not {what}"
                )));
            }
        };
        let ttl_seconds = optional_whole(
            fields,
            "ttl_seconds",
            0,
            i64::from(MAX_TTL_SECONDS),
            " seconds (28 days; 0: now or never)",
        )?
        .map(|n| n as u32);
        let collapse_key = optional_text(fields, "collapse_key")?;
        if let Some(key) = &collapse_key
            && key.len() > MAX_COLLAPSE_KEY_BYTES
        {
            return Err(invalid(format!(
                "collapse_key must be at most {MAX_COLLAPSE_KEY_BYTES} bytes (APNs' limit on apns-collapse-id), not {} bytes",
                key.len()
            )));
        }
        let silent = optional_bool(fields, "silent")?;
        let dry_run = optional_bool(fields, "dry_run")?;
        let data = parse_data(fields.get("data"), silent)?;
        let analytics_label = optional_text(fields, "analytics_label")?;
        if let Some(label) = &analytics_label
            && !is_analytics_label(label)
        {
            return Err(invalid(format!(
                "analytics_label must be 1 to 50 letters, digits or - _ . ~ % (FCM's ^[a-zA-Z0-9-_.~%]{{1,50}}$), not {label:?}"
            )));
        }
        let translations = Translations {
            title: parse_translations(fields, "notification_title_i18n")?,
            text: parse_translations(fields, "notification_text_i18n")?,
        };
        Ok(MessageOptions {
            badge,
            channel_id,
            priority,
            ttl_seconds,
            collapse_key,
            silent,
            data,
            analytics_label,
            dry_run,
            translations,
        })
    }

    /// A silent message is a background one: nothing may show, sound or badge (APNs: "the aps
    /// dictionary must not contain any keys that would trigger user interactions",
    /// <https://developer.apple.com/documentation/usernotifications/pushing-background-updates-to-your-app>).
    fn refuse_shown_parts(&self, image: bool, sound: bool) -> Result<(), Invalid> {
        let shown = [
            ("notification_image_url", image),
            ("notification_sound", sound),
            ("notification_badge", self.badge.is_some()),
            ("android_channel_id", self.channel_id.is_some()),
        ];
        match shown.iter().find(|(_, set)| *set) {
            Some((field, _)) => Err(invalid(format!(
                "{field} cannot be used with silent: true (a silent push shows nothing, plays no sound and sets no badge); remove one of them"
            ))),
            None => Ok(()),
        }
    }
}

/// Whether `label` is an analytics label FCM accepts: `^[a-zA-Z0-9-_.~%]{1,50}$`
/// (<https://firebase.google.com/docs/cloud-messaging/understand-delivery#adding-analytics-labels-to-messages>).
pub fn is_analytics_label(label: &str) -> bool {
    (1..=50).contains(&label.len()) && label.bytes().all(is_label_byte)
}

/// Whether `topic` is a topic name FCM accepts: `[a-zA-Z0-9-_.~%]+`, without `/topics/`
/// (<https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#Message>,
/// `topic`; the pattern is the one `subscribeToTopic` enforces,
/// <https://firebase.google.com/docs/cloud-messaging/android/topic-messaging>).
pub fn is_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.bytes().all(is_label_byte)
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%')
}

/// Checks an FCM condition: `'topic' in topics` terms joined by `&&` and `||`, each optionally
/// negated with `!`, grouped with parentheses, at most [`MAX_CONDITION_TOPICS`] topics
/// (<https://firebase.google.com/docs/cloud-messaging/send-message#send-messages-to-topics>).
/// Returns the number of topics, or what is wrong.
pub fn condition_topics(condition: &str) -> Result<usize, String> {
    let mut parser = Condition {
        rest: condition.trim_start(),
        topics: 0,
    };
    parser.expression(0)?;
    if !parser.rest.is_empty() {
        return Err(format!("unexpected {:?}", parser.rest));
    }
    if parser.topics > MAX_CONDITION_TOPICS {
        return Err(format!(
            "{} topics, at most {MAX_CONDITION_TOPICS} are allowed",
            parser.topics
        ));
    }
    Ok(parser.topics)
}

/// A recursive-descent reader of a condition; `rest` is what is left, without leading blanks.
struct Condition<'a> {
    rest: &'a str,
    topics: usize,
}

impl Condition<'_> {
    fn eat(&mut self, token: &str) -> bool {
        match self.rest.strip_prefix(token) {
            Some(rest) => {
                self.rest = rest.trim_start();
                true
            }
            None => false,
        }
    }

    fn expression(&mut self, depth: usize) -> Result<(), String> {
        loop {
            self.term(depth)?;
            if !(self.eat("&&") || self.eat("||")) {
                return Ok(());
            }
        }
    }

    fn term(&mut self, depth: usize) -> Result<(), String> {
        // Five topics need little nesting; a deep one is refused before it costs stack.
        if depth > 16 {
            return Err("too deeply nested".into());
        }
        if self.eat("!") {
            return self.term(depth + 1);
        }
        if self.eat("(") {
            self.expression(depth + 1)?;
            return if self.eat(")") {
                Ok(())
            } else {
                Err("a ( is not closed".into())
            };
        }
        let quote = match self.rest.chars().next() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err("expected 'topic' in topics".into()),
        };
        let inner = &self.rest[1..];
        let end = inner
            .find(quote)
            .ok_or_else(|| "a topic's quote is not closed".to_string())?;
        let topic = &inner[..end];
        if !is_topic_name(topic) {
            return Err(format!(
                "{topic:?} is not a topic name (letters, digits and - _ . ~ %)"
            ));
        }
        self.rest = inner[end + 1..].trim_start();
        // `in` and `topics` are words: `intopics` is neither.
        let word = |s: &str, w: &str| {
            s.strip_prefix(w)
                .filter(|r| !r.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
                .is_some()
        };
        if !word(self.rest, "in") {
            return Err(format!("expected `in topics` after '{topic}'"));
        }
        self.rest = self.rest[2..].trim_start();
        if !word(self.rest, "topics") {
            return Err(format!("expected `in topics` after '{topic}'"));
        }
        self.rest = self.rest[6..].trim_start();
        self.topics += 1;
        Ok(())
    }
}

/// `target_topic` / `target_condition`: one request to FCM's own fan-out. Console documents
/// only, and instead of (never beside) `user_refs` or a broadcast.
fn parse_target(
    source: Source,
    fields: &HashMap<String, Value>,
    no_users: bool,
) -> Result<Option<Audience>, Invalid> {
    let topic = optional_text(fields, "target_topic")?;
    let condition = optional_text(fields, "target_condition")?;
    let (field, target) = match (topic, condition) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "target_topic and target_condition are both set: set one (a condition may name the topic: 'news' in topics)",
            ));
        }
        (Some(topic), None) => {
            if !is_topic_name(&topic) {
                return Err(invalid(format!(
                    "target_topic must be a topic name of letters, digits and - _ . ~ % (e.g. news, without /topics/), not {topic:?}"
                )));
            }
            ("target_topic", Audience::Topic(topic))
        }
        (None, Some(condition)) => {
            if let Err(why) = condition_topics(&condition) {
                return Err(invalid(format!(
                    "target_condition must be up to {MAX_CONDITION_TOPICS} topics as 'a' in topics, joined with && and || (and ! or parentheses), e.g. 'a' in topics && ('b' in topics || 'c' in topics); {condition:?}: {why}"
                )));
            }
            ("target_condition", Audience::Condition(condition))
        }
    };
    if source == Source::App {
        return Err(invalid(format!(
            "{field} is for ff_push_notifications only: notifications from the app are only sent to the users in user_refs"
        )));
    }
    let broadcast = ["target_audience", "batch_index", "num_batches"]
        .into_iter()
        .find(|f| {
            fields
                .get(*f)
                .and_then(|v| v.value_type.as_ref())
                .is_some_and(|v| match v {
                    value::ValueType::NullValue(_) => false,
                    value::ValueType::StringValue(s) => !s.trim().is_empty(),
                    _ => true,
                })
        });
    let beside = if no_users {
        broadcast
    } else {
        Some("user_refs")
    };
    if let Some(other) = beside {
        return Err(invalid(format!(
            "{field} cannot be used with {other}: a topic or condition is its own audience (FCM sends to its subscribers); remove one of them"
        )));
    }
    Ok(Some(target))
}

/// `data`: a map of strings, none of them a key FlutterFlow's fields fill or FCM keeps for
/// itself (`from`, `notification`, `message_type`, `google…`, `gcm…`:
/// <https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages#Message>, `data`).
/// A silent message carries the title and text as `title` and `body`: those are taken too.
fn parse_data(value: Option<&Value>, silent: bool) -> Result<BTreeMap<String, String>, Invalid> {
    let map = match value.and_then(|v| v.value_type.as_ref()) {
        None | Some(value::ValueType::NullValue(_)) => return Ok(BTreeMap::new()),
        Some(value::ValueType::MapValue(map)) => map,
        Some(other) => {
            return Err(invalid(format!(
                "data must be a map of string values, not {}",
                type_name(other)
            )));
        }
    };
    let mut data = BTreeMap::new();
    for (key, v) in &map.fields {
        let text = match v.value_type.as_ref() {
            Some(value::ValueType::StringValue(s)) => s,
            Some(other) => {
                return Err(invalid(format!(
                    "data.{key} must be a string (FCM's data values are strings), not {}",
                    type_name(other)
                )));
            }
            None => {
                return Err(invalid(format!(
                    "data.{key} must be a string (FCM's data values are strings)"
                )));
            }
        };
        let lower = key.to_ascii_lowercase();
        let why = if key.is_empty() {
            Some("an empty key is not allowed")
        } else if FLUTTERFLOW_DATA_KEYS.contains(&key.as_str()) {
            Some("it is set from initial_page_name / parameter_data; set those fields instead")
        } else if matches!(key.as_str(), "from" | "notification" | "message_type")
            || lower.starts_with("google")
            || lower.starts_with("gcm")
        {
            Some(
                "FCM reserves from, notification, message_type and keys starting with google or gcm",
            )
        } else if silent && matches!(key.as_str(), "title" | "body") {
            Some(
                "a silent push carries notification_title and notification_text there; set those fields instead",
            )
        } else {
            None
        };
        if let Some(why) = why {
            return Err(invalid(format!("data key {key:?} cannot be used: {why}")));
        }
        data.insert(key.clone(), text.clone());
    }
    Ok(data)
}

/// `notification_title` / `notification_text` of a silent message: optional, "" when unset.
fn silent_text(fields: &HashMap<String, Value>, name: &str) -> Result<String, Invalid> {
    match fields.get(name).and_then(|v| v.value_type.as_ref()) {
        None | Some(value::ValueType::NullValue(_)) => Ok(String::new()),
        Some(value::ValueType::StringValue(s)) => Ok(s.clone()),
        Some(other) => Err(invalid(format!(
            "{name} must be a string, not {}",
            type_name(other)
        ))),
    }
}

/// A whole number field within `min..=max`; `unit` follows the bounds in the error.
fn optional_whole(
    fields: &HashMap<String, Value>,
    name: &str,
    min: i64,
    max: i64,
    unit: &str,
) -> Result<Option<i64>, Invalid> {
    let bad = |what: String| {
        invalid(format!(
            "{name} must be a whole number from {min} to {max}{unit}, not {what}"
        ))
    };
    let n = match fields.get(name).and_then(|v| v.value_type.as_ref()) {
        None | Some(value::ValueType::NullValue(_)) => return Ok(None),
        Some(value::ValueType::IntegerValue(n)) => *n,
        Some(value::ValueType::DoubleValue(d)) if d.fract() == 0.0 && d.abs() < 1e15 => *d as i64,
        Some(value::ValueType::DoubleValue(d)) => return Err(bad(d.to_string())),
        Some(other) => return Err(bad(type_name(other).to_string())),
    };
    if (min..=max).contains(&n) {
        Ok(Some(n))
    } else {
        Err(bad(n.to_string()))
    }
}

pub fn string_value(v: &Value) -> Option<&str> {
    match v.value_type.as_ref()? {
        value::ValueType::StringValue(s) => Some(s),
        _ => None,
    }
}

fn type_name(v: &value::ValueType) -> &'static str {
    use value::ValueType as T;
    match v {
        T::NullValue(_) => "null",
        T::BooleanValue(_) => "a boolean",
        T::IntegerValue(_) => "an integer",
        T::DoubleValue(_) => "a number",
        T::TimestampValue(_) => "a timestamp",
        T::StringValue(_) => "a string",
        T::BytesValue(_) => "bytes",
        T::ReferenceValue(_) => "a reference",
        T::GeoPointValue(_) => "a geopoint",
        T::ArrayValue(_) => "an array",
        T::MapValue(_) => "a map",
        _ => "an unsupported value",
    }
}

/// A string field that must be there and not be "". Blank text (spaces) is sent as it is, as
/// FlutterFlow does: apps use a title of spaces for body-only notifications.
fn required_text(fields: &HashMap<String, Value>, name: &str) -> Result<String, Invalid> {
    match fields.get(name).and_then(|v| v.value_type.as_ref()) {
        Some(value::ValueType::StringValue(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(value::ValueType::NullValue(_)) | Some(value::ValueType::StringValue(_)) => {
            Err(invalid(format!(
                "{name} is missing or empty: set it to the text to show"
            )))
        }
        Some(other) => Err(invalid(format!(
            "{name} must be a string, not {}",
            type_name(other)
        ))),
    }
}

/// A string field; absent, null or blank → `None`; any other type is an error.
fn optional_text(fields: &HashMap<String, Value>, name: &str) -> Result<Option<String>, Invalid> {
    match fields.get(name).and_then(|v| v.value_type.as_ref()) {
        None | Some(value::ValueType::NullValue(_)) => Ok(None),
        Some(value::ValueType::StringValue(s)) if s.trim().is_empty() => Ok(None),
        Some(value::ValueType::StringValue(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "{name} must be a string, not {}",
            type_name(other)
        ))),
    }
}

fn optional_int(fields: &HashMap<String, Value>, name: &str) -> Result<Option<u32>, Invalid> {
    let n = match fields.get(name).and_then(|v| v.value_type.as_ref()) {
        None | Some(value::ValueType::NullValue(_)) => return Ok(None),
        Some(value::ValueType::IntegerValue(n)) => *n,
        Some(value::ValueType::DoubleValue(d)) if d.fract() == 0.0 && d.abs() < 1e9 => *d as i64,
        Some(other) => {
            return Err(invalid(format!(
                "{name} must be a whole number, not {}",
                type_name(other)
            )));
        }
    };
    u32::try_from(n)
        .map(Some)
        .map_err(|_| invalid(format!("{name} must be 0 or more, not {n}")))
}

/// `user_refs` as FlutterFlow writes it (comma-separated paths) or as an array of paths or
/// references. Returns unique document paths in the order of their token documents.
fn parse_user_refs(value: Option<&Value>) -> Result<Vec<String>, Invalid> {
    let mut paths: Vec<String> = Vec::new();
    match value.and_then(|v| v.value_type.as_ref()) {
        None | Some(value::ValueType::NullValue(_)) => {}
        Some(value::ValueType::StringValue(s)) => {
            paths.extend(
                s.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from),
            );
        }
        Some(value::ValueType::ReferenceValue(r)) => paths.push(r.clone()),
        Some(value::ValueType::ArrayValue(array)) => {
            for (i, item) in array.values.iter().enumerate() {
                match item.value_type.as_ref() {
                    Some(value::ValueType::StringValue(s)) if s.trim().is_empty() => {}
                    Some(value::ValueType::StringValue(s)) => paths.push(s.trim().to_string()),
                    Some(value::ValueType::ReferenceValue(r)) => paths.push(r.clone()),
                    Some(other) => {
                        return Err(invalid(format!(
                            "user_refs[{i}] must be a user reference or a path like users/abc, not {}",
                            type_name(other)
                        )));
                    }
                    None => {}
                }
            }
        }
        Some(other) => {
            return Err(invalid(format!(
                "user_refs must be a comma-separated string of paths like users/abc, not {}",
                type_name(other)
            )));
        }
    }
    let mut users = paths
        .iter()
        .map(|p| user_doc_path(p).map_err(|e| invalid(format!("user_refs: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    // A user's tokens are `<path>/fcm_tokens/*`: ordering by that collection's path, segment
    // by segment as Firestore orders names, orders the token documents too (no path may lie
    // inside another's fcm_tokens, see `user_doc_path`).
    fn tokens_of(path: &str) -> impl Iterator<Item = &str> {
        path.split('/').chain(std::iter::once(TOKENS))
    }
    users.sort_by(|a, b| tokens_of(a).cmp(tokens_of(b)));
    users.dedup();
    Ok(users)
}

/// The device-token subcollection under each user document.
const TOKENS: &str = "fcm_tokens";

/// The user document at `path` as FlutterFlow would read it (`<path>/fcm_tokens`), relative to
/// the database: `users/abc`, `/Users/abc`, `orgs/o1/members/m1`, or a full reference name
/// `projects/…/documents/users/abc`. Anything that is not a document path is refused with
/// the reason, starting with the path quoted.
pub fn user_doc_path(path: &str) -> Result<String, Invalid> {
    let relative = match path.find("/documents/") {
        Some(i) if path.starts_with("projects/") => &path[i + "/documents/".len()..],
        _ => path,
    };
    let relative = relative.trim_matches('/');
    let segments: Vec<&str> = relative.split('/').collect();
    let why = if relative.is_empty() {
        Some("an empty path".to_string())
    } else if segments.iter().any(|s| s.is_empty()) {
        Some("an empty segment (//)".to_string())
    } else if segments.len() % 2 == 1 {
        Some(
            "a collection, not a document (a document path has an even number of segments)"
                .to_string(),
        )
    } else if let Some(id) = segments
        .iter()
        .find(|s| (s.starts_with("__") && s.ends_with("__")) || **s == "." || **s == "..")
    {
        Some(format!("the reserved id {id:?}"))
    } else if segments.iter().step_by(2).any(|c| *c == TOKENS) {
        Some("a device token (fcm_tokens) path, not a user".to_string())
    } else {
        None
    };
    match why {
        None => Ok(relative.to_string()),
        Some(why) => Err(invalid(format!(
            "{path:?} is not a user document path like users/abc: {why}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value {
            value_type: Some(value::ValueType::StringValue(v.into())),
        }
    }
    fn int(n: i64) -> Value {
        Value {
            value_type: Some(value::ValueType::IntegerValue(n)),
        }
    }
    fn fields(pairs: &[(&str, Value)]) -> HashMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }
    fn base() -> Vec<(&'static str, Value)> {
        vec![
            ("notification_title", s("Hi")),
            ("notification_text", s("There")),
        ]
    }

    #[test]
    fn bounds_match_flutterflow_at_the_edges() {
        assert_eq!(Slice::bound(0, 10), None);
        assert_eq!(Slice::bound(10, 10), None);
        assert_eq!(Slice::bound(0, 1), None);
        assert_eq!(Slice::bound(1, 1), None);
        // 3 * 3844 / 10 = 1153.2 → 1153 = 18*62 + 37 → "I" "b"
        assert_eq!(Slice::bound(3, 10).as_deref(), Some("Ib"));
        // n-1 of n: 9 * 3844 / 10 = 3459.6 → 3459 = 55*62 + 49 → "t" "n"
        assert_eq!(Slice::bound(9, 10).as_deref(), Some("tn"));
        assert_eq!(Slice::bound(1, 2).as_deref(), Some("V0"));
        // n > 62²: neighbouring bounds collide, leaving empty slices but no gaps.
        let n = 5000;
        assert_eq!(Slice::bound(1, n).as_deref(), Some("00"));
        assert_eq!(Slice::bound(2, n).as_deref(), Some("01"));
        assert_eq!(Slice::bound(n - 1, n).as_deref(), Some("zz"));
    }

    #[test]
    fn slices_partition_every_id_exactly_once() {
        let ids = [
            "0", "00", "0z", "A", "Ib", "Ia", "Z9", "a", "zz", "zzz", "~", "é",
        ];
        for n in [1, 2, 3, 10, 62, 3844, 5000] {
            for id in ids {
                let owners = (0..n)
                    .filter(|&i| Slice { index: i, count: n }.contains(id))
                    .count();
                assert_eq!(owners, 1, "id {id} with n={n}");
            }
        }
    }

    #[test]
    fn user_refs_string_is_trimmed_and_empties_skipped() {
        let f = fields(
            &[
                base(),
                vec![("user_refs", s(" users/b , ,users/a,users/b"))],
            ]
            .concat(),
        );
        let n = Notification::parse(Source::App, &f).unwrap();
        assert_eq!(
            n.audience,
            Audience::Users(vec!["users/a".into(), "users/b".into()])
        );
    }

    #[test]
    fn user_refs_as_references() {
        let r = Value {
            value_type: Some(value::ValueType::ReferenceValue(
                "projects/p/databases/(default)/documents/users/u9".into(),
            )),
        };
        let arr = Value {
            value_type: Some(value::ValueType::ArrayValue(pb::ArrayValue {
                values: vec![r, s("users/u1")],
            })),
        };
        let f = fields(&[base(), vec![("user_refs", arr)]].concat());
        let n = Notification::parse(Source::Console, &f).unwrap();
        assert_eq!(
            n.audience,
            Audience::Users(vec!["users/u1".into(), "users/u9".into()])
        );
    }

    #[test]
    fn any_document_path_is_a_user_and_anything_else_is_named() {
        for (path, relative) in [
            ("users/a", "users/a"),
            ("Users/a", "Users/a"),
            ("/user_data/a/", "user_data/a"),
            ("orgs/o1/members/m1", "orgs/o1/members/m1"),
            (
                "projects/p/databases/(default)/documents/Users/x",
                "Users/x",
            ),
        ] {
            assert_eq!(user_doc_path(path).unwrap(), relative, "{path}");
        }
        for (path, why) in [
            ("users", "a collection"),
            ("users/a/fcm_tokens", "a collection"),
            ("", "empty path"),
            ("users//a", "empty segment"),
            ("users/__a__", "reserved id"),
            ("users/..", "reserved id"),
            ("users/a/fcm_tokens/t", "device token"),
        ] {
            let err = user_doc_path(path).unwrap_err().0;
            assert!(
                err.starts_with(&format!("{path:?} is not")) && err.contains(why),
                "{path}: {err}"
            );
        }
        let f = fields(&[base(), vec![("user_refs", s("users/a,posts"))]].concat());
        let err = Notification::parse(Source::Console, &f).unwrap_err();
        assert!(err.0.starts_with("user_refs: \"posts\" is not"), "{err}");
    }

    #[test]
    fn user_paths_are_in_the_order_of_their_token_documents() {
        // Firestore orders names segment by segment: `users/a/…` before `users/a-b/…`, and
        // `users/a/fcm_tokens/…` before `users/a/zz/…` but after `users/a/abc/…`.
        let f = fields(
            &[
                base(),
                vec![(
                    "user_refs",
                    s("users/a-b,users/a/zz/1,users/a,users/a/abc/1,Users/z,users/a"),
                )],
            ]
            .concat(),
        );
        let n = Notification::parse(Source::Console, &f).unwrap();
        assert_eq!(
            n.audience,
            Audience::Users(
                [
                    "Users/z",
                    "users/a/abc/1",
                    "users/a",
                    "users/a/zz/1",
                    "users/a-b"
                ]
                .map(String::from)
                .to_vec()
            )
        );
    }

    #[test]
    fn app_documents_are_never_broadcast() {
        let f = fields(&[base(), vec![("target_audience", s("All"))]].concat());
        let err = Notification::parse(Source::App, &f).unwrap_err();
        assert!(err.0.contains("never broadcast"));
    }

    #[test]
    fn all_exactly_is_everyone_other_values_are_device_types_and_none_is_nobody() {
        let audience = |v: Option<&str>| {
            let mut f = fields(&base());
            if let Some(v) = v {
                f.insert("target_audience".into(), s(v));
            }
            Notification::parse(Source::Console, &f).map(|n| n.audience)
        };
        let only = |d: &str| {
            Ok(Audience::Broadcast {
                device_type: Some(d.into()),
                slice: None,
            })
        };
        assert_eq!(
            audience(Some("All")),
            Ok(Audience::Broadcast {
                device_type: None,
                slice: None
            })
        );
        assert_eq!(audience(Some("all")), only("all"));
        assert_eq!(audience(Some("iOS")), only("iOS"));
        assert_eq!(audience(Some("All ")), only("All "));
        for nobody in [None, Some(""), Some("  ")] {
            let err = audience(nobody).unwrap_err().0;
            assert!(
                err.contains("user_refs") && err.contains("target_audience"),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_or_wrong_typed_text_fails_with_the_field_name() {
        let f = fields(&[("notification_text", s("x"))]);
        assert!(
            Notification::parse(Source::Console, &f)
                .unwrap_err()
                .0
                .contains("notification_title")
        );
        let f = fields(&[("notification_title", s("")), ("notification_text", s("x"))]);
        assert!(
            Notification::parse(Source::Console, &f)
                .unwrap_err()
                .0
                .contains("notification_title")
        );
        // Blank is not empty: FlutterFlow sends it (body-only notifications).
        let f = fields(&[
            ("notification_title", s("  ")),
            ("notification_text", s(" ")),
            ("user_refs", s("users/a")),
        ]);
        let n = Notification::parse(Source::Console, &f).unwrap();
        assert_eq!((n.title.as_str(), n.body.as_str()), ("  ", " "));
        let f = fields(&[
            ("notification_title", int(3)),
            ("notification_text", s("x")),
        ]);
        let err = Notification::parse(Source::Console, &f).unwrap_err();
        assert_eq!(err.0, "notification_title must be a string, not an integer");
    }

    #[test]
    fn batch_fields_are_checked() {
        let f = fields(
            &[
                base(),
                vec![
                    ("batch_index", int(3)),
                    ("num_batches", int(10)),
                    ("target_audience", s("iOS")),
                ],
            ]
            .concat(),
        );
        let n = Notification::parse(Source::Console, &f).unwrap();
        assert_eq!(
            n.audience,
            Audience::Broadcast {
                device_type: Some("iOS".into()),
                slice: Some(Slice {
                    index: 3,
                    count: 10
                })
            }
        );
        let f = fields(
            &[
                base(),
                vec![("batch_index", s("3")), ("num_batches", int(10))],
            ]
            .concat(),
        );
        assert!(
            Notification::parse(Source::Console, &f)
                .unwrap_err()
                .0
                .contains("batch_index must be a whole number")
        );
        let f = fields(
            &[
                base(),
                vec![("batch_index", int(10)), ("num_batches", int(10))],
            ]
            .concat(),
        );
        assert!(
            Notification::parse(Source::Console, &f)
                .unwrap_err()
                .0
                .contains("out of range")
        );
        let f = fields(&[base(), vec![("num_batches", int(-1))]].concat());
        assert!(Notification::parse(Source::Console, &f).is_err());
        let f = fields(&[base(), vec![("scheduled_time", s("tomorrow"))]].concat());
        assert!(
            Notification::parse(Source::Console, &f)
                .unwrap_err()
                .0
                .contains("scheduled_time")
        );
    }

    fn boolean(b: bool) -> Value {
        Value {
            value_type: Some(value::ValueType::BooleanValue(b)),
        }
    }
    fn map(pairs: &[(&str, Value)]) -> Value {
        Value {
            value_type: Some(value::ValueType::MapValue(pb::MapValue {
                fields: fields(pairs),
            })),
        }
    }
    fn targeted(extra: Vec<(&'static str, Value)>) -> HashMap<String, Value> {
        fields(&[base(), vec![("user_refs", s("users/a"))], extra].concat())
    }
    fn parse_error(source: Source, f: &HashMap<String, Value>) -> String {
        Notification::parse(source, f).unwrap_err().0
    }

    #[test]
    fn every_option_is_read() {
        let f = targeted(vec![
            ("notification_badge", int(3)),
            ("android_channel_id", s("chat")),
            ("priority", s("normal")),
            ("ttl_seconds", int(MAX_TTL_SECONDS.into())),
            ("collapse_key", s(&"k".repeat(MAX_COLLAPSE_KEY_BYTES))),
            ("data", map(&[("kind", s("chat")), ("empty", s(""))])),
            ("analytics_label", s("Spring-sale_2.0~%")),
        ]);
        let n = Notification::parse(Source::App, &f).unwrap();
        assert_eq!(
            n.options,
            MessageOptions {
                badge: Some(3),
                channel_id: Some("chat".into()),
                priority: Some(Priority::Normal),
                ttl_seconds: Some(MAX_TTL_SECONDS),
                collapse_key: Some("k".repeat(MAX_COLLAPSE_KEY_BYTES)),
                silent: false,
                data: [
                    ("empty".into(), String::new()),
                    ("kind".into(), "chat".into())
                ]
                .into(),
                analytics_label: Some("Spring-sale_2.0~%".into()),
                dry_run: false,
                translations: Translations::default(),
            }
        );
        let plain = Notification::parse(Source::App, &targeted(vec![])).unwrap();
        assert_eq!(plain.options, MessageOptions::default());
    }

    #[test]
    fn a_bad_option_names_the_field_and_what_it_may_be() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "notification_badge",
                int(-1),
                "notification_badge must be a whole number from 0 to 2147483647, not -1",
            ),
            (
                "notification_badge",
                s("3"),
                "notification_badge must be a whole number from 0 to 2147483647, not a string",
            ),
            (
                "notification_badge",
                int(1 << 31),
                "notification_badge must be a whole number from 0 to 2147483647, not 2147483648",
            ),
            (
                "android_channel_id",
                int(1),
                "android_channel_id must be a string, not an integer",
            ),
            (
                "priority",
                s("HIGH"),
                "priority must be \"high\" or \"normal\", not \"HIGH\"",
            ),
            (
                "priority",
                int(10),
                "priority must be \"high\" or \"normal\", not an integer",
            ),
            (
                "ttl_seconds",
                int(2_419_201),
                "ttl_seconds must be a whole number from 0 to 2419200 seconds (28 days; 0: now or never), not 2419201",
            ),
            (
                "ttl_seconds",
                s("1h"),
                "ttl_seconds must be a whole number from 0 to 2419200 seconds (28 days; 0: now or never), not a string",
            ),
            (
                "collapse_key",
                s(&"é".repeat(33)),
                "collapse_key must be at most 64 bytes (APNs' limit on apns-collapse-id), not 66 bytes",
            ),
            (
                "silent",
                s("true"),
                "silent must be true or false, not a string",
            ),
            (
                "data",
                s("{}"),
                "data must be a map of string values, not a string",
            ),
            (
                "data",
                map(&[("n", int(1))]),
                "data.n must be a string (FCM's data values are strings), not an integer",
            ),
            (
                "analytics_label",
                s("spring sale"),
                "analytics_label must be 1 to 50 letters, digits or - _ . ~ % (FCM's ^[a-zA-Z0-9-_.~%]{1,50}$), not \"spring sale\"",
            ),
            (
                "analytics_label",
                s(&"a".repeat(51)),
                "analytics_label must be 1 to 50",
            ),
        ];
        for (field, value, expected) in cases {
            let err = parse_error(Source::Console, &targeted(vec![(field, value)]));
            assert!(err.starts_with(expected), "{field}: {err}");
            assert!(!err.contains('\n'));
        }
        for key in [
            "initialPageName",
            "parameterData",
            "from",
            "notification",
            "message_type",
            "google.c.a",
            "gcm.n.e",
            "gcm",
            "google",
        ] {
            let err = parse_error(
                Source::Console,
                &targeted(vec![("data", map(&[(key, s("v"))]))]),
            );
            assert!(
                err.starts_with(&format!("data key {key:?} cannot be used: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn translations_are_read_normalized_and_bad_ones_name_the_field() {
        let f = targeted(vec![
            (
                "notification_title_i18n",
                map(&[("de", s("Hallo")), ("pt_BR", s("Oi"))]),
            ),
            ("notification_text_i18n", map(&[("zh-Hant-TW", s("文"))])),
        ]);
        let t = Notification::parse(Source::App, &f)
            .unwrap()
            .options
            .translations;
        assert_eq!(
            t.title,
            [("de".into(), "Hallo".into()), ("pt-br".into(), "Oi".into())].into()
        );
        assert_eq!(t.text, [("zh-hant-tw".into(), "文".into())].into());
        let too_many: Vec<(String, Value)> = (0..=MAX_LANGUAGES)
            .map(|i| {
                (
                    format!(
                        "l{}{}",
                        (b'a' + (i / 26) as u8) as char,
                        (b'a' + (i % 26) as u8) as char
                    ),
                    s("x"),
                )
            })
            .collect();
        let too_many: Vec<(&str, Value)> = too_many
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "notification_title_i18n",
                s("Hallo"),
                "notification_title_i18n must be a map from language code to text",
            ),
            (
                "notification_text_i18n",
                map(&[("german", s("x"))]),
                "notification_text_i18n key \"german\" is not a language code",
            ),
            (
                "notification_text_i18n",
                map(&[("de-", s("x"))]),
                "notification_text_i18n key \"de-\" is not a language code",
            ),
            (
                "notification_title_i18n",
                map(&[("de", s(""))]),
                "notification_title_i18n.de is empty",
            ),
            (
                "notification_title_i18n",
                map(&[("de", int(1))]),
                "notification_title_i18n.de must be a string, not an integer",
            ),
            (
                "notification_title_i18n",
                map(&[("pt-BR", s("a")), ("pt_br", s("b"))]),
                "notification_title_i18n has \"pt-br\" twice",
            ),
            (
                "notification_text_i18n",
                map(&too_many),
                "notification_text_i18n has 101 languages, at most 100",
            ),
        ];
        for (field, value, expected) in cases {
            let err = parse_error(Source::Console, &targeted(vec![(field, value)]));
            assert!(err.starts_with(expected), "{field}: {err}");
            assert!(!err.contains('\n'));
        }
        let err = parse_error(
            Source::Console,
            &fields(
                &[
                    base(),
                    vec![
                        ("target_topic", s("news")),
                        ("notification_title_i18n", map(&[("de", s("Hallo"))])),
                    ],
                ]
                .concat(),
            ),
        );
        assert!(err.starts_with("notification_title_i18n and notification_text_i18n cannot be used with target_topic"), "{err}");
        for good in ["de", "pt-BR", "zh-Hant-TW", "es-419", "fil", "pt_BR"] {
            assert!(is_language_code(good), "{good}");
        }
        for bad in [
            "",
            "d",
            "deutsch",
            "1a",
            "de--at",
            "de-verylongsubtag",
            "de at",
        ] {
            assert!(!is_language_code(bad), "{bad}");
        }
    }

    #[test]
    fn a_silent_push_needs_no_text_and_shows_nothing() {
        let f = fields(&[("user_refs", s("users/a")), ("silent", boolean(true))]);
        let n = Notification::parse(Source::App, &f).unwrap();
        assert!(n.options.silent);
        assert_eq!((n.title.as_str(), n.body.as_str()), ("", ""));
        // silent: false is an ordinary notification: the text is required.
        let f = fields(&[("user_refs", s("users/a")), ("silent", boolean(false))]);
        assert!(parse_error(Source::App, &f).starts_with("notification_title is missing"));
        for (field, value) in [
            ("notification_image_url", s("https://x/y.png")),
            ("notification_sound", s("default")),
            ("notification_badge", int(1)),
            ("android_channel_id", s("chat")),
        ] {
            let f = targeted(vec![("silent", boolean(true)), (field, value)]);
            let err = parse_error(Source::Console, &f);
            assert!(
                err.starts_with(&format!("{field} cannot be used with silent: true")),
                "{err}"
            );
        }
        for key in ["title", "body"] {
            let f = targeted(vec![
                ("silent", boolean(true)),
                ("data", map(&[(key, s("x"))])),
            ]);
            assert!(parse_error(Source::Console, &f).starts_with(&format!("data key {key:?}")));
            // Not silent: the app's own keys.
            let f = targeted(vec![("data", map(&[(key, s("x"))]))]);
            Notification::parse(Source::Console, &f).unwrap();
        }
    }

    #[test]
    fn a_topic_or_condition_is_its_own_audience_on_console_documents_only() {
        let with = |extra: Vec<(&'static str, Value)>| fields(&[base(), extra].concat());
        let n = Notification::parse(
            Source::Console,
            &with(vec![("target_topic", s("news-1_a.b~c%d"))]),
        )
        .unwrap();
        assert_eq!(n.audience, Audience::Topic("news-1_a.b~c%d".into()));
        let condition = "'a' in topics && ('b' in topics || !('c' in topics))";
        let n = Notification::parse(
            Source::Console,
            &with(vec![("target_condition", s(condition))]),
        )
        .unwrap();
        assert_eq!(n.audience, Audience::Condition(condition.into()));

        let refused = [
            (
                vec![("target_topic", s("/topics/news"))],
                "target_topic must be a topic name",
            ),
            (
                vec![("target_topic", s("news sport"))],
                "target_topic must be a topic name",
            ),
            (
                vec![("target_condition", s("'a' in topics &&"))],
                "target_condition must be up to 5 topics",
            ),
            (
                vec![
                    ("target_topic", s("a")),
                    ("target_condition", s("'a' in topics")),
                ],
                "target_topic and target_condition are both set",
            ),
            (
                vec![("target_topic", s("news")), ("user_refs", s("users/a"))],
                "target_topic cannot be used with user_refs",
            ),
            (
                vec![
                    ("target_condition", s("'a' in topics")),
                    ("target_audience", s("All")),
                ],
                "target_condition cannot be used with target_audience",
            ),
            (
                vec![("target_topic", s("news")), ("num_batches", int(2))],
                "target_topic cannot be used with num_batches",
            ),
            (
                vec![("target_topic", int(1))],
                "target_topic must be a string",
            ),
        ];
        for (extra, expected) in refused {
            let err = parse_error(Source::Console, &with(extra.clone()));
            assert!(err.starts_with(expected), "{extra:?}: {err}");
        }
        let err = parse_error(
            Source::App,
            &with(vec![
                ("target_topic", s("news")),
                ("user_refs", s("users/a")),
            ]),
        );
        assert!(
            err.starts_with("target_topic is for ff_push_notifications only"),
            "{err}"
        );
        let err = parse_error(
            Source::App,
            &with(vec![("target_condition", s("'a' in topics"))]),
        );
        assert!(
            err.starts_with("target_condition is for ff_push_notifications only"),
            "{err}"
        );
    }

    #[test]
    fn conditions_are_read_as_fcm_reads_them() {
        for (good, topics) in [
            ("'a' in topics", 1),
            ("\"a\" in topics", 1),
            (
                "'TopicA' in topics && ('TopicB' in topics || 'TopicC' in topics)",
                3,
            ),
            ("!('a' in topics)||'b'in topics", 2),
            (
                "('a' in topics && 'b' in topics) || ('c' in topics && 'd' in topics) || 'e' in topics",
                5,
            ),
        ] {
            assert_eq!(condition_topics(good), Ok(topics), "{good}");
        }
        for bad in [
            "",
            "a in topics",
            "'a' in topic",
            "'a' intopics",
            "'a' in topics &",
            "'a' in topics && ",
            "('a' in topics",
            "'a' in topics)",
            "'a b' in topics",
            "'a' in topics && 'b' in topics && 'c' in topics && 'd' in topics && 'e' in topics && 'f' in topics",
        ] {
            assert!(condition_topics(bad).is_err(), "{bad}");
        }
        assert!(condition_topics(&"!".repeat(100_000)).is_err());
        assert!(condition_topics(&"(".repeat(100_000)).is_err());
    }

    #[test]
    fn status_reading() {
        let mut d = Document::default();
        assert_eq!(Status::of(&d), Status::New);
        d.fields.insert("status".into(), s(""));
        assert_eq!(Status::of(&d), Status::New);
        d.fields.insert("status".into(), s("started"));
        assert_eq!(Status::of(&d), Status::Started);
        d.fields.insert("status".into(), s("succeeded"));
        assert_eq!(Status::of(&d), Status::Succeeded);
        d.fields.insert("status".into(), s("cancelled"));
        assert_eq!(Status::of(&d), Status::Cancelled);
        assert!(Status::of(&d).is_finished());
        d.fields.insert("status".into(), s("sent by hand"));
        assert_eq!(Status::of(&d), Status::Other("sent by hand".into()));
        assert!(Status::of(&d).is_finished());
        assert!(!Status::Started.is_finished());
        for status in [
            Status::New,
            Status::Started,
            Status::Succeeded,
            Status::Failed,
            Status::Cancelled,
            Status::Validated,
        ] {
            assert_eq!(Status::parse(status.as_str()), status);
        }
    }
}
