//! The agent's side of the protocol: serve one connection (a serial port or a TCP stream),
//! running commands and streaming their output, and answering process and load queries.
//!
//! Concurrency: every accepted connection gets a thread of its own
//! ([`Agent::spawn_connection`]), so connections never wait on each other. Within a
//! connection one thread reads and handles frames in order; a command's output is pumped by
//! threads of its own, so `Load`, `ListProcesses` and `Ping` are answered at once even while
//! a command runs on the same connection. Answers go out in the order of the requests.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::Stream;
use crate::migrate::dump::{self, DumpError, Frozen};
use crate::migrate::image::{PageRef, PAGE_SIZE};
use crate::migrate::lazy::LazyPages;
use crate::migrate::restore::{self, RestoreError, Skeleton};
use crate::procfs;
use crate::protocol::{
    Decoder, ExecRequest, Hello, Message, MessageType, ProtocolError, PAGE_FRAMES_BATCH,
    PROTOCOL_VERSION, STREAM_CHUNK,
};
use crate::sys;

/// `PATH` for commands whose environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Exit code for a command that was not found.
pub const CODE_NOT_FOUND: i32 = 127;
/// Exit code for a command that exists but cannot be executed.
pub const CODE_NOT_EXECUTABLE: i32 = 126;
/// Exit code when the agent itself could not run the request.
pub const CODE_AGENT_FAILURE: i32 = 125;

/// Where the output of started processes goes ([`Message::Start`]), as a path in the guest.
pub const DEFAULT_LOG_DIR: &str = "/var/log/ferry";

/// What the agent does on [`Message::PowerOff`].
pub type PowerOffFn = Arc<dyn Fn() + Send + Sync>;

/// The agent: configuration shared by all connections.
#[derive(Clone)]
pub struct Agent {
    chroot: Option<PathBuf>,
    power_off: PowerOffFn,
    hello: Hello,
    proc: PathBuf,
    log_dir: String,
}

impl Agent {
    /// An agent that runs commands in `chroot` (if given) and powers the machine off with
    /// reboot(2) on request.
    pub fn new(chroot: Option<PathBuf>) -> Self {
        Self {
            chroot,
            power_off: Arc::new(|| {
                let err = sys::power_off();
                log(format_args!("power-off failed: {err}"));
            }),
            hello: Hello {
                version: PROTOCOL_VERSION.into(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                kernel_release: sys::kernel_release().unwrap_or_else(|_| "unknown".into()),
                online_cpus: sys::online_cpus(),
            },
            proc: PathBuf::from("/proc"),
            log_dir: DEFAULT_LOG_DIR.into(),
        }
    }

    /// Writes the output of started processes to `dir` (a path in the guest, or in the
    /// chroot) instead of [`DEFAULT_LOG_DIR`] (for tests).
    pub fn with_log_dir(mut self, dir: impl Into<String>) -> Self {
        self.log_dir = dir.into();
        self
    }

    /// Reads processes and load from `dir` instead of `/proc` (for tests).
    pub fn with_proc_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.proc = dir.as_ref().to_owned();
        self
    }

    /// Replaces what [`Message::PowerOff`] does (tests must not power their machine off).
    pub fn with_power_off(mut self, f: PowerOffFn) -> Self {
        self.power_off = f;
        self
    }

    /// The Hello this agent sends.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Serves `stream` on a thread of its own until it closes, logging an error with `peer`
    /// (e.g. `vsock cid 2`). Listeners hand every accepted connection to this, so a host's
    /// long-lived connection polling `Load` is answered while others run commands.
    pub fn spawn_connection<S: Stream>(
        &self,
        stream: S,
        peer: String,
    ) -> io::Result<JoinHandle<()>> {
        let agent = self.clone();
        std::thread::Builder::new()
            .name("ferry-connection".into())
            .spawn(move || {
                if let Err(e) = agent.serve(stream) {
                    log(format_args!("connection from {peer}: {e}"));
                }
            })
    }

