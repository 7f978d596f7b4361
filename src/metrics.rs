//! Counters and a latency histogram, rendered in the Prometheus text format. Hand-rolled on
//! atomics: a dozen series do not justify a metrics framework.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// FCM outcome classes, the `outcome` label of `ffpush_fcm_messages_total`, in
/// [`OutcomeClass`]'s order.
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

/// The class of one FCM answer, as `fcm` sorts its answers (`fcm::Outcome::class`,
/// `fcm::Error::class`): which series of `ffpush_fcm_messages_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeClass {
    Sent,
    /// The token is dead (unregistered or invalid): its documents are removed.
    DeadToken,
    SenderIdMismatch,
    ThirdPartyAuth,
    /// Unavailable or no answer: sent again after a backoff.
    Retryable,
    Unauthenticated,
    Payload,
    /// Refused for good (permissions, project), or the client could not be set up.
    Fatal,
    /// No access token could be obtained.
    Auth,
}

impl OutcomeClass {
    /// The value of the `outcome` label.
    pub fn label(self) -> &'static str {
        OUTCOMES[self as usize]
    }
}

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

    /// Counts one FCM request: its answer's class and how long it took.
    pub fn observe_fcm(&self, class: OutcomeClass, elapsed: Duration) {
        self.fcm_outcomes[class as usize].inc();
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
        for family in FAMILIES {
            let name = family.name;
            writeln!(out, "# HELP {name} {}", family.help)?;
            writeln!(out, "# TYPE {name} {}", family.kind)?;
            match &family.series {
                Series::Value(read) => writeln!(out, "{name} {}", read(self))?,
                Series::Seconds(read) => writeln!(out, "{name} {}", read(self) as f64 / 1e6)?,
                Series::Labelled {
                    label,
                    values,
                    read,
                } => {
                    for (i, value) in values.iter().enumerate() {
                        writeln!(out, "{name}{{{label}=\"{value}\"}} {}", read(self, i))?;
                    }
                }
                Series::Latency => self.write_latency(out, name)?,
            }
        }
        Ok(())
    }

    /// The FCM request latency histogram's samples: cumulative buckets, sum and count.
    fn write_latency(&self, out: &mut String, name: &str) -> std::fmt::Result {
        let mut cumulative = 0;
        for (bucket, bound) in self.latency_buckets.iter().zip(BUCKETS) {
            cumulative += bucket.get();
            writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}")?;
        }
        let count = self.latency_count.get();
        writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}")?;
        writeln!(
            out,
            "{name}_sum {}",
            self.latency_sum_micros.get() as f64 / 1e6
        )?;
        writeln!(out, "{name}_count {count}")
    }
}

/// One metric family of `/metrics`: its name, type and help, and where its samples come from.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    series: Series,
}

/// How a family's samples are read from [`Metrics`].
enum Series {
    /// One sample: the value as it is.
    Value(fn(&Metrics) -> u64),
    /// One sample: microseconds summed, shown in seconds.
    Seconds(fn(&Metrics) -> u64),
    /// One sample per value of `label`, in this order; `read` takes the value's index.
    Labelled {
        label: &'static str,
        values: &'static [&'static str],
        read: fn(&Metrics, usize) -> u64,
    },
    /// The FCM request latency histogram.
    Latency,
}

