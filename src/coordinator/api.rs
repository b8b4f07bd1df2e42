//! The coordinator's HTTP API (docs/API.md, contract). Handlers validate input
//! (422), enforce the body limit (413) and the bearer token (401), then ask
//! the coordinator task by sending it an [`ApiRequest`] (typed data: what
//! to do and where its answer goes; the answer leaves once the request's
//! store batch commits). The core answers in domain terms
//! ([`CoreError`]); the `From<CoreError> for ApiError` impl here is the only
//! place HTTP statuses are chosen. Errors are JSON `{"error", "code"}`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

#[cfg(test)]
use super::core::StoreFault;
use super::core::{Answer, ApiRequest, CoreError};
use super::metrics::CoordinatorMetrics;
use crate::http::{no_route, wrong_method, ApiError, PathParam, QueryParams};
use crate::protocol::{
    normalize_model, AgentError, AgentSpec, ChatMessage, JobState, Role, TurnErrorCode,
};

/// `Retry-After` of a 503 caused by the store or the broker.
const STORE_RETRY_AFTER_SECS: u64 = 5;
/// `Retry-After` of a 503 from a coordinator that is stopping.
const STOPPING_RETRY_AFTER_SECS: u64 = 2;

/// The HTTP face of a domain error: the one place statuses are chosen.
impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> ApiError {
        let message = e.to_string();
        match e {
            CoreError::NotFound(_) => ApiError::not_found(message),
            CoreError::Conflict { code, .. } => ApiError::new(StatusCode::CONFLICT, code, message),
            CoreError::QueueFull {
                retry_after_secs, ..
            } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
                .retry_after(retry_after_secs),
            CoreError::NotRunning {
                retry_after_secs, ..
            } => {
                let error = ApiError::unavailable("agent_not_running", message);
                match retry_after_secs {
                    Some(secs) => error.retry_after(secs),
                    None => error,
                }
            }
            CoreError::TooLarge(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
            }
            CoreError::Turn {
                code,
                retry_after_secs,
                ..
            } => {
                let status = match code {
                    TurnErrorCode::Timeout | TurnErrorCode::Expired => StatusCode::GATEWAY_TIMEOUT,
                    TurnErrorCode::OllamaBusy
                    | TurnErrorCode::AgentNotAssigned
                    | TurnErrorCode::Released
                    | TurnErrorCode::ShuttingDown
                    | TurnErrorCode::Fenced
                    | TurnErrorCode::Forgotten => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_GATEWAY,
                };
                let error = ApiError::new(status, code.as_str(), message);
                match retry_after_secs {
                    Some(secs) => error.retry_after(secs),
                    None => error,
                }
            }
            // A full or failing disk: nothing was done, and the
            // coordinator recovers by itself once it can write again.
            CoreError::Store(_) => {
                ApiError::unavailable("store", message).retry_after(STORE_RETRY_AFTER_SECS)
            }
            // systemd starts it again (an upgrade, a restart): ask again.
            CoreError::Stopping => {
                ApiError::unavailable("stopping", message).retry_after(STOPPING_RETRY_AFTER_SECS)
            }
            CoreError::NoBroker => {
                ApiError::unavailable("no_broker", message).retry_after(STORE_RETRY_AFTER_SECS)
            }
        }
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub requests: mpsc::Sender<ApiRequest>,
    pub ready: Arc<AtomicBool>,
    /// False while the store cannot write.
    pub store_ok: Arc<AtomicBool>,
    pub metrics: Arc<CoordinatorMetrics>,
    pub token: Option<String>,
    pub max_body: usize,
    pub chat_timeout: Duration,
    /// Whether this coordinator leads; a follower passes requests on.
    pub leadership: Arc<super::leader::Leadership>,
}

fn respond<T: Serialize>(status: StatusCode, answer: Result<T, CoreError>) -> Response {
    match answer {
        Ok(body) => (status, Json(body)).into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

impl ApiState {
    /// Sends the request `make` builds to the coordinator task and answers
    /// its result with `status` (or its error).
    async fn call<T: Serialize + Send + 'static>(
        &self,
        status: StatusCode,
        make: impl FnOnce(Answer<T>) -> ApiRequest,
    ) -> Response {
        respond(status, self.ask(make).await)
    }

    /// Sends the request `make` builds; its result.
    async fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(Answer<T>) -> ApiRequest,
    ) -> Result<T, CoreError> {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(make(tx)).await.is_err() {
            return Err(CoreError::Stopping);
        }
        rx.await.unwrap_or(Err(CoreError::Stopping))
    }
}

