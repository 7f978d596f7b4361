//! Every Firestore read and write ffpush makes, on the raw Firestore v1 gRPC API (through the
//! `firestore` crate's authenticated channel) so that preconditions, field masks, cursors and
//! the listen stream are exactly what we ask for.

use std::collections::HashMap;
use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;
use chrono::{DateTime, Utc};
use firestore::gcloud_sdk::google::firestore::v1::firestore_client::FirestoreClient;
use firestore::gcloud_sdk::google::firestore::v1::{
    self as pb, Document, DocumentMask, Precondition, RunQueryRequest, StructuredQuery, Value,
    precondition, run_query_request, structured_query as sq, value,
};
use firestore::gcloud_sdk::google_cloud_auth::credentials::{
    CacheableResource, Credentials, CredentialsProvider, EntityTag,
};
use firestore::gcloud_sdk::google_cloud_auth::errors::CredentialsError;
use firestore::gcloud_sdk::tonic::{self, Code};
use firestore::gcloud_sdk::{GoogleAuthHeaders, GoogleAuthMiddleware};
use firestore::{FirestoreDb, FirestoreDbOptions};
use futures::StreamExt;

use crate::config::Settings;
use crate::model::Status;

pub type Client = FirestoreClient<GoogleAuthMiddleware>;

/// What went wrong talking to Firestore, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Firestore is unreachable or overloaded: wait and try again.
    #[error("Firestore is unavailable")]
    Unavailable(#[source] Grpc),
    /// A precondition failed: someone else changed (or claimed) the document first.
    #[error("the document changed underneath us")]
    Conflict,
    /// A query needs an index the database does not have (real Firestore only: the emulator
    /// serves every query). `needed` is Firestore's own words for which index, `link` the
    /// console page that creates it.
    #[error("{}", missing_index_text(.needed, .link.as_deref()))]
    MissingIndex {
        needed: String,
        link: Option<String>,
    },
    #[error("document not found")]
    NotFound,
    /// Misconfiguration or a bug: retrying will not help.
    #[error("Firestore refused the request")]
    Rejected(#[source] Grpc),
    /// Firestore answered without a part it always sends.
    #[error("Firestore's answer has no {0}")]
    Incomplete(&'static str),
    #[error("cannot connect to Firestore")]
    Connect(#[source] firestore::errors::FirestoreError),
    /// Shutdown came while waiting for Firestore.
    #[error("cancelled while waiting for Firestore")]
    Cancelled,
}

impl Error {
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Connect(_))
    }
}

/// A gRPC status from Firestore: its code and message; its source is the transport error
/// behind it, if there was one.
#[derive(Clone, Debug)]
pub struct Grpc(pub tonic::Status);

impl Grpc {
    pub fn code(&self) -> Code {
        self.0.code()
    }
}

impl std::fmt::Display for Grpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.message() {
            "" => write!(f, "{:?}", self.0.code()),
            message => write!(f, "{:?}: {message}", self.0.code()),
        }
    }
}

impl std::error::Error for Grpc {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

impl Error {
    /// A query's error: FAILED_PRECONDITION there can only mean a missing index (queries make
    /// no conditional writes), whatever the message says; Firestore sometimes sends none.
    fn from_query(status: tonic::Status) -> Self {
        match status.code() {
            Code::FailedPrecondition => missing_index(status.message()),
            _ => Error::from(status),
        }
    }
}

/// `The query requires an index. You can create it here: https://…` (or `…requires a
/// COLLECTION_GROUP_ASC index for collection fcm_tokens and field device_type. You can…`).
fn missing_index(message: &str) -> Error {
    let link = message
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .map(|w| w.trim_end_matches(['.', ',', ')']).to_string());
    let needed = message
        .split("You can create it here")
        .next()
        .unwrap_or_default()
        .trim();
    let needed = if needed.is_empty() || needed.starts_with("https://") {
        "Firestore refused a query for lack of an index (FAILED_PRECONDITION).".to_string()
    } else {
        needed.to_string()
    };
    Error::MissingIndex { needed, link }
}

fn missing_index_text(needed: &str, link: Option<&str>) -> String {
    let deploy = "deploy migrations/firestore.indexes.json (`firebase deploy --only firestore:indexes` from the ffpush repository)";
    match link {
        Some(link) => format!("{needed} Create it at {link} or {deploy}"),
        None => format!("{needed} Run `ffpush doctor` to see which, and {deploy}"),
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            Code::FailedPrecondition if status.message().to_ascii_lowercase().contains("index") => {
                missing_index(status.message())
            }
            Code::FailedPrecondition | Code::AlreadyExists => Error::Conflict,
            Code::NotFound => Error::NotFound,
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Cancelled => Error::Unavailable(Grpc(status)),
            _ => Error::Rejected(Grpc(status)),
        }
    }
}

