//! The newest messages of recently used agents, kept in memory so that a
//! chat does not read its history back from the store (a round trip to
//! PostgreSQL, on the path of every chat).
//!
//! Only a store's one writer may keep it: the coordinator that owns a
//! SQLite file, or the leader of a shared store. It follows the store's
//! writes as they are made; when a batch fails (its writes are rolled back)
//! or leadership is taken (another leader may have written meanwhile) it
//! is emptied, and the next read goes to the store again.
//!
//! Each message is kept as its JSON, as a turn command carries it: a turn
//! writes the history into its command as it is, with neither a copy of
//! each message nor encoding it again (docs/BENCHMARKS.md, "Cheaper
//! chats").

use std::collections::{HashMap, VecDeque};

use serde_json::value::RawValue;

use crate::protocol::{encode, ChatMessage};

/// What the cache may hold, counting message text: at the default history
/// limit (100 messages) a few hundred busy agents.
pub(super) const CACHE_BYTES: usize = 16 << 20;

/// Bookkeeping a message costs besides its text.
const OVERHEAD: usize = 64;

/// A history is trimmed to its limit at one append in this many: the rows
/// beyond it are never read (reads take the newest `limit`), and trimming
/// at every append was a third of the statements of a chat.
pub(super) const TRIM_EVERY: u32 = 8;

#[derive(Default)]
pub(super) struct HistoryCache {
    agents: HashMap<String, Entry>,
    bytes: usize,
    /// Appends per agent since this coordinator started, for trimming.
    appends: HashMap<String, u32>,
}

struct Entry {
    /// The JSON of each message, oldest first.
    messages: VecDeque<Box<RawValue>>,
    bytes: usize,
}

fn size(m: &RawValue) -> usize {
    m.get().len() + OVERHEAD
}

/// The JSON of a message.
pub(super) fn json(m: &ChatMessage) -> Box<RawValue> {
    let text = String::from_utf8(encode(m)).expect("JSON is UTF-8");
    RawValue::from_string(text).expect("a message encodes as JSON")
}

impl HistoryCache {
    #[cfg(test)]
    pub(super) fn get(&self, agent: &str) -> Option<Vec<ChatMessage>> {
        self.with(agent, |messages| {
            let parse = |m: &&RawValue| serde_json::from_str(m.get()).expect("kept as JSON");
            messages.iter().map(parse).collect()
        })
    }

    /// `f` of the JSON of each message of `agent`'s history, if kept.
    pub(super) fn with<R>(&self, agent: &str, f: impl FnOnce(&[&RawValue]) -> R) -> Option<R> {
        let entry = self.agents.get(agent)?;
        let messages: Vec<&RawValue> = entry.messages.iter().map(|m| &**m).collect();
        Some(f(&messages))
    }

    /// Keeps what the store just said `agent`'s history is.
    pub(super) fn put(&mut self, agent: &str, messages: &[ChatMessage]) {
        self.remove(agent);
        let messages: VecDeque<Box<RawValue>> = messages.iter().map(json).collect();
        let entry = Entry {
            bytes: messages.iter().map(|m| size(m)).sum(),
            messages,
        };
        self.bytes += entry.bytes;
        self.agents.insert(agent.to_owned(), entry);
        self.shrink(agent);
    }

    /// Follows a write of the store: `new` appended, the oldest beyond
    /// `limit` dropped. An agent not kept stays so.
    pub(super) fn append(&mut self, agent: &str, new: &[ChatMessage], limit: usize) {
        let Some(entry) = self.agents.get_mut(agent) else {
            return;
        };
        for m in new {
            let m = json(m);
            entry.bytes += size(&m);
            self.bytes += size(&m);
            entry.messages.push_back(m);
        }
        while entry.messages.len() > limit {
            if let Some(old) = entry.messages.pop_front() {
                entry.bytes -= size(&old);
                self.bytes -= size(&old);
            }
        }
        self.shrink(agent);
    }

    /// Whether this append to `agent`'s history should trim it: the first
    /// after start (a coordinator may have stopped before trimming), then
    /// one in [`TRIM_EVERY`].
    pub(super) fn trim_due(&mut self, agent: &str) -> bool {
        let n = self.appends.entry(agent.to_owned()).or_insert(0);
        *n = n.wrapping_add(1);
        *n % TRIM_EVERY == 1
    }

    /// Forgets `agent` (deleted): its history and its appends.
    pub(super) fn delete(&mut self, agent: &str) {
        self.remove(agent);
        self.appends.remove(agent);
    }

    pub(super) fn remove(&mut self, agent: &str) {
        if let Some(entry) = self.agents.remove(agent) {
            self.bytes -= entry.bytes;
        }
    }

    pub(super) fn clear(&mut self) {
        self.agents.clear();
        self.bytes = 0;
    }

    /// Drops other agents (any) until the cache fits; `kept` last.
    fn shrink(&mut self, kept: &str) {
        while self.bytes > CACHE_BYTES {
            let victim = self
                .agents
                .keys()
                .find(|a| a.as_str() != kept)
                .cloned()
                .unwrap_or_else(|| kept.to_owned());
            self.remove(&victim);
        }
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Role;

    fn m(text: &str) -> ChatMessage {
        ChatMessage::new(Role::User, text)
    }

    #[test]
    fn appends_follow_the_limit_and_unknown_agents_stay_unknown() {
        let mut c = HistoryCache::default();
        c.append("a", &[m("x")], 3);
        assert!(c.get("a").is_none(), "an agent never read is not made up");
        c.put("a", &[m("1"), m("2")]);
        c.append("a", &[m("3"), m("4")], 3);
        let texts: Vec<String> = c.get("a").unwrap().into_iter().map(|m| m.content).collect();
        assert_eq!(texts, ["2", "3", "4"]);
        let one = json(&m("2")).get().len();
        assert_eq!(c.bytes(), 3 * (one + OVERHEAD));
        c.remove("a");
        assert!(c.get("a").is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn trims_at_the_first_append_then_one_in_trim_every() {
        let mut c = HistoryCache::default();
        let due: Vec<bool> = (0..2 * TRIM_EVERY).map(|_| c.trim_due("a")).collect();
        assert_eq!(due.iter().filter(|d| **d).count(), 2);
        assert!(due[0] && due[TRIM_EVERY as usize]);
        assert!(c.trim_due("b"), "each agent on its own");
        c.delete("a");
        assert!(c.trim_due("a"), "a new agent of the same name starts over");
    }

    #[test]
    fn stays_within_its_size_by_dropping_other_agents() {
        let mut c = HistoryCache::default();
        let big = "x".repeat(CACHE_BYTES / 3);
        c.put("a", &[m(&big)]);
        c.put("b", &[m(&big)]);
        c.put("c", &[m(&big)]);
        assert!(c.bytes() <= CACHE_BYTES);
        assert!(c.get("c").is_some(), "the agent just read is kept");
        assert_eq!(["a", "b"].iter().filter(|a| c.get(a).is_some()).count(), 1);
        // One agent alone larger than the cache is not kept at all.
        c.put("huge", &[m(&"y".repeat(CACHE_BYTES + 1))]);
        assert!(c.get("huge").is_none());
        assert!(c.bytes() <= CACHE_BYTES);
    }
}
