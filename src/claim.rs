//! Claiming a notification: the precondition write that makes a document ours, the lease kept
//! alive (with progress) while the fan-out runs, and releasing it with progress saved so the
//! next worker resumes where this one stopped.
//!
//! Every write here carries an update-time precondition on our own last write, so two workers
//! can never both believe they hold one document: the loser's write fails and it stops. A
//! failed precondition is looked into first: when the document was only edited (an app or
//! the console writing another field) and still holds the lease we wrote, the write is made
//! again on the new version.
//!
//! Sending depends on that progress being saved: the fan-out sends only while the claim's
//! [`SendGate`] is open, and only a successful progress write moves it on
//! ([`LeaseTerms::send_window`]). A worker that cannot reach Firestore stops sending before
//! another worker could take the document over.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::errors::Chain;
use crate::fanout::{ErrorCounts, Ledger, Progress, SendGate, Tally};
use crate::fcm::ErrorCode;
use crate::fields;
use crate::model::{Status, pb};
use crate::report::{Fields, Report, error_counts_value};
use crate::store::{self, Store, prost_types_timestamp::Timestamp};

/// How far another worker's clock may run ahead of ours: sending stops at least this long
/// before the lease we wrote runs out (at most a quarter of the lease).
const CLOCK_SKEW: Duration = Duration::from_secs(1);
/// Edits met in a row by one write before it gives up until the next round.
const EDITS_IN_A_ROW: usize = 5;
/// Lease expiries remembered as possibly on the document: the last one known written, and
/// those of writes whose answer never came (they may have landed).
const EXPIRIES_KEPT: usize = 8;

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

    /// How long after the start of a lease write that succeeded the fan-out may go on sending:
    /// two renewal intervals, so that a worker whose writes fail stops within two progress
    /// intervals and a worker taking over repeats at most what was sent in that window; and
    /// never once the lease written then could have run out on another worker's clock (less a
    /// margin for clock skew: 1 s, at most a quarter of the lease). Measured from the write's
    /// start, when the expiry it wrote was computed.
    pub fn send_window(&self) -> Duration {
        let skew = CLOCK_SKEW.min(self.length / 4);
        (self.renew_every * 2).min(self.length.saturating_sub(skew))
    }

    /// The lease expiry a write made now carries, in Firestore's precision (microseconds), so
    /// that it reads back equal.
    fn expiry(&self) -> Timestamp {
        micros(
            Utc::now() + chrono::Duration::from_std(self.length).unwrap_or(chrono::Duration::MAX),
        )
    }
}

fn micros(t: DateTime<Utc>) -> Timestamp {
    let mut t = store::to_timestamp(t);
    t.nanos -= t.nanos % 1000;
    t
}

fn timestamp_value(t: Timestamp) -> pb::Value {
    pb::Value {
        value_type: Some(pb::value::ValueType::TimestampValue(t)),
    }
}

/// Why a claim ended without this worker writing the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    /// Another worker holds the lease now (it took over from our saved progress).
    #[error("another worker took the notification over")]
    TakenOver,
    /// The document is gone: nothing to send or report.
    #[error("the notification was deleted")]
    Deleted,
    /// Someone set `status: "cancelled"` while it was sent: stop, and write the counts so far
    /// with [`Claim::complete`] (which keeps `cancelled`).
    #[error("the notification was cancelled")]
    Cancelled,
}

/// A write of a held document that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Lost(Lost),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// What the lease keeper and the claim's own writes share.
struct Lease {
    store: Store,
    name: String,
    worker: String,
    terms: LeaseTerms,
    held: Mutex<Held>,
}

struct Held {
    /// Update time of our last write: the precondition of the next one.
    version: Timestamp,
    /// A re-read found the document cancelled while we held it: writes after that are made on
    /// the cancelled version (the counts so far), never another round of sending.
    cancelled: bool,
    /// Lease expiries we wrote that may be on the document (see [`EXPIRIES_KEPT`]).
    expiries: VecDeque<Timestamp>,
}

