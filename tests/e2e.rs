//! End-to-end tests: real stock Debian guests booted by the `ferry` binary, checked the way a
//! user would check them (what a command prints, the exit status, what the guest says).
//!
//! Where this machine's KVM cannot boot a stock kernel (PVM), one nested host is started for the
//! whole suite and stopped at the end, and every `ferry run` goes through it. Each case has a
//! time limit. Run one case with `cargo test --test e2e -- NAME`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "e2e/balance.rs"]
mod balance;
#[path = "e2e/dashboard.rs"]
mod dashboard;
#[path = "e2e/postcopy.rs"]
mod postcopy;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// What a finished `ferry` invocation left.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    fn explain(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code(),
            self.stdout,
            self.stderr
        )
    }
}

type CaseResult = Result<(), String>;

fn check(cond: bool, what: &str, out: &Outcome) -> CaseResult {
    if cond {
        Ok(())
    } else {
        Err(format!("{what}\n{}", out.explain()))
    }
}

/// Reads a child's pipe on a thread, so neither pipe can fill up and block it.
fn collect(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

fn wait_with_limit(mut child: Child, limit: Duration) -> Result<Outcome, String> {
    let out = collect(child.stdout.take().expect("stdout is piped"));
    let err = collect(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + limit;
    let mut next_check = Instant::now() + PLATFORM_POLL;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        // A wedged nested host answers nothing any more: the attempt ends now, not at `limit`.
        if Instant::now() > next_check {
            next_check = Instant::now() + PLATFORM_POLL;
            if let Err(why) = platform_check() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(why);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
            return Err(format!(
                "no result within {} s; stderr so far:\n{stderr}",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Outcome {
        status,
        stdout: out.recv().unwrap_or_default(),
        stderr: err.recv().unwrap_or_default(),
    })
}

/// Runs `ferry ARGS` with `stdin` as its input, within `limit`.
fn ferry(args: &[&str], stdin: &[u8], limit: Duration) -> Result<Outcome, String> {
    platform_check()?;
    let mut child = Command::new(FERRY)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {FERRY}: {e}"))?;
    let mut input = child.stdin.take().expect("stdin is piped");
    let bytes = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    let out =
        wait_with_limit(child, limit).map_err(|e| format!("`ferry {}`: {e}", args.join(" ")))?;
    if args.first() == Some(&"run") {
        note_run_deaths(&out.stderr);
    }
    Ok(out)
}

/// The guests of `ferry run` calls that triple-faulted, as the call's stderr said (`ferry:
/// error: ... the guest triple-faulted (vCPU 0 at ...)`), and when: read by
/// [`guest_deaths_since`], like the deaths a cluster's node daemons log.
static RUN_DEATHS: Mutex<Vec<(std::time::SystemTime, String)>> = Mutex::new(Vec::new());

fn note_run_deaths(stderr: &str) {
    let mut deaths = RUN_DEATHS.lock().unwrap_or_else(|e| e.into_inner());
    for line in stderr.lines() {
        if line.contains(ferry::run::TRIPLE_FAULT) {
            deaths.push((
                std::time::SystemTime::now(),
                format!("`ferry run`: {}", line.trim()),
            ));
        }
    }
}

const BOOT_LIMIT: Duration = Duration::from_secs(300);
const QUICK_LIMIT: Duration = Duration::from_secs(60);

/// A `ferry run` left running in the background (a guest that others talk to), its stderr
/// read line by line. Dropping it stops the run with SIGTERM.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Background {
    fn start(args: &[&str]) -> Result<Self, String> {
        let mut child = Command::new(FERRY)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {FERRY}: {e}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let seen = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stderr);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    note_run_deaths(&line);
                    seen.lock().unwrap().push_str(&line);
                    let _ = tx.send(std::mem::take(&mut line));
                }
            });
        }
        Ok(Self {
            child,
            lines,
            stderr: seen,
        })
    }

    /// Waits for the first stderr line that contains `needle`.
    fn wait_for(&self, needle: &str, limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(_) => {
                    return Err(format!(
                        "no `{needle}` from `ferry run` within {} s; its stderr:\n{}",
                        limit.as_secs(),
                        self.stderr.lock().unwrap()
                    ))
                }
            }
        }
    }

    /// Sends SIGTERM as a user would with kill(1); how the run ended, or None if it did not
    /// end within `limit` (it is then killed).
    fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate(QUICK_LIMIT);
        }
    }
}

struct Suite {
    /// Kernel release of the guest image (what `uname -r` must print).
    release: String,
    /// A world-readable copy of the image's kernel and initramfs, for runs as another user.
    public_kernel: PathBuf,
    public_initrd: PathBuf,
    /// Whether runs go through the nested host.
    nested: bool,
}

fn nproc_reports_every_vcpu(_: &Suite) -> CaseResult {
    let out = ferry(&["run", "--vcpus", "2", "--", "nproc"], b"", BOOT_LIMIT)?;
    check(out.code() == 0, "ferry run -- nproc exits 0", &out)?;
    check(out.stdout.trim() == "2", "nproc prints 2", &out)?;
    check(
        out.stderr.contains("guest agent ready") && out.stderr.contains("2 vCPUs online"),
        "the agent announces itself with its vCPU count",
        &out,
    )
}

fn uname_prints_the_debian_kernel_release(s: &Suite) -> CaseResult {
    let out = ferry(&["run", "--", "uname", "-r"], b"", BOOT_LIMIT)?;
    check(out.code() == 0, "exits 0", &out)?;
    check(
        out.stdout.trim() == s.release,
        &format!("uname -r prints {}", s.release),
        &out,
    )?;
    check(
        out.stderr.contains(&format!("kernel {}", s.release)),
        "the agent's ready line names the kernel",
        &out,
    )
}

fn command_exit_status_and_streams_come_back(_: &Suite) -> CaseResult {
    let out = ferry(
        &[
            "run",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 3",
        ],
        b"",
        BOOT_LIMIT,
    )?;
    check(out.code() == 3, "exit status 3 comes back", &out)?;
    check(
        out.stdout == "to-out\n",
        "stdout is the command's alone",
        &out,
    )?;
    check(
        out.stderr.contains("to-err\n"),
        "stderr reaches stderr",
        &out,
    )
}

fn stdin_reaches_the_command(_: &Suite) -> CaseResult {
    let out = ferry(
        &["run", "--", "sh", "-c", "tr a-z A-Z; echo done"],
        b"hello guest\n",
        BOOT_LIMIT,
    )?;
    check(out.code() == 0, "exits 0", &out)?;
    check(
        out.stdout == "HELLO GUEST\ndone\n",
        "stdin was read by the command",
        &out,
    )
}

fn missing_command_exits_127(_: &Suite) -> CaseResult {
    let out = ferry(&["run", "--", "no-such-program", "x"], b"", BOOT_LIMIT)?;
    check(out.code() == 127, "exit 127, like a shell", &out)?;
    check(
        out.stderr.contains("no-such-program") && out.stderr.contains("not found"),
        "the message names the missing command",
        &out,
    )
}

fn guest_poweroff_and_reboot_end_the_vmm_with_0(_: &Suite) -> CaseResult {
    for what in ["poweroff", "reboot"] {
        let out = ferry(&["run", "--", what], b"", BOOT_LIMIT)?;
        check(
            out.code() == 0,
            &format!("{what} in the guest ends ferry with 0"),
            &out,
        )?;
        check(!out.stderr.contains("error"), "and no error", &out)?;
    }
    Ok(())
}

fn interactive_console_runs_a_shell(_: &Suite) -> CaseResult {
    // The console is interactive: keystrokes go to the guest's shell. Wait for the shell before
    // typing, as a person would.
    let mut child = Command::new(FERRY)
        .args(["run"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut input = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + BOOT_LIMIT;
    let mut typed = false;
    let mut last_type = Instant::now();
    while Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(500)) {
            seen.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&seen);
        if text.contains("MARK-42") {
            break;
        }
        // Type once a prompt shows, and again now and then in case the first keys were early.
        if text.contains("# ") && (!typed || last_type.elapsed() > Duration::from_secs(10)) {
            let _ = input.write_all(b"echo MARK-$((6*7))\n");
            typed = true;
            last_type = Instant::now();
        }
    }
    let _ = input.write_all(b"poweroff\n");
    let stderr = collect(child.stderr.take().expect("piped"));
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline + QUICK_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the guest did not power off after `poweroff`; console:\n{}",
                String::from_utf8_lossy(&seen)
            ));
        }
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.extend_from_slice(&chunk);
        }
    };
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.extend_from_slice(&chunk);
    }
    let out = Outcome {
        status,
        stdout: String::from_utf8_lossy(&seen).into_owned(),
        stderr: stderr.recv().unwrap_or_default(),
    };
    check(
        out.stdout.contains("MARK-42"),
        "the shell evaluated what was typed",
        &out,
    )?;
    check(
        out.code() == 0,
        "poweroff at the shell ends ferry with 0",
        &out,
    )
}

