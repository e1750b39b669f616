//! Moving a process between two nodes: ferry against CRIU, on the same guests in the same host.
//!
//! `cargo bench --bench migrate [-- [--sizes 64,256,1024] [--rounds 3]]`
//!
//! A user's setup: a cluster file of the bench's own (cluster `benchmig`, two nodes `bench-a`
//! and `bench-b` with 1536 MiB each and Debian's `criu` on their root disks), `ferry up`, and
//! `ferry down --purge` at the end. Where the local KVM cannot boot a stock kernel the nodes run
//! in the nested host: a running one is used (and left running); otherwise one is started with
//! 6 GiB. For each size, a Python workload fills that many MiB with a pattern (no zero pages),
//! then counts, appending to /root/progress five times a second; it is started detached on
//! bench-a over `ferry ssh`, then moved to bench-b:
//!
//! - by ferry: `ferry migrate`'s library call; the job's `frozen_ms` and `total_ms` as the
//!   source's daemon measured them;
//! - by CRIU (3.17, Debian's): a page server on bench-b over TLS (certificates of the cluster
//!   CA), `criu dump` on bench-a sending its pages there, the other image files copied over ssh
//!   between the guests, `criu restore -d` on bench-b. All of it is driven from a script in
//!   bench-a (its clock), over one ssh connection to bench-b opened beforehand; freeze is from
//!   `criu dump` starting to `criu restore` returning, total from starting the page server.
//!   CRIU's images land in a tmpfs on bench-b; at sizes where images and the restored process
//!   would not fit in the guest together, the restore punches the images out as it goes
//!   (`--auto-dedup`). CRIU 3.17 refuses to run without nfnetlink (its kernel-feature probe),
//!   which ferry's guests do not load: the bench loads `nf_tables` and its dependencies from
//!   the same Debian kernel package into both guests.
//!
//! The cluster, the workload and both moves are shared with the live bench
//! (benches/common/cluster.rs, benches/common/criu.rs).
//!
//! A figure is printed only for a move after which the process counts on at bench-b from where
//! it was. Medians over the rounds. The page stream is also measured against plain TLS:
//! 256 MiB over a loopback connection with the cluster's mutual TLS, between two vm-memory
//! guests with `ferry_migration::send`/`receive`, and as plain writes, where the daemons run
//! (in the nested host when they do). Figures are printed, never asserted. Ratios are ferry's
//! time over CRIU's (below 1: ferry is faster; the goal at 256 MiB is 0.33 or less), and for
//! the stream ferry's throughput over plain TLS's.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

mod common;
use common::cluster::{first_line, sizes_and_rounds, Bench, Spec, NODE_A, NODE_B};
use common::median;

const SPEC: Spec = Spec {
    name: "benchmig",
    bench: "migrate",
    subnet: "10.79.9.0/24",
    api_port: 7495,
    peer_port: 7595,
};
const STREAM_MIB: usize = 256;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--stream-inner") {
        let (dir, rounds) = (&args[i + 1], args[i + 2].parse().unwrap_or(3));
        match stream_inner(Path::new(dir), rounds) {
            Ok(line) => {
                println!("{line}");
                std::process::exit(0)
            }
            Err(e) => {
                println!("stream ferry/tls ratio=not-measured ({e:#})");
                std::process::exit(1)
            }
        }
    }
    if let Some(i) = args.iter().position(|a| a == "--stream") {
        let inner = vec![
            args[0].clone(),
            "--stream-inner".into(),
            args[i + 1].clone(),
            args[i + 2].clone(),
        ];
        common::measure("migrate", inner, |_, _| Ok(()));
    }
    let Some((sizes, rounds)) = sizes_and_rounds(&args, 3) else {
        eprintln!("bench: usage: migrate [--sizes 64,256,1024] [--rounds N]");
        std::process::exit(2);
    };
    std::process::exit(match outer(&sizes, rounds) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench: migrate: {e:#}");
            1
        }
    });
}

/// One move's figures, in ms.
#[derive(Debug, Clone, Copy)]
struct Move {
    freeze_ms: f64,
    total_ms: f64,
}

