//! CRIU's move of the workload from bench-a to bench-b, for the benches that compare ferry
//! with it (benches/migrate.rs, benches/live.rs): Debian's CRIU (3.17) prepared in both guests,
//! and a script in bench-a that moves the process, with or without pre-copy.
//!
//! The move: a page server on bench-b over TLS (certificates of the cluster CA), `criu dump` on
//! bench-a sending its pages there, the other image files copied over ssh between the guests,
//! `criu restore -d` on bench-b. All of it is driven from the script in bench-a (its clock),
//! over one ssh connection to bench-b opened beforehand. Downtime is from `criu dump` starting
//! to `criu restore` returning; total from starting the page server.
//!
//! CRIU's images land in a tmpfs on bench-b; at sizes where images and the restored process
//! would not fit in the guest together, the restore punches the images out as it goes
//! (`--auto-dedup`). CRIU 3.17 refuses to run without nfnetlink (its kernel-feature probe),
//! which ferry's guests do not load: [`prepare`] loads `nf_tables` and its dependencies from
//! the same Debian kernel package into both guests.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::cluster::{Bench, GUEST_MIB, NODE_A, NODE_B, QUICK};

const PORT: u16 = 27000;

/// The move, run in bench-a: `sh criu.sh PID [--auto-dedup]`. Prints the restored pid and
/// `criu-times T0 T1 T2 T3 T4` (ns: page server started, dump, images copied, restored).
const SCRIPT: &str = r#"PID=$1; DEDUP=$2
B=@B@; P=@PORT@; T=/root/criu-tls; I=/mnt/criu/img; W=/mnt/criu/work
SSH="ssh -i /root/.ssh/bench_mig -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/root/.ssh/bench_known -o ControlMaster=auto -o ControlPath=/root/.ssh/cm-%h -o ControlPersist=900 root@$B"
PREP="mkdir -p /mnt/criu && { mountpoint -q /mnt/criu || mount -t tmpfs -o size=1400m tmpfs /mnt/criu; } && rm -rf $I $W && mkdir -p $I $W"
fail() {
    echo "criu-failed: $1"
    for f in $W/dump.log; do [ -f $f ] && { echo "== bench-a $f"; grep -E 'Error|Warn' $f | tail -n 15; }; done
    $SSH "for f in $W/ps.log $W/restore.log; do [ -f \$f ] && { echo == bench-b \$f; grep -E 'Error|Warn' \$f | tail -n 15; }; done"
    exit 1
}
sh -c "$PREP" || fail "preparing bench-a's image directory"
$SSH true || fail "ssh to bench-b"
$SSH "$PREP && rm -f /root/progress && : > /root/w.out" || fail "preparing bench-b"
t0=$(date +%s%N)
$SSH "criu page-server -D $I -W $W -o ps.log --port $P --daemon --tls --tls-cacert $T/ca.pem --tls-cert $T/criu-b.pem --tls-key $T/criu-b.key" || fail "criu page-server"
t1=$(date +%s%N)
criu dump -t $PID -D $I -W $W -o dump.log --page-server --address $B --port $P --tls --tls-cacert $T/ca.pem --tls-cert $T/criu-a.pem --tls-key $T/criu-a.key || fail "criu dump"
t2=$(date +%s%N)
tar -C $I -cf - . | $SSH "tar -C $I -xf -" || fail "copying the images"
t3=$(date +%s%N)
$SSH "criu restore -D $I -W $W -o restore.log -d --pidfile $W/pid $DEDUP && echo restored-pid \$(cat $W/pid)" || fail "criu restore"
t4=$(date +%s%N)
echo "criu-times $t0 $t1 $t2 $t3 $t4"
"#;

/// Certificates of the cluster CA for CRIU's TLS (by guest address), an ssh key from bench-a
/// to bench-b, the netfilter modules CRIU's kernel probe needs, then `criu check`, and the
/// script on bench-a.
pub fn prepare(b: &Bench) -> Result<()> {
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
    Ok(())
}

/// One CRIU move's figures, in ms.
#[derive(Debug, Clone, Copy)]
pub struct CriuMove {
    pub downtime_ms: f64,
    pub total_ms: f64,
}

/// Moves the workload `pid` (of `mib` MiB) from bench-a to bench-b with CRIU; each phase goes
/// to stderr. On failure the process is killed at bench-a.
pub fn move_process(b: &Bench, pid: u32, mib: u64) -> Result<CriuMove> {
    // bench-b's tmpfs holds the pages and then the restored process holds them again.
    let dedup = if 2 * mib + 384 > GUEST_MIB {
        "--auto-dedup"
    } else {
        ""
    };
    let out = b.ssh(
        NODE_A,
        &format!("sh /root/criu.sh {pid} {dedup}"),
        b"",
        Duration::from_secs(300 + mib),
    );
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = b.ssh(NODE_A, &format!("kill -KILL {pid}"), b"", QUICK);
            return Err(e);
        }
    };
    let t: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("criu-times "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if t.len() != 5 {
        bail!("no times from CRIU's move: {out}");
    }
    eprintln!(
        "bench: {mib} MiB criu: page server {:.0} ms, dump {:.0} ms, images copied {:.0} ms, restore {:.0} ms",
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
