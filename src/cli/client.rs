//! Client commands against the coordinator's HTTP API. Each prints a human
//! report, or the API's JSON with `--json`; on an HTTP error it prints the
//! server's message and code and exits 1.

use std::collections::BTreeMap;

use clap::Subcommand;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::Failure;
use crate::protocol::{
    utc_timestamp, AgentDeleted, AgentList, AgentView, AgentsCreated, ChatAnswer, FleetStatus,
    JobList, JobSubmitted, JobView, NodeList, NodeView,
};

/// Where the coordinator is and how to talk to it.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Coordinator API URL; several, comma separated, are tried in turn
    /// while one cannot be reached.
    #[arg(
        long,
        global = true,
        env = "PIFLEET_COORDINATOR",
        default_value = "http://127.0.0.1:9470"
    )]
    pub coordinator: String,
    /// Bearer token, when the coordinator has api.token set.
    #[arg(long, global = true, env = "PIFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a report.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        #[arg(long)]
        agent: Option<String>,
        /// queued, running, completed or failed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Queue a job for an agent; prints its id.
    Submit {
        agent: String,
        message: String,
        /// Higher runs first (-1000 to 1000).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i64,
    },
    /// Show one job and its outcome.
    Show { id: String },
}

/// The client commands, run against the coordinator's API.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Fleet report: agents running / capacity, nodes, queue depth, recent events.
    Status {
        #[command(flatten)]
        connection: Connection,
        /// How many recent scheduling events to show.
        #[arg(long, default_value_t = 10)]
        events: usize,
    },
    /// Nodes with their capacity, load, temperature and agents.
    Nodes {
        #[command(flatten)]
        connection: Connection,
    },
    /// Agents with their state and node.
    Agents {
        #[command(flatten)]
        connection: Connection,
    },
    /// Create an agent (or N agents NAME-1..N with --count).
    Spawn {
        #[command(flatten)]
        connection: Connection,
        name: String,
        /// Ollama model, e.g. llama3.2 (a name without a tag means :latest).
        #[arg(long)]
        model: String,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        /// A label the node must carry, key=value; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Create NAME-1 .. NAME-N (1 to 100,000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: Option<u32>,
    },
    /// Stop and remove agents.
    Stop {
        #[command(flatten)]
        connection: Connection,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Send one message to an agent and print its answer.
    Chat {
        #[command(flatten)]
        connection: Connection,
        agent: String,
        message: String,
        /// Seconds to keep retrying while the agent is being moved between
        /// nodes (a retryable 503); 0 fails at once.
        #[arg(long, default_value_t = 30)]
        wait: u64,
        /// Print the answer once it is complete instead of as it is
        /// generated (`--json` always does).
        #[arg(long)]
        no_stream: bool,
    },
    /// Move every agent off a node and place nothing new there.
    Drain {
        #[command(flatten)]
        connection: Connection,
        node: String,
        /// Agents in motion at once (default: scheduler.drain_max_parallel).
        #[arg(long)]
        max_parallel: Option<usize>,
        /// Seconds after which the rest move regardless.
        #[arg(long)]
        deadline_secs: Option<u64>,
    },
    /// Let a drained or cordoned node take agents again.
    Uncordon {
        #[command(flatten)]
        connection: Connection,
        node: String,
    },
    /// Remove a node that is offline for good (a Pi taken out of the fleet).
    Forget {
        #[command(flatten)]
        connection: Connection,
        node: String,
    },
    /// Queued jobs: list (default), submit, show.
    Jobs {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        action: Option<JobsCommand>,
    },
    /// Which node has which Ollama model, and pulls (list by default).
    Models {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        action: Option<models::ModelsCommand>,
    },
}

mod api;
mod models;

use api::{root_cause, Api};

