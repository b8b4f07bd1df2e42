use super::*;

impl Coordinator {
    pub fn create_agent(&mut self, spec: AgentSpec, now: Now) -> Result<AgentView, CoreError> {
        self.now = now;
        let exists = || CoreError::Conflict {
            code: "exists",
            message: format!("agent {} already exists", spec.name),
        };
        if self.agents.contains_key(&spec.name) {
            return Err(exists());
        }
        let created = self.now.wall_ms;
        if !self.store.insert_agent(&spec, created)? {
            return Err(exists());
        }
        let name = spec.name.clone();
        self.agents
            .insert(name.clone(), Agent::new(spec, created, self.now.at));
        self.index(&name, created, None, AgentState::Pending, None);
        self.event(
            EventKind::Created,
            Some(&name),
            None,
            format!("agent {name} created"),
        );
        self.agent(&name, self.now)
    }

    /// Creates many agents with one store transaction; names that exist
    /// (or repeat within `specs`) are reported, the others created.
    pub fn create_agents(
        &mut self,
        specs: Vec<AgentSpec>,
        now: Now,
    ) -> Result<AgentsCreated, CoreError> {
        self.now = now;
        let mut errors = Vec::new();
        let mut fresh = Vec::with_capacity(specs.len());
        let mut seen = HashSet::new();
        for spec in specs {
            if self.agents.contains_key(&spec.name) || !seen.insert(spec.name.clone()) {
                errors.push(exists(&spec.name));
            } else {
                fresh.push(spec);
            }
        }
        let created_ms = self.now.wall_ms;
        let inserted = self.store.insert_agents(&fresh, created_ms)?;
        let mut created = Vec::with_capacity(fresh.len());
        for (spec, new) in fresh.into_iter().zip(inserted) {
            let name = spec.name.clone();
            if !new {
                errors.push(exists(&name));
                continue;
            }
            self.agents
                .insert(name.clone(), Agent::new(spec, created_ms, self.now.at));
            self.index(&name, created_ms, None, AgentState::Pending, None);
            self.event(
                EventKind::Created,
                Some(&name),
                None,
                format!("agent {name} created"),
            );
            created.push(self.agent(&name, self.now)?);
        }
        Ok(AgentsCreated { created, errors })
    }

    /// Deletes an agent: at once if no node hosts it, otherwise once its
    /// node released it. Nothing is sent unless the store took the change.
    pub fn delete_agent(&mut self, name: &str, now: Now) -> Result<AgentDeleted, CoreError> {
        self.now = now;
        let Some(a) = self.agents.get(name) else {
            return Err(CoreError::NotFound(format!("no agent named {name}")));
        };
        match (a.state, a.node.clone()) {
            (AgentState::Stopping, _) => {}
            (AgentState::Pending, _) | (_, None) => self.try_remove_agent(name)?,
            (_, Some(node)) => {
                let placement = a.placement;
                self.try_set_state(name, AgentState::Stopping, Some(node.clone()))?;
                if let Some(a) = self.agents.get_mut(name) {
                    a.deadline = Some(self.now.at + self.config.timeouts.assign_ack);
                }
                self.fail_chats(name, "the agent is being stopped");
                for id in self.jobs.take_queue(name) {
                    self.finish_job(&id, None, Some("the agent was stopped".into()));
                }
                self.release(&node, name, placement);
                self.event(
                    EventKind::Stopping,
                    Some(name),
                    Some(&node),
                    format!("stopping {name} on {node}"),
                );
            }
        }
        let state = self
            .agents
            .get(name)
            .map_or("stopped", |a| a.state.as_str());
        Ok(AgentDeleted {
            name: name.to_owned(),
            state: state.to_owned(),
        })
    }

