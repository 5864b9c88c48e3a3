//! `agent export`: a tar archive of an agent's prefix. The walk goes through
//! `AgentDir`, so a symlink or FIFO the agent planted is skipped (and
//! reported), never followed; each file is read under a size cap.

use std::io::Write;

use tinyfat_storage::{EntryKind, RelPath};
use tinyfat_store::Agent;

use crate::Platform;
use crate::error::{Error, Result};

pub const EXPORT_FILE_BYTES_MAX: u64 = 1 << 30;
const EXPORT_DEPTH_MAX: usize = 32;

#[derive(Debug, Default)]
pub struct ExportSummary {
    pub files: u64,
    pub bytes: u64,
    /// Entries left out: symlinks, FIFOs, devices, oversized files.
    pub skipped: Vec<String>,
}

impl Platform {
    /// Writes `agents/{id}/…` entries to `out` as a tar stream.
    pub async fn export_agent(&self, agent: &Agent, out: impl Write) -> Result<ExportSummary> {
        let workspace = self.storage.checkout(&agent.id).await?;
        let mut builder = tar::Builder::new(out);
        let mut summary = ExportSummary::default();
        let base = format!("agents/{}", agent.id);
        let mut stack = vec![(RelPath::root(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            for entry in workspace.dir.list(&dir)? {
                let path = dir.join(&entry.name).map_err(Error::invalid)?;
                let archive_name = format!("{base}/{}", path.as_str());
                match entry.kind {
                    EntryKind::Dir if depth < EXPORT_DEPTH_MAX => {
                        let mut header = tar::Header::new_gnu();
                        header.set_entry_type(tar::EntryType::Directory);
                        header.set_mode(0o755);
                        header.set_size(0);
                        builder
                            .append_data(&mut header, format!("{archive_name}/"), std::io::empty())
                            .map_err(anyhow::Error::from)?;
                        stack.push((path, depth + 1));
                    }
                    EntryKind::File => match workspace.dir.read(&path, EXPORT_FILE_BYTES_MAX) {
                        Ok(bytes) => {
                            let mut header = tar::Header::new_gnu();
                            header.set_mode(0o644);
                            header.set_size(bytes.len() as u64);
                            builder
                                .append_data(&mut header, &archive_name, bytes.as_slice())
                                .map_err(anyhow::Error::from)?;
                            summary.files += 1;
                            summary.bytes += bytes.len() as u64;
                        }
                        Err(e) => summary.skipped.push(format!("{path}: {e}")),
                    },
                    _ => summary.skipped.push(format!("{path}: not a regular file or directory")),
                }
            }
        }
        builder.into_inner().map_err(anyhow::Error::from)?.flush().map_err(anyhow::Error::from)?;
        Ok(summary)
    }
}
