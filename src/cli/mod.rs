//! The `pifleet` command line (clap): daemons, configuration tools and the
//! Ollama simulator. Each command returns a [`Failure`] that `run` turns into
//! a message on stderr and an exit code: 64 (EX_USAGE) for a bad
//! configuration or argument, 1 for anything else.

mod chat_stream;
mod client;
mod config_cmd;
#[cfg(feature = "dev")]
mod dev;

pub use client::{ClientCommand, Connection, JobsCommand};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{CoordinatorConfig, LoadError, NodeConfig};

/// Exit code for a bad configuration or argument (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "pifleet",
    version,
    about = "A fleet of local LLM agents on Raspberry Pis, over MQTT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole fleet on this machine: embedded broker, coordinator, N nodes.
    #[cfg(feature = "dev")]
    Up(crate::up::UpOptions),
    /// Run the node daemon: announce this machine over MQTT and host agents.
    Node {
        /// Node configuration file (TOML).
        #[arg(long, short, default_value = "/etc/pifleet/node.toml")]
        config: PathBuf,
    },
    /// Run the coordinator: place agents, route chats and jobs, serve the API.
    Coordinator {
        /// Coordinator configuration file (TOML).
        #[arg(long, short, default_value = "/etc/pifleet/coordinator.toml")]
        config: PathBuf,
    },
    #[command(flatten)]
    Client(ClientCommand),
    /// The coordinator's store: copy a SQLite store into PostgreSQL.
    Store {
        #[command(subcommand)]
        action: StoreCommand,
    },
    /// Check a configuration file, or print a commented default.
    Config {
        #[command(subcommand)]
        action: ConfigCommand,
    },
    /// Run an Ollama-compatible simulator (for tests, demos and benchmarks).
    #[cfg(feature = "dev")]
    OllamaSim(dev::SimArgs),
    /// Benchmarks: start a fleet here (or use yours) and print one JSON line.
    #[cfg(feature = "dev")]
    Bench {
        #[command(subcommand)]
        command: crate::bench::BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE; report every problem with its line and column.
    Check {
        file: PathBuf,
        /// What the file configures; guessed from its keys when left out.
        #[arg(long)]
        kind: Option<ConfigKind>,
    },
    /// Print a commented default configuration.
    Default { kind: ConfigKind },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a coordinator's SQLite store (agents, histories, jobs, node
    /// flags, counters) into an empty PostgreSQL database, in one
    /// transaction. Stop the coordinator first.
    Migrate {
        /// The SQLite store (`[store] path` of the coordinator).
        #[arg(long, default_value = "/var/lib/pifleet/coordinator.db")]
        from: PathBuf,
        /// The PostgreSQL store, as `[store] url` will name it.
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConfigKind {
    Node,
    Coordinator,
}

/// A command failed: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    /// A runtime error, printed with its chain of causes.
    pub fn runtime(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        Failure { code: 1, message }
    }
}

/// An unreadable or invalid configuration is a usage error.
impl From<LoadError> for Failure {
    fn from(e: LoadError) -> Self {
        Failure::usage(e.to_string())
    }
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let outcome = match cli.command {
        #[cfg(feature = "dev")]
        Command::Up(options) => run_daemon(|shutdown| crate::up::run(options, shutdown)),
        Command::Node { config } => run_node(config),
        Command::Coordinator { config } => run_coordinator(config),
        Command::Config { action } => config_cmd::run(action),
        Command::Store { action } => config_cmd::store(action),
        #[cfg(feature = "dev")]
        Command::OllamaSim(args) => dev::run_sim(args),
        Command::Client(command) => client::run(command),
        #[cfg(feature = "dev")]
        Command::Bench { command } => dev::run_bench(command),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            for line in failure.message.lines() {
                eprintln!("pifleet: {line}");
            }
            ExitCode::from(failure.code)
        }
    }
}

/// Runs a daemon to completion on a tokio runtime with two workers (plenty
/// on a Pi, where Ollama does the heavy lifting), with SIGTERM and SIGINT as
/// its shutdown trigger.
pub(crate) fn run_daemon<F, E>(daemon: impl FnOnce(CancellationToken) -> F) -> Result<(), Failure>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: Into<Failure>,
{
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(2);
    run_on(runtime, daemon)
}

/// [`run_daemon`] on one thread: the node daemon, whose work is waiting
/// on its broker and its Ollama. Two workers cost it a wake-up of the other
/// thread (a futex and a context switch) for most tasks it spawns, for no
/// gain: measured in docs/BENCHMARKS.md ("Cheaper chats").
pub(crate) fn run_single_threaded<F, E>(
    daemon: impl FnOnce(CancellationToken) -> F,
) -> Result<(), Failure>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: Into<Failure>,
{
    run_on(tokio::runtime::Builder::new_current_thread(), daemon)
}

fn run_on<F, E>(
    mut runtime: tokio::runtime::Builder,
    daemon: impl FnOnce(CancellationToken) -> F,
) -> Result<(), Failure>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: Into<Failure>,
{
    runtime
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(&e))?
        .block_on(async {
            daemon(crate::systemd::shutdown_on_signals())
                .await
                .map_err(Into::into)
        })
}

macro_rules! runtime_failure {
    ($($error:ty),*) => {$(
        impl From<$error> for Failure {
            fn from(e: $error) -> Self {
                Failure::runtime(&e)
            }
        }
    )*};
}

runtime_failure!(crate::node::NodeError, crate::coordinator::CoordinatorError);

fn run_node(path: PathBuf) -> Result<(), Failure> {
    let config = NodeConfig::load(&path)?;
    run_single_threaded(|shutdown| crate::node::run(config, shutdown))
}

fn run_coordinator(path: PathBuf) -> Result<(), Failure> {
    let config = CoordinatorConfig::load(&path)?;
    run_daemon(|shutdown| crate::coordinator::run(config, shutdown))
}
