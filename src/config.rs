//! kvpark configuration: the `kv_connector_extra_config` object.
//!
//! Every key is validated at engine start: an unknown key or a bad value is a
//! [`crate::ErrorKind::Config`] error whose message names the key. Sizes
//! accept units ("8GiB"), durations accept "250ms", "5m". Environment
//! variables are used only for paths (`KVPARK_NVME_DIR`).

use crate::codec::CodecTag;
use crate::copy::select::{Rule, Selector};
use crate::error::{Error, Result};
use crate::policy::{Knobs, Variant};
use crate::units::{parse_duration_ns, parse_size};
use serde::Serialize;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// When the NVMe store calls fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Never (the OS decides; a crash may lose recent records, never serve torn ones).
    Never,
    /// When a segment is sealed.
    Segment,
    /// After every record.
    Record,
}

/// Validated configuration (all defaults filled in).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// Host (pinned) arena size per rank, bytes.
    pub host_bytes: u64,
    /// File (in shared memory) backing the host arena, per rank
    /// `<file>.rank<N>` with its slot table `<file>.rank<N>.slots`, so a
    /// restarted worker finds what it parked; `None`: anonymous memory.
    pub host_file: Option<PathBuf>,
    /// NVMe store directory; `None` disables the NVMe tier.
    pub nvme_dir: Option<PathBuf>,
    /// NVMe capacity per rank, bytes.
    pub nvme_bytes: u64,
    /// NVMe segment file size, bytes.
    pub nvme_segment_bytes: u64,
    /// Codec for NVMe records.
    #[serde(serialize_with = "ser_codec")]
    pub codec: CodecTag,
    /// Host-resident hits up to this many bytes load synchronously; larger or
    /// NVMe-resident hits load asynchronously.
    pub sync_load_budget_bytes: u64,
    /// Whether sync loads scatter layer by layer beside the forward
    /// (`wait_for_layer_load` waits for its layer only) or every layer
    /// before the forward starts.
    #[serde(serialize_with = "ser_layerwise")]
    pub layerwise_load: Layerwise,
    /// Copy mechanism rules for KV caches on a GPU, tried before the built-in
    /// table (`copy::select`, documented in `copy::cuda::plan`); `None`: the built-in table.
    pub copy_strategy: Option<Vec<Rule>>,
    /// Placement policy name.
    pub policy: String,
    /// The `kvpark` policy's knobs (the `kvpark` key; defaults for other
    /// policies).
    #[serde(serialize_with = "ser_knobs")]
    pub kvpark: Knobs,
    /// NVMe I/O threads per rank.
    pub io_threads: u32,
    /// fsync policy of the NVMe store.
    pub fsync: Fsync,
    /// Smallest prefix worth parking, in blocks.
    pub min_park_blocks: u32,
    /// Session idle time after which a session's state is forgotten (ns).
    #[serde(rename = "session_ttl", serialize_with = "ser_ns")]
    pub session_ttl_ns: u64,
    /// The model the KV belongs to (name or path, revision, dtypes, KV
    /// geometry, vLLM's block-hash algorithm), as the connector derives it
    /// from vLLM's config; part of every block key, so one model's blocks
    /// are never served to another. Empty: no model named.
    pub model_identity: String,
}

/// The `layerwise_load` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layerwise {
    /// Layer by layer when the KV caches are on a CUDA device (the copies run
    /// on the GPU's copy engines, beside the forward's kernels); whole when
    /// they are in host memory (vLLM's CPU backend), where the copy shares
    /// the cores with the forward: there it took ~10× longer beside the
    /// forward than up front, and TTFT showed no consistent difference
    /// either way (BENCHMARKS.md, vLLM section).
    Auto,
    /// Always layer by layer.
    On,
    /// Always every layer before the forward.
    Off,
}

impl Layerwise {
    /// Whether loads into caches on a device (`on_device`) go layer by layer.
    pub fn enabled(self, on_device: bool) -> bool {
        match self {
            Layerwise::Auto => on_device,
            Layerwise::On => true,
            Layerwise::Off => false,
        }
    }
}

fn ser_layerwise<S: serde::Serializer>(
    v: &Layerwise,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Layerwise::Auto => s.serialize_str("auto"),
        Layerwise::On => s.serialize_bool(true),
        Layerwise::Off => s.serialize_bool(false),
    }
}

fn ser_ns<S: serde::Serializer>(ns: &u64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{ns}ns"))
}

