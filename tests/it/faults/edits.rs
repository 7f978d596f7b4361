//! Documents edited or deleted while they are offered, claimed or sent.
