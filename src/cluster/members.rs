//! Cluster membership by gossip: which nodes make up the cluster and whether they are up.
//!
//! Every node daemon runs a SWIM member ([foca]) over UDP on its peer port number (the same
//! number as its mutual-TLS peer port). The nodes of the cluster file seed the membership:
//! each daemon announces itself to them until they answer. A node that is in no file (`ferry
//! join`) announces itself to the one member address it was given, and the others learn of it
//! from the gossip. Each member's identity ([`MemberId`]) carries what the others need to use
//! it: name, host, API and peer ports, guest address, vCPUs and memory.
//!
//! Every datagram is sealed ([`Sealer`]): a magic, a kind, the time it was sent, the payload and
//! an HMAC-SHA256 tag under a key derived from the cluster's bearer token, so only holders of
//! the cluster's secrets take part. Datagrams that fail the check are dropped, counted, and
//! logged at most once a minute.
//!
//! A daemon that stops says so first (a `leaving` datagram to every member it knows, then
//! foca's own leave): the others show it down, "left the cluster". One that dies stops
//! answering probes and SWIM declares it down: "declared down by gossip: no answer since ...".
//! Either comes back up when its daemon returns (its identity then carries a later
//! generation, which wins over the old one).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foca::{AccumulatingRuntime, Codec, Foca, Member, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use ring::hmac;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::api::{Member as ApiMember, MemberState};
use super::config::{ClusterConfig, NodeConfig};
use super::daemon::{lock, log, Node};
use super::state::ClusterDir;

/// The first bytes of every ferry gossip datagram (version 1 of the envelope).
const MAGIC: &[u8; 4] = b"FYG1";
/// Magic, kind, send time (ms since the epoch, big-endian).
const HEAD_LEN: usize = 4 + 1 + 8;
const TAG_LEN: usize = 32;
/// How far a datagram's send time may be from ours: older ones are replays (or a clock that
/// is badly off, which the log says).
const MAX_AGE_MS: u64 = 60_000;
/// The largest datagram read.
const MAX_DATAGRAM: usize = 2048;
/// How often a daemon announces itself to seed addresses that are not (yet) members.
const SEED_INTERVAL: Duration = Duration::from_secs(3);
/// How often dropped datagrams may be logged.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The file that records a joined node in its directory of the cluster state.
const RECORD_FILE: &str = "joined.json";

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    #[error(
        "cannot listen for gossip on UDP {addr}: {source}; another program has that port: change the node's peer port"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot resolve {what} `{addr}`: {why}")]
    Resolve {
        what: &'static str,
        addr: String,
        why: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Record {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a joined node's record ({why}); remove it, or `ferry down` the cluster", path.display())]
    BadRecord { path: PathBuf, why: String },
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("{0} bytes, shorter than any ferry gossip datagram")]
    Short(usize),
    #[error("not a ferry gossip datagram (wrong magic)")]
    Magic,
    #[error("its authentication tag does not match: sent without this cluster's token")]
    Tag,
    #[error("unknown kind {0}")]
    Kind(u8),
    #[error("sent {age_s} s from now by the sender's clock: a replay, or a clock that is off")]
    Stale { age_s: i64 },
}

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One of foca's SWIM messages.
    Swim = 1,
    /// The sender is leaving the cluster: its identity, encoded as a foca member.
    Leaving = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Result<Kind, DatagramError> {
        match b {
            1 => Ok(Kind::Swim),
            2 => Ok(Kind::Leaving),
            k => Err(DatagramError::Kind(k)),
        }
    }
}

/// Seals and opens datagrams with the cluster's gossip key.
#[derive(Clone)]
pub struct Sealer {
    key: hmac::Key,
}

