//! `cargo xtask demo`: the agent in two network namespaces, in four acts.
//!
//! client netns (veth-client 198.18.0.1) --veth--> server netns (veth-agent 198.18.0.2, ...)
//!
//! 1. Rate limit (`ratelimit.rs`; config/demo.yaml): the agent on the server's veth, a UDP
//!    flood at a multiple of the limit, offered against passed per second.
//! 2. Payment path fails fast (`breaker.rs`; config/demo-breaker.yaml): the agent on the
//!    client's veth, backends on server addresses of their own, one made to hang and restored;
//!    connects per backend per second next to its breaker state.
//! 3. Flash sale (`lb.rs`; config/demo-lb.yaml): the agent on the client's veth balancing a VIP
//!    over backends on server addresses of their own; a 10x surge spread by weight, one backend
//!    dying and coming back; connections served per backend per second next to its weight.
//! 4. Degradation (`degrade.rs`; config/demo-degrade.yaml): the agent on the client's veth
//!    balancing a VIP over HTTP backends that slow down; the service switched to its fallback
//!    in the datapath and back after `recover_after`; answers per server per second next to
//!    the service's mode.
//!
//! The namespaces, the agent process, the backends and the UDP flood are the end-to-end
//! tests' own (crate `agent-tests`); the acts read the agent's state from its JSON `/status`
//! (`watch.rs`) and their policies through `policy.rs` alone. Cleanup is by guards, dropped in
//! reverse order of creation (agent, servers, namespaces) on success, error, panic and Ctrl-C (the
//! signal handler turns it into an error that unwinds).

mod breaker;
mod degrade;
mod lb;
mod policy;
mod ratelimit;
mod watch;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    ops::ControlFlow,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use agent_tests::{AgentProcess, Netns, Scaled, Topology, netns};
use anyhow::{Context as _, bail};

use self::policy::{Balanced, Degradable, Guarded, RateLimited};
use crate::{build, setup, sys, workspace};

const DEFAULT_POLICY: &str = "config/demo.yaml";
const DEFAULT_BREAKER_POLICY: &str = "config/demo-breaker.yaml";
const DEFAULT_LB_POLICY: &str = "config/demo-lb.yaml";
const DEFAULT_DEGRADE_POLICY: &str = "config/demo-degrade.yaml";
const CLIENT_NS: &str = "agent-demo-client";
const SERVER_NS: &str = "agent-demo-server";
/// The veth ends when no act that runs names them.
const CLIENT_IF: &str = "veth-client";
const SERVER_IF: &str = "veth-agent";
/// The addresses of the veth ends ([`Topology`]'s) and their network.
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PREFIX_LEN: u8 = Topology::V4_PREFIX;
/// A debug build loading and attaching its programs; generous, it is a deadline, not a sleep.
const READY_TIMEOUT: Scaled = Scaled::secs(60);

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Act {
    /// The agent rate-limiting a UDP flood.
    Ratelimit,
    /// Circuit breakers: a hung payment backend refused in microseconds, then back.
    Breaker,
    /// Load balancing: a flash sale spread over backends by weight, one dying and ramping back.
    Lb,
    /// Degradation: slow backends, the service switched to its fallback and back.
    Degrade,
    /// All four, one after the other.
    All,
}

#[derive(clap::Args)]
pub struct Args {
    /// Which act to run.
    #[arg(long, value_enum, default_value_t = Act::All)]
    act: Act,
    /// Policy of the rate-limit act; copied before use [default: config/demo.yaml]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy of the breaker act; copied before use [default: config/demo-breaker.yaml]
    #[arg(long, value_name = "FILE")]
    breaker_config: Option<PathBuf>,
    /// Policy of the load-balancing act; copied before use [default: config/demo-lb.yaml]
    #[arg(long, value_name = "FILE")]
    lb_config: Option<PathBuf>,
    /// Policy of the degradation act; copied before use [default: config/demo-degrade.yaml]
    #[arg(long, value_name = "FILE")]
    degrade_config: Option<PathBuf>,
    /// Seconds of traffic in the rate-limit act.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Offered load as a multiple of the service's rate limit.
    #[arg(long, default_value_t = 5)]
    factor: u64,
    /// Build and run the agent with the release profile.
    #[arg(long)]
    release: bool,
    /// Topology and traffic only, without the agent: the baseline.
    #[arg(long, conflicts_with = "agent")]
    no_agent: bool,
    /// Run this agent binary instead of building one.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
}

