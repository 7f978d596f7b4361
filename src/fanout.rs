//! Drives the sends of one notification: unique tokens, bounded concurrency, retries with
//! backoff, dead-token pruning, and a progress cursor that says exactly which tokens are done.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use crate::audience::TokenPages;
use crate::errors::Chain;
use crate::fcm::{self, Action, MessageTemplate, Outcome, Sender, redact};
use crate::metrics::Metrics;
use crate::store::{DeviceToken, Store};

/// Counts of one notification's fan-out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Unique tokens targeted.
    pub tokens: u64,
    pub sent: u64,
    /// Tokens FCM said are dead.
    pub dead: u64,
    /// Token documents deleted for dead tokens.
    pub removed: u64,
    /// Dead tokens left in place because finding their documents needs a Firestore index
    /// that is missing (`ffpush doctor` names it).
    pub dead_kept: u64,
    pub sender_id_mismatch: u64,
    pub third_party_auth: u64,
    /// Tokens still failing transiently after every attempt.
    pub undelivered: u64,
}

impl Tally {
    pub fn failed(&self) -> u64 {
        self.tokens - self.sent
    }

    fn add(&mut self, result: &TokenResult) {
        self.tokens += 1;
        match result.outcome {
            Some(Outcome::Sent) => self.sent += 1,
            Some(Outcome::Dead) => self.dead += 1,
            Some(Outcome::SenderIdMismatch) => self.sender_id_mismatch += 1,
            Some(Outcome::ThirdPartyAuth) => self.third_party_auth += 1,
            None => self.undelivered += 1,
        }
        self.removed += result.removed;
        self.dead_kept += u64::from(result.dead_kept);
    }
}

/// How far a fan-out has got: every token document at or before `cursor` (in document-path
/// order), and every one listed in `beyond`, has a final answer and is counted in `tally`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub cursor: Option<String>,
    /// Finished out of order, past the cursor (at most the concurrency).
    pub beyond: Vec<String>,
    pub tally: Tally,
}

/// Firestore orders document paths segment by segment, not as plain strings
/// (`users/a-b/…` sorts after `users/a/…`).
pub fn path_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

/// Which tokens have a final answer. Shared with the lease keeper, which persists snapshots.
#[derive(Debug, Default)]
pub struct Ledger {
    cursor: Option<String>,
    /// The cursor of the run this one resumes: tokens at or before it are done. Kept apart from
    /// the moving `cursor` so that a fresh fan-out compares no paths at all.
    resumed_cursor: Option<String>,
    /// Sequence number of `window[0]`.
    first_seq: u64,
    /// (document name, finished?) of every started token from `first_seq` on, in start order.
    /// The first unfinished one holds the cursor back.
    window: VecDeque<(String, bool)>,
    /// Finished in an earlier run past its cursor.
    resumed_beyond: HashSet<String>,
    /// Every finished token, including those past the cursor.
    tally: Tally,
}

impl Ledger {
    pub fn resume(p: &Progress) -> Ledger {
        Ledger {
            cursor: p.cursor.clone(),
            resumed_cursor: p.cursor.clone(),
            first_seq: 0,
            window: VecDeque::new(),
            resumed_beyond: p.beyond.iter().cloned().collect(),
            tally: p.tally,
        }
    }

    /// Whether an earlier run already has a final answer for this token document.
    fn done_before(&self, doc_name: &str) -> bool {
        self.resumed_cursor
            .as_deref()
            .is_some_and(|c| path_cmp(doc_name, c) != std::cmp::Ordering::Greater)
            || (!self.resumed_beyond.is_empty() && self.resumed_beyond.contains(doc_name))
    }

    /// Sequence numbers are handed out consecutively from 0.
    fn start(&mut self, seq: u64, doc_name: String) {
        debug_assert_eq!(seq, self.first_seq + self.window.len() as u64);
        self.window.push_back((doc_name, false));
    }

