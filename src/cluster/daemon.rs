//! The node daemon: one per node, on the machine that runs the node's VMM. It is that VMM (the
//! guest runs in this process), keeps a vsock connection to the guest's agent for load and
//! processes, and serves the node API ([`super::api`]) on the API port (HTTPS, token) and the
//! peer port (mutual TLS with the cluster CA).
//!
//! A guest that reboots is booted again; one that powers off or fails leaves the node `down`
//! (the API keeps answering, and `ferry up` replaces the daemon). SIGTERM, SIGINT and
//! `POST /v1/shutdown` power the guest off (so its disk is clean) and end the daemon.

use std::convert::Infallible;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_guest_agent::client::AgentConnection;
use ferry_guest_agent::vsock::{self, VsockStream};
use ferry_net::pki::{self, Identity};
use ferry_net::tls::{self, ClientAuth};
use ferry_vmm::devices::virtio::vsock as vsock_device;
use ferry_vmm::devices::ExitRequest;
use ferry_vmm::vm::DiskConfig;
use ferry_vmm::{Vm, VmConfig, VmExit};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use vm_memory::GuestMemoryMmap;

use super::api::{self, ApiError, Load, NodeState, NodeStatus, Process, Route};
use super::balancer::Balancer;
use super::client::ApiClient;
use super::config::{self, ClusterConfig, NodeConfig};
use super::members::{Liveness, Membership, MembershipOptions};
use super::migrate::Jobs;
use super::state::ClusterDir;
use crate::run::{self, ConsoleSink, ConsoleTail, GuestNet};

/// How long a guest may take from power-on to its agent's first answer. Generous: three guests
/// booting at once in the nested host share two emulated CPUs.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// How often the guest's load is sampled.
const LOAD_INTERVAL: Duration = Duration::from_secs(1);

/// How long a peer may take to answer `GET /v1/node`.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors that keep a daemon from starting (once it serves, problems show in its state).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("reading the cluster file: {0}")]
    Config(#[from] config::ConfigError),
    #[error("node `{node}` is not in {}", file.display())]
    NoSuchNode { node: String, file: PathBuf },
    #[error(transparent)]
    State(#[from] super::state::StateError),
    #[error("the cluster's certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(#[from] tls::TlsError),
    #[error(
        "cannot listen on {addr} ({what}): {source}; another program has that port: change the ports in the cluster file"
    )]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("gossip: {0}")]
    Members(#[from] super::members::MembersError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// What a daemon is started with (`ferry daemon run`).
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The cluster's state directory.
    pub dir: PathBuf,
    pub node: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Where to listen (the cluster file's `listen` unless the nested host needs all
    /// addresses).
    pub listen: IpAddr,
    /// The API's address as users reach it, for [`NodeStatus::api_url`].
    pub api_url: String,
}

/// Prints a line to the daemon's log (its stderr) with the time.
pub(super) fn log(msg: impl std::fmt::Display) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!("[{}.{:03}] {msg}", t.as_secs(), t.subsec_millis());
}

/// The bridge of a cluster's network on its host.
pub fn bridge_name(cluster: &str) -> String {
    format!("fy-{cluster}")
}

/// What the daemon knows about its guest.
#[derive(Debug, Clone)]
struct Status {
    state: NodeState,
    detail: Option<String>,
    kernel: Option<String>,
    boot_ms: Option<u64>,
    load: Option<Load>,
    /// The last CPU sample (total, idle ticks), for the use between samples.
    cpu_sample: Option<(u64, u64)>,
    clock_ticks: u32,
}

/// What migrations use of the running guest.
pub(super) struct Guest {
    /// Its agent's vsock CID.
    pub cid: u32,
    /// Its RAM, where pages are read and landed.
    pub memory: GuestMemoryMmap,
    /// KVM's dirty log of that RAM, switched on for pre-copy.
    pub dirty: ferry_vmm::memory::DirtyLog,
}

