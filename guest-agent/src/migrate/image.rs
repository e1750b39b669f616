//! A frozen process, as data: what the source agent reads ([`crate::migrate::dump`]) and the
//! destination agent rebuilds (`crate::migrate::restore`). No page contents are here: pages
//! travel VMM to VMM by guest-physical frame ([`PageRef`]).
//!
//! # Encoding
//!
//! In the protocol's binary style (see [`crate::protocol`]): little-endian integers at their
//! natural width, `bool` one byte (0/1), strings and byte strings (`Vec<u8>`) a u32 length and
//! the bytes, lists a u32 count and the elements, `Option<String>` a tag byte (0/1) and the
//! string, fixed arrays their elements without a count, enums one byte (the discriminants
//! below). A [`ProcessImage`] is its fields in declaration order:
//!
//! ```text
//! pid u32, comm str, cmdline [str], cwd str,
//! creds { uid 3×u32, gid 3×u32, groups [u32] },
//! regs bytes, xstate bytes, sigmask u64,
//! sigactions [{ signo u32, handler u64, flags u64, restorer u64, mask u64 }],
//! rlimits [{ resource u32, cur u64, max u64 }],
//! mm { start_code, end_code, start_data, end_data, start_brk, brk, start_stack, arg_start,
//!      arg_end, env_start, env_end: u64 each, auxv [u64] },
//! mappings [{ start u64, end u64, prot u8, shared bool, offset u64, kind u8, path opt str }],
//! files [{ fd u32, kind u8, path str, flags u32, offset u64 }],
//! thp_disabled bool,
//! clocks { realtime, monotonic, boottime: i64 each, as u64 }
//! ```
//!
//! A [`PageRef`] is `vaddr u64, pfn u64, anon bool` (17 bytes).

use crate::protocol::{Payload, ProtocolError, Reader};

/// The page size of x86-64, the only architecture ferry migrates.
pub const PAGE_SIZE: u64 = 4096;

/// Bytes of a raw `struct user_regs_struct` on x86-64 (27 registers of 8 bytes).
pub const USER_REGS_LEN: usize = 27 * 8;

/// Bytes a [`PageRef`] takes encoded.
pub const PAGE_REF_LEN: usize = 8 + 8 + 1;

/// Everything about one single-threaded process that a destination needs to rebuild it,
/// except its page contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessImage {
    /// The process id at the source.
    pub pid: u32,
    /// The command name (`/proc/PID/comm`, without the newline).
    pub comm: String,
    /// The command line (`/proc/PID/cmdline` split at NULs); informational.
    pub cmdline: Vec<String>,
    /// The working directory (`readlink /proc/PID/cwd`).
    pub cwd: String,
    /// User and group ids.
    pub creds: Creds,
    /// The raw `struct user_regs_struct` of PTRACE_GETREGS, [`USER_REGS_LEN`] bytes; holds
    /// `fs_base`, `gs_base` and `orig_rax` too.
    pub regs: Vec<u8>,
    /// The raw PTRACE_GETREGSET `NT_X86_XSTATE` area (FPU, SSE, AVX...), as long as the
    /// source kernel made it.
    pub xstate: Vec<u8>,
    /// The blocked signals (bit `n - 1` for signal `n`), from PTRACE_GETSIGMASK.
    pub sigmask: u64,
    /// Every signal whose disposition is not `SIG_DFL`, by ascending signal number.
    pub sigactions: Vec<SigAction>,
    /// The resource limits (`prlimit`), one per `RLIMIT_*` the kernel has.
    pub rlimits: Vec<Rlimit>,
    /// The kernel's memory-layout fields (`prctl(PR_SET_MM)` material) and the aux vector.
    pub mm: MmLayout,
    /// The mappings, in `/proc/PID/maps` order (ascending addresses).
    pub mappings: Vec<Mapping>,
    /// The open file descriptors, by ascending fd.
    pub files: Vec<OpenFile>,
    /// The process turned transparent huge pages off (`PR_SET_THP_DISABLE`; `THP_enabled: 0`
    /// in `/proc/PID/status`).
    pub thp_disabled: bool,
    /// The process's clocks as it froze (see [`crate::migrate::clocks`]).
    pub clocks: Clocks,
}

