//! Noticing that an agent closed its connection while its work request waits (long poll).
//!
//! actix-web does not drop a handler whose client went away while the request body was fully
//! read (and its `h1_allow_half_closed(false)` would, but it also drops request bodies still
//! buffered, which breaks upload resumption: the bytes that reached the coordinator must be
//! kept). So each accepted plain-TCP connection gets a duplicate of its socket in the
//! connection's data ([`on_connect`]), and a waiting work request peeks at it now and then
//! ([`PeerSocket::closed`]): end of stream or an error means the agent is gone, and the
//! request stops counting as alive (the allocator serves nobody for it; no lease is committed
//! for it). Connections of another kind (TLS) carry no [`PeerSocket`]; their waiting requests
//! end at their deadline and a lease for them is covered by the unheld-lease bound.

use std::any::Any;
use std::sync::Arc;

use actix_web::dev::Extensions;

/// A duplicate of an accepted connection's socket (same open file description), only peeked.
#[derive(Clone)]
pub struct PeerSocket(Arc<std::net::TcpStream>);

impl PeerSocket {
    /// Has the peer closed the connection (end of stream) or reset it? Never blocks: the
    /// socket is non-blocking (tokio made it so, and the duplicate shares that flag); bytes
    /// of a pipelined next request are only peeked at, never consumed.
    pub fn closed(&self) -> bool {
        let mut buf = [0u8; 1];
        match self.0.peek(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }
}

/// `HttpServer::on_connect` callback: store a [`PeerSocket`] for a plain TCP connection.
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    use std::os::fd::AsFd as _;
    let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() else {
        return;
    };
    match tcp.as_fd().try_clone_to_owned() {
        Ok(fd) => {
            ext.insert(PeerSocket(Arc::new(std::net::TcpStream::from(fd))));
        }
        // Out of descriptors: this connection's long polls end at their deadline instead.
        Err(e) => tracing::warn!(error = %e, "could not watch a connection for its close"),
    }
}

/// Await `fut` while looking at `peer` every 100 ms: once the peer closed the connection,
/// `alive` is dropped (whoever holds its weak reference sees the request gone); `fut` is
/// still awaited to its end (the waiter is answered and dropped by its owner).
pub async fn watching<F: std::future::Future>(
    fut: F,
    peer: &PeerSocket,
    alive: &mut Option<Arc<()>>,
) -> F::Output {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tick.tick(), if alive.is_some() => {
                if peer.closed() {
                    tracing::debug!("client closed its connection during a long poll");
                    *alive = None;
                }
            }
        }
    }
}
