//! The wire protocol between two ferry VMMs moving one process: the source VMM sends the
//! process description and its pages, the destination VMM lands them and answers.
//!
//! The transport is one byte stream per job (mutual TLS between the nodes). On it travel
//! length-prefixed frames with a fixed 8-byte header:
//!
//! ```text
//! offset  size  field
//! 0       2     magic, b"FM"
//! 2       1     protocol version (PROTOCOL_VERSION)
//! 3       1     message type (see `MessageType`)
//! 4       4     payload length, u32 little-endian, at most `MessageType::max_payload`
//! 8       n     payload
//! ```
//!
//! Payload fields are encoded in order, little-endian: integers at their natural width, `bool`
//! as one byte (0 or 1), strings as a u32 byte length and UTF-8 bytes, byte strings as a u32
//! length and the bytes, lists as a u32 count and the elements. A payload must be consumed
//! exactly: trailing bytes are an error. Every payload length has a per-type bound, checked
//! from the header before the payload is read or any memory is set aside for it.
//!
//! # One job
//!
//! ```text
//! source                                   destination
//! Hello {job_id, page_count, image}   ->
//! PageList {vaddrs} ...               ->   (repeated until page_count vaddrs have arrived)
//!                                          the agent builds the skeleton, learns the frames
//!                                     <-   Ready
//! PageBatch {entries, data} ...       ->   each page written into its frame
//! Done {pages, zero_pages, checksum}  ->   counts and checksum checked, process resumed
//!                                     <-   Ack {ok, message}
//! ```
//!
//! # Pre-copy
//!
//! A job may begin with [`Message::Precopy`] frames, sent while the process still runs at the
//! source: pages by vaddr, which the destination holds (a page sent again replaces the copy
//! held). The job then goes on as above, and a page of the final stream whose held copy is
//! still good travels as a [`PageKind::Held`] marker, with no data: the destination lands its
//! held copy. Held pages count in `Done`'s checksum with the held data.
//!
//! ```text
//! Precopy {entries, data} ...         ->   (rounds, while the process runs; held by vaddr)
//! Hello ... as above, with PageBatch entries of kind Held for pages held and unchanged
//! ```
//!
//! A pre-copy job may start with [`Message::Outline`] (encoded as [`Hello`]) and its own
//! [`Message::PageList`] frames: the running process's outline (an image without registers)
//! and the vaddrs of the first round's pages. The destination builds the process from it
//! while the rounds go on, and lands each held page in its frame as soon as both are there;
//! after the freeze, `Hello` brings the full image, which completes it, and only pages that
//! changed (or whose mapping did) still need landing.
//!
//! ```text
//! Outline {job_id, page_count, image} ->   the destination's agent starts building
//! PageList {vaddrs} ...               ->   (page_count vaddrs: what to pin early)
//! Precopy ... Hello ... as above
//! ```
//!
//! Pages travel in [`PageList`] order, each exactly once: the i-th page of the batches is the
//! i-th vaddr of the list, so the destination needs no lookup table and notices a lost,
//! repeated or reordered page at once. The source sends the vaddr list before the pages
//! because the destination's agent needs it to build the skeleton (same mappings, memory
//! present and pinned) and report a frame for each vaddr before the first page arrives.
//!
//! Either side may give up with [`Message::Abort`] before the job's end (the source before
//! [`Message::Done`], the destination before it answers Done); after Done the destination's
//! only answer is [`Message::Ack`]. Every outcome but `Ack {ok: true}` leaves the source to
//! thaw the original process.
//!
//! # Post-copy
//!
//! A job may begin with [`Message::Postcopy`] frames: the vaddrs of pages that come only
//! after the process resumed at the destination (its private anonymous memory). The job then
//! goes on as above for the other pages (the eager ones: private copies of file pages), and
//! `Ack {ok: true}` says the process runs at the destination, its lazy pages missing. Then the
//! lazy pages travel in [`Message::LazyBatch`] frames, each exactly once, in any order: the
//! source sends first those the destination asks for with [`Message::PageRequest`] (its
//! process waits for them), and the rest in list order meanwhile; a second `Done` (counts and
//! checksum over the lazy pages in the order they travelled) and a second `Ack` end the job.
//! The destination says [`Message::Placed`] for every batch it placed; the source keeps at
//! most [`LAZY_WINDOW`] batches of the rest beyond those, so that an asked-for page never
//! waits behind much more than that in the connection's buffers.
//!
//! ```text
//! Postcopy {vaddrs} ...               ->   (the lazy pages' vaddrs)
//! Hello ... Done as above, for the eager pages
//!                                     <-   Ack {ok: true}: the process runs there
//! LazyBatch {entries, data} ...       ->
//!                                     <-   PageRequest {vaddrs} ... (at any time)
//!                                     <-   Placed {batches} ... (as batches are placed)
//! Done {pages, zero_pages, checksum}  ->   (the lazy pages)
//!                                     <-   Ack {ok, message}
//! ```
//!
//! Once the first `Ack` said ok, the process runs at the destination only: a failure after
//! that loses it (the source's frozen copy is behind the running one), as in QEMU.
//!
//! # Versions
//!
//! The version byte is in every frame header, so a peer of another version fails on the first
//! frame ([`ProtocolError::UnsupportedVersion`]) instead of misreading a later one. Both nodes
//! of a cluster run the same ferry build; there is no negotiation.

