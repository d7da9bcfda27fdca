//! The limits every call meets before authentication: load shedding past the concurrency
//! limit, the call's deadline, and one clear refusal for a request message past the size
//! limit.
//!
//! [`LimitLayer`] wraps the authenticated router, inside the call layer (so a refused call is
//! still counted and logged) and outside authentication (so a shed call costs no token
//! lookup). For each call it:
//!
//! - **sheds** a `keyhold.v1.*` call when [`TransportLimits::max_concurrent_calls`] calls are
//!   already in progress: the caller gets RESOURCE_EXHAUSTED at once ("overloaded; retry
//!   later"), nothing waits in a queue, and [`CALLS_SHED`] counts it. Health and reflection are
//!   never counted or shed, so a load balancer still sees SERVING while the Keyhold services
//!   shed. A call holds its place until its handler has answered; a watch stream holds it only
//!   while it is set up, not while it stays open (streams are bounded per connection by HTTP/2
//!   `max_concurrent_streams` instead);
//! - gives the call its **deadline** ([`super::deadline`]): the caller's `grpc-timeout` or the
//!   server's default, the smaller. A unary call still running then answers
//!   DEADLINE_EXCEEDED at once; its handler's future is dropped on a task of its own, which
//!   rolls its transaction back (`store::Tx` puts an abandoned transaction's connection back
//!   clean or closes it). The default does not apply to streams, which live long: a Watch
//!   call ends at its caller's own `grpc-timeout` and otherwise runs until the client or the
//!   server goes away;
//! - turns tonic's refusal of a request message past [`TransportLimits::max_request_bytes`]
//!   (OUT_OF_RANGE, "decoded message length too large") into RESOURCE_EXHAUSTED naming both
//!   sizes and the setting, as the gRPC status code guide assigns it.
//!
//! Why not tower's `ConcurrencyLimit`, `LoadShed` and `Timeout`: their limits are taken in
//! `poll_ready`, before the request and so its path is known, which cannot leave health out;
//! their refusals are service errors that tonic turns into statuses with its own messages;
//! and `Timeout` knows neither `grpc-timeout` nor streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::deadline::{Deadline, DeadlineBody};
use crate::config::TransportLimits;
use crate::observe::methods;

/// Counter: Keyhold calls refused at once because the server was at its concurrency limit.
pub(crate) const CALLS_SHED: &str = "keyhold_calls_shed_total";
/// Gauge: the concurrency limit (0: none), beside `keyhold_grpc_requests_in_flight`.
pub(crate) const CONCURRENT_CALLS_LIMIT: &str = "keyhold_concurrent_calls_limit";

/// The paths the concurrency limit applies to: every Keyhold service, not health or
/// reflection.
const LIMITED_PATHS: &str = "/keyhold.v1.";

/// The start of tonic's message for a request past `max_decoding_message_size`
/// (tonic 0.14, `codec/decode.rs`), which it answers with OUT_OF_RANGE.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: ";

/// The tower layer that applies the call limits; see the module documentation.
#[derive(Clone, Debug)]
pub(crate) struct LimitLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The places of calls in progress; `None`: no limit.
    calls: Option<Arc<Semaphore>>,
    /// Their number, for the status message.
    max_calls: usize,
    /// The deadline of a unary call whose caller sets none or a longer one.
    default_deadline: Option<Duration>,
}

