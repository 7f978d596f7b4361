//! Instance-wide pacing of FCM sends: at most this instance's share of `FFPUSH_FCM_RATE`
//! messages a second, and when FCM answers 429 QUOTA_EXCEEDED, one pause for every send of the
//! instance followed by a gradual return, instead of every token retrying on its own.
//!
//! The share is the whole rate until [`crate::instances`] sets it from the other instances'
//! heartbeats ([`Pacer::set_share`]); a share of 0 holds every send until it is raised.
//!
//! The rate is kept as a schedule (GCRA): each send reserves the next free slot, `1 / rate`
//! after the previous one, and sleeps until it, so waiting costs one timer per send and no
//! polling. Sends whose slots fall in the same [`TICK`] wake together at its end. An idle
//! pacer lets [`BURST`] worth of sends go at once; over any interval `T` an instance sends at
//! most `share × (T + BURST + TICK)`. When the share changes, the sends waiting for a slot are
//! woken and take new slots at the new rate, so a lower share holds back even sends that had
//! reserved theirs (up to `FFPUSH_CONCURRENCY` of them, seconds ahead at a small share).
//!
//! After a 429 the pause lasts `max(Retry-After, FFPUSH_QUOTA_BACKOFF)`; the rate is halved
//! (never below [`MIN_FRACTION`] of the share) and climbs back by [`RAMP`] of the share
//! per second. 429s answered to requests sent before the pause began belong to the same
//! event: they neither halve the rate again nor lengthen the pause.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::FcmMetrics;

/// How much sending an idle pacer allows at once, in time at the full rate.
pub const BURST: Duration = Duration::from_millis(50);
/// Share of the configured rate regained each second after a quota pause.
pub const RAMP: f64 = 0.1;
/// The rate never drops below this share of the configured rate.
pub const MIN_FRACTION: f64 = 0.05;

pub struct Pacer {
    /// Where the ticks are counted from.
    origin: Instant,
    /// `FFPUSH_FCM_RATE` is 0: no pace and no share (quota pauses still apply).
    unpaced: bool,
    /// Least pause after a 429 (`FFPUSH_QUOTA_BACKOFF`).
    floor: Duration,
    state: Mutex<State>,
    /// Woken when the share changes: sends waiting for a slot take a new one.
    changed: Notify,
    /// Woken when a send has to wait while `watch` is set (see [`Pacer::held_back`]).
    pressure: Notify,
    watch: AtomicBool,
    load: Counts,
    metrics: Arc<FcmMetrics>,
}

struct State {
    /// The next free slot.
    next: Instant,
    /// This instance's share of `FFPUSH_FCM_RATE`, messages per second: what it paces at
    /// without a quota pause. 0: every send waits until it is raised.
    share: f64,
    /// The rate now: the share, or less after a quota pause.
    rate: f64,
    /// When the last quota pause began and ends.
    paused_at: Option<Instant>,
    paused_until: Option<Instant>,
    /// Since when `rate` has been climbing back.
    ramp_from: Instant,
}

/// How much the pacer held sends back, for [`crate::instances`] to tell an instance that
/// wants more than its share from one that does not.
#[derive(Default)]
struct Counts {
    /// Sends let through.
    sends: AtomicU64,
    /// Of those, the ones that had to wait (for a slot, a quota pause or a share of 0).
    waited: AtomicU64,
    /// Sends waiting right now.
    waiting: AtomicUsize,
}

/// How much the pace held sends back (`Sender::pace_load`): counts since start, and the
/// sends waiting now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub sends: u64,
    pub waited: u64,
    pub waiting: usize,
}

/// Counts a send as waiting for as long as it lives (a send's wait may be cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends whose slots fall in the same tick wake together at its end, so a paced instance
/// wakes 200 times a second rather than once per send. Slots stay where the
/// rate puts them; a tick only delays a send by less than itself.
const TICK: Duration = Duration::from_millis(5);

/// The end of the tick `slot` falls in; ticks are counted from `origin`, so every send of
/// the instance shares them.
fn tick_end(slot: Instant, origin: Instant) -> Instant {
    let since = slot.saturating_duration_since(origin).as_nanos();
    let tick = TICK.as_nanos();
    let ticks = since.div_ceil(tick);
    origin + Duration::from_nanos((ticks * tick).min(u128::from(u64::MAX)) as u64)
}

