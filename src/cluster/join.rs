//! `ferry join`: a new node joins a running cluster through one member's peer address, and no
//! one's file changes.
//!
//! The new node's settings come from the running cluster: its file's defaults (vCPUs, memory,
//! packages) from the copy in the cluster's state directory, the next free guest address, and
//! the ports after the highest any member uses; flags override each. It gets a certificate
//! from the cluster CA in that directory (so it joins from the machine that holds it; another
//! machine needs a copy of the directory), a root disk, and a daemon started exactly as `up`
//! starts one (in the nested host when local KVM cannot boot a stock kernel). The daemon
//! announces itself to the given address; gossip ([`super::members`]) tells everyone else.
//! A record in the state directory keeps the node part of the cluster for `status`, `ps`,
//! `ssh`, `migrate` and `down` (which stops it and forgets it).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_net::pki::ClusterCa;

use super::api::{Member, MemberState, NodeStatus};
use super::config::{self, NodeConfig};
use super::control::{self, Cluster, ControlError, SpawnOptions};
use super::members::{self, JoinRecord};
use crate::{debian, image, nested, node};

/// How long the new node may take to show up in the via member's gossip once its daemon runs.
const SEEN_LIMIT: Duration = Duration::from_secs(60);

/// What `ferry join` is given.
#[derive(Debug, Clone, Default)]
pub struct JoinOptions {
    pub name: String,
    /// A member's peer address, `HOST:PORT`.
    pub via: String,
    pub vcpus: Option<u8>,
    /// Guest memory in bytes.
    pub memory: Option<u64>,
    /// The guest's address on the cluster network (default: the first free one from .11 on).
    pub address: Option<Ipv4Addr>,
    pub api_port: Option<u16>,
    pub peer_port: Option<u16>,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cluster `{cluster}` is not running: {why}; bring it up first with `ferry up {file}`")]
    NotRunning {
        cluster: String,
        file: String,
        why: String,
    },
    #[error("the name `{name}` is taken in cluster {cluster}: {what}; choose another --name")]
    NameTaken {
        name: String,
        cluster: String,
        what: String,
    },
    #[error("--via {via}: {why}")]
    BadVia { via: String, why: String },
    #[error(
        "--via {via} is {node}'s peer address, and {node} does not answer: {why}; give the peer address of a member that runs (`ferry status` lists them)"
    )]
    ViaSilent {
        via: String,
        node: String,
        why: String,
    },
    #[error("the new node's settings: {0}")]
    Settings(String),
    #[error("{name}'s daemon runs, but {why}{log}")]
    NotSeen {
        name: String,
        why: String,
        log: String,
    },
}

impl JoinError {
    /// True for errors the user fixes on the command line or by bringing the cluster up
    /// (exit status 2).
    pub fn is_usage(&self) -> bool {
        match self {
            JoinError::Control(e) => e.is_usage(),
            JoinError::NotSeen { .. } => false,
            _ => true,
        }
    }
}

