//! The names of the notification document's fields that ffpush writes (and reads back), spelled
//! once: the outcome FlutterFlow's functions and the console know (`status`, `num_sent`, …),
//! the counts ffpush adds beside them, and ffpush's own `ffpush_*` bookkeeping. The fields
//! FlutterFlow writes and ffpush only reads (`notification_title`, `user_refs`, …) are
//! [`crate::model`]'s, which parses them. What each means: docs/contract.md, "What ffpush
//! writes back".

/// `""`/absent, `started`, `succeeded`, `failed`, `cancelled`, `validated` ([`crate::model::Status`]).
pub const STATUS: &str = "status";
/// When the first claim took the document.
pub const STARTED_AT: &str = "started_at";
/// When the outcome was written.
pub const COMPLETED_AT: &str = "completed_at";
/// Messages FCM accepted.
pub const NUM_SENT: &str = "num_sent";
/// Distinct device tokens found.
pub const NUM_TOKENS: &str = "num_tokens";
/// Tokens that got no message.
pub const NUM_FAILED: &str = "num_failed";
/// Dead tokens deleted.
pub const NUM_TOKENS_REMOVED: &str = "num_tokens_removed";
/// Recipients without a device token.
pub const NUM_USERS_WITHOUT_TOKENS: &str = "num_users_without_tokens";
/// Which recipients have no device token (console documents only).
pub const USERS_WITHOUT_TOKENS: &str = "users_without_tokens";
/// Why the document failed, in one line.
pub const ERROR: &str = "error";
/// What an operator should know about a document that succeeded.
pub const WARNING: &str = "warning";
/// FCM's error code → how many tokens got it.
pub const ERROR_COUNTS: &str = "error_counts";

/// The worker holding the claim.
pub const WORKER: &str = "ffpush_worker";
/// Until when the claim holds without renewal.
pub const LEASE: &str = "ffpush_lease_expires_at";
/// Where a send stands, for a takeover to resume from.
pub const PROGRESS: &str = "ffpush_progress";
/// With `FFPUSH_RETENTION`, the time at which a finished document may be deleted:
/// `completed_at` + the retention, for a Firestore TTL policy on this field (`deploy.sh
/// --retention`). Set by [`crate::store::Store`] on every write that sets `completed_at`, so
/// both a report and a failure of a document never claimed carry it.
pub const EXPIRES_AT: &str = "ffpush_expires_at";
