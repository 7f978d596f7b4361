//! The outcome written back onto a notification document: FlutterFlow's `status`, `num_sent`
//! and `error`, plus ffpush's counts, warnings and users without tokens (listed on console
//! documents, only counted on app documents) — deciding what counts
//! as succeeded and phrasing each problem as something a person can act on.

use std::collections::HashMap;
use std::fmt;

use chrono::Utc;

use crate::audience;

use crate::fanout::{Abort, ErrorCounts, Tally, Validated};
use crate::fields;
use crate::model::{Audience, Notification, Slice, Status, pb};
use crate::store;

/// The outcome fields written back.
pub struct Report {
    status: Status,
    error: Option<Failure>,
    /// Said beside a success (or a dry run), in this order.
    warnings: Vec<Problem>,
    tally: Tally,
    without: audience::UsersWithoutTokens,
}

/// Why a notification failed; phrased only when written.
enum Failure {
    /// No token to send to.
    NoTokens(NoTokens),
    /// Sent to `sent` of `tokens`, with these problems.
    Partial {
        sent: u64,
        tokens: u64,
        problems: Vec<Problem>,
    },
    /// A dry run: FCM refused every token the message was tried on, by code.
    NotValidated(ErrorCounts),
    /// Stopped by an error (its chain of causes, as phrased).
    Aborted(String),
}

/// What a notification that found no token was addressed to.
enum NoTokens {
    /// Users, none of whom has a token; `listed` names them (console documents only).
    Users { count: usize, listed: Vec<String> },
    /// A topic or condition: always one request, so never without one.
    Request,
    /// A broadcast, or a batch of one, to `device_type` (none: everyone).
    Broadcast {
        device_type: Option<String>,
        slice: Option<Slice>,
    },
}

/// Some tokens' (or users') trouble, counted; phrased only when written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Problem {
    /// Dead tokens, removed: routine, said only beside a failure.
    Dead(u64),
    SenderIdMismatch(u64),
    ThirdPartyAuth(u64),
    Undelivered(u64),
    TimedOut(u64),
    /// Dead tokens kept for want of an index: the operator's to fix, said whatever the status.
    DeadKept(u64),
    /// Users without a device token: said beside a success.
    WithoutTokens(u64),
}

impl Problem {
    /// The tokens' problems in `t`, in the order they are said (those that are counted).
    fn of(t: &Tally) -> Vec<Problem> {
        [
            Problem::Dead(t.dead),
            Problem::SenderIdMismatch(t.sender_id_mismatch),
            Problem::ThirdPartyAuth(t.third_party_auth),
            Problem::Undelivered(t.undelivered),
            Problem::TimedOut(t.timed_out),
        ]
        .into_iter()
        .filter(|p| p.count() > 0)
        .collect()
    }

    fn count(&self) -> u64 {
        match *self {
            Problem::Dead(n)
            | Problem::SenderIdMismatch(n)
            | Problem::ThirdPartyAuth(n)
            | Problem::Undelivered(n)
            | Problem::TimedOut(n)
            | Problem::DeadKept(n)
            | Problem::WithoutTokens(n) => n,
        }
    }

    /// Routine: not a warning beside a success.
    fn is_routine(&self) -> bool {
        matches!(self, Problem::Dead(_))
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Dead(n) => write!(f, "{n} dead (removed)"),
            Problem::SenderIdMismatch(n) => {
                write!(f, "{n} from another Firebase project (SENDER_ID_MISMATCH)")
            }
            Problem::ThirdPartyAuth(n) => write!(
                f,
                "{n} refused by APNs/web push (THIRD_PARTY_AUTH_ERROR: upload a valid APNs key in Firebase console → Project settings → Cloud Messaging)"
            ),
            Problem::Undelivered(n) => write!(
                f,
                "{n} undelivered: FCM stayed unavailable through every retry"
            ),
            // Unlike an error answer, no answer says nothing of whether FCM delivered it.
            Problem::TimedOut(n) => write!(
                f,
                "{n} timed out; they may have been delivered (FCM did not answer, through every retry)"
            ),
            Problem::DeadKept(n) => write!(
                f,
                "{n} dead token(s) kept: finding their documents needs a Firestore index that is missing (`ffpush doctor` gives the link that creates it)"
            ),
            Problem::WithoutTokens(n) => write!(f, "{n} user(s) have no device token"),
        }
    }
}

