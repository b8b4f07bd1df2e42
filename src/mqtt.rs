//! The MQTT connection of a daemon (rumqttc, MQTT 3.1.1), shared by the node
//! and the coordinator.
//!
//! Two tasks own the connection:
//!
//! * the **poller** drives rumqttc's event loop without pause (rumqttc only
//!   sends pings and reconnects while polled), turns packets into
//!   [`LinkEvent`]s and, after an error, sleeps with exponential backoff
//!   (rumqttc itself would reconnect in a tight loop);
//! * the **publisher** drains a bounded queue ([`QUEUE_BOUND`]) of
//!   [`Outbound`] requests into the rumqttc client, only while connected: a
//!   request that waited past its expiry (a turn command past its budget)
//!   is dropped, not sent late. rumqttc itself forgets what it held when a
//!   clean session reconnects; the application sends again what is still
//!   due (resent turns, capacity, status).
//!
//! The application never awaits rumqttc: [`Publisher`] only enqueues. That
//! breaks the cycle poller → application → rumqttc request channel → poller
//! that deadlocks a naive rumqttc program under load. The session is clean,
//! so on every [`LinkEvent::Connected`] the application subscribes and
//! announces itself again.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;

mod batches;

/// Capacity of the poller → application channel. The application handles
/// events without awaiting the network, so this only absorbs bursts.
const EVENT_CHANNEL: usize = 4096;
/// The connection is dropped by rumqttc for packets above this multiple of
/// the payload limit; between the two, the application rejects the payload
/// itself and the connection survives.
const TRANSPORT_LIMIT_FACTOR: usize = 4;

/// Requests waiting for the broker, at most: past it, publishing fails with
/// [`PublishError::Full`] (an outage of minutes at a busy coordinator).
pub const QUEUE_BOUND: usize = 8192;

/// What the poller reports to the application.
#[derive(Debug)]
pub enum LinkEvent {
    /// The broker accepted the connection (every ConnAck): subscribe again,
    /// the session is new.
    Connected,
    /// The broker acknowledged a subscription: messages on it now arrive.
    /// Announce yourself only now, or commands sent in reply could be lost.
    Subscribed,
    /// The connection failed or dropped; the link is retrying.
    Disconnected { reason: String },
    /// A message on a subscribed topic. `retain` is set when the broker
    /// replays its stored message on subscription, clear for live messages.
    Message {
        topic: String,
        payload: Bytes,
        retain: bool,
    },
}

/// The last will the broker publishes if the connection dies uncleanly.
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

enum Outbound {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        /// Dropped instead of sent once this passed.
        expires: Option<Instant>,
        /// May travel with others to the same topic in one message (a JSON
        /// array of the payloads), see [`Publisher::publish_batched`].
        batch: bool,
    },
    Subscribe(Vec<String>),
    Disconnect,
}

/// A payload was not sent.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("payload of {size} bytes for {topic} exceeds mqtt.max_payload_bytes ({max})")]
    TooLarge {
        topic: String,
        size: usize,
        max: usize,
    },
    #[error("the MQTT link is closed")]
    Closed,
    #[error("the MQTT publish queue is full ({QUEUE_BOUND} messages wait for the broker)")]
    Full,
}

/// Cheap, cloneable handle that queues messages for the broker (QoS 1).
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Outbound>,
    max_payload: usize,
}

impl Publisher {
    /// Queues a QoS 1 publish; never waits for the network.
    pub fn publish(
        &self,
        topic: String,
        payload: impl Into<Vec<u8>>,
        retain: bool,
    ) -> Result<(), PublishError> {
        self.publish_until(topic, payload, retain, None)
    }

    /// Publishes unless `expires` passes first (while the broker is away):
    /// then the message is dropped, never sent late.
    pub fn publish_until(
        &self,
        topic: String,
        payload: impl Into<Vec<u8>>,
        retain: bool,
        expires: Option<Instant>,
    ) -> Result<(), PublishError> {
        self.publish_as(topic, payload.into(), retain, expires, false)
    }

