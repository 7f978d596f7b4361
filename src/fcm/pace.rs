//! Instance-wide pacing of FCM sends: at most `FFPUSH_FCM_RATE` messages a second, and when
//! FCM answers 429 QUOTA_EXCEEDED, one pause for every send of the instance followed by a
//! gradual return, instead of every token retrying on its own.
//!
//! The rate is kept as a schedule (GCRA): each send reserves the next free slot, `1 / rate`
//! after the previous one, and sleeps until it, so waiting costs one timer per send and no
//! polling. Sends whose slots fall in the same [`TICK`] wake together at its end. An idle
//! pacer lets [`BURST`] worth of sends go at once; over any interval `T` an instance sends at
//! most `rate × (T + BURST + TICK)`.
//!
//! After a 429 the pause lasts `max(Retry-After, FFPUSH_QUOTA_BACKOFF)`; the rate is halved
//! (never below [`MIN_FRACTION`] of the setting) and climbs back by [`RAMP`] of the setting
//! per second. 429s answered to requests sent before the pause began belong to the same
//! event: they neither halve the rate again nor lengthen the pause.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
    /// Messages per second at most; `None`: unpaced (quota pauses still apply).
    ceiling: Option<f64>,
    /// Least pause after a 429 (`FFPUSH_QUOTA_BACKOFF`).
    floor: Duration,
    state: Mutex<State>,
    metrics: Arc<FcmMetrics>,
}

struct State {
    /// The next free slot.
    next: Instant,
    /// The rate now: the ceiling, or less after a quota pause.
    rate: f64,
    /// When the last quota pause began and ends.
    paused_at: Option<Instant>,
    paused_until: Option<Instant>,
    /// Since when `rate` has been climbing back.
    ramp_from: Instant,
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
}

impl Pacer {
    /// `rate` messages per second (0: unpaced).
    pub fn new(rate: u32, floor: Duration, metrics: Arc<FcmMetrics>) -> Pacer {
        let ceiling = (rate > 0).then_some(f64::from(rate));
        metrics.pace_rate.set(u64::from(rate));
        let now = Instant::now();
        Pacer {
            origin: now,
            ceiling,
            floor,
            state: Mutex::new(State {
                next: now.checked_sub(BURST).unwrap_or(now),
                rate: ceiling.unwrap_or(0.0),
                paused_at: None,
                paused_until: None,
                ramp_from: now,
            }),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until this send may go.
    pub async fn acquire(&self) {
        let started = Instant::now();
        let mut waited = false;
        loop {
            match self.reserve(Instant::now()) {
                Wait::Go => break,
                Wait::Pause(until) => {
                    waited = true;
                    tokio::time::sleep_until(until).await;
                }
                Wait::Slot(at) => {
                    waited = true;
                    tokio::time::sleep_until(at).await;
                    // A quota pause that began meanwhile holds this send too.
                    if !self.paused(Instant::now()) {
                        break;
                    }
                }
            }
        }
        if waited {
            self.metrics
                .pace_wait_micros
                .inc_by(started.elapsed().as_micros() as u64);
        }
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
        let Some(ceiling) = self.ceiling else {
            return Wait::Go;
        };
        if state.rate < ceiling {
            let climbed = now.saturating_duration_since(state.ramp_from).as_secs_f64();
            state.rate = (state.rate + ceiling * RAMP * climbed).min(ceiling);
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
        if let Some(ceiling) = self.ceiling {
            state.rate = (state.rate / 2.0).max(ceiling * MIN_FRACTION).max(1.0);
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
