//! The `ferry` subcommands of the user tools: `run --on`, `top`, `mon`, `lock`, `unlock` and
//! `node` (the work is in `ferry::cluster::tools_client`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::cluster::api::{JobState, NodeAction};
use ferry::cluster::control::{Cluster, DEFAULT_FILE};
use ferry::cluster::tools_client::{self as tools, ToolsError};

use crate::{node_and_number, RunArgs, UsageError};

/// How long `ferry node expel|bring` follows the moves it started.
const MOVES_LIMIT: Duration = Duration::from_secs(600);

/// `ferry run --on NODE | --home | --no-migrate -- CMD`: starts CMD on a node, prints
/// NODE:PID.
pub fn cmd_run_on(args: &RunArgs) -> anyhow::Result<i32> {
    if args.command.is_empty() {
        return Err(UsageError(
            "name the program to start after `--`, e.g. `ferry run --on node-2 -- python3 job.py`"
                .into(),
        )
        .into());
    }
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_FILE));
    let cluster = Cluster::load(&file)?;
    let node = match &args.on {
        Some(n) => n.clone(),
        None => cluster
            .config
            .nodes
            .first()
            .map(|n| n.name.clone())
            .ok_or_else(|| UsageError(format!("{} has no nodes", file.display())))?,
    };
    let locked = args.home || args.no_migrate;
    match tools::start(&cluster, &node, &args.command, locked) {
        Ok(p) => {
            println!("{node}:{}", p.pid);
            if !args.quiet {
                eprintln!(
                    "ferry: started `{}` on {node} as pid {}{}; its output goes to /var/log/ferry/{}.log there",
                    tools::one_line(&args.command.join(" ")),
                    p.pid,
                    if locked { ", locked in place" } else { "" },
                    p.pid
                );
            }
            Ok(0)
        }
        Err(ToolsError::NotStarted { message, exit_code }) => {
            eprintln!("ferry: error: {message}");
            Ok(exit_code)
        }
        Err(e) => Err(e.into()),
    }
}

/// Redraws `draw()` in place on a terminal every `interval` until interrupted; once
/// otherwise, or when `once`.
fn live(
    once: bool,
    interval: f64,
    mut draw: impl FnMut() -> anyhow::Result<String>,
) -> anyhow::Result<i32> {
    let tty = std::io::stdout().is_terminal();
    loop {
        let text = draw()?;
        let mut out = std::io::stdout().lock();
        if tty && !once {
            // Home, the table, then clear what an earlier, longer table left.
            write!(out, "\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n"))?;
        } else {
            write!(out, "{text}")?;
            if !once {
                writeln!(out)?;
            }
        }
        out.flush()?;
        if once {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_secs_f64(interval));
    }
}

/// `ferry top`.
pub fn cmd_top(file: &Path, once: bool, interval: f64) -> anyhow::Result<i32> {
    let cluster = Cluster::load(file)?;
    let tty = std::io::stdout().is_terminal();
    if tty && !once {
        print!("\x1b[2J");
    }
    let mut before = cluster.processes()?;
    let mut at = Instant::now();
    let rows = terminal_rows().saturating_sub(3).max(5);
    let mut first = true;
    live(once, interval, || {
        // The first table waits one interval: CPU use is measured between two samples.
        if first || once {
            std::thread::sleep(Duration::from_secs_f64(interval));
            first = false;
        }
        let now = cluster.processes()?;
        let elapsed = at.elapsed();
        at = Instant::now();
        let table = tools::top_rows(&before, &now, elapsed);
        before = now;
        let limit = if tty && !once { rows } else { usize::MAX };
        Ok(format!(
            "ferry top: {} processes on {} nodes, CPU% over the last {:.1} s\n{}",
            table.len(),
            cluster.config.nodes.len(),
            elapsed.as_secs_f64(),
            tools::top_table(&table, limit)
        ))
    })
}

/// The terminal's height from `LINES`, or 24.
fn terminal_rows() -> usize {
    std::env::var("LINES")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(24)
}

/// `ferry mon`.
pub fn cmd_mon(file: &Path, once: bool, interval: f64) -> anyhow::Result<i32> {
    let cluster = Cluster::load(file)?;
    if std::io::stdout().is_terminal() && !once {
        print!("\x1b[2J");
    }
    live(once, interval, || {
        let statuses = cluster.statuses()?;
        Ok(format!(
            "ferry mon: cluster {}\n{}",
            cluster.config.name,
            tools::mon_table(&statuses)
        ))
    })
}

/// `ferry lock` and `ferry unlock`.
pub fn cmd_lock(process: &str, locked: bool, file: &Path) -> anyhow::Result<i32> {
    let (node, pid) = node_and_number::<u32>(process, "process", "node-1:4242")?;
    let cluster = Cluster::load(file)?;
    let p = tools::set_lock(&cluster, &node, pid, locked)?;
    println!(
        "{node}:{pid} ({}) {}",
        tools::one_line(&p.command),
        if locked {
            "is locked in place; `ferry unlock` lets it move again"
        } else {
            "may move again"
        }
    );
    Ok(0)
}

/// `ferry node block|unblock|expel|bring NODE`.
pub fn cmd_node(action: NodeAction, node: &str, file: &Path) -> anyhow::Result<i32> {
    let cluster = Cluster::load(file)?;
    let report = tools::node_control(&cluster, node, action)?;
    match action {
        NodeAction::Block => println!(
            "{node} refuses arriving processes (`ferry node unblock {node}` takes them again)"
        ),
        NodeAction::Unblock => println!("{node} takes arriving processes"),
        NodeAction::Expel | NodeAction::Bring => {
            if report.moves.is_empty() {
                println!(
                    "{}",
                    if action == NodeAction::Expel {
                        format!("no process of another node runs on {node}")
                    } else {
                        format!("no process of {node} runs elsewhere")
                    }
                );
                return Ok(0);
            }
            eprintln!(
                "ferry: {} move{} asked; waiting for them",
                report.moves.len(),
                if report.moves.len() == 1 { "" } else { "s" }
            );
            let mut failed = 0;
            for (m, outcome) in tools::wait_moves(&cluster, &report.moves, MOVES_LIMIT)? {
                match outcome {
                    Ok(job) if job.state == JobState::Done => println!(
                        "moved {}:{} ({}) to {} (pid {} there), frozen {} ms",
                        m.from,
                        m.pid,
                        tools::one_line(&m.command),
                        m.to,
                        job.new_pid
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "?".into()),
                        job.frozen_ms
                    ),
                    Ok(job) => {
                        failed += 1;
                        println!(
                            "did not move {}:{} ({}) to {}: {}",
                            m.from,
                            m.pid,
                            tools::one_line(&m.command),
                            m.to,
                            job.error.as_deref().unwrap_or("no reason given")
                        );
                    }
                    Err(why) => {
                        failed += 1;
                        println!(
                            "did not move {}:{} ({}) to {}: {why}",
                            m.from,
                            m.pid,
                            tools::one_line(&m.command),
                            m.to
                        );
                    }
                }
            }
            if failed > 0 {
                eprintln!(
                    "ferry: error: {failed} of {} moves failed",
                    report.moves.len()
                );
                return Ok(1);
            }
        }
    }
    Ok(0)
}
