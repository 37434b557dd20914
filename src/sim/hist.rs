//! A fixed-size log-bucketed histogram for quantiles of positive values
//! (latencies, token counts): bounded memory whatever the sample count.
//!
//! Buckets grow by 1% from 1e-3 up to about 1.6e13, so a quantile is exact to
//! within ±0.5% (the bucket's geometric centre is returned). Values ≤ 1e-3
//! (including 0) land in bucket 0; the exact min, max, count and sum are kept.

/// Growth factor between bucket edges.
const GROWTH: f64 = 1.01;
const LOW: f64 = 1e-3;
const BUCKETS: usize = 3700;

/// Log-bucketed histogram.
#[derive(Clone, Debug)]
pub struct LogHist {
    counts: Vec<u64>,
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for LogHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LogHist {
    /// An empty histogram.
    pub fn new() -> Self {
        LogHist {
            counts: vec![0; BUCKETS],
            n: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn bucket(v: f64) -> usize {
        if v <= LOW {
            0
        } else {
            (((v / LOW).ln() / GROWTH.ln()) as usize + 1).min(BUCKETS - 1)
        }
    }

    fn centre(b: usize) -> f64 {
        if b == 0 {
            0.0
        } else {
            LOW * GROWTH.powf(b as f64 - 0.5)
        }
    }

    /// Adds one sample.
    pub fn add(&mut self, v: f64) {
        self.add_n(v, 1);
    }

    /// Adds `k` samples of value `v`.
    pub fn add_n(&mut self, v: f64, k: u64) {
        if k == 0 || !v.is_finite() {
            return;
        }
        self.counts[Self::bucket(v)] += k;
        self.n += k;
        self.sum += v * k as f64;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Merges another histogram in.
    pub fn merge(&mut self, o: &LogHist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }

    /// The q-quantile (0..=1), clamped to the exact min/max; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.n as f64).ceil() as u64).max(1);
        if rank >= self.n {
            return self.max;
        }
        let mut acc = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= rank {
                return Self::centre(b).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Fraction of samples strictly above `v` (bucket resolution).
    pub fn frac_above(&self, v: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let b = Self::bucket(v);
        let above: u64 = self.counts[b + 1..].iter().sum();
        above as f64 / self.n as f64
    }

    /// (value, cumulative fraction) points of the non-empty buckets, for CDF plots.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let mut acc = 0;
        let mut out = Vec::new();
        for (b, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                acc += c;
                out.push((
                    Self::centre(b).clamp(self.min, self.max),
                    acc as f64 / self.n as f64,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_within_half_percent() {
        let mut h = LogHist::new();
        for i in 1..=10_000 {
            h.add(i as f64);
        }
        for (q, want) in [(0.5, 5000.0), (0.9, 9000.0), (0.99, 9900.0)] {
            let got = h.quantile(q);
            assert!((got / want - 1.0).abs() < 0.006, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 10_000.0);
        assert_eq!(h.count(), 10_000);
        assert!((h.mean() - 5000.5).abs() < 1e-9);
        // bucket resolution: values within 1% above 9000 share its bucket
        let f = h.frac_above(9000.0);
        assert!(f <= 0.1 && f > 0.1 - 0.0095, "{f}");
    }
}
