//! `AgentDir`: safe file operations beneath an agent's prefix.
//!
//! Every operation walks the validated path one component at a time from a
//! directory handle rooted at the prefix, opening each with `O_NOFOLLOW`, so
//! a symlink anywhere on the way — planted by the agent inside its sandbox —
//! is refused, never followed. Files are opened `O_NONBLOCK` (a FIFO cannot
//! block us) and must be regular files under the caller's size cap. Writes go
//! to a temporary file in the same directory, are synced, then renamed over
//! the target; appends are synced before they return. Those syncs wait for
//! the disk without stalling the calling tokio worker's other tasks
//! (`without_stalling_the_runtime`).
//!
//! This module must not resolve paths through the host filesystem by name
//! (no `std::fs::File::open(prefix.join(..))`): only through handles.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::path::{PathError, RelPath};

const DIR_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{0} does not exist")]
    NotFound(RelPath),
    #[error("{0} is a symbolic link; the platform does not follow links in agent storage")]
    Symlink(RelPath),
    #[error("{path} is not a regular file (it is a {kind})")]
    NotRegular { path: RelPath, kind: &'static str },
    #[error("{path} is {size} bytes, over the {cap}-byte limit")]
    TooLarge { path: RelPath, size: u64, cap: u64 },
    #[error("{0} already exists")]
    Exists(RelPath),
    #[error("{0} names the /data root, not a file")]
    IsRoot(RelPath),
    #[error("I/O error on {path}: {source}")]
    Io { path: RelPath, source: std::io::Error },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
}

/// Which file a read or an append met, and its length after it: whoever
/// keeps what it parsed of a file can tell, on its next read, whether the
/// file only grew since (same device and inode, at least as long) or was
/// replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
}

/// A handle on an agent's prefix. Cheap to clone (the fd is duplicated).
#[derive(Debug)]
pub struct AgentDir {
    root: OwnedFd,
    host_path: PathBuf,
}

/// Runs `wait_for_disk` (an fsync) without stalling the other tasks of the
/// calling tokio worker: on a multi-threaded runtime the worker hands them
/// to another thread first (`block_in_place`, which also simply runs it on a
/// thread outside the runtime or in `spawn_blocking`); on a current-thread
/// runtime, where `block_in_place` would panic, it just runs.
fn without_stalling_the_runtime<T>(wait_for_disk: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait_for_disk)
        }
        _ => wait_for_disk(),
    }
}

fn kind_name(file_type: FileType) -> &'static str {
    match file_type {
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice | FileType::BlockDevice => "device",
        _ => "special file",
    }
}

