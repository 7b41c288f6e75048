//! Runs the broker behind its gRPC services until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;

use crate::broker::BrokerConfig;

/// What `courier serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub broker: BrokerConfig,
}

/// Opens the broker, serves gRPC on `opts.listen` until `shutdown`
/// completes, then stops accepting, finishes in-flight RPCs, and closes
/// (syncs) every log. `on_ready` is called with the bound address.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr) + Send,
) -> anyhow::Result<()> {
    let _ = (opts, shutdown, on_ready);
    anyhow::bail!("not yet implemented")
}
