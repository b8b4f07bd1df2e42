//! `pifleet up`: a whole fleet on one machine in one command, for trying
//! pifleet and for development. It runs
//!
//! * an embedded MQTT broker (rumqttd) on its own thread,
//! * the Ollama simulator, only when no Ollama answers at `--ollama-url`
//!   (and says so loudly),
//! * the coordinator, in this process,
//! * N node daemons as child processes (`pifleet node`), each in its own
//!   process group so that Ctrl-C reaches only `pifleet up`, which stops
//!   them first (SIGTERM), then the coordinator.
//!
//! The broker keeps at most 4 segments of 4 MiB per subscription filter in
//! memory (rumqttd keeps `max_segment_size × max_segment_count`; its default
//! of 100 MB × 10 is sized for servers, not a laptop or a Pi). Production
//! fleets use Mosquitto.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::node::{ollama_url, NodeConfig};
use crate::config::CoordinatorConfig;
use crate::node::ollama::OllamaClient;
use crate::ollama_sim::SimConfig;

/// What `pifleet up` starts (its command-line options).
#[derive(Debug, Clone, clap::Args)]
pub struct UpOptions {
    /// Node daemons to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Agent slots per node.
    #[arg(long, default_value_t = 4)]
    pub capacity: u32,
    /// Coordinator API port on 127.0.0.1.
    #[arg(long, default_value_t = 9470)]
    pub api_port: u16,
    /// Embedded MQTT broker port on 127.0.0.1.
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    /// Use this MQTT broker (HOST:PORT, anonymous access) instead of the
    /// embedded one: dashboards already connected to it see the fleet.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "mqtt_port")]
    pub mqtt: Option<String>,
    /// MQTT topic root of the demo fleet (default: `pifleet` on the
    /// embedded broker, `pifleet-up` on yours, so that the demo never
    /// mixes with a real fleet there).
    #[arg(long)]
    pub topic_root: Option<String>,
    /// Ollama to use; the built-in simulator runs when none answers here.
    #[arg(long, default_value = "http://127.0.0.1:11434")]
    pub ollama_url: String,
    /// Keep the coordinator's store and the node logs here across runs
    /// (default: a temporary directory, removed on exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{what} port {port} is in use ({source}); pick another with {flag}")]
    PortInUse {
        what: &'static str,
        port: u16,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot prepare {path}: {source}")]
    Files {
        path: String,
        source: std::io::Error,
    },
    #[error("the embedded MQTT broker did not start on 127.0.0.1:{0}")]
    Broker(u16),
    #[error("--mqtt {broker}: cannot reach the MQTT broker ({source})")]
    NoBroker {
        broker: String,
        source: std::io::Error,
    },
    #[error("cannot start node {node}: {source}")]
    Spawn {
        node: String,
        source: std::io::Error,
    },
    #[error("Ollama simulator: {0}")]
    Sim(#[from] crate::ollama_sim::SimError),
    #[error("coordinator: {0}")]
    Coordinator(#[from] crate::coordinator::CoordinatorError),
}

fn files_error(path: &Path) -> impl Fn(std::io::Error) -> UpError + '_ {
    move |source| UpError::Files {
        path: path.display().to_string(),
        source,
    }
}

fn check_port(what: &'static str, port: u16, flag: &'static str) -> Result<(), UpError> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|source| UpError::PortInUse {
            what,
            port,
            flag,
            source,
        })
}

/// Starts rumqttd on a thread of its own and waits until it accepts.
async fn start_broker(port: u16) -> Result<(), UpError> {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let server = ServerSettings {
        name: "pifleet-up".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 4 * crate::protocol::DEFAULT_MAX_PAYLOAD_BYTES,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        router: RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 500,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("pifleet-up".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                log::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|_| UpError::Broker(port))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(UpError::Broker(port))
}

struct NodeChild {
    id: String,
    config: PathBuf,
    log: PathBuf,
    child: Child,
    exited: bool,
}

fn spawn_node(id: &str, config: &Path, log: &Path) -> Result<Child, UpError> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|source| UpError::Spawn {
        node: id.to_owned(),
        source,
    })?;
    let log_file = std::fs::File::create(log).map_err(files_error(log))?;
    let log_err = log_file.try_clone().map_err(files_error(log))?;
    Command::new(exe)
        .arg("node")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        // If `up` dies without stopping them (SIGKILL), the nodes notice
        // and stop themselves rather than run on as orphans.
        .env(crate::node::PARENT_PID_ENV, std::process::id().to_string())
        .process_group(0)
        .spawn()
        .map_err(|source| UpError::Spawn {
            node: id.to_owned(),
            source,
        })
}

