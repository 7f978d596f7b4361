//! The instances of one project find each other through Firestore and share `FFPUSH_FCM_RATE`.
//!
//! FCM's quota is the project's, while each instance paces its own sends (several run under
//! load, and old and new revisions side by side during a rollout). So each instance keeps a
//! heartbeat document in [`COLLECTION`], renewed every `FFPUSH_HEARTBEAT_INTERVAL`, saying
//! what it paces at (its share) and whether it wants more; at each renewal it reads everyone's
//! and sets its share from them ([`plan`]):
//!
//! - The rate shared is the lowest `FFPUSH_FCM_RATE` among the live instances: a rollout that
//!   raises it takes effect once the old revision has stopped.
//! - An instance that its pace does not hold back is given what it uses (twice that, at least
//!   [`IDLE_RESERVE`] of an equal share); the rest is split equally among those it does hold
//!   back. When nobody is held back, all hold equal shares, so whichever gets a large
//!   notification can start at once.
//! - An instance lowers its share at once, before publishing it, and raises it only into room
//!   the others have published, after publishing it. A newcomer therefore starts with what is
//!   left (often nothing) and grows as the others, at their next renewal, make room: the shares
//!   in force never add up to more than the rate.
//!
//! Liveness is judged on Firestore's clock alone, never on an instance's own: a heartbeat
//! counts as gone once it is past the lifetime it states ([`LIFETIME_BEATS`] renewals, so four
//! may be missed) at the `update_time` (set by Firestore) of a renewal of the instance judging
//! it. Skew between the instances' clocks therefore cannot make one look alive or gone, and
//! neither can a stall of Firestore or of every instance at once: that leaves every heartbeat
//! old, but none is outlived by a renewal made while the others' were due. A gone heartbeat's
//! share returns to the others at their next renewal, and the first instance to see it deletes
//! it (on the condition that it was not renewed meanwhile). On a graceful stop an instance
//! deletes its own once its sends have drained.
//!
//! When Firestore cannot be reached, an instance keeps its last share while its last heartbeat
//! still counts as alive for the others: `LIFETIME_BEATS − 1` intervals from when that renewal
//! was sent, on its own monotonic clock (one interval short of the lifetime, for the write's
//! own delay). After that the others have taken its share back, so it holds every send (share
//! 0) until a renewal succeeds. It could not read tokens nor record its progress meanwhile
//! anyway, and a send whose progress is not recorded may be sent again by whoever takes the
//! document over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use firestore::gcloud_sdk::google::firestore::v1::{
    self as pb, Document, Precondition, RunQueryRequest, StructuredQuery, Value, precondition,
    run_query_request, structured_query as sq, value,
};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::errors::Chain;
use crate::fcm::{PaceLoad, Sender};
use crate::metrics::Metrics;
use crate::store::{self, Error, Store, prost_types_timestamp::Timestamp};

/// ffpush's own collection of heartbeats, one document per running instance. Service
/// accounts only: `migrations/firestore.rules` lets no app user read or write it.
pub const COLLECTION: &str = "ffpush_instances";

/// A heartbeat not renewed for this many intervals counts as gone.
pub const LIFETIME_BEATS: u32 = 5;

/// What an instance its pace does not hold back keeps at least, as a part of an equal share:
/// enough to start a small notification at once while another instance sends a large one.
pub const IDLE_RESERVE: f64 = 0.02;

/// An instance wants more than its share when at least this part of the sends of the last
/// interval waited for the pace, or sends are waiting now.
const HELD_BACK: f64 = 0.25;

/// The fields of a heartbeat document.
mod fields {
    pub const WORKER: &str = "worker";
    pub const RATE: &str = "rate";
    pub const SHARE: &str = "share";
    pub const HELD_BACK: &str = "held_back";
    pub const USED: &str = "used";
    pub const LIFETIME_MS: &str = "lifetime_ms";
    pub const STARTED_AT: &str = "started_at";
    pub const EXPIRES_AT: &str = "expires_at";
}