    /// Publishes a JSON payload (not retained) that may go out in one
    /// message with others to the same topic waiting at the same time: a
    /// JSON array of them, in the order published, within the payload
    /// limit. Nothing waits to fill a batch: under load, what queued while
    /// the last message went out goes as one, in one packet and one
    /// acknowledgement; at rest, every message goes alone as it is. Only
    /// for a receiver that reads such arrays (docs/PROTOCOL.md, "Batches").
    pub fn publish_batched(
        &self,
        topic: String,
        payload: Vec<u8>,
        expires: Option<Instant>,
    ) -> Result<(), PublishError> {
        self.publish_as(topic, payload, false, expires, true)
    }

    fn publish_as(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        expires: Option<Instant>,
        batch: bool,
    ) -> Result<(), PublishError> {
        if payload.len() > self.max_payload {
            return Err(PublishError::TooLarge {
                topic,
                size: payload.len(),
                max: self.max_payload,
            });
        }
        self.enqueue(Outbound::Publish {
            topic,
            payload,
            retain,
            expires,
            batch,
        })
    }

    fn enqueue(&self, request: Outbound) -> Result<(), PublishError> {
        self.tx.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PublishError::Full,
            mpsc::error::TrySendError::Closed(_) => PublishError::Closed,
        })
    }

    /// Queues a QoS 1 subscription to `filters`.
    pub fn subscribe(&self, filters: Vec<String>) -> Result<(), PublishError> {
        self.enqueue(Outbound::Subscribe(filters))
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }
}

/// Cannot set up the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("mqtt.tls_ca_file {0}")]
    CaFile(String),
}

/// A running connection: its publisher, its events and its tasks.
pub struct Link {
    pub publisher: Publisher,
    pub events: mpsc::Receiver<LinkEvent>,
    closing: CancellationToken,
    poller: JoinHandle<()>,
    sender: JoinHandle<()>,
}

impl Link {
    /// Starts connecting to the broker of `config` as `client_id`.
    pub fn start(
        config: &MqttConfig,
        client_id: &str,
        will: Option<Will>,
    ) -> Result<Link, LinkError> {
        let ca = match &config.tls_ca_file {
            Some(ca_file) => Some(read_ca_file(ca_file).map_err(LinkError::CaFile)?),
            None => None,
        };
        let will = will.map(|w| LastWill::new(w.topic, w.payload, QoS::AtLeastOnce, w.retain));
        // The same options for each broker but its address (rumqttc has no
        // setter for it); the first broker's go to the event loop.
        let brokers: Vec<Broker> = config
            .brokers()
            .into_iter()
            .map(|(host, port)| {
                let address = crate::config::address(&host, port);
                Broker {
                    options: options_for(config, client_id, host, port, will.clone(), ca.clone()),
                    address: match &config.tls_ca_file {
                        Some(ca) => format!("{address} (TLS, verified with {})", ca.display()),
                        None => address,
                    },
                }
            })
            .collect();
        let options = brokers[0].options.clone();
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        eventloop.network_options.set_connection_timeout(5);
        // Commands, turns and replies are small packets that someone waits
        // for: Nagle's algorithm would hold each one back until the previous
        // one is acknowledged (40 ms with delayed ACKs) on every hop.
        eventloop.network_options.set_tcp_nodelay(true);

        let (event_tx, events) = mpsc::channel(EVENT_CHANNEL);
        let (tx, rx) = mpsc::channel(QUEUE_BOUND);
        let (connected_tx, connected) = tokio::sync::watch::channel(false);
        let closing = CancellationToken::new();
        let poller = tokio::spawn(poll(
            eventloop,
            event_tx,
            closing.clone(),
            brokers,
            connected_tx,
        ));
        let sender = tokio::spawn(send(client, rx, connected, config.max_payload_bytes));
        Ok(Link {
            publisher: Publisher {
                tx,
                max_payload: config.max_payload_bytes,
            },
            events,
            closing,
            poller,
            sender,
        })
    }

