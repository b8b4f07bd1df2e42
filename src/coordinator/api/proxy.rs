//! A follower's API: every request but `/health` and `/ready` is passed to
//! the leader as it came (method, path, query, headers, body streamed both
//! ways, so chats stream too) and its answer comes back as the leader gave
//! it. Any client works unchanged, the official OpenAI and Ollama ones
//! included; a redirect would need clients that follow one for a POST.
//!
//! With no live leader, or one that cannot be reached, the answer is a 503
//! with `Retry-After` (ask again: a takeover takes a few seconds). A
//! request already passed on once is never passed on again (no loops
//! between coordinators that disagree for a moment on who leads).

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ApiState;
use crate::coordinator::leader::Role;
use crate::http::ApiError;

/// Marks a request a follower passed on.
const FORWARDED: &str = "x-pifleet-forwarded-by";
/// How long a takeover usually takes, for `Retry-After`.
const RETRY_AFTER_SECS: u64 = 2;

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::HOST,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHORIZATION,
        header::CONTENT_LENGTH,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with no TLS settings of its own")
    })
}

/// The middleware in front of every route.
pub async fn follow_leader(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if !s.leadership.shared || s.leadership.leads() || path == "/health" {
        return next.run(request).await;
    }
    let role = s.leadership.role();
    if path == "/ready" {
        return follower_ready(&s, &role);
    }
    let leader = match role {
        Role::Follower(Some(leader)) => leader,
        _ => return no_leader("no coordinator leads at the moment"),
    };
    if request.headers().contains_key(FORWARDED) {
        return no_leader(
            "this coordinator follows too: the coordinators disagree for a moment on who leads",
        );
    }
    forward(&leader.api, &s.leadership.id, s.chat_timeout, request).await
}

fn no_leader(message: &str) -> Response {
    ApiError::unavailable("no_leader", format!("{message}; ask again"))
        .retry_after(RETRY_AFTER_SECS)
        .into_response()
}

/// `/ready` of a follower: 200 while a leader answers for it.
fn follower_ready(s: &ApiState, role: &Role) -> Response {
    let mut body = s.leadership.describe();
    match role {
        Role::Follower(Some(_)) => {
            body["ready"] = json!(true);
            (StatusCode::OK, Json(body)).into_response()
        }
        _ => {
            body["ready"] = json!(false);
            body["error"] = json!("no coordinator leads at the moment; ask again");
            body["code"] = json!("no_leader");
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
            response
        }
    }
}

/// Passes `request` on to the leader at `base`; a leader that does not
/// answer within `timeout` (a frozen one still accepts connections) is a
/// 503.
async fn forward(base: &str, me: &str, timeout: Duration, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = client()
        .request(parts.method, format!("{base}{path}"))
        .timeout(timeout);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    out = out.header(FORWARDED, me);
    let answer = out
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await;
    match answer {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                if !hop_by_hop(name) {
                    response = response.header(name, value);
                }
            }
            response
                .body(Body::from_stream(answer.bytes_stream()))
                .unwrap_or_else(|e| no_leader(&format!("the leader's answer is not HTTP: {e}")))
        }
        Err(e) => no_leader(&format!("the leader at {base} cannot be reached ({e})")),
    }
}
