//! A cluster's state directory, `<cache>/clusters/<name>/`: what `ferry up` made for it and
//! what its daemons write while they run.
//!
//! ```text
//! cluster.toml           the cluster file as `up` last read it (the daemons read this copy)
//! token                  the API's bearer token (0600)
//! tls/                   the cluster CA and one certificate per node (unless the file names
//!                        another directory)
//! nested                 present while the daemons run in the nested host
//! nodes/<node>/root.ext4 the node's root disk (kept by `down`, removed by `down --purge`)
//! nodes/<node>/pid       the node daemon's pid, while it runs
//! nodes/<node>/daemon.log, console.log
//! nodes/<node>/joined.json a node that joined with `ferry join` (until `ferry down`)
//! ```
//!
//! `<cache>/clusters` is a link to `<cache>/nested/rw/clusters`: daemons in the nested host see
//! the host's files read-only except under that writable share, and this way the same path
//! works on both sides.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::config::ClusterConfig;

/// Errors reading or making a cluster's state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { what, path, source }
}

/// `<cache>/clusters`, made (as a link into the nested host's writable share) on first use.
pub fn clusters_root(cache: &Path) -> Result<PathBuf, StateError> {
    let root = cache.join("clusters");
    if root.symlink_metadata().is_err() {
        let target = crate::nested::rw_share_dir().join("clusters");
        std::fs::create_dir_all(&target).map_err(io_err("create", &target))?;
        std::os::unix::fs::symlink(Path::new("nested/rw/clusters"), &root)
            .map_err(io_err("link", &root))?;
    }
    Ok(root)
}

/// One cluster's state directory.
#[derive(Debug, Clone)]
pub struct ClusterDir {
    root: PathBuf,
    name: String,
}

impl ClusterDir {
    /// The directory of cluster `name` (not made).
    pub fn new(cache: &Path, name: &str) -> Result<Self, StateError> {
        Ok(ClusterDir {
            root: clusters_root(cache)?.join(name),
            name: name.to_string(),
        })
    }

    /// A directory given as it is (the daemons get it on their command line).
    pub fn at(root: PathBuf) -> Self {
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ClusterDir { root, name }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config_copy(&self) -> PathBuf {
        self.root.join("cluster.toml")
    }

    pub fn token_file(&self) -> PathBuf {
        self.root.join("token")
    }

    /// The certificate directory: the file's `[tls] dir`, or `tls/` here.
    pub fn tls_dir(&self, config: &ClusterConfig) -> PathBuf {
        config
            .tls_dir
            .clone()
            .unwrap_or_else(|| self.root.join("tls"))
    }

    pub fn nested_marker(&self) -> PathBuf {
        self.root.join("nested")
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(node)
    }

    pub fn disk(&self, node: &str) -> PathBuf {
        self.node_dir(node).join(crate::rootfs::IMAGE_FILE)
    }

    pub fn pid_file(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("pid")
    }

    pub fn daemon_log(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("daemon.log")
    }

    pub fn console_log(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("console.log")
    }

    /// Makes the directory and writes the copy of the cluster file the daemons read.
    pub fn create(&self, config_text: &str) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.root).map_err(io_err("create", &self.root))?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("set permissions of", &self.root))?;
        write_atomic(&self.config_copy(), config_text.as_bytes(), 0o644)
    }

    /// The API token, made on first use (0600).
    pub fn token(&self) -> Result<String, StateError> {
        let path = self.token_file();
        match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("read", &path)(e))
            }
            _ => {}
        }
        let token = ferry_net::pki::random_token();
        write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)?;
        Ok(token)
    }

    /// The token, which must already exist (clients never make one).
    pub fn read_token(&self) -> Result<String, StateError> {
        let path = self.token_file();
        std::fs::read_to_string(&path)
            .map(|t| t.trim().to_string())
            .map_err(io_err("read the API token", &path))
    }

    /// The pid a node daemon recorded, if its file is there.
    pub fn daemon_pid(&self, node: &str) -> Option<i32> {
        std::fs::read_to_string(self.pid_file(node))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err("rename to", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_made_once_and_private() {
        let tmp = std::env::temp_dir().join(format!("ferry-state-{}", std::process::id()));
        let dir = ClusterDir::at(tmp.join("c1"));
        dir.create("x = 1\n").unwrap();
        let t1 = dir.token().unwrap();
        let t2 = dir.token().unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        assert_eq!(dir.read_token().unwrap(), t1);
        let mode = std::fs::metadata(dir.token_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(dir.name(), "c1");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
