//! FCM emulator.
