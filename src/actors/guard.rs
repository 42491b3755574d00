//! The panic guard every piece of actor code runs under, and the rebuild every restart does.
//!
//! actix facts this module designs around (actix 0.13.5, pinned by the tests below): a panic
//! anywhere an actor's task polls — a handler, the future of a `ResponseActFuture`, a `.map` /
//! `.then` continuation, a `run_interval` / `run_later` callback, `started` — kills the task, and
//! the actor's address closes for good; `actix::Supervisor` only restarts an actor that *stops*,
//! keeping the same struct and mailbox. So:
//!
//! - every such piece of code runs inside [`catch`] (or one of its shapes: [`guarded`] for a
//!   handler answering `Result`, [`Guarded`] for one answering a plain value, [`guard_future`]
//!   for the future of a `ResponseActFuture`, [`guard_map`] for a continuation). A panic is
//!   logged (the panic hook adds the backtrace), the actor is stopped explicitly, and the caller
//!   gets `ActorError::Unavailable` or a dropped reply — both HTTP 503 with `Retry-After`. (A
//!   stopping actor polls none of its futures, so a `ResponseActFuture` handler that panics
//!   before returning its future, and every future the actor had in flight, drop their
//!   replies.);
//! - every actor implements [`Rebuild`], and its `Supervised::restarting` calls [`restart`]:
//!   count the restart (escalating past the restart intensity), then replace the whole struct
//!   with a fresh one from the actor's factory, which reloads what the actor owns from sled.
//!   No field is reset by hand, so none can be forgotten.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::dev::{MessageResponse, OneshotSender};
use actix::fut::{wrap_future, ActorFuture, ActorFutureExt as _};
use actix::prelude::*;
use futures_util::FutureExt as _;

use super::restarts::{GaveUp, Restarts};
use super::ActorError;

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// What a caller is told when the actor it asked panicked.
pub fn unavailable(name: &'static str) -> ActorError {
    ActorError::Unavailable(format!(
        "the {name} is restarting after an internal error; retry"
    ))
}

