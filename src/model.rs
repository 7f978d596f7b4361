//! The FlutterFlow documents as types. A notification document becomes a validated
//! [`Notification`] here, or a one-line [`Invalid`] reason that goes onto the document;
//! nothing downstream re-checks strings.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use firestore::gcloud_sdk::google::firestore::v1::{Document, Value, value};

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
    /// "cancelled": the sender withdrew it before it started.
    Cancelled,
    /// Any other value, written by someone else: never processed (FlutterFlow skips it too).
    Other(String),
}

impl Status {
    pub fn of(doc: &Document) -> Status {
        Status::parse(
            doc.fields
                .get("status")
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
}

/// Why a document cannot be sent, in words for the `error` field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

impl Notification {
    pub fn parse(source: Source, fields: &HashMap<String, Value>) -> Result<Self, Invalid> {
        let title = required_text(fields, "notification_title")?;
        let body = required_text(fields, "notification_text")?;
        let image = optional_text(fields, "notification_image_url")?;
        let sound = optional_text(fields, "notification_sound")?;
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
        let audience = if !users.is_empty() {
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
        Ok(Notification {
            title,
            body,
            image,
            sound,
            initial_page,
            parameter_data,
            audience,
            scheduled_time,
        })
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
        ] {
            assert_eq!(Status::parse(status.as_str()), status);
        }
    }
}
