//! The `replay` and `trace` subcommands, as a `clap` subcommand enum the
//! `kvpark` binary flattens in.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::stats::TraceStats;
use super::synth::{write_trace, SynthConfig};
use super::trace;
use crate::error::{Result, ResultExt};

/// The simulator's subcommands.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Replay a trace through policies on a modelled deployment and compare them.
    Replay(ReplayArgs),
    /// Sweep tier sizes and policies on a cluster file and recommend a
    /// `kv_connector_extra_config`.
    Tune(Box<TuneArgs>),
    /// Work with TraceLab traces.
    Trace {
        /// What to do.
        #[command(subcommand)]
        cmd: TraceCommand,
    },
}

/// `kvpark trace ...`
#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Write a calibrated synthetic trace (TraceLab JSONL).
    Synth {
        /// Number of sessions.
        #[arg(long, default_value_t = 4300)]
        sessions: u64,
        /// Seed (same seed, same bytes).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file (`.gz` suffix: gzip).
        #[arg(long)]
        out: PathBuf,
        /// Multiply every human wait by X (a shifted workload; 1: calibrated).
        #[arg(long, default_value_t = 1.0)]
        human_scale: f64,
        /// Multiply every tool call's latency by X (1: calibrated).
        #[arg(long, default_value_t = 1.0)]
        tool_scale: f64,
    },
    /// Print a trace's distributions and the idealised TTL sweep.
    Stats {
        /// A TraceLab `.jsonl` or `.jsonl.gz` file.
        file: PathBuf,
        /// Also write the numbers as JSON (study quantities, distributions
        /// with p10/p25/p50/p75/p90/p99, the sweep).
        #[arg(long)]
        json: Option<PathBuf>,
        /// TTLs of the printed sweep table, comma-separated (e.g. 30s,1m,5m,1h).
        #[arg(long, value_delimiter = ',', default_value = "1m,5m,1h")]
        taus: Vec<String>,
    },
    /// Replay a trace's suspends through the gap predictors online and
    /// print their calibration and pinball loss.
    Predict {
        /// A TraceLab `.jsonl` or `.jsonl.gz` file.
        file: PathBuf,
        /// Infer what a session waits on from its tool calls instead of
        /// taking it from the trace.
        #[arg(long)]
        no_hints: bool,
    },
}

/// `kvpark replay ...`
#[derive(Debug, Args, Default)]
pub struct ReplayArgs {
    /// A TraceLab file (real or generated); default: an embedded generated trace.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Deployment JSON; default: the embedded one (`kvpark replay --print-deployment`).
    #[arg(long)]
    pub deployment: Option<PathBuf>,
    /// Print the default deployment JSON and exit.
    #[arg(long)]
    pub print_deployment: bool,
    /// Policies to compare, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub policies: Vec<String>,
    /// Divide session start times by X (more sessions at once per GPU).
    #[arg(long)]
    pub time_compression: Option<f64>,
    /// Seed of the embedded trace.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sessions of the embedded trace.
    #[arg(long)]
    pub sessions: Option<u64>,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write SVG plots into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Show progress on stderr even when it is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// Drive the connector's scheduler-side block planner at block
    /// granularity (the deployment's block size, vLLM's block hashes, its
    /// plans run on a modelled worker) instead of the session-level planner.
    #[arg(long)]
    pub blocks: bool,
}

/// `kvpark tune ...`
#[derive(Debug, Args)]
pub struct TuneArgs {
    /// Cluster file (the deployment schema, `deployments/README.md`).
    #[arg(long)]
    pub cluster: PathBuf,
    /// A TraceLab file (real or generated); default: the embedded generated trace.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Policies to sweep, comma-separated; a name the connector cannot run
    /// (gpu-lru, oracle, ttl:D) is replayed once as a baseline.
    #[arg(long, value_delimiter = ',')]
    pub policies: Vec<String>,
    /// Codecs to sweep, comma-separated; default: the cluster file's.
    #[arg(long, value_delimiter = ',')]
    pub codecs: Vec<String>,
    /// Tune for a vLLM that publishes its KV-cache events: sweep `kvpark`
    /// as it runs with them (`kvpark:gpu-events`; the recommended config
    /// still says "kvpark", and its `vllm serve` line turns the events on).
    #[arg(long)]
    pub kv_events: bool,
    /// Knob grid of the kvpark policies, `;`-separated per knob, values
    /// comma-separated (`margin=1.25,2,4;every=2s,10s,60s`; knobs: margin,
    /// every, first); swept at every point with an NVMe tier.
    #[arg(long, default_value = super::tune::DEFAULT_KNOBS)]
    pub knobs: String,
    /// Host sizes: halving from the cluster's pinnable_host_bytes.
    #[arg(long, default_value_t = super::tune::DEFAULT_HOST_STEPS)]
    pub host_steps: u32,
    /// NVMe sizes: none, then quartering up to the drives' capacity.
    #[arg(long, default_value_t = super::tune::DEFAULT_NVME_STEPS)]
    pub nvme_steps: u32,
    /// Recommend the cheapest point with a user-initiated TTFT p90 at most
    /// this many seconds; default: within --ttft-slack of the best p90.
    #[arg(long)]
    pub target_ttft_p90: Option<f64>,
    /// Without a target: the cheapest point within this fraction of the best p90.
    #[arg(long, default_value_t = super::tune::DEFAULT_TTFT_SLACK)]
    pub ttft_slack: f64,
    /// `nvme_dir` of the printed config (default: a placeholder to replace).
    #[arg(long)]
    pub nvme_dir: Option<String>,
    /// Divide session start times by X; default: the cluster file's time_compression.
    #[arg(long)]
    pub time_compression: Option<f64>,
    /// Sessions of the embedded trace.
    #[arg(long)]
    pub sessions: Option<u64>,
    /// Seed of the embedded trace.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write every point, the front and the recommendation as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the cost vs TTFT plot (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the recommended kv_connector_extra_config JSON to this file.
    #[arg(long)]
    pub config_out: Option<PathBuf>,
    /// Show progress on stderr even when it is not a terminal.
    #[arg(long)]
    pub progress: bool,
}

