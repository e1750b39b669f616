//! The guest's processes and load, read from `/proc`.
//!
//! Parsing lives in pure functions over a file's bytes (`parse_*`), tested on real and hostile
//! samples. The functions that read files ([`list_processes`], [`process_list`], [`load`])
//! take the `/proc` directory, so tests can point them at a fake tree.
//!
//! `/proc` changes while it is read: a process may exit between listing `/proc` and reading
//! its files, or between two of its files. Such a process is left out, never an error.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::protocol::{
    cmdline_len, LoadInfo, ProcessInfo, ProcessList, CMDLINE_CAP, CMDLINE_CAP_CROWDED, MAX_PAYLOAD,
};
use crate::sys;

/// The `PF_KTHREAD` bit of the flags in `/proc/PID/stat`: the task is a kernel thread.
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// The most bytes of `comm` kept (the kernel keeps 16, longer for some kernel threads).
pub const COMM_CAP: usize = 64;

/// The most bytes read of a small `/proc` file (`stat`, `status`, `loadavg`, ...).
const SMALL_FILE_LIMIT: u64 = 64 * 1024;

/// The most bytes read of `/proc/stat`, which has a line per CPU and a long `intr` line.
const PROC_STAT_LIMIT: u64 = 4 << 20;

/// Errors reading `/proc` as a whole (a single process that cannot be read is skipped).
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A file or directory could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        error: io::Error,
    },
    /// A file did not hold what it should.
    #[error("cannot make sense of {}: {what}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was missing or malformed.
        what: &'static str,
    },
}

/// The fields of `/proc/PID/stat` the agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Field 1.
    pub pid: u32,
    /// Field 2, without its parentheses, at most [`COMM_CAP`] bytes, lossily UTF-8.
    pub comm: String,
    /// Field 3, the state letter.
    pub state: u8,
    /// Field 4.
    pub ppid: u32,
    /// Field 9, the `PF_*` flags.
    pub flags: u64,
    /// Field 14, user time in clock ticks.
    pub utime: u64,
    /// Field 15, system time in clock ticks.
    pub stime: u64,
    /// Field 20.
    pub num_threads: u32,
    /// Field 22, start time in clock ticks after boot.
    pub starttime: u64,
    /// Field 24, resident set size in pages.
    pub rss_pages: u64,
}

/// Parses `/proc/PID/stat`. `comm` (field 2) may hold anything but a NUL, including spaces,
/// parentheses and newlines, so it runs from the first `(` to the *last* `)`, and the
/// numbered fields are counted from there. `None` if the text is not a stat line.
pub fn parse_stat(text: &[u8]) -> Option<Stat> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let pid = std::str::from_utf8(&text[..open])
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = lossy_capped(&text[open + 1..close], COMM_CAP);
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    // fields[0] is field 3 (state), so field n is fields[n - 3].
    let fields: Vec<&str> = rest.split_ascii_whitespace().take(22).collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let state = match field(3)?.as_bytes() {
        [c] if c.is_ascii_graphic() => *c,
        _ => return None,
    };
    let num = |n: usize| field(n)?.parse::<u64>().ok();
    // Signed in the kernel; never negative in practice, and clamped to 0 if it were.
    let signed = |n: usize| field(n)?.parse::<i64>().ok().map(|v| v.max(0) as u64);
    Some(Stat {
        pid,
        comm,
        state,
        ppid: field(4)?.parse().ok()?,
        flags: num(9)?,
        utime: num(14)?,
        stime: num(15)?,
        num_threads: u32::try_from(signed(20)?).unwrap_or(u32::MAX),
        starttime: num(22)?,
        rss_pages: signed(24)?,
    })
}

