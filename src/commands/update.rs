//! `stowage update REF...` and `stowage update oci:DIR[:NAME]`: the whole
//! update as one journaled transaction (see [`crate::update::transaction`]).

use std::time::Duration;

use anyhow::{Result, bail};

use super::{Context, FitOptions, parse_refs};
use crate::progress::Progress;
use crate::update::device::app_set;
use crate::update::export::LayoutRef;
use crate::update::transaction::{
    Outcome, StateFiles, UpdateEvent, UpdateOptions as Transaction, lock_updates, update,
};

pub struct UpdateOptions {
    pub apps: Vec<String>,
    pub fit: FitOptions,
    pub jobs: Option<usize>,
    pub verify_timeout: Duration,
    /// What it may free when it does not fit: the flag, else the config
    /// file's `make_room`, else nothing.
    pub make_room: Option<crate::config::MakeRoom>,
}

impl UpdateOptions {
    pub async fn run(
        self,
        ctx: &Context,
        progress: &dyn Progress,
        events: &(dyn Fn(&UpdateEvent) + Send + Sync),
    ) -> Result<Outcome> {
        let client = ctx.registry_client()?;
        let layout = match self.apps.as_slice() {
            [one] => LayoutRef::parse(one),
            many if many.iter().any(|a| a.starts_with("oci:")) => {
                bail!("an update from oci:DIR takes that one argument (oci:DIR or oci:DIR:NAME)")
            }
            _ => None,
        };
        let to = match &layout {
            Some(layout) => layout
                .apps(&layout.open()?)?
                .into_iter()
                .map(|a| Ok((a.name.parse()?, a.reference.parse()?)))
                .collect::<Result<_>>()?,
            None => app_set(&client, &parse_refs(&self.apps)?).await?,
        };
        let mut device = ctx
            .live_device(&self.fit, &client, progress, self.jobs, events)
            .await?;
        device.layout = layout;
        let options = Transaction {
            verify_timeout: self.verify_timeout,
            make_room: self.make_room.or(ctx.config.make_room).unwrap_or_default(),
        };
        let files = StateFiles::under(&ctx.root);
        let _lock = lock_updates(&ctx.root)?;
        update(&device, &files, to, &options).await
    }
}
