//! Node footprint benchmark: resident memory of an idle node, the same with
//! 1,000 idle agents assigned, and CPU time per heartbeat. Runs the release
//! `pifleet` binary against a real Mosquitto and the Ollama simulator, reads
//! `/proc/PID/status` and `/proc/PID/stat`, and prints the figures.
//!
//!     cargo bench --bench node_footprint
//!
//! Results are recorded in docs/BENCHMARKS.md.

#[path = "../tests/util/mod.rs"]
mod util;

use std::time::{Duration, Instant};

use serde_json::json;
use util::{Client, Mosquitto, Node, Sim};

const AGENTS: usize = 1000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// User + system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_sec() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0)
}

#[tokio::main]
async fn main() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let node = Node::start(
        "bench-node",
        &broker,
        &sim.url,
        &format!("agent_capacity = {AGENTS}"),
        "",
    );
    let pid = node.proc.pid();
    // Let the first probes and allocations settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_kib(pid);

    // CPU per heartbeat: the harness sets heartbeat_secs = 1.
    let hz = ticks_per_sec();
    let window = Duration::from_secs(30);
    let before = cpu_ticks(pid);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let cpu_secs = (cpu_ticks(pid) - before) as f64 / hz;
    let heartbeats = started.elapsed().as_secs_f64();

    let client = Client::connect(&broker, &["pifleet/nodes/bench-node/reply"]).await;
    for i in 0..AGENTS {
        let command = json!({
            "id": format!("a{i}"), "node": "bench-node", "generation": 1, "type": "assign", "placement": i + 1,
            "agent": {"name": format!("agent-{i:04}"), "model": "llama3.2", "system": "You are a helpful assistant."}
        });
        client
            .publish_json("pifleet/nodes/bench-node/cmd", &command)
            .await;
    }
    client
        .wait_for("1,000 acks", Duration::from_secs(120), |log| {
            (log.iter().filter(|m| m.json()["ok"] == true).count() >= AGENTS).then_some(())
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded = rss_kib(pid);
    let before = cpu_ticks(pid);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let loaded_cpu = (cpu_ticks(pid) - before) as f64 / hz / started.elapsed().as_secs_f64();

    let per_agent = (loaded.saturating_sub(idle)) as f64 * 1024.0 / AGENTS as f64;
    println!(
        "node footprint ({} build, heartbeat every 1 s, Mosquitto on loopback)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  idle RSS:                      {:>8.1} MiB",
        idle as f64 / 1024.0
    );
    println!(
        "  RSS with {AGENTS} idle agents:     {:>8.1} MiB",
        loaded as f64 / 1024.0
    );
    println!("  memory per idle agent:         {:>8.0} bytes", per_agent);
    println!(
        "  CPU per heartbeat (idle):      {:>8.2} ms  ({:.3} % of one core at 1 heartbeat/s)",
        cpu_secs / heartbeats * 1000.0,
        cpu_secs / window.as_secs_f64() * 100.0
    );
    println!(
        "  CPU with {AGENTS} agents, idle:    {:>8.3} % of one core",
        loaded_cpu * 100.0
    );
}
