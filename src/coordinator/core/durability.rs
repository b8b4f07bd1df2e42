//! Memory and store never disagree (docs/RELIABILITY.md, "Store faults").
//!
//! The daemon handles every input inside one store batch
//! ([`Coordinator::begin_batch`] / [`Coordinator::end_batch`]). What the core
//! decides meanwhile waits: MQTT commands in the outbox, HTTP answers in
//! [`Coordinator::answer`]. If the batch commits, both leave. If any write in
//! it failed, or the commit did (a full SD card), SQLite rolls the batch
//! back and so does the core: nothing decided leaves, waiting callers get a
//! 503 naming the store, and the core **reloads** agents, jobs and node
//! flags from the store (reads work on a full disk). It does not exit: a
//! disk that stays full would make systemd restart it in a loop, losing
//! every waiting chat each time and serving nothing; a coordinator that
//! stays up keeps answering reads, says `/ready` 503, refuses new chats
//! with 503 + `Retry-After`, probes the store every tick and recovers by
//! itself once a write succeeds. A store it cannot even read is fatal.

use super::*;

/// An HTTP answer held until the batch that decided it commits; called
/// with the batch's fault if it did not.
pub(super) type HeldAnswer = Box<dyn FnOnce(Option<&str>) + Send>;

impl Coordinator {
    /// Starts a batch of inputs whose writes to the store commit together
    /// ([`Coordinator::end_batch`]); the outbox and the held answers must be
    /// sent only after.
    pub fn begin_batch(&mut self) {
        if !self.store.in_batch() {
            self.taken_in_batch.clear();
        }
        self.store.begin();
    }

    /// Commits the batch and releases its answers. If the store refused it,
    /// everything the batch decided is thrown away (see the module doc);
    /// `Err` only if the store cannot even be read back.
    pub fn end_batch(&mut self) -> Result<(), StoreError> {
        match self.store.commit() {
            Ok(()) => {
                for answer in std::mem::take(&mut self.answers) {
                    answer(None);
                }
                Ok(())
            }
            Err(fault) => self.discard_batch(fault),
        }
    }