use std::fmt;

/// The protocol version this code speaks; carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 3;

/// The two bytes every frame starts with ("ferry migration").
pub const MAGIC: [u8; 2] = *b"FM";

/// Size of a frame header: magic, version, type, payload length.
pub const HEADER_LEN: usize = 8;

/// Bytes in a page (x86-64's base page): the unit of transfer.
pub const PAGE_SIZE: usize = 4096;

/// The most pages in one [`PageBatch`] (1 MiB of data when none is zero).
pub const MAX_BATCH_PAGES: usize = 256;

/// Bytes of one [`PageEntry`] in a batch: vaddr u64, kind u8.
pub const ENTRY_LEN: usize = 9;

/// Post-copy: the most [`Message::LazyBatch`] frames of pages nobody asked for that the
/// source sends beyond those the destination said it placed ([`Message::Placed`]).
pub const LAZY_WINDOW: u32 = 4;

/// The most vaddrs in one [`Message::PageList`] frame (1 MiB of vaddrs).
pub const MAX_PAGE_LIST: usize = 128 * 1024;

/// The most pages one job may announce (16 TiB of memory).
pub const MAX_JOB_PAGES: u64 = 1 << 32;

/// The largest process image [`Hello`] may carry (16 MiB).
pub const MAX_IMAGE: usize = 16 << 20;

/// The longest reason or message in [`Message::Abort`] and [`Ack`] (bytes of UTF-8).
pub const MAX_TEXT: usize = 16 * 1024;

