//! What the local migration tests (`migrate_local`, `postcopy_local`) share: the counting
//! Python workload, reading its output, and cleaning up after it. Each test uses part of it.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workload: a 64 MiB buffer of seeded random bytes, and every 100 ms a line
/// `n acc crc ms` appended to the file in argv[1]: a counter, a running value over the
/// counter (kept in Python objects), the buffer's CRC-32 and its monotonic clock in ms.
/// Descriptors leaked into the test (e.g. a jobserver pipe) are closed first: the dump refuses
/// pipes beyond fds 0-2.
pub const WORKLOAD: &str = r#"
import os, random, sys, time, zlib
os.closerange(3, 65536)
random.seed(7)
buf = bytearray(random.randbytes(64 << 20))
out = open(sys.argv[1], "a", buffering=1)
n, acc = 0, 1
while True:
    n += 1
    acc = (acc * 31 + n) % 1000000007
    out.write("%d %d %d %d\n" % (n, acc, zlib.crc32(buf), time.monotonic() * 1000))
    time.sleep(0.1)
"#;

/// [`WORKLOAD`] that also changes its memory all the time: every line, it maps 1 MiB more of
/// private anonymous memory (up to 60) and writes the count into it; every third line it
/// unmaps the oldest but one. (Mapping and unmapping alike would let the kernel hand the
/// same addresses out again, in a cycle that can leave the list of mappings as it was.) It keeps one page of another 1 MiB area written (255) until a file `drop` appears
/// next to its output, then drops it (`MADV_DONTNEED`: it would read 0 from then on) and
/// leaves it alone. Once a file `check` appears, each line ends with that page's first byte,
/// before with -1: `n acc crc ms byte`.
pub const CHURNING_WORKLOAD: &str = r#"
import mmap, os, random, sys, time, zlib
os.closerange(3, 65536)
random.seed(7)
buf = bytearray(random.randbytes(64 << 20))
out = open(sys.argv[1], "a", buffering=1)
flag = os.path.join(os.path.dirname(sys.argv[1]), "drop")
check = os.path.join(os.path.dirname(sys.argv[1]), "check")
# Executable too, so that the kernel never merges it with the blocks around it.
area = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                 prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
n, acc, blocks, dropped = 0, 1, [], False
while True:
    n += 1
    acc = (acc * 31 + n) % 1000000007
    if len(blocks) < 60:
        b = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        b[:8] = n.to_bytes(8, "little")
        blocks.append(b)
        if n % 3 == 0 and len(blocks) > 2:
            blocks.pop(1).close()
    if not dropped and os.path.exists(flag):
        area.madvise(mmap.MADV_DONTNEED)
        dropped = True
    elif not dropped:
        area[5 * 4096] = 255
    byte = area[5 * 4096] if os.path.exists(check) else -1
    out.write("%d %d %d %d %d\n" % (n, acc, zlib.crc32(buf), time.monotonic() * 1000, byte))
    time.sleep(0.1)
"#;

pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        .unwrap_or(false)
}

pub fn python3() -> Option<PathBuf> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// One line of the workload's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    pub n: u64,
    pub acc: u64,
    pub crc: u64,
    /// `time.monotonic()` in milliseconds, as the workload read it.
    pub ms: u64,
}

pub fn read_lines(path: &Path) -> Vec<Line> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ').map(|x| x.parse::<u64>().ok());
            Some(Line {
                n: f.next()??,
                acc: f.next()??,
                crc: f.next()??,
                ms: f.next()??,
            })
        })
        .collect()
}

pub fn wait_for_lines(path: &Path, at_least: usize, timeout: Duration) -> Vec<Line> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = read_lines(path);
        if lines.len() >= at_least || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines counted after `last`, once there are `at_least` of them or `timeout` passed.
pub fn lines_after(path: &Path, last: Line, at_least: usize, timeout: Duration) -> Vec<Line> {
    wait_for_lines(path, last.n as usize + at_least, timeout)
        .into_iter()
        .filter(|l| l.n > last.n)
        .collect()
}

