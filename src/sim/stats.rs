//! `kvpark trace stats`: the workload distributions, the study quantities
//! and the idealised TTL sweep of DESIGN §6, computed in one streaming pass
//! over sessions.
//!
//! Token and time sums are exact integers (u128 tokens, i128 nanoseconds),
//! so the sweep's hit rate, amplification and storage ratio, the real and
//! optimal hit, the observed amplification and the effective eviction time
//! agree to the last digit with any other implementation of §6.
//! Distributions keep every sample ([`Samples`], 8 bytes each: ≈ 10 MB for
//! the 357k-step study trace) and take percentiles by linear interpolation
//! between order statistics, exactly as numpy's default does. Time samples are
//! in seconds: nanoseconds / 1e9 (waits, spans) and milliseconds / 1e3 (tool
//! latencies).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write;

use super::trace::{Session, TimeNs, ToolNames, Trigger};

const NS: f64 = 1e9;

/// The percentiles reported for every distribution in `--json`.
pub const PERCENTILES: [f64; 6] = [10.0, 25.0, 50.0, 75.0, 90.0, 99.0];

/// Every sample of a distribution, with numpy's default (linear) percentiles.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    v: RefCell<Vec<f64>>,
    sorted: Cell<bool>,
    sum: f64,
}

impl Samples {
    /// An empty distribution.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample (non-finite values are ignored).
    pub fn add(&mut self, x: f64) {
        if x.is_finite() {
            self.v.get_mut().push(x);
            self.sorted.set(false);
            self.sum += x;
        }
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.v.borrow().len() as u64
    }

    /// Arithmetic mean (0 when empty).
    pub fn mean(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            0.0
        } else {
            self.sum / n as f64
        }
    }

    fn sort(&self) {
        if !self.sorted.get() {
            self.v.borrow_mut().sort_by(f64::total_cmp);
            self.sorted.set(true);
        }
    }

    /// The q-quantile (0 ≤ q ≤ 1) by linear interpolation between order
    /// statistics, as `numpy.quantile(a, q)` computes it (virtual index
    /// (n − 1)·q; numpy's `_lerp`, which interpolates from the upper
    /// neighbour when the fraction is ≥ 0.5). NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        self.sort();
        let v = self.v.borrow();
        let n = v.len();
        if n == 0 {
            return f64::NAN;
        }
        let vi = (n - 1) as f64 * q.clamp(0.0, 1.0);
        let lo = vi.floor();
        let g = vi - lo;
        let i = (lo as usize).min(n - 1);
        let j = (i + 1).min(n - 1);
        let (a, b) = (v[i], v[j]);
        let d = b - a;
        if g >= 0.5 {
            b - d * (1.0 - g)
        } else {
            a + d * g
        }
    }

    /// The p-th percentile (0 ≤ p ≤ 100), as `numpy.percentile(a, p)`.
    pub fn percentile(&self, p: f64) -> f64 {
        self.quantile(p / 100.0)
    }

    /// Fraction of samples strictly above `x`.
    pub fn frac_above(&self, x: f64) -> f64 {
        let v = self.v.borrow();
        if v.is_empty() {
            return 0.0;
        }
        v.iter().filter(|&&y| y > x).count() as f64 / v.len() as f64
    }

    /// Largest sample (NaN when empty).
    pub fn max(&self) -> f64 {
        self.v.borrow().iter().copied().fold(f64::NAN, f64::max)
    }

    /// `{count, mean, min, max, p10, p25, p50, p75, p90, p99}` (percentiles
    /// null when empty).
    pub fn summary(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let num = |x: f64| {
            serde_json::Number::from_f64(x)
                .map_or(serde_json::Value::Null, serde_json::Value::Number)
        };
        m.insert("count".into(), self.count().into());
        m.insert("mean".into(), num(self.mean()));
        m.insert("min".into(), num(self.quantile(0.0)));
        m.insert("max".into(), num(self.quantile(1.0)));
        for p in PERCENTILES {
            m.insert(format!("p{p}"), num(self.percentile(p)));
        }
        serde_json::Value::Object(m)
    }
}

/// The study's TTL grid for the effective eviction time (DESIGN §6), in
/// seconds: 260 points evenly spaced in log10 from 1 s to 4 h (as
/// `numpy.logspace(0, log10(14400), 260)`), plus 1 s, 4 h and the landmarks
/// 60, 300, 600, 1800, 3600, 7200, 14400 s, sorted, duplicates removed.
pub fn study_grid_s() -> Vec<f64> {
    let stop = 14400f64.log10();
    let n = 260;
    // numpy.linspace: start + i·step, the last point exactly `stop`;
    // numpy.logspace: 10 ** that
    let step = stop / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n)
        .map(|i| {
            let e = if i == n - 1 { stop } else { i as f64 * step };
            10f64.powf(e)
        })
        .collect();
    v.extend([
        1.0, 14400.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
    ]);
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

/// A grid τ (s) as nanoseconds: a gap g (ns) is ≤ τ when g ≤ ⌊τ·1e9⌋.
fn grid_ns(tau_s: f64) -> i64 {
    (tau_s * NS).floor() as i64
}

/// The TTLs of the calibration table (1 min, 5 min, 1 h), in nanoseconds.
pub const TABLE_TTLS: [i64; 3] = [60_000_000_000, 300_000_000_000, 3_600_000_000_000];

