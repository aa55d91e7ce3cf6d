//! The device agent: polls a target, applies it with the update
//! transaction, and writes what it did to a status file that
//! `stowage status` prints.
//!
//! It backs off after failures (doubling the wait up to an hour), and an
//! update refused for space is not tried again until the fit check says it
//! fits: checking is read-only and cheap, so the agent asks again at each
//! poll but downloads nothing until the space is there.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::fsutil::write_atomic;
use crate::oci::reference::{AppName, AppRef, ImageRef};
use crate::oci::registry::RegistryClient;
use crate::plan::{CheckReport, DoesNotFit};
use crate::update::reconcile::{ReconcileReport, Supervised, reconcile};
use crate::update::target::{Target, fetch_target};
use crate::update::transaction::{
    self, AppSet, DeviceOps, Outcome, PruneSummary, StateFiles, UpdateEvent, UpdateOptions,
};
use crate::update::tuf::TrustError;
use crate::update::tuf::client::Trust;
use crate::update::tuf::transport::Source;

const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// What the agent last did, as `stowage status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub target: String,
    pub target_digest: Option<Digest>,
    /// The target digest last applied successfully.
    pub applied_digest: Option<Digest>,
    pub apps: AppSet,
    pub last_result: AgentResult,
    pub last_error: Option<String>,
    /// The last fit check's figures, when there was one.
    pub last_check: Option<CheckReport>,
    /// The target digest refused for space, retried only once it fits.
    pub refused_digest: Option<Digest>,
    pub consecutive_failures: u32,
    /// The last reconciliation: each app's state, what was started again and why.
    #[serde(default)]
    pub reconcile: Option<ReconcileReport>,
    /// Why the last reconciliation could not run, when it could not.
    #[serde(default)]
    pub reconcile_error: Option<String>,
    pub updated_at: u64,
    pub next_poll_in_secs: u64,
}

/// How the agent's last poll ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentResult {
    /// The target was applied.
    Committed,
    /// The device already ran the target.
    #[default]
    Unchanged,
    RolledBack,
    Failed,
    /// The target does not fit; it is retried once the check says it fits.
    Refused,
    /// Still refused for space at a later poll; nothing was downloaded.
    WaitingForSpace,
    /// The target's metadata did not verify (or the target is not for this
    /// device); nothing was downloaded.
    Untrusted,
}

impl AgentResult {
    /// As the status file and `stowage status` name it.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentResult::Committed => "committed",
            AgentResult::Unchanged => "unchanged",
            AgentResult::RolledBack => "rolled_back",
            AgentResult::Failed => "failed",
            AgentResult::Refused => "refused",
            AgentResult::WaitingForSpace => "waiting_for_space",
            AgentResult::Untrusted => "untrusted",
        }
    }

    /// `stowage agent --once`'s exit code: 0 applied or unchanged, 100 refused
    /// for space, 101 refused for trust, 1 otherwise.
    pub fn exit_code(self) -> u8 {
        match self {
            AgentResult::Committed | AgentResult::Unchanged => 0,
            AgentResult::Refused | AgentResult::WaitingForSpace => DoesNotFit::EXIT_CODE,
            AgentResult::Untrusted => TrustError::EXIT_CODE,
            AgentResult::RolledBack | AgentResult::Failed => 1,
        }
    }
}

impl std::fmt::Display for AgentResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

pub fn status_path(root: &Path) -> PathBuf {
    root.join("state").join("agent.json")
}

