//! The `.keras` zip: members stored uncompressed, planned in one pass, written in one pass.
//!
//! A member is either small bytes known in full (`metadata.json`, `config.json`, assets) or a
//! [`PlannedFile`] embedded in place (the HDF5 weights file): its payload slots become the
//! zip's slots, so the weights are written once, straight into the zip, with no copy of the
//! weights file in memory. Sizes are known at plan time, so there are no data descriptors;
//! the CRC-32 of an embedded file is combined from the CRCs the writer computes over each
//! payload (see `member_crc`), and the headers that hold it are written after the payloads.
//!
//! Layout: `[local header, data]` per member in the order given, then the central directory,
//! then the zip64 end record and locator when needed, then the end record. Each embedded
//! file's data starts at a multiple of [`ZipOptions::align`] (the padding is an extra field of
//! its local header, id 0xd935 as Android's apksigner writes it; readers skip it), so offsets
//! aligned inside the HDF5 file stay aligned in the zip.

mod member_crc;
mod records;

use std::collections::HashSet;

use member_crc::MemberCrc;
pub use records::{DosDateTime, ZIP64_COUNT_LIMIT, ZIP64_LIMIT};
use records::{EntryRecord, ALIGN_EXTRA_MIN};

use crate::error::{Error, Result};
use crate::layout::{align_up, Digest, Layout, PlannedFile, Region, Slot};
use crate::tensor::Tensor;

/// Where embedded files start by default: a page, so a reader can map weights in place.
pub const DEFAULT_ALIGN: u16 = 4096;
/// The largest alignment: its padding must fit a 16-bit extra field length.
pub const MAX_ALIGN: u16 = 1 << 15;

/// One zip member, written in the order given.
#[derive(Clone, Debug)]
pub enum Member {
    /// A small member known in full (`metadata.json`, `config.json`, `assets/...`).
    Bytes { name: String, data: Vec<u8> },
    /// A planned file (`model.weights.h5`) embedded without an in-memory copy of its
    /// payloads. Offsets are relative to the file's own start; slots index the tensor list
    /// handed to [`plan`] and to the writer.
    Planned { name: String, file: PlannedFile },
}

impl Member {
    pub fn name(&self) -> &str {
        match self {
            Member::Bytes { name, .. } | Member::Planned { name, .. } => name,
        }
    }
}

/// How the zip is stamped and aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZipOptions {
    /// Modification time of every member. [`ZipOptions::default`] takes the current local
    /// time, as `zipfile.writestr` does; tests pass a fixed one.
    pub modified: DosDateTime,
    /// Data of each [`Member::Planned`] starts at a multiple of this (a power of two, at most
    /// [`MAX_ALIGN`]; 1 turns alignment off).
    pub align: u16,
}

impl Default for ZipOptions {
    fn default() -> Self {
        ZipOptions {
            modified: DosDateTime::now(),
            align: DEFAULT_ALIGN,
        }
    }
}

#[derive(Debug)]
enum EntryCrc {
    Known,
    Planned(MemberCrc),
}

#[derive(Debug)]
struct Entry {
    record: EntryRecord,
    crc: EntryCrc,
}

/// A planned zip. Its digest is CRC-32: the writer sums every payload as it writes it, and
/// [`Layout::regions`] turns those sums into the embedded files' CRCs.
#[derive(Debug)]
pub struct ZipLayout {
    entries: Vec<Entry>,
    /// Regions known at plan time: whole byte members and the embedded files' metadata.
    fixed: Vec<Region>,
    slots: Vec<Slot>,
    cd_offset: u64,
    cd_len: u64,
    file_len: u64,
}

