//! Plans checked by reading them back with a strict reader written from APPNOTE, independent
//! of the record writers (Python's `zipfile` is the oracle in `tests/zip_oracles.rs`).

use super::*;
use crate::tensor::DType;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn opts() -> ZipOptions {
    ZipOptions {
        modified: DosDateTime::new(2024, 2, 29, 13, 45, 31).unwrap(),
        align: 64,
    }
}

/// The zip's bytes as the writer leaves them: zeros, payloads, then regions computed from
/// the payloads' CRCs.
fn materialise(layout: &ZipLayout, tensors: &[Tensor]) -> Vec<u8> {
    let mut b = vec![0u8; layout.file_len() as usize];
    let mut crcs = Vec::new();
    for s in layout.slots() {
        let t = tensors[s.tensor].bytes();
        b[s.offset as usize..][..t.len()].copy_from_slice(t);
        crcs.push(crc32fast::hash(t));
    }
    for r in layout.regions(&crcs).unwrap() {
        b[r.offset as usize..][..r.bytes.len()].copy_from_slice(&r.bytes);
    }
    b
}

#[derive(Debug)]
struct Read {
    name: String,
    flags: u16,
    crc: u32,
    size: u64,
    header_offset: u64,
    data_offset: u64,
    local_extra: Vec<u8>,
}

/// Reads the end records, the central directory and every local header, checking that they
/// agree; returns the entries and whether zip64 end records were found.
fn read_zip(b: &[u8]) -> (Vec<Read>, bool) {
    let end = b.len() - 22;
    assert_eq!(u32_at(b, end), 0x0605_4b50, "end record at the very end");
    assert_eq!(u16_at(b, end + 20), 0, "no comment");
    let mut count = u64::from(u16_at(b, end + 10));
    let mut cd_len = u64::from(u32_at(b, end + 12));
    let mut cd_offset = u64::from(u32_at(b, end + 16));
    let zip64 = end >= 20 && u32_at(b, end - 20) == 0x0706_4b50;
    if zip64 {
        let loc = end - 20;
        assert_eq!(u32_at(b, loc + 16), 1, "one disk");
        let rec = u64_at(b, loc + 8) as usize;
        assert_eq!(rec, loc - 56, "zip64 end record right before its locator");
        assert_eq!(u32_at(b, rec), 0x0606_4b50);
        assert_eq!(u64_at(b, rec + 4), 44);
        assert_eq!(
            u64_at(b, rec + 24),
            u64_at(b, rec + 32),
            "entries on disk = total"
        );
        count = u64_at(b, rec + 32);
        cd_len = u64_at(b, rec + 40);
        cd_offset = u64_at(b, rec + 48);
        assert_eq!(cd_offset + cd_len, rec as u64);
    } else {
        assert_eq!(cd_offset + cd_len, end as u64);
    }
    let mut at = cd_offset as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        assert_eq!(u32_at(b, at), 0x0201_4b50);
        let needed = u16_at(b, at + 6);
        assert_eq!(
            u16_at(b, at + 4),
            0x0300 | needed,
            "made by Unix, same version"
        );
        assert_eq!(u16_at(b, at + 10), 0, "stored");
        let (n, m, k) = (
            u16_at(b, at + 28) as usize,
            u16_at(b, at + 30) as usize,
            u16_at(b, at + 32) as usize,
        );
        assert_eq!(k, 0, "no comment");
        assert_eq!(u32_at(b, at + 38), 0o600 << 16);
        let name = String::from_utf8(b[at + 46..at + 46 + n].to_vec()).unwrap();
        let mut csize = u64::from(u32_at(b, at + 20));
        let mut size = u64::from(u32_at(b, at + 24));
        let mut header_offset = u64::from(u32_at(b, at + 42));
        let extra = &b[at + 46 + n..at + 46 + n + m];
        let wants_zip64 = size == 0xFFFF_FFFF || header_offset == 0xFFFF_FFFF;
        assert_eq!(needed, if wants_zip64 { 45 } else { 20 }, "{name}");
        if m > 0 {
            assert_eq!(u16_at(extra, 0), 1, "only a zip64 field");
            assert_eq!(u16_at(extra, 2) as usize, m - 4);
            let mut f = 4;
            for v in [&mut size, &mut csize, &mut header_offset] {
                if *v == 0xFFFF_FFFF {
                    *v = u64_at(extra, f);
                    f += 8;
                }
            }
            assert_eq!(f, m, "no unused zip64 fields");
        }
        assert_eq!(size, csize);
        let (flags, crc) = (u16_at(b, at + 8), u32_at(b, at + 16));
        let mtime = (u16_at(b, at + 12), u16_at(b, at + 14));

        // The local header must say the same.
        let h = header_offset as usize;
        assert_eq!(u32_at(b, h), 0x0403_4b50);
        assert_eq!(u16_at(b, h + 6), flags);
        assert_eq!(u16_at(b, h + 8), 0);
        assert_eq!((u16_at(b, h + 10), u16_at(b, h + 12)), mtime);
        assert_eq!(u32_at(b, h + 14), crc);
        let (ln, lm) = (u16_at(b, h + 26) as usize, u16_at(b, h + 28) as usize);
        assert_eq!(&b[h + 30..h + 30 + ln], name.as_bytes());
        let local_extra = b[h + 30 + ln..h + 30 + ln + lm].to_vec();
        let local_size = u32_at(b, h + 22);
        if size > ZIP64_LIMIT {
            assert_eq!((local_size, u32_at(b, h + 18)), (u32::MAX, u32::MAX));
            assert_eq!(&local_extra[..4], &[1, 0, 16, 0]);
            assert_eq!(
                (u64_at(&local_extra, 4), u64_at(&local_extra, 12)),
                (size, size)
            );
        } else {
            assert_eq!(
                (u64::from(local_size), u64::from(u32_at(b, h + 18))),
                (size, size)
            );
        }
        out.push(Read {
            name,
            flags,
            crc,
            size,
            header_offset,
            data_offset: (h + 30 + ln + lm) as u64,
            local_extra,
        });
        at += 46 + n + m + k;
    }
    assert_eq!(at as u64, cd_offset + cd_len, "directory length");
    (out, zip64)
}

