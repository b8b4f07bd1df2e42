//! Test harness: real parts only. A Mosquitto broker on a free port, the
//! `pifleet` binary as real processes (node daemons, the Ollama simulator),
//! an MQTT client that records everything it sees, and waits that end on a
//! condition rather than after a fixed sleep. One file per concern:
//! `broker.rs`, `procs.rs`, `daemons.rs` (simulator, node, coordinator),
//! `mqtt.rs`, `lossy.rs` (a slow, lossy link), `tls.rs` (a CA and certificates by openssl), `monitoring.rs` (mosquitto_sub, promtool, Prometheus); the waits and HTTP helpers are here.

#![allow(dead_code)]

use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::Value;

mod broker;
mod daemons;
mod lossy;
mod monitoring;
mod mqtt;
pub mod postgres;
mod procs;
pub mod tls;

// Each user of the harness (the tests, the benches) takes what it needs.
#[allow(unused_imports)]
pub use {broker::*, daemons::*, lossy::*, monitoring::*, mqtt::*, procs::*};

/// Generous, because CI machines are small and run tests in parallel.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn pifleet_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pifleet")
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The same, for async tests.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `extra` merged over `base`, table by table.
pub fn merge_toml(base: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut table: toml::Table = base.parse().expect("base TOML");
    merge(&mut table, extra.parse().expect("test TOML"));
    toml::to_string(&table).expect("serialise TOML")
}

/// GET returning status and JSON body (Null if not JSON).
pub async fn http_get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// An API answer read as the view it must be.
pub fn view<T: serde::de::DeserializeOwned>(body: &Value) -> T {
    T::deserialize(body)
        .unwrap_or_else(|e| panic!("not a {}: {e}: {body}", std::any::type_name::<T>()))
}

/// Any HTTP call: status and JSON body (Null if not JSON).
pub async fn send(
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls `probe` every 20 ms until it returns something.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
