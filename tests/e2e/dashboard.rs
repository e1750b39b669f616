//! The dashboard in headless Chromium (Debian's `chromium` and `chromium-driver`), driven over
//! WebDriver's HTTP/JSON protocol by the small client below: the page lists the nodes and a
//! process, a process dragged onto another node moves there, and a screenshot is kept in
//! target/e2e-artifacts/.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    api_get, check, cluster_token, ferry, kill_on_nodes, last_count, local_cluster_file,
    start_python, up_with_clean_nodes, CaseResult, Suite, BOOT_LIMIT, QUICK_LIMIT,
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A small process to move: 16 MiB of memory, counting to /root/progress twice a second.
const COUNTER: &str = r#"import time
buf = bytearray(16 << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
count = 0
progress = open('/root/progress', 'a', buffering=1)
while True:
    count += 1
    progress.write('%d\n' % count)
    time.sleep(0.5)
"#;

/// Installs Chromium and its WebDriver from Debian if they are missing (as root; a fresh CI
/// machine has neither).
fn ensure_chromium() -> CaseResult {
    if PathBuf::from(CHROMIUM).exists() && PathBuf::from(CHROMEDRIVER).exists() {
        return Ok(());
    }
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("id -u: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err(format!(
            "{CHROMIUM} or {CHROMEDRIVER} is missing and this test does not run as root to install them: `sudo apt-get install chromium chromium-driver`"
        ));
    }
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "chromium",
                "chromium-driver",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    eprintln!("e2e: installing chromium and chromium-driver with apt-get");
    let mut out = install().map_err(|e| format!("apt-get: {e}"))?;
    if !out.status.success() {
        // A fresh machine's package lists may be missing or stale.
        let _ = Command::new("apt-get")
            .arg("update")
            .stdin(Stdio::null())
            .output();
        out = install().map_err(|e| format!("apt-get: {e}"))?;
    }
    if !out.status.success() {
        return Err(format!(
            "apt-get install chromium chromium-driver failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// One HTTP/1.1 exchange with chromedriver on 127.0.0.1:`port`: the status and the JSON body.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("chromedriver on port {port}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes())
        .map_err(|e| format!("{method} {path}: {e}"))?;
    // chromedriver answers `Connection: close` but keeps the connection open: read the head,
    // then as much body as it announces.
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let read_more =
        |tcp: &mut TcpStream, raw: &mut Vec<u8>, buf: &mut [u8]| -> Result<bool, String> {
            let n = tcp.read(buf).map_err(|e| format!("{method} {path}: {e}"))?;
            raw.extend_from_slice(&buf[..n]);
            Ok(n > 0)
        };
    let split = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if !read_more(&mut tcp, &mut raw, &mut buf)? {
            return Err(format!("{method} {path}: no HTTP answer"));
        }
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: bad status line: {head}"))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name))
            .map(|(_, v)| v.trim().to_string())
    };
    let start = split + 4;
    let payload = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while !raw[start..].ends_with(b"0\r\n\r\n") {
            if !read_more(&mut tcp, &mut raw, &mut buf)? {
                break;
            }
        }
        dechunk(&raw[start..])?
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{method} {path}: no Content-Length: {head}"))?;
        while raw.len() < start + len {
            if !read_more(&mut tcp, &mut raw, &mut buf)? {
                return Err(format!("{method} {path}: the answer ended early"));
            }
        }
        raw[start..start + len].to_vec()
    };
    let value = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&payload).map_err(|e| {
            format!(
                "{method} {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&payload)
            )
        })?
    };
    Ok((status, value))
}

/// A chunked HTTP body, joined.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk without its size line")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size `{size_text}`"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err("a chunk shorter than its size".into());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

