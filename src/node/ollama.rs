//! The node's Ollama client: ollama-rs, the same code whether a real Ollama
//! or `pifleet ollama-sim` answers. Every failure becomes a [`TurnError`]
//! with a stable code and a sentence a user can act on.

use std::time::Duration;

use ollama_rs::error::OllamaError;
use ollama_rs::generation::chat::request::ChatMessageRequest;
use ollama_rs::generation::chat::{
    ChatMessage as OllamaMessage, ChatMessageFinalResponseData, ChatMessageResponseStream,
    MessageRole,
};
use ollama_rs::models::pull::PullModelStatusStream;
use ollama_rs::Ollama;
use url::Url;

use crate::protocol::{normalize_model, ChatMessage, Role, TurnError, TurnErrorCode, Usage};

/// Time allowed for listing models during a capacity probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct OllamaClient {
    ollama: Ollama,
    url: Url,
}

impl OllamaClient {
    pub fn new(url: &Url) -> Self {
        OllamaClient {
            ollama: Ollama::from_url(url.clone()),
            url: url.clone(),
        }
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The local models, normalised to `name:tag`; an error when Ollama does
    /// not answer within a few seconds.
    pub async fn models(&self) -> Result<Vec<String>, String> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.ollama.list_local_models()).await {
            Err(_) => Err(format!(
                "Ollama at {} did not answer within {PROBE_TIMEOUT:?}",
                self.url
            )),
            Ok(Err(e)) => Err(self.describe(e, "").reason),
            Ok(Ok(models)) => {
                let mut names: Vec<String> =
                    models.iter().map(|m| normalize_model(&m.name)).collect();
                names.sort();
                names.dedup();
                Ok(names)
            }
        }
    }

    /// One non-streaming chat call, bounded by `timeout`.
    pub async fn chat(
        &self,
        model: &str,
        messages: Vec<ChatMessage>,
        timeout: Duration,
    ) -> Result<(ChatMessage, Usage), TurnError> {
        let request = ChatMessageRequest::new(
            model.to_owned(),
            messages.into_iter().map(to_ollama).collect(),
        );
        let response =
            match tokio::time::timeout(timeout, self.ollama.send_chat_messages(request)).await {
                Err(_) => return Err(self.timed_out(timeout)),
                Ok(Err(e)) => return Err(self.describe(e, model)),
                Ok(Ok(response)) => response,
            };
        let usage = usage_of(response.final_data);
        Ok((
            ChatMessage::new(Role::Assistant, response.message.content),
            usage,
        ))
    }

    /// Starts one streaming chat call (ollama-rs' streaming chat): the
    /// stream of Ollama's partial answers, the last one `done`. Connecting
    /// is bounded by `timeout`; the caller bounds reading the stream.
    pub async fn chat_stream(
        &self,
        model: &str,
        messages: Vec<ChatMessage>,
        timeout: Duration,
    ) -> Result<ChatMessageResponseStream, TurnError> {
        let request = ChatMessageRequest::new(
            model.to_owned(),
            messages.into_iter().map(to_ollama).collect(),
        );
        match tokio::time::timeout(timeout, self.ollama.send_chat_messages_stream(request)).await {
            Err(_) => Err(self.timed_out(timeout)),
            Ok(Err(e)) => Err(self.describe(e, model)),
            Ok(Ok(stream)) => Ok(stream),
        }
    }

    /// Starts pulling `model` (Ollama's `/api/pull`, streamed): its status
    /// lines, the last one `success`; a sentence if it cannot start.
    pub async fn pull_stream(&self, model: &str) -> Result<PullModelStatusStream, String> {
        match self.ollama.pull_model_stream(model.to_owned(), false).await {
            Ok(stream) => Ok(stream),
            Err(e) => Err(self.describe(e, model).reason),
        }
    }

    /// Why a pull's stream failed, in a sentence.
    pub fn pull_error(&self, e: OllamaError, model: &str) -> String {
        self.describe(e, model).reason
    }

    /// The error of a call that outlived `timeout`.
    pub fn timed_out(&self, timeout: Duration) -> TurnError {
        TurnError {
            code: TurnErrorCode::Timeout,
            reason: format!(
                "Ollama at {} did not answer within request_timeout_secs ({}s)",
                self.url,
                timeout.as_secs()
            ),
        }
    }

    fn describe(&self, e: OllamaError, model: &str) -> TurnError {
        let (code, reason) = match e {
            OllamaError::ReqwestError(e) if e.is_connect() => (
                TurnErrorCode::OllamaUnreachable,
                format!(
                    "cannot connect to Ollama at {}: {}",
                    self.url,
                    root_cause(&e)
                ),
            ),
            OllamaError::ReqwestError(e) if e.is_timeout() => (
                TurnErrorCode::Timeout,
                format!("Ollama at {} timed out: {e}", self.url),
            ),
            OllamaError::ReqwestError(e) => (
                TurnErrorCode::OllamaError,
                format!(
                    "request to Ollama at {} failed: {}",
                    self.url,
                    root_cause(&e)
                ),
            ),
            OllamaError::Other(body) => classify_error_body(&body, model),
            OllamaError::InternalError(e) => {
                (TurnErrorCode::OllamaError, format!("Ollama: {}", e.message))
            }
            OllamaError::JsonError(e) => (
                TurnErrorCode::OllamaError,
                format!(
                    "Ollama at {} sent an answer that is not Ollama's JSON: {e}",
                    self.url
                ),
            ),
            other => (TurnErrorCode::OllamaError, format!("Ollama: {other}")),
        };
        TurnError { code, reason }
    }
}

