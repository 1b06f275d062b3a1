//! Output: a short table for people, or one JSON object per line with `--json`.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procfs::CpuUse;

/// Latency histograms record microseconds from 1 µs to one minute (larger values saturate).
pub const HIST_MAX_US: u64 = 60_000_000;

/// A latency histogram with three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant histogram bounds are valid")
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// Prints results: JSON lines or the human text.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            match serde_json::to_string(value) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("error: cannot encode the result as JSON: {e}"),
            }
        } else {
            print!("{}", human());
        }
    }
}

/// `850µs`, `1.21ms`, `3.40s`.
pub fn us(v: u64) -> String {
    if v < 1000 {
        format!("{v}µs")
    } else if v < 1_000_000 {
        format!("{:.2}ms", v as f64 / 1e3)
    } else {
        format!("{:.2}s", v as f64 / 1e6)
    }
}

/// `512 B`, `3.4 KiB`, `12.0 MiB`.
pub fn bytes(v: f64) -> String {
    let a = v.abs();
    if a < 1024.0 {
        format!("{v:.0} B")
    } else if a < 1024.0 * 1024.0 {
        format!("{:.1} KiB", v / 1024.0)
    } else if a < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", v / 1024.0 / 1024.0)
    } else {
        format!("{:.2} GiB", v / 1024.0 / 1024.0 / 1024.0)
    }
}

/// `1234567` → `1,234,567`.
pub fn count(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The CPU table: seconds and µs per `unit` for each process, the servers' total, the bench.
pub fn cpu_table(out: &mut String, rows: &[CpuUse], unit: &str) {
    let _ = writeln!(
        out,
        "  {:<28} {:>9} {:>14}",
        "cpu",
        "seconds",
        format!("µs/{unit}")
    );
    for r in rows {
        let secs = r.cpu_seconds.map_or("n/a".into(), |s| format!("{s:.3}"));
        let per = r.us_per_unit.map_or("n/a".into(), |u| format!("{u:.2}"));
        let name = if r.pid == 0
            || r.role == crate::procfs::Role::Bench
            || r.name.contains(&r.pid.to_string())
        {
            r.name.clone()
        } else {
            format!("{} (pid {})", r.name, r.pid)
        };
        let _ = writeln!(out, "  {name:<28} {secs:>9} {per:>14}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(us(850), "850µs");
        assert_eq!(us(1210), "1.21ms");
        assert_eq!(us(3_400_000), "3.40s");
        assert_eq!(count(0), "0");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(3.5 * 1024.0), "3.5 KiB");
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = new_histogram();
        for v in 1..=1000 {
            h.saturating_record(v);
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert!((499..=501).contains(&l.p50_us));
        assert!((989..=991).contains(&l.p99_us));
        assert_eq!(l.max_us, 1000);
        assert_eq!(Latency::of(&new_histogram()).count, 0);
    }
}
