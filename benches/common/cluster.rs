//! A bench's own two-node cluster, for the benches that move a process between nodes
//! (benches/migrate.rs, benches/live.rs): its cluster file (nodes `bench-a` and `bench-b`,
//! [`GUEST_MIB`] each, Debian's `criu` on their root disks), a host that can run it, `ferry up`
//! and `ferry down --purge`, commands in the guests over `ferry ssh`, the Python workload that
//! is moved (started on bench-a, checked to count on at bench-b) and ferry's move itself.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry::cluster::api::{JobState, MigrationJob, NodeState, NodeStatus, AGENT_SILENT};
use ferry::cluster::control::{self, Cluster, MigrateOptions};
use ferry::nested::ConsoleMark;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
pub const NODE_A: &str = "bench-a";
pub const NODE_B: &str = "bench-b";
/// Each guest's memory.
pub const GUEST_MIB: u64 = 1536;
/// The nested host's memory when the bench starts one.
pub const HOST_MEMORY: &str = "6G";
/// The time limit of a short command.
pub const QUICK: Duration = Duration::from_secs(120);

/// What sets one bench's cluster apart from another's.
pub struct Spec {
    /// The cluster's name.
    pub name: &'static str,
    /// The bench (benches/BENCH.rs), in messages and file names.
    pub bench: &'static str,
    /// The guests' network; the nodes get its addresses .11 and .12.
    pub subnet: &'static str,
    /// The first node's API and peer ports (the second node's are one above).
    pub api_port: u16,
    pub peer_port: u16,
}

impl Spec {
    fn file_text(&self) -> String {
        format!(
            r#"# The {bench} bench's cluster (benches/{bench}.rs).
[cluster]
name = "{name}"
subnet = "{subnet}"

[defaults]
vcpus = 2
memory = "{GUEST_MIB}M"
packages = ["criu"]

[api]
port = {api}
peer_port = {peer}

[[node]]
name = "{NODE_A}"

[[node]]
name = "{NODE_B}"
"#,
            bench = self.bench,
            name = self.name,
            subnet = self.subnet,
            api = self.api_port,
            peer = self.peer_port,
        )
    }
}

/// Fills `argv[1]` MiB with a pattern (every page different, no zero page), then counts,
/// appending to /root/progress five times a second. `argv[2]`, the write rate while it counts:
/// none by default; `light`, one page in every 64 of the first 1% of its pages once a second
/// (a different one of each 64 every second); `heavy`, one byte of every page of the first 10%
/// of its pages, pass after pass, as fast as Python goes between the counts.
pub const WORKLOAD: &str = r#"import sys, time
N = int(sys.argv[1]) << 20
rate = sys.argv[2] if len(sys.argv) > 2 else 'none'
buf = bytearray(N)
page = (bytes(range(1, 256)) * 17)[:4096]
for i in range(0, N, 4096):
    buf[i:i + 4096] = page
    buf[i] = (i >> 12) & 0x7f | 0x80
