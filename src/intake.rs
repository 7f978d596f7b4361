//! Where documents come from: a Firestore Listen stream per collection (real time, reopened
//! with backoff after errors, resuming from the last resume token) and a periodic sweep query
//! for documents that no listener event or timer holds (abandoned leases, due schedules).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use backoff::backoff::Backoff as _;
use chrono::{DateTime, Utc};
use firestore::gcloud_sdk::google::firestore::v1::{
    ListenRequest, StructuredQuery, Target, listen_request, listen_response,
    structured_query as sq, target, target_change::TargetChangeType,
};
use futures::StreamExt;

use crate::errors::Chain;
use crate::store;
use crate::worker::Worker;

/// Whether each listen stream has caught up (for `/readyz`).
#[derive(Default)]
pub struct ListenState {
    /// The stream is open and has handed its whole initial snapshot to the worker: Firestore
    /// marked the target `CURRENT` and then sent a consistent snapshot point (a `NO_CHANGE`
    /// for all targets with a `read_time`). Cleared when the stream ends, set again once the
    /// reopened stream's snapshot is through.
    pub up: [AtomicBool; 2],
    /// Both streams have replayed their collection once: the start-up catch-up is done.
    caught_up: AtomicBool,
    /// Documents the streams handed to the worker (replays included).
    received: AtomicU64,
}

impl ListenState {
    /// Both streams have handed over a consistent snapshot of their collection.
    pub fn all_up(&self) -> bool {
        self.up.iter().all(|u| u.load(Ordering::Relaxed))
    }