/// The effective user id from `/proc/PID/status` (the second number of its `Uid:` line).
pub fn parse_status_uid(text: &[u8]) -> Option<u32> {
    let line = text
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(b"Uid:"))?;
    let line = std::str::from_utf8(&line[4..]).ok()?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Splits `/proc/PID/cmdline` at NUL bytes, dropping trailing NULs (a process that rewrote
/// its arguments pads them with NULs; a real trailing empty argument is lost too), and caps
/// it to `cap` bytes with [`cap_cmdline`]. Empty for kernel threads and zombies. Bytes that
/// are not UTF-8 become U+FFFD.
pub fn parse_cmdline(bytes: &[u8], cap: usize) -> Vec<String> {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if end == 0 {
        return Vec::new();
    }
    let mut args = Vec::new();
    let mut used = 0;
    for arg in bytes[..end].split(|&b| b == 0) {
        // Stop early: a hostile cmdline of a million empty arguments costs no allocation.
        if used > cap {
            break;
        }
        used += 4 + arg.len();
        args.push(String::from_utf8_lossy(arg).into_owned());
    }
    cap_cmdline(&mut args, cap);
    args
}

/// Cuts a command line to at most `cap` bytes as [`cmdline_len`] counts them (4 per argument
/// plus its bytes): the argument that crosses the cap is shortened at a character boundary
/// (or dropped if nothing of it fits), the ones after it dropped.
pub fn cap_cmdline(args: &mut Vec<String>, cap: usize) {
    if cmdline_len(args) <= cap {
        return;
    }
    let mut used = 0;
    for i in 0..args.len() {
        let need = 4 + args[i].len();
        if used + need <= cap {
            used += need;
            continue;
        }
        let room = cap.saturating_sub(used + 4);
        let mut cut = room.min(args[i].len());
        while !args[i].is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            args.truncate(i);
        } else {
            args[i].truncate(cut);
            args.truncate(i + 1);
        }
        return;
    }
}

/// Parses a non-negative decimal such as `12345.67` into thousandths (`12345670`), without
/// floating point. At most three fractional digits count.
fn parse_milli(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut milli = int.parse::<u64>().ok()?.checked_mul(1000)?;
    for (i, d) in frac.bytes().take(3).enumerate() {
        milli += u64::from(d - b'0') * [100, 10, 1][i];
    }
    Some(milli)
}

/// Milliseconds since boot from `/proc/uptime` (`"12345.67 23456.78\n"`).
pub fn parse_uptime(text: &str) -> Option<u64> {
    parse_milli(text.split_ascii_whitespace().next()?)
}

/// What `/proc/loadavg` says (`"0.52 0.58 0.59 2/1345 12345\n"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadAvg {
    /// The 1, 5 and 15 minute averages times 1000.
    pub milli: [u32; 3],
    /// Runnable scheduling entities.
    pub running: u32,
    /// All scheduling entities.
    pub total: u32,
}

/// Parses `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<LoadAvg> {
    let mut f = text.split_ascii_whitespace();
    let mut avg = || parse_milli(f.next()?).map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    let milli = [avg()?, avg()?, avg()?];
    let (running, total) = f.next()?.split_once('/')?;
    Some(LoadAvg {
        milli,
        running: running.parse().ok()?,
        total: total.parse().ok()?,
    })
}

/// `(total, idle)` CPU ticks from the aggregate `cpu` line of `/proc/stat`: total is user +
/// nice + system + idle + iowait + irq + softirq + steal (guest and guest_nice are already in
/// user and nice), idle is idle + iowait. Kernels with fewer columns count what they have; at
/// least four are required.
pub fn parse_proc_stat_cpu(text: &str) -> Option<(u64, u64)> {
    let line = text
        .lines()
        .find(|l| l.split_ascii_whitespace().next() == Some("cpu"))?;
    let values: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if values.len() < 4 {
        return None;
    }
    let total = values.iter().fold(0u64, |a, &v| a.saturating_add(v));
    let idle = values[3].saturating_add(values.get(4).copied().unwrap_or(0));
    Some((total, idle))
}

