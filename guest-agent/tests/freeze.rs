//! The source side of a migration on this machine (run as root): freeze real processes, check
//! their image and pages, thaw them and see them go on, kill them; and the refusals.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_guest_agent::migrate::dump::{self, CantMove, DumpError};
use ferry_guest_agent::migrate::image::{FileKind, MappingKind, PAGE_SIZE, USER_REGS_LEN};

/// A buffer of 64 pages filled with 0xA5, its address printed, then a counter printed every
/// 20 ms (with a sleep in between, so it is often stopped inside a system call).
const PATTERN: &str = r#"
import ctypes, sys, time, signal
signal.signal(signal.SIGUSR1, lambda *a: None)
n = 64 * 4096
buf = bytearray(b"\xa5" * n)
addr = ctypes.addressof((ctypes.c_char * n).from_buffer(buf))
print(f"{addr} {n}", flush=True)
i = 0
while True:
    i += 1
    print(i, flush=True)
    time.sleep(0.02)
"#;

fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

struct Helper {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Helper {
    /// Runs `script` after closing every fd above 2 (the test harness may leak some).
    fn start(script: &str) -> Helper {
        let script = format!("import os\nos.closerange(3, 65536)\n{script}");
        let mut child = Command::new(python())
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Helper { child, out }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim().to_string()
    }

