//! The decayed log-space histogram the predictors are made of.
//!
//! Gaps are binned by log10(seconds) from [`LOG10_LO`] (0.1 ms) to
//! [`LOG10_HI`] (10^7 s, 116 days) at [`BINS_PER_DECADE`] bins a decade
//! (each bin spans a factor 1.12); values outside are clamped into the end
//! bins. Exponential decay per observation (rate α: an observation `k` adds
//! ago weighs (1 − α)^k) is O(1): each new observation adds a weight that
//! grows by 1/(1 − α), and the bins are rescaled when it grows large.

use super::{GapDist, PROBS};
use crate::session::Nanos;

/// Lower edge of the first bin, log10 seconds.
pub const LOG10_LO: f64 = -4.0;
/// Upper edge of the last bin, log10 seconds.
pub const LOG10_HI: f64 = 7.0;
/// Bins per decade.
pub const BINS_PER_DECADE: usize = 20;
/// Number of bins.
pub const BINS: usize = ((LOG10_HI - LOG10_LO) as usize) * BINS_PER_DECADE;

/// log10 of a gap in seconds, a gap under 1 ms read as 1 ms (the traces'
/// resolution).
pub fn log10_s(gap: Nanos) -> f64 {
    (gap.max(1_000_000) as f64 / 1e9).log10()
}

fn bin_of(x: f64) -> usize {
    let i = ((x - LOG10_LO) * BINS_PER_DECADE as f64).floor();
    if i.is_nan() || i < 0.0 {
        0
    } else {
        (i as usize).min(BINS - 1)
    }
}

fn edge(i: usize) -> f64 {
    LOG10_LO + i as f64 / BINS_PER_DECADE as f64
}

/// A histogram of log10 gaps with exponential decay per observation.
#[derive(Clone, Debug)]
pub struct LogHist {
    bins: Box<[f64]>,
    total: f64,
    inc: f64,
    grow: f64,
}

impl LogHist {
    /// An empty histogram; `alpha` in [0, 1) is the decay per observation
    /// (0: none).
    pub fn new(alpha: f64) -> Self {
        let alpha = if alpha.is_finite() {
            alpha.clamp(0.0, 0.5)
        } else {
            0.0
        };
        LogHist {
            bins: vec![0.0; BINS].into_boxed_slice(),
            total: 0.0,
            inc: 1.0,
            grow: 1.0 / (1.0 - alpha),
        }
    }

    /// Adds one observation (log10 seconds).
    pub fn add(&mut self, x: f64) {
        self.bins[bin_of(x)] += self.inc;
        self.total += self.inc;
        self.inc *= self.grow;
        if self.inc > 1e100 {
            let s = 1.0 / self.inc;
            for b in self.bins.iter_mut() {
                *b *= s;
            }
            self.total *= s;
            self.inc = 1.0;
        }
    }

    /// Adds a normal distribution of log10 gaps (mean `mu`, deviation
    /// `sigma` decades) as `weight` observations, spread over the bins.
    pub fn add_normal(&mut self, mu: f64, sigma: f64, weight: f64) {
        if !(weight > 0.0 && sigma > 0.0 && mu.is_finite() && sigma.is_finite()) {
            return;
        }
        let phi = |x: f64| normal_cdf((x - mu) / sigma);
        let mut lo = 0.0;
        for i in 0..BINS {
            // the end bins take the tails, as `add` clamps into them
            let hi = if i + 1 == BINS { 1.0 } else { phi(edge(i + 1)) };
            let m = (hi - lo).max(0.0) * weight * self.inc;
            self.bins[i] += m;
            self.total += m;
            lo = hi;
        }
        self.inc *= self.grow.powf(weight);
    }

    /// Effective number of observations (decayed weights summed; without
    /// decay, the count).
    pub fn count(&self) -> f64 {
        // the newest observation weighs 1
        self.total * self.grow / self.inc
    }

    /// Adds this histogram's probability masses times `w` into `out`
    /// (nothing when empty).
    pub fn add_mass_into(&self, out: &mut [f64; BINS], w: f64) {
        if self.total <= 0.0 || w <= 0.0 {
            return;
        }
        let s = w / self.total;
        for (o, b) in out.iter_mut().zip(self.bins.iter()) {
            *o += b * s;
        }
    }

    /// The CDF at the bin edges (`out[i]` = P(x < edge i)) times `w`.
    pub fn cdf_into(&self, out: &mut [f64; BINS + 1], w: f64) {
        let mut m = [0.0; BINS];
        self.add_mass_into(&mut m, w);
        cdf_of_mass(&m, out);
    }

    /// The median (log10 s), `None` when empty.
    pub fn median(&self) -> Option<f64> {
        if self.total <= 0.0 {
            return None;
        }
        let mut c = [0.0; BINS + 1];
        self.cdf_into(&mut c, 1.0);
        Some(quantile_of_cdf(&c, 0.5))
    }
}

