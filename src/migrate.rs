//! Versioned data migrations (`ffpush migrate`): one-off rewrites of existing Firestore data
//! into the shape ffpush expects.
//!
//! Each migration runs at most once per database: when it has been applied, a document
//! `ffpush_migrations/{id}` records when and what it did, and later runs report it as
//! [`MigrationStatus::AlreadyApplied`] without reading anything else. The migrations themselves
//! are also safe to repeat or to run twice at once (deterministic document ids, deterministic
//! winners), so a run that died half-way is simply run again.
//!
//! A dry run reads everything a real run would and reports the plan (counts and the first few
//! paths) without writing. Destructive migrations are refused unless the caller passes
//! `allow_destructive`. See `migrations/README.md` for the operator's view.

use std::collections::{HashMap, HashSet};
use std::fmt;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};

use crate::model::pb::{self, Document, StructuredQuery, Value, structured_query as sq, value};
use crate::model::string_value;
use crate::store::{self, Store, TokenQuery};

/// Where applied migrations are recorded, one document per migration id.
pub const MIGRATIONS_COLLECTION: &str = "ffpush_migrations";

/// Documents read per query page.
const PAGE_SIZE: usize = 500;
/// Concurrent reads (one user's tokens each) and writes.
const READ_CONCURRENCY: usize = 16;
const WRITE_CONCURRENCY: usize = 32;
/// Paths shown in a report.
const SAMPLE_SIZE: usize = 10;

const TOKENS_ARRAY: &str = "001_tokens_array_to_fcm_tokens";
const DUPLICATE_TOKENS: &str = "002_remove_duplicate_tokens";

struct Migration {
    id: &'static str,
    description: &'static str,
    destructive: bool,
    /// What the migration deliberately leaves alone; part of every report.
    note: Option<&'static str>,
}

/// In the order they run.
const MIGRATIONS: [Migration; 2] = [
    Migration {
        id: TOKENS_ARRAY,
        description: "copy the tokens in users' `tokens` array fields into fcm_tokens documents under each user (in the users collection, FFPUSH_USERS_COLLECTION)",
        destructive: false,
        note: Some("the users' `tokens` array fields are left in place"),
    },
    Migration {
        id: DUPLICATE_TOKENS,
        description: "delete duplicate token documents (the same fcm_token under one user or several), keeping the newest",
        destructive: true,
        note: None,
    },
];

/// What to run and how.
#[derive(Clone, Debug, Default)]
pub struct MigrateOptions {
    /// Read and report what would change; write nothing, record nothing.
    pub dry_run: bool,
    /// Without it, migrations that delete data are refused (and planned, to show what they
    /// would do).
    pub allow_destructive: bool,
    /// Run only this migration: its full id or its number (`"002"`).
    pub only: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStatus {
    /// Applied by this run and recorded.
    Applied,
    /// Recorded by an earlier run; nothing was read or written.
    AlreadyApplied,
    /// Dry run: the counts and sample are what applying would do.
    Planned,
    /// Destructive and `allow_destructive` was not given: the counts and sample are what
    /// applying would do; nothing was written.
    RefusedDestructive,
    /// Not run because an earlier migration was refused: it may rely on that one's result.
    Blocked,
}

/// The outcome of one migration in one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    pub id: &'static str,
    pub description: &'static str,
    pub destructive: bool,
    pub status: MigrationStatus,
    /// Documents created (or, for `Planned`/`RefusedDestructive`, that would be).
    pub created: u64,
    /// Documents deleted (or that would be).
    pub deleted: u64,
    /// The first few paths created or deleted, relative to the database (`users/u1/…`).
    pub sample: Vec<String>,
    /// What the migration deliberately leaves alone.
    pub note: Option<&'static str>,
    /// When it was applied (this run, or the earlier run that recorded it).
    pub applied_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("there is no migration {0:?}; known migrations: {1}")]
    UnknownMigration(String, String),
    #[error("migration {0} needs a Firestore index; create it, then run the migration again")]
    IndexMissing(&'static str, #[source] store::Error),
    #[error("migration {id}")]
    Store {
        id: &'static str,
        #[source]
        source: store::Error,
    },
}

