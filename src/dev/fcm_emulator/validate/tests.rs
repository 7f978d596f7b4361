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
        .map(|k| {
            let value = match *k {
                k if ANDROID_NOTIFICATION_BOOLS.contains(&k) => json!(true),
                "notification_count" => json!(1),
                _ => json!("x"),
            };
            (k.to_string(), value)
        })
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

/// A token message with `android` / `apns` / `fcm_options` parts merged in.
fn with(part: &str, value: Value) -> Value {
    let mut message = json!({"token": "t", "notification": {"title": "x", "body": "y"}});
    message[part] = value;
    json!({"message": message})
}

#[test]
fn android_priority_is_fcms_enum() {
    for good in [json!("HIGH"), json!("NORMAL"), json!(1), json!(0)] {
        check(with("android", json!({"priority": good}))).expect("valid priority");
    }
    for bad in [
        json!("high"),
        json!("normal"),
        json!("URGENT"),
        json!(2),
        json!(true),
    ] {
        let violation = rejected(with("android", json!({"priority": bad.clone()})));
        assert_eq!(
            violation.field.as_deref(),
            Some("message.android.priority"),
            "{bad}"
        );
        assert_eq!(
            violation.description,
            format!(
                "Invalid value at 'message.android.priority' (type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {bad}"
            )
        );
    }
}

#[test]
fn android_notification_fields_have_their_types() {
    check(with(
        "android",
        json!({"notification": {"channel_id": "chat", "notification_count": 3, "sound": "default"}}),
    ))
    .expect("valid");
    // proto3 JSON takes an int32 as a number or a decimal string.
    check(with(
        "android",
        json!({"notification": {"notification_count": "3"}}),
    ))
    .expect("string int");
    for (key, bad, kind) in [
        ("notification_count", json!("three"), "TYPE_INT32"),
        ("notification_count", json!(1.5), "TYPE_INT32"),
        ("notification_count", json!(4_294_967_296_u64), "TYPE_INT32"),
        ("channel_id", json!(5), "TYPE_STRING"),
        ("sound", json!({"name": "x"}), "TYPE_STRING"),
        ("sticky", json!("yes"), "TYPE_BOOL"),
    ] {
        let violation = rejected(with("android", json!({"notification": {key: bad.clone()}})));
        let path = format!("message.android.notification.{key}");
        assert_eq!(violation.field.as_deref(), Some(path.as_str()), "{key}");
        assert_eq!(
            violation.description,
            format!("Invalid value at '{path}' ({kind}), {bad}")
        );
    }
}

#[test]
fn apns_header_values_are_what_apns_accepts() {
    let headers = |h: Value| check(with("apns", json!({"headers": h})));
    for good in [
        json!({"apns-priority": "10"}),
        json!({"apns-priority": "5"}),
        json!({"apns-priority": "1"}),
        json!({"apns-expiration": "0"}),
        json!({"apns-expiration": "1735689600"}),
        json!({"apns-collapse-id": "x".repeat(64)}),
        json!({"apns-push-type": "alert"}),
    ] {
        headers(good.clone()).unwrap_or_else(|v| panic!("{good}: {v:?}"));
    }
    for (bad, reason) in [
        (json!({"apns-priority": "high"}), "BadPriority"),
        (json!({"apns-priority": "7"}), "BadPriority"),
        (json!({"apns-expiration": "3600s"}), "BadExpirationDate"),
        (json!({"apns-expiration": "-1"}), "BadExpirationDate"),
        (json!({"apns-expiration": ""}), "BadExpirationDate"),
        (json!({"apns-collapse-id": "x".repeat(65)}), "BadCollapseId"),
        (json!({"apns-push-type": "silent"}), "InvalidPushType"),
    ] {
        let violation = headers(bad.clone()).expect_err("bad header");
        assert_eq!(
            violation.field.as_deref(),
            Some("message.apns.headers"),
            "{bad}"
        );
        assert!(
            violation.description.contains(reason),
            "{bad}: {}",
            violation.description
        );
    }
}

