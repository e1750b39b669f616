//! The dashboard: a web page every node daemon serves, and the API it draws from.
//!
//! - `GET /` redirects to `GET /dashboard`, the page ([`PAGE`], `dashboard.html` next to this
//!   file: plain HTML, CSS and JavaScript with nothing fetched from elsewhere). Neither needs a
//!   token: the page holds no secret. It takes the bearer token from its URL's fragment
//!   (`#token=...`, which browsers never send to the server), keeps it in the tab's
//!   sessionStorage, and calls the JSON API with it.
//! - `GET /v1/history[?since=MS]`: every node's load over the last ten minutes, sampled every
//!   two seconds by this daemon ([`sample_loads`], [`LoadHistory`]); with `since`, only the
//!   samples taken after that time (ms since the Unix epoch).
//! - `GET /v1/cluster/migrations`: the migration jobs of every node, asked of each over its
//!   peer port ([`ClusterMigrations`]).
//!
//! `ferry dashboard` prints the page's address with the token ([`link`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::api::{MigrationJob, NodeState, NodeStatus, Route, RouteError};
use super::client::ClientError;
use super::control::{Cluster, ControlError};
use super::daemon::{error_response, json_response, lock, Node};

/// The page, as served.
pub const PAGE: &str = include_str!("dashboard.html");

/// How often the daemon samples every node's load.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// How long samples are kept.
pub const KEEP: Duration = Duration::from_secs(600);

/// The most samples kept per node: ten minutes of them, and a few more for a late tick.
const CAPACITY: usize = (KEEP.as_secs() / SAMPLE_INTERVAL.as_secs()) as usize + 5;

/// One load sample of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    /// When it was taken, in milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// CPU use, all vCPUs together, 0 to 100.
    pub cpu_percent: f64,
    /// Runnable tasks.
    pub run_queue: u32,
    /// Free memory: what the guest can still give out without swapping.
    pub mem_available_mib: u64,
}

/// One node's samples, oldest first. A node that was not ready has no samples for that time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHistory {
    pub node: String,
    /// Its state at the last sample.
    pub state: NodeState,
    pub samples: Vec<LoadSample>,
}

/// `GET /v1/cluster/migrations`: every node's jobs (each names its source in `from`), and the
/// nodes that could not be asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterMigrations {
    /// In the order of the nodes, each node's oldest first.
    pub jobs: Vec<MigrationJob>,
    pub unreachable: Vec<Unreachable>,
}

/// A node whose jobs are missing from a [`ClusterMigrations`], and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unreachable {
    pub node: String,
    pub error: String,
}

/// Every node's recent load: a ring of samples per node, in the order the cluster lists its
/// nodes. A node that left the list keeps its samples until they are too old.
#[derive(Debug, Default)]
pub struct LoadHistory {
    nodes: Mutex<Vec<Ring>>,
}

#[derive(Debug)]
struct Ring {
    node: String,
    state: NodeState,
    samples: VecDeque<LoadSample>,
}

impl LoadHistory {
    /// Adds one sample per ready node of `statuses` taken at `t_ms`, and forgets samples older
    /// than [`KEEP`].
    pub fn record(&self, t_ms: u64, statuses: &[NodeStatus]) {
        let mut nodes = lock(&self.nodes);
        let mut ordered: Vec<Ring> = Vec::with_capacity(nodes.len().max(statuses.len()));
        for s in statuses {
            let mut ring = match nodes.iter().position(|r| r.node == s.name) {
                Some(i) => nodes.remove(i),
                None => Ring {
                    node: s.name.clone(),
                    state: s.state,
                    samples: VecDeque::new(),
                },
            };
            ring.state = s.state;
            if let (NodeState::Ready, Some(load)) = (s.state, &s.load) {
                ring.samples.push_back(LoadSample {
                    t_ms,
                    cpu_percent: load.cpu_percent,
                    run_queue: load.run_queue,
                    mem_available_mib: load.mem_available_mib,
                });
            }
            ordered.push(ring);
        }
        // Nodes no longer listed come last, as down, while they have samples.
        for mut ring in nodes.drain(..) {
            ring.state = NodeState::Down;
            ordered.push(ring);
        }
        let oldest = t_ms.saturating_sub(KEEP.as_millis() as u64);
        for ring in &mut ordered {
            while ring.samples.len() > CAPACITY
                || ring.samples.front().is_some_and(|s| s.t_ms < oldest)
            {
                ring.samples.pop_front();
            }
        }
        let listed = statuses.len();
        let mut i = 0;
        ordered.retain(|r| {
            i += 1;
            i <= listed || !r.samples.is_empty()
        });
        *nodes = ordered;
    }

