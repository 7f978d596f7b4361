//! `ffpush status`: the latest notifications of both collections, one line each — what the
//! operator asks first when something is wrong, answered from Firestore itself.
//!
//! Firestore cannot order a query by creation time, and the FlutterFlow console writes no time
//! field, so "the latest" is the union of four small reads per collection ([`Recent`]): finished
//! by `completed_at`, in progress by `status`, scheduled by `scheduled_time`, and documents
//! written with a `timestamp` (which finds those no worker has touched). They are merged,
//! ordered by last activity (the latest of created, started, finished) and cut to the limit.
//! A console document that no worker has claimed yet has no time field and is not listed:
//! `ffpush_documents_waiting` and the logs cover that case.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::fields;
use crate::model::{Status, pb, string_value};
use crate::store::{self, Recent, Store};

/// What to list.
#[derive(Clone, Debug)]
pub struct Options {
    pub limit: usize,
    /// Only `status == "failed"`.
    pub failed_only: bool,
    /// Only notifications with activity (created, started or finished) this recently.
    pub since: Option<Duration>,
}

/// One notification as `ffpush status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    /// The document id.
    pub id: String,
    pub collection: String,
    /// The document's creation time (Firestore's own, present on every document).
    pub created: Option<DateTime<Utc>>,
    /// The `status` field; when there is none: `scheduled` (due later) or `new` (not picked up).
    pub status: String,
    /// `num_sent` / `num_tokens` when finished; the progress so far while started.
    pub sent: Option<i64>,
    pub tokens: Option<i64>,
    pub removed: Option<i64>,
    pub failed: Option<i64>,
    pub scheduled_time: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// `completed_at - started_at`.
    pub took_seconds: Option<f64>,
    /// The worker holding a started notification.
    pub worker: Option<String>,
    pub error: Option<String>,
    pub warning: Option<String>,
    /// `error_counts` when finished (its progress so far while started): how many tokens got
    /// each of FCM's error codes.
    pub errors: BTreeMap<String, u64>,
    #[serde(skip)]
    activity: DateTime<Utc>,
}

/// The latest notifications of `collections`, most recent activity first.
pub async fn latest(
    store: &Store,
    collections: &[&str],
    options: &Options,
    now: DateTime<Utc>,
) -> Result<Vec<Entry>, store::Error> {
    let since = options
        .since
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .map(|d| now - d);
    let kinds: &[Recent] = if options.failed_only {
        &[Recent::Finished { failed_only: true }]
    } else {
        &[
            Recent::Finished { failed_only: false },
            Recent::Started,
            Recent::Scheduled,
            Recent::Stamped,
        ]
    };
    let reads = collections.iter().flat_map(|collection| {
        kinds.iter().map(move |kind| async move {
            let docs = store
                .recent(collection, *kind, since, now, options.limit)
                .await?;
            Ok::<_, store::Error>((collection.to_string(), docs))
        })
    });
    let mut unique = BTreeMap::new();
    for (collection, docs) in futures::future::try_join_all(reads).await? {
        for doc in docs {
            unique
                .entry(doc.name.clone())
                .or_insert_with(|| Entry::of(store, &collection, &doc, now));
        }
    }
    let mut entries: Vec<Entry> = unique
        .into_values()
        .filter(|e| since.is_none_or(|t| e.activity >= t))
        .filter(|e| !options.failed_only || Status::parse(&e.status) == Status::Failed)
        .collect();
    entries.sort_by(|a, b| b.activity.cmp(&a.activity).then(a.id.cmp(&b.id)));
    entries.truncate(options.limit);
    Ok(entries)
}

