//! Demo data for `ffpush dev --seed`: users with device tokens as a FlutterFlow app writes them.

use std::collections::HashMap;

use chrono::Utc;

use crate::store::{self, Store};

/// (token document id, fcm_token, device_type)
type DemoToken = (&'static str, &'static str, &'static str);

const USERS: &[(&str, &[DemoToken])] = &[
    (
        "alice",
        &[
            ("t1", "demo-token-alice-android", "Android"),
            ("t2", "demo-token-alice-ios", "iOS"),
        ],
    ),
    ("bob", &[("t1", "demo-token-bob-ios", "iOS")]),
    ("carol", &[]),
];

/// Writes the demo users into the store's users collection (`FFPUSH_USERS_COLLECTION`).
pub async fn demo(store: &Store) -> Result<(), store::Error> {
    let users = store.users_collection();
    for (uid, tokens) in USERS {
        let mut user = HashMap::new();
        user.insert("display_name".to_string(), store::string(uid));
        user.insert("created_time".to_string(), store::timestamp(Utc::now()));
        store.set(&format!("{users}/{uid}"), user).await?;
        for (id, token, device) in *tokens {
            let mut doc = HashMap::new();
            doc.insert("fcm_token".to_string(), store::string(token));
            doc.insert("device_type".to_string(), store::string(device));
            doc.insert("created_at".to_string(), store::timestamp(Utc::now()));
            store
                .set(&format!("{users}/{uid}/fcm_tokens/{id}"), doc)
                .await?;
        }
    }
    eprintln!("seeded {users}/alice (2 tokens), {users}/bob (1 token), {users}/carol (no tokens)");
    Ok(())
}
