//! The proxy's byte plumbing: the stream of one end ([`Stream`]: plain TCP, or TLS the proxy
//! terminates), a buffered reader that notices mode changes (blackhole and partition windows)
//! while it waits, and a writer ([`Flow`]) that paces bytes to the bandwidth cap and stops
//! exactly at a fault's byte offset. Everything above this module sees decrypted bytes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Action;

/// The proxy's state, set by the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Accept, never forward (a silent partition).
    Blackhole,
    /// Reset live connections, refuse new ones (an unreachable network).
    Refuse,
}

pub type ModeRx = watch::Receiver<Mode>;

/// One end of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// Why bytes stopped flowing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The side closed its connection (EOF).
    Eof(Side),
    /// Reading or writing failed on the side (reset, broken pipe).
    Io(Side),
    /// A partition started.
    Refused,
    /// A blackhole window started.
    Blackhole,
    /// A fault fired: `rule` is the rule's index, `None` for a connection-level reset.
    Fault { action: Action, rule: Option<usize> },
    /// Not HTTP/1.1 the proxy can frame.
    Protocol(String),
}

/// One end of a proxied connection: plain TCP, or a TLS session over it that the proxy
/// terminates (the agent's end: the proxy is the server; the coordinator's end: the proxy is
/// the client). Reads and writes carry the decrypted HTTP/1.1 bytes.
pub enum Stream {
    Plain(TcpStream),
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The read half of a [`Stream`].
pub type ReadHalf = tokio::io::ReadHalf<Stream>;
/// The write half of a [`Stream`].
pub type WriteHalf = tokio::io::WriteHalf<Stream>;

impl Stream {
    /// The TCP connection under it (to reset it).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::TlsServer(s) => s.get_ref().0,
            Stream::TlsClient(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsServer(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::TlsClient(s) => Pin::new(&mut **s).poll_read(cx, buf),
        };
        match r {
            // A peer that closes its TCP connection without a TLS close_notify (hyper drops
            // idle connections that way) has closed it: an end of stream, as over plain TCP.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsServer(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::TlsClient(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsServer(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsServer(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A buffered reader over one half of a connection.
pub struct Reader {
    half: ReadHalf,
    side: Side,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

const READ_CHUNK: usize = 16 * 1024;

impl Reader {
    pub fn new(half: ReadHalf, side: Side) -> Reader {
        Reader {
            half,
            side,
            buf: vec![0; 64 * 1024],
            pos: 0,
            len: 0,
        }
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.len]
    }

    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.len);
        if self.pos == self.len {
            self.pos = 0;
            self.len = 0;
        }
    }

    /// Read more bytes into the buffer (growing it up to `max`). `Ok(0)` is EOF. Waits while
    /// nothing arrives; a mode change interrupts the wait.
    pub async fn fill(&mut self, mode: &mut ModeRx, max: usize) -> Result<usize, Stop> {
        if self.pos > 0 && self.len == self.buf.len() {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len == self.buf.len() {
            if self.buf.len() >= max {
                return Err(Stop::Protocol(format!(
                    "a message head is longer than {max} bytes"
                )));
            }
            self.buf.resize((self.buf.len() * 2).min(max), 0);
        }
        loop {
            match *mode.borrow_and_update() {
                Mode::Normal => {}
                Mode::Blackhole => return Err(Stop::Blackhole),
                Mode::Refuse => return Err(Stop::Refused),
            }
            let end = (self.len + READ_CHUNK).min(self.buf.len());
            tokio::select! {
                r = self.half.read(&mut self.buf[self.len..end]) => {
                    return match r {
                        Ok(n) => {
                            self.len += n;
                            Ok(n)
                        }
                        Err(_) => Err(Stop::Io(self.side)),
                    };
                }
                changed = mode.changed() => {
                    if changed.is_err() {
                        // The proxy is gone: nothing will change the mode again.
                        return Err(Stop::Refused);
                    }
                }
            }
        }
    }

    /// Read and throw away whatever arrives, counting it in `dropped`, until EOF or an error
    /// (or the first byte, with `stop_on_data`). Used while a connection is blackholed; the
    /// caller races it against the end of the blackhole.
    pub async fn drain(&mut self, dropped: &AtomicU64, stop_on_data: bool) -> Stop {
        let buffered = (self.len - self.pos) as u64;
        self.pos = 0;
        self.len = 0;
        dropped.fetch_add(buffered, Ordering::Relaxed);
        if stop_on_data && buffered > 0 {
            return Stop::Eof(self.side);
        }
        let mut scratch = vec![0u8; READ_CHUNK];
        loop {
            match self.half.read(&mut scratch).await {
                Ok(0) => return Stop::Eof(self.side),
                Ok(n) => {
                    dropped.fetch_add(n as u64, Ordering::Relaxed);
                    if stop_on_data {
                        return Stop::Eof(self.side);
                    }
                }
                Err(_) => return Stop::Io(self.side),
            }
        }
    }

    /// Wait until the side closes (EOF or an error). Bytes that arrive meanwhile stay
    /// buffered. Cancel-safe: used to notice a server closing an idle keep-alive connection.
    pub async fn closed(&mut self) {
        loop {
            if self.len == self.buf.len() {
                // Unsolicited bytes filled the buffer: stop watching, the next read sees them.
                return std::future::pending().await;
            }
            let end = (self.len + READ_CHUNK).min(self.buf.len());
            match self.half.read(&mut self.buf[self.len..end]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => self.len += n,
            }
        }
    }

    /// The read half, to reunite it with its write half (to reset the connection).
    pub fn into_half(self) -> ReadHalf {
        self.half
    }

    pub fn side(&self) -> Side {
        self.side
    }
}

/// Paces writes to a rate in bytes per second (0 = unlimited), without bursts after idling.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    next_free: Option<Instant>,
}

impl Pacer {
    pub fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            next_free: None,
        }
    }