/// Exponential backoff with jitter for Firestore retries: from `initial`, doubling, each wait
/// drawn from ±50 % of the step (so many workers retrying at once spread out), steps capped at
/// `max`, giving up after `give_up` in all (`None`: never).
pub fn backoff(initial: Duration, max: Duration, give_up: Option<Duration>) -> ExponentialBackoff {
    backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(initial)
        .with_multiplier(2.0)
        .with_randomization_factor(0.5)
        .with_max_interval(max)
        .with_max_elapsed_time(give_up)
        .build()
}

/// Runs `op` until it succeeds or fails for good: transient errors ([`Error::is_transient`])
/// are retried on `policy` (logged with `what`), until it gives up or `cancel` fires.
pub async fn retry<T, F, Fut>(
    what: &str,
    mut policy: ExponentialBackoff,
    cancel: Option<&tokio_util::sync::CancellationToken>,
    mut op: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    loop {
        let e = match op().await {
            Err(e) if e.is_transient() => e,
            other => return other,
        };
        let Some(wait) = policy.next_backoff() else {
            return Err(e);
        };
        tracing::warn!(error = %crate::errors::Chain(&e), retry_in_ms = wait.as_millis() as u64, "{what}; retrying");
        match cancel {
            Some(cancel) => tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                _ = tokio::time::sleep(wait) => {}
            },
            None => tokio::time::sleep(wait).await,
        }
    }
}

/// One device token document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceToken {
    /// Full resource name of the token document; the stream is ordered by it.
    pub doc_name: String,
    pub token: String,
}

impl From<Document> for DeviceToken {
    fn from(doc: Document) -> Self {
        let token = doc
            .fields
            .get("fcm_token")
            .and_then(crate::model::string_value)
            .unwrap_or_default()
            .to_string();
        DeviceToken {
            doc_name: doc.name,
            token,
        }
    }
}

/// The Firestore side of ffpush for one project and database.
#[derive(Clone)]
pub struct Store {
    db: FirestoreDb,
    /// The project's users collection (`FFPUSH_USERS_COLLECTION`): batch bounds, and where
    /// a bare user id is looked for.
    users_collection: String,
    /// `FFPUSH_RETENTION`: finishing writes also set `ffpush_expires_at` (see
    /// [`Store::update_fields`]).
    retention: Option<Duration>,
}

/// The Firestore emulator accepts any bearer token; this is the one its docs use.
#[derive(Debug)]
struct EmulatorCredentials(EntityTag);

impl CredentialsProvider for EmulatorCredentials {
    async fn headers(
        &self,
        extensions: axum::http::Extensions,
    ) -> Result<CacheableResource<firestore::gcloud_sdk::HeaderMap>, CredentialsError> {
        if extensions.get::<EntityTag>() == Some(&self.0) {
            return Ok(CacheableResource::NotModified);
        }
        let mut headers = firestore::gcloud_sdk::HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderValue::from_static("Bearer owner"),
        );
        Ok(CacheableResource::New {
            entity_tag: self.0.clone(),
            data: headers,
        })
    }

    async fn universe_domain(&self) -> Option<String> {
        None
    }
}

