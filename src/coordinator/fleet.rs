//! The coordinator's view of the nodes, built from their retained `status`
//! and `capacity` messages. Pure: messages and the time go in, changes come
//! out.
//!
//! * A node is **online** once it has a capacity message and its status is
//!   `online` (or it speaks live). Retained replays alone do not bring a node
//!   online while its retained status says `offline`.
//! * An `offline` (the last will, or a clean stop) makes it **suspect** for
//!   `offline_grace`: a live capacity message of the same session in that
//!   window means the `offline` was a late will of an older connection, and
//!   the node stays. Otherwise it is **lost**.
//! * No capacity message for `node_lost_after` also makes it lost.
//! * A lost node's agents may be placed elsewhere only once the node has
//!   surely stopped them ([`Fleet::released_at`]): after a silence, `last
//!   heard + the node's announced fence_ms` (its lease cannot outlive the
//!   last heartbeat the coordinator heard by more); after a last will, at
//!   once (docs/RELIABILITY.md says why, and what that costs).
//! * A new `session` is a restart: the new capacity's agent list is the
//!   truth about what the node hosts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::protocol::Capacity;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Referenced by stored agents but not heard from since the start.
    Unknown,
    Online,
    /// Sent `offline`; lost unless it speaks again within the grace.
    Suspect {
        since: Instant,
    },
    Lost {
        since: Instant,
    },
}

impl Liveness {
    pub fn name(&self) -> &'static str {
        match self {
            Liveness::Unknown => "unknown",
            Liveness::Online => "online",
            Liveness::Suspect { .. } => "suspect",
            Liveness::Lost { .. } => "offline",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: String,
    pub capacity: Option<Capacity>,
    pub liveness: Liveness,
    /// What the latest status message said (None: no status seen yet).
    pub status_online: Option<bool>,
    /// When the coordinator last received a message from it (its own
    /// clock: node timestamps are never trusted).
    pub last_heard: Instant,
    /// Lost through its last will (`offline` while online) rather than
    /// silence.
    pub lost_by_will: bool,
}

impl NodeView {
    pub fn is_online(&self) -> bool {
        self.liveness == Liveness::Online
    }

    pub fn session(&self) -> Option<&str> {
        self.capacity.as_ref().map(|c| c.session.as_str())
    }
}

/// What changed for the coordinator to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Online for the first time, or again after being lost.
    Joined {
        node: String,
    },
    /// A new process (session) on a node that was online or suspect.
    Restarted {
        node: String,
    },
    /// A suspect node spoke again: its `offline` was stale.
    Recovered {
        node: String,
    },
    Lost {
        node: String,
        reason: String,
    },
}

/// Added to a node's fence time: its timer may fire a little late (a busy
/// Pi), and two crystals never tick at quite the same rate.
pub const FENCE_MARGIN: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct Fleet {
    nodes: BTreeMap<String, NodeView>,
}

/// The outcome of a capacity message.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Older than what we have (same session, lower or equal seq).
    Stale,
    Accepted(Option<Change>),
}

