use super::*;

use serde_json::value::RawValue;

use crate::protocol::{MessagesOut, TurnOut, TurnTag};

impl Coordinator {
    /// Starts the agent's next turn if it runs and is idle: chats first,
    /// then the highest-priority job.
    pub(super) fn dispatch(&mut self, name: &str) {
        let Some(a) = self.agents.get_mut(name) else {
            return;
        };
        if a.state != AgentState::Running || a.turn.is_some() || !self.link_up {
            // Without the broker a turn command would only wait in the
            // queue and go out late; the periodic pass dispatches again.
            return;
        }
        let Some(node) = a.node.clone() else { return };
        if !self.fleet.is_online(&node) {
            return; // it will be placed elsewhere, or its node comes back
        }
        while let Some(ChatWaiter { call, reply }) = a.chats.pop_front() {
            let chat = ChatTurn {
                reply,
                memory: call.memory,
                relay: call.deltas.map(Relay::new),
            };
            if chat.abandoned() {
                continue;
            }
            let timeout = self.config.timeouts.chat;
            self.start_turn(name, &node, call.messages, TurnKind::Chat(chat), timeout);
            return;
        }
        let Some(job) = self.jobs.start_next(name, &node, self.now.wall_ms) else {
            return;
        };
        let message = vec![ChatMessage::new(Role::User, job.message.clone())];
        let id = job.id.clone();
        if let Err(e) = self.store.update_job(job) {
            log::error!("{e}");
        }
        let timeout = self.config.timeouts.job;
        self.start_turn(name, &node, message, TurnKind::Job(id), timeout);
    }

    pub(super) fn start_turn(
        &mut self,
        name: &str,
        node: &str,
        new_messages: Vec<ChatMessage>,
        kind: TurnKind,
        timeout: Duration,
    ) {
        let id = self.next_id("t");
        let deadline = self.now.at + timeout;
        let turn = TurnInFlight {
            agent: name.to_owned(),
            node: node.to_owned(),
            kind,
            new_messages,
            deadline,
        };
        let payload = match self.turn_command(&id, &turn, timeout) {
            Ok(payload) => payload,
            Err(error) => {
                log::warn!("turn for {name} not sent: {error}");
                match turn.kind {
                    TurnKind::Chat(chat) => self.answer(chat.reply, Err(error)),
                    // The store may be readable again shortly: the job
                    // waits (not counted as an attempt) and is tried again
                    // at the next reconciliation.
                    TurnKind::Job(job) if matches!(error, CoreError::Store(_)) => {
                        if let Some(j) = self.jobs.get_mut(&job) {
                            j.attempts = j.attempts.saturating_sub(1);
                        }
                        self.requeue_job(&job, error.to_string());
                    }
                    TurnKind::Job(job) => self.finish_job(&job, None, Some(error.to_string())),
                }
                return;
            }
        };
        let expires = self.command_expiry(&turn.kind, node, deadline);
        self.publish_turn(node, payload, expires);
        if let Some(a) = self.agents.get_mut(name) {
            a.turn = Some(id.clone());
        }
        self.turns.insert(id, turn);
    }

    /// Until when a turn command may still go out. A chat's, no later than
    /// the node's fence from now: if the broker is away longer, the node has
    /// stopped its agents and the chat fails as fenced once we are back
    /// (`fail_fenced_turns`), so its command must not arrive after that.
    fn command_expiry(&self, kind: &TurnKind, node: &str, deadline: Instant) -> Instant {
        match kind {
            TurnKind::Chat(_) => deadline.min(self.now.at + self.node_fence(node)),
            TurnKind::Job(_) => deadline,
        }
    }

    /// The encoded command `id` for `turn`: the agent's system prompt, its
    /// stored history (if the turn is remembered) and the turn's messages,
    /// within the payload limit (the oldest history goes first); an error
    /// says why it cannot be sent.
    pub(super) fn turn_command(
        &self,
        id: &str,
        turn: &TurnInFlight,
        budget: Duration,
    ) -> Result<Vec<u8>, CoreError> {
        let name = &turn.agent;
        let system = self.agents.get(name).and_then(|a| a.spec.system.as_deref());
        let max = self.config.mqtt.max_payload_bytes;
        let encode = |history: &[&RawValue]| {
            TurnOut {
                id,
                node: &turn.node,
                generation: self.generation,
                kind: TurnTag::Turn,
                agent: name,
                messages: MessagesOut {
                    history,
                    new: &turn.new_messages,
                },
                system,
                // What is left of it, counted by the node on its own
                // clock from arrival: no wall clock crosses machines.
                timeout_ms: Some(budget.as_millis() as u64),
                job: turn.job().map(String::as_str),
                stream: turn.streamed(),
            }
            .encode_within(max)
        };
        let encoded = if turn.remembered() {
            // Without its history the agent would answer as if the
            // conversation had not happened: better no answer than that.
            self.store.with_history(name, encode).map_err(|e| {
                CoreError::Store(StoreFault::caused(
                    format!("cannot read the history of agent {name}: {e}"),
                    e,
                ))
            })?
        } else {
            encode(&[])
        };
        encoded.map_err(|size| {
            CoreError::TooLarge(format!(
                "the message is too large to send ({size} bytes; mqtt.max_payload_bytes is {max})"
            ))
        })
    }

