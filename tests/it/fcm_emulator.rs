//! The FCM emulator driven over real HTTP, as ffpush and yup-oauth2 drive Google.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator, Script};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn fixtures() -> &'static Value {
    static FIXTURES: OnceLock<Value> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fcm_errors.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("fixture JSON")
    })
}

/// (status, body, Retry-After) of one fixture entry.
fn fixture(code: &str) -> (u16, Value, Option<String>) {
    let entry = &fixtures()[code];
    let status = entry["http_status"].as_u64().expect("http_status") as u16;
    let retry_after = entry["headers"]["Retry-After"].as_str().map(str::to_owned);
    (status, entry["body"].clone(), retry_after)
}

/// One emulator per test, with a service account and an access token obtained through
/// yup-oauth2 exactly as ffpush obtains one.
struct TestFcm {
    emulator: FcmEmulator,
    http: reqwest::Client,
    project: String,
    access_token: String,
    key_file: std::path::PathBuf,
    _dir: TempDir,
}

async fn spawn_fcm(project: &str, options: EmulatorOptions) -> TestFcm {
    let emulator = FcmEmulator::start(any_port(), options)
        .await
        .expect("start emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("service-account.json");
    emulator
        .write_service_account(&key_file, project)
        .expect("write service account");
    let access_token = yup_token(&key_file).await;
    TestFcm {
        emulator,
        http: reqwest::Client::new(),
        project: project.to_owned(),
        access_token,
        key_file,
        _dir: dir,
    }
}

async fn yup_token(key_file: &Path) -> String {
    let key = yup_oauth2::read_service_account_key(key_file)
        .await
        .expect("read key file");
    let auth = yup_oauth2::ServiceAccountAuthenticator::builder(key)
        .build()
        .await
        .expect("authenticator");
    let token = auth.token(&[SCOPE]).await.expect("token from the emulator");
    token.token().expect("access token").to_owned()
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

impl TestFcm {
    fn send_url(&self) -> String {
        format!(
            "{}/v1/projects/{}/messages:send",
            self.emulator.url(),
            self.project
        )
    }

    async fn send(&self, body: &Value) -> Answer {
        self.send_with(&self.http, Some(&self.access_token), body)
            .await
    }

    async fn send_with(
        &self,
        http: &reqwest::Client,
        bearer: Option<&str>,
        body: &Value,
    ) -> Answer {
        let mut request = http.post(self.send_url()).json(body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        answer(request.send().await.expect("send request")).await
    }

    async fn send_to(&self, token: &str) -> Answer {
        self.send(
            &json!({"message": {"token": token, "notification": {"title": "Hi", "body": "There"}}}),
        )
        .await
    }

    fn statuses(&self) -> Vec<u16> {
        self.emulator
            .attempts(&self.project)
            .iter()
            .map(|a| a.status)
            .collect()
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.expect("JSON body");
    Answer {
        status,
        retry_after,
        body,
    }
}

fn assert_fixture(answer: &Answer, code: &str) {
    let (status, body, _) = fixture(code);
    assert_eq!(answer.status, status, "{code}: {}", answer.body);
    assert_eq!(answer.body, body, "{code}");
}

#[tokio::test]
async fn sends_without_a_valid_access_token_are_unauthenticated() {
    let fcm = spawn_fcm("auth-project", EmulatorOptions::default()).await;
    let message = json!({"message": {"token": "device-1"}});
    let no_header = fcm.send_with(&fcm.http, None, &message).await;
    assert_fixture(&no_header, "UNAUTHENTICATED_bad_oauth_token");
    let made_up = fcm
        .send_with(&fcm.http, Some("ya29.made-up"), &message)
        .await;
    assert_fixture(&made_up, "UNAUTHENTICATED_bad_oauth_token");
    // Auth comes before validation: an invalid message without a token is still a 401.
    let invalid = fcm
        .send_with(&fcm.http, None, &json!({"nonsense": 1}))
        .await;
    assert_fixture(&invalid, "UNAUTHENTICATED_bad_oauth_token");
    assert!(fcm.emulator.attempts(&fcm.project).is_empty());

    assert_eq!(fcm.send(&message).await.status, 200);
    fcm.emulator.revoke_access_tokens();
    assert_fixture(&fcm.send(&message).await, "UNAUTHENTICATED_bad_oauth_token");
    assert_eq!(fcm.statuses(), [200]);

    // A fresh token after the revocation works again.
    assert_eq!(fcm.emulator.tokens_issued(), 1);
    let fresh = yup_token(&fcm.key_file).await;
    assert_eq!(fcm.emulator.tokens_issued(), 2);
    assert_eq!(
        fcm.send_with(&fcm.http, Some(&fresh), &message)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn accepted_sends_are_recorded_and_listed() {
    let fcm = spawn_fcm("accept-project", EmulatorOptions::default()).await;
    let other = "accept-project-other";
    let message = json!({"token": "device-abcdefghijkl", "notification": {"title": "Hi", "body": "There"},
                         "data": {"initialPageName": "home", "parameterData": "{\"id\":1}"}});
    let sent = fcm.send(&json!({"message": message})).await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let name = sent.body["name"].as_str().expect("name").to_owned();
    assert!(
        name.starts_with("projects/accept-project/messages/0:"),
        "{name}"
    );
    let dry = fcm
        .send(&json!({"message": {"topic": "news"}, "validate_only": true}))
        .await;
    assert_eq!(
        dry.body,
        json!({"name": "projects/accept-project/messages/fake_message_id"})
    );
    let elsewhere = fcm
        .http
        .post(format!(
            "{}/v1/projects/{other}/messages:send",
            fcm.emulator.url()
        ))
        .bearer_auth(&fcm.access_token)
        .json(&json!({"message": {"token": "x"}}))
        .send()
        .await
        .expect("send");
    assert_eq!(elsewhere.status(), StatusCode::OK);
    assert_eq!(fcm.emulator.messages(other).len(), 1);

    let messages = fcm.emulator.messages("accept-project");
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].name, name);
    assert_eq!(messages[0].message, message);
    assert_eq!(messages[0].token.as_deref(), Some("device-abcdefghijkl"));
    assert!(!messages[0].validate_only);
    assert_eq!(messages[1].topic.as_deref(), Some("news"));
    assert!(messages[1].validate_only);

    let listed: Value = fcm
        .http
        .get(format!(
            "{}/emulator/messages?project=accept-project",
            fcm.emulator.url()
        ))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["name"], json!(name));
    assert_eq!(listed[0]["message"], message);
    assert_eq!(listed[0]["project"], "accept-project");
    let received = listed[0]["received_at"].as_str().expect("received_at");
    assert!(
        chrono::DateTime::parse_from_rfc3339(received).is_ok(),
        "{received}"
    );
    let all: Value = fcm
        .http
        .get(format!("{}/emulator/messages", fcm.emulator.url()))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON");
    assert_eq!(all.as_array().map(Vec::len), Some(3));
    let nobody: Value = fcm
        .http
        .get(format!(
            "{}/emulator/messages?project=nobody",
            fcm.emulator.url()
        ))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON");
    assert_eq!(nobody, json!([]));
}

#[tokio::test]
async fn invalid_messages_are_rejected_like_fcm() {
    let fcm = spawn_fcm("invalid-project", EmulatorOptions::default()).await;
    let bad_value = fcm
        .send(&json!({"message": {"token": "device-1", "data": {"a": 12}}}))
        .await;
    assert_fixture(&bad_value, "INVALID_ARGUMENT_bad_value");

    let field = |answer: &Answer| {
        assert_eq!(answer.status, 400, "{}", answer.body);
        assert_eq!(answer.body["error"]["status"], "INVALID_ARGUMENT");
        let violation = &answer.body["error"]["details"][0]["fieldViolations"][0];
        assert_eq!(violation["description"], answer.body["error"]["message"]);
        violation["field"].as_str().unwrap_or_default().to_owned()
    };
    let both = fcm
        .send(&json!({"message": {"token": "device-2", "topic": "news"}}))
        .await;
    assert_eq!(field(&both), "message");
    let big = fcm
        .send(&json!({"message": {"token": "device-3", "data": {"blob": "x".repeat(5000)}}}))
        .await;
    assert_eq!(field(&big), "message");
    let big_text = big.body["error"]["message"].as_str().unwrap_or_default();
    assert!(big_text.contains("4096"), "{big_text}");
    let unknown = fcm
        .send(&json!({"message": {"token": "device-4", "notification": {"title": "x", "colour": "red"}}}))
        .await;
    assert_eq!(field(&unknown), "message.notification");
    assert_eq!(
        unknown.body["error"]["message"],
        "Invalid JSON payload received. Unknown name \"colour\" at 'message.notification': Cannot find field."
    );
    let reserved = fcm
        .send(&json!({"message": {"token": "device-5", "data": {"google.sent": "x"}}}))
        .await;
    assert_eq!(field(&reserved), "message.data");
    let not_json = answer(
        fcm.http
            .post(fcm.send_url())
            .bearer_auth(&fcm.access_token)
            .body("{oops")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(field(&not_json), "message");

    assert!(fcm.emulator.messages(&fcm.project).is_empty());
    let attempts = fcm.emulator.attempts(&fcm.project);
    assert_eq!(
        attempts.iter().map(|a| a.status).collect::<Vec<_>>(),
        [400; 6]
    );
    assert_eq!(attempts[0].token.as_deref(), Some("device-1"));
    assert_eq!(attempts[4].token.as_deref(), Some("device-5"));
}

#[tokio::test]
async fn permanent_scripts_answer_with_the_fixtures() {
    let fcm = spawn_fcm("script-project", EmulatorOptions::default()).await;
    let cases = [
        (Script::Unregistered, "UNREGISTERED"),
        (Script::InvalidToken, "INVALID_ARGUMENT_bad_token"),
        (Script::SenderIdMismatch, "SENDER_ID_MISMATCH"),
        (Script::ThirdPartyAuthError, "THIRD_PARTY_AUTH_ERROR"),
    ];
    for (script, code) in cases {
        let token = format!("token-{code}");
        fcm.emulator.script(&token, script);
        for _ in 0..2 {
            assert_fixture(&fcm.send_to(&token).await, code);
        }
    }
    // Unscripted tokens and a replaced script are plain successes.
    assert_eq!(fcm.send_to("token-plain").await.status, 200);
    fcm.emulator
        .script("token-UNREGISTERED", Script::Internal { times: 0 });
    assert_eq!(fcm.send_to("token-UNREGISTERED").await.status, 200);
    assert_eq!(
        fcm.statuses(),
        [404, 404, 400, 400, 403, 403, 401, 401, 200, 200]
    );
}

#[tokio::test]
async fn counting_scripts_fail_then_succeed() {
    let fcm = spawn_fcm("retry-project", EmulatorOptions::default()).await;
    let (_, _, fixture_quota_retry) = fixture("QUOTA_EXCEEDED");
    fcm.emulator.script(
        "quota",
        Script::QuotaExceeded {
            retry_after_secs: 60,
            times: 2,
        },
    );
    for _ in 0..2 {
        let answer = fcm.send_to("quota").await;
        assert_fixture(&answer, "QUOTA_EXCEEDED");
        assert_eq!(answer.retry_after, fixture_quota_retry);
    }
    assert_eq!(fcm.send_to("quota").await.status, 200);

    let (_, _, fixture_unavailable_retry) = fixture("UNAVAILABLE");
    fcm.emulator.script(
        "busy",
        Script::Unavailable {
            times: 1,
            retry_after_secs: Some(5),
        },
    );
    let busy = fcm.send_to("busy").await;
    assert_fixture(&busy, "UNAVAILABLE");
    assert_eq!(busy.retry_after, fixture_unavailable_retry);
    assert_eq!(fcm.send_to("busy").await.status, 200);
    fcm.emulator.script(
        "busy-quiet",
        Script::Unavailable {
            times: 1,
            retry_after_secs: None,
        },
    );
    assert_eq!(fcm.send_to("busy-quiet").await.retry_after, None);

    fcm.emulator.script("broken", Script::Internal { times: 3 });
    for _ in 0..3 {
        let broken = fcm.send_to("broken").await;
        assert_fixture(&broken, "INTERNAL");
        assert_eq!(broken.retry_after, None);
    }
    assert_eq!(fcm.send_to("broken").await.status, 200);

    let attempts = fcm.emulator.attempts(&fcm.project);
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [429, 429, 200, 503, 200, 503, 500, 500, 500, 200]);
    assert!(attempts.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(fcm.emulator.messages(&fcm.project).len(), 3);
}

#[tokio::test]
async fn latency_script_delays_a_success() {
    let fcm = spawn_fcm("latency-project", EmulatorOptions::default()).await;
    fcm.emulator
        .script("slow", Script::Latency(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(fcm.send_to("slow").await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(fcm.emulator.messages(&fcm.project).len(), 1);
}

#[tokio::test]
async fn scripts_can_be_set_over_http() {
    let fcm = spawn_fcm("http-script-project", EmulatorOptions::default()).await;
    let script_url = |token: &str| format!("{}/emulator/tokens/{token}", fcm.emulator.url());
    let set = |token: &str, body: Value| fcm.http.post(script_url(token)).json(&body).send();

    let done = set("dead", json!({"answer": "UNREGISTERED"}))
        .await
        .expect("script");
    assert!(done.status().is_success(), "{}", done.status());
    assert_fixture(&fcm.send_to("dead").await, "UNREGISTERED");
    let cleared = fcm
        .http
        .delete(script_url("dead"))
        .send()
        .await
        .expect("clear");
    assert!(cleared.status().is_success());
    assert_eq!(fcm.send_to("dead").await.status, 200);

    set(
        "busy",
        json!({"answer": "QUOTA_EXCEEDED", "retry_after_secs": 60, "times": 1}),
    )
    .await
    .expect("script");
    let quota = fcm.send_to("busy").await;
    assert_fixture(&quota, "QUOTA_EXCEEDED");
    assert_eq!(quota.retry_after.as_deref(), Some("60"));
    assert_eq!(fcm.send_to("busy").await.status, 200);

    let http_cases = [
        (
            json!({"answer": "UNAVAILABLE", "times": 2}),
            "UNAVAILABLE",
            2,
        ),
        (json!({"answer": "INTERNAL", "times": 1}), "INTERNAL", 1),
        (
            json!({"answer": "INVALID_TOKEN"}),
            "INVALID_ARGUMENT_bad_token",
            2,
        ),
        (
            json!({"answer": "SENDER_ID_MISMATCH"}),
            "SENDER_ID_MISMATCH",
            2,
        ),
        (
            json!({"answer": "THIRD_PARTY_AUTH_ERROR"}),
            "THIRD_PARTY_AUTH_ERROR",
            2,
        ),
    ];
    for (body, code, failures) in http_cases {
        set(code, body).await.expect("script");
        for _ in 0..failures {
            assert_fixture(&fcm.send_to(code).await, code);
        }
    }
    assert_eq!(fcm.send_to("UNAVAILABLE").await.status, 200);
    assert_eq!(fcm.send_to("INTERNAL").await.status, 200);

    set("slow", json!({"answer": "LATENCY", "millis": 200}))
        .await
        .expect("script");
    let started = Instant::now();
    assert_eq!(fcm.send_to("slow").await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));

    let unknown = set("x", json!({"answer": "EXPLODE"}))
        .await
        .expect("script");
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let text = unknown.text().await.expect("body");
    for valid in ["UNREGISTERED", "QUOTA_EXCEEDED", "LATENCY"] {
        assert!(text.contains(valid), "{text}");
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_clients_are_served() {
    let fcm = spawn_fcm("h2-project", EmulatorOptions::default()).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = h2
        .post(fcm.send_url())
        .bearer_auth(&fcm.access_token)
        .json(&json!({"message": {"token": "device-h2"}}))
        .send()
        .await
        .expect("h2c send");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    fcm.emulator.script("device-h2", Script::Unregistered);
    assert_fixture(
        &fcm.send_with(
            &h2,
            Some(&fcm.access_token),
            &json!({"message": {"token": "device-h2"}}),
        )
        .await,
        "UNREGISTERED",
    );
    assert_eq!(fcm.statuses(), [200, 404]);
}

#[tokio::test]
async fn http1_only_mode_serves_http1_and_refuses_h2c() {
    let fcm = spawn_fcm("h1-project", EmulatorOptions::default().http1_only()).await;
    // The token came over HTTP/1.1 (yup-oauth2); so does a send.
    assert_eq!(fcm.send_to("device-h1").await.status, 200);
    let accepted = fcm.emulator.messages("h1-project");
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].http_version, "HTTP/1.1");
    // HTTP/2 with prior knowledge is not understood.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let refused = h2
        .post(fcm.send_url())
        .bearer_auth(&fcm.access_token)
        .json(&json!({"message": {"token": "device-h2"}}))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(fcm.emulator.stats().http2, 0);
    assert_eq!(fcm.emulator.messages("h1-project").len(), 1);
}

/// A JWT-bearer form body for `claims`, signed with `key`.
fn assertion_form(key: &aws_lc_rs::rsa::KeyPair, claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let mut signature = vec![0; key.public_modulus_len()];
    key.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("sign");
    let jwt = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature));
    format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={jwt}")
}

#[tokio::test]
async fn token_endpoint_refuses_bad_grants() {
    let fcm = spawn_fcm("grant-project", EmulatorOptions::default()).await;
    let post = |body: String| {
        fcm.http
            .post(fcm.emulator.token_uri())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let refused = |response: reqwest::Response| async move {
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Value = response.json().await.expect("JSON");
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{body}"
        );
        body["error"].as_str().unwrap_or_default().to_owned()
    };

    let garbage =
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=not.a.jwt";
    assert_eq!(
        refused(post(garbage.into()).await.expect("post")).await,
        "invalid_grant"
    );
    let wrong_grant = "grant_type=client_credentials&assertion=x";
    assert_eq!(
        refused(post(wrong_grant.into()).await.expect("post")).await,
        "unsupported_grant_type"
    );

    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": "ffpush@grant-project.iam.gserviceaccount.com", "aud": fcm.emulator.token_uri(),
                        "iat": now, "exp": now + 3000, "scope": SCOPE});
    let stranger =
        aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("keygen");
    let unregistered = post(assertion_form(&stranger, &claims))
        .await
        .expect("post");
    assert_eq!(refused(unregistered).await, "invalid_grant");

    // The same claims signed with the key from the service-account file are accepted.
    let file: Value =
        serde_json::from_slice(&std::fs::read(&fcm.key_file).expect("key file")).expect("JSON");
    assert_eq!(file["type"], "service_account");
    assert_eq!(file["token_uri"], json!(fcm.emulator.token_uri()));
    assert_eq!(
        file["client_email"],
        "ffpush@grant-project.iam.gserviceaccount.com"
    );
    let pem = file["private_key"].as_str().expect("private_key");
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(der)
        .expect("PEM body");
    let trusted = aws_lc_rs::rsa::KeyPair::from_pkcs8(&der).expect("PKCS#8 key");
    let accepted = post(assertion_form(&trusted, &claims)).await.expect("post");
    assert_eq!(accepted.status(), StatusCode::OK);
    let body: Value = accepted.json().await.expect("JSON");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let token = body["access_token"].as_str().expect("access_token");
    assert_eq!(
        fcm.send_with(&fcm.http, Some(token), &json!({"message": {"token": "t"}}))
            .await
            .status,
        200
    );
    assert_eq!(fcm.emulator.tokens_issued(), 2);
}

#[tokio::test]
async fn access_tokens_expire_after_their_lifetime() {
    let options = EmulatorOptions {
        token_lifetime: Duration::from_secs(1),
        ..EmulatorOptions::default()
    };
    let fcm = spawn_fcm("expiry-project", options).await;
    let message = json!({"message": {"token": "device-1"}});
    // The token was fetched during setup; on a loaded machine that may already be a second ago.
    let fresh = yup_token(&fcm.key_file).await;
    let first = fcm.send_with(&fcm.http, Some(&fresh), &message).await;
    assert!(
        first.status == 200 || first.status == 401,
        "{}",
        first.status
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_fixture(
        &fcm.send_with(&fcm.http, Some(&fresh), &message).await,
        "UNAUTHENTICATED_bad_oauth_token",
    );
}

#[tokio::test]
async fn unknown_routes_answer_404_json() {
    let fcm = spawn_fcm("route-project", EmulatorOptions::default()).await;
    let base = fcm.emulator.url();
    let requests = [
        fcm.http.get(format!("{base}/nowhere")),
        fcm.http.get(fcm.send_url()),
        fcm.http
            .post(format!(
                "{base}/v1/projects/route-project/messages:batchSend"
            ))
            .bearer_auth(&fcm.access_token),
    ];
    for request in requests {
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["status"], "NOT_FOUND");
    }
}

fn shared_emulator() -> &'static FcmEmulator {
    static SHARED: OnceLock<FcmEmulator> = OnceLock::new();
    SHARED.get_or_init(|| {
        FcmEmulator::start_on_thread(any_port(), EmulatorOptions::default()).expect("start")
    })
}

/// Two tests on their own runtimes share one emulator started on its own thread.
async fn send_through_shared(project: &str) {
    let emulator = shared_emulator();
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("sa.json");
    emulator
        .write_service_account(&key_file, project)
        .expect("key");
    let token = yup_token(&key_file).await;
    let response = reqwest::Client::new()
        .post(format!(
            "{}/v1/projects/{project}/messages:send",
            emulator.url()
        ))
        .bearer_auth(token)
        .json(&json!({"message": {"token": format!("{project}-device")}}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let messages = emulator.messages(project);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].token, Some(format!("{project}-device")));
}

#[tokio::test]
async fn shared_emulator_on_its_own_thread_a() {
    send_through_shared("shared-a").await;
}

#[tokio::test]
async fn shared_emulator_on_its_own_thread_b() {
    send_through_shared("shared-b").await;
}

#[test]
fn start_on_thread_from_sync_code_and_shutdown() {
    let emulator =
        FcmEmulator::start_on_thread(any_port(), EmulatorOptions::default()).expect("start");
    assert!(emulator.url().starts_with("http://127.0.0.1:"));
    assert_eq!(emulator.token_uri(), format!("{}/token", emulator.url()));
    assert_eq!(
        emulator.addr().port(),
        emulator
            .url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    );
    let reachable = || std::net::TcpStream::connect(emulator.addr()).is_ok();
    assert!(reachable());
    emulator.shutdown();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reachable() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!reachable(), "still accepting connections after shutdown");
}