/// Plans a zip of `members`, in order. `tensors` is the list the writer will get: the
/// embedded files' slots index it, and their payload lengths place the CRC runs.
///
/// Fails, naming the member, on an empty, absolute, `..`-climbing, backslashed, folder
/// (trailing `/`), NUL-holding or over-long name, on a name given twice, and on an embedded
/// file whose regions and payloads overlap or leave it.
pub fn plan(members: Vec<Member>, tensors: &[Tensor], opts: &ZipOptions) -> Result<ZipLayout> {
    if opts.align == 0 || !opts.align.is_power_of_two() || opts.align > MAX_ALIGN {
        return Err(Error::invalid(format!(
            "zip alignment must be a power of two from 1 to {MAX_ALIGN}, got {}",
            opts.align
        )));
    }
    let mut seen = HashSet::new();
    for m in &members {
        check_name(m.name())?;
        if !seen.insert(m.name()) {
            return Err(Error::invalid(format!(
                "zip member {:?} appears twice",
                m.name()
            )));
        }
    }
    let too_large =
        |name: &str| Error::invalid(format!("zip member {name:?}: the zip passes 2^64 bytes"));
    let mut entries = Vec::with_capacity(members.len());
    let mut fixed = Vec::new();
    let mut slots = Vec::new();
    let mut at = 0u64;
    for m in members {
        match m {
            Member::Bytes { name, data } => {
                let record = EntryRecord {
                    crc: crc32fast::hash(&data),
                    size: data.len() as u64,
                    header_offset: at,
                    modified: opts.modified,
                    align_pad: 0,
                    align: opts.align,
                    name,
                };
                let mut bytes = record.local_header();
                bytes.extend_from_slice(&data);
                at = at
                    .checked_add(bytes.len() as u64)
                    .ok_or_else(|| too_large(&record.name))?;
                fixed.push(Region {
                    offset: record.header_offset,
                    bytes,
                });
                entries.push(Entry {
                    record,
                    crc: EntryCrc::Known,
                });
            }
            Member::Planned { name, file } => {
                let crc = MemberCrc::plan(&file, tensors, slots.len())
                    .map_err(|reason| Error::invalid(format!("zip member {name:?}: {reason}")))?;
                let header_len = records::local_len(name.len(), file.len, 0);
                let align_pad = align_pad(at + header_len, u64::from(opts.align));
                let data_offset = at + header_len + align_pad;
                let end = data_offset
                    .checked_add(file.len)
                    .ok_or_else(|| too_large(&name))?;
                let shifted = file.shifted(data_offset);
                fixed.extend(shifted.regions);
                slots.extend(shifted.slots);
                entries.push(Entry {
                    record: EntryRecord {
                        name,
                        size: shifted.len,
                        crc: 0,
                        header_offset: at,
                        modified: opts.modified,
                        align_pad,
                        align: opts.align,
                    },
                    crc: EntryCrc::Planned(crc),
                });
                at = end;
            }
        }
    }
    let cd_offset = at;
    let cd_len: u64 = entries.iter().map(|e| e.record.central_len()).sum();
    let count = entries.len() as u64;
    let file_len = cd_offset + cd_len + records::end_records_len(count, cd_offset, cd_len);
    Ok(ZipLayout {
        entries,
        fixed,
        slots,
        cd_offset,
        cd_len,
        file_len,
    })
}

/// Bytes of alignment extra field that move data from `data_at` to a multiple of `align`:
/// none when already aligned, else at least the field's own 6 bytes.
fn align_pad(data_at: u64, align: u64) -> u64 {
    let mut pad = align_up(data_at, align) - data_at;
    while pad != 0 && pad < ALIGN_EXTRA_MIN {
        pad += align;
    }
    pad
}

/// Refuses names fastckpt never writes and extractors would misplace.
fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid(format!("zip member {name:?}: {why}")));
    if name.is_empty() {
        return bad("empty name");
    }
    if name.len() > usize::from(u16::MAX) {
        return bad("name longer than 65,535 bytes");
    }
    let b = name.as_bytes();
    let drive = b.len() >= 2
        && b[0].is_ascii_alphabetic()
        && b[1] == b':'
        && b.get(2).is_none_or(|&c| c == b'/');
    if name.starts_with('/') || drive {
        return bad("absolute path");
    }
    if name.contains('\\') {
        return bad("backslash in name (zip paths use '/')");
    }
    if name.contains('\0') {
        return bad("NUL in name");
    }
    if name.ends_with('/') {
        return bad("names a folder");
    }
    if name.split('/').any(|c| c == "..") {
        return bad("'..' component");
    }
    Ok(())
}

#[cfg(test)]
mod tests;

impl ZipLayout {
    /// Where each member's data starts, in member order.
    pub fn data_offsets(&self) -> Vec<u64> {
        self.entries
            .iter()
            .map(|e| e.record.header_offset + e.record.local_len())
            .collect()
    }

    /// Whether the zip carries the zip64 end records.
    pub fn is_zip64(&self) -> bool {
        records::needs_zip64_end(self.entries.len() as u64, self.cd_offset, self.cd_len)
    }
}

impl Layout for ZipLayout {
    fn file_len(&self) -> u64 {
        self.file_len
    }

    fn slots(&self) -> &[Slot] {
        &self.slots
    }

    fn digest(&self) -> Digest {
        Digest::Crc32
    }

    fn regions(&self, digests: &[u32]) -> Result<Vec<Region>> {
        if digests.len() != self.slots.len() {
            return Err(Error::invalid(format!(
                "zip: {} payload CRCs for {} slots",
                digests.len(),
                self.slots.len()
            )));
        }
        let mut regions = self.fixed.clone();
        let mut cd = Vec::with_capacity((self.file_len - self.cd_offset) as usize);
        for e in &self.entries {
            match &e.crc {
                EntryCrc::Known => e.record.central_header(&mut cd),
                EntryCrc::Planned(plan) => {
                    let record = EntryRecord {
                        crc: plan.finish(digests),
                        ..e.record.clone()
                    };
                    regions.push(Region {
                        offset: record.header_offset,
                        bytes: record.local_header(),
                    });
                    record.central_header(&mut cd);
                }
            }
        }
        debug_assert_eq!(cd.len() as u64, self.cd_len);
        records::end_records(
            self.entries.len() as u64,
            self.cd_offset,
            self.cd_len,
            &mut cd,
        );
        debug_assert_eq!(self.cd_offset + cd.len() as u64, self.file_len);
        regions.push(Region {
            offset: self.cd_offset,
            bytes: cd,
        });
        Ok(regions)
    }
}
