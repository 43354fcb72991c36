//! Percentiles of measured samples, for the bots' report and the benchmarks.

use std::time::Duration;

/// Percentiles of a set of samples.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The `q` quantile (0 to 1) of `sorted`, the nearest sample; 0 for none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0)
}

impl Percentiles {
    pub fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        Self { count: ms.len(), p50_ms: quantile(&ms, 0.50), p99_ms: quantile(&ms, 0.99), max_ms: quantile(&ms, 1.0) }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
            self.p50_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}
