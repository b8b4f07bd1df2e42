//! Prometheus metrics of the coordinator (`GET /metrics`, see
//! [`crate::metrics`] for the format). Names follow Prometheus' naming guide:
//! `pifleet_coordinator_` prefix, base units, `_total` counters, `_seconds`
//! histograms. Only the per-node series (`pifleet_coordinator_node_*`) carry
//! a `node` label.
//!
//! Counters and histograms are updated where things happen. The gauges are
//! set at scrape time by [`CoordinatorMetrics::observe`] from the same
//! [`FleetStatus`] that `GET /v1/status` (and `pifleet status`) answers, so
//! the two never disagree.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::protocol::{AgentState, FleetStatus, NodeView};

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Node states as `pifleet nodes` shows them.
pub const NODE_STATES: [&str; 4] = ["online", "suspect", "offline", "unknown"];
/// Why an agent moved while its node was alive.
pub const MOVE_REASONS: [&str; 2] = ["drain", "rebalance"];
const CHAT_OUTCOMES: [&str; 1] = ["ok"];
const JOB_OUTCOMES: [&str; 2] = ["completed", "failed"];

fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_owned())]
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~9 min: a chat on an instant model, and a job that waited in
    // the queue or an agent whose node was lost (`node_lost_after`).
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// The per-node gauges, each `{node="..."}`.
#[derive(Default)]
struct NodeSeries {
    up: Family<Labels, Gauge>,
    agents_running: Family<Labels, Gauge>,
    agent_capacity: Family<Labels, Gauge>,
    load1: Family<Labels, FloatGauge>,
    cpu_usage: Family<Labels, FloatGauge>,
    memory_available: Family<Labels, Gauge>,
    temperature: Family<Labels, FloatGauge>,
    temperature_limit: Family<Labels, FloatGauge>,
    throttled: Family<Labels, Gauge>,
    ollama_reachable: Family<Labels, Gauge>,
    draining: Family<Labels, Gauge>,
}

impl NodeSeries {
    fn register(&self, r: &mut Registry) {
        use Unit::{Bytes, Celsius};
        add(
            r,
            "node_up",
            "1 while the node is online, 0 while suspect, offline or unknown",
            None,
            &self.up,
        );
        add(
            r,
            "node_agents_running",
            "Agents the node reports running",
            None,
            &self.agents_running,
        );
        add(
            r,
            "node_agent_capacity",
            "Agents the node may host",
            None,
            &self.agent_capacity,
        );
        add(
            r,
            "node_load1",
            "The node's 1-minute load average",
            None,
            &self.load1,
        );
        add(
            r,
            "node_cpu_usage_ratio",
            "The node's CPU usage (0 to 1)",
            None,
            &self.cpu_usage,
        );
        add(
            r,
            "node_memory_available",
            "The node's available memory",
            Some(Bytes),
            &self.memory_available,
        );
        add(
            r,
            "node_temperature",
            "The node's SoC temperature (absent where unknown)",
            Some(Celsius),
            &self.temperature,
        );
        add(
            r,
            "node_temperature_limit",
            "Above this temperature the node gets no new agents (absent where not set)",
            Some(Celsius),
            &self.temperature_limit,
        );
        add(
            r,
            "node_throttled",
            "1 while the node's firmware reports throttling (absent where unknown)",
            None,
            &self.throttled,
        );
        add(
            r,
            "node_ollama_reachable",
            "1 while the node's Ollama answers",
            None,
            &self.ollama_reachable,
        );
        add(
            r,
            "node_draining",
            "1 while the node is draining",
            None,
            &self.draining,
        );
    }

