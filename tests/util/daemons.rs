//! The daemons a test starts: the Ollama simulator, nodes and the coordinator.

use std::path::{Path, PathBuf};

use pifleet::protocol::{
    AgentList, AgentState, AgentView, EventList, FleetStatus, JobList, JobState, JobSubmitted,
    JobView, NodeList, NodeView,
};
use serde_json::Value;

use super::*;

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
        let (status, body) = http_get(&format!("{}/_sim/stats", self.url)).await;
        assert_eq!(status, 200, "GET /_sim/stats: {body}");
        body
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

/// A coordinator process with its config and store in a temp dir. It binds
/// port 0 and reports its address; a restart binds that same port again, so
/// that the URL stays.
pub struct Coordinator {
    pub api: String,
    /// Sent as a bearer token by the helpers below, when set.
    pub token: Option<String>,
    pub proc: Proc,
    pub config: PathBuf,
    pub dir: tempfile::TempDir,
    /// Environment of the process (and of its restarts).
    envs: Vec<(String, String)>,
}

impl Coordinator {
    /// Starts `pifleet coordinator` against `broker`; `extra` TOML is merged
    /// over a config that sets the broker port, the API address and the store.
    pub fn start(broker: &Mosquitto, extra: &str) -> Coordinator {
        Self::start_with_env(broker, extra, &[])
    }

    /// [`Coordinator::start`] with `envs` set (a faked clock...).
    pub fn start_with_env(broker: &Mosquitto, extra: &str, envs: &[(&str, &str)]) -> Coordinator {
        let dir = tempfile::tempdir().expect("temp dir");
        // PIFLEET_TEST_STORE=postgres: the same tests on a PostgreSQL
        // store (scripts/test.sh runs some that way), unless the test
        // chose its store itself.
        let on_postgres = std::env::var("PIFLEET_TEST_STORE").as_deref() == Ok("postgres");
        let store = if on_postgres && !extra.contains("[store]") {
            format!(
                "[store]\nurl = \"{}\"\n[leader]\nid = \"only\"\n",
                super::postgres::database()
            )
        } else {
            format!(
                "[store]\npath = \"{}\"\n",
                dir.path().join("coordinator.db").display()
            )
        };
        let c = Self::start_in(dir, broker, &store, extra, envs);
        if store.contains("[leader]") {
            // Alone on its store: it leads once its lease is free.
            c.proc.wait_for_line("coordinator ready: API http://", WAIT);
        }
        c
    }

    /// A coordinator named `id` on the shared PostgreSQL store at `url`:
    /// it leads or follows ([`Coordinator::proc`]'s log says which).
    pub fn start_shared(broker: &Mosquitto, url: &str, id: &str, extra: &str) -> Coordinator {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = format!("[store]\nurl = \"{url}\"\n[leader]\nid = \"{id}\"\n");
        Self::start_in(dir, broker, &store, extra, &[])
    }

    fn start_in(
        dir: tempfile::TempDir,
        broker: &Mosquitto,
        store: &str,
        extra: &str,
        envs: &[(&str, &str)],
    ) -> Coordinator {
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = dir.path().join("coordinator.toml");
        let base = format!(
            "[mqtt]\nport = {}\nkeep_alive_secs = 5\n[api]\nlisten = \"127.0.0.1:0\"\n{store}[timeouts]\nnode_lost_after_secs = 6\n",
            broker.port,
        );
        let text = merge_toml(&base, extra);
        std::fs::write(&config, &text).expect("write coordinator.toml");
        let (proc, api) = Self::spawn(&config, &envs);
        // Restarts bind the port this start was given.
        let fixed = format!(
            "[api]\nlisten = \"{}\"\n",
            api.trim_start_matches("http://")
        );
        std::fs::write(&config, merge_toml(&text, &fixed)).expect("write coordinator.toml");
        Coordinator {
            api,
            token: None,
            proc,
            config,
            dir,
            envs,
        }
    }

