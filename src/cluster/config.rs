//! The cluster file that `ferry up [FILE]` reads: the cluster's name and subnet, defaults for
//! every node, where the node daemons listen, and one `[[node]]` table per node. The schema is
//! documented in `configs/README.md`; `configs/local.toml` and `configs/hosts.toml` are examples.
//!
//! Every mistake is reported with the file, line and column of the offending key or value, what
//! is wrong and what to write instead.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ferry_net::Ipv4Cidr;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use super::balancer::{self, Policy, PolicyUpdate};

/// The guest images a node can boot: Debian releases of the root disk.
pub const IMAGES: &[&str] = &["bookworm"];

const DEFAULT_VCPUS: u8 = 2;
const MAX_VCPUS: i64 = 32;
const DEFAULT_MEMORY: u64 = 512 << 20;
const MIN_MEMORY: u64 = 256 << 20;
const MAX_MEMORY: u64 = 64 << 30;
const DEFAULT_IMAGE: &str = "bookworm";
const DEFAULT_LISTEN: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_API_PORT: u16 = 7470;
const DEFAULT_PEER_PORT: u16 = 7570;
/// A node without `address` gets the subnet's network address + this + its index.
const FIRST_NODE_HOST: u32 = 11;

/// A cluster file, checked: every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterConfig {
    /// Absolute path of the file.
    pub source: PathBuf,
    /// The cluster's name (`[a-z][a-z0-9-]*`, at most 12 characters).
    pub name: String,
    /// The guests' network: `addr` is the network address; the host's bridge takes the first
    /// address after it.
    #[serde(serialize_with = "display")]
    pub subnet: Ipv4Cidr,
    /// The IP address the node daemons listen on.
    pub listen: IpAddr,
    /// The certificate directory (absolute), or `None`: the cluster's state directory decides.
    pub tls_dir: Option<PathBuf>,
    /// The nodes, in file order.
    pub nodes: Vec<NodeConfig>,
    /// The automatic load balancer's policy (`[balancer]`).
    pub balancer: Policy,
}

/// One node of a cluster file, with the defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeConfig {
    pub name: String,
    /// The machine that runs this node's VMM and daemon (an IP address or a host name, as
    /// written in the file).
    pub host: String,
    /// The guest's address, with the subnet's prefix.
    #[serde(serialize_with = "display")]
    pub address: Ipv4Cidr,
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The Debian release of the root disk.
    pub image: String,
    /// Extra Debian packages on the root disk: the defaults' then the node's, without
    /// duplicates, in that order.
    pub packages: Vec<String>,
    /// The port of the node daemon's HTTPS API.
    pub api_port: u16,
    /// The port for node-to-node mutual TLS.
    pub peer_port: u16,
}

impl ClusterConfig {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Why a cluster file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the cluster file {}{}", path.display(), read_hint(source))]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// 1-based, in characters.
        column: usize,
        message: String,
    },
}

/// What to do about a cluster file that cannot be read.
fn read_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::NotFound {
        " (give the path of a cluster file; examples are in the source tree's configs/)"
    } else {
        ""
    }
}

/// Reads and checks the cluster file at `path`.
pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Checks the text of a cluster file; `source` is where it comes from (error messages name it;
/// a relative `[tls] dir` is taken relative to its directory).
pub fn parse(text: &str, source: &Path) -> Result<ClusterConfig, ConfigError> {
    let src = Source { text, path: source };
    let raw: RawFile = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
    let absolute = std::path::absolute(source).map_err(|e| ConfigError::Read {
        path: source.to_path_buf(),
        source: e,
    })?;
    Checker { src: &src }.file(raw, absolute)
}

fn display<T: fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

// ---------------------------------------------------------------------------------------------
// The file as written. Required keys are `Option`s too, so that a missing one gets a message of
// ours pointing at its table; numbers are `i64` so that out-of-range values get one too.

const TOP_KEYS: &[&str] = &["cluster", "defaults", "api", "tls", "balancer", "node"];
const CLUSTER_KEYS: &[&str] = &["name", "subnet"];
const DEFAULTS_KEYS: &[&str] = &["vcpus", "memory", "image", "packages"];
const API_KEYS: &[&str] = &["listen", "port", "peer_port"];
const TLS_KEYS: &[&str] = &["dir"];
const BALANCER_KEYS: &[&str] = &[
    "enabled",
    "interval_ms",
    "min_cpu_share",
    "residence_s",
    "memory_low_percent",
    "commands",
];
const NODE_KEYS: &[&str] = &[
    "name",
    "address",
    "host",
    "vcpus",
    "memory",
    "image",
    "packages",
    "api_port",
    "peer_port",
];
/// Each table's name as written in the file, and its keys.
const TABLES: &[(&str, &[&str])] = &[
    ("the top level", TOP_KEYS),
    ("[cluster]", CLUSTER_KEYS),
    ("[defaults]", DEFAULTS_KEYS),
    ("[api]", API_KEYS),
    ("[tls]", TLS_KEYS),
    ("[balancer]", BALANCER_KEYS),
    ("[[node]]", NODE_KEYS),
];

type S<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: S<RawCluster>,
    defaults: Option<RawDefaults>,
    api: Option<RawApi>,
    tls: Option<RawTls>,
    balancer: Option<RawBalancer>,
    node: S<Vec<Spanned<RawNode>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: S<String>,
    subnet: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    vcpus: S<i64>,
    memory: S<RawSize>,
    image: S<String>,
    packages: S<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: S<String>,
    port: S<i64>,
    peer_port: S<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    dir: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalancer {
    enabled: S<bool>,
    interval_ms: S<i64>,
    min_cpu_share: S<i64>,
    residence_s: S<i64>,
    memory_low_percent: S<i64>,
    commands: S<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: S<String>,
    address: S<String>,
    host: S<String>,
    vcpus: S<i64>,
    memory: S<RawSize>,
    image: S<String>,
    packages: S<Vec<Spanned<String>>>,
    api_port: S<i64>,
    peer_port: S<i64>,
}

/// `memory = "512M"` or `memory = 512` (MiB).
enum RawSize {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"512M\" or \"2G\", or a number of MiB")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Locating errors.

struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    /// 1-based line and column (in characters) of byte `offset`.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
        )
    }

    fn line(&self, offset: usize) -> usize {
        self.line_col(offset).0
    }

    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.line_col(span.start);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Where one would add what is missing from the file: just after its last non-blank
    /// character.
    fn end(&self) -> Range<usize> {
        let end = self.text.trim_end().len();
        end..end
    }

    /// The key that the value at `offset` belongs to: the last `key =` before it, on its line
    /// or (inside a multi-line array) the lines before.
    fn key_before(&self, offset: usize) -> Option<&str> {
        let mut end = offset.min(self.text.len());
        loop {
            let start = self.text[..end].rfind('\n').map_or(0, |i| i + 1);
            let line = &self.text[start..end];
            // The last `=` outside quotes, and the key just before it.
            let mut quote = None;
            let mut eq = None;
            for (i, c) in line.char_indices() {
                match (quote, c) {
                    (None, '"' | '\'') => quote = Some(c),
                    (Some(q), c) if c == q => quote = None,
                    (None, '#') => break,
                    (None, '=') => eq = Some(i),
                    _ => {}
                }
            }
            if let Some(eq) = eq {
                let before = line[..eq].trim_end();
                let from = before
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                    .map_or(0, |i| i + 1);
                let key = &before[from..];
                return (!key.is_empty()).then_some(key);
            }
            if start == 0 || line.trim_start().starts_with('[') {
                return None;
            }
            end = start - 1;
        }
    }

    /// A TOML syntax or type error, in our words where we have better ones.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        let raw = e.message().trim();
        let message = if let Some(m) = unknown_key_message(raw) {
            m
        } else if ["invalid type", "invalid value", "number"]
            .iter()
            .any(|p| raw.starts_with(p))
        {
            let m = plain_type_words(raw);
            match self.key_before(span.start) {
                Some(key) => format!("`{key}`: {m}"),
                None => m,
            }
        } else {
            let m = raw
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            if m.contains("duplicate key") {
                format!("{m}; keep only one")
            } else {
                format!("TOML syntax: {m}")
            }
        };
        self.err(span, message)
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" as: which table, the valid keys, and a
/// likely meant one.
fn unknown_key_message(raw: &str) -> Option<String> {
    let rest = raw.strip_prefix("unknown field `")?;
    let (key, expected) = rest.split_once('`')?;
    let listed: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let (table, keys) = TABLES
        .iter()
        .find(|(_, keys)| keys.len() == listed.len() && keys.iter().all(|k| listed.contains(k)))?;
    let is_top = keys == &TOP_KEYS;
    let show = |k: &str| -> String {
        if !is_top {
            format!("`{k}`")
        } else if k == "node" {
            "[[node]]".to_string()
        } else {
            format!("[{k}]")
        }
    };
    let mut m = if is_top {
        format!("unknown table or key `{key}` at the top level of the file")
    } else {
        format!("unknown key `{key}` in {table}")
    };
    if let Some(near) = keys
        .iter()
        .filter(|k| edit_distance(key, k) <= 2.max(key.len() / 3))
        .min_by_key(|k| edit_distance(key, k))
    {
        m += &format!(" (did you mean {}?)", show(near));
    }
    let elsewhere: Vec<&str> = TABLES
        .iter()
        .filter(|(t, keys)| t != table && keys.contains(&key))
        .map(|(t, _)| *t)
        .collect();
    if !elsewhere.is_empty() {
        let places: Vec<&str> = elsewhere
            .iter()
            .map(|t| match *t {
                "the top level" => "at the top level of the file (before any table)",
                t => t,
            })
            .collect();
        m += &format!("; `{key}` belongs in {}", places.join(" or "));
        m = m.replace("belongs in at", "belongs at");
    }
    let valid: Vec<String> = keys.iter().map(|k| show(k)).collect();
    if is_top {
        m += &format!("; the file's tables are {}", valid.join(", "));
    } else {
        m += &format!("; the keys of {table} are {}", valid.join(", "));
    }
    Some(m)
}

