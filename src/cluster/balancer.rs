//! The automatic load balancer: openMosix's idea on ferry's migrations.
//!
//! Every node daemon runs one. Each interval it samples its guest's processes through the
//! agent, works out which are CPU-bound (each uses at least `min_cpu_share` percent of the
//! CPU it could fairly get there), and publishes their number in its load (`/v1/node`,
//! `load.busy`). It reads the other nodes' loads and, when it has more CPU-bound processes
//! than vCPUs, sends one of them to the least loaded node that accepts processes, provided
//! that afterwards this node is still at least as loaded as that one: so a move never turns
//! the imbalance around, and nothing ping-pongs. A process stays at least `residence_s` on a
//! node before the balancer moves it, and each node has one move in flight at most; until a
//! destination's published load shows a process it was sent, the sender counts it there
//! itself, so moves follow one another without piling onto one node. A node short of memory
//! (available below `memory_low_percent` of its RAM) ushers its largest process to the node
//! with the most memory to spare, as openMosix's memory ushering did.
//!
//! The policy comes from the cluster file's `[balancer]` table and can be changed at run
//! time (`PUT /v1/balancer`, `ferry balancer`), on every node at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::api::{
    ApiError, JobState, MigrationMode, MigrationRequest, NodeState, NodeStatus, Process,
};
use super::control::{self, Cluster, ControlError};
use super::daemon::{error_response, json_response, lock, log, Node};

/// A process using less than this share of a CPU is not competing for one at all.
const ACTIVE_PERCENT: f64 = 5.0;
/// How long a process that could not move is left alone before the balancer tries again.
const BACKOFF: Duration = Duration::from_secs(300);
/// The balancer's recent decisions kept for `GET /v1/balancer`.
const EVENTS_KEPT: usize = 50;
/// The largest policy update read.
const MAX_BODY: usize = 16 * 1024;
/// Memory a destination must keep free beyond its own low-water mark to take a process.
const MEMORY_MARGIN_MIB: u64 = 64;

/// How the balancer behaves; the `[balancer]` table of the cluster file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Whether processes move by themselves.
    pub enabled: bool,
    /// How often each node weighs its load against the others', in milliseconds.
    pub interval_ms: u64,
    /// The share (percent) of the CPU a process could fairly get on its node that it must use
    /// to count as CPU-bound.
    pub min_cpu_share: u8,
    /// Seconds a process stays on a node before the balancer moves it (again).
    pub residence_s: u64,
    /// Below this much available memory (percent of the guest's RAM) a node moves processes
    /// away; 0: never.
    pub memory_low_percent: u8,
    /// Only processes whose program (or script) is named here move by themselves; empty:
    /// any process.
    pub commands: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            interval_ms: 2000,
            min_cpu_share: 50,
            residence_s: 20,
            memory_low_percent: 10,
            commands: Vec::new(),
        }
    }
}

/// The limits of each setting: (key, lowest, highest).
pub const LIMITS: &[(&str, u64, u64)] = &[
    ("interval_ms", 500, 60_000),
    ("min_cpu_share", 1, 100),
    ("residence_s", 0, 3600),
    ("memory_low_percent", 0, 90),
];

/// Why a setting is out of its range, in the words of `key = value`.
pub fn check_limit(key: &str, value: u64) -> Result<(), String> {
    match LIMITS.iter().find(|(k, _, _)| *k == key) {
        Some((_, lo, hi)) if !(*lo..=*hi).contains(&value) => {
            Err(format!("{key} = {value} is out of range; use {lo} to {hi}"))
        }
        _ => Ok(()),
    }
}

/// `PUT /v1/balancer`: the settings to change; the others stay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cpu_share: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residence_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_low_percent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<String>>,
}

impl PolicyUpdate {
    /// `policy` with this update applied, or why a value is refused (nothing applied then).
    pub fn apply(&self, policy: &Policy) -> Result<Policy, String> {
        let mut p = policy.clone();
        if let Some(v) = self.enabled {
            p.enabled = v;
        }
        let checked = |key: &str, v: Option<u64>| -> Result<Option<u64>, String> {
            match v {
                Some(v) => check_limit(key, v).map(|_| Some(v)),
                None => Ok(None),
            }
        };
        if let Some(v) = checked("interval_ms", self.interval_ms)? {
            p.interval_ms = v;
        }
        if let Some(v) = checked("min_cpu_share", self.min_cpu_share)? {
            p.min_cpu_share = v as u8;
        }
        if let Some(v) = checked("residence_s", self.residence_s)? {
            p.residence_s = v;
        }
        if let Some(v) = checked("memory_low_percent", self.memory_low_percent)? {
            p.memory_low_percent = v as u8;
        }
        if let Some(c) = &self.commands {
            if let Some(bad) = c.iter().find(|c| c.trim().is_empty() || c.contains('/')) {
                return Err(format!(
                    "commands: {bad:?} is not a program name; give names such as \"python3\" \
                     or \"job.py\", without directories"
                ));
            }
            p.commands = c.clone();
        }
        Ok(p)
    }

