//! A node's agent list on the wire (docs/PROTOCOL.md, "Agent lists").
//!
//! A node's heartbeat must not grow with what it hosts, so its list of
//! agents travels only when it changes:
//!
//! * While the names fit in [`AGENTS_INLINE_BYTES`], the capacity message
//!   carries them in `agents`, as it always did, and is published on every
//!   change.
//! * Beyond that, `agents` is left out of the capacity message; changes go
//!   as [`AgentUpdate`]s on `{root}/nodes/{node}/agents` (the names added
//!   and removed, each update chained to the one before by `base`), and the
//!   coordinator asks for the whole list with a `list_agents` command when
//!   it does not know it (a restart) or when a heartbeat says it missed a
//!   change.
//!
//! Every capacity message carries `agents_rev` (the `seq` of the message
//! that last changed or set the list) and `agents_digest` ([`ListDigest`]),
//! so a reader can tell whether the list it holds is the node's.

use serde::{Deserialize, Serialize};

/// Agent names whose JSON takes at most this many bytes travel in every
/// capacity message (`agents`); longer lists travel as updates.
pub const AGENTS_INLINE_BYTES: usize = 1024;

/// One agent update carries names of at most this many bytes, and at most
/// a quarter of `mqtt.max_payload_bytes`; a longer change, or a whole
/// list, goes as several updates chained by `base`.
pub const AGENTS_CHUNK_BYTES: usize = 128 * 1024;

/// The bytes of names one update may carry under a payload limit of `max`.
pub fn chunk_bytes(max_payload: usize) -> usize {
    AGENTS_CHUNK_BYTES.min(max_payload / 4)
}

/// A change of a node's agent list, or the whole list, on
/// `{root}/nodes/{node}/agents` (QoS 1, not retained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpdate {
    pub node: String,
    pub session: String,
    /// The node's message number, shared with its capacity messages. The
    /// list's revision (`agents_rev`) is this `seq` after the update.
    pub seq: u64,
    /// `None`: `added` is the whole list, replacing any other. `Some(rev)`:
    /// a change to the list of revision `rev`; a reader holding another
    /// revision has missed one and asks for the whole list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    #[serde(default)]
    pub added: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// [`ListDigest`] of the whole list after this update.
    pub digest: ListDigest,
    /// A whole list in parts: more follow (chained by `base`), and the
    /// list is whole only after the part without `more`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// An order-independent digest of a set of agent names: the XOR, over the
/// names, of FNV-1a 64 of each name's UTF-8 bytes passed through
/// SplitMix64's finaliser; written as 16 lowercase hex digits. Adding and
/// removing a name are the same step, so both ends keep it up to date in
/// constant time per change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ListDigest(pub u64);

impl ListDigest {
    pub fn of<'a>(names: impl IntoIterator<Item = &'a str>) -> ListDigest {
        let mut digest = ListDigest::default();
        for name in names {
            digest.toggle(name);
        }
        digest
    }

    /// Adds `name` if absent from the digested set, removes it if present.
    pub fn toggle(&mut self, name: &str) {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 ^= h ^ (h >> 31);
    }
}

impl std::fmt::Display for ListDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for ListDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(ListDigest::default());
        }
        u64::from_str_radix(&text, 16)
            .ok()
            .filter(|_| text.len() == 16)
            .map(ListDigest)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("agents digest {text:?} is not 16 hex digits"))
            })
    }
}

/// Whether `names` travel in every capacity message.
pub fn fits_inline(names: &[String]) -> bool {
    json_bytes(names) <= AGENTS_INLINE_BYTES
}

/// About what `names` take as a JSON array (quotes and commas).
pub fn json_bytes(names: &[String]) -> usize {
    names.iter().map(|n| n.len() + 3).sum()
}

/// `names` cut into runs of at most `limit` bytes (at least one name
/// each; one run, possibly empty, for a short list).
pub fn chunks(names: &[String], limit: usize) -> Vec<&[String]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, name) in names.iter().enumerate() {
        let size = name.len() + 3;
        if i > start && bytes + size > limit {
            runs.push(&names[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < names.len() || runs.is_empty() {
        runs.push(&names[start..]);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_ignores_order_and_toggling_twice_undoes_a_name() {
        let a = ListDigest::of(["alice", "bob", "carol"]);
        assert_eq!(a, ListDigest::of(["carol", "alice", "bob"]));
        assert_ne!(a, ListDigest::of(["alice", "bob"]));
        let mut b = a;
        b.toggle("dave");
        b.toggle("dave");
        assert_eq!(a, b);
        b.toggle("bob");
        assert_eq!(b, ListDigest::of(["alice", "carol"]));
        // Names that differ in one character digest apart.
        assert_ne!(ListDigest::of(["s-1"]), ListDigest::of(["s-2"]));
        assert_eq!(ListDigest::default().to_string(), "0000000000000000");
    }

    #[test]
    fn the_digest_travels_as_16_hex_digits_and_bad_ones_are_named() {
        let d = ListDigest::of(["alice"]);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json.len(), 18, "{json}");
        assert_eq!(serde_json::from_str::<ListDigest>(&json).unwrap(), d);
        let e = serde_json::from_str::<ListDigest>("\"xyz\"").unwrap_err();
        assert!(
            e.to_string().contains("\"xyz\" is not 16 hex digits"),
            "{e}"
        );
    }

    #[test]
    fn long_lists_are_cut_into_runs_that_keep_every_name_once() {
        let names: Vec<String> = (0..30_000).map(|i| format!("agent-{i:05}")).collect();
        assert!(!fits_inline(&names));
        let runs = chunks(&names, AGENTS_CHUNK_BYTES);
        assert!(runs.len() > 1);
        assert!(runs.iter().all(|r| json_bytes(r) <= AGENTS_CHUNK_BYTES));
        assert_eq!(runs.concat(), names);
        assert_eq!(chunks(&[], AGENTS_CHUNK_BYTES), vec![&[] as &[String]]);
        // A small payload limit: smaller runs.
        assert_eq!(chunk_bytes(16 * 1024), 4096);
        assert!(chunks(&names, 4096).iter().all(|r| json_bytes(r) <= 4096));
        let few: Vec<String> = vec!["a".into(), "b".into()];
        assert!(fits_inline(&few));
        assert_eq!(chunks(&few, 5), vec![&few[..1], &few[1..]]);
        assert_eq!(chunks(&few, 10), vec![&few[..]]);
    }
}
