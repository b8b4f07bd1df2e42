//! The HTTP API in-process: the real router and a real core (on a
//! temporary store), driven with `oneshot` requests. No broker, no ports.

use axum::body::Body;
use axum::http::Request as HttpRequest;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::config::CoordinatorConfig;
use crate::coordinator::core::{Coordinator, Now};
use crate::coordinator::store::tests::Place;
use crate::protocol::{AgentState, AgentView, AgentsCreated};

/// A router whose calls run on a core of their own, as in the daemon.
fn api(token: Option<&str>) -> (Router, Place) {
    api_with(token, |_| {})
}

fn api_with(token: Option<&str>, tweak: impl FnOnce(&mut CoordinatorConfig)) -> (Router, Place) {
    let place = Place::from_env();
    let mut config = CoordinatorConfig::with_defaults("unused.db".into());
    tweak(&mut config);
    let store = place.open(config.history_limit);
    let metrics = Arc::new(CoordinatorMetrics::new());
    let mut core = Coordinator::load(config, store, Now::system(), metrics.clone()).unwrap();
    let (tx, mut requests) = mpsc::channel::<ApiRequest>(16);
    // As the daemon's loop does: each request in a store batch of its own.
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            core.begin_batch();
            core.handle(request, Now::system());
            core.end_batch().unwrap();
        }
    });
    let state = ApiState {
        leadership: Arc::new(crate::coordinator::leader::Leadership::new(
            false,
            "test".into(),
        )),
        requests: tx,
        ready: Arc::new(AtomicBool::new(true)),
        store_ok: Arc::new(AtomicBool::new(true)),
        metrics,
        token: token.map(str::to_owned),
        max_body: 1024,
        chat_timeout: Duration::from_secs(1),
    };
    (router(state), place)
}

async fn call(router: &Router, method: &str, path: &str, body: &str) -> (u16, Value) {
    call_with(router, method, path, &[], body).await
}