impl LimitLayer {
    /// The layer for `limits`.
    pub(crate) fn new(limits: &TransportLimits) -> Self {
        let max_calls = limits.max_concurrent_calls.map_or(0, |n| n.get());
        metrics::gauge!(CONCURRENT_CALLS_LIMIT).set(max_calls as f64);
        LimitLayer {
            shared: Arc::new(Shared {
                calls: limits
                    .max_concurrent_calls
                    .map(|n| Arc::new(Semaphore::new(n.get().min(Semaphore::MAX_PERMITS)))),
                max_calls,
                default_deadline: limits.default_deadline,
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for LimitLayer {
    type Service = LimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`LimitLayer`] wraps around the authenticated router.
#[derive(Clone, Debug)]
pub(crate) struct LimitService<S> {
    inner: S,
    shared: Arc<Shared>,
}

type Response = http::Response<tonic::body::Body>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for LimitService<S>
where
    S: tower_service::Service<http::Request<B>, Response = Response>,
    S::Future: Unpin + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let streams = methods::table()
            .get(path.strip_prefix('/').unwrap_or(path))
            .is_some_and(|m| m.streams);
        let default = self.shared.default_deadline.filter(|_| !streams);
        let deadline = match Deadline::of_call(req.headers(), default) {
            Ok(deadline) => deadline,
            Err(status) => return answer(status),
        };
        let place = match (&self.shared.calls, path.starts_with(LIMITED_PATHS)) {
            (Some(calls), true) => match calls.clone().try_acquire_owned() {
                Ok(place) => Some(place),
                Err(_) => {
                    metrics::counter!(CALLS_SHED).increment(1);
                    return answer(overloaded(self.shared.max_calls));
                }
            },
            _ => None,
        };
        let call = self.inner.call(req);
        Box::pin(run(call, place, deadline, streams))
    }
}

/// A response that is only `status`.
fn answer<E: Send + 'static>(status: Status) -> BoxFuture<Result<Response, E>> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}

/// The status of a shed call.
fn overloaded(max_calls: usize) -> Status {
    let mut status = Status::resource_exhausted(format!(
        "the server is overloaded ({max_calls} calls in progress, its --max-concurrent-calls); retry later, with backoff"
    ));
    // gRPC's retry pushback (A6): the call did nothing and may be sent again after a pause.
    status.metadata_mut().insert(
        crate::client::RETRY_PUSHBACK_HEADER,
        tonic::metadata::MetadataValue::from_static(SHED_PUSHBACK_MS),
    );
    status
}

/// The pause, in milliseconds, a shed call's `grpc-retry-pushback-ms` asks for.
const SHED_PUSHBACK_MS: &str = "100";

/// Runs `call` within `deadline`, holding `place` until its handler has answered.
async fn run<F, E>(
    mut call: F,
    place: Option<OwnedSemaphorePermit>,
    deadline: Option<Deadline>,
    streams: bool,
) -> Result<Response, E>
where
    F: Future<Output = Result<Response, E>> + Unpin + Send + 'static,
{
    let response = match deadline {
        None => call.await?,
        Some(deadline) => {
            tokio::select! {
                biased;
                response = &mut call => response?,
                () = tokio::time::sleep_until(deadline.at) => {
                    // The handler is dropped elsewhere, and keeps its place until it is gone:
                    // dropping a running SQLite statement waits for it (diesel-async does
                    // not leave the connection mid-statement), and the caller should have
                    // its answer at the deadline, not after the statement.
                    tokio::spawn(async move {
                        drop(call);
                        drop(place);
                    });
                    return Ok(deadline.exceeded().into_http());
                }
            }
        }
    };
    drop(place);
    let response = match too_large(&response) {
        Some(status) => status.into_http(),
        None => response,
    };
    Ok(match deadline {
        // A stream that started (no status in its headers) ends at the caller's deadline.
        Some(deadline) if streams && !response.headers().contains_key("grpc-status") => {
            response.map(|body| tonic::body::Body::new(DeadlineBody::new(body, deadline)))
        }
        _ => response,
    })
}

/// RESOURCE_EXHAUSTED, naming the sizes and the setting, when `response` is tonic's refusal
/// of a request message past the size limit.
fn too_large(response: &Response) -> Option<Status> {
    let status = response.extensions().get::<Status>()?;
    let sizes = status.message().strip_prefix(TONIC_TOO_LARGE)?;
    (status.code() == tonic::Code::OutOfRange).then(|| {
        Status::resource_exhausted(format!(
            "the request message is too large: {sizes} (--max-request-bytes)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_size_refusal_becomes_resource_exhausted_naming_the_sizes() {
        let tonic_says = Status::out_of_range(format!(
            "{TONIC_TOO_LARGE}found 70000 bytes, the limit is: 65536 bytes"
        ));
        let status = too_large(&tonic_says.into_http()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the request message is too large: found 70000 bytes, the limit is: 65536 bytes (--max-request-bytes)"
        );
        // Other statuses pass untouched, an OUT_OF_RANGE of a handler's own included.
        for other in [
            Status::out_of_range("expected_version: at most 2^63 - 1"),
            Status::invalid_argument(format!("{TONIC_TOO_LARGE}found 1 bytes")),
        ] {
            assert!(too_large(&other.into_http()).is_none());
        }
        assert!(too_large(&http::Response::new(tonic::body::Body::empty())).is_none());
    }

    #[test]
    fn a_shed_call_is_told_to_retry_later() {
        let status = overloaded(256);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("overloaded") && status.message().contains("retry later"),
            "{status:?}"
        );
    }
}