pub fn read_status(root: &Path) -> Result<Option<AgentStatus>> {
    match std::fs::read(status_path(root)) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn write_status(root: &Path, status: &AgentStatus) -> Result<()> {
    let path = status_path(root);
    if let Some(dir) = path.parent() {
        crate::fsutil::ensure_dir(dir, 0o700)?;
    }
    write_atomic(&path, &serde_json::to_vec_pretty(status)?)?;
    Ok(())
}

/// What the agent needs beyond the update's device operations and the
/// reconciliation's.
#[allow(async_fn_in_trait)]
pub trait AgentDevice: DeviceOps + Supervised {
    /// The fit check alone: does an update to `to` fit now?
    async fn fits(&self, to: &AppSet) -> Result<CheckReport>;
}

pub struct AgentOptions {
    pub target: ImageRef,
    pub interval: Duration,
    pub update: UpdateOptions,
    /// Poll once and return (for tests and cron-style use).
    pub once: bool,
    /// How long one poll may spend talking to the registry: fetching the
    /// target, checking it and pulling it. Past it the cycle fails (what was
    /// downloaded is kept) and the next one starts after the interval.
    pub cycle_deadline: Duration,
    /// Tries an app that keeps going down gets before it is left down.
    pub restart_limit: u32,
    /// With a trusted root: the target is the TUF target of this name,
    /// verified from `source`; an unsigned target is never applied.
    pub signed: Option<SignedTarget>,
}

/// Where the agent reads a signed target.
pub struct SignedTarget {
    pub trust: Trust,
    pub source: Source,
    pub name: String,
}

/// The target `options` name: verified when a trusted root is configured.
async fn next_target(client: &RegistryClient, options: &AgentOptions) -> Result<Target> {
    let Some(signed) = &options.signed else {
        return fetch_target(client, &options.target).await;
    };
    let verified = signed
        .trust
        .verify(signed.source.clone(), Some(&signed.name))
        .await?;
    tracing::info!(
        "target {} of {} verified (asked the repository for {})",
        verified.name,
        verified.repository,
        verified.requests.join(", ")
    );
    Ok(Target {
        reference: format!("{}:{}", verified.repository, verified.name),
        digest: verified.digest,
        apps: verified.apps,
    })
}

pub async fn run_agent(
    device: &impl AgentDevice,
    client: &RegistryClient,
    root: &Path,
    options: &AgentOptions,
) -> Result<AgentStatus> {
    let files = StateFiles::under(root);
    // An interrupted update is finished or rolled back before anything else.
    transaction::recover(device, &files, &options.update).await?;
    let mut status = read_status(root)?.unwrap_or_default();
    status.target = options.target.to_string();
    let mut ready = false;
    loop {
        // What should run runs again first, with no network: after a reboot
        // the target's registry may not answer yet.
        match reconcile(device, &files, root, options.restart_limit).await {
            Ok(report) => {
                status.reconcile_error = None;
                status.reconcile = Some(report);
            }
            Err(e) => {
                tracing::error!("cannot reconcile the running apps: {e:#}");
                status.reconcile_error = Some(format!("{e:#}"));
            }
        }
        if !ready {
            // Units ordered after the agent start once the apps run again.
            notify_ready();
            ready = true;
        }
        let wait = poll_once(device, client, &files, options, &mut status).await;
        status.next_poll_in_secs = wait.as_secs();
        status.updated_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        status.apps = files.device()?.running;
        write_status(root, &status)?;
        if options.once {
            return Ok(status);
        }
        tokio::time::sleep(wait).await;
    }
}

async fn poll_once(
    device: &impl AgentDevice,
    client: &RegistryClient,
    files: &StateFiles,
    options: &AgentOptions,
    status: &mut AgentStatus,
) -> Duration {
    let deadline = tokio::time::Instant::now() + options.cycle_deadline;
    let late = |doing: &str| {
        anyhow::anyhow!(
            "the agent's cycle passed its deadline of {:?} while {doing}; the next cycle starts over (and resumes what was downloaded)",
            options.cycle_deadline
        )
    };
    let target = match tokio::time::timeout_at(deadline, next_target(client, options)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) if e.is::<TrustError>() => {
            return failed(status, AgentResult::Untrusted, e, options.interval);
        }
        Ok(Err(e)) => return failed(status, AgentResult::Failed, e, options.interval),
        Err(_) => {
            let e = late("fetching the target");
            return failed(status, AgentResult::Failed, e, options.interval);
        }
    };
    status.target_digest = Some(target.digest.clone());
    let running = files.device().map(|s| s.running).unwrap_or_default();
    if status.applied_digest.as_ref() == Some(&target.digest) && running == target.apps {
        status.last_result = AgentResult::Unchanged;
        status.consecutive_failures = 0;
        return options.interval;
    }
    if status.refused_digest.as_ref() == Some(&target.digest) {
        let fits = tokio::time::timeout_at(deadline, device.fits(&target.apps))
            .await
            .unwrap_or_else(|_| Err(late("checking the target")));
        let state = files.device().unwrap_or_default();
        match fits {
            Ok(check) if check.fit.fits => {
                tracing::info!("target {} fits now: applying it", target.reference)
            }
            // With a make-room policy (the config file's `make_room`), it is
            // also tried again once the plan to make room is one the policy
            // allows (the update frees it first).
            Ok(check)
                if options.update.make_room != crate::plan::room::MakeRoom::None
                    && transaction::room_plan(device, &state, &target.apps, &check)
                        .await
                        .allowed_by(options.update.make_room) =>
            {
                tracing::info!(
                    "target {} fits once room is made: applying it",
                    target.reference
                )
            }
            Ok(check) => {
                status.last_result = AgentResult::WaitingForSpace;
                status.last_check = Some(check);
                return options.interval;
            }
            Err(e) => return failed(status, AgentResult::Failed, e, options.interval),
        }
    }
    tracing::info!("applying target {}", target.reference);
    let recording = RecordingCheck {
        device,
        check: std::sync::Mutex::new(None),
        deadline: Some((deadline, options.cycle_deadline)),
    };
    let outcome =
        transaction::update(&recording, files, target.apps.clone(), &options.update).await;
    if let Some(check) = recording
        .check
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
    {
        status.last_check = Some(check);
    }
    match outcome {
        Ok(Outcome::Committed) | Ok(Outcome::Unchanged) => {
            status.last_result = AgentResult::Committed;
            status.last_error = None;
            status.applied_digest = Some(target.digest);
            status.refused_digest = None;
            status.consecutive_failures = 0;
            options.interval
        }
        Ok(Outcome::RolledBack(e)) => failed(status, AgentResult::RolledBack, e, options.interval),
        Ok(Outcome::Refused(report)) => {
            let refused = DoesNotFit { report };
            tracing::warn!(
                "target {} does not fit: {}",
                target.reference,
                refused.report.fit.shortfall()
            );
            status.last_result = AgentResult::Refused;
            status.last_error = Some(refused.to_string());
            status.last_check = Some(*refused.report);
            status.refused_digest = Some(target.digest);
            options.interval
        }
        Ok(Outcome::Failed(e)) => failed(status, AgentResult::Failed, e, options.interval),
        Err(e) => failed(status, AgentResult::Failed, e, options.interval),
    }
}

