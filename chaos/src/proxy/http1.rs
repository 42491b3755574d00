//! Just enough HTTP/1.1 to frame messages on a keep-alive connection: read a head, learn how
//! its body is delimited (Content-Length, chunked, or until the connection closes), and walk
//! the body, handing its raw bytes on unchanged and keeping the decoded bytes when asked.
//! Heads are parsed with `httparse` (the parser under hyper).

use super::wire::{Flow, ModeRx, Reader, Stop};

/// Longest head the proxy accepts.
const MAX_HEAD: usize = 256 * 1024;
/// Longest chunk-size line (size, extensions) or trailer line.
const MAX_LINE: usize = 8 * 1024;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

impl Framing {
    pub fn known_len(self) -> Option<u64> {
        match self {
            Framing::None => Some(0),
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }
}

/// A parsed request head, with its raw bytes.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub raw: Vec<u8>,
    pub method: String,
    pub target: String,
    pub framing: Framing,
    /// The client asked to close after this exchange (or speaks HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// A parsed response head, with its raw bytes.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub raw: Vec<u8>,
    pub status: u16,
    pub framing: Framing,
    pub close: bool,
}

/// Read up to the end of a head. `Ok(None)`: the side closed before sending a byte.
async fn read_head_bytes(r: &mut Reader, mode: &mut ModeRx) -> Result<Option<Vec<u8>>, Stop> {
    let mut scanned: usize = 0;
    loop {
        let buf = r.buffered();
        if let Some(i) = find(&buf[scanned.saturating_sub(3)..], b"\r\n\r\n") {
            let end = scanned.saturating_sub(3) + i + 4;
            let head = buf[..end].to_vec();
            r.consume(end);
            return Ok(Some(head));
        }
        scanned = buf.len();
        if r.fill(mode, MAX_HEAD).await? == 0 {
            return if r.buffered().is_empty() {
                Ok(None)
            } else {
                Err(Stop::Eof(r.side()))
            };
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The body framing the headers give, and whether the message asks to close (`Connection:
/// close`) or to keep the connection (`Connection: keep-alive`, for HTTP/1.0).
fn header_framing(headers: &[httparse::Header<'_>]) -> Result<(Option<Framing>, bool, bool), Stop> {
    let mut framing = None;
    let mut close = false;
    let mut keep_alive = false;
    for h in headers {
        let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if value.split(',').any(|v| v.trim() == "chunked") {
                framing = Some(Framing::Chunked);
            }
        } else if h.name.eq_ignore_ascii_case("content-length") && framing.is_none() {
            let n = value
                .trim()
                .parse::<u64>()
                .map_err(|_| Stop::Protocol(format!("content-length {value:?} is not a number")))?;
            framing = Some(Framing::Length(n));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= value.split(',').any(|v| v.trim() == "close");
            keep_alive |= value.split(',').any(|v| v.trim() == "keep-alive");
        }
    }
    Ok((framing, close, keep_alive))
}

/// Read and parse a request head.
pub async fn read_request(r: &mut Reader, mode: &mut ModeRx) -> Result<Option<RequestHead>, Stop> {
    let Some(raw) = read_head_bytes(r, mode).await? else {
        return Ok(None);
    };
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Stop::Protocol("incomplete request head".into()))
        }
        Err(e) => return Err(Stop::Protocol(format!("bad request head: {e}"))),
    }
    let (framing, close, keep_alive) = header_framing(req.headers)?;
    let http10 = req.version == Some(0) && !keep_alive;
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("").to_string();
    Ok(Some(RequestHead {
        framing: framing.unwrap_or(Framing::None),
        close: close || http10,
        method,
        target,
        raw,
    }))
}

/// Read and parse a response head to a request made with `method`.
pub async fn read_response(
    r: &mut Reader,
    mode: &mut ModeRx,
    method: &str,
) -> Result<ResponseHead, Stop> {
    let Some(raw) = read_head_bytes(r, mode).await? else {
        return Err(Stop::Eof(r.side()));
    };
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Stop::Protocol("incomplete response head".into()))
        }
        Err(e) => return Err(Stop::Protocol(format!("bad response head: {e}"))),
    }
    let status = resp.code.unwrap_or(0);
    let (framing, close, keep_alive) = header_framing(resp.headers)?;
    let no_body =
        method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body {
        Framing::None
    } else {
        framing.unwrap_or(Framing::Close)
    };
    Ok(ResponseHead {
        close: close || (resp.version == Some(0) && !keep_alive) || framing == Framing::Close,
        framing,
        status,
        raw,
    })
}

