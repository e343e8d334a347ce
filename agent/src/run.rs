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
//! breakers, the degradation evaluator, the watchdog -> ready.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
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
        ids::{Ids, IdsError, Limits},
        model::Policy,
        watch::{FileChange, PolicyWatch, WatchError},
    },
    datapath::{
        ApplyReport, Datapath, DatapathError, LbMaps,
        pin::PinDir,
        pressure,
        qdisc::{Pacers, QdiscError},
        remove_egress_filter,
    },
    degrade::{self, SampleTx},
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
    /// A valid policy the running datapath cannot take live (the reason at the field).
    #[error("{0}")]
    Refused(PolicyErrors),
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
            RunError::Policy(_) | RunError::Refused(_) => EXIT_INVALID,
            _ => EXIT_RUNTIME,
        }
    }
}

/// Warns when this host's ephemeral range lets its direct connections take client ports that
/// balanced flows show their backends (`agent_common::ports`): the two could meet on one
/// backend 4-tuple again. The range of other clients (forwarded traffic) is not known here.
fn warn_port_range() {
    use agent_common::ports::{
        EPHEMERAL_FIRST, EPHEMERAL_LAST, NAT_PORT_FIRST, NAT_PORT_LAST, range_defeats_nat_port,
    };
    const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let Ok(text) = std::fs::read_to_string(SYSCTL) else {
        return;
    };
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    if let (Some(Ok(first)), Some(Ok(last))) = (ports.next(), ports.next())
        && range_defeats_nat_port(first, last)
    {
        tracing::warn!(
            "net.ipv4.ip_local_port_range is {first} {last}: direct connections from this host \
             may take client ports that balanced flows show their backends (the datapath \
             keeps ports outside {EPHEMERAL_FIRST}-{EPHEMERAL_LAST} and moves those inside to \
             {NAT_PORT_FIRST}-{NAT_PORT_LAST}); keep the range within \
             {EPHEMERAL_FIRST}-{EPHEMERAL_LAST}"
        );
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

    if !plan.compiled.lb.is_empty() {
        warn_port_range();
    }

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
    let adopted = datapath.adopted();
    if adopted {
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
    // Adopted maps keep their ids: every service, breaker and balanced range the earlier
    // agent left keeps its counters, buckets and flows.
    let live_ids = datapath.live_ids(&plan.compiled)?;
    let (plan, ids) = plan
        .with_ids(&live_ids, limits(&datapath))
        .map_err(|e| RunError::Refused(ids_refusal(&policy, &e)))?;
    // The policy goes under the generation the programs do not read, balanced services'
    // tables too (adopted maps: their first tables leave out backends whose breaker is open,
    // as the supervisor resumes them), then one write switches to it.
    let staged = datapath.stage(&plan.compiled)?;
    let lb_maps = match stage_balancing(&mut datapath, &plan, staged.generation, adopted, None) {
        Ok(m) => m,
        Err(e) => {
            datapath.unstage(staged);
            return Err(e);
        }
    };
    let report = datapath.switch(staged)?;
    datapath.retire_backends(&plan.compiled)?;
    tracing::info!(
        "policy written to the maps (generation {}): {report:?}",
        datapath.generation()
    );
    // Before attaching, so a shaped service's first packet meets fq. Dropped (the default
    // qdiscs back) on every way out of this function, a failed attach included.
    let pacers = install_pacers(&policy, &plan)?;
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

    // Breaker entries are in the maps already (closed, from `stage`); from here on the
    // supervisor writes every transition.
    let origin = if adopted {
        supervisor::Origin::Adopted
    } else {
        supervisor::Origin::Fresh
    };
    // The evaluator takes the supervisor's probe results for as long as it runs: one
    // channel, a sender for every supervisor.
    let (samples, samples_rx) = degrade::sample_channel();
    let supervisor = start_supervisor(&policy, &plan, &state, origin, &samples);
    // The balancer follows health and breakers from here on.
    let balancer = lb_maps.map(|maps| start_balancer(&state, &plan, maps));
    // Modes an earlier agent left in DEGRADE are adopted (those services start degraded).
    let degrade = degrade::Config::new(&policy, &plan.compiled);
    let evaluator = start_evaluator(degrade.clone(), &state, samples_rx);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut running = Running {
        plan,
        ids,
        supervisor,
        balancer,
        pacers,
        http: start_http(listener, &state),
        samples,
        degrade,
        evaluator,
    };
    state.set_ready(true);
    tracing::info!("ready; serving on http://{}", running.plan.listen);

    let log_task = logger.map(|l| tokio::spawn(logs::forward_ebpf_logs(l)));
    let keys_task = tokio::spawn(count_keys_periodically(state.clone(), stop_rx.clone()));
    let pressure_task = tokio::spawn(watch_map_pressure(state.clone(), stop_rx.clone()));
    let watchdog_task = tokio::spawn(watchdog(state.clone(), stop_rx.clone()));

    let result = wait_for_signals(&mut signals, &mut file_watch, file, &mut running, &state).await;

    // Not ready any more; stop the tasks (the watchdog first: it must not re-attach what is
    // detached next); then leave the datapath running, or detach it and put the default
    // qdiscs back; then stop serving.
    state.set_ready(false);
    let _ = stop_tx.send(true);
    let _ = watchdog_task.await;
    let _ = keys_task.await;
    let _ = pressure_task.await;
    if let Some(t) = running.supervisor.take() {
        t.stop().await;
    }
    // The modes stay in DEGRADE: the datapath keeps enforcing them, the next agent adopts
    // them.
    if let Some(e) = running.evaluator.take() {
        e.stop().await;
    }
    if let Some(t) = running.balancer.take() {
        t.stop().await;
    }
    running.http.stop().await;
    if let Some(t) = log_task {
        t.abort();
    }
    let mut dp = state.datapath_mut();
    if options.detach_on_exit {
        dp.detach_all();
        drop(running.pacers.take());
        match dp.pin_dir().map(PinDir::remove_all) {
            Some(Err(e)) => tracing::warn!("removing pins: {e}"),
            Some(Ok(removed)) => tracing::info!("removed {} pins", removed.len()),
            None => {}
        }
        tracing::info!("detached; bye");
    } else {
        dp.leave_attached();
        if let Some(p) = running.pacers.take() {
            p.leave();
        }
        tracing::info!("the datapath keeps enforcing the last policy (pinned at {pin_path}); bye");
    }
    result
}

/// What runs for the policy in force; a reload replaces its parts.
struct Running {
    plan: Plan,
    /// The datapath ids `plan` holds (kept by the next reload).
    ids: Ids,
    supervisor: Option<Task>,
    balancer: Option<Task>,
    pacers: Option<Pacers>,
    http: Task,
    /// The degradation evaluator's samples channel, for every supervisor.
    samples: SampleTx,
    /// What the evaluator serves (a reload that changes only this reconfigures it alone).
    degrade: degrade::Config,
    /// `None` when its maps could not be opened (logged): modes stay as they are.
    evaluator: Option<degrade::Evaluator>,
}

/// A task with a stop signal of its own.
struct Task {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Task {
    async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.handle.await {
            tracing::warn!("stopping a task: {e}");
        }
    }
}

/// The table sizes the datapath was loaded with, which ids must stay below.
fn limits(datapath: &Datapath) -> Limits {
    Limits {
        services: datapath.sizes().services,
        backends: datapath.sizes().backends,
    }
}

/// A policy whose ids do not fit beside the running one's, at its `services` field.
fn ids_refusal(policy: &Policy, e: &IdsError) -> PolicyErrors {
    PolicyErrors(vec![policy.error_at("services", e.to_string())])
}

/// The pacing qdiscs a plan needs, or none.
fn install_pacers(policy: &Policy, plan: &Plan) -> Result<Option<Pacers>, RunError> {
    let Some(p) = &plan.pacing else {
        return Ok(None);
    };
    let pacers = Pacers::install(&p.spec, &p.interfaces).map_err(|e| match e {
        // Only when the probe could not run: the same refusal as the probe's.
        QdiscError::FqMissing(why) => {
            RunError::Policy(PolicyErrors(plan::fq_missing(policy, &why)))
        }
        e => RunError::Qdisc(e),
    })?;
    for p in pacers.describe() {
        tracing::info!("pacing qdisc {p}");
    }
    Ok(Some(pacers))
}

/// Writes the balanced services of `plan` under `generation`: their backends, entries and
/// first tables, before the switch to it. The first weights follow the breakers the maps hold
/// (`resumed`: adopted maps or a reload) and the health a reload carries over. Returns the
/// balancer's handle and a second one for the status side's counter reads.
fn stage_balancing(
    datapath: &mut Datapath,
    plan: &Plan,
    generation: u32,
    resumed: bool,
    carried: Option<&supervisor::Backends>,
) -> Result<Option<(LbMaps, LbMaps)>, RunError> {
    let lb = &plan.compiled.lb;
    if lb.is_empty() {
        return Ok(None);
    }
    // Replies from backends are found behind the port bitmap, as breakers are.
    datapath.mark_ports(
        lb.iter()
            .flat_map(|s| &s.backends)
            .map(|b| b.address.port()),
    )?;
    let mut maps = datapath.lb_maps()?.for_generation(generation);
    let breakers = if resumed {
        supervisor::breakers_in(datapath, &plan.compiled.backends)
    } else {
        Default::default()
    };
    let health = carried
        .map(|c| balancer::carried_health(c, lb))
        .unwrap_or_default();
    balancer::install_resumed(&mut maps, lb, resumed, &breakers, &health)?;
    Ok(Some((maps, datapath.lb_maps()?.for_generation(generation))))
}

/// Starts health checks and breakers for `plan` (none when no service has backends, or when
/// they could not start: the datapath then enforces the policy with every breaker closed,
/// fail open).
fn start_supervisor(
    policy: &Policy,
    plan: &Plan,
    state: &AgentState,
    origin: supervisor::Origin<'_>,
    samples: &SampleTx,
) -> Option<Task> {
    let (stop, stop_rx) = watch::channel(false);
    let started = {
        let dp = state.datapath();
        let samples = Some(samples.clone());
        supervisor::start(
            policy,
            &plan.compiled.backends,
            Some(&dp),
            origin,
            samples,
            stop_rx,
        )
    };
    match started {
        Ok(Some((backends, handle))) => {
            state.set_backends(Some(backends));
            Some(Task { stop, handle })
        }
        Ok(None) => {
            state.set_backends(None);
            None
        }
        Err(e) => {
            tracing::error!("{e}");
            state.set_backends(None);
            None
        }
    }
}

/// Starts the degradation evaluator on its own handles on `DEGRADE` (one to write, one for
/// status to read the flow counters), fed by `samples` and the supervisor's channel as the
/// state holds it. `None` when the maps cannot be opened (logged): the modes stay as the
/// datapath holds them.
fn start_evaluator(
    config: degrade::Config,
    state: &AgentState,
    samples: degrade::SampleRx,
) -> Option<degrade::Evaluator> {
    let maps = {
        let dp = state.datapath();
        dp.degrade_maps().and_then(|w| Ok((w, dp.degrade_maps()?)))
    };
    let (sink, counters) = match maps {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("degradation evaluator not started: {e}");
            return None;
        }
    };
    let evaluator = degrade::start(
        config,
        Box::new(sink),
        Some(counters),
        samples,
        state.backends(),
    );
    state.set_degrade(Some(evaluator.view()));
    Some(evaluator)
}

/// Runs the balancer of `plan` on `maps` (written for the live generation) until stopped.
fn start_balancer(state: &Arc<AgentState>, plan: &Plan, maps: (LbMaps, LbMaps)) -> Task {
    let (maps, counters) = maps;
    let view = Arc::new(LbView::new(counters, plan.compiled.lb.clone()));
    state.set_balancing(Some(view.clone()));
    let services = plan.compiled.lb.clone();
    let health = state.backends();
    let (stop, stop_rx) = watch::channel(false);
    let handle =
        tokio::task::spawn_blocking(move || balancer::run(maps, services, health, view, stop_rx));
    Task { stop, handle }
}

/// Serves the HTTP endpoints on `listener` until stopped.
fn start_http(listener: TcpListener, state: &Arc<AgentState>) -> Task {
    let (stop, mut stop_rx) = watch::channel(false);
    let serve = http::serve(listener, state.clone(), async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    let handle = tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::warn!("HTTP server: {e}");
        }
    });
    Task { stop, handle }
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
    running: &mut Running,
    state: &Arc<AgentState>,
) -> Result<(), RunError> {
    let Signals { term, int, hup } = signals;
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
                    let (missing, now) = (Outcome::Missing, SystemTime::now());
                    state.record_reload(Trigger::File, missing, Some(error), now, Duration::ZERO);
                    continue;
                }
            },
        };
        tracing::info!("{trigger}: reloading {}", file.display());
        let (began, began_at) = (Instant::now(), SystemTime::now());
        let result = reload(file, running, state).await;
        let outcome = reload_outcome(&result);
        let error = result.as_ref().err().map(ToString::to_string);
        // An applied policy is in force from the switch; the generation moves once the
        // reload is done (supervisor and balancer started again).
        let at = match &result {
            Ok(Reloaded::Applied { took, .. }) => began_at + *took,
            _ => SystemTime::now(),
        };
        state.record_reload(trigger, outcome, error, at, began.elapsed());
        match result {
            Ok(done) => tracing::info!("{done}"),
            Err(e) => tracing::error!(
                "reload ({}): {}, the running policy stays in force:\n{e}",
                trigger.as_str(),
                outcome.as_str()
            ),
        }
    }
}

