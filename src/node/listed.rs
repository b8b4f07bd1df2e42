//! What the node last told about its agent list, and the messages that
//! tell the next change (docs/PROTOCOL.md, "Agent lists"). Pure.

use crate::protocol::{chunks, fits_inline, AgentUpdate, ListDigest};

/// The agent list as last published.
#[derive(Debug, Default)]
pub struct Published {
    /// Sorted.
    names: Vec<String>,
    /// The `seq` of the message that last changed or set it (0: none yet).
    pub rev: u64,
    pub digest: ListDigest,
    /// Whether capacity messages carry it.
    inline: bool,
}

/// How a change of the list travels.
#[derive(Debug, PartialEq, Eq)]
pub enum Sync {
    Unchanged,
    /// In the capacity message about to be published (`seq + 1`).
    Inline,
    /// As these updates, in order.
    Updates(Vec<AgentUpdate>),
}

/// Numbers a node's messages (`seq` is the last one's) and cuts updates
/// into parts of at most `chunk` bytes of names.
pub struct Numbering<'a> {
    pub node: &'a str,
    pub session: &'a str,
    pub seq: &'a mut u64,
    pub chunk: usize,
}

impl Numbering<'_> {
    fn update(
        &mut self,
        base: Option<u64>,
        added: &[String],
        removed: &[String],
        digest: ListDigest,
    ) -> AgentUpdate {
        *self.seq += 1;
        AgentUpdate {
            node: self.node.to_owned(),
            session: self.session.to_owned(),
            seq: *self.seq,
            base,
            added: added.to_vec(),
            removed: removed.to_vec(),
            digest,
            more: false,
        }
    }
}

impl Published {
    /// Whether the list travels in every capacity message.
    pub fn inline(&self) -> bool {
        self.inline
    }

    /// The list (empty) is set by the first message `seq` of the process.
    pub fn begin(&mut self, seq: u64) {
        if self.rev == 0 {
            self.rev = seq;
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Brings the published list to `current` (sorted, as hosted now);
    /// `inline`: in the capacity messages whatever its length (a
    /// coordinator that has not shown it reads agent updates).
    pub fn sync(&mut self, current: Vec<String>, inline: bool, n: &mut Numbering) -> Sync {
        self.inline = inline || fits_inline(&current);
        if current == self.names {
            return Sync::Unchanged;
        }
        if self.inline {
            self.digest = ListDigest::of(current.iter().map(String::as_str));
            self.rev = *n.seq + 1;
            self.names = current;
            return Sync::Inline;
        }
        let (added, removed) = diff(&self.names, &current);
        let mut updates = Vec::new();
        for run in chunks(&removed, n.chunk)
            .into_iter()
            .filter(|r| !r.is_empty())
        {
            run.iter().for_each(|name| self.digest.toggle(name));
            updates.push(n.update(Some(self.rev), &[], run, self.digest));
            self.rev = *n.seq;
        }
        for run in chunks(&added, n.chunk)
            .into_iter()
            .filter(|r| !r.is_empty())
        {
            run.iter().for_each(|name| self.digest.toggle(name));
            updates.push(n.update(Some(self.rev), run, &[], self.digest));
            self.rev = *n.seq;
        }
        self.names = current;
        Sync::Updates(updates)
    }

    /// The whole list as updates: the first without `base`, the others
    /// chained to it, every one but the last marked `more`.
    pub fn whole(&mut self, n: &mut Numbering) -> Vec<AgentUpdate> {
        let mut digest = ListDigest::default();
        let mut updates: Vec<AgentUpdate> = Vec::new();
        for run in chunks(&self.names, n.chunk) {
            run.iter().for_each(|name| digest.toggle(name));
            let base = (!updates.is_empty()).then_some(self.rev);
            if let Some(last) = updates.last_mut() {
                last.more = true;
            }
            updates.push(n.update(base, run, &[], digest));
            self.rev = *n.seq;
        }
        updates
    }
}

/// Names in `new` and not in `old`, and in `old` and not in `new` (both
/// sorted).
fn diff(old: &[String], new: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => (i, j) = (i + 1, j + 1),
            (Some(a), Some(b)) if a < b => {
                removed.push(a.clone());
                i += 1;
            }
            (Some(a), None) => {
                removed.push(a.clone());
                i += 1;
            }
            (_, Some(b)) => {
                added.push(b.clone());
                j += 1;
            }
            (None, None) => unreachable!("the loop runs while one is left"),
        }
    }
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::listed::{Learned, Lists};
    use crate::protocol::Capacity;

