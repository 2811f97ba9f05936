//! The runtime crate's integration tests, in one binary: containment of hostile programs, ROC AUC
//! against scikit-learn, the held-out test part, and the WebAssembly games through the host. They need the project's
//! Python environment (`scripts/setup.sh python`) and the shipped games (`scripts/setup.sh games`).
//!
//! `../recovery.rs` is a binary of its own: it finds its pool's workers as the only sandbox
//! cgroup of its process, which another test's pool in the same process would break.

mod containment;
mod games;
mod held_out;
mod history;
mod roc_auc_sklearn;
