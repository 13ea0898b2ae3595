//! What a process cost, read from `/proc`: CPU seconds (user + system) and peak resident set.
//!
//! Each figure is a difference between two readings around a phase, so processes that
//! live through several phases (the engine) are charged per phase. The peak is reset at the
//! start of a phase (`clear_refs` 5), so it is the phase's own peak.

use std::io;

/// Clock ticks per second of `/proc/PID/stat`'s times: `USER_HZ`, fixed at 100 by the Linux
/// ABI on every architecture seedcast builds for (the kernel scales its own HZ to it).
const USER_HZ: f64 = 100.0;

/// A process to meter: a child by pid, or this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    This,
    Child(u32),
}

impl Pid {
    fn proc(&self, file: &str) -> String {
        match self {
            Pid::This => format!("/proc/self/{file}"),
            Pid::Child(p) => format!("/proc/{p}/{file}"),
        }
    }

    /// The fields of `/proc/PID/stat` after the command name (which may hold spaces).
    fn stat_fields(&self) -> io::Result<Vec<u64>> {
        let s = std::fs::read_to_string(self.proc("stat"))?;
        let rest = s
            .rsplit_once(") ")
            .map(|(_, r)| r)
            .ok_or_else(|| io::Error::other("unreadable /proc stat"))?;
        // Field 3 (state) is a letter; parse the rest, keeping positions.
        Ok(rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect())
    }

    /// CPU seconds this process has used (user + system).
    pub fn cpu_secs(&self) -> io::Result<f64> {
        let f = self.stat_fields()?;
        // utime and stime are fields 14 and 15 of stat: 11 and 12 after the name.
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        Ok(ticks as f64 / USER_HZ)
    }

    /// CPU seconds of this process's children that have exited and been waited for.
    pub fn reaped_children_cpu_secs(&self) -> io::Result<f64> {
        let f = self.stat_fields()?;
        let ticks = f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0);
        Ok(ticks as f64 / USER_HZ)
    }

    /// Peak resident set since start or the last [`Pid::reset_peak`], in bytes.
    pub fn peak_rss(&self) -> io::Result<u64> {
        let s = std::fs::read_to_string(self.proc("status"))?;
        let kib = s
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| io::Error::other("no VmHWM in /proc status"))?;
        Ok(kib * 1024)
    }

    /// Start a new peak from the current resident set.
    pub fn reset_peak(&self) -> io::Result<()> {
        std::fs::write(self.proc("clear_refs"), "5")
    }
}

/// CPU seconds of a set of processes at one moment.
#[derive(Debug, Clone)]
pub struct CpuSnapshot(Vec<(Pid, f64)>);

impl CpuSnapshot {
    pub fn take(pids: &[Pid]) -> io::Result<Self> {
        pids.iter()
            .map(|p| Ok((*p, p.cpu_secs()?)))
            .collect::<io::Result<_>>()
            .map(CpuSnapshot)
    }

    /// CPU seconds used since this snapshot, summed over its processes.
    pub fn since(&self) -> io::Result<f64> {
        let mut total = 0.0;
        for (p, before) in &self.0 {
            total += p.cpu_secs()? - before;
        }
        Ok(total.max(0.0))
    }
}

/// The largest peak of a set of processes.
pub fn max_peak(pids: &[Pid]) -> io::Result<u64> {
    pids.iter()
        .map(|p| p.peak_rss())
        .try_fold(0, |m, r| r.map(|v| m.max(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_metered() {
        let me = Pid::This;
        let before = CpuSnapshot::take(&[me]).unwrap();
        // Burn some CPU and touch 64 MiB so both figures move.
        let mut v = vec![0u8; 64 << 20];
        let mut h = blake3::Hasher::new();
        for _ in 0..8 {
            for b in v.iter_mut().step_by(4096) {
                *b = b.wrapping_add(1);
            }
            h.update(&v);
        }
        std::hint::black_box(h.finalize());
        assert!(before.since().unwrap() > 0.0);
        let peak = me.peak_rss().unwrap();
        assert!(peak >= 64 << 20);
        drop(v);
        me.reset_peak().unwrap();
        // Other tests of this process may hold memory meanwhile: the peak restarts from
        // what is resident now, well under the one with the 64 MiB.
        let after = me.peak_rss().unwrap();
        assert!(
            after + (32 << 20) < peak,
            "the peak restarts: {after} after {peak}"
        );
    }

    #[test]
    fn children_are_charged_once_reaped() {
        let me = Pid::This;
        let before = me.reaped_children_cpu_secs().unwrap();
        let st = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(st.success());
        assert!(me.reaped_children_cpu_secs().unwrap() > before);
    }
}
