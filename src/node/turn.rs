//! Chat turns on the node: each one waits for one of `ollama.max_parallel`
//! slots, then asks Ollama (streamed or not), within the turn's budget
//! (counted on this node's clock from when the command arrived) and
//! `ollama.request_timeout_secs`; the node's side of starting, cancelling,
//! orphaning and finishing turn tasks.

use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::agents::Turn;
use super::ollama::OllamaClient;
use super::stream::{self, ChunkSink};
use super::{metrics, mono_ms, Node, RunningTurn, TurnDone};
use crate::protocol::{ChatMessage, NodeTopic, Reply, ReplyBody, Role, TurnErrorCode, TurnResult};

/// How to run one turn's Ollama call.
pub(super) struct OllamaCall {
    pub model: String,
    pub system: Option<String>,
    /// `ollama.request_timeout`.
    pub timeout: Duration,
    /// When nobody waits for the answer any more (the turn's budget).
    pub budget_ends: Option<Instant>,
    /// Where the answer goes as it is generated (a streamed turn).
    pub sink: Option<ChunkSink>,
}

/// Runs one turn: waits for an Ollama slot, then asks Ollama, for no longer
/// than the turn's budget.
pub(super) async fn execute_turn(
    slots: &Semaphore,
    ollama: &OllamaClient,
    metrics: &metrics::NodeMetrics,
    call: OllamaCall,
    request: crate::protocol::TurnRequest,
) -> TurnResult {
    let OllamaCall {
        model,
        system,
        timeout: call_timeout,
        budget_ends,
        mut sink,
    } = call;
    let mut timeout = call_timeout;
    let Ok(_permit) = slots.acquire().await else {
        return TurnResult::failed(
            &request.agent,
            request.job,
            TurnErrorCode::ShuttingDown,
            "node stopping".into(),
        );
    };
    if let Some(ends) = budget_ends {
        let now = Instant::now();
        if ends <= now {
            let reason = format!(
                "the turn waited for an Ollama slot {} ms past its budget",
                (now - ends).as_millis()
            );
            return TurnResult::failed(&request.agent, request.job, TurnErrorCode::Expired, reason);
        }
        timeout = timeout.min(ends - now);
    }
    // Stopped by the turn's budget rather than by request_timeout?
    let budget_limited = budget_ends.is_some_and(|ends| ends < Instant::now() + call_timeout);
    let mut messages = request.messages;
    if let Some(system) = system {
        if messages.first().map(|m| m.role) != Some(Role::System) {
            messages.insert(0, ChatMessage::new(Role::System, system));
        }
    }
    let started = std::time::Instant::now();
    let outcome = match sink.as_mut() {
        None => ollama.chat(&model, messages, timeout).await,
        Some(sink) => {
            let streamed = async {
                let answer = ollama.chat_stream(&model, messages, timeout).await?;
                let window = sink.window;
                stream::relay(ollama, answer, window, |chunk| sink.send(chunk)).await
            };
            match tokio::time::timeout(timeout, streamed).await {
                Err(_) => Err(ollama.timed_out(timeout)),
                Ok(outcome) => {
                    outcome.map(|(text, usage)| (ChatMessage::new(Role::Assistant, text), usage))
                }
            }
        }
    };
    let chunks = sink.map_or(0, |s| s.sent);
    let seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok((message, usage)) => {
            metrics.ollama_request(true, seconds);
            metrics.tokens_generated.inc_by(usage.eval_count);
            TurnResult {
                agent: request.agent,
                ok: true,
                model: Some(model),
                message: Some(message),
                usage: Some(usage),
                error: None,
                job: request.job,
                chunks,
            }
        }
        Err(error) => {
            metrics.ollama_request(false, seconds);
            let error = match error.code {
                TurnErrorCode::Timeout if budget_limited => crate::protocol::TurnError {
                    code: TurnErrorCode::Expired,
                    reason: format!(
                        "no answer in time: the turn's budget ran out after {seconds:.1}s while Ollama was still answering; the call was stopped"
                    ),
                },
                _ => error,
            };
            TurnResult {
                agent: request.agent,
                ok: false,
                model: Some(model),
                message: None,
                usage: None,
                error: Some(error),
                job: request.job,
                chunks,
            }
        }
    }
}

impl Node {
    /// Running turns of agents no longer hosted (released: a drain past its
    /// deadline, a delete) are stopped, Ollama call and all, before the
    /// release is acknowledged: the coordinator may run the agent, and a
    /// job it was running, elsewhere as soon as it has the ack.
    pub(super) fn stop_orphaned_turns(&mut self) {
        let orphans: Vec<tokio::task::Id> = self
            .running
            .iter()
            .filter(|(_, t)| !self.table.hosts(&t.agent))
            .map(|(id, _)| *id)
            .collect();
        for id in orphans {
            let Some(turn) = self.running.remove(&id) else {
                continue;
            };
            turn.abort.abort();
            let reason = format!(
                "agent {} was released from node {} while the turn ran: it was stopped",
                turn.agent, self.config.node_id
            );
            log::info!("turn {}: {reason}", turn.id);
            let result = TurnResult::failed(&turn.agent, turn.job, TurnErrorCode::Released, reason);
            self.reply(turn.id, turn.generation, ReplyBody::TurnResult(result));
        }
    }

