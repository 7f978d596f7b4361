//! `POST /v1/projects/{project}/messages:send`: authenticate, answer 503 during an outage,
//! check the project's quota, validate, apply the token's script (hold the send while it
//! hangs), record, answer (after the configured latency).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::Utc;
use rand::Rng as _;
use serde_json::json;

use super::script::{self, Scripted};
use super::serve::{ConnectionSends, RefusedStream};
use super::validate;
use super::{AcceptedMessage, Attempt, EmulatorState, QuotaWindow, Shared, redact};

pub(super) async fn send(
    State(shared): State<Arc<Shared>>,
    Path((project, action)): Path<(String, String)>,
    uri: Uri,
    version: Version,
    connection: Option<Extension<Arc<ConnectionSends>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if action != "messages:send" {
        return super::no_route(&Method::POST, uri.path());
    }
    let sends = connection.map(|Extension(sends)| sends);
    let _in_progress = sends.as_ref().map(|sends| sends.start(&shared));
    let on = Via {
        version,
        connection: sends.as_ref().map(|sends| sends.id),
    };
    let delay = delay(&shared);
    let response = loop {
        match answer(&shared, &project, on, &headers, &body).await {
            Answered::Now(response) => break response,
            // Held until the script changes; then answered as if it had just arrived.
            Answered::Held { token, connection } => {
                // One send per HTTP/1.1 connection, and its handler runs inside the
                // connection's task: silencing it would never let the handler see a release.
                let silent = connection && version == Version::HTTP_2;
                let _silent = sends.as_ref().filter(|_| silent).map(|s| s.silence());
                shared.released(&token).await;
            }
        }
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

/// This send's latency: uniform in `latency ± jitter`.
fn delay(shared: &Shared) -> Duration {
    let options = &shared.options;
    if options.jitter.is_zero() {
        return options.latency;
    }
    let low = options.latency.saturating_sub(options.jitter);
    let high = options.latency.saturating_add(options.jitter);
    rand::rng().random_range(low..=high)
}

/// Counts a send request against the project's quota. `Some(retry_after_secs)` when the
/// window's quota is used up: the seconds until the window ends, rounded up.
fn over_quota(shared: &Shared, state: &mut EmulatorState, project: &str) -> Option<u64> {
    let limit = shared.options.quota?;
    let window = shared.options.quota_window.as_nanos().max(1);
    let elapsed = shared.started.elapsed();
    let index = (elapsed.as_nanos() / window) as u64;
    let counts = state
        .quota
        .entry(project.to_owned())
        .or_default()
        .entry(index)
        .or_insert(QuotaWindow {
            index,
            ..QuotaWindow::default()
        });
    if counts.admitted < limit {
        counts.admitted += 1;
        return None;
    }
    counts.refused += 1;
    let end = (u128::from(index) + 1) * window;
    let remaining = end.saturating_sub(elapsed.as_nanos());
    Some((remaining.div_ceil(1_000_000_000) as u64).max(1))
}

/// How a send came: its HTTP version and connection.
#[derive(Clone, Copy)]
struct Via {
    version: Version,
    connection: Option<u64>,
}

/// What [`answer`] decided.
enum Answered {
    Now(Response),
    /// A hang script holds the send (`connection`: its connection goes silent too).
    Held {
        token: String,
        connection: bool,
    },
}

async fn answer(
    shared: &Shared,
    project: &str,
    on: Via,
    headers: &HeaderMap,
    body: &Bytes,
) -> Answered {
    // FCM checks credentials before it looks at the message.
    if !authorized(shared, headers) {
        tracing::debug!(%project, "FCM emulator: send refused, bad OAuth token");
        return Answered::Now((StatusCode::UNAUTHORIZED, Json(unauthenticated())).into_response());
    }
    let at = Utc::now();
    if let Some(retry_after_secs) = shared.outage() {
        let token = validate::token_hint(body);
        tracing::debug!(%project, token = ?token.as_deref().map(redact), "FCM emulator: outage, 503");
        record_attempt(
            shared,
            project,
            token,
            StatusCode::SERVICE_UNAVAILABLE,
            at,
            on,
        );
        return Answered::Now(script::fcm_error("UNAVAILABLE", retry_after_secs).into_response());
    }
    // The quota counts send requests, whatever their message.
    let refused = {
        let mut state = shared.state();
        over_quota(shared, &mut state, project)
    };
    if let Some(retry_after_secs) = refused {
        let token = validate::token_hint(body);
        tracing::debug!(%project, token = ?token.as_deref().map(redact), retry_after_secs, "FCM emulator: over quota");
        record_attempt(
            shared,
            project,
            token,
            StatusCode::TOO_MANY_REQUESTS,
            at,
            on,
        );
        return Answered::Now(
            script::fcm_error("QUOTA_EXCEEDED", Some(retry_after_secs)).into_response(),
        );
    }
    let request = match validate::send_request(body) {
        Ok(request) => request,
        Err(violation) => {
            let token = validate::token_hint(body);
            tracing::debug!(%project, token = ?token.as_deref().map(redact), field = ?violation.field, "FCM emulator: send invalid");
            record_attempt(shared, project, token, StatusCode::BAD_REQUEST, at, on);
            return Answered::Now(
                (StatusCode::BAD_REQUEST, Json(violation.body())).into_response(),
            );
        }
    };

    let (scripted, name) = {
        let mut state = shared.state();
        let scripted = request.token.as_ref().and_then(|token| {
            let mut slot = state.scripts.remove(token);
            let scripted = script::take(&mut slot);
            if let Some(script) = slot {
                state.scripts.insert(token.clone(), script);
            }
            scripted
        });
        let status = match &scripted {
            Some(Scripted::Fail(failure)) => failure.status.as_u16(),
            // Not answered.
            Some(Scripted::Hang { .. } | Scripted::Refuse) => 0,
            Some(Scripted::Delay(_)) | None => 200,
        };
        count_attempt(&mut state.stats, on.version);
        if shared.options.record {
            state.attempts.push((
                project.to_owned(),
                Attempt {
                    token: request.token.clone(),
                    status,
                    at,
                    connection: on.connection,
                },
            ));
        }
        let name = (status == 200).then(|| {
            state.stats.accepted += 1;
            let name = message_name(project, state.stats.accepted, request.validate_only);
            if shared.options.record {
                state.messages.push(AcceptedMessage {
                    project: project.to_owned(),
                    token: request.token.clone(),
                    topic: request.topic.clone(),
                    message: request.message.clone(),
                    name: name.clone(),
                    received_at: at,
                    validate_only: request.validate_only,
                    http_version: format!("{:?}", on.version),
                    connection: on.connection,
                });
            }
            name
        });
        (scripted, name)
    };

    let token = request.token.as_deref().map(redact);
    let response = match (scripted, name) {
        (Some(Scripted::Fail(failure)), _) => {
            tracing::debug!(%project, ?token, status = failure.status.as_u16(), "FCM emulator: scripted failure");
            failure.into_response()
        }
        (Some(Scripted::Hang { connection }), _) => {
            tracing::debug!(%project, ?token, connection, "FCM emulator: send held unanswered");
            return Answered::Held {
                token: request.token.unwrap_or_default(),
                connection,
            };
        }
        (Some(Scripted::Refuse), _) => {
            tracing::debug!(%project, ?token, "FCM emulator: stream refused");
            let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
            response.extensions_mut().insert(RefusedStream);
            response
        }
        (scripted, Some(name)) => {
            if let Some(Scripted::Delay(delay)) = scripted {
                tokio::time::sleep(delay).await;
            }
            tracing::debug!(%project, ?token, validate_only = request.validate_only, "FCM emulator: message accepted");
            Json(json!({"name": name})).into_response()
        }
        // A non-failing answer always gets a name; kept total rather than unwrapped.
        (_, None) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    Answered::Now(response)
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    token.is_some_and(|token| shared.state().credentials.accepts(token))
}

fn record_attempt(
    shared: &Shared,
    project: &str,
    token: Option<String>,
    status: StatusCode,
    at: chrono::DateTime<Utc>,
    on: Via,
) {
    let mut state = shared.state();
    count_attempt(&mut state.stats, on.version);
    if shared.options.record {
        state.attempts.push((
            project.to_owned(),
            Attempt {
                token,
                status: status.as_u16(),
                at,
                connection: on.connection,
            },
        ));
    }
}

fn count_attempt(stats: &mut super::Stats, version: Version) {
    stats.attempts += 1;
    if version == Version::HTTP_2 {
        stats.http2 += 1;
    }
}

/// Real message ids look like `0:1500415314455276%31bd1c9631bd1c96`; validate-only sends get
/// FCM's fixed fake id.
fn message_name(project: &str, sequence: u64, validate_only: bool) -> String {
    if validate_only {
        return format!("projects/{project}/messages/fake_message_id");
    }
    let micros = Utc::now().timestamp_micros();
    let salt: u32 = rand::rng().random();
    format!("projects/{project}/messages/0:{micros}%{salt:08x}{sequence:08x}")
}

/// The fixture `UNAUTHENTICATED_bad_oauth_token`.
fn unauthenticated() -> serde_json::Value {
    json!({"error": {
        "code": 401,
        "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        "status": "UNAUTHENTICATED",
    }})
}
