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
use crate::update::tuf::TrustError;
use crate::update::tuf::transport::Source;

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
        let (to, layout) = match (layout, ctx.trust()) {
            (Some(mut layout), Some(trust)) => {
                // The export's signed metadata, verified as the agent
                // verifies the registry's; the target names the apps.
                let tuf = layout.dir.join("tuf");
                if !tuf.join("metadata").is_dir() {
                    return Err(TrustError::Unsigned {
                        root: trust.root_file.display().to_string(),
                        what: format!("export {} (it has no tuf/ metadata)", layout.dir.display()),
                    }
                    .into());
                }
                let verified = trust
                    .verify(Source::Dir(tuf), layout.app.as_deref())
                    .await?;
                let only = verified
                    .apps
                    .values()
                    .map(|a| a.image().digest.clone())
                    .collect::<Option<Vec<_>>>();
                layout.only = Some(only.unwrap_or_default());
                layout.apps(&layout.open()?)?;
                (verified.apps, Some(layout))
            }
            (None, Some(trust)) => {
                // One REGISTRY/REPO:NAME: the signed target NAME of the TUF
                // repository there, verified as the agent verifies it.
                let [one] = self.apps.as_slice() else {
                    return Err(TrustError::Unsigned {
                        root: trust.root_file.display().to_string(),
                        what: "a list of app references".to_string(),
                    }
                    .into());
                };
                let repo: crate::oci::reference::ImageRef = one.parse()?;
                let Some(name) = repo.tag.clone() else {
                    return Err(TrustError::Unsigned {
                        root: trust.root_file.display().to_string(),
                        what: format!("{one} (name a signed target: REGISTRY/REPO:NAME)"),
                    }
                    .into());
                };
                let source = Source::Registry {
                    client: std::sync::Arc::new(ctx.registry_client()?),
                    repo,
                };
                (trust.verify(source, Some(&name)).await?.apps, None)
            }
            (Some(layout), None) => (
                layout
                    .apps(&layout.open()?)?
                    .into_iter()
                    .map(|a| Ok((a.name.parse()?, a.reference.parse()?)))
                    .collect::<Result<_>>()?,
                Some(layout),
            ),
            (None, None) => (app_set(&client, &parse_refs(&self.apps)?).await?, None),
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
