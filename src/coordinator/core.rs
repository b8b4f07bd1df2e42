//! The coordinator's state and decisions, owned by one task (see `mod.rs`):
//! agents and their lifecycle, jobs and their queues, chat turns in flight,
//! drains, rebalancing, and the reconciliation of what is wanted (the store)
//! with what nodes report (capacity messages and replies).
//!
//! Agent lifecycle (DESIGN §2):
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

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::fleet::{Change, Fleet, Heard};
use super::metrics::CoordinatorMetrics;
use super::scheduler::{Blocked, MovableAgent, NodeSlots, Request, Scheduler};
use super::store::{JobRow, JobState, NodeFlags, Store, StoreError};
use crate::config::coordinator::CoordinatorConfig;
use crate::http::ApiError;
use crate::mqtt::Publisher;
use crate::protocol::{
    encode, now_ms, Ack, AgentSpec, Capacity, ChatMessage, Command, CommandBody, CommandKind,
    NodeTopic, Reply, ReplyBody, Role, Topics, TurnErrorCode, TurnRequest, TurnResult, Usage,
};

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

/// An API answer: status and JSON body, or a JSON error.
pub type ApiResult = Result<(StatusCode, Value), ApiError>;
pub type Responder = oneshot::Sender<ApiResult>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    Pending,
    Assigned,
    Running,
    /// Being released from its node to move elsewhere.
    Releasing,
    /// Being released from its node because it was deleted.
    Stopping,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Pending => "pending",
            AgentState::Assigned => "assigned",
            AgentState::Running => "running",
            AgentState::Releasing => "moving",
            AgentState::Stopping => "stopping",
        }
    }

    fn stored(self) -> &'static str {
        match self {
            AgentState::Pending | AgentState::Releasing => "pending",
            AgentState::Assigned => "assigned",
            AgentState::Running => "running",
            AgentState::Stopping => "stopping",
        }
    }
}

struct ChatWaiter {
    messages: Vec<ChatMessage>,
    reply: Responder,
}

/// A queued job in an agent's heap: higher priority first, then FIFO.
#[derive(Debug, PartialEq, Eq)]
struct QueuedJob {
    priority: i64,
    seq: u64,
    id: String,
}

impl Ord for QueuedJob {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for QueuedJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

pub struct Agent {
    pub spec: AgentSpec,
    pub created_ms: u64,
    pub state: AgentState,
    pub node: Option<String>,
    pub placement: u64,
    since: Instant,
    /// When an assignment or release must have been acknowledged.
    deadline: Option<Instant>,
    /// Node clock of the last confirmation that the node hosts it.
    confirmed_ts: u64,
    pub pending_reason: Option<String>,
    /// A node not to place it on, until when.
    avoid: Option<(String, Instant)>,
    /// The node it is moving away from, while in motion.
    moving_from: Option<String>,
    last_moved: Option<Instant>,
    turn: Option<String>,
    chats: VecDeque<ChatWaiter>,
    jobs: BinaryHeap<QueuedJob>,
}

impl Agent {
    fn new(spec: AgentSpec, created_ms: u64) -> Agent {
        Agent {
            spec,
            created_ms,
            state: AgentState::Pending,
            node: None,
            placement: 0,
            since: Instant::now(),
            deadline: None,
            confirmed_ts: 0,
            pending_reason: None,
            avoid: None,
            moving_from: None,
            last_moved: None,
            turn: None,
            chats: VecDeque::new(),
            jobs: BinaryHeap::new(),
        }
    }

    fn avoided(&self, now: Instant) -> Option<&str> {
        match &self.avoid {
            Some((node, until)) if *until > now => Some(node),
            _ => None,
        }
    }

    fn on(&self, node: &str) -> bool {
        self.node.as_deref() == Some(node)
    }
}

enum TurnKind {
    Chat(Responder),
    Job(String),
}

struct TurnInFlight {
    agent: String,
    node: String,
    kind: TurnKind,
    new_messages: Vec<ChatMessage>,
    deadline: Instant,
    /// The deadline as sent to the node (Unix ms), for resending.
    deadline_ms: u64,
    started: Instant,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub ts_ms: u64,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub message: String,
}

pub struct Coordinator {
    pub config: CoordinatorConfig,
    pub topics: Topics,
    pub generation: u64,
    store: Store,
    publisher: Publisher,
    pub fleet: Fleet,
    pub agents: BTreeMap<String, Agent>,
    /// Agents per node they occupy a slot on (every state but pending).
    by_node: HashMap<String, BTreeSet<String>>,
    /// Pending agents, in placement order: (created, name).
    pending: BTreeSet<(u64, String)>,
    /// When the next placement pass is due, if one is wanted.
    placement_at: Option<Instant>,
    last_rebalance: Option<Instant>,
    flags: BTreeMap<String, NodeFlags>,
    /// Open jobs (queued or running).
    jobs: HashMap<String, JobRow>,
    turns: HashMap<String, TurnInFlight>,
    events: VecDeque<Event>,
    /// (node, agent) releases sent for agents a node should not host.
    strays: HashMap<(String, String), Instant>,
    /// Drain flags last sent, per node.
    drain_sent: HashMap<String, Instant>,
    drained_reported: BTreeMap<String, bool>,
    command_seq: u64,
    /// Placement starts once retained state had time to arrive.
    settled_at: Option<Instant>,
    /// Connected to the broker and subscribed.
    link_up: bool,
    /// When finished jobs were last pruned from the store.
    pruned_at: Option<Instant>,
    /// When `reconcile` last ran, to notice that we were stalled.
    reconciled_at: Option<Instant>,
    pub metrics: Arc<CoordinatorMetrics>,
    summary_published: Option<(Instant, Value)>,
}

impl Coordinator {
    /// Loads the desired state from `store`.
    pub fn load(
        config: CoordinatorConfig,
        store: Store,
        publisher: Publisher,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Result<Coordinator, StoreError> {
        let generation = store.begin_generation(now_ms())?;
        let topics = Topics::new(config.mqtt.topic_root.clone());
        let mut c = Coordinator {
            topics,
            generation,
            fleet: Fleet::default(),
            agents: BTreeMap::new(),
            by_node: HashMap::new(),
            pending: BTreeSet::new(),
            placement_at: None,
            last_rebalance: None,
            flags: store.node_flags()?,
            jobs: HashMap::new(),
            turns: HashMap::new(),
            events: VecDeque::new(),
            strays: HashMap::new(),
            drain_sent: HashMap::new(),
            drained_reported: BTreeMap::new(),
            command_seq: 0,
            settled_at: None,
            link_up: false,
            pruned_at: None,
            reconciled_at: None,
            metrics,
            summary_published: None,
            store,
            publisher,
            config,
        };
        let now = Instant::now();
        let deadline = now + c.config.timeouts.assign_ack;
        for row in c.store.agents()? {
            let mut agent = Agent::new(row.spec, row.created_ms);
            agent.placement = row.placement;
            agent.node = row.node.clone();
            agent.state = match row.state.as_str() {
                "running" => AgentState::Running,
                "assigned" => AgentState::Assigned,
                "stopping" => AgentState::Stopping,
                _ => AgentState::Pending,
            };
            if agent.state == AgentState::Pending {
                agent.node = None;
            } else if let Some(node) = &row.node {
                c.fleet.expect(node, now);
                agent.deadline = Some(deadline);
            }
            c.index(
                &agent.spec.name,
                agent.created_ms,
                None,
                agent.state,
                agent.node.as_deref(),
            );
            c.agents.insert(agent.spec.name.clone(), agent);
        }
        for mut job in c.store.open_jobs()? {
            if job.state == JobState::Running {
                job.state = JobState::Queued;
                job.node = None;
                c.store.update_job(&job)?;
            }
            if let Some(agent) = c.agents.get_mut(&job.agent) {
                agent.jobs.push(QueuedJob {
                    priority: job.priority,
                    seq: job.seq,
                    id: job.id.clone(),
                });
            }
            c.jobs.insert(job.id.clone(), job);
        }
        log::info!(
            "coordinator generation {generation}: {} agents, {} open jobs loaded from {}",
            c.agents.len(),
            c.jobs.len(),
            c.config.store_path.display()
        );
        Ok(c)
    }

    // ----- events and commands -----

    fn event(
        &mut self,
        kind: &'static str,
        agent: Option<&str>,
        node: Option<&str>,
        message: String,
    ) {
        log::info!("{kind}: {message}");
        self.metrics.event(kind);
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            ts_ms: now_ms(),
            kind,
            agent: agent.map(str::to_owned),
            node: node.map(str::to_owned),
            message,
        });
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
        if let Err(e) = self.publisher.publish(
            self.topics.node(node, NodeTopic::Command),
            encode(&command),
            false,
        ) {
            log::error!("cannot send a command to {node}: {e}");
        }
        id
    }

