//! The coordinator's configuration (`pifleet coordinator --config FILE`);
//! [`DEFAULT_COORDINATOR_CONFIG`] is what `pifleet config default
//! coordinator` prints. The API token may come from `PIFLEET_API_TOKEN`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{
    int_in, secs_in, socket_addr, Checker, ConfigError, LoadError, MqttConfig, RawMqtt, Source,
};

/// The commented default printed by `pifleet config default coordinator`.
pub const DEFAULT_COORDINATOR_CONFIG: &str = r#"# pifleet coordinator configuration (/etc/pifleet/coordinator.toml).
# Check it with: pifleet config check /etc/pifleet/coordinator.toml

# Messages of history kept per agent (oldest dropped first) and sent with
# every chat turn.
history_limit = 100

[mqtt]
host = "127.0.0.1"
# hosts = ["192.168.4.10", "192.168.4.11:1884"]   # instead of host: brokers tried in turn (docs/HA.md)
port = 1883
# username = "coordinator"
# password = "..."            # or set PIFLEET_MQTT_PASSWORD
# tls_ca_file = "/etc/pifleet/mqtt-ca.pem"   # TLS, the broker verified against this CA (PEM)
keep_alive_secs = 15
topic_root = "pifleet"
max_payload_bytes = 1048576

[api]
listen = "127.0.0.1:9470"
# With a token, every /v1 call needs "Authorization: Bearer <token>".
# token = "..."               # or set PIFLEET_API_TOKEN
# Largest request body accepted (bytes).
max_body_bytes = 262144

[store]
path = "/var/lib/pifleet/coordinator.db"
# Several coordinators sharing one PostgreSQL instead (docs/HA.md): set
# url and remove path; one leads, the others follow and take over.
# url = "postgres://pifleet:secret@db.lan/pifleet"
# (or, keeping the password out of this file: the systemd credential
# store_url, or PIFLEET_STORE_URL, which replace url and path)
# Each commit waits for PostgreSQL to flush it to disk. false: faster, but
# the last second of commits may be lost if the database's host loses power
# (as with SQLite's synchronous = NORMAL); leadership is always flushed.
# synchronous_commit = true

# [leader]
# id = "pi-c1"                         # default: the host name
# advertise = "http://pi-c1.lan:9470"  # this API as the others reach it
# lease_secs = 3

[timeouts]
# A node is lost when no capacity message came from it for this long (it
# sends one every heartbeat_secs, 2 by default)... Keep it above the
# nodes' fence_secs (7), so that a silent node stops its agents before they
# are placed elsewhere. Raise both on slow or lossy links.
node_lost_after_secs = 9
# ...or this long after its last will ('offline') unless it speaks again.
offline_grace_secs = 1
# Seconds to wait after a node is lost before placing its agents elsewhere,
# on top of the node's own fence (which is always waited for after a
# silence). A node lost by its last will moves after offline_grace_secs
# alone: set offline_grace_secs above the nodes' fence_secs to be sure no
# agent runs twice even then, at the price of slower failover
# (docs/RELIABILITY.md).
fence_secs = 0
# An assignment not acknowledged in time is placed elsewhere.
assign_ack_secs = 10
# A chat turn not answered in time fails with 504.
chat_secs = 120
# A job turn not answered in time is retried.
job_secs = 300

[queue]
# Jobs waiting per agent and in total; beyond that, 429 with Retry-After.
max_jobs_per_agent = 100
max_jobs = 10000
# Attempts per job before it is failed.
max_attempts = 3
# Seconds suggested to clients in Retry-After.
retry_after_secs = 5
# Completed and failed jobs are kept this long (GET /v1/jobs/{id}), then
# deleted, so the store does not grow forever. 604800 = 7 days.
keep_finished_secs = 604800

[scheduler]
# Move agents off a node more than this factor above the fleet's average
# utilisation (seed 001: 1.2). 0 turns rebalancing off.
rebalance_threshold = 1.2
# Agents in motion at once for rebalancing.
rebalance_max_moves = 2
# Draining: agents moved at once, and seconds after which the rest are moved
# regardless.
drain_max_parallel = 2
drain_deadline_secs = 300
# An agent whose model no eligible node has makes the least-loaded eligible
# node with room pull it through Ollama (one pull per node at a time); the
# agent runs once the pull is done. Off: it stays pending, saying why.
auto_pull = false

