//! FCM HTTP v1: OAuth2 access tokens, the message each token gets, one send, and what FCM's
//! answer means (docs/contract.md, "How FCM's answers are handled"; FCM's error codes:
//! <https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode>). The connections
//! (HTTP/2, or HTTP/1.1 through `http1`) are `pool`'s; the pace of sends (`FFPUSH_FCM_RATE`,
//! quota pauses) is `pace`'s.

mod http1;
mod pace;
mod pool;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, Request, Uri, header};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use yup_oauth2::authenticator::DefaultAuthenticator;

use crate::config::Settings;
use crate::metrics::{FcmMetrics, OutcomeClass};
use crate::model::{Audience, Invalid, Notification, Priority};

pub use pace::Load as PaceLoad;
use pace::Pacer;
use pool::{Pool, PoolConfig};
pub use pool::{Protocol, SendError};

pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// FCM's limit on a message's payload.
pub const MAX_PAYLOAD: usize = 4096;

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

    fn setup(
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
        for (key, value) in &o.data {
            data.insert(key.clone(), json!(value));
        }
        if o.silent {
            // No notification block: the app gets the text as data, and shows what it likes.
            for (key, text) in [("title", title), ("body", body)] {
                if !text.is_empty() {
                    data.insert(key.into(), json!(text));
                }
            }
        } else {
            let mut notification = Map::new();
            notification.insert("title".into(), json!(title));
            notification.insert("body".into(), json!(body));
            if let Some(image) = &n.image {
                notification.insert("image".into(), json!(image));
            }
            message.insert("notification".into(), Value::Object(notification));
        }
        message.insert("data".into(), Value::Object(data));
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
        let mut size = rest.len();
        let mut expiration = None;
        if let Some(ttl) = expires {
            let quoted = format!("\"{placeholder}\"");
            let at = rest.find(&quoted).ok_or_else(|| {
                Invalid("internal error: the apns-expiration placeholder was not serialized".into())
            })?;
            rest.replace_range(at..at + quoted.len(), "");
            // What the send will carry: the quoted Unix time, today 10 digits.
            size = rest.len() + expiration_value(u64::from(ttl)).len();
            expiration = Some((at, u64::from(ttl)));
        }
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

/// Shows enough of a registration token to tell two apart in a log, never the secret.
pub fn redact(token: &str) -> String {
    let head: String = token.chars().take(8).collect();
    format!("{head}…({} chars)", token.chars().count())
}

struct CachedToken {
    header: HeaderValue,
    fetched: Instant,
}

/// An FCM sender: a pool of HTTP/2 connections, one access token and one pace shared by all
/// sends of the instance.
pub struct Sender {
    pool: Arc<Pool>,
    pacer: Pacer,
    /// Parsed once: parsing it per request was a measurable share of a send.
    send_uri: Uri,
    metrics: Arc<FcmMetrics>,
    auth: DefaultAuthenticator,
    token: RwLock<Option<CachedToken>>,
    /// Our cached token is reused this long before asking yup-oauth2 (which refreshes a
    /// minute before expiry) again.
    token_reuse: Duration,
    /// The longest `Retry-After` honoured: `FFPUSH_RETRY_BUDGET` (see [`retry_after_ceiling`]).
    retry_after_ceiling: Duration,
}

impl Sender {
    pub async fn new(settings: &Settings) -> Result<Sender, Error> {
        let oauth_client = oauth_client(settings.fcm_ca_cert.as_ref())?;
        let auth = match &settings.credentials {
            Some(path) => {
                let key = yup_oauth2::read_service_account_key(path)
                    .await
                    .map_err(|source| AuthError::Key {
                        path: path.clone(),
                        source,
                    })?;
                yup_oauth2::ServiceAccountAuthenticator::with_client(key, oauth_client)
                    .build()
                    .await
                    .map_err(AuthError::Setup)?
            }
            None => {
                let opts = yup_oauth2::ApplicationDefaultCredentialsFlowOpts::default();
                match yup_oauth2::ApplicationDefaultCredentialsAuthenticator::with_client(
                    opts,
                    oauth_client,
                )
                .await
                {
                    yup_oauth2::authenticator::ApplicationDefaultCredentialsTypes::InstanceMetadata(b) => b.build().await,
                    yup_oauth2::authenticator::ApplicationDefaultCredentialsTypes::ServiceAccount(b) => b.build().await,
                }
                .map_err(AuthError::Setup)?
            }
        };
        let send_url = format!(
            "{}/v1/projects/{}/messages:send",
            settings.fcm_endpoint, settings.project
        );
        let send_uri: Uri = send_url
            .parse()
            .map_err(|e| Error::setup(format!("FCM_ENDPOINT gives no valid URL {send_url}"), e))?;
        let metrics = Arc::new(FcmMetrics::default());
        let pool = Pool::new(pool_config(settings, &send_uri)?, metrics.clone());
        let pacer = Pacer::new(settings.fcm_rate, settings.quota_floor, metrics.clone());
        Ok(Sender {
            pool,
            pacer,
            send_uri,
            metrics,
            auth,
            token: RwLock::new(None),
            token_reuse: Duration::from_secs(30),
            retry_after_ceiling: settings.retry_budget,
        })
    }

    /// A `Bearer …` header, cached.
    pub async fn access_token(&self) -> Result<HeaderValue, Error> {
        if let Ok(guard) = self.token.read()
            && let Some(cached) = guard.as_ref()
            && cached.fetched.elapsed() < self.token_reuse
        {
            return Ok(cached.header.clone());
        }
        let token = self.auth.token(&[SCOPE]).await.map_err(AuthError::Token)?;
        self.store_token(token.token())
    }

    fn store_token(&self, token: Option<&str>) -> Result<HeaderValue, Error> {
        let token = token.ok_or(AuthError::NoToken)?;
        let header =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| AuthError::BadHeader)?;
        if let Ok(mut guard) = self.token.write() {
            *guard = Some(CachedToken {
                header: header.clone(),
                fetched: Instant::now(),
            });
        }
        Ok(header)
    }

    /// After FCM said 401 to `stale`: fetch a new token unless another send already did.
    pub async fn refresh_token(&self, stale: &HeaderValue) -> Result<HeaderValue, Error> {
        if let Ok(guard) = self.token.read()
            && let Some(cached) = guard.as_ref()
            && cached.header != stale
        {
            return Ok(cached.header.clone());
        }
        let token = self
            .auth
            .force_refreshed_token(&[SCOPE])
            .await
            .map_err(AuthError::Token)?;
        self.store_token(token.token())
    }

    /// Waits for this instance's pace: `FFPUSH_FCM_RATE`, and the pause after a 429
    /// QUOTA_EXCEEDED. Every send waits here once, before [`Sender::send_now`].
    pub async fn pace(&self) {
        self.pacer.acquire().await;
    }

    /// Paces this instance at `share` messages per second from now on: its share of
    /// `FFPUSH_FCM_RATE` among the project's instances (see [`crate::instances`]); 0 holds
    /// every send until it is raised. No effect when unpaced (`FFPUSH_FCM_RATE=0`).
    pub fn set_share(&self, share: f64) {
        self.pacer.set_share(share);
    }

    /// How much the pace has held sends back so far: whether this instance wants more than
    /// its share.
    pub fn pace_load(&self) -> PaceLoad {
        self.pacer.load()
    }

    /// Resolves when a send has to wait for this instance's pace, from the call on.
    pub async fn held_back(&self) {
        self.pacer.held_back().await;
    }

    /// [`Sender::pace`], then [`Sender::send_now`].
    pub async fn send(&self, body: Bytes) -> Result<Outcome, Error> {
        self.pace().await;
        self.send_now(body).await
    }

    /// One request, at once (the caller waited for [`Sender::pace`]); the answer classified.
    /// A 401 on our token is retried once with a fresh one. A 429 QUOTA_EXCEEDED pauses every
    /// send of the instance.
    pub async fn send_now(&self, body: Bytes) -> Result<Outcome, Error> {
        let sent_at = tokio::time::Instant::now();
        let header = self.access_token().await?;
        let answer = match self.send_once(&header, body.clone()).await {
            Err(Error::Unauthenticated(_)) => {
                let fresh = self.refresh_token(&header).await?;
                self.send_once(&fresh, body).await
            }
            other => other,
        };
        if let Err(Error::Retryable {
            quota: true,
            retry_after,
            ..
        }) = &answer
        {
            self.pacer.quota_exceeded(*retry_after, sent_at);
        }
        answer
    }

    /// A `validate_only` send: checks permissions and the message without delivering.
    pub async fn dry_run(&self, message: Value) -> Result<Outcome, Error> {
        let body = json!({"message": message, "validate_only": true}).to_string();
        self.send(Bytes::from(body)).await
    }

    /// Gets the access token and opens the connections before a burst, so the first sends
    /// don't queue behind handshakes; see [`Sender::connect`].
    pub async fn warm_up(&self) -> Result<(), Error> {
        let _ = self.access_token().await;
        self.connect().await
    }

    /// Opens the connections, finding out which HTTP `FCM_ENDPOINT` speaks (HTTP/2, else
    /// HTTP/1.1; the choice is logged once). Fails only when the endpoint answers in neither
    /// (or not in TLS for `https://`): no retry would fix that. An endpoint that cannot be
    /// reached now is only warned about: sends retry, and connect when it is back.
    pub async fn connect(&self) -> Result<(), Error> {
        match self.pool.warm_up().await {
            Ok(open) => tracing::debug!(connections = open, "FCM connections warm"),
            Err(e @ SendError::Protocol(_)) => return Err(Error::setup("FCM_ENDPOINT", e)),
            Err(e) => tracing::warn!(error = %e, "could not open the FCM connections ahead"),
        }
        Ok(())
    }

    /// The HTTP `FCM_ENDPOINT` speaks, once a connection has opened.
    pub fn protocol(&self) -> Option<Protocol> {
        self.pool.protocol()
    }

    /// The pool's counters, for `/metrics`.
    pub fn metrics(&self) -> Arc<FcmMetrics> {
        self.metrics.clone()
    }

    async fn send_once(&self, auth: &HeaderValue, body: Bytes) -> Result<Outcome, Error> {
        let length = HeaderValue::from(body.len());
        let head = || {
            let mut request = Request::new(());
            *request.method_mut() = Method::POST;
            *request.uri_mut() = self.send_uri.clone();
            let headers = request.headers_mut();
            headers.insert(header::AUTHORIZATION, auth.clone());
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::CONTENT_LENGTH, length.clone());
            request
        };
        let answer = self.pool.send(head, body).await.map_err(Error::Transport)?;
        let retry_after = retry_after_ceiling(answer.retry_after, self.retry_after_ceiling);
        classify(answer.status, &answer.body, retry_after)
    }
}

