//! What `ferry up`, `ferry status` and `ferry down` do, and the two steps that must run where
//! the daemons live (this machine, or inside the nested host): [`spawn`] and [`stop`].
//!
//! `up` checks the file, makes what the cluster needs once (CA, certificates, token, guest
//! image, root disks), starts the daemons of this machine's nodes that are not running, and
//! waits for their guests, showing progress. A node that answers as booting or ready is left
//! alone, so `up` on a running cluster changes nothing.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_net::pki::{self, ClusterCa};
use ferry_net::tls;

use super::api::{MigrationJob, MigrationRequest, NodeState, NodeStatus, Process};
use super::client::ApiClient;
use super::config::{self, ClusterConfig, NodeConfig};
use super::daemon::{self, bridge_name};
use super::state::{ClusterDir, StateError};
use crate::{debian, image, nested, node};

/// The file `up`, `status`, `down` and `ssh` read when none is given.
pub const DEFAULT_FILE: &str = "configs/local.toml";

/// Errors of the cluster commands. `is_usage()` tells those the user fixes in the file or on
/// the command line (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(
        "cluster `{cluster}` is running with another version of {file}: `ferry down {file}` first, then `ferry up {file}` to apply the change"
    )]
    Changed { cluster: String, file: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the cluster's certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("the guest image: {0}")]
    Image(#[from] image::ImageError),
    #[error("node {node}'s root disk: {source}")]
    Disk {
        node: String,
        source: node::NodeError,
    },
    #[error(transparent)]
    Nested(#[from] nested::NestedError),
    #[error("the cluster network: {0}")]
    Bridge(#[from] ferry_net::bridge::BridgeError),
    #[error("node {node}'s daemon did not start: {reason}\n{log}")]
    Spawn {
        node: String,
        reason: String,
        log: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{failed} of {total} nodes did not come up:\n{details}")]
    NotUp {
        failed: usize,
        total: usize,
        details: String,
    },
    #[error("no node `{name}` in {file}; its nodes are {names}")]
    NoSuchNode {
        name: String,
        file: String,
        names: String,
    },
    #[error("the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    CantMove(String),
    #[error("{message}")]
    Refused { status: u16, message: String },
    #[error(transparent)]
    Api(#[from] super::client::ClientError),
    #[error(transparent)]
    Members(#[from] super::members::MembersError),
}

impl ControlError {
    /// True for errors the user fixes by changing the file or the command line.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ControlError::Config(_)
                | ControlError::Changed { .. }
                | ControlError::NoSuchNode { .. }
                | ControlError::Refused { .. }
                | ControlError::Bridge(ferry_net::bridge::BridgeError::Clash { .. })
        )
    }
}

/// Node `name` of `cfg`, or an error naming the file and listing the nodes it has.
fn node_of<'c>(cfg: &'c ClusterConfig, name: &str) -> Result<&'c NodeConfig, ControlError> {
    cfg.node(name).ok_or_else(|| ControlError::NoSuchNode {
        name: name.to_string(),
        file: cfg.source.display().to_string(),
        names: cfg
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlError {
    let what = what.into();
    move |source| ControlError::Io { what, source }
}

/// Whether `host` (an address or a name) is this machine: it resolves to an address we can
/// bind to.
pub fn is_local_host(host: &str) -> bool {
    let Ok(addrs) = (host, 0u16).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| a.ip().is_loopback() || UdpSocket::bind(SocketAddr::new(a.ip(), 0)).is_ok())
}

/// A cluster file, read and located: the configuration, its text, and its state directory.
pub struct Cluster {
    pub config: ClusterConfig,
    pub text: String,
    pub dir: ClusterDir,
}

impl Cluster {
    /// Reads and checks `file`. The nodes that joined the cluster (`ferry join`) follow the
    /// file's in `config.nodes`.
    pub fn load(file: &Path) -> Result<Self, ControlError> {
        let mut config = config::load(file)?;
        let text = std::fs::read_to_string(file).map_err(|source| config::ConfigError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        let dir = ClusterDir::new(&debian::cache_dir(), &config.name)?;
        let joined = super::members::joined_nodes(&dir, &config)?;
        config.nodes.extend(joined);
        Ok(Cluster { config, text, dir })
    }

    /// The nodes whose daemons run on this machine.
    pub fn local_nodes(&self) -> Vec<&NodeConfig> {
        self.config
            .nodes
            .iter()
            .filter(|n| is_local_host(&n.host))
            .collect()
    }

    /// Whether this cluster's daemons run in the nested host.
    pub fn nested(&self) -> bool {
        self.dir.nested_marker().exists()
    }

    /// Where this machine reaches a node's API: through the nested host's forwarding, the
    /// listen address, or the node's host.
    pub fn api_addr(&self, n: &NodeConfig) -> String {
        let local = is_local_host(&n.host);
        let ip = if local && (self.nested() || self.config.listen.is_unspecified()) {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else if local {
            self.config.listen
        } else {
            return format!("{}:{}", n.host, n.api_port);
        };
        SocketAddr::new(ip, n.api_port).to_string()
    }

    pub fn api_url(&self, n: &NodeConfig) -> String {
        format!("https://{}", self.api_addr(n))
    }

    /// A client of node `n`'s API with the cluster's token.
    pub fn client(&self, n: &NodeConfig) -> Result<ApiClient, ControlError> {
        Ok(self.clients(std::slice::from_ref(n))?.remove(0))
    }

    /// Clients of these nodes' APIs, the CA and the token read once for all of them.
    fn clients(&self, nodes: &[NodeConfig]) -> Result<Vec<ApiClient>, ControlError> {
        let tls_dir = self.dir.tls_dir(&self.config);
        let tls = tls::client_config(pki::load_roots(&tls_dir)?, None)?;
        let token = self.dir.read_token()?;
        nodes
            .iter()
            .map(|n| {
                ApiClient::new(self.api_addr(n), &n.name, tls.clone(), Some(token.clone()))
                    .map_err(ControlError::from)
            })
            .collect()
    }

    /// Every node's status, asked of each node's own API at once; a node that does not
    /// answer is down, with the reason.
    pub fn statuses(&self) -> Result<Vec<NodeStatus>, ControlError> {
        self.statuses_of(&self.config.nodes)
    }

    /// Node `n`'s status, as [`Cluster::statuses`] gives it.
    pub fn status_of(&self, n: &NodeConfig) -> Result<NodeStatus, ControlError> {
        let mut one = self.statuses_of(std::slice::from_ref(n))?;
        Ok(one.remove(0))
    }

    fn statuses_of(&self, nodes: &[NodeConfig]) -> Result<Vec<NodeStatus>, ControlError> {
        if !self.dir.token_file().exists() {
            return Ok(nodes
                .iter()
                .map(|n| self.down(n, "the cluster has not been brought up".into()))
                .collect());
        }
        let clients: Vec<_> = self
            .clients(nodes)?
            .into_iter()
            .map(|c| c.with_timeout(Duration::from_secs(5)))
            .collect();
        let rt = runtime()?;
        let results = rt.block_on(async {
            let tasks: Vec<_> = clients
                .into_iter()
                .map(|c| tokio::spawn(async move { c.get::<NodeStatus>("/v1/node").await }))
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await);
            }
            out
        });
        Ok(nodes
            .iter()
            .zip(results)
            .map(|(n, r)| match r {
                Ok(Ok(mut s)) => {
                    s.api_url = self.api_url(n);
                    s
                }
                Ok(Err(e)) if e.is_unreachable() => {
                    self.down(n, format!("{NO_ANSWER} {} ({e})", self.api_addr(n)))
                }
                Ok(Err(e)) => self.down(n, e.to_string()),
                Err(e) => self.down(n, e.to_string()),
            })
            .collect())
    }

    fn down(&self, n: &NodeConfig, detail: String) -> NodeStatus {
        NodeStatus {
            name: n.name.clone(),
            address: n.address.addr.to_string(),
            host: n.host.clone(),
            state: NodeState::Down,
            detail: Some(detail),
            api_url: self.api_url(n),
            vcpus: n.vcpus,
            memory_mib: n.memory >> 20,
            kernel: None,
            boot_ms: None,
            load: None,
            accepting: false,
        }
    }
}

impl Cluster {
    /// Node `name` of the file, or an error listing the nodes it has.
    pub fn node_named(&self, name: &str) -> Result<&NodeConfig, ControlError> {
        node_of(&self.config, name)
    }

    /// Every node's processes (kernel threads left out), in the file's node order; a node
    /// that does not answer is left out with a note on stderr.
    pub fn processes(&self) -> Result<Vec<(String, Process)>, ControlError> {
        let clients: Vec<_> = self
            .config
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .zip(self.clients(&self.config.nodes)?)
            .collect();
        let rt = runtime()?;
        let results = rt.block_on(async {
            let tasks: Vec<_> = clients
                .into_iter()
                .map(|(name, c)| {
                    tokio::spawn(
                        async move { (name, c.get::<Vec<Process>>("/v1/processes").await) },
                    )
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                if let Ok(r) = t.await {
                    out.push(r);
                }
            }
            out
        });
        let mut all = Vec::new();
        for (name, r) in results {
            match r {
                Ok(list) => all.extend(list.into_iter().map(|p| (name.clone(), p))),
                Err(e) => eprintln!("ferry: {name}: {e}"),
            }
        }
        Ok(all)
    }
}

/// Moves process `pid` of node `node` to node `to` through `node`'s API, calling `progress`
/// with the job while it runs; returns the finished job (done or failed).
pub fn migrate(
    cluster: &Cluster,
    node: &str,
    pid: u32,
    to: &str,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(&MigrationJob),
) -> Result<MigrationJob, ControlError> {
    let source = cluster.node_named(node)?;
    cluster.node_named(to)?;
    let client = cluster.client(source)?;
    let rt = runtime()?;
    rt.block_on(async {
        let request = MigrationRequest {
            pid,
            node: None,
            to: to.to_string(),
            mode: options.mode,
            downtime_ms: options.downtime_ms,
            bandwidth_mib_s: options.bandwidth_mib_s,
        };
        let (status, body) = client
            .clone()
            .with_timeout(Duration::from_secs(180))
            .post_json("/v1/migrations", &request)
            .await?;
        let message = || {
            serde_json::from_slice::<super::api::ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned())
        };
        let mut job: MigrationJob = match status {
            201 => serde_json::from_slice(&body).map_err(|e| ControlError::Io {
                what: "reading the migration job".into(),
                source: std::io::Error::other(e),
            })?,
            409 => return Err(ControlError::CantMove(message())),
            s if s < 500 => {
                return Err(ControlError::Refused {
                    status: s,
                    message: message(),
                })
            }
            s => {
                return Err(ControlError::Io {
                    what: format!("node {node} answered {s}"),
                    source: std::io::Error::other(message()),
                })
            }
        };
        let path = format!("/v1/migrations/{}", job.id);
        // A busy node may answer slowly while it moves pages: only a minute of silence ends
        // the wait (the job goes on regardless; `GET /v1/migrations` shows how it ended).
        let mut silent_since: Option<Instant> = None;
        while job.state.is_active() {
            progress(&job);
            tokio::time::sleep(Duration::from_millis(200)).await;
            match client.get(&path).await {
                Ok(j) => {
                    job = j;
                    silent_since = None;
                }
                Err(e) if e.is_unreachable() => {
                    let since = *silent_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(60) {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        progress(&job);
        Ok(job)
    })
}

/// `ferry migrate --cancel NODE:ID`: cancels job `id` of `node` (in pre-copy; the process
/// runs on at its node) and returns it as it ended.
pub fn cancel_migration(
    cluster: &Cluster,
    node: &str,
    id: u64,
) -> Result<MigrationJob, ControlError> {
    let source = cluster.node_named(node)?;
    let client = cluster.client(source)?;
    let rt = runtime()?;
    rt.block_on(async {
        let (status, body) = client
            .with_timeout(Duration::from_secs(90))
            .call("DELETE", &format!("/v1/migrations/{id}"))
            .await?;
        match status {
            200 => serde_json::from_slice(&body).map_err(|e| ControlError::Io {
                what: "reading the cancelled job".into(),
                source: std::io::Error::other(e),
            }),
            s => Err(ControlError::Refused {
                status: s,
                message: serde_json::from_slice::<super::api::ApiError>(&body)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned()),
            }),
        }
    })
}

/// How `ferry migrate` moves a process: the request's options.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    pub mode: super::api::MigrationMode,
    pub downtime_ms: Option<u64>,
    pub bandwidth_mib_s: Option<f64>,
}

/// The table `ferry ps` prints.
pub fn ps_table(processes: &[(String, Process)]) -> String {
    let mut out = format!(
        "{:<10} {:>7} {:<10} {:>5} {:>8} {:>9}  COMMAND\n",
        "NODE", "PID", "HOME", "MOVES", "CPU", "RSS"
    );
    for (node, p) in processes {
        out.push_str(&format!(
            "{:<10} {:>7} {:<10} {:>5} {:>7.1}s {:>6} KiB  {}\n",
            node,
            p.pid,
            p.home.as_deref().unwrap_or(node),
            p.moves,
            p.cpu_seconds,
            p.rss_kib,
            p.command
        ));
    }
    out
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, ControlError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ControlError::Runtime)
}

pub(super) fn progress(quiet: bool, msg: impl std::fmt::Display) {
    if !quiet {
        eprintln!("ferry: {msg}");
    }
}

/// How [`Cluster::statuses`] starts the detail of a node whose daemon gave no answer.
pub const NO_ANSWER: &str = "no daemon answers at";

/// How long `up` waits for a daemon that stopped answering (or never did) before it gives up
/// on it: a daemon under load may miss a few polls.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// `ferry up FILE`: see the module's documentation. Returns every node's status at the end.
pub fn up(file: &Path, quiet: bool) -> Result<Vec<NodeStatus>, ControlError> {
    let cluster = Cluster::load(file)?;
    let cfg = &cluster.config;
    let local = cluster.local_nodes();
    let nested_reason = nested::local_kvm_problem();

    // A running cluster with another file is not changed under its feet.
    let before = if cluster.dir.config_copy().is_file() {
        cluster.statuses()?
    } else {
        Vec::new()
    };
    let running = |name: &str| {
        before
            .iter()
            .any(|s| s.name == name && s.state != NodeState::Down)
    };
    if local.iter().any(|n| running(&n.name)) {
        let old = std::fs::read_to_string(cluster.dir.config_copy()).unwrap_or_default();
        if old != cluster.text {
            return Err(ControlError::Changed {
                cluster: cfg.name.clone(),
                file: file.display().to_string(),
            });
        }
    }
    let to_start: Vec<&NodeConfig> = local
        .iter()
        .copied()
        .filter(|n| !running(&n.name))
        .collect();
    if to_start.is_empty() {
        progress(
            quiet,
            format_args!(
                "cluster {}: every node of this machine is already running; nothing to do",
                cfg.name
            ),
        );
        return cluster.statuses();
    }

    // Everything the daemons need, made here where the cache is writable.
    cluster.dir.create(&cluster.text)?;
    cluster.dir.token()?;
    let tls_dir = cluster.dir.tls_dir(cfg);
    let ca = ClusterCa::load_or_create(&tls_dir, &cfg.name)?;
    for n in &local {
        issue_certificate(&ca, &tls_dir, cfg, n)?;
    }
    let cache = debian::cache_dir();
    let img = image::ensure(&cache, false)?;
    for n in &to_start {
        progress(quiet, format_args!("{}: preparing its root disk", n.name));
        node::prepare_root_in(&cache, &cluster.dir.node_dir(&n.name), &n.name, &n.packages)
            .map_err(|source| ControlError::Disk {
                node: n.name.clone(),
                source,
            })?;
    }

    let names: Vec<String> = to_start.iter().map(|n| n.name.clone()).collect();
    let started = Instant::now();
    match &nested_reason {
        None => {
            let _ = std::fs::remove_file(cluster.dir.nested_marker());
            spawn(&SpawnOptions {
                dir: cluster.dir.root().to_path_buf(),
                kernel: img.vmlinux.clone(),
                initrd: img.initrd.clone(),
                listen: cfg.listen,
                api_host: None,
                nodes: names.clone(),
            })?;
        }
        Some(reason) => {
            progress(
                quiet,
                format_args!("the nodes run in the nested host: {reason}"),
            );
            let host = match nested::NestedHost::running()? {
                Some(h) => h,
                None => nested::NestedHost::start(&nested::HostOptions {
                    memory_mib: nested_memory_mib(&to_start),
                    ..nested::HostOptions::default()
                })?,
            };
            host.keep_for(&cfg.name)?;
            for n in &to_start {
                host.forward_port(n.api_port)?;
            }
            std::fs::write(cluster.dir.nested_marker(), "")
                .map_err(io("marking the cluster as nested"))?;
            spawn_in_nested(&host, &cluster, &img.vmlinux, &img.initrd, &names)?;
        }
    }
    wait_ready(&cluster, &to_start, started, quiet)
}

/// Starts the daemons of nodes `names` inside the nested host (`ferry daemon spawn` there,
/// with this very binary).
pub(super) fn spawn_in_nested(
    host: &nested::NestedHost,
    cluster: &Cluster,
    kernel: &Path,
    initrd: &Path,
    names: &[String],
) -> Result<(), ControlError> {
    let exe = std::env::current_exe().map_err(io("locating the ferry binary"))?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut argv = vec![
        s(&host.stage_executable(&exe)?),
        "daemon".into(),
        "spawn".into(),
        "--dir".into(),
        s(cluster.dir.root()),
        "--kernel".into(),
        s(kernel),
        "--initrd".into(),
        s(initrd),
        "--listen".into(),
        Ipv4Addr::UNSPECIFIED.to_string(),
        "--api-host".into(),
        Ipv4Addr::LOCALHOST.to_string(),
    ];
    argv.extend(names.iter().cloned());
    let code = host.exec(&argv, Path::new("/"), &[], false)?;
    if code != 0 {
        return Err(ControlError::Spawn {
            node: names.join(", "),
            reason: format!("`ferry daemon spawn` in the nested host exited {code}"),
            log: names
                .iter()
                .map(|n| log_tail(&cluster.dir.daemon_log(n)))
                .collect(),
        });
    }
    Ok(())
}

/// The nested host's memory for these nodes: their guests and a GiB for its own needs, at
/// least the default.
pub(super) fn nested_memory_mib(nodes: &[&NodeConfig]) -> u32 {
    let guests: u64 = nodes.iter().map(|n| n.memory >> 20).sum();
    (guests + 1024).max(u64::from(nested::HostOptions::default().memory_mib)) as u32
}

/// A certificate for node `n`: its name, localhost, and the addresses it is reached at.
pub(super) fn issue_certificate(
    ca: &ClusterCa,
    dir: &Path,
    cfg: &ClusterConfig,
    n: &NodeConfig,
) -> Result<(), ControlError> {
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if let Ok(ip) = n.host.parse::<IpAddr>() {
        ips.push(ip);
    }
    if !cfg.listen.is_unspecified() {
        ips.push(cfg.listen);
    }
    ips.sort();
    ips.dedup();
    ca.issue(dir, &n.name, &["localhost".to_string()], &ips)?;
    Ok(())
}

/// Waits until every node in `nodes` answers as ready (or is down), printing progress.
pub(super) fn wait_ready(
    cluster: &Cluster,
    nodes: &[&NodeConfig],
    started: Instant,
    quiet: bool,
) -> Result<Vec<NodeStatus>, ControlError> {
    let limit = daemon::BOOT_TIMEOUT + Duration::from_secs(30);
    let mut reported: Vec<String> = Vec::new();
    let mut last_line = Instant::now();
    // When each node's daemon last answered (or the start).
    let mut answered: std::collections::HashMap<String, Instant> =
        nodes.iter().map(|n| (n.name.clone(), started)).collect();
    loop {
        let statuses = cluster.statuses()?;
        for s in &statuses {
            let silent = s
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with(NO_ANSWER));
            if !silent {
                answered.insert(s.name.clone(), Instant::now());
            }
        }
        let waiting: Vec<&NodeStatus> = statuses
            .iter()
            .filter(|s| nodes.iter().any(|n| n.name == s.name))
            .filter(|s| !reported.contains(&s.name))
            .collect();
        let mut failed = Vec::new();
        for s in &waiting {
            match s.state {
                NodeState::Ready => {
                    progress(
                        quiet,
                        format_args!(
                            "{} ready after {:.1} s ({}, kernel {})",
                            s.name,
                            started.elapsed().as_secs_f64(),
                            s.address,
                            s.kernel.as_deref().unwrap_or("?")
                        ),
                    );
                    reported.push(s.name.clone());
                }
                // The daemon says its guest is down, or it has not answered for a while.
                NodeState::Down => {
                    let silent = s
                        .detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with(NO_ANSWER));
                    let since = answered.get(&s.name).copied().unwrap_or(started);
                    if !silent || since.elapsed() > SILENCE_LIMIT {
                        failed.push(*s)
                    }
                }
                _ => {}
            }
        }
        let still: Vec<&str> = waiting
            .iter()
            .filter(|s| s.state != NodeState::Ready && !failed.iter().any(|f| f.name == s.name))
            .map(|s| s.name.as_str())
            .collect();
        if still.is_empty() || started.elapsed() > limit {
            let mut bad: Vec<String> = failed
                .iter()
                .map(|s| {
                    format!(
                        "  {}: {}{}",
                        s.name,
                        s.detail.as_deref().unwrap_or("down"),
                        log_tail(&cluster.dir.daemon_log(&s.name))
                    )
                })
                .collect();
            bad.extend(still.iter().map(|n| {
                format!(
                    "  {n}: not ready within {} s{}",
                    limit.as_secs(),
                    log_tail(&cluster.dir.daemon_log(n))
                )
            }));
            if bad.is_empty() {
                return Ok(statuses);
            }
            return Err(ControlError::NotUp {
                failed: bad.len(),
                total: nodes.len(),
                details: bad.join("\n"),
            });
        }
        if last_line.elapsed() >= Duration::from_secs(10) {
            progress(
                quiet,
                format_args!(
                    "waiting for {} ({:.0} s)",
                    still.join(", "),
                    started.elapsed().as_secs_f64()
                ),
            );
            last_line = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last lines of a daemon's log, indented, for an error message.
pub(super) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(8);
    if lines.is_empty() {
        return String::new();
    }
    let mut s = format!("\n    last lines of {}:", path.display());
    for l in &lines[start..] {
        s.push_str("\n    | ");
        s.push_str(l);
    }
    s
}

/// The table `up` and `status` print.
pub fn table(statuses: &[NodeStatus]) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "ADDRESS".into(),
        "STATE".into(),
        "CPU".into(),
        "MEM FREE".into(),
        "API".into(),
    ]];
    for s in statuses {
        let (cpu, mem) = match &s.load {
            Some(l) => (
                format!("{:.0}%", l.cpu_percent),
                format!("{}/{} MiB", l.mem_available_mib, l.mem_total_mib),
            ),
            None => ("-".into(), "-".into()),
        };
        rows.push([
            s.name.clone(),
            s.address.clone(),
            s.state.to_string(),
            cpu,
            mem,
            s.api_url.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for s in statuses.iter().filter(|s| s.state == NodeState::Down) {
        if let Some(d) = &s.detail {
            out.push_str(&format!("{}: {d}\n", s.name));
        }
    }
    out
}

/// `ferry down FILE`: stops every node of this machine, removes the cluster network, and with
/// `purge` the cluster's state directory (disks, certificates, token). Returns the nodes it
/// stopped.
pub fn down(file: &Path, purge: bool, quiet: bool) -> Result<Vec<String>, ControlError> {
    let cluster = Cluster::load(file)?;
    if !cluster.dir.root().exists() {
        progress(
            quiet,
            format_args!(
                "cluster {} is not up here: nothing to stop",
                cluster.config.name
            ),
        );
        return Ok(Vec::new());
    }
    let names: Vec<String> = cluster
        .local_nodes()
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let mut stopped = Vec::new();
    if cluster.nested() {
        if let Some(host) = nested::NestedHost::running()? {
            let exe = std::env::current_exe().map_err(io("locating the ferry binary"))?;
            let argv = vec![
                host.stage_executable(&exe)?.to_string_lossy().into_owned(),
                "daemon".into(),
                "stop".into(),
                "--dir".into(),
                cluster.dir.root().to_string_lossy().into_owned(),
            ];
            let code = host.exec(&argv, Path::new("/"), &[], false)?;
            if code != 0 {
                return Err(ControlError::Io {
                    what: "stopping the daemons in the nested host".into(),
                    source: std::io::Error::other(format!("`ferry daemon stop` exited {code}")),
                });
            }
            for n in cluster.local_nodes() {
                let _ = host.unforward_port(n.api_port);
            }
            host.release(&cluster.config.name);
        }
        // A nested host that is gone took its daemons with it.
        stopped = names.clone();
        let _ = std::fs::remove_file(cluster.dir.nested_marker());
    } else {
        stopped.extend(stop(cluster.dir.root())?);
    }
    // The nodes that joined are stopped with the rest, and forgotten: the next `up` brings
    // up the file's nodes.
    for r in super::members::JoinRecord::all(&cluster.dir)? {
        super::members::JoinRecord::forget(&cluster.dir, &r.name);
    }
    if purge {
        std::fs::remove_dir_all(cluster.dir.root())
            .map_err(io(format!("removing {}", cluster.dir.root().display())))?;
        progress(
            quiet,
            format_args!("removed {}", cluster.dir.root().display()),
        );
    }
    Ok(stopped)
}

/// What [`spawn`] starts.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub listen: IpAddr,
    /// The host part of the API URLs the daemons report (default: the listen address, or
    /// 127.0.0.1 when that is unspecified).
    pub api_host: Option<String>,
    pub nodes: Vec<String>,
}

/// Starts the daemons of `opts.nodes` here, each in its own process group with its output in
/// its log, after making the cluster network; a node whose daemon is still running (but down)
/// is restarted. Returns once each daemon is listening (it writes its pid file then).
pub fn spawn(opts: &SpawnOptions) -> Result<(), ControlError> {
    let dir = ClusterDir::at(opts.dir.clone());
    let cfg = config::load(&dir.config_copy())?;
    ferry_net::Bridge::ensure(&bridge_name(&cfg.name), cfg.subnet)?;
    let exe = std::env::current_exe().map_err(io("locating the ferry binary"))?;
    let host = opts.api_host.clone().unwrap_or_else(|| {
        if opts.listen.is_unspecified() {
            "127.0.0.1".into()
        } else {
            opts.listen.to_string()
        }
    });
    let mut children = Vec::new();
    for name in &opts.nodes {
        let n = match super::members::node_or_joined(&dir, &cfg, name)? {
            Some((n, _)) => n,
            None => node_of(&cfg, name)?.clone(),
        };
        stop_daemon(&dir, name);
        let node_dir = dir.node_dir(name);
        std::fs::create_dir_all(&node_dir)
            .map_err(io(format!("creating {}", node_dir.display())))?;
        // Appended to, so that what an earlier daemon said (why its guest died, say) is
        // still there after `up` restarted it.
        let log_path = dir.daemon_log(name);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        writeln!(
            log,
            "[{}.{:03}] ---- ferry up starts node {name}'s daemon ----",
            t.as_secs(),
            t.subsec_millis()
        )
        .map_err(io(format!("writing {}", log_path.display())))?;
        let err = log.try_clone().map_err(io("duplicating the log file"))?;
        let mut command = Command::new(&exe);
        crate::sys::no_inherited_fds(&mut command);
        let child = command
            .args(["daemon", "run", "--dir"])
            .arg(&opts.dir)
            .args(["--node", name, "--kernel"])
            .arg(&opts.kernel)
            .arg("--initrd")
            .arg(&opts.initrd)
            .args(["--listen", &opts.listen.to_string()])
            .args(["--api-url", &format!("https://{host}:{}", n.api_port)])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io(format!("starting node {name}'s daemon")))?;
        children.push((name.clone(), child));
    }
    // Each daemon writes its pid file once it listens; one that exits first failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, mut child) in children {
        loop {
            if dir.daemon_pid(&name) == Some(child.id() as i32) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ControlError::Spawn {
                    node: name.clone(),
                    reason: format!("it exited ({status})"),
                    log: log_tail(&dir.daemon_log(&name)),
                });
            }
            if Instant::now() > deadline {
                return Err(ControlError::Spawn {
                    node: name.clone(),
                    reason: "it did not start listening within 30 s".into(),
                    log: log_tail(&dir.daemon_log(&name)),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Whether `pid` is node `node`'s daemon (and not a process that reused its number).
fn is_daemon(pid: i32, node: &str) -> bool {
    let mut cmdline = String::new();
    let ok = std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|mut f| f.read_to_string(&mut cmdline))
        .is_ok();
    let words: Vec<&str> = cmdline.split('\0').collect();
    ok && words.windows(2).any(|w| w == ["daemon", "run"])
        && words.windows(2).any(|w| w == ["--node", node])
}

/// Stops node `node`'s daemon if it runs: SIGTERM (it powers its guest off), then SIGKILL
/// after 45 s. Returns whether one was running.
fn stop_daemon(dir: &ClusterDir, node: &str) -> bool {
    let Some(pid) = dir.daemon_pid(node).filter(|&p| is_daemon(p, node)) else {
        let _ = std::fs::remove_file(dir.pid_file(node));
        return false;
    };
    crate::sys::kill(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(45);
    while is_daemon(pid, node) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if is_daemon(pid, node) {
        crate::sys::kill(pid, libc::SIGKILL);
        while is_daemon(pid, node) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = std::fs::remove_file(dir.pid_file(node));
    true
}

/// Stops every daemon of the cluster in `dir` that runs here (all at once) and removes the
/// cluster's network. Returns the nodes that were running.
pub fn stop(dir: &Path) -> Result<Vec<String>, ControlError> {
    let dir = ClusterDir::at(dir.to_path_buf());
    let cfg = config::load(&dir.config_copy())?;
    let joined = super::members::joined_nodes(&dir, &cfg)?;
    let dir = Arc::new(dir);
    let handles: Vec<_> = cfg
        .nodes
        .iter()
        .chain(&joined)
        .map(|n| {
            let dir = dir.clone();
            let name = n.name.clone();
            std::thread::spawn(move || stop_daemon(&dir, &name).then_some(name))
        })
        .collect();
    let stopped = handles
        .into_iter()
        .filter_map(|h| h.join().ok().flatten())
        .collect();
    ferry_net::Bridge::remove(&bridge_name(&cfg.name))?;
    Ok(stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_own_addresses_are_local() {
        assert!(is_local_host("127.0.0.1"));
        assert!(is_local_host("localhost"));
        // TEST-NET-1 is never assigned to a machine.
        assert!(!is_local_host("192.0.2.77"));
        assert!(!is_local_host("no-such-host.invalid"));
    }

    #[test]
    fn the_table_lines_up_and_says_why_a_node_is_down() {
        let node = |name: &str, state| NodeStatus {
            name: name.into(),
            address: "10.77.0.11".into(),
            host: "127.0.0.1".into(),
            state,
            detail: (state == NodeState::Down).then(|| "no daemon answers".into()),
            api_url: "https://127.0.0.1:7470".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: None,
            boot_ms: None,
            load: None,
            accepting: true,
        };
        let t = table(&[
            node("node-1", NodeState::Ready),
            node("node-10", NodeState::Down),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NODE     ADDRESS"), "{t}");
        assert!(lines[1].starts_with("node-1   10.77.0.11  ready"), "{t}");
        assert!(lines[2].starts_with("node-10  10.77.0.11  down"), "{t}");
        assert_eq!(lines[3], "node-10: no daemon answers");
    }
}