fn sigterm_stops_the_guest_and_leaves_nothing_running(s: &Suite) -> CaseResult {
    let mut guest = Background::start(&["run", "--", "sleep", "600"])?;
    guest.wait_for("guest agent ready", BOOT_LIMIT)?;
    let status = guest
        .terminate(QUICK_LIMIT)
        .ok_or("ferry did not stop within a minute of SIGTERM")?;
    let out = Outcome {
        status,
        stdout: String::new(),
        stderr: guest.stderr.lock().unwrap().clone(),
    };
    check(out.code() == 143, "SIGTERM ends ferry with 128 + 15", &out)?;
    // Nothing of that run is left: no VMM process on this machine or in the nested host.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let here = Command::new("pgrep")
            .args(["-f", "ferry run .*sleep 600"])
            .output()
            .map_err(|e| e.to_string())?;
        // pgrep: 0 when something matches, 1 when nothing does.
        let nested = if s.nested {
            Some(ferry(
                &["host", "exec", "--", "pgrep", "-f", "ferry run .*sleep 600"],
                b"",
                QUICK_LIMIT,
            )?)
        } else {
            None
        };
        let nested_code = nested.as_ref().map_or(1, Outcome::code);
        if !here.status.success() && nested_code == 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "a VMM of the stopped run may still be running: pgrep here: exit {} ({}); \
                 in the nested host: {}",
                here.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&here.stdout).trim(),
                nested.map_or("-".into(), |o| format!(
                    "exit {} ({} {})",
                    o.code(),
                    o.stdout.trim(),
                    o.stderr.trim()
                ))
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn two_guests_on_one_bridge_reach_each_other_and_the_host(_: &Suite) -> CaseResult {
    // Guest A stays up; guest B pings it and the host's address on the bridge.
    let a = Background::start(&["run", "--net", "10.77.0.2/24", "--", "sleep", "120"])?;
    a.wait_for("guest agent ready", BOOT_LIMIT)?;
    let out = ferry(
        &[
            "run",
            "-q",
            "--net",
            "10.77.0.3/24",
            "--",
            "sh",
            "-c",
            "ping -c 3 -W 3 10.77.0.2 && ping -c 2 -W 3 10.77.0.1 && ip -4 addr show eth0",
        ],
        b"",
        BOOT_LIMIT,
    )?;
    // ping exits 0 once a reply came back (the first may be lost to ARP on a fresh bridge).
    check(
        out.code() == 0,
        "guest A and the host answer guest B's pings",
        &out,
    )?;
    check(
        out.stdout.contains("inet 10.77.0.3/24"),
        "the guest has the address it was given",
        &out,
    )
}

fn root_disk_keeps_writes_and_lets_ssh_in(s: &Suite) -> CaseResult {
    // The node's own root disk: what one boot writes, the next boot finds.
    let node = "e2e-root";
    let out = ferry(
        &[
            "run",
            "-q",
            "--root",
            "--node",
            node,
            "--",
            "sh",
            "-c",
            "echo kept-$((6*7)) > /root/mark && sync",
        ],
        b"",
        BOOT_LIMIT,
    )?;
    check(out.code() == 0, "the first boot writes a file", &out)?;
    let out = ferry(
        &[
            "run",
            "-q",
            "--root",
            "--node",
            node,
            "--",
            "cat",
            "/root/mark",
        ],
        b"",
        BOOT_LIMIT,
    )?;
    check(
        out.stdout.trim() == "kept-42",
        "the next boot of the node reads it back",
        &out,
    )?;

    // Two nodes on one bridge, each reached with ferry's ssh key; one pings the other.
    let nodes = [(node, "10.77.0.9"), ("e2e-root-b", "10.77.0.10")];
    let mut guests = Vec::new();
    for (name, addr) in nodes {
        let net = format!("{addr}/24");
        guests.push(Background::start(&[
            "run", "--root", "--node", name, "--net", &net, "--", "sleep", "240",
        ])?);
    }
    for g in &guests {
        g.wait_for("guest agent ready", BOOT_LIMIT)?;
    }
    for (name, addr) in nodes {
        let out = ferry(
            &[
                "ssh",
                addr,
                "--",
                "sh",
                "-c",
                "uname -r; python3 -c 'print(6*7)'; hostname",
            ],
            b"",
            // The first login to a fresh disk waits for sshd to make its host keys, which
            // under the nested host's emulated CPUs took more than a minute once.
            BOOT_LIMIT,
        )?;
        check(
            out.code() == 0,
            &format!("ferry ssh {addr} runs the command"),
            &out,
        )?;
        check(
            out.stdout == format!("{}\n42\n{name}\n", s.release),
            "the Debian kernel, python3, and the node's hostname",
            &out,
        )?;
    }
    let out = ferry(
        &[
            "ssh",
            "10.77.0.9",
            "--",
            "ping",
            "-c",
            "3",
            "-W",
            "3",
            "10.77.0.10",
        ],
        b"",
        QUICK_LIMIT,
    )?;
    check(out.code() == 0, "one node pings the other", &out)
}

fn a_guest_that_never_answers_times_out_with_its_console(_: &Suite) -> CaseResult {
    let out = ferry(
        &["run", "--boot-timeout", "1", "--", "true"],
        b"",
        QUICK_LIMIT,
    )?;
    check(out.code() == 1, "exit 1", &out)?;
    check(
        out.stderr.contains("did not become ready") && out.stderr.contains("last console lines"),
        "the error says so and shows the console",
        &out,
    )
}

fn agent_answers_pings_over_vsock(_: &Suite) -> CaseResult {
    let guest = Background::start(&["run", "--", "sleep", "120"])?;
    // "... on vsock (CID 1234)"
    let line = guest.wait_for("on vsock (CID ", BOOT_LIMIT)?;
    let cid = line
        .split("on vsock (CID ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .ok_or_else(|| format!("no CID in `{line}`"))?
        .to_string();
    let out = ferry(
        &["agent", "ping", "--cid", &cid, "--count", "3"],
        b"",
        QUICK_LIMIT,
    )?;
    check(out.code() == 0, "ferry agent ping succeeds", &out)?;
    check(
        out.stdout
            .contains(&format!("pong from CID {cid}: seq=3 time=")),
        "three pongs come back",
        &out,
    )?;
    check(
        out.stdout.contains("min/avg/max/median"),
        "and a summary",
        &out,
    )
}

fn bad_inputs_exit_2_with_a_reason(s: &Suite) -> CaseResult {
    let kernel = s.public_kernel.to_str().unwrap();
    let initrd = s.public_initrd.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "run",
                "--kernel",
                "/etc/hostname",
                "--initrd",
                initrd,
                "--",
                "true",
            ],
            "neither a Linux bzImage nor an ELF vmlinux",
        ),
        (
            &["run", "--kernel", "/no/such/vmlinuz", "--", "true"],
            "/no/such/vmlinuz: no such file",
        ),
        (
            &[
                "run", "--kernel", kernel, "--initrd", initrd, "--memory", "64M", "--", "true",
            ],
            "below what this kernel and initramfs need",
        ),
        (&["run", "--memory", "lots", "--", "true"], "not a size"),
        (&["run", "--vcpus", "0", "--", "true"], "vCPUs"),
        (&["run", "--net", "10.77.0.1/24", "--", "true"], "gateway"),
    ];
    for (args, message) in cases {
        let out = ferry(args, b"", QUICK_LIMIT)?;
        check(
            out.code() == 2,
            &format!("`ferry {}` exits 2", args.join(" ")),
            &out,
        )?;
        check(
            out.stderr.contains(message),
            &format!("`ferry {}` says `{message}`", args.join(" ")),
            &out,
        )?;
    }
    Ok(())
}

fn no_access_to_dev_kvm_exits_2(s: &Suite) -> CaseResult {
    // As an unprivileged user, /dev/kvm (root-only here) cannot be opened.
    let out = {
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", FERRY])
            .args(["run", "--host", "local", "--kernel"])
            .arg(&s.public_kernel)
            .arg("--initrd")
            .arg(&s.public_initrd)
            .args(["--", "true"])
            .env("HOME", "/tmp")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("setpriv (util-linux): {e}"))?;
        wait_with_limit(child, QUICK_LIMIT)?
    };
    check(out.code() == 2, "exit 2", &out)?;
    check(
        out.stderr.contains("/dev/kvm"),
        "the message says /dev/kvm could not be opened",
        &out,
    )
}

/// A scratch directory for disk images, removed with the suite's other files.
fn scratch(s: &Suite, name: &str) -> PathBuf {
    s.public_kernel
        .parent()
        .expect("the suite's files live in a directory")
        .join(name)
}

