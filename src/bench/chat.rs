//! `pifleet bench chat`: seed 000's load test. CONCURRENCY clients post
//! `{agent, messages}` to `/v1/chat` back to back for SECONDS, spread over
//! AGENTS agents. Without `--coordinator` it starts a fleet here: Mosquitto
//! (or `--mqtt`), the Ollama simulator answering at once, the coordinator
//! and NODES node daemons with `ollama.max_parallel` = 100.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{progress, quantile, round3, Api, BenchError, Mqtt, Stack};

#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// Agents the chats are spread over: created for the run (bench-RUN-1..N),
    /// deleted afterwards; no other agent is touched.
    #[arg(long, default_value_t = 1000, value_parser = at_least_1())]
    agents: usize,
    /// Clients chatting at once.
    #[arg(long, default_value_t = 1000, value_parser = at_least_1())]
    concurrency: usize,
    /// How long to chat.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Node daemons to start (without --coordinator).
    #[arg(long, default_value_t = 10, value_parser = at_least_1())]
    nodes: usize,
    /// Use this coordinator (and its fleet) instead of starting one.
    #[arg(long)]
    coordinator: Option<String>,
    /// With --coordinator: yes, create, load and delete agents on that fleet
    /// (its nodes' CPU goes to the benchmark meanwhile).
    #[arg(long)]
    yes: bool,
    /// API token of --coordinator (or PIFLEET_API_TOKEN).
    #[arg(long, env = "PIFLEET_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Use this broker (HOST:PORT) instead of starting Mosquitto.
    #[arg(long)]
    mqtt: Option<String>,
    /// The coordinator it starts keeps its store in this PostgreSQL
    /// database (postgres://…) instead of SQLite.
    #[arg(long, conflicts_with_all = ["coordinator", "openai"])]
    store_url: Option<String>,
    /// With --store-url: commits do not wait for PostgreSQL's WAL flush
    /// (`[store] synchronous_commit = false`; they do by default).
    #[arg(long, requires = "store_url")]
    async_commit: bool,
    /// Model of the agents it creates (with --openai: the model asked for).
    #[arg(long, default_value = "llama3.2")]
    model: String,
    /// Load an OpenAI-compatible endpoint instead (POST URL/chat/completions
    /// with --model), such as the LiteLLM proxy: a peer measured by the
    /// same client (scripts/bench-litellm.sh).
    #[arg(long, conflicts_with_all = ["coordinator", "mqtt", "agents", "nodes"])]
    openai: Option<String>,
    /// Stream the answers (OpenAI's `stream: true` on
    /// `/v1/chat/completions`, for pifleet as for --openai): time to first
    /// token, gaps between chunks, and CPU per streamed token.
    #[arg(long)]
    pub stream: bool,
    /// Tokens a second of the simulator it starts (default: at once).
    #[arg(long)]
    tokens_per_sec: Option<f64>,
    /// Run the coordinator and the nodes it starts from this program, e.g.
    /// the Pi package's build (which has no benchmarks of its own).
    #[arg(long, conflicts_with_all = ["coordinator", "openai"])]
    daemon_binary: Option<std::path::PathBuf>,
}

/// Where the clients send their chats.
#[derive(Clone)]
enum Target {
    /// pifleet's `POST /v1/chat` with `{agent, messages}`, over these agents.
    Fleet(Vec<String>),
    /// `POST /chat/completions` with `{model, messages}`.
    OpenAi(String),
}

impl Target {
    /// Whether a 200 answer carries an answer: a body that does not parse
    /// as one is a failure, whatever its status.
    fn answered(&self, body: &Value) -> bool {
        match self {
            Target::Fleet(_) => body["message"]["content"].is_string(),
            Target::OpenAi(_) => body["choices"][0]["message"]["content"].is_string(),
        }
    }

    /// The path and body of chat number `i`.
    fn request(&self, i: usize) -> (&'static str, Value) {
        let messages = json!([{"role": "user", "content": "Hello! How are you?"}]);
        match self {
            Target::Fleet(names) => (
                "/v1/chat",
                json!({"agent": names[i % names.len()], "messages": messages}),
            ),
            Target::OpenAi(model) => (
                "/chat/completions",
                json!({"model": model, "messages": messages}),
            ),
        }
    }

    fn agents(&self) -> usize {
        match self {
            Target::Fleet(names) => names.len(),
            Target::OpenAi(_) => 0,
        }
    }
}

