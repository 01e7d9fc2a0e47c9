//! The byte records of a zip file (APPNOTE 6.3.x): local file header, central directory
//! header, zip64 end of central directory record and locator, end of central directory.
//!
//! Field choices follow CPython's `zipfile`, which wrote every `.keras` file that exists:
//! version 2.0 (4.5 with zip64), Unix as the creating system, `?rw-------` permissions,
//! zip64 fields exactly when a value passes [`ZIP64_LIMIT`].

use crate::error::{Error, Result};

/// A 32-bit size or offset above this is stored in a zip64 field instead. This is CPython's
/// `zipfile.ZIP64_LIMIT` (2 GiB - 1, not the format's 4 GiB - 2): readers that treat the
/// 32-bit fields as signed keep working, and files between 2 and 4 GiB come out as Keras
/// itself writes them.
pub const ZIP64_LIMIT: u64 = (1 << 31) - 1;
/// An entry count at or above this needs the zip64 end records (0xFFFF is the marker that
/// sends readers to them).
pub const ZIP64_COUNT_LIMIT: u64 = 0xFFFF;

pub(super) const LOCAL_SIG: u32 = 0x0403_4b50;
pub(super) const CENTRAL_SIG: u32 = 0x0201_4b50;
pub(super) const ZIP64_END_SIG: u32 = 0x0606_4b50;
pub(super) const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
pub(super) const END_SIG: u32 = 0x0605_4b50;

pub(super) const LOCAL_FIXED: u64 = 30;
pub(super) const CENTRAL_FIXED: u64 = 46;
pub(super) const ZIP64_END_LEN: u64 = 56;
pub(super) const ZIP64_LOCATOR_LEN: u64 = 20;
pub(super) const END_LEN: u64 = 22;

const VERSION: u16 = 20;
const VERSION_ZIP64: u16 = 45;
/// "Version made by", high byte: 3 = Unix, so `external_attr` holds a mode.
const MADE_BY_UNIX: u16 = 3 << 8;
/// `S_IFREG`-less `0o600`, as `zipfile.writestr` and `ZipFile.open(name, "w")` store it.
const EXTERNAL_ATTR: u32 = 0o600 << 16;
/// General purpose flag bit 11: the name is UTF-8.
pub(super) const FLAG_UTF8: u16 = 1 << 11;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// The extra field Android's apksigner pads with: a u16 alignment, then zeros.
pub(super) const ALIGN_EXTRA_ID: u16 = 0xd935;
/// Header and alignment value: the smallest alignment extra field.
pub(super) const ALIGN_EXTRA_MIN: u64 = 6;
/// The local header's zip64 field: id, length, uncompressed and compressed sizes.
pub(super) const LOCAL_ZIP64_EXTRA: u64 = 20;

/// An MS-DOS date and time, as zip stores modification times (local time, 2-second steps,
/// years 1980 to 2107).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DosDateTime {
    date: u16,
    time: u16,
}

impl DosDateTime {
    /// 1980-01-01 00:00:00, the earliest time zip can store (and what `zipfile.ZipInfo`
    /// defaults to).
    pub const EPOCH: DosDateTime = DosDateTime {
        date: (1 << 5) | 1,
        time: 0,
    };

    /// A checked date and time; odd seconds round down, as zip stores 2-second steps.
    pub fn new(year: u16, month: u8, day: u8, hour: u8, minute: u8, second: u8) -> Result<Self> {
        let ok = (1980..=2107).contains(&year)
            && (1..=12).contains(&month)
            && (1..=31).contains(&day)
            && hour < 24
            && minute < 60
            && second < 60;
        if !ok {
            return Err(Error::invalid(format!(
                "zip cannot store the time {year:04}-{month:02}-{day:02} \
                 {hour:02}:{minute:02}:{second:02} (years 1980 to 2107)"
            )));
        }
        Ok(DosDateTime {
            date: ((year - 1980) << 9) | (u16::from(month) << 5) | u16::from(day),
            time: (u16::from(hour) << 11) | (u16::from(minute) << 5) | u16::from(second / 2),
        })
    }

    /// The current local time, as `zipfile.writestr` stamps members; clamped into the range
    /// zip can store, as `zipfile` does with `strict_timestamps=False`.
    pub fn now() -> DosDateTime {
        // SAFETY: `time` with a null pointer and `localtime_r` into a zeroed `tm` we own.
        let tm = unsafe {
            let t = libc::time(std::ptr::null_mut());
            let mut tm: libc::tm = std::mem::zeroed();
            if libc::localtime_r(&t, &mut tm).is_null() {
                return DosDateTime::EPOCH;
            }
            tm
        };
        let year = tm.tm_year + 1900;
        if year < 1980 {
            return DosDateTime::EPOCH;
        }
        if year > 2107 {
            return DosDateTime::new(2107, 12, 31, 23, 59, 59).expect("in range");
        }
        let field = |v: libc::c_int, max: libc::c_int| v.clamp(0, max) as u8;
        DosDateTime::new(
            year as u16,
            field(tm.tm_mon + 1, 12),
            field(tm.tm_mday, 31),
            field(tm.tm_hour, 23),
            field(tm.tm_min, 59),
            field(tm.tm_sec, 59),
        )
        .unwrap_or(DosDateTime::EPOCH)
    }

