//! Home Assistant MQTT discovery for the whole fleet, published by the
//! coordinator so that nodes stay small (docs/MONITORING.md).
//!
//! One config per entity, retained, at
//! `{prefix}/{component}/{root}_node_{node}/{key}/config` for a node and
//! `{prefix}/{component}/{root}_fleet/{key}/config` for the fleet. Every
//! entity reads an existing retained pifleet topic with a `value_template`:
//! a node's entities its `capacity` message, available while its `status`
//! is `online`; the fleet's entities `fleet/summary`, available while
//! `coordinator/status` is `online`. A template renders `None` where the
//! node does not know the value (no temperature sensor), which Home
//! Assistant shows as unknown.
//!
//! Pure code: it builds topics and payloads, the core publishes them.

use serde_json::{json, Value};

use crate::protocol::{NodeTopic, Topics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Sensor,
    BinarySensor,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Sensor => "sensor",
            Component::BinarySensor => "binary_sensor",
        }
    }
}

/// One entity: its key (in `unique_id` and the topic), name, how to read
/// it, and what Home Assistant should make of it.
pub struct Entity {
    pub key: &'static str,
    pub name: &'static str,
    pub component: Component,
    pub template: &'static str,
    pub unit: Option<&'static str>,
    pub device_class: Option<&'static str>,
    /// `measurement` for sensors; binary sensors have none.
    pub measurement: bool,
    pub icon: Option<&'static str>,
}

const fn sensor(
    key: &'static str,
    name: &'static str,
    template: &'static str,
    unit: Option<&'static str>,
    device_class: Option<&'static str>,
    icon: Option<&'static str>,
) -> Entity {
    Entity {
        key,
        name,
        component: Component::Sensor,
        template,
        unit,
        device_class,
        measurement: true,
        icon,
    }
}

const fn binary(
    key: &'static str,
    name: &'static str,
    template: &'static str,
    device_class: Option<&'static str>,
    icon: Option<&'static str>,
) -> Entity {
    Entity {
        key,
        name,
        component: Component::BinarySensor,
        template,
        unit: None,
        device_class,
        measurement: false,
        icon,
    }
}

/// A node's entities, read from its retained capacity message.
pub const NODE_ENTITIES: [Entity; 9] = [
    sensor(
        "agents_running",
        "Agents running",
        "{{ value_json.agents_running }}",
        Some("agents"),
        None,
        Some("mdi:robot"),
    ),
    sensor(
        "agent_capacity",
        "Agent capacity",
        "{{ value_json.agent_capacity }}",
        Some("agents"),
        None,
        Some("mdi:robot-outline"),
    ),
    sensor(
        "load",
        "Load (1 min)",
        "{{ value_json.cpu.load1 }}",
        None,
        None,
        Some("mdi:gauge"),
    ),
    sensor(
        "cpu_usage",
        "CPU usage",
        "{{ value_json.cpu.usage_pct | round(1) }}",
        Some("%"),
        None,
        Some("mdi:cpu-64-bit"),
    ),
    sensor(
        "memory_available",
        "Memory available",
        "{{ value_json.memory.available_bytes }}",
        Some("B"),
        Some("data_size"),
        None,
    ),
    sensor(
        "temperature",
        "Temperature",
        "{{ value_json.temperature_c }}",
        Some("°C"),
        Some("temperature"),
        None,
    ),
    binary(
        "throttled",
        "Throttled",
        "{{ none if value_json.throttled is none else ('ON' if value_json.throttled else 'OFF') }}",
        Some("problem"),
        None,
    ),
    binary(
        "ollama_reachable",
        "Ollama reachable",
        "{{ 'ON' if value_json.ollama_reachable else 'OFF' }}",
        Some("connectivity"),
        None,
    ),
    binary(
        "draining",
        "Draining",
        "{{ 'ON' if value_json.draining else 'OFF' }}",
        None,
        Some("mdi:transfer"),
    ),
];