impl Entry {
    fn of(store: &Store, collection: &str, doc: &pb::Document, now: DateTime<Utc>) -> Entry {
        let text = |name: &str| {
            doc.fields
                .get(name)
                .and_then(string_value)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let time = |name: &str| store::timestamp_field(doc, name);
        let created = doc.create_time.as_ref().and_then(store::from_timestamp);
        let scheduled_time = time("scheduled_time");
        let started_at = time(fields::STARTED_AT);
        let completed_at = time(fields::COMPLETED_AT);
        let status = match text(fields::STATUS) {
            Some(status) => status,
            None if scheduled_time.is_some_and(|t| t > now) => "scheduled".to_string(),
            None => "new".to_string(),
        };
        let progress = progress(doc);
        let number = |name: &str, in_progress: &str| {
            store::integer_field(doc, name).or_else(|| {
                progress
                    .as_ref()
                    .and_then(|p| store::integer_field(p, in_progress))
            })
        };
        let took_seconds = match (started_at, completed_at) {
            (Some(start), Some(end)) if end >= start => {
                Some((end - start).num_milliseconds() as f64 / 1000.0)
            }
            _ => None,
        };
        let activity = [created, started_at, completed_at]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(DateTime::UNIX_EPOCH);
        Entry {
            id: store
                .relative(&doc.name)
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            collection: collection.to_string(),
            created,
            sent: number(fields::NUM_SENT, "sent"),
            tokens: number(fields::NUM_TOKENS, "tokens"),
            removed: number(fields::NUM_TOKENS_REMOVED, "removed"),
            failed: store::integer_field(doc, fields::NUM_FAILED),
            worker: (Status::parse(&status) == Status::Started)
                .then(|| text(fields::WORKER))
                .flatten(),
            status,
            scheduled_time,
            started_at,
            completed_at,
            took_seconds,
            error: text(fields::ERROR),
            warning: text(fields::WARNING),
            errors: doc
                .fields
                .get(fields::ERROR_COUNTS)
                .or_else(|| {
                    progress
                        .as_ref()
                        .and_then(|p| p.fields.get(fields::ERROR_COUNTS))
                })
                .map(crate::claim::read_error_counts)
                .unwrap_or_default()
                .iter()
                .map(|(code, n)| (code.as_str().to_string(), n))
                .collect(),
            activity,
        }
    }

    /// The table row: id, collection, created, status, sent/tokens, removed, took, note.
    fn cells(&self, now: DateTime<Utc>) -> [String; 8] {
        let dash = || "-".to_string();
        let sent = match (self.sent, self.tokens) {
            (None, None) => dash(),
            (sent, tokens) => format!(
                "{}/{}",
                sent.map_or_else(dash, |n| n.to_string()),
                tokens.map_or_else(dash, |n| n.to_string())
            ),
        };
        let note = self.note(now);
        let note = if self.errors.is_empty() {
            note
        } else {
            let codes: Vec<String> = self
                .errors
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            format!("[{}] {note}", codes.join(", "))
                .trim_end()
                .to_string()
        };
        [
            self.id.clone(),
            self.collection.clone(),
            self.created
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(dash),
            self.status.clone(),
            sent,
            self.removed.map_or_else(dash, |n| n.to_string()),
            self.took_seconds
                .map(|s| span(chrono::Duration::milliseconds((s * 1000.0) as i64)))
                .unwrap_or_else(dash),
            note,
        ]
    }

    /// The last column without the error counts: the error, the warning, or what is going on.
    fn note(&self, now: DateTime<Utc>) -> String {
        if let Some(error) = &self.error {
            first_words(error)
        } else if let Some(warning) = &self.warning {
            format!("warning: {}", first_words(warning))
        } else {
            match self.status.as_str() {
                "scheduled" => self
                    .scheduled_time
                    .map(|t| format!("due {}", t.format("%Y-%m-%d %H:%M:%S")))
                    .unwrap_or_default(),
                status if Status::parse(status) == Status::Started => {
                    let running = self
                        .started_at
                        .map(|t| format!("sending for {}", span(now - t)))
                        .unwrap_or_else(|| "sending".to_string());
                    match &self.worker {
                        Some(w) => format!("{running} on {w}"),
                        None => running,
                    }
                }
                "new" => self
                    .created
                    .map(|t| format!("not picked up yet ({} old)", span(now - t)))
                    .unwrap_or_default(),
                _ => String::new(),
            }
        }
    }
}

/// The `ffpush_progress` map of a started document, as a document to read numbers from.
fn progress(doc: &pb::Document) -> Option<pb::Document> {
    match doc.fields.get(fields::PROGRESS)?.value_type.as_ref()? {
        pb::value::ValueType::MapValue(map) => Some(pb::Document {
            fields: map.fields.clone(),
            ..Default::default()
        }),
        _ => None,
    }
}

/// The table `ffpush status` prints: a header and one line per entry, columns aligned.
pub fn table(entries: &[Entry], now: DateTime<Utc>) -> String {
    const HEADER: [&str; 8] = [
        "ID",
        "COLLECTION",
        "CREATED (UTC)",
        "STATUS",
        "SENT/TOKENS",
        "REMOVED",
        "TOOK",
        "ERROR / NOTE",
    ];
    let rows: Vec<[String; 8]> = std::iter::once(HEADER.map(str::to_string))
        .chain(entries.iter().map(|e| e.cells(now)))
        .collect();
    let mut widths = [0; 8];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if entries.is_empty() {
        out.push_str("(no notifications)\n");
    }
    out
}

/// At most about 60 characters of `text`, cut at a word boundary.
fn first_words(text: &str) -> String {
    const MAX: usize = 60;
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() <= MAX {
        return text;
    }
    let mut cut = String::new();
    for word in text.split(' ') {
        if cut.chars().count() + word.chars().count() + 1 > MAX {
            break;
        }
        if !cut.is_empty() {
            cut.push(' ');
        }
        cut.push_str(word);
    }
    if cut.is_empty() {
        cut = text.chars().take(MAX).collect();
    }
    cut.push('…');
    cut
}

/// A short human duration: `420ms`, `4.2s`, `3m12s`, `2h05m`, `3d04h`.
fn span(d: chrono::Duration) -> String {
    let ms = d.num_milliseconds().max(0);
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_like_a_person_would_say_them() {
        let ms = chrono::Duration::milliseconds;
        assert_eq!(span(ms(420)), "420ms");
        assert_eq!(span(ms(4_250)), "4.2s");
        assert_eq!(span(ms(192_000)), "3m12s");
        assert_eq!(span(ms(7_500_000)), "2h05m");
        assert_eq!(span(ms(100 * 3_600_000)), "4d04h");
        assert_eq!(span(ms(-5)), "0ms");
    }

    #[test]
    fn long_texts_are_cut_at_a_word() {
        assert_eq!(first_words("short  one\nline"), "short one line");
        let long =
            "no device tokens: none of the 2 user(s) has an fcm_tokens document (users/a, users/b)";
        let cut = first_words(long);
        assert!(cut.ends_with('…') && cut.chars().count() <= 61, "{cut}");
        assert!(long.starts_with(cut.trim_end_matches('…')), "{cut}");
        assert_eq!(first_words(&"x".repeat(80)).chars().count(), 61);
    }
}
