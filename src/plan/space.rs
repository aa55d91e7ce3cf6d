//! Volumes and the fit check. An update touches several paths (the blob
//! store, the apps directory, Docker's data root); they are grouped by the
//! file system they live on (`st_dev`), each file system's free bytes and
//! inodes are read with `statvfs`, a reserve is kept back by policy, and the
//! update fits only when every volume has room for all that lands on it.
//!
//! Nothing here writes to disk: the check runs before the first byte of an
//! update is downloaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("cannot read the file system of {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watermark {0}% is out of range: it must be 20 to 99")]
    Watermark(u8),
}

pub use crate::config::LoadPath;

/// How much of each volume an update may use, and how install spends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// An update may fill a volume up to this percentage.
    pub watermark_pct: u8,
    /// Bytes always kept free, whatever the watermark says.
    pub reserve_bytes: u64,
    #[serde(default)]
    pub load_path: LoadPath,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            watermark_pct: 80,
            reserve_bytes: 0,
            load_path: LoadPath::Lean,
        }
    }
}

impl Policy {
    pub fn new(watermark_pct: u8, reserve_bytes: u64) -> Result<Policy, SpaceError> {
        if !(20..=99).contains(&watermark_pct) {
            return Err(SpaceError::Watermark(watermark_pct));
        }
        Ok(Policy {
            watermark_pct,
            reserve_bytes,
            load_path: LoadPath::Lean,
        })
    }

    pub fn with_load_path(self, load_path: LoadPath) -> Policy {
        Policy { load_path, ..self }
    }

    /// `max(100 - watermark %, reserve)` of a volume of `total` bytes.
    pub fn reserved(&self, total: u64) -> u64 {
        let by_watermark = (total as u128 * (100 - self.watermark_pct as u128) / 100) as u64;
        by_watermark.max(self.reserve_bytes)
    }
}

/// A file system as `statvfs` sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Volume {
    pub dev: u64,
    pub block_size: u64,
    pub total_bytes: u64,
    /// Bytes an unprivileged writer may still use (`f_bavail`).
    pub free_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

impl Volume {
    /// The volume holding `path`, or its nearest existing ancestor when the
    /// path does not exist yet.
    pub fn of(path: &Path) -> Result<Volume, SpaceError> {
        let existing = existing_ancestor(path);
        let stat_error = |source: std::io::Error| SpaceError::Stat {
            path: path.to_path_buf(),
            source,
        };
        let st = rustix::fs::stat(&existing).map_err(|e| stat_error(e.into()))?;
        let vfs = rustix::fs::statvfs(&existing).map_err(|e| stat_error(e.into()))?;
        let frsize = if vfs.f_frsize > 0 {
            vfs.f_frsize
        } else {
            vfs.f_bsize
        };
        Ok(Volume {
            dev: st.st_dev,
            block_size: vfs.f_bsize.max(512),
            total_bytes: vfs.f_blocks.saturating_mul(frsize),
            free_bytes: vfs.f_bavail.saturating_mul(frsize),
            total_inodes: vfs.f_files,
            free_inodes: vfs.f_favail,
        })
    }

    /// `bytes` rounded up to whole blocks of this volume.
    pub fn round_up(&self, bytes: u64) -> u64 {
        round_up(bytes, self.block_size)
    }
}

/// Bytes in binary units for people: `5.9 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub use crate::oci::format::round_up;

fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    loop {
        if p.exists() {
            return p;
        }
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
}

/// What an update writes where, by the role of each path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Blobs still to download into the store.
    Blobs,
    /// Unpacked layers in Docker's data root.
    DockerLayers,
    /// Docker's temporary copy of an image archive while it loads it.
    DockerTemp,
    /// The extracted bundle in the apps directory.
    Bundle,
}

impl Part {
    pub fn label(&self) -> &'static str {
        match self {
            Part::Blobs => "blobs",
            Part::DockerLayers => "docker layers",
            Part::DockerTemp => "docker load temp",
            Part::Bundle => "bundle",
        }
    }
}

impl Part {
    /// The steps of an update during which this part takes its bytes: blobs
    /// from the pull on, the bundle and the unpacked layers from the install
    /// on, the engine's temporary copies during the install only.
    pub fn held_during(&self, step: Step) -> bool {
        match self {
            Part::Blobs => true,
            Part::DockerLayers | Part::Bundle => step >= Step::Install,
            Part::DockerTemp => step == Step::Install,
        }
    }
}

/// The steps of an update, in order. The space an update needs on a volume
/// is the largest it holds at any one step, not the sum of everything it
/// writes: the engine's temporary copies are gone before the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Pull,
    Install,
    Switch,
    Commit,
    Prune,
}

