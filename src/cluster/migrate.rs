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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_guest_agent::client::{AgentConnection, ClientError};
use ferry_guest_agent::migrate::image::{PageRef, ProcessImage};
use ferry_guest_agent::protocol::{Decoder, Message};
use ferry_guest_agent::vsock::{self, VsockStream};
use ferry_migration::{Stats, Timeouts};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::api::{JobState, MigrationJob, MigrationRequest};
use super::daemon::{error_response, json_response, lock, log, Node};

/// The protocol name of the upgraded peer connection.
pub const UPGRADE_PROTOCOL: &str = "ferry-migration/1";

/// The largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// This node's migration jobs (as the source), oldest first, and where arrived processes came
/// from (as the destination).
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    list: Mutex<Vec<MigrationJob>>,
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

fn apply_stats(job: &mut MigrationJob, s: &Stats) {
    job.pages_sent = s.pages;
    job.zero_pages = s.zero_pages;
    job.bytes_sent = s.bytes;
    job.throughput_mib_s = (s.throughput_mib_s * 10.0).round() / 10.0;
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
            .map(|(cid, _)| *cid)
            .ok_or_else(|| format!("node {}'s guest is not running", self.me.name))?;
        let stream = VsockStream::connect(cid, vsock::AGENT_PORT)
            .map_err(|e| format!("cannot reach node {}'s agent: {e}", self.me.name))?;
        AgentConnection::handshake(stream, Duration::from_secs(10))
            .map_err(|e| format!("node {}'s agent: {e}", self.me.name))
    }

    fn memory(&self) -> Result<vm_memory::GuestMemoryMmap, String> {
        lock(&self.guest)
            .as_ref()
            .map(|(_, m)| m.clone())
            .ok_or_else(|| format!("node {}'s guest is not running", self.me.name))
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
        if self.cluster.node(&source).is_none() {
            return error_response(404, format!("no node `{source}` in this cluster"));
        }
        if source != self.me.name {
            // The node that runs the process drives its migration.
            let n = self.cluster.node(&source).expect("checked above").clone();
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

    /// Freezes the process and starts moving it; returns the job (201) or why it cannot move
    /// (409) or failed to start, with the process left as it was.
    async fn start_migration(
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
        let Some(dest) = self.cluster.node(&request.to).cloned() else {
            let names: Vec<&str> = self.cluster.nodes.iter().map(|n| n.name.as_str()).collect();
            return Err((
                404,
                format!(
                    "no node `{}` in cluster {}; its nodes are {}",
                    request.to,
                    self.cluster.name,
                    names.join(", ")
                ),
            ));
        };
        let node = self.clone();
        let started = Instant::now();
        // The agent's connection is the process's lifeline: while it is open the process stays
        // frozen; if it drops, the agent thaws it. It lives on one thread (ptrace answers the
        // thread that froze the process, and the agent keeps it on the connection's thread).
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<bool>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name(format!("migrate-{pid}"))
            .spawn(move || {
                let frozen = node
                    .agent_connection()
                    .and_then(|mut conn| match conn.freeze(pid) {
                        Ok((image, pages)) => Ok((conn, image, pages)),
                        Err(ClientError::CantMove(reason)) => Err(format!("cantmove:{reason}")),
                        Err(e) => Err(agent_error(&format!("freezing process {pid}"), &e)),
                    });
                let mut conn = match frozen {
                    Ok((conn, image, pages)) => {
                        let _ = tx.send(Ok((image, pages)));
                        conn
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                // Kill (it runs at the destination) or thaw (it did not move).
                let kill = cmd_rx.recv().unwrap_or(false);
                let _ = done_tx.send(
                    conn.release(pid, kill)
                        .map_err(|e| agent_error("releasing the frozen process", &e)),
                );
            })
            .map_err(|e| (500, format!("starting the migration thread: {e}")))?;
        let (image, pages): (ProcessImage, Vec<PageRef>) = match rx.await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                return Err(match e.strip_prefix("cantmove:") {
                    Some(reason) => (
                        409,
                        format!("process {pid} on {} cannot move: {reason}", self.me.name),
                    ),
                    None => (502, e),
                })
            }
            Err(_) => return Err((500, "the migration thread ended early".into())),
        };
        // Private pages carry the process's own data; file pages come from the destination's
        // copy of the same file.
        let copy: Vec<(u64, u64)> = pages
            .iter()
            .filter(|p| p.anon)
            .map(|p| (p.vaddr, p.pfn))
            .collect();
        let job = self.jobs.create(MigrationJob {
            id: 0,
            pid,
            from: self.me.name.clone(),
            to: dest.name.clone(),
            state: JobState::Running,
            new_pid: None,
            pages_total: copy.len() as u64,
            pages_sent: 0,
            zero_pages: 0,
            bytes_sent: 0,
            frozen_ms: 0,
            total_ms: 0,
            throughput_mib_s: 0.0,
            error: None,
        });
        log(format!(
            "migration {}: process {pid} ({}) frozen, {} private pages of {} present to {}",
            job.id,
            image.comm,
            copy.len(),
            pages.len(),
            dest.name
        ));
        let origin = self.jobs.origin(pid);
        let node = self.clone();
        let id = job.id;
        // Streaming keeps a CPU busy (reading guest memory, checksums, encryption): it runs on
        // a thread and runtime of its own, so the API stays responsive meanwhile.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| (500, format!("starting the migration's runtime: {e}")))?;
        let stream_job = async move {
            let result = node.send_process(id, &image, &copy, &dest, origin).await;
            let moved = result.is_ok();
            let _ = cmd_tx.send(moved);
            let released = done_rx
                .await
                .unwrap_or_else(|_| Err("the migration thread ended".into()));
            let frozen_ms = started.elapsed().as_millis() as u64;
            node.jobs.update(id, |j| {
                j.frozen_ms = frozen_ms;
                j.total_ms = frozen_ms;
                match (&result, &released) {
                    (Ok(stats), _) => {
                        apply_stats(j, stats);
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
                    (Err(e), Ok(())) => {
                        j.state = JobState::Failed;
                        j.error = Some(format!("{e}; the process runs on at {}", j.from));
                    }
                    (Err(e), Err(r)) => {
                        j.state = JobState::Failed;
                        j.error = Some(format!("{e}; thawing it failed too: {r}"));
                    }
                }
            });
            if moved {
                lock(&node.jobs.arrivals).remove(&pid);
            }
            match node.jobs.get(id) {
                Some(j) if j.state == JobState::Done => log(format!(
                    "migration {id}: process {pid} runs on {} ({} pages, {} zero, {} ms frozen)",
                    j.to, j.pages_sent, j.zero_pages, j.frozen_ms
                )),
                Some(j) => log(format!(
                    "migration {id}: failed: {}",
                    j.error.unwrap_or_default()
                )),
                None => {}
            }
        };
        std::thread::Builder::new()
            .name(format!("send-{id}"))
            .spawn(move || runtime.block_on(stream_job))
            .map_err(|e| (500, format!("starting the migration's thread: {e}")))?;
        Ok(job)
    }

    /// Streams the image and pages to `dest` over its peer port; Ok once it runs there.
    async fn send_process(
        self: &Arc<Self>,
        id: u64,
        image: &ProcessImage,
        pages: &[(u64, u64)],
        dest: &super::config::NodeConfig,
        origin: Option<Origin>,
    ) -> Result<Stats, String> {
        let image_bytes = Message::Frozen(image.clone()).encode();
        let origin = origin.unwrap_or(Origin {
            home: self.me.name.clone(),
            moves: 0,
        });
        let path = format!(
            "/v1/peer/migrations?home={}&moves={}",
            origin.home,
            origin.moves + 1
        );
        let mut stream = self
            .peer_client(dest)
            .with_timeout(Duration::from_secs(30))
            .upgrade(&path, UPGRADE_PROTOCOL)
            .await
            .map_err(|e| format!("opening the migration stream to {}: {e}", dest.name))?;
        let memory = self.memory()?;
        let jobs = &self.jobs;
        ferry_migration::send(
            &mut stream,
            id,
            &image_bytes,
            pages,
            &memory,
            &Timeouts::default(),
            |s| jobs.update(id, |j| apply_stats(j, s)),
        )
        .await
        .map_err(|e| format!("moving the pages to {}: {}", dest.name, e.chain()))
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
        let incoming = ferry_migration::receive(stream, &Timeouts::default())
            .await
            .map_err(|e| e.chain())?;
        let image = match decode_image(incoming.image()) {
            Ok(i) => i,
            Err(e) => {
                let _ = incoming.reject(&e).await;
                return Err(e);
            }
        };
        let vaddrs = incoming.vaddrs().to_vec();
        // The agent's connection holds the skeleton until it runs (or is aborted), on one
        // thread, like the source's.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<bool>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<u32, String>>();
        let node = self.clone();
        let comm = image.comm.clone();
        let image_pid = image.pid;
        std::thread::Builder::new()
            .name("land".into())
            .spawn(move || {
                let built = node.agent_connection().and_then(|mut conn| {
                    let pid = conn
                        .rebuild(&image)
                        .map_err(|e| agent_error("rebuilding the process", &e))?;
                    match conn.want_frames(&vaddrs) {
                        Ok(frames) => Ok((conn, pid, frames)),
                        Err(e) => {
                            let _ = conn.abort(pid);
                            Err(agent_error("pinning the skeleton's pages", &e))
                        }
                    }
                });
                let (mut conn, pid, frames) = match built {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok((pid, frames)));
                let resume = cmd_rx.recv().unwrap_or(false);
                let outcome = if resume {
                    conn.resume(pid)
                        .map_err(|e| agent_error("resuming the process", &e))
                } else {
                    let _ = conn.abort(pid);
                    Err("aborted".into())
                };
                let _ = done_tx.send(outcome);
            })
            .map_err(|e| format!("starting the landing thread: {e}"))?;
        let (skeleton, frames): (u32, Vec<PageRef>) = match rx.await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = incoming.reject(&e).await;
                return Err(e);
            }
            Err(_) => return Err("the landing thread ended early".into()),
        };
        log(format!(
            "incoming process {} ({comm}) from {from}: skeleton pid {skeleton}, {} pages to land",
            image_pid,
            frames.len()
        ));
        let pfns: Vec<u64> = frames.iter().map(|f| f.pfn).collect();
        let memory = self.memory()?;
        let landed = match incoming.land(&pfns, false, &memory, |_| {}).await {
            Ok(l) => l,
            Err(e) => {
                let _ = cmd_tx.send(false);
                return Err(format!("landing the pages: {}", e.chain()));
            }
        };
        let _ = cmd_tx.send(true);
        let resumed = done_rx
            .await
            .unwrap_or_else(|_| Err("the landing thread ended".into()));
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
            "process {pid} ({comm}) arrived from {from}: {} pages, {} zero",
            stats.pages, stats.zero_pages
        ));
        lock(&self.jobs.arrivals).insert(pid, origin);
        Ok(())
    }
}

/// The process image inside an agent `Frozen` frame, as the source sent it.
fn decode_image(bytes: &[u8]) -> Result<ProcessImage, String> {
    let mut d = Decoder::new();
    d.push(bytes);
    match d.next() {
        Ok(Some(Message::Frozen(image))) => Ok(image),
        Ok(_) => Err("the job's description is not a process image".into()),
        Err(e) => Err(format!("the job's description does not decode: {e}")),
    }
}
