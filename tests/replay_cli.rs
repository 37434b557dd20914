//! The `replay` / `trace` subcommands through `kvpark::sim::cli::run`, parsed
//! from argument lists exactly as the `kvpark` binary parses them.

use clap::Parser;
use kvpark::sim::cli::{run, SimCommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: SimCommand,
}

fn kvpark(args: &[&str]) -> kvpark::Result<()> {
    let mut v = vec!["kvpark"];
    v.extend_from_slice(args);
    run(Cli::try_parse_from(v).expect("arguments parse").cmd)
}

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/tracelab-example.jsonl"
);

#[test]
fn synth_then_stats_then_replay_with_json_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.jsonl.gz");
    let fs = f.to_str().unwrap();
    kvpark(&[
        "trace",
        "synth",
        "--sessions",
        "30",
        "--seed",
        "3",
        "--out",
        fs,
    ])
    .unwrap();
    let j = dir.path().join("stats.json");
    kvpark(&["trace", "stats", fs, "--json", j.to_str().unwrap()]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert_eq!(v["sessions"], 30);
    assert_eq!(v["malformed_lines"], 0);
    assert!(v["sweep"].as_array().unwrap().len() > 10);

    let out = dir.path().join("r.json");
    let plots = dir.path().join("plots");
    kvpark(&[
        "replay",
        "--trace",
        fs,
        "--policies",
        "gpu-lru,ttl:1m,oracle",
        "--time-compression",
        "2",
        "--json",
        out.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let names: Vec<&str> = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["policy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gpu-lru", "ttl:1m", "oracle"]);
    assert_eq!(v["time_compression"], 2.0);
    for f in ["hit_vs_ttl.svg", "ttft_cdf.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{f}"
        );
    }
    let cdf = std::fs::read_to_string(plots.join("ttft_cdf.svg")).unwrap();
    assert_eq!(
        cdf.matches("<polyline").count(),
        3,
        "one TTFT curve per policy"
    );
}

#[test]
fn replay_reads_the_real_example() {
    kvpark(&[
        "replay",
        "--trace",
        EXAMPLE,
        "--policies",
        "vllm-offload,lmcache-lru",
    ])
    .unwrap();
}

#[test]
fn errors_name_the_problem() {
    let e = kvpark(&["replay", "--trace", EXAMPLE, "--policies", "kvpark"]).unwrap_err();
    assert!(
        e.message().contains("unknown policy \"kvpark\"") && e.message().contains("oracle"),
        "{}",
        e.message()
    );
    let e = kvpark(&["replay", "--trace", "/nonexistent.jsonl"]).unwrap_err();
    assert!(
        e.message().contains("/nonexistent.jsonl"),
        "{}",
        e.message()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("dep.json");
    std::fs::write(&d, r#"{"kv_bytes_per_token": 1}"#).unwrap();
    let e = kvpark(&[
        "replay",
        "--trace",
        EXAMPLE,
        "--deployment",
        d.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(e.message().contains("missing field"), "{}", e.message());
    let e = kvpark(&["replay", "--trace", EXAMPLE, "--time-compression", "0"]).unwrap_err();
    assert!(
        e.message().contains("--time-compression"),
        "{}",
        e.message()
    );
    let junk = dir.path().join("junk.jsonl");
    std::fs::write(&junk, "not json\n").unwrap();
    let e = kvpark(&["trace", "stats", junk.to_str().unwrap()]).unwrap_err();
    assert!(e.message().contains("line 1"), "{}", e.message());
}

#[test]
fn deployment_sizes_out_of_range_are_named_before_the_replay() {
    use kvpark::sim::deploy::DEFAULT_JSON;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("dep.json");
    for (from, to, key) in [
        (
            "\"kv_bytes_per_token\": 131072",
            "\"kv_bytes_per_token\": 18446744073709551615",
            "kv_bytes_per_token",
        ),
        (
            "\"gpu_kv_bytes\": \"56GiB\"",
            "\"gpu_kv_bytes\": 0",
            "gpu_kv_bytes",
        ),
    ] {
        let json = DEFAULT_JSON.replace(from, to);
        assert_ne!(json, DEFAULT_JSON);
        std::fs::write(&d, &json).unwrap();
        let e = kvpark(&[
            "replay",
            "--trace",
            EXAMPLE,
            "--policies",
            "lmcache-lru",
            "--deployment",
            d.to_str().unwrap(),
        ])
        .unwrap_err();
        assert_eq!(e.kind(), kvpark::ErrorKind::Config, "{key}");
        assert!(e.message().contains(key), "{key}: {}", e.message());
    }
}
