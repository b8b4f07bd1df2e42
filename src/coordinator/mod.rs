//! The coordinator daemon (`pifleet coordinator`): places agents on the
//! least-loaded nodes, moves them when a node dies or is drained, routes chat
//! turns and queued jobs to them, and serves the HTTP API (docs/ARCHITECTURE.md §3).
//!
//! One task owns all state ([`core::Coordinator`]); the HTTP handlers and
//! the MQTT link talk to it through channels:
//!
//! * link events: retained `status` and `capacity` messages build the fleet
//!   view, `reply` messages confirm assignments and carry turn results;
//! * API requests ([`core::ApiRequest`], typed data), each with a oneshot
//!   for its answer, which leaves once the request's store batch commits (a
//!   chat's when its turn completes);
//! * a tick every 250 ms: reconciliation, timeouts, the fleet summary.
//!
//! On SIGTERM it answers waiting chats, publishes `offline` on
//! `pifleet/coordinator/status` and disconnects; nodes keep running their
//! agents and the next coordinator picks them up from the store and the
//! retained capacity messages.

pub mod api;
pub mod core;
pub mod discovery;
pub mod fleet;
pub mod metrics;
pub mod scheduler;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::coordinator::CoordinatorConfig;
use crate::mqtt::{Link, LinkError, LinkEvent, Publisher, Will};
use crate::protocol::{NodeTopic, STATUS_OFFLINE, STATUS_ONLINE};
use crate::systemd::{self, Liveness};
use core::ApiRequest;
use core::Now;

const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("cannot listen on api.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Runs the coordinator until `shutdown` is cancelled.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let (listener, api_addr) = crate::http::bind(config.api.listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.api.listen,
            source,
        })?;
    let store = store::Store::open(&config.store_path, config.history_limit)?;
    let topics = crate::protocol::Topics::new(config.mqtt.topic_root.clone());
    let will = Will {
        topic: topics.coordinator_status(),
        payload: STATUS_OFFLINE.into(),
        retain: true,
    };
    let client_id = format!(
        "pifleet-coordinator-{}",
        config.mqtt.topic_root.replace('/', "-")
    );
    let mut link = Link::start(&config.mqtt, &client_id, Some(will))?;
    let metrics = Arc::new(metrics::CoordinatorMetrics::new());
    let mut coordinator =
        core::Coordinator::load(config.clone(), store, Now::system(), metrics.clone())?;
    log::info!(
        "coordinator starting: API http://{api_addr}, broker {}, store {}",
        config.mqtt.address(),
        config.store_path.display()
    );

    let ready = Arc::new(AtomicBool::new(false));
    let store_ok = Arc::new(AtomicBool::new(true));
    let mut failed = None;
    let (tx, mut requests) = mpsc::channel::<ApiRequest>(1024);
    let background = CancellationToken::new();
    let state = api::ApiState {
        requests: tx,
        ready: ready.clone(),
        store_ok: store_ok.clone(),
        metrics,
        token: config.api.token.clone(),
        max_body: config.api.max_body_bytes,
        chat_timeout: config.timeouts.chat + Duration::from_secs(5),
    };
    let server = tokio::spawn(crate::http::serve(
        listener,
        api::router(state),
        background.clone(),
    ));
    let liveness = Liveness::default();
    liveness.beat();
    systemd::spawn_watchdog(liveness.clone(), background.clone());

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut session = Session {
        ready: ready.clone(),
        announced: false,
        api_addr,
    };
    loop {
        liveness.beat();
        let input = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = link.events.recv() => match event {
                Some(event) => Input::Link(event),
                None => {
                    log::error!("the MQTT link stopped unexpectedly");
                    break;
                }
            },
            Some(request) = requests.recv() => Input::Api(request),
            _ = crate::timing::sleep_until(coordinator.placement_due()) => Input::PlacementDue,
            _ = tick.tick() => Input::Tick,
        };
        // The core reads no clock and does no I/O: it is told the time of
        // each input, and what it decided to publish is sent here. Every
        // input is one store batch: its commands and HTTP answers leave
        // only once it commits (core/durability.rs).
        if matches!(input, Input::Tick) {
            // While the store cannot write: a write of its own, outside
            // any batch, to notice when it can again.
            coordinator.probe_store(Now::system());
        }
        coordinator.begin_batch();
        match input {
            Input::Link(event) => {
                // Link messages already waiting are handled in one store
                // transaction: a commit per ack or report is what limited
                // placing agents in bulk.
                let mut event = Some(event);
                let mut handled = 0;
                while let Some(e) = event.take() {
                    on_link(&mut coordinator, &link.publisher, &mut session, e);
                    handled += 1;
                    if handled < LINK_BATCH {
                        event = link.events.try_recv().ok();
                    }
                }
            }
            Input::Api(request) => coordinator.handle(request, Now::system()),
            Input::PlacementDue => coordinator.place_pending(Now::system()),
            Input::Tick => {
                let now = Now::system();
                coordinator.reconcile(now);
                if session.ready.load(Ordering::Relaxed) {
                    coordinator.publish_summary(now);
                }
            }
        }
        if let Err(e) = coordinator.end_batch() {
            log::error!("{e}: the store cannot be read back; stopping");
            failed = Some(e);
            break;
        }
        store_ok.store(coordinator.store_fault().is_none(), Ordering::Relaxed);
        send_outbox(&mut coordinator, &link.publisher);
    }

    systemd::notify_stopping();
    ready.store(false, Ordering::Relaxed);
    coordinator.stop(Now::system());
    // Stop taking requests, answer what is queued, then leave the broker.
    background.cancel();
    requests.close();
    while let Ok(request) = requests.try_recv() {
        coordinator.handle(request, Now::system());
    }
    let _ = server.await;
    send_outbox(&mut coordinator, &link.publisher);
    if let Err(e) = link.publisher.publish(
        coordinator.topics.coordinator_status(),
        STATUS_OFFLINE,
        true,
    ) {
        log::error!("cannot publish the coordinator status: {e}");
    }
    link.close(Duration::from_secs(5)).await;
    log::info!("coordinator stopped");
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Link events handled in one store transaction at most.
const LINK_BATCH: usize = 256;

