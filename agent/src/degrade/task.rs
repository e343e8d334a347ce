//! The evaluator's task: the [`Engine`] on a [`DEGRADE_TICK`] timer, fed by the samples
//! channel and the supervisor's [`BackendsRx`], writing through its own handle on `DEGRADE`.
//!
//! `agent run` starts it once, after the first supervisor (which sends on the channel made
//! by [`sample_channel`](super::sample_channel)); a reload hands it the new policy's
//! [`Config`] and the new supervisor's channel ([`Evaluator::reconfigure`]); it stops at
//! exit, leaving the modes in the map for the datapath (and the next agent, which adopts
//! them).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::MissedTickBehavior,
};

use super::{Config, DEGRADE_TICK, DegradeView, Engine, ModeSink, Note, SampleRx};
use crate::{datapath::DegradeMaps, supervisor::BackendsRx};

/// A reload's new policy for the task.
struct Reconfigure {
    config: Config,
    backends: Option<BackendsRx>,
    done: oneshot::Sender<()>,
}

/// The running evaluator.
pub struct Evaluator {
    view: Arc<DegradeView>,
    control: mpsc::Sender<Reconfigure>,
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

fn log(notes: Vec<Note>) {
    for n in notes {
        if n.is_warning() {
            tracing::warn!("{n}");
        } else {
            tracing::info!("{n}");
        }
    }
}

/// Starts the evaluator of `config`: reads the modes the map holds (adopted ones start
/// degraded), writes every service's mode, then runs on a timer. `sink` is where modes go,
/// `counters` the handle status reads flow counters from (`None`: they show 0), `samples`
/// the probe samples the supervisor sends, `backends` the supervisor's channel (`None` when
/// none runs). Call it inside the agent's runtime.
pub fn start(
    config: Config,
    mut sink: Box<dyn ModeSink>,
    counters: Option<DegradeMaps>,
    mut samples: SampleRx,
    mut backends: Option<BackendsRx>,
) -> Evaluator {
    let (engine, notes) = Engine::start(config, Instant::now(), sink.as_mut());
    log(notes);
    let engine = Arc::new(Mutex::new(engine));
    let view = Arc::new(DegradeView::new(engine.clone(), counters));
    let (control, mut control_rx) = mpsc::channel::<Reconfigure>(1);
    let (stop, mut stop_rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        let mut timer = tokio::time::interval(DEGRADE_TICK);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = timer.tick() => {}
                Some(r) = control_rx.recv() => {
                    backends = r.backends;
                    let notes = engine
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .reconfigure(r.config, Instant::now(), sink.as_mut());
                    log(notes);
                    let _ = r.done.send(());
                    continue;
                }
                _ = stop_rx.wait_for(|s| *s) => return,
            }
            batch.clear();
            while let Ok(mut b) = samples.try_recv() {
                batch.append(&mut b);
            }
            let now = Instant::now();
            // The backends' reading is taken under the channel's lock: copy nothing, hold
            // it only for the tick's arithmetic.
            let read = backends.as_ref().map(|rx| rx.borrow());
            let notes = engine.lock().unwrap_or_else(PoisonError::into_inner).tick(
                now,
                &batch,
                read.as_deref(),
                sink.as_mut(),
            );
            drop(read);
            log(notes);
        }
    });
    Evaluator {
        view,
        control,
        stop,
        handle,
    }
}

impl Evaluator {
    /// What status and metrics read.
    pub fn view(&self) -> Arc<DegradeView> {
        self.view.clone()
    }

    /// A reload's policy (in force already) and the supervisor's channel as it runs now:
    /// services carry their state by name (see [`Engine::reconfigure`]); returns once the
    /// modes are written.
    pub async fn reconfigure(&self, config: Config, backends: Option<BackendsRx>) {
        let (done, done_rx) = oneshot::channel();
        let sent = self.control.send(Reconfigure {
            config,
            backends,
            done,
        });
        if sent.await.is_err() || done_rx.await.is_err() {
            tracing::warn!("degradation evaluator: stopped, the reloaded policy is not evaluated");
        }
    }

    /// Stops the task; the modes stay in the map.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.handle.await {
            tracing::warn!("degradation evaluator: {e}");
        }
    }
}
