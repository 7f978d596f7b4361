//! One notification document from intake to report: decide whether it is ours to do (status,
//! schedule, lease), claim it with an update-time precondition, fan out while holding and
//! extending the lease (with progress), then write the outcome with a field mask.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::audience;
use crate::claim::{Claim, ClaimError, LeaseTerms, Lost, fields};
use crate::config::Settings;
use crate::errors::Chain;
use crate::fanout::{self, Abort, Context, Finished, Ledger, RetryPolicy};
use crate::fcm::{MessageTemplate, Sender};
use crate::limits::{self, SenderRate};
use crate::metrics::Metrics;
use crate::model::{Notification, Source, Status, pb};
use crate::report::Report;
use crate::schedule::{Timers, Wait};
use crate::store::{self, Store};

/// How processing one claimed-or-not document ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Someone else changed the document first (claimed, finished or deleted it).
    ClaimedElsewhere,
    /// Another worker took the lease over mid-send; it carries on from our progress.
    LeaseLost,
    /// The document was deleted mid-send: sending stopped, nothing to report.
    Deleted,
    /// Shutdown: progress saved and the lease released for another worker to resume.
    Interrupted,
    /// Firestore failed while reading tokens: progress saved, lease released, resumed later.
    Released(store::Error),
    /// The outcome was written onto the document.
    Reported(Status),
}