    /// Every node's samples taken after `since` (all of them without it).
    pub fn snapshot(&self, since: Option<u64>) -> Vec<NodeHistory> {
        let since = since.unwrap_or(0);
        lock(&self.nodes)
            .iter()
            .map(|r| NodeHistory {
                node: r.node.clone(),
                state: r.state,
                samples: r
                    .samples
                    .iter()
                    .filter(|s| s.t_ms > since)
                    .cloned()
                    .collect(),
            })
            .collect()
    }

    /// The nodes of the last sample, in order.
    pub fn node_names(&self) -> Vec<String> {
        lock(&self.nodes).iter().map(|r| r.node.clone()).collect()
    }
}

/// The `since` query parameter of `GET /v1/history`: absent, or milliseconds since the Unix
/// epoch.
pub fn since(query: Option<&str>) -> Result<Option<u64>, RouteError> {
    let mut since = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => match v.parse() {
                Ok(ms) => since = Some(ms),
                Err(_) => {
                    return Err(RouteError::BadRequest(format!(
                        "query parameter since={v}: give a time in milliseconds since the Unix epoch, as the samples' t_ms"
                    )))
                }
            },
            _ => {
                let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                return Err(RouteError::BadRequest(format!(
                    "unknown query parameter `{key}`; the only one is since=MS"
                )));
            }
        }
    }
    Ok(since)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Samples every node's load into `node.history` every [`SAMPLE_INTERVAL`], for as long as the
/// daemon runs.
pub(super) async fn sample_loads(node: Arc<Node>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let statuses = node.all_nodes().await;
        node.history.record(now_ms(), &statuses);
    }
}

/// Answers the dashboard's routes: the page, its redirect, the load history and the cluster's
/// migrations.
pub(super) async fn respond(node: &Arc<Node>, route: Route) -> Response<Full<Bytes>> {
    match route {
        Route::Root => redirect("/dashboard"),
        Route::Dashboard => page(),
        Route::History { since } => json_response(StatusCode::OK, &node.history.snapshot(since)),
        Route::ClusterMigrations => json_response(StatusCode::OK, &cluster_migrations(node).await),
        other => error_response(404, format!("not a dashboard route: {other:?}")),
    }
}

/// A redirect (302) to `to`. A browser keeps the URL's fragment (the token) across it.
fn redirect(to: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::FOUND;
    resp.headers_mut().insert(
        hyper::header::LOCATION,
        hyper::header::HeaderValue::from_static(to),
    );
    resp
}

/// The page. It runs only its own inline script and talks only to this node.
fn page() -> Response<Full<Bytes>> {
    use hyper::header::{self, HeaderValue};
    let mut resp = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// Every node's migration jobs: this node's own, the others' over their peer ports, all at
/// once. The nodes are those of the last load sample (every member), or the cluster's when
/// none was taken yet.
async fn cluster_migrations(node: &Arc<Node>) -> ClusterMigrations {
    let mut names = node.history.node_names();
    if names.is_empty() {
        names = node.all_nodes().await.into_iter().map(|s| s.name).collect();
    }
    let mut tasks = Vec::with_capacity(names.len());
    for name in names {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            if name == node.me.name {
                return (name, Ok(node.jobs.list()));
            }
            let peer = match node.named(&name) {
                Ok(n) => n.clone(),
                Err(_) => return (name, Err("not a member of the cluster".to_string())),
            };
            let jobs = node
                .peer_client(&peer)
                .get::<Vec<MigrationJob>>("/v1/migrations")
                .await
                .map_err(|e| e.to_string());
            (name, jobs)
        }));
    }
    let mut out = ClusterMigrations {
        jobs: Vec::new(),
        unreachable: Vec::new(),
    };
    for t in tasks {
        match t.await {
            Ok((_, Ok(jobs))) => out.jobs.extend(jobs),
            Ok((node, Err(error))) => out.unreachable.push(Unreachable { node, error }),
            Err(e) => out.unreachable.push(Unreachable {
                node: "?".into(),
                error: format!("asking a node failed: {e}"),
            }),
        }
    }
    out
}

