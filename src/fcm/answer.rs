//! What FCM's answer means (docs/contract.md, "How FCM's answers are handled"; FCM's error
//! codes: <https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode>): a final answer
//! about the token ([`Outcome`]) or an [`Error`], the code it is counted under
//! ([`ErrorCode`]), what the fan-out does about it ([`Action`]), and `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::pool::SendError;
use crate::metrics::OutcomeClass;

/// What one token's send came to, when FCM gave a final answer about the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// UNREGISTERED: the app was uninstalled or the token expired. Delete its documents.
    Dead,
    /// INVALID_ARGUMENT about the token: not a valid registration token. Delete its documents.
    InvalidToken,
    /// SENDER_ID_MISMATCH: the token belongs to another Firebase project. Keep it.
    SenderIdMismatch,
    /// THIRD_PARTY_AUTH_ERROR: APNs or web-push credentials in Firebase are wrong.
    ThirdPartyAuth,
}

impl Outcome {
    /// The `outcome` label this answer is counted under in `ffpush_fcm_messages_total`.
    pub fn class(self) -> OutcomeClass {
        match self {
            Outcome::Sent => OutcomeClass::Sent,
            Outcome::Dead | Outcome::InvalidToken => OutcomeClass::DeadToken,
            Outcome::SenderIdMismatch => OutcomeClass::SenderIdMismatch,
            Outcome::ThirdPartyAuth => OutcomeClass::ThirdPartyAuth,
        }
    }
}

