//! The node daemon's REST API: the JSON it speaks, its routes, who may call it, and the OpenAPI
//! document that describes all of it ([`openapi`]).
//!
//! Every node serves the same API on two ports:
//! - the API port, HTTPS, for users and tools: a bearer token (`Authorization: Bearer <token>`,
//!   the token is in the cluster's state directory) or a client certificate from the cluster CA;
//!   a certificate from any other CA is refused in the TLS handshake;
//! - the peer port, mutual TLS only: other nodes, with their certificates from the cluster CA.
//!
//! Routes (all JSON):
//! - `GET /v1/node`: this node ([`NodeStatus`]);
//! - `GET /v1/nodes`: every node of the cluster, asked over the peer port ([`NodeStatus`] each);
//! - `GET /v1/nodes/{name}`: one node;
//! - `GET /v1/processes[?all=true]`: this node's processes ([`Process`]); kernel threads only
//!   with `all=true`;
//! - `GET /v1/nodes/{name}/processes[?all=true]`: another node's, through its peer port;
//! - `POST /v1/processes`: start a program ([`StartRequest`]), detached, on this node (and
//!   `POST /v1/nodes/{name}/processes` on another); answers the [`Process`] (201);
//! - `PUT` / `DELETE /v1/processes/{pid}/lock` (and `/v1/nodes/{name}/processes/{pid}/lock`):
//!   lock a process in place (no migration moves it) or unlock it; answers the [`Process`];
//! - `POST /v1/node/{block|unblock|expel|bring}` (and `/v1/nodes/{name}/...`): refuse or accept
//!   arriving processes, send the processes of other nodes back to their homes, call this
//!   node's processes back home; answers a [`NodeControlReport`];
//! - `GET /v1/members`: the cluster's members as this node's gossip knows them ([`Member`]);
//! - `POST /v1/shutdown`: power the guest off and end the daemon (what `ferry down` asks);
//! - `GET /v1/openapi.json`: the OpenAPI 3 document (no token needed);
//! - `GET /` and `GET /dashboard`: the dashboard page (no token needed), and
//!   `GET /v1/history`, `GET /v1/cluster/migrations`: what it draws ([`super::dashboard`]).
//!
//! Errors are `{"error": "<what was wrong and what to do>"}` with 400 (a request that does not
//! parse), 401 (no or wrong token), 404 (no such route or node), 405 (wrong method), 502 (a peer
//! or the guest's agent did not answer).

use serde::{Deserialize, Serialize};

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// The daemon runs; the guest is booting: its agent, or its sshd, has not answered yet.
    Booting,
    /// The guest's agent and its sshd answer.
    Ready,
    /// The guest is not running (it failed, powered off, or the daemon cannot be reached).
    Down,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Booting => "booting",
            NodeState::Ready => "ready",
            NodeState::Down => "down",
        })
    }
}

/// How a [`NodeStatus::detail`] begins when a guest that was up stopped answering its
/// daemon (the node is `Booting` again until its agent answers).
pub const AGENT_SILENT: &str = "the guest's agent stopped answering";

/// One node, as its daemon sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name from the cluster file.
    pub name: String,
    /// The guest's address on the cluster network.
    pub address: String,
    /// The machine its VMM runs on, as the cluster file says.
    pub host: String,
    pub state: NodeState,
    /// Why the node is down, or what it is waiting for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The node's API, as users reach it.
    pub api_url: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The guest's kernel release, once its agent answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Milliseconds from the VMM's start to the agent's first answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
    /// The guest's load, sampled about once a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
    /// Whether the node takes arriving processes (`ferry node block` makes it refuse them).
    #[serde(default = "yes")]
    pub accepting: bool,
}

fn yes() -> bool {
    true
}

/// A guest's load: what a balancer weighs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// CPU use over the last sample interval, all vCPUs together, 0 to 100.
    pub cpu_percent: f64,
    /// Runnable tasks right now (the run queue).
    pub run_queue: u32,
    /// The 1, 5 and 15 minute load averages.
    pub load_avg: [f64; 3],
    pub online_cpus: u32,
    pub mem_total_mib: u64,
    pub mem_available_mib: u64,
    /// Tasks in the guest.
    pub tasks: u32,
    pub uptime_s: u64,
    /// CPU-bound processes, as the node's balancer counts them.
    #[serde(default)]
    pub busy: u32,
}

/// One process in a guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    /// The kernel's one-letter state (R running, S sleeping, D disk wait, T stopped, Z zombie).
    pub state: String,
    pub threads: u32,
    pub rss_kib: u64,
    /// CPU time used, user and system.
    pub cpu_seconds: f64,
    /// The command line, or `[comm]` for a process without one (kernel threads).
    pub command: String,
    pub kernel_thread: bool,
    /// The node it started on, if it moved here from elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// How often it moved.
    #[serde(default)]
    pub moves: u32,
    /// Locked in place: no migration moves it (`ferry lock`).
    #[serde(default)]
    pub locked: bool,
}

/// `POST /v1/processes`: a program to start on the node, detached (a session of its own,
/// stdin `/dev/null`, stdout and stderr to `/var/log/ferry/PID.log` in the guest), as root in
/// `/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The program and its arguments; the program is looked up in the standard `PATH`.
    pub argv: Vec<String>,
    /// Lock it in place from the start (openMosix's `nomig`).
    #[serde(default)]
    pub locked: bool,
}

/// The error body of a `POST /v1/processes` whose program could not start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartError {
    pub error: String,
    /// Shell-style: 127 the program was not found, 126 it is not executable.
    pub exit_code: i32,
}

/// What `POST /v1/node/{action}` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeAction {
    /// Refuse arriving processes (openMosix's `mosctl block`).
    Block,
    /// Take arriving processes again.
    Unblock,
    /// Send every process here whose home is another node back home (`mosctl expel`).
    Expel,
    /// Call every process whose home is this node and that runs elsewhere back (`mosctl bring`).
    Bring,
}

