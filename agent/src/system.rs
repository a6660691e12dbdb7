//! System health: a cheap sampler of CPU, memory, the state directory's disk and the process
//! (sysinfo; refreshes only those), combined with the serving latency quantiles and error
//! rates the caller passes in into a [`HealthSample`], and statistical process control over
//! those samples: one EWMA control chart per tracked [`Signal`] that raises a typed
//! [`SpcEvent`] once when a signal goes out of control and once when it comes back.
//!
//! EWMA chart (Montgomery, *Introduction to Statistical Quality Control*, 9.2): the first
//! `calibration` observations give the centre line `mu` (their mean) and `sigma` (their sample
//! standard deviation, floored by `min_sigma` and `min_sigma_rel * |mu|`); after that
//! `z_t = lambda x_t + (1 - lambda) z_{t-1}` with `z_0 = mu`, and the limits are
//! `mu +- L sigma sqrt(lambda / (2 - lambda) (1 - (1 - lambda)^(2t)))`.
//! Rules: [`Rule::BeyondLimit`] (`z_t` outside the limit on the watched side) and
//! [`Rule::RunAboveCentre`] (`run_length` consecutive raw observations on the watched side of
//! the centre line, Nelson's rule 2 with 9 by default).

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sysinfo::{
    CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Pid, ProcessRefreshKind,
    ProcessesToUpdate, System,
};

/// Version of the [`HealthSample`] and [`SpcEvent`] records.
pub const HEALTH_SCHEMA: u32 = 1;
/// Samples between two re-reads of the mount table when the state dir's disk is not found.
const DISK_RELIST_EVERY: u64 = 6;

/// Serving counters the caller reads from the runtime (summed over the served versions).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServingInput {
    /// Latency quantiles over the last interval (see [`LatencyWindow`]), microseconds.
    pub latency_p50_us: Option<u64>,
    pub latency_p90_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    /// Cumulative requests that returned predictions.
    pub ok_total: u64,
    /// Cumulative requests that failed inside the engine.
    pub failed_total: u64,
    /// Cumulative requests refused for bad input.
    pub invalid_total: u64,
}

/// One health sample (wire record version [`HEALTH_SCHEMA`]); `None` where not measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSample {
    pub schema: u32,
    pub time_unix_ms: u64,
    /// Since the previous sample (0 for the first).
    pub interval_ms: u64,
    pub system_uptime_s: u64,
    pub process_uptime_s: u64,
    pub cpu_cores: u32,
    /// All cores, 0..=100; `None` on the first sample (usage needs two readings).
    pub cpu_system_pct: Option<f64>,
    /// This process; 100 = one core busy (top's convention); `None` on the first sample.
    pub cpu_process_pct: Option<f64>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub process_rss_bytes: Option<u64>,
    pub process_virtual_bytes: Option<u64>,
    /// Mount point of the filesystem holding the state directory.
    pub disk_mount: Option<String>,
    pub disk_total_bytes: Option<u64>,
    /// Space available to the agent on that filesystem.
    pub disk_free_bytes: Option<u64>,
    pub latency_p50_us: Option<u64>,
    pub latency_p90_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    /// Requests (ok + failed + invalid) in the interval.
    pub interval_requests: u64,
    /// Failed / requests in the interval; `None` without requests.
    pub error_rate: Option<f64>,
    /// Invalid / requests in the interval; `None` without requests.
    pub invalid_rate: Option<f64>,
}

/// Reads system and process health; keep one and call [`SystemSampler::sample`] every ~10 s.
pub struct SystemSampler {
    sys: System,
    pid: Option<Pid>,
    disks: Disks,
    disk: Option<usize>,
    state_dir: PathBuf,
    samples: u64,
    last: Option<(Instant, u64, u64, u64)>,
}

impl std::fmt::Debug for SystemSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemSampler")
            .field("state_dir", &self.state_dir)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

fn storage() -> DiskRefreshKind {
    DiskRefreshKind::nothing().with_storage()
}

/// The disk whose mount point is the longest prefix of `dir`.
fn find_disk(disks: &Disks, dir: &Path) -> Option<usize> {
    disks
        .list()
        .iter()
        .enumerate()
        .filter(|(_, d)| dir.starts_with(d.mount_point()))
        .max_by_key(|(_, d)| d.mount_point().as_os_str().len())
        .map(|(i, _)| i)
}