[home_assistant]
# MQTT discovery: a device per node and one for the fleet appear in Home
# Assistant by themselves (docs/MONITORING.md).
discovery = true
discovery_prefix = "homeassistant"
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    history_limit: Option<Spanned<i64>>,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    leader: RawLeader,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    scheduler: RawScheduler,
    #[serde(default)]
    home_assistant: RawHomeAssistant,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHomeAssistant {
    discovery: Option<Spanned<bool>>,
    discovery_prefix: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    synchronous_commit: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeader {
    id: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    lease_secs: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    node_lost_after_secs: Option<Spanned<i64>>,
    offline_grace_secs: Option<Spanned<i64>>,
    fence_secs: Option<Spanned<i64>>,
    assign_ack_secs: Option<Spanned<i64>>,
    chat_secs: Option<Spanned<i64>>,
    job_secs: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    max_jobs_per_agent: Option<Spanned<i64>>,
    max_jobs: Option<Spanned<i64>>,
    max_attempts: Option<Spanned<i64>>,
    retry_after_secs: Option<Spanned<i64>>,
    keep_finished_secs: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    rebalance_threshold: Option<Spanned<f64>>,
    rebalance_max_moves: Option<Spanned<i64>>,
    drain_max_parallel: Option<Spanned<i64>>,
    drain_deadline_secs: Option<Spanned<i64>>,
    auto_pull: Option<Spanned<bool>>,
}

/// A PostgreSQL store's URL.
fn store_url(url: String) -> Result<String, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(url)
    } else {
        Err("must be a postgres:// URL".into())
    }
}

/// An API token: at least 16 characters, none of them blank or a control
/// character (it travels in an HTTP header).
fn api_token(token: String) -> Result<Option<String>, String> {
    if token.chars().count() < 16 {
        Err("must be at least 16 characters".into())
    } else if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("must not contain spaces or control characters".into())
    } else {
        Ok(Some(token))
    }
}

/// Validated coordinator configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    pub history_limit: usize,
    pub mqtt: MqttConfig,
    pub api: CoordinatorApi,
    pub store_path: PathBuf,
    /// A PostgreSQL store shared by several coordinators, instead of the
    /// SQLite file at `store_path` (docs/HA.md).
    pub store_url: Option<String>,
    /// PostgreSQL waits for each commit's WAL flush (`synchronous_commit`,
    /// the default; docs/HA.md).
    pub store_synchronous_commit: bool,
    pub leader: LeaderSettings,
    pub timeouts: Timeouts,
    pub queue: QueueLimits,
    pub scheduler: SchedulerSettings,
    pub home_assistant: HomeAssistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HomeAssistant {
    pub discovery: bool,
    pub discovery_prefix: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorApi {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub max_body_bytes: usize,
}

/// How a coordinator on a shared store takes part in leadership.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderSettings {
    /// This coordinator's name in the lease (default: the host name).
    pub id: String,
    /// The URL of this coordinator's API as the other coordinators reach
    /// it: followers send requests there while this one leads.
    pub advertise: String,
    pub lease: Duration,
}

