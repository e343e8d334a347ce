//! `cargo xtask demo`: the agent rate-limiting a UDP flood between two network namespaces.
//!
//! client netns (veth-client 198.18.0.1) --veth--> server netns (veth-agent 198.18.0.2, agent)
//!
//! Cleanup is by guards, dropped in reverse order of creation (agent, pins, namespaces) on
//! success, error, panic and Ctrl-C (the signal handler turns it into an error that unwinds).

mod agent;
mod http;
mod live;
mod metrics;
mod netns;
mod plan;
mod topology;
mod traffic;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    ops::ControlFlow,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use self::{
    agent::Agent,
    live::Live,
    netns::Netns,
    plan::Plan,
    topology::{Spec, Topology},
    traffic::Flow,
};
use crate::{build, setup, sys, workspace};

const DEFAULT_POLICY: &str = "config/demo.yaml";
const CLIENT_NS: &str = "agent-demo-client";
const SERVER_NS: &str = "agent-demo-server";
const CLIENT_IF: &str = "veth-client";
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PREFIX_LEN: u8 = 24;
/// A debug build loading and attaching its programs; generous, it is a deadline, not a sleep.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    /// Policy to run; copied before use [default: config/demo.yaml]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds of traffic.
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

pub fn run(args: &Args) -> anyhow::Result<()> {
    sys::require_root("cargo xtask demo (BPF programs, network namespaces)")?;
    sys::catch_interrupts().context("install the signal handler")?;
    let toolchain = setup::run()?;
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| workspace::root().join(DEFAULT_POLICY));
    let plan = Plan::load(&config)?;
    println!("demo: {plan}");
    if let Some(address) = &plan.service_address
        && !plan::contains(address, SERVER_ADDR)
    {
        println!(
            "demo: warning: service {} matches {address}, which does not contain {SERVER_ADDR}, \
             where the demo sends",
            plan.service
        );
    }
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

    let topology = Topology::create(&Spec {
        client_ns: CLIENT_NS,
        server_ns: SERVER_NS,
        client_if: CLIENT_IF,
        server_if: plan.interface.clone(),
        client_addr: CLIENT_ADDR,
        server_addr: SERVER_ADDR,
        prefix_len: PREFIX_LEN,
    })?;
    let client = Netns::open(CLIENT_NS)?;
    let server = Netns::open(SERVER_NS)?;
    let pins = PinCleanup::new(&plan.pin_path);
    let mut agent = match &agent_bin {
        Some(bin) => Some(start_agent(bin, &plan, &config, &server, &run_dir)?),
        None => {
            println!("demo: --no-agent: traffic only, nothing limits it");
            None
        }
    };

    let flow = Flow {
        from: CLIENT_ADDR,
        to: SocketAddrV4::new(SERVER_ADDR, plan.port),
        pps: plan.rate_pps.saturating_mul(args.factor),
    };
    let mut live = Live::new(&server, &plan, agent.is_some());
    let mut agent_error = None;
    println!(
        "\ndemo: {} s of UDP {} -> {} at {} pps ({}x the limit of {}/s, burst {})",
        args.duration, CLIENT_ADDR, flow.to, flow.pps, args.factor, plan.rate_pps, plan.burst
    );
    live.header();
    let totals = traffic::run(&client, &server, &flow, args.duration, |second| {
        live.row(second);
        match agent.as_mut().map(Agent::check_running) {
            Some(Err(e)) => {
                agent_error = Some(e);
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        }
    })?;
    if let Some(e) = agent_error {
        return Err(e.into());
    }
    live.summary(&totals);

    if let Some(bin) = &agent_bin {
        println!("\ndemo: agent status");
        let status = agent::status(
            bin,
            &server,
            plan.listen,
            &run_dir.join("status.out"),
            STATUS_TIMEOUT,
        )?;
        print!("{status}");
    }
    // Explicit, in order: the agent lets go of its pins and the interface, then the namespaces go.
    drop(agent);
    drop(pins);
    drop(topology);
    Ok(())
}

/// Copies the policy into the run directory (edits to the original during the demo do not
/// reload the agent) and starts the agent on it in the server namespace.
fn start_agent(
    bin: &Path,
    plan: &Plan,
    config: &Path,
    server: &Netns,
    run_dir: &Path,
) -> anyhow::Result<Agent> {
    let Some(policy) = &plan.policy else {
        bail!(
            "{} does not exist: the agent needs a policy (`cargo xtask demo --no-agent` runs the \
             topology and the traffic without it)",
            config.display()
        );
    };
    let copy = run_dir.join("policy.yaml");
    fs::copy(policy, &copy)
        .with_context(|| format!("copy {} to {}", policy.display(), copy.display()))?;
    let mut agent = Agent::start(bin, &copy, server, &run_dir.join("agent.log"))?;
    let took = agent.wait_ready(server, plan.listen, READY_TIMEOUT)?;
    println!("demo: agent ready after {:.1}s", took.as_secs_f64());
    Ok(agent)
}

/// Removes the pin directory after the demo, but only if this run created it: a directory that
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
