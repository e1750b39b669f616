//! QEMU for the nested host: found on this machine, or installed from Debian (QEMU 10 from
//! bookworm-backports on bookworm), and the command line that boots the outer machine.
//!
//! QEMU 10 is required: under bookworm's 7.2, TCG's emulated SVM hung some inner boots and froze
//! the whole outer machine (see platform-notes.md, section 2).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::NestedError;
use crate::debian;

/// The QEMU binary ferry runs.
pub const QEMU: &str = "qemu-system-x86_64";
/// The oldest QEMU major version whose emulated SVM is reliable enough.
pub const MIN_MAJOR: u32 = 10;
/// The Debian package that holds [`QEMU`], with its firmware (SeaBIOS, iPXE option ROMs),
/// user networking (libslirp) and the 9p `local` backend (`-virtfs`) built in.
pub const PACKAGE: &str = "qemu-system-x86";
/// The suite QEMU 10 comes from on Debian 12.
pub const BACKPORTS: &str = "bookworm-backports";
/// The apt source ferry writes when no backports source is configured.
pub const SOURCE_FILE: &str = "/etc/apt/sources.list.d/ferry-bookworm-backports.list";
const SOURCE_LINE: &str = "deb http://deb.debian.org/debian bookworm-backports main\n";

/// A usable QEMU.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub path: PathBuf,
    pub version: (u32, u32, u32),
}

/// The version in `qemu-system-x86_64 --version` output
/// (`QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)`).
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let rest = text.split("version").nth(1)?.trim_start();
    let word = rest.split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// The installed QEMU and its version, if `qemu-system-x86_64` runs at all.
pub fn installed() -> Option<Qemu> {
    let out = Command::new(QEMU).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let version = parse_version(&String::from_utf8_lossy(&out.stdout))?;
    let path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(QEMU))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(QEMU));
    Some(Qemu { path, version })
}

/// A QEMU of at least [`MIN_MAJOR`], installing it with apt-get when it is missing or older.
/// Quick (one `--version` call) when it is already there.
pub fn ensure() -> Result<Qemu, NestedError> {
    if let Some(q) = installed().filter(|q| q.version.0 >= MIN_MAJOR) {
        return Ok(q);
    }
    let found = installed()
        .map(|q| format!("QEMU {}.{}.{}", q.version.0, q.version.1, q.version.2))
        .unwrap_or_else(|| "no QEMU".to_string());
    eprintln!("ferry: nested host: found {found}; the nested host needs QEMU {MIN_MAJOR} or newer, installing it");
    if !crate::sys::is_root() {
        return Err(NestedError::QemuInstall(format!(
            "{found} here and installing it needs root: run `sudo ferry host start` once, or \
             install QEMU {MIN_MAJOR}+ yourself (Debian 12: `apt-get install -t {BACKPORTS} {PACKAGE}`)"
        )));
    }
    let codename = os_codename();
    let target = if codename.as_deref() == Some("bookworm") {
        if !backports_configured(Path::new("/etc/apt"))? {
            eprintln!("ferry: nested host: adding the {BACKPORTS} apt source in {SOURCE_FILE}");
            std::fs::write(SOURCE_FILE, SOURCE_LINE).map_err(|source| NestedError::Io {
                what: format!("write {SOURCE_FILE}"),
                source,
            })?;
            debian::update_lists()?;
        } else if !suite_in_lists(BACKPORTS) {
            debian::update_lists()?;
        }
        Some(BACKPORTS)
    } else {
        None
    };
    debian::install(&[PACKAGE], target)?;
    match installed() {
        Some(q) if q.version.0 >= MIN_MAJOR => {
            eprintln!(
                "ferry: nested host: installed QEMU {}.{}.{}",
                q.version.0, q.version.1, q.version.2
            );
            Ok(q)
        }
        Some(q) => Err(NestedError::QemuInstall(format!(
            "apt-get installed QEMU {}.{}.{}, but the nested host needs {MIN_MAJOR}+; \
             this Debian release ({}) has no newer one",
            q.version.0,
            q.version.1,
            q.version.2,
            codename.as_deref().unwrap_or("unknown")
        ))),
        None => Err(NestedError::QemuInstall(format!(
            "`{QEMU} --version` still fails after installing {PACKAGE}"
        ))),
    }
}

fn os_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
}

/// Whether apt's package lists already hold the given suite (fetched by an earlier update).
fn suite_in_lists(suite: &str) -> bool {
    let needle = format!("_dists_{suite}_");
    std::fs::read_dir("/var/lib/apt/lists")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().contains(&needle))
        })
        .unwrap_or(false)
}

/// Whether any apt source under `etc_apt` (`sources.list`, `sources.list.d/*.list` and
/// deb822 `*.sources`) enables the backports suite.
pub fn backports_configured(etc_apt: &Path) -> Result<bool, NestedError> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(rd) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        files.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    for file in files {
        let name = file.to_string_lossy();
        let deb822 = name.ends_with(".sources");
        if !deb822 && !name.ends_with(".list") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let found = if deb822 {
            deb822_enables(&text, BACKPORTS)
        } else {
            one_line_enables(&text, BACKPORTS)
        };
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One-line format: `deb [options] URI suite components...`.
fn one_line_enables(text: &str, suite: &str) -> bool {
    text.lines().any(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            return false;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
            rest.drain(..=end);
        }
        rest.get(1) == Some(&suite)
    })
}

/// deb822 format: stanzas separated by blank lines, with `Types:`, `Suites:`, `Enabled:`.
fn deb822_enables(text: &str, suite: &str) -> bool {
    text.split("\n\n").any(|stanza| {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
        };
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let has_suite = field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == suite));
        enabled && deb && has_suite
    })
}

