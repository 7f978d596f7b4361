//! Counters and a latency histogram, rendered in the Prometheus text format. Hand-rolled on
//! atomics: a dozen series do not justify a metrics framework.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::fcm::{self, Outcome};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn add(&self, n: i64) {
        if n >= 0 {
            self.0.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            self.0.fetch_sub(n.unsigned_abs(), Ordering::Relaxed);
        }
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the FCM request latency buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// FCM outcome classes, the `outcome` label of `ffpush_fcm_messages_total`.
pub const OUTCOMES: [&str; 9] = [
    "sent",
    "dead_token",
    "sender_id_mismatch",
    "third_party_auth",
    "retryable",
    "unauthenticated",
    "payload",
    "fatal",
    "auth",
];

/// What the FCM sender's connection pool reports. The sender owns it (it exists before the
/// rest of the metrics); [`Metrics::fcm`] shares it for rendering.
#[derive(Default)]
pub struct FcmMetrics {
    /// Connections to FCM (HTTP/2, or HTTP/1.1) open and in the pool.
    pub connections: Gauge,
    /// Connections opened since start (replacements included).
    pub connections_opened: Counter,
    /// Attempts to open a connection that failed.
    pub connect_errors: Counter,
    /// Requests FCM refused unprocessed (RST_STREAM REFUSED_STREAM, or GOAWAY before the
    /// stream; on HTTP/1.1, a connection closed before the request was written) and that were
    /// sent again.
    pub streams_refused: Counter,
    /// FCM requests on the wire right now.
    pub requests_in_flight: Gauge,
    /// Sends allowed per second now (this instance's share of `FFPUSH_FCM_RATE`, lower after
    /// a quota pause; 0: unpaced).
    pub pace_rate: Gauge,
    /// Time sends waited for the pacer (rate and quota pauses), summed over sends.
    pub pace_wait_micros: Counter,
    /// 429 QUOTA_EXCEEDED events that paused every send of the instance.
    pub quota_pauses: Counter,
}

#[derive(Default)]
pub struct Metrics {
    pub notifications_succeeded: Counter,
    pub notifications_failed: Counter,
    /// Of the failed, those older than `FFPUSH_MAX_LATENESS` when found: never sent late.
    pub notifications_expired: Counter,
    pub fcm_outcomes: [Counter; 9],
    pub tokens_removed: Counter,
    pub retries: Counter,
    pub listener_reconnects: Counter,
    pub documents_scheduled: Gauge,
    pub documents_in_progress: Gauge,
    /// Due documents waiting for a slot (`FFPUSH_MAX_DOCUMENTS`).
    pub documents_queued: Gauge,
    /// 1 when `/readyz` would answer 200; set when `/metrics` is scraped, so that an alert can
    /// watch readiness without anything calling `/readyz` from outside.
    pub ready: Gauge,
    /// Time fan-outs had free send slots but no token to send: waiting for Firestore pages.
    pub token_wait_micros: Counter,
    /// User documents read for their language field (notifications with translations only).
    pub user_documents_read: Counter,
    /// Instances of the project alive by their heartbeats, this one included, as it last
    /// read them (see [`crate::instances`]).
    pub instances: Gauge,
    /// This instance's share of `FFPUSH_FCM_RATE`, messages per second (0: unpaced, or held).
    pub rate_share: Gauge,
    /// The FCM sender's pool (see [`FcmMetrics`]).
    pub fcm: Arc<FcmMetrics>,
    /// Observations per bucket, not cumulative (see [`Metrics::observe_fcm`]).
    latency_buckets: [Counter; 12],
    latency_count: Counter,
    latency_sum_micros: Counter,
}

impl Metrics {
    /// Metrics that render the FCM sender's pool counters too.
    pub fn with_fcm(fcm: Arc<FcmMetrics>) -> Metrics {
        Metrics {
            fcm,
            ..Metrics::default()
        }
    }

