//! Streamed answers through real daemons and Mosquitto (issue 15): chunks
//! arrive as the simulator generates them on each streaming endpoint, many
//! streams at once each arrive whole and in order, a client that leaves
//! stops the Pi's generation, and a node killed mid-stream ends the stream
//! with an error and stores nothing.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

/// The simulator's deterministic answer to `messages` messages, the last
/// one `message`, for an agent made by `spawn_agent` (system prompt
/// "You are NAME.", sent first).
fn expected(agent: &str, messages: usize, message: &str) -> String {
    format!(
        "[llama3.2:latest] received {messages} messages with system prompt \"You are {agent}.\"; last user message: \"{message}\""
    )
}

/// A broker, the simulator started with `sim_args`, `nodes` nodes (with
/// `node_extra` config sections) and a coordinator, with `agents` agents
/// running (`s0`, `s1`...).
async fn fleet(
    sim_args: &[&str],
    nodes: usize,
    node_extra: &str,
    agents: usize,
) -> (Mosquitto, Sim, Vec<Node>, Coordinator) {
    let broker = Mosquitto::start();
    let sim = Sim::start(sim_args);
    let coordinator = Coordinator::start(&broker, "");
    let nodes: Vec<Node> = (0..nodes)
        .map(|i| {
            let id = format!("n{i}");
            Node::start(&id, &broker, &sim.url, "agent_capacity = 100", node_extra)
        })
        .collect();
    coordinator.wait_nodes_online(nodes.len() as u64).await;
    for i in 0..agents {
        coordinator.spawn_agent(&format!("s{i}"), "llama3.2").await;
    }
    coordinator.wait_running(agents).await;
    (broker, sim, nodes, coordinator)
}

