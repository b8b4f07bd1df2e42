//! Starting and stopping a node: the daemon with its host around it (HTTP
//! API, host probe, systemd watchdog), or a simulated node without them for
//! `pifleet bench placement`, which plays hundreds of nodes in one process.
//! Both run the same main loop, agent table and MQTT link.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::agents::AgentTable;
use super::answered::AnsweredTurns;
use super::lease::Lease;
use super::ollama::OllamaClient;
use super::probe::{self, HostProbe, ProbeReport};
use super::{api, metrics, Node, NodeError, CAPACITY_DEBOUNCE, PARENT_PID_ENV};
use crate::config::NodeConfig;
use crate::mqtt::{Link, Will};
use crate::protocol::{NodeTopic, Topics, STATUS_OFFLINE};
use crate::systemd::{self, Liveness};

/// What the main loop gets from around it.
struct Host {
    probes: mpsc::Receiver<ProbeReport>,
    queries: mpsc::Receiver<api::Query>,
    connected: Arc<AtomicBool>,
    metrics: Arc<metrics::NodeMetrics>,
    liveness: Liveness,
    ollama: OllamaClient,
    /// The `pifleet up` process that started this node, if any.
    parent: Option<rustix::process::Pid>,
    /// A daemon tells systemd when it is ready; a simulated node does not.
    notify_systemd: bool,
}

/// Runs the node daemon until `shutdown` is cancelled, then stops gracefully.
pub async fn run(config: NodeConfig, shutdown: CancellationToken) -> Result<(), NodeError> {
    let (listener, api_addr) = crate::http::bind(config.api.listen)
        .await
        .map_err(|source| NodeError::Bind {
            addr: config.api.listen,
            source,
        })?;
    let host_probe = HostProbe::new(&config.probe).map_err(NodeError::Probe)?;
    log::info!(
        "node {} starting: agent_capacity {}, API http://{api_addr}, broker {}, Ollama {}",
        config.node_id,
        config.agent_capacity,
        config.mqtt.address(),
        config.ollama.url
    );
    let metrics = Arc::new(metrics::NodeMetrics::new());
    let connected = Arc::new(AtomicBool::new(false));
    let (query_tx, queries) = mpsc::channel(16);
    let background = CancellationToken::new();
    let api_state = api::ApiState {
        node: config.node_id.clone(),
        connected: connected.clone(),
        metrics: metrics.clone(),
        queries: query_tx,
    };
    let api_task = tokio::spawn(crate::http::serve(
        listener,
        api::router(api_state),
        background.clone(),
    ));
    let ollama = OllamaClient::new(&config.ollama.url);
    let (probe_tx, probes) = mpsc::channel(2);
    let probe_task = tokio::spawn(probe::run(
        host_probe,
        ollama.clone(),
        config.heartbeat,
        probe_tx,
        background.clone(),
    ));
    let liveness = Liveness::default();
    liveness.beat();
    systemd::spawn_watchdog(liveness.clone(), background.clone());
    let host = Host {
        probes,
        queries,
        connected,
        metrics,
        liveness,
        ollama,
        parent: std::env::var(PARENT_PID_ENV)
            .ok()
            .and_then(|pid| pid.parse().ok())
            .and_then(rustix::process::Pid::from_raw),
        notify_systemd: true,
    };
    let id = config.node_id.clone();
    let result = drive(config, host, shutdown).await;
    background.cancel();
    let _ = api_task.await;
    let _ = probe_task.await;
    log::info!("node {id} stopped");
    result
}

/// A node without a host: every heartbeat reports `report` instead of
/// sampling this machine, and it serves no HTTP API. Commands, acks, turns,
/// capacity messages, the lease and shutdown are the daemon's own.
pub async fn run_simulated(
    config: NodeConfig,
    report: ProbeReport,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let background = CancellationToken::new();
    let (probe_tx, probes) = mpsc::channel(2);
    tokio::spawn(probe::repeat(
        report,
        config.heartbeat,
        probe_tx,
        background.clone(),
    ));
    // Kept open so that the loop's query branch simply never fires.
    let (_query_tx, queries) = mpsc::channel(1);
    let host = Host {
        probes,
        queries,
        connected: Arc::new(AtomicBool::new(false)),
        metrics: Arc::new(metrics::NodeMetrics::new()),
        liveness: Liveness::default(),
        ollama: OllamaClient::new(&config.ollama.url),
        parent: None,
        notify_systemd: false,
    };
    let result = drive(config, host, shutdown).await;
    background.cancel();
    result
}

/// Connects, runs the main loop until shutdown, then says `offline` and
/// disconnects cleanly.
async fn drive(
    config: NodeConfig,
    host: Host,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let topics = Topics::new(config.mqtt.topic_root.clone());
    let will = Will {
        topic: topics.node(&config.node_id, NodeTopic::Status),
        payload: STATUS_OFFLINE.into(),
        retain: true,
    };
    let mut link = Link::start(
        &config.mqtt,
        &format!("pifleet-node-{}", config.node_id),
        Some(will),
    )?;
    host.metrics
        .agent_capacity
        .set(i64::from(config.agent_capacity));
    host.liveness.beat();
    let mut node = Node {
        table: AgentTable::new(&config.node_id, config.agent_capacity),
        session: crate::protocol::new_id(),
        seq: 0,
        publisher: link.publisher.clone(),
        lease: Lease::new(config.fence_after),
        probe: ProbeReport::unknown(),
        probed: false,
        connected: host.connected,
        announced_ready: false,
        notify_systemd: host.notify_systemd,
        disconnected_since: Some(Instant::now()),
        dirty: false,
        held: Vec::new(),
        published: super::listed::Published::default(),
        announced: None,
        list_generation: 0,
        last_capacity: Instant::now() - CAPACITY_DEBOUNCE,
        turns: JoinSet::new(),
        running: Default::default(),
        slots: Arc::new(Semaphore::new(config.ollama.max_parallel as usize)),
        ollama: host.ollama,
        metrics: host.metrics,
        liveness: host.liveness,
        stopping: false,
        answered: AnsweredTurns::default(),
        pulls: super::pull::Pulls::new(config.ollama.max_pulls),
        parent: host.parent,
        batch_generation: 0,
        topics,
        config,
    };
    node.run(&mut link.events, host.probes, host.queries, shutdown)
        .await;
    node.publish_capacity();
    node.publish_status(STATUS_OFFLINE);
    log::info!(
        "node {} published offline; disconnecting",
        node.config.node_id
    );
    link.close(Duration::from_secs(5)).await;
    Ok(())
}