/// Waits up to `timeout` for `at_least` lines counted after `last`, and checks that the
/// workload counted on from where it stopped: the counter up by one a line, the running value
/// following it, the buffer's checksum as it was. The lines, for a test's own checks.
pub fn counts_on(path: &Path, last: Line, at_least: usize, timeout: Duration) -> Vec<Line> {
    let after = lines_after(path, last, at_least, timeout);
    assert!(
        after.len() >= at_least,
        "only {} lines in {timeout:?} after the move (last before: {last:?})",
        after.len()
    );
    let mut prev = last;
    for l in &after {
        assert_eq!(l.n, prev.n + 1, "counter jumped after {prev:?}: {l:?}");
        assert_eq!(
            l.acc,
            (prev.acc * 31 + l.n) % 1_000_000_007,
            "running value broken at {l:?}"
        );
        assert_eq!(l.crc, last.crc, "buffer checksum changed at {l:?}");
        prev = *l;
    }
    after
}

/// For [`CHURNING_WORKLOAD`]: makes it read its dropped page (the file `check`) and returns
/// the bytes it read, from three lines or more (within 10 s).
pub fn dropped_page_bytes(out: &Path) -> Vec<String> {
    fs::write(out.with_file_name("check"), b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let bytes = loop {
        let text = fs::read_to_string(out).unwrap();
        let bytes: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|b| *b != "-1")
            .map(String::from)
            .collect();
        if bytes.len() >= 3 || Instant::now() > deadline {
            break bytes;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        bytes.len() >= 3,
        "the workload did not read its page: {bytes:?}"
    );
    bytes
}

/// Kills (and reaps) what the test started, however it ends.
pub struct Cleanup {
    pub source: Option<Child>,
    pub moved: Option<u32>,
    pub dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.source.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.moved.take() {
            kill_and_reap(pid);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn kill_and_reap(pid: u32) {
    let pid = pid as libc::pid_t;
    // SAFETY: kill(2) of a positive pid the test created; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: `status` is a valid, writable int; the pid is this process's child.
    unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
}

/// The workload, started and counting.
pub struct Started {
    /// Kills it (and what it became) and removes `dir` at the end.
    pub cleanup: Cleanup,
    pub pid: u32,
    /// Its working directory.
    pub dir: PathBuf,
    /// Where it writes its lines.
    pub out: PathBuf,
}

/// Starts [`WORKLOAD`] in a fresh directory `ferry-NAME-PID` under the temporary directory
/// and waits for its first five lines; `None`, with the reason printed, without root (the
/// test needs it for `why`) or python3.
pub fn start_workload(name: &str, why: &str) -> Option<Started> {
    start_workload_under(name, why, &[])
}

/// [`start_workload`], with python3 started by `wrapper` (a program and its arguments, e.g.
/// `unshare --fork ...`), whose one child it must be: the pid is that child's.
pub fn start_workload_under(name: &str, why: &str, wrapper: &[&str]) -> Option<Started> {
    start_script(name, why, wrapper, WORKLOAD)
}

/// [`start_workload`] with another `script` (taking the output file as its argument).
pub fn start_script(name: &str, why: &str, wrapper: &[&str], script: &str) -> Option<Started> {
    if !is_root() {
        eprintln!("skipped: needs root ({why})");
        return None;
    }
    let Some(python) = python3() else {
        eprintln!("skipped: no python3 in /usr/bin or /usr/local/bin");
        return None;
    };
    let dir = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let out = dir.join("counter.txt");
    let mut cleanup = Cleanup {
        source: None,
        moved: None,
        dir: dir.clone(),
    };
    let mut cmd = match wrapper {
        [] => Command::new(&python),
        [program, args @ ..] => {
            let mut c = Command::new(program);
            c.args(args).arg(&python);
            c
        }
    };
    let child = cmd
        .arg("-c")
        .arg(script)
        .arg(&out)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting python3 (wrapped in {wrapper:?}): {e}"));
    let wrapper_pid = child.id();
    cleanup.source = Some(child);
    let before = wait_for_lines(&out, 5, Duration::from_secs(30));
    assert!(
        before.len() >= 5,
        "the workload wrote {} lines in 30 s",
        before.len()
    );
    let pid = if wrapper.is_empty() {
        wrapper_pid
    } else {
        let children =
            fs::read_to_string(format!("/proc/{wrapper_pid}/task/{wrapper_pid}/children"))
                .unwrap_or_default();
        match children.split_whitespace().collect::<Vec<_>>()[..] {
            [one] => one.parse().unwrap(),
            ref other => panic!("{wrapper:?} has children {other:?}, not just python3"),
        }
    };
    Some(Started {
        cleanup,
        pid,
        dir,
        out,
    })
}
