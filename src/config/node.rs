//! The node daemon's configuration (`pifleet node --config FILE`).
//! Key names are part of the contract (issue 2); [`DEFAULT_NODE_CONFIG`] is
//! what `pifleet config default node` prints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use url::Url;

use super::{
    int_in, secs_in, socket_addr, Checker, ConfigError, LoadError, MqttConfig, RawMqtt, Source,
};

/// The commented default printed by `pifleet config default node`.
pub const DEFAULT_NODE_CONFIG: &str = r#"# pifleet node daemon configuration (/etc/pifleet/node.toml).
# Check it with: pifleet config check /etc/pifleet/node.toml

# Name of this node in MQTT topics and on dashboards: letters, digits, '-',
# '_' and '.'. Defaults to the host name.
# node_id = "pi-1"

# How many agents this node hosts at most (required, at least 1).
agent_capacity = 4

# Seconds between capacity announcements (load, temperature, agents). Each
# that the broker echoes back to the node renews its lease (fence_secs).
heartbeat_secs = 2

# The coordinator places no agent here while the SoC is this hot or hotter.
max_temperature_c = 80.0

# On SIGTERM: seconds to let chat turns in flight finish before giving up.
shutdown_grace_secs = 30

# The node's lease on its agents: this many seconds after the newest
# heartbeat the broker echoed back was sent (cut off, or the process or
# machine frozen) it stops them all and aborts their running turns. The
# coordinator moves a silent node's agents only after that (it learns this
# value from the heartbeats), so an agent never runs on two nodes. At least
# 3 x heartbeat_secs (docs/RELIABILITY.md).
fence_secs = 7

# Labels that agents can require for placement.
[labels]
# room = "attic"
# board = "pi5"

[mqtt]
host = "127.0.0.1"
# hosts = ["192.168.4.10", "192.168.4.11:1884"]   # instead of host: brokers tried in turn (docs/HA.md)
port = 1883
# username = "pi-1"
# password = "..."            # or set PIFLEET_MQTT_PASSWORD
# tls_ca_file = "/etc/pifleet/mqtt-ca.pem"   # TLS, the broker verified against this CA (PEM)
keep_alive_secs = 15
topic_root = "pifleet"
# Largest MQTT payload sent or accepted (bytes).
max_payload_bytes = 1048576

[ollama]
url = "http://127.0.0.1:11434"
# Ollama calls at once for the whole node (like OLLAMA_NUM_PARALLEL).
max_parallel = 1
request_timeout_secs = 120
# A streamed answer's tokens are sent together when they come within this
# many milliseconds of the last chunk sent (the first one goes at once).
stream_window_ms = 50
# Model pulls (asked by the coordinator) that run at once; more wait.
max_pulls = 1

[api]
listen = "127.0.0.1:9480"

[probe]
# Files to read instead of the usual places (for tests and unusual boards).
# temperature_file = "/sys/class/thermal/thermal_zone0/temp"
# throttled_file = "/sys/devices/platform/soc/soc:firmware/get_throttled"
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    node_id: Option<Spanned<String>>,
    agent_capacity: Spanned<i64>,
    labels: Option<Spanned<BTreeMap<String, String>>>,
    heartbeat_secs: Option<Spanned<i64>>,
    max_temperature_c: Option<Spanned<f64>>,
    shutdown_grace_secs: Option<Spanned<i64>>,
    fence_secs: Option<Spanned<i64>>,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    ollama: RawOllama,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    probe: RawProbe,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOllama {
    url: Option<Spanned<String>>,
    max_parallel: Option<Spanned<i64>>,
    request_timeout_secs: Option<Spanned<i64>>,
    stream_window_ms: Option<Spanned<i64>>,
    max_pulls: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    temperature_file: Option<Spanned<String>>,
    throttled_file: Option<Spanned<String>>,
}

