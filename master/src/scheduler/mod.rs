//! The scheduler of the active master: binds pending pods to nodes.
//!
//! - [`fit`]: the decision for one pod, pure (filters, then scores).
//! - [`queue`]: which pending pods a cycle tries; pods that fit nowhere wait, parked,
//!   until a node change may help them.
//! - [`marks`]: `PodScheduled=False` + `FailedScheduling` for pods that fit nowhere,
//!   written at a bounded rate beside binding, coalesced by pod.
//! - [`cycle`]: the loop that observes pods and nodes, asks the queue and `fit`, and
//!   binds.
//!
//! It runs as its own task, beside the controllers, for as long as this master holds a
//! leadership token: a controller pass that is busy (10 000 pods to create) does not
//! hold binding up, nor binding the controllers.

mod cycle;
mod fit;
mod marks;
mod queue;

/// Run the scheduler whenever this master holds a leadership token, and stop it the
/// moment it is revoked.
pub(crate) fn spawn(
    store: std::sync::Arc<dyn crate::store::Store>,
    leadership: crate::raft::Leadership,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let reg = std::sync::Arc::new(crate::api::registry::Registry::new(store));
    tokio::spawn(async move {
        leadership
            .run_while_active(shutdown, move |token| {
                cycle::run(reg.clone(), token.cancellation())
            })
            .await;
    });
}
