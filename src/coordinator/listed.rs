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
    /// The list held is still the node's, now as of a newer `seq`.
    Same,
    /// A change to the list held.
    Change {
        added: Vec<String>,
        removed: Vec<String>,
    },
    /// Nothing new (a repeated or older message, or a part of a whole
    /// list that is not whole yet).
    Stale,
    /// The list is not known: ask the node for it.
    Unknown,
}

#[derive(Debug, Default)]
pub struct Lists {
    nodes: HashMap<String, Listed>,
    /// Whole lists arriving in parts, not yet whole.
    incoming: HashMap<String, Listed>,
}

impl Lists {
    pub fn get(&self, node: &str) -> Option<&Listed> {
        self.nodes.get(node)
    }

    pub fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
        self.incoming.remove(node);
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
            let newer = |l: &Listed| l.session == c.session && c.seq < l.rev;
            if self.nodes.get(&c.node).is_some_and(newer)
                || self.incoming.get(&c.node).is_some_and(newer)
            {
                // An update newer than this message arrived before it.
                return Learned::Stale;
            }
            self.incoming.remove(&c.node);
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
                return Learned::Same;
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
            let newer = |l: &Listed| l.session == u.session && u.seq <= l.seq;
            if self.nodes.get(&u.node).is_some_and(newer)
                || self.incoming.get(&u.node).is_some_and(newer)
            {
                return Learned::Stale; // delivered again, or overtaken
            }
            let part = Listed {
                session: u.session.clone(),
                rev: 0,
                seq: 0,
                names: HashSet::new(),
                digest: ListDigest::default(),
            };
            return self.whole_list_part(part, u);
        };
        if let Some(part) = self.incoming.remove(&u.node) {
            if part.session == u.session && part.rev == base {
                return self.whole_list_part(part, u);
            }
            if part.session == u.session && u.seq <= part.rev {
                self.incoming.insert(u.node.clone(), part);
                return Learned::Stale;
            }
            // A part went missing: the whole list is not coming whole.
        }
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

    /// Adds part `u` of a whole list to `part`: the list replaces the one
    /// held once its last part came (`Stale` until then: nothing learned).
    fn whole_list_part(&mut self, mut part: Listed, u: AgentUpdate) -> Learned {
        for name in u.added {
            if part.names.insert(name.clone()) {
                part.digest.toggle(&name);
            }
        }
        if part.digest != u.digest {
            log::warn!(
                "the agent list of {} does not match its digest; asking again",
                u.node
            );
            self.nodes.remove(&u.node);
            return Learned::Unknown;
        }
        (part.rev, part.seq) = (u.seq, u.seq);
        if u.more {
            self.incoming.insert(u.node, part);
            return Learned::Stale;
        }
        self.nodes.insert(u.node, part);
        Learned::Whole
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
            more: false,
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
            Learned::Same
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
    fn a_whole_list_in_parts_counts_only_once_its_last_part_came() {
        let mut lists = Lists::default();
        assert_eq!(
            lists.capacity(&cap(1, 1, &["a", "b", "c"], true)),
            Learned::Whole
        );
        let mut first = update(5, None, &["a"], &[], &["a"]);
        first.more = true;
        assert_eq!(lists.update(first.clone(), Some("s")), Learned::Stale);
        // Meanwhile the list held is the last whole one.
        assert_eq!(lists.get("pi").unwrap().names.len(), 3);
        let mut second = update(6, Some(5), &["b"], &[], &["a", "b"]);
        second.more = true;
        assert_eq!(lists.update(second, Some("s")), Learned::Stale);
        assert_eq!(
            lists.update(update(7, Some(6), &["c"], &[], &["a", "b", "c"]), Some("s")),
            Learned::Whole
        );
        assert_eq!(lists.get("pi").unwrap().seq, 7);
        // A late copy of an older part changes nothing.
        assert_eq!(lists.update(first, Some("s")), Learned::Stale);
        assert_eq!(held(&lists), names(&["a", "b", "c"]));
        // A part missing: the list held is dropped and asked for again.
        let mut again = update(8, None, &["a"], &[], &["a"]);
        again.more = true;
        assert_eq!(lists.update(again, Some("s")), Learned::Stale);
        assert_eq!(
            lists.update(
                update(10, Some(9), &["c"], &[], &["a", "b", "c"]),
                Some("s")
            ),
            Learned::Unknown
        );
        // An inline list older than an update applied is not taken.
        assert_eq!(lists.capacity(&cap(11, 11, &["x"], true)), Learned::Whole);
        assert_eq!(
            lists.update(update(12, Some(11), &["y"], &[], &["x", "y"]), Some("s")),
            Learned::Change {
                added: names(&["y"]),
                removed: vec![]
            }
        );
        let mut late = cap(11, 11, &["x"], true);
        late.seq = 11;
        assert_eq!(lists.capacity(&late), Learned::Stale);
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