impl Store {
    /// Connects once. See [`Store::connect_with_retry`] for start-up.
    pub async fn connect(settings: &Settings) -> Result<Store, Error> {
        let mut options = FirestoreDbOptions::new(settings.project.clone())
            .with_database_id(settings.database.clone())
            .with_request_timeout(Duration::from_secs(30));
        let db = if let Some(host) = &settings.firestore_emulator_host {
            options.firebase_api_url = Some(format!("http://{host}"));
            let auth: GoogleAuthHeaders =
                Credentials::from(EmulatorCredentials(EntityTag::new())).into();
            FirestoreDb::with_options_auth(options, auth).await
        } else if let Some(key) = &settings.credentials {
            FirestoreDb::with_options_service_account_key_file(options, key.clone()).await
        } else {
            FirestoreDb::with_options(options).await
        }
        .map_err(Error::Connect)?;
        let store = Store {
            db,
            users_collection: settings.users_collection.clone(),
            retention: settings.retention,
        };
        // Construction may succeed lazily; one cheap read proves the channel works.
        store
            .get("ffpush/connectivity-check")
            .await
            .or_else(|e| match e {
                Error::NotFound => Ok(None),
                e => Err(e),
            })?;
        Ok(store)
    }

    /// Connects, waiting with backoff (and saying what it waits for) while Firestore is down.
    /// Gives up only when the error is not transient or `cancel` fires.
    pub async fn connect_with_retry(
        settings: &Settings,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Store, Error> {
        let target = settings
            .firestore_emulator_host
            .clone()
            .unwrap_or_else(|| "firestore.googleapis.com".to_string());
        let policy = backoff(Duration::from_millis(200), Duration::from_secs(10), None);
        retry(
            &format!("waiting for Firestore at {target}"),
            policy,
            Some(cancel),
            || Store::connect(settings),
        )
        .await
    }

    pub fn client(&self) -> Client {
        self.db.client().get()
    }

    pub fn database_path(&self) -> &str {
        self.db.get_database_path()
    }

    /// `projects/{p}/databases/{d}/documents`
    pub fn documents_path(&self) -> &str {
        self.db.get_documents_path()
    }

    /// The project's users collection, e.g. `users`, `Users` or `user_data`.
    pub fn users_collection(&self) -> &str {
        &self.users_collection
    }

    pub fn doc_name(&self, relative: &str) -> String {
        format!("{}/{}", self.documents_path(), relative)
    }

    /// `users/u1/fcm_tokens/t1` from a full resource name.
    pub fn relative<'a>(&self, name: &'a str) -> &'a str {
        name.strip_prefix(self.documents_path())
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(name)
    }

    pub async fn get(&self, relative: &str) -> Result<Option<Document>, Error> {
        let request = pb::GetDocumentRequest {
            name: self.doc_name(relative),
            ..Default::default()
        };
        match self.client().get_document(request).await {
            Ok(doc) => Ok(Some(doc.into_inner())),
            Err(status) => match Error::from(status) {
                Error::NotFound => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Writes `fields` (only those: a field mask) onto the document as it was at
    /// `if_update_time`: if anybody wrote it since, nothing is written and the answer is
    /// [`Error::Conflict`]. Fields named in `remove` are deleted. Returns the new update time.
    /// Every write that claims, holds or finishes a notification goes through here: the
    /// precondition is what makes a claim exclusive, so there is no way to leave it out.
    /// With `FFPUSH_RETENTION`, a write that sets `completed_at` also sets
    /// `ffpush_expires_at` = `completed_at` + the retention.
    pub async fn update_fields(
        &self,
        name: &str,
        fields: HashMap<String, Value>,
        remove: &[&str],
        if_update_time: prost_types_timestamp::Timestamp,
    ) -> Result<prost_types_timestamp::Timestamp, Error> {
        self.write_fields(
            name,
            fields,
            remove,
            precondition::ConditionType::UpdateTime(if_update_time),
        )
        .await
    }

    /// Like [`Store::update_fields`], on whatever version the document is at (it must exist):
    /// for writes that claim nothing, as an app's or the console's edit.
    pub async fn update_existing(
        &self,
        name: &str,
        fields: HashMap<String, Value>,
        remove: &[&str],
    ) -> Result<prost_types_timestamp::Timestamp, Error> {
        self.write_fields(
            name,
            fields,
            remove,
            precondition::ConditionType::Exists(true),
        )
        .await
    }

    async fn write_fields(
        &self,
        name: &str,
        fields: HashMap<String, Value>,
        remove: &[&str],
        condition: precondition::ConditionType,
    ) -> Result<prost_types_timestamp::Timestamp, Error> {
        let mut fields = fields;
        if let Some(expires_at) = self.expiry(&fields) {
            fields.insert(crate::report::EXPIRES_AT.to_string(), expires_at);
        }
        let mut mask: Vec<String> = fields.keys().cloned().collect();
        mask.extend(remove.iter().map(|f| f.to_string()));
        let request = pb::UpdateDocumentRequest {
            document: Some(Document {
                name: name.to_string(),
                fields,
                ..Default::default()
            }),
            update_mask: Some(DocumentMask { field_paths: mask }),
            mask: Some(DocumentMask {
                field_paths: vec!["status".into()],
            }),
            current_document: Some(Precondition {
                condition_type: Some(condition),
            }),
            ..Default::default()
        };
        let doc = self.client().update_document(request).await?.into_inner();
        doc.update_time.ok_or(Error::Incomplete("update_time"))
    }

    /// For a write that finishes a document (it sets `completed_at`) with `FFPUSH_RETENTION`
    /// set: when the document expires, `completed_at` + the retention.
    fn expiry(&self, fields: &HashMap<String, Value>) -> Option<Value> {
        let retention = chrono::Duration::from_std(self.retention?).ok()?;
        let completed_at = fields
            .get("completed_at")
            .and_then(|v| match &v.value_type {
                Some(pb::value::ValueType::TimestampValue(t)) => {
                    DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32)
                }
                _ => None,
            })?;
        Some(timestamp(completed_at + retention))
    }

    /// Creates a document with an automatic id; returns its full name.
    pub async fn create(
        &self,
        collection: &str,
        fields: HashMap<String, Value>,
    ) -> Result<String, Error> {
        let request = pb::CreateDocumentRequest {
            parent: self.documents_path().to_string(),
            collection_id: collection.to_string(),
            document_id: String::new(),
            document: Some(Document {
                fields,
                ..Default::default()
            }),
            mask: Some(DocumentMask {
                field_paths: vec!["status".into()],
            }),
            ..Default::default()
        };
        Ok(self
            .client()
            .create_document(request)
            .await?
            .into_inner()
            .name)
    }

    /// Writes a whole document at `relative` (creating or replacing it).
    pub async fn set(&self, relative: &str, fields: HashMap<String, Value>) -> Result<(), Error> {
        let request = pb::UpdateDocumentRequest {
            document: Some(Document {
                name: self.doc_name(relative),
                fields,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.client().update_document(request).await?;
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        let request = pb::DeleteDocumentRequest {
            name: name.to_string(),
            ..Default::default()
        };
        self.client().delete_document(request).await?;
        Ok(())
    }

    /// Runs `query` under `parent` (a full name) and collects the documents.
    pub async fn run_query(
        &self,
        parent: String,
        query: StructuredQuery,
    ) -> Result<Vec<Document>, Error> {
        let request = RunQueryRequest {
            parent,
            query_type: Some(run_query_request::QueryType::StructuredQuery(query)),
            ..Default::default()
        };
        let mut stream = self
            .client()
            .run_query(request)
            .await
            .map_err(Error::from_query)?
            .into_inner();
        let mut docs = Vec::new();
        while let Some(item) = stream.next().await {
            if let Some(doc) = item.map_err(Error::from_query)?.document {
                docs.push(doc);
            }
        }
        Ok(docs)
    }

    /// One page of token documents under one user document, or of the whole `fcm_tokens`
    /// collection group, after `after` in document-name order.
    pub async fn token_page(
        &self,
        page: &TokenQuery,
        after: Option<&str>,
    ) -> Result<Vec<DeviceToken>, Error> {
        let (parent, query) = self.token_query(page, after, Some(page.page_size));
        let docs = self.run_query(parent, query).await?;
        Ok(docs.into_iter().map(DeviceToken::from).collect())
    }

    /// Every token document of `page` after `after`, in document-name order, as one streamed
    /// query. The stream is read as fast as the consumer polls it: gRPC flow control holds
    /// the server back meanwhile, so memory stays bounded however large the audience. One
    /// query costs the server far less than a cursor page per 500 documents.
    pub async fn token_stream(
        &self,
        page: &TokenQuery,
        after: Option<&str>,
    ) -> Result<impl futures::Stream<Item = Result<DeviceToken, Error>> + use<>, Error> {
        let (parent, query) = self.token_query(page, after, None);
        let request = RunQueryRequest {
            parent,
            query_type: Some(run_query_request::QueryType::StructuredQuery(query)),
            ..Default::default()
        };
        let stream = self
            .client()
            .run_query(request)
            .await
            .map_err(Error::from_query)?
            .into_inner();
        Ok(stream.filter_map(|item| async move {
            match item {
                Ok(response) => response.document.map(|doc| Ok(DeviceToken::from(doc))),
                Err(status) => Some(Err(Error::from_query(status))),
            }
        }))
    }

    fn token_query(
        &self,
        page: &TokenQuery,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> (String, StructuredQuery) {
        let mut filters = Vec::new();
        if let Some(device_type) = &page.device_type {
            filters.push(field_filter(
                "device_type",
                sq::field_filter::Operator::Equal,
                string(device_type),
            ));
        }
        if let Some(start) = &page.user_id_start {
            filters.push(field_filter(
                "__name__",
                sq::field_filter::Operator::GreaterThanOrEqual,
                reference(self.doc_name(&format!("{}/{start}", self.users_collection))),
            ));
        }
        if let Some(end) = &page.user_id_end {
            filters.push(field_filter(
                "__name__",
                sq::field_filter::Operator::LessThan,
                reference(self.doc_name(&format!("{}/{end}", self.users_collection))),
            ));
        }
        let query = StructuredQuery {
            select: Some(sq::Projection {
                fields: vec![field_ref("fcm_token")],
            }),
            from: vec![sq::CollectionSelector {
                collection_id: if page.collection.is_empty() {
                    "fcm_tokens".into()
                } else {
                    page.collection.clone()
                },
                all_descendants: page.user.is_none(),
            }],
            r#where: and(filters),
            order_by: vec![sq::Order {
                field: Some(field_ref("__name__")),
                direction: sq::Direction::Ascending as i32,
            }],
            start_at: after.map(|name| pb::Cursor {
                values: vec![reference(name.to_string())],
                before: false,
            }),
            limit: limit.map(|n| n as i32),
            ..Default::default()
        };
        let parent = match &page.user {
            Some(user) => self.doc_name(user),
            None => self.documents_path().to_string(),
        };
        (parent, query)
    }

    /// Every token document (under any user) holding `token`: a dead token is dead everywhere.
    pub async fn token_docs_with(&self, token: &str) -> Result<Vec<String>, Error> {
        let query = StructuredQuery {
            select: Some(sq::Projection { fields: vec![] }),
            from: vec![sq::CollectionSelector {
                collection_id: "fcm_tokens".into(),
                all_descendants: true,
            }],
            r#where: and(vec![field_filter(
                "fcm_token",
                sq::field_filter::Operator::Equal,
                string(token),
            )]),
            limit: Some(500),
            ..Default::default()
        };
        let docs = self
            .run_query(self.documents_path().to_string(), query)
            .await?;
        Ok(docs.into_iter().map(|d| d.name).collect())
    }

    /// Documents of `collection` whose `status` is one of `statuses` (for the sweep).
    pub async fn with_status(
        &self,
        collection: &str,
        statuses: &[Status],
    ) -> Result<Vec<Document>, Error> {
        let query = StructuredQuery {
            from: vec![sq::CollectionSelector {
                collection_id: collection.to_string(),
                all_descendants: false,
            }],
            r#where: and(vec![field_filter(
                "status",
                sq::field_filter::Operator::In,
                Value {
                    value_type: Some(value::ValueType::ArrayValue(pb::ArrayValue {
                        values: statuses.iter().map(|s| string(s.as_str())).collect(),
                    })),
                },
            )]),
            ..Default::default()
        };
        self.run_query(self.documents_path().to_string(), query)
            .await
    }
}

