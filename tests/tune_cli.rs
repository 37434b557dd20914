//! `kvpark tune` through `kvpark::sim::cli::run`, parsed from argument lists
//! as the `kvpark` binary parses them: the printed config is accepted by the
//! connector's validation as is, the Pareto set is non-dominated, and every
//! file in `deployments/` is both a deployment and a cluster file.

use kvpark::config::Config;
use kvpark::sim::deploy::Deployment;
use serde_json::Value;

#[path = "common/cli.rs"]
mod cli;
use cli::kvpark;

fn deployments() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deployments")
}

/// (cost, p90, amplification) of a point of the `--json` output.
fn objectives(p: &Value) -> [f64; 3] {
    [
        p["usd_per_hour"].as_f64().unwrap(),
        p["ttft_user_p90_s"].as_f64().unwrap(),
        p["amplification"].as_f64().unwrap(),
    ]
}

fn dominates(a: &[f64; 3], b: &[f64; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x <= y) && a.iter().zip(b).any(|(x, y)| x < y)
}

#[test]
fn tune_prints_a_config_the_connector_accepts_and_a_non_dominated_front() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("extra.json");
    let json = dir.path().join("tune.json");
    let svg = dir.path().join("tune.svg");
    let cluster = deployments().join("cluster-1xh100-1tb-2xgen4.json");
    kvpark(&[
        "tune",
        "--cluster",
        cluster.to_str().unwrap(),
        "--sessions",
        "120",
        "--host-steps",
        "3",
        "--nvme-steps",
        "2",
        "--policies",
        "lmcache-lru,vllm-offload,kvpark,gpu-lru",
        "--knobs",
        "margin=1.25,4",
        "--nvme-dir",
        "/mnt/nvme0/kvpark",
        "--config-out",
        cfg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ])
    .unwrap();

    // the config, as written, passes the connector's validation
    let text = std::fs::read(&cfg).unwrap();
    let c = Config::from_json(&text).unwrap();
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&text).unwrap(),
        v["kv_connector_extra_config"]
    );
    let pts = v["points"].as_array().unwrap();
    // 3 host × 2 NVMe sizes × 2 LRU policies; kvpark: 3 host × (no NVMe,
    // then NVMe at 2 knob settings); gpu-lru once
    assert_eq!(pts.len(), 3 * 2 * 2 + 3 * (1 + 2) + 1);
    let knobbed: Vec<&str> = pts
        .iter()
        .filter_map(|p| p["policy"].as_str())
        .filter(|p| p.starts_with("kvpark@"))
        .collect();
    assert_eq!(knobbed.len(), 6, "{knobbed:?}");
    assert!(knobbed
        .iter()
        .all(|p| *p == "kvpark@margin=1.25" || *p == "kvpark@margin=4"));
    let rec = &pts[v["recommended"].as_u64().unwrap() as usize];
    assert_eq!(rec["pareto"], true);
    assert_eq!(rec["baseline"], false);
    // the policy and its knobs, as the connector reads them back
    let name = rec["policy"].as_str().unwrap();
    let (base, knobs) = name.split_once('@').unwrap_or((name, ""));
    assert_eq!(c.policy, base);
    assert_eq!(c.kvpark.suffix(), knobs);
    assert_eq!(c.host_bytes, rec["host_bytes"].as_u64().unwrap());
    if rec["nvme_bytes"].as_u64().unwrap() > 0 && rec["nvme_used"] == true {
        assert_eq!(c.nvme_bytes, rec["nvme_bytes"].as_u64().unwrap());
        assert_eq!(
            c.nvme_dir.as_deref(),
            Some(std::path::Path::new("/mnt/nvme0/kvpark"))
        );
    } else {
        assert_eq!(c.nvme_dir, None);
    }
    let cluster_dep = Deployment::from_json(&std::fs::read_to_string(&cluster).unwrap()).unwrap();
    for p in pts {
        assert!(p["host_bytes"].as_u64().unwrap() <= cluster_dep.pinnable_host_bytes);
        assert!(p["nvme_bytes"].as_u64().unwrap() <= cluster_dep.nvme_capacity_bytes);
    }

    // the front: no runnable point dominates a front point, and every
    // runnable point off the front is dominated by one on it or ties with
    // one (of equal points the front keeps one)
    let runnable: Vec<&Value> = pts.iter().filter(|p| p["baseline"] == false).collect();
    let front: Vec<&Value> = runnable
        .iter()
        .copied()
        .filter(|p| p["pareto"] == true)
        .collect();
    assert!(!front.is_empty());
    for f in &front {
        for p in &runnable {
            assert!(
                !dominates(&objectives(p), &objectives(f)),
                "{p} dominates {f}"
            );
        }
    }
    for p in runnable.iter().filter(|p| p["pareto"] == false) {
        assert!(
            front
                .iter()
                .any(|f| dominates(&objectives(f), &objectives(p))
                    || (objectives(f) == objectives(p) && f["codec"] == p["codec"])),
            "{p} is off the front but not dominated"
        );
    }
    // the recommendation is the cheapest front point within 5% of the best p90
    let best = front
        .iter()
        .map(|p| objectives(p)[1])
        .fold(f64::INFINITY, f64::min);
    for f in &front {
        if objectives(f)[1] <= best * 1.05 {
            assert!(
                objectives(rec)[0] <= objectives(f)[0],
                "{f} is cheaper than {rec}"
            );
        }
    }
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("recommended"));
}