/// Errors from decoding (or, for messages a peer would refuse, encoding) a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame does not start with [`MAGIC`]: the peer speaks something else.
    #[error(
        "the peer does not speak ferry's migration protocol (frame starts with {found:02x?}); \
         check that the address is a ferry node's migration port"
    )]
    BadMagic {
        /// The first two bytes found.
        found: [u8; 2],
    },
    /// The frame was written by a different protocol version than ours.
    #[error(
        "the peer speaks ferry migration protocol version {found}, this build speaks version \
         {supported}; run the same ferry build on both nodes"
    )]
    UnsupportedVersion {
        /// The version byte found in the frame header.
        found: u8,
        /// [`PROTOCOL_VERSION`].
        supported: u8,
    },
    /// The type byte names no message this version knows.
    #[error("unknown migration message type {0:#04x}")]
    UnknownType(u8),
    /// A payload over its type's bound ([`MessageType::max_payload`]).
    #[error("{message} payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversize {
        /// The message type.
        message: MessageType,
        /// The payload length announced (decoding) or produced (encoding).
        len: u64,
        /// The bound for this type.
        max: usize,
    },
    /// A count in the payload over its bound.
    #[error("{message} holds {count} {what}, more than the limit of {max}")]
    TooMany {
        /// The message type.
        message: MessageType,
        /// What was counted, e.g. "pages".
        what: &'static str,
        /// The count found.
        count: u64,
        /// Its bound.
        max: u64,
    },
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
    /// A boolean or page kind byte had a value with no meaning.
    #[error("{message} payload holds an invalid tag byte {tag}")]
    InvalidTag {
        /// The message being decoded.
        message: MessageType,
        /// The byte found.
        tag: u8,
    },
    /// A [`PageBatch`] to encode whose data is not one page per data entry.
    #[error("a page batch with {data_pages} data pages holds {data_len} bytes of data")]
    BatchData {
        /// Entries of kind [`PageKind::Data`].
        data_pages: usize,
        /// The length of [`PageBatch::data`].
        data_len: usize,
    },
}

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// [`Message::Hello`], source to destination.
    Hello = 1,
    /// [`Message::PageList`], source to destination.
    PageList = 2,
    /// [`Message::Ready`], destination to source.
    Ready = 3,
    /// [`Message::PageBatch`], source to destination.
    PageBatch = 4,
    /// [`Message::Done`], source to destination.
    Done = 5,
    /// [`Message::Abort`], either direction.
    Abort = 6,
    /// [`Message::Ack`], destination to source.
    Ack = 7,
    /// [`Message::Precopy`], source to destination.
    Precopy = 8,
    /// [`Message::Postcopy`], source to destination.
    Postcopy = 9,
    /// [`Message::LazyBatch`], source to destination.
    LazyBatch = 10,
    /// [`Message::PageRequest`], destination to source.
    PageRequest = 11,
    /// [`Message::Placed`], destination to source.
    Placed = 12,
    /// [`Message::Outline`], source to destination.
    Outline = 13,
}

impl MessageType {
    /// The type for a frame's type byte, if this version knows it.
    pub fn from_byte(b: u8) -> Option<Self> {
        use MessageType::*;
        Some(match b {
            1 => Hello,
            2 => PageList,
            3 => Ready,
            4 => PageBatch,
            5 => Done,
            6 => Abort,
            7 => Ack,
            8 => Precopy,
            9 => Postcopy,
            10 => LazyBatch,
            11 => PageRequest,
            12 => Placed,
            13 => Outline,
            _ => return None,
        })
    }

    /// The largest payload a frame of this type may carry.
    pub const fn max_payload(self) -> usize {
        match self {
            // job_id, page_count, image length, image.
            MessageType::Hello | MessageType::Outline => 8 + 8 + 4 + MAX_IMAGE,
            MessageType::PageList | MessageType::Postcopy | MessageType::PageRequest => {
                4 + 8 * MAX_PAGE_LIST
            }
            MessageType::Ready => 0,
            MessageType::PageBatch | MessageType::Precopy | MessageType::LazyBatch => {
                4 + MAX_BATCH_PAGES * (ENTRY_LEN + PAGE_SIZE)
            }
            MessageType::Done => 8 + 8 + 8,
            MessageType::Placed => 4,
            MessageType::Abort => 4 + MAX_TEXT,
            MessageType::Ack => 1 + 4 + MAX_TEXT,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the payload holds.
    pub message: MessageType,
    /// Payload bytes following the header, within [`MessageType::max_payload`].
    pub len: usize,
}

impl FrameHeader {
    /// Checks a header: magic, version, type, and the payload length against the type's bound.
    pub fn decode(header: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let magic = [header[0], header[1]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        if header[2] != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                found: header[2],
                supported: PROTOCOL_VERSION,
            });
        }
        let message =
            MessageType::from_byte(header[3]).ok_or(ProtocolError::UnknownType(header[3]))?;
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let max = message.max_payload();
        if len as u64 > max as u64 {
            return Err(ProtocolError::Oversize {
                message,
                len: len.into(),
                max,
            });
        }
        Ok(FrameHeader {
            message,
            len: len as usize,
        })
    }

    /// The header bytes for a payload of `len` bytes (which the caller has bounded).
    fn encode(message: MessageType, len: usize) -> [u8; HEADER_LEN] {
        let len = u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes();
        [
            MAGIC[0],
            MAGIC[1],
            PROTOCOL_VERSION,
            message as u8,
            len[0],
            len[1],
            len[2],
            len[3],
        ]
    }
}

