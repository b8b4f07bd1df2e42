//! The open jobs (queued or running) in memory, and each agent's queue of
//! them: one owner for job state, so that a job's row and its place in a
//! queue cannot disagree. Pure; the store is the caller's business.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::{JobRow, JobState};

/// A job waiting in its agent's queue: highest priority first, then oldest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QueuedJob {
    priority: i64,
    seq: u64,
    id: String,
}

impl Ord for QueuedJob {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for QueuedJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Default)]
pub(super) struct Jobs {
    open: HashMap<String, JobRow>,
    /// Per agent, its queued jobs (every one is in `open`, `Queued`).
    queues: HashMap<String, BinaryHeap<QueuedJob>>,
}

impl Jobs {
    pub(super) fn get(&self, id: &str) -> Option<&JobRow> {
        self.open.get(id)
    }

    /// For changes that keep the job's state (usage, attempts); a change of
    /// state goes through [`Jobs::start_next`], [`Jobs::requeue`] or
    /// [`Jobs::remove`].
    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut JobRow> {
        self.open.get_mut(id)
    }

    pub(super) fn len(&self) -> usize {
        self.open.len()
    }

    pub(super) fn count(&self, state: JobState) -> usize {
        self.open.values().filter(|j| j.state == state).count()
    }

    pub(super) fn running(&self) -> impl Iterator<Item = &JobRow> {
        self.open.values().filter(|j| j.state == JobState::Running)
    }

    pub(super) fn clear(&mut self) {
        self.open.clear();
        self.queues.clear();
    }

    /// Jobs waiting in `agent`'s queue.
    pub(super) fn queued_for(&self, agent: &str) -> usize {
        self.queues.get(agent).map_or(0, BinaryHeap::len)
    }

    /// Adds an open job; a queued one joins its agent's queue.
    pub(super) fn insert(&mut self, job: JobRow) {
        let id = job.id.clone();
        let queued = job.state == JobState::Queued;
        self.open.insert(id.clone(), job);
        if queued {
            self.enqueue(&id);
        }
    }

    fn enqueue(&mut self, id: &str) {
        let Some(job) = self.open.get(id) else {
            return;
        };
        let queue = self.queues.entry(job.agent.clone()).or_default();
        if !queue.iter().any(|q| q.id == id) {
            queue.push(QueuedJob {
                priority: job.priority,
                seq: job.seq,
                id: id.to_owned(),
            });
        }
    }

    /// Takes `agent`'s next job off its queue and marks it running on
    /// `node` as attempt n + 1; the job, to store and send.
    pub(super) fn start_next(&mut self, agent: &str, node: &str, now_ms: u64) -> Option<&JobRow> {
        let queue = self.queues.get_mut(agent)?;
        let id = loop {
            let next = queue.pop()?;
            if self.open.contains_key(&next.id) {
                break next.id;
            }
        };
        let job = self.open.get_mut(&id)?;
        job.state = JobState::Running;
        job.attempts += 1;
        job.node = Some(node.to_owned());
        job.updated_ms = now_ms;
        Some(job)
    }

    /// Puts job `id` back in its agent's queue (not running anywhere); the
    /// job, to store.
    pub(super) fn requeue(&mut self, id: &str, now_ms: u64) -> Option<&mut JobRow> {
        let job = self.open.get_mut(id)?;
        job.state = JobState::Queued;
        job.node = None;
        job.updated_ms = now_ms;
        self.enqueue(id);
        self.open.get_mut(id)
    }

    /// Removes job `id` (finished), from its queue too.
    pub(super) fn remove(&mut self, id: &str) -> Option<JobRow> {
        let job = self.open.remove(id)?;
        if let Some(queue) = self.queues.get_mut(&job.agent) {
            queue.retain(|q| q.id != id);
        }
        Some(job)
    }

    /// Empties `agent`'s queue; the ids of the jobs that were in it (still
    /// open: the caller finishes them).
    pub(super) fn take_queue(&mut self, agent: &str) -> Vec<String> {
        self.queues
            .remove(agent)
            .map(|q| q.into_iter().map(|j| j.id).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, agent: &str, priority: i64, seq: u64) -> JobRow {
        JobRow {
            id: id.into(),
            agent: agent.into(),
            message: "m".into(),
            priority,
            seq,
            state: JobState::Queued,
            attempts: 0,
            node: None,
            created_ms: 0,
            updated_ms: 0,
            answer: None,
            error: None,
            usage: None,
        }
    }

    #[test]
    fn jobs_start_highest_priority_first_then_in_submission_order() {
        let mut jobs = Jobs::default();
        for (priority, seq) in [(1, 1), (5, 2), (1, 3), (9, 4), (5, 5)] {
            jobs.insert(job(&format!("{priority}-{seq}"), "a", priority, seq));
        }
        let order: Vec<String> =
            std::iter::from_fn(|| jobs.start_next("a", "pi-1", 0).map(|j| j.id.clone())).collect();
        assert_eq!(order, ["9-4", "5-2", "5-5", "1-1", "1-3"]);
    }

    #[test]
    fn a_job_is_in_its_agents_queue_exactly_while_it_is_queued() {
        let mut jobs = Jobs::default();
        jobs.insert(job("low", "a", 0, 1));
        jobs.insert(job("high", "a", 5, 2));
        jobs.insert(job("other", "b", 9, 3));
        assert_eq!(jobs.queued_for("a"), 2);
        let next = jobs.start_next("a", "pi-1", 7).unwrap();
        assert_eq!(
            (next.id.as_str(), next.state, next.attempts),
            ("high", JobState::Running, 1)
        );
        assert_eq!(jobs.queued_for("a"), 1);
        // Back in the queue once, however often it is requeued.
        jobs.requeue("high", 8).unwrap();
        jobs.requeue("high", 9).unwrap();
        assert_eq!(jobs.queued_for("a"), 2);
        assert_eq!(jobs.get("high").unwrap().node, None);
        // Removed while queued: gone from the queue too.
        jobs.remove("high").unwrap();
        assert_eq!(jobs.queued_for("a"), 1);
        assert_eq!(jobs.start_next("a", "pi-1", 10).unwrap().id, "low");
        assert!(jobs.start_next("a", "pi-1", 11).is_none());
        assert_eq!(jobs.take_queue("b"), ["other"]);
        assert_eq!(
            jobs.count(JobState::Queued),
            1,
            "taken off its queue, still open"
        );
    }
}
