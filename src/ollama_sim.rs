//! `pifleet ollama-sim`: a stand-in for Ollama that speaks its REST API
//! (`docs/api.md` of ollama/ollama: field names, NDJSON streaming,
//! nanosecond durations, `{"error": ...}` bodies) for tests, demos and
//! benchmarks. It is never used unless asked for.
//!
//! Its answers show what it was given (how many messages, the system prompt,
//! the last user message) so tests can prove that history and system prompts
//! travel. Knobs: the models it has, tokens per second, first-token latency,
//! a failure rate, and a max-parallel limit beyond which it answers 503
//! "server busy" as Ollama does when its queue is full. `GET /_sim/stats`
//! (not an Ollama endpoint) reports the highest concurrency it saw.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::protocol::{normalize_model, now_ms, utc_timestamp};

/// The models of the seeds, offered by default.
pub const DEFAULT_MODELS: [&str; 4] = ["llama3.2", "phi3.5", "gemma2", "deepseek-coder"];

/// What the simulator offers and how it behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub models: Vec<String>,
    pub tokens_per_sec: f64,
    pub first_token: Duration,
    /// Probability in [0, 1] that a generation fails with a 500.
    pub failure_rate: f64,
    /// Generations at once beyond which it answers 503; 0 means no limit.
    pub max_parallel: u32,
    pub seed: Option<u64>,
    /// Seconds a pull takes.
    pub pull_secs: f64,
    /// Models whose pull fails.
    pub pull_fail: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: "127.0.0.1:11434".parse().expect("valid address"),
            models: DEFAULT_MODELS.iter().map(|m| m.to_string()).collect(),
            tokens_per_sec: 100.0,
            first_token: Duration::from_millis(50),
            failure_rate: 0.0,
            max_parallel: 0,
            seed: None,
            pull_secs: 0.0,
            pull_fail: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), SimError> {
        if !(self.tokens_per_sec > 0.0 && self.tokens_per_sec.is_finite()) {
            return Err(SimError::Invalid(format!(
                "--tokens-per-sec must be a positive number (got {})",
                self.tokens_per_sec
            )));
        }
        if let Some(bad) = self
            .models
            .iter()
            .find(|m| !crate::protocol::is_model_name(m))
        {
            return Err(SimError::Invalid(format!(
                "--models: {bad:?} is not a model name such as \"llama3.2\""
            )));
        }
        if !(0.0..=3600.0).contains(&self.pull_secs) {
            return Err(SimError::Invalid(format!(
                "--pull-secs must be between 0 and 3600 (got {})",
                self.pull_secs
            )));
        }
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(SimError::Invalid(format!(
                "--failure-rate must be between 0 and 1 (got {})",
                self.failure_rate
            )));
        }
        Ok(())
    }
}

/// Binds, prints `pifleet ollama-sim listening on http://ADDR` on stdout (so
/// scripts can start it on port 0) and serves until `shutdown`.
pub async fn run(config: SimConfig, shutdown: CancellationToken) -> Result<(), SimError> {
    let listener = bind(&config).await?;
    let addr = listener.local_addr().map_err(|source| SimError::Bind {
        addr: config.listen,
        source,
    })?;
    println!("pifleet ollama-sim listening on http://{addr}");
    log::info!(
        "Ollama simulator on http://{addr}: models {:?}, {} tokens/s, first token after {:?}",
        config.models,
        config.tokens_per_sec,
        config.first_token
    );
    crate::http::serve(listener, router(Sim::new(config)), shutdown).await;
    Ok(())
}

/// Binds the simulator's listener, for callers that serve it themselves.
pub async fn bind(config: &SimConfig) -> Result<TcpListener, SimError> {
    config.validate()?;
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| SimError::Bind {
            addr: config.listen,
            source,
        })
}

#[derive(Clone)]
pub struct Sim(Arc<SimState>);

pub struct SimState {
    config: SimConfig,
    models: Mutex<BTreeMap<String, ModelEntry>>,
    /// Models used recently, with when they expire from memory (unix ms).
    loaded: Mutex<BTreeMap<String, u64>>,
    rng: Mutex<StdRng>,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    generations: AtomicU64,
    rejected_busy: AtomicU64,
    failed: AtomicU64,
    /// Generations whose client went away before the end.
    cancelled: AtomicU64,
    /// Generations running now: number → system prompt (who asked).
    running: Mutex<BTreeMap<u64, String>>,
    next_id: AtomicU64,
    last_chat: Mutex<Value>,
}

