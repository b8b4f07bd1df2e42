//! `pifleet bench`: benchmarks users can run here or point at their own
//! fleet. Each prints progress on stderr and ends with one line of JSON on
//! stdout (docs/BENCHMARKS.md).
//!
//! * `chat`: many clients chatting with many agents (seed 000's load test)
//! * `failover`: a node killed or frozen; how soon its agents run elsewhere
//! * `placement`: thousands of agents placed on hundreds of simulated nodes
//! * `node-footprint`: memory and CPU of one node daemon, idle and loaded
//! * `takeover`: the leading coordinator killed; how soon another leads

mod chat;
pub mod copies;
mod failover;
pub mod fleet_sim;
mod footprint;
mod placement;
pub mod proxy;
mod stack;
mod stream;
mod takeover;

use std::time::{Duration, Instant};

use serde_json::Value;

pub use stack::{Mqtt, Stack};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BenchError(String);

impl BenchError {
    pub fn new(message: impl Into<String>) -> Self {
        BenchError(message.into())
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Chat load: CONCURRENCY clients chat with AGENTS agents for SECONDS.
    Chat(chat::ChatArgs),
    /// Failover: kill -9 (or SIGSTOP) the node with the most agents and
    /// time until they all run elsewhere.
    Failover(failover::FailoverArgs),
    /// Placement: NODES simulated nodes of CAPACITY slots; time until
    /// NODES × CAPACITY agents created in bulk all run.
    Placement(placement::PlacementArgs),
    /// Node footprint: memory and CPU of one node daemon, idle and with
    /// AGENTS idle agents.
    NodeFootprint(footprint::FootprintArgs),
    /// Takeover: two coordinators on PostgreSQL, the leader killed RUNS
    /// times; how soon the other leads and answers.
    Takeover(takeover::TakeoverArgs),
}

pub async fn run(command: BenchCommand) -> Result<(), BenchError> {
    raise_open_files_limit();
    let mut stack = Stack::new()?;
    let bench = async {
        let result = match command {
            BenchCommand::Chat(args) => chat::bench(&args, &mut stack).await,
            BenchCommand::Failover(args) => failover::bench(&args, &mut stack).await,
            BenchCommand::Placement(args) => placement::bench(&args, &mut stack).await,
            BenchCommand::NodeFootprint(args) => footprint::bench(&args, &mut stack).await,
            BenchCommand::Takeover(args) => takeover::bench(&args, &mut stack).await,
        };
        if result.is_err() {
            // What the processes logged, for finding out why.
            stack.keep_logs();
        }
        result
    };
    // Ctrl-C or SIGTERM: the bench future is dropped, and with it the
    // processes it started (a frozen node is killed, not left stopped).
    let interrupted = crate::systemd::shutdown_on_signals();
    let result = tokio::select! {
        result = bench => result?,
        _ = interrupted.cancelled() => return Err(BenchError::new("interrupted")),
    };
    println!("{result}");
    Ok(())
}

/// Progress on stderr.
pub fn progress(message: impl AsRef<str>) {
    eprintln!("bench: {}", message.as_ref());
}

/// A thousand clients need a thousand sockets: lift the soft limit to the
/// hard one.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            log::debug!("cannot raise the open files limit: {e}");
        }
    }
}

/// The coordinator's HTTP API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    client: reqwest::Client,
    token: Option<String>,
    /// How often [`Api::wait_for`] asks.
    poll: Duration,
}

