use serde_json::{Value, json};

use super::*;

fn check(request: Value) -> Result<SendRequest, Violation> {
    send_request(request.to_string().as_bytes())
}

fn rejected(request: Value) -> Violation {
    match check(request) {
        Ok(accepted) => panic!("accepted: {accepted:?}"),
        Err(violation) => violation,
    }
}

fn field(request: Value) -> Option<String> {
    rejected(request).field
}

/// A token message padded through `data.pad` so its counted payload is exactly `size` bytes.
fn message_of_size(target: (&str, &str), size: usize) -> Value {
    let mut message = json!({"notification": {"title": "t", "body": "b"}, "data": {"pad": ""}});
    let base = payload_size(message.as_object().expect("literal object"));
    message["data"]["pad"] = json!("x".repeat(size - base));
    message[target.0] = json!(target.1);
    json!({"message": message})
}

#[test]
fn a_flutterflow_message_passes() {
    let accepted = check(json!({"message": {
        "token": "tok-1",
        "notification": {"title": "Hi", "body": "There", "image": "https://x/y.png"},
        "data": {"initialPageName": "home", "parameterData": "{}"},
        "android": {"notification": {"sound": "default"}, "ttl": "3600s", "priority": "HIGH"},
        "apns": {"payload": {"aps": {"sound": "default"}, "extra": [1, 2]}, "headers": {"apns-priority": "10"}},
    }}))
    .expect("valid");
    assert_eq!(accepted.token.as_deref(), Some("tok-1"));
    assert_eq!(accepted.topic, None);
    assert!(!accepted.validate_only);
    assert_eq!(accepted.message["data"]["initialPageName"], "home");
}

#[test]
fn validate_only_is_read() {
    let accepted =
        check(json!({"message": {"topic": "news"}, "validate_only": true})).expect("valid");
    assert!(accepted.validate_only);
    assert_eq!(accepted.topic.as_deref(), Some("news"));
    assert_eq!(
        field(json!({"message": {"topic": "news"}, "validate_only": "yes"})).as_deref(),
        Some("validate_only")
    );
}

#[test]
fn non_json_and_missing_message() {
    let garbage = send_request(b"{not json").expect_err("garbage");
    assert_eq!(garbage.field.as_deref(), Some("message"));
    assert_eq!(field(json!({})).as_deref(), Some("message"));
    assert_eq!(
        field(json!({"message": "hello"})).as_deref(),
        Some("message")
    );
    assert_eq!(field(json!([1])).as_deref(), Some("message"));
}

#[test]
fn non_string_data_value_matches_the_fixture() {
    let violation = rejected(json!({"message": {"token": "t", "data": {"a": 12}}}));
    let fixture = json!({"error": {"code": 400, "message": "Invalid value at 'message.data[0].value' (TYPE_STRING), 12", "status": "INVALID_ARGUMENT",
      "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message.data[0].value", "description": "Invalid value at 'message.data[0].value' (TYPE_STRING), 12"}]}]}});
    assert_eq!(violation.body(), fixture);
}

#[test]
fn data_values_are_indexed_in_key_order() {
    let violation =
        rejected(json!({"message": {"token": "t", "data": {"a": "1", "b": "2", "c": true}}}));
    assert_eq!(violation.field.as_deref(), Some("message.data[2].value"));
    assert_eq!(
        violation.description,
        "Invalid value at 'message.data[2].value' (TYPE_STRING), true"
    );
    assert_eq!(
        field(json!({"message": {"token": "t", "data": ["a"]}})).as_deref(),
        Some("message.data")
    );
}

#[test]
fn unknown_fields_are_rejected_at_every_level() {
    let top = rejected(json!({"message": {"token": "t"}, "dry_run": true}));
    assert_eq!(top.field, None);
    assert_eq!(
        top.description,
        "Invalid JSON payload received. Unknown name \"dry_run\": Cannot find field."
    );

    let cases = [
        (
            json!({"message": {"token": "t", "priority": "high"}}),
            "message",
        ),
        (
            json!({"message": {"token": "t", "notification": {"title": "x", "sound": "d"}}}),
            "message.notification",
        ),
        (
            json!({"message": {"token": "t", "android": {"sound": "d"}}}),
            "message.android",
        ),
        (
            json!({"message": {"token": "t", "android": {"notification": {"badge": "1"}}}}),
            "message.android.notification",
        ),
        (
            json!({"message": {"token": "t", "apns": {"aps": {}}}}),
            "message.apns",
        ),
        (
            json!({"message": {"token": "t", "webpush": {"link": "x"}}}),
            "message.webpush",
        ),
        (
            json!({"message": {"token": "t", "fcm_options": {"label": "x"}}}),
            "message.fcm_options",
        ),
    ];
    for (request, path) in cases {
        assert_eq!(field(request).as_deref(), Some(path));
    }

    let violation =
        rejected(json!({"message": {"token": "t", "notification": {"title": "x", "sound": "d"}}}));
    assert_eq!(
        violation.description,
        "Invalid JSON payload received. Unknown name \"sound\" at 'message.notification': Cannot find field."
    );
}