fn ser_knobs<S: serde::Serializer>(k: &Knobs, s: S) -> std::result::Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&k.to_json_full(), s)
}

fn ser_codec<S: serde::Serializer>(c: &CodecTag, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(c.name())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host_bytes: 1 << 30,
            host_file: None,
            nvme_dir: None,
            nvme_bytes: 64 << 30,
            nvme_segment_bytes: 256 << 20,
            codec: CodecTag::ExpHuff,
            sync_load_budget_bytes: 256 << 20,
            layerwise_load: Layerwise::Auto,
            copy_strategy: None,
            policy: "lmcache-lru".into(),
            kvpark: Knobs::default(),
            io_threads: 4,
            fsync: Fsync::Segment,
            min_park_blocks: 1,
            session_ttl_ns: 24 * 3600 * 1_000_000_000,
            model_identity: String::new(),
        }
    }
}

/// Smallest NVMe segment file.
pub const MIN_SEGMENT_BYTES: u64 = 1 << 20;
/// Largest NVMe segment file (offsets inside a segment stay within 32 bits).
pub const MAX_SEGMENT_BYTES: u64 = 4 << 30;

/// Policies the connector can run (the replay also has calibration
/// baselines and the oracle, which need the future of a trace).
pub const CONNECTOR_POLICIES: &[&str] = &[
    "lmcache-lru",
    "vllm-offload",
    "vllm-offload:arc",
    "kvpark",
    "kvpark:recency",
    "kvpark:no-prefetch",
    "kvpark:no-nvme",
    "kvpark:no-hints",
];

/// The keys kvpark accepts, with a one-line description (README config table).
pub const KEYS: &[(&str, &str, &str)] = &[
    ("host_bytes", "\"1GiB\"", "pinned host arena per rank"),
    (
        "host_file",
        "null",
        "shared-memory file backing the host arena (e.g. \"/dev/shm/kvpark\"; per rank `<file>.rank<N>` plus a `.slots` table) so a restarted engine finds what it parked in host memory; null = anonymous memory",
    ),
    (
        "nvme_dir",
        "null",
        "NVMe store directory (null = no NVMe tier); env KVPARK_NVME_DIR overrides",
    ),
    ("nvme_bytes", "\"64GiB\"", "NVMe capacity per rank"),
    (
        "nvme_segment_bytes",
        "\"256MiB\"",
        "segment file size (1MiB..=4GiB, a multiple of 4096)",
    ),
    (
        "codec",
        "\"exp-huff\"",
        "NVMe record codec: exp-huff (lossless, Huffman-coded exponent plane: 1.45x on real bf16 KV), none, lz4, lz4-planes (lossless), or fp8-lossy (LOSSY: per-group scaled e4m3, 2x on bf16, bf16/fp32 KV only)",
    ),
    (
        "sync_load_budget_bytes",
        "\"256MiB\"",
        "host hits up to this size load before the forward; larger or NVMe hits load async",
    ),
    (
        "layerwise_load",
        "\"auto\"",
        "true: sync loads move layer by layer beside the forward (`wait_for_layer_load` waits for its own layer only); false: every layer before the forward; auto: true for KV caches on a GPU, false on vLLM's CPU backend (where the copy competes with the forward for the cores); unless false, kvpark asks vLLM for PIECEWISE CUDA graphs (a FULL graph replay skips wait_for_layer_load)",
    ),
    (
        "copy_strategy",
        "null",
        "GPU copy mechanism: a name (kernel_mapped, kernel_staged, dma_batch, dma_each) or an array of rules by direction, layout and size, such as the `rules` that `scripts/gpu/check_and_bench.py` derives from measurements; null = the built-in table",
    ),
    ("policy", "\"lmcache-lru\"", "placement policy: lmcache-lru (host + NVMe write-through, LRU), vllm-offload, vllm-offload:arc (host only), kvpark (gap prediction: eviction by expected return, NVMe → host prefetch ahead of it; ablations kvpark:recency, kvpark:no-prefetch, kvpark:no-nvme, kvpark:no-hints)"),
    (
        "kvpark",
        "{}",
        "knobs of the kvpark policies: prefetch_margin (2: a prefetch displaces only host copies expected back later than this many times its own wait), check_every (\"10s\": checkpoints, each may prefetch, at most this far apart in a suspend's first hour), first_check (\"500ms\": the first checkpoint), prefetch_until (1: a session is prefetched only while its wait is below this quantile of its predicted gap, past it it counts as gone; 0.9 suits a vLLM whose clients do not come back to every session, see BENCHMARKS.md); `kvpark tune` recommends them",
    ),
    (
        "io_threads",
        "4",
        "NVMe I/O threads per rank; each encodes the records it writes (exp-huff codes ~1.5 GB/s per core: 3 keep up with a 3.5 GB/s drive)",
    ),
    ("fsync", "\"segment\"", "never, segment, record"),
    (
        "min_park_blocks",
        "1",
        "shortest prefix worth parking, in blocks",
    ),
    ("session_ttl", "\"24h\"", "forget a session idle this long"),
    (
        "model_identity",
        "null",
        "the model the parked KV belongs to; the connector fills it from vLLM's config (model, revision, dtypes, KV geometry, block-hash algorithm) and every block key covers it, so a store written by one model is never served to another (the stores carry a label, and an engine that opens another model's store says so once); set it only when driving the C ABI yourself",
    ),
];

