//! Live migration of a process between two nodes: ferry's stop-and-copy, pre-copy and
//! post-copy against CRIU's, side by side, on the same guests in the same host.
//!
//! `cargo bench --bench live [-- [--sizes 64,256,1024] [--rounds 1] [--modes stop,precopy,postcopy] [--rates light,heavy]]`
//! (`--modes`, `--rates`: only those modes' and rates' lines; the ratio line needs stop and
//! precopy)
//!
//! The setup is the migrate bench's (benches/common/cluster.rs): a cluster of the bench's own
//! (cluster `benchlive`, nodes `bench-a` and `bench-b` with 1536 MiB each and Debian's `criu`),
//! `ferry up`, `ferry down --purge` at the end, in the nested host where the local KVM cannot
//! boot a stock kernel. For each size and write rate, a Python workload fills that many MiB with
//! a pattern (no zero pages), then counts, appending to /root/progress five times a second,
//! while it writes to its memory at one of two rates:
//!
//! - `light`: once a second, one page in every 64 of a window of the first 1% of its pages (a
//!   different one of each 64 every second, so the whole window is written every 64 s): at
//!   1024 MiB, 41 pages (164 KiB) a second; at 64 MiB, 2 or 3 pages;
//! - `heavy`: one byte of every page of the first 10% of its pages, pass after pass, as fast as
//!   Python goes (a strided slice assignment) between the counts: every page of the window is
//!   written again within milliseconds, so what pre-copy leaves is that whole window.
//!
//! For each mode, a fresh workload is started on bench-a and moved to bench-b, by ferry and then
//! by CRIU:
//!
//! - `stop`: ferry's stop-and-copy (`MigrationMode::Stop`); CRIU's plain `criu dump` to a page
//!   server and `criu restore`, as the migrate bench does;
//! - `precopy`: ferry's pre-copy (`MigrationMode::Precopy`, the default 300 ms downtime budget,
//!   no bandwidth cap): rounds of pages on KVM's dirty log while the process runs, then the
//!   freeze for the rest; CRIU's `criu pre-dump`s (at most three, fewer once one writes at most
//!   256 pages or not a tenth fewer than the one before), each to a page server over TLS with
//!   the previous images as parent, then the final `criu dump --prev-images-dir ..
//!   --track-mem` and `criu restore` (benches/common/criu.rs);
//! - `postcopy`: ferry's post-copy (`MigrationMode::Postcopy`): frozen, resumed at bench-b with
//!   its anonymous memory still at bench-a, which follows on fault and in the background;
//!   CRIU's lazy pages: `criu dump --lazy-pages` serving the memory from bench-a, `criu
//!   lazy-pages` and `criu restore --lazy-pages` at bench-b (benches/common/criu_lazy.rs).
//!
//! Downtime is the time the process does not run: ferry's job `frozen_ms` (from freezing it to
//! it running at the destination, as the source's daemon measured it); CRIU's from the final
//! `criu dump` starting to `criu restore` returning. With post-copy, the total includes the
//! pages that followed the resume: until the last one arrived. Total is ferry's job `total_ms` (from the
//! request to the end); CRIU's from starting the first page server to the restore's end. A
//! figure counts only for a move after which the process counts on at bench-b from where it
//! was; medians over the rounds. Per-move details (ferry's rounds, pages held from pre-copy,
//! dirty rate and both daemons' log lines; CRIU's pre-dumps and phases) go to stderr.
//!
//! In the nested host, guests reset under a move (a triple fault) or hang, and the nested
//! host's kernel wedges every ten minutes or so (an RCU stall in its nested KVM, often then a
//! panic). After a failed move, and while one of CRIU's moves runs (which would otherwise wait
//! out its limit), the bench asks whether a node is down (a guest that died, or whose agent has
//! been silent for a minute) or the nested host's kernel reported a stall, lockup or panic; if
//! so, the cluster is brought up again (in a new nested host if the old one wedged) and
//! the move runs again, at most twice for one move (then that move is `not-measured`) and ten
//! times in a run (then what is left is); the reason includes the nested host's kernel words.
//!
//! Output, one line per case, then one ratio line per size and rate:
//!
//! ```text
//! live mode=<stop|precopy|postcopy> mib=<n> rate=<light|heavy> downtime_ms=<d> total_ms=<t> criu_downtime_ms=<c> criu_total_ms=<ct>
//! live precopy/stop downtime ratio=<r> mib=<n> rate=<rate> criu_ratio=<cr>
//! ```
//!
//! `ratio` is ferry's pre-copy downtime over its stop-and-copy downtime (the goal: under 0.10 at
//! 1024 MiB with the light rate), `criu_ratio` the same for CRIU. A figure that could not be
//! measured reads `not-measured`, with the reason in parentheses at the end of the line; a case
//! with no figure at all reads `not-measured (<why>)` instead of them. Figures are printed,
//! never asserted.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use ferry::cluster::api::{MigrationJob, MigrationMode};
use ferry::cluster::control::MigrateOptions;

