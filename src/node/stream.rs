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
    pub(super) fn send(&mut self, content: String) {
        self.replies.send(ReplyBody::TurnChunk(TurnChunk {
            agent: self.agent.clone(),
            seq: self.sent,
            content,
        }));
        self.sent += 1;
    }
}

/// Reads Ollama's stream to its `done` message, handing the text to `send`
/// as it comes, coalesced over `window`; the whole answer and its usage. A
/// stream that breaks off or ends without `done` is an error (its chunks
/// are then a partial answer the coordinator discards).
///
/// Known limit of ollama-rs 0.3.6's streaming chat, which this reads: a
/// network read that splits a multi-byte character is dropped with its
/// lines, and an `{"error"}` line is skipped (the stream then ends without
/// `done`, an error here). Ollama writes each line at once, so on a LAN a
/// line rarely spans two reads.
pub(super) async fn relay(
    ollama: &OllamaClient,
    mut stream: ChatMessageResponseStream,
    window: Duration,
    mut send: impl FnMut(String),
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
            .map(|t| t + window);
        let item = tokio::select! {
            item = stream.next() => item,
            _ = sleep_until(flush_at) => {
                send(std::mem::take(&mut pending));
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
                send(pending);
            }
            return Ok((text, usage_of(response.final_data)));
        }
        let due = last_sent.is_none_or(|t| t.elapsed() >= window);
        if due && !pending.is_empty() {
            send(std::mem::take(&mut pending));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Ollama's lines `(ms after the start, content, done)`, as a stream.
    fn answer(lines: &'static [(u64, &'static str, bool)]) -> ChatMessageResponseStream {
        let start = Instant::now();
        Box::pin(futures_util::stream::unfold(0, move |i| async move {
            let (at, content, done) = *lines.get(i)?;
            tokio::time::sleep_until(start + Duration::from_millis(at)).await;
            let line = serde_json::json!({
                "model": "m", "created_at": "2026-12-02T00:00:00Z", "done": done,
                "message": {"role": "assistant", "content": content},
            });
            Some((
                Ok(serde_json::from_value(line).expect("a chat line")),
                i + 1,
            ))
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_token_goes_at_once_and_later_ones_are_coalesced_over_the_window() {
        let ollama = OllamaClient::new(&"http://127.0.0.1:1".parse().unwrap());
        let lines = &[
            (0, "a", false),
            (10, "b", false),
            (20, "c", false),
            (70, "d", false),
            (80, "e", true),
        ];
        let start = Instant::now();
        let mut sent = Vec::new();
        let window = Duration::from_millis(50);
        let (text, _) = relay(&ollama, answer(lines), window, |chunk| {
            sent.push((start.elapsed().as_millis(), chunk))
        })
        .await
        .unwrap();
        assert_eq!(text, "abcde");
        // "a" at once; "bc" when the window since "a" ends; "de" with done.
        let want = [(0, "a"), (50, "bc"), (80, "de")].map(|(t, c)| (t, c.to_owned()));
        assert_eq!(sent, want);
        // Without a window, every piece is a chunk.
        let mut each = Vec::new();
        relay(&ollama, answer(lines), Duration::ZERO, |c| each.push(c))
            .await
            .unwrap();
        assert_eq!(each, ["a", "b", "c", "d", "e"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ends_without_done_is_an_error() {
        let ollama = OllamaClient::new(&"http://127.0.0.1:1".parse().unwrap());
        let outcome = relay(
            &ollama,
            answer(&[(0, "half", false)]),
            Duration::ZERO,
            |_| {},
        )
        .await;
        let error = outcome.unwrap_err();
        assert_eq!(error.code, TurnErrorCode::OllamaError);
        assert!(
            error.reason.contains("before the answer was done"),
            "{}",
            error.reason
        );
    }
}