/// Reads an answer as the view it must be; a mismatch (a coordinator of
/// another version) is an error that says so.
fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, Failure> {
    T::deserialize(value).map_err(|e| Failure {
        code: 1,
        message: format!(
            "the coordinator answered JSON this pifleet {} does not understand: {e}",
            env!("CARGO_PKG_VERSION")
        ),
    })
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

impl ClientCommand {
    fn connection(&self) -> &Connection {
        match self {
            ClientCommand::Status { connection, .. }
            | ClientCommand::Nodes { connection }
            | ClientCommand::Agents { connection }
            | ClientCommand::Spawn { connection, .. }
            | ClientCommand::Stop { connection, .. }
            | ClientCommand::Chat { connection, .. }
            | ClientCommand::Drain { connection, .. }
            | ClientCommand::Uncordon { connection, .. }
            | ClientCommand::Forget { connection, .. }
            | ClientCommand::Jobs { connection, .. }
            | ClientCommand::Models { connection, .. } => connection,
        }
    }
}

/// Runs `command` and prints its outcome.
pub fn run(command: ClientCommand) -> Result<(), Failure> {
    let connection = command.connection().clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(&e))?;
    let api = Api::new(&connection.coordinator, connection.token.clone())?;
    runtime.block_on(execute(&api, connection.json, command))
}

async fn execute(api: &Api, as_json: bool, command: ClientCommand) -> Result<(), Failure> {
    match command {
        ClientCommand::Status { events, .. } => {
            let status = api
                .call(Method::GET, &format!("/v1/status?limit={events}"), None)
                .await?;
            let view: FleetStatus = typed(&status)?;
            print_result(as_json, &status, || status_report(&view));
        }
        ClientCommand::Nodes { .. } => {
            let nodes = api.call(Method::GET, "/v1/nodes", None).await?;
            let view: NodeList = typed(&nodes)?;
            print_result(as_json, &nodes, || nodes_table(&view.nodes));
        }
        ClientCommand::Agents { .. } => {
            let agents = api.call(Method::GET, "/v1/agents", None).await?;
            let view: AgentList = typed(&agents)?;
            print_result(as_json, &agents, || agents_table(&view.agents));
        }
        ClientCommand::Spawn {
            name,
            model,
            system,
            labels,
            count,
            ..
        } => {
            let labels = parse_labels(&labels)?;
            let Some(count) = count else {
                let body =
                    json!({"name": name, "model": model, "system": system, "labels": labels});
                let agent = api.call(Method::POST, "/v1/agents", Some(body)).await?;
                let view: AgentView = typed(&agent)?;
                print_result(as_json, &json!({ "agents": [agent] }), || {
                    format!(
                        "spawned {} ({}, {})",
                        view.name,
                        view.model,
                        view.state.as_str()
                    )
                });
                return Ok(());
            };
            // One request for all of them, NAME-1 to NAME-N.
            let body = json!({"count": count, "prefix": name, "model": model, "system": system, "labels": labels});
            let answer = api.call(Method::POST, "/v1/agents", Some(body)).await?;
            let result: AgentsCreated = typed(&answer)?;
            print_result(as_json, &answer, || {
                let mut text = String::new();
                for view in result.created.iter().take(20) {
                    let state = view.state.as_str();
                    text += &format!("spawned {} ({}, {state})\n", view.name, view.model);
                }
                if result.created.len() > 20 {
                    text += &format!("... and {} more\n", result.created.len() - 20);
                }
                for e in &result.errors {
                    text += &format!("not spawned: {}: {}\n", e.name, e.error);
                }
                text
            });
            if !result.errors.is_empty() {
                return Err(Failure {
                    code: 1,
                    message: format!("{} of {count} agents were not spawned", result.errors.len()),
                });
            }
        }
        ClientCommand::Stop { names, .. } => {
            let mut stopped = Vec::new();
            for name in names {
                let result = api
                    .call(Method::DELETE, &format!("/v1/agents/{name}"), None)
                    .await?;
                let view: AgentDeleted = typed(&result)?;
                if !as_json {
                    println!("{name}: {}", view.state);
                }
                stopped.push(result);
            }
            if as_json {
                print_json(&json!({ "agents": stopped }));
            }
        }
        ClientCommand::Chat {
            agent,
            message,
            wait,
            no_stream,
            ..
        } => {
            let streamed = !(no_stream || as_json);
            let body = json!({
                "agent": agent,
                "messages": [{"role": "user", "content": message}],
                "stream": streamed
            });
            let response = api.chat(body, std::time::Duration::from_secs(wait)).await?;
            let (answer, view) = if streamed {
                super::chat_stream::print_events(response).await?
            } else {
                let text = response.text().await.map_err(|e| Failure {
                    code: 1,
                    message: format!("the answer broke off: {}", root_cause(&e)),
                })?;
                let answer: Value = serde_json::from_str(&text).map_err(|e| Failure {
                    code: 1,
                    message: format!("the coordinator's answer is not JSON: {e}"),
                })?;
                let view: ChatAnswer = typed(&answer)?;
                (answer, view)
            };
            if as_json {
                print_json(&answer);
            } else {
                if !streamed {
                    println!("{}", view.message.content);
                }
                eprintln!(
                    "({} on {}: {} tokens in {:.2}s)",
                    agent,
                    view.node,
                    view.usage.eval_count,
                    view.usage.total_duration as f64 / 1e9
                );
            }
        }
        ClientCommand::Drain {
            node,
            max_parallel,
            deadline_secs,
            ..
        } => {
            let body = json!({"max_parallel": max_parallel, "deadline_secs": deadline_secs});
            let path = format!("/v1/nodes/{node}/drain");
            let result = api.call(Method::POST, &path, Some(body)).await?;
            let view: NodeView = typed(&result)?;
            let moving = view.capacity.agents_running;
            print_result(as_json, &result, || {
                format!("draining {node}: {moving} agents to move away")
            });
        }
        ClientCommand::Uncordon { node, .. } => {
            let path = format!("/v1/nodes/{node}/uncordon");
            let result = api.call(Method::POST, &path, None).await?;
            print_result(as_json, &result, || format!("{node} takes agents again"));
        }
        ClientCommand::Forget { node, .. } => {
            let path = format!("/v1/nodes/{node}");
            let result = api.call(Method::DELETE, &path, None).await?;
            print_result(as_json, &result, || format!("forgot {node}"));
        }
        ClientCommand::Jobs { action, .. } => jobs(api, as_json, action).await?,
        ClientCommand::Models { action, .. } => models::run(api, as_json, action).await?,
    }
    Ok(())
}

