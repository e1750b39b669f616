//! The wire protocol between ferry (the host) and `ferry-agent` (inside a guest).
//!
//! The transport is any byte stream: a serial port (`/dev/ttyS1` in the guest), a TCP
//! connection (the nested host), later vsock. On it travel length-prefixed frames:
//!
//! ```text
//! offset  size  field
//! 0       2     magic, b"FY"
//! 2       1     protocol version (PROTOCOL_VERSION)
//! 3       1     message type (see `MessageType`)
//! 4       4     payload length, u32 little-endian, at most MAX_PAYLOAD
//! 8       n     payload
//! ```
//!
//! Payload fields are encoded in order, little-endian: integers at their natural width, `bool`
//! as one byte (0 or 1), strings as a u32 byte length and UTF-8 bytes, lists as a u32 count
//! and the elements, `Option<String>` as one byte (0 = None, 1 = Some) then the string. Byte
//! payloads (`Stdin`, `Stdout`, `Stderr`) are the raw bytes, unprefixed. A frame's payload must
//! be consumed exactly: trailing bytes are an error.
//!
//! Fixed-size arrays (`[u32; 3]`) are their elements in order, without a count.
//!
//! # Compatibility
//!
//! Message types are only ever added, never changed, and adding one does not change
//! [`PROTOCOL_VERSION`]: the version byte is in every frame, so a bump would make every agent
//! already running (in guest images built earlier, in an already running nested host) fail
//! every frame with [`ProtocolError::UnsupportedVersion`]. A new message type is sent only in
//! answer to a request of a new type, so a peer never receives a type it does not know unless
//! it asked for one. The rules for a request type the agent does not know:
//!
//! - Agents since [`MessageType::Unsupported`] exists answer it with
//!   [`Message::Unsupported`] naming the type byte, then go on serving the connection.
//! - Earlier agents drop the frame (logging "unknown message type") and answer nothing. A host
//!   asking a newer request therefore sends a [`Message::Ping`] right behind it: frames are
//!   handled in order, so a [`Message::Pong`] arriving before the answer means the agent
//!   dropped the request. [`crate::client::AgentConnection`] does this and turns both cases
//!   into [`crate::client::ClientError::AgentTooOld`].
//!
//! The types added after version 1's first release: `ListProcesses`, `Processes`, `Load`,
//! `LoadReport`, `Unsupported`, `RequestFailed` (type bytes 13 to 18); for process migration
//! `Freeze`, `Frozen`, `PageFrames`, `PageFramesEnd`, `CantMove`, `Recheck`, `Release`,
//! `Released`, `Rebuild`, `Rebuilt`, `WantFrames`, `Resume`, `Resumed`, `Abort` (19 to 32); for
//! pre-copy `Survey` (33); for the user tools `Start`, `Started` (34, 35); for post-copy
//! `Lazy`, `Place`, `WaitFaults`, `Faults`, `LazyEnd` (36 to 40); for building the
//! destination's process during pre-copy `Outline`, `Outlined`, `Complete`, `Completed`,
//! `Discard` (41 to 45).
//!
//! # Starting a process
//!
//! `Start(request)` starts a program detached from the agent and from the connection: in a
//! session of its own, stdin `/dev/null`, stdout and stderr appended to a log file in the guest
//! (`/var/log/ferry/PID.log`), so that it can migrate (nothing ties it to the agent). Answered
//! with `Started { pid, log }`, or `Failed { code, message }` with a shell-style code (127 not
//! found, 126 not executable) when it could not start. The request is encoded as `Exec`'s; its
//! `stdin` flag is ignored.
//!
//! # Migration messages
//!
//! Source agent: `Freeze { pid }` is answered with `Frozen(image)`, then the present pages in
//! `PageFrames` batches of at most [`PAGE_FRAMES_BATCH`], then `PageFramesEnd { count }` (the
//! total); or `CantMove { reason }` (the process was not touched) or `RequestFailed`.
//! `Recheck { pid }` is answered the same way, with only the pages whose frame changed.
//! `Survey { pid }` checks that a running process could move and lists its present pages
//! without stopping it (a pre-copy round): answered like `Freeze`, without the `Frozen`.
//! `Outline { pid }` is answered like `Freeze` with `Outlined(image)` in place of `Frozen`:
//! the running process's image as far as `/proc` tells it without stopping it (no registers,
//! xstate, signal state or exact break), and its present pages; it is not stopped.
//! `Release { pid, kill }` thaws (or kills) a frozen process: `Released { pid }`.
//! Destination agent: `Rebuild(image)` → `Rebuilt { pid }`; `Rebuild` of an outline (an
//! image without registers) builds its address space only, and `Complete(image)` later
//! completes it from the freeze's image → `Completed { pid, stale }`, `stale` (u32 count, then
//! start and end as u64 each) the ranges whose frames reported before no longer hold;
//! `Discard(vaddrs)` (as `WantFrames`) drops pages pinned from the outline that the frozen
//! process no longer has → `Released { pid }`; `WantFrames(vaddrs)` (at most
//! [`PAGE_FRAMES_BATCH`]) → one `PageFrames` with a frame for each address, in order;
//! `Resume { pid }` → `Resumed { pid }`; `Abort { pid }` → `Released { pid }`. Post-copy,
//! between `Rebuild` and `WantFrames`: `Lazy(ranges)` (u32 count, then start and end as u64
//! each) → one `PageFrames` with the staging buffer's frames (vaddr: the slot's address in
//! the agent); after `Resume`, `Place(placements)` (u32 count, then vaddr u64 and slot u32
//! each, slot `u32::MAX` for zeros) and `WaitFaults { wait_ms }` (u32) → `Faults(vaddrs)`
//! (u32 count, u64 each: the pages the process waits for); `LazyEnd { pid }` → `Released
//! { pid }`. Failures are
//! `RequestFailed` naming the request. A [`crate::migrate::image::ProcessImage`] and a
//! [`crate::migrate::image::PageRef`] are encoded as [`crate::migrate::image`] says; a
//! `WantFrames` is a u32 count and the u64 addresses.
//!
//! The [`Decoder`] resynchronises on the magic after garbage (a serial line can carry anything
//! before the agent starts), never panics, and never buffers more than one frame plus what the
//! caller pushed.

use std::fmt;

use crate::migrate::image::{PageRef, ProcessImage};
use crate::migrate::lazy::Placement;

/// The protocol version this code speaks; carried in every frame header and in [`Hello`].
pub const PROTOCOL_VERSION: u8 = 1;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"FY";

/// Size of a frame header: magic, version, type, payload length.
pub const HEADER_LEN: usize = 8;

/// The largest payload a frame may carry (1 MiB). Larger lengths are rejected unread.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The most [`PageRef`]s in one [`Message::PageFrames`] (and addresses in one
/// [`Message::WantFrames`]): 16 Ki entries, 272 KiB, well under [`MAX_PAYLOAD`].
pub const PAGE_FRAMES_BATCH: usize = 16 * 1024;

/// A chunk size for streamed bytes (`Stdin`, `Stdout`, `Stderr`) well below [`MAX_PAYLOAD`].
pub const STREAM_CHUNK: usize = 32 * 1024;

