//! Every Firestore read and write ffpush makes, on the raw Firestore v1 gRPC API (through the
//! `firestore` crate's authenticated channel) so that preconditions, field masks, cursors and
//! the listen stream are exactly what we ask for.
//!
//! Here: the [`Store`] (connection, client, paths), its [`Error`]s and retries. Beside it:
//! `queries` (reads, queries, token pages), `writes` (preconditioned writes, field masks) and
//! `values` (Firestore `Value`s built and read); all of theirs is re-exported here.

use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;
use firestore::gcloud_sdk::google::firestore::v1::firestore_client::FirestoreClient;
use firestore::gcloud_sdk::google_cloud_auth::credentials::{
    CacheableResource, Credentials, CredentialsProvider, EntityTag,
};
use firestore::gcloud_sdk::google_cloud_auth::errors::CredentialsError;
use firestore::gcloud_sdk::tonic::{self, Code};
use firestore::gcloud_sdk::{GoogleAuthHeaders, GoogleAuthMiddleware};
use firestore::{FirestoreDb, FirestoreDbOptions};

use crate::config::Settings;

mod queries;
mod values;
mod writes;

pub use queries::{DeviceToken, Recent, TokenQuery};
pub use values::{
    array, from_timestamp, integer, integer_field, reference, string, timestamp, timestamp_field,
    to_timestamp,
};

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
}

/// The prost timestamp type Firestore uses.
pub mod prost_types_timestamp {
    pub use firestore::gcloud_sdk::prost_types::Timestamp;
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
