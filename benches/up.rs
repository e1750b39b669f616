//! Cluster start: `ferry up` of 1, 2 and 3 nodes, from the command's start to its exit (every
//! node's agent answering), against launching the same guests with QEMU's microvm one by one.
//!
//! `cargo bench --bench up [-- ROUNDS]` (3 by default). The ferry side runs exactly as a user
//! would, on this machine: a cluster file per size in a temporary directory (cluster `benchup`,
//! 10.79.8.0/24, API ports from 7490 and peer ports from 7590, nodes `bench-1` to `bench-N`,
//! 2 vCPUs and 512 MiB each), `ferry down FILE` first, then `ferry up -q FILE` timed from spawn
//! to exit 0, then `ferry down FILE` (the disks stay between rounds; `--purge` at the very end).
//! One untimed `ferry up` of the three-node file comes first: it makes the cluster's
//! certificates and the nodes' root disks, which the timed rounds then find in place, as the
//! QEMU side does.
//!
//! The QEMU side boots the same guests: the same Debian kernel (its bzImage), initramfs and
//! node root disks (`<cache>/clusters/benchup/nodes/bench-I/root.ext4`), the kernel command
//! line the node daemons use (`ferry.root=/dev/vda ferry.hostname=NAME ferry.ip=ADDR/24
//! ferry.gw=GATEWAY` after `ferry::run::DEFAULT_CMDLINE`), 2 vCPUs, 512 MiB, a TAP on a bridge
//! of the bench's own (`fbenchup0`, same network), vhost-net and vhost-vsock: each guest is
//! started when the previous one's agent answered on vsock, timed from the first launch to the
//! last agent answering. Then every guest is powered off through its agent.
//!
//! Where the local KVM cannot boot a stock kernel, `ferry up` runs its nodes in the nested host,
//! so the QEMU side runs there too (`common::measure_status`); the bench starts a nested host
//! first if none runs (so both VMMs see a warm host) and at the end stops it only if it started
//! it and nothing else uses it. Rounds alternate between the VMMs; the figures are medians. A
//! round that fails is tried once more and marked retried; a figure that could not be measured
//! is printed as such, with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry::nested::NestedHost;

mod common;
use common::{boot_qemu, median, QemuGuest};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const CLUSTER: &str = "benchup";
const SUBNET: &str = "10.79.8.0/24";
const API_PORT: u16 = 7490;
const PEER_PORT: u16 = 7590;
const SIZES: [usize; 3] = [1, 2, 3];
const VCPUS: u32 = 2;
const MEM_MIB: u64 = 512;
/// The bridge of the QEMU side's guests.
const BRIDGE: &str = "fbenchup0";
/// How long `ferry up` may take before the bench stops it.
const UP_LIMIT: Duration = Duration::from_secs(600);
/// How long one QEMU guest's agent may take to answer.
const QEMU_LIMIT: Duration = Duration::from_secs(240);

fn node_name(i: usize) -> String {
    format!("bench-{}", i + 1)
}

/// The address `ferry up` gives node `i` by default (network + 11 + i), written out here.
fn node_addr(i: usize) -> String {
    format!("10.79.8.{}", 11 + i)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--inner") {
        std::process::exit(inner(&args[i + 1..]));
    }
    let rounds: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3).max(1);
    outer(rounds);
}

/// The cluster file of `n` nodes.
fn cluster_file(n: usize) -> String {
    let mut s = format!(
        "# ferry's `up` bench: {n} node(s)\n\
         [cluster]\nname = \"{CLUSTER}\"\nsubnet = \"{SUBNET}\"\n\n\
         [defaults]\nvcpus = {VCPUS}\nmemory = \"{MEM_MIB}M\"\n\n\
         [api]\nlisten = \"127.0.0.1\"\nport = {API_PORT}\npeer_port = {PEER_PORT}\n"
    );
    for i in 0..n {
        s.push_str(&format!(
            "\n[[node]]\nname = \"{}\"\naddress = \"{}\"\n",
            node_name(i),
            node_addr(i)
        ));
    }
    s
}

