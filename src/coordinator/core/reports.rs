use super::*;
use crate::protocol::fits_inline;

/// A node's unchanged list is compared with what we want there at least
/// this often.
const FULL_PASS_EVERY: Duration = Duration::from_secs(30);

impl Coordinator {
    /// The broker acknowledged our subscriptions: state replays follow.
    pub fn on_subscribed(&mut self, now: Now) {
        self.now = now;
        let now = self.now.at;
        if self.settled_at.is_some() && !self.link_up {
            // Back after an outage of our own: not hearing the nodes meanwhile
            // says nothing about them.
            self.fleet.heard_all(now);
        }
        if let Some(lost) = self.link_lost_at.take() {
            self.fail_fenced_turns(now.saturating_duration_since(lost));
        }
        self.link_up = true;
        // The broker may have lost retained configs (restarted without
        // persistence): publish them again.
        self.forget_announcements();
        self.settled_at
            .get_or_insert(now + Duration::from_millis(500));
    }

    /// The coordinator lost the broker: node liveness waits until it is back.
    pub fn on_disconnected(&mut self, now: Now) {
        self.now = now;
        if self.link_up {
            self.link_lost_at = Some(now.at);
        }
        self.link_up = false;
        // Chats waiting for their agent's turn cannot be sent now: they
        // fail at once, retryable, rather than go out late or time out.
        let waiting: Vec<ChatWaiter> = self
            .agents
            .values_mut()
            .flat_map(|a| a.chats.drain(..))
            .collect();
        for waiter in waiting {
            self.answer(waiter.reply, Err(CoreError::NoBroker));
        }
    }

    /// How long after `node` was last heard it has surely stopped its
    /// agents: its announced `fence_ms`, else `node_lost_after`.
    pub(super) fn node_fence(&self, node: &str) -> Duration {
        self.fleet.fence(node, self.config.timeouts.node_lost_after)
    }

    /// After an outage of `outage`: chat turns on nodes whose fence is
    /// shorter have most likely been stopped there (the node could not
    /// renew its lease, unless only our own link was down); they fail now,
    /// retryable, rather than go out long after the caller asked. Job turns
    /// are sent again under their own id (`resend_turns`): a node that
    /// still runs one ignores it, one that finished answers it again, one
    /// that fenced says so, and none runs it twice.
    fn fail_fenced_turns(&mut self, outage: Duration) {
        let fenced: Vec<(String, String)> = self
            .turns
            .iter()
            .filter(|(_, t)| t.job().is_none() && outage >= self.node_fence(&t.node))
            .map(|(id, t)| (id.clone(), t.node.clone()))
            .collect();
        for (id, node) in fenced {
            let reason = format!(
                "the coordinator was cut off from the broker for {:.0}s, longer than {node}'s fence: the turn was stopped there",
                outage.as_secs_f64()
            );
            self.turn_failed(&id, TurnErrorCode::Fenced, reason, false);
        }
    }

    pub fn on_status(&mut self, node: &str, payload: &[u8], retained: bool, now: Now) {
        self.now = now;
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
        if let Some(change) = self.fleet.status(node, online, self.now.at) {
            self.on_change(change);
        }
        if online && !retained {
            // The node (re)subscribed just now: what was sent to it while
            // it was away is lost.
            self.resend_turns(Some(node), &format!("{node} announced itself"), now);
        }
    }

