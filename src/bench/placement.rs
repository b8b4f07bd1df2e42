//! `pifleet bench placement`: NODES simulated nodes of CAPACITY slots (the
//! node daemon's own code, [`super::fleet_sim`]), a real coordinator and
//! Mosquitto (or `--mqtt`); NODES × CAPACITY agents created in bulk, timed
//! until the coordinator counts every one running (acknowledged by its
//! node). Then it checks what the nodes themselves report: every agent
//! hosted exactly once and no node above its capacity.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::chat::{at_least_1, broker};
use super::fleet_sim::FleetSim;
use super::{cpu_time, progress, round3, rss_bytes, Api, BenchError, Stack};
use crate::protocol::{AgentList, NodeList};

/// `POST /v1/agents` takes at most this many agents by count.
const MAX_PER_REQUEST: usize = 100_000;

#[derive(Debug, clap::Args)]
pub struct PlacementArgs {
    /// Simulated nodes, each with its own MQTT session.
    #[arg(long, default_value_t = 300, value_parser = at_least_1())]
    nodes: usize,
    /// Agent slots per node; NODES × CAPACITY agents are placed.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    capacity: u32,
    /// Use this broker (HOST:PORT) instead of starting Mosquitto.
    #[arg(long)]
    mqtt: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    limit_secs: u64,
    /// Run NODES real node daemons (`pifleet node` processes, on
    /// `pifleet ollama-sim`) instead of simulated nodes in this process.
    #[arg(long)]
    daemons: bool,
    /// With --daemons: run the coordinator and nodes from this pifleet
    /// binary (another build, to compare) instead of this one.
    #[arg(long, requires = "daemons")]
    daemon_binary: Option<std::path::PathBuf>,
    /// After all run, measure the coordinator's CPU per heartbeat over
    /// this many seconds of rest.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
}

/// The nodes under test.
enum Nodes {
    Simulated(FleetSim),
    /// Real daemons, children of the stack: their logs are checked.
    Daemons(Vec<String>),
}