impl Step {
    pub const ALL: [Step; 5] = [
        Step::Pull,
        Step::Install,
        Step::Switch,
        Step::Commit,
        Step::Prune,
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Step::Pull => "pull",
            Step::Install => "install",
            Step::Switch => "switch",
            Step::Commit => "commit",
            Step::Prune => "prune",
        }
    }
}

/// A need for space on the volume of `path`.
#[derive(Debug, Clone)]
pub struct Demand {
    pub path: PathBuf,
    pub part: Part,
    /// Bytes held at the part's worst moment.
    pub bytes: u64,
    pub inodes: u64,
    /// Bytes the part writes in all, freed or not (the engine's temporary
    /// copies of every load); `bytes` for parts that are never freed.
    pub written: u64,
}

/// One volume's figures in the fit report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeReport {
    /// The paths involved on this volume, with their roles.
    pub paths: Vec<String>,
    pub dev: u64,
    pub block_size: u64,
    pub size: u64,
    pub free: u64,
    pub reserved: u64,
    /// Free bytes minus the reserve: what the update may use.
    pub available: u64,
    /// The peak: the most the update holds on this volume at any one step.
    pub required: u64,
    /// Each part's bytes at its worst moment (they need not coincide).
    pub required_parts: BTreeMap<Part, u64>,
    /// The step at which the peak occurs (the first, on a tie).
    #[serde(default = "default_peak_step")]
    pub peak_step: Step,
    /// What the update holds on this volume at each step.
    #[serde(default)]
    pub steps: BTreeMap<Step, u64>,
    /// Every byte the update writes here, as if nothing were freed before
    /// it ended (the naive sum the peak improves on).
    #[serde(default)]
    pub sum_of_parts: u64,
    pub inodes_free: u64,
    pub inodes_required: u64,
    pub fits: bool,
    /// Why it does not fit, in a sentence; empty when it fits.
    pub reason: String,
}

fn default_peak_step() -> Step {
    Step::Install
}

/// The verdict on a whole update.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FitReport {
    pub fits: bool,
    pub policy: Policy,
    pub volumes: Vec<VolumeReport>,
    /// Caveats a person should know (e.g. Docker unreachable).
    pub notes: Vec<String>,
}