/// A disk image of `size` bytes whose byte at offset i is (i * 7 + 13) % 251.
fn pattern_disk(path: &Path, size: usize) -> Result<Vec<u8>, String> {
    let bytes: Vec<u8> = (0..size).map(|i| ((i * 7 + 13) % 251) as u8).collect();
    std::fs::write(path, &bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(bytes)
}

/// The md5 of `bytes`, as `md5sum` prints it (the host's coreutils).
fn md5(bytes: &[u8]) -> Result<String, String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("md5sum: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(bytes)
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn read_only_disk_shows_its_size_and_contents(s: &Suite) -> CaseResult {
    let path = scratch(s, "ro.img");
    let bytes = pattern_disk(&path, 16 << 20)?;
    let want = md5(&bytes[..4096])?;
    let disk = format!("{},ro", path.display());
    let out = ferry(
        &[
            "run",
            "--disk",
            &disk,
            "--",
            "sh",
            "-c",
            "cat /sys/block/vda/size; dd if=/dev/vda bs=4096 count=1 2>/dev/null | md5sum; \
             cat /sys/block/vda/ro; \
             if dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; \
             then echo WRITE-OK; else echo WRITE-REFUSED; fi",
        ],
        b"",
        BOOT_LIMIT,
    )?;
    let _ = std::fs::remove_file(&path);
    check(out.code() == 0, "exits 0", &out)?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    check(
        lines.first() == Some(&"32768"),
        "/sys/block/vda/size is 32768 sectors (16 MiB)",
        &out,
    )?;
    check(
        lines.get(1).is_some_and(|l| l.starts_with(&want)),
        &format!("the first 4 KiB read in the guest have the host file's md5 {want}"),
        &out,
    )?;
    check(
        lines.get(2) == Some(&"1"),
        "the kernel sees a read-only disk",
        &out,
    )?;
    check(
        lines.get(3) == Some(&"WRITE-REFUSED"),
        "a write to the read-only disk fails",
        &out,
    )
}

fn writable_disk_keeps_what_the_guest_wrote(s: &Suite) -> CaseResult {
    let path = scratch(s, "rw.img");
    let bytes = pattern_disk(&path, 8 << 20)?;
    let out = ferry(
        &[
            "run",
            "--disk",
            path.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "printf FERRY-DISK-MARK | dd of=/dev/vda bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null",
        ],
        b"",
        BOOT_LIMIT,
    )?;
    let after = std::fs::read(&path).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&path);
    check(out.code() == 0, "exits 0", &out)?;
    let after = after?;
    let at = 2048 * 512;
    check(
        after.get(at..at + 15) == Some(&b"FERRY-DISK-MARK"[..]),
        "the host file holds what the guest wrote at sector 2048",
        &out,
    )?;
    check(
        after.len() == bytes.len()
            && after[..at] == bytes[..at]
            && after[at + 15..] == bytes[at + 15..],
        "and nothing else changed",
        &out,
    )
}

fn bad_disks_exit_2_before_anything_starts(s: &Suite) -> CaseResult {
    let dir = scratch(s, "");
    let dir = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 2] = [
        (
            &["run", "--disk", "/no/such/disk.img", "--", "true"],
            "--disk /no/such/disk.img",
        ),
        (&["run", "--disk", dir, "--", "true"], "not a regular file"),
    ];
    for (args, message) in cases {
        let out = ferry(args, b"", QUICK_LIMIT)?;
        check(
            out.code() == 2,
            &format!("`ferry {}` exits 2", args.join(" ")),
            &out,
        )?;
        check(
            out.stderr.contains(message) && !out.stderr.contains("VM started"),
            &format!(
                "`ferry {}` says `{message}` and starts nothing",
                args.join(" ")
            ),
            &out,
        )?;
    }
    Ok(())
}

/// The default cluster file, as a user runs `ferry up` from the source tree.
fn local_cluster_file() -> String {
    format!("{}/configs/local.toml", env!("CARGO_MANIFEST_DIR"))
}

/// `GET path` on node `node`'s API of the cluster in `file`, with `token` (or none) and
/// optionally a client certificate: the status and body, or why no answer came.
fn api_get(
    file: &str,
    node: &str,
    path: &str,
    token: Option<String>,
    identity: Option<&ferry_net::pki::Identity>,
) -> Result<(u16, String), String> {
    use ferry::cluster::{client::ApiClient, control::Cluster};
    platform_check()?;
    let cluster = Cluster::load(Path::new(file)).map_err(|e| e.to_string())?;
    let n = cluster.config.node(node).ok_or("no such node")?;
    let roots = ferry_net::pki::load_roots(&cluster.dir.tls_dir(&cluster.config))
        .map_err(|e| e.to_string())?;
    let tls = ferry_net::tls::client_config(roots, identity).map_err(|e| e.to_string())?;
    let client =
        ApiClient::new(cluster.api_addr(n), node, tls, token).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(client.call("GET", path))
        .map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
        .map_err(|e| e.to_string())
}

/// The API token of the cluster in `file`.
fn cluster_token(file: &str) -> Result<String, String> {
    let cluster =
        ferry::cluster::control::Cluster::load(Path::new(file)).map_err(|e| e.to_string())?;
    cluster.dir.read_token().map_err(|e| e.to_string())
}

/// Runs a shell command here (where the VMMs run without a nested host).
fn ferry_free_sh(script: &str) -> Result<Outcome, String> {
    let child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    wait_with_limit(child, QUICK_LIMIT)
}

/// Which of ferry's daemons, TAPs and bridges exist where the cluster's VMMs run.
fn cluster_leftovers(s: &Suite) -> Result<String, String> {
    let script = "pgrep -af '[f]erry.* daemon run'; ip -br link | grep -E '^(fy-|ferrytap)'; true";
    let out = if s.nested {
        ferry(
            &["host", "exec", "--", "sh", "-c", script],
            b"",
            QUICK_LIMIT,
        )?
    } else {
        let o = Command::new("sh")
            .args(["-c", script])
            .output()
            .map_err(|e| e.to_string())?;
        return Ok(String::from_utf8_lossy(&o.stdout).into_owned());
    };
    Ok(out.stdout)
}

