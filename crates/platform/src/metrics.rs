//! Prometheus metrics of the platform process: counters and histograms kept
//! in atomics (no locks on the hot path), rendered in the text exposition
//! format at `/metrics`. Gauges that live in the store (queue depth, dead
//! letters) are read at scrape time by the caller and passed to `render`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of histogram buckets, in seconds.
const TURN_BUCKETS_S: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];
const ACK_BUCKETS_S: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", bucket.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub turn_latency: Histogram,
    pub webhook_ack_latency: Histogram,
    pub runs_total: AtomicU64,
    pub runs_failed_total: AtomicU64,
    pub rejected_senders_total: AtomicU64,
    pub tokens_input_total: AtomicU64,
    pub tokens_output_total: AtomicU64,
    pub tokens_cache_read_total: AtomicU64,
    pub tokens_cache_write_total: AtomicU64,
    pub deliveries_sent_total: AtomicU64,
    pub deliveries_failed_total: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            turn_latency: Histogram::new(&TURN_BUCKETS_S),
            webhook_ack_latency: Histogram::new(&ACK_BUCKETS_S),
            runs_total: AtomicU64::new(0),
            runs_failed_total: AtomicU64::new(0),
            rejected_senders_total: AtomicU64::new(0),
            tokens_input_total: AtomicU64::new(0),
            tokens_output_total: AtomicU64::new(0),
            tokens_cache_read_total: AtomicU64::new(0),
            tokens_cache_write_total: AtomicU64::new(0),
            deliveries_sent_total: AtomicU64::new(0),
            deliveries_failed_total: AtomicU64::new(0),
        }
    }
}

/// Store-held gauges, read when `/metrics` is scraped.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueGauges {
    pub queued: u64,
    pub running: u64,
    pub dead: u64,
}

impl Metrics {
    pub fn add_usage(&self, usage: &tinyfat_core::message::Usage) {
        self.tokens_input_total.fetch_add(usage.input_tokens, Ordering::Relaxed);
        self.tokens_output_total.fetch_add(usage.output_tokens, Ordering::Relaxed);
        self.tokens_cache_read_total.fetch_add(usage.cache_read_input_tokens, Ordering::Relaxed);
        self.tokens_cache_write_total.fetch_add(usage.cache_creation_input_tokens, Ordering::Relaxed);
    }

    pub fn render(&self, queue: QueueGauges) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
        };
        gauge(&mut out, "tinyfat_queue_depth", "Jobs waiting to run.", queue.queued);
        gauge(&mut out, "tinyfat_queue_running", "Jobs running now.", queue.running);
        gauge(&mut out, "tinyfat_dead_letters", "Jobs in the dead-letter queue.", queue.dead);
        counter(&mut out, "tinyfat_runs_total", "Turns run.", &self.runs_total);
        counter(&mut out, "tinyfat_runs_failed_total", "Turns that failed.", &self.runs_failed_total);
        counter(
            &mut out,
            "tinyfat_rejected_senders_total",
            "Messages dropped: sender not allowed.",
            &self.rejected_senders_total,
        );
        counter(
            &mut out,
            "tinyfat_deliveries_sent_total",
            "Replies and messages delivered.",
            &self.deliveries_sent_total,
        );
        counter(
            &mut out,
            "tinyfat_deliveries_failed_total",
            "Deliveries that failed for good.",
            &self.deliveries_failed_total,
        );
        let _ = writeln!(
            out,
            "# HELP tinyfat_model_tokens_total Model tokens used, by kind.\n# TYPE tinyfat_model_tokens_total counter"
        );
        for (kind, value) in [
            ("input", &self.tokens_input_total),
            ("output", &self.tokens_output_total),
            ("cache_read", &self.tokens_cache_read_total),
            ("cache_write", &self.tokens_cache_write_total),
        ] {
            let _ = writeln!(out, "tinyfat_model_tokens_total{{kind=\"{kind}\"}} {}", value.load(Ordering::Relaxed));
        }
        self.turn_latency.render(&mut out, "tinyfat_turn_seconds", "Time from claim to the end of a turn.");
        self.webhook_ack_latency.render(&mut out, "tinyfat_ingest_ack_seconds", "Time from request to durable ack.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.turn_latency.observe(Duration::from_millis(300));
        m.runs_total.fetch_add(2, Ordering::Relaxed);
        let text = m.render(QueueGauges { queued: 3, running: 1, dead: 4 });
        assert!(text.contains("tinyfat_queue_depth 3\n"));
        assert!(text.contains("tinyfat_dead_letters 4\n"));
        assert!(text.contains("tinyfat_runs_total 2\n"));
        assert!(text.contains("tinyfat_turn_seconds_bucket{le=\"0.25\"} 0\n"));
        assert!(text.contains("tinyfat_turn_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(text.contains("tinyfat_turn_seconds_count 1\n"));
    }
}