impl NodeAction {
    pub const ALL: [NodeAction; 4] = [
        NodeAction::Block,
        NodeAction::Unblock,
        NodeAction::Expel,
        NodeAction::Bring,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NodeAction::Block => "block",
            NodeAction::Unblock => "unblock",
            NodeAction::Expel => "expel",
            NodeAction::Bring => "bring",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }
}

/// The answer to `POST /v1/node/{action}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeControlReport {
    pub node: String,
    /// Whether the node takes arriving processes now.
    pub accepting: bool,
    /// Expel and bring: the moves asked for, each started (with its job) or refused (with
    /// why). Empty for block and unblock.
    #[serde(default)]
    pub moves: Vec<MoveStarted>,
}

/// One move that expel or bring asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveStarted {
    /// The process's pid on the node it moves from.
    pub pid: u32,
    pub command: String,
    pub from: String,
    pub to: String,
    /// The migration job on `from` (`GET /v1/migrations/{job}` there), if it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
    /// Why it did not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What gossip says of a member ([`Member`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Not heard of since the asked daemon started (a file node that is not up).
    Unknown,
    Alive,
    /// It left the cluster or SWIM declared it down (`detail` says which).
    Down,
}

/// One member of the cluster as a daemon's gossip knows it (`GET /v1/members`): the file's
/// nodes and those that joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// The machine its daemon runs on.
    pub host: String,
    /// The guest's address with the subnet's prefix.
    pub address: String,
    pub api_port: u16,
    /// Its mutual-TLS peer port, and the UDP port of its gossip.
    pub peer_port: u16,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Whether the cluster file names it (otherwise it joined with `ferry join`).
    pub in_file: bool,
    pub state: MemberState,
    /// Why it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `POST /v1/migrations`: move process `pid` of node `node` (default: the node asked) to node
/// `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationRequest {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub to: String,
    /// How the pages move; pre-copy unless said otherwise.
    #[serde(default)]
    pub mode: MigrationMode,
    /// Pre-copy: the longest pause the process may see, in ms (the final copy is made once
    /// what is left would fit in it). 300 ms unless said otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Pre-copy: the most MiB/s the rounds may send while the process runs (the final copy,
    /// with the process frozen, goes at full speed). No cap unless said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib_s: Option<f64>,
}

/// The default downtime budget of a pre-copy migration (QEMU's and Cloud Hypervisor's).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// How a migration moves a process's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Freeze the process, copy every page, resume it at the destination.
    Stop,
    /// Copy pages while the process runs, again those it wrote (KVM's dirty log) in rounds,
    /// then freeze it for the rest.
    #[default]
    Precopy,
    /// Freeze the process, copy its registers, mappings and file-page copies, resume it at
    /// the destination at once; its anonymous memory follows while it runs, the pages it
    /// waits for first (userfaultfd in the destination guest). A failure after the resume
    /// loses the process.
    Postcopy,
}

impl std::fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrationMode::Stop => "stop",
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
        })
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop" => Ok(MigrationMode::Stop),
            "precopy" => Ok(MigrationMode::Precopy),
            "postcopy" => Ok(MigrationMode::Postcopy),
            other => Err(format!(
                "`{other}` is not a migration mode: use precopy, postcopy or stop"
            )),
        }
    }
}

/// Where a migration job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Pre-copy rounds: pages are moving while the process still runs at the source.
    Precopy,
    /// Pages are moving; the process is frozen at the source.
    Running,
    /// The process runs at the destination; the source's copy is gone.
    Done,
    /// It did not move; it runs on at the source (the error says what failed).
    Failed,
    /// Cancelled during pre-copy; it runs on at the source.
    Cancelled,
}

impl JobState {
    /// Whether the job is still going.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Precopy | JobState::Running)
    }
}

/// One migration, as the source node reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationJob {
    pub id: u64,
    /// The process's pid at the source.
    pub pid: u32,
    pub from: String,
    pub to: String,
    pub state: JobState,
    #[serde(default)]
    pub mode: MigrationMode,
    /// The process's pid at the destination, once it runs there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_pid: Option<u32>,
    /// Pre-copy round (1, 2, ...); 0 before the first and in stop mode.
    #[serde(default)]
    pub round: u32,
    /// Pages of the current step: the round's pages in pre-copy, then the process's present
    /// private pages once it is frozen; sent so far; and of those sent as zero markers.
    pub pages_total: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Of the final step's pages, those the destination already held from pre-copy.
    #[serde(default)]
    pub held_pages: u64,
    /// The process's private memory: the bytes the job moves at least once.
    #[serde(default)]
    pub bytes_total: u64,
    /// Bytes on the wire so far, all rounds and the final copy.
    pub bytes_sent: u64,
    /// Bytes still to send in the current step (its pages not yet sent).
    #[serde(default)]
    pub bytes_remaining: u64,
    /// Pre-copy: pages of the process written per second, from KVM's dirty log.
    #[serde(default)]
    pub dirty_pages_s: f64,
    /// Pre-copy: the pause the final copy would cause now, at the measured throughput.
    #[serde(default)]
    pub expected_downtime_ms: u64,
    /// The budget the job keeps the pause within (pre-copy).
    #[serde(default)]
    pub downtime_budget_ms: u64,
    /// The actual downtime: from freezing the process to it running again (at the
    /// destination, or thawed); 0 until it was frozen.
    pub frozen_ms: u64,
    /// From the request to the stream's start (freeze or survey, the connection to the peer).
    #[serde(default)]
    pub setup_ms: u64,
    pub total_ms: u64,
    pub throughput_mib_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Post-copy: when the process ran at the destination and how its anonymous pages
    /// followed (absent in the other modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyProgress>,
}

/// The post-copy part of a [`MigrationJob`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyProgress {
    /// From the request to the process running at the destination (0 until it does).
    pub resumed_ms: u64,
    /// Pages that travel after the resume (the process's anonymous memory).
    pub lazy_pages: u64,
    /// Of those, sent so far (after the process resumed).
    pub pages_after_resume: u64,
    /// Of those, sent ahead of the others because the process waited for them (its page
    /// faults served on demand).
    pub pages_on_demand: u64,
}

