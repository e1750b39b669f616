//! Post-copy live migration, end to end: a busy process resumes at the destination before
//! its anonymous memory arrived, the pages it touches are fetched on demand while the rest
//! follows, and afterwards every page agrees with the table the process keeps of them.

use std::time::{Duration, Instant};

use super::{
    busy_intact, check, ferry, last_count, local_cluster_file, migrate_cmd, number_after,
    start_python, up_with_clean_nodes, CaseResult, Suite, BOOT_LIMIT, BUSY_WORKLOAD, QUICK_LIMIT,
};

pub(crate) fn a_busy_process_moves_by_post_copy_and_runs_before_its_pages_arrive(
    _: &Suite,
) -> CaseResult {
    let file = local_cluster_file();
    let file = file.as_str();
    up_with_clean_nodes(file, &["node-1", "node-2"])?;
    let pid = start_python(file, "node-1", "b", BUSY_WORKLOAD)?;
    let deadline = Instant::now() + BOOT_LIMIT;
    while last_count(file, "node-1").unwrap_or(0) < 3 {
        if Instant::now() > deadline {
            return Err("the busy workload never started counting on node-1".into());
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    let before = last_count(file, "node-1")?;
    let out = migrate_cmd(file, "node-1", pid, "node-2", &["--mode", "postcopy"])?;
    check(
        out.code() == 0,
        "a post-copy move of the busy process",
        &out,
    )?;
    eprintln!("post-copy move: {}", out.stdout.trim());
    // "... running there after R ms; F pages followed, D on demand"
    let resumed = number_after(&out.stdout, "running there after ");
    let followed = number_after(&out.stdout, " ms; ");
    let on_demand = number_after(&out.stdout, "pages followed, ");
    let total = number_after(&out.stdout, "total ");
    let (Some(resumed), Some(followed), Some(on_demand), Some(total)) =
        (resumed, followed, on_demand, total)
    else {
        return Err(format!(
            "the summary does not report the resume and the pages that followed\n{}",
            out.explain()
        ));
    };
    // 256 MiB of anonymous memory: nearly all of it must have come after the resume.
    check(
        followed >= 60_000 && resumed < total,
        "the process ran at node-2 before most of its pages arrived",
        &out,
    )?;
    check(
        on_demand > 0,
        "pages the process waited for were fetched on demand",
        &out,
    )?;
    let pid2 = number_after(&out.stdout, "(pid ").ok_or_else(|| out.explain())? as u32;
    busy_intact(file, "node-2", pid2, before, "after the post-copy move")?;
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
    Ok(())
}
