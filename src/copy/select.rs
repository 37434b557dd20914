//! Which mechanism moves a transfer between vLLM's device KV cache and
//! kvpark's host records: the [`Strategy`] names, the [`Rule`]s of config key
//! `copy_strategy` and the [`Selector`] that matches them against a
//! transfer's [`Shape`]. Pure data and parsing, no CUDA: [`crate::config`]
//! validates `copy_strategy` with it, and [`crate::copy::cuda::plan`] (which
//! re-exports every name, and documents the default table) runs the choice.

use crate::block::KvLayout;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Direction of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Device → host (offload, gather).
    #[serde(rename = "d2h")]
    D2H,
    /// Host → device (onload, scatter).
    #[serde(rename = "h2d")]
    H2D,
}

impl Direction {
    /// 0 for D2H, 1 for H2D (per-direction arrays: streams, staging, kernels).
    pub fn index(self) -> usize {
        match self {
            Direction::D2H => 0,
            Direction::H2D => 1,
        }
    }
}

/// How a transfer is moved (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Kernel on mapped pinned host memory (zero-copy).
    KernelMapped,
    /// Kernel to/from a device staging buffer, plus DMA.
    KernelStaged,
    /// Batched DMA (`cuMemcpyBatchAsync`).
    DmaBatch,
    /// One DMA per copy (`cuMemcpyAsync`).
    DmaEach,
}

impl Strategy {
    /// All strategies, for benchmarks.
    pub const ALL: [Strategy; 4] = [
        Strategy::KernelMapped,
        Strategy::KernelStaged,
        Strategy::DmaBatch,
        Strategy::DmaEach,
    ];

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::KernelMapped => "kernel_mapped",
            Strategy::KernelStaged => "kernel_staged",
            Strategy::DmaBatch => "dma_batch",
            Strategy::DmaEach => "dma_each",
        }
    }

    /// Parses a config name.
    pub fn parse(s: &str) -> Result<Strategy> {
        Strategy::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown copy strategy {s:?} (kernel_mapped, kernel_staged, dma_batch, dma_each)"
                ))
            })
    }
}

/// The shape of one transfer, what the selector decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Direction.
    pub dir: Direction,
    /// vLLM's physical order.
    pub layout: KvLayout,
    /// Bytes of one (layer, block) page.
    pub page_bytes: usize,
    /// Pages moved (blocks × layers).
    pub pages: usize,
}

impl Shape {
    /// Bytes moved.
    pub fn total_bytes(&self) -> usize {
        self.page_bytes * self.pages
    }
}

/// What the device and the host buffers allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// The driver exports `cuMemcpyBatchAsync` (CUDA ≥ 12.8).
    pub batch_dma: bool,
    /// Every host buffer is pinned and mapped into the device address space.
    pub host_mapped: bool,
}

/// One selector rule: every given condition must hold. Ranges are half-open.
/// Absent conditions are left out when a rule is written as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Direction, any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<Direction>,
    /// Layout ("lbhnc" / "lbnhc"), any when absent.
    #[serde(
        default,
        deserialize_with = "de_layout",
        serialize_with = "ser_layout",
        skip_serializing_if = "Option::is_none"
    )]
    pub layout: Option<KvLayout>,
    /// `[min, max)` bytes of one page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_bytes: Option<[u64; 2]>,
    /// `[min, max)` pages (blocks × layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<[u64; 2]>,
    /// `[min, max)` bytes moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<[u64; 2]>,
    /// What to use when the rule matches.
    pub strategy: Strategy,
}

fn ser_layout<S: serde::Serializer>(
    l: &Option<KvLayout>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match l {
        Some(KvLayout::Lbhnc) => s.serialize_str("lbhnc"),
        Some(KvLayout::Lbnhc) => s.serialize_str("lbnhc"),
        None => s.serialize_none(),
    }
}

