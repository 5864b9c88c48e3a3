//! `RetryingClient`: retries a model call that failed with
//! [`ModelError::Transient`], with capped exponential backoff that honours
//! the provider's `retry-after`. It owns the retry loop only; it does not
//! know providers, and it never retries other errors.
//!
//! Partial output: an attempt may fail after it streamed some text. Before
//! each retry the wrapper emits [`StreamEvent::Restart`]; callers discard
//! whatever they received since the call began or the previous `Restart`.
//!
//! Bounds: at most `attempts_max` attempts and `wait_total_max` of sleeping in
//! one call. A `retry-after` longer than `delay_max` ends the loop at once and
//! returns the error (still carrying `retry_after`), so the caller's queue can
//! schedule the job later instead of holding a worker.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{CancelToken, EventSink, ModelClient, ModelError, ModelRequest, ModelResponse, StreamEvent};

/// How the wrapper waits; injectable so tests need not sleep.
pub type SleepFn = Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in one call, the first included.
    pub attempts_max: u32,
    /// The wait before the first retry; doubled for each further one.
    pub delay_base: Duration,
    /// The longest single wait. Backoff is capped here; a longer `retry-after`
    /// stops retrying.
    pub delay_max: Duration,
    /// The most time one call may spend waiting between attempts.
    pub wait_total_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts_max: 5,
            delay_base: Duration::from_secs(1),
            delay_max: Duration::from_secs(30),
            wait_total_max: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The backoff before retry number `retry` (1 for the first retry):
    /// `delay_base * 2^(retry-1)`, capped at `delay_max`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.delay_base.saturating_mul(factor).min(self.delay_max)
    }

    /// The wait before the next attempt, or `None` when the error should be
    /// returned: not transient, attempts or wait budget used up, or a
    /// `retry-after` beyond `delay_max`.
    pub fn next_delay(&self, error: &ModelError, attempt: u32, waited: Duration) -> Option<Duration> {
        let ModelError::Transient { retry_after, .. } = error else {
            return None;
        };
        if attempt >= self.attempts_max {
            return None;
        }
        let delay = match retry_after {
            Some(hint) if *hint > self.delay_max => return None,
            Some(hint) => *hint,
            None => self.backoff(attempt),
        };
        (waited + delay <= self.wait_total_max).then_some(delay)
    }
}

fn tokio_sleep() -> SleepFn {
    Arc::new(|delay| Box::pin(tokio::time::sleep(delay)))
}

/// A [`ModelClient`] that retries transient failures of the client it wraps.
pub struct RetryingClient {
    inner: Arc<dyn ModelClient>,
    policy: RetryPolicy,
    sleep: SleepFn,
}

impl fmt::Debug for RetryingClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryingClient").field("inner", &self.inner).field("policy", &self.policy).finish()
    }
}

impl RetryingClient {
    pub fn new(inner: Arc<dyn ModelClient>, policy: RetryPolicy) -> Self {
        Self { inner, policy, sleep: tokio_sleep() }
    }

    /// Replaces `tokio::time::sleep`, e.g. with a recorder in tests.
    pub fn with_sleep(mut self, sleep: SleepFn) -> Self {
        self.sleep = sleep;
        self
    }
}

#[async_trait]
impl ModelClient for RetryingClient {
    async fn stream(
        &self,
        request: &ModelRequest,
        cancel: &CancelToken,
        sink: &mut EventSink<'_>,
    ) -> Result<ModelResponse, ModelError> {
        let mut waited = Duration::ZERO;
        let mut attempt = 1;
        loop {
            let error = match self.inner.stream(request, cancel, sink).await {
                Ok(response) => return Ok(response),
                Err(error) => error,
            };
            let Some(delay) = self.policy.next_delay(&error, attempt, waited) else {
                return Err(error);
            };
            tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, error = %error, "model call failed; retrying");
            sink(StreamEvent::Restart { attempt, delay, reason: error.to_string() });
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(ModelError::Cancelled),
                _ = (self.sleep)(delay) => {}
            }
            waited += delay;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tinyfat_core::message::{Message, Usage};

    use super::*;
    use crate::StopReason;

