//! Guest I/O against QEMU: the guest agent's vsock round trip, and virtio-net throughput with
//! Debian's iperf3 (guest to guest on one bridge, and host to guest), ferry's VMM against QEMU's
//! microvm with the same Debian kernel, initramfs and root disks, in the same host.
//!
//! `cargo bench --bench net [-- ROUNDS]` (5 by default). Where the local KVM cannot boot a
//! stock kernel, the measurement runs inside the nested host (started for the bench if none is
//! running), like `boot`. Each VMM boots two guests (2 vCPUs, 512 MiB) from node root disks
//! with iperf3 (`netbench-fa`, `-fb` for ferry, `-qa`, `-qb` for QEMU), all on a bridge of the
//! bench's own (`fbench0`, 10.79.0.0/24), vhost-net and vhost-vsock on both sides. ferry's
//! pair runs every round, then QEMU's: the agent's Ping/Pong over vsock (median of 200), iperf3
//! from guest B to guest A, and from the host (the bridge's address) to guest A; the figures
//! are medians over the rounds. Commands run in the guests
//! through their agents on vsock. Figures are printed, never asserted; one that could not be
//! measured is printed as such, with the reason.
//!
//! QEMU's microvm runs with ACPI here (the boot bench turns it off): this initramfs loads
//! virtio_mmio as a module with busybox's insmod, which never sees the
//! `virtio_mmio.device=` words QEMU puts on the command line without ACPI, so only the DSDT can
//! show it its disk, NIC and vsock. Nothing here needs the serial ports.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_guest_agent::ExecRequest;

mod common;
use common::{boot_qemu, connect, median, QemuGuest, QemuVm};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const MEM_MIB: u64 = 512;
const VCPUS: u32 = 2;
const BOOT_LIMIT: Duration = Duration::from_secs(240);
const BRIDGE: &str = "fbench0";
/// Guests A and B of ferry, then of QEMU.
const ADDRS: [[&str; 2]; 2] = [
    ["10.79.0.2/24", "10.79.0.3/24"],
    ["10.79.0.4/24", "10.79.0.5/24"],
];
const PINGS: usize = 200;
const IPERF_SECS: u32 = 5;
/// The root disks of ferry's guests A and B, then of QEMU's.
const NODES: [&str; 4] = ["netbench-fa", "netbench-fb", "netbench-qa", "netbench-qb"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--inner") {
        // --inner ROUNDS FERRY VMLINUX BZIMAGE INITRD (DISK ROOT-WORDS) x 4
        let a = &args[i + 1..];
        if a.len() != 5 + 2 * NODES.len() {
            eprintln!("bench: --inner needs {} arguments", 5 + 2 * NODES.len());
            std::process::exit(2);
        }
        let inputs = Inputs {
            rounds: a[0].parse().unwrap_or(5),
            ferry: PathBuf::from(&a[1]),
            vmlinux: PathBuf::from(&a[2]),
            bzimage: PathBuf::from(&a[3]),
            initrd: PathBuf::from(&a[4]),
            disks: a[5..].iter().step_by(2).map(PathBuf::from).collect(),
            root_words: a[6..].iter().step_by(2).cloned().collect(),
        };
        std::process::exit(inner(&inputs));
    }
    let rounds: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5).max(1);
    outer(rounds);
}

