//! Debian packages as build inputs: resolve a package's candidate version, download the `.deb`
//! with `apt-get download` and unpack it with `dpkg-deb -x`, cached by name and version.
//!
//! Everything ferry puts in a guest or in the nested host comes through here, so the guest is made
//! of Debian's own binaries and nothing is fetched from anywhere else.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors from resolving, downloading or unpacking a Debian package.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error(
        "`{command}` could not be started: {source} (ferry needs Debian's apt and dpkg tools)"
    )]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    CommandFailed { command: String, stderr: String },
    #[error(
        "Debian package `{0}` has no installable version; check the name, or run `apt-get update`"
    )]
    NoCandidate(String),
    #[error("`{package}` depends on no `{prefix}*` package; cannot tell which one to use")]
    NoDependency { package: String, prefix: String },
    #[error("cannot write the package cache at {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A package unpacked into the cache.
#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    pub version: String,
    /// The unpacked file tree (what `dpkg-deb -x` produced).
    pub root: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String, DebianError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| DebianError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(DebianError::CommandFailed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The version apt would install for `name`, running `apt-get update` once if the lists are empty
/// (or stale: [`refresh_stale_lists`]).
pub fn candidate_version(name: &str) -> Result<String, DebianError> {
    refresh_stale_lists();
    if let Some(v) = policy_candidate(name)? {
        return Ok(v);
    }
    update_lists()?;
    policy_candidate(name)?.ok_or_else(|| DebianError::NoCandidate(name.to_string()))
}

/// Package lists older than this are refreshed before ferry picks a version.
const STALE_LISTS: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Runs `apt-get update` once per process when this machine's package lists are older than
/// [`STALE_LISTS`] and may be written. A machine image's lists can be months old: the kernel
/// picked from them then differs from the one picked after the next `apt-get update` (the one
/// that installing QEMU for the nested host runs), and the guest image is built twice, the
/// first cluster running the older kernel. Without a network, the old lists are used.
fn refresh_stale_lists() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let lists = Path::new("/var/lib/apt/lists");
        let newest = std::fs::read_dir(lists)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("Release"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        // No lists at all: `candidate_version` fetches them when it finds nothing.
        let Some(age) = newest.map(|t| t.elapsed().unwrap_or_default()) else {
            return;
        };
        // A mirror may date its files long ago: ferry's own mark of its last refresh keeps
        // that from costing an `apt-get update` per command.
        let stamp = cache_dir().join("apt-refreshed");
        let refreshed = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default());
        let age = refreshed.map_or(age, |r| age.min(r));
        // Read-only (inside the nested host) or not root: nothing to do about it here.
        let writable = std::fs::OpenOptions::new()
            .append(true)
            .open(lists.join("lock"))
            .is_ok();
        if age < STALE_LISTS || !writable {
            return;
        }
        eprintln!(
            "ferry: Debian's package lists here are {} days old",
            age.as_secs() / 86_400
        );
        match update_lists() {
            Ok(()) => {
                let _ = std::fs::create_dir_all(cache_dir());
                let _ = std::fs::write(&stamp, b"");
            }
            Err(e) => eprintln!("ferry: warning: {e}; going on with the old lists"),
        }
    });
}

fn policy_candidate(name: &str) -> Result<Option<String>, DebianError> {
    let out = apt_cache(&["policy", name])?;
    Ok(out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)" && !v.is_empty()))
}

/// What identifies the state of apt's package lists: they change only through `apt-get update`.
fn lists_fingerprint() -> Option<String> {
    let stamp = |p: &str| {
        let m = std::fs::metadata(p).ok()?.modified().ok()?;
        Some(m.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos())
    };
    Some(format!(
        "{}-{}",
        stamp("/var/lib/apt/lists")?,
        stamp("/var/cache/apt/pkgcache.bin").unwrap_or(0)
    ))
}

/// Runs `apt-cache ARGS`, remembering the answer in the cache until the package lists change:
/// each query costs about half a second, and every `ferry run` asks the same ones.
fn apt_cache(args: &[&str]) -> Result<String, DebianError> {
    let memo = lists_fingerprint().map(|fp| {
        let name: String = args
            .join("_")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        (cache_dir().join("apt-memo").join(name), fp)
    });
    if let Some((path, fp)) = &memo {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Some(rest) = text.strip_prefix(&format!("{fp}\n")) {
                return Ok(rest.to_string());
            }
        }
    }
    let out = run(Command::new("apt-cache").args(args))?;
    if let Some((path, fp)) = &memo {
        // Best effort: a read-only cache (inside the nested host) just means asking again.
        if path
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, format!("{fp}\n{out}")).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
    Ok(out)
}

/// Runs `apt-get update`, printing what it does since it takes a while.
pub fn update_lists() -> Result<(), DebianError> {
    eprintln!("ferry: refreshing Debian package lists (apt-get update)");
    run(Command::new("apt-get").args(["update", "-q"])).map(|_| ())
}

/// The first package that `name` depends on whose name starts with `prefix`, e.g. the versioned
/// kernel package behind `linux-image-amd64`.
pub fn dependency_with_prefix(name: &str, prefix: &str) -> Result<String, DebianError> {
    candidate_version(name)?;
    let out = apt_cache(&["depends", name])?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|d| d.starts_with(prefix))
        .map(str::to_string)
        .ok_or_else(|| DebianError::NoDependency {
            package: name.to_string(),
            prefix: prefix.to_string(),
        })
}

/// Downloads and unpacks `name` (its candidate version) under `cache/debs/`, once per version.
pub fn fetch(name: &str, cache: &Path) -> Result<Package, DebianError> {
    let version = candidate_version(name)?;
    let safe_version = version.replace([':', '/'], "_");
    let base = cache.join("debs");
    let root = base.join(format!("{name}_{safe_version}"));
    let done = root.join(".ferry-unpacked");
    if !done.exists() {
        eprintln!("ferry: downloading Debian package {name} {version}");
        let cache_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DebianError::Cache { path, source }
        };
        let dl = base.join(format!(".download-{name}"));
        let _ = std::fs::remove_dir_all(&dl);
        std::fs::create_dir_all(&dl).map_err(cache_err(&dl))?;
        run(Command::new("apt-get").current_dir(&dl).args([
            "download",
            "-q",
            &format!("{name}={version}"),
        ]))?;
        let deb = std::fs::read_dir(&dl)
            .map_err(cache_err(&dl))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| DebianError::NoCandidate(name.to_string()))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(cache_err(&root))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        std::fs::write(&done, &version).map_err(cache_err(&done))?;
        let _ = std::fs::remove_dir_all(&dl);
    }
    Ok(Package {
        name: name.to_string(),
        version,
        root,
    })
}

/// Installs Debian packages on this machine with apt-get (used for tools ferry runs on the host,
/// such as QEMU for the nested host). `target_release` selects a suite such as a backports one.
pub fn install(packages: &[&str], target_release: Option<&str>) -> Result<(), DebianError> {
    eprintln!("ferry: installing {} with apt-get", packages.join(" "));
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
    ]);
    if let Some(release) = target_release {
        cmd.args(["-t", release]);
    }
    cmd.args(packages);
    run(&mut cmd).map(|_| ())
}

/// The per-user cache directory: `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("ferry")
}