fn outer(sizes: &[u64], rounds: usize) -> Result<()> {
    let bench = Bench::up(&SPEC)?;
    let criu = common::criu::prepare(&bench);
    if let Err(e) = &criu {
        eprintln!("bench: CRIU cannot run in these guests: {e:#}");
    }

    let mut lines = Vec::new();
    let mut gone: Option<String> = None;
    for &mib in sizes {
        if let Some(why) = bench.does_not_fit(mib).or(gone.clone()) {
            eprintln!("bench: {mib} MiB skipped: {why}");
            lines.push(format!(
                "migrate total ferry/criu ratio=not-measured mib={mib} (skipped: {why})"
            ));
            lines.push(format!(
                "migrate freeze ferry/criu ratio=not-measured mib={mib} (skipped: {why})"
            ));
            continue;
        }
        let (mut ferry_moves, mut criu_moves) = (Vec::new(), Vec::new());
        let mut errors: BTreeMap<&str, String> = BTreeMap::new();
        for round in 1..=rounds {
            if !errors.is_empty() {
                gone = bench.down_reason();
                if let Some(why) = &gone {
                    eprintln!("bench: {why}: no more rounds");
                    errors.entry("ferry").or_insert_with(|| why.clone());
                    errors.entry("criu").or_insert_with(|| why.clone());
                    break;
                }
            }
            match ferry_round(&bench, mib) {
                Ok(m) => {
                    eprintln!(
                        "bench: {mib} MiB round {round}: ferry frozen {:.0} ms, total {:.0} ms",
                        m.freeze_ms, m.total_ms
                    );
                    ferry_moves.push(m)
                }
                Err(e) => {
                    eprintln!("bench: {mib} MiB round {round}: ferry: {e:#}");
                    errors.insert("ferry", format!("{e:#}"));
                }
            }
            match &criu {
                Ok(_) => match criu_round(&bench, mib) {
                    Ok(m) => {
                        eprintln!(
                            "bench: {mib} MiB round {round}: criu frozen {:.0} ms, total {:.0} ms",
                            m.freeze_ms, m.total_ms
                        );
                        criu_moves.push(m)
                    }
                    Err(e) => {
                        eprintln!("bench: {mib} MiB round {round}: criu: {e:#}");
                        errors.insert("criu", format!("{e:#}"));
                    }
                },
                Err(e) => {
                    errors.insert("criu", format!("{e:#}"));
                }
            }
        }
        for (what, pick) in [
            ("total", (|m: &Move| m.total_ms) as fn(&Move) -> f64),
            ("freeze", |m: &Move| m.freeze_ms),
        ] {
            let f =
                (!ferry_moves.is_empty()).then(|| median(ferry_moves.iter().map(pick).collect()));
            let c = (!criu_moves.is_empty()).then(|| median(criu_moves.iter().map(pick).collect()));
            lines.push(match (f, c) {
                (Some(f), Some(c)) => format!(
                    "migrate {what} ferry/criu ratio={:.3} mib={mib} ferry_ms={f:.0} criu_ms={c:.0}",
                    f / c
                ),
                (f, c) => {
                    let mut why = Vec::new();
                    if f.is_none() {
                        why.push(format!("ferry: {}", first_line(&errors["ferry"])));
                    }
                    if c.is_none() {
                        why.push(format!("criu: {}", first_line(&errors["criu"])));
                    }
                    let known = f
                        .map(|f| format!(" ferry_ms={f:.0}"))
                        .or(c.map(|c| format!(" criu_ms={c:.0}")))
                        .unwrap_or_default();
                    format!(
                        "migrate {what} ferry/criu ratio=not-measured mib={mib}{known} ({})",
                        why.join("; ")
                    )
                }
            });
        }
        // The short form, for total and freeze time.
        let n = lines.len();
        for l in [lines[n - 2].clone(), lines[n - 1].clone()] {
            let ratio = l.split("ratio=").nth(1).and_then(|r| r.split(' ').next());
            if let Some(r) = ratio.filter(|r| *r != "not-measured") {
                lines.push(format!("migrate ferry/criu ratio={r} mib={mib}"));
            }
        }
    }

    // The page stream against plain TLS, where the daemons run.
    let tls_dir = bench.cluster.dir.tls_dir(&bench.cluster.config);
    let out = Command::new(std::env::current_exe()?)
        .args(["--stream", &tls_dir.to_string_lossy(), &rounds.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    let stream = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("stream "))
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "stream ferry/tls ratio=not-measured (the measurement exited {} without a figure)",
                out.status
            )
        });
    lines.push(stream);
    drop(bench);
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

fn ferry_round(b: &Bench, mib: u64) -> Result<Move> {
    b.move_workload(mib, None, |pid| {
        let asked = Instant::now();
        // Stop-and-copy, as CRIU's dump and restore are (pre-copy is measured by the live bench).
        let options = ferry::cluster::control::MigrateOptions {
            mode: ferry::cluster::api::MigrationMode::Stop,
            ..Default::default()
        };
        let job = b.ferry_move(pid, &options)?;
        eprintln!(
            "bench: {mib} MiB ferry: {} pages ({} zero), page stream {:.1} MiB/s, {} ms as `ferry migrate` saw it",
            job.pages_sent,
            job.zero_pages,
            job.throughput_mib_s,
            asked.elapsed().as_millis()
        );
        Ok(Move {
            freeze_ms: job.frozen_ms as f64,
            total_ms: job.total_ms as f64,
        })
    })
}

