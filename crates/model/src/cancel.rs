//! `CancelToken`: a shared "stop now" flag that can also be awaited, so a model
//! call blocked on a slow stream ends as soon as the user says `stop`, not at
//! the next chunk. It owns nothing else: it does not know what is being
//! cancelled, and cancelling is one-way (a token never resets).

use std::sync::Arc;

use tokio::sync::watch;

/// Clones share one flag. Cancelling any clone cancels them all.
#[derive(Clone, Debug)]
pub struct CancelToken {
    flag: Arc<watch::Sender<bool>>,
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    pub fn new() -> Self {
        Self { flag: Arc::new(watch::Sender::new(false)) }
    }

    /// Sets the flag and wakes every task waiting in [`CancelToken::cancelled`].
    pub fn cancel(&self) {
        self.flag.send_replace(true);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.flag.borrow()
    }

    /// A receiver that turns `true` on cancellation, for code that waits on a
    /// `watch` channel (the sandbox kills a running tool with it).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.flag.subscribe()
    }

    /// Completes once the token is cancelled (at once if it already is).
    pub async fn cancelled(&self) {
        let mut rx = self.flag.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail with a closed channel.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn cancel_wakes_a_waiting_clone() {
        let token = CancelToken::new();
        let waiter = token.clone();
        let task = tokio::spawn(async move { waiter.cancelled().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!token.is_cancelled());
        token.cancel();
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("woken").expect("joined");
        assert!(token.is_cancelled());
    }

    #[tokio::test]
    async fn cancelled_returns_at_once_when_already_cancelled() {
        let token = CancelToken::new();
        token.cancel();
        tokio::time::timeout(Duration::from_millis(100), token.cancelled()).await.expect("immediate");
    }
}