    fn set(&self, n: &NodeView) {
        let l = label("node", &n.capacity.node);
        let c = &n.capacity;
        self.up
            .get_or_create(&l)
            .set(i64::from(n.state == "online"));
        self.agents_running
            .get_or_create(&l)
            .set(i64::from(c.agents_running));
        self.agent_capacity
            .get_or_create(&l)
            .set(i64::from(c.agent_capacity));
        self.load1.get_or_create(&l).set(c.cpu.load1);
        self.cpu_usage
            .get_or_create(&l)
            .set(f64::from(c.cpu.usage_pct) / 100.0);
        self.memory_available
            .get_or_create(&l)
            .set(i64::try_from(c.memory.available_bytes).unwrap_or(i64::MAX));
        set_or_remove(&self.temperature, &l, c.temperature_c.map(f64::from));
        set_or_remove(
            &self.temperature_limit,
            &l,
            c.max_temperature_c.map(f64::from),
        );
        match c.throttled {
            Some(t) => {
                self.throttled.get_or_create(&l).set(i64::from(t));
            }
            None => {
                self.throttled.remove(&l);
            }
        }
        self.ollama_reachable
            .get_or_create(&l)
            .set(i64::from(c.ollama_reachable));
        self.draining.get_or_create(&l).set(i64::from(c.draining));
    }

    fn remove(&self, node: &str) {
        let l = label("node", node);
        self.up.remove(&l);
        self.agents_running.remove(&l);
        self.agent_capacity.remove(&l);
        self.load1.remove(&l);
        self.cpu_usage.remove(&l);
        self.memory_available.remove(&l);
        self.temperature.remove(&l);
        self.temperature_limit.remove(&l);
        self.throttled.remove(&l);
        self.ollama_reachable.remove(&l);
        self.draining.remove(&l);
    }
}

fn add<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, m: &M) {
    match unit {
        Some(unit) => r.register_with_unit(name, help, unit, m.clone()),
        None => r.register(name, help, m.clone()),
    }
}

fn set_or_remove(family: &Family<Labels, FloatGauge>, l: &Labels, value: Option<f64>) {
    match value {
        Some(v) => {
            family.get_or_create(l).set(v);
        }
        None => {
            family.remove(l);
        }
    }
}

pub struct CoordinatorMetrics {
    pub registry: Registry,
    nodes: Family<Labels, Gauge>,
    agents: Family<Labels, Gauge>,
    agent_capacity: Gauge,
    utilisation: FloatGauge,
    queue_depth: Gauge,
    jobs_running: Gauge,
    per_node: NodeSeries,
    exported_nodes: Mutex<BTreeSet<String>>,
    pub placements: Counter,
    pub store_failures: Counter,
    moves: Family<Labels, Counter>,
    pub failovers: Counter,
    pub nodes_lost: Counter,
    pub turns_cancelled: Counter,
    scheduling_seconds: Histogram,
    chat_seconds: Family<Labels, Histogram>,
    job_seconds: Family<Labels, Histogram>,
    pub jobs_submitted: Counter,
    pub jobs_rejected: Counter,
    http_requests: Family<Labels, Counter>,
    events: Family<Labels, Counter>,
}

