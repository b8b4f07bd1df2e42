//! The node daemon (`pifleet node`): one per Pi. It announces the Pi's
//! capacity over MQTT, hosts up to `agent_capacity` agents as the coordinator
//! commands, and runs their chat turns through the local Ollama.
//!
//! One task, the main loop in this file, owns all state (the
//! [`agents::AgentTable`]) and reacts to:
//!
//! * link events: on every ConnAck it announces `online`, its capacity and
//!   subscribes again (clean sessions); commands go through the table;
//! * turn completions from a `JoinSet` of turn tasks; each turn task waits
//!   for one of `ollama.max_parallel` semaphore permits (FIFO), then calls
//!   Ollama with a timeout;
//! * probe reports every `heartbeat_secs` (capacity heartbeat);
//! * queries from the HTTP API;
//! * a one-second tick for the watchdog;
//! * the end of the node's [`lease::Lease`]: `fence_secs` after the last
//!   heartbeat the broker echoed back was sent, it stops every agent and
//!   aborts their running turns (checked too before acting on anything from
//!   the link);
//! * shutdown: take no new work, let turns in flight finish within
//!   `shutdown_grace_secs`, fail the rest, publish `offline`, disconnect.

pub mod agents;
pub mod answered;
pub mod api;
pub mod lease;
mod listed;
pub mod metrics;
pub mod ollama;
pub mod probe;
mod publish;
mod pull;
mod start;
mod stream;
mod turn;

pub use start::{run, run_simulated};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use std::time::Instant;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::timing::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::mqtt::{LinkError, LinkEvent, Publisher};
use crate::protocol::{
    decode_command, encode, mono_ms, AckItem, LeaderInfo, NodeTopic, Reply, ReplyBody, Topics,
    TurnErrorCode, TurnResult, STATUS_OFFLINE, STATUS_ONLINE,
};
use crate::systemd::{self, Liveness};
use agents::{AgentTable, At, Effect};
use answered::AnsweredTurns;
use lease::Lease;
use ollama::OllamaClient;
use probe::ProbeReport;

/// Set by `pifleet up` to its own process id: a node whose parent is no
/// longer that process stops gracefully (checked every second).
pub const PARENT_PID_ENV: &str = "PIFLEET_UP_PID";

/// Capacity changes within this window are published as one message.
const CAPACITY_DEBOUNCE: Duration = Duration::from_millis(200);

/// Bytes of commands held while the node waits for its first heartbeat's
/// echo.
const HELD_MAX_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on api.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("capacity probe: {0}")]
    Probe(String),
}

/// What a turn task hands back to the main loop.
struct TurnDone {
    id: String,
    generation: u64,
    agent: String,
    result: TurnResult,
}

/// What the main loop knows of a running turn task, to answer for it if the
/// task dies or the grace period runs out.
struct RunningTurn {
    id: String,
    generation: u64,
    agent: String,
    job: Option<String>,
    /// Stops the task and its Ollama call (fencing).
    abort: tokio::task::AbortHandle,
}

struct Node {
    config: NodeConfig,
    topics: Topics,
    table: AgentTable,
    session: String,
    seq: u64,
    publisher: Publisher,
    probe: ProbeReport,
    probed: bool,
    connected: Arc<AtomicBool>,
    announced_ready: bool,
    /// Tell systemd when ready (the daemon; not a simulated node).
    notify_systemd: bool,
    disconnected_since: Option<Instant>,
    /// The node's lease on its agents: renewed by its own heartbeats
    /// echoed back by the broker.
    lease: Lease,
    /// The capacity changed since it was last published.
    dirty: bool,
    /// Commands received before the lease began ([`Node::on_command_or_hold`]).
    held: Vec<(String, Bytes, At)>,
    /// The agent list as last published.
    published: listed::Published,
    /// What the last capacity message said besides the agent list and the
    /// probe's figures: a change of it is published at once.
    announced: Option<publish::Announced>,
    /// The generation of the last `list_agents` command: a coordinator of
    /// a newer generation gets long agent lists inline until it asks.
    list_generation: u64,
    last_capacity: Instant,
    turns: JoinSet<TurnDone>,
    running: HashMap<tokio::task::Id, RunningTurn>,
    /// `ollama.max_parallel` permits, shared by all turn tasks.
    slots: Arc<Semaphore>,
    ollama: OllamaClient,
    metrics: Arc<metrics::NodeMetrics>,
    liveness: Liveness,
    stopping: bool,
    /// Answers of recent turns, for turn commands that arrive again.
    answered: AnsweredTurns,
    pulls: pull::Pulls,
    /// The `pifleet up` process that started this node, if any.
    parent: Option<rustix::process::Pid>,
    /// The generation of the last coordinator that sent a batch of
    /// commands (0: none): the results of its turns may go as batches.
    batch_generation: u64,
}

