//! One integration-test binary (ripgrep's layout): shared harness in `util`,
//! one module per component.

mod util;

mod cli;
mod coordinator;
mod failover;
mod faults;
mod ha;
mod models;
mod monitoring;
mod nemesis;
mod node;
mod ollama_sim;
mod scale;
mod streaming;
mod takeover;
mod tls;
mod up;
