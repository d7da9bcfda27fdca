//! The TLS accept loop: TCP connections in, finished TLS sessions out, for tonic's
//! `serve_with_incoming_shutdown`.
//!
//! Handshakes run on tasks of their own, so a slow or silent client holds up nobody; each has
//! a deadline, and at most [`MAX_PENDING_HANDSHAKES`] run at once (a connection past that is
//! closed at once rather than queued). A failed handshake — no client certificate when one is
//! required, a certificate from another CA, a protocol error — is logged and dropped, and the
//! loop goes on. The loop ends when the stream is dropped (the server stopped).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;

use super::ServerTls;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// The connections [`incoming`] yields: TLS sessions whose handshake completed.
pub struct TlsIncoming {
    ready: mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready.poll_recv(cx)
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        // The server stopped taking connections: stop accepting them (closes the listener).
        self.accept_loop.abort();
    }
}

/// Accepts TCP connections on `listener` and yields each once its TLS handshake, with the
/// configuration `tls` holds at that moment, has completed. `TCP_NODELAY` is set on every
/// connection (see `server::serve`).
pub fn incoming(listener: TcpListener, tls: ServerTls) -> TlsIncoming {
    let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
    let accept_loop = tokio::spawn(accept_loop(listener, tls, ready_tx));
    TlsIncoming { ready, accept_loop }
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    ready: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let (tcp, peer) = tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Per-connection errors (the peer reset before accept) and resource
                    // exhaustion (too many open files) alike: log, let it pass, go on.
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    if !is_connection_error(&e) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many TLS handshakes in progress: closing the connection");
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = TlsAcceptor::from(tls.current());
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    // The server stopped in the meantime: the connection just closes.
                    let _ = ready.send(Ok(stream)).await;
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
            drop(permit);
        });
    }
}

/// Errors about one connection only, after which accepting the next one can go on at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}