    /// Reads counter lines until one arrives later than `after`.
    fn counter_after(&mut self, after: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "the process stopped counting");
            let n: u64 = self.line().parse().unwrap();
            if n > after {
                return n;
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reg(regs: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(regs[i * 8..i * 8 + 8].try_into().unwrap())
}

#[test]
fn freeze_reads_the_image_and_thaw_lets_it_go_on() {
    let mut h = Helper::start(PATTERN);
    let first = h.line();
    let (addr, len) = first.split_once(' ').unwrap();
    let (addr, len): (u64, u64) = (addr.parse().unwrap(), len.parse().unwrap());
    let before = h.counter_after(2);

    let status = |field: &str| -> String {
        std::fs::read_to_string(format!("/proc/{}/status", h.pid()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    assert_eq!(
        (status("VmLck:"), status("THP_enabled:")),
        ("0 kB".into(), "1".into())
    );
    let frozen = dump::freeze(h.pid()).unwrap();
    // Frozen, its pages stay in their frames: locked (compaction), no huge pages (khugepaged).
    assert_ne!(status("VmLck:"), "0 kB");
    assert_eq!(status("THP_enabled:"), "0");
    let image = frozen.image().clone();
    assert_eq!(image.pid, h.pid());
    assert!(image.comm.starts_with("python3"), "{}", image.comm);
    assert_eq!(image.cmdline[1], "-c");
    assert_eq!(
        image.cwd,
        std::env::current_dir().unwrap().to_str().unwrap()
    );
    assert_eq!(image.creds.uid, [0, 0, 0]);
    assert_eq!(image.regs.len(), USER_REGS_LEN);
    assert!(image.xstate.len() >= 512, "xstate {}", image.xstate.len());
    let rip = reg(&image.regs, 16);
    assert!(
        image
            .mappings
            .iter()
            .any(|m| m.prot & 4 != 0 && (m.start..m.end).contains(&rip)),
        "rip {rip:#x} in no executable mapping"
    );
    assert!(image.mappings.iter().any(|m| m.kind == MappingKind::Stack));
    assert!(image.mappings.iter().any(|m| m.kind == MappingKind::Vdso));
    assert!(image.mm.brk >= image.mm.start_brk);
    assert!(image.mm.start_code < image.mm.end_code);
    assert!(image.mm.auxv.len() >= 4 && image.mm.auxv.len().is_multiple_of(2));
    // Python's SIGINT handler and our SIGUSR1 one are in C's table as Python's handler; SIGPIPE
    // is ignored.
    let usr1 = image.sigactions.iter().find(|s| s.signo == 10).unwrap();
    assert!(usr1.handler > 1, "{usr1:?}");
    let pipe = image.sigactions.iter().find(|s| s.signo == 13).unwrap();
    assert_eq!(pipe.handler, 1, "SIGPIPE is SIG_IGN");
    assert!(image.rlimits.iter().any(|r| r.resource == 7)); // RLIMIT_NOFILE
    let stdout = image.files.iter().find(|f| f.fd == 1).unwrap();
    assert_eq!(stdout.kind, FileKind::Pipe);
    let stdin = image.files.iter().find(|f| f.fd == 0).unwrap();
    assert_eq!(
        (stdin.kind, stdin.path.as_str()),
        (FileKind::CharDevice, "/dev/null")
    );

    // Every page of the pattern buffer is present, anonymous, with a frame.
    let pages = frozen.pages();
    let first_page = addr.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let last_page = (addr + len) / PAGE_SIZE * PAGE_SIZE;
    let mut seen = 0;
    for page in pages {
        if (first_page..last_page).contains(&page.vaddr) {
            assert!(page.anon, "{page:?}");
            assert_ne!(page.pfn, 0, "{page:?}");
            seen += 1;
        }
    }
    assert_eq!(seen, (last_page - first_page) / PAGE_SIZE);
    assert!(pages.windows(2).all(|w| w[0].vaddr < w[1].vaddr));
    // Nothing moved while it stood still (or very little).
    assert!(frozen.recheck().unwrap().len() < pages.len() / 10);

    // While frozen it does not count.
    std::thread::sleep(Duration::from_millis(100));
    let before_thaw = std::fs::read_to_string(format!("/proc/{}/stat", h.pid())).unwrap();
    assert!(before_thaw.contains(") t "), "{before_thaw}");
    frozen.thaw().unwrap();
    // Thawed, as it was.
    assert_eq!(
        (status("VmLck:"), status("THP_enabled:")),
        ("0 kB".into(), "1".into())
    );
    let after = h.counter_after(before + 5);
    assert!(after > before);
    // And it can be frozen again after a thaw, then let go by dropping.
    let again = dump::freeze(h.pid()).unwrap();
    drop(again);
    h.counter_after(after + 3);
}

#[test]
fn kill_ends_a_frozen_process() {
    let mut h = Helper::start(PATTERN);
    h.line();
    h.counter_after(1);
    let frozen = dump::freeze(h.pid()).unwrap();
    frozen.kill().unwrap();
    let status = h.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc_sigkill()));
}

fn libc_sigkill() -> i32 {
    9
}

fn refusal(script: &str) -> CantMove {
    let mut h = Helper::start(script);
    assert_eq!(h.line(), "ready");
    match dump::freeze(h.pid()) {
        Err(DumpError::CantMove { pid, reason }) => {
            assert_eq!(pid, h.pid());
            // Untouched: not traced, still running.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            assert!(status.contains("TracerPid:\t0\n"), "{status}");
            reason
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_process_with_a_socket_cannot_move() {
    let reason = refusal(
        "import socket, time\ns = socket.socket()\nprint('ready', flush=True)\ntime.sleep(60)",
    );
    assert!(matches!(reason, CantMove::Socket { .. }), "{reason}");
    assert!(reason.to_string().contains("socket"), "{reason}");
}

#[test]
fn a_multi_threaded_process_cannot_move() {
    let reason = refusal(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True)\
         .start()\nprint('ready', flush=True)\ntime.sleep(60)",
    );
    assert_eq!(
        reason.to_string(),
        "multi-threaded processes cannot move yet (2 threads)"
    );
}

#[test]
fn a_pipe_on_another_fd_cannot_move() {
    let reason =
        refusal("import os, time\nr, w = os.pipe()\nprint('ready', flush=True)\ntime.sleep(60)");
    assert!(
        matches!(reason, CantMove::Pipe { fd, .. } if fd > 2),
        "{reason}"
    );
}

#[test]
fn init_the_agent_and_missing_processes_are_refused() {
    assert!(matches!(
        dump::freeze(1),
        Err(DumpError::CantMove {
            reason: CantMove::Init,
            ..
        })
    ));
    assert!(matches!(
        dump::freeze(std::process::id()),
        Err(DumpError::CantMove {
            reason: CantMove::Agent { .. } | CantMove::Threads { .. },
            ..
        })
    ));
    assert!(matches!(
        dump::freeze(u32::MAX / 2),
        Err(DumpError::NoProcess(_))
    ));
    // kthreadd.
    assert!(matches!(
        dump::freeze(2),
        Err(DumpError::CantMove {
            reason: CantMove::KernelThread { .. },
            ..
        })
    ));
}

#[test]
fn freeze_recheck_and_release_through_the_agent() {
    use ferry_guest_agent::{Agent, AgentConnection, ClientError};
    let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
    let agent = Agent::new(None).with_power_off(std::sync::Arc::new(|| {}));
    std::thread::spawn(move || agent.serve(guest));
    let mut conn = AgentConnection::handshake(host, Duration::from_secs(10)).unwrap();

    let mut h = Helper::start(PATTERN);
    h.line();
    let before = h.counter_after(1);
    let (image, pages) = conn.freeze(h.pid()).unwrap();
    assert_eq!(image.pid, h.pid());
    assert!(pages.iter().filter(|p| p.anon).count() >= 64);
    assert!(conn.recheck(h.pid()).unwrap().len() < pages.len() / 10);
    // A second freeze of the same process is refused, and it stays frozen.
    assert!(matches!(
        conn.freeze(h.pid()),
        Err(ClientError::RequestFailed { .. })
    ));
    conn.release(h.pid(), false).unwrap();
    h.counter_after(before + 3);
    assert!(matches!(
        conn.release(h.pid(), false),
        Err(ClientError::RequestFailed { .. })
    ));

    // A refusal comes back as CantMove.
    let mut s = Helper::start(
        "import socket, time\ns = socket.socket()\nprint('ready', flush=True)\ntime.sleep(60)",
    );
    assert_eq!(s.line(), "ready");
    match conn.freeze(s.pid()) {
        Err(ClientError::CantMove(reason)) => assert!(reason.contains("socket"), "{reason}"),
        other => panic!("{other:?}"),
    }

    // A process frozen when the connection closes is thawed.
    conn.freeze(h.pid()).unwrap();
    drop(conn);
    let last = h.counter_after(0);
    h.counter_after(last + 3);
}