    /// Sends what is queued, disconnects cleanly (so the broker discards the
    /// last will) and stops both tasks, waiting at most `timeout`.
    pub async fn close(self, timeout: Duration) {
        let Link {
            publisher,
            mut events,
            closing,
            mut poller,
            sender,
        } = self;
        let _ = publisher.tx.try_send(Outbound::Disconnect);
        closing.cancel();
        drop(publisher);
        // Keep draining events so the poller never blocks on a full channel.
        let drain = async {
            loop {
                tokio::select! {
                    _ = &mut poller => return,
                    event = events.recv() => if event.is_none() {
                        let _ = (&mut poller).await;
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(timeout, drain).await.is_err() {
            log::warn!("MQTT link did not close within {timeout:?}; dropping it");
            poller.abort();
        }
        sender.abort();
    }
}

async fn send(
    client: AsyncClient,
    mut rx: mpsc::Receiver<Outbound>,
    mut connected: tokio::sync::watch::Receiver<bool>,
    max_payload: usize,
) {
    while let Some(first) = rx.recv().await {
        if matches!(first, Outbound::Disconnect) {
            let _ = client.disconnect().await;
            return;
        }
        // Hold requests while the broker is away: what rumqttc holds is
        // forgotten on a clean reconnect, and what waits here can expire.
        if connected.wait_for(|c| *c).await.is_err() {
            return;
        }
        // What else waits now goes out with it, batched where it may be.
        let mut waiting = vec![first];
        while waiting.len() < DRAIN_AT_ONCE {
            match rx.try_recv() {
                Ok(request) => waiting.push(request),
                Err(_) => break,
            }
        }
        for request in batches::merge(waiting, max_payload, Instant::now()) {
            let result = match request {
                Outbound::Publish {
                    topic,
                    payload,
                    retain,
                    ..
                } => {
                    client
                        .publish(topic, QoS::AtLeastOnce, retain, payload)
                        .await
                }
                Outbound::Subscribe(filters) => {
                    client
                        .subscribe_many(
                            filters
                                .into_iter()
                                .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce)),
                        )
                        .await
                }
                Outbound::Disconnect => {
                    let _ = client.disconnect().await;
                    return;
                }
            };
            if result.is_err() {
                return; // the event loop is gone
            }
        }
    }
}

/// Requests the publisher takes from its queue at once (and merges).
const DRAIN_AT_ONCE: usize = 256;

/// Exponential backoff with jitter: 250 ms doubling up to 1 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    /// Short next to a node's lease (`fence_secs`, 7 s by default), so that
    /// a broker that is back is found again before the lease ends.
    const MAX: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let jitter = rand::random::<f64>() * 0.25 + 0.875;
        base.mul_f64(jitter)
    }
}

/// While the daemon is `away` from the first broker, tries a TCP
/// connection to it every [`PRIMARY_PROBE`] and says when one succeeds.
async fn probe_primary(
    (host, port): (String, u16),
    away: std::sync::Arc<std::sync::atomic::AtomicBool>,
    back: std::sync::Arc<tokio::sync::Notify>,
) {
    loop {
        tokio::time::sleep(PRIMARY_PROBE).await;
        if !away.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
            back.notify_one();
        }
    }
}

/// The connection options of one broker.
fn options_for(
    config: &MqttConfig,
    client_id: &str,
    host: String,
    port: u16,
    will: Option<LastWill>,
    ca: Option<Vec<u8>>,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(config.keep_alive);
    options.set_clean_session(true);
    let transport_limit = config
        .max_payload_bytes
        .saturating_mul(TRANSPORT_LIMIT_FACTOR);
    options.set_max_packet_size(transport_limit, transport_limit);
    options.set_request_channel_capacity(256);
    options.set_inflight(100);
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
    }
    if let Some(will) = will {
        options.set_last_will(will);
    }
    if let Some(ca) = ca {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: None,
        }));
    }
    options
}

/// A broker the link may connect to: its options and its address as logged.
struct Broker {
    options: MqttOptions,
    address: String,
}

