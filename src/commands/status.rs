//! `stowage status`: what the agent last did and what runs now, or, when no
//! agent has run, the device state the update transaction keeps.

use anyhow::Result;

use super::Context;
use crate::update::agent::{AgentStatus, read_status};
use crate::update::transaction::{DeviceState, StateFiles};

pub enum Status {
    Agent(Box<AgentStatus>),
    Device(DeviceState),
}

pub fn run(ctx: &Context) -> Result<Status> {
    let device = StateFiles::under(&ctx.root).device()?;
    Ok(match read_status(&ctx.root)? {
        Some(mut status) => {
            // What runs now, even when a `stowage update` ran after the agent.
            status.apps = device.running;
            Status::Agent(Box::new(status))
        }
        None => Status::Device(device),
    })
}
