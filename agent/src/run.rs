//! `agent run`: validate, load, apply, attach, serve; reload on SIGHUP or a change of the
//! policy file; on SIGTERM exit and leave the pinned datapath enforcing (or detach, with
//! `--detach-on-exit`).
//!
//! Order of start-up, so that a failure leaves the running datapath as it was: validate the
//! policy (and the interfaces it names, and for shaping that the kernel has `sch_fq` and that
//! no operator's qdisc is in the way) -> lock the pin directory (bpffs, one agent) -> bind the
//! HTTP listener -> load the programs with the pinned maps (an earlier agent's are adopted,
//! their state kept; pins of another layout are refused) -> write the maps (only what
//! differs; breaker entries already there keep their state) -> the pacing qdisc `fq` as root
//! of the egress interfaces (when some service is shaped) -> attach: new programs replace
//! the old on the pinned links, or new links are made and pinned -> start health checks and
//! breakers, the watchdog -> ready.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use aya_log::EbpfLogger;
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};

use crate::{
    cli::{EXIT_INVALID, EXIT_RUNTIME},
    config::{
        self, PolicyErrors,
        watch::{FileChange, PolicyWatch, WatchError},
    },
    datapath::{
        Datapath, DatapathError,
        pin::PinDir,
        pressure,
        qdisc::{Pacers, QdiscError},
        remove_egress_filter,
    },
    http,
    lb::balancer::{self, LbView},
    plan::{self, Plan},
    state::AgentState,
    supervisor,
    telemetry::{
        logs,
        reload::{Outcome, Trigger},
    },
};

/// The token-bucket table is walked for occupancy at most this often...
const KEY_COUNT_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// ...and spends at most 1/this of the time walking (a million keys take about a second).
const KEY_COUNT_DUTY: u32 = 20;
/// The maps' pressure and memory are read at most this often, walking for at most 1/duty
/// of the time.
const PRESSURE_MIN_INTERVAL: Duration = Duration::from_secs(1);
const PRESSURE_DUTY: u32 = 20;
/// The watchdog checks the links and pins this often: a program someone detached is back
/// within one period.
pub const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);

/// `agent run`'s switches.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Detach and remove the pins on exit instead of leaving the datapath running.
    pub detach_on_exit: bool,
    /// Drop the pinned maps before loading.
    pub reset: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Policy(PolicyErrors),
    #[error("binding {addr} (agent.listen): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Datapath(#[from] DatapathError),
    #[error("pacing qdisc: {0}")]
    Qdisc(#[source] QdiscError),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    #[error("{0}")]
    Watch(#[source] WatchError),
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Policy(_) => EXIT_INVALID,
            _ => EXIT_RUNTIME,
        }
    }
}