/// The start of a job: [`Message::Hello`].
///
/// Encoded as: `job_id` u64, `page_count` u64, `image` byte string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// The job's id, chosen by the source; both sides log it and the API reports it.
    pub job_id: u64,
    /// How many pages the job moves: the length of the [`Message::PageList`] that follows,
    /// at most [`MAX_JOB_PAGES`].
    pub page_count: u64,
    /// The process description (the agent's encoded `ProcessImage`), opaque to this protocol;
    /// at most [`MAX_IMAGE`] bytes.
    pub image: Vec<u8>,
}

/// How a page travels in a [`PageBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// The page's 4096 bytes follow in the batch's data.
    Data = 0,
    /// The page is all zeros; no data travels.
    Zero = 1,
    /// The destination holds the page from a [`Message::Precopy`] frame and it has not changed
    /// since; no data travels. Only in a [`Message::PageBatch`].
    Held = 2,
}

/// One page of a [`PageBatch`].
///
/// Encoded as: `vaddr` u64, `kind` u8 ([`PageKind`]'s value) ([`ENTRY_LEN`] bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// The page's virtual address in the process (page-aligned), the next one of the job's
    /// [`Message::PageList`].
    pub vaddr: u64,
    /// Whether its data follows or it is a zero page.
    pub kind: PageKind,
}

/// A batch of pages: [`Message::PageBatch`].
///
/// Encoded as: a u32 count (at most [`MAX_BATCH_PAGES`]), the entries, then the data of the
/// [`PageKind::Data`] entries back to back, [`PAGE_SIZE`] bytes each, in entry order (no
/// count: it follows from the entries). [`PageBatchView`] reads one without copying,
/// [`BatchWriter`] builds one in place.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageBatch {
    /// The pages, in [`Message::PageList`] order.
    pub entries: Vec<PageEntry>,
    /// The data pages' contents, [`PAGE_SIZE`] bytes per [`PageKind::Data`] entry.
    pub data: Vec<u8>,
}

/// The end of the page stream: [`Message::Done`].
///
/// Encoded as: `pages` u64, `zero_pages` u64, `checksum` u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Done {
    /// Pages sent in all batches, zero pages included (equals [`Hello::page_count`]).
    pub pages: u64,
    /// Of those, pages sent as [`PageKind::Zero`].
    pub zero_pages: u64,
    /// The checksum over every page in stream order as `(vaddr, data)`, a zero page counting
    /// as 4096 zero bytes; defined in [`crate::checksum`].
    pub checksum: u64,
}

/// The destination's outcome: [`Message::Ack`].
///
/// Encoded as: `ok` bool, `message` string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ack {
    /// Whether every page landed, the checksum matched and the process runs at the
    /// destination. Only then may the source kill its frozen copy.
    pub ok: bool,
    /// What went wrong when `ok` is false (for the user, at most [`MAX_TEXT`] bytes); empty
    /// otherwise.
    pub message: String,
}