/// An error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// A request the API understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Node,
    Nodes,
    NamedNode(String),
    Processes {
        all: bool,
    },
    NodeProcesses {
        node: String,
        all: bool,
    },
    /// `GET /v1/members`: the members as gossip knows them.
    Members,
    Shutdown,
    OpenApi,
    /// `GET /v1/migrations`: this node's migration jobs.
    Migrations,
    /// `POST /v1/migrations`: move a process ([`MigrationRequest`]).
    StartMigration,
    /// `GET /v1/migrations/{id}`.
    Migration(u64),
    /// `DELETE /v1/migrations/{id}`: cancel a job in pre-copy.
    CancelMigration(u64),
    /// `POST /v1/peer/migrations`: a source node's page stream (peers only; the connection is
    /// upgraded to the migration protocol).
    PeerMigration,
    /// `POST /v1/processes` (`node` None) or `/v1/nodes/{node}/processes`: start a program
    /// ([`StartRequest`]).
    StartProcess {
        node: Option<String>,
    },
    /// `PUT` (`locked`) or `DELETE` `/v1/processes/{pid}/lock`, or under `/v1/nodes/{node}`.
    Lock {
        node: Option<String>,
        pid: u32,
        locked: bool,
    },
    /// `POST /v1/node/{action}` (`node` None) or `/v1/nodes/{node}/{action}`.
    NodeControl {
        node: Option<String>,
        action: NodeAction,
    },
    /// `GET /v1/balancer`: this node's balancer (policy, CPU-bound processes, decisions).
    Balancer,
    /// `PUT /v1/balancer`: change the policy ([`PolicyUpdate`](super::balancer::PolicyUpdate))
    /// on every node, or on this one only with `?scope=node`.
    SetBalancer {
        node_only: bool,
    },
    /// `GET /`: redirects to the dashboard.
    Root,
    /// `GET /dashboard`: the dashboard page.
    Dashboard,
    /// `GET /v1/history[?since=MS]`: every node's load over the last ten minutes.
    History {
        since: Option<u64>,
    },
    /// `GET /v1/cluster/migrations`: every node's migration jobs.
    ClusterMigrations,
}

impl Route {
    /// Whether anyone may ask, without a token or certificate: what holds no secret.
    pub fn is_public(&self) -> bool {
        matches!(self, Route::OpenApi | Route::Root | Route::Dashboard)
    }
}

/// Why a request maps to no route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such resource: {0}; the routes are listed at /v1/openapi.json")]
    NotFound(String),
    #[error("{method} is not allowed on {path}; use {allowed}")]
    Method {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("{0}")]
    BadRequest(String),
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            RouteError::Method { .. } => 405,
            RouteError::BadRequest(_) => 400,
        }
    }
}

/// Maps a method, path and query to a route.
pub fn route(method: &str, path: &str, query: Option<&str>) -> Result<Route, RouteError> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (route, allowed) = match segments.as_slice() {
        ["v1", "node"] => (Route::Node, "GET"),
        ["v1", "nodes"] => (Route::Nodes, "GET"),
        ["v1", "nodes", name] => (Route::NamedNode(name.to_string()), "GET"),
        ["v1", "processes"] if method == "POST" => (Route::StartProcess { node: None }, "POST"),
        ["v1", "processes"] => (Route::Processes { all: all(query)? }, "GET or POST"),
        ["v1", "nodes", name, "processes"] if method == "POST" => (
            Route::StartProcess {
                node: Some(name.to_string()),
            },
            "POST",
        ),
        ["v1", "processes", pid, "lock"] => (
            Route::Lock {
                node: None,
                pid: pid_segment(pid)?,
                locked: method != "DELETE",
            },
            "PUT or DELETE",
        ),
        ["v1", "nodes", name, "processes", pid, "lock"] => (
            Route::Lock {
                node: Some(name.to_string()),
                pid: pid_segment(pid)?,
                locked: method != "DELETE",
            },
            "PUT or DELETE",
        ),
        ["v1", "node", action] if NodeAction::parse(action).is_some() => (
            Route::NodeControl {
                node: None,
                action: NodeAction::parse(action).expect("checked by the guard"),
            },
            "POST",
        ),
        ["v1", "nodes", name, action] if NodeAction::parse(action).is_some() => (
            Route::NodeControl {
                node: Some(name.to_string()),
                action: NodeAction::parse(action).expect("checked by the guard"),
            },
            "POST",
        ),
        ["v1", "nodes", name, "processes"] => (
            Route::NodeProcesses {
                node: name.to_string(),
                all: all(query)?,
            },
            "GET or POST",
        ),
        ["v1", "members"] => (Route::Members, "GET"),
        ["v1", "shutdown"] => (Route::Shutdown, "POST"),
        ["v1", "openapi.json"] => (Route::OpenApi, "GET"),
        ["v1", "migrations"] if method == "POST" => (Route::StartMigration, "POST"),
        ["v1", "migrations"] => (Route::Migrations, "GET or POST"),
        ["v1", "migrations", id] => match id.parse() {
            Ok(id) if method == "DELETE" => (Route::CancelMigration(id), "DELETE"),
            Ok(id) => (Route::Migration(id), "GET or DELETE"),
            Err(_) => {
                return Err(RouteError::BadRequest(format!(
                    "`{id}` is not a migration id (a number, as POST /v1/migrations returned it)"
                )))
            }
        },
        ["v1", "peer", "migrations"] => (Route::PeerMigration, "POST"),
        ["v1", "balancer"] if method == "PUT" => (
            Route::SetBalancer {
                node_only: scope_is_node(query)?,
            },
            "PUT",
        ),
        ["v1", "balancer"] => (Route::Balancer, "GET or PUT"),
        [] => (Route::Root, "GET"),
        ["dashboard"] => (Route::Dashboard, "GET"),
        ["v1", "history"] => (
            Route::History {
                since: super::dashboard::since(query)?,
            },
            "GET",
        ),
        ["v1", "cluster", "migrations"] => (Route::ClusterMigrations, "GET"),
        _ => return Err(RouteError::NotFound(path.to_string())),
    };
    if !allowed.split(" or ").any(|m| m == method) {
        return Err(RouteError::Method {
            method: method.to_string(),
            path: path.to_string(),
            allowed,
        });
    }
    Ok(route)
}

