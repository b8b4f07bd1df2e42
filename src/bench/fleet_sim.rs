//! The fleet simulator: many nodes in this one process, each the node
//! daemon's own main loop, agent table and MQTT link
//! ([`crate::node::run_simulated`]) with its own broker session, last will,
//! capacity heartbeats and command handling. Only the host around a node is
//! left out: its probe reports a fixed healthy Pi and it serves no HTTP API.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{BenchError, Mqtt};
use crate::config::NodeConfig;
use crate::node::probe::ProbeReport;
use crate::protocol::{CpuInfo, MemoryInfo};

pub struct FleetSim {
    shutdown: CancellationToken,
    nodes: JoinSet<(String, Result<(), crate::node::NodeError>)>,
}

/// What every simulated node reports: a Raspberry Pi 5 at rest with the
/// bench's model pulled.
fn healthy_pi(model: &str) -> ProbeReport {
    ProbeReport {
        cpu: CpuInfo {
            cores: 4,
            load1: 0.2,
            usage_pct: 5.0,
        },
        memory: MemoryInfo {
            total_bytes: 8 << 30,
            available_bytes: 6 << 30,
        },
        temperature_c: Some(50.0),
        throttled: Some(false),
        models: vec![crate::protocol::normalize_model(model)],
        ollama_reachable: true,
        ollama_error: None,
    }
}

impl FleetSim {
    /// Starts nodes `PREFIX-1..=count` of `capacity` slots on `mqtt`.
    pub fn start(mqtt: &Mqtt, prefix: &str, count: usize, capacity: u32, model: &str) -> FleetSim {
        let shutdown = CancellationToken::new();
        let mut nodes = JoinSet::new();
        let report = healthy_pi(model);
        for i in 1..=count {
            let id = format!("{prefix}-{i}");
            let mut config = NodeConfig::with_defaults(&id, capacity);
            config.mqtt.host = mqtt.host.clone();
            config.mqtt.port = mqtt.port;
            let (report, shutdown) = (report.clone(), shutdown.clone());
            nodes.spawn(async move {
                let result = crate::node::run_simulated(config, report, shutdown).await;
                (id, result)
            });
        }
        FleetSim { shutdown, nodes }
    }

    /// A node that stopped on its own is an error of the bench.
    pub fn check(&mut self) -> Result<(), BenchError> {
        match self.nodes.try_join_next() {
            None => Ok(()),
            Some(Ok((id, Ok(())))) => Err(BenchError::new(format!("simulated {id} stopped"))),
            Some(Ok((id, Err(e)))) => Err(BenchError::new(format!("simulated {id}: {e}"))),
            Some(Err(e)) => Err(BenchError::new(format!("a simulated node panicked: {e}"))),
        }
    }

    /// Stops every node as the daemon stops (`offline`, clean disconnect),
    /// waiting at most `limit`.
    pub async fn stop(mut self, limit: Duration) -> Result<(), BenchError> {
        self.shutdown.cancel();
        let start = Instant::now();
        while !self.nodes.is_empty() {
            let left = limit.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.nodes.join_next()).await {
                Ok(Some(Ok((_, Ok(()))))) | Ok(None) => {}
                Ok(Some(Ok((id, Err(e))))) => {
                    return Err(BenchError::new(format!("simulated {id}: {e}")))
                }
                Ok(Some(Err(e))) => {
                    return Err(BenchError::new(format!("a simulated node panicked: {e}")))
                }
                Err(_) => {
                    return Err(BenchError::new(format!(
                        "{} simulated nodes did not stop within {}s",
                        self.nodes.len(),
                        limit.as_secs()
                    )))
                }
            }
        }
        Ok(())
    }
}