/// `curl -sN` of a streaming request: each non-empty line of its output
/// with when it arrived, from when curl started.
fn curl_lines(url: &str, body: &Value) -> Vec<(Duration, String)> {
    let started = Instant::now();
    let mut curl = Command::new("curl")
        .args([
            "-sN",
            "--fail-with-body",
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-d", &body.to_string(), url])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl (scripts/test.sh installs it)");
    let lines = BufReader::new(curl.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .map(|l| (started.elapsed(), l))
        .collect();
    let status = curl.wait().expect("curl exits");
    assert!(status.success(), "curl {url}: {status}");
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_sees_chunks_arrive_at_the_simulators_pace_on_each_streaming_endpoint() {
    // 10 tokens a second: the 12-token answer takes 1.2 s to generate.
    let (_broker, _sim, _nodes, coordinator) = fleet(
        &["--tokens-per-sec", "10", "--first-token-ms", "0"],
        1,
        "",
        1,
    )
    .await;
    let messages = json!([{"role": "user", "content": "pace"}]);
    let endpoints = [
        (
            "/v1/chat",
            json!({"agent": "s0", "messages": messages, "stream": true}),
            "event: delta",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "s0", "messages": messages, "stream": true}),
            "\"delta\":{\"content\"",
        ),
        (
            "/api/chat",
            json!({"model": "s0:latest", "messages": messages}),
            "\"done\":false",
        ),
    ];
    for (path, body, marker) in endpoints {
        let lines = curl_lines(&format!("{}{path}", coordinator.api), &body);
        let text: Vec<&(Duration, String)> =
            lines.iter().filter(|(_, l)| l.contains(marker)).collect();
        assert!(text.len() >= 6, "{path}: too few chunks: {lines:?}");
        let spread = text.last().unwrap().0 - text[0].0;
        // Relayed as generated, not gathered until the end.
        assert!(
            spread >= Duration::from_millis(600),
            "{path}: chunks came within {spread:?} of each other: {lines:?}"
        );
    }
}

/// One streamed OpenAI completion: its text, whether it ended with
/// `[DONE]`, how many deltas carried text and the tokens its usage counts.
async fn openai_stream(
    http: &reqwest::Client,
    api: &str,
    agent: &str,
    message: &str,
) -> (String, bool, u64, u64) {
    let body = json!({"model": agent, "messages": [{"role": "user", "content": message}],
                      "stream": true, "stream_options": {"include_usage": true}});
    let response = http
        .post(format!("{api}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200, "{message}");
    let raw = response.text().await.expect("the whole stream");
    let mut text = String::new();
    let (mut done, mut deltas, mut tokens) = (false, 0, 0);
    for data in raw.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).expect("a JSON chunk");
        assert!(chunk.get("error").is_none(), "{message}: {chunk}");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            deltas += u64::from(!piece.is_empty());
            text.push_str(piece);
        }
        tokens = chunk["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(tokens);
    }
    (text, done, deltas, tokens)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_streams_complete_each_whole_and_in_order() {
    // Every token its own chunk (no coalescing): the most messages, the
    // most chances to lose, double or reorder one.
    let (_broker, _sim, _nodes, coordinator) = fleet(
        &["--tokens-per-sec", "400", "--first-token-ms", "5"],
        2,
        "[ollama]\nmax_parallel = 20\nstream_window_ms = 0",
        20,
    )
    .await;
    let http = reqwest::Client::new();
    let streams = (0..200).map(|i| {
        let (http, api) = (http.clone(), coordinator.api.clone());
        tokio::spawn(async move {
            let (agent, message) = (format!("s{}", i % 20), format!("stream {i} of 200"));
            let (text, done, deltas, tokens) = openai_stream(&http, &api, &agent, &message).await;
            // Stateless: the agent's system prompt and this one message.
            (
                expected(&agent, 2, &message),
                text,
                done && deltas == tokens,
                deltas,
            )
        })
    });
    let results = futures_util::future::join_all(streams).await;
    let mut wrong = Vec::new();
    for result in results {
        // Each token is its own chunk and its own delta: one lost on the
        // way (and filled in from the result) or doubled shows in the count.
        let (want, text, whole, deltas) = result.expect("stream task");
        if text != want || !whole {
            wrong.push(format!(
                "{text:?} in {deltas} deltas (ended, one per token: {whole}), not {want:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} streams wrong: {wrong:#?}",
        wrong.len()
    );
}

/// A streamed chat with agent s0 on `/v1/chat`, read up to its first
/// chunk (a `delta` event): the response, and what was read.
async fn first_delta(coordinator: &Coordinator, message: &str) -> (reqwest::Response, String) {
    let body =
        json!({"agent": "s0", "messages": [{"role": "user", "content": message}], "stream": true});
    let mut response = reqwest::Client::new()
        .post(format!("{}/v1/chat", coordinator.api))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let first = response
        .chunk()
        .await
        .expect("read")
        .expect("a first chunk");
    let seen = String::from_utf8_lossy(&first).into_owned();
    assert!(seen.contains("event: delta"), "{seen}");
    (response, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_after_its_first_chunk_stops_the_generation_within_1_s() {
    // 4 tokens a second: the answer would take 3 s more.
    let (_broker, sim, _nodes, coordinator) = fleet(
        &["--tokens-per-sec", "4", "--first-token-ms", "0"],
        1,
        "",
        1,
    )
    .await;
    let (response, _) = first_delta(&coordinator, "leave").await;
    assert_eq!(sim.stats().await["cancelled"], 0);
    drop(response);
    let left = Instant::now();
    poll(
        "the simulator to see the generation cancelled",
        WAIT,
        || async { (sim.stats().await["cancelled"] == 1).then_some(()) },
    )
    .await;
    let took = left.elapsed();
    assert!(took <= Duration::from_secs(1), "cancelled after {took:?}");
    assert_eq!(sim.stats().await["in_flight"], 0);
    // The agent takes the next chat at once.
    let (status, answer) = coordinator
        .post(
            "/v1/chat",
            json!({"agent": "s0", "messages": [{"role": "user", "content": "next"}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_mid_stream_ends_the_stream_with_an_error_and_stores_no_partial_answer() {
    let (_broker, _sim, nodes, coordinator) = fleet(
        &["--tokens-per-sec", "4", "--first-token-ms", "0"],
        1,
        "",
        1,
    )
    .await;
    let (mut response, mut seen) = first_delta(&coordinator, "doomed").await;
    nodes[0].proc.signal("KILL");
    let killed = Instant::now();
    // The stream ends (never hangs), its last event an error.
    let rest = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = response.chunk().await.expect("the stream ends cleanly") {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(
        rest.is_ok(),
        "the stream hung after the node was killed: {seen}"
    );
    let took = killed.elapsed();
    let last = seen.trim_end().rsplit("\n\n").next().unwrap_or_default();
    assert!(last.starts_with("event: error"), "{seen}");
    assert!(last.contains("was lost"), "{last}");
    assert!(
        took <= Duration::from_secs(5),
        "the error came {took:?} after the kill"
    );
    let stored =
        Coordinator::stored_user_messages(&coordinator.dir.path().join("coordinator.db"), "s0");
    assert!(stored.is_empty(), "history holds {stored:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pifleet_chat_prints_the_answer_streamed_or_whole() {
    // 10 tokens a second: the answer takes about 1.5 s.
    let (_broker, _sim, _nodes, coordinator) = fleet(
        &["--tokens-per-sec", "10", "--first-token-ms", "0"],
        1,
        "",
        1,
    )
    .await;
    for extra in [None, Some("--no-stream")] {
        let mut args = vec!["chat", "--coordinator", &coordinator.api, "s0", "cli"];
        args.extend(extra);
        let started = Instant::now();
        let mut chat = Command::new(pifleet_bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run pifleet chat");
        // When the first and the last byte of the answer came.
        let (mut stdout, mut first) = (Vec::new(), None);
        let mut pipe = chat.stdout.take().expect("stdout");
        let mut byte = [0u8; 1];
        while std::io::Read::read(&mut pipe, &mut byte).unwrap_or(0) == 1 {
            first.get_or_insert_with(|| started.elapsed());
            stdout.push(byte[0]);
        }
        let spread = started.elapsed() - first.unwrap_or_default();
        assert!(chat.wait().unwrap().success(), "{extra:?}");
        if extra.is_none() {
            assert!(
                spread >= Duration::from_millis(700),
                "printed within {spread:?}"
            );
        } else {
            assert!(
                spread <= Duration::from_millis(500),
                "--no-stream printed over {spread:?}"
            );
        }
        let stdout = String::from_utf8_lossy(&stdout);
        // The second chat follows the first in the agent's history.
        let messages = if extra.is_none() { 2 } else { 4 };
        assert_eq!(
            stdout.trim_end(),
            expected("s0", messages, "cli"),
            "{extra:?}"
        );
    }
}
