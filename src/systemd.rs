//! Logging and the systemd service protocol (`Type=notify`).
//!
//! Under systemd, logs go to the journal (systemd-journal-logger) with their
//! priority; elsewhere to stderr with a UTC timestamp. `READY=1`, `STATUS=`,
//! `STOPPING=1` and watchdog pings go to `$NOTIFY_SOCKET` and do nothing when
//! it is not set, so the daemons call them unconditionally.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{Level, LevelFilter, Log, Metadata, Record};
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Installs the process logger: the journal when stderr is connected to it,
/// stderr otherwise. The level comes from `PIFLEET_LOG` (error, warn, info,
/// debug, trace; default info).
pub fn init_logging() {
    let level = std::env::var("PIFLEET_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    let installed = if systemd_journal_logger::connected_to_journal() {
        systemd_journal_logger::JournalLog::new()
            .map_err(|e| e.to_string())
            .and_then(|j| j.install().map_err(|e| e.to_string()))
    } else {
        log::set_boxed_logger(Box::new(StderrLog { level })).map_err(|e| e.to_string())
    };
    match installed {
        Ok(()) => log::set_max_level(level),
        Err(e) => eprintln!("pifleet: cannot install logger: {e}"),
    }
}

struct StderrLog {
    level: LevelFilter,
}

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let target = metadata.target();
        if target.starts_with("rumqttd") {
            // The embedded broker of `pifleet up` declares its tracing spans
            // at error level; they are chatter, not errors. Shown at debug.
            return self.level >= LevelFilter::Debug;
        }
        metadata.level() <= self.level
            && (target.starts_with("pifleet") || metadata.level() <= Level::Warn)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "{} {:5} {}: {}\n",
            crate::protocol::utc_timestamp(crate::protocol::now_ms()),
            record.level(),
            record.target(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log::debug!("sd_notify failed: {e}");
    }
}

/// `READY=1` with a status line.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A `STATUS=` line for `systemctl status`.
pub fn notify_status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Liveness of a daemon's main loop, as seen by the watchdog: the loop calls
/// [`Liveness::beat`] on every turn (and at least every second), and the
/// watchdog pings systemd only while the beats are recent, so a hung loop
/// gets the service restarted.
#[derive(Clone, Default)]
pub struct Liveness(Arc<AtomicU64>);

impl Liveness {
    pub fn beat(&self) {
        // Monotonic: a wall clock stepped by NTP (or fake-hwclock) must not
        // make a live loop look hung, nor a hung one look alive.
        self.0.store(crate::protocol::mono_ms(), Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        let last = self.0.load(Ordering::Relaxed);
        Duration::from_millis(crate::protocol::mono_ms().saturating_sub(last))
    }
}

/// When `WATCHDOG_USEC` is set, spawns a task that sends `WATCHDOG=1` at half
/// the interval while `liveness` is fresher than the interval, until
/// `shutdown`.
pub fn spawn_watchdog(liveness: Liveness, shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    log::info!("systemd watchdog enabled: every {interval:?}");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if liveness.age() < interval {
                        notify(&[NotifyState::Watchdog]);
                    } else {
                        log::warn!("main loop silent for {:?}; withholding the watchdog ping", liveness.age());
                    }
                }
            }
        }
    });
}

/// A token cancelled on the first SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        log::info!("received {signal}; shutting down");
        cancel.cancel();
    });
    token
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