/// One protocol message; each maps to one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source → destination, first: the job and the process description.
    Hello(Hello),
    /// Source → destination, pre-copy, before the first [`Message::Precopy`]: the running
    /// process's outline (an image without registers) and, in the [`Message::PageList`]
    /// frames that follow, the vaddrs of the pages the first round sends. Encoded as
    /// [`Message::Hello`].
    Outline(Hello),
    /// Source → destination, after [`Message::Hello`]: the next vaddrs of the job's pages
    /// (page-aligned, at most [`MAX_PAGE_LIST`] per frame), in the order the pages will
    /// travel. Repeated until [`Hello::page_count`] vaddrs have been sent; none when the job
    /// has no pages.
    ///
    /// Encoded as: a u32 count, then each vaddr as u64.
    PageList(Vec<u64>),
    /// Destination → source: the skeleton stands and every vaddr has a frame; send the pages.
    Ready,
    /// Source → destination: the next pages.
    PageBatch(PageBatch),
    /// Source → destination: all pages are sent.
    Done(Done),
    /// Source → destination, before [`Message::Hello`], while the process still runs: pages
    /// for the destination to hold until the job's stream says [`PageKind::Held`]. Encoded
    /// as a [`PageBatch`]; entries are of kind Data or Zero, in any order.
    Precopy(PageBatch),
    /// Either direction: the sender gives up on the job (source: before [`Message::Done`];
    /// destination: before its [`Message::Ack`]).
    ///
    /// Encoded as: `reason` string.
    Abort {
        /// Why, for the user (at most [`MAX_TEXT`] bytes).
        reason: String,
    },
    /// Destination → source: the answer to [`Message::Done`].
    Ack(Ack),
    /// Source → destination, first, for a post-copy job: the next vaddrs of the pages that
    /// travel after the process resumed (at most [`MAX_PAGE_LIST`] per frame, page-aligned;
    /// repeated as needed). Encoded as [`Message::PageList`].
    Postcopy(Vec<u64>),
    /// Source → destination, post-copy, after the first [`Ack`]: pages of the
    /// [`Message::Postcopy`] list, each once, in any order. Encoded as a [`PageBatch`];
    /// entries are of kind Data or Zero.
    LazyBatch(PageBatch),
    /// Destination → source, post-copy: the process waits for these pages (vaddrs of the
    /// [`Message::Postcopy`] list); send them before the others. A page already sent is not
    /// sent again. Encoded as [`Message::PageList`].
    PageRequest(Vec<u64>),
    /// Destination → source, post-copy: this many more [`Message::LazyBatch`] frames are in
    /// the process (see [`LAZY_WINDOW`]).
    ///
    /// Encoded as: `batches` u32.
    Placed {
        /// Batches placed since the last `Placed`.
        batches: u32,
    },
}

