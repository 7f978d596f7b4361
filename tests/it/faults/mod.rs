//! The fault suite: each test makes one production failure happen on purpose (a document
//! edited or deleted mid-way, the connection to Firestore cut, FCM unavailable or hanging on a
//! token) and asserts that nothing is lost, duplicates stay within the stated bound, and the
//! worker keeps running. docs/contract.md, "Guarantees", lists each fault with its measured
//! result.

mod edits;
mod fcm;
mod firestore;
mod lease;

use std::time::Duration;

use ffpush::dev::fcm_emulator::Script;
use futures::StreamExt;

use crate::TestApp;

/// `n` tokens of user `big`, written concurrently; each answered after 20 ms by FCM.
pub(super) async fn big_audience(app: &TestApp, n: usize) -> Vec<String> {
    let tokens: Vec<String> = (0..n)
        .map(|i| format!("{}-big-{i:03}", app.project))
        .collect();
    for token in &tokens {
        app.fcm()
            .script(token, Script::Latency(Duration::from_millis(20)));
    }
    futures::stream::iter(tokens.iter().enumerate())
        .for_each_concurrent(16, |(i, token)| async move {
            app.add_token("big", &format!("t{i:03}"), token, "Android")
                .await
        })
        .await;
    tokens
}
