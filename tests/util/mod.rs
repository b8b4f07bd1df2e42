//! Test harness: real parts only. A Mosquitto broker on a free port, the
//! `pifleet` binary as real processes (node daemons, the Ollama simulator),
//! an MQTT client that records everything it sees, and waits that end on a
//! condition rather than after a fixed sleep.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pifleet::protocol::{AgentList, AgentState, AgentView, EventList, FleetStatus};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::Notify;

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

fn mosquitto_binary() -> PathBuf {
    if let Ok(path) = std::env::var("PIFLEET_TEST_MOSQUITTO") {
        return PathBuf::from(path);
    }
    for candidate in [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("mosquitto is not installed: run the README's test command (scripts/test.sh), which installs it");
}

/// A Mosquitto broker of this test, killed when dropped.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        for _ in 0..10 {
            let port = free_port();
            if let Some(child) = Self::spawn(dir.path(), port) {
                return Mosquitto { port, dir, child };
            }
        }
        panic!("could not start mosquitto on a free port");
    }

    fn spawn(dir: &Path, port: u16) -> Option<Child> {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"),
        )
        .expect("write mosquitto.conf");
        let mut child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return None; // exited: the port was taken meanwhile
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(child);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Stops the broker (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.restart_after(Duration::ZERO);
    }

    /// Kills the broker, leaves the port closed for `down`, starts it again.
    pub fn restart_after(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = Self::spawn(self.dir.path(), self.port) {
                self.child = child;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not restart on port {}",
                self.port
            );
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A `pifleet` process whose stdout and stderr lines are recorded.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Lines>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut command = Command::new(pifleet_bin());
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PIFLEET_LOG", "debug");
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn pifleet");
        let lines = Arc::new(Lines::default());
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, label) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, "out"),
            (Box::new(stderr), "err"),
        ] {
            let lines = lines.clone();
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("PIFLEET_TEST_ECHO").is_some() {
                        eprintln!("[{name} {label}] {line}");
                    }
                    lines.lines.lock().unwrap().push(line);
                    lines.changed.notify_all();
                }
            });
        }
        Proc {
            name: name.to_owned(),
            child,
            lines,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line so far, stdout and stderr interleaved.
    pub fn output(&self) -> Vec<String> {
        self.lines.lines.lock().unwrap().clone()
    }

    pub fn count_lines(&self, needle: &str) -> usize {
        self.output().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for a line containing `needle` and returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{} printed no line containing {needle:?} within {timeout:?}; output:\n{}",
                self.name,
                lines.join("\n")
            );
            lines = self
                .lines
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; output:\n{}",
                self.name,
                self.output().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pifleet ollama-sim` on a free port.
pub struct Sim {
    pub url: String,
    pub proc: Proc,
}

impl Sim {
    pub fn start(args: &[&str]) -> Sim {
        let mut all = vec!["ollama-sim", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let proc = Proc::spawn("ollama-sim", &all, &[]);
        let line = proc.wait_for_line("listening on http://", WAIT);
        let url = line
            .split("listening on ")
            .nth(1)
            .expect("url")
            .trim()
            .to_owned();
        Sim { url, proc }
    }

    /// The simulator's own counters (`GET /_sim/stats`).
    pub async fn stats(&self) -> Value {
        reqwest::get(format!("{}/_sim/stats", self.url))
            .await
            .expect("sim stats")
            .json()
            .await
            .expect("sim stats json")
    }
}

/// A node daemon process with its config in a temp dir.
pub struct Node {
    pub id: String,
    pub api: String,
    pub proc: Proc,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts `pifleet node` against `broker` and waits until it is ready.
    /// The config sets the id, a 1 s heartbeat, the broker port, a 5 s
    /// keep-alive, the Ollama URL and a free API port; `top` (top-level keys)
    /// and `sections` (tables) are merged over it.
    pub fn start(
        id: &str,
        broker: &Mosquitto,
        ollama_url: &str,
        top: &str,
        sections: &str,
    ) -> Node {
        Self::start_with_env(id, broker, ollama_url, top, sections, &[])
    }

    pub fn start_with_env(
        id: &str,
        broker: &Mosquitto,
        ollama_url: &str,
        top: &str,
        sections: &str,
        envs: &[(&str, &str)],
    ) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("node.toml");
        let base = format!(
            "node_id = \"{id}\"\nheartbeat_secs = 1\n[mqtt]\nport = {}\nkeep_alive_secs = 5\n[ollama]\nurl = \"{ollama_url}\"\n[api]\nlisten = \"127.0.0.1:0\"\n",
            broker.port
        );
        let extra = format!("{top}\n{sections}\n");
        std::fs::write(&config, merge_toml(&base, &extra)).expect("write node.toml");
        let proc = Proc::spawn(id, &["node", "--config", config.to_str().unwrap()], envs);
        let line = proc.wait_for_line("API http://", WAIT);
        let api = line
            .split("API ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .expect("api url")
            .to_owned();
        proc.wait_for_line(&format!("node {id} ready"), WAIT);
        Node {
            id: id.to_owned(),
            api,
            proc,
            config,
            _dir: dir,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http_get(&format!("{}{path}", self.api)).await
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
    pub async fn reply(&self, node: &str, id: &str) -> Value {
        let topic = format!("pifleet/nodes/{node}/reply");
        self.wait_message(&topic, |m| m.json()["id"] == id)
            .await
            .json()
    }

    pub fn replies(&self, node: &str, id: &str) -> Vec<Value> {
        let topic = format!("pifleet/nodes/{node}/reply");
        self.on_topic(&topic)
            .iter()
            .map(Received::json)
            .filter(|v| v["id"] == id)
            .collect()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A coordinator process with its config and store in a temp dir. The API
/// port is fixed at the first start so that a restart keeps the URL.
pub struct Coordinator {
    pub api: String,
    /// Sent as a bearer token by the helpers below, when set.
    pub token: Option<String>,
    pub proc: Proc,
    pub config: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts `pifleet coordinator` against `broker`; `extra` TOML is merged
    /// over a config that sets the broker port, the API address and the store.
    pub fn start(broker: &Mosquitto, extra: &str) -> Coordinator {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("coordinator.toml");
        let port = free_port();
        let base = format!(
            "[mqtt]\nport = {}\nkeep_alive_secs = 5\n[api]\nlisten = \"127.0.0.1:{port}\"\n[store]\npath = \"{}\"\n[timeouts]\nnode_lost_after_secs = 6\n",
            broker.port,
            dir.path().join("coordinator.db").display()
        );
        std::fs::write(&config, merge_toml(&base, extra)).expect("write coordinator.toml");
        let proc = Self::spawn(&config);
        Coordinator {
            api: format!("http://127.0.0.1:{port}"),
            token: None,
            proc,
            config,
            dir,
        }
    }

    fn spawn(config: &Path) -> Proc {
        let proc = Proc::spawn(
            "coordinator",
            &["coordinator", "--config", config.to_str().unwrap()],
            &[],
        );
        proc.wait_for_line("coordinator ready", WAIT);
        proc
    }

    /// Starts it again on the same config and store (after a kill).
    pub fn restart(&mut self) {
        let _ = self.proc.wait_exit(WAIT);
        self.proc = Self::spawn(&self.config);
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        send(
            method,
            &format!("{}{path}", self.api),
            body,
            self.token.as_deref(),
        )
        .await
    }

    pub async fn spawn_agent(&self, name: &str, model: &str) -> Value {
        let (status, body) = self.post("/v1/agents", serde_json::json!({"name": name, "model": model, "system": format!("You are {name}.")})).await;
        assert_eq!(status, 201, "spawn {name}: {body}");
        body
    }

    pub async fn agents(&self) -> Vec<AgentView> {
        let (status, body) = self.get("/v1/agents").await;
        assert_eq!(status, 200, "{body}");
        view::<AgentList>(&body).agents
    }

    pub async fn status(&self) -> FleetStatus {
        let (status, body) = self.get("/v1/status").await;
        assert_eq!(status, 200, "{body}");
        view(&body)
    }

    pub async fn agent(&self, name: &str) -> AgentView {
        let (status, body) = self.get(&format!("/v1/agents/{name}")).await;
        assert_eq!(status, 200, "GET /v1/agents/{name}: {body}");
        view(&body)
    }

    /// Agents running, per node.
    pub async fn placement(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut by_node: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for a in self.agents().await {
            if a.state == AgentState::Running {
                let node = a.node.expect("a running agent has a node");
                by_node.entry(node).or_default().push(a.name);
            }
        }
        by_node
    }

    pub async fn wait_nodes_online(&self, n: u64) {
        wait_until_async(&format!("{n} nodes online"), WAIT, || async {
            self.status().await.summary.nodes_online as u64 == n
        })
        .await;
    }

    pub async fn wait_running(&self, n: usize) {
        wait_until_async(&format!("{n} agents running"), WAIT, || async {
            self.agents()
                .await
                .iter()
                .filter(|a| a.state == AgentState::Running)
                .count()
                == n
        })
        .await;
    }

    pub async fn events(&self) -> Vec<pifleet::protocol::Event> {
        let (status, body) = self.get("/v1/events?limit=1000").await;
        assert_eq!(status, 200, "GET /v1/events: {body}");
        let mut events = view::<EventList>(&body).events;
        events.reverse(); // oldest first
        events
    }
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
