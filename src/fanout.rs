//! Drives the sends of one notification: unique tokens, bounded concurrency, retries with
//! backoff, dead-token pruning, and a progress cursor that says exactly which tokens are done.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audience::{Page, TokenPages};
use crate::errors::Chain;
use crate::fcm::{self, Action, ErrorCode, Outcome, Sender, redact};
use crate::language::{Language, LanguageReader, Messages, Picker};
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
    /// Tokens still failing transiently after every attempt, their last one answered.
    pub undelivered: u64,
    /// Tokens whose last attempt got no answer: FCM may have delivered them.
    pub timed_out: u64,
    /// Each token's final answer other than a delivery, by FCM's error code.
    pub errors: ErrorCounts,
}

/// How many tokens ended with each of FCM's error codes (the notification's `error_counts`).
/// A fixed array, so that a [`Tally`] stays a plain copyable value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts([u64; ErrorCode::ALL.len()]);

impl ErrorCounts {
    pub fn get(&self, code: ErrorCode) -> u64 {
        self.0[code as usize]
    }

    pub fn add(&mut self, code: ErrorCode, n: u64) {
        let slot = &mut self.0[code as usize];
        *slot = slot.saturating_add(n);
    }

    /// The codes some token got, with their counts, in [`ErrorCode::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (ErrorCode, u64)> + '_ {
        ErrorCode::ALL
            .into_iter()
            .map(|c| (c, self.get(c)))
            .filter(|(_, n)| *n > 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|n| *n == 0)
    }
}

impl Tally {
    /// Tokens not sent. Never negative, whatever a progress field read back says.
    pub fn failed(&self) -> u64 {
        self.tokens.saturating_sub(self.sent)
    }

    /// Every token counted in `tokens` has exactly one outcome; a progress field that says
    /// otherwise (written by hand, or by something else) is read as covering its outcomes.
    pub fn normalized(mut self) -> Tally {
        let outcomes = [
            self.sent,
            self.dead,
            self.sender_id_mismatch,
            self.third_party_auth,
            self.undelivered,
            self.timed_out,
        ]
        .into_iter()
        .fold(0u64, u64::saturating_add);
        self.tokens = self.tokens.max(outcomes);
        self
    }

    fn add(&mut self, result: &TokenResult) {
        self.tokens += 1;
        match result.outcome {
            Some(Outcome::Sent) => self.sent += 1,
            Some(Outcome::Dead | Outcome::InvalidToken) => self.dead += 1,
            Some(Outcome::SenderIdMismatch) => self.sender_id_mismatch += 1,
            Some(Outcome::ThirdPartyAuth) => self.third_party_auth += 1,
            None if result.error == Some(ErrorCode::Timeout) => self.timed_out += 1,
            None => self.undelivered += 1,
        }
        if let Some(code) = result.error {
            self.errors.add(code, 1);
        }
        self.removed += result.removed;
        self.dead_kept += u64::from(result.dead_kept);
    }
}

/// How far a fan-out has got, as written with each lease renewal. Tokens are started in
/// document-path order, so a position in that order plus the few started tokens without an
/// answer say exactly which are done, in a size bounded by the concurrency, however many
/// finished while one stalled.
///
/// A token document is finished when it is at or before `cursor`, or at or before
/// `last_started` and not in `unfinished`, or in `beyond`. Every finished one is counted in
/// `tally`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Every token document at or before it is finished. The only position older ffpush
    /// versions read (with `beyond`), so a document they resume is never sent short.
    pub cursor: Option<String>,
    /// The furthest token document started.
    pub last_started: Option<String>,
    /// Started, at or before `last_started`, with no final answer yet: on the wire, or
    /// waiting for a retry, the pace or the lease. At most the concurrency, in path order.
    pub unfinished: Vec<String>,
    /// Finished past `last_started`. Only older ffpush versions wrote this (every token
    /// finished past their cursor, however many); it is carried until the run passes it.
    pub beyond: Vec<String>,
    pub tally: Tally,
}

/// Firestore orders document paths segment by segment, not as plain strings
/// (`users/a-b/…` sorts after `users/a/…`).
pub fn path_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

/// `name` is at or before `bound` in path order.
fn at_or_before(name: &str, bound: Option<&str>) -> bool {
    bound.is_some_and(|b| path_cmp(name, b) != std::cmp::Ordering::Greater)
}