    /// Serves one connection until it closes: sends Hello, then answers requests. A command
    /// still running when the connection closes is killed. A frame of a type this agent does
    /// not know (a request from a newer host) is answered with [`Message::Unsupported`] and
    /// the connection goes on; other bad frames are logged and dropped.
    pub fn serve<S: Stream>(&self, mut stream: S) -> io::Result<()> {
        let writer: SharedWriter<S> = Arc::new(Mutex::new(stream.try_clone_stream()?));
        send(&writer, &Message::Hello(self.hello.clone()))?;
        let mut session = Session::default();
        let mut decoder = Decoder::new();
        let mut buf = vec![0; 64 * 1024];
        let mut unknown_logged = false;
        let result = loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            decoder.push(&buf[..n]);
            let skipped = decoder.skipped_bytes();
            let step = loop {
                match decoder.next() {
                    Ok(Some(msg)) => {
                        if let Err(e) = self.handle(msg, &mut session, &writer) {
                            break Err(e);
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(ProtocolError::UnknownType(t)) => {
                        if !unknown_logged {
                            unknown_logged = true;
                            log(format_args!(
                                "the host sent a request of unknown type {t:#04x} (a newer \
                                 ferry?); answering Unsupported"
                            ));
                        }
                        let reply = Message::Unsupported { message_type: t };
                        if let Err(e) = send(&writer, &reply) {
                            break Err(e);
                        }
                    }
                    Err(e) => log_frame_error(&e),
                }
            };
            if decoder.skipped_bytes() != skipped {
                log(format_args!(
                    "skipped {} bytes of garbage",
                    decoder.skipped_bytes() - skipped
                ));
            }
            if let Err(e) = step {
                break Err(e);
            }
        };
        session.end();
        result
    }

    fn handle<S: Stream>(
        &self,
        msg: Message,
        session: &mut Session,
        writer: &SharedWriter<S>,
    ) -> io::Result<()> {
        match msg {
            Message::HelloRequest => send(writer, &Message::Hello(self.hello.clone())),
            Message::Ping { nonce } => send(writer, &Message::Pong { nonce }),
            Message::Pong { .. } => Ok(()),
            Message::Exec(req) => {
                if session.is_running() {
                    return send(
                        writer,
                        &Message::Failed {
                            code: CODE_AGENT_FAILURE,
                            message: "ferry-agent: another command is still running".into(),
                        },
                    );
                }
                match self.start(&req, writer) {
                    Ok(running) => {
                        let frozen = std::mem::take(&mut session.frozen);
                        *session = running;
                        session.frozen = frozen;
                        Ok(())
                    }
                    Err((code, message)) => send(writer, &Message::Failed { code, message }),
                }
            }
            Message::Start(req) => match self.start_detached(&req) {
                Ok((pid, log)) => send(writer, &Message::Started { pid, log }),
                Err((code, message)) => send(writer, &Message::Failed { code, message }),
            },
            Message::Stdin(bytes) => {
                if let Some(tx) = &session.stdin {
                    // Fails only once the child's stdin is gone; the bytes are moot then.
                    let _ = tx.send(bytes);
                }
                Ok(())
            }
            Message::StdinClosed => {
                session.stdin = None;
                Ok(())
            }
            Message::PowerOff => {
                log(format_args!("powering off on request"));
                session.end();
                (self.power_off)();
                Ok(())
            }
            Message::ListProcesses => {
                let reply = match procfs::process_list(&self.proc) {
                    Ok(list) => Message::Processes(list),
                    Err(e) => request_failed(MessageType::ListProcesses, &e),
                };
                send(writer, &reply)
            }
            Message::Load => {
                let reply = match procfs::load(&self.proc) {
                    Ok(load) => Message::LoadReport(load),
                    Err(e) => request_failed(MessageType::Load, &e),
                };
                send(writer, &reply)
            }
            Message::Freeze { pid } => {
                if session.frozen.contains_key(&pid) {
                    return send(
                        writer,
                        &migration_failed(MessageType::Freeze, pid, "is already frozen"),
                    );
                }
                match dump::freeze(pid) {
                    Ok(frozen) => {
                        send(writer, &Message::Frozen(frozen.image().clone()))?;
                        let pages = frozen.pages().to_vec();
                        session.frozen.insert(pid, frozen);
                        send_pages(writer, &pages)
                    }
                    Err(e) => send(writer, &dump_failed(MessageType::Freeze, pid, e)),
                }
            }
            Message::Recheck { pid } => {
                let Some(frozen) = session.frozen.get(&pid) else {
                    return send(
                        writer,
                        &migration_failed(MessageType::Recheck, pid, "is not frozen"),
                    );
                };
                match frozen.recheck() {
                    Ok(pages) => send_pages(writer, &pages),
                    Err(e) => send(
                        writer,
                        &migration_failed(MessageType::Recheck, pid, &causes(&e)),
                    ),
                }
            }
            Message::Outline { pid } => match dump::outline(pid) {
                Ok((image, pages)) => {
                    send(writer, &Message::Outlined(image))?;
                    send_pages(writer, &pages)
                }
                Err(e) => send(writer, &dump_failed(MessageType::Outline, pid, e)),
            },
            Message::Survey { pid } => match dump::survey(pid) {
                Ok(pages) => send_pages(writer, &pages),
                Err(e) => send(writer, &dump_failed(MessageType::Survey, pid, e)),
            },
            Message::Release { pid, kill } => {
                let Some(frozen) = session.frozen.remove(&pid) else {
                    return send(
                        writer,
                        &migration_failed(MessageType::Release, pid, "is not frozen"),
                    );
                };
                let result = if kill { frozen.kill() } else { frozen.thaw() };
                match result {
                    Ok(()) => send(writer, &Message::Released { pid }),
                    Err(e) => send(
                        writer,
                        &migration_failed(MessageType::Release, pid, &causes(&e)),
                    ),
                }
            }
            Message::Rebuild(image) => {
                // One skeleton per connection at a time: the next Rebuild replaces (aborts) an
                // unfinished one.
                if let Some(old) = session.skeleton.take() {
                    old.abort();
                }
                // An image without registers is an outline (pre-copy): its address space now,
                // the rest at `Complete`.
                let built = if image.regs.is_empty() {
                    restore::build_outline(&image)
                } else {
                    restore::build(&image)
                };
                match built {
                    Ok(skeleton) => {
                        let pid = skeleton.pid();
                        for w in skeleton.warnings() {
                            log(format_args!("rebuilding pid {}: {w}", image.pid));
                        }
                        session.skeleton = Some(skeleton);
                        send(writer, &Message::Rebuilt { pid })
                    }
                    Err(e) => send(
                        writer,
                        &migration_failed(MessageType::Rebuild, image.pid, &causes(&e)),
                    ),
                }
            }
            Message::Complete(image) => {
                let Some(mut skeleton) = session.skeleton.take() else {
                    return send(
                        writer,
                        &migration_failed(
                            MessageType::Complete,
                            image.pid,
                            "has no skeleton built from an outline on this connection",
                        ),
                    );
                };
                let completed = match skeleton.complete(&image) {
                    Ok(stale) => Ok((skeleton, stale)),
                    Err(RestoreError::Outdated(why)) => {
                        log(format_args!(
                            "rebuilding pid {} anew: the skeleton built from its outline cannot take it: {why}",
                            image.pid
                        ));
                        skeleton.abort();
                        restore::build(&image).map(|fresh| (fresh, vec![(0, u64::MAX)]))
                    }
                    Err(e) => {
                        skeleton.abort();
                        Err(e)
                    }
                };
                match completed {
                    Ok((skeleton, stale)) => {
                        let pid = skeleton.pid();
                        for w in skeleton.warnings() {
                            log(format_args!("rebuilding pid {}: {w}", image.pid));
                        }
                        session.skeleton = Some(skeleton);
                        send(writer, &Message::Completed { pid, stale })
                    }
                    Err(e) => send(
                        writer,
                        &migration_failed(MessageType::Complete, image.pid, &causes(&e)),
                    ),
                }
            }
            Message::Discard(vaddrs) => {
                let Some(skeleton) = session.skeleton.as_mut() else {
                    return send(
                        writer,
                        &Message::RequestFailed {
                            request: MessageType::Discard as u8,
                            message: "ferry-agent: no process is being rebuilt on this connection"
                                .into(),
                        },
                    );
                };
                let pid = skeleton.pid();
                match skeleton.discard(&vaddrs) {
                    Ok(()) => send(writer, &Message::Released { pid }),
                    Err(e) => send(
                        writer,
                        &migration_failed(MessageType::Discard, pid, &causes(&e)),
                    ),
                }
            }
            Message::WantFrames(vaddrs) => {
                let Some(skeleton) = session.skeleton.as_mut() else {
                    return send(
                        writer,
                        &Message::RequestFailed {
                            request: MessageType::WantFrames as u8,
                            message: "ferry-agent: no process is being rebuilt on this connection"
                                .into(),
                        },
                    );
                };
                match skeleton.frames(&vaddrs) {
                    Ok(pfns) => {
                        let refs: Vec<PageRef> = vaddrs
                            .iter()
                            .zip(pfns)
                            .map(|(&vaddr, pfn)| PageRef {
                                vaddr,
                                pfn,
                                anon: true,
                            })
                            .collect();
                        send_pages(writer, &refs)
                    }
                    Err(e) => {
                        let pid = skeleton.pid();
                        send(
                            writer,
                            &migration_failed(MessageType::WantFrames, pid, &causes(&e)),
                        )
                    }
                }
            }
            Message::Resume { pid } => match session.skeleton.take() {
                Some(skeleton) if skeleton.pid() == pid => match skeleton.resume() {
                    Ok(pid) => {
                        // The agent is its parent now: it reaps it when it ends.
                        let _ = std::thread::Builder::new()
                            .name(format!("reap-{pid}"))
                            .spawn(move || {
                                if let Ok(status) = sys::wait_exit(pid) {
                                    log(format_args!(
                                        "migrated-in pid {pid} ended (wait status {status:#x})"
                                    ));
                                }
                            });
                        send(writer, &Message::Resumed { pid })
                    }
                    Err(e) => send(
                        writer,
                        &migration_failed(MessageType::Resume, pid, &causes(&e)),
                    ),
                },
                other => {
                    session.skeleton = other;
                    send(
                        writer,
                        &migration_failed(MessageType::Resume, pid, "is not being rebuilt here"),
                    )
                }
            },
            Message::Lazy(ranges) => {
                let Some(skeleton) = session.skeleton.as_mut() else {
                    return send(
                        writer,
                        &Message::RequestFailed {
                            request: MessageType::Lazy as u8,
                            message: "ferry-agent: no process is being rebuilt on this connection"
                                .into(),
                        },
                    );
                };
                let pid = skeleton.pid();
                let lazy = skeleton
                    .userfaultfd(&ranges)
                    .map_err(|e| causes(&e))
                    .and_then(|fd| LazyPages::new(pid, fd).map_err(|e| causes(&e)));
                match lazy {
                    Ok(lazy) => {
                        let base = lazy.staging_addr();
                        let refs: Vec<PageRef> = (0u64..)
                            .zip(lazy.frames())
                            .map(|(i, &pfn)| PageRef {
                                vaddr: base + i * PAGE_SIZE,
                                pfn,
                                anon: true,
                            })
                            .collect();
                        session.lazy = Some(lazy);
                        send_pages(writer, &refs)
                    }
                    Err(e) => send(writer, &migration_failed(MessageType::Lazy, pid, &e)),
                }
            }
            Message::Place(pages) => {
                let Some(lazy) = session.lazy.as_mut() else {
                    return send(writer, &no_lazy(MessageType::Place));
                };
                let reply = lazy
                    .place(&pages)
                    .and_then(|_| lazy.faults(0))
                    .map(Message::Faults);
                match reply {
                    Ok(m) => send(writer, &m),
                    Err(e) => {
                        let pid = lazy.pid();
                        send(
                            writer,
                            &migration_failed(MessageType::Place, pid, &causes(&e)),
                        )
                    }
                }
            }
            Message::WaitFaults { wait_ms } => {
                let Some(lazy) = session.lazy.as_mut() else {
                    return send(writer, &no_lazy(MessageType::WaitFaults));
                };
                match lazy.faults(wait_ms.min(1000)) {
                    Ok(faults) => send(writer, &Message::Faults(faults)),
                    Err(e) => {
                        let pid = lazy.pid();
                        send(
                            writer,
                            &migration_failed(MessageType::WaitFaults, pid, &causes(&e)),
                        )
                    }
                }
            }
            Message::LazyEnd { pid } => match session.lazy.take() {
                Some(lazy) if lazy.pid() == pid => {
                    log(format_args!(
                        "pid {pid}: post-copy done, {} pages placed, {} children forked \
                         meanwhile got them too",
                        lazy.placed(),
                        lazy.forks()
                    ));
                    drop(lazy);
                    send(writer, &Message::Released { pid })
                }
                other => {
                    session.lazy = other;
                    send(
                        writer,
                        &migration_failed(MessageType::LazyEnd, pid, "is not in post-copy here"),
                    )
                }
            },
            Message::Abort { pid } => match session.skeleton.take() {
                Some(skeleton) if skeleton.pid() == pid => {
                    session.lazy = None;
                    skeleton.abort();
                    send(writer, &Message::Released { pid })
                }
                other => {
                    session.skeleton = other;
                    send(
                        writer,
                        &migration_failed(MessageType::Abort, pid, "is not being rebuilt here"),
                    )
                }
            },
            other @ (Message::Hello(_)
            | Message::Stdout(_)
            | Message::Stderr(_)
            | Message::Exited { .. }
            | Message::Failed { .. }
            | Message::Processes(_)
            | Message::LoadReport(_)
            | Message::Unsupported { .. }
            | Message::RequestFailed { .. }
            | Message::Frozen(_)
            | Message::Outlined(_)
            | Message::Completed { .. }
            | Message::PageFrames(_)
            | Message::PageFramesEnd { .. }
            | Message::CantMove { .. }
            | Message::Released { .. }
            | Message::Rebuilt { .. }
            | Message::Resumed { .. }
            | Message::Started { .. }
            | Message::Faults(_)) => {
                log(format_args!(
                    "ignoring {} message, which only agents send",
                    other.message_type()
                ));
                Ok(())
            }
        }
    }

    /// Spawns the command and the threads that stream its output and report its end.
    fn start<S: Stream>(
        &self,
        req: &ExecRequest,
        writer: &SharedWriter<S>,
    ) -> Result<Session, (i32, String)> {
        let mut child = self.spawn(req)?;
        let pid = child.id();
        let done = Arc::new(AtomicBool::new(false));
        let pumps: Vec<JoinHandle<()>> = [
            child
                .stdout
                .take()
                .map(|o| pump(o, Message::Stdout, writer)),
            child
                .stderr
                .take()
                .map(|e| pump(e, Message::Stderr, writer)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let stdin = child.stdin.take().map(|child_stdin| {
            let (tx, rx) = sync_channel(16);
            std::thread::spawn(move || feed_stdin(child_stdin, rx));
            tx
        });
        let writer = Arc::clone(writer);
        let finished = Arc::clone(&done);
        std::thread::spawn(move || {
            for p in pumps {
                let _ = p.join();
            }
            // Not `child.wait()`: while a migration freezes the command, its ptrace stops
            // are reported to every thread of the agent, which std would take for its end.
            let code = match sys::wait_exit(pid) {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    drop(child);
                    exit_code(ExitStatus::from_raw(status))
                }
                Err(e) => {
                    log(format_args!("cannot wait for pid {pid}: {e}"));
                    CODE_AGENT_FAILURE
                }
            };
            // Before Exited goes out, so a host's next Exec never finds us busy.
            finished.store(true, Ordering::SeqCst);
            let _ = send(&writer, &Message::Exited { code });
        });
        Ok(Session {
            pid: Some(pid),
            done,
            stdin,
            frozen: Default::default(),
            skeleton: None,
            lazy: None,
        })
    }

    /// Starts `req` detached ([`Message::Start`]): a session of its own, stdin `/dev/null`,
    /// stdout and stderr to `LOG_DIR/PID.log`, no other descriptor inherited; the agent reaps
    /// it when it ends. Its pid and
    /// its log's path.
    fn start_detached(&self, req: &ExecRequest) -> Result<(u32, String), (i32, String)> {
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let Some(program) = req.argv.first() else {
            return Err((CODE_AGENT_FAILURE, "ferry-agent: empty command".into()));
        };
        let failure =
            |what: &str, e: io::Error| (CODE_AGENT_FAILURE, format!("ferry-agent: {what}: {e}"));
        let dir = self.seen_from_here(&self.log_dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| failure(&format!("creating {}", self.log_dir), e))?;
        // The pid is known once it runs: the log is renamed then (the open file follows).
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let first = dir.join(format!(".starting-{}-{n}.log", std::process::id()));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&first)
            .map_err(|e| failure(&format!("creating {}", first.display()), e))?;
        let err = log_file
            .try_clone()
            .map_err(|e| failure("duplicating the log file", e))?;
        let mut cmd = self.command(req, program)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(err));
        sys::detach_before_exec(&mut cmd);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&first);
                return Err(spawn_failure(program, &e));
            }
        };
        let pid = child.id();
        let log_path = format!("{}/{pid}.log", self.log_dir.trim_end_matches('/'));
        if let Err(e) = std::fs::rename(&first, dir.join(format!("{pid}.log"))) {
            log(format_args!(
                "pid {pid}: cannot rename its log to {log_path}: {e}"
            ));
        }
        // Not `child.wait()`: a migration's ptrace stops are reported to every thread of the
        // agent (see `start`).
        let name = program.clone();
        let _ = std::thread::Builder::new()
            .name(format!("reap-{pid}"))
            .spawn(move || {
                if let Ok(status) = sys::wait_exit(pid) {
                    drop(child);
                    log(format_args!(
                        "started pid {pid} ({name}) ended (wait status {status:#x})"
                    ));
                }
            });
        log(format_args!("started pid {pid}: {}", req.argv.join(" ")));
        Ok((pid, log_path))
    }

    /// `path` (in the guest) as this process sees it: inside the chroot, if there is one.
    fn seen_from_here(&self, path: &str) -> PathBuf {
        match &self.chroot {
            Some(root) => root.join(path.trim_start_matches('/')),
            None => PathBuf::from(path),
        }
    }

    fn spawn(&self, req: &ExecRequest) -> Result<Child, (i32, String)> {
        let Some(program) = req.argv.first() else {
            return Err((CODE_AGENT_FAILURE, "ferry-agent: empty command".into()));
        };
        let mut cmd = self.command(req, program)?;
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd.spawn().map_err(|e| spawn_failure(program, &e))
    }

    /// The command of `req`: its program and arguments, environment (a standard `PATH` if
    /// it has none), working directory, and the chroot if there is one.
    fn command(&self, req: &ExecRequest, program: &str) -> Result<Command, (i32, String)> {
        let cwd = req.cwd.as_deref().unwrap_or("/");
        if !self.seen_from_here(cwd).is_dir() {
            return Err((
                CODE_AGENT_FAILURE,
                format!("ferry-agent: cannot change directory to {cwd}: No such directory"),
            ));
        }
        let mut cmd = Command::new(program);
        cmd.args(&req.argv[1..])
            .env_clear()
            .envs(req.env.iter().map(|(k, v)| (k, v)));
        if !req.env.iter().any(|(k, _)| k == "PATH") {
            cmd.env("PATH", DEFAULT_PATH);
        }
        match &self.chroot {
            Some(root) => sys::chroot_before_exec(&mut cmd, root, cwd)
                .map_err(|e| (CODE_AGENT_FAILURE, format!("ferry-agent: {e}")))?,
            None => {
                cmd.current_dir(cwd);
            }
        }
        Ok(cmd)
    }
}

