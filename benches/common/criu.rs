//! CRIU's move of the workload from bench-a to bench-b, for the benches that compare ferry
//! with it (benches/migrate.rs, benches/live.rs): Debian's CRIU (3.17) prepared in both guests,
//! and a script in bench-a that moves the process, with or without pre-copy.
//!
//! The move: a page server on bench-b over TLS (certificates of the cluster CA), `criu dump` on
//! bench-a sending its pages there, the other image files copied over ssh between the guests,
//! `criu restore -d` on bench-b. With pre-copy, `criu pre-dump`s go first, each to a page
//! server of its own with the previous images as parent, while the process runs; the final
//! `criu dump --track-mem` then sends only what was written since. All of it is driven from the
//! script in bench-a (its clock), over one ssh connection to bench-b opened beforehand.
//! Downtime is from the final `criu dump` starting to `criu restore` returning; total from
//! starting the first page server. The restore needs the process's pid free on bench-b (the
//! guests have no pid namespaces for it): the script checks it is, and moves bench-b's next
//! pids past it (`ns_last_pid`) so that its own commands there do not take it.
//!
//! CRIU's images land in a tmpfs on bench-b; at sizes where images and the restored process
//! would not fit in the guest together, the restore punches the images out as it goes
//! (`--auto-dedup`), and so do the page servers after a pre-dump, for the parent's pages the
//! new images replace. CRIU 3.17 refuses to run without nfnetlink (its kernel-feature probe),
//! which ferry's guests do not load: [`prepare`] loads `nf_tables` and its dependencies from
//! the same Debian kernel package into both guests.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::cluster::{Bench, GUEST_MIB, NODE_A, NODE_B, QUICK};

const PORT: u16 = 27000;

