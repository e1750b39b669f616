//! The user tools end to end: `ferry run --on`, `top`, `lock`/`unlock`, `node block|unblock|
//! bring`, `mon`, on the default cluster.

use std::time::{Duration, Instant};

use super::{
    check, counts_on, ferry, kill_on_nodes, last_count, local_cluster_file, runs_with,
    up_with_clean_nodes, CaseResult, Outcome, Suite, BOOT_LIMIT, QUICK_LIMIT,
};

/// A counting loop that also keeps a CPU partly busy: appends its count to /root/progress
/// twice a second (the file exists on every node, so it is reopened there after a move).
/// The marker comment lets a later attempt find leftovers.
const COUNTER: &str = "# ferry-tools-counter
import time
count = 0
progress = open('/root/progress', 'a', buffering=1)
t = time.time()
while True:
    x = 0
    for i in range(20000):
        x += i
    time.sleep(0.02)
    if time.time() - t >= 0.5:
        count += 1
        progress.write('%d\\n' % count)
        t = time.time()
";

/// `ferry ARGS --file FILE`.
fn tool(file: &str, args: &[&str]) -> Result<Outcome, String> {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--file", file]);
    ferry(&all, b"", BOOT_LIMIT)
}

/// Waits until the counter on `node` counts past `n`.
fn counting_past(file: &str, node: &str, n: u64) -> Result<u64, String> {
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        let c = last_count(file, node).unwrap_or(0);
        if c > n {
            return Ok(c);
        }
        if Instant::now() > deadline {
            return Err(format!("the counter never counted past {n} on {node}"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The new pid in a `ferry migrate` summary ("(pid N there)").
fn moved_pid(out: &Outcome) -> Result<u32, String> {
    out.stdout
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no new pid in the output\n{}", out.explain()))
}

pub(crate) fn user_tools_run_lock_block_and_bring_home(_: &Suite) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    up_with_clean_nodes(file, &["node-1", "node-2", "node-3"])?;
    // What an earlier attempt may have left: its counters, a blocked node-3.
    kill_on_nodes(
        file,
        &["node-1", "node-2", "node-3"],
        "[f]erry-tools-counter",
    )?;
    tool(file, &["node", "unblock", "node-3"])?;

    // runon: NODE:PID on stdout.
    let out = tool(
        file,
        &["run", "--on", "node-2", "--", "python3", "-c", COUNTER],
    )?;
    check(out.code() == 0, "`ferry run --on node-2` starts it", &out)?;
    let pid: u32 = out
        .stdout
        .trim()
        .strip_prefix("node-2:")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("`ferry run --on` prints NODE:PID\n{}", out.explain()))?;
    if !runs_with(file, "node-2", pid, "ferry-tools-counter")? {
        return Err(format!("process {pid} does not run on node-2"));
    }
    let before = counting_past(file, "node-2", 2)?;

    // top: it is there, with CPU.
    let out = tool(file, &["top", "--once", "--interval", "3"])?;
    check(out.code() == 0, "`ferry top --once` prints a table", &out)?;
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("node-2") && l.split_whitespace().nth(1) == Some(&pid.to_string()))
        .ok_or_else(|| format!("`ferry top` lists node-2:{pid}\n{}", out.explain()))?
        .to_string();
    let cpu: f64 = row
        .split_whitespace()
        .nth(4)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no CPU% in `{row}`"))?;
    if cpu <= 0.0 {
        return Err(format!(
            "`ferry top` shows no CPU use for the counter: `{row}`"
        ));
    }

    // lock: a migration is refused, saying why; unlock.
    let process = format!("node-2:{pid}");
    let out = tool(file, &["lock", &process])?;
    check(out.code() == 0, "`ferry lock` locks it", &out)?;
    let out = tool(file, &["migrate", &process, "node-1"])?;
    check(
        out.code() != 0
            && out.stderr.contains("is locked")
            && out.stderr.contains(&format!("ferry unlock {process}")),
        "migrating a locked process is refused with the reason",
        &out,
    )?;
    let out = ferry(&["ps", file], b"", QUICK_LIMIT)?;
    check(
        out.code() == 0 && out.stdout.contains(&pid.to_string()),
        "`ferry ps` still lists it",
        &out,
    )?;
    let out = tool(file, &["unlock", &process])?;
    check(out.code() == 0, "`ferry unlock` unlocks it", &out)?;

    // block: a move to node-3 is refused at once; the process counts on at node-2.
    let out = tool(file, &["node", "block", "node-3"])?;
    check(out.code() == 0, "`ferry node block node-3`", &out)?;
    let out = tool(file, &["mon", "--once"])?;
    check(
        out.code() == 0
            && ["node-1", "node-2", "node-3"]
                .iter()
                .all(|n| out.stdout.lines().any(|l| l.starts_with(n)))
            && out.stdout.contains("(blocked)"),
        "`ferry mon --once` shows the three nodes, node-3 blocked",
        &out,
    )?;
    let count = last_count(file, "node-2")?;
    let out = tool(file, &["migrate", &process, "node-3"])?;
    check(
        out.code() != 0
            && out.stderr.contains("node-3 refuses arriving processes")
            && out.stderr.contains("ferry node unblock node-3"),
        "migrating to a blocked node is refused with the reason",
        &out,
    )?;
    // No job was made: the refusal came before any freeze or survey.
    check(
        !out.stderr.contains("ferry: migration "),
        "nothing was frozen or surveyed for the refused move",
        &out,
    )?;
    counts_on(file, "node-2", count.max(before), "after the refused move")?;
    if !runs_with(file, "node-2", pid, "ferry-tools-counter")? {
        return Err("the refused process no longer runs on node-2".into());
    }
    let out = tool(file, &["node", "unblock", "node-3"])?;
    check(out.code() == 0, "`ferry node unblock node-3`", &out)?;

    // Away to node-3, then `node bring node-2` calls it home.
    let count = last_count(file, "node-2")?;
    let out = tool(file, &["migrate", &process, "node-3"])?;
    check(out.code() == 0, "`ferry migrate` moves it to node-3", &out)?;
    let pid3 = moved_pid(&out)?;
    counts_on(file, "node-3", count, "after moving to node-3")?;
    let count = last_count(file, "node-3")?;
    let out = tool(file, &["node", "bring", "node-2"])?;
    check(
        out.code() == 0 && out.stdout.contains(&format!("moved node-3:{pid3}")),
        "`ferry node bring node-2` brings it back",
        &out,
    )?;
    let pid2 = moved_pid(&out)?;
    counts_on(file, "node-2", count, "after coming home")?;
    if runs_with(file, "node-3", pid3, "ferry-tools-counter")? {
        return Err("a copy of the brought process still runs on node-3".into());
    }
    let out = ferry(&["ps", file], b"", QUICK_LIMIT)?;
    check(
        out.stdout.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[0] == "node-2"
                && f[1] == pid2.to_string()
                && f[2] == "node-2"
                && f[3] == "2"
        }),
        "`ferry ps` shows it on node-2, home node-2, moved twice",
        &out,
    )?;

    // A node that does not exist.
    let out = tool(file, &["run", "--on", "node-9", "--", "true"])?;
    check(
        out.code() == 2
            && out.stderr.contains("no node `node-9`")
            && out.stderr.contains("node-1, node-2, node-3"),
        "`ferry run --on node-9` says there is no such node and lists the nodes",
        &out,
    )?;
    // A program that does not exist: 127, like a shell.
    let out = tool(
        file,
        &["run", "--on", "node-1", "--", "ferry-no-such-program"],
    )?;
    check(
        out.code() == 127 && out.stderr.contains("command not found"),
        "a missing program exits 127 with the reason",
        &out,
    )?;

    let _ = ferry(
        &[
            "ssh",
            "node-2",
            "--file",
            file,
            "--",
            "kill",
            &pid2.to_string(),
        ],
        b"",
        QUICK_LIMIT,
    );
    let out = ferry(&["down", file], b"", BOOT_LIMIT)?;
    check(out.code() == 0, "`ferry down` stops the cluster", &out)
}
