//! `ferry run` on this machine's KVM: boot a guest in ferry's VMM, attach its console or run one
//! command in it through the guest agent, and report how it ended.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_guest_agent::client::{AgentConnection, ClientError, Stream};
use ferry_guest_agent::protocol::{ExecRequest, Hello};
use ferry_guest_agent::vsock::{self, VsockStream};
use ferry_net::{Bridge, Ipv4Cidr, Tap};
use ferry_vmm::boot::{BootError, BootSpec, KernelImage};
use ferry_vmm::devices::serial::SerialPort;
use ferry_vmm::devices::virtio::vsock as vsock_device;
use ferry_vmm::devices::ExitRequest;
use ferry_vmm::vm::DiskConfig;
use ferry_vmm::{NicConfig, Vm, VmConfig, VmError, VmExit};

/// Kernel command line for ferry's guests: console on the first UART, the i8042 reset for
/// `reboot`, a panic ends the VM instead of hanging it, and boot messages stay quiet: every byte
/// on an emulated UART costs a VM exit, and a chatty boot is a slow boot.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet 8250.nr_uarts=2";

/// Guests' vsock context ids are this plus the VMM's pid (0-2 are reserved, and this keeps
/// clear of the small numbers other tools pick by hand).
pub(crate) const VSOCK_CID_BASE: u64 = 1000;

/// How long a guest may take from power-on to its agent's hello.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Errors of a local run. `is_usage()` tells those caused by the user's input (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("the guest agent did not become ready: {cause}\n{console}")]
    AgentNotReady { cause: String, console: String },
    #[error("the guest agent connection failed while running the command: {0}")]
    Agent(#[from] ClientError),
    #[error("the guest stopped before the command finished ({reason})\n{console}")]
    GuestStopped { reason: String, console: String },
    #[error("the guest failed: {reason}\n{console}")]
    GuestFailed { reason: String, console: String },
    #[error("cannot set up the console: {0}")]
    Io(#[from] io::Error),
    #[error("guest network: {0}")]
    Bridge(#[from] ferry_net::bridge::BridgeError),
    #[error("guest network: {0}")]
    Tap(#[from] ferry_net::tap::TapError),
}

impl RunError {
    /// True for errors the user fixes by changing the command line (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RunError::Boot(_)
                | RunError::Vm(VmError::Boot(_))
                | RunError::Vm(VmError::OpenKvm(_))
                | RunError::Vm(VmError::VcpuCount(_))
                | RunError::Bridge(ferry_net::bridge::BridgeError::Clash { .. })
                | RunError::Vm(VmError::Disk(_))
        )
    }
}

/// What to run.
pub struct LocalRun {
    pub vcpus: u8,
    pub mem_size: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Run this command through the agent and power off; otherwise attach the console.
    pub command: Vec<String>,
    /// Also write everything the console prints to this file.
    pub console_log: Option<PathBuf>,
    pub boot_timeout: Duration,
    /// Print progress lines on stderr.
    pub verbose: bool,
    /// Disks for the guest (virtio-blk), in order: /dev/vda, /dev/vdb, ...
    pub disks: Vec<DiskConfig>,
    /// A network interface (`eth0`) on a host bridge.
    pub net: Option<GuestNet>,
}

/// A guest network interface: plugged into host bridge `bridge` (created if missing, with the
/// network's first address for the host), with address `addr`.
#[derive(Debug, Clone)]
pub struct GuestNet {
    pub bridge: String,
    pub addr: Ipv4Cidr,
}

/// The bridge guests join when none is named.
pub const DEFAULT_BRIDGE: &str = "ferry0";

/// Sets up the host side of `net` (bridge, TAP) and says how the guest configures its side
/// (kernel command-line words read by the guest's init).
pub(crate) fn setup_network(net: &GuestNet) -> Result<(NicConfig, String), RunError> {
    let bridge = Bridge::ensure(&net.bridge, net.addr)?;
    let tap = Tap::create("ferrytap%d")?;
    bridge.attach(tap.name())?;
    let words = format!(" ferry.ip={} ferry.gw={}", net.addr, bridge.gateway().addr);
    Ok((
        NicConfig {
            tap: tap.into_file(),
            mac: net.addr.mac(),
        },
        words,
    ))
}

/// The last bytes the console printed, for error messages.
#[derive(Clone, Default)]
pub(crate) struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    const KEEP: usize = 4096;

    pub(crate) fn push(&self, b: &[u8]) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.extend(b);
        let excess = t.len().saturating_sub(Self::KEEP);
        t.drain(..excess);
    }

    /// The last `n` lines, indented, under a heading.
    pub(crate) fn render(&self, n: usize) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: Vec<u8> = t.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(n);
        let mut s = String::from("last console lines:");
        if lines.is_empty() {
            s.push_str(" (none)");
        }
        for l in &lines[start..] {
            s.push_str("\n  | ");
            s.push_str(l.trim_end_matches('\r'));
        }
        s
    }

    pub(crate) fn contains(&self, needle: &str) -> bool {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: Vec<u8> = t.iter().copied().collect();
        String::from_utf8_lossy(&bytes).contains(needle)
    }
}