/// How a reload ended, for its accounting.
fn reload_outcome(result: &Result<Reloaded, RunError>) -> Outcome {
    match result {
        Ok(Reloaded::Applied { .. } | Reloaded::Degradation) => Outcome::Ok,
        Ok(Reloaded::Unchanged) => Outcome::Unchanged,
        Err(RunError::Policy(_)) => Outcome::Invalid,
        Err(RunError::Refused(_)) => Outcome::Refused,
        Err(_) => Outcome::Failed,
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The policy is the one in force: nothing was written.
    Unchanged,
    /// Only degradation settings changed (conditions, `recover_after`, `agent.shed_step`):
    /// the evaluator took them; nothing was written to the datapath's policy.
    Degradation,
    /// The new policy is in force: its generation, what was written, and how long from the
    /// start of the reload to the switch.
    Applied {
        generation: u32,
        report: ApplyReport,
        took: Duration,
    },
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reloaded::Unchanged => {
                f.write_str("reloaded: the policy is unchanged, nothing written")
            }
            Reloaded::Degradation => f.write_str(
                "reloaded: only degradation settings changed, the evaluator took them; \
                 nothing written to the datapath's policy",
            ),
            Reloaded::Applied {
                generation,
                report,
                took,
            } => write!(
                f,
                "reloaded: generation {generation} in force {took:?} after the reload began: \
                 {report:?}"
            ),
        }
    }
}