fn tensor(name: &str, data: Vec<u8>) -> Tensor {
    let n = data.len() as u64;
    Tensor::from_vec(name, DType::U8, vec![n], data).unwrap()
}

fn weights_file() -> (PlannedFile, Vec<Tensor>) {
    let tensors = vec![
        tensor("k", (0..=255u8).cycle().take(1000).collect()),
        tensor("empty", vec![]),
        tensor("b", vec![3; 24]),
    ];
    let file = PlannedFile {
        len: 4096 + 1000 + 24 + 100,
        regions: vec![
            Region {
                offset: 0,
                bytes: b"\x89HDF\r\n\x1a\n".to_vec(),
            },
            Region {
                offset: 200,
                bytes: vec![0xab; 77],
            },
            Region {
                offset: 4096 + 1024 + 24,
                bytes: vec![0xcd; 10],
            },
        ],
        slots: vec![
            Slot {
                offset: 4096,
                tensor: 0,
            },
            Slot {
                offset: 4096 + 1000,
                tensor: 1,
            },
            Slot {
                offset: 4096 + 1000,
                tensor: 2,
            },
        ],
    };
    (file, tensors)
}

fn keras_members(file: PlannedFile) -> Vec<Member> {
    vec![
        Member::Bytes {
            name: "metadata.json".into(),
            data: br#"{"keras_version": "3.15.1"}"#.to_vec(),
        },
        Member::Bytes {
            name: "config.json".into(),
            data: b"{}".to_vec(),
        },
        Member::Planned {
            name: "model.weights.h5".into(),
            file,
        },
        Member::Bytes {
            name: "assets/vocab/\u{e9}t\u{e9}.txt".into(),
            data: b"a\nb\n".to_vec(),
        },
        Member::Bytes {
            name: "assets/empty".into(),
            data: vec![],
        },
    ]
}

