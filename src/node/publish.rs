//! What the node publishes about itself: the capacity heartbeat and its
//! agent list (docs/PROTOCOL.md, "Capacity" and "Agent lists").

use std::time::Instant;

use super::listed::{self, Numbering};
use super::Node;
use crate::protocol::{chunk_bytes, encode, json_bytes, now_ms, AgentUpdate, Capacity, NodeTopic};

impl Node {
    fn capacity(&mut self) -> Capacity {
        self.seq += 1;
        self.published.begin(self.seq);
        let p = &self.probe;
        let published = &self.published;
        Capacity {
            node: self.config.node_id.clone(),
            session: self.session.clone(),
            seq: self.seq,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
            agent_capacity: self.config.agent_capacity,
            agents_running: self.table.len() as u32,
            agents: published.inline().then(|| published.names().to_vec()),
            agents_rev: published.rev,
            agents_digest: published.digest,
            cpu: p.cpu.clone(),
            memory: p.memory.clone(),
            temperature_c: p.temperature_c,
            throttled: p.throttled,
            models: p.models.clone(),
            ollama_reachable: p.ollama_reachable,
            labels: self.config.labels.clone(),
            draining: self.table.draining(),
            ts: now_ms(),
            max_temperature_c: Some(self.config.max_temperature_c),
            max_parallel: self.config.ollama.max_parallel,
            turns_in_flight: self.table.turns_in_flight() as u32,
            generation: self.table.generation(),
            fence_ms: self.config.fence_after.as_millis() as u64,
            batches: true,
        }
    }

    /// Publishes the retained capacity message now (a heartbeat), after
    /// the updates of the agent list if it changed. While disconnected it
    /// only marks it due: the ConnAck handler publishes a fresh one.
    pub(super) fn publish_capacity(&mut self) {
        self.publish(true);
    }

    /// Publishes a change: only the agent updates when the list travels
    /// apart and nothing else announced changed, else as a heartbeat.
    pub(super) fn publish_change(&mut self) {
        self.publish(false);
    }

    fn publish(&mut self, heartbeat: bool) {
        // Never announce agents the lease no longer covers.
        self.check_fence();
        if !self.is_connected() {
            self.dirty = true;
            return;
        }
        self.dirty = false;
        self.last_capacity = Instant::now();
        // A coordinator that has not asked for a list since it took over
        // may not read agent updates (an older version): it gets the list
        // inline, however long.
        let names = self.table.names();
        let inline = self.list_generation < self.table.generation()
            && json_bytes(&names) <= self.publisher.max_payload() / 2;
        let mut numbering = Numbering {
            node: &self.config.node_id,
            session: &self.session,
            seq: &mut self.seq,
            chunk: chunk_bytes(self.publisher.max_payload()),
        };
        let updates = match self.published.sync(names, inline, &mut numbering) {
            listed::Sync::Updates(updates) => updates,
            listed::Sync::Unchanged | listed::Sync::Inline => Vec::new(),
        };
        let only_updates = !heartbeat && !updates.is_empty();
        self.publish_updates(updates);
        let announced = self.announced_now();
        if only_updates && self.announced.as_ref() == Some(&announced) {
            return;
        }
        self.announced = Some(announced);
        let capacity = self.capacity();
        let topic = self.topics.node(&self.config.node_id, NodeTopic::Capacity);
        let payload = encode(&capacity);
        self.lease.sent(&payload, self.last_capacity);
        if let Err(e) = self.publisher.publish(topic, payload, true) {
            log::error!("cannot publish capacity: {e}");
        }
    }

    /// The coordinator asked for the whole agent list.
    pub(super) fn publish_whole_list(&mut self) {
        if !self.is_connected() {
            return; // the heartbeat after the reconnect tells what changed
        }
        // First what changed since the last message, in order.
        self.publish_change();
        let mut numbering = Numbering {
            node: &self.config.node_id,
            session: &self.session,
            seq: &mut self.seq,
            chunk: chunk_bytes(self.publisher.max_payload()),
        };
        let updates = self.published.whole(&mut numbering);
        log::info!(
            "sent the list of {} agents in {} messages (the coordinator asked)",
            self.published.names().len(),
            updates.len()
        );
        self.publish_updates(updates);
    }

    fn publish_updates(&self, updates: Vec<AgentUpdate>) {
        let topic = self.topics.node(&self.config.node_id, NodeTopic::Agents);
        for update in updates {
            if let Err(e) = self
                .publisher
                .publish(topic.clone(), encode(&update), false)
            {
                log::error!("cannot publish an agent update: {e}");
            }
        }
    }

    fn announced_now(&self) -> Announced {
        Announced {
            draining: self.table.draining(),
            models: self.probe.models.clone(),
            ollama_reachable: self.probe.ollama_reachable,
            generation: self.table.generation(),
        }
    }
}

/// The fields of a capacity message whose change is published at once.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Announced {
    draining: bool,
    models: Vec<String>,
    ollama_reachable: bool,
    generation: u64,
}