impl Sealer {
    /// The key is HMAC-SHA256 of a fixed label under the bearer token: never the token itself.
    pub fn from_token(token: &str) -> Sealer {
        let master = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
        let derived = hmac::sign(&master, b"ferry gossip datagrams v1");
        Sealer {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// `payload` in an envelope of `kind`, stamped with `now_ms`, tagged.
    pub fn seal(&self, kind: Kind, payload: &[u8], now_ms: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(kind as u8);
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(payload);
        let tag = hmac::sign(&self.key, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The kind and payload of a datagram whose tag matches and whose time is near `now_ms`.
    pub fn open<'d>(&self, d: &'d [u8], now_ms: u64) -> Result<(Kind, &'d [u8]), DatagramError> {
        if d.len() < HEAD_LEN + TAG_LEN {
            return Err(DatagramError::Short(d.len()));
        }
        if &d[..4] != MAGIC {
            return Err(DatagramError::Magic);
        }
        let (body, tag) = d.split_at(d.len() - TAG_LEN);
        hmac::verify(&self.key, body, tag).map_err(|_| DatagramError::Tag)?;
        let kind = Kind::from_byte(body[4])?;
        let sent = u64::from_be_bytes(body[5..13].try_into().expect("8 bytes"));
        if sent.abs_diff(now_ms) > MAX_AGE_MS {
            return Err(DatagramError::Stale {
                age_s: (now_ms as i64 - sent as i64) / 1000,
            });
        }
        Ok((kind, &body[HEAD_LEN..]))
    }
}

/// A member as the gossip carries it: what the other nodes need to use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberId {
    pub name: String,
    /// The machine its daemon runs on, as its file or `ferry join` says.
    pub host: String,
    /// Where its gossip and peer port answer (the host resolved, the peer port).
    pub peer: SocketAddr,
    pub api_port: u16,
    /// The guest's address with the subnet's prefix, e.g. `10.77.1.14/24`.
    pub address: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// When this daemon started (ms since the epoch), bumped when it renews its identity: of
    /// two identities of one address, the later generation wins.
    pub generation: u64,
}

impl MemberId {
    /// Node `n`'s identity for a daemon started at `generation`.
    pub fn of(n: &NodeConfig, generation: u64) -> Result<MemberId, MembersError> {
        Ok(MemberId {
            name: n.name.clone(),
            host: n.host.clone(),
            peer: resolve(
                &format!("{}:{}", n.host, n.peer_port),
                "the node's peer address",
            )?,
            api_port: n.api_port,
            address: n.address.to_string(),
            vcpus: n.vcpus,
            memory_mib: n.memory >> 20,
            generation,
        })
    }

    /// Stands for whoever answers at `peer` (announcing to a seed whose identity is not known
    /// yet).
    fn seed(peer: SocketAddr) -> MemberId {
        MemberId {
            name: String::new(),
            host: peer.ip().to_string(),
            peer,
            api_port: 0,
            address: String::new(),
            vcpus: 0,
            memory_mib: 0,
            generation: 0,
        }
    }

    /// The node this identity describes (an identity with a malformed address gives none).
    pub fn node(&self) -> Option<NodeConfig> {
        Some(NodeConfig {
            name: self.name.clone(),
            host: self.host.clone(),
            address: self.address.parse().ok()?,
            vcpus: self.vcpus,
            memory: self.memory_mib << 20,
            image: super::config::IMAGES[0].to_string(),
            packages: Vec::new(),
            api_port: self.api_port,
            peer_port: self.peer.port(),
        })
    }

    /// The identity as it travels (foca's member encoding).
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        PostcardCodec
            .encode_member(&Member::alive(self.clone()), &mut buf)
            .expect("a Vec grows as needed");
        buf
    }

    pub fn decode(mut bytes: &[u8]) -> Option<MemberId> {
        let m: Member<MemberId> = PostcardCodec.decode_member(&mut bytes).ok()?;
        Some(m.id().clone())
    }
}

impl foca::Identity for MemberId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(MemberId {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.peer
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// `host:port` resolved, an IPv4 address preferred.
pub fn resolve(addr: &str, what: &'static str) -> Result<SocketAddr, MembersError> {
    let err = |why: String| MembersError::Resolve {
        what,
        addr: addr.to_string(),
        why,
    };
    let all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| err("it has no address".into()))
}

/// What gossip says of a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Not heard of since this daemon started (a file node whose daemon is not up, or not yet).
    Unknown,
    Alive,
    /// Down, and why.
    Down(String),
}

#[derive(Debug, Clone)]
struct Entry {
    node: NodeConfig,
    in_file: bool,
    liveness: Liveness,
    generation: u64,
    last_heard: Option<SystemTime>,
}

/// Every member this daemon knows of: the file's nodes in its order, then those that joined,
/// in the order they were first heard of. Members are never removed: one that went away stays,
/// down with the reason.
#[derive(Debug, Clone)]
pub struct MemberTable {
    me: String,
    entries: Vec<Entry>,
}

impl MemberTable {
    /// The file's nodes (unknown until heard of) and this node (alive).
    pub fn new(file_nodes: &[NodeConfig], me: &NodeConfig) -> MemberTable {
        let mut entries: Vec<Entry> = file_nodes
            .iter()
            .map(|n| Entry {
                node: n.clone(),
                in_file: true,
                liveness: Liveness::Unknown,
                generation: 0,
                last_heard: None,
            })
            .collect();
        match entries.iter_mut().find(|e| e.node.name == me.name) {
            Some(e) => e.liveness = Liveness::Alive,
            None => entries.push(Entry {
                node: me.clone(),
                in_file: false,
                liveness: Liveness::Alive,
                generation: 0,
                last_heard: None,
            }),
        }
        MemberTable {
            me: me.name.clone(),
            entries,
        }
    }

