//! etpo runtime.