impl Message {
    /// This message's type byte.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::Outline(_) => MessageType::Outline,
            Message::PageList(_) => MessageType::PageList,
            Message::Ready => MessageType::Ready,
            Message::PageBatch(_) => MessageType::PageBatch,
            Message::Done(_) => MessageType::Done,
            Message::Precopy(_) => MessageType::Precopy,
            Message::Abort { .. } => MessageType::Abort,
            Message::Ack(_) => MessageType::Ack,
            Message::Postcopy(_) => MessageType::Postcopy,
            Message::LazyBatch(_) => MessageType::LazyBatch,
            Message::PageRequest(_) => MessageType::PageRequest,
            Message::Placed { .. } => MessageType::Placed,
        }
    }

    /// The whole frame: header and payload. Refuses what a peer would refuse: a payload over
    /// its bound, a count over its limit, a batch whose data does not match its entries.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let ty = self.message_type();
        let too_many = |what, count: usize, max: usize| ProtocolError::TooMany {
            message: ty,
            what,
            count: count as u64,
            max: max as u64,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + 32);
        out.extend_from_slice(&[0; HEADER_LEN]);
        let mut p = Payload(&mut out);
        match self {
            Message::Hello(h) | Message::Outline(h) => {
                if h.page_count > MAX_JOB_PAGES {
                    return Err(ProtocolError::TooMany {
                        message: ty,
                        what: "pages",
                        count: h.page_count,
                        max: MAX_JOB_PAGES,
                    });
                }
                p.u64(h.job_id);
                p.u64(h.page_count);
                p.bytes(&h.image);
            }
            Message::PageList(vaddrs)
            | Message::Postcopy(vaddrs)
            | Message::PageRequest(vaddrs) => {
                if vaddrs.len() > MAX_PAGE_LIST {
                    return Err(too_many("vaddrs", vaddrs.len(), MAX_PAGE_LIST));
                }
                p.u32(vaddrs.len() as u32);
                for v in vaddrs {
                    p.u64(*v);
                }
            }
            Message::Ready => {}
            Message::PageBatch(b) | Message::Precopy(b) | Message::LazyBatch(b) => {
                if matches!(self, Message::Precopy(_) | Message::LazyBatch(_))
                    && b.entries.iter().any(|e| e.kind == PageKind::Held)
                {
                    return Err(ProtocolError::InvalidTag {
                        message: ty,
                        tag: PageKind::Held as u8,
                    });
                }
                if b.entries.len() > MAX_BATCH_PAGES {
                    return Err(too_many("pages", b.entries.len(), MAX_BATCH_PAGES));
                }
                let data_pages = b
                    .entries
                    .iter()
                    .filter(|e| e.kind == PageKind::Data)
                    .count();
                if b.data.len() != data_pages * PAGE_SIZE {
                    return Err(ProtocolError::BatchData {
                        data_pages,
                        data_len: b.data.len(),
                    });
                }
                p.u32(b.entries.len() as u32);
                for e in &b.entries {
                    p.u64(e.vaddr);
                    p.u8(e.kind as u8);
                }
                p.0.extend_from_slice(&b.data);
            }
            Message::Done(d) => {
                p.u64(d.pages);
                p.u64(d.zero_pages);
                p.u64(d.checksum);
            }
            Message::Abort { reason } => p.str(reason),
            Message::Placed { batches } => p.u32(*batches),
            Message::Ack(a) => {
                p.u8(u8::from(a.ok));
                p.str(&a.message);
            }
        }
        let len = out.len() - HEADER_LEN;
        if len > ty.max_payload() {
            return Err(ProtocolError::Oversize {
                message: ty,
                len: len as u64,
                max: ty.max_payload(),
            });
        }
        out[..HEADER_LEN].copy_from_slice(&FrameHeader::encode(ty, len));
        Ok(out)
    }

    /// Decodes a whole frame from the start of `bytes`: the message and the bytes it took, or
    /// `None` while `bytes` holds less than a whole frame. A bad header is an error as soon as
    /// its 8 bytes are there.
    pub fn decode_frame(bytes: &[u8]) -> Result<Option<(Message, usize)>, ProtocolError> {
        let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::decode(header)?;
        let end = HEADER_LEN + header.len;
        let Some(payload) = bytes.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        Ok(Some((Message::decode(header.message, payload)?, end)))
    }

    /// Decodes the payload of a frame of type `ty`.
    pub fn decode(ty: MessageType, payload: &[u8]) -> Result<Self, ProtocolError> {
        if payload.len() > ty.max_payload() {
            return Err(ProtocolError::Oversize {
                message: ty,
                len: payload.len() as u64,
                max: ty.max_payload(),
            });
        }
        let mut r = Reader { buf: payload, ty };
        let msg = match ty {
            MessageType::Hello | MessageType::Outline => {
                let job_id = r.u64()?;
                let page_count = r.u64()?;
                if page_count > MAX_JOB_PAGES {
                    return Err(ProtocolError::TooMany {
                        message: ty,
                        what: "pages",
                        count: page_count,
                        max: MAX_JOB_PAGES,
                    });
                }
                let image = r.bytes()?.to_vec();
                let hello = Hello {
                    job_id,
                    page_count,
                    image,
                };
                if ty == MessageType::Outline {
                    Message::Outline(hello)
                } else {
                    Message::Hello(hello)
                }
            }
            MessageType::PageList | MessageType::Postcopy | MessageType::PageRequest => {
                let n = r.count("vaddrs", MAX_PAGE_LIST)?;
                let raw = r.take(n * 8)?;
                let vaddrs = raw.chunks_exact(8).map(le_u64).collect();
                match ty {
                    MessageType::Postcopy => Message::Postcopy(vaddrs),
                    MessageType::PageRequest => Message::PageRequest(vaddrs),
                    _ => Message::PageList(vaddrs),
                }
            }
            MessageType::Ready => Message::Ready,
            MessageType::PageBatch | MessageType::Precopy | MessageType::LazyBatch => {
                let view = PageBatchView::parse_as(ty, r.rest())?;
                let mut batch = PageBatch {
                    entries: Vec::with_capacity(view.len()),
                    data: Vec::with_capacity(view.data.len()),
                };
                for page in view.pages() {
                    batch.entries.push(PageEntry {
                        vaddr: page.vaddr,
                        kind: page.kind(),
                    });
                    if let Some(d) = page.data {
                        batch.data.extend_from_slice(d);
                    }
                }
                match ty {
                    MessageType::Precopy => Message::Precopy(batch),
                    MessageType::LazyBatch => Message::LazyBatch(batch),
                    _ => Message::PageBatch(batch),
                }
            }
            MessageType::Done => Message::Done(Done {
                pages: r.u64()?,
                zero_pages: r.u64()?,
                checksum: r.u64()?,
            }),
            MessageType::Abort => Message::Abort {
                reason: r.string()?,
            },
            MessageType::Placed => Message::Placed { batches: r.u32()? },
            MessageType::Ack => Message::Ack(Ack {
                ok: r.flag()?,
                message: r.string()?,
            }),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// A [`Message::PageBatch`] payload read in place: the engines land pages straight from the
/// receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct PageBatchView<'a> {
    entries: &'a [u8],
    data: &'a [u8],
}

/// One page of a [`PageBatchView`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef<'a> {
    /// The page's virtual address.
    pub vaddr: u64,
    /// The page's [`PAGE_SIZE`] bytes for a [`PageKind::Data`] page, `None` otherwise.
    pub data: Option<&'a [u8]>,
    kind: PageKind,
}

