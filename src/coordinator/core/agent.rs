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
    pub(super) call: ChatCall,
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
    Chat(ChatTurn),
    Job(String),
}

/// A chat's turn in flight: where its answer goes.
pub(super) struct ChatTurn {
    pub(super) reply: Responder,
    /// The turn is stored in the agent's history once answered.
    pub(super) memory: bool,
    pub(super) relay: Option<Relay>,
}

impl ChatTurn {
    /// Whether nobody waits for the answer any more (the HTTP client went
    /// away or gave up).
    pub(super) fn abandoned(&self) -> bool {
        self.reply.is_closed() || self.relay.as_ref().is_some_and(|r| r.deltas.is_closed())
    }
}

/// A streamed chat's chunks on their way to its client: each `seq` once,
/// in order, whatever QoS 1 delivers twice or a reconnection reorders.
pub(super) struct Relay {
    pub(super) deltas: Deltas,
    /// The next `seq` to pass on.
    pub(super) next: u32,
    /// Chunks that came before their predecessors.
    pub(super) early: BTreeMap<u32, String>,
    /// Bytes of the answer passed on so far.
    pub(super) sent: usize,
}

/// Chunks held while an earlier one is missing; beyond this, the rest of
/// the answer comes from the final result.
const EARLY_CHUNKS_KEPT: usize = 1024;

impl Relay {
    pub(super) fn new(deltas: Deltas) -> Relay {
        Relay {
            deltas,
            next: 0,
            early: BTreeMap::new(),
            sent: 0,
        }
    }

    /// Whether any chunk arrived (passed on, or held): a run of the turn
    /// again would not continue what the client has.
    pub(super) fn started(&self) -> bool {
        self.next > 0 || !self.early.is_empty()
    }

    /// Chunk `seq`: passed on in order, a repeat dropped.
    pub(super) fn chunk(&mut self, seq: u32, content: String) {
        if seq < self.next {
            return;
        }
        if seq > self.next {
            if self.early.len() < EARLY_CHUNKS_KEPT {
                self.early.insert(seq, content);
            }
            return;
        }
        self.pass(content);
        while let Some(content) = self.early.remove(&self.next) {
            self.pass(content);
        }
    }

    fn pass(&mut self, content: String) {
        self.next += 1;
        self.sent += content.len();
        if !content.is_empty() {
            // A client gone is noticed by the periodic sweep.
            let _ = self.deltas.send(content);
        }
    }

    /// The turn's whole answer arrived: what chunks did not carry (lost on
    /// the way, or never sent) goes now, so the client gets it all once.
    pub(super) fn finish(mut self, answer: &str) {
        match answer.get(self.sent..) {
            Some(rest) => self.pass(rest.to_owned()),
            None => log::warn!(
                "a streamed answer's chunks ({} bytes) are not a prefix of its result ({} bytes)",
                self.sent,
                answer.len()
            ),
        }
    }
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

    /// Whether its answer is stored in the agent's history (job turns and
    /// chats with memory).
    pub(super) fn remembered(&self) -> bool {
        match &self.kind {
            TurnKind::Chat(chat) => chat.memory,
            TurnKind::Job(_) => true,
        }
    }

    /// Whether the answer is to be streamed.
    pub(super) fn streamed(&self) -> bool {
        matches!(&self.kind, TurnKind::Chat(chat) if chat.relay.is_some())
    }
}
