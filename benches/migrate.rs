//! Moving a process between two nodes: ferry against CRIU, on the same guests in the same host.
//!
//! `cargo bench --bench migrate [-- [--sizes 64,256,1024] [--rounds 3]]`
//!
//! A user's setup: a cluster file of the bench's own (cluster `benchmig`, two nodes `bench-a`
//! and `bench-b` with 1536 MiB each and Debian's `criu` on their root disks), `ferry up`, and
//! `ferry down --purge` at the end. Where the local KVM cannot boot a stock kernel the nodes run
//! in the nested host: a running one is used (and left running); otherwise one is started with
//! 6 GiB. For each size, a Python workload fills that many MiB with a pattern (no zero pages),
//! then counts, appending to /root/progress five times a second; it is started detached on
//! bench-a over `ferry ssh`, then moved to bench-b:
//!
//! - by ferry: `ferry migrate`'s library call; the job's `frozen_ms` and `total_ms` as the
//!   source's daemon measured them;
//! - by CRIU (3.17, Debian's): a page server on bench-b over TLS (certificates of the cluster
//!   CA), `criu dump` on bench-a sending its pages there, the other image files copied over ssh
//!   between the guests, `criu restore -d` on bench-b. All of it is driven from a script in
//!   bench-a (its clock), over one ssh connection to bench-b opened beforehand; freeze is from
//!   `criu dump` starting to `criu restore` returning, total from starting the page server.
//!   CRIU's images land in a tmpfs on bench-b; at sizes where images and the restored process
//!   would not fit in the guest together, the restore punches the images out as it goes
//!   (`--auto-dedup`). CRIU 3.17 refuses to run without nfnetlink (its kernel-feature probe),
//!   which ferry's guests do not load: the bench loads `nf_tables` and its dependencies from
//!   the same Debian kernel package into both guests.
//!
//! A figure is printed only for a move after which the process counts on at bench-b from where
//! it was. Medians over the rounds. The page stream is also measured against plain TLS:
//! 256 MiB over a loopback connection with the cluster's mutual TLS, between two vm-memory
//! guests with `ferry_migration::send`/`receive`, and as plain writes, where the daemons run
//! (in the nested host when they do). Figures are printed, never asserted. Ratios are ferry's
//! time over CRIU's (below 1: ferry is faster; the goal at 256 MiB is 0.33 or less), and for
//! the stream ferry's throughput over plain TLS's.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry::cluster::api::JobState;
use ferry::cluster::control::{self, Cluster};

mod common;
use common::median;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const CLUSTER: &str = "benchmig";
const NODE_A: &str = "bench-a";
const NODE_B: &str = "bench-b";
const ADDR_A: &str = "10.79.9.11";
const ADDR_B: &str = "10.79.9.12";
/// Each guest's memory.
const GUEST_MIB: u64 = 1536;
/// The nested host's memory when the bench starts one.
const HOST_MEMORY: &str = "6G";
const CRIU_PORT: u16 = 27000;
const STREAM_MIB: usize = 256;
const QUICK: Duration = Duration::from_secs(120);

const CLUSTER_FILE: &str = r#"# The migrate bench's cluster (benches/migrate.rs).
[cluster]
name = "benchmig"
subnet = "10.79.9.0/24"

[defaults]
vcpus = 2
memory = "1536M"
packages = ["criu"]

[api]
port = 7495
peer_port = 7595

[[node]]
name = "bench-a"

[[node]]
name = "bench-b"
"#;

/// Fills `argv[1]` MiB with a pattern (every page different, no zero page), then counts.
const WORKLOAD: &str = r#"import sys, time
N = int(sys.argv[1]) << 20
buf = bytearray(N)
page = (bytes(range(1, 256)) * 17)[:4096]
for i in range(0, N, 4096):
    buf[i:i + 4096] = page
    buf[i] = (i >> 12) & 0x7f | 0x80
count = 0
while True:
    count += 1
    with open('/root/progress', 'a') as f:
        f.write('%d\n' % count)
    time.sleep(0.2)