/// One node: shared by the guest's threads and the API.
pub struct Node {
    pub(super) cluster: ClusterConfig,
    pub(super) me: NodeConfig,
    opts: DaemonOptions,
    dir: ClusterDir,
    token: String,
    peer_tls: Arc<rustls::ClientConfig>,
    status: Mutex<Status>,
    pub(super) agent: Mutex<Option<AgentConnection<VsockStream>>>,
    exit: Mutex<Option<Arc<ExitRequest>>>,
    /// The running guest, while it runs (for migrations).
    pub(super) guest: Mutex<Option<Guest>>,
    pub(super) jobs: Jobs,
    pub(super) balancer: Balancer,
    /// Every node's recent load, for the dashboard.
    pub(super) history: super::dashboard::LoadHistory,
    /// Locks and node controls (the user tools).
    pub(super) tools: super::tools::Tools,
    /// The cluster's members, by gossip.
    pub(super) members: Membership,
    stopping: AtomicBool,
    /// Whether the guest's agent answered during the guest's current life.
    agent_seen: AtomicBool,
    shutdown: tokio::sync::Notify,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether an sshd at `addr` port 22 greets a new connection (`SSH-...`) within a second or
/// two.
fn sshd_answers(addr: std::net::Ipv4Addr) -> bool {
    use std::net::TcpStream;
    let wait = Duration::from_secs(1);
    let Ok(mut stream) = TcpStream::connect_timeout(&SocketAddr::from((addr, 22)), wait) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(wait));
    let mut greeting = [0u8; 4];
    stream.read_exact(&mut greeting).is_ok() && &greeting == b"SSH-"
}

/// Runs node `opts.node`'s daemon until it is told to stop.
pub fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    let dir = ClusterDir::at(opts.dir.clone());
    let cluster = config::load(&dir.config_copy())?;
    // A node of the file, or one that joined (`ferry join`) through a member's address.
    let (me, via) =
        super::members::node_or_joined(&dir, &cluster, &opts.node)?.ok_or_else(|| {
            DaemonError::NoSuchNode {
                node: opts.node.clone(),
                file: dir.config_copy(),
            }
        })?;
    let token = dir.read_token()?;
    let tls_dir = dir.tls_dir(&cluster);
    let identity = Identity::load(&tls_dir, &me.name)?;
    let api_tls = tls::server_config(pki::load_roots(&tls_dir)?, &identity, ClientAuth::Optional)?;
    let peer_server_tls =
        tls::server_config(pki::load_roots(&tls_dir)?, &identity, ClientAuth::Required)?;
    let peer_tls = tls::client_config(pki::load_roots(&tls_dir)?, Some(&identity))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    rt.block_on(async move {
        let api_addr = SocketAddr::new(opts.listen, me.api_port);
        let peer_addr = SocketAddr::new(opts.listen, me.peer_port);
        let api_listener = bind(api_addr, "the API port").await?;
        let peer_listener = bind(peer_addr, "the peer port").await?;
        let seeds = cluster
            .nodes
            .iter()
            .filter(|n| n.name != me.name)
            .map(|n| format!("{}:{}", n.host, n.peer_port))
            .chain(via)
            .collect();
        let members = Membership::start(MembershipOptions {
            me: me.clone(),
            file_nodes: cluster.nodes.clone(),
            seeds,
            bind: peer_addr,
            token: token.clone(),
            swim: super::members::swim_config(),
        })
        .await?;
        let pid_file = dir.pid_file(&me.name);
        std::fs::write(&pid_file, format!("{}\n", std::process::id()))
            .map_err(io(format!("writing {}", pid_file.display())))?;
        log(format!(
            "node {} of cluster {}: API on https://{api_addr}, peers on {peer_addr} (mutual TLS; gossip on UDP)",
            me.name, cluster.name
        ));

        let policy = cluster.balancer.clone();
        let node = Arc::new(Node {
            status: Mutex::new(Status {
                state: NodeState::Booting,
                detail: Some("the guest is booting".into()),
                kernel: None,
                boot_ms: None,
                load: None,
                cpu_sample: None,
                clock_ticks: 100,
            }),
            cluster,
            me,
            opts,
            dir,
            token,
            peer_tls,
            agent: Mutex::new(None),
            exit: Mutex::new(None),
            guest: Mutex::new(None),
            jobs: Jobs::default(),
            balancer: Balancer::new(policy),
            history: Default::default(),
            tools: Default::default(),
            members,
            stopping: AtomicBool::new(false),
            agent_seen: AtomicBool::new(false),
            shutdown: tokio::sync::Notify::new(),
        });
        let guest = {
            let node = node.clone();
            std::thread::Builder::new()
                .name("guest".into())
                .spawn(move || node.guest_loop())
                .map_err(io("starting the guest thread"))?
        };
        tokio::spawn(node.clone().balance());
        tokio::spawn(serve(
            api_listener,
            TlsAcceptor::from(api_tls),
            node.clone(),
            "API",
        ));
        tokio::spawn(super::dashboard::sample_loads(node.clone()));
        tokio::spawn(serve(
            peer_listener,
            TlsAcceptor::from(peer_server_tls),
            node.clone(),
            "peer",
        ));

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io("installing the SIGTERM handler"))?;
        tokio::select! {
            _ = term.recv() => log("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => log("SIGINT: stopping"),
            _ = node.shutdown.notified() => log("shutdown asked over the API: stopping"),
        }
        node.members.leave().await;
        let stopping = node.clone();
        let _ = tokio::task::spawn_blocking(move || stopping.stop_guest()).await;
        let _ = tokio::task::spawn_blocking(move || guest.join()).await;
        let _ = std::fs::remove_file(&pid_file);
        log("stopped");
        Ok(())
    })
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { addr, what, source })
}

