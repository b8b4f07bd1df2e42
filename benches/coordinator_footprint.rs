//! Coordinator footprint: resident memory of the release coordinator with
//! 30,000 agents placed on 300 simulated nodes of 100 slots, and how long
//! creating and placing them took. One MQTT client plays all 300 nodes with
//! the project's own protocol types (retained status and capacity, acks,
//! heartbeats); the coordinator is the real process on a real Mosquitto.
//!
//!     cargo bench --bench coordinator_footprint
//!
//! Results are recorded in docs/BENCHMARKS.md.

#[path = "../tests/util/mod.rs"]
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pifleet::protocol::{
    decode, encode, now_ms, Ack, Capacity, Command, CommandBody, CpuInfo, MemoryInfo, NodeTopic,
    Reply, ReplyBody, Topics,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use util::{Coordinator, Mosquitto};

const NODES: usize = 300;
const CAPACITY: u32 = 100;
const AGENTS: usize = 30_000;
const CLIENTS: usize = 16;

struct SimNode {
    session: String,
    seq: u64,
    agents: BTreeSet<String>,
}

type Fleet = Arc<Mutex<BTreeMap<String, SimNode>>>;

fn capacity(id: &str, node: &mut SimNode) -> Capacity {
    node.seq += 1;
    Capacity {
        node: id.to_owned(),
        session: node.session.clone(),
        seq: node.seq,
        version: "bench".into(),
        arch: "aarch64".into(),
        agent_capacity: CAPACITY,
        agents_running: node.agents.len() as u32,
        agents: node.agents.iter().cloned().collect(),
        cpu: CpuInfo {
            cores: 4,
            load1: 0.2,
            usage_pct: 5.0,
        },
        memory: MemoryInfo {
            total_bytes: 8 << 30,
            available_bytes: 6 << 30,
        },
        temperature_c: Some(50.0),
        throttled: Some(false),
        models: vec!["llama3.2:latest".into()],
        ollama_reachable: true,
        labels: BTreeMap::new(),
        draining: false,
        ts: now_ms(),
        max_temperature_c: Some(80.0),
        max_parallel: 1,
        turns_in_flight: 0,
        generation: 0,
    }
}

/// Resident memory in KiB (`pifleet bench` reads it the same way).
fn rss_kib(pid: u32) -> u64 {
    pifleet::bench::rss_bytes(pid) / 1024
}

/// Plays 300 nodes on one connection: answers assign and release commands
/// and publishes capacity heartbeats.
async fn simulate_fleet(port: u16) -> Fleet {
    let topics = Topics::new("pifleet");
    let fleet: Fleet = Arc::new(Mutex::new(
        (0..NODES)
            .map(|i| {
                (
                    format!("sim-{i:03}"),
                    SimNode {
                        session: format!("{:016x}", i),
                        seq: 0,
                        agents: BTreeSet::new(),
                    },
                )
            })
            .collect(),
    ));
    let mut options = MqttOptions::new("bench-fleet", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>, bool)>();
    let publisher = client.clone();
    tokio::spawn(async move {
        while let Some((topic, payload, retain)) = rx.recv().await {
            if publisher
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    client
        .subscribe(topics.all_nodes(NodeTopic::Command), QoS::AtLeastOnce)
        .await
        .unwrap();
    {
        let mut nodes = fleet.lock().unwrap();
        for (id, node) in nodes.iter_mut() {
            tx.send((topics.node(id, NodeTopic::Status), b"online".to_vec(), true))
                .unwrap();
            tx.send((
                topics.node(id, NodeTopic::Capacity),
                encode(&capacity(id, node)),
                true,
            ))
            .unwrap();
        }
    }
    let (handler_fleet, handler_tx, handler_topics) = (fleet.clone(), tx.clone(), topics.clone());
    tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let Ok(Event::Incoming(Packet::Publish(p))) = event else {
                if event.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            };
            let Some((node_id, _)) = handler_topics.parse_node_topic(&p.topic) else {
                continue;
            };
            let Ok(command) = decode::<Command>(&p.payload, 16 << 20) else {
                continue;
            };
            let mut nodes = handler_fleet.lock().unwrap();
            let Some(node) = nodes.get_mut(node_id) else {
                continue;
            };
            let (kind, agent, placement, ok) = match &command.body {
                CommandBody::Assign { agent, placement } => {
                    let ok =
                        node.agents.len() < CAPACITY as usize || node.agents.contains(&agent.name);
                    if ok {
                        node.agents.insert(agent.name.clone());
                    }
                    (
                        pifleet::protocol::CommandKind::Assign,
                        agent.name.clone(),
                        *placement,
                        ok,
                    )
                }
                CommandBody::Release { agent, placement } => {
                    node.agents.remove(agent);
                    (
                        pifleet::protocol::CommandKind::Release,
                        agent.clone(),
                        *placement,
                        true,
                    )
                }
                _ => continue,
            };
            let reply = Reply {
                id: command.id.clone(),
                node: node_id.to_owned(),
                session: node.session.clone(),
                generation: command.generation,
                body: ReplyBody::Ack(Ack {
                    command: kind,
                    agent: Some(agent),
                    placement: Some(placement),
                    ok,
                    reason: (!ok).then(|| "full".to_owned()),
                    agents_running: node.agents.len() as u32,
                    ts: now_ms(),
                }),
            };
            let _ = handler_tx.send((
                handler_topics.node(node_id, NodeTopic::Reply),
                encode(&reply),
                false,
            ));
        }
    });
    let (beat_fleet, beat_tx) = (fleet.clone(), tx);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let mut nodes = beat_fleet.lock().unwrap();
            for (id, node) in nodes.iter_mut() {
                let _ = beat_tx.send((
                    topics.node(id, NodeTopic::Capacity),
                    encode(&capacity(id, node)),
                    true,
                ));
            }
        }
    });
    fleet
}

