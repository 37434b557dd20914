//! Scheduler-side facade: sessions, capacity accounting and the policy
//! calls that decide where each suspended session's KV lives.
//!
//! [`core`] is the pure planner the connector and the replay simulator share.

pub mod core;
