//! What the benches share: running the measurement where a stock kernel can boot (this
//! machine's KVM, or the nested host, started for the bench if none is running and stopped
//! afterwards unless another ferry uses it), and medians.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use ferry::nested::NestedHost;

/// Runs the measurement, `inner_args` (the bench's own executable first), and exits with its
/// status. On this machine's KVM when it can boot a stock kernel; otherwise inside the nested
/// host, from a staged copy of the bench executable, after `prepare` has adapted the
/// arguments to it (staging or sharing files); what `prepare` returns lives until the
/// measurement ends. `bench` names the bench in messages.
pub fn measure<K>(
    bench: &str,
    mut inner_args: Vec<String>,
    prepare: impl FnOnce(&NestedHost, &mut [String]) -> Result<K>,
) -> ! {
    let Some(reason) = ferry::nested::local_kvm_problem() else {
        eprintln!("bench: measuring on this machine's KVM");
        let status = Command::new(&inner_args[0])
            .args(&inner_args[1..])
            .status()
            .expect("run the measurement");
        std::process::exit(status.code().unwrap_or(1));
    };
    eprintln!("bench: {reason}\nbench: measuring both VMMs inside the nested host");
    let (host, started) = match NestedHost::running().expect("nested host state") {
        Some(h) => (h, false),
        None => (
            NestedHost::start(&ferry::nested::HostOptions::default())
                .expect("start the nested host"),
            true,
        ),
    };
    let env = vec![
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_string(),
        ),
        (
            "HOME".to_string(),
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        ),
    ];
    let code = (|| -> Result<i32> {
        let exe = std::path::PathBuf::from(&inner_args[0]);
        inner_args[0] = host.stage_executable(&exe)?.to_string_lossy().into_owned();
        let _keep = prepare(&host, &mut inner_args)?;
        Ok(host.exec(&inner_args, Path::new("/"), &env, false)?)
    })();
    if started {
        // Another ferry may have started using the host meanwhile: leave it to them then.
        let _ = host.stop_if_unused();
    }
    std::process::exit(
        code.unwrap_or_else(|e| panic!("{bench}: run the measurement in the nested host: {e:#}")),
    );
}

/// The median of `v` (the upper one of an even count); `v` is not empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
