//! kvpark's gap predictor ([`Learned`]).
//!
//! State, all [`LogHist`]s of log10 seconds:
//! - a global histogram and one per awaiting kind (tool / user / unknown);
//! - per tool name (up to [`LearnedConfig::max_tools`]), the gaps of steps
//!   that waited on that tool alone (a step waiting on several tools waits for
//!   the longest, so its gap is not one tool's latency);
//! - per hour-of-day bucket, the human gaps (an evening suspend is more
//!   often an overnight one);
//! - per session, constant: a decayed mean of its residuals (log gap − the
//!   population's mean log gap for its context) per kind, and their weight.
//!
//! Prediction for kind K: the population distribution is the most specific
//! histogram blended with its parent by how much it has seen (`n / (n +
//! n0)`): tool ← kind ← global, hour ← kind ← global. Several pending tools:
//! the distribution of the longest, P(max ≤ t) = Π P(gap_i ≤ t).
//!
//! Whether the hour of day helps is measured the same way: human gaps are
//! predicted with and without their hour's histogram, and the one with the
//! lower decayed pinball loss is used.
//!
//! The session's own gaps enter as a second candidate: the session's shrunk
//! mean residual `a` shifts a distribution learned from *adjusted* gaps
//! (log gap − `a` of sessions that had seen enough of their own gaps), which
//! is narrower than the population's when sessions differ and as wide when
//! they do not. Which candidate is used, per kind, is decided by their
//! decayed pinball loss on the gaps observed so far — so a workload where
//! sessions do not differ falls back to the population distribution.
//!
//! Before any gap is seen, the tool and human histograms hold the study's
//! published medians and p90s as log-normals of twenty pseudo-observations
//! ([`LearnedConfig::study_prior`]); real gaps soon outweigh them.
//!
//! Everything is updated at [`GapPredictor::observe`]; [`GapPredictor::predict`]
//! reads only. Memory: histograms O(kinds + hours + tools), bounded by
//! [`LearnedConfig::max_tools`] (1.8 KB each), and 16 bytes of state per live
//! session (plus its map entry), removed by [`GapPredictor::end`].

use std::collections::HashMap;

use super::hist::{
    cdf_of_mass, dist_from_cdf, log10_s, mean_of_cdf, quantile_of_cdf, LogHist, BINS,
};
use super::{pinball, GapContext, GapDist, GapPredictor, Kind};
use crate::session::{Nanos, SessionId};

/// Tunables of [`Learned`] (the defaults are the documented design).
#[derive(Clone, Debug)]
pub struct LearnedConfig {
    /// Decay per observation of the global and per-kind histograms.
    pub alpha_kind: f64,
    /// Decay per observation of a tool's or an hour's histogram (its recent
    /// latencies count most).
    pub alpha_key: f64,
    /// Weight at which a tool's or an hour's histogram and its parent
    /// count equally.
    pub n0: f64,
    /// The same for a kind's histogram over the global one (small: the
    /// kinds differ by orders of magnitude).
    pub n0_kind: f64,
    /// Tool names tracked; later new names use the tool kind's histogram.
    pub max_tools: usize,
    /// Pending tools combined (the longest of the first this many).
    pub max_pending: usize,
    /// Hour-of-day buckets (24 / buckets hours each).
    pub hour_buckets: u32,
    /// Decay per own gap of a session's residual mean.
    pub session_decay: f32,
    /// Prior weight shrinking the session's mean residual toward 0.
    pub session_prior: f32,
    /// Own gaps of a kind a session needs before its shift is used.
    pub session_min: f32,
    /// Decay per observation of the candidates' pinball loss.
    pub alpha_loss: f64,
    /// Observations of a kind before the session candidate may be chosen.
    pub select_after: u32,
    /// Start the tool and human histograms from the study's figures
    /// ([`STUDY_TOOL`], [`STUDY_HUMAN`]) as log-normals of twenty pseudo-observations each,
    /// so the first predictions are not blind.
    pub study_prior: bool,
}

