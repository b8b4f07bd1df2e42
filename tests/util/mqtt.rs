//! An MQTT client that records what it receives.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::Notify;

use super::*;

/// One message the test client received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub at: Instant,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }

    /// The messages of the payload: each of a batch (a JSON array of turn
    /// commands or results, docs/PROTOCOL.md "Batches"), else the one.
    pub fn each(&self) -> Vec<Value> {
        match self.json() {
            Value::Array(messages) => messages,
            message => vec![message],
        }
    }

    /// The agent acknowledgements a reply carries, `ack` or `ack_batch`:
    /// (command, agent, ok) each; none for another message.
    pub fn acks(&self) -> Vec<(String, String, bool)> {
        let r = self.json();
        let command = r["command"].as_str().unwrap_or("").to_owned();
        let one = |a: &Value| {
            let agent = a["agent"].as_str()?.to_owned();
            Some((command.clone(), agent, a["ok"] == true))
        };
        match r["type"].as_str() {
            Some("ack") => one(&r).into_iter().collect(),
            Some("ack_batch") => r["acks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(one)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// An MQTT client that records every message on its subscriptions.
pub struct Client {
    client: AsyncClient,
    log: Arc<Mutex<Vec<Received>>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects to `broker` and subscribes to `filters` (QoS 1), returning
    /// once the broker acknowledged the subscription.
    pub async fn connect(broker: &Mosquitto, filters: &[&str]) -> Client {
        let mut options = MqttOptions::new(
            format!("test-{}", rand::random::<u32>()),
            "127.0.0.1",
            broker.port,
        );
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(64 * 1024 * 1024, 64 * 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let log = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(Notify::new());
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let (task_log, task_changed) = (log.clone(), changed.clone());
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        task_log.lock().unwrap().push(Received {
                            topic: p.topic,
                            payload: p.payload,
                            retain: p.retain,
                            at: Instant::now(),
                        });
                        task_changed.notify_waiters();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        if !filters.is_empty() {
            for f in filters {
                client
                    .subscribe(*f, QoS::AtLeastOnce)
                    .await
                    .expect("subscribe");
            }
            tokio::time::timeout(WAIT, subscribed_rx)
                .await
                .expect("suback in time")
                .expect("suback");
        }
        Client {
            client,
            log,
            changed,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    pub async fn publish_json(&self, topic: &str, value: &Value) {
        self.publish(topic, serde_json::to_vec(value).unwrap())
            .await;
    }

    pub fn messages(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    pub fn on_topic(&self, topic: &str) -> Vec<Received> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Waits until `find` returns something from the log of messages.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut find: impl FnMut(&[Received]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if let Some(found) = find(&self.log.lock().unwrap()) {
                return found;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let log = self.log.lock().unwrap();
                let tail: Vec<String> = log
                    .iter()
                    .rev()
                    .take(20)
                    .map(|m| format!("{} {}", m.topic, m.text()))
                    .collect();
                panic!("timed out after {timeout:?} waiting for {what}; last messages (newest first):\n{}", tail.join("\n"));
            }
        }
    }

    /// Waits for a message on `topic` whose payload satisfies `pred`.
    pub async fn wait_message(&self, topic: &str, pred: impl Fn(&Received) -> bool) -> Received {
        self.wait_for(&format!("a matching message on {topic}"), WAIT, |log| {
            log.iter().find(|m| m.topic == topic && pred(m)).cloned()
        })
        .await
    }

    /// Waits for the reply to command `id` on node `node`'s reply topic.
    /// (Also one that came in a batch.)
    pub async fn reply(&self, node: &str, id: &str) -> Value {
        let topic = format!("pifleet/nodes/{node}/reply");
        self.wait_for(&format!("reply {id} on {topic}"), WAIT, |log| {
            log.iter()
                .filter(|m| m.topic == topic)
                .flat_map(Received::each)
                .find(|r| r["id"] == id)
        })
        .await
    }

    /// Every reply to command `id`, batched or not.
    pub fn replies(&self, node: &str, id: &str) -> Vec<Value> {
        let topic = format!("pifleet/nodes/{node}/reply");
        self.on_topic(&topic)
            .iter()
            .flat_map(Received::each)
            .filter(|v| v["id"] == id)
            .collect()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}