#[test]
fn keras_shaped_zip_reads_back() {
    let (file, tensors) = weights_file();
    let want_weights = {
        let mut w = vec![0u8; file.len as usize];
        for s in &file.slots {
            let t = tensors[s.tensor].bytes();
            w[s.offset as usize..][..t.len()].copy_from_slice(t);
        }
        for r in &file.regions {
            w[r.offset as usize..][..r.bytes.len()].copy_from_slice(&r.bytes);
        }
        w
    };
    let layout = plan(keras_members(file), &tensors, &opts()).unwrap();
    assert_eq!(layout.digest(), Digest::Crc32);
    assert!(!layout.is_zip64());
    let zip = materialise(&layout, &tensors);
    let (entries, zip64) = read_zip(&zip);
    assert!(!zip64);
    let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "metadata.json",
            "config.json",
            "model.weights.h5",
            "assets/vocab/\u{e9}t\u{e9}.txt",
            "assets/empty"
        ]
    );
    let mut next = 0;
    for e in &entries {
        assert_eq!(e.header_offset, next, "{}: members back to back", e.name);
        let data = &zip[e.data_offset as usize..][..e.size as usize];
        assert_eq!(e.crc, crc32fast::hash(data), "{}", e.name);
        assert_eq!(
            e.flags,
            if e.name.is_ascii() { 0 } else { 1 << 11 },
            "{}",
            e.name
        );
        next = e.data_offset + e.size;
    }
    let w = &entries[2];
    assert_eq!(
        &zip[w.data_offset as usize..][..w.size as usize],
        &want_weights[..]
    );
    assert_eq!(w.data_offset % 64, 0, "weights aligned");
    assert_eq!(u16_at(&w.local_extra, 0), 0xd935, "zipalign-style padding");
    assert_eq!(u16_at(&w.local_extra, 2) as usize, w.local_extra.len() - 4);
    assert_eq!(u16_at(&w.local_extra, 4), 64);
    assert!(w.local_extra[6..].iter().all(|&x| x == 0));
    assert_eq!(
        layout.data_offsets(),
        entries.iter().map(|e| e.data_offset).collect::<Vec<_>>()
    );
    // the payloads moved with the file
    assert_eq!(
        layout.slots()[0],
        Slot {
            offset: w.data_offset + 4096,
            tensor: 0
        }
    );
}

#[test]
fn alignment_works_at_every_size_and_can_be_turned_off() {
    let tensors = vec![tensor("t", vec![5; 3])];
    for align in [1u16, 2, 4, 8, 64, 4096, MAX_ALIGN] {
        for pre in 0..70usize {
            let file = PlannedFile {
                len: 3,
                regions: vec![],
                slots: vec![Slot {
                    offset: 0,
                    tensor: 0,
                }],
            };
            let members = vec![
                Member::Bytes {
                    name: "a".into(),
                    data: vec![1; pre],
                },
                Member::Planned {
                    name: "w".into(),
                    file,
                },
            ];
            let layout = plan(members, &tensors, &ZipOptions { align, ..opts() }).unwrap();
            let zip = materialise(&layout, &tensors);
            let (entries, _) = read_zip(&zip);
            let w = &entries[1];
            assert_eq!(
                w.data_offset % u64::from(align),
                0,
                "align {align} after {pre}"
            );
            assert!(w.local_extra.is_empty() || w.local_extra.len() >= 6);
            assert!(w.local_extra.len() < usize::from(align) + 6);
            assert_eq!(&zip[w.data_offset as usize..][..3], &[5, 5, 5]);
            assert_eq!(w.crc, crc32fast::hash(&[5, 5, 5]));
        }
    }
}

