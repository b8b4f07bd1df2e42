//! The coordinator's state and decisions, owned by one task (see `mod.rs`):
//! agents and their lifecycle, jobs and their queues, chat turns in flight,
//! drains, rebalancing, and the reconciliation of what is wanted (the store)
//! with what nodes report (capacity messages and replies).
//!
//! Agent lifecycle (docs/ARCHITECTURE.md §2):
//!
//! ```text
//!  pending ──assign──▶ assigned ──ack / listed──▶ running
//!     ▲                   │ refused, ack timeout      │ node lost, vanished,
//!     └───────────────────┘                           │ not hosted
//!     ▲                                               ▼
//!     └──────── release acked ◀── releasing (drain / rebalance move)
//!  DELETE: stopping ── release acked / node lost ──▶ gone
//! ```
//!
//! A move releases the agent from its node *before* placing it elsewhere,
//! so no agent runs on two nodes at once.
//!
//! The core reads no clock and does no network I/O: every entry point takes
//! the time of its input ([`Now`]), and the daemon's loop publishes what the
//! core queued in its outbox ([`Outgoing`]). It keeps the SQLite store, whose writes must
//! precede the commands they justify. Errors are domain errors
//! ([`CoreError`]); `api.rs` maps them to HTTP.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::discovery::Discovery;
use super::fleet::{Change, Fleet, Heard};
use super::listed::{Learned, Lists};
use super::metrics::CoordinatorMetrics;
use super::scheduler::{MovableAgent, NodeSlots, Request, Scheduler, Standing};
use super::store::{JobRow, JobState, NodeFlags, Store, StoreError, StoredState};
use crate::config::coordinator::CoordinatorConfig;
use crate::protocol::{
    encode, now_ms, Ack, AckBatch, AgentDeleted, AgentError, AgentList, AgentSpec, AgentState,
    AgentUpdate, AgentView, AgentsCreated, Assignment, Capacity, ChatAnswer, ChatMessage, Command,
    CommandBody, CommandKind, Event, EventKind, EventList, FleetStatus, FleetSummary, JobList,
    JobSubmitted, JobView, NodeForgotten, NodeList, NodeTopic, NodeView, Reply, ReplyBody, Role,
    Topics, TurnChunk, TurnErrorCode, TurnResult, Usage,
};
pub use command::ApiRequest;
use durability::HeldAnswer;

/// How long a node that refused an agent is skipped for it.
const REFUSAL_BACKOFF: Duration = Duration::from_secs(30);
/// An agent moved by rebalancing stays put at least this long.
const REBALANCE_COOLDOWN: Duration = Duration::from_secs(120);
/// Resend intervals for releases of strays and drain flags.
const RESEND_AFTER: Duration = Duration::from_secs(5);
/// Recent events kept for `GET /v1/events`.
const EVENTS_KEPT: usize = 1000;
/// Pending agents are placed in batches at most this soon after they appear,
/// so that a burst of creations costs one placement pass, not one each.
const PLACEMENT_DELAY: Duration = Duration::from_millis(20);
/// How often rebalancing is considered when the fleet did not change.
const REBALANCE_EVERY: Duration = Duration::from_secs(2);
/// Reconciliation runs every 250 ms; a gap this long means the coordinator
/// itself was stopped (SIGSTOP, a VM pause, a starved CPU).
const STALLED_AFTER: Duration = Duration::from_secs(5);

mod agent;
mod announce;
mod command;
mod durability;
mod jobs;
mod placement;
mod pulls;
mod reconcile;
mod reports;
mod requests;
mod turns;
mod views;

#[cfg(test)]
mod tests;

pub use agent::Agent;
use agent::{ChatTurn, ChatWaiter, Relay, TurnInFlight, TurnKind};
use jobs::Jobs;

/// The time an input is handled at: monotonic for timeouts, wall-clock
/// (Unix ms) for what is stored, shown and sent to nodes. The daemon passes
/// [`Now::system`]; tests pass times of their own.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub wall_ms: u64,
}

impl Now {
    pub fn system() -> Now {
        Now {
            at: Instant::now(),
            wall_ms: now_ms(),
        }
    }

    /// `d` later on both clocks.
    pub fn after(self, d: Duration) -> Now {
        Now {
            at: self.at + d,
            wall_ms: self.wall_ms + d.as_millis() as u64,
        }
    }
}

/// An MQTT message the core decided to send (QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// Not sent after this (a turn command past its budget).
    pub expires: Option<Instant>,
    /// May go in one batch with others to the same node
    /// ([`crate::mqtt::Publisher::publish_batched`]).
    pub batch: bool,
}