mod common;
use common::cluster::{first_line, sizes_and_rounds, Bench, Spec, NODE_A, NODE_B};
use common::median;

const SPEC: Spec = Spec {
    name: "benchlive",
    bench: "live",
    subnet: "10.79.10.0/24",
    api_port: 7497,
    peer_port: 7597,
};
const RATES: [&str; 2] = ["light", "heavy"];
const MODES: [MigrationMode; 3] = [
    MigrationMode::Stop,
    MigrationMode::Precopy,
    MigrationMode::Postcopy,
];
/// The most pre-dumps of CRIU's pre-copy.
const PREDUMPS: u32 = 3;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let modes = match modes_arg(&args) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("bench: live: --modes: {e}");
            std::process::exit(2);
        }
    };
    let rates = match rates_arg(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: live: --rates: {e}");
            std::process::exit(2);
        }
    };
    let Some((sizes, rounds)) = sizes_and_rounds(&args, 1) else {
        eprintln!(
            "bench: usage: live [--sizes 64,256,1024] [--rounds N] [--modes stop,precopy,postcopy] [--rates light,heavy]"
        );
        std::process::exit(2);
    };
    std::process::exit(match outer(&sizes, rounds, &modes, &rates) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench: live: {e:#}");
            1
        }
    });
}

/// The modes `--modes` names (every one without it).
fn modes_arg(args: &[String]) -> Result<Vec<MigrationMode>, String> {
    match args.iter().position(|a| a == "--modes") {
        None => Ok(MODES.to_vec()),
        Some(i) => args
            .get(i + 1)
            .ok_or("give a list, e.g. --modes postcopy")?
            .split(',')
            .map(|m| m.parse::<MigrationMode>())
            .collect(),
    }
}

/// The write rates `--rates` names (both without it).
fn rates_arg(args: &[String]) -> Result<Vec<&'static str>, String> {
    match args.iter().position(|a| a == "--rates") {
        None => Ok(RATES.to_vec()),
        Some(i) => args
            .get(i + 1)
            .ok_or("give a list, e.g. --rates light")?
            .split(',')
            .map(|r| {
                RATES
                    .into_iter()
                    .find(|known| *known == r)
                    .ok_or_else(|| format!("{r:?} is not a rate: light or heavy"))
            })
            .collect(),
    }
}

/// One case's moves by one tool: the figures (downtime, total, in ms) of those that worked,
/// and why the last one that failed did.
#[derive(Default)]
struct Moves {
    figures: Vec<(f64, f64)>,
    error: Option<String>,
}

impl Moves {
    fn record(&mut self, result: Result<(f64, f64)>) {
        match result {
            Ok(f) => self.figures.push(f),
            Err(e) => self.error = Some(first_line(&format!("{e:#}")).to_string()),
        }
    }

    /// Median downtime and total, if any move worked.
    fn medians(&self) -> Option<(f64, f64)> {
        (!self.figures.is_empty()).then(|| {
            (
                median(self.figures.iter().map(|f| f.0).collect()),
                median(self.figures.iter().map(|f| f.1).collect()),
            )
        })
    }

    fn why(&self) -> &str {
        self.error.as_deref().unwrap_or("no move worked")
    }
}

