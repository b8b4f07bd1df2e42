//! Ollama's API on the coordinator (docs/API.md), so that Open WebUI's
//! Ollama connection, the `ollama` client libraries, LiteLLM and Olla can
//! put the fleet behind them: `POST /api/chat` (NDJSON, streamed unless
//! `"stream": false`), `GET /api/tags` and `GET /api/ps` (agents as
//! models: `NAME:latest`), `POST /api/show`, `GET /api/version` and `GET /`.
//!
//! Stateless like `/v1/chat/completions` (see `openai.rs`), with the same
//! `X-Pifleet-Memory` opt-in. Errors are Ollama's `{"error": "..."}`.

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::stream::{self, Encoder, Piece};
use super::{compat, ApiError, ApiRequest, ApiState, JsonBody};
use crate::protocol::{now_ms, utc_timestamp, AgentState, AgentView, ChatAnswer};

/// The version of Ollama's API whose shapes these endpoints follow, as
/// `GET /api/version` reports it.
pub const OLLAMA_API_VERSION: &str = "0.12.0";

pub(super) fn routes(state: ApiState) -> Router<ApiState> {
    Router::new()
        .route("/api/chat", post(chat))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route_layer(middleware::from_fn_with_state(state, require_token))
        // As on Ollama, open to anyone who can reach the port.
        .route("/", get(|| async { "Ollama is running" }))
        .route(
            "/api/version",
            get(|| async { Json(json!({ "version": OLLAMA_API_VERSION })) }),
        )
}

fn error(e: ApiError) -> Response {
    // Ollama answers a malformed request with 400.
    let status = match e.status {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY => axum::http::StatusCode::BAD_REQUEST,
        other => other,
    };
    let response = (status, Json(json!({ "error": e.message }))).into_response();
    compat::with_retry_after(response, e.retry_after)
}

async fn require_token(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    match s.check_token(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => error(e),
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<compat::LooseMessage>,
    #[serde(default)]
    stream: Option<bool>,
    // options, format, keep_alive: ignored (Ollama's defaults apply).
}

async fn chat(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<JsonBody<ChatRequest>, ApiError>,
) -> Response {
    let checked = body.and_then(|JsonBody(b)| {
        let agent = compat::agent_of(&b.model)?;
        let memory = compat::memory(&headers)?;
        Ok((agent, compat::messages(b.messages)?, b.stream, memory))
    });
    let (agent, messages, stream, memory) = match checked {
        Ok(v) => v,
        Err(e) => return error(e),
    };
    let streamed = stream.unwrap_or(true);
    let chat = s
        .start_chat(agent.clone(), messages, memory, streamed)
        .await;
    let lines = Lines {
        model: format!("{agent}:latest"),
    };
    if !streamed {
        return match chat.answer().await {
            Ok(answer) => Json(lines.done(&answer, &answer.message.content)).into_response(),
            Err(e) => error(compat::not_found_is_model(e)),
        };
    }
    stream::respond(chat, lines, |e| error(compat::not_found_is_model(e))).await
}

/// Ollama's NDJSON chat lines.
struct Lines {
    model: String,
}

impl Lines {
    fn message(&self, content: &str, done: bool) -> Value {
        json!({
            "model": self.model,
            "created_at": utc_timestamp(now_ms()),
            "message": {"role": "assistant", "content": content},
            "done": done,
        })
    }

    /// The last line (or the whole answer), with Ollama's statistics.
    fn done(&self, answer: &ChatAnswer, content: &str) -> Value {
        let u = &answer.usage;
        let mut line = self.message(content, true);
        let stats = json!({
            "done_reason": "stop",
            "total_duration": u.total_duration,
            "load_duration": u.load_duration,
            "prompt_eval_count": u.prompt_eval_count,
            "prompt_eval_duration": u.prompt_eval_duration,
            "eval_count": u.eval_count,
            "eval_duration": u.eval_duration,
        });
        if let (Some(line), Value::Object(stats)) = (line.as_object_mut(), stats) {
            line.extend(stats);
        }
        line
    }
}

impl Encoder for Lines {
    const CONTENT_TYPE: &'static str = "application/x-ndjson";

    fn encode(&mut self, piece: Piece) -> Bytes {
        let line = match piece {
            Piece::Delta(content) => self.message(&content, false),
            Piece::Done(answer) => self.done(&answer, ""),
            Piece::Failed(e) => json!({ "error": e.message }),
        };
        Bytes::from(format!("{line}\n"))
    }
}

fn details(a: &AgentView) -> Value {
    json!({
        "parent_model": a.model,
        "format": "gguf",
        "family": "",
        "families": null,
        "parameter_size": "",
        "quantization_level": ""
    })
}

fn model_entry(a: &AgentView) -> Value {
    json!({
        "name": format!("{}:latest", a.name),
        "model": format!("{}:latest", a.name),
        "modified_at": utc_timestamp(a.created_ms),
        "size": 0,
        "digest": "",
        "details": details(a),
    })
}

async fn agents(s: &ApiState) -> Result<Vec<AgentView>, ApiError> {
    let list = s.ask(|reply| ApiRequest::Agents { reply }).await?;
    Ok(list.agents)
}

async fn tags(State(s): State<ApiState>) -> Response {
    match agents(&s).await {
        Ok(agents) => {
            let models: Vec<Value> = agents.iter().map(model_entry).collect();
            Json(json!({ "models": models })).into_response()
        }
        Err(e) => error(e),
    }
}

/// Running agents are Ollama's loaded models; they stay loaded.
async fn ps(State(s): State<ApiState>) -> Response {
    match agents(&s).await {
        Ok(agents) => {
            let expires = utc_timestamp(now_ms() + 5 * 60 * 1000);
            let models: Vec<Value> = agents
                .iter()
                .filter(|a| a.state == AgentState::Running)
                .map(|a| {
                    let mut entry = model_entry(a);
                    entry["expires_at"] = json!(expires);
                    entry["size_vram"] = json!(0);
                    entry
                })
                .collect();
            Json(json!({ "models": models })).into_response()
        }
        Err(e) => error(e),
    }
}

#[derive(Deserialize)]
struct ShowRequest {
    #[serde(default)]
    model: Option<String>,
    /// Older clients name the model `name`.
    #[serde(default)]
    name: Option<String>,
}

async fn show(
    State(s): State<ApiState>,
    body: Result<JsonBody<ShowRequest>, ApiError>,
) -> Response {
    let name = body.and_then(|JsonBody(b)| {
        let model = b
            .model
            .or(b.name)
            .ok_or_else(|| super::invalid("the body must name a \"model\""))?;
        compat::agent_of(&model)
    });
    let name = match name {
        Ok(name) => name,
        Err(e) => return error(e),
    };
    let agent = match s.ask(|reply| ApiRequest::Agent { name, reply }).await {
        Ok(agent) => agent,
        Err(e) => return error(compat::not_found_is_model(e.into())),
    };
    let mut modelfile = format!("# pifleet agent {}\nFROM {}\n", agent.name, agent.model);
    if let Some(system) = &agent.system {
        modelfile.push_str(&format!("SYSTEM \"\"\"{system}\"\"\"\n"));
    }
    Json(json!({
        "modelfile": modelfile,
        "parameters": "",
        "template": "",
        "system": agent.system,
        "details": details(&agent),
        "model_info": {
            "pifleet.agent": agent.name,
            "pifleet.model": agent.model,
            "pifleet.state": agent.state,
            "pifleet.node": agent.node,
        },
        "capabilities": ["completion"],
        "modified_at": utc_timestamp(agent.created_ms),
    }))
    .into_response()
}