async fn jobs(api: &Api, as_json: bool, command: Option<JobsCommand>) -> Result<(), Failure> {
    let command = command.unwrap_or(JobsCommand::List {
        agent: None,
        state: None,
        limit: 50,
    });
    match command {
        JobsCommand::List {
            agent,
            state,
            limit,
        } => {
            let mut query = format!("/v1/jobs?limit={limit}");
            if let Some(agent) = agent {
                query.push_str(&format!("&agent={agent}"));
            }
            if let Some(state) = state {
                query.push_str(&format!("&state={state}"));
            }
            let jobs = api.call(Method::GET, &query, None).await?;
            if as_json {
                print_json(&jobs);
                return Ok(());
            }
            let view: JobList = typed(&jobs)?;
            let rows: Vec<Vec<String>> = view
                .jobs
                .iter()
                .map(|j| {
                    vec![
                        j.job_id.clone(),
                        j.agent.clone(),
                        j.status.as_str().to_owned(),
                        j.priority.to_string(),
                        j.attempts.to_string(),
                        truncate(j.answer.as_deref().or(j.error.as_deref()).unwrap_or(""), 50),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "JOB",
                        "AGENT",
                        "STATUS",
                        "PRIORITY",
                        "ATTEMPTS",
                        "ANSWER / ERROR"
                    ],
                    &rows
                )
            );
        }
        JobsCommand::Submit {
            agent,
            message,
            priority,
        } => {
            let body = json!({"message": message, "priority": priority});
            let job = api
                .call(
                    Method::POST,
                    &format!("/v1/agents/{agent}/jobs"),
                    Some(body),
                )
                .await?;
            let view: JobSubmitted = typed(&job)?;
            print_result(as_json, &job, || view.job_id.clone());
        }
        JobsCommand::Show { id } => {
            let job = api
                .call(Method::GET, &format!("/v1/jobs/{id}"), None)
                .await?;
            let view: JobView = typed(&job)?;
            if as_json {
                print_json(&job);
            } else {
                println!(
                    "job {} for {}: {} (attempts {})",
                    view.job_id,
                    view.agent,
                    view.status.as_str(),
                    view.attempts
                );
                if let Some(answer) = &view.answer {
                    println!("{answer}");
                }
                if let Some(error) = &view.error {
                    println!("error: {error}");
                }
            }
        }
    }
    Ok(())
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(Failure::usage(format!(
                "--label {l:?} must look like key=value"
            ))),
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() > max {
        format!("{}…", line.chars().take(max - 1).collect::<String>())
    } else {
        line.to_owned()
    }
}

