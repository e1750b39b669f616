//! The running nested host's state file, so later `ferry` invocations find it:
//! `<cache>/nested/host/state`, a few `key=value` lines.

use std::path::{Path, PathBuf};

use super::NestedError;

/// What a later `ferry` process needs to reach a running host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    /// QEMU's process id (also its process group id: it runs in its own group).
    pub pid: i32,
    /// Port on 127.0.0.1 forwarded to the agent inside.
    pub port: u16,
    /// Unix time (seconds) the host was started.
    pub started_at: u64,
    /// The outer machine's serial console log.
    pub console_log: PathBuf,
    /// The host directory shared writable with the outer machine, mounted there at the same
    /// path (none for hosts started by an older ferry).
    pub rw_share: Option<PathBuf>,
}

impl HostState {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "pid={}\nport={}\nstarted_at={}\nconsole_log={}\n",
            self.pid,
            self.port,
            self.started_at,
            self.console_log.display()
        );
        if let Some(rw) = &self.rw_share {
            s.push_str(&format!("rw_share={}\n", rw.display()));
        }
        s
    }

    /// Parses [`HostState::to_text`]'s output; `None` if a field is missing or malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(str::trim)
        };
        Some(Self {
            pid: field("pid")?.parse().ok().filter(|p| *p > 1)?,
            port: field("port")?.parse().ok().filter(|p| *p > 0)?,
            started_at: field("started_at")?.parse().ok()?,
            console_log: PathBuf::from(field("console_log").filter(|s| !s.is_empty())?),
            rw_share: field("rw_share")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        })
    }

    /// Reads the state file; `Ok(None)` if there is none, or it is unreadable garbage.
    pub fn load(path: &Path) -> Result<Option<Self>, NestedError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(NestedError::Io {
                what: format!("read {}", path.display()),
                source,
            }),
        }
    }

    /// Writes the state file atomically (temporary file, then rename).
    pub fn store(&self, path: &Path) -> Result<(), NestedError> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let res = std::fs::write(&tmp, self.to_text()).and_then(|_| std::fs::rename(&tmp, path));
        res.map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            NestedError::Io {
                what: format!("write {}", path.display()),
                source,
            }
        })
    }
}

/// Whether `pid` is a live (not zombie) QEMU process.
pub fn qemu_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: `pid (comm) state ...`; comm may hold spaces or parentheses, so split at the last ')'.
    let Some((head, tail)) = stat.rsplit_once(')') else {
        return false;
    };
    let state = tail.trim_start().chars().next();
    let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
    comm.starts_with("qemu") && !matches!(state, Some('Z') | Some('X') | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let s = HostState {
            pid: 4242,
            port: 40123,
            started_at: 1_700_000_000,
            console_log: PathBuf::from("/c/nested/host/console.log"),
            rw_share: Some(PathBuf::from("/c/nested/rw")),
        };
        assert_eq!(HostState::parse(&s.to_text()), Some(s.clone()));
        // A state file from before the writable share still parses.
        let old = HostState {
            rw_share: None,
            ..s
        };
        assert_eq!(HostState::parse(&old.to_text()), Some(old));
    }

    #[test]
    fn garbage_state_is_rejected() {
        assert_eq!(HostState::parse(""), None);
        assert_eq!(
            HostState::parse("pid=1\nport=2\nstarted_at=3\nconsole_log=/x\n"),
            None
        );
        assert_eq!(
            HostState::parse("pid=12\nport=0\nstarted_at=3\nconsole_log=/x\n"),
            None
        );
        assert_eq!(
            HostState::parse("pid=12\nport=99999\nstarted_at=3\nconsole_log=/x\n"),
            None
        );
        assert_eq!(HostState::parse("pid=12\nport=9\nstarted_at=3\n"), None);
        assert!(HostState::parse("pid=12\nport=9\nstarted_at=3\nconsole_log=/x\n").is_some());
    }

    #[test]
    fn this_process_is_not_taken_for_qemu() {
        assert!(!qemu_alive(std::process::id() as i32));
        assert!(!qemu_alive(i32::MAX));
    }
}
