//! Run only the proxy from a cluster config (for manual testing without the whole
//! binary): `cargo run -p ballast-proxy --example proxy-only -- ballast.toml`.

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: proxy-only CONFIG");
        std::process::exit(2);
    };
    if let Err(e) = ballast_proxy::run(std::path::Path::new(&path)) {
        eprintln!("proxy failed: {e}");
        std::process::exit(1);
    }
}