fn de_layout<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<KvLayout>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    match s.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(None),
        Some("lbhnc") | Some("hnd") => Ok(Some(KvLayout::Lbhnc)),
        Some("lbnhc") | Some("nhd") => Ok(Some(KvLayout::Lbnhc)),
        Some(o) => Err(serde::de::Error::custom(format!(
            "unknown layout {o:?} (lbhnc, lbnhc)"
        ))),
    }
}

fn within(r: Option<[u64; 2]>, v: usize) -> bool {
    r.map_or(true, |[a, b]| (v as u64) >= a && (v as u64) < b)
}

impl Rule {
    /// A rule without conditions: `strategy` for every transfer.
    pub fn always(strategy: Strategy) -> Rule {
        Rule {
            dir: None,
            layout: None,
            page_bytes: None,
            pages: None,
            total_bytes: None,
            strategy,
        }
    }

    /// Whether the rule applies to `s`.
    pub fn matches(&self, s: &Shape) -> bool {
        self.dir.map_or(true, |d| d == s.dir)
            && self.layout.map_or(true, |l| l == s.layout)
            && within(self.page_bytes, s.page_bytes)
            && within(self.pages, s.pages)
            && within(self.total_bytes, s.total_bytes())
    }
}

/// Picks a [`Strategy`] per transfer shape: config rules first, then the
/// default table (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    rules: Vec<Rule>,
}

impl Default for Selector {
    fn default() -> Self {
        Selector {
            rules: Self::default_rules(),
        }
    }
}

impl Selector {
    /// The default table of the module docs.
    pub fn default_rules() -> Vec<Rule> {
        let r = |dir, layout, page_bytes, pages, total_bytes, strategy| Rule {
            dir,
            layout: Some(layout),
            page_bytes,
            pages,
            total_bytes,
            strategy,
        };
        use KvLayout::*;
        use Strategy::*;
        vec![
            r(None, Lbnhc, None, None, Some([0, 4 << 20]), KernelMapped),
            r(None, Lbnhc, None, None, None, KernelStaged),
            r(
                Some(Direction::H2D),
                Lbhnc,
                Some([0, 28 << 10]),
                Some([16, u64::MAX]),
                None,
                KernelMapped,
            ),
            r(None, Lbhnc, None, None, None, DmaBatch),
        ]
    }

    /// Config rules (a JSON array of [`Rule`]s) tried before the defaults.
    /// `{"strategy": "dma_each"}` alone forces one mechanism everywhere.
    pub fn from_json(json: &str) -> Result<Selector> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::config(format!("copy_strategy rules: {e}")))?;
        Ok(Self::with_rules(Self::rules_from_config(&v)?))
    }

    /// The rules of config key `copy_strategy`: a strategy name (that one
    /// everywhere) or an array of [`Rule`]s.
    pub fn rules_from_config(v: &serde_json::Value) -> Result<Vec<Rule>> {
        match v {
            serde_json::Value::String(name) => Ok(vec![Rule::always(
                Strategy::parse(name).map_err(|e| e.context("copy_strategy"))?,
            )]),
            _ => serde_json::from_value(v.clone()).map_err(|e| {
                Error::config(format!(
                    "copy_strategy: expected a strategy name or an array of rules \
                     ({{\"dir\", \"layout\", \"page_bytes\", \"pages\", \"total_bytes\", \"strategy\"}}): {e}"
                ))
            }),
        }
    }

    /// `rules` tried first, then the default table.
    pub fn with_rules(mut rules: Vec<Rule>) -> Selector {
        rules.extend(Self::default_rules());
        Selector { rules }
    }

    /// Forces one strategy for every transfer (benchmarks).
    pub fn forced(s: Strategy) -> Selector {
        Selector {
            rules: vec![Rule::always(s)],
        }
    }

    /// The strategy the rules pick, before feasibility.
    pub fn wanted(&self, s: &Shape) -> Strategy {
        self.rules
            .iter()
            .find(|r| r.matches(s))
            .map(|r| r.strategy)
            .unwrap_or(Strategy::KernelStaged)
    }

    /// The strategy that will run: [`Selector::wanted`], degraded to what
    /// the layout, the driver and the host memory allow (module docs).
    pub fn pick(&self, s: &Shape, caps: Caps) -> Strategy {
        resolve(self.wanted(s), s.layout, caps)
    }
}

