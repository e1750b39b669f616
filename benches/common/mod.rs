//! What the benches share: running the measurement where a stock kernel can boot (this
//! machine's KVM, or the nested host, started for the bench if none is running and stopped
//! afterwards unless another ferry uses it), medians, and QEMU's microvm booting a node's root
//! disk with a TAP and vhost-vsock, its guest agent reached over vsock.
//!
//! Each bench uses its own part of this module; the benches that move a process between two
//! nodes share [`cluster`] (their cluster, workload and ferry's move) and [`criu`] (CRIU's).
#![allow(dead_code)]

pub mod cluster;
pub mod criu;
pub mod criu_lazy;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry::nested::NestedHost;
use ferry_guest_agent::vsock::VsockStream;
use ferry_guest_agent::AgentConnection;

/// Runs the measurement, `inner_args` (the bench's own executable first), and exits with its
/// status. On this machine's KVM when it can boot a stock kernel; otherwise inside the nested
/// host, from a staged copy of the bench executable, after `prepare` has adapted the
/// arguments to it (staging or sharing files); what `prepare` returns lives until the
/// measurement ends. `bench` names the bench in messages.
pub fn measure<K>(
    bench: &str,
    inner_args: Vec<String>,
    prepare: impl FnOnce(&NestedHost, &mut [String]) -> Result<K>,
) -> ! {
    let code = measure_status(inner_args, None, prepare);
    std::process::exit(
        code.unwrap_or_else(|e| panic!("{bench}: run the measurement in the nested host: {e:#}")),
    );
}

/// [`measure`], returning the measurement's exit status instead of exiting (or why it could
/// not run in the nested host): for a bench that runs several measurements. In the nested
/// host, a measurement still running after `timeout` is ended and is an error.
pub fn measure_status<K>(
    mut inner_args: Vec<String>,
    timeout: Option<Duration>,
    prepare: impl FnOnce(&NestedHost, &mut [String]) -> Result<K>,
) -> Result<i32> {
    let Some(reason) = ferry::nested::local_kvm_problem() else {
        eprintln!("bench: measuring on this machine's KVM");
        let status = Command::new(&inner_args[0])
            .args(&inner_args[1..])
            .status()
            .expect("run the measurement");
        return Ok(status.code().unwrap_or(1));
    };
    eprintln!("bench: {reason}\nbench: measuring both VMMs inside the nested host");
    let (host, started) = match NestedHost::running().expect("nested host state") {
        Some(h) => (h, false),
        None => (
            NestedHost::start(&ferry::nested::HostOptions::default())
                .expect("start the nested host"),
            true,
        ),
    };
    let env = vec![
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_string(),
        ),
        (
            "HOME".to_string(),
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        ),
    ];
    let code = (|| -> Result<i32> {
        let exe = std::path::PathBuf::from(&inner_args[0]);
        inner_args[0] = host.stage_executable(&exe)?.to_string_lossy().into_owned();
        let _keep = prepare(&host, &mut inner_args)?;
        Ok(host.exec_timeout(&inner_args, Path::new("/"), &env, false, timeout)?)
    })();
    if started {
        // Another ferry may have started using the host meanwhile: leave it to them then.
        let _ = host.stop_if_unused();
    }
    code
}

/// The median of `v` (the upper one of an even count); `v` is not empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The port the guest agent listens on over vsock.
pub const AGENT_PORT: u32 = 1024;

/// A guest for [`boot_qemu`]: a node's root disk booted by QEMU's microvm.
pub struct QemuGuest<'a> {
    /// The kernel as a bzImage.
    pub bzimage: &'a Path,
    pub initrd: &'a Path,
    /// The root disk (`/dev/vda`, writable).
    pub disk: &'a Path,
    /// The kernel command line without the network's words (`ferry.ip=`, `ferry.gw=`), which
    /// [`boot_qemu`] appends.
    pub cmdline: &'a str,
    /// The guest's address, `ADDR/PREFIX`, in the bridge's network.
    pub addr: &'a str,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// Tells this process's guests apart (TAP, vsock CID, log files): 0 to 3.
    pub index: usize,
    /// The bench, in the log files' names.
    pub bench: &'a str,
    /// How long the agent may take to answer on vsock.
    pub limit: Duration,
}

/// A QEMU guest [`boot_qemu`] started: killed, and its TAP deleted, when dropped.
pub struct QemuVm {
    child: Child,
    tap: String,
    cid: u32,
}

