//! Admission: how many documents this instance works on at once (`FFPUSH_MAX_DOCUMENTS`), and
//! the queue of due documents beyond that.
//!
//! A document being claimed, sent, or failed here holds a slot. A due document that finds no
//! free slot (or others already waiting) waits in the queue in due order, holding only its
//! name and due time: nothing is claimed or leased for it, so another instance may take it,
//! and 100 000 waiting documents cost a few megabytes. When a slot frees, the first waiting
//! document is read again from Firestore and offered with what it holds then.
//!
//! Each document in a slot also remembers the newest version offered while it was there
//! (those offers are skipped), so that its task can tell, when it ends, whether the document
//! changed after its last write and must be read again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::store::prost_types_timestamp::Timestamp;

/// Slots, the documents in them, and the queue.
pub(crate) struct Admission {
    limit: usize,
    state: Mutex<State>,
    /// Signalled when a slot frees or a document is queued.
    changed: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    /// Documents in a slot (full names), each with the newest update time of the versions
    /// offered (and skipped) while it was there.
    running: HashMap<String, Option<Timestamp>>,
    /// Waiting documents by due time (microseconds) and relative name: the queue's order.
    queue: BTreeSet<(i64, Arc<str>)>,
    /// The same documents by relative name, with their due time: to find and remove one.
    queued: HashMap<Arc<str>, i64>,
}

/// What [`Admission::admit`] did with a document.
pub(crate) enum Admitted {
    /// It has a slot: go on.
    Now(Slot),
    /// It waits in the queue (or already did), or is in a slot already.
    Later,
}

impl Admission {
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Arc<Admission> {
        Arc::new(Admission {
            limit: limit.max(1),
            state: Mutex::default(),
            changed: Notify::new(),
            metrics,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// If `name` is in a slot, remembers that a version written at `version` was offered
    /// meanwhile and returns true (the offer is skipped); else false.
    pub fn skip(&self, name: &str, version: Option<Timestamp>) -> bool {
        skip_in(&mut self.state(), name, version)
    }

    /// Whether `relative` waits in the queue (it is read again when its turn comes).
    pub fn is_queued(&self, relative: &str) -> bool {
        self.state().queued.contains_key(relative)
    }

    /// A slot for the document `name` (`relative` within the database), due at `due`: at once
    /// if one is free and nothing waits before it, else it joins the queue. Nothing happens to
    /// a document already in a slot or in the queue.
    pub fn admit(
        self: &Arc<Self>,
        name: &str,
        relative: &str,
        version: Option<Timestamp>,
        due: DateTime<Utc>,
    ) -> Admitted {
        let mut state = self.state();
        // Another offer of it got in first: its version is remembered, as by `skip`.
        if skip_in(&mut state, name, version) || state.queued.contains_key(relative) {
            return Admitted::Later;
        }
        if state.queue.is_empty() && state.running.len() < self.limit {
            return Admitted::Now(self.enter(&mut state, name, due));
        }
        self.enqueue(&mut state, relative, due);
        Admitted::Later
    }

    fn enter(self: &Arc<Self>, state: &mut State, name: &str, due: DateTime<Utc>) -> Slot {
        state.running.insert(name.to_string(), None);
        Slot {
            admission: self.clone(),
            name: name.to_string(),
            due,
            left: false,
        }
    }

    /// Puts `name` (`relative`) in the queue at `due`, to be read again when its turn comes,
    /// unless it is in a slot or the queue already.
    pub fn requeue(&self, name: &str, relative: &str, due: DateTime<Utc>) {
        let mut state = self.state();
        if !state.running.contains_key(name) && !state.queued.contains_key(relative) {
            self.enqueue(&mut state, relative, due);
        }
    }

    fn enqueue(&self, state: &mut State, relative: &str, due: DateTime<Utc>) {
        let due = due.timestamp_micros();
        let key: Arc<str> = Arc::from(relative);
        state.queue.insert((due, key.clone()));
        state.queued.insert(key, due);
        self.metrics.documents_queued.set(state.queued.len() as u64);
        self.changed.notify_one();
    }

    /// Waits for a free slot and a waiting document; returns the first in due order (its
    /// relative name) with its slot. Cancel-safe: nothing is taken until it returns.
    pub async fn next(self: &Arc<Self>, full_name: impl Fn(&str) -> String) -> (String, Slot) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.state();
                if state.running.len() < self.limit
                    && let Some((due, relative)) = state.queue.pop_first()
                {
                    state.queued.remove(&relative);
                    self.metrics.documents_queued.set(state.queued.len() as u64);
                    let due = DateTime::from_timestamp_micros(due).unwrap_or_else(Utc::now);
                    let slot = self.enter(&mut state, &full_name(&relative), due);
                    // Another slot may be free too: let the next waiter look.
                    self.changed.notify_one();
                    return (relative.to_string(), slot);
                }
            }
            changed.await;
        }
    }