"#;

/// CRIU's move, run in bench-a: `sh criu.sh PID [--auto-dedup]`. Prints the restored pid and
/// `criu-times T0 T1 T2 T3 T4` (ns: page server started, dump, images copied, restored).
const CRIU_SCRIPT: &str = r#"PID=$1; DEDUP=$2
B=@B@; P=@PORT@; T=/root/criu-tls; I=/mnt/criu/img; W=/mnt/criu/work
SSH="ssh -i /root/.ssh/bench_mig -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/root/.ssh/bench_known -o ControlMaster=auto -o ControlPath=/root/.ssh/cm-%h -o ControlPersist=900 root@$B"
PREP="mkdir -p /mnt/criu && { mountpoint -q /mnt/criu || mount -t tmpfs -o size=1400m tmpfs /mnt/criu; } && rm -rf $I $W && mkdir -p $I $W"
fail() {
    echo "criu-failed: $1"
    for f in $W/dump.log; do [ -f $f ] && { echo "== bench-a $f"; grep -E 'Error|Warn' $f | tail -n 15; }; done
    $SSH "for f in $W/ps.log $W/restore.log; do [ -f \$f ] && { echo == bench-b \$f; grep -E 'Error|Warn' \$f | tail -n 15; }; done"
    exit 1
}
sh -c "$PREP" || fail "preparing bench-a's image directory"
$SSH true || fail "ssh to bench-b"
$SSH "$PREP && rm -f /root/progress && : > /root/w.out" || fail "preparing bench-b"
t0=$(date +%s%N)
$SSH "criu page-server -D $I -W $W -o ps.log --port $P --daemon --tls --tls-cacert $T/ca.pem --tls-cert $T/criu-b.pem --tls-key $T/criu-b.key" || fail "criu page-server"
t1=$(date +%s%N)
criu dump -t $PID -D $I -W $W -o dump.log --page-server --address $B --port $P --tls --tls-cacert $T/ca.pem --tls-cert $T/criu-a.pem --tls-key $T/criu-a.key || fail "criu dump"
t2=$(date +%s%N)
tar -C $I -cf - . | $SSH "tar -C $I -xf -" || fail "copying the images"
t3=$(date +%s%N)
$SSH "criu restore -D $I -W $W -o restore.log -d --pidfile $W/pid $DEDUP && echo restored-pid \$(cat $W/pid)" || fail "criu restore"
t4=$(date +%s%N)
echo "criu-times $t0 $t1 $t2 $t3 $t4"
"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--stream-inner") {
        let (dir, rounds) = (&args[i + 1], args[i + 2].parse().unwrap_or(3));
        match stream_inner(Path::new(dir), rounds) {
            Ok(line) => {
                println!("{line}");
                std::process::exit(0)
            }
            Err(e) => {
                println!("stream ferry/tls ratio=not-measured ({e:#})");
                std::process::exit(1)
            }
        }
    }
    if let Some(i) = args.iter().position(|a| a == "--stream") {
        let inner = vec![
            args[0].clone(),
            "--stream-inner".into(),
            args[i + 1].clone(),
            args[i + 2].clone(),
        ];
        common::measure("migrate", inner, |_, _| Ok(()));
    }
    let mut sizes = vec![64, 256, 1024];
    let mut rounds = 3;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => {
                sizes = it
                    .next()
                    .map(|s| s.split(',').filter_map(|m| m.parse().ok()).collect())
                    .unwrap_or_default()
            }
            "--rounds" => rounds = it.next().and_then(|r| r.parse().ok()).unwrap_or(3),
            _ => {} // cargo's --bench and the like
        }
    }
    if sizes.is_empty() || rounds == 0 {
        eprintln!("bench: usage: migrate [--sizes 64,256,1024] [--rounds N]");
        std::process::exit(2);
    }
    std::process::exit(match outer(&sizes, rounds) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench: migrate: {e:#}");
            1
        }
    });
}

/// One move's figures, in ms.
#[derive(Debug, Clone, Copy)]
struct Move {
    freeze_ms: f64,
    total_ms: f64,
}