    fn entry(&mut self, name: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.node.name == name)
    }

    /// A datagram from `name` arrived at `when`.
    pub fn heard(&mut self, name: &str, when: SystemTime) {
        if let Some(e) = self.entry(name) {
            e.last_heard = Some(when);
        }
    }

    /// `id` is up (again, or for the first time). Returns whether that is news.
    pub fn up(&mut self, id: &MemberId) -> bool {
        let Some(node) = id.node() else { return false };
        if id.name == self.me {
            return false;
        }
        match self.entry(&id.name) {
            Some(e) if e.generation > id.generation => false,
            Some(e) => {
                let news = e.liveness != Liveness::Alive;
                // The file's own settings stay (its packages, its image); a joined node's
                // come from its identity.
                if !e.in_file {
                    e.node = node;
                }
                e.generation = id.generation;
                e.liveness = Liveness::Alive;
                news
            }
            None => {
                self.entries.push(Entry {
                    node,
                    in_file: false,
                    liveness: Liveness::Alive,
                    generation: id.generation,
                    last_heard: None,
                });
                true
            }
        }
    }

    /// A newer identity of a member that is no more or less alive than before.
    pub fn renamed(&mut self, id: &MemberId) {
        let Some(node) = id.node() else { return };
        if let Some(e) = self.entry(&id.name) {
            if id.generation >= e.generation {
                e.generation = id.generation;
                if !e.in_file {
                    e.node = node;
                }
            }
        }
    }

    /// SWIM declared `id` down. A member that said it leaves stays "left". Returns whether
    /// that is news.
    pub fn declared_down(&mut self, id: &MemberId) -> bool {
        let Some(e) = self.entry(&id.name) else {
            return false;
        };
        if e.generation > id.generation || matches!(e.liveness, Liveness::Down(_)) {
            return false;
        }
        let since = match e.last_heard {
            Some(t) => format!("no answer since {}", utc_time(t)),
            None => "no answer".into(),
        };
        e.liveness = Liveness::Down(format!("declared down by gossip: {since}"));
        true
    }

    /// `id` said it leaves the cluster, at `when`. An older identity's word is ignored (a
    /// daemon that left and came back). Returns whether that is news.
    pub fn left(&mut self, id: &MemberId, when: SystemTime) -> bool {
        if id.name == self.me {
            return false;
        }
        let Some(e) = self.entry(&id.name) else {
            return false;
        };
        if e.generation > id.generation {
            return false;
        }
        e.generation = id.generation;
        e.liveness = Liveness::Down(format!("left the cluster at {}", utc_time(when)));
        true
    }

    /// Member `name`'s settings.
    pub fn node(&self, name: &str) -> Option<NodeConfig> {
        self.entries
            .iter()
            .find(|e| e.node.name == name)
            .map(|e| e.node.clone())
    }

    /// Every member with gossip's word on it.
    pub fn list(&self) -> Vec<(NodeConfig, Liveness)> {
        self.entries
            .iter()
            .map(|e| (e.node.clone(), e.liveness.clone()))
            .collect()
    }

    /// Every member as `GET /v1/members` shows it.
    pub fn api(&self) -> Vec<ApiMember> {
        self.entries
            .iter()
            .map(|e| ApiMember {
                name: e.node.name.clone(),
                host: e.node.host.clone(),
                address: e.node.address.to_string(),
                api_port: e.node.api_port,
                peer_port: e.node.peer_port,
                vcpus: e.node.vcpus,
                memory_mib: e.node.memory >> 20,
                in_file: e.in_file,
                state: match e.liveness {
                    Liveness::Unknown => MemberState::Unknown,
                    Liveness::Alive => MemberState::Alive,
                    Liveness::Down(_) => MemberState::Down,
                },
                detail: match &e.liveness {
                    Liveness::Down(why) => Some(why.clone()),
                    _ => None,
                },
            })
            .collect()
    }
}

/// `HH:MM:SS UTC` of `t`.
fn utc_time(t: SystemTime) -> String {
    let s = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// SWIM's timings for ferry's clusters: memberlist's LAN settings, with suspicion held long
/// enough for a daemon in the nested host's emulated CPUs to answer while it moves pages.
pub fn swim_config() -> foca::Config {
    let mut c = foca::Config::new_lan(NonZeroU32::new(8).expect("non-zero"));
    c.suspect_to_down_after = Duration::from_secs(6);
    c
}

/// What a daemon's membership starts from.
pub struct MembershipOptions {
    pub me: NodeConfig,
    /// The cluster file's nodes.
    pub file_nodes: Vec<NodeConfig>,
    /// Peer addresses (`host:port`) to announce this node to until they are members: the
    /// file's other nodes, and the address a joined node was given.
    pub seeds: Vec<String>,
    /// Where to listen (UDP).
    pub bind: SocketAddr,
    /// The cluster's bearer token, which the gossip key is derived from.
    pub token: String,
    pub swim: foca::Config,
}

/// Dropped datagrams: counted, logged at a low rate.
#[derive(Default)]
struct Dropped {
    count: AtomicU64,
    last_log: Mutex<Option<std::time::Instant>>,
}

impl Dropped {
    fn note(&self, what: impl FnOnce() -> String) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = lock(&self.last_log);
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(std::time::Instant::now());
            log(format!("gossip: dropped {} ({n} dropped so far)", what()));
        }
    }
}