/// `problems` as one text, `; ` between them.
fn joined(problems: &[Problem]) -> String {
    let texts: Vec<String> = problems.iter().map(Problem::to_string).collect();
    texts.join("; ")
}

impl NoTokens {
    fn of(audience: &Audience, without: &audience::UsersWithoutTokens) -> NoTokens {
        match audience {
            Audience::Users(ids) => NoTokens::Users {
                count: ids.len(),
                listed: without.listed.clone(),
            },
            Audience::Topic(_) | Audience::Condition(_) => NoTokens::Request,
            Audience::Broadcast { device_type, slice } => NoTokens::Broadcast {
                device_type: device_type.clone(),
                slice: *slice,
            },
        }
    }
}

impl fmt::Display for NoTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoTokens::Users { count, listed } if listed.is_empty() => write!(
                f,
                "no device tokens: none of the {count} user(s) has an fcm_tokens document; they must sign in on a device and allow notifications"
            ),
            NoTokens::Users { count, listed } => write!(
                f,
                "no device tokens: none of the {count} user(s) has an fcm_tokens document ({}); they must sign in on a device and allow notifications",
                listed.join(", ")
            ),
            NoTokens::Request => f.write_str("no request was made to the topic or condition"),
            NoTokens::Broadcast { device_type, slice } => {
                let batch = slice
                    .map(|s| format!(" in batch {} of {}", s.index, s.count))
                    .unwrap_or_default();
                match device_type {
                    None => write!(
                        f,
                        "no device tokens{batch} (target_audience \"All\"): no user has an fcm_tokens document yet"
                    ),
                    Some(d) => write!(
                        f,
                        "no device tokens match{batch}: target_audience {d:?} reaches only tokens whose device_type is exactly {d:?} (FlutterFlow's values are All, iOS and Android)"
                    ),
                }
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoTokens(none) => none.fmt(f),
            Failure::Partial {
                sent,
                tokens,
                problems,
            } => write!(f, "sent to {sent} of {tokens} tokens; {}", joined(problems)),
            Failure::NotValidated(refused) => {
                let codes: Vec<String> = refused
                    .iter()
                    .map(|(code, n)| format!("{n} {code}"))
                    .collect();
                write!(
                    f,
                    "dry run: the message could not be validated: FCM refused every token it was tried on ({}); see error_counts",
                    codes.join(", ")
                )
            }
            Failure::Aborted(error) => f.write_str(error),
        }
    }
}

impl Report {
    pub fn finished(n: &Notification, t: &Tally, without: &audience::UsersWithoutTokens) -> Report {
        let mut problems = Problem::of(t);
        // Not a delivery problem, but the operator's to fix: said whatever the status.
        let kept = (t.dead_kept > 0).then_some(Problem::DeadKept(t.dead_kept));
        let (status, error, warnings) = if t.tokens == 0 {
            let none = NoTokens::of(&n.audience, without);
            (Status::Failed, Some(Failure::NoTokens(none)), Vec::new())
        } else if t.sent == 0 || t.undelivered > 0 || t.timed_out > 0 {
            problems.extend(kept);
            let partial = Failure::Partial {
                sent: t.sent,
                tokens: t.tokens,
                problems,
            };
            (Status::Failed, Some(partial), Vec::new())
        } else {
            let mut warnings: Vec<Problem> =
                problems.into_iter().filter(|p| !p.is_routine()).collect();
            warnings.extend(without_tokens(without));
            warnings.extend(kept);
            (Status::Succeeded, None, warnings)
        };
        Report {
            status,
            error,
            warnings,
            tally: *t,
            without: without.clone(),
        }
    }