fn cluster_up_ssh_api_status_and_down(s: &Suite) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    // From nothing running, whatever an earlier attempt or run left: nodes still up, or a
    // joined node-4 (`down` forgets joined nodes).
    let out = ferry(&["down", file], b"", BOOT_LIMIT)?;
    check(out.code() == 0, "`ferry down` clears what was left", &out)?;
    let out = ferry(&["up", file], b"", BOOT_LIMIT * 2)?;
    check(out.code() == 0, "`ferry up` brings the cluster up", &out)?;
    for node in ["node-1", "node-2", "node-3"] {
        check(
            out.stdout
                .lines()
                .any(|l| l.starts_with(node) && l.contains(" ready ")),
            &format!("the table shows {node} ready"),
            &out,
        )?;
    }
    check(
        out.stderr.contains("ready after"),
        "progress lines while the guests boot",
        &out,
    )?;

    // A second `up` changes nothing.
    let again = ferry(&["up", file], b"", QUICK_LIMIT)?;
    check(
        again.code() == 0 && again.stderr.contains("nothing to do"),
        "`ferry up` on a running cluster changes nothing",
        &again,
    )?;

    // ssh by node name: the Debian kernel, python3, the node's own hostname; guests reach
    // each other.
    for node in ["node-1", "node-2", "node-3"] {
        let out = ferry(
            &[
                "ssh",
                node,
                "--file",
                file,
                "--",
                "sh",
                "-c",
                "uname -r; python3 -c 'print(6*7)'; hostname",
            ],
            b"",
            QUICK_LIMIT,
        )?;
        check(
            out.code() == 0 && out.stdout == format!("{}\n42\n{node}\n", s.release),
            &format!("`ferry ssh {node}` runs a command there"),
            &out,
        )?;
    }
    let out = ferry(
        &[
            "ssh",
            "node-1",
            "--file",
            file,
            "--",
            "ping",
            "-c",
            "2",
            "-W",
            "3",
            "10.77.1.13",
        ],
        b"",
        QUICK_LIMIT,
    )?;
    check(out.code() == 0, "node-1 pings node-3", &out)?;

    // status --json: every node ready, with load figures.
    let out = ferry(&["status", file, "--json"], b"", QUICK_LIMIT)?;
    check(
        out.code() == 0,
        "`ferry status` exits 0 when all are ready",
        &out,
    )?;
    let nodes: serde_json::Value = serde_json::from_str(&out.stdout)
        .map_err(|e| format!("status --json is not JSON: {e}\n{}", out.stdout))?;
    let nodes = nodes.as_array().ok_or("status --json is not a list")?;
    check(nodes.len() == 3, "status lists three nodes", &out)?;
    for n in nodes {
        check(
            n["state"] == "ready"
                && n["api_url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("https://"))
                && n["load"]["mem_total_mib"].as_u64().is_some_and(|m| m > 100),
            "each node is ready, with its API URL and its load",
            &out,
        )?;
    }

    // The API: every node asked over the peers' mutual TLS, with load; a token is required.
    let cluster =
        ferry::cluster::control::Cluster::load(Path::new(file)).map_err(|e| e.to_string())?;
    let token = cluster.dir.read_token().map_err(|e| e.to_string())?;
    let (status, body) = api_get(file, "node-1", "/v1/nodes", Some(token.clone()), None)?;
    let listed: Vec<ferry::cluster::api::NodeStatus> =
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if status != 200
        || listed.len() != 3
        || !listed.iter().all(|n| {
            n.state == ferry::cluster::api::NodeState::Ready
                && n.load
                    .as_ref()
                    .is_some_and(|l| l.mem_total_mib > 100 && l.online_cpus == 2)
        })
    {
        return Err(format!("GET /v1/nodes on node-1: {status}\n{body}"));
    }
    let (status, body) = api_get(
        file,
        "node-1",
        "/v1/nodes/node-2/processes",
        Some(token.clone()),
        None,
    )?;
    if status != 200 || !body.contains("ferry-agent") || !body.contains("sshd") {
        return Err(format!(
            "node-2's processes through node-1: {status}\n{body}"
        ));
    }
    let (status, body) = api_get(file, "node-2", "/v1/nodes", None, None)?;
    if status != 401 || !body.contains("no bearer token") {
        return Err(format!("no token must give 401: {status}\n{body}"));
    }
    let (status, body) = api_get(file, "node-2", "/v1/nodes", Some("0".repeat(64)), None)?;
    if status != 401 || !body.contains("wrong bearer token") {
        return Err(format!("a wrong token must give 401: {status}\n{body}"));
    }
    let (status, body) = api_get(
        file,
        "node-2",
        "/v1/processes?all=maybe",
        Some(token.clone()),
        None,
    )?;
    if status != 400 || !body.contains("all=true or all=false") {
        return Err(format!("a bad query must give 400: {status}\n{body}"));
    }
    let (status, body) = api_get(file, "node-3", "/v1/openapi.json", None, None)?;
    if status != 200 || !body.contains("\"/v1/nodes/{name}/processes\"") {
        return Err(format!("the OpenAPI document: {status}\n{body}"));
    }
    // A client certificate from another CA is refused in the handshake, token or not.
    let foreign_dir = scratch(s, "foreign-ca");
    let foreign = ferry_net::pki::ClusterCa::load_or_create(&foreign_dir, "intruders")
        .and_then(|ca| ca.issue(&foreign_dir, "node-1", &[], &[]))
        .map_err(|e| e.to_string())?;
    match api_get(file, "node-2", "/v1/nodes", Some(token), Some(&foreign)) {
        Err(_) => {}
        Ok((status, body)) => {
            return Err(format!(
                "a client certificate from a foreign CA must be refused, got {status}\n{body}"
            ))
        }
    }

    // A node whose VMM dies shows as down, to `status` and to the other nodes; `up` brings
    // it back and leaves the others as they are.
    let out = kill_daemon(s, "node-3")?;
    check(out.code() == 0, "node-3's daemon is killed", &out)?;
    let out = ferry(&["status", file], b"", QUICK_LIMIT)?;
    check(
        out.code() == 3
            && out
                .stdout
                .lines()
                .any(|l| l.starts_with("node-3") && l.contains(" down ")),
        "`ferry status` shows node-3 down",
        &out,
    )?;
    let (_, body) = api_get(
        file,
        "node-1",
        "/v1/nodes/node-3",
        Some(cluster_token(file)?),
        None,
    )?;
    if !body.contains("\"state\": \"down\"") {
        return Err(format!("node-1 must see node-3 down:\n{body}"));
    }
    let out = ferry(&["up", file], b"", BOOT_LIMIT)?;
    check(
        out.code() == 0
            && out.stderr.contains("node-3 ready after")
            && !out.stderr.contains("node-1 ready after"),
        "`ferry up` restarts node-3 alone",
        &out,
    )?;

    // down: no daemon, TAP or bridge left; status says down; disks stay.
    let out = ferry(&["down", file], b"", BOOT_LIMIT)?;
    check(out.code() == 0, "`ferry down` stops the cluster", &out)?;
    let left = cluster_leftovers(s)?;
    if !left.trim().is_empty() {
        return Err(format!("left after `ferry down`:\n{left}"));
    }
    let out = ferry(&["status", file], b"", QUICK_LIMIT)?;
    check(
        out.code() == 3 && out.stdout.matches(" down ").count() == 3,
        "`ferry status` shows every node down",
        &out,
    )?;
    check(
        cluster.dir.disk("node-1").is_file(),
        "the node's disk stays after `ferry down`",
        &out,
    )
}

/// The migration workload: fills 256 MiB with a pattern (its checksum kept from the start),
/// then counts, appending the count to /root/progress twice a second. SIGUSR1 makes it write
/// `CRC_NOW CRC_AT_START COUNT` to /root/sum.
const WORKLOAD: &str = r#"import signal, time, zlib
N = 256 << 20
buf = bytearray(N)
page = bytes(range(256)) * 16
for i in range(0, N, 4096):
    buf[i:i + 4096] = page
    buf[i] = (i >> 12) & 0xff
start = zlib.crc32(buf)
count = 0
def report(sig, frame):
    with open('/root/sum', 'w') as s:
        s.write('%d %d %d\n' % (zlib.crc32(buf), start, count))
signal.signal(signal.SIGUSR1, report)
progress = open('/root/progress', 'a', buffering=1)
while True:
    count += 1
    progress.write('%d\n' % count)
    time.sleep(0.5)
"#;

/// Starts the workload on `node`, detached from ssh; its pid.
fn start_workload(file: &str, node: &str) -> Result<u32, String> {
    start_python(file, node, "w", WORKLOAD)
}

/// Copies `script` to `node` as /root/NAME.py and starts it detached from ssh, with a fresh
/// /root/progress; its pid.
fn start_python(file: &str, node: &str, name: &str, script: &str) -> Result<u32, String> {
    let copy = format!("cat > /root/{name}.py");
    let out = ferry(
        &["ssh", node, "--file", file, "--", "sh", "-c", &copy],
        script.as_bytes(),
        QUICK_LIMIT,
    )?;
    check(out.code() == 0, "the workload is copied to the node", &out)?;
    let start = format!(
        "rm -f /root/progress /root/sum; touch /root/progress; setsid python3 /root/{name}.py </dev/null >/root/{name}.out 2>&1 & echo $!"
    );
    let out = ferry(
        &["ssh", node, "--file", file, "--", "sh", "-c", &start],
        b"",
        QUICK_LIMIT,
    )?;
    out.stdout
        .trim()
        .parse()
        .map_err(|_| format!("no pid from starting the workload\n{}", out.explain()))
}

/// `ferry up` of the cluster in `file`, then `nodes` rid of what an earlier attempt may have
/// left running (the workloads, the socket holder).
fn up_with_clean_nodes(file: &str, nodes: &[&str]) -> CaseResult {
    // A node-4 that an attempt of the join case left joined would boot with the others and
    // load the nested host for nothing: `down` forgets joined nodes.
    let joined = ferry::cluster::control::Cluster::load(Path::new(file))
        .is_ok_and(|c| c.config.node("node-4").is_some());
    if joined {
        let out = ferry(&["down", file], b"", BOOT_LIMIT)?;
        check(
            out.code() == 0,
            "`ferry down` forgets a joined node-4",
            &out,
        )?;
    }
    let mut out = ferry(&["up", file], b"", BOOT_LIMIT * 2)?;
    if out.code() != 0 {
        // A node an earlier case left hung (its agent no longer answers: a guest out of
        // memory, a wedged nested host) stays so: the cluster starts over, its disks kept.
        println!(
            "e2e: `ferry up` exited {}; the cluster starts over\n{}",
            out.code(),
            out.stdout.trim_end()
        );
        ferry(&["down", file], b"", BOOT_LIMIT)?;
        out = ferry(&["up", file], b"", BOOT_LIMIT * 2)?;
    }
    check(out.code() == 0, "`ferry up` brings the cluster up", &out)?;
    for node in nodes {
        ferry(
            &[
                "ssh",
                node,
                "--file",
                file,
                "--",
                "sh",
                "-c",
                "pkill -f '[w][.]py|[b][.]py|[s]ocket.socket'; rm -f /root/progress; touch /root/progress",
            ],
            b"",
            QUICK_LIMIT,
        )?;
    }
    Ok(())
}

/// Ends the processes whose command line matches `pattern` (pkill -f; write it so that it
/// does not match itself, e.g. `[c][.]py`) on each of `nodes`.
fn kill_on_nodes(file: &str, nodes: &[&str], pattern: &str) -> CaseResult {
    for node in nodes {
        let script = format!("pkill -f '{pattern}'; true");
        let out = ferry(
            &["ssh", node, "--file", file, "--", "sh", "-c", &script],
            b"",
            QUICK_LIMIT,
        )?;
        check(out.code() == 0, &format!("on {node}: {script}"), &out)?;
    }
    Ok(())
}

/// The last count `node`'s /root/progress holds.
fn last_count(file: &str, node: &str) -> Result<u64, String> {
    let out = ferry(
        &[
            "ssh",
            node,
            "--file",
            file,
            "--",
            "tail",
            "-n",
            "1",
            "/root/progress",
        ],
        b"",
        QUICK_LIMIT,
    )?;
    out.stdout
        .trim()
        .parse()
        .map_err(|_| format!("no count in {node}'s /root/progress\n{}", out.explain()))
}

