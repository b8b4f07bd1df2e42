//! Configuration files of the daemons (TOML), read in two stages as ripgrep
//! does: a raw form exactly as parsed, with source spans, then a validated
//! form with defaults filled in and every value checked. Each problem is
//! reported as `file:line:column: message`.
//!
//! Secrets can come from the environment instead of the file:
//! `PIFLEET_MQTT_USERNAME`, `PIFLEET_MQTT_PASSWORD`, `PIFLEET_API_TOKEN`.

pub mod coordinator;
pub mod node;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use coordinator::CoordinatorConfig;
pub use node::NodeConfig;

/// One problem in a configuration file, with its position (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.file, p.line, p.column, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reading a configuration failed: the file is unreadable or invalid.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// An environment variable that overrides the file is not valid.
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    /// A systemd credential (`LoadCredential=`) that cannot be read.
    #[error("systemd credential {path}: {message}")]
    Credential { path: PathBuf, message: String },
}

/// The systemd credential `name` (`LoadCredential=name:...` in the unit),
/// when the unit passes one: its text without the final line break.
pub fn credential(name: &str) -> Result<Option<String>, LoadError> {
    credential_in(
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        name,
    )
}

fn credential_in(dir: Option<PathBuf>, name: &str) -> Result<Option<String>, LoadError> {
    let Some(path) = dir.map(|d| d.join(name)) else {
        return Ok(None);
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let value = text.strip_suffix('\n').unwrap_or(&text).to_owned();
            if value.is_empty() {
                return Err(LoadError::Credential {
                    path,
                    message: "is empty".into(),
                });
            }
            Ok(Some(value))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoadError::Credential {
            path,
            message: e.to_string(),
        }),
    }
}

/// Where a config comes from, for messages and span to position mapping.
pub struct Source<'a> {
    pub name: String,
    pub text: &'a str,
}

impl Source<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    fn problem(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Problem {
        let (line, column) = self.position(span.map(|s| s.start).unwrap_or(0));
        Problem {
            line,
            column,
            message: message.into(),
        }
    }

    fn error(&self, problems: Vec<Problem>) -> ConfigError {
        ConfigError {
            file: self.name.clone(),
            problems,
        }
    }

    /// Parses the raw form; a syntax, type or unknown-key error becomes a
    /// [`ConfigError`] at the offending position.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            // Say "integer" and "number", not Rust's type names.
            let message = e
                .message()
                .trim()
                .replace("expected i64", "expected an integer")
                .replace("expected f64", "expected a number");
            self.error(vec![self.problem(e.span(), message)])
        })
    }
}

/// Collects validation problems so that `config check` reports all of them.
pub struct Checker<'a> {
    source: &'a Source<'a>,
    problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    pub fn new(source: &'a Source<'a>) -> Self {
        Checker {
            source,
            problems: Vec::new(),
        }
    }

    /// Records a problem at `span`.
    pub fn report(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.problems.push(self.source.problem(Some(span), message));
    }

    /// Records a problem at `span`, or at the start of the file.
    pub fn report_at(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        self.problems.push(self.source.problem(span, message));
    }

    /// Validates an optional value, falling back to `default` when absent.
    /// A value that fails `check` is reported and replaced by the default so
    /// that checking can go on.
    pub fn value<T: Clone, U>(
        &mut self,
        key: &str,
        value: &Option<Spanned<T>>,
        default: U,
        check: impl FnOnce(T) -> Result<U, String>,
    ) -> U {
        match value {
            None => default,
            Some(spanned) => match check(spanned.get_ref().clone()) {
                Ok(v) => v,
                Err(message) => {
                    self.report(spanned.span(), format!("{key}: {message}"));
                    default
                }
            },
        }
    }

    /// Ends validation: the value if there were no problems.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(self.source.error(self.problems))
        }
    }
}

/// This machine's host name, for default ids ("coordinator" if it is
/// unknown or not usable as an id).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| crate::protocol::validate_node_id(h).is_ok())
        .unwrap_or_else(|| "coordinator".into())
}

/// Reads a file for [`Source`].
pub fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Seconds in `[min, max]` as a [`Duration`].
pub fn secs_in(min: u64, max: u64) -> impl Fn(i64) -> Result<Duration, String> {
    move |v| {
        if v < min as i64 || v > max as i64 {
            Err(format!("must be between {min} and {max} seconds (got {v})"))
        } else {
            Ok(Duration::from_secs(v as u64))
        }
    }
}

/// An integer in `[min, max]`.
pub fn int_in<T: TryFrom<i64>>(min: i64, max: i64) -> impl Fn(i64) -> Result<T, String> {
    move |v| {
        if v < min || v > max {
            return Err(format!("must be between {min} and {max} (got {v})"));
        }
        T::try_from(v).map_err(|_| format!("{v} is out of range"))
    }
}

