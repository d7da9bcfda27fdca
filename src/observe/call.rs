//! The per-call layer: request ids, per-RPC metrics and the one log line of every call.
//!
//! [`CallLayer`] wraps the whole router, outside authentication, so it sees every call,
//! refused ones included. For each call it:
//!
//! - takes the request id from the `x-request-id` header when the caller sent a usable one
//!   (1 to 128 characters of `A-Z a-z 0-9 - _ . : + / = @`), or generates one (a UUID), and
//!   returns it in the response's `x-request-id` header; logs written while the call runs
//!   carry it in their `call` span;
//! - counts the call in [`REQUESTS`] by service, method and gRPC status code, records its
//!   latency in [`REQUEST_DURATION`], and counts it in [`IN_FLIGHT`] while it runs;
//! - writes one log line (target `keyhold::call`): method, code, latency in milliseconds, the
//!   caller's role (as the authentication layer found it; `none` for calls without a token,
//!   such as health checks) and the request id. Nothing else of the request or response is
//!   logged: no token, no body.
//!
//! The status code is read where gRPC puts it: the `grpc-status` response header for a
//! response that is only a status (a refusal before any message, from the service or from
//! authentication), otherwise the `grpc-status` trailer after the last message. So a call is
//! counted and logged when its response ends: for a server stream (the Watch calls), when the
//! stream ends, with its duration as the latency and the code its trailers carry, or the
//! header code when it was refused before it started. A call whose response the client
//! abandons before the status is sent (a client that cancels, or closes a stream) is counted
//! as `CANCELLED`.
//!
//! Method labels come from a fixed list ([`super::methods`]): a path the server does not
//! answer is labelled `unknown`, so callers cannot add metric series.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::header::HeaderValue;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tracing::Instrument;

use super::methods::{code_name, name_of, CallName};
use crate::auth::Role;

/// Counter: calls answered, by `service`, `method` and `code`.
pub(crate) const REQUESTS: &str = "keyhold_grpc_requests_total";
/// Histogram: call latency in seconds, by `service` and `method`.
pub(crate) const REQUEST_DURATION: &str = "keyhold_grpc_request_duration_seconds";
/// Gauge: calls in progress (open streams included).
pub(crate) const IN_FLIGHT: &str = "keyhold_grpc_requests_in_flight";

/// The header a request id travels in, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a caller.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The tower layer that observes every call; see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CallLayer;

impl<S> tower_layer::Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService { inner }
    }
}

/// The service [`CallLayer`] wraps around the authenticated router.
#[derive(Clone, Debug)]
pub(crate) struct CallService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for CallService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<ObservedBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let request_id = request_id(req.headers());
        // A generated id reaches the services too, as if the caller had sent it.
        req.headers_mut()
            .insert(REQUEST_ID_HEADER, request_id.clone());
        let mut call = CallRecord::start(name_of(req.uri().path()), request_id);
        let span = tracing::info_span!("call", request_id = call.request_id_str());
        let response = self.inner.call(req).instrument(span);
        Box::pin(async move {
            let mut response = response.await?;
            response
                .headers_mut()
                .insert(REQUEST_ID_HEADER, call.request_id.clone());
            call.role = response.extensions().get::<Role>().copied();
            // A response that is only a status carries it in its headers, and no trailers.
            let call = match grpc_status(response.headers()) {
                Some(code) => {
                    call.finish(code);
                    None
                }
                None => Some(call),
            };
            Ok(response.map(|inner| ObservedBody { inner, call }))
        })
    }
}

/// The caller's request id when it is usable, else a new UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let usable = |v: &&HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_REQUEST_ID_LEN
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:+/=@".contains(c))
    };
    match headers.get(REQUEST_ID_HEADER).filter(usable) {
        Some(v) => v.clone(),
        None => {
            let id = uuid::Uuid::now_v7().hyphenated().to_string();
            // A hyphenated UUID is always a valid header value.
            HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("unknown"))
        }
    }
}

/// The `grpc-status` a header map carries, if any.
fn grpc_status(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// One call being observed: counted in [`IN_FLIGHT`] from its start until it is finished,
/// and finished exactly once (as `CANCELLED` if dropped first).
struct CallRecord {
    name: CallName,
    request_id: HeaderValue,
    role: Option<Role>,
    started: Instant,
    finished: bool,
}

impl CallRecord {
    fn start(name: CallName, request_id: HeaderValue) -> Self {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        CallRecord {
            name,
            request_id,
            role: None,
            started: Instant::now(),
            finished: false,
        }
    }

    fn request_id_str(&self) -> &str {
        // Either checked to be ASCII or generated.
        self.request_id.to_str().unwrap_or("unknown")
    }

    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let latency = self.started.elapsed();
        let (service, method) = (self.name.service, self.name.method);
        let code = code_name(code);
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
        metrics::counter!(REQUESTS, "service" => service, "method" => method, "code" => code)
            .increment(1);
        metrics::histogram!(REQUEST_DURATION, "service" => service, "method" => method)
            .record(latency.as_secs_f64());
        let method: &Cow<'static, str> = &self.name.logged;
        let role = self.role.map_or("none", Role::name);
        let latency_ms = latency.as_secs_f64() * 1000.0;
        let request_id = self.request_id_str();
        // Failures that are the server's, not the caller's, stand out as warnings.
        if matches!(code, "INTERNAL" | "UNKNOWN" | "DATA_LOSS" | "UNAVAILABLE") {
            tracing::warn!(target: "keyhold::call", method = %method, code, latency_ms, role, request_id, "call");
        } else {
            tracing::info!(target: "keyhold::call", method = %method, code, latency_ms, role, request_id, "call");
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that finishes its call's record when the `grpc-status` trailer goes by,
/// or when the body ends or is dropped without one.
pub(crate) struct ObservedBody {
    inner: tonic::body::Body,
    call: Option<CallRecord>,
}

impl Body for ObservedBody {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().and_then(grpc_status),
            // The stream broke before its status: the client sees no status either.
            Some(Err(_)) => Some(tonic::Code::Unknown),
            // Ended without a status: not a well-formed gRPC response.
            None => Some(tonic::Code::Unknown),
        };
        if let (Some(code), Some(call)) = (code, self.call.as_mut()) {
            call.finish(code);
            self.call = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usable_request_id_is_kept_and_others_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_static("req-42_a.b:c"));
        assert_eq!(request_id(&h), "req-42_a.b:c");
        for bad in [
            "",
            "has space",
            "quote\"",
            &"x".repeat(MAX_REQUEST_ID_LEN + 1),
        ] {
            h.insert(REQUEST_ID_HEADER, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&h);
            assert_ne!(id, bad);
            assert!(
                uuid::Uuid::parse_str(id.to_str().unwrap()).is_ok(),
                "{id:?}"
            );
        }
        assert!(uuid::Uuid::parse_str(request_id(&HeaderMap::new()).to_str().unwrap()).is_ok());
    }

    #[test]
    fn grpc_status_is_read_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&h), Some(tonic::Code::Unavailable));
    }
}
