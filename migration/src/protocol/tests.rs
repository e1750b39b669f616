//! Round trips and hostile input for the migration protocol.

use super::*;

fn page(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (i as u8) ^ seed).collect()
}

fn batch() -> PageBatch {
    let mut data = page(1);
    data.extend(page(2));
    PageBatch {
        entries: vec![
            PageEntry {
                vaddr: 0x40_0000,
                kind: PageKind::Data,
            },
            PageEntry {
                vaddr: 0x40_1000,
                kind: PageKind::Zero,
            },
            PageEntry {
                vaddr: 0x7fff_f000,
                kind: PageKind::Data,
            },
        ],
        data,
    }
}

fn samples() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            job_id: 42,
            page_count: 3,
            image: b"opaque process image".to_vec(),
        }),
        Message::Hello(Hello::default()),
        Message::Outline(Hello {
            job_id: 7,
            page_count: 2,
            image: b"a running process's outline".to_vec(),
        }),
        Message::PageList(vec![0x40_0000, 0x40_1000, 0x7fff_f000]),
        Message::PageList(vec![]),
        Message::Ready,
        Message::PageBatch(batch()),
        Message::PageBatch(PageBatch::default()),
        Message::Precopy(batch()),
        Message::LazyBatch(batch()),
        Message::Postcopy(vec![0x40_0000, 0x7fff_f000]),
        Message::Postcopy(vec![]),
        Message::PageRequest(vec![0x7fff_f000]),
        Message::Placed { batches: 3 },
        Message::PageBatch(PageBatch {
            entries: vec![
                PageEntry {
                    vaddr: 0x1000,
                    kind: PageKind::Held,
                },
                PageEntry {
                    vaddr: 0x2000,
                    kind: PageKind::Data,
                },
            ],
            data: page(3),
        }),
        Message::Done(Done {
            pages: 3,
            zero_pages: 1,
            checksum: 0xdead_beef_cafe_f00d,
        }),
        Message::Abort {
            reason: "the guest agent could not freeze pid 4242 — ünïcode".into(),
        },
        Message::Ack(Ack {
            ok: true,
            message: String::new(),
        }),
        Message::Ack(Ack {
            ok: false,
            message: "resume failed".into(),
        }),
    ]
}

#[test]
fn round_trips() {
    for m in samples() {
        let frame = m.encode().unwrap();
        assert_eq!(frame[..2], MAGIC);
        assert_eq!(frame[2], PROTOCOL_VERSION);
        assert_eq!(frame[3], m.message_type() as u8);
        let (back, used) = Message::decode_frame(&frame).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(used, frame.len());
    }
}

