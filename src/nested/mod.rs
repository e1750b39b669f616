//! The nested host: a real KVM host on machines whose own `/dev/kvm` cannot boot a stock kernel.
//!
//! QEMU's TCG emulates AMD SVM with nested paging, so a Linux booted under it (Debian's own
//! kernel) loads `kvm-amd` and offers a real `/dev/kvm`. This module boots such an "outer
//! machine" in the background with the host's root shared read-only over virtio-9p, and runs
//! commands in it chrooted into that root through `ferry-agent`: the host-built `ferry` binary
//! then runs unchanged against a real `/dev/kvm`. See platform-notes.md, section 2.
//!
//! - [`qemu`]: installs QEMU 10 when needed and builds its command line.
//! - [`initramfs`]: the outer machine's initramfs and `/init`.
//! - [`state`]: the state file that lets later `ferry` processes find a running host.

pub mod initramfs;
pub mod qemu;
pub mod state;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_guest_agent::client::{AgentConnection, ClientError};
use ferry_guest_agent::protocol::ExecRequest;

use crate::debian::{self, DebianError};
use crate::kernel::KernelPackage;
use crate::kmod::KmodError;
use state::HostState;

/// Errors of the nested host.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    #[error("cannot get QEMU for the nested host: {0}")]
    QemuInstall(String),
    #[error("apt could not provide a package the nested host needs")]
    Debian(#[from] DebianError),
    #[error("cannot collect the outer machine's kernel modules")]
    Kmod(#[from] KmodError),
    #[error("cannot get the guest agent or busybox for the outer machine")]
    Image(#[from] crate::image::ImageError),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start QEMU ({program})")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the nested host did not come up: {reason}\n\
         last lines of its console ({console}):\n{tail}"
    )]
    Boot {
        reason: String,
        console: PathBuf,
        tail: String,
    },
    #[error("the nested host's agent (127.0.0.1:{port})")]
    Client {
        port: u16,
        #[source]
        source: ClientError,
    },
    #[error("`{command}` in the nested host did not finish within {limit:?}; it was killed")]
    Timeout { command: String, limit: Duration },
    #[error(
        "the running nested host has no writable share (it was started by an older ferry); \
         restart it with `ferry host stop` and `ferry host start`"
    )]
    NoWritableShare,
    #[error(
        "cannot make {file} writable inside the nested host: linking it into {share} failed; \
         put the disk on the same file system as {share} (or in it), or attach it read-only (,ro)"
    )]
    Share {
        file: PathBuf,
        share: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the nested host (QEMU pid {pid}) does not answer ({cause}); it runs cluster {clusters}, so it is left alone: it may be busy (wait and retry), or `ferry host stop` restarts it and `ferry up` brings the cluster back"
    )]
    Unresponsive {
        pid: i32,
        clusters: String,
        cause: String,
    },
    #[error("QEMU's monitor would not forward 127.0.0.1:{port} into the nested host: {reply}; another program may hold that port: change the port in the cluster file")]
    Forward { port: u16, reply: String },
}

/// A host file made writable inside the nested host ([`NestedHost::share_writable`]); the link
/// into the share is removed when this is dropped.
#[derive(Debug)]
pub struct SharedFile {
    path: PathBuf,
    link: Option<PathBuf>,
}

impl SharedFile {
    /// The path to use inside the nested host (the same on the host).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        if let Some(l) = &self.link {
            let _ = std::fs::remove_file(l);
        }
    }
}

/// How the outer machine is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostOptions {
    /// Guest RAM of the outer machine, MiB. Inner guests come out of this.
    pub memory_mib: u32,
    /// Virtual CPUs of the outer machine (TCG threads).
    pub cpus: u32,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            memory_mib: 4096,
            cpus: 2,
        }
    }
}

/// How long the outer machine may take from QEMU's start to the agent's Hello.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// A booting outer machine whose console stays silent this long is taken as hung.
const BOOT_STALL: Duration = Duration::from_secs(60);
/// How long a connection may take to get the agent's Hello from a running host.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a running host's agent may take to answer before the host is taken as hung and
/// stopped (generous: a busy TCG machine can be slow, and stopping it loses its work).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the outer machine to power off before killing QEMU.
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(30);
/// What `ferry-agent` prints on the console once it accepts connections.
const AGENT_LISTENING: &str = "ferry-agent: listening on";
/// Console lines shown when the host fails to come up.
const TAIL_LINES: usize = 25;

/// A running outer machine.
#[derive(Debug)]
pub struct NestedHost {
    state: HostState,
    /// QEMU as our child, when this process started it (so it can be reaped).
    child: Option<Child>,
}

/// `<cache>/nested/host`: state file, console log, lock.
pub fn state_dir() -> PathBuf {
    debian::cache_dir().join("nested").join("host")
}

/// `<cache>/nested/rw`: the host directory the outer machine mounts writable at the same path.
/// Files a command in the nested host must write on the host (writable disks) live here.
pub fn rw_share_dir() -> PathBuf {
    rw_share_in(&debian::cache_dir())
}

fn rw_share_in(cache: &Path) -> PathBuf {
    cache.join("nested").join("rw")
}

/// One empty file per cluster whose daemons run in the host ([`NestedHost::keep_for`]).
fn kept_by_dir() -> PathBuf {
    state_dir().join("clusters")
}

