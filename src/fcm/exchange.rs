//! One HTTP exchange with FCM as either protocol's connection hands it over: the answer
//! (status, `Retry-After`, body) or why there was none. Shared by the HTTP/2 pool
//! ([`super::pool`]) and the HTTP/1.1 connections ([`super::http1`]).

use std::time::Duration;

use axum::http::{HeaderMap, header};
use bytes::Bytes;

/// An answer, whatever its status.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// What went wrong on one exchange.
pub(super) struct Failure {
    pub(super) reason: String,
    /// FCM never processed the request: it may be sent again.
    pub(super) unprocessed: bool,
    /// The connection takes no more requests.
    pub(super) connection_gone: bool,
}

/// `Retry-After`, if the answer has one: delay-seconds, or an HTTP-date read as the time from
/// now until then (zero if it has passed). Both forms are HTTP's
/// (<https://www.rfc-editor.org/rfc/rfc9110#field.retry-after>); anything else is ignored.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    retry_after_at(value, chrono::Utc::now())
}

fn retry_after_at(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // An HTTP-date's preferred form (IMF-fixdate, "Sun, 06 Nov 1994 08:49:37 GMT") is an RFC
    // 2822 date.
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds_or_as_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-05T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(retry_after_at("30", now), Some(Duration::from_secs(30)));
        assert_eq!(
            retry_after_at("Sat, 05 Dec 2026 12:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after_at("Sat, 05 Dec 2026 11:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date already passed: retry now"
        );
        assert_eq!(retry_after_at("soon", now), None);
        assert_eq!(retry_after_at("-5", now), None);
    }
}