/// The coordinator's connection state, as the link events tell it.
struct Session {
    ready: Arc<AtomicBool>,
    announced: bool,
    api_addr: SocketAddr,
}

fn on_link(
    coordinator: &mut core::Coordinator,
    publisher: &Publisher,
    session: &mut Session,
    event: LinkEvent,
) {
    let now = Now::system();
    match event {
        LinkEvent::Connected => {
            let mut filters = [NodeTopic::Status, NodeTopic::Capacity, NodeTopic::Reply]
                .map(|kind| coordinator.topics.all_nodes(kind))
                .to_vec();
            filters.extend(coordinator.home_assistant_status_topic());
            if let Err(e) = publisher.subscribe(filters) {
                log::error!("cannot subscribe: {e}");
            }
        }
        LinkEvent::Subscribed => {
            coordinator.on_subscribed(now);
            // Answers published while we were away are lost.
            coordinator.resend_turns(None, "reconnected to the broker", now);
            let topic = coordinator.topics.coordinator_status();
            if let Err(e) = publisher.publish(topic, STATUS_ONLINE, true) {
                log::error!("cannot publish the coordinator status: {e}");
            }
            session.ready.store(true, Ordering::Relaxed);
            log::info!(
                "coordinator ready: API http://{}, generation {}",
                session.api_addr,
                coordinator.generation
            );
            if !session.announced {
                session.announced = true;
                systemd::notify_ready(&format!("coordinator ready on {}", session.api_addr));
            }
        }
        LinkEvent::Disconnected { reason } => {
            session.ready.store(false, Ordering::Relaxed);
            coordinator.on_disconnected(now);
            log::warn!("lost the MQTT broker ({reason}); nodes keep their agents meanwhile");
        }
        LinkEvent::Message {
            topic,
            payload,
            retain,
        } => match coordinator.topics.parse_node_topic(&topic) {
            Some((node, NodeTopic::Status)) => coordinator.on_status(node, &payload, retain, now),
            Some((node, NodeTopic::Capacity)) => {
                coordinator.on_capacity(node, &payload, retain, now)
            }
            Some((node, NodeTopic::Reply)) => coordinator.on_reply(node, &payload, now),
            _ if Some(&topic) == coordinator.home_assistant_status_topic().as_ref() => {
                coordinator.on_home_assistant_status(&payload, now)
            }
            _ => log::debug!("ignored a message on {topic}"),
        },
    }
}

/// What the main loop woke up for.
enum Input {
    Link(LinkEvent),
    Api(ApiRequest),
    PlacementDue,
    Tick,
}

/// Publishes what the core decided to send (queued QoS 1 publishes).
fn send_outbox(coordinator: &mut core::Coordinator, publisher: &Publisher) {
    for m in coordinator.take_outbox() {
        if let Err(e) = publisher.publish_until(m.topic, m.payload, m.retain, m.expires) {
            log::error!("cannot publish: {e}");
        }
    }
}
