//! The `kvpark` command line in a test: argument lists parsed exactly as the
//! `kvpark` binary parses them, run through `kvpark::sim::cli::run` (tests
//! of the `cli` feature include it with `#[path = "common/cli.rs"] mod cli;`).

use clap::Parser;
use kvpark::sim::cli::{run, SimCommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: SimCommand,
}

/// Runs `kvpark ARGS…`.
pub fn kvpark(args: &[&str]) -> kvpark::Result<()> {
    let mut v = vec!["kvpark"];
    v.extend_from_slice(args);
    run(Cli::try_parse_from(v).expect("arguments parse").cmd)
}
