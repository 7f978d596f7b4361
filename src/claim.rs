//! Claiming a notification: the precondition write that makes a document ours, the lease kept
//! alive (with progress) while the fan-out runs, and releasing it with progress saved so the
//! next worker resumes where this one stopped.
//!
//! Every write here carries an update-time precondition on our own last write, so two workers
//! can never both believe they hold one document: the loser's write fails and it stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::fanout::{Ledger, Progress, Tally};
use crate::model::{Status, pb};
use crate::store::{self, Store, prost_types_timestamp::Timestamp};

/// Fields ffpush adds to a notification document besides FlutterFlow's.
pub(crate) mod fields {
    pub const WORKER: &str = "ffpush_worker";
    pub const LEASE: &str = "ffpush_lease_expires_at";
    pub const PROGRESS: &str = "ffpush_progress";
}

/// How long a claim holds a document, and how often it is renewed.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTerms {
    pub length: Duration,
    /// How often progress is written and the lease extended (at most a third of `length`).
    pub renew_every: Duration,
}

impl LeaseTerms {
    pub fn new(length: Duration, progress_interval: Duration) -> Self {
        LeaseTerms {
            length,
            renew_every: progress_interval.min(length / 3),
        }
    }

    fn expiry(&self) -> chrono::DateTime<Utc> {
        Utc::now() + chrono::Duration::from_std(self.length).unwrap_or(chrono::Duration::MAX)
    }
}

/// A document this worker holds.
pub struct Claim {
    store: Store,
    name: String,
    terms: LeaseTerms,
    /// Update time of our last write: the precondition of the next one.
    version: Arc<Mutex<Timestamp>>,
    /// Where a previous holder stopped (empty for a fresh document).
    pub resume: Progress,
}