#[derive(Clone)]
struct ModelEntry {
    modified_at: String,
    size: u64,
    digest: String,
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let models = config
            .models
            .iter()
            .map(|m| (normalize_model(m), model_entry(m)))
            .collect();
        Sim(Arc::new(SimState {
            config,
            models: Mutex::new(models),
            loaded: Mutex::new(BTreeMap::new()),
            rng: Mutex::new(rng),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            generations: AtomicU64::new(0),
            rejected_busy: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            running: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            last_chat: Mutex::new(Value::Null),
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn model_entry(name: &str) -> ModelEntry {
    let digest: String = {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        name.hash(&mut h);
        format!("{:016x}", h.finish()).repeat(4)
    };
    ModelEntry {
        modified_at: utc_timestamp(now_ms()),
        size: 2_019_393_189,
        digest,
    }
}

pub fn router(sim: Sim) -> Router {
    Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        .route(
            "/api/version",
            get(|| async { Json(json!({"version": "0.6.0"})) }),
        )
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/pull", post(pull))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/_sim/stats", get(stats))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
        .with_state(sim)
}

/// Ollama's error shape.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn details(name: &str) -> Value {
    let family = name
        .split([':', '.', '-'])
        .next()
        .unwrap_or(name)
        .trim_end_matches(char::is_numeric);
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M"
    })
}

async fn tags(State(sim): State<Sim>) -> Json<Value> {
    let models: Vec<Value> = lock(&sim.0.models)
        .iter()
        .map(|(name, m)| {
            json!({
                "name": name, "model": name, "modified_at": m.modified_at,
                "size": m.size, "digest": m.digest, "details": details(name)
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

async fn ps(State(sim): State<Sim>) -> Json<Value> {
    let now = now_ms();
    let models = lock(&sim.0.models).clone();
    let mut loaded = lock(&sim.0.loaded);
    loaded.retain(|_, expires| *expires > now);
    let list: Vec<Value> = loaded
        .iter()
        .filter_map(|(name, expires)| {
            let m = models.get(name)?;
            Some(json!({
                "name": name, "model": name, "size": m.size, "digest": m.digest,
                "details": details(name), "expires_at": utc_timestamp(*expires), "size_vram": 0
            }))
        })
        .collect();
    Json(json!({ "models": list }))
}

#[derive(Deserialize)]
struct ModelRequest {
    #[serde(alias = "name")]
    model: String,
    #[serde(default)]
    stream: Option<bool>,
}

/// A JSON request body, read as Ollama reads it (gin's `ShouldBindJSON`):
/// as JSON whatever its `Content-Type` says, or none (LiteLLM's Ollama
/// provider sends none). Errors are Ollama's 400 `{"error": ...}`.
struct OllamaJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OllamaJson<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| error(StatusCode::BAD_REQUEST, r.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(error(StatusCode::BAD_REQUEST, "missing request body"));
        }
        serde_json::from_slice(&bytes)
            .map(OllamaJson)
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))
    }
}

async fn show(State(sim): State<Sim>, OllamaJson(req): OllamaJson<ModelRequest>) -> Response {
    let name = normalize_model(&req.model);
    if !lock(&sim.0.models).contains_key(&name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("model '{}' not found", req.model),
        );
    }
    Json(json!({
        "modelfile": format!("# Modelfile of the pifleet Ollama simulator\nFROM {name}\n"),
        "parameters": "num_ctx 4096",
        "template": "{{ .System }}\n{{ .Prompt }}",
        "details": details(&name),
        "model_info": {"general.architecture": "llama", "general.parameter_count": 3_212_749_888u64},
        "capabilities": ["completion"]
    }))
    .into_response()
}