impl SystemSampler {
    /// A sampler for this process and the filesystem holding `state_dir`.
    pub fn new(state_dir: &Path) -> SystemSampler {
        let state_dir = state_dir
            .canonicalize()
            .unwrap_or_else(|_| state_dir.to_path_buf());
        let disks = Disks::new_with_refreshed_list_specifics(storage());
        let disk = find_disk(&disks, &state_dir);
        SystemSampler {
            sys: System::new(),
            pid: sysinfo::get_current_pid().ok(),
            disks,
            disk,
            state_dir,
            samples: 0,
            last: None,
        }
    }

    /// Takes one sample (about 100 µs: a few /proc reads and one statvfs).
    pub fn sample(&mut self, serving: &ServingInput) -> HealthSample {
        let now = Instant::now();
        self.samples += 1;
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        self.sys
            .refresh_cpu_specifics(CpuRefreshKind::nothing().with_cpu_usage());
        if let Some(pid) = self.pid {
            self.sys.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                false,
                ProcessRefreshKind::nothing().with_cpu().with_memory(),
            );
        }
        if self.disk.is_none() && self.samples.is_multiple_of(DISK_RELIST_EVERY) {
            self.disks.refresh_specifics(true, storage());
            self.disk = find_disk(&self.disks, &self.state_dir);
        }
        let disk = self.disk.and_then(|i| self.disks.list_mut().get_mut(i));
        let (disk_mount, disk_total_bytes, disk_free_bytes) = match disk {
            Some(d) => {
                if d.refresh_specifics(storage()) {
                    (
                        Some(d.mount_point().display().to_string()),
                        Some(d.total_space()),
                        Some(d.available_space()),
                    )
                } else {
                    (Some(d.mount_point().display().to_string()), None, None)
                }
            }
            None => (None, None, None),
        };
        let first = self.samples == 1;
        let process = self.pid.and_then(|p| self.sys.process(p));
        let requests = serving.ok_total + serving.failed_total + serving.invalid_total;
        let (interval_ms, d_req, d_failed, d_invalid) = match self.last {
            Some((t, r, f, i)) => {
                // counters restart with a new model version: count from zero then
                let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
                (
                    now.duration_since(t).as_millis() as u64,
                    delta(requests, r),
                    delta(serving.failed_total, f),
                    delta(serving.invalid_total, i),
                )
            }
            None => (0, requests, serving.failed_total, serving.invalid_total),
        };
        self.last = Some((now, requests, serving.failed_total, serving.invalid_total));
        let rate = |x: u64| (d_req > 0).then(|| x as f64 / d_req as f64);
        HealthSample {
            schema: HEALTH_SCHEMA,
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            interval_ms,
            system_uptime_s: System::uptime(),
            process_uptime_s: process.map(|p| p.run_time()).unwrap_or(0),
            cpu_cores: self.sys.cpus().len() as u32,
            cpu_system_pct: (!first).then(|| f64::from(self.sys.global_cpu_usage())),
            cpu_process_pct: process.filter(|_| !first).map(|p| f64::from(p.cpu_usage())),
            memory_total_bytes: self.sys.total_memory(),
            memory_available_bytes: self.sys.available_memory(),
            process_rss_bytes: process.map(|p| p.memory()),
            process_virtual_bytes: process.map(|p| p.virtual_memory()),
            disk_mount,
            disk_total_bytes,
            disk_free_bytes,
            latency_p50_us: serving.latency_p50_us,
            latency_p90_us: serving.latency_p90_us,
            latency_p99_us: serving.latency_p99_us,
            interval_requests: d_req,
            error_rate: rate(d_failed),
            invalid_rate: rate(d_invalid),
        }
    }
}

/// Latency quantiles over the interval between two readings of a cumulative bucket
/// histogram (such as `runtime::Counters::latency` with `LATENCY_BUCKETS_US`).
#[derive(Debug, Clone, Default)]
pub struct LatencyWindow {
    prev: Vec<u64>,
}

impl LatencyWindow {
    pub fn new() -> LatencyWindow {
        LatencyWindow::default()
    }