    pub fn chat(&mut self, name: &str, call: ChatCall, reply: Responder, now: Now) {
        self.now = now;
        if !self.agents.contains_key(name) {
            let error = CoreError::NotFound(format!("no agent named {name}"));
            self.answer(reply, Err(error));
            return;
        }
        if !self.link_up {
            // Its turn could not reach the node, nor its answer come back.
            self.answer(reply, Err(CoreError::NoBroker));
            return;
        }
        if let Some(fault) = &self.store_fault {
            // Its answer could not be stored: do not make a Pi generate it.
            let message = format!("the store cannot write ({fault}); try again shortly");
            self.answer(reply, Err(CoreError::Store(StoreFault::new(message))));
            return;
        }
        let Some(a) = self.agents.get_mut(name) else {
            return;
        };
        // Assigned, moving, or pending but not yet tried: it runs shortly, so
        // the chat waits for it (the API's chat timeout bounds the wait).
        // Stopping, or pending for a known reason (no room...): say why now.
        let hopeless = match a.state {
            AgentState::Stopping => true,
            AgentState::Pending => a.pending_reason.is_some(),
            _ => false,
        };
        if hopeless {
            let why = a
                .pending_reason
                .clone()
                .unwrap_or_else(|| "it is being placed".into());
            let message = format!("agent {name} is not running ({}): {why}", a.state.as_str());
            let error = CoreError::NotRunning {
                message,
                retry_after_secs: Some(self.config.queue.retry_after_secs),
            };
            self.answer(reply, Err(error));
            return;
        }
        a.chats.push_back(ChatWaiter { call, reply });
        self.dispatch(name);
    }

    pub fn submit_job(
        &mut self,
        name: &str,
        message: String,
        priority: i64,
        now: Now,
    ) -> Result<JobSubmitted, CoreError> {
        self.now = now;
        let limits = self.config.queue.clone();
        let queued_total = self.jobs.count(JobState::Queued);
        let waiting = self.jobs.queued_for(name);
        let Some(a) = self.agents.get(name) else {
            return Err(CoreError::NotFound(format!("no agent named {name}")));
        };
        if a.state == AgentState::Stopping {
            return Err(CoreError::Conflict {
                code: "stopping",
                message: format!("agent {name} is being stopped"),
            });
        }
        if waiting >= limits.max_jobs_per_agent || queued_total >= limits.max_jobs {
            let which = if waiting >= limits.max_jobs_per_agent {
                format!("agent {name} has {waiting} jobs waiting (queue.max_jobs_per_agent)")
            } else {
                format!("{queued_total} jobs are waiting in the fleet (queue.max_jobs)")
            };
            self.metrics.jobs_rejected.inc();
            return Err(CoreError::QueueFull {
                message: format!("queue full: {which}; retry later"),
                retry_after_secs: limits.retry_after_secs,
            });
        }
        let now = self.now.wall_ms;
        let mut job = JobRow {
            id: format!("j{}", crate::protocol::new_id()),
            agent: name.to_owned(),
            message,
            priority,
            seq: 0,
            state: JobState::Queued,
            attempts: 0,
            node: None,
            created_ms: now,
            updated_ms: now,
            answer: None,
            error: None,
            usage: None,
        };
        self.store.insert_job(&mut job)?;
        let id = job.id.clone();
        self.jobs.insert(job);
        self.metrics.jobs_submitted.inc();
        self.dispatch(name);
        Ok(JobSubmitted {
            job_id: id,
            status: JobState::Queued,
        })
    }

    pub fn job(&self, id: &str) -> Result<JobView, CoreError> {
        let job = match self.jobs.get(id) {
            Some(job) => Some(job.clone()),
            None => self.store.job(id)?,
        };
        job.map(|job| views::job_view(&job))
            .ok_or_else(|| CoreError::NotFound(format!("no job {id}")))
    }