/// Where a body's raw bytes go.
pub enum Sink<'a, 'b> {
    /// Forwarded at once.
    Flow(&'a mut Flow<'b>),
    /// Kept whole, to be forwarded later.
    Collect(&'a mut Vec<u8>),
}

impl Sink<'_, '_> {
    async fn emit(&mut self, raw: &[u8]) -> Result<(), Stop> {
        match self {
            Sink::Flow(f) => f.send(raw).await,
            Sink::Collect(v) => {
                v.extend_from_slice(raw);
                Ok(())
            }
        }
    }
}

/// What walking a body found.
#[derive(Debug, Default)]
pub struct BodyRead {
    /// Decoded body bytes (without chunk framing), kept up to the `keep` limit.
    pub decoded: Vec<u8>,
    /// Decoded body bytes walked.
    pub len: u64,
}

/// Walk a body with `framing` from `r`, giving its raw bytes to `sink`; keep up to `keep`
/// decoded bytes.
pub async fn walk_body(
    r: &mut Reader,
    mode: &mut ModeRx,
    framing: Framing,
    sink: &mut Sink<'_, '_>,
    keep: usize,
) -> Result<BodyRead, Stop> {
    let mut out = BodyRead::default();
    match framing {
        Framing::None => {}
        Framing::Length(n) => copy_exact(r, mode, n, sink, keep, &mut out).await?,
        Framing::Close => loop {
            if r.buffered().is_empty() && r.fill(mode, MAX_HEAD).await? == 0 {
                break;
            }
            let n = r.buffered().len();
            let chunk = r.buffered().to_vec();
            r.consume(n);
            take(&mut out, &chunk, keep);
            sink.emit(&chunk).await?;
        },
        Framing::Chunked => loop {
            let line = read_line(r, mode).await?;
            sink.emit(&line).await?;
            let text = String::from_utf8_lossy(&line);
            let size_text = text.trim_end().split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_text, 16)
                .map_err(|_| Stop::Protocol(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let t = read_line(r, mode).await?;
                    sink.emit(&t).await?;
                    if t == b"\r\n" {
                        break;
                    }
                }
                break;
            }
            copy_exact(r, mode, size, sink, keep, &mut out).await?;
            let crlf = read_line(r, mode).await?;
            if crlf != b"\r\n" {
                return Err(Stop::Protocol("chunk data not followed by CRLF".into()));
            }
            sink.emit(&crlf).await?;
        },
    }
    Ok(out)
}

fn take(out: &mut BodyRead, data: &[u8], keep: usize) {
    out.len += data.len() as u64;
    let room = keep.saturating_sub(out.decoded.len());
    out.decoded.extend_from_slice(&data[..room.min(data.len())]);
}

async fn copy_exact(
    r: &mut Reader,
    mode: &mut ModeRx,
    mut n: u64,
    sink: &mut Sink<'_, '_>,
    keep: usize,
    out: &mut BodyRead,
) -> Result<(), Stop> {
    while n > 0 {
        if r.buffered().is_empty() && r.fill(mode, MAX_HEAD).await? == 0 {
            return Err(Stop::Eof(r.side()));
        }
        let k = (r.buffered().len() as u64).min(n) as usize;
        let chunk = r.buffered()[..k].to_vec();
        r.consume(k);
        n -= k as u64;
        take(out, &chunk, keep);
        sink.emit(&chunk).await?;
    }
    Ok(())
}

/// One line, CRLF included.
async fn read_line(r: &mut Reader, mode: &mut ModeRx) -> Result<Vec<u8>, Stop> {
    loop {
        if let Some(i) = find(r.buffered(), b"\r\n") {
            let line = r.buffered()[..i + 2].to_vec();
            r.consume(i + 2);
            return Ok(line);
        }
        if r.buffered().len() > MAX_LINE {
            return Err(Stop::Protocol("a chunk line is too long".into()));
        }
        if r.fill(mode, MAX_HEAD).await? == 0 {
            return Err(Stop::Eof(r.side()));
        }
    }
}