/// Runs a simulator subcommand.
pub fn run(cmd: SimCommand) -> Result<()> {
    match cmd {
        SimCommand::Trace {
            cmd:
                TraceCommand::Synth {
                    sessions,
                    seed,
                    out,
                    human_scale,
                    tool_scale,
                },
        } => {
            for (flag, v) in [("--human-scale", human_scale), ("--tool-scale", tool_scale)] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(crate::Error::invalid(format!(
                        "{flag} {v}: must be a positive number"
                    )));
                }
            }
            let cfg = SynthConfig {
                human_scale,
                tool_scale,
                ..SynthConfig::new(sessions, seed)
            };
            let f = std::fs::File::create(&out).ctx(format!("create {}", out.display()))?;
            let gz = out.extension().is_some_and(|e| e == "gz");
            let t = std::time::Instant::now();
            let sum = if gz {
                let mut enc = flate2::write::GzEncoder::new(
                    std::io::BufWriter::new(f),
                    flate2::Compression::fast(),
                );
                let s = write_trace(&cfg, &mut enc)?;
                enc.finish().ctx(format!("write {}", out.display()))?;
                s
            } else {
                write_trace(&cfg, std::io::BufWriter::new(f))?
            };
            let dt = t.elapsed().as_secs_f64();
            eprintln!(
                "wrote {} sessions, {} steps to {} in {:.2} s ({:.0} steps/s)",
                sum.sessions,
                sum.steps,
                out.display(),
                dt,
                sum.steps as f64 / dt.max(1e-9)
            );
            Ok(())
        }
        SimCommand::Trace {
            cmd: TraceCommand::Stats { file, json, taus },
        } => {
            let mut table = Vec::with_capacity(taus.len());
            for t in taus.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
                let ns = crate::units::parse_duration_ns(t)
                    .map_err(|e| crate::Error::invalid(format!("--taus {t:?}: {}", e.message())))?;
                table.push(i64::try_from(ns).map_err(|_| {
                    crate::Error::invalid(format!("--taus {t:?}: longer than 292 years"))
                })?);
            }
            let mut st = TraceStats::with_table(&table);
            let sum = trace::read_file(&file, |s, tools| {
                st.add(&s, tools);
                Ok(())
            })?;
            if sum.rows == 0 {
                return Err(trace::empty_trace(&file, &sum));
            }
            if sum.long_lines > 0 {
                eprintln!("{}", trace::long_lines_warning(&file.display(), &sum));
            }
            if sum.bad_lines > 0 {
                eprintln!(
                    "{}: {} malformed lines skipped",
                    file.display(),
                    sum.bad_lines
                );
                for b in sum.bad.iter().take(5) {
                    eprintln!("  line {}: {}", b.line, b.reason);
                }
            }
            print!("{}", st.render());
            if let Some(j) = json {
                let mut v = st.to_json();
                v["malformed_lines"] = sum.bad_lines.into();
                v["long_lines"] = sum.long_lines.into();
                std::fs::write(
                    &j,
                    serde_json::to_vec_pretty(&v)
                        .map_err(|e| crate::Error::internal(e.to_string()))?,
                )
                .ctx(format!("write {}", j.display()))?;
            }
            Ok(())
        }
        SimCommand::Trace {
            cmd: TraceCommand::Predict { file, no_hints },
        } => super::predict_eval::run_file(&file, !no_hints),
        SimCommand::Replay(a) => super::replay_cli(a),
        SimCommand::Tune(a) => super::tune::run_cli(*a),
    }
}