/// A socket address such as `127.0.0.1:9480` or `[::1]:9480`.
pub fn socket_addr(v: String) -> Result<SocketAddr, String> {
    v.parse()
        .map_err(|_| format!("{v:?} is not an IP address with a port, such as \"127.0.0.1:9480\""))
}

/// The `[mqtt]` table, shared by the node and the coordinator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    host: Option<Spanned<String>>,
    /// Several brokers, tried in turn (instead of `host`).
    hosts: Option<Spanned<Vec<String>>>,
    port: Option<Spanned<i64>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    /// `ca_file`: its name before issue 16.
    #[serde(alias = "ca_file")]
    tls_ca_file: Option<Spanned<String>>,
    keep_alive_secs: Option<Spanned<i64>>,
    topic_root: Option<Spanned<String>>,
    max_payload_bytes: Option<Spanned<i64>>,
}

/// Validated broker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// The broker tried first.
    pub host: String,
    pub port: u16,
    /// Brokers tried in turn after it, each after a failure of the one
    /// before (`[mqtt] hosts` beyond its first).
    pub fallbacks: Vec<(String, u16)>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// CA certificates (PEM) to verify the broker with; TLS is on when set.
    pub tls_ca_file: Option<PathBuf>,
    pub keep_alive: Duration,
    pub topic_root: String,
    /// Largest payload sent or accepted, both directions.
    pub max_payload_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            fallbacks: Vec::new(),
            username: None,
            password: None,
            tls_ca_file: None,
            keep_alive: Duration::from_secs(15),
            topic_root: "pifleet".into(),
            max_payload_bytes: crate::protocol::DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

impl MqttConfig {
    pub fn validate(raw: &RawMqtt, c: &mut Checker<'_>) -> MqttConfig {
        let d = MqttConfig::default();
        let host = c.value("mqtt.host", &raw.host, d.host, |h: String| {
            if h.trim().is_empty() || h.contains(char::is_whitespace) {
                Err(format!("{h:?} is not a host name or address"))
            } else {
                Ok(h)
            }
        });
        let port = c.value("mqtt.port", &raw.port, d.port, int_in(1, 65535));
        let mut brokers = c.value(
            "mqtt.hosts",
            &raw.hosts,
            Vec::new(),
            |hosts: Vec<String>| {
                if raw.host.is_some() {
                    return Err("set either mqtt.host or mqtt.hosts, not both".into());
                }
                if hosts.is_empty() {
                    return Err("lists no broker".into());
                }
                hosts.iter().map(|h| broker_address(h, port)).collect()
            },
        );
        let (host, port, fallbacks) = if brokers.is_empty() {
            (host, port, Vec::new())
        } else {
            let (host, port) = brokers.remove(0);
            (host, port, brokers)
        };
        let username = c.value("mqtt.username", &raw.username, None, |u| Ok(Some(u)));
        let password = c.value("mqtt.password", &raw.password, None, |p| Ok(Some(p)));
        let tls_ca_file = c.value("mqtt.tls_ca_file", &raw.tls_ca_file, None, |p: String| {
            crate::mqtt::read_ca_file(Path::new(&p)).map(|_| Some(PathBuf::from(p)))
        });
        let keep_alive = c.value(
            "mqtt.keep_alive_secs",
            &raw.keep_alive_secs,
            d.keep_alive,
            secs_in(5, 3600),
        );
        let topic_root = c.value(
            "mqtt.topic_root",
            &raw.topic_root,
            d.topic_root,
            |r: String| crate::protocol::validate_topic_root(&r).map(|_| r),
        );
        let max_payload_bytes = c.value(
            "mqtt.max_payload_bytes",
            &raw.max_payload_bytes,
            d.max_payload_bytes,
            int_in(16 * 1024, 64 * 1024 * 1024),
        );
        MqttConfig {
            host,
            port,
            fallbacks,
            username,
            password,
            tls_ca_file,
            keep_alive,
            topic_root,
            max_payload_bytes,
        }
    }

    /// Applies the systemd credential `mqtt_password`, then
    /// `PIFLEET_MQTT_USERNAME` and `PIFLEET_MQTT_PASSWORD`: each wins over
    /// what comes before it, so that secrets can stay out of the file.
    pub fn apply_env(&mut self) -> Result<(), LoadError> {
        if let Some(password) = credential("mqtt_password")? {
            self.password = Some(password);
        }
        if let Ok(user) = std::env::var("PIFLEET_MQTT_USERNAME") {
            self.username = Some(user);
        }
        if let Ok(password) = std::env::var("PIFLEET_MQTT_PASSWORD") {
            self.password = Some(password);
        }
        Ok(())
    }

    /// `host:port` of each broker, in the order they are tried, for
    /// messages.
    pub fn address(&self) -> String {
        let all: Vec<String> = self
            .brokers()
            .iter()
            .map(|(host, port)| address(host, *port))
            .collect();
        all.join(", ")
    }