/// Errors from decoding (or, for oversize messages, encoding) a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame was written by a different protocol version than ours.
    #[error(
        "the peer speaks ferry agent protocol version {found}, this build speaks version \
         {supported}; rebuild the guest image (`ferry image build --force`) so both sides match"
    )]
    UnsupportedVersion {
        /// The version byte found in the frame header.
        found: u8,
        /// [`PROTOCOL_VERSION`].
        supported: u8,
    },
    /// The header announced a payload over [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversize {
        /// The announced payload length.
        len: u64,
        /// [`MAX_PAYLOAD`].
        max: usize,
    },
    /// The type byte names no message this version knows.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The payload ended before all fields of the message were read.
    #[error("{message} payload is truncated")]
    Truncated {
        /// The message being decoded.
        message: MessageType,
    },
    /// The payload had bytes left over after its last field.
    #[error("{message} payload has {extra} trailing bytes")]
    TrailingBytes {
        /// The message being decoded.
        message: MessageType,
        /// How many bytes were left over.
        extra: usize,
    },
    /// A string field was not valid UTF-8.
    #[error("{message} payload holds a string that is not UTF-8")]
    InvalidUtf8 {
        /// The message being decoded.
        message: MessageType,
    },
    /// A boolean or option tag was neither 0 nor 1.
    #[error("{message} payload holds an invalid tag byte {tag}")]
    InvalidTag {
        /// The message being decoded.
        message: MessageType,
        /// The byte found.
        tag: u8,
    },
}

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::HelloRequest`].
    HelloRequest = 2,
    /// [`Message::Exec`].
    Exec = 3,
    /// [`Message::Stdin`].
    Stdin = 4,
    /// [`Message::StdinClosed`].
    StdinClosed = 5,
    /// [`Message::Stdout`].
    Stdout = 6,
    /// [`Message::Stderr`].
    Stderr = 7,
    /// [`Message::Exited`].
    Exited = 8,
    /// [`Message::Failed`].
    Failed = 9,
    /// [`Message::PowerOff`].
    PowerOff = 10,
    /// [`Message::Ping`].
    Ping = 11,
    /// [`Message::Pong`].
    Pong = 12,
    /// [`Message::ListProcesses`].
    ListProcesses = 13,
    /// [`Message::Processes`].
    Processes = 14,
    /// [`Message::Load`].
    Load = 15,
    /// [`Message::LoadReport`].
    LoadReport = 16,
    /// [`Message::Unsupported`].
    Unsupported = 17,
    /// [`Message::RequestFailed`].
    RequestFailed = 18,
    /// [`Message::Freeze`].
    Freeze = 19,
    /// [`Message::Frozen`].
    Frozen = 20,
    /// [`Message::PageFrames`].
    PageFrames = 21,
    /// [`Message::PageFramesEnd`].
    PageFramesEnd = 22,
    /// [`Message::CantMove`].
    CantMove = 23,
    /// [`Message::Recheck`].
    Recheck = 24,
    /// [`Message::Release`].
    Release = 25,
    /// [`Message::Released`].
    Released = 26,
    /// [`Message::Rebuild`].
    Rebuild = 27,
    /// [`Message::Rebuilt`].
    Rebuilt = 28,
    /// [`Message::WantFrames`].
    WantFrames = 29,
    /// [`Message::Resume`].
    Resume = 30,
    /// [`Message::Resumed`].
    Resumed = 31,
    /// [`Message::Abort`].
    Abort = 32,
    /// [`Message::Survey`].
    Survey = 33,
    /// [`Message::Start`].
    Start = 34,
    /// [`Message::Started`].
    Started = 35,
    /// [`Message::Lazy`].
    Lazy = 36,
    /// [`Message::Place`].
    Place = 37,
    /// [`Message::WaitFaults`].
    WaitFaults = 38,
    /// [`Message::Faults`].
    Faults = 39,
    /// [`Message::LazyEnd`].
    LazyEnd = 40,
    /// [`Message::Outline`].
    Outline = 41,
    /// [`Message::Outlined`].
    Outlined = 42,
    /// [`Message::Complete`].
    Complete = 43,
    /// [`Message::Completed`].
    Completed = 44,
    /// [`Message::Discard`].
    Discard = 45,
}

impl MessageType {
    /// The type for a frame's type byte, if this version knows it.
    pub fn from_byte(b: u8) -> Option<Self> {
        use MessageType::*;
        Some(match b {
            1 => Hello,
            2 => HelloRequest,
            3 => Exec,
            4 => Stdin,
            5 => StdinClosed,
            6 => Stdout,
            7 => Stderr,
            8 => Exited,
            9 => Failed,
            10 => PowerOff,
            11 => Ping,
            12 => Pong,
            13 => ListProcesses,
            14 => Processes,
            15 => Load,
            16 => LoadReport,
            17 => Unsupported,
            18 => RequestFailed,
            19 => Freeze,
            20 => Frozen,
            21 => PageFrames,
            22 => PageFramesEnd,
            23 => CantMove,
            24 => Recheck,
            25 => Release,
            26 => Released,
            27 => Rebuild,
            28 => Rebuilt,
            29 => WantFrames,
            30 => Resume,
            31 => Resumed,
            32 => Abort,
            33 => Survey,
            34 => Start,
            35 => Started,
            36 => Lazy,
            37 => Place,
            38 => WaitFaults,
            39 => Faults,
            40 => LazyEnd,
            41 => Outline,
            42 => Outlined,
            43 => Complete,
            44 => Completed,
            45 => Discard,
            _ => return None,
        })
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What the agent says about itself when a connection starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the agent speaks ([`PROTOCOL_VERSION`] of its build).
    pub version: u16,
    /// The agent's crate version, e.g. `0.1.0`.
    pub agent_version: String,
    /// The guest kernel's release, as `uname -r` prints it.
    pub kernel_release: String,
    /// Number of online CPUs in the guest.
    pub online_cpus: u32,
}

/// A command for the agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// The command and its arguments; `argv[0]` is looked up in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// The complete environment of the command (nothing is inherited from the agent). Without
    /// a `PATH` entry the agent uses a standard one.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub cwd: Option<String>,
    /// Whether the host will send `Stdin` frames; otherwise stdin is `/dev/null`.
    pub stdin: bool,
}

/// One process in the guest, as [`Message::Processes`] reports it (from `/proc/PID/stat`,
/// `/proc/PID/status` and `/proc/PID/cmdline`).
///
/// Encoded as: `pid` u32, `ppid` u32, `uid` u32, `state` u8, `threads` u32, `rss_kib` u64,
/// `cpu_ticks` u64, `start_ticks` u64, `kernel_thread` bool, `comm` string, `cmdline` list of
/// strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessInfo {
    /// Process id (the thread group id).
    pub pid: u32,
    /// Parent's process id; 0 for init and kthreadd.
    pub ppid: u32,
    /// Effective user id (the second field of `Uid:` in `/proc/PID/status`, as `ps -o uid`).
    pub uid: u32,
    /// The state letter of `/proc/PID/stat`: `b'R'` running, `b'S'` sleeping, `b'D'` in
    /// uninterruptible sleep, `b'Z'` zombie, `b'T'` stopped, `b'I'` idle kernel thread, ...
    pub state: u8,
    /// Number of threads.
    pub threads: u32,
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// CPU time used, user plus system (`utime + stime`), in clock ticks
    /// ([`LoadInfo::clock_ticks_per_sec`]).
    pub cpu_ticks: u64,
    /// When the process started, in clock ticks after boot (`starttime`).
    pub start_ticks: u64,
    /// Whether this is a kernel thread (`PF_KTHREAD` in the stat flags, or kthreadd and its
    /// children when they have no command line).
    pub kernel_thread: bool,
    /// The command name as the kernel keeps it (`comm`, at most 64 bytes here), which may hold
    /// spaces and parentheses. Bytes that are not UTF-8 become U+FFFD.
    pub comm: String,
    /// The command line (`/proc/PID/cmdline` split at NUL bytes, trailing NULs dropped);
    /// empty for kernel threads and zombies. At most [`CMDLINE_CAP`] bytes (counting 4 per
    /// argument for its length) and [`CMDLINE_CAP_CROWDED`] when the whole list would not fit
    /// in a frame: longer command lines are cut, the last argument shortened at a character
    /// boundary and the ones after it dropped. Bytes that are not UTF-8 become U+FFFD.
    pub cmdline: Vec<String>,
}

/// The most bytes of command line [`ProcessInfo::cmdline`] carries per process.
pub const CMDLINE_CAP: usize = 4096;

/// The per-process command line cap when the processes would not fit in [`MAX_PAYLOAD`] with
/// [`CMDLINE_CAP`].
pub const CMDLINE_CAP_CROWDED: usize = 256;

impl ProcessInfo {
    /// Bytes of payload this process takes in a [`Message::Processes`].
    pub fn encoded_len(&self) -> usize {
        // pid, ppid, uid, state, threads, rss, cpu, start, kernel_thread, comm, cmdline count.
        4 + 4 + 4 + 1 + 4 + 8 + 8 + 8 + 1 + (4 + self.comm.len()) + 4 + cmdline_len(&self.cmdline)
    }
}

/// Bytes a command line takes encoded (without its count): 4 per argument plus its bytes.
pub fn cmdline_len(cmdline: &[String]) -> usize {
    cmdline.iter().map(|a| 4 + a.len()).sum()
}

/// The agent's process list: [`Message::Processes`].
///
/// Encoded as: `truncated` bool, then `processes` (a u32 count and the elements).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessList {
    /// Every process the agent could read, by ascending pid. Processes that exit while being
    /// listed are left out.
    pub processes: Vec<ProcessInfo>,
    /// Whether processes were left out so the frame stays within [`MAX_PAYLOAD`]: command
    /// lines are first cut to [`CMDLINE_CAP_CROWDED`], then the highest pids dropped.
    pub truncated: bool,
}

impl ProcessList {
    /// Bytes of payload of this list in a [`Message::Processes`].
    pub fn encoded_len(&self) -> usize {
        1 + 4
            + self
                .processes
                .iter()
                .map(ProcessInfo::encoded_len)
                .sum::<usize>()
    }
}

/// The guest's load and memory: [`Message::LoadReport`].
///
/// Encoded as: `uptime_ms` u64, `load_milli` three u32, `procs_running` u32, `procs_total`
/// u32, `cpu_total_ticks` u64, `cpu_idle_ticks` u64, `online_cpus` u32, `mem_total_kib` u64,
/// `mem_available_kib` u64, `clock_ticks_per_sec` u32.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadInfo {
    /// Time since boot (`/proc/uptime`), in milliseconds.
    pub uptime_ms: u64,
    /// The 1, 5 and 15 minute load averages (`/proc/loadavg`) times 1000.
    pub load_milli: [u32; 3],
    /// Runnable scheduling entities (threads) right now (`/proc/loadavg`'s 4th field, before
    /// the slash).
    pub procs_running: u32,
    /// All scheduling entities (threads) in the system (`/proc/loadavg`, after the slash).
    pub procs_total: u32,
    /// CPU time of all CPUs since boot, in clock ticks: the sum of user, nice, system, idle,
    /// iowait, irq, softirq and steal on `/proc/stat`'s `cpu` line (guest time is already part
    /// of user and nice). CPU use between two reports a and b is
    /// `1 - Δidle / Δtotal`.
    pub cpu_total_ticks: u64,
    /// The idle part of `cpu_total_ticks`: idle plus iowait.
    pub cpu_idle_ticks: u64,
    /// Online CPUs now (CPUs may be hot-plugged, so this can differ from [`Hello`]'s).
    pub online_cpus: u32,
    /// `MemTotal` of `/proc/meminfo`, in KiB.
    pub mem_total_kib: u64,
    /// `MemAvailable` of `/proc/meminfo` (`MemFree + Buffers + Cached` on kernels before 3.14),
    /// in KiB.
    pub mem_available_kib: u64,
    /// The clock ticks per second that tick counts are in (`sysconf(_SC_CLK_TCK)`, usually 100).
    pub clock_ticks_per_sec: u32,
}

/// One protocol message; each maps to one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Agent → host: sent unsolicited when the serial transport opens, on every accepted TCP
    /// connection, and in answer to [`Message::HelloRequest`].
    Hello(Hello),
    /// Host → agent: "send your Hello again" (for a host that attaches after the agent started).
    HelloRequest,
    /// Host → agent: run a command. One command runs at a time per connection.
    Exec(ExecRequest),
    /// Host → agent: bytes for the running command's stdin.
    Stdin(Vec<u8>),
    /// Host → agent: the running command's stdin reached end of file.
    StdinClosed,
    /// Agent → host: bytes the command wrote to stdout.
    Stdout(Vec<u8>),
    /// Agent → host: bytes the command wrote to stderr.
    Stderr(Vec<u8>),
    /// Agent → host: the command ended; sent after all of its output.
    Exited {
        /// Its exit status, or 128 + the signal number if a signal killed it.
        code: i32,
    },
    /// Agent → host: the command could not be started.
    Failed {
        /// Shell-style status: 127 when the command was not found, 126 when it is not
        /// executable, 125 for other failures (e.g. another command is running).
        code: i32,
        /// A message for the user, e.g. `ferry-agent: foo: command not found`.
        message: String,
    },
    /// Host → agent: sync the file systems and power the guest off.
    PowerOff,
    /// Either direction: ask for a [`Message::Pong`] with the same nonce.
    Ping {
        /// Any value; echoed in the answer.
        nonce: u64,
    },
    /// Either direction: the answer to a [`Message::Ping`].
    Pong {
        /// The nonce of the ping being answered.
        nonce: u64,
    },
    /// Host → agent: list the guest's processes. Answered with [`Message::Processes`] or
    /// [`Message::RequestFailed`]; may be sent while a command runs on the same connection.
    ListProcesses,
    /// Agent → host: the answer to [`Message::ListProcesses`].
    Processes(ProcessList),
    /// Host → agent: report the guest's load. Answered with [`Message::LoadReport`] or
    /// [`Message::RequestFailed`]; cheap enough to poll every second, and may be sent while a
    /// command runs on the same connection.
    Load,
    /// Agent → host: the answer to [`Message::Load`].
    LoadReport(LoadInfo),
    /// Agent → host: the answer to a frame whose type byte the agent does not know (a request
    /// from a newer host). Agents from before this message answer nothing instead; see the
    /// module's "Compatibility".
    Unsupported {
        /// The type byte of the frame that was not understood.
        message_type: u8,
    },
    /// Agent → host: a [`Message::ListProcesses`] or [`Message::Load`] could not be answered
    /// (e.g. `/proc` is not mounted).
    RequestFailed {
        /// The type byte of the request that failed.
        request: u8,
        /// What went wrong, for the user.
        message: String,
    },
    /// Host → source agent: freeze a process for migration. Answered with
    /// [`Message::Frozen`], the [`Message::PageFrames`] batches and
    /// [`Message::PageFramesEnd`]; or [`Message::CantMove`] or [`Message::RequestFailed`].
    /// The process stays frozen until [`Message::Release`] or the connection closes (then it
    /// is thawed).
    Freeze {
        /// The process.
        pid: u32,
    },
    /// Agent → host: the frozen process's image.
    Frozen(ProcessImage),
    /// Agent → host: a batch of present pages (at most [`PAGE_FRAMES_BATCH`]), in address
    /// order; or the answer to [`Message::WantFrames`].
    PageFrames(Vec<PageRef>),
    /// Agent → host: all the pages of a `Freeze` or `Recheck` answer were sent.
    PageFramesEnd {
        /// How many pages the `PageFrames` batches held.
        count: u64,
    },
    /// Agent → host: the process cannot move (it was left untouched).
    CantMove {
        /// Why, for the user (e.g. "multi-threaded processes cannot move yet (2 threads)").
        reason: String,
    },
    /// Host → source agent: the pages of a frozen process whose frame changed since the
    /// freeze. Answered like `Freeze`, without the `Frozen`.
    Recheck {
        /// The frozen process.
        pid: u32,
    },
    /// Host → source agent: check that a running process could move and list the frames of
    /// its present pages without stopping it (one pre-copy round). Answered like `Freeze`,
    /// without the `Frozen`: the frames may change as soon as they are read.
    Survey {
        /// The running process.
        pid: u32,
    },
    /// Host → source agent, pre-copy: the running process's outline and present pages,
    /// without stopping it. Answered like `Freeze`, with [`Message::Outlined`] in place of
    /// `Frozen`.
    Outline {
        /// The running process.
        pid: u32,
    },
    /// Agent → host: the answer to [`Message::Outline`]: the image as `/proc` shows it while
    /// the process runs; `regs` and `xstate` are empty, and so are the signal state and the
    /// exact program break.
    Outlined(ProcessImage),
    /// Host → source agent: let a frozen process go on (`kill` false), or kill it (after
    /// the destination took over). Answered with [`Message::Released`].
    Release {
        /// The frozen process.
        pid: u32,
        /// Kill it instead of letting it run.
        kill: bool,
    },
    /// Agent → host: the answer to [`Message::Release`] and [`Message::Abort`].
    Released {
        /// The process let go, killed, or whose skeleton was removed.
        pid: u32,
    },
    /// Host → destination agent: build a skeleton process for this image. Answered with
    /// [`Message::Rebuilt`].
    Rebuild(ProcessImage),
    /// Agent → host: the skeleton exists (stopped).
    Rebuilt {
        /// The skeleton's pid at the destination.
        pid: u32,
    },
    /// Host → destination agent, pre-copy: complete the skeleton built from an outline
    /// (`Rebuild` of an image without registers) with the frozen process's image: its
    /// mappings as they are now, then everything else. Answered with [`Message::Completed`].
    Complete(ProcessImage),
    /// Agent → host: the skeleton is complete.
    Completed {
        /// The skeleton's pid.
        pid: u32,
        /// The `(start, end)` ranges whose frames, reported before, no longer hold their
        /// pages (mappings that changed since the outline; the whole address space when the
        /// skeleton had to be built anew). Frames elsewhere still do.
        stale: Vec<(u64, u64)>,
    },
    /// Host → destination agent, pre-copy, after [`Message::Complete`]: pages of the
    /// skeleton pinned (and filled) from the outline that the frozen process no longer has
    /// (at most [`PAGE_FRAMES_BATCH`]): unpin and drop them, so that they read as at the
    /// source (zeros, or the file's contents). Answered with [`Message::Released`].
    Discard(Vec<u64>),
    /// Host → destination agent: the frames backing these page addresses of the skeleton
    /// (at most [`PAGE_FRAMES_BATCH`]). Answered with one [`Message::PageFrames`], one entry
    /// per address in the same order.
    WantFrames(Vec<u64>),
    /// Host → destination agent: the pages are written; let the skeleton run. Answered with
    /// [`Message::Resumed`].
    Resume {
        /// The skeleton's pid.
        pid: u32,
    },
    /// Agent → host: the migrated process runs.
    Resumed {
        /// Its pid.
        pid: u32,
    },
    /// Host → destination agent: remove a skeleton. Answered with [`Message::Released`].
    Abort {
        /// The skeleton's pid.
        pid: u32,
    },
    /// Host → agent: start a program detached (see "Starting a process" above). Answered
    /// with [`Message::Started`] or [`Message::Failed`]. `stdin` is ignored: it is always
    /// `/dev/null`.
    Start(ExecRequest),
    /// Agent → host: the answer to [`Message::Start`].
    Started {
        /// The started process.
        pid: u32,
        /// Where its stdout and stderr go, as a path in the guest.
        log: String,
    },
    /// Host → destination agent, post-copy, after [`Message::Rebuild`]: register these
    /// `(start, end)` ranges of the skeleton (inside its private anonymous mappings) with a
    /// userfaultfd, so their pages may arrive after it resumed, and make the staging buffer.
    /// Answered with one [`Message::PageFrames`]: the staging slots' frames, in slot order.
    Lazy(Vec<(u64, u64)>),
    /// Host → destination agent, post-copy: the staging slots now hold these pages; copy
    /// them into the process. Answered with [`Message::Faults`].
    Place(Vec<Placement>),
    /// Host → destination agent, post-copy: report the pages the process waits for, waiting
    /// up to `wait_ms` for a first one. Answered with [`Message::Faults`].
    WaitFaults {
        /// The longest wait, in ms.
        wait_ms: u32,
    },
    /// Agent → host: the pages the migrated process waits for (possibly none, possibly
    /// repeated), at most [`crate::migrate::lazy::MAX_FAULTS`].
    Faults(Vec<u64>),
    /// Host → destination agent: every page was placed; close the userfaultfd. Answered with
    /// [`Message::Released`].
    LazyEnd {
        /// The process.
        pid: u32,
    },
}

impl Message {
    /// This message's type byte.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloRequest => MessageType::HelloRequest,
            Message::Exec(_) => MessageType::Exec,
            Message::Stdin(_) => MessageType::Stdin,
            Message::StdinClosed => MessageType::StdinClosed,
            Message::Stdout(_) => MessageType::Stdout,
            Message::Stderr(_) => MessageType::Stderr,
            Message::Exited { .. } => MessageType::Exited,
            Message::Failed { .. } => MessageType::Failed,
            Message::PowerOff => MessageType::PowerOff,
            Message::Ping { .. } => MessageType::Ping,
            Message::Pong { .. } => MessageType::Pong,
            Message::ListProcesses => MessageType::ListProcesses,
            Message::Processes(_) => MessageType::Processes,
            Message::Load => MessageType::Load,
            Message::LoadReport(_) => MessageType::LoadReport,
            Message::Unsupported { .. } => MessageType::Unsupported,
            Message::RequestFailed { .. } => MessageType::RequestFailed,
            Message::Freeze { .. } => MessageType::Freeze,
            Message::Frozen(_) => MessageType::Frozen,
            Message::PageFrames(_) => MessageType::PageFrames,
            Message::PageFramesEnd { .. } => MessageType::PageFramesEnd,
            Message::CantMove { .. } => MessageType::CantMove,
            Message::Recheck { .. } => MessageType::Recheck,
            Message::Survey { .. } => MessageType::Survey,
            Message::Release { .. } => MessageType::Release,
            Message::Released { .. } => MessageType::Released,
            Message::Rebuild(_) => MessageType::Rebuild,
            Message::Rebuilt { .. } => MessageType::Rebuilt,
            Message::WantFrames(_) => MessageType::WantFrames,
            Message::Resume { .. } => MessageType::Resume,
            Message::Resumed { .. } => MessageType::Resumed,
            Message::Abort { .. } => MessageType::Abort,
            Message::Start(_) => MessageType::Start,
            Message::Started { .. } => MessageType::Started,
            Message::Lazy(_) => MessageType::Lazy,
            Message::Place(_) => MessageType::Place,
            Message::WaitFaults { .. } => MessageType::WaitFaults,
            Message::Faults(_) => MessageType::Faults,
            Message::LazyEnd { .. } => MessageType::LazyEnd,
            Message::Outline { .. } => MessageType::Outline,
            Message::Outlined(_) => MessageType::Outlined,
            Message::Complete(_) => MessageType::Complete,
            Message::Completed { .. } => MessageType::Completed,
            Message::Discard(_) => MessageType::Discard,
        }
    }

    /// The whole frame: header and payload. The payload may exceed [`MAX_PAYLOAD`] (a peer
    /// would reject it); [`Message::encode_checked`] refuses that instead.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 16);
        out.extend_from_slice(&MAGIC);
        out.push(PROTOCOL_VERSION);
        out.push(self.message_type() as u8);
        out.extend_from_slice(&[0; 4]);
        let mut p = Payload(&mut out);
        match self {
            Message::Hello(h) => {
                p.u16(h.version);
                p.str(&h.agent_version);
                p.str(&h.kernel_release);
                p.u32(h.online_cpus);
            }
            Message::Exec(e) | Message::Start(e) => {
                p.u32(len_u32(e.argv.len()));
                for a in &e.argv {
                    p.str(a);
                }
                p.u32(len_u32(e.env.len()));
                for (k, v) in &e.env {
                    p.str(k);
                    p.str(v);
                }
                match &e.cwd {
                    None => p.u8(0),
                    Some(c) => {
                        p.u8(1);
                        p.str(c);
                    }
                }
                p.u8(u8::from(e.stdin));
            }
            Message::Started { pid, log } => {
                p.u32(*pid);
                p.str(log);
            }
            Message::Stdin(b) | Message::Stdout(b) | Message::Stderr(b) => p.0.extend_from_slice(b),
            Message::Exited { code } => p.i32(*code),
            Message::Failed { code, message } => {
                p.i32(*code);
                p.str(message);
            }
            Message::Ping { nonce } | Message::Pong { nonce } => p.u64(*nonce),
            Message::Processes(list) => {
                p.u8(u8::from(list.truncated));
                p.u32(len_u32(list.processes.len()));
                for proc in &list.processes {
                    p.u32(proc.pid);
                    p.u32(proc.ppid);
                    p.u32(proc.uid);
                    p.u8(proc.state);
                    p.u32(proc.threads);
                    p.u64(proc.rss_kib);
                    p.u64(proc.cpu_ticks);
                    p.u64(proc.start_ticks);
                    p.u8(u8::from(proc.kernel_thread));
                    p.str(&proc.comm);
                    p.u32(len_u32(proc.cmdline.len()));
                    for a in &proc.cmdline {
                        p.str(a);
                    }
                }
            }
            Message::LoadReport(l) => {
                p.u64(l.uptime_ms);
                for v in l.load_milli {
                    p.u32(v);
                }
                p.u32(l.procs_running);
                p.u32(l.procs_total);
                p.u64(l.cpu_total_ticks);
                p.u64(l.cpu_idle_ticks);
                p.u32(l.online_cpus);
                p.u64(l.mem_total_kib);
                p.u64(l.mem_available_kib);
                p.u32(l.clock_ticks_per_sec);
            }
            Message::Unsupported { message_type } => p.u8(*message_type),
            Message::RequestFailed { request, message } => {
                p.u8(*request);
                p.str(message);
            }
            Message::Freeze { pid }
            | Message::Recheck { pid }
            | Message::Survey { pid }
            | Message::Outline { pid }
            | Message::Released { pid }
            | Message::Rebuilt { pid }
            | Message::Resume { pid }
            | Message::Resumed { pid }
            | Message::Abort { pid }
            | Message::LazyEnd { pid } => p.u32(*pid),
            Message::Frozen(image)
            | Message::Outlined(image)
            | Message::Rebuild(image)
            | Message::Complete(image) => image.write(&mut p),
            Message::Completed { pid, stale } => {
                p.u32(*pid);
                p.list(stale, |p, &(s, e)| {
                    p.u64(s);
                    p.u64(e);
                });
            }
            Message::PageFrames(pages) => p.list(pages, |p, page| page.write(p)),
            Message::PageFramesEnd { count } => p.u64(*count),
            Message::CantMove { reason } => p.str(reason),
            Message::Release { pid, kill } => {
                p.u32(*pid);
                p.flag(*kill);
            }
            Message::WantFrames(vaddrs) | Message::Faults(vaddrs) | Message::Discard(vaddrs) => {
                p.list(vaddrs, |p, v| p.u64(*v))
            }
            Message::Lazy(ranges) => p.list(ranges, |p, &(s, e)| {
                p.u64(s);
                p.u64(e);
            }),
            Message::Place(pages) => p.list(pages, |p, pl| {
                p.u64(pl.vaddr);
                p.u32(pl.slot);
            }),
            Message::WaitFaults { wait_ms } => p.u32(*wait_ms),
            Message::HelloRequest
            | Message::StdinClosed
            | Message::PowerOff
            | Message::ListProcesses
            | Message::Load => {}
        }
        let len = len_u32(out.len() - HEADER_LEN);
        out[4..8].copy_from_slice(&len.to_le_bytes());
        out
    }

    /// Like [`Message::encode`], but refuses a payload over [`MAX_PAYLOAD`].
    pub fn encode_checked(&self) -> Result<Vec<u8>, ProtocolError> {
        let frame = self.encode();
        let len = frame.len() - HEADER_LEN;
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::Oversize {
                len: len as u64,
                max: MAX_PAYLOAD,
            });
        }
        Ok(frame)
    }

    /// Decodes a payload of the given type.
    fn decode(ty: MessageType, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload, ty);
        let msg = match ty {
            MessageType::Hello => Message::Hello(Hello {
                version: r.u16()?,
                agent_version: r.string()?,
                kernel_release: r.string()?,
                online_cpus: r.u32()?,
            }),
            MessageType::HelloRequest => Message::HelloRequest,
            MessageType::Exec | MessageType::Start => {
                let n = r.u32()?;
                let mut argv = Vec::new();
                for _ in 0..n {
                    argv.push(r.string()?);
                }
                let n = r.u32()?;
                let mut env = Vec::new();
                for _ in 0..n {
                    env.push((r.string()?, r.string()?));
                }
                let cwd = if r.flag()? { Some(r.string()?) } else { None };
                let stdin = r.flag()?;
                let req = ExecRequest {
                    argv,
                    env,
                    cwd,
                    stdin,
                };
                if ty == MessageType::Start {
                    Message::Start(req)
                } else {
                    Message::Exec(req)
                }
            }
            MessageType::Stdin => Message::Stdin(r.rest()),
            MessageType::StdinClosed => Message::StdinClosed,
            MessageType::Stdout => Message::Stdout(r.rest()),
            MessageType::Stderr => Message::Stderr(r.rest()),
            MessageType::Exited => Message::Exited { code: r.i32()? },
            MessageType::Failed => Message::Failed {
                code: r.i32()?,
                message: r.string()?,
            },
            MessageType::PowerOff => Message::PowerOff,
            MessageType::Ping => Message::Ping { nonce: r.u64()? },
            MessageType::Pong => Message::Pong { nonce: r.u64()? },
            MessageType::ListProcesses => Message::ListProcesses,
            MessageType::Processes => {
                let truncated = r.flag()?;
                let n = r.u32()?;
                let mut processes = Vec::new();
                for _ in 0..n {
                    let pid = r.u32()?;
                    let ppid = r.u32()?;
                    let uid = r.u32()?;
                    let state = r.u8()?;
                    let threads = r.u32()?;
                    let rss_kib = r.u64()?;
                    let cpu_ticks = r.u64()?;
                    let start_ticks = r.u64()?;
                    let kernel_thread = r.flag()?;
                    let comm = r.string()?;
                    let args = r.u32()?;
                    let mut cmdline = Vec::new();
                    for _ in 0..args {
                        cmdline.push(r.string()?);
                    }
                    processes.push(ProcessInfo {
                        pid,
                        ppid,
                        uid,
                        state,
                        threads,
                        rss_kib,
                        cpu_ticks,
                        start_ticks,
                        kernel_thread,
                        comm,
                        cmdline,
                    });
                }
                Message::Processes(ProcessList {
                    processes,
                    truncated,
                })
            }
            MessageType::Load => Message::Load,
            MessageType::LoadReport => Message::LoadReport(LoadInfo {
                uptime_ms: r.u64()?,
                load_milli: [r.u32()?, r.u32()?, r.u32()?],
                procs_running: r.u32()?,
                procs_total: r.u32()?,
                cpu_total_ticks: r.u64()?,
                cpu_idle_ticks: r.u64()?,
                online_cpus: r.u32()?,
                mem_total_kib: r.u64()?,
                mem_available_kib: r.u64()?,
                clock_ticks_per_sec: r.u32()?,
            }),
            MessageType::Unsupported => Message::Unsupported {
                message_type: r.u8()?,
            },
            MessageType::RequestFailed => Message::RequestFailed {
                request: r.u8()?,
                message: r.string()?,
            },
            MessageType::Freeze => Message::Freeze { pid: r.u32()? },
            MessageType::Frozen => Message::Frozen(ProcessImage::read(&mut r)?),
            MessageType::PageFrames => Message::PageFrames(r.list(PageRef::read)?),
            MessageType::PageFramesEnd => Message::PageFramesEnd { count: r.u64()? },
            MessageType::CantMove => Message::CantMove {
                reason: r.string()?,
            },
            MessageType::Recheck => Message::Recheck { pid: r.u32()? },
            MessageType::Survey => Message::Survey { pid: r.u32()? },
            MessageType::Release => Message::Release {
                pid: r.u32()?,
                kill: r.flag()?,
            },
            MessageType::Released => Message::Released { pid: r.u32()? },
            MessageType::Rebuild => Message::Rebuild(ProcessImage::read(&mut r)?),
            MessageType::Rebuilt => Message::Rebuilt { pid: r.u32()? },
            MessageType::WantFrames => Message::WantFrames(r.list(|r| r.u64())?),
            MessageType::Resume => Message::Resume { pid: r.u32()? },
            MessageType::Resumed => Message::Resumed { pid: r.u32()? },
            MessageType::Abort => Message::Abort { pid: r.u32()? },
            MessageType::Started => Message::Started {
                pid: r.u32()?,
                log: r.string()?,
            },
            MessageType::Lazy => Message::Lazy(r.list(|r| Ok((r.u64()?, r.u64()?)))?),
            MessageType::Place => Message::Place(r.list(|r| {
                Ok(Placement {
                    vaddr: r.u64()?,
                    slot: r.u32()?,
                })
            })?),
            MessageType::WaitFaults => Message::WaitFaults { wait_ms: r.u32()? },
            MessageType::Faults => Message::Faults(r.list(|r| r.u64())?),
            MessageType::LazyEnd => Message::LazyEnd { pid: r.u32()? },
            MessageType::Outline => Message::Outline { pid: r.u32()? },
            MessageType::Outlined => Message::Outlined(ProcessImage::read(&mut r)?),
            MessageType::Complete => Message::Complete(ProcessImage::read(&mut r)?),
            MessageType::Discard => Message::Discard(r.list(|r| r.u64())?),
            MessageType::Completed => Message::Completed {
                pid: r.u32()?,
                stale: r.list(|r| Ok((r.u64()?, r.u64()?)))?,
            },
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Lengths beyond u32 cannot be framed; they saturate and the peer rejects them as oversize.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Appends payload fields (shared with [`crate::migrate::image`]).
pub(crate) struct Payload<'a>(pub(crate) &'a mut Vec<u8>);

impl Payload<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn flag(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.u32(len_u32(s.len()));
        self.0.extend_from_slice(s.as_bytes());
    }
    /// A byte string: a u32 length and the bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.u32(len_u32(b.len()));
        self.0.extend_from_slice(b);
    }
    /// A list: a u32 count, then `each` for every element.
    pub(crate) fn list<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) {
        self.u32(len_u32(items.len()));
        for item in items {
            each(self, item);
        }
    }
}

/// Reads payload fields; every read is bounds-checked against the payload, so a hostile
/// length or count can never make it allocate more than the payload's size. (Shared with
/// [`crate::migrate::image`].)
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    ty: MessageType,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`, naming `ty` in its errors.
    pub(crate) fn new(buf: &'a [u8], ty: MessageType) -> Self {
        Self { buf, ty }
    }
    /// The message type errors name.
    pub(crate) fn message_type(&self) -> MessageType {
        self.ty
    }
    /// Fails with [`ProtocolError::TrailingBytes`] if anything is left.
    pub(crate) fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                message: self.ty,
                extra: self.buf.len(),
            })
        }
    }
    fn take(&mut self, n: usize) -> Result<&[u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated { message: self.ty });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn flag(&mut self) -> Result<bool, ProtocolError> {
        match self.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(ProtocolError::InvalidTag {
                message: self.ty,
                tag,
            }),
        }
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn string(&mut self) -> Result<String, ProtocolError> {
        let len = self.u32()? as usize;
        let ty = self.ty;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::InvalidUtf8 { message: ty })
    }
    /// A byte string: a u32 length and the bytes.
    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>, ProtocolError> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }
    /// A list: a u32 count, then `each` for every element. A hostile count fails at the
    /// first element past the payload's end; nothing is allocated ahead of the elements.
    pub(crate) fn list<T>(
        &mut self,
        mut each: impl FnMut(&mut Self) -> Result<T, ProtocolError>,
    ) -> Result<Vec<T>, ProtocolError> {
        let n = self.u32()?;
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(each(self)?);
        }
        Ok(out)
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).to_vec()
    }
}

