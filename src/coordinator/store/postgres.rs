//! The PostgreSQL engine: a store several coordinators share, one of them
//! leading ([`super::lease`]).
//!
//! The store's callers are synchronous (the coordinator's core does no
//! I/O of its own and runs each input in one transaction), so each call is
//! handed to a private single-threaded runtime that owns the connection,
//! and waited for with a deadline: a connection that stops answering (a
//! cut link, a frozen server) fails the call after [`CALL_TIMEOUT`] and is
//! closed, instead of blocking the coordinator for as long as TCP takes to
//! give up. There is no reconnection here: the coordinator opens a new
//! store (docs/HA.md).

use std::collections::HashMap;
use std::error::Error;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use super::{Backend, Param, Value};

/// How long one call may take before the connection is given up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Deferred writes sent at most in one go.
const FLUSH_AFTER: usize = 512;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// BIGINT everywhere (PostgreSQL's INTEGER is 32 bits). Created under an
/// advisory lock: coordinators starting together would race on `CREATE
/// TABLE IF NOT EXISTS`.
pub(super) const SCHEMA: &str = "
SELECT pg_advisory_xact_lock(7411);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    system TEXT,
    labels TEXT NOT NULL DEFAULT '{}',
    created_ms BIGINT NOT NULL,
    state TEXT NOT NULL,
    node TEXT,
    placement BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    agent TEXT NOT NULL,
    seq BIGINT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    PRIMARY KEY (agent, seq)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    message TEXT NOT NULL,
    priority BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    node TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    answer TEXT,
    error TEXT,
    usage TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, agent);
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    cordoned BIGINT NOT NULL,
    draining BIGINT NOT NULL,
    drain_deadline_ms BIGINT,
    drain_max_parallel BIGINT
);
CREATE TABLE IF NOT EXISTS leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term BIGINT NOT NULL,
    holder TEXT NOT NULL,
    api TEXT NOT NULL,
    expires TIMESTAMPTZ NOT NULL
);
INSERT INTO leader (id, term, holder, api, expires) VALUES (1, 0, '', '', '-infinity')
    ON CONFLICT (id) DO NOTHING;
";

/// `url` without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.password().is_some() {
            let _ = parsed.set_password(Some("***"));
        }
        return parsed.to_string();
    }
    // A key=value connection string.
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => "password=***".to_owned(),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A parameter owned by the call that carries it to the connection's thread.
#[derive(Debug)]
enum Owned {
    Null,
    Int(i64),
    Text(String),
}

