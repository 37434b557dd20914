//! Gap predictors (pure: no threads, no I/O, no clock reads; time is an
//! argument).
//!
//! A predictor turns what is known at a suspend — what the session waits for
//! (a tool result or a human), the pending tools' names, the session's own
//! past gaps, the time of day — into a distribution of the coming gap
//! ([`GapDist`], quantiles at the fixed probabilities [`PROBS`]), which a
//! policy turns into expected costs. It learns online from each observed gap
//! ([`GapPredictor::observe`]) and forgets a session when it ends
//! ([`GapPredictor::end`]).
//!
//! - [`Learned`]: kvpark's predictor — per tool, per awaiting kind and per
//!   hour of day, decayed log-space histograms blended by how much each has
//!   seen, shifted by the session's own recent gaps where that has been
//!   measured to help; constant memory per session.
//! - [`GlobalHist`]: the baseline — one histogram of every gap seen (or one
//!   per awaiting kind).
//! - [`LogHist`]: the decayed log-space histogram both are made of.

mod hist;
mod learned;

pub use hist::{LogHist, BINS, BINS_PER_DECADE, LOG10_HI, LOG10_LO};
pub use learned::{Learned, LearnedConfig, STUDY_HUMAN, STUDY_TOOL};

use crate::session::{Awaiting, Hint, Nanos, SessionId};

/// The probabilities at which predictors give quantiles.
pub const PROBS: [f64; 12] = [
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99,
];

/// A predicted gap distribution as quantiles at fixed probabilities.
#[derive(Clone, Debug, PartialEq)]
pub struct GapDist {
    /// (probability, gap) pairs, probability and gap both increasing.
    pub quantiles: Vec<(f64, Nanos)>,
}

impl GapDist {
    /// The empirical distribution of `samples` at the deciles and p95/p99.
    pub fn from_samples(samples: &[Nanos]) -> Option<GapDist> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_unstable();
        let ps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99];
        let quantiles = ps
            .iter()
            .map(|&p| {
                let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
                (p, v[i])
            })
            .collect();
        Some(GapDist { quantiles })
    }

    /// The stored quantile at probability `p` (exactly one of the stored
    /// probabilities), or `None`.
    pub fn quantile(&self, p: f64) -> Option<Nanos> {
        self.quantiles
            .iter()
            .find(|q| (q.0 - p).abs() < 1e-9)
            .map(|q| q.1)
    }

    /// P(gap ≤ t), linear between the stored quantiles.
    pub fn cdf(&self, t: Nanos) -> f64 {
        let mut prev = (0.0, 0u64);
        for &(p, q) in &self.quantiles {
            if t < q {
                let span = (q - prev.1) as f64;
                let frac = if span > 0.0 {
                    (t - prev.1) as f64 / span
                } else {
                    1.0
                };
                return prev.0 + (p - prev.0) * frac;
            }
            prev = (p, q);
        }
        prev.0
            .max(if self.quantiles.is_empty() { 0.0 } else { 1.0 })
    }
}

/// What a predictor sees at a suspend (and again, unchanged, when the gap it
/// predicted is observed).
#[derive(Clone, Debug)]
pub struct GapContext<'a> {
    /// The session (per-session state lives in the predictor under this key
    /// until [`GapPredictor::end`]).
    pub session: SessionId,
    /// The harness hint (awaiting tool / user, tool name).
    pub hint: &'a Hint,
    /// Names of the tool calls the step emitted and that are still pending,
    /// when known; the gap is then the longest of them. Empty: the hint's
    /// tool, if any.
    pub tools: &'a [&'a str],
    /// Whether the step that just ended emitted tool calls (`None`: not
    /// known). Decides the awaiting kind when the hint does not say.
    pub ended_with_tool_calls: Option<bool>,
    /// The suspend time (any fixed origin; not read by the predictors here).
    pub now: Nanos,
    /// Wall clock of the suspend in ns since the Unix epoch, shifted by the
    /// users' UTC offset for local time (`None`: unknown); gives the hour of
    /// day.
    pub wall_ns: Option<i64>,
}