    pub fn observe_fcm(&self, answer: &Result<Outcome, fcm::Error>, elapsed: Duration) {
        let class = match answer {
            Ok(Outcome::Sent) => 0,
            Ok(Outcome::Dead | Outcome::InvalidToken) => 1,
            Ok(Outcome::SenderIdMismatch) => 2,
            Ok(Outcome::ThirdPartyAuth) => 3,
            Err(fcm::Error::Retryable { .. } | fcm::Error::Transport(_)) => 4,
            Err(fcm::Error::Unauthenticated(_)) => 5,
            Err(fcm::Error::Payload(_)) => 6,
            Err(fcm::Error::Refused { .. } | fcm::Error::Setup { .. }) => 7,
            Err(fcm::Error::Auth(_)) => 8,
        };
        self.fcm_outcomes[class].inc();
        // One increment per observation (the first bucket that holds it); the cumulative
        // counts Prometheus wants are summed when rendering, not paid for on every send.
        let secs = elapsed.as_secs_f64();
        if let Some(bucket) = BUCKETS.iter().position(|bound| secs <= *bound) {
            self.latency_buckets[bucket].inc();
        }
        self.latency_count.inc();
        self.latency_sum_micros.inc_by(elapsed.as_micros() as u64);
    }

    pub fn fcm_outcome(&self, name: &str) -> u64 {
        OUTCOMES
            .iter()
            .position(|o| *o == name)
            .map(|i| self.fcm_outcomes[i].get())
            .unwrap_or(0)
    }

