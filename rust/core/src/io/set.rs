//! Several files that commit together: a sharded checkpoint's shards and its index, a
//! backup's weights and its metadata, one process's part of a multi-host checkpoint.
//!
//! Every file is written to a temp file beside its target and fdatasync'd first; only then
//! is anything renamed. The members are renamed in the order given and their folders
//! fsync'd, and only after that is the last file (the set's commit record, which names the
//! others) renamed and its folder fsync'd: a reader that finds the new record finds every
//! file it names complete and durable. A failure before the first rename leaves every
//! target as it was and no temp file behind.
//!
//! Members keep their own names, so a process killed between two member renames leaves
//! the members it renamed new and the others old, under the old record: sets whose readers
//! must never see such a mix give each write of a member a new name (the record says
//! which).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::commit::{
    check_layout, folder_of, fsync_folder, replace, reusable, write_temp, WriteOptions,
};
use super::temp::{sweep_stale_temps, temp_path_for};
use crate::error::Result;
use crate::layout::Layout;
use crate::tensor::Tensor;

/// One file of a set.
pub struct SetFile<'a> {
    pub target: &'a Path,
    pub layout: &'a dyn Layout,
    pub tensors: &'a [Tensor],
}

/// What [`write_set`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetWritten {
    /// Each file's length, in order.
    pub lens: Vec<u64>,
    /// The file the first file replaced, kept (`WriteOptions::keep_replaced`).
    pub kept: Option<PathBuf>,
}

