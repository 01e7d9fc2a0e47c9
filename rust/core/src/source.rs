//! Payloads read from another file while a file is written: a conversion copies a
//! checkpoint piece by piece, so memory holds a few pieces, never the whole checkpoint.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::format::zstd_decode;
use crate::tensor::Payload;

/// A file payloads are read from, opened once for all of them.
#[derive(Debug)]
pub struct SourceFile {
    path: PathBuf,
    file: File,
    len: u64,
}

impl SourceFile {
    pub fn open(path: &Path) -> Result<Arc<SourceFile>> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        Ok(Arc::new(SourceFile {
            path: path.to_path_buf(),
            file,
            len,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that `[offset, offset + len)` lies inside the file.
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "{len} bytes at offset {offset} lie past the end of the file ({} bytes)",
                    self.len
                ),
            ));
        }
        Ok(())
    }

    fn read_exact_at(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        self.file
            .read_exact_at(out, offset)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", self.path.display())))
    }
}

/// `len` bytes at `offset` of a source file: a payload stored as it is (SafeTensors, a
/// contiguous HDF5 dataset, a stored zip member's dataset).
pub struct FileRange {
    file: Arc<SourceFile>,
    offset: u64,
    len: u64,
}

impl FileRange {
    pub fn new(file: Arc<SourceFile>, offset: u64, len: u64) -> Result<FileRange> {
        file.check_range(offset, len)?;
        Ok(FileRange { file, offset, len })
    }
}

impl Payload for FileRange {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, self.offset + start)
    }
}

/// A payload stored as one zstd frame of a source file. The frame is decoded when its
/// first piece is asked for and dropped once every byte has been handed out: the writer
/// takes a tensor's pieces in order, so a few decoded tensors are held at a time (one per
/// writer thread at most).
pub struct ZstdFrame {
    file: Arc<SourceFile>,
    offset: u64,
    stored: u64,
    len: u64,
    decoded: Mutex<Decoded>,
}

#[derive(Default)]
struct Decoded {
    bytes: Option<Vec<u8>>,
    served: u64,
}

impl ZstdFrame {
    /// The frame of `stored` bytes at `offset`, which decodes to `len` bytes.
    pub fn new(file: Arc<SourceFile>, offset: u64, stored: u64, len: u64) -> Result<ZstdFrame> {
        file.check_range(offset, stored)?;
        Ok(ZstdFrame {
            file,
            offset,
            stored,
            len,
            decoded: Mutex::new(Decoded::default()),
        })
    }

    fn decode(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len as usize);
        zstd_decode::stream_frame(&self.file.file, self.offset, self.stored, self.len, |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: the zstd frame at offset {}: {e}",
                    self.file.path.display(),
                    self.offset
                ),
            )
        })?;
        Ok(out)
    }
}

impl Payload for ZstdFrame {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        let mut state = self.decoded.lock().unwrap();
        if state.bytes.is_none() {
            state.bytes = Some(self.decode()?);
        }
        let bytes = state.bytes.as_ref().expect("decoded just above");
        let start = start as usize;
        out.copy_from_slice(&bytes[start..start + out.len()]);
        state.served += out.len() as u64;
        if state.served >= self.len {
            // Every byte went out: a later read (none in a write) decodes it again.
            *state = Decoded::default();
        }
        Ok(())
    }
}
