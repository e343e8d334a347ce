//! `cargo xtask demo`: the agent in two network namespaces, in three acts.
//!
//! client netns (veth-client 198.18.0.1) --veth--> server netns (veth-agent 198.18.0.2, ...)
//!
//! 1. Rate limit (`ratelimit.rs`, `live.rs`, `traffic.rs`; config/demo.yaml): the agent on the
//!    server's veth, a UDP flood at a multiple of the limit, offered against passed per second.
//! 2. Payment path fails fast (`breaker/`; config/demo-breaker.yaml): the agent on the client's
//!    veth, backends on server addresses of their own, one made to hang and restored; connects
//!    per backend per second next to its breaker state.
//! 3. Flash sale (`lb/`; config/demo-lb.yaml): the agent on the client's veth balancing a VIP
//!    over backends on server addresses of their own; a 10x surge spread by weight, one backend
//!    dying and coming back; connections served per backend per second next to its weight.
//!
//! Shared: the topology, the agent process, /metrics. Cleanup is by guards, dropped in reverse
//! order of creation (agent, pins, namespaces) on success, error, panic and Ctrl-C (the signal
//! handler turns it into an error that unwinds).

mod agent;
mod breaker;
mod http;
mod lb;
mod live;
mod metrics;
mod netns;
mod plan;
mod ratelimit;
mod topology;
mod traffic;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use self::{
    agent::Agent,
    breaker::plan::BreakerPlan,
    lb::plan::LbPlan,
    netns::Netns,
    plan::{AgentSide, Plan},
    topology::{Spec, Topology},
};
use crate::{build, setup, sys, workspace};

const DEFAULT_POLICY: &str = "config/demo.yaml";
const DEFAULT_BREAKER_POLICY: &str = "config/demo-breaker.yaml";
const DEFAULT_LB_POLICY: &str = "config/demo-lb.yaml";
const CLIENT_NS: &str = "agent-demo-client";
const SERVER_NS: &str = "agent-demo-server";
const CLIENT_IF: &str = "veth-client";
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PREFIX_LEN: u8 = 24;
/// A debug build loading and attaching its programs; generous, it is a deadline, not a sleep.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Act {
    /// The agent rate-limiting a UDP flood.
    Ratelimit,
    /// Circuit breakers: a hung payment backend refused in microseconds, then back.
    Breaker,
    /// Load balancing: a flash sale spread over backends by weight, one dying and ramping back.
    Lb,
    /// All three, one after the other.
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
    client: Netns,
    server: Netns,
    run_dir: PathBuf,
}

/// The policy of each act that runs.
struct Plans {
    ratelimit: Option<(Plan, PathBuf)>,
    breaker: Option<(BreakerPlan, PathBuf)>,
    lb: Option<(LbPlan, PathBuf)>,
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

    let topology = Topology::create(plans.spec()?)?;
    let demo = Demo {
        agent_bin,
        client: Netns::open(CLIENT_NS)?,
        server: Netns::open(SERVER_NS)?,
        run_dir,
    };
    if let Some((plan, config)) = &plans.ratelimit {
        ratelimit::run(&demo, args, plan, config)?;
    }
    if let Some((plan, config)) = &plans.breaker {
        breaker::run(&demo, &topology, plan, config)?;
    }
    if let Some((plan, config)) = &plans.lb {
        lb::run(&demo, &topology, plan, config)?;
    }
    // Explicit, in order: the acts' agents are gone, then the namespaces go.
    drop(demo);
    drop(topology);
    Ok(())
}

impl Plans {
    fn load(args: &Args) -> anyhow::Result<Self> {
        let policy = |path: &Option<PathBuf>, default: &str| {
            path.clone()
                .unwrap_or_else(|| workspace::root().join(default))
        };
        let ratelimit = match args.act {
            Act::Breaker | Act::Lb => None,
            Act::Ratelimit | Act::All => {
                let config = policy(&args.config, DEFAULT_POLICY);
                Some((ratelimit::plan(&config)?, config))
            }
        };
        let breaker = match args.act {
            Act::Ratelimit | Act::Lb => None,
            Act::Breaker | Act::All => {
                let config = policy(&args.breaker_config, DEFAULT_BREAKER_POLICY);
                Some((breaker::plan(&config)?, config))
            }
        };
        let lb = match args.act {
            Act::Ratelimit | Act::Breaker => None,
            Act::Lb | Act::All => {
                let config = policy(&args.lb_config, DEFAULT_LB_POLICY);
                Some((lb::plan(&config)?, config))
            }
        };
        Ok(Self {
            ratelimit,
            breaker,
            lb,
        })
    }

