use super::*;

impl AgentState {
    pub(super) fn stored(self) -> StoredState {
        match self {
            AgentState::Pending | AgentState::Releasing => StoredState::Pending,
            AgentState::Assigned => StoredState::Assigned,
            AgentState::Running => StoredState::Running,
            AgentState::Stopping => StoredState::Stopping,
        }
    }

    pub(super) fn from_stored(state: StoredState) -> AgentState {
        match state {
            StoredState::Pending => AgentState::Pending,
            StoredState::Assigned => AgentState::Assigned,
            StoredState::Running => AgentState::Running,
            StoredState::Stopping => AgentState::Stopping,
        }
    }
}

pub(super) struct ChatWaiter {
    pub(super) messages: Vec<ChatMessage>,
    pub(super) reply: Responder,
}

pub struct Agent {
    pub spec: AgentSpec,
    pub created_ms: u64,
    pub state: AgentState,
    pub node: Option<String>,
    pub placement: u64,
    pub(super) since: Instant,
    /// When an assignment or release must have been acknowledged.
    pub(super) deadline: Option<Instant>,
    /// The node's capacity `seq` (this session) as of the last
    /// confirmation that it hosts the agent: only a capacity message with a
    /// greater `seq` can say it no longer does. Never a timestamp: node
    /// clocks are not to be trusted or compared.
    pub(super) confirmed_seq: u64,
    pub pending_reason: Option<String>,
    /// A node not to place it on, until when.
    pub(super) avoid: Option<(String, Instant)>,
    /// The node it is moving away from, while in motion.
    pub(super) moving_from: Option<String>,
    pub(super) last_moved: Option<Instant>,
    /// Since when it has needed a node (created, or left its node), until
    /// it runs: the scheduling latency.
    pub(super) waiting_since: Option<Instant>,
    pub(super) turn: Option<String>,
    pub(super) chats: VecDeque<ChatWaiter>,
}

impl Agent {
    pub(super) fn new(spec: AgentSpec, created_ms: u64, now: Instant) -> Agent {
        Agent {
            spec,
            created_ms,
            state: AgentState::Pending,
            node: None,
            placement: 0,
            since: now,
            deadline: None,
            confirmed_seq: 0,
            pending_reason: None,
            avoid: None,
            moving_from: None,
            last_moved: None,
            waiting_since: Some(now),
            turn: None,
            chats: VecDeque::new(),
        }
    }

    pub(super) fn avoided(&self, now: Instant) -> Option<&str> {
        match &self.avoid {
            Some((node, until)) if *until > now => Some(node),
            _ => None,
        }
    }

    pub(super) fn on(&self, node: &str) -> bool {
        self.node.as_deref() == Some(node)
    }
}

pub(super) enum TurnKind {
    Chat(Responder),
    Job(String),
}

pub(super) struct TurnInFlight {
    pub(super) agent: String,
    pub(super) node: String,
    pub(super) kind: TurnKind,
    pub(super) new_messages: Vec<ChatMessage>,
    /// When the caller stops waiting (on the coordinator's monotonic
    /// clock); the node gets what is left of it as `timeout_ms`.
    pub(super) deadline: Instant,
}

impl TurnInFlight {
    /// The job it serves, if it is a job's turn.
    pub(super) fn job(&self) -> Option<&String> {
        match &self.kind {
            TurnKind::Job(id) => Some(id),
            TurnKind::Chat(_) => None,
        }
    }
}