fn state_file() -> PathBuf {
    state_dir().join("state")
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NestedError {
    let what = what.into();
    move |source| NestedError::Io { what, source }
}

/// A `flock(2)` on a file in the state directory, released on drop.
///
/// - `lock`, exclusive: held while a host is started, probed or stopped, so two ferry processes
///   never boot two hosts.
/// - `users`, shared: held by every running [`NestedHost::exec`], so
///   [`NestedHost::stop_if_unused`] can tell whether anyone is using the host.
struct FileLock {
    _file: File,
}

impl FileLock {
    /// The host lock, waiting for it.
    fn host() -> Result<Self, NestedError> {
        Self::take("lock", libc::LOCK_EX).map(|l| l.expect("blocking flock"))
    }

    /// A shared lock on `users`, waiting for it.
    fn user() -> Result<Self, NestedError> {
        Self::take("users", libc::LOCK_SH).map(|l| l.expect("blocking flock"))
    }

    /// The exclusive lock on `users` if no command holds a shared one, without waiting.
    fn no_users() -> Result<Option<Self>, NestedError> {
        Self::take("users", libc::LOCK_EX | libc::LOCK_NB)
    }

    /// `Ok(None)` only for a non-blocking request that would have to wait.
    fn take(name: &str, op: libc::c_int) -> Result<Option<Self>, NestedError> {
        let dir = state_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let path = dir.join(name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("open {}", path.display())))?;
        match crate::sys::flock(&file, op) {
            Ok(true) => Ok(Some(Self { _file: file })),
            Ok(false) => Ok(None),
            Err(e) => Err(io_err(format!("lock {}", path.display()))(e)),
        }
    }
}

/// Everything one boot of the outer machine needs.
struct Boot<'a> {
    qemu: &'a qemu::Qemu,
    kernel: &'a KernelPackage,
    initrd: &'a Path,
    cmdline: String,
    opts: &'a HostOptions,
}

/// Why a boot did not give a ready host.
enum BootFailure {
    /// QEMU could not start or exited: trying again would fail the same way.
    Failed(NestedError),
    /// The machine hung or stayed silent: worth one more try (TCG boots are not deterministic).
    Stalled(NestedError),
}

impl BootFailure {
    fn into_error(self) -> NestedError {
        match self {
            Self::Failed(e) | Self::Stalled(e) => e,
        }
    }
}

impl Boot<'_> {
    /// Starts QEMU in the background, records the state file and waits for the agent; on
    /// failure kills QEMU and removes the state file.
    fn attempt(&self) -> Result<NestedHost, BootFailure> {
        let (qemu, kernel, opts) = (self.qemu, self.kernel, self.opts);
        let failed = BootFailure::Failed;
        let dir = state_dir();
        let console_log = dir.join("console.log");
        let qemu_log = dir.join("qemu.log");
        let monitor = dir.join("monitor.sock");
        let _ = std::fs::remove_file(&monitor);
        let port = free_port().map_err(failed)?;
        let rw_share = rw_share_dir();
        std::fs::create_dir_all(&rw_share)
            .map_err(io_err(format!("create {}", rw_share.display())))
            .map_err(failed)?;
        let args = qemu::command_line(&qemu::BootSpec {
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            kernel: &kernel.vmlinuz,
            initrd: self.initrd,
            cmdline: &self.cmdline,
            host_port: port,
            guest_port: initramfs::AGENT_PORT,
            console_log: &console_log,
            monitor: &monitor,
            rw_share: Some(&rw_share),
        });
        // Start from an empty console log, so a failure shows this boot's lines.
        File::create(&console_log)
            .map_err(io_err(format!("create {}", console_log.display())))
            .map_err(failed)?;
        let stderr_file = File::create(&qemu_log)
            .map_err(io_err(format!("create {}", qemu_log.display())))
            .map_err(failed)?;
        eprintln!(
            "ferry: nested host: booting Debian {} under QEMU {}.{}.{} (TCG with emulated AMD SVM, \
             {} MiB, {} vCPUs); console: {}",
            kernel.release,
            qemu.version.0,
            qemu.version.1,
            qemu.version.2,
            opts.memory_mib,
            opts.cpus,
            console_log.display()
        );
        let started = Instant::now();
        let mut command = Command::new(&qemu.path);
        crate::sys::no_inherited_fds(&mut command);
        let child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file)
            // Its own process group: a Ctrl-C meant for this ferry does not reach it.
            .process_group(0)
            .spawn()
            .map_err(|source| {
                failed(NestedError::Spawn {
                    program: qemu.path.display().to_string(),
                    source,
                })
            })?;
        let state = HostState {
            pid: child.id() as i32,
            port,
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            console_log,
            rw_share: Some(rw_share.clone()),
        };
        let mut host = NestedHost {
            state,
            child: Some(child),
        };
        // Recorded before the wait, so `ferry host stop` finds a host whose starter died.
        if let Err(e) = host.state.store(&state_file()) {
            host.kill();
            return Err(failed(e));
        }
        match host.wait_ready(started, &qemu_log) {
            Ok(hello_kernel) => {
                eprintln!(
                    "ferry: nested host: ready after {:.1} s (kernel {hello_kernel}, QEMU pid {}, \
                     agent on 127.0.0.1:{port})",
                    started.elapsed().as_secs_f64(),
                    host.state.pid,
                );
                Ok(host)
            }
            Err(e) => {
                host.kill();
                Err(e)
            }
        }
    }
}