light_end = max(N // 100, 64 * 4096)
heavy_end = N // 10
heavy = len(range(1, heavy_end, 4096))
count = 0
passes = 0
while True:
    count += 1
    with open('/root/progress', 'a') as f:
        f.write('%d\n' % count)
    if rate == 'heavy':
        due = time.time() + 0.2
        while time.time() < due:
            passes += 1
            buf[1:heavy_end:4096] = bytes([passes & 0x7f | 1]) * heavy
        continue
    if rate == 'light' and count % 5 == 0:
        start = (count // 5) % 64 * 4096 + 2
        buf[start:light_end:64 * 4096] = bytes([count & 0x7f | 1]) * len(range(start, light_end, 64 * 4096))
    time.sleep(0.2)
"#;

/// The cluster, up for the bench's life; `ferry down --purge` when dropped.
pub struct Bench {
    pub file: PathBuf,
    pub cluster: Cluster,
    pub spec: &'static Spec,
    /// The memory of the host that runs the guests, in MiB.
    pub host_mib: u64,
    /// Where the nested host's console log stood when the bench brought the cluster up, so
    /// that the host wedging since then ends the moves ([`Bench::host_wedged`]); `None` on this
    /// machine's KVM.
    console_mark: Option<ConsoleMark>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = run_ferry(
            &["down", "--purge", "-q", &self.file.to_string_lossy()],
            b"",
            QUICK,
        );
        let _ = std::fs::remove_dir_all(self.file.parent().unwrap_or(Path::new("/nonexistent")));
    }
}

impl Bench {
    /// Makes sure a host can run the guests, writes the cluster file into a directory of the
    /// bench's own, `ferry up`s it (its table on stderr: stdout holds the figures only) and
    /// puts [`WORKLOAD`] on both nodes as /root/mig.py.
    pub fn up(spec: &'static Spec) -> Result<Bench> {
        let host_mib = nested_host()?;
        let console_mark = ferry::nested::local_kvm_problem().map(|_| ConsoleMark::now());
        let dir =
            std::env::temp_dir().join(format!("ferry-bench-{}-{}", spec.bench, std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join(format!("{}.toml", spec.name));
        std::fs::write(&file, spec.file_text())?;
        let f = file.to_string_lossy().into_owned();
        eprintln!("bench: ferry up {f}");
        let status = Command::new(FERRY)
            .args(["up", &f])
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned()?,
            ))
            .status()?;
        let cluster = Cluster::load(&file)?;
        let bench = Bench {
            file,
            cluster,
            spec,
            host_mib,
            console_mark,
        };
        if !status.success() {
            bail!("`ferry up` exited {status}");
        }
        // `up` is done once the agents answer; on fresh disks sshd may still be making its
        // host keys under the nested host's emulation, for a minute or more.
        for node in [NODE_A, NODE_B] {
            let mut tries = 1;
            while let Err(e) = bench.ssh(node, "cat > /root/mig.py", WORKLOAD.as_bytes(), QUICK) {
                if tries == 5 {
                    return Err(e);
                }
                eprintln!(
                    "bench: {node}'s sshd does not answer yet ({}); trying again",
                    first_line(&format!("{e:#}"))
                );
                tries += 1;
            }
        }
        Ok(bench)
    }

    /// The guest address of `node`.
    pub fn addr(&self, node: &str) -> Result<String> {
        Ok(self.cluster.node_named(node)?.address.addr.to_string())
    }

    /// Runs `script` with `sh -c` on `node` over `ferry ssh`; its stdout, or an error with both
    /// streams.
    pub fn ssh(&self, node: &str, script: &str, stdin: &[u8], limit: Duration) -> Result<String> {
        self.ssh_watched(node, script, stdin, limit, None)
    }

    /// [`Bench::ssh`] for a long script: given up as soon as the cluster is found down (a
    /// guest that died leaves its ssh connection hanging until `limit`).
    pub fn ssh_long(&self, node: &str, script: &str, limit: Duration) -> Result<String> {
        self.ssh_watched(node, script, b"", limit, Some(&|| self.down_reason()))
    }

    fn ssh_watched(
        &self,
        node: &str,
        script: &str,
        stdin: &[u8],
        limit: Duration,
        watch: Option<&dyn Fn() -> Option<String>>,
    ) -> Result<String> {
        let f = self.file.to_string_lossy();
        let (ok, out, err) = run_ferry_watched(
            &["ssh", node, "--file", &f, "--", "sh", "-c", script],
            stdin,
            limit,
            watch,
        )?;
        if !ok {
            bail!("on {node}: `{}` failed\n{out}{err}", first_line(script));
        }
        Ok(out)
    }

    /// Why the cluster can no longer be measured, if it cannot: the nested host's kernel said
    /// it is wedged ([`Bench::host_wedged`]); or a node is down: its daemon says its guest is
    /// down, or for a minute that the guest's agent stopped answering, or no daemon has
    /// answered for a minute (a busy nested host can keep a daemon from answering `ferry
    /// status` in time); with how the nested host's kernel ended if it did. A node still
    /// booting, or whose agent is silent for less than a minute, is not down.
    pub fn down_reason(&self) -> Option<String> {
        if let Some(line) = self.host_wedged() {
            return Some(format!(
                "the nested host's kernel is wedged or dying: `{line}`"
            ));
        }
        let patience = Instant::now() + Duration::from_secs(60);
        let why = loop {
            let statuses = match self.cluster.statuses() {
                Ok(s) => s,
                Err(e) => break format!("`ferry status` failed: {e}"),
            };
            // A guest that was up and whose agent went silent counts too: under the nested
            // host's emulation a guest can hang without dying, and its daemon then says
            // `booting (the guest's agent stopped answering: ...)` for good.
            let hung = |s: &&NodeStatus| {
                s.state == NodeState::Booting
                    && s.detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with(AGENT_SILENT))
            };
            let down: Vec<_> = statuses
                .iter()
                .filter(|s| s.state == NodeState::Down || hung(s))
                .collect();
            if down.is_empty() {
                return None;
            }
            let silent = down.iter().all(|s| {
                hung(s)
                    || s.detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with("no daemon answers"))
            });
            if !silent || Instant::now() > patience {
                let nodes: Vec<String> = down
                    .iter()
                    .map(|s| {
                        format!(
                            "{}: {}",
                            s.name,
                            first_line(s.detail.as_deref().unwrap_or("down"))
                        )
                    })
                    .collect();
                break format!(
                    "the cluster's nodes went down mid-bench ({})",
                    nodes.join("; ")
                );
            }
            std::thread::sleep(Duration::from_secs(5));
        };
        // A panic or a BUG since the mark returned above; what is left to name is the host
        // running out of memory.
        let Some(mark) = &self.console_mark else {
            return Some(why);
        };
        let since = mark.since();
        let end = since.lines().find(|l| l.contains("Out of memory"));
        Some(match end {
            Some(l) => format!("{why}; the nested host's kernel: {}", l.trim()),
            None => why,
        })
    }

    /// The line in which the nested host's kernel said, since the cluster came up, that it is
    /// wedged or dying ([`ConsoleMark::wedged`]). Its guests most often hang for good
    /// after one, a move under way with them: without this, the move would wait out its limit
    /// (over an hour for CRIU's pre-dumps at 1024 MiB).
    pub fn host_wedged(&self) -> Option<String> {
        self.console_mark.as_ref()?.wedged()
    }

    /// Ends the cluster (`ferry down --purge`, as dropping the bench does) and, when the
    /// nested host wedged under it, stops that host too, so that the next [`Bench::up`] starts
    /// a new one instead of reusing one whose guests hang.
    pub fn end(self) {
        let wedged = self.host_wedged();
        drop(self);
        if let Some(line) = wedged {
            eprintln!("bench: stopping the nested host, wedged (`{line}`); a new one comes up");
            if let Err(e) = run_ferry(&["host", "stop"], b"", QUICK) {
                eprintln!("bench: `ferry host stop` failed: {e:#}");
            }
        }
    }

    /// Why `mib` cannot be measured here, if it cannot: bench-a holds the workload and bench-b
    /// its copy at once, both guests with their kernels and the migration's buffers, next to
    /// whatever else the host runs.
    pub fn does_not_fit(&self, mib: u64) -> Option<String> {
        if mib + 256 > GUEST_MIB {
            return Some(format!(
                "a {mib} MiB process does not fit a {GUEST_MIB} MiB guest"
            ));
        }
        let need = 2 * (mib + 256) + 1024;
        (self.host_mib < need).then(|| {
            format!(
                "the host has {} MiB, two guests with {mib} MiB processes need about {need} MiB",
                self.host_mib
            )
        })
    }

    /// One move of a fresh workload of `mib` MiB (`rate` as [`WORKLOAD`]'s second argument):
    /// starts it on bench-a, has `mover` move it (given its pid), checks that it counts on at
    /// bench-b from where it was and ends it there.
    pub fn move_workload<T>(
        &self,
        mib: u64,
        rate: Option<&str>,
        mover: impl FnOnce(u32) -> Result<T>,
    ) -> Result<T> {
        let pid = self.start_workload(mib, rate)?;
        let before = self.last_count(NODE_A)?;
        let moved = mover(pid)?;
        self.runs_on_at_b(before)?;
        Ok(moved)
    }

    /// Starts the workload on bench-a and waits until it has filled its memory and counts; its
    /// pid.
    fn start_workload(&self, mib: u64, rate: Option<&str>) -> Result<u32> {
        for node in [NODE_A, NODE_B] {
            self.ssh(
                node,
                "pkill -KILL -f '^python3 /root/mig.py'; rm -f /root/progress; : > /root/w.out",
                b"",
                QUICK,
            )?;
        }
        let out = self.ssh(
            NODE_A,
            &format!(
                "setsid python3 /root/mig.py {mib} {} </dev/null >/root/w.out 2>&1 & echo $!",
                rate.unwrap_or_default()
            ),
            b"",
            QUICK,
        )?;
        let pid: u32 = out
            .trim()
            .parse()
            .map_err(|_| anyhow!("no pid from starting the workload: {out}"))?;
        let deadline = Instant::now() + Duration::from_secs(120 + mib);
        loop {
            if self.last_count(NODE_A)? >= 2 {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                let w = self
                    .ssh(NODE_A, "cat /root/w.out", b"", QUICK)
                    .unwrap_or_default();
                bail!("the {mib} MiB workload never started counting on {NODE_A}: {w}");
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn last_count(&self, node: &str) -> Result<u64> {
        let out = self.ssh(
            node,
            "tail -n 1 /root/progress 2>/dev/null; true",
            b"",
            QUICK,
        )?;
        Ok(out.trim().parse().unwrap_or(0))
    }

    /// Checks that the workload counts on at bench-b from beyond `before`, then ends it there.
    fn runs_on_at_b(&self, before: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = None;
        loop {
            let now = self.last_count(NODE_B)?;
            if now > before {
                match seen {
                    Some(s) if now > s => break,
                    None => seen = Some(now),
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                bail!("after the move the workload does not count on at {NODE_B} (count {now}, it was {before} at {NODE_A})");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.ssh(
            NODE_B,
            "pkill -KILL -f '^python3 /root/mig.py'; true",
            b"",
            QUICK,
        )?;
        Ok(())
    }

    /// ferry's move of `pid` from bench-a to bench-b (`ferry migrate`'s library call): the
    /// job once it is done, or an error with the job's error and both daemons' logs.
    pub fn ferry_move(&self, pid: u32, options: &MigrateOptions) -> Result<MigrationJob> {
        let job = control::migrate(&self.cluster, NODE_A, pid, NODE_B, options, &mut |_| {})
            .map_err(|e| {
                anyhow!(
                    "ferry migrate {NODE_A}:{pid} {NODE_B}: {e}{}",
                    self.daemon_logs()
                )
            })?;
        if job.state != JobState::Done {
            bail!(
                "ferry migrate {NODE_A}:{pid} {NODE_B}: {}{}",
                job.error.unwrap_or_default(),
                self.daemon_logs()
            );
        }
        Ok(job)
    }

    /// The end of both daemons' logs, for a failed move.
    pub fn daemon_logs(&self) -> String {
        let mut s = String::new();
        for node in [NODE_A, NODE_B] {
            let log =
                std::fs::read_to_string(self.cluster.dir.daemon_log(node)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            s.push_str(&format!("\n== {node} daemon.log\n"));
            s.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
        }
        s
    }
}

/// `--sizes 64,256,1024 --rounds N` from the bench's arguments (cargo's own, like `--bench`,
/// are passed over): the sizes in MiB and the rounds, or `None` when either is empty or zero.
pub fn sizes_and_rounds(args: &[String], default_rounds: usize) -> Option<(Vec<u64>, usize)> {
    let mut sizes = vec![64, 256, 1024];
    let mut rounds = default_rounds;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => {
                sizes = it
                    .next()
                    .map(|s| s.split(',').filter_map(|m| m.parse().ok()).collect())
                    .unwrap_or_default()
            }
            "--rounds" => {
                rounds = it
                    .next()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(default_rounds)
            }
            _ => {} // cargo's --bench and the like
        }
    }
    (!sizes.is_empty() && rounds > 0).then_some((sizes, rounds))
}

pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Makes sure a host can run the two guests: this machine's KVM, or a nested host (a running
/// one as it is, else one started with [`HOST_MEMORY`]). Its memory in MiB.
fn nested_host() -> Result<u64> {
    let meminfo = if let Some(reason) = ferry::nested::local_kvm_problem() {
        eprintln!("bench: {reason}");
        if ferry::nested::NestedHost::running()?.is_none() {
            eprintln!("bench: starting the nested host with {HOST_MEMORY}");
            let out = run_ferry(&["host", "start", "--memory", HOST_MEMORY], b"", QUICK * 3)?;
            if !out.0 {
                bail!("`ferry host start` failed: {}", out.2);
            }
        }
        let out = run_ferry(&["host", "exec", "--", "cat", "/proc/meminfo"], b"", QUICK)?;
        out.1
    } else {
        std::fs::read_to_string("/proc/meminfo")?
    };
    let total = meminfo_mib(&meminfo, "MemTotal").ok_or_else(|| anyhow!("no MemTotal"))?;
    if total + 512 < 4 * GUEST_MIB {
        eprintln!(
            "bench: the host has {total} MiB for two {GUEST_MIB} MiB guests (the bench starts one with {HOST_MEMORY}); sizes that do not fit are skipped"
        );
    }
    Ok(total)
}

fn meminfo_mib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb >> 10)
}

/// Runs `ferry ARGS` with `stdin`: (success, stdout, stderr), within `limit`.
pub fn run_ferry(args: &[&str], stdin: &[u8], limit: Duration) -> Result<(bool, String, String)> {
    run_ferry_watched(args, stdin, limit, None)
}

/// How often a long command's watch is asked whether to stop waiting.
const WATCH_EVERY: Duration = Duration::from_secs(30);

/// [`run_ferry`], and every [`WATCH_EVERY`] asks `watch` whether waiting on is pointless: if
/// it says why, ends the command and returns that as the error.
fn run_ferry_watched(
    args: &[&str],
    stdin: &[u8],
    limit: Duration,
    watch: Option<&dyn Fn() -> Option<String>>,
) -> Result<(bool, String, String)> {
    let mut child = Command::new(FERRY)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ferry")?;
    let mut input = child.stdin.take().expect("piped");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let mut next_watch = Instant::now() + WATCH_EVERY;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`ferry {}` took over {} s", args.join(" "), limit.as_secs());
        }
        if let Some(watch) = watch.filter(|_| Instant::now() > next_watch) {
            if let Some(why) = watch() {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`ferry {}` given up: {why}", args.join(" "));
            }
            next_watch = Instant::now() + WATCH_EVERY;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = writer.join();
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    Ok((status.success(), out, err))
}
