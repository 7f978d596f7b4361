//! Per-token scripted answers: what FCM says to a send for a given registration token.
//!
//! Bodies and statuses are those of `fixtures/fcm_errors.json`, so code tested against the
//! emulator sees exactly what FCM sends.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Shared, redact};

/// What the emulator answers to sends for one registration token.
#[derive(Clone, Debug)]
pub enum Script {
    /// 404 UNREGISTERED: the token is dead.
    Unregistered,
    /// 400 INVALID_ARGUMENT with an FcmError: the token is not a valid registration token.
    InvalidToken,
    /// 403 SENDER_ID_MISMATCH.
    SenderIdMismatch,
    /// 429 QUOTA_EXCEEDED with `Retry-After: retry_after_secs`, `times` times, then success.
    QuotaExceeded { retry_after_secs: u64, times: u32 },
    /// 503 UNAVAILABLE `times` times (with `Retry-After` only if given), then success.
    Unavailable {
        times: u32,
        retry_after_secs: Option<u64>,
    },
    /// 500 INTERNAL `times` times, then success.
    Internal { times: u32 },
    /// 401 THIRD_PARTY_AUTH_ERROR: APNs or web-push credentials are wrong.
    ThirdPartyAuthError,
    /// Success, answered after this delay (the send is recorded when it arrives).
    Latency(Duration),
    /// Never answered, as by a silently stuck backend: the send is held until the token's
    /// script is cleared or replaced (then it is answered as scripted then) or the client gives
    /// up on it (resets the stream, closes the connection). Other sends on the same
    /// connection are answered as usual.
    Hang,
    /// Like [`Script::Hang`], and the HTTP/2 connection that carried the first send goes silent
    /// with it: nothing more is read or written on it (no answers to its other sends, no
    /// `PING` acknowledgements), as a connection that died without a word (a NAT or a load
    /// balancer dropping it). It speaks again when the token's script is cleared or replaced.
    /// Later sends to the token are held as by [`Script::Hang`] (the script becomes that),
    /// so one connection dies, not every one a retry lands on. Over HTTP/1.1 (one send per
    /// connection) it is [`Script::Hang`].
    HangConnection,
    /// Refused unprocessed, `times` times, then success: over HTTP/2 the stream is reset with
    /// `RST_STREAM(REFUSED_STREAM)` (FCM never saw the request); over HTTP/1.1 the
    /// connection is closed unanswered.
    RefusedStream { times: u32 },
}

/// An error answer as FCM writes it.
#[derive(Debug, PartialEq)]
pub(super) struct Failure {
    pub status: StatusCode,
    pub retry_after_secs: Option<u64>,
    pub body: Value,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// What a script decides for one request.
#[derive(Debug, PartialEq)]
pub(super) enum Scripted {
    Fail(Failure),
    Delay(Duration),
    /// Held unanswered; `connection`: its connection goes silent too.
    Hang {
        connection: bool,
    },
    /// Reset with `REFUSED_STREAM`, unprocessed.
    Refuse,
}

/// Consumes one answer from the script in `slot`, clearing it once a counting script is used up.
pub(super) fn take(slot: &mut Option<Script>) -> Option<Scripted> {
    let script = slot.as_mut()?;
    let (scripted, times) = match script {
        Script::Unregistered => return Some(Scripted::Fail(fcm_error("UNREGISTERED", None))),
        Script::InvalidToken => return Some(Scripted::Fail(invalid_token())),
        Script::SenderIdMismatch => {
            return Some(Scripted::Fail(fcm_error("SENDER_ID_MISMATCH", None)));
        }
        Script::ThirdPartyAuthError => {
            return Some(Scripted::Fail(fcm_error("THIRD_PARTY_AUTH_ERROR", None)));
        }
        Script::Latency(delay) => return Some(Scripted::Delay(*delay)),
        Script::Hang => return Some(Scripted::Hang { connection: false }),
        Script::HangConnection => {
            *slot = Some(Script::Hang);
            return Some(Scripted::Hang { connection: true });
        }
        Script::QuotaExceeded {
            retry_after_secs,
            times,
        } => (
            Scripted::Fail(fcm_error("QUOTA_EXCEEDED", Some(*retry_after_secs))),
            times,
        ),
        Script::Unavailable {
            times,
            retry_after_secs,
        } => (
            Scripted::Fail(fcm_error("UNAVAILABLE", *retry_after_secs)),
            times,
        ),
        Script::Internal { times } => (Scripted::Fail(fcm_error("INTERNAL", None)), times),
        Script::RefusedStream { times } => (Scripted::Refuse, times),
    };
    if *times == 0 {
        *slot = None;
        return None;
    }
    *times -= 1;
    if *times == 0 {
        *slot = None;
    }
    Some(scripted)
}

/// Whether the script holds sends unanswered.
pub(super) fn hangs(script: Option<&Script>) -> bool {
    matches!(script, Some(Script::Hang | Script::HangConnection))
}

/// The fixture answer for an FCM error code.
pub(super) fn fcm_error(code: &str, retry_after_secs: Option<u64>) -> Failure {
    let (status, message, grpc_status) = match code {
        "UNREGISTERED" => (404, "Requested entity was not found.", "NOT_FOUND"),
        "SENDER_ID_MISMATCH" => (403, "SenderId mismatch", "PERMISSION_DENIED"),
        "QUOTA_EXCEEDED" => (
            429,
            "Quota exceeded for quota metric 'Send requests'.",
            "RESOURCE_EXHAUSTED",
        ),
        "UNAVAILABLE" => (503, "The service is currently unavailable.", "UNAVAILABLE"),
        "THIRD_PARTY_AUTH_ERROR" => (
            401,
            "Auth error from APNS or Web Push Service",
            "UNAUTHENTICATED",
        ),
        _ => (500, "Internal error encountered.", "INTERNAL"),
    };
    let mut details = vec![json!({
        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
        "errorCode": code,
    })];
    if code == "QUOTA_EXCEEDED" {
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"subject": "project", "description": "Message rate exceeded"}],
        }));
    }
    Failure {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        retry_after_secs,
        body: json!({"error": {
            "code": status,
            "message": message,
            "status": grpc_status,
            "details": details,
        }}),
    }
}

