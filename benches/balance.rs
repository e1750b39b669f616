//! Automatic load balancing: the makespan of 12 CPU-bound jobs started on one node of a
//! three-node cluster, with the balancer on against off, in one run.
//!
//! `cargo bench --bench balance [-- --jobs N --vcpus N --work-s S --rounds N]`. The bench
//! writes a cluster file of its own (cluster `benchbal`, 10.79.9.0/24, API ports from 7495 and
//! peer ports from 7595, nodes `bal-1` to `bal-3`, 1 vCPU and 512 MiB each by default) and
//! brings it up with `ferry up`, exactly as a user would: where this machine's KVM cannot boot a
//! stock kernel, the nodes run in the nested host.
//!
//! Each job is the same Python loop counting to a fixed number, sized so that one job alone
//! on an idle node takes about `--work-s` seconds (measured on bal-2 first). A round starts
//! all jobs at once on bal-1 and waits until none runs anywhere in the cluster (asked of every
//! node's API, as `ferry ps` does): that time is the makespan. The balancer is switched with
//! `ferry balancer off|on` before each round, and the rounds alternate between off and on;
//! the figures are medians. Output:
//!
//! `balance makespan_on/off ratio=<r> on_s=<s> off_s=<s> jobs=<n> nodes=3 vcpus=<n> cores=<n>`
//!
//! With 1 vCPU per node, three nodes with a CPU each would give a ratio of about 1/3 plus the
//! moves' cost. `cores` is the CPUs the guests really share: on a machine with fewer cores
//! than the guests' vCPUs (in the nested host: its vCPUs), spreading cannot gain more than
//! that ratio, and the line says so.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry::cluster::api::Process;
use ferry::cluster::control::Cluster;
use ferry::nested::NestedHost;

mod common;
use common::cluster::{run_ferry, FERRY};

const CLUSTER: &str = "benchbal";
const NODES: [&str; 3] = ["bal-1", "bal-2", "bal-3"];
const QUICK: Duration = Duration::from_secs(120);

/// Counts to `argv[1]` and exits; `argv[1]` = 0: counts for `argv[2]` seconds and prints the
/// count (the calibration).
const JOB: &str = r#"import sys, time
n = int(sys.argv[1])
if n == 0:
    end = time.time() + float(sys.argv[2])
    c = 0
    while time.time() < end:
        for _ in range(10000):
            c += 1
    print(c)
else:
    c = 0
    while c < n:
        c += 1
"#;

struct Args {
    jobs: u32,
    vcpus: u32,
    work_s: f64,
    rounds: u32,
}

fn args() -> Result<Args> {
    let mut a = Args {
        jobs: 12,
        vcpus: 1,
        work_s: 20.0,
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--jobs" => a.jobs = value("--jobs")?.parse().context("--jobs")?,
            "--vcpus" => a.vcpus = value("--vcpus")?.parse().context("--vcpus")?,
            "--work-s" => a.work_s = value("--work-s")?.parse().context("--work-s")?,
            "--rounds" => a.rounds = value("--rounds")?.parse().context("--rounds")?,
            // What cargo bench passes on.
            "--bench" => {}
            other => bail!(
                "unknown argument {other}; the bench takes --jobs N, --vcpus N, --work-s S, \
                 --rounds N"
            ),
        }
    }
    if a.jobs == 0 || a.vcpus == 0 || a.rounds == 0 || a.work_s <= 0.0 {
        bail!("--jobs, --vcpus, --rounds and --work-s must be positive");
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        println!("balance makespan_on/off ratio=not-measured ({e:#})");
        std::process::exit(1);
    }
}

/// `ferry ARGS`: its stdout, or an error with both streams.
fn ferry(args: &[&str], stdin: &[u8], limit: Duration) -> Result<String> {
    let (ok, out, err) = run_ferry(args, stdin, limit)?;
    if !ok {
        bail!("`ferry {}` failed: {out}{err}", args.join(" "));
    }
    Ok(out)
}

/// The bench's cluster: brought down (and purged) when dropped, and the nested host stopped
/// if the bench's `ferry up` started it and nothing else uses it.
struct Up {
    file: PathBuf,
    /// Whether a nested host ran before the bench.
    host_before: bool,
}

impl Drop for Up {
    fn drop(&mut self) {
        let f = self.file.to_string_lossy().into_owned();
        let _ = ferry(&["down", "--purge", "-q", &f], b"", QUICK);
        if let Some(dir) = self.file.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        if !self.host_before {
            if let Ok(Some(host)) = NestedHost::running() {
                let _ = host.stop_if_unused();
            }
        }
    }
}

