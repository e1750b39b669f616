//! The root disk: a real Debian userland for guests, as an ext4 image they boot into.
//!
//! [`ensure`] builds it from Debian's archive only: `debootstrap --variant=minbase` of
//! [`SUITE`] with [`BASE_PACKAGES`] (what a server user expects: bash, coreutils, procps,
//! iproute2, ping, an ssh server, python3) plus any extra packages, the static `ferry-agent` at
//! [`AGENT_PATH`], and ferry's init at [`INIT_PATH`]. The tree is packed with
//! `mkfs.ext4 -d` into a sparse raw image with [`HEADROOM`] free for the user's writes.
//! Images are cached under `<cache>/rootfs/<key>/root.ext4`; the key hashes every input
//! ([`rootfs_key`]), a cache hit writes nothing, and a build happens in a temporary directory
//! renamed into place.
//!
//! Each node boots a writable copy of its own ([`node_disk`]), made once and kept across reboots
//! of that node, with ssh host keys of its own. [`install_authorized_key`] lets a public key log
//! in as root over ssh; both write into the image with `debugfs`, so no mount is needed.
//!
//! # Boot
//!
//! The guest kernel boots ferry's initramfs as always (see [`crate::image`]). With
//! `ferry.root=/dev/vda` on the kernel command line, the initramfs's `/init` loads the modules
//! of [`INITRAMFS_MODULES`] (stored in the initramfs by [`initramfs_modules`]), mounts the disk,
//! bind-mounts its own `ferry-agent` over the disk's (so the agent always matches the host's
//! ferry, even on a node disk made by an older one) and `switch_root`s into the disk's
//! [`INIT_PATH`]. That script ([`FERRY_INIT`]) mounts the API file systems, sets the hostname
//! (`ferry.hostname=`, default `ferry`) and the network (`ferry.ip=ADDR/PREFIX ferry.gw=GW
//! ferry.dns=ADDR`, when an `eth0` exists), then hands PID 1 to busybox init ([`INITTAB`]),
//! which keeps the agent (on `ttyS1` and vsock), sshd and a root login on the console (`ttyS0`) running,
//! and handles `poweroff` and `reboot`. No systemd: in the nested host a systemd boot takes
//! minutes. Debian's minbase has no init and no `poweroff` at all, so the disk carries Debian's
//! `busybox-static` (1 MiB, a dpkg-managed package) for exactly those duties.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::cpio::CpioWriter;
use crate::debian::DebianError;
use crate::image::{Fnv1a, ImageError};
use crate::kmod::{KmodError, ModuleIndex};

/// Bump when the build changes in a way the other key inputs do not capture.
pub const ROOTFS_FORMAT: u32 = 1;

/// The Debian release the disk is made from.
pub const SUITE: &str = "bookworm";

/// Where debootstrap fetches packages from.
pub const MIRROR: &str = "http://deb.debian.org/debian";

/// Packages on every root disk, on top of debootstrap's minbase.
pub const BASE_PACKAGES: &[&str] = &[
    "bash",
    "busybox-static",
    "ca-certificates",
    "coreutils",
    "iproute2",
    "iputils-ping",
    "openssh-server",
    "procps",
    "python3-minimal",
];

/// Where the agent lives on the disk.
pub const AGENT_PATH: &str = "/usr/sbin/ferry-agent";

/// The disk's init, which the initramfs runs as PID 1 after `switch_root`.
pub const INIT_PATH: &str = "/sbin/ferry-init";

/// The file system label of the disk.
pub const LABEL: &str = "ferry-root";

/// Free space the image has beyond its contents, for the user's writes.
pub const HEADROOM: u64 = 512 << 20;

/// Kernel modules the initramfs carries, and loads before switching to the root disk (their
/// dependencies come along): the virtio transports, the block driver, ext4 and the crc32c it
/// checksums with (requested by name at mount time, which an initramfs without modprobe cannot
/// resolve), and the drivers the guest needs once on the disk, which has no modules of its
/// own: vsock for the agent, virtio-net. Files are named `<canonical name>.ko`.
pub const INITRAMFS_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "vmw_vsock_virtio_transport",
    "virtio_net",
];

/// Where [`initramfs_modules`] puts the modules in the initramfs, with an `order` file listing
/// them in load order (the initramfs's `/init` reads it).
pub const INITRAMFS_MODULE_DIR: &str = "lib/modules/root";

pub const IMAGE_FILE: &str = "root.ext4";
const MANIFEST_FILE: &str = "manifest";
/// Next to a node's disk: the key of the image it was copied from.
const SOURCE_FILE: &str = "root.ext4.source";

