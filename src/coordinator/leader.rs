//! Leadership among coordinators that share a PostgreSQL store
//! (docs/HA.md). The lease itself, and why a row, is in
//! [`super::store::lease`]; this is the daemon's side:
//!
//! * a **follower** polls the lease row every [`FOLLOW_POLL`]: it learns
//!   who leads (its API answers by proxying to the leader) and takes the
//!   lead once the lease has expired by the database's clock;
//! * a **leader** renews every third of the lease, and times its lease on
//!   its own monotonic clock from *before* each renewal was sent: it stops
//!   acting (publishing) two thirds of a lease after the last renewal that
//!   succeeded, before the lease can have expired anywhere else. A watch
//!   task does this even while the core is blocked in a store call.
//!
//! With SQLite there is one coordinator: it always leads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::store::{lease::Leader, Store, StoreError};
use crate::config::coordinator::LeaderSettings;

/// How often a follower reads the lease row and tries to take the lead.
pub const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// What this coordinator is, as its API tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not connected to its store yet (or lost it).
    Starting,
    /// Another coordinator leads (or none does yet: `None`).
    Follower(Option<Leader>),
    Leader {
        term: u64,
    },
}

/// Shared between the daemon's loop and its HTTP handlers.
pub struct Leadership {
    /// False with SQLite: then this coordinator always leads.
    pub shared: bool,
    pub id: String,
    role: Mutex<Role>,
    /// While leading: whether the lease, as timed here, still holds.
    acting: AtomicBool,
    /// Monotonic ms (since `epoch`) at which acting ends unless renewed.
    deadline_ms: AtomicU64,
    epoch: Instant,
}

impl Leadership {
    pub fn new(shared: bool, id: String) -> Leadership {
        Leadership {
            shared,
            id,
            role: Mutex::new(if shared {
                Role::Starting
            } else {
                Role::Leader { term: 0 }
            }),
            acting: AtomicBool::new(!shared),
            deadline_ms: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
            .lock()
            .map(|r| r.clone())
            .unwrap_or(Role::Starting)
    }

    pub fn set_role(&self, role: Role) {
        if let Ok(mut r) = self.role.lock() {
            *r = role;
        }
    }

    /// Whether this coordinator leads: its API serves requests itself.
    pub fn leads(&self) -> bool {
        matches!(self.role(), Role::Leader { .. })
    }

    /// Whether it may still publish: it leads and its lease holds, read
    /// from the monotonic clock now (the watch task's flag may be late:
    /// the process was frozen, or it is stopping).
    pub fn acting(&self) -> bool {
        let deadline = self.deadline_ms.load(Ordering::Acquire);
        self.acting.load(Ordering::Acquire)
            && (deadline == u64::MAX || self.mono_ms(Instant::now()) < deadline)
    }

    fn mono_ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// A renewal sent at `sent` succeeded: acting holds until two thirds
    /// of `lease` after it.
    pub fn renewed(&self, sent: Instant, lease: Duration) {
        let deadline = self.mono_ms(sent + lease * 2 / 3);
        self.deadline_ms.store(deadline, Ordering::Release);
        self.acting.store(true, Ordering::Release);
    }

    /// Stops acting now (deposed, stepping down, stopping).
    pub fn stop_acting(&self) {
        self.acting.store(false, Ordering::Release);
        self.deadline_ms.store(u64::MAX, Ordering::Release);
    }

    /// Ends acting at the deadline, whatever the core is doing.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let deadline = self.deadline_ms.load(Ordering::Acquire);
            let wait = if deadline == u64::MAX {
                Duration::from_millis(100)
            } else {
                let now = self.mono_ms(Instant::now());
                Duration::from_millis(deadline.saturating_sub(now).min(100))
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let deadline = self.deadline_ms.load(Ordering::Acquire);
            if deadline != u64::MAX
                && self.mono_ms(Instant::now()) >= deadline
                && self.acting.swap(false, Ordering::AcqRel)
            {
                log::warn!(
                    "the lease was not renewed in time: no longer acting as the leader (nothing is published until it is renewed)"
                );
            }
        }
    }

    /// What `/ready` says about leadership.
    pub fn describe(&self) -> Value {
        match self.role() {
            Role::Starting => json!({"role": "starting"}),
            Role::Leader { term } if self.shared => {
                json!({"role": "leader", "leader": self.id, "term": term})
            }
            Role::Leader { .. } => json!({"role": "leader"}),
            Role::Follower(None) => json!({"role": "follower", "leader": null}),
            Role::Follower(Some(l)) => json!({
                "role": "follower", "leader": l.holder, "leader_api": l.api, "term": l.term
            }),
        }
    }
}

/// Follows until the lease is free, then takes it: the term. `Ok(None)`
/// when `shutdown` comes first; `Err` when the store fails (the caller
/// connects again).
pub async fn follow(
    store: &mut Store,
    settings: &LeaderSettings,
    leadership: &Leadership,
    shutdown: &CancellationToken,
) -> Result<Option<u64>, StoreError> {
    let mut announced: Option<(String, u64)> = None;
    loop {
        let leader = store.leader()?;
        let current = Some((leader.holder.clone(), leader.term));
        if leader.live && leader.holder != settings.id && announced != current {
            log::info!(
                "following coordinator {} (term {}, API {})",
                leader.holder,
                leader.term,
                leader.api
            );
            announced = current;
        }
        let live = leader.live && leader.holder != settings.id;
        leadership.set_role(Role::Follower(live.then_some(leader)));
        let now_ms = crate::protocol::now_ms();
        let sent = Instant::now();
        if let Some(term) =
            store.try_lead(&settings.id, &settings.advertise, settings.lease, now_ms)?
        {
            leadership.renewed(sent, settings.lease);
            return Ok(Some(term));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acting_ends_at_the_deadline_even_with_no_watch_task() {
        let l = Leadership::new(true, "c1".into());
        assert!(
            !l.acting(),
            "a coordinator on a shared store starts not acting"
        );
        l.renewed(Instant::now(), Duration::from_millis(300));
        assert!(l.acting());
        std::thread::sleep(Duration::from_millis(250));
        assert!(!l.acting(), "two thirds of the lease passed");
        l.renewed(Instant::now(), Duration::from_secs(3));
        l.stop_acting();
        assert!(!l.acting());
        assert!(
            Leadership::new(false, "c".into()).acting(),
            "alone on SQLite it always acts"
        );
    }
}
