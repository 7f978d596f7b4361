//! Google's OAuth2 token endpoint for service accounts (JWT-bearer grant), the access tokens
//! it issues, and the service-account key files that make clients use it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use rand::Rng as _;
use serde_json::{Value, json};

use super::Shared;

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const ACCEPTED_SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
];
/// Clock skew tolerated on `iat`, as Google does.
const MAX_IAT_SKEW_SECS: i64 = 300;

/// yup-oauth2 pads its base64url, JWT libraries usually do not; take both.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Keys the emulator trusts and access tokens it has handed out.
#[derive(Default)]
pub(super) struct Credentials {
    /// RSAPublicKey DER of each key written by `write_service_account`.
    public_keys: Vec<Vec<u8>>,
    /// Live access tokens and when each expires.
    access_tokens: HashMap<String, Instant>,
    issued: usize,
}

impl Credentials {
    pub fn issued(&self) -> usize {
        self.issued
    }

    pub fn revoke_all(&mut self) {
        self.access_tokens.clear();
    }

    /// Whether `token` was issued here, is not revoked and has not expired.
    pub fn accepts(&mut self, token: &str) -> bool {
        let now = Instant::now();
        self.access_tokens.retain(|_, expires| *expires > now);
        self.access_tokens.contains_key(token)
    }

    fn issue(&mut self, lifetime: Duration) -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill(&mut bytes);
        // Google's access tokens start with "ya29."; keeping the look helps when reading logs.
        let token = format!(
            "ya29.emulator-{}",
            BASE64URL.encode(bytes).trim_end_matches('=')
        );
        self.access_tokens
            .insert(token.clone(), Instant::now() + lifetime);
        self.issued += 1;
        token
    }
}

/// Why `/token` refused an assertion; the text becomes `error_description`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(super) enum GrantError {
    #[error("Invalid grant_type: {0}")]
    UnsupportedGrantType(String),
    #[error("Missing required parameter: assertion")]
    MissingAssertion,
    #[error("Invalid JWT: expected three base64url parts separated by '.'")]
    Malformed,
    #[error("Invalid JWT header: {0}")]
    Header(String),
    #[error("Invalid JWT Signature.")]
    Signature,
    #[error("Invalid JWT: {0}")]
    Claims(String),
}

impl IntoResponse for GrantError {
    fn into_response(self) -> Response {
        let error = match self {
            GrantError::UnsupportedGrantType(_) => "unsupported_grant_type",
            _ => "invalid_grant",
        };
        let body = json!({"error": error, "error_description": self.to_string()});
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
}

/// `POST /token`: exchange a signed service-account JWT for an access token.
pub(super) async fn token(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let now = chrono::Utc::now().timestamp();
    let keys = shared.state().credentials.public_keys.clone();
    // Signature checks are cheap enough for test volumes to run inline on the runtime.
    match check_grant(&body, &keys, shared.addr.port(), now) {
        Ok(()) => {
            let lifetime = shared.options.token_lifetime;
            let access_token = shared.state().credentials.issue(lifetime);
            tracing::debug!("FCM emulator: access token issued");
            Json(json!({
                "access_token": access_token,
                "expires_in": lifetime.as_secs(),
                "token_type": "Bearer",
            }))
            .into_response()
        }
        Err(e) => {
            tracing::debug!(error = %e, "FCM emulator: token request refused");
            e.into_response()
        }
    }
}

/// Checks a form-encoded JWT-bearer grant against the trusted keys.
fn check_grant(body: &[u8], keys: &[Vec<u8>], port: u16, now: i64) -> Result<(), GrantError> {
    let form = parse_form(body);
    let grant_type = form
        .get("grant_type")
        .map(String::as_str)
        .unwrap_or_default();
    if grant_type != GRANT_TYPE {
        return Err(GrantError::UnsupportedGrantType(grant_type.to_owned()));
    }
    let assertion = form.get("assertion").ok_or(GrantError::MissingAssertion)?;
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header_part, claims_part, signature_part] = parts[..] else {
        return Err(GrantError::Malformed);
    };
    let header = decode_json(header_part)?;
    let claims = decode_json(claims_part)?;
    let signature = BASE64URL
        .decode(signature_part)
        .map_err(|_| GrantError::Malformed)?;

    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(GrantError::Header(format!(
            "alg must be RS256, got {}",
            header.get("alg").unwrap_or(&Value::Null)
        )));
    }
    // yup-oauth2 sends no `kid`, so every registered key is tried.
    let signed = &assertion.as_bytes()[..header_part.len() + 1 + claims_part.len()];
    let verified = keys.iter().any(|key| {
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
            .verify(signed, &signature)
            .is_ok()
    });
    if !verified {
        return Err(GrantError::Signature);
    }
    check_claims(&claims, port, now)
}

