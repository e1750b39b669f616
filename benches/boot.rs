//! Boot to agent-ready: ferry's VMM against QEMU's microvm, same Debian kernel and initramfs,
//! same host, alternating runs; and each VMM's own memory overhead.
//!
//! `cargo bench --bench boot [-- RUNS]`. Where the local KVM cannot boot a stock kernel, the
//! measurement runs inside the nested host (started for the bench if none is running), so both
//! VMMs see the same real KVM. QEMU gets both of its ways in, the bzImage and the vmlinux through
//! PVH, and the faster one is compared. Figures are printed, never asserted.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::median;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const MEM_MIB: u64 = 512;
const VCPUS: u32 = 2;
const LIMIT: Duration = Duration::from_secs(240);
/// QEMU's time limit per boot: its boots take well under a minute in the nested host, and one
/// once got stuck there, so a boot that takes this long is killed and tried once more.
const QEMU_LIMIT: Duration = Duration::from_secs(90);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5).max(1);
    if let Some(i) = args.iter().position(|a| a == "--inner") {
        let kernel = PathBuf::from(&args[i + 1]);
        let vmlinux = PathBuf::from(&args[i + 2]);
        let initrd = PathBuf::from(&args[i + 3]);
        inner(runs, &kernel, &vmlinux, &initrd);
        return;
    }
    outer(runs);
}

/// Prepares the image and the host, then measures where a stock kernel can boot.
fn outer(runs: usize) -> ! {
    let image = ferry::image::ensure(&ferry::debian::cache_dir(), false)
        .unwrap_or_else(|e| panic!("guest image: {e}"));
    let exe = std::env::current_exe().expect("bench executable path");
    let inner_args = vec![
        exe.to_string_lossy().into_owned(),
        runs.to_string(),
        "--inner".into(),
        image.kernel.to_string_lossy().into_owned(),
        image.vmlinux.to_string_lossy().into_owned(),
        image.initrd.to_string_lossy().into_owned(),
    ];
    common::measure("boot", inner_args, |_, _| Ok(()))
}

/// One boot's figures.
struct Sample {
    ready_ms: f64,
    overhead_kib: u64,
}

fn inner(runs: usize, bzimage: &Path, vmlinux: &Path, initrd: &Path) {
    let cmdline = ferry::run::DEFAULT_CMDLINE;
    let mut ferry_s = Vec::new();
    let mut qemu_pvh = Vec::new();
    let mut qemu_bz = Vec::new();
    let mut retries = 0;
    for run in 1..=runs {
        // Alternate, so drift in the host affects every VMM alike.
        let f = boot_ferry(vmlinux, initrd);
        let (p, p_retry) = boot_qemu_twice(vmlinux, initrd, cmdline);
        let (b, b_retry) = boot_qemu_twice(bzimage, initrd, cmdline);
        let mut retried = String::new();
        for (way, retry) in [("qemu_pvh", p_retry), ("qemu_bzimage", b_retry)] {
            if let Some(why) = retry {
                retries += 1;
                retried.push_str(&format!(" retried={way} ({why})"));
            }
        }
        println!(
            "boot run={run} ferry_ms={:.0} qemu_pvh_ms={:.0} qemu_bzimage_ms={:.0}{retried}",
            f.ready_ms, p.ready_ms, b.ready_ms
        );
        ferry_s.push(f);
        qemu_pvh.push(p);
        qemu_bz.push(b);
    }
    let ferry_ms = median(ferry_s.iter().map(|s| s.ready_ms).collect());
    let pvh_ms = median(qemu_pvh.iter().map(|s| s.ready_ms).collect());
    let bz_ms = median(qemu_bz.iter().map(|s| s.ready_ms).collect());
    let (qemu_way, qemu_ms, qemu_samples) = if pvh_ms <= bz_ms {
        ("vmlinux through PVH", pvh_ms, &qemu_pvh)
    } else {
        ("bzImage", bz_ms, &qemu_bz)
    };
    let ferry_kib = median_u(ferry_s.iter().map(|s| s.overhead_kib).collect());
    let qemu_kib = median_u(qemu_samples.iter().map(|s| s.overhead_kib).collect());
    println!(
        "boot medians of {runs}: ferry {ferry_ms:.0} ms; qemu microvm {pvh_ms:.0} ms (vmlinux, PVH), {bz_ms:.0} ms (bzImage); compared with QEMU's faster way in: {qemu_way}"
    );
    if retries > 0 {
        println!(
            "# {retries} QEMU boot(s) of {} needed a second attempt (first not ready within {QEMU_LIMIT:?}); the figures are the second attempts'",
            2 * runs
        );
    }
    println!("overhead ferry_kib={ferry_kib} qemu_kib={qemu_kib}");
    println!(
        "boot ferry/qemu ratio={:.2} ferry_ms={ferry_ms:.0} qemu_ms={qemu_ms:.0}",
        ferry_ms / qemu_ms
    );
}

