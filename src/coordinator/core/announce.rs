//! Home Assistant discovery ([`crate::coordinator::discovery`]): what to
//! announce and when. Configs are retained; they are published again on
//! every connection to the broker and whenever Home Assistant says
//! `online` on its status topic (it restarted), and cleared when a node is
//! forgotten.

use super::*;

impl Coordinator {
    /// Where Home Assistant announces itself, if discovery is on.
    pub fn home_assistant_status_topic(&self) -> Option<String> {
        self.discovery.as_ref().map(Discovery::status_topic)
    }

    /// Home Assistant's status: `online` after it (re)started asks for
    /// every config again.
    pub fn on_home_assistant_status(&mut self, payload: &[u8], now: Now) {
        self.now = now;
        if payload == b"online" {
            log::info!("Home Assistant is online: publishing discovery configs again");
            self.forget_announcements();
        }
    }

    /// Published configs count for one connection only.
    pub(super) fn forget_announcements(&mut self) {
        self.announced.clear();
        self.fleet_announced = false;
    }

    /// Publishes the configs not yet published on this connection: the
    /// fleet's, and those of every node heard from (again when its version
    /// changed).
    pub(super) fn announce_discovery(&mut self) {
        let Some(discovery) = self.discovery.clone() else {
            return;
        };
        if !self.fleet_announced {
            self.fleet_announced = true;
            for (topic, payload) in discovery.fleet_configs() {
                self.publish(topic, payload, true);
            }
        }
        let due: Vec<(String, String)> = self
            .fleet
            .nodes()
            .filter_map(|n| {
                let version = &n.capacity.as_ref()?.version;
                (self.announced.get(&n.id) != Some(version))
                    .then(|| (n.id.clone(), version.clone()))
            })
            .collect();
        for (node, version) in due {
            for (topic, payload) in discovery.node_configs(&node, &version) {
                self.publish(topic, payload, true);
            }
            self.announced.insert(node, version);
        }
    }

    /// Removes a forgotten node's entities from Home Assistant.
    pub(super) fn clear_discovery(&mut self, node: &str) {
        self.announced.remove(node);
        let Some(discovery) = &self.discovery else {
            return;
        };
        for topic in discovery.node_config_topics(node) {
            self.publish(topic, Vec::new(), true);
        }
    }
}
