//! Placement (docs/ARCHITECTURE.md §3) as pure code: plain data in, decisions out, no I/O
//! and no clock. The coordinator builds a [`Scheduler`] from its fleet view
//! for each reconciliation pass and asks it where each pending agent goes.
//!
//! * Eligible: the node takes new agents (online, not cordoned or draining,
//!   below its temperature limit, not throttled, Ollama reachable), has a
//!   free slot counting assignments in flight, has the agent's model and
//!   carries the agent's labels.
//! * Least-loaded: lowest `load / agent_capacity` (compared exactly, as
//!   fractions); among equally used nodes the one with more free slots (so
//!   an empty fleet starts with its big nodes), then the lowest load
//!   average per core, then node id.
//!
//! Least-loaded by utilisation keeps capacities such as 2/4/8 within one
//! agent of proportional while they fill. It is not proportional in general:
//! an empty node is always the least loaded, so with 4/1/1/1 the three small
//! nodes fill before the big one takes its second agent.
//!
//! Nodes with free slots are kept in a `BTreeSet` ordered by that key, so a
//! placement costs O(log n) plus the nodes skipped for model or labels.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::protocol::Capacity;

/// Why a node takes no new agents.
#[derive(Debug, Clone, PartialEq)]
pub enum Blocked {
    Offline,
    Cordoned,
    Draining,
    OllamaUnreachable,
    TooHot { temperature_c: f32, max_c: f32 },
    Throttled,
}

impl Blocked {
    fn describe(&self) -> String {
        match self {
            Blocked::Offline => "offline".into(),
            Blocked::Cordoned => "cordoned".into(),
            Blocked::Draining => "draining".into(),
            Blocked::OllamaUnreachable => "Ollama unreachable".into(),
            Blocked::TooHot {
                temperature_c,
                max_c,
            } => {
                format!("too hot ({temperature_c:.0} °C, limit {max_c:.0} °C)")
            }
            Blocked::Throttled => "throttled".into(),
        }
    }
}

/// What the scheduler knows of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSlots {
    pub id: String,
    pub agent_capacity: u32,
    /// Agents running plus assignments in flight.
    pub load: u32,
    /// Load average divided by cores: the first tie-break.
    pub load_per_core: f64,
    /// Models the node has, normalised `name:tag`.
    pub models: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub blocked: Option<Blocked>,
}

/// What the coordinator itself decided about a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    pub online: bool,
    pub cordoned: bool,
    pub draining: bool,
}

impl NodeSlots {
    /// The scheduler's input for a node, from its latest capacity message:
    /// `ours` are the agents this coordinator holds there (assignments in
    /// flight included); agents the node lists (`listed`, when its list is
    /// known) that are not ours take slots too, as do, while it is not
    /// known, as many as it runs beyond ours. The first reason the node
    /// cannot take agents blocks it.
    pub fn from_capacity(
        c: &Capacity,
        standing: Standing,
        ours: Option<&BTreeSet<String>>,
        listed: Option<&HashSet<String>>,
    ) -> Self {
        let count = ours.map_or(0, |set| set.len() as u32);
        let strays = match listed {
            Some(listed) => listed
                .iter()
                .filter(|n| !ours.is_some_and(|set| set.contains(*n)))
                .count() as u32,
            None => c.agents_running.saturating_sub(count),
        };
        let ours = count;
        let too_hot = match (c.temperature_c, c.max_temperature_c) {
            (Some(t), Some(max)) if t >= max => Some(Blocked::TooHot {
                temperature_c: t,
                max_c: max,
            }),
            _ => None,
        };
        let blocked = if !standing.online {
            Some(Blocked::Offline)
        } else if standing.draining {
            Some(Blocked::Draining)
        } else if standing.cordoned {
            Some(Blocked::Cordoned)
        } else if !c.ollama_reachable {
            Some(Blocked::OllamaUnreachable)
        } else if too_hot.is_some() {
            too_hot
        } else if c.throttled == Some(true) {
            Some(Blocked::Throttled)
        } else {
            None
        };
        NodeSlots {
            id: c.node.clone(),
            agent_capacity: c.agent_capacity,
            load: ours + strays,
            load_per_core: if c.cpu.cores > 0 {
                c.cpu.load1 / f64::from(c.cpu.cores)
            } else {
                0.0
            },
            models: c.models.clone(),
            labels: c.labels.clone(),
            blocked,
        }
    }