/// Accepts TLS connections on `listener` and serves the API on each. Refused handshakes (a
/// certificate from another CA; none on the peer port) are logged.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, node: Arc<Node>, port: &'static str) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log(format!("{port} port: accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    log(format!("{port} port: refused {from}: {e}"));
                    return;
                }
            };
            let peer = tls::peer_name(tls.get_ref().1);
            let service = hyper::service::service_fn(move |req| {
                let node = node.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(node.handle(req, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

pub(super) fn json_response(
    status: StatusCode,
    body: &impl serde::Serialize,
) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(super) fn error_response(status: u16, message: impl Into<String>) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(
        status,
        &ApiError {
            error: message.into(),
        },
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

impl Node {
    /// Answers one request. `peer` is the cluster node whose certificate the connection
    /// presented, if any.
    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Option<String>,
    ) -> Response<Full<Bytes>> {
        let route = match api::route(req.method().as_str(), req.uri().path(), req.uri().query()) {
            Ok(r) => r,
            Err(e) => return error_response(e.status(), e.to_string()),
        };
        if !route.is_public() && peer.is_none() {
            let auth = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if !api::bearer_matches(auth, &self.token) {
                let why = if auth.is_none() {
                    "no bearer token"
                } else {
                    "wrong bearer token"
                };
                log(format!(
                    "API: refused {} {}: {why}",
                    req.method(),
                    req.uri().path()
                ));
                return error_response(
                    401,
                    format!(
                        "{why}: send `Authorization: Bearer <token>` with the token in {}",
                        self.dir.token_file().display()
                    ),
                );
            }
        }
        match route {
            Route::Node => json_response(StatusCode::OK, &self.status()),
            Route::Nodes => json_response(StatusCode::OK, &self.all_nodes().await),
            Route::NamedNode(name) => match self.named(&name) {
                Ok(n) if n.name == self.me.name => json_response(StatusCode::OK, &self.status()),
                Ok(n) => {
                    let gossip = self.liveness(&n.name);
                    json_response(StatusCode::OK, &self.peer_status(&n, gossip).await)
                }
                Err(resp) => resp,
            },
            Route::Processes { all } => self.processes_response(all).await,
            Route::NodeProcesses { node, all } => match self.named(&node) {
                Ok(n) if n.name == self.me.name => self.processes_response(all).await,
                Ok(n) => {
                    let path = format!("/v1/processes?all={all}");
                    match self.peer_client(&n).get::<Vec<Process>>(&path).await {
                        Ok(list) => json_response(StatusCode::OK, &list),
                        Err(e) => error_response(
                            e.status().unwrap_or(502),
                            format!("node {}: {e}", n.name),
                        ),
                    }
                }
                Err(resp) => resp,
            },
            Route::Members => json_response(StatusCode::OK, &self.members.api()),
            Route::Shutdown => {
                self.shutdown.notify_one();
                json_response(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({"shutting_down": self.me.name}),
                )
            }
            Route::OpenApi => json_response(StatusCode::OK, &api::openapi()),
            Route::Migrations => json_response(StatusCode::OK, &self.jobs.list()),
            Route::Migration(id) => match self.jobs.get(id) {
                Some(job) => json_response(StatusCode::OK, &job),
                None => error_response(404, format!("node {} has no migration {id}", self.me.name)),
            },
            Route::StartMigration => self.start_migration_request(req).await,
            Route::CancelMigration(id) => match self.cancel_migration(id).await {
                Ok(job) => json_response(StatusCode::OK, &job),
                Err((status, message)) => error_response(status, message),
            },
            Route::PeerMigration => self.peer_migration_request(req, peer),
            Route::Balancer => json_response(StatusCode::OK, &self.balancer.status(&self.me.name)),
            Route::SetBalancer { node_only } => self.set_balancer_request(req, node_only).await,
            r @ (Route::Root
            | Route::Dashboard
            | Route::History { .. }
            | Route::ClusterMigrations) => super::dashboard::respond(self, r).await,
            Route::StartProcess { node } => self.start_process_request(req, node).await,
            Route::Lock { node, pid, locked } => self.lock_request(node, pid, locked).await,
            Route::NodeControl { node, action } => self.node_control_request(node, action).await,
        }
    }

    #[allow(clippy::result_large_err)]
    pub(super) fn named(&self, name: &str) -> Result<NodeConfig, Response<Full<Bytes>>> {
        self.member(name)
            .ok_or_else(|| error_response(404, self.no_member(name)))
    }

    async fn processes_response(self: &Arc<Self>, all: bool) -> Response<Full<Bytes>> {
        let node = self.clone();
        match tokio::task::spawn_blocking(move || node.processes(all)).await {
            Ok(Ok(list)) => json_response(StatusCode::OK, &list),
            Ok(Err(e)) => error_response(502, e),
            Err(e) => error_response(500, format!("listing processes: {e}")),
        }
    }

    /// This node's processes, from its agent.
    pub(super) fn processes(&self, all: bool) -> Result<Vec<Process>, String> {
        let ticks = f64::from(lock(&self.status).clock_ticks.max(1));
        let mut agent = lock(&self.agent);
        let Some(conn) = agent.as_mut() else {
            return Err(format!(
                "node {}'s guest agent is not connected ({})",
                self.me.name,
                self.status().detail.unwrap_or_else(|| "booting".into())
            ));
        };
        let listed = conn
            .process_list()
            .map_err(|e| format!("node {}'s guest agent did not answer: {e}", self.me.name))?;
        // A list cut short to fit a frame leaves out processes that still run.
        if !listed.truncated {
            self.tools
                .forget_gone(listed.processes.iter().map(|p| p.pid));
        }
        let list = listed.processes;
        Ok(list
            .into_iter()
            .filter(|p| all || !p.kernel_thread)
            .map(|p| {
                let origin = self.jobs.origin(p.pid);
                Process {
                    pid: p.pid,
                    ppid: p.ppid,
                    uid: p.uid,
                    state: char::from(p.state).to_string(),
                    threads: p.threads,
                    rss_kib: p.rss_kib,
                    cpu_seconds: p.cpu_ticks as f64 / ticks,
                    command: if p.cmdline.is_empty() {
                        format!("[{}]", p.comm)
                    } else {
                        p.cmdline.join(" ")
                    },
                    kernel_thread: p.kernel_thread,
                    moves: origin.as_ref().map_or(0, |o| o.moves),
                    home: origin.map(|o| o.home),
                    locked: self.tools.is_locked(p.pid),
                }
            })
            .collect())
    }

    /// This node as the API shows it.
    pub fn status(&self) -> NodeStatus {
        let s = lock(&self.status).clone();
        NodeStatus {
            name: self.me.name.clone(),
            address: self.me.address.addr.to_string(),
            host: self.me.host.clone(),
            state: s.state,
            detail: s.detail,
            api_url: self.opts.api_url.clone(),
            vcpus: self.me.vcpus,
            memory_mib: self.me.memory >> 20,
            kernel: s.kernel,
            boot_ms: s.boot_ms,
            load: s.load.map(|l| Load {
                busy: self.balancer.busy(),
                ..l
            }),
            accepting: self.tools.accepting(),
        }
    }

    pub(super) fn peer_client(&self, n: &NodeConfig) -> ApiClient {
        ApiClient::new(
            format!("{}:{}", n.host, n.peer_port),
            &n.name,
            self.peer_tls.clone(),
            None,
        )
        .map(|c| c.with_timeout(PEER_TIMEOUT))
        .expect("node names are valid DNS names (the cluster file checks them)")
    }

    /// Another node's status over its peer port; down if it does not answer, with gossip's
    /// reason when gossip has one (it left, or was declared down), else the peer's error.
    async fn peer_status(&self, n: &NodeConfig, gossip: Liveness) -> NodeStatus {
        match self.peer_client(n).get::<NodeStatus>("/v1/node").await {
            Ok(s) => s,
            Err(e) => NodeStatus {
                name: n.name.clone(),
                address: n.address.addr.to_string(),
                host: n.host.clone(),
                state: NodeState::Down,
                detail: Some(match gossip {
                    Liveness::Down(why) => why,
                    _ => e.to_string(),
                }),
                api_url: String::new(),
                vcpus: n.vcpus,
                memory_mib: n.memory >> 20,
                kernel: None,
                boot_ms: None,
                load: None,
                accepting: false,
            },
        }
    }

    /// Every member: the file's nodes in its order, then those that joined; peers asked at
    /// the same time.
    pub(super) async fn all_nodes(self: &Arc<Self>) -> Vec<NodeStatus> {
        let mut tasks = Vec::new();
        for (n, gossip) in self.members.list() {
            let node = self.clone();
            tasks.push(tokio::spawn(async move {
                if n.name == node.me.name {
                    node.status()
                } else {
                    node.peer_status(&n, gossip).await
                }
            }));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            if let Ok(s) = t.await {
                out.push(s);
            }
        }
        out
    }

    fn set_state(&self, state: NodeState, detail: Option<String>) {
        let mut s = lock(&self.status);
        if s.state != state || s.detail != detail {
            log(format!(
                "state: {state}{}",
                detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ));
        }
        s.state = state;
        s.detail = detail;
        if state != NodeState::Ready {
            s.load = None;
            s.cpu_sample = None;
        }
    }

    /// Boots the guest, again after each reboot, until it powers off, fails, or the daemon
    /// stops.
    fn guest_loop(self: Arc<Self>) {
        let mut early_retries = 0;
        loop {
            let started = Instant::now();
            self.agent_seen.store(false, Ordering::SeqCst);
            let outcome = self.boot_once(started);
            if self.stopping.load(Ordering::SeqCst) {
                self.set_state(NodeState::Down, Some("stopped".into()));
                return;
            }
            match outcome {
                Ok((VmExit::Reset, tail)) if !tail.contains("Kernel panic") => {
                    log("the guest rebooted: booting it again");
                    self.set_state(NodeState::Booting, Some("the guest rebooted".into()));
                }
                // A triple fault before the agent ever answered: on a nested host's emulated SVM
                // a stock kernel now and then dies this way in early boot and boots the next
                // time. Twice more, then the node is down.
                Ok((exit @ VmExit::TripleFault(_), tail))
                    if !self.agent_seen.load(Ordering::SeqCst) && early_retries < 2 =>
                {
                    early_retries += 1;
                    let why = run::describe_exit(&exit, &tail);
                    log(format!(
                        "the guest died in early boot ({why}); booting it again (attempt {})\n{}",
                        early_retries + 1,
                        tail.render(5)
                    ));
                    self.set_state(
                        NodeState::Booting,
                        Some("the guest died in early boot; booting it again".into()),
                    );
                }
                Ok((exit, tail)) => {
                    let why = run::describe_exit(&exit, &tail);
                    log(format!("the guest ended: {why}\n{}", tail.render(15)));
                    self.set_state(
                        NodeState::Down,
                        Some(format!("{why}; `ferry up` starts it again")),
                    );
                    return;
                }
                Err(e) => {
                    log(format!("the guest could not start: {e}"));
                    self.set_state(
                        NodeState::Down,
                        Some(format!("the guest could not start: {e}")),
                    );
                    return;
                }
            }
        }
    }

    /// One life of the guest: from power-on to its end. Returns how it ended and its console's
    /// last lines.
    fn boot_once(self: &Arc<Self>, started: Instant) -> Result<(VmExit, ConsoleTail), String> {
        let me = &self.me;
        let (nic, net_words) = run::setup_network(&GuestNet {
            bridge: bridge_name(&self.cluster.name),
            addr: me.address,
        })
        .map_err(|e| e.to_string())?;
        let cmdline = format!(
            "{} ferry.root=/dev/vda ferry.hostname={}{net_words}",
            run::DEFAULT_CMDLINE,
            me.name
        );
        let boot = run::check_inputs(
            me.vcpus,
            me.memory,
            &self.opts.kernel,
            Some(&self.opts.initrd),
            &cmdline,
        )
        .map_err(|e| e.to_string())?;
        let tail = ConsoleTail::default();
        let console_log = self.dir.console_log(&me.name);
        let console = ConsoleSink {
            stdout: false,
            log: File::create(&console_log).ok(),
            tail: tail.clone(),
        };
        let (vmm_end, host_end) = UnixStream::pair().map_err(|e| e.to_string())?;
        if !vsock_device::available() {
            return Err("this host offers no vhost-vsock (modprobe vhost_vsock)".into());
        }
        let cid = run::VSOCK_CID_BASE + u64::from(std::process::id());
        let vm = Vm::new(VmConfig {
            vcpus: me.vcpus,
            mem_size: me.memory,
            boot,
            console: Box::new(console),
            agent: Box::new(vmm_end.try_clone().map_err(|e| e.to_string())?),
            log_dirty: false,
            disks: vec![DiskConfig {
                path: self.dir.disk(&me.name),
                read_only: false,
            }],
            vsock_cid: Some(cid),
            nics: vec![nic],
        })
        .map_err(|e| e.to_string())?;
        let agent_port = vm.agent_port();
        std::thread::spawn(move || run::pump_into(vmm_end, agent_port));
        // The agent also speaks on the serial line; nobody listens there, so drain it.
        std::thread::spawn(move || {
            let mut host_end = host_end;
            let mut sink = [0u8; 4096];
            while matches!(host_end.read(&mut sink), Ok(n) if n > 0) {}
        });
        let running = vm.start().map_err(|e| e.to_string())?;
        let exit = running.exit_request();
        *lock(&self.exit) = Some(exit.clone());
        *lock(&self.guest) = Some(Guest {
            cid: cid as u32,
            memory: running.machine().memory.clone(),
            dirty: running.machine().dirty_log(),
        });
        if self.stopping.load(Ordering::SeqCst) {
            exit.request(VmExit::Stopped);
        }
        log(format!(
            "VM started: {} vCPUs, {} MiB, vsock CID {cid}, address {}",
            me.vcpus,
            me.memory >> 20,
            me.address
        ));
        let watcher = {
            let node = self.clone();
            let exit = exit.clone();
            std::thread::Builder::new()
                .name("agent".into())
                .spawn(move || node.watch_agent(cid as u32, &exit, started))
                .map_err(|e| e.to_string())?
        };
        let reason = running.wait();
        *lock(&self.exit) = None;
        *lock(&self.guest) = None;
        let _ = watcher.join();
        *lock(&self.agent) = None;
        Ok((reason, tail))
    }

    /// Connects to the agent once the guest is up, then samples its load until the VM ends.
    fn watch_agent(&self, cid: u32, exit: &ExitRequest, started: Instant) {
        let deadline = started + BOOT_TIMEOUT;
        let mut announced = false;
        // Users ssh in as soon as `ferry up` says ready, and a fresh disk's sshd makes its host
        // keys after the agent already answers: the node is ready once both answer.
        let mut sshd_seen = false;
        while exit.get().is_none() {
            if lock(&self.agent).is_none() {
                match VsockStream::connect(cid, vsock::AGENT_PORT)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        AgentConnection::handshake(s, Duration::from_secs(10))
                            .map_err(|e| e.to_string())
                    }) {
                    Ok(conn) => {
                        let hello = conn.hello().clone();
                        self.agent_seen.store(true, Ordering::SeqCst);
                        {
                            let mut s = lock(&self.status);
                            s.kernel = Some(hello.kernel_release.clone());
                            if !announced {
                                s.boot_ms = Some(started.elapsed().as_millis() as u64);
                            }
                        }
                        if !announced {
                            log(format!(
                                "guest agent ready after {:.1} s: kernel {}",
                                started.elapsed().as_secs_f64(),
                                hello.kernel_release
                            ));
                        }
                        announced = true;
                        *lock(&self.agent) = Some(conn);
                    }
                    Err(e) if Instant::now() > deadline && !announced => {
                        log(format!(
                            "the guest's agent did not answer within {} s: {e}",
                            BOOT_TIMEOUT.as_secs()
                        ));
                        self.set_state(
                            NodeState::Down,
                            Some(format!(
                                "the guest's agent did not answer within {} s; see {}",
                                BOOT_TIMEOUT.as_secs(),
                                self.dir.console_log(&self.me.name).display()
                            )),
                        );
                        exit.request(VmExit::Error("the agent never answered".into()));
                        return;
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            if !sshd_seen && lock(&self.agent).is_some() {
                if sshd_answers(self.me.address.addr) {
                    log(format!(
                        "sshd answers after {:.1} s",
                        started.elapsed().as_secs_f64()
                    ));
                    sshd_seen = true;
                } else if Instant::now() > deadline {
                    log(format!(
                        "the guest's sshd did not answer within {} s; the node is ready without \
                         it (see {})",
                        BOOT_TIMEOUT.as_secs(),
                        self.dir.console_log(&self.me.name).display()
                    ));
                    sshd_seen = true;
                }
            }
            self.sample_load(!sshd_seen);
            let _ = exit.wait_timeout(LOAD_INTERVAL);
        }
    }

    /// One load sample from the agent; a failed one drops the connection (it is made again).
    /// The node is ready after an answer, unless `sshd_pending` (still booting).
    fn sample_load(&self, sshd_pending: bool) {
        let result = {
            let mut agent = lock(&self.agent);
            let Some(conn) = agent.as_mut() else { return };
            let r = conn.load();
            if r.is_err() {
                *agent = None;
            }
            r
        };
        match result {
            Ok(l) => {
                let mut s = lock(&self.status);
                let cpu_percent = match s.cpu_sample {
                    Some((total, idle)) if l.cpu_total_ticks > total => {
                        let dt = (l.cpu_total_ticks - total) as f64;
                        let di = l.cpu_idle_ticks.saturating_sub(idle) as f64;
                        ((dt - di) / dt * 100.0).clamp(0.0, 100.0)
                    }
                    _ => 0.0,
                };
                s.cpu_sample = Some((l.cpu_total_ticks, l.cpu_idle_ticks));
                s.clock_ticks = l.clock_ticks_per_sec;
                s.load = Some(Load {
                    cpu_percent: (cpu_percent * 10.0).round() / 10.0,
                    run_queue: l.procs_running,
                    load_avg: l.load_milli.map(|m| f64::from(m) / 1000.0),
                    online_cpus: l.online_cpus,
                    mem_total_mib: l.mem_total_kib >> 10,
                    mem_available_mib: l.mem_available_kib >> 10,
                    tasks: l.procs_total,
                    uptime_s: l.uptime_ms / 1000,
                    busy: 0,
                });
                drop(s);
                if sshd_pending {
                    self.set_state(
                        NodeState::Booting,
                        Some("the guest's agent answers; its sshd does not yet".into()),
                    );
                } else {
                    self.set_state(NodeState::Ready, None);
                }
            }
            Err(e) => self.set_state(
                NodeState::Booting,
                Some(format!("{}: {e}", api::AGENT_SILENT)),
            ),
        }
    }

    /// Powers the guest off through its agent (so its disk is left clean), and stops the VM if
    /// it is still running after a while.
    fn stop_guest(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let exit = lock(&self.exit).clone();
        let Some(exit) = exit else { return };
        let asked = lock(&self.agent)
            .as_mut()
            .map(|c| c.power_off().is_ok())
            .unwrap_or(false);
        if !asked || exit.wait_timeout(Duration::from_secs(30)).is_none() {
            log("the guest did not power off: stopping the VM");
            exit.request(VmExit::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_the_kernel_limit() {
        // Cluster names are at most 12 characters (the cluster file checks).
        assert!(bridge_name("abcdefghijkl").len() <= 15);
        assert_eq!(bridge_name("local"), "fy-local");
    }
}
