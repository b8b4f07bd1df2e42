//! The node's lease on its agents (docs/RELIABILITY.md).
//!
//! A node may host agents only while it has recent proof that the broker
//! received its heartbeats: the coordinator hears those same heartbeats, and
//! places a node's agents elsewhere only `fence_secs` after it last heard
//! one. The proof is the heartbeat itself coming back: the node subscribes to
//! its own capacity topic, and a capacity message it published, routed back
//! by the broker, renews the lease **from the moment it was sent**. So the
//! lease never outlives what the coordinator saw by more than the time the
//! message took to reach it; any other packet (a PINGRESP, a command, a
//! PUBACK of a reply) proves nothing about what the coordinator heard, and
//! renews nothing.
//!
//! Pure and clock-free: callers pass the (monotonic) instants.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

/// Heartbeats remembered while waiting for their echo: enough for a
/// `fence_secs` of heartbeats at the fastest rate plus capacity changes.
const REMEMBERED: usize = 32;

#[derive(Debug)]
pub struct Lease {
    fence_after: Duration,
    /// Hashes of heartbeats sent and not echoed yet, oldest first.
    sent: VecDeque<(u64, Instant)>,
    /// When the newest echoed heartbeat was sent; `None` before the first.
    renewed: Option<Instant>,
}

fn key(payload: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

impl Lease {
    pub fn new(fence_after: Duration) -> Lease {
        Lease {
            fence_after,
            sent: VecDeque::new(),
            renewed: None,
        }
    }

    /// A heartbeat (its exact payload) handed to the link at `at`.
    pub fn sent(&mut self, payload: &[u8], at: Instant) {
        self.sent.push_back((key(payload), at));
        if self.sent.len() > REMEMBERED {
            self.sent.pop_front();
        }
    }

    /// A message on the node's own capacity topic came back from the
    /// broker; true if it was one of our heartbeats (the lease is renewed
    /// from when it was sent).
    pub fn echoed(&mut self, payload: &[u8]) -> bool {
        let k = key(payload);
        let Some(i) = self.sent.iter().position(|(h, _)| *h == k) else {
            return false;
        };
        let at = self.sent[i].1;
        // Older heartbeats can only prove less.
        self.sent.drain(..=i);
        self.renewed = Some(self.renewed.map_or(at, |r| r.max(at)));
        true
    }

    /// When the lease runs out (`None`: it never began).
    pub fn expires_at(&self) -> Option<Instant> {
        self.renewed.map(|r| r + self.fence_after)
    }

    /// True once the lease ran out, or before it began.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at().is_none_or(|e| e <= now)
    }

    /// How long ago the proof behind the lease was sent (`None`: never).
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.renewed.map(|r| now.saturating_duration_since(r))
    }

    pub fn fence_after(&self) -> Duration {
        self.fence_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FENCE: Duration = Duration::from_secs(7);

    #[test]
    fn no_lease_before_the_first_echo() {
        let t0 = Instant::now();
        let mut lease = Lease::new(FENCE);
        assert!(lease.expired(t0));
        lease.sent(b"hb1", t0);
        assert!(
            lease.expired(t0 + Duration::from_secs(1)),
            "sending proves nothing"
        );
        assert!(lease.echoed(b"hb1"));
        assert!(!lease.expired(t0 + Duration::from_secs(6)));
    }

    #[test]
    fn the_lease_ends_fence_secs_after_the_echoed_heartbeat_was_sent() {
        let t0 = Instant::now();
        let mut lease = Lease::new(FENCE);
        lease.sent(b"hb1", t0);
        // The echo arrives 5 s late (a slow link, a frozen process): the
        // lease still ends 7 s after sending.
        assert!(lease.echoed(b"hb1"));
        assert_eq!(lease.expires_at(), Some(t0 + FENCE));
        assert!(lease.expired(t0 + FENCE));
    }

    #[test]
    fn other_messages_and_repeated_echoes_renew_nothing() {
        let t0 = Instant::now();
        let mut lease = Lease::new(FENCE);
        lease.sent(b"hb1", t0);
        lease.sent(b"hb2", t0 + Duration::from_secs(2));
        assert!(!lease.echoed(b"a retained capacity of an older session"));
        assert!(lease.expired(t0));
        assert!(lease.echoed(b"hb2"));
        // hb1 was older than hb2: forgotten, and its late echo cannot move
        // the lease back.
        assert!(!lease.echoed(b"hb1"));
        assert!(!lease.echoed(b"hb2"), "a duplicate delivery renews nothing");
        assert_eq!(
            lease.expires_at(),
            Some(t0 + Duration::from_secs(2) + FENCE)
        );
    }
}