/// FCM's error codes, as a token's final answer is counted in a notification's
/// `error_counts` (<https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode>), plus
/// `TIMEOUT` for a request that got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorCode {
    Unregistered,
    InvalidArgument,
    SenderIdMismatch,
    ThirdPartyAuthError,
    QuotaExceeded,
    Unavailable,
    Internal,
    /// No answer (the request timed out, or its connection dropped mid-request): FCM may have
    /// delivered it.
    Timeout,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::Unregistered,
        ErrorCode::InvalidArgument,
        ErrorCode::SenderIdMismatch,
        ErrorCode::ThirdPartyAuthError,
        ErrorCode::QuotaExceeded,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Timeout,
    ];

    /// The code as FCM spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unregistered => "UNREGISTERED",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::SenderIdMismatch => "SENDER_ID_MISMATCH",
            ErrorCode::ThirdPartyAuthError => "THIRD_PARTY_AUTH_ERROR",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Timeout => "TIMEOUT",
        }
    }

    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// The code of a final answer about the token; `None` for a delivery.
    pub fn of_outcome(outcome: Outcome) -> Option<ErrorCode> {
        match outcome {
            Outcome::Sent => None,
            Outcome::Dead => Some(ErrorCode::Unregistered),
            Outcome::InvalidToken => Some(ErrorCode::InvalidArgument),
            Outcome::SenderIdMismatch => Some(ErrorCode::SenderIdMismatch),
            Outcome::ThirdPartyAuth => Some(ErrorCode::ThirdPartyAuthError),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An answer that is not about the token. [`Error::action`] says what to do about it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// 429/500/502/503/504: back off and try again.
    #[error("FCM is unavailable: {answer}")]
    Retryable {
        answer: Answer,
        retry_after: Option<Duration>,
        /// 429 on the project's quota (not one device's or topic's rate): the whole instance
        /// pauses, at least the quota floor.
        quota: bool,
    },
    /// Timeouts, refused connections, resets: back off and try again.
    #[error("FCM request failed")]
    Transport(#[source] SendError),
    /// 401 for our own OAuth token: refresh once.
    #[error("FCM rejected our access token: {0}")]
    Unauthenticated(Answer),
    /// 400 about the message itself: the notification is at fault. Never retried.
    #[error("FCM rejected the message: {0}")]
    Payload(Rejection),
    /// Anything else that no retry will fix (permissions, wrong project), with the fix.
    #[error("FCM refused the request: {answer}{}", fix_suffix(fix))]
    Refused { answer: Answer, fix: &'static str },
    /// No access token could be obtained.
    #[error("cannot get an FCM access token")]
    Auth(#[source] Arc<AuthError>),
    /// The client could not be built (CA certificate, endpoint URL, TLS).
    #[error("setting up the FCM client: {what}")]
    Setup {
        what: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

/// FCM's error answer: the HTTP status and the `error` object of its body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub http: u16,
    /// The google.rpc status name (`UNAVAILABLE`, `PERMISSION_DENIED`, …), if the body had one.
    pub status: String,
    pub message: String,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() {
            write!(f, "HTTP {} {}", self.http, self.status)
        } else {
            write!(f, "{} {}: {}", self.http, self.status, self.message)
        }
    }
}

/// What FCM found wrong with the message (a 400 not about the token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// A field violation: the field's path and FCM's description.
    Field { field: String, description: String },
    /// No field named: FCM's answer as it is.
    Answer(Answer),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Field { field, description } => write!(f, "{field}: {description}"),
            Rejection::Answer(answer) => answer.fmt(f),
        }
    }
}

/// Why no access token could be had.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the service-account key {}", path.display())]
    Key {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the OAuth2 client")]
    Setup(#[source] std::io::Error),
    #[error("the token request failed")]
    Token(#[source] yup_oauth2::Error),
    #[error("the token endpoint returned no access_token")]
    NoToken,
    #[error("the access token is not a valid header value")]
    BadHeader,
}

impl From<AuthError> for Error {
    fn from(e: AuthError) -> Error {
        Error::Auth(Arc::new(e))
    }
}

/// What the fan-out does about an [`Error`] (docs/contract.md, "Errors").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send to the token again after a backoff of at least `retry_after` (and at least the
    /// quota floor when `quota`). When the retries run out the token is left undelivered, or,
    /// with `fatal_when_exhausted`, the notification fails (no token could be sent anyway).
    Retry {
        retry_after: Option<Duration>,
        quota: bool,
        fatal_when_exhausted: bool,
    },
    /// The message is at fault: the notification fails; every token would get the same answer.
    FailNotification,
    /// Credentials, permissions or project: no token can be sent; the notification fails with
    /// the fix in its `error`.
    Fatal,
}

impl Error {
    /// The `outcome` label this error is counted under in `ffpush_fcm_messages_total`.
    pub fn class(&self) -> OutcomeClass {
        match self {
            Error::Retryable { .. } | Error::Transport(_) => OutcomeClass::Retryable,
            Error::Unauthenticated(_) => OutcomeClass::Unauthenticated,
            Error::Payload(_) => OutcomeClass::Payload,
            Error::Refused { .. } | Error::Setup { .. } => OutcomeClass::Fatal,
            Error::Auth(_) => OutcomeClass::Auth,
        }
    }

    pub fn action(&self) -> Action {
        match self {
            Error::Retryable {
                retry_after, quota, ..
            } => Action::Retry {
                retry_after: *retry_after,
                quota: *quota,
                fatal_when_exhausted: false,
            },
            // The endpoint answers, but in no HTTP ffpush speaks: no retry will change that.
            Error::Transport(SendError::Protocol(_)) => Action::Fatal,
            Error::Transport(_) => Action::Retry {
                retry_after: None,
                quota: false,
                fatal_when_exhausted: false,
            },
            // The token endpoint may be down for a moment; if it stays down nothing can be sent.
            Error::Auth(_) => Action::Retry {
                retry_after: None,
                quota: false,
                fatal_when_exhausted: true,
            },
            Error::Payload(_) => Action::FailNotification,
            // `Sender::send` already refreshed the token once: a second 401 is not transient.
            Error::Unauthenticated(_) | Error::Refused { .. } | Error::Setup { .. } => {
                Action::Fatal
            }
        }
    }

    /// Whether FCM may have delivered the message although no answer says so: the request
    /// left and its answer never came (a timeout, a reset or closed connection). Retrying such
    /// a send may deliver it twice; giving up on it may leave it delivered. Every other error
    /// is an answer (FCM did not deliver) or a request that never left (no connection, refused
    /// unprocessed).
    pub fn fate_unknown(&self) -> bool {
        matches!(
            self,
            Error::Transport(SendError::Timeout | SendError::Failed(_))
        )
    }

    /// The code a token left with this error after its last attempt is counted under: 429
    /// is QUOTA_EXCEEDED, 500 INTERNAL, a request without an answer TIMEOUT (it may have been
    /// delivered), any other transient failure UNAVAILABLE (FCM's code for 502, 503, 504).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Retryable { answer, .. } if answer.http == 429 => ErrorCode::QuotaExceeded,
            Error::Retryable { answer, .. } if answer.http == 500 => ErrorCode::Internal,
            Error::Payload(_) => ErrorCode::InvalidArgument,
            e if e.fate_unknown() => ErrorCode::Timeout,
            _ => ErrorCode::Unavailable,
        }
    }

    pub(super) fn setup(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Setup {
            what: what.into(),
            source: Arc::new(source),
        }
    }
}