/// serde's type names in TOML's words.
fn plain_type_words(raw: &str) -> String {
    let mut m = raw.to_string();
    for (from, to) in [
        ("expected i64", "expected an integer"),
        ("expected u64", "expected an integer"),
        ("expected a sequence", "expected an array"),
        ("sequence", "array"),
        ("invalid type: map", "invalid type: table"),
        (
            "number too large to fit in target type",
            "the number is too large (configs/README.md gives each key's range)",
        ),
    ] {
        m = m.replace(from, to);
    }
    // "expected struct RawNode" and the like.
    if let Some(i) = m.find("expected struct ") {
        m.truncate(i);
        m += "expected a table";
    }
    m
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Checking values.

struct Checker<'a> {
    src: &'a Source<'a>,
}

/// What every node starts from.
struct Defaults {
    vcpus: u8,
    memory: u64,
    image: String,
    packages: Vec<String>,
}

/// A port taken on a host: by which node, as which kind, set on which line (the node's name's
/// line when the `[api]` rule gave it).
struct PortUse<'a> {
    node: &'a str,
    kind: &'static str,
    line: usize,
}

impl Checker<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        self.src.err(span, message)
    }

    fn file(&self, raw: RawFile, source: PathBuf) -> Result<ClusterConfig, ConfigError> {
        let Some(cluster) = raw.cluster else {
            return Err(self.err(
                0..0,
                "the [cluster] table is missing; start the file with a [cluster] table \
                 giving the cluster's name and subnet, e.g. name = \"local\" and subnet = \
                 \"10.77.0.0/24\"",
            ));
        };
        let cluster_span = cluster.span();
        let cluster = cluster.into_inner();
        let name = self.cluster_name(&cluster, cluster_span.clone())?;
        let subnet = self.subnet(&cluster, cluster_span)?;

        let defaults = match &raw.defaults {
            Some(d) => Defaults {
                vcpus: self.vcpus(&d.vcpus, DEFAULT_VCPUS)?,
                memory: self.memory(&d.memory, DEFAULT_MEMORY)?,
                image: self.image(&d.image, DEFAULT_IMAGE)?,
                packages: self.packages(&d.packages, Vec::new())?,
            },
            None => Defaults {
                vcpus: DEFAULT_VCPUS,
                memory: DEFAULT_MEMORY,
                image: DEFAULT_IMAGE.to_string(),
                packages: Vec::new(),
            },
        };

        let api = raw.api.as_ref();
        let listen = match api.and_then(|a| a.listen.as_ref()) {
            None => DEFAULT_LISTEN,
            Some(l) => l.get_ref().trim().parse().map_err(|_| {
                self.err(
                    l.span(),
                    format!(
                        "listen = {:?} is not an IP address; write e.g. \"127.0.0.1\" (this \
                         machine only) or \"0.0.0.0\" (every interface)",
                        l.get_ref()
                    ),
                )
            })?,
        };
        let api_base = self.port(api.and_then(|a| a.port.as_ref()), "port", DEFAULT_API_PORT)?;
        let peer_base = self.port(
            api.and_then(|a| a.peer_port.as_ref()),
            "peer_port",
            DEFAULT_PEER_PORT,
        )?;

        let tls_dir = match raw.tls.as_ref().and_then(|t| t.dir.as_ref()) {
            None => None,
            Some(d) if d.get_ref().trim().is_empty() => {
                return Err(self.err(
                    d.span(),
                    "dir is empty; name a directory (relative to this file's directory, or \
                     absolute), or leave `dir` out to keep the certificates in the cluster's \
                     state directory",
                ))
            }
            Some(d) => {
                let base = source.parent().unwrap_or(Path::new("/"));
                let dir = base.join(d.get_ref());
                Some(std::path::absolute(&dir).unwrap_or(dir))
            }
        };

        let balancer = match &raw.balancer {
            Some(b) => self.balancer(b)?,
            None => Policy::default(),
        };

        let raw_nodes = match raw.node {
            None => {
                return Err(self.err(
                    self.src.end(),
                    "the file has no nodes; add a [[node]] table for each node, with at \
                     least its name (e.g. name = \"node-1\")",
                ))
            }
            Some(n) if n.get_ref().is_empty() => {
                return Err(self.err(
                    n.span(),
                    "the file has no nodes; add at least one [[node]] table with a name",
                ))
            }
            Some(n) => n.into_inner(),
        };

        let ports = PortRule {
            api_base,
            api_span: api
                .and_then(|a| a.port.as_ref())
                .map(|p| p.span())
                .unwrap_or(0..0),
            peer_base,
            peer_span: api
                .and_then(|a| a.peer_port.as_ref())
                .map(|p| p.span())
                .unwrap_or(0..0),
        };
        let mut nodes = Vec::with_capacity(raw_nodes.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut addresses: HashMap<Ipv4Addr, (String, usize)> = HashMap::new();
        for (i, raw) in raw_nodes.iter().enumerate() {
            let node = self.node(
                i,
                raw,
                &subnet,
                &defaults,
                &ports,
                &mut names,
                &mut addresses,
            )?;
            nodes.push(node);
        }
        self.port_clashes(&raw_nodes, &nodes)?;

        Ok(ClusterConfig {
            source,
            name,
            subnet,
            listen,
            tls_dir,
            nodes,
            balancer,
        })
    }

    fn cluster_name(&self, c: &RawCluster, table: Range<usize>) -> Result<String, ConfigError> {
        let Some(name) = &c.name else {
            return Err(self.err(
                table,
                "[cluster] has no `name`; add e.g. name = \"local\" (a letter, then lowercase \
                 letters, digits or dashes, at most 12 characters)",
            ));
        };
        let n = name.get_ref();
        let ok = (1..=12).contains(&n.len())
            && n.starts_with(|c: char| c.is_ascii_lowercase())
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(self.err(
                name.span(),
                format!(
                    "cluster name {n:?} is not usable (it names a host bridge and directories); \
                     use 1 to 12 lowercase letters, digits or dashes starting with a letter, \
                     e.g. \"local\""
                ),
            ));
        }
        Ok(n.clone())
    }

    fn subnet(&self, c: &RawCluster, table: Range<usize>) -> Result<Ipv4Cidr, ConfigError> {
        let Some(subnet) = &c.subnet else {
            return Err(self.err(
                table,
                "[cluster] has no `subnet`; add the guests' network, e.g. subnet = \
                 \"10.77.0.0/24\"",
            ));
        };
        let s = subnet.get_ref().trim();
        let bad = |why: String| self.err(subnet.span(), why);
        let Some((addr, prefix)) = s.split_once('/') else {
            return Err(bad(format!(
                "subnet {s:?} has no prefix length; write NETWORK/PREFIX, e.g. \"10.77.0.0/24\""
            )));
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            bad(format!(
                "subnet {s:?} is not an IPv4 network; write NETWORK/PREFIX, e.g. \"10.77.0.0/24\""
            ))
        })?;
        let prefix: u8 = prefix.parse().map_err(|_| {
            bad(format!(
                "subnet {s:?} has a bad prefix length; write NETWORK/PREFIX with a prefix from \
                 16 to 29, e.g. \"10.77.0.0/24\""
            ))
        })?;
        if !(16..=29).contains(&prefix) {
            return Err(bad(format!(
                "subnet {s:?}: a /{prefix} network is not supported; use a prefix from /16 \
                 (65534 addresses) to /29 (6 addresses), e.g. \"{}/24\"",
                addr
            )));
        }
        let cidr = Ipv4Cidr { addr, prefix };
        if cidr.network() != addr {
            return Err(bad(format!(
                "subnet {s:?} is not a network address (it has host bits set); write \"{}/{}\"",
                cidr.network(),
                prefix
            )));
        }
        Ok(cidr)
    }

    fn vcpus(&self, v: &S<i64>, default: u8) -> Result<u8, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match u8::try_from(*v.get_ref()) {
            Ok(n) if (1..=MAX_VCPUS).contains(&i64::from(n)) => Ok(n),
            _ => Err(self.err(
                v.span(),
                format!(
                    "vcpus = {} is out of range; use 1 to {MAX_VCPUS}",
                    v.get_ref()
                ),
            )),
        }
    }

    fn memory(&self, v: &S<RawSize>, default: u64) -> Result<u64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let (bytes, shown) = match v.get_ref() {
            RawSize::Number(n) => {
                let bytes = u64::try_from(*n).ok().and_then(|n| n.checked_mul(1 << 20));
                (bytes, n.to_string())
            }
            RawSize::Text(t) => match parse_size(t) {
                Ok(b) => (b, format!("{t:?}")),
                Err(why) => return Err(self.err(v.span(), why)),
            },
        };
        match bytes {
            Some(b) if (MIN_MEMORY..=MAX_MEMORY).contains(&b) && b % (1 << 20) == 0 => Ok(b),
            Some(b) if (MIN_MEMORY..=MAX_MEMORY).contains(&b) => Err(self.err(
                v.span(),
                format!(
                    "memory = {shown} is not a whole number of MiB; round it, e.g. \"{}M\"",
                    b >> 20
                ),
            )),
            _ => Err(self.err(
                v.span(),
                format!("memory = {shown} is out of range; use \"256M\" to \"64G\""),
            )),
        }
    }

    fn image(&self, v: &S<String>, default: &str) -> Result<String, ConfigError> {
        let Some(v) = v else {
            return Ok(default.to_string());
        };
        if IMAGES.contains(&v.get_ref().as_str()) {
            Ok(v.get_ref().clone())
        } else {
            Err(self.err(
                v.span(),
                format!(
                    "unknown image {:?}; the only image for now is \"bookworm\" (Debian 12)",
                    v.get_ref()
                ),
            ))
        }
    }

    /// `base` followed by the packages of `v`, checked, without duplicates.
    fn packages(
        &self,
        v: &S<Vec<Spanned<String>>>,
        mut base: Vec<String>,
    ) -> Result<Vec<String>, ConfigError> {
        for p in v.iter().flat_map(|v| v.get_ref()) {
            if !valid_package_name(p.get_ref()) {
                return Err(self.err(
                    p.span(),
                    format!(
                        "{:?} is not a Debian package name; write the package's name only, \
                         e.g. \"htop\": at least 2 characters, lowercase letters, digits, `+`, \
                         `-` and `.`, starting with a letter or digit (no versions, no spaces)",
                        p.get_ref()
                    ),
                ));
            }
            if !base.contains(p.get_ref()) {
                base.push(p.get_ref().clone());
            }
        }
        Ok(base)
    }

    /// The `[balancer]` table over the defaults.
    fn balancer(&self, b: &RawBalancer) -> Result<Policy, ConfigError> {
        let mut update = PolicyUpdate {
            enabled: b.enabled.as_ref().map(|v| *v.get_ref()),
            ..PolicyUpdate::default()
        };
        let number = |v: &S<i64>, key: &str| -> Result<Option<u64>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let n = u64::try_from(*v.get_ref()).unwrap_or(u64::MAX);
            balancer::check_limit(key, n)
                .map_err(|_| {
                    let (_, lo, hi) = balancer::LIMITS
                        .iter()
                        .find(|(k, _, _)| *k == key)
                        .expect("every number of [balancer] has limits");
                    self.err(
                        v.span(),
                        format!("{key} = {} is out of range; use {lo} to {hi}", v.get_ref()),
                    )
                })
                .map(|_| Some(n))
        };
        update.interval_ms = number(&b.interval_ms, "interval_ms")?;
        update.min_cpu_share = number(&b.min_cpu_share, "min_cpu_share")?;
        update.residence_s = number(&b.residence_s, "residence_s")?;
        update.memory_low_percent = number(&b.memory_low_percent, "memory_low_percent")?;
        if let Some(c) = &b.commands {
            for name in c.get_ref() {
                let one = PolicyUpdate {
                    commands: Some(vec![name.get_ref().clone()]),
                    ..PolicyUpdate::default()
                };
                if let Err(why) = one.apply(&Policy::default()) {
                    return Err(self.err(name.span(), why));
                }
            }
            update.commands = Some(c.get_ref().iter().map(|n| n.get_ref().clone()).collect());
        }
        Ok(update
            .apply(&Policy::default())
            .expect("every value was checked above"))
    }

    fn port(&self, v: Option<&Spanned<i64>>, key: &str, default: u16) -> Result<u16, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match u16::try_from(*v.get_ref()) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(self.err(
                v.span(),
                format!("{key} = {} is not a port; use 1 to 65535", v.get_ref()),
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn node(
        &self,
        i: usize,
        raw: &Spanned<RawNode>,
        subnet: &Ipv4Cidr,
        defaults: &Defaults,
        ports: &PortRule,
        names: &mut HashMap<String, usize>,
        addresses: &mut HashMap<Ipv4Addr, (String, usize)>,
    ) -> Result<NodeConfig, ConfigError> {
        let table = raw.span();
        let n = raw.get_ref();
        let nth = i + 1;

        let Some(name) = &n.name else {
            return Err(self.err(
                table,
                format!("[[node]] number {nth} has no `name`; add e.g. name = \"node-{nth}\""),
            ));
        };
        if crate::node::check_name(name.get_ref()).is_err() {
            return Err(self.err(
                name.span(),
                format!(
                    "node name {:?} is not usable (it becomes the guest's hostname and a \
                     directory); use 1 to 32 lowercase letters, digits or dashes, not starting \
                     with a dash, e.g. \"node-{nth}\"",
                    name.get_ref()
                ),
            ));
        }
        let line = self.src.line(name.span().start);
        if let Some(first) = names.insert(name.get_ref().clone(), line) {
            return Err(self.err(
                name.span(),
                format!(
                    "node name {:?} is already taken by the node on line {first}; give this \
                     node another name",
                    name.get_ref()
                ),
            ));
        }
        let name_s = name.get_ref().clone();

        let host = match &n.host {
            None => DEFAULT_HOST.to_string(),
            Some(h) => {
                let s = h.get_ref().trim();
                if !valid_host(s) {
                    return Err(self.err(
                        h.span(),
                        format!(
                            "host = {:?} is neither an IP address nor a host name; write the \
                             address or name of the machine that runs this node, e.g. \
                             \"192.168.50.10\" (default \"127.0.0.1\": this machine)",
                            h.get_ref()
                        ),
                    ));
                }
                s.to_string()
            }
        };

        let address = self.address(i, n, &name_s, table.clone(), subnet)?;
        let addr_line = match &n.address {
            Some(a) => self.src.line(a.span().start),
            None => line,
        };
        if let Some((other, other_line)) = addresses.get(&address.addr) {
            let (span, what) = match &n.address {
                Some(a) => (a.span(), "give this node another address".to_string()),
                None => (
                    name.span(),
                    format!(
                        "its default address (network + {} + its index) is taken; give this \
                         node an `address`, or move the other one",
                        FIRST_NODE_HOST
                    ),
                ),
            };
            return Err(self.err(
                span,
                format!(
                    "node {name_s:?}: address {} is already node {other:?}'s (line \
                     {other_line}); {what}",
                    address.addr
                ),
            ));
        }
        addresses.insert(address.addr, (name_s.clone(), addr_line));

        let vcpus = self.vcpus(&n.vcpus, defaults.vcpus)?;
        let memory = self.memory(&n.memory, defaults.memory)?;
        let image = self.image(&n.image, &defaults.image)?;
        let packages = self.packages(&n.packages, defaults.packages.clone())?;
        let api_port = self.node_port(i, n.api_port.as_ref(), "api_port", ports.api())?;
        let peer_port = self.node_port(i, n.peer_port.as_ref(), "peer_port", ports.peer())?;

        Ok(NodeConfig {
            name: name_s,
            host,
            address,
            vcpus,
            memory,
            image,
            packages,
            api_port,
            peer_port,
        })
    }

    /// The node's guest address: as written, or the subnet's network address + 11 + `i`.
    fn address(
        &self,
        i: usize,
        n: &RawNode,
        name: &str,
        table: Range<usize>,
        subnet: &Ipv4Cidr,
    ) -> Result<Ipv4Cidr, ConfigError> {
        let network = u32::from(subnet.network());
        let size = 1u64 << (32 - subnet.prefix);
        let broadcast = Ipv4Addr::from((u64::from(network) + size - 1) as u32);
        let gateway = Ipv4Addr::from(network + 1);
        let Some(a) = &n.address else {
            let host = u64::from(FIRST_NODE_HOST) + i as u64;
            if host >= size - 1 {
                return Err(self.err(
                    n.name.as_ref().map_or(table, |s| s.span()),
                    format!(
                        "node {name:?} has no `address` and its default ({} + {host}) is past \
                         the end of subnet {subnet}; set address = \"...\" inside the subnet, \
                         or use a larger subnet",
                        subnet.network()
                    ),
                ));
            }
            return Ok(Ipv4Cidr {
                addr: Ipv4Addr::from(network + host as u32),
                prefix: subnet.prefix,
            });
        };
        let s = a.get_ref().trim();
        let example = Ipv4Addr::from(network + FIRST_NODE_HOST.min((size - 2) as u32));
        let (addr_s, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: Ipv4Addr = addr_s.parse().map_err(|_| {
            self.err(
                a.span(),
                format!(
                    "address = {s:?} is not an IPv4 address; write one inside subnet {subnet}, \
                     e.g. \"{example}\""
                ),
            )
        })?;
        if let Some(p) = prefix {
            if p.parse::<u8>().ok() != Some(subnet.prefix) {
                return Err(self.err(
                    a.span(),
                    format!(
                        "address = {s:?}: the prefix must be the subnet's (/{}); write just \
                         \"{addr}\"",
                        subnet.prefix
                    ),
                ));
            }
        }
        if !subnet.contains(addr) {
            return Err(self.err(
                a.span(),
                format!(
                    "address {addr} is outside the cluster's subnet {subnet}; pick one inside \
                     it, e.g. \"{example}\""
                ),
            ));
        }
        let why = if addr == subnet.network() {
            Some("the subnet's network address")
        } else if addr == gateway {
            Some("the host's bridge address (the subnet's first)")
        } else if addr == broadcast {
            Some("the subnet's broadcast address")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(self.err(
                a.span(),
                format!(
                    "address {addr} is {why}; pick another one in {subnet}, e.g. \"{example}\""
                ),
            ));
        }
        Ok(Ipv4Cidr {
            addr,
            prefix: subnet.prefix,
        })
    }

    /// A node's port: as written, or the `[api]` rule's base + `i`.
    fn node_port(
        &self,
        i: usize,
        v: Option<&Spanned<i64>>,
        key: &'static str,
        (base_key, base, base_span): (&'static str, u16, Range<usize>),
    ) -> Result<u16, ConfigError> {
        if v.is_some() {
            return self.port(v, key, 0);
        }
        u16::try_from(usize::from(base) + i).map_err(|_| {
            self.err(
                base_span,
                format!(
                    "[api] {base_key} = {base} leaves no port for node number {} ({base} + {i} \
                     > 65535); lower {base_key}, or set {key} on that node",
                    i + 1
                ),
            )
        })
    }

    /// Two nodes on one host cannot listen on the same port.
    fn port_clashes(
        &self,
        raw: &[Spanned<RawNode>],
        nodes: &[NodeConfig],
    ) -> Result<(), ConfigError> {
        let mut used: HashMap<(String, u16), PortUse> = HashMap::new();
        for (r, node) in raw.iter().zip(nodes) {
            let r = r.get_ref();
            let name_span = r.name.as_ref().map(|n| n.span()).unwrap_or(0..0);
            for (kind, port, set) in [
                ("api_port", node.api_port, &r.api_port),
                ("peer_port", node.peer_port, &r.peer_port),
            ] {
                let span = set.as_ref().map_or(name_span.clone(), |s| s.span());
                let key = (host_key(&node.host), port);
                if let Some(first) = used.get(&key) {
                    let whose = if first.node == node.name {
                        "its own".to_string()
                    } else {
                        format!("node {:?}'s (line {})", first.node, first.line)
                    };
                    let fix = if set.is_some() {
                        format!("set another {kind}")
                    } else {
                        format!("set {kind} on this node to a free port")
                    };
                    return Err(self.err(
                        span,
                        format!(
                            "node {:?}: {kind} {port} on host {} is already {whose} {}; {fix}",
                            node.name, node.host, first.kind
                        ),
                    ));
                }
                let line = self.src.line(span.start);
                used.insert(
                    key,
                    PortUse {
                        node: &node.name,
                        kind,
                        line,
                    },
                );
            }
        }
        Ok(())
    }
}

/// The `[api]` rule: node `i` gets base + `i`.
struct PortRule {
    api_base: u16,
    api_span: Range<usize>,
    peer_base: u16,
    peer_span: Range<usize>,
}

impl PortRule {
    fn api(&self) -> (&'static str, u16, Range<usize>) {
        ("port", self.api_base, self.api_span.clone())
    }
    fn peer(&self) -> (&'static str, u16, Range<usize>) {
        ("peer_port", self.peer_base, self.peer_span.clone())
    }
}

/// Parses `512`, `512M`, `4G`, `65536K` into bytes; a bare number is MiB.
fn parse_size(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() && is_number(&t[..i]) => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => {
                    return Err(format!(
                        "memory = {s:?}: unknown size suffix `{c}`; use K, M or G, e.g. \"512M\" \
                         or \"2G\""
                    ))
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 20),
    };
    if !is_number(num) {
        return Err(format!(
            "memory = {s:?} is not a size; write a number with K, M or G, e.g. \"512M\" or \"2G\""
        ));
    }
    Ok(num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift)))
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Debian policy 5.6.1: at least two characters, lowercase letters, digits, `+`, `-`, `.`,
/// starting with a letter or digit (as `rootfs` checks them).
fn valid_package_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(&c))
}