    pub fn on_capacity(&mut self, node: &str, payload: &[u8], retained: bool, now: Now) {
        self.now = now;
        if payload.is_empty() {
            return; // a cleared retained capacity (a forgotten node)
        }
        let capacity: Capacity =
            match crate::protocol::decode(payload, self.config.mqtt.max_payload_bytes) {
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
        match self.fleet.capacity(capacity.clone(), retained, self.now.at) {
            Heard::Stale => return,
            Heard::Accepted(change) => {
                if let Some(change) = change {
                    self.on_change(change);
                }
            }
        }
        let learned = self.lists.capacity(&capacity);
        let long_inline = capacity
            .agents
            .as_ref()
            .is_some_and(|names| capacity.agents_rev > 0 && !fits_inline(names));
        if long_inline {
            // The node has not seen us ask (a lost command): ask again.
            self.ask_for_list(node);
        }
        if self.fleet.is_online(node) {
            self.learned(node, learned);
        } else {
            self.reconciled.remove(node);
        }
    }

    /// An agent update of `node` (docs/PROTOCOL.md, "Agent lists").
    pub fn on_agents(&mut self, node: &str, payload: &[u8], now: Now) {
        self.now = now;
        let update: AgentUpdate =
            match crate::protocol::decode(payload, self.config.mqtt.max_payload_bytes) {
                Ok(u) => u,
                Err(e) => {
                    log::warn!("ignored an agent update of {node}: {e}");
                    return;
                }
            };
        if update.node != node {
            log::warn!(
                "ignored an agent update on the topic of {node} naming node {}",
                update.node
            );
            return;
        }
        let session = self.fleet.get(node).and_then(|v| v.session());
        let learned = self.lists.update(update, session);
        if self.fleet.is_online(node) {
            self.learned(node, learned);
        } else {
            // Compared with what we want once it is online again.
            self.reconciled.remove(node);
        }
    }

    /// Acts on what a node's message said about its agent list.
    fn learned(&mut self, node: &str, learned: Learned) {
        match learned {
            Learned::Stale => {}
            Learned::Unknown => self.ask_for_list(node),
            Learned::Same if !self.reconcile_due(node) => {}
            Learned::Whole | Learned::Same => {
                let Some(listed) = self.lists.take(node) else {
                    return;
                };
                self.reconcile_listed(node, listed.names.iter(), listed.seq);
                let unlisted: Vec<String> = self
                    .by_node
                    .get(node)
                    .into_iter()
                    .flatten()
                    .filter(|name| !listed.names.contains(*name))
                    .cloned()
                    .collect();
                self.reconcile_unlisted(node, unlisted, listed.seq);
                self.lists.put(node, listed);
                self.touched.remove(node);
                self.reconciled.insert(node.to_owned(), self.now.at);
            }
            Learned::Change { added, removed } => {
                let seq = self.lists.get(node).map_or(0, |l| l.seq);
                self.reconcile_listed(node, added.iter(), seq);
                self.reconcile_unlisted(node, removed, seq);
            }
        }
    }

    /// Whether a heartbeat saying that `node`'s list did not change calls
    /// for comparing it with what we want there again: our agents there
    /// changed since, a release of a stray may be due again, or
    /// `FULL_PASS_EVERY` passed (a long list costs a few µs per agent).
    fn reconcile_due(&self, node: &str) -> bool {
        self.touched.contains(node)
            || self.strays.keys().any(|(n, _)| n == node)
            || self
                .reconciled
                .get(node)
                .is_none_or(|at| self.now.at.duration_since(*at) >= FULL_PASS_EVERY)
    }

    /// Asks `node` for its whole agent list, at most once per
    /// `RESEND_AFTER`: until it comes, nothing is concluded from the list.
    pub(super) fn ask_for_list(&mut self, node: &str) {
        let now = self.now.at;
        if self
            .lists_asked
            .get(node)
            .is_some_and(|at| now.duration_since(*at) < RESEND_AFTER)
        {
            return;
        }
        self.lists_asked.insert(node.to_owned(), now);
        log::debug!("asking {node} for its agent list");
        self.send(node, CommandBody::ListAgents);
    }

    /// Agents `node` lists, as of its message `seq`, against what we want.
    fn reconcile_listed<'a>(
        &mut self,
        node: &str,
        names: impl Iterator<Item = &'a String>,
        seq: u64,
    ) {
        let now = self.now.at;
        let draining = self.flags.get(node).is_some_and(|f| f.draining);
        for name in names {
            let Some(a) = self.agents.get(name) else {
                self.release_stray(node, name, "not an agent of this coordinator");
                continue;
            };
            match a.state {
                AgentState::Running | AgentState::Assigned if a.on(node) => {
                    let confirm = a.state == AgentState::Assigned;
                    if let Some(a) = self.agents.get_mut(name) {
                        a.confirmed_seq = a.confirmed_seq.max(seq);
                    }
                    if confirm {
                        self.confirm(name, node, seq);
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
                        EventKind::Adopted,
                        Some(name),
                        Some(node),
                        format!("{name} already runs on {node}; keeping it there"),
                    );
                    self.set_state(name, AgentState::Running, Some(node.to_owned()));
                    if let Some(a) = self.agents.get_mut(name) {
                        a.confirmed_seq = seq;
                    }
                    self.dispatch(name);
                }
                AgentState::Releasing | AgentState::Stopping if a.on(node) => {}
                _ => self.release_stray(node, name, "it is wanted elsewhere or nowhere"),
            }
        }
    }

