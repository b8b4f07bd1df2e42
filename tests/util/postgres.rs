//! A private PostgreSQL for tests: Debian's `postgresql` package, one
//! cluster per test process in a directory of its own, on a free loopback
//! port, run as the `postgres` user when the tests run as root. It stops
//! when the test process ends (parent-death signal). Each test takes a
//! database of its own ([`database`]).
//!
//! Also compiled into the unit tests (`#[path]`), so it uses nothing of
//! the integration tests' helpers.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub port: u16,
    bin: PathBuf,
    /// Where its socket, data and log are.
    pub dir: PathBuf,
    /// The server, killed by the kernel when this process ends.
    _server: Mutex<Child>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The process's cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(start_in_own_thread) {
        Ok(c) => c,
        Err(e) => panic!("cannot start PostgreSQL for the tests: {e} (scripts/test.sh installs Debian's postgresql)"),
    }
}

/// A new, empty database of the process's cluster: its URL.
pub fn database() -> String {
    let c = cluster();
    let name = format!("t{}", DATABASES.fetch_add(1, Ordering::Relaxed));
    let out = Command::new(c.bin.join("createdb"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.port.to_string(),
            "-U",
            "postgres",
            &name,
        ])
        .output()
        .expect("run createdb");
    assert!(
        out.status.success(),
        "createdb {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.url(&name)
}

impl Cluster {
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `sql` with psql on `database`; its output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", database, "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// The parent-death signal fires when the *thread* that started the child
/// ends: the server is started from a thread that never does.
fn start_in_own_thread() -> Result<Cluster, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("test-postgres".into())
        .spawn(move || {
            let _ = tx.send(start());
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())?
}

fn bin_dir() -> Result<PathBuf, String> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("/usr/lib/postgresql: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin/initdb".into())
}

/// The `postgres` user's uid and gid, when this process is root.
fn postgres_user() -> Result<Option<(u32, u32)>, String> {
    if !rustix::process::getuid().is_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .map(|f| Ok(Some((f[2].parse().unwrap_or(0), f[3].parse().unwrap_or(0)))))
        .unwrap_or_else(|| Err("no postgres user in /etc/passwd".into()))
}

/// Removes the directories of earlier test processes that are gone.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("pifleet-test-pg-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn as_user(command: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command
}

fn start() -> Result<Cluster, String> {
    remove_stale();
    let bin = bin_dir()?;
    let user = postgres_user()?;
    let dir = std::env::temp_dir().join(format!("pifleet-test-pg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    }
    let data = dir.join("data");
    let init = as_user(&mut Command::new(bin.join("initdb")), user)
        .args(["-D"])
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !init.status.success() {
        return Err(format!("initdb: {}", String::from_utf8_lossy(&init.stderr)));
    }
    let mut last = String::new();
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join(format!("server-{port}.log")))
            .map_err(|e| e.to_string())?;
        // setpriv (util-linux) switches to the postgres user and asks the
        // kernel to stop the server (SIGQUIT: immediate shutdown) when
        // this process ends.
        let mut server = Command::new("setpriv");
        server.args(["--pdeathsig", "QUIT"]);
        if let Some((uid, gid)) = user {
            server.args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &gid.to_string(),
                "--clear-groups",
            ]);
        }
        server
            .arg("--")
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let mut child = server.spawn().map_err(|e| format!("postgres: {e}"))?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = child.try_wait() {
                last = format!(
                    "postgres on port {port} exited ({status}); see {}",
                    dir.display()
                );
                break;
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(Cluster {
                    port,
                    bin,
                    dir,
                    _server: Mutex::new(child),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        if last.is_empty() {
            last = format!("postgres on port {port} not ready within 30 s");
        }
    }
    Err(last)
}