/// The cluster, up for the bench's life; `ferry down --purge` when dropped.
struct Bench {
    file: PathBuf,
    cluster: Cluster,
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

fn outer(sizes: &[u64], rounds: usize) -> Result<()> {
    let host_mib = nested_host()?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("benchmig.toml");
    std::fs::write(&file, CLUSTER_FILE)?;
    let f = file.to_string_lossy().into_owned();
    eprintln!("bench: ferry up {f}");
    // Its table goes with the progress, on stderr: stdout holds the figures only.
    let status = Command::new(FERRY)
        .args(["up", &f])
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned()?,
        ))
        .status()?;
    let cluster = Cluster::load(&file)?;
    let bench = Bench { file, cluster };
    if !status.success() {
        bail!("`ferry up` exited {status}");
    }
    let criu = prepare_criu(&bench);
    if let Err(e) = &criu {
        eprintln!("bench: CRIU cannot run in these guests: {e:#}");
    }
    for node in [NODE_A, NODE_B] {
        ssh(
            &bench,
            node,
            "cat > /root/mig.py",
            WORKLOAD.as_bytes(),
            QUICK,
        )?;
    }

    let mut lines = Vec::new();
    let mut gone: Option<String> = None;
    for &mib in sizes {
        if let Some(why) = does_not_fit(mib, host_mib).or(gone.clone()) {
            eprintln!("bench: {mib} MiB skipped: {why}");
            lines.push(format!(
                "migrate total ferry/criu ratio=not-measured mib={mib} (skipped: {why})"
            ));
            lines.push(format!(
                "migrate freeze ferry/criu ratio=not-measured mib={mib} (skipped: {why})"
            ));
            continue;
        }
        let (mut ferry_moves, mut criu_moves) = (Vec::new(), Vec::new());
        let mut errors: BTreeMap<&str, String> = BTreeMap::new();
        for round in 1..=rounds {
            if !errors.is_empty() {
                gone = cluster_down(&bench);
                if let Some(why) = &gone {
                    eprintln!("bench: {why}: no more rounds");
                    errors.entry("ferry").or_insert_with(|| why.clone());
                    errors.entry("criu").or_insert_with(|| why.clone());
                    break;
                }
            }
            match ferry_round(&bench, mib) {
                Ok(m) => {
                    eprintln!(
                        "bench: {mib} MiB round {round}: ferry frozen {:.0} ms, total {:.0} ms",
                        m.freeze_ms, m.total_ms
                    );
                    ferry_moves.push(m)
                }
                Err(e) => {
                    eprintln!("bench: {mib} MiB round {round}: ferry: {e:#}");
                    errors.insert("ferry", format!("{e:#}"));
                }
            }
            match &criu {
                Ok(()) => match criu_round(&bench, mib) {
                    Ok(m) => {
                        eprintln!(
                            "bench: {mib} MiB round {round}: criu frozen {:.0} ms, total {:.0} ms",
                            m.freeze_ms, m.total_ms
                        );
                        criu_moves.push(m)
                    }
                    Err(e) => {
                        eprintln!("bench: {mib} MiB round {round}: criu: {e:#}");
                        errors.insert("criu", format!("{e:#}"));
                    }
                },
                Err(e) => {
                    errors.insert("criu", format!("{e:#}"));
                }
            }
        }
        for (what, pick) in [
            ("total", (|m: &Move| m.total_ms) as fn(&Move) -> f64),
            ("freeze", |m: &Move| m.freeze_ms),
        ] {
            let f =
                (!ferry_moves.is_empty()).then(|| median(ferry_moves.iter().map(pick).collect()));
            let c = (!criu_moves.is_empty()).then(|| median(criu_moves.iter().map(pick).collect()));
            lines.push(match (f, c) {
                (Some(f), Some(c)) => format!(
                    "migrate {what} ferry/criu ratio={:.3} mib={mib} ferry_ms={f:.0} criu_ms={c:.0}",
                    f / c
                ),
                (f, c) => {
                    let mut why = Vec::new();
                    if f.is_none() {
                        why.push(format!("ferry: {}", first_line(&errors["ferry"])));
                    }
                    if c.is_none() {
                        why.push(format!("criu: {}", first_line(&errors["criu"])));
                    }
                    let known = f
                        .map(|f| format!(" ferry_ms={f:.0}"))
                        .or(c.map(|c| format!(" criu_ms={c:.0}")))
                        .unwrap_or_default();
                    format!(
                        "migrate {what} ferry/criu ratio=not-measured mib={mib}{known} ({})",
                        why.join("; ")
                    )
                }
            });
        }
        // The issue's short form, for total and freeze time.
        let n = lines.len();
        for l in [lines[n - 2].clone(), lines[n - 1].clone()] {
            let ratio = l.split("ratio=").nth(1).and_then(|r| r.split(' ').next());
            if let Some(r) = ratio.filter(|r| *r != "not-measured") {
                lines.push(format!("migrate ferry/criu ratio={r} mib={mib}"));
            }
        }
    }

    // The page stream against plain TLS, where the daemons run.
    let tls_dir = bench.cluster.dir.tls_dir(&bench.cluster.config);
    let out = Command::new(std::env::current_exe()?)
        .args(["--stream", &tls_dir.to_string_lossy(), &rounds.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    let stream = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("stream "))
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "stream ferry/tls ratio=not-measured (the measurement exited {} without a figure)",
                out.status
            )
        });
    lines.push(stream);
    drop(bench);
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// Why the cluster can no longer be measured, if its nodes are not all ready.
fn cluster_down(b: &Bench) -> Option<String> {
    match run_ferry(&["status", &b.file.to_string_lossy()], b"", QUICK) {
        Ok((true, _, _)) => None,
        Ok((false, out, err)) => Some(format!(
            "the cluster's nodes went down mid-bench ({})",
            out.lines()
                .chain(err.lines())
                .filter(|l| l.contains(" down") || l.contains("no daemon"))
                .collect::<Vec<_>>()
                .join("; ")
        )),
        Err(e) => Some(format!("`ferry status` failed: {e:#}")),
    }
}

