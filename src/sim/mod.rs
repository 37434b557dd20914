//! Trace reader, synthetic generator, replay simulator and report.
//! Nothing else in the crate depends on this module.
//!
//! - [`trace`]: TraceLab JSONL reader and the derived quantities of DESIGN §6.
//! - [`stats`]: `kvpark trace stats` (distributions, idealised TTL sweep).
//! - [`synth`]: the calibrated synthetic generator (`kvpark trace synth`).
//! - [`deploy`]: the modelled deployment (JSON, with an embedded default).
//! - [`engine`]: the event-driven replay on a virtual clock.
//! - [`report`], [`plot`]: tables, JSON and hand-written SVG.
//! - [`cli`]: the `replay` and `trace` subcommands.

pub mod hist;
pub mod rng;
pub mod stats;
pub mod synth;
pub mod trace;

/// "1m", "5m", "1h", "30s": a duration in seconds, for tables.
pub fn fmt_dur_s(s: f64) -> String {
    if s >= 86400.0 && (s / 86400.0).fract() == 0.0 {
        format!("{}d", s / 86400.0)
    } else if s >= 3600.0 && (s / 3600.0).fract() == 0.0 {
        format!("{}h", s / 3600.0)
    } else if s >= 60.0 && (s / 60.0).fract() == 0.0 {
        format!("{}m", s / 60.0)
    } else if s >= 1.0 {
        format!("{s:.0}s")
    } else {
        format!("{:.0}ms", s * 1e3)
    }
}

pub mod cli;

/// Placeholder until the replay engine lands.
fn replay_cli(_a: cli::ReplayArgs) -> crate::Result<()> {
    Err(crate::Error::unsupported("replay not built yet"))
}