/// Asserts an error answer: its status, its code, and words of its message.
fn refused(answer: (u16, Value), status: u16, code: &str, says: &str) {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

#[tokio::test]
async fn bad_agent_bodies_are_refused_with_what_is_wrong() {
    let (api, _dir) = api(None);
    let post = |body: &'static str| call(&api, "POST", "/v1/agents", body);
    refused(
        post(r#"{"name":"Bad Name","model":"llama3.2"}"#).await,
        422,
        "invalid",
        "name \"Bad Name\"",
    );
    refused(
        post(r#"{"name":"a","model":"llama3.2","colour":1}"#).await,
        422,
        "invalid",
        "colour",
    );
    refused(
        post(r#"{"name":"a","model":"no such model!"}"#).await,
        422,
        "invalid",
        "model",
    );
    refused(
        post("not json").await,
        422,
        "invalid",
        "not the expected JSON",
    );
    let big = format!(
        r#"{{"name":"a","model":"llama3.2","system":"{}"}}"#,
        "x".repeat(2000)
    );
    refused(
        call(&api, "POST", "/v1/agents", &big).await,
        413,
        "too_large",
        "max_body_bytes",
    );
}

#[tokio::test]
async fn an_agent_is_created_once_shown_and_deleted() {
    let (api, _dir) = api(None);
    let body = r#"{"name":"alice","model":"llama3.2"}"#;
    let (status, created) = call(&api, "POST", "/v1/agents", body).await;
    assert_eq!(status, 201, "{created}");
    let view: AgentView = serde_json::from_value(created).unwrap();
    assert_eq!(
        (view.state, view.model.as_str()),
        (AgentState::Pending, "llama3.2:latest")
    );
    refused(
        call(&api, "POST", "/v1/agents", body).await,
        409,
        "exists",
        "alice",
    );
    let (status, shown) = call(&api, "GET", "/v1/agents/alice", "").await;
    assert_eq!((status, shown["name"].as_str()), (200, Some("alice")));
    let (status, deleted) = call(&api, "DELETE", "/v1/agents/alice", "").await;
    assert_eq!((status, deleted["state"].as_str()), (200, Some("stopped")));
    refused(
        call(&api, "GET", "/v1/agents/alice", "").await,
        404,
        "not_found",
        "alice",
    );
}

#[tokio::test]
async fn bad_chats_jobs_and_queries_name_the_problem() {
    let (api, _dir) = api(None);
    let chat = r#"{"agent":"alice","messages":[{"role":"robot","content":"hi"}]}"#;
    refused(
        call(&api, "POST", "/v1/chat", chat).await,
        422,
        "invalid",
        "messages[0].role",
    );
    let chat = r#"{"agent":"nobody","messages":[{"role":"user","content":"hi"}]}"#;
    refused(
        call(&api, "POST", "/v1/chat", chat).await,
        404,
        "not_found",
        "nobody",
    );
    let job = r#"{"message":"x","priority":5000}"#;
    refused(
        call(&api, "POST", "/v1/agents/a/jobs", job).await,
        422,
        "invalid",
        "priority",
    );
    refused(
        call(&api, "GET", "/v1/jobs?state=dancing", "").await,
        422,
        "invalid",
        "dancing",
    );
    refused(
        call(&api, "GET", "/v1/jobs?limit=many", "").await,
        422,
        "invalid",
        "limit",
    );
    refused(
        call(&api, "GET", "/v1/nodes/nope", "").await,
        404,
        "not_found",
        "nope",
    );
    refused(
        call(
            &api,
            "POST",
            "/v1/nodes/nope/drain",
            r#"{"max_parallel":0}"#,
        )
        .await,
        422,
        "invalid",
        "max_parallel",
    );
    refused(
        call(&api, "PUT", "/v1/agents", "").await,
        405,
        "method_not_allowed",
        "PUT",
    );
    refused(
        call(&api, "GET", "/v2/agents", "").await,
        404,
        "not_found",
        "/v2/agents",
    );
}

#[tokio::test]
async fn with_a_token_v1_needs_it_and_probes_do_not() {
    let (api, _dir) = api(Some("0123456789abcdef"));
    refused(
        call(&api, "GET", "/v1/status", "").await,
        401,
        "unauthorized",
        "Bearer",
    );
    assert_eq!(call(&api, "GET", "/health", "").await.0, 200);
    assert_eq!(call(&api, "GET", "/ready", "").await.0, 200);
    let request = HttpRequest::builder()
        .uri("/v1/status")
        .header("authorization", "Bearer 0123456789abcdef")
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.clone().oneshot(request).await.unwrap().status(), 200);
}

#[tokio::test]
async fn jobs_are_accepted_until_the_queue_is_full_then_told_when_to_retry() {
    let (api, _dir) = api_with(None, |c| {
        c.queue.max_jobs_per_agent = 1;
        c.queue.retry_after_secs = 7;
    });
    let agent = r#"{"name":"alice","model":"llama3.2"}"#;
    assert_eq!(call(&api, "POST", "/v1/agents", agent).await.0, 201);
    let job = r#"{"message":"work"}"#;
    let (status, queued) = call(&api, "POST", "/v1/agents/alice/jobs", job).await;
    assert_eq!((status, queued["status"].as_str()), (202, Some("queued")));
    let request = HttpRequest::builder()
        .method("POST")
        .uri("/v1/agents/alice/jobs")
        .body(Body::from(job))
        .unwrap();
    let response = api.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let (status, shown) = call(
        &api,
        "GET",
        &format!("/v1/jobs/{}", queued["job_id"].as_str().unwrap()),
        "",
    )
    .await;
    assert_eq!((status, shown["status"].as_str()), (200, Some("queued")));
}

#[tokio::test]
async fn agents_are_created_in_bulk_by_count_or_list_with_per_agent_errors() {
    let (api, _dir) = api_with(None, |_| {});
    let post = |body: &'static str| call(&api, "POST", "/v1/agents", body);
    let (status, body) = post(r#"{"count":3,"prefix":"w","model":"llama3.2"}"#).await;
    assert_eq!(status, 200, "{body}");
    let answer: AgentsCreated = serde_json::from_value(body).unwrap();
    let names: Vec<&str> = answer.created.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["w-1", "w-2", "w-3"]);
    assert!(answer
        .created
        .iter()
        .all(|a| a.state == AgentState::Pending));
    assert!(answer.errors.is_empty());

    // A list: one new, one that exists, one twice, one invalid.
    let list = r#"{"agents":[{"name":"x","model":"llama3.2"},{"name":"w-2","model":"llama3.2"},
        {"name":"y","model":"llama3.2"},{"name":"y","model":"llama3.2"},{"name":"Bad Name","model":"llama3.2"}]}"#;
    let (status, body) = post(list).await;
    assert_eq!(status, 200, "{body}");
    let answer: AgentsCreated = serde_json::from_value(body).unwrap();
    let names: Vec<&str> = answer.created.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["x", "y"]);
    let errors: Vec<(&str, &str)> = answer
        .errors
        .iter()
        .map(|e| (e.name.as_str(), e.code.as_str()))
        .collect();
    assert_eq!(
        errors,
        [("Bad Name", "invalid"), ("w-2", "exists"), ("y", "exists")]
    );
    let (_, listed) = call(&api, "GET", "/v1/agents", "").await;
    assert_eq!(listed["agents"].as_array().unwrap().len(), 5, "{listed}");

    // A bad count body is refused whole, and the old single body still works.
    refused(
        post(r#"{"count":0,"prefix":"z","model":"llama3.2"}"#).await,
        422,
        "invalid",
        "count must be 1 to 100000",
    );
    refused(
        post(r#"{"count":2,"prefix":"Bad Name","model":"llama3.2"}"#).await,
        422,
        "invalid",
        "Bad Name-1",
    );
    refused(
        post(r#"{"agents":[]}"#).await,
        422,
        "invalid",
        "1 to 100000 agents",
    );
    let (status, body) = post(r#"{"name":"solo","model":"llama3.2"}"#).await;
    assert_eq!(
        (status, body["name"].as_str()),
        (201, Some("solo")),
        "{body}"
    );
}

async fn call_with(
    router: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let mut request = HttpRequest::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_compatible_endpoints_answer_errors_in_their_own_shapes() {
    let (api, _dir) = api(Some("0123456789abcdef"));
    let chat = r#"{"model":"nobody","messages":[{"role":"user","content":"hi"}]}"#;
    // OpenAI: {"error": {"message", "type", "code"}}, the token as Bearer.
    let (status, body) = call(&api, "POST", "/v1/chat/completions", chat).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["type"], "authentication_error", "{body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let bearer = [("authorization", "Bearer 0123456789abcdef")];
    let (status, body) = call_with(&api, "POST", "/v1/chat/completions", &bearer, chat).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let (status, body) = call_with(&api, "GET", "/v1/models", &bearer, "").await;
    assert_eq!(
        (status, body["object"].as_str()),
        (200, Some("list")),
        "{body}"
    );
    // A bad body or header: 400 naming what is wrong.
    let (status, body) = call_with(
        &api,
        "POST",
        "/v1/chat/completions",
        &bearer,
        r#"{"model":"a","messages":[{"role":"robot","content":"x"}]}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].role"),
        "{body}"
    );
    let memory = [bearer[0], ("x-pifleet-memory", "perhaps")];
    let (status, body) = call_with(&api, "POST", "/v1/chat/completions", &memory, chat).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-pifleet-memory"),
        "{body}"
    );
    // Ollama: {"error": "..."}; `/` and `/api/version` need no token.
    let (status, body) = call(&api, "GET", "/api/tags", "").await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    let (status, body) = call_with(&api, "POST", "/api/chat", &bearer, chat).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nobody"), "{body}");
    assert_eq!(call(&api, "GET", "/api/version", "").await.0, 200);
    // pifleet's own API keeps its shape.
    let (status, body) = call_with(
        &api,
        "POST",
        "/v1/pulls",
        &bearer,
        r#"{"model":"Not A Model"}"#,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid")),
        "{body}"
    );
}