fn check_claims(claims: &Value, port: u16, now: i64) -> Result<(), GrantError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let number = |name: &str| claims.get(name).and_then(Value::as_i64);
    if text("iss").is_none_or(str::is_empty) {
        return Err(GrantError::Claims("missing iss".into()));
    }
    let aud = text("aud").unwrap_or_default();
    if !is_our_token_uri(aud, port) {
        return Err(GrantError::Claims(format!(
            "aud {aud:?} is not this token endpoint"
        )));
    }
    match number("exp") {
        Some(exp) if exp > now => {}
        Some(_) => return Err(GrantError::Claims("the assertion has expired (exp)".into())),
        None => return Err(GrantError::Claims("missing exp".into())),
    }
    match number("iat") {
        Some(iat) if iat <= now + MAX_IAT_SKEW_SECS => {}
        Some(_) => return Err(GrantError::Claims("iat is in the future".into())),
        None => return Err(GrantError::Claims("missing iat".into())),
    }
    let scope = text("scope").unwrap_or_default();
    if !scope.split(' ').any(|s| ACCEPTED_SCOPES.contains(&s)) {
        return Err(GrantError::Claims(format!(
            "scope {scope:?} does not include {}",
            ACCEPTED_SCOPES[0]
        )));
    }
    Ok(())
}

/// `aud` must name `/token` on this port, reached through loopback or the bound address.
fn is_our_token_uri(aud: &str, port: u16) -> bool {
    // Either scheme: the emulator serves one of them (`start` or `start_tls`).
    let Some(rest) = aud
        .strip_prefix("http://")
        .or_else(|| aud.strip_prefix("https://"))
    else {
        return false;
    };
    let Some((authority, path)) = rest.split_once('/') else {
        return false;
    };
    let Some((host, aud_port)) = authority.rsplit_once(':') else {
        return false;
    };
    path == "token"
        && aud_port == port.to_string()
        && ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "[::]"].contains(&host)
}

fn decode_json(part: &str) -> Result<Value, GrantError> {
    let bytes = BASE64URL.decode(part).map_err(|_| GrantError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| GrantError::Malformed)
}

/// `application/x-www-form-urlencoded` pairs; malformed escapes are kept literally.
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    let decode = |s: &[u8]| {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < s.len() => {
                    let hex = std::str::from_utf8(&s[i + 1..i + 3]).ok();
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(byte) => {
                            out.push(byte);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                byte => out.push(byte),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (decode(&pair[..eq]), decode(&pair[eq + 1..])),
            None => (decode(pair), String::new()),
        })
        .collect()
}

/// Writes a service-account key whose private key is fresh and whose public key this emulator
/// trusts from now on.
pub(super) fn write_service_account(
    shared: &Shared,
    path: &Path,
    project: &str,
) -> std::io::Result<()> {
    let key_pair = KeyPair::generate(KeySize::Rsa2048)
        .map_err(|_| std::io::Error::other("RSA key generation failed"))?;
    let pkcs8: Pkcs8V1Der<'static> = key_pair
        .as_der()
        .map_err(|_| std::io::Error::other("PKCS#8 encoding of the RSA key failed"))?;
    let private_key = pem("PRIVATE KEY", pkcs8.as_ref());
    let public_key = key_pair.public_key().as_ref().to_vec();

    let mut rng = rand::rng();
    let private_key_id: String = (0..20)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect();
    let client_id: String = (0..21)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect();
    let client_email = format!("ffpush@{project}.iam.gserviceaccount.com");
    let file = json!({
        "type": "service_account",
        "project_id": project,
        "private_key_id": private_key_id,
        "private_key": private_key,
        "client_email": client_email,
        "client_id": client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": shared.token_uri(),
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": format!(
            "https://www.googleapis.com/robot/v1/metadata/x509/ffpush%40{project}.iam.gserviceaccount.com"
        ),
        "universe_domain": "googleapis.com",
    });
    let text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    // Trusted before the file exists, so a reader can never see a key the emulator refuses.
    shared.state().credentials.public_keys.push(public_key);
    std::fs::write(path, text)
}

/// PEM armour: base64 at 64 columns between BEGIN/END lines.
fn pem(label: &str, der: &[u8]) -> String {
    let encoded = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests;
