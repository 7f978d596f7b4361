//! One notification document from intake to report: decide whether it is ours to do (status,
//! schedule, lease), claim it with an update-time precondition, fan out while holding and
//! extending the lease (with progress), then write the outcome with a field mask.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::audience;
use crate::claim::{Claim, LeaseTerms, fields};
use crate::config::Settings;
use crate::errors::Chain;
use crate::fanout::{self, Abort, Context, Ledger, RetryPolicy};
use crate::fcm::{MessageTemplate, Sender};
use crate::limits::{self, SenderRate};
use crate::metrics::Metrics;
use crate::model::{Notification, Source, Status, pb};
use crate::report::Report;
use crate::schedule::{Timers, Wait};
use crate::store::{self, Store, prost_types_timestamp::Timestamp};

/// How processing one claimed-or-not document ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Someone else changed the document first (claimed, finished or deleted it).
    ClaimedElsewhere,
    /// Another worker took the lease over mid-send; it carries on from our progress.
    LeaseLost,
    /// Shutdown: progress saved and the lease released for another worker to resume.
    Interrupted,
    /// Firestore failed while reading tokens: progress saved, lease released, resumed later.
    Released(store::Error),
    /// The document changed between the last lease write and the report; left as it is.
    ChangedBeforeReport,
    /// The outcome was written onto the document, at this update time.
    Reported(Status, Timestamp),
}

/// What becomes of a document once its task here ends.
enum Then {
    /// Nothing more, unless a version newer than `written` (the update time of our last write
    /// on it) was offered while the task ran: then it is read again.
    Done { written: Option<Timestamp> },
    /// Left for the sweep or a resuming worker (shutdown, a lease released).
    Leave,
    /// A write's precondition failed mid-way: someone else wrote the document. It is read again
    /// and what it holds now is offered.
    Changed,
    /// Our first write on it (the claim, or the failure of a document we never claimed) lost
    /// on its precondition. Read again like [`Then::Changed`], with a backoff for a document
    /// that keeps losing (one that changes all the time).
    Lost,
    /// Firestore failed: read it again after a sweep interval.
    Later,
}

/// Claims in a row a document may lose before it is read again only after a pause.
const LOSSES_BEFORE_BACKOFF: u32 = 3;

/// Shared state of a running worker.
pub struct Worker {
    pub settings: Settings,
    pub store: Store,
    pub sender: Arc<Sender>,
    pub metrics: Arc<Metrics>,
    /// Documents being processed here right now.
    running: Arc<Running>,
    /// Documents whose claim lost on its precondition, with the losses in a row.
    contested: Mutex<HashMap<String, u32>>,
    timers: Timers,
    /// App documents sent per sender in the last minute (`FFPUSH_SENDER_RATE`).
    senders: SenderRate,
    /// Fan-outs; awaited on shutdown.
    pub tasks: TaskTracker,
    /// Cancelled on shutdown: no new work, in-flight sends finish, progress is written.
    pub stop: CancellationToken,
}

impl Worker {
    /// The worker and the channel of documents whose timer fired (see [`Worker::wake`]).
    pub fn new(
        settings: Settings,
        store: Store,
        sender: Arc<Sender>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Arc<Worker>, mpsc::UnboundedReceiver<String>) {
        let (timers, due) = Timers::new();
        let worker = Arc::new(Worker {
            senders: SenderRate::new(settings.sender_rate),
            settings,
            store,
            sender,
            metrics,
            running: Arc::default(),
            contested: Mutex::default(),
            timers,
            tasks: TaskTracker::new(),
            stop,
        });
        (worker, due)
    }

    pub fn source_of(&self, name: &str) -> Option<Source> {
        let relative = self.store.relative(name);
        let collection = relative.split('/').next()?;
        if collection == self.settings.collection {
            Some(Source::Console)
        } else if collection == self.settings.user_collection {
            Some(Source::App)
        } else {
            None
        }
    }

    /// The span of every log line about the notification `name`: its path and id. The Cloud
    /// Logging writer also makes the id the entry's operation, which groups its lines.
    fn span(&self, name: &str) -> tracing::Span {
        let relative = self.store.relative(name);
        tracing::info_span!("notification", doc = %relative, notification_id = %id_of(relative))
    }