/// A process's clocks at one moment, in nanoseconds: the wall-clock time, and the monotonic
/// and boot-time clocks as the process reads them (its time namespace's offsets included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clocks {
    /// `CLOCK_REALTIME`.
    pub realtime_ns: i64,
    /// `CLOCK_MONOTONIC`.
    pub monotonic_ns: i64,
    /// `CLOCK_BOOTTIME`.
    pub boottime_ns: i64,
}

/// A process's user and group ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Creds {
    /// Real, effective and saved user id (`Uid:` of `/proc/PID/status`, first three).
    pub uid: [u32; 3],
    /// Real, effective and saved group id (`Gid:` of `/proc/PID/status`, first three).
    pub gid: [u32; 3],
    /// Supplementary groups (`Groups:`).
    pub groups: Vec<u32>,
}

/// One signal's disposition, as `rt_sigaction` reports it (the kernel's `struct sigaction`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SigAction {
    /// The signal number, 1 to 64.
    pub signo: u32,
    /// `sa_handler`: a handler address, or `SIG_IGN` (1).
    pub handler: u64,
    /// `sa_flags` (`SA_RESTORER`, `SA_SIGINFO`, `SA_RESTART`, ...).
    pub flags: u64,
    /// `sa_restorer`: the return trampoline in the process's libc.
    pub restorer: u64,
    /// `sa_mask`: signals blocked while the handler runs (bit `n - 1` for signal `n`).
    pub mask: u64,
}

/// One resource limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rlimit {
    /// The `RLIMIT_*` number (0 = `RLIMIT_CPU` ... 15 = `RLIMIT_RTTIME`).
    pub resource: u32,
    /// The soft limit; `u64::MAX` is `RLIM_INFINITY`.
    pub cur: u64,
    /// The hard limit; `u64::MAX` is `RLIM_INFINITY`.
    pub max: u64,
}

/// The memory-layout fields the kernel keeps per `mm` (`/proc/PID/stat` fields 26-28 and
/// 45-51) and the aux vector (`/proc/PID/auxv`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MmLayout {
    /// Start of the program text (stat field 26).
    pub start_code: u64,
    /// End of the program text (stat field 27).
    pub end_code: u64,
    /// Start of initialised data (stat field 45).
    pub start_data: u64,
    /// End of initialised data (stat field 46).
    pub end_data: u64,
    /// Start of the heap (stat field 47).
    pub start_brk: u64,
    /// The current program break, the end of the heap (from the `[heap]` mapping's end if
    /// it has grown, else `start_brk`; the kernel does not show it in stat).
    pub brk: u64,
    /// The stack's start, the top end of the initial stack (stat field 28).
    pub start_stack: u64,
    /// Start of the argument strings (stat field 48).
    pub arg_start: u64,
    /// End of the argument strings (stat field 49).
    pub arg_end: u64,
    /// Start of the environment strings (stat field 50).
    pub env_start: u64,
    /// End of the environment strings (stat field 51).
    pub env_end: u64,
    /// The aux vector as `/proc/PID/auxv` holds it: (type, value) pairs flattened, ending
    /// with the `AT_NULL` pair.
    pub auxv: Vec<u64>,
}

impl MmLayout {
    /// The eleven addresses in the order of the encoding and of the kernel's
    /// `struct prctl_mm_map`: code, data, brk, stack, arguments, environment.
    pub fn addresses(&self) -> [u64; 11] {
        [
            self.start_code,
            self.end_code,
            self.start_data,
            self.end_data,
            self.start_brk,
            self.brk,
            self.start_stack,
            self.arg_start,
            self.arg_end,
            self.env_start,
            self.env_end,
        ]
    }
}

/// One mapping of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address (page-aligned).
    pub start: u64,
    /// One past the last address (page-aligned).
    pub end: u64,
    /// `PROT_READ` (1) | `PROT_WRITE` (2) | `PROT_EXEC` (4).
    pub prot: u8,
    /// `s` in the maps permissions: `MAP_SHARED`; otherwise private (`p`).
    pub shared: bool,
    /// File offset of `start` in bytes (0 for anonymous mappings).
    pub offset: u64,
    /// What backs it.
    pub kind: MappingKind,
    /// The file's path for [`MappingKind::File`]; `None` otherwise.
    pub path: Option<String>,
}