/// What the outer machine boots with.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// Host port forwarded (on 127.0.0.1) to the agent's port inside.
    pub host_port: u16,
    pub guest_port: u16,
    /// Where the serial console goes.
    pub console_log: &'a Path,
    /// A Unix socket for QEMU's human monitor (`info registers` when a boot hangs).
    pub monitor: &'a Path,
    /// A host directory shared writable (virtio-9p tag [`RW_SHARE_TAG`]).
    pub rw_share: Option<&'a Path>,
}

/// The 9p mount tag of the writable share.
pub const RW_SHARE_TAG: &str = "ferryrw";

/// The arguments for [`QEMU`] (without the program name).
pub fn command_line(spec: &BootSpec<'_>) -> Vec<OsString> {
    let mut chardev = OsString::from("file,id=con0,path=");
    chardev.push(qemu_escape(spec.console_log.as_os_str()));
    let mut monitor = OsString::from("unix:");
    monitor.push(qemu_escape(spec.monitor.as_os_str()));
    monitor.push(",server=on,wait=off");
    let netdev = format!(
        "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{}",
        spec.host_port, spec.guest_port
    );
    let (cpus, memory) = (spec.cpus.to_string(), spec.memory_mib.to_string());
    let mut args: Vec<OsString> = [
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "qemu64,+svm,+npt",
        // q35, not microvm: microvm boots about 1 s faster, but it has neither HPET nor an ACPI
        // PM timer, and under TCG on a loaded host the kernel's TSC calibration against the PIT
        // sometimes fails; with no other reference it then hung before its first console line
        // (1 boot in 6 here). q35 offers both references: 12 of 12 boots came up.
        "-machine",
        "q35",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-smp",
        &cpus,
        "-m",
        &memory,
        "-append",
        spec.cmdline,
        "-serial",
        "chardev:con0",
        // The host's root, read-only, as virtio-9p over PCI.
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-netdev",
        &netdev,
        // No option ROM: the kernel is loaded directly, nothing boots from the network.
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.extend([
        "-kernel".into(),
        spec.kernel.as_os_str().to_owned(),
        "-initrd".into(),
        spec.initrd.as_os_str().to_owned(),
        "-chardev".into(),
        chardev,
        "-monitor".into(),
        monitor,
    ]);
    if let Some(dir) = spec.rw_share {
        let mut share = OsString::from("local,path=");
        share.push(qemu_escape(dir.as_os_str()));
        share.push(format!(
            ",mount_tag={RW_SHARE_TAG},security_model=none,multidevs=remap"
        ));
        args.extend(["-virtfs".into(), share]);
    }
    args
}

/// QEMU option values separate sub-options with commas; a literal comma is written twice.
fn qemu_escape(s: &std::ffi::OsStr) -> OsString {
    OsString::from(s.to_string_lossy().replace(',', ",,"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_versions() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)\nCopyright"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some((7, 2, 19))
        );
        assert_eq!(parse_version("QEMU emulator version 9.1"), Some((9, 1, 0)));
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn finds_backports_in_one_line_sources() {
        let s = "# deb http://deb.debian.org/debian bookworm-backports main\n\
                 deb http://deb.debian.org/debian bookworm main\n";
        assert!(!one_line_enables(s, BACKPORTS));
        assert!(one_line_enables(SOURCE_LINE, BACKPORTS));
        assert!(one_line_enables(
            "deb [arch=amd64 signed-by=/x.gpg] http://mirror/debian bookworm-backports main contrib",
            BACKPORTS
        ));
        assert!(!one_line_enables(
            "deb-src http://deb.debian.org/debian bookworm-backports main",
            BACKPORTS
        ));
    }

    #[test]
    fn finds_backports_in_deb822_sources() {
        let stock =
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                     Components: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n\
                     Suites: bookworm-security\nComponents: main\n";
        assert!(!deb822_enables(stock, BACKPORTS));
        let bpo = "Types: deb deb-src\nURIs: http://deb.debian.org/debian\n\
                   Suites: bookworm bookworm-backports\nComponents: main\n";
        assert!(deb822_enables(bpo, BACKPORTS));
        let disabled = format!("{bpo}Enabled: no\n");
        assert!(!deb822_enables(&disabled, BACKPORTS));
    }

    #[test]
    fn command_line_has_the_measured_setup() {
        let spec = BootSpec {
            memory_mib: 4096,
            cpus: 2,
            kernel: Path::new("/k/vmlinuz"),
            initrd: Path::new("/c/initrd"),
            cmdline: "console=ttyS0",
            host_port: 40000,
            guest_port: 7377,
            console_log: Path::new("/s/a,b.log"),
            monitor: Path::new("/s/monitor.sock"),
            rw_share: Some(Path::new("/c/nested/rw")),
        };
        let args: Vec<String> = command_line(&spec)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg,thread=multi"));
        assert!(joined.contains("-cpu qemu64,+svm,+npt"));
        assert!(joined.contains("-smp 2 -m 4096"));
        assert!(joined.contains("-serial chardev:con0"));
        assert!(joined.contains("-kernel /k/vmlinuz -initrd /c/initrd"));
        assert!(joined.contains("path=/s/a,,b.log"));
        assert!(joined.contains("-machine q35"));
        assert!(joined.contains("mount_tag=hostroot"));
        assert!(joined.contains("readonly=on"));
        assert!(joined.contains("hostfwd=tcp:127.0.0.1:40000-:7377"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-monitor unix:/s/monitor.sock,server=on,wait=off"));
        // The writable share: the one virtfs without readonly=on.
        let rw = args
            .iter()
            .find(|a| a.contains("mount_tag=ferryrw"))
            .expect("writable share");
        assert!(rw.starts_with("local,path=/c/nested/rw,") && !rw.contains("readonly"));
    }
}