/// A pid in a path.
fn pid_segment(pid: &str) -> Result<u32, RouteError> {
    pid.parse().map_err(|_| {
        RouteError::BadRequest(format!(
            "`{pid}` is not a process id (a number, as /v1/processes lists them)"
        ))
    })
}

/// The `all` query parameter: absent, `true` or `false`; anything else is a bad request.
fn all(query: Option<&str>) -> Result<bool, RouteError> {
    let mut all = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "true")) {
            ("all", "true") => all = true,
            ("all", "false") => all = false,
            ("all", v) => {
                return Err(RouteError::BadRequest(format!(
                    "query parameter all={v}: write all=true or all=false"
                )))
            }
            (key, _) => {
                return Err(RouteError::BadRequest(format!(
                    "unknown query parameter `{key}`; the only one is all=true|false"
                )))
            }
        }
    }
    Ok(all)
}

/// `?scope=node` (this node only) or `?scope=cluster` (the default: every node).
fn scope_is_node(query: Option<&str>) -> Result<bool, RouteError> {
    let mut node = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("scope", "node") => node = true,
            ("scope", "cluster") => node = false,
            ("scope", v) => {
                return Err(RouteError::BadRequest(format!(
                    "query parameter scope={v}: write scope=node or scope=cluster"
                )))
            }
            (key, _) => {
                return Err(RouteError::BadRequest(format!(
                    "unknown query parameter `{key}`; the only one is scope=node|cluster"
                )))
            }
        }
    }
    Ok(node)
}

/// Whether the `Authorization` header carries `token` (compared in constant time).
pub fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The OpenAPI 3 document of this API.
pub fn openapi() -> serde_json::Value {
    let mut doc = core_openapi();
    add_tools_openapi(&mut doc);
    doc
}