/// The study's tool-call latency: (median, p90) in seconds (DESIGN §1).
pub const STUDY_TOOL: (f64, f64) = (0.3, 13.6);
/// The study's human wait before a user message: (median, p90) in seconds.
pub const STUDY_HUMAN: (f64, f64) = (84.0, 1260.0);
/// The standard normal's 0.9-quantile.
const Z90: f64 = 1.281_551_6;
/// Pseudo-observations of each study prior.
const PRIOR_WEIGHT: f64 = 20.0;
impl Default for LearnedConfig {
    fn default() -> Self {
        LearnedConfig {
            alpha_kind: 1.0 / 20_000.0,
            alpha_key: 1.0 / 2_000.0,
            n0: 30.0,
            n0_kind: 0.5,
            max_tools: 512,
            max_pending: 8,
            hour_buckets: 8,
            session_decay: 0.9,
            session_prior: 1.0,
            session_min: 2.0,
            alpha_loss: 1.0 / 2_000.0,
            select_after: 200,
            study_prior: true,
        }
    }
}

/// Per-session state (constant size): residual sums and weights for tool
/// and human gaps.
#[derive(Clone, Copy, Debug, Default)]
struct Sess {
    sum: [f32; 2],
    w: [f32; 2],
}

/// Histograms of one candidate (raw gaps or session-adjusted gaps).
#[derive(Clone, Debug)]
struct Hists {
    kind: [LogHist; 3],
    hour: Vec<LogHist>,
}

/// The candidates: 0 = population, 1 = session-shifted.
const RAW: usize = 0;
const ADJ: usize = 1;

/// kvpark's gap predictor; see the module docs.
#[derive(Clone, Debug)]
pub struct Learned {
    cfg: LearnedConfig,
    global: LogHist,
    h: [Hists; 2],
    tools: HashMap<String, [LogHist; 2]>,
    sessions: HashMap<SessionId, Sess>,
    /// Decayed mean pinball loss per kind and candidate, and observations.
    loss: [[f64; 2]; 3],
    seen: [u32; 3],
    /// The same for human gaps without and with the hour of day.
    hour_loss: [f64; 2],
    hour_seen: u32,
}

impl Default for Learned {
    fn default() -> Self {
        Learned::new(LearnedConfig::default())
    }
}

impl Learned {
    /// An empty predictor.
    pub fn new(cfg: LearnedConfig) -> Self {
        let hists = |c: &LearnedConfig| Hists {
            kind: std::array::from_fn(|_| LogHist::new(c.alpha_kind)),
            hour: (0..c.hour_buckets.max(1))
                .map(|_| LogHist::new(c.alpha_key))
                .collect(),
        };
        let mut h = [hists(&cfg), hists(&cfg)];
        let mut global = LogHist::new(cfg.alpha_kind);
        if cfg.study_prior {
            for (k, (median, p90)) in [STUDY_TOOL, STUDY_HUMAN].into_iter().enumerate() {
                let sigma = (p90 / median).log10() / Z90;
                h[RAW].kind[k].add_normal(median.log10(), sigma, PRIOR_WEIGHT);
                global.add_normal(median.log10(), sigma, PRIOR_WEIGHT);
            }
        }
        Learned {
            global,
            h,
            tools: HashMap::new(),
            sessions: HashMap::new(),
            loss: [[0.0; 2]; 3],
            seen: [0; 3],
            hour_loss: [0.0; 2],
            hour_seen: 0,
            cfg,
        }
    }

    /// Whether the session-shifted candidate is in use for `kind`.
    pub fn uses_session(&self, kind: Kind) -> bool {
        let k = kind.index();
        kind != Kind::Unknown
            && self.seen[k] >= self.cfg.select_after
            && self.loss[k][ADJ] < self.loss[k][RAW]
    }

    /// Whether human gaps are predicted per hour of day (once the loss says
    /// it helps).
    pub fn uses_hour(&self) -> bool {
        self.hour_seen >= self.cfg.select_after && self.hour_loss[1] < self.hour_loss[0]
    }

    /// Tool names tracked.
    pub fn tracked_tools(&self) -> usize {
        self.tools.len()
    }

    fn hour_bucket(&self, ctx: &GapContext) -> Option<usize> {
        let b = self.cfg.hour_buckets.max(1);
        ctx.hour().map(|h| (h * b / 24) as usize)
    }

    /// The session's shift for `kind`, when it has seen enough own gaps.
    fn shift(&self, s: SessionId, kind: Kind) -> Option<f64> {
        let k = match kind {
            Kind::Tool => 0,
            Kind::User => 1,
            Kind::Unknown => return None,
        };
        let st = self.sessions.get(&s)?;
        (st.w[k] >= self.cfg.session_min)
            .then(|| (st.sum[k] / (st.w[k] + self.cfg.session_prior)) as f64)
    }