/// The later of two positions in path order.
fn furthest(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if path_cmp(&a, &b) == std::cmp::Ordering::Less {
            b
        } else {
            a
        }),
        (a, b) => a.or(b),
    }
}

/// A token started and not finished.
#[derive(Debug)]
struct Started {
    name: String,
    /// The token started just before it in this run: every token up to that one is finished
    /// once every token started before this one is.
    prev: Option<String>,
}

/// Which tokens have a final answer. Shared with the lease keeper, which persists snapshots.
/// It holds the started tokens without an answer and what it resumed from, never the
/// finished ones: its size follows the concurrency, not the audience.
#[derive(Debug, Default)]
pub struct Ledger {
    /// What the run this one resumes had finished: up to `resumed_cursor`, and up to
    /// `resumed_last` except `pending`, and `resumed_beyond`.
    resumed_cursor: Option<String>,
    resumed_last: Option<String>,
    /// The resumed run's unfinished tokens this run has not reached yet, in path order.
    pending: VecDeque<String>,
    resumed_beyond: HashSet<String>,
    /// Started and unfinished, by sequence number (start order, which is path order).
    in_flight: BTreeMap<u64, Started>,
    /// The furthest token started in this run.
    last: Option<String>,
    /// Every finished token, including those of the runs resumed.
    tally: Tally,
}

impl Ledger {
    pub fn resume(p: &Progress) -> Ledger {
        let mut pending: Vec<String> = p.unfinished.clone();
        pending.sort_by(|a, b| path_cmp(a, b));
        Ledger {
            resumed_cursor: p.cursor.clone(),
            resumed_last: p.last_started.clone(),
            pending: pending.into(),
            resumed_beyond: p.beyond.iter().cloned().collect(),
            in_flight: BTreeMap::new(),
            last: None,
            tally: p.tally,
        }
    }

