//! `pifleet bench chat --stream`: CONCURRENCY clients stream completions
//! (`POST /v1/chat/completions` with `"stream": true`, usage included) back
//! to back for SECONDS. Per stream: the time to its first text, the gaps
//! between its chunks, its tokens; overall: streams a second, errors, and
//! the CPU each daemon the bench started spent per streamed token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{progress, quantile, round3, Api, BenchError};

/// The `model` of the requests.
#[derive(Clone)]
pub enum Model {
    /// pifleet: the agents, in turn.
    Agents(Vec<String>),
    /// A peer (`--openai`): one model.
    One(String),
}

impl Model {
    fn nth(&self, i: usize) -> &str {
        match self {
            Model::Agents(names) => &names[i % names.len()],
            Model::One(model) => model,
        }
    }

    /// Where completions are asked: pifleet's coordinator, or the peer's
    /// OpenAI-compatible base URL.
    fn path(&self) -> &'static str {
        match self {
            Model::Agents(_) => "/v1/chat/completions",
            Model::One(_) => "/chat/completions",
        }
    }
}

/// What one stream showed.
#[derive(Default)]
struct Streamed {
    ttft_ms: f64,
    total_ms: f64,
    gaps_ms: Vec<f64>,
    tokens: u64,
}

#[derive(Default)]
struct Tally {
    streams: Vec<Streamed>,
    errors: u64,
    first_error: Option<String>,
}

pub async fn load(
    concurrency: usize,
    seconds: u64,
    api: &Api,
    model: Model,
    processes: &[(String, u32)],
) -> Result<Value, BenchError> {
    progress(format!(
        "{concurrency} clients stream completions for {seconds}s"
    ));
    let meter = super::CpuMeter::start(processes)?;
    let model = Arc::new(model);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let clients: Vec<_> = (0..concurrency)
        .map(|c| {
            let (api, model) = (api.clone(), model.clone());
            tokio::spawn(client(api, model, c, concurrency, deadline))
        })
        .collect();
    let mut all = Tally::default();
    for c in clients {
        let t = c
            .await
            .map_err(|e| BenchError::new(format!("a client failed: {e}")))?;
        all.streams.extend(t.streams);
        all.errors += t.errors;
        all.first_error = all.first_error.or(t.first_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = &all.first_error {
        progress(format!("{} errors; the first: {e}", all.errors));
    }
    let mut ttft: Vec<f64> = all.streams.iter().map(|s| s.ttft_ms).collect();
    let mut total: Vec<f64> = all.streams.iter().map(|s| s.total_ms).collect();
    let mut gaps: Vec<f64> = all.streams.iter().flat_map(|s| s.gaps_ms.clone()).collect();
    for v in [&mut ttft, &mut total, &mut gaps] {
        v.sort_by(f64::total_cmp);
    }
    let tokens: u64 = all.streams.iter().map(|s| s.tokens).sum();
    let per_token = meter.finish(tokens, "token", elapsed)?;
    let mut result = json!({
        "bench": "chat",
        "stream": true,
        "concurrency": concurrency,
        "seconds": round3(elapsed),
        "streams": all.streams.len() as u64 + all.errors,
        "rps": round3(all.streams.len() as f64 / elapsed),
        "tokens": tokens,
        "ttft_p50_ms": round3(quantile(&ttft, 0.5)),
        "ttft_p99_ms": round3(quantile(&ttft, 0.99)),
        "p50_ms": round3(quantile(&total, 0.5)),
        "p99_ms": round3(quantile(&total, 0.99)),
        "gap_p99_ms": round3(quantile(&gaps, 0.99)),
        "gap_max_ms": round3(gaps.last().copied().unwrap_or(0.0)),
        "errors": all.errors,
    });
    if let Some(r) = result.as_object_mut() {
        r.extend(per_token);
    }
    Ok(result)
}

async fn client(
    api: Api,
    model: Arc<Model>,
    me: usize,
    clients: usize,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut i = me;
    while Instant::now() < deadline {
        let body = json!({
            "model": model.nth(i),
            "messages": [{"role": "user", "content": "Hello! How are you?"}],
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        i += clients;
        match one(&api, model.path(), &body).await {
            Ok(s) => tally.streams.push(s),
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
        }
    }
    tally
}

/// One streamed completion, read event by event as it arrives.
async fn one(api: &Api, path: &str, body: &Value) -> Result<Streamed, String> {
    let start = Instant::now();
    let mut response = api
        .post_streamed(path, body)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != 200 {
        let status = response.status();
        return Err(format!(
            "{status} {}",
            response.text().await.unwrap_or_default()
        ));
    }
    let mut s = Streamed::default();
    let mut last: Option<Instant> = None;
    let mut buffer = Vec::new();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| format!("the stream broke off: {e}"))?
            .ok_or("the stream ended without [DONE]")?;
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                s.total_ms = start.elapsed().as_secs_f64() * 1000.0;
                return if last.is_some() {
                    Ok(s)
                } else {
                    Err("a stream without text".into())
                };
            }
            let data: Value = serde_json::from_str(data).map_err(|e| format!("not JSON: {e}"))?;
            if let Some(error) = data.get("error") {
                return Err(error.to_string());
            }
            if let Some(tokens) = data["usage"]["completion_tokens"].as_u64() {
                s.tokens = tokens;
            }
            let text = data["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("");
            if text.is_empty() {
                continue;
            }
            let now = Instant::now();
            match last {
                None => s.ttft_ms = (now - start).as_secs_f64() * 1000.0,
                Some(t) => s.gaps_ms.push((now - t).as_secs_f64() * 1000.0),
            }
            last = Some(now);
        }
    }
}