    pub fn dos_date(self) -> u16 {
        self.date
    }

    pub fn dos_time(self) -> u16 {
        self.time
    }
}

/// What the headers of one member say. Every member is stored (method 0), so its compressed
/// and uncompressed sizes are both `size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EntryRecord {
    pub name: String,
    pub size: u64,
    pub crc: u32,
    /// Offset of the local header in the zip.
    pub header_offset: u64,
    pub modified: DosDateTime,
    /// Bytes of alignment extra field in the local header: 0 or at least [`ALIGN_EXTRA_MIN`].
    pub align_pad: u64,
    /// The alignment recorded in that field.
    pub align: u16,
}

impl EntryRecord {
    fn sizes_zip64(&self) -> bool {
        self.size > ZIP64_LIMIT
    }

    fn offset_zip64(&self) -> bool {
        self.header_offset > ZIP64_LIMIT
    }

    fn version(&self) -> u16 {
        if self.sizes_zip64() || self.offset_zip64() {
            VERSION_ZIP64
        } else {
            VERSION
        }
    }

    fn flags(&self) -> u16 {
        if self.name.is_ascii() {
            0
        } else {
            FLAG_UTF8
        }
    }

    /// Length of the local header, name and extra fields included: where the data starts.
    pub fn local_len(&self) -> u64 {
        local_len(self.name.len(), self.size, self.align_pad)
    }

    fn central_zip64_fields(&self) -> Vec<u64> {
        let mut fields = Vec::new();
        if self.sizes_zip64() {
            fields.extend([self.size, self.size]);
        }
        if self.offset_zip64() {
            fields.push(self.header_offset);
        }
        fields
    }

    pub fn central_len(&self) -> u64 {
        let fields = self.central_zip64_fields().len() as u64;
        let extra = if fields > 0 { 4 + 8 * fields } else { 0 };
        CENTRAL_FIXED + self.name.len() as u64 + extra
    }

    fn size32(&self) -> u32 {
        if self.sizes_zip64() {
            u32::MAX
        } else {
            self.size as u32
        }
    }

    pub fn local_header(&self) -> Vec<u8> {
        let mut extra = Vec::new();
        if self.sizes_zip64() {
            put16(&mut extra, ZIP64_EXTRA_ID);
            put16(&mut extra, 16);
            put64(&mut extra, self.size);
            put64(&mut extra, self.size);
        }
        if self.align_pad > 0 {
            put16(&mut extra, ALIGN_EXTRA_ID);
            put16(&mut extra, (self.align_pad - 4) as u16);
            put16(&mut extra, self.align);
            extra.resize(extra.len() + (self.align_pad - ALIGN_EXTRA_MIN) as usize, 0);
        }
        let mut b = Vec::with_capacity(self.local_len() as usize);
        put32(&mut b, LOCAL_SIG);
        put16(&mut b, self.version());
        put16(&mut b, self.flags());
        put16(&mut b, 0); // stored
        put16(&mut b, self.modified.time);
        put16(&mut b, self.modified.date);
        put32(&mut b, self.crc);
        put32(&mut b, self.size32());
        put32(&mut b, self.size32());
        put16(&mut b, self.name.len() as u16);
        put16(&mut b, extra.len() as u16);
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&extra);
        debug_assert_eq!(b.len() as u64, self.local_len());
        b
    }

    pub fn central_header(&self, out: &mut Vec<u8>) {
        let fields = self.central_zip64_fields();
        let offset32 = if self.offset_zip64() {
            u32::MAX
        } else {
            self.header_offset as u32
        };
        put32(out, CENTRAL_SIG);
        put16(out, MADE_BY_UNIX | self.version());
        put16(out, self.version());
        put16(out, self.flags());
        put16(out, 0); // stored
        put16(out, self.modified.time);
        put16(out, self.modified.date);
        put32(out, self.crc);
        put32(out, self.size32());
        put32(out, self.size32());
        put16(out, self.name.len() as u16);
        put16(
            out,
            if fields.is_empty() {
                0
            } else {
                4 + 8 * fields.len() as u16
            },
        );
        put16(out, 0); // comment length
        put16(out, 0); // disk number start
        put16(out, 0); // internal attributes
        put32(out, EXTERNAL_ATTR);
        put32(out, offset32);
        out.extend_from_slice(self.name.as_bytes());
        if !fields.is_empty() {
            put16(out, ZIP64_EXTRA_ID);
            put16(out, 8 * fields.len() as u16);
            for f in fields {
                put64(out, f);
            }
        }
    }
}

