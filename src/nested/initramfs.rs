//! The outer machine's initramfs: busybox, the static `ferry-agent`, the kernel modules for KVM,
//! the 9p host share and user networking (from the same Debian kernel package as the kernel it
//! boots), and an `/init` that mounts the host's root read-only at `/host` and serves the agent.
//!
//! Built once per input set and cached under `<cache>/nested/<key>/initramfs.cpio`.

use std::path::{Path, PathBuf};

use super::NestedError;
use crate::cpio::CpioWriter;
use crate::kernel::KernelPackage;
use crate::kmod::ModuleIndex;

/// Bump when the layout or the init script changes, so old cached images are not reused.
const FORMAT: u32 = 5;

/// The TCP port the agent listens on inside the outer machine.
pub const AGENT_PORT: u16 = 7377;

/// Mount point of the host's root inside the outer machine; commands run chrooted in it.
pub const HOST_ROOT: &str = "/host";

/// Kernel modules the outer machine loads, in this order; each one's dependencies come first.
pub const MODULES: &[&str] = &[
    // KVM on the emulated AMD SVM.
    "irqbypass",
    "kvm",
    "ccp",
    "kvm_amd",
    // virtio over PCI, the 9p transport and file system (the host's root).
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    // QEMU user networking, to reach the agent.
    "virtio_net",
    // Writable /tmp and /run over the read-only host root.
    "overlay",
    // What ferry's VMs use from their host kernel: vhost-vsock for the guest agent's channel,
    // and TAP devices, bridges and vhost-net for guest networking.
    "vhost_vsock",
    "vhost_net",
    "tun",
    "bridge",
];

/// Everything the image is made of.
pub struct Inputs<'a> {
    pub kernel: &'a KernelPackage,
    pub busybox: &'a crate::debian::Package,
    pub agent: &'a Path,
}

/// FNV-1a, 64 bits: a stable hash for cache keys (not for security).
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate fields, so ("ab", "c") and ("a", "bc") differ.
        self.0 = self.0.rotate_left(5) ^ 0xff;
        self
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> NestedError {
    move |source| NestedError::Io { what, source }
}

/// The cache key for an image from these inputs.
pub fn cache_key(
    kernel_release: &str,
    kernel_version: &str,
    busybox_version: &str,
    agent: &[u8],
) -> String {
    let agent_hash = Fnv::default().write(agent).finish();
    let key = Fnv::default()
        .write(&FORMAT.to_le_bytes())
        .write(kernel_release.as_bytes())
        .write(kernel_version.as_bytes())
        .write(busybox_version.as_bytes())
        .write(&agent_hash.to_le_bytes())
        .write(init_script(&["x"]).as_bytes())
        .write(MODULES.join(",").as_bytes())
        .finish();
    format!("{kernel_release}-{key:016x}")
}