impl FitReport {
    /// One sentence per volume that is short, for an error message.
    pub fn shortfall(&self) -> String {
        self.volumes
            .iter()
            .filter(|v| !v.fits)
            .map(|v| v.reason.clone())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Groups `demands` by volume and decides, for each, whether it fits.
/// `volume_of` is injectable so that tests can fake volumes.
pub fn plan(
    demands: &[Demand],
    policy: Policy,
    volume_of: &dyn Fn(&Path) -> Result<Volume, SpaceError>,
) -> Result<FitReport, SpaceError> {
    let mut by_dev: BTreeMap<u64, (Volume, VolumeReport)> = BTreeMap::new();
    for demand in demands {
        let volume = volume_of(&demand.path)?;
        let entry = by_dev.entry(volume.dev).or_insert_with(|| {
            let reserved = policy.reserved(volume.total_bytes);
            let report = VolumeReport {
                paths: Vec::new(),
                dev: volume.dev,
                block_size: volume.block_size,
                size: volume.total_bytes,
                free: volume.free_bytes,
                reserved,
                available: volume.free_bytes.saturating_sub(reserved),
                required: 0,
                required_parts: BTreeMap::new(),
                peak_step: Step::Pull,
                steps: Step::ALL.iter().map(|s| (*s, 0)).collect(),
                sum_of_parts: 0,
                inodes_free: volume.free_inodes,
                inodes_required: 0,
                fits: true,
                reason: String::new(),
            };
            (volume, report)
        });
        let path = format!("{} ({})", demand.path.display(), demand.part.label());
        if !entry.1.paths.contains(&path) {
            entry.1.paths.push(path);
        }
        let part = entry.1.required_parts.entry(demand.part).or_default();
        *part = part.saturating_add(demand.bytes);
        for (step, held) in entry.1.steps.iter_mut() {
            if demand.part.held_during(*step) {
                *held = held.saturating_add(demand.bytes);
            }
        }
        entry.1.sum_of_parts = entry.1.sum_of_parts.saturating_add(demand.written);
        entry.1.inodes_required = entry.1.inodes_required.saturating_add(demand.inodes);
    }
    let mut volumes = Vec::new();
    for (_, (_, mut report)) in by_dev {
        // The first step at which the most is held.
        for (step, held) in &report.steps {
            if *held > report.required {
                report.required = *held;
                report.peak_step = *step;
            }
        }
        let where_ = report
            .paths
            .first()
            .map(|p| p.split(" (").next().unwrap_or(p).to_string())
            .unwrap_or_default();
        if report.required > report.available {
            report.fits = false;
            report.reason = format!(
                "the volume of {where_} needs {} (its peak, during the {}) but only {} is available ({} free, {} kept in reserve)",
                human_bytes(report.required),
                report.peak_step.label(),
                human_bytes(report.available),
                human_bytes(report.free),
                human_bytes(report.reserved)
            );
        } else if report.inodes_required > report.inodes_free {
            report.fits = false;
            report.reason = format!(
                "the volume of {where_} needs {} inodes but only {} are free",
                report.inodes_required, report.inodes_free
            );
        }
        volumes.push(report);
    }
    Ok(FitReport {
        fits: volumes.iter().all(|v| v.fits),
        policy,
        volumes,
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(path: &Path) -> Result<Volume, SpaceError> {
        let dev = if path.starts_with("/docker") { 2 } else { 1 };
        Ok(Volume {
            dev,
            block_size: 4096,
            total_bytes: 1000 * 4096,
            free_bytes: 500 * 4096,
            total_inodes: 1000,
            free_inodes: 100,
        })
    }

    fn demand(path: &str, part: Part, bytes: u64) -> Demand {
        Demand {
            path: PathBuf::from(path),
            part,
            bytes,
            inodes: 1,
            written: bytes,
        }
    }

    #[test]
    fn reserve_is_the_larger_of_watermark_and_absolute() {
        assert_eq!(Policy::new(80, 0).unwrap().reserved(1000), 200);
        assert_eq!(Policy::new(80, 500).unwrap().reserved(1000), 500);
        assert!(Policy::new(19, 0).is_err());
        assert!(Policy::new(100, 0).is_err());
    }

    #[test]
    fn demands_are_grouped_by_volume_and_the_short_one_is_named() {
        // Each fake volume: 500 blocks free, 200 reserved at 80%: 300 blocks available.
        let report = plan(
            &[
                demand("/store/blobs", Part::Blobs, 100 * 4096),
                demand("/store/apps", Part::Bundle, 100 * 4096),
                demand("/docker", Part::DockerLayers, 301 * 4096),
            ],
            Policy::default(),
            &fake,
        )
        .unwrap();
        assert!(!report.fits);
        assert_eq!(report.volumes.len(), 2);
        let store = report.volumes.iter().find(|v| v.dev == 1).unwrap();
        assert!(store.fits);
        assert_eq!(store.required, 200 * 4096);
        let docker = report.volumes.iter().find(|v| v.dev == 2).unwrap();
        assert!(!docker.fits);
        assert!(
            report.shortfall().contains("/docker"),
            "{}",
            report.shortfall()
        );
    }

    #[test]
    fn figures_that_would_wrap_saturate_and_do_not_fit() {
        let report = plan(
            &[
                demand("/docker", Part::DockerLayers, 1 << 63),
                demand("/docker", Part::DockerLayers, 1 << 63),
                demand("/docker", Part::DockerTemp, 4096),
            ],
            Policy::default(),
            &fake,
        )
        .unwrap();
        assert!(!report.fits);
        assert_eq!(report.volumes[0].required, u64::MAX);
        assert_eq!(
            report.volumes[0].required_parts[&Part::DockerLayers],
            u64::MAX
        );
    }

    #[test]
    fn the_peak_is_the_largest_step_not_the_sum_of_every_write() {
        let mut temp = demand("/docker", Part::DockerTemp, 50 * 4096);
        // Ten loads, each a temporary copy of 50 blocks, one at a time.
        temp.written = 500 * 4096;
        let report = plan(
            &[
                demand("/docker", Part::Blobs, 100 * 4096),
                demand("/docker", Part::DockerLayers, 120 * 4096),
                temp,
                demand("/docker", Part::Bundle, 10 * 4096),
            ],
            Policy::default(),
            &fake,
        )
        .unwrap();
        let v = &report.volumes[0];
        assert_eq!(v.steps[&Step::Pull], 100 * 4096);
        assert_eq!(v.steps[&Step::Install], 280 * 4096);
        assert_eq!(v.steps[&Step::Switch], 230 * 4096);
        assert_eq!(v.steps[&Step::Prune], 230 * 4096);
        assert_eq!(v.required, 280 * 4096);
        assert_eq!(v.peak_step, Step::Install);
        assert_eq!(v.sum_of_parts, 730 * 4096);
        // 300 blocks available: the peak fits, the naive sum would not.
        assert!(report.fits);
    }

    #[test]
    fn inodes_count_too() {
        let mut d = demand("/store", Part::Blobs, 4096);
        d.inodes = 101;
        let report = plan(&[d], Policy::default(), &fake).unwrap();
        assert!(!report.fits);
        assert!(report.shortfall().contains("inodes"));
    }
}