/// The standard normal CDF (Abramowitz–Stegun 7.1.26, error < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// Cumulative sums of `mass` at the bin edges, normalised to end at 1.
pub fn cdf_of_mass(mass: &[f64; BINS], out: &mut [f64; BINS + 1]) {
    out[0] = 0.0;
    let mut acc = 0.0;
    for (i, m) in mass.iter().enumerate() {
        acc += m;
        out[i + 1] = acc;
    }
    if acc > 0.0 {
        for o in out.iter_mut() {
            *o /= acc;
        }
    }
}

/// The `p`-quantile (log10 s) of a CDF given at the bin edges, linear
/// within a bin.
pub fn quantile_of_cdf(cdf: &[f64; BINS + 1], p: f64) -> f64 {
    for i in 1..=BINS {
        if cdf[i] >= p {
            let lo = cdf[i - 1];
            let span = cdf[i] - lo;
            let frac = if span > 0.0 {
                ((p - lo) / span).clamp(0.0, 1.0)
            } else {
                0.0
            };
            return edge(i - 1) + frac / BINS_PER_DECADE as f64;
        }
    }
    LOG10_HI
}

/// The mean (log10 s) of a CDF given at the bin edges (bin centres).
pub fn mean_of_cdf(cdf: &[f64; BINS + 1]) -> f64 {
    (0..BINS)
        .map(|i| (cdf[i + 1] - cdf[i]) * (edge(i) + 0.5 / BINS_PER_DECADE as f64))
        .sum()
}

/// A [`GapDist`] at [`PROBS`] from a CDF at the bin edges, shifted by
/// `shift` decades.
pub fn dist_from_cdf(cdf: &[f64; BINS + 1], shift: f64) -> GapDist {
    let mut quantiles = Vec::with_capacity(PROBS.len());
    let mut last = 0u64;
    for &p in &PROBS {
        let x = quantile_of_cdf(cdf, p) + shift;
        let ns = (10f64.powf(x.clamp(-9.0, 9.0)) * 1e9).round() as u64;
        last = last.max(ns);
        quantiles.push((p, last));
    }
    GapDist { quantiles }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_the_range_and_clamp() {
        assert_eq!(BINS, 220);
        assert_eq!(bin_of(-10.0), 0);
        assert_eq!(bin_of(100.0), BINS - 1);
        assert_eq!(bin_of(f64::NAN), 0);
        assert_eq!(bin_of(0.0), 80);
        assert_eq!(log10_s(0), -3.0);
        assert!((log10_s(3_000_000_000) - 3f64.log10()).abs() < 1e-12);
    }

    #[test]
    fn decay_forgets_the_old_mode() {
        // 1000 gaps of 1 s, then 1000 of 100 s: with α = 0.01 the median
        // follows the new mode; without decay it sits between the two.
        let mut d = LogHist::new(0.01);
        let mut n = LogHist::new(0.0);
        for _ in 0..1000 {
            d.add(0.0);
            n.add(0.0);
        }
        for _ in 0..1000 {
            d.add(2.0);
            n.add(2.0);
        }
        assert!((d.median().unwrap() - 2.0).abs() < 0.06);
        // the effective count of a decayed histogram tends to 1/α
        assert!((d.count() - 100.0).abs() < 1.0, "{}", d.count());
        assert_eq!(n.count(), 2000.0);
        let m = n.median().unwrap();
        assert!((-0.01..2.06).contains(&m), "{m}");
    }

    #[test]
    fn a_normal_prior_has_its_quantiles() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.281_551_6) - 0.9).abs() < 1e-6);
        assert!((normal_cdf(-1.959_964) - 0.025).abs() < 1e-6);
        let mut h = LogHist::new(0.0);
        h.add_normal(1.0, 0.5, 20.0);
        assert!((h.count() - 20.0).abs() < 1e-9);
        let mut c = [0.0; BINS + 1];
        h.cdf_into(&mut c, 1.0);
        assert!((quantile_of_cdf(&c, 0.5) - 1.0).abs() < 1e-3);
        assert!((quantile_of_cdf(&c, 0.9) - (1.0 + 0.5 * 1.281_551_6)).abs() < 0.01);
    }

    #[test]
    fn rescaling_keeps_the_distribution() {
        // α = 0.5 doubles the increment each time: rescales every ~330 adds
        let mut h = LogHist::new(0.5);
        for i in 0..5000 {
            h.add(if i % 2 == 0 { 1.0 } else { 1.5 });
        }
        assert!(h.count().is_finite() && (h.count() - 2.0).abs() < 1e-6);
        let m = h.median().unwrap();
        assert!((1.0..1.55).contains(&m), "{m}");
    }
}