fn invalid_token() -> Failure {
    Failure {
        status: StatusCode::BAD_REQUEST,
        retry_after_secs: None,
        body: json!({"error": {
            "code": 400,
            "message": "The registration token is not a valid FCM registration token",
            "status": "INVALID_ARGUMENT",
            "details": [{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": "INVALID_ARGUMENT",
            }],
        }}),
    }
}

const ANSWERS: &str = "UNREGISTERED, INVALID_TOKEN, SENDER_ID_MISMATCH, QUOTA_EXCEEDED, \
                       UNAVAILABLE, INTERNAL, THIRD_PARTY_AUTH_ERROR, LATENCY, HANG, \
                       HANG_CONNECTION, REFUSED_STREAM";

/// Body of `POST /emulator/tokens/{token}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptRequest {
    answer: String,
    times: Option<u32>,
    retry_after_secs: Option<u64>,
    millis: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
enum ScriptRequestError {
    #[error("unknown answer {0:?}; valid answers: {ANSWERS}")]
    UnknownAnswer(String),
    #[error("LATENCY needs \"millis\"")]
    MissingMillis,
}

impl ScriptRequest {
    /// Counting answers fail once unless told otherwise; quota answers default to FCM's
    /// documented minimum back-off of 60 s.
    fn into_script(self) -> Result<Script, ScriptRequestError> {
        let times = self.times.unwrap_or(1);
        Ok(match self.answer.as_str() {
            "UNREGISTERED" => Script::Unregistered,
            "INVALID_TOKEN" => Script::InvalidToken,
            "SENDER_ID_MISMATCH" => Script::SenderIdMismatch,
            "THIRD_PARTY_AUTH_ERROR" => Script::ThirdPartyAuthError,
            "QUOTA_EXCEEDED" => Script::QuotaExceeded {
                retry_after_secs: self.retry_after_secs.unwrap_or(60),
                times,
            },
            "UNAVAILABLE" => Script::Unavailable {
                times,
                retry_after_secs: self.retry_after_secs,
            },
            "INTERNAL" => Script::Internal { times },
            "HANG" => Script::Hang,
            "HANG_CONNECTION" => Script::HangConnection,
            "REFUSED_STREAM" => Script::RefusedStream { times },
            "LATENCY" => Script::Latency(Duration::from_millis(
                self.millis.ok_or(ScriptRequestError::MissingMillis)?,
            )),
            other => return Err(ScriptRequestError::UnknownAnswer(other.to_owned())),
        })
    }
}

/// `POST /emulator/tokens/{token}`: script the answer for a token over HTTP.
pub(super) async fn set_script(
    State(shared): State<Arc<Shared>>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let script = serde_json::from_slice::<ScriptRequest>(&body)
        .map_err(|e| format!("invalid script: {e}; valid answers: {ANSWERS}"))
        .and_then(|request| request.into_script().map_err(|e| e.to_string()));
    match script {
        Ok(script) => {
            tracing::debug!(token = %redact(&token), ?script, "FCM emulator: script set over HTTP");
            shared.set_script(token, Some(script));
            StatusCode::NO_CONTENT.into_response()
        }
        Err(message) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})),
        )
            .into_response(),
    }
}

/// `DELETE /emulator/tokens/{token}`: back to plain success.
pub(super) async fn clear_script(
    State(shared): State<Arc<Shared>>,
    Path(token): Path<String>,
) -> StatusCode {
    tracing::debug!(token = %redact(&token), "FCM emulator: script cleared");
    shared.set_script(token, None);
    StatusCode::NO_CONTENT
}

