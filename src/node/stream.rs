//! A streamed turn on the node: Ollama's answer read token by token and
//! published as [`TurnChunk`]s, coalesced so that a fast model does not cost
//! one MQTT message per token. The first piece goes at once (time to first
//! token is what a user waits for); later pieces are held until
//! `ollama.stream_window_ms` has passed since the last chunk sent. The whole
//! answer still goes in the final `TurnResult`.

use std::time::Duration;

use futures_util::StreamExt;
use ollama_rs::generation::chat::ChatMessageResponseStream;
use tokio::time::Instant;

use super::ollama::{usage_of, OllamaClient};
use crate::mqtt::Publisher;
use crate::protocol::{encode, Reply, ReplyBody, TurnChunk, TurnError, TurnErrorCode, Usage};

/// Replies a task publishes for one command before its final answer: the
/// node's reply topic, under the command's id.
#[derive(Clone)]
pub(super) struct ReplySink {
    pub publisher: Publisher,
    pub topic: String,
    /// The reply envelope (`id`, `node`, `session`, `generation`); its body
    /// is replaced by each reply.
    pub envelope: Reply,
}

impl ReplySink {
    pub(super) fn send(&self, body: ReplyBody) {
        let mut reply = self.envelope.clone();
        reply.body = body;
        if let Err(e) = self
            .publisher
            .publish(self.topic.clone(), encode(&reply), false)
        {
            log::warn!("cannot publish a reply to command {}: {e}", reply.id);
        }
    }
}

/// Where a turn's chunks go.
pub(super) struct ChunkSink {
    pub replies: ReplySink,
    pub agent: String,
    pub window: Duration,
    /// Chunks published so far (the next `seq`).
    pub sent: u32,
}

impl ChunkSink {
    /// Publishes the next chunk. One lost on the way is not lost to the
    /// client: the final result carries the whole answer, and the
    /// coordinator sends what chunks did not carry.
    fn send(&mut self, content: String) {
        self.replies.send(ReplyBody::TurnChunk(TurnChunk {
            agent: self.agent.clone(),
            seq: self.sent,
            content,
        }));
        self.sent += 1;
    }
}

/// Reads Ollama's stream to its `done` message, publishing the text as it
/// comes; the whole answer and its usage. A stream that breaks off or ends
/// without `done` is an error (its chunks are then a partial answer the
/// coordinator discards).
pub(super) async fn relay(
    ollama: &OllamaClient,
    mut stream: ChatMessageResponseStream,
    sink: &mut ChunkSink,
) -> Result<(String, Usage), TurnError> {
    let broken = |what: &str| TurnError {
        code: TurnErrorCode::OllamaError,
        reason: format!("Ollama at {} {what}", ollama.url()),
    };
    let mut text = String::new();
    let mut pending = String::new();
    let mut last_sent: Option<Instant> = None;
    loop {
        let flush_at = last_sent
            .filter(|_| !pending.is_empty())
            .map(|t| t + sink.window);
        let item = tokio::select! {
            item = stream.next() => item,
            _ = sleep_until(flush_at) => {
                sink.send(std::mem::take(&mut pending));
                last_sent = Some(Instant::now());
                continue;
            }
        };
        let response = match item {
            None => return Err(broken("ended its stream before the answer was done")),
            // ollama-rs reports a broken connection as `Err(())`; an error
            // line (`{"error": …}`) ends the stream without `done`.
            Some(Err(())) => return Err(broken("broke off its stream")),
            Some(Ok(response)) => response,
        };
        pending.push_str(&response.message.content);
        text.push_str(&response.message.content);
        if response.done {
            if !pending.is_empty() {
                sink.send(pending);
            }
            return Ok((text, usage_of(response.final_data)));
        }
        let due = last_sent.is_none_or(|t| t.elapsed() >= sink.window);
        if due && !pending.is_empty() {
            sink.send(std::mem::take(&mut pending));
            last_sent = Some(Instant::now());
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
