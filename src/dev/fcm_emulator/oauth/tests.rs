use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::RSA_PKCS1_SHA256;

use super::*;

const PORT: u16 = 4321;
const NOW: i64 = 1_700_000_000;

fn claims() -> Value {
    json!({
        "iss": "ffpush@p.iam.gserviceaccount.com",
        "aud": format!("http://127.0.0.1:{PORT}/token"),
        "iat": NOW,
        "exp": NOW + 3595,
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
    })
}

fn jwt(key: &KeyPair, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        BASE64URL.encode(header.to_string()),
        BASE64URL.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("signing");
    format!("{input}.{}", BASE64URL.encode(signature))
}

fn form(assertion: &str) -> Vec<u8> {
    let escaped: String = assertion.replace('=', "%3D");
    format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={escaped}")
        .into_bytes()
}

struct Keys {
    trusted: KeyPair,
    stranger: KeyPair,
}

fn keys() -> Keys {
    Keys {
        trusted: KeyPair::generate(KeySize::Rsa2048).expect("keygen"),
        stranger: KeyPair::generate(KeySize::Rsa2048).expect("keygen"),
    }
}

fn grant(keys: &Keys, signer: &KeyPair, header: Value, claims: Value) -> Result<(), GrantError> {
    let registered = vec![keys.trusted.public_key().as_ref().to_vec()];
    check_grant(
        &form(&jwt(signer, &header, &claims)),
        &registered,
        PORT,
        NOW,
    )
}

fn rs256() -> Value {
    json!({"alg": "RS256", "typ": "JWT"})
}

#[test]
fn grants() {
    let keys = keys();
    let k = &keys.trusted;
    assert_eq!(grant(&keys, k, rs256(), claims()), Ok(()));

    let mut localhost = claims();
    localhost["aud"] = json!(format!("http://localhost:{PORT}/token"));
    assert_eq!(grant(&keys, k, rs256(), localhost), Ok(()));

    let mut cloud = claims();
    cloud["scope"] = json!("openid https://www.googleapis.com/auth/cloud-platform");
    assert_eq!(grant(&keys, k, rs256(), cloud), Ok(()));

    assert_eq!(
        grant(&keys, &keys.stranger, rs256(), claims()),
        Err(GrantError::Signature)
    );
    assert!(matches!(
        grant(&keys, k, json!({"alg": "HS256"}), claims()),
        Err(GrantError::Header(_))
    ));

    let refused = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims();
        edit(&mut c);
        grant(&keys, k, rs256(), c)
    };
    let claim_errors: [&dyn Fn(&mut Value); 8] = [
        &|c| c["aud"] = json!("https://oauth2.googleapis.com/token"),
        &|c| c["aud"] = json!(format!("http://127.0.0.1:{}/token", PORT + 1)),
        &|c| c["aud"] = json!(format!("http://127.0.0.1:{PORT}/tokens")),
        &|c| c["exp"] = json!(NOW - 1),
        &|c| c["iat"] = json!(NOW + 3600),
        &|c| c["scope"] = json!("https://www.googleapis.com/auth/pubsub"),
        &|c| c["iss"] = json!(""),
        &|c| {
            c.as_object_mut().map(|o| o.remove("exp"));
        },
    ];
    for edit in claim_errors {
        assert!(matches!(refused(edit), Err(GrantError::Claims(_))));
    }
}

#[test]
fn tampered_and_malformed_assertions() {
    let keys = keys();
    let registered = vec![keys.trusted.public_key().as_ref().to_vec()];
    let token = jwt(&keys.trusted, &rs256(), &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut other = claims();
    other["iss"] = json!("someone-else@x.iam.gserviceaccount.com");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        BASE64URL.encode(other.to_string()),
        parts[2]
    );
    assert_eq!(
        check_grant(&form(&tampered), &registered, PORT, NOW),
        Err(GrantError::Signature)
    );

    for garbage in ["", "abc", "a.b", "a.b.c.d", "!!.??.**"] {
        assert_eq!(
            check_grant(&form(garbage), &registered, PORT, NOW),
            Err(GrantError::Malformed),
            "{garbage:?}"
        );
    }
    assert_eq!(
        check_grant(b"grant_type=password&assertion=x", &registered, PORT, NOW),
        Err(GrantError::UnsupportedGrantType("password".into()))
    );
    let no_assertion = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";
    assert_eq!(
        check_grant(no_assertion, &registered, PORT, NOW),
        Err(GrantError::MissingAssertion)
    );
    // Nothing registered yet: even a well-formed assertion is refused.
    assert_eq!(
        check_grant(&form(&token), &[], PORT, NOW),
        Err(GrantError::Signature)
    );
}

#[test]
fn form_decoding() {
    let form = parse_form(b"a=1%2B1+2&b=%3d%zz%&c&=x");
    assert_eq!(form.get("a").map(String::as_str), Some("1+1 2"));
    assert_eq!(form.get("b").map(String::as_str), Some("=%zz%"));
    assert_eq!(form.get("c").map(String::as_str), Some(""));
}

#[test]
fn pem_is_wrapped_at_64_columns() {
    let text = pem("PRIVATE KEY", &[7u8; 100]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"-----BEGIN PRIVATE KEY-----"));
    assert_eq!(lines.last(), Some(&"-----END PRIVATE KEY-----"));
    assert_eq!(lines[1].len(), 64);
    assert_eq!(
        STANDARD.decode(lines[1..lines.len() - 1].concat()).ok(),
        Some(vec![7u8; 100])
    );
}

#[test]
fn access_tokens_expire_and_are_revoked() {
    let mut credentials = Credentials::default();
    let live = credentials.issue(Duration::from_secs(3600));
    let dead = credentials.issue(Duration::ZERO);
    assert_ne!(live, dead);
    assert_eq!(credentials.issued(), 2);
    assert!(credentials.accepts(&live));
    assert!(!credentials.accepts(&dead));
    assert!(!credentials.accepts("ya29.made-up"));
    credentials.revoke_all();
    assert!(!credentials.accepts(&live));
    assert_eq!(credentials.issued(), 2);
}
