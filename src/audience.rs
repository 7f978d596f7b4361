//! Resolves an [`Audience`] to a stream of token pages in document-path order, read ahead of
//! the sends but bounded (a channel of a few pages), so memory does not grow with the audience.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backoff::backoff::Backoff as _;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::language::{Language, LanguageReader};
use crate::model::Audience;
use crate::store::{self, DeviceToken, Store, TokenQuery};

/// Token documents read per query page.
pub const PAGE_SIZE: usize = 500;
/// Users whose `fcm_tokens` are read at once: a query each, so reading goes this many round
/// trips at a time (where the round trip, not the server, is the limit, 1 000 users took
/// 0.47 s at 16, 0.34 s at 64 and at 256; BENCHMARKS.md). Each holds at most its first page of
/// [`USER_FIRST_PAGE`] tokens until its turn: at most 6 400 tokens (≈ 2 MB) read ahead.
const USER_READ_AHEAD: usize = 64;
/// A user's first page; a user with more tokens has the rest read in pages of [`PAGE_SIZE`].
const USER_FIRST_PAGE: usize = 100;
/// Users without tokens listed on the document (all are counted).
pub const MAX_LISTED_USERS_WITHOUT_TOKENS: usize = 20;

/// The progress cursor's name for the one request of a topic or condition notification.
pub const TARGET_REQUEST: &str = "target";

/// Users of a `user_refs` notification who have no token at all.
#[derive(Clone, Debug, Default)]
pub struct UsersWithoutTokens {
    pub count: u64,
    pub listed: Vec<String>,
}

pub struct TokenPages {
    pub pages: mpsc::Receiver<Result<Page, store::Error>>,
    pub without_tokens: Arc<Mutex<UsersWithoutTokens>>,
}

/// Token documents in path order, with their users' languages when the notification has
/// translations.
#[derive(Debug, Default)]
pub struct Page {
    pub tokens: Vec<DeviceToken>,
    /// One per token, or empty: no language needed.
    pub languages: Vec<Language>,
}

impl From<Vec<DeviceToken>> for Page {
    fn from(tokens: Vec<DeviceToken>) -> Page {
        Page {
            tokens,
            languages: Vec::new(),
        }
    }
}

impl Page {
    /// Each token with its user's language (`None` when none was read).
    pub fn into_entries(self) -> impl Iterator<Item = (DeviceToken, Language)> {
        let languages = self.languages.into_iter().chain(std::iter::repeat(None));
        self.tokens.into_iter().zip(languages)
    }
}

/// Starts reading `audience`; the reader stops when the receiver is dropped.
pub fn read(store: Store, audience: Audience) -> TokenPages {
    read_with_languages(store, audience, None)
}

/// [`read`], and with `languages` each token's user's language, each user read once.
pub fn read_with_languages(
    store: Store,
    audience: Audience,
    languages: Option<LanguageReader>,
) -> TokenPages {
    let (pages_tx, pages) = mpsc::channel(4);
    let without_tokens = Arc::new(Mutex::new(UsersWithoutTokens::default()));
    let missing = without_tokens.clone();
    let reader = async move {
        let tx = &Out {
            tx: pages_tx,
            languages,
        };
        let result = match audience {
            Audience::Users(ids) => read_users(&store, ids, tx, &missing).await,
            Audience::Broadcast { device_type, slice } => {
                let (start, end) = slice.map(|s| s.user_id_range()).unwrap_or_default();
                let query = TokenQuery {
                    user: None,
                    device_type,
                    user_id_start: start,
                    user_id_end: end,
                    page_size: PAGE_SIZE,
                    ..Default::default()
                };
                // A batch covers the users collection only, as FlutterFlow's bounds do; its
                // first and last slices are open-ended, so tokens elsewhere are skipped.
                let users = slice.map(|_| format!("{}/", store.users_collection()));
                read_query(&store, &query, users.as_deref(), tx).await
            }
            // One request to FCM's own fan-out: a single entry whose "token" is the topic or
            // condition (the template puts it under `message.topic` / `message.condition`).
            // Its name stands for the request in the progress cursor.
            Audience::Topic(target) | Audience::Condition(target) => {
                let request = DeviceToken {
                    doc_name: TARGET_REQUEST.to_string(),
                    token: target,
                };
                let _ = tx.tx.send(Ok(vec![request].into())).await;
                Ok(())
            }
        };
        if let Err(e) = result {
            let _ = tx.tx.send(Err(e)).await;
        }
    };
    // In the notification's span: its page reads and retries are logged as its own.
    tokio::spawn(reader.in_current_span());
    TokenPages {
        pages,
        without_tokens,
    }
}

/// Where pages go: the fan-out's channel, through the language reads when there are any.
struct Out {
    tx: mpsc::Sender<Result<Page, store::Error>>,
    languages: Option<LanguageReader>,
}