/// Every migration in the order they run: id, description, whether it deletes data.
pub fn list() -> Vec<(&'static str, &'static str, bool)> {
    MIGRATIONS
        .iter()
        .map(|m| (m.id, m.description, m.destructive))
        .collect()
}

/// Runs the migrations `opts` selects, in order, and reports on each.
pub async fn run(store: &Store, opts: &MigrateOptions) -> Result<Vec<MigrationReport>, Error> {
    let selected: Vec<&Migration> = match &opts.only {
        None => MIGRATIONS.iter().collect(),
        Some(wanted) => {
            let found = MIGRATIONS
                .iter()
                .find(|m| m.id == wanted || m.id.split('_').next() == Some(wanted.as_str()));
            match found {
                Some(m) => vec![m],
                None => {
                    let known: Vec<&str> = MIGRATIONS.iter().map(|m| m.id).collect();
                    return Err(Error::UnknownMigration(wanted.clone(), known.join(", ")));
                }
            }
        }
    };
    let mut reports = Vec::new();
    let mut refused = false;
    for migration in selected {
        let report = if refused {
            report(migration, MigrationStatus::Blocked, Tally::default(), None)
        } else {
            run_one(store, migration, opts)
                .await
                .map_err(|source| match source {
                    e @ store::Error::MissingIndex { .. } => Error::IndexMissing(migration.id, e),
                    source => Error::Store {
                        id: migration.id,
                        source,
                    },
                })?
        };
        refused |= report.status == MigrationStatus::RefusedDestructive;
        tracing::info!(migration = report.id, status = ?report.status, created = report.created,
            deleted = report.deleted, "migration");
        reports.push(report);
    }
    Ok(reports)
}

async fn run_one(
    store: &Store,
    migration: &Migration,
    opts: &MigrateOptions,
) -> Result<MigrationReport, store::Error> {
    let record = format!("{MIGRATIONS_COLLECTION}/{}", migration.id);
    if let Some(doc) = store.get(&record).await? {
        let at = store::timestamp_field(&doc, "applied_at");
        return Ok(report(
            migration,
            MigrationStatus::AlreadyApplied,
            Tally::default(),
            at,
        ));
    }
    let refuse = migration.destructive && !opts.allow_destructive;
    let apply = !opts.dry_run && !refuse;
    let tally = match migration.id {
        TOKENS_ARRAY => tokens_array_to_fcm_tokens(store, apply).await?,
        DUPLICATE_TOKENS => remove_duplicate_tokens(store, apply).await?,
        id => unreachable!("migration {id} has no implementation"),
    };
    if !apply {
        let status = if opts.dry_run {
            MigrationStatus::Planned
        } else {
            MigrationStatus::RefusedDestructive
        };
        return Ok(report(migration, status, tally, None));
    }
    let now = Utc::now();
    let mut fields = HashMap::new();
    fields.insert("applied_at".to_string(), store::timestamp(now));
    fields.insert(
        "description".to_string(),
        store::string(migration.description),
    );
    fields.insert("destructive".to_string(), boolean(migration.destructive));
    fields.insert("created".to_string(), store::integer(tally.created as i64));
    fields.insert("deleted".to_string(), store::integer(tally.deleted as i64));
    fields.insert(
        "sample".to_string(),
        store::array(tally.sample.iter().map(|p| store::string(p)).collect()),
    );
    fields.insert(
        "ffpush_version".to_string(),
        store::string(env!("CARGO_PKG_VERSION")),
    );
    store.set(&record, fields).await?;
    Ok(report(
        migration,
        MigrationStatus::Applied,
        tally,
        Some(now),
    ))
}

fn report(
    migration: &Migration,
    status: MigrationStatus,
    tally: Tally,
    applied_at: Option<DateTime<Utc>>,
) -> MigrationReport {
    MigrationReport {
        id: migration.id,
        description: migration.description,
        destructive: migration.destructive,
        status,
        created: tally.created,
        deleted: tally.deleted,
        sample: tally.sample,
        note: migration.note,
        applied_at,
    }
}

