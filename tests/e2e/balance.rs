//! The automatic load balancer, end to end: CPU-bound processes started on one node stay there
//! while the balancer is off, and spread over the cluster by themselves once it is on, each
//! keeping its count.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry::cluster::api::{NodeState, Process};
use ferry::cluster::control::{self, Cluster};

use super::{
    check, ferry, kill_on_nodes, local_cluster_file, up_with_clean_nodes, CaseResult, QUICK_LIMIT,
};

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
/// CPU-bound jobs started on node-1 (2 vCPUs).
const JOBS: u32 = 4;

/// A CPU-bound job: counts as fast as it can and appends its count to /root/cN.progress
/// about twice a second. The file is opened once: after a move the process writes to the
/// file of the same name on its new node.
const CPU_JOB: &str = r#"
import sys, time
n = int(sys.argv[1])
out = open('/root/c%d.progress' % n, 'a', buffering=1)
count = 0
mark = time.time()
while True:
    count += 1
    if count % 5000 == 0 and time.time() - mark >= 0.5:
        out.write('%d\n' % count)
        mark = time.time()
"#;

fn ssh(file: &str, node: &str, script: &str, stdin: &[u8]) -> Result<String, String> {
    let out = ferry(
        &["ssh", node, "--file", file, "--", "sh", "-c", script],
        stdin,
        QUICK_LIMIT,
    )?;
    check(out.code() == 0, &format!("on {node}: `{script}`"), &out)?;
    Ok(out.stdout)
}

/// The jobs' processes wherever they run: (node, job number, process).
/// A node whose daemon says its guest is down (it died, say) fails the poll at once: the
/// jobs could not reach it any more.
fn jobs(cluster: &Cluster) -> Result<Vec<(String, u32, Process)>, String> {
    super::platform_check()?;
    let statuses = cluster
        .statuses()
        .map_err(|e| format!("asking the nodes' states: {e}"))?;
    if let Some(down) = statuses.iter().find(|s| {
        s.state == NodeState::Down
            && !s
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with(control::NO_ANSWER))
    }) {
        return Err(format!(
            "{} is down: {}",
            down.name,
            down.detail.as_deref().unwrap_or("no reason given")
        ));
    }
    let all = cluster
        .processes()
        .map_err(|e| format!("listing processes: {e}"))?;
    Ok(all
        .into_iter()
        .filter(|(_, p)| p.command.contains("/root/c.py"))
        .filter_map(|(node, p)| {
            let n = p.command.split_whitespace().last()?.parse().ok()?;
            Some((node, n, p))
        })
        .collect())
}

/// The counts job `n` wrote on `node`: (first, last).
fn counts(file: &str, node: &str, n: u32) -> Result<Option<(u64, u64)>, String> {
    let text = ssh(file, node, &format!("cat /root/c{n}.progress"), b"")?;
    let v: Vec<u64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    Ok(v.first().zip(v.last()).map(|(a, b)| (*a, *b)))
}

fn balancer(file: &str, action: &str) -> Result<String, String> {
    let out = ferry(&["balancer", action, "--file", file], b"", QUICK_LIMIT)?;
    check(out.code() == 0, &format!("`ferry balancer {action}`"), &out)?;
    Ok(out.stdout)
}

fn stop_jobs(file: &str) {
    let _ = kill_on_nodes(file, &NODES, "[c][.]py");
}

pub(crate) fn cpu_bound_processes_spread_with_the_balancer_on_and_stay_with_it_off(
    _: &super::Suite,
) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    up_with_clean_nodes(file, &NODES)?;
    stop_jobs(file);
    let result = spread(file);
    stop_jobs(file);
    // The cluster file's policy again, for the cases after this one.
    let _ = balancer(file, "on");
    result
}