    fn has_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    fn has_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    fn free(&self) -> bool {
        self.load < self.agent_capacity
    }

    /// Utilisation as a float, for reports.
    pub fn utilisation(&self) -> f64 {
        if self.agent_capacity == 0 {
            1.0
        } else {
            f64::from(self.load) / f64::from(self.agent_capacity)
        }
    }
}

/// What an agent needs from a node.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub model: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// A node not to use (the one it is leaving, or one that just refused).
    pub avoid: Option<&'a str>,
}

/// Orders nodes least-loaded first.
#[derive(Debug, Clone, Copy)]
struct Key {
    load: u32,
    capacity: u32,
    load_per_core: f64,
    index: usize,
}

impl Key {
    fn cmp_load(&self, other: &Key) -> Ordering {
        // load_a / cap_a vs load_b / cap_b, exactly.
        (u64::from(self.load) * u64::from(other.capacity))
            .cmp(&(u64::from(other.load) * u64::from(self.capacity)))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        let free = |k: &Key| k.capacity.saturating_sub(k.load);
        self.cmp_load(other)
            .then_with(|| free(other).cmp(&free(self)))
            .then_with(|| self.load_per_core.total_cmp(&other.load_per_core))
            .then_with(|| self.index.cmp(&other.index))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Key {}

/// Placement state for one pass: nodes sorted by id, and the order of those
/// that can take one more agent.
#[derive(Debug, Clone)]
pub struct Scheduler {
    nodes: Vec<NodeSlots>,
    open: BTreeSet<Key>,
}

/// No node can take the agent; `reason` says why, for `GET /v1/agents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    pub reason: String,
}

impl Scheduler {
    pub fn new(mut nodes: Vec<NodeSlots>) -> Scheduler {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let mut scheduler = Scheduler {
            nodes,
            open: BTreeSet::new(),
        };
        for index in 0..scheduler.nodes.len() {
            scheduler.reopen(index);
        }
        scheduler
    }

    pub fn nodes(&self) -> &[NodeSlots] {
        &self.nodes
    }

    pub fn node(&self, id: &str) -> Option<&NodeSlots> {
        self.index_of(id).map(|i| &self.nodes[i])
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.id.as_str().cmp(id)).ok()
    }

    fn key(&self, index: usize) -> Key {
        let n = &self.nodes[index];
        Key {
            load: n.load,
            capacity: n.agent_capacity,
            load_per_core: n.load_per_core,
            index,
        }
    }

    fn reopen(&mut self, index: usize) {
        let n = &self.nodes[index];
        if n.blocked.is_none() && n.free() {
            self.open.insert(self.key(index));
        }
    }

    /// Whether any node could take one more agent of some kind.
    pub fn has_free_slot(&self) -> bool {
        !self.open.is_empty()
    }

    /// Picks the least-loaded eligible node for `request` and reserves one
    /// slot there.
    pub fn place(&mut self, request: &Request<'_>) -> Result<String, Unplaceable> {
        let found = self.open.iter().copied().find(|key| {
            let n = &self.nodes[key.index];
            request.avoid != Some(n.id.as_str())
                && n.has_model(request.model)
                && n.has_labels(request.labels)
        });
        match found {
            Some(key) => {
                self.open.remove(&key);
                self.nodes[key.index].load += 1;
                self.reopen(key.index);
                Ok(self.nodes[key.index].id.clone())
            }
            None => Err(self.explain(request)),
        }
    }

    /// The least-loaded node that could take `request` if it had its
    /// model (room, labels, not blocked or avoided), skipping `busy` ones
    /// (already pulling): where to pull the model (`auto_pull`).
    pub fn pick_for_pull(
        &self,
        request: &Request<'_>,
        busy: impl Fn(&str) -> bool,
    ) -> Option<String> {
        self.open
            .iter()
            .map(|key| &self.nodes[key.index])
            .find(|n| {
                request.avoid != Some(n.id.as_str()) && n.has_labels(request.labels) && !busy(&n.id)
            })
            .map(|n| n.id.clone())
    }

    /// Gives back a slot on `node` (an agent left it).
    pub fn unreserve(&mut self, node: &str) {
        let Some(index) = self.index_of(node) else {
            return;
        };
        let key = self.key(index);
        self.open.remove(&key);
        let n = &mut self.nodes[index];
        n.load = n.load.saturating_sub(1);
        self.reopen(index);
    }