    /// Every broker, in the order they are tried.
    pub fn brokers(&self) -> Vec<(String, u16)> {
        std::iter::once((self.host.clone(), self.port))
            .chain(self.fallbacks.iter().cloned())
            .collect()
    }
}

/// `host:port`, or `[v6]:port`.
pub fn address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A broker of `mqtt.hosts`: `host`, `host:port`, `v4:port`, `[v6]:port` or
/// a bare IPv6 address; without a port, `port`.
fn broker_address(entry: &str, port: u16) -> Result<(String, u16), String> {
    let bad = || format!("{entry:?} is not a host, host:port or [IPv6]:port");
    if entry.trim().is_empty() || entry.contains(char::is_whitespace) {
        return Err(bad());
    }
    let parse_port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{entry:?}: the port must be between 1 and 65535")),
        Ok(p) => Ok(p),
    };
    let ipv6 = |host: &str| {
        let address = host.split('%').next().unwrap_or(host);
        address
            .parse::<std::net::Ipv6Addr>()
            .map(|_| host.to_owned())
            .map_err(|_| bad())
    };
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let host = ipv6(host)?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, parse_port(p)?)),
            None if after.is_empty() => Ok((host, port)),
            None => Err(bad()),
        };
    }
    match entry.matches(':').count() {
        0 => Ok((entry.to_owned(), port)),
        1 => {
            let (host, p) = entry.split_once(':').ok_or_else(bad)?;
            if host.is_empty() {
                return Err(bad());
            }
            Ok((host.to_owned(), parse_port(p)?))
        }
        // A bare IPv6 address.
        _ => Ok((ipv6(entry)?, port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_hosts_lists_brokers_tried_in_turn_and_a_bad_one_is_named() {
        let parse = |mqtt: &str| {
            crate::config::NodeConfig::parse(
                "node.toml",
                &format!("node_id = \"n\"\nagent_capacity = 1\n[mqtt]\n{mqtt}\n"),
            )
        };
        let config = parse(
            "port = 1884\nhosts = [\"a\", \"b:1885\", \"10.0.0.3:1\", \"[::1]:1886\", \"fe80::2\"]",
        )
        .unwrap();
        assert_eq!(
            config.mqtt.brokers(),
            [
                ("a".into(), 1884),
                ("b".into(), 1885),
                ("10.0.0.3".into(), 1),
                ("::1".into(), 1886),
                ("fe80::2".into(), 1884)
            ]
        );
        assert_eq!(
            config.mqtt.address(),
            "a:1884, b:1885, 10.0.0.3:1, [::1]:1886, [fe80::2]:1884"
        );
        assert_eq!(address("::1", 1886), "[::1]:1886");
        let one = parse("host = \"x\"").unwrap();
        assert_eq!(one.mqtt.brokers(), [("x".into(), 1883)]);
        for (mqtt, says) in [
            (
                "hosts = [\"a\", \"b:0\"]",
                "mqtt.hosts: \"b:0\": the port must be between 1 and 65535",
            ),
            ("hosts = [\"a\", \"b:x\"]", "the port must be"),
            ("hosts = [\"a b\"]", "\"a b\" is not a host"),
            ("hosts = [\":1883\"]", "\":1883\" is not a host"),
            ("hosts = [\"[::1\"]", "is not a host"),
            ("hosts = [\"host:1883:\"]", "\"host:1883:\" is not a host"),
            ("hosts = [\"[name]:1883\"]", "\"[name]:1883\" is not a host"),
            ("hosts = []", "mqtt.hosts: lists no broker"),
            (
                "host = \"a\"\nhosts = [\"b\"]",
                "set either mqtt.host or mqtt.hosts, not both",
            ),
        ] {
            let err = parse(mqtt).unwrap_err().to_string();
            assert!(err.contains(says), "{mqtt}: {err}");
        }
    }

    #[test]
    fn a_credential_is_read_without_its_line_break_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mqtt_password"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("api_token"), "").unwrap();
        let at = || Some(dir.path().to_owned());
        assert_eq!(
            credential_in(at(), "mqtt_password").unwrap().as_deref(),
            Some("s3cret")
        );
        assert_eq!(credential_in(at(), "absent").unwrap(), None);
        assert_eq!(credential_in(None, "mqtt_password").unwrap(), None);
        let empty = credential_in(at(), "api_token").unwrap_err().to_string();
        assert!(
            empty.contains("api_token") && empty.contains("is empty"),
            "{empty}"
        );
    }

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        let source = Source {
            name: "x.toml".into(),
            text: "a = 1\n# é\nbé = 2\n",
        };
        assert_eq!(source.position(0), (1, 1));
        assert_eq!(source.position(4), (1, 5));
        let offset = source.text.find("= 2").unwrap();
        assert_eq!(source.position(offset), (3, 4));
    }
}