impl QemuVm {
    /// Asks the guest's agent to power it off (it syncs and remounts its root read-only first,
    /// so the disk is left consistent). QEMU is killed when this is dropped, exited or not.
    pub fn power_off(&self) -> Result<()> {
        Ok(connect(self.cid, Duration::from_secs(10))?.power_off()?)
    }

    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = ip(&["link", "del", "dev", &self.tap]);
    }
}

/// Starts QEMU microvm with the guest's kernel, initramfs, disk and command line, a TAP on
/// `bridge` (vhost-net) and vhost-vsock; the receiver gets its CID once its agent answers
/// (or the error, with QEMU's stderr and the console's last lines).
///
/// microvm runs with ACPI on: an initramfs that loads virtio_mmio as a module with busybox's
/// insmod never sees the `virtio_mmio.device=` words QEMU puts on the command line without
/// ACPI, so only the DSDT can show it its disk, NIC and vsock. Nothing here needs the serial
/// ports.
pub fn boot_qemu(
    guest: &QemuGuest<'_>,
    bridge: &ferry_net::Bridge,
) -> Result<(QemuVm, mpsc::Receiver<Result<u32>>)> {
    let cidr = ferry_net::Ipv4Cidr::parse_guest(guest.addr)?;
    let index = guest.index;
    let tap = format!("fbq{}-{index}", std::process::id() % 100_000);
    ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
    let cid = 3_000_000 + (std::process::id() % 1_000_000) * 4 + index as u32;
    let console =
        std::env::temp_dir().join(format!("ferry-bench-{}-qemu-{index}.log", guest.bench));
    let stderr_log =
        std::env::temp_dir().join(format!("ferry-bench-{}-qemu-{index}.err", guest.bench));
    let started = bridge
        .attach(&tap)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            let mac = cidr
                .mac()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            let stderr_file = std::fs::File::create(&stderr_log)
                .with_context(|| format!("create {}", stderr_log.display()))?;
            let cmdline = format!(
                "{} ferry.ip={cidr} ferry.gw={}",
                guest.cmdline,
                bridge.gateway().addr
            );
            Command::new("qemu-system-x86_64")
                .args(["-M", "microvm,isa-serial=on,rtc=off,acpi=on"])
                .args(["-enable-kvm", "-cpu", "host"])
                .args(["-smp", &guest.vcpus.to_string()])
                .args(["-m", &format!("{}M", guest.mem_mib)])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                ])
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .args(["-chardev", "null,id=agent", "-device"])
                .arg("isa-serial,chardev=agent,iobase=0x2f8,irq=3")
                .arg("-kernel")
                .arg(guest.bzimage)
                .arg("-initrd")
                .arg(guest.initrd)
                .args(["-append", &cmdline])
                .arg("-drive")
                .arg(format!(
                    "file={},if=none,id=d0,format=raw",
                    guest.disk.display()
                ))
                .args(["-device", "virtio-blk-device,drive=d0"])
                .arg("-netdev")
                .arg(format!(
                    "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=on"
                ))
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=n0,mac={mac}"))
                .arg("-device")
                .arg(format!("vhost-vsock-device,guest-cid={cid}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr_file)
                .spawn()
                .context("start qemu-system-x86_64 (ferry host start installs it)")
        });
    let child = match started {
        Ok(child) => child,
        Err(e) => {
            let _ = ip(&["link", "del", "dev", &tap]);
            return Err(e);
        }
    };
    let limit = guest.limit;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = connect(cid, limit).map(|_| cid).map_err(|e| {
            anyhow!(
                "{e:#}; QEMU: {}; console: {}",
                std::fs::read_to_string(&stderr_log)
                    .unwrap_or_default()
                    .trim(),
                ferry::nested::console_tail(&console, 8).replace('\n', " | ")
            )
        });
        let _ = tx.send(r);
    });
    Ok((QemuVm { child, tap, cid }, rx))
}

/// The agent of guest `cid`, retrying until it answers or `limit` passes.
pub fn connect(cid: u32, limit: Duration) -> Result<AgentConnection<VsockStream>> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = VsockStream::connect(cid, AGENT_PORT)
            .map_err(anyhow::Error::from)
            .and_then(|s| {
                Ok(AgentConnection::handshake(
                    s,
                    left.min(Duration::from_secs(10)),
                )?)
            });
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) if left.is_zero() => {
                return Err(e.context(format!("no agent on vsock CID {cid} within {limit:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Runs `ip ARGS` (iproute2), its stderr in the error.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
