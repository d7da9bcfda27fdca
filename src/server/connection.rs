//! The end of a connection past its maximum age and grace.
//!
//! tonic sends GOAWAY when a connection reaches `max_connection_age`: no new calls on it, the
//! ones in progress finish, the client reconnects (to another replica, perhaps). A watch
//! stream never finishes, so a bound is needed after that: the grace. tonic 0.14's own
//! `max_connection_age_grace` does not give it — with a grace set it skips the GOAWAY and
//! closes the connection outright at age plus grace, cutting every call in progress without
//! warning. So the server gives tonic the age alone, and each accepted connection is an
//! [`AgedConnection`] whose reads and writes fail once age plus grace has passed, which makes
//! hyper drop it (the client sees the connection reset and reconnects, as it does for any lost
//! connection).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// An accepted connection that ends, hard, once its time is up.
pub(crate) struct AgedConnection<IO> {
    io: IO,
    /// When the connection is closed; `None`: never (by this wrapper).
    closes: Option<Pin<Box<Sleep>>>,
}

impl<IO> AgedConnection<IO> {
    /// `io`, closed `lifetime` from now when given.
    pub(crate) fn new(io: IO, lifetime: Option<Duration>) -> Self {
        AgedConnection {
            io,
            closes: lifetime.map(|d| Box::pin(tokio::time::sleep(d))),
        }
    }

    /// An error once the time is up, and a wake-up registered for then otherwise.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let up = self
            .closes
            .as_mut()
            .is_some_and(|closes| closes.as_mut().poll(cx).is_ready());
        match up {
            true => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection closed: past its maximum age and grace (--max-connection-age-secs, --max-connection-age-grace-secs)",
            )),
            false => Ok(()),
        }
    }
}

impl<IO: Connected> Connected for AgedConnection<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AgedConnection<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AgedConnection<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_and_writes_fail_once_the_time_is_up() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut aged = AgedConnection::new(ours, Some(Duration::from_millis(50)));
        theirs.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        aged.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        // Nothing more arrives: the read waits, and fails when the time is up.
        let err = aged.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(aged.write_all(b"x").await.is_err());

        let (ours, _theirs) = tokio::io::duplex(64);
        let mut forever = AgedConnection::new(ours, None);
        forever.write_all(b"still open").await.unwrap();
    }
}