    fn transient(retry_after: Option<u64>) -> ModelError {
        ModelError::Transient {
            status: Some(529),
            retry_after: retry_after.map(Duration::from_secs),
            message: "x".into(),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy { delay_max: Duration::from_secs(5), ..Default::default() };
        let delays: Vec<u64> = (1..=5).map(|r| policy.backoff(r).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        assert_eq!(policy.backoff(100), Duration::from_secs(5), "no overflow");
    }

    #[test]
    fn next_delay_respects_every_bound() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.next_delay(&transient(None), 1, Duration::ZERO), Some(Duration::from_secs(1)));
        assert_eq!(policy.next_delay(&transient(Some(7)), 1, Duration::ZERO), Some(Duration::from_secs(7)));
        assert_eq!(policy.next_delay(&transient(Some(31)), 1, Duration::ZERO), None, "retry-after beyond the cap");
        assert_eq!(policy.next_delay(&transient(None), 5, Duration::ZERO), None, "attempts used up");
        assert_eq!(policy.next_delay(&transient(Some(10)), 2, Duration::from_secs(115)), None, "wait budget");
        assert_eq!(policy.next_delay(&ModelError::Cancelled, 1, Duration::ZERO), None);
        assert_eq!(policy.next_delay(&ModelError::BadRequest { message: "x".into() }, 1, Duration::ZERO), None);
    }

    /// Fails with the scripted errors, then succeeds; streams one delta per attempt.
    #[derive(Debug)]
    struct Flaky(Mutex<Vec<ModelError>>);

    #[async_trait]
    impl ModelClient for Flaky {
        async fn stream(
            &self,
            _: &ModelRequest,
            _: &CancelToken,
            sink: &mut EventSink<'_>,
        ) -> Result<ModelResponse, ModelError> {
            sink(StreamEvent::TextDelta("partial".into()));
            match self.0.lock().unwrap().pop() {
                Some(error) => Err(error),
                None => Ok(ModelResponse {
                    message: Message::assistant_text("done"),
                    stop_reason: StopReason::EndTurn,
                    usage: Usage::default(),
                }),
            }
        }
    }

    fn request() -> ModelRequest {
        ModelRequest {
            model: "claude-x".into(),
            system_static: String::new(),
            system_dynamic: String::new(),
            messages: vec![],
            tools: vec![],
            max_tokens: 1,
        }
    }

    fn recording_sleep(log: Arc<Mutex<Vec<Duration>>>) -> SleepFn {
        Arc::new(move |delay| {
            log.lock().unwrap().push(delay);
            Box::pin(async {})
        })
    }

    #[tokio::test]
    async fn retries_with_backoff_and_announces_restarts() {
        let slept = Arc::new(Mutex::new(Vec::new()));
        let inner = Flaky(Mutex::new(vec![transient(None), transient(Some(3)), transient(None)]));
        let client =
            RetryingClient::new(Arc::new(inner), RetryPolicy::default()).with_sleep(recording_sleep(slept.clone()));
        let mut events = Vec::new();
        let response = client.stream(&request(), &CancelToken::new(), &mut |e| events.push(e)).await.unwrap();
        assert_eq!(response.message.text(), "done");
        assert_eq!(
            *slept.lock().unwrap(),
            vec![Duration::from_secs(1), Duration::from_secs(3), Duration::from_secs(4)]
        );
        let restarts: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Restart { attempt, .. } => Some(*attempt),
                _ => None,
            })
            .collect();
        assert_eq!(restarts, vec![1, 2, 3]);
        assert_eq!(events.len(), 7, "a delta per attempt plus a restart per retry");
    }

    #[tokio::test]
    async fn gives_up_after_attempts_max_with_the_last_error() {
        let slept = Arc::new(Mutex::new(Vec::new()));
        let inner = Flaky(Mutex::new((0..10).map(|_| transient(None)).collect()));
        let policy = RetryPolicy { attempts_max: 3, ..Default::default() };
        let client = RetryingClient::new(Arc::new(inner), policy).with_sleep(recording_sleep(slept.clone()));
        let err = client.stream(&request(), &CancelToken::new(), &mut |_| {}).await.unwrap_err();
        assert!(err.is_transient());
        assert_eq!(slept.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn cancelling_during_the_wait_ends_the_call() {
        let inner = Flaky(Mutex::new(vec![transient(None)]));
        let policy = RetryPolicy { delay_base: Duration::from_secs(20), ..Default::default() };
        let client = RetryingClient::new(Arc::new(inner), policy);
        let cancel = CancelToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            trigger.cancel();
        });
        let started = std::time::Instant::now();
        let err = client.stream(&request(), &cancel, &mut |_| {}).await.unwrap_err();
        assert!(matches!(err, ModelError::Cancelled));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
