//! The capacity probe: what this machine can take right now. CPU and memory
//! come from one long-lived sysinfo `System` refreshed only for what is read;
//! temperature from the SoC thermal zone; throttling from the Pi firmware;
//! models from the local Ollama.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sysinfo::{Components, System};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ollama::OllamaClient;
use crate::config::node::ProbeConfig;
use crate::protocol::{CpuInfo, MemoryInfo};

/// Where the Pi firmware reports under-voltage and throttling.
pub const PI_THROTTLED_FILE: &str = "/sys/devices/platform/soc/soc:firmware/get_throttled";
/// The first thermal zone, the SoC on a Raspberry Pi.
pub const THERMAL_ZONE_FILE: &str = "/sys/class/thermal/thermal_zone0/temp";

/// One sample of the host and its Ollama.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    pub temperature_c: Option<f32>,
    pub throttled: Option<bool>,
    pub models: Vec<String>,
    pub ollama_reachable: bool,
    /// Why Ollama is unreachable, for the log.
    pub ollama_error: Option<String>,
}

impl ProbeReport {
    /// Before the first sample: nothing known, Ollama not yet checked.
    pub fn unknown() -> Self {
        ProbeReport {
            cpu: CpuInfo::default(),
            memory: MemoryInfo::default(),
            temperature_c: None,
            throttled: None,
            models: Vec::new(),
            ollama_reachable: false,
            ollama_error: None,
        }
    }
}

/// Host sampling state, kept between samples (CPU usage is a difference).
pub struct HostProbe {
    system: System,
    components: Option<Components>,
    temperature_file: Option<PathBuf>,
    throttled_file: PathBuf,
}

impl HostProbe {
    pub fn new(config: &ProbeConfig) -> Result<Self, String> {
        let system = System::new().map_err(|e| format!("sysinfo cannot read this system: {e}"))?;
        let components = if config.temperature_file.is_some() {
            None
        } else {
            Components::new_with_refreshed_list().ok()
        };
        Ok(HostProbe {
            system,
            components,
            temperature_file: config.temperature_file.clone(),
            throttled_file: config
                .throttled_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(PI_THROTTLED_FILE)),
        })
    }

    /// CPU, memory, temperature and throttling now.
    pub fn sample(&mut self) -> (CpuInfo, MemoryInfo, Option<f32>, Option<bool>) {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let cpu = CpuInfo {
            cores: self.system.cpus().len() as u32,
            load1: System::load_average().map(|l| l.one).unwrap_or(0.0),
            usage_pct: self.system.global_cpu_usage(),
        };
        let memory = MemoryInfo {
            total_bytes: self.system.total_memory(),
            available_bytes: self.system.available_memory(),
        };
        (
            cpu,
            memory,
            self.temperature(),
            read_throttled(&self.throttled_file),
        )
    }

    fn temperature(&mut self) -> Option<f32> {
        if let Some(file) = &self.temperature_file {
            return read_millidegrees(file);
        }
        if let Some(components) = &mut self.components {
            components.refresh(false);
            let reading = |c: &sysinfo::Component| c.temperature().filter(|t| t.is_finite());
            let preferred = components.iter().find(|c| {
                let label = c.label().to_lowercase();
                (label.contains("cpu") || label.contains("soc")) && reading(c).is_some()
            });
            if let Some(t) = preferred
                .or_else(|| components.iter().find(|c| reading(c).is_some()))
                .and_then(reading)
            {
                return Some(t);
            }
        }
        read_millidegrees(Path::new(THERMAL_ZONE_FILE))
    }
}

/// Reads a sysfs temperature: millidegrees Celsius (`48312`), or degrees.
fn read_millidegrees(path: &Path) -> Option<f32> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: f32 = text.trim().parse().ok()?;
    Some(if value.abs() > 200.0 {
        value / 1000.0
    } else {
        value
    })
}

/// Reads the firmware's throttle flags: hex, as sysfs (`50005`) or vcgencmd
/// (`throttled=0x50005`) prints them. Throttled means any *current* condition:
/// under-voltage, ARM frequency capped, throttled, or soft temperature limit.
fn read_throttled(path: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_throttled(&text)
}

fn parse_throttled(text: &str) -> Option<bool> {
    let value = text.trim();
    let value = value.strip_prefix("throttled=").unwrap_or(value);
    let value = value.strip_prefix("0x").unwrap_or(value);
    u32::from_str_radix(value, 16)
        .ok()
        .map(|flags| flags & 0xF != 0)
}

/// Samples the host and Ollama every `interval` and sends each report, the
/// first one at once, until `shutdown`.
pub async fn run(
    mut host: HostProbe,
    ollama: OllamaClient,
    interval: Duration,
    reports: mpsc::Sender<ProbeReport>,
    shutdown: CancellationToken,
) {
    every(interval, reports, shutdown, || {
        let (cpu, memory, temperature_c, throttled) = host.sample();
        let ollama = ollama.clone();
        async move {
            let (models, ollama_error) = match ollama.models().await {
                Ok(models) => (models, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            ProbeReport {
                cpu,
                memory,
                temperature_c,
                throttled,
                ollama_reachable: ollama_error.is_none(),
                models,
                ollama_error,
            }
        }
    })
    .await
}

/// The same `report` every `interval`: a simulated node's probe.
pub async fn repeat(
    report: ProbeReport,
    interval: Duration,
    reports: mpsc::Sender<ProbeReport>,
    shutdown: CancellationToken,
) {
    every(interval, reports, shutdown, || {
        std::future::ready(report.clone())
    })
    .await
}

/// Sends a `sample()` every `interval` (the first at once) until
/// `shutdown` or until nobody listens.
async fn every<F, Sample>(
    interval: Duration,
    reports: mpsc::Sender<ProbeReport>,
    shutdown: CancellationToken,
    mut sample: F,
) where
    F: FnMut() -> Sample,
    Sample: std::future::Future<Output = ProbeReport>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if reports.send(sample().await).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_flags_count_only_current_conditions() {
        assert_eq!(parse_throttled("0\n"), Some(false));
        assert_eq!(parse_throttled("50000"), Some(false), "past events only");
        assert_eq!(parse_throttled("50005"), Some(true));
        assert_eq!(parse_throttled("throttled=0x4"), Some(true));
        assert_eq!(parse_throttled("garbage"), None);
    }

    #[test]
    fn temperatures_read_in_millidegrees_or_degrees() {
        let dir = std::env::temp_dir().join(format!("pifleet-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("temp");
        std::fs::write(&file, "48312\n").unwrap();
        assert_eq!(read_millidegrees(&file), Some(48.312));
        std::fs::write(&file, "61.5").unwrap();
        assert_eq!(read_millidegrees(&file), Some(61.5));
        assert_eq!(read_millidegrees(&dir.join("missing")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_host_sample_reports_this_machine() {
        let mut probe = HostProbe::new(&ProbeConfig::default()).unwrap();
        let (cpu, memory, _, _) = probe.sample();
        assert!(cpu.cores >= 1);
        assert!(memory.total_bytes > 0 && memory.available_bytes <= memory.total_bytes);
    }
}
