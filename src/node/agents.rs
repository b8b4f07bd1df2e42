//! The node's agent slots as a pure state machine: commands in, effects out,
//! no I/O and no clock of its own, so every rule is unit-tested here.
//!
//! Rules (docs/ARCHITECTURE.md §2, docs/PROTOCOL.md):
//! * at most `agent_capacity` agents; a further assign is refused with a
//!   reason naming the capacity;
//! * commands are applied once: a repeated command id is ignored;
//! * commands of an older coordinator generation are ignored;
//! * each agent runs one turn at a time, the rest wait in its own FIFO lane;
//! * a late release or assign about an older placement of an agent does not
//!   undo a newer one.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::Serialize;

use crate::protocol::{
    normalize_model, Ack, AckBatch, AckItem, AgentSpec, Assignment, Command, CommandBody,
    CommandKind, TurnErrorCode, TurnRequest, TurnResult,
};

/// Command ids remembered for deduplication. QoS 1 redeliveries arrive within
/// seconds, so a few thousand ids are plenty.
const REMEMBERED_COMMANDS: usize = 4096;
/// Turns one agent may have waiting behind its running turn.
pub const MAX_QUEUED_TURNS_PER_AGENT: usize = 256;

/// A turn accepted by the node, with what is needed to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The command id, echoed in the result.
    pub id: String,
    pub generation: u64,
    pub request: TurnRequest,
    /// On the node's monotonic clock ([`At::mono_ms`]): when nobody waits
    /// for the answer any more (arrival + the request's `timeout_ms`).
    pub deadline_mono_ms: Option<u64>,
}

/// When a command is applied: the wall clock, for display only, and the
/// node's monotonic clock, for deadlines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct At {
    pub wall_ms: u64,
    pub mono_ms: u64,
}

impl At {
    /// Now, on this process's clocks.
    pub fn now() -> At {
        At {
            wall_ms: crate::protocol::now_ms(),
            mono_ms: crate::protocol::mono_ms(),
        }
    }
}

/// What the I/O layer must do after a state change.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Publish an acknowledgement for command `id`.
    Ack {
        id: String,
        generation: u64,
        ack: Ack,
    },
    /// Publish a failed turn result without running it.
    TurnFailed { turn: Turn, result: TurnResult },
    /// Run `turn` for the agent with `model` and `system` prompt.
    StartTurn {
        turn: Turn,
        model: String,
        system: Option<String>,
    },
    /// Publish the acknowledgements of a batch command `id`.
    AckBatch {
        id: String,
        generation: u64,
        batch: AckBatch,
    },
    /// The capacity announcement changed and should be published.
    CapacityChanged,
    /// Publish the whole agent list (a coordinator of `generation` asked).
    ListAgents { generation: u64 },
    /// The turn waits behind the running turn of its agent.
    Queued,
    /// The command was dropped; the reason is for the log.
    Ignored { id: String, reason: String },
    /// Stop the running turn `turn` of `agent` and its Ollama call: its
    /// caller went away. The node then calls [`AgentTable::turn_finished`].
    CancelRunning { agent: String, turn: String },
    /// Pull `model` through Ollama, answering command `id`.
    Pull {
        id: String,
        generation: u64,
        model: String,
    },
}

/// One hosted agent.
#[derive(Debug)]
pub struct HostedAgent {
    pub spec: AgentSpec,
    pub placement: u64,
    pub since_ms: u64,
    /// Command id of the turn running (or waiting for an Ollama slot).
    running: Option<String>,
    queue: VecDeque<Turn>,
    pub turns_completed: u64,
}

/// How an agent shows in the node's `GET /v1/agents`.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    pub name: String,
    pub model: String,
    pub state: &'static str,
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub placement: u64,
    pub busy: bool,
    pub queued_turns: usize,
    pub turns_completed: u64,
    pub since_ms: u64,
}