/// A CA and a `localhost`/`127.0.0.1` certificate it signed: (CA PEM, leaf PEM, leaf key PEM).
pub(crate) fn test_certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))
        .expect("leaf");
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

#[tokio::test]
async fn https_mode_negotiates_h2_and_ffpush_trusts_it_through_fcm_ca_cert() {
    use ffpush::config::{Settings, SettingsArgs};
    use ffpush::fcm::{Outcome, Sender};

    let (ca, cert, key) = test_certificates();
    let emulator = FcmEmulator::start_tls(
        any_port(),
        EmulatorOptions::default(),
        cert.as_bytes(),
        key.as_bytes(),
    )
    .await
    .expect("start the HTTPS emulator");
    assert!(emulator.url().starts_with("https://127.0.0.1:"));
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("service-account.json");
    emulator
        .write_service_account(&key_file, "tls-project")
        .expect("write service account");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).expect("write CA");
    let args = |ca: Option<&Path>| SettingsArgs {
        credentials: Some(key_file.display().to_string()),
        fcm_endpoint: Some(emulator.url()),
        fcm_ca_cert: ca.map(|p| p.display().to_string()),
        ..Default::default()
    };

    // Settings as `ffpush run` reads them; the OAuth2 token comes over HTTPS too.
    let settings = Settings::from_args(&args(Some(&ca_file))).expect("settings");
    let sender = Sender::new(&settings).await.expect("sender");
    let body = r#"{"message":{"token":"device-tls","notification":{"title":"Hi","body":"There"}}}"#;
    assert_eq!(sender.send(body.into()).await.ok(), Some(Outcome::Sent));
    let accepted = emulator.messages("tls-project");
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].token.as_deref(), Some("device-tls"));
    assert_eq!(accepted[0].http_version, "HTTP/2.0", "h2 chosen by ALPN");
    assert_eq!(emulator.stats().http2, emulator.stats().attempts);

    // Without the extra root the self-signed chain is refused, and nothing is sent.
    let untrusting = Settings::from_args(&args(None)).expect("settings");
    let sender = Sender::new(&untrusting).await.expect("sender");
    assert!(sender.send(body.into()).await.is_err());
    assert_eq!(emulator.messages("tls-project").len(), 1);
}