/// A left-aligned text table.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        format!("  {}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn node_row(n: &NodeView) -> Vec<String> {
    let c = &n.capacity;
    let mut flags = Vec::new();
    if c.draining {
        flags.push("draining");
    } else if n.cordoned {
        flags.push("cordoned");
    }
    if c.throttled == Some(true) {
        flags.push("throttled");
    }
    if !c.ollama_reachable && n.state == "online" {
        flags.push("ollama-down");
    }
    // Load and temperature of a node that is not online are old news.
    let online = n.state == "online";
    let live = |value: String| if online { value } else { "-".into() };
    let state = if online {
        n.state.clone()
    } else {
        format!("{} (seen {} ago)", n.state, ago(n.last_seen_secs))
    };
    vec![
        c.node.clone(),
        state,
        format!("{}/{}", c.agents_running, c.agent_capacity),
        live(format!("{:.2}", c.cpu.load1)),
        live(format!("{:.0}%", c.cpu.usage_pct)),
        live(c.temperature_c.map_or("-".into(), |t| format!("{t:.1}°C"))),
        flags.join(","),
        truncate(&c.agents.as_deref().unwrap_or_default().join(","), 40),
    ]
}

/// A duration in its largest whole unit: 42s, 5m, 3h, 2d.
fn ago(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Prints `result` as JSON with `--json`, else the text `human` makes,
/// ending in a newline.
fn print_result(as_json: bool, result: &Value, human: impl FnOnce() -> String) {
    if as_json {
        print_json(result);
    } else {
        let text = human();
        if text.ends_with('\n') {
            print!("{text}");
        } else {
            println!("{text}");
        }
    }
}

fn nodes_table(nodes: &[NodeView]) -> String {
    let rows: Vec<Vec<String>> = nodes.iter().map(node_row).collect();
    table(
        &[
            "NODE",
            "STATE",
            "AGENTS",
            "LOAD1",
            "CPU",
            "TEMP",
            "FLAGS",
            "AGENT NAMES",
        ],
        &rows,
    )
}

fn agents_table(agents: &[AgentView]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.model.clone(),
                a.state.as_str().to_owned(),
                a.node.clone().unwrap_or_else(|| "-".into()),
                a.queued_jobs.to_string(),
                truncate(a.pending_reason.as_deref().unwrap_or(""), 60),
            ]
        })
        .collect();
    table(
        &["AGENT", "MODEL", "STATE", "NODE", "JOBS", "WHY PENDING"],
        &rows,
    )
}

/// The `pifleet status` report, after seed 001's `scale.sh status`.
pub fn status_report(status: &FleetStatus) -> String {
    let s = &status.summary;
    let mut out = String::new();
    out.push_str("PIFLEET FLEET STATUS\n====================\n\n");
    out.push_str("Current Scale:\n");
    out.push_str(&format!(
        "  Agents: {} / {} running ({:.0}%)\n",
        s.agents_running, s.agent_capacity, s.utilisation_pct
    ));
    out.push_str(&format!(
        "  Pending: {}   Assigned: {}   Moving: {}\n",
        s.agents_pending, s.agents_assigned, s.agents_moving
    ));
    out.push_str(&format!(
        "  Nodes online: {} / {}\n\n",
        s.nodes_online, s.nodes_total
    ));
    out.push_str("Nodes:\n");
    out.push_str(&nodes_table(&status.nodes));
    out.push_str(&format!(
        "\nQueue Depth: {} jobs ({} running)\n\n",
        s.queue_depth, s.jobs_running
    ));
    out.push_str("Scheduling Events (recent):\n");
    if status.events.is_empty() {
        out.push_str("  (none)\n");
    }
    for e in status.events.iter().rev() {
        let ts = utc_timestamp(e.ts_ms);
        out.push_str(&format!("  {}  {}\n", &ts[11..19], e.message));
    }
    out
}

#[cfg(test)]
mod tests;
