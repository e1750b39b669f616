//! A node's state on this host: its own copy of the Debian root disk (kept across the guest's
//! reboots) and the ssh key that lets the user log in to every guest as root.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::rootfs::{self, RootfsError};

/// Errors preparing a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node name `{0}` must be 1 to 32 lowercase letters, digits or dashes")]
    Name(String),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("cannot make the ssh key with ssh-keygen (openssh-client): {0}")]
    Keygen(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A node ready to boot from its root disk.
#[derive(Debug, Clone)]
pub struct NodeRoot {
    /// The node's writable root disk (attach it as the guest's first disk, `/dev/vda`).
    pub disk: PathBuf,
    /// Kernel command-line words that boot it: root device and hostname.
    pub cmdline: String,
}

/// Checks a node name: it becomes a hostname and a directory name.
pub fn check_name(name: &str) -> Result<(), NodeError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(NodeError::Name(name.to_string()))
    }
}

/// Where node `name` keeps its state.
pub fn node_dir(cache: &Path, name: &str) -> PathBuf {
    cache.join("nodes").join(name)
}

/// Builds (once) the root disk image, gives node `name` its own copy, and lets the user's ssh
/// key in. The guest must not be running.
pub fn prepare_root(
    cache: &Path,
    name: &str,
    extra_packages: &[String],
) -> Result<NodeRoot, NodeError> {
    prepare_root_in(cache, &node_dir(cache, name), name, extra_packages)
}

/// [`prepare_root`] for a node whose state lives in `dir` (a cluster's node directory).
pub fn prepare_root_in(
    cache: &Path,
    dir: &Path,
    name: &str,
    extra_packages: &[String],
) -> Result<NodeRoot, NodeError> {
    check_name(name)?;
    let base = rootfs::ensure(cache, extra_packages, false)?;
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|source| NodeError::Io {
        path: dir.clone(),
        source,
    })?;
    let disk = rootfs::node_disk(&base, &dir)?;
    let (_, public) = ssh_key(cache)?;
    rootfs::install_authorized_key(&disk, &public)?;
    Ok(NodeRoot {
        disk,
        cmdline: format!(" ferry.root=/dev/vda ferry.hostname={name}"),
    })
}

/// The ssh key ferry logs in to guests with: `<cache>/ssh/id_ed25519`, made on first use.
/// Returns the private key's path and the public key's line.
pub fn ssh_key(cache: &Path) -> Result<(PathBuf, String), NodeError> {
    let dir = cache.join("ssh");
    let private = dir.join("id_ed25519");
    let public = dir.join("id_ed25519.pub");
    if !private.is_file() || !public.is_file() {
        std::fs::create_dir_all(&dir).map_err(|source| NodeError::Io {
            path: dir.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&private);
        let _ = std::fs::remove_file(&public);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ferry", "-f"])
            .arg(&private)
            .output()
            .map_err(|e| NodeError::Keygen(e.to_string()))?;
        if !out.status.success() {
            return Err(NodeError::Keygen(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
    }
    let line = std::fs::read_to_string(&public).map_err(|source| NodeError::Io {
        path: public.clone(),
        source,
    })?;
    Ok((private, line.trim().to_string()))
}

/// The `ssh` command line that logs in to `addr` as root with ferry's key (guests get new host
/// keys when their disk is made, so they are not remembered).
pub fn ssh_command(key: &Path, addr: &str, tty: bool, command: &[String]) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "ssh".into(),
        "-i".into(),
        key.to_string_lossy().into_owned(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-o".into(),
        "ConnectTimeout=15".into(),
        // A guest's sshd starts a moment after its agent: keep knocking for a while.
        "-o".into(),
        "ConnectionAttempts=20".into(),
    ];
    if tty {
        argv.push("-tt".into());
    }
    argv.push(format!("root@{addr}"));
    // ssh hands the remote shell one string: quote each word so the command runs as given.
    if !command.is_empty() {
        argv.push(
            command
                .iter()
                .map(|w| shell_quote(w))
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    argv
}

/// `word` as a POSIX shell reads it back: in single quotes, with each `'` spelled `'\''`.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_hostnames() {
        for good in ["node-1", "a", "n0de"] {
            check_name(good).unwrap();
        }
        for bad in ["", "Node", "-x", "a_b", "a/b", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn remote_words_are_quoted_for_the_remote_shell() {
        assert_eq!(shell_quote("uname"), "uname");
        assert_eq!(shell_quote("uname -r; id"), "'uname -r; id'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        // What sh makes of it: the words come back as given.
        let words = ["sh", "-c", "echo \"$0\" 'x'", "it's"];
        let line: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
        let out = Command::new("sh")
            .args(["-c", &line.join(" ")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's x\n");
    }

    #[test]
    fn ssh_key_is_made_once_and_ssh_uses_it() {
        let cache = std::env::temp_dir().join(format!("ferry-node-test-{}", std::process::id()));
        let (private, public) = ssh_key(&cache).unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        let again = ssh_key(&cache).unwrap();
        assert_eq!(again.1, public, "the key is kept");
        let argv = ssh_command(&private, "10.77.0.2", false, &["uname".into(), "-r".into()]);
        assert_eq!(argv[0], "ssh");
        assert!(argv.contains(&"root@10.77.0.2".to_string()));
        assert_eq!(argv.last().unwrap(), "uname -r");
        assert!(!argv.contains(&"-tt".to_string()));
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
