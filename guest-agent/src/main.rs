//! `ferry-agent`: runs inside a ferry guest (or the nested host) and executes commands for the
//! host. Logs go to stderr, which in the guest is the console.
//!
//! ```text
//! ferry-agent --serial /dev/ttyS1 [--vsock 1024]
//! ferry-agent --listen 0.0.0.0:7000 [--chroot /host]
//! ```
//!
//! `--serial` and `--vsock` may be given together: the agent then answers on both, the serial
//! port being the channel of last resort when the VMM offers no vsock device.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferry_guest_agent::server::{log, Agent};
use ferry_guest_agent::vsock::VsockListener;

const USAGE: &str =
    "usage: ferry-agent [--serial DEVICE] [--vsock PORT] | --listen ADDR:PORT [--chroot DIR]";

#[derive(Debug)]
enum Mode {
    /// A serial port, a vsock port, or both.
    Guest {
        serial: Option<PathBuf>,
        vsock: Option<u32>,
    },
    Listen(SocketAddr),
}

fn parse_args(args: &[String]) -> Result<(Mode, Option<PathBuf>), String> {
    let mut serial = None;
    let mut vsock = None;
    let mut listen = None;
    let mut chroot = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--serial" => serial = Some(PathBuf::from(value()?)),
            "--vsock" => {
                let v = value()?;
                vsock = Some(
                    v.parse()
                        .map_err(|_| format!("--vsock wants a port number, got `{v}`"))?,
                );
            }
            "--listen" => {
                let v = value()?;
                // A literal address: name resolution would need NSS, which a static binary lacks.
                let addr = v
                    .parse()
                    .map_err(|_| format!("--listen wants IP:PORT, got `{v}`"))?;
                listen = Some(addr);
            }
            "--chroot" => chroot = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let mode = match (listen, serial.is_some() || vsock.is_some()) {
        (Some(_), true) => return Err("--listen goes alone, without --serial or --vsock".into()),
        (Some(addr), false) => Mode::Listen(addr),
        (None, true) => Mode::Guest { serial, vsock },
        (None, false) => return Err("one of --serial, --vsock or --listen is required".into()),
    };
    if chroot.is_some() && !matches!(mode, Mode::Listen(_)) {
        return Err("--chroot goes with --listen".into());
    }
    Ok((mode, chroot))
}

fn serve_serial(agent: &Agent, device: &PathBuf) -> ! {
    let mut reported = false;
    loop {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(device)
            .and_then(|port| {
                ferry_guest_agent::make_raw(&port)?;
                Ok(port)
            });
        match opened {
            Ok(port) => {
                reported = false;
                log(format_args!("serving on {}", device.display()));
                match agent.serve(port) {
                    Ok(()) => log(format_args!("{} closed", device.display())),
                    Err(e) => log(format_args!("{}: {e}", device.display())),
                }
            }
            Err(e) if !reported => {
                reported = true;
                log(format_args!(
                    "cannot open {}: {e}; retrying",
                    device.display()
                ));
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Serves vsock connections on `port`, binding again until the guest's vsock transport exists
/// (its modules load during boot).
fn serve_vsock(agent: Agent, port: u32) {
    let mut reported = false;
    let listener = loop {
        match VsockListener::bind(port) {
            Ok(l) => break l,
            Err(e) => {
                if !reported {
                    log(format_args!(
                        "cannot listen on vsock port {port}: {e}; retrying"
                    ));
                    reported = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    log(format_args!("listening on vsock port {port}"));
    loop {
        match listener.accept() {
            Ok((stream, cid)) => {
                if let Err(e) = agent.spawn_connection(stream, format!("vsock cid {cid}")) {
                    log(format_args!("cannot serve vsock cid {cid}: {e}"));
                }
            }
            Err(e) => {
                log(format_args!("vsock accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_tcp(agent: Agent, addr: SocketAddr) -> ExitCode {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            log(format_args!("cannot listen on {addr}: {e}"));
            return ExitCode::FAILURE;
        }
    };
    log(format_args!("listening on {addr}"));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log(format_args!("accept: {e}"));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        if let Err(e) = agent.spawn_connection(stream, peer.clone()) {
            log(format_args!("cannot serve {peer}: {e}"));
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        println!("ferry-agent {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let (mode, chroot) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("ferry-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let agent = Agent::new(chroot);
    match mode {
        Mode::Guest { serial, vsock } => {
            if let Err(e) = ferry_guest_agent::migrate::keep_locked_pages_in_place() {
                eprintln!(
                    "ferry-agent: warning: cannot set {} to 0 ({e}): the guest kernel may \
                     move a migrating process's pinned pages under the VMM",
                    ferry_guest_agent::migrate::COMPACT_UNEVICTABLE
                );
            }
            if let Some(port) = vsock {
                let agent = agent.clone();
                std::thread::spawn(move || serve_vsock(agent, port));
            }
            match serial {
                Some(device) => serve_serial(&agent, &device),
                None => loop {
                    std::thread::park();
                },
            }
        }
        Mode::Listen(addr) => serve_tcp(agent, addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Mode, Option<PathBuf>), String> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn serial_and_vsock_go_together_listen_goes_alone() {
        match parse(&["--serial", "/dev/ttyS1", "--vsock", "1024"])
            .unwrap()
            .0
        {
            Mode::Guest { serial, vsock } => {
                assert_eq!(serial, Some(PathBuf::from("/dev/ttyS1")));
                assert_eq!(vsock, Some(1024));
            }
            Mode::Listen(_) => panic!("guest mode expected"),
        }
        assert!(matches!(
            parse(&["--listen", "0.0.0.0:7000", "--chroot", "/host"]).unwrap(),
            (Mode::Listen(_), Some(_))
        ));
        assert!(parse(&["--listen", "0.0.0.0:7000", "--vsock", "5"]).is_err());
        assert!(parse(&["--serial", "/dev/ttyS1", "--chroot", "/x"]).is_err());
        assert!(parse(&["--vsock", "port"])
            .unwrap_err()
            .contains("port number"));
        assert!(parse(&[]).is_err());
    }
}
