//! The Ollama simulator speaks Ollama's REST API (ollama/ollama docs/api.md):
//! field names, NDJSON streaming, nanosecond durations, error bodies.

use serde_json::{json, Value};

use crate::util::Sim;

async fn post(url: &str, body: Value) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_simulator_lists_shows_pulls_and_reports_its_version_like_ollama() {
    let sim = Sim::start(&["--models", "llama3.2,phi3.5:3.8b"]);
    let version: Value = reqwest::get(format!("{}/api/version", sim.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(version["version"].is_string());
    let tags: Value = reqwest::get(format!("{}/api/tags", sim.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["llama3.2:latest", "phi3.5:3.8b"]);
    for field in ["modified_at", "size", "digest", "details"] {
        assert!(tags["models"][0].get(field).is_some(), "{field}");
    }
    let (status, body) = post(
        &format!("{}/api/show", sim.url),
        json!({"model": "llama3.2"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["details"]["format"] == "gguf");
    let (status, body) = post(&format!("{}/api/show", sim.url), json!({"model": "nope"})).await;
    assert_eq!(status, 404);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());

    let (status, body) = post(&format!("{}/api/pull", sim.url), json!({"model": "gemma2"})).await;
    assert_eq!(status, 200);
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.first().unwrap()["status"], "pulling manifest");
    assert_eq!(lines.last().unwrap()["status"], "success");
    let (_, body) = post(
        &format!("{}/api/pull", sim.url),
        json!({"model": "x", "stream": false}),
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "success"})
    );
    let tags: Value = reqwest::get(format!("{}/api/tags", sim.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        tags["models"].as_array().unwrap().len(),
        4,
        "pulled models are listed"
    );

    let ps: Value = reqwest::get(format!("{}/api/ps", sim.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ps["models"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_streams_ndjson_and_answers_once_without_streaming_with_nanosecond_statistics() {
    let sim = Sim::start(&["--tokens-per-sec", "1000", "--first-token-ms", "5"]);
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "why is the sky blue?"}]);
    let (status, body) = post(
        &format!("{}/api/chat", sim.url),
        json!({"model": "llama3.2", "messages": messages}),
    )
    .await;
    assert_eq!(status, 200);
    let chunks: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(chunks.len() > 2);
    let (last, pieces) = chunks.split_last().unwrap();
    assert!(pieces
        .iter()
        .all(|c| c["done"] == false && c["message"]["role"] == "assistant"));
    let text: String = pieces
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert!(
        text.contains("received 2 messages with system prompt \"Be brief.\""),
        "{text}"
    );
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    for field in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[field].as_u64().is_some(), "{field} in {last}");
    }
    assert_eq!(last["eval_count"].as_u64().unwrap() as usize, pieces.len());

    let (_, body) = post(
        &format!("{}/api/chat", sim.url),
        json!({"model": "llama3.2", "messages": messages, "stream": false}),
    )
    .await;
    let one: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(one["message"]["content"].as_str().unwrap(), text);
    assert_eq!(one["done"], true);

    let (_, body) = post(
        &format!("{}/api/generate", sim.url),
        json!({"model": "llama3.2", "prompt": "hi", "stream": false}),
    )
    .await;
    let generated: Value = serde_json::from_str(&body).unwrap();
    assert!(generated["response"]
        .as_str()
        .unwrap()
        .contains("last user message: \"hi\""));
    assert!(generated["eval_duration"].as_u64().unwrap() > 0);
    let ps: Value = reqwest::get(format!("{}/api/ps", sim.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ps["models"][0]["name"], "llama3.2:latest");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_simulator_fails_like_ollama_missing_model_busy_failure_rate_bad_json() {
    let sim = Sim::start(&["--max-parallel", "1", "--first-token-ms", "1000"]);
    let chat = format!("{}/api/chat", sim.url);
    let (status, body) = post(
        &chat,
        json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("not found"), "{body}");
    let url = chat.clone();
    let body = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": false});
    let slow = tokio::spawn(async move { post(&url, body).await });
    crate::util::wait_until_async("the first call", crate::util::WAIT, || async {
        sim.stats().await["in_flight"] == 1
    })
    .await;
    let (status, body) = post(
        &chat,
        json!({"model": "llama3.2", "messages": [{"role": "user", "content": "y"}]}),
    )
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("server busy"), "{body}");
    assert_eq!(slow.await.unwrap().0, 200);
    let response = reqwest::Client::new()
        .post(&chat)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);

    let failing = Sim::start(&["--failure-rate", "1", "--seed", "7"]);
    let (status, body) = post(
        &format!("{}/api/chat", failing.url),
        json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 500);
    assert!(body.contains("simulated failure"), "{body}");
}

/// Real Ollama reads a body as JSON whatever its Content-Type says (gin's
/// ShouldBindJSON); LiteLLM's Ollama provider sends none, so every endpoint
/// that takes a body must accept it without one.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_are_read_as_json_without_or_with_any_content_type() {
    let sim = Sim::start(&[]);
    let chat = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": false});
    let generate = json!({"model": "llama3.2", "prompt": "hi", "stream": false});
    let model = json!({"model": "llama3.2", "stream": false});
    for (path, body) in [
        ("/api/chat", &chat),
        ("/api/generate", &generate),
        ("/api/show", &model),
        ("/api/pull", &model),
    ] {
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let mut request = reqwest::Client::new()
                .post(format!("{}{path}", sim.url))
                .body(body.to_string());
            if let Some(ct) = content_type {
                request = request.header("content-type", ct);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            assert_eq!(status, 200, "{path} with {content_type:?}: {text}");
            let answer: Value = serde_json::from_str(&text).unwrap();
            assert!(answer.get("error").is_none(), "{path}: {answer}");
        }
    }
    // Without a body at all: Ollama's own error.
    let response = reqwest::Client::new()
        .post(format!("{}/api/chat", sim.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "missing request body");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_reports_progress_over_its_duration_and_a_failing_one_an_error() {
    let sim = Sim::start(&[
        "--models",
        "llama3.2",
        "--pull-secs",
        "1",
        "--pull-fail",
        "phi3.5",
    ]);
    let listed = |model: &'static str| {
        let url = format!("{}/api/tags", sim.url);
        async move {
            let (_, tags) = crate::util::http_get(&url).await;
            tags["models"].to_string().contains(model)
        }
    };
    let started = std::time::Instant::now();
    let mut response = reqwest::Client::new()
        .post(format!("{}/api/pull", sim.url))
        .json(&json!({"model": "gemma2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut lines = Vec::new();
    let mut buffer = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find('\n') {
            let line: Value = serde_json::from_str(&buffer[..end]).unwrap();
            buffer.drain(..=end);
            // Still pulling (the last lines follow at once): not listed.
            if line["completed"].as_u64() < line["total"].as_u64() {
                assert!(!listed("gemma2").await, "listed while pulling: {line}");
            }
            lines.push((started.elapsed(), line));
        }
    }
    let progress: Vec<u64> = lines
        .iter()
        .filter_map(|(_, l)| l["completed"].as_u64())
        .collect();
    assert_eq!(progress.len(), 10, "{lines:?}");
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    let first = lines
        .iter()
        .find(|(_, l)| l["completed"].is_u64())
        .unwrap()
        .0;
    assert!(
        lines.last().unwrap().0 - first >= std::time::Duration::from_millis(700),
        "progress came at once: {lines:?}"
    );
    assert_eq!(lines.last().unwrap().1["status"], "success");
    assert!(listed("gemma2").await);

    let (status, body) = post(&format!("{}/api/pull", sim.url), json!({"model": "phi3.5"})).await;
    assert_eq!(status, 200);
    let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert_eq!(last["error"], "pull model manifest: file does not exist");
    assert!(!listed("phi3.5").await);
}