    /// Takes `relative` out of the queue (deleted, cancelled, finished).
    pub fn forget(&self, relative: &str) {
        let mut state = self.state();
        if let Some((key, due)) = state.queued.remove_entry(relative) {
            state.queue.remove(&(due, key));
            self.metrics.documents_queued.set(state.queued.len() as u64);
        }
    }

    /// Documents waiting in the queue.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.state().queued.len()
    }

    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.state().running.len()
    }

    /// Leaves `name`'s slot; with `again`, puts it back in the queue at once (under the same
    /// lock, so no other offer of it comes between). Returns the newest version skipped.
    fn leave(&self, name: &str, again: Option<(&str, DateTime<Utc>)>) -> Option<Timestamp> {
        let mut state = self.state();
        let skipped = state.running.remove(name).flatten();
        if let Some((relative, due)) = again
            && !state.queued.contains_key(relative)
        {
            self.enqueue(&mut state, relative, due);
        }
        drop(state);
        self.changed.notify_one();
        skipped
    }
}

/// [`Admission::skip`] under the lock.
fn skip_in(state: &mut State, name: &str, version: Option<Timestamp>) -> bool {
    let Some(newest) = state.running.get_mut(name) else {
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

/// `a` is a later update time than `b`.
fn later(a: &Timestamp, b: &Timestamp) -> bool {
    (a.seconds, a.nanos) > (b.seconds, b.nanos)
}

/// A document's slot; dropping it frees the slot.
pub(crate) struct Slot {
    admission: Arc<Admission>,
    name: String,
    due: DateTime<Utc>,
    /// Already left: dropping must not remove a later entry of the same name.
    left: bool,
}

impl Slot {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the document was due (its queue position if it goes back).
    pub fn due(&self) -> DateTime<Utc> {
        self.due
    }

    /// Frees the slot; true when a version later than `seen` (the update time of our last
    /// write on the document, or of the version we read; `None`: neither) was offered while
    /// it was held, so the document must be read again.
    pub fn leave(mut self, seen: Option<Timestamp>) -> bool {
        self.left = true;
        let skipped = self.admission.leave(&self.name, None);
        match (skipped, seen) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(skipped), Some(seen)) => later(&skipped, &seen),
        }
    }

    /// Frees the slot and puts the document (`relative`) back in the queue at its due time,
    /// to be read again when its turn comes.
    pub fn requeue(mut self, relative: &str) {
        self.left = true;
        self.admission.leave(&self.name, Some((relative, self.due)));
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.left {
            self.admission.leave(&self.name, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    fn due(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap_or_default()
    }

    fn admission(limit: usize) -> Arc<Admission> {
        Admission::new(limit, Arc::default())
    }

    fn now(admitted: Admitted) -> Option<Slot> {
        match admitted {
            Admitted::Now(slot) => Some(slot),
            Admitted::Later => None,
        }
    }

    fn full(relative: &str) -> String {
        format!("db/{relative}")
    }

    #[test]
    fn only_the_one_who_entered_leaves() {
        let a = admission(10);
        let winner = now(a.admit("db/a", "a", None, due(0))).expect("first entry");
        assert!(
            now(a.admit("db/a", "a", None, due(0))).is_none(),
            "a second entry"
        );
        assert!(a.skip("db/a", at(1)), "the winner's entry is still there");
        drop(winner);
        assert!(!a.skip("db/a", at(1)));
        assert!(
            now(a.admit("db/a", "a", None, due(0))).is_some(),
            "free again"
        );
    }

    #[test]
    fn racing_entries_let_exactly_one_in() {
        for round in 0..200 {
            let a = admission(10);
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let winners: usize = (0..4)
                .map(|_| {
                    let (a, barrier) = (a.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        // Held until every thread tried.
                        let entered = now(a.admit("db/doc", "doc", None, due(0)));
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

    #[test]
    fn a_version_offered_while_in_a_slot_is_read_again_only_if_newer_than_what_we_saw() {
        let a = admission(10);
        assert!(!a.skip("db/a", at(1)), "not in a slot: offered as usual");

        let slot = now(a.admit("db/a", "a", None, due(0))).expect("a slot");
        assert!(a.skip("db/a", at(5)), "our claim's own echo");
        assert!(a.skip("db/a", at(3)), "an older echo arriving late");
        assert!(!slot.leave(at(7)), "nothing newer than the report");

        let slot = now(a.admit("db/a", "a", None, due(0))).expect("a slot again");
        assert!(a.skip("db/a", at(9)), "an edit after our last write");
        assert!(slot.leave(at(7)));

        let slot = now(a.admit("db/a", "a", None, due(0))).expect("a slot again");
        assert!(!slot.leave(None), "nothing was offered meanwhile");
        let slot = now(a.admit("db/a", "a", None, due(0))).expect("a slot again");
        assert!(a.skip("db/a", at(2)));
        assert!(slot.leave(None), "we saw nothing: whatever came is news");
    }

    #[test]
    fn leaving_never_removes_a_later_entry() {
        let a = admission(10);
        let first = now(a.admit("db/a", "a", None, due(0))).expect("a slot");
        assert!(!first.leave(None));
        let second = now(a.admit("db/a", "a", None, due(0))).expect("a slot again");
        assert_eq!(a.running(), 1);
        drop(second);
        assert_eq!(a.running(), 0);
    }

    #[tokio::test]
    async fn beyond_the_limit_documents_wait_in_due_order_once_each() {
        let a = admission(2);
        let first = now(a.admit("db/x", "x", None, due(50))).expect("a free slot");
        let second = now(a.admit("db/y", "y", None, due(60))).expect("a free slot");
        for (name, secs) in [("c", 30), ("a", 10), ("b", 20), ("a", 10), ("c", 30)] {
            assert!(
                now(a.admit(&full(name), name, None, due(secs))).is_none(),
                "{name} waits"
            );
        }
        assert_eq!(a.queued(), 3, "offered again, queued once");
        assert!(
            now(a.admit("db/z", "z", None, due(0))).is_none(),
            "a free slot is not taken past those waiting"
        );
        assert_eq!(a.queued(), 4);
        a.forget("c");
        assert_eq!(a.queued(), 3);

        // No slot is free: nothing comes out.
        let waiting = tokio::time::timeout(Duration::from_millis(50), a.next(full)).await;
        assert!(waiting.is_err(), "taken past the limit");

        drop(first);
        let (name, z) = a.next(full).await;
        assert_eq!((name.as_str(), z.name()), ("z", "db/z"));
        assert_eq!(z.due(), due(0));
        assert!(!z.leave(None));
        let (name, slot_a) = a.next(full).await;
        assert_eq!(name, "a");
        // Put back (its claim lost): it comes out first again, not after the others.
        slot_a.requeue("a");
        let (name, slot_a) = a.next(full).await;
        assert_eq!(name, "a");
        assert_eq!(a.running(), 2);
        drop(second);
        drop(slot_a);
        let (name, _b) = a.next(full).await;
        assert_eq!(name, "b");
        assert_eq!(a.queued(), 0);
    }
}