/// The move, run in bench-a: `sh criu.sh PID PREDUMPS [--auto-dedup]`. Up to PREDUMPS
/// pre-dumps (fewer once one wrote at most 256 pages, or not a tenth fewer than the one
/// before), each printing `criu-predump N START END PAGES_WRITTEN`; then the restored pid and
/// `criu-times T0 T1 T2 T3 T4` (ns: first page server started, final dump started, images
/// copied, restored).
const SCRIPT: &str = r#"PID=$1; PREDUMPS=$2; DEDUP=$3
B=@B@; P=@PORT@; T=/root/criu-tls; I=/mnt/criu/img; W=/mnt/criu/work
SSH="ssh -i /root/.ssh/bench_mig -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/root/.ssh/bench_known -o ControlMaster=auto -o ControlPath=/root/.ssh/cm-%h -o ControlPersist=900 root@$B"
PREP="mkdir -p /mnt/criu && { mountpoint -q /mnt/criu || mount -t tmpfs -o size=1400m tmpfs /mnt/criu; } && rm -rf $I $W && mkdir -p $I $W"
TLS="--tls --tls-cacert $T/ca.pem"
fail() {
    echo "criu-failed: $1"
    for f in $W/*.log; do [ -f $f ] && { echo "== bench-a $f"; grep -E 'Error|Warn' $f | tail -n 15; }; done
    $SSH "for f in $W/*.log; do [ -f \$f ] && { echo == bench-b \$f; grep -E 'Error|Warn' \$f | tail -n 15; }; done"
    # The images in the tmpfs would keep their memory from the moves that follow.
    rm -rf $I; $SSH "pkill -KILL -f '^criu page-server'; rm -rf $I"
    exit 1
}
# A page server on bench-b for the images directory $I/$1; $2: its parent's options.
page_server() {
    $SSH "mkdir -p $I/$1 && criu page-server -D $I/$1 $2 -W $W -o ps-$1.log --port $P --daemon $TLS --tls-cert $T/criu-b.pem --tls-key $T/criu-b.key" || fail "criu page-server for $1"
    mkdir -p $I/$1
}
TO_B="--page-server --address $B --port $P $TLS --tls-cert $T/criu-a.pem --tls-key $T/criu-a.key"
sh -c "$PREP" || fail "preparing bench-a's image directory"
$SSH true || fail "ssh to bench-b"
# The restore needs the process's pid free on bench-b: it must not be in use there, and
# bench-b's next pids are moved past it.
$SSH "pkill -KILL -f '^criu page-server'; $PREP && rm -f /root/progress && : > /root/w.out" || fail "preparing bench-b"
$SSH "[ ! -e /proc/$PID ] && { [ \$(cat /proc/sys/kernel/ns_last_pid) -ge $PID ] || echo $((PID + 1000)) > /proc/sys/kernel/ns_last_pid; }" || fail "pid $PID is in use on bench-b"
t0=$(date +%s%N)
PARENT=; last=; n=0
while [ $n -lt $PREDUMPS ]; do
    n=$((n + 1))
    page_server $n "$PARENT ${PARENT:+$DEDUP}"
    s=$(date +%s%N)
    criu pre-dump -t $PID -D $I/$n -W $W -o pre-$n.log $PARENT --track-mem --display-stats $TO_B >$W/stats-$n 2>&1 || { cat $W/stats-$n; fail "criu pre-dump $n"; }
    e=$(date +%s%N)
    w=$(cat $W/stats-$n $W/pre-$n.log | sed -n 's/^.*Memory pages written: \([0-9]*\).*$/\1/p' | tail -n 1)
    echo "criu-predump $n $s $e ${w:-unknown}"
    PARENT="--prev-images-dir ../$n"
    case $w in ''|*[!0-9]*) break ;; esac
    [ $w -le 256 ] && break
    [ -n "$last" ] && [ $((w * 10)) -ge $((last * 9)) ] && break
    last=$w
done
page_server d "$PARENT ${PARENT:+$DEDUP}"
t1=$(date +%s%N)
criu dump -t $PID -D $I/d -W $W -o dump.log $PARENT ${PARENT:+--track-mem} $TO_B || fail "criu dump"
t2=$(date +%s%N)
tar -C $I -cf - . | $SSH "tar -C $I -xf -" || fail "copying the images"
t3=$(date +%s%N)
$SSH "criu restore -D $I/d -W $W -o restore.log -d --pidfile $W/pid $DEDUP && echo restored-pid \$(cat $W/pid)" || fail "criu restore"
t4=$(date +%s%N)
echo "criu-times $t0 $t1 $t2 $t3 $t4"
# The images are not needed any more: their memory is the guests' again.
rm -rf $I; $SSH "rm -rf $I" || echo "criu-note: bench-b's images were not removed"
"#;

/// What CRIU can do in these guests.
pub struct Criu {
    /// Why `criu pre-dump` cannot work here, if it cannot.
    pub no_predump: Option<String>,
}

/// Certificates of the cluster CA for CRIU's TLS (by guest address), an ssh key from bench-a
/// to bench-b, the netfilter modules CRIU's kernel probe needs, then `criu check`, and the
/// script on bench-a; and whether pre-dump works (`criu check --feature mem_dirty_track`).
pub fn prepare(b: &Bench) -> Result<Criu> {
    let tls = b.cluster.dir.tls_dir(&b.cluster.config);
    let ca = ferry_net::pki::ClusterCa::load_or_create(&tls, b.spec.name)?;
    let certs = b.file.with_file_name("criu-tls");
    for (name, node) in [("criu-a", NODE_A), ("criu-b", NODE_B)] {
        ca.issue(&certs, name, &[], &[b.addr(node)?.parse()?])?;
    }
    let kernel = ferry::kernel::KernelPackage::fetch(&ferry::debian::cache_dir())?;
    let modules = ferry::kmod::ModuleIndex::open(&kernel.modules)?.resolve(&["nf_tables"])?;
    for node in [NODE_A, NODE_B] {
        b.ssh(node, "rm -rf /root/criu-tls /root/kmod; mkdir -p /root/criu-tls /root/kmod; chmod 700 /root/criu-tls", b"", QUICK)?;
        for f in [
            "ca.pem",
            "criu-a.pem",
            "criu-a.key",
            "criu-b.pem",
            "criu-b.key",
        ] {
            let data = std::fs::read(certs.join(f))?;
            b.ssh(node, &format!("cat > /root/criu-tls/{f}"), &data, QUICK)?;
        }
        let mut load = String::new();
        for m in &modules {
            let name = m.file_name();
            b.ssh(
                node,
                &format!("cat > /root/kmod/{name}"),
                &m.load_bytes()?,
                QUICK,
            )?;
            load.push_str(&format!("busybox insmod /root/kmod/{name} 2>/dev/null; "));
        }
        load.push_str("grep -q '^nf_tables ' /proc/modules && criu check");
        b.ssh(node, &load, b"", QUICK).context("criu check")?;
    }
    let key = b.ssh(NODE_A, "test -f /root/.ssh/bench_mig || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/bench_mig; cat /root/.ssh/bench_mig.pub", b"", QUICK)?;
    b.ssh(
        NODE_B,
        "mkdir -p /root/.ssh; k=$(cat); grep -qF \"$k\" /root/.ssh/authorized_keys 2>/dev/null || echo \"$k\" >> /root/.ssh/authorized_keys",
        key.trim().as_bytes(),
        QUICK,
    )?;
    let script = SCRIPT
        .replace("@B@", &b.addr(NODE_B)?)
        .replace("@PORT@", &PORT.to_string());
    b.ssh(NODE_A, "cat > /root/criu.sh", script.as_bytes(), QUICK)?;
    let no_predump = b
        .ssh(
            NODE_A,
            "criu check --feature mem_dirty_track 2>&1",
            b"",
            QUICK,
        )
        .err()
        .map(|e| {
            format!(
                "CRIU's pre-dump needs memory tracking (soft-dirty), which `criu check` does not find here: {}",
                super::cluster::first_line(&format!("{e:#}"))
            )
        });
    Ok(Criu { no_predump })
}

/// One CRIU move's figures, in ms.
#[derive(Debug, Clone, Copy)]
pub struct CriuMove {
    pub downtime_ms: f64,
    pub total_ms: f64,
}

/// Moves the workload `pid` (of `mib` MiB) from bench-a to bench-b with CRIU, after up to
/// `predumps` pre-dumps (0: plain dump and restore). The pre-dumps and each phase go to
/// stderr. On failure the process is killed at bench-a.
pub fn move_process(b: &Bench, pid: u32, mib: u64, predumps: u32) -> Result<CriuMove> {
    // bench-b's tmpfs holds the pages and then the restored process holds them again.
    let dedup = if 2 * mib + 384 > GUEST_MIB {
        "--auto-dedup"
    } else {
        ""
    };
    let out = b.ssh_long(
        NODE_A,
        &format!("sh /root/criu.sh {pid} {predumps} {dedup}"),
        Duration::from_secs(300 + mib * (1 + predumps as u64)),
    );
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = b.ssh(NODE_A, &format!("kill -KILL {pid}"), b"", QUICK);
            // The script's own word on what failed leads, with CRIU's first error.
            let text = format!("{e:#}");
            let criu_error = text.lines().find(|l| l.starts_with("Error ("));
            let why = text.lines().find(|l| l.starts_with("criu-failed: "));
            return Err(match (why, criu_error) {
                (Some(why), Some(c)) => e.context(format!("{why}: {c}")),
                (Some(why), None) => e.context(why.to_string()),
                (None, _) => e,
            });
        }
    };
    let numbers = |prefix: &str| -> Vec<Vec<f64>> {
        out.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|l| {
                l.split_whitespace()
                    .map(|v| v.parse().unwrap_or(f64::NAN))
                    .collect()
            })
            .collect()
    };
    let Some(t) = numbers("criu-times ").pop().filter(|t| t.len() == 5) else {
        bail!("no times from CRIU's move: {out}");
    };
    for p in numbers("criu-predump ") {
        if let [n, start, end, pages] = p[..] {
            eprintln!(
                "bench: {mib} MiB criu: pre-dump {n}: {pages} pages written in {:.0} ms",
                (end - start) / 1e6
            );
        }
    }
    eprintln!(
        "bench: {mib} MiB criu: first page server to the final one {:.0} ms, dump {:.0} ms, images copied {:.0} ms, restore {:.0} ms",
        (t[1] - t[0]) / 1e6,
        (t[2] - t[1]) / 1e6,
        (t[3] - t[2]) / 1e6,
        (t[4] - t[3]) / 1e6
    );
    Ok(CriuMove {
        downtime_ms: (t[4] - t[1]) / 1e6,
        total_ms: (t[4] - t[0]) / 1e6,
    })
}