    /// Blends `own` (weight by its count) over the normalised `parent` into
    /// `out` (probability masses).
    fn blend(&self, own: Option<&LogHist>, n0: f64, parent: &[f64; BINS], out: &mut [f64; BINS]) {
        let n = own.map_or(0.0, |h| h.count());
        let w = n / (n + n0);
        for (o, p) in out.iter_mut().zip(parent) {
            *o = p * (1.0 - w);
        }
        if let Some(h) = own {
            h.add_mass_into(out, w);
        }
    }

    /// The CDF (at the bin edges) of candidate `c` for `ctx`, unshifted;
    /// `None` when nothing has been seen.
    fn cdf(&self, ctx: &GapContext, c: usize, hour: bool, out: &mut [f64; BINS + 1]) -> Option<()> {
        if self.global.count() <= 0.0 {
            return None;
        }
        let kind = ctx.kind();
        let h = &self.h[c];
        let mut glob = [0.0; BINS];
        self.global.add_mass_into(&mut glob, 1.0);
        let mut parent = [0.0; BINS];
        if kind == Kind::Unknown {
            parent = glob;
        } else {
            self.blend(
                Some(&h.kind[kind.index()]),
                self.cfg.n0_kind,
                &glob,
                &mut parent,
            );
        }
        let mut mass = [0.0; BINS];
        match kind {
            Kind::Tool => {
                let mut any = false;
                out.fill(1.0);
                let mut one = [0.0; BINS + 1];
                for name in ctx.pending_tools().take(self.cfg.max_pending.max(1)) {
                    any = true;
                    let own = self.tools.get(name).map(|t| &t[c]);
                    self.blend(own, self.cfg.n0, &parent, &mut mass);
                    cdf_of_mass(&mass, &mut one);
                    for (o, x) in out.iter_mut().zip(one.iter()) {
                        *o *= x;
                    }
                }
                if !any {
                    cdf_of_mass(&parent, out);
                }
            }
            Kind::User => {
                let own = self.hour_bucket(ctx).filter(|_| hour).map(|b| &h.hour[b]);
                self.blend(own, self.cfg.n0, &parent, &mut mass);
                cdf_of_mass(&mass, out);
            }
            Kind::Unknown => cdf_of_mass(&parent, out),
        }
        Some(())
    }

    /// Pinball loss (log10 s, mean of p10/p50/p90) of a CDF shifted by `a`.
    fn loss_of(cdf: &[f64; BINS + 1], a: f64, y: f64) -> f64 {
        [0.1, 0.5, 0.9]
            .iter()
            .map(|&p| pinball(p, quantile_of_cdf(cdf, p) + a, y))
            .sum::<f64>()
            / 3.0
    }
}

impl GapPredictor for Learned {
    fn predict(&self, ctx: &GapContext) -> Option<GapDist> {
        let kind = ctx.kind();
        let mut cdf = [0.0; BINS + 1];
        let hour = self.uses_hour();
        if self.uses_session(kind) {
            if let Some(a) = self.shift(ctx.session, kind) {
                self.cdf(ctx, ADJ, hour, &mut cdf)?;
                return Some(dist_from_cdf(&cdf, a));
            }
        }
        self.cdf(ctx, RAW, hour, &mut cdf)?;
        Some(dist_from_cdf(&cdf, 0.0))
    }

