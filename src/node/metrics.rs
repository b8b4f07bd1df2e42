//! Prometheus metrics of a node (`GET /metrics`, see [`crate::metrics`] for
//! the format). Values are atomics updated by the node's main loop and turn
//! tasks. Names follow Prometheus' naming guide: `pifleet_node_` prefix, base
//! units, `_total` counters. There is no `node` label: the scrape target's
//! `instance` tells the nodes apart (the coordinator's per-node series carry
//! `node`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

/// Outcomes of an Ollama call, created at zero so `rate()` sees them at once.
const OUTCOMES: [&str; 2] = ["ok", "error"];

pub struct NodeMetrics {
    pub registry: Registry,
    pub agents_running: Gauge,
    pub agent_capacity: Gauge,
    pub turns_in_flight: Gauge,
    pub turns_queued: Gauge,
    pub mqtt_connected: Gauge,
    pub mqtt_reconnects: Counter,
    pub fences: Counter,
    pub turns_fenced: Counter,
    pub ollama_reachable: Gauge,
    temperature_celsius: Family<Labels, Gauge<f64, AtomicU64>>,
    throttled: Family<Labels, Gauge>,
    pub tokens_generated: Counter,
    ollama_requests: Family<Labels, Counter>,
    ollama_request_seconds: Family<Labels, Histogram>,
    commands: Family<Labels, Counter>,
}

impl NodeMetrics {
    pub fn new() -> Self {
        let m = NodeMetrics {
            registry: Registry::with_prefix("pifleet_node"),
            agents_running: Gauge::default(),
            agent_capacity: Gauge::default(),
            turns_in_flight: Gauge::default(),
            turns_queued: Gauge::default(),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            fences: Counter::default(),
            turns_fenced: Counter::default(),
            ollama_reachable: Gauge::default(),
            temperature_celsius: Family::default(),
            throttled: Family::default(),
            tokens_generated: Counter::default(),
            ollama_requests: Family::default(),
            ollama_request_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 16))
            }),
            commands: Family::default(),
        };
        for outcome in OUTCOMES {
            let labels = vec![("outcome", outcome.to_owned())];
            drop(m.ollama_requests.get_or_create(&labels));
            drop(m.ollama_request_seconds.get_or_create(&labels));
        }
        let mut m = m;
        let r = &mut m.registry;
        r.register(
            "agents_running",
            "Agents hosted by this node",
            m.agents_running.clone(),
        );
        r.register(
            "agent_capacity",
            "Agents this node may host (agent_capacity)",
            m.agent_capacity.clone(),
        );
        r.register(
            "turns_in_flight",
            "Chat turns accepted and not yet answered (running or queued)",
            m.turns_in_flight.clone(),
        );
        r.register(
            "turns_queued",
            "Chat turns waiting behind another turn of their agent",
            m.turns_queued.clone(),
        );
        r.register(
            "mqtt_connected",
            "1 while connected to the MQTT broker",
            m.mqtt_connected.clone(),
        );
        r.register(
            "mqtt_reconnects",
            "Connections to the MQTT broker after the first",
            m.mqtt_reconnects.clone(),
        );
        r.register(
            "fences",
            "Times the node's lease ran out and it stopped all its agents",
            m.fences.clone(),
        );
        r.register(
            "turns_fenced",
            "Running turns aborted (with their Ollama calls) by a fence",
            m.turns_fenced.clone(),
        );
        r.register(
            "ollama_reachable",
            "1 while the local Ollama answers",
            m.ollama_reachable.clone(),
        );
        r.register_with_unit(
            "temperature",
            "SoC temperature (absent where the board has no sensor)",
            Unit::Celsius,
            m.temperature_celsius.clone(),
        );
        r.register(
            "throttled",
            "1 while the Pi firmware reports throttling (absent elsewhere)",
            m.throttled.clone(),
        );
        r.register(
            "ollama_requests",
            "Ollama chat calls by outcome (ok or error)",
            m.ollama_requests.clone(),
        );
        r.register_with_unit(
            "ollama_request_duration",
            "Duration of Ollama chat calls by outcome",
            Unit::Seconds,
            m.ollama_request_seconds.clone(),
        );
        r.register(
            "tokens_generated",
            "Tokens Ollama generated for this node's turns (eval_count)",
            m.tokens_generated.clone(),
        );
        r.register(
            "commands",
            "Coordinator commands by kind and result",
            m.commands.clone(),
        );
        m
    }

    /// Counts one Ollama call: `ok` or `error` (the error's code is in the
    /// turn's result and the log; as a label it would grow without bound).
    pub fn ollama_request(&self, ok: bool, seconds: f64) {
        let labels = vec![("outcome", OUTCOMES[usize::from(!ok)].to_owned())];
        self.ollama_requests.get_or_create(&labels).inc();
        self.ollama_request_seconds
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// The SoC temperature and throttling, each exported only once known.
    pub fn thermal(&self, temperature_c: Option<f32>, throttled: Option<bool>) {
        if let Some(t) = temperature_c {
            self.temperature_celsius
                .get_or_create(&vec![])
                .set(f64::from(t));
        }
        if let Some(t) = throttled {
            self.throttled.get_or_create(&vec![]).set(i64::from(t));
        }
    }

    /// Counts one command (`assign`, `turn`, `invalid`...) and its result
    /// (`applied`, `refused`, `ignored`, `rejected`).
    pub fn command(&self, kind: &str, result: &str) {
        self.commands(kind, result, 1);
    }

    /// `count` commands (the agents of a batch) of `kind` ended in `result`.
    pub fn commands(&self, kind: &str, result: &str, count: u64) {
        self.commands
            .get_or_create(&vec![
                ("kind", kind.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc_by(count);
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(m: &NodeMetrics) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &m.registry).unwrap();
        crate::metrics::classic_text(&s)
    }

    #[test]
    fn the_exposition_names_agents_capacity_tokens_and_ollama_durations() {
        let m = NodeMetrics::new();
        m.agent_capacity.set(3);
        m.agents_running.set(2);
        m.tokens_generated.inc_by(17);
        m.ollama_request(true, 0.2);
        let unknown = encoded(&m);
        assert!(
            !unknown.contains("pifleet_node_temperature_celsius "),
            "{unknown}"
        );
        m.thermal(Some(51.5), Some(true));
        let text = encoded(&m);
        for line in [
            "pifleet_node_temperature_celsius 51.5",
            "pifleet_node_throttled 1",
            "pifleet_node_agent_capacity 3",
            "pifleet_node_agents_running 2",
            "pifleet_node_tokens_generated_total 17",
            "pifleet_node_ollama_requests_total{outcome=\"ok\"} 1",
            "pifleet_node_ollama_requests_total{outcome=\"error\"} 0",
            "pifleet_node_ollama_request_duration_seconds_count{outcome=\"ok\"} 1",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing:\n{text}"
            );
        }
    }
}