/// Validated node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub node_id: String,
    pub agent_capacity: u32,
    pub labels: BTreeMap<String, String>,
    pub heartbeat: Duration,
    pub max_temperature_c: f32,
    pub shutdown_grace: Duration,
    pub fence_after: Duration,
    pub mqtt: MqttConfig,
    pub ollama: OllamaConfig,
    pub api: ApiConfig,
    pub probe: ProbeConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OllamaConfig {
    pub url: Url,
    pub max_parallel: u32,
    pub request_timeout: Duration,
    /// Tokens of a streamed answer are coalesced over this window.
    pub stream_window: Duration,
    /// Model pulls at once.
    pub max_pulls: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeConfig {
    pub temperature_file: Option<PathBuf>,
    pub throttled_file: Option<PathBuf>,
}

/// Parses an Ollama base URL; keeps a trailing `/` so paths join under it.
pub fn ollama_url(v: String) -> Result<Url, String> {
    let mut url = Url::parse(&v).map_err(|e| format!("{v:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "{v:?} must be an http:// or https:// URL with a host"
        ));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

impl NodeConfig {
    /// A configuration with every default, for `pifleet up` and tests.
    pub fn with_defaults(node_id: &str, agent_capacity: u32) -> NodeConfig {
        NodeConfig {
            node_id: node_id.to_owned(),
            agent_capacity,
            labels: BTreeMap::new(),
            heartbeat: Duration::from_secs(2),
            max_temperature_c: 80.0,
            shutdown_grace: Duration::from_secs(30),
            fence_after: Duration::from_secs(7),
            mqtt: MqttConfig::default(),
            ollama: OllamaConfig {
                url: ollama_url("http://127.0.0.1:11434".into()).expect("default URL is valid"),
                max_parallel: 1,
                request_timeout: Duration::from_secs(120),
                stream_window: Duration::from_millis(50),
                max_pulls: 1,
            },
            api: ApiConfig {
                listen: "127.0.0.1:9480".parse().expect("default address is valid"),
            },
            probe: ProbeConfig::default(),
        }
    }

    /// Reads and validates `path`, then applies environment overrides.
    pub fn load(path: &Path) -> Result<NodeConfig, LoadError> {
        let text = super::read(path)?;
        let mut config = NodeConfig::parse(&path.display().to_string(), &text)?;
        config.mqtt.apply_env()?;
        Ok(config)
    }

    /// Validates the text of a node config named `name` (for messages).
    pub fn parse(name: &str, text: &str) -> Result<NodeConfig, ConfigError> {
        let source = Source {
            name: name.to_owned(),
            text,
        };
        let raw: RawNode = source.parse()?;
        let mut c = Checker::new(&source);
        let default_id = || {
            sysinfo::System::host_name()
                .ok()
                .map(|h| h.split('.').next().unwrap_or(&h).to_owned())
                .unwrap_or_else(|| "node".into())
        };
        let node_id = match &raw.node_id {
            Some(_) => c.value("node_id", &raw.node_id, String::new(), |id: String| {
                crate::protocol::validate_node_id(&id).map(|_| id)
            }),
            None => {
                let id = default_id();
                if let Err(e) = crate::protocol::validate_node_id(&id) {
                    c.report(
                        0..0,
                        format!("node_id is not set and the host name cannot be used: {e}"),
                    );
                }
                id
            }
        };
        let capacity = &raw.agent_capacity;
        let agent_capacity = match int_in::<u32>(1, 1_000_000)(*capacity.get_ref()) {
            Ok(v) => v,
            Err(e) => {
                c.report(capacity.span(), format!("agent_capacity: {e}"));
                1
            }
        };
        let labels = c.value(
            "labels",
            &raw.labels,
            BTreeMap::new(),
            |labels| match labels.keys().find(|k| k.is_empty() || k.len() > 63) {
                Some(k) => Err(format!("label name {k:?} must be 1 to 63 characters")),
                None => Ok(labels),
            },
        );
        let heartbeat = c.value(
            "heartbeat_secs",
            &raw.heartbeat_secs,
            Duration::from_secs(2),
            secs_in(1, 3600),
        );
        let max_temperature_c = c.value(
            "max_temperature_c",
            &raw.max_temperature_c,
            80.0,
            |t: f64| {
                if (20.0..=120.0).contains(&t) {
                    Ok(t as f32)
                } else {
                    Err(format!("must be between 20 and 120 degrees (got {t})"))
                }
            },
        );
        let shutdown_grace = c.value(
            "shutdown_grace_secs",
            &raw.shutdown_grace_secs,
            Duration::from_secs(30),
            secs_in(0, 3600),
        );
        let fence_after = c.value(
            "fence_secs",
            &raw.fence_secs,
            Duration::from_secs(7),
            secs_in(1, 86_400),
        );
        if fence_after < heartbeat * 3 {
            let at = raw
                .fence_secs
                .as_ref()
                .map(|s| s.span())
                .or_else(|| raw.heartbeat_secs.as_ref().map(|s| s.span()));
            c.report_at(
                at,
                format!(
                    "fence_secs ({}) must be at least 3 x heartbeat_secs ({}): each heartbeat the broker echoes back renews the lease",
                    fence_after.as_secs(),
                    heartbeat.as_secs()
                ),
            );
        }
        let mqtt = MqttConfig::validate(&raw.mqtt, &mut c);
        let defaults = NodeConfig::with_defaults(&node_id, agent_capacity);
        let ollama = OllamaConfig {
            url: c.value(
                "ollama.url",
                &raw.ollama.url,
                defaults.ollama.url,
                ollama_url,
            ),
            max_parallel: c.value(
                "ollama.max_parallel",
                &raw.ollama.max_parallel,
                1,
                int_in(1, 256),
            ),
            request_timeout: c.value(
                "ollama.request_timeout_secs",
                &raw.ollama.request_timeout_secs,
                defaults.ollama.request_timeout,
                secs_in(1, 86_400),
            ),
            stream_window: c.value(
                "ollama.stream_window_ms",
                &raw.ollama.stream_window_ms,
                defaults.ollama.stream_window,
                |v| int_in::<u64>(0, 5_000)(v).map(Duration::from_millis),
            ),
            max_pulls: c.value(
                "ollama.max_pulls",
                &raw.ollama.max_pulls,
                defaults.ollama.max_pulls,
                int_in(1, 16),
            ),
        };
        let api = ApiConfig {
            listen: c.value(
                "api.listen",
                &raw.api.listen,
                defaults.api.listen,
                socket_addr,
            ),
        };
        let probe = ProbeConfig {
            temperature_file: c.value(
                "probe.temperature_file",
                &raw.probe.temperature_file,
                None,
                |p| Ok(Some(PathBuf::from(p))),
            ),
            throttled_file: c.value(
                "probe.throttled_file",
                &raw.probe.throttled_file,
                None,
                |p| Ok(Some(PathBuf::from(p))),
            ),
        };
        c.finish(NodeConfig {
            node_id,
            agent_capacity,
            labels,
            heartbeat,
            max_temperature_c,
            shutdown_grace,
            fence_after,
            mqtt,
            ollama,
            api,
            probe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match NodeConfig::parse("node.toml", text) {
            Ok(_) => vec![],
            Err(e) => e.to_string().lines().map(str::to_owned).collect(),
        }
    }

    #[test]
    fn the_printed_default_is_valid_and_means_the_defaults() {
        let config = NodeConfig::parse("default", DEFAULT_NODE_CONFIG).unwrap();
        let defaults = NodeConfig::with_defaults(&config.node_id, 4);
        assert_eq!(config, defaults);
    }

    #[test]
    fn a_minimal_config_needs_only_the_capacity() {
        let config = NodeConfig::parse("n", "node_id = \"pi-9\"\nagent_capacity = 3\n").unwrap();
        assert_eq!(config.node_id, "pi-9");
        assert_eq!(config.agent_capacity, 3);
        assert_eq!(config.ollama.url.as_str(), "http://127.0.0.1:11434/");
        assert_eq!(config.mqtt.topic_root, "pifleet");
    }

    #[test]
    fn zero_capacity_is_reported_at_its_line_and_column() {
        let p = problems("node_id = \"a\"\n\nagent_capacity = 0\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("node.toml:3:18: agent_capacity"), "{p:?}");
    }

    #[test]
    fn a_lease_shorter_than_three_heartbeats_is_refused() {
        let p = problems("agent_capacity = 2\nheartbeat_secs = 5\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("node.toml:2:18:")
                && p[0].contains("fence_secs (7) must be at least 3 x heartbeat_secs (5)"),
            "{p:?}"
        );
        let p = problems("agent_capacity = 2\nheartbeat_secs = 5\nfence_secs = 15\n");
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_their_line() {
        let p = problems("agent_capacity = 2\n[mqtt]\nhots = \"x\"\n");
        assert!(
            p[0].starts_with("node.toml:3:1:") && p[0].contains("hots"),
            "{p:?}"
        );
        let p = problems("agent_capacity = \"three\"\n");
        assert!(
            p[0].starts_with("node.toml:1:18:") && p[0].contains("string"),
            "{p:?}"
        );
    }

    #[test]
    fn every_bad_value_is_reported_not_only_the_first() {
        let p = problems(
            "agent_capacity = 2\nheartbeat_secs = 0\n[ollama]\nurl = \"ftp://x\"\n[api]\nlisten = \"localhost\"\n",
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains(":2:18: heartbeat_secs"), "{p:?}");
        assert!(p[1].contains(":4:7: ollama.url"), "{p:?}");
        assert!(p[2].contains(":6:10: api.listen"), "{p:?}");
    }

    #[test]
    fn ollama_urls_keep_their_path_as_a_directory() {
        assert_eq!(
            ollama_url("http://pi:11434".into()).unwrap().as_str(),
            "http://pi:11434/"
        );
        assert_eq!(
            ollama_url("http://gw/ollama".into()).unwrap().as_str(),
            "http://gw/ollama/"
        );
        assert!(ollama_url("pi:11434".into()).is_err());
    }
}