fn fix_suffix(fix: &str) -> String {
    if fix.is_empty() {
        String::new()
    } else {
        format!("; {fix}")
    }
}

/// FCM's `Retry-After`, at most `ceiling` (the retry budget). A longer one cannot be honoured
/// by any token (each gives up when its budget runs out), so waiting longer only stalls the
/// instance: a 429's pause would hold every send for as long as the header says (a year, with
/// healthy-looking leases), and a value near `u64::MAX` seconds would overflow the arithmetic
/// on instants. Read as the budget, it makes the token give up at once, counted as
/// undelivered, and a quota pause last no longer than the budget.
pub(super) fn retry_after_ceiling(
    retry_after: Option<Duration>,
    ceiling: Duration,
) -> Option<Duration> {
    let retry_after = retry_after?;
    if retry_after > ceiling {
        tracing::debug!(
            retry_after_secs = retry_after.as_secs(),
            ceiling_secs = ceiling.as_secs(),
            "FCM's Retry-After is longer than the retry budget; read as the budget"
        );
    }
    Some(retry_after.min(ceiling))
}

/// What an FCM answer means (docs/contract.md, "How FCM's answers are handled").
pub fn classify(status: u16, body: &[u8], retry_after: Option<Duration>) -> Result<Outcome, Error> {
    if status == 200 {
        return Ok(Outcome::Sent);
    }
    let body = ErrorBody::parse(body);
    let answer = || Answer {
        http: status,
        status: body.status.clone(),
        message: body.message.clone(),
    };
    match status {
        400 => match body.payload_violation() {
            Some((field, description)) => Err(Error::Payload(Rejection::Field {
                field: field.clone(),
                description: description.clone(),
            })),
            None if body.token_at_fault() => Ok(Outcome::InvalidToken),
            None => Err(Error::Payload(Rejection::Answer(answer()))),
        },
        404 if body.fcm_code == "UNREGISTERED" => Ok(Outcome::Dead),
        403 if body.fcm_code == "SENDER_ID_MISMATCH" => Ok(Outcome::SenderIdMismatch),
        401 if body.fcm_code == "THIRD_PARTY_AUTH_ERROR" => Ok(Outcome::ThirdPartyAuth),
        401 => Err(Error::Unauthenticated(answer())),
        429 => Err(Error::Retryable {
            answer: answer(),
            retry_after,
            quota: project_quota(&body.details),
        }),
        500 | 502 | 503 | 504 => Err(Error::Retryable {
            answer: answer(),
            retry_after,
            quota: false,
        }),
        403 => Err(Error::Refused {
            answer: answer(),
            fix: "grant the service account the Firebase Cloud Messaging API Admin role and enable the FCM API",
        }),
        404 => Err(Error::Refused {
            answer: answer(),
            fix: "check the project id",
        }),
        _ => Err(Error::Refused {
            answer: answer(),
            fix: "",
        }),
    }
}

/// Whether a 429's `QuotaFailure` is about the project's message rate rather than one device's
/// or one topic's ("Device message rate exceeded", "Topic message rate exceeded"). Without
/// the detail, the project's quota is assumed: pausing is the safe side.
fn project_quota(details: &[Value]) -> bool {
    let violations: Vec<String> = detail_entries(details, "QuotaFailure", "violations")
        .map(|v| {
            format!(
                "{} {}",
                v["subject"].as_str().unwrap_or(""),
                v["description"].as_str().unwrap_or("")
            )
            .to_ascii_lowercase()
        })
        .collect();
    violations.is_empty()
        || violations
            .iter()
            .any(|v| !(v.contains("device") || v.contains("topic")))
}

