//! The node's local HTTP API (axum): probes for systemd, load balancers and
//! Prometheus, and the agents this node hosts.
//!
//! | path | answer |
//! |---|---|
//! | `GET /health` | 200 while the process serves |
//! | `GET /ready` | 200 while connected to the broker, 503 before and between |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /v1/agents` | `{"agents": [...]}` |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::agents::AgentView;
use super::metrics::NodeMetrics;
use crate::http::{no_route, wrong_method, ApiError};

/// Questions the API asks the node's main loop, which owns the agent table.
pub enum Query {
    Agents(oneshot::Sender<Vec<AgentView>>),
}

#[derive(Clone)]
pub struct ApiState {
    pub node: String,
    pub connected: Arc<AtomicBool>,
    pub metrics: Arc<NodeMetrics>,
    pub queries: mpsc::Sender<Query>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/agents", get(agents))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

async fn health(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!({"status": "ok", "node": s.node, "version": env!("CARGO_PKG_VERSION")}))
}

async fn ready(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    if s.connected.load(Ordering::Relaxed) {
        Ok(Json(json!({"ready": true, "node": s.node})))
    } else {
        Err(ApiError::unavailable(
            "not_ready",
            "not connected to the MQTT broker",
        ))
    }
}

async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    crate::metrics::exposition(&s.metrics.registry, &headers)
}

async fn agents(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let (tx, rx) = oneshot::channel();
    let stopped = || ApiError::unavailable("stopping", "the node is stopping");
    s.queries
        .send(Query::Agents(tx))
        .await
        .map_err(|_| stopped())?;
    let agents = rx.await.map_err(|_| stopped())?;
    Ok(Json(json!({ "agents": agents })))
}