/// `(MemTotal, MemAvailable)` in KiB from `/proc/meminfo`; MemAvailable is estimated as
/// `MemFree + Buffers + Cached` on kernels before 3.14, which lack it.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let get = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            if k != key {
                return None;
            }
            v.split_ascii_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let total = get("MemTotal")?;
    let available = match get("MemAvailable") {
        Some(a) => a,
        None => get("MemFree")?
            .saturating_add(get("Buffers").unwrap_or(0))
            .saturating_add(get("Cached").unwrap_or(0)),
    };
    Some((total, available))
}

/// Puts a process's parsed files together. A kernel thread is one with `PF_KTHREAD`, or,
/// without a command line, kthreadd (pid 2) or one of its children (a fallback that never
/// matters on kernels since 2.6.27, which all set the flag).
pub fn process_info(stat: Stat, uid: u32, cmdline: Vec<String>, page_size: u64) -> ProcessInfo {
    let kernel_thread =
        stat.flags & PF_KTHREAD != 0 || (cmdline.is_empty() && (stat.pid == 2 || stat.ppid == 2));
    ProcessInfo {
        pid: stat.pid,
        ppid: stat.ppid,
        uid,
        state: stat.state,
        threads: stat.num_threads,
        rss_kib: stat.rss_pages.saturating_mul(page_size) / 1024,
        cpu_ticks: stat.utime.saturating_add(stat.stime),
        start_ticks: stat.starttime,
        kernel_thread,
        comm: stat.comm,
        cmdline,
    }
}

/// Makes the list fit a frame of `budget` payload bytes: as is if it fits, else with every
/// command line cut to [`CMDLINE_CAP_CROWDED`], and if that is still too big, without the
/// highest pids and `truncated` set. `processes` must be sorted by pid.
pub fn fit_in_frame(processes: Vec<ProcessInfo>, budget: usize) -> ProcessList {
    let mut list = ProcessList {
        processes,
        truncated: false,
    };
    if list.encoded_len() <= budget {
        return list;
    }
    for p in &mut list.processes {
        cap_cmdline(&mut p.cmdline, CMDLINE_CAP_CROWDED);
    }
    let mut used = ProcessList::default().encoded_len();
    let keep = list
        .processes
        .iter()
        .take_while(|p| {
            used += p.encoded_len();
            used <= budget
        })
        .count();
    if keep < list.processes.len() {
        list.processes.truncate(keep);
        list.truncated = true;
    }
    list
}

