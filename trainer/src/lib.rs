//! etpo trainer.
