//! Post-copy, the daemon's part: the process resumes at the destination as soon as its
//! registers, mappings and eager pages (private copies of file pages) are there; its
//! anonymous memory follows while it runs.
//!
//! Source: freezes the process (as stop mode), sends the lazy list and the eager pages
//! ([`ferry_migration::send_postcopy`]); once the destination runs the process, streams the
//! lazy pages, those the destination asks for first ([`ferry_migration::serve_postcopy`]),
//! and kills the frozen original when every page is confirmed. A failure before the resume
//! thaws the original; after it, the process is lost (its only up-to-date copy ran at the
//! destination), as with QEMU's post-copy.
//!
//! Destination: the agent builds the skeleton, registers its anonymous mappings with a
//! userfaultfd and reports its staging frames (`Lazy`); the eager pages land; the process
//! resumes; then [`ferry_migration::receive_postcopy`] writes arriving pages into the staging
//! frames and the agent thread places them (`Place`) and reports the pages the process waits
//! for (`WaitFaults`), which become requests to the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_guest_agent::migrate::image::{MappingKind, ProcessImage};
use ferry_guest_agent::migrate::lazy::{Placement, ZERO_SLOT};
use ferry_guest_agent::protocol::Message;
use ferry_migration::postcopy::lazy_ranges;
use ferry_migration::{Incoming, LazyTarget, PlaceRequest, Stats, Timeouts};

use super::{agent_error, private_pages, First, JobFailure, Plan};
use crate::cluster::api::PostcopyProgress;
use crate::cluster::daemon::{lock, log, Node};

/// How long the agent thread waits for a page fault before it looks for pages to place.
const FAULT_POLL_MS: u32 = 2;

/// How many milliseconds the agent thread waits for the next batch to place before it asks
/// the agent for faults instead (the answers to `Place` bring the faults while batches flow).
const IDLE_MS: u32 = 3;