/// Idealised TTL sums for one τ.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TtlAcc {
    /// τ in nanoseconds.
    pub tau_ns: i64,
    /// Σ cacheable of counted steps with gap ≤ τ, all / user / tool.
    pub hit: [u128; 3],
    /// Σ cacheable of counted steps with gap > τ.
    pub miss_cacheable: u128,
    /// Σ min(gap, τ) over counted steps (ns).
    pub kept_ns: i128,
}

/// One row of the TTL sweep.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TtlPoint {
    /// τ in seconds.
    pub tau_s: f64,
    /// Token-weighted hit rate, all counted steps.
    pub hit: f64,
    /// Hit rate of user-initiated steps.
    pub hit_user: f64,
    /// Hit rate of tool-initiated steps.
    pub hit_tool: f64,
    /// Storage ratio R(τ).
    pub storage_ratio: f64,
    /// Prefill amplification.
    pub amplification: f64,
}

/// Streaming accumulator of trace statistics.
#[derive(Clone, Debug)]
pub struct TraceStats {
    /// Sessions seen (of the session walk).
    pub sessions: u64,
    /// Rows seen, loose ones included.
    pub steps: u64,
    /// Rows outside the session walk (DESIGN §6 field rules).
    pub loose_rows: u64,
    /// Steps entering the sweep.
    pub counted: u64,
    /// Sessions per provider.
    pub providers: HashMap<String, u64>,
    /// Rows (steps) per provider, of the session walk.
    pub provider_steps: HashMap<String, u64>,
    /// Largest L of a row per provider.
    pub provider_max_l: HashMap<String, u64>,
    /// Requests (user-initiated steps) per session.
    pub requests_per_session: Samples,
    /// Tool-initiated steps following each user-initiated step.
    pub tool_steps_per_request: Samples,
    /// Tool calls per row, over rows that emit at least one call.
    pub calls_per_step: Samples,
    /// Tool calls (objects of `tools`), all rows.
    pub tool_calls: u64,
    /// `human_input_wait` (s), DESIGN §6.
    pub human_wait_s: Samples,
    /// Effective tool latency (s), DESIGN §6, kept when > 0.
    pub tool_latency_s: Samples,
    /// Effective tool latency per tool name (s).
    pub per_tool: HashMap<String, Samples>,
    /// Generation span (s), every row.
    pub gen_span_s: Samples,
    /// prefix_tokens, every row where present.
    pub prefix: Samples,
    /// newly_append_tokens, every row where present.
    pub append: Samples,
    /// output_tokens, every row where present.
    pub output: Samples,
    /// Sessions with at least one compaction (L falls below half of the previous L, from ≥ 20k).
    pub sessions_with_compaction: u64,
    /// Σ L of counted steps, all / user / tool.
    pub sum_l: [u128; 3],
    /// Σ prefix of counted steps, all / user / tool.
    pub sum_prefix: [u128; 3],
    /// Σ cacheable of counted steps, all / user / tool.
    pub sum_cacheable: [u128; 3],
    /// Σ append of counted steps.
    pub sum_append: u128,
    /// Σ fresh of counted steps.
    pub sum_fresh: u128,
    /// Σ generation span over all rows (ns).
    pub sum_gen_ns: i128,
    /// TTL accumulators (sorted by τ).
    pub ttl: Vec<TtlAcc>,
    /// The τ values (ns) of the printed table.
    pub table: Vec<i64>,
    /// The study's grid (s, [`study_grid_s`]) and Σ cacheable of counted
    /// steps whose gap first fits under each grid τ.
    grid: Vec<(f64, i64, u128)>,
    /// Session starts per hour of day (UTC).
    pub starts_by_hour: [u64; 24],
    /// (start, end) of each session, for the overlap figure.
    spans: Vec<(TimeNs, TimeNs)>,
}

/// τ values of the sweep: the table's three plus a log grid from 1 s to 1 day.
pub fn sweep_taus() -> Vec<i64> {
    let mut v: Vec<i64> = TABLE_TTLS.to_vec();
    let mut t = 1.0f64;
    while t <= 86400.0 * 1.0001 {
        v.push((t * NS).round() as i64);
        t *= 10f64.powf(0.125);
    }
    v.sort_unstable();
    v.dedup();
    v
}

impl Default for TraceStats {
    fn default() -> Self {
        Self::new(&sweep_taus())
    }
}

fn cls(t: Trigger) -> usize {
    if t == Trigger::User {
        1
    } else {
        2
    }
}

