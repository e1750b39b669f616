//! Moving a process from this node to another: the node daemon's part of a migration.
//!
//! Source (`POST /v1/migrations`): the guest's agent freezes the process and describes it
//! (no page data crosses vsock, only frame numbers); this daemon opens the peer port of the
//! destination (mutual TLS), switches the connection to the migration stream, and sends the
//! description and the process's private pages, read straight out of guest memory by frame
//! ([`ferry_migration::send`]). Once the destination says the process runs there, the agent
//! kills the frozen original; on any failure it thaws it, and the process runs on here.
//!
//! Destination (`POST /v1/peer/migrations`, peers only): the agent builds the skeleton (same
//! mappings at the same addresses, pinned) and reports its frames; the pages land in them
//! ([`ferry_migration::Incoming::land`]); the agent restores the registers and lets it run.
//!
//! Post-copy ([`postcopy`]): the process runs at the destination before its anonymous pages
//! arrived; they follow, those it waits for first.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_guest_agent::client::{AgentConnection, ClientError};
use ferry_guest_agent::migrate::image::{PageRef, ProcessImage};
use ferry_guest_agent::protocol::{Decoder, Message};
use ferry_guest_agent::vsock::{self, VsockStream};
use ferry_migration::{Precopied, Stats, Timeouts};
use ferry_vmm::memory::{DirtyLog, DirtyTracking};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::api::{JobState, MigrationJob, MigrationMode, MigrationRequest, DEFAULT_DOWNTIME_MS};
use super::config::NodeConfig;
use super::daemon::{error_response, json_response, lock, log, Node};

mod postcopy;

/// The protocol name of the upgraded peer connection.
pub const UPGRADE_PROTOCOL: &str = "ferry-migration/3";

/// The largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// The most pre-copy rounds before the process is frozen regardless.
const MAX_ROUNDS: u32 = 30;

/// This node's migration jobs (as the source), oldest first, and where arrived processes came
/// from (as the destination).
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    list: Mutex<Vec<MigrationJob>>,
    /// Jobs that can still be cancelled: their wake-up, and whether a cancel was asked.
    /// Locked after `list` when both are.
    cancels: Mutex<HashMap<u64, (Arc<tokio::sync::Notify>, bool)>>,
    /// Processes that arrived here: pid -> (home node, its pid there, moves so far).
    arrivals: Mutex<HashMap<u32, Origin>>,
}

/// Where an arrived process started, and how often it moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub home: String,
    pub moves: u32,
}

impl Jobs {
    fn create(&self, job: MigrationJob) -> MigrationJob {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = MigrationJob { id, ..job };
        lock(&self.list).push(job.clone());
        job
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut MigrationJob)) {
        if let Some(j) = lock(&self.list).iter_mut().find(|j| j.id == id) {
            f(j);
        }
    }

    /// The wake-up a running job waits on for a cancel.
    fn cancellable(&self, id: u64) -> Arc<tokio::sync::Notify> {
        // A cancel may have come first, between the job's creation and this call.
        lock(&self.cancels)
            .entry(id)
            .or_insert_with(|| (Arc::new(tokio::sync::Notify::new()), false))
            .0
            .clone()
    }

    /// Asks a job in pre-copy to stop; refuses one whose process is frozen (its final copy
    /// is on its way; stopping it then could leave the process nowhere) or that ended.
    fn request_cancel(&self, id: u64, node: &str) -> Result<(), (u16, String)> {
        let list = lock(&self.list);
        let Some(job) = list.iter().find(|j| j.id == id) else {
            return Err((404, format!("node {node} has no migration {id}")));
        };
        match job.state {
            JobState::Precopy => {
                let mut cancels = lock(&self.cancels);
                let (notify, asked) = cancels
                    .entry(id)
                    .or_insert_with(|| (Arc::new(tokio::sync::Notify::new()), false));
                *asked = true;
                // Stored as a permit if the job is not waiting yet.
                notify.notify_one();
                Ok(())
            }
            JobState::Running => Err((
                409,
                format!(
                    "migration {id}: process {} is frozen and its final copy is on its way to {}; it can no longer be cancelled",
                    job.pid, job.to
                ),
            )),
            state => Err((
                409,
                format!("migration {id} has already ended ({})", state_name(state)),
            )),
        }
    }

    /// Whether the job may freeze its process now (no cancel was asked); if so it is marked
    /// as running its final copy, which no cancel stops.
    fn freezing(&self, id: u64) -> bool {
        let mut list = lock(&self.list);
        if lock(&self.cancels)
            .get(&id)
            .is_some_and(|(_, asked)| *asked)
        {
            return false;
        }
        if let Some(j) = list.iter_mut().find(|j| j.id == id) {
            j.state = JobState::Running;
        }
        true
    }

    /// Records a job's end.
    fn finish(&self, id: u64, f: impl FnOnce(&mut MigrationJob)) {
        self.update(id, f);
        lock(&self.cancels).remove(&id);
    }

    pub fn list(&self) -> Vec<MigrationJob> {
        lock(&self.list).clone()
    }

    pub fn get(&self, id: u64) -> Option<MigrationJob> {
        lock(&self.list).iter().find(|j| j.id == id).cloned()
    }

    /// Where process `pid` of this node started, if it arrived here.
    pub fn origin(&self, pid: u32) -> Option<Origin> {
        lock(&self.arrivals).get(&pid).cloned()
    }
}