/// Bounded memory of recent command ids, kept as 64-bit hashes.
struct RecentIds {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl RecentIds {
    fn new() -> Self {
        RecentIds {
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers `id`; false when it was already remembered.
    fn insert(&mut self, id: &str) -> bool {
        let mut h = DefaultHasher::new();
        id.hash(&mut h);
        let key = h.finish();
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > REMEMBERED_COMMANDS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

pub struct AgentTable {
    node: String,
    /// Time of the command being applied, stamped on acks.
    now_ms: u64,
    capacity: u32,
    agents: BTreeMap<String, HostedAgent>,
    generation: u64,
    draining: bool,
    stopping: bool,
    recent: RecentIds,
}

impl AgentTable {
    pub fn new(node: &str, capacity: u32) -> Self {
        AgentTable {
            node: node.to_owned(),
            now_ms: 0,
            capacity,
            agents: BTreeMap::new(),
            generation: 0,
            draining: false,
            stopping: false,
            recent: RecentIds::new(),
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Whether agent `name` is hosted here.
    pub fn hosts(&self, name: &str) -> bool {
        self.agents.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.agents.keys().cloned().collect()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A coordinator announced its generation (its lease term): commands
    /// of older generations are ignored from now on. True if it rose.
    pub fn observe_generation(&mut self, generation: u64) -> bool {
        let rose = generation > self.generation;
        self.generation = self.generation.max(generation);
        rose
    }

    /// Draining as announced: told by the coordinator, or stopping.
    pub fn draining(&self) -> bool {
        self.draining || self.stopping
    }

    /// Turns accepted and not answered yet: running plus queued.
    pub fn turns_in_flight(&self) -> usize {
        self.agents
            .values()
            .map(|a| a.queue.len() + usize::from(a.running.is_some()))
            .sum()
    }

    /// Turns waiting behind another turn of their agent.
    pub fn turns_queued(&self) -> usize {
        self.agents.values().map(|a| a.queue.len()).sum()
    }

    pub fn views(&self) -> Vec<AgentView> {
        self.agents
            .values()
            .map(|a| AgentView {
                name: a.spec.name.clone(),
                model: a.spec.model.clone(),
                state: "running",
                node: self.node.clone(),
                system: a.spec.system.clone(),
                labels: a.spec.labels.clone(),
                placement: a.placement,
                busy: a.running.is_some(),
                queued_turns: a.queue.len(),
                turns_completed: a.turns_completed,
                since_ms: a.since_ms,
            })
            .collect()
    }

    /// Applies one command received at `now`.
    pub fn apply(&mut self, command: Command, now: At) -> Vec<Effect> {
        let now_ms = now.wall_ms;
        let Command {
            id,
            generation,
            body,
            ..
        } = command;
        self.now_ms = now_ms;
        if !self.recent.insert(&id) {
            if let CommandBody::Turn(request) = body {
                if !self.holds_turn(&request.agent, &id) {
                    // Ran here, and its answer (which the node would have
                    // published again) is forgotten: say so at once rather
                    // than let the caller wait out its timeout.
                    let reason = format!(
                        "turn {id} ran on node {} earlier and its answer is no longer held; run it again",
                        self.node
                    );
                    let turn = Turn {
                        id,
                        generation,
                        request,
                        deadline_mono_ms: None,
                    };
                    return vec![failed(turn, TurnErrorCode::Forgotten, reason)];
                }
            }
            return vec![Effect::Ignored {
                id,
                reason: "repeated command id (already applied)".into(),
            }];
        }
        if generation < self.generation {
            return vec![Effect::Ignored {
                id,
                reason: format!(
                    "stale coordinator generation {generation} (current is {})",
                    self.generation
                ),
            }];
        }
        self.generation = generation;
        let kind = body.kind();
        match body {
            CommandBody::Assign { agent, placement } => {
                self.assign(id, generation, agent, placement, now_ms)
            }
            CommandBody::AssignBatch { agents } => {
                self.assign_batch(id, generation, agents, now_ms)
            }
            CommandBody::Release { agent, placement } => {
                self.release(id, generation, &agent, placement)
            }
            CommandBody::ListAgents => vec![Effect::ListAgents { generation }],
            CommandBody::Drain { draining } => {
                let changed = self.draining != draining;
                self.draining = draining;
                let mut effects = vec![self.ack(id, generation, kind, None, None, true, None)];
                if changed {
                    effects.push(Effect::CapacityChanged);
                }
                effects
            }
            CommandBody::Turn(request) => {
                let turn = Turn {
                    id,
                    generation,
                    deadline_mono_ms: request.timeout_ms.map(|t| now.mono_ms.saturating_add(t)),
                    request,
                };
                vec![self.accept_turn(turn, now.mono_ms)]
            }
            CommandBody::Cancel { agent, turn } => vec![self.cancel(id, &agent, turn)],
            CommandBody::Pull { model } => vec![Effect::Pull {
                id,
                generation,
                model,
            }],
        }
    }

    /// Cancels turn `turn` of agent `name`: a queued one fails at once as
    /// `cancelled`, a running one is the node's to stop.
    fn cancel(&mut self, id: String, name: &str, turn: String) -> Effect {
        let Some(agent) = self.agents.get_mut(name) else {
            let reason = format!("cancel of turn {turn}: agent {name} is not hosted here");
            return Effect::Ignored { id, reason };
        };
        if agent.running.as_deref() == Some(turn.as_str()) {
            return Effect::CancelRunning {
                agent: name.to_owned(),
                turn,
            };
        }
        match agent.queue.iter().position(|t| t.id == turn) {
            Some(i) => {
                let queued = agent.queue.remove(i).expect("position is in the queue");
                let reason = format!("turn {turn} of {name} was cancelled before it ran");
                failed(queued, TurnErrorCode::Cancelled, reason)
            }
            None => {
                let reason = format!("cancel of turn {turn}: not running or queued for {name}");
                Effect::Ignored { id, reason }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ack(
        &self,
        id: String,
        generation: u64,
        command: CommandKind,
        agent: Option<String>,
        placement: Option<u64>,
        ok: bool,
        reason: Option<String>,
    ) -> Effect {
        Effect::Ack {
            id,
            generation,
            ack: Ack {
                command,
                agent,
                placement,
                ok,
                reason,
                agents_running: self.agents.len() as u32,
                ts: self.now_ms,
                // Set by the node, which numbers its capacity messages.
                seq: 0,
            },
        }
    }

    fn assign(
        &mut self,
        id: String,
        generation: u64,
        spec: AgentSpec,
        placement: u64,
        now_ms: u64,
    ) -> Vec<Effect> {
        let name = spec.name.clone();
        let (outcome, changed) = self.host(spec, placement, now_ms);
        let (ok, reason) = match outcome {
            Ok(note) => (true, note),
            Err(reason) => (false, Some(reason)),
        };
        let kind = CommandKind::Assign;
        let mut effects = vec![self.ack(
            id,
            generation,
            kind,
            Some(name),
            Some(placement),
            ok,
            reason,
        )];
        if changed {
            effects.push(Effect::CapacityChanged);
        }
        effects
    }

    /// Hosts every agent of `agents` that it can, in one step.
    fn assign_batch(
        &mut self,
        id: String,
        generation: u64,
        agents: Vec<Assignment>,
        now_ms: u64,
    ) -> Vec<Effect> {
        let mut changed = false;
        let mut acks = Vec::with_capacity(agents.len());
        for Assignment { agent, placement } in agents {
            let name = agent.name.clone();
            let (outcome, change) = self.host(agent, placement, now_ms);
            changed |= change;
            let (ok, reason) = match outcome {
                Ok(note) => (true, note),
                Err(reason) => (false, Some(reason)),
            };
            acks.push(AckItem {
                agent: name,
                placement,
                ok,
                reason,
            });
        }
        let batch = AckBatch {
            command: CommandKind::Assign,
            acks,
            agents_running: self.agents.len() as u32,
            ts: now_ms,
            // Set by the node, which numbers its messages.
            seq: 0,
        };
        let mut effects = vec![Effect::AckBatch {
            id,
            generation,
            batch,
        }];
        if changed {
            effects.push(Effect::CapacityChanged);
        }
        effects
    }

    /// Hosts `spec` under `placement`: `Ok` with a note for an agent
    /// already hosted, or why not; and whether what the node announces
    /// changed.
    fn host(
        &mut self,
        mut spec: AgentSpec,
        placement: u64,
        now_ms: u64,
    ) -> (Result<Option<String>, String>, bool) {
        spec.model = normalize_model(&spec.model);
        let name = spec.name.clone();
        if self.stopping {
            return (Err(format!("node {} is shutting down", self.node)), false);
        }
        if let Some(hosted) = self.agents.get_mut(&name) {
            if placement < hosted.placement {
                let reason = format!(
                    "stale placement {placement}: node {} hosts {name} under newer placement {}",
                    self.node, hosted.placement
                );
                return (Err(reason), false);
            }
            let changed = hosted.spec != spec;
            hosted.placement = placement;
            hosted.spec = spec;
            return (Ok(Some("already hosted".into())), changed);
        }
        if self.draining {
            return (Err(format!("node {} is draining", self.node)), false);
        }
        if self.agents.len() >= self.capacity as usize {
            let reason = format!(
                "node {} is full: agent_capacity is {} and {} agents are hosted",
                self.node,
                self.capacity,
                self.agents.len()
            );
            return (Err(reason), false);
        }
        self.agents.insert(
            name,
            HostedAgent {
                spec,
                placement,
                since_ms: now_ms,
                running: None,
                queue: VecDeque::new(),
                turns_completed: 0,
            },
        );
        (Ok(None), true)
    }

    fn release(&mut self, id: String, generation: u64, name: &str, placement: u64) -> Vec<Effect> {
        let ack = |table: &Self, ok: bool, reason: Option<String>| {
            table.ack(
                id.clone(),
                generation,
                CommandKind::Release,
                Some(name.to_owned()),
                Some(placement),
                ok,
                reason,
            )
        };
        match self.agents.get(name) {
            None => vec![ack(self, true, Some("not hosted".into()))],
            Some(hosted) if placement < hosted.placement => {
                let reason = format!(
                    "stale placement {placement}: node {} hosts {name} under newer placement {}",
                    self.node, hosted.placement
                );
                vec![ack(self, false, Some(reason))]
            }
            Some(_) => {
                let mut effects = self.remove(name, TurnErrorCode::Released);
                effects.insert(0, ack(self, true, None));
                effects.push(Effect::CapacityChanged);
                effects
            }
        }
    }

    /// Removes an agent; its queued turns fail with `code`. A turn already
    /// running is the node's to stop: it aborts the turns of agents it no
    /// longer hosts (see `Node::stop_orphaned_turns`).
    fn remove(&mut self, name: &str, code: TurnErrorCode) -> Vec<Effect> {
        let Some(agent) = self.agents.remove(name) else {
            return vec![];
        };
        let node = self.node.clone();
        agent
            .queue
            .into_iter()
            .map(|turn| {
                let reason = match code {
                    TurnErrorCode::Fenced => {
                        format!(
                            "node {node} fenced (no heartbeat echoed by the broker for fence_secs) and stopped agent {name}"
                        )
                    }
                    _ => format!("agent {name} was released from node {node} before the turn ran"),
                };
                failed(turn, code, reason)
            })
            .collect()
    }

    fn accept_turn(&mut self, turn: Turn, mono_ms: u64) -> Effect {
        let name = turn.request.agent.clone();
        if self.stopping {
            let reason = format!("node {} is shutting down and takes no new turns", self.node);
            return failed(turn, TurnErrorCode::ShuttingDown, reason);
        }
        let Some(agent) = self.agents.get_mut(&name) else {
            let reason = format!("agent {name} is not hosted on node {}", self.node);
            return failed(turn, TurnErrorCode::AgentNotAssigned, reason);
        };
        if agent.running.is_some() {
            if agent.queue.len() >= MAX_QUEUED_TURNS_PER_AGENT {
                let reason = format!(
                    "agent {name} already has {MAX_QUEUED_TURNS_PER_AGENT} turns waiting on node {}",
                    self.node
                );
                return failed(turn, TurnErrorCode::OllamaBusy, reason);
            }
            agent.queue.push_back(turn);
            return Effect::Queued;
        }
        start_or_expire(agent, turn, mono_ms)
    }

    /// The turn `turn_id` of agent `name` ended; returns what to do next for
    /// that agent (start its next queued turn, or fail expired ones).
    /// `mono_ms` is the node's monotonic clock.
    pub fn turn_finished(&mut self, name: &str, turn_id: &str, mono_ms: u64) -> Vec<Effect> {
        let Some(agent) = self.agents.get_mut(name) else {
            return vec![];
        };
        if agent.running.as_deref() != Some(turn_id) {
            return vec![];
        }
        agent.running = None;
        agent.turns_completed += 1;
        let mut effects = Vec::new();
        while let Some(next) = agent.queue.pop_front() {
            let effect = start_or_expire(agent, next, mono_ms);
            let started = matches!(effect, Effect::StartTurn { .. });
            effects.push(effect);
            if started {
                break;
            }
        }
        effects
    }

    /// Takes no new work from now on (SIGTERM).
    pub fn set_stopping(&mut self) {
        self.stopping = true;
    }

    /// Whether turn `id` of `agent` is running or queued here.
    fn holds_turn(&self, agent: &str, id: &str) -> bool {
        self.agents
            .get(agent)
            .is_some_and(|a| a.running.as_deref() == Some(id) || a.queue.iter().any(|t| t.id == id))
    }

    /// Queued turns, removed; running turns stay (their ids are returned by
    /// [`AgentTable::running_turns`]).
    pub fn take_queued(&mut self) -> Vec<Turn> {
        self.agents
            .values_mut()
            .flat_map(|a| a.queue.drain(..))
            .collect()
    }

    /// Stops every agent (fencing); returns failed results for queued turns.
    pub fn remove_all(&mut self, code: TurnErrorCode) -> Vec<Effect> {
        let names = self.names();
        names.iter().flat_map(|n| self.remove(n, code)).collect()
    }
}

fn start_or_expire(agent: &mut HostedAgent, turn: Turn, mono_ms: u64) -> Effect {
    if let Some(deadline) = turn.deadline_mono_ms {
        if deadline <= mono_ms {
            let reason = format!(
                "the turn's budget ran out {} ms before agent {} could run it",
                mono_ms - deadline,
                agent.spec.name
            );
            return failed(turn, TurnErrorCode::Expired, reason);
        }
    }
    agent.running = Some(turn.id.clone());
    Effect::StartTurn {
        model: agent.spec.model.clone(),
        system: turn
            .request
            .system
            .clone()
            .or_else(|| agent.spec.system.clone()),
        turn,
    }
}

/// A failed result for `turn`.
pub fn failed(turn: Turn, code: TurnErrorCode, reason: String) -> Effect {
    let result = TurnResult::failed(&turn.request.agent, turn.request.job.clone(), code, reason);
    Effect::TurnFailed { turn, result }
}

#[cfg(test)]
mod tests;
