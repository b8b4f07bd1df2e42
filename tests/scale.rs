//! Issue 18: a node's heartbeat does not grow with what it hosts, and the
//! coordinator's copy of each node's agent list stays exact (a real
//! Mosquitto, the coordinator and a node daemon as processes).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::{wait_until_async, Client, Coordinator, Mosquitto, Node, Sim, WAIT};

/// The seed's own Pi: `agent_capacity=22500`.
const AGENTS: usize = 22_500;
const CAPACITY: &str = "pifleet/nodes/big/capacity";
const UPDATES: &str = "pifleet/nodes/big/agents";

/// Names the node itself says it hosts (its own API).
async fn hosted(node: &Node) -> BTreeSet<String> {
    let (status, body) = node.get("/v1/agents").await;
    assert_eq!(status, 200, "{body}");
    body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Names the coordinator holds for the node.
async fn held(coordinator: &Coordinator) -> Option<BTreeSet<String>> {
    let (status, body) = coordinator.get("/v1/nodes/big").await;
    assert_eq!(status, 200, "{body}");
    let names = body["agents"].as_array()?;
    Some(
        names
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect(),
    )
}

async fn wait_exact(what: &str, coordinator: &Coordinator, node: &Node) {
    let timeout = Duration::from_secs(30);
    wait_until_async(what, timeout, || async {
        held(coordinator).await == Some(hosted(node).await)
    })
    .await;
}

fn size(m: &crate::util::Received) -> usize {
    m.payload.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_of_22500_agents_heartbeats_small_sends_changes_small_and_the_coordinator_stays_exact(
) {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let mut coordinator = Coordinator::start(&broker, "");
    let watch = Client::connect(&broker, &[CAPACITY, UPDATES]).await;
    let node = Node::start("big", &broker, &sim.url, "agent_capacity = 22500", "");
    coordinator.wait_nodes_online(1).await;
    let (status, body) = coordinator
        .post(
            "/v1/agents",
            json!({"count": AGENTS, "prefix": "s", "model": "llama3.2"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_until_async("22,500 agents to run", Duration::from_secs(120), || async {
        coordinator.status().await.summary.agents_running == AGENTS
    })
    .await;
    assert_eq!(node.proc.count_lines("did not confirm"), 0);
    assert_eq!(coordinator.proc.count_lines("did not confirm"), 0);
    assert_eq!(node.proc.count_lines("not hosted"), 0);
    // One log line per batch, not per agent.
    assert!(node.proc.count_lines("agents in one batch") < 100);
    wait_exact(
        "the coordinator to hold the node's list",
        &coordinator,
        &node,
    )
    .await;

    // The heartbeat: no names, whatever the node hosts.
    let beat = watch
        .wait_message(CAPACITY, |m| m.json()["agents_running"] == AGENTS)
        .await;
    let heartbeat: Value = beat.json();
    let text: String = beat.text().chars().take(300).collect();
    assert!(size(&beat) <= 2048, "{} bytes: {text}...", size(&beat));
    assert!(heartbeat.get("agents").is_none(), "{text}");

    // One agent less, one more: an update of a few hundred bytes each.
    let (status, body) = coordinator.delete("/v1/agents/s-17").await;
    assert_eq!(status, 200, "{body}");
    let removed = watch
        .wait_message(UPDATES, |m| m.json()["removed"] == json!(["s-17"]))
        .await;
    assert!(size(&removed) <= 300, "{}", removed.text());
    coordinator.spawn_agent("one-more", "llama3.2").await;
    let added = watch
        .wait_message(UPDATES, |m| m.json()["added"] == json!(["one-more"]))
        .await;
    assert!(size(&added) <= 300, "{}", added.text());
    wait_exact(
        "the coordinator to follow both changes",
        &coordinator,
        &node,
    )
    .await;

    // A restarted coordinator asks for the whole list and holds it exactly.
    let whole_lists = |w: &Client| {
        w.on_topic(UPDATES)
            .iter()
            .filter(|m| m.json().get("base").is_none())
            .count()
    };
    let before = whole_lists(&watch);
    coordinator.proc.signal("KILL");
    coordinator.restart();
    wait_exact(
        "the restarted coordinator to hold the list",
        &coordinator,
        &node,
    )
    .await;
    assert!(whole_lists(&watch) > before, "the node sent its whole list");
    let parts = watch
        .on_topic(UPDATES)
        .iter()
        .filter(|m| m.json()["more"] == true)
        .count();
    assert!(parts > 0, "22,500 names go in more than one part");

    // A change the coordinator cannot chain (as if it missed one): it
    // drops its copy, asks again and is exact again.
    let session = heartbeat["session"].as_str().unwrap();
    let rev = watch.on_topic(UPDATES).last().unwrap().json()["seq"]
        .as_u64()
        .unwrap();
    let before = whole_lists(&watch);
    let gap = json!({"node": "big", "session": session, "seq": rev + 2, "base": rev + 1,
                     "added": ["ghost"], "digest": "0000000000000000"});
    watch.publish_json(UPDATES, &gap).await;
    wait_until_async("the node to send its whole list again", WAIT, || async {
        whole_lists(&watch) > before
    })
    .await;
    wait_exact(
        "the coordinator to be exact after the gap",
        &coordinator,
        &node,
    )
    .await;
    assert!(!held(&coordinator).await.unwrap().contains("ghost"));
    // Learning the list, in parts, moved nothing: no agent was thought gone
    // or found again, none placed twice.
    for needle in ["no longer hosts", "already runs on", "releasing"] {
        assert_eq!(coordinator.proc.count_lines(needle), 0, "{needle}");
    }
    assert_eq!(coordinator.status().await.summary.agents_running, AGENTS);
}