/// Adds the dashboard's routes and types to the API's OpenAPI document.
pub fn document(doc: &mut serde_json::Value) {
    use serde_json::json;
    let unauthorized = json!({"description": "no token, a wrong token, and no cluster client certificate",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let bad = json!({"description": "an error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let schemas = &mut doc["components"]["schemas"];
    schemas["LoadSample"] = json!({"type": "object",
        "required": ["t_ms", "cpu_percent", "run_queue", "mem_available_mib"],
        "properties": {
            "t_ms": {"type": "integer", "description": "when, in ms since the Unix epoch"},
            "cpu_percent": {"type": "number"}, "run_queue": {"type": "integer"},
            "mem_available_mib": {"type": "integer", "description": "free memory"}}});
    schemas["NodeHistory"] = json!({"type": "object", "required": ["node", "state", "samples"],
        "properties": {
            "node": {"type": "string"},
            "state": {"type": "string", "enum": ["booting", "ready", "down"]},
            "samples": {"type": "array", "items": {"$ref": "#/components/schemas/LoadSample"}}}});
    schemas["ClusterMigrations"] = json!({"type": "object", "required": ["jobs", "unreachable"],
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/MigrationJob"}},
            "unreachable": {"type": "array", "items": {"type": "object", "required": ["node", "error"],
                "properties": {"node": {"type": "string"}, "error": {"type": "string"}}}}}});
    let paths = &mut doc["paths"];
    paths["/"] = json!({"get": {"summary": "redirects to /dashboard", "security": [],
        "responses": {"302": {"description": "to /dashboard"}}}});
    paths["/dashboard"] = json!({"get": {"summary": "the dashboard page (HTML); it asks for the token, or takes it from its URL's fragment #token=...", "security": [],
        "responses": {"200": {"description": "the page", "content": {"text/html": {}}}}}});
    paths["/v1/history"] = json!({"get": {
        "summary": "every node's load over the last ten minutes, sampled every 2 s by this node, oldest first",
        "parameters": [{"name": "since", "in": "query", "required": false, "schema": {"type": "integer"},
            "description": "only samples taken after this time (ms since the Unix epoch)"}],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/NodeHistory"}}}}},
            "400": bad, "401": unauthorized.clone()}}});
    paths["/v1/cluster/migrations"] = json!({"get": {
        "summary": "the migration jobs of every node (each asked over its peer port); nodes that did not answer are listed in unreachable",
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClusterMigrations"}}}},
            "401": unauthorized}}});
}

/// Where a user opens the dashboard.
#[derive(Debug, Clone, PartialEq)]
pub struct DashboardLink {
    /// The page's address on the node's API, with the token in its fragment.
    pub url: String,
    /// The cluster CA's certificate, for the browser to trust.
    pub ca: PathBuf,
    pub node: String,
}

/// Why `ferry dashboard` has no address to give.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(
        "cluster `{cluster}` has no API token yet: it was never brought up; `ferry up {file}` first"
    )]
    NotUp { cluster: String, file: String },
    #[error(
        "node {node} does not answer at {url}: {source}; `ferry up {file}` starts the cluster, `ferry status {file}` shows its nodes"
    )]
    NotAnswering {
        node: String,
        url: String,
        file: String,
        source: Box<ClientError>,
    },
}

/// The dashboard of node `node` (the file's first node if none), checked to answer.
pub fn link(cluster: &Cluster, node: Option<&str>) -> Result<DashboardLink, DashboardError> {
    let name = match node {
        Some(name) => name.to_string(),
        None => cluster
            .config
            .nodes
            .first()
            .map(|n| n.name.clone())
            .unwrap_or_default(),
    };
    let n = cluster.node_named(&name)?;
    let file = cluster.config.source.display().to_string();
    if !cluster.dir.token_file().exists() {
        return Err(DashboardError::NotUp {
            cluster: cluster.config.name.clone(),
            file,
        });
    }
    let token = cluster.dir.read_token().map_err(ControlError::from)?;
    let base = cluster.api_url(n);
    let client = cluster.client(n)?.with_timeout(Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ControlError::Runtime)?;
    rt.block_on(client.get::<NodeStatus>("/v1/node"))
        .map_err(|source| DashboardError::NotAnswering {
            node: n.name.clone(),
            url: base.clone(),
            file,
            source: Box::new(source),
        })?;
    Ok(DashboardLink {
        url: page_url(&base, &token),
        ca: cluster.dir.tls_dir(&cluster.config).join("ca.pem"),
        node: n.name.clone(),
    })
}

/// The page's address on the API at `base`, with `token` in the fragment.
pub fn page_url(base: &str, token: &str) -> String {
    format!("{}/dashboard#token={token}", base.trim_end_matches('/'))
}

