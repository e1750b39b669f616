//! A process migration on this machine, without VMs: a Python workload is frozen
//! (`migrate::dump::freeze`), rebuilt (`migrate::restore::build`), its pages copied from the
//! frozen source into the skeleton through `/proc/PID/mem` (on the host a test cannot write
//! guest frames; the frames are still asked for and checked), and resumed; the source is
//! killed. The new process must go on counting where the old one stopped, appending to the
//! same file, with its 64 MiB buffer's checksum unchanged.
//!
//! Needs root (ptrace of a process with a changed layout, pagemap frame numbers, clone3 with
//! a pid, PR_SET_MM_MAP) and python3: skipped with a printed reason otherwise.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_guest_agent::migrate::dump;
use ferry_guest_agent::migrate::image::{MappingKind, PageRef, ProcessImage, PAGE_SIZE};
use ferry_guest_agent::migrate::restore;

mod common;
use common::{counts_on, lines_after, read_lines, start_workload, start_workload_under, Started};

/// The pages whose contents the destination must receive: every private anonymous one
/// (pagemap says so), and every present page of a writable private mapping.
fn pages_to_copy(image: &ProcessImage, pages: &[PageRef]) -> Vec<u64> {
    pages
        .iter()
        .filter(|p| {
            image.mappings.iter().any(|m| {
                m.start <= p.vaddr
                    && p.vaddr < m.end
                    && !m.shared
                    && !matches!(
                        m.kind,
                        MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
                    )
                    && (p.anon || m.prot & 2 != 0)
            })
        })
        .map(|p| p.vaddr)
        .collect()
}

/// Copies `vaddrs` from one process's memory to the other's, in contiguous runs.
fn copy_pages(from: u32, to: u32, vaddrs: &[u64]) -> u64 {
    let src = File::open(format!("/proc/{from}/mem")).expect("source memory");
    let dst = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{to}/mem"))
        .expect("skeleton memory");
    let mut sorted = vaddrs.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for v in sorted {
        match runs.last_mut() {
            Some(r) if r.1 == v && r.1 - r.0 < 8 << 20 => r.1 += PAGE_SIZE,
            _ => runs.push((v, v + PAGE_SIZE)),
        }
    }
    let mut copied = 0;
    let mut buf = Vec::new();
    for (s, e) in runs {
        buf.resize((e - s) as usize, 0);
        src.read_exact_at(&mut buf, s)
            .unwrap_or_else(|e2| panic!("reading source pages {s:#x}-{e:#x}: {e2}"));
        dst.write_all_at(&buf, s)
            .unwrap_or_else(|e2| panic!("writing skeleton pages {s:#x}-{e:#x}: {e2}"));
        copied += e - s;
    }
    copied
}

/// Copies `vaddrs` from a process that still runs to the skeleton, as a pre-copy round does:
/// pages it unmapped meanwhile are skipped (the final copy brings what matters).
fn copy_running_pages(from: u32, to: u32, vaddrs: &[u64]) -> u64 {
    let src = File::open(format!("/proc/{from}/mem")).expect("source memory");
    let dst = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{to}/mem"))
        .expect("skeleton memory");
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut copied = 0;
    for &v in vaddrs {
        if src.read_exact_at(&mut page, v).is_ok() {
            dst.write_all_at(&page, v)
                .unwrap_or_else(|e| panic!("writing skeleton page {v:#x}: {e}"));
            copied += PAGE_SIZE;
        }
    }
    copied
}

