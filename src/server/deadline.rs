//! A call's deadline: the caller's `grpc-timeout` and the server's default, the smaller of
//! the two, and the end of a stream whose caller set one.
//!
//! `grpc-timeout` is read as the gRPC over HTTP/2 protocol defines it: 1 to 8 ASCII digits
//! and a unit, `H` (hours), `M` (minutes), `S` (seconds), `m` (milliseconds), `u`
//! (microseconds) or `n` (nanoseconds). Anything else is refused with INVALID_ARGUMENT
//! naming the header, rather than ignored: a caller who believes it set a deadline should not
//! get the server's instead.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::Status;

/// The header a caller's timeout travels in.
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Who set a call's deadline, for the status message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeadlineSource {
    /// The caller, with `grpc-timeout`.
    Caller,
    /// The server's default (`--default-deadline-ms`).
    Server,
}

/// When a call must have answered, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadline {
    /// The instant it passes.
    pub(crate) at: Instant,
    /// Its length from the call's start.
    pub(crate) length: Duration,
    /// Who set it.
    pub(crate) source: DeadlineSource,
}

impl Deadline {
    /// The deadline of a call that starts now with `headers`: the caller's `grpc-timeout` or
    /// `default`, the smaller; `None` when neither is set. A malformed `grpc-timeout` is
    /// INVALID_ARGUMENT.
    pub(crate) fn of_call(
        headers: &HeaderMap,
        default: Option<Duration>,
    ) -> Result<Option<Deadline>, Status> {
        let requested = match headers.get(GRPC_TIMEOUT) {
            None => None,
            Some(value) => Some(parse_grpc_timeout(value.as_bytes()).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "{GRPC_TIMEOUT}: {value:?} is not a gRPC timeout (1 to 8 digits, then H, M, S, m, u or n)"
                ))
            })?),
        };
        let (length, source) = match (requested, default) {
            (Some(asked), Some(default)) if default < asked => (default, DeadlineSource::Server),
            (Some(asked), _) => (asked, DeadlineSource::Caller),
            (None, Some(default)) => (default, DeadlineSource::Server),
            (None, None) => return Ok(None),
        };
        // A deadline beyond what the clock can represent is no deadline.
        Ok(Instant::now()
            .checked_add(length)
            .map(|at| Deadline { at, length, source }))
    }

    /// The status of a call still running at the deadline.
    pub(crate) fn exceeded(&self) -> Status {
        let length = self.length;
        Status::deadline_exceeded(match self.source {
            DeadlineSource::Caller => format!(
                "the call's deadline of {length:?} (its grpc-timeout) passed; the call was stopped"
            ),
            DeadlineSource::Server => format!(
                "the call ran past the server's deadline of {length:?} (--default-deadline-ms); the call was stopped"
            ),
        })
    }
}

/// A `grpc-timeout` value as a duration, or `None` when it is malformed.
pub(crate) fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: fits in a u64 with room for the unit's factor.
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A streamed response that ends at the call's deadline: then it drops the stream (whose task
/// sees its receiver gone and stops) and sends DEADLINE_EXCEEDED as the trailers.
pub(crate) struct DeadlineBody {
    /// The response's body, until it ends or the deadline passes.
    inner: Option<tonic::body::Body>,
    timer: Pin<Box<Sleep>>,
    deadline: Deadline,
}

impl DeadlineBody {
    /// `inner`, cut at `deadline`.
    pub(crate) fn new(inner: tonic::body::Body, deadline: Deadline) -> Self {
        DeadlineBody {
            inner: Some(inner),
            timer: Box::pin(tokio::time::sleep_until(deadline.at)),
            deadline,
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if this.timer.as_mut().poll(cx).is_ready() {
            this.inner = None;
            let mut trailers = HeaderMap::new();
            // A status built here always encodes (its message is ours, its details empty).
            let _ = this.deadline.exceeded().add_header(&mut trailers);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        if frame
            .as_ref()
            .is_none_or(|f| f.as_ref().map_or(true, Frame::is_trailers))
        {
            // Ended: nothing may follow, not even the deadline's trailers.
            this.inner = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::BodyExt;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let ok = [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("30S", Duration::from_secs(30)),
            ("250m", Duration::from_millis(250)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("5n", Duration::from_nanos(5)),
            ("0m", Duration::ZERO),
        ];
        for (text, expected) in ok {
            assert_eq!(
                parse_grpc_timeout(text.as_bytes()),
                Some(expected),
                "{text}"
            );
        }
        for bad in [
            "",
            "S",
            "10",
            "10s",
            "123456789m",
            "-1S",
            "1.5S",
            " 1S",
            "1 S",
        ] {
            assert_eq!(parse_grpc_timeout(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn the_smaller_of_the_callers_and_the_servers_deadline_wins() {
        let mut headers = HeaderMap::new();
        let of = |headers: &HeaderMap, default| Deadline::of_call(headers, default).unwrap();
        assert_eq!(of(&headers, None), None);
        let server = of(&headers, Some(Duration::from_secs(30))).unwrap();
        assert_eq!(
            (server.length, server.source),
            (Duration::from_secs(30), DeadlineSource::Server)
        );
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("200m"));
        let caller = of(&headers, Some(Duration::from_secs(30))).unwrap();
        assert_eq!(
            (caller.length, caller.source),
            (Duration::from_millis(200), DeadlineSource::Caller)
        );
        assert_eq!(of(&headers, None).unwrap().source, DeadlineSource::Caller);
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("1H"));
        let capped = of(&headers, Some(Duration::from_secs(30))).unwrap();
        assert_eq!(capped.source, DeadlineSource::Server);
        assert!(capped
            .exceeded()
            .message()
            .contains("--default-deadline-ms"));

        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("soon"));
        let refused = Deadline::of_call(&headers, None).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().starts_with("grpc-timeout:"),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_past_its_deadline_ends_with_deadline_exceeded() {
        // A body that never ends, as a watch stream's.
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(1);
        let endless =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("50m"));
        let deadline = Deadline::of_call(&headers, None).unwrap().unwrap();
        let mut body = DeadlineBody::new(tonic::body::Body::new(endless), deadline);
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("grpc-timeout"), "{status:?}");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }
}