/// Documents read per page of [`Store::due_between`].
const DUE_PAGE: i32 = 300;

impl Store {
    /// Hands every document of `collection` whose `scheduled_time` is in `[since, at]` to
    /// `each`, in `scheduled_time` order, a page at a time: however many documents the window
    /// holds, none is cut off by a limit. Returns how many there were.
    pub async fn due_between(
        &self,
        collection: &str,
        since: DateTime<Utc>,
        at: DateTime<Utc>,
        mut each: impl FnMut(Document),
    ) -> Result<u64, Error> {
        let mut after: Option<pb::Cursor> = None;
        let mut seen = 0;
        loop {
            let query = StructuredQuery {
                from: vec![sq::CollectionSelector {
                    collection_id: collection.to_string(),
                    all_descendants: false,
                }],
                r#where: and(vec![
                    field_filter(
                        "scheduled_time",
                        sq::field_filter::Operator::GreaterThanOrEqual,
                        timestamp(since),
                    ),
                    field_filter(
                        "scheduled_time",
                        sq::field_filter::Operator::LessThanOrEqual,
                        timestamp(at),
                    ),
                ]),
                order_by: ["scheduled_time", "__name__"]
                    .into_iter()
                    .map(|f| sq::Order {
                        field: Some(field_ref(f)),
                        direction: sq::Direction::Ascending as i32,
                    })
                    .collect(),
                start_at: after.take(),
                limit: Some(DUE_PAGE),
                ..Default::default()
            };
            let page = self
                .run_query(self.documents_path().to_string(), query)
                .await?;
            let full = page.len() == DUE_PAGE as usize;
            if let Some(last) = page.last() {
                after = last.fields.get("scheduled_time").map(|t| pb::Cursor {
                    values: vec![t.clone(), reference(last.name.clone())],
                    before: false,
                });
            }
            seen += page.len() as u64;
            page.into_iter().for_each(&mut each);
            if !full || after.is_none() {
                return Ok(seen);
            }
        }
    }
}

