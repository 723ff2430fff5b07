//! Rotating pcapng files: one interface block per pod (`namespace/pod`),
//! direction in each packet's `epb_flags`, rotation by size and age, and
//! retention by file count.
pub mod config;
pub mod sink;