    /// Reads each document whose timer fired and offers it again, until shutdown.
    pub async fn wake(self: Arc<Self>, mut due: mpsc::UnboundedReceiver<String>) {
        loop {
            let name = tokio::select! {
                _ = self.stop.cancelled() => return,
                name = due.recv() => match name { Some(n) => n, None => return },
            };
            self.timers.fired(&name);
            self.metrics
                .documents_scheduled
                .set(self.timers.scheduled() as u64);
            let relative = self.store.relative(&name).to_string();
            match self.store.get(&relative).await {
                Ok(Some(doc)) => self.offer(doc),
                Ok(None) => self.forget(&name),
                Err(e) => {
                    self.span(&name).in_scope(|| {
                        tracing::warn!(error = %Chain(&e),
                            "could not read a document again; will try again")
                    });
                    // Not every such document is one the sweep finds (one with no status).
                    self.look_again_later(&name);
                }
            }
        }
    }

    /// A document was seen (listen, sweep or timer). Cheap for documents already finished or
    /// already handled here: the emulator resends whole collections on every write.
    pub fn offer(self: &Arc<Self>, doc: pb::Document) {
        let status = Status::of(&doc);
        if status.is_finished() {
            self.forget(&doc.name);
            return;
        }
        if self.stop.is_cancelled() {
            return;
        }
        // A version arriving while the document runs here is not lost: the run's end compares
        // it with what the run wrote, and reads the document again if it is newer.
        if self.running.skip(&doc.name, doc.update_time) {
            return;
        }
        let Some(source) = self.source_of(&doc.name) else {
            return;
        };
        let now = Utc::now();
        if status == Status::Started
            && let Some(until) = store::timestamp_field(&doc, fields::LEASE)
            && until > now
        {
            // Someone holds it. Look again when the lease runs out.
            self.timers.set(
                &doc.name,
                until + chrono::Duration::milliseconds(200),
                Wait::Lease,
            );
            return;
        }
        // App documents: the size first, before anything is parsed; then the recipients.
        let parsed = limits::check_document(source, &self.settings, &doc.fields)
            .and_then(|()| Notification::parse(source, &doc.fields))
            .and_then(|n| limits::check_audience(source, &self.settings, &n).map(|()| n))
            .and_then(|n| MessageTemplate::new(&n).map(|t| (n, t)));
        let (n, template) = match parsed {
            Ok(parsed) => parsed,
            Err(invalid) => {
                self.forget(&doc.name);
                self.spawn_failure(doc, invalid.0);
                return;
            }
        };
        if let Some(at) = n.scheduled_time
            && at > now
        {
            if at > self.window_end(now) {
                // Nothing is kept for it: the sweep offers it again as it enters the window.
                self.forget(&doc.name);
                return;
            }
            self.timers.set(&doc.name, at, Wait::Schedule);
            self.metrics
                .documents_scheduled
                .set(self.timers.scheduled() as u64);
            return;
        }
        self.forget(&doc.name);
        let due = n
            .scheduled_time
            .or_else(|| doc.create_time.as_ref().and_then(store::from_timestamp));
        let late = due.map(|d| now - d).unwrap_or_default();
        let limit =
            chrono::Duration::from_std(self.settings.max_lateness).unwrap_or(chrono::Duration::MAX);
        // Whatever its status (absent, "" or a "started" that no live lease holds): an old
        // document is never sent late.
        if late > limit {
            self.metrics.notifications_expired.inc();
            let reason = format!(
                "expired: due {} but not sent within FFPUSH_MAX_LATENESS ({}s); create a new notification to send it now",
                due.map(|d| d.to_rfc3339()).unwrap_or_default(),
                self.settings.max_lateness.as_secs()
            );
            self.spawn_failure(doc, reason);
            return;
        }
        // Counted when due, and only when first taken up: a started one is a resumed send.
        if source == Source::App
            && status == Status::New
            && let Err(refused) = self.senders.check(&doc.name, &doc.fields)
        {
            self.spawn_failure(doc, refused.0);
            return;
        }
        // The check above only saves work: entering is what decides, in one step, so of two
        // offers racing here one goes on.
        let Some(running) = self.running.enter(&doc.name) else {
            return;
        };
        self.metrics.documents_in_progress.add(1);
        let this = self.clone();
        let span = self.span(&doc.name);
        let task = async move {
            let then = match this.process(doc, n, template).await {
                Ok(Outcome::ClaimedElsewhere) => {
                    tracing::debug!("changed or claimed by someone else first; reading it again");
                    Then::Lost
                }
                Ok(Outcome::LeaseLost) => {
                    tracing::warn!("lost the lease to another worker; stopped");
                    Then::Changed
                }
                Ok(Outcome::Interrupted) => {
                    tracing::info!("interrupted; progress saved, lease released");
                    Then::Leave
                }
                Ok(Outcome::Released(e)) => {
                    tracing::warn!(error = %Chain(&e),
                        "Firestore failed mid-send; progress saved and the lease released, to be resumed");
                    Then::Leave
                }
                Ok(Outcome::ChangedBeforeReport) => {
                    tracing::warn!("the document changed before the report; reading it again");
                    Then::Changed
                }
                Ok(Outcome::Reported(status, written)) => {
                    if status == Status::Succeeded {
                        this.metrics.notifications_succeeded.inc()
                    } else {
                        this.metrics.notifications_failed.inc()
                    }
                    Then::Done {
                        written: Some(written),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %Chain(&e),
                        "processing stopped; the document will be read again and taken up");
                    Then::Later
                }
            };
            this.metrics.documents_in_progress.add(-1);
            this.finish(running, then);
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// After Firestore failed on a document: read it again in a while (by its timer) and offer
    /// it then, whatever state it was left in.
    fn look_again_later(&self, name: &str) {
        self.read_again(name, self.settings.sweep_interval);
    }

    /// Reads `name` again after `delay` (by its timer) and offers what it holds then.
    fn read_again(&self, name: &str, delay: Duration) {
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(60));
        self.timers.set(name, Utc::now() + delay, Wait::Lease);
    }

    /// The task of `running` ended: leaves it and does what `then` says. Every version of a
    /// document is offered until it is finished: one that arrived while the document ran here,
    /// or that made one of our writes fail, is read again. Nothing loops: a document another
    /// worker holds waits for its lease (see [`Worker::offer`]), one that keeps changing is
    /// read again with a backoff, and only a precondition decides who sends.
    fn finish(&self, running: Entered, then: Then) {
        let name = running.name.clone();
        let lost = matches!(then, Then::Lost);
        match then {
            Then::Done { written } => {
                if running.leave(written) {
                    self.read_again(&name, Duration::ZERO);
                }
            }
            Then::Leave => drop(running),
            Then::Changed => {
                drop(running);
                self.read_again(&name, Duration::ZERO);
            }
            Then::Lost => {
                drop(running);
                let losses = {
                    let mut contested = self.contested();
                    let losses = contested.entry(name.clone()).or_insert(0);
                    *losses += 1;
                    *losses
                };
                self.read_again(&name, backoff_after(losses, self.settings.sweep_interval));
            }
            Then::Later => {
                drop(running);
                self.look_again_later(&name);
            }
        }
        if !lost {
            self.contested().remove(&name);
        }
    }

    fn contested(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.contested.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Documents due after this hold no timer (`FFPUSH_SCHEDULE_WINDOW`).
    fn window_end(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        chrono::Duration::from_std(self.settings.schedule_window)
            .ok()
            .and_then(|window| now.checked_add_signed(window))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// The `scheduled_time` range a sweep at `now` queries for documents entering the window:
    /// those that came within it since about the previous sweep (two intervals deep).
    pub fn entering_window(&self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let until = self.window_end(now);
        let depth = chrono::Duration::from_std(self.settings.sweep_interval * 2)
            .unwrap_or(chrono::Duration::MAX);
        (
            until.checked_sub_signed(depth).unwrap_or(now).max(now),
            until,
        )
    }

    /// The document was deleted, cancelled or finished: drop any timer for it.
    pub fn forget(&self, name: &str) {
        if !self.contested.lock().map(|c| c.is_empty()).unwrap_or(true) {
            self.contested().remove(name);
        }
        if self.timers.cancel(name) == Some(Wait::Schedule) {
            self.metrics
                .documents_scheduled
                .set(self.timers.scheduled() as u64);
        }
    }

    fn spawn_failure(self: &Arc<Self>, doc: pb::Document, reason: String) {
        let Some(running) = self.running.enter(&doc.name) else {
            return;
        };
        let this = self.clone();
        let span = self.span(&doc.name);
        let task = async move {
            let then = this.fail_unclaimed(&doc, &reason).await;
            this.finish(running, then);
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// Marks a document we never claimed as failed, unless someone changed it meanwhile. A
    /// dead worker's lease and progress go; what it had sent stays counted.
    async fn fail_unclaimed(&self, doc: &pb::Document, reason: &str) -> Then {
        let mut f = HashMap::new();
        f.insert("status".to_string(), store::string(Status::Failed.as_str()));
        f.insert("error".to_string(), store::string(reason));
        f.insert("completed_at".to_string(), store::timestamp(Utc::now()));
        let sent = crate::claim::sent_before(doc);
        f.insert("num_sent".to_string(), store::integer(sent as i64));
        let remove = [fields::LEASE, fields::PROGRESS];
        match self
            .store
            .update_fields(&doc.name, f, &remove, doc.update_time)
            .await
        {
            Ok(written) => {
                self.metrics.notifications_failed.inc();
                tracing::info!(error = reason, "notification failed");
                Then::Done {
                    written: Some(written),
                }
            }
            Err(store::Error::NotFound) => Then::Done { written: None },
            Err(store::Error::Conflict) => {
                tracing::debug!("changed by someone else first; reading it again");
                Then::Lost
            }
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "could not write the failure; will read it again");
                Then::Later
            }
        }
    }

    /// Claims the document, fans out while holding the lease, and writes the outcome.
    async fn process(
        self: &Arc<Self>,
        doc: pb::Document,
        n: Notification,
        template: MessageTemplate,
    ) -> Result<Outcome, store::Error> {
        let terms = LeaseTerms::new(self.settings.lease, self.settings.progress_interval);
        let Some(claim) = Claim::take(&self.store, terms, &self.settings.worker_id, &doc).await?
        else {
            return Ok(Outcome::ClaimedElsewhere);
        };
        tracing::info!(resumed_at = ?claim.resume.cursor, "claimed");

        let ledger = Arc::new(Mutex::new(Ledger::resume(&claim.resume)));
        let fan_stop = self.stop.child_token();
        let renewal = claim.renew(ledger.clone(), fan_stop.clone());
        let pages = audience::read(self.store.clone(), n.audience.clone());
        let without_tokens = pages.without_tokens.clone();
        let ctx = Context {
            sender: &self.sender,
            store: &self.store,
            metrics: &self.metrics,
            concurrency: self.settings.concurrency,
            retry: RetryPolicy::from_settings(&self.settings),
        };
        let result = fanout::fan_out(&ctx, &template, pages, ledger.clone(), fan_stop).await;
        if renewal.finish().await {
            return Ok(Outcome::LeaseLost);
        }
        let done = ledger.lock().map(|l| l.snapshot()).unwrap_or_default();
        let mut without = without_tokens.lock().map(|w| w.clone()).unwrap_or_default();
        if self.source_of(&doc.name) == Some(Source::App) {
            // The sender reads this document: how many have no device, never who.
            without.listed.clear();
        }
        let report = match result {
            Ok(tally) => Report::finished(&n, &tally, &without),
            Err(Abort::Store(e)) if e.is_transient() => {
                // Firestore is down: not the notification's fault. Release it to be resumed.
                claim.release(&done).await?;
                return Ok(Outcome::Released(e));
            }
            Err(Abort::Interrupted) => {
                // Shutdown: save where we are and let the lease go so another worker resumes.
                claim.release(&done).await?;
                return Ok(Outcome::Interrupted);
            }
            Err(e) => Report::aborted(&e, &done.tally),
        };
        let (status, f, remove) = report.into_fields();
        let written = match self
            .store
            .update_fields(&doc.name, f, &remove, Some(claim.version()))
            .await
        {
            Ok(written) => written,
            Err(store::Error::Conflict) => return Ok(Outcome::ChangedBeforeReport),
            Err(e) => return Err(e),
        };
        tracing::info!(status = %status, sent = done.tally.sent, tokens = done.tally.tokens, "notification finished");
        Ok(Outcome::Reported(status, written))
    }
}

/// How long a document that lost `losses` claims in a row waits before it is read again: not
/// at all for the first few (a document edited once right after it was written), then 1 s,
/// 2 s, 4 s… up to `cap`, the sweep interval (one that something rewrites all the time).
fn backoff_after(losses: u32, cap: Duration) -> Duration {
    match losses.checked_sub(LOSSES_BEFORE_BACKOFF) {
        None | Some(0) => Duration::ZERO,
        Some(n) => Duration::from_secs(1u64 << (n - 1).min(16)).min(cap),
    }
}

/// The notification's document id, for logs.
fn id_of(relative: &str) -> &str {
    relative.rsplit('/').next().unwrap_or(relative)
}

/// The documents being processed here, each with the newest update time of the versions
/// offered while it ran (which were skipped). Entering is one step under one lock, and only
/// the [`Entered`] guard of the one who entered removes the entry: a duplicate offer that lost
/// the race can never take the winner's entry away.
#[derive(Default)]
pub(crate) struct Running(Mutex<HashMap<String, Option<Timestamp>>>);

impl Running {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Timestamp>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `name` as processed here; `None` if it already is.
    pub fn enter(self: &Arc<Self>, name: &str) -> Option<Entered> {
        let mut map = self.map();
        if map.contains_key(name) {
            return None;
        }
        map.insert(name.to_string(), None);
        Some(Entered {
            running: self.clone(),
            name: name.to_string(),
            left: false,
        })
    }

    /// If `name` is processed here, remembers that a version written at `version` was offered
    /// meanwhile and returns true (the offer is skipped); else false.
    pub fn skip(&self, name: &str, version: Option<Timestamp>) -> bool {
        let mut map = self.map();
        let Some(newest) = map.get_mut(name) else {
            return false;
        };
        // A version without an update time counts as newer than anything.
        let version = version.unwrap_or(Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        });
        if newest.is_none_or(|n| later(&version, &n)) {
            *newest = Some(version);
        }
        true
    }

    #[cfg(test)]
    pub fn contains(&self, name: &str) -> bool {
        self.map().contains_key(name)
    }
}

/// `a` is a later update time than `b`.
fn later(a: &Timestamp, b: &Timestamp) -> bool {
    (a.seconds, a.nanos) > (b.seconds, b.nanos)
}

/// A document entered into [`Running`]; dropping it leaves.
pub(crate) struct Entered {
    running: Arc<Running>,
    name: String,
    /// Already left by [`Entered::leave`]: dropping must not remove a later entry.
    left: bool,
}

impl Entered {
    /// Leaves; true when a version later than `written` (our last write on the document; `None`:
    /// we wrote nothing) was offered while it ran here, so it must be read again.
    pub fn leave(mut self, written: Option<Timestamp>) -> bool {
        let skipped = self.running.map().remove(&self.name).flatten();
        self.left = true;
        match (skipped, written) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(skipped), Some(written)) => later(&skipped, &written),
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if !self.left {
            self.running.map().remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_one_who_entered_leaves() {
        let running = Arc::new(Running::default());
        let winner = running.enter("a").expect("first entry");
        let loser = running.enter("a");
        assert!(loser.is_none(), "a second entry while the first is in");
        drop(loser);
        assert!(
            running.contains("a"),
            "the loser must not remove the winner's entry"
        );
        drop(winner);
        assert!(!running.contains("a"));
        assert!(
            running.enter("a").is_some(),
            "free again once the winner left"
        );
    }

    #[test]
    fn a_document_that_keeps_losing_its_claim_is_read_again_ever_more_slowly() {
        let cap = Duration::from_secs(30);
        let waits: Vec<u64> = (1..=10).map(|n| backoff_after(n, cap).as_secs()).collect();
        assert_eq!(waits, [0, 0, 0, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff_after(u32::MAX, cap), cap);
    }

    fn at(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn a_version_offered_while_running_is_read_again_only_if_newer_than_our_last_write() {
        let running = Arc::new(Running::default());
        assert!(!running.skip("a", at(1)), "not running: offered as usual");

        let entered = running.enter("a").expect("entered");
        assert!(running.skip("a", at(5)), "our claim's own echo");
        assert!(running.skip("a", at(3)), "an older echo arriving late");
        assert!(!entered.leave(at(7)), "nothing newer than the report");
        assert!(!running.contains("a"));

        let entered = running.enter("a").expect("entered again");
        assert!(running.skip("a", at(9)), "an edit after our last write");
        assert!(entered.leave(at(7)));

        let entered = running.enter("a").expect("entered again");
        assert!(!entered.leave(None), "nothing was offered meanwhile");
        let entered = running.enter("a").expect("entered again");
        assert!(running.skip("a", at(2)));
        assert!(
            entered.leave(None),
            "we wrote nothing: whatever came is news"
        );
    }

    #[test]
    fn leaving_never_removes_a_later_entry() {
        let running = Arc::new(Running::default());
        let first = running.enter("a").expect("entered");
        assert!(!first.leave(None));
        let second = running.enter("a").expect("entered again");
        assert!(running.contains("a"));
        drop(second);
        assert!(!running.contains("a"));
    }

    #[test]
    fn racing_entries_let_exactly_one_in() {
        for round in 0..200 {
            let running = Arc::new(Running::default());
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let winners: usize = (0..4)
                .map(|_| {
                    let (running, barrier) = (running.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        // Held until every thread tried.
                        let entered = running.enter("doc");
                        barrier.wait();
                        usize::from(entered.is_some())
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap_or(0))
                .sum();
            assert_eq!(winners, 1, "round {round}");
        }
    }
}
