//! The fault suite: each test makes one production failure happen on purpose (a document
//! edited or deleted mid-way, the connection to Firestore cut, FCM unavailable or hanging on a
//! token) and asserts that nothing is lost, duplicates stay within the stated bound, and the
//! worker keeps running. README "Guarantees" lists each fault with its measured result.

mod edits;
mod fcm;
mod firestore;
mod lease;