fn run() -> Result<()> {
    let a = args()?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-balance-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("benchbal.toml");
    let mut text = format!(
        "# The balance bench's cluster (benches/balance.rs).\n[cluster]\nname = \"{CLUSTER}\"\n\
         subnet = \"10.79.9.0/24\"\n\n[defaults]\nvcpus = {}\nmemory = \"512M\"\n\n[api]\n\
         port = 7495\npeer_port = 7595\n\n[balancer]\nenabled = false\nresidence_s = 5\n",
        a.vcpus
    );
    for n in NODES {
        text += &format!("\n[[node]]\nname = \"{n}\"\n");
    }
    std::fs::write(&file, text)?;
    let f = file.to_string_lossy().into_owned();
    let _up = Up {
        file: file.clone(),
        host_before: matches!(NestedHost::running(), Ok(Some(_))),
    };
    eprintln!("bench: ferry up {f}");
    let status = Command::new(FERRY)
        .args(["up", &f])
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned()?,
        ))
        .status()?;
    if !status.success() {
        bail!("`ferry up` exited {status}");
    }
    let cluster = Cluster::load(&file)?;
    for n in NODES {
        ferry(
            &[
                "ssh",
                n,
                "--file",
                &f,
                "--",
                "sh",
                "-c",
                "cat > /root/job.py",
            ],
            JOB.as_bytes(),
            QUICK,
        )?;
    }
    let cores = cores()?;

    // One job alone, for the job's size.
    let calib_s = 5.0;
    let out = ferry(
        &[
            "ssh",
            NODES[1],
            "--file",
            &f,
            "--",
            "python3",
            "/root/job.py",
            "0",
            &calib_s.to_string(),
        ],
        b"",
        QUICK,
    )?;
    let per_s = out
        .trim()
        .parse::<f64>()
        .context("the calibration's count")?
        / calib_s;
    let count = (per_s * a.work_s) as u64;
    eprintln!(
        "bench: a job counts to {count} ({per_s:.0} a second alone on {}, {} s of work)",
        NODES[1], a.work_s
    );

    let mut on = Vec::new();
    let mut off = Vec::new();
    for round in 0..a.rounds * 2 {
        let balancing = round % 2 == 1;
        ferry(
            &[
                "balancer",
                if balancing { "on" } else { "off" },
                "--file",
                &f,
            ],
            b"",
            QUICK,
        )?;
        let s = makespan(&cluster, &f, a.jobs, count)?;
        eprintln!(
            "bench: round {}: balancer {}: {s:.1} s",
            round / 2 + 1,
            if balancing { "on" } else { "off" }
        );
        if balancing {
            eprintln!(
                "{}",
                ferry(&["balancer", "--file", &f, "--events", "20"], b"", QUICK)?
            );
            on.push(s);
        } else {
            off.push(s);
        }
    }
    let (on_s, off_s) = (median(on), median(off));
    // Off, the jobs use at most the first node's vCPUs; on, all nodes' vCPUs, but never more
    // than the cores under them.
    let all = NODES.len() as u32 * a.vcpus;
    let best = f64::from(a.vcpus.min(cores)) / f64::from(all.min(cores));
    let note = if cores < all {
        format!(" (the guests' {all} vCPUs share {cores} cores here: {best:.2} is the best a perfect balancer could reach)")
    } else {
        String::new()
    };
    println!(
        "balance makespan_on/off ratio={:.3} on_s={on_s:.1} off_s={off_s:.1} jobs={} nodes={} vcpus={} cores={cores}{note}",
        on_s / off_s,
        a.jobs,
        NODES.len(),
        a.vcpus
    );
    Ok(())
}

/// The CPUs the guests really run on: this machine's, or the nested host's when the nodes
/// run there.
fn cores() -> Result<u32> {
    let here = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    if ferry::nested::local_kvm_problem().is_none() {
        return Ok(here);
    }
    let out = Command::new(FERRY)
        .args(["host", "exec", "--", "nproc"])
        .output()
        .context("ferry host exec -- nproc")?;
    let nested: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(here);
    Ok(nested.min(here))
}

/// Starts `jobs` jobs counting to `count` on the first node and waits until none runs
/// anywhere: seconds.
fn makespan(cluster: &Cluster, file: &str, jobs: u32, count: u64) -> Result<f64> {
    let start = format!(
        "for i in $(seq 1 {jobs}); do setsid python3 /root/job.py {count} </dev/null >/dev/null 2>&1 & done"
    );
    let t0 = Instant::now();
    ferry(
        &["ssh", NODES[0], "--file", file, "--", "sh", "-c", &start],
        b"",
        QUICK,
    )?;
    let limit = Duration::from_secs(3600);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(running) = running_jobs(cluster)? else {
            continue;
        };
        if running == 0 {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > limit {
            bail!("{running} jobs still run after {} s", limit.as_secs());
        }
    }
}

/// Jobs running in the whole cluster, or `None` if a node did not answer (its jobs unknown).
fn running_jobs(cluster: &Cluster) -> Result<Option<usize>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut running = 0;
    for n in &cluster.config.nodes {
        let client = cluster.client(n)?;
        match rt.block_on(client.get::<Vec<Process>>("/v1/processes")) {
            Ok(list) => {
                running += list
                    .iter()
                    .filter(|p| p.command.contains("/root/job.py"))
                    .count()
            }
            Err(e) => {
                eprintln!("bench: {}: {e}", n.name);
                return Ok(None);
            }
        }
    }
    Ok(Some(running))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