/// How often a daemon on another broker than the first checks whether the
/// first is back (docs/HA.md: daemons split across brokers rely on the
/// bridge between them).
const PRIMARY_PROBE: Duration = Duration::from_secs(5);

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls the event loop for ever (rumqttc reconnects at each poll after an
/// error). With several brokers, each failure moves to the next one, and a
/// daemon away from the first moves back to it as soon as it accepts
/// connections again, so that all daemons meet on one broker.
async fn poll(
    mut eventloop: EventLoop,
    events: mpsc::Sender<LinkEvent>,
    closing: CancellationToken,
    brokers: Vec<Broker>,
    connected: tokio::sync::watch::Sender<bool>,
) {
    let mut backoff = Backoff::new();
    let mut failures: u64 = 0;
    let mut current = 0;
    let away = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let primary_back = std::sync::Arc::new(tokio::sync::Notify::new());
    let _probe = (brokers.len() > 1).then(|| {
        AbortOnDrop(tokio::spawn(probe_primary(
            brokers[0].options.broker_address(),
            away.clone(),
            primary_back.clone(),
        )))
    });
    loop {
        let address = &brokers[current].address;
        let event = tokio::select! {
            event = eventloop.poll() => event,
            // (Dropping the poll future is safe here: its connection is
            // dropped too.)
            _ = primary_back.notified(), if current != 0 => {
                log::info!(
                    "MQTT: the first broker {} accepts connections again; moving back to it from {address}",
                    brokers[0].address
                );
                eventloop.clean();
                current = 0;
                away.store(false, std::sync::atomic::Ordering::Relaxed);
                eventloop.mqtt_options = brokers[0].options.clone();
                connected.send_replace(false);
                let reason = "moving back to the first broker".to_owned();
                if events.send(LinkEvent::Disconnected { reason }).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let forward = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected.send_replace(true);
                log::info!("connected to MQTT broker {address}");
                backoff.reset();
                failures = 0;
                Some(LinkEvent::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Some(LinkEvent::Message {
                topic: p.topic,
                payload: p.payload,
                retain: p.retain,
            }),
            Ok(Event::Incoming(Packet::SubAck(_))) => Some(LinkEvent::Subscribed),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => None,
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                connected.send_replace(false);
                if closing.is_cancelled() {
                    return;
                }
                failures += 1;
                let reason = describe(&e);
                if failures == 1 {
                    log::warn!("MQTT broker {address}: {reason}; reconnecting with backoff");
                } else if failures.is_multiple_of(20) {
                    log::warn!("MQTT broker {address} still unreachable after {failures} attempts: {reason}");
                } else {
                    log::debug!("MQTT broker {address}: {reason}");
                }
                if brokers.len() > 1 {
                    current = (current + 1) % brokers.len();
                    away.store(current != 0, std::sync::atomic::Ordering::Relaxed);
                    eventloop.mqtt_options = brokers[current].options.clone();
                    // (At info once per outage: all brokers down must not
                    // fill the journal.)
                    let next = &brokers[current].address;
                    if failures == 1 {
                        log::info!("MQTT: trying broker {next} next");
                    } else {
                        log::debug!("MQTT: trying broker {next} next");
                    }
                }
                let notify = failures == 1;
                let delay = backoff.step();
                if notify
                    && events
                        .send(LinkEvent::Disconnected { reason })
                        .await
                        .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = closing.cancelled() => return,
                }
                None
            }
        };
        if let Some(event) = forward {
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Reads the CA certificates (PEM) a TLS broker is verified with; each
/// must be one rustls accepts as a trust anchor. The error names the file.
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("{shown:?}: cannot read it: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{shown:?}: not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{shown:?}: a certificate in it is not usable as a CA: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{shown:?} holds no certificate (\"-----BEGIN CERTIFICATE-----\")"
        ));
    }
    Ok(pem)
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Tls(tls) => format!(
            "TLS failed: {tls} (is the broker's certificate signed by a CA in mqtt.tls_ca_file, for this host name or address?)"
        ),
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection ({code:?}); check mqtt.username and mqtt.password")
        }
        ConnectionError::Io(io) => format!("connection failed: {io}"),
        ConnectionError::NetworkTimeout => "connection timed out".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.step();
        assert!(first >= Duration::from_millis(218) && first <= Duration::from_millis(282));
        for _ in 0..20 {
            b.step();
        }
        let capped = b.step();
        assert!(capped <= Duration::from_millis(1_125) && capped >= Duration::from_millis(875));
        b.reset();
        assert!(b.step() <= Duration::from_millis(282));
    }
}