/// Prepares the image, the root disks and the host's iperf3, then measures where a stock kernel
/// can boot.
fn outer(rounds: usize) -> ! {
    let cache = ferry::debian::cache_dir();
    let image = ferry::image::ensure(&cache, false).unwrap_or_else(|e| panic!("guest image: {e}"));
    let extra = vec!["iperf3".to_string()];
    let roots: Vec<ferry::node::NodeRoot> = NODES
        .iter()
        .map(|n| {
            ferry::node::prepare_root(&cache, n, &extra)
                .unwrap_or_else(|e| panic!("root disk of {n}: {e}"))
        })
        .collect();
    if Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("bench: installing iperf3 on this machine (the host side of host to guest)");
        ferry::debian::install(&["iperf3"], None).unwrap_or_else(|e| panic!("iperf3: {e}"));
    }
    let exe = std::env::current_exe().expect("bench executable path");
    let mut inner_args: Vec<String> = vec![
        exe.to_string_lossy().into_owned(),
        "--inner".into(),
        rounds.to_string(),
        FERRY.into(),
        image.vmlinux.to_string_lossy().into_owned(),
        image.kernel.to_string_lossy().into_owned(),
        image.initrd.to_string_lossy().into_owned(),
    ];
    for root in &roots {
        inner_args.push(root.disk.to_string_lossy().into_owned());
        inner_args.push(root.cmdline.clone());
    }
    common::measure("net", inner_args, |host, inner_args| {
        // ferry runs from a copy of its own in the writable share (like a staged executable,
        // never stale): a staged `ferry-*` copy is removed as soon as another ferry build is
        // staged (other runs in the same host), and guest B boots well after guest A.
        let ferry_copy = RemovedOnDrop(
            ferry::nested::rw_share_dir()
                .join("bin")
                .join(format!("bench-net-ferry-{}", std::process::id())),
        );
        std::fs::create_dir_all(ferry_copy.0.parent().unwrap())?;
        std::fs::copy(FERRY, &ferry_copy.0)
            .with_context(|| format!("copy ferry to {}", ferry_copy.0.display()))?;
        inner_args[3] = ferry_copy.0.to_string_lossy().into_owned();
        // The guests write to their disks: through the nested host's writable share.
        let mut shared = Vec::new();
        for (i, root) in roots.iter().enumerate() {
            let file = host.share_writable(&root.disk)?;
            inner_args[7 + 2 * i] = file.path().to_string_lossy().into_owned();
            shared.push(file);
        }
        Ok((ferry_copy, shared))
    })
}

/// A file removed when the measurement is over.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the measurement boots.
struct Inputs {
    rounds: usize,
    ferry: PathBuf,
    vmlinux: PathBuf,
    bzimage: PathBuf,
    initrd: PathBuf,
    /// Ferry's guests A and B, then QEMU's.
    disks: Vec<PathBuf>,
    /// Kernel command-line words booting each node's root disk.
    root_words: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Ferry,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferry => "ferry",
            Vmm::Qemu => "qemu",
        }
    }
}

/// The measurements, in the order each round takes them.
const METRICS: [&str; 3] = ["vsock round trip", "guest to guest", "host to guest"];

/// Two guests of one VMM, up: A serves iperf3, B is the other guest's client.
struct Pair {
    cids: [u32; 2],
    server: String,
}