    /// Answers `to` with `result` once the open batch commits (at once
    /// outside a batch), or with a store error if it does not.
    pub fn answer<T: Send + 'static>(&mut self, to: Answer<T>, result: Result<T, CoreError>) {
        if !self.store.in_batch() {
            let _ = to.send(result);
            return;
        }
        self.answers.push(Box::new(move |fault| {
            let _ = to.send(match fault {
                None => result,
                Some(fault) => Err(CoreError::Store(StoreFault::new(fault))),
            });
        }));
    }

    /// Why the store cannot write, while it cannot.
    pub fn store_fault(&self) -> Option<&str> {
        self.store_fault.as_deref()
    }

    /// While the store is failing: tries a write (outside any batch); once
    /// it works, serves normally again and asks the nodes for the answers
    /// of the job turns kept across the reload.
    pub fn probe_store(&mut self, now: Now) -> bool {
        let Some(fault) = &self.store_fault else {
            return true;
        };
        match self.store.probe_write() {
            Ok(()) => {
                log::warn!("the store takes writes again (it failed: {fault}); serving normally");
                self.store_fault = None;
                self.placement_at = Some(now.at);
                self.resend_turns(None, "the store takes writes again", now);
                true
            }
            Err(e) => {
                log::debug!("the store still cannot write: {e}");
                false
            }
        }
    }

    fn discard_batch(&mut self, fault: String) -> Result<(), StoreError> {
        log::error!(
            "{fault}: the batch is rolled back; {} messages and {} answers are not sent, and the state is reloaded from the store",
            self.outbox.len(),
            self.answers.len()
        );
        self.metrics.store_failures.inc();
        self.outbox.clear();
        let message = format!("the store cannot write ({fault}); nothing was done");
        for answer in std::mem::take(&mut self.answers) {
            answer(Some(&message));
        }
        self.store_fault = Some(fault);
        self.reload(&message)
    }

    /// Replaces agents, jobs and node flags by what the store holds. Chats
    /// waiting in memory fail (their answers were not stored); job turns in
    /// flight that the store still calls running are kept and sent again,
    /// so that the node answers them again from its memory of answers
    /// rather than running them twice.
    fn reload(&mut self, why: &str) -> Result<(), StoreError> {
        let fail = |reply: Responder| {
            let _ = reply.send(Err(CoreError::Store(StoreFault::new(why))));
        };
        for a in self.agents.values_mut() {
            for waiter in a.chats.drain(..) {
                fail(waiter.reply);
            }
        }
        let mut turns = std::mem::take(&mut self.turns);
        // Job turns the failed batch ended (their results are not stored).
        for (id, turn) in std::mem::take(&mut self.taken_in_batch) {
            turns.entry(id).or_insert(turn);
        }
        self.agents.clear();
        self.by_node.clear();
        self.pending.clear();
        self.jobs.clear();
        self.strays.clear();
        // Compare every node's list with the state reloaded; commands of
        // the failed batch (asks for lists among them) were not sent.
        self.reconciled.clear();
        self.lists_asked.clear();
        self.drain_sent.clear();
        self.flags = self.store.node_flags()?;
        self.load_state(false)?;
        let mut kept = 0;
        for (id, turn) in turns {
            let job = match turn.kind {
                TurnKind::Chat(chat) => {
                    fail(chat.reply);
                    continue;
                }
                TurnKind::Job(ref job) => job.clone(),
            };
            let running_there = self.jobs.get(&job).is_some_and(|j| {
                j.state == JobState::Running && j.node.as_deref() == Some(turn.node.as_str())
            });
            let Some(a) = self
                .agents
                .get_mut(&turn.agent)
                .filter(|a| running_there && a.on(&turn.node) && a.turn.is_none())
            else {
                self.requeue_loaded_job(&job);
                continue;
            };
            a.turn = Some(id.clone());
            self.turns.insert(id, turn);
            kept += 1;
        }
        // Running in the store with no turn kept: back to the queue.
        let orphans: Vec<String> = self
            .jobs
            .running()
            .filter(|j| !self.turns.values().any(|t| t.job() == Some(&j.id)))
            .map(|j| j.id.clone())
            .collect();
        for job in orphans {
            self.requeue_loaded_job(&job);
        }
        // Their answers may have been in the failed batch: they are asked
        // for again once the store takes writes (`probe_store`), not now,
        // or a full disk would turn this into a loop.
        log::warn!(
            "reloaded {} agents and {} open jobs from the store; {kept} job turns kept",
            self.agents.len(),
            self.jobs.len()
        );
        Ok(())
    }

    /// A job the store calls running, without a turn in flight: queued
    /// again in memory (stored as such with its next attempt).
    fn requeue_loaded_job(&mut self, id: &str) {
        self.jobs.requeue(id, self.now.wall_ms);
    }

    /// Loads agents and open jobs from the store into empty maps. At start
    /// (`requeue_running`), jobs that were running are queued again and
    /// stored so; on a reload the caller decides.
    pub(super) fn load_state(&mut self, requeue_running: bool) -> Result<(), StoreError> {
        let now = self.now.at;
        let deadline = now + self.config.timeouts.assign_ack;
        for row in self.store.agents()? {
            let mut agent = Agent::new(row.spec, row.created_ms, now);
            agent.placement = row.placement;
            agent.node = row.node.clone();
            agent.state = AgentState::from_stored(row.state);
            if agent.state == AgentState::Pending {
                agent.node = None;
            } else {
                // Placed before the restart: its confirmation is not a
                // scheduling delay.
                agent.waiting_since = None;
                if let Some(node) = &row.node {
                    self.fleet.expect(node, now);
                    if agent.state != AgentState::Running || !self.fleet.is_online(node) {
                        agent.deadline = Some(deadline);
                    }
                }
            }
            self.index(
                &agent.spec.name,
                agent.created_ms,
                None,
                agent.state,
                agent.node.as_deref(),
            );
            self.agents.insert(agent.spec.name.clone(), agent);
        }
        for mut job in self.store.open_jobs()? {
            if requeue_running && job.state == JobState::Running {
                job.state = JobState::Queued;
                job.node = None;
                self.store.update_job(&job)?;
            }
            self.jobs.insert(job);
        }
        Ok(())
    }
}
