use super::*;

impl Coordinator {
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
        v["last_seen_secs"] = json!(self
            .now
            .at
            .saturating_duration_since(view.last_heard)
            .as_secs());
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
            "state_secs": self.now.at.saturating_duration_since(a.since).as_secs(),
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
        let mut payload = summary.clone();
        payload["ts"] = json!(self.now.wall_ms);
        self.publish(self.topics.fleet_summary(), payload.to_string(), true);
        self.summary_published = Some((now, summary));
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