/// Validates the file again and, all or nothing, puts it in force: the new policy is staged
/// beside the running one (maps of the other generation, new interfaces attached, pacing
/// qdiscs), the datapath switches to it with one write, then what only the old policy used
/// goes (breaker entries of removed backends, hooks, qdiscs). Errors before the switch leave
/// the running policy in force and the datapath as it was (what was staged is not live; what
/// was added is removed). Refused, with the reason, is what the kernel cannot change live.
async fn reload(
    file: &Path,
    running: &mut Running,
    state: &Arc<AgentState>,
) -> Result<Reloaded, RunError> {
    let began = std::time::Instant::now();
    let policy = config::load_file(file).map_err(RunError::Policy)?;
    let plan = Plan::new(&policy).map_err(RunError::Policy)?;
    if plan.pacing.is_some() && plan.pacing != running.plan.pacing {
        plan.check_pacing(&policy).map_err(RunError::Policy)?;
    }
    let (refusal, limits) = {
        let dp = state.datapath();
        let capacity = |name| dp.capacity(name).ok().flatten();
        (plan.refusal(&policy, &running.plan, capacity), limits(&dp))
    };
    if let Some((field, why)) = refusal {
        return Err(RunError::Refused(PolicyErrors(vec![
            policy.error_at(&field, why),
        ])));
    }
    let (plan, ids) = plan
        .with_ids(&running.ids, limits)
        .map_err(|e| RunError::Refused(ids_refusal(&policy, &e)))?;
    let degrade = degrade::Config::new(&policy, &plan.compiled);
    if plan.same_as(&running.plan) {
        if degrade == running.degrade {
            return Ok(Reloaded::Unchanged);
        }
        // Nothing for the datapath's policy: only conditions, recover_after or shed_step.
        reconfigure_evaluator(running, state, degrade).await;
        return Ok(Reloaded::Degradation);
    }
    let listener = if plan.listen == running.plan.listen {
        None
    } else {
        Some(TcpListener::bind(plan.listen).await.map_err(|e| {
            RunError::Refused(PolicyErrors(vec![
                policy.error_at("agent.listen", format!("binding {}: {e}", plan.listen)),
            ]))
        })?)
    };

    // The balancer writes the live generation's tables; the new one writes the staged one's.
    let old_balancer = running.balancer.take();
    if let Some(b) = old_balancer {
        b.stop().await;
    }
    let carried: Option<supervisor::Backends> = state.backends().map(|rx| rx.borrow().clone());
    let staging = began.elapsed();
    let staged = tokio::task::block_in_place(|| {
        stage_all(&policy, &plan, &running.plan, state, carried.as_ref())
    });
    let Switched {
        generation,
        report,
        lb_maps,
        pacers,
    } = match staged {
        Ok(s) => s,
        Err(e) => {
            // The running policy's balancer goes on where it stopped.
            if let Some(maps) = restage_running_balancer(&running.plan, state) {
                running.balancer = Some(start_balancer(state, &running.plan, maps));
            }
            return Err(e);
        }
    };

    // In force. What only the old policy used goes.
    let switched = began.elapsed();
    if plan.backends_differ(&running.plan) {
        if let Some(s) = running.supervisor.take() {
            s.stop().await;
        }
        // Its last word: what it published after the stage read `carried`.
        let last: supervisor::Backends = state
            .backends()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default();
        running.supervisor = start_supervisor(
            &policy,
            &plan,
            state,
            supervisor::Origin::Reload(&last),
            &running.samples,
        );
    }
    // Services carry their state by name; ids and companions are the new plan's.
    reconfigure_evaluator(running, state, degrade).await;
    {
        let mut dp = state.datapath_mut();
        match dp.retire_backends(&plan.compiled) {
            Ok((0, 0)) => {}
            Ok((removed, rewritten)) => tracing::info!(
                "breaker entries: {removed} of removed backends deleted, {rewritten} rewritten"
            ),
            Err(e) => tracing::warn!("retiring breaker entries of removed backends: {e}"),
        }
        for d in dp.detach_removed(&plan.attach) {
            tracing::info!("detached {d} (no longer in the policy)");
        }
    }
    running.balancer = lb_maps.map(|maps| start_balancer(state, &plan, maps));
    if running.balancer.is_none() {
        state.set_balancing(None);
    }
    if let Some(mut old) = running.pacers.take() {
        if let Some(new) = &plan.pacing {
            old.release(&new.interfaces);
        }
        drop(old);
    }
    running.pacers = pacers;
    if let Some(listener) = listener {
        let old = std::mem::replace(&mut running.http, start_http(listener, state));
        old.stop().await;
        tracing::info!(
            "serving on http://{} (was {})",
            plan.listen,
            running.plan.listen
        );
    }
    if plan.log_level != running.plan.log_level {
        logs::set_level(&plan.log_level);
    }
    state.set_services(plan.services.clone());
    state.set_array_use(pressure::ArrayUse::of(&plan.compiled));
    running.plan = plan;
    running.ids = ids;
    tracing::debug!(
        "reload: validated {staging:?}, in force {switched:?}, done {:?}",
        began.elapsed()
    );
    Ok(Reloaded::Applied {
        generation,
        report,
        took: switched,
    })
}

