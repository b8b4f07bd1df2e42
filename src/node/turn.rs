//! One chat turn on the node: wait for one of `ollama.max_parallel` slots,
//! then ask Ollama, within the turn's budget (counted on this node's clock
//! from when the command arrived) and `ollama.request_timeout_secs`.

use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::metrics;
use super::ollama::OllamaClient;
use super::stream::{self, ChunkSink};
use crate::protocol::{ChatMessage, Role, TurnErrorCode, TurnResult};

/// How to run one turn's Ollama call.
pub(super) struct OllamaCall {
    pub model: String,
    pub system: Option<String>,
    /// `ollama.request_timeout`.
    pub timeout: Duration,
    /// When nobody waits for the answer any more (the turn's budget).
    pub budget_ends: Option<Instant>,
    /// Where the answer goes as it is generated (a streamed turn).
    pub sink: Option<ChunkSink>,
}

/// Runs one turn: waits for an Ollama slot, then asks Ollama, for no longer
/// than the turn's budget.
pub(super) async fn execute_turn(
    slots: &Semaphore,
    ollama: &OllamaClient,
    metrics: &metrics::NodeMetrics,
    call: OllamaCall,
    request: crate::protocol::TurnRequest,
) -> TurnResult {
    let OllamaCall {
        model,
        system,
        timeout: call_timeout,
        budget_ends,
        mut sink,
    } = call;
    let mut timeout = call_timeout;
    let Ok(_permit) = slots.acquire().await else {
        return TurnResult::failed(
            &request.agent,
            request.job,
            TurnErrorCode::ShuttingDown,
            "node stopping".into(),
        );
    };
    if let Some(ends) = budget_ends {
        let now = Instant::now();
        if ends <= now {
            let reason = format!(
                "the turn waited for an Ollama slot {} ms past its budget",
                (now - ends).as_millis()
            );
            return TurnResult::failed(&request.agent, request.job, TurnErrorCode::Expired, reason);
        }
        timeout = timeout.min(ends - now);
    }
    // Stopped by the turn's budget rather than by request_timeout?
    let budget_limited = budget_ends.is_some_and(|ends| ends < Instant::now() + call_timeout);
    let mut messages = request.messages;
    if let Some(system) = system {
        if messages.first().map(|m| m.role) != Some(Role::System) {
            messages.insert(0, ChatMessage::new(Role::System, system));
        }
    }
    let started = std::time::Instant::now();
    let outcome = match sink.as_mut() {
        None => ollama.chat(&model, messages, timeout).await,
        Some(sink) => {
            let streamed = async {
                let answer = ollama.chat_stream(&model, messages, timeout).await?;
                stream::relay(ollama, answer, sink).await
            };
            match tokio::time::timeout(timeout, streamed).await {
                Err(_) => Err(ollama.timed_out(timeout)),
                Ok(outcome) => {
                    outcome.map(|(text, usage)| (ChatMessage::new(Role::Assistant, text), usage))
                }
            }
        }
    };
    let chunks = sink.map_or(0, |s| s.sent);
    let seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok((message, usage)) => {
            metrics.ollama_request(true, seconds);
            metrics.tokens_generated.inc_by(usage.eval_count);
            TurnResult {
                agent: request.agent,
                ok: true,
                model: Some(model),
                message: Some(message),
                usage: Some(usage),
                error: None,
                job: request.job,
                chunks,
            }
        }
        Err(error) => {
            metrics.ollama_request(false, seconds);
            let error = match error.code {
                TurnErrorCode::Timeout if budget_limited => crate::protocol::TurnError {
                    code: TurnErrorCode::Expired,
                    reason: format!(
                        "no answer in time: the turn's budget ran out after {seconds:.1}s while Ollama was still answering; the call was stopped"
                    ),
                },
                _ => error,
            };
            TurnResult {
                agent: request.agent,
                ok: false,
                model: Some(model),
                message: None,
                usage: None,
                error: Some(error),
                job: request.job,
                chunks,
            }
        }
    }
}
