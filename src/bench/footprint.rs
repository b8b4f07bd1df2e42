//! `pifleet bench node-footprint`: one real node daemon process (release or
//! not, whatever this binary is) on Mosquitto (or `--mqtt`) with the Ollama
//! simulator and a coordinator. Measured from `/proc`: its resident memory
//! idle (and the anonymous part of it: heap and stacks, without the pages
//! of the executable), its CPU use idle over SECONDS (heartbeats and probes
//! only), then the same with AGENTS idle agents placed on it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::chat::{at_least_1, start_fleet};
use super::{cpu_time, progress, round3, rss_anon_bytes, rss_bytes, BenchError, Stack};

#[derive(Debug, clap::Args)]
pub struct FootprintArgs {
    /// Idle agents placed on the node for the second measurement.
    #[arg(long, default_value_t = 1000, value_parser = at_least_1())]
    agents: usize,
    /// How long each CPU measurement lasts.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Use this broker (HOST:PORT) instead of starting Mosquitto.
    #[arg(long)]
    mqtt: Option<String>,
    /// Run the node (and the coordinator) from this program, e.g. the Pi
    /// package's binary, built without the benchmarks.
    #[arg(long)]
    node_binary: Option<std::path::PathBuf>,
}

/// Share of one core `pid` used over `window`.
async fn cpu_pct(pid: u32, window: Duration) -> Result<f64, BenchError> {
    let (before, start) = (cpu_time(pid)?, Instant::now());
    tokio::time::sleep(window).await;
    let used = cpu_time(pid)?.saturating_sub(before);
    Ok(used.as_secs_f64() / start.elapsed().as_secs_f64() * 100.0)
}

pub async fn bench(args: &FootprintArgs, stack: &mut Stack) -> Result<Value, BenchError> {
    let capacity = u32::try_from(args.agents)
        .map_err(|_| BenchError::new(format!("--agents {} is too many", args.agents)))?;
    if let Some(binary) = &args.node_binary {
        stack.run_daemons_from(binary)?;
    }
    let (api, _, _) = start_fleet(stack, args.mqtt.as_deref(), 1, capacity, "").await?;
    let node = stack.pid("bench-node-1")?;
    // Let the first probes and allocations settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_idle, anon_idle) = (rss_bytes(node)?, rss_anon_bytes(node)?);
    let window = Duration::from_secs(args.seconds);
    progress(format!(
        "node idle: {:.1} MiB; measuring its CPU for {}s",
        rss_idle as f64 / 1048576.0,
        args.seconds
    ));
    let cpu_idle = cpu_pct(node, window).await?;

    api.spawn("fp", args.agents, "llama3.2").await?;
    let want = args.agents;
    api.wait_for("the agents to run", Duration::from_secs(120), |s| {
        s.summary.agents_running >= want
    })
    .await?;
    // A heartbeat later, the full agent list has been announced too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_loaded, anon_loaded) = (rss_bytes(node)?, rss_anon_bytes(node)?);
    progress(format!(
        "{} agents: {:.1} MiB; measuring its CPU for {}s",
        args.agents,
        rss_loaded as f64 / 1048576.0,
        args.seconds
    ));
    let cpu_loaded = cpu_pct(node, window).await?;
    // The node's own memory: total RSS also moves with pages of the
    // executable and libraries touched for the first time.
    let node_binary = match &args.node_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| BenchError::new(format!("cannot find this program: {e}")))?,
    };
    let binary_bytes = std::fs::metadata(&node_binary)
        .map_err(|e| BenchError::new(format!("{}: {e}", node_binary.display())))?
        .len();
    let per_agent = anon_loaded.saturating_sub(anon_idle) / args.agents as u64;
    Ok(json!({
        "bench": "node-footprint",
        // The build of the node measured: this program's, or unknown when
        // --node-binary named another.
        "build": match &args.node_binary {
            Some(_) => "given",
            None if cfg!(debug_assertions) => "debug",
            None => "release",
        },
        "node_binary": node_binary.display().to_string(),
        "node_binary_bytes": binary_bytes,
        "heartbeat_secs": crate::config::NodeConfig::with_defaults("x", 1).heartbeat.as_secs(),
        "agents": args.agents,
        "rss_idle_bytes": rss_idle,
        "rss_with_agents_bytes": rss_loaded,
        "rss_anon_idle_bytes": anon_idle,
        "rss_anon_with_agents_bytes": anon_loaded,
        "rss_per_agent_bytes": per_agent,
        "cpu_pct_idle": round3(cpu_idle),
        "cpu_pct_with_agents": round3(cpu_loaded),
    }))
}