    fn finish(&mut self, result: &TokenResult) {
        self.tally.add(result);
        let slot = result
            .seq
            .checked_sub(self.first_seq)
            .and_then(|i| self.window.get_mut(i as usize));
        if let Some(slot) = slot {
            slot.1 = true;
        }
        while self.window.front().is_some_and(|(_, done)| *done) {
            if let Some((name, _)) = self.window.pop_front() {
                self.cursor = Some(name);
            }
            self.first_seq += 1;
        }
    }

    pub fn snapshot(&self) -> Progress {
        let past_cursor = |name: &String| {
            self.cursor
                .as_deref()
                .is_none_or(|c| path_cmp(name, c) == std::cmp::Ordering::Greater)
        };
        let mut beyond: Vec<String> = self
            .window
            .iter()
            .filter(|(_, done)| *done)
            .map(|(name, _)| name.clone())
            .chain(
                self.resumed_beyond
                    .iter()
                    .filter(|n| past_cursor(n))
                    .cloned(),
            )
            .collect();
        beyond.sort_by(|a, b| path_cmp(a, b));
        Progress {
            cursor: self.cursor.clone(),
            beyond,
            tally: self.tally,
        }
    }
}

/// Why a fan-out stopped before the end. Sends already in flight were let finish (and are
/// counted) in every case.
#[derive(Debug, thiserror::Error)]
pub enum Abort {
    /// The notification is at fault (FCM's 400 on the payload).
    #[error(transparent)]
    Payload(fcm::Error),
    /// Permissions, project or credentials: no token can be sent.
    #[error(transparent)]
    Fatal(fcm::Error),
    /// Reading the audience failed (after retries for transient errors).
    #[error("reading device tokens failed")]
    Store(#[source] crate::store::Error),
    /// Shutdown or a lost lease: stop without a verdict; in-flight sends were let finish.
    #[error("interrupted")]
    Interrupted,
}

/// What the fan-out needs besides the tokens.
pub struct Context<'a> {
    pub sender: &'a Sender,
    pub store: &'a Store,
    pub metrics: &'a Metrics,
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max_backoff: Duration,
    /// Least wait after a 429 (FCM asks for 60 s on project quota).
    pub quota_floor: Duration,
    /// How long one token may keep being retried in all.
    pub budget: Duration,
}

impl RetryPolicy {
    /// The policy the settings give (`FFPUSH_MAX_ATTEMPTS`, `FFPUSH_MAX_BACKOFF`,
    /// `FFPUSH_QUOTA_BACKOFF`, `FFPUSH_RETRY_BUDGET`), from a first step of 500 ms.
    pub fn from_settings(settings: &crate::config::Settings) -> RetryPolicy {
        RetryPolicy {
            max_attempts: settings.max_attempts,
            base: Duration::from_millis(500),
            max_backoff: settings.max_backoff,
            quota_floor: settings.quota_floor,
            budget: settings.retry_budget,
        }
    }

    /// Wait before attempt `attempt + 1` (attempt counts from 1): exponential with jitter in
    /// [½, 1] of the step, never less than FCM's Retry-After, capped by `max_backoff` unless
    /// FCM asked for longer.
    pub fn backoff(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        quota: bool,
        jitter: f64,
    ) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let jittered = step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        let floor = retry_after.unwrap_or_default().max(if quota {
            self.quota_floor
        } else {
            Duration::ZERO
        });
        jittered.max(floor)
    }
}

struct TokenResult {
    seq: u64,
    /// `None`: undelivered after every attempt.
    outcome: Option<Outcome>,
    removed: u64,
    /// A dead token whose documents could not be looked up (a missing index).
    dead_kept: bool,
}