/// What a send must wait for.
enum Wait {
    Go,
    Pause(Instant),
    Slot(Instant),
    /// The share is 0: until it changes.
    Hold,
}

impl Pacer {
    /// `rate` messages per second (0: unpaced), all of it this instance's until
    /// [`Pacer::set_share`] says otherwise.
    pub fn new(rate: u32, floor: Duration, metrics: Arc<FcmMetrics>) -> Pacer {
        metrics.pace_rate.set(u64::from(rate));
        let now = Instant::now();
        Pacer {
            origin: now,
            unpaced: rate == 0,
            floor,
            state: Mutex::new(State {
                next: now.checked_sub(BURST).unwrap_or(now),
                share: f64::from(rate),
                rate: f64::from(rate),
                paused_at: None,
                paused_until: None,
                ramp_from: now,
            }),
            changed: Notify::new(),
            pressure: Notify::new(),
            watch: AtomicBool::new(false),
            load: Counts::default(),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until this send may go.
    pub async fn acquire(&self) {
        let started = Instant::now();
        let mut waiting = None;
        loop {
            // Registered before the schedule is read, so a change in between still wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.reserve(Instant::now()) {
                Wait::Go => break,
                Wait::Pause(until) => {
                    waiting.get_or_insert_with(|| self.wait());
                    tokio::time::sleep_until(until).await;
                }
                Wait::Hold => {
                    waiting.get_or_insert_with(|| self.wait());
                    changed.await;
                }
                Wait::Slot(at) => {
                    waiting.get_or_insert_with(|| self.wait());
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {
                            // A quota pause that began meanwhile holds this send too.
                            if !self.paused(Instant::now()) {
                                break;
                            }
                        }
                        // The share changed: this slot was laid out at the old rate.
                        _ = changed => {}
                    }
                }
            }
        }
        self.load.sends.fetch_add(1, Ordering::Relaxed);
        if waiting.is_some() {
            self.load.waited.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .pace_wait_micros
                .inc_by(started.elapsed().as_micros() as u64);
        }
    }

