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
    defuse_proto::auth::check_metrics_token(
        coord.inner.cfg.metrics_token.as_ref(),
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
    // gRPC health (grpc.health.v1: "" and each service; Kubernetes gRPC probes,
    // grpc-health-probe) and reflection (grpcurl, grpcui) take no token: they reveal
    // whether the coordinator serves and the public schema of proto/defuse.proto,
    // nothing of any job
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<WorkerServiceServer<Coordinator>>()
        .await;
    health.set_serving::<JobServiceServer<Coordinator>>().await;
    let readiness = tokio::spawn(report_readiness(
        coord.clone(),
        health.clone(),
        stopped(stop_rx.clone()),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(defuse_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Config(format!("gRPC reflection: {e}")))?;
    let r = server
        .trace_fn(grpc_span)
        .add_service(health_service)
        .add_service(reflection)
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
    let _ = readiness.await;
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

/// Keeps the gRPC health status of "" (the whole server) in step with readiness: NOT_SERVING
/// while the state store does not answer, and from shutdown on.
async fn report_readiness(
    coord: Coordinator,
    health: tonic_health::server::HealthReporter,
    stop: impl std::future::Future<Output = ()>,
) {
    use tonic_health::ServingStatus;
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = ServingStatus::Serving;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let now = match coord.ready().await {
            Ok(()) => ServingStatus::Serving,
            Err(e) => {
                if last == ServingStatus::Serving {
                    tracing::warn!(error = %e, "gRPC health: not serving (state store unreachable)");
                }
                ServingStatus::NotServing
            }
        };
        health.set_service_status("", now).await;
        last = now;
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<WorkerServiceServer<Coordinator>>()
        .await;
    health
        .set_not_serving::<JobServiceServer<Coordinator>>()
        .await;
}

/// The span of one gRPC call, in the caller's trace when it sent a `traceparent`.
/// A worker's polls (register, lease, heartbeat) and health checks are debug spans:
/// at the default level they are not recorded, so they neither flood a trace backend
/// nor end up in a job's trace.
fn grpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let rpc = req.uri().path();
    let poll = rpc.ends_with("/Lease")
        || rpc.ends_with("/Heartbeat")
        || rpc.ends_with("/Register")
        || rpc.starts_with("/grpc.");
    let span = if poll {
        tracing::debug_span!("grpc", rpc, trace_id = tracing::field::Empty)
    } else {
        tracing::info_span!("grpc", rpc, trace_id = tracing::field::Empty)
    };
    if let Some(tp) = crate::http::traceparent(req.headers()) {
        defuse_proto::trace::adopt(&span, &tp);
    }
    span
}