    /// Starts the process; returns it and the API URL it reported (a
    /// coordinator on a shared store reports it before it leads).
    fn spawn(config: &Path, envs: &[(String, String)]) -> (Proc, String) {
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let proc = Proc::spawn(
            "coordinator",
            &["coordinator", "--config", config.to_str().unwrap()],
            &envs,
        );
        let shared = std::fs::read_to_string(config)
            .unwrap()
            .contains("[leader]");
        let api = if shared {
            let line = proc.wait_for_line("serving API http://", WAIT);
            line.split("serving API ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .map(str::to_owned)
        } else {
            let line = proc.wait_for_line("coordinator ready: API http://", WAIT);
            line.split("API ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .map(|s| s.trim().to_owned())
        }
        .expect("api url");
        (proc, api)
    }

    /// Starts it again on the same config and store (after a kill).
    pub fn restart(&mut self) {
        let _ = self.proc.wait_exit(WAIT);
        let (proc, api) = Self::spawn(&self.config, &self.envs);
        assert_eq!(api, self.api, "a restart keeps the API address");
        let text = std::fs::read_to_string(&self.config).unwrap();
        if text.contains("id = \"only\"") {
            // Its own lease, from before the kill, expires first.
            proc.wait_for_line("coordinator ready: API http://", WAIT);
        }
        self.proc = proc;
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

    pub async fn node(&self, name: &str) -> NodeView {
        let (status, body) = self.get(&format!("/v1/nodes/{name}")).await;
        assert_eq!(status, 200, "GET /v1/nodes/{name}: {body}");
        view(&body)
    }

    pub async fn nodes(&self) -> Vec<NodeView> {
        let (status, body) = self.get("/v1/nodes").await;
        assert_eq!(status, 200, "GET /v1/nodes: {body}");
        view::<NodeList>(&body).nodes
    }

    pub async fn job(&self, id: &str) -> JobView {
        let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "GET /v1/jobs/{id}: {body}");
        view(&body)
    }

    /// `GET /v1/jobs?{query}`.
    pub async fn jobs(&self, query: &str) -> Vec<JobView> {
        let (status, body) = self.get(&format!("/v1/jobs?{query}")).await;
        assert_eq!(status, 200, "GET /v1/jobs?{query}: {body}");
        view::<JobList>(&body).jobs
    }

    /// Queues a job; asserts 202 and returns its id.
    pub async fn submit_job(&self, agent: &str, body: Value) -> String {
        let (status, answer) = self.post(&format!("/v1/agents/{agent}/jobs"), body).await;
        assert_eq!(status, 202, "{answer}");
        let submitted: JobSubmitted = view(&answer);
        assert_eq!(submitted.status, JobState::Queued);
        submitted.job_id
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

    /// Events other than agents being created, placed and running and nodes
    /// joining: what a fleet that nothing disturbed does not log.
    pub async fn disruptions(&self) -> Vec<pifleet::protocol::Event> {
        use pifleet::protocol::EventKind::*;
        self.events()
            .await
            .into_iter()
            .filter(|e| !matches!(e.kind, Created | Placed | Running | NodeJoined))
            .collect()
    }

    /// The user messages of `agent`'s history, oldest first, read from the
    /// store at `store` (the coordinator's own record, not its API).
    pub fn stored_user_messages(store: &Path, agent: &str) -> Vec<String> {
        let conn = rusqlite::Connection::open(store).expect("open the store");
        let mut stmt = conn
            .prepare("SELECT content FROM messages WHERE agent = ?1 AND role = 'user' ORDER BY seq")
            .expect("query the history");
        stmt.query_map([agent], |r| r.get::<_, String>(0))
            .expect("read the history")
            .map(|m| m.expect("a message"))
            .collect()
    }

    pub async fn events(&self) -> Vec<pifleet::protocol::Event> {
        let (status, body) = self.get("/v1/events?limit=1000").await;
        assert_eq!(status, 200, "GET /v1/events: {body}");
        let mut events = view::<EventList>(&body).events;
        events.reverse(); // oldest first
        events
    }
}