/// Where the guest console's bytes go: the terminal (interactive runs), a log file, and the tail.
pub(crate) struct ConsoleSink {
    pub(crate) stdout: bool,
    pub(crate) log: Option<File>,
    pub(crate) tail: ConsoleTail,
}

impl Write for ConsoleSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.tail.push(b);
        if self.stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(b);
            let _ = out.flush();
        }
        if let Some(f) = &mut self.log {
            let _ = f.write_all(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Copies what the host writes into `stream` into the UART's input queue.
pub(crate) fn pump_into(mut stream: UnixStream, port: Arc<Mutex<SerialPort>>) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => port
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(&buf[..n]),
        }
    }
}

/// Exit status for a guest that ended on its own in an interactive run.
fn interactive_status(exit: &VmExit) -> Option<i32> {
    match exit {
        VmExit::PowerOff | VmExit::Reset => Some(0),
        _ => None,
    }
}

/// Checks what the user asked for (vCPU count, kernel, initramfs, memory, command line) without
/// starting anything, so that bad input is refused before any VM or host exists.
pub fn check_inputs(
    vcpus: u8,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootSpec, RunError> {
    if vcpus == 0 || vcpus > ferry_vmm::vm::MAX_VCPUS {
        return Err(VmError::VcpuCount(vcpus).into());
    }
    let boot = BootSpec {
        kernel: KernelImage::inspect(kernel)?,
        initrd: initrd.map(Path::to_path_buf),
        cmdline: cmdline.to_string(),
    };
    boot.check(mem_size)?;
    Ok(boot)
}

/// Boots the guest and runs it to the end. Returns the exit status for the `ferry` process.
pub fn run(spec: LocalRun) -> Result<i32, RunError> {
    let started = Instant::now();
    check_inputs(
        spec.vcpus,
        spec.mem_size,
        &spec.kernel,
        spec.initrd.as_deref(),
        &spec.cmdline,
    )?;
    // The network's host side exists only while this VM does: the TAP goes with our descriptor.
    let (nics, cmdline) = match &spec.net {
        Some(net) => {
            let (nic, words) = setup_network(net)?;
            (vec![nic], format!("{}{words}", spec.cmdline))
        }
        None => (Vec::new(), spec.cmdline.clone()),
    };
    let boot = check_inputs(
        spec.vcpus,
        spec.mem_size,
        &spec.kernel,
        spec.initrd.as_deref(),
        &cmdline,
    )?;

    let interactive = spec.command.is_empty();
    let tail = ConsoleTail::default();
    let log = match &spec.console_log {
        Some(p) => Some(File::create(p)?),
        None => None,
    };
    let console = ConsoleSink {
        stdout: interactive,
        log,
        tail: tail.clone(),
    };
    let (vmm_end, host_end) = UnixStream::pair()?;
    // A vsock device for the agent where the host kernel offers vhost-vsock; the CID is derived
    // from our pid, which no other live process on this host has.
    let vsock_cid =
        vsock_device::available().then(|| VSOCK_CID_BASE + u64::from(std::process::id()));
    let vm = Vm::new(VmConfig {
        vcpus: spec.vcpus,
        mem_size: spec.mem_size,
        boot,
        console: Box::new(console),
        agent: Box::new(vmm_end.try_clone()?),
        log_dirty: false,
        disks: spec.disks.clone(),
        vsock_cid,
        nics,
    })?;
    let agent_port = vm.agent_port();
    let console_port = vm.console();
    std::thread::Builder::new()
        .name("agent-pump".into())
        .spawn(move || pump_into(vmm_end, agent_port))?;

    let running = vm.start()?;
    let exit = running.exit_request();
    let signal = Arc::new(AtomicI32::new(0));
    {
        let exit = exit.clone();
        let signal = signal.clone();
        // SIGINT/SIGTERM stop the VM cleanly; the exit status says which signal it was.
        let _ = crate::signals::on_terminate(move |sig| {
            signal.store(sig, Ordering::Relaxed);
            exit.request(VmExit::Stopped);
        });
    }
    // 128 + the signal that stopped us, as a shell reports it; 130 for the console's Ctrl-A x.
    let stopped_status = || match signal.load(Ordering::Relaxed) {
        0 => 130,
        sig => 128 + sig,
    };
    // When the VM ends, the agent connections end too, so nobody waits on a dead guest.
    let vsock_link: Arc<Mutex<Option<VsockStream>>> = Arc::default();
    {
        let exit = exit.clone();
        let host_end = host_end.try_clone()?;
        let vsock_link = vsock_link.clone();
        std::thread::Builder::new()
            .name("vm-exit-watch".into())
            .spawn(move || {
                exit.wait();
                let _ = host_end.shutdown(Shutdown::Both);
                if let Some(s) = vsock_link.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = s.shutdown();
                }
            })?;
    }
    if spec.verbose {
        eprintln!(
            "ferry: VM started ({} vCPUs, {} MiB)",
            spec.vcpus,
            spec.mem_size >> 20
        );
    }

    if interactive {
        let _raw = crate::terminal::RawMode::enable(&io::stdin())?;
        spawn_console_input(console_port, exit.clone())?;
        let verbose = spec.verbose;
        std::thread::Builder::new()
            .name("agent-hello".into())
            .spawn(move || report_ready(host_end, started, verbose, vsock_cid))?;
        let reason = running.wait();
        drop(_raw);
        return match interactive_status(&reason) {
            Some(code) => Ok(code),
            None if reason == VmExit::Stopped => Ok(stopped_status()),
            None => Err(guest_failed(&reason, &tail)),
        };
    }

    let session = Session {
        exit: &exit,
        tail: &tail,
        stopped_status: &stopped_status,
        started,
        verbose: spec.verbose,
        boot_timeout: spec.boot_timeout,
        command: &spec.command,
    };
    let result = match vsock_cid {
        // The agent's vsock port is the channel once the guest is up; the serial port stays for
        // the console-side hello and as the fallback.
        Some(cid) => match connect_vsock(cid, &session, &vsock_link) {
            Ok(stream) => session.run(stream, &format!("vsock (CID {cid})")),
            Err(e) => Err(e),
        },
        None => session.run(host_end, "the serial port"),
    };
    drop(running);
    if spec.verbose && result.is_ok() {
        eprintln!("ferry: done in {:.1} s", started.elapsed().as_secs_f64());
    }
    result
}

