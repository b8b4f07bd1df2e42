//! What the OpenAI- and Ollama-compatible endpoints share: their looser
//! message shapes, model names that are agent names, and the opt-in to an
//! agent's memory.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::{invalid, validate_agent_name, validate_text, ApiError};
use crate::protocol::{ChatMessage, Role};

/// The header that makes a compatible chat a turn of the agent's own
/// conversation: its stored history is sent first and the turn is stored.
pub(super) const MEMORY_HEADER: &str = "x-pifleet-memory";

/// A chat message as OpenAI and Ollama clients send it: `content` may be
/// text, a list of parts (OpenAI) or null (an assistant's tool call).
#[derive(Deserialize)]
pub(super) struct LooseMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// The conversation, checked: known roles (`developer` is a system
/// message), text content only.
pub(super) fn messages(raw: Vec<LooseMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if raw.is_empty() {
        return Err(invalid("messages must not be empty"));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, m)| {
            // OpenAI's newer name for a system message.
            let name = if m.role == "developer" { "system" } else { &m.role };
            let role = Role::parse(name).ok_or_else(|| {
                invalid(format!(
                    "messages[{i}].role {:?} is not one of system, developer, user, assistant, tool",
                    m.role
                ))
            })?;
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.into_iter().enumerate() {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(invalid(format!(
                                    "messages[{i}].content[{j}] is of type {kind:?}: only text parts are supported"
                                )))
                            }
                        }
                    }
                    text
                }
            };
            validate_text(&format!("messages[{i}].content"), &content, true)?;
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// The agent a `model` names: the name itself, or with Ollama's `:latest`
/// tag. A name no agent can have is answered as a model not found.
pub(super) fn agent_of(model: &str) -> Result<String, ApiError> {
    let name = model.strip_suffix(":latest").unwrap_or(model);
    if validate_agent_name(name).is_err() {
        return Err(model_not_found(model));
    }
    Ok(name.to_owned())
}

fn model_not_found(model: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!("model {model:?} is not an agent of this fleet (models are agents: GET /v1/models or /api/tags lists them)"),
    )
}

/// A missing agent, as these APIs say it: the model was not found.
pub(super) fn not_found_is_model(e: ApiError) -> ApiError {
    if e.status == StatusCode::NOT_FOUND {
        ApiError {
            code: "model_not_found",
            ..e
        }
    } else {
        e
    }
}

/// Whether the request opted into the agent's memory ([`MEMORY_HEADER`]).
pub(super) fn memory(headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(value) = headers.get(MEMORY_HEADER) else {
        return Ok(false);
    };
    let value = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match value.as_str() {
        "1" | "on" | "true" | "yes" => Ok(true),
        "0" | "off" | "false" | "no" => Ok(false),
        _ => Err(invalid(format!(
            "header {MEMORY_HEADER}: {value:?} is not one of on, off, true, false, 1, 0"
        ))),
    }
}

/// `response` with a `Retry-After` header, if any.
pub(super) fn with_retry_after(mut response: Response, secs: Option<u64>) -> Response {
    if let Some(secs) = secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