    fn observe(&mut self, ctx: &GapContext, gap: Nanos) {
        let y = log10_s(gap);
        let kind = ctx.kind();
        let k = kind.index();
        let shift = self.shift(ctx.session, kind);
        // score the candidates on this gap before learning from it
        let mut raw = [0.0; BINS + 1];
        let mut center = None;
        let hour = self.uses_hour();
        if kind == Kind::User && ctx.hour().is_some() {
            let mut other = [0.0; BINS + 1];
            if self.cdf(ctx, RAW, !hour, &mut other).is_some() {
                let l = Self::loss_of(&other, 0.0, y);
                let alpha = self.cfg.alpha_loss.max(1.0 / (self.hour_seen as f64 + 1.0));
                self.cdf(ctx, RAW, hour, &mut raw);
                let mine = Self::loss_of(&raw, 0.0, y);
                let (no, yes) = if hour { (l, mine) } else { (mine, l) };
                self.hour_loss[0] += alpha * (no - self.hour_loss[0]);
                self.hour_loss[1] += alpha * (yes - self.hour_loss[1]);
                self.hour_seen = self.hour_seen.saturating_add(1);
            }
        }
        if self.cdf(ctx, RAW, hour, &mut raw).is_some() {
            // the mean, not the median: it moves little when the
            // distribution has two modes
            center = Some(mean_of_cdf(&raw));
            if let Some(a) = shift {
                let mut adj = [0.0; BINS + 1];
                if self.cdf(ctx, ADJ, hour, &mut adj).is_some() {
                    let l = [Self::loss_of(&raw, 0.0, y), Self::loss_of(&adj, a, y)];
                    let alpha = self.cfg.alpha_loss.max(1.0 / (self.seen[k] as f64 + 1.0));
                    for (m, l) in self.loss[k].iter_mut().zip(l) {
                        *m += alpha * (l - *m);
                    }
                    self.seen[k] = self.seen[k].saturating_add(1);
                }
            }
        }
        // the session's residual against the population's centre
        if let (Some(m), Some(j)) = (center, [Some(0), Some(1), None][k]) {
            let st = self.sessions.entry(ctx.session).or_default();
            let d = self.cfg.session_decay;
            st.sum[j] = st.sum[j] * d + (y - m) as f32;
            st.w[j] = st.w[j] * d + 1.0;
        }
        // the histograms
        self.global.add(y);
        let adj_y = shift.map(|a| y - a);
        self.h[RAW].kind[k].add(y);
        if let Some(v) = adj_y {
            self.h[ADJ].kind[k].add(v);
        }
        match kind {
            Kind::Tool => {
                let mut names = ctx.pending_tools();
                if let (Some(name), None) = (names.next(), names.next()) {
                    if !self.tools.contains_key(name) && self.tools.len() < self.cfg.max_tools {
                        let a = self.cfg.alpha_key;
                        self.tools
                            .insert(name.to_string(), [LogHist::new(a), LogHist::new(a)]);
                    }
                    if let Some(t) = self.tools.get_mut(name) {
                        t[RAW].add(y);
                        if let Some(v) = adj_y {
                            t[ADJ].add(v);
                        }
                    }
                }
            }
            Kind::User => {
                if let Some(b) = self.hour_bucket(ctx) {
                    self.h[RAW].hour[b].add(y);
                    if let Some(v) = adj_y {
                        self.h[ADJ].hour[b].add(v);
                    }
                }
            }
            Kind::Unknown => {}
        }
    }

    fn end(&mut self, session: SessionId) {
        self.sessions.remove(&session);
    }

    fn tracked_sessions(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Awaiting, Hint};

    /// splitmix64 + Box–Muller: a log-normal gap stream without the simulator.
    struct Gen(u64);
    impl Gen {
        fn u(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (a, b) = (self.u().max(1e-300), self.u());
            (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
        }
        /// Log-normal gap with median `med` seconds and log-σ `s` (natural).
        fn gap(&mut self, med: f64, s: f64) -> Nanos {
            (med * (s * self.normal()).exp() * 1e9) as Nanos
        }
    }

    fn hint(awaiting: Awaiting, tool: Option<&str>) -> Hint {
        Hint {
            awaiting,
            tool: tool.map(str::to_string),
        }
    }