    async fn pace(&mut self, n: usize) {
        if self.rate == 0 {
            return;
        }
        let now = Instant::now();
        let start = self.next_free.map_or(now, |t| t.max(now));
        let cost = Duration::from_secs_f64(n as f64 / self.rate as f64);
        self.next_free = Some(start + cost);
        if start > now {
            tokio::time::sleep_until(start).await;
        }
    }
}

/// A cut: after `at` bytes of the message, `action` happens (`rule` as in [`Stop::Fault`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    pub at: u64,
    pub action: Action,
    pub rule: Option<usize>,
}

/// Bytes left before a connection-level reset fires, shared by both directions of a
/// connection; `NONE` when the connection has no reset planned.
#[derive(Debug)]
pub struct Budget(AtomicU64);

impl Budget {
    const NONE: u64 = u64::MAX;

    pub fn new(bytes: Option<u64>) -> Budget {
        Budget(AtomicU64::new(
            bytes.map_or(Self::NONE, |b| b.min(Self::NONE - 1)),
        ))
    }

    fn get(&self) -> Option<u64> {
        let v = self.0.load(Ordering::SeqCst);
        (v != Self::NONE).then_some(v)
    }

    fn spend(&self, n: u64) {
        if let Some(b) = self.get() {
            self.0.store(b.saturating_sub(n), Ordering::SeqCst);
        }
    }
}

/// Bytes of one message in one direction, on their way to `dst`.
pub struct Flow<'a> {
    pub dst: &'a mut WriteHalf,
    pub side: Side,
    pub pacer: &'a mut Pacer,
    /// Bytes left before the connection-level reset fires (shared by both directions).
    pub conn_budget: &'a Budget,
    pub cut: Option<Cut>,
    /// Message bytes forwarded so far (head included).
    pub sent: u64,
}

const WRITE_CHUNK: usize = 16 * 1024;

impl Flow<'_> {
    /// Forward `data`, stopping exactly where a cut or the connection budget says.
    pub async fn send(&mut self, mut data: &[u8]) -> Result<(), Stop> {
        while !data.is_empty() {
            let mut n = data.len().min(WRITE_CHUNK);
            let mut stop = None;
            if let Some(c) = self.cut {
                let left = c.at.saturating_sub(self.sent);
                if (n as u64) >= left {
                    n = left as usize;
                    stop = Some(Stop::Fault {
                        action: c.action,
                        rule: c.rule,
                    });
                }
            }
            if let Some(budget) = self.conn_budget.get() {
                if (n as u64) >= budget {
                    n = budget as usize;
                    stop = Some(Stop::Fault {
                        action: Action::Reset,
                        rule: None,
                    });
                }
            }
            if n > 0 {
                self.pacer.pace(n).await;
                self.dst
                    .write_all(&data[..n])
                    .await
                    .map_err(|_| Stop::Io(self.side))?;
                // Over TLS, records the socket could not take yet wait in the session until a
                // flush; over TCP this does nothing. Either way the bytes are on their way
                // before the next read, which may wait for the peer to answer them.
                self.dst.flush().await.map_err(|_| Stop::Io(self.side))?;
                self.sent += n as u64;
                self.conn_budget.spend(n as u64);
            }
            if let Some(s) = stop {
                let _ = self.dst.flush().await;
                return Err(s);
            }
            data = &data[n..];
        }
        Ok(())
    }

    /// The message is complete: a cut at or past its end fires now (the fault then hits the
    /// connection right after the message).
    pub async fn finish(&mut self) -> Result<(), Stop> {
        self.dst.flush().await.map_err(|_| Stop::Io(self.side))?;
        match self.cut {
            Some(c) if c.at >= self.sent => Err(Stop::Fault {
                action: c.action,
                rule: c.rule,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins down the bandwidth cap on a paused clock: at 32 KiB/s each 16 KiB chunk waits for
    /// the one before it to have had its 0.5 s, and idle time does not buy a burst.
    #[tokio::test(start_paused = true)]
    async fn the_pacer_holds_the_rate_without_bursts() {
        let mut p = Pacer::new(32 * 1024);
        let t0 = Instant::now();
        for _ in 0..4 {
            p.pace(16 * 1024).await;
        }
        // The first chunk goes at once; the next three wait 0.5 s each.
        assert_eq!(t0.elapsed(), Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        p.pace(16 * 1024).await;
        p.pace(16 * 1024).await;
        assert_eq!(t1.elapsed(), Duration::from_millis(500));
        let mut free = Pacer::new(0);
        let t2 = Instant::now();
        free.pace(1 << 30).await;
        assert_eq!(t2.elapsed(), Duration::ZERO);
    }

    #[test]
    fn budgets_count_down_and_none_never_fires() {
        let b = Budget::new(Some(10));
        b.spend(4);
        assert_eq!(b.get(), Some(6));
        b.spend(40);
        assert_eq!(b.get(), Some(0));
        let none = Budget::new(None);
        none.spend(5);
        assert_eq!(none.get(), None);
    }
}
