//! Chats as the three APIs answer them (pifleet's `POST /v1/chat`, OpenAI's
//! `POST /v1/chat/completions`, Ollama's `POST /api/chat`): a [`ChatStream`]
//! yields the answer's text as the node generates it, then the whole answer
//! or an error. Each API encodes the pieces in its own shape; this module
//! sends the request, bounds the wait, counts the outcome and turns the
//! pieces into a response body.
//!
//! An error known before the first piece is answered with an HTTP status
//! (the stream has not started); one that comes later ends the stream with
//! an error event the client can see. A client that goes away drops the
//! stream, and the coordinator cancels the turn on its node.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{ApiError, ApiState};
use crate::coordinator::core::{ApiRequest, ChatCall, CoreError};
use crate::coordinator::metrics::CoordinatorMetrics;
use crate::protocol::{ChatAnswer, ChatMessage};

/// One piece of a chat's answer.
pub(super) enum Piece {
    /// Text as it was generated.
    Delta(String),
    /// The whole answer (its text, already streamed, is repeated here).
    Done(ChatAnswer),
    Failed(ApiError),
}

/// A chat's answer, piece by piece.
pub(super) struct ChatStream {
    deltas: Option<mpsc::UnboundedReceiver<String>>,
    answer: Option<oneshot::Receiver<Result<ChatAnswer, CoreError>>>,
    deadline: Instant,
    limit: Duration,
    started: std::time::Instant,
    metrics: Arc<CoordinatorMetrics>,
    /// The outcome was counted.
    counted: bool,
}

impl ApiState {
    /// Asks the coordinator for a chat with `agent`; `streamed` chats yield
    /// their text as it comes.
    pub(super) async fn start_chat(
        &self,
        agent: String,
        messages: Vec<ChatMessage>,
        memory: bool,
        streamed: bool,
    ) -> ChatStream {
        let (tx, rx) = oneshot::channel();
        let (deltas_tx, deltas) = match streamed {
            true => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let call = ChatCall {
            messages,
            memory,
            deltas: deltas_tx,
        };
        let request = ApiRequest::Chat {
            agent,
            call,
            reply: tx,
        };
        // Sent or not, the stream then says what became of it.
        let answer = self.requests.send(request).await.ok().map(|_| rx);
        ChatStream {
            deltas,
            answer,
            deadline: Instant::now() + self.chat_timeout,
            limit: self.chat_timeout,
            started: std::time::Instant::now(),
            metrics: self.metrics.clone(),
            counted: false,
        }
    }
}

impl ChatStream {
    /// The next piece; `None` after `Done` or `Failed`.
    pub(super) async fn next(&mut self) -> Option<Piece> {
        if let Some(deltas) = &mut self.deltas {
            match tokio::time::timeout_at(self.deadline, deltas.recv()).await {
                Ok(Some(text)) => return Some(Piece::Delta(text)),
                // The turn ended: its outcome follows.
                Ok(None) => self.deltas = None,
                Err(_) => return Some(self.fail(self.timed_out())),
            }
        }
        let answer = self.answer.take();
        let Some(answer) = answer else {
            if self.counted {
                return None;
            }
            return Some(self.fail(CoreError::Stopping.into()));
        };
        let piece = match tokio::time::timeout_at(self.deadline, answer).await {
            Ok(Ok(Ok(answer))) => {
                self.count("ok");
                Piece::Done(answer)
            }
            Ok(Ok(Err(error))) => self.fail(error.into()),
            Ok(Err(_)) => self.fail(CoreError::Stopping.into()),
            Err(_) => self.fail(self.timed_out()),
        };
        Some(piece)
    }

    /// The whole answer (a chat that was not streamed).
    pub(super) async fn answer(mut self) -> Result<ChatAnswer, ApiError> {
        while let Some(piece) = self.next().await {
            match piece {
                Piece::Delta(_) => {} // only a streamed chat has them
                Piece::Done(answer) => return Ok(answer),
                Piece::Failed(error) => return Err(error),
            }
        }
        Err(CoreError::Stopping.into())
    }

    fn timed_out(&self) -> ApiError {
        let message = format!("no answer within {}s", self.limit.as_secs());
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
    }

    fn fail(&mut self, error: ApiError) -> Piece {
        self.count(error.code);
        self.deltas = None;
        self.answer = None;
        Piece::Failed(error)
    }

    fn count(&mut self, outcome: &str) {
        if !self.counted {
            self.counted = true;
            let seconds = self.started.elapsed().as_secs_f64();
            self.metrics.chat(outcome, seconds);
        }
    }
}

impl Drop for ChatStream {
    fn drop(&mut self) {
        // The client went away before the end.
        self.count("cancelled");
    }
}

/// How an API writes the pieces of a streamed answer.
pub(super) trait Encoder: Send + 'static {
    const CONTENT_TYPE: &'static str;
    /// The bytes for `piece`; the stream ends after `Done` and `Failed`.
    fn encode(&mut self, piece: Piece) -> Bytes;
}

/// A streamed answer: waits for its first piece, so that an error known
/// before any text (no such agent, not running, the broker away) is
/// answered with its HTTP status (by `refuse`, in the API's error shape);
/// then a 200 response whose body carries the pieces as they come.
pub(super) async fn respond<E: Encoder>(
    mut chat: ChatStream,
    mut encoder: E,
    refuse: impl FnOnce(ApiError) -> Response,
) -> Response {
    let first = match chat.next().await {
        Some(Piece::Failed(error)) => return refuse(error),
        Some(piece) => piece,
        None => return refuse(CoreError::Stopping.into()),
    };
    let ended = matches!(first, Piece::Done(_));
    let first_bytes = encoder.encode(first);
    let state = (Some(first_bytes), chat, encoder, ended);
    let body =
        futures_util::stream::unfold(state, |(first, mut chat, mut encoder, ended)| async move {
            if let Some(bytes) = first {
                return Some((Ok::<_, Infallible>(bytes), (None, chat, encoder, ended)));
            }
            if ended {
                return None;
            }
            let piece = chat.next().await?;
            let ended = matches!(piece, Piece::Done(_) | Piece::Failed(_));
            let bytes = encoder.encode(piece);
            Some((Ok(bytes), (None, chat, encoder, ended)))
        });
    (
        [
            (header::CONTENT_TYPE, E::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-cache"),
            // A reverse proxy (nginx) passes each piece on at once.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// One server-sent event.
pub(super) fn sse(event: Option<&str>, data: &str) -> String {
    match event {
        Some(event) => format!("event: {event}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

/// pifleet's own events (`POST /v1/chat` with `"stream": true`):
/// `delta` `{"content"}`, then `done` (the non-streamed answer's JSON) or
/// `error` `{"error", "code"}`.
pub(super) struct NativeSse;

impl Encoder for NativeSse {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn encode(&mut self, piece: Piece) -> Bytes {
        let event = match piece {
            Piece::Delta(content) => sse(Some("delta"), &json!({ "content": content }).to_string()),
            Piece::Done(answer) => sse(Some("done"), &json!(answer).to_string()),
            Piece::Failed(e) => sse(
                Some("error"),
                &json!({"error": e.message, "code": e.code}).to_string(),
            ),
        };
        Bytes::from(event)
    }
}
