use super::*;

/// An `assign_batch` command carries agents of about this many bytes at
/// most, and of at most a quarter of `mqtt.max_payload_bytes`.
const BATCH_BYTES: usize = 256 * 1024;

/// About what `a` takes in an `assign_batch` command's JSON, at most
/// (escaping may double a system prompt).
fn assignment_bytes(a: &Assignment) -> usize {
    let spec = &a.agent;
    let labels: usize = spec
        .labels
        .iter()
        .map(|(k, v)| 2 * (k.len() + v.len()) + 6)
        .sum();
    let system = spec.system.as_ref().map_or(0, |s| 2 * s.len() + 12);
    2 * spec.name.len() + spec.model.len() + system + labels + 64
}

impl Coordinator {
    /// Records the assignment of `name` to `node` under a new placement id
    /// and returns the command to send once the record is committed.
    pub(super) fn assign(&mut self, name: &str, node: &str) -> Option<CommandBody> {
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
            a.deadline = Some(self.now.at + self.config.timeouts.assign_ack);
        }
        self.metrics.placements.inc();
        self.event(
            EventKind::Placed,
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
    pub(super) fn release(&mut self, node: &str, name: &str, placement: u64) {
        self.send(
            node,
            CommandBody::Release {
                agent: name.to_owned(),
                placement,
            },
        );
    }

    /// Back to pending (it will be placed again), avoiding `avoid` for a while.
    pub(super) fn requeue_agent(&mut self, name: &str, avoid: Option<&str>, reason: &str) {
        let now = self.now.at;
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

    /// Removes an agent whose node released it (or that had none).
    pub(super) fn remove_agent(&mut self, name: &str) {
        if let Err(e) = self.try_remove_agent(name) {
            log::error!("{e}; removing {name} from memory anyway");
            self.forget_agent(name);
        }
    }

    /// Deletes the agent from the store, then from memory; on a store error
    /// nothing changes.
    pub(super) fn try_remove_agent(&mut self, name: &str) -> Result<(), StoreError> {
        self.store.delete_agent(name, self.now.wall_ms)?;
        self.forget_agent(name);
        Ok(())
    }

    fn forget_agent(&mut self, name: &str) {
        if let Some(mut a) = self.agents.remove(name) {
            if let Some(node) = &a.node {
                if let Some(set) = self.by_node.get_mut(node) {
                    set.remove(name);
                }
                self.touched.insert(node.clone());
            }
            self.pending.remove(&(a.created_ms, name.to_owned()));
            for waiter in a.chats.drain(..) {
                // An error claims nothing stored: it need not wait for the
                // batch to commit.
                let _ = waiter.reply.send(Err(CoreError::NotFound(format!(
                    "agent {name} was stopped"
                ))));
            }
            for id in self.jobs.take_queue(name) {
                self.jobs.remove(&id);
            }
        }
        self.event(
            EventKind::Removed,
            Some(name),
            None,
            format!("agent {name} is gone"),
        );
    }

    pub(super) fn progress_drains(&mut self) {
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
                    a.turn.is_none()
                        || flags
                            .drain_deadline_ms
                            .is_some_and(|d| self.now.wall_ms >= d)
                })
                .map(|(n, _)| n.clone())
                .collect();
            let overdue = flags
                .drain_deadline_ms
                .is_some_and(|d| self.now.wall_ms >= d);
            if hosted.is_empty() && in_motion == 0 {
                if !self.drained_reported.get(&node).copied().unwrap_or(false) {
                    self.drained_reported.insert(node.clone(), true);
                    self.event(
                        EventKind::Drained,
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
                self.metrics.agent_moved("drain");
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
    pub(super) fn start_move(&mut self, name: &str, node: &str, why: &str) {
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
            a.deadline = Some(self.now.at + self.config.timeouts.assign_ack);
        }
        self.release(node, name, placement);
        self.event(
            EventKind::Moving,
            Some(name),
            Some(node),
            format!("moving {name} off {node} ({why})"),
        );
    }

    /// The scheduler's view: every known node with its load, counting
    /// assignments in flight and agents the node reports that are not ours.
    pub(super) fn scheduler(&self) -> Scheduler {
        let nodes = self
            .fleet
            .nodes()
            .filter_map(|view| {
                let flags = self.flags.get(&view.id);
                let standing = Standing {
                    online: view.is_online(),
                    cordoned: flags.is_some_and(|f| f.cordoned),
                    draining: flags.is_some_and(|f| f.draining),
                };
                let ours = self.by_node.get(&view.id);
                let listed = self.lists.get(&view.id).map(|l| &l.names);
                Some(NodeSlots::from_capacity(
                    view.capacity.as_ref()?,
                    standing,
                    ours,
                    listed,
                ))
            })
            .collect();
        Scheduler::new(nodes)
    }

    /// The scheduler with a slot reserved for every pending agent that fits,
    /// so trial placements (drains) do not count on room they will take.
    pub(super) fn scheduler_with_pending(&self) -> Scheduler {
        let mut scheduler = self.scheduler();
        let now = self.now.at;
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
    pub fn place_pending(&mut self, now: Now) {
        self.now = now;
        if self.settled_at.is_none_or(|at| self.now.at < at) {
            // Retained state is still arriving: try again once it settled.
            if self.placement_at.is_some() {
                self.placement_at = self.settled_at;
            }
            return;
        }
        self.placement_at = None;
        // Nothing could be stored: placing waits until the store takes
        // writes again (`probe_store` asks for a pass then).
        if self.pending.is_empty() || self.store_fault.is_some() {
            return;
        }
        let now = self.now.at;
        let pending: Vec<String> = self.pending.iter().map(|(_, name)| name.clone()).collect();
        let mut scheduler = self.scheduler();
        let mut full_reason: Option<String> = None;
        let mut placements = Vec::new();
        let mut unplaced_with_chats = Vec::new();
        let mut want_model = Vec::new();
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
                    } else if self.config.scheduler.auto_pull
                        && scheduler.pick_for_pull(&request, |_| false).is_some()
                    {
                        // A node could take it, but for its model.
                        want_model.push(name.clone());
                    }
                    a.pending_reason = Some(e.reason);
                    if !a.chats.is_empty() {
                        unplaced_with_chats.push(name);
                    }
                }
            }
        }
        for name in want_model {
            self.auto_pull(&scheduler, &name);
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
        // One line for the pass; each placement at debug.
        let level = std::mem::replace(&mut self.event_level, log::Level::Debug);
        let mut batches: BTreeMap<String, Vec<Assignment>> = BTreeMap::new();
        for (name, node) in placements {
            if let Some(CommandBody::Assign { agent, placement }) = self.assign(&name, &node) {
                let batch = batches.entry(node).or_default();
                batch.push(Assignment { agent, placement });
            }
        }
        self.event_level = level;
        if let Err(e) = self.store.commit() {
            // Not stored, so not sent: the assignments time out and are
            // placed again. (Inside the daemon's batch, the batch fails
            // and the core reloads what the store holds.)
            log::error!("{e}");
            return;
        }
        let placed: usize = batches.values().map(Vec::len).sum();
        log::info!(
            "placed {placed} agents on {} nodes; {} wait for a place",
            batches.len(),
            self.pending.len()
        );
        for (node, batch) in batches {
            self.send_assignments(&node, batch);
        }
    }

    /// Sends `batch` to `node`: one `assign` for one agent, else
    /// `assign_batch` commands of at most [`BATCH_BYTES`] each.
    fn send_assignments(&mut self, node: &str, batch: Vec<Assignment>) {
        // A node older than batches (and agent lists) sends no agents_rev.
        let batches = self
            .fleet
            .get(node)
            .and_then(|v| v.capacity.as_ref())
            .is_some_and(|c| c.agents_rev > 0);
        if batch.len() == 1 || !batches {
            for Assignment { agent, placement } in batch {
                self.send(node, CommandBody::Assign { agent, placement });
            }
            return;
        }
        let limit = BATCH_BYTES.min(self.config.mqtt.max_payload_bytes / 4);
        let mut part = Vec::new();
        let mut bytes = 0;
        for assignment in batch {
            let size = assignment_bytes(&assignment);
            if !part.is_empty() && bytes + size > limit {
                let agents = std::mem::take(&mut part);
                self.send(node, CommandBody::AssignBatch { agents });
                bytes = 0;
            }
            bytes += size;
            part.push(assignment);
        }
        if !part.is_empty() {
            self.send(node, CommandBody::AssignBatch { agents: part });
        }
    }

    pub(super) fn rebalance(&mut self, now: Instant) {
        let s = self.config.scheduler.clone();
        if s.rebalance_threshold <= 0.0 || !self.pending.is_empty() || self.store_fault.is_some() {
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
            let idle = a.turn.is_none() && self.jobs.queued_for(name) == 0;
            if a.state == AgentState::Running && idle && calm {
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
            self.metrics.agent_moved("rebalance");
            self.start_move(&m.agent, &m.from, &why);
        }
    }
}
