//! A process's clocks across a move.
//!
//! `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` count from a node's boot, so two nodes' readings
//! differ by as much as their boot times do. A process holds readings of them: timestamps,
//! and deadlines it sleeps until (Python's `time.sleep` and many event loops sleep with
//! `clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`). Rebuilt as it was on a node that
//! booted ten minutes later, such a process would see its clock go back ten minutes and
//! sleep ten minutes longer than it asked; on a node that booted earlier, its clock would
//! jump ahead.
//!
//! So the image carries the process's clocks as it froze ([`Clocks`]: the wall-clock time,
//! and the monotonic and boot-time clocks as the process itself read them, its own time
//! namespace's offsets included). The destination gives the rebuilt process a time
//! namespace (Linux 5.6+) whose offsets make those two clocks go on from there, plus the
//! wall-clock time that passed in between: the nodes' wall clocks agree (every guest takes
//! it from its host), and a negative interval counts as none, so no clock goes back.

use std::fs;
use std::io;

use super::image::Clocks;
use crate::sys;

/// Nanoseconds in a second.
const NS: i64 = 1_000_000_000;

/// Offsets smaller than this (either way) are left alone: the process stays in the
/// destination's own time namespace.
const NEGLIGIBLE_NS: i64 = 1_000_000;

/// This node's clocks now, as the agent reads them.
pub fn here() -> io::Result<Clocks> {
    Ok(Clocks {
        realtime_ns: sys::clock_ns(libc::CLOCK_REALTIME)?,
        monotonic_ns: sys::clock_ns(libc::CLOCK_MONOTONIC)?,
        boottime_ns: sys::clock_ns(libc::CLOCK_BOOTTIME)?,
    })
}

/// Process `pid`'s clocks now: this node's as the agent reads them, moved by how far the
/// process's time namespace is from the agent's (`/proc/PID/timens_offsets`, which shows
/// the namespace its children get: its own unless it unshared one and did not enter it;
/// none on a kernel without time namespaces).
pub fn of_process(pid: u32) -> io::Result<Clocks> {
    let (monotonic, boottime) = timens_offsets(&pid.to_string())?;
    let (my_monotonic, my_boottime) = timens_offsets("self")?;
    let mut c = here()?;
    c.monotonic_ns += monotonic - my_monotonic;
    c.boottime_ns += boottime - my_boottime;
    Ok(c)
}

/// The monotonic and boot-time offsets of `/proc/WHO/timens_offsets`, (0, 0) without it.
fn timens_offsets(who: &str) -> io::Result<(i64, i64)> {
    let path = format!("/proc/{who}/timens_offsets");
    match fs::read_to_string(&path) {
        Ok(text) => parse_timens_offsets(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{path}: not `monotonic S NS` and `boottime S NS` lines: {text:?}"),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((0, 0)),
        Err(e) => Err(e),
    }
}

/// The monotonic and boot-time offsets, in nanoseconds, of a `/proc/PID/timens_offsets`
/// text (`<clock> <seconds> <nanoseconds>` lines; a clock is named or numbered).
pub fn parse_timens_offsets(text: &str) -> Option<(i64, i64)> {
    let (mut monotonic, mut boottime) = (None, None);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let clock = f.next()?;
        let secs: i64 = f.next()?.parse().ok()?;
        let nanos: i64 = f.next()?.parse().ok()?;
        if !(0..NS).contains(&nanos) || f.next().is_some() {
            return None;
        }
        let ns = secs.checked_mul(NS)?.checked_add(nanos)?;
        match clock {
            "monotonic" | "1" => monotonic = Some(ns),
            "boottime" | "7" => boottime = Some(ns),
            _ => return None,
        }
    }
    Some((monotonic?, boottime?))
}

/// The offsets of a time namespace that carries a process's clocks on from `image` (taken
/// at the source) on a node whose clocks read `here`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    /// Added to this node's `CLOCK_MONOTONIC`, in nanoseconds.
    pub monotonic_ns: i64,
    /// Added to this node's `CLOCK_BOOTTIME`, in nanoseconds.
    pub boottime_ns: i64,
}

impl Offsets {
    /// The offsets for `image` here: each clock is the image's plus the wall-clock time
    /// since (none if the wall clocks say it is negative).
    pub fn between(image: &Clocks, here: &Clocks) -> Self {
        let since = here.realtime_ns.saturating_sub(image.realtime_ns).max(0);
        let offset = |then: i64, now: i64| then.saturating_add(since).saturating_sub(now);
        Offsets {
            monotonic_ns: offset(image.monotonic_ns, here.monotonic_ns),
            boottime_ns: offset(image.boottime_ns, here.boottime_ns),
        }
    }