// --- `ffpush status` (src/recent.rs) ---------------------------------------------------------

/// One of the reads `ffpush status` makes per collection (see [`Store::recent`]). Firestore
/// cannot order by creation time, and console documents carry no time field of their own, so
/// "the latest" is the union of these, each served by an index in
/// `migrations/firestore.indexes.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recent {
    /// Finished by ffpush (`completed_at`, written on every outcome), newest first; with
    /// `failed_only`, `status == "failed"` too (the composite index `status`, `completed_at`).
    Finished { failed_only: bool },
    /// Claimed and not finished: `status == "started"`.
    Started,
    /// Waiting for their time: `scheduled_time` after now, soonest first.
    Scheduled,
    /// Written with a `timestamp` (the app's "Trigger Push Notification" action, `ffpush
    /// send`), newest first: finds documents no worker has touched.
    Stamped,
}

/// The fields `ffpush status` shows; nothing else (titles, recipients) is read.
const RECENT_FIELDS: [&str; 14] = [
    "status",
    "num_sent",
    "num_tokens",
    "num_failed",
    "num_tokens_removed",
    "error",
    "warning",
    "error_counts",
    "started_at",
    "completed_at",
    "scheduled_time",
    "timestamp",
    "ffpush_progress",
    "ffpush_worker",
];

