//! `pifleet config check FILE` and `pifleet config default KIND`.

use std::path::Path;

use super::{ConfigCommand, ConfigKind, Failure, StoreCommand};
use crate::config::coordinator::DEFAULT_COORDINATOR_CONFIG;
use crate::config::node::DEFAULT_NODE_CONFIG;
use crate::config::{CoordinatorConfig, NodeConfig};
use crate::coordinator::store::Store;

pub fn run(action: ConfigCommand) -> Result<(), Failure> {
    match action {
        ConfigCommand::Check { file, kind } => check(&file, kind),
        ConfigCommand::Default { kind } => {
            print!("{}", default_text(kind));
            Ok(())
        }
    }
}

/// `pifleet store migrate --from FILE --to URL`.
pub fn store(action: StoreCommand) -> Result<(), Failure> {
    let StoreCommand::Migrate { from, to } = action;
    if !from.exists() {
        return Err(Failure::usage(format!(
            "--from {}: no such file",
            from.display()
        )));
    }
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        return Err(Failure::usage(format!(
            "--to {}: must be a postgres:// URL",
            crate::coordinator::store::postgres::redact(&to)
        )));
    }
    // The history limit only caps reads; every stored message is copied.
    let source = Store::open(&from, i64::MAX as usize).map_err(|e| Failure::runtime(&e))?;
    let target = Store::connect(&to, i64::MAX as usize).map_err(|e| Failure::runtime(&e))?;
    let copied = source
        .copy_into(&target)
        .map_err(|e| Failure::runtime(&e))?;
    println!(
        "copied {} agents, {} messages, {} jobs and {} node flags from {} into {}",
        copied.agents,
        copied.messages,
        copied.jobs,
        copied.nodes,
        from.display(),
        target.location()
    );
    Ok(())
}

fn default_text(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Node => DEFAULT_NODE_CONFIG,
        ConfigKind::Coordinator => DEFAULT_COORDINATOR_CONFIG,
    }
}

fn check(file: &Path, kind: Option<ConfigKind>) -> Result<(), Failure> {
    let text = crate::config::read(file)?;
    let name = file.display().to_string();
    match kind.unwrap_or_else(|| guess_kind(&text)) {
        ConfigKind::Node => {
            let config =
                NodeConfig::parse(&name, &text).map_err(|e| Failure::usage(e.to_string()))?;
            println!(
                "{name}: ok (node {}, agent_capacity {}, broker {})",
                config.node_id,
                config.agent_capacity,
                config.mqtt.address()
            );
        }
        ConfigKind::Coordinator => {
            let config = CoordinatorConfig::parse(&name, &text)
                .map_err(|e| Failure::usage(e.to_string()))?;
            println!(
                "{name}: ok (coordinator, API {}, store {}, broker {})",
                config.api.listen,
                config.store_path.display(),
                config.mqtt.address()
            );
        }
    }
    Ok(())
}

/// A coordinator config has tables or keys a node config has not; anything
/// else is checked as a node config (which then names what is wrong).
fn guess_kind(text: &str) -> ConfigKind {
    let Ok(table) = text.parse::<toml::Table>() else {
        return ConfigKind::Node;
    };
    let coordinator_only = ["store", "timeouts", "queue", "scheduler", "history_limit"];
    if coordinator_only.iter().any(|k| table.contains_key(*k))
        && !table.contains_key("agent_capacity")
    {
        ConfigKind::Coordinator
    } else {
        ConfigKind::Node
    }
}
