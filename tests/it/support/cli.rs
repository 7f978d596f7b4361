//! The `ffpush` binary, run by a test.

use std::process::{Command, Output};

use super::{TestApp, shared};

/// The binary, with none of the machine's settings in its environment: the child must not
/// pick up settings from the machine running the tests.
pub fn ffpush() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ffpush"));
    for var in [
        "GOOGLE_CLOUD_PROJECT",
        "FIRESTORE_EMULATOR_HOST",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "FCM_ENDPOINT",
        "PORT",
    ] {
        c.env_remove(var);
    }
    c
}

/// `ffpush send ARGS` for `app`'s project on the shared Firestore emulator, to its end
/// (blocking: call it from `spawn_blocking` in an async test).
pub fn ffpush_send(app: &TestApp, args: &[&str]) -> Output {
    ffpush()
        .arg("send")
        .args(args)
        .env("GOOGLE_CLOUD_PROJECT", &app.project)
        .env("FIRESTORE_EMULATOR_HOST", &shared().firestore_host)
        .output()
        .expect("running ffpush send")
}
