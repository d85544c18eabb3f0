//! The coordinator's servers: gRPC (both services), HTTP (the page, health, metrics)
//! and the driver loop, started together and stopped together.
use std::time::Duration;

use defuse_proto::job_service_server::JobServiceServer;
use defuse_proto::worker_service_server::WorkerServiceServer;
use defuse_proto::MAX_MESSAGE_BYTES;
use tonic::service::interceptor::InterceptedService;

use crate::state::Coordinator;

/// Why the servers could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Config(String),
}

/// Serves both gRPC services on `grpc` (and, given `http`, the web page, health
/// checks and metrics there), and runs the driver loop until `shutdown`.
pub async fn serve(
    coord: Coordinator,
    grpc: tokio::net::TcpListener,
    http: Option<(tokio::net::TcpListener, crate::http::HttpOptions)>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // tokens and TLS settings are checked before anything starts
    defuse_proto::auth::check_tokens(
        coord.inner.cfg.token.as_ref(),
        coord.inner.cfg.worker_token.as_ref(),
    )
    .map_err(ServeError::Config)?;
    let tls = coord.inner.cfg.tls.clone();
    let http_tls = match &tls {
        Some(pem) => Some(crate::http::tls_acceptor(pem).map_err(ServeError::Tls)?),
        None => None,
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(pem) = &tls {
        server = server.tls_config(pem.grpc())?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let driver = tokio::spawn(crate::driver::run(coord.clone(), stopped(stop_rx.clone())));
    let web = http.map(|(listener, opts)| {
        let limits = coord.inner.cfg.http_limits.clone();
        let app = crate::http::router(coord.clone(), opts);
        let stop = stopped(stop_rx.clone());
        tokio::spawn(crate::http::serve(listener, app, http_tls, limits, stop))
    });
    use defuse_proto::auth::{Guard, Role};
    let (user, worker) = (
        coord.inner.cfg.token.as_ref(),
        coord.inner.cfg.worker_token.as_ref(),
    );
    // TCP_NODELAY: without it Nagle's algorithm holds a lease reply back until the
    // client's delayed ACK, ~40 ms per lease (seen in bench/run.py's coordinator row).
    let incoming = tonic::transport::server::TcpIncoming::from(grpc)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let r = server
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(coord.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            Guard::new(Role::Worker, worker, user),
        ))
        .add_service(InterceptedService::new(
            JobServiceServer::new(coord.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            Guard::new(Role::User, user, worker),
        ))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx))
        .await;
    // the driver ends after the tick under way; the central steps it started are
    // stopped (each is idempotent: the next leader runs it again)
    let _ = driver.await;
    for task in crate::driver::stop_central_steps(&coord, "shutting down") {
        // ends at its next await (a blocking part under way finishes on its thread)
        let _ = task.await;
    }
    // another coordinator leads at once, not after the lease runs out
    if let Err(e) = coord.inner.store.resign(&coord.inner.node).await {
        tracing::warn!(error = %e, "cannot give up the leader lease; it ends by itself");
    }
    if let Some(w) = web {
        let _ = w.await;
    }
    Ok(r?)
}
