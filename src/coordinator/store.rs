//! The coordinator's desired state in SQLite (WAL): agents and where they
//! were last placed, each agent's history (capped), jobs, node flags, and
//! the counters that must survive restarts (generation, placement ids, job
//! order). Every change is written before the command that follows from it
//! is sent, so a coordinator killed at any point restarts with a state it
//! can reconcile against what the nodes report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Row};

pub use crate::protocol::JobState;
use crate::protocol::{AgentSpec, ChatMessage, Role, Usage};

#[derive(Debug, thiserror::Error)]
#[error("store {path}: {action}: {source}")]
pub struct StoreError {
    path: String,
    action: &'static str,
    source: rusqlite::Error,
}

type Result<T> = std::result::Result<T, StoreError>;

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

/// Reads a text column that must hold one of `known`'s names: anything
/// else is an error naming the column and the value, never a default.
fn one_of<T: Copy>(
    r: &Row<'_>,
    index: usize,
    column: &str,
    known: &[T],
    name: impl Fn(T) -> &'static str,
) -> rusqlite::Result<T> {
    let value: String = r.get(index)?;
    known
        .iter()
        .copied()
        .find(|k| name(*k) == value)
        .ok_or_else(|| {
            let names: Vec<&str> = known.iter().map(|k| name(*k)).collect();
            let message = format!(
                "unknown {column} {value:?} (expected one of {})",
                names.join(", ")
            );
            rusqlite::Error::FromSqlConversionFailure(
                index,
                rusqlite::types::Type::Text,
                message.into(),
            )
        })
}

/// Reads a JSON text column; bad JSON is an error naming the column.
fn json_column<T: serde::de::DeserializeOwned>(
    index: usize,
    column: &str,
    text: &str,
) -> rusqlite::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        let message = format!("{column} is not valid JSON: {e}");
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            message.into(),
        )
    })
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

pub struct Store {
    conn: Connection,
    path: PathBuf,
    history_limit: usize,
    /// Open [`Store::begin`] batches.
    batch_depth: std::cell::Cell<u32>,
    /// The first error inside the open batch: it fails the whole batch.
    fault: std::cell::RefCell<Option<String>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    system TEXT,
    labels TEXT NOT NULL DEFAULT '{}',
    created_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    node TEXT,
    placement INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    agent TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    message TEXT NOT NULL,
    priority INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    node TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    answer TEXT,
    error TEXT,
    usage TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, agent);
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    cordoned INTEGER NOT NULL,
    draining INTEGER NOT NULL,
    drain_deadline_ms INTEGER,
    drain_max_parallel INTEGER
);
";

fn role_name(role: Role) -> &'static str {
    role.as_str()
}

