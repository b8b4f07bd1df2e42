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
//!
//! On a PostgreSQL store several coordinators run; one leads
//! ([`leader`]): the others follow, proxy their API to the leader, and
//! take over when its lease expires. A leader that loses its lease steps
//! down: it stops publishing at once, closes its MQTT link and follows.

pub mod api;
pub mod core;
pub mod discovery;
pub mod fleet;
pub mod leader;
pub mod listed;
pub mod metrics;
pub mod scheduler;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::coordinator::CoordinatorConfig;
use crate::mqtt::{Link, LinkError, LinkEvent, Publisher, Will};
use crate::protocol::{LeaderInfo, NodeTopic, STATUS_OFFLINE, STATUS_ONLINE};
use crate::systemd::{self, Liveness};
use core::ApiRequest;
use core::Now;
use leader::{Leadership, Role};
use store::Store;

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

/// What the daemon shares between its terms as leader.
struct Daemon {
    config: CoordinatorConfig,
    api_addr: SocketAddr,
    ready: Arc<AtomicBool>,
    store_ok: Arc<AtomicBool>,
    metrics: Arc<metrics::CoordinatorMetrics>,
    leadership: Arc<Leadership>,
    requests: mpsc::Receiver<ApiRequest>,
    liveness: Liveness,
    /// Stops the HTTP server, the watchdog and the lease watch.
    background: CancellationToken,
    server: Option<tokio::task::JoinHandle<()>>,
    /// Told systemd it is ready (once).
    announced: bool,
}

/// How a term as leader ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Shutdown,
    SteppedDown,
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
    let mut config = config;
    if config.api.listen.port() == 0 && config.leader.advertise.ends_with(":0") {
        // Port 0 (tests): the address other coordinators reach is the
        // port it was given.
        config.leader.advertise = format!("http://{api_addr}");
    }
    if config.store_url.is_some() {
        log::info!(
            "coordinator {} serving API http://{api_addr} (advertised as {}); it leads or follows",
            config.leader.id,
            config.leader.advertise
        );
    }
    let leadership = Arc::new(Leadership::new(
        config.store_url.is_some(),
        config.leader.id.clone(),
    ));
    let ready = Arc::new(AtomicBool::new(false));
    let store_ok = Arc::new(AtomicBool::new(true));
    let metrics = Arc::new(metrics::CoordinatorMetrics::new());
    let (tx, requests) = mpsc::channel::<ApiRequest>(1024);
    let background = CancellationToken::new();
    let state = api::ApiState {
        requests: tx,
        ready: ready.clone(),
        store_ok: store_ok.clone(),
        metrics: metrics.clone(),
        token: config.api.token.clone(),
        max_body: config.api.max_body_bytes,
        chat_timeout: config.timeouts.chat + Duration::from_secs(5),
        leadership: leadership.clone(),
    };
    let server = tokio::spawn(crate::http::serve(
        listener,
        api::router(state),
        background.clone(),
    ));
    let liveness = Liveness::default();
    liveness.beat();
    systemd::spawn_watchdog(liveness.clone(), background.clone());
    tokio::spawn(leadership.clone().watch(background.clone()));
    let mut daemon = Daemon {
        config,
        api_addr,
        ready,
        store_ok,
        metrics,
        leadership,
        requests,
        liveness,
        background,
        server: Some(server),
        announced: false,
    };
    let outcome = match daemon.config.store_url.clone() {
        None => {
            let config = &daemon.config;
            match Store::open(&config.store_path, config.history_limit) {
                Ok(store) => daemon.lead(store, &shutdown).await.map(|_| ()),
                Err(e) => Err(e.into()),
            }
        }
        Some(url) => daemon.take_turns(&url, &shutdown).await,
    };
    daemon.stop_serving().await;
    outcome
}

