//! The `replay` / `trace` subcommands through `kvpark::sim::cli::run`, parsed
//! from argument lists exactly as the `kvpark` binary parses them.

#[path = "common/cli.rs"]
mod cli;
use cli::kvpark;

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
fn blocks_replays_the_same_steps_through_the_block_planner() {
    let dir = tempfile::tempdir().unwrap();
    let run = |blocks: bool| {
        let out = dir.path().join(format!("r{blocks}.json"));
        let mut args = vec![
            "replay",
            "--trace",
            EXAMPLE,
            "--policies",
            "lmcache-lru,oracle",
            "--json",
            out.to_str().unwrap(),
        ];
        if blocks {
            args.push("--blocks");
        }
        kvpark(&args).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        v
    };
    let (s, b) = (run(false), run(true));
    assert_eq!(s["planner"], "sessions");
    assert_eq!(b["planner"], "blocks");
    for i in 0..2 {
        let (ps, pb) = (&s["policies"][i], &b["policies"][i]);
        assert_eq!(ps["policy"], pb["policy"]);
        assert_eq!(ps["steps"], pb["steps"], "{}", ps["policy"]);
        assert!(pb["steps"].as_u64().unwrap() > 0);
    }
}

#[test]
fn errors_name_the_problem() {
    let e = kvpark(&["replay", "--trace", EXAMPLE, "--policies", "kvpark:fast"]).unwrap_err();
    assert!(
        e.message().contains("unknown policy \"kvpark:fast\"") && e.message().contains("oracle"),
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

/// `trace stats --json` on the 19 example rows. Every expected value was
/// computed independently of kvpark by `tests/data/study_quantities.py` (a
/// reading of DESIGN §6 in Python: `json.loads` rows, `datetime` timestamps in
/// ms, numpy's `percentile` and `logspace`, `argmin` for the first minimum),
/// `python3 tests/data/study_quantities.py tests/data/tracelab-example.jsonl`,
/// and copied here; they agree to the last digit.
#[test]
fn stats_json_of_the_example_matches_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("stats.json");
    kvpark(&[
        "trace",
        "stats",
        EXAMPLE,
        "--json",
        j.to_str().unwrap(),
        "--taus",
        "10s,1m",
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    let f = |p: &str| {
        v.pointer(p)
            .and_then(|x| x.as_f64())
            .unwrap_or_else(|| panic!("{p} missing in {v}"))
    };
    assert_eq!(v["steps"], 19);
    assert_eq!(v["counted"], 17);
    assert_eq!(f("/real_hit/all"), 0.9301695962880173);
    assert_eq!(f("/real_hit/user"), 0.9405279908977691);
    assert_eq!(f("/real_hit/tool"), 0.928515846500907);
    assert_eq!(f("/optimal_hit/all"), 0.9813532987875093);
    assert_eq!(f("/optimal_hit/user"), 0.9998154953181937);
    assert_eq!(f("/optimal_hit/tool"), 0.9784057519202115);
    assert_eq!(f("/observed_amplification"), 3.7449199682143264);
    // the grid point 10^(81·log10(14400)/259) of numpy.logspace(0, log10(14400), 260)
    assert_eq!(f("/effective_eviction_s"), 19.975227977960795);
    let w = "/distributions/human_input_wait_s";
    assert_eq!(f(&format!("{w}/count")), 3.0);
    for (p, want) in [
        ("p10", 8.7388),
        ("p25", 12.3475),
        ("p50", 18.362),
        ("p75", 19.1375),
        ("p90", 19.6028),
        ("p99", 19.88198),
    ] {
        assert_eq!(f(&format!("{w}/{p}")), want, "human_input_wait {p}");
    }
    let t = "/distributions/tool_latency_s";
    assert_eq!(f(&format!("{t}/count")), 13.0);
    for (p, want) in [
        ("p10", 0.03400000000000002),
        ("p25", 0.145),
        ("p50", 1.002),
        ("p75", 12.684),
        ("p90", 18.651400000000002),
        ("p99", 21.205399999999997),
    ] {
        assert_eq!(f(&format!("{t}/{p}")), want, "tool latency {p}");
    }
    // --taus sets the table; the sweep sums are those of trace_reader.rs
    let table = v["table"].as_array().unwrap();
    assert_eq!(table.len(), 2);
    assert_eq!(table[0]["tau_s"], 10.0);
    assert_eq!(table[0]["hit"].as_f64().unwrap(), 254_841.0 / 472_416.0);
    assert_eq!(table[1]["hit"].as_f64().unwrap(), 463_607.0 / 472_416.0);
    assert!(kvpark(&["trace", "stats", EXAMPLE, "--taus", "5 fortnights"]).is_err());
}