    /// Agents `node` does not list as of its message `seq`: those we place
    /// there are gone, unless confirmed by a later message.
    fn reconcile_unlisted(&mut self, node: &str, names: Vec<String>, seq: u64) {
        let gone: Vec<(String, AgentState)> = names
            .into_iter()
            .filter_map(|name| {
                let a = self.agents.get(&name)?;
                if !a.on(node) {
                    return None;
                }
                let gone = match a.state {
                    AgentState::Running => seq > a.confirmed_seq,
                    AgentState::Releasing | AgentState::Stopping => true,
                    _ => false,
                };
                let state = a.state;
                gone.then_some((name, state))
            })
            .collect();
        for (name, state) in gone {
            match state {
                AgentState::Running => {
                    self.event(
                        EventKind::Vanished,
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

    pub(super) fn release_stray(&mut self, node: &str, name: &str, why: &str) {
        let key = (node.to_owned(), name.to_owned());
        let now = self.now.at;
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
            EventKind::Released,
            Some(name),
            Some(node),
            format!("releasing {name} from {node}: {why}"),
        );
        self.release(node, name, placement);
    }

    pub(super) fn confirm(&mut self, name: &str, node: &str, seq: u64) {
        let moved = self.agents.get(name).and_then(|a| a.moving_from.clone());
        self.set_state(name, AgentState::Running, Some(node.to_owned()));
        if let Some(a) = self.agents.get_mut(name) {
            a.confirmed_seq = a.confirmed_seq.max(seq);
            if moved.is_some() {
                a.moving_from = None;
                a.last_moved = Some(self.now.at);
            }
        }
        match moved {
            Some(from) => self.event(
                EventKind::Moved,
                Some(name),
                Some(node),
                format!("{name} moved from {from} to {node}"),
            ),
            None => self.event(
                EventKind::Running,
                Some(name),
                Some(node),
                format!("{name} runs on {node}"),
            ),
        }
        self.dispatch(name);
    }

    /// The release of `name` from `node` is done.
    pub(super) fn released(&mut self, name: &str, node: &str) {
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
                    a.avoid = Some((from, self.now.at + REFUSAL_BACKOFF));
                }
            }
            _ => {}
        }
    }

    /// A reply, or a batch of them, from `node`.
    pub fn on_reply(&mut self, node: &str, payload: &[u8], now: Now) {
        self.now = now;
        if !crate::protocol::is_batch(payload) {
            return self.on_one_reply(node, payload);
        }
        match crate::protocol::split_batch(payload, self.config.mqtt.max_payload_bytes) {
            Ok(replies) => {
                for reply in replies {
                    self.on_one_reply(node, reply);
                }
            }
            Err(e) => log::warn!("ignored a batch of replies from {node}: {e}"),
        }
    }

    fn on_one_reply(&mut self, node: &str, payload: &[u8]) {
        let reply: Reply =
            match crate::protocol::decode_reply(payload, self.config.mqtt.max_payload_bytes) {
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
            ReplyBody::AckBatch(batch) => self.on_ack_batch(node, batch),
            ReplyBody::TurnResult(result) => self.on_turn_result(node, &reply.id, result),
            ReplyBody::TurnChunk(chunk) => self.on_turn_chunk(node, &reply.id, chunk),
            ReplyBody::PullProgress(progress) => self.on_pull_progress(node, progress),
        }
    }

    /// The acks of a batch, one log line for them all (each at debug).
    fn on_ack_batch(&mut self, node: &str, batch: AckBatch) {
        let total = batch.acks.len();
        let refused: Vec<String> = batch
            .acks
            .iter()
            .filter(|a| !a.ok)
            .map(|a| format!("{}: {}", a.agent, a.reason.as_deref().unwrap_or("")))
            .collect();
        let level = std::mem::replace(&mut self.event_level, log::Level::Debug);
        for item in batch.acks {
            let ack = Ack {
                command: batch.command,
                agent: Some(item.agent),
                placement: Some(item.placement),
                ok: item.ok,
                reason: item.reason,
                agents_running: batch.agents_running,
                ts: batch.ts,
                seq: batch.seq,
            };
            self.on_ack(node, ack);
        }
        self.event_level = level;
        match refused.first() {
            None => log::info!("{node} took the {total} agents of a batch"),
            Some(first) => log::info!(
                "{node} took {} agents of a batch of {total} and refused {} ({first}{})",
                total - refused.len(),
                refused.len(),
                if refused.len() > 1 { ", ..." } else { "" }
            ),
        }
    }

    pub(super) fn on_ack(&mut self, node: &str, ack: Ack) {
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
                self.confirm(&name, node, ack.seq)
            }
            (CommandKind::Assign, true) if !(current && a.state == AgentState::Running) => {
                // A late ack of an assignment we gave up on.
                self.release(node, &name, placement);
            }
            (CommandKind::Assign, false) if current && a.state == AgentState::Assigned => {
                let reason = ack.reason.unwrap_or_default();
                self.event(
                    EventKind::Refused,
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

    pub(super) fn on_change(&mut self, change: Change) {
        match change {
            Change::Joined { node } => {
                // Its list, and so that it sends long lists as updates.
                self.ask_for_list(&node);
                let capacity = self
                    .fleet
                    .get(&node)
                    .and_then(|v| v.capacity.as_ref())
                    .map_or(0, |c| c.agent_capacity);
                self.event(
                    EventKind::NodeJoined,
                    None,
                    Some(&node),
                    format!("node {node} is online with {capacity} agent slots"),
                );
            }
            Change::Restarted { node } => {
                self.lists_asked.remove(&node);
                self.ask_for_list(&node);
                // A new session numbers its messages from 1 again.
                for name in self.by_node.get(&node).into_iter().flatten() {
                    if let Some(a) = self.agents.get_mut(name) {
                        a.confirmed_seq = 0;
                    }
                }
                self.event(
                    EventKind::NodeRestarted,
                    None,
                    Some(&node),
                    format!("node {node} restarted (new session)"),
                )
            }
            Change::Recovered { node } => self.event(
                EventKind::NodeRecovered,
                None,
                Some(&node),
                format!("node {node} spoke after an 'offline': that was a stale last will"),
            ),
            Change::Lost { node, reason } => self.node_lost(&node, &reason),
        }
    }

    pub(super) fn node_lost(&mut self, node: &str, reason: &str) {
        let affected: Vec<String> = self
            .by_node
            .get(node)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        self.metrics.nodes_lost.inc();
        self.metrics.failovers.inc_by(affected.len() as u64);
        self.event(
            EventKind::NodeLost,
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
        self.fail_pulls_on(node, &format!("node {node} was lost ({reason})"));
        for name in &affected {
            if let Some(a) = self.agents.get(name) {
                if matches!(a.state, AgentState::Releasing | AgentState::Stopping) {
                    self.released(name, node);
                }
            }
        }
        self.release_lost_agents();
    }

    /// Agents on lost nodes go back to pending once their node has surely
    /// stopped them ([`Fleet::released_at`]) and `timeouts.fence` passed.
    pub(super) fn release_lost_agents(&mut self) {
        let now = self.now.at;
        let t = &self.config.timeouts;
        let (fence, default_fence) = (t.fence, t.node_lost_after);
        let due: Vec<(String, String)> = self
            .agents
            .iter()
            .filter(|(_, a)| matches!(a.state, AgentState::Running | AgentState::Assigned))
            .filter_map(|(name, a)| {
                let node = a.node.as_ref()?;
                let since = self.fleet.lost_since(node)?;
                let released = self.fleet.released_at(node, default_fence)?;
                (now >= released && now.duration_since(since) >= fence)
                    .then(|| (name.clone(), node.clone()))
            })
            .collect();
        for (name, node) in due {
            // No need to avoid it: a lost node takes nothing until it is back.
            self.requeue_agent(&name, None, &format!("its node {node} was lost"));
        }
    }
}
