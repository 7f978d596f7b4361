//! Local tooling, apart from the production path: nothing here runs in `ffpush run`.
//!
//! - [`fcm_emulator`]: our FCM HTTP v1 + OAuth2 emulator (Google ships none), used by the tests,
//!   the benchmarks, `ffpush dev` and `ffpush fcm-emulator`.
//! - [`firestore_emulator`]: runs Google's Cloud Firestore emulator as a child process.
//! - [`seed`]: demo users and devices for `ffpush dev --seed`.

pub mod fcm_emulator;
pub mod firestore_emulator;
pub mod seed;
