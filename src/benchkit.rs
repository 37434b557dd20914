//! Shared pieces of `kvpark bench` and the `cargo bench` harnesses: every
//! figure is printed beside a baseline measured in the same run, and the
//! ratio is what `BENCHMARKS.md` records.

use std::time::{Duration, Instant};

/// One measured throughput next to its same-run baseline.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figure {
    /// What was measured ("gather 64 blocks llama-8b LBNHC").
    pub name: String,
    /// Bytes per second of the measured operation.
    pub bytes_per_s: f64,
    /// What the baseline is ("memcpy contiguous").
    pub baseline: String,
    /// Bytes per second of the baseline.
    pub baseline_bytes_per_s: f64,
}

impl Figure {
    /// measured / baseline.
    pub fn ratio(&self) -> f64 {
        self.bytes_per_s / self.baseline_bytes_per_s
    }

    /// One table row: name, GB/s, baseline GB/s, ratio.
    pub fn row(&self) -> String {
        format!(
            "{:<44} {:>9.2} GB/s   {:<24} {:>9.2} GB/s   {:>6.1}%",
            self.name,
            self.bytes_per_s / 1e9,
            self.baseline,
            self.baseline_bytes_per_s / 1e9,
            self.ratio() * 100.0
        )
    }
}

/// Header matching [`Figure::row`].
pub fn header() -> String {
    format!(
        "{:<44} {:>14}   {:<24} {:>14}   {:>7}",
        "measured", "throughput", "baseline (same run)", "throughput", "ratio"
    )
}

/// Runs `f` (which moves `bytes` bytes) repeatedly for at least `min_time`
/// and at least `min_iters` times, returning the best bytes/s of the runs.
/// Best-of is used because these machines are shared and noisy: the best
/// run is the least disturbed one, for the measured code and the baseline alike.
pub fn best_rate(bytes: u64, min_iters: u32, min_time: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut best = f64::MAX;
    let mut i = 0;
    while i < min_iters || start.elapsed() < min_time {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        i += 1;
    }
    bytes as f64 / best.max(1e-12)
}

/// Alternates measured and baseline runs `rounds` times so both see the
/// same machine load, returning (measured, baseline) best rates.
pub fn paired(
    bytes: u64,
    rounds: u32,
    per_round: Duration,
    mut measured: impl FnMut(),
    mut baseline: impl FnMut(),
) -> (f64, f64) {
    let (mut m, mut b) = (0f64, 0f64);
    for _ in 0..rounds {
        m = m.max(best_rate(bytes, 1, per_round, &mut measured));
        b = b.max(best_rate(bytes, 1, per_round, &mut baseline));
    }
    (m, b)
}
