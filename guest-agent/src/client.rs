//! The host's side of the agent protocol: connect, run commands, list processes, report load,
//! power the guest off.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::migrate::image::{PageRef, ProcessImage};
use crate::migrate::lazy::Placement;
use crate::protocol::{
    Decoder, ExecRequest, Hello, LoadInfo, Message, MessageType, ProcessInfo, ProcessList,
    ProtocolError, PAGE_FRAMES_BATCH, PROTOCOL_VERSION, STREAM_CHUNK,
};

/// A byte stream the protocol can run over.
pub trait Stream: Read + Write + Send + Sized + 'static {
    /// A second handle to the same stream (for writing while another thread reads).
    fn try_clone_stream(&self) -> io::Result<Self>;
    /// Sets how long a read may block; `None` blocks indefinitely.
    fn set_read_timeout_opt(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_opt(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Stream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_opt(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// A character device such as a serial port. Read timeouts are not supported.
impl Stream for File {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_opt(&self, t: Option<Duration>) -> io::Result<()> {
        match t {
            None => Ok(()),
            Some(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "read timeouts are not supported on a plain file",
            )),
        }
    }
}

/// Errors talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport failed.
    #[error("agent connection: {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The transport's error.
        #[source]
        source: io::Error,
    },
    /// No answer in time.
    #[error(
        "the guest agent did not answer within {0:?} while {1}; is the guest up and \
         ferry-agent running in it (see the guest console)?"
    )]
    Timeout(Duration, &'static str),
    /// The peer closed the connection.
    #[error("the connection to the guest agent closed while {0}")]
    Disconnected(&'static str),
    /// The agent sent something this build cannot decode.
    #[error("bad frame from the guest agent")]
    Protocol(#[from] ProtocolError),
    /// The agent's Hello announced another protocol version.
    #[error(
        "the guest agent speaks protocol version {agent}, ferry speaks {host}; rebuild the \
         guest image (`ferry image build --force`)"
    )]
    VersionMismatch {
        /// The agent's version.
        agent: u16,
        /// Ours.
        host: u8,
    },
    /// The agent does not know a request this build sent: it answered
    /// [`Message::Unsupported`], or (agents from before that message) dropped the request
    /// and answered the Ping sent right behind it.
    #[error(
        "the guest's agent is older than this ferry; rebuild the image: `ferry image build \
         --force` (it does not know {request} requests)"
    )]
    AgentTooOld {
        /// The request it did not know.
        request: MessageType,
    },
    /// The agent knows the request but could not answer it ([`Message::RequestFailed`]).
    #[error("the guest agent could not answer a {request} request: {message}")]
    RequestFailed {
        /// The request.
        request: MessageType,
        /// The agent's explanation.
        message: String,
    },
    /// The process cannot move ([`Message::CantMove`]); it was left untouched.
    #[error("the process cannot move: {0}")]
    CantMove(String),
    /// A page-frame answer did not add up (the agent's count, or one frame per address).
    #[error("the guest agent announced {announced} page frames but sent {received}")]
    PageCount {
        /// What the agent said it sent (or what was asked for).
        announced: u64,
        /// What arrived.
        received: u64,
    },
    /// The command to run was empty.
    #[error("no command to run")]
    EmptyCommand,
    /// A program to start detached could not start ([`Message::Start`]).
    #[error("{message}")]
    StartFailed {
        /// Shell-style: 127 not found, 126 not executable, 125 another failure.
        code: i32,
        /// The agent's message, e.g. `ferry-agent: foo: command not found`.
        message: String,
    },
    /// Writing the command's output to the caller's writers failed.
    #[error("cannot write the command's output")]
    Output(#[source] io::Error),
}

/// How often the handshake asks again for a Hello while waiting.
const HELLO_RETRY: Duration = Duration::from_secs(2);

/// A connection to one agent, after its Hello.
pub struct AgentConnection<S: Stream> {
    reader: S,
    writer: Arc<Mutex<S>>,
    decoder: Decoder,
    hello: Hello,
    timeout: Duration,
    next_nonce: u64,
    /// The nonce of the Ping sent behind the last [`AgentConnection::request`] whose Pong has
    /// not arrived yet; everything before that Pong belongs to the earlier request.
    pending_fence: Option<u64>,
    buf: Vec<u8>,
}