/// Length of a local header for a name of `name_len` bytes, a member of `size` bytes and
/// `align_pad` bytes of alignment extra field.
pub(super) fn local_len(name_len: usize, size: u64, align_pad: u64) -> u64 {
    let zip64 = if size > ZIP64_LIMIT {
        LOCAL_ZIP64_EXTRA
    } else {
        0
    };
    LOCAL_FIXED + name_len as u64 + zip64 + align_pad
}

/// Whether the directory of `count` entries at `cd_offset`, `cd_len` bytes long, needs the
/// zip64 end records.
pub(super) fn needs_zip64_end(count: u64, cd_offset: u64, cd_len: u64) -> bool {
    count >= ZIP64_COUNT_LIMIT || cd_offset > ZIP64_LIMIT || cd_len > ZIP64_LIMIT
}

pub(super) fn end_records_len(count: u64, cd_offset: u64, cd_len: u64) -> u64 {
    if needs_zip64_end(count, cd_offset, cd_len) {
        ZIP64_END_LEN + ZIP64_LOCATOR_LEN + END_LEN
    } else {
        END_LEN
    }
}

/// The end records after a central directory of `count` entries at `cd_offset`, `cd_len`
/// bytes long: zip64 end record and locator when needed, then the end record. Values that
/// do not fit the end record are clamped there, as `zipfile` does; readers take them from
/// the zip64 record.
pub(super) fn end_records(count: u64, cd_offset: u64, cd_len: u64, out: &mut Vec<u8>) {
    if needs_zip64_end(count, cd_offset, cd_len) {
        let zip64_end_offset = cd_offset + cd_len;
        put32(out, ZIP64_END_SIG);
        put64(out, ZIP64_END_LEN - 12); // size of the rest of the record
        put16(out, VERSION_ZIP64); // made by
        put16(out, VERSION_ZIP64); // needed
        put32(out, 0); // this disk
        put32(out, 0); // disk with the directory
        put64(out, count);
        put64(out, count);
        put64(out, cd_len);
        put64(out, cd_offset);
        put32(out, ZIP64_LOCATOR_SIG);
        put32(out, 0); // disk with the zip64 end record
        put64(out, zip64_end_offset);
        put32(out, 1); // total disks
    }
    let count16 = count.min(0xFFFF) as u16;
    put32(out, END_SIG);
    put16(out, 0); // this disk
    put16(out, 0); // disk with the directory
    put16(out, count16);
    put16(out, count16);
    put32(out, cd_len.min(0xFFFF_FFFF) as u32);
    put32(out, cd_offset.min(0xFFFF_FFFF) as u32);
    put16(out, 0); // comment length
}