/// The answer to a request that could not be served, logged on the console too.
fn request_failed(request: MessageType, e: &procfs::ProcError) -> Message {
    log(format_args!("cannot answer {request}: {e}"));
    Message::RequestFailed {
        request: request as u8,
        message: format!("ferry-agent: {e}"),
    }
}

/// The answer to a migration request that failed, logged on the console too.
fn migration_failed(request: MessageType, pid: u32, why: &str) -> Message {
    log(format_args!("cannot answer {request} for pid {pid}: {why}"));
    Message::RequestFailed {
        request: request as u8,
        message: format!("ferry-agent: pid {pid}: {why}"),
    }
}

/// `e` and its sources, on one line for the VMM (a source its error already prints is not
/// repeated): the kernel's errno must reach the operator, not only what the agent was doing.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The answer to a post-copy request on a connection with no post-copy going on.
fn no_lazy(request: MessageType) -> Message {
    Message::RequestFailed {
        request: request as u8,
        message: "ferry-agent: no process receives its pages after resuming on this connection"
            .into(),
    }
}

/// The answer to a `request` about `pid` that the dump refused: the reason it cannot move, or
/// what failed.
fn dump_failed(request: MessageType, pid: u32, e: DumpError) -> Message {
    match e {
        DumpError::CantMove { reason, .. } => Message::CantMove {
            reason: reason.to_string(),
        },
        e => migration_failed(request, pid, &causes(&e)),
    }
}