impl ToSql for Owned {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Owned::Null => Ok(IsNull::Yes),
            Owned::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT8 => v.to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                _ => Err(format!("an integer cannot be bound to a {ty} parameter").into()),
            },
            Owned::Text(s) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                    s.as_str().to_sql(ty, out)
                }
                _ => Err(format!("text cannot be bound to a {ty} parameter").into()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn owned(params: &[Param<'_>]) -> Vec<Owned> {
    params
        .iter()
        .map(|p| match *p {
            Param::Null => Owned::Null,
            Param::Int(v) => Owned::Int(v),
            Param::Text(s) => Owned::Text(s.to_owned()),
        })
        .collect()
}

/// A PostgreSQL error with what the server said.
fn describe(e: tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match e.source() {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

fn row_values(row: &tokio_postgres::Row) -> Result<Vec<Value>, tokio_postgres::Error> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => row
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into())),
            _ => row.try_get::<_, Option<String>>(i)?.map(Value::Text),
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(values)
}

/// A write whose answer nobody waits for: sent with the next statement
/// that is waited for (pipelined), its error reported then.
struct Deferred {
    statement: Statement,
    params: Vec<Owned>,
    sql: String,
}

/// One request of a pipeline, sent when first polled.
type Request = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

pub struct Postgres {
    client: Arc<Client>,
    /// The private runtime that drives the connection.
    runtime: tokio::runtime::Handle,
    statements: HashMap<String, Statement>,
    /// Inside a transaction (whose BEGIN may not be sent yet).
    in_transaction: bool,
    /// BEGIN not sent yet: it goes with the transaction's first write, and
    /// a transaction that writes nothing costs no round trip at all.
    begin_pending: bool,
    /// Writes of the open transaction not sent yet, in order.
    deferred: Vec<Deferred>,
    /// Whether the open transaction wrote anything.
    wrote: bool,
    /// Dropping it closes the connection.
    _close: tokio::sync::oneshot::Sender<()>,
}

type Connected = (
    Client,
    tokio::runtime::Handle,
    tokio::sync::oneshot::Sender<()>,
);

impl Postgres {
    /// Connects to `url` (a `postgres://` URL or key=value string). With
    /// `synchronous_commit` false, a commit does not wait for the WAL flush
    /// (statements that must, the lease's, ask for it themselves).
    pub fn connect(url: &str, synchronous_commit: bool) -> Result<Postgres, String> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("not a PostgreSQL URL: {}", describe(e)))?;
        let (ready, connected) = mpsc::channel::<Result<Connected, String>>();
        std::thread::Builder::new()
            .name("pifleet-postgres".into())
            .spawn(move || drive(config, ready))
            .map_err(|e| format!("cannot start the connection's thread: {e}"))?;
        let (client, runtime, close) = connected
            .recv()
            .map_err(|_| "the connection's thread ended".to_owned())??;
        let mut db = Postgres {
            client: Arc::new(client),
            runtime,
            statements: HashMap::new(),
            in_transaction: false,
            begin_pending: false,
            deferred: Vec::new(),
            wrote: false,
            _close: close,
        };
        // A coordinator frozen inside a transaction (SIGSTOP) must not hold
        // its locks past a lease: the server ends its session.
        let sync = if synchronous_commit { "on" } else { "off" };
        db.batch(&format!(
            "SET idle_in_transaction_session_timeout = '3s'; SET TIME ZONE 'UTC'; SET synchronous_commit = {sync}"
        ))?;
        Ok(db)
    }

    /// Runs `call` on the connection's runtime and waits for it, at most
    /// [`CALL_TIMEOUT`]; past it the connection is closed.
    fn call<T: Send + 'static>(
        &mut self,
        call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static,
    ) -> Result<T, String> {
        let (done, answer) = mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = done.send(call.await.map_err(describe));
        });
        self.wait(answer)
    }

    fn wait<T>(&mut self, answer: mpsc::Receiver<Result<T, String>>) -> Result<T, String> {
        match answer.recv_timeout(CALL_TIMEOUT) {
            Ok(outcome) => outcome,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.close();
                Err(format!(
                    "no answer within {} s; the connection is closed",
                    CALL_TIMEOUT.as_secs()
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("the connection to PostgreSQL is closed".into())
            }
        }
    }

    fn close(&mut self) {
        let (closed, _) = tokio::sync::oneshot::channel();
        // Replacing the sender drops the old one: the thread lets go.
        self._close = closed;
        self.end_transaction();
    }

    /// Fails once the connection is closed (by the server, a cut link, or
    /// [`Postgres::close`]).
    fn open(&self) -> Result<(), String> {
        if self.client.is_closed() {
            Err("the connection to PostgreSQL is closed".into())
        } else {
            Ok(())
        }
    }

    fn end_transaction(&mut self) {
        self.in_transaction = false;
        self.begin_pending = false;
        self.deferred.clear();
        self.wrote = false;
    }

    /// The requests to send before the next one: BEGIN if it is still
    /// pending, then the deferred writes. `begin` is false for a read that
    /// may run outside the transaction (nothing written yet).
    fn pending(&mut self, begin: bool) -> Vec<Request> {
        let mut requests: Vec<Request> = Vec::new();
        if self.begin_pending && (begin || !self.deferred.is_empty()) {
            self.begin_pending = false;
            let client = self.client.clone();
            requests.push(Box::pin(async move {
                client.batch_execute("BEGIN").await.map_err(describe)
            }));
        }
        for write in self.deferred.drain(..) {
            let client = self.client.clone();
            requests.push(Box::pin(async move {
                let refs: Vec<&(dyn ToSql + Sync)> = write.params.iter().map(|p| p as _).collect();
                match client.execute(&write.statement, &refs).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(format!("{} (in {})", describe(e), first_words(&write.sql))),
                }
            }));
        }
        requests
    }

    /// Sends the pending requests and then `last`, without waiting in
    /// between (one round trip), and waits for all: the first error, in
    /// order, or `last`'s answer.
    fn pipelined<T: Send + 'static>(
        &mut self,
        begin: bool,
        last: impl std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static,
    ) -> Result<T, String> {
        let before = self.pending(begin);
        if before.is_empty() {
            return self.call(last);
        }
        let (done, answer) = mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let last: std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, String>> + Send>,
            > = Box::pin(async move { last.await.map_err(describe) });
            let _ = done.send(in_order(before, last).await);
        });
        self.wait(answer)
    }

    fn statement(&mut self, sql: &str) -> Result<Statement, String> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let client = self.client.clone();
        let text = sql.to_owned();
        let statement = self.call(async move { client.prepare(&text).await })?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

