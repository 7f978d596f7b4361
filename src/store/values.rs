//! Firestore `Value`s built from and read back into Rust types.

use chrono::{DateTime, Utc};
use firestore::gcloud_sdk::google::firestore::v1::{self as pb, Document, Value, value};

use super::prost_types_timestamp;

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