pub async fn run(file: &Path, options: Options) -> Result<(), RunError> {
    // Before the file is read: a change from here on reloads. Its error comes after the
    // policy's.
    let file_watch = PolicyWatch::start(file);
    let policy = config::load_file(file).map_err(RunError::Policy)?;
    logs::init(&policy.agent.log_level.to_string());
    let mut file_watch = file_watch.map_err(RunError::Watch)?;
    // Before anything is loaded: a SIGTERM during start-up waits for the start to finish,
    // then stops the agent as usual, instead of killing it half-way (the default action).
    let mut signals = Signals::install()?;
    let plan = Plan::new(&policy).map_err(RunError::Policy)?;
    plan.check_pacing(&policy).map_err(RunError::Policy)?;
    tracing::info!(
        "policy {}: {} services on {} interfaces",
        file.display(),
        plan.services.len(),
        plan.attach.len()
    );

    // Before the pin directory is made or --reset removes anything.
    crate::datapath::check_privileges()?;
    let pins = open_pins(&policy)?;
    let listener = TcpListener::bind(plan.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: plan.listen,
            source,
        })?;

    let mut datapath = Datapath::load_pinned(&plan.compiled, pins, options.reset)?;
    let pin_path = policy.agent.pin_path.display();
    // A fresh start that fails before its programs are attached leaves no pins behind (the
    // next start would adopt half-written maps); an adopting one leaves the earlier agent's
    // datapath running.
    let mut fresh = None;
    if datapath.adopted() {
        tracing::info!("adopted pins at {pin_path}: maps and their state kept");
    } else {
        tracing::info!("pinned at {pin_path}");
        fresh = Some(FreshPins(&policy.agent.pin_path));
    }
    let logger = match EbpfLogger::init(datapath.ebpf_mut()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!("datapath logs unavailable: {e}");
            None
        }
    };
    for (program, insns) in datapath.verified_instructions() {
        tracing::debug!("{program}: {insns:?} instructions verified (budget 1,000,000)");
    }
    let report = datapath.apply(&plan.compiled)?;
    tracing::info!("policy written to the maps: {report:?}");
    // Balanced services get their tables before any packet can reach the programs.
    let lb_maps = if plan.compiled.lb.is_empty() {
        None
    } else {
        // Replies from backends are found behind the port bitmap, as breakers are.
        let ports = plan.compiled.lb.iter().flat_map(|s| &s.backends);
        datapath.mark_ports(ports.map(|b| b.address.port()))?;
        let mut maps = datapath.lb_maps()?;
        // Adopted maps hold the last agent's breakers: a backend whose breaker is open gets
        // no new flows from the first table on (the supervisor resumes the same states).
        let adopted = datapath.adopted();
        let breakers = if adopted {
            supervisor::breakers_in(&datapath, &plan.compiled.backends)
        } else {
            Default::default()
        };
        balancer::install_resumed(&mut maps, &plan.compiled.lb, adopted, &breakers)?;
        // A second handle for the HTTP side's counter reads.
        Some((maps, datapath.lb_maps()?))
    };
    // Before attaching, so a shaped service's first packet meets fq. Dropped (the default
    // qdiscs back) on every way out of this function, a failed attach included.
    let pacers = match &plan.pacing {
        None => None,
        Some(p) => Some(
            Pacers::install(&p.spec, &p.interfaces).map_err(|e| match e {
                // Only when the probe could not run: the same refusal as the probe's.
                QdiscError::FqMissing(why) => {
                    RunError::Policy(PolicyErrors(plan::fq_missing(&policy, &why)))
                }
                e => RunError::Qdisc(e),
            })?,
        ),
    };
    for p in pacers.iter().flat_map(Pacers::describe) {
        tracing::info!("pacing qdisc {p}");
    }
    datapath.attach(&plan.attach)?;
    if let Some(f) = fresh.take() {
        f.keep();
    }
    for a in datapath.attachments() {
        tracing::info!("attached {a}");
    }
    for s in datapath.detach_stale_links() {
        tracing::info!("detached {s}");
    }

    let state = Arc::new(AgentState::new(
        datapath,
        plan.services.clone(),
        file.display().to_string(),
    ));
    state.set_array_use(pressure::ArrayUse::of(&plan.compiled));

    // Breaker entries are in the maps already (closed, from `apply`); from here on the
    // supervisor writes every transition.
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = {
        let dp = state.datapath();
        supervisor::start(&policy, &plan.compiled.backends, Some(&dp), stop_rx.clone())
    };
    let backends_task = match started {
        Ok(Some((backends, task))) => {
            state.set_backends(backends);
            Some(task)
        }
        Ok(None) => None,
        Err(e) => {
            // Checks could not start: the datapath keeps enforcing the policy without them,
            // every breaker closed (fail open).
            tracing::error!("{e}");
            None
        }
    };
    // The balancer follows health, breakers and reloaded weights from here on.
    let (weights_tx, weights_rx) = watch::channel(balancer::configured(&plan.compiled.lb));
    let balancer_task = lb_maps.map(|(maps, counters)| {
        let view = Arc::new(LbView::new(counters, plan.compiled.lb.clone()));
        state.set_balancing(view.clone());
        let services = plan.compiled.lb.clone();
        let health = state.backends();
        let stop = stop_rx.clone();
        tokio::task::spawn_blocking(move || {
            balancer::run(maps, services, health, view, weights_rx, stop)
        })
    });
    state.set_ready(true);
    tracing::info!("ready; serving on http://{}", plan.listen);

    let log_task = logger.map(|l| tokio::spawn(logs::forward_ebpf_logs(l)));
    let keys_task = tokio::spawn(count_keys_periodically(state.clone(), stop_rx.clone()));
    let pressure_task = tokio::spawn(watch_map_pressure(state.clone(), stop_rx.clone()));
    let watchdog_task = tokio::spawn(watchdog(state.clone(), stop_rx.clone()));
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(http::serve(listener, state.clone(), async move {
        let _ = http_stop.wait_for(|stop| *stop).await;
    }));

    let result = wait_for_signals(
        &mut signals,
        &mut file_watch,
        file,
        &plan,
        &state,
        &weights_tx,
    )
    .await;

    // Not ready any more; stop the tasks (the watchdog first: it must not re-attach what is
    // detached next); then leave the datapath running, or detach it and put the default
    // qdiscs back; then stop serving.
    state.set_ready(false);
    let _ = stop_tx.send(true);
    let _ = watchdog_task.await;
    let _ = keys_task.await;
    let _ = pressure_task.await;
    if let Some(t) = backends_task {
        let _ = t.await;
    }
    if let Some(t) = balancer_task {
        let _ = t.await;
    }
    match http_task.await {
        Ok(Err(e)) => tracing::warn!("HTTP server: {e}"),
        Err(e) => tracing::warn!("HTTP server task: {e}"),
        Ok(Ok(())) => {}
    }
    if let Some(t) = log_task {
        t.abort();
    }
    let mut dp = state.datapath_mut();
    if options.detach_on_exit {
        dp.detach_all();
        drop(pacers);
        match dp.pin_dir().map(PinDir::remove_all) {
            Some(Err(e)) => tracing::warn!("removing pins: {e}"),
            Some(Ok(removed)) => tracing::info!("removed {} pins", removed.len()),
            None => {}
        }
        tracing::info!("detached; bye");
    } else {
        dp.leave_attached();
        if let Some(p) = pacers {
            p.leave();
        }
        tracing::info!("the datapath keeps enforcing the last policy (pinned at {pin_path}); bye");
    }
    result
}

