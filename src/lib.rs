//! pifleet: a fleet of local LLM agents on Raspberry Pis.
//!
//! * [`protocol`] — the MQTT contract shared by every daemon (and simulators)
//! * [`node`] — the node daemon, one per Pi
//! * [`coordinator`] — places agents, routes chats and jobs, serves the API
//! * [`ollama_sim`] — an Ollama-compatible simulator for tests and demos
//! * [`up`] — a whole fleet on one machine (`pifleet up`)
//! * [`config`] — configuration files, validated with line/column errors
//! * [`mqtt`] — the broker connection (rumqttc) with reconnect and backoff
//! * [`http`], [`metrics`], [`systemd`] — what the daemons share for HTTP,
//!   Prometheus and systemd
//! * [`cli`] — the `pifleet` command line
//! * [`bench`] — `pifleet bench`: benchmarks that start their own fleet
//!
//! [`up`], [`ollama_sim`] and [`bench`] are the developer build's (cargo
//! feature `dev`, on by default); the Pi package leaves them out.
#![forbid(unsafe_code)]

#[cfg(feature = "dev")]
pub mod bench;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod node;
#[cfg(feature = "dev")]
pub mod ollama_sim;
pub mod protocol;
pub mod systemd;
pub mod timing;
#[cfg(feature = "dev")]
pub mod up;
