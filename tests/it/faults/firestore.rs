//! The connection between a worker and Firestore cut (idle, mid-send, longer than the lease).
