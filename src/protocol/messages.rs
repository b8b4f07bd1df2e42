//! Payloads of the MQTT contract: what a node announces, what the coordinator
//! commands and what the node replies. Plain serde types, no I/O.
//!
//! Every command carries an `id` (receivers deduplicate: QoS 1 delivers at
//! least once), the node id it is meant for (checked against the topic) and
//! the coordinator's `generation` (nodes ignore older generations). Every
//! reply and capacity message carries the node's `session`, a random id per
//! process start, so the coordinator can tell a restarted node from a late
//! message of its previous life. `docs/PROTOCOL.md` describes the exchange.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Retained payload of `{root}/nodes/{node}/status` while the node is up.
pub const STATUS_ONLINE: &str = "online";
/// Retained payload of `{root}/nodes/{node}/status` after a clean stop, and the
/// node's last will.
pub const STATUS_OFFLINE: &str = "offline";

/// The retained message on `{root}/coordinator/leader`: the coordinator
/// that leads and its term, which is the generation its commands carry.
/// Nodes ignore commands of any older generation once they read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub leader: String,
    pub term: u64,
    /// Its API URL.
    pub api: String,
}

/// The retained capacity announcement of one node (docs/PROTOCOL.md, contract).
/// Its `Default` is a node nothing is known of yet: zeros and empty strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub node: String,
    /// Random per process start; changes when the node restarts.
    pub session: String,
    /// Increases with every capacity message of one session.
    pub seq: u64,
    /// pifleet version of the node.
    pub version: String,
    pub arch: String,
    pub agent_capacity: u32,
    pub agents_running: u32,
    /// Names of the agents the node hosts, sorted, while they fit in
    /// [`super::AGENTS_INLINE_BYTES`]; left out (`None`) beyond, when the
    /// list travels as [`super::AgentUpdate`]s instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<Vec<String>>,
    /// The `seq` of the message (this one, an earlier capacity message or
    /// an agent update) that last changed or set the agent list.
    #[serde(default)]
    pub agents_rev: u64,
    /// Digest of the whole agent list ([`super::ListDigest`]).
    #[serde(default)]
    pub agents_digest: super::ListDigest,
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    /// Degrees Celsius of the SoC thermal zone; `null` where there is none.
    pub temperature_c: Option<f32>,
    /// From the Pi firmware's `get_throttled`; `null` where there is none.
    pub throttled: Option<bool>,
    /// Local Ollama models, normalised to `name:tag`.
    pub models: Vec<String>,
    pub ollama_reachable: bool,
    pub labels: BTreeMap<String, String>,
    pub draining: bool,
    /// Unix time in milliseconds when the message was made, by the node's
    /// clock (which may be wrong): for display only, never for ordering.
    pub ts: u64,
    /// The node's own temperature limit, for the scheduler.
    #[serde(default)]
    pub max_temperature_c: Option<f32>,
    /// Ollama calls the node runs at once (`ollama.max_parallel`).
    #[serde(default)]
    pub max_parallel: u32,
    /// Chat turns received and not yet answered (running or queued).
    #[serde(default)]
    pub turns_in_flight: u32,
    /// The highest coordinator generation the node has accepted.
    #[serde(default)]
    pub generation: u64,
    /// The node's fence timeout (`fence_secs`) in milliseconds: after this
    /// long without proof that the broker received its packets, the node
    /// has stopped all its agents. The coordinator waits this long after it
    /// last heard the node before it places the node's agents elsewhere.
    /// 0 (an older node) means "unknown": the coordinator's default applies.
    #[serde(default)]
    pub fence_ms: u64,
    /// The node reads batches on its command topic: a JSON array of
    /// commands in one message (docs/PROTOCOL.md, "Batches"). False (an
    /// older node): one command a message.
    #[serde(default)]
    pub batches: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuInfo {
    pub cores: u32,
    pub load1: f64,
    pub usage_pct: f32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// Who spoke a chat message (Ollama's roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The role named `name` (`system`, `user`, `assistant`, `tool`).
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }
}