/// Writes the files of a set and commits them, the last one last (see the module's
/// documentation). `opts.reuse` and `opts.keep_replaced` apply to the first file (the
/// large one of a backup); `opts.previous_suffix` to every file.
pub fn write_set(files: &[SetFile<'_>], opts: &WriteOptions) -> Result<SetWritten> {
    let Some((record, members)) = files.split_last() else {
        return Ok(SetWritten {
            lens: Vec::new(),
            kept: None,
        });
    };
    let mut folders = Vec::with_capacity(files.len());
    for f in files {
        check_layout(f.layout, f.tensors)?;
        folders.push(folder_of(f.target)?);
    }
    let distinct: BTreeSet<&PathBuf> = folders.iter().collect();
    for dir in &distinct {
        sweep_stale_temps(dir);
    }
    let reused = opts.reuse.as_deref().filter(|p| reusable(p, &folders[0]));
    let temps: Vec<PathBuf> = files
        .iter()
        .enumerate()
        .map(|(i, f)| match reused {
            Some(p) if i == 0 => p.to_path_buf(),
            _ => temp_path_for(f.target),
        })
        .collect();
    let remove_temps = |from: usize| {
        for temp in &temps[from..] {
            let _ = std::fs::remove_file(temp);
        }
    };
    let mut lens = Vec::with_capacity(files.len());
    for (i, (f, temp)) in files.iter().zip(&temps).enumerate() {
        match write_temp(
            temp,
            f.target,
            f.layout,
            f.tensors,
            opts,
            i == 0 && reused.is_some(),
        ) {
            Ok(len) => lens.push(len),
            Err(e) => {
                remove_temps(0);
                return Err(e);
            }
        }
    }
    let suffix = opts.previous_suffix.as_deref();
    let mut kept = None;
    for (i, (f, temp)) in members.iter().zip(&temps).enumerate() {
        match replace(temp, f.target, i == 0 && opts.keep_replaced, suffix) {
            Ok(k) => kept = kept.or(k),
            Err(e) => {
                remove_temps(i);
                return Err(e);
            }
        }
    }
    let member_folders: BTreeSet<&PathBuf> = folders[..members.len()].iter().collect();
    for dir in member_folders {
        if let Err(e) = fsync_folder(dir) {
            remove_temps(members.len());
            return Err(e);
        }
    }
    let last = temps.len() - 1;
    match replace(
        &temps[last],
        record.target,
        last == 0 && opts.keep_replaced,
        suffix,
    ) {
        Ok(k) => kept = kept.or(k),
        Err(e) => {
            remove_temps(last);
            return Err(e);
        }
    }
    fsync_folder(&folders[last])?;
    Ok(SetWritten { lens, kept })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{PlannedFile, Region};

    fn bytes_file(data: &[u8]) -> PlannedFile {
        PlannedFile {
            len: data.len() as u64,
            regions: vec![Region {
                offset: 0,
                bytes: data.to_vec(),
            }],
            slots: Vec::new(),
        }
    }

    /// The set of files `targets[i]` holding `layouts[i]`, without tensors.
    fn set_of<'a>(targets: &[&'a PathBuf], layouts: &'a [PlannedFile]) -> Vec<SetFile<'a>> {
        targets
            .iter()
            .zip(layouts)
            .map(|(t, l)| SetFile {
                target: t,
                layout: l,
                tensors: &[],
            })
            .collect()
    }

    #[test]
    fn every_file_lands_and_no_temp_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, index) = (
            dir.path().join("a.bin"),
            dir.path().join("b.bin"),
            dir.path().join("index.json"),
        );
        let layouts = [bytes_file(b"AAAA"), bytes_file(b"BB"), bytes_file(b"{}")];
        let files = set_of(&[&a, &b, &index], &layouts);
        let lens = write_set(&files, &WriteOptions::with_threads(2))
            .unwrap()
            .lens;
        assert_eq!(lens, vec![4, 2, 2]);
        assert_eq!(std::fs::read(&a).unwrap(), b"AAAA");
        assert_eq!(std::fs::read(&index).unwrap(), b"{}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 3, "only the three targets");
    }

    #[test]
    fn a_member_that_cannot_be_written_leaves_every_target_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (a, index) = (dir.path().join("a.bin"), dir.path().join("index.json"));
        std::fs::write(&a, b"old a").unwrap();
        std::fs::write(&index, b"old index").unwrap();
        let missing = dir.path().join("no-such-folder").join("b.bin");
        let layouts = [
            bytes_file(b"new a"),
            bytes_file(b"new b"),
            bytes_file(b"new"),
        ];
        let files = set_of(&[&a, &missing, &index], &layouts);
        let err = write_set(&files, &WriteOptions::with_threads(1)).unwrap_err();
        assert!(err.to_string().contains("no folder"), "{err}");
        assert_eq!(std::fs::read(&a).unwrap(), b"old a");
        assert_eq!(std::fs::read(&index).unwrap(), b"old index");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn the_previous_versions_are_kept_under_the_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let (w, meta) = (dir.path().join("w.bin"), dir.path().join("m.json"));
        let write = |a: &[u8], b: &[u8]| {
            let layouts = [bytes_file(a), bytes_file(b)];
            let files = set_of(&[&w, &meta], &layouts);
            let opts = WriteOptions {
                previous_suffix: Some(".bkp".into()),
                ..WriteOptions::with_threads(1)
            };
            write_set(&files, &opts).unwrap()
        };
        write(b"w1", b"m1");
        assert!(
            !dir.path().join("w.bin.bkp").exists(),
            "nothing to keep the first time"
        );
        write(b"w2", b"m2");
        write(b"w3", b"m3");
        assert_eq!(std::fs::read(&w).unwrap(), b"w3");
        assert_eq!(std::fs::read(dir.path().join("w.bin.bkp")).unwrap(), b"w2");
        assert_eq!(std::fs::read(dir.path().join("m.json.bkp")).unwrap(), b"m2");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            4,
            "no temp left"
        );
        // The previous version restored as the current one (a second name of one file,
        // as `BackupAndRestore` does after a damaged backup): the next write keeps it.
        for (current, previous) in [(&w, "w.bin.bkp"), (&meta, "m.json.bkp")] {
            std::fs::remove_file(current).unwrap();
            std::fs::hard_link(dir.path().join(previous), current).unwrap();
        }
        write(b"w4", b"m4");
        assert_eq!(std::fs::read(&w).unwrap(), b"w4");
        assert_eq!(std::fs::read(dir.path().join("w.bin.bkp")).unwrap(), b"w2");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            4,
            "no temp left"
        );
    }
}