fn put16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, size: u64, header_offset: u64) -> EntryRecord {
        EntryRecord {
            name: name.into(),
            size,
            crc: 0x1234_5678,
            header_offset,
            modified: DosDateTime::new(2024, 2, 29, 13, 45, 31).unwrap(),
            align_pad: 0,
            align: 64,
        }
    }

    #[test]
    fn dos_times_pack_like_zipfile() {
        let t = DosDateTime::new(2024, 2, 29, 13, 45, 31).unwrap();
        assert_eq!(t.dos_date(), (44 << 9) | (2 << 5) | 29);
        assert_eq!(
            t.dos_time(),
            (13 << 11) | (45 << 5) | 15,
            "odd seconds round down"
        );
        assert_eq!(
            DosDateTime::new(1980, 1, 1, 0, 0, 0).unwrap(),
            DosDateTime::EPOCH
        );
        let last = DosDateTime::new(2107, 12, 31, 23, 59, 59).unwrap();
        assert_eq!((last.dos_date(), last.dos_time()), (0xFF9F, 0xBF7D));
        for bad in [
            (1979, 12, 31, 0, 0, 0),
            (2108, 1, 1, 0, 0, 0),
            (2000, 13, 1, 0, 0, 0),
            (2000, 1, 0, 0, 0, 0),
            (2000, 1, 1, 24, 0, 0),
            (2000, 1, 1, 0, 60, 0),
            (2000, 1, 1, 0, 0, 60),
        ] {
            let (y, mo, d, h, mi, s) = bad;
            let err = DosDateTime::new(y, mo, d, h, mi, s)
                .unwrap_err()
                .to_string();
            assert!(err.contains("zip cannot store the time"), "{err}");
        }
        let now = DosDateTime::now();
        let (month, day) = ((now.dos_date() >> 5) & 0xF, now.dos_date() & 0x1F);
        assert!((1..=12).contains(&month) && (1..=31).contains(&day));
    }

    #[test]
    fn local_header_bytes() {
        let r = record("a.txt", 5, 0);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[0x50, 0x4b, 0x03, 0x04][..], // signature
            &[20, 0],                      // version needed: 2.0
            &[0, 0],                       // flags
            &[0, 0],                       // stored
            &r.modified.dos_time().to_le_bytes(),
            &r.modified.dos_date().to_le_bytes(),
            &[0x78, 0x56, 0x34, 0x12],     // crc
            &[5, 0, 0, 0], &[5, 0, 0, 0],  // sizes
            &[5, 0], &[0, 0],              // name and extra lengths
            b"a.txt",
        ].concat();
        assert_eq!(r.local_header(), want);
        assert_eq!(r.local_len(), 35);
    }

    #[test]
    fn central_header_bytes() {
        let r = record("\u{e9}", 5, 0x1000);
        let mut got = Vec::new();
        r.central_header(&mut got);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[0x50, 0x4b, 0x01, 0x02][..], // signature
            &[20, 3],                      // made by: 2.0, Unix
            &[20, 0],                      // needed
            &[0, 8],                       // flags: UTF-8 name
            &[0, 0],                       // stored
            &r.modified.dos_time().to_le_bytes(),
            &r.modified.dos_date().to_le_bytes(),
            &[0x78, 0x56, 0x34, 0x12],
            &[5, 0, 0, 0], &[5, 0, 0, 0],
            &[2, 0], &[0, 0], &[0, 0],     // name, extra, comment lengths
            &[0, 0], &[0, 0],              // disk, internal attributes
            &[0, 0, 0x80, 0x01],           // external attributes: 0o600 << 16
            &[0, 0x10, 0, 0],              // local header offset
            "\u{e9}".as_bytes(),
        ].concat();
        assert_eq!(got, want);
        assert_eq!(r.central_len(), want.len() as u64);
    }

    #[test]
    fn zip64_fields_appear_only_for_values_past_the_limit() {
        let at_limit = record("x", ZIP64_LIMIT, ZIP64_LIMIT);
        assert_eq!(at_limit.local_len(), 31);
        assert_eq!(at_limit.central_len(), 47);
        let cases = [
            (ZIP64_LIMIT + 1, 0, vec![ZIP64_LIMIT + 1, ZIP64_LIMIT + 1]),
            (1, ZIP64_LIMIT + 1, vec![ZIP64_LIMIT + 1]),
            (5 << 30, 6 << 30, vec![5 << 30, 5 << 30, 6 << 30]),
        ];
        for (size, offset, fields) in cases {
            let r = record("x", size, offset);
            let mut cd = Vec::new();
            r.central_header(&mut cd);
            assert_eq!(&cd[6..8], &[45, 0]);
            let extra = &cd[47..];
            assert_eq!(extra.len(), 4 + 8 * fields.len());
            assert_eq!(&extra[..4], &[1, 0, 8 * fields.len() as u8, 0]);
            let got: Vec<u64> = extra[4..]
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(got, fields);
            let local = r.local_header();
            let sizes_zip64 = size > ZIP64_LIMIT;
            assert_eq!(local.len() as u64, 31 + if sizes_zip64 { 20 } else { 0 });
            assert_eq!(local[18..26] == [0xFF; 8], sizes_zip64);
        }
    }

    #[test]
    fn end_records_switch_to_zip64_past_any_limit() {
        let mut small = Vec::new();
        end_records(3, 100, 50, &mut small);
        assert_eq!(
            small,
            [&[0x50, 0x4b, 5, 6, 0, 0, 0, 0, 3, 0, 3, 0, 50, 0, 0, 0, 100, 0, 0, 0, 0, 0][..]]
                .concat()
        );
        assert_eq!(end_records_len(3, 100, 50), 22);
        for (count, offset, len) in [
            (0xFFFF, 100, 50),
            (3, ZIP64_LIMIT + 1, 50),
            (3, 100, ZIP64_LIMIT + 1),
        ] {
            let mut b = Vec::new();
            end_records(count, offset, len, &mut b);
            assert_eq!(b.len() as u64, end_records_len(count, offset, len));
            assert_eq!(b.len(), 98);
            assert_eq!(&b[..4], &ZIP64_END_SIG.to_le_bytes());
            assert_eq!(u64::from_le_bytes(b[48..56].try_into().unwrap()), offset);
            assert_eq!(&b[56..60], &ZIP64_LOCATOR_SIG.to_le_bytes());
            assert_eq!(
                u64::from_le_bytes(b[64..72].try_into().unwrap()),
                offset + len
            );
            assert_eq!(&b[76..80], &END_SIG.to_le_bytes());
        }
    }
}
