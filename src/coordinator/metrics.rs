//! Prometheus metrics of the coordinator (`GET /metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct CoordinatorMetrics {
    registry: Registry,
    pub nodes_online: Gauge,
    pub agent_capacity: Gauge,
    pub queue_depth: Gauge,
    agents: Family<Labels, Gauge>,
    pub placements: Counter,
    pub jobs_submitted: Counter,
    pub jobs_rejected: Counter,
    jobs_finished: Family<Labels, Counter>,
    chats: Family<Labels, Counter>,
    chat_seconds: Histogram,
    events: Family<Labels, Counter>,
}

impl CoordinatorMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("pifleet_coordinator");
        let m = CoordinatorMetrics {
            registry: Registry::default(),
            nodes_online: Gauge::default(),
            agent_capacity: Gauge::default(),
            queue_depth: Gauge::default(),
            agents: Family::default(),
            placements: Counter::default(),
            jobs_submitted: Counter::default(),
            jobs_rejected: Counter::default(),
            jobs_finished: Family::default(),
            chats: Family::default(),
            chat_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            events: Family::default(),
        };
        r.register("nodes_online", "Nodes online", m.nodes_online.clone());
        r.register(
            "agent_capacity",
            "Agent slots on online nodes",
            m.agent_capacity.clone(),
        );
        r.register("queue_depth", "Jobs waiting", m.queue_depth.clone());
        r.register("agents", "Agents by state", m.agents.clone());
        r.register(
            "placements",
            "Assignments sent to nodes",
            m.placements.clone(),
        );
        r.register("jobs_submitted", "Jobs accepted", m.jobs_submitted.clone());
        r.register(
            "jobs_rejected",
            "Jobs refused with 429 (queue full)",
            m.jobs_rejected.clone(),
        );
        r.register(
            "jobs_finished",
            "Jobs finished by outcome",
            m.jobs_finished.clone(),
        );
        r.register("chats", "Chat turns by outcome", m.chats.clone());
        r.register(
            "chat_duration_seconds",
            "Chat turn latency",
            m.chat_seconds.clone(),
        );
        r.register("events", "Scheduling events by kind", m.events.clone());
        CoordinatorMetrics { registry: r, ..m }
    }

    pub fn agents(&self, state: &str, count: i64) {
        self.agents
            .get_or_create(&vec![("state", state.to_owned())])
            .set(count);
    }

    pub fn chat(&self, outcome: &str, seconds: f64) {
        self.chats
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
        self.chat_seconds.observe(seconds);
    }

    pub fn job(&self, outcome: &str) {
        self.jobs_finished
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    pub fn event(&self, kind: &str) {
        self.events
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}
