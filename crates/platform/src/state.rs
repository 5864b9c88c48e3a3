//! The state every HTTP handler and background role shares.

use std::sync::Arc;

use crate::Platform;
use crate::metrics::Metrics;
use crate::runs::RunRegistry;

#[derive(Clone, Debug)]
pub struct AppState {
    pub platform: Arc<Platform>,
    pub metrics: Arc<Metrics>,
    /// Runs in progress in this process: cancel flags and web chat event logs.
    pub runs: Arc<RunRegistry>,
    /// Wakes idle workers of this process when a job is enqueued here.
    pub wake: Arc<tokio::sync::Notify>,
    /// Wakes the delivery loop when a delivery is recorded.
    pub deliveries_wake: Arc<tokio::sync::Notify>,
    pub rejections: Arc<crate::inbound::RejectionLog>,
    /// Wakes this process's scheduler loop when timers change.
    pub scheduler_wake: Arc<tokio::sync::Notify>,
    /// Email sender authentication (SPEC §8). `None`: DKIM/SPF/DMARC with
    /// the system's DNS resolver; tests put an offline zone here.
    pub sender_auth: Option<Arc<dyn tinyfat_channels::email::auth::SenderAuthenticator>>,
}

impl AppState {
    pub fn new(platform: Arc<Platform>) -> Self {
        Self {
            platform,
            metrics: Arc::new(Metrics::default()),
            runs: Arc::new(RunRegistry::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
            deliveries_wake: Arc::new(tokio::sync::Notify::new()),
            rejections: Arc::new(crate::inbound::RejectionLog::default()),
            scheduler_wake: Arc::new(tokio::sync::Notify::new()),
            sender_auth: None,
        }
    }
}
