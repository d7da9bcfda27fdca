//! The metrics listener (`--metrics-listen`): `GET /metrics` in the Prometheus text format,
//! over plain HTTP/1.1, on an address of its own so it can stay inside the operator's network
//! while gRPC faces callers. The exporter only renders; hyper (already under tonic) serves,
//! which keeps the exporter's own listener, and its TLS stack, out of the build.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::recorder::{install_recorder, record_pool_status, RecorderError};
use crate::store::Store;

/// The content type of the Prometheus text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `listener` until `shutdown` completes, installing the recorder first
/// if nothing has. Each scrape first reads `store`'s pool into the pool gauges.
pub async fn serve_metrics(
    listener: TcpListener,
    store: Store,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RecorderError> {
    let handle = install_recorder()?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait for the next connection.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    continue;
                }
            },
        };
        let (handle, store) = (handle.clone(), store.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = respond(&req, &handle, &store);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn respond(
    req: &http::Request<Incoming>,
    handle: &PrometheusHandle,
    store: &Store,
) -> http::Response<Full<Bytes>> {
    let plain = |status: http::StatusCode, text: &'static str| {
        let mut r = http::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(http::StatusCode::NOT_FOUND, "not found: try /metrics\n");
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return plain(http::StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    record_pool_status(store);
    let mut r = http::Response::new(Full::new(Bytes::from(handle.render())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(TEXT_FORMAT),
    );
    r
}
