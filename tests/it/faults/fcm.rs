//! FCM unavailable for a while, or hanging on one token.