enum Command {
    Leave(oneshot::Sender<()>),
}

/// A daemon's membership: the table the API reads, and the gossip task behind it.
pub struct Membership {
    table: Arc<Mutex<MemberTable>>,
    commands: mpsc::Sender<Command>,
    dropped: Arc<Dropped>,
}

impl Membership {
    /// Binds the UDP port and starts gossiping (on the current tokio runtime).
    pub async fn start(opts: MembershipOptions) -> Result<Membership, MembersError> {
        let me = MemberId::of(&opts.me, now_ms())?;
        let mut seeds = Vec::new();
        for s in &opts.seeds {
            match resolve(s, "a seed's peer address") {
                Ok(a) if a != me.peer => seeds.push(a),
                Ok(_) => {}
                Err(e) => log(format!("gossip: {e}; it is left out")),
            }
        }
        let socket = UdpSocket::bind(opts.bind)
            .await
            .map_err(|source| MembersError::Bind {
                addr: opts.bind,
                source,
            })?;
        let table = Arc::new(Mutex::new(MemberTable::new(&opts.file_nodes, &opts.me)));
        let dropped = Arc::new(Dropped::default());
        let (commands, rx) = mpsc::channel(4);
        let rng: StdRng = rand::make_rng();
        let driver = Driver {
            foca: Foca::new(me, opts.swim, rng, PostcardCodec),
            runtime: AccumulatingRuntime::new(),
            socket,
            sealer: Sealer::from_token(&opts.token),
            table: table.clone(),
            timers: BinaryHeap::new(),
            pending: HashMap::new(),
            next_timer: 0,
            seeds,
            dropped: dropped.clone(),
            leaving: false,
        };
        tokio::spawn(driver.run(rx));
        Ok(Membership {
            table,
            commands,
            dropped,
        })
    }

    /// Tells the cluster this node leaves, and stops gossiping.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }

    pub fn list(&self) -> Vec<(NodeConfig, Liveness)> {
        lock(&self.table).list()
    }

    pub fn node(&self, name: &str) -> Option<NodeConfig> {
        lock(&self.table).node(name)
    }

    pub fn api(&self) -> Vec<ApiMember> {
        lock(&self.table).api()
    }

    /// Datagrams dropped so far (bad tags, stale, malformed).
    pub fn dropped(&self) -> u64 {
        self.dropped.count.load(Ordering::Relaxed)
    }
}

type Swim = Foca<MemberId, PostcardCodec, StdRng, foca::NoCustomBroadcast>;

