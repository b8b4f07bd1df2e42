//! Acceptance tests of the node daemon (issue 2), each against a real
//! Mosquitto and real `pifleet` processes.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use pifleet::protocol::Capacity;
use serde_json::{json, Value};

use crate::util::{http_get, Client, Mosquitto, Node, Proc, Sim, WAIT};

fn cmd_topic(node: &str) -> String {
    format!("pifleet/nodes/{node}/cmd")
}

fn assign(id: &str, node: &str, agent: &str, model: &str, placement: u64) -> Value {
    json!({
        "id": id, "node": node, "generation": 1, "type": "assign", "placement": placement,
        "agent": {"name": agent, "model": model, "system": format!("You are {agent}.")}
    })
}

fn turn(id: &str, node: &str, agent: &str, messages: Value) -> Value {
    json!({"id": id, "node": node, "generation": 1, "type": "turn", "agent": agent, "messages": messages})
}

fn hello(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Assigns `agents` (all with `model`) and waits for every ack to be ok.
async fn assign_all(client: &Client, node: &str, agents: &[&str], model: &str) {
    for (i, agent) in agents.iter().enumerate() {
        let id = format!("assign-{agent}");
        client
            .publish_json(
                &cmd_topic(node),
                &assign(&id, node, agent, model, i as u64 + 1),
            )
            .await;
        let ack = client.reply(node, &id).await;
        assert_eq!(ack["ok"], true, "assign {agent}: {ack}");
    }
}

fn error_code(result: &Value) -> &str {
    result["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_announces_online_and_a_retained_capacity_with_every_contract_field() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let node = Node::start(
        "pi-cap",
        &broker,
        &sim.url,
        "agent_capacity = 3",
        "[labels]\nroom = \"attic\"",
    );
    // A client that connects afterwards still gets both: they are retained.
    let client = Client::connect(
        &broker,
        &["pifleet/nodes/+/status", "pifleet/nodes/+/capacity"],
    )
    .await;
    let status = client
        .wait_message("pifleet/nodes/pi-cap/status", |_| true)
        .await;
    assert_eq!(status.text(), "online");
    // A client that subscribes now gets it as the broker's retained copy.
    let late = Client::connect(&broker, &["pifleet/nodes/pi-cap/status"]).await;
    let replay = late
        .wait_message("pifleet/nodes/pi-cap/status", |_| true)
        .await;
    assert_eq!(replay.text(), "online");
    assert!(replay.retain, "status must be retained");
    let capacity = client
        .wait_message("pifleet/nodes/pi-cap/capacity", |m| {
            m.json()["ollama_reachable"] == true
        })
        .await;
    let c = capacity.json();
    // Exactly the fields of the contract type, none missing (the last five
    // have serde defaults, so deserializing alone would not notice).
    let typed: Capacity = serde_json::from_value(c.clone()).expect("a Capacity");
    let keys = |v: &Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    let contract = keys(&serde_json::to_value(&typed).unwrap());
    assert_eq!(keys(&c), contract, "{c}");
    // The 22 of the contract (`agents` while the list is short),
    // `agents_rev` and `agents_digest` (issue 18) and `batches`.
    assert_eq!(contract.len(), 25, "{contract:?}");
    assert!(contract.contains("agents") && contract.contains("agents_digest"));
    assert_eq!(c["batches"], true, "{c}");
    for (group, field) in [
        ("cpu", "cores"),
        ("cpu", "load1"),
        ("cpu", "usage_pct"),
        ("memory", "total_bytes"),
        ("memory", "available_bytes"),
    ] {
        assert!(
            c[group].get(field).is_some(),
            "capacity lacks {group}.{field}: {c}"
        );
    }
    assert_eq!(c["node"], "pi-cap");
    assert_eq!(c["agent_capacity"], 3);
    assert_eq!(c["agents_running"], 0);
    assert_eq!(c["labels"]["room"], "attic");
    assert_eq!(c["draining"], false);
    assert!(c["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(c["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(c["session"].as_str().unwrap().len(), 16);
    assert!(
        c["models"]
            .as_array()
            .unwrap()
            .contains(&json!("llama3.2:latest")),
        "{c}"
    );

    // What a user would type, with Debian's client.
    let out = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "pifleet/nodes/+/capacity",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .output()
        .await
        .expect("run mosquitto_sub");
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value =
        serde_json::from_slice(&out.stdout).expect("mosquitto_sub prints the JSON");
    assert_eq!(printed["node"], "pi-cap");
    assert_eq!(printed["agent_capacity"], 3);

    // Heartbeats: the sequence number grows within one session.
    let seq = c["seq"].as_u64().unwrap();
    client
        .wait_message("pifleet/nodes/pi-cap/capacity", |m| {
            m.json()["seq"].as_u64() > Some(seq + 1)
        })
        .await;
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_node_makes_the_broker_deliver_offline_within_one_and_a_half_keep_alives() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let mut node = Node::start("pi-kill", &broker, &sim.url, "agent_capacity = 1", "");
    let client = Client::connect(&broker, &["pifleet/nodes/pi-kill/status"]).await;
    client
        .wait_message("pifleet/nodes/pi-kill/status", |m| m.text() == "online")
        .await;
    let killed = Instant::now();
    node.proc.signal("KILL");
    let offline = client
        .wait_message("pifleet/nodes/pi-kill/status", |m| m.text() == "offline")
        .await;
    let keep_alive = Duration::from_secs(5);
    assert!(
        offline.at.duration_since(killed) <= keep_alive * 3 / 2,
        "offline after {:?}",
        offline.at.duration_since(killed)
    );
    // The kernel closes the socket before the dead process can be reaped, so
    // wait for the exit instead of expecting it to be visible already.
    let status = node.proc.wait_exit(Duration::from_secs(5));
    assert_eq!(status.signal(), Some(9), "the node died of {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_node_is_declared_offline_by_keep_alive_and_comes_back_online_when_it_thaws() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let node = Node::start("pi-frozen", &broker, &sim.url, "agent_capacity = 1", "");
    let client = Client::connect(&broker, &["pifleet/nodes/pi-frozen/status"]).await;
    client
        .wait_message("pifleet/nodes/pi-frozen/status", |m| m.text() == "online")
        .await;
    // SIGSTOP keeps the TCP connection open: only the keep-alive can tell.
    let frozen = Instant::now();
    node.proc.signal("STOP");
    let offline = client
        .wait_message("pifleet/nodes/pi-frozen/status", |m| m.text() == "offline")
        .await;
    let waited = offline.at.duration_since(frozen);
    // The node sends a packet every second, so the broker owes the will 1.5 x
    // keep-alive (7.5 s) later; Debian's Mosquitto 2.0 sweeps keep-alives
    // only every 5 s, hence up to 12.5 s (docs/PROTOCOL.md, "Liveness").
    assert!(
        waited <= Duration::from_millis(12_500 + 1_000),
        "offline after {waited:?} (keep-alive 5 s)"
    );
    node.proc.signal("CONT");
    client
        .wait_message("pifleet/nodes/pi-frozen/status", |m| {
            m.text() == "online" && m.at > offline.at
        })
        .await;
    let (status, _) = node.get("/ready").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_agents_fit_a_fourth_is_refused_naming_the_capacity_and_a_repeated_assign_is_applied_once(
) {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let node = Node::start("pi-slots", &broker, &sim.url, "agent_capacity = 3", "");
    let client = Client::connect(
        &broker,
        &[
            "pifleet/nodes/pi-slots/reply",
            "pifleet/nodes/pi-slots/capacity",
        ],
    )
    .await;
    let topic = cmd_topic("pi-slots");
    // The first assign is delivered twice, as QoS 1 may do.
    let first = assign("c-alice", "pi-slots", "alice", "llama3.2", 1);
    client.publish_json(&topic, &first).await;
    client.publish_json(&topic, &first).await;
    client
        .publish_json(&topic, &assign("c-bob", "pi-slots", "bob", "llama3.2", 2))
        .await;
    client
        .publish_json(&topic, &assign("c-carol", "pi-slots", "carol", "phi3.5", 3))
        .await;
    for id in ["c-alice", "c-bob", "c-carol"] {
        assert_eq!(client.reply("pi-slots", id).await["ok"], true);
    }
    client
        .publish_json(&topic, &assign("c-dave", "pi-slots", "dave", "gemma2", 4))
        .await;
    let refused = client.reply("pi-slots", "c-dave").await;
    assert_eq!(refused["ok"], false);
    let reason = refused["reason"].as_str().unwrap();
    assert!(reason.contains("agent_capacity is 3"), "{reason}");
    // Commands are handled in order, so the duplicate was handled before dave's.
    assert_eq!(
        client.replies("pi-slots", "c-alice").len(),
        1,
        "the repeated assign was answered twice"
    );
    assert_eq!(node.proc.count_lines("repeated command id"), 1);

    let capacity = client
        .wait_message("pifleet/nodes/pi-slots/capacity", |m| {
            m.json()["agents_running"] == 3
        })
        .await
        .json();
    assert_eq!(capacity["agents"], json!(["alice", "bob", "carol"]));
    let (status, agents) = node.get("/v1/agents").await;
    assert_eq!(status, 200);
    let agents = agents["agents"].as_array().unwrap().clone();
    assert_eq!(agents.len(), 3);
    assert_eq!(agents[0]["name"], "alice");
    assert_eq!(agents[0]["model"], "llama3.2:latest");
    assert_eq!(agents[0]["state"], "running");
    assert_eq!(agents[0]["node"], "pi-slots");

    // Releasing one frees a slot for dave.
    client
        .publish_json(&topic, &json!({"id": "r-bob", "node": "pi-slots", "generation": 1, "type": "release", "agent": "bob", "placement": 2}))
        .await;
    assert_eq!(client.reply("pi-slots", "r-bob").await["ok"], true);
    client
        .publish_json(&topic, &assign("c-dave-2", "pi-slots", "dave", "gemma2", 5))
        .await;
    assert_eq!(client.reply("pi-slots", "c-dave-2").await["ok"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chat_turn_reaches_ollama_with_system_prompt_and_history_and_returns_the_answer_with_token_counts(
) {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let _node = Node::start("pi-chat", &broker, &sim.url, "agent_capacity = 2", "");
    let client = Client::connect(&broker, &["pifleet/nodes/pi-chat/reply"]).await;
    assign_all(&client, "pi-chat", &["alice"], "llama3.2").await;
    let history = json!([
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"}
    ]);
    client
        .publish_json(
            &cmd_topic("pi-chat"),
            &turn("t-1", "pi-chat", "alice", history),
        )
        .await;
    let result = client.reply("pi-chat", "t-1").await;
    assert_eq!(result["type"], "turn_result");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["message"]["role"], "assistant");
    let answer = result["message"]["content"].as_str().unwrap();
    assert!(
        answer.contains("received 4 messages"),
        "system prompt + 3 history messages: {answer}"
    );
    assert!(
        answer.contains("with system prompt \"You are alice.\""),
        "{answer}"
    );
    assert!(
        answer.contains("last user message: \"What is my name?\""),
        "{answer}"
    );
    let usage = &result["usage"];
    assert!(usage["eval_count"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["prompt_eval_count"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["eval_duration"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["total_duration"].as_u64().unwrap() >= usage["eval_duration"].as_u64().unwrap());
    let seen = sim.stats().await["last_chat"].clone();
    assert_eq!(
        seen["roles"],
        json!(["system", "user", "assistant", "user"])
    );
    assert_eq!(seen["model"], "llama3.2:latest");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_that_arrives_again_is_answered_again_without_a_second_ollama_call() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "800"]);
    let _node = Node::start("pi-again", &broker, &sim.url, "agent_capacity = 1", "");
    let client = Client::connect(&broker, &["pifleet/nodes/pi-again/reply"]).await;
    assign_all(&client, "pi-again", &["echo"], "llama3.2").await;
    let command = turn("t-again", "pi-again", "echo", hello("once only"));
    // Twice while it runs: the repeat is ignored, the turn runs once.
    client.publish_json(&cmd_topic("pi-again"), &command).await;
    client.publish_json(&cmd_topic("pi-again"), &command).await;
    let first = client.reply("pi-again", "t-again").await;
    assert_eq!(first["ok"], true, "{first}");
    // Once more after the answer (as when the answer was lost on the way
    // to a reconnecting coordinator): the same answer comes again.
    client.publish_json(&cmd_topic("pi-again"), &command).await;
    crate::util::wait_until("the answer to come again", WAIT, || {
        client.replies("pi-again", "t-again").len() == 2
    });
    let replies = client.replies("pi-again", "t-again");
    assert_eq!(replies[0], replies[1]);
    assert_eq!(sim.stats().await["generations"], 1, "Ollama ran it once");
}

/// A batch (docs/PROTOCOL.md, "Batches"): each command of the array is
/// taken as if it had come alone; one addressed to another node is refused
/// alone; each turn is answered once, batched or not.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_turn_commands_runs_each_turn_once_and_refuses_only_the_bad_one() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "300"]);
    let node = Node::start(
        "pi-batch",
        &broker,
        &sim.url,
        "agent_capacity = 3",
        "[ollama]\nmax_parallel = 3",
    );
    let client = Client::connect(
        &broker,
        &[
            "pifleet/nodes/pi-batch/reply",
            "pifleet/nodes/pi-batch/capacity",
        ],
    )
    .await;
    let capacity = client
        .wait_message("pifleet/nodes/pi-batch/capacity", |_| true)
        .await;
    assert_eq!(capacity.json()["batches"], true, "{}", capacity.text());
    assign_all(&client, "pi-batch", &["c1", "c2", "c3"], "llama3.2").await;
    let mut batch: Vec<Value> = ["c1", "c2", "c3"]
        .iter()
        .map(|a| turn(&format!("t-{a}"), "pi-batch", a, hello(&format!("hi {a}"))))
        .collect();
    batch.insert(1, turn("t-stranger", "pi-other", "c1", hello("not mine")));
    client
        .publish_json(&cmd_topic("pi-batch"), &Value::Array(batch))
        .await;
    for agent in ["c1", "c2", "c3"] {
        let result = client.reply("pi-batch", &format!("t-{agent}")).await;
        assert_eq!(result["ok"], true, "{result}");
        let answer = result["message"]["content"].as_str().unwrap();
        assert!(answer.contains(&format!("hi {agent}")), "{answer}");
    }
    crate::util::wait_until("the refusal of the stranger's command", WAIT, || {
        node.proc
            .output()
            .iter()
            .any(|l| l.contains("ignored a command") && l.contains("pi-other"))
    });
    assert_eq!(sim.stats().await["generations"], 3, "each turn ran once");
    for agent in ["c1", "c2", "c3"] {
        assert_eq!(client.replies("pi-batch", &format!("t-{agent}")).len(), 1);
    }
    assert!(client.replies("pi-batch", "t-stranger").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_max_parallel_1_five_concurrent_turns_reach_ollama_one_at_a_time() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "150"]);
    let node = Node::start("pi-par", &broker, &sim.url, "agent_capacity = 5", "");
    let client = Client::connect(&broker, &["pifleet/nodes/pi-par/reply"]).await;
    let agents = ["a1", "a2", "a3", "a4", "a5"];
    assign_all(&client, "pi-par", &agents, "llama3.2").await;
    for agent in agents {
        client
            .publish_json(
                &cmd_topic("pi-par"),
                &turn(&format!("t-{agent}"), "pi-par", agent, hello("hi")),
            )
            .await;
    }
    for agent in agents {
        let result = client.reply("pi-par", &format!("t-{agent}")).await;
        assert_eq!(result["ok"], true, "{result}");
    }
    let stats = sim.stats().await;
    assert_eq!(stats["generations"], 5);
    assert_eq!(
        stats["max_in_flight"], 1,
        "the simulator saw overlapping calls: {stats}"
    );
    let metrics = reqwest::get(format!("{}/metrics", node.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pifleet_node_ollama_requests_total{outcome=\"ok\"} 5\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_max_parallel_3_turns_do_overlap_so_the_limit_is_what_serialises_them() {
    // The counterpart of the test above: it shows the simulator can see
    // overlap, so "max_in_flight == 1" there is a real measurement.
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "400"]);
    let _node = Node::start(
        "pi-par3",
        &broker,
        &sim.url,
        "agent_capacity = 3",
        "[ollama]\nmax_parallel = 3",
    );
    let client = Client::connect(&broker, &["pifleet/nodes/pi-par3/reply"]).await;
    assign_all(&client, "pi-par3", &["b1", "b2", "b3"], "llama3.2").await;
    for agent in ["b1", "b2", "b3"] {
        client
            .publish_json(
                &cmd_topic("pi-par3"),
                &turn(&format!("t-{agent}"), "pi-par3", agent, hello("hi")),
            )
            .await;
    }
    for agent in ["b1", "b2", "b3"] {
        assert_eq!(
            client.reply("pi-par3", &format!("t-{agent}")).await["ok"],
            true
        );
    }
    assert!(sim.stats().await["max_in_flight"].as_u64().unwrap() > 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn ollama_down_fails_the_turn_as_unreachable_and_the_node_stays_up_and_says_so() {
    let broker = Mosquitto::start();
    let closed = format!("http://127.0.0.1:{}", crate::util::free_port());
    let node = Node::start("pi-down", &broker, &closed, "agent_capacity = 1", "");
    let client = Client::connect(
        &broker,
        &[
            "pifleet/nodes/pi-down/reply",
            "pifleet/nodes/pi-down/capacity",
        ],
    )
    .await;
    let capacity = client
        .wait_message("pifleet/nodes/pi-down/capacity", |_| true)
        .await
        .json();
    assert_eq!(capacity["ollama_reachable"], false);
    assign_all(&client, "pi-down", &["alice"], "llama3.2").await;
    client
        .publish_json(
            &cmd_topic("pi-down"),
            &turn("t-down", "pi-down", "alice", hello("hi")),
        )
        .await;
    let result = client.reply("pi-down", "t-down").await;
    assert_eq!(result["ok"], false);
    assert_eq!(error_code(&result), "ollama_unreachable");
    assert!(
        result["error"]["reason"]
            .as_str()
            .unwrap()
            .contains(&closed),
        "{result}"
    );
    assert_eq!(node.get("/health").await.0, 200);
    assert_eq!(node.get("/ready").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_model_a_503_and_a_timeout_each_fail_the_turn_with_a_reason_and_the_node_stays_up(
) {
    let broker = Mosquitto::start();
    // One slot at the simulator and slow generations: a second call meanwhile gets 503.
    let sim = Sim::start(&["--max-parallel", "1", "--first-token-ms", "2500"]);
    let node = Node::start(
        "pi-fail",
        &broker,
        &sim.url,
        "agent_capacity = 4",
        "[ollama]\nmax_parallel = 2\nrequest_timeout_secs = 1",
    );
    let client = Client::connect(&broker, &["pifleet/nodes/pi-fail/reply"]).await;
    assign_all(&client, "pi-fail", &["ghost"], "no-such-model").await;
    client
        .publish_json(
            &cmd_topic("pi-fail"),
            &turn("t-missing", "pi-fail", "ghost", hello("hi")),
        )
        .await;
    let missing = client.reply("pi-fail", "t-missing").await;
    assert_eq!(error_code(&missing), "model_missing", "{missing}");
    assert!(
        missing["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("no-such-model:latest"),
        "{missing}"
    );

    // Two turns at once: one occupies the simulator and times out after 1 s,
    // the other is refused with 503 at once.
    assign_all(&client, "pi-fail", &["slow", "busy"], "llama3.2").await;
    client
        .publish_json(
            &cmd_topic("pi-fail"),
            &turn("t-slow", "pi-fail", "slow", hello("hi")),
        )
        .await;
    crate::util::wait_until_async("the first call at the simulator", WAIT, || async {
        sim.stats().await["in_flight"] == 1
    })
    .await;
    client
        .publish_json(
            &cmd_topic("pi-fail"),
            &turn("t-busy", "pi-fail", "busy", hello("hi")),
        )
        .await;
    let busy = client.reply("pi-fail", "t-busy").await;
    assert_eq!(error_code(&busy), "ollama_busy", "{busy}");
    let slow = client.reply("pi-fail", "t-slow").await;
    assert_eq!(error_code(&slow), "timeout", "{slow}");
    assert!(
        slow["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("request_timeout_secs"),
        "{slow}"
    );

    assert_eq!(node.get("/health").await.0, 200);
    assert_eq!(node.get("/ready").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_a_wrong_node_id_and_an_oversize_payload_are_logged_and_ignored_and_the_node_keeps_serving(
) {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let node = Node::start(
        "pi-bad",
        &broker,
        &sim.url,
        "agent_capacity = 2",
        "[mqtt]\nmax_payload_bytes = 16384",
    );
    let client = Client::connect(
        &broker,
        &["pifleet/nodes/pi-bad/reply", "pifleet/nodes/pi-bad/status"],
    )
    .await;
    let topic = cmd_topic("pi-bad");
    client.publish(&topic, "{this is not json").await;
    client
        .publish_json(
            &topic,
            &assign("c-wrong", "pi-other", "mallory", "llama3.2", 1),
        )
        .await;
    let mut huge = assign("c-huge", "pi-bad", "huge", "llama3.2", 2);
    huge["agent"]["system"] = json!("x".repeat(40_000));
    client.publish_json(&topic, &huge).await;
    client
        .publish_json(&topic, &json!({"id": 7, "type": "assign"}))
        .await;
    // Then a good command: it is answered, so the node kept serving.
    client
        .publish_json(&topic, &assign("c-good", "pi-bad", "alice", "llama3.2", 3))
        .await;
    assert_eq!(client.reply("pi-bad", "c-good").await["ok"], true);

    node.proc.wait_for_line("not valid JSON", WAIT);
    node.proc.wait_for_line(
        "names node \"pi-other\" but arrived on the topic of node \"pi-bad\"",
        WAIT,
    );
    node.proc
        .wait_for_line("exceeds the limit of 16384 bytes", WAIT);
    assert!(client.replies("pi-bad", "c-wrong").is_empty());
    assert!(client.replies("pi-bad", "c-huge").is_empty());
    let (_, agents) = node.get("/v1/agents").await;
    assert_eq!(
        agents["agents"].as_array().unwrap().len(),
        1,
        "only alice: {agents}"
    );
    // The connection survived: one connect in the log, never offline.
    assert_eq!(node.proc.count_lines("connected to MQTT broker"), 1);
    assert!(client
        .on_topic("pifleet/nodes/pi-bad/status")
        .iter()
        .all(|m| m.text() == "online"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_turn_in_flight_finishes_the_turn_publishes_offline_and_exits_0() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "1500"]);
    let mut node = Node::start("pi-term", &broker, &sim.url, "agent_capacity = 1", "");
    let client = Client::connect(
        &broker,
        &[
            "pifleet/nodes/pi-term/reply",
            "pifleet/nodes/pi-term/status",
            "pifleet/nodes/pi-term/capacity",
        ],
    )
    .await;
    assign_all(&client, "pi-term", &["alice"], "llama3.2").await;
    client
        .publish_json(
            &cmd_topic("pi-term"),
            &turn("t-inflight", "pi-term", "alice", hello("finish me")),
        )
        .await;
    crate::util::wait_until_async("the turn to reach the simulator", WAIT, || async {
        sim.stats().await["in_flight"] == 1
    })
    .await;
    node.proc.signal("TERM");
    // Stopping nodes announce themselves draining and refuse new turns.
    client
        .wait_message("pifleet/nodes/pi-term/capacity", |m| {
            m.json()["draining"] == true
        })
        .await;
    client
        .publish_json(
            &cmd_topic("pi-term"),
            &turn("t-late", "pi-term", "alice", hello("too late")),
        )
        .await;
    assert_eq!(
        error_code(&client.reply("pi-term", "t-late").await),
        "shutting_down"
    );

    let result = client.reply("pi-term", "t-inflight").await;
    assert_eq!(result["ok"], true, "{result}");
    let offline = client
        .wait_message("pifleet/nodes/pi-term/status", |m| m.text() == "offline")
        .await;
    let answered = client
        .on_topic("pifleet/nodes/pi-term/reply")
        .into_iter()
        .find(|m| m.json()["id"] == "t-inflight")
        .unwrap();
    assert!(
        answered.at <= offline.at,
        "offline was published before the turn's answer"
    );
    let status = node.proc.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{:?}", node.proc.output());
    // It stopped cleanly: the retained status stays offline (the will was not needed).
    let later = Client::connect(&broker, &["pifleet/nodes/pi-term/status"]).await;
    assert_eq!(
        later
            .wait_message("pifleet/nodes/pi-term/status", |_| true)
            .await
            .text(),
        "offline"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grace_period_that_runs_out_answers_the_turn_as_failed_and_still_exits_0() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "20000"]);
    let mut node = Node::start(
        "pi-grace",
        &broker,
        &sim.url,
        "agent_capacity = 1\nshutdown_grace_secs = 1",
        "",
    );
    let client = Client::connect(&broker, &["pifleet/nodes/pi-grace/reply"]).await;
    assign_all(&client, "pi-grace", &["alice"], "llama3.2").await;
    client
        .publish_json(
            &cmd_topic("pi-grace"),
            &turn("t-long", "pi-grace", "alice", hello("slow")),
        )
        .await;
    crate::util::wait_until_async("the turn to reach the simulator", WAIT, || async {
        sim.stats().await["in_flight"] == 1
    })
    .await;
    node.proc.signal("TERM");
    let result = client.reply("pi-grace", "t-long").await;
    assert_eq!(error_code(&result), "shutting_down", "{result}");
    assert!(
        result["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("grace period"),
        "{result}"
    );
    assert_eq!(node.proc.wait_exit(WAIT).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_api_answers_health_readiness_metrics_and_json_errors() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let node = Node::start("pi-api", &broker, &sim.url, "agent_capacity = 2", "");
    let (status, body) = node.get("/health").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    assert_eq!(node.get("/ready").await.0, 200);
    let (status, body) = http_get(&format!("{}/nope", node.api)).await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");
    let url = format!("{}/v1/agents", node.api);
    let (status, body) = crate::util::send(reqwest::Method::DELETE, &url, None, None).await;
    assert_eq!(status, 405);
    assert_eq!(body["error"], "/v1/agents does not take DELETE", "{body}");
    let metrics = reqwest::get(format!("{}/metrics", node.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "pifleet_node_agents_running",
        "pifleet_node_agent_capacity",
        "pifleet_node_ollama_request_duration_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_turns_503_when_the_broker_goes_away() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let node = Node::start("pi-ready", &broker, &sim.url, "agent_capacity = 1", "");
    assert_eq!(node.get("/ready").await.0, 200);
    drop(broker);
    crate::util::wait_until_async("/ready to turn 503", WAIT, || async {
        node.get("/ready").await.0 == 503
    })
    .await;
    let (_, body) = node.get("/ready").await;
    assert_eq!(body["code"], "not_ready");
}

#[test]
fn config_check_reports_unknown_keys_wrong_types_and_zero_capacity_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.toml",
            "agent_capacity = 2\nlables = {}\n",
            "unknown.toml:2:1:",
            "lables",
        ),
        (
            "type.toml",
            "node_id = \"a\"\nagent_capacity = \"three\"\n",
            "type.toml:2:18:",
            "string",
        ),
        (
            "zero.toml",
            "node_id = \"a\"\n\nagent_capacity = 0\n",
            "zero.toml:3:18:",
            "agent_capacity",
        ),
        (
            "nested.toml",
            "agent_capacity = 1\n[ollama]\nmax_parallel = 0\n",
            "nested.toml:3:16:",
            "ollama.max_parallel",
        ),
    ];
    for (name, text, position, word) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(crate::util::pifleet_bin())
            .args(["config", "check", path.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(
            stderr.contains(position) && stderr.contains(word),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn the_printed_default_node_config_passes_check() {
    let out = std::process::Command::new(crate::util::pifleet_bin())
        .args(["config", "default", "node"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let check = std::process::Command::new(crate::util::pifleet_bin())
        .args(["config", "check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("ok"));
}

#[test]
fn a_node_with_a_missing_config_file_exits_64_naming_the_file() {
    let mut proc = Proc::spawn(
        "pi-nofile",
        &["node", "--config", "/nonexistent/node.toml"],
        &[],
    );
    assert_eq!(proc.wait_exit(WAIT).code(), Some(64));
    proc.wait_for_line("/nonexistent/node.toml", WAIT);
}

#[tokio::test(flavor = "multi_thread")]
async fn under_systemd_the_node_notifies_ready_pings_the_watchdog_and_notifies_stopping() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let path = socket_path.to_str().unwrap();
    let mut node = Node::start_with_env(
        "pi-systemd",
        &broker,
        &sim.url,
        "agent_capacity = 1",
        "",
        &[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "1000000")],
    );
    let mut received = Vec::new();
    let mut read_until = |needle: &str| loop {
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).expect("a notification in time");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        received.push(text.clone());
        if text.contains(needle) {
            return;
        }
    };
    read_until("READY=1");
    read_until("WATCHDOG=1");
    node.proc.signal("TERM");
    read_until("STOPPING=1");
    assert_eq!(node.proc.wait_exit(WAIT).code(), Some(0));
    assert!(
        received
            .iter()
            .any(|m| m.contains("STATUS=node pi-systemd online")),
        "{received:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_broker_restart_the_node_announces_itself_again_and_takes_commands() {
    let mut broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let node = Node::start("pi-rst", &broker, &sim.url, "agent_capacity = 2", "");
    // The test broker keeps nothing across a restart: no retained messages,
    // no subscriptions. Only the node's reconnection can bring them back.
    broker.restart();
    node.proc.wait_for_line("lost the MQTT broker", WAIT);
    crate::util::wait_until("the node to be ready again", WAIT, || {
        node.proc.count_lines("node pi-rst ready") >= 2
    });
    let client = Client::connect(
        &broker,
        &[
            "pifleet/nodes/pi-rst/status",
            "pifleet/nodes/pi-rst/capacity",
            "pifleet/nodes/pi-rst/reply",
        ],
    )
    .await;
    let status = client
        .wait_message("pifleet/nodes/pi-rst/status", |_| true)
        .await;
    assert_eq!((status.text().as_str(), status.retain), ("online", true));
    client
        .wait_message("pifleet/nodes/pi-rst/capacity", |m| {
            m.retain && m.json()["node"] == "pi-rst"
        })
        .await;
    client
        .publish_json(
            &cmd_topic("pi-rst"),
            &assign("after-restart", "pi-rst", "alice", "llama3.2", 1),
        )
        .await;
    assert_eq!(client.reply("pi-rst", "after-restart").await["ok"], true);
}