    pub fn list_jobs(
        &self,
        agent: Option<&str>,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<JobList, CoreError> {
        let jobs = self.store.jobs(agent, state.map(JobState::as_str), limit)?;
        let jobs = jobs
            .iter()
            .map(|j| views::job_view(self.jobs.get(&j.id).unwrap_or(j)))
            .collect();
        Ok(JobList { jobs })
    }

    pub fn drain(
        &mut self,
        node: &str,
        max_parallel: Option<usize>,
        deadline: Option<Duration>,
        now: Now,
    ) -> Result<NodeView, CoreError> {
        self.now = now;
        if self.fleet.get(node).is_none() {
            return Err(CoreError::NotFound(format!("no node named {node}")));
        }
        let deadline = deadline.unwrap_or(self.config.scheduler.drain_deadline);
        let flags = NodeFlags {
            cordoned: true,
            draining: true,
            drain_deadline_ms: Some(self.now.wall_ms + deadline.as_millis() as u64),
            drain_max_parallel: Some(
                max_parallel
                    .unwrap_or(self.config.scheduler.drain_max_parallel)
                    .max(1),
            ),
        };
        self.set_flags(node, flags)?;
        self.drained_reported.remove(node);
        let hosted = self.agents.values().filter(|a| a.on(node)).count();
        self.event(
            EventKind::Drain,
            None,
            Some(node),
            format!(
                "draining {node}: {hosted} agents to move, at most {} at a time, all by {}s",
                self.flags[node].drain_max_parallel.unwrap_or(1),
                deadline.as_secs()
            ),
        );
        self.reconcile(self.now);
        self.node(node, self.now)
    }

    pub fn uncordon(&mut self, node: &str, now: Now) -> Result<NodeView, CoreError> {
        self.now = now;
        if self.fleet.get(node).is_none() {
            return Err(CoreError::NotFound(format!("no node named {node}")));
        }
        self.set_flags(node, NodeFlags::default())?;
        self.event(
            EventKind::Uncordon,
            None,
            Some(node),
            format!("{node} takes agents again"),
        );
        self.reconcile(self.now);
        self.node(node, self.now)
    }

    /// Forgets a node that is not online (a Pi taken out of the fleet): its
    /// agents are placed elsewhere, its flags deleted, and its retained
    /// status and capacity cleared on the broker so that dashboards and a
    /// restarted coordinator stop showing it. If it comes back it joins as
    /// a new node.
    pub fn forget_node(&mut self, node: &str, now: Now) -> Result<NodeForgotten, CoreError> {
        self.now = now;
        let Some(view) = self.fleet.get(node) else {
            return Err(CoreError::NotFound(format!("no node named {node}")));
        };
        if matches!(
            view.liveness,
            crate::coordinator::fleet::Liveness::Online
                | crate::coordinator::fleet::Liveness::Suspect { .. }
        ) {
            return Err(CoreError::Conflict {
                code: "node_online",
                message: format!("node {node} is online: stop its daemon first (drain it to move its agents gracefully)"),
            });
        }
        // Stored first: a node forgotten in memory only would come back,
        // still cordoned, after a restart.
        self.store.delete_node_flags(node)?;
        let hosted: Vec<String> = self
            .by_node
            .get(node)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        for name in &hosted {
            match self.agents.get(name).map(|a| a.state) {
                Some(AgentState::Releasing | AgentState::Stopping) => self.released(name, node),
                Some(_) => {
                    self.requeue_agent(name, None, &format!("its node {node} was forgotten"))
                }
                None => {}
            }
        }
        self.fleet.forget(node);
        self.lists.forget(node);
        self.lists_asked.remove(node);
        self.touched.remove(node);
        self.reconciled.remove(node);
        self.flags.remove(node);
        self.drain_sent.remove(node);
        self.drained_reported.remove(node);
        // Home Assistant's entities go before the state they read.
        self.clear_discovery(node);
        for kind in [NodeTopic::Status, NodeTopic::Capacity] {
            self.publish(self.topics.node(node, kind), Vec::new(), true);
        }
        self.event(
            EventKind::Forgotten,
            None,
            Some(node),
            format!(
                "forgot node {node}; {} of its agents to place elsewhere",
                hosted.len()
            ),
        );
        self.reconcile(self.now);
        Ok(NodeForgotten {
            node: node.to_owned(),
            forgotten: true,
        })
    }

    /// Stores a node's cordon and drain flags, then applies them; on a
    /// store error nothing changes (a drain lost at the next restart would
    /// surprise the user more than a refused one).
    pub(super) fn set_flags(&mut self, node: &str, flags: NodeFlags) -> Result<(), StoreError> {
        self.store.set_node_flags(node, &flags)?;
        self.flags.insert(node.to_owned(), flags);
        self.drain_sent.remove(node);
        self.sync_drain_flag(node);
        Ok(())
    }

    /// Tells `node` its draining flag when its capacity says otherwise.
    pub(super) fn sync_drain_flag(&mut self, node: &str) {
        let want = self.flags.get(node).is_some_and(|f| f.draining);
        let Some(view) = self.fleet.get(node) else {
            return;
        };
        let Some(capacity) = &view.capacity else {
            return;
        };
        if capacity.draining == want || !view.is_online() {
            return;
        }
        let now = self.now.at;
        if self
            .drain_sent
            .get(node)
            .is_some_and(|at| now.duration_since(*at) < RESEND_AFTER)
        {
            return;
        }
        self.drain_sent.insert(node.to_owned(), now);
        self.send(node, CommandBody::Drain { draining: want });
    }
}

fn exists(name: &str) -> AgentError {
    AgentError {
        name: name.to_owned(),
        code: "exists".to_owned(),
        error: format!("agent {name} already exists"),
    }
}