impl Node {
    async fn run(
        &mut self,
        events: &mut mpsc::Receiver<LinkEvent>,
        mut probes: mpsc::Receiver<ProbeReport>,
        mut queries: mpsc::Receiver<api::Query>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut grace_ends: Option<Instant> = None;
        loop {
            self.liveness.beat();
            // Whatever wakes the loop (a query too), a lease that ran out
            // is acted on first.
            self.check_fence();
            self.update_gauges();
            if self.stopping && self.turns.is_empty() && self.table.turns_in_flight() == 0 {
                log::info!("all turns in flight are answered");
                return;
            }
            let publish_at =
                (self.dirty && self.is_connected()).then(|| self.last_capacity + CAPACITY_DEBOUNCE);
            // The fence fires at the lease's end, not on a tick.
            let fence_at = if self.table.is_empty() && self.running.is_empty() {
                None
            } else {
                Some(self.lease.expires_at().unwrap_or_else(Instant::now))
            };
            tokio::select! {
                _ = shutdown.cancelled(), if !self.stopping => {
                    grace_ends = Some(Instant::now() + self.config.shutdown_grace);
                    self.begin_shutdown();
                }
                _ = sleep_until(grace_ends) => {
                    self.grace_ran_out();
                    return;
                }
                event = events.recv() => match event {
                    Some(event) => self.on_link(event),
                    None => {
                        log::error!("the MQTT link stopped unexpectedly");
                        return;
                    }
                },
                Some(report) = probes.recv() => self.on_probe(report),
                Some(query) = queries.recv() => {
                    // A lease that ran out (a thaw) is acted on before
                    // anything is reported.
                    self.check_fence();
                    match query {
                        api::Query::Agents(reply) => { let _ = reply.send(self.table.views()); }
                    }
                }
                Some(done) = self.turns.join_next_with_id(), if !self.turns.is_empty() => self.on_turn_done(done),
                Some(done) = self.pulls.done.recv() => self.on_pull_done(done),
                _ = sleep_until(publish_at) => self.publish_change(),
                _ = sleep_until(fence_at) => self.check_fence(),
                _ = tick.tick() => self.check_parent(&shutdown),
            }
        }
    }