pub fn router(state: ApiState) -> Router {
    let max_body = state.max_body;
    let v1 = Router::new()
        .route("/status", get(status))
        .route("/nodes", get(nodes))
        .route("/nodes/{node}", get(node).delete(forget_node))
        .route("/nodes/{node}/drain", post(drain))
        .route("/nodes/{node}/uncordon", post(uncordon))
        .route("/agents", get(agents).post(create_agent))
        .route("/agents/{name}", get(agent).delete(delete_agent))
        .route("/agents/{name}/jobs", post(submit_job).get(agent_jobs))
        .route("/chat", post(chat))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/events", get(events))
        .route("/pulls", get(pulls).post(pull))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .merge(openai::routes(state.clone()))
        .method_not_allowed_fallback(wrong_method);
    Router::new()
        .route(
            "/health",
            get(|| async { Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})) }),
        )
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .merge(ollama::routes(state.clone()))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            proxy::follow_leader,
        ))
        .with_state(state)
}

/// Compares without stopping at the first difference.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiState {
    /// The API token, if one is set, must come as `Authorization: Bearer`.
    fn check_token(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.is_some_and(|g| same_secret(g.trim().as_bytes(), token.as_bytes())) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this API needs \"Authorization: Bearer <token>\" (set PIFLEET_TOKEN for the CLI)",
        ))
    }
}

async fn require_token(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    if let Err(e) = s.check_token(request.headers()) {
        let mut response = e.into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    next.run(request).await
}

/// A JSON body: any content type, size-limited (413), invalid → 422.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "request body exceeds api.max_body_bytes",
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_body", rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| invalid(format!("body is not the expected JSON: {e}")))
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
}

/// Agent names: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_agent_name(name: &str) -> Result<(), ApiError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(invalid(format!(
            "name {name:?} must match [a-z0-9][a-z0-9_-]{{0,62}}: lowercase letters, digits, '_' and '-', at most 63"
        )))
    }
}

const MAX_TEXT: usize = 128 * 1024;