/// One instance's heartbeat, as read from [`COLLECTION`].
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    /// The document id.
    pub id: String,
    /// Its `FFPUSH_WORKER` id, as on the documents it claims.
    pub worker: String,
    /// Its `FFPUSH_FCM_RATE` (0: unpaced).
    pub rate: u32,
    /// What it paces at, messages per second.
    pub share: f64,
    /// Its pace holds it back: it wants more than its share.
    pub held_back: bool,
    /// Messages per second it let through over its last interval.
    pub used: f64,
    /// How long after its renewal it still counts as alive.
    pub lifetime: Duration,
    /// When Firestore last wrote it (its `update_time`).
    pub renewed: Timestamp,
}

impl Heartbeat {
    /// A heartbeat document; `None` if it is not one (a field missing or of another type).
    pub fn from_document(doc: &Document) -> Option<Heartbeat> {
        let id = doc.name.rsplit('/').next()?.to_string();
        let number = |name: &str| match doc.fields.get(name)?.value_type.as_ref()? {
            value::ValueType::IntegerValue(n) => Some(*n as f64),
            value::ValueType::DoubleValue(x) => Some(*x),
            _ => None,
        };
        let held_back = match doc
            .fields
            .get(fields::HELD_BACK)
            .and_then(|v| v.value_type.as_ref())
        {
            Some(value::ValueType::BooleanValue(b)) => *b,
            _ => false,
        };
        Some(Heartbeat {
            id,
            worker: doc
                .fields
                .get(fields::WORKER)
                .and_then(crate::model::string_value)
                .unwrap_or_default()
                .to_string(),
            rate: number(fields::RATE)?.clamp(0.0, f64::from(u32::MAX)) as u32,
            share: number(fields::SHARE)?.max(0.0),
            held_back,
            used: number(fields::USED).unwrap_or(0.0).max(0.0),
            lifetime: Duration::from_millis(number(fields::LIFETIME_MS)?.max(0.0) as u64),
            renewed: doc.update_time?,
        })
    }

    /// Whether it still counts as alive at `now`, a time on Firestore's clock (the
    /// `update_time` of the judging instance's own renewal, or a query's `read_time`).
    pub fn alive_at(&self, now: &Timestamp) -> bool {
        match (
            store::from_timestamp(&self.renewed),
            store::from_timestamp(now),
        ) {
            (Some(renewed), Some(now)) => {
                let lifetime =
                    chrono::Duration::from_std(self.lifetime).unwrap_or(chrono::Duration::MAX);
                now < renewed + lifetime
            }
            _ => false,
        }
    }
}

/// What an instance knows of itself when it plans.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Own {
    /// Its `FFPUSH_FCM_RATE` (0: unpaced).
    pub rate: u32,
    pub held_back: bool,
    /// Messages per second over the last interval.
    pub used: f64,
}

/// An instance's share, from the others' heartbeats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// The rate all share: the lowest `FFPUSH_FCM_RATE` of the paced instances (0: this one
    /// is unpaced).
    pub rate: f64,
    /// Live instances, this one included.
    pub instances: usize,
    /// What this instance may pace at, whole messages per second.
    pub share: f64,
    /// What it would pace at once the others have made room for it (≥ `share`).
    pub target: f64,
}

/// This instance's share, given the live instances' heartbeats (`others`: not its own).
/// Unpaced instances (`FFPUSH_FCM_RATE=0`) take no part: they are counted, nothing more.
pub fn plan(own: Own, others: &[Heartbeat]) -> Plan {
    let instances = others.len() + 1;
    if own.rate == 0 {
        return Plan {
            rate: 0.0,
            instances,
            share: 0.0,
            target: 0.0,
        };
    }
    let peers: Vec<&Heartbeat> = others.iter().filter(|h| h.rate > 0).collect();
    let rate = peers.iter().map(|h| h.rate).fold(own.rate, u32::min).into();
    let reserve = rate / (peers.len() + 1) as f64 * IDLE_RESERVE;
    let want = |held_back: bool, used: f64| {
        if held_back {
            f64::INFINITY
        } else {
            (2.0 * used).max(reserve)
        }
    };
    let mut wants = vec![want(own.held_back, own.used)];
    wants.extend(peers.iter().map(|h| want(h.held_back, h.used)));
    let target = fill(rate, &wants)[0].floor();
    // Only into room the others have published: theirs may not have come down yet.
    let room = rate - peers.iter().map(|h| h.share).sum::<f64>();
    Plan {
        rate,
        instances,
        share: target.min(room.floor()).max(0.0),
        target,
    }
}