    /// Sends the turns in flight (on `node`, or everywhere) again under
    /// their own ids. A command or answer published while the node or the
    /// coordinator was not connected is lost with clean sessions; a node
    /// ignores a turn it is still running and answers one it finished
    /// again, so resending is safe.
    pub fn resend_turns(&mut self, node: Option<&str>, why: &str, now: Now) {
        self.now = now;
        let due: Vec<(&String, &TurnInFlight)> = self
            .turns
            .iter()
            .filter(|(_, t)| node.is_none_or(|n| t.node == n) && self.fleet.is_online(&t.node))
            .collect();
        if due.is_empty() {
            return;
        }
        log::info!("{why}: sending {} turns in flight again", due.len());
        let mut resent = Vec::new();
        for (id, t) in due {
            let budget = t.deadline.saturating_duration_since(self.now.at);
            if budget.is_zero() {
                continue; // expire_turns fails it; a stale command helps nobody
            }
            match self.turn_command(id, t, budget) {
                Ok(payload) => resent.push((
                    t.node.clone(),
                    payload,
                    self.command_expiry(&t.kind, &t.node, t.deadline),
                )),
                Err(e) => log::error!("cannot send turn {id} to {} again: {e}", t.node),
            }
        }
        for (node, payload, deadline) in resent {
            self.publish_turn(&node, payload, deadline);
        }
    }