/// Sends the template to every unique token of `pages`. Tokens the `ledger` says an earlier
/// run finished are only remembered (for de-duplication), not sent. The ledger is kept current
/// for whoever persists it. However it ends, it returns only when no send is in flight: a send
/// FCM may have delivered is always in the ledger, so a resumed run never repeats it.
pub async fn fan_out(
    ctx: &Context<'_>,
    template: &MessageTemplate,
    mut pages: TokenPages,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) -> Result<Tally, Abort> {
    let hasher = RandomState::new();
    // Keys are already keyed hashes: the set stores them as they are.
    let mut seen: HashSet<u64, BuildHasherDefault<Prehashed>> = HashSet::default();
    let mut buffer: VecDeque<DeviceToken> = VecDeque::new();
    // Set at the first missing-index answer to a dead-token lookup: later dead tokens are
    // kept without asking again, and sending goes on.
    let no_index = AtomicBool::new(false);
    let mut in_flight = FuturesUnordered::new();
    let removed_before = lock(&ledger).tally.removed;
    let mut next_seq = 0u64;
    let mut reading = true;
    let mut stopping = false;
    // Why the fan-out stops early; it returns once the sends in flight have finished.
    let mut failure: Option<Abort> = None;
    // Cancelled on stop or failure: a token waiting to be retried is left for a resumed run,
    // while requests already on the wire finish.
    let drain = stop.child_token();
    // Since when send slots are free but no token is at hand: the wait on Firestore reads.
    let mut starved_since: Option<std::time::Instant> = None;
    // A send that finished in the last round, recorded together with the next starts so the
    // ledger is locked once per round, not once per start and once per finish.
    let mut finished: Option<TokenResult> = None;

    loop {
        {
            let mut ledger = lock(&ledger);
            if let Some(result) = finished.take() {
                ledger.finish(&result);
            }
            while !stopping && in_flight.len() < ctx.concurrency {
                let Some(DeviceToken { doc_name, token }) = buffer.pop_front() else {
                    break;
                };
                if token.is_empty()
                    || !seen.insert(hasher.hash_one(&token))
                    || ledger.done_before(&doc_name)
                {
                    continue;
                }
                let seq = next_seq;
                next_seq += 1;
                ledger.start(seq, doc_name);
                in_flight.push(send_one(
                    ctx,
                    template,
                    token,
                    seq,
                    &no_index,
                    drain.clone(),
                ));
            }
        }
        let want_page =
            reading && !stopping && buffer.is_empty() && in_flight.len() < ctx.concurrency;
        if !want_page && in_flight.is_empty() {
            break;
        }
        if want_page && starved_since.is_none() {
            starved_since = Some(std::time::Instant::now());
        }
        tokio::select! {
            biased;
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
            }
            done = in_flight.next(), if !in_flight.is_empty() => {
                let Some(done) = done else { continue };
                match done {
                    Ok(result) => finished = Some(result),
                    // Its seq stays unfinished, so it will be sent by whoever resumes.
                    Err(Abort::Interrupted) => stopping = true,
                    Err(e) => {
                        failure.get_or_insert(e);
                        stopping = true;
                        drain.cancel();
                    }
                }
            }
            page = pages.pages.recv(), if want_page => {
                if let Some(since) = starved_since.take() {
                    ctx.metrics.token_wait_micros.inc_by(since.elapsed().as_micros() as u64);
                }
                match page {
                    Some(Ok(page)) => {
                        tracing::debug!(tokens = page.len(), "token page read");
                        buffer.extend(page);
                    }
                    Some(Err(e)) => {
                        failure.get_or_insert(Abort::Store(e));
                        stopping = true;
                        drain.cancel();
                    }
                    None => reading = false,
                }
            }
        }
    }
    let tally = {
        let mut ledger = lock(&ledger);
        if let Some(result) = finished.take() {
            ledger.finish(&result);
        }
        ledger.tally
    };
    ctx.metrics
        .tokens_removed
        .inc_by(tally.removed.saturating_sub(removed_before));
    if let Some(failure) = failure {
        return Err(failure);
    }
    if stopping {
        return Err(Abort::Interrupted);
    }
    Ok(tally)
}

/// Hasher for keys that are already uniformly distributed 64-bit hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed with this; fold anything else in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

