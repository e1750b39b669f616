//! CRIU's post-copy move of the workload from bench-a to bench-b (benches/live.rs): `criu dump
//! --lazy-pages` on bench-a dumps everything but the memory and then serves the pages; the
//! image files go to bench-b over ssh; there `criu lazy-pages` (the userfaultfd handler,
//! fetching from bench-a's dump over TLS) starts, and `criu restore --lazy-pages -d` resumes
//! the process at once, its pages arriving on fault and in the background. The dump ends once
//! every page was fetched. Downtime is from the dump starting to the restore returning (the
//! process runs at bench-b); total from the dump starting to its end. The guests are the ones
//! [`super::criu::prepare`] readied (certificates, ssh key, netfilter modules).

use std::time::Duration;

use anyhow::{bail, Result};

use super::cluster::{Bench, NODE_A, NODE_B, QUICK};
use super::criu::CriuMove;

const PORT: u16 = 27010;

/// The dump's page server listens on every address: with `--address`, CRIU checks the
/// client's certificate against that address (its own), which bench-b's cannot match.
///
/// The move, run in bench-a: `sh criu-lazy.sh PID`; prints the restored pid and
/// `criu-lazy-times T0 T1 T2 T3` (ns: dump started, its images written and its page server
/// ready, process restored at bench-b, every page fetched).
const SCRIPT: &str = r#"PID=$1
A=@A@; B=@B@; P=@PORT@; T=/root/criu-tls; I=/mnt/criu/img; W=/mnt/criu/work
SSH="ssh -i /root/.ssh/bench_mig -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/root/.ssh/bench_known -o ControlMaster=auto -o ControlPath=/root/.ssh/cm-%h -o ControlPersist=900 root@$B"
PREP="mkdir -p /mnt/criu && { mountpoint -q /mnt/criu || mount -t tmpfs -o size=1400m tmpfs /mnt/criu; } && rm -rf $I $W && mkdir -p $I/d $W"
TLS="--tls --tls-cacert $T/ca.pem"
DUMP=
fail() {
    echo "criu-failed: $1"
    [ -n "$DUMP" ] && kill -KILL $DUMP 2>/dev/null
    for f in $W/*.log; do [ -f $f ] && { echo "== bench-a $f"; grep -E 'Error|Warn' $f | tail -n 15; }; done
    $SSH "pkill -KILL -f '^criu lazy-pages'; for f in $W/*.log; do [ -f \$f ] && { echo == bench-b \$f; grep -E 'Error|Warn' \$f | tail -n 15; }; done"
    exit 1
}
sh -c "$PREP" || fail "preparing bench-a's image directory"
$SSH true || fail "ssh to bench-b"
$SSH "pkill -KILL -f '^criu (page-server|lazy-pages)'; $PREP && rm -f /root/progress && : > /root/w.out" || fail "preparing bench-b"
$SSH "[ ! -e /proc/$PID ] && { [ \$(cat /proc/sys/kernel/ns_last_pid) -ge $PID ] || echo $((PID + 1000)) > /proc/sys/kernel/ns_last_pid; }" || fail "pid $PID is in use on bench-b"
mkfifo $W/ready || fail "mkfifo"
t0=$(date +%s%N)
criu dump -t $PID -D $I/d -W $W -o dump.log --lazy-pages --port $P $TLS --tls-cert $T/criu-a.pem --tls-key $T/criu-a.key --status-fd 9 9>$W/ready &
DUMP=$!
head -c 1 $W/ready >/dev/null
kill -0 $DUMP 2>/dev/null || fail "criu dump --lazy-pages"
t1=$(date +%s%N)
tar -C $I -cf - . | $SSH "tar -C $I -xf -" || fail "copying the images"
$SSH "criu lazy-pages --page-server --address $A --port $P -D $I/d -W $W -o lazy.log $TLS --tls-cert $T/criu-b.pem --tls-key $T/criu-b.key --daemon && criu restore -D $I/d -W $W -o restore.log -d --lazy-pages --pidfile $W/pid && echo restored-pid \$(cat $W/pid)" || fail "criu restore --lazy-pages"
t2=$(date +%s%N)
wait $DUMP || { DUMP=; fail "criu dump serving the lazy pages"; }
t3=$(date +%s%N)
echo "criu-lazy-times $t0 $t1 $t2 $t3"
rm -rf $I; $SSH "rm -rf $I" || echo "criu-note: bench-b's images were not removed"
"#;

/// Moves the workload `pid` (of `mib` MiB) from bench-a to bench-b with CRIU's lazy pages.
/// The phases go to stderr. On failure the process is killed at bench-a.
pub fn move_process(b: &Bench, pid: u32, mib: u64) -> Result<CriuMove> {
    let script = SCRIPT
        .replace("@A@", &b.addr(NODE_A)?)
        .replace("@B@", &b.addr(NODE_B)?)
        .replace("@PORT@", &PORT.to_string());
    b.ssh(NODE_A, "cat > /root/criu-lazy.sh", script.as_bytes(), QUICK)?;
    let out = b.ssh_long(
        NODE_A,
        &format!("sh /root/criu-lazy.sh {pid}"),
        Duration::from_secs(300 + mib),
    );
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = b.ssh(NODE_A, &format!("kill -KILL {pid}"), b"", QUICK);
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
    let Some(t) = out
        .lines()
        .filter_map(|l| l.strip_prefix("criu-lazy-times "))
        .map(|l| {
            l.split_whitespace()
                .map(|v| v.parse::<f64>().unwrap_or(f64::NAN))
                .collect::<Vec<_>>()
        })
        .next_back()
        .filter(|t| t.len() == 4)
    else {
        bail!("no times from CRIU's lazy move: {out}");
    };
    eprintln!(
        "bench: {mib} MiB criu lazy: dump to page server ready {:.0} ms, images copied and restored {:.0} ms, pages fetched {:.0} ms after",
        (t[1] - t[0]) / 1e6,
        (t[2] - t[1]) / 1e6,
        (t[3] - t[2]) / 1e6
    );
    Ok(CriuMove {
        downtime_ms: (t[2] - t[0]) / 1e6,
        total_ms: (t[3] - t[0]) / 1e6,
    })
}
