//! What one app user can make the worker spend, bounded by the worker itself (security rules
//! may be missing, or replaced by a FlutterFlow deploy): the size of an `ff_user_push_notifications`
//! document, the users it names, and how many documents per minute one `sender` gets sent.
//! Each check runs before the document's audience is read, so a refused document costs no
//! token read and no FCM request.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Settings;
use crate::model::{Audience, Invalid, Notification, Source, pb, string_value};

/// Room for everything but `user_refs`: FCM's 4096-byte message (title, text, image, sound,
/// page, parameters) twice over, plus `sender`, `timestamp` and `scheduled_time`.
const BASE_BYTES: usize = 8 * 1024;
/// Room for the fields the rules cap by characters beside the message: `data`,
/// `notification_title_i18n` and `notification_text_i18n`, 2048 characters each
/// (migrations/firestore.rules), at up to 4 bytes a character in UTF-8.
const OPTION_BYTES: usize = 3 * 2048 * 4;
/// `user_refs` room per allowed recipient: a full reference name
/// (`projects/{p}/databases/(default)/documents/users/{uid}`) and its separator.
const BYTES_PER_RECIPIENT: usize = 128;
/// The rate's period.
const MINUTE: Duration = Duration::from_secs(60);

/// The largest app document accepted, in bytes as [`document_bytes`] counts them.
pub fn max_app_document_bytes(max_recipients: usize) -> usize {
    BASE_BYTES + OPTION_BYTES + BYTES_PER_RECIPIENT * max_recipients
}

/// A document's size: field names and values, strings by their UTF-8 bytes, other scalars as
/// 8 bytes. ffpush's own fields (`ffpush_*`, e.g. a resumed send's progress) are not counted.
pub fn document_bytes(fields: &HashMap<String, pb::Value>) -> usize {
    fields
        .iter()
        .filter(|(name, _)| !name.starts_with("ffpush_"))
        .map(|(name, value)| name.len() + value_bytes(value))
        .sum()
}

fn value_bytes(value: &pb::Value) -> usize {
    use pb::value::ValueType as T;
    match &value.value_type {
        Some(T::StringValue(s)) | Some(T::ReferenceValue(s)) => s.len(),
        Some(T::BytesValue(b)) => b.len(),
        Some(T::ArrayValue(a)) => a.values.iter().map(value_bytes).sum(),
        Some(T::MapValue(m)) => m.fields.iter().map(|(k, v)| k.len() + value_bytes(v)).sum(),
        _ => 8,
    }
}

/// An app document larger than any FlutterFlow writes within the limits is refused unread.
pub fn check_document(
    source: Source,
    settings: &Settings,
    fields: &HashMap<String, pb::Value>,
) -> Result<(), Invalid> {
    if source != Source::App {
        return Ok(());
    }
    let size = document_bytes(fields);
    let max = max_app_document_bytes(settings.max_app_recipients);
    if size > max {
        return Err(Invalid(format!(
            "the document is {size} bytes; notifications from the app may be at most {max} bytes \
             (FCM's 4096-byte message, data and translations, and user_refs for \
             FFPUSH_MAX_APP_RECIPIENTS = {} users); not sent",
            settings.max_app_recipients
        )));
    }
    Ok(())
}

/// An app document may name at most `FFPUSH_MAX_APP_RECIPIENTS` users (each counted once).
pub fn check_audience(
    source: Source,
    settings: &Settings,
    n: &Notification,
) -> Result<(), Invalid> {
    match &n.audience {
        Audience::Users(ids)
            if source == Source::App && ids.len() > settings.max_app_recipients =>
        {
            Err(Invalid(format!(
                "user_refs names {} users; notifications from the app may name at most {} \
                 (FFPUSH_MAX_APP_RECIPIENTS); not sent. Larger audiences are sent from \
                 ff_push_notifications (the FlutterFlow console or a trusted back end)",
                ids.len(),
                settings.max_app_recipients
            )))
        }
        _ => Ok(()),
    }
}