/// Splits a byte stream into messages.
///
/// Feed it what the transport delivers with [`Decoder::push`] and take messages out with
/// [`Decoder::next`] until it returns `Ok(None)`. Bytes before a magic are skipped (and
/// counted). After an error the decoder has already dropped the offending bytes (the whole
/// frame if its header was sound, else just its magic), so calling `next` again continues with
/// what follows.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    skipped: u64,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the transport.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Total bytes discarded so far while looking for a frame's magic.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    #[allow(clippy::should_implement_trait)] // Fallible, so not an Iterator.
    pub fn next(&mut self) -> Result<Option<Message>, ProtocolError> {
        self.resync();
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = self.buf[2];
        let type_byte = self.buf[3];
        let len = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
        if version != PROTOCOL_VERSION {
            // The header may not mean what we think; do not trust its length.
            self.buf.drain(..MAGIC.len());
            return Err(ProtocolError::UnsupportedVersion {
                found: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let len = len as usize;
        if len > MAX_PAYLOAD {
            self.buf.drain(..MAGIC.len());
            return Err(ProtocolError::Oversize {
                len: len as u64,
                max: MAX_PAYLOAD,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let result = match MessageType::from_byte(type_byte) {
            Some(ty) => Message::decode(ty, &self.buf[HEADER_LEN..HEADER_LEN + len]).map(Some),
            None => Err(ProtocolError::UnknownType(type_byte)),
        };
        self.buf.drain(..HEADER_LEN + len);
        result
    }

    /// Drops bytes before the first magic, keeping a trailing first magic byte that may be
    /// completed by the next push.
    fn resync(&mut self) {
        let start = match self.buf.windows(2).position(|w| w == MAGIC) {
            Some(pos) => pos,
            None if self.buf.last() == Some(&MAGIC[0]) => self.buf.len() - 1,
            None => self.buf.len(),
        };
        if start > 0 {
            self.skipped += start as u64;
            self.buf.drain(..start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: PROTOCOL_VERSION.into(),
                agent_version: "0.1.0".into(),
                kernel_release: "6.1.0-48-amd64".into(),
                online_cpus: 2,
            }),
            Message::HelloRequest,
            Message::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo é".into()],
                env: vec![
                    ("PATH".into(), "/bin".into()),
                    ("EMPTY".into(), String::new()),
                ],
                cwd: Some("/tmp".into()),
                stdin: true,
            }),
            Message::Exec(ExecRequest {
                argv: vec![],
                env: vec![],
                cwd: None,
                stdin: false,
            }),
            Message::Stdin(b"in\0\xff".to_vec()),
            Message::Stdin(Vec::new()),
            Message::StdinClosed,
            Message::Stdout(vec![0xff; 1000]),
            Message::Stderr(b"err\n".to_vec()),
            Message::Exited { code: 0 },
            Message::Exited { code: -1 },
            Message::Failed {
                code: 127,
                message: "ferry-agent: foo: command not found".into(),
            },
            Message::PowerOff,
            Message::Ping { nonce: u64::MAX },
            Message::Pong { nonce: 7 },
            Message::ListProcesses,
            Message::Processes(sample_processes()),
            Message::Processes(ProcessList {
                processes: vec![],
                truncated: true,
            }),
            Message::Load,
            Message::LoadReport(LoadInfo {
                uptime_ms: 123_456_789,
                load_milli: [520, 1_000_000, 0],
                procs_running: 2,
                procs_total: 1345,
                cpu_total_ticks: u64::MAX,
                cpu_idle_ticks: 17,
                online_cpus: 2,
                mem_total_kib: 2_000_000,
                mem_available_kib: 1_500_000,
                clock_ticks_per_sec: 100,
            }),
            Message::Unsupported { message_type: 0xee },
            Message::RequestFailed {
                request: MessageType::Load as u8,
                message: "cannot read /proc/loadavg: No such file or directory".into(),
            },
            Message::Freeze { pid: 4242 },
            Message::Frozen(crate::migrate::image::tests::sample_image()),
            Message::PageFrames(vec![
                PageRef {
                    vaddr: 0x7fff_0000_0000,
                    pfn: 0x12345,
                    anon: true,
                },
                PageRef {
                    vaddr: 0x5555_0000_1000,
                    pfn: 0,
                    anon: false,
                },
            ]),
            Message::PageFrames(vec![]),
            Message::PageFramesEnd { count: u64::MAX },
            Message::CantMove {
                reason: "multi-threaded processes cannot move yet (2 threads)".into(),
            },
            Message::Recheck { pid: 1 },
            Message::Survey { pid: 11 },
            Message::Release { pid: 2, kill: true },
            Message::Release {
                pid: 2,
                kill: false,
            },
            Message::Released { pid: 3 },
            Message::Rebuild(crate::migrate::image::tests::sample_image()),
            Message::Rebuilt { pid: 5 },
            Message::Outline { pid: 12 },
            Message::Outlined(crate::migrate::image::tests::sample_image()),
            Message::Complete(crate::migrate::image::tests::sample_image()),
            Message::Completed {
                pid: 13,
                stale: vec![(0x1000, 0x3000), (0, u64::MAX)],
            },
            Message::Discard(vec![0x7000, 0x9000]),
            Message::WantFrames(vec![0x1000, u64::MAX, 0]),
            Message::Resume { pid: 6 },
            Message::Resumed { pid: 7 },
            Message::Abort { pid: u32::MAX },
            Message::Start(ExecRequest {
                argv: vec!["python3".into(), "-c".into(), "print('é')".into()],
                env: vec![("PATH".into(), "/bin".into())],
                cwd: Some("/root".into()),
                stdin: false,
            }),
            Message::Start(ExecRequest::default()),
            Message::Started {
                pid: 4242,
                log: "/var/log/ferry/4242.log".into(),
            },
            Message::Lazy(vec![(0x1000, 0x3000), (0x7fff_f000_0000, 0x7fff_f002_1000)]),
            Message::Lazy(vec![]),
            Message::Place(vec![
                Placement {
                    vaddr: 0x5555_0000_0000,
                    slot: 0,
                },
                Placement {
                    vaddr: 0x5555_0000_1000,
                    slot: u32::MAX,
                },
            ]),
            Message::WaitFaults { wait_ms: 5 },
            Message::Faults(vec![0x7fff_0000_0000, 0x1000]),
            Message::Faults(vec![]),
            Message::LazyEnd { pid: 9 },
        ]
    }

    fn sample_processes() -> ProcessList {
        ProcessList {
            processes: vec![
                ProcessInfo {
                    pid: 1,
                    ppid: 0,
                    uid: 0,
                    state: b'S',
                    threads: 1,
                    rss_kib: 1234,
                    cpu_ticks: 56,
                    start_ticks: 1,
                    kernel_thread: false,
                    comm: "init".into(),
                    cmdline: vec!["/sbin/init".into(), "splash".into(), String::new()],
                },
                ProcessInfo {
                    pid: 2,
                    state: b'I',
                    kernel_thread: true,
                    comm: "kworker/0:1-events".into(),
                    ..Default::default()
                },
                ProcessInfo {
                    pid: u32::MAX,
                    ppid: 1,
                    uid: u32::MAX,
                    state: b'Z',
                    threads: 40,
                    rss_kib: u64::MAX,
                    cpu_ticks: u64::MAX,
                    start_ticks: u64::MAX,
                    kernel_thread: false,
                    comm: ") (a b) ) \u{fffd}é".into(),
                    cmdline: vec!["sh".into(), "-c".into(), "echo 'x y' \u{1f600}".into()],
                },
            ],
            truncated: false,
        }
    }

    fn decode_all(d: &mut Decoder) -> Vec<Result<Message, ProtocolError>> {
        let mut out = Vec::new();
        loop {
            match d.next() {
                Ok(None) => return out,
                Ok(Some(m)) => out.push(Ok(m)),
                Err(e) => out.push(Err(e)),
            }
        }
    }

    /// A frame with an arbitrary header and payload.
    fn raw_frame(version: u8, ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.push(version);
        f.push(ty);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            let frame = m.encode();
            assert_eq!(&frame[..2], b"FY");
            assert_eq!(frame[2], PROTOCOL_VERSION);
            assert_eq!(
                u32::from_le_bytes(frame[4..8].try_into().unwrap()) as usize,
                frame.len() - HEADER_LEN
            );
            if let Message::Processes(list) = &m {
                assert_eq!(list.encoded_len(), frame.len() - HEADER_LEN);
            }
            let mut d = Decoder::new();
            d.push(&frame);
            assert_eq!(d.next(), Ok(Some(m.clone())), "{m:?}");
            assert_eq!(d.next(), Ok(None));
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn frames_split_at_every_byte_decode_in_order() {
        let msgs = all_messages();
        let stream: Vec<u8> = msgs.iter().flat_map(Message::encode).collect();
        for chunk in [1, 2, 3, 7, 100] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                d.push(piece);
                got.extend(decode_all(&mut d).into_iter().map(Result::unwrap));
            }
            assert_eq!(got, msgs, "chunk size {chunk}");
            assert_eq!(d.skipped_bytes(), 0);
        }
    }

    #[test]
    fn garbage_before_a_frame_is_skipped_and_counted() {
        let mut d = Decoder::new();
        // Console noise, including a lone 'F' and an 'F' that ends a push.
        let noise = b"[    1.234] F boot noise\r\nF";
        d.push(noise);
        assert_eq!(d.next(), Ok(None));
        let frame = Message::Pong { nonce: 9 }.encode();
        d.push(&frame[1..]);
        assert_eq!(d.next(), Ok(Some(Message::Pong { nonce: 9 })));
        assert_eq!(d.skipped_bytes(), noise.len() as u64 - 1);
    }

    #[test]
    fn oversize_length_is_rejected_without_waiting_or_allocating() {
        let mut d = Decoder::new();
        let mut f = raw_frame(PROTOCOL_VERSION, MessageType::Stdout as u8, b"");
        f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        d.push(&f);
        d.push(&Message::Ping { nonce: 1 }.encode());
        assert_eq!(
            d.next(),
            Err(ProtocolError::Oversize {
                len: u32::MAX as u64,
                max: MAX_PAYLOAD
            })
        );
        assert_eq!(d.next(), Ok(Some(Message::Ping { nonce: 1 })));
        assert_eq!(d.skipped_bytes(), 6); // The rest of the bad header.
    }

    #[test]
    fn exactly_max_payload_is_accepted_and_one_more_is_not() {
        let ok = Message::Stdout(vec![1; MAX_PAYLOAD]);
        assert!(ok.encode_checked().is_ok());
        let mut d = Decoder::new();
        d.push(&ok.encode());
        assert_eq!(d.next(), Ok(Some(ok)));
        let big = Message::Stdout(vec![1; MAX_PAYLOAD + 1]);
        assert!(matches!(
            big.encode_checked(),
            Err(ProtocolError::Oversize { .. })
        ));
        d.push(&big.encode());
        assert!(matches!(d.next(), Err(ProtocolError::Oversize { .. })));
    }

    #[test]
    fn newer_version_is_a_clear_error() {
        let mut d = Decoder::new();
        d.push(&raw_frame(2, MessageType::Hello as u8, b"whatever"));
        let err = d.next().unwrap_err();
        assert_eq!(
            err,
            ProtocolError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        assert!(err.to_string().contains("version 2"));
    }

    #[test]
    fn unknown_type_consumes_the_frame_and_decoding_continues() {
        let mut d = Decoder::new();
        // The unknown frame's payload contains a magic that must not be mistaken for a frame.
        d.push(&raw_frame(PROTOCOL_VERSION, 0xee, b"FY\x01\x0b\0\0\0\0"));
        d.push(&Message::StdinClosed.encode());
        assert_eq!(d.next(), Err(ProtocolError::UnknownType(0xee)));
        assert_eq!(d.next(), Ok(Some(Message::StdinClosed)));
    }

    #[test]
    fn truncated_and_malformed_payloads_are_errors() {
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (
                raw_frame(1, MessageType::Exited as u8, &[1, 2]),
                ProtocolError::Truncated {
                    message: MessageType::Exited,
                },
            ),
            (
                raw_frame(1, MessageType::Ping as u8, &[0; 9]),
                ProtocolError::TrailingBytes {
                    message: MessageType::Ping,
                    extra: 1,
                },
            ),
            (
                // A string claiming 4 GiB inside a 12-byte payload.
                raw_frame(
                    1,
                    MessageType::Failed as u8,
                    &[127, 0, 0, 0, 255, 255, 255, 255],
                ),
                ProtocolError::Truncated {
                    message: MessageType::Failed,
                },
            ),
            (
                raw_frame(
                    1,
                    MessageType::Failed as u8,
                    &[1, 0, 0, 0, 2, 0, 0, 0, 0xc3, 0x28],
                ),
                ProtocolError::InvalidUtf8 {
                    message: MessageType::Failed,
                },
            ),
            (
                // An argv count of 4 billion with no elements.
                raw_frame(1, MessageType::Exec as u8, &[255, 255, 255, 255]),
                ProtocolError::Truncated {
                    message: MessageType::Exec,
                },
            ),
            (
                raw_frame(1, MessageType::Exec as u8, &[0, 0, 0, 0, 0, 0, 0, 0, 7, 0]),
                ProtocolError::InvalidTag {
                    message: MessageType::Exec,
                    tag: 7,
                },
            ),
        ];
        for (frame, want) in cases {
            let mut d = Decoder::new();
            d.push(&frame);
            d.push(&Message::PowerOff.encode());
            assert_eq!(d.next(), Err(want));
            assert_eq!(d.next(), Ok(Some(Message::PowerOff)));
        }
    }

    /// A Processes payload: not truncated, `count` processes of which one is present, with
    /// `comm_bytes` as its comm and `cmdline` as its raw command line (count and strings).
    fn processes_payload(count: u32, comm_bytes: &[u8], cmdline: &[u8]) -> Vec<u8> {
        let mut p = vec![0];
        p.extend_from_slice(&count.to_le_bytes());
        // pid 7, ppid 1, uid 0, state S, 1 thread.
        p.extend_from_slice(&[7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, b'S', 1, 0, 0, 0]);
        p.extend_from_slice(&[0; 24]); // rss, cpu, start
        p.push(0); // kernel_thread
        p.extend_from_slice(&(comm_bytes.len() as u32).to_le_bytes());
        p.extend_from_slice(comm_bytes);
        p.extend_from_slice(cmdline);
        p
    }

    #[test]
    fn hostile_processes_and_load_payloads_are_errors() {
        const P: u8 = MessageType::Processes as u8;
        let truncated = |message| ProtocolError::Truncated { message };
        let good = processes_payload(1, b"sh", &[0, 0, 0, 0]);
        let mut d = Decoder::new();
        d.push(&raw_frame(1, P, &good));
        assert!(matches!(d.next(), Ok(Some(Message::Processes(l))) if l.processes[0].pid == 7));
        let mut cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            // A count of 4 billion processes with one present.
            (
                raw_frame(1, P, &processes_payload(u32::MAX, b"sh", &[0, 0, 0, 0])),
                truncated(MessageType::Processes),
            ),
            // A cmdline of 4 billion arguments.
            (
                raw_frame(1, P, &processes_payload(1, b"sh", &[255, 255, 255, 255])),
                truncated(MessageType::Processes),
            ),
            // An argument claiming 4 GiB.
            (
                raw_frame(
                    1,
                    P,
                    &processes_payload(1, b"sh", &[1, 0, 0, 0, 255, 255, 255, 255, b'x']),
                ),
                truncated(MessageType::Processes),
            ),
            // A comm that is not UTF-8.
            (
                raw_frame(1, P, &processes_payload(1, b"\xc3\x28", &[0, 0, 0, 0])),
                ProtocolError::InvalidUtf8 {
                    message: MessageType::Processes,
                },
            ),
            // An argument that is not UTF-8.
            (
                raw_frame(
                    1,
                    P,
                    &processes_payload(1, b"sh", &[1, 0, 0, 0, 1, 0, 0, 0, 0xff]),
                ),
                ProtocolError::InvalidUtf8 {
                    message: MessageType::Processes,
                },
            ),
            // A truncated flag of 2.
            (
                raw_frame(1, P, &[2, 0, 0, 0, 0]),
                ProtocolError::InvalidTag {
                    message: MessageType::Processes,
                    tag: 2,
                },
            ),
            // A good list with a byte after it.
            (
                raw_frame(1, P, &[good.clone(), vec![0]].concat()),
                ProtocolError::TrailingBytes {
                    message: MessageType::Processes,
                    extra: 1,
                },
            ),
            (
                raw_frame(1, MessageType::ListProcesses as u8, &[0]),
                ProtocolError::TrailingBytes {
                    message: MessageType::ListProcesses,
                    extra: 1,
                },
            ),
            (
                raw_frame(1, MessageType::Unsupported as u8, &[]),
                truncated(MessageType::Unsupported),
            ),
            (
                raw_frame(1, MessageType::RequestFailed as u8, &[15, 9, 0, 0, 0, b'x']),
                truncated(MessageType::RequestFailed),
            ),
        ];
        // A LoadReport and a Processes cut short at every length.
        let report = Message::LoadReport(LoadInfo::default()).encode();
        for cut in HEADER_LEN..report.len() {
            cases.push((
                raw_frame(1, MessageType::LoadReport as u8, &report[HEADER_LEN..cut]),
                truncated(MessageType::LoadReport),
            ));
        }
        let list = Message::Processes(sample_processes()).encode();
        for cut in HEADER_LEN..list.len() {
            cases.push((
                raw_frame(1, P, &list[HEADER_LEN..cut]),
                truncated(MessageType::Processes),
            ));
        }
        for (frame, want) in cases {
            let mut d = Decoder::new();
            d.push(&frame);
            d.push(&Message::Load.encode());
            assert_eq!(d.next(), Err(want));
            assert_eq!(d.next(), Ok(Some(Message::Load)));
        }
    }

    #[test]
    fn hostile_migration_payloads_are_errors() {
        let truncated = |message| ProtocolError::Truncated { message };
        let mut cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            // 4 billion page refs with one present.
            (
                raw_frame(
                    1,
                    MessageType::PageFrames as u8,
                    &[&[255, 255, 255, 255][..], &[0; 17]].concat(),
                ),
                truncated(MessageType::PageFrames),
            ),
            // An anon flag of 2.
            (
                raw_frame(
                    1,
                    MessageType::PageFrames as u8,
                    &[&[1, 0, 0, 0][..], &[0; 16], &[2]].concat(),
                ),
                ProtocolError::InvalidTag {
                    message: MessageType::PageFrames,
                    tag: 2,
                },
            ),
            (
                raw_frame(1, MessageType::WantFrames as u8, &[2, 0, 0, 0, 1, 2, 3]),
                truncated(MessageType::WantFrames),
            ),
            (
                raw_frame(1, MessageType::Release as u8, &[1, 0, 0, 0, 9]),
                ProtocolError::InvalidTag {
                    message: MessageType::Release,
                    tag: 9,
                },
            ),
            (
                raw_frame(1, MessageType::Freeze as u8, &[1, 0, 0, 0, 0]),
                ProtocolError::TrailingBytes {
                    message: MessageType::Freeze,
                    extra: 1,
                },
            ),
            (
                raw_frame(1, MessageType::Abort as u8, &[1, 0]),
                truncated(MessageType::Abort),
            ),
        ];
        // A Frozen and a Rebuild cut short at every length.
        for ty in [MessageType::Frozen, MessageType::Rebuild] {
            let image = crate::migrate::image::tests::sample_image();
            let frame = Message::Frozen(image).encode();
            for cut in HEADER_LEN..frame.len() {
                cases.push((
                    raw_frame(1, ty as u8, &frame[HEADER_LEN..cut]),
                    truncated(ty),
                ));
            }
        }
        for (frame, want) in cases {
            let mut d = Decoder::new();
            d.push(&frame);
            d.push(&Message::Load.encode());
            assert_eq!(d.next(), Err(want));
            assert_eq!(d.next(), Ok(Some(Message::Load)));
        }
    }

    #[test]
    fn hostile_start_payloads_are_errors() {
        let start = Message::Start(ExecRequest {
            argv: vec!["sleep".into(), "9".into()],
            env: vec![("A".into(), "b".into())],
            cwd: Some("/".into()),
            stdin: false,
        })
        .encode();
        let started = Message::Started {
            pid: 7,
            log: "/var/log/ferry/7.log".into(),
        }
        .encode();
        let mut cases = Vec::new();
        for (ty, frame) in [
            (MessageType::Start, &start),
            (MessageType::Started, &started),
        ] {
            for cut in HEADER_LEN..frame.len() {
                cases.push((
                    raw_frame(1, ty as u8, &frame[HEADER_LEN..cut]),
                    ProtocolError::Truncated { message: ty },
                ));
            }
        }
        // A log path that is not UTF-8.
        cases.push((
            raw_frame(
                1,
                MessageType::Started as u8,
                &[7, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xfe],
            ),
            ProtocolError::InvalidUtf8 {
                message: MessageType::Started,
            },
        ));
        for (frame, want) in cases {
            let mut d = Decoder::new();
            d.push(&frame);
            d.push(&Message::Load.encode());
            assert_eq!(d.next(), Err(want));
            assert_eq!(d.next(), Ok(Some(Message::Load)));
        }
    }

    #[test]
    fn a_full_page_frames_batch_fits_a_frame() {
        let page = PageRef {
            vaddr: u64::MAX,
            pfn: u64::MAX,
            anon: true,
        };
        let m = Message::PageFrames(vec![page; PAGE_FRAMES_BATCH]);
        assert!(m.encode_checked().unwrap().len() < MAX_PAYLOAD / 2);
        let w = Message::WantFrames(vec![0; PAGE_FRAMES_BATCH]);
        assert!(w.encode_checked().is_ok());
    }

    #[test]
    fn new_types_are_additive_and_the_version_stays() {
        // Agents already running speak version 1 and know types 1 to 12 with these bytes.
        assert_eq!(PROTOCOL_VERSION, 1);
        assert_eq!(MessageType::Hello as u8, 1);
        assert_eq!(MessageType::Pong as u8, 12);
        for b in 1..=45 {
            assert_eq!(MessageType::from_byte(b).unwrap() as u8, b);
        }
        assert_eq!(MessageType::from_byte(46), None);
        assert_eq!(MessageType::from_byte(0), None);
    }

    #[test]
    fn hostile_random_input_never_panics_and_later_frames_survive() {
        // A small xorshift generator: deterministic, no extra crates.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..2000 {
            let mut d = Decoder::new();
            let n = (rnd() % 64) as usize;
            let mut junk: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
            // Salt with magics and plausible headers so the frame paths get exercised.
            if round % 2 == 0 && n > 8 {
                junk[0..2].copy_from_slice(&MAGIC);
                junk[2] = PROTOCOL_VERSION;
                junk[3] = (rnd() % 35) as u8;
                junk[4..8].copy_from_slice(&((rnd() % 48) as u32).to_le_bytes());
            }
            d.push(&junk);
            for _ in 0..100 {
                if let Ok(None) = d.next() {
                    break;
                }
            }
            assert!(d.buffered() <= HEADER_LEN + 48 + 64);
        }
    }
}