    pub fn is_empty(&self) -> bool {
        *self == PolicyUpdate::default()
    }
}

/// One recent decision of a node's balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub message: String,
}

/// `GET /v1/balancer`: a node's balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalancerStatus {
    pub node: String,
    pub policy: Policy,
    /// CPU-bound processes on the node now.
    pub busy: u32,
    /// Recent decisions, oldest first.
    pub events: Vec<Event>,
}

/// One node as the balancer weighs it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLoad {
    pub name: String,
    pub vcpus: u32,
    /// CPU-bound processes.
    pub busy: u32,
    /// Whether it takes arriving processes now (up, and not refusing them).
    pub accepting: bool,
    pub mem_total_mib: u64,
    pub mem_available_mib: u64,
}

impl NodeLoad {
    /// A peer as its `/v1/node` describes it: `None` when it has no load to weigh (down,
    /// booting).
    pub fn from_status(s: &NodeStatus) -> Option<NodeLoad> {
        let load = s.load.as_ref()?;
        Some(NodeLoad {
            name: s.name.clone(),
            vcpus: load.online_cpus.max(1),
            busy: load.busy,
            accepting: s.state == NodeState::Ready && s.accepting,
            mem_total_mib: load.mem_total_mib,
            mem_available_mib: load.mem_available_mib,
        })
    }

    fn low_water_mib(&self, policy: &Policy) -> u64 {
        self.mem_total_mib * u64::from(policy.memory_low_percent) / 100
    }
}

/// A local process the balancer may move.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub pid: u32,
    pub cpu_percent: f64,
    pub busy: bool,
    pub rss_kib: u64,
}

/// What the balancer does this round.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub pid: u32,
    pub to: String,
    /// Why, in a user's words.
    pub why: String,
}

/// This round's move, if any: first memory (a node short of it), then CPU.
pub fn decide(
    policy: &Policy,
    me: &NodeLoad,
    peers: &[NodeLoad],
    candidates: &[Candidate],
) -> Option<Decision> {
    decide_memory(policy, me, peers, candidates).or_else(|| decide_cpu(me, peers, candidates))
}

/// A CPU-bound process to the least loaded peer, when this node has more of them than vCPUs
/// and stays at least as loaded as that peer after the move.
fn decide_cpu(me: &NodeLoad, peers: &[NodeLoad], candidates: &[Candidate]) -> Option<Decision> {
    if me.busy <= me.vcpus {
        return None;
    }
    // Loads per vCPU compared exactly: a/b >= c/d as a*d >= c*b.
    let after_here = u64::from(me.busy - 1);
    let peer = peers
        .iter()
        .filter(|p| p.accepting && p.name != me.name)
        .min_by(|a, b| {
            let (la, lb) = (
                u64::from(a.busy + 1) * u64::from(b.vcpus),
                u64::from(b.busy + 1) * u64::from(a.vcpus),
            );
            la.cmp(&lb).then_with(|| a.name.cmp(&b.name))
        })?;
    if after_here * u64::from(peer.vcpus) < u64::from(peer.busy + 1) * u64::from(me.vcpus) {
        return None;
    }
    // The cheapest to move: the smallest CPU-bound process.
    let pick = candidates
        .iter()
        .filter(|c| c.busy)
        .min_by_key(|c| (c.rss_kib, c.pid))?;
    Some(Decision {
        pid: pick.pid,
        to: peer.name.clone(),
        why: format!(
            "{} CPU-bound processes on {} vCPUs here, {} on {} vCPUs at {}",
            me.busy, me.vcpus, peer.busy, peer.vcpus, peer.name
        ),
    })
}

/// The largest process to the peer with the most memory to spare, when this node's available
/// memory is below its low-water mark.
fn decide_memory(
    policy: &Policy,
    me: &NodeLoad,
    peers: &[NodeLoad],
    candidates: &[Candidate],
) -> Option<Decision> {
    if policy.memory_low_percent == 0 || me.mem_available_mib >= me.low_water_mib(policy) {
        return None;
    }
    let pick = candidates.iter().max_by_key(|c| (c.rss_kib, c.pid))?;
    let need = pick.rss_kib.div_ceil(1024);
    let peer = peers
        .iter()
        .filter(|p| p.accepting && p.name != me.name)
        .filter(|p| p.mem_available_mib >= need + p.low_water_mib(policy) + MEMORY_MARGIN_MIB)
        .max_by_key(|p| (p.mem_available_mib, std::cmp::Reverse(p.name.clone())))?;
    Some(Decision {
        pid: pick.pid,
        to: peer.name.clone(),
        why: format!(
            "{} MiB available here, under {}% of {} MiB; {} has {} MiB",
            me.mem_available_mib,
            policy.memory_low_percent,
            me.mem_total_mib,
            peer.name,
            peer.mem_available_mib
        ),
    })
}