#[derive(Default)]
struct Tally {
    created: u64,
    deleted: u64,
    sample: Vec<String>,
}

impl Tally {
    fn sample(&mut self, path: &str) {
        if self.sample.len() < SAMPLE_SIZE {
            self.sample.push(path.to_string());
        }
    }
}

/// 001: `<users>/{uid}.tokens: [string]` → `<users>/{uid}/fcm_tokens/ffpush-{hash}` for every
/// token that user has no token document for yet, `<users>` being the project's users
/// collection.
///
/// The new documents get `fcm_token`, `created_at` and `ffpush_migration` (this id, so they
/// can be found and undone); no `device_type`, since the array never said. `created_at` is the
/// user document's last update time, the latest moment the token is known to have been
/// registered: "now" would make a stale array token look newer than every token an app has
/// registered since, and 002 would keep the wrong copy. The id is derived from the token, so a
/// repeated or concurrent run writes the same documents.
async fn tokens_array_to_fcm_tokens(store: &Store, apply: bool) -> Result<Tally, store::Error> {
    let mut tally = Tally::default();
    let mut after: Option<String> = None;
    let collection = store.users_collection();
    loop {
        let users = store
            .run_query(
                store.documents_path().to_string(),
                page_query(
                    collection,
                    false,
                    vec!["tokens"],
                    "__name__",
                    after.as_deref(),
                ),
            )
            .await?;
        let Some(last) = users.last() else { break };
        after = Some(last.name.clone());
        let full_page = users.len() == PAGE_SIZE;

        let with_tokens: Vec<(String, Vec<String>, DateTime<Utc>)> = users
            .into_iter()
            .filter_map(|user| {
                let tokens = array_tokens(&user);
                let path = store.relative(&user.name).to_string();
                let at = user
                    .update_time
                    .as_ref()
                    .and_then(store::from_timestamp)
                    .unwrap_or_else(Utc::now);
                (!tokens.is_empty()).then_some((path, tokens, at))
            })
            .collect();
        let planned: Vec<Vec<(String, HashMap<String, Value>)>> =
            futures::stream::iter(with_tokens)
                .map(|(user, tokens, at)| async move {
                    let existing = user_tokens(store, &user).await?;
                    Ok::<_, store::Error>(
                        tokens
                            .into_iter()
                            .filter(|t| !existing.contains(t))
                            .map(|t| {
                                (format!("{user}/fcm_tokens/{}", token_doc_id(&t)), {
                                    let mut f = HashMap::new();
                                    f.insert("fcm_token".to_string(), store::string(&t));
                                    f.insert("created_at".to_string(), store::timestamp(at));
                                    f.insert(
                                        "ffpush_migration".to_string(),
                                        store::string(TOKENS_ARRAY),
                                    );
                                    f
                                })
                            })
                            .collect(),
                    )
                })
                .buffered(READ_CONCURRENCY)
                .try_collect()
                .await?;
        let creates: Vec<_> = planned.into_iter().flatten().collect();
        for (path, _) in &creates {
            tally.created += 1;
            tally.sample(path);
        }
        if apply {
            futures::stream::iter(creates.into_iter().map(Ok))
                .try_for_each_concurrent(WRITE_CONCURRENCY, |(path, fields)| async move {
                    store.set(&path, fields).await
                })
                .await?;
        }
        if !full_page {
            break;
        }
    }
    Ok(tally)
}

/// The non-empty strings of a user's `tokens` array, first occurrence of each.
fn array_tokens(user: &Document) -> Vec<String> {
    let Some(value::ValueType::ArrayValue(array)) = user
        .fields
        .get("tokens")
        .and_then(|v| v.value_type.as_ref())
    else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    array
        .values
        .iter()
        .filter_map(string_value)
        .filter(|t| !t.is_empty() && seen.insert(*t))
        .map(str::to_string)
        .collect()
}

