//! Discovery: a node started with one member's address joins the running cluster, takes
//! processes, and is seen leaving, coming back and dying.

use super::*;
use ferry::cluster::api::{NodeState, NodeStatus};

/// Every node's `/v1/nodes` until `ok` holds for each answer (or `limit` passes); the last
/// answers.
fn nodes_agree(
    file: &str,
    asked: &[&str],
    limit: Duration,
    ok: impl Fn(&[NodeStatus]) -> bool,
) -> Result<(), String> {
    let token = cluster_token(file)?;
    let deadline = Instant::now() + limit;
    loop {
        let mut answers = Vec::new();
        let mut all = true;
        for node in asked {
            let (status, body) = api_get(file, node, "/v1/nodes", Some(token.clone()), None)?;
            let listed: Vec<NodeStatus> = serde_json::from_str(&body).unwrap_or_default();
            all &= status == 200 && ok(&listed);
            answers.push(format!("{node}: {status}\n{body}"));
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(answers.join("\n"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Node `name` in a `/v1/nodes` answer.
fn listed<'a>(nodes: &'a [NodeStatus], name: &str) -> Option<&'a NodeStatus> {
    nodes.iter().find(|n| n.name == name)
}

/// `POST path` on node `node`'s API with the cluster's token: the status.
fn api_post(file: &str, node: &str, path: &str) -> Result<u16, String> {
    use ferry::cluster::control::Cluster;
    let cluster = Cluster::load(Path::new(file)).map_err(|e| e.to_string())?;
    let n = cluster.node_named(node).map_err(|e| e.to_string())?;
    let client = cluster.client(n).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(client.call("POST", path))
        .map(|(status, _)| status)
        .map_err(|e| e.to_string())
}

/// `ferry join` of node-4 through node-2's peer address alone, checked.
fn join_node_4(file: &str) -> CaseResult {
    let t = Instant::now();
    let out = ferry(
        &["join", file, "--name", "node-4", "--via", "127.0.0.1:7571"],
        b"",
        BOOT_LIMIT,
    )?;
    check(
        out.code() == 0
            && out
                .stderr
                .contains("node-4 joins cluster local through node-2")
            && out.stdout.lines().any(|l| {
                l.starts_with("node-4") && l.contains("10.77.1.14") && l.contains(" ready ")
            }),
        "`ferry join` starts node-4 and shows it ready",
        &out,
    )?;
    println!("e2e: node-4 joined in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The three-node cluster up, its nodes clean, run by daemons that know gossip; a node-4 that
/// an earlier attempt left joined is forgotten (`up_with_clean_nodes`).
fn three_gossiping_nodes(file: &str) -> Result<ferry::cluster::control::Cluster, String> {
    // Daemons of a build without gossip (they do not know /v1/members): the cluster starts
    // afresh.
    let cluster =
        ferry::cluster::control::Cluster::load(Path::new(file)).map_err(|e| e.to_string())?;
    let stale = cluster_token(file).is_ok_and(|token| {
        matches!(api_get(file, "node-1", "/v1/members", Some(token), None), Ok((status, _)) if status != 200)
    });
    if stale {
        let out = ferry(&["down", file], b"", BOOT_LIMIT)?;
        check(out.code() == 0, "`ferry down` clears what was left", &out)?;
    }
    up_with_clean_nodes(file, &["node-1"])?;
    Ok(cluster)
}

/// `ferry down`: the cluster stops, nothing of it is left running, and node-4 is forgotten, so
/// the plain three-node cluster is what the next case starts.
fn down_forgets_node_4(s: &Suite, file: &str) -> CaseResult {
    let out = ferry(&["down", file], b"", BOOT_LIMIT)?;
    check(out.code() == 0, "`ferry down` stops the cluster", &out)?;
    let left = cluster_leftovers(s)?;
    if !left.trim().is_empty() {
        return Err(format!("left after `ferry down`:\n{left}"));
    }
    let cluster =
        ferry::cluster::control::Cluster::load(Path::new(file)).map_err(|e| e.to_string())?;
    if cluster.config.nodes.len() != 3 {
        return Err("`ferry down` must forget node-4".into());
    }
    Ok(())
}

/// Membership: bad joins are refused, node-4 joins through one member's peer address, every
/// member lists it, and its leaving, return and death are seen by the others. No workload
/// runs: the moves to a joined node are the next case's, so that a stall of the nested host in
/// one part does not cost the other's time again.
pub(crate) fn a_fourth_node_joins_from_one_members_address(s: &Suite) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    three_gossiping_nodes(file)?;

    // Bad joins say why and start nothing.
    let out = ferry(
        &["join", file, "--name", "node-2", "--via", "127.0.0.1:7571"],
        b"",
        QUICK_LIMIT,
    )?;
    check(
        out.code() == 2 && out.stderr.contains("`node-2` is taken"),
        "a taken name exits 2 and says so",
        &out,
    )?;
    let out = ferry(
        &["join", file, "--name", "node-4", "--via", "127.0.0.1:7599"],
        b"",
        QUICK_LIMIT,
    )?;
    check(
        out.code() == 2
            && out
                .stderr
                .contains("no member of cluster local has that peer address"),
        "an address no member has exits 2 and lists the members'",
        &out,
    )?;

    // node-4 joins through node-2's peer address alone.
    join_node_4(file)?;

    // Every member lists it, ready, with the settings the cluster gave it.
    let every = ["node-1", "node-2", "node-3", "node-4"];
    nodes_agree(file, &every, QUICK_LIMIT, |nodes| {
        nodes.len() == 4
            && nodes.iter().all(|n| n.state == NodeState::Ready)
            && listed(nodes, "node-4")
                .is_some_and(|n| n.address == "10.77.1.14" && n.vcpus == 2 && n.memory_mib == 512)
    })
    .map_err(|e| format!("every member must list node-4 as ready:\n{e}"))?;
    let out = ferry(&["status", file, "--json"], b"", QUICK_LIMIT)?;
    check(
        out.code() == 0 && out.stdout.matches("\"name\"").count() == 4,
        "`ferry status` lists the four nodes, all ready",
        &out,
    )?;

    // node-4 stops: it says it leaves, and every other member shows it down, with why.
    let status = api_post(file, "node-4", "/v1/shutdown")?;
    if status != 202 {
        return Err(format!("POST /v1/shutdown on node-4 answered {status}"));
    }
    let others = ["node-1", "node-2", "node-3"];
    nodes_agree(file, &others, QUICK_LIMIT, |nodes| {
        nodes.len() == 4
            && listed(nodes, "node-4").is_some_and(|n| {
                n.state == NodeState::Down
                    && n.detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with("left the cluster"))
            })
    })
    .map_err(|e| format!("the others must show node-4 down, left:\n{e}"))?;

    // `up` brings it back (it stays part of the cluster until `down`), and the others see it
    // ready again; then it dies without a word, and gossip declares it down.
    let out = ferry(&["up", file], b"", BOOT_LIMIT)?;
    check(
        out.code() == 0 && out.stderr.contains("node-4 ready after"),
        "`ferry up` starts node-4 again",
        &out,
    )?;
    nodes_agree(file, &others, QUICK_LIMIT, |nodes| {
        listed(nodes, "node-4").is_some_and(|n| n.state == NodeState::Ready)
    })
    .map_err(|e| format!("the others must see node-4 back:\n{e}"))?;
    let out = kill_daemon(s, "node-4")?;
    check(out.code() == 0, "node-4's daemon is killed", &out)?;
    let t = Instant::now();
    nodes_agree(file, &others, QUICK_LIMIT, |nodes| {
        listed(nodes, "node-4").is_some_and(|n| {
            n.state == NodeState::Down
                && n.detail
                    .as_deref()
                    .is_some_and(|d| d.starts_with("declared down by gossip: no answer since"))
        })
    })
    .map_err(|e| format!("gossip must declare the killed node-4 down:\n{e}"))?;
    println!(
        "e2e: the others declared the killed node-4 down within {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // ssh to it says so at once, instead of knocking at a dead guest for minutes.
    let out = ferry(
        &["ssh", "node-4", "--file", file, "--", "true"],
        b"",
        QUICK_LIMIT,
    )?;
    check(
        out.code() != 0 && out.stderr.contains("node-4 is down"),
        "`ferry ssh node-4` refuses the dead node at once, with the reason",
        &out,
    )?;

    down_forgets_node_4(s, file)
}

/// A joined node takes part: a process moved to node-4 keeps its state, and the balancer
/// sends node-4 a CPU-bound job by itself.
pub(crate) fn a_joined_node_takes_a_moved_process_and_a_balanced_job(s: &Suite) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    let cluster = three_gossiping_nodes(file)?;
    // node-4 joins through node-2's peer address alone.
    join_node_4(file)?;
    // Its disk is made from the current root image. Disks kept from an older one (a
    // developer's machine) hold other builds of python3 and its libraries, which a moved
    // process maps again by path: then the cluster starts over with fresh disks.
    let source = |n: &str| {
        std::fs::read_to_string(cluster.dir.node_dir(n).join("root.ext4.source"))
            .unwrap_or_default()
    };
    if source("node-1") != source("node-4") {
        println!("e2e: node-1's disk is from another root image than node-4's; starting over with fresh disks");
        let out = ferry(&["down", file, "--purge"], b"", BOOT_LIMIT)?;
        check(
            out.code() == 0,
            "`ferry down --purge` clears the old disks",
            &out,
        )?;
        up_with_clean_nodes(file, &["node-1"])?;
        join_node_4(file)?;
    }

    // A process moves to node-4 and keeps its state (its progress file is reopened there, so
    // node-4 has one too).
    let out = ferry(
        &[
            "ssh",
            "node-4",
            "--file",
            file,
            "--",
            "sh",
            "-c",
            "rm -f /root/progress; touch /root/progress",
        ],
        b"",
        // The first login to a new disk waits for sshd's first start.
        BOOT_LIMIT,
    )?;
    check(
        out.code() == 0,
        "`ferry ssh node-4` runs a command there",
        &out,
    )?;
    // The busy workload counts by the wall clock, never sleeping: a sleep's deadline is kept
    // on the source's monotonic clock, which runs ahead of a node that booted later (such as
    // one that just joined), and the moved process would wait out the difference first.
    // 64 MiB, not the 256 of the migration cases: four guests share the nested host's two
    // vCPUs here, and what this case shows is that node-4 takes part, not how large a move is.
    const MIB: u64 = 64;
    let pid = start_python(file, "node-1", "b", &busy_workload(MIB))?;
    let deadline = Instant::now() + BOOT_LIMIT;
    while last_count(file, "node-1").unwrap_or(0) < 3 {
        if Instant::now() > deadline {
            return Err("the workload never started counting on node-1".into());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let before = last_count(file, "node-1")?;
    let out = migrate_cmd(file, "node-1", pid, "node-4", &[])?;
    check(
        out.code() == 0 && out.stdout.contains("from node-1 to node-4"),
        "`ferry migrate` moves the workload to node-4",
        &out,
    )?;
    let new_pid: u32 = out
        .stdout
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no new pid in the summary\n{}", out.explain()))?;
    busy_intact_of(
        MIB,
        file,
        "node-4",
        new_pid,
        before,
        "after moving to node-4",
    )?;
    if runs_with(file, "node-1", pid, "b.py")? {
        return Err("the workload still runs on node-1".into());
    }
    let out = ferry(&["ps", file], b"", QUICK_LIMIT)?;
    check(
        out.stdout
            .lines()
            .any(|l| l.starts_with("node-4") && l.contains("b.py") && l.contains("node-1")),
        "`ferry ps` shows the workload on node-4, from node-1",
        &out,
    )?;

    // The balancer uses node-4: CPU-bound jobs started on node-1 reach it by themselves.
    // node-2 and node-3 refuse arrivals meanwhile, so three jobs (one more than node-1's
    // vCPUs) suffice; with every node open, node-4 would get one only from the sixth on.
    kill_on_nodes(file, &["node-4"], "[b][.]py")?;
    for node in ["node-2", "node-3"] {
        let out = ferry(&["node", "block", node, "--file", file], b"", QUICK_LIMIT)?;
        check(out.code() == 0, "`ferry node block` closes a node", &out)?;
    }
    let reached = super::balance::jobs_reach(file, &["node-1", "node-4"], 3, "node-4");
    for node in ["node-2", "node-3"] {
        let out = ferry(&["node", "unblock", node, "--file", file], b"", QUICK_LIMIT)?;
        check(out.code() == 0, "`ferry node unblock` opens it again", &out)?;
    }
    reached?;

    down_forgets_node_4(s, file)
}