/// The `(start, end)` of the image's private anonymous mappings (anonymous, heap, stack):
/// their pages travel after the resume.
fn anonymous_ranges(image: &ProcessImage) -> Vec<(u64, u64)> {
    image
        .mappings
        .iter()
        .filter(|m| {
            !m.shared
                && matches!(
                    m.kind,
                    MappingKind::Anonymous | MappingKind::Heap | MappingKind::Stack
                )
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// `(vaddr, pfn)` pairs.
type Pages = Vec<(u64, u64)>;

/// Splits `(vaddr, pfn)` pages into the eager ones (outside `ranges`) and the lazy ones.
fn split_pages(pages: Pages, ranges: &[(u64, u64)]) -> (Pages, Pages) {
    pages
        .into_iter()
        .partition(|&(v, _)| !ranges.iter().any(|&(s, e)| s <= v && v < e))
}

impl Node {
    /// The source's side of a post-copy job, from the frozen process: Ok once every page is
    /// at the destination. `resumed_at` is set when the process runs there.
    pub(super) async fn stream_postcopy(
        &self,
        plan: &Plan,
        first: First,
        resumed_at: &mut Option<Instant>,
    ) -> Result<Stats, JobFailure> {
        let First::Frozen(frozen) = first else {
            return Err("post-copy starts from a frozen process".into());
        };
        let (image, pages) = *frozen;
        let dest = &plan.dest;
        let mut stream = self.open_migration_stream(plan).await?;
        let memory = self.memory()?;
        let id = plan.id;
        let setup_ms = plan.started.elapsed().as_millis() as u64;
        let (eager, lazy) = split_pages(private_pages(&pages), &anonymous_ranges(&image));
        let total = (eager.len() + lazy.len()) as u64;
        let lazy_pages = lazy.len() as u64;
        self.jobs.update(id, |j| {
            j.setup_ms = setup_ms;
            j.pages_total = total;
            j.pages_sent = 0;
            j.bytes_total = total * 4096;
            j.bytes_remaining = total * 4096;
            j.postcopy = Some(PostcopyProgress {
                lazy_pages,
                ..PostcopyProgress::default()
            });
        });
        let image_bytes = Message::Frozen(image).encode();
        let jobs = &self.jobs;
        let timeouts = Timeouts::default();
        let resumed = ferry_migration::send_postcopy(
            &mut stream,
            id,
            &image_bytes,
            &eager,
            &lazy,
            &memory,
            &timeouts,
            |s| {
                jobs.update(id, |j| {
                    j.pages_sent = s.pages;
                    j.zero_pages = s.zero_pages;
                    j.bytes_sent = s.bytes;
                    j.bytes_remaining = (total - s.pages) * 4096;
                    j.throughput_mib_s = super::round1(s.throughput_mib_s);
                })
            },
        )
        .await
        .map_err(|e| {
            JobFailure::Failed(format!(
                "moving the process to {}: {}",
                dest.name,
                e.chain()
            ))
        })?;
        let now = Instant::now();
        *resumed_at = Some(now);
        let resumed_ms = (now - plan.started).as_millis() as u64;
        let new_pid = resumed
            .note
            .strip_prefix("pid ")
            .and_then(|p| p.parse().ok());
        jobs.update(id, |j| {
            j.new_pid = new_pid;
            j.pages_sent = resumed.pages;
            j.zero_pages = resumed.zero_pages;
            j.bytes_sent = resumed.bytes;
            if let Some(p) = j.postcopy.as_mut() {
                p.resumed_ms = resumed_ms;
            }
        });
        log(format!(
            "migration {id}: process {} runs on {} after {resumed_ms} ms ({} eager pages); {lazy_pages} pages follow",
            plan.pid,
            dest.name,
            eager.len()
        ));
        let before = resumed.clone();
        let after = ferry_migration::serve_postcopy(&mut stream, &lazy, &memory, &timeouts, |s| {
            jobs.update(id, |j| {
                j.pages_sent = before.pages + s.pages;
                j.zero_pages = before.zero_pages + s.zero_pages;
                j.bytes_sent = before.bytes + s.bytes;
                j.bytes_remaining = (total - j.pages_sent) * 4096;
                j.throughput_mib_s = super::round1(s.throughput_mib_s);
                if let Some(p) = j.postcopy.as_mut() {
                    p.pages_after_resume = s.pages;
                    p.pages_on_demand = s.requested_pages;
                }
            })
        })
        .await
        .map_err(|e| {
            JobFailure::Lost(format!(
                "sending the pages that follow the resume to {}: {}",
                dest.name,
                e.chain()
            ))
        })?;
        jobs.update(id, |j| {
            if let Some(p) = j.postcopy.as_mut() {
                p.pages_after_resume = after.pages;
                p.pages_on_demand = after.requested_pages;
            }
        });
        log(format!(
            "migration {id}: post-copy done: {} pages after the resume, {} of them on demand",
            after.pages, after.requested_pages
        ));
        Ok(Stats {
            pages: resumed.pages + after.pages,
            zero_pages: resumed.zero_pages + after.zero_pages,
            bytes: resumed.bytes + after.bytes,
            throughput_mib_s: after.throughput_mib_s,
            note: resumed.note,
            ..Stats::default()
        })
    }

    /// The destination's side of a post-copy job, from its description.
    pub(super) async fn receive_postcopy<S>(
        self: &Arc<Self>,
        incoming: Incoming<'_, S>,
        image: ProcessImage,
        from: &str,
        origin: super::Origin,
    ) -> Result<(), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let lazy = incoming.lazy_vaddrs().to_vec();
        let ranges = match lazy_ranges(&anonymous_ranges(&image), &lazy) {
            Ok(r) => r,
            Err(v) => {
                let e = format!(
                    "post-copy page {v:#x} is not in the process's private anonymous memory"
                );
                let _ = incoming.reject(&e).await;
                return Err(e);
            }
        };
        let eager = incoming.vaddrs().to_vec();
        let comm = image.comm.clone();
        let image_pid = image.pid;
        // The agent's connection holds the skeleton, then serves the pages that follow: one
        // thread, as ptrace wants.
        type Built = (u32, Vec<u64>, Vec<u64>);
        let (built_tx, built_rx) = tokio::sync::oneshot::channel::<Result<Built, String>>();
        let (resume_tx, resume_rx) = std::sync::mpsc::channel::<bool>();
        let (resumed_tx, resumed_rx) = tokio::sync::oneshot::channel::<Result<u32, String>>();
        let (place_tx, mut place_rx) = tokio::sync::mpsc::channel::<PlaceRequest>(1);
        let (fault_tx, fault_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<bool>();
        let node = self.clone();
        std::thread::Builder::new()
            .name("land-postcopy".into())
            .spawn(move || {
                let built = node.agent_connection().and_then(|mut conn| {
                    let pid = conn
                        .rebuild(&image)
                        .map_err(|e| agent_error("rebuilding the process", &e))?;
                    let staged = conn
                        .lazy(&ranges)
                        .map_err(|e| agent_error("preparing post-copy", &e))
                        .and_then(|staging| {
                            let frames = conn
                                .want_frames(&eager)
                                .map_err(|e| agent_error("pinning the skeleton's pages", &e))?;
                            Ok((staging, frames))
                        });
                    match staged {
                        Ok((staging, frames)) => Ok((
                            conn,
                            pid,
                            frames.iter().map(|f| f.pfn).collect(),
                            staging.iter().map(|f| f.pfn).collect(),
                        )),
                        Err(e) => {
                            let _ = conn.abort(pid);
                            Err(e)
                        }
                    }
                });
                let (mut conn, pid, frames, staging) = match built {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        return;
                    }
                };
                let _ = built_tx.send(Ok((pid, frames, staging)));
                if !resume_rx.recv().unwrap_or(false) {
                    let _ = conn.abort(pid);
                    let _ = resumed_tx.send(Err("aborted".into()));
                    return;
                }
                let resumed = conn
                    .resume(pid)
                    .map_err(|e| agent_error("resuming the process", &e));
                let ok = resumed.is_ok();
                let _ = resumed_tx.send(resumed);
                if !ok {
                    return;
                }
                // Place what arrives, report what the process waits for, until the engine
                // is done.
                let mut idle = 0;
                loop {
                    match place_rx.try_recv() {
                        Ok(req) => {
                            idle = 0;
                            let pages: Vec<Placement> = req
                                .pages
                                .iter()
                                .map(|&(vaddr, slot)| Placement {
                                    vaddr,
                                    slot: slot.unwrap_or(ZERO_SLOT),
                                })
                                .collect();
                            let placed = conn.place(&pages).map(|faults| {
                                if !faults.is_empty() {
                                    let _ = fault_tx.send(faults);
                                }
                            });
                            let _ = req
                                .done
                                .send(placed.map_err(|e| agent_error("placing pages", &e)));
                            continue;
                        }
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
                    }
                    if idle < IDLE_MS {
                        idle += 1;
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    idle = 0;
                    match conn.wait_faults(FAULT_POLL_MS) {
                        Ok(faults) if !faults.is_empty() => {
                            let _ = fault_tx.send(faults);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            log(format!(
                                "post-copy of pid {pid}: {}",
                                agent_error("reading page faults", &e)
                            ));
                            break;
                        }
                    }
                }
                drop(fault_tx);
                // Every page placed: the agent lets go of the process. Otherwise the
                // connection closes with pages missing, and the agent kills it.
                if end_rx.recv().unwrap_or(false) {
                    if let Err(e) = conn.lazy_end(pid) {
                        log(format!(
                            "post-copy of pid {pid}: {}",
                            agent_error("ending post-copy", &e)
                        ));
                    }
                }
            })
            .map_err(|e| format!("starting the landing thread: {e}"))?;
        let (skeleton, frames, staging) = match built_rx.await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = incoming.reject(&e).await;
                return Err(e);
            }
            Err(_) => return Err("the landing thread ended early".into()),
        };
        log(format!(
            "incoming process {image_pid} ({comm}) from {from} (post-copy): skeleton pid {skeleton}, {} pages before the resume, {} after",
            frames.len(),
            lazy.len()
        ));
        let memory = self.memory()?;
        let landed = match incoming.land(&frames, false, &memory, |_| {}).await {
            Ok(l) => l,
            Err(e) => {
                let _ = resume_tx.send(false);
                return Err(format!("landing the pages: {}", e.chain()));
            }
        };
        let _ = resume_tx.send(true);
        let resumed = resumed_rx
            .await
            .unwrap_or_else(|_| Err("the landing thread ended".into()));
        let pid = match resumed {
            Ok(pid) => pid,
            Err(e) => {
                let _ = landed.finish_with_note(Err(e.clone())).await;
                return Err(e);
            }
        };
        let t = Instant::now();
        let (_, stream) = landed
            .resumed_postcopy(&format!("pid {pid}"))
            .await
            .map_err(|e| e.chain())?;
        lock(&self.jobs.arrivals).insert(pid, origin.clone());
        let target = LazyTarget {
            staging: &staging,
            place: place_tx,
            faults: fault_rx,
        };
        let received = ferry_migration::receive_postcopy(
            stream,
            &lazy,
            target,
            &memory,
            &Timeouts::default(),
            |_| {},
        )
        .await;
        let _ = end_tx.send(received.is_ok());
        match received {
            Ok(stats) => {
                log(format!(
                    "process {pid} ({comm}) arrived from {from} (post-copy): {} pages after the resume in {} ms, {} asked for on demand",
                    stats.pages,
                    t.elapsed().as_millis(),
                    stats.requested_pages
                ));
                Ok(())
            }
            Err(e) => {
                lock(&self.jobs.arrivals).remove(&pid);
                // Give the agent thread a moment to close the connection (which kills it).
                tokio::time::sleep(Duration::from_millis(10)).await;
                Err(format!(
                    "process {pid} ({comm}) from {from} is lost: its pages stopped arriving after it resumed: {}",
                    e.chain()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_pages_are_lazy_and_file_copies_eager() {
        let ranges = [(0x1000, 0x3000), (0x8000, 0x9000)];
        let (eager, lazy) = split_pages(
            vec![(0x0, 1), (0x1000, 2), (0x2000, 3), (0x3000, 4), (0x8000, 5)],
            &ranges,
        );
        assert_eq!(eager, vec![(0x0, 1), (0x3000, 4)]);
        assert_eq!(lazy, vec![(0x1000, 2), (0x2000, 3), (0x8000, 5)]);
    }
}