/// Per-process CPU use between samples of the agent's process list.
#[derive(Debug, Default)]
pub struct Sampler {
    tracks: HashMap<u32, Track>,
}

#[derive(Debug, Clone)]
struct Track {
    first_seen: Instant,
    cpu_seconds: f64,
    at: Instant,
    /// Smoothed CPU use, percent of one CPU; `None` until a second sample.
    percent: Option<f64>,
}

/// One sampled process: its CPU use (percent of one CPU) and how long it has been seen here.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub pid: u32,
    pub cpu_percent: f64,
    pub age: Duration,
}

impl Sampler {
    /// Takes a sample of `procs` at `now`: each process's CPU use since the last sample
    /// (smoothed), for the processes seen before.
    pub fn update(&mut self, procs: &[Process], now: Instant) -> Vec<Sampled> {
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(procs.len());
        for p in procs {
            let track = match self.tracks.remove(&p.pid) {
                // A pid used again by another process shows as CPU time going back.
                Some(t) if p.cpu_seconds >= t.cpu_seconds => {
                    let dt = now.saturating_duration_since(t.at).as_secs_f64();
                    let percent = if dt > 0.0 {
                        let now_pc = (p.cpu_seconds - t.cpu_seconds) / dt * 100.0;
                        Some(t.percent.map_or(now_pc, |old| (old + now_pc) / 2.0))
                    } else {
                        t.percent
                    };
                    Track {
                        first_seen: t.first_seen,
                        cpu_seconds: p.cpu_seconds,
                        at: now,
                        percent,
                    }
                }
                _ => Track {
                    first_seen: now,
                    cpu_seconds: p.cpu_seconds,
                    at: now,
                    percent: None,
                },
            };
            if let Some(pc) = track.percent {
                out.push(Sampled {
                    pid: p.pid,
                    cpu_percent: pc,
                    age: now.saturating_duration_since(track.first_seen),
                });
            }
            seen.insert(p.pid, track);
        }
        self.tracks = seen;
        out
    }
}

/// Which of `sampled` are CPU-bound on a node with `vcpus` vCPUs: each uses at least
/// `min_share` percent of its fair share of the CPUs, that is of all of them spread over the
/// processes that use any.
pub fn busy_pids(sampled: &[Sampled], vcpus: u32, min_share: u8) -> Vec<u32> {
    let active = sampled
        .iter()
        .filter(|s| s.cpu_percent >= ACTIVE_PERCENT)
        .count();
    let vcpus = vcpus.max(1) as f64;
    let fair = 100.0 * vcpus / (active as f64).max(vcpus);
    let bar = fair * f64::from(min_share) / 100.0;
    sampled
        .iter()
        .filter(|s| s.cpu_percent >= ACTIVE_PERCENT && s.cpu_percent >= bar)
        .map(|s| s.pid)
        .collect()
}

/// Whether `p`'s program or script is one of `commands` (an empty list takes any).
pub fn command_matches(commands: &[String], p: &Process) -> bool {
    if commands.is_empty() {
        return true;
    }
    p.command
        .split_whitespace()
        .take(2)
        .filter_map(|w| w.rsplit('/').next())
        .any(|name| commands.iter().any(|c| c == name))
}

/// What the daemon keeps of its balancer.
pub struct Balancer {
    policy: Mutex<Policy>,
    busy: AtomicU32,
    events: Mutex<VecDeque<Event>>,
    /// Processes that could not move, and when they may be tried again.
    backoff: Mutex<HashMap<u32, Instant>>,
    /// The migrations this balancer started and has not seen end yet.
    started: Mutex<HashSet<u64>>,
    /// Its moves that ended well lately.
    arrived: Mutex<Vec<Sent>>,
    /// Wakes the loop when the policy changes.
    changed: tokio::sync::Notify,
}

