//! The HTTP listener: one task per connection, plain or TLS, under
//! [`HttpLimits`]: the first byte and then the whole request head (and a TLS
//! handshake) must arrive within `header_timeout`; a connection that moves no byte
//! for `idle_timeout` is closed; a connection lasts at most `connection_timeout`; at
//! most `max_connections` are served at once (more wait in the listen backlog). A
//! slow or silent client costs one connection slot for a bounded time, nothing more.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::state::HttpLimits;

/// The client's address, in every request's extensions (the sign-in rate limit).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// The rustls acceptor for HTTPS, from the coordinator's certificate (the same as
/// gRPC's). HTTP/2 and HTTP/1.1 are offered.
pub fn tls_acceptor(
    pem: &defuse_proto::tls::ServerPem,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate: {e}"))?;
    if certs.is_empty() {
        return Err("TLS certificate: no PEM certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| format!("TLS key: {e}"))?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves `app` until `stop` (over TLS with `tls`), then lets the open connections
/// finish their request under way and waits for them. A failed handshake (a
/// plain-HTTP client, a client that does not trust the certificate) ends only that
/// connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: HttpLimits,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut conns = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        while conns.try_join_next().is_some() {}
        let slot = tokio::select! {
            _ = &mut stop => break,
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // e.g. out of file descriptors: wait instead of spinning
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (app, tls, limits, stop_rx) =
            (app.clone(), tls.clone(), limits.clone(), stop_rx.clone());
        conns.spawn(async move {
            let _slot = slot;
            let tcp = Tracked::new(tcp);
            let activity = tcp.activity.clone();
            // a request under way is activity, however long its handler takes
            let (on_req, on_resp) = (activity.clone(), activity.clone());
            let app = tower::ServiceExt::map_request(
                app,
                move |mut r: axum::extract::Request<hyper::body::Incoming>| {
                    on_req.in_flight.fetch_add(1, Ordering::Relaxed);
                    r.extensions_mut().insert(Peer(peer));
                    r
                },
            );
            let app = tower::ServiceExt::map_response(app, move |r: axum::response::Response| {
                on_resp.in_flight.fetch_sub(1, Ordering::Relaxed);
                on_resp.touch(false);
                r
            });
            let whole = async {
                match tls {
                    None => connection(tcp, app, &limits, stop_rx).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(t)) => connection(t, app, &limits, stop_rx).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "tls handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                        }
                    }
                }
            };
            tokio::select! {
                r = tokio::time::timeout(limits.connection_timeout, whole) => {
                    if r.is_err() {
                        tracing::debug!(%peer, "http connection closed at its time limit");
                    }
                }
                () = activity.idle(limits.header_timeout, limits.idle_timeout) => {
                    tracing::debug!(%peer, "http connection closed: quiet too long");
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// One connection: HTTP/1.1 (the request head within `header_timeout`) or HTTP/2;
/// on stop, the request under way finishes and the connection closes.
async fn connection<I, S>(
    io: I,
    app: S,
    limits: &HttpLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            axum::extract::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    b.http2().timer(TokioTimer::new());
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let stopping = async move {
        // the watch's guard is dropped here, not held across the connection's await
        let _ = stop.wait_for(|s| *s).await.map(|_| ());
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
            return;
        }
        () = stopping => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// When a connection last moved a byte, in ms since it was accepted, and how many
/// of its requests are being answered.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Whether any byte has come in yet.
    spoke: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn touch(&self, read: bool) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
        if read {
            self.spoke.store(true, Ordering::Relaxed);
        }
    }

    /// Returns once the connection has been quiet too long with no request under
    /// way: `first` before its first byte, `idle` after.
    async fn idle(&self, first: Duration, idle: Duration) {
        loop {
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                self.touch(false);
            }
            let limit = if self.spoke.load(Ordering::Relaxed) {
                idle
            } else {
                first
            };
            let quiet = self
                .start
                .elapsed()
                .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)));
            if quiet >= limit {
                return;
            }
            tokio::time::sleep((limit - quiet).max(Duration::from_millis(50))).await;
        }
    }
}

/// A stream that records when it last moved a byte (see [`Activity`]).
struct Tracked<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> Tracked<I> {
    fn new(io: I) -> Tracked<I> {
        Tracked {
            io,
            activity: Arc::new(Activity {
                start: Instant::now(),
                last_ms: AtomicU64::new(0),
                in_flight: std::sync::atomic::AtomicUsize::new(0),
                spoke: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch(true);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch(false);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch(false);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