/// Asks the workload `pid` on `node` for its checksums: (now, at start, count).
fn workload_sums(file: &str, node: &str, pid: u32) -> Result<(u64, u64, u64), String> {
    let script = format!(
        "rm -f /root/sum; kill -USR1 {pid} && for i in $(seq 1 600); do [ -s /root/sum ] && break; sleep 0.1; done; cat /root/sum"
    );
    let out = ferry(
        &["ssh", node, "--file", file, "--", "sh", "-c", &script],
        b"",
        BOOT_LIMIT,
    )?;
    let v: Vec<u64> = out
        .stdout
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match v.as_slice() {
        [now, start, count] => Ok((*now, *start, *count)),
        _ => Err(format!(
            "the workload on {node} gave no checksums\n{}",
            out.explain()
        )),
    }
}

/// Whether process `pid` runs on `node` with `word` in its command line.
fn runs_with(file: &str, node: &str, pid: u32, word: &str) -> Result<bool, String> {
    let out = ferry(
        &[
            "ssh",
            node,
            "--file",
            file,
            "--",
            "cat",
            &format!("/proc/{pid}/cmdline"),
        ],
        b"",
        QUICK_LIMIT,
    )?;
    Ok(out.code() == 0 && out.stdout.contains(word))
}

/// `ferry ARGS` started in the background, its output piped.
fn start_ferry(args: &[&str]) -> Result<Child, String> {
    Command::new(FERRY)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {FERRY}: {e}"))
}

