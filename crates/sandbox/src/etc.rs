//! The sandbox's `/etc`: one prepared directory per sandbox uid, mounted
//! with a single bind instead of one bind per file (each bind costs bwrap
//! about 0.15 ms).
//!
//! A master copy holds the few host files a shell and common tools need
//! (copied, symlinks kept as symlinks) plus synthesised `hosts` and the bash
//! prologue; per-uid directories hard-link the master and add `passwd` and
//! `group` naming the agent's uid. Host directories we expose (`ssl`,
//! `alternatives`, ...) get empty mount points here and are bound over them.
//! Everything else in the host `/etc` (shadow, ssh keys, the platform's own
//! configuration) never appears. When a host file changes (an `ldconfig`, a
//! new time zone) the fingerprint check on each call rebuilds the copies.
//! Files here are public by design (mode 0644); this module must never copy
//! anything but the listed names.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Host files copied into the sandbox's /etc.
const ETC_FILES: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "nsswitch.conf",
    "protocols",
    "services",
    "mime.types",
    "magic",
    "magic.mime",
    "host.conf",
    "gai.conf",
];

/// Host directories bound read-only into the sandbox's /etc (each bind
/// costs a mount per call). Only what unprivileged tools read at run time:
/// `alternatives` (the targets of /usr/bin/editor and friends) and `ssl`
/// (CA certificates, openssl.cnf). `ld.so.conf.d` and `ca-certificates`
/// are read only by ldconfig and update-ca-certificates, which need root.
pub(crate) const ETC_DIRS: &[&str] = &["alternatives", "ssl"];

type Fingerprint = Vec<Option<(u64, u64, i64, i64, u64)>>;

#[derive(Debug)]
pub(crate) struct EtcView {
    root: PathBuf,
    hosts: String,
    prologue: String,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    generation: u64,
    fingerprint: Fingerprint,
    uids: HashSet<u32>,
}

impl EtcView {
    /// `root` must be private to the platform (it is created 0755 so the
    /// sandbox can read what is mounted from it).
    pub(crate) fn new(root: PathBuf, hosts: String, prologue: String) -> Self {
        Self {
            root,
            hosts,
            prologue,
            state: Mutex::new(State { generation: 0, fingerprint: Vec::new(), uids: HashSet::new() }),
        }
    }

    /// The directory to mount as `/etc` for `uid`, and the host directories
    /// to bind inside it.
    pub(crate) fn for_uid(&self, uid: u32) -> std::io::Result<PathBuf> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let fingerprint = host_fingerprint();
        if state.generation == 0 || fingerprint != state.fingerprint {
            let old = state.generation;
            state.generation += 1;
            state.fingerprint = fingerprint;
            state.uids.clear();
            self.build_master(state.generation)?;
            if old > 0 {
                self.remove_generation(old);
            }
        }
        let generation = state.generation;
        let dir = self.root.join(format!("g{generation}-u{uid}"));
        if !state.uids.contains(&uid) {
            self.build_for_uid(generation, uid, &dir)?;
            state.uids.insert(uid);
        }
        Ok(dir)
    }

    fn master(&self, generation: u64) -> PathBuf {
        self.root.join(format!("g{generation}-master"))
    }

    fn build_master(&self, generation: u64) -> std::io::Result<()> {
        let master = self.master(generation);
        let _ = std::fs::remove_dir_all(&master);
        std::fs::create_dir_all(&master)?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&master, std::fs::Permissions::from_mode(0o755))?;
        for name in ETC_FILES {
            let src = Path::new("/etc").join(name);
            let Ok(meta) = std::fs::symlink_metadata(&src) else { continue };
            let dst = master.join(name);
            if meta.file_type().is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            } else if meta.is_file() {
                write_public(&dst, &std::fs::read(&src)?)?;
            }
        }
        write_public(&master.join("hosts"), self.hosts.as_bytes())?;
        write_public(
            &master.join("resolv.conf"),
            format!("nameserver {}\n", crate::netguard::DNS_FORWARD_ADDR).as_bytes(),
        )?;
        write_public(&master.join(crate::bwrap::PROLOGUE_NAME), self.prologue.as_bytes())?;
        Ok(())
    }

    fn build_for_uid(&self, generation: u64, uid: u32, dir: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(dir);
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        for entry in std::fs::read_dir(self.master(generation))? {
            let entry = entry?;
            let dst = tmp.join(entry.file_name());
            if entry.file_type()?.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, dst)?;
            } else {
                std::fs::hard_link(entry.path(), dst)?;
            }
        }
        for name in ETC_DIRS {
            if Path::new("/etc").join(name).is_dir() {
                std::fs::create_dir(tmp.join(name))?;
            }
        }
        write_public(
            &tmp.join("passwd"),
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 agent:x:{uid}:{uid}:agent:/data:/bin/bash\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            )
            .as_bytes(),
        )?;
        write_public(&tmp.join("group"), format!("root:x:0:\nagent:x:{uid}:\nnogroup:x:65534:\n").as_bytes())?;
        std::fs::rename(tmp, dir)
    }

    fn remove_generation(&self, generation: u64) {
        let prefix = format!("g{generation}-");
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

/// Identity of each copied host file (device, inode, mtime, size).
fn host_fingerprint() -> Fingerprint {
    ETC_FILES
        .iter()
        .map(|name| {
            std::fs::symlink_metadata(Path::new("/etc").join(name))
                .ok()
                .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
        })
        .collect()
}

/// A world-readable file (the sandbox uid must read it).
fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(path)?;
    file.write_all(bytes)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_uid_views_share_the_master_and_name_the_uid() {
        let root = tempfile::tempdir().unwrap();
        let view = EtcView::new(root.path().to_path_buf(), "127.0.0.1 localhost\n".into(), "true\n".into());
        let a = view.for_uid(1_900_000_001).unwrap();
        let b = view.for_uid(1_900_000_002).unwrap();
        assert_ne!(a, b);
        assert_eq!(view.for_uid(1_900_000_001).unwrap(), a, "cached");
        let passwd = std::fs::read_to_string(a.join("passwd")).unwrap();
        assert!(passwd.contains("agent:x:1900000001:1900000001:"));
        assert_eq!(std::fs::read_to_string(b.join("hosts")).unwrap(), "127.0.0.1 localhost\n");
        assert!(!a.join("shadow").exists());
        if Path::new("/etc/ld.so.cache").exists() {
            assert_eq!(std::fs::read(a.join("ld.so.cache")).unwrap(), std::fs::read("/etc/ld.so.cache").unwrap());
        }
    }
}
