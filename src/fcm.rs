//! FCM HTTP v1: OAuth2 access tokens, the message each token gets, one send, and what FCM's
//! answer means (DESIGN.md §1, seed 003). The connections (HTTP/2, or HTTP/1.1 through `http1`)
//! are `pool`'s; the pace of sends (`FFPUSH_FCM_RATE`, quota pauses) is `pace`'s.

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
use crate::metrics::FcmMetrics;
use crate::model::{Invalid, Notification};

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
    /// UNREGISTERED or an invalid registration token: delete its documents.
    Dead,
    /// SENDER_ID_MISMATCH: the token belongs to another Firebase project. Keep it.
    SenderIdMismatch,
    /// THIRD_PARTY_AUTH_ERROR: APNs or web-push credentials in Firebase are wrong.
    ThirdPartyAuth,
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

/// What the fan-out does about an [`Error`] (README, "Errors").
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

/// The request body for one notification, built once; the token is spliced in per send.
#[derive(Clone, Debug)]
pub struct MessageTemplate {
    /// The message object without its token, serialized: `{"notification":…}`.
    rest: String,
}

impl MessageTemplate {
    pub fn new(n: &Notification) -> Result<MessageTemplate, Invalid> {
        let mut notification = Map::new();
        notification.insert("title".into(), json!(n.title));
        notification.insert("body".into(), json!(n.body));
        if let Some(image) = &n.image {
            notification.insert("image".into(), json!(image));
        }
        let mut message = Map::new();
        message.insert("notification".into(), Value::Object(notification));
        // FlutterFlow's function always sends both keys, "" when unset; app code reads them.
        message.insert(
            "data".into(),
            json!({
                "initialPageName": n.initial_page.as_deref().unwrap_or_default(),
                "parameterData": n.parameter_data.as_deref().unwrap_or_default(),
            }),
        );
        if let Some(sound) = &n.sound {
            message.insert("android".into(), json!({"notification": {"sound": sound}}));
            message.insert("apns".into(), json!({"payload": {"aps": {"sound": sound}}}));
        }
        let rest = Value::Object(message).to_string();
        if rest.len() > MAX_PAYLOAD {
            return Err(Invalid(format!(
                "the message is {} bytes, over FCM's {MAX_PAYLOAD}-byte limit: shorten parameter_data, the text or the image URL",
                rest.len()
            )));
        }
        Ok(MessageTemplate { rest })
    }

    /// `{"message":{"token":"…",<rest>}}`: one allocation, the token escaped in place.
    pub fn body_for(&self, token: &str) -> Bytes {
        let inner = &self.rest.as_bytes()[1..];
        let mut body = Vec::with_capacity(self.rest.len() + token.len() + 32);
        body.extend_from_slice(br#"{"message":{"token":"#);
        // Writing JSON into a Vec cannot fail; a string always serializes.
        let _ = serde_json::to_writer(&mut body, token);
        body.push(b',');
        body.extend_from_slice(inner);
        body.push(b'}');
        Bytes::from(body)
    }

    /// The message as a JSON value, for dry runs and tests.
    pub fn message_for(&self, token: &str) -> Value {
        serde_json::from_slice(&self.body_for(token)).unwrap_or(Value::Null)
    }
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
        classify(answer.status, &answer.body, answer.retry_after)
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

/// What an FCM answer means (DESIGN.md §1).
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
                Ok(Outcome::Dead)
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
    use crate::model::Audience;

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
            Some(Outcome::Dead)
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
