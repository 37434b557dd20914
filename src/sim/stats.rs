//! `kvpark trace stats`: the workload distributions and the idealised TTL
//! sweep of DESIGN §6, computed in one streaming pass over sessions.
//!
//! Token and time sums are exact integers (u128 tokens, i128 nanoseconds),
//! so the sweep's hit rate, amplification and storage ratio agree to the last
//! digit with any other implementation of §6. Quantiles come from
//! [`LogHist`] (±0.5%).

use std::collections::HashMap;
use std::fmt::Write;

use super::hist::LogHist;
use super::trace::{Session, TimeNs, ToolNames, Trigger};

const NS: f64 = 1e9;

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
    /// Sessions seen.
    pub sessions: u64,
    /// Rows (steps) seen.
    pub steps: u64,
    /// Steps entering the sweep.
    pub counted: u64,
    /// Sessions per provider.
    pub providers: HashMap<String, u64>,
    /// Requests (user-initiated steps) per session.
    pub requests_per_session: LogHist,
    /// Tool-initiated steps following each user-initiated step.
    pub tool_steps_per_request: LogHist,
    /// Tool calls per step, over steps that emit at least one call.
    pub calls_per_step: LogHist,
    /// Human waits before counted user steps (s).
    pub human_wait_s: LogHist,
    /// Tool call wall durations (s).
    pub tool_latency_s: LogHist,
    /// Tool latency per tool name.
    pub per_tool: HashMap<String, LogHist>,
    /// Generation span (s).
    pub gen_span_s: LogHist,
    /// prefix_tokens.
    pub prefix: LogHist,
    /// newly_append_tokens.
    pub append: LogHist,
    /// output_tokens.
    pub output: LogHist,
    /// Sessions with at least one compaction (L falls below half of the previous L, from ≥ 20k).
    pub sessions_with_compaction: u64,
    /// Σ L of counted steps, all / user / tool.
    pub sum_l: [u128; 3],
    /// Σ fresh of counted steps.
    pub sum_fresh: u128,
    /// Σ generation span over all rows (ns).
    pub sum_gen_ns: i128,
    /// TTL accumulators (sorted by τ).
    pub ttl: Vec<TtlAcc>,
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

impl TraceStats {
    /// An empty accumulator sweeping the given τ values (ns).
    pub fn new(taus: &[i64]) -> Self {
        TraceStats {
            sessions: 0,
            steps: 0,
            counted: 0,
            providers: HashMap::new(),
            requests_per_session: LogHist::new(),
            tool_steps_per_request: LogHist::new(),
            calls_per_step: LogHist::new(),
            human_wait_s: LogHist::new(),
            tool_latency_s: LogHist::new(),
            per_tool: HashMap::new(),
            gen_span_s: LogHist::new(),
            prefix: LogHist::new(),
            append: LogHist::new(),
            output: LogHist::new(),
            sessions_with_compaction: 0,
            sum_l: [0; 3],
            sum_fresh: 0,
            sum_gen_ns: 0,
            ttl: taus
                .iter()
                .map(|&t| TtlAcc {
                    tau_ns: t,
                    ..Default::default()
                })
                .collect(),
            starts_by_hour: [0; 24],
            spans: Vec::new(),
        }
    }

    /// Folds one session in.
    pub fn add(&mut self, s: &Session, tools: &ToolNames) {
        self.sessions += 1;
        *self.providers.entry(s.provider.clone()).or_default() += 1;
        let mut requests = 0u64;
        let mut tool_run: Option<u64> = None;
        let mut compacted = false;
        let mut prev_l = 0u64;
        let (mut start, mut end) = (None::<TimeNs>, None::<TimeNs>);
        for st in &s.steps {
            self.steps += 1;
            if let Some(t) = st.first_activity {
                start = Some(start.map_or(t, |x| x.min(t)));
            }
            if let Some(t) = st.last_activity {
                end = Some(end.map_or(t, |x| x.max(t)));
            }
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
            if !st.calls.is_empty() {
                self.calls_per_step.add(st.calls.len() as f64);
            }
            for c in &st.calls {
                if let Some(d) = c.dur {
                    let v = d as f64 / NS;
                    self.tool_latency_s.add(v);
                    self.per_tool
                        .entry(tools.name(c.tool).to_string())
                        .or_default()
                        .add(v);
                }
            }
            if let Some(g) = st.gen_span {
                self.gen_span_s.add(g as f64 / NS);
                self.sum_gen_ns += g as i128;
            }
            if st.l > 0 {
                self.prefix.add(st.prefix as f64);
                self.append.add(st.append as f64);
                self.output.add(st.output as f64);
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
                if st.trigger == Trigger::User {
                    self.human_wait_s.add(gap as f64 / NS);
                }
                self.sum_l[0] += st.l as u128;
                self.sum_l[c] += st.l as u128;
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
            }
        }
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
        let div = |a: u128, b: u128| if b == 0 { 0.0 } else { a as f64 / b as f64 };
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

    /// The printed report, with the study's figures beside ours.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let claude = *self.providers.get("claude").unwrap_or(&0) as f64;
        let codex = *self.providers.get("codex").unwrap_or(&0) as f64;
        let tot = self.sessions.max(1) as f64;
        let _ = writeln!(
            o,
            "sessions {}   steps {}   counted steps {}   claude {:.1}% / codex {:.1}%   (study: 4,265 / 357,161; 63% / 37%)",
            self.sessions,
            self.steps,
            self.counted,
            100.0 * claude / tot,
            100.0 * codex / tot
        );
        let (peak, mean) = self.overlap();
        let hmax = *self.starts_by_hour.iter().max().unwrap_or(&0) as f64;
        let hmin = *self.starts_by_hour.iter().min().unwrap_or(&0) as f64;
        let _ = writeln!(
            o,
            "sessions open at once: peak {peak}, mean {mean:.1}; session starts per hour of day max/min {:.1}",
            if hmin > 0.0 { hmax / hmin } else { f64::INFINITY }
        );
        let _ = writeln!(
            o,
            "compactions: {:.1}% of sessions (study ≈10%); top-3 tools {:.1}% of calls (study > 80%); calls over 1 min {:.1}% (study ≈4%)",
            100.0 * self.sessions_with_compaction as f64 / tot,
            100.0 * self.top3_share(),
            100.0 * self.tool_latency_s.frac_above(60.0)
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<34} {:>10} {:>10} {:>10} {:>10}   study (avg / p50 / p90 / p99)",
            "distribution", "avg", "p50", "p90", "p99"
        );
        let row = |o: &mut String, name: &str, h: &LogHist, scale: f64, study: &str| {
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
            "human wait before user msg (s)",
            &self.human_wait_s,
            1.0,
            "- / 86 / 1260 / 50400",
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
            "- / ≈120 / - / -",
        );
        row(
            &mut o,
            "append (tokens)",
            &self.append,
            1.0,
            "- / ≈870 / heavy / -",
        );
        row(
            &mut o,
            "output (tokens)",
            &self.output,
            1.0,
            "- / ≈200 / - / -",
        );
        let _ = writeln!(o);
        let mut tools: Vec<(&String, &LogHist)> = self.per_tool.iter().collect();
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
        let study = [
            "85.4% / 0.74 / 18.9×",
            "≈94% / ≈1.9 / 7.4×",
            "98.6% / 5.07 / 1.8×",
        ];
        for (i, &tau) in TABLE_TTLS.iter().enumerate() {
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
                    study[i]
                );
            }
        }
        o
    }
}