    /// The Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP ffpush_notifications_total Notifications finished, by final status."
        )?;
        writeln!(out, "# TYPE ffpush_notifications_total counter")?;
        writeln!(
            out,
            "ffpush_notifications_total{{status=\"succeeded\"}} {}",
            self.notifications_succeeded.get()
        )?;
        writeln!(
            out,
            "ffpush_notifications_total{{status=\"failed\"}} {}",
            self.notifications_failed.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_notifications_expired_total Notifications failed as expired: due longer ago than FFPUSH_MAX_LATENESS."
        )?;
        writeln!(out, "# TYPE ffpush_notifications_expired_total counter")?;
        writeln!(
            out,
            "ffpush_notifications_expired_total {}",
            self.notifications_expired.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_fcm_messages_total FCM send requests, by outcome class."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_messages_total counter")?;
        for (name, counter) in OUTCOMES.iter().zip(&self.fcm_outcomes) {
            writeln!(
                out,
                "ffpush_fcm_messages_total{{outcome=\"{name}\"}} {}",
                counter.get()
            )?;
        }
        writeln!(
            out,
            "# HELP ffpush_tokens_removed_total Token documents deleted because FCM said the token is dead."
        )?;
        writeln!(out, "# TYPE ffpush_tokens_removed_total counter")?;
        writeln!(
            out,
            "ffpush_tokens_removed_total {}",
            self.tokens_removed.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_fcm_retries_total FCM requests retried after a transient answer."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_retries_total counter")?;
        writeln!(out, "ffpush_fcm_retries_total {}", self.retries.get())?;
        writeln!(
            out,
            "# HELP ffpush_listener_reconnects_total Firestore listen streams reopened after an error."
        )?;
        writeln!(out, "# TYPE ffpush_listener_reconnects_total counter")?;
        writeln!(
            out,
            "ffpush_listener_reconnects_total {}",
            self.listener_reconnects.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_documents_waiting Documents waiting: timers for those due within FFPUSH_SCHEDULE_WINDOW, in progress here, or due and queued for a slot (FFPUSH_MAX_DOCUMENTS)."
        )?;
        writeln!(out, "# TYPE ffpush_documents_waiting gauge")?;
        writeln!(
            out,
            "ffpush_documents_waiting{{state=\"scheduled\"}} {}",
            self.documents_scheduled.get()
        )?;
        writeln!(
            out,
            "ffpush_documents_waiting{{state=\"in_progress\"}} {}",
            self.documents_in_progress.get()
        )?;
        writeln!(
            out,
            "ffpush_documents_waiting{{state=\"queued\"}} {}",
            self.documents_queued.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_ready 1 when this instance is ready (listening, FCM token obtainable: what /readyz says), else 0."
        )?;
        writeln!(out, "# TYPE ffpush_ready gauge")?;
        writeln!(out, "ffpush_ready {}", self.ready.get())?;
        writeln!(
            out,
            "# HELP ffpush_fanout_token_wait_seconds_total Time fan-outs had free send slots but no token: waiting on Firestore reads."
        )?;
        writeln!(out, "# TYPE ffpush_fanout_token_wait_seconds_total counter")?;
        writeln!(
            out,
            "ffpush_fanout_token_wait_seconds_total {}",
            self.token_wait_micros.get() as f64 / 1e6
        )?;
        writeln!(
            out,
            "# HELP ffpush_user_documents_read_total User documents read for their language field (notifications with notification_title_i18n / notification_text_i18n only)."
        )?;
        writeln!(out, "# TYPE ffpush_user_documents_read_total counter")?;
        writeln!(
            out,
            "ffpush_user_documents_read_total {}",
            self.user_documents_read.get()
        )?;
        let fcm = &self.fcm;
        writeln!(
            out,
            "# HELP ffpush_fcm_connections Connections to FCM open in the pool (HTTP/2, or HTTP/1.1)."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_connections gauge")?;
        writeln!(out, "ffpush_fcm_connections {}", fcm.connections.get())?;
        writeln!(
            out,
            "# HELP ffpush_fcm_connections_opened_total Connections to FCM opened (replacements included)."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_connections_opened_total counter")?;
        writeln!(
            out,
            "ffpush_fcm_connections_opened_total {}",
            fcm.connections_opened.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_fcm_connect_errors_total Failed attempts to open a connection to FCM."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_connect_errors_total counter")?;
        writeln!(
            out,
            "ffpush_fcm_connect_errors_total {}",
            fcm.connect_errors.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_fcm_streams_refused_total Requests FCM refused unprocessed (REFUSED_STREAM or GOAWAY; on HTTP/1.1, a connection closed before the request was written) and that were sent again."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_streams_refused_total counter")?;
        writeln!(
            out,
            "ffpush_fcm_streams_refused_total {}",
            fcm.streams_refused.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_fcm_requests_in_flight FCM requests sent and not yet answered."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_requests_in_flight gauge")?;
        writeln!(
            out,
            "ffpush_fcm_requests_in_flight {}",
            fcm.requests_in_flight.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_fcm_pace_rate FCM sends allowed per second now (this instance's share of FFPUSH_FCM_RATE, lower while recovering from a quota pause; 0: unpaced)."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_pace_rate gauge")?;
        writeln!(out, "ffpush_fcm_pace_rate {}", fcm.pace_rate.get())?;
        writeln!(
            out,
            "# HELP ffpush_fcm_pace_wait_seconds_total Time sends waited for the instance's pacer, summed over sends."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_pace_wait_seconds_total counter")?;
        writeln!(
            out,
            "ffpush_fcm_pace_wait_seconds_total {}",
            fcm.pace_wait_micros.get() as f64 / 1e6
        )?;
        writeln!(
            out,
            "# HELP ffpush_fcm_quota_pauses_total Times FCM's 429 QUOTA_EXCEEDED paused every send of this instance."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_quota_pauses_total counter")?;
        writeln!(
            out,
            "ffpush_fcm_quota_pauses_total {}",
            fcm.quota_pauses.get()
        )?;
        writeln!(
            out,
            "# HELP ffpush_instances Instances of this project alive by their heartbeats in ffpush_instances, this one included, as it last read them."
        )?;
        writeln!(out, "# TYPE ffpush_instances gauge")?;
        writeln!(out, "ffpush_instances {}", self.instances.get())?;
        writeln!(
            out,
            "# HELP ffpush_fcm_rate_share This instance's share of FFPUSH_FCM_RATE, messages per second (0: unpaced, or holding its sends)."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_rate_share gauge")?;
        writeln!(out, "ffpush_fcm_rate_share {}", self.rate_share.get())?;
        writeln!(
            out,
            "# HELP ffpush_fcm_request_duration_seconds Latency of one FCM send request."
        )?;
        writeln!(out, "# TYPE ffpush_fcm_request_duration_seconds histogram")?;
        let mut cumulative = 0;
        for (bucket, bound) in self.latency_buckets.iter().zip(BUCKETS) {
            cumulative += bucket.get();
            writeln!(
                out,
                "ffpush_fcm_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            )?;
        }
        writeln!(
            out,
            "ffpush_fcm_request_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            self.latency_count.get()
        )?;
        writeln!(
            out,
            "ffpush_fcm_request_duration_seconds_sum {}",
            self.latency_sum_micros.get() as f64 / 1e6
        )?;
        writeln!(
            out,
            "ffpush_fcm_request_duration_seconds_count {}",
            self.latency_count.get()
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe_fcm(&Ok(Outcome::Sent), Duration::from_millis(20));
        m.observe_fcm(&Ok(Outcome::Dead), Duration::from_secs(3));
        let text = m.render();
        assert!(text.contains("ffpush_fcm_request_duration_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("ffpush_fcm_request_duration_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("ffpush_fcm_request_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("ffpush_fcm_messages_total{outcome=\"dead_token\"} 1"));
        assert_eq!(m.fcm_outcome("sent"), 1);
    }
}