#[tokio::test]
async fn count_only_mode_keeps_no_messages_but_counts() {
    let fcm = spawn_fcm(
        "count-project",
        EmulatorOptions {
            record: false,
            ..EmulatorOptions::default()
        },
    )
    .await;
    assert_eq!(fcm.send_to("device-1").await.status, 200);
    fcm.emulator.script("device-2", Script::Unregistered);
    assert_eq!(fcm.send_to("device-2").await.status, 404);
    assert!(fcm.emulator.messages("count-project").is_empty());
    assert!(fcm.emulator.attempts("count-project").is_empty());
    let stats = fcm.emulator.stats();
    assert_eq!((stats.accepted, stats.attempts), (1, 2));
    let over_http: Value = fcm
        .http
        .get(format!("{}/emulator/stats", fcm.emulator.url()))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON");
    assert_eq!(over_http["accepted"], 1);
}

/// The QUOTA_EXCEEDED body FCM answers (tests/fixtures/fcm_errors.json), written out here.
fn quota_exceeded_body() -> Value {
    json!({"error": {
        "code": 429,
        "message": "Quota exceeded for quota metric 'Send requests'.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "QUOTA_EXCEEDED"},
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"subject": "project", "description": "Message rate exceeded"}]},
        ],
    }})
}

/// A send request head for a raw h2 client; the body follows on the stream.
fn h2_request(fcm: &TestFcm) -> axum::http::Request<()> {
    axum::http::Request::post(fcm.send_url())
        .header("authorization", format!("Bearer {}", fcm.access_token))
        .header("content-type", "application/json")
        .body(())
        .expect("request head")
}