/// What defines an agent wherever it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub name: String,
    /// Ollama model, normalised to `name:tag`.
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Labels a node must carry to host the agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A command from the coordinator to one node, on `{root}/nodes/{node}/cmd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per command; repeated deliveries carry the same id.
    pub id: String,
    /// The node the command is for; must equal the node in the topic.
    pub node: String,
    /// The coordinator's generation; nodes ignore older generations.
    pub generation: u64,
    #[serde(flatten)]
    pub body: CommandBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandBody {
    /// Host `agent`. `placement` increases with every placement the
    /// coordinator makes, so a late command about an older placement of the
    /// same agent can be told apart.
    Assign { agent: AgentSpec, placement: u64 },
    /// Stop hosting `agent`, unless the node holds a newer placement of it.
    Release { agent: String, placement: u64 },
    /// Mark the node draining (or not): the coordinator places nothing new
    /// there and the node says so in its capacity message.
    Drain { draining: bool },
    /// Run one chat turn for a hosted agent.
    Turn(TurnRequest),
    /// Stop turn `turn` (the id of its turn command) of `agent`, queued or
    /// running, and its Ollama call: nobody waits for its answer any more.
    Cancel { agent: String, turn: String },
    /// Pull `model` through the node's Ollama (`/api/pull`). Progress comes
    /// back as [`PullProgress`] replies; the node lists the model in its
    /// capacity once it has it.
    Pull { model: String },
    /// Host every agent of `agents`, each as `assign` would, in one step;
    /// one [`AckBatch`] answers.
    AssignBatch { agents: Vec<Assignment> },
    /// Publish the whole agent list as [`super::AgentUpdate`]s.
    ListAgents,
}

/// One agent of an [`CommandBody::AssignBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub agent: AgentSpec,
    pub placement: u64,
}

impl CommandBody {
    pub fn kind(&self) -> CommandKind {
        match self {
            CommandBody::Assign { .. } => CommandKind::Assign,
            CommandBody::Release { .. } => CommandKind::Release,
            CommandBody::Drain { .. } => CommandKind::Drain,
            CommandBody::Turn(_) => CommandKind::Turn,
            CommandBody::Cancel { .. } => CommandKind::Cancel,
            CommandBody::Pull { .. } => CommandKind::Pull,
            CommandBody::AssignBatch { .. } => CommandKind::Assign,
            CommandBody::ListAgents => CommandKind::ListAgents,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    Assign,
    Release,
    Drain,
    Turn,
    Cancel,
    Pull,
    ListAgents,
}

/// One chat turn: the whole conversation to send to Ollama. Nodes keep no
/// history; the coordinator sends the stored history with every turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRequest {
    pub agent: String,
    /// History followed by the new message(s), oldest first.
    pub messages: Vec<ChatMessage>,
    /// System prompt; sent to Ollama first unless `messages` starts with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The turn's remaining budget in milliseconds when the command was
    /// sent. The node counts it from when the command arrived, on its own
    /// monotonic clock: a turn still queued (or waiting for an Ollama slot)
    /// past it is failed with `expired` instead of run, and a running one is
    /// stopped. No wall clock crosses machines (docs/RELIABILITY.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The job this turn serves, if any (for logs and the coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Publish the answer as it is generated, in [`TurnChunk`]s, before
    /// the [`TurnResult`] (which still carries the whole answer).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// A node's answer to a command, on `{root}/nodes/{node}/reply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The id of the command answered.
    pub id: String,
    pub node: String,
    pub session: String,
    /// The generation of the command answered.
    pub generation: u64,
    #[serde(flatten)]
    pub body: ReplyBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReplyBody {
    Ack(Ack),
    AckBatch(AckBatch),
    TurnResult(TurnResult),
    TurnChunk(TurnChunk),
    PullProgress(PullProgress),
}

/// How a model pull goes (a reply to a `pull` command): sent when it
/// starts, about once a second while bytes arrive, and when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullProgress {
    pub model: String,
    pub state: PullState,
    /// Ollama's last status line ("pulling manifest", "pulling 8eeb52dfb3bb"...).
    pub status: String,
    /// Bytes of the layer being pulled, as Ollama counts them.
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub total: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullState {
    Pulling,
    Done,
    Failed,
}

impl PullState {
    pub fn as_str(self) -> &'static str {
        match self {
            PullState::Pulling => "pulling",
            PullState::Done => "done",
            PullState::Failed => "failed",
        }
    }
}

/// A piece of a streamed turn's answer, as Ollama generated it (tokens
/// coalesced over `ollama.stream_window_ms`). `seq` counts from 0 within the
/// turn: QoS 1 may deliver a chunk twice, so the receiver keeps each `seq`
/// once and in order. The pieces in order are a prefix of the final
/// [`TurnResult`]'s message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnChunk {
    pub agent: String,
    pub seq: u32,
    pub content: String,
}

