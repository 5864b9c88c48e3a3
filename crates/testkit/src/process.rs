//! A child process a test starts (usually `tinyfat serve`): killed and
//! reaped on drop, also when an assertion fails, so no test leaves a server
//! running; plus the loopback port helpers such tests need. It knows nothing
//! of how the process is configured: the test builds the `Command`.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long a started process may take to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running child process, killed with SIGKILL and reaped on drop.
#[derive(Debug)]
pub struct TestProcess {
    child: Child,
    /// The loopback port the process serves HTTP on, when it does.
    pub port: u16,
}

impl TestProcess {
    /// Spawns `command`; `port` is what `url` points at.
    pub fn spawn(command: &mut Command, port: u16) -> Self {
        let child = command.spawn().unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        Self { child, port }
    }

    /// Spawns `command` and waits until `port` accepts connections.
    pub fn spawn_listening(command: &mut Command, port: u16) -> Self {
        let process = Self::spawn(command, port);
        wait_for_port(port);
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `kill -9` and reap: the crash the tests recover from.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something accepts connections on loopback `port`; panics
/// after `START_TIMEOUT`.
pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + START_TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on 127.0.0.1:{port} after {START_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
