//! Request limits shared by both listeners: every request body must keep up a minimum rate
//! (by default 1 KiB/s, judged over 30 s windows), so a client that drips a body cannot hold a
//! worker and a connection forever. An agent on a 64 KiB/s link is far above it. This is the
//! rate floor; the per-chunk stall timeout of uploads (`timeouts.transfer_stall_ms`, in the
//! NAR cache) still ends a body from which nothing arrives at all.
//!
//! Headers are bounded by actix-web's `client_request_timeout` (`timeouts.request_header_ms`),
//! set where the listeners are bound.

use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::HttpMessage as _;
use futures_util::StreamExt as _;

/// The rate floor of request bodies.
#[derive(Debug, Clone, Copy)]
pub struct BodyRate {
    /// Fewest bytes per second, averaged over one window.
    pub min_bytes_per_s: u64,
    /// How long a body may run below the floor before it is cut.
    pub window: Duration,
}

struct Guard {
    inner: Payload,
    rate: BodyRate,
    deadline: tokio::time::Instant,
    bytes: u64,
    done: bool,
}

fn too_slow(rate: BodyRate) -> PayloadError {
    PayloadError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the request body arrived slower than {} bytes/s over {} ms (limits.min_body_rate_bytes_per_s): it was cut; send faster or resume the upload",
            rate.min_bytes_per_s,
            rate.window.as_millis()
        ),
    ))
}

/// Wrap a body so that it fails with a `TimedOut` error once a window passes with fewer
/// bytes than the floor allows.
pub fn guard(inner: Payload, rate: BodyRate) -> Payload {
    let g = Guard {
        inner,
        rate,
        deadline: tokio::time::Instant::now() + rate.window,
        bytes: 0,
        done: false,
    };
    let min_per_window = rate
        .min_bytes_per_s
        .saturating_mul(rate.window.as_millis() as u64)
        / 1000;
    let stream = futures_util::stream::unfold(g, move |mut g| async move {
        if g.done {
            return None;
        }
        loop {
            match tokio::time::timeout_at(g.deadline, g.inner.next()).await {
                Ok(Some(Ok(chunk))) => {
                    g.bytes += chunk.len() as u64;
                    // A body that never pauses is judged here: the timer only fires while
                    // the next chunk is awaited.
                    let now = tokio::time::Instant::now();
                    if now >= g.deadline {
                        if g.bytes < min_per_window {
                            g.done = true;
                            metrics::counter!("kiln_slow_bodies_cut_total").increment(1);
                            let rate = g.rate;
                            return Some((Err(too_slow(rate)), g));
                        }
                        g.deadline = now + g.rate.window;
                        g.bytes = 0;
                    }
                    return Some((Ok::<Bytes, PayloadError>(chunk), g));
                }
                Ok(Some(Err(e))) => {
                    g.done = true;
                    return Some((Err(e), g));
                }
                Ok(None) => return None,
                Err(_window_over) if g.bytes < min_per_window => {
                    g.done = true;
                    metrics::counter!("kiln_slow_bodies_cut_total").increment(1);
                    let rate = g.rate;
                    return Some((Err(too_slow(rate)), g));
                }
                Err(_window_over) => {
                    g.deadline = tokio::time::Instant::now() + g.rate.window;
                    g.bytes = 0;
                }
            }
        }
    });
    Payload::Stream {
        payload: Box::pin(stream),
    }
}

/// The middleware (`actix_web::middleware::from_fn`); the floor comes from app data.
pub async fn body_rate(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(rate) = req.app_data::<actix_web::web::Data<BodyRate>>() {
        let rate: BodyRate = *rate.get_ref();
        let payload = req.take_payload();
        req.set_payload(guard(payload, rate));
    }
    next.call(req).await
}

/// Caps on uploads in progress (output NARs and logs): per agent and in all. A request over a
/// cap is refused before its body is read — 429 (per agent) or 503 (in all), both with
/// `Retry-After`, which the agent honours.
#[derive(Debug)]
pub struct UploadSlots {
    per_agent: usize,
    total: usize,
    held: std::sync::Mutex<(usize, std::collections::HashMap<u64, usize>)>,
}

/// One upload slot; given back when dropped (the request ended, however it ended).
pub struct UploadSlot {
    slots: std::sync::Arc<UploadSlots>,
    agent: u64,
}

impl UploadSlots {
    pub fn new(per_agent: usize, total: usize) -> std::sync::Arc<UploadSlots> {
        std::sync::Arc::new(UploadSlots {
            per_agent: per_agent.max(1),
            total: total.max(1),
            held: Default::default(),
        })
    }

    /// Take a slot for `agent`, or say why not.
    pub fn acquire(
        self: &std::sync::Arc<Self>,
        agent: u64,
    ) -> Result<UploadSlot, super::error::ApiError> {
        use actix_web::http::StatusCode;
        let mut g = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mine = g.1.get(&agent).copied().unwrap_or(0);
        if mine >= self.per_agent {
            metrics::counter!("kiln_uploads_refused_total", "cap" => "agent").increment(1);
            return Err(super::error::ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_uploads",
                format!(
                    "this agent already has {mine} uploads in progress (limits.max_uploads_per_agent): retry after one ends"
                ),
            ));
        }
        if g.0 >= self.total {
            metrics::counter!("kiln_uploads_refused_total", "cap" => "total").increment(1);
            return Err(super::error::ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "uploads_busy",
                format!(
                    "{} uploads are in progress, the most the coordinator takes at once (limits.max_uploads): retry shortly",
                    g.0
                ),
            ));
        }
        g.0 += 1;
        *g.1.entry(agent).or_insert(0) += 1;
        Ok(UploadSlot {
            slots: self.clone(),
            agent,
        })
    }

    /// Uploads in progress, in all.
    pub fn in_use(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut g = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = g.0.saturating_sub(1);
        if let Some(n) = g.1.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.agent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_slots_cap_per_agent_and_in_all_and_come_back_on_drop() {
        let s = UploadSlots::new(2, 3);
        let a1 = s.acquire(1).unwrap();
        let _a2 = s.acquire(1).unwrap();
        let e = s.acquire(1).err().unwrap();
        assert_eq!((e.status.as_u16(), e.code), (429, "too_many_uploads"));
        let _b1 = s.acquire(2).unwrap();
        let e = s.acquire(3).err().unwrap();
        assert_eq!((e.status.as_u16(), e.code), (503, "uploads_busy"));
        drop(a1);
        assert_eq!(s.in_use(), 2);
        let _c = s.acquire(3).unwrap();
        assert_eq!(s.in_use(), 3);
    }
}