    fn ctx<'a>(s: SessionId, h: &'a Hint, tools: &'a [&'a str]) -> GapContext<'a> {
        GapContext {
            session: s,
            hint: h,
            tools,
            ended_with_tool_calls: None,
            now: 0,
            wall_ns: None,
        }
    }

    fn q_s(d: &GapDist, p: f64) -> f64 {
        d.quantile(p).unwrap() as f64 / 1e9
    }

    #[test]
    fn constant_tool_latency_gives_its_median() {
        let mut l = Learned::default();
        let h = hint(Awaiting::Tool, Some("Read"));
        let c = ctx(1, &h, &[]);
        // nothing seen yet: the study's tool latencies
        let d = l.predict(&c).unwrap();
        assert!((q_s(&d, 0.5) / STUDY_TOOL.0 - 1.0).abs() < 0.15, "{d:?}");
        assert!((q_s(&d, 0.9) / STUDY_TOOL.1 - 1.0).abs() < 0.25, "{d:?}");
        let bare = Learned::new(LearnedConfig {
            study_prior: false,
            ..LearnedConfig::default()
        });
        assert!(bare.predict(&c).is_none(), "no prior, nothing seen");
        for _ in 0..500 {
            l.observe(&c, 3_000_000_000);
        }
        let d = l.predict(&c).unwrap();
        for p in [0.1, 0.5, 0.9] {
            let q = q_s(&d, p);
            assert!((q / 3.0 - 1.0).abs() < 0.13, "p{p}: {q} s, want ≈ 3 s");
        }
    }

    #[test]
    fn two_tools_are_told_apart() {
        let mut l = Learned::default();
        let mut g = Gen(7);
        let (hr, hb) = (
            hint(Awaiting::Tool, Some("Read")),
            hint(Awaiting::Tool, Some("Build")),
        );
        for i in 0..4000u64 {
            let s = i % 50;
            l.observe(&ctx(s, &hr, &[]), g.gap(0.1, 0.5));
            l.observe(&ctx(s, &hb, &[]), g.gap(30.0, 0.5));
        }
        let r = l.predict(&ctx(99, &hr, &[])).unwrap();
        let b = l.predict(&ctx(99, &hb, &[])).unwrap();
        assert!((q_s(&r, 0.5) / 0.1 - 1.0).abs() < 0.15, "{r:?}");
        assert!((q_s(&b, 0.5) / 30.0 - 1.0).abs() < 0.15, "{b:?}");
        // p90 of a log-normal: median × e^(1.2816 σ)
        let want = 30.0 * (1.2816f64 * 0.5).exp();
        assert!((q_s(&b, 0.9) / want - 1.0).abs() < 0.15, "{b:?}");
        // an unknown tool falls back to the tool kind: between the two
        let u = l
            .predict(&ctx(99, &hint(Awaiting::Tool, Some("New")), &[]))
            .unwrap();
        assert!(q_s(&u, 0.1) < 0.5 && q_s(&u, 0.9) > 10.0, "{u:?}");
        // several pending tools: the longest decides
        let both = l.predict(&ctx(99, &hr, &["Read", "Build"])).unwrap();
        assert!((q_s(&both, 0.5) / 30.0 - 1.0).abs() < 0.15, "{both:?}");
        assert_eq!(l.tracked_tools(), 2);
    }

    #[test]
    fn kind_is_inferred_from_tool_calls_without_a_hint() {
        let mut l = Learned::default();
        let none = hint(Awaiting::Unknown, None);
        let mut g = Gen(3);
        for _ in 0..2000 {
            let mut c = ctx(1, &none, &[]);
            c.ended_with_tool_calls = Some(true);
            l.observe(&c, g.gap(0.5, 0.3));
            c.ended_with_tool_calls = Some(false);
            l.observe(&c, g.gap(300.0, 0.3));
        }
        let mut c = ctx(2, &none, &[]);
        c.ended_with_tool_calls = Some(true);
        let t = q_s(&l.predict(&c).unwrap(), 0.5);
        c.ended_with_tool_calls = Some(false);
        let u = q_s(&l.predict(&c).unwrap(), 0.5);
        assert!((t / 0.5 - 1.0).abs() < 0.15, "tool p50 {t}");
        assert!((u / 300.0 - 1.0).abs() < 0.15, "human p50 {u}");
    }

    #[test]
    fn hour_of_day_separates_evening_gaps() {
        let mut l = Learned::default();
        let h = hint(Awaiting::User, None);
        let mut g = Gen(11);
        let at = |hour: i64| hour * 3_600_000_000_000 + 86_400_000_000_000 * 400;
        for i in 0..3000u64 {
            let mut c = ctx(i % 40, &h, &[]);
            c.wall_ns = Some(at(10));
            l.observe(&c, g.gap(60.0, 0.8));
            c.wall_ns = Some(at(22));
            l.observe(&c, g.gap(20_000.0, 0.8));
        }
        let mut c = ctx(77, &h, &[]);
        c.wall_ns = Some(at(10));
        let day = q_s(&l.predict(&c).unwrap(), 0.5);
        c.wall_ns = Some(at(22));
        let night = q_s(&l.predict(&c).unwrap(), 0.5);
        assert!((day / 60.0 - 1.0).abs() < 0.2, "day p50 {day}");
        assert!((night / 20_000.0 - 1.0).abs() < 0.2, "night p50 {night}");
    }

    /// Mean pinball loss (log10 s) of `d` at p10/p50/p90 for `gap`.
    fn loss(d: &GapDist, gap: Nanos) -> f64 {
        [0.1, 0.5, 0.9]
            .iter()
            .map(|&p| pinball(p, log10_s(d.quantile(p).unwrap()), log10_s(gap)))
            .sum::<f64>()
            / 3.0
    }

    /// Human gaps whose median differs per session (10 s or 1000 s) when
    /// `spread`: shares of gaps at or below p50 and p90 over the second half,
    /// and the mean pinball loss of `l` and of the per-kind histogram.
    fn run_sessions(l: &mut Learned, spread: bool) -> (f64, f64, f64, f64) {
        let h = hint(Awaiting::User, None);
        let mut base = super::super::GlobalHist::by_kind();
        let mut g = Gen(5);
        let (mut below50, mut below90, mut n) = (0.0, 0.0, 0.0);
        let (mut ll, mut lb) = (0.0, 0.0);
        for s in 0..600u64 {
            let med = if spread && s % 2 == 0 { 10.0 } else { 1000.0 };
            for _ in 0..20 {
                let c = ctx(s, &h, &[]);
                let gap = g.gap(med, 0.6);
                if s >= 300 {
                    let d = l.predict(&c).unwrap();
                    below50 += (gap <= d.quantile(0.5).unwrap()) as u8 as f64;
                    below90 += (gap <= d.quantile(0.9).unwrap()) as u8 as f64;
                    ll += loss(&d, gap);
                    lb += loss(&base.predict(&c).unwrap(), gap);
                    n += 1.0;
                }
                l.observe(&c, gap);
                base.observe(&c, gap);
            }
            l.end(s);
        }
        (below50 / n, below90 / n, ll / n, lb / n)
    }

    #[test]
    fn sessions_own_gaps_are_used_when_sessions_differ() {
        let mut l = Learned::default();
        let (b50, b90, loss, base) = run_sessions(&mut l, true);
        assert!(l.uses_session(Kind::User));
        // one decade between the two kinds of sessions: the session's own
        // gaps take most of it off the loss
        assert!(loss < 0.5 * base, "{loss} vs {base}");
        assert!(
            (b50 - 0.5).abs() < 0.05 && (b90 - 0.9).abs() < 0.04,
            "{b50} {b90}"
        );
        // a fast session with a few gaps behind it: its p90 is well under
        // the slow sessions' median
        let h = hint(Awaiting::User, None);
        let mut g = Gen(9);
        for _ in 0..5 {
            l.observe(&ctx(1000, &h, &[]), g.gap(10.0, 0.6));
        }
        let d = l.predict(&ctx(1000, &h, &[])).unwrap();
        assert!(q_s(&d, 0.9) < 100.0, "{d:?}");
    }

    #[test]
    fn session_shift_is_not_used_when_sessions_are_alike() {
        let mut l = Learned::default();
        let (b50, b90, loss, base) = run_sessions(&mut l, false);
        assert!(!l.uses_session(Kind::User));
        assert!(loss < 1.02 * base, "{loss} vs {base}");
        assert!(
            (b50 - 0.5).abs() < 0.05 && (b90 - 0.9).abs() < 0.04,
            "{b50} {b90}"
        );
    }

    #[test]
    fn session_state_is_constant_and_freed_at_end() {
        let mut l = Learned::default();
        let h = hint(Awaiting::User, None);
        let t = hint(Awaiting::Tool, Some("Bash"));
        // the first gap ever has no population to be a residual against
        l.observe(&ctx(999, &h, &[]), 60_000_000_000);
        l.end(999);
        for s in 0..100u64 {
            l.observe(&ctx(s, &h, &[]), 60_000_000_000);
        }
        assert_eq!(l.tracked_sessions(), 100);
        let before = l.sessions.capacity();
        for _ in 0..200 {
            for s in 0..100u64 {
                l.observe(&ctx(s, &h, &[]), 60_000_000_000);
                l.observe(&ctx(s, &t, &[]), 1_000_000_000);
            }
        }
        assert_eq!(l.tracked_sessions(), 100, "more gaps, no more state");
        assert_eq!(l.sessions.capacity(), before);
        assert_eq!(std::mem::size_of::<Sess>(), 16);
        for s in 0..100u64 {
            l.end(s);
        }
        assert_eq!(l.tracked_sessions(), 0);
        l.end(12345); // unknown session: no-op
        assert_eq!(l.tracked_sessions(), 0);
    }

    #[test]
    fn tool_names_are_capped() {
        let mut l = Learned::new(LearnedConfig {
            max_tools: 4,
            ..LearnedConfig::default()
        });
        for i in 0..10 {
            let name = format!("t{i}");
            let h = hint(Awaiting::Tool, Some(&name));
            l.observe(&ctx(1, &h, &[]), 1_000_000_000);
        }
        assert_eq!(l.tracked_tools(), 4);
        let h = hint(Awaiting::Tool, Some("t9"));
        let d = l.predict(&ctx(1, &h, &[])).unwrap();
        assert!((q_s(&d, 0.5) - 1.0).abs() < 0.13);
    }
}