#[test]
fn a_python_workload_moves_and_keeps_counting() {
    let Some(Started {
        mut cleanup,
        pid: source_pid,
        dir,
        out,
    }) = start_workload("migrate-local", "ptrace, pagemap frames, PR_SET_MM_MAP")
    else {
        return;
    };

    // Freeze, rebuild, copy, resume.
    let t0 = Instant::now();
    let frozen = dump::freeze(source_pid).expect("freezing the workload");
    let image = frozen.image();
    let source_comm = image.comm.clone();
    let source_cmdline = fs::read(format!("/proc/{source_pid}/cmdline")).unwrap();
    let source_maps = maps_of(source_pid);
    let source_status = fs::read_to_string(format!("/proc/{source_pid}/status")).unwrap();
    let source_exe = fs::read_link(format!("/proc/{source_pid}/exe")).unwrap();
    let last_before = *read_lines(&out).last().unwrap();
    let mut skeleton = restore::build(image).expect("building the skeleton");
    let built = t0.elapsed();
    let new_pid = skeleton.pid();
    assert_ne!(new_pid, source_pid);
    let vaddrs = pages_to_copy(image, frozen.pages());
    assert!(
        vaddrs.len() as u64 >= (64 << 20) / PAGE_SIZE,
        "only {} pages to copy: the 64 MiB buffer is not among them",
        vaddrs.len()
    );
    let frames = skeleton.frames(&vaddrs).expect("frames of the skeleton");
    assert_eq!(frames.len(), vaddrs.len());
    assert!(frames.iter().all(|&f| f != 0), "a zero frame number");
    let distinct: HashSet<u64> = frames.iter().copied().collect();
    assert_eq!(distinct.len(), frames.len(), "two pages share a frame");
    let copied = copy_pages(source_pid, new_pid, &vaddrs);
    for w in skeleton.warnings() {
        eprintln!("restore warning: {w}");
    }
    let resumed = skeleton.resume().expect("resuming the skeleton");
    cleanup.moved = Some(resumed);
    assert_eq!(resumed, new_pid);
    frozen.kill().expect("killing the source");
    if let Some(mut c) = cleanup.source.take() {
        c.wait().expect("reaping the source");
    }
    eprintln!(
        "moved pid {source_pid} to {new_pid}: built in {built:?}, {} MiB in {} pages copied, \
         resumed {:?} after the freeze",
        copied >> 20,
        vaddrs.len(),
        t0.elapsed()
    );

    // The old process is gone, the new one goes on where it stopped.
    assert!(
        !Path::new(&format!("/proc/{source_pid}")).exists(),
        "the source process {source_pid} is still there"
    );
    counts_on(&out, last_before, 10, Duration::from_secs(20));
    let status = fs::read_to_string(format!("/proc/{new_pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("State:\t") && !l.contains("zombie")),
        "the new process is not running:\n{status}"
    );
    for field in ["SigBlk:", "SigIgn:", "SigCgt:", "Uid:", "Gid:", "Groups:"] {
        assert_eq!(
            status_field(&status, field),
            status_field(&source_status, field),
            "{field} differs"
        );
    }
    // Transparent huge pages: off at both ends while the pages were read and landed, on
    // again at the destination as the workload had them.
    assert_eq!(status_field(&source_status, "THP_enabled:"), Some("0"));
    assert_eq!(status_field(&status, "THP_enabled:"), Some("1"));
    assert_eq!(maps_of(new_pid), source_maps, "the mappings differ");
    assert_eq!(
        fs::read_link(format!("/proc/{new_pid}/exe")).unwrap(),
        source_exe
    );
    assert_eq!(fs::read_link(format!("/proc/{new_pid}/cwd")).unwrap(), dir);
    assert_eq!(fs::read_link(format!("/proc/{new_pid}/fd/3")).unwrap(), out);
    let comm = fs::read_to_string(format!("/proc/{new_pid}/comm")).unwrap();
    assert_eq!(comm.trim_end(), source_comm);
    let cmdline = fs::read(format!("/proc/{new_pid}/cmdline")).unwrap();
    assert_eq!(
        cmdline, source_cmdline,
        "the command line (read from its memory) differs"
    );
}

/// The `/proc/PID/maps` lines without device and inode, as `start-end perms offset name`,
/// neighbours that only the kernel's merging (or not) of areas tells apart joined: same
/// permissions and name, and for files, contiguous offsets.
fn maps_of(pid: u32) -> Vec<String> {
    let mut areas: Vec<(u64, u64, String, u64, String)> = Vec::new();
    for line in fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (s, e) = f[0].split_once('-').unwrap();
        let (s, e) = (
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
        );
        let offset = u64::from_str_radix(f[2], 16).unwrap();
        let name = f.get(5).copied().unwrap_or("").to_string();
        if let Some(prev) = areas.last_mut() {
            let file = name.starts_with('/');
            if prev.1 == s
                && prev.2 == f[1]
                && prev.4 == name
                && (!file || prev.3 + (prev.1 - prev.0) == offset)
            {
                prev.1 = e;
                continue;
            }
        }
        areas.push((s, e, f[1].to_string(), offset, name));
    }
    areas
        .into_iter()
        .map(|(s, e, perms, offset, name)| format!("{s:x}-{e:x} {perms} {offset:x} {name}"))
        .collect()
}

fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
}

/// The destination's usual case: the source is gone before the rebuild, so its pid is free
/// and the process keeps it (clone3 with set_tid). The image says `nobody`, so the
/// credentials are switched at resume (the workload itself runs as root: freezing another
/// user's process needs CAP_SYS_RESOURCE for prlimit, which some sandboxes' root lacks). And
/// first, a file mapping whose file is missing here fails the rebuild with an error naming it.
#[test]
fn a_nobody_workload_keeps_its_pid_when_it_is_free() {
    use std::os::unix::fs::PermissionsExt;

    const NOBODY: u32 = 65534;
    let Some(Started {
        mut cleanup,
        pid: source_pid,
        dir,
        out,
    }) = start_workload(
        "migrate-samepid",
        "ptrace, pagemap frames, PR_SET_MM_MAP, clone3 set_tid",
    )
    else {
        return;
    };
    // The rebuilt process runs as nobody and goes on writing its file here.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();

    let frozen = dump::freeze(source_pid).expect("freezing the workload");
    let mut image = frozen.image().clone();
    image.creds.uid = [NOBODY; 3];
    image.creds.gid = [NOBODY; 3];
    image.creds.groups = vec![NOBODY];

    // A library missing on "this node".
    let mut broken = image.clone();
    let lib = broken
        .mappings
        .iter_mut()
        .find(|m| m.kind == MappingKind::File)
        .expect("a file mapping");
    lib.path = Some("/nonexistent/ferry/libgone.so".into());
    match restore::build(&broken) {
        Err(restore::RestoreError::MissingFile { path, .. }) => {
            assert_eq!(path, "/nonexistent/ferry/libgone.so")
        }
        other => panic!("expected MissingFile, got {other:?}"),
    }

    // Keep the pages, then let the source go: its pid is free again.
    let vaddrs = pages_to_copy(&image, frozen.pages());
    let src = File::open(format!("/proc/{source_pid}/mem")).unwrap();
    let mut contents = vec![0u8; vaddrs.len() * PAGE_SIZE as usize];
    for (chunk, &v) in contents.chunks_exact_mut(PAGE_SIZE as usize).zip(&vaddrs) {
        src.read_exact_at(chunk, v).unwrap();
    }
    drop(src);
    let last_before = *read_lines(&out).last().unwrap();
    frozen.kill().expect("killing the source");
    cleanup.source.take().unwrap().wait().unwrap();

    let mut skeleton = restore::build(&image).expect("building the skeleton");
    assert_eq!(
        skeleton.pid(),
        source_pid,
        "the free source pid was not reused"
    );
    let frames = skeleton.frames(&vaddrs).expect("frames of the skeleton");
    assert!(frames.iter().all(|&f| f != 0));
    let dst = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/mem", skeleton.pid()))
        .unwrap();
    for (chunk, &v) in contents.chunks_exact(PAGE_SIZE as usize).zip(&vaddrs) {
        dst.write_all_at(chunk, v).unwrap();
    }
    drop(dst);
    let pid = skeleton.resume().expect("resuming");
    cleanup.moved = Some(pid);

    counts_on(&out, last_before, 5, Duration::from_secs(20));
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(
        status_field(&status, "Uid:"),
        Some("65534\t65534\t65534\t65534")
    );
    assert_eq!(
        status_field(&status, "Gid:"),
        Some("65534\t65534\t65534\t65534")
    );
    assert_eq!(status_field(&status, "Groups:"), Some("65534"));
    assert_eq!(status_field(&status, "CapEff:"), Some("0000000000000000"));
    // Still dumpable, as the source was: its /proc files belong to it, not to root.
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(format!("/proc/{pid}/mem")).unwrap().uid();
    assert_eq!(owner, NOBODY);
}

