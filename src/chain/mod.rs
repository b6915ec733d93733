//! Tamper evidence: row hashes (computed by the trigger), sealed blocks, verify and digest.
pub mod hash;