/// One VMM's rounds of one size.
#[derive(Default)]
struct Figures {
    ms: Vec<f64>,
    /// `round N (why)` for each round that needed a second attempt.
    retried: Vec<String>,
    /// Why the last round that could not be measured failed.
    error: Option<String>,
}

impl Figures {
    /// Keeps round `round`'s outcome; returns its figure as printed.
    fn record(&mut self, round: usize, r: Result<Timed>) -> String {
        match r {
            Ok(t) => {
                self.ms.push(t.ms);
                if let Some(why) = t.retried {
                    self.retried.push(format!("round {round} ({why})"));
                }
                format!("{:.0}", t.ms)
            }
            Err(e) => {
                self.error = Some(format!("round {round}: {e:#}"));
                "not-measured".into()
            }
        }
    }

    fn show(&self) -> String {
        if self.ms.is_empty() {
            "not-measured".into()
        } else {
            format!("{:.0}", median(self.ms.clone()))
        }
    }
}

/// A timed round, and why its first attempt failed if it needed a second.
struct Timed {
    ms: f64,
    retried: Option<String>,
}

/// Stops what the bench brought up, even when it fails: the cluster (`down --purge`), the
/// temporary directory, and the nested host if the bench started it and nobody else uses it.
struct Teardown {
    dir: PathBuf,
    /// The largest cluster file: it names every node.
    file: PathBuf,
    /// The nested host the bench started last, if it did.
    host: Option<NestedHost>,
}