fn node_toml(id: &str, capacity: u32, broker: &Broker, ollama: &Url) -> String {
    let Broker {
        host,
        port,
        topic_root,
        ..
    } = broker;
    format!(
        "node_id = \"{id}\"\nagent_capacity = {capacity}\nheartbeat_secs = 2\nshutdown_grace_secs = 10\n\
         [mqtt]\nhost = \"{host}\"\nport = {port}\ntopic_root = \"{topic_root}\"\nkeep_alive_secs = 10\n[ollama]\nurl = \"{ollama}\"\nmax_parallel = 2\n\
         [api]\nlisten = \"127.0.0.1:0\"\n"
    )
}

/// The MQTT broker the fleet uses: the embedded one, or the user's.
#[derive(Debug, Clone)]
struct Broker {
    host: String,
    port: u16,
    embedded: bool,
    topic_root: String,
}

impl Broker {
    /// `--mqtt HOST:PORT` (the port defaults to 1883), or the embedded
    /// broker on `--mqtt-port`.
    fn chosen(options: &UpOptions) -> Result<Broker, UpError> {
        let root = |default: &str| {
            let root = options.topic_root.clone().unwrap_or_else(|| default.into());
            crate::protocol::validate_topic_root(&root)
                .map(|_| root)
                .map_err(|e| UpError::Invalid(format!("--topic-root: {e}")))
        };
        let Some(given) = &options.mqtt else {
            return Ok(Broker {
                host: "127.0.0.1".into(),
                port: options.mqtt_port,
                embedded: true,
                topic_root: root("pifleet")?,
            });
        };
        let (host, port) = match given.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                let port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    UpError::Invalid(format!("--mqtt {given}: {port:?} is not a port number"))
                })?;
                (host.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (given.as_str(), 1883),
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(UpError::Invalid(format!(
                "--mqtt {given}: expected HOST:PORT, such as 192.168.1.10:1883"
            )));
        }
        Ok(Broker {
            host: host.to_owned(),
            port,
            embedded: false,
            topic_root: root("pifleet-up")?,
        })
    }

    /// The user's broker must accept connections now.
    fn check_reachable(&self) -> Result<(), UpError> {
        use std::net::ToSocketAddrs;
        let named = format!("{}:{}", self.host, self.port);
        let unreachable = |source| UpError::NoBroker {
            broker: named.clone(),
            source,
        };
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(unreachable)?;
        let mut last = std::io::Error::other("the name has no address");
        for addr in addrs {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                Ok(_) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(unreachable(last))
    }
}

/// Runs the fleet until `shutdown`: checks, broker, Ollama (or the
/// simulator), coordinator, nodes; then watches them and stops them all.
pub async fn run(options: UpOptions, shutdown: CancellationToken) -> Result<(), UpError> {
    let (ollama, broker) = validate(&options)?;
    let data = DataDir::prepare(options.data_dir.clone())?;
    if broker.embedded {
        start_broker(broker.port).await?;
        println!(
            "pifleet up: embedded MQTT broker (rumqttd) on 127.0.0.1:{}",
            broker.port
        );
    } else {
        println!(
            "pifleet up: using the MQTT broker at {}:{}",
            broker.host, broker.port
        );
    }
    let sim_shutdown = CancellationToken::new();
    let (ollama, simulated) = find_ollama(ollama, sim_shutdown.clone()).await?;
    let coordinator_shutdown = CancellationToken::new();
    let coordinator =
        start_coordinator(&options, &broker, &data.path, coordinator_shutdown.clone());
    let mut nodes = start_nodes(&options, &broker, &data.path, &ollama)?;
    let api = format!("http://127.0.0.1:{}", options.api_port);
    let online = wait_for_nodes(&api, options.nodes, Duration::from_secs(30)).await;
    let ready = Ready {
        online,
        api: &api,
        broker: &broker,
        ollama: &ollama,
        simulated,
    };
    print_ready(&options, &ready, &nodes, &data);

    match supervise(shutdown, coordinator, &mut nodes).await {
        Supervised::CoordinatorEnded => {
            stop_nodes(&mut nodes).await;
            sim_shutdown.cancel();
            // Kept, temporary or not: the node logs say what happened.
            println!("pifleet up: logs and store kept in {}", data.path.display());
            return Ok(());
        }
        Supervised::Shutdown(coordinator) => {
            println!(
                "pifleet up: stopping {} nodes, then the coordinator",
                nodes.iter().filter(|n| !n.exited).count()
            );
            stop_nodes(&mut nodes).await;
            coordinator_shutdown.cancel();
            match tokio::time::timeout(Duration::from_secs(10), coordinator).await {
                Ok(Ok(Err(e))) => {
                    println!("pifleet up: the coordinator stopped with an error: {e}")
                }
                Err(_) => println!("pifleet up: the coordinator did not stop within 10s"),
                _ => {}
            }
        }
    }
    sim_shutdown.cancel();
    data.remove_if_temporary();
    println!("pifleet up: stopped");
    Ok(())
}

