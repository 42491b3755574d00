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
                    g.deadline += g.rate.window;
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