/// The device, keeping the figures of the update's fit check for the status.
struct RecordingCheck<'a, D> {
    device: &'a D,
    check: std::sync::Mutex<Option<CheckReport>>,
    /// When the cycle's registry work must be done, and its length.
    deadline: Option<(tokio::time::Instant, Duration)>,
}

impl<D: DeviceOps> DeviceOps for RecordingCheck<'_, D> {
    async fn pull(&self, to: &AppSet) -> Result<CheckReport> {
        let Some((deadline, length)) = self.deadline else {
            return self.device.pull(to).await;
        };
        tokio::time::timeout_at(deadline, self.device.pull(to))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the pull did not finish within the agent's cycle deadline of {length:?}; what it downloaded is kept, and the next cycle resumes it"
                ))
            })
    }
    async fn install(&self, reference: &AppRef) -> Result<()> {
        self.device.install(reference).await
    }
    async fn start(&self, name: &AppName, reference: &AppRef) -> Result<()> {
        self.device.start(name, reference).await
    }
    async fn stop(&self, name: &AppName) -> Result<()> {
        self.device.stop(name).await
    }
    async fn verify(&self, name: &AppName, timeout: Duration) -> Result<()> {
        self.device.verify(name, timeout).await
    }
    async fn prune(&self, keep: &[AppRef]) -> Result<PruneSummary> {
        self.device.prune(keep).await
    }
    async fn installed(&self) -> Result<AppSet> {
        self.device.installed().await
    }
    async fn room(
        &self,
        state: &transaction::DeviceState,
        to: &AppSet,
    ) -> Result<Vec<crate::plan::room::Candidate>> {
        self.device.room(state, to).await
    }
    async fn free(
        &self,
        what: crate::plan::room::Freeable,
        state: &transaction::DeviceState,
        to: &AppSet,
    ) -> Result<()> {
        self.device.free(what, state, to).await
    }
    async fn sync(&self) -> Result<()> {
        self.device.sync().await
    }
    fn event(&self, event: UpdateEvent) {
        if let UpdateEvent::Check { report } = &event {
            *self.check.lock().unwrap_or_else(|e| e.into_inner()) = Some((**report).clone());
        }
        self.device.event(event);
    }
}

fn failed(
    status: &mut AgentStatus,
    result: AgentResult,
    e: anyhow::Error,
    interval: Duration,
) -> Duration {
    tracing::error!("{result}: {e:#}");
    status.last_result = result;
    status.last_error = Some(format!("{e:#}"));
    status.consecutive_failures += 1;
    backoff(interval, status.consecutive_failures)
}

/// The wait after `failures` failures in a row: the interval doubled per
/// failure, at most an hour (and never less than the interval).
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.min(10);
    interval
        .saturating_mul(factor)
        .min(MAX_BACKOFF.max(interval))
}

/// Tells systemd (a `Type=notify` unit) that the agent is ready: the
/// sd_notify protocol, one datagram to `$NOTIFY_SOCKET`. Nothing without it.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let address = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = address.and_then(|address| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(b"READY=1\nSTATUS=apps reconciled", &address)
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd at {path}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let i = Duration::from_secs(60);
        assert_eq!(backoff(i, 1), Duration::from_secs(120));
        assert_eq!(backoff(i, 3), Duration::from_secs(480));
        assert_eq!(backoff(i, 30), MAX_BACKOFF);
        assert_eq!(
            backoff(Duration::from_secs(7200), 2),
            Duration::from_secs(7200)
        );
    }

    #[test]
    fn the_last_result_keeps_its_names_and_gives_the_exit_code() {
        for (result, name, code) in [
            (AgentResult::Committed, "committed", 0),
            (AgentResult::Unchanged, "unchanged", 0),
            (AgentResult::RolledBack, "rolled_back", 1),
            (AgentResult::Failed, "failed", 1),
            (AgentResult::Refused, "refused", 100),
            (AgentResult::WaitingForSpace, "waiting_for_space", 100),
            (AgentResult::Untrusted, "untrusted", 101),
        ] {
            assert_eq!(serde_json::to_value(result).unwrap(), name);
            assert_eq!(result.as_str(), name);
            assert_eq!(result.exit_code(), code);
            let back: AgentResult = serde_json::from_value(name.into()).unwrap();
            assert_eq!(back, result);
        }
    }
}