/// Shares `total` by max-min fairness: each want met if it is below an equal part of what is
/// left, the rest split equally among the others; what nobody wants is split equally, so the
/// shares always add up to `total`.
fn fill(total: f64, wants: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by(|&a, &b| wants[a].total_cmp(&wants[b]));
    let mut shares = vec![0.0; wants.len()];
    let mut left = total;
    for (i, &who) in order.iter().enumerate() {
        let give = wants[who].min(left / (wants.len() - i) as f64);
        shares[who] = give;
        left -= give;
    }
    if left > 0.0 && !wants.is_empty() {
        let each = left / wants.len() as f64;
        shares.iter_mut().for_each(|s| *s += each);
    }
    shares
}

/// Messages per second let through between two readings, and whether the pace held them back.
fn demand(before: PaceLoad, now: PaceLoad, elapsed: Duration) -> (f64, bool) {
    let sends = now.sends.saturating_sub(before.sends);
    let waited = now.waited.saturating_sub(before.waited);
    let used = sends as f64 / elapsed.as_secs_f64().max(0.001);
    let held_back = now.waiting > 0 || (waited > 0 && waited as f64 >= HELD_BACK * sends as f64);
    (used, held_back)
}

/// The heartbeat document id of a worker id (`revision/pid/random`): `/` is not allowed in
/// an id.
pub fn document_id(worker: &str) -> String {
    let id: String = worker
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(200)
        .collect();
    if id.is_empty() || id.starts_with("__") || id.chars().all(|c| c == '.') {
        format!("i{id}")
    } else {
        id
    }
}