fn div(a: u128, b: u128) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl TraceStats {
    /// An empty accumulator sweeping the given τ values (ns); the printed
    /// table shows 1 min, 5 min and 1 h.
    pub fn new(taus: &[i64]) -> Self {
        TraceStats {
            sessions: 0,
            steps: 0,
            loose_rows: 0,
            counted: 0,
            providers: HashMap::new(),
            provider_steps: HashMap::new(),
            provider_max_l: HashMap::new(),
            requests_per_session: Samples::new(),
            tool_steps_per_request: Samples::new(),
            calls_per_step: Samples::new(),
            tool_calls: 0,
            human_wait_s: Samples::new(),
            tool_latency_s: Samples::new(),
            per_tool: HashMap::new(),
            gen_span_s: Samples::new(),
            prefix: Samples::new(),
            append: Samples::new(),
            output: Samples::new(),
            sessions_with_compaction: 0,
            sum_l: [0; 3],
            sum_prefix: [0; 3],
            sum_cacheable: [0; 3],
            sum_append: 0,
            sum_fresh: 0,
            sum_gen_ns: 0,
            ttl: taus
                .iter()
                .map(|&t| TtlAcc {
                    tau_ns: t,
                    ..Default::default()
                })
                .collect(),
            table: TABLE_TTLS.to_vec(),
            grid: study_grid_s()
                .into_iter()
                .map(|t| (t, grid_ns(t), 0))
                .collect(),
            starts_by_hour: [0; 24],
            spans: Vec::new(),
        }
    }

    /// An accumulator whose printed table (and sweep) has exactly `table`
    /// (ns), besides the default sweep.
    pub fn with_table(table: &[i64]) -> Self {
        let mut taus = sweep_taus();
        taus.extend_from_slice(table);
        taus.sort_unstable();
        taus.dedup();
        let mut st = Self::new(&taus);
        st.table = table.to_vec();
        st
    }

    /// Folds one session in (a loose one counts in per-row statistics only).
    pub fn add(&mut self, s: &Session, tools: &ToolNames) {
        for st in &s.steps {
            self.steps += 1;
            if s.loose {
                self.loose_rows += 1;
            }
            if !st.calls.is_empty() {
                self.calls_per_step.add(st.calls.len() as f64);
            }
            self.tool_calls += st.calls.len() as u64;
            for c in &st.calls {
                if let Some(ms) = c.latency_ms.filter(|&ms| ms > 0) {
                    let v = ms as f64 / 1e3;
                    self.tool_latency_s.add(v);
                    self.per_tool
                        .entry(tools.name(c.tool).to_string())
                        .or_default()
                        .add(v);
                }
            }
            for &w in &st.human_waits {
                self.human_wait_s.add(w as f64 / NS);
            }
            if let Some(g) = st.gen_span {
                self.gen_span_s.add(g as f64 / NS);
                self.sum_gen_ns += g as i128;
            }
            let [p, a, o] = st.known;
            if p {
                self.prefix.add(st.prefix as f64);
            }
            if a {
                self.append.add(st.append as f64);
            }
            if o {
                self.output.add(st.output as f64);
            }
        }
        if s.loose {
            return;
        }
        self.sessions += 1;
        *self.providers.entry(s.provider.clone()).or_default() += 1;
        *self.provider_steps.entry(s.provider.clone()).or_default() += s.steps.len() as u64;
        let mut requests = 0u64;
        let mut tool_run: Option<u64> = None;
        let mut compacted = false;
        let mut prev_l = 0u64;
        let mut max_l = 0u64;
        let (mut start, mut end) = (None::<TimeNs>, None::<TimeNs>);
        for st in &s.steps {
            if let Some(t) = st.first_activity {
                start = Some(start.map_or(t, |x| x.min(t)));
            }
            if let Some(t) = st.last_activity {
                end = Some(end.map_or(t, |x| x.max(t)));
            }
            max_l = max_l.max(st.l);
            match st.trigger {
                Trigger::User => {
                    requests += 1;
                    if let Some(n) = tool_run.replace(0) {
                        self.tool_steps_per_request.add(n as f64);
                    }
                }
                Trigger::Tool => {
                    if let Some(n) = tool_run.as_mut() {
                        *n += 1;
                    }
                }
                Trigger::Other => {}
            }
            if prev_l >= 20_000 && st.l > 0 && (st.l as u128) * 2 < prev_l as u128 {
                compacted = true;
            }
            if st.l > 0 {
                prev_l = st.l;
            }
            if st.counted {
                self.counted += 1;
                let gap = st.gap.unwrap_or(0);
                let c = cls(st.trigger);
                for k in [0, c] {
                    self.sum_l[k] += st.l as u128;
                    self.sum_prefix[k] += st.prefix as u128;
                    self.sum_cacheable[k] += st.cacheable as u128;
                }
                self.sum_append += st.append as u128;
                self.sum_fresh += st.fresh as u128;
                for acc in &mut self.ttl {
                    if gap <= acc.tau_ns {
                        acc.hit[0] += st.cacheable as u128;
                        acc.hit[c] += st.cacheable as u128;
                    } else {
                        acc.miss_cacheable += st.cacheable as u128;
                    }
                    acc.kept_ns += gap.min(acc.tau_ns) as i128;
                }
                // the first grid τ the gap fits under (grid ascending)
                let i = self.grid.partition_point(|g| g.1 < gap);
                if let Some(g) = self.grid.get_mut(i) {
                    g.2 += st.cacheable as u128;
                }
            }
        }
        let m = self.provider_max_l.entry(s.provider.clone()).or_default();
        *m = (*m).max(max_l);
        if let Some(n) = tool_run {
            self.tool_steps_per_request.add(n as f64);
        }
        self.requests_per_session.add(requests as f64);
        if compacted {
            self.sessions_with_compaction += 1;
        }
        if let (Some(a), Some(b)) = (start, end) {
            let hour = (a.div_euclid(3_600_000_000_000)).rem_euclid(24) as usize;
            self.starts_by_hour[hour] += 1;
            self.spans.push((a, b));
        }
    }

    /// The sweep point of τ = `acc.tau_ns`.
    pub fn point(&self, acc: &TtlAcc) -> TtlPoint {
        TtlPoint {
            tau_s: acc.tau_ns as f64 / NS,
            hit: div(acc.hit[0], self.sum_l[0]),
            hit_user: div(acc.hit[1], self.sum_l[1]),
            hit_tool: div(acc.hit[2], self.sum_l[2]),
            storage_ratio: if self.sum_gen_ns <= 0 {
                0.0
            } else {
                acc.kept_ns as f64 / self.sum_gen_ns as f64
            },
            amplification: div(self.sum_fresh + acc.miss_cacheable, self.sum_fresh),
        }
    }

    /// The whole sweep.
    pub fn sweep(&self) -> Vec<TtlPoint> {
        self.ttl.iter().map(|a| self.point(a)).collect()
    }

    /// The sweep point for exactly τ = `tau_ns`, if swept.
    pub fn at(&self, tau_ns: i64) -> Option<TtlPoint> {
        self.ttl
            .iter()
            .find(|a| a.tau_ns == tau_ns)
            .map(|a| self.point(a))
    }

    /// Real hit rate = Σ prefix / Σ L over counted steps: all, user, tool.
    pub fn real_hit(&self) -> [f64; 3] {
        [0, 1, 2].map(|k| div(self.sum_prefix[k], self.sum_l[k]))
    }

    /// Optimal hit = Σ cacheable / Σ L over counted steps: all, user, tool.
    pub fn optimal_hit(&self) -> [f64; 3] {
        [0, 1, 2].map(|k| div(self.sum_cacheable[k], self.sum_l[k]))
    }

    /// Observed amplification = Σ append / Σ fresh over counted steps.
    pub fn observed_amplification(&self) -> f64 {
        div(self.sum_append, self.sum_fresh)
    }

    /// The idealised hit (all counted steps) at each τ of the study's grid:
    /// (τ s, hit).
    pub fn grid_hits(&self) -> Vec<(f64, f64)> {
        let mut acc = 0u128;
        self.grid
            .iter()
            .map(|g| {
                acc += g.2;
                (g.0, div(acc, self.sum_l[0]))
            })
            .collect()
    }

    /// Effective eviction time (s): the τ of the study's grid whose idealised
    /// hit is nearest to the real hit rate (the first minimum of
    /// |hit(τ) − real|); `None` without counted tokens.
    pub fn effective_eviction_s(&self) -> Option<f64> {
        if self.sum_l[0] == 0 {
            return None;
        }
        let real = self.real_hit()[0];
        let mut best: Option<(f64, f64)> = None;
        for (tau, hit) in self.grid_hits() {
            let d = (hit - real).abs();
            if best.map_or(true, |b| d < b.1) {
                best = Some((tau, d));
            }
        }
        best.map(|b| b.0)
    }

    /// Peak and time-averaged number of sessions open at once
    /// (first to last activity), over the trace's span.
    pub fn overlap(&self) -> (u64, f64) {
        let mut ev: Vec<(TimeNs, i64)> = Vec::with_capacity(self.spans.len() * 2);
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        let mut busy: i128 = 0;
        for &(a, b) in &self.spans {
            ev.push((a, 1));
            ev.push((b, -1));
            lo = lo.min(a);
            hi = hi.max(b);
            busy += b as i128 - a as i128;
        }
        ev.sort_unstable();
        let (mut cur, mut peak) = (0i64, 0i64);
        for (_, d) in ev {
            cur += d;
            peak = peak.max(cur);
        }
        let mean = if hi > lo {
            busy as f64 / (hi as i128 - lo as i128) as f64
        } else {
            0.0
        };
        (peak as u64, mean)
    }

    /// Days from the first session start to the last session's end.
    pub fn span_days(&self) -> f64 {
        let lo = self.spans.iter().map(|s| s.0).min();
        let hi = self.spans.iter().map(|s| s.1).max();
        match (lo, hi) {
            (Some(a), Some(b)) => (b as i128 - a as i128) as f64 / (86_400.0 * NS),
            _ => 0.0,
        }
    }

    /// Fraction of tool calls made by the three most frequent tools.
    pub fn top3_share(&self) -> f64 {
        let mut c: Vec<u64> = self.per_tool.values().map(|h| h.count()).collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let tot: u64 = c.iter().sum();
        if tot == 0 {
            0.0
        } else {
            c.iter().take(3).sum::<u64>() as f64 / tot as f64
        }
    }

    /// The distributions by name, with their unit.
    pub fn distributions(&self) -> Vec<(&'static str, &Samples)> {
        vec![
            ("requests_per_session", &self.requests_per_session),
            ("tool_steps_per_request", &self.tool_steps_per_request),
            ("tool_calls_per_step", &self.calls_per_step),
            ("human_input_wait_s", &self.human_wait_s),
            ("tool_latency_s", &self.tool_latency_s),
            ("generation_span_s", &self.gen_span_s),
            ("prefix_tokens", &self.prefix),
            ("newly_append_tokens", &self.append),
            ("output_tokens", &self.output),
        ]
    }

    /// The numbers as JSON: counts, study quantities, distributions
    /// (count, mean, min, max, p10/p25/p50/p75/p90/p99) and the sweep.
    pub fn to_json(&self) -> serde_json::Value {
        let num = |x: f64| {
            serde_json::Number::from_f64(x)
                .map_or(serde_json::Value::Null, serde_json::Value::Number)
        };
        let cls3 = |v: [f64; 3]| serde_json::json!({"all": num(v[0]), "user": num(v[1]), "tool": num(v[2])});
        let mut dists = serde_json::Map::new();
        for (name, h) in self.distributions() {
            dists.insert(name.to_string(), h.summary());
        }
        let mut per_tool = serde_json::Map::new();
        for (name, h) in &self.per_tool {
            per_tool.insert(name.clone(), h.summary());
        }
        let mut prov = serde_json::Map::new();
        for (p, n) in &self.providers {
            prov.insert(
                p.clone(),
                serde_json::json!({
                    "sessions": n,
                    "steps": self.provider_steps.get(p).copied().unwrap_or(0),
                    "max_context_tokens": self.provider_max_l.get(p).copied().unwrap_or(0),
                }),
            );
        }
        let (peak, mean) = self.overlap();
        let table: Vec<TtlPoint> = self.table.iter().filter_map(|&t| self.at(t)).collect();
        serde_json::json!({
            "sessions": self.sessions,
            "steps": self.steps,
            "loose_rows": self.loose_rows,
            "counted": self.counted,
            "tool_calls": self.tool_calls,
            "providers": prov,
            "sessions_with_compaction": self.sessions_with_compaction,
            "sessions_open_at_once": {"peak": peak, "mean": num(mean)},
            "span_days": num(self.span_days()),
            "sums": {
                "l": self.sum_l.map(|x| x.to_string()),
                "prefix": self.sum_prefix.map(|x| x.to_string()),
                "cacheable": self.sum_cacheable.map(|x| x.to_string()),
                "append": self.sum_append.to_string(),
                "fresh": self.sum_fresh.to_string(),
                "generation_span_ns": self.sum_gen_ns.to_string(),
            },
            "real_hit": cls3(self.real_hit()),
            "optimal_hit": cls3(self.optimal_hit()),
            "observed_amplification": num(self.observed_amplification()),
            "effective_eviction_s": self.effective_eviction_s().map_or(serde_json::Value::Null, num),
            "tool_calls_over_1min": num(self.tool_latency_s.frac_above(60.0)),
            "distributions": dists,
            "per_tool": per_tool,
            "table": table,
            "sweep": self.sweep(),
        })
    }

    /// The printed report, with the study's figures beside ours.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
        let sess = |p: &str| self.providers.get(p).copied().unwrap_or(0);
        let steps = |p: &str| self.provider_steps.get(p).copied().unwrap_or(0);
        let walk_steps = self.steps - self.loose_rows;
        let _ = writeln!(
            o,
            "sessions {}   steps {}   counted steps {}   rows outside the session walk {}   (study: 4,265 / 357,161)",
            self.sessions, self.steps, self.counted, self.loose_rows
        );
        let _ = writeln!(
            o,
            "claude-like: {:.1}% of sessions, {} steps ({:.1}%), largest context {:.0}k   (study: 63%, ≈140k steps, up to ≈1M)",
            pct(sess("claude"), self.sessions),
            steps("claude"),
            pct(steps("claude"), walk_steps),
            self.provider_max_l.get("claude").copied().unwrap_or(0) as f64 / 1e3
        );
        let _ = writeln!(
            o,
            "codex-like:  {:.1}% of sessions, {} steps ({:.1}%), largest context {:.0}k   (study: 37%, ≈217k steps)",
            pct(sess("codex"), self.sessions),
            steps("codex"),
            pct(steps("codex"), walk_steps),
            self.provider_max_l.get("codex").copied().unwrap_or(0) as f64 / 1e3
        );
        let (peak, mean) = self.overlap();
        let hmax = *self.starts_by_hour.iter().max().unwrap_or(&0) as f64;
        let hmin = *self.starts_by_hour.iter().min().unwrap_or(&0) as f64;
        let _ = writeln!(
            o,
            "trace spans {:.0} days (study: months); sessions open at once: peak {peak}, mean {mean:.1}; session starts per hour of day max/min {:.1}",
            self.span_days(),
            if hmin > 0.0 { hmax / hmin } else { f64::INFINITY }
        );
        let _ = writeln!(
            o,
            "compactions: {:.1}% of sessions (study ≈10%); top-3 tools {:.1}% of calls (study > 80%); calls over 1 min {:.1}% (study ≈4%)",
            pct(self.sessions_with_compaction, self.sessions),
            100.0 * self.top3_share(),
            100.0 * self.tool_latency_s.frac_above(60.0)
        );
        let _ = writeln!(o);
        let real = self.real_hit();
        let opt = self.optimal_hit();
        let _ = writeln!(
            o,
            "{:<34} {:>8} {:>8} {:>8}   study (all / user / tool)",
            "over counted steps (DESIGN §6)", "all", "user", "tool"
        );
        let _ = writeln!(
            o,
            "{:<34} {:>7.1}% {:>7.1}% {:>7.1}%   - / ≈84% / ≈97.5%",
            "real hit (Σ prefix / Σ L)",
            100.0 * real[0],
            100.0 * real[1],
            100.0 * real[2]
        );
        let _ = writeln!(
            o,
            "{:<34} {:>7.1}% {:>7.1}% {:>7.1}%",
            "optimal hit (Σ cacheable / Σ L)",
            100.0 * opt[0],
            100.0 * opt[1],
            100.0 * opt[2]
        );
        let _ = writeln!(
            o,
            "{:<34} {:>7.2}×   (study 5.3×: ≈19% of prefilled tokens new)",
            "observed amplification",
            self.observed_amplification()
        );
        let _ = writeln!(
            o,
            "{:<34} {:>8}",
            "effective eviction time",
            self.effective_eviction_s()
                .map_or("-".to_string(), |s| format!("{s:.0} s"))
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<34} {:>10} {:>10} {:>10} {:>10}   study (avg / p50 / p90 / p99)",
            "distribution", "avg", "p50", "p90", "p99"
        );
        let row = |o: &mut String, name: &str, h: &Samples, scale: f64, study: &str| {
            let _ = writeln!(
                o,
                "{:<34} {:>10.2} {:>10.2} {:>10.2} {:>10.2}   {}",
                name,
                h.mean() / scale,
                h.quantile(0.5) / scale,
                h.quantile(0.9) / scale,
                h.quantile(0.99) / scale,
                study
            );
        };
        row(
            &mut o,
            "requests per session",
            &self.requests_per_session,
            1.0,
            "9.2 / 1 / 18 / 137",
        );
        row(
            &mut o,
            "tool steps per request",
            &self.tool_steps_per_request,
            1.0,
            "7.8 / 1 / 20 / -",
        );
        row(
            &mut o,
            "tool calls per step (with calls)",
            &self.calls_per_step,
            1.0,
            "1.2 / - / - / -",
        );
        row(
            &mut o,
            "human_input_wait (s)",
            &self.human_wait_s,
            1.0,
            "- / 84 / 1260 / 50400",
        );
        row(
            &mut o,
            "tool latency (s)",
            &self.tool_latency_s,
            1.0,
            "- / 0.3 / 13.6 / 216",
        );
        row(
            &mut o,
            "generation span (s)",
            &self.gen_span_s,
            1.0,
            "- / 5.7 / 22 / -",
        );
        row(
            &mut o,
            "prefix (k tokens)",
            &self.prefix,
            1000.0,
            "- / ≈119 / - / -",
        );
        row(
            &mut o,
            "append (tokens)",
            &self.append,
            1.0,
            "- / ≈875 / heavy / -",
        );
        row(
            &mut o,
            "output (tokens)",
            &self.output,
            1.0,
            "- / ≈214 / - / -",
        );
        let _ = writeln!(o);
        let mut tools: Vec<(&String, &Samples)> = self.per_tool.iter().collect();
        tools.sort_by(|a, b| b.1.count().cmp(&a.1.count()).then(a.0.cmp(b.0)));
        let calls: u64 = tools.iter().map(|t| t.1.count()).sum();
        let _ = writeln!(
            o,
            "{:<20} {:>8} {:>8} {:>9} {:>9}",
            "tool", "share", "p50 s", "p90 s", "p99 s"
        );
        for (name, h) in tools.iter().take(8) {
            let _ = writeln!(
                o,
                "{:<20} {:>7.1}% {:>8.2} {:>9.2} {:>9.2}",
                name,
                100.0 * h.count() as f64 / calls.max(1) as f64,
                h.quantile(0.5),
                h.quantile(0.9),
                h.quantile(0.99)
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "idealised TTL (DESIGN §6)   {:>8} {:>8} {:>8} {:>9} {:>8}   study (hit / R / amp)",
            "hit", "user", "tool", "R", "amp"
        );
        for &tau in &self.table {
            let study = match tau {
                60_000_000_000 => "85.4% / 0.74 / 18.9×",
                300_000_000_000 => "≈94% / ≈1.9 / 7.4×",
                3_600_000_000_000 => "98.6% / 5.07 / 1.8×",
                _ => "",
            };
            if let Some(p) = self.at(tau) {
                let _ = writeln!(
                    o,
                    "TTL {:<23} {:>7.1}% {:>7.1}% {:>7.1}% {:>9.2} {:>7.1}×   {}",
                    crate::sim::fmt_dur_s(p.tau_s),
                    100.0 * p.hit,
                    100.0 * p.hit_user,
                    100.0 * p.hit_tool,
                    p.storage_ratio,
                    p.amplification,
                    study
                );
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::trace::read_bytes;

    /// A crafted session (provider "p", session "s1") plus one row without
    /// session_id, timed in seconds after 2026-01-01T00:00:00Z:
    ///
    /// | row | round | trigger | events (s) | tokens prefix/append/output | tools |
    /// |-----|-------|---------|------------|-----------------------------|-------|
    /// | A | 0 | user | user 0, reasoning 2, tool_call 3 (c1), tool_call 3.5 ("") | 0 / 1000 / 100 | c1 3→13 (internal 9500, wall 10000); "" 3.5→30 (internal null, wall 26500) |
    /// | B | 1 | tool | result 13 (c1), result 30 (""), reasoning 32, text 37 | 900 / 300 / 50 | |
    /// | C | 2 | user | user 140, reasoning 141, text 145 | 1100.0 (float) / 200 / 30 | |
    /// | D | 3 | user | user 445, text 450, user 455, reasoning 457, text 460 | 1200 / 300 / 20 | |
    /// | E | 4 | user | user (unparsable), reasoning 505, text 506 | 1400 / 150 / 10 | c2 506→506.3 (internal 0, wall 300) |
    /// | F | 5 | user | user 700, reasoning 702, text 705 (no session_id) | 10 / 5 / 7 | c9 703→705 (internal 1500.0, wall 2000) |
    /// | G | 5 | tool | result 506.3 (c2), reasoning 508, text 515 | 1500 / 100 / true | |
    const CRAFTED: &str = r#"{"provider":"p","session_id":"s1","round_index":0,"prefix_tokens":0,"newly_append_tokens":1000,"output_tokens":100,"timing_events":[{"event_type":"user_message","timestamp":"2026-01-01T00:00:00.000Z"},{"event_type":"reasoning","timestamp":"2026-01-01T00:00:02.000Z"},{"event_type":"tool_call","timestamp":"2026-01-01T00:00:03.000Z","tool_call_id":"c1"},{"event_type":"tool_call","timestamp":"2026-01-01T00:00:03.500Z","tool_call_id":""}],"tools":[{"tool_name":"Bash","tool_call_id":"c1","emitted_at":"2026-01-01T00:00:03.000Z","result_at":"2026-01-01T00:00:13.000Z","tool_wall_latency_ms":10000,"tool_internal_latency_ms":9500},{"tool_name":"Read","tool_call_id":"","emitted_at":"2026-01-01T00:00:03.500Z","result_at":"2026-01-01T00:00:30.000Z","tool_wall_latency_ms":26500,"tool_internal_latency_ms":null}]}
{"provider":"p","session_id":"s1","round_index":1,"prefix_tokens":900,"newly_append_tokens":300,"output_tokens":50,"timing_events":[{"event_type":"tool_result","timestamp":"2026-01-01T00:00:13.000Z","tool_call_id":"c1"},{"event_type":"tool_result","timestamp":"2026-01-01T00:00:30.000Z","tool_call_id":""},{"event_type":"reasoning","timestamp":"2026-01-01T00:00:32.000Z"},{"event_type":"text","timestamp":"2026-01-01T00:00:37.000Z"}],"tools":[]}
{"provider":"p","session_id":"s1","round_index":2,"prefix_tokens":1100.0,"newly_append_tokens":200,"output_tokens":30,"timing_events":[{"event_type":"user_message","timestamp":"2026-01-01T00:02:20.000Z"},{"event_type":"reasoning","timestamp":"2026-01-01T00:02:21.000Z"},{"event_type":"text","timestamp":"2026-01-01T00:02:25.000Z"}]}
{"provider":"p","session_id":"s1","round_index":3,"prefix_tokens":1200,"newly_append_tokens":300,"output_tokens":20,"timing_events":[{"event_type":"user_message","timestamp":"2026-01-01T00:07:25.000Z"},{"event_type":"text","timestamp":"2026-01-01T00:07:30.000Z"},{"event_type":"user_message","timestamp":"2026-01-01T00:07:35.000Z"},{"event_type":"reasoning","timestamp":"2026-01-01T00:07:37.000Z"},{"event_type":"text","timestamp":"2026-01-01T00:07:40.000Z"}]}
{"provider":"p","session_id":"s1","round_index":4,"prefix_tokens":1400,"newly_append_tokens":150,"output_tokens":10,"timing_events":[{"event_type":"user_message","timestamp":"2026-01-01 around eight"},{"event_type":"reasoning","timestamp":"2026-01-01T00:08:25.000Z"},{"event_type":"text","timestamp":"2026-01-01T00:08:26.000Z"}],"tools":[{"tool_name":"Bash","tool_call_id":"c2","emitted_at":"2026-01-01T00:08:26.000Z","result_at":"2026-01-01T00:08:26.300Z","tool_wall_latency_ms":300,"tool_internal_latency_ms":0}]}
{"provider":"p","round_index":5,"prefix_tokens":10,"newly_append_tokens":5,"output_tokens":7,"timing_events":[{"event_type":"user_message","timestamp":"2026-01-01T00:11:40.000Z"},{"event_type":"reasoning","timestamp":"2026-01-01T00:11:42.000Z"},{"event_type":"text","timestamp":"2026-01-01T00:11:45.000Z"}],"tools":[{"tool_name":"Bash","tool_call_id":"c9","emitted_at":"2026-01-01T00:11:43.000Z","result_at":"2026-01-01T00:11:45.000Z","tool_wall_latency_ms":2000,"tool_internal_latency_ms":1500.0}]}
{"provider":"p","session_id":"s1","round_index":5,"prefix_tokens":1500,"newly_append_tokens":100,"output_tokens":true,"timing_events":[{"event_type":"tool_result","timestamp":"2026-01-01T00:08:26.300Z","tool_call_id":"c2"},{"event_type":"reasoning","timestamp":"2026-01-01T00:08:28.000Z"},{"event_type":"text","timestamp":"2026-01-01T00:08:35.000Z"}]}
"#;

    const S: i64 = 1_000_000_000;

    fn crafted() -> TraceStats {
        let mut st = TraceStats::new(&[60 * S]);
        let sum = read_bytes(CRAFTED.as_bytes(), |s, tools| {
            st.add(&s, tools);
            Ok(())
        })
        .unwrap();
        assert_eq!((sum.rows, sum.bad_lines, sum.loose_rows), (7, 0, 1));
        st
    }

    #[test]
    fn crafted_trace_counts_and_sums() {
        let st = crafted();
        // every row counts per row; the row without session_id is loose
        assert_eq!((st.steps, st.loose_rows, st.sessions), (7, 1, 1));
        // A's two calls, E's and F's
        assert_eq!(st.tool_calls, 4);
        // counted: B (tool, gap 10 s: c1's 13 − 3; the "" result is no call
        // id), D (user, gap 445 − 145 = 300 s), E (user, first parsed time
        // 505 − 460 = 45 s), G (tool, c2's 0.3 s). Not A (first row), not C
        // (prefix 1100.0 is a float: unknown).
        assert_eq!(st.counted, 4);
        // fresh = clamp(max(0, L − L_prev) − out_prev, 0, append):
        // B: 1200 − 1000 − 100 = 100; D: min(1500 − 200 − 30, 300) = 300
        // (C's L = 0 + 200); E: 1550 − 1500 − 20 = 30; G: 1600 − 1550 − 10 = 40
        assert_eq!(st.sum_l, [5850, 3050, 2800]);
        assert_eq!(st.sum_prefix, [5000, 2600, 2400]);
        assert_eq!(st.sum_cacheable, [5380, 2720, 2660]);
        assert_eq!((st.sum_append, st.sum_fresh), (850, 470));
        // spans (last output − last input ≤ first output): A 3.5, B 37 − 30,
        // C 5, D 460 − 445, E none (no timed input), F 5 (loose, counted), G 8.7
        assert_eq!(st.sum_gen_ns, 44_200_000_000);
        assert_eq!(st.gen_span_s.count(), 6);
    }

    #[test]
    fn crafted_trace_study_quantities() {
        let st = crafted();
        assert_eq!(
            st.real_hit(),
            [5000.0 / 5850.0, 2600.0 / 3050.0, 2400.0 / 2800.0]
        );
        assert_eq!(
            st.optimal_hit(),
            [5380.0 / 5850.0, 2720.0 / 3050.0, 2660.0 / 2800.0]
        );
        assert_eq!(st.observed_amplification(), 850.0 / 470.0);
        // hit(τ) steps up at the gaps 0.3, 10, 45, 300 s: 1560, 2660, 4180,
        // 5380 of 5850. Real 0.8547 is nearest to 5380/5850 = 0.9197 (0.065
        // off; 4180/5850 = 0.7145 is 0.140 off), first reached at the
        // landmark 300 s (no grid point lies in [300 s, gap)).
        assert_eq!(st.effective_eviction_s(), Some(300.0));
        let p = st.at(60 * S).unwrap();
        assert_eq!(p.hit, 4180.0 / 5850.0);
        assert_eq!(p.amplification, (470.0 + 1200.0) / 470.0);
    }

    #[test]
    fn crafted_trace_waits_and_latencies() {
        let st = crafted();
        // human_input_wait in file order for s1: C's user 140 − B's last
        // event 37 = 103; D's user 445 − C's 145 = 300; D's second user
        // 455 − text 450 = 5. E's user has no time; F has no session_id.
        let mut w = st.human_wait_s.v.borrow().clone();
        w.sort_by(f64::total_cmp);
        assert_eq!(w, vec![5.0, 103.0, 300.0]);
        // numpy.percentile([5, 103, 300], p): virtual index 2·p/100
        assert_eq!(st.human_wait_s.percentile(50.0), 103.0);
        assert_eq!(st.human_wait_s.percentile(10.0), 5.0 + 98.0 * 0.2);
        assert_eq!(
            st.human_wait_s.percentile(90.0),
            300.0 - 197.0 * (1.0 - 0.8)
        );
        assert_eq!(st.human_wait_s.percentile(0.0), 5.0);
        assert_eq!(st.human_wait_s.percentile(100.0), 300.0);
        // effective latency: c1 internal 9.5 s; "" Read: internal null, wall
        // 26.5 s; c2: internal 0 (an integer, so taken) not > 0, dropped;
        // c9: internal 1500.0 is a float, wall 2 s
        let mut l = st.tool_latency_s.v.borrow().clone();
        l.sort_by(f64::total_cmp);
        assert_eq!(l, vec![2.0, 9.5, 26.5]);
        assert_eq!(st.per_tool["Bash"].count(), 2);
        assert_eq!(st.per_tool["Read"].count(), 1);
        // tokens where present: C's float prefix and G's boolean output are absent
        assert_eq!(st.prefix.count(), 6);
        assert_eq!(st.append.count(), 7);
        assert_eq!(st.output.count(), 6);
        assert_eq!(st.prefix.percentile(50.0), (900.0 + 1200.0) / 2.0);
    }

    #[test]
    fn percentiles_interpolate_as_numpy() {
        let mut s = Samples::new();
        assert!(s.percentile(50.0).is_nan());
        for x in [4.0, 1.0, 3.0, 2.0] {
            s.add(x);
        }
        // numpy.percentile([1, 2, 3, 4], [25, 50, 75, 90]) = 1.75, 2.5, 3.25, 3.7
        assert_eq!(s.percentile(25.0), 1.75);
        assert_eq!(s.percentile(50.0), 2.5);
        assert_eq!(s.percentile(75.0), 3.25);
        assert_eq!(s.percentile(90.0), 3.7);
        let mut one = Samples::new();
        one.add(7.0);
        assert_eq!(one.percentile(99.0), 7.0);
    }

    #[test]
    fn study_grid_has_the_landmarks() {
        let g = study_grid_s();
        // 260 log points (the last is 10^log10(14400), a hair under 14400)
        // plus 1 s, 4 h and the landmarks; 1 s is shared
        assert_eq!(g.first(), Some(&1.0));
        assert_eq!(g.last(), Some(&14400.0));
        for l in [60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0] {
            assert!(g.contains(&l), "{l}");
        }
        assert!(g.windows(2).all(|w| w[0] < w[1]));
    }
}