impl Daemon {
    /// On a shared store: follows, leads when elected, follows again when
    /// deposed, until `shutdown`.
    async fn take_turns(
        &mut self,
        url: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), CoordinatorError> {
        let mut warned = false;
        while !shutdown.is_cancelled() {
            self.liveness.beat();
            self.leadership.set_role(Role::Starting);
            let sync = self.config.store_synchronous_commit;
            let mut store = match Store::connect_with(url, self.config.history_limit, sync) {
                Ok(store) => store,
                Err(e) => {
                    if !warned {
                        log::error!("{e}; trying again every second");
                        warned = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            warned = false;
            if !self.announced {
                self.announced = true;
                systemd::notify_ready(&format!(
                    "coordinator {} on {} (following or leading)",
                    self.config.leader.id, self.api_addr
                ));
            }
            let term = tokio::select! {
                followed = leader::follow(&mut store, &self.config.leader, &self.leadership, shutdown) => followed,
                // The systemd watchdog: following is alive too.
                never = self.beat_while_following() => match never {},
            };
            match term {
                Ok(Some(term)) => {
                    log::info!(
                        "coordinator {} leads with term {term} (store {})",
                        self.config.leader.id,
                        store.location()
                    );
                    if self.lead(store, shutdown).await? == Ended::Shutdown {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("{e}; connecting to the store again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        Ok(())
    }

    /// Never returns: beats the systemd watchdog while following.
    async fn beat_while_following(&self) -> std::convert::Infallible {
        loop {
            self.liveness.beat();
            tokio::time::sleep(TICK).await;
        }
    }

    /// Leads with `store` until shutdown or, on a shared store, until its
    /// lease is lost.
    async fn lead(
        &mut self,
        store: Store,
        shutdown: &CancellationToken,
    ) -> Result<Ended, CoordinatorError> {
        let config = self.config.clone();
        let shared = self.leadership.shared;
        let topics = crate::protocol::Topics::new(config.mqtt.topic_root.clone());
        let will = Will {
            topic: topics.coordinator_status(),
            payload: STATUS_OFFLINE.into(),
            retain: true,
        };
        let root = config.mqtt.topic_root.replace('/', "-");
        // Coordinators sharing a store each have their own MQTT session:
        // with one client id, a frozen old leader woken up would take the
        // new leader's session over.
        let client_id = if shared {
            format!("pifleet-coordinator-{root}-{}", config.leader.id)
        } else {
            format!("pifleet-coordinator-{root}")
        };
        // Requests queued while this coordinator did not lead are stale:
        // their handlers passed the role check of an earlier term.
        while self.requests.try_recv().is_ok() {}
        let started =
            core::Coordinator::load(config.clone(), store, Now::system(), self.metrics.clone())
                .map_err(CoordinatorError::from)
                .and_then(|c| Ok((c, Link::start(&config.mqtt, &client_id, Some(will))?)));
        let (mut coordinator, mut link) = match started {
            Ok(started) => started,
            Err(e) if shared => {
                log::warn!("cannot start leading ({e}); following again");
                self.leadership.stop_acting();
                return Ok(Ended::SteppedDown);
            }
            Err(e) => return Err(e),
        };
        let term = coordinator.generation;
        if shared {
            // The lease as of now, not as of before loading.
            self.renew(&coordinator, Instant::now());
        }
        self.leadership.set_role(Role::Leader { term });
        log::info!(
            "coordinator starting: API http://{}, broker {}, store {}",
            self.api_addr,
            config.mqtt.address(),
            coordinator.store().location()
        );

        let mut failed = None;
        let mut ended = Ended::Shutdown;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed_at = Instant::now();
        let mut session = Session {
            ready: self.ready.clone(),
            leadership: self.leadership.clone(),
            api_addr: self.api_addr,
            advertise: config.leader.advertise.clone(),
        };
        loop {
            self.liveness.beat();
            if shared && (!self.leadership.acting() || coordinator.store().deposed()) {
                log::warn!(
                    "coordinator {} steps down (term {term}): its lease lapsed or another term leads",
                    config.leader.id
                );
                ended = Ended::SteppedDown;
                break;
            }
            let input = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = link.events.recv() => match event {
                    Some(event) => Input::Link(event),
                    None => {
                        log::error!("the MQTT link stopped unexpectedly");
                        break;
                    }
                },
                Some(request) = self.requests.recv() => Input::Api(request),
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
                if shared && renewed_at.elapsed() >= config.leader.lease / 3 {
                    renewed_at = Instant::now();
                    self.renew(&coordinator, renewed_at);
                }
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
                if shared {
                    // The database is gone or another term leads: follow
                    // (and connect again) rather than exit.
                    log::warn!("{e}: stepping down");
                    self.leadership.stop_acting();
                    continue;
                }
                log::error!("{e}: the store cannot be read back; stopping");
                failed = Some(e);
                break;
            }
            self.store_ok
                .store(coordinator.store_fault().is_none(), Ordering::Relaxed);
            // Only while the lease holds, as timed here: a leader frozen
            // past it publishes nothing when it wakes.
            if self.leadership.acting() {
                send_outbox(&mut coordinator, &link.publisher);
            }
        }

        self.ready.store(false, Ordering::Relaxed);
        if ended == Ended::SteppedDown {
            // Another coordinator leads (or will): publish nothing, not
            // even `offline`; requests queued here are refused (503, ask
            // again) when they are dropped.
            self.leadership.stop_acting();
            self.leadership.set_role(Role::Starting);
            coordinator.stop(Now::system());
            while self.requests.try_recv().is_ok() {}
            drop(coordinator.take_outbox());
            link.close(Duration::from_secs(1)).await;
            return Ok(Ended::SteppedDown);
        }
        systemd::notify_stopping();
        coordinator.stop(Now::system());
        // Stop taking requests, answer what is queued, then leave the broker.
        self.stop_serving().await;
        while let Ok(request) = self.requests.try_recv() {
            coordinator.handle(request, Now::system());
        }
        if self.leadership.acting() {
            send_outbox(&mut coordinator, &link.publisher);
            if let Err(e) = link.publisher.publish(
                coordinator.topics.coordinator_status(),
                STATUS_OFFLINE,
                true,
            ) {
                log::error!("cannot publish the coordinator status: {e}");
            }
        }
        link.close(Duration::from_secs(5)).await;
        if shared {
            // A follower takes over at once instead of after the lease.
            self.leadership.stop_acting();
            if let Err(e) = coordinator.store().resign() {
                log::warn!(
                    "cannot hand the lease over ({e}): a follower takes over when it expires"
                );
            }
        }
        log::info!("coordinator stopped");
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(Ended::Shutdown),
        }
    }

    /// Renews the lease (sent at `sent`); a term taken by another
    /// coordinator stops acting at once.
    fn renew(&self, coordinator: &core::Coordinator, sent: Instant) {
        match coordinator.store().renew(self.config.leader.lease) {
            Ok(true) => self.leadership.renewed(sent, self.config.leader.lease),
            Ok(false) => {
                log::warn!("another coordinator's term leads now");
                self.leadership.stop_acting();
            }
            Err(e) => log::warn!("cannot renew the lease: {e}"),
        }
    }

    /// Stops the HTTP server (once).
    async fn stop_serving(&mut self) {
        self.background.cancel();
        self.requests.close();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

/// Link events handled in one store transaction at most.
const LINK_BATCH: usize = 256;

/// The coordinator's connection state, as the link events tell it.
struct Session {
    ready: Arc<AtomicBool>,
    leadership: Arc<Leadership>,
    api_addr: SocketAddr,
    advertise: String,
}

impl Session {
    /// `online` on the coordinator status, and on a shared store which
    /// coordinator leads with which term (retained).
    fn announce(&self, coordinator: &core::Coordinator, publisher: &Publisher) {
        if !self.leadership.acting() {
            return;
        }
        let topic = coordinator.topics.coordinator_status();
        if let Err(e) = publisher.publish(topic, STATUS_ONLINE, true) {
            log::error!("cannot publish the coordinator status: {e}");
        }
        if self.leadership.shared {
            let info = LeaderInfo {
                leader: self.leadership.id.clone(),
                term: coordinator.generation,
                api: self.advertise.clone(),
            };
            let topic = coordinator.topics.coordinator_leader();
            if let Err(e) = publisher.publish(topic, crate::protocol::encode(&info), true) {
                log::error!("cannot publish the leader: {e}");
            }
        }
    }
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
            let mut filters = [
                NodeTopic::Status,
                NodeTopic::Capacity,
                NodeTopic::Agents,
                NodeTopic::Reply,
            ]
            .map(|kind| coordinator.topics.all_nodes(kind))
            .to_vec();
            filters.extend(coordinator.home_assistant_status_topic());
            // A late last will of an earlier coordinator says `offline`.
            filters.push(coordinator.topics.coordinator_status());
            if let Err(e) = publisher.subscribe(filters) {
                log::error!("cannot subscribe: {e}");
            }
        }
        LinkEvent::Subscribed => {
            coordinator.on_subscribed(now);
            // Answers published while we were away are lost.
            coordinator.resend_turns(None, "reconnected to the broker", now);
            session.announce(coordinator, publisher);
            session.ready.store(true, Ordering::Relaxed);
            log::info!(
                "coordinator ready: API http://{}, generation {}",
                session.api_addr,
                coordinator.generation
            );
            if !session.leadership.shared {
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
            Some((node, NodeTopic::Agents)) => coordinator.on_agents(node, &payload, now),
            Some((node, NodeTopic::Reply)) => coordinator.on_reply(node, &payload, now),
            _ if Some(&topic) == coordinator.home_assistant_status_topic().as_ref() => {
                coordinator.on_home_assistant_status(&payload, now)
            }
            _ if topic == coordinator.topics.coordinator_status() => {
                if &payload[..] == STATUS_OFFLINE.as_bytes()
                    && session.ready.load(Ordering::Relaxed)
                {
                    log::info!("an earlier coordinator's last will said offline: announcing again");
                    session.announce(coordinator, publisher);
                }
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
        let published = if m.batch {
            publisher.publish_batched(m.topic, m.payload, m.expires)
        } else {
            publisher.publish_until(m.topic, m.payload, m.retain, m.expires)
        };
        if let Err(e) = published {
            log::error!("cannot publish: {e}");
        }
    }
}