/// Every token string under `<user>/fcm_tokens`.
async fn user_tokens(store: &Store, user: &str) -> Result<HashSet<String>, store::Error> {
    let query = TokenQuery {
        user: Some(user.to_string()),
        page_size: PAGE_SIZE,
        ..Default::default()
    };
    let mut tokens = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.token_page(&query, after.as_deref()).await?;
        let full_page = page.len() == PAGE_SIZE;
        after = page.last().map(|t| t.doc_name.clone());
        tokens.extend(page.into_iter().map(|t| t.token));
        if !full_page {
            return Ok(tokens);
        }
    }
}

/// `ffpush-` and 20 hex digits of the token's SHA-256: stable across runs, never a secret.
fn token_doc_id(token: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ffpush-{hex}")
}

/// 002: of all token documents holding the same `fcm_token` (under one user or several), keep
/// the one with the newest `created_at` (missing counts as oldest; ties: the lexicographically
/// last document name) and delete the others.
///
/// The collection group is read ordered by `fcm_token`, then name, so the copies of a token
/// arrive next to each other: memory holds one page and the current token's winner, however
/// many tokens there are (a token → newest-document map would need ~300 bytes per distinct
/// token). That order is served by the `fcm_tokens.fcm_token` collection-group index the
/// dead-token lookup needs anyway. Deleting behind the cursor does not disturb the pages ahead.
async fn remove_duplicate_tokens(store: &Store, apply: bool) -> Result<Tally, store::Error> {
    struct Newest {
        token: String,
        created_at: Option<DateTime<Utc>>,
        name: String,
    }
    let mut tally = Tally::default();
    let mut newest: Option<Newest> = None;
    let mut cursor: Option<(Value, String)> = None;
    loop {
        let mut query = page_query(
            "fcm_tokens",
            true,
            vec!["fcm_token", "created_at"],
            "fcm_token",
            None,
        );
        query.start_at = cursor.take().map(|(token, name)| pb::Cursor {
            values: vec![token, store::reference(name)],
            before: false,
        });
        let docs = store
            .run_query(store.documents_path().to_string(), query)
            .await?;
        let Some(last) = docs.last() else { break };
        cursor = Some((
            last.fields.get("fcm_token").cloned().unwrap_or_default(),
            last.name.clone(),
        ));
        let full_page = docs.len() == PAGE_SIZE;

        let mut losers = Vec::new();
        for doc in docs {
            let Some(token) = doc.fields.get("fcm_token").and_then(string_value) else {
                continue;
            };
            if token.is_empty() {
                continue;
            }
            let created_at = store::timestamp_field(&doc, "created_at");
            match &mut newest {
                Some(best) if best.token == token => {
                    if (created_at, doc.name.as_str()) > (best.created_at, best.name.as_str()) {
                        best.created_at = created_at;
                        losers.push(std::mem::replace(&mut best.name, doc.name));
                    } else {
                        losers.push(doc.name);
                    }
                }
                _ => {
                    newest = Some(Newest {
                        token: token.to_string(),
                        created_at,
                        name: doc.name,
                    })
                }
            }
        }
        for name in &losers {
            tally.deleted += 1;
            tally.sample(store.relative(name));
        }
        if apply {
            futures::stream::iter(losers.into_iter().map(Ok))
                .try_for_each_concurrent(WRITE_CONCURRENCY, |name| async move {
                    store.delete(&name).await
                })
                .await?;
        }
        if !full_page {
            break;
        }
    }
    Ok(tally)
}