/// A count of at least 1 (clap refuses 0 with a usage error).
pub fn at_least_1() -> impl clap::builder::TypedValueParser<Value = usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

pub fn parse_mqtt(address: &str) -> Result<Mqtt, BenchError> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| BenchError::new(format!("--mqtt {address:?}: expected HOST:PORT")))?;
    let port = port
        .parse()
        .map_err(|_| BenchError::new(format!("--mqtt {address:?}: {port:?} is not a port")))?;
    Ok(Mqtt {
        host: host.to_owned(),
        port,
    })
}

/// The broker at `address` (HOST:PORT), or a Mosquitto started here.
pub fn broker(stack: &mut Stack, address: Option<&str>) -> Result<Mqtt, BenchError> {
    let mqtt = match address {
        Some(address) => parse_mqtt(address)?,
        None => stack.mosquitto()?,
    };
    progress(format!("broker {}:{}", mqtt.host, mqtt.port));
    Ok(mqtt)
}

/// Starts a broker (unless given), the simulator, the coordinator and
/// `nodes` nodes of `capacity` slots; the API once every node is online.
pub async fn start_fleet(
    stack: &mut Stack,
    mqtt: Option<&str>,
    nodes: usize,
    capacity: u32,
    coordinator_toml: &str,
) -> Result<(Api, u32, Mqtt), BenchError> {
    start_fleet_at(stack, mqtt, nodes, capacity, coordinator_toml, None).await
}

/// [`start_fleet`] with the simulator at `tokens_per_sec` (None: at once).
pub async fn start_fleet_at(
    stack: &mut Stack,
    mqtt: Option<&str>,
    nodes: usize,
    capacity: u32,
    coordinator_toml: &str,
    tokens_per_sec: Option<f64>,
) -> Result<(Api, u32, Mqtt), BenchError> {
    let mqtt = broker(stack, mqtt)?;
    let sim = match tokens_per_sec {
        Some(rate) => stack.simulator_as("ollama-sim", rate)?,
        None => stack.simulator(0)?,
    };
    let (url, pid) = stack.coordinator(&mqtt, coordinator_toml)?;
    progress(format!("coordinator {url} (pid {pid})"));
    for i in 1..=nodes {
        stack.node(&format!("bench-node-{i}"), &mqtt, &sim, capacity, 100)?;
    }
    let api = Api::new(&url, None, 64);
    api.wait_for("every node online", Duration::from_secs(60), |s| {
        s.summary.nodes_online >= nodes
    })
    .await?;
    progress(format!("{nodes} nodes online, {capacity} slots each"));
    Ok((api, pid, mqtt))
}

pub async fn bench(args: &ChatArgs, stack: &mut Stack) -> Result<Value, BenchError> {
    stack.store_url = args.store_url.clone();
    stack.synchronous_commit = !args.async_commit;
    if let (Some(url), false, None) = (&args.coordinator, args.yes, &args.openai) {
        return Err(BenchError::new(format!(
            "bench chat --coordinator {url} creates {} agents on that fleet, loads its nodes for {}s and deletes the agents afterwards; add --yes to go ahead",
            args.agents, args.seconds
        )));
    }
    let api = match (&args.openai, &args.coordinator) {
        (Some(url), _) => Api::new(url, args.token.clone(), args.concurrency),
        (None, Some(url)) => Api::new(url, args.token.clone(), args.concurrency),
        (None, None) => {
            if let Some(binary) = &args.daemon_binary {
                stack.run_daemons_from(binary)?;
            }
            let capacity = args.agents.div_ceil(args.nodes) as u32;
            let mqtt = args.mqtt.as_deref();
            let rate = args.tokens_per_sec;
            let (api, _, _) = start_fleet_at(stack, mqtt, args.nodes, capacity, "", rate).await?;
            Api::new(&api.base, None, args.concurrency)
        }
    };
    // The processes whose CPU a chat or a streamed token costs (those it
    // started: none with --coordinator or --openai but the client).
    let processes = stack.processes();
    let target = match &args.openai {
        Some(url) => {
            progress(format!("{url}/chat/completions, model {}", args.model));
            Target::OpenAi(args.model.clone())
        }
        None => Target::Fleet(agents(&api, args).await?),
    };
    let result = if args.stream {
        let model = match &target {
            Target::Fleet(names) => super::stream::Model::Agents(names.clone()),
            Target::OpenAi(model) => super::stream::Model::One(model.clone()),
        };
        super::stream::load(args.concurrency, args.seconds, &api, model, &processes).await
    } else {
        load(args, &api, &target, &processes).await
    };
    // A fleet this bench did not start keeps nothing of it.
    if let (Some(_), Target::Fleet(names)) = (&args.coordinator, &target) {
        progress(format!("deleting the {} agents of this run", names.len()));
        for name in names {
            api.expect(
                reqwest::Method::DELETE,
                &format!("/v1/agents/{name}"),
                None,
                200,
            )
            .await?;
        }
    }
    result
}

