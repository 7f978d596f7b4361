//! Reads: single documents, queries, the sweep's and `ffpush status`'s reads, and the
//! recipients' token pages and streams.

use chrono::{DateTime, Utc};
use firestore::gcloud_sdk::google::firestore::v1::{
    self as pb, Document, RunQueryRequest, StructuredQuery, Value, run_query_request,
    structured_query as sq, value,
};
use futures::StreamExt;

use super::{Error, Store, reference, string, timestamp};
use crate::fields;
use crate::model::Status;

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

impl Store {
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
                fields::STATUS,
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
    fields::STATUS,
    fields::NUM_SENT,
    fields::NUM_TOKENS,
    fields::NUM_FAILED,
    fields::NUM_TOKENS_REMOVED,
    fields::ERROR,
    fields::WARNING,
    fields::ERROR_COUNTS,
    fields::STARTED_AT,
    fields::COMPLETED_AT,
    "scheduled_time",
    "timestamp",
    fields::PROGRESS,
    fields::WORKER,
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
                        field_filter(
                            fields::STATUS,
                            Operator::Equal,
                            string(Status::Failed.as_str()),
                        )
                    }),
                    since.map(|t| {
                        field_filter(
                            fields::COMPLETED_AT,
                            Operator::GreaterThanOrEqual,
                            timestamp(t),
                        )
                    }),
                ],
                Some((fields::COMPLETED_AT, sq::Direction::Descending)),
            ),
            Recent::Started => (
                vec![Some(field_filter(
                    fields::STATUS,
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
