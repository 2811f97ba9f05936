//! etpo environment specs.