fn first_line(s: &str) -> &str {
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

/// Why `mib` cannot be measured here, if it cannot: bench-a holds the workload and bench-b
/// its copy at once, both guests with their kernels and the migration's buffers, next to
/// whatever else the host runs.
fn does_not_fit(mib: u64, host_mib: u64) -> Option<String> {
    if mib + 256 > GUEST_MIB {
        return Some(format!(
            "a {mib} MiB process does not fit a {GUEST_MIB} MiB guest"
        ));
    }
    let need = 2 * (mib + 256) + 1024;
    (host_mib < need).then(|| {
        format!("the host has {host_mib} MiB, two guests with {mib} MiB processes need about {need} MiB")
    })
}

/// Runs `ferry ARGS` with `stdin`: (success, stdout, stderr), within `limit`.
fn run_ferry(args: &[&str], stdin: &[u8], limit: Duration) -> Result<(bool, String, String)> {
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
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`ferry {}` took over {} s", args.join(" "), limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = writer.join();
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    Ok((status.success(), out, err))
}

/// Runs `script` with `sh -c` on `node` over `ferry ssh`; its stdout, or an error with both
/// streams.
fn ssh(b: &Bench, node: &str, script: &str, stdin: &[u8], limit: Duration) -> Result<String> {
    let f = b.file.to_string_lossy();
    let (ok, out, err) = run_ferry(
        &["ssh", node, "--file", &f, "--", "sh", "-c", script],
        stdin,
        limit,
    )?;
    if !ok {
        bail!("on {node}: `{}` failed\n{out}{err}", first_line(script));
    }
    Ok(out)
}

/// Certificates of the cluster CA for CRIU's TLS (by guest address), an ssh key from bench-a
/// to bench-b, and the netfilter modules CRIU's kernel probe needs; then `criu check`.
fn prepare_criu(b: &Bench) -> Result<()> {
    let tls = b.cluster.dir.tls_dir(&b.cluster.config);
    let ca = ferry_net::pki::ClusterCa::load_or_create(&tls, CLUSTER)?;
    let certs = b.file.with_file_name("criu-tls");
    for (name, addr) in [("criu-a", ADDR_A), ("criu-b", ADDR_B)] {
        ca.issue(&certs, name, &[], &[addr.parse()?])?;
    }
    let kernel = ferry::kernel::KernelPackage::fetch(&ferry::debian::cache_dir())?;
    let modules = ferry::kmod::ModuleIndex::open(&kernel.modules)?.resolve(&["nf_tables"])?;
    for node in [NODE_A, NODE_B] {
        ssh(b, node, "rm -rf /root/criu-tls /root/kmod; mkdir -p /root/criu-tls /root/kmod; chmod 700 /root/criu-tls", b"", QUICK)?;
        for f in [
            "ca.pem",
            "criu-a.pem",
            "criu-a.key",
            "criu-b.pem",
            "criu-b.key",
        ] {
            let data = std::fs::read(certs.join(f))?;
            ssh(b, node, &format!("cat > /root/criu-tls/{f}"), &data, QUICK)?;
        }
        let mut load = String::new();
        for m in &modules {
            let name = m.file_name();
            ssh(
                b,
                node,
                &format!("cat > /root/kmod/{name}"),
                &m.load_bytes()?,
                QUICK,
            )?;
            load.push_str(&format!("busybox insmod /root/kmod/{name} 2>/dev/null; "));
        }
        load.push_str("grep -q '^nf_tables ' /proc/modules && criu check");
        ssh(b, node, &load, b"", QUICK).context("criu check")?;
    }
    let key = ssh(b, NODE_A, "test -f /root/.ssh/bench_mig || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/bench_mig; cat /root/.ssh/bench_mig.pub", b"", QUICK)?;
    ssh(
        b,
        NODE_B,
        "mkdir -p /root/.ssh; k=$(cat); grep -qF \"$k\" /root/.ssh/authorized_keys 2>/dev/null || echo \"$k\" >> /root/.ssh/authorized_keys",
        key.trim().as_bytes(),
        QUICK,
    )?;
    let script = CRIU_SCRIPT
        .replace("@B@", ADDR_B)
        .replace("@PORT@", &CRIU_PORT.to_string());
    ssh(b, NODE_A, "cat > /root/criu.sh", script.as_bytes(), QUICK)?;
    Ok(())
}

/// Starts the workload on bench-a and waits until it has filled its memory and counts; its
/// pid and last count.
fn start_workload(b: &Bench, mib: u64) -> Result<(u32, u64)> {
    for node in [NODE_A, NODE_B] {
        ssh(
            b,
            node,
            "pkill -KILL -f '^python3 /root/mig.py'; rm -f /root/progress; : > /root/w.out",
            b"",
            QUICK,
        )?;
    }
    let out = ssh(
        b,
        NODE_A,
        &format!("setsid python3 /root/mig.py {mib} </dev/null >/root/w.out 2>&1 & echo $!"),
        b"",
        QUICK,
    )?;
    let pid: u32 = out
        .trim()
        .parse()
        .map_err(|_| anyhow!("no pid from starting the workload: {out}"))?;
    let deadline = Instant::now() + Duration::from_secs(120 + mib);
    loop {
        let count = last_count(b, NODE_A)?;
        if count >= 2 {
            return Ok((pid, count));
        }
        if Instant::now() > deadline {
            let w = ssh(b, NODE_A, "cat /root/w.out", b"", QUICK).unwrap_or_default();
            bail!("the {mib} MiB workload never started counting on {NODE_A}: {w}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn last_count(b: &Bench, node: &str) -> Result<u64> {
    let out = ssh(
        b,
        node,
        "tail -n 1 /root/progress 2>/dev/null; true",
        b"",
        QUICK,
    )?;
    Ok(out.trim().parse().unwrap_or(0))
}

/// Checks that the workload counts on at bench-b from beyond `before`, then ends it there.
fn runs_on_at_b(b: &Bench, before: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    loop {
        let now = last_count(b, NODE_B)?;
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
    ssh(
        b,
        NODE_B,
        "pkill -KILL -f '^python3 /root/mig.py'; true",
        b"",
        QUICK,
    )?;
    Ok(())
}

fn ferry_round(b: &Bench, mib: u64) -> Result<Move> {
    let (pid, _) = start_workload(b, mib)?;
    let before = last_count(b, NODE_A)?;
    let asked = Instant::now();
    // Stop-and-copy, as CRIU's dump and restore are (pre-copy is measured by the live bench).
    let options = control::MigrateOptions {
        mode: ferry::cluster::api::MigrationMode::Stop,
        ..Default::default()
    };
    let job =
        control::migrate(&b.cluster, NODE_A, pid, NODE_B, &options, &mut |_| {}).map_err(|e| {
            anyhow!(
                "ferry migrate {NODE_A}:{pid} {NODE_B}: {e}{}",
                daemon_logs(b)
            )
        })?;
    if job.state != JobState::Done {
        bail!(
            "ferry migrate {NODE_A}:{pid} {NODE_B}: {}{}",
            job.error.unwrap_or_default(),
            daemon_logs(b)
        );
    }
    eprintln!(
        "bench: {mib} MiB ferry: {} pages ({} zero), page stream {:.1} MiB/s, {} ms as `ferry migrate` saw it",
        job.pages_sent,
        job.zero_pages,
        job.throughput_mib_s,
        asked.elapsed().as_millis()
    );
    runs_on_at_b(b, before)?;
    Ok(Move {
        freeze_ms: job.frozen_ms as f64,
        total_ms: job.total_ms as f64,
    })
}

/// The end of both daemons' logs, for a failed move.
fn daemon_logs(b: &Bench) -> String {
    let mut s = String::new();
    for node in [NODE_A, NODE_B] {
        let log = std::fs::read_to_string(b.cluster.dir.daemon_log(node)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        s.push_str(&format!("\n== {node} daemon.log\n"));
        s.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
    }
    s
}

fn criu_round(b: &Bench, mib: u64) -> Result<Move> {
    let (pid, _) = start_workload(b, mib)?;
    let before = last_count(b, NODE_A)?;
    // bench-b's tmpfs holds the pages and then the restored process holds them again.
    let dedup = if 2 * mib + 384 > GUEST_MIB {
        "--auto-dedup"
    } else {
        ""
    };
    let out = ssh(
        b,
        NODE_A,
        &format!("sh /root/criu.sh {pid} {dedup}"),
        b"",
        Duration::from_secs(300 + mib),
    );
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = ssh(b, NODE_A, &format!("kill -KILL {pid}"), b"", QUICK);
            return Err(e);
        }
    };
    let t: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("criu-times "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if t.len() != 5 {
        bail!("no times from CRIU's move: {out}");
    }
    eprintln!(
        "bench: {mib} MiB criu: page server {:.0} ms, dump {:.0} ms, images copied {:.0} ms, restore {:.0} ms",
        (t[1] - t[0]) / 1e6,
        (t[2] - t[1]) / 1e6,
        (t[3] - t[2]) / 1e6,
        (t[4] - t[3]) / 1e6
    );
    runs_on_at_b(b, before)?;
    Ok(Move {
        freeze_ms: (t[4] - t[1]) / 1e6,
        total_ms: (t[4] - t[0]) / 1e6,
    })
}

/// 256 MiB over a loopback connection with the cluster's mutual TLS, `rounds` times each: as
/// ferry's page stream between two vm-memory guests, and as plain writes into a buffer. The
/// figures are payload MiB over the time from the first byte sent to the receiver's answer.
fn stream_inner(tls_dir: &Path, rounds: usize) -> Result<String> {
    use ferry_net::pki::{load_roots, Identity};
    use ferry_net::tls::{client_config, server_config, ClientAuth};
    let roots = load_roots(tls_dir)?;
    let server = server_config(
        roots.clone(),
        &Identity::load(tls_dir, NODE_B)?,
        ClientAuth::Required,
    )?;
    let client = client_config(roots, Some(&Identity::load(tls_dir, NODE_A)?))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (mut tls, mut fy) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        tls.push(rt.block_on(plain_tls_once(server.clone(), client.clone()))?);
        fy.push(rt.block_on(ferry_stream_once(server.clone(), client.clone()))?);
    }
    let (t, f) = (median(tls), median(fy));
    Ok(format!(
        "stream ferry/tls ratio={:.2} ferry_mib_s={f:.1} tls_mib_s={t:.1}",
        f / t
    ))
}

type Tls = tokio_rustls::TlsStream<tokio::net::TcpStream>;

/// A mutual TLS connection over loopback: (client side, server side).
async fn tls_pair(
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(Tls, Tls)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let s = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await?;
        Ok::<_, std::io::Error>(tokio_rustls::TlsStream::from(s))
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(NODE_B.to_string())?;
    let c = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await?;
    let s = accept.await??;
    Ok((tokio_rustls::TlsStream::from(c), s))
}

async fn plain_tls_once(
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut c, mut s) = tls_pair(server, client).await?;
    let data = pattern_buffer(STREAM_MIB << 20);
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; STREAM_MIB << 20];
        s.read_exact(&mut buf).await?;
        s.write_all(b"k").await?;
        s.flush().await?;
        Ok::<_, std::io::Error>(buf[4096])
    });
    let start = Instant::now();
    for chunk in data.chunks(1 << 20) {
        c.write_all(chunk).await?;
    }
    c.flush().await?;
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack).await?;
    let secs = start.elapsed().as_secs_f64();
    if receiver.await?? != data[4096] {
        bail!("the plain TLS stream arrived changed");
    }
    Ok(STREAM_MIB as f64 / secs)
}