/// Hands the evaluator a reload's services and the supervisor's channel as it runs now.
async fn reconfigure_evaluator(running: &mut Running, state: &AgentState, config: degrade::Config) {
    if let Some(e) = &running.evaluator {
        e.reconfigure(config.clone(), state.backends()).await;
    }
    running.degrade = config;
}

/// The staged part of a reload, up to and including the switch: the maps of the other
/// generation, the balanced services' entries and tables there, the pacing qdiscs and the
/// hooks the new policy adds. Undone on any error before the switch.
/// What a staged reload is in force with.
struct Switched {
    generation: u32,
    report: ApplyReport,
    lb_maps: Option<(LbMaps, LbMaps)>,
    pacers: Option<Pacers>,
}

fn stage_all(
    policy: &Policy,
    plan: &Plan,
    running: &Plan,
    state: &AgentState,
    carried: Option<&supervisor::Backends>,
) -> Result<Switched, RunError> {
    let mut dp = state.datapath_mut();
    let staged = dp.stage(&plan.compiled)?;
    let generation = staged.generation;
    // Each step undoes its own part on failure; later failures undo the earlier steps too.
    let lb_maps = match stage_balancing(&mut dp, plan, generation, true, carried) {
        Ok(m) => m,
        Err(e) => {
            dp.unstage(staged);
            return Err(e);
        }
    };
    let pacers = match install_pacers(policy, plan) {
        Ok(p) => p,
        Err(e) => {
            dp.unstage(staged);
            return Err(e);
        }
    };
    // Pacers the running policy has stay when this reload is undone; only those it added go.
    let undo_pacers = |pacers: Option<Pacers>| {
        if let (Some(mut p), Some(old)) = (pacers, &running.pacing) {
            p.release(&old.interfaces);
        }
    };
    let attached = match dp.attach_added(&running.attach, &plan.attach) {
        Ok(a) => a,
        Err(e) => {
            dp.unstage(staged);
            undo_pacers(pacers);
            return Err(e.into());
        }
    };
    match dp.switch(staged) {
        Ok(report) => {
            for a in attached {
                tracing::info!("attached {a}");
            }
            Ok(Switched {
                generation,
                report,
                lb_maps,
                pacers,
            })
        }
        Err(e) => {
            // `switch` unstaged; the hooks this reload added go (the running policy's stay).
            for d in dp.detach_removed(&running.attach) {
                tracing::info!("abandoned reload: detached {d}");
            }
            undo_pacers(pacers);
            Err(e.into())
        }
    }
}

/// After a failed reload: the running policy's balancer handles again, on the live generation.
fn restage_running_balancer(running: &Plan, state: &AgentState) -> Option<(LbMaps, LbMaps)> {
    if running.compiled.lb.is_empty() {
        return None;
    }
    let dp = state.datapath();
    let g = dp.generation();
    match (dp.lb_maps(), dp.lb_maps()) {
        (Ok(a), Ok(b)) => Some((a.for_generation(g), b.for_generation(g))),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("the running policy's balancer could not start again: {e}");
            None
        }
    }
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
        assert_eq!(reload_outcome(&Ok(Reloaded::Unchanged)), Outcome::Unchanged);
        let invalid = Err(RunError::Policy(PolicyErrors(Vec::new())));
        assert_eq!(reload_outcome(&invalid), Outcome::Invalid);
        let refused = Err(RunError::Refused(PolicyErrors(Vec::new())));
        assert_eq!(reload_outcome(&refused), Outcome::Refused);
        let failed = Err(RunError::Signals(std::io::Error::other("x")));
        assert_eq!(reload_outcome(&failed), Outcome::Failed);
    }
}