/// Why a request was not done, in the domain's terms; `api.rs` alone maps
/// these to HTTP statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts the current state (`code` names how).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A job queue is full.
    #[error("{message}")]
    QueueFull {
        message: String,
        retry_after_secs: u64,
    },
    /// The agent cannot take a turn now (stopping, unplaceable, moving).
    #[error("{message}")]
    NotRunning {
        message: String,
        retry_after_secs: Option<u64>,
    },
    /// The turn cannot be sent within the MQTT payload limit.
    #[error("{0}")]
    TooLarge(String),
    /// The node answered the turn with an error (or never answered).
    #[error("{message}")]
    Turn {
        code: TurnErrorCode,
        message: String,
        retry_after_secs: Option<u64>,
    },
    /// The store could not be read or written; nothing was done.
    #[error("{0}")]
    Store(#[source] StoreFault),
    #[error("the coordinator is stopping")]
    Stopping,
    /// The coordinator is not connected to the broker: nothing can reach
    /// the nodes now.
    #[error("the coordinator is not connected to the MQTT broker; try again shortly")]
    NoBroker,
}

impl From<StoreError> for CoreError {
    fn from(e: StoreError) -> Self {
        CoreError::Store(StoreFault::caused(e.to_string(), e))
    }
}

/// Why the store failed: a sentence for the client, and the SQLite error
/// behind it when there is one (`Error::source`, for logs).
#[derive(Debug, Clone)]
pub struct StoreFault {
    message: String,
    source: Option<Arc<StoreError>>,
}

impl StoreFault {
    /// A fault known only by its description (a batch that did not commit).
    pub fn new(message: impl Into<String>) -> StoreFault {
        StoreFault {
            message: message.into(),
            source: None,
        }
    }