/// An IP address or a DNS host name.
fn valid_host(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    // Dotted numbers that are not an address (e.g. "192.168.50") are a typo, not a name.
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return false;
    }
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Hosts compared for port clashes: addresses in their canonical form, names without case.
fn host_key(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[cluster]\nname = \"t\"\nsubnet = \"10.9.0.0/24\"\n";

    fn ok(text: &str) -> ClusterConfig {
        parse(text, Path::new("/etc/ferry/c.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Line, column and message of the error `text` gives.
    fn bad(text: &str) -> (usize, usize, String) {
        match parse(text, Path::new("c.toml")) {
            Err(ConfigError::Invalid {
                line,
                column,
                message,
                ..
            }) => (line, column, message),
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    /// `bad()` at (line, column), with a message containing every one of `words`.
    #[track_caller]
    fn bad_at(text: &str, at: (usize, usize), words: &[&str]) {
        let (line, column, message) = bad(text);
        assert_eq!((line, column), at, "{message}");
        for w in words {
            assert!(message.contains(w), "{w:?} not in {message:?}");
        }
    }

    fn with_nodes(nodes: &str) -> String {
        format!("{MINIMAL}{nodes}")
    }

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn node(name: &str, host: &str, address: &str, api: u16, peer: u16) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            host: host.into(),
            address: cidr(address),
            vcpus: 2,
            memory: 512 << 20,
            image: "bookworm".into(),
            packages: vec![],
            api_port: api,
            peer_port: peer,
        }
    }

    #[test]
    fn local_example_is_three_nodes_on_this_host() {
        let c = parse(
            include_str!("../../configs/local.toml"),
            Path::new("/src/ferry/configs/local.toml"),
        )
        .unwrap();
        assert_eq!(
            c,
            ClusterConfig {
                source: "/src/ferry/configs/local.toml".into(),
                name: "local".into(),
                subnet: cidr("10.77.1.0/24"),
                listen: "127.0.0.1".parse().unwrap(),
                tls_dir: None,
                nodes: vec![
                    node("node-1", "127.0.0.1", "10.77.1.11/24", 7470, 7570),
                    node("node-2", "127.0.0.1", "10.77.1.12/24", 7471, 7571),
                    node("node-3", "127.0.0.1", "10.77.1.13/24", 7472, 7572),
                ],
                balancer: Policy::default(),
            }
        );
        assert_eq!(c.node("node-2"), Some(&c.nodes[1]));
        assert_eq!(c.node("node-4"), None);
    }

    #[test]
    fn balancer_table_sets_the_policy_and_names_its_mistakes() {
        let c = ok(&with_nodes(
            "[balancer]\nenabled = false\nresidence_s = 5\ncommands = [\"job.py\"]\n[[node]]\nname = \"a\"\n",
        ));
        assert!(!c.balancer.enabled);
        assert_eq!(c.balancer.residence_s, 5);
        assert_eq!(c.balancer.commands, vec!["job.py".to_string()]);
        assert_eq!(c.balancer.interval_ms, Policy::default().interval_ms);
        bad_at(
            &with_nodes("[balancer]\ninterval_ms = 10\n[[node]]\nname = \"a\"\n"),
            (5, 15),
            &["interval_ms = 10 is out of range; use 500 to 60000"],
        );
        bad_at(
            &with_nodes("[balancer]\ncommands = [\"/bin/sh\"]\n[[node]]\nname = \"a\"\n"),
            (5, 13),
            &["without directories"],
        );
        bad_at(
            &with_nodes("[balancer]\nenable = true\n[[node]]\nname = \"a\"\n"),
            (5, 1),
            &[
                "unknown key `enable` in [balancer]",
                "did you mean `enabled`?",
            ],
        );
    }

    #[test]
    fn hosts_example_spreads_the_nodes_over_two_hosts() {
        let c = parse(
            include_str!("../../configs/hosts.toml"),
            Path::new("/src/ferry/configs/hosts.toml"),
        )
        .unwrap();
        assert_eq!(
            c,
            ClusterConfig {
                source: "/src/ferry/configs/hosts.toml".into(),
                name: "hosts".into(),
                subnet: cidr("10.77.1.0/24"),
                listen: "0.0.0.0".parse().unwrap(),
                tls_dir: None,
                nodes: vec![
                    node("node-1", "192.168.50.10", "10.77.1.11/24", 7470, 7570),
                    node("node-2", "192.168.50.10", "10.77.1.12/24", 7471, 7571),
                    node("node-3", "192.168.50.11", "10.77.1.13/24", 7472, 7572),
                ],
                balancer: Policy::default(),
            }
        );
    }

    #[test]
    fn the_example_files_on_disk_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        for file in ["local.toml", "hosts.toml"] {
            let c = load(&dir.join(file)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.source, dir.join(file));
            assert_eq!(c.nodes.len(), 3);
        }
    }

    #[test]
    fn defaults_fill_in_what_is_left_out() {
        let c = ok(&with_nodes(
            "[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n",
        ));
        assert_eq!(c.source, Path::new("/etc/ferry/c.toml"));
        assert_eq!(c.listen, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.tls_dir, None);
        assert_eq!(
            c.nodes,
            [
                node("a", "127.0.0.1", "10.9.0.11/24", 7470, 7570),
                node("b", "127.0.0.1", "10.9.0.12/24", 7471, 7571),
            ]
        );
    }

    #[test]
    fn nodes_override_the_defaults_and_add_packages() {
        let c = ok(&with_nodes(
            "[defaults]\nvcpus = 4\nmemory = \"1G\"\npackages = [\"htop\", \"strace\", \"htop\"]\n\
             [api]\nlisten = \"0.0.0.0\"\nport = 8000\npeer_port = 9000\n\
             [[node]]\nname = \"a\"\n\
             [[node]]\nname = \"b\"\nhost = \"box-2.lan\"\naddress = \"10.9.0.200\"\nvcpus = 1\n\
             memory = 2048\nimage = \"bookworm\"\npackages = [\"g++\", \"strace\", \"python3.11\"]\n\
             api_port = 8100\npeer_port = 9100\n\
             [[node]]\nname = \"c\"\nmemory = \"262144K\"\naddress = \"10.9.0.12/24\"\n",
        ));
        assert_eq!(c.listen, "0.0.0.0".parse::<IpAddr>().unwrap());
        let [a, b, n3] = &c.nodes[..] else {
            panic!("{c:?}")
        };
        assert_eq!((a.vcpus, a.memory), (4, 1 << 30));
        assert_eq!(a.packages, ["htop", "strace"]);
        assert_eq!((a.api_port, a.peer_port), (8000, 9000));
        assert_eq!(a.address, cidr("10.9.0.11/24"));
        assert_eq!(b.host, "box-2.lan");
        assert_eq!(b.address, cidr("10.9.0.200/24"));
        assert_eq!((b.vcpus, b.memory), (1, 2 << 30));
        assert_eq!(b.packages, ["htop", "strace", "g++", "python3.11"]);
        assert_eq!((b.api_port, b.peer_port), (8100, 9100));
        // The port rule counts every node, wherever it sets its own.
        assert_eq!((n3.api_port, n3.peer_port), (8002, 9002));
        assert_eq!(n3.memory, 256 << 20);
        assert_eq!(n3.address, cidr("10.9.0.12/24"));
        assert_eq!(n3.vcpus, 4);
    }

    #[test]
    fn tls_dir_is_relative_to_the_file() {
        let c = ok(&with_nodes(
            "[tls]\ndir = \"tls\"\n[[node]]\nname = \"a\"\n",
        ));
        assert_eq!(c.tls_dir.as_deref(), Some(Path::new("/etc/ferry/tls")));
        let c = ok(&with_nodes(
            "[tls]\ndir = \"/var/lib/x\"\n[[node]]\nname = \"a\"\n",
        ));
        assert_eq!(c.tls_dir.as_deref(), Some(Path::new("/var/lib/x")));
        let c = ok(&with_nodes("[tls]\n[[node]]\nname = \"a\"\n"));
        assert_eq!(c.tls_dir, None);
        bad_at(
            &with_nodes("[tls]\ndir = \"\"\n[[node]]\nname = \"a\"\n"),
            (5, 7),
            &["dir is empty", "leave `dir` out"],
        );
        // A relative file name is made absolute.
        let c = parse(&with_nodes("[[node]]\nname = \"a\"\n"), Path::new("c.toml")).unwrap();
        assert!(c.source.is_absolute() && c.source.ends_with("c.toml"));
    }

    #[test]
    fn serializes_addresses_as_text() {
        let c = ok(&with_nodes("[[node]]\nname = \"a\"\n"));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["subnet"], "10.9.0.0/24");
        assert_eq!(v["listen"], "127.0.0.1");
        assert_eq!(v["source"], "/etc/ferry/c.toml");
        assert_eq!(v["tls_dir"], serde_json::Value::Null);
        assert_eq!(v["nodes"][0]["address"], "10.9.0.11/24");
        assert_eq!(v["nodes"][0]["memory"], 512u64 << 20);
        assert_eq!(v["nodes"][0]["api_port"], 7470);
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let e = load(Path::new("/nonexistent/ferry/c.toml")).unwrap_err();
        let ConfigError::Read { path, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(path, Path::new("/nonexistent/ferry/c.toml"));
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        assert!(
            e.to_string().starts_with(
                "cannot read the cluster file /nonexistent/ferry/c.toml (give the path"
            ),
            "{e}"
        );
    }

    #[test]
    fn errors_display_as_path_line_column_message() {
        let e = parse("[cluster]\nname = 3\n", Path::new("configs/x.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("configs/x.toml:2:8: `name`: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_name_the_table_and_its_keys() {
        bad_at(
            "[cluster]\nname = \"t\"\nsubnet = \"10.9.0.0/24\"\nbridge = \"x\"\n",
            (4, 1),
            &["unknown key `bridge` in [cluster]", "`name`, `subnet`"],
        );
        bad_at(
            &with_nodes("[defaults]\n  memroy = \"1G\"\n"),
            (5, 3),
            &[
                "unknown key `memroy` in [defaults]",
                "did you mean `memory`?",
                "`vcpus`, `memory`, `image`, `packages`",
            ],
        );
        bad_at(
            &with_nodes("[api]\napi_port = 1\n"),
            (5, 1),
            &[
                "unknown key `api_port` in [api]",
                "belongs in [[node]]",
                "`listen`, `port`, `peer_port`",
            ],
        );
        bad_at(
            &with_nodes("[tls]\ncert = \"x\"\n"),
            (5, 1),
            &["unknown key `cert` in [tls]", "the keys of [tls] are `dir`"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\ncpus = 3\n"),
            (6, 1),
            &[
                "unknown key `cpus` in [[node]]",
                "did you mean `vcpus`?",
                "`name`, `address`, `host`, `vcpus`, `memory`, `image`, `packages`, \
                 `api_port`, `peer_port`",
            ],
        );
        bad_at(
            &with_nodes("[nodes]\nname = \"a\"\n"),
            (4, 2),
            &[
                "unknown table or key `nodes` at the top level",
                "did you mean [[node]]?",
                "[cluster], [defaults], [api], [tls], [balancer], [[node]]",
            ],
        );
        bad_at(
            &format!("vcpus = 2\n{MINIMAL}"),
            (1, 1),
            &["`vcpus`", "belongs in [defaults] or [[node]]"],
        );
        bad_at(
            &format!("node = [{{name = \"a\", vcpu = 3}}]\n{MINIMAL}"),
            (1, 22),
            &["unknown key `vcpu` in [[node]] (did you mean `vcpus`?)"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\nnode = 1\n"),
            (8, 1),
            &["`node` belongs at the top level of the file (before any table)"],
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        bad_at(
            &with_nodes("[defaults]\nvcpus = \"2\"\n"),
            (5, 9),
            &["`vcpus`", "expected an integer"],
        );
        bad_at(
            &with_nodes("[defaults]\npackages = \"htop\"\n"),
            (5, 12),
            &["`packages`", "expected an array"],
        );
        bad_at(
            &with_nodes("[defaults]\nmemory = true\n"),
            (5, 10),
            &["`memory`", "a size such as \"512M\""],
        );
        bad_at("cluster = 3\n", (1, 11), &["`cluster`", "expected a table"]);
        bad_at(
            &with_nodes("[defaults]\npackages = [\"a=b\", 3]\n"),
            (5, 20),
            &["`packages`: invalid type: integer `3`, expected a string"],
        );
        bad_at(
            &with_nodes("[defaults]\npackages = [\n  \"htop\", # a = b\n  3,\n]\n"),
            (7, 3),
            &["`packages`: invalid type: integer `3`"],
        );
        bad_at(
            &with_nodes("[api]\nport = 99999999999999999999\n"),
            (5, 8),
            &["`port`: the number is too large"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\napi_port = 1.5\n"),
            (6, 12),
            &["`api_port`", "expected an integer"],
        );
    }

    #[test]
    fn toml_syntax_errors_are_located() {
        bad_at(
            "[cluster]\nname = \"t\nsubnet = 1\n",
            (2, 10),
            &["TOML syntax: ", "string"],
        );
        bad_at(
            &format!("{MINIMAL}name = \"u\"\n"),
            (4, 1),
            &["duplicate key `name`", "keep only one"],
        );
    }

    #[test]
    fn sizes_and_counts_out_of_range() {
        bad_at(
            &with_nodes("[defaults]\nmemory = \"512X\"\n"),
            (5, 10),
            &["\"512X\"", "unknown size suffix `X`", "use K, M or G"],
        );
        bad_at(
            &with_nodes("[defaults]\nmemory = \"lots\"\n"),
            (5, 10),
            &["is not a size", "\"512M\""],
        );
        bad_at(
            &with_nodes("[defaults]\nmemory = \"128M\"\n"),
            (5, 10),
            &["out of range", "\"256M\" to \"64G\""],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\nmemory = 65537\n"),
            (6, 10),
            &["memory = 65537 is out of range"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\nmemory = \"99999999999999999G\"\n"),
            (6, 10),
            &["out of range"],
        );
        bad_at(
            &with_nodes("[defaults]\nmemory = \"262145K\"\n"),
            (5, 10),
            &["not a whole number of MiB"],
        );
        ok(&with_nodes(
            "[defaults]\nmemory = \"64G\"\n[[node]]\nname = \"a\"\n",
        ));
        bad_at(
            &with_nodes("[defaults]\nvcpus = 0\n"),
            (5, 9),
            &["vcpus = 0 is out of range; use 1 to 32"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\nvcpus = 33\n"),
            (6, 9),
            &["vcpus = 33 is out of range"],
        );
        bad_at(
            &with_nodes("[api]\nport = 0\n"),
            (5, 8),
            &["port = 0 is not a port; use 1 to 65535"],
        );
        bad_at(
            &with_nodes("[api]\npeer_port = 70000\n"),
            (5, 13),
            &["peer_port = 70000 is not a port"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\napi_port = -1\n"),
            (6, 12),
            &["api_port = -1 is not a port"],
        );
        // The port rule runs past 65535 for the second node.
        bad_at(
            &with_nodes("[api]\nport = 65535\n[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n"),
            (5, 8),
            &[
                "leaves no port for node number 2",
                "set api_port on that node",
            ],
        );
        bad_at(
            &with_nodes("[api]\nlisten = \"localhost\"\n"),
            (5, 10),
            &["not an IP address", "\"0.0.0.0\""],
        );
    }

    #[test]
    fn cluster_names_and_subnets() {
        for name in ["Local", "1st", "-x", "a_b", "thirteen-char", ""] {
            bad_at(
                &format!("[cluster]\nname = {name:?}\nsubnet = \"10.9.0.0/24\"\n"),
                (2, 8),
                &[
                    "cluster name",
                    "1 to 12 lowercase letters, digits or dashes",
                ],
            );
        }
        bad_at(
            "[cluster]\nsubnet = \"10.9.0.0/24\"\n",
            (1, 1),
            &["[cluster] has no `name`", "name = \"local\""],
        );
        bad_at(
            "[cluster]\nname = \"t\"\n",
            (1, 1),
            &["[cluster] has no `subnet`", "subnet = \"10.77.0.0/24\""],
        );
        bad_at(
            "[[node]]\nname = \"a\"\n",
            (1, 1),
            &["[cluster] table is missing", "subnet ="],
        );
        let subnet = |s: &str| format!("[cluster]\nname = \"t\"\nsubnet = {s:?}\n");
        bad_at(
            &subnet("10.9.0.5/24"),
            (3, 10),
            &["not a network address", "\"10.9.0.0/24\""],
        );
        bad_at(&subnet("10.9.0.0/30"), (3, 10), &["/30", "/16", "/29"]);
        bad_at(
            &subnet("10.0.0.0/8"),
            (3, 10),
            &["/8 network is not supported"],
        );
        bad_at(&subnet("10.9.0.0"), (3, 10), &["no prefix length"]);
        bad_at(&subnet("10.9.0/24"), (3, 10), &["not an IPv4 network"]);
        bad_at(&subnet("10.9.0.0/x"), (3, 10), &["bad prefix length"]);
        let c = ok(&format!(
            "{}[[node]]\nname = \"a\"\n",
            subnet("172.16.0.0/16")
        ));
        assert_eq!(c.nodes[0].address, cidr("172.16.0.11/16"));
    }

    #[test]
    fn node_names() {
        bad_at(
            &with_nodes("[[node]]\nname = \"Node_1\"\n"),
            (5, 8),
            &["node name \"Node_1\"", "e.g. \"node-1\""],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\n[[node]]\nhost = \"x\"\n"),
            (6, 1),
            &["[[node]] number 2 has no `name`", "name = \"node-2\""],
        );
        bad_at(
            &with_nodes(
                "[[node]]\nname = \"a\"\n\n[[node]]\nname = \"b\"\n[[node]]\n  name = \"a\"\n",
            ),
            (10, 10),
            &["\"a\" is already taken by the node on line 5"],
        );
    }

    #[test]
    fn node_addresses() {
        let one = |addr: &str| with_nodes(&format!("[[node]]\nname = \"a\"\naddress = {addr:?}\n"));
        bad_at(
            &one("10.9.1.5"),
            (6, 11),
            &[
                "10.9.1.5 is outside the cluster's subnet 10.9.0.0/24",
                "\"10.9.0.11\"",
            ],
        );
        bad_at(&one("10.9.0.0"), (6, 11), &["network address"]);
        bad_at(&one("10.9.0.1"), (6, 11), &["the host's bridge address"]);
        bad_at(&one("10.9.0.255"), (6, 11), &["broadcast address"]);
        bad_at(&one("10.9.0.x"), (6, 11), &["not an IPv4 address"]);
        bad_at(
            &one("10.9.0.5/16"),
            (6, 11),
            &["the subnet's (/24)", "\"10.9.0.5\""],
        );
        bad_at(
            &with_nodes(
                "[[node]]\nname = \"a\"\naddress = \"10.9.0.20\"\n\
                 [[node]]\nname = \"b\"\naddress = \"10.9.0.20\"\n",
            ),
            (9, 11),
            &["address 10.9.0.20 is already node \"a\"'s (line 6)"],
        );
        // A default address taken by an explicit one: pointed at the node's name.
        bad_at(
            &with_nodes(
                "[[node]]\nname = \"a\"\naddress = \"10.9.0.12\"\n[[node]]\nname = \"b\"\n",
            ),
            (8, 8),
            &[
                "10.9.0.12 is already node \"a\"'s",
                "give this node an `address`",
            ],
        );
        // A default address past the end of a small subnet.
        bad_at(
            "[cluster]\nname = \"t\"\nsubnet = \"10.9.0.0/29\"\n[[node]]\nname = \"a\"\n",
            (5, 8),
            &["past the end of subnet 10.9.0.0/29", "set address"],
        );
        let c = ok("[cluster]\nname = \"t\"\nsubnet = \"10.9.0.0/29\"\n\
                    [[node]]\nname = \"a\"\naddress = \"10.9.0.6\"\n");
        assert_eq!(c.nodes[0].address, cidr("10.9.0.6/29"));
    }

    #[test]
    fn ports_clash_only_on_one_host() {
        bad_at(
            &with_nodes(
                "[[node]]\nname = \"a\"\napi_port = 8000\n\
                 [[node]]\nname = \"b\"\napi_port = 8000\n",
            ),
            (9, 12),
            &["api_port 8000 on host 127.0.0.1 is already node \"a\"'s (line 6) api_port"],
        );
        bad_at(
            &with_nodes(
                "[[node]]\nname = \"a\"\n\
                 [[node]]\nname = \"b\"\nhost = \"127.0.0.1\"\npeer_port = 7470\n",
            ),
            (9, 13),
            &["peer_port 7470 on host 127.0.0.1 is already node \"a\"'s (line 5) api_port"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\napi_port = 9000\npeer_port = 9000\n"),
            (7, 13),
            &["already its own api_port"],
        );
        // A port from the rule, clashing with one set by an earlier node: at the name.
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\npeer_port = 7471\n[[node]]\nname = \"b\"\n"),
            (8, 8),
            &["node \"b\": api_port 7471", "set api_port on this node"],
        );
        // Host names compare without case.
        bad_at(
            &with_nodes(
                "[[node]]\nname = \"a\"\nhost = \"Box\"\napi_port = 8000\n\
                 [[node]]\nname = \"b\"\nhost = \"box\"\napi_port = 8000\n",
            ),
            (11, 12),
            &["already node \"a\"'s"],
        );
        let c = ok(&with_nodes(
            "[[node]]\nname = \"a\"\nhost = \"10.0.0.1\"\napi_port = 8000\n\
             [[node]]\nname = \"b\"\nhost = \"10.0.0.2\"\napi_port = 8000\n",
        ));
        assert_eq!(c.nodes[1].api_port, 8000);
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\nhost = \"192.168.50\"\n"),
            (6, 8),
            &["neither an IP address nor a host name"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\nhost = \"my host\"\n"),
            (6, 8),
            &["neither an IP address nor a host name"],
        );
    }

    #[test]
    fn nodes_images_and_packages() {
        let (line, _, m) = bad(MINIMAL);
        assert_eq!(line, 3, "{m}");
        assert!(m.contains("no nodes") && m.contains("[[node]]"), "{m}");
        bad_at(&format!("node = []\n{MINIMAL}"), (1, 8), &["no nodes"]);
        bad_at(
            &with_nodes("[defaults]\nimage = \"trixie\"\n"),
            (5, 9),
            &["unknown image \"trixie\"", "\"bookworm\""],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\nimage = \"sid\"\n"),
            (6, 9),
            &["unknown image \"sid\""],
        );
        bad_at(
            &with_nodes("[defaults]\npackages = [\"htop\", \"vim=2:9.0\"]\n"),
            (5, 21),
            &[
                "\"vim=2:9.0\" is not a Debian package name",
                "e.g. \"htop\"",
            ],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\npackages = [\n  \"Bash\",\n]\n"),
            (7, 3),
            &["\"Bash\" is not a Debian package name"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\npackages = [\"a\"]\n"),
            (6, 13),
            &["\"a\" is not a Debian package name"],
        );
    }

    #[test]
    fn columns_count_characters() {
        bad_at(
            "# é\n[cluster]\nname = \"t\" # ünïcode\nsubnet = \"10.9.0.0/24\"\n\
             [[node]]\nname = \"a\"\nvcpus = 99 # ä\n",
            (7, 9),
            &["vcpus = 99"],
        );
        bad_at(
            &with_nodes("[[node]]\nname = \"a\"\nhost = \"é\"\n"),
            (6, 8),
            &["host"],
        );
    }
}
