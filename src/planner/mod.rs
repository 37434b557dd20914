//! Scheduler-side facade: what kvpark holds, what requests can load, what
//! finished requests park. Pure state: no threads, no I/O; time is an argument.
//!
//! - [`blocks`]: the block planner the vLLM connector's scheduler role drives.

pub mod blocks;

pub use blocks::{BlockPlanner, Match, PlannerMetrics, RequestHint, RequestView};
