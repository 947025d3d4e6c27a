//! Where the CPU went during a bench phase (Linux `/proc`; `None` elsewhere).
//!
//! On a machine where the load generator shares the cores with the service, a ratio such as
//! "committed / bare" only makes sense next to what each request costs: the service's CPU per
//! request, the client's, and whether the machine had any idle time left. These figures come from
//! the kernel's accounting, so they cost nothing while the load runs.

/// Clock ticks per second of `/proc/<pid>/stat`'s times: `USER_HZ`, which Linux fixes at 100 for
/// user space on every mainstream architecture (whatever the kernel's internal tick rate).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU counters at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSample {
    /// User + system time of the service process, in ticks.
    service: u64,
    /// User + system time of this (the client's) process, in ticks.
    client: u64,
    /// Idle + iowait time summed over all cores, in ticks (from `/proc/stat`).
    machine_idle: u64,
    /// All time summed over all cores, in ticks.
    machine_total: u64,
}

/// CPU spent between two samples, per request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// Service CPU per request, microseconds.
    pub service_us_per_request: f64,
    /// Client CPU per request, microseconds.
    pub client_us_per_request: f64,
    /// Share of the machine's CPU time that was idle (0..=1).
    pub machine_idle: f64,
}

impl CpuSample {
    /// Reads the counters now; `None` where `/proc` is not available.
    pub fn take(service_pid: u32) -> Option<CpuSample> {
        let stat = |path: &str| std::fs::read_to_string(path).ok();
        let (machine_idle, machine_total) = parse_machine(&stat("/proc/stat")?)?;
        Some(CpuSample {
            service: parse_process(&stat(&format!("/proc/{service_pid}/stat"))?)?,
            client: parse_process(&stat("/proc/self/stat")?)?,
            machine_idle,
            machine_total,
        })
    }

    /// What was spent from `self` to `later`, over `requests` requests.
    pub fn until(&self, later: &CpuSample, requests: u64) -> CpuUse {
        let us_per_request = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6 / requests.max(1) as f64;
        let total = later.machine_total.saturating_sub(self.machine_total).max(1);
        CpuUse {
            service_us_per_request: us_per_request(later.service.saturating_sub(self.service)),
            client_us_per_request: us_per_request(later.client.saturating_sub(self.client)),
            machine_idle: later.machine_idle.saturating_sub(self.machine_idle) as f64 / total as f64,
        }
    }
}

impl CpuUse {
    /// Requests per second that `cores` cores would sustain at this cost per request (service and
    /// client together) with no idle time: what the CPU allows, whatever else holds a run back.
    /// `None` if the phase used less CPU than the kernel counts (one tick, 10 ms).
    pub fn cpu_bound_rate(&self, cores: usize) -> Option<f64> {
        let us = self.service_us_per_request + self.client_us_per_request;
        (us > 0.0).then(|| cores as f64 * 1e6 / us)
    }
}

/// utime + stime of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and
/// may itself contain spaces and parentheses, so fields are counted after the last `)`.
fn parse_process(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, so utime (14) and stime (15) are the 12th and 13th here.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// (idle + iowait, total) from the `cpu` line of `/proc/stat`. Guest time is already counted in
/// user time, so only the first eight fields are summed.
fn parse_machine(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = values[..] else { return None };
    Some((idle + iowait, user + nice + system + idle + iowait + irq + softirq + steal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_times_are_read_after_the_command_name_even_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 6 0 100 0";
        assert_eq!(parse_process(stat), Some(325));
        assert_eq!(parse_process("4242 (truncated"), None);
    }

    #[test]
    fn machine_idle_counts_iowait_and_total_counts_the_first_eight_fields() {
        let stat = "cpu  100 5 50 800 20 3 2 0 7 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n";
        assert_eq!(parse_machine(stat), Some((820, 980)));
        assert_eq!(parse_machine("cpu0 1 2 3\n"), None);
    }

    #[test]
    fn use_is_per_request_and_idle_is_a_share() {
        let before = CpuSample { service: 1_000, client: 500, machine_idle: 10_000, machine_total: 20_000 };
        let after = CpuSample { service: 1_300, client: 600, machine_idle: 10_050, machine_total: 20_200 };
        // 300 ticks = 3 s of service CPU over 100,000 requests: 30 µs each.
        let used = before.until(&after, 100_000);
        assert!((used.service_us_per_request - 30.0).abs() < 1e-9, "{used:?}");
        assert!((used.client_us_per_request - 10.0).abs() < 1e-9, "{used:?}");
        assert!((used.machine_idle - 0.25).abs() < 1e-9, "{used:?}");
        // 40 µs a request on 2 cores: 2,000,000 µs / 40 = 50,000 requests a second.
        assert!(used.cpu_bound_rate(2).is_some_and(|r| (r - 50_000.0).abs() < 1e-6), "{used:?}");
        let idle = CpuUse { service_us_per_request: 0.0, client_us_per_request: 0.0, machine_idle: 1.0 };
        assert_eq!(idle.cpu_bound_rate(2), None, "no CPU counted, no bound");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_can_be_sampled_on_linux() {
        let sample = CpuSample::take(std::process::id()).expect("/proc is readable");
        assert!(sample.machine_total >= sample.machine_idle);
        assert!(sample.machine_total > 0);
    }
}