/// Errors from building or preparing a root disk.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("building a root disk needs root (debootstrap creates device nodes and chroots)")]
    NotRoot,
    #[error("`{0}` is not a Debian package name (lower-case letters, digits, `+`, `-`, `.`)")]
    BadPackageName(String),
    #[error("not an ssh public key (expected one line like `ssh-ed25519 AAAA... comment`): {0}")]
    BadPublicKey(String),
    #[error("cannot install the tools the root disk is built with")]
    Tools(#[from] DebianError),
    #[error("cannot get the static ferry-agent")]
    Agent(#[from] ImageError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` could not be started: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("debootstrap failed ({status}); its last lines:\n{tail}")]
    Debootstrap { status: String, tail: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Tool {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path} leads outside the root tree through a symlink")]
    Escapes { path: PathBuf },
    #[error("{0}: paths handed to debugfs must not contain quotes, backslashes or newlines")]
    UnsafePath(PathBuf),
    #[error("writing {path} into {image} with debugfs did not take: {detail}")]
    Debugfs {
        image: PathBuf,
        path: String,
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn progress(msg: std::fmt::Arguments<'_>) {
    eprintln!("ferry: rootfs: {msg}");
}

/// A root disk image in the cache (read-only by convention: boot a [`node_disk`] copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootImage {
    /// The ext4 image, `<cache>/rootfs/<key>/root.ext4`.
    pub path: PathBuf,
    /// The cache key: a hash of every input.
    pub key: String,
    /// The packages asked for ([`BASE_PACKAGES`] and the extra ones), sorted; the versions
    /// installed are in the `manifest` next to the image.
    pub packages: Vec<String>,
    /// The image's apparent size (it is sparse: it takes less on disk).
    pub size_bytes: u64,
}

/// Everything a root disk is made from, for its cache key.
#[derive(Debug, Clone, Copy)]
pub struct KeyInputs<'a> {
    pub suite: &'a str,
    pub mirror: &'a str,
    /// Sorted, without duplicates.
    pub packages: &'a [String],
    /// The static agent binary.
    pub agent: &'a [u8],
}

/// The cache key: 16 hex digits of a 64-bit FNV-1a over every input, the files ferry writes
/// into the tree and [`ROOTFS_FORMAT`]. Pure: same inputs, same key.
///
/// Package versions are not part of it: they are resolved by debootstrap during the build, and
/// asking the mirror at every `ensure` would make a cache hit need the network. They are
/// recorded in the manifest; `force` rebuilds from the archive's current versions.
pub fn rootfs_key(inputs: &KeyInputs<'_>) -> String {
    let mut h = Fnv1a::new();
    h.field(b"ferry-rootfs");
    h.field(&ROOTFS_FORMAT.to_le_bytes());
    h.field(inputs.suite.as_bytes());
    h.field(inputs.mirror.as_bytes());
    h.field(&(inputs.packages.len() as u64).to_le_bytes());
    for p in inputs.packages {
        h.field(p.as_bytes());
    }
    h.field(inputs.agent);
    for f in DISK_FILES {
        h.field(f.path.as_bytes());
        h.field(&f.mode.to_le_bytes());
        h.field(f.contents.as_bytes());
    }
    format!("{:016x}", h.finish())
}

/// [`BASE_PACKAGES`] plus `extra`, checked, sorted and without duplicates.
pub fn package_list(extra: &[String]) -> Result<Vec<String>, RootfsError> {
    let mut all = BTreeSet::new();
    for p in BASE_PACKAGES
        .iter()
        .map(|p| p.to_string())
        .chain(extra.iter().cloned())
    {
        let p = p.trim().to_string();
        if !valid_package_name(&p) {
            return Err(RootfsError::BadPackageName(p));
        }
        all.insert(p);
    }
    Ok(all.into_iter().collect())
}

/// Debian policy 5.6.1: at least two characters, lower-case letters, digits, `+`, `-`, `.`,
/// starting with a letter or digit. (Also keeps `,` and spaces out of debootstrap's
/// `--include=`.)
fn valid_package_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(&c))
}

/// Returns the root disk image for the current inputs, building it if it is missing, an input
/// changed, or `force`. Prints progress lines on stderr while building (about a minute).
pub fn ensure(
    cache: &Path,
    extra_packages: &[String],
    force: bool,
) -> Result<RootImage, RootfsError> {
    let packages = package_list(extra_packages)?;
    let agent_path = crate::image::static_agent()?;
    let agent = std::fs::read(&agent_path).map_err(io_err(&agent_path))?;
    let key = rootfs_key(&KeyInputs {
        suite: SUITE,
        mirror: MIRROR,
        packages: &packages,
        agent: &agent,
    });
    let parent = cache.join("rootfs");
    let dir = parent.join(&key);
    let path = dir.join(IMAGE_FILE);
    let cached = |dir: &Path| {
        let meta = std::fs::metadata(dir.join(IMAGE_FILE)).ok()?;
        dir.join(MANIFEST_FILE).is_file().then_some(meta.len())
    };
    if let Some(size_bytes) = cached(&dir).filter(|_| !force) {
        return Ok(RootImage {
            path,
            key,
            packages,
            size_bytes,
        });
    }
    if !crate::sys::is_root() {
        return Err(RootfsError::NotRoot);
    }
    // One build at a time; whoever waited finds the other's image (unless forcing).
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let lock_path = parent.join(".lock");
    let lock = std::fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    if !crate::sys::flock(&lock, libc::LOCK_EX | libc::LOCK_NB).map_err(io_err(&lock_path))? {
        progress(format_args!(
            "waiting for another ferry building a root disk"
        ));
        crate::sys::flock(&lock, libc::LOCK_EX).map_err(io_err(&lock_path))?;
        if let Some(size_bytes) = cached(&dir).filter(|_| !force) {
            return Ok(RootImage {
                path,
                key,
                packages,
                size_bytes,
            });
        }
    }
    ensure_tools()?;
    let started = Instant::now();
    progress(format_args!(
        "building root disk {key}: Debian {SUITE} minbase + {}",
        packages.join(" ")
    ));
    let debs = parent.join("debs");
    std::fs::create_dir_all(&debs).map_err(io_err(&debs))?;
    let size_bytes = install_dir(&parent, &key, |tmp| {
        let tree = tmp.join("tree");
        let result = build(tmp, &tree, &debs, &packages, &agent, &key);
        unmount_under(&tree);
        let _ = std::fs::remove_dir_all(&tree);
        result
    })?;
    progress(format_args!(
        "root disk {key} ready in {:.0} s: {} MiB image ({} MiB free) at {}",
        started.elapsed().as_secs_f64(),
        size_bytes >> 20,
        HEADROOM >> 20,
        path.display()
    ));
    Ok(RootImage {
        path,
        key,
        packages,
        size_bytes,
    })
}

/// Builds into `tmp`: the tree, then the image and the manifest. Returns the image's size.
fn build(
    tmp: &Path,
    tree: &Path,
    debs: &Path,
    packages: &[String],
    agent: &[u8],
    key: &str,
) -> Result<u64, RootfsError> {
    debootstrap(tree, debs, packages)?;
    progress(format_args!(
        "installing ferry-agent and ferry's init, trimming"
    ));
    customize(tree, agent)?;
    let versions = installed_versions(tree)?;
    let image = tmp.join(IMAGE_FILE);
    let size = pack(tree, &image)?;
    let mut m = String::new();
    let _ = writeln!(m, "key {key}");
    let _ = writeln!(m, "rootfs-format {ROOTFS_FORMAT}");
    let _ = writeln!(m, "suite {SUITE} {MIRROR}");
    let _ = writeln!(m, "packages {}", packages.join(" "));
    let mut h = Fnv1a::new();
    h.field(agent);
    let _ = writeln!(
        m,
        "ferry-agent {} bytes, fnv1a {:016x}",
        agent.len(),
        h.finish()
    );
    let _ = writeln!(m, "image {IMAGE_FILE} {size} bytes");
    let _ = writeln!(m, "installed {}:", versions.len());
    for (name, version) in &versions {
        let _ = writeln!(m, "  {name} {version}");
    }
    // Last, so a directory with a manifest is complete.
    let path = tmp.join(MANIFEST_FILE);
    std::fs::write(&path, m).map_err(io_err(&path))?;
    Ok(size)
}

