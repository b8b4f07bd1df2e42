//! `pifleet bench failover`: real node daemons; the one hosting the most
//! agents is killed (`kill -9`: the kernel closes its connection, the broker
//! sends its last will at once) or frozen (SIGSTOP: no FIN, as in a power
//! cut or a pulled cable). Measured from the signal: when the coordinator
//! stops counting the node online, and when all its agents run elsewhere.
//! `duplicates` is the most agents seen listed by two online nodes at once,
//! sampled throughout (a frozen node is let go again at the end, so that
//! its copies must be fenced off).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::{json, Value};

use super::chat::start_fleet;
use super::{progress, round3, BenchError, Stack};
use crate::protocol::{AgentList, AgentState, NodeList};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// kill -9: the connection closes at once.
    Kill,
    /// SIGSTOP: the node goes silent with its connection open.
    Freeze,
}

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Agents spread over the nodes before one fails.
    #[arg(long, default_value_t = 100, value_parser = super::chat::at_least_1())]
    agents: usize,
    /// Node daemons (each with room for every agent); at least 2.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    nodes: usize,
    #[arg(long, value_enum, default_value_t = Mode::Kill)]
    mode: Mode,
    /// Use this broker (HOST:PORT) instead of starting Mosquitto.
    #[arg(long)]
    mqtt: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    limit_secs: u64,
}

/// Agents listed by more than one online node.
fn duplicates(nodes: &NodeList) -> usize {
    let online = nodes.nodes.iter().filter(|n| n.state == "online");
    super::listings(online).values().filter(|&&c| c > 1).count()
}

pub async fn bench(args: &FailoverArgs, stack: &mut Stack) -> Result<Value, BenchError> {
    let capacity = u32::try_from(args.agents).unwrap_or(u32::MAX);
    let (api, _, _) = start_fleet(stack, args.mqtt.as_deref(), args.nodes, capacity, "").await?;
    api.spawn("fo", args.agents, "llama3.2").await?;
    let want = args.agents;
    api.wait_for("the agents to run", Duration::from_secs(60), |s| {
        s.summary.agents_running >= want
    })
    .await?;
    // Where the coordinator placed them (nodes' own lists may lag a report).
    let agents: AgentList = api.get("/v1/agents").await?;
    let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in agents.agents {
        if let Some(node) = a.node {
            by_node.entry(node).or_default().insert(a.name);
        }
    }
    let (victim, moved) = by_node
        .into_iter()
        .max_by_key(|(_, agents)| agents.len())
        .ok_or_else(|| BenchError::new("no agent runs anywhere"))?;
    let (signal, name) = match args.mode {
        Mode::Kill => (Signal::KILL, "SIGKILL"),
        Mode::Freeze => (Signal::STOP, "SIGSTOP"),
    };
    progress(format!(
        "{} agents running; sending {name} to {victim}, which hosts {}",
        args.agents,
        moved.len()
    ));
    let start = Instant::now();
    stack.signal(&victim, signal)?;
    let limit = Duration::from_secs(args.limit_secs);
    let (mut detected, mut all_running, mut most_duplicates) = (None, None, 0);
    while detected.is_none() || all_running.is_none() {
        if start.elapsed() > limit {
            return Err(BenchError::new(format!(
                "after {}s: detected {detected:?}, all running {all_running:?}",
                limit.as_secs()
            )));
        }
        let nodes: NodeList = api.get("/v1/nodes").await?;
        most_duplicates = most_duplicates.max(duplicates(&nodes));
        let down = nodes
            .nodes
            .iter()
            .any(|n| n.capacity.node == victim && n.state != "online");
        if down && detected.is_none() {
            detected = Some(start.elapsed());
            progress(format!(
                "{victim} no longer online after {:?}",
                start.elapsed()
            ));
        }
        let agents: AgentList = api.get("/v1/agents").await?;
        let elsewhere = agents
            .agents
            .iter()
            .filter(|a| moved.contains(&a.name))
            .filter(|a| a.state == AgentState::Running && a.node.as_deref() != Some(&victim))
            .count();
        if elsewhere == moved.len() && all_running.is_none() {
            all_running = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if args.mode == Mode::Freeze {
        // Let it go: it comes back with stale copies, which must be fenced.
        stack.signal(&victim, Signal::CONT)?;
        progress(format!("{victim} continued; watching for copies for 15 s"));
        let watch = Instant::now();
        while watch.elapsed() < Duration::from_secs(15) {
            let nodes: NodeList = api.get("/v1/nodes").await?;
            most_duplicates = most_duplicates.max(duplicates(&nodes));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let secs = |d: Option<Duration>| round3(d.unwrap_or_default().as_secs_f64());
    Ok(json!({
        "bench": "failover",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "agents": args.agents,
        "moved": moved.len(),
        "seconds_to_detect": secs(detected),
        "seconds_to_all_running": secs(all_running),
        "duplicates": most_duplicates,
    }))
}