    /// A dry run's outcome: `validated` with the devices a real send would reach (nothing
    /// sent), or `failed` as a send would fail for want of tokens, or because FCM refused every
    /// token the message was tried on.
    pub fn validated(
        n: &Notification,
        v: &Validated,
        without: &audience::UsersWithoutTokens,
    ) -> Report {
        if v.tokens == 0 {
            return Report::finished(n, &Tally::default(), without);
        }
        let tally = Tally {
            tokens: v.tokens,
            errors: v.refused,
            ..Default::default()
        };
        let (status, error, warnings) = if v.accepted {
            (Status::Validated, None, without_tokens(without).collect())
        } else {
            let error = Failure::NotValidated(v.refused);
            (Status::Failed, Some(error), Vec::new())
        };
        Report {
            status,
            error,
            warnings,
            tally,
            without: without.clone(),
        }
    }

    /// Cancelled while it was sent: the counts so far; the status stays `cancelled`.
    pub fn cancelled(t: &Tally) -> Report {
        Report {
            status: Status::Cancelled,
            error: None,
            warnings: Vec::new(),
            tally: *t,
            without: Default::default(),
        }
    }

    pub fn aborted(e: &Abort, t: &Tally) -> Report {
        Report {
            status: Status::Failed,
            error: Some(Failure::Aborted(crate::errors::Chain(e).to_string())),
            warnings: Vec::new(),
            tally: *t,
            without: Default::default(),
        }
    }

    /// What [`Report::into_fields`] writes as `status`.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The fields this outcome writes: FlutterFlow's and ffpush's, those without a value
    /// removed.
    pub fn into_fields(self) -> Fields {
        let t = self.tally;
        // A dry run sends nothing, and fails nothing.
        let failed = if self.status == Status::Validated {
            0
        } else {
            t.failed()
        };
        let mut f = Fields::outcome(self.status)
            .count(fields::NUM_SENT, t.sent)
            .count(fields::NUM_TOKENS, t.tokens)
            .count(fields::NUM_FAILED, failed)
            .count(fields::NUM_TOKENS_REMOVED, t.removed)
            .text(fields::ERROR, self.error.map(|e| e.to_string()).as_deref())
            .text(
                fields::WARNING,
                (!self.warnings.is_empty())
                    .then(|| joined(&self.warnings))
                    .as_deref(),
            );
        if !t.errors.is_empty() {
            f = f.value(fields::ERROR_COUNTS, error_counts_value(&t.errors));
        }
        if self.without.count > 0 {
            f = f.count(fields::NUM_USERS_WITHOUT_TOKENS, self.without.count);
        }
        // Empty for app documents: their senders get the count, never whose devices are missing.
        if !self.without.listed.is_empty() {
            let listed = self.without.listed.iter().map(|u| store::string(u));
            f = f.value(fields::USERS_WITHOUT_TOKENS, store::array(listed.collect()));
        }
        f
    }
}

/// The fields of a write that finishes a document, and those it removes: built here for a
/// report and for the failure of a document never claimed alike, and written by
/// [`crate::claim::Claim::complete`] or [`crate::claim::complete_unclaimed`].
#[derive(Debug)]
pub struct Fields {
    pub set: HashMap<String, pb::Value>,
    pub remove: Vec<&'static str>,
}

impl Fields {
    /// `status` and `completed_at` (the claim's own fields go when [`crate::claim`] writes it).
    pub fn outcome(status: Status) -> Fields {
        let mut set = HashMap::new();
        set.insert(fields::STATUS.to_string(), store::string(status.as_str()));
        set.insert(
            fields::COMPLETED_AT.to_string(),
            store::timestamp(Utc::now()),
        );
        Fields {
            set,
            remove: Vec::new(),
        }
    }

    /// `key` set to the count `n`.
    pub fn count(self, key: &str, n: u64) -> Fields {
        self.value(key, store::integer(n as i64))
    }

    /// `key` set to `text`, or removed when there is none (so no earlier write's stays).
    pub fn text(mut self, key: &'static str, text: Option<&str>) -> Fields {
        match text {
            Some(text) => return self.value(key, store::string(text)),
            None => self.remove.push(key),
        }
        self
    }