/// A process from a node that booted ten minutes before this one: the workload runs in a
/// time namespace whose clocks are 600 s ahead of this machine's, as that node's would be.
/// It sleeps until deadlines on its own monotonic clock (Python's `time.sleep`). Rebuilt
/// with this node's clocks, it would sleep ten minutes and see its clock go back; it must
/// go on counting at once, its clock carrying on from where it stopped, 600 s ahead.
#[test]
fn a_process_from_a_node_that_booted_earlier_keeps_its_clock_and_sleeps_as_asked() {
    const AHEAD_S: i64 = 600;
    let ahead = AHEAD_S.to_string();
    let Some(Started {
        mut cleanup,
        pid: source_pid,
        out,
        ..
    }) = start_workload_under(
        "migrate-clocks",
        "ptrace, pagemap frames, PR_SET_MM_MAP, time namespaces",
        &[
            "unshare",
            "--time",
            "--fork",
            "--kill-child",
            "--monotonic",
            &ahead,
            "--boottime",
            &ahead,
        ],
    )
    else {
        return;
    };
    assert_eq!(
        monotonic_offset_s(source_pid),
        AHEAD_S,
        "the workload does not run 600 s ahead"
    );

    let frozen = dump::freeze(source_pid).expect("freezing the workload");
    let image = frozen.image();
    let mut skeleton = restore::build(image).expect("building the skeleton");
    let new_pid = skeleton.pid();
    let vaddrs = pages_to_copy(image, frozen.pages());
    skeleton.frames(&vaddrs).expect("frames of the skeleton");
    let last_before = *read_lines(&out).last().unwrap();
    copy_pages(source_pid, new_pid, &vaddrs);
    let resumed = skeleton.resume().expect("resuming the skeleton");
    cleanup.moved = Some(resumed);
    frozen.kill().expect("killing the source");
    if let Some(mut c) = cleanup.source.take() {
        c.wait().expect("reaping the source's unshare");
    }

    // It counts on within seconds, not ten minutes...
    let after = lines_after(&out, last_before, 5, Duration::from_secs(20));
    assert!(
        after.len() >= 5,
        "only {} lines in 20 s after the move (last before: {last_before:?}): it sleeps on a \
         clock that went back",
        after.len()
    );
    // ...its clock going on from where it stopped...
    let first = after[0];
    assert_eq!(first.n, last_before.n + 1);
    assert!(
        last_before.ms <= first.ms && first.ms <= last_before.ms + 20_000,
        "the monotonic clock went from {} ms to {} ms across the move",
        last_before.ms,
        first.ms
    );
    // ...in a time namespace of its own, 600 s ahead of this machine.
    let monotonic_s = monotonic_offset_s(new_pid);
    assert!(
        (AHEAD_S - 1..=AHEAD_S).contains(&monotonic_s),
        "the moved process's monotonic offset is {monotonic_s} s, not about {AHEAD_S}"
    );
}

