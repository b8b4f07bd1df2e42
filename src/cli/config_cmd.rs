//! `pifleet config check FILE` and `pifleet config default KIND`.

use std::path::Path;

use super::{ConfigCommand, ConfigKind, Failure};
use crate::config::node::DEFAULT_NODE_CONFIG;
use crate::config::NodeConfig;

pub fn run(action: ConfigCommand) -> Result<(), Failure> {
    match action {
        ConfigCommand::Check { file, kind } => check(&file, kind),
        ConfigCommand::Default { kind } => {
            print!("{}", default_text(kind));
            Ok(())
        }
    }
}

fn default_text(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Node => DEFAULT_NODE_CONFIG,
    }
}

fn check(file: &Path, kind: Option<ConfigKind>) -> Result<(), Failure> {
    let text = crate::config::read(file)?;
    let name = file.display().to_string();
    match kind.unwrap_or(ConfigKind::Node) {
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
    }
    Ok(())
}
