//! The node daemon's part of the user tools (openMosix's `runon`, `nomig`, `mosctl`): starting
//! a program on a node, locking a process in place, and the node controls (refuse arriving
//! processes, expel the guests, bring this node's processes home).
//!
//! - `POST /v1/processes`: the guest's agent starts the program detached (a session of its
//!   own, stdin `/dev/null`, output to `/var/log/ferry/PID.log`), so it can migrate.
//! - Locks live here, in the daemon: a set of pids, forgotten once the process is gone. A
//!   migration of a locked process is refused (409) before anything is frozen.
//! - A blocked node answers an arriving migration with 409 at its peer port; the source asks
//!   the destination first, so nothing is frozen for a move that would be refused.
//! - Expel and bring start stop-mode migrations (the dirty log serves one pre-copy at a time)
//!   and answer with the moves started; `ferry` follows the jobs.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_guest_agent::{ClientError as AgentError, ExecRequest};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

use super::api::{
    MigrationMode, MigrationRequest, MoveStarted, NodeAction, NodeControlReport, NodeStatus,
    Process, StartError, StartRequest,
};
use super::config::NodeConfig;
use super::daemon::{error_response, json_response, lock, log, Node};

/// The largest request body these routes read.
const MAX_BODY: usize = 64 * 1024;

/// How long a forwarded request may take at the other node (starting a program, moving a
/// list of processes).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// What a node keeps for the user tools.
#[derive(Debug, Default)]
pub struct Tools {
    /// Processes locked in place.
    locked: Mutex<HashSet<u32>>,
    /// Refusing arriving processes (`ferry node block`).
    blocked: AtomicBool,
}

impl Tools {
    /// Whether the node takes arriving processes.
    pub fn accepting(&self) -> bool {
        !self.blocked.load(Ordering::SeqCst)
    }

    pub fn is_locked(&self, pid: u32) -> bool {
        lock(&self.locked).contains(&pid)
    }

    fn set_locked(&self, pid: u32, locked: bool) {
        let mut set = lock(&self.locked);
        if locked {
            set.insert(pid);
        } else {
            set.remove(&pid);
        }
    }

    /// Forgets the locks of processes that are gone: `running` are the guest's pids now.
    pub fn forget_gone(&self, running: impl IntoIterator<Item = u32>) {
        let running: HashSet<u32> = running.into_iter().collect();
        lock(&self.locked).retain(|pid| running.contains(pid));
    }
}

/// Why a move to `node` is refused while it blocks arrivals.
pub fn refuses_message(node: &str) -> String {
    format!("{node} refuses arriving processes (`ferry node unblock {node}`)")
}

/// Why a locked process does not move.
pub fn locked_message(node: &str, pid: u32) -> String {
    format!("process {pid} on {node} is locked; `ferry unlock {node}:{pid}` first")
}

/// A request body as `T`, or a 400 that says what to send.
async fn body_as<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    example: &str,
) -> Result<T, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(error_response(
                400,
                format!("reading the request body: {e}"),
            ))
        }
    };
    serde_json::from_slice(&body).map_err(|e| {
        error_response(
            400,
            format!("the body does not parse ({e}); send {example}"),
        )
    })
}

