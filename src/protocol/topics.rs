//! MQTT topic names of the pifleet contract (docs/PROTOCOL.md), built and parsed in
//! one place so the node, the coordinator and simulators agree on them.
//!
//! Layout under the configurable root (default `pifleet`):
//!
//! | topic | retained | direction |
//! |---|---|---|
//! | `{root}/nodes/{node}/status` | yes | node → all (`online` / `offline`) |
//! | `{root}/nodes/{node}/capacity` | yes | node → all (JSON [`Capacity`](super::Capacity)) |
//! | `{root}/nodes/{node}/agents` | no | node → coordinator (JSON [`AgentUpdate`](super::AgentUpdate)) |
//! | `{root}/nodes/{node}/cmd` | no | coordinator → node ([`Command`](super::Command)) |
//! | `{root}/nodes/{node}/reply` | no | node → coordinator ([`Reply`](super::Reply)) |
//! | `{root}/coordinator/status` | yes | coordinator → all |
//! | `{root}/fleet/summary` | yes | coordinator → all |

/// Which per-node topic a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeTopic {
    Status,
    Capacity,
    /// Changes of a node's agent list, and the whole list on request.
    Agents,
    Command,
    Reply,
}

impl NodeTopic {
    fn suffix(self) -> &'static str {
        match self {
            NodeTopic::Status => "status",
            NodeTopic::Capacity => "capacity",
            NodeTopic::Agents => "agents",
            NodeTopic::Command => "cmd",
            NodeTopic::Reply => "reply",
        }
    }

    fn from_suffix(suffix: &str) -> Option<Self> {
        Some(match suffix {
            "status" => NodeTopic::Status,
            "capacity" => NodeTopic::Capacity,
            "agents" => NodeTopic::Agents,
            "cmd" => NodeTopic::Command,
            "reply" => NodeTopic::Reply,
            _ => return None,
        })
    }
}

/// Topic builder and parser for one topic root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Topics {
    pub fn new(root: impl Into<String>) -> Self {
        Topics { root: root.into() }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// The topic `kind` of node `node`.
    pub fn node(&self, node: &str, kind: NodeTopic) -> String {
        format!("{}/nodes/{}/{}", self.root, node, kind.suffix())
    }

    /// The subscription filter matching `kind` for every node.
    pub fn all_nodes(&self, kind: NodeTopic) -> String {
        format!("{}/nodes/+/{}", self.root, kind.suffix())
    }

    pub fn coordinator_status(&self) -> String {
        format!("{}/coordinator/status", self.root)
    }

    /// Retained: which coordinator leads, and its term ([`super::LeaderInfo`]).
    pub fn coordinator_leader(&self) -> String {
        format!("{}/coordinator/leader", self.root)
    }

    pub fn fleet_summary(&self) -> String {
        format!("{}/fleet/summary", self.root)
    }

    /// Splits `{root}/nodes/{node}/{kind}` into its node id and kind; `None`
    /// for any other topic.
    pub fn parse_node_topic<'a>(&self, topic: &'a str) -> Option<(&'a str, NodeTopic)> {
        let rest = topic.strip_prefix(self.root.as_str())?;
        let rest = rest.strip_prefix("/nodes/")?;
        let (node, suffix) = rest.split_once('/')?;
        if node.is_empty() {
            return None;
        }
        Some((node, NodeTopic::from_suffix(suffix)?))
    }
}

/// Checks that `id` can stand as one MQTT topic level and a metric label:
/// 1 to 64 characters of ASCII letters, digits, `-`, `_` and `.`.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!(
            "node id {id:?} must be 1 to 64 characters long (it is {})",
            id.len()
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "node id {id:?} contains {bad:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Checks a topic root: non-empty, no wildcards, no leading or trailing `/`.
pub fn validate_topic_root(root: &str) -> Result<(), String> {
    if root.is_empty() {
        return Err("topic_root must not be empty".into());
    }
    if root.contains(['+', '#', '\0']) {
        return Err(format!(
            "topic_root {root:?} must not contain the wildcards '+' or '#'"
        ));
    }
    if root.starts_with('/') || root.ends_with('/') {
        return Err(format!(
            "topic_root {root:?} must not start or end with '/'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_topics_round_trip_through_the_parser() {
        let topics = Topics::new("pifleet");
        for kind in [
            NodeTopic::Status,
            NodeTopic::Capacity,
            NodeTopic::Agents,
            NodeTopic::Command,
            NodeTopic::Reply,
        ] {
            let topic = topics.node("pi-7", kind);
            assert_eq!(topics.parse_node_topic(&topic), Some(("pi-7", kind)));
        }
        assert_eq!(
            topics.node("pi-7", NodeTopic::Status),
            "pifleet/nodes/pi-7/status"
        );
        assert_eq!(
            topics.all_nodes(NodeTopic::Capacity),
            "pifleet/nodes/+/capacity"
        );
    }

    #[test]
    fn parser_rejects_foreign_topics() {
        let topics = Topics::new("lab/pifleet");
        assert_eq!(topics.parse_node_topic("pifleet/nodes/a/status"), None);
        assert_eq!(topics.parse_node_topic("lab/pifleet/nodes//status"), None);
        assert_eq!(topics.parse_node_topic("lab/pifleet/nodes/a/other"), None);
        assert_eq!(topics.parse_node_topic("lab/pifleet/nodes/a/cmd/x"), None);
        assert_eq!(
            topics.parse_node_topic("lab/pifleet/nodes/a/cmd"),
            Some(("a", NodeTopic::Command))
        );
    }

    #[test]
    fn node_ids_must_be_single_safe_topic_levels() {
        assert!(validate_node_id("pi-1.lab_2").is_ok());
        assert!(validate_node_id("").is_err());
        assert!(validate_node_id("a/b").is_err());
        assert!(validate_node_id("a+").is_err());
        assert!(validate_node_id(&"x".repeat(65)).is_err());
    }
}