/// The map pins of a fresh start, removed when dropped before [`FreshPins::keep`].
struct FreshPins<'a>(&'a Path);

impl FreshPins<'_> {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for FreshPins<'_> {
    fn drop(&mut self) {
        // Map pins and the layout only: links pinned there are an earlier agent's (a
        // `--reset` start), still running their programs.
        let pins = PinDir::paths_of(self.0);
        let cleared = pins.clear_maps();
        pins.remove_if_empty();
        match cleared {
            Ok(removed) => tracing::info!(
                "start-up failed: removed the {removed} map pins it made under {}",
                self.0.display()
            ),
            Err(e) => tracing::warn!("start-up failed; removing its pins: {e}"),
        }
    }
}

/// Opens and locks the policy's pin directory. A path that is not on bpffs, or cannot be
/// made, is the policy's error (at `agent.pin_path`); a directory in use is not.
fn open_pins(policy: &agent_common::policy::Policy) -> Result<PinDir, RunError> {
    PinDir::open(&policy.agent.pin_path).map_err(|e| {
        if e.is_path_problem() {
            RunError::Policy(PolicyErrors(vec![
                policy.error_at("agent.pin_path", e.to_string()),
            ]))
        } else {
            RunError::Datapath(DatapathError::Pin(e))
        }
    })
}

/// `agent uninstall`: detaches and removes everything under the pin directory, the egress
/// filters and pacing qdiscs on the policy's interfaces. Says what it removed.
pub fn uninstall(file: Option<&Path>) -> Result<Vec<String>, RunError> {
    let policy = match file {
        Some(f) => Some(config::load_file(f).map_err(RunError::Policy)?),
        None => None,
    };
    let pin_path = policy.as_ref().map_or_else(
        || agent_common::policy::model::AgentSettings::default().pin_path,
        |p| p.agent.pin_path.clone(),
    );
    let mut removed = Vec::new();
    if pin_path.exists() {
        let pins = PinDir::open(&pin_path).map_err(|e| RunError::Datapath(e.into()))?;
        removed = pins
            .remove_all()
            .map_err(|e| RunError::Datapath(e.into()))?;
    }
    if let Some(policy) = &policy {
        let interfaces: Vec<String> = policy.interfaces.iter().map(|i| i.name.clone()).collect();
        for i in &interfaces {
            // Before 6.6 the egress program is a filter, not a pinned link.
            if remove_egress_filter(i) {
                removed.push(format!("the egress filter on {i}"));
            }
        }
        let pacers = Pacers::left_on(&interfaces);
        removed.extend(pacers.describe());
        drop(pacers);
    }
    Ok(removed)
}

/// Checks the links and pins every [`WATCHDOG_PERIOD`] and repairs what someone broke.
async fn watchdog(state: Arc<AgentState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCHDOG_PERIOD) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let s = state.clone();
        let checked =
            tokio::task::spawn_blocking(move || s.datapath_mut().check_and_repair()).await;
        match checked {
            Ok((repairs, errors)) => {
                for r in repairs {
                    tracing::warn!("watchdog: {} (repair counted as {})", r.detail, r.what);
                }
                for e in errors {
                    tracing::error!("watchdog: a repair failed, retrying next period: {e}");
                }
            }
            Err(e) => tracing::error!("watchdog: {e}"),
        }
    }
}

/// The signals `agent run` handles, installed once at start.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Signals, RunError> {
        let make = |kind| signal(kind).map_err(RunError::Signals);
        Ok(Signals {
            term: make(SignalKind::terminate())?,
            int: make(SignalKind::interrupt())?,
            hup: make(SignalKind::hangup())?,
        })
    }
}