#[tokio::main]
async fn main() {
    let broker = Mosquitto::start();
    let coordinator = Coordinator::start(
        &broker,
        "[timeouts]\nnode_lost_after_secs = 60\nassign_ack_secs = 60",
    );
    let pid = coordinator.proc.pid();
    let empty = rss_kib(pid);
    let fleet = simulate_fleet(broker.port).await;
    coordinator.wait_nodes_online(NODES as u64).await;
    let with_nodes = rss_kib(pid);

    let started = Instant::now();
    let api = coordinator.api.clone();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let api = api.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                for i in (c..AGENTS).step_by(CLIENTS) {
                    let body = serde_json::json!({"name": format!("agent-{i:05}"), "model": "llama3.2", "system": "You are a helpful assistant."});
                    let response = http.post(format!("{api}/v1/agents")).json(&body).send().await.expect("create");
                    assert_eq!(response.status().as_u16(), 201);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let created = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, status) = coordinator.get("/v1/status?limit=0").await;
        if status["agents_running"] == AGENTS as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "not all agents ran: {status}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let placed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(6)).await; // a heartbeat round with full agent lists
    let loaded = rss_kib(pid);
    let hosted: usize = fleet.lock().unwrap().values().map(|n| n.agents.len()).sum();
    assert_eq!(hosted, AGENTS, "the simulated nodes host every agent once");

    println!("coordinator footprint ({} build, Mosquitto on loopback, {NODES} simulated nodes x {CAPACITY} slots)", if cfg!(debug_assertions) { "debug" } else { "release" });
    println!(
        "  RSS, no nodes:                   {:>8.1} MiB",
        empty as f64 / 1024.0
    );
    println!(
        "  RSS, {NODES} nodes online:           {:>8.1} MiB",
        with_nodes as f64 / 1024.0
    );
    println!(
        "  RSS, {AGENTS} agents running:     {:>8.1} MiB",
        loaded as f64 / 1024.0
    );
    println!(
        "  create {AGENTS} agents over HTTP ({CLIENTS} clients): {:.1} s ({:.0} agents/s)",
        created.as_secs_f64(),
        AGENTS as f64 / created.as_secs_f64()
    );
    println!(
        "  all {AGENTS} running (acknowledged by nodes):      {:.1} s",
        placed.as_secs_f64()
    );
}
