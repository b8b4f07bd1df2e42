//! The coordinator's copy of each node's agent list, kept from the lists in
//! capacity messages and from agent updates (docs/PROTOCOL.md, "Agent
//! lists"). Pure: messages go in, what was learned comes out.

use std::collections::{HashMap, HashSet};

use crate::protocol::{AgentUpdate, Capacity, ListDigest};

/// What the coordinator knows a node hosts.
#[derive(Debug, Clone, Default)]
pub struct Listed {
    pub session: String,
    /// The list's revision (the node's `agents_rev`).
    pub rev: u64,
    /// The newest `seq` of the node known to reflect this list.
    pub seq: u64,
    pub names: HashSet<String>,
    pub digest: ListDigest,
}

/// What a message taught about a node's list.
#[derive(Debug, PartialEq, Eq)]
pub enum Learned {
    /// The whole list is known, as of the node's `seq`.
    Whole,
    /// A change to the list held.
    Change {
        added: Vec<String>,
        removed: Vec<String>,
    },
    /// Nothing new (a repeated or older message).
    Stale,
    /// The list is not known: ask the node for it.
    Unknown,
}

#[derive(Debug, Default)]
pub struct Lists {
    nodes: HashMap<String, Listed>,
}

impl Lists {
    pub fn get(&self, node: &str) -> Option<&Listed> {
        self.nodes.get(node)
    }

    pub fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    /// Takes `node`'s list out (to read it while changing other state);
    /// [`Lists::put`] puts it back.
    pub fn take(&mut self, node: &str) -> Option<Listed> {
        self.nodes.remove(node)
    }

    pub fn put(&mut self, node: &str, listed: Listed) {
        self.nodes.insert(node.to_owned(), listed);
    }

    /// A capacity message (already known to be newer than the last one).
    pub fn capacity(&mut self, c: &Capacity) -> Learned {
        if let Some(names) = &c.agents {
            let names: HashSet<String> = names.iter().cloned().collect();
            let digest = ListDigest::of(names.iter().map(String::as_str));
            self.nodes.insert(
                c.node.clone(),
                Listed {
                    session: c.session.clone(),
                    // An older node sends no revision: its message is one.
                    rev: if c.agents_rev == 0 {
                        c.seq
                    } else {
                        c.agents_rev
                    },
                    seq: c.seq,
                    names,
                    digest,
                },
            );
            return Learned::Whole;
        }
        let Some(l) = self.nodes.get_mut(&c.node) else {
            return Learned::Unknown;
        };
        if l.session == c.session {
            if l.rev == c.agents_rev && l.digest == c.agents_digest {
                l.seq = l.seq.max(c.seq);
                return Learned::Whole;
            }
            if c.seq < l.rev {
                // An update newer than this heartbeat arrived before it.
                return Learned::Stale;
            }
        }
        // Another process's list, or one that missed a change: of no use.
        self.nodes.remove(&c.node);
        Learned::Unknown
    }