/// The initramfs for these inputs: from the cache if it is there (writing nothing), else built.
pub fn ensure(cache: &Path, inputs: &Inputs<'_>) -> Result<PathBuf, NestedError> {
    let agent = std::fs::read(inputs.agent)
        .map_err(io_err(format!("read the agent {}", inputs.agent.display())))?;
    let key = cache_key(
        &inputs.kernel.release,
        &inputs.kernel.version,
        &inputs.busybox.version,
        &agent,
    );
    let dir = cache.join("nested").join(key);
    let image = dir.join("initramfs.cpio");
    if image.is_file() {
        return Ok(image);
    }
    eprintln!(
        "ferry: nested host: building the outer machine's initramfs (kernel {}) in {}",
        inputs.kernel.release,
        dir.display()
    );
    let index = ModuleIndex::open(&inputs.kernel.modules)?;
    let modules = index.resolve(MODULES)?;

    let mut cpio = CpioWriter::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "host",
        "lib",
        "lib/modules",
        "etc",
    ] {
        cpio.dir(d, 0o755);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    crate::image::add_busybox(&mut cpio, &inputs.busybox.root)?;
    cpio.file("bin/ferry-agent", 0o755, &agent);
    let mut names = Vec::new();
    for m in &modules {
        let file = m.file_name();
        cpio.file(&format!("lib/modules/{file}"), 0o644, &m.load_bytes()?);
        names.push(file);
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    cpio.file("init", 0o755, init_script(&names).as_bytes());

    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let tmp = dir.join(format!(".initramfs.cpio.{}", std::process::id()));
    let write = std::fs::File::create(&tmp).and_then(|f| cpio.write_to(std::io::BufWriter::new(f)));
    if let Err(source) = write.and_then(|_| std::fs::rename(&tmp, &image)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(NestedError::Io {
            what: format!("write {}", image.display()),
            source,
        });
    }
    Ok(image)
}

/// The outer machine's `/init`. `modules` are file names under `/lib/modules`, in load order.
///
/// Kernel command line parameters it reads: `ferry.keep=<dir>` (a host directory under `/tmp` or
/// `/run` that must stay visible in the chroot should those get a plain tmpfs; repeatable) and
/// `ferry.rw=<dir>` (the host directory QEMU shares writable as `ferryrw`: mounted read-write at
/// the same path in the chroot, so files there are written through to the host).
pub fn init_script(modules: &[&str]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
# ferry nested host: the outer machine's init.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
say() { echo "ferry-nested: $*" > /dev/console; }
fail() { say "FAILED: $*"; sleep 1; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say "init started after $(cut -d' ' -f1 /proc/uptime) s"
"#,
    );
    s.push_str("for m in");
    for m in modules {
        s.push(' ');
        s.push_str(m);
    }
    s.push_str(
        r#"; do
    insmod /lib/modules/$m || say "insmod $m failed"
done
[ -e /dev/kvm ] || say "no /dev/kvm: kvm_amd did not load (is the CPU model missing svm?)"

H=/host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot $H || fail "cannot mount the host root over 9p"
mount -t devtmpfs devtmpfs $H/dev || fail "cannot mount /dev in the chroot"
mkdir -p $H/dev/pts $H/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $H/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $H/dev/shm
mount -t proc proc $H/proc || fail "cannot mount /proc in the chroot"
mount -t sysfs sysfs $H/sys
# Writable /tmp and /run: the host's files seen through an overlay with a tmpfs on top, so
# nothing of the host (the ferry cache may live under /tmp) is hidden. Plain tmpfs as fallback,
# keeping the directories named by ferry.keep= visible.
mkdir -p /rw && mount -t tmpfs -o mode=0755 tmpfs /rw
for d in tmp run; do
    mkdir -p /rw/$d/upper /rw/$d/work
    chmod 1777 /rw/$d/upper
    [ $d = run ] && chmod 0755 /rw/$d/upper
    if ! mount -t overlay -o lowerdir=$H/$d,upperdir=/rw/$d/upper,workdir=/rw/$d/work overlay $H/$d 2>/dev/null; then
        say "no overlay for /$d; using a plain tmpfs"
        keep=
        for arg in $(cat /proc/cmdline); do
            case "$arg" in ferry.keep=/$d/*)
                k=${arg#ferry.keep=}
                [ -d "$H$k" ] && mkdir -p "/keep$k" && mount --bind "$H$k" "/keep$k" && keep="$keep $k" ;;
            esac
        done
        mount -t tmpfs -o mode=1777 tmpfs $H/$d || fail "cannot mount /$d in the chroot"
        for k in $keep; do mkdir -p "$H$k" && mount --move "/keep$k" "$H$k"; done
    fi
done

# The writable share, at its host path, over whatever the read-only root or /tmp show there.
for arg in $(cat /proc/cmdline); do
    case "$arg" in ferry.rw=/*)
        d=${arg#ferry.rw=}
        mkdir -p "$H$d" 2>/dev/null
        mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 ferryrw "$H$d" || say "cannot mount the writable share at $d" ;;
    esac
done

ip link set lo up
n=0
while ! ip link set eth0 up 2>/dev/null; do
    n=$((n+1)); [ $n -gt 50 ] && fail "no eth0 (virtio_net)"
    sleep 0.1
done
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

say "agent starting after $(cut -d' ' -f1 /proc/uptime) s"
/bin/ferry-agent --listen 0.0.0.0:"#,
    );
    s.push_str(&AGENT_PORT.to_string());
    s.push_str(
        r#" --chroot $H
say "agent exited with status $?; powering off"
poweroff -f
"#,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_script_loads_modules_in_order_and_serves_the_agent() {
        let s = init_script(&["kvm.ko", "kvm_amd.ko"]);
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("for m in kvm.ko kvm_amd.ko; do"));
        assert!(s.contains("hostroot $H"));
        assert!(s.contains("--listen 0.0.0.0:7377 --chroot $H"));
        // The host's tmpfs mounts come after the 9p mount and never cover the cache dir.
        assert!(s.find("hostroot").unwrap() < s.find("overlay $H/$d").unwrap());
        assert!(!s.contains(".cache"));
        // The writable share is mounted after the overlays, so they do not hide it.
        assert!(s.find("overlay $H/$d").unwrap() < s.find("ferryrw \"$H$d\"").unwrap());
    }

    #[test]
    fn module_list_covers_kvm_9p_and_network() {
        for m in ["kvm_amd", "9p", "9pnet_virtio", "virtio_pci", "virtio_net"] {
            assert!(MODULES.contains(&m), "{m}");
        }
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let base = cache_key("6.1.0-48-amd64", "6.1.172-1", "1:1.35", b"agent");
        assert_eq!(
            base,
            cache_key("6.1.0-48-amd64", "6.1.172-1", "1:1.35", b"agent")
        );
        assert!(base.starts_with("6.1.0-48-amd64-"));
        assert_ne!(
            base,
            cache_key("6.1.0-48-amd64", "6.1.172-2", "1:1.35", b"agent")
        );
        assert_ne!(
            base,
            cache_key("6.1.0-48-amd64", "6.1.172-1", "1:1.36", b"agent")
        );
        assert_ne!(
            base,
            cache_key("6.1.0-48-amd64", "6.1.172-1", "1:1.35", b"agent2")
        );
    }

    #[test]
    fn fnv_separates_fields() {
        let a = Fnv::default().write(b"ab").write(b"c").finish();
        let b = Fnv::default().write(b"a").write(b"bc").finish();
        assert_ne!(a, b);
    }
}
