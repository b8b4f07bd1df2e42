//! Models on demand (issue 15): `auto_pull` makes one node pull a model no
//! node has and the agent runs once it is done; without it the agent stays
//! pending naming the model; a failed pull shows its reason on the agent;
//! `pifleet models pull --wait` follows a pull to its end.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

const MODEL: &str = "qwen2.5:0.5b";

/// Two nodes, each with its own simulator (so that a pull on one is not
/// seen by the other) offering only llama3.2; `sim_args` are added.
async fn fleet(
    coordinator_extra: &str,
    sim_args: &[&str],
) -> (Mosquitto, Vec<Sim>, Vec<Node>, Coordinator) {
    let broker = Mosquitto::start();
    let coordinator = Coordinator::start(&broker, coordinator_extra);
    let mut sims = Vec::new();
    let mut nodes = Vec::new();
    for id in ["m1", "m2"] {
        let mut args = vec!["--models", "llama3.2", "--pull-secs", "1"];
        args.extend_from_slice(sim_args);
        let sim = Sim::start(&args);
        nodes.push(Node::start(id, &broker, &sim.url, "agent_capacity = 4", ""));
        sims.push(sim);
    }
    coordinator.wait_nodes_online(2).await;
    (broker, sims, nodes, coordinator)
}

async fn pulls(coordinator: &Coordinator) -> Vec<Value> {
    let (status, body) = coordinator.get("/v1/pulls").await;
    assert_eq!(status, 200, "{body}");
    body["pulls"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auto_pull_an_agent_runs_once_one_node_pulled_its_model() {
    let (_broker, sims, _nodes, coordinator) = fleet("[scheduler]\nauto_pull = true", &[]).await;
    coordinator.spawn_agent("q", MODEL).await;
    let node = poll("q to run", WAIT, || async {
        let a = coordinator.agent("q").await;
        (a.state == pifleet::protocol::AgentState::Running).then_some(a.node)
    })
    .await
    .expect("a node");
    let pulls = pulls(&coordinator).await;
    assert_eq!(pulls.len(), 1, "one node pulls it: {pulls:?}");
    assert_eq!(pulls[0]["node"], node.as_str());
    assert_eq!(pulls[0]["state"], "done");
    assert!(pulls[0]["reason"]
        .as_str()
        .unwrap()
        .contains("auto_pull for agent q"));
    // Only the node that pulled has it.
    let mut have = Vec::new();
    for sim in &sims {
        let (_, tags) = http_get(&format!("{}/api/tags", sim.url)).await;
        have.push(tags["models"].to_string().contains(MODEL));
    }
    assert_eq!(have.iter().filter(|h| **h).count(), 1, "{have:?}");
    let kinds: Vec<String> = coordinator
        .events()
        .await
        .iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect();
    assert!(
        kinds.contains(&"pull_started".into()) && kinds.contains(&"pull_done".into()),
        "{kinds:?}"
    );
    // `pifleet models` shows it on that node.
    let out = Command::new(pifleet_bin())
        .args(["models", "--coordinator", &coordinator.api])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with(MODEL))
        .unwrap_or_default();
    assert!(row.contains(&node) && row.contains("pulled it"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_auto_pull_the_agent_stays_pending_naming_its_model() {
    let (_broker, _sims, _nodes, coordinator) = fleet("", &[]).await;
    coordinator.spawn_agent("q", MODEL).await;
    let reason = poll("a pending reason", WAIT, || async {
        coordinator.agent("q").await.pending_reason
    })
    .await;
    assert!(
        reason.contains(&format!("without model {MODEL}")),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = coordinator.agent("q").await;
    assert_eq!(a.state, pifleet::protocol::AgentState::Pending);
    assert!(pulls(&coordinator).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_pull_shows_its_reason_on_the_agent() {
    let (_broker, _sims, _nodes, coordinator) =
        fleet("[scheduler]\nauto_pull = true", &["--pull-fail", MODEL]).await;
    coordinator.spawn_agent("q", MODEL).await;
    let reason = poll("the failure on the agent", WAIT, || async {
        let a = coordinator.agent("q").await;
        a.pending_reason.filter(|r| r.contains("failed"))
    })
    .await;
    assert!(
        reason.contains("pull model manifest: file does not exist"),
        "{reason}"
    );
    assert_eq!(
        coordinator.agent("q").await.state,
        pifleet::protocol::AgentState::Pending
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pifleet_models_pull_wait_follows_the_pull_to_its_end() {
    let (_broker, _sims, _nodes, coordinator) = fleet("", &[]).await;
    // m1 pulled it before: the pull on m2 says nothing of m1's.
    let (status, body) = coordinator
        .post(
            "/v1/pulls",
            serde_json::json!({"model": MODEL, "nodes": ["m1"]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    poll("m1's pull to end", WAIT, || async {
        let pulls = pulls(&coordinator).await;
        (pulls
            .iter()
            .any(|p| p["node"] == "m1" && p["state"] == "done"))
        .then_some(())
    })
    .await;
    let out = Command::new(pifleet_bin())
        .args([
            "models",
            "pull",
            MODEL,
            "--node",
            "m2",
            "--wait",
            "--coordinator",
            &coordinator.api,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("pulling qwen2.5:0.5b on m2"), "{stdout}");
    assert!(stdout.contains("m2 pulling"), "no progress shown: {stdout}");
    assert!(stdout.contains("m2 pulled it"), "{stdout}");
    assert!(!stdout.contains("m1"), "{stdout}");
    poll("m2 to list the model", WAIT, || async {
        coordinator
            .node("m2")
            .await
            .capacity
            .models
            .contains(&MODEL.to_owned())
            .then_some(())
    })
    .await;
    // A name that is not a model's: a clear error, exit 1.
    let out = Command::new(pifleet_bin())
        .args([
            "models",
            "pull",
            "Not A Model!",
            "--coordinator",
            &coordinator.api,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a model name"), "{stderr}");
}