    /// `message`, caused by `source`.
    pub fn caused(message: impl Into<String>, source: StoreError) -> StoreFault {
        StoreFault {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }
}

impl std::fmt::Display for StoreFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreFault {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Faults are equal when they say the same (for tests and deduplication).
impl PartialEq for StoreFault {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message
    }
}

impl Eq for StoreFault {}

/// Where the answer to a request that waits (a chat) is sent.
pub type Answer<T> = oneshot::Sender<Result<T, CoreError>>;
pub type Responder = Answer<ChatAnswer>;
/// Where a streamed chat's text goes as it arrives (never blocks the core:
/// an answer is bounded by the MQTT payload limit).
pub type Deltas = tokio::sync::mpsc::UnboundedSender<String>;

/// What a chat asks, besides its agent.
pub struct ChatCall {
    /// The new messages (with `memory`), or the whole conversation.
    pub messages: Vec<ChatMessage>,
    /// Send the agent's stored history before `messages`, and store the
    /// turn once answered (`POST /v1/chat`). Without it the chat is
    /// stateless, as OpenAI's and Ollama's APIs are.
    pub memory: bool,
    /// Streamed: the answer's text as the node generates it.
    pub deltas: Option<Deltas>,
}

impl ChatCall {
    /// A chat in the agent's conversation, answered whole.
    pub fn remembered(messages: Vec<ChatMessage>) -> ChatCall {
        ChatCall {
            messages,
            memory: true,
            deltas: None,
        }
    }
}

pub struct Coordinator {
    pub config: CoordinatorConfig,
    pub topics: Topics,
    pub generation: u64,
    store: Store,
    /// MQTT messages decided on, for `mod.rs` to publish.
    outbox: Vec<Outgoing>,
    /// HTTP answers decided in the open batch, released when it commits.
    answers: Vec<HeldAnswer>,
    /// Why the store cannot write, while it cannot ([`durability`]).
    store_fault: Option<String>,
    /// Job turns ended in the open batch, restored if it does not commit.
    taken_in_batch: Vec<(String, TurnInFlight)>,
    /// The time of the input being handled (set by each entry point).
    now: Now,
    pub fleet: Fleet,
    pub agents: BTreeMap<String, Agent>,
    /// Agents per node they occupy a slot on (every state but pending).
    by_node: HashMap<String, BTreeSet<String>>,
    /// Pending agents, in placement order: (created, name).
    pending: BTreeSet<(u64, String)>,
    /// When the next placement pass is due, if one is wanted.
    placement_at: Option<Instant>,
    /// The latest model pull of each (node, model).
    pulls: BTreeMap<(String, String), pulls::Pull>,
    last_rebalance: Option<Instant>,
    flags: BTreeMap<String, NodeFlags>,
    /// Open jobs (queued or running) and the agents' queues of them.
    jobs: Jobs,
    turns: HashMap<String, TurnInFlight>,
    events: VecDeque<Event>,
    /// (node, agent) releases sent for agents a node should not host.
    strays: HashMap<(String, String), Instant>,
    /// What each node hosts, as it said ([`Lists`]).
    lists: Lists,
    /// When each node was last asked for its whole agent list.
    lists_asked: HashMap<String, Instant>,
    /// Nodes where one of our agents changed state since their list was
    /// last compared with what we want ([`Lists`]), and when that was.
    touched: HashSet<String>,
    reconciled: HashMap<String, Instant>,
    /// The level of per-agent events: debug inside bulk steps, which log
    /// one line of their own.
    event_level: log::Level,
    /// Drain flags last sent, per node.
    drain_sent: HashMap<String, Instant>,
    drained_reported: BTreeMap<String, bool>,
    command_seq: u64,
    /// Placement starts once retained state had time to arrive.
    settled_at: Option<Instant>,
    /// Connected to the broker and subscribed.
    link_up: bool,
    /// When the coordinator last lost the broker (while `!link_up`).
    link_lost_at: Option<Instant>,
    /// When finished jobs were last pruned from the store.
    pruned_at: Option<Instant>,
    /// When `reconcile` last ran, to notice that we were stalled.
    reconciled_at: Option<Instant>,
    pub metrics: Arc<CoordinatorMetrics>,
    summary_published: Option<(Instant, FleetSummary)>,
    /// Home Assistant discovery, unless turned off.
    discovery: Option<Discovery>,
    /// Nodes whose discovery configs were published on this connection,
    /// with the version they named.
    announced: HashMap<String, String>,
    fleet_announced: bool,
}

impl Coordinator {
    /// Loads the desired state from `store`.
    pub fn load(
        config: CoordinatorConfig,
        store: Store,
        now: Now,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Result<Coordinator, StoreError> {
        let generation = store.begin_generation(now.wall_ms)?;
        let topics = Topics::new(config.mqtt.topic_root.clone());
        let mut c = Coordinator {
            topics: topics.clone(),
            generation,
            fleet: Fleet::default(),
            agents: BTreeMap::new(),
            by_node: HashMap::new(),
            pending: BTreeSet::new(),
            placement_at: None,
            pulls: BTreeMap::new(),
            last_rebalance: None,
            flags: store.node_flags()?,
            jobs: Jobs::default(),
            turns: HashMap::new(),
            events: VecDeque::new(),
            strays: HashMap::new(),
            lists: Lists::default(),
            lists_asked: HashMap::new(),
            touched: HashSet::new(),
            reconciled: HashMap::new(),
            event_level: log::Level::Info,
            drain_sent: HashMap::new(),
            drained_reported: BTreeMap::new(),
            command_seq: 0,
            settled_at: None,
            link_up: false,
            link_lost_at: None,
            pruned_at: None,
            reconciled_at: None,
            metrics,
            summary_published: None,
            discovery: config
                .home_assistant
                .discovery
                .then(|| Discovery::new(&config.home_assistant.discovery_prefix, topics.clone())),
            announced: HashMap::new(),
            fleet_announced: false,
            store,
            outbox: Vec::new(),
            answers: Vec::new(),
            store_fault: None,
            taken_in_batch: Vec::new(),
            now,
            config,
        };
        c.load_state(true)?;
        log::info!(
            "coordinator generation {generation}: {} agents, {} open jobs loaded from {}",
            c.agents.len(),
            c.jobs.len(),
            c.store.location()
        );
        Ok(c)
    }

    // ----- events and commands -----

    fn event(&mut self, kind: EventKind, agent: Option<&str>, node: Option<&str>, message: String) {
        log::log!(self.event_level, "{}: {message}", kind.as_str());
        self.metrics.event(kind.as_str());
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            ts_ms: self.now.wall_ms,
            kind,
            agent: agent.map(str::to_owned),
            node: node.map(str::to_owned),
            message,
        });
    }

    /// Queues a message for the broker.
    fn publish(&mut self, topic: String, payload: impl Into<Vec<u8>>, retain: bool) {
        self.outbox.push(Outgoing {
            topic,
            payload: payload.into(),
            retain,
            expires: None,
            batch: false,
        });
    }

    /// A turn command to `node` that must not be delivered after
    /// `expires`; in a batch with others if the node reads batches.
    fn publish_turn(&mut self, node: &str, payload: Vec<u8>, expires: Instant) {
        self.outbox.push(Outgoing {
            topic: self.topics.node(node, NodeTopic::Command),
            payload,
            retain: false,
            expires: Some(expires),
            batch: self.fleet.accepts_batches(node),
        });
    }

    /// The messages decided on since the last call, in order.
    pub fn take_outbox(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.command_seq += 1;
        format!("{prefix}{:x}-{}", self.generation, self.command_seq)
    }