/// Sends `pages` in [`Message::PageFrames`] batches, then [`Message::PageFramesEnd`].
fn send_pages<S: Stream>(writer: &SharedWriter<S>, pages: &[PageRef]) -> io::Result<()> {
    for batch in pages.chunks(PAGE_FRAMES_BATCH) {
        send(writer, &Message::PageFrames(batch.to_vec()))?;
    }
    send(
        writer,
        &Message::PageFramesEnd {
            count: pages.len() as u64,
        },
    )
}

/// Code and message for a command that could not start, worded like a shell's.
fn spawn_failure(program: &str, e: &io::Error) -> (i32, String) {
    match e.kind() {
        io::ErrorKind::NotFound if !program.contains('/') => (
            CODE_NOT_FOUND,
            format!("ferry-agent: {program}: command not found"),
        ),
        io::ErrorKind::NotFound => (
            CODE_NOT_FOUND,
            format!("ferry-agent: {program}: No such file or directory"),
        ),
        io::ErrorKind::PermissionDenied => (
            CODE_NOT_EXECUTABLE,
            format!("ferry-agent: {program}: Permission denied"),
        ),
        _ => (CODE_NOT_EXECUTABLE, format!("ferry-agent: {program}: {e}")),
    }
}

/// A shell-style exit code: the status, or 128 + the signal that killed the process.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(CODE_AGENT_FAILURE)
}

