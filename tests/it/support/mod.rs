//! What the integration tests share, re-exported at the test binary's root (`crate::TestApp`,
//! `crate::s`, `crate::proxy::Proxy`, …).

mod app;
mod cli;
mod document;
mod emulators;
pub mod proxy;
mod wait;

pub use app::TestApp;
pub use cli::{ffpush, ffpush_send};
pub use document::{assert_succeeded, int, num, s, text};
pub use emulators::{Shared, shared};
pub use wait::wait_until;