/// A peer's answer passed on as it came.
fn relay(status: u16, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

impl Node {
    /// `POST /v1/processes` and `/v1/nodes/{name}/processes`.
    pub(super) async fn start_process_request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        node: Option<String>,
    ) -> Response<Full<Bytes>> {
        let request: StartRequest =
            match body_as(req, r#"{"argv": ["python3", "job.py"], "locked": false}"#).await {
                Ok(r) => r,
                Err(resp) => return resp,
            };
        if let Some(name) = node.filter(|n| *n != self.me.name) {
            let n = match self.named(&name) {
                Ok(n) => n.clone(),
                Err(resp) => return resp,
            };
            return match self
                .peer_client(&n)
                .with_timeout(FORWARD_TIMEOUT)
                .post_json("/v1/processes", &request)
                .await
            {
                Ok((status, body)) => relay(status, body),
                Err(e) => error_response(502, format!("node {name}: {e}")),
            };
        }
        if request.argv.first().is_none_or(|p| p.is_empty()) {
            return error_response(
                400,
                "argv is empty: name the program to start and its arguments",
            );
        }
        let node = self.clone();
        match tokio::task::spawn_blocking(move || node.start_process(&request)).await {
            Ok(Ok(p)) => json_response(StatusCode::CREATED, &p),
            Ok(Err(resp)) => *resp,
            Err(e) => error_response(500, format!("starting the process: {e}")),
        }
    }

    /// Starts a program through the guest's agent; the started process as the API shows it.
    fn start_process(&self, request: &StartRequest) -> Result<Process, Box<Response<Full<Bytes>>>> {
        let exec = ExecRequest {
            argv: request.argv.clone(),
            env: vec![
                ("HOME".into(), "/root".into()),
                ("LANG".into(), "C.UTF-8".into()),
            ],
            cwd: Some("/".into()),
            stdin: false,
        };
        let started = {
            let mut agent = lock(&self.agent);
            let Some(conn) = agent.as_mut() else {
                return Err(Box::new(error_response(
                    502,
                    format!(
                        "node {}'s guest agent is not connected ({})",
                        self.me.name,
                        self.status().detail.unwrap_or_else(|| "booting".into())
                    ),
                )));
            };
            conn.start(&exec)
        };
        let (pid, log_path) = match started {
            Ok(v) => v,
            Err(AgentError::StartFailed { code, message }) => {
                return Err(Box::new(json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &StartError {
                        error: format!("on {}: {message}", self.me.name),
                        exit_code: code,
                    },
                )))
            }
            Err(e) => {
                return Err(Box::new(error_response(
                    502,
                    format!("node {}'s guest agent: {e}", self.me.name),
                )))
            }
        };
        if request.locked {
            self.tools.set_locked(pid, true);
        }
        log(format!(
            "started process {pid}{}: {} (output in {log_path})",
            if request.locked { " (locked)" } else { "" },
            request.argv.join(" ")
        ));
        let listed = self
            .processes(true)
            .ok()
            .and_then(|list| list.into_iter().find(|p| p.pid == pid));
        Ok(listed.unwrap_or_else(|| Process {
            pid,
            ppid: 0,
            uid: 0,
            // It ended before it could be listed.
            state: "X".into(),
            threads: 0,
            rss_kib: 0,
            cpu_seconds: 0.0,
            command: request.argv.join(" "),
            kernel_thread: false,
            home: None,
            moves: 0,
            locked: false,
        }))
    }

    /// `PUT` and `DELETE /v1/processes/{pid}/lock`, and under `/v1/nodes/{name}`.
    pub(super) async fn lock_request(
        self: &Arc<Self>,
        node: Option<String>,
        pid: u32,
        locked: bool,
    ) -> Response<Full<Bytes>> {
        if let Some(name) = node.filter(|n| *n != self.me.name) {
            let n = match self.named(&name) {
                Ok(n) => n.clone(),
                Err(resp) => return resp,
            };
            let method = if locked { "PUT" } else { "DELETE" };
            return match self
                .peer_client(&n)
                .call(method, &format!("/v1/processes/{pid}/lock"))
                .await
            {
                Ok((status, body)) => relay(status, body),
                Err(e) => error_response(502, format!("node {name}: {e}")),
            };
        }
        let node = self.clone();
        let found = tokio::task::spawn_blocking(move || {
            let list = node.processes(false)?;
            Ok::<_, String>(list.into_iter().find(|p| p.pid == pid))
        })
        .await;
        match found {
            Ok(Ok(Some(mut p))) => {
                self.tools.set_locked(pid, locked);
                p.locked = locked;
                log(format!(
                    "process {pid} ({}) {}",
                    p.command,
                    if locked { "locked" } else { "unlocked" }
                ));
                json_response(StatusCode::OK, &p)
            }
            Ok(Ok(None)) => error_response(
                404,
                format!(
                    "no process {pid} on {}; `ferry ps` lists the cluster's processes",
                    self.me.name
                ),
            ),
            Ok(Err(e)) => error_response(502, e),
            Err(e) => error_response(500, format!("listing processes: {e}")),
        }
    }

    /// `POST /v1/node/{action}` and `/v1/nodes/{name}/{action}`.
    pub(super) async fn node_control_request(
        self: &Arc<Self>,
        node: Option<String>,
        action: NodeAction,
    ) -> Response<Full<Bytes>> {
        if let Some(name) = node.filter(|n| *n != self.me.name) {
            let n = match self.named(&name) {
                Ok(n) => n.clone(),
                Err(resp) => return resp,
            };
            return match self
                .peer_client(&n)
                .with_timeout(FORWARD_TIMEOUT)
                .call("POST", &format!("/v1/node/{}", action.name()))
                .await
            {
                Ok((status, body)) => relay(status, body),
                Err(e) => error_response(502, format!("node {name}: {e}")),
            };
        }
        let moves = match action {
            NodeAction::Block | NodeAction::Unblock => {
                let block = action == NodeAction::Block;
                if self.tools.blocked.swap(block, Ordering::SeqCst) != block {
                    log(if block {
                        "blocked: arriving processes are refused"
                    } else {
                        "unblocked: arriving processes are taken"
                    });
                }
                Vec::new()
            }
            NodeAction::Expel => match self.expel().await {
                Ok(m) => m,
                Err(e) => return error_response(502, e),
            },
            NodeAction::Bring => self.bring().await,
        };
        json_response(
            StatusCode::OK,
            &NodeControlReport {
                node: self.me.name.clone(),
                accepting: self.tools.accepting(),
                moves,
            },
        )
    }

    /// Sends every process here whose home is another node back home.
    async fn expel(self: &Arc<Self>) -> Result<Vec<MoveStarted>, String> {
        let node = self.clone();
        let list = tokio::task::spawn_blocking(move || node.processes(false))
            .await
            .map_err(|e| format!("listing processes: {e}"))??;
        let mut moves = Vec::new();
        for p in list {
            let Some(home) = p.home.clone().filter(|h| *h != self.me.name) else {
                continue;
            };
            let started = self
                .start_migration(stop_move(p.pid, &home))
                .await
                .map(|job| job.id)
                .map_err(|(_, e)| e);
            moves.push(move_started(&p, &self.me.name, &home, started));
        }
        log(format!("expel: {} moves asked", moves.len()));
        Ok(moves)
    }

    /// Calls every process whose home is this node and that runs on another node back here.
    async fn bring(self: &Arc<Self>) -> Vec<MoveStarted> {
        let mut moves = Vec::new();
        let peers: Vec<NodeConfig> = self
            .cluster
            .nodes
            .iter()
            .filter(|n| n.name != self.me.name)
            .cloned()
            .collect();
        for n in peers {
            let client = self.peer_client(&n);
            let list = match client.get::<Vec<Process>>("/v1/processes").await {
                Ok(l) => l,
                Err(e) => {
                    log(format!(
                        "bring: node {} did not list its processes: {e}",
                        n.name
                    ));
                    continue;
                }
            };
            for p in list
                .iter()
                .filter(|p| p.home.as_deref() == Some(&self.me.name))
            {
                let started = match client
                    .clone()
                    .with_timeout(FORWARD_TIMEOUT)
                    .post_json("/v1/migrations", &stop_move(p.pid, &self.me.name))
                    .await
                {
                    Ok((201, body)) => serde_json::from_slice::<super::api::MigrationJob>(&body)
                        .map(|j| j.id)
                        .map_err(|e| format!("node {} answered an unreadable job: {e}", n.name)),
                    Ok((_, body)) => Err(serde_json::from_slice::<super::api::ApiError>(&body)
                        .map(|e| e.error)
                        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned())),
                    Err(e) => Err(format!("node {}: {e}", n.name)),
                };
                moves.push(move_started(p, &n.name, &self.me.name, started));
            }
        }
        log(format!("bring: {} moves asked", moves.len()));
        moves
    }

    /// Before anything is frozen: refuses to move a locked process, or to a node that
    /// refuses arriving processes (asked over its peer port; one that does not answer is
    /// left to the migration to find out).
    pub(super) async fn check_move(
        self: &Arc<Self>,
        pid: u32,
        dest: &NodeConfig,
    ) -> Result<(), (u16, String)> {
        if self.tools.is_locked(pid) {
            // The lock of a process that ended may still be held: forget those first.
            let node = self.clone();
            let _ = tokio::task::spawn_blocking(move || node.processes(true)).await;
            if self.tools.is_locked(pid) {
                return Err((409, locked_message(&self.me.name, pid)));
            }
        }
        if let Ok(s) = self.peer_client(dest).get::<NodeStatus>("/v1/node").await {
            if !s.accepting {
                return Err((409, refuses_message(&dest.name)));
            }
        }
        Ok(())
    }

    /// At the destination's peer port: a 409 to send when this node refuses arrivals.
    pub(super) fn refuse_arrival(&self) -> Option<Response<Full<Bytes>>> {
        (!self.tools.accepting()).then(|| error_response(409, refuses_message(&self.me.name)))
    }
}