    fn persist(&self, name: &str) {
        if let Some(a) = self.agents.get(name) {
            if let Err(e) =
                self.store
                    .set_agent_state(name, a.state.stored(), a.node.as_deref(), a.placement)
            {
                log::error!("{e}");
            }
        }
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
        if let Some((old_state, old_node)) = old {
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
            .get_or_insert_with(|| Instant::now() + PLACEMENT_DELAY);
    }

    /// When the main loop should run [`Coordinator::place_pending`].
    pub fn placement_due(&self) -> Option<Instant> {
        self.placement_at
    }

    /// The only place an agent's state or node changes.
    fn set_state(&mut self, name: &str, state: AgentState, node: Option<String>) {
        let mut abandoned = None;
        let Some(a) = self.agents.get_mut(name) else {
            return;
        };
        if a.state == AgentState::Running && state != AgentState::Running {
            abandoned = a.turn.take();
        }
        let old = (a.state, a.node.clone());
        let created = a.created_ms;
        a.state = state;
        a.node = node.clone();
        a.since = Instant::now();
        a.deadline = None;
        self.index(
            name,
            created,
            Some((old.0, old.1.as_deref())),
            state,
            node.as_deref(),
        );
        self.persist(name);
        // A turn on the node it leaves will not be answered there: chats get
        // an error, jobs go back to the queue (not counted as an attempt).
        if let Some(turn) = abandoned {
            let reason = format!("agent {name} left its node before answering");
            self.turn_failed(&turn, TurnErrorCode::Released, reason, false);
        }
    }

    /// Records the assignment of `name` to `node` under a new placement id
    /// and returns the command to send once the record is committed.
    fn assign(&mut self, name: &str, node: &str) -> Option<CommandBody> {
        let placement = match self.store.next_placement() {
            Ok(p) => p,
            Err(e) => {
                log::error!("{e}");
                return None;
            }
        };
        let a = self.agents.get_mut(name)?;
        a.placement = placement;
        a.pending_reason = None;
        let spec = a.spec.clone();
        self.set_state(name, AgentState::Assigned, Some(node.to_owned()));
        if let Some(a) = self.agents.get_mut(name) {
            a.deadline = Some(Instant::now() + self.config.timeouts.assign_ack);
        }
        self.metrics.placements.inc();
        self.event(
            "placed",
            Some(name),
            Some(node),
            format!("placed {name} on {node} (placement {placement})"),
        );
        Some(CommandBody::Assign {
            agent: spec,
            placement,
        })
    }

    /// Asks `node` to release `name` held under `placement` or older.
    fn release(&mut self, node: &str, name: &str, placement: u64) {
        self.send(
            node,
            CommandBody::Release {
                agent: name.to_owned(),
                placement,
            },
        );
    }

    /// Back to pending (it will be placed again), avoiding `avoid` for a while.
    fn requeue_agent(&mut self, name: &str, avoid: Option<&str>, reason: &str) {
        let now = Instant::now();
        if let Some(a) = self.agents.get_mut(name) {
            if let Some(node) = avoid {
                a.avoid = Some((node.to_owned(), now + REFUSAL_BACKOFF));
            }
            a.pending_reason = Some(reason.to_owned());
        }
        self.set_state(name, AgentState::Pending, None);
        self.fail_chats(
            name,
            "the agent is being placed on another node; try again shortly",
        );
    }

    fn remove_agent(&mut self, name: &str) {
        if let Some(mut a) = self.agents.remove(name) {
            if let Some(node) = &a.node {
                if let Some(set) = self.by_node.get_mut(node) {
                    set.remove(name);
                }
            }
            self.pending.remove(&(a.created_ms, name.to_owned()));
            for waiter in a.chats.drain(..) {
                let _ = waiter.reply.send(Err(ApiError::not_found(format!(
                    "agent {name} was stopped"
                ))));
            }
            for job in a.jobs.drain() {
                self.jobs.remove(&job.id);
            }
        }
        if let Err(e) = self.store.delete_agent(name, now_ms()) {
            log::error!("{e}");
        }
        self.event("removed", Some(name), None, format!("agent {name} is gone"));
    }

    // ----- MQTT input -----

    /// The broker acknowledged our subscriptions: state replays follow.
    pub fn on_subscribed(&mut self) {
        let now = Instant::now();
        if self.settled_at.is_some() && !self.link_up {
            // Back after an outage of our own: not hearing the nodes meanwhile
            // says nothing about them.
            self.fleet.heard_all(now);
        }
        self.link_up = true;
        self.settled_at
            .get_or_insert(now + Duration::from_millis(500));
    }

    /// Deletes finished jobs older than `queue.keep_finished_secs`, checking
    /// once a minute (or as often as that, if shorter).
    fn prune_finished_jobs(&mut self, now: Instant) {
        let keep = self.config.queue.keep_finished;
        if self
            .pruned_at
            .is_some_and(|at| now.duration_since(at) < keep.min(Duration::from_secs(60)))
        {
            return;
        }
        self.pruned_at = Some(now);
        let before = now_ms().saturating_sub(keep.as_millis() as u64);
        match self.store.prune_finished_jobs(before) {
            Ok(0) => {}
            Ok(n) => log::info!(
                "deleted {n} finished jobs older than {}s (queue.keep_finished_secs)",
                keep.as_secs()
            ),
            Err(e) => log::error!("{e}"),
        }
    }

    /// The coordinator lost the broker: node liveness waits until it is back.
    pub fn on_disconnected(&mut self) {
        self.link_up = false;
    }

    pub fn on_status(&mut self, node: &str, payload: &[u8], retained: bool) {
        use crate::protocol::{STATUS_OFFLINE, STATUS_ONLINE};
        let online = match payload {
            p if p == STATUS_ONLINE.as_bytes() => true,
            p if p == STATUS_OFFLINE.as_bytes() => false,
            // A cleared retained status (`mosquitto_pub -r -n`) says nothing.
            [] => return,
            other => {
                log::warn!(
                    "ignored the status of {node}: expected \"{STATUS_ONLINE}\" or \"{STATUS_OFFLINE}\", got {:?}",
                    String::from_utf8_lossy(&other[..other.len().min(64)])
                );
                return;
            }
        };
        if let Some(change) = self.fleet.status(node, online, Instant::now()) {
            self.on_change(change);
        }
        if online && !retained {
            // The node (re)subscribed just now: what was sent to it while
            // it was away is lost.
            self.resend_turns(Some(node), &format!("{node} announced itself"));
        }
    }

    pub fn on_capacity(&mut self, node: &str, payload: &[u8], retained: bool) {
        if payload.is_empty() {
            return; // a cleared retained capacity (a forgotten node)
        }
        let capacity: Capacity =
            match crate::protocol::decode(payload, self.publisher.max_payload()) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("ignored the capacity message of {node}: {e}");
                    return;
                }
            };
        if capacity.node != node {
            log::warn!(
                "ignored a capacity message on the topic of {node} naming node {}",
                capacity.node
            );
            return;
        }
        match self
            .fleet
            .capacity(capacity.clone(), retained, Instant::now())
        {
            Heard::Stale => return,
            Heard::Accepted(change) => {
                if let Some(change) = change {
                    self.on_change(change);
                }
            }
        }
        if self.fleet.is_online(node) {
            self.reconcile_reported(node, &capacity);
        }
    }

    /// Compares what `node` says it hosts with what we want there.
    fn reconcile_reported(&mut self, node: &str, capacity: &Capacity) {
        let now = Instant::now();
        let draining = self.flags.get(node).is_some_and(|f| f.draining);
        for name in &capacity.agents {
            let Some(a) = self.agents.get(name) else {
                self.release_stray(node, name, "not an agent of this coordinator");
                continue;
            };
            match a.state {
                AgentState::Running | AgentState::Assigned if a.on(node) => {
                    let confirm = a.state == AgentState::Assigned;
                    if let Some(a) = self.agents.get_mut(name) {
                        a.confirmed_ts = a.confirmed_ts.max(capacity.ts);
                    }
                    if confirm {
                        self.confirm(name, node, capacity.ts);
                    }
                }
                AgentState::Pending
                    if !draining
                        && a.moving_from.as_deref() != Some(node)
                        && a.avoided(now) != Some(node) =>
                {
                    // It already runs there (a restart or a healed partition
                    // left it): adopt rather than place it twice.
                    self.event(
                        "adopted",
                        Some(name),
                        Some(node),
                        format!("{name} already runs on {node}; keeping it there"),
                    );
                    self.set_state(name, AgentState::Running, Some(node.to_owned()));
                    if let Some(a) = self.agents.get_mut(name) {
                        a.confirmed_ts = capacity.ts;
                    }
                    self.dispatch(name);
                }
                AgentState::Releasing | AgentState::Stopping if a.on(node) => {}
                _ => self.release_stray(node, name, "it is wanted elsewhere or nowhere"),
            }
        }
        // Agents we place there that the node no longer lists.
        let listed: std::collections::HashSet<&str> =
            capacity.agents.iter().map(String::as_str).collect();
        let gone: Vec<(String, AgentState)> = self
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter(|name| !listed.contains(name.as_str()))
            .filter_map(|name| {
                let a = self.agents.get(name)?;
                let gone = match a.state {
                    AgentState::Running => capacity.ts > a.confirmed_ts,
                    AgentState::Releasing | AgentState::Stopping => true,
                    _ => false,
                };
                gone.then(|| (name.clone(), a.state))
            })
            .collect();
        for (name, state) in gone {
            match state {
                AgentState::Running => {
                    self.event(
                        "vanished",
                        Some(&name),
                        Some(node),
                        format!("{node} no longer hosts {name}; placing it again"),
                    );
                    self.requeue_agent(&name, None, "its node stopped hosting it");
                }
                _ => self.released(&name, node),
            }
        }
    }

    fn release_stray(&mut self, node: &str, name: &str, why: &str) {
        let key = (node.to_owned(), name.to_owned());
        let now = Instant::now();
        if self
            .strays
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < RESEND_AFTER)
        {
            return;
        }
        self.strays.insert(key, now);
        let placement = self.store.last_placement().unwrap_or(u64::MAX);
        self.event(
            "released",
            Some(name),
            Some(node),
            format!("releasing {name} from {node}: {why}"),
        );
        self.release(node, name, placement);
    }

    fn confirm(&mut self, name: &str, node: &str, node_ts: u64) {
        let moved = self.agents.get(name).and_then(|a| a.moving_from.clone());
        self.set_state(name, AgentState::Running, Some(node.to_owned()));
        if let Some(a) = self.agents.get_mut(name) {
            a.confirmed_ts = a.confirmed_ts.max(node_ts);
            if moved.is_some() {
                a.moving_from = None;
                a.last_moved = Some(Instant::now());
            }
        }
        match moved {
            Some(from) => self.event(
                "moved",
                Some(name),
                Some(node),
                format!("{name} moved from {from} to {node}"),
            ),
            None => self.event(
                "running",
                Some(name),
                Some(node),
                format!("{name} runs on {node}"),
            ),
        }
        self.dispatch(name);
    }

    /// The release of `name` from `node` is done.
    fn released(&mut self, name: &str, node: &str) {
        let Some(a) = self.agents.get(name) else {
            return;
        };
        if !a.on(node) {
            return;
        }
        match a.state {
            AgentState::Stopping => self.remove_agent(name),
            AgentState::Releasing => {
                let avoid = a.moving_from.clone();
                self.set_state(name, AgentState::Pending, None);
                if let (Some(a), Some(from)) = (self.agents.get_mut(name), avoid) {
                    a.avoid = Some((from, Instant::now() + REFUSAL_BACKOFF));
                }
            }
            _ => {}
        }
    }

    pub fn on_reply(&mut self, node: &str, payload: &[u8]) {
        let reply: Reply = match crate::protocol::decode(payload, self.publisher.max_payload()) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("ignored a reply from {node}: {e}");
                return;
            }
        };
        if reply.node != node {
            log::warn!(
                "ignored a reply on the topic of {node} naming node {}",
                reply.node
            );
            return;
        }
        match reply.body {
            ReplyBody::Ack(ack) => self.on_ack(node, ack),
            ReplyBody::TurnResult(result) => self.on_turn_result(node, &reply.id, result),
        }
    }

    fn on_ack(&mut self, node: &str, ack: Ack) {
        let Some(name) = ack.agent.clone() else {
            return;
        };
        let placement = ack.placement.unwrap_or(0);
        let Some(a) = self.agents.get(&name) else {
            return;
        };
        let current = a.on(node) && a.placement == placement;
        match (ack.command, ack.ok) {
            (CommandKind::Assign, true) if current && a.state == AgentState::Assigned => {
                self.confirm(&name, node, ack.ts)
            }
            (CommandKind::Assign, true) if !(current && a.state == AgentState::Running) => {
                // A late ack of an assignment we gave up on.
                self.release(node, &name, placement);
            }
            (CommandKind::Assign, false) if current && a.state == AgentState::Assigned => {
                let reason = ack.reason.unwrap_or_default();
                self.event(
                    "refused",
                    Some(&name),
                    Some(node),
                    format!("{node} refused {name}: {reason}"),
                );
                self.requeue_agent(&name, Some(node), &format!("{node} refused it: {reason}"));
            }
            (CommandKind::Release, true) if a.on(node) => self.released(&name, node),
            _ => {}
        }
    }

    fn on_change(&mut self, change: Change) {
        match change {
            Change::Joined { node } => {
                let capacity = self
                    .fleet
                    .get(&node)
                    .and_then(|v| v.capacity.as_ref())
                    .map_or(0, |c| c.agent_capacity);
                self.event(
                    "node_joined",
                    None,
                    Some(&node),
                    format!("node {node} is online with {capacity} agent slots"),
                );
            }
            Change::Restarted { node } => self.event(
                "node_restarted",
                None,
                Some(&node),
                format!("node {node} restarted (new session)"),
            ),
            Change::Recovered { node } => self.event(
                "node_recovered",
                None,
                Some(&node),
                format!("node {node} spoke after an 'offline': that was a stale last will"),
            ),
            Change::Lost { node, reason } => self.node_lost(&node, &reason),
        }
    }

    fn node_lost(&mut self, node: &str, reason: &str) {
        let affected: Vec<String> = self
            .by_node
            .get(node)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        self.event(
            "node_lost",
            None,
            Some(node),
            format!(
                "node {node} is lost ({reason}); {} agents to place elsewhere",
                affected.len()
            ),
        );
        let turns: Vec<String> = self
            .turns
            .iter()
            .filter(|(_, t)| t.node == node)
            .map(|(id, _)| id.clone())
            .collect();
        for id in turns {
            let message = format!("node {node} was lost while answering ({reason})");
            self.turn_failed(&id, TurnErrorCode::ShuttingDown, message, false);
        }
        for name in &affected {
            if let Some(a) = self.agents.get(name) {
                if matches!(a.state, AgentState::Releasing | AgentState::Stopping) {
                    self.released(name, node);
                }
            }
        }
        self.release_lost_agents();
    }

    /// Agents on lost nodes go back to pending once the fence time passed.
    fn release_lost_agents(&mut self) {
        let now = Instant::now();
        let fence = self.config.timeouts.fence;
        let due: Vec<(String, String)> = self
            .agents
            .iter()
            .filter(|(_, a)| matches!(a.state, AgentState::Running | AgentState::Assigned))
            .filter_map(|(name, a)| {
                let node = a.node.as_ref()?;
                let since = self.fleet.lost_since(node)?;
                (now.duration_since(since) >= fence).then(|| (name.clone(), node.clone()))
            })
            .collect();
        for (name, node) in due {
            // No need to avoid it: a lost node takes nothing until it is back.
            self.requeue_agent(&name, None, &format!("its node {node} was lost"));
        }
    }

    // ----- API requests -----

    pub fn create_agent(&mut self, spec: AgentSpec) -> ApiResult {
        if self.agents.contains_key(&spec.name) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "exists",
                format!("agent {} already exists", spec.name),
            ));
        }
        let created = now_ms();
        match self.store.insert_agent(&spec, created) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "exists",
                    format!("agent {} already exists", spec.name),
                ))
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store",
                    e.to_string(),
                ))
            }
        }
        let name = spec.name.clone();
        self.agents.insert(name.clone(), Agent::new(spec, created));
        self.index(&name, created, None, AgentState::Pending, None);
        self.event(
            "created",
            Some(&name),
            None,
            format!("agent {name} created"),
        );
        let view = self.agent_json(&name);
        Ok((StatusCode::CREATED, view))
    }

    pub fn delete_agent(&mut self, name: &str) -> ApiResult {
        let Some(a) = self.agents.get(name) else {
            return Err(ApiError::not_found(format!("no agent named {name}")));
        };
        match (a.state, a.node.clone()) {
            (AgentState::Stopping, _) => {}
            (AgentState::Pending, _) | (_, None) => self.remove_agent(name),
            (_, Some(node)) => {
                let placement = a.placement;
                self.set_state(name, AgentState::Stopping, Some(node.clone()));
                if let Some(a) = self.agents.get_mut(name) {
                    a.deadline = Some(Instant::now() + self.config.timeouts.assign_ack);
                }
                self.fail_chats(name, "the agent is being stopped");
                let jobs: Vec<String> = self
                    .agents
                    .get_mut(name)
                    .map(|a| a.jobs.drain().map(|j| j.id).collect())
                    .unwrap_or_default();
                for id in jobs {
                    self.finish_job(&id, None, Some("the agent was stopped".into()));
                }
                self.release(&node, name, placement);
                self.event(
                    "stopping",
                    Some(name),
                    Some(&node),
                    format!("stopping {name} on {node}"),
                );
            }
        }
        let state = self
            .agents
            .get(name)
            .map_or("stopped", |a| a.state.as_str());
        Ok((StatusCode::OK, json!({"name": name, "state": state})))
    }

    pub fn chat(&mut self, name: &str, messages: Vec<ChatMessage>, reply: Responder) {
        let Some(a) = self.agents.get_mut(name) else {
            let _ = reply.send(Err(ApiError::not_found(format!("no agent named {name}"))));
            return;
        };
        // Assigned, moving, or pending but not yet tried: it runs shortly, so
        // the chat waits for it (the API's chat timeout bounds the wait).
        // Stopping, or pending for a known reason (no room...): say why now.
        let hopeless = match a.state {
            AgentState::Stopping => true,
            AgentState::Pending => a.pending_reason.is_some(),
            _ => false,
        };
        if hopeless {
            let why = a
                .pending_reason
                .clone()
                .unwrap_or_else(|| "it is being placed".into());
            let message = format!("agent {name} is not running ({}): {why}", a.state.as_str());
            let retry = self.config.queue.retry_after_secs;
            let error = ApiError::unavailable("agent_not_running", message).retry_after(retry);
            let _ = reply.send(Err(error));
            return;
        }
        a.chats.push_back(ChatWaiter { messages, reply });
        self.dispatch(name);
    }

    pub fn submit_job(&mut self, name: &str, message: String, priority: i64) -> ApiResult {
        let limits = self.config.queue.clone();
        let queued_total = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .count();
        let Some(a) = self.agents.get(name) else {
            return Err(ApiError::not_found(format!("no agent named {name}")));
        };
        if a.state == AgentState::Stopping {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "stopping",
                format!("agent {name} is being stopped"),
            ));
        }
        if a.jobs.len() >= limits.max_jobs_per_agent || queued_total >= limits.max_jobs {
            let which = if a.jobs.len() >= limits.max_jobs_per_agent {
                format!(
                    "agent {name} has {} jobs waiting (queue.max_jobs_per_agent)",
                    a.jobs.len()
                )
            } else {
                format!("{queued_total} jobs are waiting in the fleet (queue.max_jobs)")
            };
            self.metrics.jobs_rejected.inc();
            let error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!("queue full: {which}; retry later"),
            );
            return Err(error.retry_after(limits.retry_after_secs));
        }
        let now = now_ms();
        let mut job = JobRow {
            id: format!("j{}", crate::protocol::new_id()),
            agent: name.to_owned(),
            message,
            priority,
            seq: 0,
            state: JobState::Queued,
            attempts: 0,
            node: None,
            created_ms: now,
            updated_ms: now,
            answer: None,
            error: None,
            usage: None,
        };
        if let Err(e) = self.store.insert_job(&mut job) {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store",
                e.to_string(),
            ));
        }
        let id = job.id.clone();
        if let Some(a) = self.agents.get_mut(name) {
            a.jobs.push(QueuedJob {
                priority,
                seq: job.seq,
                id: id.clone(),
            });
        }
        self.jobs.insert(id.clone(), job);
        self.metrics.jobs_submitted.inc();
        self.dispatch(name);
        Ok((
            StatusCode::ACCEPTED,
            json!({"job_id": id, "status": "queued"}),
        ))
    }

    pub fn job(&self, id: &str) -> ApiResult {
        let job = match self.jobs.get(id) {
            Some(job) => Some(job.clone()),
            None => self.store.job(id).map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
            })?,
        };
        match job {
            Some(job) => Ok((StatusCode::OK, job_json(&job))),
            None => Err(ApiError::not_found(format!("no job {id}"))),
        }
    }

    pub fn list_jobs(&self, agent: Option<&str>, state: Option<&str>, limit: usize) -> ApiResult {
        let jobs = self.store.jobs(agent, state, limit).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
        })?;
        let jobs: Vec<Value> = jobs
            .iter()
            .map(|j| job_json(self.jobs.get(&j.id).unwrap_or(j)))
            .collect();
        Ok((StatusCode::OK, json!({ "jobs": jobs })))
    }

    pub fn drain(
        &mut self,
        node: &str,
        max_parallel: Option<usize>,
        deadline: Option<Duration>,
    ) -> ApiResult {
        if self.fleet.get(node).is_none() {
            return Err(ApiError::not_found(format!("no node named {node}")));
        }
        let deadline = deadline.unwrap_or(self.config.scheduler.drain_deadline);
        let flags = NodeFlags {
            cordoned: true,
            draining: true,
            drain_deadline_ms: Some(now_ms() + deadline.as_millis() as u64),
            drain_max_parallel: Some(
                max_parallel
                    .unwrap_or(self.config.scheduler.drain_max_parallel)
                    .max(1),
            ),
        };
        self.set_flags(node, flags);
        self.drained_reported.remove(node);
        let hosted = self.agents.values().filter(|a| a.on(node)).count();
        self.event(
            "drain",
            None,
            Some(node),
            format!(
                "draining {node}: {hosted} agents to move, at most {} at a time, all by {}s",
                self.flags[node].drain_max_parallel.unwrap_or(1),
                deadline.as_secs()
            ),
        );
        self.reconcile();
        Ok((StatusCode::OK, self.node_json(node)))
    }

    pub fn uncordon(&mut self, node: &str) -> ApiResult {
        if self.fleet.get(node).is_none() {
            return Err(ApiError::not_found(format!("no node named {node}")));
        }
        self.set_flags(node, NodeFlags::default());
        self.event(
            "uncordon",
            None,
            Some(node),
            format!("{node} takes agents again"),
        );
        self.reconcile();
        Ok((StatusCode::OK, self.node_json(node)))
    }

    /// Forgets a node that is not online (a Pi taken out of the fleet): its
    /// agents are placed elsewhere, its flags deleted, and its retained
    /// status and capacity cleared on the broker so that dashboards and a
    /// restarted coordinator stop showing it. If it comes back it joins as
    /// a new node.
    pub fn forget_node(&mut self, node: &str) -> ApiResult {
        let Some(view) = self.fleet.get(node) else {
            return Err(ApiError::not_found(format!("no node named {node}")));
        };
        if matches!(
            view.liveness,
            super::fleet::Liveness::Online | super::fleet::Liveness::Suspect { .. }
        ) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "node_online",
                format!("node {node} is online: stop its daemon first (drain it to move its agents gracefully)"),
            ));
        }
        let hosted: Vec<String> = self
            .by_node
            .get(node)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        for name in &hosted {
            match self.agents.get(name).map(|a| a.state) {
                Some(AgentState::Releasing | AgentState::Stopping) => self.released(name, node),
                Some(_) => {
                    self.requeue_agent(name, None, &format!("its node {node} was forgotten"))
                }
                None => {}
            }
        }
        self.fleet.forget(node);
        self.flags.remove(node);
        self.drain_sent.remove(node);
        self.drained_reported.remove(node);
        if let Err(e) = self.store.delete_node_flags(node) {
            log::error!("{e}");
        }
        for kind in [NodeTopic::Status, NodeTopic::Capacity] {
            if let Err(e) = self
                .publisher
                .publish(self.topics.node(node, kind), Vec::new(), true)
            {
                log::error!("cannot clear the retained {kind:?} of {node}: {e}");
            }
        }
        self.event(
            "forgotten",
            None,
            Some(node),
            format!(
                "forgot node {node}; {} of its agents to place elsewhere",
                hosted.len()
            ),
        );
        self.reconcile();
        Ok((StatusCode::OK, json!({"node": node, "forgotten": true})))
    }

    fn set_flags(&mut self, node: &str, flags: NodeFlags) {
        if let Err(e) = self.store.set_node_flags(node, &flags) {
            log::error!("{e}");
        }
        self.flags.insert(node.to_owned(), flags);
        self.drain_sent.remove(node);
        self.sync_drain_flag(node);
    }

    /// Tells `node` its draining flag when its capacity says otherwise.
    fn sync_drain_flag(&mut self, node: &str) {
        let want = self.flags.get(node).is_some_and(|f| f.draining);
        let Some(view) = self.fleet.get(node) else {
            return;
        };
        let Some(capacity) = &view.capacity else {
            return;
        };
        if capacity.draining == want || !view.is_online() {
            return;
        }
        let now = Instant::now();
        if self
            .drain_sent
            .get(node)
            .is_some_and(|at| now.duration_since(*at) < RESEND_AFTER)
        {
            return;
        }
        self.drain_sent.insert(node.to_owned(), now);
        self.send(node, CommandBody::Drain { draining: want });
    }

    // ----- turns -----

    /// Starts the agent's next turn if it runs and is idle: chats first,
    /// then the highest-priority job.
    fn dispatch(&mut self, name: &str) {
        let Some(a) = self.agents.get_mut(name) else {
            return;
        };
        if a.state != AgentState::Running || a.turn.is_some() {
            return;
        }
        let Some(node) = a.node.clone() else { return };
        if !self.fleet.is_online(&node) {
            return; // it will be placed elsewhere, or its node comes back
        }
        while let Some(waiter) = a.chats.pop_front() {
            if waiter.reply.is_closed() {
                continue;
            }
            let timeout = self.config.timeouts.chat;
            self.start_turn(
                name,
                &node,
                waiter.messages,
                TurnKind::Chat(waiter.reply),
                timeout,
            );
            return;
        }
        let Some(queued) = a.jobs.pop() else { return };
        let Some(job) = self.jobs.get_mut(&queued.id) else {
            return;
        };
        job.state = JobState::Running;
        job.attempts += 1;
        job.node = Some(node.clone());
        job.updated_ms = now_ms();
        let message = vec![ChatMessage::new(Role::User, job.message.clone())];
        if let Err(e) = self.store.update_job(job) {
            log::error!("{e}");
        }
        let timeout = self.config.timeouts.job;
        self.start_turn(name, &node, message, TurnKind::Job(queued.id), timeout);
    }

    fn start_turn(
        &mut self,
        name: &str,
        node: &str,
        new_messages: Vec<ChatMessage>,
        kind: TurnKind,
        timeout: Duration,
    ) {
        let job = match &kind {
            TurnKind::Job(id) => Some(id.clone()),
            TurnKind::Chat(_) => None,
        };
        let id = self.next_id("t");
        let deadline_ms = now_ms() + timeout.as_millis() as u64;
        let payload = match self.turn_command(&id, name, node, &new_messages, job, deadline_ms) {
            Ok(payload) => payload,
            Err(reason) => {
                match kind {
                    TurnKind::Chat(reply) => {
                        let _ = reply.send(Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "too_large",
                            reason,
                        )));
                    }
                    TurnKind::Job(job) => self.finish_job(&job, None, Some(reason)),
                }
                return;
            }
        };
        if let Err(e) =
            self.publisher
                .publish(self.topics.node(node, NodeTopic::Command), payload, false)
        {
            log::error!("cannot send turn {id} to {node}: {e}");
        }
        if let Some(a) = self.agents.get_mut(name) {
            a.turn = Some(id.clone());
        }
        let now = Instant::now();
        self.turns.insert(
            id,
            TurnInFlight {
                agent: name.to_owned(),
                node: node.to_owned(),
                kind,
                new_messages,
                deadline: now + timeout,
                deadline_ms,
                started: now,
            },
        );
    }

    /// The encoded turn command `id`: the agent's system prompt, its stored
    /// history and `new_messages`, within the payload limit (the oldest
    /// history goes first); an error says why it cannot be sent.
    fn turn_command(
        &self,
        id: &str,
        name: &str,
        node: &str,
        new_messages: &[ChatMessage],
        job: Option<String>,
        deadline_ms: u64,
    ) -> Result<Vec<u8>, String> {
        let history = match self.store.history(name) {
            Ok(h) => h,
            Err(e) => {
                log::error!("{e}");
                Vec::new()
            }
        };
        let system = self.agents.get(name).and_then(|a| a.spec.system.clone());
        let mut messages = history;
        messages.extend(new_messages.iter().cloned());
        let mut command = Command {
            id: id.to_owned(),
            node: node.to_owned(),
            generation: self.generation,
            body: CommandBody::Turn(TurnRequest {
                agent: name.to_owned(),
                messages,
                system,
                deadline_ms: Some(deadline_ms),
                job,
            }),
        };
        let max = self.publisher.max_payload();
        let mut payload = encode(&command);
        while payload.len() > max {
            let CommandBody::Turn(turn) = &mut command.body else {
                break;
            };
            if turn.messages.len() <= new_messages.len() {
                break;
            }
            turn.messages.remove(0);
            payload = encode(&command);
        }
        if payload.len() > max {
            return Err(format!(
                "the message is too large to send ({} bytes; mqtt.max_payload_bytes is {max})",
                payload.len()
            ));
        }
        Ok(payload)
    }

    /// Sends the turns in flight (on `node`, or everywhere) again under
    /// their own ids. A command or answer published while the node or the
    /// coordinator was not connected is lost with clean sessions; a node
    /// ignores a turn it is still running and answers one it finished
    /// again, so resending is safe.
    pub fn resend_turns(&self, node: Option<&str>, why: &str) {
        let due: Vec<(&String, &TurnInFlight)> = self
            .turns
            .iter()
            .filter(|(_, t)| node.is_none_or(|n| t.node == n) && self.fleet.is_online(&t.node))
            .collect();
        if due.is_empty() {
            return;
        }
        log::info!("{why}: sending {} turns in flight again", due.len());
        for (id, t) in due {
            let job = match &t.kind {
                TurnKind::Job(job) => Some(job.clone()),
                TurnKind::Chat(_) => None,
            };
            let sent = self
                .turn_command(id, &t.agent, &t.node, &t.new_messages, job, t.deadline_ms)
                .and_then(|payload| {
                    let topic = self.topics.node(&t.node, NodeTopic::Command);
                    self.publisher
                        .publish(topic, payload, false)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = sent {
                log::error!("cannot send turn {id} to {} again: {e}", t.node);
            }
        }
    }

    fn on_turn_result(&mut self, node: &str, id: &str, result: TurnResult) {
        if self.turns.get(id).is_none_or(|t| t.node != node) {
            log::debug!("ignored a result for turn {id} from {node}: not in flight");
            return;
        }
        match (result.ok, result.message, result.error) {
            (true, Some(message), _) => {
                self.turn_succeeded(id, message, result.usage.unwrap_or_default())
            }
            (_, _, Some(error)) => {
                let placement_problem = matches!(
                    error.code,
                    TurnErrorCode::AgentNotAssigned
                        | TurnErrorCode::Fenced
                        | TurnErrorCode::Released
                        | TurnErrorCode::ShuttingDown
                );
                if placement_problem {
                    let agent = self.turns.get(id).map(|t| t.agent.clone());
                    if let Some(a) = agent.as_ref().and_then(|name| self.agents.get_mut(name)) {
                        if a.on(node) && a.state == AgentState::Running {
                            // Detach the turn so that leaving the node does not
                            // answer it too: it gets the node's own reason below.
                            if a.turn.as_deref() == Some(id) {
                                a.turn = None;
                            }
                            let why = format!("{node} answered {}", error.code.as_str());
                            let name = a.spec.name.clone();
                            self.requeue_agent(&name, Some(node), &why);
                        }
                    }
                }
                self.turn_failed(id, error.code, error.reason, !placement_problem);
            }
            _ => self.turn_failed(
                id,
                TurnErrorCode::OllamaError,
                "the node sent an empty result".into(),
                true,
            ),
        }
    }

    fn turn_succeeded(&mut self, id: &str, message: ChatMessage, usage: Usage) {
        let Some(turn) = self.take_turn(id) else {
            return;
        };
        let mut record = turn.new_messages.clone();
        record.push(message.clone());
        if let Err(e) = self.store.append_history(&turn.agent, &record, now_ms()) {
            log::error!("{e}");
        }
        let seconds = turn.started.elapsed().as_secs_f64();
        match turn.kind {
            TurnKind::Chat(reply) => {
                self.metrics.chat("ok", seconds);
                let body = json!({
                    "agent": turn.agent, "node": turn.node,
                    "message": {"role": "assistant", "content": message.content},
                    "usage": usage,
                });
                let _ = reply.send(Ok((StatusCode::OK, body)));
            }
            TurnKind::Job(job) => {
                self.metrics.job("completed");
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.usage = Some(usage);
                }
                self.finish_job(&job, Some(message.content), None);
            }
        }
        self.dispatch(&turn.agent);
    }

    /// A turn failed: a chat gets the error; a job is retried while
    /// attempts remain (`counts` false: not the job's fault, not counted).
    fn turn_failed(&mut self, id: &str, code: TurnErrorCode, reason: String, counts: bool) {
        let Some(turn) = self.take_turn(id) else {
            return;
        };
        match turn.kind {
            TurnKind::Chat(reply) => {
                self.metrics
                    .chat(code.as_str(), turn.started.elapsed().as_secs_f64());
                let (status, retry) = match code {
                    TurnErrorCode::OllamaBusy => (StatusCode::SERVICE_UNAVAILABLE, true),
                    TurnErrorCode::Timeout | TurnErrorCode::Expired => {
                        (StatusCode::GATEWAY_TIMEOUT, false)
                    }
                    TurnErrorCode::AgentNotAssigned
                    | TurnErrorCode::Released
                    | TurnErrorCode::ShuttingDown
                    | TurnErrorCode::Fenced => (StatusCode::SERVICE_UNAVAILABLE, true),
                    _ => (StatusCode::BAD_GATEWAY, false),
                };
                let mut error = ApiError::new(status, code.as_str(), reason);
                if retry {
                    error.message.push_str("; try again");
                    error = error.retry_after(self.config.queue.retry_after_secs);
                }
                let _ = reply.send(Err(error));
            }
            TurnKind::Job(job) => {
                let max = self.config.queue.max_attempts;
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                if !counts {
                    j.attempts = j.attempts.saturating_sub(1);
                }
                if code.retryable() && j.attempts < max {
                    j.state = JobState::Queued;
                    j.node = None;
                    j.error = Some(reason.clone());
                    j.updated_ms = now_ms();
                    let queued = QueuedJob {
                        priority: j.priority,
                        seq: j.seq,
                        id: job.clone(),
                    };
                    if let Err(e) = self.store.update_job(j) {
                        log::error!("{e}");
                    }
                    log::info!("job {job} failed on {} ({reason}); queued again", turn.node);
                    if let Some(a) = self.agents.get_mut(&turn.agent) {
                        a.jobs.push(queued);
                    }
                } else {
                    self.metrics.job("failed");
                    self.finish_job(&job, None, Some(format!("{}: {reason}", code.as_str())));
                }
            }
        }
        self.dispatch(&turn.agent);
    }

    fn take_turn(&mut self, id: &str) -> Option<TurnInFlight> {
        let turn = self.turns.remove(id)?;
        if let Some(a) = self.agents.get_mut(&turn.agent) {
            if a.turn.as_deref() == Some(id) {
                a.turn = None;
            }
        }
        Some(turn)
    }

    fn finish_job(&mut self, id: &str, answer: Option<String>, error: Option<String>) {
        let Some(mut job) = self.jobs.remove(id) else {
            return;
        };
        job.state = if answer.is_some() {
            JobState::Completed
        } else {
            JobState::Failed
        };
        job.answer = answer;
        job.error = error;
        job.updated_ms = now_ms();
        if let Err(e) = self.store.update_job(&job) {
            log::error!("{e}");
        }
    }

    fn fail_chats(&mut self, name: &str, why: &str) {
        let Some(a) = self.agents.get_mut(name) else {
            return;
        };
        for waiter in a.chats.drain(..) {
            let _ = waiter.reply.send(Err(ApiError::unavailable(
                "agent_not_running",
                format!("agent {name}: {why}"),
            )));
        }
    }

    // ----- reconciliation -----

    /// One pass: liveness, timeouts, drains, placement, rebalancing, turns.
    pub fn reconcile(&mut self) {
        let now = Instant::now();
        let t = self.config.timeouts.clone();
        if let Some(stall) = self
            .reconciled_at
            .map(|at| now.duration_since(at))
            .filter(|gap| *gap >= STALLED_AFTER)
        {
            // Messages the nodes sent meanwhile are still queued for us:
            // our own stall is not their silence.
            log::warn!(
                "the coordinator did not run for {:.1}s; every node gets a fresh node_lost_after",
                stall.as_secs_f64()
            );
            self.fleet.heard_all(now);
        }
        self.reconciled_at = Some(now);
        if self.link_up {
            for change in self.fleet.tick(now, t.node_lost_after, t.offline_grace) {
                self.on_change(change);
            }
        }
        self.release_lost_agents();
        self.expire_commands(now);
        self.expire_turns(now);
        self.prune_finished_jobs(now);
        // Forget releases of strays long enough ago to resend them if needed.
        self.strays
            .retain(|_, at| now.duration_since(*at) < RESEND_AFTER * 12);
        let nodes: Vec<String> = self.fleet.nodes().map(|n| n.id.clone()).collect();
        for node in &nodes {
            self.sync_drain_flag(node);
        }
        if self.settled_at.is_some_and(|at| now >= at) {
            self.progress_drains();
            self.place_pending();
            self.rebalance(now);
        }
        // Work waiting for agents that run and are idle (e.g. jobs loaded
        // from the store for agents a capacity message confirmed).
        let idle_with_work: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.state == AgentState::Running && a.turn.is_none())
            .filter(|(_, a)| !a.jobs.is_empty() || !a.chats.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        for name in idle_with_work {
            self.dispatch(&name);
        }
        self.update_gauges();
    }

    fn expire_commands(&mut self, now: Instant) {
        let expired: Vec<(String, AgentState, Option<String>, u64)> = self
            .agents
            .iter()
            .filter(|(_, a)| a.deadline.is_some_and(|d| d <= now))
            .map(|(n, a)| (n.clone(), a.state, a.node.clone(), a.placement))
            .collect();
        let wait = self.config.timeouts.assign_ack;
        for (name, state, node, placement) in expired {
            let Some(node) = node else { continue };
            match state {
                AgentState::Assigned => {
                    self.event(
                        "assign_timeout",
                        Some(&name),
                        Some(&node),
                        format!(
                            "{node} did not confirm {name} within {}s; placing it elsewhere",
                            wait.as_secs()
                        ),
                    );
                    self.release(&node, &name, placement);
                    self.requeue_agent(
                        &name,
                        Some(&node),
                        &format!("{node} did not confirm it in time"),
                    );
                }
                AgentState::Releasing | AgentState::Stopping if self.fleet.is_online(&node) => {
                    self.release(&node, &name, placement);
                    if let Some(a) = self.agents.get_mut(&name) {
                        a.deadline = Some(now + wait);
                    }
                }
                AgentState::Releasing | AgentState::Stopping => self.released(&name, &node),
                AgentState::Running
                    if self.fleet.get(&node).is_some_and(|v| v.capacity.is_none()) =>
                {
                    // Loaded from the store; its node has not spoken yet.
                    if let Some(a) = self.agents.get_mut(&name) {
                        a.deadline = None;
                    }
                }
                _ => {
                    if let Some(a) = self.agents.get_mut(&name) {
                        a.deadline = None;
                    }
                }
            }
        }
    }

    fn expire_turns(&mut self, now: Instant) {
        let expired: Vec<(String, String)> = self
            .turns
            .iter()
            .filter(|(_, t)| t.deadline <= now)
            .map(|(id, t)| (id.clone(), t.node.clone()))
            .collect();
        for (id, node) in expired {
            self.turn_failed(
                &id,
                TurnErrorCode::Timeout,
                format!("no answer from {node} in time"),
                true,
            );
        }
        // Chats whose callers gave up.
        for a in self.agents.values_mut() {
            a.chats.retain(|w| !w.reply.is_closed());
        }
    }

    fn progress_drains(&mut self) {
        let draining: Vec<(String, NodeFlags)> = self
            .flags
            .iter()
            .filter(|(_, f)| f.draining)
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect();
        for (node, flags) in draining {
            let in_motion = self
                .agents
                .values()
                .filter(|a| {
                    a.moving_from.as_deref() == Some(node.as_str())
                        && a.state != AgentState::Running
                })
                .count();
            let hosted: Vec<String> = self
                .agents
                .iter()
                .filter(|(_, a)| {
                    a.on(&node) && matches!(a.state, AgentState::Running | AgentState::Assigned)
                })
                .filter(|(_, a)| {
                    a.turn.is_none() || flags.drain_deadline_ms.is_some_and(|d| now_ms() >= d)
                })
                .map(|(n, _)| n.clone())
                .collect();
            let overdue = flags.drain_deadline_ms.is_some_and(|d| now_ms() >= d);
            if hosted.is_empty() && in_motion == 0 {
                if !self.drained_reported.get(&node).copied().unwrap_or(false) {
                    self.drained_reported.insert(node.clone(), true);
                    self.event(
                        "drained",
                        None,
                        Some(&node),
                        format!("{node} is drained: no agents left"),
                    );
                }
                continue;
            }
            let budget = if overdue {
                usize::MAX
            } else {
                flags
                    .drain_max_parallel
                    .unwrap_or(1)
                    .saturating_sub(in_motion)
            };
            let mut scheduler = self.scheduler_with_pending();
            let mut started = 0;
            for name in hosted {
                if started >= budget {
                    break;
                }
                if !overdue {
                    let Some(a) = self.agents.get(&name) else {
                        continue;
                    };
                    let request = Request {
                        model: &a.spec.model,
                        labels: &a.spec.labels,
                        avoid: Some(&node),
                    };
                    if scheduler.place(&request).is_err() {
                        continue; // nowhere to go yet: it keeps running here
                    }
                }
                self.start_move(
                    &name,
                    &node,
                    if overdue {
                        "drain deadline passed"
                    } else {
                        "drain"
                    },
                );
                started += 1;
            }
        }
    }

    /// Begins moving `name` away from `node`: release first, place after.
    fn start_move(&mut self, name: &str, node: &str, why: &str) {
        let Some(a) = self.agents.get(name) else {
            return;
        };
        let placement = a.placement;
        if a.state == AgentState::Assigned {
            // Not confirmed yet: just place it elsewhere.
            self.release(node, name, placement);
            self.requeue_agent(name, Some(node), why);
            return;
        }
        self.set_state(name, AgentState::Releasing, Some(node.to_owned()));
        if let Some(a) = self.agents.get_mut(name) {
            a.moving_from = Some(node.to_owned());
            a.deadline = Some(Instant::now() + self.config.timeouts.assign_ack);
        }
        self.release(node, name, placement);
        self.event(
            "moving",
            Some(name),
            Some(node),
            format!("moving {name} off {node} ({why})"),
        );
    }

    /// The scheduler's view: every known node with its load, counting
    /// assignments in flight and agents the node reports that are not ours.
    fn scheduler(&self) -> Scheduler {
        let nodes = self
            .fleet
            .nodes()
            .filter_map(|view| {
                let c = view.capacity.as_ref()?;
                let ours = self.by_node.get(&view.id);
                let strays = c
                    .agents
                    .iter()
                    .filter(|n| !ours.is_some_and(|set| set.contains(*n)))
                    .count() as u32;
                let ours = ours.map_or(0, |set| set.len() as u32);
                let flags = self.flags.get(&view.id).cloned().unwrap_or_default();
                let blocked = if !view.is_online() {
                    Some(Blocked::Offline)
                } else if flags.draining {
                    Some(Blocked::Draining)
                } else if flags.cordoned {
                    Some(Blocked::Cordoned)
                } else if !c.ollama_reachable {
                    Some(Blocked::OllamaUnreachable)
                } else if let (Some(t), Some(max)) = (c.temperature_c, c.max_temperature_c) {
                    if t >= max {
                        Some(Blocked::TooHot {
                            temperature_c: t,
                            max_c: max,
                        })
                    } else if c.throttled == Some(true) {
                        Some(Blocked::Throttled)
                    } else {
                        None
                    }
                } else if c.throttled == Some(true) {
                    Some(Blocked::Throttled)
                } else {
                    None
                };
                Some(NodeSlots {
                    id: view.id.clone(),
                    agent_capacity: c.agent_capacity,
                    load: ours + strays,
                    load_per_core: if c.cpu.cores > 0 {
                        c.cpu.load1 / f64::from(c.cpu.cores)
                    } else {
                        0.0
                    },
                    models: c.models.clone(),
                    labels: c.labels.clone(),
                    blocked,
                })
            })
            .collect();
        Scheduler::new(nodes)
    }

    /// The scheduler with a slot reserved for every pending agent that fits,
    /// so trial placements (drains) do not count on room they will take.
    fn scheduler_with_pending(&self) -> Scheduler {
        let mut scheduler = self.scheduler();
        let now = Instant::now();
        for a in self
            .agents
            .values()
            .filter(|a| a.state == AgentState::Pending)
        {
            let request = Request {
                model: &a.spec.model,
                labels: &a.spec.labels,
                avoid: a.avoided(now).or(a.moving_from.as_deref()),
            };
            let _ = scheduler.place(&request);
        }
        scheduler
    }

    /// Places pending agents, oldest first.
    pub fn place_pending(&mut self) {
        if self.settled_at.is_none_or(|at| Instant::now() < at) {
            // Retained state is still arriving: try again once it settled.
            if self.placement_at.is_some() {
                self.placement_at = self.settled_at;
            }
            return;
        }
        self.placement_at = None;
        if self.pending.is_empty() {
            return;
        }
        let now = Instant::now();
        let pending: Vec<String> = self.pending.iter().map(|(_, name)| name.clone()).collect();
        let mut scheduler = self.scheduler();
        let mut full_reason: Option<String> = None;
        let mut placements = Vec::new();
        let mut unplaced_with_chats = Vec::new();
        for name in pending {
            let Some(a) = self.agents.get_mut(&name) else {
                continue;
            };
            if let Some(reason) = &full_reason {
                a.pending_reason = Some(reason.clone());
                if !a.chats.is_empty() {
                    unplaced_with_chats.push(name);
                }
                continue;
            }
            let request = Request {
                model: &a.spec.model,
                labels: &a.spec.labels,
                avoid: a.avoided(now).or(a.moving_from.as_deref()),
            };
            match scheduler.place(&request) {
                Ok(node) => placements.push((name, node)),
                Err(e) => {
                    if !scheduler.has_free_slot() {
                        full_reason = Some(e.reason.clone());
                    }
                    a.pending_reason = Some(e.reason);
                    if !a.chats.is_empty() {
                        unplaced_with_chats.push(name);
                    }
                }
            }
        }
        // Chats that waited for the agent to land: it cannot now, say why.
        for name in unplaced_with_chats {
            let reason = self
                .agents
                .get(&name)
                .and_then(|a| a.pending_reason.clone())
                .unwrap_or_default();
            self.fail_chats(&name, &format!("it cannot be placed: {reason}"));
        }
        if placements.is_empty() {
            return;
        }
        // Record the whole pass in one transaction, then send: a command is
        // never out before the assignment it makes is stored.
        self.store.begin();
        let commands: Vec<(String, CommandBody)> = placements
            .into_iter()
            .filter_map(|(name, node)| Some((node.clone(), self.assign(&name, &node)?)))
            .collect();
        if !self.store.commit() {
            // Not stored, so not sent: the assignments time out and are
            // placed again.
            return;
        }
        for (node, command) in commands {
            self.send(&node, command);
        }
    }

    fn rebalance(&mut self, now: Instant) {
        let s = self.config.scheduler.clone();
        if s.rebalance_threshold <= 0.0 || !self.pending.is_empty() {
            return;
        }
        if self
            .last_rebalance
            .is_some_and(|t| now.duration_since(t) < REBALANCE_EVERY)
        {
            return;
        }
        self.last_rebalance = Some(now);
        let in_motion = self
            .agents
            .values()
            .filter(|a| a.moving_from.is_some())
            .count();
        let budget = s.rebalance_max_moves.saturating_sub(in_motion);
        if budget == 0 {
            return;
        }
        let mut movable: BTreeMap<String, Vec<MovableAgent<'_>>> = BTreeMap::new();
        for (name, a) in &self.agents {
            let calm = a
                .last_moved
                .is_none_or(|t| now.duration_since(t) >= REBALANCE_COOLDOWN);
            if a.state == AgentState::Running && a.turn.is_none() && a.jobs.is_empty() && calm {
                if let Some(node) = &a.node {
                    movable.entry(node.clone()).or_default().push(MovableAgent {
                        name,
                        model: &a.spec.model,
                        labels: &a.spec.labels,
                    });
                }
            }
        }
        let mut scheduler = self.scheduler();
        let moves = scheduler.plan_rebalance(s.rebalance_threshold, budget, &movable);
        drop(movable);
        for m in moves {
            let why = format!(
                "rebalance: {} is above {}x the fleet average",
                m.from, s.rebalance_threshold
            );
            self.start_move(&m.agent, &m.from, &why);
        }
    }

    fn update_gauges(&self) {
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        for a in self.agents.values() {
            *counts.entry(a.state.as_str()).or_default() += 1;
        }
        for state in ["pending", "assigned", "running", "moving", "stopping"] {
            self.metrics
                .agents(state, counts.get(state).copied().unwrap_or(0));
        }
        let online: Vec<_> = self.fleet.nodes().filter(|n| n.is_online()).collect();
        self.metrics.nodes_online.set(online.len() as i64);
        self.metrics.agent_capacity.set(
            online
                .iter()
                .filter_map(|n| n.capacity.as_ref())
                .map(|c| i64::from(c.agent_capacity))
                .sum(),
        );
        self.metrics.queue_depth.set(self.queue_depth() as i64);
    }

    fn queue_depth(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .count()
    }

    // ----- views -----

    pub fn summary(&self) -> Value {
        let online: Vec<_> = self.fleet.nodes().filter(|n| n.is_online()).collect();
        let capacity: u64 = online
            .iter()
            .filter_map(|n| n.capacity.as_ref())
            .map(|c| u64::from(c.agent_capacity))
            .sum();
        let count = |s: AgentState| self.agents.values().filter(|a| a.state == s).count();
        let running = count(AgentState::Running);
        json!({
            "nodes_online": online.len(),
            "nodes_total": self.fleet.nodes().count(),
            "agents_total": self.agents.len(),
            "agents_running": running,
            "agents_pending": count(AgentState::Pending),
            "agents_assigned": count(AgentState::Assigned),
            "agents_moving": count(AgentState::Releasing),
            "agent_capacity": capacity,
            "utilisation_pct": if capacity == 0 { 0.0 } else { running as f64 * 100.0 / capacity as f64 },
            "queue_depth": self.queue_depth(),
            "jobs_running": self.jobs.values().filter(|j| j.state == JobState::Running).count(),
            "generation": self.generation,
        })
    }

    pub fn status_json(&self, events: usize) -> Value {
        let mut status = self.summary();
        let nodes: Vec<Value> = self.fleet.nodes().map(|n| self.node_json(&n.id)).collect();
        status["nodes"] = json!(nodes);
        status["events"] = json!(self.events(events));
        status
    }

    pub fn events(&self, limit: usize) -> Vec<&Event> {
        self.events.iter().rev().take(limit).collect()
    }

    pub fn node_json(&self, node: &str) -> Value {
        let Some(view) = self.fleet.get(node) else {
            return Value::Null;
        };
        let flags = self.flags.get(node).cloned().unwrap_or_default();
        let assigned = self
            .agents
            .values()
            .filter(|a| a.on(node) && a.state == AgentState::Assigned)
            .count();
        let mut v = match &view.capacity {
            Some(c) => serde_json::to_value(c).unwrap_or(Value::Null),
            None => json!({"node": node, "agent_capacity": 0, "agents_running": 0, "agents": []}),
        };
        v["state"] = json!(view.liveness.name());
        if !view.is_online() {
            // Its last report no longer says what runs there.
            v["agents_running"] = json!(0);
            v["agents"] = json!([]);
        }
        v["cordoned"] = json!(flags.cordoned);
        v["draining"] = json!(flags.draining || view.capacity.as_ref().is_some_and(|c| c.draining));
        v["assigned"] = json!(assigned);
        v["last_seen_secs"] = json!(view.last_heard.elapsed().as_secs());
        v
    }

    pub fn nodes_json(&self) -> Value {
        let nodes: Vec<Value> = self.fleet.nodes().map(|n| self.node_json(&n.id)).collect();
        json!({ "nodes": nodes })
    }

    pub fn agent_json(&self, name: &str) -> Value {
        let Some(a) = self.agents.get(name) else {
            return Value::Null;
        };
        json!({
            "name": name,
            "model": a.spec.model,
            "state": a.state.as_str(),
            "node": a.node,
            "system": a.spec.system,
            "labels": a.spec.labels,
            "placement": a.placement,
            "pending_reason": if a.state == AgentState::Pending { a.pending_reason.clone() } else { None },
            "queued_jobs": a.jobs.len(),
            "busy": a.turn.is_some(),
            "created_ms": a.created_ms,
            "state_secs": a.since.elapsed().as_secs(),
        })
    }

    pub fn agents_json(&self) -> Value {
        let agents: Vec<Value> = self.agents.keys().map(|n| self.agent_json(n)).collect();
        json!({ "agents": agents })
    }

    /// The retained fleet summary, published when it changed (at most once
    /// a second) or every 30 s.
    pub fn publish_summary(&mut self) {
        let summary = self.summary();
        let now = Instant::now();
        let due = match &self.summary_published {
            None => true,
            Some((at, last)) => {
                let elapsed = now.duration_since(*at);
                (elapsed >= Duration::from_secs(1) && *last != summary)
                    || elapsed >= Duration::from_secs(30)
            }
        };
        if !due {
            return;
        }
        let mut payload = summary.clone();
        payload["ts"] = json!(now_ms());
        if let Err(e) =
            self.publisher
                .publish(self.topics.fleet_summary(), payload.to_string(), true)
        {
            log::error!("cannot publish the fleet summary: {e}");
        }
        self.summary_published = Some((now, summary));
    }

    /// Answers every waiting chat: the coordinator is stopping.
    pub fn stop(&mut self) {
        let ids: Vec<String> = self.turns.keys().cloned().collect();
        for id in ids {
            if let Some(turn) = self.turns.remove(&id) {
                if let TurnKind::Chat(reply) = turn.kind {
                    let _ = reply.send(Err(ApiError::unavailable(
                        "stopping",
                        "the coordinator is stopping",
                    )));
                }
            }
        }
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for name in names {
            self.fail_chats(&name, "the coordinator is stopping");
        }
    }
}

pub fn job_json(job: &JobRow) -> Value {
    json!({
        "job_id": job.id,
        "agent": job.agent,
        "status": job.state.as_str(),
        "priority": job.priority,
        "message": job.message,
        "attempts": job.attempts,
        "node": job.node,
        "answer": job.answer,
        "error": job.error,
        "usage": job.usage,
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_pop_highest_priority_first_then_in_submission_order() {
        let mut heap = BinaryHeap::new();
        for (priority, seq) in [(1, 1), (5, 2), (1, 3), (9, 4), (5, 5)] {
            heap.push(QueuedJob {
                priority,
                seq,
                id: format!("{priority}-{seq}"),
            });
        }
        let order: Vec<String> = std::iter::from_fn(|| heap.pop().map(|j| j.id)).collect();
        assert_eq!(order, ["9-4", "5-2", "5-5", "1-1", "1-3"]);
    }
}