    /// A send begins to wait.
    fn wait(&self) -> Waiting<'_> {
        if self.watch.load(Ordering::Relaxed) && self.watch.swap(false, Ordering::Relaxed) {
            self.pressure.notify_waiters();
        }
        Waiting::new(&self.load.waiting)
    }

    /// Resolves when a send has to wait for the pace, from the call on: the moment an
    /// instance that wanted no more than its share starts to.
    pub async fn held_back(&self) {
        let pressure = self.pressure.notified();
        tokio::pin!(pressure);
        pressure.as_mut().enable();
        self.watch.store(true, Ordering::Relaxed);
        pressure.await;
    }

    fn paused(&self, now: Instant) -> bool {
        self.lock().paused_until.is_some_and(|until| now < until)
    }

    fn reserve(&self, now: Instant) -> Wait {
        let mut state = self.lock();
        if let Some(until) = state.paused_until {
            if now < until {
                return Wait::Pause(until);
            }
            state.paused_until = None;
        }
        if self.unpaced {
            return Wait::Go;
        }
        if state.share <= 0.0 {
            return Wait::Hold;
        }
        if state.rate < state.share {
            let climbed = now.saturating_duration_since(state.ramp_from).as_secs_f64();
            state.rate = (state.rate + state.share * RAMP * climbed).min(state.share);
            state.ramp_from = now;
            self.metrics.pace_rate.set(state.rate as u64);
        }
        let interval = Duration::from_secs_f64(1.0 / state.rate);
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let slot = state.next.max(earliest);
        state.next = slot + interval;
        if slot <= now {
            Wait::Go
        } else {
            // Woken together: a slot is kept, but the wake-up goes to the end of its tick.
            Wait::Slot(tick_end(slot, self.origin))
        }
    }

    /// Paces at `share` messages per second from now on (0: every send waits until it is
    /// raised). Sends waiting for a slot take a new one at the new rate; a rate lowered by a
    /// quota pause keeps its proportion of the share. No effect when unpaced.
    pub fn set_share(&self, share: f64) {
        if self.unpaced || !share.is_finite() {
            return;
        }
        let share = share.max(0.0);
        {
            let mut state = self.lock();
            if state.share == share {
                return;
            }
            state.rate = if state.share > 0.0 && state.rate < state.share {
                state.rate / state.share * share
            } else {
                share
            };
            state.share = share;
            // Slots already handed out were laid out at the old rate: the waiting sends
            // take new ones from here (a send past its slot has gone already).
            let now = Instant::now();
            let resume = state.paused_until.map_or(now, |until| until.max(now));
            state.next = state.next.min(resume);
            self.metrics.pace_rate.set(state.rate as u64);
        }
        self.changed.notify_waiters();
    }

    /// How much the pace held sends back so far.
    pub fn load(&self) -> Load {
        Load {
            sends: self.load.sends.load(Ordering::Relaxed),
            waited: self.load.waited.load(Ordering::Relaxed),
            waiting: self.load.waiting.load(Ordering::Relaxed),
        }
    }

    /// FCM answered 429 QUOTA_EXCEEDED to a request sent at `sent_at`: pause every send.
    pub fn quota_exceeded(&self, retry_after: Option<Duration>, sent_at: Instant) {
        let now = Instant::now();
        let mut state = self.lock();
        if state.paused_at.is_some_and(|began| sent_at < began) {
            // Sent before the pause began: an echo of the 429 that started it.
            return;
        }
        let pause = retry_after.unwrap_or_default().max(self.floor);
        // The sender bounds Retry-After; this stays total whatever it is given.
        let until = now
            .checked_add(pause)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        state.paused_at = Some(now);
        state.paused_until = Some(until);
        state.next = state.next.max(until);
        state.ramp_from = until;
        if !self.unpaced {
            state.rate = (state.rate / 2.0).max(state.share * MIN_FRACTION).max(1.0);
            self.metrics.pace_rate.set(state.rate as u64);
        }
        self.metrics.quota_pauses.inc();
        tracing::warn!(
            pause_ms = pause.as_millis() as u64,
            resume_rate = state.rate as u64,
            "FCM quota exceeded: every send of this instance pauses, then resumes slower"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(rate: u32) -> Pacer {
        Pacer::new(
            rate,
            Duration::from_secs(1),
            Arc::new(FcmMetrics::default()),
        )
    }

    /// Virtual seconds `n` sends take.
    async fn time_for(pacer: &Pacer, n: usize) -> f64 {
        let started = Instant::now();
        for _ in 0..n {
            pacer.acquire().await;
        }
        started.elapsed().as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn sends_are_spaced_at_the_rate_after_a_short_burst() {
        let pacer = pacer(100);
        // 50 ms of burst (5 sends) at once, then one every 10 ms.
        let secs = time_for(&pacer, 105).await;
        assert!((0.99..=1.01).contains(&secs), "{secs}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unpaced_pacer_never_waits_but_honours_a_quota_pause() {
        let pacer = pacer(0);
        assert_eq!(time_for(&pacer, 10_000).await, 0.0);
        pacer.quota_exceeded(Some(Duration::from_secs(3)), Instant::now());
        let secs = time_for(&pacer, 1).await;
        assert!((2.99..=3.01).contains(&secs), "{secs}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quota_answer_pauses_everyone_then_the_rate_climbs_back() {
        let pacer = pacer(100);
        let sent_at = Instant::now();
        time_for(&pacer, 50).await;
        // Retry-After shorter than the floor: the floor (1 s) wins.
        pacer.quota_exceeded(Some(Duration::ZERO), sent_at);
        assert_eq!(pacer.metrics.quota_pauses.get(), 1);
        // More 429s for requests sent before the pause are the same event.
        pacer.quota_exceeded(Some(Duration::from_secs(30)), sent_at);
        assert_eq!(pacer.metrics.quota_pauses.get(), 1);
        let paused = Instant::now();
        pacer.acquire().await;
        let waited = paused.elapsed().as_secs_f64();
        assert!((0.99..=1.01).contains(&waited), "{waited}");
        // Half the rate at first, climbing by 10 per second: the next 50 sends take about
        // ten times 1/50 s, well over the 0.5 s they take at full rate.
        let secs = time_for(&pacer, 50).await;
        assert!((0.7..1.0).contains(&secs), "{secs}");
        // Five seconds later it is back at 100/s.
        tokio::time::sleep(Duration::from_secs(5)).await;
        time_for(&pacer, 10).await;
        assert_eq!(pacer.metrics.pace_rate.get(), 100);
        let secs = time_for(&pacer, 100).await;
        assert!((0.99..=1.01).contains(&secs), "{secs}");
    }

    /// Spawns `n` sends at once; returns a handle that yields the virtual seconds until the
    /// last went.
    fn spawn_sends(pacer: &Arc<Pacer>, n: usize) -> tokio::task::JoinHandle<f64> {
        let pacer = pacer.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let sends: Vec<_> = (0..n)
                .map(|_| {
                    let pacer = pacer.clone();
                    tokio::spawn(async move { pacer.acquire().await })
                })
                .collect();
            for send in sends {
                send.await.unwrap();
            }
            started.elapsed().as_secs_f64()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_share_slows_even_the_sends_that_had_their_slots() {
        let pacer = Arc::new(pacer(100));
        // 105 sends at 100/s: slots laid out up to a second ahead.
        let all = spawn_sends(&pacer, 105);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(pacer.load().waiting > 80, "{:?}", pacer.load());
        // A third instance joined: a third of the rate from now on. About 15 went in the
        // first 100 ms; the other 90 now take 90 / 33.3 s.
        pacer.set_share(100.0 / 3.0);
        let secs = all.await.unwrap();
        assert!((2.7..=2.9).contains(&secs), "{secs}");
        let load = pacer.load();
        assert_eq!((load.sends, load.waiting), (105, 0));
        assert!(load.waited >= 95, "{load:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_share_speeds_up_the_sends_waiting() {
        let pacer = Arc::new(pacer(10));
        let all = spawn_sends(&pacer, 100);
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The other instances left: ten times the rate; the last of the 100 does not wait
        // for the slot ten seconds ahead it had.
        pacer.set_share(100.0);
        let secs = all.await.unwrap();
        assert!(secs < 1.1, "{secs}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_of_zero_holds_every_send_until_it_is_raised() {
        let pacer = Arc::new(pacer(100));
        pacer.set_share(0.0);
        assert_eq!(pacer.metrics.pace_rate.get(), 0);
        let all = spawn_sends(&pacer, 10);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(pacer.load().sends, 0);
        assert_eq!(pacer.load().waiting, 10);
        pacer.set_share(100.0);
        let secs = all.await.unwrap();
        assert!((30.0..30.2).contains(&secs), "{secs}");
        assert_eq!(pacer.metrics.pace_rate.get(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn held_back_resolves_when_a_send_first_waits() {
        let pacer = Arc::new(pacer(100));
        let watching = {
            let pacer = pacer.clone();
            tokio::spawn(async move { pacer.held_back().await })
        };
        tokio::task::yield_now().await;
        // The burst (50 ms worth, and the slot of now) goes without waiting.
        time_for(&pacer, 6).await;
        tokio::task::yield_now().await;
        assert!(!watching.is_finished());
        time_for(&pacer, 1).await;
        tokio::time::timeout(Duration::from_secs(1), watching)
            .await
            .expect("the seventh send waited")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_unpaced_pacer_has_no_share() {
        let pacer = pacer(0);
        pacer.set_share(0.0);
        assert_eq!(time_for(&pacer, 1000).await, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_changed_while_recovering_keeps_its_proportion() {
        let pacer = pacer(1000);
        pacer.quota_exceeded(None, Instant::now());
        assert_eq!(pacer.lock().rate, 500.0);
        pacer.set_share(500.0);
        assert_eq!(pacer.lock().rate, 250.0);
        // And it climbs back to the new share, not the old one.
        tokio::time::sleep(Duration::from_secs(30)).await;
        time_for(&pacer, 1).await;
        assert_eq!(pacer.lock().rate, 500.0);
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_quota_events_halve_down_to_a_floor() {
        let pacer = pacer(1000);
        for _ in 0..10 {
            pacer.quota_exceeded(None, Instant::now());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pacer.metrics.quota_pauses.get(), 10);
        assert_eq!(
            pacer.lock().rate,
            50.0,
            "5 % of the configured rate at least"
        );
    }
}