/// A stop-mode move of `pid` to `to` (expel and bring move several processes at once; the
/// dirty log that pre-copy needs serves one at a time).
fn stop_move(pid: u32, to: &str) -> MigrationRequest {
    MigrationRequest {
        pid,
        node: None,
        to: to.to_string(),
        mode: MigrationMode::Stop,
        downtime_ms: None,
        bandwidth_mib_s: None,
    }
}

fn move_started(p: &Process, from: &str, to: &str, started: Result<u64, String>) -> MoveStarted {
    let (job, error) = match started {
        Ok(id) => (Some(id), None),
        Err(e) => (None, Some(e)),
    };
    MoveStarted {
        pid: p.pid,
        command: p.command.clone(),
        from: from.to_string(),
        to: to.to_string(),
        job,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_are_kept_until_the_process_is_gone() {
        let t = Tools::default();
        assert!(!t.is_locked(7));
        t.set_locked(7, true);
        t.set_locked(8, true);
        assert!(t.is_locked(7) && t.is_locked(8));
        t.set_locked(8, false);
        assert!(!t.is_locked(8));
        t.set_locked(8, true);
        // 7 ended; 8 still runs.
        t.forget_gone([1, 8, 9]);
        assert!(!t.is_locked(7));
        assert!(t.is_locked(8));
    }

    #[test]
    fn a_node_accepts_until_blocked() {
        let t = Tools::default();
        assert!(t.accepting());
        t.blocked.store(true, Ordering::SeqCst);
        assert!(!t.accepting());
    }

    #[test]
    fn refusals_say_what_to_do() {
        assert_eq!(
            locked_message("node-1", 1234),
            "process 1234 on node-1 is locked; `ferry unlock node-1:1234` first"
        );
        assert_eq!(
            refuses_message("node-2"),
            "node-2 refuses arriving processes (`ferry node unblock node-2`)"
        );
    }
}