impl Api {
    pub fn new(base: &str, token: Option<String>, connections: usize) -> Api {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(300))
            .build()
            .expect("a plain HTTP client");
        Api {
            base: base.trim_end_matches('/').to_owned(),
            client,
            token,
            poll: Duration::from_millis(20),
        }
    }

    /// Polls every `poll` in [`Api::wait_for`]: each status of a big fleet
    /// costs the coordinator a copy of every node's report.
    pub fn polling_every(mut self, poll: Duration) -> Api {
        self.poll = poll;
        self
    }

    /// One call: status and JSON body (Null if none).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), BenchError> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| BenchError::new(format!("{}{path}: {e}", self.base)))?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// A POST whose answer is read as it comes (a streamed chat).
    pub async fn post_streamed(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<reqwest::Response, BenchError> {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
            .send()
            .await
            .map_err(|e| BenchError::new(format!("{}{path}: {e}", self.base)))
    }

    /// A call that must answer `want`; its body.
    pub async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        want: u16,
    ) -> Result<Value, BenchError> {
        let (status, answer) = self.send(method.clone(), path, body).await?;
        if status != want {
            return Err(BenchError::new(format!(
                "{method} {path} answered {status}: {answer}"
            )));
        }
        Ok(answer)
    }

    /// A GET answering 200 with the view `T`.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, BenchError> {
        let body = self.expect(reqwest::Method::GET, path, None, 200).await?;
        serde_json::from_value(body).map_err(|e| BenchError::new(format!("GET {path}: {e}")))
    }

    pub async fn status(&self) -> Result<crate::protocol::FleetStatus, BenchError> {
        self.get("/v1/status?limit=0").await
    }

    /// Polls the status until `done` holds or `limit` passes.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&crate::protocol::FleetStatus) -> bool,
    ) -> Result<Duration, BenchError> {
        let start = Instant::now();
        loop {
            if done(&self.status().await?) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                return Err(BenchError::new(format!(
                    "timed out after {}s waiting for {what}",
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Creates `count` agents `PREFIX-1..N` in one request.
    pub async fn spawn(&self, prefix: &str, count: usize, model: &str) -> Result<(), BenchError> {
        let body = serde_json::json!({"count": count, "prefix": prefix, "model": model});
        let answer = self
            .expect(reqwest::Method::POST, "/v1/agents", Some(&body), 200)
            .await?;
        match answer["errors"].as_array() {
            Some(errors) if errors.is_empty() => Ok(()),
            _ => Err(BenchError::new(format!(
                "not every agent was created: {}",
                answer["errors"]
            ))),
        }
    }
}

/// How many of `nodes` list each agent in their capacity reports.
pub fn listings<'a>(
    nodes: impl Iterator<Item = &'a crate::protocol::NodeView>,
) -> std::collections::BTreeMap<&'a str, usize> {
    let mut hosts = std::collections::BTreeMap::new();
    for name in nodes.flat_map(|n| n.capacity.agents.iter().flatten()) {
        *hosts.entry(name.as_str()).or_default() += 1;
    }
    hosts
}

/// What a fresh MQTT session on `mqtt` reads on `filter` for a while:
/// the retained messages replayed, and the messages published meanwhile.
pub struct Traffic {
    pub retained_max: usize,
    pub live_messages: usize,
    pub live_bytes: usize,
}

impl Traffic {
    pub async fn watch(mqtt: &Mqtt, filter: &str, window: Duration) -> Result<Traffic, BenchError> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let id = format!("bench-{}", crate::protocol::new_id());
        let mut options = MqttOptions::new(id, &mqtt.host, mqtt.port);
        options.set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut events) = AsyncClient::new(options, 16);
        let fail = |e: &dyn std::fmt::Display| BenchError::new(format!("reading {filter}: {e}"));
        client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .map_err(|e| fail(&e))?;
        let mut traffic = Traffic {
            retained_max: 0,
            live_messages: 0,
            live_bytes: 0,
        };
        let until = tokio::time::Instant::now() + window;
        while let Ok(event) = tokio::time::timeout_at(until, events.poll()).await {
            match event.map_err(|e| fail(&e))? {
                Event::Incoming(Packet::Publish(p)) if p.retain => {
                    traffic.retained_max = traffic.retained_max.max(p.payload.len());
                }
                Event::Incoming(Packet::Publish(p)) => {
                    traffic.live_messages += 1;
                    traffic.live_bytes += p.payload.len();
                }
                _ => {}
            }
        }
        let _ = client.disconnect().await;
        Ok(traffic)
    }
}

/// Resident memory of process `pid`, in bytes (Linux).
pub fn rss_bytes(pid: u32) -> Result<u64, BenchError> {
    status_bytes(pid, "VmRSS:")
}

