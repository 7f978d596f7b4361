//! Writes: the preconditioned field-mask writes every claim, lease and report goes through,
//! and plain creates, sets and deletes.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use firestore::gcloud_sdk::google::firestore::v1::{
    self as pb, Document, DocumentMask, Precondition, Value, precondition,
};

use super::{Error, Store, prost_types_timestamp, timestamp};

impl Store {
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
            fields.insert(crate::fields::EXPIRES_AT.to_string(), expires_at);
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
                field_paths: vec![crate::fields::STATUS.into()],
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
        let completed_at =
            fields
                .get(crate::fields::COMPLETED_AT)
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
                field_paths: vec![crate::fields::STATUS.into()],
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
}