/// Installs debootstrap and e2fsprogs (mkfs.ext4, debugfs) with apt-get when missing.
fn ensure_tools() -> Result<(), RootfsError> {
    let mut missing = Vec::new();
    if find_tool("debootstrap").is_none() {
        missing.push("debootstrap");
    }
    if find_tool("mkfs.ext4").is_none() || find_tool("debugfs").is_none() {
        missing.push("e2fsprogs");
    }
    if !missing.is_empty() {
        crate::debian::install(&missing, None)?;
    }
    Ok(())
}

/// The path of an executable, from `PATH` and the sbin directories (often not in a user's
/// `PATH`).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tool(name: &str) -> Command {
    Command::new(find_tool(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// Runs a command to completion, its output captured; an error carries its stderr.
fn run(cmd: &mut Command) -> Result<String, RootfsError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RootfsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RootfsError::Tool {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs debootstrap into `tree`, with one progress line per stage (it prints one per package).
fn debootstrap(tree: &Path, debs: &Path, packages: &[String]) -> Result<(), RootfsError> {
    let debs = std::path::absolute(debs).map_err(io_err(debs))?;
    let mut cmd = tool("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg("--components=main")
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(SUITE)
        .arg(tree)
        .arg(MIRROR)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    let command = format!("{cmd:?}").replace('"', "");
    let spawn_err = |source| RootfsError::Spawn {
        command: command.clone(),
        source,
    };
    let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
    cmd.stdout(writer.try_clone().map_err(spawn_err)?)
        .stderr(writer);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // The command holds the pipe's write ends: drop them so reading ends with the child.
    drop(cmd);
    let started = Instant::now();
    let mut tail: Vec<String> = Vec::new();
    // debootstrap says "Retrieving X", "Validating X" for every package: one line per kind.
    let mut seen = BTreeSet::new();
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        let line = line.trim_end().to_string();
        if line.is_empty() {
            continue;
        }
        // "I: Retrieving libc6 2.36-9" -> "Retrieving"; warnings and errors are shown as is.
        // Stage headers ("I: Unpacking the base system...") are shown whole, but not the
        // per-package "I: Configuring bash..." lines.
        let this_stage = match line.strip_prefix("I: ") {
            Some(info) if !(info.ends_with("...") && info.split_whitespace().count() > 2) => {
                info.split_whitespace().next().unwrap_or("").to_string()
            }
            _ => line.clone(),
        };
        if seen.insert(this_stage) {
            let what = line.strip_prefix("I: ").unwrap_or(&line);
            progress(format_args!(
                "debootstrap {:>3.0} s: {what}",
                started.elapsed().as_secs_f64()
            ));
        }
        if tail.len() == 30 {
            tail.remove(0);
        }
        tail.push(line);
    }
    let status = child.wait().map_err(spawn_err)?;
    if !status.success() {
        // debootstrap's own log has the details of a failed package step.
        let log = tree.join("debootstrap/debootstrap.log");
        if let Ok(text) = std::fs::read_to_string(&log) {
            let lines: Vec<&str> = text.lines().collect();
            tail.push(format!("--- {}:", log.display()));
            tail.extend(
                lines[lines.len().saturating_sub(20)..]
                    .iter()
                    .map(|l| l.to_string()),
            );
        }
        return Err(RootfsError::Debootstrap {
            status: status.to_string(),
            tail: tail.join("\n"),
        });
    }
    Ok(())
}

/// A file ferry writes into the tree (also hashed into the key).
struct DiskFile {
    path: &'static str,
    mode: u32,
    contents: &'static str,
}

/// The disk's PID 1 (see the module documentation).
pub const FERRY_INIT: &str = r#"#!/bin/busybox sh
# ferry root disk: PID 1, started by the initramfs's /init (switch_root) with the API file
# systems already mounted. Sets the machine up, then hands PID 1 to busybox init (/etc/inittab).
# Kernel command line: ferry.hostname=NAME (default ferry), ferry.ip=ADDR/PREFIX, ferry.gw=GW,
# ferry.dns=ADDR (the network is configured only when an eth0 exists).
# It runs on busybox's shell, whose commands below are busybox applets: in the nested host every
# dynamically linked program costs tens of milliseconds to start (the first one a quarter of a
# second), and this is on the way to the agent.
if [ $$ -ne 1 ]; then
    echo "ferry-init: runs only as PID 1" >&2
    exit 1
fi
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "ferry-init: $*" > /dev/console; }
mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }
[ -e /proc/self ] || mount -t proc -o nosuid,nodev,noexec proc /proc
mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mounted /dev || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mkdir -p /run/lock /run/sshd
: > /run/utmp

hostname=ferry ip= gw= dns=
set -f
for arg in $(cat /proc/cmdline); do
    case $arg in
        ferry.hostname=*) hostname=${arg#*=} ;;
        ferry.ip=*) ip=${arg#*=} ;;
        ferry.gw=*) gw=${arg#*=} ;;
        ferry.dns=*) dns=${arg#*=} ;;
    esac
done
set +f
case $hostname in
    "" | -* | *[!A-Za-z0-9.-]*) say "ignoring bad ferry.hostname=$hostname"; hostname=ferry ;;
esac
echo "$hostname" > /proc/sys/kernel/hostname
if ! grep -q "^127.0.1.1[[:space:]]$hostname\$" /etc/hosts 2>/dev/null; then
    sed -i '/^127\.0\.1\.1[[:space:]]/d' /etc/hosts
    printf '127.0.1.1\t%s\n' "$hostname" >> /etc/hosts
fi

ip link set lo up
if [ -n "$ip" ]; then
    if [ -e /sys/class/net/eth0 ]; then
        ip addr add "$ip" dev eth0 || say "cannot set ferry.ip=$ip on eth0"
        ip link set eth0 up
        if [ -n "$gw" ]; then
            ip route add default via "$gw" || say "cannot route through ferry.gw=$gw"
        fi
    else
        say "ferry.ip=$ip given but there is no eth0"
    fi
fi
if [ -n "$dns" ]; then
    echo "nameserver $dns" > /etc/resolv.conf
fi

exec /bin/busybox init
"#;