/// What a session waits on, as the predictor resolves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A tool result.
    Tool,
    /// A human.
    User,
    /// Neither hinted nor inferable.
    Unknown,
}

impl Kind {
    /// Index 0..3 (tool, user, unknown).
    pub fn index(self) -> usize {
        match self {
            Kind::Tool => 0,
            Kind::User => 1,
            Kind::Unknown => 2,
        }
    }
}

impl GapContext<'_> {
    /// The awaiting kind: the hint's when it says, else inferred (a step
    /// that ended with tool calls waits on tools, one that ended without
    /// waits on the human).
    pub fn kind(&self) -> Kind {
        match self.hint.awaiting {
            Awaiting::Tool => Kind::Tool,
            Awaiting::User => Kind::User,
            Awaiting::Unknown => match self.ended_with_tool_calls {
                Some(true) => Kind::Tool,
                Some(false) => Kind::User,
                None if !self.tools.is_empty() => Kind::Tool,
                None => Kind::Unknown,
            },
        }
    }

    /// The pending tools' names: [`GapContext::tools`], else the hint's tool.
    pub fn pending_tools(&self) -> impl Iterator<Item = &str> {
        let hint = if self.tools.is_empty() {
            self.hint.tool.as_deref()
        } else {
            None
        };
        self.tools.iter().copied().chain(hint)
    }

    /// The hour of day (0..24) of [`GapContext::wall_ns`].
    pub fn hour(&self) -> Option<u32> {
        self.wall_ns
            .map(|t| (t.div_euclid(3_600_000_000_000).rem_euclid(24)) as u32)
    }
}

/// Predicts the coming gap of a suspended session.
pub trait GapPredictor: Send {
    /// The distribution of the gap, or `None` when nothing is known.
    fn predict(&self, ctx: &GapContext) -> Option<GapDist>;
    /// Learns from the observed gap of the suspend `ctx` described.
    fn observe(&mut self, ctx: &GapContext, gap: Nanos);
    /// The session ended: forget its state.
    fn end(&mut self, _session: SessionId) {}
    /// Sessions whose state the predictor holds.
    fn tracked_sessions(&self) -> usize {
        0
    }
}

/// The baseline: one histogram (without decay) of every gap seen, or one
/// per awaiting kind ([`GlobalHist::by_kind`]), whatever else the context
/// says.
#[derive(Clone, Debug)]
pub struct GlobalHist {
    by_kind: bool,
    hists: [LogHist; 3],
}

impl GlobalHist {
    /// One histogram for all gaps.
    pub fn new() -> Self {
        GlobalHist {
            by_kind: false,
            hists: [LogHist::new(0.0), LogHist::new(0.0), LogHist::new(0.0)],
        }
    }

    /// One histogram per awaiting kind (tool / user / unknown).
    pub fn by_kind() -> Self {
        GlobalHist {
            by_kind: true,
            ..GlobalHist::new()
        }
    }

    fn slot(&self, ctx: &GapContext) -> usize {
        if self.by_kind {
            ctx.kind().index()
        } else {
            0
        }
    }
}

impl Default for GlobalHist {
    fn default() -> Self {
        GlobalHist::new()
    }
}

impl GapPredictor for GlobalHist {
    fn predict(&self, ctx: &GapContext) -> Option<GapDist> {
        let h = &self.hists[self.slot(ctx)];
        let h = if h.count() > 0.0 {
            h
        } else {
            // a kind not seen yet: every kind together
            self.hists
                .iter()
                .max_by(|a, b| a.count().total_cmp(&b.count()))?
        };
        if h.count() <= 0.0 {
            return None;
        }
        let mut cdf = [0.0; BINS + 1];
        h.cdf_into(&mut cdf, 1.0);
        Some(hist::dist_from_cdf(&cdf, 0.0))
    }

