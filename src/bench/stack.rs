//! The processes a benchmark starts on this machine: a Mosquitto broker (or
//! the user's, with `--mqtt`), the Ollama simulator, the coordinator and node
//! daemons as child processes of this binary, each logging to a file in a
//! temporary directory. Everything is killed and the directory removed when
//! the [`Stack`] is dropped (the directory is kept when the run failed, and
//! its path printed).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;

const START_LIMIT: Duration = Duration::from_secs(30);

pub struct Stack {
    pub dir: PathBuf,
    children: Vec<(String, Child)>,
    keep: bool,
    /// The program the coordinator and the nodes run from (None: this
    /// one), e.g. the Pi package's binary, built without the benchmarks.
    pub daemon_binary: Option<PathBuf>,
    /// A PostgreSQL store for the coordinators (None: SQLite in `dir`).
    pub store_url: Option<String>,
    /// `[store] synchronous_commit` of the coordinator on `store_url`.
    pub synchronous_commit: bool,
}

/// A broker address.
#[derive(Debug, Clone)]
pub struct Mqtt {
    pub host: String,
    pub port: u16,
}

fn free_port() -> Result<u16, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::new(format!("cannot find a free port: {e}")))
}

fn wait_port(port: u16, child: &mut Child, what: &str) -> Result<bool, BenchError> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(status)) = child.try_wait() {
            log::debug!("{what} exited with {status}");
            return Ok(false);
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(BenchError::new(format!("{what} did not open port {port}")))
}

impl Stack {
    pub fn new() -> Result<Stack, BenchError> {
        let dir = std::env::temp_dir().join(format!(
            "pifleet-bench-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::new(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Stack {
            dir,
            children: Vec::new(),
            keep: false,
            daemon_binary: None,
            store_url: None,
            synchronous_commit: true,
        })
    }

    /// Keeps the logs when the run did not succeed.
    pub fn keep_logs(&mut self) {
        self.keep = true;
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf, BenchError> {
        let path = self.dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| BenchError::new(format!("cannot write {}: {e}", path.display())))?;
        Ok(path)
    }

