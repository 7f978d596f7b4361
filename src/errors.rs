//! How errors are shown. Every error type keeps what caused it as its `source()` (a typed
//! value, never a string made from it), and its own message says only what failed at its level;
//! [`Chain`] puts the whole story on one line for a log field, a document's `error` or the
//! prompt. What each error leads to (fail the document, retry, stop the process) is in
//! docs/contract.md, "Errors".

use std::error::Error;
use std::fmt;

/// `what failed: why: why that`, from an error and its sources.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            // Some libraries repeat their source in their own message; say it once. (Display
            // only: nothing decides anything on this text.)
            let part = cause.to_string();
            if !part.is_empty() && !text.ends_with(&part) {
                text.push_str(": ");
                text.push_str(&part);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn every_cause_appears_once() {
        let e = Outer(Middle(std::io::Error::other("disk on fire")));
        assert_eq!(Chain(&e).to_string(), "outer: middle: disk on fire");
    }
}