fn entry_kind(file_type: FileType) -> EntryKind {
    match file_type {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

impl AgentDir {
    /// Opens an existing prefix directory (itself not a symlink).
    pub fn open(host_path: &Path) -> std::io::Result<Self> {
        let root = rustix::fs::open(
            host_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { root, host_path: host_path.to_owned() })
    }

    pub fn host_path(&self) -> &Path {
        &self.host_path
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self { root: self.root.try_clone()?, host_path: self.host_path.clone() })
    }

    fn io(path: &RelPath, errno: Errno) -> FileError {
        match errno {
            Errno::NOENT => FileError::NotFound(path.clone()),
            Errno::LOOP | Errno::MLINK => FileError::Symlink(path.clone()),
            Errno::EXIST => FileError::Exists(path.clone()),
            other => FileError::Io { path: path.clone(), source: other.into() },
        }
    }

    /// Opens the directory `dir`, creating missing components if asked.
    fn open_dir(&self, dir: &RelPath, create: bool) -> Result<OwnedFd, FileError> {
        let mut current = self.root.try_clone().map_err(|e| FileError::Io { path: dir.clone(), source: e })?;
        for component in dir.components() {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let next = match rustix::fs::openat(&current, component, flags, Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&current, component, Mode::from_raw_mode(DIR_MODE)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(Self::io(dir, e)),
                    }
                    rustix::fs::openat(&current, component, flags, Mode::empty())
                }
                other => other,
            };
            current = next.map_err(|e| match e {
                // O_DIRECTORY|O_NOFOLLOW on a symlink reports ENOTDIR or ELOOP.
                Errno::NOTDIR => match self.kind_at(&current, component) {
                    Some(EntryKind::Symlink) => FileError::Symlink(dir.clone()),
                    _ => FileError::NotRegular { path: dir.clone(), kind: "file where a directory was expected" },
                },
                e => Self::io(dir, e),
            })?;
        }
        Ok(current)
    }

    fn kind_at(&self, dir: &OwnedFd, name: &str) -> Option<EntryKind> {
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| entry_kind(FileType::from_raw_mode(st.st_mode)))
    }

    fn parent_and_name<'p>(&self, path: &'p RelPath, create: bool) -> Result<(OwnedFd, &'p str), FileError> {
        let (parent, name) = path.split_last().ok_or_else(|| FileError::IsRoot(path.clone()))?;
        Ok((self.open_dir(&parent, create)?, name))
    }

    /// Opens a regular file for reading, refusing links, FIFOs and devices.
    fn open_regular(&self, path: &RelPath, cap: u64) -> Result<(File, FileStamp), FileError> {
        let (parent, name) = self.parent_and_name(path, false)?;
        let fd = rustix::fs::openat(
            &parent,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| Self::io(path, e))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| Self::io(path, e))?;
        let file_type = FileType::from_raw_mode(stat.st_mode);
        if file_type != FileType::RegularFile {
            return Err(FileError::NotRegular { path: path.clone(), kind: kind_name(file_type) });
        }
        let size = stat.st_size as u64;
        if size > cap {
            return Err(FileError::TooLarge { path: path.clone(), size, cap });
        }
        Ok((File::from(fd), FileStamp { dev: stat.st_dev, ino: stat.st_ino, len: size }))
    }

    /// Reads a whole regular file of at most `cap` bytes.
    pub fn read(&self, path: &RelPath, cap: u64) -> Result<Vec<u8>, FileError> {
        self.read_at(path, 0, cap).map(|(bytes, _)| bytes)
    }

    /// Reads a regular file of at most `cap` bytes from `offset` to its end,
    /// with the stamp of what was read (`len`: `offset` plus the bytes read,
    /// even if the file grew meanwhile). A file shorter than `offset` reads
    /// as no bytes, its stamp telling its length; a missing file is `None`.
    pub fn read_from(&self, path: &RelPath, offset: u64, cap: u64) -> Result<Option<(Vec<u8>, FileStamp)>, FileError> {
        match self.read_at(path, offset, cap) {
            Ok(read) => Ok(Some(read)),
            Err(FileError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_at(&self, path: &RelPath, offset: u64, cap: u64) -> Result<(Vec<u8>, FileStamp), FileError> {
        let (mut file, mut stamp) = self.open_regular(path, cap)?;
        if stamp.len < offset {
            return Ok((Vec::new(), stamp));
        }
        let io = |e: std::io::Error| FileError::Io { path: path.clone(), source: e };
        if offset > 0 {
            file.seek(SeekFrom::Start(offset)).map_err(io)?;
        }
        let mut bytes = Vec::with_capacity((stamp.len - offset) as usize);
        // The file may grow after fstat; never read past the cap.
        file.take(cap + 1 - offset).read_to_end(&mut bytes).map_err(io)?;
        stamp.len = offset + bytes.len() as u64;
        if stamp.len > cap {
            return Err(FileError::TooLarge { path: path.clone(), size: stamp.len, cap });
        }
        Ok((bytes, stamp))
    }

    /// Reads a regular file as UTF-8 (invalid sequences replaced).
    pub fn read_string(&self, path: &RelPath, cap: u64) -> Result<String, FileError> {
        let bytes = self.read(path, cap)?;
        Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    /// Like `read_string`, but a missing file is `None`.
    pub fn read_string_opt(&self, path: &RelPath, cap: u64) -> Result<Option<String>, FileError> {
        match self.read_string(path, cap) {
            Ok(s) => Ok(Some(s)),
            Err(FileError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces `path` atomically: temporary file, fsync, rename, fsync dir.
    /// Missing parent directories are created (never through a symlink).
    pub fn write_atomic(&self, path: &RelPath, bytes: &[u8]) -> Result<(), FileError> {
        let (parent, name) = self.parent_and_name(path, true)?;
        let temp = format!(".{}.tmp-{}", name.chars().take(100).collect::<String>(), ulid::Ulid::new());
        let io = |e: std::io::Error| FileError::Io { path: path.clone(), source: e };
        let fd = rustix::fs::openat(
            &parent,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| Self::io(path, e))?;
        let mut file = File::from(fd);
        without_stalling_the_runtime(|| {
            let written = file.write_all(bytes).and_then(|()| file.sync_all());
            if let Err(e) = written {
                let _ = rustix::fs::unlinkat(&parent, temp.as_str(), AtFlags::empty());
                return Err(io(e));
            }
            if let Err(e) = rustix::fs::renameat(&parent, temp.as_str(), &parent, name) {
                let _ = rustix::fs::unlinkat(&parent, temp.as_str(), AtFlags::empty());
                return Err(Self::io(path, e));
            }
            rustix::fs::fsync(&parent).map_err(|e| Self::io(path, e))
        })
    }

    /// Appends `bytes` to a regular file (created if missing) and syncs it.
    /// The stamp's length assumes nobody else appended meanwhile (appends to
    /// one file are serialised by their caller, as the agent lease does).
    pub fn append_sync(&self, path: &RelPath, bytes: &[u8]) -> Result<FileStamp, FileError> {
        let (parent, name) = self.parent_and_name(path, true)?;
        let fd = rustix::fs::openat(
            &parent,
            name,
            OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| match e {
            // A FIFO without a reader refuses a non-blocking writer with ENXIO.
            Errno::NXIO => FileError::NotRegular { path: path.clone(), kind: "FIFO" },
            e => Self::io(path, e),
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| Self::io(path, e))?;
        let file_type = FileType::from_raw_mode(stat.st_mode);
        if file_type != FileType::RegularFile {
            return Err(FileError::NotRegular { path: path.clone(), kind: kind_name(file_type) });
        }
        let mut file = File::from(fd);
        without_stalling_the_runtime(|| file.write_all(bytes).and_then(|()| file.sync_data()))
            .map_err(|e| FileError::Io { path: path.clone(), source: e })?;
        Ok(FileStamp { dev: stat.st_dev, ino: stat.st_ino, len: stat.st_size as u64 + bytes.len() as u64 })
    }

    /// Creates a directory and its parents (never through a symlink).
    pub fn create_dir_all(&self, path: &RelPath) -> Result<(), FileError> {
        self.open_dir(path, true).map(drop)
    }

    /// Lists a directory; entries are not followed (a symlink is `Symlink`).
    pub fn list(&self, path: &RelPath) -> Result<Vec<Entry>, FileError> {
        let fd = self.open_dir(path, false)?;
        let mut dir = rustix::fs::Dir::read_from(&fd).map_err(|e| Self::io(path, e))?;
        let mut entries = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| Self::io(path, e))?;
            let Ok(name) = entry.file_name().to_str() else { continue };
            if name == "." || name == ".." {
                continue;
            }
            let Ok(st) = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) else { continue };
            let kind = entry_kind(FileType::from_raw_mode(st.st_mode));
            entries.push(Entry { name: name.to_owned(), kind, size: st.st_size as u64 });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// What `path` is, without following a final symlink; `None` if missing.
    pub fn kind(&self, path: &RelPath) -> Result<Option<EntryKind>, FileError> {
        let Some((parent, name)) = path.split_last() else { return Ok(Some(EntryKind::Dir)) };
        match self.open_dir(&parent, false) {
            Ok(fd) => Ok(self.kind_at(&fd, name)),
            Err(FileError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Renames within the prefix. With `replace = false` an existing target
    /// is an error (`Exists`), which makes a rename a claim.
    pub fn rename(&self, from: &RelPath, to: &RelPath, replace: bool) -> Result<(), FileError> {
        let (from_dir, from_name) = self.parent_and_name(from, false)?;
        let (to_dir, to_name) = self.parent_and_name(to, true)?;
        let flags = if replace { RenameFlags::empty() } else { RenameFlags::NOREPLACE };
        rustix::fs::renameat_with(&from_dir, from_name, &to_dir, to_name, flags).map_err(|e| Self::io(from, e))?;
        // Both directory entries changed; sync both (the same directory twice is cheap).
        rustix::fs::fsync(&to_dir).map_err(|e| Self::io(to, e))?;
        rustix::fs::fsync(&from_dir).map_err(|e| Self::io(from, e))
    }

    /// Removes a file or symlink (never what it points to); true if it existed.
    pub fn remove_file(&self, path: &RelPath) -> Result<bool, FileError> {
        let (parent, name) = match self.parent_and_name(path, false) {
            Ok(x) => x,
            Err(FileError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&parent, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(Self::io(path, e)),
        }
    }
}