impl LeaderSettings {
    fn defaults(listen: SocketAddr) -> LeaderSettings {
        let host = crate::config::host_name();
        let advertise = if listen.ip().is_unspecified() {
            format!("http://{host}:{}", listen.port())
        } else {
            format!("http://{listen}")
        };
        LeaderSettings {
            id: host,
            advertise,
            lease: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub node_lost_after: Duration,
    pub offline_grace: Duration,
    pub fence: Duration,
    pub assign_ack: Duration,
    pub chat: Duration,
    pub job: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueLimits {
    pub max_jobs_per_agent: usize,
    pub max_jobs: usize,
    pub max_attempts: u32,
    pub retry_after_secs: u64,
    /// How long finished jobs stay in the store.
    pub keep_finished: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerSettings {
    /// 0 disables rebalancing.
    pub rebalance_threshold: f64,
    pub rebalance_max_moves: usize,
    pub drain_max_parallel: usize,
    pub drain_deadline: Duration,
    pub auto_pull: bool,
}

impl CoordinatorConfig {
    /// Every default, with the store at `store_path` (for `pifleet up` and tests).
    pub fn with_defaults(store_path: PathBuf) -> CoordinatorConfig {
        CoordinatorConfig {
            history_limit: 100,
            mqtt: MqttConfig::default(),
            api: CoordinatorApi {
                listen: "127.0.0.1:9470".parse().expect("valid default"),
                token: None,
                max_body_bytes: 256 * 1024,
            },
            store_path,
            store_url: None,
            store_synchronous_commit: true,
            leader: LeaderSettings::defaults("127.0.0.1:9470".parse().expect("valid default")),
            timeouts: Timeouts {
                node_lost_after: Duration::from_secs(9),
                offline_grace: Duration::from_secs(1),
                fence: Duration::ZERO,
                assign_ack: Duration::from_secs(10),
                chat: Duration::from_secs(120),
                job: Duration::from_secs(300),
            },
            queue: QueueLimits {
                max_jobs_per_agent: 100,
                max_jobs: 10_000,
                max_attempts: 3,
                retry_after_secs: 5,
                keep_finished: Duration::from_secs(7 * 24 * 3600),
            },
            scheduler: SchedulerSettings {
                rebalance_threshold: 1.2,
                rebalance_max_moves: 2,
                drain_max_parallel: 2,
                drain_deadline: Duration::from_secs(300),
                auto_pull: false,
            },
            home_assistant: HomeAssistant {
                discovery: true,
                discovery_prefix: "homeassistant".to_owned(),
            },
        }
    }

    /// Reads and validates `path`, then applies environment overrides.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, LoadError> {
        let text = super::read(path)?;
        let mut config = CoordinatorConfig::parse(&path.display().to_string(), &text)?;
        config.mqtt.apply_env()?;
        if let Some(token) = super::credential("api_token")? {
            config.api.token = api_token(token).map_err(|message| LoadError::Credential {
                path: "api_token".into(),
                message,
            })?;
        }
        config.token_from_env(std::env::var("PIFLEET_API_TOKEN").ok())?;
        // A PostgreSQL URL carries a password: it may come as a secret
        // rather than in the (world-readable) file, and then replaces the
        // file's [store].
        if let Some(url) = super::credential("store_url")? {
            config.store_url = Some(store_url(url).map_err(|message| LoadError::Credential {
                path: "store_url".into(),
                message,
            })?);
        }
        if let Ok(url) = std::env::var("PIFLEET_STORE_URL") {
            config.store_url = Some(store_url(url).map_err(|message| LoadError::Env {
                var: "PIFLEET_STORE_URL",
                message,
            })?);
        }
        Ok(config)
    }

    /// `PIFLEET_API_TOKEN`, if set, replaces `api.token`, checked as the
    /// file's is.
    pub fn token_from_env(&mut self, token: Option<String>) -> Result<(), LoadError> {
        if let Some(token) = token {
            let token = api_token(token).map_err(|message| LoadError::Env {
                var: "PIFLEET_API_TOKEN",
                message,
            })?;
            self.api.token = token;
        }
        Ok(())
    }

    pub fn parse(name: &str, text: &str) -> Result<CoordinatorConfig, ConfigError> {
        let source = Source {
            name: name.to_owned(),
            text,
        };
        let raw: RawCoordinator = source.parse()?;
        let mut c = Checker::new(&source);
        let d = CoordinatorConfig::with_defaults(PathBuf::from("/var/lib/pifleet/coordinator.db"));
        let history_limit = c.value(
            "history_limit",
            &raw.history_limit,
            d.history_limit,
            int_in(1, 100_000),
        );
        let mqtt = MqttConfig::validate(&raw.mqtt, &mut c);
        let api = CoordinatorApi {
            listen: c.value("api.listen", &raw.api.listen, d.api.listen, socket_addr),
            token: c.value("api.token", &raw.api.token, None, api_token),
            max_body_bytes: c.value(
                "api.max_body_bytes",
                &raw.api.max_body_bytes,
                d.api.max_body_bytes,
                int_in(1024, 64 * 1024 * 1024),
            ),
        };
        let store_path = c.value("store.path", &raw.store.path, d.store_path, |p: String| {
            if p.trim().is_empty() {
                Err("must not be empty".into())
            } else {
                Ok(PathBuf::from(p))
            }
        });
        let store_url = c.value("store.url", &raw.store.url, None, |u: String| {
            if raw.store.path.is_some() {
                Err("set either store.path (SQLite) or store.url (PostgreSQL), not both".into())
            } else {
                store_url(u).map(Some)
            }
        });
        let store_synchronous_commit = c.value(
            "store.synchronous_commit",
            &raw.store.synchronous_commit,
            true,
            Ok::<bool, String>,
        );
        let dl = LeaderSettings::defaults(api.listen);
        let l = &raw.leader;
        let leader = LeaderSettings {
            id: c.value("leader.id", &l.id, dl.id, |id: String| {
                crate::protocol::validate_node_id(&id).map(|()| id)
            }),
            advertise: c.value(
                "leader.advertise",
                &l.advertise,
                dl.advertise,
                |u: String| match url::Url::parse(&u) {
                    Ok(parsed) if parsed.scheme() == "http" || parsed.scheme() == "https" => {
                        Ok(u.trim_end_matches('/').to_owned())
                    }
                    _ => Err(format!("{u:?} is not an http:// or https:// URL")),
                },
            ),
            lease: c.value("leader.lease_secs", &l.lease_secs, dl.lease, secs_in(2, 60)),
        };
        let t = &raw.timeouts;
        let timeouts = Timeouts {
            node_lost_after: c.value(
                "timeouts.node_lost_after_secs",
                &t.node_lost_after_secs,
                d.timeouts.node_lost_after,
                secs_in(2, 3600),
            ),
            offline_grace: c.value(
                "timeouts.offline_grace_secs",
                &t.offline_grace_secs,
                d.timeouts.offline_grace,
                secs_in(0, 600),
            ),
            fence: c.value(
                "timeouts.fence_secs",
                &t.fence_secs,
                d.timeouts.fence,
                secs_in(0, 86_400),
            ),
            assign_ack: c.value(
                "timeouts.assign_ack_secs",
                &t.assign_ack_secs,
                d.timeouts.assign_ack,
                secs_in(1, 3600),
            ),
            chat: c.value(
                "timeouts.chat_secs",
                &t.chat_secs,
                d.timeouts.chat,
                secs_in(1, 86_400),
            ),
            job: c.value(
                "timeouts.job_secs",
                &t.job_secs,
                d.timeouts.job,
                secs_in(1, 86_400),
            ),
        };
        let q = &raw.queue;
        let queue = QueueLimits {
            max_jobs_per_agent: c.value(
                "queue.max_jobs_per_agent",
                &q.max_jobs_per_agent,
                d.queue.max_jobs_per_agent,
                int_in(1, 1_000_000),
            ),
            max_jobs: c.value(
                "queue.max_jobs",
                &q.max_jobs,
                d.queue.max_jobs,
                int_in(1, 10_000_000),
            ),
            max_attempts: c.value(
                "queue.max_attempts",
                &q.max_attempts,
                d.queue.max_attempts,
                int_in(1, 100),
            ),
            retry_after_secs: c.value(
                "queue.retry_after_secs",
                &q.retry_after_secs,
                d.queue.retry_after_secs,
                int_in(1, 3600),
            ),
            keep_finished: c.value(
                "queue.keep_finished_secs",
                &q.keep_finished_secs,
                d.queue.keep_finished,
                secs_in(1, 10 * 365 * 24 * 3600),
            ),
        };
        let s = &raw.scheduler;
        let scheduler = SchedulerSettings {
            rebalance_threshold: c.value(
                "scheduler.rebalance_threshold",
                &s.rebalance_threshold,
                d.scheduler.rebalance_threshold,
                |v: f64| {
                    if v == 0.0 || (1.0..=10.0).contains(&v) {
                        Ok(v)
                    } else {
                        Err(format!("must be 0 (off) or between 1.0 and 10.0 (got {v})"))
                    }
                },
            ),
            rebalance_max_moves: c.value(
                "scheduler.rebalance_max_moves",
                &s.rebalance_max_moves,
                d.scheduler.rebalance_max_moves,
                int_in(1, 10_000),
            ),
            drain_max_parallel: c.value(
                "scheduler.drain_max_parallel",
                &s.drain_max_parallel,
                d.scheduler.drain_max_parallel,
                int_in(1, 10_000),
            ),
            drain_deadline: c.value(
                "scheduler.drain_deadline_secs",
                &s.drain_deadline_secs,
                d.scheduler.drain_deadline,
                secs_in(0, 86_400),
            ),
            auto_pull: c.value(
                "scheduler.auto_pull",
                &s.auto_pull,
                d.scheduler.auto_pull,
                Ok,
            ),
        };
        let h = &raw.home_assistant;
        let home_assistant = HomeAssistant {
            discovery: c.value(
                "home_assistant.discovery",
                &h.discovery,
                d.home_assistant.discovery,
                Ok,
            ),
            discovery_prefix: c.value(
                "home_assistant.discovery_prefix",
                &h.discovery_prefix,
                d.home_assistant.discovery_prefix,
                |p: String| crate::protocol::validate_topic_root(&p).map(|_| p),
            ),
        };
        c.finish(CoordinatorConfig {
            history_limit,
            mqtt,
            api,
            store_path,
            store_url,
            store_synchronous_commit,
            leader,
            timeouts,
            queue,
            scheduler,
            home_assistant,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_default_is_valid_and_means_the_defaults() {
        let config = CoordinatorConfig::parse("default", DEFAULT_COORDINATOR_CONFIG).unwrap();
        assert_eq!(
            config,
            CoordinatorConfig::with_defaults(PathBuf::from("/var/lib/pifleet/coordinator.db"))
        );
    }

    #[test]
    fn a_postgres_store_waits_for_each_flush_unless_told_and_a_bad_value_is_named() {
        let url = "[store]\nurl = \"postgres://db/pifleet\"\n";
        let config = CoordinatorConfig::parse("c", url).unwrap();
        assert!(config.store_synchronous_commit);
        let fast = CoordinatorConfig::parse("c", &format!("{url}synchronous_commit = false\n"));
        assert!(!fast.unwrap().store_synchronous_commit);
        let err = CoordinatorConfig::parse("c", &format!("{url}synchronous_commit = \"no\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c:3:") && err.contains("expected a boolean"),
            "{err}"
        );
        let err = CoordinatorConfig::parse("c", "[store]\nurl = \"mysql://db\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("store.url: must be a postgres:// URL"),
            "{err}"
        );
    }

    #[test]
    fn a_token_from_the_environment_is_checked_as_one_in_the_file() {
        let mut config = CoordinatorConfig::parse("c", "").unwrap();
        let err = config.token_from_env(Some("short".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable PIFLEET_API_TOKEN: must be at least 16 characters"
        );
        let err = config
            .token_from_env(Some("0123456789abcdef \n".into()))
            .unwrap_err();
        assert!(err.to_string().contains("spaces or control"), "{err}");
        assert_eq!(config.api.token, None, "a refused token is not used");
        config
            .token_from_env(Some("0123456789abcdef".into()))
            .unwrap();
        assert_eq!(config.api.token.as_deref(), Some("0123456789abcdef"));
        config.token_from_env(None).unwrap();
        assert_eq!(config.api.token.as_deref(), Some("0123456789abcdef"));
    }

    #[test]
    fn an_empty_file_means_every_default() {
        let config = CoordinatorConfig::parse("c", "").unwrap();
        assert_eq!(config.history_limit, 100);
        assert_eq!(config.api.listen.port(), 9470);
    }

    #[test]
    fn bad_values_are_reported_with_their_position() {
        let err = CoordinatorConfig::parse(
            "c.toml",
            "[scheduler]\nrebalance_threshold = 0.5\n[api]\ntoken = \"short\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("c.toml:2:23: scheduler.rebalance_threshold"),
            "{err}"
        );
        assert!(err.contains("c.toml:4:9: api.token"), "{err}");
    }
}
