//! The coordinator's desired state: agents and where they were last placed,
//! each agent's history (capped), jobs, node flags, and the counters that
//! must survive restarts (generation, placement ids, job order). Every
//! change is written before the command that follows from it is sent, so a
//! coordinator killed at any point restarts with a state it can reconcile
//! against what the nodes report.
//!
//! One set of semantics ([`Store`]) over two engines behind [`Backend`]:
//! SQLite (WAL, the default, [`sqlite`]) and PostgreSQL ([`postgres`]),
//! where several coordinators share the store and one leads ([`lease`]).
//! The SQL is written once, in the dialect both accept.

mod backend;
mod batch;
mod history;
pub mod lease;
pub mod migrate;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::Path;

pub use crate::protocol::JobState;
use serde_json::value::RawValue;

use crate::protocol::{AgentSpec, ChatMessage, Role, Usage};
use backend::Cols;
pub use backend::{Backend, Param, Value};

#[derive(Debug, thiserror::Error)]
#[error("store {location}: {action}: {message}")]
pub struct StoreError {
    location: String,
    action: &'static str,
    message: String,
}

type Result<T> = std::result::Result<T, StoreError>;

/// Which engine a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// An agent as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRow {
    pub spec: AgentSpec,
    pub created_ms: u64,
    pub state: StoredState,
    pub node: Option<String>,
    pub placement: u64,
}

/// An agent's state as stored: a move in progress is stored as `pending`
/// (it is placed again after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredState {
    Pending,
    Assigned,
    Running,
    Stopping,
}

impl StoredState {
    pub const ALL: [StoredState; 4] = [
        StoredState::Pending,
        StoredState::Assigned,
        StoredState::Running,
        StoredState::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoredState::Pending => "pending",
            StoredState::Assigned => "assigned",
            StoredState::Running => "running",
            StoredState::Stopping => "stopping",
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub agent: String,
    pub message: String,
    pub priority: i64,
    /// Submission order, for FIFO within a priority.
    pub seq: u64,
    pub state: JobState,
    pub attempts: u32,
    pub node: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub answer: Option<String>,
    pub error: Option<String>,
    pub usage: Option<Usage>,
}

/// Cordon and drain state of a node, kept across coordinator restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFlags {
    pub cordoned: bool,
    pub draining: bool,
    /// Unix ms after which a drain moves every remaining agent at once.
    pub drain_deadline_ms: Option<u64>,
    pub drain_max_parallel: Option<usize>,
}

/// The leadership a store's writes are fenced by: each transaction checks,
/// before it commits, that this term still leads ([`lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub term: u64,
    pub holder: String,
}

/// The tables' version, in `meta` under `schema`. A later version adds
/// its changes to both engines' `SCHEMA` (idempotent statements) and
/// raises it.
const SCHEMA_VERSION: i64 = 1;

const ROLES: [Role; 4] = [Role::System, Role::User, Role::Assistant, Role::Tool];

