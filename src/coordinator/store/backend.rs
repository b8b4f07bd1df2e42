//! What differs between the engines ([`Backend`]), and how rows read back
//! are decoded ([`Cols`]).

/// A statement parameter.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Text(&'a str),
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(s: &'a str) -> Self {
        Param::Text(s)
    }
}

impl<'a> From<Option<&'a str>> for Param<'a> {
    fn from(s: Option<&'a str>) -> Self {
        s.map_or(Param::Null, Param::Text)
    }
}

impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}

impl From<Option<i64>> for Param<'_> {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Param::Null, Param::Int)
    }
}

/// A column value read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

/// One database connection: what differs between SQLite and PostgreSQL.
/// Statements use `$1`, `$2`, … placeholders.
pub trait Backend: Send {
    /// Runs one statement; returns the rows it changed.
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> std::result::Result<u64, String>;
    /// Runs one statement whose answer the caller does not need. Inside a
    /// transaction an engine may send it later (at the latest with the
    /// COMMIT), and report its error then.
    fn write(&mut self, sql: &str, params: &[Param<'_>]) -> std::result::Result<(), String> {
        self.execute(sql, params).map(|_| ())
    }
    /// Runs one query; integer and text columns only.
    fn query(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> std::result::Result<Vec<Vec<Value>>, String>;
    /// Runs statements without parameters (schema, BEGIN, COMMIT, …).
    fn batch(&mut self, sql: &str) -> std::result::Result<(), String>;
    /// Whether a transaction is open.
    fn in_transaction(&self) -> bool;
    /// Whether the open transaction may have written anything.
    fn wrote(&self) -> bool {
        true
    }
}

/// A row read back, decoded column by column; a wrong type or value is an
/// error naming the column.
pub(super) struct Cols<'r> {
    pub(super) row: &'r [Value],
}

impl Cols<'_> {
    pub(super) fn get(&self, i: usize, column: &str) -> std::result::Result<&Value, String> {
        self.row
            .get(i)
            .ok_or_else(|| format!("{column}: no such column in the answer"))
    }

    pub(super) fn int(&self, i: usize, column: &str) -> std::result::Result<i64, String> {
        match self.get(i, column)? {
            Value::Int(v) => Ok(*v),
            other => Err(format!("{column} is not an integer: {other:?}")),
        }
    }

    pub(super) fn opt_int(
        &self,
        i: usize,
        column: &str,
    ) -> std::result::Result<Option<i64>, String> {
        match self.get(i, column)? {
            Value::Null => Ok(None),
            _ => self.int(i, column).map(Some),
        }
    }

    pub(super) fn text(&self, i: usize, column: &str) -> std::result::Result<String, String> {
        match self.get(i, column)? {
            Value::Text(v) => Ok(v.clone()),
            other => Err(format!("{column} is not text: {other:?}")),
        }
    }

    pub(super) fn opt_text(
        &self,
        i: usize,
        column: &str,
    ) -> std::result::Result<Option<String>, String> {
        match self.get(i, column)? {
            Value::Null => Ok(None),
            _ => self.text(i, column).map(Some),
        }
    }

    /// A text column that must hold one of `known`'s names: anything else
    /// is an error naming the column and the value, never a default.
    pub(super) fn one_of<T: Copy>(
        &self,
        i: usize,
        column: &str,
        known: &[T],
        name: impl Fn(T) -> &'static str,
    ) -> std::result::Result<T, String> {
        let value = self.text(i, column)?;
        known
            .iter()
            .copied()
            .find(|k| name(*k) == value)
            .ok_or_else(|| {
                let names: Vec<&str> = known.iter().map(|k| name(*k)).collect();
                format!(
                    "unknown {column} {value:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }

    /// A JSON text column; bad JSON is an error naming the column.
    pub(super) fn json<T: serde::de::DeserializeOwned>(
        &self,
        i: usize,
        column: &str,
    ) -> std::result::Result<T, String> {
        serde_json::from_str(&self.text(i, column)?)
            .map_err(|e| format!("{column} is not valid JSON: {e}"))
    }
}
