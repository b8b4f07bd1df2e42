//! `pifleet bench failover`: real node daemons, each with its own Ollama
//! simulator (slow enough that chats are mid-generation), chats running
//! throughout; the node hosting the most agents then fails:
//!
//! * `kill`: `kill -9` of the node (the kernel closes its connection, the
//!   broker sends its last will at once);
//! * `freeze`: SIGSTOP of the node *and* its Ollama, as a hung machine (no
//!   FIN), let go again after `--fault-secs`;
//! * `partition`: its broker link is blackholed by a proxy (no FIN, the
//!   process runs on), healed after `--fault-secs`.
//!
//! Measured from the fault: when the coordinator stops counting the node
//! online, and when all its agents run elsewhere. Copies are counted from
//! the machines' own records every 20 ms ([`super::copies`]): agents hosted
//! by two nodes, and agents generating on two nodes, at any sample; and at
//! the end, agents not hosted exactly once. Chats are counted by outcome:
//! answered, failed with a retryable error (503/429 with `Retry-After`),
//! failed otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::{json, Value};

use super::copies::{self, Machine};
use super::proxy::Blackhole;
use super::{progress, round3, Api, BenchError, Stack};
use crate::protocol::{AgentList, AgentState, NodeList};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// kill -9: the connection closes at once.
    Kill,
    /// SIGSTOP of the node and its Ollama: silent, connection open.
    Freeze,
    /// The node's broker link blackholed: silent, process running.
    Partition,
}

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Agents spread over the nodes before one fails.
    #[arg(long, default_value_t = 20, value_parser = super::chat::at_least_1())]
    agents: usize,
    /// Node daemons (each with room for every agent); at least 2.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    nodes: usize,
    #[arg(long, value_enum, default_value_t = Mode::Kill)]
    mode: Mode,
    /// How long a freeze or a partition lasts.
    #[arg(long, default_value_t = 30)]
    fault_secs: u64,
    /// Tokens per second of each node's simulated Ollama.
    #[arg(long, default_value_t = 20.0)]
    tokens_per_sec: f64,
    /// Use this broker (HOST:PORT) instead of starting Mosquitto.
    #[arg(long)]
    mqtt: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    limit_secs: u64,
}

/// Chat outcomes while the bench runs.
#[derive(Default)]
struct Chats {
    ok: AtomicU64,
    retryable: AtomicU64,
    failed: AtomicU64,
}

