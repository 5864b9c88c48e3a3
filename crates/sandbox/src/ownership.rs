//! Opening an agent's directory for the sandbox and handing its files to the
//! agent's sandbox uid.
//!
//! Tool processes run as an unprivileged uid of their own, so `/data` must
//! belong to that uid; the platform, running as root, writes some files
//! (MEMORY.md, sessions, attachments) as root between calls. Before each call
//! [`adopt`] walks the tree and chowns what is not the agent's yet.
//!
//! The tree is hostile (SPEC §10): the walk is rooted at a directory handle,
//! opens every directory with `O_NOFOLLOW` relative to its parent handle,
//! never follows a symlink, never leaves the file system, and never chowns a
//! regular file with more than one link that is not already the agent's (it
//! could be a hard link to a file outside the tree). `config.json` at the
//! top keeps its owner: it is the platform's and is mounted read-only.
//! This module must not spawn processes.

use std::ffi::CStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Gid, Mode, OFlags, Uid, chownat, fchown, fstat, openat, statat};

use crate::exec::SandboxError;

/// The agent's file owned by the platform and mounted read-only.
pub(crate) const CONFIG_FILE: &str = "config.json";
/// The walk stops (with a warning) after this many entries.
const ADOPT_ENTRIES_MAX: usize = 200_000;
/// ... or this deep.
const ADOPT_DEPTH_MAX: usize = 128;

/// Handles on the agent's directory and its config, opened without
/// following symlinks; bwrap mounts these very handles (`--bind-fd`).
#[derive(Debug)]
pub(crate) struct AgentDir {
    pub(crate) dir: OwnedFd,
    pub(crate) config: Option<OwnedFd>,
}

/// Opens `path` (which must be a real directory, not a symlink) and its
/// `config.json` when that is a regular file.
pub(crate) fn open_agent_dir(path: &Path) -> Result<AgentDir, SandboxError> {
    let dir =
        rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| {
                SandboxError::InvalidRequest(format!(
                    "agent data directory {} cannot be opened as a directory: {}",
                    path.display(),
                    io::Error::from(e)
                ))
            })?;
    let config = match openat(&dir, CONFIG_FILE, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => match fstat(&fd) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => Some(fd),
            _ => {
                tracing::warn!(dir = %path.display(), "config.json is not a regular file; not mounted read-only");
                None
            }
        },
        Err(_) => None,
    };
    Ok(AgentDir { dir, config })
}

/// What [`adopt`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Adopted {
    pub(crate) entries: usize,
    pub(crate) chowned: usize,
    pub(crate) skipped_links: usize,
    pub(crate) incomplete: bool,
}

/// Gives every entry below `root` (and `root` itself) to `uid:gid`, except
/// the top-level config.json and multiply-linked foreign files.
pub(crate) fn adopt(root: &OwnedFd, uid: u32, gid: u32) -> io::Result<Adopted> {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    let mut done = Adopted::default();
    let root_stat = fstat(root)?;
    if root_stat.st_uid != uid.as_raw() || root_stat.st_gid != gid.as_raw() {
        fchown(root, Some(uid), Some(gid))?;
        done.chowned += 1;
    }
    let device = root_stat.st_dev;
    let mut stack: Vec<(OwnedFd, usize)> = vec![(root.try_clone()?, 0)];
    while let Some((dir, depth)) = stack.pop() {
        let entries = match Dir::read_from(&dir) {
            Ok(d) => d,
            Err(_) => continue,
        };
        for entry in entries {
            let Ok(entry) = entry else { break };
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            done.entries += 1;
            if done.entries > ADOPT_ENTRIES_MAX {
                done.incomplete = true;
                return Ok(done);
            }
            if depth == 0 && name.to_bytes() == CONFIG_FILE.as_bytes() {
                continue;
            }
            adopt_entry(&dir, name, depth, device, uid, gid, &mut stack, &mut done);
        }
    }
    Ok(done)
}

#[allow(clippy::too_many_arguments)]
fn adopt_entry(
    dir: &OwnedFd,
    name: &CStr,
    depth: usize,
    device: u64,
    uid: Uid,
    gid: Gid,
    stack: &mut Vec<(OwnedFd, usize)>,
    done: &mut Adopted,
) {
    // The entry may change under us (a running sandbox of the same agent);
    // every step re-checks without following symlinks.
    let Ok(st) = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else { return };
    if st.st_dev != device {
        return;
    }
    let file_type = FileType::from_raw_mode(st.st_mode);
    if matches!(file_type, FileType::BlockDevice | FileType::CharacterDevice) {
        return;
    }
    let foreign = st.st_uid != uid.as_raw() || st.st_gid != gid.as_raw();
    if foreign {
        if file_type == FileType::RegularFile && st.st_nlink > 1 {
            done.skipped_links += 1;
        } else if chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            done.chowned += 1;
        }
    }
    if file_type == FileType::Directory {
        if depth + 1 > ADOPT_DEPTH_MAX {
            done.incomplete = true;
            return;
        }
        if let Ok(child) =
            openat(dir, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        {
            // Same file system still (it was swapped for a mount point?).
            if fstat(&child).is_ok_and(|s| s.st_dev == device) {
                stack.push((child, depth + 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    #[test]
    fn adopt_chowns_the_tree_but_not_config_links_or_symlink_targets() {
        if !rustix::process::geteuid().is_root() {
            return; // chown needs root; the integration tests run as root
        }
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "x").unwrap();
        let linked = outside.path().join("linked");
        std::fs::write(&linked, "x").unwrap();

        let agent = tempfile::tempdir().unwrap();
        let a = agent.path();
        std::fs::create_dir_all(a.join("sub/deeper")).unwrap();
        std::fs::write(a.join("sub/deeper/f"), "f").unwrap();
        std::fs::write(a.join(CONFIG_FILE), "{}").unwrap();
        symlink(&victim, a.join("evil")).unwrap();
        symlink(outside.path(), a.join("evildir")).unwrap();
        std::fs::hard_link(&linked, a.join("hard")).unwrap();

        let opened = open_agent_dir(a).unwrap();
        assert!(opened.config.is_some());
        let done = adopt(&opened.dir, 1_999_999, 1_999_999).unwrap();
        assert!(!done.incomplete);
        assert_eq!(done.skipped_links, 1);
        let uid = |p: &Path| std::fs::symlink_metadata(p).unwrap().uid();
        assert_eq!(uid(a), 1_999_999);
        assert_eq!(uid(&a.join("sub/deeper/f")), 1_999_999);
        assert_eq!(uid(&a.join("evil")), 1_999_999, "the link itself");
        assert_eq!(uid(&victim), 0, "never the symlink's target");
        assert_eq!(uid(outside.path()), 0);
        assert_eq!(uid(&linked), 0, "never a foreign hard link");
        assert_eq!(uid(&a.join(CONFIG_FILE)), 0);
    }

    #[test]
    fn a_symlinked_data_dir_or_config_is_refused() {
        let real = tempfile::tempdir().unwrap();
        let holder = tempfile::tempdir().unwrap();
        let link = holder.path().join("agent");
        symlink(real.path(), &link).unwrap();
        assert!(matches!(open_agent_dir(&link), Err(SandboxError::InvalidRequest(_))));
        symlink("/etc/passwd", real.path().join(CONFIG_FILE)).unwrap();
        assert!(open_agent_dir(real.path()).unwrap().config.is_none());
    }
}