    /// Whether both are too small to matter (below a millisecond either way).
    pub fn negligible(&self) -> bool {
        self.monotonic_ns.abs() < NEGLIGIBLE_NS && self.boottime_ns.abs() < NEGLIGIBLE_NS
    }

    /// The text `/proc/PID/timens_offsets` takes: seconds rounded down, nanoseconds
    /// 0 to 999,999,999.
    pub fn proc_text(&self) -> String {
        let line =
            |name: &str, ns: i64| format!("{name} {} {}\n", ns.div_euclid(NS), ns.rem_euclid(NS));
        line("monotonic", self.monotonic_ns) + &line("boottime", self.boottime_ns)
    }
}

impl std::fmt::Display for Offsets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "monotonic {:+.3} s, boot time {:+.3} s",
            self.monotonic_ns as f64 / NS as f64,
            self.boottime_ns as f64 / NS as f64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clocks(realtime_s: i64, monotonic_s: i64, boottime_s: i64) -> Clocks {
        Clocks {
            realtime_ns: realtime_s * NS,
            monotonic_ns: monotonic_s * NS,
            boottime_ns: boottime_s * NS,
        }
    }

    #[test]
    fn a_destination_that_booted_later_runs_the_clocks_ahead_by_the_difference() {
        // Source up 1000 s; 2 s later the destination, up 400 s, rebuilds the process.
        let image = clocks(5000, 1000, 1010);
        let here = clocks(5002, 400, 405);
        let o = Offsets::between(&image, &here);
        assert_eq!(o.monotonic_ns, (1000 + 2 - 400) * NS);
        assert_eq!(o.boottime_ns, (1010 + 2 - 405) * NS);
        assert!(!o.negligible());
        assert_eq!(o.proc_text(), "monotonic 602 0\nboottime 607 0\n");
    }

    #[test]
    fn a_destination_that_booted_earlier_holds_the_clocks_back() {
        let image = Clocks {
            realtime_ns: 5000 * NS,
            monotonic_ns: 100 * NS,
            boottime_ns: 100 * NS,
        };
        let here = Clocks {
            realtime_ns: 5001 * NS,
            monotonic_ns: 900 * NS + 250_000_000,
            boottime_ns: 900 * NS + 250_000_000,
        };
        let o = Offsets::between(&image, &here);
        assert_eq!(o.monotonic_ns, -(799 * NS + 250_000_000));
        // Negative offsets: whole seconds rounded down, then a positive fraction.
        assert_eq!(
            o.proc_text(),
            "monotonic -800 750000000\nboottime -800 750000000\n"
        );
    }

    #[test]
    fn a_wall_clock_behind_the_sources_never_sets_a_clock_back() {
        let image = clocks(5000, 1000, 1000);
        let here = clocks(4990, 1000, 1000);
        let o = Offsets::between(&image, &here);
        assert_eq!(
            o,
            Offsets {
                monotonic_ns: 0,
                boottime_ns: 0
            }
        );
        assert!(o.negligible());
    }

    #[test]
    fn timens_offsets_are_read_by_name_or_number_and_malformed_text_is_refused() {
        assert_eq!(
            parse_timens_offsets("monotonic 602 5\nboottime -3 999999999\n"),
            Some((602 * NS + 5, -3 * NS + 999_999_999))
        );
        assert_eq!(parse_timens_offsets("1 1 0\n7 0 0\n"), Some((NS, 0)));
        assert_eq!(parse_timens_offsets("monotonic 1 0\n"), None);
        assert_eq!(
            parse_timens_offsets("monotonic 1 1000000000\nboottime 0 0\n"),
            None
        );
        assert_eq!(parse_timens_offsets("realtime 1 0\nboottime 0 0\n"), None);
    }

    #[test]
    fn this_process_clocks_are_the_ones_it_reads() {
        let before = here().unwrap();
        let mine = of_process(std::process::id()).unwrap();
        let after = here().unwrap();
        assert!(
            before.monotonic_ns <= mine.monotonic_ns && mine.monotonic_ns <= after.monotonic_ns
        );
        assert!(before.boottime_ns <= mine.boottime_ns && mine.boottime_ns <= after.boottime_ns);
        assert!(before.realtime_ns <= mine.realtime_ns && mine.realtime_ns <= after.realtime_ns);
    }
}
