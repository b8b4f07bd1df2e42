//! Models on demand: pulls asked through `POST /v1/pulls`, or by
//! `scheduler.auto_pull` for an agent whose model no eligible node has.
//! A pull is a `pull` command to one node, whose Ollama pulls the model and
//! reports progress; once the node lists the model in its capacity, the
//! next placement pass places the agents that waited for it. One pull at a
//! time per node is started by `auto_pull`; a failed one is shown on the
//! agents that wait and tried again on that node after [`PULL_RETRY_AFTER`],
//! doubled with each failure in a row (up to an hour): a model name that no
//! registry has does not cost a download attempt a minute forever.
//!
//! A node reports a pull at least every 10 s while it runs; one not heard
//! of for [`PULL_SILENT_AFTER`] (its command or its progress lost, the node
//! restarted) counts as failed.

use super::*;
use crate::protocol::{normalize_model, PullList, PullProgress, PullState, PullView};

/// A failed pull is not tried again on its node for this long (doubled
/// with each failure in a row, up to [`PULL_RETRY_MAX`]).
pub(super) const PULL_RETRY_AFTER: Duration = Duration::from_secs(60);
const PULL_RETRY_MAX: Duration = Duration::from_secs(3600);
/// A pull not heard of for this long has failed.
const PULL_SILENT_AFTER: Duration = Duration::from_secs(60);
/// A pulled model counts as under way until the node lists it, for at
/// most this long (its capacity message follows the last progress).
const LISTED_WITHIN: Duration = Duration::from_secs(30);
/// Ended pulls are listed this long.
const PULLS_KEPT: Duration = Duration::from_secs(3600);

/// The latest pull of one model on one node.
pub(super) struct Pull {
    state: PullState,
    status: String,
    completed: u64,
    total: u64,
    error: Option<String>,
    reason: String,
    started: Instant,
    /// When the node last reported it.
    heard: Instant,
    ended: Option<Instant>,
    /// Failures in a row of this model on this node, this one included.
    failures: u32,
}

impl Pull {
    /// A failure recent enough that the pull is not tried again yet.
    fn failed_lately(&self, now: Instant) -> bool {
        let backoff = PULL_RETRY_AFTER
            .saturating_mul(1 << self.failures.saturating_sub(1).min(6))
            .min(PULL_RETRY_MAX);
        self.state == PullState::Failed
            && self.ended.is_some_and(|t| now.duration_since(t) < backoff)
    }

    fn describe(&self) -> String {
        match self.total {
            0 => self.status.clone(),
            total => format!(
                "{}, {}%",
                self.status,
                self.completed.saturating_mul(100) / total
            ),
        }
    }
}

impl Coordinator {
    /// `POST /v1/pulls`: pulls `model` on `nodes` (all online nodes that
    /// lack it when empty).
    pub fn pull_model(
        &mut self,
        model: &str,
        nodes: Vec<String>,
        now: Now,
    ) -> Result<PullList, CoreError> {
        self.now = now;
        if !self.link_up {
            return Err(CoreError::NoBroker);
        }
        let model = normalize_model(model);
        let targets: Vec<String> = if nodes.is_empty() {
            self.fleet
                .nodes()
                .filter(|n| self.fleet.is_online(&n.id))
                .filter(|n| {
                    !n.capacity
                        .as_ref()
                        .is_some_and(|c| c.models.contains(&model))
                })
                .map(|n| n.id.clone())
                .collect()
        } else {
            for node in &nodes {
                if self.fleet.get(node).is_none() {
                    return Err(CoreError::NotFound(format!("no node named {node}")));
                }
                if !self.fleet.is_online(node) {
                    return Err(CoreError::Conflict {
                        code: "offline",
                        message: format!("node {node} is not online"),
                    });
                }
            }
            nodes
        };
        if targets.is_empty() {
            return Err(CoreError::Conflict {
                code: "nothing_to_pull",
                message: format!("every online node has {model} already"),
            });
        }
        for node in &targets {
            if !self.pulling_on(node, Some(&model)) {
                self.start_pull(node, &model, "asked through the API".into());
            }
        }
        let mut list = self.pull_list();
        list.pulls
            .retain(|p| p.model == model && targets.contains(&p.node));
        Ok(list)
    }

    /// `GET /v1/pulls`.
    pub fn pull_list(&self) -> PullList {
        let pulls = self
            .pulls
            .iter()
            .map(|((node, model), p)| PullView {
                node: node.clone(),
                model: model.clone(),
                state: p.state,
                status: p.status.clone(),
                completed: p.completed,
                total: p.total,
                error: p.error.clone(),
                reason: p.reason.clone(),
                secs: self.now.at.saturating_duration_since(p.started).as_secs(),
            })
            .collect();
        PullList { pulls }
    }

    /// Whether `node` runs a pull (of `model`, or of any model).
    fn pulling_on(&self, node: &str, model: Option<&str>) -> bool {
        self.pulls.iter().any(|((n, m), p)| {
            n == node && p.state == PullState::Pulling && model.is_none_or(|want| m == want)
        })
    }

    fn start_pull(&mut self, node: &str, model: &str, reason: String) {
        self.send(
            node,
            CommandBody::Pull {
                model: model.to_owned(),
            },
        );
        let message = format!("{node} pulls {model} ({reason})");
        let key = (node.to_owned(), model.to_owned());
        let failures = self.pulls.get(&key).map_or(0, |p| p.failures);
        let now = self.now.at;
        self.pulls.insert(
            key,
            Pull {
                state: PullState::Pulling,
                status: "asked".into(),
                completed: 0,
                total: 0,
                error: None,
                reason,
                started: now,
                heard: now,
                ended: None,
                failures,
            },
        );
        self.event(EventKind::PullStarted, None, Some(node), message);
    }