#[test]
fn every_deployment_file_is_a_cluster_file_and_tunes() {
    let mut n = 0;
    for e in std::fs::read_dir(deployments()).unwrap() {
        let p = e.unwrap().path();
        if p.extension() != Some(std::ffi::OsStr::new("json")) {
            continue;
        }
        n += 1;
        let d = Deployment::from_json(&std::fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(d.host_bytes <= d.pinnable_host_bytes, "{}", p.display());
        assert!(d.nvme_bytes <= d.nvme_capacity_bytes, "{}", p.display());
        let cfg = tempfile::NamedTempFile::new().unwrap();
        kvpark(&[
            "tune",
            "--cluster",
            p.to_str().unwrap(),
            "--sessions",
            "40",
            "--host-steps",
            "2",
            "--nvme-steps",
            "2",
            "--policies",
            "lmcache-lru",
            "--config-out",
            cfg.path().to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let c = Config::from_json(&std::fs::read(cfg.path()).unwrap()).unwrap();
        // the connector's sizes are per rank
        assert!(c.host_bytes * d.gpu_count as u64 <= d.pinnable_host_bytes);
        // and the file replays as a deployment
        kvpark(&[
            "replay",
            "--deployment",
            p.to_str().unwrap(),
            "--sessions",
            "20",
            "--policies",
            "lmcache-lru",
        ])
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    // the three deployments and the three example clusters
    assert!(n >= 6, "{n} files");
    for (name, j) in kvpark::sim::tune::CLUSTERS {
        let on_disk = std::fs::read_to_string(deployments().join(name)).unwrap();
        assert_eq!(on_disk, j, "{name}");
    }
}

#[test]
fn a_bad_cluster_file_is_an_error_naming_the_key() {
    let good = kvpark::sim::tune::CLUSTERS[0].1;
    let cases = [
        ("\"gpu_count\": 1", "\"gpu_count\": 0", "gpu_count"),
        (
            "\"pinnable_host_bytes\": \"768GiB\"",
            "\"pinnable_host_bytes\": \"32GiB\"",
            "host_bytes",
        ),
        ("\"capacity\": \"3840GB\"", "\"capacity\": \"lots\"", "drives[0].capacity"),
        ("\"read_gbps\": 6.8", "\"read_gbps\": -1", "drives[0].read_gbps"),
        (
            "\"host_bytes\": \"64GiB\",",
            "\"host_bytes\": \"64GiB\", \"nvme_bytes\": \"9TB\",",
            "nvme_bytes",
        ),
        (
            "\"pcie_h2d_gbps\": 25.0,",
            "\"pcie_h2d_gbps\": 25.0, \"nvme_read_gbps\": 20,",
            "nvme_read_gbps",
        ),
        ("\"dram_usd_per_gb\": 4.0", "\"dram_usd_per_gb\": -4.0", "dram_usd_per_gb"),
        ("\"amortize_years\": 3", "\"amortize_years\": 0", "amortize_years"),
        ("\"gpu_usd_per_hour\"", "\"gpu_usd_per_hr\"", "gpu_usd_per_hr"),
        (
            "\"prefill_halving_context_tokens\": 30000,",
            "\"prefill_halving_context_tokens\": 30000, \"prefill_tokens_per_s_by_context\": [[0, 1], [1, 0.5]],",
            "prefill_tokens_per_s_by_context",
        ),
    ];
    for (from, to, key) in cases {
        let bad = good.replacen(from, to, 1);
        assert_ne!(bad, good, "{from}");
        let e = Deployment::from_json(&bad).unwrap_err();
        assert_eq!(e.kind(), kvpark::ErrorKind::Config, "{key}");
        assert!(e.message().contains(key), "{key}: {}", e.message());
    }
    // through the command: the error names the file and the key
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.json");
    std::fs::write(&f, good.replacen("\"gpu_count\": 1", "\"gpu_count\": 0", 1)).unwrap();
    let e = kvpark(&["tune", "--cluster", f.to_str().unwrap()]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("gpu_count") && msg.contains("bad.json"),
        "{msg}"
    );
}

#[test]
fn prefill_by_context_fits_the_two_scalars() {
    // points on tps(c) = 20000 / (1 + c / 40000)
    let j = kvpark::sim::deploy::DEFAULT_JSON.replace(
        "\"prefill_tokens_per_s\": 16000,\n  \"prefill_halving_context_tokens\": 30000,",
        "\"prefill_tokens_per_s_by_context\": [[0, 20000], [40000, 10000], [120000, 5000]],",
    );
    assert_ne!(j, kvpark::sim::deploy::DEFAULT_JSON);
    let d = Deployment::from_json(&j).unwrap();
    assert!((d.prefill_tps - 20000.0).abs() < 1e-6, "{}", d.prefill_tps);
    assert!(
        (d.prefill_halving - 40000.0).abs() < 1e-6,
        "{}",
        d.prefill_halving
    );
}

#[test]
fn unknown_policy_or_codec_is_refused_before_the_sweep() {
    let cluster = deployments().join("cluster-cpu-2core.json");
    let c = cluster.to_str().unwrap();
    let e = kvpark(&["tune", "--cluster", c, "--policies", "lmcache-lru,fifo"]).unwrap_err();
    assert!(e.to_string().contains("fifo"), "{e}");
    let e = kvpark(&["tune", "--cluster", c, "--codecs", "zip"]).unwrap_err();
    assert!(e.to_string().contains("zip"), "{e}");
}

#[test]
fn tune_for_kv_events_sweeps_the_kvpark_that_hears_them_and_recommends_kvpark() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("extra.json");
    let json = dir.path().join("tune.json");
    let cluster = deployments().join("cluster-1xh100-1tb-2xgen4.json");
    kvpark(&[
        "tune",
        "--cluster",
        cluster.to_str().unwrap(),
        "--sessions",
        "120",
        "--host-steps",
        "2",
        "--nvme-steps",
        "2",
        "--policies",
        "kvpark",
        "--knobs",
        "margin=1.25,4",
        "--kv-events",
        "--config-out",
        cfg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ])
    .unwrap();
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let pts = v["points"].as_array().unwrap();
    // 2 host × (no NVMe, then NVMe at 2 knob settings), all of them the
    // kvpark that hears vLLM's KV-cache events, none a baseline
    assert_eq!(pts.len(), 2 * (1 + 2));
    for p in pts {
        assert!(
            p["policy"]
                .as_str()
                .unwrap()
                .starts_with("kvpark:gpu-events"),
            "{p}"
        );
        assert_eq!(p["baseline"], false);
    }
    // the config names the connector's kvpark (it switches by itself)
    let c = Config::from_json(&std::fs::read(&cfg).unwrap()).unwrap();
    assert_eq!(c.policy, "kvpark");
}