fn validate_text(field: &str, text: &str, allow_empty: bool) -> Result<(), ApiError> {
    if !allow_empty && text.trim().is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    if text.len() > MAX_TEXT {
        return Err(invalid(format!("{field} is longer than {MAX_TEXT} bytes")));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAgent {
    name: String,
    model: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Most agents one request creates.
const MAX_BULK: u64 = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentList {
    agents: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentCount {
    count: u64,
    prefix: String,
    model: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn parse_body<T: DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_json::from_value(body).map_err(|e| invalid(format!("body is not the expected JSON: {e}")))
}

/// The agents of a list or count body that are valid, and an error for
/// each listed agent that is not. A bad count body is refused whole.
fn bulk_specs(body: Value) -> Result<(Vec<AgentSpec>, Vec<AgentError>), ApiError> {
    if body.get("count").is_some() {
        let b: AgentCount = parse_body(body)?;
        if !(1..=MAX_BULK).contains(&b.count) {
            return Err(invalid(format!(
                "count must be 1 to {MAX_BULK} (got {})",
                b.count
            )));
        }
        let specs = (1..=b.count)
            .map(|i| {
                validate_new_agent(NewAgent {
                    name: format!("{}-{i}", b.prefix),
                    model: b.model.clone(),
                    system: b.system.clone(),
                    labels: b.labels.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((specs, Vec::new()));
    }
    let AgentList { agents } = parse_body(body)?;
    if agents.is_empty() || agents.len() as u64 > MAX_BULK {
        return Err(invalid(format!(
            "agents must list 1 to {MAX_BULK} agents (got {})",
            agents.len()
        )));
    }
    let mut specs = Vec::with_capacity(agents.len());
    let mut rejected = Vec::new();
    for (i, agent) in agents.into_iter().enumerate() {
        let name = agent
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("agents[{i}]"), str::to_owned);
        match parse_body::<NewAgent>(agent).and_then(validate_new_agent) {
            Ok(spec) => specs.push(spec),
            Err(e) => rejected.push(AgentError {
                name,
                code: e.code.to_owned(),
                error: e.message,
            }),
        }
    }
    Ok((specs, rejected))
}

fn validate_new_agent(body: NewAgent) -> Result<AgentSpec, ApiError> {
    validate_agent_name(&body.name)?;
    let model = body.model.trim();
    if !crate::protocol::is_model_name(model) {
        return Err(invalid(format!(
            "model {:?} is not an Ollama model name such as \"llama3.2\"",
            body.model
        )));
    }
    if let Some(system) = &body.system {
        validate_text("system", system, true)?;
    }
    for (k, v) in &body.labels {
        if k.is_empty() || k.len() > 63 || v.len() > 63 {
            return Err(invalid(format!(
                "label {k:?}={v:?}: names must be 1 to 63 characters, values at most 63"
            )));
        }
    }
    Ok(AgentSpec {
        name: body.name,
        model: normalize_model(model),
        system: body.system,
        labels: body.labels,
    })
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    agent: String,
    messages: Vec<RawMessage>,
    /// Server-sent events as the answer is generated.
    #[serde(default)]
    stream: bool,
}

fn validate_messages(raw: Vec<RawMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if raw.is_empty() {
        return Err(invalid("messages must not be empty"));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = Role::parse(&m.role).ok_or_else(|| {
                invalid(format!(
                    "messages[{i}].role {:?} is not one of system, user, assistant, tool",
                    m.role
                ))
            })?;
            validate_text(&format!("messages[{i}].content"), &m.content, false)?;
            Ok(ChatMessage::new(role, m.content))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullBody {
    model: String,
    #[serde(default)]
    nodes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobBody {
    message: String,
    #[serde(default)]
    priority: i64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    max_parallel: Option<usize>,
    deadline_secs: Option<u64>,
}

#[derive(Deserialize)]
struct ListQuery {
    agent: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
}

async fn ready(State(s): State<ApiState>) -> Result<Json<Value>, ApiError> {
    if !s.ready.load(Ordering::Relaxed) {
        Err(ApiError::unavailable(
            "not_ready",
            "the MQTT broker is not connected",
        ))
    } else if s.leadership.shared && !s.leadership.acting() {
        Err(ApiError::unavailable(
            "not_ready",
            "the leader's lease was not renewed in time; it steps down",
        )
        .retry_after(2))
    } else if !s.store_ok.load(Ordering::Relaxed) {
        Err(ApiError::unavailable(
            "not_ready",
            "the store cannot write (is its disk full?); see the coordinator's log",
        )
        .retry_after(STORE_RETRY_AFTER_SECS))
    } else {
        let mut body = s.leadership.describe();
        body["ready"] = json!(true);
        Ok(Json(body))
    }
}

/// The gauges are set from the status `GET /v1/status` answers, then the
/// whole registry is encoded.
async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    // Observed on the coordinator task, so scrapes see states in order.
    let observed = s.ask(|reply| ApiRequest::Observe { reply });
    if let Err(e) = observed.await {
        return ApiError::from(e).into_response();
    }
    crate::metrics::exposition(&s.metrics.registry, &headers)
}

/// Counts requests by route pattern, method and status. A `route_layer`:
/// it sees the requests that matched a route (answers 404 and 405 from the
/// fallbacks are not counted).
async fn count_requests(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let method = request.method().clone();
    let response = next.run(request).await;
    s.metrics
        .http_request(&route, method.as_str(), response.status().as_u16());
    response
}

async fn status(State(s): State<ApiState>, QueryParams(q): QueryParams<ListQuery>) -> Response {
    let events = q.limit.unwrap_or(10).min(1000);
    s.call(StatusCode::OK, |reply| ApiRequest::Status { events, reply })
        .await
}

async fn nodes(State(s): State<ApiState>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::Nodes { reply })
        .await
}

async fn node(State(s): State<ApiState>, PathParam(node): PathParam<String>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::Node { node, reply })
        .await
}

async fn drain(
    State(s): State<ApiState>,
    PathParam(node): PathParam<String>,
    body: Bytes,
) -> Response {
    let body: DrainBody = if body.iter().all(u8::is_ascii_whitespace) {
        DrainBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return invalid(format!("body is not the expected JSON: {e}")).into_response()
            }
        }
    };
    if body.max_parallel == Some(0) {
        return invalid("max_parallel must be at least 1").into_response();
    }
    let deadline = body.deadline_secs.map(Duration::from_secs);
    let max_parallel = body.max_parallel;
    s.call(StatusCode::OK, |reply| ApiRequest::Drain {
        node,
        max_parallel,
        deadline,
        reply,
    })
    .await
}

async fn uncordon(State(s): State<ApiState>, PathParam(node): PathParam<String>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::Uncordon { node, reply })
        .await
}

async fn forget_node(State(s): State<ApiState>, PathParam(node): PathParam<String>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::ForgetNode {
        node,
        reply,
    })
    .await
}

async fn agents(State(s): State<ApiState>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::Agents { reply })
        .await
}

async fn agent(State(s): State<ApiState>, PathParam(name): PathParam<String>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::Agent { name, reply })
        .await
}

/// One agent (`{"name", "model", ...}`: 201 with the agent), a list
/// (`{"agents": [...]}`) or a count (`{"count", "prefix", "model", ...}`,
/// named `prefix-1` to `prefix-N`): 200 with what was created and, per
/// agent, why the others were not.
async fn create_agent(
    State(s): State<ApiState>,
    body: Result<JsonBody<Value>, ApiError>,
) -> Response {
    let body = match body {
        Ok(JsonBody(body)) => body,
        Err(e) => return e.into_response(),
    };
    if body.get("agents").is_some() || body.get("count").is_some() {
        let (specs, rejected) = match bulk_specs(body) {
            Ok(v) => v,
            Err(e) => return e.into_response(),
        };
        return s
            .call(StatusCode::OK, |reply| ApiRequest::CreateAgents {
                specs,
                rejected,
                reply,
            })
            .await;
    }
    let spec = match parse_body::<NewAgent>(body).and_then(validate_new_agent) {
        Ok(spec) => spec,
        Err(e) => return e.into_response(),
    };
    s.call(StatusCode::CREATED, |reply| ApiRequest::CreateAgent {
        spec,
        reply,
    })
    .await
}

async fn delete_agent(State(s): State<ApiState>, PathParam(name): PathParam<String>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::DeleteAgent {
        name,
        reply,
    })
    .await
}