async fn send_one(
    ctx: &Context<'_>,
    template: &MessageTemplate,
    token: String,
    seq: u64,
    no_index: &AtomicBool,
    stop: CancellationToken,
) -> Result<TokenResult, Abort> {
    let body = template.body_for(&token);
    let first_try = std::time::Instant::now();
    let mut attempt = 1;
    loop {
        // The instance's pace (FFPUSH_FCM_RATE, quota pauses). Waiting here is not being in
        // flight: on shutdown the token is left for the next run.
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Err(Abort::Interrupted),
            _ = ctx.sender.pace() => {}
        }
        let started = std::time::Instant::now();
        let answer = ctx.sender.send_now(body.clone()).await;
        ctx.metrics.observe_fcm(&answer, started.elapsed());
        let (retry_after, quota, fatal_when_exhausted, error) = match answer {
            Ok(Outcome::Dead) => {
                let removed = remove_dead(ctx.store, &token, no_index).await;
                return Ok(TokenResult {
                    seq,
                    outcome: Some(Outcome::Dead),
                    removed: removed.unwrap_or(0),
                    dead_kept: removed.is_none(),
                });
            }
            Ok(outcome) => {
                return Ok(TokenResult {
                    seq,
                    outcome: Some(outcome),
                    removed: 0,
                    dead_kept: false,
                });
            }
            Err(e) => match e.action() {
                Action::FailNotification => return Err(Abort::Payload(e)),
                Action::Fatal => return Err(Abort::Fatal(e)),
                Action::Retry {
                    retry_after,
                    quota,
                    fatal_when_exhausted,
                } => (retry_after, quota, fatal_when_exhausted, e),
            },
        };
        if quota {
            // The project's quota, not this token: the sender paused every send of the
            // instance (Retry-After, at least FFPUSH_QUOTA_BACKOFF) and paces the return. The
            // token waits for that in `pace`, and the refusal spends none of its attempts;
            // the retry budget still bounds how long it keeps trying.
            let pause = retry_after.unwrap_or_default().max(ctx.retry.quota_floor);
            if first_try.elapsed().saturating_add(pause) > ctx.retry.budget {
                tracing::warn!(token = %redact(&token), attempts = attempt, error = %Chain(&error), "giving up on token: the project's FCM quota stayed exhausted for the whole retry budget");
                return Ok(TokenResult {
                    seq,
                    outcome: None,
                    removed: 0,
                    dead_kept: false,
                });
            }
            tracing::debug!(token = %redact(&token), error = %Chain(&error), "quota exceeded; waiting for the instance's pause");
            ctx.metrics.retries.inc();
            continue;
        }
        let wait = ctx
            .retry
            .backoff(attempt, retry_after, quota, rand::random::<f64>());
        if attempt >= ctx.retry.max_attempts
            || first_try.elapsed().saturating_add(wait) > ctx.retry.budget
        {
            tracing::warn!(token = %redact(&token), attempts = attempt, error = %Chain(&error), "giving up on token");
            if fatal_when_exhausted {
                return Err(Abort::Fatal(error));
            }
            return Ok(TokenResult {
                seq,
                outcome: None,
                removed: 0,
                dead_kept: false,
            });
        }
        tracing::debug!(token = %redact(&token), attempt, wait_ms = wait.as_millis() as u64, error = %Chain(&error), "retrying");
        ctx.metrics.retries.inc();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // On shutdown (or when the fan-out fails) a token waiting for a retry is not in
            // flight: leave it for the next run.
            _ = stop.cancelled() => return Err(Abort::Interrupted),
        }
        attempt += 1;
    }
}

