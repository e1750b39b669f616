//! What the user tools do on the `ferry` side: `ferry run --on`, `lock`, `unlock`,
//! `node block|unblock|expel|bring`, `migrate NODE:PID home`, and the tables of `top` and `mon`.
//! Each call goes to the API of the node it is about ([`super::tools`] is the daemon's side).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::api::{
    ApiError, MigrationJob, MoveStarted, NodeAction, NodeControlReport, NodeState, NodeStatus,
    Process, StartError, StartRequest,
};
use super::control::{Cluster, ControlError};

/// Errors of the user tools. `is_usage()` tells those the user fixes on the command line.
#[derive(Debug, thiserror::Error)]
pub enum ToolsError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Api(#[from] super::client::ClientError),
    /// The program could not start (127 not found, 126 not executable).
    #[error("{message}")]
    NotStarted { message: String, exit_code: i32 },
    /// The node said no (a process that does not exist, a bad request).
    #[error("{message}")]
    Refused { status: u16, message: String },
    #[error("node {node} answered {status}: {message}")]
    Failed {
        node: String,
        status: u16,
        message: String,
    },
    #[error("process {pid} on {node} already runs at its home node")]
    AlreadyHome { node: String, pid: u32 },
    #[error("no process {pid} on {node}; `ferry ps` lists the cluster's processes")]
    NoProcess { node: String, pid: u32 },
    #[error("node {node} answered something that is not the expected JSON: {source}")]
    Decode {
        node: String,
        source: serde_json::Error,
    },
    #[error("the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl ToolsError {
    /// True for errors the user fixes on the command line (exit status 2).
    pub fn is_usage(&self) -> bool {
        match self {
            ToolsError::Control(e) => e.is_usage(),
            ToolsError::Refused { .. }
            | ToolsError::AlreadyHome { .. }
            | ToolsError::NoProcess { .. } => true,
            _ => false,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ToolsError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ToolsError::Runtime)
}

/// The `error` of an error body, or the body as text.
fn message(body: &[u8]) -> String {
    serde_json::from_slice::<ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string())
}

/// A success body as `T`; a 4xx as [`ToolsError::Refused`] (409 included: a refusal with its
/// reason), anything else as [`ToolsError::Failed`].
fn answer<T: serde::de::DeserializeOwned>(
    node: &str,
    status: u16,
    body: &[u8],
) -> Result<T, ToolsError> {
    match status {
        200..=299 => serde_json::from_slice(body).map_err(|source| ToolsError::Decode {
            node: node.to_string(),
            source,
        }),
        400..=499 => Err(ToolsError::Refused {
            status,
            message: message(body),
        }),
        _ => Err(ToolsError::Failed {
            node: node.to_string(),
            status,
            message: message(body),
        }),
    }
}

/// Starts `argv` on node `node` (locked in place if `locked`): the process as it runs there.
pub fn start(
    cluster: &Cluster,
    node: &str,
    argv: &[String],
    locked: bool,
) -> Result<Process, ToolsError> {
    let client = cluster
        .client(cluster.node_named(node)?)?
        .with_timeout(Duration::from_secs(60));
    let request = StartRequest {
        argv: argv.to_vec(),
        locked,
    };
    runtime()?.block_on(async {
        let (status, body) = client.post_json("/v1/processes", &request).await?;
        if status == 422 {
            if let Ok(e) = serde_json::from_slice::<StartError>(&body) {
                return Err(ToolsError::NotStarted {
                    message: e.error,
                    exit_code: e.exit_code,
                });
            }
        }
        answer(node, status, &body)
    })
}

/// Locks process `pid` of node `node` in place, or unlocks it: the process.
pub fn set_lock(
    cluster: &Cluster,
    node: &str,
    pid: u32,
    locked: bool,
) -> Result<Process, ToolsError> {
    let client = cluster.client(cluster.node_named(node)?)?;
    let method = if locked { "PUT" } else { "DELETE" };
    runtime()?.block_on(async {
        let (status, body) = client
            .call(method, &format!("/v1/processes/{pid}/lock"))
            .await?;
        answer(node, status, &body)
    })
}

/// Asks node `node` to block, unblock, expel or bring.
pub fn node_control(
    cluster: &Cluster,
    node: &str,
    action: NodeAction,
) -> Result<NodeControlReport, ToolsError> {
    let client = cluster
        .client(cluster.node_named(node)?)?
        .with_timeout(Duration::from_secs(120));
    runtime()?.block_on(async {
        let (status, body) = client
            .call("POST", &format!("/v1/node/{}", action.name()))
            .await?;
        answer(node, status, &body)
    })
}

/// The home node of process `pid` of node `node`: where `ferry migrate NODE:PID home` sends
/// it. An error if it runs at home already or does not exist.
pub fn home_of(cluster: &Cluster, node: &str, pid: u32) -> Result<String, ToolsError> {
    let client = cluster.client(cluster.node_named(node)?)?;
    let list: Vec<Process> = runtime()?.block_on(client.get("/v1/processes"))?;
    let p = list
        .into_iter()
        .find(|p| p.pid == pid)
        .ok_or_else(|| ToolsError::NoProcess {
            node: node.to_string(),
            pid,
        })?;
    match p.home {
        Some(home) if home != node => Ok(home),
        _ => Err(ToolsError::AlreadyHome {
            node: node.to_string(),
            pid,
        }),
    }
}