impl Balancer {
    pub fn new(policy: Policy) -> Self {
        Balancer {
            policy: Mutex::new(policy),
            busy: AtomicU32::new(0),
            events: Mutex::new(VecDeque::new()),
            backoff: Mutex::new(HashMap::new()),
            started: Mutex::new(HashSet::new()),
            arrived: Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn policy(&self) -> Policy {
        lock(&self.policy).clone()
    }

    /// CPU-bound processes at the last sample.
    pub fn busy(&self) -> u32 {
        self.busy.load(Ordering::Relaxed)
    }

    /// Applies `update`; the new policy, or why it is refused.
    pub fn update(&self, update: &PolicyUpdate) -> Result<Policy, String> {
        let new = {
            let mut p = lock(&self.policy);
            let new = update.apply(&p)?;
            *p = new.clone();
            new
        };
        self.event(format!(
            "policy: {}",
            serde_json::to_string(update).unwrap_or_default()
        ));
        self.changed.notify_one();
        Ok(new)
    }

    pub fn status(&self, node: &str) -> BalancerStatus {
        BalancerStatus {
            node: node.to_string(),
            policy: self.policy(),
            busy: self.busy(),
            events: lock(&self.events).iter().cloned().collect(),
        }
    }

    fn event(&self, message: String) {
        log(format!("balancer: {message}"));
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut events = lock(&self.events);
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event { at_ms, message });
    }

    fn backing_off(&self, pid: u32, now: Instant) -> bool {
        let mut b = lock(&self.backoff);
        b.retain(|_, until| *until > now);
        b.contains_key(&pid)
    }
}

impl Node {
    /// The balancer's loop: runs until the daemon stops.
    pub(super) async fn balance(self: Arc<Self>) {
        let mut sampler = Sampler::default();
        loop {
            let interval = Duration::from_millis(self.balancer.policy().interval_ms);
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.balancer.changed.notified() => {}
            }
            self.balance_once(&mut sampler).await;
        }
    }

    /// One round: sample, publish, and maybe start a move.
    async fn balance_once(self: &Arc<Self>, sampler: &mut Sampler) {
        let node = self.clone();
        let procs = match tokio::task::spawn_blocking(move || node.processes(false)).await {
            Ok(Ok(p)) => p,
            _ => return,
        };
        let now = Instant::now();
        let sampled = sampler.update(&procs, now);
        let me = self.status();
        let vcpus = me
            .load
            .as_ref()
            .map_or(u32::from(me.vcpus), |l| l.online_cpus);
        let policy = self.balancer.policy();
        let busy = busy_pids(&sampled, vcpus, policy.min_cpu_share);
        self.balancer
            .busy
            .store(busy.len() as u32, Ordering::Relaxed);
        self.note_finished_moves(now);
        if !policy.enabled || self.jobs.list().iter().any(|j| j.state.is_active()) {
            return;
        }
        let residence = Duration::from_secs(policy.residence_s);
        let candidates: Vec<Candidate> = sampled
            .iter()
            .filter(|s| s.age >= residence && !self.balancer.backing_off(s.pid, now))
            .filter_map(|s| {
                let p = procs.iter().find(|p| p.pid == s.pid)?;
                let movable = p.pid > 1
                    && !p.kernel_thread
                    && !p.locked
                    && command_matches(&policy.commands, p)
                    && !p.command.contains("ferry-agent");
                movable.then(|| Candidate {
                    pid: s.pid,
                    cpu_percent: s.cpu_percent,
                    busy: busy.contains(&s.pid),
                    rss_kib: p.rss_kib,
                })
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let Some(mut me_load) = NodeLoad::from_status(&me) else {
            return;
        };
        me_load.busy = busy.len() as u32;
        let mut peers: Vec<NodeLoad> = self
            .all_nodes()
            .await
            .iter()
            .filter(|s| s.name != self.me.name)
            .filter_map(NodeLoad::from_status)
            .collect();
        {
            let mut arrived = lock(&self.balancer.arrived);
            arrived.retain(|s| now.saturating_duration_since(s.at) < settle_time(&policy));
            credit_arrivals(&mut me_load, &mut peers, &arrived);
        }
        let Some(decision) = decide(&policy, &me_load, &peers, &candidates) else {
            return;
        };
        let request = MigrationRequest {
            pid: decision.pid,
            node: None,
            to: decision.to.clone(),
            mode: MigrationMode::Precopy,
            downtime_ms: None,
            bandwidth_mib_s: None,
        };
        match self.start_migration(request).await {
            Ok(job) => {
                lock(&self.balancer.started).insert(job.id);
                self.balancer.event(format!(
                    "moving process {} to {} (migration {}): {}",
                    decision.pid, decision.to, job.id, decision.why
                ));
            }
            Err((_, why)) => {
                self.balancer.event(format!(
                    "process {} stays: {why}; not tried again for {} s",
                    decision.pid,
                    BACKOFF.as_secs()
                ));
                lock(&self.balancer.backoff).insert(decision.pid, now + BACKOFF);
            }
        }
    }

    /// `PUT /v1/balancer`: checks the update, applies it here, and (unless `node_only`) on
    /// every other node. A value out of range changes nothing anywhere.
    pub(super) async fn set_balancer_request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        node_only: bool,
    ) -> Response<Full<Bytes>> {
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error_response(400, format!("reading the request body: {e}")),
        };
        let update: PolicyUpdate = match serde_json::from_slice(&body) {
            Ok(u) => u,
            Err(e) => {
                return error_response(
                    400,
                    format!(
                    "the body is not a balancer policy ({e}); send e.g. {{\"enabled\": false}}; \
                         the settings are enabled, interval_ms, min_cpu_share, residence_s, \
                         memory_low_percent and commands"
                ),
                )
            }
        };
        if update.is_empty() {
            return error_response(
                400,
                "the body changes nothing; give at least one setting, e.g. {\"enabled\": true}",
            );
        }
        if let Err(why) = update.apply(&self.balancer.policy()) {
            return error_response(400, why);
        }
        let mut applied = Vec::new();
        let mut failed = Vec::new();
        if !node_only {
            let peers: Vec<NodeStatus> = self
                .all_nodes()
                .await
                .into_iter()
                .filter(|s| s.name != self.me.name)
                .collect();
            let mut tasks = Vec::new();
            for peer in peers {
                let Some(n) = self.member(&peer.name) else {
                    continue;
                };
                let client = self.peer_client(&n);
                let update = update.clone();
                tasks.push(tokio::spawn(async move {
                    let r = client
                        .send_json("PUT", "/v1/balancer?scope=node", &update)
                        .await;
                    (n.name, r)
                }));
            }
            for t in tasks {
                let Ok((name, r)) = t.await else { continue };
                match r {
                    Ok((200, body)) => match serde_json::from_slice::<Vec<BalancerStatus>>(&body) {
                        Ok(s) => applied.extend(s),
                        Err(e) => failed.push(format!("{name}: an answer that is not JSON: {e}")),
                    },
                    Ok((status, body)) => failed.push(format!(
                        "{name}: {status} {}",
                        String::from_utf8_lossy(&body).trim()
                    )),
                    Err(e) => failed.push(format!("{name}: {e}")),
                }
            }
        }
        match self.balancer.update(&update) {
            Ok(_) => applied.insert(0, self.balancer.status(&self.me.name)),
            Err(why) => return error_response(400, why),
        }
        if failed.is_empty() {
            json_response(StatusCode::OK, &applied)
        } else {
            let done: Vec<&str> = applied.iter().map(|s| s.node.as_str()).collect();
            error_response(
                502,
                format!(
                    "the policy changed on {} but not on {}; run it again once those nodes are up",
                    done.join(", "),
                    failed.join("; ")
                ),
            )
        }
    }