/// `ferry join FILE`: see the module's documentation. Returns every node's status at the end.
pub fn join(file: &Path, opts: &JoinOptions, quiet: bool) -> Result<Vec<NodeStatus>, JoinError> {
    let cluster = Cluster::load(file)?;
    let cfg = &cluster.config;
    let not_running = |why: String| JoinError::NotRunning {
        cluster: cfg.name.clone(),
        file: file.display().to_string(),
        why,
    };
    if !cluster.dir.token_file().is_file() || !cluster.dir.config_copy().is_file() {
        return Err(not_running(format!(
            "it was never brought up on this machine ({} has no token)",
            cluster.dir.root().display()
        )));
    }
    let running_text = std::fs::read_to_string(cluster.dir.config_copy()).unwrap_or_default();
    if running_text != cluster.text {
        return Err(ControlError::Changed {
            cluster: cfg.name.clone(),
            file: file.display().to_string(),
        }
        .into());
    }
    let found = members_of(&cluster).map_err(not_running)?;

    // The name: free, or a joined node that is down (it joins again).
    if let Some(m) = found.iter().find(|m| m.name == opts.name) {
        let what = if m.in_file {
            format!(
                "the cluster file names it (`ferry up {}` starts it)",
                file.display()
            )
        } else if m.state != MemberState::Down {
            format!("a node that joined has it and is {}", state_word(m.state))
        } else {
            String::new()
        };
        if !what.is_empty() {
            return Err(JoinError::NameTaken {
                name: opts.name.clone(),
                cluster: cfg.name.clone(),
                what,
            });
        }
    }

    // The member behind --via, which must answer.
    let via = members::resolve(&opts.via, "the address").map_err(|e| JoinError::BadVia {
        via: opts.via.clone(),
        why: format!("{e}; give a member's peer address as HOST:PORT, e.g. 127.0.0.1:7571"),
    })?;
    let peers: Vec<(String, Option<SocketAddr>)> = found
        .iter()
        .map(|m| {
            let addr = format!("{}:{}", m.host, m.peer_port);
            let resolved = members::resolve(&addr, "a member's peer address").ok();
            (addr, resolved)
        })
        .collect();
    let Some(through) = found
        .iter()
        .zip(&peers)
        .find(|(_, (_, a))| *a == Some(via))
        .map(|(m, _)| m.clone())
    else {
        let list: Vec<String> = found
            .iter()
            .zip(&peers)
            .map(|(m, (a, _))| format!("{} {a}", m.name))
            .collect();
        return Err(JoinError::BadVia {
            via: opts.via.clone(),
            why: format!(
                "no member of cluster {} has that peer address; theirs are {}",
                cfg.name,
                list.join(", ")
            ),
        });
    };
    let through_node = member_node(&through).ok_or_else(|| JoinError::BadVia {
        via: opts.via.clone(),
        why: format!(
            "member {} reports an address that is no address ({})",
            through.name, through.address
        ),
    })?;
    let rt = control::runtime()?;
    let client = cluster.client(&through_node)?;
    rt.block_on(async {
        client
            .with_timeout(Duration::from_secs(10))
            .get::<NodeStatus>("/v1/node")
            .await
    })
    .map_err(|e| JoinError::ViaSilent {
        via: opts.via.clone(),
        node: through.name.clone(),
        why: e.to_string(),
    })?;

    let node = settings(&cluster, &found, opts)?;
    control::progress(
        quiet,
        format_args!(
            "{} joins cluster {} through {} ({}): guest {}, API port {}, peer port {}, {} vCPUs, {} MiB",
            node.name,
            cfg.name,
            through.name,
            opts.via,
            node.address,
            node.api_port,
            node.peer_port,
            node.vcpus,
            node.memory >> 20
        ),
    );

    // What the daemon needs, made here where the cache is writable.
    let tls_dir = cluster.dir.tls_dir(cfg);
    if !tls_dir.join("ca.pem").is_file() {
        return Err(not_running(format!(
            "its certificate authority is not in {} (a node joins from a machine that holds the cluster's state directory)",
            tls_dir.display()
        )));
    }
    let ca = ClusterCa::load_or_create(&tls_dir, &cfg.name).map_err(ControlError::from)?;
    control::issue_certificate(&ca, &tls_dir, cfg, &node)?;
    let cache = debian::cache_dir();
    let img = image::ensure(&cache, false).map_err(ControlError::from)?;
    control::progress(
        quiet,
        format_args!("{}: preparing its root disk", node.name),
    );
    node::prepare_root_in(
        &cache,
        &cluster.dir.node_dir(&node.name),
        &node.name,
        &node.packages,
    )
    .map_err(|source| ControlError::Disk {
        node: node.name.clone(),
        source,
    })?;
    JoinRecord::new(&node, &opts.via)
        .save(&cluster.dir)
        .map_err(ControlError::from)?;

    let started = Instant::now();
    if let Err(e) = start_daemon(&cluster, &node, &img.vmlinux, &img.initrd, quiet) {
        JoinRecord::forget(&cluster.dir, &node.name);
        return Err(e);
    }
    let cluster = Cluster::load(file)?;
    let me = cluster.node_named(&node.name)?.clone();
    control::wait_ready(&cluster, &[&me], started, quiet)?;
    wait_seen(&cluster, &through_node, &node.name)?;
    control::progress(
        quiet,
        format_args!(
            "{} is a member: {} lists it as alive",
            node.name, through.name
        ),
    );
    Ok(cluster.statuses()?)
}

fn state_word(s: MemberState) -> &'static str {
    match s {
        MemberState::Unknown => "not heard of yet",
        MemberState::Alive => "alive",
        MemberState::Down => "down",
    }
}

/// A member's settings as a node of the cluster (as `ferry` reaches it).
fn member_node(m: &Member) -> Option<NodeConfig> {
    Some(NodeConfig {
        name: m.name.clone(),
        host: m.host.clone(),
        address: m.address.parse().ok()?,
        vcpus: m.vcpus,
        memory: m.memory_mib << 20,
        image: config::IMAGES[0].to_string(),
        packages: Vec::new(),
        api_port: m.api_port,
        peer_port: m.peer_port,
    })
}

/// The members as the first node that answers knows them.
fn members_of(cluster: &Cluster) -> Result<Vec<Member>, String> {
    let rt = control::runtime().map_err(|e| e.to_string())?;
    let mut tried = Vec::new();
    for n in &cluster.config.nodes {
        let client = cluster
            .client(n)
            .map_err(|e| e.to_string())?
            .with_timeout(Duration::from_secs(5));
        match rt.block_on(client.get::<Vec<Member>>("/v1/members")) {
            Ok(list) => return Ok(list),
            Err(e) => tried.push(format!("{}: {e}", n.name)),
        }
    }
    Err(format!("no node answers ({})", tried.join("; ")))
}