/// Reads at most `limit` bytes of a file.
fn read_limited(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read_text(path: &Path, limit: u64) -> Result<String, ProcError> {
    let bytes = read_limited(path, limit).map_err(|error| ProcError::Read {
        path: path.to_owned(),
        error,
    })?;
    String::from_utf8(bytes).map_err(|_| ProcError::Parse {
        path: path.to_owned(),
        what: "not UTF-8",
    })
}

/// One process, or `None` if it is gone (or its files are unreadable or malformed).
pub fn read_process(proc: &Path, pid: u32, page_size: u64) -> Option<ProcessInfo> {
    let dir = proc.join(pid.to_string());
    let stat = parse_stat(&read_limited(&dir.join("stat"), SMALL_FILE_LIMIT).ok()?)?;
    if stat.pid != pid {
        return None;
    }
    let uid = parse_status_uid(&read_limited(&dir.join("status"), SMALL_FILE_LIMIT).ok()?)?;
    // Empty if it exited meanwhile; the stat already read still describes it.
    let cmdline = read_limited(&dir.join("cmdline"), CMDLINE_CAP as u64).unwrap_or_default();
    Some(process_info(
        stat,
        uid,
        parse_cmdline(&cmdline, CMDLINE_CAP),
        page_size,
    ))
}

/// Every process under `proc` (normally `/proc`), by ascending pid, skipping those that
/// vanish while being read. Fails only if the directory itself cannot be read.
pub fn list_processes(proc: &Path) -> Result<Vec<ProcessInfo>, ProcError> {
    let read_error = |error| ProcError::Read {
        path: proc.to_owned(),
        error,
    };
    let mut pids: Vec<u32> = std::fs::read_dir(proc)
        .map_err(read_error)?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let page_size = sys::page_size();
    Ok(pids
        .into_iter()
        .filter_map(|pid| read_process(proc, pid, page_size))
        .collect())
}

/// [`list_processes`], made to fit a [`crate::protocol::Message::Processes`] frame.
pub fn process_list(proc: &Path) -> Result<ProcessList, ProcError> {
    Ok(fit_in_frame(list_processes(proc)?, MAX_PAYLOAD))
}

/// The guest's load, from `uptime`, `loadavg`, `stat` and `meminfo` under `proc`.
pub fn load(proc: &Path) -> Result<LoadInfo, ProcError> {
    fn parsed<T>(
        proc: &Path,
        name: &str,
        limit: u64,
        what: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, ProcError> {
        let path = proc.join(name);
        let text = read_text(&path, limit)?;
        parse(&text).ok_or(ProcError::Parse { path, what })
    }
    let uptime_ms = parsed(proc, "uptime", SMALL_FILE_LIMIT, "no uptime", parse_uptime)?;
    let avg = parsed(
        proc,
        "loadavg",
        SMALL_FILE_LIMIT,
        "no load averages",
        parse_loadavg,
    )?;
    let (cpu_total_ticks, cpu_idle_ticks) = parsed(
        proc,
        "stat",
        PROC_STAT_LIMIT,
        "no `cpu` line",
        parse_proc_stat_cpu,
    )?;
    let (mem_total_kib, mem_available_kib) = parsed(
        proc,
        "meminfo",
        SMALL_FILE_LIMIT,
        "no MemTotal",
        parse_meminfo,
    )?;
    Ok(LoadInfo {
        uptime_ms,
        load_milli: avg.milli,
        procs_running: avg.running,
        procs_total: avg.total,
        cpu_total_ticks,
        cpu_idle_ticks,
        online_cpus: sys::online_cpus(),
        mem_total_kib,
        mem_available_kib,
        clock_ticks_per_sec: sys::clock_ticks_per_sec(),
    })
}

/// `bytes` as UTF-8 (invalid sequences become U+FFFD), cut to at most `cap` bytes at a
/// character boundary.
fn lossy_capped(bytes: &[u8], cap: usize) -> String {
    let mut s = String::from_utf8_lossy(&bytes[..bytes.len().min(cap)]).into_owned();
    let mut cut = s.len().min(cap);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user process: bash in a terminal (Linux 6.1).
    const BASH_STAT: &[u8] = b"4242 (bash) S 4241 4242 4242 34816 4300 4194560 2371 9466 0 4 \
        57 31 12 8 20 0 1 0 123456 9412608 1234 18446744073709551615 94 95 140 0 0 0 65536 \
        3670020 1266777851 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    /// kthreadd: flags 0x208040 include PF_KTHREAD; tpgid -1.
    const KTHREADD_STAT: &[u8] = b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 3 0 0 20 0 1 0 \
        2 0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 0 1 0 0 0 0 0 0 0 0 0 0 0 \
        0 0\n";

    const SLEEPY_STAT: &[u8] =
        b"60 (sleepy) S 1 60 60 0 -1 4194304 0 0 0 0 1 1 0 0 20 0 1 0 50 1000 20 0\n";

    const STATUS: &[u8] = b"Name:\tbash\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        Ngid:\t0\nPid:\t4242\nPPid:\t4241\nTracerPid:\t0\nUid:\t1000\t1001\t1002\t1003\n\
        Gid:\t1000\t1000\t1000\t1000\nFDSize:\t256\nThreads:\t1\n";

    #[test]
    fn a_user_process_stat() {
        let s = parse_stat(BASH_STAT).unwrap();
        assert_eq!(
            s,
            Stat {
                pid: 4242,
                comm: "bash".into(),
                state: b'S',
                ppid: 4241,
                flags: 4194560,
                utime: 57,
                stime: 31,
                num_threads: 1,
                starttime: 123456,
                rss_pages: 1234,
            }
        );
        let p = process_info(s, 1001, vec!["-bash".into()], 4096);
        assert_eq!(p.rss_kib, 1234 * 4);
        assert_eq!(p.cpu_ticks, 88);
        assert_eq!(p.start_ticks, 123456);
        assert!(!p.kernel_thread);
    }

    #[test]
    fn kernel_threads_are_recognised_by_flag_or_by_kthreadd() {
        let s = parse_stat(KTHREADD_STAT).unwrap();
        assert_eq!((s.pid, s.ppid, s.comm.as_str()), (2, 0, "kthreadd"));
        assert!(process_info(s.clone(), 0, vec![], 4096).kernel_thread);
        // Without the flag: kthreadd and its children without a command line still are.
        let no_flag = |pid, ppid| Stat {
            pid,
            ppid,
            flags: 0,
            ..s.clone()
        };
        assert!(process_info(no_flag(2, 0), 0, vec![], 4096).kernel_thread);
        assert!(process_info(no_flag(77, 2), 0, vec![], 4096).kernel_thread);
        assert!(!process_info(no_flag(77, 2), 0, vec!["x".into()], 4096).kernel_thread);
        assert!(!process_info(no_flag(77, 1), 0, vec![], 4096).kernel_thread);
    }

    #[test]
    fn hostile_comms_with_spaces_parentheses_and_newlines() {
        let cases: &[(&[u8], &str)] = &[
            (b"77 (a b) R 1 ", "a b"),
            (b"77 (x) S 9 9 (evil)) R 1 ", "x) S 9 9 (evil)"),
            (b"77 ()) R 1 ", ")"),
            (b"77 (() R 1 ", "("),
            (b"77 (line\nbreak) R 1 ", "line\nbreak"),
            (b"77 () R 1 ", ""),
        ];
        for (head, comm) in cases {
            let mut text = head.to_vec();
            text.extend_from_slice(b"1 1 0 -1 4194304 0 0 0 0 5 6 0 0 20 0 3 0 99 0 10 0\n");
            let s = parse_stat(&text).unwrap_or_else(|| panic!("{text:?}"));
            assert_eq!(s.comm, *comm);
            assert_eq!((s.pid, s.state, s.ppid), (77, b'R', 1));
            assert_eq!((s.utime, s.stime, s.num_threads), (5, 6, 3));
            assert_eq!((s.starttime, s.rss_pages), (99, 10));
        }
        // Not UTF-8, and longer than the cap.
        let mut text = b"8 (\xff\xfe".to_vec();
        text.extend_from_slice(&[b'x'; 100]);
        text.extend_from_slice(b") S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 5 0 2 0\n");
        let s = parse_stat(&text).unwrap();
        assert!(s.comm.starts_with("\u{fffd}\u{fffd}xx"));
        assert!(s.comm.len() <= COMM_CAP);
    }

    #[test]
    fn malformed_stats_are_none() {
        let cases: &[&[u8]] = &[
            b"",
            b"\n",
            b"12",
            b"12 (bash",
            b"12 bash) S 1",
            b") 12 (x",
            b"12 (bash) S 1 1 1 0 -1 0 0 0",
            b"x (bash) S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 5 0 2 0",
            b"-1 (bash) S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 5 0 2 0",
            b"12 (bash) SS 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 5 0 2 0",
            b"12 (bash) S -1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 5 0 2 0",
            b"12 (bash) S 1 1 1 0 -1 0 0 0 0 0 x 1 0 0 20 0 1 0 5 0 2 0",
            b"12 (bash) S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 5 0 \xff 0",
        ];
        for c in cases {
            assert_eq!(parse_stat(c), None, "{:?}", String::from_utf8_lossy(c));
        }
    }

    #[test]
    fn status_uid_is_the_effective_one() {
        assert_eq!(parse_status_uid(STATUS), Some(1001));
        assert_eq!(
            parse_status_uid(b"Name:\t\xff\nUid:\t0\t0\t0\t0\n"),
            Some(0)
        );
        assert_eq!(parse_status_uid(b"Name:\tx\n"), None);
        assert_eq!(parse_status_uid(b"Uid:\t5\n"), None);
        assert_eq!(parse_status_uid(b"Uid:\t5\tx\n"), None);
        assert_eq!(parse_status_uid(b""), None);
    }

    #[test]
    fn cmdlines_split_at_nuls() {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_cmdline(b"/usr/bin/python3\0-c\0print('a b')\0", 4096),
            s(&["/usr/bin/python3", "-c", "print('a b')"])
        );
        assert_eq!(parse_cmdline(b"", 4096), s(&[]));
        assert_eq!(parse_cmdline(b"\0\0\0", 4096), s(&[]));
        // Rewritten by setproctitle: one string with spaces, NUL padding.
        assert_eq!(
            parse_cmdline(b"nginx: worker process\0\0\0\0\0\0", 4096),
            s(&["nginx: worker process"])
        );
        // Empty arguments inside survive; no terminating NUL is fine.
        assert_eq!(parse_cmdline(b"a\0\0b", 4096), s(&["a", "", "b"]));
        assert_eq!(parse_cmdline(b"a\xffb\0c", 4096), s(&["a\u{fffd}b", "c"]));
    }

    #[test]
    fn cmdlines_are_capped() {
        let long = [b'a'; 10_000];
        let args = parse_cmdline(&long, 4096);
        assert_eq!(args, vec!["a".repeat(4092)]);
        assert_eq!(cmdline_len(&args), 4096);
        // A million empty arguments.
        let args = parse_cmdline(&[b"x".as_slice(), &[0; 1_000_000], b"y"].concat(), 4096);
        assert!(cmdline_len(&args) <= 4096);
        assert_eq!(args.len(), 1 + (4096 - 5) / 4);
        // The crossing argument is cut at a character boundary, the rest dropped.
        let mut args = vec!["ab".to_string(), "ééé".into(), "c".into()];
        cap_cmdline(&mut args, 6 + 4 + 3);
        assert_eq!(args, vec!["ab", "é"]);
        let mut args = vec!["ab".to_string(), "ééé".into()];
        cap_cmdline(&mut args, 6 + 4 + 1);
        assert_eq!(args, vec!["ab"]);
        let mut args = vec!["ab".to_string(), "c".into()];
        cap_cmdline(&mut args, 5);
        assert_eq!(args, vec!["a"]);
        cap_cmdline(&mut args, 0);
        assert!(args.is_empty());
    }

    #[test]
    fn uptime_and_loadavg() {
        assert_eq!(parse_uptime("12345.67 23456.78\n"), Some(12_345_670));
        assert_eq!(parse_uptime("0.05 0.00\n"), Some(50));
        assert_eq!(parse_uptime("7 1\n"), Some(7000));
        assert_eq!(parse_uptime("1.23456"), Some(1234));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("-1.00 2"), None);
        assert_eq!(parse_uptime(".5 2"), None);
        assert_eq!(parse_uptime("1.x 2"), None);
        assert_eq!(
            parse_loadavg("0.52 0.58 10.59 2/1345 12345\n"),
            Some(LoadAvg {
                milli: [520, 580, 10_590],
                running: 2,
                total: 1345,
            })
        );
        assert_eq!(
            parse_loadavg("99999999.00 0.00 0.00 1/1 1\n")
                .unwrap()
                .milli[0],
            u32::MAX
        );
        assert_eq!(parse_loadavg("0.52 0.58 0.59 21345 12345\n"), None);
        assert_eq!(parse_loadavg("0.52 0.58\n"), None);
        assert_eq!(parse_loadavg(""), None);
    }

    #[test]
    fn proc_stat_cpu_line() {
        let text = "cpu  10132153 290696 3084719 46828483 16683 0 25195 0 175628 0\n\
                    cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0\n\
                    intr 1462898 0 0 0\nctxt 115315\nbtime 1716000000\n\
                    processes 4242\nprocs_running 2\nprocs_blocked 0\n";
        let total = 10132153 + 290696 + 3084719 + 46828483 + 16683 + 25195;
        assert_eq!(parse_proc_stat_cpu(text), Some((total, 46828483 + 16683)));
        // An old kernel with four columns.
        assert_eq!(parse_proc_stat_cpu("cpu 1 2 3 4\n"), Some((10, 4)));
        assert_eq!(parse_proc_stat_cpu("cpu 1 2 3\n"), None);
        assert_eq!(parse_proc_stat_cpu("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_proc_stat_cpu("cpu 1 2 x 4\n"), None);
        assert_eq!(parse_proc_stat_cpu(""), None);
        let huge = format!("cpu {} {} 0 5\n", u64::MAX, u64::MAX);
        assert_eq!(parse_proc_stat_cpu(&huge), Some((u64::MAX, 5)));
    }

    #[test]
    fn meminfo_with_and_without_mem_available() {
        let text = "MemTotal:        2030368 kB\nMemFree:          123456 kB\n\
                    MemAvailable:    1734236 kB\nBuffers:           10000 kB\n\
                    Cached:           500000 kB\n";
        assert_eq!(parse_meminfo(text), Some((2030368, 1734236)));
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n";
        assert_eq!(parse_meminfo(old), Some((1000, 420)));
        assert_eq!(parse_meminfo("MemFree: 100 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotalX: 5 kB\nMemTotal: x kB\n"), None);
        assert_eq!(parse_meminfo(""), None);
    }

    fn process(pid: u32, args: usize, arg_len: usize) -> ProcessInfo {
        ProcessInfo {
            pid,
            comm: "worker".into(),
            cmdline: vec!["x".repeat(arg_len); args],
            ..Default::default()
        }
    }

    #[test]
    fn a_list_that_fits_is_left_alone() {
        let procs: Vec<_> = (1..=100).map(|pid| process(pid, 4, 1000)).collect();
        let list = fit_in_frame(procs.clone(), MAX_PAYLOAD);
        assert_eq!((list.processes, list.truncated), (procs, false));
    }

    #[test]
    fn a_crowded_list_loses_long_cmdlines_first_then_its_highest_pids() {
        // 1000 processes with 4 KiB command lines: 4 MiB, over the limit; cut to 256 bytes of
        // command line each they fit.
        let procs: Vec<_> = (1..=1000).map(|pid| process(pid, 4, 1019)).collect();
        let list = fit_in_frame(procs, MAX_PAYLOAD);
        assert!(!list.truncated);
        assert_eq!(list.processes.len(), 1000);
        assert!(list
            .processes
            .iter()
            .all(|p| cmdline_len(&p.cmdline) <= CMDLINE_CAP_CROWDED));
        assert!(list.encoded_len() <= MAX_PAYLOAD);
        // 10000 of them do not: the list is cut and says so.
        let procs: Vec<_> = (1..=10_000).map(|pid| process(pid, 4, 1019)).collect();
        let list = fit_in_frame(procs, MAX_PAYLOAD);
        assert!(list.truncated);
        assert!(list.processes.len() > 2000 && list.processes.len() < 10_000);
        assert_eq!(
            list.processes.last().unwrap().pid as usize,
            list.processes.len()
        );
        assert!(list.encoded_len() <= MAX_PAYLOAD);
        let frame = crate::protocol::Message::Processes(list).encode_checked();
        assert!(frame.is_ok());
    }

    /// A directory name under /proc and its `stat`, `status` and `cmdline` (`None`: missing).
    type FakeProcess<'a> = (
        &'a str,
        Option<&'a [u8]>,
        Option<&'a [u8]>,
        Option<&'a [u8]>,
    );

    /// A fake /proc with one process per (pid, stat, status, cmdline); `None` leaves a file out.
    fn fake_proc(name: &str, procs: &[FakeProcess]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("ferry-procfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (pid, stat, status, cmdline) in procs {
            let dir = root.join(pid);
            std::fs::create_dir_all(&dir).unwrap();
            for (file, content) in [("stat", stat), ("status", status), ("cmdline", cmdline)] {
                if let Some(c) = content {
                    std::fs::write(dir.join(file), c).unwrap();
                }
            }
        }
        std::fs::create_dir_all(root.join("sys")).unwrap();
        std::fs::write(root.join("uptime"), "100.50 150.00\n").unwrap();
        root
    }

    #[test]
    fn vanished_and_unreadable_processes_are_skipped() {
        let root = fake_proc(
            "list",
            &[
                ("4242", Some(BASH_STAT), Some(STATUS), Some(b"-bash\0")),
                ("2", Some(KTHREADD_STAT), Some(STATUS), Some(b"")),
                // Gone before its stat was read.
                ("50", None, None, None),
                // Gone between stat and status.
                ("51", Some(BASH_STAT), None, None),
                // A stat for another pid (a recycled directory name).
                ("52", Some(BASH_STAT), Some(STATUS), Some(b"")),
                // Gone before its cmdline was read: listed without one.
                ("60", Some(SLEEPY_STAT), Some(STATUS), None),
                // Not a process.
                ("self-ish", Some(BASH_STAT), Some(STATUS), Some(b"")),
            ],
        );
        let procs = list_processes(&root).unwrap();
        let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        assert_eq!(pids, vec![2, 60, 4242]);
        assert!(procs[0].kernel_thread);
        assert!(procs[1].cmdline.is_empty() && !procs[1].kernel_thread);
        assert_eq!(procs[2].cmdline, vec!["-bash"]);
        assert_eq!(procs[2].uid, 1001);
        std::fs::remove_dir_all(&root).unwrap();
        assert!(matches!(list_processes(&root), Err(ProcError::Read { .. })));
    }

    #[test]
    fn load_names_the_file_it_could_not_use() {
        let root = fake_proc("load", &[]);
        std::fs::write(root.join("loadavg"), "0.10 0.20 0.30 1/100 5\n").unwrap();
        let e = load(&root).unwrap_err();
        assert!(e.to_string().contains("stat"), "{e}");
        std::fs::write(root.join("stat"), "cpu 1 2 3 4 5\n").unwrap();
        std::fs::write(root.join("meminfo"), "MemFree: 5 kB\n").unwrap();
        let e = load(&root).unwrap_err();
        assert!(e.to_string().contains("meminfo: no MemTotal"), "{e}");
        std::fs::write(root.join("meminfo"), "MemTotal: 8 kB\nMemAvailable: 5 kB\n").unwrap();
        let l = load(&root).unwrap();
        assert_eq!(l.uptime_ms, 100_500);
        assert_eq!(l.load_milli, [100, 200, 300]);
        assert_eq!((l.procs_running, l.procs_total), (1, 100));
        assert_eq!((l.cpu_total_ticks, l.cpu_idle_ticks), (15, 9));
        assert_eq!((l.mem_total_kib, l.mem_available_kib), (8, 5));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_real_proc_lists_this_process() {
        let me = std::process::id();
        let procs = list_processes(Path::new("/proc")).unwrap();
        let p = procs.iter().find(|p| p.pid == me).unwrap();
        let args: Vec<String> = std::env::args().collect();
        assert_eq!(p.cmdline, args);
        assert!(p.threads >= 1 && p.rss_kib > 0 && !p.kernel_thread);
        assert!(procs.windows(2).all(|w| w[0].pid < w[1].pid));
        let l = load(Path::new("/proc")).unwrap();
        assert!(l.mem_total_kib > 0 && l.online_cpus >= 1);
        assert!(l.cpu_total_ticks >= l.cpu_idle_ticks && l.uptime_ms > 0);
    }
}