impl PageRef<'_> {
    /// How the page travelled.
    pub fn kind(&self) -> PageKind {
        self.kind
    }
}

impl<'a> PageBatchView<'a> {
    /// Checks a whole [`Message::PageBatch`] payload: the count within [`MAX_BATCH_PAGES`],
    /// every kind byte valid, and exactly one page of data per data entry.
    pub fn parse(payload: &'a [u8]) -> Result<Self, ProtocolError> {
        Self::parse_as(MessageType::PageBatch, payload)
    }

    /// [`PageBatchView::parse`] for a frame of type `ty`: a [`Message::PageBatch`], or a
    /// [`Message::Precopy`] or [`Message::LazyBatch`] (which may not hold [`PageKind::Held`]
    /// entries).
    pub fn parse_as(ty: MessageType, payload: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader { buf: payload, ty };
        let n = r.count("pages", MAX_BATCH_PAGES)?;
        let entries = r.take(n * ENTRY_LEN)?;
        let mut data_pages = 0;
        for e in entries.chunks_exact(ENTRY_LEN) {
            match e[8] {
                0 => data_pages += 1,
                1 => {}
                2 if ty == MessageType::PageBatch => {}
                tag => return Err(ProtocolError::InvalidTag { message: ty, tag }),
            }
        }
        let data = r.take(data_pages * PAGE_SIZE)?;
        r.finish()?;
        Ok(PageBatchView { entries, data })
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.entries.len() / ENTRY_LEN
    }

    /// Whether the batch holds no pages.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of page data in the batch.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// The pages in order.
    pub fn pages(&self) -> impl Iterator<Item = PageRef<'a>> + 'a {
        let mut data = self.data.chunks_exact(PAGE_SIZE);
        self.entries.chunks_exact(ENTRY_LEN).map_while(move |e| {
            let vaddr = le_u64(&e[..8]);
            let (kind, data) = match e[8] {
                0 => (PageKind::Data, Some(data.next()?)),
                1 => (PageKind::Zero, None),
                _ => (PageKind::Held, None),
            };
            Some(PageRef { vaddr, data, kind })
        })
    }
}

/// Builds [`Message::PageBatch`] (or [`Message::Precopy`]) frames in one reusable buffer: a
/// source reads each page straight into its place in the frame and writes the frame with one
/// call.
#[derive(Debug)]
pub struct BatchWriter {
    message: MessageType,
    buf: Vec<u8>,
    count: usize,
    pushed: usize,
    data_end: usize,
}

impl Default for BatchWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchWriter {
    /// A writer of [`Message::PageBatch`] frames whose buffer fits the largest batch.
    pub fn new() -> Self {
        Self::of(MessageType::PageBatch)
    }

    /// A writer of [`Message::Precopy`] frames.
    pub fn precopy() -> Self {
        Self::of(MessageType::Precopy)
    }

