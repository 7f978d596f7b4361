//! Waiting for a condition without a fixed sleep.

use std::time::Duration;

pub async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