#[test]
fn a_background_push_is_priority_5_and_shows_nothing() {
    let background = json!({"token": "t", "data": {"a": "b"},
        "apns": {"headers": {"apns-push-type": "background", "apns-priority": "5"},
            "payload": {"aps": {"content-available": 1}}}});
    check(json!({"message": background.clone()})).expect("a background push");
    let variant = |pointer: &str, value: Value| {
        let mut message = background.clone();
        *message.pointer_mut(pointer).expect("pointer") = value;
        check(json!({"message": message}))
    };
    let priority = variant("/apns/headers/apns-priority", json!("10")).expect_err("priority 10");
    assert!(
        priority.description.contains("BadPriority"),
        "{}",
        priority.description
    );
    for aps in [
        json!({"content-available": 1, "badge": 1}),
        json!({"content-available": 1, "sound": "default"}),
        json!({"content-available": 1, "alert": "hi"}),
    ] {
        let violation = variant("/apns/payload/aps", aps.clone()).expect_err("shown");
        assert_eq!(
            violation.field.as_deref(),
            Some("message.apns.payload.aps"),
            "{aps}"
        );
    }
    let mut shown = background.clone();
    shown["notification"] = json!({"title": "x"});
    assert_eq!(
        check(json!({"message": shown}))
            .expect_err("a notification")
            .field
            .as_deref(),
        Some("message.apns.headers")
    );
    // FCM: a data-only message to iOS may only be normal priority.
    let data_only = json!({"message": {"token": "t", "data": {"a": "b"},
        "apns": {"headers": {"apns-priority": "10"}}}});
    assert_eq!(
        rejected(data_only).field.as_deref(),
        Some("message.apns.headers")
    );
}

#[test]
fn aps_badge_and_content_available_are_numbers() {
    let aps = |aps: Value| check(with("apns", json!({"payload": {"aps": aps}})));
    aps(json!({"badge": 0, "sound": "default"})).expect("badge 0");
    aps(json!({"badge": 12})).expect("badge 12");
    for (bad, key) in [
        (json!({"badge": "3"}), "badge"),
        (json!({"badge": -1}), "badge"),
        (json!({"badge": 1.5}), "badge"),
        (json!({"content-available": true}), "content-available"),
        (json!({"content-available": "1"}), "content-available"),
    ] {
        let violation = aps(bad.clone()).expect_err("bad aps");
        assert_eq!(
            violation.field.as_deref(),
            Some("message.apns.payload.aps"),
            "{bad}"
        );
        assert!(
            violation.description.contains(key),
            "{}",
            violation.description
        );
    }
}

#[test]
fn analytics_labels_match_fcms_pattern_at_every_level() {
    for good in ["a", "Spring-sale_2.0~%", &"x".repeat(50)] {
        check(with("fcm_options", json!({"analytics_label": good}))).expect(good);
        check(with(
            "android",
            json!({"fcm_options": {"analytics_label": good}}),
        ))
        .expect(good);
        check(with(
            "apns",
            json!({"fcm_options": {"analytics_label": good}}),
        ))
        .expect(good);
    }
    for bad in [
        json!(""),
        json!("spring sale"),
        json!("x".repeat(51)),
        json!("ünï"),
        json!(5),
    ] {
        for (part, value, path) in [
            (
                "fcm_options",
                json!({"analytics_label": bad.clone()}),
                "message.fcm_options.analytics_label",
            ),
            (
                "android",
                json!({"fcm_options": {"analytics_label": bad.clone()}}),
                "message.android.fcm_options.analytics_label",
            ),
            (
                "apns",
                json!({"fcm_options": {"analytics_label": bad.clone()}}),
                "message.apns.fcm_options.analytics_label",
            ),
        ] {
            let violation = rejected(with(part, value));
            assert_eq!(violation.field.as_deref(), Some(path), "{bad}");
        }
    }
}

#[test]
fn topics_and_conditions_are_checked() {
    for good in ["news", "a-b_c.d~e%f"] {
        check(json!({"message": {"topic": good}})).expect(good);
    }
    // "/topics/" prefix should not be provided" (the reference's `topic`).
    for bad in ["", "news sport", "news/sport", "/topics/news", "ünï"] {
        let violation = rejected(json!({"message": {"topic": bad}}));
        assert_eq!(violation.field.as_deref(), Some("message.topic"), "{bad:?}");
    }
    check(json!({"message": {"condition": "'a' in topics && ('b' in topics || 'c' in topics)"}}))
        .expect("condition");
    for bad in [
        "a",
        "'a' in topics &&",
        "'a' in topics && 'b' in topics && 'c' in topics && 'd' in topics && 'e' in topics && 'f' in topics",
    ] {
        let violation = rejected(json!({"message": {"condition": bad}}));
        assert_eq!(
            violation.field.as_deref(),
            Some("message.condition"),
            "{bad:?}"
        );
    }
}
