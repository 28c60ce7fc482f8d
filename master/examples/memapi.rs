//! Serve the Kubernetes-compatible API on an in-memory store, to try real kubectl:
//!
//! ```text
//! cargo run -p ballast-master --example memapi -- 127.0.9.9:6443
//! ```

use std::sync::Arc;
use std::time::Duration;

use ballast_master::api::{self, ApiInfo};
use ballast_master::store::{MemStore, Store};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.9.9:6443".into());
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    api::ensure_defaults(store.as_ref()).await?;
    let mut info = ApiInfo::new("memapi", "m1");
    info.server_address = addr.clone();
    let gc = api::gc::run(
        api::Registry::new(store.clone()),
        Duration::from_secs(2),
        CancellationToken::new(),
    );
    tokio::spawn(gc);
    let app = api::router(store, info);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("memapi serving the Kubernetes API on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
