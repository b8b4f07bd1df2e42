//! `pifleet models`: which node has which Ollama model (from the nodes'
//! capacity reports) and the pulls under way; `pifleet models pull` asks
//! nodes to pull a model (`POST /v1/pulls`), and with `--wait` follows it.

use std::time::Duration;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

use super::{print_result, table, truncate, typed, Api, Failure};
use crate::protocol::{NodeList, PullList, PullState, PullView};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Models by node, and pulls (the default).
    List,
    /// Ask nodes to pull a model through their Ollama.
    Pull {
        model: String,
        /// A node to pull on (repeatable); default: every online node that
        /// lacks the model.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Follow the pulls until they end; exit 1 if one fails.
        #[arg(long)]
        wait: bool,
    },
}

pub(super) async fn run(
    api: &Api,
    as_json: bool,
    command: Option<ModelsCommand>,
) -> Result<(), Failure> {
    match command.unwrap_or(ModelsCommand::List) {
        ModelsCommand::List => {
            let nodes = api.call(Method::GET, "/v1/nodes", None).await?;
            let pulls = api.call(Method::GET, "/v1/pulls", None).await?;
            let (nodes, list): (NodeList, PullList) = (typed(&nodes)?, typed(&pulls)?);
            let both = json!({"nodes": nodes_models(&nodes), "pulls": pulls});
            print_result(as_json, &both, || models_table(&nodes, &list.pulls));
        }
        ModelsCommand::Pull { model, nodes, wait } => {
            let body = json!({"model": model, "nodes": nodes});
            let started = api.call(Method::POST, "/v1/pulls", Some(body)).await?;
            let list: PullList = typed(&started)?;
            let on: Vec<&str> = list.pulls.iter().map(|p| p.node.as_str()).collect();
            print_result(as_json && !wait, &started, || {
                format!("pulling {model} on {}", on.join(", "))
            });
            if wait {
                follow(api, as_json, &list).await?;
            }
        }
    }
    Ok(())
}

/// Each node's models, for `--json`.
fn nodes_models(nodes: &NodeList) -> Value {
    nodes
        .nodes
        .iter()
        .map(|n| (n.capacity.node.clone(), json!(n.capacity.models)))
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

fn describe(p: &PullView) -> String {
    match p.state {
        PullState::Pulling if p.total > 0 => format!(
            "{} pulling: {}, {}% ({}s)",
            p.node,
            p.status,
            p.completed.saturating_mul(100) / p.total,
            p.secs
        ),
        PullState::Pulling => format!("{} pulling: {} ({}s)", p.node, p.status, p.secs),
        PullState::Done => format!("{} pulled it", p.node),
        PullState::Failed => format!(
            "{} failed: {}",
            p.node,
            p.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

fn models_table(nodes: &NodeList, pulls: &[PullView]) -> String {
    let mut models: std::collections::BTreeMap<&str, (Vec<&str>, Vec<String>)> = Default::default();
    for n in &nodes.nodes {
        for m in &n.capacity.models {
            models.entry(m).or_default().0.push(&n.capacity.node);
        }
    }
    for p in pulls {
        models.entry(&p.model).or_default().1.push(describe(p));
    }
    let rows: Vec<Vec<String>> = models
        .into_iter()
        .map(|(model, (on, pulls))| {
            let on = if on.is_empty() {
                "-".into()
            } else {
                on.join(", ")
            };
            vec![model.to_owned(), on, truncate(&pulls.join("; "), 80)]
        })
        .collect();
    table(&["MODEL", "NODES", "PULLS"], &rows)
}

/// Prints each pull's progress as it changes until all have ended.
async fn follow(api: &Api, as_json: bool, started: &PullList) -> Result<(), Failure> {
    let mine = |p: &PullView| {
        started
            .pulls
            .iter()
            .any(|s| s.node == p.node && s.model == p.model)
    };
    let mut shown = std::collections::HashMap::new();
    loop {
        let now: PullList = typed(&api.call(Method::GET, "/v1/pulls", None).await?)?;
        let current: Vec<PullView> = now.pulls.into_iter().filter(|p| mine(p)).collect();
        if let Some(gone) = started.pulls.iter().find(|s| {
            !current
                .iter()
                .any(|p| p.node == s.node && p.model == s.model)
        }) {
            return Err(Failure {
                code: 1,
                message: format!(
                    "the coordinator no longer lists the pull of {} on {} (restarted?); see pifleet models",
                    gone.model, gone.node
                ),
            });
        }
        for p in &current {
            let line = describe(p);
            if !as_json && shown.get(&p.node) != Some(&line) {
                println!("{line}");
                shown.insert(p.node.clone(), line);
            }
        }
        if current.iter().all(|p| p.state != PullState::Pulling) {
            if as_json {
                super::print_json(&json!({ "pulls": current }));
            }
            let failed: Vec<String> = current
                .iter()
                .filter(|p| p.state == PullState::Failed)
                .map(describe)
                .collect();
            if failed.is_empty() {
                return Ok(());
            }
            return Err(Failure {
                code: 1,
                message: failed.join("; "),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