pub async fn bench(args: &FailoverArgs, stack: &mut Stack) -> Result<Value, BenchError> {
    let mqtt = super::chat::broker(stack, args.mqtt.as_deref())?;
    let (url, _) = stack.coordinator(&mqtt, "")?;
    let api = Arc::new(Api::new(&url, None, 64));
    let capacity = u32::try_from(args.agents).unwrap_or(u32::MAX);
    let mut machines = Vec::new();
    let mut proxies = BTreeMap::new();
    for i in 1..=args.nodes {
        let id = format!("bench-node-{i}");
        let sim = stack.simulator_as(&format!("sim-{i}"), args.tokens_per_sec)?;
        let mut link = mqtt.clone();
        if args.mode == Mode::Partition {
            let proxy = Blackhole::start(mqtt.port)
                .await
                .map_err(|e| BenchError::new(format!("cannot start the link proxy: {e}")))?;
            link.port = proxy.port;
            proxies.insert(id.clone(), proxy);
        }
        stack.node(&id, &link, &sim, capacity, 100)?;
        let node_api = stack.wait_log(&id, "API ")?;
        let node_api = node_api.split(',').next().unwrap_or("").trim().to_owned();
        machines.push(Machine {
            node: id,
            api: Api::new(&node_api, None, 2),
            sim: Api::new(&sim, None, 2),
        });
    }
    let nodes = args.nodes;
    api.wait_for("every node online", Duration::from_secs(60), |s| {
        s.summary.nodes_online >= nodes
    })
    .await?;
    // Each agent's name is its system prompt: the simulators list it.
    for i in 1..=args.agents {
        let name = format!("fo-{i}");
        let body = json!({"name": name, "model": "llama3.2", "system": name});
        api.expect(reqwest::Method::POST, "/v1/agents", Some(&body), 201)
            .await?;
    }
    let want = args.agents;
    api.wait_for("the agents to run", Duration::from_secs(60), |s| {
        s.summary.agents_running >= want
    })
    .await?;
    let (victim, moved) = busiest(&api).await?;
    let machines = Arc::new(machines);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(copies::watch(
        machines.clone(),
        // A sample takes a few ms: every 15 ms keeps gaps under 20 ms.
        Duration::from_millis(15),
        stopped.clone(),
    ));
    let chats = Arc::new(Chats::default());
    let chatters: Vec<_> = (1..=args.agents)
        .map(|i| {
            tokio::spawn(chat_loop(
                api.clone(),
                format!("fo-{i}"),
                chats.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    // Let generations get under way on every node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    progress(format!(
        "{} agents running; {:?} fault on {victim}, which hosts {}",
        args.agents,
        args.mode,
        moved.len()
    ));
    let sim_of_victim = format!("sim-{}", victim.trim_start_matches("bench-node-"));
    let start = Instant::now();
    match args.mode {
        Mode::Kill => stack.signal(&victim, Signal::KILL)?,
        Mode::Freeze => {
            stack.signal(&victim, Signal::STOP)?;
            stack.signal(&sim_of_victim, Signal::STOP)?;
        }
        Mode::Partition => proxies[&victim].set_cut(true),
    }
    let (detected, all_running) = wait_moved(&api, &victim, &moved, args.limit_secs, start).await?;
    if args.mode != Mode::Kill {
        tokio::time::sleep(Duration::from_secs(args.fault_secs).saturating_sub(start.elapsed()))
            .await;
        match args.mode {
            Mode::Freeze => {
                stack.signal(&sim_of_victim, Signal::CONT)?;
                stack.signal(&victim, Signal::CONT)?;
            }
            _ => proxies[&victim].set_cut(false),
        }
        progress(format!(
            "{victim} back after {:?}; watching for copies for 15 s",
            start.elapsed()
        ));
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
    stop.send_replace(true);
    for chatter in chatters {
        let _ = chatter.await;
    }
    let copies = watcher
        .await
        .map_err(|e| BenchError::new(format!("the watcher failed: {e}")))?;
    let dead = if args.mode == Mode::Kill {
        vec![victim.as_str()]
    } else {
        vec![]
    };
    let hosted = copies::hosted(&machines, &dead).await?;
    let not_once: Vec<String> = (1..=args.agents)
        .map(|i| format!("fo-{i}"))
        .filter(|name| hosted.get(name).map_or(0, Vec::len) != 1)
        .collect();
    // Where those are (no node, or several), to tell the two apart.
    let not_once_hosts: BTreeMap<&String, &[String]> = not_once
        .iter()
        .map(|name| (name, hosted.get(name).map_or(&[][..], Vec::as_slice)))
        .collect();
    let secs = |d: Option<Duration>| round3(d.unwrap_or_default().as_secs_f64());
    Ok(json!({
        "bench": "failover",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "agents": args.agents,
        "moved": moved.len(),
        "seconds_to_detect": secs(detected),
        "seconds_to_all_running": secs(all_running),
        "hosted_twice": copies.hosted_twice,
        "generating_twice": copies.generating_twice,
        "duplicates": copies.hosted_twice.max(copies.generating_twice),
        "not_hosted_once_at_end": not_once,
        "not_hosted_once_at_end_hosts": not_once_hosts,
        "samples": copies.samples,
        "unanswered_samples": copies.unanswered,
        "max_sample_gap_ms": copies.max_gap_ms,
        "chats_ok": chats.ok.load(Ordering::Relaxed),
        "chats_retryable": chats.retryable.load(Ordering::Relaxed),
        "chats_failed": chats.failed.load(Ordering::Relaxed),
    }))
}

/// The node the coordinator placed the most agents on, and those agents.
async fn busiest(api: &Api) -> Result<(String, BTreeSet<String>), BenchError> {
    let agents: AgentList = api.get("/v1/agents").await?;
    let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in agents.agents {
        if let Some(node) = a.node {
            by_node.entry(node).or_default().insert(a.name);
        }
    }
    by_node
        .into_iter()
        .max_by_key(|(_, agents)| agents.len())
        .ok_or_else(|| BenchError::new("no agent runs anywhere"))
}

/// Until the coordinator no longer counts `victim` online and runs all of
/// `moved` elsewhere: when each happened.
async fn wait_moved(
    api: &Api,
    victim: &str,
    moved: &BTreeSet<String>,
    limit_secs: u64,
    start: Instant,
) -> Result<(Option<Duration>, Option<Duration>), BenchError> {
    let (mut detected, mut all_running) = (None, None);
    while detected.is_none() || all_running.is_none() {
        if start.elapsed() > Duration::from_secs(limit_secs) {
            return Err(BenchError::new(format!(
                "after {limit_secs}s: detected {detected:?}, all running {all_running:?}"
            )));
        }
        let nodes: NodeList = api.get("/v1/nodes").await?;
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
            .filter(|a| a.state == AgentState::Running && a.node.as_deref() != Some(victim))
            .count();
        if elsewhere == moved.len() && all_running.is_none() {
            let now = start.elapsed();
            all_running = Some(now);
            // The moves prove the coordinator noticed: its node list can
            // say so a sample later than its agents do.
            detected.get_or_insert(now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((detected, all_running))
}

/// Chats with `agent`, one at a time, until `stop`.
async fn chat_loop(
    api: Arc<Api>,
    agent: String,
    chats: Arc<Chats>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let body = json!({"agent": agent, "messages": [{"role": "user", "content": "count to ten"}]});
    while !*stop.borrow() {
        // A chat under way when the bench stops is waited for and counted.
        let outcome = api
            .send(reqwest::Method::POST, "/v1/chat", Some(&body))
            .await;
        let counter = match outcome {
            Ok((200, answer)) if answer["message"]["content"].is_string() => &chats.ok,
            Ok((429 | 503, _)) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                &chats.retryable
            }
            _ => &chats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