/// The whole seconds of `pid`'s monotonic clock offset (`/proc/PID/timens_offsets`).
fn monotonic_offset_s(pid: u32) -> i64 {
    let offsets = fs::read_to_string(format!("/proc/{pid}/timens_offsets")).unwrap();
    offsets
        .lines()
        .find_map(|l| l.trim().strip_prefix("monotonic"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no monotonic offset for {pid} in:\n{offsets}"))
}

/// Pre-copy's early skeleton: the destination builds the process's address space from its
/// outline (read while it runs), pins and fills its pages while it still runs at the source,
/// then completes it from the freeze's image. The workload maps and unmaps memory all the
/// time, so its mappings at the freeze differ from the outline's: completing must follow
/// them, name the ranges whose frames changed, and keep every other frame (and its contents)
/// as it was filled. It also drops a page it had written (MADV_DONTNEED) after the outline:
/// that page, filled early, must read 0 again after the move.
#[test]
fn a_process_built_from_its_outline_while_it_ran_moves_with_its_changed_mappings() {
    let Some(Started {
        mut cleanup,
        pid: source_pid,
        out,
        ..
    }) = common::start_script(
        "migrate-outline",
        "ptrace, pagemap frames, PR_SET_MM_MAP",
        &[],
        common::CHURNING_WORKLOAD,
    )
    else {
        return;
    };

    // While it runs: the outline, the skeleton's address space, its pages pinned and filled.
    let (outline, outline_pages) = dump::outline(source_pid).expect("outlining the workload");
    assert!(outline.regs.is_empty() && outline.xstate.is_empty());
    let mut skeleton = restore::build_outline(&outline).expect("building from the outline");
    let early = pages_to_copy(&outline, &outline_pages);
    let early_frames = skeleton
        .frames(&early)
        .expect("frames of the outline's pages");
    copy_running_pages(source_pid, skeleton.pid(), &early);
    fs::write(out.with_file_name("drop"), b"").unwrap();
    std::thread::sleep(Duration::from_millis(600));

    // The freeze: its image's mappings changed (blocks mapped and unmapped meanwhile).
    let frozen = dump::freeze(source_pid).expect("freezing the workload");
    let image = frozen.image();
    let last_before = *read_lines(&out).last().unwrap();
    let changed: Vec<_> = image
        .mappings
        .iter()
        .filter(|m| !outline.mappings.contains(m))
        .collect();
    assert!(
        !changed.is_empty(),
        "the workload's mappings did not change in 600 ms"
    );
    let stale = skeleton
        .complete(image)
        .expect("completing the skeleton with the frozen image");
    let in_stale = |v: u64| stale.iter().any(|&(s, e)| s <= v && v < e);
    for m in &changed {
        assert!(
            in_stale(m.start) && in_stale(m.end - PAGE_SIZE),
            "new mapping {:#x}-{:#x} is not among the stale ranges {stale:x?}",
            m.start,
            m.end
        );
    }
    let vaddrs = pages_to_copy(image, frozen.pages());
    // Gone: filled early, and no longer the process's own page at the freeze (the dropped
    // one, read since, maps the shared zero page).
    let anon_then: HashSet<u64> = outline_pages
        .iter()
        .filter(|p| p.anon)
        .map(|p| p.vaddr)
        .collect();
    let anon_now: HashSet<u64> = frozen
        .pages()
        .iter()
        .filter(|p| p.anon)
        .map(|p| p.vaddr)
        .collect();
    let listed: HashSet<u64> = vaddrs.iter().copied().collect();
    let gone: Vec<u64> = early
        .iter()
        .copied()
        .filter(|v| {
            !in_stale(*v)
                && (!listed.contains(v) || (anon_then.contains(v) && !anon_now.contains(v)))
        })
        .collect();
    assert!(
        !gone.is_empty(),
        "the dropped page is not among the pages gone"
    );
    skeleton.discard(&gone).expect("dropping the pages gone");
    let frames = skeleton.frames(&vaddrs).expect("frames after completing");
    let now: std::collections::HashMap<u64, u64> =
        vaddrs.iter().copied().zip(frames.iter().copied()).collect();
    let mut kept = 0;
    for (v, f) in early.iter().zip(&early_frames) {
        if in_stale(*v) || gone.contains(v) {
            continue;
        }
        if let Some(g) = now.get(v) {
            assert_eq!(g, f, "page {v:#x} outside the stale ranges changed frame");
            kept += 1;
        }
    }
    assert!(
        kept as u64 >= (64 << 20) / PAGE_SIZE,
        "only {kept} pages kept their frame: the 64 MiB buffer is not among them"
    );
    // The last copy: what changed since (here everything is copied again; the VMM sends
    // only what KVM's dirty log and the stale ranges say).
    copy_pages(source_pid, skeleton.pid(), &vaddrs);
    let new_pid = skeleton.resume().expect("resuming the completed skeleton");
    cleanup.moved = Some(new_pid);
    frozen.kill().expect("killing the source");
    if let Some(mut c) = cleanup.source.take() {
        c.wait().expect("reaping the source");
    }

    counts_on(&out, last_before, 10, Duration::from_secs(20));
    // The dropped page reads 0 at the destination too.
    let bytes = common::dropped_page_bytes(&out);
    assert!(
        bytes.iter().all(|b| b == "0"),
        "the page dropped before the freeze reads {bytes:?} after the move"
    );
}

/// A skeleton built from an outline has no registers yet: it refuses to run until completed.
#[test]
fn a_skeleton_built_from_an_outline_refuses_to_run_before_it_is_completed() {
    let Some(Started {
        pid, cleanup: _c, ..
    }) = start_workload("outline-early", "ptrace, PR_SET_MM_MAP")
    else {
        return;
    };
    let (outline, _) = dump::outline(pid).expect("outlining the workload");
    let skeleton = restore::build_outline(&outline).expect("building from the outline");
    let skeleton_pid = skeleton.pid();
    match skeleton.resume() {
        Err(restore::RestoreError::Incomplete { pid }) => assert_eq!(pid, skeleton_pid),
        other => panic!("resuming an outline's skeleton: {other:?}"),
    }
    assert!(
        !Path::new(&format!("/proc/{skeleton_pid}")).exists(),
        "the refused skeleton {skeleton_pid} was not removed"
    );
}
