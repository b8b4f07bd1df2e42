//! What the core shows: typed views (`protocol::views`) of agents, nodes,
//! jobs, events and the fleet, and the retained fleet summary.

use super::*;

impl Coordinator {
    pub fn summary(&self) -> FleetSummary {
        let online: Vec<_> = self.fleet.nodes().filter(|n| n.is_online()).collect();
        let capacity: u64 = online
            .iter()
            .filter_map(|n| n.capacity.as_ref())
            .map(|c| u64::from(c.agent_capacity))
            .sum();
        let count = |s: AgentState| self.agents.values().filter(|a| a.state == s).count();
        let running = count(AgentState::Running);
        FleetSummary {
            nodes_online: online.len(),
            nodes_total: self.fleet.nodes().count(),
            agents_total: self.agents.len(),
            agents_running: running,
            agents_pending: count(AgentState::Pending),
            agents_assigned: count(AgentState::Assigned),
            agents_moving: count(AgentState::Releasing),
            agents_stopping: count(AgentState::Stopping),
            agent_capacity: capacity,
            utilisation_pct: if capacity == 0 {
                0.0
            } else {
                running as f64 * 100.0 / capacity as f64
            },
            queue_depth: self.queue_depth(),
            jobs_running: self.jobs.count(JobState::Running),
            generation: self.generation,
            ts: None,
        }
    }

    pub fn status(&self, events: usize, now: Now) -> FleetStatus {
        FleetStatus {
            summary: self.summary(),
            nodes: self.nodes(now).nodes,
            events: self.events(events).events,
        }
    }

    /// The newest `limit` events, newest first.
    pub fn events(&self, limit: usize) -> EventList {
        EventList {
            events: self.events.iter().rev().take(limit).cloned().collect(),
        }
    }

    pub fn node(&self, node: &str, now: Now) -> Result<NodeView, CoreError> {
        let assigned = self
            .agents
            .values()
            .filter(|a| a.on(node) && a.state == AgentState::Assigned)
            .count();
        self.node_view(node, assigned, now)
    }

    /// The view of `node`, given how many assignments to it are unconfirmed.
    fn node_view(&self, node: &str, assigned: usize, now: Now) -> Result<NodeView, CoreError> {
        let Some(view) = self.fleet.get(node) else {
            return Err(CoreError::NotFound(format!("no node named {node}")));
        };
        let flags = self.flags.get(node).cloned().unwrap_or_default();
        let mut capacity = view.capacity.clone().unwrap_or_else(|| never_heard(node));
        if !view.is_online() {
            // Its last report no longer says what runs there.
            capacity.agents_running = 0;
            capacity.agents = Some(Vec::new());
        } else if capacity.agents.is_none() {
            // A long list travels apart from the heartbeats: the one held.
            capacity.agents = self.lists.get(node).map(|l| {
                let mut names: Vec<String> = l.names.iter().cloned().collect();
                names.sort_unstable();
                names
            });
        }
        capacity.draining |= flags.draining;
        Ok(NodeView {
            capacity,
            state: view.liveness.name().to_owned(),
            cordoned: flags.cordoned,
            assigned,
            last_seen_secs: now.at.saturating_duration_since(view.last_heard).as_secs(),
        })
    }

    /// Every node: one pass over the agents, not one per node.
    pub fn nodes(&self, now: Now) -> NodeList {
        let mut assigned: HashMap<&str, usize> = HashMap::new();
        for a in self.agents.values() {
            if let (AgentState::Assigned, Some(node)) = (a.state, a.node.as_deref()) {
                *assigned.entry(node).or_default() += 1;
            }
        }
        NodeList {
            nodes: self
                .fleet
                .nodes()
                .filter_map(|n| {
                    let count = assigned.get(n.id.as_str()).copied().unwrap_or(0);
                    self.node_view(&n.id, count, now).ok()
                })
                .collect(),
        }
    }

    pub fn agent(&self, name: &str, now: Now) -> Result<AgentView, CoreError> {
        let Some(a) = self.agents.get(name) else {
            return Err(CoreError::NotFound(format!("no agent named {name}")));
        };
        Ok(AgentView {
            name: name.to_owned(),
            model: a.spec.model.clone(),
            state: a.state,
            node: a.node.clone(),
            system: a.spec.system.clone(),
            labels: a.spec.labels.clone(),
            placement: a.placement,
            pending_reason: if a.state == AgentState::Pending {
                a.pending_reason.clone()
            } else {
                None
            },
            queued_jobs: self.jobs.queued_for(name),
            busy: a.turn.is_some(),
            created_ms: a.created_ms,
            state_secs: now.at.saturating_duration_since(a.since).as_secs(),
        })
    }

    pub fn agent_list(&self, now: Now) -> AgentList {
        AgentList {
            agents: self
                .agents
                .keys()
                .filter_map(|n| self.agent(n, now).ok())
                .collect(),
        }
    }

    /// The retained fleet summary, published when it changed (at most once
    /// a second) or every 30 s.
    pub fn publish_summary(&mut self, now: Now) {
        self.now = now;
        self.announce_discovery();
        let summary = self.summary();
        let now = self.now.at;
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
        let payload = FleetSummary {
            ts: Some(self.now.wall_ms),
            ..summary.clone()
        };
        self.publish(self.topics.fleet_summary(), encode(&payload), true);
        self.summary_published = Some((now, summary));
    }
}

/// The view of a node named by the store that has not spoken yet.
fn never_heard(node: &str) -> Capacity {
    Capacity {
        node: node.to_owned(),
        ..Capacity::default()
    }
}

pub fn job_view(job: &JobRow) -> JobView {
    JobView {
        job_id: job.id.clone(),
        agent: job.agent.clone(),
        status: job.state,
        priority: job.priority,
        message: job.message.clone(),
        attempts: job.attempts,
        node: job.node.clone(),
        answer: job.answer.clone(),
        error: job.error.clone(),
        usage: job.usage.clone(),
        created_ms: job.created_ms,
        updated_ms: job.updated_ms,
    }
}