/// Outcome of an assign, release or drain command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub command: CommandKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<u64>,
    pub ok: bool,
    /// Why the command was refused (or a note on an accepted one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Agents the node hosts after applying the command.
    pub agents_running: u32,
    /// Node clock (Unix ms) when the command was applied; for display only.
    #[serde(default)]
    pub ts: u64,
    /// The `seq` of the node's last message (a capacity message or an agent
    /// update, same session) when the command was applied: a message with
    /// a greater `seq` reflects it. Reports are ordered by session and
    /// `seq`, never by `ts`.
    #[serde(default)]
    pub seq: u64,
}

/// Outcomes of an [`CommandBody::AssignBatch`], one per agent in its order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AckBatch {
    pub command: CommandKind,
    pub acks: Vec<AckItem>,
    /// As in [`Ack`]: after the whole batch.
    pub agents_running: u32,
    #[serde(default)]
    pub ts: u64,
    #[serde(default)]
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AckItem {
    pub agent: String,
    pub placement: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Outcome of a chat turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnResult {
    pub agent: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TurnError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// How many [`TurnChunk`]s the node published before this result (a
    /// streamed turn).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunks: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl TurnResult {
    pub fn failed(agent: &str, job: Option<String>, code: TurnErrorCode, reason: String) -> Self {
        TurnResult {
            agent: agent.to_owned(),
            ok: false,
            model: None,
            message: None,
            usage: None,
            error: Some(TurnError { code, reason }),
            job,
            chunks: 0,
        }
    }
}

/// Token counts and durations (nanoseconds) as Ollama reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_eval_count: u64,
    pub eval_count: u64,
    pub total_duration: u64,
    pub load_duration: u64,
    pub prompt_eval_duration: u64,
    pub eval_duration: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnError {
    pub code: TurnErrorCode,
    pub reason: String,
}

/// Why a turn failed; stable names for scripts and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnErrorCode {
    /// Nothing answered at the node's Ollama URL.
    OllamaUnreachable,
    /// Ollama does not have the agent's model.
    ModelMissing,
    /// Ollama answered 503 "server busy".
    OllamaBusy,
    /// Ollama did not answer within `ollama.request_timeout_secs`.
    Timeout,
    /// Any other error Ollama reported.
    OllamaError,
    /// The node does not host the agent.
    AgentNotAssigned,
    /// The agent was released before its queued turn ran.
    Released,
    /// The turn's deadline passed while it waited in the queue.
    Expired,
    /// The node is stopping and did not run or finish the turn.
    ShuttingDown,
    /// The node lost the broker for longer than its fence timeout.
    Fenced,
    /// The turn arrived again; the node ran it but no longer holds its
    /// answer. Running it again is safe and the quickest way to an answer.
    Forgotten,
    /// The coordinator cancelled the turn: its caller went away.
    Cancelled,
}

impl TurnErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnErrorCode::OllamaUnreachable => "ollama_unreachable",
            TurnErrorCode::ModelMissing => "model_missing",
            TurnErrorCode::OllamaBusy => "ollama_busy",
            TurnErrorCode::Timeout => "timeout",
            TurnErrorCode::OllamaError => "ollama_error",
            TurnErrorCode::AgentNotAssigned => "agent_not_assigned",
            TurnErrorCode::Released => "released",
            TurnErrorCode::Expired => "expired",
            TurnErrorCode::ShuttingDown => "shutting_down",
            TurnErrorCode::Fenced => "fenced",
            TurnErrorCode::Forgotten => "forgotten",
            TurnErrorCode::Cancelled => "cancelled",
        }
    }

    /// Whether running the same turn elsewhere may succeed.
    pub fn retryable(self) -> bool {
        !matches!(self, TurnErrorCode::ModelMissing)
    }
}
