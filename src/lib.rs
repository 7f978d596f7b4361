//! ffpush: FlutterFlow push notifications, sent from Firestore through FCM HTTP v1.
#![forbid(unsafe_code)]

pub mod fcm_emulator;
