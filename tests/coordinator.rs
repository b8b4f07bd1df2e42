//! Acceptance tests of the coordinator (issue 3): a real Mosquitto, the
//! coordinator and the node daemons as real processes, the Ollama simulator.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pifleet::protocol::{
    AgentList, AgentState, AgentView, ChatAnswer, EventKind, FleetStatus, JobList, JobState,
    NodeList, NodeView,
};
use serde_json::{json, Value};

use crate::util::{
    http_get, poll, send, view, wait_until, wait_until_async, Client, Coordinator, Mosquitto, Node,
    Received, Sim, WAIT,
};

const ALL_NODES: [&str; 3] = [
    "pifleet/nodes/+/reply",
    "pifleet/nodes/+/status",
    "pifleet/nodes/+/capacity",
];

fn counts(placement: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, usize> {
    placement
        .iter()
        .map(|(n, a)| (n.clone(), a.len()))
        .collect()
}

/// Replays what nodes announced, in the order the broker delivered it: an
/// ok assign ack means the node hosts the agent from then on, an ok release
/// ack that it no longer does, an `offline` status that it hosts nothing.
/// Returns the largest number of nodes any agent was on at once, with a
/// description of the first double.
fn most_nodes_per_agent(log: &[Received]) -> (usize, Option<String>) {
    let mut hosts: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut worst = (0, None);
    for m in log {
        let parts: Vec<&str> = m.topic.split('/').collect();
        let (node, kind) = (parts[2].to_owned(), parts[3]);
        match kind {
            "status" if m.text() == "offline" => {
                hosts.remove(&node);
            }
            "reply" => {
                let acks = m.acks();
                if acks.is_empty() {
                    continue;
                }
                for (command, agent, ok) in acks {
                    match (command.as_str(), ok) {
                        ("assign", true) => {
                            hosts.entry(node.clone()).or_default().insert(agent);
                        }
                        ("release", true) => {
                            hosts.entry(node.clone()).or_default().remove(&agent);
                        }
                        _ => {}
                    }
                }
            }
            _ => continue,
        }
        let mut on: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (node, agents) in &hosts {
            for a in agents {
                on.entry(a).or_default().push(node);
            }
        }
        for (agent, nodes) in on {
            if nodes.len() > worst.0 {
                worst = (nodes.len(), Some(format!("{agent} on {nodes:?}")));
            }
        }
    }
    worst
}

/// One node daemon per `(id, agent_capacity)`.
fn start_nodes(broker: &Mosquitto, sim: &Sim, nodes: &[(&str, u64)]) -> Vec<Node> {
    nodes
        .iter()
        .map(|(id, cap)| {
            let top = format!("agent_capacity = {cap}");
            Node::start(id, broker, &sim.url, &top, "")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn capacities_2_4_8_fill_exactly_proportionally_and_a_15th_agent_waits_for_new_capacity() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "");
    let _nodes = start_nodes(&broker, &sim, &[("n2", 2), ("n4", 4), ("n8", 8)]);
    coordinator.wait_nodes_online(3).await;
    let capacity = BTreeMap::from([("n2", 2.0), ("n4", 4.0), ("n8", 8.0)]);
    for step in 1..=7usize {
        coordinator
            .spawn_agent(&format!("a{step:02}"), "llama3.2")
            .await;
        coordinator.wait_running(step).await;
        let placed = counts(&coordinator.placement().await);
        for (node, cap) in &capacity {
            let have = *placed.get(*node).unwrap_or(&0) as f64;
            let share = step as f64 * cap / 14.0;
            assert!(
                (have - share).abs() <= 1.0,
                "after {step} agents {node} has {have}, its share is {share:.2}: {placed:?}"
            );
        }
    }
    for step in 8..=14 {
        coordinator
            .spawn_agent(&format!("a{step:02}"), "llama3.2")
            .await;
    }
    coordinator.wait_running(14).await;
    let placed = counts(&coordinator.placement().await);
    assert_eq!(
        placed,
        BTreeMap::from([("n2".into(), 2), ("n4".into(), 4), ("n8".into(), 8)])
    );

    coordinator.spawn_agent("a15", "llama3.2").await;
    // It stays pending, saying why, while the fleet is full.
    wait_until_async("a15 to explain why it waits", WAIT, || async {
        coordinator
            .agent("a15")
            .await
            .pending_reason
            .as_deref()
            .is_some_and(|r| r.contains("3 full"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(coordinator.agent("a15").await.state, AgentState::Pending);
    // New capacity: it is placed there at once.
    let _extra = Node::start("n1", &broker, &sim.url, "agent_capacity = 1", "");
    wait_until_async("a15 to run on n1", WAIT, || async {
        let a = coordinator.agent("a15").await;
        a.state == AgentState::Running && a.node.as_deref() == Some("n1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_100_agents_against_100_slots_never_overfills_a_node() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "");
    let recorder = Client::connect(&broker, &ALL_NODES).await;
    let caps = [("b10", 10u64), ("b20", 20), ("b30", 30), ("b40", 40)];
    let _nodes = start_nodes(&broker, &sim, &caps);
    coordinator.wait_nodes_online(4).await;
    let api = coordinator.api.clone();
    let tasks: Vec<_> = (0..10)
        .map(|t| {
            let api = api.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let body = json!({"name": format!("burst-{t}-{i}"), "model": "llama3.2"});
                    let (status, reply) = send(
                        reqwest::Method::POST,
                        &format!("{api}/v1/agents"),
                        Some(body),
                        None,
                    )
                    .await;
                    assert_eq!(status, 201, "{reply}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    coordinator.wait_running(100).await;
    let placed = counts(&coordinator.placement().await);
    assert_eq!(
        placed,
        caps.iter()
            .map(|(n, c)| (n.to_string(), *c as usize))
            .collect::<BTreeMap<_, _>>()
    );
    // The coordinator never asked a node for more than it has: no refusal.
    let log = recorder.messages();
    let refusals: Vec<Value> = log
        .iter()
        .filter(|m| m.topic.ends_with("/reply"))
        .flat_map(|m| m.each())
        .filter(|r| r["ok"] == false)
        .collect();
    assert!(
        refusals.is_empty(),
        "nodes refused assignments: {refusals:?}"
    );
    for m in log.iter().filter(|m| m.topic.ends_with("/capacity")) {
        let c = m.json();
        assert!(
            c["agents_running"].as_u64() <= c["agent_capacity"].as_u64(),
            "{c}"
        );
    }
    assert_eq!(most_nodes_per_agent(&log).0, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_node_moves_its_agents_once_each_and_a_moved_agent_keeps_its_history() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "[scheduler]\nrebalance_threshold = 0");
    let recorder = Client::connect(&broker, &ALL_NODES).await;
    let mut nodes: BTreeMap<String, Node> = ["k1", "k2", "k3"]
        .iter()
        .map(|id| {
            (
                id.to_string(),
                Node::start(id, &broker, &sim.url, "agent_capacity = 4", ""),
            )
        })
        .collect();
    coordinator.wait_nodes_online(3).await;
    for i in 0..6 {
        coordinator.spawn_agent(&format!("m{i}"), "llama3.2").await;
    }
    coordinator.wait_running(6).await;
    let chat = |text: &str| json!({"agent": "m0", "messages": [{"role": "user", "content": text}]});
    let (status, first) = coordinator.post("/v1/chat", chat("My name is Ada.")).await;
    assert_eq!(status, 200, "{first}");
    let victim = view::<ChatAnswer>(&first).node;
    assert_eq!(
        coordinator
            .post("/v1/chat", chat("What is my name?"))
            .await
            .0,
        200
    );
    let moving: Vec<String> = coordinator.placement().await[&victim].clone();

    nodes.get_mut(&victim).unwrap().proc.signal("KILL");
    wait_until_async(
        "the agents of the killed node to run elsewhere",
        WAIT,
        || async {
            let placement = coordinator.placement().await;
            !placement.contains_key(&victim) && placement.values().map(Vec::len).sum::<usize>() == 6
        },
    )
    .await;
    for agent in &moving {
        let a = coordinator.agent(agent).await;
        assert_eq!(a.state, AgentState::Running, "{a:?}");
        assert_ne!(a.node.as_deref(), Some(victim.as_str()), "{a:?}");
    }
    let (status, answer) = coordinator
        .post("/v1/chat", chat("Do you remember me?"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let answer: ChatAnswer = view(&answer);
    assert_ne!(answer.node, victim);
    let text = &answer.message.content;
    // System prompt + two earlier exchanges + the new message.
    assert!(
        text.contains("received 6 messages"),
        "the history did not move with the agent: {text}"
    );
    assert!(
        text.contains("with system prompt \"You are m0.\""),
        "{text}"
    );

    let (most, example) = most_nodes_per_agent(&recorder.messages());
    assert_eq!(most, 1, "an agent ran on two nodes at once: {example:?}");
    let lost = coordinator
        .events()
        .await
        .into_iter()
        .filter(|e| e.kind == EventKind::NodeLost)
        .count();
    assert_eq!(lost, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_during_a_burst_restarts_with_every_agent_on_exactly_one_node() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let mut coordinator = Coordinator::start(&broker, "");
    let recorder = Client::connect(
        &broker,
        &[
            "pifleet/nodes/+/cmd",
            "pifleet/nodes/+/reply",
            "pifleet/nodes/+/status",
        ],
    )
    .await;
    let _nodes: Vec<Node> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| Node::start(id, &broker, &sim.url, "agent_capacity = 10", ""))
        .collect();
    coordinator.wait_nodes_online(3).await;
    let api = coordinator.api.clone();
    // A burst that keeps going through the crash: each name is retried until
    // it exists (201, or 409 when it was created just before the kill).
    let burst = tokio::spawn(async move {
        let mut created = Vec::new();
        for i in 0..30 {
            let name = format!("crash-{i:02}");
            loop {
                let body = json!({"name": name, "model": "llama3.2"});
                let request = reqwest::Client::new()
                    .post(format!("{api}/v1/agents"))
                    .json(&body)
                    .send()
                    .await;
                match request {
                    Ok(r) if r.status().as_u16() == 201 || r.status().as_u16() == 409 => break,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            created.push(name);
        }
        created
    });
    wait_until_async("a third of the burst", WAIT, || async {
        coordinator.agents().await.len() >= 10
    })
    .await;
    coordinator.proc.signal("KILL");
    let killed_at = recorder.messages().len();
    coordinator.restart();
    let created = burst.await.unwrap();
    assert_eq!(created.len(), 30);
    coordinator.wait_running(30).await;
    let agents = coordinator.agents().await;
    assert_eq!(agents.len(), 30, "the same agents exist after the restart");
    // Each on exactly one node, as the nodes themselves report it.
    wait_until_async("the nodes to report 30 agents", WAIT, || async {
        let mut seen = BTreeMap::<String, usize>::new();
        for n in coordinator.nodes().await {
            for a in n.capacity.agents.unwrap_or_default() {
                *seen.entry(a).or_default() += 1;
            }
        }
        seen.len() == 30 && seen.values().all(|&c| c == 1)
    })
    .await;
    let (most, example) = most_nodes_per_agent(&recorder.messages());
    assert_eq!(most, 1, "{example:?}");
    // Nothing that ran was stopped: no release was sent after the restart.
    let releases: Vec<Value> = recorder.messages()[killed_at..]
        .iter()
        .filter(|m| m.topic.ends_with("/cmd"))
        .flat_map(|m| m.each())
        .filter(|c| c["type"] == "release")
        .collect();
    assert!(
        releases.is_empty(),
        "the restarted coordinator released running agents: {releases:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_node_dies_mid_turn_completes_on_another_node() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "1500"]);
    let coordinator = Coordinator::start(&broker, "[scheduler]\nrebalance_threshold = 0");
    let mut nodes: BTreeMap<String, Node> = ["j1", "j2"]
        .iter()
        .map(|id| {
            (
                id.to_string(),
                Node::start(id, &broker, &sim.url, "agent_capacity = 2", ""),
            )
        })
        .collect();
    coordinator.wait_nodes_online(2).await;
    coordinator.spawn_agent("worker", "llama3.2").await;
    coordinator.wait_running(1).await;
    let id = coordinator
        .submit_job(
            "worker",
            json!({"message": "summarise the logs", "priority": 3}),
        )
        .await;
    let first_node: String = poll("the job to run", WAIT, || async {
        let j = coordinator.job(&id).await;
        (j.status == JobState::Running).then(|| j.node.expect("a running job has a node"))
    })
    .await;
    wait_until_async("the turn to reach Ollama", WAIT, || async {
        sim.stats().await["in_flight"] == 1
    })
    .await;
    nodes.get_mut(&first_node).unwrap().proc.signal("KILL");
    let done = poll("the job to complete", WAIT, || async {
        let j = coordinator.job(&id).await;
        (j.status == JobState::Completed).then_some(j)
    })
    .await;
    assert!(
        done.node.as_ref().is_some_and(|n| *n != first_node),
        "{done:?}"
    );
    let answer = done.answer.as_deref().unwrap_or_default();
    assert!(answer.contains("summarise the logs"), "{done:?}");
    assert!(
        done.usage.as_ref().is_some_and(|u| u.eval_count > 0),
        "{done:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_queued_jobs_complete_highest_priority_first_and_in_order_within_a_priority_per_agent(
) {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "5", "--tokens-per-sec", "2000"]);
    let coordinator = Coordinator::start(&broker, "");
    // No node yet: the agents wait, so every job is queued before any runs.
    for agent in ["pa", "pb"] {
        coordinator.spawn_agent(agent, "llama3.2").await;
    }
    let mut submitted: Vec<(String, String, i64, usize)> = Vec::new();
    for i in 0..50usize {
        let agent = if i % 2 == 0 { "pa" } else { "pb" };
        let priority = [1, 5, 3, 5, 0, 9, 1][i % 7];
        let id = coordinator
            .submit_job(
                agent,
                json!({"message": format!("job {i}"), "priority": priority}),
            )
            .await;
        submitted.push((agent.to_owned(), id, priority, i));
    }
    assert_eq!(coordinator.status().await.summary.queue_depth, 50);
    let _node = Node::start("q1", &broker, &sim.url, "agent_capacity = 2", "");
    wait_until_async(
        "all 50 jobs to complete",
        Duration::from_secs(60),
        || async { coordinator.jobs("state=completed&limit=100").await.len() == 50 },
    )
    .await;
    let finished: BTreeMap<String, u64> = coordinator
        .jobs("limit=100")
        .await
        .into_iter()
        .map(|j| (j.job_id, j.updated_ms))
        .collect();
    for agent in ["pa", "pb"] {
        let mut expected: Vec<&(String, String, i64, usize)> =
            submitted.iter().filter(|s| s.0 == agent).collect();
        expected.sort_by_key(|s| (-s.2, s.3));
        let mut actual = expected.clone();
        actual.sort_by_key(|s| finished[&s.1]);
        let order =
            |v: &[&(String, String, i64, usize)]| v.iter().map(|s| (s.2, s.3)).collect::<Vec<_>>();
        assert_eq!(
            order(&actual),
            order(&expected),
            "{agent}: (priority, submission) in completion order"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_429_422_401_413_409_and_404_as_json() {
    let broker = Mosquitto::start();
    let token = "a-long-enough-secret-token";
    let coordinator = Coordinator::start(
        &broker,
        &format!("[api]\ntoken = \"{token}\"\nmax_body_bytes = 4096\n[queue]\nmax_jobs_per_agent = 3\nretry_after_secs = 7"),
    );
    let url = |path: &str| format!("{}{path}", coordinator.api);
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let url = url(path);
        async move { send(method, &url, body, Some(token)).await }
    };
    // No token, wrong token, right token.
    let (status, body) = send(reqwest::Method::GET, &url("/v1/agents"), None, None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    assert_eq!(
        send(
            reqwest::Method::GET,
            &url("/v1/agents"),
            None,
            Some("wrong")
        )
        .await
        .0,
        401
    );
    assert_eq!(call(reqwest::Method::GET, "/v1/agents", None).await.0, 200);
    assert_eq!(
        send(reqwest::Method::GET, &url("/health"), None, None)
            .await
            .0,
        200,
        "probes need no token"
    );

    // Bad bodies.
    for (body, word) in [
        (json!({"name": "Bad Name", "model": "llama3.2"}), "name"),
        (json!({"name": "ok", "model": ""}), "model"),
        (json!({"name": "ok"}), "model"),
        (
            json!({"name": "ok", "model": "x", "colour": "red"}),
            "colour",
        ),
    ] {
        let (status, reply) = call(reqwest::Method::POST, "/v1/agents", Some(body)).await;
        assert_eq!(status, 422, "{reply}");
        assert_eq!(reply["code"], "invalid");
        assert!(reply["error"].as_str().unwrap().contains(word), "{reply}");
    }
    let not_json = reqwest::Client::new()
        .post(url("/v1/agents"))
        .bearer_auth(token)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status().as_u16(), 422);
    for (body, word) in [
        (json!({"agent": "a", "messages": []}), "empty"),
        (
            json!({"agent": "a", "messages": [{"role": "robot", "content": "x"}]}),
            "robot",
        ),
        (
            json!({"agent": "a", "messages": [{"role": "user", "content": "  "}]}),
            "empty",
        ),
    ] {
        let (status, reply) = call(reqwest::Method::POST, "/v1/chat", Some(body)).await;
        assert_eq!(status, 422, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains(word), "{reply}");
    }
    // Oversize.
    let big = json!({"name": "big", "model": "llama3.2", "system": "x".repeat(10_000)});
    let (status, reply) = call(reqwest::Method::POST, "/v1/agents", Some(big)).await;
    assert_eq!((status, reply["code"].as_str()), (413, Some("too_large")));

    // Duplicates and unknowns.
    assert_eq!(
        call(
            reqwest::Method::POST,
            "/v1/agents",
            Some(json!({"name": "q", "model": "llama3.2"}))
        )
        .await
        .0,
        201
    );
    assert_eq!(
        call(
            reqwest::Method::POST,
            "/v1/agents",
            Some(json!({"name": "q", "model": "llama3.2"}))
        )
        .await
        .0,
        409
    );
    assert_eq!(
        call(reqwest::Method::GET, "/v1/agents/nobody", None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(reqwest::Method::GET, "/v1/jobs/nojob", None).await.0,
        404
    );
    // Chat to an agent that cannot run (no nodes): 503 with the reason.
    wait_until_async("q to say why it waits", WAIT, || async {
        let (status, a) = call(reqwest::Method::GET, "/v1/agents/q", None).await;
        assert_eq!(status, 200, "{a}");
        view::<AgentView>(&a)
            .pending_reason
            .is_some_and(|r| r.contains("no nodes"))
    })
    .await;
    let (status, reply) = call(
        reqwest::Method::POST,
        "/v1/chat",
        Some(json!({"agent": "q", "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    assert_eq!(status, 503, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("no nodes"),
        "{reply}"
    );

    // Queue full: the fourth job of an agent gets 429 with Retry-After.
    for i in 0..3 {
        let (status, _) = call(
            reqwest::Method::POST,
            "/v1/agents/q/jobs",
            Some(json!({"message": format!("job {i}")})),
        )
        .await;
        assert_eq!(status, 202);
    }
    let full = reqwest::Client::new()
        .post(url("/v1/agents/q/jobs"))
        .bearer_auth(token)
        .json(&json!({"message": "one too many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status().as_u16(), 429);
    assert_eq!(full.headers()["retry-after"], "7");
    let body: Value = full.json().await.unwrap();
    assert_eq!(body["code"], "queue_full");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("max_jobs_per_agent"),
        "{body}"
    );
    let (status, reply) = call(
        reqwest::Method::POST,
        "/v1/agents/q/jobs",
        Some(json!({"message": "x", "priority": 5000})),
    )
    .await;
    assert_eq!(status, 422, "{reply}");
    // Bad query strings and wrong methods are JSON errors too.
    let (status, reply) = call(reqwest::Method::GET, "/v1/events?limit=many", None).await;
    assert_eq!(
        (status, reply["code"].as_str()),
        (422, Some("invalid")),
        "{reply}"
    );
    assert!(
        reply["error"].as_str().unwrap().contains("limit"),
        "{reply}"
    );
    let (status, reply) = call(reqwest::Method::GET, "/v1/jobs?state=lost", None).await;
    assert_eq!(status, 422, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("queued, running"),
        "{reply}"
    );
    let (status, reply) = call(reqwest::Method::GET, "/v1/agents/%FF", None).await;
    assert_eq!(
        (status, reply["code"].as_str()),
        (400, Some("bad_path")),
        "{reply}"
    );
    let (status, reply) = call(reqwest::Method::PUT, "/v1/agents", None).await;
    assert_eq!(status, 405, "{reply}");
    assert_eq!(reply["error"], "/v1/agents does not take PUT", "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_a_node_of_6_agents_moves_at_most_2_at_a_time_and_leaves_it_empty_and_draining() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "[scheduler]\nrebalance_threshold = 0");
    let recorder = Client::connect(&broker, &ALL_NODES).await;
    let _d = Node::start("d", &broker, &sim.url, "agent_capacity = 6", "");
    coordinator.wait_nodes_online(1).await;
    for i in 0..6 {
        coordinator.spawn_agent(&format!("dr{i}"), "llama3.2").await;
    }
    coordinator.wait_running(6).await;
    let _e = Node::start("e", &broker, &sim.url, "agent_capacity = 4", "");
    let _f = Node::start("f", &broker, &sim.url, "agent_capacity = 4", "");
    coordinator.wait_nodes_online(3).await;
    let drain_from = recorder.messages().len();
    let (status, node) = coordinator
        .post("/v1/nodes/d/drain", json!({"max_parallel": 2}))
        .await;
    assert_eq!(status, 200, "{node}");
    wait_until_async("d to be empty", WAIT, || async {
        let placement = coordinator.placement().await;
        !placement.contains_key("d") && placement.values().map(Vec::len).sum::<usize>() == 6
    })
    .await;
    // The node itself says it is draining.
    let capacity = recorder
        .wait_message("pifleet/nodes/d/capacity", |m| {
            m.json()["draining"] == true && m.json()["agents_running"] == 0
        })
        .await;
    assert_eq!(capacity.json()["agents"], json!([]));
    // Never more than 2 in motion: by the coordinator's events...
    let mut in_motion = 0i32;
    let mut most = 0;
    for e in coordinator.events().await {
        match e.kind {
            EventKind::Moving => in_motion += 1,
            EventKind::Moved => in_motion -= 1,
            _ => {}
        }
        most = most.max(in_motion);
    }
    assert_eq!(most, 2, "moves in flight at once (events)");
    assert_eq!(in_motion, 0);
    // ...and by what the nodes acknowledged: agents hosted nowhere.
    let log = recorder.messages();
    let mut hosted: BTreeMap<String, String> =
        (0..6).map(|i| (format!("dr{i}"), "d".to_owned())).collect();
    let mut most_unhosted = 0;
    for m in &log[drain_from..] {
        if !m.topic.ends_with("/reply") {
            continue;
        }
        // Drain acks name no agent, and are not listed.
        for (command, agent, ok) in m.acks() {
            let node = m.topic.split('/').nth(2).unwrap().to_owned();
            match (command.as_str(), ok) {
                ("release", true) => {
                    hosted.remove(&agent);
                }
                ("assign", true) => {
                    hosted.insert(agent, node);
                }
                _ => {}
            }
        }
        most_unhosted = most_unhosted.max(6 - hosted.len());
    }
    assert!(
        most_unhosted <= 2,
        "{most_unhosted} agents were hosted nowhere at once"
    );
    assert!(hosted.values().all(|n| n != "d"));
    assert_eq!(most_nodes_per_agent(&log).0, 1);

    // Uncordon: it takes agents again.
    let (status, node) = coordinator.post("/v1/nodes/d/uncordon", json!({})).await;
    assert_eq!(status, 200, "{node}");
    assert!(!view::<NodeView>(&node).cordoned, "{node}");
    recorder
        .wait_message("pifleet/nodes/d/capacity", |m| {
            m.json()["draining"] == false && m.at > capacity.at
        })
        .await;
    coordinator.spawn_agent("after", "llama3.2").await;
    wait_until_async("the new agent on the emptiest node, d", WAIT, || async {
        coordinator.agent("after").await.node.as_deref() == Some("d")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_offline_on_a_live_node_status_moves_nothing() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "");
    let node = Node::start("live", &broker, &sim.url, "agent_capacity = 2", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("stay", "llama3.2").await;
    coordinator.wait_running(1).await;
    // What the broker would publish for an older connection's last will.
    let rogue = Client::connect(&broker, &["pifleet/nodes/live/status"]).await;
    rogue.publish("pifleet/nodes/live/status", "offline").await;
    node.proc.wait_for_line("stale 'offline'", WAIT);
    let back = rogue
        .wait_message("pifleet/nodes/live/status", |m| {
            m.text() == "online" && !m.retain
        })
        .await;
    assert_eq!(back.text(), "online");
    tokio::time::sleep(Duration::from_secs(3)).await; // longer than offline_grace_secs
    let a = coordinator.agent("stay").await;
    assert_eq!(
        (a.state, a.node.as_deref()),
        (AgentState::Running, Some("live")),
        "{a:?}"
    );
    assert!(coordinator
        .events()
        .await
        .iter()
        .all(|e| e.kind != EventKind::NodeLost));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_returning_node_gets_agents_back_by_bounded_rebalancing_without_bouncing() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "[scheduler]\nrebalance_max_moves = 1");
    let start = |id: &str| Node::start(id, &broker, &sim.url, "agent_capacity = 4", "");
    let _n1 = start("rb1");
    let _n2 = start("rb2");
    let n3 = start("rb3");
    coordinator.wait_nodes_online(3).await;
    for i in 0..6 {
        coordinator.spawn_agent(&format!("rb{i}"), "llama3.2").await;
    }
    coordinator.wait_running(6).await;
    assert_eq!(
        counts(&coordinator.placement().await)
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    n3.proc.signal("KILL");
    wait_until_async("rb3's agents to move", WAIT, || async {
        let c = counts(&coordinator.placement().await);
        !c.contains_key("rb3") && c.values().sum::<usize>() == 6
    })
    .await;
    let _n3_again = start("rb3");
    wait_until_async("rebalancing back to 2/2/2", WAIT, || async {
        counts(&coordinator.placement().await)
            .values()
            .copied()
            .collect::<Vec<_>>()
            == vec![2, 2, 2]
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = coordinator.events().await;
    let mut in_motion = 0i32;
    let mut most = 0;
    let mut moved: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        match e.kind {
            EventKind::Moving => {
                in_motion += 1;
                *moved.entry(e.agent.clone().unwrap()).or_default() += 1;
            }
            EventKind::Moved => in_motion -= 1,
            _ => {}
        }
        most = most.max(in_motion);
    }
    assert_eq!(
        most, 1,
        "rebalance_max_moves = 1 bounds the moves in flight"
    );
    assert_eq!(
        moved.values().sum::<usize>(),
        2,
        "two agents moved back: {moved:?}"
    );
    assert!(
        moved.values().all(|&n| n == 1),
        "an agent bounced: {moved:?}"
    );
    assert_eq!(
        counts(&coordinator.placement().await)
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_agent_releases_it_from_its_node() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "");
    let recorder = Client::connect(&broker, &["pifleet/nodes/del/capacity"]).await;
    let _node = Node::start("del", &broker, &sim.url, "agent_capacity = 2", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("gone", "llama3.2").await;
    coordinator.wait_running(1).await;
    recorder
        .wait_message("pifleet/nodes/del/capacity", |m| {
            m.json()["agents"] == json!(["gone"])
        })
        .await;
    let (status, body) = coordinator.delete("/v1/agents/gone").await;
    assert_eq!(status, 200, "{body}");
    recorder
        .wait_message("pifleet/nodes/del/capacity", |m| {
            m.json()["agents"] == json!([])
        })
        .await;
    wait_until_async("the agent to be gone", WAIT, || async {
        coordinator.get("/v1/agents/gone").await.0 == 404
    })
    .await;
    assert_eq!(coordinator.delete("/v1/agents/gone").await.0, 404);
    // The name is free again.
    coordinator.spawn_agent("gone", "llama3.2").await;
}

#[test]
fn config_check_covers_coordinator_configs() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(crate::util::pifleet_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["config", "default", "coordinator"]);
    assert!(out.status.success());
    let good = dir.path().join("coordinator.toml");
    std::fs::write(&good, &out.stdout).unwrap();
    let check = run(&["config", "check", good.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("ok (coordinator"));
    for (text, position, words) in [
        (
            "history_limit = 5\n[queue]\nmax_jobs = \"many\"\n",
            "bad.toml:3:12:",
            "expected an integer",
        ),
        ("[store]\npaht = \"x\"\n", "bad.toml:2:1:", "paht"),
        (
            "history_limit = 0\n[scheduler]\ndrain_max_parallel = 0\n",
            "bad.toml:1:17:",
            "history_limit",
        ),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let check = run(&[
            "config",
            "check",
            bad.to_str().unwrap(),
            "--kind",
            "coordinator",
        ]);
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains(position) && stderr.contains(words),
            "{stderr}"
        );
    }
}

/// A node that announces itself but never answers commands, and claims to
/// host an agent nobody asked for.
async fn mute_node(broker: &Mosquitto, id: &str, capacity: u32, agents: &[&str]) -> Client {
    let client = Client::connect(broker, &[]).await;
    client
        .publish(&format!("pifleet/nodes/{id}/status"), "online")
        .await;
    announce_capacity(&client, id, capacity, agents, 1).await;
    client
}

async fn announce_capacity(client: &Client, id: &str, capacity: u32, agents: &[&str], seq: u64) {
    client
        .publish_json(
            &format!("pifleet/nodes/{id}/capacity"),
            &capacity_message(id, capacity, agents, seq),
        )
        .await;
}

fn capacity_message(id: &str, capacity: u32, agents: &[&str], seq: u64) -> Value {
    json!({
        "node": id, "session": "mute0000mute0000", "seq": seq, "version": "test", "arch": "aarch64",
        "agent_capacity": capacity, "agents_running": agents.len(), "agents": agents,
        "cpu": {"cores": 4, "load1": 0.0, "usage_pct": 0.0},
        "memory": {"total_bytes": 1, "available_bytes": 1},
        "temperature_c": null, "throttled": null, "models": ["llama3.2:latest"], "ollama_reachable": true,
        "labels": {}, "draining": false, "ts": 1
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unconfirmed_assignment_is_placed_elsewhere_and_a_stray_agent_is_released() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(
        &broker,
        "[timeouts]\nassign_ack_secs = 2\nnode_lost_after_secs = 60",
    );
    let commands = Client::connect(&broker, &["pifleet/nodes/mute/cmd"]).await;
    // It claims an agent nobody placed: that one is released.
    let mute = mute_node(&broker, "mute", 10, &["ghost"]).await;
    coordinator.wait_nodes_online(1).await;
    let released = commands
        .wait_message("pifleet/nodes/mute/cmd", |m| {
            m.json()["type"] == "release" && m.json()["agent"] == "ghost"
        })
        .await;
    assert!(released.json()["placement"].as_u64().is_some());
    let _real = Node::start("real", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(2).await;
    // Now empty and bigger than "real": least loaded, it gets the next agent,
    // and never confirms it.
    announce_capacity(&mute, "mute", 10, &[], 2).await;
    wait_until_async("the coordinator to see mute empty", WAIT, || async {
        coordinator.node("mute").await.capacity.agents_running == 0
    })
    .await;
    coordinator.spawn_agent("patient", "llama3.2").await;
    commands
        .wait_message("pifleet/nodes/mute/cmd", |m| {
            m.json()["type"] == "assign" && m.json()["agent"]["name"] == "patient"
        })
        .await;
    wait_until_async("patient to run on the real node", WAIT, || async {
        let a = coordinator.agent("patient").await;
        a.state == AgentState::Running && a.node.as_deref() == Some("real")
    })
    .await;
    let events = coordinator.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.kind == EventKind::AssignTimeout && e.node.as_deref() == Some("mute")),
        "{events:?}"
    );
    // The mute node was told to drop the placement it never confirmed.
    commands
        .wait_message("pifleet/nodes/mute/cmd", |m| {
            m.json()["type"] == "release" && m.json()["agent"] == "patient"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chat_that_gets_no_answer_in_time_is_504() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "10000"]);
    let coordinator = Coordinator::start(&broker, "[timeouts]\nchat_secs = 1");
    let _node = Node::start("slow", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("sleepy", "llama3.2").await;
    coordinator.wait_running(1).await;
    let started = std::time::Instant::now();
    let (status, body) = coordinator
        .post(
            "/v1/chat",
            json!({"agent": "sleepy", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        body["error"].as_str().unwrap().contains("in time"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_drain_deadline_the_remaining_agents_leave_even_without_room_elsewhere() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "[scheduler]\nrebalance_threshold = 0");
    let _full = Node::start("full", &broker, &sim.url, "agent_capacity = 3", "");
    coordinator.wait_nodes_online(1).await;
    for i in 0..3 {
        coordinator.spawn_agent(&format!("dl{i}"), "llama3.2").await;
    }
    coordinator.wait_running(3).await;
    let _small = Node::start("small", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(2).await;
    let (status, _) = coordinator
        .post(
            "/v1/nodes/full/drain",
            json!({"max_parallel": 1, "deadline_secs": 2}),
        )
        .await;
    assert_eq!(status, 200);
    // One fits on "small"; the other two leave at the deadline and wait.
    wait_until_async("one agent running elsewhere, two waiting", WAIT, || async {
        let agents = coordinator.agents().await;
        let count = |state| agents.iter().filter(|a| a.state == state).count();
        count(AgentState::Running) == 1 && count(AgentState::Pending) == 2
    })
    .await;
    assert_eq!(
        coordinator.placement().await.keys().collect::<Vec<_>>(),
        vec!["small"]
    );
    wait_until_async(
        "the waiting agents to say the node is draining",
        WAIT,
        || async {
            let agents = coordinator.agents().await;
            agents
                .iter()
                .filter(|a| a.state == AgentState::Pending)
                .all(|a| {
                    a.pending_reason
                        .as_deref()
                        .is_some_and(|r| r.contains("draining"))
                })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_cli_command_works_against_a_coordinator_with_a_token_and_prints_json_on_request() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let token = "cli-test-token-0123456789";
    let mut coordinator = Coordinator::start(&broker, &format!("[api]\ntoken = \"{token}\""));
    coordinator.token = Some(token.to_owned());
    let _node = Node::start("cli1", &broker, &sim.url, "agent_capacity = 4", "");
    let api = coordinator.api.clone();
    let run = move |args: &[&str], token: Option<&str>| {
        let mut command = std::process::Command::new(crate::util::pifleet_bin());
        command
            .args(args)
            .env("PIFLEET_COORDINATOR", &api)
            .env_remove("PIFLEET_TOKEN");
        if let Some(token) = token {
            command.env("PIFLEET_TOKEN", token);
        }
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = |args: &[&str]| {
        let (code, out, err) = run(args, Some(token));
        assert_eq!(code, Some(0), "pifleet {args:?}: {out}{err}");
        out
    };
    let (code, _, err) = run(&["agents"], None);
    assert_eq!(code, Some(1));
    assert!(err.contains("unauthorized"), "{err}");

    coordinator.wait_nodes_online(1).await;
    assert!(
        ok(&["spawn", "team", "--model", "llama3.2", "--count", "3", "--label", "x=y"])
            .contains("spawned team-3")
    );
    let agents: AgentList = serde_json::from_str(&ok(&["agents", "--json"])).unwrap();
    assert_eq!(agents.agents.len(), 3);
    assert_eq!(agents.agents[0].labels["x"], "y");
    // Nobody carries label x=y: they wait, and say why.
    wait_until_async("the agents to say why they wait", WAIT, || async {
        ok(&["agents"])
            .matches("without the required labels")
            .count()
            == 3
    })
    .await;
    // One request for the lot; the names that exist are reported, the rest made.
    let (code, out, err) = run(
        &[
            "spawn", "team", "--model", "llama3.2", "--count", "4", "--label", "x=y",
        ],
        Some(token),
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("spawned team-4") && !out.contains("spawned team-1"),
        "{out}"
    );
    assert!(
        out.contains("not spawned: team-1: agent team-1 already exists"),
        "{out}"
    );
    assert!(err.contains("3 of 4 agents were not spawned"), "{err}");
    ok(&["stop", "team-1", "team-2", "team-3", "team-4"]);
    ok(&["spawn", "solo", "--model", "llama3.2"]);
    coordinator.wait_running(1).await;
    let nodes = ok(&["nodes"]);
    assert!(
        nodes.contains("cli1") && nodes.contains("1/4") && nodes.contains("solo"),
        "{nodes}"
    );
    let id = ok(&[
        "jobs",
        "submit",
        "solo",
        "write a haiku",
        "--priority",
        "-3",
    ])
    .trim()
    .to_owned();
    wait_until_async("the job to complete", WAIT, || async {
        coordinator_job_status(&coordinator, &id).await == JobState::Completed
    })
    .await;
    assert!(ok(&["jobs", "show", &id]).contains("write a haiku"));
    assert!(ok(&["jobs"]).contains(&id));
    let listed: JobList =
        serde_json::from_str(&ok(&["jobs", "list", "--agent", "solo", "--json"])).unwrap();
    assert_eq!(listed.jobs[0].priority, -3);
    assert!(ok(&["drain", "cli1"]).contains("draining cli1"));
    let nodes: NodeList = serde_json::from_str(&ok(&["nodes", "--json"])).unwrap();
    assert!(nodes.nodes[0].capacity.draining);
    assert!(ok(&["uncordon", "cli1"]).contains("takes agents again"));
    let status: FleetStatus = serde_json::from_str(&ok(&["status", "--json"])).unwrap();
    assert!(status.events.iter().any(|e| e.kind == EventKind::Uncordon));
    let (code, _, err) = run(&["stop", "nobody"], Some(token));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no agent named nobody (not_found, HTTP 404)"),
        "{err}"
    );
    let (code, _, err) = run(
        &["spawn", "x", "--model", "m", "--label", "novalue"],
        Some(token),
    );
    assert_eq!(code, Some(64));
    assert!(err.contains("key=value"), "{err}");
    let (code, _, err) = run(&["spawn", "x", "--model", "m", "--count", "0"], Some(token));
    assert_eq!(code, Some(64));
    assert!(err.contains("--count"), "{err}");
    assert_eq!(run(&["--version"], None).0, Some(0));
}

async fn coordinator_job_status(coordinator: &Coordinator, id: &str) -> JobState {
    coordinator.job(id).await.status
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_queued_when_the_coordinator_is_killed_complete_after_it_restarts() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "1000"]);
    let mut coordinator = Coordinator::start(&broker, "");
    let _node = Node::start("jr", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("busy", "llama3.2").await;
    coordinator.wait_running(1).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = coordinator
            .submit_job("busy", json!({"message": format!("job {i}")}))
            .await;
        ids.push(id);
    }
    wait_until_async("the first job at Ollama", WAIT, || async {
        sim.stats().await["in_flight"] == 1
    })
    .await;
    coordinator.proc.signal("KILL");
    coordinator.restart();
    for id in &ids {
        let job = poll(&format!("job {id} to complete"), WAIT, || async {
            let j = coordinator.job(id).await;
            (j.status == JobState::Completed).then_some(j)
        })
        .await;
        let answer = job.answer.as_deref().unwrap_or_default();
        assert!(answer.contains("job "), "{job:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_stops_heartbeating_but_stays_connected_is_lost_and_its_agent_moves() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "[timeouts]\nnode_lost_after_secs = 3");
    let commands = Client::connect(&broker, &["pifleet/nodes/silent/cmd"]).await;
    // Five free slots against one: the silent node is the least loaded.
    let silent = mute_node(&broker, "silent", 5, &[]).await;
    let _steady = Node::start("steady", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(2).await;
    coordinator.spawn_agent("quiet", "llama3.2").await;
    commands
        .wait_message("pifleet/nodes/silent/cmd", |m| {
            m.json()["type"] == "assign" && m.json()["agent"]["name"] == "quiet"
        })
        .await;
    // It confirms by listing the agent, then says nothing more. Its MQTT
    // connection stays up, so the broker never publishes its last will.
    announce_capacity(&silent, "silent", 5, &["quiet"], 2).await;
    wait_until_async("quiet to run on the silent node", WAIT, || async {
        let a = coordinator.agent("quiet").await;
        a.state == AgentState::Running && a.node.as_deref() == Some("silent")
    })
    .await;
    wait_until_async("quiet to move to the steady node", WAIT, || async {
        let a = coordinator.agent("quiet").await;
        a.state == AgentState::Running && a.node.as_deref() == Some("steady")
    })
    .await;
    let events = coordinator.events().await;
    let lost = events
        .iter()
        .find(|e| e.kind == EventKind::NodeLost && e.node.as_deref() == Some("silent"))
        .unwrap_or_else(|| panic!("no node_lost event for silent: {events:?}"));
    assert!(
        lost.message.contains("no capacity message for 3s"),
        "{lost:?}"
    );
    let node = coordinator.node("silent").await;
    assert_ne!(node.state, "online", "{node:?}");
    // When it speaks again still claiming the agent, it is told to let go.
    announce_capacity(&silent, "silent", 5, &["quiet"], 3).await;
    commands
        .wait_message("pifleet/nodes/silent/cmd", |m| {
            m.json()["type"] == "release" && m.json()["agent"] == "quiet"
        })
        .await;
    let a = coordinator.agent("quiet").await;
    assert_eq!(a.node.as_deref(), Some("steady"), "{a:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_and_restarted_at_once_is_recognised_as_a_new_session_and_runs_its_agents_again(
) {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "3000"]);
    let coordinator = Coordinator::start(&broker, "");
    let node = Node::start("phoenix", &broker, &sim.url, "agent_capacity = 2", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("ash-1", "llama3.2").await;
    coordinator.spawn_agent("ash-2", "llama3.2").await;
    coordinator.wait_running(2).await;
    let before = coordinator.node("phoenix").await.capacity.session;
    // A chat in flight when the node dies is answered at once, not at its
    // timeout: the new process never heard of it.
    let (api, token) = (coordinator.api.clone(), coordinator.token.clone());
    let chat = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let reply = send(
            reqwest::Method::POST,
            &format!("{api}/v1/chat"),
            Some(
                json!({"agent": "ash-2", "messages": [{"role": "user", "content": "mid-flight"}]}),
            ),
            token.as_deref(),
        )
        .await;
        (reply, started.elapsed())
    });
    wait_until_async("the turn to reach Ollama", WAIT, || async {
        sim.stats().await["in_flight"] == 1
    })
    .await;
    let mut node = node;
    node.proc.signal("KILL");
    node.proc.wait_exit(WAIT);
    // Same id, same config, a fresh process: it hosts nothing yet.
    let again = Node::start("phoenix", &broker, &sim.url, "agent_capacity = 2", "");
    wait_until_async("both agents to run on the new phoenix", WAIT, || async {
        let n = coordinator.node("phoenix").await.capacity;
        n.session != before && n.agents.is_some_and(|a| a.len() == 2)
    })
    .await;
    let (status, body) = http_get(&format!("{}/v1/agents", again.api)).await;
    assert_eq!(status, 200);
    let mut names: Vec<&str> = body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ash-1", "ash-2"], "{body}");
    let ((status, reply), took) = chat.await.unwrap();
    assert_eq!(
        (status, reply["code"].as_str()),
        (503, Some("released")),
        "{reply}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let events = coordinator.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.kind == EventKind::NodeRestarted && e.node.as_deref() == Some("phoenix")),
        "{events:?}"
    );
    let (_, chat) = coordinator
        .post(
            "/v1/chat",
            json!({"agent": "ash-1", "messages": [{"role": "user", "content": "still there?"}]}),
        )
        .await;
    assert!(
        !view::<ChatAnswer>(&chat).message.content.is_empty(),
        "{chat}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_status_capacity_and_reply_topics_is_logged_and_ignored_and_the_coordinator_keeps_serving(
) {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "[mqtt]\nmax_payload_bytes = 16384");
    let _node = Node::start("sturdy", &broker, &sim.url, "agent_capacity = 2", "");
    coordinator.wait_nodes_online(1).await;
    let vandal = Client::connect(&broker, &[]).await;
    let topic = |kind: &str| format!("pifleet/nodes/sturdy/{kind}");
    vandal.publish(&topic("status"), "banana").await;
    vandal.publish(&topic("capacity"), "{not json").await;
    vandal
        .publish(&topic("capacity"), format!("\"{}\"", "x".repeat(40_000)))
        .await;
    vandal
        .publish_json(&topic("capacity"), &capacity_message("impostor", 9, &[], 1))
        .await;
    vandal.publish(&topic("reply"), [0xff, 0xfe, 0x00]).await;
    vandal
        .publish_json(
            &topic("reply"),
            &json!({"id": "r-1", "node": "elsewhere", "session": "s", "generation": 1,
                    "type": "ack", "command": "assign", "agent": "a", "placement": 1,
                    "ok": true, "agents_running": 1}),
        )
        .await;
    let log = &coordinator.proc;
    log.wait_for_line("ignored the status of sturdy", WAIT);
    log.wait_for_line("ignored the capacity message of sturdy", WAIT);
    log.wait_for_line(
        "ignored a capacity message on the topic of sturdy naming node impostor",
        WAIT,
    );
    log.wait_for_line("exceeds the limit of 16384 bytes", WAIT);
    log.wait_for_line("ignored a reply from sturdy", WAIT);
    log.wait_for_line("ignored a reply on the topic of sturdy naming node", WAIT);
    // The node is still online and takes agents; nothing was lost.
    let node = coordinator.node("sturdy").await;
    assert_eq!(node.state, "online", "{node:?}");
    assert_eq!(node.capacity.agent_capacity, 2, "{node:?}");
    coordinator.spawn_agent("steadfast", "llama3.2").await;
    coordinator.wait_running(1).await;
    assert!(coordinator
        .events()
        .await
        .iter()
        .all(|e| e.kind != EventKind::NodeLost && e.node.as_deref() != Some("impostor")));
    assert_eq!(log.count_lines("connected to MQTT broker"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_moves_nothing_and_chats_in_flight_are_answered_once() {
    let mut broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "1500"]);
    let coordinator = Coordinator::start(
        &broker,
        "[timeouts]\nchat_secs = 30\nnode_lost_after_secs = 4",
    );
    // The nodes' lease outlasts the outage (by default, 7 s of silence make
    // a node stop its agents: a broker down this long costs a move).
    let lease = "agent_capacity = 2\nfence_secs = 15";
    let _a = Node::start("br-a", &broker, &sim.url, lease, "");
    let _b = Node::start("br-b", &broker, &sim.url, lease, "");
    coordinator.wait_nodes_online(2).await;
    let names = ["calm-1", "calm-2", "calm-3"];
    for name in names {
        coordinator.spawn_agent(name, "llama3.2").await;
    }
    coordinator.wait_running(3).await;
    let before = coordinator.placement().await;
    let events_before = coordinator.events().await.len();
    let chat = |agent: &str, text: &str| {
        let (api, token) = (coordinator.api.clone(), coordinator.token.clone());
        let body = json!({"agent": agent, "messages": [{"role": "user", "content": text}]});
        tokio::spawn(async move {
            send(
                reqwest::Method::POST,
                &format!("{api}/v1/chat"),
                Some(body),
                token.as_deref(),
            )
            .await
        })
    };
    let in_flight: Vec<_> = names
        .iter()
        .map(|n| chat(n, "across the restart"))
        .collect();
    wait_until_async("Ollama to be answering", WAIT, || async {
        sim.stats().await["in_flight"].as_u64() >= Some(1)
    })
    .await;
    // The test broker keeps nothing: every retained status and capacity is
    // gone, and the daemons have to announce and subscribe again. It stays
    // down longer than the coordinator's node_lost_after (4 s): the silence
    // is the coordinator's own, not the nodes'. The answers are ready while
    // it is down.
    broker.restart_after(Duration::from_secs(6));
    for (name, chat) in names.iter().zip(in_flight) {
        let (status, body) = chat.await.unwrap();
        assert_eq!(status, 200, "{name}: {body}");
    }
    // Each answer was recorded once: system prompt, one exchange, the new message.
    let (status, body) = chat("calm-2", "and now?").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let answer = view::<ChatAnswer>(&body).message.content;
    assert!(answer.contains("received 4 messages"), "{answer}");
    coordinator.wait_nodes_online(2).await;
    assert_eq!(coordinator.placement().await, before);
    let events = coordinator.events().await;
    // Oldest first: the events since the restart are the tail.
    let new = &events[events_before..];
    assert!(
        new.iter().all(|e| !matches!(
            e.kind,
            EventKind::NodeLost
                | EventKind::Placed
                | EventKind::Moving
                | EventKind::Released
                | EventKind::Vanished
        )),
        "the broker restart moved agents: {new:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_reconnects_gets_its_turns_in_flight_again_and_the_chat_is_answered() {
    let broker = Mosquitto::start();
    let coordinator = Coordinator::start(&broker, "[timeouts]\nchat_secs = 30");
    let commands = Client::connect(&broker, &["pifleet/nodes/flaky/cmd"]).await;
    let flaky = mute_node(&broker, "flaky", 1, &[]).await;
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("patient", "llama3.2").await;
    commands
        .wait_message("pifleet/nodes/flaky/cmd", |m| m.json()["type"] == "assign")
        .await;
    announce_capacity(&flaky, "flaky", 1, &["patient"], 2).await;
    coordinator.wait_running(1).await;
    let (api, token) = (coordinator.api.clone(), coordinator.token.clone());
    let chat = tokio::spawn(async move {
        send(
            reqwest::Method::POST,
            &format!("{api}/v1/chat"),
            Some(json!({"agent": "patient", "messages": [{"role": "user", "content": "hello?"}]})),
            token.as_deref(),
        )
        .await
    });
    let first = commands
        .wait_message("pifleet/nodes/flaky/cmd", |m| m.json()["type"] == "turn")
        .await
        .json();
    // The node reconnects (its answer to anything sent meanwhile would be
    // lost): it announces itself live, and the turn comes again, same id.
    flaky.publish("pifleet/nodes/flaky/status", "online").await;
    wait_until("the turn to be sent again", WAIT, || {
        commands
            .on_topic("pifleet/nodes/flaky/cmd")
            .iter()
            .filter(|m| m.json()["id"] == first["id"])
            .count()
            == 2
    });
    let again: Vec<Value> = commands
        .on_topic("pifleet/nodes/flaky/cmd")
        .iter()
        .map(Received::json)
        .filter(|c| c["id"] == first["id"])
        .collect();
    assert_eq!(first["messages"][0]["content"], "hello?", "{first}");
    assert_eq!(again[1]["messages"], first["messages"], "{again:?}");
    assert_eq!(again[1]["deadline_ms"], first["deadline_ms"]);
    flaky
        .publish_json(
            "pifleet/nodes/flaky/reply",
            &json!({"id": first["id"], "node": "flaky", "session": "mute0000mute0000",
                    "generation": first["generation"], "type": "turn_result", "agent": "patient",
                    "ok": true, "model": "llama3.2:latest",
                    "message": {"role": "assistant", "content": "here I am"}}),
        )
        .await;
    let (status, body) = chat.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(view::<ChatAnswer>(&body).message.content, "here I am");
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_jobs_are_deleted_after_keep_finished_secs() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "[queue]\nkeep_finished_secs = 2");
    let _node = Node::start("keeper", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("tidy", "llama3.2").await;
    coordinator.wait_running(1).await;
    let id = coordinator
        .submit_job("tidy", json!({"message": "short-lived"}))
        .await;
    wait_until_async("the job to complete", WAIT, || async {
        coordinator_job_status(&coordinator, &id).await == JobState::Completed
    })
    .await;
    let done = std::time::Instant::now();
    wait_until_async("the finished job to be deleted", WAIT, || async {
        coordinator.get(&format!("/v1/jobs/{id}")).await.0 == 404
    })
    .await;
    assert!(
        done.elapsed() >= Duration::from_secs(1),
        "{:?}",
        done.elapsed()
    );
    coordinator
        .proc
        .wait_for_line("deleted 1 finished jobs older than 2s", WAIT);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_taken_out_of_the_fleet_can_be_forgotten_once_offline() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let mut coordinator = Coordinator::start(&broker, "");
    let _keep = Node::start("keep", &broker, &sim.url, "agent_capacity = 2", "");
    let mut gone = Node::start("gone", &broker, &sim.url, "agent_capacity = 2", "");
    coordinator.wait_nodes_online(2).await;
    coordinator.spawn_agent("left", "llama3.2").await;
    coordinator.spawn_agent("right", "llama3.2").await;
    coordinator.wait_running(2).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(crate::util::pifleet_bin())
            .args(args)
            .env("PIFLEET_COORDINATOR", &coordinator.api)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = cli(&["forget", "gone"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("node gone is online"), "{text}");

    gone.proc.signal("KILL");
    gone.proc.wait_exit(WAIT);
    wait_until_async("the node to be lost", WAIT, || async {
        coordinator.node("gone").await.state == "offline"
    })
    .await;
    let (code, text) = cli(&["forget", "gone"]);
    assert_eq!((code, text.trim()), (Some(0), "forgot gone"));
    assert_eq!(coordinator.get("/v1/nodes/gone").await.0, 404);
    let nodes = coordinator.nodes().await;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    // Both agents fit on the node that is left.
    wait_until_async("both agents on keep", WAIT, || async {
        coordinator.placement().await.get("keep").map(Vec::len) == Some(2)
    })
    .await;
    // Nothing about it stays retained on the broker (the clears are queued
    // QoS 1 publishes, so they may reach it just after the answer)...
    wait_until_async("no retained topics of gone", WAIT, || async {
        let watcher = Client::connect(&broker, &["pifleet/nodes/gone/#"]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        watcher.messages().is_empty()
    })
    .await;
    // ...so a restarted coordinator does not bring it back.
    coordinator.proc.signal("TERM");
    coordinator.restart();
    coordinator.wait_nodes_online(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(coordinator.get("/v1/nodes/gone").await.0, 404);
    // If the Pi does come back, it simply joins again.
    let _back = Node::start("gone", &broker, &sim.url, "agent_capacity = 2", "");
    coordinator.wait_nodes_online(2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_paused_longer_than_node_lost_after_moves_nothing_when_it_resumes() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "[timeouts]\nnode_lost_after_secs = 3");
    let _a = Node::start("pa", &broker, &sim.url, "agent_capacity = 2", "");
    let _b = Node::start("pb", &broker, &sim.url, "agent_capacity = 2", "");
    coordinator.wait_nodes_online(2).await;
    for name in ["still-1", "still-2"] {
        coordinator.spawn_agent(name, "llama3.2").await;
    }
    coordinator.wait_running(2).await;
    let before = coordinator.placement().await;
    coordinator.proc.signal("STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    coordinator.proc.signal("CONT");
    coordinator
        .proc
        .wait_for_line("every node gets a fresh node_lost_after", WAIT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(coordinator.placement().await, before);
    let events = coordinator.events().await;
    assert!(
        events.iter().all(|e| e.kind != EventKind::NodeLost),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pifleet_chat_asks_again_while_its_agent_moves_off_a_dead_node() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "2000"]);
    let coordinator = Coordinator::start(&broker, "[queue]\nretry_after_secs = 1");
    let hop = Node::start("hop", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("mover", "llama3.2").await;
    coordinator.wait_running(1).await;
    let _land = Node::start("land", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(2).await;
    let api = coordinator.api.clone();
    let cli = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::util::pifleet_bin())
            .args(["chat", "mover", "are you there?"])
            .env("PIFLEET_COORDINATOR", api)
            .output()
            .unwrap()
    });
    wait_until_async("the turn to reach Ollama", WAIT, || async {
        sim.stats().await["in_flight"] == 1
    })
    .await;
    hop.proc.signal("KILL");
    let out = cli.await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("asking again"), "{stderr}");
    assert!(
        stdout.contains("last user message: \"are you there?\""),
        "{stdout}"
    );
    assert!(stderr.contains("(mover on land:"), "{stderr}");
}