/// The gossip task: feeds foca the datagrams and timer events, sends what it asks to.
struct Driver {
    foca: Swim,
    runtime: AccumulatingRuntime<MemberId>,
    socket: UdpSocket,
    sealer: Sealer,
    table: Arc<Mutex<MemberTable>>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, Timer<MemberId>>,
    next_timer: u64,
    seeds: Vec<SocketAddr>,
    dropped: Arc<Dropped>,
    /// Set once this node leaves (foca then declares itself down, which is no news).
    leaving: bool,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut seed_tick = tokio::time::interval(SEED_INTERVAL);
        loop {
            let next = self.timers.peek().map(|Reverse((at, _))| *at);
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((len, from)) => {
                        let datagram = buf[..len].to_vec();
                        self.datagram(&datagram, from).await;
                    }
                    Err(e) => {
                        self.dropped.note(|| format!("a receive that failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = sleep => self.due_timers().await,
                _ = seed_tick.tick() => self.announce_to_seeds().await,
                c = commands.recv() => match c {
                    Some(Command::Leave(done)) => {
                        self.leave().await;
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
            }
        }
    }

    async fn datagram(&mut self, d: &[u8], from: SocketAddr) {
        let now = SystemTime::now();
        let (kind, payload) = match self.sealer.open(d, now_ms()) {
            Ok(x) => x,
            Err(e) => {
                self.dropped.note(|| format!("a datagram from {from}: {e}"));
                return;
            }
        };
        match kind {
            Kind::Swim => {
                if let Ok(h) = PostcardCodec.decode_header(&mut &payload[..]) {
                    let h: foca::Header<MemberId> = h;
                    lock(&self.table).heard(&h.src.name, now);
                }
                if let Err(e) = self.foca.handle_data(payload, &mut self.runtime) {
                    self.dropped
                        .note(|| format!("a gossip message from {from} that foca refused: {e}"));
                }
            }
            Kind::Leaving => match MemberId::decode(payload) {
                Some(id) => {
                    if lock(&self.table).left(&id, now) {
                        log(format!("gossip: {} left the cluster", id.name));
                    }
                }
                None => self
                    .dropped
                    .note(|| format!("a malformed leave notice from {from}")),
            },
        }
        self.drain().await;
    }

    async fn due_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(t) = self.pending.remove(&id) {
                if let Err(e) = self.foca.handle_timer(t, &mut self.runtime) {
                    log(format!("gossip: a timer event failed: {e}"));
                }
            }
        }
        self.drain().await;
    }

    async fn announce_to_seeds(&mut self) {
        let known: Vec<SocketAddr> = self.foca.iter_members().map(|m| m.id().peer).collect();
        for s in self.seeds.clone() {
            if !known.contains(&s) {
                if let Err(e) = self.foca.announce(MemberId::seed(s), &mut self.runtime) {
                    log(format!("gossip: announcing to {s} failed: {e}"));
                }
            }
        }
        self.drain().await;
    }

    async fn leave(&mut self) {
        self.leaving = true;
        let me = self.foca.identity().clone();
        let notice = self.sealer.seal(Kind::Leaving, &me.encode(), now_ms());
        let members: Vec<SocketAddr> = self.foca.iter_members().map(|m| m.id().peer).collect();
        for to in members {
            let _ = self.socket.send_to(&notice, to).await;
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            log(format!("gossip: leaving failed: {e}"));
        }
        self.drain().await;
        log("gossip: left the cluster");
    }

    /// Does what foca asked for: sends, timers, and the table's changes.
    async fn drain(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            let sealed = self.sealer.seal(Kind::Swim, &data, now_ms());
            if let Err(e) = self.socket.send_to(&sealed, to.peer).await {
                self.dropped
                    .note(|| format!("a datagram to {} that could not be sent: {e}", to.peer));
            }
        }
        let now = Instant::now();
        while let Some((after, t)) = self.runtime.to_schedule() {
            let id = self.next_timer;
            self.next_timer += 1;
            self.pending.insert(id, t);
            self.timers.push(Reverse((now + after, id)));
        }
        while let Some(n) = self.runtime.to_notify() {
            let mut table = lock(&self.table);
            match n {
                OwnedNotification::MemberUp(id) => {
                    if table.up(&id) {
                        log(format!(
                            "gossip: {} is up ({}, guest {})",
                            id.name, id.peer, id.address
                        ));
                    }
                }
                OwnedNotification::MemberDown(id) => {
                    if table.declared_down(&id) {
                        log(format!("gossip: {} was declared down", id.name));
                    }
                }
                OwnedNotification::Rename(_, id) => table.renamed(&id),
                OwnedNotification::Rejoin(id) => log(format!(
                    "gossip: the others had declared this node down; it rejoined as generation {}",
                    id.generation
                )),
                OwnedNotification::Active => log("gossip: joined the cluster"),
                OwnedNotification::Idle => log("gossip: no other member answers"),
                OwnedNotification::Defunct if self.leaving => {}
                OwnedNotification::Defunct => log("gossip: this node was declared down"),
            }
        }
    }
}

/// A node that joined with `ferry join`: what its daemon is started with, kept in its
/// directory of the cluster state (`nodes/NAME/joined.json`) until `ferry down`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRecord {
    pub name: String,
    pub host: String,
    pub address: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub api_port: u16,
    pub peer_port: u16,
    #[serde(default)]
    pub packages: Vec<String>,
    /// The member's peer address it joined through (`host:port`).
    pub via: String,
    /// When it joined (ms since the epoch): joined nodes are listed in that order.
    pub joined_ms: u64,
}

impl JoinRecord {
    pub fn new(n: &NodeConfig, via: &str) -> JoinRecord {
        JoinRecord {
            name: n.name.clone(),
            host: n.host.clone(),
            address: n.address.to_string(),
            vcpus: n.vcpus,
            memory_mib: n.memory >> 20,
            api_port: n.api_port,
            peer_port: n.peer_port,
            packages: n.packages.clone(),
            via: via.to_string(),
            joined_ms: now_ms(),
        }
    }

    pub fn node(&self) -> Option<NodeConfig> {
        Some(NodeConfig {
            name: self.name.clone(),
            host: self.host.clone(),
            address: self.address.parse().ok()?,
            vcpus: self.vcpus,
            memory: self.memory_mib << 20,
            image: super::config::IMAGES[0].to_string(),
            packages: self.packages.clone(),
            api_port: self.api_port,
            peer_port: self.peer_port,
        })
    }