/// Every heartbeat in [`COLLECTION`], and the time (Firestore's) they were read at.
pub async fn read(store: &Store) -> Result<(Vec<Heartbeat>, Timestamp), Error> {
    let request = RunQueryRequest {
        parent: store.documents_path().to_string(),
        query_type: Some(run_query_request::QueryType::StructuredQuery(
            StructuredQuery {
                from: vec![sq::CollectionSelector {
                    collection_id: COLLECTION.to_string(),
                    all_descendants: false,
                }],
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let mut stream = store.client().run_query(request).await?.into_inner();
    let mut heartbeats = Vec::new();
    let mut read_time = None;
    while let Some(item) = stream.next().await {
        let item = item?;
        if item.read_time.is_some() {
            read_time = item.read_time;
        }
        if let Some(doc) = item.document {
            match Heartbeat::from_document(&doc) {
                Some(heartbeat) => heartbeats.push(heartbeat),
                None => tracing::debug!(
                    document = %doc.name,
                    "not a heartbeat in {COLLECTION}; ignored"
                ),
            }
        }
    }
    let read_time = read_time.ok_or(Error::Incomplete("read_time"))?;
    Ok((heartbeats, read_time))
}

fn double(x: f64) -> Value {
    Value {
        value_type: Some(value::ValueType::DoubleValue(x)),
    }
}

fn boolean(b: bool) -> Value {
    Value {
        value_type: Some(value::ValueType::BooleanValue(b)),
    }
}

/// This instance's membership: its heartbeat, renewed in the background, and its share set
/// on the sender from everyone's. [`Membership::leave`] ends it; dropped without leaving, it
/// stops renewing and the heartbeat expires, as a crashed instance's does.
pub struct Membership {
    stop: CancellationToken,
    task: Option<JoinHandle<Heart>>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The renewal loop's own state.
struct Heart {
    store: Store,
    sender: Arc<Sender>,
    metrics: Arc<Metrics>,
    /// The heartbeat document's full name.
    name: String,
    worker: String,
    rate: u32,
    interval: Duration,
    started_at: DateTime<Utc>,
    /// The share in force on the sender.
    share: f64,
    /// Live instances at the last renewal, this one included.
    instances: usize,
    /// Published at the last renewal: the pace held this instance back.
    held_back: bool,
    /// Its share is below what it would take once the others make room: renew sooner.
    growing: bool,
    /// The pace's counts at the last renewal, and when they were read.
    load: PaceLoad,
    load_at: Instant,
    /// When the last renewal that succeeded was sent.
    renewed_sent: Option<Instant>,
    /// Renewals are failing (logged once, and once more when they succeed again).
    failing: bool,
}

impl Membership {
    /// Publishes this instance's heartbeat and sets its first share, before it sends
    /// anything (until then every send is held), then keeps renewing it. Waits with backoff
    /// while Firestore is unavailable; gives up only when the error is not transient or
    /// `cancel` fires.
    pub async fn join(
        store: Store,
        sender: Arc<Sender>,
        metrics: Arc<Metrics>,
        settings: &Settings,
        cancel: &CancellationToken,
    ) -> Result<Membership, Error> {
        sender.set_share(0.0);
        let name = format!(
            "{}/{COLLECTION}/{}",
            store.documents_path(),
            document_id(&settings.worker_id)
        );
        let mut heart = Heart {
            store,
            load: sender.pace_load(),
            sender,
            metrics,
            name,
            worker: settings.worker_id.clone(),
            rate: settings.fcm_rate,
            interval: settings.heartbeat_interval,
            started_at: Utc::now(),
            share: 0.0,
            instances: 1,
            held_back: false,
            growing: false,
            load_at: Instant::now(),
            renewed_sent: None,
            failing: false,
        };
        let mut policy = store::backoff(Duration::from_millis(200), Duration::from_secs(10), None);
        loop {
            let e = match heart.beat().await {
                Ok(()) => break,
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            let wait = backoff::backoff::Backoff::next_backoff(&mut policy)
                .unwrap_or(Duration::from_secs(10));
            tracing::warn!(error = %Chain(&e), retry_in_ms = wait.as_millis() as u64, "publishing this instance's heartbeat in {COLLECTION} failed; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(
            instances = heart.instances,
            share = heart.share as u64,
            fcm_rate = heart.rate,
            "joined the instances of this project: this instance paces at its share of FFPUSH_FCM_RATE"
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(heart.run(stop.clone()));
        Ok(Membership {
            stop,
            task: Some(task),
        })
    }

    /// Stops renewing and deletes this instance's heartbeat, so the others take its share at
    /// their next renewal. Call it once this instance's sends have drained.
    pub async fn leave(mut self) {
        self.stop.cancel();
        let Some(task) = self.task.take() else {
            return;
        };
        let Ok(heart) = task.await else {
            return;
        };
        heart.sender.set_share(0.0);
        let request = pb::DeleteDocumentRequest {
            name: heart.name.clone(),
            ..Default::default()
        };
        let mut client = heart.store.client();
        match tokio::time::timeout(Duration::from_secs(2), client.delete_document(request)).await {
            Ok(Ok(_)) => tracing::info!("left the instances of this project"),
            Ok(Err(status)) => {
                tracing::warn!(error = %Chain(&Error::from(status)), "could not delete this instance's heartbeat; it expires on its own")
            }
            Err(_) => tracing::warn!(
                "deleting this instance's heartbeat timed out; it expires on its own"
            ),
        }
    }
}

impl Heart {
    async fn run(mut self, stop: CancellationToken) -> Heart {
        let hold_after = self.interval * (LIFETIME_BEATS - 1);
        let sender = self.sender.clone();
        loop {
            // While its pace holds it back, or the others have yet to make room for it, an
            // instance renews four times as often: it takes room as soon as the others
            // publish it, and gives its own back soon after its sends end. At once when its
            // pace starts holding it back.
            let pause = if self.growing || self.held_back {
                self.interval / 4
            } else {
                self.interval
            };
            tokio::select! {
                _ = stop.cancelled() => return self,
                _ = tokio::time::sleep(pause) => {}
                _ = sender.held_back(), if !self.held_back => {}
            }
            // A renewal that hangs must not hold up the check below past its time.
            let hold_at = self.renewed_sent.map(|sent| sent + hold_after);
            let limit = match hold_at {
                Some(at) if at > Instant::now() => at - Instant::now(),
                _ => hold_after,
            }
            .max(self.interval);
            let result = tokio::select! {
                _ = stop.cancelled() => return self,
                result = tokio::time::timeout(limit, self.beat()) => result,
            };
            match result {
                Ok(Ok(())) => {
                    if std::mem::take(&mut self.failing) {
                        tracing::info!(
                            share = self.share as u64,
                            "this instance's heartbeat is renewed again"
                        );
                    }
                }
                Ok(Err(e)) => self.failed(&e.to_string(), Some(&e)),
                Err(_) => self.failed("timed out", None),
            }
            if self
                .renewed_sent
                .is_some_and(|sent| sent.elapsed() > hold_after)
                && self.share > 0.0
            {
                tracing::warn!(
                    "this instance's heartbeat has not been renewed for its lifetime: the other instances have taken its share of FFPUSH_FCM_RATE, so it holds every FCM send until a renewal succeeds"
                );
                self.apply(0.0);
            }
        }
    }

    fn failed(&mut self, what: &str, error: Option<&Error>) {
        if !std::mem::replace(&mut self.failing, true) {
            let error = error.map(|e| Chain(e).to_string()).unwrap_or_default();
            tracing::warn!(%error, what, share = self.share as u64, "renewing this instance's heartbeat failed: it keeps its share while its last heartbeat counts as alive");
        }
    }

    /// One renewal: read everyone's heartbeats, plan, lower at once, publish, raise.
    async fn beat(&mut self) -> Result<(), Error> {
        let (heartbeats, _) = read(&self.store).await?;
        let load = self.sender.pace_load();
        let now = Instant::now();
        let (used, held_back) = demand(self.load, load, now - self.load_at);
        self.load = load;
        self.load_at = now;
        let own_id = self.name.rsplit('/').next().unwrap_or_default();
        let mine = heartbeats
            .iter()
            .find(|h| h.id == own_id)
            .map(|h| h.renewed);
        let mut others = Vec::new();
        for heartbeat in heartbeats {
            if heartbeat.id == own_id {
                continue;
            }
            if mine.is_some_and(|mine| !heartbeat.alive_at(&mine)) {
                self.bury(&heartbeat).await;
            } else {
                others.push(heartbeat);
            }
        }
        let plan = plan(
            Own {
                rate: self.rate,
                held_back,
                used,
            },
            &others,
        );
        let before = (self.instances, self.share);
        if plan.share < self.share {
            self.apply(plan.share);
        }
        let sent = Instant::now();
        self.publish(plan.share, held_back, used).await?;
        self.renewed_sent = Some(sent);
        if plan.share > self.share {
            self.apply(plan.share);
        }
        self.instances = plan.instances;
        self.held_back = held_back;
        self.growing = plan.share < plan.target;
        self.metrics.instances.set(plan.instances as u64);
        if before.0 != plan.instances {
            tracing::info!(
                instances = plan.instances,
                share = self.share as u64,
                previous_share = before.1 as u64,
                "the instances of this project changed; shares of FFPUSH_FCM_RATE follow"
            );
        } else if before.1 != self.share {
            tracing::debug!(
                share = self.share as u64,
                previous_share = before.1 as u64,
                held_back,
                used = used as u64,
                "this instance's share of FFPUSH_FCM_RATE changed"
            );
        }
        Ok(())
    }

    fn apply(&mut self, share: f64) {
        self.share = share;
        self.sender.set_share(share);
        self.metrics.rate_share.set(share as u64);
    }

    /// Writes this instance's heartbeat (the whole document).
    async fn publish(&self, share: f64, held_back: bool, used: f64) -> Result<(), Error> {
        let lifetime = self.interval * LIFETIME_BEATS;
        let mut f: HashMap<String, Value> = HashMap::new();
        f.insert(fields::WORKER.into(), store::string(&self.worker));
        f.insert(fields::RATE.into(), store::integer(i64::from(self.rate)));
        f.insert(fields::SHARE.into(), double(share));
        f.insert(fields::HELD_BACK.into(), boolean(held_back));
        f.insert(fields::USED.into(), double(used.round()));
        f.insert(
            fields::LIFETIME_MS.into(),
            store::integer(lifetime.as_millis() as i64),
        );
        f.insert(fields::STARTED_AT.into(), store::timestamp(self.started_at));
        // For people reading the collection only: liveness is judged on Firestore's clock.
        let expires = Utc::now() + chrono::Duration::from_std(lifetime).unwrap_or_default();
        f.insert(fields::EXPIRES_AT.into(), store::timestamp(expires));
        let request = pb::UpdateDocumentRequest {
            document: Some(Document {
                name: self.name.clone(),
                fields: f,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.store.client().update_document(request).await?;
        Ok(())
    }

    /// Deletes an expired heartbeat, unless it was renewed since it was read.
    async fn bury(&self, heartbeat: &Heartbeat) {
        let request = pb::DeleteDocumentRequest {
            name: format!(
                "{}/{COLLECTION}/{}",
                self.store.documents_path(),
                heartbeat.id
            ),
            current_document: Some(Precondition {
                condition_type: Some(precondition::ConditionType::UpdateTime(heartbeat.renewed)),
            }),
            ..Default::default()
        };
        match self.store.client().delete_document(request).await {
            Ok(_) => tracing::info!(
                worker = %heartbeat.worker,
                "an instance stopped renewing its heartbeat; its share of FFPUSH_FCM_RATE returns to the others"
            ),
            // Renewed or deleted meanwhile: nothing to do.
            Err(status) => match Error::from(status) {
                Error::Conflict | Error::NotFound => {}
                e => tracing::debug!(error = %Chain(&e), "deleting an expired heartbeat failed"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    fn peer(rate: u32, share: f64, held_back: bool, used: f64) -> Heartbeat {
        Heartbeat {
            id: "peer".into(),
            worker: "peer/1/0".into(),
            rate,
            share,
            held_back,
            used,
            lifetime: Duration::from_secs(10),
            renewed: at(1000),
        }
    }

    fn idle(rate: u32) -> Own {
        Own {
            rate,
            held_back: false,
            used: 0.0,
        }
    }

    fn busy(rate: u32) -> Own {
        Own {
            rate,
            held_back: true,
            used: 0.0,
        }
    }

    #[test]
    fn alone_an_instance_has_the_whole_rate() {
        assert_eq!(
            plan(idle(9500), &[]),
            Plan {
                rate: 9500.0,
                instances: 1,
                share: 9500.0,
                target: 9500.0,
            }
        );
        assert_eq!(plan(busy(9500), &[]).share, 9500.0);
    }

    #[test]
    fn idle_instances_hold_equal_shares() {
        let others = [
            peer(9000, 3000.0, false, 0.0),
            peer(9000, 3000.0, false, 3.0),
        ];
        let p = plan(idle(9000), &others);
        assert_eq!((p.instances, p.share), (3, 3000.0));
    }

    #[test]
    fn a_newcomer_takes_only_the_room_the_others_left() {
        // Two instances at half each have not seen the third yet: it waits.
        let others = [
            peer(9000, 4500.0, false, 0.0),
            peer(9000, 4500.0, false, 0.0),
        ];
        let p = plan(idle(9000), &others);
        assert_eq!((p.share, p.target), (0.0, 3000.0));
        // Once they have lowered theirs to a third, it takes its third.
        let others = [
            peer(9000, 3000.0, false, 0.0),
            peer(9000, 3000.0, false, 0.0),
        ];
        assert_eq!(plan(idle(9000), &others).share, 3000.0);
        // And an instance that sees the newcomer lowers its share at once.
        let others = [peer(9000, 4500.0, false, 0.0), peer(9000, 0.0, false, 0.0)];
        assert_eq!(plan(idle(9000), &others).share, 3000.0);
    }

    #[test]
    fn the_instances_held_back_share_what_the_others_do_not_use() {
        // Two idle instances keep 2 % of an equal share each; the busy one gets the rest.
        let idle_peers = [peer(9000, 60.0, false, 0.0), peer(9000, 60.0, false, 0.0)];
        assert_eq!(plan(busy(9000), &idle_peers).share, 8880.0);
        // An idle instance sending a little keeps twice what it uses.
        let others = [
            peer(9000, 800.0, false, 400.0),
            peer(9000, 60.0, false, 0.0),
        ];
        assert_eq!(plan(busy(9000), &others).share, 9000.0 - 800.0 - 60.0);
        // Two busy instances split what the idle one leaves.
        let others = [
            peer(9000, 4470.0, true, 4470.0),
            peer(9000, 60.0, false, 0.0),
        ];
        assert_eq!(plan(busy(9000), &others).share, 4470.0);
        // The idle one's view: its reserve.
        let others = [peer(9000, 4470.0, true, 0.0), peer(9000, 4470.0, true, 0.0)];
        assert_eq!(plan(idle(9000), &others).share, 60.0);
    }

    #[test]
    fn a_busy_instance_grows_only_as_the_others_make_room() {
        // All were idle at a third each; this one became busy. The others still hold theirs.
        let others = [
            peer(9000, 3000.0, false, 0.0),
            peer(9000, 3000.0, false, 0.0),
        ];
        assert_eq!(plan(busy(9000), &others).share, 3000.0);
        // One has lowered to its reserve.
        let others = [peer(9000, 60.0, false, 0.0), peer(9000, 3000.0, false, 0.0)];
        assert_eq!(plan(busy(9000), &others).share, 5940.0);
    }

    #[test]
    fn the_lowest_rate_is_shared_during_a_rollout() {
        // The old revision at 9 500, the new one at 19 000 after a quota increase.
        let old = [peer(9500, 4750.0, false, 0.0)];
        let p = plan(idle(19_000), &old);
        assert_eq!((p.rate, p.share), (9500.0, 4750.0));
        // Once the old one is gone: the new rate.
        assert_eq!(plan(idle(19_000), &[]).share, 19_000.0);
    }

    #[test]
    fn unpaced_instances_take_no_part() {
        let p = plan(idle(0), &[peer(9000, 9000.0, false, 0.0)]);
        assert_eq!((p.rate, p.instances, p.share), (0.0, 2, 0.0));
        let p = plan(idle(9000), &[peer(0, 0.0, false, 0.0)]);
        assert_eq!((p.rate, p.instances, p.share), (9000.0, 2, 9000.0));
    }

    #[test]
    fn shares_planned_from_one_view_never_add_up_to_more_than_the_rate() {
        let states = [(false, 0.0), (false, 500.0), (true, 0.0), (false, 5000.0)];
        for a in states {
            for b in states {
                for c in states {
                    let hb =
                        |(held_back, used): (bool, f64), share| peer(9000, share, held_back, used);
                    let own = |(held_back, used): (bool, f64)| Own {
                        rate: 9000,
                        held_back,
                        used,
                    };
                    // Published shares: all room free, the worst case for a race.
                    let ab = plan(own(a), &[hb(b, 0.0), hb(c, 0.0)]).share;
                    let bb = plan(own(b), &[hb(a, 0.0), hb(c, 0.0)]).share;
                    let cb = plan(own(c), &[hb(a, 0.0), hb(b, 0.0)]).share;
                    assert!(ab + bb + cb <= 9000.0, "{a:?} {b:?} {c:?}: {ab} {bb} {cb}");
                }
            }
        }
    }

    #[test]
    fn a_heartbeat_lives_its_own_lifetime_on_firestores_clock() {
        let hb = peer(9000, 0.0, false, 0.0);
        assert!(hb.alive_at(&at(1000)));
        assert!(hb.alive_at(&at(1009)));
        assert!(!hb.alive_at(&at(1010)));
    }

    #[test]
    fn demand_is_what_went_and_whether_it_waited() {
        let load = |sends, waited, waiting| PaceLoad {
            sends,
            waited,
            waiting,
        };
        let second = Duration::from_secs(1);
        assert_eq!(
            demand(load(0, 0, 0), load(100, 0, 0), second),
            (100.0, false)
        );
        assert_eq!(
            demand(load(0, 0, 0), load(100, 10, 0), second),
            (100.0, false)
        );
        assert_eq!(
            demand(load(0, 0, 0), load(100, 30, 0), second),
            (100.0, true)
        );
        assert_eq!(demand(load(0, 0, 0), load(0, 0, 1), second), (0.0, true));
    }

    #[test]
    fn document_ids_are_worker_ids_firestore_accepts() {
        assert_eq!(
            document_id("ffpush-00003-abc/1/0a1b2c3d"),
            "ffpush-00003-abc-1-0a1b2c3d"
        );
        assert_eq!(document_id("__x__"), "i__x__");
        assert_eq!(document_id(".."), "i..");
        assert_eq!(document_id(""), "i");
    }
}
