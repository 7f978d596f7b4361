//! One notification document from intake to report: decide whether it is ours to do (status,
//! schedule, lease), claim it with an update-time precondition, fan out while holding and
//! extending the lease (with progress), then write the outcome with a field mask.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audience;
use crate::config::Settings;
use crate::fanout::{self, Abort, Context, Ledger, Progress, RetryPolicy, Tally};
use crate::fcm::{MessageTemplate, Sender};
use crate::metrics::Metrics;
use crate::model::{Notification, Source, Status, pb};
use crate::report::Report;
use crate::schedule::{Timers, Wait};
use crate::store::{self, Store, prost_types_timestamp::Timestamp};

/// Fields ffpush adds to a notification document besides FlutterFlow's.
pub mod fields {
    pub const WORKER: &str = "ffpush_worker";
    pub const LEASE: &str = "ffpush_lease_expires_at";
    pub const PROGRESS: &str = "ffpush_progress";
}

/// Shared state of a running worker.
pub struct Worker {
    pub settings: Settings,
    pub store: Store,
    pub sender: Arc<Sender>,
    pub metrics: Arc<Metrics>,
    /// Documents being processed here right now.
    running: Mutex<HashSet<String>>,
    timers: Timers,
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
            settings,
            store,
            sender,
            metrics,
            running: Mutex::new(HashSet::new()),
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

    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
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
                Err(e) => tracing::warn!(doc = %relative, error = %e,
                    "could not re-read a due document; the sweep will retry"),
            }
        }
    }

    /// A document was seen (listen, sweep or timer). Cheap for documents already finished or
    /// already handled here: the emulator resends whole collections on every write.
    pub fn offer(self: &Arc<Self>, doc: pb::Document) {
        let status = Status::of(&doc);
        if let Status::Finished(_) = status {
            self.forget(&doc.name);
            return;
        }
        if self.stop.is_cancelled() || self.running().contains(&doc.name) {
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
        let parsed = Notification::parse(source, &doc.fields)
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
        if late > limit && status == Status::New {
            let reason = format!(
                "expired: due {} but not sent within FFPUSH_MAX_LATENESS ({}s); create a new notification to send it now",
                due.map(|d| d.to_rfc3339()).unwrap_or_default(),
                self.settings.max_lateness.as_secs()
            );
            self.spawn_failure(doc, reason);
            return;
        }
        self.running().insert(doc.name.clone());
        self.metrics.documents_in_progress.add(1);
        let this = self.clone();
        self.tasks.spawn(async move {
            let name = doc.name.clone();
            if let Err(e) = this.process(doc, n, template).await {
                tracing::warn!(doc = %this.store.relative(&name), error = %e,
                    "processing stopped; the document will be taken up again when its lease expires");
            }
            this.metrics.documents_in_progress.add(-1);
            this.running().remove(&name);
        });
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
        self.running().insert(doc.name.clone());
        let this = self.clone();
        self.tasks.spawn(async move {
            this.fail_unclaimed(&doc, &reason).await;
            this.running().remove(&doc.name);
        });
    }

    /// Marks a document we never claimed as failed, unless someone changed it meanwhile.
    async fn fail_unclaimed(&self, doc: &pb::Document, reason: &str) {
        let mut f = HashMap::new();
        f.insert("status".to_string(), store::string("failed"));
        f.insert("error".to_string(), store::string(reason));
        f.insert("completed_at".to_string(), store::timestamp(Utc::now()));
        f.insert("num_sent".to_string(), store::integer(0));
        match self
            .store
            .update_fields(&doc.name, f, &[], doc.update_time)
            .await
        {
            Ok(_) => {
                self.metrics.notifications_failed.inc();
                tracing::info!(doc = %self.store.relative(&doc.name), error = reason, "notification failed");
            }
            Err(store::Error::Conflict | store::Error::NotFound) => {}
            Err(e) => {
                tracing::warn!(doc = %self.store.relative(&doc.name), error = %e, "could not write the failure")
            }
        }
    }

    async fn process(
        self: &Arc<Self>,
        doc: pb::Document,
        n: Notification,
        template: MessageTemplate,
    ) -> Result<(), store::Error> {
        let relative = self.store.relative(&doc.name).to_string();
        let now = Utc::now();
        let resume = if Status::of(&doc) == Status::Started {
            read_progress(&doc)
        } else {
            Progress::default()
        };
        let mut claim = HashMap::new();
        claim.insert("status".to_string(), store::string("started"));
        if store::timestamp_field(&doc, "started_at").is_none() {
            claim.insert("started_at".to_string(), store::timestamp(now));
        }
        claim.insert(
            fields::WORKER.to_string(),
            store::string(&self.settings.worker_id),
        );
        claim.insert(
            fields::LEASE.to_string(),
            store::timestamp(now + lease(&self.settings)),
        );
        let version = match self
            .store
            .update_fields(&doc.name, claim, &[], doc.update_time)
            .await
        {
            Ok(t) => t,
            Err(store::Error::Conflict | store::Error::NotFound) => {
                tracing::debug!(doc = %relative, "claimed by someone else first");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        tracing::info!(doc = %relative, notification_id = id_of(&relative), resumed_at = ?resume.cursor, "claimed");

        let version = Arc::new(Mutex::new(version));
        let ledger = Arc::new(Mutex::new(Ledger::resume(&resume)));
        let fan_stop = self.stop.child_token();
        let lost = CancellationToken::new();
        let renew_stop = CancellationToken::new();
        let renewal = tokio::spawn(renew_lease(
            self.clone(),
            doc.name.clone(),
            version.clone(),
            ledger.clone(),
            fan_stop.clone(),
            lost.clone(),
            renew_stop.clone(),
        ));
        let pages = audience::read(self.store.clone(), n.audience.clone());
        let without_tokens = pages.without_tokens.clone();
        let ctx = Context {
            sender: &self.sender,
            store: &self.store,
            metrics: &self.metrics,
            concurrency: self.settings.concurrency,
            retry: RetryPolicy {
                max_attempts: self.settings.max_attempts,
                base: Duration::from_millis(500),
                max_backoff: self.settings.max_backoff,
                quota_floor: self.settings.quota_floor,
                budget: self.settings.retry_budget,
            },
        };
        let result =
            fanout::fan_out(&ctx, &template, pages, ledger.clone(), fan_stop.clone()).await;
        renew_stop.cancel();
        let _ = renewal.await;
        if lost.is_cancelled() {
            tracing::warn!(doc = %relative, "lost the lease to another worker; stopped");
            return Ok(());
        }
        let last_version = *version.lock().unwrap_or_else(|e| e.into_inner());
        let done = ledger.lock().map(|l| l.snapshot()).unwrap_or_default();
        let without = without_tokens.lock().map(|w| w.clone()).unwrap_or_default();
        let report = match result {
            Ok(tally) => Report::finished(&n, &tally, &without),
            Err(Abort::Store(e)) if e.is_transient() => {
                // Firestore is down: not the notification's fault. Release it to be resumed.
                self.release(&doc.name, &done, last_version).await?;
                return Err(e);
            }
            Err(Abort::Interrupted) => {
                // Shutdown: save where we are and let the lease go so another worker resumes.
                self.release(&doc.name, &done, last_version).await?;
                tracing::info!(doc = %relative, cursor = ?done.cursor, "interrupted; progress saved, lease released");
                return Ok(());
            }
            Err(e) => Report::aborted(&e, &done.tally),
        };
        let (status, f, remove) = report.into_fields();
        match self
            .store
            .update_fields(&doc.name, f, &remove, Some(last_version))
            .await
        {
            Ok(_) => {}
            Err(store::Error::Conflict) => {
                tracing::warn!(doc = %relative, "the document changed before the report; leaving it");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if status == "succeeded" {
            self.metrics.notifications_succeeded.inc();
        } else {
            self.metrics.notifications_failed.inc();
        }
        tracing::info!(doc = %relative, notification_id = id_of(&relative), status, sent = done.tally.sent, tokens = done.tally.tokens, "notification finished");
        Ok(())
    }
}

impl Worker {
    /// Writes progress and lets the lease go, so the next worker resumes at once.
    async fn release(
        &self,
        name: &str,
        done: &Progress,
        version: Timestamp,
    ) -> Result<(), store::Error> {
        let mut f = progress_fields(done);
        f.insert(fields::LEASE.to_string(), store::timestamp(Utc::now()));
        self.store
            .update_fields(name, f, &[], Some(version))
            .await
            .map(|_| ())
    }
}

/// The notification's document id, for logs.
fn id_of(relative: &str) -> &str {
    relative.rsplit('/').next().unwrap_or(relative)
}

fn lease(settings: &Settings) -> chrono::Duration {
    chrono::Duration::from_std(settings.lease).unwrap_or(chrono::Duration::seconds(60))
}

/// Every `progress_interval` (at most a third of the lease), writes progress and extends the
/// lease. A precondition on our last write detects a takeover: then the fan-out is stopped.
async fn renew_lease(
    worker: Arc<Worker>,
    name: String,
    version: Arc<Mutex<Timestamp>>,
    ledger: Arc<Mutex<Ledger>>,
    fan_stop: CancellationToken,
    lost: CancellationToken,
    done: CancellationToken,
) {
    let every = worker
        .settings
        .progress_interval
        .min(worker.settings.lease / 3);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let snapshot = ledger.lock().map(|l| l.snapshot()).unwrap_or_default();
        let mut f = progress_fields(&snapshot);
        f.insert(
            fields::LEASE.to_string(),
            store::timestamp(Utc::now() + lease(&worker.settings)),
        );
        let current = *version.lock().unwrap_or_else(|e| e.into_inner());
        match worker
            .store
            .update_fields(&name, f, &[], Some(current))
            .await
        {
            Ok(t) => *version.lock().unwrap_or_else(|e| e.into_inner()) = t,
            Err(store::Error::Conflict | store::Error::NotFound) => {
                lost.cancel();
                fan_stop.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not extend the lease; will try again"),
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
            sender_id_mismatch: n("sender_id_mismatch"),
            third_party_auth: n("third_party_auth"),
            undelivered: n("undelivered"),
        },
    }
}