impl NestedHost {
    /// Boots the outer machine in the background and waits until its agent answers; returns
    /// the host already running if there is one. Installs QEMU 10 and builds the initramfs
    /// first when needed. On failure nothing is left running.
    pub fn start(opts: &HostOptions) -> Result<Self, NestedError> {
        let _lock = FileLock::host()?;
        if let Some(host) = Self::running_locked()? {
            eprintln!(
                "ferry: nested host: already running (QEMU pid {}, agent on 127.0.0.1:{})",
                host.state.pid, host.state.port
            );
            return Ok(host);
        }
        // A new host runs none of the clusters an old one may have run.
        let _ = std::fs::remove_dir_all(kept_by_dir());
        let cache = debian::cache_dir();
        let qemu = qemu::ensure()?;
        let kernel = KernelPackage::fetch(&cache)?;
        let busybox = debian::fetch("busybox-static", &cache)?;
        let agent = agent_binary()?;
        let initrd = initramfs::ensure(
            &cache,
            &initramfs::Inputs {
                kernel: &kernel,
                busybox: &busybox,
                agent: &agent,
            },
        )?;

        let boot = Boot {
            qemu: &qemu,
            kernel: &kernel,
            initrd: &initrd,
            cmdline: kernel_cmdline(&cache),
            opts,
        };
        match boot.attempt() {
            Err(BootFailure::Stalled(e)) => {
                eprintln!("ferry: nested host: {e}");
                eprintln!("ferry: nested host: the boot stalled; trying once more");
                boot.attempt().map_err(BootFailure::into_error)
            }
            other => other.map_err(BootFailure::into_error),
        }
    }

