use super::*;

impl Coordinator {
    /// One pass: liveness, timeouts, drains, placement, rebalancing, turns.
    pub fn reconcile(&mut self, now: Now) {
        self.now = now;
        let now = self.now.at;
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
        self.prune_pulls();
        // Forget releases of strays long enough ago to resend them if needed.
        self.strays
            .retain(|_, at| now.duration_since(*at) < RESEND_AFTER * 12);
        let nodes: Vec<String> = self.fleet.nodes().map(|n| n.id.clone()).collect();
        for node in &nodes {
            self.sync_drain_flag(node);
        }
        if self.settled_at.is_some_and(|at| now >= at) {
            self.progress_drains();
            self.place_pending(self.now);
            self.rebalance(now);
        }
        // Work waiting for agents that run and are idle (e.g. jobs loaded
        // from the store for agents a capacity message confirmed).
        let idle_with_work: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.state == AgentState::Running && a.turn.is_none())
            .filter(|(name, a)| self.jobs.queued_for(name) > 0 || !a.chats.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        for name in idle_with_work {
            self.dispatch(&name);
        }
    }

    pub(super) fn expire_commands(&mut self, now: Instant) {
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
                        EventKind::AssignTimeout,
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

    /// Deletes finished jobs older than `queue.keep_finished_secs`, checking
    /// once a minute (or as often as that, if shorter).
    pub(super) fn prune_finished_jobs(&mut self, now: Instant) {
        let keep = self.config.queue.keep_finished;
        if self
            .pruned_at
            .is_some_and(|at| now.duration_since(at) < keep.min(Duration::from_secs(60)))
        {
            return;
        }
        self.pruned_at = Some(now);
        let before = self.now.wall_ms.saturating_sub(keep.as_millis() as u64);
        match self.store.prune_finished_jobs(before) {
            Ok(0) => {}
            Ok(n) => log::info!(
                "deleted {n} finished jobs older than {}s (queue.keep_finished_secs)",
                keep.as_secs()
            ),
            Err(e) => log::error!("{e}"),
        }
    }

    pub(super) fn queue_depth(&self) -> usize {
        self.jobs.count(JobState::Queued)
    }
}