/// The part of it that is the process's own (heap, stacks), not pages of
/// its executable and libraries (Linux).
pub fn rss_anon_bytes(pid: u32) -> Result<u64, BenchError> {
    status_bytes(pid, "RssAnon:")
}

/// A `kB` field of `/proc/PID/status`, in bytes. A figure that cannot be
/// read is an error, never a 0 that would pass for a measurement.
fn status_bytes(pid: u32, field: &str) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BenchError::new(format!("cannot read {path}: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| BenchError::new(format!("{path} has no readable {field} field")))
}

/// CPU time (user + system) of process `pid` so far (Linux).
pub fn cpu_time(pid: u32) -> Result<Duration, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BenchError::new(format!("cannot read {path}: {e}")))?;
    // Fields after the command name, which is in parentheses.
    let ticks = text
        .rsplit_once(')')
        .and_then(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .ok_or_else(|| BenchError::new(format!("{path}: no utime and stime fields")))?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// The `q` quantile (0 to 1) of sorted `values`.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Rounds to 3 decimals for the JSON line.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// CPU time of a set of processes over a run, grouped by role: the
/// coordinator, the nodes (`bench-node-N`), the simulator (`ollama-sim`),
/// Mosquitto and this process (the load generator, `client`).
pub struct CpuMeter {
    processes: Vec<(&'static str, u32, Duration)>,
}

impl CpuMeter {
    /// Starts measuring `processes` (name, pid) and this process.
    pub fn start(processes: &[(String, u32)]) -> Result<CpuMeter, BenchError> {
        let me = ("client".to_owned(), std::process::id());
        let processes = processes
            .iter()
            .chain(std::iter::once(&me))
            .map(|(name, pid)| Ok((Self::role(name), *pid, cpu_time(*pid)?)))
            .collect::<Result<_, BenchError>>()?;
        Ok(CpuMeter { processes })
    }

    fn role(name: &str) -> &'static str {
        match name {
            "coordinator" => "coordinator",
            "mosquitto" => "mosquitto",
            "client" => "client",
            n if n.starts_with("bench-node-") => "nodes",
            n if n.starts_with("ollama-sim") => "simulator",
            _ => "other",
        }
    }

    /// `{ROLE}_cpu_us_per_{unit}` for each role, over `count` units (chats,
    /// tokens), and `{ROLE}_cpu_pct` of one core over `seconds`.
    pub fn finish(
        &self,
        count: u64,
        unit: &str,
        seconds: f64,
    ) -> Result<serde_json::Map<String, serde_json::Value>, BenchError> {
        let mut spent: Vec<(&'static str, f64)> = Vec::new();
        for (role, pid, before) in &self.processes {
            let secs = cpu_time(*pid)?.saturating_sub(*before).as_secs_f64();
            match spent.iter_mut().find(|(r, _)| r == role) {
                Some((_, sum)) => *sum += secs,
                None => spent.push((role, secs)),
            }
        }
        let mut figures = serde_json::Map::new();
        for (role, secs) in spent {
            let per = secs * 1e6 / count.max(1) as f64;
            figures.insert(format!("{role}_cpu_us_per_{unit}"), round3(per).into());
            let pct = secs * 100.0 / seconds.max(1e-9);
            figures.insert(format!("{role}_cpu_pct"), round3(pct).into());
        }
        Ok(figures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 51.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&values, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn this_process_has_memory_and_cpu_time_and_a_missing_one_is_an_error() {
        let me = std::process::id();
        let (rss, anon) = (rss_bytes(me).unwrap(), rss_anon_bytes(me).unwrap());
        assert!(rss > 1 << 20);
        assert!(0 < anon && anon < rss);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_time(me).unwrap() > Duration::ZERO);
        // No such process: an error naming the file, not a 0.
        let gone = u32::MAX - 1;
        assert!(rss_bytes(gone).unwrap_err().to_string().contains("/proc/"));
        assert!(cpu_time(gone).is_err());
    }
}
