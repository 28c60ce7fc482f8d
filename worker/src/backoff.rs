//! Restart policy and the kubelet-style crash-loop back-off (pure logic).
//!
//! A container that exits is restarted (or not) by the pod's `restartPolicy`. Restarts are
//! delayed like the kubelet's: the first restart is immediate, then the delay starts at
//! `base` (10 s) and doubles up to `max` (5 min). A container that ran for longer than
//! `reset_after` (2 × `max`) before exiting starts over at an immediate restart. While a
//! delay is pending the container is `waiting` with reason `CrashLoopBackOff`.

use std::time::{Duration, Instant};

/// `spec.restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Parse the API value; absent or unknown means `Always` (the Kubernetes default).
    pub(crate) fn parse(s: Option<&str>) -> Self {
        match s {
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            _ => RestartPolicy::Always,
        }
    }

    /// Whether a container that exited with `exit_code` is started again.
    pub(crate) fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

/// Back-off timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackoffConfig {
    pub base: Duration,
    pub max: Duration,
    /// A run at least this long resets the back-off.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self::new(Duration::from_secs(10), Duration::from_secs(300))
    }
}

impl BackoffConfig {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        let max = max.max(base);
        Self {
            base,
            max,
            reset_after: max * 2,
        }
    }

    /// From the config's `[worker]` restart back-off keys.
    pub(crate) fn from_config(w: &ballast_config::WorkerDefaults) -> Self {
        Self::new(w.restart_backoff_base, w.restart_backoff_max)
    }
}

/// The back-off state of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backoff {
    cfg: BackoffConfig,
    /// Delay before the next restart.
    next: Duration,
    /// The delay the last exit got.
    last: Duration,
    /// When the pending restart may happen, while in back-off.
    until: Option<Instant>,
}

impl Backoff {
    pub(crate) fn new(cfg: BackoffConfig) -> Self {
        Self {
            cfg,
            next: Duration::ZERO,
            last: Duration::ZERO,
            until: None,
        }
    }

    /// The container exited at `now` after running for `ran`; returns when it may start again.
    pub(crate) fn on_exit(&mut self, now: Instant, ran: Duration) -> Instant {
        if ran >= self.cfg.reset_after {
            self.next = Duration::ZERO;
        }
        let delay = self.next;
        self.last = delay;
        self.next = if delay.is_zero() {
            self.cfg.base
        } else {
            (delay * 2).min(self.cfg.max)
        };
        let at = now + delay;
        self.until = Some(at);
        at
    }

    /// Whether a restart is still being held back at `now` (the `CrashLoopBackOff` state).
    pub(crate) fn in_backoff(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// The restart happened.
    pub(crate) fn started(&mut self) {
        self.until = None;
    }

    /// The delay the last exit got (for the waiting message).
    pub(crate) fn current_delay(&self) -> Duration {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        assert_eq!(RestartPolicy::parse(None), RestartPolicy::Always);
        assert_eq!(RestartPolicy::parse(Some("Never")), RestartPolicy::Never);
        assert!(RestartPolicy::Always.restarts(0));
        assert!(RestartPolicy::Always.restarts(1));
        assert!(!RestartPolicy::OnFailure.restarts(0));
        assert!(RestartPolicy::OnFailure.restarts(137));
        assert!(!RestartPolicy::Never.restarts(1));
    }

    #[test]
    fn doubles_to_the_cap_like_the_kubelet() {
        let cfg = BackoffConfig::default();
        let mut b = Backoff::new(cfg);
        let t = Instant::now();
        let short = Duration::from_secs(1);
        let delays: Vec<u64> = (0..8)
            .map(|_| (b.on_exit(t, short) - t).as_secs())
            .collect();
        assert_eq!(delays, vec![0, 10, 20, 40, 80, 160, 300, 300]);
    }

    #[test]
    fn holds_back_then_releases() {
        let mut b = Backoff::new(BackoffConfig::new(
            Duration::from_secs(1),
            Duration::from_secs(4),
        ));
        let t = Instant::now();
        b.on_exit(t, Duration::ZERO);
        assert!(!b.in_backoff(t), "first restart is immediate");
        b.started();
        let at = b.on_exit(t, Duration::ZERO);
        assert_eq!(at - t, Duration::from_secs(1));
        assert!(b.in_backoff(t));
        assert_eq!(b.current_delay(), Duration::from_secs(1));
        assert!(!b.in_backoff(t + Duration::from_secs(1)));
        b.started();
        assert!(!b.in_backoff(t));
    }

    #[test]
    fn a_long_run_resets() {
        let cfg = BackoffConfig::new(Duration::from_secs(1), Duration::from_secs(4));
        let mut b = Backoff::new(cfg);
        let t = Instant::now();
        for _ in 0..5 {
            b.on_exit(t, Duration::ZERO);
        }
        assert_eq!(b.on_exit(t, Duration::ZERO) - t, Duration::from_secs(4));
        assert_eq!(b.on_exit(t, cfg.reset_after) - t, Duration::ZERO);
        assert_eq!(b.on_exit(t, Duration::ZERO) - t, Duration::from_secs(1));
    }
}