/// One measured transfer: a strategy that ran (after [`resolve`]) on a
/// shape, and its speed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// The transfer's shape.
    pub shape: Shape,
    /// The strategy that ran.
    pub strategy: Strategy,
    /// Bytes per second.
    pub bytes_per_s: f64,
}

/// Geometric middle of two sizes (a boundary between two measured points).
pub(crate) fn geo_mid(a: u64, b: u64) -> u64 {
    ((a as f64 * b as f64).sqrt().round() as u64).clamp(a.min(b) + 1, a.max(b))
}

/// Selector rules from measurements (`copy_strategy` config): per direction,
/// layout and measured page size, the fastest strategy at each measured
/// transfer size, boundaries half-way (geometrically) between measured
/// sizes and page sizes, neighbours with the same winner merged. Rules cover
/// every size, so for the measured directions and layouts they replace the
/// default table; where a direction or layout was not measured, the default
/// table still decides.
pub fn derive_rules(measured: &[Measured]) -> Vec<Rule> {
    use std::collections::BTreeMap;
    // (dir, layout) -> page -> total -> fastest (strategy, bytes/s)
    type Points = BTreeMap<u64, BTreeMap<u64, (Strategy, f64)>>;
    let mut groups: Vec<((Direction, KvLayout), Points)> = Vec::new();
    for m in measured {
        let key = (m.shape.dir, m.shape.layout);
        let i = match groups.iter().position(|g| g.0 == key) {
            Some(i) => i,
            None => {
                groups.push((key, BTreeMap::new()));
                groups.len() - 1
            }
        };
        let best = groups[i]
            .1
            .entry(m.shape.page_bytes as u64)
            .or_default()
            .entry(m.shape.total_bytes() as u64)
            .or_insert((m.strategy, m.bytes_per_s));
        if m.bytes_per_s > best.1 {
            *best = (m.strategy, m.bytes_per_s);
        }
    }
    let mut rules = Vec::new();
    for ((dir, layout), pages) in groups {
        let sizes: Vec<u64> = pages.keys().copied().collect();
        for (i, (page, points)) in pages.iter().enumerate() {
            let page_range = (sizes.len() > 1).then(|| {
                [
                    if i == 0 {
                        0
                    } else {
                        geo_mid(sizes[i - 1], *page)
                    },
                    sizes.get(i + 1).map_or(u64::MAX, |n| geo_mid(*page, *n)),
                ]
            });
            let pts: Vec<(u64, Strategy)> = points.iter().map(|(t, w)| (*t, w.0)).collect();
            let mut lo = 0u64;
            for (j, (total, strat)) in pts.iter().enumerate() {
                let hi = match pts.get(j + 1) {
                    Some((next, ns)) if ns != strat => geo_mid(*total, *next),
                    Some(_) => continue,
                    None => u64::MAX,
                };
                rules.push(Rule {
                    dir: Some(dir),
                    layout: Some(layout),
                    page_bytes: page_range,
                    pages: None,
                    total_bytes: ((lo, hi) != (0, u64::MAX)).then_some([lo, hi]),
                    strategy: *strat,
                });
                lo = hi;
            }
        }
    }
    rules
}

/// Degrades `want` to something possible.
pub fn resolve(want: Strategy, layout: KvLayout, caps: Caps) -> Strategy {
    let mut s = want;
    if layout == KvLayout::Lbnhc && matches!(s, Strategy::DmaBatch | Strategy::DmaEach) {
        s = Strategy::KernelStaged;
    }
    if s == Strategy::KernelMapped && !caps.host_mapped {
        s = Strategy::KernelStaged;
    }
    if s == Strategy::DmaBatch && !(caps.batch_dma && caps.host_mapped) {
        s = Strategy::DmaEach;
    }
    s
}