    /// `counts[i]` requests took at most `bounds_us[i]` (and more than the previous bound;
    /// the last count is +Inf). Returns p50, p90 and p99 of the requests since the previous
    /// call as bucket upper bounds (`u64::MAX` for +Inf), `None` without requests. A count
    /// lower than before (a new version's counters) starts over from zero.
    pub fn update(&mut self, bounds_us: &[u64], counts: &[u64]) -> [Option<u64>; 3] {
        let reset = self.prev.len() != counts.len()
            || counts
                .iter()
                .zip(&self.prev)
                .any(|(now, before)| now < before);
        let delta: Vec<u64> = if reset {
            counts.to_vec()
        } else {
            counts.iter().zip(&self.prev).map(|(n, b)| n - b).collect()
        };
        self.prev = counts.to_vec();
        [0.5, 0.9, 0.99].map(|q| crate::runtime::bucket_quantile(bounds_us, &delta, q))
    }
}

/// A signal the health monitor watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    LatencyP99Us,
    ErrorRate,
    CpuProcessPct,
    ProcessRssBytes,
}

impl Signal {
    pub const ALL: [Signal; 4] = [
        Signal::LatencyP99Us,
        Signal::ErrorRate,
        Signal::CpuProcessPct,
        Signal::ProcessRssBytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Signal::LatencyP99Us => "latency_p99_us",
            Signal::ErrorRate => "error_rate",
            Signal::CpuProcessPct => "cpu_process_pct",
            Signal::ProcessRssBytes => "process_rss_bytes",
        }
    }

    /// The signal's value in a sample (`None`: not measured; the chart skips it).
    pub fn value(self, s: &HealthSample) -> Option<f64> {
        match self {
            Signal::LatencyP99Us => s
                .latency_p99_us
                .filter(|&v| v != u64::MAX)
                .map(|v| v as f64),
            Signal::ErrorRate => s.error_rate,
            Signal::CpuProcessPct => s.cpu_process_pct,
            Signal::ProcessRssBytes => s.process_rss_bytes.map(|v| v as f64),
        }
    }

    /// Defaults: lambda 0.2, L 3, 20 calibration samples, runs of 9, and sigma floors that
    /// suit the signal (latency: 10% of the centre; error rate: 1 point; CPU: 2 points;
    /// RSS: 2% of the centre or 1 MiB).
    pub fn default_chart(self) -> ChartConfig {
        let base = ChartConfig::default();
        match self {
            Signal::LatencyP99Us => ChartConfig {
                min_sigma: 10.0,
                min_sigma_rel: 0.1,
                ..base
            },
            Signal::ErrorRate => ChartConfig {
                min_sigma: 0.01,
                ..base
            },
            Signal::CpuProcessPct => ChartConfig {
                min_sigma: 2.0,
                ..base
            },
            Signal::ProcessRssBytes => ChartConfig {
                min_sigma: 1_048_576.0,
                min_sigma_rel: 0.02,
                ..base
            },
        }
    }
}

/// Which way out of control matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Upper,
    Lower,
    Both,
}

/// A control-chart rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The EWMA statistic is beyond the control limit.
    BeyondLimit,
    /// `run_length` consecutive observations on the watched side of the centre line.
    RunAboveCentre,
}

/// Settings of one EWMA chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChartConfig {
    /// Weight of the newest observation, 0 < lambda <= 1.
    pub lambda: f64,
    /// Width of the limits in standard deviations of the statistic, > 0.
    pub l: f64,
    /// Observations that set the centre line and sigma, >= 2.
    pub calibration: usize,
    /// Consecutive observations beyond the centre line that raise [`Rule::RunAboveCentre`];
    /// 0 turns the rule off.
    pub run_length: usize,
    /// Sigma floor, absolute (units of the signal), >= 0.
    pub min_sigma: f64,
    /// Sigma floor relative to |centre|, >= 0.
    pub min_sigma_rel: f64,
    pub side: Side,
}

impl Default for ChartConfig {
    fn default() -> Self {
        ChartConfig {
            lambda: 0.2,
            l: 3.0,
            calibration: 20,
            run_length: 9,
            min_sigma: 0.0,
            min_sigma_rel: 0.0,
            side: Side::Upper,
        }
    }
}

/// An invalid [`ChartConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChartConfigError {
    #[error("EWMA chart {field} = {value}: {expected}")]
    Invalid {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
}

