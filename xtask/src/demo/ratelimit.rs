//! Act 1: the agent on the server's veth rate-limiting one UDP flow sent at a multiple of its
//! limit; once a second, offered and received packets next to the agent's passed and dropped.

use std::{net::SocketAddrV4, ops::ControlFlow, path::Path};

use super::{
    CLIENT_ADDR, Demo, PinCleanup, SERVER_ADDR, agent::Agent, live::Live, plan, plan::Plan,
    traffic, traffic::Flow,
};

/// Reads the act's policy and says what it will show.
pub fn plan(config: &Path) -> anyhow::Result<Plan> {
    let plan = Plan::load(config)?;
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
    Ok(plan)
}

pub fn run(demo: &Demo, args: &super::Args, plan: &Plan, config: &Path) -> anyhow::Result<()> {
    println!("\ndemo: act 1: rate limit");
    let pins = PinCleanup::new(&plan.agent.pin_path);
    let mut agent = demo.start_agent(&plan.agent, config, &demo.server, "")?;
    if agent.is_none() {
        println!("demo: --no-agent: traffic only, nothing limits it");
    }
    let flow = Flow {
        from: CLIENT_ADDR,
        to: SocketAddrV4::new(SERVER_ADDR, plan.port),
        pps: plan.rate_pps.saturating_mul(args.factor),
    };
    let mut live = Live::new(&demo.server, plan, agent.is_some());
    let mut agent_error = None;
    println!(
        "\ndemo: {} s of UDP {} -> {} at {} pps ({}x the limit of {}/s, burst {})",
        args.duration, CLIENT_ADDR, flow.to, flow.pps, args.factor, plan.rate_pps, plan.burst
    );
    live.header();
    let totals = traffic::run(&demo.client, &demo.server, &flow, args.duration, |second| {
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
    demo.print_status(&demo.server, plan.agent.listen, "")?;
    // Explicit, in order: the agent lets go of its pins and the interface, then the pins go.
    drop(agent);
    drop(pins);
    Ok(())
}
