//! API requests as data, as mini-redis and rumqttd take their commands: the
//! HTTP handlers build an [`ApiRequest`] (what to do, and the channel its
//! answer goes to) and the coordinator task hands it to
//! [`Coordinator::handle`]. Being data, a request can be logged (its `Debug`
//! leaves the answer channel out) and replayed by in-process tests, and its
//! answer goes through [`Coordinator::answer`], so it leaves only once the
//! request's store batch commits.

use super::*;

/// One API request and where its answer goes.
pub enum ApiRequest {
    /// Set the Prometheus gauges from the current status (a scrape).
    Observe {
        reply: Answer<()>,
    },
    Status {
        events: usize,
        reply: Answer<FleetStatus>,
    },
    Nodes {
        reply: Answer<NodeList>,
    },
    Node {
        node: String,
        reply: Answer<NodeView>,
    },
    Drain {
        node: String,
        max_parallel: Option<usize>,
        deadline: Option<Duration>,
        reply: Answer<NodeView>,
    },
    Uncordon {
        node: String,
        reply: Answer<NodeView>,
    },
    ForgetNode {
        node: String,
        reply: Answer<NodeForgotten>,
    },
    Agents {
        reply: Answer<AgentList>,
    },
    Agent {
        name: String,
        reply: Answer<AgentView>,
    },
    CreateAgent {
        spec: AgentSpec,
        reply: Answer<AgentView>,
    },
    /// Many agents; `rejected` are the ones the API refused already, to be
    /// reported with the others.
    CreateAgents {
        specs: Vec<AgentSpec>,
        rejected: Vec<AgentError>,
        reply: Answer<AgentsCreated>,
    },
    DeleteAgent {
        name: String,
        reply: Answer<AgentDeleted>,
    },
    /// Answered when the turn completes (or fails); a streamed chat's
    /// text goes to its `call.deltas` as it comes.
    Chat {
        agent: String,
        call: ChatCall,
        reply: Responder,
    },
    SubmitJob {
        agent: String,
        message: String,
        priority: i64,
        reply: Answer<JobSubmitted>,
    },
    Jobs {
        agent: Option<String>,
        state: Option<JobState>,
        limit: usize,
        reply: Answer<JobList>,
    },
    Job {
        id: String,
        reply: Answer<JobView>,
    },
    Events {
        limit: usize,
        reply: Answer<EventList>,
    },
    Pulls {
        reply: Answer<crate::protocol::PullList>,
    },
    /// Pull `model` on `nodes` (every online node that lacks it if empty).
    Pull {
        model: String,
        nodes: Vec<String>,
        reply: Answer<crate::protocol::PullList>,
    },
}

impl std::fmt::Debug for ApiRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use ApiRequest::*;
        match self {
            Observe { .. } => write!(f, "Observe"),
            Status { events, .. } => write!(f, "Status {{ events: {events} }}"),
            Nodes { .. } => write!(f, "Nodes"),
            Node { node, .. } => write!(f, "Node({node})"),
            Drain {
                node,
                max_parallel,
                deadline,
                ..
            } => write!(
                f,
                "Drain {{ node: {node}, max_parallel: {max_parallel:?}, deadline: {deadline:?} }}"
            ),
            Uncordon { node, .. } => write!(f, "Uncordon({node})"),
            ForgetNode { node, .. } => write!(f, "ForgetNode({node})"),
            Agents { .. } => write!(f, "Agents"),
            Agent { name, .. } => write!(f, "Agent({name})"),
            CreateAgent { spec, .. } => write!(f, "CreateAgent({spec:?})"),
            CreateAgents {
                specs, rejected, ..
            } => write!(
                f,
                "CreateAgents {{ {} specs, {} rejected }}",
                specs.len(),
                rejected.len()
            ),
            DeleteAgent { name, .. } => write!(f, "DeleteAgent({name})"),
            Chat { agent, call, .. } => write!(
                f,
                "Chat {{ agent: {agent}, {} messages, memory: {}, streamed: {} }}",
                call.messages.len(),
                call.memory,
                call.deltas.is_some()
            ),
            SubmitJob {
                agent, priority, ..
            } => write!(f, "SubmitJob {{ agent: {agent}, priority: {priority} }}"),
            Jobs {
                agent,
                state,
                limit,
                ..
            } => write!(
                f,
                "Jobs {{ agent: {agent:?}, state: {state:?}, limit: {limit} }}"
            ),
            Job { id, .. } => write!(f, "Job({id})"),
            Events { limit, .. } => write!(f, "Events {{ limit: {limit} }}"),
            Pulls { .. } => write!(f, "Pulls"),
            Pull { model, nodes, .. } => write!(f, "Pull {{ model: {model}, nodes: {nodes:?} }}"),
        }
    }
}

impl Coordinator {
    /// Does what `request` asks at `now`; its answer is held until the open
    /// store batch commits.
    pub fn handle(&mut self, request: ApiRequest, now: Now) {
        log::debug!("API request: {request:?}");
        use ApiRequest::*;
        match request {
            Observe { reply } => {
                self.metrics.observe(&self.status(0, now));
                self.answer(reply, Ok(()));
            }
            Status { events, reply } => {
                let status = self.status(events, now);
                self.answer(reply, Ok(status));
            }
            Nodes { reply } => {
                let nodes = self.nodes(now);
                self.answer(reply, Ok(nodes));
            }
            Node { node, reply } => {
                let view = self.node(&node, now);
                self.answer(reply, view);
            }
            Drain {
                node,
                max_parallel,
                deadline,
                reply,
            } => {
                let view = self.drain(&node, max_parallel, deadline, now);
                self.answer(reply, view);
            }
            Uncordon { node, reply } => {
                let view = self.uncordon(&node, now);
                self.answer(reply, view);
            }
            ForgetNode { node, reply } => {
                let forgotten = self.forget_node(&node, now);
                self.answer(reply, forgotten);
            }
            Agents { reply } => {
                let list = self.agent_list(now);
                self.answer(reply, Ok(list));
            }
            Agent { name, reply } => {
                let view = self.agent(&name, now);
                self.answer(reply, view);
            }
            CreateAgent { spec, reply } => {
                let view = self.create_agent(spec, now);
                self.answer(reply, view);
            }
            CreateAgents {
                specs,
                rejected,
                reply,
            } => {
                let created = self.create_agents(specs, now).map(|mut created| {
                    created.errors.splice(0..0, rejected);
                    created
                });
                self.answer(reply, created);
            }
            DeleteAgent { name, reply } => {
                let deleted = self.delete_agent(&name, now);
                self.answer(reply, deleted);
            }
            Chat { agent, call, reply } => self.chat(&agent, call, reply, now),
            SubmitJob {
                agent,
                message,
                priority,
                reply,
            } => {
                let submitted = self.submit_job(&agent, message, priority, now);
                self.answer(reply, submitted);
            }
            Jobs {
                agent,
                state,
                limit,
                reply,
            } => {
                let jobs = self.list_jobs(agent.as_deref(), state, limit);
                self.answer(reply, jobs);
            }
            Job { id, reply } => {
                let job = self.job(&id);
                self.answer(reply, job);
            }
            Events { limit, reply } => {
                let events = self.events(limit);
                self.answer(reply, Ok(events));
            }
            Pulls { reply } => {
                self.now = now;
                let list = self.pull_list();
                self.answer(reply, Ok(list));
            }
            Pull {
                model,
                nodes,
                reply,
            } => {
                let list = self.pull_model(&model, nodes, now);
                self.answer(reply, list);
            }
        }
    }
}