impl Claim {
    /// Claims `doc` as it was read: `None` when someone else changed it first (claimed it,
    /// finished it, deleted it).
    pub async fn take(
        store: &Store,
        terms: LeaseTerms,
        worker_id: &str,
        doc: &pb::Document,
    ) -> Result<Option<Claim>, store::Error> {
        let resume = if Status::of(doc) == Status::Started {
            read_progress(doc)
        } else {
            Progress::default()
        };
        let mut f = HashMap::new();
        f.insert(
            "status".to_string(),
            store::string(Status::Started.as_str()),
        );
        if store::timestamp_field(doc, "started_at").is_none() {
            f.insert("started_at".to_string(), store::timestamp(Utc::now()));
        }
        f.insert(fields::WORKER.to_string(), store::string(worker_id));
        f.insert(fields::LEASE.to_string(), store::timestamp(terms.expiry()));
        match store
            .update_fields(&doc.name, f, &[], doc.update_time)
            .await
        {
            Ok(version) => Ok(Some(Claim {
                store: store.clone(),
                name: doc.name.clone(),
                terms,
                version: Arc::new(Mutex::new(version)),
                resume,
            })),
            Err(store::Error::Conflict | store::Error::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Keeps the lease alive, writing the ledger's progress, until [`Renewal::finish`]. If
    /// another worker took the document over, `fan_stop` is cancelled.
    pub fn renew(&self, ledger: Arc<Mutex<Ledger>>, fan_stop: CancellationToken) -> Renewal {
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        let task = tokio::spawn(
            renew_lease(
                self.store.clone(),
                self.name.clone(),
                self.terms,
                self.version.clone(),
                ledger,
                fan_stop,
                lost.clone(),
                stop.clone(),
            )
            .in_current_span(),
        );
        Renewal { stop, lost, task }
    }

    /// Update time of our last write, the precondition for the report.
    pub fn version(&self) -> Timestamp {
        *self.version.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes progress and lets the lease go, so the next worker resumes at once.
    pub async fn release(&self, done: &Progress) -> Result<(), store::Error> {
        let mut f = progress_fields(done);
        f.insert(fields::LEASE.to_string(), store::timestamp(Utc::now()));
        self.store
            .update_fields(&self.name, f, &[], Some(self.version()))
            .await
            .map(|_| ())
    }
}

/// The running lease renewal of one [`Claim`].
pub struct Renewal {
    stop: CancellationToken,
    lost: CancellationToken,
    task: JoinHandle<()>,
}

impl Renewal {
    /// Stops renewing; true when the lease was lost to another worker meanwhile.
    pub async fn finish(self) -> bool {
        self.stop.cancel();
        let _ = self.task.await;
        self.lost.is_cancelled()
    }
}

/// Every `renew_every`, writes progress and extends the lease. A precondition on our last
/// write detects a takeover: then the fan-out is stopped.
#[allow(clippy::too_many_arguments)]
async fn renew_lease(
    store: Store,
    name: String,
    terms: LeaseTerms,
    version: Arc<Mutex<Timestamp>>,
    ledger: Arc<Mutex<Ledger>>,
    fan_stop: CancellationToken,
    lost: CancellationToken,
    done: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(terms.renew_every) => {}
        }
        let snapshot = ledger.lock().map(|l| l.snapshot()).unwrap_or_default();
        let mut f = progress_fields(&snapshot);
        f.insert(fields::LEASE.to_string(), store::timestamp(terms.expiry()));
        let current = *version.lock().unwrap_or_else(|e| e.into_inner());
        match store.update_fields(&name, f, &[], Some(current)).await {
            Ok(t) => *version.lock().unwrap_or_else(|e| e.into_inner()) = t,
            Err(store::Error::Conflict | store::Error::NotFound) => {
                lost.cancel();
                fan_stop.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %crate::errors::Chain(&e), "could not extend the lease; will try again")
            }
        }
    }
}

fn progress_fields(p: &Progress) -> HashMap<String, pb::Value> {
    let t = &p.tally;
    let mut m = HashMap::new();
    if let Some(c) = &p.cursor {
        m.insert("cursor".to_string(), store::string(c));
    }
    m.insert(
        "beyond".to_string(),
        store::array(p.beyond.iter().map(|b| store::string(b)).collect()),
    );
    for (k, v) in [
        ("tokens", t.tokens),
        ("sent", t.sent),
        ("dead", t.dead),
        ("removed", t.removed),
        ("dead_kept", t.dead_kept),
        ("sender_id_mismatch", t.sender_id_mismatch),
        ("third_party_auth", t.third_party_auth),
        ("undelivered", t.undelivered),
    ] {
        m.insert(k.to_string(), store::integer(v as i64));
    }
    let mut f = HashMap::new();
    f.insert(
        fields::PROGRESS.to_string(),
        pb::Value {
            value_type: Some(pb::value::ValueType::MapValue(pb::MapValue { fields: m })),
        },
    );
    f
}

/// Tokens an earlier holder of `doc` had sent (0 for a document nobody claimed).
pub(crate) fn sent_before(doc: &pb::Document) -> u64 {
    read_progress(doc).tally.sent
}

fn read_progress(doc: &pb::Document) -> Progress {
    let Some(pb::value::ValueType::MapValue(map)) = doc
        .fields
        .get(fields::PROGRESS)
        .and_then(|v| v.value_type.as_ref())
    else {
        return Progress::default();
    };
    let wrapper = pb::Document {
        fields: map.fields.clone(),
        ..Default::default()
    };
    let n = |k: &str| store::integer_field(&wrapper, k).unwrap_or(0).max(0) as u64;
    Progress {
        cursor: wrapper
            .fields
            .get("cursor")
            .and_then(crate::model::string_value)
            .map(str::to_string),
        beyond: match wrapper
            .fields
            .get("beyond")
            .and_then(|v| v.value_type.as_ref())
        {
            Some(pb::value::ValueType::ArrayValue(a)) => a
                .values
                .iter()
                .filter_map(crate::model::string_value)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        },
        tally: Tally {
            tokens: n("tokens"),
            sent: n("sent"),
            dead: n("dead"),
            removed: n("removed"),
            dead_kept: n("dead_kept"),
            sender_id_mismatch: n("sender_id_mismatch"),
            third_party_auth: n("third_party_auth"),
            undelivered: n("undelivered"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_survives_a_round_trip_through_the_document() {
        let progress = Progress {
            cursor: Some("users/u7/fcm_tokens/t3".into()),
            beyond: vec!["tok-a".into(), "tok-b".into()],
            tally: Tally {
                tokens: 9,
                sent: 5,
                dead: 1,
                removed: 2,
                dead_kept: 1,
                sender_id_mismatch: 1,
                third_party_auth: 1,
                undelivered: 0,
            },
        };
        let mut doc = pb::Document {
            fields: progress_fields(&progress),
            ..Default::default()
        };
        doc.fields
            .insert("status".into(), store::string(Status::Started.as_str()));
        let back = read_progress(&doc);
        assert_eq!(back.cursor, progress.cursor);
        assert_eq!(back.beyond, progress.beyond);
        assert_eq!(back.tally, progress.tally);
    }

    #[test]
    fn a_foreign_progress_with_more_sent_than_tokens_counts_no_failure() {
        let mut m = HashMap::new();
        m.insert("tokens".to_string(), store::integer(1));
        m.insert("sent".to_string(), store::integer(5));
        let mut doc = pb::Document::default();
        doc.fields.insert(
            fields::PROGRESS.to_string(),
            pb::Value {
                value_type: Some(pb::value::ValueType::MapValue(pb::MapValue { fields: m })),
            },
        );
        let tally = read_progress(&doc).tally;
        assert_eq!(tally.failed(), 0);
        assert!(tally.tokens >= tally.sent, "{tally:?}");
    }

    #[test]
    fn the_lease_is_renewed_at_least_three_times_per_length() {
        let terms = LeaseTerms::new(Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(terms.renew_every, Duration::from_secs(20));
        let terms = LeaseTerms::new(Duration::from_secs(60), Duration::from_secs(1));
        assert_eq!(terms.renew_every, Duration::from_secs(1));
    }
}