#[test]
fn frames_decode_back_to_back() {
    let all: Vec<u8> = samples().iter().flat_map(|m| m.encode().unwrap()).collect();
    let mut rest = &all[..];
    let mut got = Vec::new();
    while let Some((m, used)) = Message::decode_frame(rest).unwrap() {
        got.push(m);
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    assert_eq!(got, samples());
}

#[test]
fn batch_layout_is_as_documented() {
    let frame = Message::PageBatch(batch()).encode().unwrap();
    let payload = &frame[HEADER_LEN..];
    assert_eq!(payload.len(), 4 + 3 * ENTRY_LEN + 2 * PAGE_SIZE);
    assert_eq!(payload[..4], 3u32.to_le_bytes());
    assert_eq!(payload[4..12], 0x40_0000u64.to_le_bytes());
    assert_eq!(payload[12], 0);
    assert_eq!(payload[13 + 8], 1);
    let data = &payload[4 + 3 * ENTRY_LEN..];
    assert_eq!(data[..PAGE_SIZE], page(1)[..]);
    assert_eq!(data[PAGE_SIZE..], page(2)[..]);
}

#[test]
fn batch_writer_matches_encode() {
    let b = batch();
    let mut w = BatchWriter::new();
    for _ in 0..2 {
        // Twice: the reused buffer must not leak the earlier batch.
        w.start(b.entries.len());
        let mut data = b.data.chunks(PAGE_SIZE);
        for e in &b.entries {
            match e.kind {
                PageKind::Data => w.page_slot().copy_from_slice(data.next().unwrap()),
                PageKind::Zero | PageKind::Held => w.page_slot().fill(0),
            }
            w.push(e.vaddr, e.kind);
        }
        assert_eq!(
            w.finish(),
            &Message::PageBatch(b.clone()).encode().unwrap()[..]
        );
    }
}

#[test]
fn precopy_writer_frames_precopy_and_skips_held_markers() {
    let mut w = BatchWriter::precopy();
    w.start(2);
    w.page_slot().copy_from_slice(&page(5));
    w.push(0x5000, PageKind::Data);
    w.push(0x6000, PageKind::Held);
    let frame = w.finish().to_vec();
    let (m, _) = Message::decode_frame(&frame).unwrap().unwrap();
    assert_eq!(
        m,
        Message::Precopy(PageBatch {
            entries: vec![PageEntry {
                vaddr: 0x5000,
                kind: PageKind::Data
            }],
            data: page(5),
        })
    );
}

#[test]
fn batch_writer_closes_the_gap_of_unpushed_entries() {
    let mut w = BatchWriter::new();
    w.start(MAX_BATCH_PAGES + 10);
    w.page_slot().copy_from_slice(&page(9));
    w.push(0x1000, PageKind::Data);
    w.page_slot().fill(0);
    w.push(0x2000, PageKind::Zero);
    let frame = w.finish().to_vec();
    let expected = PageBatch {
        entries: vec![
            PageEntry {
                vaddr: 0x1000,
                kind: PageKind::Data,
            },
            PageEntry {
                vaddr: 0x2000,
                kind: PageKind::Zero,
            },
        ],
        data: page(9),
    };
    assert_eq!(
        Message::decode_frame(&frame).unwrap().unwrap().0,
        Message::PageBatch(expected)
    );
    // An empty batch, and pushes past the count, stay well-formed.
    w.start(1);
    w.page_slot().fill(7);
    w.push(0x3000, PageKind::Data);
    assert!(w.page_slot().is_empty());
    w.push(0x4000, PageKind::Data);
    let (m, _) = Message::decode_frame(w.finish()).unwrap().unwrap();
    let Message::PageBatch(b) = m else { panic!() };
    assert_eq!(b.entries.len(), 1);
    w.start(0);
    let (m, _) = Message::decode_frame(w.finish()).unwrap().unwrap();
    assert_eq!(m, Message::PageBatch(PageBatch::default()));
}

#[test]
fn view_reads_pages_in_place() {
    let frame = Message::PageBatch(batch()).encode().unwrap();
    let view = PageBatchView::parse(&frame[HEADER_LEN..]).unwrap();
    assert_eq!(view.len(), 3);
    assert_eq!(view.data_len(), 2 * PAGE_SIZE);
    let pages: Vec<_> = view.pages().collect();
    assert_eq!(pages[0].vaddr, 0x40_0000);
    assert_eq!(pages[0].data, Some(&page(1)[..]));
    assert_eq!(pages[1].data, None);
    assert_eq!(pages[1].kind(), PageKind::Zero);
    assert_eq!(pages[2].data, Some(&page(2)[..]));
}

#[test]
fn truncation_at_every_byte_is_incomplete_never_a_message() {
    for m in samples() {
        let frame = m.encode().unwrap();
        for cut in 0..frame.len() {
            assert_eq!(
                Message::decode_frame(&frame[..cut]),
                Ok(None),
                "{m:?} cut at {cut}"
            );
            if cut >= HEADER_LEN {
                // The payload alone, cut short, is an error (not a shorter message).
                let err = Message::decode(m.message_type(), &frame[HEADER_LEN..cut]).unwrap_err();
                assert!(
                    matches!(
                        err,
                        ProtocolError::Truncated { .. } | ProtocolError::InvalidTag { .. }
                    ),
                    "{m:?} cut at {cut}: {err:?}"
                );
            }
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    for m in samples() {
        let frame = m.encode().unwrap();
        let mut payload = frame[HEADER_LEN..].to_vec();
        payload.push(0);
        let err = Message::decode(m.message_type(), &payload).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::TrailingBytes { extra: 1, .. }
                    | ProtocolError::Oversize { .. }
                    | ProtocolError::Truncated { .. }
            ),
            "{m:?}: {err:?}"
        );
    }
}

fn header(ty: u8, len: u32) -> [u8; HEADER_LEN] {
    let l = len.to_le_bytes();
    [b'F', b'M', PROTOCOL_VERSION, ty, l[0], l[1], l[2], l[3]]
}

#[test]
fn oversize_lengths_are_refused_from_the_header() {
    for ty in 1..=13u8 {
        let t = MessageType::from_byte(ty).unwrap();
        let max = t.max_payload() as u32;
        assert!(FrameHeader::decode(&header(ty, max)).is_ok());
        for len in [max + 1, u32::MAX] {
            assert_eq!(
                FrameHeader::decode(&header(ty, len)),
                Err(ProtocolError::Oversize {
                    message: t,
                    len: len.into(),
                    max: max as usize,
                })
            );
            // decode_frame refuses it without waiting for (or holding) the payload.
            assert!(Message::decode_frame(&header(ty, len)).is_err());
        }
    }
}

#[test]
fn oversize_counts_inside_payloads_are_refused() {
    // A page list announcing more vaddrs than a frame may carry.
    let mut p = ((MAX_PAGE_LIST + 1) as u32).to_le_bytes().to_vec();
    p.extend([0; 64]);
    assert!(matches!(
        Message::decode(MessageType::PageList, &p),
        Err(ProtocolError::TooMany { .. })
    ));
    // A batch announcing more pages than a batch may hold.
    let p = ((MAX_BATCH_PAGES + 1) as u32).to_le_bytes();
    assert!(matches!(
        PageBatchView::parse(&p),
        Err(ProtocolError::TooMany { .. })
    ));
    // u32::MAX everywhere a length goes.
    let mut hello = 1u64.to_le_bytes().to_vec();
    hello.extend(2u64.to_le_bytes());
    hello.extend(u32::MAX.to_le_bytes());
    assert_eq!(
        Message::decode(MessageType::Hello, &hello),
        Err(ProtocolError::Truncated {
            message: MessageType::Hello
        })
    );
    assert!(Message::decode(MessageType::Abort, &u32::MAX.to_le_bytes()).is_err());
    // A job of more pages than the limit.
    let mut hello = 1u64.to_le_bytes().to_vec();
    hello.extend((MAX_JOB_PAGES + 1).to_le_bytes());
    hello.extend(0u32.to_le_bytes());
    assert!(matches!(
        Message::decode(MessageType::Hello, &hello),
        Err(ProtocolError::TooMany { .. })
    ));
    // A batch whose data does not match its data entries.
    let mut b = batch();
    b.data.pop();
    let frame = Message::PageBatch(batch()).encode().unwrap();
    assert!(matches!(
        Message::PageBatch(b).encode(),
        Err(ProtocolError::BatchData { .. })
    ));
    assert!(Message::decode(MessageType::PageBatch, &frame[HEADER_LEN..frame.len() - 1]).is_err());
}

#[test]
fn encode_refuses_what_a_peer_would_refuse() {
    let big = Message::Hello(Hello {
        job_id: 1,
        page_count: 0,
        image: vec![0; MAX_IMAGE + 1],
    });
    assert!(matches!(big.encode(), Err(ProtocolError::Oversize { .. })));
    let long = Message::Abort {
        reason: "x".repeat(MAX_TEXT + 1),
    };
    assert!(long.encode().is_err());
    assert!(Message::Abort {
        reason: bounded_text(&"é".repeat(MAX_TEXT))
    }
    .encode()
    .is_ok());
    assert!(Message::PageList(vec![0; MAX_PAGE_LIST + 1])
        .encode()
        .is_err());
    assert!(Message::PageList(vec![0; MAX_PAGE_LIST]).encode().is_ok());
}

#[test]
fn unknown_types_bad_magic_and_bad_version() {
    for ty in [0u8, 14, 0x42, 0xff] {
        assert_eq!(
            FrameHeader::decode(&header(ty, 0)),
            Err(ProtocolError::UnknownType(ty))
        );
    }
    let mut h = header(3, 0);
    h[2] = PROTOCOL_VERSION + 1;
    assert_eq!(
        FrameHeader::decode(&h),
        Err(ProtocolError::UnsupportedVersion {
            found: PROTOCOL_VERSION + 1,
            supported: PROTOCOL_VERSION,
        })
    );
    let mut h = header(3, 0);
    h[..2].copy_from_slice(b"FY");
    assert_eq!(
        FrameHeader::decode(&h),
        Err(ProtocolError::BadMagic { found: *b"FY" })
    );
    // The error says what to do.
    let msg = ProtocolError::UnsupportedVersion {
        found: 2,
        supported: 1,
    }
    .to_string();
    assert!(msg.contains("same ferry build"), "{msg}");
}

#[test]
fn invalid_tags_and_utf8() {
    let mut b = Message::PageBatch(batch()).encode().unwrap();
    b[HEADER_LEN + 4 + 8] = 3;
    assert_eq!(
        Message::decode_frame(&b),
        Err(ProtocolError::InvalidTag {
            message: MessageType::PageBatch,
            tag: 3
        })
    );
    // Held pages are markers of the final stream; a Precopy frame must carry its pages.
    let mut p = Message::Precopy(batch()).encode().unwrap();
    p[HEADER_LEN + 4 + ENTRY_LEN + 8] = PageKind::Held as u8;
    assert_eq!(
        Message::decode_frame(&p),
        Err(ProtocolError::InvalidTag {
            message: MessageType::Precopy,
            tag: 2
        })
    );
    let mut held = batch();
    held.entries[1].kind = PageKind::Held;
    assert!(Message::Precopy(held).encode().is_err());
    assert_eq!(
        Message::decode(MessageType::Ack, &[2, 0, 0, 0, 0]),
        Err(ProtocolError::InvalidTag {
            message: MessageType::Ack,
            tag: 2
        })
    );
    assert_eq!(
        Message::decode(MessageType::Abort, &[2, 0, 0, 0, 0xff, 0xfe]),
        Err(ProtocolError::InvalidUtf8 {
            message: MessageType::Abort
        })
    );
}

/// Every input of a few bytes, and pseudo-random garbage after valid headers: errors or
/// incomplete, never a panic.
#[test]
fn garbage_never_panics() {
    let mut x: u64 = 0x1234_5678_9abc_def0;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for ty in 0..=8u8 {
        for _ in 0..500 {
            let len = (next() % 64) as usize;
            let mut payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && len >= 4 {
                // Small counts, so lists and batches get parsed further.
                payload[..4].copy_from_slice(&((next() % 4) as u32).to_le_bytes());
            }
            let mut frame = header(ty, len as u32).to_vec();
            frame.extend(&payload);
            let _ = Message::decode_frame(&frame);
            if let Some(t) = MessageType::from_byte(ty) {
                let _ = Message::decode(t, &payload);
            }
            let _ = PageBatchView::parse(&payload);
        }
    }
}