impl Out {
    /// Hands a page on, with its users' languages (`user`: every token is that user's, its
    /// language already read). `Ok(false)`: the fan-out is gone.
    async fn send(
        &self,
        tokens: Vec<DeviceToken>,
        user: Option<Language>,
    ) -> Result<bool, store::Error> {
        let languages = match (&self.languages, user) {
            (None, _) => Vec::new(),
            (Some(_), Some(language)) => vec![language; tokens.len()],
            (Some(reader), None) => reader.languages(&tokens).await?,
        };
        Ok(self.tx.send(Ok(Page { tokens, languages })).await.is_ok())
    }
}

async fn read_users(
    store: &Store,
    paths: Vec<String>,
    tx: &Out,
    missing: &Mutex<UsersWithoutTokens>,
) -> Result<(), store::Error> {
    let mut users = futures::stream::iter(paths)
        .map(|user| async move {
            let query = TokenQuery {
                user: Some(user.clone()),
                page_size: USER_FIRST_PAGE,
                ..Default::default()
            };
            let first = page_with_retry(store, &query, None).await;
            // Read beside the tokens, as many users at a time; not for a user without any.
            let language = match (&tx.languages, &first) {
                (Some(reader), Ok(tokens)) if !tokens.is_empty() => {
                    reader.language_of(&user).await.map(Some)
                }
                _ => Ok(None),
            };
            (user, query, first, language)
        })
        .buffered(USER_READ_AHEAD);
    while let Some((user, query, first, language)) = users.next().await {
        let first = first?;
        let language = language?;
        if first.is_empty()
            && let Ok(mut m) = missing.lock()
        {
            m.count += 1;
            if m.listed.len() < MAX_LISTED_USERS_WITHOUT_TOKENS {
                m.listed.push(user);
            }
        }
        let mut last = first.last().map(|t| t.doc_name.clone());
        let full = first.len() == USER_FIRST_PAGE;
        if !tx.send(first, language.clone()).await? {
            return Ok(());
        }
        if full {
            // A user with more than a first page of tokens: read the rest in order.
            let query = TokenQuery {
                page_size: PAGE_SIZE,
                ..query
            };
            while let Some(after) = last {
                let page = page_with_retry(store, &query, Some(&after)).await?;
                last = (page.len() == PAGE_SIZE)
                    .then(|| page.last().map(|t| t.doc_name.clone()))
                    .flatten();
                if !tx.send(page, language.clone()).await? {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Reads a broadcast as one streamed query cut into pages of [`PAGE_SIZE`]; the bounded
/// channel paces the stream. A transient error resumes the query after the last token read,
/// so nothing is read twice or skipped. With `under`, only the tokens whose path starts with
/// it are handed on.
async fn read_query(
    store: &Store,
    query: &TokenQuery,
    under: Option<&str>,
    tx: &Out,
) -> Result<(), store::Error> {
    let mut after: Option<String> = None;
    // The same budget as a page read; it starts anew whenever the stream made progress.
    let mut policy = store::backoff(
        Duration::from_millis(200),
        Duration::from_secs(10),
        Some(Duration::from_secs(30)),
    );
    loop {
        let resumed_from = after.clone();
        let failure = match stream_pages(store, query, under, &mut after, tx).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        if after != resumed_from {
            policy.reset();
        }
        let Some(wait) = policy.next_backoff() else {
            return Err(failure);
        };
        tracing::warn!(error = %crate::errors::Chain(&failure), retry_in_ms = wait.as_millis() as u64,
            resume_after = ?after, "reading tokens failed; resuming the query");
        tokio::time::sleep(wait).await;
    }
}

/// One streamed query from `after` to the end, sent on in pages; `after` follows the last
/// token handed on.
async fn stream_pages(
    store: &Store,
    query: &TokenQuery,
    under: Option<&str>,
    after: &mut Option<String>,
    tx: &Out,
) -> Result<(), store::Error> {
    let tokens = store.token_stream(query, after.as_deref()).await?;
    futures::pin_mut!(tokens);
    let mut page = Vec::with_capacity(PAGE_SIZE);
    loop {
        let (token, end) = match tokens.next().await {
            Some(Ok(token)) => (Some(token), None),
            Some(Err(e)) => (None, Some(Err(e))),
            None => (None, Some(Ok(()))),
        };
        page.extend(token.filter(|t| {
            under.is_none_or(|prefix| store.relative(&t.doc_name).starts_with(prefix))
        }));
        if page.len() == PAGE_SIZE || (end.is_some() && !page.is_empty()) {
            let last = page.last().map(|t| t.doc_name.clone());
            let full = std::mem::replace(&mut page, Vec::with_capacity(PAGE_SIZE));
            // Moved on only once the page is handed on: a failed language read resumes the
            // query before it.
            let open = tx.send(full, None).await?;
            *after = last;
            if !open {
                return Ok(());
            }
        }
        if let Some(result) = end {
            return result;
        }
    }
}

/// Reads one page, riding out short Firestore outages (about half a minute in all).
async fn page_with_retry(
    store: &Store,
    query: &TokenQuery,
    after: Option<&str>,
) -> Result<Vec<DeviceToken>, store::Error> {
    let policy = store::backoff(
        Duration::from_millis(200),
        Duration::from_secs(10),
        Some(Duration::from_secs(30)),
    );
    store::retry("reading tokens failed", policy, None, || {
        store.token_page(query, after)
    })
    .await
}