fn h2_body(token: &str) -> bytes::Bytes {
    bytes::Bytes::from(json!({"message": {"token": token}}).to_string())
}

/// Sends one message on an h2 connection and returns the status.
async fn h2_send(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    fcm: &TestFcm,
    token: &str,
) -> u16 {
    let (response, mut body) = client
        .send_request(h2_request(fcm), false)
        .expect("stream opened");
    body.send_data(h2_body(token), true).expect("body sent");
    response.await.expect("answer").status().as_u16()
}

#[tokio::test]
async fn http2_connections_advertise_the_stream_limit_and_refuse_streams_beyond_it() {
    // Google's front ends advertise 100 streams per connection; so does the emulator by default.
    let fcm = spawn_fcm("streams-project", EmulatorOptions::default()).await;
    let tcp = tokio::net::TcpStream::connect(fcm.emulator.addr())
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(connection);
    // Once one exchange is done the server's SETTINGS have been read.
    assert_eq!(h2_send(&mut client, &fcm, "device-0").await, 200);
    assert_eq!(client.current_max_send_streams(), 100);

    // A client that ignores the limit: h2 assumes no limit until the server's SETTINGS are
    // read, so streams opened before the connection is first polled all go out. Request
    // bodies are held back so that every accepted stream stays open.
    let fcm = spawn_fcm("refused-project", EmulatorOptions::default().max_streams(4)).await;
    let tcp = tokio::net::TcpStream::connect(fcm.emulator.addr())
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    let mut streams = Vec::new();
    for _ in 0..6 {
        streams.push(
            client
                .send_request(h2_request(&fcm), false)
                .expect("stream opened"),
        );
    }
    tokio::spawn(connection);
    let mut statuses = Vec::new();
    let mut refused = 0;
    // The two streams past the limit are refused while the first four are still open.
    for (response, _body) in streams.drain(4..) {
        let error = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("refused in time")
            .expect_err("a stream past the limit is refused");
        assert_eq!(error.reason(), Some(h2::Reason::REFUSED_STREAM), "{error}");
        assert!(error.is_reset() && error.is_remote(), "{error}");
        refused += 1;
    }
    for (i, (response, mut body)) in streams.into_iter().enumerate() {
        body.send_data(h2_body(&format!("device-{i}")), true)
            .expect("body sent");
        statuses.push(response.await.expect("answer").status().as_u16());
    }
    assert_eq!((statuses, refused), (vec![200; 4], 2));
    assert_eq!(client.current_max_send_streams(), 4);
    // Refused streams were never processed: only the four accepted sends reached FCM.
    assert_eq!(fcm.emulator.attempts(&fcm.project).len(), 4);
    // The limit is on streams open at once, not on the connection's total.
    assert_eq!(h2_send(&mut client, &fcm, "device-later").await, 200);
}

