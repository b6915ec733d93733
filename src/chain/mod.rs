//! Tamper evidence: row hashes (computed by the trigger), sealed blocks, verify and digest.
pub mod append;
#[cfg(test)]
mod fuzz;
pub mod hash;
pub mod jsonb_text;
pub mod prune;
pub mod seal;
pub mod verify;
pub mod writers;
