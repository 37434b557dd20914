//! Scheduler-side facade: what kvpark holds, what requests can load, what
//! finished requests park, and where each suspended session's KV lives. Pure
//! state (but for [`recovery`]'s scan at start): no threads, no I/O; time
//! is an argument.
//!
//! - [`core`]: sessions, capacity accounting and the policy calls; the pure
//!   planner that the connector and the replay simulator share.
//! - [`blocks`]: the block-level planner the vLLM connector's scheduler role
//!   drives; it maps vLLM's block hashes onto sessions and runs [`core`].
//! - [`recovery`]: at start, what every worker rank's files still hold (the
//!   one place the scheduler side reads files).

pub mod blocks;
mod chain_index;
pub mod core;
pub mod recovery;

pub use blocks::{BlockPlanner, Match, PlannerMetrics, RequestHint, RequestView};

#[cfg(test)]
mod kvpark_policy_tests;
#[cfg(test)]
mod policy_tests;