/// One page of `collection` (a collection group when `all`), ordered by `order` then name.
fn page_query(
    collection: &str,
    all: bool,
    select: Vec<&str>,
    order: &str,
    after: Option<&str>,
) -> StructuredQuery {
    let field = |path: &str| sq::FieldReference {
        field_path: path.to_string(),
    };
    let ascending = |path: &str| sq::Order {
        field: Some(field(path)),
        direction: sq::Direction::Ascending as i32,
    };
    let mut order_by = vec![ascending(order)];
    if order != "__name__" {
        order_by.push(ascending("__name__"));
    }
    StructuredQuery {
        select: Some(sq::Projection {
            fields: select.into_iter().map(field).collect(),
        }),
        from: vec![sq::CollectionSelector {
            collection_id: collection.to_string(),
            all_descendants: all,
        }],
        order_by,
        start_at: after.map(|name| pb::Cursor {
            values: vec![store::reference(name.to_string())],
            before: false,
        }),
        limit: Some(PAGE_SIZE as i32),
        ..Default::default()
    }
}

fn boolean(b: bool) -> Value {
    Value {
        value_type: Some(value::ValueType::BooleanValue(b)),
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationStatus::Applied => "applied",
            MigrationStatus::AlreadyApplied => "already applied",
            MigrationStatus::Planned => "planned (dry run)",
            MigrationStatus::RefusedDestructive => "refused: destructive",
            MigrationStatus::Blocked => "not run",
        })
    }
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.id, self.status)?;
        let (created, deleted) = match self.status {
            MigrationStatus::Applied => ("created", "deleted"),
            MigrationStatus::Planned | MigrationStatus::RefusedDestructive => {
                ("would create", "delete")
            }
            MigrationStatus::AlreadyApplied => {
                if let Some(at) = self.applied_at {
                    write!(f, " at {}", at.to_rfc3339())?;
                }
                return Ok(());
            }
            MigrationStatus::Blocked => {
                return f.write_str(" (an earlier migration was refused)");
            }
        };
        write!(
            f,
            " ({created} {}, {deleted} {} documents)",
            self.created, self.deleted
        )?;
        if self.status == MigrationStatus::RefusedDestructive {
            f.write_str("; run with allow_destructive (--allow-destructive) to apply it")?;
        }
        if let Some(note) = self.note {
            write!(f, "\n  note: {note}")?;
        }
        let sign = if self.deleted > 0 { '-' } else { '+' };
        for path in &self.sample {
            write!(f, "\n  {sign} {path}")?;
        }
        let total = self.created + self.deleted;
        if total > self.sample.len() as u64 {
            write!(f, "\n  … and {} more", total - self.sample.len() as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_document_ids_are_stable_and_distinct() {
        assert_eq!(token_doc_id("abc"), token_doc_id("abc"));
        assert_ne!(token_doc_id("abc"), token_doc_id("abd"));
        assert_eq!(token_doc_id("abc"), "ffpush-ba7816bf8f01cfea4141");
    }

    #[test]
    fn array_tokens_skips_blanks_non_strings_and_repeats() {
        let mut user = Document::default();
        user.fields.insert(
            "tokens".into(),
            store::array(vec![
                store::string("a"),
                store::string(""),
                store::integer(3),
                store::string("b"),
                store::string("a"),
            ]),
        );
        assert_eq!(array_tokens(&user), vec!["a", "b"]);
        assert!(array_tokens(&Document::default()).is_empty());
    }

    #[test]
    fn migrations_have_unique_numbered_ids_in_order() {
        let ids: Vec<&str> = list().into_iter().map(|(id, _, _)| id).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(ids, sorted);
        assert!(
            ids.iter()
                .all(|id| id.len() > 4 && id[..3].parse::<u32>().is_ok())
        );
    }

    #[test]
    fn a_refused_report_says_how_to_apply_it() {
        let report = MigrationReport {
            id: DUPLICATE_TOKENS,
            description: "",
            destructive: true,
            status: MigrationStatus::RefusedDestructive,
            created: 0,
            deleted: 12,
            sample: vec!["users/a/fcm_tokens/x".into()],
            note: None,
            applied_at: None,
        };
        let text = report.to_string();
        assert!(
            text.contains("would create 0, delete 12 documents"),
            "{text}"
        );
        assert!(text.contains("--allow-destructive"), "{text}");
        assert!(text.contains("- users/a/fcm_tokens/x"), "{text}");
        assert!(text.contains("and 11 more"), "{text}");
    }
}
