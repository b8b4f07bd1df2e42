//! What the coordinator's HTTP API answers and its retained fleet summary
//! (`docs/API.md`, contract): plain serde types shared by the coordinator,
//! the CLI and the tests, so that a renamed field fails to compile rather
//! than silently reading `null`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Capacity, ChatMessage, Usage};

/// Where an agent is in its lifecycle (`docs/ARCHITECTURE.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Waiting to be placed (or placed again).
    Pending,
    /// Sent to a node, not confirmed yet.
    Assigned,
    Running,
    /// Being released from its node to move elsewhere.
    #[serde(rename = "moving")]
    Releasing,
    /// Being released from its node because it was deleted.
    Stopping,
}

impl AgentState {
    pub const ALL: [AgentState; 5] = [
        AgentState::Pending,
        AgentState::Assigned,
        AgentState::Running,
        AgentState::Releasing,
        AgentState::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Pending => "pending",
            AgentState::Assigned => "assigned",
            AgentState::Running => "running",
            AgentState::Releasing => "moving",
            AgentState::Stopping => "stopping",
        }
    }
}

/// `GET /v1/agents/{name}`, and each entry of `GET /v1/agents`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub name: String,
    pub model: String,
    pub state: AgentState,
    pub node: Option<String>,
    pub system: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub placement: u64,
    /// Why a pending agent is not placed yet, when known.
    pub pending_reason: Option<String>,
    pub queued_jobs: usize,
    /// A turn is in flight.
    pub busy: bool,
    pub created_ms: u64,
    /// Seconds in the current state.
    pub state_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

/// `DELETE /v1/agents/{name}`: `stopping` while its node releases it,
/// `stopped` once it is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDeleted {
    pub name: String,
    pub state: String,
}

/// `POST /v1/agents` with a list (`{"agents": [...]}`) or a count
/// (`{"count", "prefix", "model", ...}`): what was created, and why the
/// others were not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentsCreated {
    pub created: Vec<AgentView>,
    pub errors: Vec<AgentError>,
}

/// One agent of a bulk creation that was not created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    pub name: String,
    pub code: String,
    pub error: String,
}

/// A node as the coordinator sees it: its latest capacity message plus the
/// coordinator's own knowledge. A node that is not online shows no agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub capacity: Capacity,
    /// `online`, `suspect` (said offline, within the grace), `offline` or
    /// `unknown` (named by the store, not heard from yet).
    pub state: String,
    pub cordoned: bool,
    /// Assignments sent and not confirmed yet.
    pub assigned: usize,
    pub last_seen_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// A model pull on one node (`GET /v1/pulls`): the latest of each node
/// and model, kept an hour after it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullView {
    pub node: String,
    pub model: String,
    pub state: crate::protocol::PullState,
    /// Ollama's last status line.
    pub status: String,
    pub completed: u64,
    pub total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it was started (the API, or `auto_pull` for an agent).
    pub reason: String,
    /// Seconds since it started.
    pub secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullList {
    pub pulls: Vec<PullView>,
}

/// `DELETE /v1/nodes/{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeForgotten {
    pub node: String,
    pub forgotten: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
}

impl JobState {
    pub const ALL: [JobState; 4] = [
        JobState::Queued,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }
}

/// `GET /v1/jobs/{id}`, and each entry of `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: String,
    pub agent: String,
    pub status: JobState,
    pub priority: i64,
    pub message: String,
    pub attempts: u32,
    pub node: Option<String>,
    pub answer: Option<String>,
    pub error: Option<String>,
    pub usage: Option<Usage>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// `POST /v1/agents/{name}/jobs` (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSubmitted {
    pub job_id: String,
    pub status: JobState,
}

/// `POST /v1/chat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatAnswer {
    pub agent: String,
    pub node: String,
    /// The agent's Ollama model.
    #[serde(default)]
    pub model: String,
    pub message: ChatMessage,
    pub usage: Usage,
}

/// What happened in the fleet (`GET /v1/events`, newest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    Placed,
    Running,
    Moving,
    Moved,
    Adopted,
    Refused,
    AssignTimeout,
    Released,
    Vanished,
    Stopping,
    Removed,
    NodeJoined,
    NodeRestarted,
    NodeRecovered,
    NodeLost,
    Drain,
    Drained,
    Uncordon,
    Forgotten,
    PullStarted,
    PullDone,
    PullFailed,
    /// A kind this version does not know (from a newer coordinator).
    #[serde(other)]
    Other,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Placed => "placed",
            EventKind::Running => "running",
            EventKind::Moving => "moving",
            EventKind::Moved => "moved",
            EventKind::Adopted => "adopted",
            EventKind::Refused => "refused",
            EventKind::AssignTimeout => "assign_timeout",
            EventKind::Released => "released",
            EventKind::Vanished => "vanished",
            EventKind::Stopping => "stopping",
            EventKind::Removed => "removed",
            EventKind::NodeJoined => "node_joined",
            EventKind::NodeRestarted => "node_restarted",
            EventKind::NodeRecovered => "node_recovered",
            EventKind::NodeLost => "node_lost",
            EventKind::Drain => "drain",
            EventKind::Drained => "drained",
            EventKind::Uncordon => "uncordon",
            EventKind::Forgotten => "forgotten",
            EventKind::PullStarted => "pull_started",
            EventKind::PullDone => "pull_done",
            EventKind::PullFailed => "pull_failed",
            EventKind::Other => "other",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<Event>,
}

/// The fleet in numbers: the head of `GET /v1/status` and the retained
/// `{root}/fleet/summary` (which adds `ts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSummary {
    pub nodes_online: usize,
    pub nodes_total: usize,
    pub agents_total: usize,
    pub agents_running: usize,
    pub agents_pending: usize,
    pub agents_assigned: usize,
    pub agents_moving: usize,
    /// Deleted, waiting for their node to release them.
    #[serde(default)]
    pub agents_stopping: usize,
    /// Slots on online nodes.
    pub agent_capacity: u64,
    pub utilisation_pct: f64,
    pub queue_depth: usize,
    pub jobs_running: usize,
    pub generation: u64,
    /// Unix ms when published (the retained message only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    #[serde(flatten)]
    pub summary: FleetSummary,
    pub nodes: Vec<NodeView>,
    pub events: Vec<Event>,
}