    fn value(mut self, key: &str, value: pb::Value) -> Fields {
        self.set.insert(key.to_string(), value);
        self
    }
}

/// The warning for users without a device token, if any.
fn without_tokens(without: &audience::UsersWithoutTokens) -> impl Iterator<Item = Problem> {
    (without.count > 0)
        .then_some(Problem::WithoutTokens(without.count))
        .into_iter()
}

/// The `error_counts` map: each of FCM's error codes some token got, with how many did.
pub(crate) fn error_counts_value(counts: &ErrorCounts) -> pb::Value {
    pb::Value {
        value_type: Some(pb::value::ValueType::MapValue(pb::MapValue {
            fields: counts
                .iter()
                .map(|(code, n)| (code.as_str().to_string(), store::integer(n as i64)))
                .collect(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(audience: Audience) -> Notification {
        Notification {
            title: "t".into(),
            body: "b".into(),
            image: None,
            sound: None,
            initial_page: None,
            parameter_data: None,
            audience,
            scheduled_time: None,
            options: Default::default(),
        }
    }

    fn decide(t: Tally, without: u64) -> (Status, HashMap<String, pb::Value>) {
        let n = notification(Audience::Users(vec!["a".into(), "b".into()]));
        let w = audience::UsersWithoutTokens {
            count: without,
            listed: (0..without).map(|i| format!("users/x{i}")).collect(),
        };
        written(Report::finished(&n, &t, &w))
    }

    fn written(report: Report) -> (Status, HashMap<String, pb::Value>) {
        (report.status().clone(), report.into_fields().set)
    }

    fn text(f: &HashMap<String, pb::Value>, k: &str) -> String {
        f.get(k)
            .and_then(crate::model::string_value)
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn reaching_nobody_is_a_failure_with_the_reason() {
        let (status, f) = decide(Tally::default(), 2);
        assert_eq!(status, Status::Failed);
        assert!(text(&f, "error").contains("users/x0, users/x1"));
        let dead = Tally {
            tokens: 2,
            dead: 2,
            removed: 2,
            ..Default::default()
        };
        let (status, f) = decide(dead, 0);
        assert_eq!(status, Status::Failed);
        assert!(
            text(&f, "error").contains("2 dead (removed)"),
            "{}",
            text(&f, "error")
        );
    }

    #[test]
    fn without_a_list_only_the_count_is_written() {
        let n = notification(Audience::Users(vec!["a".into(), "b".into()]));
        let w = audience::UsersWithoutTokens {
            count: 2,
            listed: Vec::new(),
        };
        let (status, f) = written(Report::finished(&n, &Tally::default(), &w));
        assert_eq!(status, Status::Failed);
        assert_eq!(
            text(&f, "error"),
            "no device tokens: none of the 2 user(s) has an fcm_tokens document; they must sign in on a device and allow notifications"
        );
        assert_eq!(f.get("num_users_without_tokens"), Some(&store::integer(2)));
        assert!(!f.contains_key("users_without_tokens"));
    }

    #[test]
    fn token_problems_beside_sends_are_warnings() {
        let t = Tally {
            tokens: 3,
            sent: 1,
            sender_id_mismatch: 1,
            dead: 1,
            removed: 1,
            ..Default::default()
        };
        let (status, f) = decide(t, 1);
        assert_eq!(status, Status::Succeeded);
        assert!(!f.contains_key("error"));
        let warning = text(&f, "warning");
        assert!(
            warning.contains("SENDER_ID_MISMATCH")
                && warning.contains("1 user(s) have no device token"),
            "{warning}"
        );
        assert!(
            !warning.contains("dead"),
            "dead tokens are routine, not a warning"
        );
        assert_eq!(f.get("num_failed"), Some(&store::integer(2)));
    }

    #[test]
    fn dead_tokens_kept_for_a_missing_index_are_said_whatever_the_status() {
        let t = Tally {
            tokens: 3,
            sent: 2,
            dead: 1,
            dead_kept: 1,
            ..Default::default()
        };
        let (status, f) = decide(t, 0);
        assert_eq!(status, Status::Succeeded);
        let warning = text(&f, "warning");
        assert!(
            warning.contains("1 dead token(s) kept") && warning.contains("ffpush doctor"),
            "{warning}"
        );
        let t = Tally {
            tokens: 3,
            sent: 1,
            dead: 1,
            dead_kept: 1,
            undelivered: 1,
            ..Default::default()
        };
        let (status, f) = decide(t, 0);
        assert_eq!(status, Status::Failed);
        let error = text(&f, "error");
        assert!(
            error.contains("1 undelivered") && error.contains("1 dead token(s) kept"),
            "{error}"
        );
    }

    #[test]
    fn a_broadcast_that_matched_nothing_quotes_the_audience_exactly() {
        let none = audience::UsersWithoutTokens::default();
        let error = |device_type: Option<&str>| {
            let n = notification(Audience::Broadcast {
                device_type: device_type.map(String::from),
                slice: Some(crate::model::Slice { index: 2, count: 5 }),
            });
            let (status, f) = written(Report::finished(&n, &Tally::default(), &none));
            assert_eq!(status, Status::Failed);
            text(&f, "error")
        };
        let lower = error(Some("all"));
        assert!(
            lower.contains("target_audience \"all\"") && lower.contains("batch 2 of 5"),
            "{lower}"
        );
        let all = error(None);
        assert!(all.contains("\"All\""), "{all}");
    }

    #[test]
    fn a_missing_index_fails_the_notification_with_firestores_link() {
        let link = "https://console.firebase.google.com/v1/r/project/p/firestore/indexes?create_exemption=Cg";
        let missing = store::Error::from(
            firestore::gcloud_sdk::tonic::Status::failed_precondition(format!(
                "The query requires a COLLECTION_GROUP_ASC index for collection fcm_tokens and field device_type. You can create it here: {link}"
            )),
        );
        let (status, f) = written(Report::aborted(&Abort::Store(missing), &Tally::default()));
        assert_eq!(status, Status::Failed);
        let error = text(&f, "error");
        assert!(
            error.contains("field device_type") && error.contains(link),
            "{error}"
        );
        assert!(!error.contains("changed underneath"), "{error}");
    }

    #[test]
    fn tokens_left_undelivered_fail_the_notification() {
        let t = Tally {
            tokens: 3,
            sent: 2,
            undelivered: 1,
            ..Default::default()
        };
        let (status, f) = decide(t, 0);
        assert_eq!(status, Status::Failed);
        assert!(text(&f, "error").starts_with("sent to 2 of 3 tokens"));
    }

    #[test]
    fn timed_out_tokens_are_said_to_be_maybe_delivered_and_every_code_is_counted() {
        let mut errors = crate::fanout::ErrorCounts::default();
        errors.add(crate::fcm::ErrorCode::Timeout, 2);
        errors.add(crate::fcm::ErrorCode::Unregistered, 1);
        let t = Tally {
            tokens: 5,
            sent: 2,
            dead: 1,
            removed: 1,
            timed_out: 2,
            errors,
            ..Default::default()
        };
        let (status, f) = decide(t, 0);
        assert_eq!(status, Status::Failed);
        let error = text(&f, "error");
        assert!(
            error.contains("2 timed out; they may have been delivered")
                && !error.contains("unavailable"),
            "{error}"
        );
        let Some(pb::value::ValueType::MapValue(m)) =
            f.get("error_counts").and_then(|v| v.value_type.as_ref())
        else {
            panic!("no error_counts: {f:?}")
        };
        assert_eq!(m.fields.len(), 2);
        assert_eq!(m.fields.get("TIMEOUT"), Some(&store::integer(2)));
        assert_eq!(m.fields.get("UNREGISTERED"), Some(&store::integer(1)));
        let (_, clean) = decide(
            Tally {
                tokens: 1,
                sent: 1,
                ..Default::default()
            },
            0,
        );
        assert!(!clean.contains_key("error_counts"));
    }
}