fn on_panic<A>(name: &'static str, ctx: &mut Context<A>, payload: &(dyn Any + Send))
where
    A: Actor<Context = Context<A>>,
{
    tracing::error!(
        actor = name,
        panic = %panic_message(payload),
        "actor code panicked; stopping the actor so its supervisor rebuilds it from sled"
    );
    ctx.stop();
}

/// Run `body`; a panic is logged, the actor is stopped (its supervisor rebuilds it) and
/// `None` is returned.
pub fn catch<A, R>(
    name: &'static str,
    ctx: &mut Context<A>,
    body: impl FnOnce(&mut Context<A>) -> R,
) -> Option<R>
where
    A: Actor<Context = Context<A>>,
{
    match catch_unwind(AssertUnwindSafe(|| body(ctx))) {
        Ok(r) => Some(r),
        Err(payload) => {
            on_panic(name, ctx, &*payload);
            None
        }
    }
}

/// Run a handler body that answers `Result`; a panic becomes a stop of the actor and an
/// `Unavailable` answer instead of a closed mailbox.
pub fn guarded<A, T>(
    name: &'static str,
    ctx: &mut Context<A>,
    body: impl FnOnce(&mut Context<A>) -> Result<T, ActorError>,
) -> Result<T, ActorError>
where
    A: Actor<Context = Context<A>>,
{
    catch(name, ctx, body).unwrap_or_else(|| Err(unavailable(name)))
}

/// The answer of a handler whose message result is a plain value (not a `Result`): the value,
/// or `None` when the handler panicked. `None` drops the reply, which the caller sees as a
/// closed mailbox (`MailboxError`, HTTP 503 with `Retry-After`), never as a wrong value.
pub struct Guarded<M: Message>(pub Option<M::Result>);

impl<M: Message> Guarded<M> {
    /// Run `body` under [`catch`].
    pub fn run<A>(
        name: &'static str,
        ctx: &mut Context<A>,
        body: impl FnOnce(&mut Context<A>) -> M::Result,
    ) -> Guarded<M>
    where
        A: Actor<Context = Context<A>>,
    {
        Guarded(catch(name, ctx, body))
    }
}

impl<A, M> MessageResponse<A, M> for Guarded<M>
where
    A: Actor,
    M: Message,
{
    fn handle(self, _ctx: &mut A::Context, tx: Option<OneshotSender<M::Result>>) {
        if let (Some(value), Some(tx)) = (self.0, tx) {
            // The caller may have given up waiting; nothing to do then.
            let _ = tx.send(value);
        }
    }
}

/// The future of a `ResponseActFuture` handler, polled on the actor's task: a panic inside it
/// stops the actor and answers `Unavailable`.
pub fn guard_future<A, T, F>(
    name: &'static str,
    fut: F,
) -> impl ActorFuture<A, Output = Result<T, ActorError>>
where
    A: Actor<Context = Context<A>>,
    F: Future<Output = Result<T, ActorError>> + 'static,
    T: 'static,
{
    wrap_future::<_, A>(AssertUnwindSafe(fut).catch_unwind()).map(
        move |r, _act, ctx: &mut Context<A>| match r {
            Ok(v) => v,
            Err(payload) => {
                on_panic(name, ctx, &*payload);
                Err(unavailable(name))
            }
        },
    )
}

/// A future spawned into the actor's context (`ctx.spawn`), with nobody waiting on its
/// answer: `None` when it panicked (the actor is then stopped).
pub fn guard_task<A, T, F>(name: &'static str, fut: F) -> impl ActorFuture<A, Output = Option<T>>
where
    A: Actor<Context = Context<A>>,
    F: Future<Output = T> + 'static,
    T: 'static,
{
    wrap_future::<_, A>(AssertUnwindSafe(fut).catch_unwind()).map(
        move |r, _act, ctx: &mut Context<A>| match r {
            Ok(v) => Some(v),
            Err(payload) => {
                on_panic(name, ctx, &*payload);
                None
            }
        },
    )
}

/// A continuation (the closure of `.map` or `.then` on an actor future) under the guard: on a
/// panic the actor stops and the continuation yields `fallback()`.
pub fn guard_map<A, I, O>(
    name: &'static str,
    fallback: impl FnOnce() -> O + 'static,
    f: impl FnOnce(I, &mut A, &mut Context<A>) -> O + 'static,
) -> impl FnOnce(I, &mut A, &mut Context<A>) -> O + 'static
where
    A: Actor<Context = Context<A>>,
{
    move |input, act, ctx| catch(name, ctx, |ctx| f(input, act, ctx)).unwrap_or_else(fallback)
}

/// An actor the supervisor can rebuild from its factory.
pub trait Rebuild: Actor<Context = Context<Self>> + Sized {
    /// The actor's key in `kiln_actor_restarts_total{actor}` and in the restart intensity.
    const ACTOR: &'static str;

    /// The restart counters this actor reports to.
    fn restarts(&self) -> Arc<Restarts>;

    /// A fresh instance built by the actor's factory from the same dependencies (cloneable
    /// handles: store, committer, addresses, shared maps, settings), with everything the actor
    /// owns reloaded from sled. Called from `Supervised::restarting` on the actor's own thread.
    fn rebuild(&self) -> Result<Self, ActorError>;
}

/// The body of every `Supervised::restarting`: count the restart (escalating past the restart
/// intensity), then replace the actor with a fresh one from its factory. A rebuild that fails
/// (sled unreadable) or panics escalates at once: the coordinator shuts down with a non-zero
/// exit rather than serve from state it cannot reload. The mailbox is kept by
/// `actix::Supervisor`, so messages sent meanwhile are handled by the fresh actor.
pub fn restart<A: Rebuild>(act: &mut A) {
    let restarts = act.restarts();
    restarts.record(A::ACTOR);
    match catch_unwind(AssertUnwindSafe(|| act.rebuild())) {
        Ok(Ok(fresh)) => *act = fresh,
        Ok(Err(e)) => restarts.escalate(GaveUp {
            actor: A::ACTOR,
            restarts: restarts.recent(A::ACTOR, restarts.intensity().window),
            reason: format!("the actor cannot be rebuilt from sled: {e}"),
        }),
        Err(payload) => restarts.escalate(GaveUp {
            actor: A::ACTOR,
            restarts: restarts.recent(A::ACTOR, restarts.intensity().window),
            reason: format!(
                "rebuilding the actor panicked: {}",
                panic_message(&*payload)
            ),
        }),
    }
}

/// Fault points shared by every actor (feature `fault-points`, never in release builds):
/// `<actor>.panic` at each place actor code runs.
#[cfg(feature = "fault-points")]
pub mod faults {
    use super::*;

    /// Where the injected panic happens.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum PanicAt {
        /// In the handler itself.
        Handler,
        /// In the future of a `ResponseActFuture`.
        Future,
        /// In the continuation (`.map`) after that future.
        Continuation,
        /// In a `run_later` timer callback, after the handler answered `Ok`.
        Timer,
    }

    impl std::str::FromStr for PanicAt {
        type Err = String;
        fn from_str(s: &str) -> Result<PanicAt, String> {
            match s {
                "handler" => Ok(PanicAt::Handler),
                "future" => Ok(PanicAt::Future),
                "continuation" => Ok(PanicAt::Continuation),
                "timer" => Ok(PanicAt::Timer),
                other => Err(format!(
                    "unknown panic place {other:?}: use handler, future, continuation or timer"
                )),
            }
        }
    }

    /// Fault point `<actor>.panic`: panic at the given place.
    #[derive(Message, Debug, Clone, Copy)]
    #[rtype(result = "Result<(), ActorError>")]
    pub struct InjectPanic(pub PanicAt);

    /// The body of every actor's `Handler<InjectPanic>`.
    pub fn inject_panic<A>(
        name: &'static str,
        at: PanicAt,
        ctx: &mut Context<A>,
    ) -> ResponseActFuture<A, Result<(), ActorError>>
    where
        A: Actor<Context = Context<A>>,
    {
        tracing::warn!(actor = name, at = ?at, "fault point panic fired");
        match at {
            PanicAt::Handler => Box::pin(actix::fut::ready(guarded::<A, ()>(name, ctx, |_| {
                panic!("fault point {name}.panic fired in a handler")
            }))),
            PanicAt::Future => Box::pin(guard_future::<A, (), _>(name, async move {
                panic!("fault point {name}.panic fired in a future")
            })),
            PanicAt::Continuation => Box::pin(
                wrap_future::<_, A>(async { Ok::<(), ActorError>(()) }).map(guard_map(
                    name,
                    move || Err(unavailable(name)),
                    move |_r: Result<(), ActorError>,
                          _act: &mut A,
                          _ctx: &mut Context<A>|
                          -> Result<(), ActorError> {
                        panic!("fault point {name}.panic fired in a continuation")
                    },
                )),
            ),
            PanicAt::Timer => {
                ctx.run_later(std::time::Duration::ZERO, move |_act, ctx| {
                    catch(name, ctx, |_| -> () {
                        panic!("fault point {name}.panic fired in a timer")
                    });
                });
                Box::pin(actix::fut::ready(Ok(())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Pins the actix facts this module relies on, with a toy actor.

    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    /// Counts its rebuilds in a shared counter; `state` is the memory a rebuild must reset.
    struct Toy {
        restarts: Arc<Restarts>,
        builds: Arc<AtomicU32>,
        state: u32,
    }

    impl Toy {
        fn new(restarts: Arc<Restarts>, builds: Arc<AtomicU32>) -> Toy {
            builds.fetch_add(1, Ordering::SeqCst);
            Toy {
                restarts,
                builds,
                state: 0,
            }
        }
    }

    impl Actor for Toy {
        type Context = Context<Self>;
    }

    impl Rebuild for Toy {
        const ACTOR: &'static str = "toy";
        fn restarts(&self) -> Arc<Restarts> {
            self.restarts.clone()
        }
        fn rebuild(&self) -> Result<Toy, ActorError> {
            Ok(Toy::new(self.restarts.clone(), self.builds.clone()))
        }
    }

    impl Supervised for Toy {
        fn restarting(&mut self, _ctx: &mut Context<Self>) {
            restart(self);
        }
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Bump;

    impl Handler<Bump> for Toy {
        type Result = Guarded<Bump>;
        fn handle(&mut self, _: Bump, ctx: &mut Context<Self>) -> Guarded<Bump> {
            Guarded::run("toy", ctx, |_| {
                self.state += 1;
                self.state
            })
        }
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Unguarded;

    impl Handler<Unguarded> for Toy {
        type Result = u32;
        fn handle(&mut self, _: Unguarded, _ctx: &mut Context<Self>) -> u32 {
            panic!("unguarded panic")
        }
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct PanicPlain;

    impl Handler<PanicPlain> for Toy {
        type Result = Guarded<PanicPlain>;
        fn handle(&mut self, _: PanicPlain, ctx: &mut Context<Self>) -> Guarded<PanicPlain> {
            Guarded::run("toy", ctx, |_| panic!("guarded plain panic"))
        }
    }

    #[cfg(feature = "fault-points")]
    impl Handler<faults::InjectPanic> for Toy {
        type Result = ResponseActFuture<Self, Result<(), ActorError>>;
        fn handle(&mut self, m: faults::InjectPanic, ctx: &mut Context<Self>) -> Self::Result {
            faults::inject_panic("toy", m.0, ctx)
        }
    }

    async fn wait_count(r: &Restarts, n: u64) {
        for _ in 0..6000 {
            if r.count("toy") >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("toy did not restart {n} time(s)");
    }

    fn start() -> (Addr<Toy>, Arc<Restarts>, Arc<AtomicU32>) {
        let restarts = Arc::new(Restarts::default());
        let builds = Arc::new(AtomicU32::new(0));
        let (r, b) = (restarts.clone(), builds.clone());
        let addr = actix::Supervisor::start(move |_| Toy::new(r, b));
        (addr, restarts, builds)
    }

    #[test]
    fn an_unguarded_panic_closes_the_mailbox_for_good() {
        // The actix fact behind the whole guard: without it the supervisor does nothing.
        actix::System::new().block_on(async {
            let (addr, restarts, _) = start();
            assert_eq!(addr.send(Bump).await.unwrap(), 1);
            assert!(addr.send(Unguarded).await.is_err());
            assert!(addr.send(Bump).await.is_err(), "the mailbox stays closed");
            assert_eq!(restarts.count("toy"), 0, "no restart happened");
        });
    }

    #[test]
    fn a_guarded_panic_drops_the_reply_and_the_actor_is_rebuilt_fresh() {
        actix::System::new().block_on(async {
            let (addr, restarts, builds) = start();
            assert_eq!(addr.send(Bump).await.unwrap(), 1);
            assert_eq!(addr.send(Bump).await.unwrap(), 2);
            // The caller sees a closed-mailbox error (HTTP 503), not a made-up value.
            assert!(addr.send(PanicPlain).await.is_err());
            wait_count(&restarts, 1).await;
            // Same mailbox, fresh struct: the memory starts over from the factory.
            assert_eq!(addr.send(Bump).await.unwrap(), 1);
            assert_eq!(builds.load(Ordering::SeqCst), 2);
            assert_eq!(restarts.count("toy"), 1);
        });
    }

    #[cfg(feature = "fault-points")]
    #[test]
    fn panics_in_futures_continuations_and_timers_restart_the_actor() {
        use faults::{InjectPanic, PanicAt};
        actix::System::new().block_on(async {
            let (addr, restarts, builds) = start();
            let mut expected = 0;
            for at in [
                PanicAt::Handler,
                PanicAt::Future,
                PanicAt::Continuation,
                PanicAt::Timer,
            ] {
                assert_eq!(addr.send(Bump).await.unwrap(), 1, "{at:?}: fresh state");
                let r = addr.send(InjectPanic(at)).await;
                match at {
                    // The handler answers a `ResponseActFuture`, which a stopping actor never
                    // polls: the reply is dropped (a closed-mailbox error, HTTP 503).
                    PanicAt::Handler => assert!(r.is_err(), "{at:?}: {r:?}"),
                    PanicAt::Timer => assert!(matches!(r, Ok(Ok(()))), "{at:?}: {r:?}"),
                    _ => assert!(
                        matches!(r, Ok(Err(ActorError::Unavailable(_)))),
                        "{at:?}: {r:?}"
                    ),
                }
                expected += 1;
                wait_count(&restarts, expected).await;
                assert_eq!(restarts.count("toy"), expected, "{at:?}");
            }
            assert_eq!(addr.send(Bump).await.unwrap(), 1);
            assert_eq!(builds.load(Ordering::SeqCst), 5);
        });
    }

    #[test]
    fn restarts_past_the_intensity_escalate() {
        actix::System::new().block_on(async {
            let restarts = Arc::new(Restarts::new(super::super::restarts::Intensity {
                max_restarts: 1,
                window: Duration::from_secs(3600),
            }));
            let builds = Arc::new(AtomicU32::new(0));
            let (r, b) = (restarts.clone(), builds.clone());
            let addr = actix::Supervisor::start(move |_| Toy::new(r, b));
            assert!(addr.send(PanicPlain).await.is_err());
            wait_count(&restarts, 1).await;
            assert!(restarts.has_given_up().is_none());
            assert!(addr.send(PanicPlain).await.is_err());
            wait_count(&restarts, 2).await;
            let g = tokio::time::timeout(Duration::from_secs(60), restarts.gave_up())
                .await
                .expect("escalated");
            assert_eq!((g.actor, g.restarts), ("toy", 2));
            // Never a closed mailbox: the actor still answers until the coordinator is down.
            assert_eq!(addr.send(Bump).await.unwrap(), 1);
        });
    }
}
