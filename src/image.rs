//! The guest image: Debian's unmodified kernel plus an initramfs of Debian's `busybox-static`
//! and the static `ferry-agent`.
//!
//! Images are cached under `<cache>/images/<key>/`, where the key hashes every input (kernel
//! package, busybox version, agent binary, the guest's configuration files and
//! [`IMAGE_FORMAT`]). A cache hit writes nothing, so ferry also works from a read-only cache
//! (inside the nested host); a build happens in a temporary directory renamed into place.
//!
//! Inside the guest, busybox init (PID 1, `/init`) runs `/etc/init.d/rcS` (mounts, hostname),
//! then keeps two things running: `ferry-agent --serial /dev/ttyS1 --vsock 1024` and a root shell on the
//! console, `ttyS0`. `poweroff` and `reboot` go through init to reboot(2).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use crate::cpio::CpioWriter;
use crate::debian::{self, DebianError};
use crate::kernel::KernelPackage;
use crate::kmod::ModuleIndex;

/// Bump when the image layout or build changes in a way the other key inputs do not capture.
pub const IMAGE_FORMAT: u32 = 5;

/// The Debian package the guest's userland comes from.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Kernel modules the guest loads at boot (with their dependencies, resolved from the kernel
/// package): Debian builds every virtio driver as a module. Their files are the ones the
/// initramfs carries for the root disk ([`crate::rootfs::INITRAMFS_MODULES`], a superset), in
/// [`crate::rootfs::INITRAMFS_MODULE_DIR`].
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "virtio_net",
];

/// The file listing the module files `rcS` loads, in load order.
const MODULE_LIST: &str = "etc/ferry-modules";

/// The kernel command line the image is made for: the console is the first serial port.
pub const KERNEL_CMDLINE: &str = "console=ttyS0";

/// Where the agent lives in the guest, and how init starts it.
pub const AGENT_GUEST_PATH: &str = "/sbin/ferry-agent";

/// The target the static agent is built for (explicit, so the static flag does not reach
/// proc-macros and build scripts).
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Flags for a static, reasonably small agent.
const AGENT_RUSTFLAGS: &str = "-C target-feature=+crt-static -C strip=debuginfo";

/// File names inside an image directory.
const INITRD_FILE: &str = "initrd.cpio";
const VMLINUX_FILE: &str = "vmlinux";
const MANIFEST_FILE: &str = "manifest";