/// What classifying reads of FCM's error body (`{"error": {…}}`, a google.rpc status with
/// FCM's details); empty where the body lacks it (or is no JSON: a proxy's HTML page).
struct ErrorBody {
    message: String,
    /// The google.rpc status name.
    status: String,
    /// The `FcmError` detail's `errorCode`.
    fcm_code: String,
    details: Vec<Value>,
    /// The `BadRequest` details' field violations: the field's path and FCM's description.
    violations: Vec<(String, String)>,
}

impl ErrorBody {
    fn parse(body: &[u8]) -> ErrorBody {
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let error = &parsed["error"];
        let text = |v: &Value| v.as_str().unwrap_or("").to_string();
        let details = error["details"].as_array().cloned().unwrap_or_default();
        let fcm_code = details
            .iter()
            .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("FcmError")))
            .map(|d| text(&d["errorCode"]))
            .unwrap_or_default();
        let violations = detail_entries(&details, "BadRequest", "fieldViolations")
            .map(|v| (text(&v["field"]), text(&v["description"])))
            .collect();
        ErrorBody {
            message: text(&error["message"]),
            status: text(&error["status"]),
            fcm_code,
            details,
            violations,
        }
    }

    /// A 400's first field violation not about the token: the message is at fault.
    fn payload_violation(&self) -> Option<&(String, String)> {
        self.violations.iter().find(|(f, _)| f != "message.token")
    }

    /// Whether a 400 without a payload violation is about the token. FCM says "not a valid
    /// FCM registration token" with no field violation: its message is the only sign that
    /// the token, not the payload, is at fault.
    fn token_at_fault(&self) -> bool {
        self.violations.iter().any(|(f, _)| f == "message.token")
            || self
                .message
                .to_ascii_lowercase()
                .contains("registration token")
    }
}