impl ChartConfig {
    fn validate(&self) -> Result<(), ChartConfigError> {
        let bad = |field, value, expected| {
            Err(ChartConfigError::Invalid {
                field,
                value,
                expected,
            })
        };
        if !(self.lambda > 0.0 && self.lambda <= 1.0) {
            return bad("lambda", self.lambda, "must be in (0, 1]");
        }
        if !(self.l > 0.0 && self.l.is_finite()) {
            return bad("l", self.l, "must be a finite number > 0");
        }
        if !(2..=100_000).contains(&self.calibration) {
            return bad("calibration", self.calibration as f64, "must be 2..=100000");
        }
        if !(self.min_sigma >= 0.0 && self.min_sigma.is_finite()) {
            return bad("min_sigma", self.min_sigma, "must be a finite number >= 0");
        }
        if !(self.min_sigma_rel >= 0.0 && self.min_sigma_rel.is_finite()) {
            return bad(
                "min_sigma_rel",
                self.min_sigma_rel,
                "must be a finite number >= 0",
            );
        }
        Ok(())
    }
}

/// Whether a flag starts or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpcState {
    Raised,
    Cleared,
}

/// A control flag raised or cleared (wire record version [`HEALTH_SCHEMA`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpcEvent {
    pub schema: u32,
    pub signal: Signal,
    pub state: SpcState,
    /// The rule that raised the flag (also on its clear event).
    pub rule: Rule,
    /// The observation at this sample.
    pub value: f64,
    /// The EWMA statistic at this sample.
    pub ewma: f64,
    /// The control limit crossed (`BeyondLimit`) or the centre line (`RunAboveCentre`).
    pub limit: f64,
    pub centre: f64,
}

/// What a chart's observation changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChartChange {
    pub state: SpcState,
    pub rule: Rule,
    pub value: f64,
    pub ewma: f64,
    pub limit: f64,
    pub centre: f64,
}

/// One EWMA control chart.
#[derive(Debug, Clone)]
pub struct EwmaChart {
    cfg: ChartConfig,
    calibration: Vec<f64>,
    /// Centre line and sigma once calibrated.
    fitted: Option<(f64, f64)>,
    z: f64,
    t: u64,
    run: usize,
    /// Sign of the current run (Side::Both).
    run_up: bool,
    active: Option<Rule>,
}

impl EwmaChart {
    pub fn new(cfg: ChartConfig) -> Result<EwmaChart, ChartConfigError> {
        cfg.validate()?;
        Ok(EwmaChart {
            calibration: Vec::with_capacity(cfg.calibration),
            cfg,
            fitted: None,
            z: 0.0,
            t: 0,
            run: 0,
            run_up: true,
            active: None,
        })
    }

    /// Forgets the calibration (e.g. after a new model version); the next `calibration`
    /// observations set the centre line again. An active flag is dropped without an event.
    pub fn recalibrate(&mut self) {
        self.calibration.clear();
        self.fitted = None;
        self.t = 0;
        self.run = 0;
        self.active = None;
    }

    /// Centre line and sigma, once calibrated.
    pub fn centre_sigma(&self) -> Option<(f64, f64)> {
        self.fitted
    }

    /// The EWMA statistic (the centre line right after calibration).
    pub fn statistic(&self) -> Option<f64> {
        self.fitted.map(|_| self.z)
    }

    /// Lower and upper limits at the current sample count (after the last observation).
    pub fn limits(&self) -> Option<(f64, f64)> {
        let (mu, sigma) = self.fitted?;
        let w = self.width(sigma, self.t.max(1));
        Some((mu - w, mu + w))
    }

    /// The active flag's rule, if any.
    pub fn active(&self) -> Option<Rule> {
        self.active
    }

    fn width(&self, sigma: f64, t: u64) -> f64 {
        let lam = self.cfg.lambda;
        let decay = (1.0 - lam).powf(2.0 * t.min(1_000_000) as f64);
        self.cfg.l * sigma * (lam / (2.0 - lam) * (1.0 - decay)).sqrt()
    }