/// Checks the options; returns the Ollama URL to try and the broker.
fn validate(options: &UpOptions) -> Result<(Url, Broker), UpError> {
    if !(1..=64).contains(&options.nodes) {
        return Err(UpError::Invalid(format!(
            "--nodes must be between 1 and 64 (got {})",
            options.nodes
        )));
    }
    if options.capacity == 0 {
        return Err(UpError::Invalid("--capacity must be at least 1".into()));
    }
    let ollama = ollama_url(options.ollama_url.clone())
        .map_err(|e| UpError::Invalid(format!("--ollama-url: {e}")))?;
    let broker = Broker::chosen(options)?;
    if broker.embedded {
        check_port(
            "MQTT",
            broker.port,
            "--mqtt-port (or use your broker: --mqtt HOST:PORT)",
        )?;
    } else {
        broker.check_reachable()?;
    }
    check_port("API", options.api_port, "--api-port")?;
    Ok((ollama, broker))
}

/// Where the coordinator's store and the node configs and logs live.
struct DataDir {
    path: PathBuf,
    /// Made for this run (no `--data-dir`): removed on exit.
    temporary: bool,
}

impl DataDir {
    fn prepare(chosen: Option<PathBuf>) -> Result<DataDir, UpError> {
        let data = match chosen {
            Some(path) => DataDir {
                path,
                temporary: false,
            },
            None => DataDir {
                path: std::env::temp_dir().join(format!("pifleet-up-{}", std::process::id())),
                temporary: true,
            },
        };
        std::fs::create_dir_all(&data.path).map_err(files_error(&data.path))?;
        Ok(data)
    }