impl Mapping {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the mapping covers no address.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What backs a mapping. Encoded as one byte: the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MappingKind {
    /// Anonymous memory (no path in maps).
    Anonymous = 0,
    /// A file (a path in maps).
    File = 1,
    /// `[heap]`, the brk area.
    Heap = 2,
    /// `[stack]`, the main thread's stack.
    Stack = 3,
    /// `[vdso]`: the kernel's; the destination's own is used (same kernel build required).
    Vdso = 4,
    /// `[vvar]` (and `[vvar_vclock]`): kernel data pages, never copied.
    Vvar = 5,
    /// `[vsyscall]`: the fixed legacy page, never copied.
    Vsyscall = 6,
}

impl MappingKind {
    /// The kind for its encoded byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        use MappingKind::*;
        Some(match b {
            0 => Anonymous,
            1 => File,
            2 => Heap,
            3 => Stack,
            4 => Vdso,
            5 => Vvar,
            6 => Vsyscall,
            _ => return None,
        })
    }
}

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    /// The descriptor number.
    pub fd: u32,
    /// What it refers to. [`FileKind::Tty`] and [`FileKind::Pipe`] only occur on fds 0-2
    /// (the dump refuses them elsewhere): the destination reconnects those to `/dev/null`.
    pub kind: FileKind,
    /// `readlink /proc/PID/fd/N`: a path for files, directories and devices, e.g.
    /// `pipe:[1234]` for a pipe.
    pub path: String,
    /// The open flags (`flags:` of `/proc/PID/fdinfo/N`, octal there): access mode,
    /// `O_APPEND`, `O_NONBLOCK`, `O_CLOEXEC`, ...
    pub flags: u32,
    /// The file position (`pos:` of fdinfo).
    pub offset: u64,
}

/// What a file descriptor refers to. Encoded as one byte: the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FileKind {
    /// A regular file.
    Regular = 0,
    /// A directory.
    Directory = 1,
    /// A character device other than a terminal: `/dev/null`, `/dev/zero`, `/dev/urandom`...
    CharDevice = 2,
    /// A terminal (`/dev/tty*`, `/dev/pts/*`, `/dev/console`).
    Tty = 3,
    /// A pipe or FIFO.
    Pipe = 4,
    /// A socket.
    Socket = 5,
    /// Anything else (eventfd, epoll, signalfd, ...).
    Other = 6,
}

impl FileKind {
    /// The kind for its encoded byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        use FileKind::*;
        Some(match b {
            0 => Regular,
            1 => Directory,
            2 => CharDevice,
            3 => Tty,
            4 => Pipe,
            5 => Socket,
            6 => Other,
            _ => return None,
        })
    }
}

/// A present page of the frozen process: where it is in the process and in guest-physical
/// memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRef {
    /// The page's virtual address in the process (page-aligned).
    pub vaddr: u64,
    /// Its guest-physical frame number (guest-physical address / [`PAGE_SIZE`]).
    pub pfn: u64,
    /// Pagemap bit 61 clear: private/anonymous content (including private copies of file
    /// pages) that must be copied; set, the page is the page cache's (a file page or shared
    /// anonymous memory).
    pub anon: bool,
}

impl ProcessImage {
    /// Appends the encoding (see the module's "Encoding").
    pub(crate) fn write(&self, p: &mut Payload<'_>) {
        p.u32(self.pid);
        p.str(&self.comm);
        p.list(&self.cmdline, |p, a| p.str(a));
        p.str(&self.cwd);
        for v in self.creds.uid.iter().chain(&self.creds.gid) {
            p.u32(*v);
        }
        p.list(&self.creds.groups, |p, g| p.u32(*g));
        p.bytes(&self.regs);
        p.bytes(&self.xstate);
        p.u64(self.sigmask);
        p.list(&self.sigactions, |p, s| {
            p.u32(s.signo);
            p.u64(s.handler);
            p.u64(s.flags);
            p.u64(s.restorer);
            p.u64(s.mask);
        });
        p.list(&self.rlimits, |p, r| {
            p.u32(r.resource);
            p.u64(r.cur);
            p.u64(r.max);
        });
        let mm = &self.mm;
        for v in mm.addresses() {
            p.u64(v);
        }
        p.list(&mm.auxv, |p, v| p.u64(*v));
        p.list(&self.mappings, |p, m| {
            p.u64(m.start);
            p.u64(m.end);
            p.u8(m.prot);
            p.flag(m.shared);
            p.u64(m.offset);
            p.u8(m.kind as u8);
            match &m.path {
                None => p.u8(0),
                Some(path) => {
                    p.u8(1);
                    p.str(path);
                }
            }
        });
        p.list(&self.files, |p, f| {
            p.u32(f.fd);
            p.u8(f.kind as u8);
            p.str(&f.path);
            p.u32(f.flags);
            p.u64(f.offset);
        });
        p.flag(self.thp_disabled);
        for ns in [
            self.clocks.realtime_ns,
            self.clocks.monotonic_ns,
            self.clocks.boottime_ns,
        ] {
            p.u64(ns as u64);
        }
    }