    /// Adds an observation (non-finite ones are ignored); returns the flag change it causes.
    pub fn observe(&mut self, x: f64) -> Option<ChartChange> {
        if !x.is_finite() {
            return None;
        }
        let Some((mu, sigma)) = self.fitted else {
            self.calibration.push(x);
            if self.calibration.len() >= self.cfg.calibration {
                let n = self.calibration.len() as f64;
                let mean = self.calibration.iter().sum::<f64>() / n;
                let var = self
                    .calibration
                    .iter()
                    .map(|v| (v - mean) * (v - mean))
                    .sum::<f64>()
                    / (n - 1.0);
                let sigma = var
                    .sqrt()
                    .max(self.cfg.min_sigma)
                    .max(self.cfg.min_sigma_rel * mean.abs());
                self.fitted = Some((mean, sigma));
                self.z = mean;
                self.t = 0;
                self.calibration = Vec::new();
            }
            return None;
        };
        let lam = self.cfg.lambda;
        self.t += 1;
        self.z = lam * x + (1.0 - lam) * self.z;
        let w = self.width(sigma, self.t);
        let (upper, lower) = (mu + w, mu - w);
        let watch_up = matches!(self.cfg.side, Side::Upper | Side::Both);
        let watch_down = matches!(self.cfg.side, Side::Lower | Side::Both);
        let beyond = if watch_up && self.z > upper {
            Some(upper)
        } else if watch_down && self.z < lower {
            Some(lower)
        } else {
            None
        };
        let up = x > mu;
        let down = x < mu;
        let on_side = (watch_up && up) || (watch_down && down);
        if on_side && (self.run == 0 || self.run_up == up) {
            self.run_up = up;
            self.run += 1;
        } else if on_side {
            self.run_up = up;
            self.run = 1;
        } else {
            self.run = 0;
        }
        let run_out = self.cfg.run_length > 0 && self.run >= self.cfg.run_length;
        let change = |state, rule, limit| ChartChange {
            state,
            rule,
            value: x,
            ewma: self.z,
            limit,
            centre: mu,
        };
        match self.active {
            None => {
                if let Some(limit) = beyond {
                    self.active = Some(Rule::BeyondLimit);
                    Some(change(SpcState::Raised, Rule::BeyondLimit, limit))
                } else if run_out {
                    self.active = Some(Rule::RunAboveCentre);
                    Some(change(SpcState::Raised, Rule::RunAboveCentre, mu))
                } else {
                    None
                }
            }
            Some(rule) => {
                if beyond.is_some() || run_out {
                    return None;
                }
                self.active = None;
                let limit = match rule {
                    Rule::BeyondLimit if watch_up => upper,
                    Rule::BeyondLimit => lower,
                    Rule::RunAboveCentre => mu,
                };
                Some(change(SpcState::Cleared, rule, limit))
            }
        }
    }
}

/// EWMA charts over the health samples, one per signal.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    charts: Vec<(Signal, EwmaChart)>,
}

impl HealthMonitor {
    /// Charts for the given signals.
    pub fn new(signals: &[(Signal, ChartConfig)]) -> Result<HealthMonitor, ChartConfigError> {
        let charts = signals
            .iter()
            .map(|(s, c)| Ok((*s, EwmaChart::new(*c)?)))
            .collect::<Result<_, _>>()?;
        Ok(HealthMonitor { charts })
    }

    /// Every [`Signal`] with its [`Signal::default_chart`].
    pub fn with_defaults() -> HealthMonitor {
        HealthMonitor {
            charts: Signal::ALL
                .iter()
                .filter_map(|s| Some((*s, EwmaChart::new(s.default_chart()).ok()?)))
                .collect(),
        }
    }

    /// Feeds one sample to every chart; returns the flags raised or cleared by it.
    pub fn observe(&mut self, sample: &HealthSample) -> Vec<SpcEvent> {
        let mut events = Vec::new();
        for (signal, chart) in &mut self.charts {
            let Some(x) = signal.value(sample) else {
                continue;
            };
            if let Some(c) = chart.observe(x) {
                events.push(SpcEvent {
                    schema: HEALTH_SCHEMA,
                    signal: *signal,
                    state: c.state,
                    rule: c.rule,
                    value: c.value,
                    ewma: c.ewma,
                    limit: c.limit,
                    centre: c.centre,
                });
            }
        }
        events
    }

    /// Signals with an active flag and its rule (for `/metrics` and status).
    pub fn active(&self) -> Vec<(Signal, Rule)> {
        self.charts
            .iter()
            .filter_map(|(s, c)| Some((*s, c.active()?)))
            .collect()
    }