/// Ollama's `/api/pull`: the manifest, then one layer's bytes in ten steps
/// over `--pull-secs`, then `success`, and only then the model is listed.
/// A model of `--pull-fail` fails after the manifest, as a model missing
/// from the library does. A client that goes away stops the pull.
async fn pull(State(sim): State<Sim>, OllamaJson(req): OllamaJson<ModelRequest>) -> Response {
    const SIZE: u64 = 2_019_393_189;
    const STEPS: u64 = 10;
    let name = normalize_model(&req.model);
    let fails = sim
        .0
        .config
        .pull_fail
        .iter()
        .any(|m| normalize_model(m) == name);
    let step = Duration::from_secs_f64(sim.0.config.pull_secs / STEPS as f64);
    let failure = "pull model manifest: file does not exist";
    if req.stream == Some(false) {
        tokio::time::sleep(step * STEPS as u32).await;
        if fails {
            return error(StatusCode::INTERNAL_SERVER_ERROR, failure);
        }
        lock(&sim.0.models)
            .entry(name.clone())
            .or_insert_with(|| model_entry(&name));
        return Json(json!({"status": "success"})).into_response();
    }
    let digest = format!("sha256:{}", model_entry(&name).digest);
    // State: the step (0 manifest, 1..=STEPS bytes, then the last lines).
    let lines = futures_util::stream::unfold(0u64, move |i| {
        let (sim, name, digest) = (sim.clone(), name.clone(), digest.clone());
        async move {
            let line = match i {
                0 => json!({"status": "pulling manifest"}),
                _ if fails && i == 1 => json!({ "error": failure }),
                _ if fails => return None,
                i if i <= STEPS => {
                    tokio::time::sleep(step).await;
                    json!({"status": format!("pulling {}", &digest[7..19]), "digest": digest,
                           "total": SIZE, "completed": SIZE * i / STEPS})
                }
                i if i == STEPS + 1 => json!({"status": "verifying sha256 digest"}),
                i if i == STEPS + 2 => json!({"status": "writing manifest"}),
                i if i == STEPS + 3 => {
                    lock(&sim.0.models)
                        .entry(name.clone())
                        .or_insert_with(|| model_entry(&name));
                    json!({"status": "success"})
                }
                _ => return None,
            };
            Some((Ok::<_, Infallible>(Bytes::from(format!("{line}\n"))), i + 1))
        }
    });
    ndjson(Body::from_stream(lines))
}

fn ndjson(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: String,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
}

#[derive(Deserialize)]
struct GenerateRequest {
    model: String,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Counts a generation in flight until dropped (also when a client goes away
/// in the middle of a stream).
struct InFlight(Sim);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a generation produces, and its Ollama-style statistics. Listed in
/// `/_sim/stats` `running` (by its system prompt) while it lives; dropped
/// before `done`, it counts as cancelled (the client went away).
struct Generation {
    model: String,
    tokens: Vec<String>,
    prompt_tokens: u64,
    id: u64,
    done: bool,
    in_flight: InFlight,
}

impl Generation {
    fn new(guard: InFlight, model: String, reply: &str, prompt_tokens: u64, who: &str) -> Self {
        let id = guard.0 .0.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&guard.0 .0.running).insert(id, who.to_owned());
        Generation {
            model,
            tokens: tokenize(reply),
            prompt_tokens,
            id,
            done: false,
            in_flight: guard,
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let s = &self.in_flight.0 .0;
        lock(&s.running).remove(&self.id);
        if !self.done {
            s.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Sim {
    /// Admission: the model must exist, the parallel limit must allow one
    /// more, and the failure dice must pass.
    fn admit(&self, model: &str) -> Result<InFlight, (StatusCode, String)> {
        let s = &self.0;
        let name = normalize_model(model);
        if !lock(&s.models).contains_key(&name) {
            return Err((
                StatusCode::NOT_FOUND,
                format!("model \"{model}\" not found, try pulling it first"),
            ));
        }
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = InFlight(self.clone());
        if s.config.max_parallel > 0 && now > u64::from(s.config.max_parallel) {
            s.rejected_busy.fetch_add(1, Ordering::Relaxed);
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "server busy, please try again.  maximum pending requests exceeded".into(),
            ));
        }
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if s.config.failure_rate > 0.0 && lock(&s.rng).random::<f64>() < s.config.failure_rate {
            s.failed.fetch_add(1, Ordering::Relaxed);
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("simulated failure (failure rate {})", s.config.failure_rate),
            ));
        }
        s.generations.fetch_add(1, Ordering::Relaxed);
        lock(&s.loaded).insert(name, now_ms() + 5 * 60 * 1000);
        Ok(guard)
    }

    fn token_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.0.config.tokens_per_sec)
    }
}