    /// Documents the listen streams have handed to the worker so far, replays included.
    pub fn documents_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

const TARGET_ID: i32 = 1;

/// Listens to `collection` until the worker stops.
pub async fn listen(worker: Arc<Worker>, collection: String, state: Arc<ListenState>, slot: usize) {
    let mut resume_token: Vec<u8> = Vec::new();
    let mut backoff = store::backoff(Duration::from_millis(100), Duration::from_secs(30), None);
    loop {
        let result = listen_once(
            &worker,
            &collection,
            &mut resume_token,
            &state,
            slot,
            &mut backoff,
        )
        .await;
        state.up[slot].store(false, Ordering::Relaxed);
        if worker.stop.is_cancelled() {
            return;
        }
        worker.metrics.listener_reconnects.inc();
        tokio::spawn({
            let worker = worker.clone();
            async move { sweep_once(&worker).await }
        });
        let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
        match result {
            Ok(()) => tracing::warn!(collection, "listen stream ended; reopening"),
            Err(e) => {
                tracing::warn!(collection, error = %Chain(&e), retry_in_ms = delay.as_millis() as u64, "listen stream failed; reopening")
            }
        }
        tokio::select! {
            _ = worker.stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn listen_once(
    worker: &Arc<Worker>,
    collection: &str,
    resume_token: &mut Vec<u8>,
    state: &ListenState,
    slot: usize,
    backoff: &mut backoff::ExponentialBackoff,
) -> Result<(), store::Error> {
    let store = &worker.store;
    let request = ListenRequest {
        database: store.database_path().to_string(),
        target_change: Some(listen_request::TargetChange::AddTarget(Target {
            target_id: TARGET_ID,
            target_type: Some(target::TargetType::Query(target::QueryTarget {
                parent: store.documents_path().to_string(),
                query_type: Some(target::query_target::QueryType::StructuredQuery(
                    StructuredQuery {
                        from: vec![sq::CollectionSelector {
                            collection_id: collection.to_string(),
                            all_descendants: false,
                        }],
                        ..Default::default()
                    },
                )),
            })),
            resume_type: (!resume_token.is_empty())
                .then(|| target::ResumeType::ResumeToken(resume_token.clone())),
            ..Default::default()
        })),
        ..Default::default()
    };
    // The request stream must stay open for as long as we listen.
    let requests = futures::stream::iter([request]).chain(futures::stream::pending());
    let mut responses = store.client().listen(requests).await?.into_inner();
    // Our target has received all its documents (`CURRENT`) and no `RESET` came since.
    let mut current = false;
    loop {
        let next = tokio::select! {
            _ = worker.stop.cancelled() => return Ok(()),
            next = responses.next() => next,
        };
        let Some(response) = next else { return Ok(()) };
        let Some(event) = response?.response_type else {
            continue;
        };
        match event {
            listen_response::ResponseType::TargetChange(change) => {
                if change.target_change_type == TargetChangeType::Remove as i32 {
                    use firestore::gcloud_sdk::tonic::{Code, Status};
                    // Firestore's own status for the removal, when it gives one.
                    let status = match change.cause {
                        Some(c) => Status::new(
                            Code::from_i32(c.code),
                            format!("target removed: {}", c.message),
                        ),
                        None => Status::aborted("target removed"),
                    };
                    return Err(store::Error::Unavailable(store::Grpc(status)));
                }
                if change.target_change_type == TargetChangeType::Current as i32 {
                    current = true;
                } else if change.target_change_type == TargetChangeType::Reset as i32 {
                    // Firestore sends the target's documents again; it is current once more
                    // at its next `CURRENT`. Readiness, once reached, stays: a reset resends
                    // what the worker has seen, plus the changes.
                    current = false;
                } else if is_snapshot_point(&change)
                    && current
                    && !state.up[slot].swap(true, Ordering::Relaxed)
                {
                    // Every document of the initial snapshot came before this event, and
                    // `offer` takes each synchronously: the replay is handed over.
                    backoff.reset();
                    tracing::debug!(collection, "listening, caught up");
                    if state.all_up() && !state.caught_up.swap(true, Ordering::Relaxed) {
                        caught_up_at_start(worker);
                    }
                }
                if !change.resume_token.is_empty() && change.target_ids.is_empty() {
                    *resume_token = change.resume_token;
                }
            }
            listen_response::ResponseType::DocumentChange(change) => {
                if let Some(doc) = change.document {
                    state.received.fetch_add(1, Ordering::Relaxed);
                    worker.offer(doc);
                }
            }
            listen_response::ResponseType::DocumentDelete(delete) => {
                worker.forget(&delete.document)
            }
            listen_response::ResponseType::DocumentRemove(remove) => {
                worker.forget(&remove.document)
            }
            listen_response::ResponseType::Filter(_) => {}
        }
    }
}

/// A consistent snapshot point: `NO_CHANGE` for all targets (no target ids) with a read time.
/// Everything sent before it is consistent as of that time
/// (<https://github.com/googleapis/googleapis/blob/master/google/firestore/v1/firestore.proto>,
/// `TargetChange.target_ids`).
fn is_snapshot_point(change: &firestore::gcloud_sdk::google::firestore::v1::TargetChange) -> bool {
    change.target_change_type == TargetChangeType::NoChange as i32
        && change.target_ids.is_empty()
        && change.read_time.is_some()
}

/// The one line at start saying how many documents the replay found too old to send.
fn caught_up_at_start(worker: &Worker) {
    let expired = worker.metrics.notifications_expired.get();
    let max_lateness_secs = worker.settings.max_lateness.as_secs();
    tracing::info!(
        expired,
        max_lateness_secs,
        "caught up at start: {expired} notification(s) due longer ago than FFPUSH_MAX_LATENESS ({max_lateness_secs}s) failed as expired, none sent"
    );
}

/// Every `sweep_interval`: documents claimed but abandoned, and documents whose schedule is
/// due, are offered again. The worker ignores what it already holds.
///
/// Firestore cannot query for a missing field, and FlutterFlow writes no `status` until the
/// document is processed, so the due query cannot leave finished documents out. It leaves out
/// what earlier passes read instead: each pass's window starts where the last complete pass
/// ended (less one interval of overlap), so a pass reads the documents that came due since,
/// not a whole `FFPUSH_MAX_LATENESS` of finished ones. The first pass, and the pass after a
/// listen stream reconnects ([`sweep_once`]), read the whole window.
pub async fn sweep(worker: Arc<Worker>) {
    let mut swept_until = None;
    loop {
        tokio::select! {
            _ = worker.stop.cancelled() => return,
            _ = tokio::time::sleep(worker.settings.sweep_interval) => {}
        }
        swept_until = sweep_from(&worker, swept_until).await;
    }
}

/// One sweep over the whole window: also run after a listen stream reconnects, to catch up on
/// what it missed.
pub async fn sweep_once(worker: &Arc<Worker>) {
    sweep_from(worker, None).await;
}

/// Offers documents claimed but abandoned, and documents due since `since` (less one interval;
/// `None`: the whole lateness window). Returns where the next pass may start: now, or `since`
/// again if a due query failed.
async fn sweep_from(worker: &Arc<Worker>, since: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    let now = Utc::now();
    let oldest = now
        - chrono::Duration::from_std(worker.settings.max_lateness)
            .unwrap_or(chrono::Duration::days(1));
    let overlap = chrono::Duration::from_std(worker.settings.sweep_interval).unwrap_or_default();
    let from = since.map_or(oldest, |s| (s - overlap).max(oldest));
    let mut complete = true;
    for collection in [
        &worker.settings.collection,
        &worker.settings.user_collection,
    ] {
        match worker
            .store
            .with_status(collection, &[crate::model::Status::Started])
            .await
        {
            Ok(docs) => docs.into_iter().for_each(|d| worker.offer(d)),
            Err(e) => tracing::warn!(collection, error = %Chain(&e), "sweep query failed"),
        }
        let due = worker
            .store
            .due_between(collection, from, now, |d| worker.offer(d))
            .await;
        if let Err(e) = due {
            complete = false;
            tracing::warn!(collection, error = %Chain(&e), "sweep query failed");
        }
        // Documents entering the schedule window since about the last sweep get their timer
        // now (later ones hold none). Two intervals deep, so that a late sweep misses nothing;
        // whatever a long outage skips is still found once due (above).
        let (enter_from, enter_until) = worker.entering_window(now);
        let entering = worker
            .store
            .due_between(collection, enter_from, enter_until, |d| worker.offer(d))
            .await;
        if let Err(e) = entering {
            tracing::warn!(collection, error = %Chain(&e), "sweep query failed");
        }
    }
    if complete { Some(now) } else { since }
}