/// busybox init's configuration on the disk.
pub const INITTAB: &str = "\
# ferry root disk: busybox init(8), PID 1 after /sbin/ferry-init.
::respawn:/usr/lib/ferry/agent
::respawn:/usr/lib/ferry/sshd
::respawn:/sbin/agetty --autologin root --noclear --noissue ttyS0 115200 linux
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
";

/// Runs the agent for init. The initramfs mounts its own version over it (the agent's arguments
/// as its inittab has them), so that a node disk made by an older ferry still runs the agent
/// the way the host's ferry expects.
const AGENT_SERVICE: &str = "\
#!/bin/busybox sh
# ferry root disk: the agent, respawned by init.
exec /usr/sbin/ferry-agent --serial /dev/ttyS1 --vsock 1024
";

/// Runs sshd for init, making host keys first when the disk has none (a node disk gets its own
/// from [`node_disk`], so this happens only on a disk booted otherwise).
const SSHD_SERVICE: &str = r#"#!/bin/sh
# ferry root disk: sshd in the foreground, respawned by init.
if ! ls /etc/ssh/ssh_host_*_key > /dev/null 2>&1; then
    ssh-keygen -A > /dev/null
fi
mkdir -p /run/sshd
/usr/sbin/sshd -D
sleep 5
"#;

const HOSTS: &str = "\
127.0.0.1\tlocalhost
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
";

const SOURCES_LIST: &str = "\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
";

/// Keeps later `apt-get install`s in the guest as lean as the image.
const DPKG_SLIM: &str = "\
# ferry: no documentation, manual pages or translations in the guest.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
";

const APT_SLIM: &str = "\
APT::Install-Recommends \"false\";
APT::Install-Suggests \"false\";
";

const FSTAB: &str = "\
# ferry: the root file system is mounted by the initramfs (ferry.root= on the kernel command
# line); the API file systems by /sbin/ferry-init.
";

/// Files ferry writes into the tree, relative to it (also hashed into the key).
const DISK_FILES: &[DiskFile] = &[
    DiskFile {
        path: "sbin/ferry-init",
        mode: 0o755,
        contents: FERRY_INIT,
    },
    DiskFile {
        path: "etc/inittab",
        mode: 0o644,
        contents: INITTAB,
    },
    DiskFile {
        path: "usr/lib/ferry/agent",
        mode: 0o755,
        contents: AGENT_SERVICE,
    },
    DiskFile {
        path: "usr/lib/ferry/sshd",
        mode: 0o755,
        contents: SSHD_SERVICE,
    },
    DiskFile {
        path: "etc/hostname",
        mode: 0o644,
        contents: "ferry\n",
    },
    DiskFile {
        path: "etc/hosts",
        mode: 0o644,
        contents: HOSTS,
    },
    DiskFile {
        path: "etc/resolv.conf",
        mode: 0o644,
        contents: "# ferry: set from ferry.dns= on the kernel command line\n",
    },
    DiskFile {
        path: "etc/fstab",
        mode: 0o644,
        contents: FSTAB,
    },
    DiskFile {
        path: "etc/apt/sources.list",
        mode: 0o644,
        contents: SOURCES_LIST,
    },
    DiskFile {
        path: "etc/dpkg/dpkg.cfg.d/ferry-slim",
        mode: 0o644,
        contents: DPKG_SLIM,
    },
    DiskFile {
        path: "etc/apt/apt.conf.d/90ferry-slim",
        mode: 0o644,
        contents: APT_SLIM,
    },
];

/// Commands busybox provides on the disk (Debian's minbase has none of them).
const BUSYBOX_LINKS: &[&str] = &["usr/sbin/poweroff", "usr/sbin/reboot", "usr/sbin/halt"];

/// Puts ferry's files into a debootstrapped tree and trims what a guest does not need.
fn customize(tree: &Path, agent: &[u8]) -> Result<(), RootfsError> {
    put(tree, AGENT_PATH.trim_start_matches('/'), 0o755, agent)?;
    for f in DISK_FILES {
        put(tree, f.path, f.mode, f.contents.as_bytes())?;
    }
    for link in BUSYBOX_LINKS {
        let path = inside(tree, link)?;
        if std::fs::symlink_metadata(&path).is_err() {
            std::os::unix::fs::symlink("/bin/busybox", &path).map_err(io_err(&path))?;
        }
    }
    // Every node gets host keys of its own (node_disk), not copies of the build's.
    remove_matching(&inside(tree, "etc/ssh")?, |n| n.starts_with("ssh_host_"))?;
    // apt's downloads and lists: `apt-get update` in the guest brings fresh ones.
    remove_matching(&inside(tree, "var/cache/apt/archives")?, |n| {
        n.ends_with(".deb")
    })?;
    remove_matching(&inside(tree, "var/cache/apt")?, |n| n.ends_with(".bin"))?;
    remove_matching(&inside(tree, "var/lib/apt/lists")?, |n| {
        n != "partial" && n != "lock"
    })?;
    // What DPKG_SLIM keeps out of later installs.
    let share = inside(tree, "usr/share")?;
    for dir in ["man", "info", "locale"] {
        remove_matching(&share.join(dir), |n| n != "locale.alias")?;
    }
    let doc = share.join("doc");
    if let Ok(entries) = std::fs::read_dir(&doc) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_symlink() || !path.is_dir() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            remove_matching(&path, |n| n != "copyright")?;
        }
    }
    Ok(())
}

/// Removes the entries of `dir` whose names `pick` selects (files, links and whole trees);
/// a missing `dir` is fine.
fn remove_matching(dir: &Path, pick: impl Fn(&str) -> bool) -> Result<(), RootfsError> {
    // Never through a symlink: its target may be outside the tree.
    if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if !pick(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Writes `contents` at `rel` inside `tree` (replacing a file or link there, never writing
/// through it), creating the parent directories.
fn put(tree: &Path, rel: &str, mode: u32, contents: &[u8]) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    let path = inside(tree, rel)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if std::fs::symlink_metadata(&path).is_ok() {
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    std::fs::write(&path, contents).map_err(io_err(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io_err(&path))
}

/// The host path of `rel` inside `tree`, with the symlinks of its parents followed the way the
/// guest would follow them (an absolute target is relative to `tree`), so that writing there
/// never lands outside the tree. The last component is not followed.
fn inside(tree: &Path, rel: &str) -> Result<PathBuf, RootfsError> {
    let escapes = || RootfsError::Escapes {
        path: tree.join(rel),
    };
    let mut todo: Vec<String> = rel_components(rel).ok_or_else(escapes)?;
    todo.reverse();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            done.pop().ok_or_else(escapes)?;
            continue;
        }
        let here: PathBuf = done
            .iter()
            .fold(tree.to_path_buf(), |p, c| p.join(c))
            .join(&part);
        if todo.is_empty() {
            done.push(part);
            break;
        }
        match std::fs::read_link(&here) {
            Ok(target) => {
                links += 1;
                if links > 40 {
                    return Err(escapes());
                }
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    done.clear();
                }
                let mut parts = rel_components(&target).ok_or_else(escapes)?;
                parts.reverse();
                todo.extend(parts);
            }
            Err(_) => done.push(part),
        }
    }
    Ok(done.iter().fold(tree.to_path_buf(), |p, c| p.join(c)))
}

/// The components of a path as strings, `..` kept, `.` and `/` dropped; None for an empty path.
fn rel_components(path: &str) -> Option<Vec<String>> {
    let parts: Vec<String> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_string()),
            _ => None,
        })
        .collect();
    (!parts.is_empty()).then_some(parts)
}