/// The new node's settings: the cluster file's defaults through its own checks, with the
/// next free address and ports unless given.
fn settings(
    cluster: &Cluster,
    found: &[Member],
    opts: &JoinOptions,
) -> Result<NodeConfig, JoinError> {
    let cfg = &cluster.config;
    let used: Vec<Ipv4Addr> = found
        .iter()
        .filter_map(|m| m.address.parse::<ferry_net::Ipv4Cidr>().ok())
        .map(|c| c.addr)
        .collect();
    let address = match opts.address {
        Some(a) if used.contains(&a) => {
            let who = found
                .iter()
                .find(|m| m.address.starts_with(&format!("{a}/")))
                .map_or("a member", |m| m.name.as_str());
            return Err(JoinError::Settings(format!(
                "the address {a} is {who}'s; leave --address out for the next free one"
            )));
        }
        Some(a) => a,
        None => next_free_address(cfg.subnet, &used).ok_or_else(|| {
            JoinError::Settings(format!("no free guest address is left in {}", cfg.subnet))
        })?,
    };
    let taken: Vec<(u16, &str)> = found
        .iter()
        .flat_map(|m| {
            [
                (m.api_port, m.name.as_str()),
                (m.peer_port, m.name.as_str()),
            ]
        })
        .collect();
    let next = |f: fn(&Member) -> u16| found.iter().map(f).max().map_or(0, |p| p.saturating_add(1));
    let api_port = opts.api_port.unwrap_or_else(|| next(|m| m.api_port));
    let peer_port = opts.peer_port.unwrap_or_else(|| next(|m| m.peer_port));
    for (port, flag) in [(api_port, "--api-port"), (peer_port, "--peer-port")] {
        if let Some((_, who)) = taken.iter().find(|(p, _)| *p == port) {
            return Err(JoinError::Settings(format!(
                "port {port} ({flag}) is one of {who}'s; leave {flag} out for the next free one"
            )));
        }
        if port < 1024 {
            return Err(JoinError::Settings(format!(
                "port {port} ({flag}) is not a usable port; give one from 1024 to 65535"
            )));
        }
    }
    if api_port == peer_port {
        return Err(JoinError::Settings(format!(
            "the API and peer ports are both {api_port}; give two different ports"
        )));
    }
    node_with_defaults(cluster, &opts.name, address, api_port, peer_port, opts)
}

/// The first address from the subnet's .11 on that no member uses (and not the broadcast).
fn next_free_address(subnet: ferry_net::Ipv4Cidr, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let network = u32::from(subnet.network());
    let size = 1u32 << (32 - u32::from(subnet.prefix));
    (11..size - 1)
        .map(|i| Ipv4Addr::from(network + i))
        .find(|a| !used.contains(a))
}

/// The node as the running cluster's file would have it with one more `[[node]]` table: its
/// defaults applied, and every check of a node in a file made (name, address, ranges).
fn node_with_defaults(
    cluster: &Cluster,
    name: &str,
    address: Ipv4Addr,
    api_port: u16,
    peer_port: u16,
    opts: &JoinOptions,
) -> Result<NodeConfig, JoinError> {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut table = format!(
        "\n[[node]]\nname = {}\naddress = \"{address}\"\napi_port = {api_port}\npeer_port = {peer_port}\n",
        quote(name)
    );
    if let Some(v) = opts.vcpus {
        table.push_str(&format!("vcpus = {v}\n"));
    }
    if let Some(m) = opts.memory {
        table.push_str(&format!("memory = \"{}K\"\n", m >> 10));
    }
    let text = format!("{}{table}", cluster.text);
    let parsed = config::parse(&text, &cluster.config.source).map_err(|e| match e {
        config::ConfigError::Invalid { message, .. } => JoinError::Settings(message),
        other => JoinError::Control(other.into()),
    })?;
    parsed
        .nodes
        .last()
        .filter(|n| n.name == name)
        .cloned()
        .ok_or_else(|| JoinError::Settings("the cluster file's nodes could not be extended".into()))
}