/// The final copy's progress, after `precopy_bytes` of pre-copy rounds.
fn apply_stats(job: &mut MigrationJob, s: &Stats, precopy_bytes: u64) {
    job.pages_sent = s.pages;
    job.zero_pages = s.zero_pages;
    job.held_pages = s.held_pages;
    job.bytes_sent = precopy_bytes + s.bytes;
    job.bytes_remaining = s.remaining_pages() * 4096;
    job.throughput_mib_s = round1(s.throughput_mib_s);
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Precopy => "precopy",
        JobState::Running => "running",
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// The `(vaddr, frame)` of the private pages among `pages`: they carry the process's own data
/// (file pages come from the destination's copy of the same file).
fn private_pages(pages: &[PageRef]) -> Vec<(u64, u64)> {
    pages
        .iter()
        .filter(|p| p.anon)
        .map(|p| (p.vaddr, p.pfn))
        .collect()
}

/// What a job knows from its request.
struct Plan {
    id: u64,
    pid: u32,
    dest: NodeConfig,
    origin: Option<Origin>,
    budget_ms: u64,
    /// Pre-copy bandwidth cap, bytes per second.
    cap: Option<u64>,
    started: Instant,
    mode: MigrationMode,
}

/// A job's first step: the frozen process (stop mode), or its outline and pages while it runs
/// (pre-copy).
enum First {
    Frozen(Box<(ProcessImage, Vec<PageRef>)>),
    Surveyed(Box<ProcessImage>, Vec<PageRef>),
}

/// Why a job ended without moving the process.
enum JobFailure {
    Cancelled,
    Failed(String),
    /// Post-copy failed after the process resumed at the destination: it is lost.
    Lost(String),
}

impl From<String> for JobFailure {
    fn from(e: String) -> Self {
        JobFailure::Failed(e)
    }
}

impl From<&str> for JobFailure {
    fn from(e: &str) -> Self {
        JobFailure::Failed(e.to_string())
    }
}

/// What the agent said no with.
enum AgentFailure {
    /// The process cannot move (openMosix's cantmove); it was not touched.
    CantMove(String),
    Other(String),
}

impl AgentFailure {
    /// The reason, for a job that already started.
    fn during_job(self) -> String {
        match self {
            AgentFailure::CantMove(reason) => format!("it can no longer move: {reason}"),
            AgentFailure::Other(e) => e,
        }
    }
}

fn agent_failure(what: &'static str) -> impl Fn(ClientError) -> AgentFailure {
    move |e| match e {
        ClientError::CantMove(reason) => AgentFailure::CantMove(reason),
        e => AgentFailure::Other(agent_error(what, &e)),
    }
}

/// One request to a job's agent thread.
enum AgentCall {
    Outline(tokio::sync::oneshot::Sender<Result<(ProcessImage, Vec<PageRef>), AgentFailure>>),
    Survey(tokio::sync::oneshot::Sender<Result<Vec<PageRef>, AgentFailure>>),
    Freeze(tokio::sync::oneshot::Sender<Result<(ProcessImage, Vec<PageRef>), AgentFailure>>),
    /// Kill the frozen process (`true`: it runs at the destination) or thaw it.
    Release(bool, tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// A job's connection to the guest's agent, on a thread of its own: ptrace binds a frozen
/// process to the thread that froze it, and the agent keeps it on the connection's thread.
/// The connection is the process's lifeline: while it is open a frozen process stays frozen;
/// if it drops (this handle dropped, the thread gone), the agent thaws it.
struct AgentThread {
    calls: std::sync::mpsc::Sender<AgentCall>,
}

impl AgentThread {
    fn spawn(node: Arc<Node>, pid: u32) -> Result<Self, (u16, String)> {
        let (calls, rx) = std::sync::mpsc::channel::<AgentCall>();
        std::thread::Builder::new()
            .name(format!("migrate-{pid}"))
            .spawn(move || {
                let mut conn = node.agent_connection();
                for call in rx {
                    let c = match conn.as_mut() {
                        Ok(c) => c,
                        Err(e) => {
                            let e = e.clone();
                            match call {
                                AgentCall::Outline(r) => drop(r.send(Err(AgentFailure::Other(e)))),
                                AgentCall::Survey(r) => drop(r.send(Err(AgentFailure::Other(e)))),
                                AgentCall::Freeze(r) => drop(r.send(Err(AgentFailure::Other(e)))),
                                AgentCall::Release(_, r) => drop(r.send(Err(e))),
                            }
                            continue;
                        }
                    };
                    match call {
                        AgentCall::Outline(reply) => {
                            let outline = c
                                .outline(pid)
                                .map_err(agent_failure("outlining the process"));
                            let _ = reply.send(outline);
                        }
                        AgentCall::Survey(reply) => {
                            let pages = c
                                .survey(pid)
                                .map_err(agent_failure("listing the process's pages"));
                            let _ = reply.send(pages);
                        }
                        AgentCall::Freeze(reply) => {
                            let frozen =
                                c.freeze(pid).map_err(agent_failure("freezing the process"));
                            let _ = reply.send(frozen);
                        }
                        AgentCall::Release(kill, reply) => {
                            let released = c
                                .release(pid, kill)
                                .map_err(|e| agent_error("releasing the frozen process", &e));
                            let _ = reply.send(released);
                            return;
                        }
                    }
                }
            })
            .map_err(|e| (500, format!("starting the migration thread: {e}")))?;
        Ok(Self { calls })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> AgentCall,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.send(make(tx)).ok()?;
        rx.await.ok()
    }

    async fn outline(&self) -> Result<(ProcessImage, Vec<PageRef>), AgentFailure> {
        self.call(AgentCall::Outline)
            .await
            .unwrap_or_else(|| Err(AgentFailure::Other("the migration thread ended".into())))
    }

    async fn survey(&self) -> Result<Vec<PageRef>, AgentFailure> {
        self.call(AgentCall::Survey)
            .await
            .unwrap_or_else(|| Err(AgentFailure::Other("the migration thread ended".into())))
    }

    async fn freeze(&self) -> Result<(ProcessImage, Vec<PageRef>), AgentFailure> {
        self.call(AgentCall::Freeze)
            .await
            .unwrap_or_else(|| Err(AgentFailure::Other("the migration thread ended".into())))
    }

    async fn release(&self, kill: bool) -> Result<(), String> {
        self.call(|r| AgentCall::Release(kill, r))
            .await
            .unwrap_or_else(|| Err("the migration thread ended".into()))
    }
}

/// A message from an agent error, with what the user can do about a refusal.
fn agent_error(what: &str, e: &ClientError) -> String {
    format!("{what}: {e}")
}

impl Node {
    /// A fresh connection to the guest's agent (migrations keep theirs for their whole run).
    fn agent_connection(&self) -> Result<AgentConnection<VsockStream>, String> {
        let cid = lock(&self.guest)
            .as_ref()
            .map(|g| g.cid)
            .ok_or_else(|| format!("node {}'s guest is not running", self.me.name))?;
        let stream = VsockStream::connect(cid, vsock::AGENT_PORT)
            .map_err(|e| format!("cannot reach node {}'s agent: {e}", self.me.name))?;
        AgentConnection::handshake(stream, Duration::from_secs(10))
            .map_err(|e| format!("node {}'s agent: {e}", self.me.name))
    }

    fn memory(&self) -> Result<vm_memory::GuestMemoryMmap, String> {
        lock(&self.guest)
            .as_ref()
            .map(|g| g.memory.clone())
            .ok_or_else(|| format!("node {}'s guest is not running", self.me.name))
    }

    fn dirty_log(&self) -> Result<DirtyLog, (u16, String)> {
        lock(&self.guest)
            .as_ref()
            .map(|g| g.dirty.clone())
            .ok_or_else(|| (502, format!("node {}'s guest is not running", self.me.name)))
    }

    /// `DELETE /v1/migrations/{id}`: cancels a job in pre-copy and reports it once it ended
    /// (the process runs on here).
    pub(super) async fn cancel_migration(&self, id: u64) -> Result<MigrationJob, (u16, String)> {
        self.jobs.request_cancel(id, &self.me.name)?;
        // The job stops at its next await point: within one batch or one agent request.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.jobs.get(id) {
                Some(j) if !j.state.is_active() => return Ok(j),
                _ if Instant::now() > deadline => {
                    return Err((
                        504,
                        format!("migration {id} was asked to stop and has not yet; GET /v1/migrations/{id} shows when it does"),
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `POST /v1/migrations`: reads the request, then moves the process (see
    /// [`Node::start_migration`]), here or through the node that runs it.
    pub(super) async fn start_migration_request(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error_response(400, format!("reading the request body: {e}")),
        };
        let request: MigrationRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error_response(
                    400,
                    format!(
                        "the body is not a migration request ({e}); send {{\"pid\": 4242, \"to\": \"node-2\"}} (and \"node\" for a process of another node)"
                    ),
                )
            }
        };
        let source = request.node.clone().unwrap_or_else(|| self.me.name.clone());
        let Some(n) = self.member(&source) else {
            return error_response(404, self.no_member(&source));
        };
        if source != self.me.name {
            // The node that runs the process drives its migration.
            let forwarded = MigrationRequest {
                node: None,
                ..request
            };
            return match self
                .peer_client(&n)
                .post_json("/v1/migrations", &forwarded)
                .await
            {
                Ok((status, body)) => {
                    let mut resp = Response::new(Full::new(body));
                    *resp.status_mut() =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                Err(e) => error_response(502, format!("node {source}: {e}")),
            };
        }
        match self.start_migration(request).await {
            Ok(job) => json_response(StatusCode::CREATED, &job),
            Err((status, message)) => error_response(status, message),
        }
    }

    /// Starts moving a process: freezes it (stop mode) or checks that it can move and lists
    /// its pages (pre-copy), then streams on a thread of its own. Returns the job (201), or
    /// why it cannot move (409) or could not start, with the process left as it was.
    pub(super) async fn start_migration(
        self: &Arc<Self>,
        request: MigrationRequest,
    ) -> Result<MigrationJob, (u16, String)> {
        let pid = request.pid;
        if request.to == self.me.name {
            return Err((
                400,
                format!("process {pid} already runs on {}", self.me.name),
            ));
        }
        let Some(dest) = self.member(&request.to) else {
            return Err((404, self.no_member(&request.to)));
        };
        self.check_move(pid, &dest).await?;
        let cap = match request.bandwidth_mib_s {
            Some(c) if !(c.is_finite() && c > 0.0) => {
                return Err((
                    400,
                    format!("bandwidth_mib_s is {c}: give a positive number of MiB/s, or leave it out for no cap"),
                ))
            }
            c => c.map(|c| (c * 1024.0 * 1024.0) as u64),
        };
        let budget_ms = request.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS);
        let started = Instant::now();
        let agent = AgentThread::spawn(self.clone(), pid)?;
        let refused = |f: AgentFailure| match f {
            AgentFailure::CantMove(reason) => (
                409,
                format!("process {pid} on {} cannot move: {reason}", self.me.name),
            ),
            AgentFailure::Other(e) => (502, e),
        };
        let (first, tracking) = match request.mode {
            MigrationMode::Stop | MigrationMode::Postcopy => (
                First::Frozen(Box::new(agent.freeze().await.map_err(refused)?)),
                None,
            ),
            MigrationMode::Precopy => {
                let (outline, pages) = agent.outline().await.map_err(refused)?;
                // Logging starts before any page is read: a write after a page was read
                // always shows in the log.
                let tracking = self
                    .dirty_log()?
                    .start()
                    .map_err(|e| (409, format!("node {}: {e}", self.me.name)))?;
                (First::Surveyed(Box::new(outline), pages), Some(tracking))
            }
        };
        let job = self.jobs.create(MigrationJob {
            id: 0,
            pid,
            from: self.me.name.clone(),
            to: dest.name.clone(),
            state: match first {
                First::Frozen(_) => JobState::Running,
                First::Surveyed(..) => JobState::Precopy,
            },
            mode: request.mode,
            new_pid: None,
            round: 0,
            pages_total: 0,
            pages_sent: 0,
            zero_pages: 0,
            held_pages: 0,
            bytes_total: match &first {
                First::Frozen(frozen) => private_pages(&frozen.1).len() as u64 * 4096,
                First::Surveyed(_, pages) => private_pages(pages).len() as u64 * 4096,
            },
            bytes_sent: 0,
            bytes_remaining: 0,
            dirty_pages_s: 0.0,
            expected_downtime_ms: 0,
            downtime_budget_ms: match request.mode {
                MigrationMode::Stop | MigrationMode::Postcopy => 0,
                MigrationMode::Precopy => budget_ms,
            },
            frozen_ms: 0,
            setup_ms: 0,
            total_ms: 0,
            throughput_mib_s: 0.0,
            error: None,
            postcopy: (request.mode == MigrationMode::Postcopy)
                .then(super::api::PostcopyProgress::default),
        });
        match &first {
            First::Frozen(frozen) => log(format!(
                "migration {}: process {pid} ({}) frozen, {} private pages of {} present, to {}",
                job.id,
                frozen.0.comm,
                private_pages(&frozen.1).len(),
                frozen.1.len(),
                dest.name
            )),
            First::Surveyed(_, pages) => log(format!(
                "migration {}: process {pid} pre-copy to {}: {} private pages of {} present, downtime budget {budget_ms} ms",
                job.id,
                dest.name,
                private_pages(pages).len(),
                pages.len()
            )),
        }
        let cancel = self.jobs.cancellable(job.id);
        let node = self.clone();
        let id = job.id;
        let plan = Plan {
            id,
            pid,
            dest,
            origin: self.jobs.origin(pid),
            budget_ms,
            cap,
            started,
            mode: request.mode,
        };
        // Streaming keeps a CPU busy (reading guest memory, checksums, encryption): it runs on
        // a thread and runtime of its own, so the API stays responsive meanwhile.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| (500, format!("starting the migration's runtime: {e}")))?;
        std::thread::Builder::new()
            .name(format!("send-{id}"))
            .spawn(move || runtime.block_on(node.run_job(plan, agent, first, tracking, cancel)))
            .map_err(|e| (500, format!("starting the migration's thread: {e}")))?;
        Ok(job)
    }

    /// A job from its first step to its end: pre-copy rounds (when it has a survey), the
    /// freeze, the final copy, and the release of the frozen original (killed once the
    /// destination runs the process, thawed otherwise). Records the outcome in the job.
    async fn run_job(
        self: Arc<Self>,
        plan: Plan,
        agent: AgentThread,
        first: First,
        tracking: Option<DirtyTracking>,
        cancel: Arc<tokio::sync::Notify>,
    ) {
        let id = plan.id;
        let mut frozen_at = matches!(first, First::Frozen(_)).then_some(plan.started);
        let mut resumed_at = None;
        let result = if plan.mode == MigrationMode::Postcopy {
            self.stream_postcopy(&plan, first, &mut resumed_at).await
        } else {
            self.stream_job(&plan, &agent, first, tracking, &cancel, &mut frozen_at)
                .await
        };
        let moved = result.is_ok();
        // Only a frozen process has anything to release. One that resumed at the destination
        // (post-copy) never runs here again, even when it is lost there.
        let kill = moved || matches!(result, Err(JobFailure::Lost(_)));
        let released = match frozen_at {
            Some(_) => agent.release(kill).await,
            None => Ok(()),
        };
        let now = Instant::now();
        self.jobs.finish(id, |j| {
            j.total_ms = (now - plan.started).as_millis() as u64;
            j.frozen_ms = frozen_at.map_or(0, |t| (resumed_at.unwrap_or(now) - t).as_millis() as u64);
            j.bytes_remaining = 0;
            match (&result, &released) {
                (Ok(stats), _) => {
                    j.state = JobState::Done;
                    j.new_pid = stats
                        .note
                        .strip_prefix("pid ")
                        .and_then(|p| p.parse().ok());
                    if let Err(e) = released {
                        j.error = Some(format!(
                            "the process runs on {}, but the frozen original could not be removed: {e}",
                            j.to
                        ));
                    }
                }
                (Err(JobFailure::Cancelled), _) => {
                    j.state = JobState::Cancelled;
                    j.error = Some(format!("cancelled; the process runs on at {}", j.from));
                }
                (Err(JobFailure::Lost(e)), _) => {
                    j.state = JobState::Failed;
                    j.error = Some(format!(
                        "{e}; the process had resumed at {} and is lost with it (post-copy cannot go back after the resume)",
                        j.to
                    ));
                }
                (Err(JobFailure::Failed(e)), Ok(())) => {
                    j.state = JobState::Failed;
                    j.error = Some(format!("{e}; the process runs on at {}", j.from));
                }
                (Err(JobFailure::Failed(e)), Err(r)) => {
                    j.state = JobState::Failed;
                    j.error = Some(format!("{e}; thawing it failed too: {r}"));
                }
            }
        });
        if moved {
            lock(&self.jobs.arrivals).remove(&plan.pid);
        }
        match self.jobs.get(id) {
            Some(j) if j.state == JobState::Done => log(format!(
                "migration {id}: process {} runs on {} ({} pages in the final copy, {} held from pre-copy, {} zero; {} rounds; frozen {} ms, total {} ms)",
                plan.pid, j.to, j.pages_sent, j.held_pages, j.zero_pages, j.round, j.frozen_ms, j.total_ms
            )),
            Some(j) => log(format!(
                "migration {id}: {}: {}",
                match j.state {
                    JobState::Cancelled => "cancelled",
                    _ => "failed",
                },
                j.error.unwrap_or_default()
            )),
            None => {}
        }
    }

    /// The upgraded connection to the destination's peer port that carries one job.
    async fn open_migration_stream(
        &self,
        plan: &Plan,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
        let dest = &plan.dest;
        let origin = plan.origin.clone().unwrap_or(Origin {
            home: self.me.name.clone(),
            moves: 0,
        });
        let path = format!(
            "/v1/peer/migrations?home={}&moves={}",
            origin.home,
            origin.moves + 1
        );
        self.peer_client(dest)
            .with_timeout(Duration::from_secs(30))
            .upgrade(&path, UPGRADE_PROTOCOL)
            .await
            .map_err(|e| format!("opening the migration stream to {}: {e}", dest.name))
    }

    /// The stream of one job: Ok once the destination runs the process. `frozen_at` is set
    /// when the process is frozen.
    async fn stream_job(
        &self,
        plan: &Plan,
        agent: &AgentThread,
        first: First,
        tracking: Option<DirtyTracking>,
        cancel: &tokio::sync::Notify,
        frozen_at: &mut Option<Instant>,
    ) -> Result<Stats, JobFailure> {
        let dest = &plan.dest;
        let mut stream = self.open_migration_stream(plan).await?;
        let memory = self.memory()?;
        let setup_ms = plan.started.elapsed().as_millis() as u64;
        self.jobs.update(plan.id, |j| j.setup_ms = setup_ms);
        let mut held = Precopied::new();
        let mut precopy_bytes = 0;
        let (image, pages) = match first {
            First::Frozen(frozen) => *frozen,
            First::Surveyed(outline, pages) => {
                let tracking = tracking.ok_or("pre-copy without the dirty log")?;
                // The destination builds the process from its outline while the rounds go
                // on, and lands the first round's pages in it as they come.
                let vaddrs: Vec<u64> = private_pages(&pages).iter().map(|p| p.0).collect();
                ferry_migration::outline(
                    &mut stream,
                    plan.id,
                    &Message::Outlined(*outline).encode(),
                    &vaddrs,
                    &Timeouts::default(),
                )
                .await
                .map_err(|e| {
                    format!(
                        "sending the process's outline to {}: {}",
                        dest.name,
                        e.chain()
                    )
                })?;
                let rounds = self.precopy_rounds(
                    plan,
                    agent,
                    &mut stream,
                    &memory,
                    &tracking,
                    &mut held,
                    pages,
                );
                // Cancelling drops the rounds (and with them the stream): nothing was frozen,
                // and the destination, which built nothing yet, sees the stream close.
                precopy_bytes = tokio::select! {
                    r = rounds => r?,
                    () = cancel.notified() => return Err(JobFailure::Cancelled),
                };
                if !self.jobs.freezing(plan.id) {
                    return Err(JobFailure::Cancelled);
                }
                let asked = Instant::now();
                let frozen = agent.freeze().await.map_err(AgentFailure::during_job)?;
                *frozen_at = Some(asked);
                // Pages written since the last round travel again.
                let dirty = tracking
                    .take()
                    .map_err(|e| format!("reading KVM's dirty log: {e}"))?;
                held.forget_dirty(&dirty);
                let again = private_pages(&frozen.1)
                    .iter()
                    .filter(|&&(v, f)| held.stale(v, f))
                    .count();
                log(format!(
                    "migration {}: process {} frozen in {} ms; {again} pages to send again",
                    plan.id,
                    plan.pid,
                    asked.elapsed().as_millis()
                ));
                frozen
            }
        };
        let copy = private_pages(&pages);
        let id = plan.id;
        let total = copy.len() as u64;
        self.jobs.update(id, |j| {
            j.pages_total = total;
            j.pages_sent = 0;
            j.bytes_total = total * 4096;
            j.bytes_remaining = total * 4096;
        });
        let image_bytes = Message::Frozen(image).encode();
        let jobs = &self.jobs;
        ferry_migration::send_after_precopy(
            &mut stream,
            id,
            &image_bytes,
            &copy,
            &memory,
            &held,
            &Timeouts::default(),
            |s| jobs.update(id, |j| apply_stats(j, s, precopy_bytes)),
        )
        .await
        .inspect(|s| jobs.update(id, |j| apply_stats(j, s, precopy_bytes)))
        .map_err(|e| {
            JobFailure::Failed(format!("moving the pages to {}: {}", dest.name, e.chain()))
        })
    }

    /// Pre-copy rounds while the process runs: every private page, then again those written
    /// (KVM's dirty log) or moved by the guest kernel since they were sent, until what is left
    /// would fit in the downtime budget at the measured throughput, or the rounds stop
    /// shrinking it, or [`MAX_ROUNDS`] passed. Returns the bytes sent.
    #[allow(clippy::too_many_arguments)]
    async fn precopy_rounds<S: tokio::io::AsyncWrite + Unpin>(
        &self,
        plan: &Plan,
        agent: &AgentThread,
        stream: &mut S,
        memory: &vm_memory::GuestMemoryMmap,
        tracking: &DirtyTracking,
        held: &mut Precopied,
        surveyed: Vec<PageRef>,
    ) -> Result<u64, JobFailure> {
        let id = plan.id;
        let mut to_send = private_pages(&surveyed);
        let mut bytes_total = 0u64;
        let mut stalled = 0;
        for round in 1..=MAX_ROUNDS {
            let n = to_send.len() as u64;
            self.jobs.update(id, |j| {
                j.round = round;
                j.pages_total = n;
                j.pages_sent = 0;
                j.bytes_remaining = n * 4096;
            });
            let t = Instant::now();
            let base = bytes_total;
            let bytes = ferry_migration::precopy(
                stream,
                &to_send,
                memory,
                held,
                &Timeouts::default(),
                plan.cap,
                |pages, bytes| {
                    let secs = t.elapsed().as_secs_f64().max(1e-3);
                    self.jobs.update(id, |j| {
                        j.pages_sent = pages;
                        j.bytes_sent = base + bytes;
                        j.bytes_remaining = (n - pages) * 4096;
                        j.throughput_mib_s = round1(bytes as f64 / secs / (1 << 20) as f64);
                    })
                },
            )
            .await
            .map_err(|e| {
                format!(
                    "pre-copy round {round} to {}: {}",
                    plan.dest.name,
                    e.chain()
                )
            })?;
            bytes_total += bytes;
            let rate = bytes as f64 / t.elapsed().as_secs_f64().max(1e-3);
            let dirty = tracking
                .take()
                .map_err(|e| format!("reading KVM's dirty log: {e}"))?;
            held.forget_dirty(&dirty);
            let now = agent.survey().await.map_err(AgentFailure::during_job)?;
            let pages = private_pages(&now);
            let frames: HashSet<u64> = pages.iter().map(|&(_, pfn)| pfn).collect();
            let written = dirty.iter().filter(|f| frames.contains(f)).count();
            let next: Vec<(u64, u64)> = pages
                .into_iter()
                .filter(|&(vaddr, pfn)| held.stale(vaddr, pfn))
                .collect();
            let expected_ms = (next.len() as f64 * 4096.0 / rate.max(1.0) * 1000.0) as u64;
            let dirty_rate = written as f64 / t.elapsed().as_secs_f64().max(1e-3);
            self.jobs.update(id, |j| {
                j.dirty_pages_s = round1(dirty_rate);
                j.expected_downtime_ms = expected_ms;
            });
            log(format!(
                "migration {id}: round {round}: {n} pages in {} ms ({:.0} MiB/s); {written} written meanwhile, {} to send, {expected_ms} ms frozen expected",
                t.elapsed().as_millis(),
                rate / (1 << 20) as f64,
                next.len()
            ));
            if expected_ms <= plan.budget_ms {
                break;
            }
            // Not converging: the process writes as fast as the rounds send.
            stalled = if next.len() * 10 >= to_send.len() * 9 {
                stalled + 1
            } else {
                0
            };
            to_send = next;
            if stalled >= 2 {
                log(format!(
                    "migration {id}: the rounds stopped shrinking what is left; freezing now"
                ));
                break;
            }
        }
        Ok(bytes_total)
    }

    /// `POST /v1/peer/migrations`: answers 101 and lands the process on the upgraded stream.
    pub(super) fn peer_migration_request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Option<String>,
    ) -> Response<Full<Bytes>> {
        let Some(from) = peer else {
            return error_response(
                403,
                "only the cluster's nodes (with their certificates) may send processes here",
            );
        };
        if let Some(refused) = self.refuse_arrival() {
            return refused;
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        };
        let origin = Origin {
            home: param("home").unwrap_or_else(|| from.clone()),
            moves: param("moves").and_then(|m| m.parse().ok()).unwrap_or(1),
        };
        let node = self.clone();
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    let mut stream = TokioIo::new(up);
                    if let Err(e) = node.receive_process(&mut stream, &from, origin).await {
                        log(format!("incoming migration from {from}: {e}"));
                    }
                }
                Err(e) => log(format!(
                    "incoming migration from {from}: upgrade failed: {e}"
                )),
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        resp.headers_mut().insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static(UPGRADE_PROTOCOL),
        );
        resp
    }

    /// The destination's side of one job.
    async fn receive_process<S>(
        self: &Arc<Self>,
        stream: &mut S,
        from: &str,
        origin: Origin,
    ) -> Result<(), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let memory = self.memory()?;
        // The agent's connection builds the process and holds it until it runs (or is
        // aborted), on one thread, like the source's.
        let (calls, landing) = std::sync::mpsc::channel::<LandCall>();
        let node = self.clone();
        std::thread::Builder::new()
            .name("land".into())
            .spawn(move || node.landing_thread(landing))
            .map_err(|e| format!("starting the landing thread: {e}"))?;
        let (frames_tx, frames_rx) = tokio::sync::oneshot::channel();
        let outline_calls = calls.clone();
        let early = ferry_migration::Early {
            on_outline: Box::new(move |image, vaddrs| {
                match decode_image(&image) {
                Ok(image) => {
                    let _ = outline_calls.send(LandCall::Outline(image, vaddrs, frames_tx));
                }
                Err(e) => log(format!(
                    "incoming migration from {from}: the outline: {e}; the process is built after the freeze"
                )),
            }
            }),
            frames: frames_rx,
            sink: &memory,
        };
        let mut incoming =
            ferry_migration::receive_early(stream, &Timeouts::default(), Some(early))
                .await
                .map_err(|e| e.chain())?;
        let image = match decode_image(incoming.image()) {
            Ok(i) => i,
            Err(e) => {
                let _ = incoming.reject(&e).await;
                return Err(e);
            }
        };
        if !incoming.lazy_vaddrs().is_empty() {
            // Post-copy has a landing of its own.
            drop(calls);
            return self.receive_postcopy(incoming, image, from, origin).await;
        }
        let comm = image.comm.clone();
        let image_pid = image.pid;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let asked = Instant::now();
        let _ = calls.send(LandCall::Final(image, incoming.vaddrs().to_vec(), tx));
        let built = match rx.await {
            Ok(Ok(built)) => built,
            Ok(Err(e)) => {
                let _ = incoming.reject(&e).await;
                return Err(e);
            }
            Err(_) => return Err("the landing thread ended early".into()),
        };
        incoming.forget_early(&built.stale);
        log(format!(
            "incoming process {image_pid} ({comm}) from {from}: skeleton pid {} in {} ms, {} pages to land{}",
            built.pid,
            asked.elapsed().as_millis(),
            built.frames.len(),
            if built.completed {
                format!(", built from its outline during pre-copy ({} ranges changed since)", built.stale.len())
            } else {
                String::new()
            }
        ));
        let landed = match incoming.land(&built.frames, false, &memory, |_| {}).await {
            Ok(l) => l,
            Err(e) => {
                let _ = calls.send(LandCall::Resume(false, None));
                return Err(format!("landing the pages: {}", e.chain()));
            }
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let _ = calls.send(LandCall::Resume(true, Some(done_tx)));
        let resumed = done_rx
            .await
            .unwrap_or_else(|_| Err("the landing thread ended".into()));
        // It runs here from now on, whatever the source makes of the note below: `ps` shows
        // where it came from as soon as it runs.
        if let Ok(pid) = &resumed {
            lock(&self.jobs.arrivals).insert(*pid, origin.clone());
        }
        let outcome = resumed
            .as_ref()
            .map(|pid| format!("pid {pid}"))
            .map_err(|e| e.clone());
        let stats = landed
            .finish_with_note(outcome)
            .await
            .map_err(|e| e.chain())?;
        let pid = resumed?;
        log(format!(
            "process {pid} ({comm}) arrived from {from}: {} pages, {} zero, {} of them in place before the freeze",
            stats.pages, stats.zero_pages, stats.early_pages
        ));
        Ok(())
    }

    /// The landing thread of one incoming job: builds the process through the agent (from
    /// its outline during pre-copy, then from the frozen image), reports frames, and resumes
    /// or aborts it when told. Ends when the calls end.
    fn landing_thread(&self, calls: std::sync::mpsc::Receiver<LandCall>) {
        let mut conn: Option<AgentConnection<VsockStream>> = None;
        // The skeleton built from the outline, and its pinned frames by vaddr.
        let mut early: Option<(u32, HashMap<u64, u64>)> = None;
        let mut skeleton = None;
        for call in calls {
            let c = match conn
                .take()
                .map(Ok)
                .unwrap_or_else(|| self.agent_connection())
            {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    match call {
                        LandCall::Final(_, _, reply) => drop(reply.send(Err(e))),
                        LandCall::Resume(_, Some(done)) => drop(done.send(Err(e))),
                        _ => log(format!("incoming migration: {e}")),
                    }
                    continue;
                }
            };
            match call {
                LandCall::Outline(image, vaddrs, frames) => {
                    let t = Instant::now();
                    match build_early(c, &image, &vaddrs) {
                        Ok((pid, pfns)) => {
                            log(format!(
                                "incoming process {} ({}): built from its outline with {} pages pinned in {} ms, during pre-copy",
                                image.pid,
                                image.comm,
                                pfns.len(),
                                t.elapsed().as_millis()
                            ));
                            let _ = frames.send(pfns.clone());
                            early = Some((pid, pfns.into_iter().collect()));
                        }
                        Err(e) => {
                            log(format!(
                                "incoming process {}: building it from its outline: {e}; it is built after the freeze",
                                image.pid
                            ));
                            // The next call gets a fresh connection: this one may be what
                            // failed.
                            conn = None;
                        }
                    }
                }
                LandCall::Final(image, vaddrs, reply) => {
                    let built = build_final(c, &image, &vaddrs, early.take());
                    skeleton = built.as_ref().ok().map(|b| b.pid);
                    let _ = reply.send(built);
                }
                LandCall::Resume(resume, done) => {
                    let Some(pid) = skeleton.take() else {
                        if let Some(done) = done {
                            let _ = done.send(Err("no process was built".into()));
                        }
                        continue;
                    };
                    let outcome = if resume {
                        c.resume(pid)
                            .map_err(|e| agent_error("resuming the process", &e))
                    } else {
                        let _ = c.abort(pid);
                        Err("aborted".into())
                    };
                    if let Some(done) = done {
                        let _ = done.send(outcome);
                    }
                }
            }
        }
    }
}

/// A request to an incoming job's landing thread.
enum LandCall {
    /// Pre-copy: build the process from its outline and pin the pages at these vaddrs;
    /// their frames, as `(vaddr, pfn)`, go to the engine (nothing if it failed).
    Outline(
        ProcessImage,
        Vec<u64>,
        tokio::sync::oneshot::Sender<Vec<(u64, u64)>>,
    ),
    /// The frozen image and the final page list: complete (or build) the process and report
    /// one frame per vaddr.
    Final(
        ProcessImage,
        Vec<u64>,
        tokio::sync::oneshot::Sender<Result<Built, String>>,
    ),
    /// Resume the built process (`true`) or abort it; the outcome (its pid) goes back.
    Resume(
        bool,
        Option<tokio::sync::oneshot::Sender<Result<u32, String>>>,
    ),
}

/// The process built at the destination, ready for its pages.
struct Built {
    pid: u32,
    /// One frame per vaddr of the final list.
    frames: Vec<u64>,
    /// Ranges whose early frames no longer hold (see the agent's `Completed`).
    stale: Vec<(u64, u64)>,
    /// Completed from a skeleton built during pre-copy.
    completed: bool,
}

/// Builds the skeleton from a running process's outline and pins the pages at `vaddrs`.
fn build_early(
    conn: &mut AgentConnection<VsockStream>,
    outline: &ProcessImage,
    vaddrs: &[u64],
) -> Result<(u32, Vec<(u64, u64)>), String> {
    let pid = conn
        .rebuild(outline)
        .map_err(|e| agent_error("building the process", &e))?;
    match conn.want_frames(vaddrs) {
        Ok(frames) => Ok((pid, frames.into_iter().map(|f| (f.vaddr, f.pfn)).collect())),
        Err(e) => {
            let _ = conn.abort(pid);
            Err(agent_error("pinning its pages", &e))
        }
    }
}

/// Completes the skeleton built early (or builds one) from the frozen `image`, and returns
/// a frame for every vaddr: the early frame where it still holds, a new one elsewhere. Early
/// pages the process no longer has are dropped. A skeleton that cannot be completed is
/// built anew.
fn build_final(
    conn: &mut AgentConnection<VsockStream>,
    image: &ProcessImage,
    vaddrs: &[u64],
    early: Option<(u32, HashMap<u64, u64>)>,
) -> Result<Built, String> {
    let completed = early.is_some();
    let (pid, stale, mut known) = match early.map(|(_, known)| (conn.complete(image), known)) {
        Some((Ok((pid, stale)), mut known)) => {
            known.retain(|v, _| !stale.iter().any(|&(s, e)| s <= *v && *v < e));
            (pid, stale, known)
        }
        Some((Err(e), _)) => {
            log(format!(
                "process {}: {}; building it anew",
                image.pid,
                agent_error("completing it from its outline", &e)
            ));
            let pid = conn
                .rebuild(image)
                .map_err(|e| agent_error("rebuilding the process", &e))?;
            (pid, vec![(0, u64::MAX)], HashMap::new())
        }
        None => {
            let pid = conn
                .rebuild(image)
                .map_err(|e| agent_error("rebuilding the process", &e))?;
            (pid, Vec::new(), HashMap::new())
        }
    };
    let fail = |conn: &mut AgentConnection<VsockStream>, what: &str, e: ClientError| {
        let _ = conn.abort(pid);
        agent_error(what, &e)
    };
    let wanted: HashSet<u64> = vaddrs.iter().copied().collect();
    let gone: Vec<u64> = known
        .keys()
        .copied()
        .filter(|v| !wanted.contains(v))
        .collect();
    if !gone.is_empty() {
        conn.discard(&gone)
            .map_err(|e| fail(conn, "dropping pages the process no longer has", e))?;
    }
    let missing: Vec<u64> = vaddrs
        .iter()
        .copied()
        .filter(|v| !known.contains_key(v))
        .collect();
    let frames = conn
        .want_frames(&missing)
        .map_err(|e| fail(conn, "pinning the process's pages", e))?;
    known.extend(frames.into_iter().map(|f| (f.vaddr, f.pfn)));
    let frames = vaddrs
        .iter()
        .map(|v| known.get(v).copied())
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| {
            let _ = conn.abort(pid);
            "the agent reported frames for other pages than asked".to_string()
        })?;
    Ok(Built {
        pid,
        frames,
        stale,
        completed,
    })
}

/// The process image inside an agent `Frozen` (or, for an outline, `Outlined`) frame, as
/// the source sent it.
fn decode_image(bytes: &[u8]) -> Result<ProcessImage, String> {
    let mut d = Decoder::new();
    d.push(bytes);
    match d.next() {
        Ok(Some(Message::Frozen(image) | Message::Outlined(image))) => Ok(image),
        Ok(_) => Err("the job's description is not a process image".into()),
        Err(e) => Err(format!("the job's description does not decode: {e}")),
    }
}