/// Runs until SIGTERM or SIGINT; SIGHUP and a change of the policy file reload it.
async fn wait_for_signals(
    signals: &mut Signals,
    file_watch: &mut PolicyWatch,
    file: &Path,
    current: &Plan,
    state: &AgentState,
    weights: &watch::Sender<Vec<Vec<u32>>>,
) -> Result<(), RunError> {
    let Signals { term, int, hup } = signals;
    let mut current = current.clone();
    loop {
        let trigger = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            _ = hup.recv() => Trigger::Sighup,
            change = file_watch.changed() => match change {
                FileChange::Changed => Trigger::File,
                FileChange::Gone => {
                    let error = format!(
                        "{}: the policy file is gone (deleted, or renamed away); the running \
                         policy stays in force, and the file is reloaded when it is back",
                        file.display()
                    );
                    tracing::error!("{error}");
                    let missing = Outcome::Missing;
                    state.record_reload(Trigger::File, missing, Some(error), Duration::ZERO);
                    continue;
                }
            },
        };
        tracing::info!("{trigger}: reloading {}", file.display());
        let began = Instant::now();
        let result = reload(file, &current, state, weights);
        let outcome = reload_outcome(&result);
        let error = result.as_ref().err().map(ToString::to_string);
        state.record_reload(trigger, outcome, error, began.elapsed());
        match result {
            Ok(plan) => current = plan,
            Err(e) => tracing::error!(
                "reload ({}): {}, the running policy stays in force:\n{e}",
                trigger.as_str(),
                outcome.as_str()
            ),
        }
    }
}

/// How a reload ended, for its accounting.
fn reload_outcome<T>(result: &Result<T, RunError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(RunError::Policy(_)) => Outcome::Invalid,
        Err(_) => Outcome::Failed,
    }
}

/// Validates the file again and writes what changed. Changes that need new maps or new
/// attachments (interfaces, key-table size) are refused for now: the running policy stays.
fn reload(
    file: &Path,
    current: &Plan,
    state: &AgentState,
    weights: &watch::Sender<Vec<Vec<u32>>>,
) -> Result<Plan, RunError> {
    let policy = config::load_file(file).map_err(RunError::Policy)?;
    let plan = Plan::new(&policy).map_err(RunError::Policy)?;
    if let Some(why) = plan.needs_restart_from(current) {
        return Err(RunError::Policy(PolicyErrors(vec![policy.error_at(
            why.0,
            format!("{} cannot change on reload yet; restart the agent", why.1),
        )])));
    }
    let report = state.datapath_mut().apply(&plan.compiled)?;
    state.set_services(plan.services.clone());
    state.set_array_use(pressure::ArrayUse::of(&plan.compiled));
    // Backends are the same (checked above); their configured weights may not be.
    weights.send_if_modified(|w| {
        let new = balancer::configured(&plan.compiled.lb);
        let changed = *w != new;
        *w = new;
        changed
    });
    tracing::info!("reloaded: {report:?}");
    Ok(plan)
}

async fn count_keys_periodically(state: Arc<AgentState>, mut stop: watch::Receiver<bool>) {
    loop {
        let s = state.clone();
        let took = match tokio::task::spawn_blocking(move || s.refresh_key_counts()).await {
            Ok(Ok(took)) => took,
            Ok(Err(e)) => {
                tracing::warn!("counting rate-limit keys: {e}");
                Duration::ZERO
            }
            Err(e) => {
                tracing::warn!("counting rate-limit keys: {e}");
                Duration::ZERO
            }
        };
        let pause = KEY_COUNT_MIN_INTERVAL.max(took * KEY_COUNT_DUTY);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Reads the maps' pressure and memory on a timer, and logs a table passing 90% (once, until
/// it has room again).
async fn watch_map_pressure(state: Arc<AgentState>, mut stop: watch::Receiver<bool>) {
    let mut alarm = pressure::Alarm::default();
    loop {
        let s = state.clone();
        let took = match tokio::task::spawn_blocking(move || s.refresh_map_pressure()).await {
            Ok(reading) => {
                pressure::log(&alarm.observe(&reading.tables));
                reading.took
            }
            Err(e) => {
                tracing::warn!("reading map pressure: {e}");
                Duration::ZERO
            }
        };
        let pause = PRESSURE_MIN_INTERVAL.max(took * PRESSURE_DUTY);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_errors_fall_into_their_classes() {
        assert_eq!(reload_outcome::<()>(&Ok(())), Outcome::Ok);
        let invalid = Err(RunError::Policy(PolicyErrors(Vec::new())));
        assert_eq!(reload_outcome::<()>(&invalid), Outcome::Invalid);
        let failed = Err(RunError::Signals(std::io::Error::other("x")));
        assert_eq!(reload_outcome::<()>(&failed), Outcome::Failed);
    }
}