    /// Reads the encoding (see the module's "Encoding").
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let pid = r.u32()?;
        let comm = r.string()?;
        let cmdline = r.list(|r| r.string())?;
        let cwd = r.string()?;
        let uid = [r.u32()?, r.u32()?, r.u32()?];
        let gid = [r.u32()?, r.u32()?, r.u32()?];
        let groups = r.list(|r| r.u32())?;
        let regs = r.bytes()?;
        let xstate = r.bytes()?;
        let sigmask = r.u64()?;
        let sigactions = r.list(|r| {
            Ok(SigAction {
                signo: r.u32()?,
                handler: r.u64()?,
                flags: r.u64()?,
                restorer: r.u64()?,
                mask: r.u64()?,
            })
        })?;
        let rlimits = r.list(|r| {
            Ok(Rlimit {
                resource: r.u32()?,
                cur: r.u64()?,
                max: r.u64()?,
            })
        })?;
        let mm = MmLayout {
            start_code: r.u64()?,
            end_code: r.u64()?,
            start_data: r.u64()?,
            end_data: r.u64()?,
            start_brk: r.u64()?,
            brk: r.u64()?,
            start_stack: r.u64()?,
            arg_start: r.u64()?,
            arg_end: r.u64()?,
            env_start: r.u64()?,
            env_end: r.u64()?,
            auxv: r.list(|r| r.u64())?,
        };
        let mappings = r.list(|r| {
            let start = r.u64()?;
            let end = r.u64()?;
            let prot = r.u8()?;
            let shared = r.flag()?;
            let offset = r.u64()?;
            let tag = r.u8()?;
            let kind = MappingKind::from_byte(tag).ok_or(ProtocolError::InvalidTag {
                message: r.message_type(),
                tag,
            })?;
            let path = if r.flag()? { Some(r.string()?) } else { None };
            Ok(Mapping {
                start,
                end,
                prot,
                shared,
                offset,
                kind,
                path,
            })
        })?;
        let files = r.list(|r| {
            let fd = r.u32()?;
            let tag = r.u8()?;
            let kind = FileKind::from_byte(tag).ok_or(ProtocolError::InvalidTag {
                message: r.message_type(),
                tag,
            })?;
            Ok(OpenFile {
                fd,
                kind,
                path: r.string()?,
                flags: r.u32()?,
                offset: r.u64()?,
            })
        })?;
        Ok(ProcessImage {
            pid,
            comm,
            cmdline,
            cwd,
            creds: Creds { uid, gid, groups },
            regs,
            xstate,
            sigmask,
            sigactions,
            rlimits,
            mm,
            mappings,
            files,
            thp_disabled: r.flag()?,
            clocks: Clocks {
                realtime_ns: r.u64()? as i64,
                monotonic_ns: r.u64()? as i64,
                boottime_ns: r.u64()? as i64,
            },
        })
    }
}

impl PageRef {
    /// Appends the encoding: `vaddr u64, pfn u64, anon bool`.
    pub(crate) fn write(&self, p: &mut Payload<'_>) {
        p.u64(self.vaddr);
        p.u64(self.pfn);
        p.flag(self.anon);
    }

    /// Reads the encoding.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        Ok(PageRef {
            vaddr: r.u64()?,
            pfn: r.u64()?,
            anon: r.flag()?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::MessageType;