    /// Notes the balancer's moves that ended since the last round: where the done ones went,
    /// and the processes of failed ones, left alone a while.
    fn note_finished_moves(&self, now: Instant) {
        let mut started = lock(&self.balancer.started);
        for job in self.jobs.list() {
            if job.state.is_active() || !started.remove(&job.id) {
                continue;
            }
            if job.state == JobState::Done {
                lock(&self.balancer.arrived).push(Sent {
                    to: job.to.clone(),
                    at: now,
                    mib: job.bytes_total >> 20,
                });
            }
            if job.state == JobState::Failed {
                lock(&self.balancer.backoff).insert(job.pid, now + BACKOFF);
                self.balancer.event(format!(
                    "process {} did not move to {} (migration {}): {}; not tried again for {} s",
                    job.pid,
                    job.to,
                    job.id,
                    job.error.as_deref().unwrap_or("failed"),
                    BACKOFF.as_secs()
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The `ferry balancer` side.

impl Cluster {
    /// Every node's balancer, asked of each node (a node that does not answer is left out,
    /// with a note on stderr).
    pub fn balancers(&self) -> Result<Vec<BalancerStatus>, ControlError> {
        let mut out = Vec::new();
        let rt = control::runtime()?;
        for n in &self.config.nodes {
            let client = self.client(n)?;
            match rt.block_on(client.get::<BalancerStatus>("/v1/balancer")) {
                Ok(s) => out.push(s),
                Err(e) => eprintln!("ferry: {}: {e}", n.name),
            }
        }
        Ok(out)
    }

    /// Changes the balancer's policy on every node, through the first node that answers.
    pub fn set_balancer(&self, update: &PolicyUpdate) -> Result<Vec<BalancerStatus>, ControlError> {
        let rt = control::runtime()?;
        let mut last = None;
        for n in &self.config.nodes {
            let client = self.client(n)?;
            match rt.block_on(client.send_json("PUT", "/v1/balancer", update)) {
                Ok((200, body)) => {
                    return serde_json::from_slice(&body).map_err(|e| ControlError::Io {
                        what: format!("reading {}'s answer", n.name),
                        source: std::io::Error::other(e),
                    })
                }
                Ok((status, body)) => {
                    return Err(ControlError::Refused {
                        status,
                        message: serde_json::from_slice::<ApiError>(&body)
                            .map(|e| e.error)
                            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned()),
                    })
                }
                Err(e) if e.is_unreachable() => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(
            || ControlError::Refused {
                status: 503,
                message: "the cluster has no nodes".into(),
            },
            ControlError::from,
        ))
    }
}

/// What `ferry balancer` prints: each node's policy line, CPU-bound processes and latest
/// decisions.
pub fn balancer_report(statuses: &[BalancerStatus], events: usize) -> String {
    let mut out = String::new();
    for s in statuses {
        let p = &s.policy;
        out += &format!(
            "{}: balancer {}, {} CPU-bound process{}; every {} ms, CPU-bound at {}% of a fair share, stays {} s, ushers below {}% memory{}\n",
            s.node,
            if p.enabled { "on" } else { "off" },
            s.busy,
            if s.busy == 1 { "" } else { "es" },
            p.interval_ms,
            p.min_cpu_share,
            p.residence_s,
            p.memory_low_percent,
            if p.commands.is_empty() {
                String::new()
            } else {
                format!(", only {}", p.commands.join(", "))
            }
        );
        let skip = s.events.len().saturating_sub(events);
        for e in &s.events[skip..] {
            let t = UNIX_EPOCH + Duration::from_millis(e.at_ms);
            let age = SystemTime::now()
                .duration_since(t)
                .map_or(0, |d| d.as_secs());
            out += &format!("    {age:>4} s ago  {}\n", e.message);
        }
    }
    out
}

/// A process this balancer moved away lately.
#[derive(Debug, Clone)]
struct Sent {
    /// Its destination.
    to: String,
    /// When the move ended.
    at: Instant,
    /// Its private memory, MiB.
    mib: u64,
}

/// Counts the processes this node sent lately where loads sampled before their moves ended
/// do not show them yet: CPU-bound at their destinations, their memory taken there and freed
/// here. So the next move can follow at once without overloading the same node, and a node
/// short of memory does not send a second process away before its own figure shows the first
/// one gone.
fn credit_arrivals(me: &mut NodeLoad, peers: &mut [NodeLoad], arrived: &[Sent]) {
    for p in peers {
        for s in arrived.iter().filter(|s| s.to == p.name) {
            p.busy += 1;
            p.mem_available_mib = p.mem_available_mib.saturating_sub(s.mib);
        }
    }
    me.mem_available_mib += arrived.iter().map(|s| s.mib).sum::<u64>();
}

/// How long a destination's published load may miss a process that arrived: two of its
/// samples (a CPU rate needs two) and the time for this node to read it.
fn settle_time(policy: &Policy) -> Duration {
    Duration::from_millis(policy.interval_ms * 3).max(Duration::from_secs(6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, vcpus: u32, busy: u32) -> NodeLoad {
        NodeLoad {
            name: name.into(),
            vcpus,
            busy,
            accepting: true,
            mem_total_mib: 512,
            mem_available_mib: 400,
        }
    }

    fn busy_procs(n: u32) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                pid: 100 + i,
                cpu_percent: 50.0,
                busy: true,
                rss_kib: 10_000 + u64::from(i),
            })
            .collect()
    }

    /// Runs the decision rule on a simulated cluster until nothing moves; the final counts
    /// and the number of moves.
    fn settle(mut counts: Vec<u32>, vcpus: u32) -> (Vec<u32>, u32) {
        let policy = Policy::default();
        let names: Vec<String> = (0..counts.len()).map(|i| format!("node-{i}")).collect();
        let mut moves = 0;
        loop {
            let mut moved = false;
            for i in 0..counts.len() {
                let me = node(&names[i], vcpus, counts[i]);
                let peers: Vec<NodeLoad> = (0..counts.len())
                    .filter(|j| *j != i)
                    .map(|j| node(&names[j], vcpus, counts[j]))
                    .collect();
                if let Some(d) = decide(&policy, &me, &peers, &busy_procs(counts[i])) {
                    let j = names.iter().position(|n| *n == d.to).unwrap();
                    counts[i] -= 1;
                    counts[j] += 1;
                    moves += 1;
                    moved = true;
                }
            }
            assert!(moves < 100, "the rule does not settle: {counts:?}");
            if !moved {
                return (counts, moves);
            }
        }
    }

    #[test]
    fn twelve_jobs_on_one_node_spread_evenly_without_moving_back() {
        let (counts, moves) = settle(vec![12, 0, 0], 2);
        assert_eq!(counts, vec![4, 4, 4]);
        assert_eq!(moves, 8, "every move is a needed one");
    }

    #[test]
    fn four_jobs_on_one_node_reach_every_node() {
        let (counts, moves) = settle(vec![4, 0, 0], 2);
        assert_eq!(counts, vec![2, 1, 1]);
        assert_eq!(moves, 2);
    }

    #[test]
    fn moves_in_a_row_count_what_peers_do_not_show_yet() {
        // Peers publish loads from before the moves: without the credit every move would go
        // to the same node.
        let policy = Policy::default();
        let stale = vec![node("b", 2, 0), node("c", 2, 0)];
        let mut busy = 12;
        let mut arrived: Vec<Sent> = Vec::new();
        let mut sent = HashMap::new();
        while let Some(d) = {
            let mut peers = stale.clone();
            let mut me = node("a", 2, busy);
            credit_arrivals(&mut me, &mut peers, &arrived);
            decide(&policy, &me, &peers, &busy_procs(busy))
        } {
            busy -= 1;
            *sent.entry(d.to.clone()).or_insert(0) += 1;
            arrived.push(Sent {
                to: d.to,
                at: Instant::now(),
                mib: 1,
            });
        }
        assert_eq!(busy, 4);
        assert_eq!((sent["b"], sent["c"]), (4, 4));
    }

    #[test]
    fn no_move_while_each_busy_process_has_a_vcpu() {
        assert_eq!(settle(vec![2, 0, 0], 2), (vec![2, 0, 0], 0));
        assert_eq!(
            settle(vec![3, 2, 2], 2).1,
            0,
            "3 vs 2 would only turn it around"
        );
    }

    #[test]
    fn a_bigger_node_takes_more() {
        let policy = Policy::default();
        let me = node("a", 1, 3);
        let peers = vec![node("small", 1, 1), node("big", 4, 2)];
        let d = decide(&policy, &me, &peers, &busy_procs(3)).unwrap();
        assert_eq!(d.to, "big", "3/4 per vCPU after the move beats 2/1");
    }

    #[test]
    fn refusing_nodes_and_idle_processes_are_left_out() {
        let policy = Policy::default();
        let me = node("a", 2, 4);
        let mut refusing = node("b", 2, 0);
        refusing.accepting = false;
        assert_eq!(decide(&policy, &me, &[refusing], &busy_procs(4)), None);
        let idle: Vec<Candidate> = busy_procs(4)
            .into_iter()
            .map(|c| Candidate { busy: false, ..c })
            .collect();
        assert_eq!(decide(&policy, &me, &[node("b", 2, 0)], &idle), None);
    }

    #[test]
    fn the_smallest_busy_process_moves() {
        let policy = Policy::default();
        let mut c = busy_procs(4);
        c[2].rss_kib = 100;
        let d = decide(&policy, &node("a", 2, 4), &[node("b", 2, 0)], &c).unwrap();
        assert_eq!(d.pid, c[2].pid);
        assert!(d
            .why
            .contains("4 CPU-bound processes on 2 vCPUs here, 0 on 2 vCPUs at b"));
    }

    #[test]
    fn memory_short_node_ushers_its_largest_process_to_the_roomiest_peer() {
        let policy = Policy::default();
        let mut me = node("a", 2, 0);
        me.mem_available_mib = 40; // under 10% of 512
        let mut roomy = node("b", 2, 3);
        roomy.mem_available_mib = 450;
        let tight = node("c", 2, 0); // 400 MiB available
        let mut c = busy_procs(3);
        for x in &mut c {
            x.busy = false;
        }
        c[1].rss_kib = 200 * 1024;
        let d = decide(&policy, &me, &[tight.clone(), roomy], &c).unwrap();
        assert_eq!((d.pid, d.to.as_str()), (c[1].pid, "b"));
        // Nowhere with room for it: nothing moves.
        c[1].rss_kib = 390 * 1024;
        assert_eq!(decide(&policy, &me, &[tight], &c), None);
        // Ushering switched off.
        let off = Policy {
            memory_low_percent: 0,
            ..Policy::default()
        };
        assert_eq!(decide(&off, &me, &[node("b", 2, 0)], &c), None);
    }

    #[test]
    fn a_node_that_just_ushered_does_not_send_more_before_its_figure_shows_it() {
        // Two 120 MiB holders on a node under 40%; its own sample still shows the first one
        // there after it left.
        let policy = Policy {
            memory_low_percent: 40,
            ..Policy::default()
        };
        let mut stale_me = node("a", 2, 0);
        stale_me.mem_available_mib = 170; // under 40% of 512 (204)
        let peers = vec![node("b", 2, 0), node("c", 2, 0)];
        let mut c = busy_procs(2);
        for x in &mut c {
            x.busy = false;
            x.rss_kib = 120 * 1024;
        }
        let first = decide(&policy, &stale_me, &peers, &c).expect("the first one goes");
        let sent = [Sent {
            to: first.to.clone(),
            at: Instant::now(),
            mib: 120,
        }];
        let (mut me, mut credited) = (stale_me.clone(), peers.clone());
        credit_arrivals(&mut me, &mut credited, &sent);
        assert_eq!(me.mem_available_mib, 290);
        let rest: Vec<Candidate> = c.iter().filter(|x| x.pid != first.pid).cloned().collect();
        assert_eq!(decide(&policy, &me, &credited, &rest), None);
        // Without the credit it would have sent the second one too.
        assert!(decide(&policy, &stale_me, &peers, &rest).is_some());
        // And the destination's memory counts the arrival.
        let dest = credited.iter().find(|p| p.name == first.to).unwrap();
        assert_eq!(dest.mem_available_mib, 400 - 120);
    }

    fn proc(pid: u32, cpu_seconds: f64, command: &str) -> Process {
        Process {
            pid,
            ppid: 1,
            uid: 0,
            state: "R".into(),
            threads: 1,
            rss_kib: 1000,
            cpu_seconds,
            command: command.into(),
            kernel_thread: false,
            home: None,
            moves: 0,
            locked: false,
        }
    }

    #[test]
    fn sampler_measures_cpu_between_samples_and_forgets_reused_pids() {
        let mut s = Sampler::default();
        let t0 = Instant::now();
        assert!(
            s.update(&[proc(7, 10.0, "x")], t0).is_empty(),
            "one sample says nothing"
        );
        let out = s.update(&[proc(7, 11.0, "x")], t0 + Duration::from_secs(2));
        assert_eq!(out.len(), 1);
        assert!((out[0].cpu_percent - 50.0).abs() < 1e-9);
        assert_eq!(out[0].age, Duration::from_secs(2));
        // Smoothed: half the old, half the new.
        let out = s.update(&[proc(7, 13.0, "x")], t0 + Duration::from_secs(4));
        assert!((out[0].cpu_percent - 75.0).abs() < 1e-9);
        // CPU time going back: another process with the same pid, seen anew.
        assert!(s
            .update(&[proc(7, 0.5, "y")], t0 + Duration::from_secs(6))
            .is_empty());
    }

    fn sampled(pcts: &[f64]) -> Vec<Sampled> {
        pcts.iter()
            .enumerate()
            .map(|(i, p)| Sampled {
                pid: i as u32 + 1,
                cpu_percent: *p,
                age: Duration::ZERO,
            })
            .collect()
    }

    #[test]
    fn busy_is_measured_against_the_fair_share() {
        // Twelve processes sharing two vCPUs get about 17% each: all CPU-bound.
        assert_eq!(busy_pids(&sampled(&[16.0; 12]), 2, 50).len(), 12);
        // One alone on two vCPUs must use half a CPU to count.
        assert_eq!(busy_pids(&sampled(&[40.0]), 2, 50).len(), 0);
        assert_eq!(busy_pids(&sampled(&[99.0, 1.0, 3.0]), 2, 50), vec![1]);
    }

    #[test]
    fn commands_match_the_program_or_its_script() {
        let p = proc(9, 0.0, "/usr/bin/python3 /root/job.py --fast");
        assert!(command_matches(&[], &p));
        assert!(command_matches(&["python3".into()], &p));
        assert!(command_matches(&["job.py".into()], &p));
        assert!(!command_matches(&["--fast".into(), "sh".into()], &p));
    }

    #[test]
    fn updates_are_checked_whole_before_any_is_applied() {
        let p = Policy::default();
        let bad = PolicyUpdate {
            enabled: Some(false),
            interval_ms: Some(10),
            ..Default::default()
        };
        assert_eq!(
            bad.apply(&p).unwrap_err(),
            "interval_ms = 10 is out of range; use 500 to 60000"
        );
        let good = PolicyUpdate {
            enabled: Some(false),
            residence_s: Some(5),
            ..Default::default()
        };
        let q = good.apply(&p).unwrap();
        assert!(!q.enabled);
        assert_eq!(q.residence_s, 5);
        assert_eq!(q.interval_ms, p.interval_ms);
        let e: Result<PolicyUpdate, _> = serde_json::from_str(r#"{"enabeld": true}"#);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("unknown field `enabeld`"));
        let dirs = PolicyUpdate {
            commands: Some(vec!["/usr/bin/python3".into()]),
            ..Default::default()
        };
        assert!(dirs.apply(&p).unwrap_err().contains("without directories"));
    }
}
