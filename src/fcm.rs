//! FCM HTTP v1: OAuth2 access tokens and one send, through the pool and the pacer. The message
//! each token gets is `message`'s; what FCM's answer means (docs/contract.md, "How FCM's
//! answers are handled") is `answer`'s. The connections (HTTP/2, or HTTP/1.1 through
//! `http1`) are `pool`'s; the pace of sends (`FFPUSH_FCM_RATE`, quota pauses) is `pace`'s.

mod answer;
mod exchange;
mod http1;
mod message;
mod pace;
mod pool;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, Request, Uri, header};
use bytes::Bytes;
use serde_json::{Value, json};
use yup_oauth2::authenticator::DefaultAuthenticator;

use crate::config::Settings;
use crate::metrics::FcmMetrics;

use answer::retry_after_ceiling;
pub use answer::{Action, Answer, AuthError, Error, ErrorCode, Outcome, Rejection, classify};
pub use message::{MAX_PAYLOAD, MessageTemplate};
pub use pace::Load as PaceLoad;
use pace::Pacer;
use pool::{Pool, PoolConfig};
pub use pool::{Protocol, SendError};

pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_redacted() {
        let r = redact("abcdefghijklmnopqrstuvwxyz");
        assert!(!r.contains("ijkl"));
        assert!(r.starts_with("abcdefgh"));
    }
}
