//! The seccomp filter of the sandbox.