fn inner(inputs: &Inputs) -> i32 {
    let mut cleanup = Cleanup::default();
    let bridge = match ADDRS[0][0]
        .parse::<ferry_net::Ipv4Cidr>()
        .map_err(anyhow::Error::from)
        .and_then(|net| Ok(ferry_net::Bridge::ensure(BRIDGE, net)?))
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: bridge {BRIDGE}: {e:#}");
            return 1;
        }
    };
    cleanup.bridge = true;
    // One VMM's guests at a time, each for every round: with all four guests up together,
    // ferry's guest A stopped answering on vsock once QEMU's guests had booted (a cause not
    // yet understood: the nested host was also busy with other runs), so the VMMs are measured
    // one after the other, on the same host, with the same rounds.
    let mut samples = [[(); 3].map(|_| Vec::new()), [(); 3].map(|_| Vec::new())];
    let mut errors: [[Option<String>; 3]; 2] = Default::default();
    let mut boot_errors: [Option<String>; 2] = Default::default();
    let vmms = [Vmm::Ferry, Vmm::Qemu];
    for (v, vmm) in vmms.into_iter().enumerate() {
        let t0 = Instant::now();
        let pair = match boot_pair(vmm, v, inputs, &bridge, &mut cleanup) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("bench: {}: boot failed: {e:#}", vmm.name());
                boot_errors[v] = Some(format!("{e:#}"));
                cleanup.stop_guests();
                continue;
            }
        };
        eprintln!(
            "bench: {}: both guests' agents ready after {:.1} s (CIDs {} and {})",
            vmm.name(),
            t0.elapsed().as_secs_f64(),
            pair.cids[0],
            pair.cids[1]
        );
        for round in 1..=inputs.rounds {
            for (m, what) in METRICS.iter().enumerate() {
                let r = match m {
                    0 => vsock_rtt(pair.cids[0]),
                    1 => iperf_guest_to_guest(&pair),
                    _ => iperf_host_to_guest(&pair),
                };
                let unit = if m == 0 { "us" } else { "Mbit/s" };
                match r {
                    Ok(x) => {
                        eprintln!("bench: round {round}: {} {what} {x:.0} {unit}", vmm.name());
                        samples[v][m].push(x);
                    }
                    Err(e) => {
                        eprintln!("bench: round {round}: {} {what}: {e:#}", vmm.name());
                        errors[v][m] = Some(format!("{e:#}"));
                    }
                }
            }
        }
        cleanup.stop_guests();
    }
    drop(cleanup);

    let figure = |v: usize, m: usize| -> Result<f64, String> {
        if !samples[v][m].is_empty() {
            return Ok(median(samples[v][m].clone()));
        }
        Err(match (&boot_errors[v], &errors[v][m]) {
            (Some(e), _) => format!("the guests did not boot: {e}"),
            (_, Some(e)) => e.clone(),
            _ => "no rounds".into(),
        })
    };
    let show = |r: &Result<f64, String>| match r {
        Ok(v) => format!("{v:.0}"),
        Err(_) => "not-measured".to_string(),
    };
    for (v, vmm) in vmms.iter().enumerate() {
        for (m, what) in METRICS.iter().enumerate() {
            match (figure(v, m), &errors[v][m]) {
                (Err(e), _) => println!("# {}: {what} not measured: {e}", vmm.name()),
                (Ok(_), Some(e)) => println!(
                    "# {}: {what}: median of the {} rounds of {} measured (last error: {e})",
                    vmm.name(),
                    samples[v][m].len(),
                    inputs.rounds
                ),
                _ => {}
            }
        }
    }
    let rounds = inputs.rounds;
    println!(
        "vsock_rtt_us ferry={} qemu={} (agent Ping/Pong, median of {PINGS}; median of {rounds} rounds)",
        show(&figure(0, 0)),
        show(&figure(1, 0))
    );
    println!(
        "net guest_to_guest ferry_mbps={} qemu_mbps={} (iperf3 -t {IPERF_SECS}, receiver; median of {rounds} rounds)",
        show(&figure(0, 1)),
        show(&figure(1, 1))
    );
    println!(
        "net host_to_guest ferry_mbps={} qemu_mbps={} (iperf3 -t {IPERF_SECS}, receiver; median of {rounds} rounds)",
        show(&figure(0, 2)),
        show(&figure(1, 2))
    );
    match (figure(0, 1), figure(1, 1)) {
        (Ok(a), Ok(b)) if b > 0.0 => println!("net ferry/qemu ratio={:.2}", a / b),
        _ => println!("net ferry/qemu ratio=not-measured"),
    }
    0
}

/// Boots `vmm`'s guests A and B (pair `k`: its own addresses and disks) one after the other
/// and waits for their agents.
fn boot_pair(
    vmm: Vmm,
    k: usize,
    inputs: &Inputs,
    bridge: &ferry_net::Bridge,
    cleanup: &mut Cleanup,
) -> Result<Pair> {
    let addrs = ADDRS[k];
    let mut cids = [0u32; 2];
    // Each guest gets a second chance: boots inside the nested host are slow, and a boot that
    // fails there now and then says nothing about the VMM's I/O.
    for i in 0..2 {
        let disk = &inputs.disks[2 * k + i];
        let words = &inputs.root_words[2 * k + i];
        let cmdline = format!("{}{words}", ferry::run::DEFAULT_CMDLINE);
        let mut attempt = 0;
        cids[i] = loop {
            attempt += 1;
            let ready = match vmm {
                Vmm::Ferry => boot_ferry(inputs, disk, &cmdline, addrs[i], cleanup),
                Vmm::Qemu => boot_qemu(
                    &QemuGuest {
                        bzimage: &inputs.bzimage,
                        initrd: &inputs.initrd,
                        disk,
                        cmdline: &cmdline,
                        addr: addrs[i],
                        vcpus: VCPUS,
                        mem_mib: MEM_MIB,
                        index: i,
                        bench: "net",
                        limit: BOOT_LIMIT,
                    },
                    bridge,
                )
                .map(|(vm, rx)| {
                    cleanup.qemu.push(vm);
                    rx
                }),
            }
            .and_then(|rx| {
                rx.recv_timeout(BOOT_LIMIT)
                    .map_err(|_| anyhow!("guest {} not ready within {BOOT_LIMIT:?}", addrs[i]))?
            });
            match ready {
                Ok(cid) => break cid,
                Err(e) if attempt < 2 => {
                    eprintln!(
                        "bench: {}: guest {}: {e:#}; booting it again",
                        vmm.name(),
                        addrs[i]
                    );
                    cleanup.stop_last(vmm);
                }
                Err(e) => return Err(e),
            }
        };
        // Its agent must answer on vsock (ferry's does: ferry waited for it).
        connect(cids[i], BOOT_LIMIT).with_context(|| format!("agent on CID {}", cids[i]))?;
    }
    Ok(Pair {
        cids,
        server: addrs[0].split('/').next().unwrap().to_string(),
    })
}