impl CoordinatorMetrics {
    pub fn new() -> Self {
        let m = CoordinatorMetrics {
            registry: Registry::with_prefix("pifleet_coordinator"),
            nodes: Family::default(),
            agents: Family::default(),
            agent_capacity: Gauge::default(),
            utilisation: FloatGauge::default(),
            queue_depth: Gauge::default(),
            jobs_running: Gauge::default(),
            per_node: NodeSeries::default(),
            exported_nodes: Mutex::new(BTreeSet::new()),
            placements: Counter::default(),
            store_failures: Counter::default(),
            moves: Family::default(),
            failovers: Counter::default(),
            nodes_lost: Counter::default(),
            turns_cancelled: Counter::default(),
            scheduling_seconds: latency_histogram(),
            chat_seconds: Family::new_with_constructor(latency_histogram),
            job_seconds: Family::new_with_constructor(latency_histogram),
            jobs_submitted: Counter::default(),
            jobs_rejected: Counter::default(),
            http_requests: Family::default(),
            events: Family::default(),
        };
        // Known label values start at zero, so rate() and dashboards see them.
        for state in NODE_STATES {
            m.nodes.get_or_create(&label("state", state)).set(0);
        }
        for state in AgentState::ALL {
            m.agents
                .get_or_create(&label("state", state.as_str()))
                .set(0);
        }
        for reason in MOVE_REASONS {
            drop(m.moves.get_or_create(&label("reason", reason)));
        }
        for outcome in CHAT_OUTCOMES {
            drop(m.chat_seconds.get_or_create(&label("outcome", outcome)));
        }
        for outcome in JOB_OUTCOMES {
            drop(m.job_seconds.get_or_create(&label("outcome", outcome)));
        }
        let mut m = m;
        let r = &mut m.registry;
        r.register("nodes", "Nodes by state", m.nodes.clone());
        r.register("agents", "Agents by state", m.agents.clone());
        r.register(
            "agent_capacity",
            "Agent slots on online nodes",
            m.agent_capacity.clone(),
        );
        r.register(
            "utilisation_ratio",
            "Running agents over agent slots on online nodes (0 to 1)",
            m.utilisation.clone(),
        );
        r.register("queue_depth", "Jobs queued", m.queue_depth.clone());
        r.register(
            "jobs_running",
            "Jobs being answered",
            m.jobs_running.clone(),
        );
        m.per_node.register(r);
        r.register(
            "placements",
            "Assignments of an agent to a node",
            m.placements.clone(),
        );
        r.register(
            "store_failures",
            "Batches the store refused (rolled back; the state was reloaded)",
            m.store_failures.clone(),
        );
        r.register(
            "agent_moves",
            "Agents moved off a live node, by reason (drain or rebalance)",
            m.moves.clone(),
        );
        r.register(
            "failovers",
            "Agents placed again because their node was lost",
            m.failovers.clone(),
        );
        r.register("nodes_lost", "Nodes declared lost", m.nodes_lost.clone());
        r.register(
            "turns_cancelled",
            "Chat turns cancelled on their node because the caller went away",
            m.turns_cancelled.clone(),
        );
        r.register_with_unit(
            "scheduling_duration",
            "From an agent needing a node (created, or its node lost or drained) to running",
            Unit::Seconds,
            m.scheduling_seconds.clone(),
        );
        r.register_with_unit(
            "chat_duration",
            "Chat latency by outcome (ok or the error code)",
            Unit::Seconds,
            m.chat_seconds.clone(),
        );
        r.register_with_unit(
            "job_duration",
            "From a job's submission to its end, by outcome",
            Unit::Seconds,
            m.job_seconds.clone(),
        );
        r.register("jobs_submitted", "Jobs accepted", m.jobs_submitted.clone());
        r.register(
            "jobs_rejected",
            "Jobs refused with 429 (queue full)",
            m.jobs_rejected.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests by route, method and status",
            m.http_requests.clone(),
        );
        r.register("events", "Scheduling events by kind", m.events.clone());
        m
    }

    /// Sets every gauge from the fleet's status: totals, nodes by state and
    /// the per-node series (removed for nodes no longer listed).
    pub fn observe(&self, status: &FleetStatus) {
        // Called on the coordinator task (in the order of its states); the
        // lock only makes the type shareable.
        let mut exported = self
            .exported_nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let s = &status.summary;
        self.agent_capacity
            .set(i64::try_from(s.agent_capacity).unwrap_or(i64::MAX));
        self.utilisation.set(s.utilisation_pct / 100.0);
        self.queue_depth.set(s.queue_depth as i64);
        self.jobs_running.set(s.jobs_running as i64);
        for (state, count) in [
            (AgentState::Pending, s.agents_pending),
            (AgentState::Assigned, s.agents_assigned),
            (AgentState::Running, s.agents_running),
            (AgentState::Releasing, s.agents_moving),
            (AgentState::Stopping, s.agents_stopping),
        ] {
            self.agents
                .get_or_create(&label("state", state.as_str()))
                .set(count as i64);
        }
        for state in NODE_STATES {
            let count = status.nodes.iter().filter(|n| n.state == state).count();
            self.nodes
                .get_or_create(&label("state", state))
                .set(count as i64);
        }
        let listed: BTreeSet<String> = status
            .nodes
            .iter()
            .map(|n| n.capacity.node.clone())
            .collect();
        for node in &status.nodes {
            self.per_node.set(node);
        }
        for gone in exported.difference(&listed) {
            self.per_node.remove(gone);
        }
        *exported = listed;
    }