/// (package, version) of every installed package, from the tree's dpkg status file.
fn installed_versions(tree: &Path) -> Result<Vec<(String, String)>, RootfsError> {
    let path = inside(tree, "var/lib/dpkg/status")?;
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    Ok(parse_dpkg_status(&text))
}

fn parse_dpkg_status(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let installed = field("Status").is_some_and(|s| s.ends_with(" installed"));
        if let (true, Some(name), Some(version)) = (installed, field("Package"), field("Version")) {
            out.push((name, version));
        }
    }
    out.sort();
    out
}

/// Packs `tree` into a sparse ext4 image at `image` sized to the contents plus [`HEADROOM`].
/// Returns the image's size.
fn pack(tree: &Path, image: &Path) -> Result<u64, RootfsError> {
    let (bytes, inodes) = tree_usage(tree)?;
    // Room for the metadata (inode tables, bitmaps, the journal) on top of the contents.
    let size = (bytes + bytes / 8 + inodes * 256 + (64 << 20) + HEADROOM).next_multiple_of(1 << 20);
    progress(format_args!(
        "packing {} MiB in {inodes} files into a {} MiB ext4 image",
        bytes >> 20,
        size >> 20
    ));
    let file = std::fs::File::create(image).map_err(io_err(image))?;
    file.set_len(size).map_err(io_err(image))?;
    drop(file);
    run(tool("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", LABEL])
        .args(["-E", "root_owner=0:0"])
        .arg("-d")
        .arg(tree)
        .arg(image))?;
    Ok(size)
}

/// Bytes allocated to the files of `tree` (rounded up to 4 KiB blocks) and how many entries it
/// has. Does not follow symlinks.
fn tree_usage(tree: &Path) -> Result<(u64, u64), RootfsError> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let meta = entry.metadata().map_err(io_err(&entry.path()))?;
            inodes += 1;
            bytes += meta.size().next_multiple_of(4096);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Unmounts whatever a failed debootstrap left mounted inside `tree` (its /proc, /sys), so
/// that removing the tree cannot reach into them.
fn unmount_under(tree: &Path) {
    let Ok(tree) = std::fs::canonicalize(tree) else {
        return;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(&tree))
        .collect();
    // Deepest first.
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
}

/// Creates `parent/name` atomically: `fill` writes into a fresh temporary directory that is
/// then renamed into place, replacing an older `name`.
fn install_dir<T>(
    parent: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> Result<T, RootfsError>,
) -> Result<T, RootfsError> {
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".tmp-{name}-{pid}"));
    unmount_under(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let value = match fill(&tmp) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let dest = parent.join(name);
    let old = parent.join(format!(".old-{name}-{pid}"));
    let moved_old = std::fs::rename(&dest, &old).is_ok();
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        if moved_old {
            let _ = std::fs::rename(&old, &dest);
        }
        return Err(io_err(&dest)(e));
    }
    if moved_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(value)
}

/// The root disk of the node whose state lives in `node_dir`: `node_dir/root.ext4`, a sparse
/// copy of `base` with ssh host keys of its own, made on first use and then kept (the guest's
/// writes survive its reboots) until [`purge_node_disk`]. A node disk made from an older image
/// is kept too, with a note on stderr.
pub fn node_disk(base: &RootImage, node_dir: &Path) -> Result<PathBuf, RootfsError> {
    let dest = node_dir.join(IMAGE_FILE);
    let source = node_dir.join(SOURCE_FILE);
    if dest.is_file() {
        let made_from = std::fs::read_to_string(&source).unwrap_or_default();
        if made_from.trim() != base.key {
            progress(format_args!(
                "{} was made from root image {}, not the current {}; it is kept with its files \
                 (the agent is always the current one). To start over from the current image: \
                 `ferry down --purge` for a cluster's nodes, or remove {} for a `ferry run \
                 --node` one",
                dest.display(),
                if made_from.trim().is_empty() {
                    "?"
                } else {
                    made_from.trim()
                },
                base.key,
                node_dir.display()
            ));
        }
        return Ok(dest);
    }
    std::fs::create_dir_all(node_dir).map_err(io_err(node_dir))?;
    let tmp = node_dir.join(format!(".{IMAGE_FILE}.tmp-{}", std::process::id()));
    let result = sparse_copy(&base.path, &tmp).and_then(|()| install_host_keys(&tmp));
    if let Err(e) = result.and_then(|()| std::fs::rename(&tmp, &dest).map_err(io_err(&dest))) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::write(&source, format!("{}\n", base.key)).map_err(io_err(&source))?;
    Ok(dest)
}

/// Deletes the node's disk (and with it every write the guest made): the next [`node_disk`]
/// copies the current image. Returns whether there was one.
pub fn purge_node_disk(node_dir: &Path) -> Result<bool, RootfsError> {
    let dest = node_dir.join(IMAGE_FILE);
    let _ = std::fs::remove_file(node_dir.join(SOURCE_FILE));
    match std::fs::remove_file(&dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(&dest)(e)),
    }
}