/// What the acts share: the agent binary, the namespaces, where files go.
pub struct Demo {
    /// `None` with `--no-agent`.
    agent_bin: Option<PathBuf>,
    topology: Topology,
    run_dir: PathBuf,
}

/// The policy of each act that runs, and its file.
struct Plans {
    ratelimit: Option<(RateLimited, PathBuf)>,
    breaker: Option<(Guarded, PathBuf)>,
    lb: Option<((Guarded, Balanced), PathBuf)>,
    degrade: Option<(Degradable, PathBuf)>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    sys::require_root("cargo xtask demo (BPF programs, network namespaces)")?;
    sys::catch_interrupts().context("install the signal handler")?;
    let toolchain = setup::run()?;
    let plans = Plans::load(args)?;
    let agent_bin = match (&args.agent, args.no_agent) {
        (_, true) => None,
        (Some(path), false) => Some(path.clone()),
        (None, false) => Some(build::agent_binary(&toolchain, args.release)?),
    };
    let run_dir = workspace::target_dir()?.join("xtask").join("demo");
    fs::create_dir_all(&run_dir).with_context(|| format!("create {}", run_dir.display()))?;
    if sys::interrupted() {
        bail!("interrupted");
    }

    let (client_if, server_if) = plans.interfaces()?;
    for ns in [CLIENT_NS, SERVER_NS] {
        if netns::netns_list()?.iter().any(|n| n == ns) {
            netns::ip(&["netns", "delete", ns])?;
            println!("demo: removed netns {ns} left over from an earlier run");
        }
    }
    let topology = Topology::named(CLIENT_NS, SERVER_NS, &client_if, &server_if)?;
    println!(
        "demo: {CLIENT_NS} ({client_if} {CLIENT_ADDR}/{PREFIX_LEN}) <-> {SERVER_NS} ({server_if} \
         {SERVER_ADDR}/{PREFIX_LEN})"
    );
    let demo = Demo {
        agent_bin,
        topology,
        run_dir,
    };
    if let Some((plan, config)) = &plans.ratelimit {
        ratelimit::run(&demo, args, plan, config)?;
    }
    if let Some((plan, config)) = &plans.breaker {
        breaker::run(&demo, plan, config)?;
    }
    if let Some((plan, config)) = &plans.lb {
        lb::run(&demo, plan, config)?;
    }
    if let Some((plan, config)) = &plans.degrade {
        degrade::run(&demo, plan, config)?;
    }
    // The acts' agents are gone; the namespaces go with the topology.
    drop(demo);
    println!("demo: deleted netns {CLIENT_NS} and {SERVER_NS}");
    Ok(())
}

impl Plans {
    fn load(args: &Args) -> anyhow::Result<Self> {
        let policy = |path: &Option<PathBuf>, default: &str| {
            path.clone()
                .unwrap_or_else(|| workspace::root().join(default))
        };
        let runs = |act| args.act == act || args.act == Act::All;
        let mut plans = Self {
            ratelimit: None,
            breaker: None,
            lb: None,
            degrade: None,
        };
        if runs(Act::Ratelimit) {
            let config = policy(&args.config, DEFAULT_POLICY);
            plans.ratelimit = Some((ratelimit::plan(&config)?, config));
        }
        if runs(Act::Breaker) {
            let config = policy(&args.breaker_config, DEFAULT_BREAKER_POLICY);
            plans.breaker = Some((breaker::plan(&config)?, config));
        }
        if runs(Act::Lb) {
            let config = policy(&args.lb_config, DEFAULT_LB_POLICY);
            plans.lb = Some((lb::plan(&config)?, config));
        }
        if runs(Act::Degrade) {
            let config = policy(&args.degrade_config, DEFAULT_DEGRADE_POLICY);
            plans.degrade = Some((degrade::plan(&config)?, config));
        }
        Ok(plans)
    }