/// The most times the cluster is brought up again after it went down under a move (the nested
/// host's kernel has died under it: a stall in its nested KVM, then a panic): for one move, and
/// in the whole run.
const MOVE_RESTARTS: u32 = 2;
const RUN_RESTARTS: u32 = 10;

/// The cluster and CRIU in it; runs the bench's moves one after another, brings the cluster up
/// again when it went down under a move (at most [`RUN_RESTARTS`] times in all) and runs that
/// move again (at most [`MOVE_RESTARTS`] times; then it is not measured), and runs no more
/// once the cluster is gone for good.
struct Runner {
    bench: Option<Bench>,
    /// CRIU's abilities in the guests, or why it cannot run there.
    criu: Result<common::criu::Criu, String>,
    restarts: u32,
    gone: Option<String>,
}

impl Runner {
    fn up() -> Result<Runner> {
        let bench = Bench::up(&SPEC)?;
        let criu = prepare_criu(&bench);
        Ok(Runner {
            bench: Some(bench),
            criu,
            restarts: 0,
            gone: None,
        })
    }

    fn bench(&self) -> &Bench {
        self.bench
            .as_ref()
            .expect("the cluster is up while moves run")
    }

    /// `ferry down --purge` (and a new nested host if the old one wedged), then up again as at
    /// the start.
    fn restart(&mut self) -> Result<()> {
        if let Some(bench) = self.bench.take() {
            bench.end();
        }
        let bench = Bench::up(&SPEC)?;
        self.criu = prepare_criu(&bench);
        self.bench = Some(bench);
        Ok(())
    }

    /// Records `moved` into `moves`, or why the cluster can no longer be measured; after a
    /// failed move (`what`, in messages), checks whether the cluster is still up, and if not
    /// brings it up again and runs the move once more.
    fn attempt(
        &mut self,
        what: &str,
        moves: &mut Moves,
        moved: impl Fn(&Bench) -> Result<(f64, f64)>,
    ) {
        let mut restarts = 0;
        loop {
            if let Some(why) = &self.gone {
                moves.error = Some(why.clone());
                return;
            }
            let result = moved(self.bench());
            let Err(e) = &result else {
                moves.record(result);
                return;
            };
            eprintln!("bench: {what}: {e:#}");
            let Some(why) = self.bench().down_reason() else {
                moves.record(result);
                return;
            };
            eprintln!(
                "bench: {why}; the daemons' last words:{}",
                self.bench().daemon_logs()
            );
            if self.restarts == RUN_RESTARTS {
                eprintln!("bench: {why}: no more moves");
                self.gone = Some(why);
                continue;
            }
            self.restarts += 1;
            let again = restarts < MOVE_RESTARTS;
            if again {
                restarts += 1;
                eprintln!("bench: {why}: the cluster comes up again and {what} runs again");
            } else {
                eprintln!("bench: {why}: the cluster comes up again for the next moves");
            }
            if let Err(e) = self.restart() {
                self.gone = Some(format!("{why}; bringing it up again failed: {e:#}"));
            }
            if !again {
                moves.error = Some(format!("{why} ({} times)", MOVE_RESTARTS + 1));
                return;
            }
        }
    }
}

/// [`common::criu::prepare`], its error as the reason CRIU's moves are not measured.
fn prepare_criu(bench: &Bench) -> Result<common::criu::Criu, String> {
    let criu = common::criu::prepare(bench).map_err(|e| {
        eprintln!("bench: CRIU cannot run in these guests: {e:#}");
        format!(
            "CRIU cannot run in these guests: {}",
            first_line(&format!("{e:#}"))
        )
    });
    if let Ok(Some(why)) = criu.as_ref().map(|c| &c.no_predump) {
        eprintln!("bench: {why}");
    }
    criu
}