/// A command-mode run, whatever stream reaches the agent.
struct Session<'a> {
    exit: &'a Arc<ExitRequest>,
    tail: &'a ConsoleTail,
    stopped_status: &'a dyn Fn() -> i32,
    started: Instant,
    verbose: bool,
    boot_timeout: Duration,
    command: &'a [String],
}

impl Session<'_> {
    /// Waits for the agent on `stream`, runs the command, powers the guest off, and returns the
    /// command's status.
    fn run<S: Stream>(&self, stream: S, channel: &str) -> Result<i32, RunError> {
        let exit = self.exit;
        let mut conn = match AgentConnection::handshake(stream, self.boot_timeout) {
            Ok(c) => c,
            Err(_) if exit.get() == Some(VmExit::Stopped) => return Ok((self.stopped_status)()),
            Err(e) => return Err(self.not_ready(e.to_string())),
        };
        if self.verbose {
            announce(conn.hello(), self.started, channel);
        }
        let req = ExecRequest {
            argv: self.command.to_vec(),
            env: vec![
                (
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ),
                ("HOME".into(), "/root".into()),
                (
                    "TERM".into(),
                    std::env::var("TERM").unwrap_or_else(|_| "dumb".into()),
                ),
            ],
            cwd: Some("/root".into()),
            stdin: true,
        };
        let stdin: Box<dyn Read + Send> = Box::new(io::stdin());
        let code = match conn.exec(&req, Some(stdin), &mut io::stdout(), &mut io::stderr()) {
            Ok(code) => code,
            Err(e) => {
                // Give a guest that is going down a moment to finish, so we know how it ended.
                return match exit.wait_timeout(Duration::from_secs(5)) {
                    // The command powered the guest off or rebooted it (`poweroff`, `reboot`):
                    // the guest ended as asked.
                    Some(VmExit::PowerOff) => Ok(0),
                    Some(VmExit::Stopped) => Ok((self.stopped_status)()),
                    Some(VmExit::Reset) if !self.tail.contains("Kernel panic") => Ok(0),
                    Some(r) => Err(RunError::GuestStopped {
                        reason: describe_exit(&r, self.tail),
                        console: self.tail.render(15),
                    }),
                    None => Err(RunError::Agent(e)),
                };
            }
        };
        // The command is done: power the guest off and wait for it, briefly.
        let _ = conn.power_off();
        if exit.wait_timeout(Duration::from_secs(30)).is_none() && self.verbose {
            eprintln!("ferry: the guest did not power off within 30 s; stopping it");
        }
        Ok(code)
    }

    /// The agent never answered: say why, with the console's last lines.
    fn not_ready(&self, cause: String) -> RunError {
        let cause = match self.exit.get() {
            Some(reason) => describe_exit(&reason, self.tail),
            None => cause,
        };
        RunError::AgentNotReady {
            cause,
            console: self.tail.render(15),
        }
    }
}

