//! `ferry-agent`: runs inside a ferry guest (or the nested host) and executes commands for the
//! host. Logs go to stderr, which in the guest is the console.
//!
//! ```text
//! ferry-agent --serial /dev/ttyS1
//! ferry-agent --listen 0.0.0.0:7000 [--chroot /host]
//! ```

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferry_guest_agent::server::{log, Agent};

const USAGE: &str = "usage: ferry-agent --serial DEVICE | --listen ADDR:PORT [--chroot DIR]";

enum Mode {
    Serial(PathBuf),
    Listen(SocketAddr),
}

fn parse_args(args: &[String]) -> Result<(Mode, Option<PathBuf>), String> {
    let mut mode = None;
    let mut chroot = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--serial" => mode = Some(Mode::Serial(PathBuf::from(value()?))),
            "--listen" => {
                let v = value()?;
                // A literal address: name resolution would need NSS, which a static binary lacks.
                let addr = v
                    .parse()
                    .map_err(|_| format!("--listen wants IP:PORT, got `{v}`"))?;
                mode = Some(Mode::Listen(addr));
            }
            "--chroot" => chroot = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let mode = mode.ok_or("one of --serial or --listen is required")?;
    if chroot.is_some() && matches!(mode, Mode::Serial(_)) {
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
        let agent = agent.clone();
        std::thread::spawn(move || {
            if let Err(e) = agent.serve(stream) {
                log(format_args!("connection from {peer}: {e}"));
            }
        });
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
        Mode::Serial(device) => serve_serial(&agent, &device),
        Mode::Listen(addr) => serve_tcp(agent, addr),
    }
}
