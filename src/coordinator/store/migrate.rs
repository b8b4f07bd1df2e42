//! `pifleet store migrate`: the SQLite store of one coordinator copied
//! into PostgreSQL, for several coordinators (docs/HA.md).

use super::{Result, Store};

/// What was copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub agents: usize,
    pub messages: usize,
    pub jobs: usize,
    pub nodes: usize,
}

/// The counters that must survive: a new leader's term is above the old
/// generation, placement ids and job order go on.
const COUNTERS: [&str; 3] = ["generation", "placement", "job_seq"];

impl Store {
    /// Copies everything this store holds into `to`, which must hold no
    /// agent and no job yet, in one transaction: all of it or nothing.
    pub fn copy_into(&self, to: &Store) -> Result<Copied> {
        let (agents, jobs) = (to.agents()?.len(), to.jobs(None, None, 1)?.len());
        if agents + jobs > 0 {
            let message =
                format!("it already holds {agents} agents and jobs: copy into an empty database");
            return Err(to.error("copy a store into it", message));
        }
        to.begin();
        let copied = self.copy_rows(to);
        let committed = to.commit();
        let copied = copied?;
        committed.map_err(|e| to.error("copy a store into it", e))?;
        Ok(copied)
    }

    fn copy_rows(&self, to: &Store) -> Result<Copied> {
        let agents = self.agents()?;
        for a in &agents {
            to.insert_agent(&a.spec, a.created_ms)?;
            to.set_agent_state(&a.spec.name, a.state, a.node.as_deref(), a.placement)?;
        }
        let sql = "SELECT agent, seq, role, content, ts_ms FROM messages ORDER BY agent, seq";
        let messages = self.rows("read histories", sql, &[], |r| {
            Ok((
                r.text(0, "messages.agent")?,
                r.int(1, "messages.seq")?,
                r.text(2, "messages.role")?,
                r.text(3, "messages.content")?,
                r.int(4, "messages.ts_ms")?,
            ))
        })?;
        for (agent, seq, role, content, ts_ms) in &messages {
            let params = [
                agent.as_str().into(),
                (*seq).into(),
                role.as_str().into(),
                content.as_str().into(),
                (*ts_ms).into(),
            ];
            to.exec(
                "copy a message",
                "INSERT INTO messages (agent, seq, role, content, ts_ms) VALUES ($1, $2, $3, $4, $5)",
                &params,
            )?;
        }
        let jobs = self.jobs(None, None, i64::MAX as usize)?;
        for job in &jobs {
            to.update_job(job)?;
        }
        let flags = self.node_flags()?;
        for (node, f) in &flags {
            to.set_node_flags(node, f)?;
        }
        for key in COUNTERS {
            to.set_counter(key, self.counter(key)?)?;
        }
        Ok(Copied {
            agents: agents.len(),
            messages: messages.len(),
            jobs: jobs.len(),
            nodes: flags.len(),
        })
    }
}