    fn observe(&mut self, ctx: &GapContext, gap: Nanos) {
        let i = self.slot(ctx);
        self.hists[i].add(hist::log10_s(gap));
    }
}

/// Pinball (quantile) loss of predicting `q` for the `p`-quantile when the
/// outcome is `y` (same units).
pub fn pinball(p: f64, q: f64, y: f64) -> f64 {
    if y >= q {
        p * (y - q)
    } else {
        (1.0 - p) * (q - y)
    }
}

pub use hist::log10_s;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empirical_quantiles_and_cdf() {
        let v: Vec<Nanos> = (1..=100).collect();
        let d = GapDist::from_samples(&v).unwrap();
        assert_eq!(d.quantiles[4], (0.5, 50));
        assert_eq!(d.quantiles[8], (0.9, 90));
        assert_eq!(d.quantile(0.5), Some(50));
        assert_eq!(d.quantile(0.55), None);
        assert!((d.cdf(50) - 0.5).abs() < 1e-9);
        assert!((d.cdf(70) - 0.7).abs() < 1e-9);
        assert_eq!(d.cdf(1000), 1.0);
        assert!(GapDist::from_samples(&[]).is_none());
    }

    #[test]
    fn pinball_weighs_the_side() {
        assert!((pinball(0.9, 1.0, 2.0) - 0.9).abs() < 1e-12);
        assert!((pinball(0.9, 2.0, 1.0) - 0.1).abs() < 1e-12);
        assert_eq!(pinball(0.5, 3.0, 3.0), 0.0);
    }

    fn hint(awaiting: Awaiting, tool: Option<&str>) -> Hint {
        Hint {
            awaiting,
            tool: tool.map(str::to_string),
        }
    }

    #[test]
    fn kind_comes_from_the_hint_else_from_the_step() {
        let h = hint(Awaiting::Unknown, None);
        let mut c = GapContext {
            session: 1,
            hint: &h,
            tools: &[],
            ended_with_tool_calls: Some(true),
            now: 0,
            wall_ns: Some(25 * 3_600_000_000_000 + 5),
        };
        assert_eq!(c.kind(), Kind::Tool);
        assert_eq!(c.hour(), Some(1));
        c.ended_with_tool_calls = Some(false);
        assert_eq!(c.kind(), Kind::User);
        c.ended_with_tool_calls = None;
        assert_eq!(c.kind(), Kind::Unknown);
        let h2 = hint(Awaiting::User, Some("Bash"));
        c.hint = &h2;
        c.ended_with_tool_calls = Some(true);
        assert_eq!(c.kind(), Kind::User, "the hint wins");
        assert_eq!(c.pending_tools().collect::<Vec<_>>(), ["Bash"]);
        c.tools = &["Read", "Grep"];
        assert_eq!(c.pending_tools().collect::<Vec<_>>(), ["Read", "Grep"]);
    }

    #[test]
    fn global_baseline_is_the_empirical_distribution() {
        let h = hint(Awaiting::Tool, None);
        let c = GapContext {
            session: 1,
            hint: &h,
            tools: &[],
            ended_with_tool_calls: None,
            now: 0,
            wall_ns: None,
        };
        let mut g = GlobalHist::new();
        assert!(g.predict(&c).is_none());
        // 1..=100 s: the median is 50 s within a bin (12%)
        for s in 1..=100u64 {
            g.observe(&c, s * 1_000_000_000);
        }
        let d = g.predict(&c).unwrap();
        let p50 = d.quantile(0.5).unwrap() as f64 / 1e9;
        let p90 = d.quantile(0.9).unwrap() as f64 / 1e9;
        assert!((45.0..56.0).contains(&p50), "p50 {p50}");
        assert!((80.0..101.0).contains(&p90), "p90 {p90}");
    }
}