    /// A plausible image with every field set and every enum value used.
    pub(crate) fn sample_image() -> ProcessImage {
        let kinds = [
            MappingKind::Anonymous,
            MappingKind::File,
            MappingKind::Heap,
            MappingKind::Stack,
            MappingKind::Vdso,
            MappingKind::Vvar,
            MappingKind::Vsyscall,
        ];
        let file_kinds = [
            FileKind::Regular,
            FileKind::Directory,
            FileKind::CharDevice,
            FileKind::Tty,
            FileKind::Pipe,
            FileKind::Socket,
            FileKind::Other,
        ];
        ProcessImage {
            pid: 4242,
            comm: "python3".into(),
            cmdline: vec!["python3".into(), "-c".into(), "print('é')".into()],
            cwd: "/root".into(),
            creds: Creds {
                uid: [1000, 0, 1000],
                gid: [100, 100, u32::MAX],
                groups: vec![4, 24, 27],
            },
            regs: (0..USER_REGS_LEN as u8).collect(),
            xstate: vec![0xab; 2696],
            sigmask: 1 << 13,
            sigactions: vec![SigAction {
                signo: 2,
                handler: 0x5555_5555_1234,
                flags: 0x0400_0004,
                restorer: 0x7f00_0000_4242,
                mask: u64::MAX,
            }],
            rlimits: vec![
                Rlimit {
                    resource: 7,
                    cur: 1024,
                    max: 1_048_576,
                },
                Rlimit {
                    resource: 3,
                    cur: 8 << 20,
                    max: u64::MAX,
                },
            ],
            mm: MmLayout {
                start_code: 1,
                end_code: 2,
                start_data: 3,
                end_data: 4,
                start_brk: 5,
                brk: 6,
                start_stack: 7,
                arg_start: 8,
                arg_end: 9,
                env_start: 10,
                env_end: 11,
                auxv: vec![6, 4096, 0, 0],
            },
            mappings: kinds
                .iter()
                .enumerate()
                .map(|(i, &kind)| Mapping {
                    start: 0x1000 * i as u64,
                    end: 0x1000 * (i as u64 + 1),
                    prot: i as u8 & 7,
                    shared: i == 1,
                    offset: 0x2000,
                    kind,
                    path: (kind == MappingKind::File).then(|| "/usr/bin/python3.11".into()),
                })
                .collect(),
            files: file_kinds
                .iter()
                .enumerate()
                .map(|(i, &kind)| OpenFile {
                    fd: i as u32,
                    kind,
                    path: format!("/tmp/f{i}"),
                    flags: 0o2100002,
                    offset: u64::MAX - i as u64,
                })
                .collect(),
            thp_disabled: true,
            clocks: Clocks {
                realtime_ns: 1_795_000_000_123_456_789,
                monotonic_ns: 600_000_000_001,
                boottime_ns: -1,
            },
        }
    }

    fn encode(image: &ProcessImage) -> Vec<u8> {
        let mut out = Vec::new();
        image.write(&mut Payload(&mut out));
        out
    }

    fn decode(bytes: &[u8]) -> Result<ProcessImage, ProtocolError> {
        let mut r = Reader::new(bytes, MessageType::Hello);
        let image = ProcessImage::read(&mut r)?;
        r.finish()?;
        Ok(image)
    }

    #[test]
    fn images_round_trip() {
        let full = sample_image();
        let empty = ProcessImage {
            pid: 0,
            comm: String::new(),
            cmdline: vec![],
            cwd: String::new(),
            creds: Creds::default(),
            regs: vec![],
            xstate: vec![],
            sigmask: 0,
            sigactions: vec![],
            rlimits: vec![],
            mm: MmLayout::default(),
            mappings: vec![],
            files: vec![],
            thp_disabled: false,
            clocks: Clocks::default(),
        };
        for image in [full, empty] {
            assert_eq!(decode(&encode(&image)), Ok(image.clone()));
        }
    }

    #[test]
    fn page_refs_round_trip() {
        for page in [
            PageRef {
                vaddr: 0x7fff_ffff_f000,
                pfn: (1 << 55) - 1,
                anon: true,
            },
            PageRef {
                vaddr: 0,
                pfn: 0,
                anon: false,
            },
        ] {
            let mut out = Vec::new();
            page.write(&mut Payload(&mut out));
            assert_eq!(out.len(), PAGE_REF_LEN);
            let mut r = Reader::new(&out, MessageType::Hello);
            assert_eq!(PageRef::read(&mut r), Ok(page));
            assert_eq!(r.finish(), Ok(()));
        }
    }