/// `sender` as the rate's key: the reference's path inside the database (`users/abc`), or the
/// string as written; `""` when there is none.
pub fn sender_of(fields: &HashMap<String, pb::Value>) -> String {
    let raw = match fields.get("sender").and_then(|v| v.value_type.as_ref()) {
        Some(pb::value::ValueType::ReferenceValue(r)) => r.as_str(),
        Some(_) => fields.get("sender").and_then(string_value).unwrap_or(""),
        None => "",
    };
    let relative = match raw.find("/documents/") {
        Some(i) if raw.starts_with("projects/") => &raw[i + "/documents/".len()..],
        _ => raw,
    };
    relative.trim().trim_start_matches('/').to_string()
}

/// At most `per_minute` app documents per `sender` in any 60 seconds, counted as documents
/// come due here. In memory, per instance: every instance sees every document come due, so
/// instances count alike, but a restarted one starts from zero. Memory is one entry per
/// document admitted in the last minute; senders with none are dropped once a minute.
pub struct SenderRate {
    per_minute: usize,
    /// Hashes document names: the same document offered again is not counted twice.
    hasher: RandomState,
    state: Mutex<RateState>,
}

struct RateState {
    /// Per sender: when each document admitted in the last minute was, and its name's hash.
    senders: HashMap<String, VecDeque<(Instant, u64)>>,
    pruned: Instant,
}

impl SenderRate {
    pub fn new(per_minute: u32) -> SenderRate {
        SenderRate {
            per_minute: per_minute.max(1) as usize,
            hasher: RandomState::new(),
            state: Mutex::new(RateState {
                senders: HashMap::new(),
                pruned: Instant::now(),
            }),
        }
    }

    /// Whether the app document `name` with these fields may be sent now; the error is the
    /// reason written onto it.
    pub fn check(&self, name: &str, fields: &HashMap<String, pb::Value>) -> Result<(), Invalid> {
        let sender = sender_of(fields);
        if self.admit(&sender, name, Instant::now()) {
            return Ok(());
        }
        Err(Invalid(if sender.is_empty() {
            format!(
                "rate limit: notifications without a sender share one allowance of {} per minute \
                 (FFPUSH_SENDER_RATE), used up; not sent. Set sender to the sending user's \
                 reference, as FlutterFlow's action does",
                self.per_minute
            )
        } else {
            format!(
                "rate limit: {sender} already had {} notifications sent in the last minute \
                 (FFPUSH_SENDER_RATE); not sent. Send fewer, or send in bulk from \
                 ff_push_notifications (the FlutterFlow console or a trusted back end)",
                self.per_minute
            )
        }))
    }

    fn admit(&self, sender: &str, name: &str, now: Instant) -> bool {
        let id = self.hasher.hash_one(name);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(state.pruned) >= MINUTE {
            state.senders.retain(|_, admitted| {
                expire(admitted, now);
                !admitted.is_empty()
            });
            state.pruned = now;
        }
        let admitted = match state.senders.get_mut(sender) {
            Some(admitted) => admitted,
            None => state.senders.entry(sender.to_string()).or_default(),
        };
        expire(admitted, now);
        if admitted.iter().any(|(_, seen)| *seen == id) {
            return true;
        }
        if admitted.len() >= self.per_minute {
            return false;
        }
        admitted.push_back((now, id));
        true
    }

    /// Senders currently remembered.
    #[cfg(test)]
    fn senders(&self) -> usize {
        self.state.lock().map(|s| s.senders.len()).unwrap_or(0)
    }
}