    /// Why no node can take `request`, in one sentence.
    pub fn explain(&self, request: &Request<'_>) -> Unplaceable {
        if self.nodes.is_empty() {
            return Unplaceable {
                reason: "no nodes are known yet".into(),
            };
        }
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for n in &self.nodes {
            let why = if let Some(blocked) = &n.blocked {
                blocked.describe()
            } else if request.avoid == Some(n.id.as_str()) {
                "being left".to_owned()
            } else if !n.free() {
                "full".into()
            } else if !n.has_model(request.model) {
                format!("without model {}", request.model)
            } else if !n.has_labels(request.labels) {
                "without the required labels".into()
            } else {
                continue;
            };
            *reasons.entry(why).or_default() += 1;
        }
        let parts: Vec<String> = reasons
            .into_iter()
            .map(|(why, count)| format!("{count} {why}"))
            .collect();
        Unplaceable {
            reason: format!(
                "no eligible node among {}: {}",
                self.nodes.len(),
                parts.join(", ")
            ),
        }
    }

    /// Fleet utilisation over the nodes that take agents: Σload / Σcapacity.
    pub fn average_utilisation(&self) -> f64 {
        let (load, capacity) = self
            .nodes
            .iter()
            .filter(|n| n.blocked.is_none())
            .fold((0u64, 0u64), |(l, c), n| {
                (l + u64::from(n.load), c + u64::from(n.agent_capacity))
            });
        if capacity == 0 {
            0.0
        } else {
            load as f64 / capacity as f64
        }
    }

    /// Plans rebalancing moves (seed 001): while the most loaded node is more
    /// than `threshold` times the fleet average, move one of its `movable`
    /// agents to the least-loaded eligible node, but only where the target
    /// stays at or below the source after the move. That condition makes a
    /// move back never worthwhile, so agents do not bounce. At most
    /// `max_moves` moves; slots are reserved as planned.
    pub fn plan_rebalance<'a>(
        &mut self,
        threshold: f64,
        max_moves: usize,
        movable: &'a BTreeMap<String, Vec<MovableAgent<'a>>>,
    ) -> Vec<Move> {
        let mut moves = Vec::new();
        if threshold <= 0.0 {
            return moves;
        }
        let average = self.average_utilisation();
        let mut exhausted: BTreeSet<usize> = BTreeSet::new();
        while moves.len() < max_moves {
            let source = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].blocked.is_none() && !exhausted.contains(&i))
                .filter(|&i| {
                    movable
                        .get(&self.nodes[i].id)
                        .is_some_and(|a| !a.is_empty())
                })
                .max_by(|&a, &b| self.key(a).cmp_load(&self.key(b)).then(b.cmp(&a)));
            let Some(source) = source else { break };
            if self.nodes[source].utilisation() <= threshold * average {
                break;
            }
            let mut moved = false;
            let source_id = self.nodes[source].id.clone();
            for agent in &movable[&source_id] {
                if moves.iter().any(|m: &Move| m.agent == agent.name) {
                    continue;
                }
                let request = Request {
                    model: agent.model,
                    labels: agent.labels,
                    avoid: Some(&source_id),
                };
                let Some(target) = self.least_loaded_for(&request) else {
                    continue;
                };
                if !self.improves(source, target) {
                    continue;
                }
                let target_id = self.nodes[target].id.clone();
                self.reserve_index(target);
                self.unreserve(&source_id);
                moves.push(Move {
                    agent: agent.name.to_owned(),
                    from: source_id.clone(),
                    to: target_id,
                });
                moved = true;
                break;
            }
            if !moved {
                exhausted.insert(source);
            }
        }
        moves
    }

    fn least_loaded_for(&self, request: &Request<'_>) -> Option<usize> {
        self.open
            .iter()
            .find(|key| {
                let n = &self.nodes[key.index];
                request.avoid != Some(n.id.as_str())
                    && n.has_model(request.model)
                    && n.has_labels(request.labels)
            })
            .map(|key| key.index)
    }

    fn reserve_index(&mut self, index: usize) {
        let key = self.key(index);
        self.open.remove(&key);
        self.nodes[index].load += 1;
        self.reopen(index);
    }

    /// (load_t + 1) / cap_t <= (load_s - 1) / cap_s
    fn improves(&self, source: usize, target: usize) -> bool {
        let (s, t) = (&self.nodes[source], &self.nodes[target]);
        if s.load == 0 {
            return false;
        }
        u64::from(t.load + 1) * u64::from(s.agent_capacity)
            <= u64::from(s.load - 1) * u64::from(t.agent_capacity)
    }
}