/// Polls `node`'s migration jobs until one matches `under_way` (the `ferry migrate` in `mover`
/// running meanwhile); that job.
fn job_under_way(
    file: &str,
    node: &str,
    mover: &mut Child,
    under_way: impl Fn(&ferry::cluster::api::MigrationJob) -> bool,
) -> Result<ferry::cluster::api::MigrationJob, String> {
    let token = cluster_token(file)?;
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        let (_, body) = api_get(file, node, "/v1/migrations", Some(token.clone()), None)?;
        let jobs: Vec<ferry::cluster::api::MigrationJob> =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if let Some(j) = jobs.into_iter().find(|j| under_way(j)) {
            return Ok(j);
        }
        if Instant::now() > deadline || matches!(mover.try_wait(), Ok(Some(_))) {
            let _ = mover.kill();
            return Err(format!("the move never got under way: {body}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills node `node`'s daemon with SIGKILL, where the cluster's VMMs run: its VMM and guest die
/// with it.
fn kill_daemon(s: &Suite, node: &str) -> Result<Outcome, String> {
    let kill = format!("pkill -KILL -f '[f]erry.* daemon run .*--node {node} '");
    if s.nested {
        ferry(&["host", "exec", "--", "sh", "-c", &kill], b"", QUICK_LIMIT)
    } else {
        ferry_free_sh(&kill)
    }
}

fn a_process_moves_between_nodes_and_keeps_its_state(s: &Suite) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    up_with_clean_nodes(file, &["node-1", "node-2", "node-3"])?;
    let pid = start_workload(file, "node-1")?;
    // Filled and counting.
    let deadline = Instant::now() + BOOT_LIMIT;
    while last_count(file, "node-1").unwrap_or(0) < 3 {
        if Instant::now() > deadline {
            return Err("the workload never started counting on node-1".into());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let (_, start_sum, _) = workload_sums(file, "node-1", pid)?;

    let mut here = "node-1";
    let mut pid_here = pid;
    for there in ["node-2", "node-1"] {
        let before = last_count(file, here)?;
        let out = ferry(
            &[
                "migrate",
                &format!("{here}:{pid_here}"),
                there,
                "--file",
                file,
            ],
            b"",
            BOOT_LIMIT,
        )?;
        check(
            out.code() == 0,
            &format!("`ferry migrate` moves it {here} -> {there}"),
            &out,
        )?;
        check(
            out.stdout.contains("moved process") && out.stdout.contains("frozen"),
            "the summary says what moved and how long it was frozen",
            &out,
        )?;
        let new_pid: u32 = out
            .stdout
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("no new pid in the summary\n{}", out.explain()))?;
        // It counts on at the destination, from where it was: no restart.
        counts_on(
            file,
            there,
            before,
            &format!("after moving {here} -> {there}"),
        )?;
        let (now_sum, start_again, count) = workload_sums(file, there, new_pid)?;
        if now_sum != start_sum || start_again != start_sum || count < before {
            return Err(format!(
                "after moving {here} -> {there}: checksum {now_sum} (at start {start_sum}, it remembers {start_again}), count {count} (was {before})"
            ));
        }
        if runs_with(file, here, pid_here, "w.py")? {
            return Err(format!(
                "the workload still runs on {here} as pid {pid_here}"
            ));
        }
        here = there;
        pid_here = new_pid;
    }

    // Killing the destination's VMM in the middle of a move leaves the process running at the
    // source.
    let before = last_count(file, here)?;
    let process = format!("{here}:{pid_here}");
    let mut mover = start_ferry(&[
        "migrate", &process, "node-3", "--mode", "stop", "--file", file,
    ])?;
    job_under_way(file, here, &mut mover, |j| {
        j.to == "node-3" && j.state == ferry::cluster::api::JobState::Running && j.pages_sent > 0
    })?;
    let out = kill_daemon(s, "node-3")?;
    check(out.code() == 0, "node-3's daemon is killed mid-move", &out)?;
    let out = wait_with_limit(mover, BOOT_LIMIT)?;
    check(
        out.code() == 1 && out.stderr.contains("did not move"),
        "the move fails and says so",
        &out,
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let after = last_count(file, here)?;
    if after <= before || !runs_with(file, here, pid_here, "w.py")? {
        return Err(format!(
            "the workload must run on at {here} after the failed move (count {before} -> {after})"
        ));
    }
    let out = ferry(&["up", file], b"", BOOT_LIMIT)?;
    check(out.code() == 0, "`ferry up` brings node-3 back", &out)?;

    // What cannot move says why before anything happens, and runs on.
    let out = ferry(
        &["ssh", "node-1", "--file", file, "--", "sh", "-c",
          "setsid python3 -c 'import socket, time; s = socket.socket(); time.sleep(900)' </dev/null >/dev/null 2>&1 & echo $!"],
        b"",
        QUICK_LIMIT,
    )?;
    let sock_pid: u32 = out.stdout.trim().parse().map_err(|_| out.explain())?;
    std::thread::sleep(Duration::from_secs(2));
    let out = ferry(
        &[
            "migrate",
            &format!("node-1:{sock_pid}"),
            "node-2",
            "--file",
            file,
        ],
        b"",
        QUICK_LIMIT,
    )?;
    check(
        out.code() != 0 && out.stderr.contains("cannot move") && out.stderr.contains("socket"),
        "a process with a socket is refused with the reason",
        &out,
    )?;
    if !runs_with(file, "node-1", sock_pid, "python3")? {
        return Err("the refused process no longer runs on node-1".into());
    }
    let _ = ferry(
        &[
            "ssh",
            "node-1",
            "--file",
            file,
            "--",
            "kill",
            &sock_pid.to_string(),
            &pid_here.to_string(),
        ],
        b"",
        QUICK_LIMIT,
    );
    Ok(())
}

/// The live-migration workload: 256 MiB of pages, each filled with one byte value that a
/// small table also keeps, and a loop that keeps rewriting the first tenth of them (page and
/// table entry together) as fast as Python goes, counting to /root/progress twice a second.
/// SIGUSR1 (handled between two rewrites) writes `PAGES_THAT_DISAGREE PAGES COUNT` to
/// /root/sum: a page that a migration missed a write of disagrees with the table.
const BUSY_WORKLOAD: &str = r#"import signal, time
N = 256 << 20
P = N >> 12
pages = [bytes([v]) * 4096 for v in range(256)]
buf = bytearray(N)
vals = [0] * P
for i in range(P):
    v = (i * 7) % 255 + 1
    vals[i] = v
    buf[i << 12:(i + 1) << 12] = pages[v]
want = False
def ask(sig, frame):
    global want
    want = True
signal.signal(signal.SIGUSR1, ask)
progress = open('/root/progress', 'a', buffering=1)
hot = P // 10
count, i, last = 0, 0, time.time()
while True:
    p = (i * 2654435761) % hot
    v = vals[p] % 255 + 1
    buf[p << 12:(p + 1) << 12] = pages[v]
    vals[p] = v
    i += 1
    if want:
        want = False
        bad = sum(1 for q in range(P) if buf[q << 12:(q + 1) << 12] != pages[vals[q]])
        with open('/root/sum', 'w') as s:
            s.write('%d %d %d\n' % (bad, P, count))
    if i % 512 == 0 and time.time() - last >= 0.5:
        count += 1
        progress.write('%d\n' % count)
        last = time.time()
"#;

/// [`BUSY_WORKLOAD`] with `mib` MiB of memory instead of 256.
fn busy_workload(mib: u64) -> String {
    let from = "N = 256 << 20";
    assert!(
        BUSY_WORKLOAD.contains(from),
        "BUSY_WORKLOAD sets N on one line"
    );
    BUSY_WORKLOAD.replacen(from, &format!("N = {mib} << 20"), 1)
}

/// `ferry migrate ... ` of `pid` from `here` to `there` with `extra` options; the summary.
fn migrate_cmd(
    file: &str,
    here: &str,
    pid: u32,
    there: &str,
    extra: &[&str],
) -> Result<Outcome, String> {
    let process = format!("{here}:{pid}");
    let mut args = vec!["migrate", process.as_str(), there, "--file", file];
    args.extend_from_slice(extra);
    ferry(&args, b"", BOOT_LIMIT)
}

/// A number that follows `before` in `text` (e.g. "frozen " in a summary).
fn number_after(text: &str, before: &str) -> Option<u64> {
    text.split(before)
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Checks that the workload on `node` counts past `before` a few seconds on (it runs there, and
/// did not start over).
fn counts_on(file: &str, node: &str, before: u64, what: &str) -> CaseResult {
    std::thread::sleep(Duration::from_secs(3));
    let after = last_count(file, node)?;
    if after <= before {
        return Err(format!(
            "{what}: the count on {node} is {after}, it was {before}: it does not run on"
        ));
    }
    Ok(())
}

/// Checks the busy workload `pid` on `node`: it counts on past `before` and its pages agree
/// with its table.
fn busy_intact(file: &str, node: &str, pid: u32, before: u64, what: &str) -> CaseResult {
    busy_intact_of(256, file, node, pid, before, what)
}

/// [`busy_intact`] for a [`busy_workload`] of `mib` MiB.
fn busy_intact_of(
    mib: u64,
    file: &str,
    node: &str,
    pid: u32,
    before: u64,
    what: &str,
) -> CaseResult {
    counts_on(file, node, before, what)?;
    let (bad, pages, count) = workload_sums(file, node, pid)?;
    if bad != 0 || pages != mib << 8 || count < before {
        return Err(format!(
            "{what}: {bad} of {pages} pages disagree with the workload's table (count {count}, was {before})"
        ));
    }
    Ok(())
}

fn a_busy_process_moves_live_with_a_short_pause_and_cancels(_: &Suite) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    up_with_clean_nodes(file, &["node-1", "node-2"])?;
    let pid = start_python(file, "node-1", "b", BUSY_WORKLOAD)?;
    let deadline = Instant::now() + BOOT_LIMIT;
    while last_count(file, "node-1").unwrap_or(0) < 3 {
        if Instant::now() > deadline {
            return Err("the busy workload never started counting on node-1".into());
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    // Pre-copy (the default) to node-2, then stop-and-copy back: the same process, the same
    // memory, the two pauses compared.
    let before = last_count(file, "node-1")?;
    let out = migrate_cmd(file, "node-1", pid, "node-2", &[])?;
    check(out.code() == 0, "a pre-copy move of the busy process", &out)?;
    let rounds = number_after(&out.stdout, "after ").unwrap_or(0);
    let held = number_after(&out.stdout, "pre-copy rounds (").unwrap_or(0);
    let precopy_frozen = number_after(&out.stdout, "frozen ");
    check(
        rounds >= 2 && held > 0 && precopy_frozen.is_some(),
        "the summary reports its pre-copy rounds, the pages held from them and the pause",
        &out,
    )?;
    let pid2 = number_after(&out.stdout, "(pid ").ok_or_else(|| out.explain())? as u32;
    busy_intact(file, "node-2", pid2, before, "after the pre-copy move")?;

    let before = last_count(file, "node-2")?;
    let out = migrate_cmd(file, "node-2", pid2, "node-1", &["--mode", "stop"])?;
    check(out.code() == 0, "a stop-and-copy move back", &out)?;
    let stop_frozen = number_after(&out.stdout, "frozen ").ok_or_else(|| out.explain())?;
    let pid3 = number_after(&out.stdout, "(pid ").ok_or_else(|| out.explain())? as u32;
    busy_intact(file, "node-1", pid3, before, "after the stop-and-copy move")?;
    let precopy_frozen = precopy_frozen.unwrap_or(u64::MAX);
    if precopy_frozen >= stop_frozen {
        return Err(format!(
            "pre-copy froze the process {precopy_frozen} ms, stop-and-copy {stop_frozen} ms: pre-copy must pause it less"
        ));
    }

    // A move capped at 1 MiB/s is cancelled during pre-copy: the process runs on at node-1.
    let before = last_count(file, "node-1")?;
    let process = format!("node-1:{pid3}");
    let mut mover = start_ferry(&[
        "migrate",
        &process,
        "node-2",
        "--bandwidth",
        "1",
        "--file",
        file,
    ])?;
    let job = job_under_way(file, "node-1", &mut mover, |j| {
        j.pid == pid3 && j.state == ferry::cluster::api::JobState::Precopy && j.pages_sent > 0
    })?;
    if job.round != 1 || job.bytes_sent == 0 || job.bytes_remaining == 0 || job.bytes_total == 0 {
        return Err(format!("the live job statistics are off: {job:?}"));
    }
    let id = job.id;
    let out = ferry(
        &[
            "migrate",
            "--cancel",
            &format!("node-1:{id}"),
            "--file",
            file,
        ],
        b"",
        QUICK_LIMIT,
    )?;
    check(
        out.code() == 0 && out.stdout.contains("cancelled"),
        "`ferry migrate --cancel` cancels the job",
        &out,
    )?;
    let out = wait_with_limit(mover, QUICK_LIMIT)?;
    check(
        out.code() == 1 && out.stderr.contains("cancelled"),
        "the cancelled `ferry migrate` says so",
        &out,
    )?;
    busy_intact(file, "node-1", pid3, before, "after the cancel")?;
    if runs_with(file, "node-2", pid3, "b.py")? {
        return Err("a copy of the cancelled process runs on node-2".into());
    }
    let _ = ferry(
        &[
            "ssh",
            "node-1",
            "--file",
            file,
            "--",
            "kill",
            &pid3.to_string(),
        ],
        b"",
        QUICK_LIMIT,
    );
    Ok(())
}

fn bad_cluster_files_exit_2_with_their_place_and_start_nothing(s: &Suite) -> CaseResult {
    let cases: [(&str, &str, &str); 4] = [
        (
            "unknown key",
            "[cluster]\nname = \"bad1\"\nsubnet = \"10.79.0.0/24\"\n[[node]]\nname = \"a\"\nmemroy = \"1G\"\n",
            ":6:1: unknown key `memroy`",
        ),
        (
            "bad size",
            "[cluster]\nname = \"bad2\"\nsubnet = \"10.79.0.0/24\"\n[[node]]\nname = \"a\"\nmemory = \"12Q\"\n",
            ":6:10:",
        ),
        (
            "duplicate node name",
            "[cluster]\nname = \"bad3\"\nsubnet = \"10.79.0.0/24\"\n[[node]]\nname = \"a\"\n[[node]]\nname = \"a\"\n",
            ":7:8: node name \"a\" is already taken",
        ),
        (
            "address outside the subnet",
            "[cluster]\nname = \"bad4\"\nsubnet = \"10.79.0.0/24\"\n[[node]]\nname = \"a\"\naddress = \"10.80.0.5\"\n",
            ":6:11:",
        ),
    ];
    for (what, text, place) in cases {
        let path = scratch(s, "bad-cluster.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let path = path.to_string_lossy().into_owned();
        let out = ferry(&["up", &path], b"", QUICK_LIMIT)?;
        check(out.code() == 2, &format!("{what}: exit 2"), &out)?;
        check(
            out.stderr.contains(&format!("{path}{place}")),
            &format!("{what}: the message names the file, line and column ({place})"),
            &out,
        )?;
        let name = text.split('"').nth(1).unwrap_or("?");
        let dir = ferry::debian::cache_dir().join("clusters").join(name);
        check(
            !dir.exists(),
            &format!("{what}: nothing was made ({} is absent)", dir.display()),
            &out,
        )?;
    }
    Ok(())
}

#[path = "e2e/join.rs"]
mod join;
#[path = "e2e/tools.rs"]
mod tools;

type Case = (&'static str, fn(&Suite) -> CaseResult);

const CASES: &[Case] = &[
    (
        "bad_cluster_files_exit_2_with_their_place_and_start_nothing",
        bad_cluster_files_exit_2_with_their_place_and_start_nothing,
    ),
    (
        "bad_inputs_exit_2_with_a_reason",
        bad_inputs_exit_2_with_a_reason,
    ),
    ("no_access_to_dev_kvm_exits_2", no_access_to_dev_kvm_exits_2),
    ("nproc_reports_every_vcpu", nproc_reports_every_vcpu),
    (
        "uname_prints_the_debian_kernel_release",
        uname_prints_the_debian_kernel_release,
    ),
    (
        "command_exit_status_and_streams_come_back",
        command_exit_status_and_streams_come_back,
    ),
    ("stdin_reaches_the_command", stdin_reaches_the_command),
    ("missing_command_exits_127", missing_command_exits_127),
    (
        "guest_poweroff_and_reboot_end_the_vmm_with_0",
        guest_poweroff_and_reboot_end_the_vmm_with_0,
    ),
    (
        "interactive_console_runs_a_shell",
        interactive_console_runs_a_shell,
    ),
    (
        "sigterm_stops_the_guest_and_leaves_nothing_running",
        sigterm_stops_the_guest_and_leaves_nothing_running,
    ),
    (
        "two_guests_on_one_bridge_reach_each_other_and_the_host",
        two_guests_on_one_bridge_reach_each_other_and_the_host,
    ),
    (
        "root_disk_keeps_writes_and_lets_ssh_in",
        root_disk_keeps_writes_and_lets_ssh_in,
    ),
    (
        "agent_answers_pings_over_vsock",
        agent_answers_pings_over_vsock,
    ),
    (
        "a_guest_that_never_answers_times_out_with_its_console",
        a_guest_that_never_answers_times_out_with_its_console,
    ),
    (
        "bad_disks_exit_2_before_anything_starts",
        bad_disks_exit_2_before_anything_starts,
    ),
    (
        "read_only_disk_shows_its_size_and_contents",
        read_only_disk_shows_its_size_and_contents,
    ),
    (
        "writable_disk_keeps_what_the_guest_wrote",
        writable_disk_keeps_what_the_guest_wrote,
    ),
    (
        "cluster_up_ssh_api_status_and_down",
        cluster_up_ssh_api_status_and_down,
    ),
    (
        "a_process_moves_between_nodes_and_keeps_its_state",
        a_process_moves_between_nodes_and_keeps_its_state,
    ),
    (
        "a_busy_process_moves_live_with_a_short_pause_and_cancels",
        a_busy_process_moves_live_with_a_short_pause_and_cancels,
    ),
    (
        "cpu_bound_processes_spread_with_the_balancer_on_and_stay_with_it_off",
        balance::cpu_bound_processes_spread_with_the_balancer_on_and_stay_with_it_off,
    ),
    (
        "a_node_short_of_memory_ushers_a_process_away",
        balance::a_node_short_of_memory_ushers_a_process_away,
    ),
    (
        "dashboard_lists_nodes_and_migrates_a_dragged_process",
        dashboard::dashboard_lists_nodes_and_migrates_a_dragged_process,
    ),
    (
        "user_tools_run_lock_block_and_bring_home",
        tools::user_tools_run_lock_block_and_bring_home,
    ),
    (
        "a_busy_process_moves_by_post_copy_and_runs_before_its_pages_arrive",
        postcopy::a_busy_process_moves_by_post_copy_and_runs_before_its_pages_arrive,
    ),
    (
        "a_fourth_node_joins_from_one_members_address",
        join::a_fourth_node_joins_from_one_members_address,
    ),
    (
        "a_joined_node_takes_a_moved_process_and_a_balanced_job",
        join::a_joined_node_takes_a_moved_process_and_a_balanced_job,
    ),
];

/// Where the nested host's console (its kernel's messages) stood when a case began, to show
/// what the kernel said during a failed one: soft lockups, RCU stalls, KVM errors.
#[derive(Clone)]
struct HostConsole(Option<ferry::nested::ConsoleMark>);

/// The nested host's console as it stood when the attempt under way began; set and cleared by
/// `main`, read by [`platform_check`].
static ATTEMPT: Mutex<Option<HostConsole>> = Mutex::new(None);

/// How often a `ferry` call under way asks [`platform_check`].
const PLATFORM_POLL: Duration = Duration::from_secs(2);

/// Err once the nested host's kernel said, during the attempt under way, that it is wedged or
/// dying ([`HostConsole::wedged`]: a CPU stalled, a lockup, a panic). Under QEMU's emulated SVM
/// a host CPU that stalls while it runs guests most often does not come back, or comes back
/// only to panic (the README's notes on the nested host say more), so the attempt cannot pass
/// any more: `ferry` calls under way and the loops that poll the API end it at once instead of
/// at their limits, and the attempt is tried again in a new host.
fn platform_check() -> CaseResult {
    let attempt = ATTEMPT.lock().unwrap_or_else(|e| e.into_inner());
    match attempt.as_ref().and_then(HostConsole::wedged) {
        Some(line) => Err(format!(
            "the nested host's kernel is wedged or dying: `{line}`"
        )),
        None => Ok(()),
    }
}

impl HostConsole {
    fn mark(suite: &Suite) -> Self {
        Self(suite.nested.then(ferry::nested::ConsoleMark::now))
    }

    /// The last lines the console gained since the mark, as a block to append to a failure.
    fn news(&self) -> String {
        let Some(news) = self.since_mark() else {
            return String::new();
        };
        let lines: Vec<&str> = news.lines().collect();
        if lines.is_empty() {
            return "\nnested host console: nothing new".into();
        }
        // A kernel report (a panic, a BUG, a soft lockup, a stall) from its first line on;
        // otherwise the last lines.
        let report = [
            "Kernel panic",
            "BUG:",
            "Oops",
            "watchdog:",
            "rcu:",
            "general protection",
        ];
        let shown = match lines
            .iter()
            .position(|l| report.iter().any(|r| l.contains(r)))
        {
            Some(first) => &lines[first.saturating_sub(3)..(first + 45).min(lines.len())],
            None => &lines[lines.len().saturating_sub(25)..],
        };
        format!("\nnested host console:\n{}", shown.join("\n"))
    }
}

impl HostConsole {
    /// The first line since the mark in which the nested host's kernel says it is wedged or
    /// dying: a stall, a lockup, a panic, a BUG. Its guests may hang for good after one.
    fn wedged(&self) -> Option<String> {
        self.0.as_ref()?.wedged()
    }

    /// What the console gained since the mark (all of it when the host was restarted since:
    /// a restarted host starts a new log), read from the mark on only: `platform_check`
    /// asks before every `ferry` call.
    fn since_mark(&self) -> Option<String> {
        self.0.as_ref().map(ferry::nested::ConsoleMark::since)
    }
}

/// The guests of any cluster under `<cache>/clusters` that died or reset by themselves since
/// `since`, as their daemons logged it (`[UNIX_SECONDS] the guest ended: the guest
/// triple-faulted ...`, `... the guest rebooted ...`): `node: the line`; and the guests of
/// `ferry run` calls that triple-faulted since then ([`RUN_DEATHS`]). Under the nested
/// host's emulated SVM, guests triple-fault now and then, idle ones included: the
/// platform's, like a host stall. Each is printed, so a pattern would show.
fn guest_deaths_since(since: std::time::SystemTime) -> Vec<String> {
    let mut found: Vec<String> = RUN_DEATHS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(at, _)| *at >= since)
        .map(|(_, line)| line.clone())
        .collect();
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let clusters = ferry::debian::cache_dir().join("clusters");
    for cluster in std::fs::read_dir(&clusters).into_iter().flatten().flatten() {
        let nodes = cluster.path().join("nodes");
        for node in std::fs::read_dir(&nodes).into_iter().flatten().flatten() {
            let log = std::fs::read_to_string(node.path().join("daemon.log")).unwrap_or_default();
            for line in log.lines() {
                let Some((stamp, rest)) = line.strip_prefix('[').and_then(|l| l.split_once("] "))
                else {
                    continue;
                };
                let at: f64 = stamp.parse().unwrap_or(0.0);
                let died = (rest.starts_with("the guest ended: ") && !rest.contains("powered off"))
                    || rest.starts_with("the guest rebooted");
                if at >= since && died {
                    found.push(format!("{}: {rest}", node.file_name().to_string_lossy()));
                }
            }
        }
    }
    found
}

/// How long the nested host's kernel may take to report a CPU that stopped: Debian's kernel
/// reports an RCU stall 21 s after the grace period the CPU holds up began
/// (`CONFIG_RCU_CPU_STALL_TIMEOUT`; the CPU may have stopped before), a soft lockup after 20 s
/// (twice `watchdog_thresh`); and the report then has to reach the console.
const STALL_REPORT_DELAY: Duration = Duration::from_secs(30);

/// After a failed attempt whose time saw no report from the nested host's kernel: waits until
/// one comes, at most [`STALL_REPORT_DELAY`]. Such a report is of a CPU that stopped at about
/// the time the attempt failed or before, and guests slowed or silenced by it fail in ways of
/// their own (an agent that no longer answers within its limit): the attempt was the
/// platform's. Seen in a full run: a move failed because the source's agent did not answer
/// within 10 s, and the host's kernel reported a stall about 22 s later.
fn wait_for_late_report(console: &HostConsole) {
    let deadline = Instant::now() + STALL_REPORT_DELAY;
    while console.wedged().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// After a failed attempt in the nested host: a host whose kernel reported a stall, a lockup
/// or a panic during it is restarted (its guests, the cluster's nodes among them, may hang for
/// good: the next `ferry up` brings the cluster back in the new host); otherwise, one that does
/// not run a trivial command is. Whether the host was restarted: the attempt then says more
/// about the platform than about the case.
fn recover_host(console: &HostConsole) -> bool {
    match console.wedged() {
        Some(line) => {
            println!("e2e: the nested host's kernel reported `{line}`; restarting it");
            let _ = Command::new(FERRY).args(["host", "stop"]).status();
            let _ = Command::new(FERRY).args(["host", "start"]).status();
            true
        }
        None => restart_host_if_unresponsive(),
    }
}

/// Before a case's second attempt: if the nested host does not run a trivial command within a
/// minute, it is stopped and started again, so one wedged host fails one case, not the rest.
/// Whether it was restarted.
fn restart_host_if_unresponsive() -> bool {
    match ferry(&["host", "exec", "--", "true"], b"", QUICK_LIMIT) {
        Ok(out) if out.code() == 0 => false,
        answer => {
            let why = match answer {
                Ok(out) => format!("exit {}: {}", out.code(), out.stderr.trim()),
                Err(e) => e,
            };
            println!("e2e: the nested host does not run `true` ({why}); restarting it");
            let _ = Command::new(FERRY).args(["host", "stop"]).status();
            let _ = Command::new(FERRY).args(["host", "start"]).status();
            true
        }
    }
}

/// How a case fared over its attempts so far.
#[derive(Default)]
struct Tally {
    attempts: u32,
    /// Failed attempts during which the platform did not fail.
    own_failures: u32,
    /// All its attempts together.
    took: Duration,
    /// The last attempt's result; None before the first.
    last: Option<CaseResult>,
}

impl Tally {
    fn failed(&self) -> bool {
        matches!(self.last, Some(Err(_)))
    }

    /// One attempt of `case`, printed: `ok`, or why it failed, what the nested host's kernel
    /// said meanwhile and whether the platform failed (the host is then restarted if it is
    /// wedged or deaf, for the next attempt or case).
    fn attempt(&mut self, suite: &Suite, name: &str, case: fn(&Suite) -> CaseResult) {
        let t = Instant::now();
        self.attempts += 1;
        let console = HostConsole::mark(suite);
        *ATTEMPT.lock().unwrap_or_else(|e| e.into_inner()) = Some(console.clone());
        let began = std::time::SystemTime::now();
        let result = case(suite);
        *ATTEMPT.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match &result {
            Ok(()) => println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(why) => {
                if suite.nested {
                    wait_for_late_report(&console);
                }
                let news = console.news();
                // So that one wedged host fails one attempt, not the rest.
                let mut platform = suite.nested && recover_host(&console);
                if suite.nested {
                    let deaths = guest_deaths_since(began);
                    for d in &deaths {
                        println!("e2e: a guest died during the attempt: {d}");
                    }
                    platform |= !deaths.is_empty();
                }
                if !platform {
                    self.own_failures += 1;
                }
                println!(
                    "test {name} ... failed on attempt {} ({:.1} s{}):\n{why}{news}",
                    self.attempts,
                    t.elapsed().as_secs_f64(),
                    if platform { ", the platform's" } else { "" }
                );
            }
        }
        self.took += t.elapsed();
        self.last = Some(result);
    }
}

/// Stops the shared nested host when the suite ends, however it ends.
struct NestedHostGuard(bool);

impl Drop for NestedHostGuard {
    fn drop(&mut self) {
        if self.0 {
            let _ = Command::new(FERRY).args(["host", "stop"]).status();
        }
    }
}

fn setup() -> Result<(Suite, NestedHostGuard), String> {
    eprintln!("e2e: building the guest image (first time: downloads Debian packages)");
    let status = Command::new(FERRY)
        .args(["image", "build"])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("`ferry image build` failed".into());
    }
    let image = ferry::image::ensure(&ferry::debian::cache_dir(), false)
        .map_err(|e| format!("guest image: {e}"))?;
    let public = std::env::temp_dir().join(format!("ferry-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&public).map_err(|e| e.to_string())?;
    let copy = |from: &Path, name: &str| -> Result<PathBuf, String> {
        let to = public.join(name);
        std::fs::copy(from, &to).map_err(|e| format!("copying {}: {e}", from.display()))?;
        Ok(to)
    };
    let suite = Suite {
        release: image.kernel_release.clone(),
        public_kernel: copy(&image.kernel, "vmlinuz")?,
        public_initrd: copy(&image.initrd, "initrd")?,
        nested: ferry::nested::local_kvm_problem().is_some(),
    };
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o755));

    let mut guard = NestedHostGuard(false);
    if let Some(reason) = ferry::nested::local_kvm_problem() {
        eprintln!("e2e: local KVM cannot boot a stock kernel ({reason}); starting one nested host for the suite");
        // A host someone already runs is used and left running; one started here is stopped.
        let was_running = Command::new(FERRY)
            .args(["host", "status"])
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?
            .success();
        let start = || -> Result<bool, String> {
            let status = Command::new(FERRY)
                .args(["host", "start"])
                .status()
                .map_err(|e| e.to_string())?;
            Ok(status.success())
        };
        guard.0 = !was_running;
        if !start()? {
            // A host that does not answer (say, one a bench left wedged) is of no use to
            // anyone: a fresh one, as `ferry host start`'s error suggests.
            eprintln!("e2e: the nested host did not start; stopping it and starting a fresh one");
            let _ = Command::new(FERRY).args(["host", "stop"]).status();
            guard.0 = true;
            if !start()? {
                return Err(
                    "`ferry host start` failed twice, the second time after `ferry host stop`"
                        .into(),
                );
            }
        }
    }
    Ok((suite, guard))
}

fn main() {
    let begun = Instant::now();
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|(name, _)| filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    let (suite, guard) = match setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("e2e: setup failed: {e}");
            println!("0 passed, {} failed", selected.len());
            std::process::exit(1);
        }
    };
    // Every case runs once, in order. Then the cases that failed are tried again, in order,
    // round after round, until each passed or is given up, or the suite is older than
    // `RETRY_UNTIL`: a case's first attempt never waits behind another case's retries.
    // Retries are for the platform: with busy guests, QEMU's emulated SVM wedges a CPU of the
    // nested host or triple-faults a guest within minutes (the README's notes on the nested
    // host). An attempt during which the nested host's kernel wedged (a CPU stalled, or it
    // panicked: see `HostConsole::wedged`; `platform_check` ends such an attempt at once), or
    // the host stopped running commands (either way it is restarted), or a guest died or reset
    // by itself (`guest_deaths_since`) is the platform's, and does not count against the case.
    // A case is given up after `MAX_ATTEMPTS` attempts in all, or after two failures of its
    // own. No retry starts once the suite (its setup included) is older than `RETRY_UNTIL`:
    // the rest of `cargo test --workspace` took about 5 minutes in CI, and most attempts take
    // under 5 (the longest seen in a full run, 9.3), so CI's 90 minutes mostly hold. A
    // retry runs only for a case that failed, so a later limit turns only runs that would be
    // red anyway green, or over time.
    // Every failed attempt is printed, and the summary names the cases that needed more than
    // one, so a flaky case shows instead of hiding.
    const MAX_ATTEMPTS: u32 = 8;
    const RETRY_UNTIL: Duration = Duration::from_secs(76 * 60);
    let started = Instant::now();
    let mut tallies: Vec<Tally> = selected.iter().map(|_| Tally::default()).collect();
    for ((name, case), tally) in selected.iter().zip(&mut tallies) {
        println!("test {name} ...");
        tally.attempt(&suite, name, *case);
    }
    let retryable = |t: &Tally| t.failed() && t.attempts < MAX_ATTEMPTS && t.own_failures < 2;
    while tallies.iter().any(retryable) && begun.elapsed() < RETRY_UNTIL {
        for ((name, case), tally) in selected.iter().zip(&mut tallies) {
            if retryable(tally) && begun.elapsed() < RETRY_UNTIL {
                println!("test {name} ... attempt {}", tally.attempts + 1);
                tally.attempt(&suite, name, *case);
            }
        }
    }
    if tallies.iter().any(retryable) {
        println!(
            "e2e: no more attempts: the suite has run {:.0} min",
            begun.elapsed().as_secs_f64() / 60.0
        );
    }
    let retried: Vec<String> = selected
        .iter()
        .zip(&tallies)
        .filter(|(_, t)| t.attempts > 1)
        .map(|((name, _), t)| format!("{name} ({} attempts)", t.attempts))
        .collect();
    if !retried.is_empty() {
        println!("e2e: needed more than one attempt: {}", retried.join(", "));
    }
    let mut failed = Vec::new();
    for ((name, _), tally) in selected.iter().zip(&tallies) {
        if let Some(Err(why)) = &tally.last {
            println!(
                "test {name} ... FAILED ({} attempts, {:.1} s in all)\n{why}",
                tally.attempts,
                tally.took.as_secs_f64()
            );
            failed.push(*name);
        }
    }
    let passed = selected.len() - failed.len();
    drop(guard);
    let _ = std::fs::remove_dir_all(suite.public_kernel.parent().unwrap());
    println!(
        "\ne2e: {} cases in {:.0} s{}",
        selected.len(),
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", failed.join(", "))
        }
    );
    println!("{passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