    fn remove_if_temporary(&self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The Ollama at `url` if one answers, else the built-in simulator (said
/// loudly); returns its URL and whether it is the simulator.
async fn find_ollama(url: Url, sim_shutdown: CancellationToken) -> Result<(Url, bool), UpError> {
    let why = match OllamaClient::new(&url).models().await {
        Ok(models) => {
            println!(
                "pifleet up: using the real Ollama at {url} ({} models)",
                models.len()
            );
            return Ok((url, false));
        }
        Err(why) => why,
    };
    let config = SimConfig {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        ..SimConfig::default()
    };
    let listener = crate::ollama_sim::bind(&config).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| UpError::Sim(crate::ollama_sim::SimError::Invalid(e.to_string())))?;
    let router = crate::ollama_sim::router(crate::ollama_sim::Sim::new(config.clone()));
    tokio::spawn(crate::http::serve(listener, router, sim_shutdown));
    let sim = ollama_url(format!("http://{addr}")).expect("a valid URL");
    let banner = "pifleet up: ****************************************************************";
    println!("{banner}");
    println!("pifleet up: NO OLLAMA at {url}: {why}");
    println!("pifleet up: using the built-in Ollama SIMULATOR at {sim}");
    println!(
        "pifleet up: answers are canned; models: {}",
        config.models.join(", ")
    );
    println!("{banner}");
    Ok((sim, true))
}

type CoordinatorTask = tokio::task::JoinHandle<Result<(), crate::coordinator::CoordinatorError>>;

fn start_coordinator(
    options: &UpOptions,
    broker: &Broker,
    data_dir: &Path,
    shutdown: CancellationToken,
) -> CoordinatorTask {
    let mut config = CoordinatorConfig::with_defaults(data_dir.join("coordinator.db"));
    config.mqtt.host = broker.host.clone();
    config.mqtt.port = broker.port;
    config.mqtt.topic_root = broker.topic_root.clone();
    config.api.listen = SocketAddr::from(([127, 0, 0, 1], options.api_port));
    config.timeouts.node_lost_after = Duration::from_secs(20);
    tokio::spawn(crate::coordinator::run(config, shutdown))
}

fn start_nodes(
    options: &UpOptions,
    broker: &Broker,
    data_dir: &Path,
    ollama: &Url,
) -> Result<Vec<NodeChild>, UpError> {
    let nodes_dir = data_dir.join("nodes");
    std::fs::create_dir_all(&nodes_dir).map_err(files_error(&nodes_dir))?;
    let mut nodes = Vec::new();
    for i in 1..=options.nodes {
        let id = format!("up-{i}");
        let config = nodes_dir.join(format!("{id}.toml"));
        let log = nodes_dir.join(format!("{id}.log"));
        let text = node_toml(&id, options.capacity, broker, ollama);
        NodeConfig::parse(&id, &text).map_err(|e| UpError::Invalid(e.to_string()))?;
        std::fs::write(&config, text).map_err(files_error(&config))?;
        let child = spawn_node(&id, &config, &log)?;
        nodes.push(NodeChild {
            id,
            config,
            log,
            child,
            exited: false,
        });
    }
    Ok(nodes)
}

/// What `print_ready` reports.
struct Ready<'a> {
    online: usize,
    api: &'a str,
    broker: &'a Broker,
    ollama: &'a Url,
    simulated: bool,
}

fn print_ready(options: &UpOptions, ready: &Ready, nodes: &[NodeChild], data: &DataDir) {
    let Ready {
        online,
        api,
        broker,
        ollama,
        simulated,
    } = ready;
    println!(
        "pifleet up: fleet is ready ({online}/{} nodes online, {} agent slots each)",
        options.nodes, options.capacity
    );
    println!(
        "  API          {api}   (pifleet status; set PIFLEET_COORDINATOR={api} if not the default)"
    );
    let (host, port, root) = (&broker.host, broker.port, &broker.topic_root);
    println!(
        "  MQTT broker  {host}:{port}{}   (mosquitto_sub -h {host} -p {port} -t '{root}/#' -v)",
        if broker.embedded { "" } else { " (yours)" }
    );
    println!(
        "  Ollama       {ollama}{}",
        if *simulated { "   (SIMULATOR)" } else { "" }
    );
    for n in nodes {
        println!(
            "  node {}    pid {}, log {}",
            n.id,
            n.child.id(),
            n.log.display()
        );
    }
    println!(
        "  data         {}{}",
        data.path.display(),
        if data.temporary {
            " (removed on exit)"
        } else {
            ""
        }
    );
    println!("Try: pifleet spawn alice --model llama3.2 && pifleet chat alice \"hello\" && pifleet status");
    println!("Ctrl-C stops everything.");
}

enum Supervised {
    /// Asked to stop; the coordinator still runs.
    Shutdown(CoordinatorTask),
    /// The coordinator stopped by itself.
    CoordinatorEnded,
}

/// Waits for `shutdown` or the coordinator's end, reporting nodes that exit
/// meanwhile.
async fn supervise(
    shutdown: CancellationToken,
    mut coordinator: CoordinatorTask,
    nodes: &mut [NodeChild],
) -> Supervised {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Supervised::Shutdown(coordinator),
            result = &mut coordinator => {
                let outcome = match result {
                    Ok(Ok(())) => "stopped".to_owned(),
                    Ok(Err(e)) => format!("failed: {e}"),
                    Err(e) => format!("crashed: {e}"),
                };
                println!("pifleet up: the coordinator {outcome}; stopping the fleet");
                return Supervised::CoordinatorEnded;
            }
            _ = tick.tick() => {
                for n in nodes.iter_mut().filter(|n| !n.exited) {
                    if let Ok(Some(status)) = n.child.try_wait() {
                        n.exited = true;
                        println!(
                            "pifleet up: node {} exited ({status}); its agents move to the other nodes. Restart it with: {} node --config {}",
                            n.id,
                            std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "pifleet".into()),
                            n.config.display()
                        );
                    }
                }
            }
        }
    }
}

/// SIGTERM to every node still running, then wait for them (SIGKILL after 15 s).
async fn stop_nodes(nodes: &mut [NodeChild]) {
    for n in nodes.iter().filter(|n| !n.exited) {
        if let Some(pid) = rustix::process::Pid::from_raw(n.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in nodes.iter_mut().filter(|n| !n.exited) {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    println!("pifleet up: node {} did not stop in time; killing it", n.id);
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        n.exited = true;
    }
}

/// Polls the coordinator until `want` nodes are online; returns how many are.
async fn wait_for_nodes(api: &str, want: usize, limit: Duration) -> usize {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + limit;
    let mut online = 0;
    while Instant::now() < deadline {
        if let Ok(response) = client.get(format!("{api}/v1/status")).send().await {
            if let Ok(status) = response.json::<crate::protocol::FleetSummary>().await {
                online = status.nodes_online;
                if online >= want {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    online
}