pub async fn bench(args: &PlacementArgs, stack: &mut Stack) -> Result<Value, BenchError> {
    if let Some(binary) = &args.daemon_binary {
        stack.run_daemons_from(binary)?;
    }
    let mqtt = broker(stack, args.mqtt.as_deref())?;
    let (url, coordinator) = stack.coordinator(&mqtt, "")?;
    progress(format!("coordinator {url} (pid {coordinator})"));
    let api = Api::new(&url, None, 4).polling_every(Duration::from_millis(100));
    let rss_empty = rss_bytes(coordinator)?;
    // Thousands of nodes logging every assignment would drown the progress.
    let _quiet = QuietLog::warn();
    let mut fleet = if args.daemons {
        let ollama = stack.simulator(0)?;
        let mut ids = Vec::new();
        for i in 1..=args.nodes {
            let id = format!("node-{i}");
            stack.node(&id, &mqtt, &ollama, args.capacity, 100)?;
            ids.push(id);
        }
        Nodes::Daemons(ids)
    } else {
        let sim = FleetSim::start(&mqtt, "sim", args.nodes, args.capacity, "llama3.2");
        Nodes::Simulated(sim)
    };
    let limit = Duration::from_secs(args.limit_secs);
    let nodes = args.nodes;
    api.wait_for("every simulated node online", limit, |s| {
        s.summary.nodes_online >= nodes
    })
    .await?;
    fleet.check()?;
    let rss_nodes = rss_bytes(coordinator)?;
    let agents = args.nodes * args.capacity as usize;
    progress(format!(
        "{} simulated nodes online, {} slots each; creating {agents} agents",
        args.nodes, args.capacity
    ));

    let (cpu_coordinator, cpu_sim) = (cpu_time(coordinator)?, cpu_time(std::process::id())?);
    let start = Instant::now();
    for (chunk, first) in (0..agents).step_by(MAX_PER_REQUEST).enumerate() {
        let count = MAX_PER_REQUEST.min(agents - first);
        api.spawn(&format!("place{chunk}"), count, "llama3.2")
            .await?;
    }
    let created = start.elapsed();
    progress(format!(
        "created in {:.2} s; waiting until all run",
        created.as_secs_f64()
    ));
    let running = api
        .wait_for("every agent to run", limit, |s| {
            s.summary.agents_running >= agents
        })
        .await?
        + created;
    let cpu_coordinator = cpu_time(coordinator)?.saturating_sub(cpu_coordinator);
    let cpu_sim = cpu_time(std::process::id())?.saturating_sub(cpu_sim);
    fleet.check()?;
    progress(format!(
        "all {agents} running after {:.2} s",
        running.as_secs_f64()
    ));

    // Until each node's own report lists what it hosts (a heartbeat round
    // at most), or 30 s.
    let reported = Instant::now();
    let (overfill, hosted, duplicates) = loop {
        let nodes: NodeList = api.get("/v1/nodes").await?;
        let listed: AgentList = api.get("/v1/agents").await?;
        let counts = check_hosting(&nodes, &listed);
        let (_, hosted, duplicates) = counts;
        if (hosted == agents && duplicates == 0) || reported.elapsed() > Duration::from_secs(30) {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rss_loaded = rss_bytes(coordinator)?;
    // At rest: what the heartbeats cost the coordinator and the network.
    let idle = Duration::from_secs(args.idle_secs);
    let cpu_idle = cpu_time(coordinator)?;
    let traffic = super::Traffic::watch(&mqtt, "pifleet/nodes/+/capacity", idle).await?;
    let cpu_idle = cpu_time(coordinator)?.saturating_sub(cpu_idle);
    let beats = traffic.live_messages.max(1) as f64;
    let (timeouts, strays) = match &fleet {
        Nodes::Daemons(ids) => {
            let timeouts = stack.log_count("coordinator", "did not confirm");
            let strays: usize = ids.iter().map(|id| stack.log_count(id, "not hosted")).sum();
            (Some(timeouts), Some(strays))
        }
        Nodes::Simulated(_) => (None, None),
    };
    fleet.stop(Duration::from_secs(30)).await?;
    if hosted != agents || duplicates > 0 || overfill > 0 {
        return Err(BenchError::new(format!(
            "the nodes host {hosted} of {agents} agents, {duplicates} of them twice; \
             the fullest node is {overfill} over its capacity"
        )));
    }
    Ok(json!({
        "bench": "placement",
        "agents": agents,
        "nodes": args.nodes,
        "capacity": args.capacity,
        "seconds_to_create": round3(created.as_secs_f64()),
        "seconds_to_all_running": round3(running.as_secs_f64()),
        "placements_per_sec": (agents as f64 / running.as_secs_f64()).round(),
        "coordinator_rss_bytes": rss_loaded,
        "coordinator_rss_bytes_no_agents": rss_nodes,
        "coordinator_rss_bytes_empty": rss_empty,
        "coordinator_cpu_secs": round3(cpu_coordinator.as_secs_f64()),
        // The simulated nodes and this bench's own status polls.
        "bench_process_cpu_secs": round3(cpu_sim.as_secs_f64()),
        "agents_hosted": hosted,
        "max_node_overfill": overfill,
        "nodes_are": if args.daemons { "daemons" } else { "simulated" },
        "heartbeat_bytes_max": traffic.retained_max,
        "heartbeat_bytes_mean": (traffic.live_bytes as f64 / beats).round(),
        "heartbeats_at_rest": traffic.live_messages,
        "coordinator_cpu_us_per_heartbeat": (cpu_idle.as_secs_f64() * 1e6 / beats).round(),
        // Daemons only: assignments the coordinator gave up on, and
        // releases of agents a node did not have.
        "assign_timeouts": timeouts,
        "releases_not_hosted": strays,
    }))
}

impl Nodes {
    fn check(&mut self) -> Result<(), BenchError> {
        match self {
            Nodes::Simulated(sim) => sim.check(),
            Nodes::Daemons(_) => Ok(()),
        }
    }

    async fn stop(self, limit: Duration) -> Result<(), BenchError> {
        match self {
            Nodes::Simulated(sim) => sim.stop(limit).await,
            Nodes::Daemons(_) => Ok(()), // the stack stops its children
        }
    }
}

/// The log level lowered to `warn` while it lives.
struct QuietLog(log::LevelFilter);

impl QuietLog {
    fn warn() -> QuietLog {
        let level = log::max_level();
        log::set_max_level(log::LevelFilter::Warn.min(level));
        QuietLog(level)
    }
}

impl Drop for QuietLog {
    fn drop(&mut self) {
        log::set_max_level(self.0);
    }
}

/// Agents above capacity on the worst node, by the coordinator's placements
/// and by the nodes' own reports; agents the nodes host; agents hosted by
/// more than one node.
fn check_hosting(nodes: &NodeList, agents: &AgentList) -> (u64, usize, usize) {
    let capacity: HashMap<&str, u64> = nodes
        .nodes
        .iter()
        .map(|n| {
            (
                n.capacity.node.as_str(),
                u64::from(n.capacity.agent_capacity),
            )
        })
        .collect();
    let mut placed: HashMap<&str, u64> = HashMap::new();
    for node in agents.agents.iter().filter_map(|a| a.node.as_deref()) {
        *placed.entry(node).or_default() += 1;
    }
    let by_coordinator = placed
        .iter()
        .map(|(node, &n)| n.saturating_sub(capacity.get(node).copied().unwrap_or(0)))
        .max()
        .unwrap_or(0);
    let by_nodes = nodes
        .nodes
        .iter()
        .map(|n| {
            (n.capacity.agents.as_ref().map_or(0, Vec::len) as u64)
                .saturating_sub(capacity[n.capacity.node.as_str()])
        })
        .max()
        .unwrap_or(0);
    let hosts = super::listings(nodes.nodes.iter());
    let duplicates = hosts.values().filter(|&&c| c > 1).count();
    (by_coordinator.max(by_nodes), hosts.len(), duplicates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AgentState, AgentView, Capacity, NodeView};

    fn node(id: &str, capacity: u32, agents: &[&str]) -> NodeView {
        let mut c: Capacity = serde_json::from_value(json!({
            "node": id, "session": "s", "seq": 1, "version": "t", "arch": "aarch64",
            "agent_capacity": capacity, "agents_running": agents.len(), "agents": agents,
            "cpu": {"cores": 4, "load1": 0.0, "usage_pct": 0.0},
            "memory": {"total_bytes": 1, "available_bytes": 1},
            "models": [], "ollama_reachable": true, "labels": {}, "draining": false, "ts": 1
        }))
        .unwrap();
        c.agents = Some(agents.iter().map(|a| a.to_string()).collect());
        NodeView {
            capacity: c,
            state: "online".into(),
            cordoned: false,
            assigned: 0,
            last_seen_secs: 0,
        }
    }

    fn placed(name: &str, node: &str) -> AgentView {
        serde_json::from_value(json!({
            "name": name, "model": "m", "state": AgentState::Running, "node": node,
            "system": null, "labels": {}, "placement": 1, "pending_reason": null,
            "queued_jobs": 0, "busy": false, "created_ms": 1, "state_secs": 0
        }))
        .unwrap()
    }

    #[test]
    fn hosting_counts_overfill_from_either_side_and_agents_hosted_twice() {
        let nodes = NodeList {
            nodes: vec![node("a", 2, &["x", "y"]), node("b", 2, &["z"])],
        };
        let fine = AgentList {
            agents: vec![placed("x", "a"), placed("y", "a"), placed("z", "b")],
        };
        assert_eq!(check_hosting(&nodes, &fine), (0, 3, 0));
        // The coordinator placed three on a node of two.
        let mut over = fine.agents.clone();
        over.push(placed("w", "b"));
        over.push(placed("v", "b"));
        let over = AgentList { agents: over };
        assert_eq!(check_hosting(&nodes, &over).0, 1);
        // A node reports more than its capacity, and one agent twice.
        let nodes = NodeList {
            nodes: vec![node("a", 2, &["x", "y", "z"]), node("b", 2, &["z"])],
        };
        assert_eq!(check_hosting(&nodes, &fine), (1, 3, 1));
    }
}