/// The fleet's entities, read from the retained fleet summary.
pub const FLEET_ENTITIES: [Entity; 6] = [
    sensor("nodes_online", "Nodes online", "{{ value_json.nodes_online }}", Some("nodes"), None, Some("mdi:raspberry-pi")),
    sensor("agents_running", "Agents running", "{{ value_json.agents_running }}", Some("agents"), None, Some("mdi:robot")),
    sensor("agents_pending", "Agents pending", "{{ value_json.agents_pending }}", Some("agents"), None, Some("mdi:robot-confused")),
    sensor("free_capacity", "Free capacity", "{{ [value_json.agent_capacity - value_json.agents_running - value_json.agents_assigned, 0] | max }}", Some("agents"), None, Some("mdi:robot-outline")),
    sensor("utilisation", "Utilisation", "{{ value_json.utilisation_pct | round(1) }}", Some("%"), None, Some("mdi:percent")),
    sensor("queue_depth", "Queue depth", "{{ value_json.queue_depth }}", Some("jobs"), None, Some("mdi:tray-full")),
];

/// The coordinator's own availability, a binary sensor on its status topic.
const COORDINATOR_KEY: &str = "coordinator";

#[derive(Debug, Clone)]
pub struct Discovery {
    prefix: String,
    topics: Topics,
    /// The topic root made safe for discovery topics and ids.
    id_root: String,
}

/// Discovery topics and ids allow `[a-zA-Z0-9_-]`; node ids may also hold
/// `.`. `_` becomes `__` and `.` becomes `_`, so two node ids never share
/// an id (`pi.1` → `pi_1`, `pi_1` → `pi__1`).
fn id_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '_' => out.push_str("__"),
            c if c.is_ascii_alphanumeric() || c == '-' => out.push(c),
            _ => out.push('_'),
        }
    }
    out
}

impl Discovery {
    pub fn new(prefix: &str, topics: Topics) -> Self {
        Discovery {
            prefix: prefix.to_owned(),
            id_root: id_safe(topics.root()),
            topics,
        }
    }

    /// Home Assistant announces itself here (`online` after a restart).
    pub fn status_topic(&self) -> String {
        format!("{}/status", self.prefix)
    }

    fn node_object(&self, node: &str) -> String {
        format!("{}_node_{}", self.id_root, id_safe(node))
    }

    fn fleet_object(&self) -> String {
        format!("{}_fleet", self.id_root)
    }

    fn config_topic(&self, component: Component, object: &str, key: &str) -> String {
        format!(
            "{}/{}/{object}/{key}/config",
            self.prefix,
            component.as_str()
        )
    }

    fn origin() -> Value {
        json!({"name": "pifleet", "sw_version": env!("CARGO_PKG_VERSION")})
    }

    fn entity_config(entity: &Entity, object: &str, state_topic: &str, device: &Value) -> Value {
        let mut config = json!({
            "name": entity.name,
            "unique_id": format!("{object}_{}", entity.key),
            "state_topic": state_topic,
            "value_template": entity.template,
            "device": device,
            "origin": Self::origin(),
        });
        let c = config.as_object_mut().expect("an object");
        if let Some(unit) = entity.unit {
            c.insert("unit_of_measurement".into(), unit.into());
        }
        if let Some(class) = entity.device_class {
            c.insert("device_class".into(), class.into());
        }
        if entity.measurement {
            c.insert("state_class".into(), "measurement".into());
        }
        if let Some(icon) = entity.icon {
            c.insert("icon".into(), icon.into());
        }
        if entity.component == Component::BinarySensor {
            c.insert("payload_on".into(), "ON".into());
            c.insert("payload_off".into(), "OFF".into());
        }
        config
    }

    fn availability(topic: String) -> Value {
        json!([{"topic": topic, "payload_available": "online", "payload_not_available": "offline"}])
    }

