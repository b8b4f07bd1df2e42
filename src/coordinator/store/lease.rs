//! Leadership of a shared (PostgreSQL) store: one row, `leader`, holds the
//! term, the holder, its API URL and when the lease expires.
//!
//! A row updated in a transaction, rather than an advisory lock: a lock
//! lives as long as a session, and a frozen leader's session can outlive
//! its usefulness by minutes (TCP keeps a SIGSTOPped process's connection
//! open); a lease ends by itself, and the row carries the term that
//! fences writes and commands.
//!
//! * Expiry is decided by the database's clock alone (`clock_timestamp()`
//!   in the same statement that tests it): no coordinator's wall clock is
//!   compared with another's.
//! * The term only grows, and is above the store's last generation: it is
//!   the coordinator generation every command carries, so nodes drop the
//!   commands of a deposed leader.
//! * Every transaction of a leader that writes checks, before it commits,
//!   that its term still leads (`FOR SHARE`: a takeover waits for that
//!   commit, or comes before it and fails it). A leader whose term was taken
//!   can therefore not store anything. What a batch that stores nothing
//!   sends (a chat turn, an answer read from memory) is fenced by the
//!   lease's timing and the nodes' term check.
//! * The leader times its lease on its own monotonic clock from *before*
//!   each renewal was sent ([`crate::coordinator::leader`]).

use std::time::Duration;

use super::{Fence, Result, Store};

/// Who leads a shared store, as the store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub holder: String,
    /// The leader's API URL, where followers send requests.
    pub api: String,
    pub term: u64,
    /// False once the lease expired (by the database's clock).
    pub live: bool,
}

impl Store {
    /// The lease row.
    pub fn leader(&self) -> Result<Leader> {
        let sql = "SELECT holder, api, term, CASE WHEN expires > clock_timestamp() THEN 1 ELSE 0 END FROM leader WHERE id = 1";
        let rows = self.rows("read the leader", sql, &[], |r| {
            Ok(Leader {
                holder: r.text(0, "leader.holder")?,
                api: r.text(1, "leader.api")?,
                term: r.int(2, "leader.term")? as u64,
                live: r.int(3, "leader.live")? == 1,
            })
        })?;
        rows.into_iter()
            .next()
            .ok_or_else(|| self.error("read the leader", "the leader row is missing".into()))
    }

    /// Takes the lead if the lease expired: the new term, or None while
    /// another coordinator holds a live lease. From then on, every
    /// transaction checks the term before it commits.
    pub fn try_lead(
        &self,
        holder: &str,
        api: &str,
        lease: Duration,
        now_ms: u64,
    ) -> Result<Option<u64>> {
        let sql = "UPDATE leader SET
                term = GREATEST(term + 1, COALESCE((SELECT value FROM meta WHERE key = 'generation'), 0) + 1, $1),
                holder = $2, api = $3, expires = clock_timestamp() + $4 * interval '1 millisecond'
            WHERE id = 1 AND expires <= clock_timestamp() RETURNING term";
        let params = [
            (now_ms as i64).into(),
            holder.into(),
            api.into(),
            (lease.as_millis() as i64).into(),
        ];
        let terms = self.synchronously("take the lead", || {
            self.rows("take the lead", sql, &params, |r| r.int(0, "leader.term"))
        })?;
        let term = terms.first().map(|t| *t as u64);
        if let Some(term) = term {
            // Other leaders may have written since this store last led.
            self.forget_histories();
            self.fence.replace(Some(Fence {
                term,
                holder: holder.to_owned(),
            }));
        }
        Ok(term)
    }

    /// Extends this leader's lease; false if its term no longer leads.
    pub fn renew(&self, lease: Duration) -> Result<bool> {
        let Some(fence) = self.fence.borrow().clone() else {
            return Ok(false);
        };
        let sql = "UPDATE leader SET expires = clock_timestamp() + $1 * interval '1 millisecond'
            WHERE id = 1 AND term = $2 AND holder = $3 RETURNING term";
        let params = [
            (lease.as_millis() as i64).into(),
            (fence.term as i64).into(),
            fence.holder.as_str().into(),
        ];
        let renewed = self.synchronously("renew the lease", || {
            self.rows("renew the lease", sql, &params, |r| r.int(0, "leader.term"))
        })?;
        Ok(!renewed.is_empty())
    }

    /// Ends this leader's lease now, so that a follower takes over at once
    /// (a clean stop, a rolling upgrade).
    pub fn resign(&self) -> Result<()> {
        let Some(fence) = self.fence.take() else {
            return Ok(());
        };
        let sql = "UPDATE leader SET expires = '-infinity' WHERE id = 1 AND term = $1 AND holder = $2 RETURNING term";
        let params = [(fence.term as i64).into(), fence.holder.as_str().into()];
        self.synchronously("resign", || {
            self.rows("resign", sql, &params, |r| r.int(0, "leader.term"))
        })
        .map(|_| ())
    }

    /// Runs `statement` in a transaction of its own whose commit waits for
    /// the WAL flush, whatever the session's `synchronous_commit`: a term
    /// must never be handed out twice, even if the database's host loses
    /// power (it also makes every earlier commit durable).
    pub(super) fn synchronously<T>(
        &self,
        action: &'static str,
        statement: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if self.db.borrow().in_transaction() {
            return Err(self.error(action, "called inside a transaction".into()));
        }
        self.db
            .borrow_mut()
            .batch("BEGIN")
            .map_err(|e| self.error(action, e))?;
        let sync = "SELECT set_config('synchronous_commit', 'on', true)";
        let asked = self.db.borrow_mut().write(sync, &[]);
        let outcome = asked
            .map_err(|e| self.error(action, e))
            .and_then(|()| statement());
        let end = if outcome.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let ended = self.db.borrow_mut().batch(end);
        let value = outcome?;
        ended.map_err(|e| self.error(action, e))?;
        Ok(value)
    }

    /// Whether this store's leadership was found taken by another term
    /// (a transaction's term check failed).
    pub fn deposed(&self) -> bool {
        self.deposed.get()
    }

    /// Queues, as the last statement of the open transaction, the check
    /// that this store's term still leads; without a fence (SQLite, one
    /// coordinator) there is nothing to check. The check locks the lease
    /// row (`FOR SHARE`: a takeover waits for the COMMIT, or comes before it
    /// and fails it) and fails the transaction if another term leads, so
    /// that the COMMIT can be sent with it, in one round trip: PostgreSQL
    /// turns the COMMIT of a failed transaction into a rollback.
    pub(super) fn check_term(&self) -> Result<()> {
        let Some(fence) = self.fence.borrow().clone() else {
            return Ok(());
        };
        // Zero (text, cast back) while this term leads; otherwise a cast of
        // the reason that fails, with the reason in the error; a missing
        // row fails too.
        let sql = "SELECT CAST(COALESCE((SELECT CASE WHEN term = $1 AND holder = $2 THEN '0'
                   ELSE 'deposed: term ' || term || ' of ' || holder || ' leads now' END
                   FROM leader WHERE id = 1 FOR SHARE), 'deposed: the leader row is missing') AS INTEGER)";
        let params = [(fence.term as i64).into(), fence.holder.as_str().into()];
        self.write("check the leader's term", sql, &params)
    }

    /// Notes a failed transaction's error that says another term leads.
    pub(super) fn note_deposed(&self, error: &str) {
        if error.contains("deposed: term") {
            self.deposed.set(true);
        }
    }
}
