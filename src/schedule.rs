//! One timer per document that must wait: for its `scheduled_time` (only documents due within
//! `FFPUSH_SCHEDULE_WINDOW` get one), or for another worker's lease to run out. When a timer fires, the document's name comes out of the channel and the
//! worker reads it again (it may have been rescheduled, cancelled or finished meanwhile).

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Until `scheduled_time`.
    Schedule,
    /// Until another worker's lease expires.
    Lease,
}

struct Entry {
    at: DateTime<Utc>,
    wait: Wait,
    timer: AbortHandle,
}

pub struct Timers {
    entries: Mutex<Entries>,
    due: mpsc::UnboundedSender<String>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<String, Entry>,
    /// How many of `map` wait for their schedule, kept as they change: counting them on
    /// every change made setting n timers cost O(n²).
    scheduled: usize,
}

impl Entries {
    fn insert(&mut self, name: String, entry: Entry) {
        if entry.wait == Wait::Schedule {
            self.scheduled += 1;
        }
        if let Some(old) = self.map.insert(name, entry)
            && old.wait == Wait::Schedule
        {
            self.scheduled -= 1;
        }
    }

    fn remove(&mut self, name: &str) -> Option<Entry> {
        let entry = self.map.remove(name)?;
        if entry.wait == Wait::Schedule {
            self.scheduled -= 1;
        }
        Some(entry)
    }
}

impl Timers {
    /// The timers and the channel their documents come out of when due.
    pub fn new() -> (Timers, mpsc::UnboundedReceiver<String>) {
        let (due, rx) = mpsc::unbounded_channel();
        (
            Timers {
                entries: Mutex::new(Entries::default()),
                due,
            },
            rx,
        )
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes `name` at `at`. A timer already set for the same time and reason is kept; one
    /// set for another time (a reschedule) is replaced. Must run inside a tokio runtime.
    pub fn set(&self, name: &str, at: DateTime<Utc>, wait: Wait) {
        let mut entries = self.entries();
        if let Some(e) = entries.map.get(name) {
            if e.at == at && e.wait == wait {
                return;
            }
            e.timer.abort();
        }
        let delay = (at - Utc::now()).to_std().unwrap_or_default();
        let due = self.due.clone();
        let key = name.to_string();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = due.send(key);
        })
        .abort_handle();
        entries.insert(name.to_string(), Entry { at, wait, timer });
    }

    /// Forgets `name` (deleted, cancelled, finished, or now being processed).
    pub fn cancel(&self, name: &str) -> Option<Wait> {
        let entry = self.entries().remove(name)?;
        entry.timer.abort();
        Some(entry.wait)
    }

    /// What `name` waits for, and until when.
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<(DateTime<Utc>, Wait)> {
        self.entries().map.get(name).map(|e| (e.at, e.wait))
    }

    /// Documents waiting for their schedule.
    pub fn scheduled(&self) -> usize {
        self.entries().scheduled
    }

    /// Called when a due name has been taken out of the channel.
    pub fn fired(&self, name: &str) {
        let mut entries = self.entries();
        if entries.map.get(name).is_some_and(|e| e.timer.is_finished()) {
            entries.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn settle() {
        // Let spawned timer tasks run after the clock moved.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_its_time_and_not_before() {
        let (timers, mut due) = Timers::new();
        timers.set(
            "a",
            Utc::now() + chrono::Duration::seconds(10),
            Wait::Schedule,
        );
        settle().await;
        tokio::time::advance(Duration::from_millis(9_900)).await;
        settle().await;
        assert!(due.try_recv().is_err(), "fired early");
        tokio::time::advance(Duration::from_millis(200)).await;
        settle().await;
        assert_eq!(due.try_recv().ok().as_deref(), Some("a"));
        timers.fired("a");
        assert_eq!(timers.get("a"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn rescheduling_replaces_the_timer() {
        let (timers, mut due) = Timers::new();
        let first = Utc::now() + chrono::Duration::seconds(5);
        timers.set("a", first, Wait::Schedule);
        timers.set("a", first, Wait::Schedule);
        timers.set(
            "a",
            Utc::now() + chrono::Duration::seconds(60),
            Wait::Schedule,
        );
        settle().await;
        tokio::time::advance(Duration::from_secs(30)).await;
        settle().await;
        assert!(due.try_recv().is_err(), "the old time must not fire");
        assert_eq!(timers.scheduled(), 1);
        tokio::time::advance(Duration::from_secs(31)).await;
        settle().await;
        assert_eq!(due.try_recv().ok().as_deref(), Some("a"));
        assert!(due.try_recv().is_err(), "fired once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_scheduled_count_follows_every_change() {
        let (timers, mut due) = Timers::new();
        let at = |secs| Utc::now() + chrono::Duration::seconds(secs);
        timers.set("a", at(5), Wait::Schedule);
        timers.set("a", at(6), Wait::Schedule);
        timers.set("b", at(5), Wait::Schedule);
        assert_eq!(timers.scheduled(), 2);
        timers.set("b", at(5), Wait::Lease);
        assert_eq!(timers.scheduled(), 1);
        timers.set("b", at(7), Wait::Schedule);
        assert_eq!(timers.scheduled(), 2);
        assert_eq!(timers.cancel("b"), Some(Wait::Schedule));
        assert_eq!(timers.cancel("b"), None);
        assert_eq!(timers.scheduled(), 1);
        settle().await;
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(due.try_recv().ok().as_deref(), Some("a"));
        timers.fired("a");
        assert_eq!(timers.scheduled(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_timers_never_fire() {
        let (timers, mut due) = Timers::new();
        timers.set(
            "a",
            Utc::now() + chrono::Duration::seconds(5),
            Wait::Schedule,
        );
        timers.set("b", Utc::now() + chrono::Duration::seconds(5), Wait::Lease);
        assert_eq!(timers.cancel("a"), Some(Wait::Schedule));
        assert_eq!(timers.scheduled(), 0);
        settle().await;
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(due.try_recv().ok().as_deref(), Some("b"));
        assert!(due.try_recv().is_err());
    }
}