type SharedWriter<S> = Arc<Mutex<S>>;

/// The command running on a connection, if any, and the processes it froze for migration
/// (thawed when the connection ends; ptrace ties them to this connection's thread).
#[derive(Default)]
struct Session {
    pid: Option<u32>,
    done: Arc<AtomicBool>,
    stdin: Option<SyncSender<Vec<u8>>>,
    frozen: std::collections::HashMap<u32, Frozen>,
    /// The process being rebuilt here (destination side), aborted if the connection ends.
    skeleton: Option<Skeleton>,
    /// The migrated process whose pages still arrive (post-copy): killed if the connection
    /// ends first, since nothing else can bring them.
    lazy: Option<LazyPages>,
}

impl Session {
    fn is_running(&self) -> bool {
        self.pid.is_some() && !self.done.load(Ordering::SeqCst)
    }

    /// Ends the command if it still runs: SIGTERM, so it can clean up (a `ferry run` inside the
    /// nested host stops its VM), then SIGKILL if it is still there after a grace period.
    fn end(&mut self) {
        const GRACE: Duration = Duration::from_secs(3);
        if let Some(skeleton) = self.skeleton.take() {
            log(format_args!(
                "aborting the rebuild of pid {}: its connection ended",
                skeleton.pid()
            ));
            skeleton.abort();
        }
        if let Some(lazy) = self.lazy.take() {
            let pid = lazy.pid();
            log(format_args!(
                "killing pid {pid}: its connection ended before all its pages arrived (post-copy)"
            ));
            sys::kill(pid, libc::SIGKILL);
            drop(lazy);
        }
        for (pid, frozen) in self.frozen.drain() {
            log(format_args!("thawing pid {pid}: its connection ended"));
            if let Err(e) = frozen.thaw() {
                log(format_args!("cannot thaw pid {pid}: {e}"));
            }
        }
        self.stdin = None;
        if let Some(pid) = self.pid {
            if !self.done.load(Ordering::SeqCst) {
                log(format_args!("stopping pid {pid}: its session ended"));
                sys::kill(pid, libc::SIGTERM);
                let done = self.done.clone();
                std::thread::spawn(move || {
                    let deadline = Instant::now() + GRACE;
                    while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if !done.load(Ordering::SeqCst) {
                        log(format_args!(
                            "killing pid {pid}: still running after SIGTERM"
                        ));
                        sys::kill(pid, libc::SIGKILL);
                    }
                });
            }
        }
    }
}

fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn send<S: Stream>(writer: &Mutex<S>, msg: &Message) -> io::Result<()> {
    let frame = msg.encode();
    let mut w = lock(writer);
    w.write_all(&frame)?;
    w.flush()
}

/// Streams a pipe to the host as frames made by `wrap`, until end of file.
fn pump<S: Stream>(
    mut pipe: impl Read + Send + 'static,
    wrap: fn(Vec<u8>) -> Message,
    writer: &SharedWriter<S>,
) -> JoinHandle<()> {
    let writer = Arc::clone(writer);
    std::thread::spawn(move || {
        let mut buf = vec![0; STREAM_CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if send(&writer, &wrap(buf[..n].to_vec())).is_err() {
                        // The host is gone; closing the pipe lets the command see EPIPE.
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// Writes what the host sends to the command's stdin; closes it when the sender is dropped.
/// After a write error it keeps draining, so the connection's reader never blocks on it.
fn feed_stdin(mut stdin: ChildStdin, rx: Receiver<Vec<u8>>) {
    let mut open = true;
    for bytes in rx {
        if open && stdin.write_all(&bytes).is_err() {
            open = false;
        }
    }
}

fn log_frame_error(e: &ProtocolError) {
    log(format_args!("dropping a bad frame: {e}"));
}

/// A line on stderr (the guest console).
pub fn log(args: std::fmt::Arguments<'_>) {
    eprintln!("ferry-agent: {args}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::lazy::LazyError;

    #[test]
    fn a_refused_page_says_the_kernels_errno() {
        let e = LazyError::Place {
            pid: 183,
            child: false,
            vaddr: 0x7fd5_a2cc_c000,
            source: io::Error::from_raw_os_error(libc::EFAULT),
        };
        let text = causes(&e);
        assert!(
            text.starts_with("placing page 0x7fd5a2ccc000 into process 183: Bad address"),
            "{text}"
        );
        let in_child = LazyError::Place {
            pid: 183,
            child: true,
            vaddr: 0x7fd5_a2cc_c000,
            source: io::Error::from_raw_os_error(libc::EFAULT),
        };
        assert!(
            causes(&in_child).starts_with(
                "placing page 0x7fd5a2ccc000 into process 183's child (forked during post-copy)"
            ),
            "{}",
            causes(&in_child)
        );
        // A source the error already prints is not repeated.
        let wrapped = io::Error::other(format!("reading: {e}"));
        assert_eq!(causes(&wrapped).matches("placing page").count(), 1);
    }
}