impl Fleet {
    pub fn get(&self, node: &str) -> Option<&NodeView> {
        self.nodes.get(node)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeView> {
        self.nodes.values()
    }

    pub fn is_online(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(NodeView::is_online)
    }

    /// Drops everything known about `node`.
    pub fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    /// Remembers a node that stored agents point at, so that it is declared
    /// lost if it never speaks.
    pub fn expect(&mut self, node: &str, now: Instant) {
        self.nodes
            .entry(node.to_owned())
            .or_insert_with(|| NodeView {
                id: node.to_owned(),
                capacity: None,
                liveness: Liveness::Unknown,
                status_online: None,
                last_heard: now,
                lost_by_will: false,
            });
    }

    fn entry(&mut self, node: &str, now: Instant) -> &mut NodeView {
        self.expect(node, now);
        self.nodes.get_mut(node).expect("just inserted")
    }

    /// A capacity message; `retained` when the broker replayed it on
    /// subscription rather than the node publishing it now.
    pub fn capacity(&mut self, capacity: Capacity, retained: bool, now: Instant) -> Heard {
        let view = self.entry(&capacity.node.clone(), now);
        let same_session = view.session() == Some(capacity.session.as_str());
        if same_session
            && view
                .capacity
                .as_ref()
                .is_some_and(|c| capacity.seq <= c.seq)
        {
            return Heard::Stale;
        }
        let before = view.liveness;
        let had_session = view.capacity.is_some();
        let node = capacity.node.clone();
        view.capacity = Some(capacity);
        view.last_heard = now;
        if !retained {
            view.status_online = Some(true);
        }
        let speaks = !retained || view.status_online == Some(true);
        let change = match before {
            Liveness::Online if !same_session && had_session => Some(Change::Restarted { node }),
            Liveness::Online => None,
            Liveness::Suspect { .. } if !retained && same_session => {
                view.liveness = Liveness::Online;
                Some(Change::Recovered { node })
            }
            Liveness::Suspect { .. } if !retained => {
                view.liveness = Liveness::Online;
                Some(Change::Restarted { node })
            }
            Liveness::Suspect { .. } => None,
            Liveness::Unknown | Liveness::Lost { .. } if speaks => {
                view.liveness = Liveness::Online;
                Some(Change::Joined { node })
            }
            Liveness::Unknown | Liveness::Lost { .. } => None,
        };
        Heard::Accepted(change)
    }

    /// A status message (`online` / `offline`).
    pub fn status(&mut self, node: &str, online: bool, now: Instant) -> Option<Change> {
        let view = self.entry(node, now);
        view.status_online = Some(online);
        match (view.liveness, online) {
            (Liveness::Online, false) => {
                view.liveness = Liveness::Suspect { since: now };
                None
            }
            (Liveness::Suspect { .. }, true) if view.capacity.is_some() => {
                view.liveness = Liveness::Online;
                view.last_heard = now;
                Some(Change::Recovered {
                    node: node.to_owned(),
                })
            }
            (Liveness::Unknown | Liveness::Lost { .. }, true) if view.capacity.is_some() => {
                view.liveness = Liveness::Online;
                view.last_heard = now;
                Some(Change::Joined {
                    node: node.to_owned(),
                })
            }
            (Liveness::Unknown, false) => {
                view.liveness = Liveness::Suspect { since: now };
                None
            }
            _ => None,
        }
    }

    /// The coordinator itself was cut off from the broker until `now`: what
    /// it did not hear meanwhile says nothing about the nodes, so every node
    /// gets a full `lost_after` from now to be heard again.
    pub fn heard_all(&mut self, now: Instant) {
        for view in self.nodes.values_mut() {
            view.last_heard = now;
            if let Liveness::Suspect { since } = &mut view.liveness {
                *since = now;
            }
        }
    }

    /// Declares lost what stayed silent or suspect too long.
    pub fn tick(
        &mut self,
        now: Instant,
        lost_after: Duration,
        offline_grace: Duration,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for view in self.nodes.values_mut() {
            let by_will = matches!(view.liveness, Liveness::Suspect { .. });
            let reason = match view.liveness {
                Liveness::Suspect { since } if now.duration_since(since) >= offline_grace => {
                    "its status turned offline (last will or clean stop)".to_owned()
                }
                Liveness::Online if now.duration_since(view.last_heard) >= lost_after => {
                    format!("no capacity message for {}s", lost_after.as_secs())
                }
                Liveness::Unknown if now.duration_since(view.last_heard) >= lost_after => {
                    format!(
                        "not heard from in {}s since the coordinator started",
                        lost_after.as_secs()
                    )
                }
                _ => continue,
            };
            view.liveness = Liveness::Lost { since: now };
            view.lost_by_will = by_will;
            changes.push(Change::Lost {
                node: view.id.clone(),
                reason,
            });
        }
        changes
    }

    /// When a lost node was lost.
    pub fn lost_since(&self, node: &str) -> Option<Instant> {
        match self.nodes.get(node)?.liveness {
            Liveness::Lost { since } => Some(since),
            _ => None,
        }
    }

    /// When a lost node has surely stopped its agents, so that they may run
    /// elsewhere (`None`: not lost). Lost by silence: `fence` (its announced
    /// `fence_ms`, else `default_fence`) plus [`FENCE_MARGIN`] after it was
    /// last heard. Lost by its last will: when it was declared lost.
    pub fn released_at(&self, node: &str, default_fence: Duration) -> Option<Instant> {
        let view = self.nodes.get(node)?;
        let Liveness::Lost { since } = view.liveness else {
            return None;
        };
        if view.lost_by_will {
            return Some(since);
        }
        let fence = self.fence(node, default_fence);
        Some(since.max(view.last_heard + fence + FENCE_MARGIN))
    }

    /// Whether `node` reads batches of commands (its last capacity says so).
    pub fn accepts_batches(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .and_then(|v| v.capacity.as_ref())
            .is_some_and(|c| c.batches)
    }

    /// How long after it was last heard `node` has surely stopped its
    /// agents: its announced `fence_ms`, else `default_fence` (a node not
    /// heard yet, or one too old to announce it).
    pub fn fence(&self, node: &str, default_fence: Duration) -> Duration {
        self.nodes
            .get(node)
            .and_then(|v| v.capacity.as_ref())
            .map(|c| Duration::from_millis(c.fence_ms))
            .filter(|f| !f.is_zero())
            .unwrap_or(default_fence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{CpuInfo, MemoryInfo};

    fn cap(node: &str, session: &str, seq: u64) -> Capacity {
        Capacity {
            node: node.into(),
            session: session.into(),
            seq,
            version: "0".into(),
            arch: "aarch64".into(),
            agent_capacity: 4,
            agents_running: 0,
            agents: Some(vec![]),
            agents_rev: seq,
            agents_digest: Default::default(),
            cpu: CpuInfo {
                cores: 4,
                load1: 0.0,
                usage_pct: 0.0,
            },
            memory: MemoryInfo {
                total_bytes: 1,
                available_bytes: 1,
            },
            temperature_c: None,
            throttled: None,
            models: vec![],
            ollama_reachable: true,
            labels: BTreeMap::new(),
            draining: false,
            ts: 0,
            max_temperature_c: None,
            max_parallel: 1,
            turns_in_flight: 0,
            generation: 0,
            fence_ms: 7000,
            batches: false,
        }
    }

    const GRACE: Duration = Duration::from_secs(2);
    const LOST_AFTER: Duration = Duration::from_secs(30);

    #[test]
    fn a_live_capacity_brings_a_node_online_and_stale_sequence_numbers_are_ignored() {
        let mut f = Fleet::default();
        let t = Instant::now();
        assert_eq!(
            f.capacity(cap("a", "s1", 5), false, t),
            Heard::Accepted(Some(Change::Joined { node: "a".into() }))
        );
        assert_eq!(f.capacity(cap("a", "s1", 5), false, t), Heard::Stale);
        assert_eq!(f.capacity(cap("a", "s1", 4), false, t), Heard::Stale);
        assert_eq!(
            f.capacity(cap("a", "s1", 6), false, t),
            Heard::Accepted(None)
        );
    }

    #[test]
    fn a_late_offline_of_an_old_connection_does_not_take_a_live_node_down() {
        let mut f = Fleet::default();
        let t = Instant::now();
        f.capacity(cap("a", "s2", 1), false, t);
        assert_eq!(f.status("a", false, t), None);
        // The node sees its own live 'offline' and announces again.
        assert_eq!(
            f.capacity(cap("a", "s2", 2), false, t + Duration::from_millis(50)),
            Heard::Accepted(Some(Change::Recovered { node: "a".into() }))
        );
        assert!(f
            .tick(t + Duration::from_secs(5), LOST_AFTER, GRACE)
            .is_empty());
        assert!(f.is_online("a"));
    }

    #[test]
    fn offline_without_a_word_within_the_grace_is_lost() {
        let mut f = Fleet::default();
        let t = Instant::now();
        f.capacity(cap("a", "s1", 1), false, t);
        f.status("a", false, t);
        assert!(f
            .tick(t + Duration::from_secs(1), LOST_AFTER, GRACE)
            .is_empty());
        let changes = f.tick(t + GRACE, LOST_AFTER, GRACE);
        assert!(matches!(&changes[..], [Change::Lost { node, .. }] if node == "a"));
        assert_eq!(f.lost_since("a"), Some(t + GRACE));
    }

    #[test]
    fn silence_beyond_the_heartbeat_limit_is_lost_and_a_new_session_is_a_restart() {
        let mut f = Fleet::default();
        let t = Instant::now();
        f.capacity(cap("a", "s1", 1), false, t);
        assert!(matches!(
            &f.tick(t + LOST_AFTER, LOST_AFTER, GRACE)[..],
            [Change::Lost { .. }]
        ));
        assert_eq!(
            f.capacity(cap("a", "s2", 1), false, t + LOST_AFTER),
            Heard::Accepted(Some(Change::Joined { node: "a".into() }))
        );
        assert_eq!(
            f.capacity(cap("a", "s3", 1), false, t + LOST_AFTER),
            Heard::Accepted(Some(Change::Restarted { node: "a".into() }))
        );
    }

    #[test]
    fn retained_replays_of_a_node_whose_status_is_offline_do_not_bring_it_online() {
        let mut f = Fleet::default();
        let t = Instant::now();
        f.status("dead", false, t);
        assert_eq!(
            f.capacity(cap("dead", "s1", 9), true, t),
            Heard::Accepted(None)
        );
        assert!(!f.is_online("dead"));
        // Replays in the other order: capacity first, then online status.
        assert_eq!(
            f.capacity(cap("b", "s1", 3), true, t),
            Heard::Accepted(None)
        );
        assert_eq!(
            f.status("b", true, t),
            Some(Change::Joined { node: "b".into() })
        );
    }

    #[test]
    fn silence_while_the_coordinator_was_cut_off_does_not_count() {
        let mut fleet = Fleet::default();
        let t0 = Instant::now();
        fleet.status("pi-1", true, t0);
        fleet.capacity(cap("pi-1", "s1", 1), false, t0);
        assert!(fleet.is_online("pi-1"));
        let back = t0 + Duration::from_secs(60);
        fleet.heard_all(back);
        assert!(fleet
            .tick(back + LOST_AFTER / 2, LOST_AFTER, GRACE)
            .is_empty());
        assert!(fleet.is_online("pi-1"));
        let lost = fleet.tick(back + LOST_AFTER, LOST_AFTER, GRACE);
        assert!(matches!(&lost[..], [Change::Lost { node, .. }] if node == "pi-1"));
    }

    #[test]
    fn a_node_expected_from_the_store_but_never_heard_is_lost_after_the_limit() {
        let mut f = Fleet::default();
        let t = Instant::now();
        f.expect("ghost", t);
        assert!(f
            .tick(t + Duration::from_secs(1), LOST_AFTER, GRACE)
            .is_empty());
        assert!(
            matches!(&f.tick(t + LOST_AFTER, LOST_AFTER, GRACE)[..], [Change::Lost { node, .. }] if node == "ghost")
        );
    }
}