/// Deletes every token document holding `token`; returns how many went, or `None` when the
/// lookup needs a Firestore index that is missing. Then the token is kept, the first time is
/// logged as an error with Firestore's fix, and `no_index` spares the later dead tokens of
/// the fan-out the same failed query: a missing index costs the cleanup, never the sending.
async fn remove_dead(store: &Store, token: &str, no_index: &AtomicBool) -> Option<u64> {
    if no_index.load(Ordering::Relaxed) {
        return None;
    }
    let names = match store.token_docs_with(token).await {
        Ok(names) => names,
        Err(e @ crate::store::Error::MissingIndex { .. }) => {
            if !no_index.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %Chain(&e), "dead tokens cannot be removed: looking up their documents needs a Firestore index that is missing; sending goes on, and the notification's warning says how many were kept");
            }
            return None;
        }
        Err(e) => {
            tracing::warn!(token = %redact(token), error = %Chain(&e), "could not look up a dead token's documents");
            return Some(0);
        }
    };
    let mut removed = 0;
    for name in names {
        match store.delete(&name).await {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(token_doc = %store.relative(&name), error = %Chain(&e), "could not delete a dead token")
            }
        }
    }
    tracing::debug!(token = %redact(token), removed, "dead token: its documents removed");
    Some(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            base: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            quota_floor: Duration::from_secs(60),
            budget: Duration::from_secs(600),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy();
        assert_eq!(p.backoff(1, None, false, 1.0), Duration::from_millis(500));
        assert_eq!(p.backoff(2, None, false, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(4, None, false, 1.0), Duration::from_secs(4));
        assert_eq!(p.backoff(30, None, false, 1.0), Duration::from_secs(60));
        assert_eq!(p.backoff(2, None, false, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn backoff_honours_retry_after_and_the_quota_floor() {
        let p = policy();
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(5)), false, 1.0),
            Duration::from_secs(5)
        );
        assert_eq!(p.backoff(1, None, true, 0.3), Duration::from_secs(60));
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(120)), true, 0.3),
            Duration::from_secs(120)
        );
    }

    fn sent(seq: u64) -> TokenResult {
        TokenResult {
            seq,
            outcome: Some(Outcome::Sent),
            removed: 0,
            dead_kept: false,
        }
    }

    #[test]
    fn the_cursor_only_passes_finished_tokens_and_the_rest_is_listed() {
        let mut ledger = Ledger::default();
        for (seq, name) in ["u/a", "u/b", "u/c"].iter().enumerate() {
            ledger.start(seq as u64, name.to_string());
        }
        ledger.finish(&sent(1));
        let p = ledger.snapshot();
        assert_eq!(p.cursor, None, "b finished before a: the cursor must wait");
        assert_eq!(p.beyond, vec!["u/b".to_string()]);
        ledger.finish(&sent(0));
        let p = ledger.snapshot();
        assert_eq!(p.cursor.as_deref(), Some("u/b"));
        assert!(p.beyond.is_empty());
        assert_eq!(p.tally.sent, 2);
    }

    #[test]
    fn a_resumed_ledger_skips_exactly_what_was_finished() {
        let before = Progress {
            cursor: Some("users/a/fcm_tokens/2".into()),
            beyond: vec!["users/b/fcm_tokens/1".into()],
            tally: Tally {
                tokens: 3,
                sent: 3,
                ..Default::default()
            },
        };
        let ledger = Ledger::resume(&before);
        assert!(ledger.done_before("users/a/fcm_tokens/1"));
        assert!(ledger.done_before("users/a/fcm_tokens/2"));
        assert!(!ledger.done_before("users/a/fcm_tokens/3"));
        assert!(ledger.done_before("users/b/fcm_tokens/1"));
        assert!(!ledger.done_before("users/a0/fcm_tokens/1"));
        // Segment order: `users/a-b/…` comes after `users/a/…` in Firestore.
        assert!(!ledger.done_before("users/a-b/fcm_tokens/1"));
        assert_eq!(
            ledger.snapshot(),
            before,
            "nothing new finished: the same progress"
        );
    }

    #[test]
    fn paths_compare_segment_by_segment() {
        use std::cmp::Ordering::*;
        assert_eq!(path_cmp("users/a/x/1", "users/a-b/x/1"), Less);
        assert_eq!(path_cmp("users/a/x/1", "users/a/x/1"), Equal);
        assert_eq!(path_cmp("users/ab/x/1", "users/a/x/9"), Greater);
    }
}