    fn path(dir: &ClusterDir, name: &str) -> PathBuf {
        dir.node_dir(name).join(RECORD_FILE)
    }

    /// Writes the record (making the node's directory).
    pub fn save(&self, dir: &ClusterDir) -> Result<(), MembersError> {
        let path = Self::path(dir, &self.name);
        let node_dir = dir.node_dir(&self.name);
        std::fs::create_dir_all(&node_dir).map_err(|source| MembersError::Record {
            what: "creating",
            path: node_dir,
            source,
        })?;
        let text = serde_json::to_vec_pretty(self).expect("a record serializes");
        super::state::write_atomic(&path, &text, 0o644).map_err(|e| MembersError::Record {
            what: "writing",
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Node `name`'s record, if it joined.
    pub fn load(dir: &ClusterDir, name: &str) -> Result<Option<JoinRecord>, MembersError> {
        read_record(&Self::path(dir, name))
    }

    /// Every joined node's record, in the order they joined.
    pub fn all(dir: &ClusterDir) -> Result<Vec<JoinRecord>, MembersError> {
        let nodes = dir.root().join("nodes");
        let Ok(entries) = std::fs::read_dir(&nodes) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            if let Some(r) = read_record(&e.path().join(RECORD_FILE))? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| (a.joined_ms, &a.name).cmp(&(b.joined_ms, &b.name)));
        Ok(out)
    }

    /// Forgets node `name`'s record (its disk stays).
    pub fn forget(dir: &ClusterDir, name: &str) {
        let _ = std::fs::remove_file(Self::path(dir, name));
    }
}

fn read_record(path: &Path) -> Result<Option<JoinRecord>, MembersError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MembersError::Record {
                what: "reading",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let r: JoinRecord = serde_json::from_slice(&bytes).map_err(|e| MembersError::BadRecord {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if r.node().is_none() {
        return Err(MembersError::BadRecord {
            path: path.to_path_buf(),
            why: format!("`{}` is not ADDRESS/PREFIX", r.address),
        });
    }
    Ok(Some(r))
}

/// The nodes that joined the cluster in `dir` and are not in its file, as node settings.
pub fn joined_nodes(
    dir: &ClusterDir,
    cfg: &ClusterConfig,
) -> Result<Vec<NodeConfig>, MembersError> {
    Ok(JoinRecord::all(dir)?
        .iter()
        .filter(|r| cfg.node(&r.name).is_none())
        .filter_map(JoinRecord::node)
        .collect())
}

/// Node `name` of the file, or a node that joined.
pub fn node_or_joined(
    dir: &ClusterDir,
    cfg: &ClusterConfig,
    name: &str,
) -> Result<Option<(NodeConfig, Option<String>)>, MembersError> {
    if let Some(n) = cfg.node(name) {
        return Ok(Some((n.clone(), None)));
    }
    Ok(JoinRecord::load(dir, name)?.and_then(|r| r.node().map(|n| (n, Some(r.via.clone())))))
}

impl Node {
    /// Member `name`'s settings: a node of the file, or one that joined.
    pub(super) fn member(&self, name: &str) -> Option<NodeConfig> {
        self.members.node(name)
    }

    /// What gossip says of member `name`.
    pub(super) fn liveness(&self, name: &str) -> Liveness {
        self.members
            .list()
            .into_iter()
            .find(|(n, _)| n.name == name)
            .map_or(Liveness::Unknown, |(_, l)| l)
    }

    /// Why `name` is no member, with the members' names.
    pub(super) fn no_member(&self, name: &str) -> String {
        let names: Vec<String> = self
            .members
            .list()
            .into_iter()
            .map(|(n, _)| n.name)
            .collect();
        format!(
            "no node `{name}` in cluster {}; its nodes are {}",
            self.cluster.name,
            names.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, last: u8, port: u16) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            host: "127.0.0.1".into(),
            address: format!("10.77.1.{last}/24").parse().unwrap(),
            vcpus: 2,
            memory: 512 << 20,
            image: "bookworm".into(),
            packages: vec![],
            api_port: port - 100,
            peer_port: port,
        }
    }

    #[test]
    fn datagrams_open_only_with_the_clusters_key_and_intact() {
        let s = Sealer::from_token("a".repeat(64).as_str());
        let now = 1_700_000_000_000;
        let d = s.seal(Kind::Swim, b"hello", now);
        assert_eq!(s.open(&d, now + 5), Ok((Kind::Swim, &b"hello"[..])));
        // Another cluster's token.
        let other = Sealer::from_token("b".repeat(64).as_str());
        assert_eq!(other.open(&d, now), Err(DatagramError::Tag));
        // Any flipped bit, in the payload, the kind or the tag.
        for i in [4, 6, HEAD_LEN + 1, d.len() - 1] {
            let mut bad = d.clone();
            bad[i] ^= 1;
            assert_eq!(s.open(&bad, now), Err(DatagramError::Tag), "byte {i}");
        }
        // Truncated, foreign, replayed much later.
        assert_eq!(s.open(&d[..20], now), Err(DatagramError::Short(20)));
        let mut foreign = d.clone();
        foreign[0] = b'X';
        assert_eq!(s.open(&foreign, now), Err(DatagramError::Magic));
        assert_eq!(
            s.open(&d, now + 10 * 60_000),
            Err(DatagramError::Stale { age_s: 600 })
        );
        // A kind nobody sends, tagged right.
        let mut odd = d[..d.len() - TAG_LEN].to_vec();
        odd[4] = 9;
        let tag = hmac::sign(&s.key, &odd);
        odd.extend_from_slice(tag.as_ref());
        assert_eq!(s.open(&odd, now), Err(DatagramError::Kind(9)));
    }

    #[test]
    fn identities_round_trip_and_name_their_node() {
        let n = node("node-4", 14, 7573);
        let id = MemberId::of(&n, 42).unwrap();
        assert_eq!(id.peer, "127.0.0.1:7573".parse().unwrap());
        let back = MemberId::decode(&id.encode()).unwrap();
        assert_eq!(back, id);
        let again = back.node().unwrap();
        assert_eq!(again.name, "node-4");
        assert_eq!(again.address.to_string(), "10.77.1.14/24");
        assert_eq!((again.api_port, again.peer_port), (7473, 7573));
        assert_eq!((again.vcpus, again.memory), (2, 512 << 20));
        // Garbage is no identity.
        assert_eq!(MemberId::decode(b"\xff\xff\xff"), None);
        assert_eq!(MemberId::decode(&id.encode()[..5]), None);
        // A later generation wins over an earlier one of the same address.
        use foca::Identity;
        let renewed = id.renew().unwrap();
        assert!(renewed.win_addr_conflict(&id) && !id.win_addr_conflict(&renewed));
        assert_eq!(renewed.addr(), id.addr());
    }

    #[test]
    fn the_table_follows_members_up_down_left_and_back() {
        let file = [node("node-1", 11, 7570), node("node-2", 12, 7571)];
        let mut t = MemberTable::new(&file, &file[0]);
        let states = |t: &MemberTable| -> Vec<(String, Liveness)> {
            t.list().into_iter().map(|(n, l)| (n.name, l)).collect()
        };
        assert_eq!(
            states(&t),
            vec![
                ("node-1".into(), Liveness::Alive),
                ("node-2".into(), Liveness::Unknown)
            ]
        );
        // node-4 joins: listed after the file's nodes, with its settings.
        let four = MemberId::of(&node("node-4", 14, 7573), 100).unwrap();
        assert!(t.up(&four));
        assert!(!t.up(&four), "no news the second time");
        assert_eq!(t.node("node-4").unwrap().peer_port, 7573);
        assert_eq!(states(&t)[2], ("node-4".into(), Liveness::Alive));
        // Declared down: with the time it was last heard.
        t.heard("node-4", UNIX_EPOCH + Duration::from_secs(3600 + 62));
        assert!(t.declared_down(&four));
        assert_eq!(
            states(&t)[2].1,
            Liveness::Down("declared down by gossip: no answer since 01:01:02 UTC".into())
        );
        // It comes back with a later generation; an old identity's down is ignored then.
        let back = MemberId::of(&node("node-4", 14, 7573), 200).unwrap();
        assert!(t.up(&back));
        assert!(!t.declared_down(&four));
        assert!(!t.left(&four, SystemTime::now()));
        assert_eq!(states(&t)[2].1, Liveness::Alive);
        // It leaves: left, and a later SWIM verdict keeps that reason.
        assert!(t.left(&back, UNIX_EPOCH + Duration::from_secs(7200)));
        assert!(!t.declared_down(&back));
        assert_eq!(
            states(&t)[2].1,
            Liveness::Down("left the cluster at 02:00:00 UTC".into())
        );
        // The API's view.
        let api = t.api();
        assert_eq!(api.len(), 3);
        assert!(api[0].in_file && !api[2].in_file);
        assert_eq!(api[1].state, MemberState::Unknown);
        assert_eq!(api[2].state, MemberState::Down);
        // This node's own entry is not moved by what others say.
        let me = MemberId::of(&file[0], 1).unwrap();
        assert!(!t.left(&me, SystemTime::now()));
        assert_eq!(states(&t)[0].1, Liveness::Alive);
    }

    #[test]
    fn join_records_round_trip_in_join_order() {
        let tmp = std::env::temp_dir().join(format!("ferry-members-{}", std::process::id()));
        let dir = ClusterDir::at(tmp.join("c1"));
        let mut a = JoinRecord::new(&node("node-5", 15, 7574), "127.0.0.1:7571");
        a.joined_ms = 2;
        let mut b = JoinRecord::new(&node("node-4", 14, 7573), "127.0.0.1:7571");
        b.joined_ms = 1;
        a.save(&dir).unwrap();
        b.save(&dir).unwrap();
        let all = JoinRecord::all(&dir).unwrap();
        assert_eq!(all, vec![b.clone(), a.clone()]);
        assert_eq!(JoinRecord::load(&dir, "node-4").unwrap(), Some(b));
        JoinRecord::forget(&dir, "node-4");
        assert_eq!(JoinRecord::load(&dir, "node-4").unwrap(), None);
        std::fs::write(dir.node_dir("node-6").join(RECORD_FILE), b"{").unwrap_or_else(|_| {
            std::fs::create_dir_all(dir.node_dir("node-6")).unwrap();
            std::fs::write(dir.node_dir("node-6").join(RECORD_FILE), b"{").unwrap();
        });
        let err = JoinRecord::all(&dir).unwrap_err().to_string();
        assert!(
            err.contains("node-6") && err.contains("not a joined node's record"),
            "{err}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    /// Three real members on loopback UDP with short SWIM timings.
    fn fast() -> foca::Config {
        let mut c = swim_config();
        c.probe_period = Duration::from_millis(200);
        c.probe_rtt = Duration::from_millis(100);
        c.suspect_to_down_after = Duration::from_millis(600);
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(50),
            num_members: std::num::NonZeroUsize::new(3).unwrap(),
        });
        c
    }

    async fn wait_for(m: &Membership, name: &str, want: impl Fn(&Liveness) -> bool) -> Liveness {
        for _ in 0..200 {
            if let Some((_, l)) = m.list().into_iter().find(|(n, _)| n.name == name) {
                if want(&l) {
                    return l;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{name} never reached the state wanted: {:?}", m.list());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_join_through_one_address_and_are_seen_leaving_and_dying() {
        // Free UDP ports on loopback.
        let ports: Vec<u16> = (0..4)
            .map(|_| {
                std::net::UdpSocket::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let file: Vec<NodeConfig> = (0..2)
            .map(|i| node(&format!("node-{}", i + 1), 11 + i as u8, ports[i]))
            .collect();
        let token = "t".repeat(64);
        let start = |me: &NodeConfig, seeds: Vec<String>, token: &str| {
            Membership::start(MembershipOptions {
                me: me.clone(),
                file_nodes: file.clone(),
                seeds,
                bind: SocketAddr::new("127.0.0.1".parse().unwrap(), me.peer_port),
                token: token.to_string(),
                swim: fast(),
            })
        };
        let peer = |n: &NodeConfig| format!("127.0.0.1:{}", n.peer_port);
        let one = start(&file[0], vec![peer(&file[1])], &token).await.unwrap();
        let two = start(&file[1], vec![peer(&file[0])], &token).await.unwrap();
        wait_for(&one, "node-2", |l| *l == Liveness::Alive).await;

        // node-3 is in no file and knows only node-2's address.
        let three_cfg = node("node-3", 13, ports[2]);
        let three = start(&three_cfg, vec![peer(&file[1])], &token)
            .await
            .unwrap();
        wait_for(&one, "node-3", |l| *l == Liveness::Alive).await;
        wait_for(&three, "node-1", |l| *l == Liveness::Alive).await;
        assert_eq!(one.node("node-3").unwrap().peer_port, ports[2]);

        // A node with another cluster's token is kept out, and its datagrams counted.
        let intruder_cfg = node("node-9", 19, ports[3]);
        let intruder = start(&intruder_cfg, vec![peer(&file[0])], &"x".repeat(64))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(one.node("node-9").is_none());
        assert!(one.dropped() > 0);
        drop(intruder);

        // node-3 leaves: the others say so.
        three.leave().await;
        let l = wait_for(&one, "node-3", |l| matches!(l, Liveness::Down(_))).await;
        assert!(
            matches!(&l, Liveness::Down(w) if w.starts_with("left the cluster at ")),
            "{l:?}"
        );

        // node-2 dies without a word (its task ends as if the process were killed): SWIM
        // declares it down.
        drop(two);
        let l = wait_for(&one, "node-2", |l| matches!(l, Liveness::Down(_))).await;
        assert!(
            matches!(&l, Liveness::Down(w) if w.starts_with("declared down by gossip: no answer since ")),
            "{l:?}"
        );
    }
}
