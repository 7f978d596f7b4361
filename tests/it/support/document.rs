//! Field values to write and read, and checks on a finished notification document.

use ffpush::model::pb;
use ffpush::store;

pub fn s(v: &str) -> pb::Value {
    store::string(v)
}

pub fn int(n: i64) -> pb::Value {
    store::integer(n)
}

pub fn text(doc: &pb::Document, field: &str) -> Option<String> {
    doc.fields
        .get(field)
        .and_then(ffpush::model::string_value)
        .map(str::to_string)
}

/// The document's `status` is `succeeded`; else the failure names its `error`.
#[track_caller]
pub fn assert_succeeded(doc: &pb::Document) {
    assert_eq!(
        text(doc, "status").as_deref(),
        Some("succeeded"),
        "{:?}",
        text(doc, "error")
    );
}

pub fn num(doc: &pb::Document, field: &str) -> Option<i64> {
    store::integer_field(doc, field)
}