/// Errors from building or finding the guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot get a Debian package for the guest image")]
    Debian(#[from] DebianError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "building the static ferry-agent failed ({status}); run `RUSTFLAGS=\"{AGENT_RUSTFLAGS}\" \
         cargo build --release -p ferry-guest-agent --target {AGENT_TARGET}` in {workspace} to \
         see why"
    )]
    AgentBuild { status: String, workspace: PathBuf },
    #[error("{path} is not a statically linked x86-64 ELF executable: {problem}")]
    NotStatic { path: PathBuf, problem: String },
    #[error("`{path} --list-full` gave no applets: {detail}")]
    BusyboxApplets { path: PathBuf, detail: String },
    #[error("the kernel package has no bzImage at {0}")]
    NoKernel(PathBuf),
    #[error(transparent)]
    Extract(#[from] crate::kernel::ExtractError),
    #[error("cannot put the root disk's kernel modules in the initramfs")]
    RootModules(#[from] crate::kmod::KmodError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn progress(msg: std::fmt::Arguments<'_>) {
    eprintln!("ferry: image: {msg}");
}

/// A guest image ready to boot.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The unmodified Debian bzImage (in the package cache).
    pub kernel: PathBuf,
    /// The same kernel decompressed once on the host (the ELF inside the bzImage): what ferry
    /// boots by default, so the guest does not decompress itself at every boot.
    pub vmlinux: PathBuf,
    /// The initramfs, an uncompressed newc cpio archive.
    pub initrd: PathBuf,
    /// The kernel's release, as `uname -r` prints it in the guest.
    pub kernel_release: String,
    /// The cache key: a hash of every input.
    pub key: String,
    /// The image's directory, `<cache>/images/<key>`.
    pub dir: PathBuf,
}

/// Returns the guest image for the current inputs, building it if it is missing, an input
/// changed, or `force_rebuild`. Prints progress lines on stderr.
pub fn ensure(cache: &Path, force_rebuild: bool) -> Result<GuestImage, ImageError> {
    let kernel = KernelPackage::fetch(cache)?;
    if !kernel.vmlinuz.is_file() {
        return Err(ImageError::NoKernel(kernel.vmlinuz));
    }
    let busybox = debian::fetch(BUSYBOX_PACKAGE, cache)?;
    let agent_path = static_agent()?;
    let agent = std::fs::read(&agent_path).map_err(io_err(&agent_path))?;
    let inputs = KeyInputs {
        kernel_package: &kernel.package,
        kernel_version: &kernel.version,
        busybox_version: &busybox.version,
        agent: &agent,
    };
    let key = image_key(&inputs);
    let images = cache.join("images");
    let dir = images.join(&key);
    let image = GuestImage {
        kernel: kernel.vmlinuz.clone(),
        vmlinux: dir.join(VMLINUX_FILE),
        initrd: dir.join(INITRD_FILE),
        kernel_release: kernel.release.clone(),
        key: key.clone(),
        dir: dir.clone(),
    };
    if !force_rebuild
        && dir.join(MANIFEST_FILE).is_file()
        && image.initrd.is_file()
        && image.vmlinux.is_file()
    {
        return Ok(image);
    }
    progress(format_args!(
        "building image {key}: {} {}, {BUSYBOX_PACKAGE} {}, ferry-agent {} bytes",
        kernel.package,
        kernel.version,
        busybox.version,
        agent.len()
    ));
    let modules = ModuleIndex::open(&kernel.modules)?.resolve(GUEST_MODULES)?;
    let module_files: Vec<String> = modules.iter().map(|m| m.file_name()).collect();
    let mut initrd = build_initrd(&busybox.root, &agent, &module_files)?;
    // A second archive (the kernel unpacks concatenated ones): what /init needs for ferry.root=.
    initrd.extend(crate::rootfs::initramfs_modules(&kernel.modules)?);
    let manifest = manifest(&inputs, &key);
    install_dir(&images, &key, |tmp| {
        let path = tmp.join(INITRD_FILE);
        std::fs::write(&path, &initrd).map_err(io_err(&path))?;
        progress(format_args!(
            "decompressing {} once, so guests boot without doing it",
            kernel.package
        ));
        crate::kernel::extract_vmlinux(&kernel.vmlinuz, &tmp.join(VMLINUX_FILE))?;
        // Last, so a directory with a manifest is complete.
        let path = tmp.join(MANIFEST_FILE);
        std::fs::write(&path, &manifest).map_err(io_err(&path))
    })?;
    progress(format_args!(
        "image {key} ready ({} KiB initramfs) in {}",
        initrd.len() / 1024,
        dir.display()
    ));
    Ok(image)
}

/// Everything an image is made from, for its cache key.
#[derive(Debug, Clone, Copy)]
pub struct KeyInputs<'a> {
    /// Kernel package name, e.g. `linux-image-6.1.0-48-amd64`.
    pub kernel_package: &'a str,
    /// Kernel package version.
    pub kernel_version: &'a str,
    /// `busybox-static` package version.
    pub busybox_version: &'a str,
    /// The static agent binary.
    pub agent: &'a [u8],
}

/// The cache key: 16 hex digits of a 64-bit FNV-1a over every input, the guest's files and
/// [`IMAGE_FORMAT`]. Pure: same inputs, same key.
pub fn image_key(inputs: &KeyInputs<'_>) -> String {
    let mut h = Fnv1a::new();
    h.field(&IMAGE_FORMAT.to_le_bytes());
    h.field(inputs.kernel_package.as_bytes());
    h.field(inputs.kernel_version.as_bytes());
    h.field(inputs.busybox_version.as_bytes());
    h.field(inputs.agent);
    for m in crate::rootfs::INITRAMFS_MODULES {
        h.field(m.as_bytes());
    }
    for f in GUEST_FILES {
        h.field(f.path.as_bytes());
        h.field(&f.mode.to_le_bytes());
        h.field(f.contents.as_bytes());
    }
    format!("{:016x}", h.finish())
}

fn manifest(inputs: &KeyInputs<'_>, key: &str) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "key {key}");
    let _ = writeln!(m, "image-format {IMAGE_FORMAT}");
    let _ = writeln!(
        m,
        "kernel {} {}",
        inputs.kernel_package, inputs.kernel_version
    );
    let _ = writeln!(m, "{BUSYBOX_PACKAGE} {}", inputs.busybox_version);
    let mut agent = Fnv1a::new();
    agent.field(inputs.agent);
    let _ = writeln!(
        m,
        "ferry-agent {} bytes, fnv1a {:016x}",
        inputs.agent.len(),
        agent.finish()
    );
    m
}

/// 64-bit FNV-1a; fields are length-prefixed so that ("ab", "c") and ("a", "bc") differ.
pub(crate) struct Fnv1a(u64);

impl Fnv1a {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub(crate) fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

/// Creates `parent/name` atomically: `fill` writes into a fresh temporary directory that is
/// then renamed into place, replacing an older `name`.
fn install_dir(
    parent: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".tmp-{name}-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dest = parent.join(name);
    let old = parent.join(format!(".old-{name}-{pid}"));
    let moved_old = std::fs::rename(&dest, &old).is_ok();
    let result = std::fs::rename(&tmp, &dest).map_err(io_err(&dest));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        if moved_old {
            let _ = std::fs::rename(&old, &dest);
        }
    } else if moved_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    result
}

/// A file the image carries besides busybox and the agent.
struct GuestFile {
    path: &'static str,
    mode: u32,
    contents: &'static str,
}

const INITTAB: &str = "\
# ferry guest: busybox init(8) configuration.
::sysinit:/etc/init.d/rcS
::respawn:/sbin/ferry-agent --serial /dev/ttyS1 --vsock 1024
ttyS0::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
";

const RCS: &str = "\
#!/bin/sh
# ferry guest: run once by init before anything else.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
hostname -F /etc/hostname
ip link set lo up 2>/dev/null
for ko in $(cat /etc/ferry-modules); do
    [ -d /sys/module/${ko%.ko} ] || insmod /lib/modules/root/$ko || echo \"ferry: insmod $ko failed\" > /dev/console
done
# The network, as the host set it up: ferry.ip=ADDR/PREFIX ferry.gw=GATEWAY.
for word in $(cat /proc/cmdline); do
    case $word in
        ferry.ip=*) addr=${word#ferry.ip=} ;;
        ferry.gw=*) gw=${word#ferry.gw=} ;;
    esac
done
if [ -n \"$addr\" ] && [ -e /sys/class/net/eth0 ]; then
    ip addr add $addr dev eth0 && ip link set eth0 up
    [ -n \"$gw\" ] && ip route add default via $gw
fi
";

/// The kernel runs /init (a GuestFile). Without ferry.root= it is busybox init, as before.
/// With ferry.root=DEVICE it boots the root disk (see crate::rootfs).
const INIT: &str = r#"#!/bin/sh
# ferry guest: the initramfs's /init. Without ferry.root= on the kernel command line the
# initramfs is the root and busybox init takes over. With ferry.root=DEVICE: load the root disk's
# modules, mount DEVICE, put this initramfs's agent over the disk's, and switch_root into the
# disk's /sbin/ferry-init.
mount -t proc proc /proc
root=
set -f
for arg in $(cat /proc/cmdline); do
    case $arg in ferry.root=*) root=${arg#ferry.root=} ;; esac
done
set +f
if [ -z "$root" ]; then
    umount /proc
    exec /sbin/init
fi
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
fail() {
    echo "ferry: cannot boot from the root disk $root: $*" > /dev/console
    poweroff -f
}
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
m=/lib/modules/root
while read -r ko; do
    [ -d "/sys/module/${ko%.ko}" ] || insmod "$m/$ko" || echo "ferry: insmod $ko failed" > /dev/console
done < $m/order
i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ $i -le 100 ] || fail "no such block device after 10 s (is a disk attached?)"
    sleep 0.1
done
mkdir -p /newroot
mount -t ext4 "$root" /newroot || fail "mount -t ext4 failed"
[ -x /newroot/sbin/ferry-init ] || fail "it has no /sbin/ferry-init (not a ferry root disk?)"
# The agent is this initramfs's, started as this initramfs's inittab starts it: a node disk is
# kept across ferry upgrades, so its own copy may be older than the host's ferry.
if [ -f /newroot/usr/sbin/ferry-agent ]; then
    mount --bind /sbin/ferry-agent /newroot/usr/sbin/ferry-agent
fi
if [ -f /newroot/usr/lib/ferry/agent ]; then
    { echo '#!/bin/busybox sh'; sed -n 's|^::respawn:/sbin/ferry-agent|exec /usr/sbin/ferry-agent|p' /etc/inittab; } > /ferry-agent.sh
    chmod 755 /ferry-agent.sh
    mount --bind /ferry-agent.sh /newroot/usr/lib/ferry/agent
fi
for fs in dev sys proc; do
    mount --move /$fs /newroot/$fs
done
exec switch_root /newroot /sbin/ferry-init
"#;

const PROFILE: &str = "\
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
export PS1='\\h:\\w\\$ '
";

/// The guest's configuration files (also hashed into the image key).
const GUEST_FILES: &[GuestFile] = &[
    GuestFile {
        path: "init",
        mode: 0o755,
        contents: INIT,
    },
    GuestFile {
        path: "etc/inittab",
        mode: 0o644,
        contents: INITTAB,
    },
    GuestFile {
        path: "etc/init.d/rcS",
        mode: 0o755,
        contents: RCS,
    },
    GuestFile {
        path: "etc/profile",
        mode: 0o644,
        contents: PROFILE,
    },
    GuestFile {
        path: "etc/hostname",
        mode: 0o644,
        contents: "ferry\n",
    },
    GuestFile {
        path: "etc/hosts",
        mode: 0o644,
        contents: "127.0.0.1\tlocalhost ferry\n",
    },
    GuestFile {
        path: "etc/passwd",
        mode: 0o644,
        contents: "root:x:0:0:root:/root:/bin/sh\n",
    },
    GuestFile {
        path: "etc/group",
        mode: 0o644,
        contents: "root:x:0:\n",
    },
];

/// Directories of the guest's root, parents first, with their modes.
const GUEST_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("etc", 0o755),
    ("etc/init.d", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("root", 0o700),
    ("var", 0o755),
    ("mnt", 0o755),
];

/// The initramfs: busybox, the agent, the configuration, the list of kernel module files `rcS`
/// loads (`modules`, in load order; the files themselves come with the root disk's modules),
/// and the device nodes the kernel needs before devtmpfs is mounted (it opens /dev/console for
/// init).
pub fn build_initrd(
    busybox_root: &Path,
    agent: &[u8],
    modules: &[String],
) -> Result<Vec<u8>, ImageError> {
    let mut cpio = CpioWriter::new();
    for (dir, mode) in GUEST_DIRS {
        cpio.dir(dir, *mode);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.char_dev("dev/ttyS0", 0o660, 4, 64);
    cpio.char_dev("dev/ttyS1", 0o660, 4, 65);
    cpio.symlink("var/run", "/run");
    add_busybox(&mut cpio, busybox_root)?;
    cpio.file(AGENT_GUEST_PATH, 0o755, agent);
    for f in GUEST_FILES {
        cpio.file(f.path, f.mode, f.contents.as_bytes());
    }
    let list: String = modules.iter().map(|m| format!("{m}\n")).collect();
    cpio.file(MODULE_LIST, 0o644, list.as_bytes());
    Ok(cpio.finish())
}

/// Adds the `busybox-static` binary at /bin/busybox and a symlink to it for every applet (as
/// `busybox --list-full` names them, e.g. /bin/sh, /sbin/init, /usr/bin/awk), with their
/// directories. `busybox_root` is the unpacked package. Directories may already be in the
/// archive: the kernel accepts a directory twice.
pub fn add_busybox(cpio: &mut CpioWriter, busybox_root: &Path) -> Result<(), ImageError> {
    let binary = busybox_root.join("bin/busybox");
    let bytes = std::fs::read(&binary).map_err(io_err(&binary))?;
    check_static_elf(&bytes).map_err(|problem| ImageError::NotStatic {
        path: binary.clone(),
        problem,
    })?;
    let applets = busybox_applets(&binary)?;
    let mut dirs = BTreeSet::from(["bin".to_string()]);
    for applet in &applets {
        let mut parent = Path::new(applet).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
    }
    // BTreeSet order puts "usr" before "usr/bin": parents first.
    for dir in &dirs {
        cpio.dir(dir, 0o755);
    }
    cpio.file("bin/busybox", 0o755, &bytes);
    for applet in applets.iter().filter(|a| *a != "bin/busybox") {
        cpio.symlink(applet, "/bin/busybox");
    }
    Ok(())
}

/// The applet paths `busybox --list-full` prints, relative, checked to stay inside the root.
fn busybox_applets(binary: &Path) -> Result<Vec<String>, ImageError> {
    let fail = |detail: String| ImageError::BusyboxApplets {
        path: binary.to_path_buf(),
        detail,
    };
    let out = Command::new(binary)
        .arg("--list-full")
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8(out.stdout).map_err(|_| fail("output is not UTF-8".into()))?;
    let applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(bad) = applets.iter().find(|a| {
        !Path::new(a)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    }) {
        return Err(fail(format!("unexpected applet path `{bad}`")));
    }
    if applets.is_empty() {
        return Err(fail("empty list".into()));
    }
    Ok(applets)
}

/// Checks that `elf` is a 64-bit little-endian x86-64 executable without a program
/// interpreter (PT_INTERP), i.e. it runs with no dynamic loader or shared libraries.
pub fn check_static_elf(elf: &[u8]) -> Result<(), String> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    let u16_at =
        |o: usize| -> Option<u16> { Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?)) };
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?)) };
    let u64_at =
        |o: usize| -> Option<u64> { Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?)) };
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf.get(4..6) != Some(&[2, 1]) {
        return Err("not a 64-bit little-endian ELF".into());
    }
    if u16_at(0x12) != Some(EM_X86_64) {
        return Err("not an x86-64 ELF".into());
    }
    let truncated = || "truncated ELF header".to_string();
    let phoff = u64_at(0x20).ok_or_else(truncated)?;
    let phentsize = u16_at(0x36).ok_or_else(truncated)?;
    let phnum = u16_at(0x38).ok_or_else(truncated)?;
    if phnum == 0 {
        return Err("no program headers".into());
    }
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(truncated)?;
        let p_type = u32_at(off).ok_or("truncated program headers")?;
        if p_type == PT_INTERP {
            return Err("it is dynamically linked (has a PT_INTERP program header)".into());
        }
    }
    Ok(())
}

/// The static `ferry-agent` for guests: `$FERRY_AGENT` if set, else the one built from this
/// workspace into `target/guest-agent/`, (re)built with cargo when its sources are newer.
/// Checked to be static.
pub fn static_agent() -> Result<PathBuf, ImageError> {
    let path = match std::env::var_os("FERRY_AGENT") {
        Some(p) => PathBuf::from(p),
        None => build_static_agent()?,
    };
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    check_static_elf(&bytes).map_err(|problem| ImageError::NotStatic {
        path: path.clone(),
        problem,
    })?;
    Ok(path)
}

fn build_static_agent() -> Result<PathBuf, ImageError> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = workspace.join("target").join("guest-agent");
    let binary = target_dir
        .join(AGENT_TARGET)
        .join("release")
        .join("ferry-agent");
    let crate_dir = workspace.join("guest-agent");
    let built = modified(&binary);
    let sources = newest_mtime(&[crate_dir.join("src"), crate_dir.join("Cargo.toml")]);
    if built.is_some() && built >= sources {
        return Ok(binary);
    }
    progress(format_args!(
        "building the static ferry-agent into {}",
        target_dir.display()
    ));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .env("RUSTFLAGS", AGENT_RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "build",
            "--release",
            "-p",
            "ferry-guest-agent",
            "--bin",
            "ferry-agent",
            "--target",
            AGENT_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .status()
        .map_err(|e| ImageError::AgentBuild {
            status: format!("cannot run cargo: {e}"),
            workspace: workspace.to_path_buf(),
        })?;
    if !status.success() {
        return Err(ImageError::AgentBuild {
            status: status.to_string(),
            workspace: workspace.to_path_buf(),
        });
    }
    Ok(binary)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of the files under `paths`.
fn newest_mtime(paths: &[PathBuf]) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
        newest = newest.max(meta.modified().ok());
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(agent: &[u8]) -> KeyInputs<'_> {
        KeyInputs {
            kernel_package: "linux-image-6.1.0-48-amd64",
            kernel_version: "6.1.172-1",
            busybox_version: "1:1.35.0-4+deb12u1+b1",
            agent,
        }
    }

    #[test]
    fn key_is_stable_and_changes_with_every_input() {
        let base = inputs(b"agent");
        let key = image_key(&base);
        assert_eq!(key.len(), 16);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(key, image_key(&inputs(b"agent")));
        let variants = [
            KeyInputs {
                kernel_package: "linux-image-6.1.0-49-amd64",
                ..base
            },
            KeyInputs {
                kernel_version: "6.1.173-1",
                ..base
            },
            KeyInputs {
                busybox_version: "1:1.36.0-1",
                ..base
            },
            KeyInputs {
                agent: b"agenT",
                ..base
            },
            // Moving a byte from one field to the next must change the key too.
            KeyInputs {
                kernel_package: "linux-image-6.1.0-48-amd646",
                kernel_version: ".1.172-1",
                ..base
            },
        ];
        let mut keys: BTreeSet<String> = variants.iter().map(image_key).collect();
        keys.insert(key);
        assert_eq!(keys.len(), variants.len() + 1);
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        let mut h = Fnv1a::new();
        h.bytes(b"");
        assert_eq!(h.finish(), 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv1a::new();
        h.bytes(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv1a::new();
        h.bytes(b"foobar");
        assert_eq!(h.finish(), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn static_elf_check_tells_static_from_dynamic() {
        // This test binary is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_static_elf(&me).unwrap_err().contains("PT_INTERP"));
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
        assert!(check_static_elf(b"\x7fELF\x02\x01").is_err());
        // A minimal static executable: header plus one PT_LOAD.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12] = 62;
        elf[0x20] = 64; // e_phoff
        elf[0x36] = 56; // e_phentsize
        elf[0x38] = 1; // e_phnum
        elf[64] = 1; // PT_LOAD
        assert_eq!(check_static_elf(&elf), Ok(()));
        elf[64] = 3; // PT_INTERP
        assert!(check_static_elf(&elf).is_err());
        // Program headers beyond the file.
        elf[0x20] = 200;
        assert!(check_static_elf(&elf).is_err());
    }

    #[test]
    fn install_dir_replaces_atomically_and_cleans_up_on_failure() {
        let parent = std::env::temp_dir().join(format!("ferry-image-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        install_dir(&parent, "k", |d| {
            std::fs::write(d.join("f"), "one").map_err(io_err(d))
        })
        .unwrap();
        install_dir(&parent, "k", |d| {
            std::fs::write(d.join("f"), "two").map_err(io_err(d))
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(parent.join("k/f")).unwrap(), "two");
        let failed = install_dir(&parent, "k", |d| Err(ImageError::NoKernel(d.to_path_buf())));
        assert!(failed.is_err());
        assert_eq!(std::fs::read_to_string(parent.join("k/f")).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(&parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["k"]);
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn guest_modules_are_among_the_initramfs_modules_and_loaded_by_rcs() {
        for m in GUEST_MODULES {
            assert!(crate::rootfs::INITRAMFS_MODULES.contains(m), "{m}");
        }
        assert!(RCS.contains("$(cat /etc/ferry-modules)"));
        assert!(RCS.contains(&format!("/{}/$ko", crate::rootfs::INITRAMFS_MODULE_DIR)));
        assert_eq!(MODULE_LIST, "etc/ferry-modules");
    }

    #[test]
    fn guest_files_set_up_init_agent_shell_and_path() {
        assert!(INITTAB.contains("::sysinit:/etc/init.d/rcS"));
        assert!(INITTAB.contains("::respawn:/sbin/ferry-agent --serial /dev/ttyS1 --vsock 1024"));
        assert!(INITTAB.contains("ttyS0::respawn:"));
        for mount in [
            "proc /proc",
            "sysfs /sys",
            "devtmpfs /dev",
            "tmpfs /tmp",
            "tmpfs /run",
        ] {
            assert!(RCS.contains(mount), "{mount}");
        }
        assert!(PROFILE.contains("PATH=/sbin:/bin:/usr/sbin:/usr/bin"));
        // Parents come before children.
        for (i, (dir, _)) in GUEST_DIRS.iter().enumerate() {
            if let Some(parent) = Path::new(dir)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
            {
                assert!(GUEST_DIRS[..i].iter().any(|(d, _)| Path::new(d) == parent));
            }
        }
    }

    /// Reads a newc archive: (path, mode, data) per entry.
    fn cpio_entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        let field = |at: usize, i: usize| {
            let s = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
            usize::from_str_radix(s, 16).unwrap()
        };
        loop {
            assert_eq!(&bytes[pos..pos + 6], b"070701");
            let (mode, size, namesize) = (field(pos, 1), field(pos, 6), field(pos, 11));
            let name = &bytes[pos + 110..pos + 110 + namesize - 1];
            let name = String::from_utf8(name.to_vec()).unwrap();
            let data_at = (pos + 110 + namesize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode as u32, bytes[data_at..data_at + size].to_vec()));
            pos = (data_at + size).next_multiple_of(4);
        }
    }

    /// Builds a real image (from the Debian packages in the user's package cache, fetched if
    /// missing) in a scratch cache, then checks its contents and the cache behaviour.
    #[test]
    fn ensure_builds_a_bootable_layout_and_then_hits_the_cache() {
        let cache = std::env::temp_dir().join(format!("ferry-image-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let debs = debian::cache_dir().join("debs");
        std::fs::create_dir_all(&debs).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        std::os::unix::fs::symlink(&debs, cache.join("debs")).unwrap();

        let image = ensure(&cache, false).unwrap();
        assert_eq!(image.dir, cache.join("images").join(&image.key));
        assert!(image.kernel.is_file());
        assert!(image
            .kernel
            .ends_with(format!("vmlinuz-{}", image.kernel_release)));
        let bytes = std::fs::read(&image.initrd).unwrap();
        let entries = cpio_entries(&bytes);
        let find = |p: &str| {
            entries
                .iter()
                .find(|(n, _, _)| n == p)
                .unwrap_or_else(|| panic!("{p} missing"))
        };
        const S_IFMT: u32 = 0o170000;
        const S_IFLNK: u32 = 0o120000;
        const S_IFREG: u32 = 0o100000;
        assert!(find("init").2.starts_with(b"#!/bin/sh\n"));
        assert_eq!(find("init").1 & 0o777, 0o755);
        for link in [
            "sbin/init",
            "bin/sh",
            "sbin/poweroff",
            "sbin/reboot",
            "bin/mount",
        ] {
            let (_, mode, target) = find(link);
            assert_eq!(mode & S_IFMT, S_IFLNK, "{link}");
            assert_eq!(target, b"/bin/busybox", "{link}");
        }
        let (_, mode, busybox) = find("bin/busybox");
        assert_eq!(mode & S_IFMT, S_IFREG);
        check_static_elf(busybox).unwrap();
        let (_, mode, agent) = find("sbin/ferry-agent");
        assert_eq!(mode & 0o7777, 0o755);
        check_static_elf(agent).unwrap();
        assert_eq!(agent, &std::fs::read(static_agent().unwrap()).unwrap());
        assert_eq!(find("etc/inittab").2, INITTAB.as_bytes());
        assert_eq!(find("etc/init.d/rcS").1 & 0o777, 0o755);
        // The virtio modules, dependencies first, as plain ELF objects.
        let list = String::from_utf8(find(MODULE_LIST).2.clone()).unwrap();
        let order: Vec<&str> = list.lines().collect();
        let pos = |m: &str| {
            order
                .iter()
                .position(|f| *f == m)
                .unwrap_or_else(|| panic!("{m} in {order:?}"))
        };
        assert!(pos("virtio.ko") < pos("virtio_mmio.ko"));
        assert!(pos("virtio_ring.ko") < pos("virtio_blk.ko"));
        // The files are in the second archive (the root disk's modules), where rcS looks.
        for f in &order {
            let path = format!("{}/{f}\0", crate::rootfs::INITRAMFS_MODULE_DIR);
            let path = path.as_bytes();
            assert!(bytes.windows(path.len()).any(|w| w == path), "{f}");
        }
        find("dev/console");
        // Every entry's parent directory comes before it.
        let mut seen = BTreeSet::from([String::new()]);
        for (name, mode, _) in &entries {
            let parent = Path::new(name)
                .parent()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert!(seen.contains(&parent), "{name} before {parent}");
            if mode & S_IFMT == 0o040000 {
                seen.insert(name.clone());
            }
        }

        // A hit writes nothing.
        let listing = |dir: &Path| -> Vec<(PathBuf, SystemTime)> {
            let mut v: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .map(|p| (p.clone(), modified(&p).unwrap()))
                .collect();
            v.sort();
            v
        };
        let before = (listing(&cache.join("images")), listing(&image.dir));
        let again = ensure(&cache, false).unwrap();
        assert_eq!(again.key, image.key);
        assert_eq!(
            before,
            (listing(&cache.join("images")), listing(&image.dir))
        );

        // A forced rebuild replaces the image with identical contents.
        let rebuilt = ensure(&cache, true).unwrap();
        assert_eq!(rebuilt.key, image.key);
        assert_eq!(std::fs::read(&rebuilt.initrd).unwrap(), bytes);
        assert_eq!(listing(&cache.join("images")).len(), 1);
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