async fn chat(State(s): State<ApiState>, body: Result<JsonBody<ChatBody>, ApiError>) -> Response {
    let checked = body.and_then(|JsonBody(b)| {
        validate_agent_name(&b.agent)?;
        Ok((b.agent, validate_messages(b.messages)?, b.stream))
    });
    let (agent, messages, streamed) = match checked {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let chat = s.start_chat(agent, messages, true, streamed).await;
    if streamed {
        return stream::respond(chat, stream::NativeSse, IntoResponse::into_response).await;
    }
    match chat.answer().await {
        Ok(answer) => (StatusCode::OK, Json(answer)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn submit_job(
    State(s): State<ApiState>,
    PathParam(agent): PathParam<String>,
    body: Result<JsonBody<JobBody>, ApiError>,
) -> Response {
    let body = match body {
        Ok(JsonBody(b)) => b,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = validate_text("message", &body.message, false) {
        return e.into_response();
    }
    if !(-1000..=1000).contains(&body.priority) {
        return invalid(format!(
            "priority must be between -1000 and 1000 (got {})",
            body.priority
        ))
        .into_response();
    }
    s.call(StatusCode::ACCEPTED, |reply| ApiRequest::SubmitJob {
        agent,
        message: body.message,
        priority: body.priority,
        reply,
    })
    .await
}

async fn agent_jobs(
    s: State<ApiState>,
    PathParam(agent): PathParam<String>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Response {
    list_jobs(s, Some(agent), q).await
}

async fn jobs(s: State<ApiState>, QueryParams(q): QueryParams<ListQuery>) -> Response {
    let agent = q.agent.clone();
    list_jobs(s, agent, q).await
}

async fn list_jobs(State(s): State<ApiState>, agent: Option<String>, q: ListQuery) -> Response {
    let state = match q.state.as_deref() {
        None => None,
        Some(state) => match JobState::ALL.into_iter().find(|s| s.as_str() == state) {
            Some(known) => Some(known),
            None => {
                let known: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                return invalid(format!(
                    "state {state:?} is not one of {}",
                    known.join(", ")
                ))
                .into_response();
            }
        },
    };
    let limit = q.limit.unwrap_or(100).min(10_000);
    s.call(StatusCode::OK, |reply| ApiRequest::Jobs {
        agent,
        state,
        limit,
        reply,
    })
    .await
}

async fn job(State(s): State<ApiState>, PathParam(id): PathParam<String>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::Job { id, reply })
        .await
}

async fn events(State(s): State<ApiState>, QueryParams(q): QueryParams<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(1000);
    s.call(StatusCode::OK, |reply| ApiRequest::Events { limit, reply })
        .await
}

async fn pulls(State(s): State<ApiState>) -> Response {
    s.call(StatusCode::OK, |reply| ApiRequest::Pulls { reply })
        .await
}

async fn pull(State(s): State<ApiState>, body: Result<JsonBody<PullBody>, ApiError>) -> Response {
    let checked = body.and_then(|JsonBody(b)| {
        if !crate::protocol::is_model_name(&b.model) {
            return Err(invalid(format!(
                "model {:?} is not a model name such as \"llama3.2\" or \"qwen2.5:0.5b\"",
                b.model
            )));
        }
        Ok((normalize_model(&b.model), b.nodes))
    });
    let (model, nodes) = match checked {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    s.call(StatusCode::ACCEPTED, |reply| ApiRequest::Pull {
        model,
        nodes,
        reply,
    })
    .await
}

mod compat;
mod ollama;
mod openai;
mod proxy;
mod stream;

#[cfg(test)]
mod router_tests;

#[cfg(test)]
mod tests;