impl Generation {
    fn stats(&self, sim: &Sim) -> Value {
        let c = &sim.0.config;
        let prompt = c.first_token.as_nanos() as u64;
        let eval = (self.tokens.len() as f64 / c.tokens_per_sec * 1e9) as u64;
        let load = 1_000_000;
        json!({
            "total_duration": load + prompt + eval,
            "load_duration": load,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": prompt,
            "eval_count": self.tokens.len(),
            "eval_duration": eval
        })
    }
}

/// Merges `extra` into the object `base`.
fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

/// Answers a generation either as one object after the whole generation
/// time, or as NDJSON with one chunk per token; `chunk` wraps a piece of text
/// in the endpoint's shape.
fn respond(sim: Sim, gen: Generation, stream: bool, chunk: fn(&str, &str) -> Value) -> Response {
    let created = utc_timestamp(now_ms());
    if !stream {
        let text = gen.tokens.concat();
        let delay = sim.0.config.first_token + sim.token_interval() * gen.tokens.len() as u32;
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(futures_util::stream::once(async move {
                tokio::time::sleep(delay).await;
                let done = json!({"model": gen.model, "created_at": created, "done": true, "done_reason": "stop"});
                let body = with(with(done, chunk(&gen.model, &text)), gen.stats(&sim));
                let mut gen = gen;
                gen.done = true;
                drop(gen);
                Ok::<_, Infallible>(Bytes::from(body.to_string()))
            })))
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response build failed"));
    }
    // State: (sim, generation, next token index). Token i is due at
    // first_token + i × interval from the start: timers are coarser than
    // a fast pace's interval, so each waits for its own time, not a delay.
    let start = tokio::time::Instant::now();
    let stream = futures_util::stream::unfold((sim, Some(gen), 0usize), move |(sim, gen, i)| {
        let created = created.clone();
        async move {
            let mut gen = gen?;
            let due = start + sim.0.config.first_token + sim.token_interval() * i as u32;
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            let base = json!({"model": gen.model, "created_at": created});
            if i < gen.tokens.len() {
                let line = with(
                    with(base, chunk(&gen.model, &gen.tokens[i])),
                    json!({"done": false}),
                );
                Some((
                    Ok::<_, Infallible>(Bytes::from(format!("{line}\n"))),
                    (sim, Some(gen), i + 1),
                ))
            } else {
                let done = with(
                    with(base, chunk(&gen.model, "")),
                    json!({"done": true, "done_reason": "stop"}),
                );
                let line = with(done, gen.stats(&sim));
                gen.done = true;
                Some((Ok(Bytes::from(format!("{line}\n"))), (sim, None, i + 1)))
            }
        }
    });
    ndjson(Body::from_stream(stream))
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Splits a reply into tokens: words with their following space.
fn tokenize(text: &str) -> Vec<String> {
    let mut tokens: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
    if tokens.is_empty() {
        tokens.push(String::new());
    }
    tokens
}

async fn chat(State(sim): State<Sim>, OllamaJson(req): OllamaJson<ChatRequest>) -> Response {
    let guard = match sim.admit(&req.model) {
        Ok(g) => g,
        Err((status, message)) => return error(status, message),
    };
    let model = normalize_model(&req.model);
    let created = utc_timestamp(now_ms());
    if req.messages.is_empty() {
        drop(guard);
        return Json(json!({
            "model": model, "created_at": created,
            "message": {"role": "assistant", "content": ""}, "done_reason": "load", "done": true
        }))
        .into_response();
    }
    let system = req
        .messages
        .iter()
        .find(|m| m.role == "system")
        .map(|m| m.content.clone());
    let last_user = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.clone());
    let reply = describe_input(
        &model,
        req.messages.len(),
        system.as_deref(),
        last_user.as_deref(),
    );
    *lock(&sim.0.last_chat) = json!({
        "model": model, "messages": req.messages.len(), "system": system, "last_user": last_user,
        "roles": req.messages.iter().map(|m| m.role.clone()).collect::<Vec<_>>()
    });
    let prompt_tokens = req.messages.iter().map(|m| words(&m.content) + 4).sum();
    let who = system.as_deref().unwrap_or("");
    let gen = Generation::new(guard, model, &reply, prompt_tokens, who);
    respond(
        sim,
        gen,
        req.stream.unwrap_or(true),
        |_, text| json!({"message": {"role": "assistant", "content": text}}),
    )
}

