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

use crate::admit::{Admission, Admitted, Slot};
use crate::audience;
use crate::claim::{self, Claim, ClaimError, LeaseTerms, Lost};
use crate::config::Settings;
use crate::errors::Chain;
use crate::fanout::{self, Abort, Context, Finished, Ledger, RetryPolicy};
use crate::fcm::Sender;
use crate::fields;
use crate::language::{LanguageReader, Messages};
use crate::limits::{self, SenderRate};
use crate::metrics::Metrics;
use crate::model::{Notification, Source, Status, pb};
use crate::report::{Fields, Report};
use crate::schedule::{Timers, Wait};
use crate::store::{self, Store, prost_types_timestamp::Timestamp};

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
    /// Cancelled by its sender while its progress was being saved: it keeps `cancelled`.
    Cancelled,
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
    /// Documents in progress here (at most `FFPUSH_MAX_DOCUMENTS`) and those queued for a slot.
    admission: Arc<Admission>,
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

/// What a document offered here calls for, by what it holds and the time: see [`decide`].
#[derive(Debug)]
enum Decision {
    /// Claim and send it now (boxed: a message with its options is far larger than the rest).
    Send(Box<(Notification, Messages)>),
    /// Nothing before `at`: look again then (its `scheduled_time`, or when another worker's
    /// lease runs out).
    At(DateTime<Utc>, Wait),
    /// Nothing to do, because…
    Skip(Skip),
    /// Fail it without sending, because…
    Fail(Refusal),
}

/// Why a document offered here is left alone.
#[derive(Debug, PartialEq, Eq)]
enum Skip {
    /// Its status says it is done (succeeded, failed, cancelled, validated or foreign).
    Finished,
    /// Due beyond `FFPUSH_SCHEDULE_WINDOW`: nothing is kept for it; the sweep offers it again
    /// as it enters the window.
    BeyondWindow,
}

/// Why a document is failed without being sent.
#[derive(Debug)]
enum Refusal {
    /// It breaks the document contract or a limit (the reason, phrased).
    Invalid(String),
    /// Due at `due` (or written then) and not sent within `limit` (`FFPUSH_MAX_LATENESS`).
    Expired {
        due: Option<DateTime<Utc>>,
        limit: Duration,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(reason) => f.write_str(reason),
            Refusal::Expired { due, limit } => write!(
                f,
                "expired: due {} but not sent within FFPUSH_MAX_LATENESS ({}s); create a new notification to send it now",
                due.map(|d| d.to_rfc3339()).unwrap_or_default(),
                limit.as_secs()
            ),
        }
    }
}

/// What is started for a document taken up here.
enum Task {
    /// Fail it without sending, for this reason.
    Fail(String),
    /// Claim and send it.
    Send(Box<(Notification, Messages)>),
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
            admission: Admission::new(settings.max_documents, metrics.clone()),
            settings,
            store,
            sender,
            metrics,
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

    /// Takes the queued documents as slots free, in due order, until shutdown: each is read
    /// again from Firestore and offered with what it holds now, in its slot.
    pub async fn dispatch(self: Arc<Self>) {
        loop {
            let (relative, slot) = tokio::select! {
                _ = self.stop.cancelled() => return,
                next = self.admission.next(|r| self.store.doc_name(r)) => next,
            };
            let this = self.clone();
            let span = self.span(slot.name());
            let task = async move {
                match this.store.get(&relative).await {
                    Ok(Some(doc)) => this.offer_in(doc, slot),
                    Ok(None) => {
                        this.forget(slot.name());
                        drop(slot);
                    }
                    Err(e) => {
                        tracing::warn!(error = %Chain(&e),
                            "could not read a queued document; will try again");
                        this.look_again_later(slot.name());
                        drop(slot);
                    }
                }
            };
            self.tasks.spawn(task.instrument(span));
        }
    }

    /// A document was seen (listen, sweep or timer). Cheap for documents already finished or
    /// already handled here: the emulator resends whole collections on every write.
    pub fn offer(self: &Arc<Self>, doc: pb::Document) {
        if Status::of(&doc).is_finished() {
            self.forget(&doc.name);
            return;
        }
        if self.stop.is_cancelled() {
            return;
        }
        // A version arriving while the document is in progress here is not lost: the task's
        // end compares it with what the task wrote, and reads the document again if it is
        // newer.
        if self.admission.skip(&doc.name, doc.update_time) {
            return;
        }
        // A queued document is read again when its turn comes: this version may be stale by
        // then.
        let relative = self.store.relative(&doc.name);
        if self.admission.is_queued(relative) {
            return;
        }
        let Some(task) = self.take_up(&doc, true) else {
            return;
        };
        // Deciding only saves work: admission is what decides, in one step, so of two offers
        // racing here one goes on (and a document beyond the limit waits its turn).
        let relative = relative.to_string();
        match self
            .admission
            .admit(&doc.name, &relative, doc.update_time, due_of(&doc))
        {
            Admitted::Now(slot) => self.start(doc, slot, task),
            Admitted::Later => {}
        }
    }

