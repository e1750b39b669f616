//! The `ferry` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use ferry::cluster::control::{self, ControlError};
use ferry::run::{
    GuestNet, LocalRun, RunError, DEFAULT_BOOT_TIMEOUT, DEFAULT_BRIDGE, DEFAULT_CMDLINE,
};
use ferry::{cluster, debian, image, nested};
use ferry_vmm::vm::DiskConfig;

mod tools_cmd;
use tools_cmd::{cmd_lock, cmd_mon, cmd_node, cmd_run_on, cmd_top};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Process-migration cluster of lightweight KVM VMMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two forms. Without --on/--home/--no-migrate: boot a guest in ferry's VMM, an interactive
    /// console, or `-- CMD` to run one command in a fresh guest and exit with its status. With
    /// them: start `-- CMD` on a node of the cluster (openMosix's runon, runhome, nomig),
    /// detached, and print NODE:PID (its output goes to /var/log/ferry/PID.log in the guest).
    /// E.g. `ferry run --vcpus 2 -- nproc`; `ferry run --on node-2 -- python3 job.py`.
    Run(RunArgs),
    /// The guest image (Debian's kernel, busybox and the ferry agent in an initramfs).
    Image {
        #[command(subcommand)]
        action: ImageAction,
    },
    /// Talk to a guest's agent.
    Agent {
        #[command(subcommand)]
        action: AgentAction,
    },
    /// Log in to a guest over ssh as root, with ferry's key (guests booted with `--root` let it
    /// in): a shell, or `-- CMD` to run one command.
    Ssh {
        /// A node's name in the cluster file, or a guest's address (as given to `ferry run
        /// --net`).
        node: String,
        /// The cluster file that names the node.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
        /// Command to run (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// The nested host: a QEMU machine with a real KVM, for machines whose own KVM cannot boot a
    /// stock kernel. Starting one keeps it up, so later `ferry run`s start in seconds.
    Host {
        #[command(subcommand)]
        action: HostAction,
    },
    /// Bring up the cluster of a TOML file (default configs/local.toml): certificates, root
    /// disks, one daemon and guest per node of this machine; waits until they are ready and
    /// prints their table. Running nodes are left as they are.
    Up {
        /// The cluster file.
        #[arg(default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
        /// Print no progress lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Every node of the cluster, asked of its daemon: name, address, state, load, API URL.
    /// Exits 0 when every node is ready, 3 otherwise.
    Status {
        /// The cluster file.
        #[arg(default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
        /// JSON for scripts (one object per node).
        #[arg(long)]
        json: bool,
    },
    /// Stop every node of the cluster on this machine and remove its network; the nodes'
    /// disks stay unless --purge.
    Down {
        /// The cluster file.
        #[arg(default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
        /// Also remove the cluster's state: node disks, certificates, token.
        #[arg(long)]
        purge: bool,
        /// Print no progress lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Start a new node here that joins the running cluster through one member's peer address
    /// (`ferry join --name node-4 --via 127.0.0.1:7571`), without editing anyone's file: the
    /// cluster's defaults, the next free guest address and ports, unless given. `status`,
    /// `ps`, `ssh`, `migrate` and `down` include it.
    Join {
        /// The cluster file the running cluster was brought up with.
        #[arg(default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
        /// The new node's name.
        #[arg(long)]
        name: String,
        /// A member's peer address, HOST:PORT (its peer port: 7571 is node-2's in
        /// configs/local.toml).
        #[arg(long, value_name = "HOST:PORT")]
        via: String,
        /// vCPUs (default: the cluster file's).
        #[arg(long)]
        vcpus: Option<u8>,
        /// Guest memory, e.g. 1G (default: the cluster file's).
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// The guest's address (default: the first free one from .11 on).
        #[arg(long)]
        address: Option<std::net::Ipv4Addr>,
        /// The API port (default: one above the highest a member uses).
        #[arg(long)]
        api_port: Option<u16>,
        /// The peer port, TCP and UDP (default: one above the highest a member uses).
        #[arg(long)]
        peer_port: Option<u16>,
        /// Print no progress lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Move a running process to another node: `ferry migrate node-1:4242 node-2`, or back to
    /// the node it started on: `ferry migrate node-3:4242 home`. Shows
    /// progress while pages move and a summary at the end; a process that cannot move says
    /// why and runs on where it was. `ferry migrate --cancel node-1:3` cancels job 3 of
    /// node-1 while it is in pre-copy.
    Migrate {
        /// The process: NODE:PID.
        #[arg(required_unless_present = "cancel")]
        process: Option<String>,
        /// The node to move it to, or `home`: the node it started on.
        #[arg(required_unless_present = "cancel")]
        to: Option<String>,
        /// precopy (the default: pages stream while the process runs, then a short pause for
        /// the rest), postcopy (it resumes at the destination at once and its memory follows,
        /// the pages it touches first; a failure after the resume loses it) or stop (frozen
        /// for the whole copy).
        #[arg(long, default_value = "precopy")]
        mode: cluster::api::MigrationMode,
        /// Pre-copy: the longest pause the process may see, in ms.
        #[arg(long, default_value_t = cluster::api::DEFAULT_DOWNTIME_MS)]
        downtime: u64,
        /// Pre-copy: the most MiB/s to send while the process runs (default: no cap).
        #[arg(long)]
        bandwidth: Option<f64>,
        /// Cancel job NODE:ID (as `ferry migrate` printed it) instead.
        #[arg(long, value_name = "NODE:ID", conflicts_with_all = ["process", "to"])]
        cancel: Option<String>,
        /// The cluster file.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
    },
    /// The cluster's processes, busiest first: CPU use measured between two samples, node,
    /// pid, home node, moves, memory, whether locked. Redraws in place on a terminal until
    /// Ctrl-C; --once prints one table.
    Top {
        /// The cluster file.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
        /// Print one table (after one interval) and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between samples.
        #[arg(long, default_value_t = 2.0, value_parser = parse_interval)]
        interval: f64,
    },
    /// The load of every node as bars (like mosmon): CPU use of all vCPUs, run queue, free
    /// memory. Redraws in place on a terminal until Ctrl-C; --once prints it once.
    Mon {
        /// The cluster file.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
        /// Print the nodes once and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between redraws.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
    /// Lock a process in place: no migration moves it until `ferry unlock`.
    Lock {
        /// The process: NODE:PID.
        process: String,
        /// The cluster file.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
    },
    /// Let a locked process move again.
    Unlock {
        /// The process: NODE:PID.
        process: String,
        /// The cluster file.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
    },
    /// Node controls (like mosctl): block (refuse arriving processes), unblock, expel (send the
    /// processes whose home is another node back home), bring (call the processes whose home
    /// is this node back from the other nodes). Expel and bring wait for the moves.
    Node {
        /// block, unblock, expel or bring.
        action: NodeActionArg,
        /// The node.
        node: String,
        /// The cluster file.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
    },
    /// The processes of every node (without kernel threads): node, pid, where it started, how
    /// often it moved, CPU time, memory, command.
    Ps {
        /// The cluster file.
        #[arg(default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
    },
    /// The automatic load balancer: `ferry balancer` shows each node's policy, its CPU-bound
    /// processes and latest decisions; `ferry balancer on|off` and the options change the
    /// policy on every node at once (until the cluster is brought up again from its file).
    Balancer {
        /// on, off, or show (the default).
        #[arg(default_value = "show", value_parser = ["show", "on", "off"])]
        action: String,
        /// How often each node weighs its load against the others', in ms (500 to 60000).
        #[arg(long)]
        interval_ms: Option<u64>,
        /// Percent of its fair share of the CPUs a process must use to count as CPU-bound.
        #[arg(long)]
        min_cpu_share: Option<u64>,
        /// Seconds a process stays on a node before the balancer moves it (again).
        #[arg(long)]
        residence_s: Option<u64>,
        /// Below this much available memory (percent of RAM) a node moves processes away; 0:
        /// never.
        #[arg(long)]
        memory_low_percent: Option<u64>,
        /// Only these programs or scripts move by themselves, comma-separated; "" for any.
        #[arg(long)]
        commands: Option<String>,
        /// Decisions shown per node.
        #[arg(long, default_value_t = 5)]
        events: usize,
        /// The cluster file.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
    },
    /// The dashboard's address (a web page every node serves: load over time, processes, and
    /// migrations, started by dragging a process onto a node), with the API token, and how to
    /// make a browser trust the cluster's certificates.
    Dashboard {
        /// The node whose API serves it (default: the file's first node).
        node: Option<String>,
        /// The cluster file.
        #[arg(long, default_value = cluster::control::DEFAULT_FILE)]
        file: PathBuf,
    },
    /// The node daemon and its helpers (started by `ferry up`, not by hand).
    #[command(hide = true)]
    Daemon {
        #[command(subcommand)]
        action: DaemonAction,
    },
}

#[derive(Subcommand)]
enum DaemonAction {
    /// Run one node: its VMM, its guest and its API.
    Run {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        #[arg(long)]
        listen: std::net::IpAddr,
        #[arg(long)]
        api_url: String,
    },
    /// Start these nodes' daemons here, in the background.
    Spawn {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        #[arg(long)]
        listen: std::net::IpAddr,
        #[arg(long)]
        api_host: Option<String>,
        nodes: Vec<String>,
    },
    /// Stop the cluster's daemons here and remove its network.
    Stop {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AgentAction {
    /// Round trips to a running guest's agent over vsock (`ferry run` prints the guest's CID).
    Ping {
        /// The guest's vsock context id.
        #[arg(long)]
        cid: u32,
        /// How many pings.
        #[arg(long, default_value_t = 5)]
        count: u32,
    },
}

#[derive(Subcommand)]
enum ImageAction {
    /// Build the guest image now (otherwise it is built on first use); cached until an input
    /// changes.
    Build {
        /// Rebuild even if the cached image is current.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum HostAction {
    /// Boot the nested host and leave it running.
    Start {
        /// Memory of the nested host, e.g. 4G.
        #[arg(long, default_value = "4G", value_parser = parse_size)]
        memory: u64,
        /// vCPUs of the nested host.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
    },
    /// Power the nested host off.
    Stop,
    /// Say whether a nested host is running.
    Status,
    /// Run a command in the running nested host, in the host's files (e.g. `ps ax`).
    Exec {
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NodeActionArg {
    /// Refuse arriving processes.
    Block,
    /// Take arriving processes again.
    Unblock,
    /// Send the processes whose home is another node back home.
    Expel,
    /// Call this node's processes back from the other nodes.
    Bring,
}

impl From<NodeActionArg> for cluster::api::NodeAction {
    fn from(a: NodeActionArg) -> Self {
        match a {
            NodeActionArg::Block => Self::Block,
            NodeActionArg::Unblock => Self::Unblock,
            NodeActionArg::Expel => Self::Expel,
            NodeActionArg::Bring => Self::Bring,
        }
    }
}

/// Seconds between samples: a positive number, at most an hour.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!(
            "`{s}` is not an interval: give seconds, more than 0 and at most 3600 (e.g. 0.5 or 2)"
        )),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HostChoice {
    /// This machine's KVM if it can boot a stock kernel, else the nested host.
    Auto,
    /// This machine's KVM.
    Local,
    /// The nested host.
    Nested,
}

#[derive(Args)]
struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Guest memory: a number of MiB, or with a K, M or G suffix.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// Kernel to boot (a bzImage or an ELF vmlinux); default: the guest image's Debian kernel,
    /// decompressed once on the host.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs; default: the guest image's.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Where to run the VMM.
    #[arg(long, value_enum, default_value_t = HostChoice::Auto)]
    host: HostChoice,
    /// Also write the guest console to this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Seconds to wait for the guest agent after power-on.
    #[arg(long, default_value_t = DEFAULT_BOOT_TIMEOUT.as_secs())]
    boot_timeout: u64,
    /// A raw disk image for the guest (virtio-blk: /dev/vda, /dev/vdb, ... in order); `,ro`
    /// makes it read-only. Repeatable.
    #[arg(long = "disk", value_name = "FILE[,ro]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A network interface (eth0) with this address, on a host bridge (created if missing,
    /// with the network's first address for the host): `10.77.0.2/24` or
    /// `10.77.0.2/24,bridge=NAME` (default bridge: ferry0).
    #[arg(long, value_name = "ADDR/PREFIX[,bridge=NAME]", value_parser = parse_net)]
    net: Option<GuestNet>,
    /// Boot from a Debian root disk (bash, coreutils, procps, iproute2, an ssh server,
    /// python3): the node's own copy, kept across runs, built on first use.
    #[arg(long)]
    root: bool,
    /// The node whose root disk `--root` boots (its copy lives under the cache's nodes/).
    #[arg(long, default_value = "default", requires = "root")]
    node: String,
    /// An extra Debian package for the root disk (repeatable); a new set of packages makes a
    /// new root disk image, which nodes get when their disk is made.
    #[arg(long = "package", value_name = "NAME", requires = "root")]
    packages: Vec<String>,
    /// Print no progress lines.
    #[arg(long, short)]
    quiet: bool,
    /// Cluster form: start the command on this node of the cluster (openMosix's runon).
    #[arg(long, value_name = "NODE", conflicts_with = "home")]
    on: Option<String>,
    /// Cluster form: start the command on the home node, the cluster file's first node, locked
    /// there (openMosix's runhome).
    #[arg(long)]
    home: bool,
    /// Cluster form: lock the started process in place; no migration moves it (openMosix's
    /// nomig). Without --on it starts on the cluster file's first node.
    #[arg(long)]
    no_migrate: bool,
    /// Cluster form: the cluster file (default configs/local.toml).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Command to run in the guest (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

/// Parses `512`, `512M`, `4G`, `65536K` into bytes; a bare number is MiB.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() && s[..i].chars().all(|d| d.is_ascii_digit()) => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix `{c}` in `{s}`; use K, M or G")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1 << 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. 512M or 2G"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("`{s}` is not a usable size"))
}

/// Parses `ADDR/PREFIX[,bridge=NAME]` into a guest network interface.
fn parse_net(s: &str) -> Result<GuestNet, String> {
    let (addr, rest) = s.split_once(',').unwrap_or((s, ""));
    let addr = ferry_net::Ipv4Cidr::parse_guest(addr).map_err(|e| e.to_string())?;
    let bridge = match rest {
        "" => DEFAULT_BRIDGE.to_string(),
        r => r
            .strip_prefix("bridge=")
            .filter(|b| !b.is_empty() && b.len() < 16)
            .ok_or_else(|| format!("`{r}`: write bridge=NAME (at most 15 characters)"))?
            .to_string(),
    };
    Ok(GuestNet { bridge, addr })
}

/// Parses `FILE`, `FILE,ro` or `FILE,rw` into a disk (the path made absolute).
fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        _ => (s, false),
    };
    if path.is_empty() {
        return Err("a disk needs a file: --disk FILE[,ro]".into());
    }
    let path = std::path::absolute(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(DiskConfig { path, read_only })
}

/// Checks that every disk is an existing regular file of at least one sector.
fn check_disks(disks: &[DiskConfig]) -> Result<(), UsageError> {
    for d in disks {
        let meta = std::fs::metadata(&d.path)
            .map_err(|e| UsageError(format!("--disk {}: {e}", d.path.display())))?;
        if !meta.is_file() {
            return Err(UsageError(format!(
                "--disk {}: not a regular file; give a raw disk image (e.g. made with `truncate -s 1G FILE`)",
                d.path.display()
            )));
        }
        if meta.len() < 512 {
            return Err(UsageError(format!(
                "--disk {}: smaller than one 512-byte sector",
                d.path.display()
            )));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) if args.on.is_some() || args.home || args.no_migrate => {
            cmd_run_on(&args)
        }
        Command::Run(args) if args.file.is_some() => Err(UsageError(
            "--file names the cluster of `ferry run --on NODE` (or --home, --no-migrate); give one of those too".into(),
        )
        .into()),
        Command::Run(args) => cmd_run(args),
        Command::Image {
            action: ImageAction::Build { force },
        } => image::ensure(&debian::cache_dir(), force)
            .map(|img| {
                eprintln!(
                    "ferry: guest image {} (kernel {}) at {}",
                    img.key,
                    img.kernel_release,
                    img.dir.display()
                );
                0
            })
            .context("building the guest image"),
        Command::Host { action } => cmd_host(action),
        Command::Ssh {
            node,
            file,
            command,
        } => resolve_node(&node, &file).and_then(|addr| cmd_ssh(&addr, &command)),
        Command::Up { file, quiet } => cmd_up(&file, quiet),
        Command::Status { file, json } => cmd_status(&file, json),
        Command::Down { file, purge, quiet } => cmd_down(&file, purge, quiet),
        Command::Daemon { action } => cmd_daemon(action),
        Command::Migrate {
            process,
            to,
            mode,
            downtime,
            bandwidth,
            cancel,
            file,
        } => match (cancel, process, to) {
            (Some(job), _, _) => cmd_cancel_migration(&job, &file),
            (None, Some(process), Some(to)) => cmd_migrate(
                &process,
                &to,
                &cluster::control::MigrateOptions {
                    mode,
                    downtime_ms: Some(downtime),
                    bandwidth_mib_s: bandwidth,
                },
                &file,
            ),
            _ => Err(
                UsageError("name the process and the node: ferry migrate NODE:PID TO".into())
                    .into(),
            ),
        },
        Command::Ps { file } => cmd_ps(&file),
        Command::Balancer {
            action,
            interval_ms,
            min_cpu_share,
            residence_s,
            memory_low_percent,
            commands,
            events,
            file,
        } => {
            let update = cluster::balancer::PolicyUpdate {
                enabled: match action.as_str() {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                },
                interval_ms,
                min_cpu_share,
                residence_s,
                memory_low_percent,
                commands: commands.map(|c| {
                    c.split(',')
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(String::from)
                        .collect()
                }),
            };
            cmd_balancer(&file, &update, events)
        }
        Command::Dashboard { node, file } => cmd_dashboard(node.as_deref(), &file),
        Command::Top {
            file,
            once,
            interval,
        } => cmd_top(&file, once, interval),
        Command::Mon {
            file,
            once,
            interval,
        } => cmd_mon(&file, once, interval),
        Command::Lock { process, file } => cmd_lock(&process, true, &file),
        Command::Unlock { process, file } => cmd_lock(&process, false, &file),
        Command::Node { action, node, file } => cmd_node(action.into(), &node, &file),
        Command::Join {
            file,
            name,
            via,
            vcpus,
            memory,
            address,
            api_port,
            peer_port,
            quiet,
        } => cmd_join(
            &file,
            &cluster::join::JoinOptions {
                name,
                via,
                vcpus,
                memory,
                address,
                api_port,
                peer_port,
            },
            quiet,
        ),
        Command::Agent {
            action: AgentAction::Ping { cid, count },
        } => cmd_agent_ping(cid, count),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("ferry: error: {}", render_error(&err));
            let usage = err
                .downcast_ref::<RunError>()
                .is_some_and(RunError::is_usage)
                || err
                    .downcast_ref::<ControlError>()
                    .is_some_and(ControlError::is_usage)
                || err.downcast_ref::<UsageError>().is_some()
                || err
                    .downcast_ref::<cluster::tools_client::ToolsError>()
                    .is_some_and(cluster::tools_client::ToolsError::is_usage)
                || err
                    .downcast_ref::<cluster::join::JoinError>()
                    .is_some_and(cluster::join::JoinError::is_usage);
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// The error and its causes on one line, each cause once: some messages already quote their
/// cause, and it is not repeated.
fn render_error(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// An error in what the user asked for (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn cmd_run(args: RunArgs) -> anyhow::Result<i32> {
    check_disks(&args.disks)?;
    let mut args = args;
    if args.root {
        // The node's disk becomes /dev/vda and the kernel boots from it.
        let root = ferry::node::prepare_root(&debian::cache_dir(), &args.node, &args.packages)
            .context("preparing the root disk")?;
        args.disks.insert(
            0,
            DiskConfig {
                path: root.disk,
                read_only: false,
            },
        );
        args.cmdline.push_str(&root.cmdline);
    }
    for (what, path) in [("--kernel", &args.kernel), ("--initrd", &args.initrd)] {
        if let Some(p) = path {
            if !p.is_file() {
                return Err(UsageError(format!("{what} {}: no such file", p.display())).into());
            }
        }
    }
    // No permission on an existing /dev/kvm is the user's to fix, not a reason to go nested.
    if args.host != HostChoice::Nested {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return Err(UsageError(format!(
                    "cannot open /dev/kvm: {e}; add yourself to its group (`sudo adduser $USER kvm`, then log in again) or run ferry as root"
                ))
                .into());
            }
        }
    }
    let use_nested = match args.host {
        HostChoice::Local => false,
        HostChoice::Nested => {
            if !args.quiet {
                eprintln!("ferry: using the nested host (--host nested)");
            }
            true
        }
        HostChoice::Auto => match nested::local_kvm_problem() {
            None => false,
            Some(reason) => {
                if !args.quiet {
                    eprintln!("ferry: using the nested host: {reason}");
                }
                true
            }
        },
    };
    let (kernel, initrd) = resolve_image(&args)?;
    ferry::run::check_inputs(
        args.vcpus,
        args.memory,
        &kernel,
        Some(&initrd),
        &args.cmdline,
    )?;
    if use_nested {
        return run_nested(&args, &kernel, &initrd);
    }
    if args.host == HostChoice::Local {
        if let Some(reason) = nested::local_kvm_problem() {
            if !args.quiet {
                eprintln!("ferry: warning: {reason}");
            }
        }
    }
    let code = ferry::run::run(LocalRun {
        vcpus: args.vcpus,
        mem_size: args.memory,
        kernel,
        initrd: Some(initrd),
        cmdline: args.cmdline.clone(),
        command: args.command.clone(),
        console_log: args.console_log.clone(),
        boot_timeout: Duration::from_secs(args.boot_timeout),
        verbose: !args.quiet,
        disks: args.disks.clone(),
        net: args.net.clone(),
    })?;
    Ok(code)
}

/// The kernel and initramfs to boot: given on the command line, or the guest image's.
fn resolve_image(args: &RunArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => Ok((absolute(k)?, absolute(i)?)),
        _ => {
            let img =
                image::ensure(&debian::cache_dir(), false).context("preparing the guest image")?;
            let kernel = match &args.kernel {
                Some(k) => absolute(k)?,
                None => img.vmlinux.clone(),
            };
            let initrd = match &args.initrd {
                Some(i) => absolute(i)?,
                None => img.initrd.clone(),
            };
            Ok((kernel, initrd))
        }
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Runs this same `ferry run` inside the nested host (starting one for this run if none is up),
/// with the image resolved here, where the cache is writable.
fn run_nested(args: &RunArgs, kernel: &Path, initrd: &Path) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let mut argv = vec![
        exe.to_string_lossy().into_owned(),
        "run".into(),
        "--host".into(),
        "local".into(),
        "--vcpus".into(),
        args.vcpus.to_string(),
        "--memory".into(),
        format!("{}K", args.memory >> 10),
        "--kernel".into(),
        kernel.to_string_lossy().into_owned(),
        "--initrd".into(),
        initrd.to_string_lossy().into_owned(),
        "--cmdline".into(),
        args.cmdline.clone(),
        "--boot-timeout".into(),
        args.boot_timeout.to_string(),
    ];
    if args.quiet {
        argv.push("--quiet".into());
    }
    if let Some(net) = &args.net {
        argv.push("--net".into());
        argv.push(format!("{},bridge={}", net.addr, net.bridge));
    }
    if let Some(log) = &args.console_log {
        // The host's files are read-only inside the nested host: the log is written there and
        // copied out is not possible, so refuse clearly instead of failing late.
        bail!(UsageError(format!(
            "--console-log {} cannot be written from the nested host; run with --host local on a machine with hardware KVM, or leave it out",
            log.display()
        )));
    }
    if !args.command.is_empty() {
        argv.push("--".into());
        argv.extend(args.command.iter().cloned());
    }
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let env = passthrough_env();
    let (host, one_shot) = match nested::NestedHost::running()? {
        Some(h) => (h, false),
        None => (
            nested::NestedHost::start(&nested::HostOptions::default())?,
            true,
        ),
    };
    argv[0] = host.stage_executable(&exe)?.to_string_lossy().into_owned();
    // The host's files are read-only in the nested host: a writable disk is reached through
    // the writable share, linked into it for this run.
    let mut shared = Vec::new();
    let mut disk_args = Vec::new();
    for d in &args.disks {
        let path = if d.read_only {
            d.path.clone()
        } else {
            match host.share_writable(&d.path) {
                Ok(s) => {
                    let p = s.path().to_path_buf();
                    shared.push(s);
                    p
                }
                Err(e) => {
                    if one_shot {
                        let _ = host.stop_if_unused();
                    }
                    bail!(UsageError(format!("--disk {}: {e}", d.path.display())));
                }
            }
        };
        let mode = if d.read_only { "ro" } else { "rw" };
        disk_args.extend(["--disk".to_string(), format!("{},{mode}", path.display())]);
    }
    let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    argv.splice(at..at, disk_args);
    // The guest console is interactive through the nested host too: keystrokes go through raw.
    let raw = if args.command.is_empty() {
        ferry::terminal::RawMode::enable(&std::io::stdin())?
    } else {
        None
    };
    // SIGINT/SIGTERM: leave at once. Our connection closes with us, and the nested host's agent
    // then stops the inner ferry with SIGTERM, which stops its VM cleanly; a host started just
    // for this run goes down with it.
    let _ = ferry::signals::on_terminate(move |sig| {
        ferry::terminal::restore();
        if one_shot {
            if let Ok(Some(h)) = nested::NestedHost::running() {
                let _ = h.stop();
            }
        }
        std::process::exit(128 + sig);
    });
    let result = host.exec(&argv, &cwd, &env, true);
    drop(raw);
    drop(shared);
    if one_shot {
        // Another ferry may have found this host meanwhile: it stays up until that one is done.
        if let Err(e) = host.stop_if_unused() {
            eprintln!("ferry: warning: stopping the nested host: {e}");
        }
    }
    Ok(result?)
}

/// The environment a command in the nested host gets: ours, as far as it makes sense there.
fn passthrough_env() -> Vec<(String, String)> {
    ["HOME", "TERM", "FERRY_CACHE_DIR", "XDG_CACHE_HOME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .chain([(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )])
        .collect()
}

fn cmd_agent_ping(cid: u32, count: u32) -> anyhow::Result<i32> {
    if !ferry_vmm::devices::virtio::vsock::available() {
        // The guests' vsock lives where their VMMs run: in the nested host, when there is one.
        if let Some(host) = nested::NestedHost::running()? {
            let exe = std::env::current_exe().context("locating the ferry binary")?;
            let argv = vec![
                host.stage_executable(&exe)?.to_string_lossy().into_owned(),
                "agent".into(),
                "ping".into(),
                "--cid".into(),
                cid.to_string(),
                "--count".into(),
                count.to_string(),
            ];
            let cwd = std::env::current_dir().context("reading the current directory")?;
            return Ok(host.exec(&argv, &cwd, &passthrough_env(), false)?);
        }
        return Err(UsageError(
            "this machine offers no vhost-vsock and no nested host is running: no guest can be reached over vsock here".into(),
        )
        .into());
    }
    let times = ferry::run::ping_agent(cid, count)?;
    let mut us: Vec<u128> = times.iter().map(|t| t.as_micros()).collect();
    us.sort_unstable();
    if let (Some(min), Some(max)) = (us.first(), us.last()) {
        let avg = us.iter().sum::<u128>() / us.len() as u128;
        println!(
            "{} pings: min/avg/max/median = {min}/{avg}/{max}/{} us",
            us.len(),
            us[us.len() / 2]
        );
    }
    Ok(0)
}

/// The address to ssh to for `node`: a node name becomes its guest's address from the cluster
/// file; an address stays as it is. A named node whose daemon says it is down is refused at
/// once, with the reason, instead of ssh knocking at a dead guest for minutes.
fn resolve_node(node: &str, file: &Path) -> anyhow::Result<String> {
    if node.parse::<std::net::IpAddr>().is_ok() {
        return Ok(node.to_string());
    }
    let cluster = control::Cluster::load(file)?;
    let config = cluster.node_named(node)?;
    let status = cluster.status_of(config)?;
    let detail = status.detail.as_deref().unwrap_or("no reason given");
    match status.state {
        // A daemon's own reason may already say what to do.
        cluster::api::NodeState::Down if detail.contains("`ferry up`") => {
            anyhow::bail!("{node} is down: {detail}")
        }
        cluster::api::NodeState::Down => anyhow::bail!(
            "{node} is down: {detail}; `ferry up {}` starts it again",
            file.display()
        ),
        cluster::api::NodeState::Booting => {
            eprintln!("ferry: {node} is still booting ({detail}); ssh keeps knocking")
        }
        _ => {}
    }
    Ok(config.address.addr.to_string())
}

fn cmd_up(file: &Path, quiet: bool) -> anyhow::Result<i32> {
    let statuses = control::up(file, quiet)?;
    print!("{}", control::table(&statuses));
    let all_ready = statuses
        .iter()
        .all(|s| s.state == cluster::api::NodeState::Ready);
    Ok(if all_ready { 0 } else { 1 })
}

fn cmd_status(file: &Path, json: bool) -> anyhow::Result<i32> {
    let cluster = control::Cluster::load(file)?;
    let statuses = cluster.statuses()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    } else {
        print!("{}", control::table(&statuses));
    }
    let all_ready = statuses
        .iter()
        .all(|s| s.state == cluster::api::NodeState::Ready);
    Ok(if all_ready { 0 } else { 3 })
}

fn cmd_down(file: &Path, purge: bool, quiet: bool) -> anyhow::Result<i32> {
    let stopped = control::down(file, purge, quiet)?;
    if !quiet {
        if stopped.is_empty() {
            eprintln!("ferry: no node was running");
        } else {
            eprintln!("ferry: stopped {}", stopped.join(", "));
        }
    }
    Ok(0)
}

/// `NODE:NUMBER` (a process or a job), or a usage error naming `what` and an example.
fn node_and_number<T: std::str::FromStr>(
    arg: &str,
    what: &str,
    example: &str,
) -> anyhow::Result<(String, T)> {
    arg.split_once(':')
        .and_then(|(n, p)| Some((n.to_string(), p.parse::<T>().ok()?)))
        .ok_or_else(|| {
            UsageError(format!(
                "`{arg}`: name the {what} as NODE:NUMBER, e.g. {example}"
            ))
            .into()
        })
}

fn cmd_migrate(
    process: &str,
    to: &str,
    options: &cluster::control::MigrateOptions,
    file: &Path,
) -> anyhow::Result<i32> {
    use cluster::api::JobState;
    let (node, pid) = node_and_number::<u32>(process, "process", "node-1:4242")?;
    let cluster = control::Cluster::load(file)?;
    // `home`, unless the cluster has a node of that name: where the process started.
    let home;
    let to = if to == "home" && cluster.config.node("home").is_none() {
        home = cluster::tools_client::home_of(&cluster, &node, pid)?;
        home.as_str()
    } else {
        to
    };
    // On a terminal, one line kept up to date; elsewhere, a line every few seconds.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line: Option<std::time::Instant> = None;
    let mut announced = false;
    let outcome = cluster::control::migrate(&cluster, &node, pid, to, options, &mut |job| {
        if !announced {
            eprintln!(
                "ferry: migration {node}:{} ({} mode; `ferry migrate --cancel {node}:{}` cancels it during pre-copy)",
                job.id, job.mode, job.id
            );
            announced = true;
        }
        let line = progress_line(job, &node, pid, to);
        if tty {
            eprint!("\r{line}   ");
        } else if last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(3)) {
            eprintln!("{line}");
            last_line = Some(std::time::Instant::now());
        }
    });
    if tty {
        eprintln!();
    }
    let job = outcome?;
    match job.state {
        JobState::Done => {
            let precopy = if job.mode == cluster::api::MigrationMode::Precopy {
                format!(
                    " after {} pre-copy round{} ({} pages held from them)",
                    job.round,
                    if job.round == 1 { "" } else { "s" },
                    job.held_pages
                )
            } else if let Some(p) = &job.postcopy {
                format!(
                    " running there after {} ms; {} pages followed, {} on demand",
                    p.resumed_ms, p.pages_after_resume, p.pages_on_demand
                )
            } else {
                String::new()
            };
            println!(
                "moved process {pid} from {} to {} (pid {} there){precopy}: {} MiB sent, final copy {} pages ({} zero as markers), frozen {} ms, total {} ms, {:.0} MiB/s",
                job.from,
                job.to,
                job.new_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                job.bytes_sent >> 20,
                job.pages_sent,
                job.zero_pages,
                job.frozen_ms,
                job.total_ms,
                job.throughput_mib_s
            );
            if let Some(e) = &job.error {
                eprintln!("ferry: warning: {e}");
            }
            Ok(0)
        }
        _ => {
            eprintln!(
                "ferry: error: process {pid} did not move: {}",
                job.error.as_deref().unwrap_or("no reason given")
            );
            Ok(1)
        }
    }
}

/// One progress line of a migration.
fn progress_line(job: &cluster::api::MigrationJob, node: &str, pid: u32, to: &str) -> String {
    use cluster::api::JobState;
    let pct = (job.pages_sent * 100)
        .checked_div(job.pages_total)
        .unwrap_or(0);
    let step = match job.state {
        // The dirty rate and the expected pause are known from the end of round 1 on.
        JobState::Precopy if job.round > 1 => format!(
            "pre-copy round {}, {:.0} pages written/s, {} ms frozen expected (budget {})",
            job.round, job.dirty_pages_s, job.expected_downtime_ms, job.downtime_budget_ms
        ),
        JobState::Precopy => format!("pre-copy round {}", job.round.max(1)),
        _ => match &job.postcopy {
            Some(p) if p.resumed_ms > 0 => format!(
                "runs on {to} since {} ms, pages follow ({} on demand)",
                p.resumed_ms, p.pages_on_demand
            ),
            Some(_) => "frozen, registers and file pages first".into(),
            None => "frozen, final copy".into(),
        },
    };
    const WIDTH: u64 = 20;
    let filled = (pct.min(100) * WIDTH / 100) as usize;
    let bar = format!(
        "[{}{}]",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    );
    format!(
        "ferry: moving {node}:{pid} to {to}: {bar} {step}: {}/{} pages ({pct}%), {} MiB sent, {:.0} MiB/s",
        job.pages_sent,
        job.pages_total,
        job.bytes_sent >> 20,
        job.throughput_mib_s
    )
}

fn cmd_cancel_migration(job: &str, file: &Path) -> anyhow::Result<i32> {
    let (node, id) = node_and_number::<u64>(job, "job", "node-1:3")?;
    let cluster = control::Cluster::load(file)?;
    let job = cluster::control::cancel_migration(&cluster, &node, id)?;
    println!(
        "migration {node}:{id} {}: process {} runs on at {}",
        match job.state {
            cluster::api::JobState::Cancelled => "cancelled",
            cluster::api::JobState::Failed => "had failed",
            _ => "ended",
        },
        job.pid,
        job.from
    );
    Ok(0)
}

fn cmd_join(file: &Path, opts: &cluster::join::JoinOptions, quiet: bool) -> anyhow::Result<i32> {
    let statuses = cluster::join::join(file, opts, quiet)?;
    print!("{}", control::table(&statuses));
    Ok(0)
}

fn cmd_ps(file: &Path) -> anyhow::Result<i32> {
    let cluster = control::Cluster::load(file)?;
    print!("{}", cluster::control::ps_table(&cluster.processes()?));
    Ok(0)
}

fn cmd_balancer(
    file: &Path,
    update: &cluster::balancer::PolicyUpdate,
    events: usize,
) -> anyhow::Result<i32> {
    let cluster = control::Cluster::load(file)?;
    let statuses = if update.is_empty() {
        cluster.balancers()?
    } else {
        cluster.set_balancer(update)?
    };
    print!("{}", cluster::balancer::balancer_report(&statuses, events));
    Ok(if statuses.len() == cluster.config.nodes.len() {
        0
    } else {
        3
    })
}

fn cmd_dashboard(node: Option<&str>, file: &Path) -> anyhow::Result<i32> {
    use cluster::dashboard::{self, DashboardError};
    let cluster = control::Cluster::load(file)?;
    match dashboard::link(&cluster, node) {
        Ok(link) => {
            print!("{}", dashboard::instructions(&link));
            Ok(0)
        }
        // The cluster's own errors keep their exit status (2 for a node not in the file).
        Err(DashboardError::Control(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

fn cmd_daemon(action: DaemonAction) -> anyhow::Result<i32> {
    match action {
        DaemonAction::Run {
            dir,
            node,
            kernel,
            initrd,
            listen,
            api_url,
        } => cluster::daemon::run(cluster::daemon::DaemonOptions {
            dir,
            node,
            kernel,
            initrd,
            listen,
            api_url,
        })?,
        DaemonAction::Spawn {
            dir,
            kernel,
            initrd,
            listen,
            api_host,
            nodes,
        } => control::spawn(&control::SpawnOptions {
            dir,
            kernel,
            initrd,
            listen,
            api_host,
            nodes,
        })?,
        DaemonAction::Stop { dir } => {
            control::stop(&dir)?;
        }
    }
    Ok(0)
}

fn cmd_ssh(addr: &str, command: &[String]) -> anyhow::Result<i32> {
    let (key, _) = ferry::node::ssh_key(&debian::cache_dir()).context("ferry's ssh key")?;
    let interactive = command.is_empty();
    // Guests' networks live where their VMMs run: in the nested host, when there is one.
    let nested = match nested::local_kvm_problem() {
        Some(_) => nested::NestedHost::running()?,
        None => None,
    };
    match nested {
        Some(host) => {
            let argv = ferry::node::ssh_command(&key, addr, interactive, command);
            let raw = if interactive {
                ferry::terminal::RawMode::enable(&std::io::stdin())?
            } else {
                None
            };
            let cwd = std::env::current_dir().context("reading the current directory")?;
            let code = host.exec(&argv, &cwd, &passthrough_env(), true);
            drop(raw);
            Ok(code?)
        }
        None => {
            let argv = ferry::node::ssh_command(&key, addr, false, command);
            let status = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .status()
                .context("running ssh (openssh-client)")?;
            Ok(status.code().unwrap_or(255))
        }
    }
}

fn cmd_host(action: HostAction) -> anyhow::Result<i32> {
    match action {
        HostAction::Start { memory, cpus } => {
            if let Some(h) = nested::NestedHost::running()? {
                eprintln!("ferry: a nested host is already running ({})", h.describe());
                return Ok(0);
            }
            let h = nested::NestedHost::start(&nested::HostOptions {
                memory_mib: (memory >> 20) as u32,
                cpus,
            })?;
            eprintln!("ferry: nested host running ({})", h.describe());
            Ok(0)
        }
        HostAction::Stop => match nested::NestedHost::recorded()? {
            Some(h) => {
                let clusters = h.kept_by();
                if !clusters.is_empty() {
                    eprintln!(
                        "ferry: warning: cluster {} ran in the nested host and is down with it; `ferry up` brings it back",
                        clusters.join(", ")
                    );
                }
                h.stop()?;
                eprintln!("ferry: nested host stopped");
                Ok(0)
            }
            None => {
                eprintln!("ferry: no nested host is running");
                Ok(0)
            }
        },
        HostAction::Exec { command } => match nested::NestedHost::running()? {
            Some(h) => {
                let cwd = std::env::current_dir().context("reading the current directory")?;
                Ok(h.exec(&command, &cwd, &passthrough_env(), true)?)
            }
            None => Err(UsageError(
                "no nested host is running; start one with `ferry host start`".into(),
            )
            .into()),
        },
        HostAction::Status => match nested::NestedHost::running()? {
            Some(h) => {
                println!("running {}", h.describe());
                Ok(0)
            }
            None => {
                println!("stopped");
                Ok(3)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(args).map(|c| c.command)
    }

    fn parse_error(args: &[&str]) -> String {
        match parse(args) {
            Ok(_) => panic!("{args:?} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn run_has_a_guest_form_and_a_cluster_form() {
        let Ok(Command::Run(a)) = parse(&["ferry", "run", "--vcpus", "2", "--", "nproc"]) else {
            panic!("the guest form parses");
        };
        assert!(a.on.is_none() && !a.home && !a.no_migrate && a.file.is_none());
        assert_eq!(a.command, ["nproc"]);
        let Ok(Command::Run(a)) = parse(&[
            "ferry",
            "run",
            "--on",
            "node-2",
            "--no-migrate",
            "--file",
            "c.toml",
            "--",
            "python3",
            "-c",
            "print(1)",
        ]) else {
            panic!("the cluster form parses");
        };
        assert_eq!(a.on.as_deref(), Some("node-2"));
        assert!(a.no_migrate && !a.home);
        assert_eq!(a.file.as_deref(), Some(Path::new("c.toml")));
        assert_eq!(a.command, ["python3", "-c", "print(1)"]);
        let e = parse_error(&["ferry", "run", "--on", "node-2", "--home", "--", "x"]);
        assert!(e.contains("cannot be used with"), "{e}");
    }

    #[test]
    fn tool_commands_parse_and_refuse_bad_values() {
        assert!(matches!(
            parse(&["ferry", "node", "expel", "node-1"]),
            Ok(Command::Node {
                action: NodeActionArg::Expel,
                ..
            })
        ));
        let e = parse_error(&["ferry", "node", "explode", "node-1"]);
        assert!(e.contains("block"), "{e}");
        assert!(matches!(
            parse(&["ferry", "top", "--once", "--interval", "0.5"]),
            Ok(Command::Top { once: true, interval, .. }) if interval == 0.5
        ));
        let e = parse_error(&["ferry", "top", "--interval", "0"]);
        assert!(e.contains("not an interval"), "{e}");
        assert!(matches!(
            parse(&["ferry", "lock", "node-1:42"]),
            Ok(Command::Lock { .. })
        ));
        assert!(matches!(
            parse(&["ferry", "migrate", "node-3:42", "home"]),
            Ok(Command::Migrate { to: Some(t), .. }) if t == "home"
        ));
        assert!(matches!(
            parse(&["ferry", "mon", "--once"]),
            Ok(Command::Mon { once: true, .. })
        ));
    }

    #[test]
    fn sizes_parse_with_and_without_suffix() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("65536K"), Ok(64 << 20));
        assert!(parse_size("12Q").unwrap_err().contains("suffix"));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("0").is_err());
    }
}
