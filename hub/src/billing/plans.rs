//! See `billing/mod.rs`.