fn spread(file: &str) -> CaseResult {
    let cluster = Cluster::load(file.as_ref()).map_err(|e| e.to_string())?;
    let off = balancer(file, "off")?;
    for node in NODES {
        if !off.contains(&format!("{node}: balancer off")) {
            return Err(format!("`ferry balancer off` did not reach {node}:\n{off}"));
        }
    }
    start_cpu_jobs(file, &NODES, JOBS)?;

    // Off: for longer than the residence time and many intervals, they stay on node-1,
    // although node-1 counts them as CPU-bound.
    std::thread::sleep(Duration::from_secs(40));
    let placed = jobs(&cluster)?;
    let numbers: Vec<u32> = placed.iter().map(|(_, n, _)| *n).collect();
    if placed.len() != JOBS as usize || placed.iter().any(|(node, _, _)| node != "node-1") {
        return Err(format!(
            "with the balancer off, the {JOBS} jobs should all run on node-1: {:?}",
            placed
                .iter()
                .map(|(node, n, p)| format!("job {n} pid {} on {node}", p.pid))
                .collect::<Vec<_>>()
        ));
    }
    let shown = balancer(file, "show")?;
    let busy_line = shown
        .lines()
        .find(|l| l.starts_with("node-1:"))
        .unwrap_or_default();
    if !busy_line.contains(&format!("{JOBS} CPU-bound processes")) {
        return Err(format!(
            "node-1 should count its {JOBS} jobs as CPU-bound ({numbers:?} run there):\n{shown}"
        ));
    }
    let mut before = HashMap::new();
    for n in 1..=JOBS {
        let (_, last) = counts(file, "node-1", n)?
            .ok_or_else(|| format!("job {n} wrote no count on node-1"))?;
        before.insert(n, last);
    }

    // On: they spread by themselves.
    let started = Instant::now();
    balancer(file, "on")?;
    let limit = Duration::from_secs(300);
    let spread = loop {
        let now = jobs(&cluster)?;
        let everywhere = NODES
            .iter()
            .all(|node| now.iter().any(|(at, _, _)| at == node));
        if everywhere && now.len() == JOBS as usize {
            break now;
        }
        if started.elapsed() > limit {
            return Err(format!(
                "with the balancer on, the jobs did not reach every node within {} s: {:?}\n{}",
                limit.as_secs(),
                now.iter()
                    .map(|(node, n, _)| format!("job {n} on {node}"))
                    .collect::<Vec<_>>(),
                balancer(file, "show").unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    eprintln!(
        "e2e: the jobs reached every node {:.0} s after the balancer was switched on: {:?}",
        started.elapsed().as_secs_f64(),
        spread
            .iter()
            .map(|(node, n, _)| format!("job {n} on {node}"))
            .collect::<Vec<_>>()
    );

    // Settled: a while later no job moved more than a few times, and all still run.
    std::thread::sleep(Duration::from_secs(30));
    let settled = jobs(&cluster)?;
    if settled.len() != JOBS as usize {
        return Err(format!("a job was lost: {settled:?}"));
    }
    for (node, n, p) in &settled {
        if p.moves > 3 {
            return Err(format!(
                "job {n} moved {} times (now on {node}): the balancer ping-pongs\n{}",
                p.moves,
                balancer(file, "show").unwrap_or_default()
            ));
        }
        if node == "node-1" {
            continue;
        }
        if p.home.as_deref() != Some("node-1") {
            return Err(format!(
                "job {n} on {node} should show node-1 as its home: {p:?}"
            ));
        }
        // Its count went on from where it was on node-1, not from zero.
        let (first, last) =
            counts(file, node, *n)?.ok_or_else(|| format!("job {n} writes no count on {node}"))?;
        if first < before[n] || last <= first {
            return Err(format!(
                "job {n} on {node} counts {first}..{last}; on node-1 it had reached {}",
                before[n]
            ));
        }
    }
    let per_node: Vec<String> = NODES
        .iter()
        .map(|node| {
            let k = settled.iter().filter(|(at, _, _)| at == node).count();
            format!("{node}: {k}")
        })
        .collect();
    eprintln!("e2e: settled as {}", per_node.join(", "));
    Ok(())
}

/// Holds `argv[1]` MiB of written (resident) memory and sleeps.
const MEMORY_JOB: &str = r#"
import sys, time
held = bytearray(b'm') * (int(sys.argv[1]) << 20)
while True:
    time.sleep(1)
"#;

/// Processes holding memory on node-1, started one after the other: node-1's available memory
/// falls under the low-water mark, and the balancer sends one of them away until it is above
/// it again.
pub(crate) fn a_node_short_of_memory_ushers_a_process_away(_: &super::Suite) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    up_with_clean_nodes(file, &NODES)?;
    let result = usher(file);
    let _ = kill_on_nodes(file, &NODES, "[m][.]py");
    let _ = ferry(
        &[
            "balancer",
            "on",
            "--memory-low-percent",
            "10",
            "--file",
            file,
        ],
        b"",
        QUICK_LIMIT,
    );
    result
}

fn usher(file: &str) -> CaseResult {
    let cluster = Cluster::load(file.as_ref()).map_err(|e| e.to_string())?;
    // 40% of the guest's memory as the low-water mark, so that two processes of 120 MiB
    // cross it on a 512 MiB node, a peer has room for one of them, and the guest keeps enough
    // free memory not to thrash.
    let out = ferry(
        &[
            "balancer",
            "on",
            "--memory-low-percent",
            "40",
            "--residence-s",
            "5",
            "--file",
            file,
        ],
        b"",
        QUICK_LIMIT,
    )?;
    check(
        out.code() == 0,
        "`ferry balancer on --memory-low-percent 40`",
        &out,
    )?;
    for node in NODES {
        ssh(
            file,
            node,
            "cat > /root/m.py; touch /root/m.out",
            MEMORY_JOB.as_bytes(),
        )?;
    }
    for _ in 0..2 {
        ssh(
            file,
            "node-1",
            "setsid python3 /root/m.py 120 </dev/null >/root/m.out 2>&1 & sleep 8",
            b"",
        )?;
    }
    let started = Instant::now();
    let limit = Duration::from_secs(180);
    loop {
        let all = cluster.processes().map_err(|e| e.to_string())?;
        let held: Vec<&(String, Process)> = all
            .iter()
            .filter(|(_, p)| p.command.contains("/root/m.py"))
            .collect();
        // Not one still being rebuilt at its destination (stopped under the agent's ptrace,
        // `t`): its origin is recorded once it runs.
        let away: Vec<_> = held
            .iter()
            .filter(|(n, p)| n != "node-1" && p.state != "t")
            .collect();
        if let Some((node, p)) = away.first() {
            check_moved(node, p)?;
            eprintln!(
                "e2e: node-1, short of memory, sent a {} MiB process to {node} after {:.0} s",
                p.rss_kib >> 10,
                started.elapsed().as_secs_f64()
            );
            // One was enough: node-1 is above its mark again and keeps the other.
            std::thread::sleep(Duration::from_secs(15));
            let all = cluster.processes().map_err(|e| e.to_string())?;
            let on_1 = all
                .iter()
                .filter(|(n, p)| n == "node-1" && p.command.contains("/root/m.py"))
                .count();
            if on_1 != 1 {
                return Err(format!(
                    "node-1 should keep one of the two processes, it has {on_1}\n{}",
                    balancer(file, "show").unwrap_or_default()
                ));
            }
            return Ok(());
        }
        if held.len() < 2 && started.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "the two memory holders should run (the guest may have run out of memory): {held:?}"
            ));
        }
        if started.elapsed() > limit {
            return Err(format!(
                "node-1 ran short of memory and nothing moved within {} s\n{}",
                limit.as_secs(),
                balancer(file, "show").unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn check_moved(node: &str, p: &Process) -> CaseResult {
    if p.home.as_deref() != Some("node-1") || p.moves == 0 {
        return Err(format!(
            "the process on {node} should have moved from node-1: {p:?}"
        ));
    }
    if p.rss_kib < 110 << 10 {
        return Err(format!(
            "the process on {node} should still hold its 120 MiB: {p:?}"
        ));
    }
    Ok(())
}

/// With the balancer on, `jobs` CPU-bound jobs started on the first of `nodes` reach `target`
/// by themselves within a few minutes; then they are ended.
/// Starts `count` CPU-bound jobs (`c.py 1..=count`) on `nodes[0]`. Every one of `nodes` gets
/// the jobs' files first, as the node they start on has them: a job that moves opens its
/// files again by name there.
fn start_cpu_jobs(file: &str, nodes: &[&str], count: u32) -> CaseResult {
    let prep = (1..=count)
        .map(|n| format!("rm -f /root/c{n}.progress; touch /root/c{n}.progress /root/c{n}.out"))
        .collect::<Vec<_>>()
        .join("; ");
    for node in nodes {
        ssh(
            file,
            node,
            &format!("cat > /root/c.py; {prep}"),
            CPU_JOB.as_bytes(),
        )?;
    }
    let start = (1..=count)
        .map(|n| format!("setsid python3 /root/c.py {n} </dev/null >/root/c{n}.out 2>&1 &"))
        .collect::<Vec<_>>()
        .join(" ");
    ssh(file, nodes[0], &start, b"").map(drop)
}

pub(crate) fn jobs_reach(file: &str, nodes: &[&str], count: u32, target: &str) -> CaseResult {
    let cluster = Cluster::load(file.as_ref()).map_err(|e| e.to_string())?;
    balancer(file, "on")?;
    start_cpu_jobs(file, nodes, count)?;
    let started = Instant::now();
    let limit = Duration::from_secs(240);
    let result = loop {
        let now = jobs(&cluster)?;
        if let Some((_, n, p)) = now.iter().find(|(at, _, _)| at == target) {
            eprintln!(
                "e2e: job {n} (pid {}) reached {target} {:.0} s after the jobs started",
                p.pid,
                started.elapsed().as_secs_f64()
            );
            break Ok(());
        }
        if started.elapsed() > limit {
            break Err(format!(
                "no job reached {target} within {} s: {:?}\n{}",
                limit.as_secs(),
                now.iter()
                    .map(|(node, n, _)| format!("job {n} on {node}"))
                    .collect::<Vec<_>>(),
                balancer(file, "show").unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    let _ = kill_on_nodes(file, nodes, "[c][.]py");
    result
}
