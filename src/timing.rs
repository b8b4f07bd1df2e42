//! Waiting for an optional deadline, for `select!` loops that have a timer
//! only some of the time.

use std::time::Instant;

/// Sleeps until `at`, or forever when there is no deadline.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