    /// A writer of [`Message::LazyBatch`] frames.
    pub fn lazy() -> Self {
        Self::of(MessageType::LazyBatch)
    }

    fn of(message: MessageType) -> Self {
        BatchWriter {
            message,
            buf: Vec::with_capacity(HEADER_LEN + message.max_payload()),
            count: 0,
            pushed: 0,
            data_end: 0,
        }
    }

    /// Starts a batch of `count` pages (at most [`MAX_BATCH_PAGES`]; more are cut to it).
    pub fn start(&mut self, count: usize) {
        self.count = count.min(MAX_BATCH_PAGES);
        self.pushed = 0;
        self.data_end = self.data_start();
        // Only growth is zero-filled; the buffer is reused batch after batch.
        self.buf.resize(self.data_end + self.count * PAGE_SIZE, 0);
    }

    fn data_start(&self) -> usize {
        HEADER_LEN + 4 + self.count * ENTRY_LEN
    }

    /// Where the next page's [`PAGE_SIZE`] bytes go; [`BatchWriter::push`] then keeps them
    /// (a data page) or drops them (a zero page). Empty once `count` pages are pushed.
    pub fn page_slot(&mut self) -> &mut [u8] {
        if self.pushed >= self.count {
            return &mut [];
        }
        &mut self.buf[self.data_end..self.data_end + PAGE_SIZE]
    }

    /// Records the next page: its vaddr, and whether the slot's bytes are its data. Pages past
    /// `count` are ignored, and so is a [`PageKind::Held`] page in a Precopy or LazyBatch
    /// frame.
    pub fn push(&mut self, vaddr: u64, kind: PageKind) {
        if self.pushed >= self.count
            || (kind == PageKind::Held && self.message != MessageType::PageBatch)
        {
            return;
        }
        let at = HEADER_LEN + 4 + self.pushed * ENTRY_LEN;
        self.buf[at..at + 8].copy_from_slice(&vaddr.to_le_bytes());
        self.buf[at + 8] = kind as u8;
        if kind == PageKind::Data {
            self.data_end += PAGE_SIZE;
        }
        self.pushed += 1;
    }

    /// The finished frame, of the pages pushed so far.
    pub fn finish(&mut self) -> &[u8] {
        if self.pushed < self.count {
            // Close the gap left by entries never pushed.
            let (from, to) = (self.data_start(), HEADER_LEN + 4 + self.pushed * ENTRY_LEN);
            self.buf.copy_within(from..self.data_end, to);
            self.data_end -= from - to;
            self.count = self.pushed;
        }
        self.buf.truncate(self.data_end);
        let len = self.data_end - HEADER_LEN;
        self.buf[..HEADER_LEN].copy_from_slice(&FrameHeader::encode(self.message, len));
        self.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(self.count as u32).to_le_bytes());
        &self.buf
    }
}

/// `bytes` (eight of them) as a little-endian u64.
fn le_u64(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

/// Appends payload fields.
struct Payload<'a>(&'a mut Vec<u8>);

impl Payload<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A byte string: a u32 length and the bytes. Lengths past u32 saturate; the payload bound
    /// refuses them anyway.
    fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

/// Reads payload fields; every read checks the bytes left first.
struct Reader<'a> {
    buf: &'a [u8],
    ty: MessageType,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated { message: self.ty });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(le_u64(self.take(8)?))
    }
    fn flag(&mut self) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(ProtocolError::InvalidTag {
                message: self.ty,
                tag,
            }),
        }
    }
    /// A u32 count, refused over `max` before anything is read for it.
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()?;
        if n as usize > max {
            return Err(ProtocolError::TooMany {
                message: self.ty,
                what,
                count: n.into(),
                max: max as u64,
            });
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let ty = self.ty;
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::InvalidUtf8 { message: ty })
    }
    fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                message: self.ty,
                extra: self.buf.len(),
            })
        }
    }
}

/// `text` cut to at most [`MAX_TEXT`] bytes at a character boundary, for an
/// [`Message::Abort`] reason or an [`Ack`] message.
pub fn bounded_text(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests;