#[tokio::test]
async fn connections_are_closed_with_goaway_after_the_configured_sends() {
    let fcm = spawn_fcm("goaway-project", EmulatorOptions::default().goaway_after(2)).await;
    let tcp = tokio::net::TcpStream::connect(fcm.emulator.addr())
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    let connection = tokio::spawn(connection);
    assert_eq!(h2_send(&mut client, &fcm, "device-1").await, 200);
    assert_eq!(h2_send(&mut client, &fcm, "device-2").await, 200);
    // The second send was the last: the server says GOAWAY and the connection ends cleanly.
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the connection ends after GOAWAY")
        .expect("connection task");
    assert!(ended.is_ok(), "{ended:?}");
    let error = client
        .send_request(h2_request(&fcm), true)
        .expect_err("no new stream after GOAWAY");
    assert!(error.is_go_away() || error.is_io(), "{error}");
    assert_eq!(fcm.emulator.messages(&fcm.project).len(), 2);
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let latency = Duration::from_millis(300);
    let fcm = spawn_fcm(
        "slow-project",
        EmulatorOptions::default().latency(latency, Duration::from_millis(100)),
    )
    .await;
    for token in ["device-1", "device-2", "device-3"] {
        let started = Instant::now();
        assert_eq!(fcm.send_to(token).await.status, 200);
        // latency ± jitter: never faster than latency − jitter.
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
    // Errors take as long as successes.
    fcm.emulator.script("dead", Script::Unregistered);
    let started = Instant::now();
    assert_eq!(fcm.send_to("dead").await.status, 404);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn beyond_the_quota_sends_are_answered_429_with_retry_after() {
    let window = Duration::from_secs(3);
    let fcm = spawn_fcm("quota-project", EmulatorOptions::default().quota(3, window)).await;
    // Send until the quota is used up (a window may end in between on a slow machine).
    let mut refusal = None;
    for i in 0..12 {
        let answer = fcm.send_to(&format!("device-{i}")).await;
        if answer.status != 200 {
            refusal = Some(answer);
            break;
        }
    }
    let refusal = refusal.expect("a send beyond the quota is refused");
    assert_eq!(refusal.status, 429);
    assert_eq!(refusal.body, quota_exceeded_body());
    let retry_after: u64 = refusal
        .retry_after
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(
        (1..=window.as_secs()).contains(&retry_after),
        "{retry_after}"
    );
    let windows = fcm.emulator.quota_windows(&fcm.project);
    assert!(windows.iter().all(|w| w.admitted <= 3), "{windows:?}");
    assert_eq!(windows.iter().map(|w| w.refused).sum::<u64>(), 1);
    assert_eq!(
        windows.last().map(|w| (w.admitted, w.refused)),
        Some((3, 1))
    );
    // Other projects have quotas of their own.
    let other = fcm
        .http
        .post(format!(
            "{}/v1/projects/other-project/messages:send",
            fcm.emulator.url()
        ))
        .bearer_auth(&fcm.access_token)
        .json(&json!({"message": {"token": "device-x"}}))
        .send()
        .await
        .expect("send");
    assert_eq!(other.status(), StatusCode::OK);
    // After Retry-After the next window takes sends again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(fcm.send_to("device-next").await.status, 200);
    let statuses = fcm.statuses();
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 1);
    assert_eq!(statuses.last(), Some(&200));
}

/// A bad day on demand: an outage (every send 503 UNAVAILABLE, FCM's body) and a token whose
/// sends are held unanswered, both started and ended over HTTP or through the handle.
#[tokio::test]
async fn an_outage_and_a_hung_token_are_caused_and_ended_on_demand() {
    let fcm = spawn_fcm("http-fault-project", EmulatorOptions::default()).await;
    let outage_url = format!("{}/emulator/outage", fcm.emulator.url());
    let started = fcm
        .http
        .post(&outage_url)
        .json(&json!({"secs": 600, "retry_after_secs": 5}))
        .send()
        .await
        .expect("outage");
    assert_eq!(started.status(), StatusCode::NO_CONTENT);
    for token in ["device-1", "device-2"] {
        let during = fcm.send_to(token).await;
        assert_fixture(&during, "UNAVAILABLE");
        assert_eq!(during.retry_after.as_deref(), Some("5"));
    }
    let ended = fcm.http.delete(&outage_url).send().await.expect("end");
    assert_eq!(ended.status(), StatusCode::NO_CONTENT);
    assert_eq!(fcm.send_to("device-1").await.status, 200);
    let bad = fcm
        .http
        .post(&outage_url)
        .json(&json!({"seconds": 1}))
        .send()
        .await
        .expect("bad outage");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    fcm.emulator.outage(Duration::from_secs(600));
    let during = fcm.send_to("device-2").await;
    assert_fixture(&during, "UNAVAILABLE");
    assert_eq!(during.retry_after, None);
    fcm.emulator.end_outage();
    assert_eq!(fcm.send_to("device-2").await.status, 200);
    assert_eq!(fcm.statuses(), [503, 503, 200, 503, 200]);

    let script_url = format!("{}/emulator/tokens/stuck", fcm.emulator.url());
    let set = fcm
        .http
        .post(&script_url)
        .json(&json!({"answer": "HANG"}))
        .send()
        .await
        .expect("script");
    assert!(set.status().is_success());
    let held = fcm.send_to("stuck");
    tokio::pin!(held);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut held)
            .await
            .is_err(),
        "a hung token's send is not answered"
    );
    assert_eq!(fcm.send_to("device-1").await.status, 200, "others are");
    let cleared = fcm.http.delete(&script_url).send().await.expect("clear");
    assert!(cleared.status().is_success());
    assert_eq!(
        held.await.status,
        200,
        "answered once the script is cleared"
    );
    let stuck: Vec<u16> = fcm
        .emulator
        .attempts(&fcm.project)
        .iter()
        .filter(|a| a.token.as_deref() == Some("stuck"))
        .map(|a| a.status)
        .collect();
    assert_eq!(
        stuck,
        [0, 200],
        "listed unanswered when held, then answered"
    );
}