/// `ferry run` with a root disk and a NIC, running `sleep` in the guest so it stays up; the
/// receiver gets the guest's CID once its agent is ready.
fn boot_ferry(
    inputs: &Inputs,
    disk: &Path,
    cmdline: &str,
    addr: &str,
    cleanup: &mut Cleanup,
) -> Result<mpsc::Receiver<Result<u32>>> {
    let mut child = Command::new(&inputs.ferry)
        .args(["run", "--host", "local", "--vcpus", &VCPUS.to_string()])
        .args(["--memory", &format!("{MEM_MIB}M"), "--kernel"])
        .arg(&inputs.vmlinux)
        .arg("--initrd")
        .arg(&inputs.initrd)
        .arg("--disk")
        .arg(disk)
        .args(["--cmdline", cmdline])
        .args(["--net", &format!("{addr},bridge={BRIDGE}")])
        .args(["--", "sleep", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", inputs.ferry.display()))?;
    let stderr = child.stderr.take().unwrap();
    cleanup.ferry.push(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tail = Vec::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(cid) = line
                    .split("on vsock (CID ")
                    .nth(1)
                    .and_then(|r| r.split(')').next())
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    let _ = tx.send(Ok(cid));
                    sent = true;
                }
            }
            tail.push(line);
        }
        if !sent {
            let last: Vec<String> = tail.iter().rev().take(8).rev().cloned().collect();
            let _ = tx.send(Err(anyhow!(
                "ferry ended before its agent answered on vsock: {}",
                last.join(" | ")
            )));
        }
    });
    Ok(rx)
}

/// Median Ping/Pong round trip on the agent's vsock connection, microseconds.
fn vsock_rtt(cid: u32) -> Result<f64> {
    let mut conn = connect(cid, Duration::from_secs(10))?;
    for _ in 0..20 {
        conn.ping()?;
    }
    let mut us: Vec<f64> = (0..PINGS)
        .map(|_| conn.ping().map(|d| d.as_secs_f64() * 1e6))
        .collect::<Result<_, _>>()?;
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(us[us.len() / 2])
}

/// Sends what a guest command writes, chunk by chunk.
struct ChanWriter(mpsc::Sender<Vec<u8>>);

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.send(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        )],
        cwd: Some("/root".into()),
        stdin: false,
    }
}

/// Starts a one-shot iperf3 server in guest `cid` and waits until it listens. The thread ends
/// when the server does (after one test).
fn start_server(cid: u32, port: u16) -> Result<std::thread::JoinHandle<()>> {
    let mut conn = connect(cid, Duration::from_secs(10))?;
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let port = port.to_string();
        let req = request(&["iperf3", "-s", "-1", "--forceflush", "-p", &port]);
        let mut out = ChanWriter(tx.clone());
        let mut err = ChanWriter(tx);
        let _ = conn.exec(&req, None, &mut out, &mut err);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("listening") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => seen.extend_from_slice(&b),
            Err(_) => bail!(
                "iperf3 -s in CID {cid} not listening: {}",
                String::from_utf8_lossy(&seen).trim()
            ),
        }
    }
    Ok(handle)
}