#[test]
fn past_the_zip64_limit_sizes_and_offsets_move_to_zip64_fields() {
    // Planned only, never materialised: 5 GiB of zeros with a few bytes at the end.
    let len = 5u64 << 30;
    let tail = b"end of a big file".to_vec();
    let big = PlannedFile {
        len,
        regions: vec![Region {
            offset: len - tail.len() as u64,
            bytes: tail.clone(),
        }],
        slots: vec![],
    };
    let small = PlannedFile {
        len: 10,
        regions: vec![Region {
            offset: 0,
            bytes: b"0123456789".to_vec(),
        }],
        slots: vec![],
    };
    let members = vec![
        Member::Bytes {
            name: "config.json".into(),
            data: b"{}".to_vec(),
        },
        Member::Planned {
            name: "model.weights.h5".into(),
            file: big,
        },
        Member::Bytes {
            name: "after".into(),
            data: b"xyz".to_vec(),
        },
        Member::Planned {
            name: "after.h5".into(),
            file: small,
        },
    ];
    let layout = plan(
        members,
        &[],
        &ZipOptions {
            align: 4096,
            ..opts()
        },
    )
    .unwrap();
    assert!(layout.is_zip64());
    let regions = layout.regions(&[]).unwrap();
    let cd = regions.last().unwrap();
    assert_eq!(cd.offset + cd.bytes.len() as u64, layout.file_len());

    // Central directory fields, from the region itself.
    let b = &cd.bytes;
    let mut at = 0usize;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let n = u16_at(b, at + 28) as usize;
        let m = u16_at(b, at + 30) as usize;
        let name = String::from_utf8(b[at + 46..at + 46 + n].to_vec()).unwrap();
        let extra = b[at + 46 + n..at + 46 + n + m].to_vec();
        seen.push((
            name,
            u16_at(b, at + 6),
            u32_at(b, at + 16),
            u32_at(b, at + 24),
            u32_at(b, at + 42),
            extra,
        ));
        at += 46 + n + m;
    }
    let offsets: Vec<u64> = layout.data_offsets();
    // config.json: nothing zip64
    assert_eq!(
        (seen[0].1, seen[0].3, seen[0].4, seen[0].5.len()),
        (20, 2, 0, 0)
    );
    // the big member: both sizes in zip64, offset still small
    let big_crc = crc32_combine_zeros_then(len - tail.len() as u64, &tail);
    assert_eq!((seen[1].1, seen[1].2, seen[1].3), (45, big_crc, u32::MAX));
    assert_eq!(seen[1].5.len(), 4 + 16);
    assert_eq!((u16_at(&seen[1].5, 0), u16_at(&seen[1].5, 2)), (1, 16));
    assert_eq!((u64_at(&seen[1].5, 4), u64_at(&seen[1].5, 12)), (len, len));
    // the members after it: real sizes, offset in zip64
    for (i, size) in [(2usize, 3u64), (3, 10)] {
        let header_offset = if i == 2 {
            offsets[1] + len
        } else {
            offsets[2] + 3
        };
        assert_eq!(
            (seen[i].1, u64::from(seen[i].3), seen[i].4),
            (45, size, u32::MAX)
        );
        assert_eq!(seen[i].5.len(), 12);
        assert_eq!((u16_at(&seen[i].5, 0), u16_at(&seen[i].5, 2)), (1, 8));
        assert_eq!(u64_at(&seen[i].5, 4), header_offset, "{}", seen[i].0);
    }
    assert_eq!(seen[3].2, crc32fast::hash(b"0123456789"));
    // big member's local header: zip64 sizes, then alignment padding
    let lh = regions.iter().find(|r| r.offset == offsets[0] + 2).unwrap();
    assert_eq!(u32_at(&lh.bytes, 0), 0x0403_4b50);
    assert_eq!((u16_at(&lh.bytes, 4), u32_at(&lh.bytes, 14)), (45, big_crc));
    assert_eq!(
        (u32_at(&lh.bytes, 18), u32_at(&lh.bytes, 22)),
        (u32::MAX, u32::MAX)
    );
    let extra = &lh.bytes[30 + 16..];
    assert_eq!(&extra[..4], &[1, 0, 16, 0]);
    assert_eq!((u64_at(extra, 4), u64_at(extra, 12)), (len, len));
    assert_eq!(u16_at(extra, 20), 0xd935);
    assert_eq!(offsets[1] % 4096, 0);
    assert_eq!(lh.offset + lh.bytes.len() as u64, offsets[1]);
    // end records: zip64 record, locator, end record with clamped values
    let end = &b[at..];
    assert_eq!(end.len(), 56 + 20 + 22);
    assert_eq!(u32_at(end, 0), 0x0606_4b50);
    assert_eq!((u16_at(end, 12), u16_at(end, 14)), (45, 45));
    assert_eq!((u64_at(end, 24), u64_at(end, 32)), (4, 4));
    assert_eq!(u64_at(end, 40), at as u64);
    assert_eq!(u64_at(end, 48), cd.offset);
    assert_eq!(u32_at(end, 56), 0x0706_4b50);
    assert_eq!(u64_at(end, 64), cd.offset + at as u64);
    assert_eq!(u32_at(end, 72), 1);
    assert_eq!(u32_at(end, 76), 0x0605_4b50);
    assert_eq!((u16_at(end, 84), u16_at(end, 86)), (4, 4));
    assert_eq!(u32_at(end, 88) as usize, at);
    assert_eq!(
        u32_at(end, 92),
        u32::MAX,
        "offset past 4 GiB clamps, as zipfile writes it"
    );
}

/// CRC of `zeros` zero bytes followed by `tail`, by hashing in 1 MiB steps of a checked
/// zero CRC: slow but independent of the member CRC plan.
fn crc32_combine_zeros_then(zeros: u64, tail: &[u8]) -> u32 {
    let block = vec![0u8; 1 << 20];
    let block_crc = crc32fast::hash(&block);
    let mut h = crc32fast::Hasher::new();
    let mut left = zeros;
    while left >= block.len() as u64 {
        h.combine(&crc32fast::Hasher::new_with_initial_len(
            block_crc,
            block.len() as u64,
        ));
        left -= block.len() as u64;
    }
    h.update(&block[..left as usize]);
    h.update(tail);
    h.finalize()
}

