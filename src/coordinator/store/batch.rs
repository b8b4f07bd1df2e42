//! How the store's statements run: errors, batches (one transaction
//! around many inputs), writes all or nothing, and the leader's term check
//! before each COMMIT.

use super::{Cols, Param, Result, Store, StoreError};

impl Store {
    pub(super) fn error(&self, action: &'static str, message: String) -> StoreError {
        StoreError {
            location: self.location.clone(),
            action,
            message,
        }
    }

    /// Maps a database error to a [`StoreError`]. Inside a batch it also
    /// fails the batch: SQLite may have rolled back the transaction by
    /// itself (SQLITE_FULL, SQLITE_IOERR), PostgreSQL refuses every
    /// statement after an error, and the writes that follow must not be
    /// committed one by one without the ones before them.
    pub(super) fn err(&self, action: &'static str) -> impl Fn(String) -> StoreError + '_ {
        move |message| {
            let error = self.error(action, message);
            if self.batch_depth.get() > 0 {
                let mut fault = self.fault.borrow_mut();
                if fault.is_none() {
                    *fault = Some(error.to_string());
                }
                let mut db = self.db.borrow_mut();
                if !db.in_transaction() {
                    // Keep what follows in a transaction that will be
                    // rolled back with the rest of the batch.
                    let _ = db.batch("BEGIN");
                }
            }
            error
        }
    }

    pub(super) fn exec(
        &self,
        action: &'static str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<u64> {
        self.writable(action)?;
        if self.fence.borrow().is_some() && !self.db.borrow().in_transaction() {
            self.outside_transaction(action)?;
            // A write of a leader outside any batch: in a transaction of
            // its own, which checks the term.
            return self.atomically(action, |s| s.exec(action, sql, params));
        }
        let done = self.db.borrow_mut().execute(sql, params);
        done.map_err(self.err(action))
    }

    /// A leader's write found no transaction open: fine outside a batch
    /// (it gets one of its own), a fault inside one (its transaction ended
    /// with its connection).
    pub(super) fn outside_transaction(&self, action: &'static str) -> Result<()> {
        if self.batch_depth.get() > 0 {
            return Err(self.err(action)(
                "the batch's transaction ended with its connection".into(),
            ));
        }
        Ok(())
    }

    /// A write whose count nobody needs: inside a transaction the engine
    /// may pipeline it with what follows ([`Backend::write`]); its error
    /// then fails the batch when it is reported.
    pub(super) fn write(
        &self,
        action: &'static str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<()> {
        self.writable(action)?;
        if self.fence.borrow().is_some() && !self.db.borrow().in_transaction() {
            self.outside_transaction(action)?;
            return self.atomically(action, |s| s.write(action, sql, params));
        }
        let done = self.db.borrow_mut().write(sql, params);
        done.map_err(self.err(action))
    }

    pub(super) fn rows<T>(
        &self,
        action: &'static str,
        sql: &str,
        params: &[Param<'_>],
        decode: impl Fn(&Cols<'_>) -> std::result::Result<T, String>,
    ) -> Result<Vec<T>> {
        let rows = self.db.borrow_mut().query(sql, params);
        let rows = rows.map_err(self.err(action))?;
        rows.iter()
            .map(|row| decode(&Cols { row }))
            .collect::<std::result::Result<_, _>>()
            .map_err(self.err(action))
    }

    /// Runs statements as they are, for tests that sabotage the store.
    #[cfg(test)]
    pub(crate) fn raw(&self, sql: &str) -> std::result::Result<(), String> {
        self.db.borrow_mut().batch(sql)
    }

    /// Starts a transaction around a batch of writes (a placement pass, or
    /// the link messages handled in one go). Batches nest: only the
    /// outermost [`Store::commit`] commits. If the transaction cannot begin,
    /// the batch fails at its commit.
    pub fn begin(&self) {
        let depth = self.batch_depth.get();
        self.batch_depth.set(depth + 1);
        if depth > 0 || self.db.borrow().in_transaction() {
            return;
        }
        self.fault.replace(None);
        let begun = self.db.borrow_mut().batch("BEGIN");
        if let Err(e) = begun {
            // Writes would commit one by one: the batch fails instead.
            let fault = format!("store {}: cannot begin a transaction: {e}", self.location);
            self.fault.replace(Some(fault));
        }
    }

    /// Ends what [`Store::begin`] started, committing if it was the
    /// outermost batch. Any error inside the batch, of the term check or of
    /// the commit itself, rolls the whole batch back and is returned: the
    /// caller must then forget what it computed from the batch.
    pub fn commit(&self) -> std::result::Result<(), String> {
        let depth = self.batch_depth.get().saturating_sub(1);
        self.batch_depth.set(depth);
        if depth > 0 {
            return Ok(());
        }
        let fault = self.fault.take();
        if !self.db.borrow().in_transaction() {
            if fault.is_some() {
                self.forget_histories();
            }
            return fault.map_or(Ok(()), Err);
        }
        let outcome = match fault {
            Some(fault) => Err(fault),
            None => self
                .check_written_term()
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    let committed = self.db.borrow_mut().batch("COMMIT");
                    committed.map_err(|e| format!("store {}: cannot commit: {e}", self.location))
                }),
        };
        if let Err(e) = &outcome {
            self.note_deposed(e);
            self.rollback();
        }
        outcome
    }

    pub(super) fn rollback(&self) {
        self.forget_histories();
        let mut db = self.db.borrow_mut();
        if db.in_transaction() {
            if let Err(e) = db.batch("ROLLBACK") {
                log::error!("store {}: cannot roll back: {e}", self.location);
            }
        }
    }

    /// Empties the history cache: after writes were rolled back, or when
    /// another coordinator may have written.
    pub(super) fn forget_histories(&self) {
        self.histories.borrow_mut().clear();
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
    pub(super) fn writable(&self, action: &'static str) -> Result<()> {
        if self.batch_depth.get() == 0 || self.fault.borrow().is_none() {
            return Ok(());
        }
        Err(self.error(action, "an earlier write of this batch failed".into()))
    }

    /// Runs `writes` all or nothing: inside a batch, as part of it (any
    /// error fails the whole batch); in a savepoint inside a transaction
    /// opened otherwise; else in a transaction of its own (which checks the
    /// leader's term before it commits).
    pub(super) fn atomically<T>(
        &self,
        action: &'static str,
        writes: impl FnOnce(&Store) -> Result<T>,
    ) -> Result<T> {
        self.writable(action)?;
        if self.batch_depth.get() > 0 && self.db.borrow().in_transaction() {
            return writes(self);
        }
        let nested = self.db.borrow().in_transaction();
        let (open, keep, undo) = if nested {
            (
                "SAVEPOINT atomically",
                "RELEASE SAVEPOINT atomically",
                "ROLLBACK TO SAVEPOINT atomically; RELEASE SAVEPOINT atomically",
            )
        } else {
            ("BEGIN", "COMMIT", "ROLLBACK")
        };
        let opened = self.db.borrow_mut().batch(open);
        opened.map_err(self.err(action))?;
        let outcome = writes(self).and_then(|value| {
            if !nested {
                self.check_written_term()?;
            }
            let kept = self.db.borrow_mut().batch(keep);
            kept.map(|()| value).map_err(|e| {
                self.note_deposed(&e);
                self.error(action, e)
            })
        });
        if outcome.is_err() {
            self.forget_histories();
        }
        if outcome.is_err() && self.db.borrow().in_transaction() {
            let undone = self.db.borrow_mut().batch(undo);
            if let Err(e) = undone {
                log::error!("store {}: cannot undo a write: {e}", self.location);
            }
        }
        outcome
    }

    /// The term check before a COMMIT, if the transaction wrote anything
    /// (one that did not changes nothing a term could fence).
    pub(super) fn check_written_term(&self) -> Result<()> {
        if self.db.borrow().wrote() {
            self.check_term()
        } else {
            Ok(())
        }
    }
}