    /// Stops the node when the `pifleet up` that started it is gone.
    fn check_parent(&mut self, shutdown: &CancellationToken) {
        let Some(parent) = self.parent else { return };
        if rustix::process::getppid() != Some(parent) {
            log::warn!(
                "pifleet up (pid {}) that started this node is gone; stopping",
                parent.as_raw_nonzero()
            );
            self.parent = None;
            shutdown.cancel();
        }
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn update_gauges(&self) {
        self.metrics.agents_running.set(self.table.len() as i64);
        self.metrics
            .turns_in_flight
            .set(self.table.turns_in_flight() as i64);
        self.metrics
            .turns_queued
            .set(self.table.turns_queued() as i64);
        self.metrics
            .mqtt_connected
            .set(i64::from(self.is_connected()));
    }

    fn on_link(&mut self, event: LinkEvent) {
        // Back after a silence (a cut, a freeze), the lease is checked
        // before any command, connection or message is acted on.
        self.check_fence();
        match event {
            LinkEvent::Connected => {
                if self.announced_ready {
                    self.metrics.mqtt_reconnects.inc();
                }
                if let Some(since) = self.disconnected_since.take() {
                    log::debug!("broker was away for {:?}", since.elapsed());
                }
                let node = &self.config.node_id;
                let filters = vec![
                    self.topics.node(node, NodeTopic::Command),
                    self.topics.node(node, NodeTopic::Status),
                    // Our own heartbeats, echoed: the lease's proof.
                    self.topics.node(node, NodeTopic::Capacity),
                    // The leading coordinator's term: fences a deposed one.
                    self.topics.coordinator_leader(),
                    // A coordinator (re)starting: it may be one that reads
                    // only inline agent lists, until it asks for one.
                    self.topics.coordinator_status(),
                ];
                if let Err(e) = self.publisher.subscribe(filters) {
                    log::error!("cannot subscribe: {e}");
                }
            }
            LinkEvent::Subscribed => {
                // Commands now reach us: only now say we are here.
                self.connected.store(true, Ordering::Relaxed);
                self.publish_status(STATUS_ONLINE);
                self.publish_capacity();
                log::info!(
                    "node {} ready: online, subscribed to {}",
                    self.config.node_id,
                    self.topics.node(&self.config.node_id, NodeTopic::Command)
                );
                if !self.announced_ready && self.notify_systemd {
                    systemd::notify_ready(&format!(
                        "node {} online, {} agent slots",
                        self.config.node_id, self.config.agent_capacity
                    ));
                }
                self.announced_ready = true;
            }
            LinkEvent::Disconnected { reason } => {
                self.connected.store(false, Ordering::Relaxed);
                self.disconnected_since.get_or_insert_with(Instant::now);
                log::warn!(
                    "lost the MQTT broker ({reason}); agents keep running until fence_secs of silence"
                );
            }
            LinkEvent::Message {
                topic,
                payload,
                retain,
            } => match self.topics.parse_node_topic(&topic) {
                Some((node, NodeTopic::Command)) if node == self.config.node_id => {
                    self.on_command_or_hold(topic, payload)
                }
                // A retained replay is the state from before our announcement.
                Some((node, NodeTopic::Status)) if node == self.config.node_id && !retain => {
                    self.on_own_status(&payload)
                }
                Some((node, NodeTopic::Capacity)) if node == self.config.node_id => {
                    if self.lease.echoed(&payload) {
                        self.apply_held();
                    }
                }
                _ if topic == self.topics.coordinator_leader() => self.on_leader(&payload),
                _ if topic == self.topics.coordinator_status() => {
                    if !retain && &payload[..] == STATUS_ONLINE.as_bytes() {
                        self.list_generation = 0;
                        self.dirty = true;
                    }
                }
                _ => log::debug!("ignored a message on {topic}"),
            },
        }
    }

    /// A live `offline` for this node while it is up is the late last will
    /// of a previous connection: replace it, or dashboards and the
    /// coordinator would see a live node as gone.
    fn on_own_status(&mut self, payload: &Bytes) {
        if payload.as_ref() == STATUS_OFFLINE.as_bytes() && !self.stopping && self.is_connected() {
            log::warn!("a stale 'offline' (an older connection's last will) replaced this node's status; announcing online again");
            self.publish_status(STATUS_ONLINE);
            self.publish_capacity();
        }
    }

    /// A coordinator took the lead: from now on, commands of older terms
    /// (a deposed leader's, still in flight) are ignored.
    fn on_leader(&mut self, payload: &Bytes) {
        match crate::protocol::decode::<LeaderInfo>(payload, self.publisher.max_payload()) {
            Ok(info) => {
                if self.table.observe_generation(info.term) {
                    log::info!(
                        "coordinator {} leads with term {}: commands of older terms are ignored",
                        info.leader,
                        info.term
                    );
                }
            }
            Err(e) => log::warn!("ignored a leader announcement: {e}"),
        }
    }

    /// Commands wait for the lease's first proof: a node that hosted
    /// agents before it would have to fence them at once. Each keeps the
    /// time it arrived (a turn's budget counts from then).
    fn on_command_or_hold(&mut self, topic: String, payload: Bytes) {
        if self.lease.expires_at().is_some() {
            return self.on_command(&topic, &payload, At::now());
        }
        let held: usize = self.held.iter().map(|(_, p, _)| p.len()).sum();
        if held + payload.len() > HELD_MAX_BYTES {
            log::warn!("ignored a command on {topic}: {held} bytes of commands already wait for the broker to echo the first heartbeat");
            return;
        }
        self.held.push((topic, payload, At::now()));
    }

    fn apply_held(&mut self) {
        for (topic, payload, at) in std::mem::take(&mut self.held) {
            self.on_command(&topic, &payload, at);
        }
    }

    fn on_command(&mut self, topic: &str, payload: &[u8], at: At) {
        if !crate::protocol::is_batch(payload) {
            return self.on_one_command(topic, payload, at, false);
        }
        match crate::protocol::split_batch(payload, self.publisher.max_payload()) {
            Ok(commands) => {
                for command in commands {
                    self.on_one_command(topic, command, at, true);
                }
            }
            Err(e) => {
                log::warn!("ignored a batch of commands on {topic}: {e}");
                self.metrics.command("invalid", "rejected");
            }
        }
    }

    fn on_one_command(&mut self, topic: &str, payload: &[u8], at: At, batched: bool) {
        let command =
            match decode_command(payload, self.publisher.max_payload(), &self.config.node_id) {
                Ok(command) => command,
                Err(e) => {
                    log::warn!("ignored a command on {topic}: {e}");
                    self.metrics.command("invalid", "rejected");
                    return;
                }
            };
        if batched {
            self.batch_generation = command.generation;
        }
        if self.answer_again(&command) {
            return;
        }
        let generation = self.table.generation();
        let effects = self.table.apply(command, at);
        if self.table.generation() > generation && generation > 0 {
            log::info!("coordinator generation is now {}", self.table.generation());
        }
        self.stop_orphaned_turns();
        self.apply(effects);
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Ack {
                    id,
                    generation,
                    mut ack,
                } => {
                    // The next capacity message (seq + 1) reflects it.
                    ack.seq = self.seq;
                    let kind = format!("{:?}", ack.command).to_lowercase();
                    let agent = ack.agent.as_deref().unwrap_or("-");
                    match (&ack.ok, &ack.reason) {
                        (true, None) => log::info!(
                            "{kind} {agent}: done ({} agents hosted)",
                            ack.agents_running
                        ),
                        (true, Some(note)) => log::info!("{kind} {agent}: {note}"),
                        (false, reason) => log::warn!(
                            "{kind} {agent} refused: {}",
                            reason.as_deref().unwrap_or("")
                        ),
                    }
                    self.metrics
                        .command(&kind, if ack.ok { "applied" } else { "refused" });
                    self.reply(id, generation, ReplyBody::Ack(ack));
                }
                Effect::TurnFailed { turn, result } => {
                    if let Some(error) = &result.error {
                        log::warn!(
                            "turn {} for {} failed: {}",
                            turn.id,
                            result.agent,
                            error.reason
                        );
                    }
                    self.metrics.command("turn", "refused");
                    self.reply(turn.id, turn.generation, ReplyBody::TurnResult(result));
                }
                Effect::StartTurn {
                    turn,
                    model,
                    system,
                } => {
                    self.metrics.command("turn", "applied");
                    self.start_turn(turn, model, system);
                }
                Effect::Queued => self.metrics.command("turn", "queued"),
                Effect::AckBatch {
                    id,
                    generation,
                    mut batch,
                } => {
                    batch.seq = self.seq;
                    let refused: Vec<&AckItem> = batch.acks.iter().filter(|a| !a.ok).collect();
                    for a in &batch.acks {
                        log::debug!("assign {}: ok={} {:?}", a.agent, a.ok, a.reason);
                    }
                    let hosted = batch.agents_running;
                    match refused.first() {
                        None => log::info!(
                            "assigned {} agents in one batch ({hosted} agents hosted)",
                            batch.acks.len()
                        ),
                        Some(first) => log::warn!(
                            "assigned {} agents of a batch of {} and refused {} ({}: {}) ({hosted} agents hosted)",
                            batch.acks.len() - refused.len(),
                            batch.acks.len(),
                            refused.len(),
                            first.agent,
                            first.reason.as_deref().unwrap_or("")
                        ),
                    }
                    let refused = refused.len() as u64;
                    let applied = batch.acks.len() as u64 - refused;
                    self.metrics.commands("assign", "applied", applied);
                    self.metrics.commands("assign", "refused", refused);
                    self.reply(id, generation, ReplyBody::AckBatch(batch));
                }
                Effect::ListAgents { generation } => {
                    self.list_generation = self.list_generation.max(generation);
                    self.publish_whole_list();
                }
                Effect::CapacityChanged => self.dirty = true,
                Effect::Ignored { id, reason } => {
                    log::info!("ignored command {id}: {reason}");
                    self.metrics.command("any", "ignored");
                }
                Effect::CancelRunning { agent, turn } => self.cancel_running(&agent, &turn),
                Effect::Pull {
                    id,
                    generation,
                    model,
                } => {
                    let model = crate::protocol::normalize_model(&model);
                    let replies = self.reply_sink(&id, generation);
                    if self
                        .pulls
                        .start(model.clone(), self.ollama.clone(), replies)
                    {
                        self.metrics.command("pull", "applied");
                    } else {
                        log::info!("pull of {model}: already being pulled");
                    }
                }
            }
        }
    }

    /// A pull ended: a pulled model is listed at once, so that the
    /// coordinator can place the agents that wait for it.
    fn on_pull_done(&mut self, done: pull::PullDone) {
        self.pulls.finished(&done.model);
        if done.ok && !self.probe.models.contains(&done.model) {
            self.probe.models.push(done.model);
            self.probe.models.sort();
            self.dirty = true;
        }
    }

    fn on_probe(&mut self, report: ProbeReport) {
        if report.ollama_reachable != self.probe.ollama_reachable || !self.probed {
            match &report.ollama_error {
                Some(e) => {
                    log::warn!("{e}; the node keeps running and reports ollama_reachable=false")
                }
                None => log::info!(
                    "Ollama at {} is reachable with {} models",
                    self.ollama.url(),
                    report.models.len()
                ),
            }
        } else if report.models != self.probe.models {
            log::info!("Ollama models are now {:?}", report.models);
        }
        self.metrics
            .ollama_reachable
            .set(i64::from(report.ollama_reachable));
        self.metrics.thermal(report.temperature_c, report.throttled);
        self.probe = report;
        self.probed = true;
        // Every probe report is a heartbeat.
        self.publish_capacity();
    }

    /// The node's lease ([`Lease`]): once it ran out, cut off or frozen,
    /// the node must assume that the coordinator placed its agents
    /// elsewhere. It stops them all and aborts their running turns (and so
    /// their Ollama calls) before it acts on or announces anything else.
    fn check_fence(&mut self) {
        let now = Instant::now();
        if !self.lease.expired(now) || (self.table.is_empty() && self.running.is_empty()) {
            return;
        }
        let fence = self.lease.fence_after().as_secs_f64();
        let since = match self.lease.age(now) {
            Some(age) => format!("{:.1}s ago", age.as_secs_f64()),
            None => "never".into(),
        };
        log::warn!(
            "fenced: the broker last echoed a heartbeat sent {since} (fence_secs = {fence}): stopping all {} agents and aborting {} running turns so that none runs twice once the coordinator moves them",
            self.table.len(),
            self.running.len()
        );
        let reason = format!(
            "node {} fenced (no heartbeat confirmed by the broker for {fence}s): the turn was stopped",
            self.config.node_id
        );
        for (_, turn) in std::mem::take(&mut self.running) {
            turn.abort.abort();
            self.metrics.turns_fenced.inc();
            let result =
                TurnResult::failed(&turn.agent, turn.job, TurnErrorCode::Fenced, reason.clone());
            self.reply(turn.id, turn.generation, ReplyBody::TurnResult(result));
        }
        self.metrics.fences.inc();
        let effects = self.table.remove_all(TurnErrorCode::Fenced);
        self.apply(effects);
        self.dirty = true;
    }

    fn begin_shutdown(&mut self) {
        systemd::notify_stopping();
        self.stopping = true;
        self.table.set_stopping();
        self.dirty = true;
        log::info!(
            "stopping: taking no new work; {} turns in flight get up to {}s (shutdown_grace_secs)",
            self.table.turns_in_flight(),
            self.config.shutdown_grace.as_secs()
        );
    }

    fn grace_ran_out(&mut self) {
        let grace = self.config.shutdown_grace.as_secs();
        let reason = format!(
            "node {} stopped: its {grace}s grace period ran out first",
            self.config.node_id
        );
        let mut unfinished = 0;
        for turn in self.table.take_queued() {
            unfinished += 1;
            let result = TurnResult::failed(
                &turn.request.agent,
                turn.request.job.clone(),
                TurnErrorCode::ShuttingDown,
                reason.clone(),
            );
            self.reply(turn.id, turn.generation, ReplyBody::TurnResult(result));
        }
        for (_, turn) in std::mem::take(&mut self.running) {
            unfinished += 1;
            let result = TurnResult::failed(
                &turn.agent,
                turn.job,
                TurnErrorCode::ShuttingDown,
                reason.clone(),
            );
            self.reply(turn.id, turn.generation, ReplyBody::TurnResult(result));
        }
        self.turns.abort_all();
        log::warn!("grace period of {grace}s ran out: {unfinished} turns answered as failed (shutting_down)");
    }

    fn reply(&mut self, id: String, generation: u64, body: ReplyBody) {
        let topic = self.topics.node(&self.config.node_id, NodeTopic::Reply);
        let is_turn = matches!(body, ReplyBody::TurnResult(_));
        let mut reply = Reply {
            id,
            node: self.config.node_id.clone(),
            session: self.session.clone(),
            generation,
            body,
        };
        let mut payload = encode(&reply);
        let max = self.publisher.max_payload();
        if payload.len() > max {
            let ReplyBody::TurnResult(result) = &reply.body else {
                log::error!(
                    "reply {} of {} bytes exceeds max_payload_bytes ({max})",
                    reply.id,
                    payload.len()
                );
                return;
            };
            let reason = format!(
                "the answer ({} bytes as JSON) exceeds mqtt.max_payload_bytes ({max})",
                payload.len()
            );
            let failed = TurnResult::failed(
                &result.agent,
                result.job.clone(),
                TurnErrorCode::OllamaError,
                reason,
            );
            reply.body = ReplyBody::TurnResult(failed);
            payload = encode(&reply);
        }
        if is_turn {
            self.answered.insert(reply.id.clone(), payload.clone());
        }
        // Results go in batches to a coordinator that sends them.
        let published = if is_turn && generation == self.batch_generation && generation > 0 {
            self.publisher.publish_batched(topic, payload, None)
        } else {
            self.publisher.publish(topic, payload, false)
        };
        if let Err(e) = published {
            log::error!("cannot publish reply {}: {e}", reply.id);
        }
    }

    /// A turn command seen before whose answer is remembered: the answer was
    /// probably lost on its way, so it is published again. True if so.
    fn answer_again(&self, command: &crate::protocol::Command) -> bool {
        if !matches!(command.body, crate::protocol::CommandBody::Turn(_)) {
            return false;
        }
        let Some(payload) = self.answered.get(&command.id) else {
            return false;
        };
        log::info!(
            "turn {} arrived again: publishing its answer again",
            command.id
        );
        let topic = self.topics.node(&self.config.node_id, NodeTopic::Reply);
        if let Err(e) = self.publisher.publish(topic, payload.to_vec(), false) {
            log::error!("cannot publish reply {}: {e}", command.id);
        }
        self.metrics.command("turn", "answered_again");
        true
    }

    fn publish_status(&self, status: &str) {
        let topic = self.topics.node(&self.config.node_id, NodeTopic::Status);
        if let Err(e) = self.publisher.publish(topic, status, true) {
            log::error!("cannot publish status {status}: {e}");
        }
    }
}