/// Body of `POST /emulator/outage`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageRequest {
    secs: u64,
    retry_after_secs: Option<u64>,
}

/// `POST /emulator/outage` with `{"secs": n, "retry_after_secs": s}`: every send answered 503
/// UNAVAILABLE for `n` seconds ([`super::FcmEmulator::outage`]).
pub(super) async fn start_outage(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<OutageRequest>(&body) {
        Ok(request) => {
            shared.start_outage(Duration::from_secs(request.secs), request.retry_after_secs);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => {
            let message = format!(
                "invalid outage: {e}; send {{\"secs\": n}} and optionally \"retry_after_secs\""
            );
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})),
            )
                .into_response()
        }
    }
}

/// `DELETE /emulator/outage`: the outage ends at once.
pub(super) async fn end_outage(State(shared): State<Arc<Shared>>) -> StatusCode {
    tracing::debug!("FCM emulator: outage ended");
    shared.state().outage = None;
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(script: Script, requests: usize) -> Vec<u16> {
        let mut slot = Some(script);
        (0..requests)
            .map(|_| match take(&mut slot) {
                Some(Scripted::Fail(failure)) => failure.status.as_u16(),
                Some(Scripted::Hang { .. } | Scripted::Refuse) => 0,
                Some(Scripted::Delay(_)) | None => 200,
            })
            .collect()
    }

    #[test]
    fn counting_scripts_fail_times_then_succeed() {
        let quota = Script::QuotaExceeded {
            retry_after_secs: 60,
            times: 2,
        };
        assert_eq!(statuses(quota, 4), [429, 429, 200, 200]);
        let unavailable = Script::Unavailable {
            times: 1,
            retry_after_secs: None,
        };
        assert_eq!(statuses(unavailable, 3), [503, 200, 200]);
        assert_eq!(statuses(Script::Internal { times: 0 }, 2), [200, 200]);
        assert_eq!(
            statuses(Script::RefusedStream { times: 2 }, 3),
            [0, 0, 200],
            "refused, unanswered"
        );
    }

    #[test]
    fn permanent_scripts_keep_answering() {
        assert_eq!(statuses(Script::Unregistered, 3), [404, 404, 404]);
        assert_eq!(statuses(Script::InvalidToken, 2), [400, 400]);
        assert_eq!(statuses(Script::SenderIdMismatch, 2), [403, 403]);
        assert_eq!(statuses(Script::ThirdPartyAuthError, 2), [401, 401]);
        assert_eq!(statuses(Script::Hang, 2), [0, 0], "held, unanswered");
        let mut slot = Some(Script::HangConnection);
        assert_eq!(take(&mut slot), Some(Scripted::Hang { connection: true }));
        assert_eq!(
            take(&mut slot),
            Some(Scripted::Hang { connection: false }),
            "one connection silenced, later sends only held"
        );
    }

    #[test]
    fn retry_after_only_where_scripted() {
        let mut slot = Some(Script::Unavailable {
            times: 1,
            retry_after_secs: None,
        });
        let Some(Scripted::Fail(failure)) = take(&mut slot) else {
            panic!("expected a failure");
        };
        assert_eq!(failure.retry_after_secs, None);
        let mut slot = Some(Script::QuotaExceeded {
            retry_after_secs: 7,
            times: 1,
        });
        let Some(Scripted::Fail(failure)) = take(&mut slot) else {
            panic!("expected a failure");
        };
        assert_eq!(failure.retry_after_secs, Some(7));
    }

    #[test]
    fn http_script_requests() {
        let parse = |body: &str| {
            serde_json::from_str::<ScriptRequest>(body)
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_script().map_err(|e| e.to_string()))
        };
        assert!(matches!(
            parse(r#"{"answer":"QUOTA_EXCEEDED","retry_after_secs":5,"times":3}"#),
            Ok(Script::QuotaExceeded {
                retry_after_secs: 5,
                times: 3
            })
        ));
        assert!(matches!(
            parse(r#"{"answer":"LATENCY","millis":200}"#),
            Ok(Script::Latency(d)) if d == Duration::from_millis(200)
        ));
        let unknown = parse(r#"{"answer":"NOPE"}"#).err().unwrap_or_default();
        assert!(unknown.contains("UNREGISTERED"), "{unknown}");
        assert!(matches!(parse(r#"{"answer":"HANG"}"#), Ok(Script::Hang)));
        assert!(matches!(
            parse(r#"{"answer":"HANG_CONNECTION"}"#),
            Ok(Script::HangConnection)
        ));
        assert!(matches!(
            parse(r#"{"answer":"REFUSED_STREAM","times":2}"#),
            Ok(Script::RefusedStream { times: 2 })
        ));
        assert!(parse(r#"{"answer":"LATENCY"}"#).is_err());
        assert!(parse(r#"{"answer":"INTERNAL","tims":1}"#).is_err());
    }
}
