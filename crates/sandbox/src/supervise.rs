//! Watching one started process: read its output into a bounded
//! [`Capture`], wait for it, and kill it on timeout or cancellation.
//!
//! Shared by both executors. It knows nothing about sandboxes: the caller
//! passes a `kill` function that ends the whole process tree (for bwrap the
//! outer bwrap, whose death takes the PID namespace with it; without a
//! sandbox the process group). It must not block the async runtime and must
//! never wait unboundedly: every wait has a deadline.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::capture::Capture;

/// How long to keep reading output after the process exited or was killed.
/// Leftover writers (background jobs) are being killed meanwhile; past this
/// the rest is dropped rather than holding the call.
const DRAIN_AFTER_EXIT_MS: u64 = 2_000;

/// Read size; also the unit in which output is discarded past the cap.
const READ_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) enum Stop {
    Exited,
    TimedOut,
    Cancelled,
}

#[derive(Debug)]
pub(crate) struct Supervised {
    pub(crate) status: ExitStatus,
    pub(crate) stop: Stop,
    pub(crate) capture: Capture,
}

impl Supervised {
    pub(crate) fn exit_code(&self) -> Option<i32> {
        self.status.code()
    }

    pub(crate) fn signal(&self) -> Option<i32> {
        self.status.signal()
    }
}

/// Supervises `child` until it exited and its output is drained.
///
/// `kill(pid)` is called at most once, before the child is reaped (so the
/// pid cannot have been reused), on timeout or cancellation. `after_exit` is
/// called once the child was reaped, to clean up what it left behind.
pub(crate) async fn supervise(
    mut child: Child,
    mut output: pipe::Receiver,
    deadline: Instant,
    mut cancel: Option<watch::Receiver<bool>>,
    output_bytes_max: usize,
    kill: &(dyn Fn(&mut Child) + Sync),
    after_exit: &(dyn Fn() + Sync),
) -> io::Result<Supervised> {
    let mut capture = Capture::new(output_bytes_max);
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut stop = Stop::Exited;
    let mut killed = false;
    let mut eof = false;

    let status = loop {
        tokio::select! {
            read = output.read(&mut buf), if !eof => match read {
                Ok(0) => eof = true,
                Ok(n) => capture.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => eof = true,
            },
            status = child.wait() => break status?,
            _ = tokio::time::sleep_until(deadline), if !killed => {
                stop = Stop::TimedOut;
                killed = true;
                kill(&mut child);
            }
            _ = cancelled(&mut cancel), if !killed => {
                stop = Stop::Cancelled;
                killed = true;
                kill(&mut child);
            }
        }
    };
    after_exit();

    let drain_until = Instant::now() + Duration::from_millis(DRAIN_AFTER_EXIT_MS);
    while !eof {
        match tokio::time::timeout_at(drain_until, output.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => eof = true,
            Ok(Ok(n)) => capture.push(&buf[..n]),
        }
    }
    Ok(Supervised { status, stop, capture })
}

/// Resolves when the flag turns true; never, when there is no flag or its
/// sender is gone.
pub(crate) async fn cancelled(cancel: &mut Option<watch::Receiver<bool>>) {
    match cancel {
        Some(rx) => {
            if rx.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}
