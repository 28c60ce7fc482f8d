//! Run one worker (or hollow nodes) without the `ballast` binary, for trying the worker
//! against `master/examples/memapi.rs`:
//!
//! ```text
//! cargo run -p ballast-worker --example worker -- CONFIG ID [HOLLOW_COUNT]
//! ```

use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let (Some(config), Some(id)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: worker CONFIG ID [HOLLOW_COUNT]");
    };
    let hollow: Option<usize> = args.next().map(|n| n.parse()).transpose()?;
    let loaded = ballast_config::load(&config)?;
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).unwrap();
        let mut int = signal(SignalKind::interrupt()).unwrap();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        s.cancel();
    });
    match hollow {
        Some(n) => ballast_worker::run_hollow(loaded, id, n, shutdown).await?,
        None => ballast_worker::run(loaded, id, shutdown).await?,
    }
    Ok(())
}