pub struct Store {
    db: RefCell<Box<dyn Backend>>,
    engine: Engine,
    /// Where the store is, for messages (a path, or a URL without password).
    location: String,
    history_limit: usize,
    /// Open [`Store::begin`] batches.
    batch_depth: Cell<u32>,
    /// The first error inside the open batch: it fails the whole batch.
    fault: RefCell<Option<String>>,
    /// Set while this store's coordinator leads a shared store.
    fence: RefCell<Option<Fence>>,
    /// Set once a term check found another term leading.
    deposed: Cell<bool>,
    /// Recent histories, as this store's one writer wrote them.
    histories: RefCell<history::HistoryCache>,
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path`.
    pub fn open(path: &Path, history_limit: usize) -> Result<Store> {
        let location = path.display().to_string();
        let db = sqlite::Sqlite::open(path).map_err(|(action, message)| StoreError {
            location: location.clone(),
            action,
            message,
        })?;
        Store::over(Box::new(db), Engine::Sqlite, location, history_limit)
    }

    /// Connects to the PostgreSQL store at `url` (creating its tables),
    /// commits waiting for the WAL flush.
    pub fn connect(url: &str, history_limit: usize) -> Result<Store> {
        Store::connect_with(url, history_limit, true)
    }

    /// [`Store::connect`], choosing whether commits wait for the WAL
    /// flush (`[store] synchronous_commit`, default true; the lease's
    /// always do).
    pub fn connect_with(
        url: &str,
        history_limit: usize,
        synchronous_commit: bool,
    ) -> Result<Store> {
        let location = postgres::redact(url);
        let db =
            postgres::Postgres::connect(url, synchronous_commit).map_err(|message| StoreError {
                location: location.clone(),
                action: "connect",
                message,
            })?;
        Store::over(Box::new(db), Engine::Postgres, location, history_limit)
    }

    fn over(
        db: Box<dyn Backend>,
        engine: Engine,
        location: String,
        history_limit: usize,
    ) -> Result<Store> {
        let store = Store {
            db: RefCell::new(db),
            engine,
            location,
            history_limit,
            batch_depth: Cell::new(0),
            fault: RefCell::new(None),
            fence: RefCell::new(None),
            deposed: Cell::new(false),
            histories: RefCell::default(),
        };
        // A store already at this version is left alone: creating what
        // exists would still lock tables a leader is writing.
        let sql = "SELECT value FROM meta WHERE key = 'schema'";
        let version = store.rows("read the schema version", sql, &[], |r| {
            r.int(0, "meta.value")
        });
        match version.ok().and_then(|v| v.first().copied()) {
            Some(SCHEMA_VERSION) => {}
            Some(v) if v > SCHEMA_VERSION => {
                let message = format!("schema version {v} is newer than this pifleet's ({SCHEMA_VERSION}): upgrade pifleet");
                return Err(store.error("open", message));
            }
            _ => {
                let schema = match engine {
                    Engine::Sqlite => sqlite::SCHEMA,
                    Engine::Postgres => postgres::SCHEMA,
                };
                let version = format!(
                    "INSERT INTO meta (key, value) VALUES ('schema', {SCHEMA_VERSION}) ON CONFLICT (key) DO UPDATE SET value = excluded.value;"
                );
                let created = store.db.borrow_mut().batch(&format!("{schema}{version}"));
                created.map_err(store.err("create the schema"))?;
            }
        }
        Ok(store)
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Where the store is (a path, or a URL without its password).
    pub fn location(&self) -> &str {
        &self.location
    }

    fn counter(&self, key: &str) -> Result<u64> {
        let sql = "SELECT value FROM meta WHERE key = $1";
        let values = self.rows("read a counter", sql, &[key.into()], |r| {
            r.int(0, "meta.value")
        })?;
        Ok(values.first().copied().unwrap_or(0) as u64)
    }

    fn set_counter(&self, key: &str, value: u64) -> Result<()> {
        let sql = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
        self.write("write a counter", sql, &[key.into(), (value as i64).into()])
    }

    /// A generation above every earlier one: the clock in ms, or the last
    /// generation plus one if the clock went back. A leader of a shared
    /// store takes its term, which is already above every earlier one.
    pub fn begin_generation(&self, now_ms: u64) -> Result<u64> {
        let fenced = self.fence.borrow().as_ref().map(|f| f.term);
        let generation = match fenced {
            Some(term) => term,
            None => (self.counter("generation")? + 1).max(now_ms),
        };
        self.set_counter("generation", generation)?;
        Ok(generation)
    }

    /// The next placement id (never reused).
    pub fn next_placement(&self) -> Result<u64> {
        let next = self.counter("placement")? + 1;
        self.set_counter("placement", next)?;
        Ok(next)
    }

    /// The highest placement id handed out so far.
    pub fn last_placement(&self) -> Result<u64> {
        self.counter("placement")
    }

    fn next_job_seq(&self) -> Result<u64> {
        let next = self.counter("job_seq")? + 1;
        self.set_counter("job_seq", next)?;
        Ok(next)
    }

    pub fn agents(&self) -> Result<Vec<AgentRow>> {
        let sql = "SELECT name, model, system, labels, created_ms, state, node, placement FROM agents ORDER BY name";
        self.rows("list agents", sql, &[], |r| {
            Ok(AgentRow {
                spec: AgentSpec {
                    name: r.text(0, "agents.name")?,
                    model: r.text(1, "agents.model")?,
                    system: r.opt_text(2, "agents.system")?,
                    labels: r.json(3, "agents.labels")?,
                },
                created_ms: r.int(4, "agents.created_ms")? as u64,
                state: r.one_of(5, "agents.state", &StoredState::ALL, StoredState::as_str)?,
                node: r.opt_text(6, "agents.node")?,
                placement: r.int(7, "agents.placement")? as u64,
            })
        })
    }

    /// Inserts a new pending agent; false when the name exists.
    pub fn insert_agent(&self, spec: &AgentSpec, created_ms: u64) -> Result<bool> {
        let labels = serde_json::to_string(&spec.labels).unwrap_or_else(|_| "{}".into());
        let params = [
            spec.name.as_str().into(),
            spec.model.as_str().into(),
            spec.system.as_deref().into(),
            labels.as_str().into(),
            (created_ms as i64).into(),
        ];
        self.exec("insert an agent", INSERT_AGENT, &params)
            .map(|n| n == 1)
    }

    /// Inserts many agents in one transaction; for each, whether it was new.
    pub fn insert_agents(&self, specs: &[AgentSpec], created_ms: u64) -> Result<Vec<bool>> {
        self.atomically("insert agents", |s| {
            specs
                .iter()
                .map(|spec| s.insert_agent(spec, created_ms))
                .collect()
        })
    }

    pub fn set_agent_state(
        &self,
        name: &str,
        state: StoredState,
        node: Option<&str>,
        placement: u64,
    ) -> Result<()> {
        let sql = "UPDATE agents SET state = $1, node = $2, placement = $3 WHERE name = $4";
        let params = [
            state.as_str().into(),
            node.into(),
            (placement as i64).into(),
            name.into(),
        ];
        self.write("update an agent", sql, &params)
    }

    /// Removes an agent and its history; its open jobs fail.
    pub fn delete_agent(&self, name: &str, now_ms: u64) -> Result<()> {
        self.histories.borrow_mut().delete(name);
        self.atomically("delete an agent", |s| {
            s.write(
                "delete an agent",
                "DELETE FROM agents WHERE name = $1",
                &[name.into()],
            )?;
            s.write(
                "delete history",
                "DELETE FROM messages WHERE agent = $1",
                &[name.into()],
            )?;
            s.write(
                "fail the agent's jobs",
                "UPDATE jobs SET state = 'failed', error = 'the agent was stopped', updated_ms = $1
                 WHERE agent = $2 AND state IN ('queued', 'running')",
                &[(now_ms as i64).into(), name.into()],
            )
        })
    }

    /// The agent's last `history_limit` messages, oldest first: from
    /// memory for an agent read or written recently ([`history`]).
    pub fn history(&self, agent: &str) -> Result<Vec<ChatMessage>> {
        self.with_history(agent, |messages| {
            let parse = |m: &&RawValue| serde_json::from_str(m.get()).expect("kept as JSON");
            messages.iter().map(parse).collect()
        })
    }

    /// `f` of the JSON of each message of the agent's history (its newest
    /// `history_limit`, oldest first), from memory for an agent read or
    /// written recently ([`history`]).
    pub fn with_history<R>(&self, agent: &str, f: impl FnOnce(&[&RawValue]) -> R) -> Result<R> {
        let mut f = Some(f);
        let mut call = |messages: &[&RawValue]| (f.take().expect("called once"))(messages);
        if let Some(done) = self.histories.borrow().with(agent, &mut call) {
            return Ok(done);
        }
        let sql = "SELECT role, content FROM (SELECT seq, role, content FROM messages WHERE agent = $1 ORDER BY seq DESC LIMIT $2) AS newest
                   ORDER BY seq";
        let params = [agent.into(), (self.history_limit as i64).into()];
        let messages = self.rows("read history", sql, &params, |r| {
            Ok(ChatMessage::new(
                r.one_of(0, "messages.role", &ROLES, Role::as_str)?,
                r.text(1, "messages.content")?,
            ))
        })?;
        self.histories.borrow_mut().put(agent, &messages);
        if let Some(done) = self.histories.borrow().with(agent, &mut call) {
            return Ok(done);
        }
        // Not kept (larger than the cache): from what was read.
        let json: Vec<Box<RawValue>> = messages.iter().map(history::json).collect();
        let refs: Vec<&RawValue> = json.iter().map(|m| &**m).collect();
        Ok(call(&refs))
    }

    /// Appends to the agent's history, and now and then drops what exceeds
    /// the limit ([`history::TRIM_EVERY`]): writes that need no answer, so
    /// that an engine may pipeline them.
    pub fn append_history(&self, agent: &str, messages: &[ChatMessage], now_ms: u64) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        self.atomically("append history", |s| {
            // Each message's place after the agent's last, computed by the
            // database: (VALUES …) names its columns column1, column2, … in
            // both engines.
            let rows: Vec<String> = (0..messages.len())
                .map(|i| format!("({}, ${}, ${})", i + 1, 3 + 2 * i, 4 + 2 * i))
                .collect();
            let sql = format!(
                "INSERT INTO messages (agent, seq, role, content, ts_ms)
                 SELECT $1, last.seq + v.column1, v.column2, v.column3, CAST($2 AS BIGINT)
                 FROM (SELECT COALESCE(MAX(seq), 0) AS seq FROM messages WHERE agent = $1) AS last,
                      (VALUES {}) AS v",
                rows.join(", ")
            );
            let mut params: Vec<Param<'_>> = vec![agent.into(), (now_ms as i64).into()];
            for m in messages {
                params.push(m.role.as_str().into());
                params.push(m.content.as_str().into());
            }
            s.write("append history", &sql, &params)?;
            if s.histories.borrow_mut().trim_due(agent) {
                s.write(
                    "trim history",
                    "DELETE FROM messages WHERE agent = $1
                     AND seq <= (SELECT MAX(seq) FROM messages WHERE agent = $1) - $2",
                    &[agent.into(), (self.history_limit as i64).into()],
                )?;
            }
            let mut histories = s.histories.borrow_mut();
            histories.append(agent, messages, s.history_limit);
            Ok(())
        })
    }

    /// Stores a new queued job, giving it its place in submission order.
    pub fn insert_job(&self, job: &mut JobRow) -> Result<()> {
        job.seq = self.next_job_seq()?;
        self.write_job(job, "")
    }

    pub fn update_job(&self, job: &JobRow) -> Result<()> {
        self.write_job(job, UPDATE_JOB)
    }

    /// Inserts `job`, or with `on_conflict` = [`UPDATE_JOB`] replaces it.
    fn write_job(&self, job: &JobRow, on_conflict: &str) -> Result<()> {
        let usage = job
            .usage
            .as_ref()
            .and_then(|u| serde_json::to_string(u).ok());
        let params = [
            job.id.as_str().into(),
            job.agent.as_str().into(),
            job.message.as_str().into(),
            job.priority.into(),
            (job.seq as i64).into(),
            job.state.as_str().into(),
            i64::from(job.attempts).into(),
            job.node.as_deref().into(),
            (job.created_ms as i64).into(),
            (job.updated_ms as i64).into(),
            job.answer.as_deref().into(),
            job.error.as_deref().into(),
            usage.as_deref().into(),
        ];
        let sql = format!("{INSERT_JOB} {on_conflict}");
        self.write("write a job", &sql, &params)
    }

    fn job_row(r: &Cols<'_>) -> std::result::Result<JobRow, String> {
        Ok(JobRow {
            id: r.text(0, "jobs.id")?,
            agent: r.text(1, "jobs.agent")?,
            message: r.text(2, "jobs.message")?,
            priority: r.int(3, "jobs.priority")?,
            seq: r.int(4, "jobs.seq")? as u64,
            state: r.one_of(5, "jobs.state", &JobState::ALL, JobState::as_str)?,
            attempts: r.int(6, "jobs.attempts")? as u32,
            node: r.opt_text(7, "jobs.node")?,
            created_ms: r.int(8, "jobs.created_ms")? as u64,
            updated_ms: r.int(9, "jobs.updated_ms")? as u64,
            answer: r.opt_text(10, "jobs.answer")?,
            error: r.opt_text(11, "jobs.error")?,
            usage: match r.get(12, "jobs.usage")? {
                Value::Null => None,
                _ => Some(r.json(12, "jobs.usage")?),
            },
        })
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRow>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let jobs = self.rows("read a job", &sql, &[id.into()], Store::job_row)?;
        Ok(jobs.into_iter().next())
    }

    /// Jobs, newest first, optionally of one agent or state; at most `limit`.
    pub fn jobs(
        &self,
        agent: Option<&str>,
        state: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE (CAST($1 AS TEXT) IS NULL OR agent = $1)
             AND (CAST($2 AS TEXT) IS NULL OR state = $2) ORDER BY seq DESC LIMIT $3"
        );
        let params = [agent.into(), state.into(), (limit as i64).into()];
        self.rows("list jobs", &sql, &params, Store::job_row)
    }

    /// Deletes completed and failed jobs last updated before `before_ms`;
    /// returns how many.
    pub fn prune_finished_jobs(&self, before_ms: u64) -> Result<usize> {
        let sql = "DELETE FROM jobs WHERE state IN ('completed', 'failed') AND updated_ms < $1";
        self.exec("prune finished jobs", sql, &[(before_ms as i64).into()])
            .map(|n| n as usize)
    }

    /// Queued and running jobs, in submission order.
    pub fn open_jobs(&self) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq"
        );
        self.rows("list open jobs", &sql, &[], Store::job_row)
    }

    pub fn node_flags(&self) -> Result<BTreeMap<String, NodeFlags>> {
        let sql = "SELECT node, cordoned, draining, drain_deadline_ms, drain_max_parallel FROM nodes ORDER BY node";
        let rows = self.rows("read node flags", sql, &[], |r| {
            Ok((
                r.text(0, "nodes.node")?,
                NodeFlags {
                    cordoned: r.int(1, "nodes.cordoned")? != 0,
                    draining: r.int(2, "nodes.draining")? != 0,
                    drain_deadline_ms: r.opt_int(3, "nodes.drain_deadline_ms")?.map(|v| v as u64),
                    drain_max_parallel: r
                        .opt_int(4, "nodes.drain_max_parallel")?
                        .map(|v| v as usize),
                },
            ))
        })?;
        Ok(rows.into_iter().collect())
    }

    pub fn delete_node_flags(&self, node: &str) -> Result<()> {
        let sql = "DELETE FROM nodes WHERE node = $1";
        self.write("delete node flags", sql, &[node.into()])
    }

    pub fn set_node_flags(&self, node: &str, flags: &NodeFlags) -> Result<()> {
        let sql = "INSERT INTO nodes (node, cordoned, draining, drain_deadline_ms, drain_max_parallel) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (node) DO UPDATE SET cordoned = excluded.cordoned, draining = excluded.draining,
                   drain_deadline_ms = excluded.drain_deadline_ms, drain_max_parallel = excluded.drain_max_parallel";
        let params = [
            node.into(),
            i64::from(flags.cordoned).into(),
            i64::from(flags.draining).into(),
            flags.drain_deadline_ms.map(|v| v as i64).into(),
            flags.drain_max_parallel.map(|v| v as i64).into(),
        ];
        self.write("write node flags", sql, &params)
    }
}

const INSERT_AGENT: &str = "INSERT INTO agents (name, model, system, labels, created_ms, state) VALUES ($1, $2, $3, $4, $5, 'pending')
     ON CONFLICT (name) DO NOTHING";

const JOB_COLUMNS: &str =
    "id, agent, message, priority, seq, state, attempts, node, created_ms, updated_ms, answer, error, usage";

const INSERT_JOB: &str = "INSERT INTO jobs (id, agent, message, priority, seq, state, attempts, node, created_ms, updated_ms, answer, error, usage)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

const UPDATE_JOB: &str = "ON CONFLICT (id) DO UPDATE SET agent = excluded.agent, message = excluded.message, priority = excluded.priority,
     seq = excluded.seq, state = excluded.state, attempts = excluded.attempts, node = excluded.node,
     created_ms = excluded.created_ms, updated_ms = excluded.updated_ms, answer = excluded.answer,
     error = excluded.error, usage = excluded.usage";