    /// Where a task publishes replies to command `id` before it ends.
    pub(super) fn reply_sink(&self, id: &str, generation: u64) -> stream::ReplySink {
        stream::ReplySink {
            publisher: self.publisher.clone(),
            topic: self.topics.node(&self.config.node_id, NodeTopic::Reply),
            envelope: Reply {
                id: id.to_owned(),
                node: self.config.node_id.clone(),
                session: self.session.clone(),
                generation,
                // Replaced by each reply.
                body: ReplyBody::TurnResult(TurnResult::failed(
                    "",
                    None,
                    TurnErrorCode::OllamaError,
                    String::new(),
                )),
            },
        }
    }

    /// Stops the running turn `turn` (its caller went away): the task and
    /// its Ollama call end now, freeing the Ollama slot for the next turn.
    pub(super) fn cancel_running(&mut self, agent: &str, turn: &str) {
        let task = self
            .running
            .iter()
            .find(|(_, t)| t.id == turn)
            .map(|(task, _)| *task);
        if let Some(running) = task.and_then(|task| self.running.remove(&task)) {
            running.abort.abort();
            log::info!("turn {turn} for {agent}: cancelled, its Ollama call stopped");
            self.metrics.command("cancel", "applied");
            let reason = format!("turn {turn} of {agent} was cancelled while it ran");
            let result = TurnResult::failed(agent, running.job, TurnErrorCode::Cancelled, reason);
            self.reply(
                running.id,
                running.generation,
                ReplyBody::TurnResult(result),
            );
        }
        let next = self.table.turn_finished(agent, turn, mono_ms());
        self.apply(next);
    }

    pub(super) fn start_turn(&mut self, turn: Turn, model: String, system: Option<String>) {
        let Turn {
            id,
            generation,
            request,
            deadline_mono_ms: turn_deadline,
        } = turn;
        let agent = request.agent.clone();
        let job = request.job.clone();
        let slots = self.slots.clone();
        let ollama = self.ollama.clone();
        let metrics = self.metrics.clone();
        let timeout = self.config.ollama.request_timeout;
        let task_agent = agent.clone();
        let task_id = id.clone();
        // The turn's budget, counted on this node's clock from arrival.
        let budget_ends = turn_deadline
            .map(|d| Instant::now() + Duration::from_millis(d.saturating_sub(mono_ms())));
        let sink = request.stream.then(|| stream::ChunkSink {
            replies: self.reply_sink(&id, generation),
            agent: agent.clone(),
            window: self.config.ollama.stream_window,
            sent: 0,
        });
        let handle = self.turns.spawn(async move {
            let call = OllamaCall {
                model,
                system,
                timeout,
                budget_ends,
                sink,
            };
            let result = execute_turn(&slots, &ollama, &metrics, call, request).await;
            TurnDone {
                id: task_id,
                generation,
                agent: task_agent,
                result,
            }
        });
        self.running.insert(
            handle.id(),
            RunningTurn {
                id,
                generation,
                agent,
                job,
                abort: handle,
            },
        );
    }

    pub(super) fn on_turn_done(
        &mut self,
        done: Result<(tokio::task::Id, TurnDone), tokio::task::JoinError>,
    ) {
        self.check_fence();
        let done = match done {
            Ok((task, done)) => {
                if self.running.remove(&task).is_none() {
                    // Fenced (or the grace ran out) after it finished but
                    // before we saw it: it was answered as failed already,
                    // and a fenced turn answers nothing more.
                    log::info!(
                        "turn {} for {} finished after it was stopped (fenced or released); its answer is dropped",
                        done.id,
                        done.agent
                    );
                    return;
                }
                done
            }
            Err(e) => {
                let Some(turn) = self.running.remove(&e.id()) else {
                    return;
                };
                log::error!("turn {} for {} ended abnormally: {e}", turn.id, turn.agent);
                let reason = format!("the node's turn task failed: {e}");
                TurnDone {
                    result: TurnResult::failed(
                        &turn.agent,
                        turn.job,
                        TurnErrorCode::OllamaError,
                        reason,
                    ),
                    id: turn.id,
                    generation: turn.generation,
                    agent: turn.agent,
                }
            }
        };
        match &done.result.error {
            None => log::info!(
                "turn {} for {} answered ({} tokens)",
                done.id,
                done.agent,
                done.result.usage.as_ref().map_or(0, |u| u.eval_count)
            ),
            Some(error) => log::warn!(
                "turn {} for {} failed: {}",
                done.id,
                done.agent,
                error.reason
            ),
        }
        self.reply(
            done.id.clone(),
            done.generation,
            ReplyBody::TurnResult(done.result),
        );
        let next = self.table.turn_finished(&done.agent, &done.id, mono_ms());
        self.apply(next);
    }
}