fn expire(admitted: &mut VecDeque<(Instant, u64)>, now: Instant) {
    while admitted
        .front()
        .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= MINUTE)
    {
        admitted.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> pb::Value {
        crate::store::string(v)
    }

    #[test]
    fn the_rate_admits_per_sender_per_minute_and_never_counts_a_document_twice() {
        let rate = SenderRate::new(2);
        let t0 = Instant::now();
        assert!(rate.admit("users/a", "d1", t0));
        assert!(rate.admit("users/a", "d1", t0), "offered again");
        assert!(rate.admit("users/a", "d2", t0));
        assert!(!rate.admit("users/a", "d3", t0));
        assert!(rate.admit("users/b", "d4", t0), "another sender");
        assert!(rate.admit("", "d5", t0));
        assert!(rate.admit("", "d6", t0));
        assert!(!rate.admit("", "d7", t0), "no sender: one shared allowance");
        let later = t0 + Duration::from_secs(61);
        assert!(rate.admit("users/a", "d3", later), "a minute later");
    }

    #[test]
    fn senders_without_recent_documents_are_forgotten() {
        let rate = SenderRate::new(5);
        let t0 = Instant::now();
        for i in 0..1000 {
            assert!(rate.admit(&format!("users/u{i}"), &format!("d{i}"), t0));
        }
        assert_eq!(rate.senders(), 1000);
        rate.admit("users/late", "x", t0 + Duration::from_secs(120));
        assert_eq!(rate.senders(), 1);
    }

    #[test]
    fn sender_keys() {
        let mut f = HashMap::new();
        assert_eq!(sender_of(&f), "");
        f.insert(
            "sender".to_string(),
            crate::store::reference("projects/p/databases/(default)/documents/users/abc".into()),
        );
        assert_eq!(sender_of(&f), "users/abc");
        f.insert("sender".to_string(), s("/users/abc"));
        assert_eq!(sender_of(&f), "users/abc");
        f.insert("sender".to_string(), crate::store::integer(3));
        assert_eq!(sender_of(&f), "");
    }

    #[test]
    fn size_counts_names_and_values_but_not_ffpush_fields() {
        let mut f = HashMap::new();
        f.insert("notification_title".to_string(), s("Hi"));
        f.insert("num_sent".to_string(), crate::store::integer(1));
        assert_eq!(document_bytes(&f), 18 + 2 + 8 + 8);
        f.insert("ffpush_progress".to_string(), s(&"x".repeat(100_000)));
        assert_eq!(document_bytes(&f), 36);
        f.insert(
            "user_refs".to_string(),
            crate::store::array(vec![s("users/a"), s("users/b")]),
        );
        assert_eq!(document_bytes(&f), 36 + 9 + 14);
    }

    /// What the security rules let an app write (migrations/firestore.rules: `data` and each
    /// translation map up to 2048 characters) fits the worker's limit, in non-ASCII text too.
    #[test]
    fn a_document_the_rules_allow_fits_the_size_limit() {
        let map = |prefix: &str| {
            // 16 entries of 2-letter keys and 126 two-byte characters: 2048 characters.
            let fields = (0..16)
                .map(|i| (format!("{prefix}{i:x}"), s(&"é".repeat(126))))
                .collect();
            pb::Value {
                value_type: Some(pb::value::ValueType::MapValue(pb::MapValue { fields })),
            }
        };
        let mut f = HashMap::new();
        f.insert("notification_title".to_string(), s(&"T".repeat(200)));
        f.insert("notification_text".to_string(), s(&"x".repeat(3000)));
        f.insert("data".to_string(), map("k"));
        f.insert("notification_title_i18n".to_string(), map("d"));
        f.insert("notification_text_i18n".to_string(), map("p"));
        let refs = (0..100)
            .map(|i| {
                s(&format!(
                    "projects/p/databases/(default)/documents/users/{i:0>28}"
                ))
            })
            .collect();
        f.insert("user_refs".to_string(), crate::store::array(refs));
        assert!(
            document_bytes(&f) <= max_app_document_bytes(100),
            "{} > {}",
            document_bytes(&f),
            max_app_document_bytes(100)
        );
    }
}