/// The load itself: CONCURRENCY clients for SECONDS; the JSON figures.
async fn load(
    args: &ChatArgs,
    api: &Api,
    target: &Target,
    processes: &[(String, u32)],
) -> Result<Value, BenchError> {
    progress(format!(
        "{} agents; {} clients chat for {}s",
        target.agents(),
        args.concurrency,
        args.seconds
    ));
    let target = Arc::new(target.clone());
    let meter = super::CpuMeter::start(processes)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let clients: Vec<_> = (0..args.concurrency)
        .map(|c| {
            let (api, target) = (api.clone(), target.clone());
            tokio::spawn(client(api, target, c, args.concurrency, deadline))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut first_error = None;
    for c in clients {
        let (ms, failed, error) = c
            .await
            .map_err(|e| BenchError::new(format!("a client failed: {e}")))?;
        latencies.extend(ms);
        errors += failed;
        first_error = first_error.or(error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = meter.finish(latencies.len() as u64, "chat", elapsed)?;
    latencies.sort_by(f64::total_cmp);
    if let Some(e) = &first_error {
        progress(format!("{errors} errors; the first: {e}"));
    }
    let requests = latencies.len() as u64 + errors;
    let mut result = json!({
        "bench": "chat",
        "store": match (&args.store_url, args.async_commit) {
            (None, _) => "sqlite",
            (Some(_), false) => "postgresql",
            (Some(_), true) => "postgresql, synchronous_commit = false",
        },
        "agents": target.agents(),
        "concurrency": args.concurrency,
        "seconds": round3(elapsed),
        "requests": requests,
        "rps": round3(latencies.len() as f64 / elapsed),
        "p50_ms": round3(quantile(&latencies, 0.5)),
        "p99_ms": round3(quantile(&latencies, 0.99)),
        "max_ms": round3(latencies.last().copied().unwrap_or(0.0)),
        "errors": errors,
    });
    if let Some(r) = result.as_object_mut() {
        r.extend(cpu);
    }
    Ok(result)
}

/// The agents of this run, created now as `bench-RUN-1..N` (RUN random):
/// never an agent the bench did not create.
async fn agents(api: &Api, args: &ChatArgs) -> Result<Vec<String>, BenchError> {
    let prefix = format!("bench-{:06x}", rand::random::<u32>() & 0xff_ffff);
    progress(format!(
        "creating {} agents {prefix}-1..{}",
        args.agents, args.agents
    ));
    api.spawn(&prefix, args.agents, &args.model).await?;
    let names: Vec<String> = (1..=args.agents).map(|i| format!("{prefix}-{i}")).collect();
    let start = Instant::now();
    loop {
        let list = api
            .expect(reqwest::Method::GET, "/v1/agents", None, 200)
            .await?;
        let running = list["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "running")
            .filter(|a| {
                a["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("{prefix}-")))
            })
            .count();
        if running == names.len() {
            return Ok(names);
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::new(format!(
                "only {running} of the {} agents run after 120 s",
                names.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One client: chats back to back until `deadline`; latencies in ms, the
/// number of failed chats and the first failure.
async fn client(
    api: Api,
    target: Arc<Target>,
    me: usize,
    clients: usize,
    deadline: Instant,
) -> (Vec<f64>, u64, Option<String>) {
    let mut latencies = Vec::new();
    let (mut errors, mut first) = (0, None);
    let mut i = me;
    while Instant::now() < deadline {
        let (path, body) = target.request(i);
        i += clients;
        let start = Instant::now();
        match api.send(reqwest::Method::POST, path, Some(&body)).await {
            Ok((200, answer)) if target.answered(&answer) => {
                latencies.push(start.elapsed().as_secs_f64() * 1000.0)
            }
            Ok((status, answer)) => {
                errors += 1;
                first.get_or_insert_with(|| format!("{status} {answer}"));
            }
            Err(e) => {
                errors += 1;
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
    (latencies, errors, first)
}