impl Lease {
    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `fields` conditioned on our last write. On a failed precondition the document is
    /// read: deleted, or with another worker's lease, the claim is [`Lost`]; only edited (our
    /// lease still on it), the write is made again on its new version. A write carrying no
    /// `expiry` is the report: found already on the document (its answer was lost), it is done.
    async fn write(
        &self,
        fields: HashMap<String, pb::Value>,
        remove: &[&str],
        expiry: Option<Timestamp>,
    ) -> Result<(), ClaimError> {
        if let Some(e) = expiry {
            let mut held = self.held();
            held.expiries.push_back(e);
            if held.expiries.len() > EXPIRIES_KEPT {
                held.expiries.pop_front();
            }
        }
        for _ in 0..EDITS_IN_A_ROW {
            let version = self.held().version;
            match self
                .store
                .update_fields(&self.name, fields.clone(), remove, version)
                .await
            {
                Ok(t) => {
                    let mut held = self.held();
                    held.version = t;
                    if let Some(e) = expiry {
                        held.expiries.clear();
                        held.expiries.push_back(e);
                    }
                    return Ok(());
                }
                Err(store::Error::NotFound) => return Err(ClaimError::Lost(Lost::Deleted)),
                Err(store::Error::Conflict) => {}
                Err(e) => return Err(e.into()),
            }
            let Some(doc) = self.store.get(self.store.relative(&self.name)).await? else {
                return Err(ClaimError::Lost(Lost::Deleted));
            };
            let ours = self.names_us(&doc);
            if ours && Status::of(&doc) == Status::Cancelled && self.holds_our_lease(&doc) {
                // Cancelled while held (our report removes the lease, so this is not ours).
                let version = doc
                    .update_time
                    .ok_or(store::Error::Incomplete("update_time"))?;
                let mut held = self.held();
                held.version = version;
                if !std::mem::replace(&mut held.cancelled, true) || expiry.is_some() {
                    return Err(ClaimError::Lost(Lost::Cancelled));
                }
                // The counts of a cancelled document: written on its latest version.
                continue;
            }
            if expiry.is_none() && ours && Status::of(&doc).is_finished() {
                return Ok(());
            }
            if !(ours && Status::of(&doc) == Status::Started && self.holds_our_lease(&doc)) {
                return Err(ClaimError::Lost(Lost::TakenOver));
            }
            let version = doc
                .update_time
                .ok_or(store::Error::Incomplete("update_time"))?;
            tracing::debug!("the notification was edited while held; the lease is still ours");
            self.held().version = version;
        }
        Err(store::Error::Conflict.into())
    }

    fn names_us(&self, doc: &pb::Document) -> bool {
        doc.fields
            .get(fields::WORKER)
            .and_then(crate::model::string_value)
            == Some(self.worker.as_str())
    }

    fn holds_our_lease(&self, doc: &pb::Document) -> bool {
        match doc
            .fields
            .get(fields::LEASE)
            .and_then(|v| v.value_type.as_ref())
        {
            Some(pb::value::ValueType::TimestampValue(t)) => self.held().expiries.contains(t),
            _ => false,
        }
    }

    /// `projects/…/documents/`, which the stored progress leaves off token names.
    fn prefix(&self) -> &str {
        documents_prefix(&self.name)
    }
}

/// A document this worker holds.
pub struct Claim {
    lease: Arc<Lease>,
    gate: Arc<SendGate>,
    /// When the claim was written: the lease is renewed from there.
    taken: Instant,
    /// Where a previous holder stopped (empty for a fresh document).
    pub resume: Progress,
}