/// The entries of the `list` of every detail whose `@type` ends in `kind`
/// (`BadRequest`'s `fieldViolations`, `QuotaFailure`'s `violations`).
fn detail_entries<'a>(
    details: &'a [Value],
    kind: &'a str,
    list: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    details
        .iter()
        .filter(move |d| d["@type"].as_str().is_some_and(|t| t.ends_with(kind)))
        .flat_map(move |d| d[list].as_array().into_iter().flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_projects_quota_pauses_the_instance() {
        let quota = |violation: Value| {
            let body = json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "QUOTA_EXCEEDED"},
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]},
            ]}});
            match classify(429, body.to_string().as_bytes(), None) {
                Err(Error::Retryable { quota, .. }) => quota,
                other => panic!("{other:?}"),
            }
        };
        assert!(quota(
            json!({"subject": "project", "description": "Message rate exceeded"})
        ));
        assert!(!quota(
            json!({"subject": "device", "description": "Device message rate exceeded"})
        ));
        assert!(!quota(
            json!({"description": "Topic message rate exceeded"})
        ));
        assert!(
            matches!(
                classify(429, b"", None),
                Err(Error::Retryable { quota: true, .. })
            ),
            "no detail: assume the project's quota"
        );
    }

    #[test]
    fn a_token_given_up_is_counted_under_fcms_code_or_timeout() {
        let code = |status| classify(status, b"", None).unwrap_err().code();
        assert_eq!(code(429), ErrorCode::QuotaExceeded);
        assert_eq!(code(500), ErrorCode::Internal);
        for status in [502, 503, 504] {
            assert_eq!(code(status), ErrorCode::Unavailable, "{status}");
        }
        assert_eq!(
            Error::Transport(SendError::Timeout).code(),
            ErrorCode::Timeout
        );
        assert_eq!(
            Error::Transport(SendError::Connect("refused".into())).code(),
            ErrorCode::Unavailable
        );
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(
            ErrorCode::of_outcome(Outcome::InvalidToken),
            Some(ErrorCode::InvalidArgument)
        );
    }

    #[test]
    fn only_a_request_left_unanswered_has_an_unknown_fate() {
        assert!(Error::Transport(SendError::Timeout).fate_unknown());
        assert!(Error::Transport(SendError::Failed("reset".into())).fate_unknown());
        assert!(!Error::Transport(SendError::Refused("REFUSED_STREAM".into())).fate_unknown());
        assert!(!Error::Transport(SendError::Connect("refused".into())).fate_unknown());
        assert!(!classify(503, b"", None).unwrap_err().fate_unknown());
    }

    #[test]
    fn retry_after_is_read_as_at_most_the_retry_budget() {
        let budget = Duration::from_secs(600);
        let year = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(retry_after_ceiling(None, budget), None);
        assert_eq!(
            retry_after_ceiling(Some(Duration::from_secs(60)), budget),
            Some(Duration::from_secs(60))
        );
        assert_eq!(retry_after_ceiling(Some(year), budget), Some(budget));
        assert_eq!(
            retry_after_ceiling(Some(Duration::from_secs(u64::MAX)), budget),
            Some(budget)
        );
    }

    fn fixture(name: &str) -> (u16, Vec<u8>, Option<Duration>) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/fcm_errors.json"
        );
        let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let f = &all[name];
        let retry = f["headers"]["Retry-After"]
            .as_str()
            .map(|s| Duration::from_secs(s.parse().unwrap()));
        (
            f["http_status"].as_u64().unwrap() as u16,
            serde_json::to_vec(&f["body"]).unwrap(),
            retry,
        )
    }

    fn classify_fixture(name: &str) -> Result<Outcome, Error> {
        let (status, body, retry) = fixture(name);
        classify(status, &body, retry)
    }

    #[test]
    fn every_fixture_is_classified_as_the_design_says() {
        assert_eq!(classify_fixture("success").ok(), Some(Outcome::Sent));
        assert_eq!(classify_fixture("UNREGISTERED").ok(), Some(Outcome::Dead));
        assert_eq!(
            classify_fixture("INVALID_ARGUMENT_bad_token").ok(),
            Some(Outcome::InvalidToken)
        );
        assert_eq!(
            classify_fixture("SENDER_ID_MISMATCH").ok(),
            Some(Outcome::SenderIdMismatch)
        );
        assert_eq!(
            classify_fixture("THIRD_PARTY_AUTH_ERROR").ok(),
            Some(Outcome::ThirdPartyAuth)
        );
        match classify_fixture("INVALID_ARGUMENT_bad_value") {
            Err(e @ Error::Payload(Rejection::Field { .. })) => {
                assert_eq!(e.action(), Action::FailNotification);
                assert_eq!(
                    e.to_string(),
                    "FCM rejected the message: message.data[0].value: Invalid value at 'message.data[0].value' (TYPE_STRING), 12"
                );
            }
            other => panic!("{other:?}"),
        }
        let action = |name| classify_fixture(name).map_err(|e| e.action()).err();
        assert_eq!(
            action("QUOTA_EXCEEDED"),
            Some(Action::Retry {
                retry_after: Some(Duration::from_secs(60)),
                quota: true,
                fatal_when_exhausted: false
            })
        );
        assert_eq!(
            action("UNAVAILABLE"),
            Some(Action::Retry {
                retry_after: Some(Duration::from_secs(5)),
                quota: false,
                fatal_when_exhausted: false
            })
        );
        match classify_fixture("UNAVAILABLE") {
            Err(Error::Retryable { answer, .. }) => {
                assert_eq!(answer.http, 503);
                assert_eq!(answer.status, "UNAVAILABLE");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify_fixture("INTERNAL"),
            Err(Error::Retryable { .. })
        ));
        assert!(matches!(
            classify_fixture("UNAUTHENTICATED_bad_oauth_token"),
            Err(Error::Unauthenticated(_))
        ));
        assert_eq!(
            action("UNAUTHENTICATED_bad_oauth_token"),
            Some(Action::Fatal)
        );
        match classify(403, b"{}", None) {
            Err(e @ Error::Refused { .. }) => {
                assert_eq!(e.action(), Action::Fatal);
                assert!(e.to_string().ends_with("enable the FCM API"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(502, b"<html>", None),
            Err(Error::Retryable { .. })
        ));
    }
}