/// What `ferry dashboard` prints: the address, and how to make a browser trust the cluster.
pub fn instructions(link: &DashboardLink) -> String {
    let ca = link.ca.display();
    format!(
        "{url}\n\n\
         Open that address in a browser (node {node}'s API; the token after `#` stays in the browser).\n\
         The page is served over HTTPS with a certificate of the cluster's own CA: trust {ca} once,\n\
         for websites, or the browser warns about the certificate:\n\
         - Firefox: Settings > Privacy & Security > Certificates > View Certificates > Authorities > Import\n\
         - Chromium/Chrome: chrome://settings/certificates > Authorities > Import\n\
         - or for both (NSS): certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n ferry-cluster -i {ca}\n",
        url = link.url,
        node = link.node,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::api::{route, Load};

    fn status(name: &str, state: NodeState, cpu: f64) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            address: "10.0.0.1".into(),
            host: "127.0.0.1".into(),
            state,
            detail: None,
            api_url: String::new(),
            vcpus: 2,
            memory_mib: 512,
            kernel: None,
            boot_ms: None,
            load: (state == NodeState::Ready).then_some(Load {
                cpu_percent: cpu,
                run_queue: 1,
                load_avg: [0.0; 3],
                online_cpus: 2,
                mem_total_mib: 480,
                mem_available_mib: 400,
                tasks: 50,
                uptime_s: 10,
                busy: 0,
            }),
            accepting: true,
        }
    }

    #[test]
    fn history_keeps_ten_minutes_per_node_in_the_cluster_order() {
        let h = LoadHistory::default();
        let step = SAMPLE_INTERVAL.as_millis() as u64;
        let t0 = 1_000_000_000;
        // Twenty minutes of samples: only the last ten are kept.
        for i in 0..600 {
            h.record(
                t0 + i * step,
                &[
                    status("node-1", NodeState::Ready, i as f64),
                    status("node-2", NodeState::Ready, 1.0),
                ],
            );
        }
        let snap = h.snapshot(None);
        assert_eq!(
            snap.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(),
            ["node-1", "node-2"]
        );
        let last = t0 + 599 * step;
        let s = &snap[0].samples;
        assert_eq!(
            s.len(),
            301,
            "ten minutes at one sample per 2 s, both ends in"
        );
        assert_eq!(s.last().unwrap().t_ms, last);
        assert_eq!(s.last().unwrap().cpu_percent, 599.0);
        assert!(s.first().unwrap().t_ms >= last - KEEP.as_millis() as u64);
        assert!(s.windows(2).all(|w| w[0].t_ms < w[1].t_ms), "oldest first");
        assert_eq!(s[0].mem_available_mib, 400);

        // `since` gives only what is newer.
        let newer = h.snapshot(Some(last - step));
        assert_eq!(newer[0].samples.len(), 1);
        assert_eq!(newer[1].samples.len(), 1);
        assert!(h.snapshot(Some(last))[0].samples.is_empty());
    }

    #[test]
    fn history_follows_the_node_list_and_records_no_load_for_nodes_not_ready() {
        let h = LoadHistory::default();
        h.record(
            1000,
            &[
                status("node-1", NodeState::Ready, 5.0),
                status("node-2", NodeState::Ready, 5.0),
            ],
        );
        // node-3 joins, node-2 goes down, node-1 is left out of the list.
        h.record(
            3000,
            &[
                status("node-3", NodeState::Booting, 0.0),
                status("node-2", NodeState::Down, 0.0),
            ],
        );
        let snap = h.snapshot(None);
        let view: Vec<(&str, NodeState, usize)> = snap
            .iter()
            .map(|n| (n.node.as_str(), n.state, n.samples.len()))
            .collect();
        assert_eq!(
            view,
            [
                ("node-3", NodeState::Booting, 0),
                ("node-2", NodeState::Down, 1),
                // Gone from the list: kept, as down, while it has samples.
                ("node-1", NodeState::Down, 1),
            ]
        );
        // Ten minutes later, the node that left is forgotten; listed ones stay.
        h.record(
            3000 + KEEP.as_millis() as u64 + 1,
            &[status("node-3", NodeState::Ready, 1.0)],
        );
        let names: Vec<String> = h.snapshot(None).into_iter().map(|n| n.node).collect();
        assert_eq!(names, ["node-3"]);
    }

    #[test]
    fn history_query_takes_only_since() {
        assert_eq!(since(None), Ok(None));
        assert_eq!(
            since(Some("since=1700000000000")),
            Ok(Some(1_700_000_000_000))
        );
        let e = since(Some("since=yesterday")).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("milliseconds"), "{e}");
        let e = since(Some("node=node-1")).unwrap_err();
        assert!(e.to_string().contains("`node`"), "{e}");
    }

    #[test]
    fn dashboard_routes_and_which_need_a_token() {
        assert_eq!(route("GET", "/", None), Ok(Route::Root));
        assert_eq!(route("GET", "/dashboard", None), Ok(Route::Dashboard));
        assert_eq!(
            route("GET", "/v1/history", Some("since=5")),
            Ok(Route::History { since: Some(5) })
        );
        assert_eq!(
            route("GET", "/v1/cluster/migrations", None),
            Ok(Route::ClusterMigrations)
        );
        assert_eq!(route("POST", "/dashboard", None).unwrap_err().status(), 405);
        assert_eq!(
            route("GET", "/v1/history", Some("since=x"))
                .unwrap_err()
                .status(),
            400
        );
        // The page and its redirect hold no secret; the data does.
        assert!(Route::Root.is_public());
        assert!(Route::Dashboard.is_public());
        assert!(Route::OpenApi.is_public());
        assert!(!Route::History { since: None }.is_public());
        assert!(!Route::ClusterMigrations.is_public());
        assert!(!Route::Nodes.is_public());
        assert!(!Route::StartMigration.is_public());
    }

    #[test]
    fn the_page_is_self_contained_and_served_as_html() {
        let resp = page();
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(h[hyper::header::CONTENT_TYPE], "text/html; charset=utf-8");
        let csp = h[hyper::header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        // Nothing from elsewhere: it must work offline.
        for external in ["http://", "https://", "//cdn", "src=\"http"] {
            assert!(!PAGE.contains(external), "the page refers to `{external}`");
        }
        // What it calls exists.
        for path in [
            "/v1/nodes",
            "/v1/history",
            "/v1/cluster/migrations",
            "/v1/migrations",
        ] {
            assert!(PAGE.contains(path), "the page never calls {path}");
        }
        assert!(PAGE.contains("pointerdown") && PAGE.contains("pointerup"));
        assert!(PAGE.contains("sessionStorage") && PAGE.contains("Authorization"));
        let r = redirect("/dashboard");
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()[hyper::header::LOCATION], "/dashboard");
    }

    #[test]
    fn openapi_documents_the_dashboard_routes_and_their_types() {
        let doc = crate::cluster::api::openapi();
        for p in ["/", "/dashboard", "/v1/history", "/v1/cluster/migrations"] {
            assert!(doc["paths"].get(p).is_some(), "{p} missing");
        }
        assert_eq!(
            doc["paths"]["/dashboard"]["get"]["security"],
            serde_json::json!([])
        );
        let schemas = &doc["components"]["schemas"];
        let sample = serde_json::to_value(LoadSample {
            t_ms: 1,
            cpu_percent: 1.0,
            run_queue: 1,
            mem_available_mib: 1,
        })
        .unwrap();
        for k in sample.as_object().unwrap().keys() {
            assert!(
                schemas["LoadSample"]["properties"].get(k).is_some(),
                "LoadSample.{k}"
            );
        }
        let history = serde_json::to_value(NodeHistory {
            node: "n".into(),
            state: NodeState::Ready,
            samples: vec![],
        })
        .unwrap();
        for k in history.as_object().unwrap().keys() {
            assert!(
                schemas["NodeHistory"]["properties"].get(k).is_some(),
                "NodeHistory.{k}"
            );
        }
        let all = serde_json::to_value(ClusterMigrations {
            jobs: vec![],
            unreachable: vec![Unreachable {
                node: "n".into(),
                error: "e".into(),
            }],
        })
        .unwrap();
        for k in all.as_object().unwrap().keys() {
            assert!(
                schemas["ClusterMigrations"]["properties"].get(k).is_some(),
                "ClusterMigrations.{k}"
            );
        }
    }

    #[test]
    fn page_urls_carry_the_token_in_the_fragment() {
        assert_eq!(
            page_url("https://127.0.0.1:7470/", "abc"),
            "https://127.0.0.1:7470/dashboard#token=abc"
        );
        let text = instructions(&DashboardLink {
            url: page_url("https://127.0.0.1:7470", "abc"),
            ca: PathBuf::from("/s/tls/ca.pem"),
            node: "node-1".into(),
        });
        assert!(text.starts_with("https://127.0.0.1:7470/dashboard#token=abc\n"));
        assert!(text.contains("/s/tls/ca.pem"));
    }
}