/// Copies `from` to `to`, leaving holes where `from` has blocks of zeros.
fn sparse_copy(from: &Path, to: &Path) -> Result<(), RootfsError> {
    const BLOCK: usize = 4096;
    let mut src = std::fs::File::open(from).map_err(io_err(from))?;
    let len = src.metadata().map_err(io_err(from))?.len();
    let mut dst = std::fs::File::create(to).map_err(io_err(to))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut src, &mut buf).map_err(io_err(from))?;
        if n == 0 {
            break;
        }
        for chunk in buf[..n].chunks(BLOCK) {
            if chunk.iter().all(|&b| b == 0) {
                dst.seek(SeekFrom::Current(chunk.len() as i64))
                    .map_err(io_err(to))?;
            } else {
                dst.write_all(chunk).map_err(io_err(to))?;
            }
        }
        pos += n as u64;
    }
    if pos != len {
        return Err(io_err(from)(std::io::Error::other(
            "the image changed size while being copied",
        )));
    }
    dst.set_len(len).map_err(io_err(to))?;
    dst.sync_all().map_err(io_err(to))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A scratch directory for files handed to debugfs, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Self, RootfsError> {
        let dir = std::env::temp_dir().join(format!("ferry-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Gives the disk image `image` fresh ssh host keys (ed25519, ECDSA, RSA) made with the host's
/// `ssh-keygen`. Without one on the host the guest makes its own at first boot.
fn install_host_keys(image: &Path) -> Result<(), RootfsError> {
    if find_tool("ssh-keygen").is_none() {
        progress(format_args!(
            "no ssh-keygen here: the guest will make its ssh host keys at first boot"
        ));
        return Ok(());
    }
    let scratch = Scratch::new("hostkeys")?;
    let ssh = scratch.0.join("etc/ssh");
    std::fs::create_dir_all(&ssh).map_err(io_err(&ssh))?;
    run(tool("ssh-keygen").arg("-A").arg("-f").arg(&scratch.0))?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&ssh).map_err(io_err(&ssh))? {
        let entry = entry.map_err(io_err(&ssh))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("ssh_host_") {
            let mode = if name.ends_with(".pub") { 0o644 } else { 0o600 };
            files.push((entry.path(), format!("/etc/ssh/{name}"), mode));
        }
    }
    files.sort();
    write_into_image(image, &[], &files)
}

/// Lets `pubkey` (one line of an `authorized_keys` file) log in as root over ssh on the disk
/// image `disk` (a node disk, while its guest is not running): appended to
/// `/root/.ssh/authorized_keys` unless already there.
pub fn install_authorized_key(disk: &Path, pubkey: &str) -> Result<(), RootfsError> {
    let key = pubkey.trim();
    let bad = || RootfsError::BadPublicKey(key.chars().take(60).collect());
    let fields: Vec<&str> = key.split_whitespace().collect();
    let known_type = fields.first().is_some_and(|t| {
        t.starts_with("ssh-") || t.starts_with("ecdsa-sha2-") || t.starts_with("sk-")
    });
    if !known_type || fields.len() < 2 || key.chars().any(|c| c.is_control()) {
        return Err(bad());
    }
    const PATH: &str = "/root/.ssh/authorized_keys";
    replay_journal(disk)?;
    let existing = debugfs_cat(disk, PATH)?.unwrap_or_default();
    if existing.lines().any(|l| l.trim() == key) {
        return Ok(());
    }
    let mut text = existing;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(key);
    text.push('\n');
    let scratch = Scratch::new("authkey")?;
    let local = scratch.0.join("authorized_keys");
    std::fs::write(&local, &text).map_err(io_err(&local))?;
    write_into_image(
        disk,
        &[("/root/.ssh", 0o700)],
        &[(local, PATH.to_string(), 0o600)],
    )
}

/// Brings the ext4 image to a clean state before it is changed offline: a guest that was
/// stopped hard (its VMM killed) leaves a journal to replay, and debugfs neither replays it nor
/// writes reliably past it. `e2fsck -p` replays it and fixes what is safe to fix; exit status 1
/// (errors fixed) is fine, 4 and above is not.
fn replay_journal(image: &Path) -> Result<(), RootfsError> {
    let out = tool("e2fsck")
        .arg("-p")
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RootfsError::Spawn {
            command: "e2fsck".into(),
            source,
        })?;
    match out.status.code() {
        Some(0..=3) => Ok(()),
        _ => Err(RootfsError::Tool {
            command: format!("e2fsck -p {}", image.display()),
            status: out.status.to_string(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
    }
}

/// The contents of `path` in the ext4 image, None if it has no such file.
fn debugfs_cat(image: &Path, path: &str) -> Result<Option<String>, RootfsError> {
    let out = tool("debugfs")
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RootfsError::Spawn {
            command: "debugfs".into(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(RootfsError::Tool {
            command: format!("debugfs -R 'cat {path}' {}", image.display()),
            status: out.status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    if stderr.contains("not found") {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Writes files into the ext4 image with `debugfs -w`: `dirs` (path, mode) are created if
/// missing, then each (local file, path, mode) replaces the file at path, owned by root.
/// Checked by reading every file back.
fn write_into_image(
    image: &Path,
    dirs: &[(&str, u32)],
    files: &[(PathBuf, String, u32)],
) -> Result<(), RootfsError> {
    let quoted = |p: &str| -> Result<String, RootfsError> {
        if p.contains(['"', '\\', '\n']) {
            return Err(RootfsError::UnsafePath(PathBuf::from(p)));
        }
        Ok(format!("\"{p}\""))
    };
    let mut script = String::new();
    for (dir, mode) in dirs {
        let d = quoted(dir)?;
        // mkdir fails harmlessly when the directory exists.
        let _ = writeln!(script, "mkdir {d}");
        let _ = writeln!(script, "set_inode_field {d} mode 0{:o}", 0o040000 | mode);
        let _ = writeln!(script, "set_inode_field {d} uid 0");
        let _ = writeln!(script, "set_inode_field {d} gid 0");
    }
    for (local, path, mode) in files {
        let l = quoted(&local.to_string_lossy())?;
        let p = quoted(path)?;
        let _ = writeln!(script, "rm {p}");
        let _ = writeln!(script, "write {l} {p}");
        let _ = writeln!(script, "set_inode_field {p} mode 0{:o}", 0o100000 | mode);
        let _ = writeln!(script, "set_inode_field {p} uid 0");
        let _ = writeln!(script, "set_inode_field {p} gid 0");
    }
    let scratch = Scratch::new("debugfs")?;
    let cmds = scratch.0.join("commands");
    std::fs::write(&cmds, &script).map_err(io_err(&cmds))?;
    run(tool("debugfs").arg("-w").arg("-f").arg(&cmds).arg(image))?;
    for (local, path, _) in files {
        let want = std::fs::read_to_string(local).map_err(io_err(local))?;
        let got = debugfs_cat(image, path)?;
        if got.as_deref() != Some(want.as_str()) {
            return Err(RootfsError::Debugfs {
                image: image.to_path_buf(),
                path: path.clone(),
                detail: if got.is_none() {
                    "the file is not there".into()
                } else {
                    "it reads back different".into()
                },
            });
        }
    }
    Ok(())
}

/// A cpio archive to append to the guest's initramfs: the modules of [`INITRAMFS_MODULES`] and
/// their dependencies, uncompressed, as `<INITRAMFS_MODULE_DIR>/<name>.ko`, and an `order` file
/// naming them in load order. `modules_dir` is the kernel's `/lib/modules/<release>`.
pub fn initramfs_modules(modules_dir: &Path) -> Result<Vec<u8>, KmodError> {
    let index = ModuleIndex::open(modules_dir)?;
    let modules = index.resolve(INITRAMFS_MODULES)?;
    let mut cpio = CpioWriter::new();
    let mut dir = String::new();
    for part in INITRAMFS_MODULE_DIR.split('/') {
        if !dir.is_empty() {
            dir.push('/');
        }
        dir.push_str(part);
        cpio.dir(&dir, 0o755);
    }
    let mut order = String::new();
    for m in &modules {
        let file = format!("{}.ko", m.name);
        cpio.file(&format!("{dir}/{file}"), 0o644, &m.load_bytes()?);
        order.push_str(&file);
        order.push('\n');
    }
    cpio.file(&format!("{dir}/order"), 0o644, order.as_bytes());
    Ok(cpio.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(packages: &'a [String], agent: &'a [u8]) -> KeyInputs<'a> {
        KeyInputs {
            suite: SUITE,
            mirror: MIRROR,
            packages,
            agent,
        }
    }

    #[test]
    fn key_is_stable_and_changes_with_every_input() {
        let packages = package_list(&[]).unwrap();
        let base = inputs(&packages, b"agent");
        let key = rootfs_key(&base);
        assert_eq!(key.len(), 16);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(key, rootfs_key(&inputs(&packages.clone(), b"agent")));
        let more = package_list(&["htop".to_string()]).unwrap();
        let fewer = packages[1..].to_vec();
        // Moving a byte from one package name to the next must change the key.
        let mut shifted = packages.clone();
        shifted[0].push('x');
        shifted[1].remove(0);
        let variants = [
            KeyInputs {
                suite: "trixie",
                ..base
            },
            KeyInputs {
                mirror: "http://mirror.example/debian",
                ..base
            },
            KeyInputs {
                packages: &more,
                ..base
            },
            KeyInputs {
                packages: &fewer,
                ..base
            },
            KeyInputs {
                packages: &shifted,
                ..base
            },
            KeyInputs {
                agent: b"agenT",
                ..base
            },
        ];
        let mut keys: BTreeSet<String> = variants.iter().map(rootfs_key).collect();
        keys.insert(key);
        assert_eq!(keys.len(), variants.len() + 1);
    }

    #[test]
    fn package_list_sorts_dedups_and_refuses_bad_names() {
        let list = package_list(&["vim-tiny".into(), "bash".into(), " htop ".into()]).unwrap();
        assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        assert!(list.contains(&"htop".to_string()));
        assert!(list.contains(&"python3-minimal".to_string()));
        assert_eq!(list.len(), BASE_PACKAGES.len() + 2);
        // Extra packages that are already base ones do not change the key.
        assert_eq!(
            package_list(&["bash".into()]).unwrap(),
            package_list(&[]).unwrap()
        );
        for bad in [
            "",
            "a",
            "Bash",
            "bash,vim",
            "bash vim",
            "-x",
            "../x",
            "vim=2:9.0",
        ] {
            assert!(
                matches!(
                    package_list(&[bad.into()]),
                    Err(RootfsError::BadPackageName(_))
                ),
                "{bad:?}"
            );
        }
        for good in ["g++", "libc6", "python3.11", "linux-image-6.1.0-56-amd64"] {
            assert!(valid_package_name(good), "{good}");
        }
    }

    #[test]
    fn dpkg_status_gives_installed_versions_only() {
        let status = "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b7\n\
                      Description: x\n continued\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: apt\nStatus: install ok installed\nVersion: 2.6.1\n";
        assert_eq!(
            parse_dpkg_status(status),
            [
                ("apt".to_string(), "2.6.1".to_string()),
                ("bash".to_string(), "5.2.15-2+b7".to_string())
            ]
        );
        assert!(parse_dpkg_status("garbage\n\n\n:").is_empty());
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-rootfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn writes_stay_inside_the_tree_whatever_its_symlinks_say() {
        let tree = scratch("inside");
        std::fs::create_dir_all(tree.join("usr/sbin")).unwrap();
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::os::unix::fs::symlink("usr/sbin", tree.join("sbin")).unwrap();
        // A hostile absolute link: the guest reads it as <tree>/etc, never the host's /etc.
        std::os::unix::fs::symlink("/etc", tree.join("etc/abs")).unwrap();
        std::os::unix::fs::symlink("../../..", tree.join("etc/up")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tree.join("etc/hosts")).unwrap();
        assert_eq!(
            inside(&tree, "sbin/ferry-init").unwrap(),
            tree.join("usr/sbin/ferry-init")
        );
        assert_eq!(inside(&tree, "/etc/abs/x").unwrap(), tree.join("etc/x"));
        assert!(matches!(
            inside(&tree, "etc/up/x"),
            Err(RootfsError::Escapes { .. })
        ));
        assert!(matches!(
            inside(&tree, "../x"),
            Err(RootfsError::Escapes { .. })
        ));
        assert!(inside(&tree, "").is_err());
        // The last component is replaced, not written through.
        put(&tree, "etc/hosts", 0o644, b"127.0.0.1 localhost\n").unwrap();
        assert!(!tree.join("etc/hosts").is_symlink());
        put(&tree, "sbin/ferry-init", 0o755, b"#!/bin/sh\n").unwrap();
        assert!(tree.join("usr/sbin/ferry-init").is_file());
        std::fs::remove_dir_all(&tree).unwrap();
    }

    #[test]
    fn sparse_copy_is_exact_and_leaves_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = scratch("sparse");
        let from = dir.join("a");
        let mut f = std::fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(b"data in the middle").unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let to = dir.join("b");
        sparse_copy(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn scripts_set_up_what_the_guest_needs() {
        assert!(FERRY_INIT.starts_with("#!/bin/busybox sh\n"));
        // Only busybox applets and shell builtins on the way to the agent.
        for dynamic in ["mountpoint", "/usr/bin/", "/usr/sbin/", "/sbin/ip"] {
            assert!(!FERRY_INIT.contains(dynamic), "{dynamic}");
        }
        for needle in [
            "mount -t devpts",
            "tmpfs /run",
            "tmpfs /tmp",
            "ferry.hostname=*",
            "/proc/sys/kernel/hostname",
            "ferry.ip=*",
            "ferry.gw=*",
            "/sys/class/net/eth0",
            "exec /bin/busybox init",
        ] {
            assert!(FERRY_INIT.contains(needle), "{needle}");
        }
        assert!(INITTAB.contains("::respawn:/usr/lib/ferry/agent\n"));
        assert!(AGENT_SERVICE.contains(&format!("exec {AGENT_PATH} --serial /dev/ttyS1")));
        assert!(INITTAB.contains("ttyS0"));
        assert!(INITTAB.contains("/usr/lib/ferry/sshd"));
        assert!(DISK_FILES
            .iter()
            .any(|f| format!("/{}", f.path) == INIT_PATH));
        assert!(SSHD_SERVICE.contains("ssh-keygen -A"));
    }

    #[test]
    fn authorized_keys_refuse_what_is_not_a_public_key() {
        let disk = Path::new("/nonexistent/disk.ext4");
        for bad in [
            "",
            "hello",
            "ssh-ed25519",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            "ssh-ed25519 AAAA\nssh-rsa BBBB",
        ] {
            assert!(
                matches!(
                    install_authorized_key(disk, bad),
                    Err(RootfsError::BadPublicKey(_))
                ),
                "{bad:?}"
            );
        }
    }

    /// Builds the real root disk (debootstrap from deb.debian.org: about 30 s with the packages
    /// already downloaded, a minute without) in a scratch cache, then checks its contents, the
    /// cache, a node copy and an authorized key. FERRY_ROOTFS_TESTS=0 skips it.
    #[test]
    fn ensure_builds_a_debian_root_disk_and_then_hits_the_cache() {
        if std::env::var_os("FERRY_ROOTFS_TESTS").is_some_and(|v| v == "0") {
            eprintln!("skipped: FERRY_ROOTFS_TESTS=0");
            return;
        }
        if !crate::sys::is_root() {
            eprintln!("skipped: building a root disk needs root");
            return;
        }
        let cache = scratch("cache");
        // Share the downloaded packages with the user's cache (debootstrap --cache-dir).
        let debs = crate::debian::cache_dir().join("rootfs/debs");
        std::fs::create_dir_all(&debs).unwrap();
        std::fs::create_dir_all(cache.join("rootfs")).unwrap();
        std::os::unix::fs::symlink(&debs, cache.join("rootfs/debs")).unwrap();
        let started = Instant::now();
        let image = ensure(&cache, &[], false).unwrap();
        eprintln!(
            "built in {:.0} s, {} MiB ({} MiB allocated)",
            started.elapsed().as_secs_f64(),
            image.size_bytes >> 20,
            {
                use std::os::unix::fs::MetadataExt;
                (std::fs::metadata(&image.path).unwrap().blocks() * 512) >> 20
            }
        );
        assert_eq!(
            image.path,
            cache.join("rootfs").join(&image.key).join(IMAGE_FILE)
        );
        assert!(image.size_bytes > HEADROOM);
        let stat = |img: &Path, p: &str| {
            let out = Command::new("debugfs")
                .arg("-R")
                .arg(format!("stat {p}"))
                .arg(img)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                text.contains("Inode:"),
                "{p} missing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            text
        };
        for p in [
            "/usr/sbin/ferry-agent",
            "/usr/sbin/ferry-init",
            "/usr/sbin/sshd",
            "/usr/bin/python3",
            "/usr/bin/bash",
            "/usr/bin/busybox",
            "/usr/sbin/poweroff",
            "/etc/inittab",
        ] {
            stat(&image.path, p);
        }
        assert!(stat(&image.path, "/usr/sbin/ferry-agent").contains("Mode:  0755"));
        assert_eq!(
            debugfs_cat(&image.path, "/etc/inittab").unwrap().as_deref(),
            Some(INITTAB)
        );
        assert_eq!(
            debugfs_cat(&image.path, "/etc/ssh/ssh_host_ed25519_key").unwrap(),
            None
        );
        let manifest = std::fs::read_to_string(image.path.with_file_name(MANIFEST_FILE)).unwrap();
        assert!(manifest.contains("\n  openssh-server "), "{manifest}");

        // A hit writes nothing.
        let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        let before = (mtime(&image.path), mtime(&cache.join("rootfs")));
        let again = ensure(&cache, &[], false).unwrap();
        assert_eq!(again, image);
        assert_eq!(before, (mtime(&image.path), mtime(&cache.join("rootfs"))));

        // A node copy: its own host keys, kept until purged.
        let node = cache.join("node-1");
        let disk = node_disk(&image, &node).unwrap();
        let key = debugfs_cat(&disk, "/etc/ssh/ssh_host_ed25519_key.pub")
            .unwrap()
            .unwrap();
        assert!(key.starts_with("ssh-ed25519 "));
        assert!(stat(&disk, "/etc/ssh/ssh_host_ed25519_key").contains("Mode:  0600"));
        install_authorized_key(
            &disk,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerry test@ferry",
        )
        .unwrap();
        install_authorized_key(
            &disk,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerry test@ferry",
        )
        .unwrap();
        assert_eq!(
            debugfs_cat(&disk, "/root/.ssh/authorized_keys")
                .unwrap()
                .as_deref(),
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerry test@ferry\n")
        );
        assert!(stat(&disk, "/root/.ssh").contains("Mode:  0700"));
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&disk)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        assert_eq!(node_disk(&image, &node).unwrap(), disk);
        assert_eq!(
            debugfs_cat(&disk, "/etc/ssh/ssh_host_ed25519_key.pub")
                .unwrap()
                .unwrap(),
            key
        );
        assert!(purge_node_disk(&node).unwrap());
        assert!(!purge_node_disk(&node).unwrap());
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