    /// An agent update of `node`, whose capacity messages say `session`.
    pub fn update(&mut self, u: AgentUpdate, session: Option<&str>) -> Learned {
        if session != Some(u.session.as_str()) {
            // Of an earlier process, or of one not heard yet: its
            // capacity message will tell.
            return Learned::Stale;
        }
        let Some(base) = u.base else {
            let names: HashSet<String> = u.added.into_iter().collect();
            let digest = ListDigest::of(names.iter().map(String::as_str));
            if digest != u.digest {
                log::warn!(
                    "the agent list of {} does not match its digest; asking again",
                    u.node
                );
                self.nodes.remove(&u.node);
                return Learned::Unknown;
            }
            let listed = Listed {
                session: u.session,
                rev: u.seq,
                seq: u.seq,
                names,
                digest,
            };
            self.nodes.insert(u.node, listed);
            return Learned::Whole;
        };
        let Some(l) = self.nodes.get_mut(&u.node) else {
            return Learned::Unknown;
        };
        if l.session == u.session && u.seq <= l.rev {
            return Learned::Stale; // delivered again (QoS 1)
        }
        if l.session != u.session || l.rev != base {
            self.nodes.remove(&u.node);
            return Learned::Unknown;
        }
        let mut added = Vec::with_capacity(u.added.len());
        for name in u.added {
            if l.names.insert(name.clone()) {
                l.digest.toggle(&name);
                added.push(name);
            }
        }
        let mut removed = Vec::with_capacity(u.removed.len());
        for name in u.removed {
            if l.names.remove(&name) {
                l.digest.toggle(&name);
                removed.push(name);
            }
        }
        if l.digest != u.digest {
            log::warn!(
                "the agent list of {} no longer matches its digest after update {}; asking again",
                u.node,
                u.seq
            );
            self.nodes.remove(&u.node);
            return Learned::Unknown;
        }
        (l.rev, l.seq) = (u.seq, u.seq);
        Learned::Change { added, removed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn cap(seq: u64, rev: u64, list: &[&str], inline: bool) -> Capacity {
        Capacity {
            node: "pi".into(),
            session: "s".into(),
            seq,
            agents: inline.then(|| names(list)),
            agents_rev: rev,
            agents_digest: ListDigest::of(list.iter().copied()),
            ..Capacity::default()
        }
    }

    fn update(
        seq: u64,
        base: Option<u64>,
        added: &[&str],
        removed: &[&str],
        after: &[&str],
    ) -> AgentUpdate {
        AgentUpdate {
            node: "pi".into(),
            session: "s".into(),
            seq,
            base,
            added: names(added),
            removed: names(removed),
            digest: ListDigest::of(after.iter().copied()),
        }
    }

    fn held(lists: &Lists) -> Vec<String> {
        let mut v: Vec<String> = lists.get("pi").unwrap().names.iter().cloned().collect();
        v.sort();
        v
    }

    #[test]
    fn changes_chain_on_the_list_held_and_a_gap_asks_for_the_whole_list() {
        let mut lists = Lists::default();
        // A restarted coordinator hears a heartbeat without a list.
        assert_eq!(
            lists.capacity(&cap(5, 3, &["a", "b"], false)),
            Learned::Unknown
        );
        assert_eq!(
            lists.update(update(6, None, &["a", "b"], &[], &["a", "b"]), Some("s")),
            Learned::Whole
        );
        assert_eq!(held(&lists), names(&["a", "b"]));
        assert_eq!(
            lists.capacity(&cap(7, 6, &["a", "b"], false)),
            Learned::Whole
        );
        assert_eq!(lists.get("pi").unwrap().seq, 7);
        let change = update(8, Some(6), &["c"], &["a"], &["b", "c"]);
        assert_eq!(
            lists.update(change.clone(), Some("s")),
            Learned::Change {
                added: names(&["c"]),
                removed: names(&["a"])
            }
        );
        assert_eq!(
            lists.update(change, Some("s")),
            Learned::Stale,
            "a repeated delivery"
        );
        assert_eq!(held(&lists), names(&["b", "c"]));
        // Update 9 was missed: 10 does not chain, nor does the heartbeat.
        assert_eq!(
            lists.update(
                update(10, Some(9), &["e"], &[], &["b", "c", "d", "e"]),
                Some("s")
            ),
            Learned::Unknown
        );
        assert!(lists.get("pi").is_none());
        assert_eq!(
            lists.capacity(&cap(11, 10, &["b", "c", "d", "e"], false)),
            Learned::Unknown
        );
    }

    #[test]
    fn a_heartbeat_that_disagrees_asks_and_an_inline_list_is_taken_whole() {
        let mut lists = Lists::default();
        assert_eq!(lists.capacity(&cap(1, 1, &["a"], true)), Learned::Whole);
        // Same revision, another digest: the lists differ.
        let mut c = cap(2, 1, &["a"], false);
        c.agents_digest = ListDigest::of(["z"]);
        assert_eq!(lists.capacity(&c), Learned::Unknown);
        // Another session (a restart) cannot use the list held.
        assert_eq!(lists.capacity(&cap(3, 1, &["a"], true)), Learned::Whole);
        let mut restarted = cap(1, 0, &[], false);
        restarted.session = "s2".into();
        assert_eq!(lists.capacity(&restarted), Learned::Unknown);
        // Updates of a session the capacity messages do not say are ignored.
        assert_eq!(
            lists.update(update(9, None, &["x"], &[], &["x"]), Some("s2")),
            Learned::Stale
        );
        // A whole list whose digest is wrong is not kept.
        let mut bad = update(4, None, &["a"], &[], &["a"]);
        bad.digest = ListDigest::of(["b"]);
        assert_eq!(lists.update(bad, Some("s")), Learned::Unknown);
        assert!(lists.get("pi").is_none());
    }
}
