//! Whether a request that ends in "not active" may be sent again elsewhere.
//!
//! A write the store refuses with [`super::StoreError::NotActive`] was never proposed (or
//! was truncated): it is not and will never be committed. The request it belongs to is
//! therefore *unacted*, and a proxy may replay it on the new active master, exactly as it
//! replays requests a non-active master refuses at the door, unless an earlier write of
//! the same request was committed. Each request runs inside [`track`], which counts the
//! writes committed by the request's own task ([`committed`], called by the store); the
//! API handlers write from that task (they never spawn writes).

use std::cell::Cell;
use std::future::Future;

tokio::task_local! {
    static COMMITTED: Cell<u32>;
}

/// A write of the current request was committed.
pub(crate) fn committed() {
    // outside a tracked request (controllers, scheduler) there is nothing to record
    let _outside = COMMITTED.try_with(|c| c.set(c.get().saturating_add(1)));
}

/// Run `fut` (one request), and tell whether any of its writes was committed.
pub(crate) async fn track<F: Future>(fut: F) -> (F::Output, bool) {
    COMMITTED
        .scope(Cell::new(0), async move {
            let out = fut.await;
            let any = COMMITTED.with(|c| c.get() > 0);
            (out, any)
        })
        .await
}

/// Marks a response that carries the store's "not active" refusal of a write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NotActiveRefusal;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_the_writes_of_its_own_request_only() {
        let ((), any) = track(async {}).await;
        assert!(!any);
        let ((), any) = track(async { committed() }).await;
        assert!(any);
        // outside a request: no effect, no panic
        committed();
    }
}
