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
    let encoder = Chunks::new(&id, created, &agent, options.include_usage);
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
    /// Every chunk's fields before its `choices`, written once: a chunk
    /// per token is the hot path of a stream.
    head: String,
    include_usage: bool,
    first: bool,
}

impl Chunks {
    fn new(id: &str, created: u64, model: &str, include_usage: bool) -> Chunks {
        let head = format!(
            r#"{{"id":{},"object":"chat.completion.chunk","created":{created},"model":{},"choices":"#,
            Value::from(id),
            Value::from(model)
        );
        Chunks {
            head,
            include_usage,
            first: true,
        }
    }

    /// One event: the head, `choices` (JSON), and `usage` when asked for.
    fn chunk(&self, choices: &str, usage: Option<Value>) -> String {
        let usage = match (self.include_usage, usage) {
            (false, _) => String::new(),
            (true, None) => r#","usage":null"#.to_owned(),
            (true, Some(usage)) => format!(r#","usage":{usage}"#),
        };
        format!("data: {}{choices}{usage}}}\n\n", self.head)
    }

    fn delta(&mut self, content: &str, finish: Option<&str>) -> String {
        let content = Value::from(content);
        let delta = match std::mem::take(&mut self.first) {
            true => format!(r#"{{"role":"assistant","content":{content}}}"#),
            false if finish.is_some() => "{}".to_owned(),
            false => format!(r#"{{"content":{content}}}"#),
        };
        let finish = Value::from(finish);
        let choices =
            format!(r#"[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]"#);
        self.chunk(&choices, None)
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
                    events.push_str(&self.chunk("[]", Some(usage(&answer.usage))));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of a stream, as JSON (the `[DONE]` line aside).
    fn events(text: &str) -> Vec<Value> {
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("a JSON event"))
            .collect()
    }

    #[test]
    fn chunks_are_openais_with_the_role_first_and_the_usage_last() {
        let mut c = Chunks::new("chatcmpl-1", 7, "al\"ice", true);
        let mut text = String::new();
        for piece in ["Hel", "lo \"you\"\n"] {
            text.push_str(&c.delta(piece, None));
        }
        text.push_str(&c.delta("", Some("stop")));
        text.push_str(&c.chunk("[]", Some(json!({"completion_tokens": 2}))));
        let e = events(&text);
        assert_eq!(e.len(), 4);
        for event in &e {
            assert_eq!(event["object"], "chat.completion.chunk");
            assert_eq!(
                (event["id"].as_str(), event["created"].as_u64()),
                (Some("chatcmpl-1"), Some(7))
            );
            assert_eq!(event["model"], "al\"ice");
        }
        assert_eq!(
            e[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "Hel"})
        );
        assert_eq!(
            e[1]["choices"][0]["delta"],
            json!({"content": "lo \"you\"\n"})
        );
        assert_eq!(e[1]["usage"], Value::Null);
        assert_eq!(e[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(e[2]["choices"][0]["delta"], json!({}));
        assert_eq!(
            (
                e[3]["choices"].clone(),
                e[3]["usage"]["completion_tokens"].clone()
            ),
            (json!([]), json!(2))
        );
        // Without include_usage, no usage field at all.
        let plain = Chunks::new("i", 1, "m", false).delta("x", None);
        assert!(events(&plain)[0].get("usage").is_none(), "{plain}");
    }
}