    /// Publishes a command to `node`; returns its id.
    fn send(&mut self, node: &str, body: CommandBody) -> String {
        let prefix = if matches!(body, CommandBody::Turn(_)) {
            "t"
        } else {
            "c"
        };
        let id = self.next_id(prefix);
        let command = Command {
            id: id.clone(),
            node: node.to_owned(),
            generation: self.generation,
            body,
        };
        self.publish(
            self.topics.node(node, NodeTopic::Command),
            encode(&command),
            false,
        );
        id
    }

    /// Keeps `by_node` and `pending` in step with an agent's state and node.
    fn index(
        &mut self,
        name: &str,
        created: u64,
        old: Option<(AgentState, Option<&str>)>,
        state: AgentState,
        node: Option<&str>,
    ) {
        self.touched.extend(node.map(str::to_owned));
        if let Some((old_state, old_node)) = old {
            self.touched.extend(old_node.map(str::to_owned));
            if let Some(old_node) = old_node {
                if let Some(set) = self.by_node.get_mut(old_node) {
                    set.remove(name);
                }
            }
            if old_state == AgentState::Pending {
                self.pending.remove(&(created, name.to_owned()));
            }
        }
        if let Some(node) = node {
            self.by_node
                .entry(node.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
        if state == AgentState::Pending {
            self.pending.insert((created, name.to_owned()));
            self.want_placement();
        }
    }

    /// Asks for a placement pass shortly (once per burst).
    fn want_placement(&mut self) {
        self.placement_at
            .get_or_insert_with(|| self.now.at + PLACEMENT_DELAY);
    }

    /// When the main loop should run [`Coordinator::place_pending`].
    pub fn placement_due(&self) -> Option<Instant> {
        self.placement_at
    }

    /// The only place an agent's state or node changes.
    /// The store is written first; if that fails, the change is still made
    /// in memory (the coordinator goes on with what the nodes report) and
    /// the error logged. Requests that must not proceed use
    /// [`Coordinator::try_set_state`].
    fn set_state(&mut self, name: &str, state: AgentState, node: Option<String>) {
        if let Err(e) = self.try_set_state(name, state, node.clone()) {
            // Inside the daemon's batch this fails the batch, and the
            // core reloads from the store (durability.rs).
            log::error!("{e}; going on with the state in memory until the batch ends");
            self.apply_state(name, state, node);
        }
    }

    /// Stores the change, then makes it; on a store error nothing changes.
    fn try_set_state(
        &mut self,
        name: &str,
        state: AgentState,
        node: Option<String>,
    ) -> Result<(), StoreError> {
        let Some(a) = self.agents.get(name) else {
            return Ok(());
        };
        self.store
            .set_agent_state(name, state.stored(), node.as_deref(), a.placement)?;
        self.apply_state(name, state, node);
        Ok(())
    }

    fn apply_state(&mut self, name: &str, state: AgentState, node: Option<String>) {
        let mut abandoned = None;
        let Some(a) = self.agents.get_mut(name) else {
            return;
        };
        if a.state == AgentState::Running && state != AgentState::Running {
            abandoned = a.turn.take();
        }
        let old = (a.state, a.node.clone());
        let created = a.created_ms;
        if state == AgentState::Running {
            if let Some(since) = a.waiting_since.take() {
                let waited = self.now.at.saturating_duration_since(since);
                self.metrics.agent_scheduled(waited.as_secs_f64());
            }
        } else if old.0 == AgentState::Running {
            a.waiting_since = Some(self.now.at);
        }
        if a.node != node {
            // Sequence numbers are per node (and session).
            a.confirmed_seq = 0;
        }
        a.state = state;
        a.node = node.clone();
        a.since = self.now.at;
        a.deadline = None;
        self.index(
            name,
            created,
            Some((old.0, old.1.as_deref())),
            state,
            node.as_deref(),
        );
        // A turn on the node it leaves will not be answered there: chats get
        // an error, jobs go back to the queue (not counted as an attempt).
        if let Some(turn) = abandoned {
            let reason = format!("agent {name} left its node before answering");
            self.turn_failed(&turn, TurnErrorCode::Released, reason, false);
        }
    }

    /// The store, for the daemon's lease (renewal, resignation).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Answers every waiting chat: the coordinator is stopping.
    pub fn stop(&mut self, now: Now) {
        self.now = now;
        let ids: Vec<String> = self.turns.keys().cloned().collect();
        for id in ids {
            if let Some(turn) = self.turns.remove(&id) {
                if let TurnKind::Chat(chat) = turn.kind {
                    let _ = chat.reply.send(Err(CoreError::Stopping));
                }
            }
        }
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for name in names {
            self.fail_chats(&name, "the coordinator is stopping");
        }
    }
}