/// Every family of `/metrics`, in the order it is rendered.
static FAMILIES: &[Family] = &[
    Family {
        name: "ffpush_notifications_total",
        kind: "counter",
        help: "Notifications finished, by final status.",
        series: Series::Labelled {
            label: "status",
            values: &["succeeded", "failed"],
            read: |m, i| [&m.notifications_succeeded, &m.notifications_failed][i].get(),
        },
    },
    Family {
        name: "ffpush_notifications_expired_total",
        kind: "counter",
        help: "Notifications failed as expired: due longer ago than FFPUSH_MAX_LATENESS.",
        series: Series::Value(|m| m.notifications_expired.get()),
    },
    Family {
        name: "ffpush_fcm_messages_total",
        kind: "counter",
        help: "FCM send requests, by outcome class.",
        series: Series::Labelled {
            label: "outcome",
            values: &OUTCOMES,
            read: |m, i| m.fcm_outcomes[i].get(),
        },
    },
    Family {
        name: "ffpush_tokens_removed_total",
        kind: "counter",
        help: "Token documents deleted because FCM said the token is dead.",
        series: Series::Value(|m| m.tokens_removed.get()),
    },
    Family {
        name: "ffpush_fcm_retries_total",
        kind: "counter",
        help: "FCM requests retried after a transient answer.",
        series: Series::Value(|m| m.retries.get()),
    },
    Family {
        name: "ffpush_listener_reconnects_total",
        kind: "counter",
        help: "Firestore listen streams reopened after an error.",
        series: Series::Value(|m| m.listener_reconnects.get()),
    },
    Family {
        name: "ffpush_documents_waiting",
        kind: "gauge",
        help: "Documents waiting: timers for those due within FFPUSH_SCHEDULE_WINDOW, in progress here, or due and queued for a slot (FFPUSH_MAX_DOCUMENTS).",
        series: Series::Labelled {
            label: "state",
            values: &["scheduled", "in_progress", "queued"],
            read: |m, i| {
                [
                    &m.documents_scheduled,
                    &m.documents_in_progress,
                    &m.documents_queued,
                ][i]
                    .get()
            },
        },
    },
    Family {
        name: "ffpush_ready",
        kind: "gauge",
        help: "1 when this instance is ready (listening, FCM token obtainable: what /readyz says), else 0.",
        series: Series::Value(|m| m.ready.get()),
    },
    Family {
        name: "ffpush_fanout_token_wait_seconds_total",
        kind: "counter",
        help: "Time fan-outs had free send slots but no token: waiting on Firestore reads.",
        series: Series::Seconds(|m| m.token_wait_micros.get()),
    },
    Family {
        name: "ffpush_user_documents_read_total",
        kind: "counter",
        help: "User documents read for their language field (notifications with notification_title_i18n / notification_text_i18n only).",
        series: Series::Value(|m| m.user_documents_read.get()),
    },
    Family {
        name: "ffpush_fcm_connections",
        kind: "gauge",
        help: "Connections to FCM open in the pool (HTTP/2, or HTTP/1.1).",
        series: Series::Value(|m| m.fcm.connections.get()),
    },
    Family {
        name: "ffpush_fcm_connections_opened_total",
        kind: "counter",
        help: "Connections to FCM opened (replacements included).",
        series: Series::Value(|m| m.fcm.connections_opened.get()),
    },
    Family {
        name: "ffpush_fcm_connect_errors_total",
        kind: "counter",
        help: "Failed attempts to open a connection to FCM.",
        series: Series::Value(|m| m.fcm.connect_errors.get()),
    },
    Family {
        name: "ffpush_fcm_streams_refused_total",
        kind: "counter",
        help: "Requests FCM refused unprocessed (REFUSED_STREAM or GOAWAY; on HTTP/1.1, a connection closed before the request was written) and that were sent again.",
        series: Series::Value(|m| m.fcm.streams_refused.get()),
    },
    Family {
        name: "ffpush_fcm_requests_in_flight",
        kind: "gauge",
        help: "FCM requests sent and not yet answered.",
        series: Series::Value(|m| m.fcm.requests_in_flight.get()),
    },
    Family {
        name: "ffpush_fcm_pace_rate",
        kind: "gauge",
        help: "FCM sends allowed per second now (this instance's share of FFPUSH_FCM_RATE, lower while recovering from a quota pause; 0: unpaced).",
        series: Series::Value(|m| m.fcm.pace_rate.get()),
    },
    Family {
        name: "ffpush_fcm_pace_wait_seconds_total",
        kind: "counter",
        help: "Time sends waited for the instance's pacer, summed over sends.",
        series: Series::Seconds(|m| m.fcm.pace_wait_micros.get()),
    },
    Family {
        name: "ffpush_fcm_quota_pauses_total",
        kind: "counter",
        help: "Times FCM's 429 QUOTA_EXCEEDED paused every send of this instance.",
        series: Series::Value(|m| m.fcm.quota_pauses.get()),
    },
    Family {
        name: "ffpush_instances",
        kind: "gauge",
        help: "Instances of this project alive by their heartbeats in ffpush_instances, this one included, as it last read them.",
        series: Series::Value(|m| m.instances.get()),
    },
    Family {
        name: "ffpush_fcm_rate_share",
        kind: "gauge",
        help: "This instance's share of FFPUSH_FCM_RATE, messages per second (0: unpaced, or holding its sends).",
        series: Series::Value(|m| m.rate_share.get()),
    },
    Family {
        name: "ffpush_fcm_request_duration_seconds",
        kind: "histogram",
        help: "Latency of one FCM send request.",
        series: Series::Latency,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series set to a value of its own, so that a value read from the wrong series shows.
    fn populated() -> Metrics {
        let fcm = Arc::new(FcmMetrics::default());
        fcm.connections.set(3);
        fcm.connections_opened.inc_by(5);
        fcm.connect_errors.inc_by(2);
        fcm.streams_refused.inc_by(7);
        fcm.requests_in_flight.set(9);
        fcm.pace_rate.set(450);
        fcm.pace_wait_micros.inc_by(2_250_000);
        fcm.quota_pauses.inc_by(1);
        let m = Metrics::with_fcm(fcm);
        m.notifications_succeeded.inc_by(41);
        m.notifications_failed.inc_by(6);
        m.notifications_expired.inc_by(4);
        m.tokens_removed.inc_by(13);
        m.retries.inc_by(17);
        m.listener_reconnects.inc_by(8);
        m.documents_scheduled.set(21);
        m.documents_in_progress.set(22);
        m.documents_queued.set(23);
        m.ready.set(1);
        m.token_wait_micros.inc_by(1_500_000);
        m.user_documents_read.inc_by(21);
        m.instances.set(2);
        m.rate_share.set(225);
        for (i, counter) in m.fcm_outcomes.iter().enumerate() {
            counter.inc_by(100 + 10 * i as u64);
        }
        for ms in [3, 20, 20, 300, 3_000, 60_000] {
            m.observe_fcm(OutcomeClass::Sent, Duration::from_millis(ms));
        }
        m
    }

    /// `/metrics` as Prometheus scrapes it: every family in its order, with its HELP and TYPE
    /// lines, to the byte (dashboards, alerts and the collector's config name these series).
    const POPULATED: &str = r#"# HELP ffpush_notifications_total Notifications finished, by final status.
# TYPE ffpush_notifications_total counter
ffpush_notifications_total{status="succeeded"} 41
ffpush_notifications_total{status="failed"} 6
# HELP ffpush_notifications_expired_total Notifications failed as expired: due longer ago than FFPUSH_MAX_LATENESS.
# TYPE ffpush_notifications_expired_total counter
ffpush_notifications_expired_total 4
# HELP ffpush_fcm_messages_total FCM send requests, by outcome class.
# TYPE ffpush_fcm_messages_total counter
ffpush_fcm_messages_total{outcome="sent"} 106
ffpush_fcm_messages_total{outcome="dead_token"} 110
ffpush_fcm_messages_total{outcome="sender_id_mismatch"} 120
ffpush_fcm_messages_total{outcome="third_party_auth"} 130
ffpush_fcm_messages_total{outcome="retryable"} 140
ffpush_fcm_messages_total{outcome="unauthenticated"} 150
ffpush_fcm_messages_total{outcome="payload"} 160
ffpush_fcm_messages_total{outcome="fatal"} 170
ffpush_fcm_messages_total{outcome="auth"} 180
# HELP ffpush_tokens_removed_total Token documents deleted because FCM said the token is dead.
# TYPE ffpush_tokens_removed_total counter
ffpush_tokens_removed_total 13
# HELP ffpush_fcm_retries_total FCM requests retried after a transient answer.
# TYPE ffpush_fcm_retries_total counter
ffpush_fcm_retries_total 17
# HELP ffpush_listener_reconnects_total Firestore listen streams reopened after an error.
# TYPE ffpush_listener_reconnects_total counter
ffpush_listener_reconnects_total 8
# HELP ffpush_documents_waiting Documents waiting: timers for those due within FFPUSH_SCHEDULE_WINDOW, in progress here, or due and queued for a slot (FFPUSH_MAX_DOCUMENTS).
# TYPE ffpush_documents_waiting gauge
ffpush_documents_waiting{state="scheduled"} 21
ffpush_documents_waiting{state="in_progress"} 22
ffpush_documents_waiting{state="queued"} 23
# HELP ffpush_ready 1 when this instance is ready (listening, FCM token obtainable: what /readyz says), else 0.
# TYPE ffpush_ready gauge
ffpush_ready 1
# HELP ffpush_fanout_token_wait_seconds_total Time fan-outs had free send slots but no token: waiting on Firestore reads.
# TYPE ffpush_fanout_token_wait_seconds_total counter
ffpush_fanout_token_wait_seconds_total 1.5
# HELP ffpush_user_documents_read_total User documents read for their language field (notifications with notification_title_i18n / notification_text_i18n only).
# TYPE ffpush_user_documents_read_total counter
ffpush_user_documents_read_total 21
# HELP ffpush_fcm_connections Connections to FCM open in the pool (HTTP/2, or HTTP/1.1).
# TYPE ffpush_fcm_connections gauge
ffpush_fcm_connections 3
# HELP ffpush_fcm_connections_opened_total Connections to FCM opened (replacements included).
# TYPE ffpush_fcm_connections_opened_total counter
ffpush_fcm_connections_opened_total 5
# HELP ffpush_fcm_connect_errors_total Failed attempts to open a connection to FCM.
# TYPE ffpush_fcm_connect_errors_total counter
ffpush_fcm_connect_errors_total 2
# HELP ffpush_fcm_streams_refused_total Requests FCM refused unprocessed (REFUSED_STREAM or GOAWAY; on HTTP/1.1, a connection closed before the request was written) and that were sent again.
# TYPE ffpush_fcm_streams_refused_total counter
ffpush_fcm_streams_refused_total 7
# HELP ffpush_fcm_requests_in_flight FCM requests sent and not yet answered.
# TYPE ffpush_fcm_requests_in_flight gauge
ffpush_fcm_requests_in_flight 9
# HELP ffpush_fcm_pace_rate FCM sends allowed per second now (this instance's share of FFPUSH_FCM_RATE, lower while recovering from a quota pause; 0: unpaced).
# TYPE ffpush_fcm_pace_rate gauge
ffpush_fcm_pace_rate 450
# HELP ffpush_fcm_pace_wait_seconds_total Time sends waited for the instance's pacer, summed over sends.
# TYPE ffpush_fcm_pace_wait_seconds_total counter
ffpush_fcm_pace_wait_seconds_total 2.25
# HELP ffpush_fcm_quota_pauses_total Times FCM's 429 QUOTA_EXCEEDED paused every send of this instance.
# TYPE ffpush_fcm_quota_pauses_total counter
ffpush_fcm_quota_pauses_total 1
# HELP ffpush_instances Instances of this project alive by their heartbeats in ffpush_instances, this one included, as it last read them.
# TYPE ffpush_instances gauge
ffpush_instances 2
# HELP ffpush_fcm_rate_share This instance's share of FFPUSH_FCM_RATE, messages per second (0: unpaced, or holding its sends).
# TYPE ffpush_fcm_rate_share gauge
ffpush_fcm_rate_share 225
# HELP ffpush_fcm_request_duration_seconds Latency of one FCM send request.
# TYPE ffpush_fcm_request_duration_seconds histogram
ffpush_fcm_request_duration_seconds_bucket{le="0.005"} 1
ffpush_fcm_request_duration_seconds_bucket{le="0.01"} 1
ffpush_fcm_request_duration_seconds_bucket{le="0.025"} 3
ffpush_fcm_request_duration_seconds_bucket{le="0.05"} 3
ffpush_fcm_request_duration_seconds_bucket{le="0.1"} 3
ffpush_fcm_request_duration_seconds_bucket{le="0.25"} 3
ffpush_fcm_request_duration_seconds_bucket{le="0.5"} 4
ffpush_fcm_request_duration_seconds_bucket{le="1"} 4
ffpush_fcm_request_duration_seconds_bucket{le="2.5"} 4
ffpush_fcm_request_duration_seconds_bucket{le="5"} 5
ffpush_fcm_request_duration_seconds_bucket{le="10"} 5
ffpush_fcm_request_duration_seconds_bucket{le="30"} 5
ffpush_fcm_request_duration_seconds_bucket{le="+Inf"} 6
ffpush_fcm_request_duration_seconds_sum 63.343
ffpush_fcm_request_duration_seconds_count 6
"#;

    #[test]
    fn the_exposition_is_every_family_in_order_to_the_byte() {
        let text = populated().render();
        for (want, got) in POPULATED.lines().zip(text.lines()) {
            assert_eq!(got, want);
        }
        assert_eq!(text, POPULATED);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe_fcm(OutcomeClass::Sent, Duration::from_millis(20));
        m.observe_fcm(OutcomeClass::DeadToken, Duration::from_secs(3));
        let text = m.render();
        assert!(text.contains("ffpush_fcm_request_duration_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("ffpush_fcm_request_duration_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("ffpush_fcm_request_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("ffpush_fcm_messages_total{outcome=\"dead_token\"} 1"));
        assert_eq!(m.fcm_outcome("sent"), 1);
    }
}