    /// Whether an earlier run already has a final answer for this token document. Called for
    /// every token document in stream (path) order: an unfinished token of the earlier run
    /// that the stream passes without presenting is gone, or held a token sent under another
    /// document, and needs nothing more.
    fn done_before(&mut self, doc_name: &str) -> bool {
        while let Some(front) = self.pending.front() {
            match path_cmp(front, doc_name) {
                std::cmp::Ordering::Less => {
                    self.pending.pop_front();
                }
                std::cmp::Ordering::Equal => {
                    self.pending.pop_front();
                    return false;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        at_or_before(doc_name, self.resumed_cursor.as_deref())
            || at_or_before(doc_name, self.resumed_last.as_deref())
            || (!self.resumed_beyond.is_empty() && self.resumed_beyond.contains(doc_name))
    }

    /// Sequence numbers are handed out in start order.
    fn start(&mut self, seq: u64, doc_name: String) {
        let prev = self.last.replace(doc_name.clone());
        self.in_flight.insert(
            seq,
            Started {
                name: doc_name,
                prev,
            },
        );
    }

    fn finish(&mut self, result: &TokenResult) {
        self.tally.add(result);
        self.in_flight.remove(&result.seq);
    }

    /// Names of tokens this ledger holds: started and unfinished, and what it resumed from
    /// and has not passed yet. Bounded by the concurrency (plus an older version's `beyond`).
    pub fn held(&self) -> usize {
        self.in_flight.len() + self.pending.len() + self.resumed_beyond.len()
    }

    pub fn snapshot(&self) -> Progress {
        let last_started = furthest(
            furthest(self.resumed_cursor.clone(), self.resumed_last.clone()),
            self.last.clone(),
        );
        let mut unfinished: Vec<String> = self
            .pending
            .iter()
            .chain(self.in_flight.values().map(|s| &s.name))
            .cloned()
            .collect();
        unfinished.sort_by(|a, b| path_cmp(a, b));
        let cursor = match self.in_flight.first_key_value() {
            // Everything started before the oldest unfinished token is finished, and what was
            // passed between them needed no send.
            Some((_, oldest)) => oldest.prev.clone().or_else(|| self.resumed_cursor.clone()),
            None if self.pending.is_empty() => {
                furthest(self.resumed_cursor.clone(), self.last.clone())
            }
            None => self.resumed_cursor.clone(),
        };
        let mut beyond: Vec<String> = self
            .resumed_beyond
            .iter()
            .filter(|n| !at_or_before(n, last_started.as_deref()))
            .cloned()
            .collect();
        beyond.sort_by(|a, b| path_cmp(a, b));
        Progress {
            cursor,
            last_started,
            unfinished,
            beyond,
            tally: self.tally,
        }
    }
}

/// Until when the fan-out may put a send on the wire. The lease keeper moves it on after each
/// progress write that succeeded; when writes fail it is not moved and sending pauses until
/// one succeeds, so that no more is sent than what a worker taking over would send again
/// (see [`crate::claim::LeaseTerms::send_window`]).
#[derive(Debug)]
pub struct SendGate {
    until: watch::Sender<Instant>,
}

impl SendGate {
    pub fn new(until: Instant) -> SendGate {
        SendGate {
            until: watch::Sender::new(until),
        }
    }

    /// Sending is allowed until `until` (never moved back).
    pub fn extend(&self, until: Instant) {
        self.until.send_if_modified(|current| {
            let later = until > *current;
            if later {
                *current = until;
            }
            later
        });
    }

    pub fn is_open(&self) -> bool {
        Instant::now() < *self.until.borrow()
    }

    /// Returns once sending is allowed.
    async fn opened(&self) {
        let mut until = self.until.subscribe();
        loop {
            if Instant::now() < *until.borrow_and_update() {
                return;
            }
            if until.changed().await.is_err() {
                // The sender is `self`, alive while this runs: not reached.
                std::future::pending::<()>().await;
            }
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
    /// The claim's gate on durable progress; `None` sends without one (nothing to resume).
    pub gate: Option<&'a SendGate>,
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
    /// The final answer's error code: of the outcome, or of the last attempt's error.
    error: Option<ErrorCode>,
    removed: u64,
    /// A dead token whose documents could not be looked up (a missing index).
    dead_kept: bool,
}

impl TokenResult {
    /// FCM's final answer about the token. `removed`: a dead token's documents deleted, `None`
    /// when they could not be looked up (it is kept); `Some(0)` for a live token.
    fn answered(seq: u64, outcome: Outcome, removed: Option<u64>) -> TokenResult {
        TokenResult {
            seq,
            outcome: Some(outcome),
            error: ErrorCode::of_outcome(outcome),
            removed: removed.unwrap_or(0),
            dead_kept: removed.is_none(),
        }
    }

    /// No final answer after every attempt; `error`: the last attempt's code.
    fn undelivered(seq: u64, error: ErrorCode) -> TokenResult {
        TokenResult {
            seq,
            outcome: None,
            error: Some(error),
            removed: 0,
            dead_kept: false,
        }
    }
}

/// Sends the message to every unique token of `pages`, each in its user's language. Tokens the `ledger` says an earlier
/// run finished are only remembered (for de-duplication), not sent. The ledger is kept current
/// for whoever persists it. However it ends, it returns only when no send is in flight: a send
/// FCM may have delivered is always in the ledger, so a resumed run never repeats it.
pub async fn fan_out(
    ctx: &Context<'_>,
    messages: &Messages,
    mut pages: TokenPages,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) -> Result<Tally, Abort> {
    let mut queue = Queue::new(messages);
    // Set at the first missing-index answer to a dead-token lookup: later dead tokens are
    // kept without asking again, and sending goes on.
    let no_index = AtomicBool::new(false);
    let mut in_flight = FuturesUnordered::new();
    let removed_before = lock(&ledger).tally.removed;
    let mut ending = Ending::new(&stop);
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
            while !ending.stopping && in_flight.len() < ctx.concurrency {
                let Some((seq, body, token)) = queue.next_send(&mut ledger) else {
                    break;
                };
                let drain = ending.drain.clone();
                in_flight.push(send_one(ctx, body, token, seq, &no_index, drain));
            }
        }
        let want_page = queue.reading
            && !ending.stopping
            && queue.buffer.is_empty()
            && in_flight.len() < ctx.concurrency;
        if !want_page && in_flight.is_empty() {
            break;
        }
        if want_page && starved_since.is_none() {
            starved_since = Some(std::time::Instant::now());
        }
        tokio::select! {
            biased;
            _ = stop.cancelled(), if !ending.stopping => {
                ending.stopping = true;
            }
            done = in_flight.next(), if !in_flight.is_empty() => {
                let Some(done) = done else { continue };
                finished = ending.answered(done);
            }
            page = pages.pages.recv(), if want_page => {
                if let Some(since) = starved_since.take() {
                    ctx.metrics.token_wait_micros.inc_by(since.elapsed().as_micros() as u64);
                }
                if let Err(e) = queue.take(page) {
                    ending.fail(e);
                }
            }
        }
    }
    let tally = settle(ctx, &ledger, finished, removed_before);
    ending.verdict(tally)
}

/// The counts once no send is in flight, the last answer (`finished`) recorded; the dead
/// tokens' documents this run removed counted in `ffpush_tokens_removed_total`.
fn settle(
    ctx: &Context<'_>,
    ledger: &Mutex<Ledger>,
    finished: Option<TokenResult>,
    removed_before: u64,
) -> Tally {
    let tally = {
        let mut ledger = lock(ledger);
        if let Some(result) = finished {
            ledger.finish(&result);
        }
        ledger.tally
    };
    ctx.metrics
        .tokens_removed
        .inc_by(tally.removed.saturating_sub(removed_before));
    tally
}

/// The tokens read and not started yet, and which of them are sent: each unique token once,
/// in its user's language, unless an earlier run finished it.
struct Queue<'m> {
    unique: Unique,
    buffer: VecDeque<(DeviceToken, Language)>,
    /// One template per language variant, built as users of that language come.
    picker: Picker<'m>,
    next_seq: u64,
    /// Pages are still coming.
    reading: bool,
}

impl<'m> Queue<'m> {
    fn new(messages: &'m Messages) -> Queue<'m> {
        Queue {
            unique: Unique::default(),
            buffer: VecDeque::new(),
            picker: messages.picker(),
            next_seq: 0,
            reading: true,
        }
    }

    /// Takes in a page read (`None`: the audience is read to its end).
    fn take(&mut self, page: Option<Result<Page, crate::store::Error>>) -> Result<(), Abort> {
        match page {
            Some(Ok(page)) => {
                tracing::debug!(tokens = page.tokens.len(), "token page read");
                self.buffer.extend(page.into_entries());
            }
            Some(Err(e)) => return Err(Abort::Store(e)),
            None => self.reading = false,
        }
        Ok(())
    }

    /// The next token to send, started in `ledger`, with its sequence number and body; `None`
    /// when no token read is left to send.
    fn next_send(&mut self, ledger: &mut Ledger) -> Option<(u64, Bytes, String)> {
        loop {
            let (DeviceToken { doc_name, token }, language) = self.buffer.pop_front()?;
            // Asked of every token document, in order, before anything is skipped.
            let done = ledger.done_before(&doc_name);
            if !self.unique.first(&token) || done {
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            ledger.start(seq, doc_name);
            let body = self.picker.body_for(&language, &token);
            return Some((seq, body, token));
        }
    }
}

/// Whether the fan-out is winding down, and why. It returns once the sends in flight have
/// finished.
struct Ending {
    /// No more sends start: stopped, interrupted or failed.
    stopping: bool,
    /// Why the fan-out stops early, when it failed.
    failure: Option<Abort>,
    /// Cancelled on stop or failure: a token waiting to be retried is left for a resumed run,
    /// while requests already on the wire finish.
    drain: CancellationToken,
}

impl Ending {
    fn new(stop: &CancellationToken) -> Ending {
        Ending {
            stopping: false,
            failure: None,
            drain: stop.child_token(),
        }
    }

    /// A send's end: its result when it has one. A send interrupted leaves its token
    /// unfinished, for whoever resumes; a send that failed fails the fan-out.
    fn answered(&mut self, done: Result<TokenResult, Abort>) -> Option<TokenResult> {
        match done {
            Ok(result) => return Some(result),
            Err(Abort::Interrupted) => self.stopping = true,
            Err(e) => self.fail(e),
        }
        None
    }

    /// The first failure is the fan-out's; sends waiting for a retry are dropped.
    fn fail(&mut self, e: Abort) {
        self.failure.get_or_insert(e);
        self.stopping = true;
        self.drain.cancel();
    }

    fn verdict(self, tally: Tally) -> Result<Tally, Abort> {
        if let Some(failure) = self.failure {
            return Err(failure);
        }
        if self.stopping {
            return Err(Abort::Interrupted);
        }
        Ok(tally)
    }
}

/// Unique non-empty tokens: each is remembered by a keyed hash, not by its text.
#[derive(Default)]
struct Unique {
    hasher: RandomState,
    // Keys are already keyed hashes: the set stores them as they are.
    seen: HashSet<u64, BuildHasherDefault<Prehashed>>,
}

impl Unique {
    /// Whether `token` is not empty and not seen before.
    fn first(&mut self, token: &str) -> bool {
        !token.is_empty() && self.seen.insert(self.hasher.hash_one(token))
    }
}

/// How a notification's run ended when it was not stopped.
#[derive(Debug)]
pub enum Finished {
    /// Sent (`fan_out`).
    Sent(Tally),
    /// A `dry_run` ([`validate`]).
    Validated(Validated),
}

/// What a dry run found.
#[derive(Debug, Default)]
pub struct Validated {
    /// The unique tokens a real send would reach.
    pub tokens: u64,
    /// FCM accepted the message (`validate_only`) on one of them.
    pub accepted: bool,
    /// Tokens tried that FCM refused for themselves (dead, another project, APNs), by code.
    pub refused: ErrorCounts,
}

/// Tokens a dry run tries the message on, in order, until FCM accepts it on one: the message
/// is what is validated, and a dead or foreign token says nothing about it.
const VALIDATION_TRIES: usize = 5;

/// A dry run: reads the recipients exactly as [`fan_out`] does (unique, non-empty tokens),
/// counts them, and has FCM validate the message (`validate_only`) on one. Nothing is
/// delivered and no token is removed.
///
/// With `languages` (a notification with translations), only the users of the tokens tried
/// have their language read, not every recipient's.
pub async fn validate(
    ctx: &Context<'_>,
    messages: &Messages,
    mut pages: TokenPages,
    languages: Option<&LanguageReader>,
    stop: CancellationToken,
) -> Result<Validated, Abort> {
    let mut unique = Unique::default();
    let mut candidates: Vec<DeviceToken> = Vec::new();
    let mut found = Validated::default();
    loop {
        let page = tokio::select! {
            biased;
            _ = stop.cancelled() => return Err(Abort::Interrupted),
            page = pages.pages.recv() => page,
        };
        match page {
            Some(Ok(page)) => {
                for token in page.tokens {
                    if !unique.first(&token.token) {
                        continue;
                    }
                    found.tokens += 1;
                    if candidates.len() < VALIDATION_TRIES {
                        candidates.push(token);
                    }
                }
            }
            Some(Err(e)) => return Err(Abort::Store(e)),
            None => break,
        }
    }
    let languages: Vec<Language> = match languages {
        Some(reader) => reader.languages(&candidates).await.map_err(Abort::Store)?,
        None => Vec::new(),
    };
    let mut picker = messages.picker();
    let languages = languages.into_iter().chain(std::iter::repeat(None));
    for (DeviceToken { token, .. }, language) in candidates.into_iter().zip(languages) {
        // In the candidate's language: the message validated is one a real send would send.
        let message = picker.template(&language).message_for(&token)["message"].take();
        match validate_once(ctx, message, &stop).await? {
            Outcome::Sent => {
                found.accepted = true;
                break;
            }
            refused => {
                if let Some(code) = ErrorCode::of_outcome(refused) {
                    found.refused.add(code, 1);
                }
            }
        }
    }
    Ok(found)
}

/// One `validate_only` request, retried as a send is.
async fn validate_once(
    ctx: &Context<'_>,
    message: serde_json::Value,
    stop: &CancellationToken,
) -> Result<Outcome, Abort> {
    let mut attempt = 1;
    loop {
        let retry = match ctx.sender.dry_run(message.clone()).await {
            Ok(outcome) => return Ok(outcome),
            Err(e) => Transient::of(e)?,
        };
        if attempt >= ctx.retry.max_attempts {
            return Err(Abort::Fatal(retry.error));
        }
        let wait = ctx.retry.backoff(
            attempt,
            retry.retry_after,
            retry.quota,
            rand::random::<f64>(),
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return Err(Abort::Interrupted),
        }
        attempt += 1;
    }
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

/// Waits for durable progress (the claim's gate) and the instance's pace (FFPUSH_FCM_RATE,
/// quota pauses), then looks at the gate again, right before the request goes on the wire:
/// the pace may have taken long. Waiting here is not being in flight: on shutdown, or when
/// the lease is lost, the token is left for the next run.
async fn cleared_to_send(ctx: &Context<'_>, stop: &CancellationToken) -> Result<(), Abort> {
    loop {
        if let Some(gate) = ctx.gate
            && !gate.is_open()
        {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Err(Abort::Interrupted),
                _ = gate.opened() => {}
            }
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Err(Abort::Interrupted),
            _ = ctx.sender.pace() => {}
        }
        if ctx.gate.is_none_or(SendGate::is_open) {
            return Ok(());
        }
    }
}

/// Sends `body`, the message for `token`, until FCM gives a final answer about it.
async fn send_one(
    ctx: &Context<'_>,
    body: Bytes,
    token: String,
    seq: u64,
    no_index: &AtomicBool,
    stop: CancellationToken,
) -> Result<TokenResult, Abort> {
    let first_try = std::time::Instant::now();
    let mut attempt = 1;
    loop {
        cleared_to_send(ctx, &stop).await?;
        let retry = match send_counted(ctx, body.clone()).await {
            Ok(outcome @ (Outcome::Dead | Outcome::InvalidToken)) => {
                let removed = remove_dead(ctx.store, &token, no_index).await;
                return Ok(TokenResult::answered(seq, outcome, removed));
            }
            Ok(outcome) => return Ok(TokenResult::answered(seq, outcome, Some(0))),
            Err(e) => Transient::of(e)?,
        };
        let error = &retry.error;
        if retry.quota {
            // The project's quota, not this token: the sender paused every send of the
            // instance (Retry-After, at least FFPUSH_QUOTA_BACKOFF) and paces the return. The
            // token waits for that in `pace`, and the refusal spends none of its attempts;
            // the retry budget still bounds how long it keeps trying.
            let pause = retry
                .retry_after
                .unwrap_or_default()
                .max(ctx.retry.quota_floor);
            if first_try.elapsed().saturating_add(pause) > ctx.retry.budget {
                tracing::warn!(token = %redact(&token), attempts = attempt, error = %Chain(error), "giving up on token: the project's FCM quota stayed exhausted for the whole retry budget");
                return Ok(TokenResult::undelivered(seq, error.code()));
            }
            tracing::debug!(token = %redact(&token), error = %Chain(error), "quota exceeded; waiting for the instance's pause");
            ctx.metrics.retries.inc();
            continue;
        }
        let wait = ctx.retry.backoff(
            attempt,
            retry.retry_after,
            retry.quota,
            rand::random::<f64>(),
        );
        if attempt >= ctx.retry.max_attempts
            || first_try.elapsed().saturating_add(wait) > ctx.retry.budget
        {
            tracing::warn!(token = %redact(&token), attempts = attempt, error = %Chain(error), "giving up on token");
            if retry.fatal_when_exhausted {
                return Err(Abort::Fatal(retry.error));
            }
            return Ok(TokenResult::undelivered(seq, error.code()));
        }
        tracing::debug!(token = %redact(&token), attempt, wait_ms = wait.as_millis() as u64, error = %Chain(error), "retrying");
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

/// One request, at once: its answer counted under its `outcome` in
/// `ffpush_fcm_messages_total`, with its latency.
async fn send_counted(ctx: &Context<'_>, body: Bytes) -> Result<Outcome, fcm::Error> {
    let started = std::time::Instant::now();
    let answer = ctx.sender.send_now(body).await;
    let class = match &answer {
        Ok(outcome) => outcome.class(),
        Err(e) => e.class(),
    };
    ctx.metrics.observe_fcm(class, started.elapsed());
    answer
}

/// An error a send may be tried again after ([`Action::Retry`]), with what the retry must
/// respect.
struct Transient {
    error: fcm::Error,
    retry_after: Option<Duration>,
    quota: bool,
    fatal_when_exhausted: bool,
}

impl Transient {
    /// The retry `error` calls for, or how it stops the fan-out: the message at fault, or no
    /// token can be sent.
    fn of(error: fcm::Error) -> Result<Transient, Abort> {
        match error.action() {
            Action::FailNotification => Err(Abort::Payload(error)),
            Action::Fatal => Err(Abort::Fatal(error)),
            Action::Retry {
                retry_after,
                quota,
                fatal_when_exhausted,
            } => Ok(Transient {
                error,
                retry_after,
                quota,
                fatal_when_exhausted,
            }),
        }
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
        TokenResult::answered(seq, Outcome::Sent, Some(0))
    }

    fn unfinished(seq: u64) -> TokenResult {
        TokenResult::undelivered(seq, ErrorCode::Unavailable)
    }

    /// Which of `names` (all the token documents, in path order) a run resuming from `p`
    /// skips as finished.
    fn skipped(p: &Progress, names: &[String]) -> Vec<bool> {
        let mut ledger = Ledger::resume(p);
        names.iter().map(|n| ledger.done_before(n)).collect()
    }

    #[test]
    fn started_tokens_without_an_answer_are_listed_and_the_cursor_waits_for_them() {
        let mut ledger = Ledger::default();
        for (seq, name) in ["u/a", "u/b", "u/c"].iter().enumerate() {
            assert!(!ledger.done_before(name));
            ledger.start(seq as u64, name.to_string());
        }
        ledger.finish(&sent(1));
        let p = ledger.snapshot();
        assert_eq!(p.cursor, None, "b finished before a: the cursor must wait");
        assert_eq!(p.last_started.as_deref(), Some("u/c"));
        assert_eq!(p.unfinished, vec!["u/a".to_string(), "u/c".to_string()]);
        assert!(p.beyond.is_empty());
        ledger.finish(&sent(0));
        let p = ledger.snapshot();
        assert_eq!(p.cursor.as_deref(), Some("u/b"));
        assert_eq!(p.unfinished, vec!["u/c".to_string()]);
        assert_eq!(p.tally.sent, 2);
        ledger.finish(&sent(2));
        let p = ledger.snapshot();
        assert_eq!(p.cursor.as_deref(), Some("u/c"));
        assert!(p.unfinished.is_empty());
    }

    #[test]
    fn progress_an_older_version_wrote_resumes_exactly_and_is_carried_on() {
        // An older ffpush: everything up to the cursor, and what `beyond` lists, finished.
        let before = Progress {
            cursor: Some("users/a/fcm_tokens/2".into()),
            beyond: vec!["users/b/fcm_tokens/1".into(), "users/c/fcm_tokens/1".into()],
            tally: Tally {
                tokens: 4,
                sent: 4,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut ledger = Ledger::resume(&before);
        assert!(ledger.done_before("users/a/fcm_tokens/1"));
        assert!(ledger.done_before("users/a/fcm_tokens/2"));
        assert!(!ledger.done_before("users/a/fcm_tokens/3"));
        // Segment order: `users/a-b/…` comes after `users/a/…` in Firestore.
        assert!(!ledger.done_before("users/a-b/fcm_tokens/1"));
        assert!(!ledger.done_before("users/a0/fcm_tokens/1"));
        assert!(ledger.done_before("users/b/fcm_tokens/1"));
        ledger.start(0, "users/a/fcm_tokens/3".into());
        ledger.start(1, "users/a-b/fcm_tokens/1".into());
        ledger.finish(&sent(1));
        // Written in this version's form, the same tokens count as finished, and the older
        // `beyond` past where this run got to is carried.
        let after = ledger.snapshot();
        assert_eq!(after.cursor.as_deref(), Some("users/a/fcm_tokens/2"));
        assert_eq!(after.unfinished, vec!["users/a/fcm_tokens/3".to_string()]);
        assert_eq!(
            after.beyond,
            vec![
                "users/b/fcm_tokens/1".to_string(),
                "users/c/fcm_tokens/1".to_string()
            ]
        );
        let names: Vec<String> = [
            "users/a/fcm_tokens/1",
            "users/a/fcm_tokens/3",
            "users/a-b/fcm_tokens/1",
            "users/a0/fcm_tokens/1",
            "users/b/fcm_tokens/1",
            "users/b/fcm_tokens/2",
            "users/c/fcm_tokens/1",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            skipped(&after, &names),
            [true, false, true, false, true, false, true]
        );
        assert_eq!(after.tally.tokens, 5);
    }

    #[test]
    fn a_resumed_run_skips_exactly_what_was_finished_across_interruptions() {
        // Many runs over one audience, each interrupted at a random point with tokens in
        // flight and finishing in random order; some documents hold a token seen before (the
        // fan-out skips those). After every interruption the progress must name exactly the
        // finished tokens: none sent twice, none lost.
        let names: Vec<String> = (0..400)
            .map(|i| format!("users/u{:02}/fcm_tokens/{:03}", i / 7, i))
            .collect();
        let duplicate = |i: usize| i % 11 == 5;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut finished = vec![false; names.len()];
        let mut progress = Progress::default();
        for run in 0..40 {
            let mut ledger = Ledger::resume(&progress);
            let concurrency = 1 + random(12);
            let mut in_flight: Vec<(u64, usize)> = Vec::new();
            let mut seq = 0;
            let stop_after = random(60);
            let mut steps = 0;
            let mut next = 0;
            while steps < stop_after && (next < names.len() || !in_flight.is_empty()) {
                steps += 1;
                if next < names.len() && in_flight.len() < concurrency && random(3) > 0 {
                    let done = ledger.done_before(&names[next]);
                    // The fan-out skips a duplicate whatever the ledger says.
                    assert!(
                        duplicate(next) || done == finished[next],
                        "run {run}: {} skipped wrongly",
                        names[next]
                    );
                    if !done && !duplicate(next) {
                        ledger.start(seq, names[next].clone());
                        in_flight.push((seq, next));
                        seq += 1;
                    }
                    next += 1;
                } else if !in_flight.is_empty() {
                    let (seq, i) = in_flight.swap_remove(random(in_flight.len()));
                    ledger.finish(&sent(seq));
                    finished[i] = true;
                }
                assert!(ledger.held() <= concurrency.max(progress.unfinished.len()));
            }
            progress = ledger.snapshot();
            assert!(progress.unfinished.len() <= 12, "{progress:?}");
            let expected: Vec<bool> = (0..names.len())
                .map(|i| finished[i] && !duplicate(i))
                .collect();
            let seen: Vec<bool> = skipped(&progress, &names)
                .into_iter()
                .enumerate()
                .map(|(i, s)| s && !duplicate(i))
                .collect();
            assert_eq!(seen, expected, "run {run}: {progress:?}");
            // An older version reads only `cursor` and `beyond`: it may send again what
            // finished past the cursor, but never skips what did not finish.
            let older = Progress {
                last_started: None,
                unfinished: Vec::new(),
                ..progress.clone()
            };
            for (i, skips) in skipped(&older, &names).into_iter().enumerate() {
                assert!(
                    !skips || finished[i] || duplicate(i),
                    "run {run}: an older version would skip {}: {progress:?}",
                    names[i]
                );
            }
        }
        assert_eq!(
            progress.tally.sent,
            finished.iter().filter(|f| **f).count() as u64
        );
    }

    #[test]
    fn a_stalled_token_keeps_the_progress_as_small_as_the_concurrency_whatever_the_count() {
        let concurrency = 64u64;
        let name = |i: u64| format!("users/u{:07}/fcm_tokens/{i:07}", i / 3);
        let mut ledger = Ledger::default();
        ledger.start(0, name(0));
        let mut largest = 0;
        for seq in 1..200_000 {
            ledger.start(seq, name(seq));
            if seq >= concurrency - 1 {
                ledger.finish(&sent(seq + 1 - (concurrency - 1)));
            }
            if seq % 5_000 == 0 {
                let p = ledger.snapshot();
                assert!(
                    p.unfinished.len() as u64 <= concurrency,
                    "{}",
                    p.unfinished.len()
                );
                assert!(ledger.held() as u64 <= concurrency);
                assert_eq!(p.cursor, None, "the stalled first token holds the cursor");
                let bytes: usize = p.unfinished.iter().map(String::len).sum();
                largest = largest.max(bytes);
            }
        }
        // Whatever the count: the names of at most `concurrency` tokens.
        assert!(largest <= concurrency as usize * name(0).len(), "{largest}");
        // The stalled one retried and failed: nothing past it is left to do.
        ledger.finish(&unfinished(0));
        let p = ledger.snapshot();
        // Tokens 1..=199 937 finished; 199 938 onwards are still in flight.
        assert_eq!(p.cursor, Some(name(199_937)));
    }

    #[test]
    fn paths_compare_segment_by_segment() {
        use std::cmp::Ordering::*;
        assert_eq!(path_cmp("users/a/x/1", "users/a-b/x/1"), Less);
        assert_eq!(path_cmp("users/a/x/1", "users/a/x/1"), Equal);
        assert_eq!(path_cmp("users/ab/x/1", "users/a/x/9"), Greater);
    }
}