    #[test]
    fn every_cut_of_an_image_is_truncated() {
        let bytes = encode(&sample_image());
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut]),
                Err(ProtocolError::Truncated {
                    message: MessageType::Hello
                }),
                "cut at {cut}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(ProtocolError::TrailingBytes {
                message: MessageType::Hello,
                extra: 1
            })
        );
    }

    #[test]
    fn hostile_counts_and_tags_are_errors() {
        let image = ProcessImage {
            mappings: vec![],
            files: vec![],
            ..sample_image()
        };
        let bytes = encode(&image);
        let truncated = Err(ProtocolError::Truncated {
            message: MessageType::Hello,
        });
        // The cmdline count (after pid and comm) claiming 4 billion arguments.
        let at = 4 + 4 + image.comm.len();
        let mut b = bytes.clone();
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        // The fields after it are read as arguments until one is not UTF-8 or the end comes.
        assert!(matches!(
            decode(&b),
            Err(ProtocolError::Truncated { .. } | ProtocolError::InvalidUtf8 { .. })
        ));
        // The last count (files, before the one-byte THP flag and three clocks) claiming 4
        // billion entries.
        let tail = 1 + 3 * 8;
        let mut b = bytes.clone();
        let n = b.len() - tail;
        b[n - 4..n].copy_from_slice(&u32::MAX.to_le_bytes());
        // The flag and clocks are read as a first file entry, until a tag or the end fails.
        assert!(matches!(
            decode(&b),
            Err(ProtocolError::Truncated { .. } | ProtocolError::InvalidTag { .. })
        ));
        // A mapping kind, a file kind, a shared flag and a path tag out of range.
        let one = |m: Mapping, f: Vec<OpenFile>| {
            encode(&ProcessImage {
                mappings: vec![m],
                files: f,
                ..image.clone()
            })
        };
        let mapping = sample_image().mappings[0].clone();
        let b = one(mapping.clone(), vec![]);
        // Mapping layout from its start: start 8, end 8, prot 1, shared 1, offset 8, kind 1,
        // path tag 1; then the files count 4.
        let base = b.len() - tail - 4 - 1 - 1 - 8 - 1 - 1 - 8 - 8;
        for (off, tag) in [(17, 2u8), (26, 7), (27, 2)] {
            let mut bad = b.clone();
            bad[base + off] = tag;
            assert_eq!(
                decode(&bad),
                Err(ProtocolError::InvalidTag {
                    message: MessageType::Hello,
                    tag
                }),
                "offset {off}"
            );
        }
        let file = sample_image().files[0].clone();
        let b = one(mapping, vec![file.clone()]);
        let base = b.len() - tail - (4 + 1 + 4 + file.path.len() + 4 + 8);
        let mut bad = b.clone();
        bad[base + 4] = 9;
        assert_eq!(
            decode(&bad),
            Err(ProtocolError::InvalidTag {
                message: MessageType::Hello,
                tag: 9
            })
        );
        // A comm that is not UTF-8.
        let mut b = encode(&ProcessImage {
            comm: "ab".into(),
            ..image.clone()
        });
        b[8] = 0xff;
        assert_eq!(
            decode(&b),
            Err(ProtocolError::InvalidUtf8 {
                message: MessageType::Hello
            })
        );
        // regs claiming 4 GiB.
        let at = 4 + 4 + image.comm.len() + 4;
        let at = at
            + image.cmdline.iter().map(|a| 4 + a.len()).sum::<usize>()
            + 4
            + image.cwd.len()
            + 24
            + 4
            + 4 * image.creds.groups.len();
        let mut b = bytes;
        assert_eq!(
            u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize,
            USER_REGS_LEN
        );
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&b), truncated);
    }

    #[test]
    fn enum_bytes_are_stable() {
        for b in 0..=6 {
            assert_eq!(MappingKind::from_byte(b).unwrap() as u8, b);
            assert_eq!(FileKind::from_byte(b).unwrap() as u8, b);
        }
        assert_eq!(MappingKind::from_byte(7), None);
        assert_eq!(FileKind::from_byte(7), None);
    }
}