    pub(super) fn on_pull_progress(&mut self, node: &str, progress: PullProgress) {
        let now = self.now.at;
        let key = (node.to_owned(), normalize_model(&progress.model));
        // A pull from before a restart of ours is reported all the same.
        let pull = self.pulls.entry(key.clone()).or_insert_with(|| Pull {
            state: PullState::Pulling,
            status: String::new(),
            completed: 0,
            total: 0,
            error: None,
            reason: "started before this coordinator".into(),
            started: now,
            heard: now,
            ended: None,
            failures: 0,
        });
        if pull.state != PullState::Pulling {
            return; // a late or repeated report of an ended pull
        }
        pull.heard = now;
        pull.state = progress.state;
        pull.status = progress.status;
        pull.completed = progress.completed;
        pull.total = progress.total;
        pull.error = progress.error;
        let (node, model) = key;
        match pull.state {
            PullState::Pulling => {}
            PullState::Done => {
                pull.ended = Some(now);
                pull.failures = 0;
                let message = format!("{node} pulled {model}");
                self.event(EventKind::PullDone, None, Some(&node), message);
            }
            PullState::Failed => {
                pull.ended = Some(now);
                pull.failures += 1;
                let error = pull.error.clone().unwrap_or_default();
                let message = format!("{node} could not pull {model}: {error}");
                self.event(EventKind::PullFailed, None, Some(&node), message);
            }
        }
    }

    /// A lost node's pulls end with it.
    pub(super) fn fail_pulls_on(&mut self, node: &str, why: &str) {
        let now = self.now.at;
        for ((n, _), pull) in self.pulls.iter_mut() {
            if n == node && pull.state == PullState::Pulling {
                pull.state = PullState::Failed;
                pull.error = Some(why.to_owned());
                pull.ended = Some(now);
                pull.failures += 1;
            }
        }
    }

    /// Pulls not heard of for [`PULL_SILENT_AFTER`] have failed; ended
    /// ones are forgotten after [`PULLS_KEPT`].
    pub(super) fn prune_pulls(&mut self) {
        let now = self.now.at;
        let silent: Vec<(String, String)> = self
            .pulls
            .iter()
            .filter(|(_, p)| {
                p.state == PullState::Pulling && now.duration_since(p.heard) >= PULL_SILENT_AFTER
            })
            .map(|(key, _)| key.clone())
            .collect();
        for (node, model) in silent {
            let why = format!(
                "no word of it from {node} for {}s (its command or progress was lost, or the node restarted)",
                PULL_SILENT_AFTER.as_secs()
            );
            if let Some(p) = self.pulls.get_mut(&(node.clone(), model.clone())) {
                p.state = PullState::Failed;
                p.error = Some(why.clone());
                p.ended = Some(now);
                p.failures += 1;
            }
            let message = format!("{node} could not pull {model}: {why}");
            self.event(EventKind::PullFailed, None, Some(&node), message);
        }
        self.pulls
            .retain(|_, p| p.ended.is_none_or(|t| now.duration_since(t) < PULLS_KEPT));
    }

    /// Whether `node` lists `model` in its capacity.
    fn lists(&self, node: &str, model: &str) -> bool {
        self.fleet
            .get(node)
            .and_then(|n| n.capacity.as_ref())
            .is_some_and(|c| c.models.iter().any(|m| m == model))
    }

    /// `auto_pull` for pending agent `name`, which no node can take for
    /// want of its model: a pull on the least-loaded eligible node, or the
    /// one under way; its pending reason says which (or why the last
    /// failed).
    pub(super) fn auto_pull(&mut self, scheduler: &Scheduler, name: &str) {
        let now = self.now.at;
        let Some(a) = self.agents.get(name) else {
            return;
        };
        let model = a.spec.model.clone();
        let failed_lately = |p: &Pull| p.failed_lately(now);
        // Pulling, or pulled and not listed by its node yet.
        let under_way = self
            .pulls
            .iter()
            .filter(|((_, m), _)| *m == model)
            .find(|((node, m), p)| {
                p.state == PullState::Pulling
                    || (p.state == PullState::Done
                        && p.ended
                            .is_some_and(|t| now.duration_since(t) < LISTED_WITHIN)
                        && !self.lists(node, m))
            })
            .map(|((node, _), p)| (node.clone(), p.describe()));
        let chosen = match &under_way {
            Some(_) => None,
            None => {
                let request = Request {
                    model: &a.spec.model,
                    labels: &a.spec.labels,
                    avoid: a.avoided(now).or(a.moving_from.as_deref()),
                };
                scheduler.pick_for_pull(&request, |node| {
                    self.pulling_on(node, None)
                        || self
                            .pulls
                            .get(&(node.to_owned(), model.clone()))
                            .is_some_and(failed_lately)
                })
            }
        };
        let reason = if let Some((node, progress)) = under_way {
            format!("waiting for model {model}: {node} is pulling it ({progress})")
        } else if let Some(node) = chosen {
            self.start_pull(&node, &model, format!("auto_pull for agent {name}"));
            format!("waiting for model {model}: {node} is pulling it")
        } else {
            let failure = self
                .pulls
                .iter()
                .filter(|((_, m), p)| *m == model && failed_lately(p))
                .max_by_key(|(_, p)| p.ended)
                .map(|((node, _), p)| {
                    format!(
                        "the pull of {model} on {node} failed: {}; tried again later ({} failures in a row)",
                        p.error.as_deref().unwrap_or("no reason given"),
                        p.failures
                    )
                });
            match failure {
                Some(reason) => reason,
                None => return, // the scheduler's reason stands
            }
        };
        if let Some(a) = self.agents.get_mut(name) {
            a.pending_reason = Some(reason);
        }
    }
}