/// Shared state of a running worker.
pub struct Worker {
    pub settings: Settings,
    pub store: Store,
    pub sender: Arc<Sender>,
    pub metrics: Arc<Metrics>,
    /// Documents being processed here right now.
    running: Arc<Running>,
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
                Ok(None) => {}
                Err(e) => self.span(&name).in_scope(|| {
                    tracing::warn!(error = %Chain(&e),
                        "could not re-read a due document; the sweep will retry")
                }),
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
        if self.stop.is_cancelled() || self.running.contains(&doc.name) {
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
            let name = doc.name.clone();
            match this.process(doc, n, template).await {
                Ok(Outcome::ClaimedElsewhere) => {
                    tracing::debug!("claimed by someone else first")
                }
                Ok(Outcome::LeaseLost) => {
                    tracing::warn!("lost the lease to another worker; stopped")
                }
                Ok(Outcome::Interrupted) => {
                    tracing::info!("interrupted; progress saved, lease released")
                }
                Ok(Outcome::Released(e)) => tracing::warn!(error = %Chain(&e),
                    "Firestore failed mid-send; progress saved and the lease released, to be resumed"),
                Ok(Outcome::Deleted) => {
                    tracing::info!("the notification was deleted while it was sent; stopped")
                }
                Ok(Outcome::Reported(Status::Succeeded)) => {
                    this.metrics.notifications_succeeded.inc()
                }
                // A dry run, or stopped by its sender: not a failure.
                Ok(Outcome::Reported(Status::Validated | Status::Cancelled)) => {}
                Ok(Outcome::Reported(_)) => this.metrics.notifications_failed.inc(),
                Err(e) => {
                    tracing::warn!(error = %Chain(&e),
                        "processing stopped; the document will be read again and taken up");
                    this.look_again_later(&name);
                }
            }
            this.metrics.documents_in_progress.add(-1);
            drop(running);
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// After Firestore failed on a document: read it again in a while (by its timer) and offer
    /// it then, whatever state it was left in.
    fn look_again_later(&self, name: &str) {
        let retry = chrono::Duration::from_std(self.settings.sweep_interval)
            .unwrap_or(chrono::Duration::seconds(60));
        self.timers.set(name, Utc::now() + retry, Wait::Lease);
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
            this.fail_unclaimed(&doc, &reason).await;
            drop(running);
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// Marks a document we never claimed as failed, unless someone changed it meanwhile. A
    /// dead worker's lease and progress go; what it had sent stays counted.
    async fn fail_unclaimed(&self, doc: &pb::Document, reason: &str) {
        let mut f = HashMap::new();
        f.insert("status".to_string(), store::string(Status::Failed.as_str()));
        f.insert("error".to_string(), store::string(reason));
        f.insert("completed_at".to_string(), store::timestamp(Utc::now()));
        let sent = crate::claim::sent_before(doc);
        f.insert("num_sent".to_string(), store::integer(sent as i64));
        let remove = [fields::LEASE, fields::PROGRESS];
        // Conditioned on the version read: a document someone changed since is not failed.
        let written = match doc.update_time {
            Some(read_at) => {
                self.store
                    .update_fields(&doc.name, f, &remove, read_at)
                    .await
            }
            None => Err(store::Error::Incomplete("update_time")),
        };
        match written {
            Ok(_) => {
                self.metrics.notifications_failed.inc();
                tracing::info!(error = reason, "notification failed");
            }
            Err(store::Error::Conflict | store::Error::NotFound) => {}
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "could not write the failure; will read it again");
                self.look_again_later(&doc.name);
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
            gate: Some(claim.gate()),
        };
        let result = if n.options.dry_run {
            fanout::validate(&ctx, &template, pages, fan_stop)
                .await
                .map(Finished::Validated)
        } else {
            fanout::fan_out(&ctx, &template, pages, ledger.clone(), fan_stop)
                .await
                .map(Finished::Sent)
        };
        match renewal.finish().await.lost {
            Some(Lost::TakenOver) => return Ok(Outcome::LeaseLost),
            Some(Lost::Deleted) => return Ok(Outcome::Deleted),
            Some(Lost::Cancelled) => return self.stopped(&claim, &ledger).await,
            None => {}
        }
        let done = ledger.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
        let mut without = without_tokens.lock().map(|w| w.clone()).unwrap_or_default();
        if self.source_of(&doc.name) == Some(Source::App) {
            // The sender reads this document: how many have no device, never who.
            without.listed.clear();
        }
        let report = match result {
            Ok(Finished::Sent(tally)) => Report::finished(&n, &tally, &without),
            Ok(Finished::Validated(found)) => Report::validated(&n, &found, &without),
            Err(Abort::Store(e)) if e.is_transient() => {
                // Firestore is down: not the notification's fault. Release it to be resumed.
                return settled(claim.release(&done).await, Outcome::Released(e));
            }
            Err(Abort::Interrupted) => {
                // Shutdown: save where we are and let the lease go so another worker resumes.
                return settled(claim.release(&done).await, Outcome::Interrupted);
            }
            Err(e) => Report::aborted(&e, &done.tally),
        };
        let (status, f, remove) = report.into_fields();
        if let Err(lost_or_failed) = claim.report(f, &remove).await {
            if let ClaimError::Lost(Lost::Cancelled) = lost_or_failed {
                return self.stopped(&claim, &ledger).await;
            }
            return settled(Err(lost_or_failed), Outcome::Reported(status));
        }
        tracing::info!(status = %status, sent = done.tally.sent, tokens = done.tally.tokens, "notification finished");
        Ok(Outcome::Reported(status))
    }
}

impl Worker {
    /// The document was cancelled while it was sent: the fan-out has stopped; write the counts
    /// so far onto it, keeping `cancelled`.
    async fn stopped(
        &self,
        claim: &Claim,
        ledger: &Mutex<Ledger>,
    ) -> Result<Outcome, store::Error> {
        let done = ledger.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
        let (_, f, remove) = Report::cancelled(&done.tally).into_fields();
        tracing::info!(
            sent = done.tally.sent,
            tokens = done.tally.tokens,
            "cancelled while it was sent; stopped"
        );
        settled(
            claim.report(f, &remove).await,
            Outcome::Reported(Status::Cancelled),
        )
    }
}

/// What a write of a held document means for its processing: `done` when it was written.
fn settled(written: Result<(), ClaimError>, done: Outcome) -> Result<Outcome, store::Error> {
    match written {
        Ok(()) => Ok(done),
        Err(ClaimError::Lost(Lost::TakenOver)) => Ok(Outcome::LeaseLost),
        Err(ClaimError::Lost(Lost::Deleted)) => Ok(Outcome::Deleted),
        // Cancelled while its progress was saved: the document keeps `cancelled`.
        Err(ClaimError::Lost(Lost::Cancelled)) => Ok(Outcome::Reported(Status::Cancelled)),
        Err(ClaimError::Store(e)) => Err(e),
    }
}

/// The notification's document id, for logs.
fn id_of(relative: &str) -> &str {
    relative.rsplit('/').next().unwrap_or(relative)
}

/// The documents being processed here. Entering is one step under one lock, and only the
/// [`Entered`] guard of the one who entered removes the entry: a duplicate offer that lost the
/// race can never take the winner's entry away.
#[derive(Default)]
pub(crate) struct Running(Mutex<HashSet<String>>);

impl Running {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `name` as processed here; `None` if it already is.
    pub fn enter(self: &Arc<Self>, name: &str) -> Option<Entered> {
        self.set().insert(name.to_string()).then(|| Entered {
            running: self.clone(),
            name: name.to_string(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.set().contains(name)
    }
}

/// A document entered into [`Running`]; dropping it leaves.
pub(crate) struct Entered {
    running: Arc<Running>,
    name: String,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.running.set().remove(&self.name);
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