fn core_openapi() -> serde_json::Value {
    use serde_json::json;
    let error = json!({"description": "an error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let errors = |extra: &[(&str, &str)]| {
        let mut m = serde_json::Map::new();
        m.insert(
            "401".into(),
            json!({"description": "no token, a wrong token, and no cluster client certificate", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
        for (code, _) in extra {
            m.insert(code.to_string(), error.clone());
        }
        m
    };
    let ok = |schema: serde_json::Value| json!({"description": "OK", "content": {"application/json": {"schema": schema}}});
    let all = json!({"name": "all", "in": "query", "required": false, "schema": {"type": "boolean"}, "description": "include kernel threads"});
    let name =
        json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}});
    let with =
        |mut m: serde_json::Map<String, serde_json::Value>, code: &str, v: serde_json::Value| {
            m.insert(code.into(), v);
            serde_json::Value::Object(m)
        };
    let node_ref = json!({"$ref": "#/components/schemas/NodeStatus"});
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {"title": "ferry node API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "One ferry node daemon: its guest, its load and its processes, and the other nodes of its cluster."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "NodeStatus": {"type": "object",
                    "required": ["name", "address", "host", "state", "api_url", "vcpus", "memory_mib"],
                    "properties": {
                        "name": {"type": "string"}, "address": {"type": "string"}, "host": {"type": "string"},
                        "state": {"type": "string", "enum": ["booting", "ready", "down"]},
                        "detail": {"type": "string"}, "api_url": {"type": "string"},
                        "vcpus": {"type": "integer"}, "memory_mib": {"type": "integer"},
                        "kernel": {"type": "string"}, "boot_ms": {"type": "integer"},
                        "load": {"$ref": "#/components/schemas/Load"}}},
                "Member": {"type": "object",
                    "required": ["name", "host", "address", "api_port", "peer_port", "vcpus", "memory_mib", "in_file", "state"],
                    "properties": {
                        "name": {"type": "string"}, "host": {"type": "string"}, "address": {"type": "string"},
                        "api_port": {"type": "integer"}, "peer_port": {"type": "integer", "description": "mutual TLS, and the gossip's UDP port"},
                        "vcpus": {"type": "integer"}, "memory_mib": {"type": "integer"},
                        "in_file": {"type": "boolean", "description": "named by the cluster file (otherwise it joined)"},
                        "state": {"type": "string", "enum": ["unknown", "alive", "down"]},
                        "detail": {"type": "string", "description": "why it is down"}}},
                "Load": {"type": "object",
                    "required": ["cpu_percent", "run_queue", "load_avg", "online_cpus", "mem_total_mib", "mem_available_mib", "tasks", "uptime_s"],
                    "properties": {
                        "cpu_percent": {"type": "number"}, "run_queue": {"type": "integer"},
                        "load_avg": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
                        "online_cpus": {"type": "integer"}, "mem_total_mib": {"type": "integer"},
                        "mem_available_mib": {"type": "integer"}, "tasks": {"type": "integer"},
                        "uptime_s": {"type": "integer"}}},
                "Process": {"type": "object",
                    "required": ["pid", "ppid", "uid", "state", "threads", "rss_kib", "cpu_seconds", "command", "kernel_thread"],
                    "properties": {
                        "pid": {"type": "integer"}, "ppid": {"type": "integer"}, "uid": {"type": "integer"},
                        "state": {"type": "string"}, "threads": {"type": "integer"}, "rss_kib": {"type": "integer"},
                        "cpu_seconds": {"type": "number"}, "command": {"type": "string"}, "kernel_thread": {"type": "boolean"},
                        "home": {"type": "string", "description": "the node it started on, if it moved"},
                        "moves": {"type": "integer"}}},
                "MigrationRequest": {"type": "object", "required": ["pid", "to"], "additionalProperties": false,
                    "properties": {"pid": {"type": "integer"}, "node": {"type": "string", "description": "the node that runs it (default: this one)"}, "to": {"type": "string"},
                        "mode": {"type": "string", "enum": ["precopy", "postcopy", "stop"], "default": "precopy"},
                        "downtime_ms": {"type": "integer", "default": 300, "description": "pre-copy: the longest pause the process may see"},
                        "bandwidth_mib_s": {"type": "number", "description": "pre-copy: the most MiB/s while the process runs"}}},
                "MigrationJob": {"type": "object",
                    "required": ["id", "pid", "from", "to", "state", "pages_total", "pages_sent", "zero_pages", "bytes_sent", "frozen_ms", "total_ms", "throughput_mib_s"],
                    "properties": {
                        "id": {"type": "integer"}, "pid": {"type": "integer"}, "from": {"type": "string"}, "to": {"type": "string"},
                        "state": {"type": "string", "enum": ["precopy", "running", "done", "failed", "cancelled"]}, "new_pid": {"type": "integer"},
                        "mode": {"type": "string", "enum": ["precopy", "postcopy", "stop"]}, "round": {"type": "integer"},
                        "pages_total": {"type": "integer"}, "pages_sent": {"type": "integer"}, "zero_pages": {"type": "integer"},
                        "held_pages": {"type": "integer"}, "bytes_total": {"type": "integer"}, "bytes_sent": {"type": "integer"}, "bytes_remaining": {"type": "integer"},
                        "dirty_pages_s": {"type": "number"}, "expected_downtime_ms": {"type": "integer"}, "downtime_budget_ms": {"type": "integer"},
                        "frozen_ms": {"type": "integer", "description": "the actual downtime"}, "setup_ms": {"type": "integer"}, "total_ms": {"type": "integer"},
                        "throughput_mib_s": {"type": "number"}, "error": {"type": "string"}}}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/node": {"get": {"summary": "this node", "responses": with(errors(&[]), "200", ok(node_ref.clone()))}},
            "/v1/nodes": {"get": {"summary": "every node of the cluster (peers asked over mutual TLS; an unreachable one is listed as down)",
                "responses": with(errors(&[]), "200", ok(json!({"type": "array", "items": node_ref.clone()})))}},
            "/v1/nodes/{name}": {"get": {"summary": "one node", "parameters": [name.clone()],
                "responses": with(errors(&[("404", "")]), "200", ok(node_ref))}},
            "/v1/processes": {"get": {"summary": "this node's processes", "parameters": [all.clone()],
                "responses": with(errors(&[("400", ""), ("502", "")]), "200", ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Process"}})))}},
            "/v1/nodes/{name}/processes": {"get": {"summary": "a node's processes", "parameters": [name, all],
                "responses": with(errors(&[("400", ""), ("404", ""), ("502", "")]), "200", ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Process"}})))}},
            "/v1/members": {"get": {"summary": "the cluster's members as this node's gossip knows them: the file's nodes and those that joined, alive, down (left or declared down, with why) or unknown",
                "responses": with(errors(&[]), "200", ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Member"}})))}},
            "/v1/shutdown": {"post": {"summary": "power the guest off and end this node's daemon",
                "responses": with(errors(&[]), "202", json!({"description": "shutting down"}))}},
            "/v1/migrations": {
                "get": {"summary": "this node's migrations (as the source), oldest first",
                    "responses": with(errors(&[]), "200", ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/MigrationJob"}})))},
                "post": {"summary": "move a process to another node; 409 with the reason when it cannot move (it is left running)",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MigrationRequest"}}}},
                    "responses": with(errors(&[("400", ""), ("404", ""), ("409", ""), ("502", "")]), "201", ok(json!({"$ref": "#/components/schemas/MigrationJob"})))}},
            "/v1/migrations/{id}": {"get": {"summary": "one migration, live", "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                "responses": with(errors(&[("404", "")]), "200", ok(json!({"$ref": "#/components/schemas/MigrationJob"})))},
                "delete": {"summary": "cancel a migration in pre-copy (the process runs on here); 409 once the process is frozen for its final copy", "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                "responses": with(errors(&[("404", ""), ("409", "")]), "200", ok(json!({"$ref": "#/components/schemas/MigrationJob"})))}},
            "/v1/peer/migrations": {"post": {"summary": "peers only (cluster client certificate): a source node's page stream; the connection switches to the ferry-migration/3 protocol",
                "responses": {"101": {"description": "switching to the migration stream"}, "403": error.clone()}}},
            "/v1/openapi.json": {"get": {"summary": "this document", "security": [],
                "responses": {"200": {"description": "the OpenAPI document"}}}}
        }
    });
    let schemas = &mut doc["components"]["schemas"];
    schemas["MigrationJob"]["properties"]["postcopy"] = json!({"type": "object", "description": "post-copy only",
        "required": ["resumed_ms", "lazy_pages", "pages_after_resume", "pages_on_demand"],
        "properties": {
            "resumed_ms": {"type": "integer", "description": "from the request to the process running at the destination"},
            "lazy_pages": {"type": "integer", "description": "pages that travel after the resume"},
            "pages_after_resume": {"type": "integer", "description": "of those, sent so far"},
            "pages_on_demand": {"type": "integer", "description": "of those, sent first because the process waited for them"}}});
    schemas["NodeStatus"]["properties"]["accepting"] =
        json!({"type": "boolean", "description": "whether it takes processes other nodes send"});
    schemas["Load"]["properties"]["busy"] = json!({"type": "integer", "description": "CPU-bound processes, as the node's balancer counts them"});
    schemas["Process"]["properties"]["locked"] =
        json!({"type": "boolean", "description": "locked in place: no migration moves it"});
    schemas["BalancerPolicy"] = json!({"type": "object", "properties": {
        "enabled": {"type": "boolean", "description": "whether processes move by themselves"},
        "interval_ms": {"type": "integer", "minimum": 500, "maximum": 60000, "description": "how often each node weighs its load"},
        "min_cpu_share": {"type": "integer", "minimum": 1, "maximum": 100, "description": "percent of its fair share of the CPUs a process must use to count as CPU-bound"},
        "residence_s": {"type": "integer", "minimum": 0, "maximum": 3600, "description": "seconds a process stays on a node before the balancer moves it"},
        "memory_low_percent": {"type": "integer", "minimum": 0, "maximum": 90, "description": "below this much available memory a node moves processes away (0: never)"},
        "commands": {"type": "array", "items": {"type": "string"}, "description": "only these programs or scripts move by themselves (empty: any)"}}});
    schemas["BalancerStatus"] = json!({"type": "object", "required": ["node", "policy", "busy", "events"], "properties": {
        "node": {"type": "string"}, "policy": {"$ref": "#/components/schemas/BalancerPolicy"},
        "busy": {"type": "integer", "description": "CPU-bound processes on the node now"},
        "events": {"type": "array", "items": {"type": "object", "properties": {"at_ms": {"type": "integer"}, "message": {"type": "string"}}}}}});
    let status = json!({"$ref": "#/components/schemas/BalancerStatus"});
    doc["paths"]["/v1/balancer"] = json!({
        "get": {"summary": "this node's balancer: its policy, CPU-bound processes and recent decisions",
            "responses": with(errors(&[]), "200", ok(status.clone()))},
        "put": {"summary": "change the balancer's policy on every node (only the settings given; all or none applied), or on this node only with scope=node",
            "parameters": [{"name": "scope", "in": "query", "required": false, "schema": {"type": "string", "enum": ["cluster", "node"]}}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BalancerPolicy"}}}},
            "responses": with(errors(&[("400", ""), ("502", "")]), "200", ok(json!({"type": "array", "items": status})))}});
    super::dashboard::document(&mut doc);
    doc
}

/// The user tools' part of the document: starting processes, locks, node controls.
fn add_tools_openapi(doc: &mut serde_json::Value) {
    use serde_json::json;
    let err = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let ok = |code: &str, schema: &str| json!({code: {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}});
    let merge = |mut a: serde_json::Value, b: serde_json::Value| {
        if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
            a.extend(b.clone());
        }
        a
    };
    let name =
        json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}});
    let pid = json!({"name": "pid", "in": "path", "required": true, "schema": {"type": "integer"}});
    let schemas = &mut doc["components"]["schemas"];
    schemas["NodeStatus"]["properties"]["accepting"] = json!({"type": "boolean", "default": true, "description": "whether the node takes arriving processes (false after `ferry node block`)"});
    schemas["Process"]["properties"]["locked"] = json!({"type": "boolean", "default": false, "description": "locked in place: no migration moves it"});
    schemas["StartRequest"] = json!({"type": "object", "required": ["argv"], "additionalProperties": false,
        "properties": {"argv": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "the program (looked up in PATH) and its arguments"},
                       "locked": {"type": "boolean", "default": false, "description": "lock it in place from the start"}}});
    schemas["StartError"] = json!({"type": "object", "required": ["error", "exit_code"],
        "properties": {"error": {"type": "string"}, "exit_code": {"type": "integer", "description": "127 not found, 126 not executable"}}});
    schemas["MoveStarted"] = json!({"type": "object", "required": ["pid", "command", "from", "to"],
        "properties": {"pid": {"type": "integer"}, "command": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"},
                       "job": {"type": "integer", "description": "the migration job on `from`"}, "error": {"type": "string", "description": "why it did not start"}}});
    schemas["NodeControlReport"] = json!({"type": "object", "required": ["node", "accepting", "moves"],
        "properties": {"node": {"type": "string"}, "accepting": {"type": "boolean"},
                       "moves": {"type": "array", "items": {"$ref": "#/components/schemas/MoveStarted"}}}});
    let start = |params: serde_json::Value| {
        json!({"summary": "start a program detached (own session, stdin /dev/null, output to /var/log/ferry/PID.log in the guest)",
        "parameters": params,
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/StartRequest"}}}},
        "responses": merge(ok("201", "Process"), json!({"400": err("a body that is not a StartRequest"), "401": err("no or wrong token"), "404": err("no such node"),
            "422": {"description": "the program could not start", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/StartError"}}}},
            "502": err("the node or its agent did not answer")}))})
    };
    let lock = |params: serde_json::Value, what: &str| {
        json!({"summary": what, "parameters": params,
        "responses": merge(ok("200", "Process"), json!({"401": err("no or wrong token"), "404": err("no such node or process"), "502": err("the node or its agent did not answer")}))})
    };
    let control = |params: serde_json::Value| {
        json!({"post": {"summary": "block: refuse arriving processes; unblock: take them again; expel: send processes whose home is another node back home; bring: call this node's processes back home",
        "parameters": params,
        "responses": merge(ok("200", "NodeControlReport"), json!({"401": err("no or wrong token"), "404": err("no such node or action"), "502": err("a node did not answer")}))}})
    };
    let action = json!({"name": "action", "in": "path", "required": true, "schema": {"type": "string", "enum": ["block", "unblock", "expel", "bring"]}});
    let paths = &mut doc["paths"];
    paths["/v1/processes"]["post"] = start(json!([]));
    paths["/v1/nodes/{name}/processes"]["post"] = start(json!([name.clone()]));
    for (path, params) in [
        ("/v1/processes/{pid}/lock", json!([pid.clone()])),
        (
            "/v1/nodes/{name}/processes/{pid}/lock",
            json!([name.clone(), pid.clone()]),
        ),
    ] {
        paths[path] = json!({"put": lock(params.clone(), "lock the process in place: a migration of it is refused with 409"),
                             "delete": lock(params, "unlock the process")});
    }
    paths["/v1/node/{action}"] = control(json!([action.clone()]));
    paths["/v1/nodes/{name}/{action}"] = control(json!([name, action]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_methods_paths_and_queries() {
        assert_eq!(route("GET", "/v1/nodes", None), Ok(Route::Nodes));
        assert_eq!(route("GET", "/v1/nodes/", None), Ok(Route::Nodes));
        assert_eq!(
            route("GET", "/v1/nodes/node-2", None),
            Ok(Route::NamedNode("node-2".into()))
        );
        assert_eq!(
            route("GET", "/v1/nodes/node-2/processes", Some("all=true")),
            Ok(Route::NodeProcesses {
                node: "node-2".into(),
                all: true
            })
        );
        assert_eq!(
            route("GET", "/v1/processes", None),
            Ok(Route::Processes { all: false })
        );
        assert_eq!(route("POST", "/v1/shutdown", None), Ok(Route::Shutdown));
        assert_eq!(route("GET", "/v1/members", None), Ok(Route::Members));
        let e = route("GET", "/v1/shutdown", None).unwrap_err();
        assert_eq!(e.status(), 405);
        assert!(e.to_string().contains("use POST"));
        assert_eq!(route("GET", "/v2/nodes", None).unwrap_err().status(), 404);
        let e = route("GET", "/v1/processes", Some("all=maybe")).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("all=true or all=false"), "{e}");
        let e = route("GET", "/v1/processes", Some("sort=cpu")).unwrap_err();
        assert!(e.to_string().contains("`sort`"), "{e}");
        assert_eq!(
            route("DELETE", "/v1/migrations/3", None),
            Ok(Route::CancelMigration(3))
        );
        assert_eq!(
            route("GET", "/v1/migrations/3", None),
            Ok(Route::Migration(3))
        );
        let e = route("POST", "/v1/migrations/3", None).unwrap_err();
        assert!(e.to_string().contains("use GET or DELETE"), "{e}");
        assert_eq!(route("GET", "/v1/balancer", None), Ok(Route::Balancer));
        assert_eq!(
            route("PUT", "/v1/balancer", None),
            Ok(Route::SetBalancer { node_only: false })
        );
        assert_eq!(
            route("PUT", "/v1/balancer", Some("scope=node")),
            Ok(Route::SetBalancer { node_only: true })
        );
        let e = route("PUT", "/v1/balancer", Some("scope=all")).unwrap_err();
        assert!(e.to_string().contains("scope=node or scope=cluster"), "{e}");
        let e = route("POST", "/v1/balancer", None).unwrap_err();
        assert!(e.to_string().contains("use GET or PUT"), "{e}");
    }

    #[test]
    fn tool_routes_start_lock_and_control_nodes() {
        assert_eq!(
            route("POST", "/v1/processes", None),
            Ok(Route::StartProcess { node: None })
        );
        assert_eq!(
            route("POST", "/v1/nodes/node-2/processes", None),
            Ok(Route::StartProcess {
                node: Some("node-2".into())
            })
        );
        assert_eq!(
            route("PUT", "/v1/processes/42/lock", None),
            Ok(Route::Lock {
                node: None,
                pid: 42,
                locked: true
            })
        );
        assert_eq!(
            route("DELETE", "/v1/nodes/node-1/processes/42/lock", None),
            Ok(Route::Lock {
                node: Some("node-1".into()),
                pid: 42,
                locked: false
            })
        );
        let e = route("PUT", "/v1/processes/abc/lock", None).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("`abc` is not a process id"), "{e}");
        let e = route("GET", "/v1/processes/42/lock", None).unwrap_err();
        assert!(e.to_string().contains("use PUT or DELETE"), "{e}");
        for action in NodeAction::ALL {
            assert_eq!(
                route("POST", &format!("/v1/node/{}", action.name()), None),
                Ok(Route::NodeControl { node: None, action })
            );
            assert_eq!(
                route("POST", &format!("/v1/nodes/node-3/{}", action.name()), None),
                Ok(Route::NodeControl {
                    node: Some("node-3".into()),
                    action
                })
            );
        }
        let e = route("GET", "/v1/node/block", None).unwrap_err();
        assert!(e.to_string().contains("use POST"), "{e}");
        assert_eq!(
            route("POST", "/v1/node/explode", None)
                .unwrap_err()
                .status(),
            404
        );
        // Listing is unchanged; other methods name both.
        assert_eq!(
            route("GET", "/v1/nodes/node-2/processes", None),
            Ok(Route::NodeProcesses {
                node: "node-2".into(),
                all: false
            })
        );
        let e = route("PUT", "/v1/processes", None).unwrap_err();
        assert!(e.to_string().contains("use GET or POST"), "{e}");
    }

    #[test]
    fn start_requests_and_new_fields_parse_with_defaults() {
        let r: StartRequest = serde_json::from_str(r#"{"argv": ["sleep", "9"]}"#).unwrap();
        assert_eq!((r.argv.len(), r.locked), (2, false));
        let e =
            serde_json::from_str::<StartRequest>(r#"{"argv": ["x"], "lock": true}"#).unwrap_err();
        assert!(e.to_string().contains("lock"), "{e}");
        // A node or process from a daemon without the tools: accepting, unlocked.
        let n: NodeStatus = serde_json::from_str(
            r#"{"name": "n", "address": "a", "host": "h", "state": "ready", "api_url": "u", "vcpus": 1, "memory_mib": 1}"#,
        )
        .unwrap();
        assert!(n.accepting);
        let p: Process = serde_json::from_str(
            r#"{"pid": 1, "ppid": 0, "uid": 0, "state": "S", "threads": 1, "rss_kib": 1, "cpu_seconds": 0, "command": "x", "kernel_thread": false}"#,
        )
        .unwrap();
        assert!(!p.locked);
    }

    #[test]
    fn migration_requests_default_to_precopy_and_say_what_modes_exist() {
        let r: MigrationRequest = serde_json::from_str(r#"{"pid": 7, "to": "node-2"}"#).unwrap();
        assert_eq!(r.mode, MigrationMode::Precopy);
        assert_eq!(r.downtime_ms, None);
        let r: MigrationRequest =
            serde_json::from_str(r#"{"pid": 7, "to": "node-2", "mode": "stop"}"#).unwrap();
        assert_eq!(r.mode, MigrationMode::Stop);
        let e =
            serde_json::from_str::<MigrationRequest>(r#"{"pid": 7, "to": "n", "mode": "fast"}"#)
                .unwrap_err();
        assert!(e.to_string().contains("precopy"), "{e}");
        assert_eq!("stop".parse(), Ok(MigrationMode::Stop));
        assert_eq!("postcopy".parse(), Ok(MigrationMode::Postcopy));
        let r: MigrationRequest =
            serde_json::from_str(r#"{"pid": 7, "to": "node-2", "mode": "postcopy"}"#).unwrap();
        assert_eq!(r.mode, MigrationMode::Postcopy);
        let e = "fast".parse::<MigrationMode>().unwrap_err();
        assert!(e.contains("precopy, postcopy or stop"), "{e}");
    }

    #[test]
    fn bearer_tokens_must_match_exactly() {
        assert!(bearer_matches(Some("Bearer abc"), "abc"));
        assert!(!bearer_matches(Some("Bearer abd"), "abc"));
        assert!(!bearer_matches(Some("Bearer ab"), "abc"));
        assert!(!bearer_matches(Some("abc"), "abc"));
        assert!(!bearer_matches(None, "abc"));
    }

    #[test]
    fn openapi_documents_every_route_and_schema() {
        let doc = openapi();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/node",
            "/v1/nodes",
            "/v1/nodes/{name}",
            "/v1/processes",
            "/v1/nodes/{name}/processes",
            "/v1/shutdown",
            "/v1/members",
            "/v1/openapi.json",
            "/v1/migrations",
            "/v1/migrations/{id}",
            "/v1/peer/migrations",
            "/v1/balancer",
            "/v1/processes/{pid}/lock",
            "/v1/nodes/{name}/processes/{pid}/lock",
            "/v1/node/{action}",
            "/v1/nodes/{name}/{action}",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        assert!(paths["/v1/processes"]["post"]["responses"]["201"].is_object());
        assert!(paths["/v1/processes"]["get"].is_object());
        assert!(paths["/v1/nodes/{name}/processes"]["post"].is_object());
        let schemas = &doc["components"]["schemas"];
        for (schema, fields) in [
            ("StartRequest", &["argv", "locked"][..]),
            ("StartError", &["error", "exit_code"]),
            ("NodeControlReport", &["node", "accepting", "moves"]),
            (
                "MoveStarted",
                &["pid", "command", "from", "to", "job", "error"],
            ),
            ("Process", &["locked"]),
        ] {
            for f in fields {
                assert!(
                    schemas[schema]["properties"].get(f).is_some(),
                    "{schema}.{f} undocumented"
                );
            }
        }
        // Every field of the types the API returns is in its schema.
        let node = serde_json::to_value(NodeStatus {
            name: "n".into(),
            address: "a".into(),
            host: "h".into(),
            state: NodeState::Ready,
            detail: Some("d".into()),
            api_url: "u".into(),
            vcpus: 1,
            memory_mib: 1,
            kernel: Some("k".into()),
            boot_ms: Some(1),
            load: None,
            accepting: false,
        })
        .unwrap();
        let props = &doc["components"]["schemas"]["NodeStatus"]["properties"];
        for k in node.as_object().unwrap().keys() {
            assert!(props.get(k).is_some(), "NodeStatus.{k} undocumented");
        }
        let member = serde_json::to_value(Member {
            name: "n".into(),
            host: "h".into(),
            address: "a".into(),
            api_port: 1,
            peer_port: 2,
            vcpus: 1,
            memory_mib: 1,
            in_file: false,
            state: MemberState::Down,
            detail: Some("d".into()),
        })
        .unwrap();
        let props = &doc["components"]["schemas"]["Member"]["properties"];
        for k in member.as_object().unwrap().keys() {
            assert!(props.get(k).is_some(), "Member.{k} undocumented");
        }
        let load = serde_json::to_value(Load {
            cpu_percent: 0.0,
            run_queue: 0,
            load_avg: [0.0; 3],
            online_cpus: 1,
            mem_total_mib: 1,
            mem_available_mib: 1,
            tasks: 1,
            uptime_s: 1,
            busy: 1,
        })
        .unwrap();
        let props = &doc["components"]["schemas"]["Load"]["properties"];
        for k in load.as_object().unwrap().keys() {
            assert!(props.get(k).is_some(), "Load.{k} undocumented");
        }
        let job = serde_json::to_value(MigrationJob {
            id: 1,
            pid: 2,
            from: "a".into(),
            to: "b".into(),
            state: JobState::Precopy,
            mode: MigrationMode::Precopy,
            new_pid: Some(3),
            round: 1,
            pages_total: 1,
            pages_sent: 1,
            zero_pages: 1,
            held_pages: 1,
            bytes_total: 1,
            bytes_sent: 1,
            bytes_remaining: 1,
            dirty_pages_s: 1.0,
            expected_downtime_ms: 1,
            downtime_budget_ms: 1,
            frozen_ms: 1,
            setup_ms: 1,
            total_ms: 1,
            throughput_mib_s: 1.0,
            error: Some("e".into()),
            postcopy: Some(PostcopyProgress::default()),
        })
        .unwrap();
        let props = &doc["components"]["schemas"]["MigrationJob"]["properties"];
        for k in job.as_object().unwrap().keys() {
            assert!(props.get(k).is_some(), "MigrationJob.{k} undocumented");
        }
        let post = serde_json::to_value(PostcopyProgress::default()).unwrap();
        for k in post.as_object().unwrap().keys() {
            assert!(
                props["postcopy"]["properties"].get(k).is_some(),
                "MigrationJob.postcopy.{k} undocumented"
            );
        }
        let policy = serde_json::to_value(super::super::balancer::Policy::default()).unwrap();
        let props = &doc["components"]["schemas"]["BalancerPolicy"]["properties"];
        for k in policy.as_object().unwrap().keys() {
            assert!(props.get(k).is_some(), "BalancerPolicy.{k} undocumented");
        }
        let props = &doc["components"]["schemas"]["MigrationRequest"]["properties"];
        for k in [
            "pid",
            "node",
            "to",
            "mode",
            "downtime_ms",
            "bandwidth_mib_s",
        ] {
            assert!(props.get(k).is_some(), "MigrationRequest.{k} undocumented");
        }
    }
}