    /// The veth ends (client, server) the acts run on; each act's policy names the one its
    /// agent attaches to.
    fn interfaces(&self) -> anyhow::Result<(String, String)> {
        let server_if = self.ratelimit.as_ref().map(|(p, _)| &p.agent.interface);
        let breaker_if = self.breaker.as_ref().map(|(p, _)| &p.agent.interface);
        let lb_if = self.lb.as_ref().map(|((p, _), _)| &p.agent.interface);
        let degrade_if = self.degrade.as_ref().map(|(p, _)| &p.agent.interface);
        let client_side = [
            ("breaker", breaker_if),
            ("load-balancing", lb_if),
            ("degradation", degrade_if),
        ];
        let named: Vec<(&str, &String)> = client_side
            .iter()
            .filter_map(|(act, name)| name.map(|n| (*act, n)))
            .collect();
        if let Some((act, name)) = named.iter().find(|(_, n)| *n != named[0].1) {
            bail!(
                "the {} act attaches the agent to {}, the {act} act to {name}: they all need \
                 the client's veth, one name",
                named[0].0,
                named[0].1
            );
        }
        let client_if = named.first().map_or(CLIENT_IF, |(_, n)| n.as_str());
        let server_if = server_if.map_or(SERVER_IF, String::as_str);
        if client_if == server_if {
            bail!(
                "the policies attach the agent to {client_if} on both sides: the rate-limit act \
                 needs the server's veth, the breaker, load-balancing and degradation acts the \
                 client's"
            );
        }
        Ok((client_if.to_owned(), server_if.to_owned()))
    }
}

impl Demo {
    /// Copies the policy into the run directory as `{prefix}policy.yaml` (edits to the original
    /// during the demo do not reload the agent) and starts the agent on it inside `netns`, its
    /// log next to the copy. `None` with `--no-agent`.
    fn start_agent(
        &self,
        config: &Path,
        netns: &Netns,
        prefix: &str,
    ) -> anyhow::Result<Option<AgentProcess>> {
        let Some(bin) = &self.agent_bin else {
            return Ok(None);
        };
        let copy = self.run_dir.join(format!("{prefix}policy.yaml"));
        fs::copy(config, &copy)
            .with_context(|| format!("copy {} to {}", config.display(), copy.display()))?;
        let mut agent = AgentProcess::spawn(bin, netns, &copy)?;
        println!(
            "demo: started `{} run --config {}` in netns {} (pid {}, log {})",
            bin.display(),
            copy.display(),
            netns.name(),
            agent.pid(),
            agent.log_path().display()
        );
        let took = agent.wait_ready(READY_TIMEOUT)?;
        println!("demo: agent ready after {:.1}s", took.as_secs_f64());
        Ok(Some(agent))
    }
}

impl Demo {
    /// Gives the client side the address `clients` and the VIP, with a route that makes
    /// connections to the VIP leave from `clients`.
    fn route_vip(&self, vip: Ipv4Addr, clients: Ipv4Addr) -> anyhow::Result<()> {
        let topology = &self.topology;
        topology.add_client_addr(clients.into())?;
        let (vip_net, src) = (format!("{vip}/32"), clients.to_string());
        let route = [
            "route",
            "replace",
            &vip_net,
            "dev",
            &topology.client_if,
            "src",
            &src,
        ];
        topology.client.ip(&route)?;
        topology.add_vip(vip.into())?;
        Ok(())
    }
}

/// Prints `agent status` of the act's agent and stops it (SIGTERM).
fn stop_agent(agent: Option<AgentProcess>) -> anyhow::Result<()> {
    let Some(agent) = agent else {
        return Ok(());
    };
    println!("\ndemo: agent status");
    let addr = agent.listen().to_string();
    print!("{}", agent.command(&["status", "--addr", &addr])?);
    let status = agent.stop()?;
    println!("demo: agent stopped ({status})");
    Ok(())
}