/// A move and how it ended: its job, or why it did not start or could not be followed.
pub type MoveOutcome = (MoveStarted, Result<MigrationJob, String>);

/// Follows the jobs of `moves` (on their source nodes) until each ended; each move with its
/// job as it ended, or the error that kept it from starting or from being followed.
pub fn wait_moves(
    cluster: &Cluster,
    moves: &[MoveStarted],
    limit: Duration,
) -> Result<Vec<MoveOutcome>, ToolsError> {
    let rt = runtime()?;
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    for m in moves {
        let Some(id) = m.job else {
            let why = m.error.clone().unwrap_or_else(|| "it did not start".into());
            out.push((m.clone(), Err(why)));
            continue;
        };
        let client = cluster.client(cluster.node_named(&m.from)?)?;
        let path = format!("/v1/migrations/{id}");
        let result = rt.block_on(async {
            loop {
                match client.get::<MigrationJob>(&path).await {
                    Ok(job) if !job.state.is_active() => return Ok(job),
                    Ok(_) => {}
                    Err(e) if e.is_unreachable() && Instant::now() < deadline => {}
                    Err(e) => return Err(e.to_string()),
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "still moving after {} s (`ferry ps` shows where it is)",
                        limit.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        out.push((m.clone(), result));
    }
    Ok(out)
}

/// One row of `ferry top`: a process and its CPU use between two samples.
#[derive(Debug, Clone, PartialEq)]
pub struct TopRow {
    pub node: String,
    pub process: Process,
    /// CPU use between the samples, percent of one CPU.
    pub cpu_percent: f64,
}

/// The rows of `ferry top` from two samples `elapsed` apart, busiest first. A process only
/// in the second sample (started or arrived meanwhile) counts from zero CPU time.
pub fn top_rows(
    before: &[(String, Process)],
    after: &[(String, Process)],
    elapsed: Duration,
) -> Vec<TopRow> {
    let earlier: HashMap<(&str, u32), f64> = before
        .iter()
        .map(|(n, p)| ((n.as_str(), p.pid), p.cpu_seconds))
        .collect();
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut rows: Vec<TopRow> = after
        .iter()
        .map(|(node, p)| {
            let used = p.cpu_seconds - earlier.get(&(node.as_str(), p.pid)).copied().unwrap_or(0.0);
            TopRow {
                node: node.clone(),
                process: p.clone(),
                cpu_percent: (used.max(0.0) / secs * 100.0 * 10.0).round() / 10.0,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.cpu_percent
            .total_cmp(&a.cpu_percent)
            .then_with(|| a.node.cmp(&b.node))
            .then_with(|| a.process.pid.cmp(&b.process.pid))
    });
    rows
}

/// The table `ferry top` prints, at most `limit` rows.
pub fn top_table(rows: &[TopRow], limit: usize) -> String {
    let mut out = format!(
        "{:<10} {:>7} {:<10} {:>5} {:>6} {:>10}  {:<6} COMMAND\n",
        "NODE", "PID", "HOME", "MOVES", "CPU%", "RSS", "LOCKED"
    );
    for r in rows.iter().take(limit) {
        let p = &r.process;
        out.push_str(&format!(
            "{:<10} {:>7} {:<10} {:>5} {:>6.1} {:>6} KiB  {:<6} {}\n",
            r.node,
            p.pid,
            p.home.as_deref().unwrap_or(&r.node),
            p.moves,
            r.cpu_percent,
            p.rss_kib,
            if p.locked { "yes" } else { "" },
            one_line(&p.command)
        ));
    }
    out
}

/// A command line on one table line: control characters (the newlines of a `python3 -c`
/// script) become spaces.
pub fn one_line(command: &str) -> String {
    command
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Characters of a `ferry mon` bar.
const BAR: usize = 40;

/// The lines `ferry mon` prints: per node its name, a bar of its CPU use (all vCPUs, the run
/// queue next to it), and its free memory; a node that is not ready says so instead.
pub fn mon_table(statuses: &[NodeStatus]) -> String {
    let width = statuses
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(
        "{:<width$}  {:<bar$}  {:>6}  {:>9}  {:>13}\n",
        "NODE",
        "LOAD",
        "CPU%",
        "RUN/VCPU",
        "FREE MEMORY",
        bar = BAR + 2
    );
    for s in statuses {
        let blocked = if s.accepting { "" } else { "  (blocked)" };
        match (&s.state, &s.load) {
            (NodeState::Ready, Some(l)) => {
                let filled =
                    ((l.cpu_percent.clamp(0.0, 100.0) / 100.0) * BAR as f64).round() as usize;
                out.push_str(&format!(
                    "{:<width$}  [{}{}]  {:>5.1}%  {:>4}/{:<4}  {:>5}/{:>5} MiB{blocked}\n",
                    s.name,
                    "#".repeat(filled),
                    " ".repeat(BAR - filled),
                    l.cpu_percent,
                    l.run_queue,
                    l.online_cpus,
                    l.mem_available_mib,
                    l.mem_total_mib
                ));
            }
            (state, _) => out.push_str(&format!(
                "{:<width$}  {}{}{blocked}\n",
                s.name,
                state,
                s.detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::api::Load;

    fn process(pid: u32, cpu: f64) -> Process {
        Process {
            pid,
            ppid: 1,
            uid: 0,
            state: "R".into(),
            threads: 1,
            rss_kib: 2048,
            cpu_seconds: cpu,
            command: format!("python3 job{pid}.py"),
            kernel_thread: false,
            home: None,
            moves: 0,
            locked: false,
        }
    }

    #[test]
    fn top_sorts_by_cpu_between_the_samples() {
        let before = vec![
            ("node-1".to_string(), process(10, 100.0)),
            ("node-2".to_string(), process(10, 5.0)),
        ];
        let mut locked = process(11, 0.5);
        locked.locked = true;
        locked.home = Some("node-1".into());
        locked.moves = 2;
        let after = vec![
            ("node-1".to_string(), process(10, 100.2)),
            ("node-2".to_string(), process(10, 6.8)),
            // New since the first sample: all its CPU time counts.
            ("node-2".to_string(), locked),
        ];
        let rows = top_rows(&before, &after, Duration::from_secs(2));
        let got: Vec<(&str, u32, f64)> = rows
            .iter()
            .map(|r| (r.node.as_str(), r.process.pid, r.cpu_percent))
            .collect();
        assert_eq!(
            got,
            vec![
                ("node-2", 10, 90.0),
                ("node-2", 11, 25.0),
                ("node-1", 10, 10.0)
            ]
        );
        let table = top_table(&rows, 10);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NODE") && lines[0].contains("CPU%"));
        assert!(lines[0].contains("LOCKED") && lines[0].ends_with("COMMAND"));
        assert!(lines[2].contains("node-1") && lines[2].contains(" 2 "));
        assert!(lines[2].contains("yes") && lines[2].ends_with("python3 job11.py"));
        assert_eq!(top_table(&rows, 1).lines().count(), 2);
    }

    #[test]
    fn answers_map_to_results_and_refusals_are_usage_errors() {
        let p: Process = answer(
            "node-1",
            200,
            &serde_json::to_vec(&process(5, 1.0)).unwrap(),
        )
        .unwrap();
        assert_eq!(p.pid, 5);
        let body = br#"{"error": "process 5 on node-1 is locked; `ferry unlock node-1:5` first"}"#;
        let e = answer::<Process>("node-1", 409, body).unwrap_err();
        assert!(e.is_usage());
        assert_eq!(
            e.to_string(),
            "process 5 on node-1 is locked; `ferry unlock node-1:5` first"
        );
        let e = answer::<Process>("node-1", 502, br#"{"error": "agent gone"}"#).unwrap_err();
        assert!(!e.is_usage());
        assert_eq!(e.to_string(), "node node-1 answered 502: agent gone");
        let e = answer::<Process>("node-1", 200, b"not json").unwrap_err();
        assert!(matches!(e, ToolsError::Decode { .. }));
        assert_eq!(one_line("python3 -c 'a\nb'\tc"), "python3 -c 'a b' c");
    }

    #[test]
    fn a_process_that_restarted_its_clock_shows_no_negative_cpu() {
        let before = vec![("node-1".to_string(), process(10, 50.0))];
        let after = vec![("node-1".to_string(), process(10, 1.0))];
        assert_eq!(
            top_rows(&before, &after, Duration::from_secs(1))[0].cpu_percent,
            0.0
        );
    }

    fn node(name: &str, state: NodeState, cpu: f64) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            address: "10.0.0.1".into(),
            host: "localhost".into(),
            state,
            detail: (state != NodeState::Ready).then(|| "no answer".into()),
            api_url: String::new(),
            vcpus: 2,
            memory_mib: 512,
            kernel: None,
            boot_ms: None,
            load: (state == NodeState::Ready).then_some(Load {
                cpu_percent: cpu,
                run_queue: 1,
                load_avg: [0.5, 0.2, 0.1],
                online_cpus: 2,
                mem_total_mib: 480,
                mem_available_mib: 300,
                tasks: 80,
                uptime_s: 60,
                busy: 0,
            }),
            accepting: true,
        }
    }

    #[test]
    fn mon_draws_a_bar_per_node_and_says_which_are_down() {
        let mut blocked = node("node-2", NodeState::Ready, 100.0);
        blocked.accepting = false;
        let table = mon_table(&[
            node("node-1", NodeState::Ready, 50.0),
            blocked,
            node("node-3", NodeState::Down, 0.0),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1].matches('#').count(), BAR / 2);
        assert!(lines[1].contains("50.0%") && lines[1].contains("300/  480 MiB"));
        assert!(lines[1].contains("1/2"));
        assert_eq!(lines[2].matches('#').count(), BAR);
        assert!(lines[2].ends_with("(blocked)"));
        assert!(lines[3].starts_with("node-3") && lines[3].contains("down: no answer"));
    }
}