fn as_size(key: &str, v: &Value) -> Result<u64> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| Error::config(format!("{key}: expected a non-negative size, got {n}"))),
        Value::String(s) => parse_size(s).map_err(|e| e.context(key)),
        _ => Err(Error::config(format!(
            "{key}: expected a size such as \"8GiB\" or a number of bytes, got {v}"
        ))),
    }
}

fn as_str<'a>(key: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str()
        .ok_or_else(|| Error::config(format!("{key}: expected a string, got {v}")))
}

impl Config {
    /// Parses and validates a JSON object (`{}` = all defaults).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let v: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice(bytes).map_err(|e| {
                Error::config(format!("kv_connector_extra_config is not valid JSON: {e}"))
            })?
        };
        let Value::Object(map) = v else {
            return Err(Error::config(
                "kv_connector_extra_config must be a JSON object",
            ));
        };
        let mut c = Config::default();
        for (k, v) in &map {
            match k.as_str() {
                "host_bytes" => c.host_bytes = as_size(k, v)?,
                "host_file" => {
                    c.host_file = match v {
                        Value::Null => None,
                        _ => Some(PathBuf::from(as_str(k, v)?)),
                    }
                }
                "nvme_dir" => {
                    c.nvme_dir = match v {
                        Value::Null => None,
                        _ => Some(PathBuf::from(as_str(k, v)?)),
                    }
                }
                "nvme_bytes" => c.nvme_bytes = as_size(k, v)?,
                "nvme_segment_bytes" => c.nvme_segment_bytes = as_size(k, v)?,
                "codec" => c.codec = CodecTag::parse(as_str(k, v)?)?,
                "sync_load_budget_bytes" => c.sync_load_budget_bytes = as_size(k, v)?,
                "layerwise_load" => {
                    c.layerwise_load = match v {
                        Value::Bool(true) => Layerwise::On,
                        Value::Bool(false) => Layerwise::Off,
                        Value::String(x) if x == "auto" => Layerwise::Auto,
                        _ => {
                            return Err(Error::config(format!(
                                "{k}: expected true, false or \"auto\", got {v}"
                            )))
                        }
                    }
                }
                "copy_strategy" => {
                    c.copy_strategy = match v {
                        Value::Null => None,
                        _ => Some(Selector::rules_from_config(v)?),
                    }
                }
                "policy" => {
                    let p = as_str(k, v)?;
                    if !CONNECTOR_POLICIES.contains(&p) {
                        let knobs = if p.starts_with("kvpark") && p.contains('@') {
                            "; give the kvpark policy's knobs in the \"kvpark\" object"
                        } else if p == "kvpark:gpu-events" {
                            "; \"kvpark\" becomes kvpark:gpu-events by itself when vLLM publishes \
                             its KV-cache events (kv_events_config with the zmq publisher)"
                        } else {
                            ""
                        };
                        return Err(Error::config(format!(
                            "policy: unknown policy {p:?} (available: {}){knobs}",
                            CONNECTOR_POLICIES.join(", ")
                        )));
                    }
                    c.policy = p.into();
                }
                "kvpark" => c.kvpark = Knobs::from_json(v)?,
                "io_threads" => {
                    c.io_threads = v.as_u64().filter(|n| (1..=64).contains(n)).ok_or_else(|| {
                        Error::config(format!("{k}: expected an integer 1..=64, got {v}"))
                    })? as u32
                }
                "fsync" => {
                    c.fsync = match as_str(k, v)? {
                        "never" => Fsync::Never,
                        "segment" => Fsync::Segment,
                        "record" => Fsync::Record,
                        s => {
                            return Err(Error::config(format!(
                                "fsync: unknown value {s:?} (never, segment, record)"
                            )))
                        }
                    }
                }
                "min_park_blocks" => {
                    c.min_park_blocks =
                        v.as_u64()
                            .filter(|n| *n <= u32::MAX as u64)
                            .ok_or_else(|| {
                                Error::config(format!("{k}: expected a block count, got {v}"))
                            })? as u32
                }
                "session_ttl" => {
                    c.session_ttl_ns = match v {
                        Value::String(s) => parse_duration_ns(s).map_err(|e| e.context(k))?,
                        _ => {
                            return Err(Error::config(format!(
                                "{k}: expected a duration such as \"24h\", got {v}"
                            )))
                        }
                    }
                }
                "model_identity" => {
                    c.model_identity = match v {
                        Value::Null => String::new(),
                        Value::String(x) => x.clone(),
                        // An object is kept in its canonical (sorted-key) form.
                        Value::Object(_) => v.to_string(),
                        _ => {
                            return Err(Error::config(format!(
                                "{k}: expected a string or an object, got {v}"
                            )))
                        }
                    }
                }
                other => {
                    let known: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
                    return Err(Error::config(format!(
                        "unknown key {other:?} in kv_connector_extra_config (known keys: {})",
                        known.join(", ")
                    )));
                }
            }
        }
        if let Ok(dir) = std::env::var("KVPARK_NVME_DIR") {
            if !dir.is_empty() {
                c.nvme_dir = Some(PathBuf::from(dir));
            }
        }
        c.check()?;
        Ok(c)
    }

    /// Cross-key and range checks, after every key was read.
    fn check(&self) -> Result<()> {
        if self.host_bytes == 0 {
            return Err(Error::config("host_bytes: must be > 0"));
        }
        if self.kvpark != Knobs::default() && !self.predicts_gaps() {
            return Err(Error::config(format!(
                "kvpark: knobs of the kvpark policy given, but policy is {:?}",
                self.policy
            )));
        }
        for (key, path) in [("host_file", &self.host_file), ("nvme_dir", &self.nvme_dir)] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(Error::config(format!(
                    "{key}: empty path (give a path, or null to go without it)"
                )));
            }
        }
        if self.nvme_bytes == 0 {
            return Err(Error::config(
                "nvme_bytes: must be > 0 (set nvme_dir to null to go without an NVMe tier)",
            ));
        }
        let seg = self.nvme_segment_bytes;
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&seg) {
            return Err(Error::config(format!(
                "nvme_segment_bytes: {seg} is outside 1MiB..=4GiB"
            )));
        }
        if seg % 4096 != 0 {
            return Err(Error::config(format!(
                "nvme_segment_bytes: {seg} is not a multiple of 4096 (records are 4 KiB-aligned)"
            )));
        }
        Ok(())
    }

    /// Whether the policy is one of the `kvpark` policies (gap prediction,
    /// per-session state; the `kvpark` knobs apply to it).
    pub fn predicts_gaps(&self) -> bool {
        Variant::from_name(&self.policy).is_some()
    }

    /// The host arena file of `rank` (`<host_file>.rank<N>`), if configured.
    pub fn host_file_for(&self, rank: u32) -> Option<PathBuf> {
        self.host_file.as_ref().map(|f| {
            let mut s = f.as_os_str().to_owned();
            s.push(format!(".rank{rank}"));
            PathBuf::from(s)
        })
    }

    /// The normalized JSON (every key, sizes in bytes).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::select::Strategy;

    #[test]
    fn defaults_and_units() {
        let c =
            Config::from_json(br#"{"host_bytes":"2GiB","codec":"lz4","fsync":"record"}"#).unwrap();
        assert_eq!(c.host_bytes, 2 << 30);
        assert_eq!(c.codec, CodecTag::Lz4);
        assert_eq!(c.fsync, Fsync::Record);
        assert_eq!(c.io_threads, 4);
        assert_eq!(Config::from_json(b"").unwrap(), Config::default());
    }

    #[test]
    fn copy_strategy_takes_a_name_or_rules() {
        assert_eq!(Config::default().copy_strategy, None);
        let c = Config::from_json(br#"{"copy_strategy":"dma_each"}"#).unwrap();
        assert_eq!(c.copy_strategy.unwrap()[0].strategy, Strategy::DmaEach);
        let rules = br#"{"copy_strategy":[
            {"dir":"d2h","layout":"lbhnc","total_bytes":[0,4194304],"strategy":"kernel_mapped"},
            {"dir":"d2h","layout":"lbhnc","strategy":"dma_batch"}]}"#;
        let c = Config::from_json(rules).unwrap();
        assert_eq!(c.copy_strategy.as_ref().unwrap().len(), 2);
        // normalized form parses back to the same
        let again = serde_json::to_vec(&c).unwrap();
        assert_eq!(Config::from_json(&again).unwrap(), c);
        for bad in [
            &br#"{"copy_strategy":"fastest"}"#[..],
            br#"{"copy_strategy":[{"strategy":"dma_batch","pages":7}]}"#,
            br#"{"copy_strategy":3}"#,
        ] {
            let e = Config::from_json(bad).unwrap_err();
            assert!(e.to_string().contains("copy_strategy"), "{e}");
        }
    }

    #[test]
    fn layerwise_load_takes_true_false_or_auto() {
        assert_eq!(Config::default().layerwise_load, Layerwise::Auto);
        for (json, want) in [
            (r#"{"layerwise_load":true}"#, Layerwise::On),
            (r#"{"layerwise_load":false}"#, Layerwise::Off),
            (r#"{"layerwise_load":"auto"}"#, Layerwise::Auto),
        ] {
            let c = Config::from_json(json.as_bytes()).unwrap();
            assert_eq!(c.layerwise_load, want, "{json}");
            assert_eq!(Config::from_json(c.to_json().as_bytes()).unwrap(), c);
        }
        let e = Config::from_json(br#"{"layerwise_load":"yes"}"#).unwrap_err();
        assert!(e.to_string().contains("layerwise_load"), "{e}");
        assert!(Layerwise::On.enabled(false) && !Layerwise::Off.enabled(true));
    }

    #[test]
    fn normalized_json_parses_back_to_the_same_config() {
        let c = Config::from_json(
            br#"{"host_bytes":"3GiB","session_ttl":"90m","codec":"none","policy":"vllm-offload:arc","nvme_dir":"/tmp/x"}"#,
        )
        .unwrap();
        let again = Config::from_json(c.to_json().as_bytes()).unwrap();
        assert_eq!(again, c);
        assert_eq!(c.session_ttl_ns, 90 * 60 * 1_000_000_000);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_json(br#"{"host_byte":"2GiB"}"#).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(e.message().contains("\"host_byte\""), "{e}");
        let e = Config::from_json(br#"{"host_bytes":"2 gigs"}"#).unwrap_err();
        assert!(e.message().starts_with("host_bytes"), "{e}");
        let e = Config::from_json(br#"{"codec":"zip"}"#).unwrap_err();
        assert!(e.message().starts_with("codec"), "{e}");
        let e = Config::from_json(br#"{"io_threads":0}"#).unwrap_err();
        assert!(e.message().starts_with("io_threads"), "{e}");
        assert!(Config::from_json(b"[1]").is_err());
    }

    #[test]
    fn bad_sizes_and_paths_are_refused_at_validation() {
        for (json, key) in [
            (r#"{"nvme_bytes":0}"#, "nvme_bytes"),
            (r#"{"nvme_dir":"/tmp/x","nvme_bytes":"0GiB"}"#, "nvme_bytes"),
            (r#"{"nvme_segment_bytes":1048577}"#, "nvme_segment_bytes"),
            (r#"{"nvme_segment_bytes":"16EiB"}"#, "nvme_segment_bytes"),
            (
                r#"{"nvme_segment_bytes":18446744073709551615}"#,
                "nvme_segment_bytes",
            ),
            (r#"{"nvme_segment_bytes":"4097KiB"}"#, "nvme_segment_bytes"),
            (r#"{"nvme_segment_bytes":"512KiB"}"#, "nvme_segment_bytes"),
            (r#"{"nvme_dir":""}"#, "nvme_dir"),
            (r#"{"host_file":""}"#, "host_file"),
            (r#"{"host_bytes":"18446744073709551616"}"#, "host_bytes"),
            (r#"{"host_bytes":18446744073709551616}"#, "host_bytes"),
            (r#"{"nvme_bytes":"-1"}"#, "nvme_bytes"),
        ] {
            let e = Config::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{json}");
            assert!(e.message().starts_with(key), "{json}: {e}");
        }
        let c = Config::from_json(br#"{"nvme_segment_bytes":"4GiB","nvme_bytes":"1TiB"}"#).unwrap();
        assert_eq!(c.nvme_segment_bytes, 4 << 30);
        assert!(Config::from_json(b"{").is_err());
    }
}