    /// The retained configs of `node`'s entities: `(topic, payload)`.
    pub fn node_configs(&self, node: &str, node_version: &str) -> Vec<(String, Vec<u8>)> {
        let object = self.node_object(node);
        let device = json!({
            "identifiers": [object],
            "name": node,
            "manufacturer": "pifleet",
            "model": "pifleet node",
            "sw_version": node_version,
            "via_device": self.fleet_object(),
        });
        let state_topic = self.topics.node(node, NodeTopic::Capacity);
        let availability = Self::availability(self.topics.node(node, NodeTopic::Status));
        NODE_ENTITIES
            .iter()
            .map(|e| {
                let mut config = Self::entity_config(e, &object, &state_topic, &device);
                config["availability"] = availability.clone();
                let topic = self.config_topic(e.component, &object, e.key);
                (topic, config.to_string().into_bytes())
            })
            .collect()
    }

    /// The config topics of `node`'s entities, to clear when it is forgotten.
    pub fn node_config_topics(&self, node: &str) -> Vec<String> {
        let object = self.node_object(node);
        NODE_ENTITIES
            .iter()
            .map(|e| self.config_topic(e.component, &object, e.key))
            .collect()
    }

    /// The retained configs of the fleet's entities and of the coordinator's
    /// availability.
    pub fn fleet_configs(&self) -> Vec<(String, Vec<u8>)> {
        let object = self.fleet_object();
        let root = self.topics.root();
        let device = json!({
            "identifiers": [object],
            "name": if root == "pifleet" { "pifleet fleet".to_owned() } else { format!("pifleet fleet ({root})") },
            "manufacturer": "pifleet",
            "model": "pifleet coordinator",
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        let state_topic = self.topics.fleet_summary();
        let status_topic = self.topics.coordinator_status();
        let mut configs: Vec<(String, Vec<u8>)> = FLEET_ENTITIES
            .iter()
            .map(|e| {
                let mut config = Self::entity_config(e, &object, &state_topic, &device);
                config["availability"] = Self::availability(status_topic.clone());
                let topic = self.config_topic(e.component, &object, e.key);
                (topic, config.to_string().into_bytes())
            })
            .collect();
        // Its state is the availability itself: no availability of its own,
        // so Home Assistant shows it off, not unavailable.
        let coordinator = json!({
            "name": "Coordinator",
            "unique_id": format!("{object}_{COORDINATOR_KEY}"),
            "state_topic": status_topic,
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "device": device,
            "origin": Self::origin(),
        });
        configs.push((
            self.config_topic(Component::BinarySensor, &object, COORDINATOR_KEY),
            coordinator.to_string().into_bytes(),
        ));
        configs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery() -> Discovery {
        Discovery::new("homeassistant", Topics::new("pifleet"))
    }

    #[test]
    fn a_node_gets_one_retained_config_per_entity_with_stable_ids() {
        let configs = discovery().node_configs("pi.1", "0.1.0");
        assert_eq!(configs.len(), NODE_ENTITIES.len());
        let (topic, payload) = &configs[0];
        assert_eq!(
            topic,
            "homeassistant/sensor/pifleet_node_pi_1/agents_running/config"
        );
        let v: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["unique_id"], "pifleet_node_pi_1_agents_running");
        assert_eq!(v["state_topic"], "pifleet/nodes/pi.1/capacity");
        assert_eq!(v["availability"][0]["topic"], "pifleet/nodes/pi.1/status");
        assert_eq!(v["device"]["identifiers"][0], "pifleet_node_pi_1");
        assert_eq!(v["device"]["via_device"], "pifleet_fleet");
        let topics: Vec<String> = configs.into_iter().map(|(t, _)| t).collect();
        assert_eq!(topics, discovery().node_config_topics("pi.1"));
        // Distinct node ids keep distinct entities.
        assert_ne!(topics, discovery().node_config_topics("pi_1"));
    }

    #[test]
    fn the_fleet_has_its_entities_and_the_coordinators_availability() {
        let configs = discovery().fleet_configs();
        assert_eq!(configs.len(), FLEET_ENTITIES.len() + 1);
        let (topic, payload) = configs.last().unwrap();
        assert_eq!(
            topic,
            "homeassistant/binary_sensor/pifleet_fleet/coordinator/config"
        );
        let v: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["state_topic"], "pifleet/coordinator/status");
        assert!(v.get("availability").is_none());
    }
}