    /// Polls until the agent's Hello arrives, QEMU exits, or [`BOOT_TIMEOUT`] passes.
    fn wait_ready(&mut self, started: Instant, qemu_log: &Path) -> Result<String, BootFailure> {
        let deadline = started + BOOT_TIMEOUT;
        let mut last_error = String::from("no answer yet");
        let mut seen_listening = false;
        let mut next_try = started + Duration::from_secs(4);
        let mut console_len = 0;
        let mut console_moved = started;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let qemu_err = std::fs::read_to_string(qemu_log).unwrap_or_default();
                    return Err(BootFailure::Failed(self.boot_error(format!(
                        "QEMU exited ({status}) after {:.1} s{}",
                        started.elapsed().as_secs_f64(),
                        if qemu_err.trim().is_empty() {
                            String::new()
                        } else {
                            format!(": {}", qemu_err.trim())
                        }
                    ))));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(BootFailure::Stalled(self.boot_error(format!(
                    "its agent did not answer within {} s ({last_error})",
                    BOOT_TIMEOUT.as_secs()
                ))));
            }
            let len = std::fs::metadata(&self.state.console_log).map_or(0, |m| m.len());
            if len != console_len {
                (console_len, console_moved) = (len, now);
            } else if !seen_listening && now - console_moved >= BOOT_STALL {
                return Err(BootFailure::Stalled(self.boot_error(format!(
                    "its console has been silent for {} s, {:.0} s after QEMU started",
                    BOOT_STALL.as_secs(),
                    started.elapsed().as_secs_f64()
                ))));
            }
            // QEMU's user network accepts connections to the forwarded port even before the
            // guest listens (and holds or drops them), so only a Hello counts as "up". Try as
            // soon as the console shows the agent listening, and every few seconds regardless.
            if !seen_listening && console_shows(&self.state.console_log, AGENT_LISTENING) {
                seen_listening = true;
                next_try = now;
            }
            if now >= next_try {
                match self.connect(Duration::from_secs(3).min(deadline - now)) {
                    Ok(conn) => return Ok(conn.hello().kernel_release.clone()),
                    Err(e) => last_error = error_chain(&e),
                }
                next_try = Instant::now() + Duration::from_secs(2);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn boot_error(&self, reason: String) -> NestedError {
        NestedError::Boot {
            reason,
            console: self.state.console_log.clone(),
            tail: console_tail(&self.state.console_log, TAIL_LINES),
        }
    }

    /// The host started earlier (by this or another ferry process), if its QEMU is alive and
    /// its agent answers. A state file left by a dead host is removed; a live QEMU whose agent
    /// does not answer is stopped.
    pub fn running() -> Result<Option<Self>, NestedError> {
        let _lock = FileLock::host()?;
        Self::running_locked()
    }

    /// The host whose QEMU is running, whether or not its agent answers (for stopping a hung
    /// host).
    pub fn recorded() -> Result<Option<Self>, NestedError> {
        let _lock = FileLock::host()?;
        let path = state_file();
        let Some(state) = HostState::load(&path)? else {
            return Ok(None);
        };
        if !state::qemu_alive(state.pid) {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(Self { state, child: None }))
    }

    fn running_locked() -> Result<Option<Self>, NestedError> {
        let path = state_file();
        let Some(state) = HostState::load(&path)? else {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        };
        let mut host = Self { state, child: None };
        if !state::qemu_alive(host.state.pid) {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        // A host under heavy load (several guests on emulated CPUs) can be slow to answer for
        // a while: it gets a second, longer chance, and one that runs a cluster is never
        // stopped behind the user's back.
        let first = match host.connect(PROBE_TIMEOUT) {
            Ok(_) => return Ok(Some(host)),
            Err(e) => e,
        };
        let clusters = host.kept_by();
        if !clusters.is_empty() {
            return Err(NestedError::Unresponsive {
                pid: host.state.pid,
                clusters: clusters.join(", "),
                cause: error_chain(&first),
            });
        }
        match host.connect(PROBE_TIMEOUT * 2) {
            Ok(_) => Ok(Some(host)),
            Err(e) => {
                eprintln!(
                    "ferry: nested host: QEMU pid {} is running but its agent does not answer \
                     ({}); stopping it",
                    host.state.pid,
                    error_chain(&e)
                );
                host.kill();
                Ok(None)
            }
        }
    }

    /// A new connection to the agent (one per command; the agent serves each on its own thread).
    fn connect(&self, timeout: Duration) -> Result<AgentConnection<TcpStream>, NestedError> {
        self.connect_with_handle(timeout).map(|(conn, _)| conn)
    }

    /// [`NestedHost::connect`], plus a second handle on the socket (to shut it down from
    /// another thread).
    fn connect_with_handle(
        &self,
        timeout: Duration,
    ) -> Result<(AgentConnection<TcpStream>, TcpStream), NestedError> {
        let port = self.state.port;
        let client = |source| NestedError::Client { port, source };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let io = |context| move |source| client(ClientError::Io { context, source });
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io("cannot connect"))?;
        let _ = stream.set_nodelay(true);
        let handle = stream.try_clone().map_err(io("cannot clone the socket"))?;
        let conn = AgentConnection::handshake(stream, timeout).map_err(client)?;
        Ok((conn, handle))
    }

    /// Runs `argv` chrooted into the host's root inside the outer machine, in `cwd` (a host
    /// path; the host's files are visible read-only at the same paths, with a writable /tmp and
    /// /run of its own) with exactly the environment `env`. Streams the command's stdout and
    /// stderr to ours, forwards our stdin when `forward_stdin`, and returns its exit code
    /// (128 + signal if a signal killed it; 127/126 if it could not be started).
    ///
    /// Safe to call from several threads or processes at once: each call has its own
    /// connection. While it runs, [`NestedHost::stop_if_unused`] leaves the host alone.
    pub fn exec(
        &self,
        argv: &[String],
        cwd: &Path,
        env: &[(String, String)],
        forward_stdin: bool,
    ) -> Result<i32, NestedError> {
        self.exec_timeout(argv, cwd, env, forward_stdin, None)
    }

    /// [`NestedHost::exec`] with a time limit: when `timeout` passes, the connection is closed
    /// (the agent then kills the command) and [`NestedError::Timeout`] is returned.
    pub fn exec_timeout(
        &self,
        argv: &[String],
        cwd: &Path,
        env: &[(String, String)],
        forward_stdin: bool,
        timeout: Option<Duration>,
    ) -> Result<i32, NestedError> {
        let stdin: Option<Box<dyn Read + Send>> = if forward_stdin {
            Some(Box::new(std::io::stdin()))
        } else {
            None
        };
        let mut stdout = std::io::stdout();
        let mut stderr = std::io::stderr();
        self.run(argv, cwd, env, stdin, &mut stdout, &mut stderr, timeout)
    }

    /// Like [`NestedHost::exec_timeout`] without stdin, collecting stdout and stderr instead of
    /// streaming them: `(exit code, stdout, stderr)`.
    pub fn exec_output(
        &self,
        argv: &[String],
        cwd: &Path,
        env: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), NestedError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = self.run(argv, cwd, env, None, &mut out, &mut err, timeout)?;
        Ok((code, out, err))
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        argv: &[String],
        cwd: &Path,
        env: &[(String, String)],
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
        timeout: Option<Duration>,
    ) -> Result<i32, NestedError> {
        let _lease = FileLock::user()?;
        let (mut conn, socket) = self.connect_with_handle(HANDSHAKE_TIMEOUT)?;
        let req = ExecRequest {
            argv: argv.to_vec(),
            env: env.to_vec(),
            cwd: Some(cwd.to_string_lossy().into_owned()),
            stdin: stdin.is_some(),
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = timeout.map(|limit| {
            std::thread::spawn(move || {
                let expired = matches!(
                    done_rx.recv_timeout(limit),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                );
                if expired {
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
                expired
            })
        });
        let result = conn.exec(&req, stdin, stdout, stderr);
        drop(done_tx);
        let expired = watchdog.is_some_and(|w| w.join().unwrap_or(false));
        match result {
            _ if expired => Err(NestedError::Timeout {
                command: argv.first().cloned().unwrap_or_default(),
                limit: timeout.unwrap_or_default(),
            }),
            Ok(code) => Ok(code),
            Err(source) => Err(NestedError::Client {
                port: self.state.port,
                source,
            }),
        }
    }

    /// Stops the host unless another ferry process is running a command in it right now (then
    /// leaves it running and returns `Ok(false)`). For a host started just for one command.
    pub fn stop_if_unused(self) -> Result<bool, NestedError> {
        let clusters = self.kept_by();
        if !clusters.is_empty() {
            eprintln!(
                "ferry: nested host: it runs cluster {}; leaving it running (`ferry down` \
                 stops the cluster, `ferry host stop` the host)",
                clusters.join(", ")
            );
            return Ok(false);
        }
        let Some(_no_users) = FileLock::no_users()? else {
            eprintln!(
                "ferry: nested host: another ferry is using it; leaving it running \
                 (`ferry host stop` stops it)"
            );
            return Ok(false);
        };
        self.stop().map(|()| true)
    }

    /// Asks the outer machine to power off, waits for QEMU to exit (killing it after
    /// [`POWER_OFF_TIMEOUT`]), and removes the state file.
    pub fn stop(mut self) -> Result<(), NestedError> {
        let _lock = FileLock::host()?;
        let pid = self.state.pid;
        eprintln!("ferry: nested host: powering off (QEMU pid {pid})");
        let asked = self
            .connect(HANDSHAKE_TIMEOUT)
            .and_then(|mut c| {
                c.power_off().map_err(|source| NestedError::Client {
                    port: self.state.port,
                    source,
                })
            })
            .is_ok();
        let deadline = Instant::now()
            + if asked {
                POWER_OFF_TIMEOUT
            } else {
                Duration::ZERO
            };
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.alive() {
            eprintln!("ferry: nested host: QEMU pid {pid} still running; killing it");
        }
        self.kill();
        Ok(())
    }

    fn alive(&mut self) -> bool {
        if let Some(child) = self.child.as_mut() {
            return matches!(child.try_wait(), Ok(None));
        }
        state::qemu_alive(self.state.pid)
    }

    /// Kills QEMU's process group (SIGTERM, then SIGKILL), reaps it if it is our child, and
    /// removes the state file if it still names this host.
    fn kill(&mut self) {
        let pgid = self.state.pid;
        if self.alive() {
            // QEMU was started with process_group(0), and alive() checked the pid is QEMU.
            let _ = crate::sys::kill_process_group(pgid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.alive() {
                let _ = crate::sys::kill_process_group(pgid, libc::SIGKILL);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(state_dir().join("monitor.sock"));
        let path = state_file();
        if HostState::load(&path)
            .ok()
            .flatten()
            .is_some_and(|s| s.pid == pgid)
        {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Marks this host as running cluster `name`'s daemons: [`Self::stop_if_unused`] leaves it
    /// running until [`Self::release`].
    pub fn keep_for(&self, name: &str) -> Result<(), NestedError> {
        let dir = kept_by_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        std::fs::write(dir.join(name), "").map_err(io_err(format!("mark {}", dir.display())))
    }

    /// Undoes [`Self::keep_for`].
    pub fn release(&self, name: &str) {
        let _ = std::fs::remove_file(kept_by_dir().join(name));
    }

    /// The clusters this host runs.
    pub fn kept_by(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(kept_by_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Forwards TCP `port` on this machine's 127.0.0.1 to the same port in the nested host
    /// (where a node daemon listens), unless it is forwarded already.
    pub fn forward_port(&self, port: u16) -> Result<(), NestedError> {
        let rules = self.monitor("info usernet")?;
        if forwarded_ports(&rules).contains(&port) {
            return Ok(());
        }
        let reply = self.monitor(&format!("hostfwd_add n0 tcp:127.0.0.1:{port}-:{port}"))?;
        if reply.trim().is_empty() {
            Ok(())
        } else {
            Err(NestedError::Forward {
                port,
                reply: reply.trim().to_string(),
            })
        }
    }

    /// Removes the forwarding of `port` made by [`Self::forward_port`], if there is one.
    pub fn unforward_port(&self, port: u16) -> Result<(), NestedError> {
        let rules = self.monitor("info usernet")?;
        if forwarded_ports(&rules).contains(&port) {
            self.monitor(&format!("hostfwd_remove n0 tcp:127.0.0.1:{port}"))?;
        }
        Ok(())
    }

    /// Runs one command on QEMU's human monitor and returns what it printed.
    fn monitor(&self, command: &str) -> Result<String, NestedError> {
        use std::io::{Read, Write};
        let path = state_dir().join("monitor.sock");
        let what = || format!("talk to QEMU's monitor at {}", path.display());
        let mut sock = std::os::unix::net::UnixStream::connect(&path).map_err(io_err(what()))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io_err(what()))?;
        // The monitor greets with a banner and a prompt; each command's output ends with the
        // next prompt.
        let read_to_prompt = |sock: &mut std::os::unix::net::UnixStream| {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while !out.ends_with(b"(qemu) ") {
                let n = sock.read(&mut buf).map_err(io_err(what()))?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            Ok::<_, NestedError>(String::from_utf8_lossy(&out).into_owned())
        };
        read_to_prompt(&mut sock)?;
        sock.write_all(format!("{command}\n").as_bytes())
            .map_err(io_err(what()))?;
        let out = read_to_prompt(&mut sock)?;
        // The reply echoes the command (with terminal escapes) before its output.
        let body: Vec<&str> = out
            .lines()
            .skip(1)
            .filter(|l| !l.starts_with("(qemu)"))
            .collect();
        Ok(body.join("\n"))
    }

    /// One line for the user: `QEMU pid 123, agent on 127.0.0.1:40000, up 85 s, console: <path>`.
    /// Makes the host file `path` writable from commands in this host: a file under the
    /// writable share is used as it is; any other is hard-linked into the share (same inode, so
    /// the guest's writes land in `path`) for as long as the returned guard lives. A file on
    /// another file system than the share cannot be linked: the error says where to put it.
    pub fn share_writable(&self, path: &Path) -> Result<SharedFile, NestedError> {
        let Some(share) = &self.state.rw_share else {
            return Err(NestedError::NoWritableShare);
        };
        if path.starts_with(share) {
            return Ok(SharedFile {
                path: path.to_path_buf(),
                link: None,
            });
        }
        let dir = share.join("links");
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let link = (0..1000)
            .map(|n| dir.join(format!("{}-{n}-{name}", std::process::id())))
            .find(|l| !l.exists())
            .ok_or_else(|| NestedError::Io {
                what: format!("find a free name in {}", dir.display()),
                source: std::io::ErrorKind::AlreadyExists.into(),
            })?;
        match std::fs::hard_link(path, &link) {
            Ok(()) => Ok(SharedFile {
                path: link.clone(),
                link: Some(link),
            }),
            Err(source) => Err(NestedError::Share {
                file: path.to_path_buf(),
                share: share.clone(),
                source,
            }),
        }
    }

    /// A copy of the host executable `exe` under the writable share, named after the file's
    /// identity, for running in this host. Running `exe` itself through the read-only share can
    /// crash once it is rebuilt while the host is up (the guest's 9p client keeps the old file's
    /// pages under the new file's size); a new name each time the file changes cannot be stale.
    /// A host without a writable share runs `exe` as it is.
    pub fn stage_executable(&self, exe: &Path) -> Result<PathBuf, NestedError> {
        use std::os::unix::fs::MetadataExt;
        let Some(share) = &self.state.rw_share else {
            return Ok(exe.to_path_buf());
        };
        let meta = std::fs::metadata(exe).map_err(io_err(format!("stat {}", exe.display())))?;
        let name = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "exe".into());
        let dir = share.join("bin");
        let staged = dir.join(format!(
            "{name}-{}-{}-{}",
            meta.ino(),
            meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
            meta.len()
        ));
        if !staged.is_file() {
            std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            std::fs::copy(exe, &tmp).map_err(io_err(format!("copy {}", exe.display())))?;
            std::fs::rename(&tmp, &staged)
                .map_err(io_err(format!("rename to {}", staged.display())))?;
            // Older copies of the same program are no longer needed (a run still using one
            // keeps it open; unlinking does not disturb it).
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    let other = e.file_name().to_string_lossy().into_owned();
                    if p != staged && other.starts_with(&format!("{name}-")) {
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
        }
        Ok(staged)
    }

    pub fn describe(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!(
            "QEMU pid {}, agent on 127.0.0.1:{}, up {} s, console: {}",
            self.state.pid,
            self.state.port,
            now.saturating_sub(self.state.started_at),
            self.state.console_log.display()
        )
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.state.pid
    }

    /// The port on 127.0.0.1 forwarded to the agent.
    pub fn port(&self) -> u16 {
        self.state.port
    }

    /// Unix time (seconds) the host was started.
    pub fn started_at(&self) -> u64 {
        self.state.started_at
    }

    /// The outer machine's serial console log.
    pub fn console_log(&self) -> &Path {
        &self.state.console_log
    }
}

/// The static `ferry-agent` to put in the initramfs (`$FERRY_AGENT`, or built from this
/// workspace).
fn agent_binary() -> Result<PathBuf, NestedError> {
    Ok(crate::image::static_agent()?)
}

/// The outer kernel's command line. `ferry.keep` names the cache dir, which /init keeps visible
/// if it lies under /tmp or /run (which get their own writable layer in the chroot).
fn kernel_cmdline(cache: &Path) -> String {
    let mut s = String::from("console=ttyS0 panic=-1 mitigations=off");
    let rw = rw_share_in(cache);
    let (cache, rw) = (cache.to_string_lossy(), rw.to_string_lossy());
    if !cache.contains(char::is_whitespace) {
        s.push_str(" ferry.keep=");
        s.push_str(&cache);
        s.push_str(" ferry.rw=");
        s.push_str(&rw);
    }
    s
}

/// A port on 127.0.0.1 nobody listens on right now.
fn free_port() -> Result<u16, NestedError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("find a free TCP port on 127.0.0.1"))
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// Whether the log file contains `needle` (in its last 64 KiB).
fn console_shows(path: &Path, needle: &str) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).contains(needle)
}

/// What the outer machine's kernel prints when one of its CPUs is wedged or it is dying: an
/// RCU stall, a lockup, a panic, a BUG, a general protection fault. Under QEMU's emulated SVM
/// the guests of such a host most often hang for good (the README's notes on the nested host
/// under load), so tests and benches give up on it and start a new one.
pub const WEDGED_WORDS: &[&str] = &[
    "detected stalls on CPUs",
    "soft lockup",
    "hard LOCKUP",
    "Kernel panic",
    "BUG:",
    "general protection fault",
];

/// A place in the outer machine's console log (`state_dir()/console.log`), to read what its
/// kernel said after it: tests and benches take one when an attempt or a cluster starts.
#[derive(Debug, Clone)]
pub struct ConsoleMark {
    path: PathBuf,
    len: u64,
}

impl ConsoleMark {
    /// The end of the console log as it is now (its start if there is none yet).
    pub fn now() -> Self {
        let path = state_dir().join("console.log");
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        Self { path, len }
    }

    /// What the console gained since the mark ([`log_since`]: all of it when a new host has
    /// started a new log since).
    pub fn since(&self) -> String {
        log_since(&self.path, self.len)
    }

    /// The first line since the mark in which the kernel says the host is wedged or dying
    /// ([`wedged_line`]).
    pub fn wedged(&self) -> Option<String> {
        wedged_line(&self.since()).map(str::to_string)
    }
}

/// The first line of `console` (the outer machine's kernel log, or a part of it) that says the
/// host is wedged or dying ([`WEDGED_WORDS`]), trimmed.
fn wedged_line(console: &str) -> Option<&str> {
    console
        .lines()
        .find(|l| WEDGED_WORDS.iter().any(|w| l.contains(w)))
        .map(str::trim)
}

/// What a log file gained since it was `mark` bytes long: all of it when it is shorter now (the
/// outer machine's console log starts over with each new host), nothing when it cannot be read.
fn log_since(path: &Path, mark: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let from = if mark <= len { mark } else { 0 };
    let mut text = Vec::new();
    let _ = file
        .seek(SeekFrom::Start(from))
        .and_then(|_| file.read_to_end(&mut text));
    String::from_utf8_lossy(&text).into_owned()
}

/// The last `n` lines of a log file (at most its last 64 KiB), for error messages.
pub fn console_tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::from("  (no console output)");
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let lines: Vec<String> = BufReader::new(f)
        .split(b'\n')
        .map_while(Result::ok)
        .map(|l| String::from_utf8_lossy(&l).trim_end().to_string())
        .collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        return String::from("  (no console output)");
    }
    tail.iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The host ports of the TCP forwardings in `info usernet`'s output, whose rules read like
/// `TCP[HOST_FORWARD]  13   127.0.0.1 40000   10.0.2.15  7377  0  0`.
fn forwarded_ports(info: &str) -> Vec<u16> {
    info.lines()
        .filter(|l| l.contains("TCP[HOST_FORWARD]"))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .collect()
}

/// Why this machine's `/dev/kvm` cannot boot a stock kernel, as a sentence for the user that
/// says what to do; `None` if it can.
pub fn local_kvm_problem() -> Option<String> {
    local_kvm_problem_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

fn local_kvm_problem_at(dev: &Path, sys_module: &Path) -> Option<String> {
    const NESTED: &str = "so ferry runs its VMs in a nested host (QEMU emulating AMD SVM: slower, \
                          but a real KVM; `ferry host start` keeps one up between runs)";
    match File::options().read(true).write(true).open(dev) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(format!(
                "this machine has no {}: enable hardware virtualisation (VT-x/AMD-V in the \
                 firmware, or nested virtualisation for a cloud VM) and load kvm_intel or \
                 kvm_amd. Until then {NESTED}",
                dev.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Some(format!(
                "no permission to open {}: add yourself to its group (`sudo adduser $USER kvm`, \
                 then log in again) or run ferry as root",
                dev.display()
            ))
        }
        Err(e) => return Some(format!("cannot open {}: {e}, {NESTED}", dev.display())),
    }
    if sys_module.join("kvm_pvm").exists() {
        return Some(format!(
            "{} here is PVM (the kvm_pvm module), which runs guest kernel code in an instruction \
             emulator that lacks int3, xrstor and cmpxchg16b: a stock kernel dies early in boot \
             (int3_selftest), {NESTED}",
            dev.display()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_ports_are_read_from_info_usernet() {
        let info = "Hub -1 (n0):\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\n  TCP[HOST_FORWARD]  13       127.0.0.1 40000       10.0.2.15  7377     0     0\n  TCP[HOST_FORWARD]  14       127.0.0.1  7470       10.0.2.15  7470     0     0\n  UDP[236 sec]       27       10.0.2.15 33146        10.0.2.3    53     0     0";
        assert_eq!(forwarded_ports(info), vec![40000, 7470]);
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-nested-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn kvm_problems_are_explained() {
        let d = temp_dir("kvm");
        let missing = local_kvm_problem_at(&d.join("kvm"), &d).unwrap();
        assert!(
            missing.contains("no ") && missing.contains("ferry host start"),
            "{missing}"
        );

        std::fs::write(d.join("kvm"), b"").unwrap();
        assert_eq!(local_kvm_problem_at(&d.join("kvm"), &d), None);

        std::fs::create_dir(d.join("kvm_pvm")).unwrap();
        let pvm = local_kvm_problem_at(&d.join("kvm"), &d).unwrap();
        assert!(
            pvm.contains("PVM") && pvm.contains("ferry host start"),
            "{pvm}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn console_tail_shows_the_last_lines() {
        let d = temp_dir("tail");
        let log = d.join("console.log");
        let text: String = (1..=40).map(|i| format!("line {i}\r\n")).collect();
        std::fs::write(&log, text).unwrap();
        let tail = console_tail(&log, 3);
        assert_eq!(tail, "  | line 38\n  | line 39\n  | line 40");
        assert!(console_tail(&d.join("none"), 3).contains("no console output"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_log_since_a_mark_is_what_it_gained_or_all_of_a_new_one() {
        let d = std::env::temp_dir().join(format!("ferry-log-since-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let log = d.join("console.log");
        std::fs::write(&log, "old line\nnew line\n").unwrap();
        assert_eq!(log_since(&log, 9), "new line\n");
        assert_eq!(log_since(&log, 18), "");
        // A log shorter than the mark is a new host's: all of it is new.
        std::fs::write(&log, "fresh\n").unwrap();
        assert_eq!(log_since(&log, 18), "fresh\n");
        assert_eq!(log_since(&d.join("missing.log"), 0), "");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_stall_or_a_panic_of_the_outer_kernel_is_found_and_ordinary_lines_are_not() {
        let log = "[    4.1] kvm: Nested Virtualization enabled\n\
                   [   12.2] kvm [162]: vcpu0, guest rIP: 0xffffffff8107e744 Unhandled WRMSR\n\
                   [  712.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
                   [  790.3] Kernel panic - not syncing: corrupted stack end detected\n";
        assert_eq!(
            wedged_line(log),
            Some("[  712.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:")
        );
        assert_eq!(wedged_line(&log[..log.find("[  712").unwrap()]), None);
        assert_eq!(
            wedged_line("[ 52.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!"),
            Some("[ 52.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!")
        );
        assert_eq!(wedged_line(""), None);
    }

    #[test]
    fn kernel_cmdline_keeps_the_cache_visible() {
        let c = kernel_cmdline(Path::new("/tmp/ferry-cache"));
        assert!(c.contains("console=ttyS0"));
        assert!(c.contains("ferry.keep=/tmp/ferry-cache"));
        assert!(c.contains("ferry.rw=/tmp/ferry-cache/nested/rw"));
        assert!(!kernel_cmdline(Path::new("/tmp/a b")).contains("ferry.keep"));
    }

    /// Boots the real nested host and checks `/dev/kvm` inside it. Slow (QEMU TCG); runs only
    /// with FERRY_NESTED_TESTS=1.
    #[test]
    fn nested_host_offers_a_working_dev_kvm() {
        if std::env::var_os("FERRY_NESTED_TESTS").is_none_or(|v| v != "1") {
            eprintln!("skipped: set FERRY_NESTED_TESTS=1 to boot the nested host");
            return;
        }
        // A host someone else started (the shared cache's) is used and left running.
        let foreign = NestedHost::running().expect("look for a running host");
        let ours = foreign.is_none();
        let t0 = Instant::now();
        let host = match foreign {
            Some(h) => h,
            None => NestedHost::start(&HostOptions::default()).expect("start the nested host"),
        };
        eprintln!(
            "nested host: start() took {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let check = || -> Result<(), String> {
            let t = Instant::now();
            let (code, out, err) = host
                .exec_output(&["uname".into(), "-r".into()], Path::new("/"), &env, None)
                .map_err(|e| error_chain(&e))?;
            eprintln!(
                "nested host: `uname -r` took {:.2} s: {}",
                t.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&out).trim()
            );
            if code != 0 {
                return Err(format!("uname: {code}: {}", String::from_utf8_lossy(&err)));
            }
            let py =
                "import os,fcntl;fd=os.open('/dev/kvm',os.O_RDWR);print(fcntl.ioctl(fd,0xAE00))";
            let t = Instant::now();
            let (code, out, err) = host
                .exec_output(
                    &["python3".into(), "-c".into(), py.into()],
                    Path::new("/"),
                    &env,
                    Some(Duration::from_secs(60)),
                )
                .map_err(|e| error_chain(&e))?;
            eprintln!(
                "nested host: python3 KVM_GET_API_VERSION took {:.2} s",
                t.elapsed().as_secs_f64()
            );
            if code != 0 || String::from_utf8_lossy(&out).trim() != "12" {
                return Err(format!(
                    "KVM_GET_API_VERSION: status {code}, stdout {:?}, stderr {:?}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                ));
            }
            let sh = |script: &str| -> Vec<String> {
                vec!["/bin/sh".into(), "-c".into(), script.into()]
            };
            // Exit codes, cwd, a writable /tmp, and the host's cache visible in the chroot.
            let cache = debian::cache_dir();
            let script = format!(
                "pwd; echo x > /tmp/f && cat /tmp/f; test -d '{}/nested' && echo cache; exit 7",
                cache.display()
            );
            let (code, out, _) = host
                .exec_output(
                    &sh(&script),
                    Path::new("/usr"),
                    &env,
                    Some(Duration::from_secs(30)),
                )
                .map_err(|e| error_chain(&e))?;
            if code != 7 || String::from_utf8_lossy(&out) != "/usr\nx\ncache\n" {
                return Err(format!(
                    "sh: status {code}, stdout {:?}",
                    String::from_utf8_lossy(&out)
                ));
            }
            // Two commands at once, each on its own connection.
            let t = Instant::now();
            let outputs: Vec<_> = std::thread::scope(|scope| {
                let runs: Vec<_> = ["a", "b"]
                    .map(|w| {
                        let (host, env, cmd) = (&host, &env, sh(&format!("sleep 3; echo {w}")));
                        scope.spawn(move || host.exec_output(&cmd, Path::new("/"), env, None))
                    })
                    .into_iter()
                    .collect();
                runs.into_iter()
                    .map(|r| r.join().expect("no panic"))
                    .collect()
            });
            let both = t.elapsed();
            eprintln!(
                "nested host: two concurrent `sleep 3` took {:.2} s",
                both.as_secs_f64()
            );
            for (o, w) in outputs.into_iter().zip(["a", "b"]) {
                let (code, out, _) = o.map_err(|e| error_chain(&e))?;
                if code != 0 || String::from_utf8_lossy(&out).trim() != w {
                    return Err(format!("concurrent exec {w}: status {code}"));
                }
            }
            if both > Duration::from_secs(5) {
                return Err(format!(
                    "concurrent commands ran one after the other ({both:?})"
                ));
            }
            // A time limit ends the command.
            let t = Instant::now();
            match host.exec_output(
                &sh("sleep 30"),
                Path::new("/"),
                &env,
                Some(Duration::from_secs(2)),
            ) {
                Err(NestedError::Timeout { .. }) if t.elapsed() < Duration::from_secs(6) => {}
                other => {
                    return Err(format!(
                        "exec with a 2 s limit gave {other:?} after {:?}",
                        t.elapsed()
                    ))
                }
            }
            // A host in use by someone else is not stopped by stop_if_unused.
            let stopped = std::thread::scope(|scope| {
                let user =
                    scope.spawn(|| host.exec_output(&sh("sleep 3"), Path::new("/"), &env, None));
                std::thread::sleep(Duration::from_millis(1500));
                let other = NestedHost::running()
                    .ok()
                    .flatten()
                    .expect("the host is running");
                let stopped = other.stop_if_unused();
                let _ = user.join();
                stopped
            });
            if !matches!(stopped, Ok(false)) {
                return Err(format!("stop_if_unused while in use gave {stopped:?}"));
            }
            let again = NestedHost::running().map_err(|e| error_chain(&e))?;
            if again.map(|h| h.pid()) != Some(host.pid()) {
                return Err("running() does not find the host".into());
            }
            Ok(())
        };
        let result = check();
        if ours {
            let pid = host.pid();
            host.stop().expect("stop the nested host");
            assert!(!state::qemu_alive(pid), "QEMU still running after stop()");
            assert!(NestedHost::running().unwrap().is_none());
        }
        result.unwrap();
    }
}