    /// The chart of one signal.
    pub fn chart(&self, signal: Signal) -> Option<&EwmaChart> {
        self.charts
            .iter()
            .find(|(s, _)| *s == signal)
            .map(|(_, c)| c)
    }

    /// Recalibrates one signal's chart, or all with `None`.
    pub fn recalibrate(&mut self, signal: Option<Signal>) {
        for (s, c) in &mut self.charts {
            if signal.is_none_or(|x| x == *s) {
                c.recalibrate();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise: about N(0, 1) (sum of 12 uniforms minus 6), splitmix64.
    struct Noise(u64);

    impl Noise {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0
        }
    }

    fn series(seed: u64, n: usize, mean: f64, sd: f64) -> Vec<f64> {
        let mut noise = Noise(seed);
        (0..n).map(|_| mean + sd * noise.normal()).collect()
    }

    fn chart(cfg: ChartConfig) -> EwmaChart {
        EwmaChart::new(cfg).unwrap()
    }

    /// Feeds `xs`; returns (index, change) of every change.
    fn feed(c: &mut EwmaChart, xs: &[f64]) -> Vec<(usize, ChartChange)> {
        xs.iter()
            .enumerate()
            .filter_map(|(i, &x)| c.observe(x).map(|ch| (i, ch)))
            .collect()
    }

    #[test]
    fn limits_match_a_hand_computation() {
        let mut c = chart(ChartConfig {
            lambda: 0.25,
            l: 2.0,
            calibration: 4,
            run_length: 0,
            ..ChartConfig::default()
        });
        // calibration 1, 2, 3, 4: mean 2.5, sample variance 5/3
        assert!(feed(&mut c, &[1.0, 2.0, 3.0, 4.0]).is_empty());
        let (mu, sigma) = c.centre_sigma().unwrap();
        assert_eq!(mu, 2.5);
        assert!((sigma - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        // t = 1: z = 0.25 * 3 + 0.75 * 2.5 = 2.625;
        // width = 2 sigma sqrt(0.25 / 1.75 * (1 - 0.75^2)) = 2 sigma * 0.25
        assert_eq!(c.observe(3.0), None);
        assert!((c.statistic().unwrap() - 2.625).abs() < 1e-12);
        let (lo, hi) = c.limits().unwrap();
        let w1 = 2.0 * sigma * 0.25;
        assert!((hi - (2.5 + w1)).abs() < 1e-12 && (lo - (2.5 - w1)).abs() < 1e-12);
        // t = 2: z = 0.25 * 2 + 0.75 * 2.625 = 2.46875;
        // width = 2 sigma sqrt(1/7 * (1 - 0.75^4))
        c.observe(2.0);
        assert!((c.statistic().unwrap() - 2.46875).abs() < 1e-12);
        let w2 = 2.0 * sigma * (1.0 / 7.0 * (1.0 - 0.75f64.powi(4))).sqrt();
        assert!((c.limits().unwrap().1 - (2.5 + w2)).abs() < 1e-12);
        // far out: the asymptotic width 2 sigma sqrt(1/7)
        for _ in 0..200 {
            c.observe(2.5);
        }
        let w = 2.0 * sigma * (1.0f64 / 7.0).sqrt();
        assert!((c.limits().unwrap().1 - (2.5 + w)).abs() < 1e-9);
    }

    #[test]
    fn a_stable_series_raises_nothing() {
        for seed in [1, 7, 42] {
            let mut c = chart(ChartConfig::default());
            let xs = series(seed, 300, 1000.0, 50.0);
            let changes = feed(&mut c, &xs);
            assert!(changes.is_empty(), "seed {seed}: {changes:?}");
            assert!(c.centre_sigma().is_some());
        }
    }

    #[test]
    fn a_step_change_is_flagged_within_a_few_samples_and_only_once() {
        let mut c = chart(ChartConfig::default());
        let mut xs = series(3, 60, 1000.0, 50.0);
        // +3 sigma from sample 60 on
        xs.extend(series(4, 60, 1150.0, 50.0));
        let changes = feed(&mut c, &xs);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (i, ch) = changes[0];
        assert!((60..=65).contains(&i), "flagged at {i}");
        assert_eq!((ch.state, ch.rule), (SpcState::Raised, Rule::BeyondLimit));
        assert!(ch.ewma > ch.limit && ch.limit > ch.centre);
        assert_eq!(c.active(), Some(Rule::BeyondLimit));
    }

    #[test]
    fn a_single_spike_flags_once_and_clears() {
        let mut c = chart(ChartConfig {
            run_length: 0,
            ..ChartConfig::default()
        });
        let mut xs = series(5, 40, 100.0, 5.0);
        let (mu, sigma) = {
            let mut probe = c.clone();
            feed(&mut probe, &xs[..20]);
            probe.centre_sigma().unwrap()
        };
        xs.push(mu + 12.0 * sigma);
        xs.extend(series(6, 40, 100.0, 5.0));
        let changes = feed(&mut c, &xs);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].0, 40);
        assert_eq!(changes[0].1.state, SpcState::Raised);
        assert_eq!(changes[0].1.rule, Rule::BeyondLimit);
        assert_eq!(changes[0].1.value, mu + 12.0 * sigma);
        assert_eq!(changes[1].1.state, SpcState::Cleared);
        assert_eq!(changes[1].1.rule, Rule::BeyondLimit);
        // 12 sigma * lambda = 2.4 sigma above, limit about 1 sigma: decays by 0.8 a sample
        assert!((41..=46).contains(&changes[1].0), "{changes:?}");
        assert_eq!(c.active(), None);
    }

    #[test]
    fn a_run_above_the_centre_line_raises_the_run_rule() {
        let mut c = chart(ChartConfig {
            l: 100.0,
            calibration: 2,
            ..ChartConfig::default()
        });
        feed(&mut c, &[9.0, 11.0]);
        // 8 points above 10: nothing; the 9th raises; a point below clears
        let above = [10.5; 9];
        let changes = feed(&mut c, &above);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, 8);
        assert_eq!(changes[0].1.rule, Rule::RunAboveCentre);
        assert_eq!(changes[0].1.limit, 10.0);
        assert!(feed(&mut c, &[10.5; 5]).is_empty());
        let cleared = feed(&mut c, &[9.5]);
        assert_eq!(cleared.len(), 1);
        assert_eq!(
            (cleared[0].1.state, cleared[0].1.rule),
            (SpcState::Cleared, Rule::RunAboveCentre)
        );
    }

    #[test]
    fn lower_side_and_sigma_floor() {
        let mut c = chart(ChartConfig {
            side: Side::Lower,
            min_sigma: 1.0,
            run_length: 0,
            calibration: 3,
            ..ChartConfig::default()
        });
        // constant calibration: sigma is the floor 1.0
        feed(&mut c, &[50.0, 50.0, 50.0]);
        assert_eq!(c.centre_sigma(), Some((50.0, 1.0)));
        assert!(
            feed(&mut c, &[70.0, 70.0]).is_empty(),
            "upper side not watched"
        );
        c.recalibrate();
        feed(&mut c, &[50.0, 50.0, 50.0]);
        let ch = feed(&mut c, &[40.0]);
        assert_eq!(ch.len(), 1);
        assert!(ch[0].1.limit < 50.0 && ch[0].1.ewma < ch[0].1.limit);
    }

    #[test]
    fn invalid_chart_configs_are_named() {
        let e = EwmaChart::new(ChartConfig {
            lambda: 0.0,
            ..ChartConfig::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "EWMA chart lambda = 0: must be in (0, 1]");
        assert!(EwmaChart::new(ChartConfig {
            calibration: 1,
            ..ChartConfig::default()
        })
        .is_err());
        assert!(EwmaChart::new(ChartConfig {
            l: f64::NAN,
            ..ChartConfig::default()
        })
        .is_err());
    }

    #[test]
    fn latency_window_gives_interval_quantiles() {
        let bounds = [100, 250, 500];
        let mut w = LatencyWindow::new();
        assert_eq!(w.update(&bounds, &[0, 0, 0, 0]), [None, None, None]);
        // 90 fast, 9 medium, 1 slow
        assert_eq!(
            w.update(&bounds, &[90, 9, 0, 1]),
            [Some(100), Some(100), Some(250)]
        );
        // next interval: 10 requests, all over 500 µs
        assert_eq!(w.update(&bounds, &[90, 9, 0, 11]), [Some(u64::MAX); 3]);
        // counters restarted (a new version): the new counts are the interval
        assert_eq!(w.update(&bounds, &[0, 4, 0, 0]), [Some(250); 3]);
    }

    #[test]
    fn sampler_reads_this_process_and_the_state_dir_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SystemSampler::new(dir.path());
        let first = s.sample(&ServingInput {
            ok_total: 10,
            failed_total: 1,
            invalid_total: 1,
            ..ServingInput::default()
        });
        assert_eq!(first.schema, HEALTH_SCHEMA);
        assert_eq!((first.cpu_system_pct, first.cpu_process_pct), (None, None));
        assert!(first.memory_total_bytes > 0);
        assert!(first.memory_available_bytes <= first.memory_total_bytes);
        let rss = first.process_rss_bytes.unwrap();
        assert!(rss > 1 << 20 && rss < first.memory_total_bytes, "{rss}");
        let (total, free) = (
            first.disk_total_bytes.unwrap(),
            first.disk_free_bytes.unwrap(),
        );
        assert!(total > 0 && free <= total);
        assert!(dir
            .path()
            .canonicalize()
            .unwrap()
            .starts_with(first.disk_mount.as_deref().unwrap()));
        assert!(first.cpu_cores >= 1 && first.system_uptime_s > 0);
        assert_eq!(first.interval_requests, 12);
        assert_eq!(first.error_rate, Some(1.0 / 12.0));
        std::thread::sleep(std::time::Duration::from_millis(250));
        let second = s.sample(&ServingInput {
            latency_p99_us: Some(500),
            ok_total: 28,
            failed_total: 3,
            invalid_total: 1,
            ..ServingInput::default()
        });
        let cpu = second.cpu_process_pct.unwrap();
        assert!(
            (0.0..=100.0 * second.cpu_cores as f64).contains(&cpu),
            "{cpu}"
        );
        assert!((0.0..=100.0).contains(&second.cpu_system_pct.unwrap()));
        assert!(second.interval_ms >= 250);
        assert_eq!(second.interval_requests, 20);
        assert_eq!(second.error_rate, Some(0.1));
        assert_eq!(second.invalid_rate, Some(0.0));
        let v = serde_json::to_value(&second).unwrap();
        assert_eq!(v["latency_p99_us"], 500);
        let back: HealthSample = serde_json::from_value(v).unwrap();
        assert_eq!(back, second);
    }

    #[test]
    fn monitor_turns_samples_into_typed_events() {
        let mut m = HealthMonitor::new(&[(
            Signal::ErrorRate,
            ChartConfig {
                calibration: 5,
                run_length: 0,
                ..Signal::ErrorRate.default_chart()
            },
        )])
        .unwrap();
        let sample = |rate: Option<f64>| HealthSample {
            schema: HEALTH_SCHEMA,
            time_unix_ms: 0,
            interval_ms: 10_000,
            system_uptime_s: 1,
            process_uptime_s: 1,
            cpu_cores: 2,
            cpu_system_pct: None,
            cpu_process_pct: None,
            memory_total_bytes: 1,
            memory_available_bytes: 1,
            process_rss_bytes: None,
            process_virtual_bytes: None,
            disk_mount: None,
            disk_total_bytes: None,
            disk_free_bytes: None,
            latency_p50_us: None,
            latency_p90_us: None,
            latency_p99_us: None,
            interval_requests: 100,
            error_rate: rate,
            invalid_rate: None,
        };
        for _ in 0..5 {
            assert!(m.observe(&sample(Some(0.0))).is_empty());
        }
        // idle intervals carry no error rate and are skipped
        assert!(m.observe(&sample(None)).is_empty());
        // sigma floor 0.01: limit at t = 1 is 3 * 0.01 * 0.2 = 0.006; z = 0.2 * 0.5 = 0.1
        let events = m.observe(&sample(Some(0.5)));
        assert_eq!(events.len(), 1);
        let v = serde_json::to_value(&events[0]).unwrap();
        assert_eq!(v["signal"], "error_rate");
        assert_eq!(v["state"], "raised");
        assert_eq!(v["rule"], "beyond_limit");
        assert!((events[0].limit - 0.006).abs() < 1e-12);
        assert_eq!(m.active(), vec![(Signal::ErrorRate, Rule::BeyondLimit)]);
        assert!(m.observe(&sample(Some(0.5))).is_empty(), "no repeat");
        m.recalibrate(None);
        assert!(m.active().is_empty());
        assert_eq!(HealthMonitor::with_defaults().active(), vec![]);
    }
}