fn client_args(server: &str, port: u16) -> Vec<String> {
    let secs = IPERF_SECS.to_string();
    let port = port.to_string();
    [
        "iperf3",
        "-p",
        &port,
        "-c",
        server,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A new port for each iperf3 test: a server left behind by a failed test (its client gone)
/// keeps its port, and must not fail the next rounds.
fn next_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(5201);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// iperf3 from guest B to guest A across the bridge, the receiver's Mbit/s.
fn iperf_guest_to_guest(pair: &Pair) -> Result<f64> {
    let port = next_port();
    let server = start_server(pair.cids[0], port)?;
    let mut conn = connect(pair.cids[1], Duration::from_secs(10))?;
    let args = client_args(&pair.server, port);
    // A time limit: a guest that stops answering must not hang the bench (its VMM is stopped
    // at the end, which ends this thread's connection).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = conn.exec(&request(&argv), None, &mut out, &mut err);
        let _ = tx.send(r.map(|code| (code, out, err)));
    });
    let limit = Duration::from_secs(u64::from(IPERF_SECS) + 60);
    let (code, out, err) = rx.recv_timeout(limit).map_err(|_| {
        anyhow!(
            "iperf3 -c in CID {} still running after {limit:?}",
            pair.cids[1]
        )
    })??;
    // Not joined: a server whose client never reached it would wait forever (its own port).
    drop(server);
    receiver_mbps(code, &out, &err)
}

/// iperf3 from this host (the bridge's address) to guest A, the receiver's Mbit/s.
fn iperf_host_to_guest(pair: &Pair) -> Result<f64> {
    let port = next_port();
    let server = start_server(pair.cids[0], port)?;
    let args = client_args(&pair.server, port);
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run iperf3 on the host (Debian's iperf3 package)")?;
    let read_all = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    // A time limit, as for the guest's client: when the guest stops answering mid-test, the
    // host's iperf3 was seen spinning forever on the dead connection.
    let limit = Duration::from_secs(u64::from(IPERF_SECS) + 60);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Not joined: a server whose client never reached it would wait forever (its own port).
    drop(server);
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    match status {
        Some(status) => receiver_mbps(status.code().unwrap_or(-1), &out, &err),
        None => bail!("iperf3 -c on the host still running after {limit:?}; stopped it"),
    }
}

/// The receiver's throughput from iperf3's JSON summary (`end.sum_received.bits_per_second`).
fn receiver_mbps(code: i32, out: &[u8], err: &[u8]) -> Result<f64> {
    let json = String::from_utf8_lossy(out);
    let bps = json
        .split("\"sum_received\"")
        .nth(1)
        .and_then(|r| r.split("\"bits_per_second\":").nth(1))
        .and_then(|r| {
            let num: String = r
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
                .collect();
            num.parse::<f64>().ok()
        });
    match bps {
        Some(bps) if code == 0 => Ok(bps / 1e6),
        _ => {
            let error = json
                .split("\"error\":")
                .nth(1)
                .map(|r| r.lines().next().unwrap_or("").to_string())
                .unwrap_or_default();
            bail!(
                "iperf3 -c exited {code}: {} {}",
                error.trim(),
                String::from_utf8_lossy(err).trim()
            )
        }
    }
}

/// Everything the measurement started, stopped even when it fails: ferry runs get SIGTERM (a
/// clean stop), QEMU is killed, the TAPs and the bench's bridge are deleted.
#[derive(Default)]
struct Cleanup {
    ferry: Vec<Child>,
    /// Each killed, and its TAP deleted, when dropped.
    qemu: Vec<QemuVm>,
    bridge: bool,
}

impl Cleanup {
    /// Stops the guest `vmm` booted last (one that failed to come up).
    fn stop_last(&mut self, vmm: Vmm) {
        match vmm {
            Vmm::Ferry => {
                if let Some(child) = self.ferry.pop() {
                    stop_ferry(child);
                }
            }
            Vmm::Qemu => drop(self.qemu.pop()),
        }
    }

    fn stop_guests(&mut self) {
        for child in self.ferry.drain(..) {
            stop_ferry(child);
        }
        self.qemu.clear();
    }
}

/// SIGTERM, the clean way to end a `ferry run`; SIGKILL if it is still there 20 s later.
fn stop_ferry(mut child: Child) {
    // SAFETY: kill(2) on a child process we started and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(child.try_wait(), Ok(None)) {
        eprintln!(
            "bench: ferry pid {} ignored SIGTERM; killing it",
            child.id()
        );
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.stop_guests();
        if self.bridge {
            let _ = ferry_net::Bridge::remove(BRIDGE);
        }
    }
}