fn criu_round(b: &Bench, mib: u64) -> Result<Move> {
    b.move_workload(mib, None, |pid| {
        let m = common::criu::move_process(b, pid, mib, 0)?;
        Ok(Move {
            freeze_ms: m.downtime_ms,
            total_ms: m.total_ms,
        })
    })
}

/// 256 MiB over a loopback connection with the cluster's mutual TLS, `rounds` times each: as
/// ferry's page stream between two vm-memory guests, and as plain writes into a buffer. The
/// figures are payload MiB over the time from the first byte sent to the receiver's answer.
fn stream_inner(tls_dir: &Path, rounds: usize) -> Result<String> {
    use ferry_net::pki::{load_roots, Identity};
    use ferry_net::tls::{client_config, server_config, ClientAuth};
    let roots = load_roots(tls_dir)?;
    let server = server_config(
        roots.clone(),
        &Identity::load(tls_dir, NODE_B)?,
        ClientAuth::Required,
    )?;
    let client = client_config(roots, Some(&Identity::load(tls_dir, NODE_A)?))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (mut tls, mut fy) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        tls.push(rt.block_on(plain_tls_once(server.clone(), client.clone()))?);
        fy.push(rt.block_on(ferry_stream_once(server.clone(), client.clone()))?);
    }
    let (t, f) = (median(tls), median(fy));
    Ok(format!(
        "stream ferry/tls ratio={:.2} ferry_mib_s={f:.1} tls_mib_s={t:.1}",
        f / t
    ))
}

type Tls = tokio_rustls::TlsStream<tokio::net::TcpStream>;

/// A mutual TLS connection over loopback: (client side, server side).
async fn tls_pair(
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(Tls, Tls)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let s = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await?;
        Ok::<_, std::io::Error>(tokio_rustls::TlsStream::from(s))
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(NODE_B.to_string())?;
    let c = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await?;
    let s = accept.await??;
    Ok((tokio_rustls::TlsStream::from(c), s))
}

async fn plain_tls_once(
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut c, mut s) = tls_pair(server, client).await?;
    let data = pattern_buffer(STREAM_MIB << 20);
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; STREAM_MIB << 20];
        s.read_exact(&mut buf).await?;
        s.write_all(b"k").await?;
        s.flush().await?;
        Ok::<_, std::io::Error>(buf[4096])
    });
    let start = Instant::now();
    for chunk in data.chunks(1 << 20) {
        c.write_all(chunk).await?;
    }
    c.flush().await?;
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack).await?;
    let secs = start.elapsed().as_secs_f64();
    if receiver.await?? != data[4096] {
        bail!("the plain TLS stream arrived changed");
    }
    Ok(STREAM_MIB as f64 / secs)
}

async fn ferry_stream_once(
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> Result<f64> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let (mut c, mut s) = tls_pair(server, client).await?;
    let size = STREAM_MIB << 20;
    let source = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])?;
    source.write_slice(&pattern_buffer(size), GuestAddress(0))?;
    let dest = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])?;
    let n = (size / 4096) as u64;
    // Frames in a different order at each end, as a process's pages are.
    let pages: Vec<(u64, u64)> = (0..n).map(|i| (0x7f00_0000_0000 + i * 4096, i)).collect();
    let frames: Vec<u64> = (0..n).map(|i| (i * 7919) % n).collect();
    let timeouts = ferry_migration::Timeouts::default();
    let t2 = timeouts.clone();
    let receiver = tokio::spawn(async move {
        let incoming = ferry_migration::receive(&mut s, &t2)
            .await
            .map_err(|e| anyhow!(e.chain()))?;
        let landed = incoming
            .land(&frames, true, &dest, |_| {})
            .await
            .map_err(|e| anyhow!(e.chain()))?;
        landed
            .finish(Ok(()))
            .await
            .map_err(|e| anyhow!(e.chain()))?;
        Ok::<_, anyhow::Error>(dest)
    });
    let start = Instant::now();
    let stats = ferry_migration::send(&mut c, 1, b"bench", &pages, &source, &timeouts, |_| {})
        .await
        .map_err(|e| anyhow!(e.chain()))?;
    let secs = start.elapsed().as_secs_f64();
    let dest = receiver.await??;
    if stats.pages != n
        || dest.read_obj::<u64>(GuestAddress(4096 * 7919 % (n * 4096)))?
            != source.read_obj::<u64>(GuestAddress(4096))?
    {
        bail!(
            "ferry's page stream moved {} of {n} pages or changed them",
            stats.pages
        );
    }
    Ok(STREAM_MIB as f64 / secs)
}

/// `len` bytes, no page of them zero, every page different.
fn pattern_buffer(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    for (i, page) in v.chunks_mut(4096).enumerate() {
        page[0] = (i & 0xff) as u8 | 1;
        page[1] = (i >> 8) as u8 | 1;
    }
    v
}