    /// Debian's Mosquitto on a free loopback port, configured as the
    /// Ansible role configures it (`set_tcp_nodelay`), without persistence.
    pub fn mosquitto(&mut self) -> Result<Mqtt, BenchError> {
        let binary = [
            "/usr/sbin/mosquitto",
            "/usr/local/sbin/mosquitto",
            "/usr/bin/mosquitto",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            BenchError::new(
                "mosquitto is not installed (apt-get install mosquitto), or pass --mqtt HOST:PORT",
            )
        })?;
        for _ in 0..10 {
            let port = free_port()?;
            let conf = self.write(
                "mosquitto.conf",
                &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nmax_queued_messages 100000\n"),
            )?;
            let mut child = Command::new(binary)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| BenchError::new(format!("cannot start {binary}: {e}")))?;
            if wait_port(port, &mut child, "mosquitto")? {
                self.children.push(("mosquitto".into(), child));
                return Ok(Mqtt {
                    host: "127.0.0.1".into(),
                    port,
                });
            }
        }
        Err(BenchError::new("could not start mosquitto on a free port"))
    }

    /// Starts `pifleet ARGS` (this binary), logging to `NAME.log`.
    pub fn spawn(&mut self, name: &str, args: &[&str]) -> Result<u32, BenchError> {
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::new(format!("cannot find this program: {e}")))?;
        self.spawn_from(&exe, name, args)
    }

    /// Starts a daemon from `daemon_binary` (or this program).
    fn spawn_daemon(&mut self, name: &str, args: &[&str]) -> Result<u32, BenchError> {
        match self.daemon_binary.clone() {
            Some(exe) => self.spawn_from(&exe, name, args),
            None => self.spawn(name, args),
        }
    }

    /// Sets the program the daemons run from; an error if it is no file.
    pub fn run_daemons_from(&mut self, binary: &Path) -> Result<(), BenchError> {
        if !binary.is_file() {
            return Err(BenchError::new(format!(
                "{}: no such file",
                binary.display()
            )));
        }
        self.daemon_binary = Some(binary.to_owned());
        Ok(())
    }

    /// Starts `EXE ARGS`, logging to `NAME.log`.
    fn spawn_from(&mut self, exe: &Path, name: &str, args: &[&str]) -> Result<u32, BenchError> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .map_err(|e| BenchError::new(format!("cannot create the log of {name}: {e}")))?;
        let err = log
            .try_clone()
            .map_err(|e| BenchError::new(format!("log of {name}: {e}")))?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Readiness is read from info lines, whatever the user's PIFLEET_LOG.
            .env("PIFLEET_LOG", "info")
            .spawn()
            .map_err(|e| BenchError::new(format!("cannot start {name}: {e}")))?;
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    /// Waits for `needle` in `NAME.log`; the rest of that line.
    pub fn wait_log(&mut self, name: &str, needle: &str) -> Result<String, BenchError> {
        let path = self.dir.join(format!("{name}.log"));
        let start = Instant::now();
        while start.elapsed() < START_LIMIT {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(at) = text.find(needle) {
                // Only a whole line: the process may be writing it.
                if let Some((line, _)) = text[at + needle.len()..].split_once('\n') {
                    return Ok(line.to_owned());
                }
            }
            if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name) {
                if let Ok(Some(status)) = child.try_wait() {
                    self.keep = true;
                    return Err(BenchError::new(format!(
                        "{name} exited ({status}); see {}",
                        path.display()
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.keep = true;
        Err(BenchError::new(format!(
            "{name} did not log {needle:?} within {}s; see {}",
            START_LIMIT.as_secs(),
            path.display()
        )))
    }

    /// `pifleet ollama-sim` answering at once (no first-token delay, 100,000
    /// tokens per second); its URL.
    pub fn simulator(&mut self, max_parallel: u32) -> Result<String, BenchError> {
        self.start_simulator("ollama-sim", 100_000.0, max_parallel)
    }

    /// Another simulator, `name`, at `tokens_per_sec` with no parallel limit.
    pub fn simulator_as(&mut self, name: &str, tokens_per_sec: f64) -> Result<String, BenchError> {
        self.start_simulator(name, tokens_per_sec, 0)
    }

    fn start_simulator(
        &mut self,
        name: &str,
        tokens_per_sec: f64,
        max_parallel: u32,
    ) -> Result<String, BenchError> {
        let (limit, rate) = (max_parallel.to_string(), tokens_per_sec.to_string());
        self.spawn(
            name,
            &[
                "ollama-sim",
                "--listen",
                "127.0.0.1:0",
                "--first-token-ms",
                "0",
                "--tokens-per-sec",
                &rate,
                "--max-parallel",
                &limit,
            ],
        )?;
        let url = self.wait_log(name, "listening on ")?;
        Ok(url.trim().to_owned())
    }

    /// The coordinator on `mqtt` with `extra` TOML; its API URL and pid.
    pub fn coordinator(&mut self, mqtt: &Mqtt, extra: &str) -> Result<(String, u32), BenchError> {
        self.coordinator_as("coordinator", mqtt, extra, true)
    }

    /// A coordinator `name` (its log is `NAME.log`); with `until_ready`,
    /// once it leads and is connected, else once it serves its API (a
    /// follower on a shared store).
    pub fn coordinator_as(
        &mut self,
        name: &str,
        mqtt: &Mqtt,
        extra: &str,
        until_ready: bool,
    ) -> Result<(String, u32), BenchError> {
        let store = match &self.store_url {
            Some(url) => format!(
                "[store]\nurl = \"{url}\"\nsynchronous_commit = {}\n[leader]\nid = \"{name}\"\n",
                self.synchronous_commit
            ),
            None => format!(
                "[store]\npath = \"{}\"\n",
                self.dir.join("coordinator.db").display()
            ),
        };
        let config = self.write(
            &format!("{name}.toml"),
            &format!(
                "{extra}\n[mqtt]\nhost = \"{}\"\nport = {}\nmax_payload_bytes = 16777216\n[api]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 67108864\n{store}",
                mqtt.host,
                mqtt.port,
            ),
        )?;
        let config = config.display().to_string();
        let pid = self.spawn_daemon(name, &["coordinator", "--config", &config])?;
        let api = if until_ready {
            let line = self.wait_log(name, "coordinator ready: API ")?;
            line.split(',').next().unwrap_or("").trim().to_owned()
        } else {
            let line = self.wait_log(name, "serving API ")?;
            line.split_whitespace().next().unwrap_or("").to_owned()
        };
        Ok((api, pid))
    }

    /// A node daemon `id` with `capacity` slots and `max_parallel` Ollama
    /// calls at once; its pid once it is ready.
    pub fn node(
        &mut self,
        id: &str,
        mqtt: &Mqtt,
        ollama: &str,
        capacity: u32,
        max_parallel: u32,
    ) -> Result<u32, BenchError> {
        let config = self.write(
            &format!("{id}.toml"),
            &format!(
                "node_id = \"{id}\"\nagent_capacity = {capacity}\n[mqtt]\nhost = \"{}\"\nport = {}\nmax_payload_bytes = 16777216\n[ollama]\nurl = \"{ollama}\"\nmax_parallel = {max_parallel}\n[api]\nlisten = \"127.0.0.1:0\"\n",
                mqtt.host, mqtt.port
            ),
        )?;
        let config = config.display().to_string();
        let pid = self.spawn_daemon(id, &["node", "--config", &config])?;
        self.wait_log(id, &format!("node {id} ready"))?;
        Ok(pid)
    }

    /// How many lines of child `name`'s log contain `needle`.
    pub fn log_count(&self, name: &str, needle: &str) -> usize {
        let path = self.dir.join(format!("{name}.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines().filter(|l| l.contains(needle)).count()
    }

    /// Every child started so far: its name and process id.
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(name, child)| (name.clone(), child.id()))
            .collect()
    }

    /// The process id of child `name`.
    pub fn pid(&self, name: &str) -> Result<u32, BenchError> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, child)| child.id())
            .ok_or_else(|| BenchError::new(format!("no process named {name}")))
    }

    /// Sends `signal` to child `name`.
    pub fn signal(&self, name: &str, signal: rustix::process::Signal) -> Result<(), BenchError> {
        let (_, child) = self
            .children
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| BenchError::new(format!("no process named {name}")))?;
        let pid = rustix::process::Pid::from_raw(child.id() as i32)
            .ok_or_else(|| BenchError::new(format!("{name} has no pid")))?;
        rustix::process::kill_process(pid, signal)
            .map_err(|e| BenchError::new(format!("cannot signal {name}: {e}")))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.keep {
            eprintln!("bench: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