/// Connects to the agent's vsock port, retrying while the guest boots, until the boot timeout
/// or the VM's end. The stream is also left in `link`, for the VM-exit watcher to shut down.
fn connect_vsock(
    cid: u64,
    session: &Session<'_>,
    link: &Mutex<Option<VsockStream>>,
) -> Result<VsockStream, RunError> {
    let deadline = Instant::now() + session.boot_timeout;
    let cid = u32::try_from(cid).map_err(|_| session.not_ready(format!("bad vsock CID {cid}")))?;
    loop {
        if session.exit.get().is_some() {
            return Err(session.not_ready("the VM stopped".into()));
        }
        match VsockStream::connect(cid, vsock::AGENT_PORT) {
            Ok(stream) => {
                *link.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream.try_clone_stream()?);
                return Ok(stream);
            }
            Err(e) if Instant::now() > deadline => {
                return Err(session.not_ready(format!(
                    "no answer on vsock port {} of CID {cid} within {} s: {e}",
                    vsock::AGENT_PORT,
                    session.boot_timeout.as_secs()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}

/// How ferry names a guest that triple-faulted, in `ferry run`'s error and in a node daemon's
/// log, followed by the vCPU's state in parentheses.
pub const TRIPLE_FAULT: &str = "the guest triple-faulted";

pub(crate) fn describe_exit(reason: &VmExit, tail: &ConsoleTail) -> String {
    match reason {
        VmExit::Reset if tail.contains("Kernel panic") => "the guest kernel panicked".into(),
        VmExit::Reset => "the guest rebooted".into(),
        VmExit::PowerOff => "the guest powered off".into(),
        VmExit::TripleFault(state) => format!("{TRIPLE_FAULT} ({state})"),
        VmExit::Stopped => "stopped by a signal".into(),
        VmExit::Error(e) => e.clone(),
    }
}

fn guest_failed(reason: &VmExit, tail: &ConsoleTail) -> RunError {
    RunError::GuestFailed {
        reason: describe_exit(reason, tail),
        console: tail.render(15),
    }
}

fn announce(hello: &Hello, started: Instant, channel: &str) {
    eprintln!(
        "ferry: guest agent ready after {:.1} s: kernel {}, {} vCPUs online, agent {} (protocol {}) on {channel}",
        started.elapsed().as_secs_f64(),
        hello.kernel_release,
        hello.online_cpus,
        hello.agent_version,
        hello.version
    );
}

/// Pings the agent of the guest with vsock context id `cid` `count` times, printing each round
/// trip; returns the round-trip times.
pub fn ping_agent(cid: u32, count: u32) -> Result<Vec<Duration>, RunError> {
    let stream =
        VsockStream::connect(cid, vsock::AGENT_PORT).map_err(|e| RunError::AgentNotReady {
            cause: format!(
                "nothing answers on vsock port {} of CID {cid}: {e}",
                vsock::AGENT_PORT
            ),
            console: "(is a guest with that CID running here? `ferry run` prints its CID)".into(),
        })?;
    let mut conn = AgentConnection::handshake(stream, Duration::from_secs(5))?;
    println!(
        "agent {} (protocol {}) on CID {cid}: kernel {}, {} vCPUs",
        conn.hello().agent_version,
        conn.hello().version,
        conn.hello().kernel_release,
        conn.hello().online_cpus
    );
    let mut times = Vec::with_capacity(count as usize);
    for seq in 1..=count {
        let rtt = conn.ping()?;
        println!("pong from CID {cid}: seq={seq} time={} us", rtt.as_micros());
        times.push(rtt);
    }
    Ok(times)
}

/// Waits for the agent's hello in an interactive run, prints it, then keeps draining the channel
/// so the guest never blocks on it.
fn report_ready(stream: UnixStream, started: Instant, verbose: bool, vsock_cid: Option<u64>) {
    let drain = stream.try_clone();
    if let Ok(conn) = AgentConnection::handshake(stream, DEFAULT_BOOT_TIMEOUT) {
        if verbose {
            // The terminal is raw: end the lines ourselves.
            announce(conn.hello(), started, "the serial port");
            eprint!("\r");
            if let Some(cid) = vsock_cid {
                eprintln!(
                    "ferry: it answers on vsock CID {cid} too: `ferry agent ping --cid {cid}`\r"
                );
            }
        }
    }
    if let Ok(mut s) = drain {
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// Copies the terminal's keystrokes to the guest console. Ctrl-A then `x` stops the VM (the
/// terminal is raw, so Ctrl-C goes to the guest).
fn spawn_console_input(
    port: Arc<Mutex<SerialPort>>,
    exit: Arc<ferry_vmm::devices::ExitRequest>,
) -> io::Result<()> {
    const CTRL_A: u8 = 0x01;
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 1024];
            let mut escape = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if escape {
                        escape = false;
                        match b {
                            b'x' | b'X' => {
                                exit.request(VmExit::Stopped);
                                return;
                            }
                            CTRL_A => out.push(CTRL_A),
                            other => out.extend_from_slice(&[CTRL_A, other]),
                        }
                    } else if b == CTRL_A {
                        escape = true;
                    } else {
                        out.push(b);
                    }
                }
                port.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .queue_input(&out);
            }
        })?;
    Ok(())
}
