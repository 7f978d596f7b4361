//! The one integration-test binary. The Firestore emulator (Google's, as a child process) and
//! the FCM emulator (ours, on its own thread) start once for the whole binary; every test gets
//! its own project id on them, so tests never see each other's data. What the tests share is in
//! `support/`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed check

mod backlog;
mod cli;
mod deploy;
mod faults;
mod fcm_emulator;
mod fcm_http1;
mod fcm_pool;
mod fcm_quota;
mod fidelity;
mod i18n;
mod instances;
mod lifecycle;
mod limits;
mod logs;
mod migrate;
mod monitoring;
mod notifications;
mod ops;
mod options;
mod reliability;
mod resilience;
mod rollout;
mod rules;
mod status;
mod support;

// The helpers stay reachable as `crate::Name` from every test module.
pub use support::*;
