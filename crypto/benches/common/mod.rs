//! Shared benchmark support: a criterion measurement of this thread's CPU time.
//!
//! The benchmark machines are shared (2 cores, several builds at once), so wall time mostly
//! measures other people's compilers. Thread CPU time (`CLOCK_THREAD_CPUTIME_ID`) is what "per core"
//! throughput means; set `ALLIUM_BENCH_WALL=1` to measure wall time instead.

// Benchmarks measure real time.
#![allow(clippy::disallowed_methods)]
#![allow(dead_code)]

use std::time::{Duration, Instant};

use criterion::Throughput;
use criterion::measurement::{Measurement, ValueFormatter};
use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds of CPU time used by this thread (or wall time if `ALLIUM_BENCH_WALL` is set).
pub fn now_ns() -> u64 {
    if std::env::var_os("ALLIUM_BENCH_WALL").is_some() {
        thread_local! { static T0: Instant = Instant::now(); }
        return T0.with(|t| t.elapsed().as_nanos() as u64);
    }
    let t = clock_gettime(ClockId::ThreadCPUTime);
    (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64
}

/// Criterion measurement: thread CPU time.
pub struct CpuTime;

impl Measurement for CpuTime {
    type Intermediate = u64;
    type Value = Duration;
    fn start(&self) -> u64 {
        now_ns()
    }
    fn end(&self, i: u64) -> Duration {
        Duration::from_nanos(now_ns().saturating_sub(i))
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &NsFormatter
    }
}

/// Prints ns / µs and decimal GB/s.
pub struct NsFormatter;

impl ValueFormatter for NsFormatter {
    fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
        let (f, unit) = if ns < 1e3 {
            (1.0, "ns")
        } else if ns < 1e6 {
            (1e-3, "µs")
        } else {
            (1e-6, "ms")
        };
        for v in values {
            *v *= f;
        }
        unit
    }
    fn scale_throughputs(&self, _typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        match *t {
            Throughput::Bytes(b) | Throughput::BytesDecimal(b) => {
                for v in values {
                    *v = b as f64 / *v; // bytes per ns = GB/s
                }
                "GB/s"
            }
            Throughput::Elements(e) | Throughput::ElementsAndBytes { elements: e, .. } => {
                for v in values {
                    *v = e as f64 * 1e3 / *v;
                }
                "Melem/s"
            }
            Throughput::Bits(b) => {
                for v in values {
                    *v = b as f64 / *v;
                }
                "Gb/s"
            }
        }
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}
