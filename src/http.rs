//! What the HTTP APIs of the node and the coordinator share: JSON errors
//! `{"error", "code"}` with the right status, and serving with graceful
//! shutdown.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An error answered as JSON `{"error": message, "code": code}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.message, "code": self.code}));
        let mut response = (self.status, body).into_response();
        if let Some(secs) = self.retry_after {
            let value = axum::http::HeaderValue::from(secs);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, value);
        }
        response
    }
}

/// Fallback for a known path asked with a method it does not take; axum
/// still adds the `Allow` header.
pub async fn wrong_method(
    method: axum::http::Method,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
}

/// Query-string parameters; a bad one is a 422 JSON error naming it.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for QueryParams<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(q)| QueryParams(q))
            .map_err(|e| {
                let detail = std::error::Error::source(&e)
                    .map_or_else(|| e.to_string(), ToString::to_string);
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    format!("bad query string: {detail}"),
                )
            })
    }
}

/// A path segment; one that is not valid (say, not UTF-8) is a 400 JSON
/// error rather than axum's plain text.
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for PathParam<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(p)| PathParam(p))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.body_text()))
    }
}

/// Fallback for unknown paths.
pub async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

/// Binds an API listener; returns it with the address it got (port 0 picks
/// a free port).
pub async fn bind(
    addr: std::net::SocketAddr,
) -> std::io::Result<(TcpListener, std::net::SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// How long connections accepted before a shutdown may still send their
/// request and have it answered (by a stopping daemon: a 503 that says to
/// ask again) before idle connections are closed.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown` is cancelled. Then it
/// closes the listening socket at once (a client connecting now is refused:
/// it knows its request was not sent and may ask again elsewhere or later),
/// answers for [`DRAIN`] the requests of connections it had accepted, and
/// lets requests in progress finish. Closing an accepted connection that
/// had not yet delivered its request would leave its client unable to tell
/// whether the request ran. Answers go out with `TCP_NODELAY`: hyper
/// writes a response's head and body separately, and Nagle's algorithm
/// would hold the body until the client acknowledged the head (up to 40 ms
/// with delayed ACKs).
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let listener = Closing {
        inner: Some(listener),
        shutdown: shutdown.clone(),
    }
    .tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("cannot set TCP_NODELAY on an HTTP connection: {e}");
        }
    });
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN).await;
        })
        .await;
    if let Err(e) = result {
        log::error!("HTTP server failed: {e}");
    }
}

/// A listener that closes its socket when `shutdown` is cancelled, having
/// taken the connections already waiting in its backlog.
struct Closing {
    inner: Option<TcpListener>,
    shutdown: CancellationToken,
}

impl axum::serve::Listener for Closing {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(inner) = self.inner.as_mut() else {
                return std::future::pending().await;
            };
            if self.shutdown.is_cancelled() {
                // What the kernel already accepted is taken, then the
                // socket goes: later connections are refused.
                let waiting = tokio::time::timeout(
                    std::time::Duration::from_millis(1),
                    axum::serve::Listener::accept(inner),
                );
                match waiting.await {
                    Ok(connection) => return connection,
                    Err(_) => self.inner = None,
                }
                continue;
            }
            tokio::select! {
                connection = axum::serve::Listener::accept(inner) => return connection,
                _ = self.shutdown.cancelled() => {}
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.inner {
            Some(inner) => inner.local_addr(),
            None => Err(std::io::Error::other("the listener is closed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that connected just before a shutdown (a chat during a
    /// restart) gets an answer to the request it sends next; one that
    /// connects after it is refused, so that it knows nothing was sent.
    #[tokio::test]
    async fn a_connection_accepted_before_shutdown_is_answered_and_later_ones_are_refused() {
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let shutdown = CancellationToken::new();
        let router = Router::new().route("/", axum::routing::get(|| async { "answered" }));
        let server = tokio::spawn(serve(listener, router, shutdown.clone()));
        let mut early = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let late = tokio::net::TcpStream::connect(addr).await;
        assert_eq!(
            late.map(|_| ()).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        early
            .write_all(b"GET / HTTP/1.1\r\nHost: pifleet\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        early.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("answered"),
            "{answer:?}"
        );
        server.await.unwrap();
    }
}
