//! Prometheus metrics of a node (`GET /metrics`), in the text exposition
//! format. Values are atomics updated by the node's main loop and turn tasks.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

pub struct NodeMetrics {
    registry: Registry,
    pub agents_running: Gauge,
    pub agent_capacity: Gauge,
    pub turns_in_flight: Gauge,
    pub mqtt_connected: Gauge,
    pub ollama_reachable: Gauge,
    pub temperature_celsius: Gauge<f64, AtomicU64>,
    ollama_requests: Family<Labels, Counter>,
    ollama_request_seconds: Histogram,
    commands: Family<Labels, Counter>,
}

impl NodeMetrics {
    pub fn new(node: &str) -> Self {
        let mut root = Registry::with_prefix_and_labels(
            "pifleet_node",
            [(
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(node.to_owned()),
            )]
            .into_iter(),
        );
        let metrics = NodeMetrics {
            agents_running: Gauge::default(),
            agent_capacity: Gauge::default(),
            turns_in_flight: Gauge::default(),
            mqtt_connected: Gauge::default(),
            ollama_reachable: Gauge::default(),
            temperature_celsius: Gauge::default(),
            ollama_requests: Family::default(),
            ollama_request_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            commands: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut root;
        r.register(
            "agents_running",
            "Agents hosted by this node",
            metrics.agents_running.clone(),
        );
        r.register(
            "agent_capacity",
            "Agents this node may host (agent_capacity)",
            metrics.agent_capacity.clone(),
        );
        r.register(
            "turns_in_flight",
            "Chat turns accepted and not yet answered",
            metrics.turns_in_flight.clone(),
        );
        r.register(
            "mqtt_connected",
            "1 while connected to the MQTT broker",
            metrics.mqtt_connected.clone(),
        );
        r.register(
            "ollama_reachable",
            "1 while the local Ollama answers",
            metrics.ollama_reachable.clone(),
        );
        r.register(
            "temperature_celsius",
            "SoC temperature",
            metrics.temperature_celsius.clone(),
        );
        r.register(
            "ollama_requests",
            "Ollama chat calls by outcome",
            metrics.ollama_requests.clone(),
        );
        r.register(
            "ollama_request_duration_seconds",
            "Duration of Ollama chat calls",
            metrics.ollama_request_seconds.clone(),
        );
        r.register(
            "commands",
            "Coordinator commands by kind and result",
            metrics.commands.clone(),
        );
        NodeMetrics {
            registry: root,
            ..metrics
        }
    }

    /// Counts one Ollama call with its outcome (`ok` or an error code).
    pub fn ollama_request(&self, outcome: &str, seconds: f64) {
        self.ollama_requests
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
        self.ollama_request_seconds.observe(seconds);
    }

    /// Counts one command (`assign`, `turn`, `invalid`...) and its result
    /// (`applied`, `refused`, `ignored`, `rejected`).
    pub fn command(&self, kind: &str, result: &str) {
        self.commands
            .get_or_create(&vec![
                ("kind", kind.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_agents_capacity_and_ollama_durations() {
        let m = NodeMetrics::new("pi-1");
        m.agent_capacity.set(3);
        m.agents_running.set(2);
        m.ollama_request("ok", 0.2);
        let text = m.encode();
        assert!(
            text.contains("pifleet_node_agent_capacity{node=\"pi-1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("pifleet_node_agents_running{node=\"pi-1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("pifleet_node_ollama_requests_total{node=\"pi-1\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pifleet_node_ollama_request_duration_seconds_count{node=\"pi-1\"} 1"),
            "{text}"
        );
    }
}