const ROLES: [Role; 4] = [Role::System, Role::User, Role::Assistant, Role::Tool];

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path, history_limit: usize) -> Result<Store> {
        let err = |action| {
            let path = path.display().to_string();
            move |source| StoreError {
                path,
                action,
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError {
                path: path.display().to_string(),
                action: "create its directory",
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let conn = Connection::open(path).map_err(err("open"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err("set synchronous"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err("set busy timeout"))?;
        conn.execute_batch(SCHEMA).map_err(err("create schema"))?;
        Ok(Store {
            conn,
            path: path.to_owned(),
            history_limit,
            batch_depth: std::cell::Cell::new(0),
            fault: std::cell::RefCell::new(None),
        })
    }

    /// Starts a transaction around a batch of writes (a placement pass, or
    /// the link messages handled in one go). Batches nest: only the
    /// outermost [`Store::commit`] commits. If the transaction cannot begin,
    /// the batch fails at its commit.
    pub fn begin(&self) {
        let depth = self.batch_depth.get();
        self.batch_depth.set(depth + 1);
        if depth > 0 || !self.conn.is_autocommit() {
            return;
        }
        self.fault.replace(None);
        if let Err(e) = self.conn.execute_batch("BEGIN") {
            // Writes would commit one by one: the batch fails instead.
            let fault = format!(
                "store {}: cannot begin a transaction: {e}",
                self.path.display()
            );
            self.fault.replace(Some(fault));
        }
    }

    /// Ends what [`Store::begin`] started, committing if it was the
    /// outermost batch. Any error inside the batch, or of the commit itself,
    /// rolls the whole batch back and is returned: the caller must then
    /// forget what it computed from the batch.
    pub fn commit(&self) -> std::result::Result<(), String> {
        let depth = self.batch_depth.get().saturating_sub(1);
        self.batch_depth.set(depth);
        if depth > 0 {
            return Ok(());
        }
        let fault = self.fault.take();
        if self.conn.is_autocommit() {
            return fault.map_or(Ok(()), Err);
        }
        let outcome = match fault {
            Some(fault) => Err(fault),
            None => self
                .conn
                .execute_batch("COMMIT")
                .map_err(|e| format!("store {}: cannot commit: {e}", self.path.display())),
        };
        if outcome.is_err() && !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                log::error!("store {}: cannot roll back: {e}", self.path.display());
            }
        }
        outcome
    }

    /// Whether a batch is open.
    pub fn in_batch(&self) -> bool {
        self.batch_depth.get() > 0
    }

    /// Whether the store takes writes: a tiny write of its own, for a
    /// coordinator waiting for a full disk to have room again.
    pub fn probe_write(&self) -> Result<()> {
        let n = self.counter("write_probe")?;
        self.set_counter("write_probe", n.wrapping_add(1) % 1_000_000)
    }

    /// Refuses a write inside a batch that already failed: it would be
    /// rolled back with the batch, or, if the batch has no transaction any
    /// more (BEGIN failed, or SQLite rolled it back), saved on its own while
    /// the batch's caller is told that nothing was done.
    fn writable(&self, action: &'static str) -> Result<()> {
        if self.batch_depth.get() == 0 || self.fault.borrow().is_none() {
            return Ok(());
        }
        Err(StoreError {
            path: self.path.display().to_string(),
            action,
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("an earlier write of this batch failed".into()),
            ),
        })
    }

    /// Runs `writes` all or nothing, inside a batch or on its own (a
    /// savepoint nests in an open transaction, or is one).
    fn atomically<T>(
        &self,
        action: &'static str,
        writes: impl FnOnce(&Connection) -> Result<T>,
    ) -> Result<T> {
        self.writable(action)?;
        self.conn
            .execute_batch("SAVEPOINT atomically")
            .map_err(self.err(action))?;
        match writes(&self.conn) {
            Ok(value) => match self.conn.execute_batch("RELEASE atomically") {
                Ok(()) => Ok(value),
                Err(e) => {
                    self.undo_savepoint();
                    Err(self.err(action)(e))
                }
            },
            Err(e) => {
                self.undo_savepoint();
                Err(e)
            }
        }
    }

    /// Undoes and closes the savepoint of [`Store::atomically`], so that no
    /// transaction is left open behind it.
    fn undo_savepoint(&self) {
        if let Err(e) = self
            .conn
            .execute_batch("ROLLBACK TO atomically; RELEASE atomically")
        {
            log::error!("store {}: cannot undo a write: {e}", self.path.display());
        }
    }

    /// Maps an SQLite error to a [`StoreError`]. Inside a batch it also
    /// fails the batch: SQLite may have rolled back the transaction by
    /// itself (SQLITE_FULL, SQLITE_IOERR), and the writes that follow must
    /// not be committed one by one without the ones before them.
    fn err(&self, action: &'static str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| {
            let error = StoreError {
                path: self.path.display().to_string(),
                action,
                source,
            };
            if self.batch_depth.get() > 0 {
                let mut fault = self.fault.borrow_mut();
                if fault.is_none() {
                    *fault = Some(error.to_string());
                }
                if self.conn.is_autocommit() {
                    // Keep what follows in a transaction that will be
                    // rolled back with the rest of the batch.
                    let _ = self.conn.execute_batch("BEGIN");
                }
            }
            error
        }
    }

    fn counter(&self, key: &str) -> Result<u64> {
        // Cached statements: placing agents in bulk reads and writes the
        // placement counter once per agent.
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get::<_, i64>(0)).optional())
            .map(|v| v.unwrap_or(0) as u64)
            .map_err(self.err("read a counter"))
    }

    fn set_counter(&self, key: &str, value: u64) -> Result<()> {
        self.writable("write a counter")?;
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            )
            .and_then(|mut s| s.execute(params![key, value as i64]))
            .map(|_| ())
            .map_err(self.err("write a counter"))
    }

    /// A generation above every earlier one: the clock in ms, or the last
    /// generation plus one if the clock went back.
    pub fn begin_generation(&self, now_ms: u64) -> Result<u64> {
        let generation = (self.counter("generation")? + 1).max(now_ms);
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
        let mut stmt = self
            .conn
            .prepare("SELECT name, model, system, labels, created_ms, state, node, placement FROM agents ORDER BY name")
            .map_err(self.err("list agents"))?;
        let rows = stmt
            .query_map([], |r| {
                let labels: String = r.get(3)?;
                Ok(AgentRow {
                    spec: AgentSpec {
                        name: r.get(0)?,
                        model: r.get(1)?,
                        system: r.get(2)?,
                        labels: json_column(3, "agents.labels", &labels)?,
                    },
                    created_ms: r.get::<_, i64>(4)? as u64,
                    state: one_of(r, 5, "agents.state", &StoredState::ALL, StoredState::as_str)?,
                    node: r.get(6)?,
                    placement: r.get::<_, i64>(7)? as u64,
                })
            })
            .map_err(self.err("list agents"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("list agents"))
    }

    /// Inserts a new pending agent; false when the name exists.
    pub fn insert_agent(&self, spec: &AgentSpec, created_ms: u64) -> Result<bool> {
        self.writable("insert an agent")?;
        let labels = serde_json::to_string(&spec.labels).unwrap_or_else(|_| "{}".into());
        self.conn
            .execute(
                "INSERT INTO agents (name, model, system, labels, created_ms, state) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')
                 ON CONFLICT(name) DO NOTHING",
                params![spec.name, spec.model, spec.system, labels, created_ms as i64],
            )
            .map(|n| n == 1)
            .map_err(self.err("insert an agent"))
    }

    /// Inserts many agents in one transaction; for each, whether it was new.
    pub fn insert_agents(&self, specs: &[AgentSpec], created_ms: u64) -> Result<Vec<bool>> {
        self.atomically("insert agents", |tx| {
            let mut inserted = Vec::with_capacity(specs.len());
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO agents (name, model, system, labels, created_ms, state) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')
                         ON CONFLICT(name) DO NOTHING",
                    )
                    .map_err(self.err("insert agents"))?;
                for spec in specs {
                    let labels = serde_json::to_string(&spec.labels).unwrap_or_else(|_| "{}".into());
                    let n = insert
                        .execute(params![
                            spec.name,
                            spec.model,
                            spec.system,
                            labels,
                            created_ms as i64
                        ])
                        .map_err(self.err("insert an agent"))?;
                    inserted.push(n == 1);
                }
            }
            Ok(inserted)
        })
    }

    pub fn set_agent_state(
        &self,
        name: &str,
        state: StoredState,
        node: Option<&str>,
        placement: u64,
    ) -> Result<()> {
        self.writable("update an agent")?;
        self.conn
            .prepare_cached(
                "UPDATE agents SET state = ?2, node = ?3, placement = ?4 WHERE name = ?1",
            )
            .and_then(|mut s| s.execute(params![name, state.as_str(), node, placement as i64]))
            .map(|_| ())
            .map_err(self.err("update an agent"))
    }

    /// Removes an agent and its history; its open jobs fail.
    pub fn delete_agent(&self, name: &str, now_ms: u64) -> Result<()> {
        self.atomically("delete an agent", |tx| {
            tx.execute("DELETE FROM agents WHERE name = ?1", [name])
                .map_err(self.err("delete an agent"))?;
            tx.execute("DELETE FROM messages WHERE agent = ?1", [name])
                .map_err(self.err("delete history"))?;
            tx.execute(
                "UPDATE jobs SET state = 'failed', error = 'the agent was stopped', updated_ms = ?2
             WHERE agent = ?1 AND state IN ('queued', 'running')",
                params![name, now_ms as i64],
            )
            .map_err(self.err("fail the agent's jobs"))?;
            Ok(())
        })
    }

    /// The agent's last `history_limit` messages, oldest first.
    pub fn history(&self, agent: &str) -> Result<Vec<ChatMessage>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT role, content FROM (SELECT seq, role, content FROM messages WHERE agent = ?1 ORDER BY seq DESC LIMIT ?2)
                 ORDER BY seq",
            )
            .map_err(self.err("read history"))?;
        let rows = stmt
            .query_map(params![agent, self.history_limit as i64], |r| {
                Ok(ChatMessage::new(
                    one_of(r, 0, "messages.role", &ROLES, Role::as_str)?,
                    r.get::<_, String>(1)?,
                ))
            })
            .map_err(self.err("read history"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("read history"))
    }

    /// Appends to the agent's history and drops what exceeds the limit.
    pub fn append_history(&self, agent: &str, messages: &[ChatMessage], now_ms: u64) -> Result<()> {
        self.atomically("append history", |tx| {
            // Cached statements: a chat appends twice per turn, and parsing the
            // SQL again each time showed in profiles of the chat path.
            let last: i64 = tx
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE agent = ?1")
                .and_then(|mut s| s.query_row([agent], |r| r.get(0)))
                .map_err(self.err("append history"))?;
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO messages (agent, seq, role, content, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(self.err("append history"))?;
                for (i, m) in messages.iter().enumerate() {
                    insert
                        .execute(params![
                            agent,
                            last + 1 + i as i64,
                            role_name(m.role),
                            m.content,
                            now_ms as i64
                        ])
                        .map_err(self.err("append history"))?;
                }
            }
            let newest = last + messages.len() as i64;
            tx.prepare_cached("DELETE FROM messages WHERE agent = ?1 AND seq <= ?2")
                .and_then(|mut s| s.execute(params![agent, newest - self.history_limit as i64]))
                .map_err(self.err("trim history"))?;
            Ok(())
        })
    }

    /// Stores a new queued job, giving it its place in submission order.
    pub fn insert_job(&self, job: &mut JobRow) -> Result<()> {
        job.seq = self.next_job_seq()?;
        self.write_job(job, "INSERT INTO")
    }

    pub fn update_job(&self, job: &JobRow) -> Result<()> {
        self.write_job(job, "REPLACE INTO")
    }

    fn write_job(&self, job: &JobRow, verb: &str) -> Result<()> {
        self.writable("write a job")?;
        let usage = job
            .usage
            .as_ref()
            .and_then(|u| serde_json::to_string(u).ok());
        let sql = format!(
            "{verb} jobs (id, agent, message, priority, seq, state, attempts, node, created_ms, updated_ms, answer, error, usage)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        );
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.execute(params![
                    job.id,
                    job.agent,
                    job.message,
                    job.priority,
                    job.seq as i64,
                    job.state.as_str(),
                    job.attempts,
                    job.node,
                    job.created_ms as i64,
                    job.updated_ms as i64,
                    job.answer,
                    job.error,
                    usage
                ])
            })
            .map(|_| ())
            .map_err(self.err("write a job"))
    }

    fn job_row(r: &Row<'_>) -> rusqlite::Result<JobRow> {
        let usage: Option<String> = r.get(12)?;
        Ok(JobRow {
            id: r.get(0)?,
            agent: r.get(1)?,
            message: r.get(2)?,
            priority: r.get(3)?,
            seq: r.get::<_, i64>(4)? as u64,
            state: one_of(r, 5, "jobs.state", &JobState::ALL, JobState::as_str)?,
            attempts: r.get(6)?,
            node: r.get(7)?,
            created_ms: r.get::<_, i64>(8)? as u64,
            updated_ms: r.get::<_, i64>(9)? as u64,
            answer: r.get(10)?,
            error: r.get(11)?,
            usage: usage
                .map(|u| json_column(12, "jobs.usage", &u))
                .transpose()?,
        })
    }

    const JOB_COLUMNS: &'static str =
        "id, agent, message, priority, seq, state, attempts, node, created_ms, updated_ms, answer, error, usage";

    pub fn job(&self, id: &str) -> Result<Option<JobRow>> {
        let sql = format!("SELECT {} FROM jobs WHERE id = ?1", Self::JOB_COLUMNS);
        self.conn
            .query_row(&sql, [id], Self::job_row)
            .optional()
            .map_err(self.err("read a job"))
    }

    /// Jobs, newest first, optionally of one agent or state; at most `limit`.
    pub fn jobs(
        &self,
        agent: Option<&str>,
        state: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {} FROM jobs WHERE (?1 IS NULL OR agent = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY seq DESC LIMIT ?3",
            Self::JOB_COLUMNS
        );
        let mut stmt = self.conn.prepare(&sql).map_err(self.err("list jobs"))?;
        let rows = stmt
            .query_map(params![agent, state, limit as i64], Self::job_row)
            .map_err(self.err("list jobs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("list jobs"))
    }

    /// Deletes completed and failed jobs last updated before `before_ms`;
    /// returns how many.
    pub fn prune_finished_jobs(&self, before_ms: u64) -> Result<usize> {
        self.writable("prune finished jobs")?;
        self.conn
            .prepare_cached(
                "DELETE FROM jobs WHERE state IN ('completed', 'failed') AND updated_ms < ?1",
            )
            .and_then(|mut s| s.execute([before_ms as i64]))
            .map_err(self.err("prune finished jobs"))
    }

    /// Queued and running jobs, in submission order.
    pub fn open_jobs(&self) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {} FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq",
            Self::JOB_COLUMNS
        );
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(self.err("list open jobs"))?;
        let rows = stmt
            .query_map([], Self::job_row)
            .map_err(self.err("list open jobs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("list open jobs"))
    }

    pub fn node_flags(&self) -> Result<BTreeMap<String, NodeFlags>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT node, cordoned, draining, drain_deadline_ms, drain_max_parallel FROM nodes",
            )
            .map_err(self.err("read node flags"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    NodeFlags {
                        cordoned: r.get::<_, i64>(1)? != 0,
                        draining: r.get::<_, i64>(2)? != 0,
                        drain_deadline_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                        drain_max_parallel: r.get::<_, Option<i64>>(4)?.map(|v| v as usize),
                    },
                ))
            })
            .map_err(self.err("read node flags"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("read node flags"))
    }

    pub fn delete_node_flags(&self, node: &str) -> Result<()> {
        self.writable("delete node flags")?;
        self.conn
            .execute("DELETE FROM nodes WHERE node = ?1", [node])
            .map(|_| ())
            .map_err(self.err("delete node flags"))
    }

    pub fn set_node_flags(&self, node: &str, flags: &NodeFlags) -> Result<()> {
        self.writable("write node flags")?;
        self.conn
            .execute(
                "REPLACE INTO nodes (node, cordoned, draining, drain_deadline_ms, drain_max_parallel) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    node,
                    i64::from(flags.cordoned),
                    i64::from(flags.draining),
                    flags.drain_deadline_ms.map(|v| v as i64),
                    flags.drain_max_parallel.map(|v| v as i64)
                ],
            )
            .map(|_| ())
            .map_err(self.err("write node flags"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> AgentSpec {
        AgentSpec {
            name: name.into(),
            model: "llama3.2:latest".into(),
            system: Some("be brief".into()),
            labels: BTreeMap::from([("room".into(), "attic".into())]),
        }
    }

    fn queued_job(id: &str, agent: &str) -> JobRow {
        JobRow {
            id: id.into(),
            agent: agent.into(),
            message: "do it".into(),
            priority: 0,
            seq: 0,
            state: JobState::Queued,
            attempts: 0,
            node: None,
            created_ms: 1,
            updated_ms: 1,
            answer: None,
            error: None,
            usage: None,
        }
    }

    #[test]
    fn agents_and_counters_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/c.db");
        {
            let s = Store::open(&path, 3).unwrap();
            assert!(s.insert_agent(&spec("alice"), 10).unwrap());
            assert!(
                !s.insert_agent(&spec("alice"), 11).unwrap(),
                "names are unique"
            );
            let p = s.next_placement().unwrap();
            s.set_agent_state("alice", StoredState::Assigned, Some("pi-1"), p)
                .unwrap();
            assert_eq!(s.begin_generation(1000).unwrap(), 1000);
        }
        let s = Store::open(&path, 3).unwrap();
        let agents = s.agents().unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].spec, spec("alice"));
        assert_eq!(
            (
                agents[0].state.as_str(),
                agents[0].node.as_deref(),
                agents[0].placement
            ),
            ("assigned", Some("pi-1"), 1)
        );
        assert_eq!(
            s.next_placement().unwrap(),
            2,
            "placement ids are never reused"
        );
        assert_eq!(
            s.begin_generation(5).unwrap(),
            1001,
            "generations grow even if the clock goes back"
        );
    }

    #[test]
    fn batches_nest_commit_once_and_hold_the_writes_that_open_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let s = Store::open(&path, 3).unwrap();
        s.begin();
        s.begin(); // a placement pass inside a batch of link messages
        s.insert_agents(&[spec("a"), spec("b")], 0).unwrap();
        assert!(s.commit().is_ok(), "the inner end commits nothing yet");
        s.append_history("a", &[ChatMessage::new(Role::User, "hi")], 0)
            .unwrap();
        s.delete_agent("b", 0).unwrap();
        // Another connection sees nothing before the outer commit.
        let other = Store::open(&path, 3).unwrap();
        assert!(other.agents().unwrap().is_empty());
        assert!(s.commit().is_ok());
        let names: Vec<String> = other
            .agents()
            .unwrap()
            .into_iter()
            .map(|a| a.spec.name)
            .collect();
        assert_eq!(names, ["a"]);
        assert_eq!(other.history("a").unwrap().len(), 1);
        // Outside a batch, each write commits at once.
        s.insert_agent(&spec("c"), 0).unwrap();
        assert_eq!(other.agents().unwrap().len(), 2);
    }

    #[test]
    fn a_failed_write_fails_its_whole_batch_and_refuses_the_writes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let s = Store::open(&path, 10_000).unwrap();
        s.begin();
        s.insert_agent(&spec("before"), 0).unwrap();
        // A full disk: the database may not grow by another page.
        let pages: i64 = s
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        s.conn.pragma_update(None, "max_page_count", pages).unwrap();
        let big = ChatMessage::new(Role::User, "x".repeat(64 * 1024));
        let full = s.append_history("before", &[big], 0).unwrap_err();
        s.conn
            .pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        let refused = s.insert_agent(&spec("after"), 0).unwrap_err();
        assert!(refused.to_string().contains("earlier write"), "{refused}");
        let fault = s.commit().unwrap_err();
        assert!(fault.contains("append history"), "{fault} ({full})");
        let other = Store::open(&path, 3).unwrap();
        assert!(
            other.agents().unwrap().is_empty(),
            "nothing of the batch is stored"
        );
        // The next batch starts clean.
        s.begin();
        s.insert_agent(&spec("later"), 0).unwrap();
        assert!(s.commit().is_ok());
        assert_eq!(other.agents().unwrap().len(), 1);
    }

    #[test]
    fn history_is_capped_to_the_newest_messages() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.db"), 3).unwrap();
        s.insert_agent(&spec("a"), 0).unwrap();
        for i in 0..5 {
            s.append_history("a", &[ChatMessage::new(Role::User, format!("m{i}"))], 0)
                .unwrap();
        }
        let h: Vec<String> = s
            .history("a")
            .unwrap()
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(h, ["m2", "m3", "m4"]);
        s.delete_agent("a", 0).unwrap();
        assert!(s.history("a").unwrap().is_empty());
    }

    #[test]
    fn jobs_keep_their_submission_order_and_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.db"), 3).unwrap();
        let mut job = JobRow {
            priority: 5,
            ..queued_job("j1", "a")
        };
        s.insert_job(&mut job).unwrap();
        let mut second = JobRow {
            id: "j2".into(),
            ..job.clone()
        };
        s.insert_job(&mut second).unwrap();
        assert!(second.seq > job.seq);
        job.state = JobState::Completed;
        job.answer = Some("done".into());
        job.usage = Some(Usage {
            eval_count: 3,
            ..Usage::default()
        });
        s.update_job(&job).unwrap();
        assert_eq!(s.job("j1").unwrap().unwrap(), job);
        assert_eq!(s.open_jobs().unwrap().len(), 1);
        s.delete_agent("a", 9).unwrap();
        assert_eq!(s.job("j2").unwrap().unwrap().state, JobState::Failed);
    }

    #[test]
    fn only_finished_jobs_older_than_the_limit_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.db"), 3).unwrap();
        let job = |id: &str, state: JobState, updated_ms: u64| JobRow {
            state,
            attempts: 1,
            updated_ms,
            ..queued_job(id, "a")
        };
        for mut j in [
            job("old-done", JobState::Completed, 100),
            job("old-failed", JobState::Failed, 100),
            job("old-queued", JobState::Queued, 100),
            job("old-running", JobState::Running, 100),
            job("new-done", JobState::Completed, 300),
        ] {
            s.insert_job(&mut j).unwrap();
        }
        assert_eq!(s.prune_finished_jobs(200).unwrap(), 2);
        let left: Vec<String> = s
            .jobs(None, None, 10)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(left, ["new-done", "old-running", "old-queued"]);
    }

    #[test]
    fn unknown_values_in_the_store_are_errors_that_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.db"), 3).unwrap();
        s.insert_agent(&spec("alice"), 10).unwrap();
        let hi = [ChatMessage::new(Role::User, "hi")];
        s.append_history("alice", &hi, 11).unwrap();
        let mut job = queued_job("j1", "alice");
        s.insert_job(&mut job).unwrap();
        let sabotage = "UPDATE agents SET state = 'dancing';
            UPDATE messages SET role = 'robot';
            UPDATE jobs SET state = 'lost'";
        s.conn.execute_batch(sabotage).unwrap();
        let errors = [
            s.agents().unwrap_err().to_string(),
            s.history("alice").unwrap_err().to_string(),
            s.job("j1").unwrap_err().to_string(),
        ];
        for (error, (column, value)) in errors.iter().zip([
            ("agents.state", "dancing"),
            ("messages.role", "robot"),
            ("jobs.state", "lost"),
        ]) {
            assert!(
                error.contains(column) && error.contains(value),
                "{error} should name {column} {value}"
            );
        }
        s.conn
            .execute("UPDATE agents SET state = 'running', labels = '[oops'", [])
            .unwrap();
        let error = s.agents().unwrap_err().to_string();
        assert!(error.contains("agents.labels"), "{error}");
    }
}