    /// The topology the acts run in; each act's policy names the veth its agent attaches to.
    fn spec(&self) -> anyhow::Result<Spec> {
        let server_if = self.ratelimit.as_ref().map(|(p, _)| &p.agent.interface);
        let breaker_if = self.breaker.as_ref().map(|(p, _)| &p.agent.interface);
        let lb_if = self.lb.as_ref().map(|(p, _)| &p.breaker.agent.interface);
        if let (Some(breaker_if), Some(lb_if)) = (breaker_if, lb_if)
            && breaker_if != lb_if
        {
            bail!(
                "the breaker act attaches the agent to {breaker_if}, the load-balancing act to \
                 {lb_if}: both need the client's veth, one name"
            );
        }
        let client_if = breaker_if.or(lb_if);
        let spec = Spec {
            client_ns: CLIENT_NS,
            server_ns: SERVER_NS,
            client_if: client_if.map_or(CLIENT_IF.into(), Clone::clone),
            server_if: server_if.map_or(plan::DEFAULT_INTERFACE.into(), Clone::clone),
            client_addr: CLIENT_ADDR,
            server_addr: SERVER_ADDR,
            prefix_len: PREFIX_LEN,
        };
        if spec.client_if == spec.server_if {
            bail!(
                "the policies attach the agent to {} on both sides: the rate-limit act needs the \
                 server's veth, the breaker and load-balancing acts the client's",
                spec.client_if
            );
        }
        Ok(spec)
    }
}

impl Demo {
    /// Copies the policy into the run directory as `{prefix}policy.yaml` (edits to the original
    /// during the demo do not reload the agent) and starts the agent on it inside `netns`, its
    /// log in `{prefix}agent.log`. `None` with `--no-agent`.
    fn start_agent(
        &self,
        side: &AgentSide,
        config: &Path,
        netns: &Netns,
        prefix: &str,
    ) -> anyhow::Result<Option<Agent>> {
        let Some(bin) = &self.agent_bin else {
            return Ok(None);
        };
        let Some(policy) = &side.policy else {
            bail!(
                "{} does not exist: the agent needs a policy (`cargo xtask demo --no-agent` runs \
                 the topology and the traffic without it)",
                config.display()
            );
        };
        let copy = self.run_dir.join(format!("{prefix}policy.yaml"));
        fs::copy(policy, &copy)
            .with_context(|| format!("copy {} to {}", policy.display(), copy.display()))?;
        let log = self.run_dir.join(format!("{prefix}agent.log"));
        let mut agent = Agent::start(bin, &copy, netns, &log)?;
        let took = agent.wait_ready(netns, side.listen, READY_TIMEOUT)?;
        println!("demo: agent ready after {:.1}s", took.as_secs_f64());
        Ok(Some(agent))
    }

    /// `agent status` against the agent answering on `listen` inside `netns`, printed.
    fn print_status(&self, netns: &Netns, listen: SocketAddr, prefix: &str) -> anyhow::Result<()> {
        let Some(bin) = &self.agent_bin else {
            return Ok(());
        };
        println!("\ndemo: agent status");
        let scratch = self.run_dir.join(format!("{prefix}status.out"));
        print!(
            "{}",
            agent::status(bin, netns, listen, &scratch, STATUS_TIMEOUT)?
        );
        Ok(())
    }
}

/// Removes the pin directory after an act, but only if this run created it: a directory that
/// was there before may belong to an agent running on the host.
struct PinCleanup {
    path: PathBuf,
    existed: bool,
}

impl PinCleanup {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            existed: path.exists(),
        }
    }
}

impl Drop for PinCleanup {
    fn drop(&mut self) {
        if self.existed || !self.path.exists() || !self.path.starts_with(setup::BPFFS) {
            return;
        }
        match fs::remove_dir_all(&self.path) {
            Ok(()) => println!("demo: removed pins under {}", self.path.display()),
            Err(e) => eprintln!("demo: could not remove {}: {e}", self.path.display()),
        }
    }
}