    /// [`Worker::offer`] for a document already in its slot: read again after waiting in the
    /// queue, or after its claim lost.
    fn offer_in(self: &Arc<Self>, doc: pb::Document, slot: Slot) {
        if Status::of(&doc).is_finished() {
            self.forget(&doc.name);
        }
        match self.take_up(&doc, false) {
            None => {
                let due = slot.due();
                if slot.leave(doc.update_time) {
                    let relative = self.store.relative(&doc.name);
                    self.admission.requeue(&doc.name, relative, due);
                }
            }
            Some(task) => self.start(doc, slot, task),
        }
    }

    /// What `doc` calls for now, by [`decide`], with its timer set or dropped to match:
    /// `None` when nothing is to start now. `first`: the document is offered (not read again
    /// from its slot), which counts a found-expired one.
    fn take_up(&self, doc: &pb::Document, first: bool) -> Option<Task> {
        if self.stop.is_cancelled() {
            return None;
        }
        let source = self.source_of(&doc.name)?;
        let name = &doc.name;
        match decide(doc, source, &self.settings, Utc::now()) {
            Decision::Skip(Skip::Finished) => None,
            Decision::Skip(Skip::BeyondWindow) => {
                self.forget_timer(name);
                None
            }
            Decision::At(at, wait) => {
                self.timers.set(name, at, wait);
                if wait == Wait::Schedule {
                    self.metrics
                        .documents_scheduled
                        .set(self.timers.scheduled() as u64);
                }
                None
            }
            Decision::Fail(refusal) => {
                self.forget_timer(name);
                if first && matches!(refusal, Refusal::Expired { .. }) {
                    self.metrics.notifications_expired.inc();
                }
                Some(Task::Fail(refusal.to_string()))
            }
            Decision::Send(send) => {
                self.forget_timer(name);
                Some(Task::Send(send))
            }
        }
    }

