//! The SQLite engine (WAL): one file, the default store.

use std::path::Path;

use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::{Backend, Param, Value};

pub(super) const SCHEMA: &str = "
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

pub struct Sqlite {
    conn: Connection,
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path`; an error names
    /// what failed.
    pub fn open(path: &Path) -> Result<Sqlite, (&'static str, String)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ("create its directory", e.to_string()))?;
        }
        let conn = Connection::open(path).map_err(|e| ("open", e.to_string()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| ("enable WAL", e.to_string()))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| ("set synchronous", e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| ("set busy timeout", e.to_string()))?;
        // Every statement the store runs stays prepared (rusqlite keeps 16;
        // the store has about 30, and one evicted is parsed again).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Plans that do not depend on the values bound: else SQLite
        // prepares a statement again whenever a value it planned with
        // changes (the history append's agent, on every chat).
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(|e| {
                (
                    "enable the query planner stability guarantee",
                    e.to_string(),
                )
            })?;
        Ok(Sqlite { conn })
    }

    /// The connection, for tests that play a full disk.
    #[cfg(test)]
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Prepares (cached: the chat path runs the same few statements over
    /// and over) and binds `sql`; `$N` placeholders become SQLite's `?N`.
    fn statement(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> rusqlite::Result<rusqlite::CachedStatement<'_>> {
        let mut statement = self.conn.prepare_cached(&sql.replace('$', "?"))?;
        for (i, p) in params.iter().enumerate() {
            match *p {
                Param::Null => statement.raw_bind_parameter(i + 1, rusqlite::types::Null)?,
                Param::Int(v) => statement.raw_bind_parameter(i + 1, v)?,
                Param::Text(v) => statement.raw_bind_parameter(i + 1, v)?,
            }
        }
        Ok(statement)
    }
}

/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;

impl Backend for Sqlite {
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, String> {
        self.statement(sql, params)
            .and_then(|mut s| s.raw_execute())
            .map(|n| n as u64)
            .map_err(|e| e.to_string())
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Vec<Value>>, String> {
        let mut statement = self.statement(sql, params).map_err(|e| e.to_string())?;
        let columns = statement.column_count();
        let mut rows = statement.raw_query();
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match row.get_ref(i).map_err(|e| e.to_string())? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    other => {
                        let name = row.as_ref().column_name(i).unwrap_or("?");
                        return Err(format!("column {name} holds {:?}", other.data_type()));
                    }
                });
            }
            out.push(values);
        }
        Ok(out)
    }

    fn batch(&mut self, sql: &str) -> Result<(), String> {
        // Transaction control (BEGIN, COMMIT, a savepoint: several a chat)
        // from the cache; anything else is parsed each time.
        let control = ["BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"]
            .iter()
            .any(|word| sql.starts_with(word));
        let result = if control && !sql.contains(';') {
            let statement = self.conn.prepare_cached(sql);
            statement.and_then(|mut s| s.raw_execute().map(|_| ()))
        } else {
            self.conn.execute_batch(sql)
        };
        result.map_err(|e| e.to_string())
    }

    fn in_transaction(&self) -> bool {
        !self.conn.is_autocommit()
    }
}
