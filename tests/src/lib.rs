//! Test harness shared by the cross-crate integration tests.
