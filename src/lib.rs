//! ffpush: FlutterFlow push notifications, sent from Firestore through FCM HTTP v1.
//!
//! # Layout
//! Data flows one way: intake → claim → audience → fan-out → report.
//!
//! - [`config`]: settings from environment and flags, validated once at start.
//! - [`model`]: FlutterFlow's documents as validated types (`Notification`, `Audience`, batch slices).
//! - [`store`]: every Firestore read and write (preconditions, field masks, token pages).
//! - [`intake`]: the Firestore listen streams and the periodic sweep.
//! - [`worker`]: one document's life: schedule, lease/claim, fan-out, report.
//! - [`report`]: the outcome fields written back, and what counts as succeeded.
//! - [`schedule`]: one timer per document waiting for its time or for another worker's lease.
//! - [`audience`]: user refs or broadcast slices → a bounded stream of token pages.
//! - [`fanout`]: concurrent sends, retries with backoff, dead-token pruning, progress cursor.
//! - [`fcm`]: OAuth2 tokens, the message template, one send, and what FCM's answer means.
//! - [`metrics`], [`server`]: Prometheus counters and the health/metrics HTTP port;
//!   [`logging`]: text, or Cloud Logging JSON on Cloud Run.
//! - [`daemon`]: `ffpush run`, the entry point `main` and the tests share.
//! - [`cli`]: subcommands `run`, `dev`, `send`, `status`, `doctor`, `fcm-emulator`; [`doctor`]: the
//!   operator's checks; [`seed`]: demo data for `dev`.
//! - [`migrate`]: versioned data migrations (`ffpush migrate`), recorded in `ffpush_migrations`.
//! - [`recent`]: `ffpush status`, the latest notifications of both collections.
//! - [`fcm_emulator`]: our FCM HTTP v1 + OAuth2 emulator; [`firestore_emulator`]: runs
//!   Google's Firestore emulator as a child process.
#![forbid(unsafe_code)]

pub mod audience;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod fanout;
pub mod fcm;
pub mod fcm_emulator;
pub mod firestore_emulator;
pub mod intake;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod recent;
pub mod report;
pub mod schedule;
pub mod seed;
pub mod server;
pub mod store;
pub mod worker;