fn median_u(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// ferry: from process start to the agent's hello (which ferry reports on stderr).
fn boot_ferry(vmlinux: &Path, initrd: &Path) -> Sample {
    let t0 = Instant::now();
    let mut child = Command::new(FERRY)
        .args(["run", "--host", "local", "--vcpus", &VCPUS.to_string()])
        .args(["--memory", &format!("{MEM_MIB}M"), "--kernel"])
        .arg(vmlinux)
        .arg("--initrd")
        .arg(initrd)
        .args(["--", "sleep", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("guest agent ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("ferry's guest agent not ready within {LIMIT:?}"));
    let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let overhead_kib = overhead_kib(child.id(), MEM_MIB << 20);
    let status = child.wait().expect("wait for ferry");
    assert!(status.success(), "ferry run failed: {status}");
    Sample {
        ready_ms,
        overhead_kib,
    }
}

/// [`boot_qemu`], once more if the first attempt fails: the sample, and why the first attempt
/// failed if it did. Panics if both fail.
fn boot_qemu_twice(kernel: &Path, initrd: &Path, cmdline: &str) -> (Sample, Option<String>) {
    match boot_qemu(kernel, initrd, cmdline) {
        Ok(s) => (s, None),
        Err(first) => {
            eprintln!("bench: {first}; booting QEMU again");
            match boot_qemu(kernel, initrd, cmdline) {
                Ok(s) => (s, Some(first)),
                Err(second) => panic!("{second} (first attempt: {first})"),
            }
        }
    }
}

/// QEMU microvm: from process start to the agent's first frame on the second serial port,
/// within [`QEMU_LIMIT`].
fn boot_qemu(kernel: &Path, initrd: &Path, cmdline: &str) -> Result<Sample, String> {
    let t0 = Instant::now();
    let mut child: Child = Command::new("qemu-system-x86_64")
        // acpi=off: with ACPI on, QEMU's microvm describes no UART in its DSDT and this kernel
        // loses everything user space writes to the serial ports; the MP table works.
        .args(["-M", "microvm,isa-serial=on,rtc=off,acpi=off"])
        .args(["-enable-kvm", "-cpu", "host"])
        .args(["-smp", &VCPUS.to_string(), "-m", &format!("{MEM_MIB}M")])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "null"])
        .args(["-chardev", "stdio,id=agent", "-device"])
        .arg("isa-serial,chardev=agent,iobase=0x2f8,irq=3")
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64 (ferry host start installs it)");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The agent's hello frame starts with the protocol magic and version.
        let magic = [
            ferry_guest_agent::protocol::MAGIC[0],
            ferry_guest_agent::protocol::MAGIC[1],
            ferry_guest_agent::protocol::PROTOCOL_VERSION,
        ];
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(3).any(|w| w == magic) {
                let _ = tx.send(());
                return;
            }
        }
    });
    let ready = rx.recv_timeout(QEMU_LIMIT);
    let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let overhead_kib = if ready.is_ok() {
        overhead_kib(child.id(), MEM_MIB << 20)
    } else {
        0
    };
    let _ = child.kill();
    let _ = child.wait();
    if ready.is_err() {
        return Err(format!(
            "QEMU's guest agent not ready within {QEMU_LIMIT:?} ({})",
            kernel.display()
        ));
    }
    Ok(Sample {
        ready_ms,
        overhead_kib,
    })
}

/// A VMM process's resident memory minus what its guest has touched: the VMM's own cost.
/// The guest's RAM is the process's largest anonymous mapping of at least the guest's size.
fn overhead_kib(pid: u32, guest_bytes: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut total = 0u64;
    let mut guest = 0u64;
    let mut cur_size = 0u64;
    let mut cur_anon = false;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let mut range = first.split('-');
            let start = u64::from_str_radix(range.next().unwrap_or("0"), 16).unwrap_or(0);
            let end = u64::from_str_radix(range.next().unwrap_or("0"), 16).unwrap_or(0);
            cur_size = end - start;
            cur_anon = f.nth(4).is_none();
        } else if first == "Rss:" {
            let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if cur_anon && cur_size >= guest_bytes && kib > guest {
                guest = kib;
            }
        }
    }
    total - guest
}
