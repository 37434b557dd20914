//! The `kvpark` command line: replay traces, benchmark the tiers, inspect an
//! NVMe store, check a connector config.

use clap::{Parser, Subcommand};
use kvpark::benchkit;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kvpark",
    version,
    about = "Park the KV cache of idle coding-agent sessions"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Sim(kvpark::sim::cli::SimCommand),
    /// Measure host gather/scatter, NVMe segment I/O and codecs, each beside
    /// a baseline measured in the same run.
    Bench {
        /// Shorter runs (less stable numbers).
        #[arg(long)]
        quick: bool,
        /// Directory for the NVMe figures (on the drive to measure).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Comma-separated subset: copy, nvme, codec; cuda (GPU 0: every
        /// copy mechanism beside one cuMemcpyAsync, and the `copy_strategy`
        /// rules the numbers give) runs only when named.
        #[arg(long, default_value = "copy,nvme,codec")]
        only: String,
    },
    /// Report the records of an NVMe store directory and verify checksums.
    Inspect {
        /// The store directory (`nvme_dir` of the config).
        dir: PathBuf,
        /// Skip payload checksum verification (headers only).
        #[arg(long)]
        no_verify: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate a kv_connector_extra_config JSON and print it normalized.
    Config {
        /// The JSON object (e.g. '{"host_bytes":"8GiB"}').
        json: String,
    },
}

fn run(cli: Cli) -> kvpark::Result<()> {
    match cli.cmd {
        Cmd::Sim(cmd) => kvpark::sim::cli::run(cmd),
        Cmd::Bench { quick, dir, only } => {
            let parts: Vec<&str> = only.split(',').map(str::trim).collect();
            for p in &parts {
                if !["copy", "nvme", "codec", "cuda"].contains(p) {
                    return Err(kvpark::Error::invalid(format!(
                        "bench --only: unknown part {p:?} (copy, nvme, codec, cuda)"
                    )));
                }
            }
            println!("{}", benchkit::header());
            if parts.contains(&"copy") {
                for blocks in [64usize, 256] {
                    for f in kvpark::copy::bench::bench_copy(blocks, quick) {
                        println!("{}", f.row());
                    }
                }
            }
            if parts.contains(&"nvme") {
                let (figs, spreads) = kvpark::tier::nvme::bench::bench_nvme(&dir, quick)?;
                for f in figs {
                    println!("{}", f.row());
                }
                println!("  nvme figures are medians of paired rounds; per-round range:");
                for s in spreads {
                    println!("  {}", s.line());
                }
            }
            if parts.contains(&"codec") {
                let (figs, ratios) = kvpark::codec::bench::bench_codecs(quick);
                for f in figs {
                    println!("{}", f.row());
                }
                for r in ratios {
                    println!("  {r}");
                }
            }
            if parts.contains(&"cuda") {
                use kvpark::copy::cuda::{bench, Strategy};
                let geometries: Vec<String> = bench::BENCH_GEOMETRIES
                    .iter()
                    .map(|g| g.to_string())
                    .collect();
                let budget = std::time::Duration::from_millis(if quick { 100 } else { 300 });
                let (figs, rules) =
                    bench::cuda_bench(0, &geometries, &[1, 64, 1024], &Strategy::ALL, budget)?;
                for f in figs {
                    println!("{}", f.row());
                }
                println!(
                    "  copy_strategy rules from these numbers:\n{}",
                    serde_json::to_string(&rules).expect("rules serialize")
                );
            }
            Ok(())
        }
        Cmd::Inspect {
            dir,
            no_verify,
            json,
        } => {
            let r = kvpark::tier::nvme::inspect(&dir, !no_verify)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("report serializes")
                );
            } else {
                print!("{r}");
            }
            Ok(())
        }
        Cmd::Config { json } => {
            let c = kvpark::config::Config::from_json(json.as_bytes())?;
            println!("{}", c.to_json());
            Ok(())
        }
    }
}

/// The library's warnings and errors (the `log` facade), one line each on
/// stderr, as the terminal shows the command's own messages.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("{}", r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvpark: {e}");
            ExitCode::FAILURE
        }
    }
}
