//! What the kernel says about a process: CPU time, resident memory, open-file limit.

use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;

/// A process whose CPU and memory the report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    pub role: Role,
}

/// What a watched process is; servers (gateways, Redis, `--pid`) are summed apart from the
/// bench itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Gateway,
    Redis,
    Other,
    Bench,
}

impl Role {
    pub fn is_server(self) -> bool {
        self != Role::Bench
    }
}

impl Watched {
    /// A process given with `--pid`, named after its `comm`; a `redis-server` is marked as
    /// Redis, anything else counts as a gateway.
    pub fn external(pid: u32) -> Result<Self> {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .with_context(|| format!("--pid {pid}: no such process"))?;
        let comm = comm.trim();
        Ok(Self {
            name: format!("{comm} ({pid})"),
            pid,
            // redis-server is kept apart from the gateways in the idle memory sums.
            role: if comm.starts_with("redis-server") {
                Role::Redis
            } else {
                Role::Other
            },
        })
    }

    pub fn bench() -> Self {
        Self {
            name: "bench (self)".into(),
            pid: std::process::id(),
            role: Role::Bench,
        }
    }
}

/// Clock ticks per second for /proc CPU times (`getconf CLK_TCK`, 100 when unknown).
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// utime + stime of `pid`, in clock ticks.
///
/// # Errors
/// When the process is gone or the file cannot be parsed.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat format"))
}

/// Fields after the command name (which may hold spaces and parentheses): the 12th and 13th
/// are utime and stime (fields 14 and 15 of the whole line).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of `pid` in bytes (VmRSS).
///
/// # Errors
/// When the process is gone or has no VmRSS line.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Soft open-file limit of `pid`, when readable.
pub fn nofile_limit(pid: u32) -> Option<u64> {
    let pid = i32::try_from(pid).ok()?;
    rlimit::ProcLimits::read_process(pid)
        .ok()?
        .max_open_files?
        .soft_limit
}

/// Raises this process's soft open-file limit to the hard limit (spawned gateways inherit it).
/// Returns the new soft limit.
pub fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft),
    }
}

/// The machine-wide count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows`); a rising count during a connect storm means SYNs were
/// dropped and clients waited for a retransmission (1 s, then 3 s).
pub fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    netstat_field(&netstat, "TcpExt:", "ListenOverflows")
}

fn netstat_field(netstat: &str, section: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with(section));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Raises both open-file limits to `needed` (works as root, or below the hard limit);
/// returns the soft limit in force afterwards.
pub fn raise_nofile_to(needed: u64) -> u64 {
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, needed, needed.max(hard));
    }
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
}

/// CPU ticks of every watched process at one moment (None: unreadable).
#[derive(Debug, Clone)]
pub struct CpuSnapshot(Vec<Option<u64>>);

impl CpuSnapshot {
    pub fn take(procs: &[Watched]) -> Self {
        Self(procs.iter().map(|p| cpu_ticks(p.pid).ok()).collect())
    }
}

/// CPU used by one process between two snapshots.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    pub name: String,
    pub pid: u32,
    pub role: Role,
    pub cpu_seconds: Option<f64>,
    /// CPU microseconds per unit of work (delivery, connection), when there was work.
    pub us_per_unit: Option<f64>,
}

/// Per-process CPU between `before` and `after`, divided by `units`; plus one "servers" line
/// summing everything but the bench.
pub fn cpu_use(
    procs: &[Watched],
    before: &CpuSnapshot,
    after: &CpuSnapshot,
    units: u64,
) -> Vec<CpuUse> {
    let tick = clock_ticks() as f64;
    let per_unit = |secs: f64| (units > 0).then(|| secs * 1e6 / units as f64);
    let mut rows: Vec<CpuUse> = procs
        .iter()
        .zip(before.0.iter().zip(&after.0))
        .map(|(p, (b, a))| {
            let secs = match (b, a) {
                (Some(b), Some(a)) => Some(a.saturating_sub(*b) as f64 / tick),
                _ => None,
            };
            CpuUse {
                name: p.name.clone(),
                pid: p.pid,
                role: p.role,
                cpu_seconds: secs,
                us_per_unit: secs.and_then(per_unit),
            }
        })
        .collect();
    let servers: Vec<f64> = rows
        .iter()
        .filter(|r| r.role.is_server())
        .filter_map(|r| r.cpu_seconds)
        .collect();
    if !servers.is_empty() {
        let total: f64 = servers.iter().sum();
        let at = rows
            .iter()
            .position(|r| r.role == Role::Bench)
            .unwrap_or(rows.len());
        rows.insert(
            at,
            CpuUse {
                name: "servers total".into(),
                pid: 0,
                role: Role::Other,
                cpu_seconds: Some(total),
                us_per_unit: per_unit(total),
            },
        );
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name_even_with_spaces_in_it() {
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 75 0 0 20 0 4 0 \
                    1000 1000000 300 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn vm_rss_is_converted_from_kib() {
        let status = "Name:\twsgate\nVmPeak:\t  9999 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(2 * 1024 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn netstat_counters_are_found_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 0 70 71\n\
                       IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(
            netstat_field(netstat, "TcpExt:", "ListenOverflows"),
            Some(70)
        );
        assert_eq!(netstat_field(netstat, "TcpExt:", "Nope"), None);
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_ok());
        assert!(rss_bytes(me).is_ok_and(|b| b > 0));
        assert!(clock_ticks() > 0);
    }
}