/// An agent that rebalancing may move.
#[derive(Debug, Clone)]
pub struct MovableAgent<'a> {
    pub name: &'a str,
    pub model: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// A planned move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub agent: String,
    pub from: String,
    pub to: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MODEL: &str = "llama3.2:latest";

    fn report(agents: &[&str], temperature: Option<f32>, throttled: Option<bool>) -> Capacity {
        serde_json::from_value(serde_json::json!({
            "node": "pi", "session": "s", "seq": 1, "version": "v", "arch": "aarch64",
            "agent_capacity": 4, "agents_running": agents.len(), "agents": agents,
            "cpu": {"cores": 4, "load1": 2.0, "usage_pct": 10.0},
            "memory": {"total_bytes": 1, "available_bytes": 1},
            "temperature_c": temperature, "throttled": throttled, "models": [MODEL],
            "ollama_reachable": true, "labels": {"room": "attic"}, "draining": false,
            "ts": 1, "max_temperature_c": 80.0,
        }))
        .unwrap()
    }

    #[test]
    fn capacity_reports_become_scheduler_input() {
        let online = Standing {
            online: true,
            ..Standing::default()
        };
        let ours = BTreeSet::from(["a".to_owned(), "pending-ack".to_owned()]);
        let listed = HashSet::from(["a".to_owned(), "stray".to_owned()]);
        let report_ = report(&["a", "stray"], None, None);
        let slots = NodeSlots::from_capacity(&report_, online, Some(&ours), Some(&listed));
        // Ours (one not confirmed yet) plus a stray the node still runs.
        assert_eq!((slots.load, slots.agent_capacity), (3, 4));
        // A list not known yet: what it runs beyond ours (2 of 2) is none.
        let unknown = NodeSlots::from_capacity(&report_, online, Some(&ours), None);
        assert_eq!(unknown.load, 2);
        assert_eq!(slots.load_per_core, 0.5);
        assert_eq!(slots.blocked, None);
        assert_eq!(slots.labels["room"], "attic");
        let blocked =
            |c: &Capacity, standing| NodeSlots::from_capacity(c, standing, None, None).blocked;
        let hot = report(&[], Some(85.0), Some(true));
        assert!(matches!(
            blocked(&hot, online),
            Some(Blocked::TooHot { .. })
        ));
        let throttled = report(&[], Some(60.0), Some(true));
        assert_eq!(blocked(&throttled, online), Some(Blocked::Throttled));
        let draining = Standing {
            draining: true,
            cordoned: true,
            ..online
        };
        assert_eq!(blocked(&hot, draining), Some(Blocked::Draining));
        assert_eq!(blocked(&hot, Standing::default()), Some(Blocked::Offline));
    }

    fn node(id: &str, capacity: u32, load: u32) -> NodeSlots {
        NodeSlots {
            id: id.into(),
            agent_capacity: capacity,
            load,
            load_per_core: 0.0,
            models: vec![MODEL.into()],
            labels: BTreeMap::new(),
            blocked: None,
        }
    }

    fn any_request(labels: &BTreeMap<String, String>) -> Request<'_> {
        Request {
            model: MODEL,
            labels,
            avoid: None,
        }
    }

    #[test]
    fn capacities_2_4_8_fill_exactly_and_stay_proportional_on_the_way() {
        let mut s = Scheduler::new(vec![node("a", 2, 0), node("b", 4, 0), node("c", 8, 0)]);
        let none = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for step in 1..=14u32 {
            let id = s.place(&any_request(&none)).unwrap();
            *counts.entry(id).or_insert(0u32) += 1;
            for (id, cap) in [("a", 2u32), ("b", 4), ("c", 8)] {
                let share = f64::from(step * cap) / 14.0;
                let have = f64::from(*counts.get(id).unwrap_or(&0));
                assert!(
                    (have - share).abs() <= 1.0,
                    "step {step}: {id} has {have}, share {share:.2}"
                );
            }
        }
        assert_eq!(
            counts,
            BTreeMap::from([("a".into(), 2), ("b".into(), 4), ("c".into(), 8)])
        );
        let err = s.place(&any_request(&none)).unwrap_err();
        assert!(err.reason.contains("3 full"), "{}", err.reason);
    }

    #[test]
    fn ties_break_on_load_per_core_then_node_id() {
        let mut busy = node("a", 4, 0);
        busy.load_per_core = 0.9;
        let mut s = Scheduler::new(vec![busy, node("c", 4, 0), node("b", 4, 0)]);
        let none = BTreeMap::new();
        assert_eq!(s.place(&any_request(&none)).unwrap(), "b");
        assert_eq!(s.place(&any_request(&none)).unwrap(), "c");
        assert_eq!(s.place(&any_request(&none)).unwrap(), "a");
    }

    #[test]
    fn models_labels_and_blocked_nodes_are_respected_and_explained() {
        let mut hot = node("hot", 4, 0);
        hot.blocked = Some(Blocked::TooHot {
            temperature_c: 83.0,
            max_c: 80.0,
        });
        let mut gpu = node("gpu", 4, 0);
        gpu.labels.insert("board".into(), "pi5".into());
        let mut other_model = node("phi", 4, 0);
        other_model.models = vec!["phi3.5:latest".into()];
        let mut s = Scheduler::new(vec![hot, gpu, other_model, node("plain", 4, 4)]);
        let want = BTreeMap::from([("board".to_owned(), "pi5".to_owned())]);
        assert_eq!(s.place(&any_request(&want)).unwrap(), "gpu");
        let none = BTreeMap::new();
        let req = Request {
            model: "gemma2:latest",
            labels: &none,
            avoid: None,
        };
        let reason = s.place(&req).unwrap_err().reason;
        assert!(
            reason.contains("1 too hot (83 °C, limit 80 °C)"),
            "{reason}"
        );
        assert!(reason.contains("2 without model gemma2:latest"), "{reason}");
        assert!(reason.contains("1 full"), "{reason}");
    }

    #[test]
    fn a_model_is_pulled_on_the_least_loaded_eligible_node_that_is_not_pulling() {
        let mut hot = node("hot", 4, 0);
        hot.blocked = Some(Blocked::TooHot {
            temperature_c: 83.0,
            max_c: 80.0,
        });
        let s = Scheduler::new(vec![
            hot,
            node("busy", 4, 3),
            node("calm", 4, 1),
            node("full", 4, 4),
        ]);
        let none = BTreeMap::new();
        let req = Request {
            model: "gemma2:latest",
            labels: &none,
            avoid: None,
        };
        assert_eq!(s.pick_for_pull(&req, |_| false).as_deref(), Some("calm"));
        assert_eq!(
            s.pick_for_pull(&req, |n| n == "calm").as_deref(),
            Some("busy")
        );
        assert_eq!(s.pick_for_pull(&req, |_| true), None);
    }

    #[test]
    fn an_avoided_node_is_skipped() {
        let mut s = Scheduler::new(vec![node("a", 4, 0), node("b", 4, 3)]);
        let none = BTreeMap::new();
        let req = Request {
            model: MODEL,
            labels: &none,
            avoid: Some("a"),
        };
        assert_eq!(s.place(&req).unwrap(), "b");
    }

    #[test]
    fn rebalance_moves_off_an_overloaded_node_toward_an_empty_one_without_bouncing() {
        // Node c came back empty after its agents went to a and b.
        let mut s = Scheduler::new(vec![node("a", 4, 4), node("b", 4, 4), node("c", 4, 0)]);
        let none = BTreeMap::new();
        let names = ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"];
        let mut movable: BTreeMap<String, Vec<MovableAgent<'_>>> = BTreeMap::new();
        for name in names {
            movable
                .entry(name[..1].to_owned())
                .or_default()
                .push(MovableAgent {
                    name,
                    model: MODEL,
                    labels: &none,
                });
        }
        let moves = s.plan_rebalance(1.2, 10, &movable);
        // Average 8/12 = 0.67; a and b at 1.0 > 0.8. Moves stop once the
        // target would pass the source: 3/3/2.
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert!(moves.iter().all(|m| m.to == "c"));
        let loads: Vec<u32> = s.nodes().iter().map(|n| n.load).collect();
        assert_eq!(loads, vec![3, 3, 2]);
        // A second pass finds nothing to do: balanced within the threshold.
        assert!(s.plan_rebalance(1.2, 10, &movable).is_empty());
    }

    #[test]
    fn rebalancing_is_bounded_and_can_be_off() {
        let none = BTreeMap::new();
        let agents: Vec<String> = (0..8).map(|i| format!("x{i}")).collect();
        let movable = BTreeMap::from([(
            "a".to_owned(),
            agents
                .iter()
                .map(|n| MovableAgent {
                    name: n,
                    model: MODEL,
                    labels: &none,
                })
                .collect(),
        )]);
        let mut s = Scheduler::new(vec![node("a", 8, 8), node("b", 8, 0)]);
        assert_eq!(s.clone().plan_rebalance(0.0, 10, &movable).len(), 0);
        assert_eq!(s.plan_rebalance(1.2, 2, &movable).len(), 2);
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeSlots>> {
        prop::collection::vec((1u32..20, 0u32..25, 0u8..4, any::<bool>(), 0u8..3), 1..12).prop_map(
            |specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (cap, load, lpc, blocked, models))| {
                        let mut n = node(&format!("n{i:02}"), cap, load.min(cap));
                        n.load_per_core = f64::from(lpc) / 4.0;
                        if blocked && i % 3 == 0 {
                            n.blocked = Some(Blocked::Draining);
                        }
                        if models == 0 {
                            n.models = vec!["other:latest".into()];
                        }
                        n
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn placement_never_overfills_and_always_picks_a_least_loaded_eligible_node(
            nodes in arb_nodes(),
            placements in 1usize..200,
        ) {
            let none = BTreeMap::new();
            let mut s = Scheduler::new(nodes);
            for _ in 0..placements {
                let before = s.nodes().to_vec();
                let eligible: Vec<&NodeSlots> = before
                    .iter()
                    .filter(|n| n.blocked.is_none() && n.load < n.agent_capacity && n.has_model(MODEL))
                    .collect();
                match s.place(&any_request(&none)) {
                    Ok(id) => {
                        let chosen = before.iter().find(|n| n.id == id).unwrap();
                        prop_assert!(eligible.iter().any(|n| n.id == id));
                        for other in &eligible {
                            // chosen.load/chosen.cap <= other.load/other.cap
                            prop_assert!(
                                u64::from(chosen.load) * u64::from(other.agent_capacity)
                                    <= u64::from(other.load) * u64::from(chosen.agent_capacity)
                            );
                        }
                    }
                    Err(_) => prop_assert!(eligible.is_empty()),
                }
                for n in s.nodes() {
                    prop_assert!(n.blocked.is_some() || n.load <= n.agent_capacity);
                }
            }
        }

        #[test]
        fn placement_is_deterministic_and_independent_of_input_order(
            nodes in arb_nodes(),
            placements in 1usize..60,
        ) {
            let none = BTreeMap::new();
            let mut reversed = nodes.clone();
            reversed.reverse();
            let mut a = Scheduler::new(nodes);
            let mut b = Scheduler::new(reversed);
            for _ in 0..placements {
                prop_assert_eq!(a.place(&any_request(&none)), b.place(&any_request(&none)));
            }
        }

        #[test]
        fn rebalancing_never_overfills_and_never_plans_a_move_back(
            nodes in arb_nodes(),
        ) {
            let none = BTreeMap::new();
            let names: Vec<(String, Vec<String>)> = nodes
                .iter()
                .map(|n| (n.id.clone(), (0..n.load).map(|i| format!("{}-{i}", n.id)).collect()))
                .collect();
            let movable: BTreeMap<String, Vec<MovableAgent<'_>>> = names
                .iter()
                .map(|(id, agents)| {
                    (id.clone(), agents.iter().map(|a| MovableAgent { name: a, model: MODEL, labels: &none }).collect())
                })
                .collect();
            let mut s = Scheduler::new(nodes);
            let moves = s.plan_rebalance(1.2, 50, &movable);
            for n in s.nodes() {
                prop_assert!(n.blocked.is_some() || n.load <= n.agent_capacity);
            }
            for m in &moves {
                prop_assert!(!moves.iter().any(|o| o.from == m.to && o.to == m.from), "{:?}", moves);
            }
        }
    }
}