    pub fn agent_moved(&self, reason: &str) {
        self.moves.get_or_create(&label("reason", reason)).inc();
    }

    pub fn agent_scheduled(&self, seconds: f64) {
        self.scheduling_seconds.observe(seconds);
    }

    pub fn chat(&self, outcome: &str, seconds: f64) {
        self.chat_seconds
            .get_or_create(&label("outcome", outcome))
            .observe(seconds);
    }

    pub fn job(&self, completed: bool, seconds: f64) {
        self.job_seconds
            .get_or_create(&label("outcome", JOB_OUTCOMES[usize::from(!completed)]))
            .observe(seconds);
    }

    pub fn event(&self, kind: &str) {
        self.events.get_or_create(&label("kind", kind)).inc();
    }

    /// Counts one HTTP request; `route` is the matched route pattern (such
    /// as `/v1/agents/{name}`), never the raw path.
    pub fn http_request(&self, route: &str, method: &str, status: u16) {
        self.http_requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("method", method.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Capacity, FleetSummary};

    fn node(id: &str, state: &str, temperature: Option<f32>) -> NodeView {
        NodeView {
            capacity: Capacity {
                node: id.to_owned(),
                agent_capacity: 4,
                agents_running: 2,
                temperature_c: temperature,
                ..Capacity::default()
            },
            state: state.to_owned(),
            cordoned: false,
            assigned: 0,
            last_seen_secs: 0,
        }
    }

    fn exposition(m: &CoordinatorMetrics) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &m.registry).unwrap();
        crate::metrics::classic_text(&s)
    }

    fn status(nodes: Vec<NodeView>) -> FleetStatus {
        FleetStatus {
            summary: FleetSummary {
                nodes_online: 1,
                nodes_total: nodes.len(),
                agents_total: 5,
                agents_running: 2,
                agents_pending: 1,
                agents_assigned: 0,
                agents_moving: 1,
                agents_stopping: 1,
                agent_capacity: 4,
                utilisation_pct: 50.0,
                queue_depth: 7,
                jobs_running: 1,
                generation: 1,
                ts: None,
            },
            nodes,
            events: Vec::new(),
        }
    }

    #[test]
    fn gauges_follow_the_status_and_a_forgotten_node_loses_its_series() {
        let m = CoordinatorMetrics::new();
        m.observe(&status(vec![
            node("pi-1", "online", Some(51.0)),
            node("pi-2", "offline", None),
        ]));
        let text = exposition(&m);
        for line in [
            "pifleet_coordinator_agents{state=\"running\"} 2",
            "pifleet_coordinator_agents{state=\"stopping\"} 1",
            "pifleet_coordinator_queue_depth 7",
            "pifleet_coordinator_utilisation_ratio 0.5",
            "pifleet_coordinator_nodes{state=\"offline\"} 1",
            "pifleet_coordinator_node_up{node=\"pi-1\"} 1",
            "pifleet_coordinator_node_up{node=\"pi-2\"} 0",
            "pifleet_coordinator_node_temperature_celsius{node=\"pi-1\"} 51.0",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing:\n{text}"
            );
        }
        assert!(
            !text.contains("temperature_celsius{node=\"pi-2\"}"),
            "{text}"
        );
        m.observe(&status(vec![node("pi-1", "online", Some(51.0))]));
        let text = exposition(&m);
        assert!(!text.contains("pi-2"), "{text}");
    }
}