async fn ferry_stream_once(
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> Result<f64> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let (mut c, mut s) = tls_pair(server, client).await?;
    let size = STREAM_MIB << 20;
    let source = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])?;
    source.write_slice(&pattern_buffer(size), GuestAddress(0))?;
    let dest = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])?;
    let n = (size / 4096) as u64;
    // Frames in a different order at each end, as a process's pages are.
    let pages: Vec<(u64, u64)> = (0..n).map(|i| (0x7f00_0000_0000 + i * 4096, i)).collect();
    let frames: Vec<u64> = (0..n).map(|i| (i * 7919) % n).collect();
    let timeouts = ferry_migration::Timeouts::default();
    let t2 = timeouts.clone();
    let receiver = tokio::spawn(async move {
        let incoming = ferry_migration::receive(&mut s, &t2)
            .await
            .map_err(|e| anyhow!(e.chain()))?;
        let landed = incoming
            .land(&frames, true, &dest, |_| {})
            .await
            .map_err(|e| anyhow!(e.chain()))?;
        landed
            .finish(Ok(()))
            .await
            .map_err(|e| anyhow!(e.chain()))?;
        Ok::<_, anyhow::Error>(dest)
    });
    let start = Instant::now();
    let stats = ferry_migration::send(&mut c, 1, b"bench", &pages, &source, &timeouts, |_| {})
        .await
        .map_err(|e| anyhow!(e.chain()))?;
    let secs = start.elapsed().as_secs_f64();
    let dest = receiver.await??;
    if stats.pages != n
        || dest.read_obj::<u64>(GuestAddress(4096 * 7919 % (n * 4096)))?
            != source.read_obj::<u64>(GuestAddress(4096))?
    {
        bail!(
            "ferry's page stream moved {} of {n} pages or changed them",
            stats.pages
        );
    }
    Ok(STREAM_MIB as f64 / secs)
}

/// `len` bytes, no page of them zero, every page different.
fn pattern_buffer(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    for (i, page) in v.chunks_mut(4096).enumerate() {
        page[0] = (i & 0xff) as u8 | 1;
        page[1] = (i >> 8) as u8 | 1;
    }
    v
}