impl Store {
    /// Up to `limit` documents of `collection` of one [`Recent`] kind. `since` bounds the
    /// time field the kind is ordered by (not for [`Recent::Scheduled`], which is in the future).
    pub async fn recent(
        &self,
        collection: &str,
        kind: Recent,
        since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Document>, Error> {
        use sq::field_filter::Operator;
        let (filters, order): (Vec<Option<sq::Filter>>, Option<(&str, sq::Direction)>) = match kind
        {
            Recent::Finished { failed_only } => (
                vec![
                    failed_only.then(|| {
                        field_filter("status", Operator::Equal, string(Status::Failed.as_str()))
                    }),
                    since.map(|t| {
                        field_filter("completed_at", Operator::GreaterThanOrEqual, timestamp(t))
                    }),
                ],
                Some(("completed_at", sq::Direction::Descending)),
            ),
            Recent::Started => (
                vec![Some(field_filter(
                    "status",
                    Operator::Equal,
                    string(Status::Started.as_str()),
                ))],
                None,
            ),
            Recent::Scheduled => (
                vec![Some(field_filter(
                    "scheduled_time",
                    Operator::GreaterThan,
                    timestamp(now),
                ))],
                Some(("scheduled_time", sq::Direction::Ascending)),
            ),
            Recent::Stamped => (
                vec![since.map(|t| {
                    field_filter("timestamp", Operator::GreaterThanOrEqual, timestamp(t))
                })],
                Some(("timestamp", sq::Direction::Descending)),
            ),
        };
        let query = StructuredQuery {
            select: Some(sq::Projection {
                fields: RECENT_FIELDS.iter().map(|f| field_ref(f)).collect(),
            }),
            from: vec![sq::CollectionSelector {
                collection_id: collection.to_string(),
                all_descendants: false,
            }],
            r#where: and(filters.into_iter().flatten().collect()),
            order_by: order
                .map(|(field, direction)| sq::Order {
                    field: Some(field_ref(field)),
                    direction: direction as i32,
                })
                .into_iter()
                .collect(),
            limit: Some(limit.min(i32::MAX as usize) as i32),
            ..Default::default()
        };
        self.run_query(self.documents_path().to_string(), query)
            .await
    }
}

// --- end of `ffpush status` -------------------------------------------------------------------

/// The prost timestamp type Firestore uses.
pub mod prost_types_timestamp {
    pub use firestore::gcloud_sdk::prost_types::Timestamp;
}

/// What [`Store::token_page`] reads.
#[derive(Clone, Debug, Default)]
pub struct TokenQuery {
    /// One user's `fcm_tokens`: the user document's path (`users/abc`, any document path);
    /// `None` = collection group over every user.
    pub user: Option<String>,
    pub device_type: Option<String>,
    /// Bounds `[start, end)` on the user id within the users collection (a batch slice).
    pub user_id_start: Option<String>,
    pub user_id_end: Option<String>,
    pub page_size: usize,
    /// The subcollection read; empty means `fcm_tokens`.
    pub collection: String,
}

fn field_ref(path: &str) -> sq::FieldReference {
    sq::FieldReference {
        field_path: path.to_string(),
    }
}

fn field_filter(path: &str, op: sq::field_filter::Operator, value: Value) -> sq::Filter {
    sq::Filter {
        filter_type: Some(sq::filter::FilterType::FieldFilter(sq::FieldFilter {
            field: Some(field_ref(path)),
            op: op as i32,
            value: Some(value),
        })),
    }
}

fn and(mut filters: Vec<sq::Filter>) -> Option<sq::Filter> {
    match filters.len() {
        0 => None,
        1 => filters.pop(),
        _ => Some(sq::Filter {
            filter_type: Some(sq::filter::FilterType::CompositeFilter(
                sq::CompositeFilter {
                    op: sq::composite_filter::Operator::And as i32,
                    filters,
                },
            )),
        }),
    }
}

pub fn string(s: &str) -> Value {
    Value {
        value_type: Some(value::ValueType::StringValue(s.to_string())),
    }
}

pub fn integer(n: i64) -> Value {
    Value {
        value_type: Some(value::ValueType::IntegerValue(n)),
    }
}

pub fn reference(name: String) -> Value {
    Value {
        value_type: Some(value::ValueType::ReferenceValue(name)),
    }
}

pub fn timestamp(t: DateTime<Utc>) -> Value {
    Value {
        value_type: Some(value::ValueType::TimestampValue(to_timestamp(t))),
    }
}

pub fn array(values: Vec<Value>) -> Value {
    Value {
        value_type: Some(value::ValueType::ArrayValue(pb::ArrayValue { values })),
    }
}

pub fn to_timestamp(t: DateTime<Utc>) -> prost_types_timestamp::Timestamp {
    prost_types_timestamp::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn from_timestamp(t: &prost_types_timestamp::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
}

pub fn timestamp_field(doc: &Document, name: &str) -> Option<DateTime<Utc>> {
    match doc.fields.get(name)?.value_type.as_ref()? {
        value::ValueType::TimestampValue(t) => from_timestamp(t),
        _ => None,
    }
}

pub fn integer_field(doc: &Document, name: &str) -> Option<i64> {
    match doc.fields.get(name)?.value_type.as_ref()? {
        value::ValueType::IntegerValue(n) => Some(*n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: &str = "https://console.firebase.google.com/v1/r/project/my-app/firestore/indexes?create_exemption=ClRwcm9qZWN0cy9teS1hcHAvZGF0YWJhc2VzLyhkZWZhdWx0KS9jb2xsZWN0aW9uR3JvdXBzL2ZjbV90b2tlbnMvZmllbGRzL2RldmljZV90eXBlEAIaDwoLZGV2aWNlX3R5cGUQAQ";

    #[test]
    fn a_missing_index_is_named_with_firestores_link_not_taken_for_a_conflict() {
        // Real Firestore's words for a missing collection-group single-field index.
        let status = tonic::Status::failed_precondition(format!(
            "The query requires a COLLECTION_GROUP_ASC index for collection fcm_tokens and field device_type. You can create it here: {LINK}"
        ));
        let e = Error::from(status);
        let Error::MissingIndex { needed, link } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(
            needed,
            "The query requires a COLLECTION_GROUP_ASC index for collection fcm_tokens and field device_type."
        );
        assert_eq!(link.as_deref(), Some(LINK));
        let text = e.to_string();
        assert!(
            text.contains(
                "COLLECTION_GROUP_ASC index for collection fcm_tokens and field device_type"
            ) && text.contains(LINK)
                && text.contains("firebase deploy --only firestore:indexes"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        assert!(!e.is_transient());

        // A composite index, as the console words it.
        let composite = "https://console.firebase.google.com/v1/r/project/my-app/firestore/indexes?create_composite=Ck9wcm9qZWN0cy9teS1hcHA";
        let e = Error::from(tonic::Status::failed_precondition(format!(
            "The query requires an index. You can create it here: {composite}"
        )));
        assert!(
            matches!(&e, Error::MissingIndex { needed, link: Some(l) }
                if needed == "The query requires an index." && l == composite),
            "{e:?}"
        );
    }

    #[test]
    fn a_failed_write_precondition_is_still_a_conflict() {
        let e = Error::from(tonic::Status::failed_precondition(
            "the stored version (1712345678901234) does not match the required base version (1712345678900000)",
        ));
        assert!(matches!(e, Error::Conflict), "{e:?}");
    }

    #[test]
    fn a_query_refused_without_words_is_a_missing_index() {
        // Collection-group queries have been seen failing with an empty message.
        let e = Error::from_query(tonic::Status::failed_precondition(""));
        let text = e.to_string();
        assert!(
            matches!(e, Error::MissingIndex { link: None, .. }) && text.contains("ffpush doctor"),
            "{text}"
        );
        let e = Error::from_query(tonic::Status::unavailable("down"));
        assert!(e.is_transient());
    }
}