/// Starts the node's daemon where the cluster's daemons run.
fn start_daemon(
    cluster: &Cluster,
    node: &NodeConfig,
    kernel: &Path,
    initrd: &Path,
    quiet: bool,
) -> Result<(), JoinError> {
    let cfg = &cluster.config;
    if !cluster.nested() {
        control::spawn(&SpawnOptions {
            dir: cluster.dir.root().to_path_buf(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            listen: cfg.listen,
            api_host: None,
            nodes: vec![node.name.clone()],
        })?;
        return Ok(());
    }
    let host = nested::NestedHost::running()
        .map_err(ControlError::from)?
        .ok_or_else(|| JoinError::NotRunning {
            cluster: cfg.name.clone(),
            file: cfg.source.display().to_string(),
            why: "its daemons ran in the nested host, which is not running".into(),
        })?;
    control::progress(
        quiet,
        format_args!("{} runs in the nested host, with the cluster", node.name),
    );
    host.keep_for(&cfg.name).map_err(ControlError::from)?;
    host.forward_port(node.api_port)
        .map_err(ControlError::from)?;
    if let Err(e) = control::spawn_in_nested(
        &host,
        cluster,
        kernel,
        initrd,
        std::slice::from_ref(&node.name),
    ) {
        let _ = host.unforward_port(node.api_port);
        return Err(e.into());
    }
    Ok(())
}

/// Waits until `through`'s gossip lists node `name` as alive.
fn wait_seen(cluster: &Cluster, through: &NodeConfig, name: &str) -> Result<(), JoinError> {
    let rt = control::runtime()?;
    let client = cluster
        .client(through)?
        .with_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + SEEN_LIMIT;
    loop {
        let last = match rt.block_on(client.get::<Vec<Member>>("/v1/members")) {
            Ok(list) => match list.iter().find(|m| m.name == name) {
                Some(m) if m.state == MemberState::Alive => return Ok(()),
                Some(m) => format!(
                    "it is {}{}",
                    state_word(m.state),
                    m.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ),
                None => "it is not listed".into(),
            },
            Err(e) => format!("{} does not answer: {e}", through.name),
        };
        if Instant::now() > deadline {
            let log: PathBuf = cluster.dir.daemon_log(name);
            return Err(JoinError::NotSeen {
                name: name.to_string(),
                why: format!(
                    "{} has not seen it join within {} s: {last}",
                    through.name,
                    SEEN_LIMIT.as_secs()
                ),
                log: control::log_tail(&log),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_address_skips_the_members_and_the_broadcast() {
        let net: ferry_net::Ipv4Cidr = "10.77.1.0/24".parse().unwrap();
        let used: Vec<Ipv4Addr> = ["10.77.1.11", "10.77.1.12", "10.77.1.14"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            next_free_address(net, &used),
            Some("10.77.1.13".parse().unwrap())
        );
        let small: ferry_net::Ipv4Cidr = "10.0.0.0/28".parse().unwrap();
        let all: Vec<Ipv4Addr> = (11..15).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(next_free_address(small, &all), None);
    }

    fn local() -> Cluster {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/local.toml"));
        let text = std::fs::read_to_string(path).unwrap();
        let text = text.replace("packages = []", "packages = [\"htop\"]");
        Cluster {
            config: config::parse(&text, path).unwrap(),
            text,
            dir: super::super::state::ClusterDir::at(std::env::temp_dir().join("ferry-join-none")),
        }
    }

    #[test]
    fn a_joining_node_gets_the_files_defaults_or_the_flags() {
        let c = local();
        let ip: Ipv4Addr = "10.77.1.14".parse().unwrap();
        let n = node_with_defaults(&c, "node-4", ip, 7473, 7573, &JoinOptions::default()).unwrap();
        assert_eq!((n.vcpus, n.memory), (2, 512 << 20));
        assert_eq!(n.packages, vec!["htop".to_string()]);
        assert_eq!(n.address.to_string(), "10.77.1.14/24");
        assert_eq!(
            (n.api_port, n.peer_port, n.host.as_str()),
            (7473, 7573, "127.0.0.1")
        );
        let flags = JoinOptions {
            vcpus: Some(4),
            memory: Some(1 << 30),
            ..JoinOptions::default()
        };
        let n = node_with_defaults(&c, "node-4", ip, 7473, 7573, &flags).unwrap();
        assert_eq!((n.vcpus, n.memory), (4, 1 << 30));
        // The file's own checks apply: a bad name, too little memory, a clash with a file node.
        let e = node_with_defaults(&c, "Node 4\"", ip, 7473, 7573, &JoinOptions::default())
            .unwrap_err();
        assert!(matches!(e, JoinError::Settings(_)) && e.is_usage(), "{e}");
        let small = JoinOptions {
            memory: Some(64 << 20),
            ..JoinOptions::default()
        };
        let e = node_with_defaults(&c, "node-4", ip, 7473, 7573, &small).unwrap_err();
        assert!(e.to_string().contains("memory"), "{e}");
        let e = node_with_defaults(
            &c,
            "node-4",
            "10.77.1.12".parse().unwrap(),
            7473,
            7573,
            &JoinOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("10.77.1.12"), "{e}");
    }
}