/// Standard base64 (a screenshot), decoded.
fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return Err(format!("`{}` is not base64", c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// chromedriver, started on a free port; stopped (and its browser with it) when dropped.
struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    fn start() -> Result<Self, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {CHROMEDRIVER}: {e}"))?;
        let driver = ChromeDriver { child, port };
        let deadline = Instant::now() + QUICK_LIMIT;
        loop {
            if let Ok((200, v)) = http(port, "GET", "/status", None) {
                if v["value"]["ready"] == json!(true) {
                    return Ok(driver);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("chromedriver did not answer on port {port}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A headless Chromium with a fresh profile in `profile`.
    fn session(&self, profile: &std::path::Path) -> Result<Session, String> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    // The cluster CA is not in Chromium's store (test only).
                    "--ignore-certificate-errors",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let (status, v) = http(self.port, "POST", "/session", Some(&caps))?;
        let id = v["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no WebDriver session ({status}): {v}"))?;
        Ok(Session {
            port: self.port,
            id: id.to_string(),
        })
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session; ended when dropped.
struct Session {
    port: u16,
    id: String,
}

impl Session {
    /// A WebDriver command; its `value`, or the error it answered.
    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Result<Value, String> {
        let path = format!("/session/{}{what}", self.id);
        let (status, v) = http(self.port, method, &path, body.as_ref())?;
        if status != 200 {
            return Err(format!(
                "WebDriver {method} {what}: {status} {}: {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    fn navigate(&self, url: &str) -> Result<(), String> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .map(|_| ())
    }

    /// Runs `script` (a function body) in the page; what it returns.
    fn run(&self, script: &str) -> Result<Value, String> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn find(&self, css: &str) -> Result<String, String> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no element id for {css}: {v}"))
    }

    /// Presses the mouse on element `from`, moves it onto element `to` in small steps, and
    /// lets go: what a user's drag does.
    fn drag(&self, from: &str, to: &str) -> Result<(), String> {
        let actions = json!({"actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [
                {"type": "pointerMove", "duration": 0, "origin": {ELEMENT: from}, "x": 0, "y": 0},
                {"type": "pointerDown", "button": 0},
                {"type": "pointerMove", "duration": 200, "origin": {ELEMENT: from}, "x": 20, "y": 10},
                {"type": "pointerMove", "duration": 600, "origin": {ELEMENT: to}, "x": 0, "y": 0},
                {"type": "pointerUp", "button": 0}
            ]
        }]});
        self.cmd("POST", "/actions", Some(actions))?;
        self.cmd("DELETE", "/actions", None).map(|_| ())
    }

    /// A PNG of the window.
    fn screenshot(&self) -> Result<Vec<u8>, String> {
        let v = self.cmd("GET", "/screenshot", None)?;
        base64_decode(v.as_str().ok_or("the screenshot is not a string")?)
    }

    /// Polls `script` until it returns something other than null or false, for up to `limit`.
    fn wait_for(&self, what: &str, limit: Duration, script: &str) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.run(script)?;
            if !v.is_null() && v != json!(false) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                let page = self
                    .run("return document.body.innerText")
                    .unwrap_or_default();
                return Err(format!(
                    "the dashboard never showed {what} within {} s; it shows:\n{}",
                    limit.as_secs(),
                    page.as_str().unwrap_or("")
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

/// Where the suite keeps files for people to look at.
fn artifacts() -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("e2e-artifacts");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn save_screenshot(session: &Session, name: &str) -> Result<PathBuf, String> {
    let png = session.screenshot()?;
    if !png.starts_with(b"\x89PNG") {
        return Err("the screenshot is not a PNG".into());
    }
    let path = artifacts()?.join(name);
    std::fs::write(&path, png).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("e2e: dashboard screenshot: {}", path.display());
    Ok(path)
}

pub(super) fn dashboard_lists_nodes_and_migrates_a_dragged_process(_: &Suite) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    up_with_clean_nodes(file, &["node-1", "node-2", "node-3"])?;
    kill_on_nodes(file, &["node-1", "node-2", "node-3"], "[d][.]py")?;

    // The page needs no token; the data behind it does.
    let (status, body) = api_get(file, "node-1", "/dashboard", None, None)?;
    if status != 200 || !body.contains("<title>ferry dashboard") {
        return Err(format!("GET /dashboard without a token: {status}\n{body}"));
    }
    let (status, body) = api_get(file, "node-1", "/v1/history", None, None)?;
    if status != 401 {
        return Err(format!(
            "GET /v1/history without a token must be refused: {status}\n{body}"
        ));
    }

    // `ferry dashboard` gives the address, with the token, and the CA to trust.
    let token = cluster_token(file)?;
    let out = ferry(&["dashboard", "--file", file], b"", QUICK_LIMIT)?;
    let url = out.stdout.lines().next().unwrap_or("").trim().to_string();
    check(
        out.code() == 0
            && url.ends_with(&format!("/dashboard#token={token}"))
            && out.stdout.contains("ca.pem"),
        "`ferry dashboard` prints the page's address with the token and the CA to trust",
        &out,
    )?;

    let pid = start_python(file, "node-1", "d", COUNTER)?;
    let deadline = Instant::now() + BOOT_LIMIT;
    while last_count(file, "node-1").unwrap_or(0) < 3 {
        if Instant::now() > deadline {
            return Err("the counter never started counting on node-1".into());
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    ensure_chromium()?;
    let driver = ChromeDriver::start()?;
    let profile = std::env::temp_dir().join(format!("ferry-e2e-chromium-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let session = driver.session(&profile)?;
    let result = drive(&session, file, &url, pid);
    if result.is_err() {
        let _ = save_screenshot(&session, "dashboard-failed.png");
    }
    drop(session);
    drop(driver);
    let _ = std::fs::remove_dir_all(&profile);
    result
}

/// The browser part: the page lists the nodes and the process, the drag moves it, the page
/// shows the finished move.
fn drive(session: &Session, file: &str, url: &str, pid: u32) -> CaseResult {
    session.navigate(url)?;
    let row = format!(".proc[data-node=\"node-1\"][data-pid=\"{pid}\"]");
    session.wait_for(
        &format!("the three nodes and process {pid} on node-1"),
        Duration::from_secs(60),
        &format!(
            "const names = [...document.querySelectorAll('#nodes .node')].map(n => n.dataset.node).join(',');
             const row = document.querySelector('{row}');
             return names === 'node-1,node-2,node-3' && row !== null && row.textContent.includes('d.py');"
        ),
    )?;
    let shown = session.run(
        "return [location.href, [...document.querySelectorAll('#nodes .node .name')].map(n => n.textContent).join(','),
                 [...document.querySelectorAll('#nodes .node .state')].map(n => n.textContent).join(',')]",
    )?;
    if shown[0].as_str().unwrap_or("token").contains("token")
        || shown[1] != json!("node-1,node-2,node-3")
        || shown[2] != json!("ready,ready,ready")
    {
        return Err(format!(
            "the page must show three ready nodes, with the token out of its address: {shown}"
        ));
    }

    let before = last_count(file, "node-1")?;
    // Notes whether the page showed the move in flight, with a progress bar, before it ended.
    session.run(&format!(
        "document.querySelector('{row}').scrollIntoView({{block: 'center'}});
         window.sawProgress = false;
         new MutationObserver(() => {{
             if (document.querySelector('#inflight .job[data-job] .bar')) window.sawProgress = true;
         }}).observe(document.getElementById('inflight'), {{childList: true, subtree: true}});
         return true"
    ))?;
    let from = session.find(&row)?;
    let to = session.find("[data-drop=\"node-2\"]")?;
    session.drag(&from, &to)?;

    // The move shows up in the history, finished, with its downtime.
    let finished = session.wait_for(
        "the dragged process's migration finished in the history",
        BOOT_LIMIT,
        &format!(
            "const r = document.querySelector('#history tr[data-pid=\"{pid}\"]');
             if (r === null) return null;
             return [r.dataset.state, r.querySelector('.downtime').textContent, r.textContent,
                     [...document.querySelectorAll('#errors .message')].map(m => m.textContent).join(' | ')];"
        ),
    )?;
    let downtime = finished[1].as_str().unwrap_or("");
    if finished[0] != json!("done")
        || !downtime.ends_with(" ms")
        || downtime.trim_end_matches(" ms").parse::<u64>().is_err()
        || !finished[2].as_str().unwrap_or("").contains("node-2")
    {
        return Err(format!(
            "the history must show the move done, to node-2, with a downtime in ms: {finished}"
        ));
    }

    if session.run("return window.sawProgress")? != json!(true) {
        return Err("the page never showed the move in flight with a progress bar".into());
    }

    // It runs on node-2, came from node-1, and counts on.
    let token = cluster_token(file)?;
    let (status, body) = api_get(
        file,
        "node-1",
        "/v1/nodes/node-2/processes",
        Some(token),
        None,
    )?;
    let list: Vec<ferry::cluster::api::Process> =
        serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    let moved = list
        .iter()
        .find(|p| p.command.contains("d.py"))
        .ok_or_else(|| format!("node-2 does not run the counter: {body}"))?;
    if moved.home.as_deref() != Some("node-1") || moved.moves != 1 {
        return Err(format!(
            "the moved process must say it came from node-1, once: {moved:?}"
        ));
    }
    super::counts_on(file, "node-2", before, "after the dashboard moved it")?;

    // The page lists it under node-2 now.
    session.wait_for(
        "the moved process under node-2",
        Duration::from_secs(30),
        &format!(
            "const r = document.querySelector('.proc[data-node=\"node-2\"][data-pid=\"{}\"]');
             return r !== null && r.textContent.includes('from node-1');",
            moved.pid
        ),
    )?;
    save_screenshot(session, "dashboard.png")?;
    let _ = ferry(
        &[
            "ssh",
            "node-2",
            "--file",
            file,
            "--",
            "kill",
            &moved.pid.to_string(),
        ],
        b"",
        QUICK_LIMIT,
    );
    Ok(())
}