    /// Starts `task` for `doc` in its slot.
    fn start(self: &Arc<Self>, doc: pb::Document, slot: Slot, task: Task) {
        let (n, template) = match task {
            Task::Fail(reason) => return self.spawn_failure(doc, slot, reason),
            Task::Send(send) => *send,
        };
        // Counted when it starts, and only when first taken up: a started one is a resumed
        // send. A document offered again within the minute is not counted twice.
        if self.source_of(&doc.name) == Some(Source::App)
            && Status::of(&doc) == Status::New
            && let Err(refused) = self.senders.check(&doc.name, &doc.fields)
        {
            return self.spawn_failure(doc, slot, refused.0);
        }
        self.metrics.documents_in_progress.add(1);
        let this = self.clone();
        let span = self.span(&doc.name);
        let task = async move {
            let processed = this.process(doc, n, template).await;
            let then = this.then_after(processed);
            this.metrics.documents_in_progress.add(-1);
            this.finish(slot, then);
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// What becomes of a document whose processing ended so (logged, and counted when its
    /// outcome was written).
    fn then_after(&self, processed: Result<Outcome, store::Error>) -> Then {
        match processed {
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
            Ok(Outcome::Deleted) => {
                tracing::info!("the notification was deleted while it was sent; stopped");
                Then::Done { written: None }
            }
            Ok(Outcome::Cancelled) => {
                tracing::info!("cancelled while it was sent; stopped");
                Then::Done { written: None }
            }
            Ok(Outcome::Reported(status, written)) => {
                match status {
                    Status::Succeeded => self.metrics.notifications_succeeded.inc(),
                    // A dry run, or stopped by its sender: not a failure.
                    Status::Validated | Status::Cancelled => {}
                    _ => self.metrics.notifications_failed.inc(),
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
        }
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

    /// The task of `slot` ended: frees the slot and does what `then` says. Every version of a
    /// document is offered until it is finished: one that arrived while the document was in
    /// progress here, or that made one of our writes fail, is read again (back in the queue,
    /// at its due time: first in line). Nothing loops: a document another worker holds waits
    /// for its lease (see [`Worker::offer`]), one that keeps changing is read again with a
    /// backoff, and only a precondition decides who sends.
    fn finish(&self, slot: Slot, then: Then) {
        let name = slot.name().to_string();
        let relative = self.store.relative(&name).to_string();
        let lost = matches!(then, Then::Lost);
        match then {
            Then::Done { written } => {
                let due = slot.due();
                if slot.leave(written) {
                    self.admission.requeue(&name, &relative, due);
                }
            }
            Then::Leave => drop(slot),
            Then::Changed => slot.requeue(&relative),
            Then::Lost => {
                let losses = {
                    let mut contested = self.contested();
                    let losses = contested.entry(name.clone()).or_insert(0);
                    *losses += 1;
                    *losses
                };
                match backoff_after(losses, self.settings.sweep_interval) {
                    Duration::ZERO => slot.requeue(&relative),
                    pause => {
                        drop(slot);
                        self.read_again(&name, pause);
                    }
                }
            }
            Then::Later => {
                drop(slot);
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

    /// The `scheduled_time` range a sweep at `now` queries for documents entering the window:
    /// those that came within it since about the previous sweep (two intervals deep).
    pub fn entering_window(&self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let until = window_end(&self.settings, now);
        let depth = chrono::Duration::from_std(self.settings.sweep_interval * 2)
            .unwrap_or(chrono::Duration::MAX);
        (
            until.checked_sub_signed(depth).unwrap_or(now).max(now),
            until,
        )
    }

    /// The document was deleted, cancelled or finished: drop its timer and its place in the
    /// queue.
    pub fn forget(&self, name: &str) {
        if !self.contested.lock().map(|c| c.is_empty()).unwrap_or(true) {
            self.contested().remove(name);
        }
        self.admission.forget(self.store.relative(name));
        self.forget_timer(name);
    }

    /// Drops any timer for `name`.
    fn forget_timer(&self, name: &str) {
        if self.timers.cancel(name) == Some(Wait::Schedule) {
            self.metrics
                .documents_scheduled
                .set(self.timers.scheduled() as u64);
        }
    }

    fn spawn_failure(self: &Arc<Self>, doc: pb::Document, slot: Slot, reason: String) {
        let this = self.clone();
        let span = self.span(&doc.name);
        let task = async move {
            let then = this.fail_unclaimed(&doc, &reason).await;
            this.finish(slot, then);
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// Marks a document we never claimed as failed, unless someone changed it meanwhile. A
    /// dead worker's lease and progress go; what it had sent stays counted.
    async fn fail_unclaimed(&self, doc: &pb::Document, reason: &str) -> Then {
        let failure = Fields::outcome(Status::Failed)
            .text(fields::ERROR, Some(reason))
            .count(fields::NUM_SENT, claim::sent_before(doc));
        // Conditioned on the version read: a document someone changed since is not failed.
        let written = claim::complete_unclaimed(&self.store, doc, failure).await;
        match written {
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
        template: Messages,
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
        // A dry run reads the languages of the few tokens it tries only (in `send`).
        let languages = (!n.options.dry_run)
            .then(|| self.language_reader(&template))
            .flatten();
        let pages =
            audience::read_with_languages(self.store.clone(), n.audience.clone(), languages);
        let without_tokens = pages.without_tokens.clone();
        let result = self
            .send(&claim, &n, &template, pages, ledger.clone(), fan_stop)
            .await;
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
        let status = report.status().clone();
        let written = match claim.complete(report).await {
            Ok(written) => written,
            Err(ClaimError::Lost(Lost::Cancelled)) => return self.stopped(&claim, &ledger).await,
            Err(lost_or_failed) => return settled(Err(lost_or_failed), Outcome::Interrupted),
        };
        tracing::info!(status = %status, sent = done.tally.sent, tokens = done.tally.tokens, "notification finished");
        Ok(Outcome::Reported(status, written))
    }
}

/// What `doc`, a document of `source`, calls for at `now`: a decision from the document and
/// the clock alone. A document that another worker's live lease holds waits for it to run
/// out; one that breaks the contract or a limit fails; one due later waits for its time (or,
/// due beyond the window, for the sweep); one due too long ago fails, whatever its status
/// (absent, "" or a "started" that no live lease holds): an old document is never sent late.
fn decide(doc: &pb::Document, source: Source, settings: &Settings, now: DateTime<Utc>) -> Decision {
    let status = Status::of(doc);
    if status.is_finished() {
        return Decision::Skip(Skip::Finished);
    }
    if status == Status::Started
        && let Some(until) = store::timestamp_field(doc, fields::LEASE)
        && until > now
    {
        return Decision::At(until + chrono::Duration::milliseconds(200), Wait::Lease);
    }
    // App documents: the size first, before anything is parsed; then the recipients.
    let parsed = limits::check_document(source, settings, &doc.fields)
        .and_then(|()| Notification::parse(source, &doc.fields))
        .and_then(|n| limits::check_audience(source, settings, &n).map(|()| n))
        .and_then(|n| Messages::new(&n).map(|t| (n, t)));
    let (n, template) = match parsed {
        Ok(parsed) => parsed,
        Err(invalid) => return Decision::Fail(Refusal::Invalid(invalid.0)),
    };
    if let Some(at) = n.scheduled_time
        && at > now
    {
        if at > window_end(settings, now) {
            return Decision::Skip(Skip::BeyondWindow);
        }
        return Decision::At(at, Wait::Schedule);
    }
    let due = n
        .scheduled_time
        .or_else(|| doc.create_time.as_ref().and_then(store::from_timestamp));
    let late = due.map(|d| now - d).unwrap_or_default();
    let limit = chrono::Duration::from_std(settings.max_lateness).unwrap_or(chrono::Duration::MAX);
    // One that waited in the queue past the limit too.
    if late > limit {
        return Decision::Fail(Refusal::Expired {
            due,
            limit: settings.max_lateness,
        });
    }
    Decision::Send(Box::new((n, template)))
}

/// Documents due after this hold no timer (`FFPUSH_SCHEDULE_WINDOW`).
fn window_end(settings: &Settings, now: DateTime<Utc>) -> DateTime<Utc> {
    chrono::Duration::from_std(settings.schedule_window)
        .ok()
        .and_then(|window| now.checked_add_signed(window))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// When `doc` was due: its `scheduled_time`, else when it was written (its place in the queue).
fn due_of(doc: &pb::Document) -> DateTime<Utc> {
    store::timestamp_field(doc, "scheduled_time")
        .or_else(|| doc.create_time.as_ref().and_then(store::from_timestamp))
        .unwrap_or_else(Utc::now)
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

impl Worker {
    /// Sends `template` to every token of `pages` while `claim`'s gate is open, or, for a dry
    /// run, validates it on them.
    async fn send(
        &self,
        claim: &Claim,
        n: &Notification,
        template: &Messages,
        pages: audience::TokenPages,
        ledger: Arc<Mutex<Ledger>>,
        fan_stop: CancellationToken,
    ) -> Result<Finished, Abort> {
        let ctx = Context {
            sender: &self.sender,
            store: &self.store,
            metrics: &self.metrics,
            concurrency: self.settings.concurrency,
            retry: RetryPolicy::from_settings(&self.settings),
            gate: Some(claim.gate()),
        };
        if n.options.dry_run {
            let languages = self.language_reader(template);
            fanout::validate(&ctx, template, pages, languages.as_ref(), fan_stop)
                .await
                .map(Finished::Validated)
        } else {
            fanout::fan_out(&ctx, template, pages, ledger, fan_stop)
                .await
                .map(Finished::Sent)
        }
    }

    /// The reader of the recipients' language fields, for a notification with translations
    /// only (one without them reads no user document).
    fn language_reader(&self, template: &Messages) -> Option<LanguageReader> {
        template.is_localized().then(|| {
            LanguageReader::new(
                self.store.clone(),
                self.settings.language_field.clone(),
                self.metrics.clone(),
            )
        })
    }

    /// The document was cancelled while it was sent: the fan-out has stopped; write the counts
    /// so far onto it, keeping `cancelled`.
    async fn stopped(
        &self,
        claim: &Claim,
        ledger: &Mutex<Ledger>,
    ) -> Result<Outcome, store::Error> {
        let done = ledger.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
        tracing::info!(
            sent = done.tally.sent,
            tokens = done.tally.tokens,
            "cancelled while it was sent; stopped"
        );
        match claim.complete(Report::cancelled(&done.tally)).await {
            Ok(written) => Ok(Outcome::Reported(Status::Cancelled, written)),
            Err(e) => settled(Err(e), Outcome::Cancelled),
        }
    }
}

/// What a write of a held document means for its processing: `done` when it was written.
fn settled(written: Result<(), ClaimError>, done: Outcome) -> Result<Outcome, store::Error> {
    match written {
        Ok(()) => Ok(done),
        Err(ClaimError::Lost(Lost::TakenOver)) => Ok(Outcome::LeaseLost),
        Err(ClaimError::Lost(Lost::Deleted)) => Ok(Outcome::Deleted),
        // Cancelled while its progress was saved: the document keeps `cancelled`.
        Err(ClaimError::Lost(Lost::Cancelled)) => Ok(Outcome::Cancelled),
        Err(ClaimError::Store(e)) => Err(e),
    }
}

/// The notification's document id, for logs.
fn id_of(relative: &str) -> &str {
    relative.rsplit('/').next().unwrap_or(relative)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SettingsArgs;

    fn settings() -> Settings {
        Settings::from_args(&SettingsArgs {
            project: Some("demo-project".into()),
            ..Default::default()
        })
        .unwrap()
    }

    /// A console document written at `written`, with `extra` fields.
    fn document(written: DateTime<Utc>, extra: &[(&str, pb::Value)]) -> pb::Document {
        let mut fields: HashMap<String, pb::Value> = [
            ("notification_title", store::string("t")),
            ("notification_text", store::string("b")),
            ("user_refs", store::string("users/a")),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        fields.retain(|_, v| v.value_type.is_some());
        pb::Document {
            name: "projects/p/databases/(default)/documents/ff_push_notifications/n".into(),
            fields,
            create_time: Some(store::to_timestamp(written)),
            update_time: Some(store::to_timestamp(written)),
        }
    }

    fn decided(doc: &pb::Document, now: DateTime<Utc>) -> Decision {
        decide(doc, Source::Console, &settings(), now)
    }

    #[test]
    fn a_fresh_document_is_sent_and_a_finished_one_skipped() {
        let now = Utc::now();
        let doc = document(now, &[]);
        assert!(matches!(decided(&doc, now), Decision::Send(_)));
        for status in ["succeeded", "failed", "cancelled", "validated", "sent"] {
            let doc = document(now, &[("status", store::string(status))]);
            assert!(
                matches!(decided(&doc, now), Decision::Skip(Skip::Finished)),
                "{status}"
            );
        }
    }

    #[test]
    fn a_live_lease_is_waited_for_and_a_dead_ones_document_taken_over() {
        let now = Utc::now();
        let until = now + chrono::Duration::seconds(30);
        let held = |until: DateTime<Utc>| {
            document(
                now,
                &[
                    ("status", store::string("started")),
                    (fields::LEASE, store::timestamp(until)),
                ],
            )
        };
        match decided(&held(until), now) {
            Decision::At(at, Wait::Lease) => {
                assert_eq!(at, until + chrono::Duration::milliseconds(200))
            }
            other => panic!("{other:?}"),
        }
        let expired = held(now - chrono::Duration::seconds(1));
        assert!(matches!(decided(&expired, now), Decision::Send(_)));
    }

    #[test]
    fn a_scheduled_document_waits_for_its_time_within_the_window_only() {
        let now = Utc::now();
        let settings = settings();
        let soon = now + chrono::Duration::seconds(10);
        let doc = document(now, &[("scheduled_time", store::timestamp(soon))]);
        match decided(&doc, now) {
            Decision::At(at, Wait::Schedule) => assert_eq!(at, soon),
            other => panic!("{other:?}"),
        }
        let beyond = window_end(&settings, now) + chrono::Duration::seconds(1);
        let doc = document(now, &[("scheduled_time", store::timestamp(beyond))]);
        assert!(matches!(
            decided(&doc, now),
            Decision::Skip(Skip::BeyondWindow)
        ));
        // Its time come, it is sent.
        assert!(matches!(decided(&doc, beyond), Decision::Send(_)));
    }

    #[test]
    fn a_document_due_too_long_ago_fails_as_expired_whatever_its_status() {
        let now = Utc::now();
        let limit = settings().max_lateness;
        let written =
            now - chrono::Duration::from_std(limit).unwrap() - chrono::Duration::seconds(1);
        for status in ["", "started"] {
            let doc = document(written, &[("status", store::string(status))]);
            match decided(&doc, now) {
                Decision::Fail(refusal @ Refusal::Expired { .. }) => {
                    let text = refusal.to_string();
                    assert!(
                        text.starts_with(&format!("expired: due {}", written.to_rfc3339()))
                            && text
                                .contains(&format!("FFPUSH_MAX_LATENESS ({}s)", limit.as_secs())),
                        "{text}"
                    );
                }
                other => panic!("{status:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_document_breaking_the_contract_fails_with_the_reason() {
        let now = Utc::now();
        let doc = document(now, &[("user_refs", pb::Value::default())]);
        match decided(&doc, now) {
            Decision::Fail(Refusal::Invalid(reason)) => {
                assert!(reason.starts_with("no recipients"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_document_that_keeps_losing_its_claim_is_read_again_ever_more_slowly() {
        let cap = Duration::from_secs(30);
        let waits: Vec<u64> = (1..=10).map(|n| backoff_after(n, cap).as_secs()).collect();
        assert_eq!(waits, [0, 0, 0, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff_after(u32::MAX, cap), cap);
    }
}