async fn generate(
    State(sim): State<Sim>,
    OllamaJson(req): OllamaJson<GenerateRequest>,
) -> Response {
    let guard = match sim.admit(&req.model) {
        Ok(g) => g,
        Err((status, message)) => return error(status, message),
    };
    let model = normalize_model(&req.model);
    if req.prompt.is_empty() {
        drop(guard);
        return Json(json!({
            "model": model, "created_at": utc_timestamp(now_ms()), "response": "", "done": true, "done_reason": "load"
        }))
        .into_response();
    }
    let messages = 1 + usize::from(req.system.is_some());
    let reply = describe_input(&model, messages, req.system.as_deref(), Some(&req.prompt));
    let prompt_tokens = words(&req.prompt) + req.system.as_deref().map_or(0, words);
    let who = req.system.as_deref().unwrap_or("");
    let gen = Generation::new(guard, model, &reply, prompt_tokens, who);
    respond(
        sim,
        gen,
        req.stream.unwrap_or(true),
        |_, text| json!({"response": text}),
    )
}

/// The simulator's answer: a sentence that shows what it was given.
fn describe_input(
    model: &str,
    messages: usize,
    system: Option<&str>,
    last_user: Option<&str>,
) -> String {
    let system = match system {
        Some(s) => format!(" with system prompt \"{s}\""),
        None => " without a system prompt".into(),
    };
    format!(
        "[{model}] received {messages} messages{system}; last user message: \"{}\"",
        last_user.unwrap_or("")
    )
}

async fn stats(State(sim): State<Sim>) -> Json<Value> {
    let s = &sim.0;
    Json(json!({
        "in_flight": s.in_flight.load(Ordering::SeqCst),
        "max_in_flight": s.max_in_flight.load(Ordering::SeqCst),
        "generations": s.generations.load(Ordering::Relaxed),
        "rejected_busy": s.rejected_busy.load(Ordering::Relaxed),
        "failed": s.failed.load(Ordering::Relaxed),
        "cancelled": s.cancelled.load(Ordering::Relaxed),
        // The system prompts of the generations running now.
        "running": lock(&s.running).values().cloned().collect::<Vec<_>>(),
        "last_chat": lock(&s.last_chat).clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_refused_naming_the_option() {
        assert!(SimConfig::default().validate().is_ok());
        let refused = |config: SimConfig| config.validate().unwrap_err().to_string();
        let models = |m: &[&str]| SimConfig {
            models: m.iter().map(|m| m.to_string()).collect(),
            ..SimConfig::default()
        };
        assert!(refused(models(&["llama3.2", ""])).contains("--models: \"\""));
        assert!(refused(models(&["two words"])).contains("--models"));
        let speed = SimConfig {
            tokens_per_sec: f64::NAN,
            ..SimConfig::default()
        };
        assert!(refused(speed).contains("--tokens-per-sec"));
        let failures = SimConfig {
            failure_rate: -0.1,
            ..SimConfig::default()
        };
        assert!(refused(failures).contains("--failure-rate"));
    }

    #[test]
    fn the_answer_shows_history_length_system_prompt_and_last_user_message() {
        let text = describe_input("llama3.2:latest", 3, Some("be brief"), Some("hello"));
        assert_eq!(
            text,
            "[llama3.2:latest] received 3 messages with system prompt \"be brief\"; last user message: \"hello\""
        );
        assert_eq!(tokenize(&text).concat(), text);
    }

    #[test]
    fn invalid_knobs_are_refused() {
        let mut c = SimConfig {
            failure_rate: 1.5,
            ..SimConfig::default()
        };
        assert!(c.validate().is_err());
        c.failure_rate = 0.1;
        c.tokens_per_sec = 0.0;
        assert!(c.validate().is_err());
    }
}