fn outer(
    sizes: &[u64],
    rounds: usize,
    modes: &[MigrationMode],
    rates: &[&'static str],
) -> Result<()> {
    let ratio_wanted =
        modes.contains(&MigrationMode::Stop) && modes.contains(&MigrationMode::Precopy);
    let mut runner = Runner::up()?;
    let mut ratios = Vec::new();
    for &mib in sizes {
        for &rate in rates {
            let skip = runner.gone.clone();
            if let Some(why) = skip.or_else(|| runner.bench().does_not_fit(mib)) {
                eprintln!("bench: {mib} MiB {rate} skipped: {why}");
                for mode in modes {
                    println!(
                        "live mode={mode} mib={mib} rate={rate} not-measured (skipped: {why})"
                    );
                }
                if ratio_wanted {
                    ratios.push(format!(
                        "live precopy/stop downtime ratio=not-measured mib={mib} rate={rate} (skipped: {why})"
                    ));
                }
                continue;
            }
            // [mode][ferry, criu]
            let mut cases: [[Moves; 2]; 3] = Default::default();
            for round in 1..=rounds {
                for (m, mode) in MODES.into_iter().enumerate() {
                    if !modes.contains(&mode) {
                        continue;
                    }
                    let [by_ferry, by_criu] = &mut cases[m];
                    let what = format!("{mib} MiB {rate} round {round}");
                    runner.attempt(&format!("{what}: ferry {mode}"), by_ferry, |bench| {
                        bench.move_workload(mib, Some(rate), |pid| {
                            ferry_move(bench, pid, mode, mib, rate, round)
                        })
                    });
                    let predumps = match mode {
                        MigrationMode::Stop => 0,
                        MigrationMode::Precopy => PREDUMPS,
                        MigrationMode::Postcopy => 0,
                    };
                    let unable = match &runner.criu {
                        Err(why) => Some(why.clone()),
                        Ok(c) if predumps > 0 => c.no_predump.clone(),
                        Ok(_) => None,
                    };
                    if let Some(why) = unable {
                        by_criu.error = Some(why);
                        continue;
                    }
                    runner.attempt(&format!("{what}: criu {mode}"), by_criu, |bench| {
                        bench.move_workload(mib, Some(rate), |pid| {
                            let m = if mode == MigrationMode::Postcopy {
                                common::criu_lazy::move_process(bench, pid, mib)?
                            } else {
                                common::criu::move_process(bench, pid, mib, predumps)?
                            };
                            eprintln!(
                                "bench: {mib} MiB {rate} round {round}: criu {mode}: downtime {:.0} ms, total {:.0} ms",
                                m.downtime_ms, m.total_ms
                            );
                            Ok((m.downtime_ms, m.total_ms))
                        })
                    });
                }
            }
            for (m, mode) in MODES.into_iter().enumerate() {
                if modes.contains(&mode) {
                    println!("{}", case_line(mode, mib, rate, &cases[m]));
                }
            }
            if ratio_wanted {
                ratios.push(ratio_line(mib, rate, &cases));
            }
        }
    }
    if runner.restarts > 0 {
        eprintln!(
            "bench: the cluster went down under a move and came up again {} times",
            runner.restarts
        );
    }
    drop(runner);
    for l in ratios {
        println!("{l}");
    }
    Ok(())
}

/// ferry's move of `pid` in `mode`: (downtime, total) in ms from the job, its details on
/// stderr.
fn ferry_move(
    b: &Bench,
    pid: u32,
    mode: MigrationMode,
    mib: u64,
    rate: &str,
    round: usize,
) -> Result<(f64, f64)> {
    let options = MigrateOptions {
        mode,
        ..Default::default()
    };
    let asked = SystemTime::now();
    let job: MigrationJob = b.ferry_move(pid, &options)?;
    if job.mode != mode {
        bail!(
            "ferry was asked for {mode} and moved the process in {} mode",
            job.mode
        );
    }
    eprintln!(
        "bench: {mib} MiB {rate} round {round}: ferry {mode}: frozen {} ms, total {} ms (setup {} ms); {} pre-copy rounds, dirty {} pages/s, {} ms frozen expected; final copy {} pages, {} held from pre-copy, {} zero; {:.1} MiB sent, {:.1} MiB/s",
        job.frozen_ms,
        job.total_ms,
        job.setup_ms,
        job.round,
        job.dirty_pages_s,
        job.expected_downtime_ms,
        job.pages_sent,
        job.held_pages,
        job.zero_pages,
        job.bytes_sent as f64 / (1 << 20) as f64,
        job.throughput_mib_s
    );
    if let Some(p) = &job.postcopy {
        eprintln!(
            "bench: {mib} MiB {rate} round {round}: ferry {mode}: running at bench-b after {} ms; {} of {} pages followed the resume, {} on demand",
            p.resumed_ms, p.pages_after_resume, p.lazy_pages, p.pages_on_demand
        );
    }
    eprint!("{}", daemon_lines_since(b, asked));
    Ok((job.frozen_ms as f64, job.total_ms as f64))
}

/// Both daemons' log lines from `since` on (give or take the nested host's clock: 5 s before),
/// but for their state reports: what they said of the move, with their times.
fn daemon_lines_since(b: &Bench, since: SystemTime) -> String {
    let since = since
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        - 5.0;
    let mut s = String::new();
    for node in [NODE_A, NODE_B] {
        let log = std::fs::read_to_string(b.cluster.dir.daemon_log(node)).unwrap_or_default();
        for line in log.lines() {
            let time = line
                .strip_prefix('[')
                .and_then(|l| l.split(']').next())
                .and_then(|t| t.parse::<f64>().ok());
            if time.is_some_and(|t| t >= since) && !line.contains("] state: ") {
                s.push_str(&format!("bench:   {node} {line}\n"));
            }
        }
    }
    s
}

/// The line of one case: `[ferry, criu]`'s medians, `not-measured` for a tool none of whose
/// moves worked, and why at the end.
fn case_line(mode: MigrationMode, mib: u64, rate: &str, moves: &[Moves; 2]) -> String {
    let [ferry, criu] = moves;
    let head = format!("live mode={mode} mib={mib} rate={rate}");
    let mut why = Vec::new();
    for (tool, m) in [("ferry", ferry), ("criu", criu)] {
        if m.medians().is_none() {
            why.push(format!("{tool}: {}", m.why()));
        }
    }
    let (f, c) = (ferry.medians(), criu.medians());
    if f.is_none() && c.is_none() {
        return format!("{head} not-measured ({})", why.join("; "));
    }
    let pair = |m: Option<(f64, f64)>, prefix: &str| match m {
        Some((d, t)) => format!("{prefix}downtime_ms={d:.0} {prefix}total_ms={t:.0}"),
        None => format!("{prefix}downtime_ms=not-measured {prefix}total_ms=not-measured"),
    };
    let mut line = format!("{head} {} {}", pair(f, ""), pair(c, "criu_"));
    if !why.is_empty() {
        line.push_str(&format!(" ({})", why.join("; ")));
    }
    line
}

/// The ratio line of one size and rate: pre-copy's downtime over stop-and-copy's, ferry's and
/// CRIU's.
fn ratio_line(mib: u64, rate: &str, cases: &[[Moves; 2]; 3]) -> String {
    let ratio = |tool: usize| -> Result<f64, String> {
        let [stop, pre] = [&cases[0][tool], &cases[1][tool]];
        match (stop.medians(), pre.medians()) {
            (Some((s, _)), Some((p, _))) if s > 0.0 => Ok(p / s),
            (Some(_), Some(_)) => Err("stop-and-copy's downtime was 0 ms".into()),
            (None, _) => Err(format!("stop: {}", stop.why())),
            (_, None) => Err(format!("precopy: {}", pre.why())),
        }
    };
    let head = "live precopy/stop downtime";
    match (ratio(0), ratio(1)) {
        (Ok(f), Ok(c)) => {
            format!("{head} ratio={f:.3} mib={mib} rate={rate} criu_ratio={c:.3}")
        }
        (Ok(f), Err(c)) => format!(
            "{head} ratio={f:.3} mib={mib} rate={rate} criu_ratio=not-measured (criu {c})"
        ),
        (Err(f), Ok(c)) => format!(
            "{head} ratio=not-measured mib={mib} rate={rate} criu_ratio={c:.3} (ferry {f})"
        ),
        (Err(f), Err(c)) => format!(
            "{head} ratio=not-measured mib={mib} rate={rate} criu_ratio=not-measured (ferry {f}; criu {c})"
        ),
    }
}
