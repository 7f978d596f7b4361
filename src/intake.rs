//! Where documents come from: a Firestore Listen stream per collection (real time, reopened
//! with backoff after errors, resuming from the last resume token) and a periodic sweep query
//! for documents that no listener event or timer holds (abandoned leases, due schedules).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use firestore::gcloud_sdk::google::firestore::v1::{
    ListenRequest, StructuredQuery, Target, listen_request, listen_response,
    structured_query as sq, target, target_change::TargetChangeType,
};
use futures::StreamExt;

use crate::store;
use crate::worker::Worker;

/// Whether each listen stream is up (for `/readyz`).
#[derive(Default)]
pub struct ListenState {
    pub up: [AtomicBool; 2],
}

impl ListenState {
    pub fn all_up(&self) -> bool {
        self.up.iter().all(|u| u.load(Ordering::Relaxed))
    }
}

const TARGET_ID: i32 = 1;

/// Listens to `collection` until the worker stops.
pub async fn listen(worker: Arc<Worker>, collection: String, state: Arc<ListenState>, slot: usize) {
    let mut resume_token: Vec<u8> = Vec::new();
    let mut delay = Duration::from_millis(100);
    loop {
        let result = listen_once(
            &worker,
            &collection,
            &mut resume_token,
            &state,
            slot,
            &mut delay,
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
        match result {
            Ok(()) => tracing::warn!(collection, "listen stream ended; reopening"),
            Err(e) => {
                tracing::warn!(collection, error = %e, retry_in_ms = delay.as_millis() as u64, "listen stream failed; reopening")
            }
        }
        tokio::select! {
            _ = worker.stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn listen_once(
    worker: &Arc<Worker>,
    collection: &str,
    resume_token: &mut Vec<u8>,
    state: &ListenState,
    slot: usize,
    delay: &mut Duration,
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
                    let cause = change.cause.map(|c| c.message).unwrap_or_default();
                    return Err(store::Error::Unavailable {
                        code: firestore::gcloud_sdk::tonic::Code::Aborted,
                        message: format!("target removed: {cause}"),
                    });
                }
                if change.target_change_type == TargetChangeType::Current as i32 {
                    state.up[slot].store(true, Ordering::Relaxed);
                    *delay = Duration::from_millis(100);
                    tracing::debug!(collection, "listening");
                }
                if !change.resume_token.is_empty() && change.target_ids.is_empty() {
                    *resume_token = change.resume_token;
                }
            }
            listen_response::ResponseType::DocumentChange(change) => {
                if let Some(doc) = change.document {
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

/// Every `sweep_interval`: documents claimed but abandoned, and documents whose schedule is
/// due, are offered again. The worker ignores what it already holds.
pub async fn sweep(worker: Arc<Worker>) {
    loop {
        tokio::select! {
            _ = worker.stop.cancelled() => return,
            _ = tokio::time::sleep(worker.settings.sweep_interval) => {}
        }
        sweep_once(&worker).await;
    }
}

/// One sweep: also run after a listen stream reconnects, to catch up on what it missed.
pub async fn sweep_once(worker: &Arc<Worker>) {
    {
        for collection in [
            &worker.settings.collection,
            &worker.settings.user_collection,
        ] {
            match worker.store.with_status(collection, &["started"]).await {
                Ok(docs) => docs.into_iter().for_each(|d| worker.offer(d)),
                Err(e) => tracing::warn!(collection, error = %e, "sweep query failed"),
            }
            let now = Utc::now();
            let since = now
                - chrono::Duration::from_std(worker.settings.max_lateness)
                    .unwrap_or(chrono::Duration::days(1));
            match worker.store.due_between(collection, since, now).await {
                Ok(docs) => docs.into_iter().for_each(|d| worker.offer(d)),
                Err(e) => tracing::warn!(collection, error = %e, "sweep query failed"),
            }
            // Documents entering the schedule window since about the last sweep get their
            // timer now (later ones hold none). Two intervals deep, so that a late sweep
            // misses nothing; whatever a long outage skips is still found once due (above).
            let (from, until) = worker.entering_window(now);
            match worker.store.due_between(collection, from, until).await {
                Ok(docs) => docs.into_iter().for_each(|d| worker.offer(d)),
                Err(e) => tracing::warn!(collection, error = %e, "sweep query failed"),
            }
        }
    }
}
