//! The emulators every test shares: Google's Firestore emulator (a child process) and ours for
//! FCM (on its own thread), started once per test binary.

use std::sync::OnceLock;

use ffpush::dev::fcm_emulator::{EmulatorOptions, FcmEmulator};
use ffpush::dev::firestore_emulator::FirestoreEmulator;

pub struct Shared {
    pub firestore_host: String,
    pub fcm: FcmEmulator,
    _firestore: Option<FirestoreEmulator>,
}

/// Starts the emulators on first use. `FIRESTORE_EMULATOR_HOST`, when set, is used instead of
/// starting one.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (firestore_host, firestore) = match std::env::var("FIRESTORE_EMULATOR_HOST") {
            Ok(host) if !host.is_empty() => (host, None),
            _ => match FirestoreEmulator::start(None) {
                Ok(emulator) => (emulator.host_port().to_string(), Some(emulator)),
                Err(e) => panic!("{e}"),
            },
        };
        let fcm =
            FcmEmulator::start_on_thread(([127, 0, 0, 1], 0).into(), EmulatorOptions::default())
                .unwrap_or_else(|e| panic!("cannot start the FCM emulator: {e}"));
        Shared {
            firestore_host,
            fcm,
            _firestore: firestore,
        }
    })
}
