//! OpenAI's chat-completions API on the coordinator (docs/API.md): `POST
//! /v1/chat/completions` (whole, or streamed as `chat.completion.chunk`
//! events ending with `data: [DONE]`), `GET /v1/models` and
//! `GET /v1/models/{model}`, errors in OpenAI's shape, the API token as
//! `Authorization: Bearer`.
//!
//! `model` names an agent. Like the API it copies, a completion is
//! stateless: the request's messages are the whole conversation, and the
//! agent supplies its model, its system prompt (when the request has none)
//! and its node. `X-Pifleet-Memory: on` makes it a turn of the agent's own
//! conversation instead (its history sent first, the turn stored).

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::stream::{self, Encoder, Piece};
use super::{compat, ApiError, ApiRequest, ApiState, JsonBody};
use crate::http::PathParam;
use crate::protocol::{now_ms, AgentView, ChatAnswer, Usage};

pub(super) fn routes(state: ApiState) -> Router<ApiState> {
    Router::new()
        .route("/chat/completions", post(completions))
        .route("/models", get(models))
        .route("/models/{model}", get(model))
        .route_layer(middleware::from_fn_with_state(state, require_token))
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
fn error(e: ApiError) -> Response {
    let kind = match e.status.as_u16() {
        400 | 404 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    let param = (e.code == "model_not_found").then_some("model");
    let status = match e.status {
        // OpenAI answers a malformed request with 400.
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        other => other,
    };
    let body =
        json!({"error": {"message": e.message, "type": kind, "param": param, "code": e.code}});
    compat::with_retry_after((status, Json(body)).into_response(), e.retry_after)
}

async fn require_token(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    match s.check_token(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => error(e),
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    messages: Vec<compat::LooseMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    // Sampling options (temperature, max_tokens...) are the agent's.
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

async fn completions(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<JsonBody<CompletionRequest>, ApiError>,
) -> Response {
    let checked = body.and_then(|JsonBody(b)| {
        let agent = compat::agent_of(&b.model)?;
        let messages = compat::messages(b.messages)?;
        let memory = compat::memory(&headers)?;
        let options = b.stream_options.unwrap_or_default();
        Ok((agent, messages, b.stream, options, memory))
    });
    let (agent, messages, streamed, options, memory) = match checked {
        Ok(v) => v,
        Err(e) => return error(e),
    };
    let chat = s
        .start_chat(agent.clone(), messages, memory, streamed)
        .await;
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = now_ms() / 1000;
    if !streamed {
        return match chat.answer().await {
            Ok(answer) => Json(completion(&id, created, &agent, &answer)).into_response(),
            Err(e) => error(compat::not_found_is_model(e)),
        };
    }
    let encoder = Chunks {
        id,
        created,
        model: agent,
        include_usage: options.include_usage,
        first: true,
    };
    stream::respond(chat, encoder, |e| error(compat::not_found_is_model(e))).await
}

fn usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_eval_count,
        "completion_tokens": u.eval_count,
        "total_tokens": u.prompt_eval_count + u.eval_count
    })
}

fn completion(id: &str, created: u64, model: &str, answer: &ChatAnswer) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer.message.content},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": usage(&answer.usage)
    })
}

/// `chat.completion.chunk` events: the role with the first text, the text
/// as it comes, `finish_reason` last, then the usage (when asked for) and
/// `[DONE]`. An error after the first chunk is an `{"error": …}` event.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    first: bool,
}

impl Chunks {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> String {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        stream::sse(None, &chunk.to_string())
    }

    fn delta(&mut self, content: &str, finish: Option<&str>) -> String {
        let delta = match std::mem::take(&mut self.first) {
            true => json!({"role": "assistant", "content": content}),
            false if finish.is_some() => json!({}),
            false => json!({"content": content}),
        };
        let choice =
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
        self.chunk(choice, None)
    }
}

impl Encoder for Chunks {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn encode(&mut self, piece: Piece) -> Bytes {
        let events = match piece {
            Piece::Delta(content) => self.delta(&content, None),
            Piece::Done(answer) => {
                let mut events = self.delta("", Some("stop"));
                if self.include_usage {
                    events.push_str(&self.chunk(json!([]), Some(usage(&answer.usage))));
                }
                events + &stream::sse(None, "[DONE]")
            }
            Piece::Failed(e) => {
                let body = json!({"error": {"message": e.message, "type": "server_error", "param": null, "code": e.code}});
                stream::sse(None, &body.to_string())
            }
        };
        Bytes::from(events)
    }
}

fn model_object(a: &AgentView) -> Value {
    json!({
        "id": a.name,
        "object": "model",
        "created": a.created_ms / 1000,
        "owned_by": "pifleet",
    })
}

async fn models(State(s): State<ApiState>) -> Response {
    match s.ask(|reply| ApiRequest::Agents { reply }).await {
        Ok(list) => {
            let data: Vec<Value> = list.agents.iter().map(model_object).collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => error(e.into()),
    }
}

async fn model(State(s): State<ApiState>, PathParam(model): PathParam<String>) -> Response {
    let name = match compat::agent_of(&model) {
        Ok(name) => name,
        Err(e) => return error(e),
    };
    match s.ask(|reply| ApiRequest::Agent { name, reply }).await {
        Ok(agent) => Json(model_object(&agent)).into_response(),
        Err(e) => error(compat::not_found_is_model(e.into())),
    }
}