impl Claim {
    /// Claims `doc` as it was read: `None` when someone else changed it first (claimed it,
    /// finished it, deleted it). The claim is conditioned on the update time `doc` was read
    /// at; a copy without one is refused, never claimed on existence alone.
    pub async fn take(
        store: &Store,
        terms: LeaseTerms,
        worker_id: &str,
        doc: &pb::Document,
    ) -> Result<Option<Claim>, store::Error> {
        let read_at = doc
            .update_time
            .ok_or(store::Error::Incomplete("update_time"))?;
        let resume = if Status::of(doc) == Status::Started {
            read_progress(doc)
        } else {
            Progress::default()
        };
        let mut f = HashMap::new();
        f.insert(
            fields::STATUS.to_string(),
            store::string(Status::Started.as_str()),
        );
        if store::timestamp_field(doc, fields::STARTED_AT).is_none() {
            f.insert(fields::STARTED_AT.to_string(), store::timestamp(Utc::now()));
        }
        f.insert(fields::WORKER.to_string(), store::string(worker_id));
        let taken = Instant::now();
        let expiry = terms.expiry();
        f.insert(fields::LEASE.to_string(), timestamp_value(expiry));
        match store.update_fields(&doc.name, f, &[], read_at).await {
            Ok(version) => Ok(Some(Claim {
                lease: Arc::new(Lease {
                    store: store.clone(),
                    name: doc.name.clone(),
                    worker: worker_id.to_string(),
                    terms,
                    held: Mutex::new(Held {
                        version,
                        cancelled: false,
                        expiries: VecDeque::from([expiry]),
                    }),
                }),
                gate: Arc::new(SendGate::new(taken + terms.send_window())),
                taken,
                resume,
            })),
            Err(store::Error::Conflict | store::Error::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Update time of our last write on the document (after the report: the report's own,
    /// unless its answer was lost and it was found already written).
    pub fn version(&self) -> Timestamp {
        self.lease.held().version
    }

    /// The fan-out's gate on this claim's saved progress (see [`LeaseTerms::send_window`]).
    pub fn gate(&self) -> &SendGate {
        &self.gate
    }

    /// Keeps the lease alive, writing the ledger's progress and opening the gate after each
    /// write, until [`Renewal::finish`] (or the renewal is dropped). If the claim is lost,
    /// `fan_stop` is cancelled.
    pub fn renew(&self, ledger: Arc<Mutex<Ledger>>, fan_stop: CancellationToken) -> Renewal {
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            renew_lease(
                self.lease.clone(),
                self.gate.clone(),
                self.taken,
                ledger,
                fan_stop,
                stop.clone(),
            )
            .in_current_span(),
        );
        Renewal {
            stop,
            task: Some(task),
        }
    }

    /// Writes progress and lets the lease go, so the next worker resumes at once. Rides out a
    /// Firestore outage for up to a lease length.
    pub async fn release(&self, done: &Progress) -> Result<(), ClaimError> {
        let now = micros(Utc::now());
        let mut f = progress_fields(done, self.lease.prefix());
        f.insert(fields::LEASE.to_string(), timestamp_value(now));
        self.with_retry("saving progress and releasing the lease failed", || {
            self.lease.write(f.clone(), &[], Some(now))
        })
        .await
    }

    /// Writes `report` and lets the lease and progress go, conditioned on our last write, and
    /// returns the update time it was written at (or, its answer lost, found written at). Rides out a
    /// Firestore outage for up to a lease length. A document found cancelled meanwhile fails
    /// it with [`Lost::Cancelled`] the first time; after that, the write (of the counts,
    /// keeping `cancelled`) is made on the cancelled version.
    pub async fn complete(&self, report: Report) -> Result<Timestamp, ClaimError> {
        let Fields { set, remove } = letting_go(report.into_fields());
        self.with_retry("writing the outcome failed", || {
            self.lease.write(set.clone(), &remove, None)
        })
        .await?;
        Ok(self.version())
    }

    async fn with_retry<F, Fut>(&self, what: &str, mut write: F) -> Result<(), ClaimError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), ClaimError>>,
    {
        let policy = store::backoff(
            Duration::from_millis(200),
            Duration::from_secs(5),
            Some(self.lease.terms.length),
        );
        let written = store::retry(what, policy, None, || {
            let write = write();
            async move {
                match write.await {
                    Ok(()) => Ok(Ok(())),
                    Err(ClaimError::Lost(lost)) => Ok(Err(lost)),
                    Err(ClaimError::Store(e)) => Err(e),
                }
            }
        })
        .await?;
        written.map_err(ClaimError::Lost)
    }
}

/// The running lease renewal of one [`Claim`]. Dropping it (a panic while processing, say)
/// stops the renewal: a lease must never outlive the work it covers.
pub struct Renewal {
    stop: CancellationToken,
    task: Option<JoinHandle<Renewed>>,
}

/// How a lease renewal ended.
#[derive(Debug, Default)]
pub struct Renewed {
    /// The claim was lost meanwhile (and the fan-out stopped).
    pub lost: Option<Lost>,
    /// Progress writes that failed (Firestore unreachable or refusing them).
    pub failed_writes: u32,
}

impl Renewal {
    /// Stops renewing; says whether the claim was lost meanwhile.
    pub async fn finish(mut self) -> Renewed {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_default(),
            None => Renewed::default(),
        }
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Every `renew_every` from the claim, writes progress and extends the lease; each write that
/// succeeds opens the send gate for [`LeaseTerms::send_window`] from its start. A write that
/// finds the claim lost stops the fan-out; one that fails otherwise is tried again at the next
/// round while the gate runs out.
async fn renew_lease(
    lease: Arc<Lease>,
    gate: Arc<SendGate>,
    taken: Instant,
    ledger: Arc<Mutex<Ledger>>,
    fan_stop: CancellationToken,
    done: CancellationToken,
) -> Renewed {
    let terms = lease.terms;
    let mut renewed = Renewed::default();
    let mut failing_since: Option<Instant> = None;
    let mut next = taken + terms.renew_every;
    loop {
        tokio::select! {
            _ = done.cancelled() => return renewed,
            _ = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        next = started + terms.renew_every;
        let progress = ledger.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
        let expiry = terms.expiry();
        let mut f = progress_fields(&progress, lease.prefix());
        f.insert(fields::LEASE.to_string(), timestamp_value(expiry));
        let written = tokio::select! {
            // The fan-out is over. A write left half-way may still land: its expiry stays
            // among ours, so the release or report that follows recognizes it.
            _ = done.cancelled() => return renewed,
            written = lease.write(f, &[], Some(expiry)) => written,
        };
        match written {
            Ok(()) => {
                gate.extend(started + terms.send_window());
                if let Some(since) = failing_since.take() {
                    tracing::info!(
                        failed_for_ms = since.elapsed().as_millis() as u64,
                        "progress saved and the lease extended again; sending goes on"
                    );
                }
            }
            Err(ClaimError::Lost(lost)) => {
                renewed.lost = Some(lost);
                fan_stop.cancel();
                return renewed;
            }
            Err(ClaimError::Store(e)) => {
                renewed.failed_writes += 1;
                if failing_since.is_none() {
                    failing_since = Some(started);
                    tracing::warn!(error = %Chain(&e),
                        "could not save progress and extend the lease; sending pauses until a write succeeds, and another worker may take over once the lease runs out");
                } else {
                    tracing::debug!(error = %Chain(&e), "could not save progress; will try again");
                }
            }
        }
    }
}

/// Writes `outcome` on `doc`, a document this worker never claimed (one failed before any
/// claim), conditioned on the version `doc` was read at: a document someone changed since is
/// left alone ([`store::Error::Conflict`]). A dead worker's lease and progress go with it.
pub async fn complete_unclaimed(
    store: &Store,
    doc: &pb::Document,
    outcome: Fields,
) -> Result<Timestamp, store::Error> {
    let read_at = doc
        .update_time
        .ok_or(store::Error::Incomplete("update_time"))?;
    let Fields { set, remove } = letting_go(outcome);
    store.update_fields(&doc.name, set, &remove, read_at).await
}

/// `outcome` with the claim's lease and progress removed: a finished document holds neither.
fn letting_go(mut outcome: Fields) -> Fields {
    outcome
        .remove
        .splice(0..0, [fields::LEASE, fields::PROGRESS]);
    outcome
}

/// `projects/p/databases/d/documents/` from a document's full name (empty if it has none).
fn documents_prefix(name: &str) -> &str {
    const DOCUMENTS: &str = "/documents/";
    name.find(DOCUMENTS)
        .map_or("", |i| &name[..i + DOCUMENTS.len()])
}

/// The `ffpush_progress` field. `cursor` and `beyond` are written as an older ffpush reads
/// them (full document names); `last_started` and `unfinished`, which it does not read, are
/// written relative to `prefix` (the database's documents path), which keeps a progress write
/// near the concurrency × ~60 bytes of a token document's path.
fn progress_fields(p: &Progress, prefix: &str) -> HashMap<String, pb::Value> {
    let relative = |name: &str| store::string(name.strip_prefix(prefix).unwrap_or(name));
    let t = &p.tally;
    let mut m = HashMap::new();
    if let Some(c) = &p.cursor {
        m.insert("cursor".to_string(), store::string(c));
    }
    if let Some(l) = &p.last_started {
        m.insert("last_started".to_string(), relative(l));
    }
    m.insert(
        "unfinished".to_string(),
        store::array(p.unfinished.iter().map(|u| relative(u)).collect()),
    );
    if !p.beyond.is_empty() {
        m.insert(
            "beyond".to_string(),
            store::array(p.beyond.iter().map(|b| store::string(b)).collect()),
        );
    }
    for (k, v) in [
        ("tokens", t.tokens),
        ("sent", t.sent),
        ("dead", t.dead),
        ("removed", t.removed),
        ("dead_kept", t.dead_kept),
        ("sender_id_mismatch", t.sender_id_mismatch),
        ("third_party_auth", t.third_party_auth),
        ("undelivered", t.undelivered),
        ("timed_out", t.timed_out),
    ] {
        m.insert(k.to_string(), store::integer(v as i64));
    }
    m.insert(
        fields::ERROR_COUNTS.to_string(),
        error_counts_value(&t.errors),
    );
    let mut f = HashMap::new();
    f.insert(
        fields::PROGRESS.to_string(),
        pb::Value {
            value_type: Some(pb::value::ValueType::MapValue(pb::MapValue { fields: m })),
        },
    );
    f
}

/// An `error_counts` map as [`error_counts_value`] writes it; codes this version does not
/// know, and values that are not counts, are left out.
pub(crate) fn read_error_counts(value: &pb::Value) -> ErrorCounts {
    let mut counts = ErrorCounts::default();
    if let Some(pb::value::ValueType::MapValue(map)) = value.value_type.as_ref() {
        for (code, n) in &map.fields {
            if let (Some(code), Some(pb::value::ValueType::IntegerValue(n))) =
                (ErrorCode::parse(code), n.value_type.as_ref())
            {
                counts.add(code, (*n).max(0) as u64);
            }
        }
    }
    counts
}

/// Tokens an earlier holder of `doc` had sent (0 for a document nobody claimed).
pub(crate) fn sent_before(doc: &pb::Document) -> u64 {
    read_progress(doc).tally.sent
}

/// The progress on `doc`, as this version or an older one wrote it (an older one wrote only
/// `cursor` and `beyond`, with every token finished past the cursor listed).
fn read_progress(doc: &pb::Document) -> Progress {
    let Some(pb::value::ValueType::MapValue(map)) = doc
        .fields
        .get(fields::PROGRESS)
        .and_then(|v| v.value_type.as_ref())
    else {
        return Progress::default();
    };
    let prefix = documents_prefix(&doc.name);
    let wrapper = pb::Document {
        fields: map.fields.clone(),
        ..Default::default()
    };
    let n = |k: &str| store::integer_field(&wrapper, k).unwrap_or(0).max(0) as u64;
    let string = |k: &str| wrapper.fields.get(k).and_then(crate::model::string_value);
    let strings = |k: &str| match wrapper.fields.get(k).and_then(|v| v.value_type.as_ref()) {
        Some(pb::value::ValueType::ArrayValue(a)) => a
            .values
            .iter()
            .filter_map(crate::model::string_value)
            .collect(),
        _ => Vec::new(),
    };
    Progress {
        cursor: string("cursor").map(str::to_string),
        last_started: string("last_started").map(|l| format!("{prefix}{l}")),
        unfinished: strings("unfinished")
            .into_iter()
            .map(|u| format!("{prefix}{u}"))
            .collect(),
        beyond: strings("beyond").into_iter().map(str::to_string).collect(),
        tally: Tally {
            tokens: n("tokens"),
            sent: n("sent"),
            dead: n("dead"),
            removed: n("removed"),
            dead_kept: n("dead_kept"),
            sender_id_mismatch: n("sender_id_mismatch"),
            third_party_auth: n("third_party_auth"),
            undelivered: n("undelivered"),
            timed_out: n("timed_out"),
            errors: wrapper
                .fields
                .get(fields::ERROR_COUNTS)
                .map(read_error_counts)
                .unwrap_or_default(),
        }
        .normalized(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = "projects/p/databases/(default)/documents/";

    fn stored(progress: &Progress) -> pb::Document {
        let mut doc = pb::Document {
            name: format!("{DOCS}ff_push_notifications/n1"),
            fields: progress_fields(progress, DOCS),
            ..Default::default()
        };
        doc.fields
            .insert("status".into(), store::string(Status::Started.as_str()));
        doc
    }

    #[test]
    fn progress_survives_a_round_trip_through_the_document() {
        let progress = Progress {
            cursor: Some(format!("{DOCS}users/u7/fcm_tokens/t3")),
            last_started: Some(format!("{DOCS}users/u9/fcm_tokens/t1")),
            unfinished: vec![
                format!("{DOCS}users/u8/fcm_tokens/t1"),
                format!("{DOCS}users/u9/fcm_tokens/t1"),
            ],
            beyond: vec![format!("{DOCS}users/w/fcm_tokens/a")],
            tally: Tally {
                tokens: 10,
                sent: 5,
                dead: 1,
                removed: 2,
                dead_kept: 1,
                sender_id_mismatch: 1,
                third_party_auth: 1,
                undelivered: 1,
                timed_out: 1,
                errors: {
                    let mut e = ErrorCounts::default();
                    e.add(ErrorCode::Unregistered, 1);
                    e.add(ErrorCode::SenderIdMismatch, 1);
                    e.add(ErrorCode::ThirdPartyAuthError, 1);
                    e.add(ErrorCode::Internal, 1);
                    e.add(ErrorCode::Timeout, 1);
                    e
                },
            },
        };
        let doc = stored(&progress);
        assert_eq!(read_progress(&doc), progress);
        // What an older version reads stays in its form: full names.
        let Some(pb::value::ValueType::MapValue(m)) =
            doc.fields[fields::PROGRESS].value_type.as_ref()
        else {
            panic!("no progress map")
        };
        assert_eq!(
            crate::model::string_value(&m.fields["cursor"]),
            progress.cursor.as_deref()
        );
        assert_eq!(
            crate::model::string_value(&m.fields["last_started"]),
            Some("users/u9/fcm_tokens/t1"),
            "token names past the cursor are stored relative to the database"
        );
    }

    #[test]
    fn progress_as_an_older_version_wrote_it_is_read() {
        let mut m = HashMap::new();
        m.insert(
            "cursor".to_string(),
            store::string(&format!("{DOCS}users/a/fcm_tokens/2")),
        );
        m.insert(
            "beyond".to_string(),
            store::array(vec![store::string(&format!("{DOCS}users/b/fcm_tokens/1"))]),
        );
        m.insert("tokens".to_string(), store::integer(3));
        m.insert("sent".to_string(), store::integer(3));
        let mut doc = stored(&Progress::default());
        doc.fields.insert(
            fields::PROGRESS.to_string(),
            pb::Value {
                value_type: Some(pb::value::ValueType::MapValue(pb::MapValue { fields: m })),
            },
        );
        let p = read_progress(&doc);
        assert_eq!(p.cursor, Some(format!("{DOCS}users/a/fcm_tokens/2")));
        assert_eq!(p.last_started, None);
        assert!(p.unfinished.is_empty());
        assert_eq!(p.beyond, vec![format!("{DOCS}users/b/fcm_tokens/1")]);
        assert_eq!(p.tally.sent, 3);
        assert!(p.tally.errors.is_empty(), "no error_counts: none counted");
    }

    #[test]
    fn a_progress_write_is_bounded_by_the_concurrency() {
        // The default concurrency, every request unanswered (e.g. all waiting for a retry),
        // token documents named as Firebase names them (28-character user ids, 20-character
        // document ids), and counts past a million: well under Firestore's 1 MiB document.
        let concurrency = 1000;
        let name = |i: usize| format!("{DOCS}users/{:028}/fcm_tokens/{:020}", i, i);
        let progress = Progress {
            cursor: Some(name(0)),
            last_started: Some(name(concurrency)),
            unfinished: (1..=concurrency).map(name).collect(),
            beyond: Vec::new(),
            tally: Tally {
                tokens: 5_000_000,
                sent: 5_000_000,
                ..Default::default()
            },
        };
        let doc = stored(&progress);
        let bytes =
            firestore::gcloud_sdk::prost::Message::encoded_len(&doc.fields[fields::PROGRESS]);
        assert!(bytes < 80 * concurrency, "{bytes} bytes");
    }

    #[test]
    fn sending_stops_before_a_lease_written_then_could_have_run_out() {
        for (lease, interval) in [(3, 1), (3, 3), (60, 1), (60, 30), (10, 5)] {
            let terms = LeaseTerms::new(Duration::from_secs(lease), Duration::from_secs(interval));
            let window = terms.send_window();
            assert!(window <= terms.renew_every * 2, "{terms:?}");
            assert!(
                window + CLOCK_SKEW.min(terms.length / 4) <= terms.length,
                "{terms:?}: {window:?}"
            );
            assert!(
                window > terms.renew_every,
                "{terms:?}: a renewal on time keeps it open"
            );
        }
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
