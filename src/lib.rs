//! ffpush: FlutterFlow push notifications, sent from Firestore through FCM HTTP v1.
//!
//! # Layout
//! Data flows one way, one module per stage:
//!
//! ```text
//! intake ─► claim ─► audience ─► fanout ─► report
//! ```
//!
//! - `intake`: the Firestore listen streams and the periodic sweep; documents are offered to
//!   the worker.
//! - [`claim`]: the precondition write that makes a document ours, the lease renewed with
//!   progress while sending, and its release.
//! - [`audience`]: user refs or broadcast slices → a bounded stream of token pages.
//! - [`language`]: for a notification with translations, each recipient user's language
//!   (read once per user) picks its message variant.
//! - [`fanout`]: concurrent sends, retries with backoff, dead-token pruning, progress ledger.
//! - `report`: the outcome fields written back, and what counts as succeeded.
//!
//! Around the pipeline:
//! - `worker`: orchestrates one document through the stages (status, schedule, lateness,
//!   then claim → fan-out → report) and returns an `worker::Outcome`.
//! - `admit`: at most `FFPUSH_MAX_DOCUMENTS` documents in progress; due ones beyond wait in a
//!   queue in due order (name and due time only) and are read again when a slot frees.
//! - `schedule`: one timer per document waiting for its time (if due within
//!   `FFPUSH_SCHEDULE_WINDOW`) or for another worker's lease.
//! - `limits`: what an app user's document may cost: its size, its recipients, its sender's
//!   documents per minute; checked before anything is read.
//! - `errors`: how an error and its causes are shown (docs/contract.md, "Errors": what each
//!   leads to).
//! - [`fields`]: the names of the fields ffpush writes onto a notification document (and
//!   reads back), spelled once.
//! - [`model`]: FlutterFlow's documents as validated types (`Notification`, `Audience`,
//!   `Status`, batch slices).
//! - [`store`]: every Firestore read and write (preconditions, field masks, token pages).
//! - [`fcm`]: OAuth2 tokens, the message template, one send, and what FCM's answer means.
//! - [`config`]: settings from environment and flags, validated once at start.
//! - [`metrics`], `server`: Prometheus counters and the health/metrics HTTP port;
//!   `logging`: text, or Cloud Logging JSON on Cloud Run.
//! - [`instances`]: the instances of a project find each other through heartbeats in
//!   `ffpush_instances` and share `FFPUSH_FCM_RATE` (each paces at its share).
//! - [`daemon`]: `ffpush run`, the entry point `main` and the tests share.
//! - [`cli`]: the subcommands; [`doctor`]: the operator's checks; [`migrate`]: versioned data
//!   migrations (`ffpush migrate`), recorded in `ffpush_migrations`; [`recent`]: `ffpush
//!   status`, the latest notifications of both collections.
//!
//! Local tooling, never on the production path, sits apart in [`dev`]: the FCM emulator, the
//! Firestore emulator runner and the demo seed.
#![forbid(unsafe_code)]

pub(crate) mod admit;
pub mod audience;
pub mod claim;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dev;
pub mod doctor;
pub(crate) mod errors;
pub mod fanout;
pub mod fcm;
pub mod fields;
pub mod instances;
pub(crate) mod intake;
pub mod language;
pub(crate) mod limits;
pub(crate) mod logging;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod recent;
pub(crate) mod report;
pub(crate) mod schedule;
pub(crate) mod server;
pub mod store;
pub(crate) mod worker;