    pub(super) fn on_turn_result(&mut self, node: &str, id: &str, result: TurnResult) {
        if self.turns.get(id).is_none_or(|t| t.node != node) {
            log::debug!("ignored a result for turn {id} from {node}: not in flight");
            return;
        }
        match (result.ok, result.message, result.error) {
            (true, Some(message), _) => {
                self.turn_succeeded(id, message, result.usage.unwrap_or_default())
            }
            (_, _, Some(error)) if error.code == TurnErrorCode::Forgotten => {
                self.run_again(id, &error.reason)
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

    /// A piece of a streamed answer: on to the chat's client, in order.
    pub(super) fn on_turn_chunk(&mut self, node: &str, id: &str, chunk: TurnChunk) {
        let Some(turn) = self.turns.get_mut(id).filter(|t| t.node == node) else {
            log::debug!("ignored a chunk of turn {id} from {node}: not in flight");
            return;
        };
        if let TurnKind::Chat(ChatTurn {
            relay: Some(relay), ..
        }) = &mut turn.kind
        {
            relay.chunk(chunk.seq, chunk.content);
        }
    }

    /// Cancels the chats whose callers went away (an HTTP client that
    /// disconnected): the node stops their Ollama calls, which frees the
    /// Pi's CPU for the next turn.
    pub(super) fn cancel_abandoned_turns(&mut self) {
        let abandoned: Vec<String> = self
            .turns
            .iter()
            .filter(|(_, t)| matches!(&t.kind, TurnKind::Chat(chat) if chat.abandoned()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in abandoned {
            let Some(turn) = self.take_turn(&id) else {
                continue;
            };
            log::info!(
                "turn {id} for {}: its caller went away; cancelled",
                turn.agent
            );
            self.metrics.turns_cancelled.inc();
            if self.link_up {
                let body = CommandBody::Cancel {
                    agent: turn.agent.clone(),
                    turn: id,
                };
                self.send(&turn.node, body);
            }
            self.dispatch(&turn.agent);
        }
    }

    /// The node ran turn `id` but lost its answer on the way and forgot it:
    /// the same turn runs again under a new id, within what is left of its
    /// budget (nothing of it was stored, so nothing is doubled).
    fn run_again(&mut self, id: &str, why: &str) {
        let still_there = self.turns.get(id).is_some_and(|t| {
            self.agents
                .get(&t.agent)
                .is_some_and(|a| a.on(&t.node) && a.state == AgentState::Running)
        });
        if !still_there {
            let reason = format!("{why}; its agent has left the node meanwhile");
            self.turn_failed(id, TurnErrorCode::Released, reason, false);
            return;
        }
        let streamed_some = self.turns.get(id).is_some_and(
            |t| matches!(&t.kind, TurnKind::Chat(ChatTurn { relay: Some(r), .. }) if r.started()),
        );
        if streamed_some {
            // Its client has part of an answer: another run would not
            // continue it.
            let reason = format!("{why}; the answer was partly streamed");
            self.turn_failed(id, TurnErrorCode::Forgotten, reason, false);
            return;
        }
        let Some(turn) = self.take_turn(id) else {
            return;
        };
        let budget = turn.deadline.saturating_duration_since(self.now.at);
        log::info!("turn {id} for {}: {why}", turn.agent);
        // The same attempt of a job, not a new one.
        self.start_turn(
            &turn.agent,
            &turn.node,
            turn.new_messages,
            turn.kind,
            budget,
        );
    }

    pub(super) fn turn_succeeded(&mut self, id: &str, message: ChatMessage, usage: Usage) {
        let Some(turn) = self.take_turn(id) else {
            return;
        };
        if turn.remembered() {
            let mut record = turn.new_messages.clone();
            record.push(message.clone());
            // Inside the daemon's batch a failed append fails the batch, and
            // the answer below is then replaced by a store error: no chat is
            // answered unless its turn is stored.
            if let Err(e) = self
                .store
                .append_history(&turn.agent, &record, self.now.wall_ms)
            {
                log::error!("{e}");
            }
        }
        match turn.kind {
            TurnKind::Chat(chat) => {
                if let Some(relay) = chat.relay {
                    relay.finish(&message.content);
                }
                let model = self.agents.get(&turn.agent).map(|a| a.spec.model.clone());
                let answer = ChatAnswer {
                    agent: turn.agent.clone(),
                    node: turn.node.clone(),
                    model: model.unwrap_or_default(),
                    message: ChatMessage::new(Role::Assistant, message.content),
                    usage,
                };
                self.answer(chat.reply, Ok(answer));
            }
            TurnKind::Job(job) => {
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
    pub(super) fn turn_failed(
        &mut self,
        id: &str,
        code: TurnErrorCode,
        reason: String,
        counts: bool,
    ) {
        let Some(turn) = self.take_turn(id) else {
            return;
        };
        match turn.kind {
            TurnKind::Chat(chat) => {
                // Worth asking again shortly: Ollama was busy, or the agent
                // is moving to another node.
                let retry = matches!(
                    code,
                    TurnErrorCode::OllamaBusy
                        | TurnErrorCode::AgentNotAssigned
                        | TurnErrorCode::Released
                        | TurnErrorCode::ShuttingDown
                        | TurnErrorCode::Fenced
                        | TurnErrorCode::Forgotten
                );
                let error = CoreError::Turn {
                    code,
                    message: if retry {
                        format!("{reason}; try again")
                    } else {
                        reason
                    },
                    retry_after_secs: retry.then_some(self.config.queue.retry_after_secs),
                };
                self.answer(chat.reply, Err(error));
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
                    log::info!("job {job} failed on {} ({reason}); queued again", turn.node);
                    self.requeue_job(&job, reason);
                } else {
                    self.finish_job(&job, None, Some(format!("{}: {reason}", code.as_str())));
                }
            }
        }
        self.dispatch(&turn.agent);
    }

    /// Puts a job back in its agent's queue, keeping `reason` as its last
    /// error.
    fn requeue_job(&mut self, job: &str, reason: String) {
        let Some(j) = self.jobs.requeue(job, self.now.wall_ms) else {
            return;
        };
        j.error = Some(reason);
        if let Err(e) = self.store.update_job(j) {
            log::error!("{e}");
        }
    }

    pub(super) fn take_turn(&mut self, id: &str) -> Option<TurnInFlight> {
        let turn = self.turns.remove(id)?;
        if let (Some(job), true) = (turn.job(), self.store.in_batch()) {
            // Should the batch not commit, the job still runs there.
            self.taken_in_batch.push((
                id.to_owned(),
                TurnInFlight {
                    agent: turn.agent.clone(),
                    node: turn.node.clone(),
                    kind: TurnKind::Job(job.clone()),
                    new_messages: turn.new_messages.clone(),
                    deadline: turn.deadline,
                },
            ));
        }
        if let Some(a) = self.agents.get_mut(&turn.agent) {
            if a.turn.as_deref() == Some(id) {
                a.turn = None;
            }
        }
        Some(turn)
    }

    pub(super) fn finish_job(&mut self, id: &str, answer: Option<String>, error: Option<String>) {
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
        job.updated_ms = self.now.wall_ms;
        let seconds = job.updated_ms.saturating_sub(job.created_ms) as f64 / 1000.0;
        self.metrics.job(job.state == JobState::Completed, seconds);
        if let Err(e) = self.store.update_job(&job) {
            log::error!("{e}");
        }
    }

    pub(super) fn fail_chats(&mut self, name: &str, why: &str) {
        let Some(a) = self.agents.get_mut(name) else {
            return;
        };
        let waiters: Vec<ChatWaiter> = a.chats.drain(..).collect();
        for waiter in waiters {
            let error = CoreError::NotRunning {
                message: format!("agent {name}: {why}"),
                retry_after_secs: None,
            };
            self.answer(waiter.reply, Err(error));
        }
    }

    pub(super) fn expire_turns(&mut self, now: Instant) {
        self.cancel_abandoned_turns();
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
            a.chats.retain(|w| {
                !w.reply.is_closed() && !w.call.deltas.as_ref().is_some_and(|d| d.is_closed())
            });
        }
    }
}
