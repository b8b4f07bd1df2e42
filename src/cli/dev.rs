//! The developer build's commands (cargo feature `dev`, on by default):
//! `pifleet up`, `pifleet ollama-sim` and `pifleet bench`. The Pi package is
//! built without them (`--no-default-features`): see scripts/package-deb.sh.

use std::net::SocketAddr;
use std::time::Duration;

use super::{run_daemon, Failure};
use crate::ollama_sim::{SimConfig, DEFAULT_MODELS};

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:11434")]
    listen: SocketAddr,
    /// Models it has, comma separated (a name without a tag means :latest).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_MODELS.map(String::from))]
    models: Vec<String>,
    /// Generation speed.
    #[arg(long, default_value_t = 100.0)]
    tokens_per_sec: f64,
    /// Latency before the first token, in milliseconds.
    #[arg(long, default_value_t = 50)]
    first_token_ms: u64,
    /// Probability (0 to 1) that a generation fails with HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Generations at once beyond which it answers 503 "server busy"; 0 = no limit.
    #[arg(long, default_value_t = 0)]
    max_parallel: u32,
    /// Seed for the failure dice, for repeatable runs.
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds a model pull (`/api/pull`) takes, progress reported along.
    #[arg(long, default_value_t = 0.0)]
    pull_secs: f64,
    /// Models whose pull fails (as a model missing from the library does),
    /// comma separated.
    #[arg(long, value_delimiter = ',')]
    pull_fail: Vec<String>,
}

/// A benchmark on a runtime with a worker per core: the load generator must
/// not be what limits the figures.
pub(super) fn run_bench(command: crate::bench::BenchCommand) -> Result<(), Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(&e))?
        .block_on(crate::bench::run(command))
        .map_err(|e| Failure::runtime(&e))
}

impl From<crate::ollama_sim::SimError> for Failure {
    fn from(e: crate::ollama_sim::SimError) -> Self {
        Failure::runtime(&e)
    }
}

impl From<crate::up::UpError> for Failure {
    fn from(e: crate::up::UpError) -> Self {
        match e {
            crate::up::UpError::Invalid(_) | crate::up::UpError::PortInUse { .. } => {
                Failure::usage(e.to_string())
            }
            other => Failure::runtime(&other),
        }
    }
}

pub(super) fn run_sim(args: SimArgs) -> Result<(), Failure> {
    let config = SimConfig {
        listen: args.listen,
        models: args.models,
        tokens_per_sec: args.tokens_per_sec,
        first_token: Duration::from_millis(args.first_token_ms),
        failure_rate: args.failure_rate,
        max_parallel: args.max_parallel,
        seed: args.seed,
        pull_secs: args.pull_secs,
        pull_fail: args.pull_fail,
    };
    config
        .validate()
        .map_err(|e| Failure::usage(e.to_string()))?;
    run_daemon(|shutdown| crate::ollama_sim::run(config, shutdown))
}