impl<S: Stream> AgentConnection<S> {
    /// Waits up to `timeout` for the agent's Hello, skipping anything else on the stream (boot
    /// noise, stale frames), and checks the protocol version. Asks for a Hello (again) every
    /// couple of seconds, for an agent that started before the host attached.
    pub fn handshake(stream: S, timeout: Duration) -> Result<Self, ClientError> {
        let writer = stream
            .try_clone_stream()
            .map_err(|source| ClientError::Io {
                context: "cannot clone the stream",
                source,
            })?;
        let mut conn = Self {
            reader: stream,
            writer: Arc::new(Mutex::new(writer)),
            decoder: Decoder::new(),
            hello: Hello {
                version: 0,
                agent_version: String::new(),
                kernel_release: String::new(),
                online_cpus: 0,
            },
            timeout,
            next_nonce: 1,
            pending_fence: None,
            buf: vec![0; 64 * 1024],
        };
        let deadline = Instant::now() + timeout;
        let mut version_error = None;
        let hello = 'wait: loop {
            conn.send(&Message::HelloRequest)?;
            let ask_again = Instant::now() + HELLO_RETRY;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err(version_error
                        .unwrap_or(ClientError::Timeout(timeout, "waiting for its Hello")));
                }
                if now >= ask_again {
                    continue 'wait;
                }
                let wait = deadline.min(ask_again) - now;
                match conn.receive(Some(wait), "waiting for its Hello") {
                    Ok(Message::Hello(h)) => break 'wait h,
                    Ok(_) | Err(ClientError::Timeout(..)) => {}
                    // A newer agent: report it if no valid Hello follows.
                    Err(ClientError::Protocol(e @ ProtocolError::UnsupportedVersion { .. })) => {
                        version_error = Some(ClientError::Protocol(e))
                    }
                    // Garbage that happened to contain a magic.
                    Err(ClientError::Protocol(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        };
        if hello.version != u16::from(PROTOCOL_VERSION) {
            return Err(ClientError::VersionMismatch {
                agent: hello.version,
                host: PROTOCOL_VERSION,
            });
        }
        conn.hello = hello;
        Ok(conn)
    }

    /// What the agent said about itself.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Round-trip time of a Ping, waiting at most the handshake's timeout.
    pub fn ping(&mut self) -> Result<Duration, ClientError> {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        let start = Instant::now();
        self.send(&Message::Ping { nonce })?;
        let deadline = start + self.timeout;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return Err(ClientError::Timeout(self.timeout, "waiting for a Pong"));
            }
            if let Message::Pong { nonce: n } = self.receive(Some(wait), "waiting for a Pong")? {
                if n == nonce {
                    return Ok(start.elapsed());
                }
            }
        }
    }

    /// The processes running in the guest, by ascending pid, waiting at most the handshake's
    /// timeout. A list too big for one frame comes without some processes (see
    /// [`AgentConnection::process_list`], which says so). Fails with
    /// [`ClientError::AgentTooOld`] if the guest's agent predates the request.
    pub fn processes(&mut self) -> Result<Vec<ProcessInfo>, ClientError> {
        Ok(self.process_list()?.processes)
    }

    /// Like [`AgentConnection::processes`], with whether the agent had to leave processes out
    /// ([`ProcessList::truncated`]).
    pub fn process_list(&mut self) -> Result<ProcessList, ClientError> {
        self.request(
            Message::ListProcesses,
            "waiting for the process list",
            |m| match m {
                Message::Processes(list) => Some(list),
                _ => None,
            },
        )
    }

    /// The guest's load, memory and CPU time, waiting at most the handshake's timeout. Cheap
    /// enough to poll every second on a long-lived connection; CPU use is
    /// `1 - Δcpu_idle_ticks / Δcpu_total_ticks` between two reports. Fails with
    /// [`ClientError::AgentTooOld`] if the guest's agent predates the request.
    pub fn load(&mut self) -> Result<LoadInfo, ClientError> {
        self.request(Message::Load, "waiting for the load report", |m| match m {
            Message::LoadReport(load) => Some(load),
            _ => None,
        })
    }

    /// Freezes process `pid` in the guest for migration: its image and every present page
    /// with its guest-physical frame. [`ClientError::CantMove`] says why a process cannot
    /// move. The process stays frozen until [`AgentConnection::release`] or this connection
    /// closes (the agent then thaws it).
    pub fn freeze(&mut self, pid: u32) -> Result<(ProcessImage, Vec<PageRef>), ClientError> {
        self.image_and_pages(
            Message::Freeze { pid },
            "waiting for the frozen process's image",
            |m| match m {
                Message::Frozen(image) => Some(image),
                _ => None,
            },
        )
    }

    /// Sends `request` and reads the image (`image` picks it out) and the page frames that
    /// answer it, or the reason the process cannot move.
    fn image_and_pages(
        &mut self,
        request: Message,
        waiting: &'static str,
        image: fn(Message) -> Option<ProcessImage>,
    ) -> Result<(ProcessImage, Vec<PageRef>), ClientError> {
        let image = self.request(request, waiting, |m| match m {
            Message::CantMove { reason } => Some(Err(reason)),
            m => image(m).map(Ok),
        })?;
        let image = image.map_err(ClientError::CantMove)?;
        let pages = self.page_frames(Vec::new())?;
        Ok((image, pages))
    }

    /// The pages of frozen process `pid` whose frame changed since the freeze.
    pub fn recheck(&mut self, pid: u32) -> Result<Vec<PageRef>, ClientError> {
        let first = self.request(
            Message::Recheck { pid },
            "waiting for the rechecked page frames",
            |m| match m {
                Message::PageFrames(pages) => Some(Ok(pages)),
                Message::PageFramesEnd { count } => Some(Err(count)),
                _ => None,
            },
        )?;
        match first {
            Ok(pages) => self.page_frames(pages),
            Err(0) => Ok(Vec::new()),
            Err(count) => Err(ClientError::PageCount {
                announced: count,
                received: 0,
            }),
        }
    }

    /// Checks that running process `pid` could move and lists the frames of its present pages
    /// without stopping it (a pre-copy round). [`ClientError::CantMove`] says why it cannot.
    pub fn survey(&mut self, pid: u32) -> Result<Vec<PageRef>, ClientError> {
        let first = self.request(
            Message::Survey { pid },
            "waiting for the process's page frames",
            |m| match m {
                Message::PageFrames(pages) => Some(Ok(pages)),
                Message::PageFramesEnd { count } => Some(Err(Ok(count))),
                Message::CantMove { reason } => Some(Err(Err(reason))),
                _ => None,
            },
        )?;
        match first {
            Ok(pages) => self.page_frames(pages),
            Err(Ok(0)) => Ok(Vec::new()),
            Err(Ok(count)) => Err(ClientError::PageCount {
                announced: count,
                received: 0,
            }),
            Err(Err(reason)) => Err(ClientError::CantMove(reason)),
        }
    }

    /// Pre-copy's first look at running process `pid`: its outline (the image as `/proc`
    /// shows it while it runs, without registers) and the frames of its present pages. The
    /// process is not stopped. [`ClientError::CantMove`] says why it cannot move.
    pub fn outline(&mut self, pid: u32) -> Result<(ProcessImage, Vec<PageRef>), ClientError> {
        self.image_and_pages(
            Message::Outline { pid },
            "waiting for the process's outline",
            |m| match m {
                Message::Outlined(image) => Some(image),
                _ => None,
            },
        )
    }

    /// Lets frozen process `pid` go on unchanged (`kill` false), or kills it.
    pub fn release(&mut self, pid: u32, kill: bool) -> Result<(), ClientError> {
        self.request(
            Message::Release { pid, kill },
            "waiting for the process's release",
            |m| matches!(m, Message::Released { pid: p } if p == pid).then_some(()),
        )
    }

    /// Builds a skeleton of `image` in the guest (the destination side); returns its pid.
    pub fn rebuild(&mut self, image: &ProcessImage) -> Result<u32, ClientError> {
        self.request(
            Message::Rebuild(image.clone()),
            "waiting for the rebuilt process",
            |m| match m {
                Message::Rebuilt { pid } => Some(pid),
                _ => None,
            },
        )
    }

    /// Completes the skeleton built from an outline (a [`AgentConnection::rebuild`] of an
    /// image without registers) with the frozen process's `image`. Returns its pid (a new
    /// one when it had to be built anew) and the ranges whose frames, reported before, no
    /// longer hold.
    pub fn complete(
        &mut self,
        image: &ProcessImage,
    ) -> Result<(u32, Vec<(u64, u64)>), ClientError> {
        self.request(
            Message::Complete(image.clone()),
            "waiting for the completed process",
            |m| match m {
                Message::Completed { pid, stale } => Some((pid, stale)),
                _ => None,
            },
        )
    }

    /// The frames backing the skeleton's pages at `vaddrs`, one per address in order (asked
    /// for in batches of [`PAGE_FRAMES_BATCH`]).
    pub fn want_frames(&mut self, vaddrs: &[u64]) -> Result<Vec<PageRef>, ClientError> {
        let mut out = Vec::with_capacity(vaddrs.len());
        for batch in vaddrs.chunks(PAGE_FRAMES_BATCH) {
            let pages = self.request(
                Message::WantFrames(batch.to_vec()),
                "waiting for the skeleton's page frames",
                |m| match m {
                    Message::PageFrames(pages) => Some(pages),
                    _ => None,
                },
            )?;
            if pages.len() != batch.len() {
                return Err(ClientError::PageCount {
                    announced: batch.len() as u64,
                    received: pages.len() as u64,
                });
            }
            out.extend(pages);
        }
        Ok(out)
    }

    /// Drops pages of the skeleton pinned from the outline that the frozen process no
    /// longer has (asked in batches of [`PAGE_FRAMES_BATCH`]).
    pub fn discard(&mut self, vaddrs: &[u64]) -> Result<(), ClientError> {
        for batch in vaddrs.chunks(PAGE_FRAMES_BATCH) {
            self.request(
                Message::Discard(batch.to_vec()),
                "waiting for the skeleton's pages to be dropped",
                |m| match m {
                    Message::Released { .. } => Some(()),
                    _ => None,
                },
            )?;
        }
        Ok(())
    }

    /// Lets the rebuilt process `pid` run; returns its pid.
    pub fn resume(&mut self, pid: u32) -> Result<u32, ClientError> {
        self.request(
            Message::Resume { pid },
            "waiting for the process to resume",
            |m| match m {
                Message::Resumed { pid } => Some(pid),
                _ => None,
            },
        )
    }

    /// Starts `req` detached from the agent (a session of its own, stdin `/dev/null`, output
    /// to a log file in the guest): its pid and the log's path.
    /// [`ClientError::StartFailed`] when it could not start.
    pub fn start(&mut self, req: &ExecRequest) -> Result<(u32, String), ClientError> {
        if req.argv.is_empty() {
            return Err(ClientError::EmptyCommand);
        }
        self.request(
            Message::Start(req.clone()),
            "waiting for the started process",
            |m| match m {
                Message::Started { pid, log } => Some(Ok((pid, log))),
                Message::Failed { code, message } => {
                    Some(Err(ClientError::StartFailed { code, message }))
                }
                _ => None,
            },
        )?
    }

    /// Post-copy: registers `ranges` of the skeleton for missing-page faults and returns
    /// the frames of the agent's staging slots, in slot order (the `vaddr` of each is the
    /// slot's address in the agent).
    pub fn lazy(&mut self, ranges: &[(u64, u64)]) -> Result<Vec<PageRef>, ClientError> {
        self.request(
            Message::Lazy(ranges.to_vec()),
            "waiting for the post-copy staging frames",
            |m| match m {
                Message::PageFrames(pages) => Some(pages),
                _ => None,
            },
        )
    }

    /// Post-copy: has the agent copy staged pages into the process; returns the pages the
    /// process waits for now.
    pub fn place(&mut self, pages: &[Placement]) -> Result<Vec<u64>, ClientError> {
        self.request(
            Message::Place(pages.to_vec()),
            "waiting for pages to be placed",
            |m| match m {
                Message::Faults(f) => Some(f),
                _ => None,
            },
        )
    }

    /// Post-copy: the pages the process waits for, waiting up to `wait_ms` for one.
    pub fn wait_faults(&mut self, wait_ms: u32) -> Result<Vec<u64>, ClientError> {
        self.request(
            Message::WaitFaults { wait_ms },
            "waiting for the process's page faults",
            |m| match m {
                Message::Faults(f) => Some(f),
                _ => None,
            },
        )
    }

    /// Post-copy: every page of `pid` was placed; the agent closes its userfaultfd.
    pub fn lazy_end(&mut self, pid: u32) -> Result<(), ClientError> {
        self.request(
            Message::LazyEnd { pid },
            "waiting for the end of post-copy",
            |m| matches!(m, Message::Released { pid: p } if p == pid).then_some(()),
        )
    }

    /// Removes the skeleton `pid` (a migration that failed).
    pub fn abort(&mut self, pid: u32) -> Result<(), ClientError> {
        self.request(
            Message::Abort { pid },
            "waiting for the skeleton's removal",
            |m| matches!(m, Message::Released { pid: p } if p == pid).then_some(()),
        )
    }

    /// Receives `PageFrames` batches (after `first`) up to `PageFramesEnd`, each read waiting
    /// at most the timeout.
    fn page_frames(&mut self, first: Vec<PageRef>) -> Result<Vec<PageRef>, ClientError> {
        const DURING: &str = "receiving page frames";
        let mut pages = first;
        loop {
            match self.receive(Some(self.timeout), DURING)? {
                Message::PageFrames(batch) => pages.extend(batch),
                Message::PageFramesEnd { count } => {
                    if count != pages.len() as u64 {
                        return Err(ClientError::PageCount {
                            announced: count,
                            received: pages.len() as u64,
                        });
                    }
                    return Ok(pages);
                }
                // The request's fence Pong, or stale frames.
                _ => {}
            }
        }
    }

    /// Sends `req` with a Ping right behind it and waits up to the timeout for the answer
    /// `answer` picks. The agent handles frames in order, so the Pong coming first means it
    /// dropped a request it did not know (see the protocol's "Compatibility"). If an earlier
    /// request timed out, what is left of it is skipped first, up to its Pong, so a late
    /// answer is never taken for this one's.
    fn request<T>(
        &mut self,
        req: Message,
        during: &'static str,
        answer: impl Fn(Message) -> Option<T>,
    ) -> Result<T, ClientError> {
        let ty = req.message_type();
        let deadline = Instant::now() + self.timeout;
        let wait = |timeout| {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(ClientError::Timeout(timeout, during))
            } else {
                Ok(left)
            }
        };
        while self.pending_fence.is_some() {
            self.receive(Some(wait(self.timeout)?), during)?;
        }
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.send(&req)?;
        self.send(&Message::Ping { nonce })?;
        self.pending_fence = Some(nonce);
        loop {
            match self.receive(Some(wait(self.timeout)?), during)? {
                Message::Pong { nonce: n } if n == nonce => {
                    return Err(ClientError::AgentTooOld { request: ty })
                }
                Message::Unsupported { message_type } if message_type == ty as u8 => {
                    return Err(ClientError::AgentTooOld { request: ty })
                }
                Message::RequestFailed { request, message } if request == ty as u8 => {
                    return Err(ClientError::RequestFailed {
                        request: ty,
                        message,
                    })
                }
                other => {
                    if let Some(v) = answer(other) {
                        return Ok(v);
                    }
                }
            }
        }
    }

    /// Runs a command, copies its stdout/stderr to the writers as they arrive, forwards
    /// `stdin` (if Some) on a thread, and returns the exit code: the command's status (128 +
    /// signal for a signal death), or for a command that could not start, the agent's code
    /// (127 not found, 126 not executable) with its message written to `stderr`.
    ///
    /// `req.stdin` is ignored: stdin is forwarded exactly when `stdin` is `Some`.
    pub fn exec(
        &mut self,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<i32, ClientError> {
        if req.argv.is_empty() {
            return Err(ClientError::EmptyCommand);
        }
        let req = ExecRequest {
            stdin: stdin.is_some(),
            ..req.clone()
        };
        self.send(&Message::Exec(req))?;
        let done = Arc::new(AtomicBool::new(false));
        if let Some(input) = stdin {
            let writer = Arc::clone(&self.writer);
            let done = Arc::clone(&done);
            std::thread::Builder::new()
                .name("ferry-stdin".into())
                .spawn(move || forward_stdin(input, &writer, &done))
                .map_err(|source| ClientError::Io {
                    context: "cannot start the stdin thread",
                    source,
                })?;
        }
        let result = self.exec_output(stdout, stderr);
        // Under the writer lock, so the stdin thread sends nothing after this.
        let _w = lock(&self.writer);
        done.store(true, Ordering::SeqCst);
        result
    }

    fn exec_output(
        &mut self,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<i32, ClientError> {
        const DURING: &str = "a command was running";
        loop {
            match self.receive(None, DURING)? {
                Message::Stdout(b) => write_out(stdout, &b)?,
                Message::Stderr(b) => write_out(stderr, &b)?,
                Message::Exited { code } => return Ok(code),
                Message::Failed { code, message } => {
                    write_out(stderr, format!("{message}\n").as_bytes())?;
                    return Ok(code);
                }
                // Stale Hellos or Pongs.
                _ => {}
            }
        }
    }

    /// Asks the agent to sync and power the guest off. Returns once the request is sent.
    pub fn power_off(&mut self) -> Result<(), ClientError> {
        self.send(&Message::PowerOff)
    }

    fn send(&self, msg: &Message) -> Result<(), ClientError> {
        let frame = msg.encode_checked()?;
        let mut w = lock(&self.writer);
        w.write_all(&frame)
            .and_then(|()| w.flush())
            .map_err(|source| ClientError::Io {
                context: "cannot send to the agent",
                source,
            })
    }

    /// The next message, waiting at most `timeout` for each read (`None`: forever).
    fn receive(
        &mut self,
        timeout: Option<Duration>,
        during: &'static str,
    ) -> Result<Message, ClientError> {
        self.reader
            .set_read_timeout_opt(timeout)
            .map_err(|source| ClientError::Io {
                context: "cannot set a read timeout",
                source,
            })?;
        loop {
            if let Some(m) = self.decoder.next()? {
                if let Message::Pong { nonce } = m {
                    if self.pending_fence == Some(nonce) {
                        self.pending_fence = None;
                    }
                }
                return Ok(m);
            }
            match self.reader.read(&mut self.buf) {
                Ok(0) => return Err(ClientError::Disconnected(during)),
                Ok(n) => self.decoder.push(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout(timeout.unwrap_or_default(), during))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::Disconnected(during))
                }
                Err(source) => {
                    return Err(ClientError::Io {
                        context: "cannot read from the agent",
                        source,
                    })
                }
            }
        }
    }
}

fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_out(w: &mut dyn Write, bytes: &[u8]) -> Result<(), ClientError> {
    w.write_all(bytes)
        .and_then(|()| w.flush())
        .map_err(ClientError::Output)
}

/// Copies `input` to the agent as Stdin frames, then StdinClosed; stops early once `done`.
fn forward_stdin<S: Stream>(mut input: Box<dyn Read + Send>, writer: &Mutex<S>, done: &AtomicBool) {
    let mut buf = vec![0; STREAM_CHUNK];
    loop {
        let msg = match input.read(&mut buf) {
            Ok(0) => Message::StdinClosed,
            Ok(n) => Message::Stdin(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => Message::StdinClosed,
        };
        let last = msg == Message::StdinClosed;
        let mut w = lock(writer);
        if done.load(Ordering::SeqCst) {
            return;
        }
        if w.write_all(&msg.encode()).and_then(|()| w.flush()).is_err() || last {
            return;
        }
    }
}