/// ollama-rs passes a non-2xx body through as text; Ollama's bodies are
/// `{"error": "..."}`. A missing model is a 404 "model ... not found", a full
/// queue a 503 "server busy".
fn classify_error_body(body: &str, model: &str) -> (TurnErrorCode, String) {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned());
    let lower = message.to_lowercase();
    if lower.contains("not found") {
        (
            TurnErrorCode::ModelMissing,
            format!("Ollama does not have model {model}: {message}"),
        )
    } else if lower.contains("busy") {
        (
            TurnErrorCode::OllamaBusy,
            format!("Ollama is busy (503): {message}"),
        )
    } else {
        (TurnErrorCode::OllamaError, format!("Ollama: {message}"))
    }
}

/// Ollama's token counts and durations, as pifleet reports them.
pub fn usage_of(data: Option<ChatMessageFinalResponseData>) -> Usage {
    data.map(|d| Usage {
        prompt_eval_count: d.prompt_eval_count,
        eval_count: d.eval_count,
        total_duration: d.total_duration,
        load_duration: d.load_duration,
        prompt_eval_duration: d.prompt_eval_duration,
        eval_duration: d.eval_duration,
    })
    .unwrap_or_default()
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

fn to_ollama(m: ChatMessage) -> OllamaMessage {
    let role = match m.role {
        Role::System => MessageRole::System,
        Role::User => MessageRole::User,
        Role::Assistant => MessageRole::Assistant,
        Role::Tool => MessageRole::Tool,
    };
    OllamaMessage::new(role, m.content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_error_bodies_map_to_stable_codes() {
        let (code, reason) = classify_error_body(
            r#"{"error":"model \"nope:latest\" not found, try pulling it first"}"#,
            "nope:latest",
        );
        assert_eq!(code, TurnErrorCode::ModelMissing);
        assert!(reason.contains("nope:latest"), "{reason}");
        let (code, _) = classify_error_body(
            r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#,
            "m",
        );
        assert_eq!(code, TurnErrorCode::OllamaBusy);
        let (code, reason) = classify_error_body("plain failure", "m");
        assert_eq!(code, TurnErrorCode::OllamaError);
        assert!(reason.contains("plain failure"));
    }
}
