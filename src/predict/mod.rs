//! Gap predictors (pure: no threads, no I/O, no clock reads).
//!
//! A predictor turns what is known at a suspend — the session's own past
//! gaps, what it waits for (tool or human), the pending tool's name — into a
//! distribution of the coming gap ([`GapDist`], quantiles), which a policy
//! turns into expected costs. The learned predictor is a separate work
//! package; this module fixes the interface and holds the empirical
//! building block ([`GapDist::from_samples`]).

use crate::session::{Hint, Nanos};

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

/// What a predictor sees at a suspend.
#[derive(Clone, Debug)]
pub struct GapContext<'a> {
    /// The session's recent gaps, oldest first.
    pub history: &'a [Nanos],
    /// The harness hint (awaiting tool / user, tool name).
    pub hint: &'a Hint,
    /// The suspend time.
    pub now: Nanos,
}

/// Predicts the coming gap of a suspended session.
pub trait GapPredictor: Send {
    /// The distribution of the gap, or `None` when nothing is known.
    fn predict(&self, ctx: &GapContext) -> Option<GapDist>;
    /// Learns from an observed gap.
    fn observe(&mut self, ctx: &GapContext, gap: Nanos);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empirical_quantiles_and_cdf() {
        let v: Vec<Nanos> = (1..=100).collect();
        let d = GapDist::from_samples(&v).unwrap();
        assert_eq!(d.quantiles[4], (0.5, 50));
        assert_eq!(d.quantiles[8], (0.9, 90));
        assert!((d.cdf(50) - 0.5).abs() < 1e-9);
        assert!((d.cdf(70) - 0.7).abs() < 1e-9);
        assert_eq!(d.cdf(1000), 1.0);
        assert!(GapDist::from_samples(&[]).is_none());
    }
}