/// Whether `ip` is an address the demo can give a backend or a VIP of its own: in the
/// topology's network, and none of `taken` (the veth ends' own among them).
fn free_address(ip: Ipv4Addr, taken: &[Ipv4Addr]) -> bool {
    let network = |ip: Ipv4Addr| u32::from(ip) >> (32 - u32::from(PREFIX_LEN));
    network(ip) == network(CLIENT_ADDR)
        && ![CLIENT_ADDR, SERVER_ADDR].contains(&ip)
        && !taken.contains(&ip)
}

/// Checks that the demo can place the VIP and every backend of `file`'s act on an address of
/// its own, none of them `clients` (the act's client address).
fn check_addresses(
    file: &impl std::fmt::Display,
    vip: SocketAddrV4,
    backends: &[SocketAddrV4],
    clients: Ipv4Addr,
) -> anyhow::Result<()> {
    if !free_address(*vip.ip(), &[clients]) {
        bail!(
            "{file}: VIP {vip}: the demo needs a VIP in {CLIENT_ADDR}/{PREFIX_LEN}, other than \
             {CLIENT_ADDR}, {SERVER_ADDR} and {clients}"
        );
    }
    for (i, backend) in backends.iter().enumerate() {
        if !free_address(*backend.ip(), &[clients, *vip.ip()]) {
            bail!(
                "{file}: backend {backend}: the demo places backends on addresses of their own \
                 in {CLIENT_ADDR}/{PREFIX_LEN}, other than {CLIENT_ADDR}, {SERVER_ADDR}, \
                 {clients} and the VIP"
            );
        }
        if backends[..i].iter().any(|b| b.ip() == backend.ip()) {
            bail!("{file}: backend {backend}: each backend needs an address of its own");
        }
    }
    Ok(())
}

/// A client of a scene: runs on a thread of its own until the flag is set.
type Client<'a> = Box<dyn FnOnce(&AtomicBool) -> anyhow::Result<()> + Send + 'a>;

/// Acts 2, 3 and 4: `clients` run on threads of their own while `tick` runs on this one every
/// `every` (the `n`th tick at `n` x `every`), once the agent was seen still running, until
/// `tick` ends the scene. Every thread is stopped and joined before this returns, whatever
/// happens; a client that ends before the scene does fails it.
fn scene<T>(
    every: Duration,
    clients: Vec<Client<'_>>,
    mut agent: Option<&mut AgentProcess>,
    mut tick: impl FnMut(u32, Option<&AgentProcess>) -> anyhow::Result<ControlFlow<T>>,
) -> anyhow::Result<T> {
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let threads: Vec<_> = clients
            .into_iter()
            .map(|client| scope.spawn(|| client(&stop)))
            .collect();
        let start = Instant::now();
        let mut played = || -> anyhow::Result<T> {
            for n in 1.. {
                sleep_until(start + every * n)?;
                if threads.iter().any(|t| t.is_finished()) {
                    break;
                }
                if let Some(agent) = agent.as_deref_mut() {
                    agent.check_running()?;
                }
                if let ControlFlow::Break(ending) = tick(n, agent.as_deref())? {
                    return Ok(ending);
                }
            }
            bail!("a client thread ended before the act did")
        };
        let played = played();
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            match thread.join() {
                Ok(result) => result?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        played
    })
}

/// Sleeps until `deadline`, failing at once on Ctrl-C.
fn sleep_until(deadline: Instant) -> anyhow::Result<()> {
    if sys::interrupted() {
        bail!("interrupted");
    }
    if let Some(left) = deadline.checked_duration_since(Instant::now()) {
        thread::sleep(left);
    }
    Ok(())
}

/// `+1.25s`: the time since `start`, for the lines of a story.
fn clock(start: Instant) -> String {
    format!("+{:.2}s", start.elapsed().as_secs_f64())
}

/// `0.12 s`: from `from` to `to`.
fn since(from: Instant, to: Instant) -> String {
    format!("{:.2} s", to.saturating_duration_since(from).as_secs_f64())
}

/// `now - before` for a table cell; `-` when the agent says nothing.
fn delta(now: Option<u64>, before: Option<u64>) -> String {
    now.map_or("-".into(), |now| (now - before.unwrap_or(0)).to_string())
}

/// `0.042` (milliseconds, to the microsecond).
fn millis(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}