#[test]
fn many_entries_need_the_zip64_end_records() {
    for (count, zip64) in [
        (ZIP64_COUNT_LIMIT - 1, false),
        (ZIP64_COUNT_LIMIT, true),
        (70_000, true),
    ] {
        let members = (0..count)
            .map(|i| Member::Bytes {
                name: format!("assets/{i}"),
                data: vec![],
            })
            .collect();
        let layout = plan(members, &[], &opts()).unwrap();
        assert_eq!(layout.is_zip64(), zip64, "{count}");
        let zip = materialise(&layout, &[]);
        let (entries, found) = read_zip(&zip);
        assert_eq!((entries.len() as u64, found), (count, zip64));
        let end = &zip[zip.len() - 22..];
        assert_eq!(u16_at(end, 10), count.min(0xFFFF) as u16);
    }
}

#[test]
fn bad_names_and_bad_files_are_refused_naming_the_member() {
    let cases: Vec<(Vec<Member>, &str)> = vec![
        (
            vec![Member::Bytes {
                name: String::new(),
                data: vec![],
            }],
            "\"\": empty name",
        ),
        (
            vec![Member::Bytes {
                name: "/etc/passwd".into(),
                data: vec![],
            }],
            "\"/etc/passwd\": absolute",
        ),
        (
            vec![Member::Bytes {
                name: "C:/x".into(),
                data: vec![],
            }],
            "\"C:/x\": absolute",
        ),
        (
            vec![Member::Bytes {
                name: "a/../../b".into(),
                data: vec![],
            }],
            "\"a/../../b\": '..'",
        ),
        (
            vec![Member::Bytes {
                name: "..".into(),
                data: vec![],
            }],
            "\"..\": '..'",
        ),
        (
            vec![Member::Bytes {
                name: "a\\b".into(),
                data: vec![],
            }],
            "backslash",
        ),
        (
            vec![Member::Bytes {
                name: "assets/".into(),
                data: vec![],
            }],
            "\"assets/\": names a folder",
        ),
        (
            vec![Member::Bytes {
                name: "a\0".into(),
                data: vec![],
            }],
            "NUL",
        ),
        (
            vec![Member::Bytes {
                name: "x".repeat(70_000),
                data: vec![],
            }],
            "longer than 65,535",
        ),
        (
            vec![
                Member::Bytes {
                    name: "config.json".into(),
                    data: vec![],
                },
                Member::Planned {
                    name: "config.json".into(),
                    file: PlannedFile::default(),
                },
            ],
            "\"config.json\" appears twice",
        ),
        (
            vec![Member::Planned {
                name: "model.weights.h5".into(),
                file: PlannedFile {
                    len: 4,
                    regions: vec![Region {
                        offset: 2,
                        bytes: vec![1; 4],
                    }],
                    slots: vec![],
                },
            }],
            "\"model.weights.h5\": metadata at 2 + 4 lies past the file's end 4",
        ),
        (
            vec![Member::Planned {
                name: "w.h5".into(),
                file: PlannedFile {
                    len: 4,
                    regions: vec![],
                    slots: vec![Slot {
                        offset: 0,
                        tensor: 9,
                    }],
                },
            }],
            "\"w.h5\": slot 0 names tensor 9 of 0",
        ),
        (
            vec![Member::Planned {
                name: "w.h5".into(),
                file: PlannedFile {
                    len: u64::MAX,
                    regions: vec![],
                    slots: vec![],
                },
            }],
            "\"w.h5\": the zip passes 2^64 bytes",
        ),
    ];
    for (members, want) in cases {
        let err = plan(members, &[], &opts()).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
    for align in [0u16, 3, 48] {
        let err = plan(vec![], &[], &ZipOptions { align, ..opts() })
            .unwrap_err()
            .to_string();
        assert!(err.contains("power of two"), "{err}");
    }
    // names that look odd but are fine
    for name in ["a:b", "./x", "assets/..x", "\u{1f600}.json"] {
        plan(
            vec![Member::Bytes {
                name: name.into(),
                data: vec![],
            }],
            &[],
            &opts(),
        )
        .unwrap();
    }
}

#[test]
fn empty_zip_is_just_an_end_record() {
    let layout = plan(vec![], &[], &opts()).unwrap();
    let zip = materialise(&layout, &[]);
    assert_eq!(zip.len(), 22);
    assert_eq!(read_zip(&zip).0.len(), 0);
}

#[test]
fn regions_refuse_a_wrong_number_of_crcs() {
    let (file, tensors) = weights_file();
    let layout = plan(keras_members(file), &tensors, &opts()).unwrap();
    let err = layout.regions(&[1, 2]).unwrap_err().to_string();
    assert!(err.contains("2 payload CRCs for 3 slots"), "{err}");
}