/// Polls `before` and then `last` in that order, so that each request is
/// sent before the next (tokio-postgres sends a request when its future is
/// first polled), and waits for all of them: the first error in order, or
/// `last`'s answer. A request that fails at its first poll was never sent
/// (a parameter that cannot be encoded, a closed connection): the requests
/// after it are not sent either, so that a COMMIT never follows a write
/// that did not reach the server.
async fn in_order<T>(
    mut before: Vec<Request>,
    mut last: std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send>>,
) -> Result<T, String> {
    use std::task::Poll;
    let mut outcomes: Vec<Option<Result<(), String>>> = before.iter().map(|_| None).collect();
    let mut answer = None;
    let mut first = true;
    std::future::poll_fn(|cx| {
        let mut all = true;
        let mut unsent = false;
        for (request, outcome) in before.iter_mut().zip(outcomes.iter_mut()) {
            if unsent {
                *outcome = Some(Err("not sent".into()));
            } else if outcome.is_none() {
                match request.as_mut().poll(cx) {
                    Poll::Ready(done) => {
                        unsent = first && done.is_err();
                        *outcome = Some(done);
                    }
                    Poll::Pending => all = false,
                }
            }
        }
        if unsent {
            answer = Some(Err("not sent".into()));
        } else if answer.is_none() {
            match last.as_mut().poll(cx) {
                Poll::Ready(done) => answer = Some(done),
                Poll::Pending => all = false,
            }
        }
        first = false;
        if all {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    for outcome in outcomes.into_iter().flatten() {
        outcome.map_err(|e| format!("an earlier write failed: {e}"))?;
    }
    answer.unwrap_or_else(|| Err("the pipeline ended without an answer".into()))
}

/// The start of a statement, to name it in an error.
fn first_words(sql: &str) -> String {
    let words: Vec<&str> = sql.split_whitespace().take(4).collect();
    words.join(" ")
}

/// The connection's thread: connects, hands the client over, then drives
/// the connection until it ends or is closed.
fn drive(config: tokio_postgres::Config, ready: mpsc::Sender<Result<Connected, String>>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start a runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let connecting = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await;
        let (client, connection) = match connecting {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                let _ = ready.send(Err(describe(e)));
                return;
            }
            Err(_) => {
                let message = format!("no answer within {} s", CONNECT_TIMEOUT.as_secs());
                let _ = ready.send(Err(message));
                return;
            }
        };
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::runtime::Handle::current();
        if ready.send(Ok((client, handle, close))).is_err() {
            return;
        }
        tokio::select! {
            ended = connection => if let Err(e) = ended {
                log::warn!("the connection to PostgreSQL ended: {}", describe(e));
            },
            _ = closed => {}
        }
    });
}

impl Backend for Postgres {
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, String> {
        let statement = self.statement(sql)?;
        let params = owned(params);
        let client = self.client.clone();
        if self.in_transaction {
            self.wrote = true;
        }
        self.pipelined(true, async move {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
            client.execute(&statement, &refs).await
        })
    }

    /// Inside a transaction, not sent until the next statement that is
    /// waited for (at the latest its COMMIT).
    fn write(&mut self, sql: &str, params: &[Param<'_>]) -> Result<(), String> {
        if !self.in_transaction() {
            return self.execute(sql, params).map(|_| ());
        }
        self.open()?;
        if self.deferred.len() >= FLUSH_AFTER {
            // A long batch (a migration) goes out in parts, each well
            // within the call's timeout.
            self.pipelined(true, async { Ok(()) })?;
        }
        let statement = self.statement(sql)?;
        self.deferred.push(Deferred {
            statement,
            params: owned(params),
            sql: sql.to_owned(),
        });
        self.wrote = true;
        Ok(())
    }

    /// A read in a transaction that has written nothing yet runs on its
    /// own, without sending BEGIN (it sees what is committed; a leader is
    /// the only writer), unless it locks rows.
    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Vec<Value>>, String> {
        let statement = self.statement(sql)?;
        let params = owned(params);
        let client = self.client.clone();
        // Only a plain SELECT may run outside the transaction.
        let plain = sql
            .trim_start()
            .get(..6)
            .is_some_and(|w| w.eq_ignore_ascii_case("SELECT"))
            && !sql.contains(" FOR SHARE")
            && !sql.contains(" FOR UPDATE");
        self.pipelined(!plain, async move {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
            let rows = client.query(&statement, &refs).await?;
            rows.iter().map(row_values).collect()
        })
    }

    fn batch(&mut self, sql: &str) -> Result<(), String> {
        let first = sql.trim_start().to_ascii_uppercase();
        if first.starts_with("BEGIN") && !self.in_transaction() {
            self.open()?;
            self.end_transaction();
            self.in_transaction = true;
            self.begin_pending = true;
            return Ok(());
        }
        let ends = first.starts_with("COMMIT")
            || (first.starts_with("ROLLBACK") && !first.starts_with("ROLLBACK TO"));
        if ends {
            if first.starts_with("ROLLBACK") {
                self.deferred.clear();
            }
            if self.begin_pending && self.deferred.is_empty() {
                // Nothing was sent: nothing to end.
                self.end_transaction();
                return Ok(());
            }
        }
        let client = self.client.clone();
        let text = sql.to_owned();
        let outcome = self.pipelined(true, async move { client.batch_execute(&text).await });
        if ends {
            if outcome.is_err() && !self.client.is_closed() {
                // The COMMIT may not have been sent (a write before it
                // failed to): end the transaction on the server too, or the
                // next BEGIN would add to it.
                let client = self.client.clone();
                let _ = self.call(async move { client.batch_execute("ROLLBACK").await });
            }
            // A failed COMMIT or ROLLBACK ends the transaction too.
            self.end_transaction();
        }
        outcome
    }

    /// The flag as it is, even once the connection closed: a batch whose
    /// connection closed must fail, not go on as if nothing were open.
    fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    fn wrote(&self) -> bool {
        self.wrote
    }
}
