//! Accepting connections without letting clients exhaust the process:
//! the server's own accept loop in place of tonic's.
//!
//! - **Connection limit.** At most [`ConnectionLimits::connections_max`]
//!   connections are open at once; one more is accepted and closed at
//!   once (the client sees the connection reset, and retries elsewhere or
//!   later), with a warning at most every [`WARN_EVERY`].
//! - **Handshake timeout.** A connection must send the HTTP/2 client
//!   preface (24 bytes) within [`ConnectionLimits::handshake_timeout`], or
//!   it is closed: sockets that never speak cannot hold file descriptors.
//!   Once the preface is in, HTTP/2 keepalive pings (set on the server in
//!   `server::run`) close connections whose peer has gone.
//! - **Accept backoff.** When accept fails for lack of file descriptors or
//!   memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) the loop pauses
//!   [`ACCEPT_BACKOFF`] instead of spinning, and says so.
//! - **TCP keepalive** on every connection ([`TCP_KEEPALIVE`]), so a peer
//!   that vanished without a FIN is found by the kernel too.
//!
//! The file-descriptor limit itself is raised to its hard maximum at start
//! by [`raise_fd_limit`]; the default connection limit is derived from it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long accept pauses after EMFILE and the like.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Repeated warnings (refused connections, accept failures) are logged at
/// most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(5);
/// Idle time before the kernel starts probing a connection.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Default handshake timeout.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Length of the HTTP/2 client connection preface.
const PREFACE_BYTES: usize = 24;
/// File descriptors kept out of the connection budget for logs, the
/// metadata store and the runtime, and the share of the rest that
/// connections may take by default.
const FDS_RESERVED: u64 = 64;

/// Limits on accepted connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub connections_max: usize,
    /// Time a new connection has to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
}

impl ConnectionLimits {
    /// The defaults for a process whose soft file-descriptor limit is
    /// `fd_limit`: half of what is left after [`FDS_RESERVED`] (at least
    /// 16), the other half being for topic and subscription files.
    pub fn for_fd_limit(fd_limit: u64) -> ConnectionLimits {
        let half = fd_limit.saturating_sub(FDS_RESERVED) / 2;
        ConnectionLimits {
            connections_max: usize::try_from(half.max(16)).unwrap_or(usize::MAX),
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the soft
/// limit in effect afterwards.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot read the file descriptor limit");
        return 1024;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(
                from = before,
                to = lim.rlim_max,
                "raised the file descriptor limit"
            );
            return lim.rlim_max;
        }
        tracing::warn!(error = %io::Error::last_os_error(), limit = before, "cannot raise the file descriptor limit");
    }
    before
}

/// Accepts connections from `listener` under `limits`, as a stream for
/// tonic's `serve_with_incoming_shutdown`. Never yields an error: accept
/// failures are handled (and logged) here.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let open = Arc::new(AtomicUsize::new(0));
        let mut refused_warned: Option<Instant> = None;
        let mut accept_warned: Option<Instant> = None;
        let mut refused = 0u64;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return, // the server stopped
            };
            match accepted {
                Ok((stream, peer)) => {
                    if open.load(Ordering::Relaxed) >= limits.connections_max {
                        refused += 1;
                        if due(&mut refused_warned) {
                            tracing::warn!(
                                %peer,
                                connections_max = limits.connections_max,
                                refused,
                                "connection limit reached: closing new connections"
                            );
                        }
                        drop(stream);
                        continue;
                    }
                    let conn = Connection::new(stream, peer, limits.handshake_timeout, &open);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) if is_exhaustion(&e) => {
                    if due(&mut accept_warned) {
                        tracing::warn!(error = %e, backoff_ms = ACCEPT_BACKOFF.as_millis() as u64, "cannot accept connections: out of file descriptors or memory; pausing accept");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                // The peer gave up before we accepted: nothing to do.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    if due(&mut accept_warned) {
                        tracing::error!(error = %e, "accept failed; pausing accept");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// True (and remembers now) if a warning was not logged within
/// [`WARN_EVERY`].
fn due(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// One accepted connection: counted against the limit while it lives, and
/// closed if it does not send the HTTP/2 preface in time.
pub struct Connection {
    stream: TcpStream,
    info: TcpConnectInfo,
    /// Until the preface is in: when it must be, and how many bytes came.
    handshake: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
    _counted: Counted,
}

impl Connection {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
        open: &Arc<AtomicUsize>,
    ) -> Connection {
        // Small responses must not wait for delayed ACKs.
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(peer),
        };
        open.fetch_add(1, Ordering::Relaxed);
        Connection {
            stream,
            info,
            handshake: Some((Box::pin(tokio::time::sleep(timeout)), 0)),
            _counted: Counted(open.clone()),
        }
    }
}

/// Takes a connection off the count when it is dropped.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((deadline, _)) = &mut this.handshake {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the handshake timeout",
                )));
            }
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if let Some((_, got)) = &mut this.handshake {
            *got += buf.filled().len() - before;
            if *got >= PREFACE_BYTES {
                this.handshake = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_limit_leaves_room_for_files() {
        assert_eq!(ConnectionLimits::for_fd_limit(1024).connections_max, 480);
        assert_eq!(ConnectionLimits::for_fd_limit(64).connections_max, 16);
        assert_eq!(
            ConnectionLimits::for_fd_limit(1 << 20).connections_max,
            ((1 << 20) - 64) / 2
        );
    }
}
