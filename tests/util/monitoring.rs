//! The monitoring tools a test runs for real: `mosquitto_sub`, the Home
//! Assistant discovery checker (Python, Jinja2), `promtool` and a Prometheus
//! server (Debian's `prometheus` package) with the shipped config.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is not installed: run the README's test command (scripts/test.sh), which installs it"
    );
    Command::new(name)
}

/// Runs `command` with `stdin` written to it; its output.
fn run_with_stdin(mut command: Command, stdin: &str) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// What is retained on the broker under `filters`, as `mosquitto_sub -v
/// --retained-only` prints it: one `topic payload` per line.
pub fn retained(broker: &Mosquitto, filters: &[&str]) -> String {
    let mut command = tool("mosquitto_sub");
    command.args(["-h", "127.0.0.1", "-p", &broker.port.to_string()]);
    command.args(["-v", "--retained-only", "-W", "2"]);
    for f in filters {
        command.args(["-t", f]);
    }
    let out = command.output().expect("run mosquitto_sub");
    // 27: the -W timeout ran out (nothing more to read); anything else but
    // success means it did not read the broker at all.
    assert!(
        out.status.success() || out.status.code() == Some(27),
        "mosquitto_sub failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 from mosquitto_sub")
}

/// Runs tests/monitoring/check_ha_discovery.py on a retained snapshot; its
/// verdict (`Ok(entities)` or `Err(problems)`).
pub fn check_discovery(snapshot: &str) -> Result<Vec<Value>, String> {
    let mut command = tool("python3");
    command.arg(repo("tests/monitoring/check_ha_discovery.py"));
    let out = run_with_stdin(command, snapshot);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("an entity as JSON"))
        .collect())
}

/// `promtool args...` with `stdin`: exit success and everything it printed.
pub fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut command = tool("promtool");
    command.args(args).current_dir(repo("."));
    let out = run_with_stdin(command, stdin);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A Prometheus server on a free port, running monitoring/prometheus.yml and
/// monitoring/alerts.yml unchanged, with its targets files written by the
/// test. Killed when dropped.
pub struct Prometheus {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it and waits until it is ready (`/-/ready` answers 200: the
    /// port opens before the storage is ready to answer queries).
    pub async fn start(coordinator: &str, nodes: &[&str]) -> Prometheus {
        let prometheus = Self::spawn(coordinator, nodes);
        poll("prometheus to be ready", WAIT, || async {
            let ready = reqwest::get(format!("{}/-/ready", prometheus.url)).await;
            ready.is_ok_and(|r| r.status() == 200).then_some(())
        })
        .await;
        prometheus
    }

    fn spawn(coordinator: &str, nodes: &[&str]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        for file in ["prometheus.yml", "alerts.yml"] {
            std::fs::copy(repo("monitoring").join(file), dir.path().join(file)).unwrap();
        }
        let targets = dir.path().join("targets");
        std::fs::create_dir(&targets).unwrap();
        let hosts = |urls: &[&str]| {
            let hosts: Vec<&str> = urls
                .iter()
                .map(|u| u.trim_start_matches("http://"))
                .collect();
            serde_json::json!([{ "targets": hosts }]).to_string()
        };
        std::fs::write(targets.join("coordinator.json"), hosts(&[coordinator])).unwrap();
        std::fs::write(targets.join("nodes.json"), hosts(nodes)).unwrap();
        for _ in 0..10 {
            let port = free_port();
            let mut child = tool("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn prometheus");
            let url = format!("http://127.0.0.1:{port}");
            let start = Instant::now();
            while start.elapsed() < WAIT {
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!("prometheus exited with {status}; trying another port");
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Prometheus {
                        url,
                        child,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start prometheus on a free port");
    }

    /// The result vector of an instant query (asserting the API said success).
    pub async fn query(&self, promql: &str) -> Vec<Value> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            &[("query", promql)],
        )
        .unwrap();
        let response = reqwest::get(url).await.expect("query prometheus");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 200, "{promql}: {body}");
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `promql` returns at least one series; returns them.
    pub async fn wait_series(&self, promql: &str, timeout: Duration) -> Vec<Value> {
        poll(&format!("a series from {promql}"), timeout, || async {
            let found = self.query(promql).await;
            (!found.is_empty()).then_some(found)
        })
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