    fn many(from: usize, to: usize) -> Vec<String> {
        let mut v: Vec<String> = (from..to).map(|i| format!("agent-{i:05}")).collect();
        v.sort();
        v
    }

    /// The heartbeat a node with `p` would publish as message `seq`.
    fn heartbeat(p: &Published, seq: u64) -> Capacity {
        Capacity {
            node: "pi".into(),
            session: "s".into(),
            seq,
            agents: p.inline().then(|| p.names().to_vec()),
            agents_rev: p.rev,
            agents_digest: p.digest,
            ..Capacity::default()
        }
    }

    #[test]
    fn the_difference_of_two_sorted_lists() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (added, removed) = diff(&s(&["a", "c", "d"]), &s(&["b", "c", "e"]));
        assert_eq!((added, removed), (s(&["b", "e"]), s(&["a", "d"])));
    }

    #[test]
    fn a_reader_follows_every_change_and_one_that_missed_one_gets_the_whole_list() {
        let (mut seq, mut p) = (0, Published::default());
        let mut n = Numbering {
            node: "pi",
            session: "s",
            seq: &mut seq,
            chunk: crate::protocol::AGENTS_CHUNK_BYTES,
        };
        let mut coordinator = Lists::default();
        // Few agents: in every capacity message.
        assert_eq!(p.sync(many(0, 3), false, &mut n), Sync::Inline);
        *n.seq += 1;
        assert_eq!(coordinator.capacity(&heartbeat(&p, *n.seq)), Learned::Whole);
        // 22,500 agents: updates, each chained to the one before.
        let Sync::Updates(updates) = p.sync(many(0, 22_500), false, &mut n) else {
            panic!("a long list goes as updates");
        };
        assert!(updates.len() > 1, "{} updates", updates.len());
        for u in updates {
            assert!(serde_json::to_vec(&u).unwrap().len() < 200_000);
            assert!(matches!(
                coordinator.update(u, Some("s")),
                Learned::Change { .. }
            ));
        }
        *n.seq += 1;
        let beat = heartbeat(&p, *n.seq);
        assert!(serde_json::to_vec(&beat).unwrap().len() < 600);
        assert_eq!(coordinator.capacity(&beat), Learned::Same);
        // One agent less: a small update.
        let Sync::Updates(updates) = p.sync(many(1, 22_500), false, &mut n) else {
            panic!("still long");
        };
        assert_eq!(updates.len(), 1);
        let bytes = serde_json::to_vec(&updates[0]).unwrap().len();
        assert!(bytes < 200, "{bytes} bytes for one agent");
        // A coordinator that missed it finds out at the next heartbeat...
        *n.seq += 1;
        assert_eq!(
            coordinator.capacity(&heartbeat(&p, *n.seq)),
            Learned::Unknown
        );
        // ...and the whole list, in parts, makes it exact again once its
        // last part came.
        let parts = p.whole(&mut n);
        assert!(parts.len() > 1);
        let last = parts.len() - 1;
        for (i, u) in parts.into_iter().enumerate() {
            let expect = if i == last {
                Learned::Whole
            } else {
                Learned::Stale
            };
            assert_eq!(coordinator.update(u, Some("s")), expect, "part {i}");
        }
        let held = &coordinator.get("pi").unwrap().names;
        assert_eq!(held.len(), 22_499);
        assert!(!held.contains("agent-00000") && held.contains("agent-22499"));
        *n.seq += 1;
        assert_eq!(coordinator.capacity(&heartbeat(&p, *n.seq)), Learned::Same);
        // Back to a few: inline again.
        assert_eq!(p.sync(many(5, 7), false, &mut n), Sync::Inline);
        assert_eq!(p.sync(many(5, 7), false, &mut n), Sync::Unchanged);
        // A coordinator that has not asked for a list gets it inline.
        assert_eq!(p.sync(many(0, 22_500), true, &mut n), Sync::Inline);
        assert!(p.inline());
        assert_eq!(p.sync(many(0, 22_500), false, &mut n), Sync::Unchanged);
        assert!(!p.inline());
    }
}