#[test]
fn every_android_notification_field_is_known() {
    let notification: Map<String, Value> = ANDROID_NOTIFICATION
        .iter()
        .map(|k| (k.to_string(), json!("x")))
        .collect();
    check(json!({"message": {"token": "t", "android": {"notification": notification}}}))
        .expect("valid");
}

#[test]
fn exactly_one_target() {
    assert_eq!(
        field(json!({"message": {"notification": {"title": "x"}}})).as_deref(),
        Some("message")
    );
    let both = rejected(json!({"message": {"token": "t", "topic": "news"}}));
    assert_eq!(both.field.as_deref(), Some("message"));
    assert!(
        both.description
            .starts_with("Exactly one of token, topic or condition"),
        "{}",
        both.description
    );
    assert!(field(json!({"message": {"topic": "a", "condition": "'a' in topics"}})).is_some());
    check(json!({"message": {"condition": "'a' in topics"}})).expect("condition alone");
    assert_eq!(
        field(json!({"message": {"token": 5}})).as_deref(),
        Some("message.token")
    );
}

#[test]
fn reserved_data_keys() {
    for key in [
        "from",
        "gcm",
        "notification",
        "message_type",
        "google.c.a",
        "gcm.n.e",
    ] {
        let violation = rejected(json!({"message": {"token": "t", "data": {key: "v"}}}));
        assert_eq!(violation.field.as_deref(), Some("message.data"), "{key}");
        assert!(
            violation.description.contains(&format!("\"{key}\"")),
            "{}",
            violation.description
        );
    }
    check(json!({"message": {"token": "t", "data": {"googlex": "v", "collapse_key": "v", "fromage": "v"}}})).expect("allowed keys");
}

#[test]
fn payload_size_limits() {
    check(message_of_size(("token", "t"), 4096)).expect("4096 bytes passes");
    let too_big = rejected(message_of_size(("token", "t"), 4097));
    assert_eq!(too_big.field.as_deref(), Some("message"));
    assert!(
        too_big.description.contains("4097") && too_big.description.contains("4096"),
        "{}",
        too_big.description
    );

    check(message_of_size(("topic", "news"), 2048)).expect("2048 bytes to a topic passes");
    let topic = rejected(message_of_size(("topic", "news"), 2049));
    assert!(
        topic.description.contains("2049") && topic.description.contains("2048"),
        "{}",
        topic.description
    );

    // The target does not count: a long token on an exactly-full payload still passes.
    check(message_of_size(("token", &"t".repeat(300)), 4096)).expect("token not counted");
}

#[test]
fn android_ttl() {
    let ttl = |value: Value| check(json!({"message": {"token": "t", "android": {"ttl": value}}}));
    for good in [
        "0s",
        "3600s",
        "2419200s",
        "2419200.000s",
        "1.5s",
        "0.123456789s",
    ] {
        ttl(json!(good)).unwrap_or_else(|v| panic!("{good}: {v:?}"));
    }
    for bad in [
        json!("2419201s"),
        json!("2419200.5s"),
        json!("10"),
        json!("s"),
        json!("-1s"),
        json!("1.s"),
        json!("1.1234567891s"),
        json!("1e3s"),
        json!(3600),
        json!("99999999999999999999999s"),
    ] {
        let violation = ttl(bad.clone()).expect_err("bad ttl");
        assert_eq!(
            violation.field.as_deref(),
            Some("message.android.ttl"),
            "{bad}"
        );
    }
}

#[test]
fn notification_fields_are_strings() {
    for key in ["title", "body", "image"] {
        let violation = rejected(json!({"message": {"token": "t", "notification": {key: 1}}}));
        assert_eq!(violation.field, Some(format!("message.notification.{key}")));
    }
    assert_eq!(
        field(json!({"message": {"token": "t", "notification": "hi"}})).as_deref(),
        Some("message.notification")
    );
}

#[test]
fn apns_payload_shapes() {
    check(json!({"message": {"token": "t", "apns": {"payload": {"anything": {"goes": [1]}}}}}))
        .expect("free-form payload");
    assert_eq!(
        field(json!({"message": {"token": "t", "apns": {"payload": {"aps": "x"}}}})).as_deref(),
        Some("message.apns.payload.aps")
    );
    assert_eq!(
        field(json!({"message": {"token": "t", "apns": {"payload": 3}}})).as_deref(),
        Some("message.apns.payload")
    );
    assert_eq!(
        field(json!({"message": {"token": "t", "apns": {"headers": {"apns-priority": 10}}}}))
            .as_deref(),
        Some("message.apns.headers[0].value")
    );
}

#[test]
fn token_hint_reads_what_it_can() {
    assert_eq!(
        token_hint(br#"{"message":{"token":"abc","data":{"a":1}}}"#).as_deref(),
        Some("abc")
    );
    assert_eq!(token_hint(b"garbage"), None);
}