impl Teardown {
    /// Where `ferry up` runs its nodes in the nested host, makes sure one is running, so that
    /// no timed round includes its boot: the one running, or one the bench starts (another
    /// ferry may stop a shared host at any time).
    fn warm_host(&mut self) {
        if ferry::nested::local_kvm_problem().is_none() {
            return;
        }
        match NestedHost::running() {
            Ok(Some(_)) => {}
            Ok(None) => match NestedHost::start(&ferry::nested::HostOptions::default()) {
                Ok(h) => self.host = Some(h),
                Err(e) => eprintln!("bench: start the nested host: {e}"),
            },
            Err(e) => eprintln!("bench: nested host state: {e}"),
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Err(e) = ferry_cmd(&["down", "--purge", "-q"], &self.file, &self.dir) {
            eprintln!("bench: ferry down --purge: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(host) = self.host.take() {
            // Only if it is still the one the bench started, and nobody else uses it now.
            if let Ok(Some(now)) = NestedHost::running() {
                if now.pid() == host.pid() {
                    let _ = host.stop_if_unused();
                }
            }
        }
    }
}

fn outer(rounds: usize) {
    let cache = ferry::debian::cache_dir();
    let image = ferry::image::ensure(&cache, false).unwrap_or_else(|e| panic!("guest image: {e}"));
    let dir = std::env::temp_dir().join(format!("ferry-bench-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the bench's temporary directory");
    let files: Vec<PathBuf> = SIZES
        .iter()
        .map(|&n| {
            let f = dir.join(format!("{CLUSTER}-{n}.toml"));
            std::fs::write(&f, cluster_file(n)).expect("write a cluster file");
            f
        })
        .collect();
    let largest = files.last().unwrap().clone();

    // Both VMMs are measured on a warm nested host where one is needed.
    if let Some(reason) = ferry::nested::local_kvm_problem() {
        eprintln!("bench: {reason}\nbench: both VMMs run inside the nested host");
    }
    let mut teardown = Teardown {
        dir: dir.clone(),
        file: largest.clone(),
        host: None,
    };
    teardown.warm_host();

    // Nothing of the cluster may run; then one untimed `up` makes its certificates and disks.
    ferry_cmd(&["down", "-q"], &largest, &dir).unwrap_or_else(|e| panic!("ferry down: {e:#}"));
    eprintln!("bench: preparing cluster {CLUSTER} (untimed ferry up of 3 nodes: certificates, root disks)");
    match up_round(&largest, &dir) {
        Ok(t) => eprintln!("bench: prepared in {:.1} s", t.ms / 1000.0),
        Err(e) => eprintln!("bench: the preparing ferry up failed: {e:#}"),
    }
    let clusters = cache.join("clusters").join(CLUSTER).join("nodes");
    let disks: Vec<PathBuf> = (0..SIZES[SIZES.len() - 1])
        .map(|i| clusters.join(node_name(i)).join("root.ext4"))
        .collect();

    let mut lines = Vec::new();
    for (&n, file) in SIZES.iter().zip(&files) {
        let (mut f, mut q) = (Figures::default(), Figures::default());
        for round in 1..=rounds {
            // Alternate, so drift in the host affects both VMMs alike.
            teardown.warm_host();
            let a = f.record(round, up_round(file, &dir));
            teardown.warm_host();
            let b = q.record(round, qemu_round(n, &image, &disks[..n]));
            println!("up round={round} nodes={n} ferry_ms={a} qemu_ms={b}");
        }
        for (vmm, x) in [("ferry", &f), ("qemu", &q)] {
            for r in &x.retried {
                println!("# nodes={n}: {vmm}: retried {r}");
            }
            match (&x.error, x.ms.len()) {
                (Some(e), 0) => println!("# nodes={n}: {vmm} not measured: {e}"),
                (Some(e), k) => println!(
                    "# nodes={n}: {vmm}: median of the {k} rounds of {rounds} measured (failed {e})"
                ),
                _ => {}
            }
        }
        let ratio = match (f.ms.is_empty(), q.ms.is_empty()) {
            (false, false) => format!("{:.2}", median(f.ms.clone()) / median(q.ms.clone())),
            _ => "not-measured".into(),
        };
        let mut retried: Vec<String> = Vec::new();
        for (vmm, x) in [("ferry", &f), ("qemu", &q)] {
            if !x.retried.is_empty() {
                retried.push(format!("{vmm} {}", x.retried.len()));
            }
        }
        let of = if f.ms.len() == rounds && q.ms.len() == rounds {
            format!("median of {rounds}")
        } else {
            format!(
                "median of ferry {} and qemu {} measured rounds of {rounds}",
                f.ms.len(),
                q.ms.len()
            )
        };
        let line = format!(
            "up ferry/qemu ratio={ratio} nodes={n} ferry_ms={} qemu_ms={} ({of}){}",
            f.show(),
            q.show(),
            if retried.is_empty() {
                String::new()
            } else {
                format!(" retried: {}", retried.join(", "))
            }
        );
        println!("{line}");
        lines.push(line);
    }
    println!("# summary");
    for l in lines {
        println!("{l}");
    }
}

/// Runs `ferry ARGS FILE`, its output in a log under `dir` (named in the error when it fails).
fn ferry_cmd(args: &[&str], file: &Path, dir: &Path) -> Result<()> {
    let log = dir.join(format!("ferry-{}.log", args[0]));
    let out = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let status = Command::new(FERRY)
        .args(args)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("run {FERRY}"))?;
    if !status.success() {
        bail!("ferry {} exited {status}: {}", args.join(" "), tail(&log));
    }
    Ok(())
}

/// The last lines of a log, on one line.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(6)..].join(" | ")
}

/// `ferry up -q FILE`, timed from spawn to exit 0, then `ferry down FILE`; a second attempt
/// when the first fails.
fn up_round(file: &Path, dir: &Path) -> Result<Timed> {
    let mut first_error = None;
    loop {
        let r = up_once(file, dir);
        if let Err(e) = ferry_cmd(&["down", "-q"], file, dir) {
            eprintln!("bench: {e:#}");
        }
        match (r, first_error) {
            (Ok(ms), first) => return Ok(Timed { ms, retried: first }),
            (Err(e), None) => {
                eprintln!("bench: ferry up: {e:#}; trying once more");
                first_error = Some(format!("{e:#}"));
            }
            (Err(e), Some(_)) => return Err(e),
        }
    }
}

fn up_once(file: &Path, dir: &Path) -> Result<f64> {
    let log = dir.join("ferry-up.log");
    let out = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let t0 = Instant::now();
    let mut child = Command::new(FERRY)
        .args(["up", "-q"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("run {FERRY}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if t0.elapsed() >= UP_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "ferry up still running after {UP_LIMIT:?}; stopped it: {}",
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !status.success() {
        bail!("ferry up exited {status}: {}", tail(&log));
    }
    Ok(ms)
}

/// One QEMU round of `n` guests where a stock kernel boots (in the nested host if need be); a
/// second attempt when the measurement could not run there (its own boots get theirs inside).
fn qemu_round(n: usize, image: &ferry::image::GuestImage, disks: &[PathBuf]) -> Result<Timed> {
    qemu_once(n, image, disks).unwrap_or_else(|e| {
        eprintln!("bench: qemu: {e:#}; trying the round once more");
        let first = format!("{e:#}");
        let t = qemu_once(n, image, disks).and_then(|r| r)?;
        Ok(Timed {
            ms: t.ms,
            retried: Some(match t.retried {
                Some(again) => format!("{first}; then {again}"),
                None => first,
            }),
        })
    })
}

/// [`qemu_round`]'s one attempt: the measurement writes its result to a file in the nested
/// host's writable share. The outer error: the measurement could not run; the inner one: it
/// ran, and its guests failed.
fn qemu_once(
    n: usize,
    image: &ferry::image::GuestImage,
    disks: &[PathBuf],
) -> Result<Result<Timed>> {
    let share = ferry::nested::rw_share_dir();
    std::fs::create_dir_all(&share).with_context(|| format!("create {}", share.display()))?;
    let result = share.join(format!("bench-up-{}.result", std::process::id()));
    let _ = std::fs::remove_file(&result);
    let exe = std::env::current_exe().context("bench executable path")?;
    let mut args = vec![
        exe.to_string_lossy().into_owned(),
        "--inner".into(),
        n.to_string(),
        image.kernel.to_string_lossy().into_owned(),
        image.initrd.to_string_lossy().into_owned(),
        result.to_string_lossy().into_owned(),
    ];
    for d in disks {
        // The disks live under the writable share (<cache>/clusters links into it): their
        // real path is the same inside the nested host.
        let d = d
            .canonicalize()
            .with_context(|| format!("root disk {} (made by ferry up)", d.display()))?;
        args.push(d.to_string_lossy().into_owned());
    }
    // Two attempts of n boots and their power-offs, and some slack: a QEMU whose vCPU thread
    // hung in the nested host's KVM once kept the measurement waiting for it forever.
    let per_attempt = (QEMU_LIMIT + Duration::from_secs(10)) * n as u32 + Duration::from_secs(30);
    let limit = per_attempt * 2 + Duration::from_secs(60);
    let code = common::measure_status(args, Some(limit), |host, args| {
        let mut shared = Vec::new();
        for a in args.iter_mut().skip(6) {
            let file = host.share_writable(Path::new(a.as_str()))?;
            *a = file.path().to_string_lossy().into_owned();
            shared.push(file);
        }
        Ok(shared)
    })
    .context("run the measurement in the nested host")?;
    let text = std::fs::read_to_string(&result).unwrap_or_default();
    let _ = std::fs::remove_file(&result);
    let mut ms = None;
    let (mut retried, mut error) = (None, None);
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("ms", v)) => ms = v.parse::<f64>().ok(),
            Some(("retried", v)) => retried = Some(v.to_string()),
            Some(("error", v)) => error = Some(v.to_string()),
            _ => {}
        }
    }
    match (ms, error) {
        (Some(ms), _) => Ok(Ok(Timed { ms, retried })),
        (None, Some(e)) => Ok(Err(anyhow!("{e}"))),
        (None, None) => Err(anyhow!("the measurement exited {code} without a result")),
    }
}

/// The QEMU measurement: `--inner N BZIMAGE INITRD RESULT DISK...`; writes `ms X` (and
/// `retried WHY`) or `error WHY` to RESULT.
fn inner(a: &[String]) -> i32 {
    let Some(n) = a.first().and_then(|n| n.parse::<usize>().ok()) else {
        eprintln!("bench: --inner needs N BZIMAGE INITRD RESULT DISK...");
        return 2;
    };
    if a.len() != 4 + n {
        eprintln!("bench: --inner needs N BZIMAGE INITRD RESULT and N disks");
        return 2;
    }
    let (bzimage, initrd, result) = (Path::new(&a[1]), Path::new(&a[2]), Path::new(&a[3]));
    let disks: Vec<&Path> = a[4..].iter().map(Path::new).collect();
    let outcome = (|| -> Result<Timed> {
        let net: ferry_net::Ipv4Cidr = format!("{}/24", node_addr(0)).parse()?;
        let bridge =
            ferry_net::Bridge::ensure(BRIDGE, net).with_context(|| format!("bridge {BRIDGE}"))?;
        let r = boot_all(bzimage, initrd, &disks, &bridge);
        let _ = ferry_net::Bridge::remove(BRIDGE);
        r
    })();
    let text = match &outcome {
        Ok(t) => {
            let mut s = format!("ms {}\n", t.ms);
            if let Some(why) = &t.retried {
                s.push_str(&format!("retried {}\n", why.replace('\n', " ")));
            }
            s
        }
        Err(e) => format!("error {}\n", format!("{e:#}").replace('\n', " ")),
    };
    if let Err(e) = std::fs::write(result, text) {
        eprintln!("bench: write {}: {e}", result.display());
        return 1;
    }
    i32::from(outcome.is_err())
}

/// Boots the guests one by one, each once the previous one's agent answered, and powers them
/// off; a second attempt of the whole round when a guest fails.
fn boot_all(
    bzimage: &Path,
    initrd: &Path,
    disks: &[&Path],
    bridge: &ferry_net::Bridge,
) -> Result<Timed> {
    let mut first_error = None;
    loop {
        let mut vms = Vec::new();
        let t0 = Instant::now();
        let r = (|| -> Result<f64> {
            for (i, disk) in disks.iter().enumerate() {
                let cmdline = format!(
                    "{} ferry.root=/dev/vda ferry.hostname={}",
                    ferry::run::DEFAULT_CMDLINE,
                    node_name(i)
                );
                let addr = format!("{}/24", node_addr(i));
                let (vm, rx) = boot_qemu(
                    &QemuGuest {
                        bzimage,
                        initrd,
                        disk,
                        cmdline: &cmdline,
                        addr: &addr,
                        vcpus: VCPUS,
                        mem_mib: MEM_MIB,
                        index: i,
                        bench: "up",
                        limit: QEMU_LIMIT,
                    },
                    bridge,
                )?;
                vms.push(vm);
                let cid = rx
                    .recv_timeout(QEMU_LIMIT + Duration::from_secs(10))
                    .map_err(|_| anyhow!("{} not ready within {QEMU_LIMIT:?}", node_name(i)))?
                    .with_context(|| node_name(i))?;
                eprintln!(
                    "bench: qemu: {} ready after {:.1} s (CID {cid})",
                    node_name(i),
                    t0.elapsed().as_secs_f64()
                );
            }
            Ok(t0.elapsed().as_secs_f64() * 1000.0)
        })();
        // All at once: the guest's kernel syncs before it powers off, and QEMU's microvm
        // does not always exit then, so each gets 10 s before it is killed.
        let asked: Vec<Result<()>> = vms.iter().map(|vm| vm.power_off()).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !vms.iter_mut().all(|vm| vm.exited()) {
            std::thread::sleep(Duration::from_millis(100));
        }
        for (i, (vm, asked)) in vms.iter_mut().zip(asked).enumerate() {
            match asked {
                Err(e) => eprintln!("bench: qemu: {}: power-off: {e:#}", node_name(i)),
                Ok(()) if !vm.exited() => {
                    eprintln!(
                        "bench: qemu: {} still up 10 s after its power-off",
                        node_name(i)
                    )
                }
                Ok(()) => {}
            }
        }
        drop(vms);
        match (r, first_error) {
            (Ok(ms), first) => return Ok(Timed { ms, retried: first }),
            (Err(e), None) => {
                eprintln!("bench: qemu: {e:#}; trying the round once more");
                first_error = Some(format!("{e:#}"));
            }
            (Err(e), Some(_)) => return Err(e),
        }
    }
}