/// What is wrong with `FCM_ENDPOINT` or the CA certificate, in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct EndpointError(String);

/// The pool for `FCM_ENDPOINT`: TLS offering ALPN `h2` and `http/1.1` for `https://`, plain
/// TCP for `http://` (HTTP/2 with prior knowledge, else HTTP/1.1: see `pool`).
fn pool_config(settings: &Settings, uri: &Uri) -> Result<PoolConfig, Error> {
    let bad = |why: &str| {
        Error::setup(
            format!("FCM_ENDPOINT {}", settings.fcm_endpoint),
            EndpointError(why.to_string()),
        )
    };
    let host = uri
        .host()
        .ok_or_else(|| bad("no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let (secure, default_port) = match uri.scheme_str() {
        Some("https") => (true, 443),
        Some("http") => (false, 80),
        _ => return Err(bad("use an https:// (or, for an emulator, http://) URL")),
    };
    let tls = if secure {
        let mut config = tls_config(settings.fcm_ca_cert.as_ref())?;
        // HTTP/2 when the server agrees (FCM does); HTTP/1.1 through a front end that does not.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| bad(&format!("{host} is not a valid TLS server name: {e}")))?;
        Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    } else {
        None
    };
    Ok(PoolConfig {
        port: uri.port_u16().unwrap_or(default_port),
        host,
        tls,
        concurrency: settings.concurrency,
        connections: settings.fcm_connections,
        timeout: settings.fcm_timeout,
        connect_timeout: settings.fcm_timeout.min(Duration::from_secs(10)),
    })
}

type OAuthConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The OAuth2 token client, as yup-oauth2 builds its default (system roots, HTTP/1.1 and 2,
/// no idle connections kept) plus the extra root of `FFPUSH_FCM_CA_CERT`.
fn oauth_client(
    extra: Option<&crate::config::CaCert>,
) -> Result<yup_oauth2::CustomHyperClientBuilder<OAuthConnector>, Error> {
    let tls = tls_config(extra)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build::<_, String>(connector);
    Ok(yup_oauth2::CustomHyperClientBuilder::from(client))
}

/// TLS for FCM and its token endpoint: rustls with aws-lc-rs, the system roots and the extra
/// root(s) of `FFPUSH_FCM_CA_CERT`.
fn tls_config(extra: Option<&crate::config::CaCert>) -> Result<rustls::ClientConfig, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped, as yup-oauth2 does; an HTTPS token endpoint
    // then fails with a certificate error naming the host.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = extra {
        for cert in CertificateDer::pem_slice_iter(&ca.pem) {
            let added = cert
                .map_err(|e| e.to_string())
                .and_then(|cert| roots.add(cert).map_err(|e| e.to_string()));
            added.map_err(|e| {
                Error::setup(
                    format!("FFPUSH_FCM_CA_CERT {}", ca.path.display()),
                    EndpointError(e),
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::setup("TLS setup", e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// FCM's `Retry-After`, at most `ceiling` (the retry budget). A longer one cannot be honoured
/// by any token (each gives up when its budget runs out), so waiting longer only stalls the
/// instance: a 429's pause would hold every send for as long as the header says (a year, with
/// healthy-looking leases), and a value near `u64::MAX` seconds would overflow the arithmetic
/// on instants. Read as the budget, it makes the token give up at once, counted as
/// undelivered, and a quota pause last no longer than the budget.
fn retry_after_ceiling(retry_after: Option<Duration>, ceiling: Duration) -> Option<Duration> {
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
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = &parsed["error"];
    let message = error["message"].as_str().unwrap_or("").to_string();
    let status_name = error["status"].as_str().unwrap_or("");
    let details = error["details"].as_array().cloned().unwrap_or_default();
    let fcm_code = details
        .iter()
        .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("FcmError")))
        .and_then(|d| d["errorCode"].as_str())
        .unwrap_or("")
        .to_string();
    let violations: Vec<(String, String)> = details
        .iter()
        .filter(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("BadRequest"))
        })
        .flat_map(|d| d["fieldViolations"].as_array().cloned().unwrap_or_default())
        .map(|v| {
            (
                v["field"].as_str().unwrap_or("").to_string(),
                v["description"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let answer = || Answer {
        http: status,
        status: status_name.to_string(),
        message: message.clone(),
    };
    match status {
        400 => {
            let token_violation = violations.iter().any(|(f, _)| f == "message.token");
            let payload_violation = violations.iter().find(|(f, _)| f != "message.token");
            if let Some((field, description)) = payload_violation {
                Err(Error::Payload(Rejection::Field {
                    field: field.clone(),
                    description: description.clone(),
                }))
            // FCM says "not a valid FCM registration token" with no field violation: its
            // message is the only sign that the token, not the payload, is at fault.
            } else if token_violation || message.to_ascii_lowercase().contains("registration token")
            {
                Ok(Outcome::InvalidToken)
            } else {
                Err(Error::Payload(Rejection::Answer(answer())))
            }
        }
        404 if fcm_code == "UNREGISTERED" => Ok(Outcome::Dead),
        403 if fcm_code == "SENDER_ID_MISMATCH" => Ok(Outcome::SenderIdMismatch),
        401 if fcm_code == "THIRD_PARTY_AUTH_ERROR" => Ok(Outcome::ThirdPartyAuth),
        401 => Err(Error::Unauthenticated(answer())),
        429 => Err(Error::Retryable {
            answer: answer(),
            retry_after,
            quota: project_quota(&details),
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
    let violations: Vec<String> = details
        .iter()
        .filter(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("QuotaFailure"))
        })
        .flat_map(|d| d["violations"].as_array().cloned().unwrap_or_default())
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn tokens_are_redacted() {
        let r = redact("abcdefghijklmnopqrstuvwxyz");
        assert!(!r.contains("ijkl"));
        assert!(r.starts_with("abcdefgh"));
    }
}
