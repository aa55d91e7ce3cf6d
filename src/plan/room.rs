//! When an update does not fit: what could be freed to make room, in order
//! of harm, and the smallest prefix of that list that makes it fit.
//!
//! The order is fixed (see [`Freeable`]): stale partial downloads harm
//! nothing; blobs and images no app needs only cost a download should they
//! be wanted again; the rollback copy costs the update its way back; the
//! images of apps the new target drops cost those apps. The plan frees the
//! fewest kinds, taken in that order, that make every volume fit, and says
//! whether even all of them would.
//!
//! This module only decides: the device measures what each kind holds
//! (bytes only that kind frees, per volume) and carries the plan out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::space::{FitReport, human_bytes};

/// What may be freed to make room, in order of harm (least harmful first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Freeable {
    /// Partial downloads of blobs nothing wants.
    StalePartials,
    /// Blobs and images no app needs (what `stowage prune` frees).
    Unneeded,
    /// The previous version of the apps the update replaces.
    RollbackCopy,
    /// Images of apps the new target no longer names.
    DroppedApps,
}

impl Freeable {
    pub const ALL: [Freeable; 4] = [
        Freeable::StalePartials,
        Freeable::Unneeded,
        Freeable::RollbackCopy,
        Freeable::DroppedApps,
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Freeable::StalePartials => "stale partial downloads",
            Freeable::Unneeded => "blobs and images no app needs (what `stowage prune` frees)",
            Freeable::RollbackCopy => "the rollback copy",
            Freeable::DroppedApps => "images of apps the new target drops",
        }
    }

    /// What freeing it costs.
    pub fn consequence(&self) -> &'static str {
        match self {
            Freeable::StalePartials => "none",
            Freeable::Unneeded => "none (they are downloaded again if ever wanted)",
            Freeable::RollbackCopy => "no rollback for this update",
            Freeable::DroppedApps => {
                "the apps the target drops stop before the update, not at the switch, and a rollback does not bring them back"
            }
        }
    }
}

pub use crate::config::{MakeRoom, UnknownMakeRoom};

impl MakeRoom {
    /// Whether this policy may free `what`.
    pub fn allows(&self, what: Freeable) -> bool {
        match self {
            MakeRoom::None => false,
            MakeRoom::Prune => what <= Freeable::Unneeded,
            MakeRoom::DropRollback => true,
        }
    }

    /// The least policy that may free `what`.
    pub fn least_for(what: Freeable) -> MakeRoom {
        if what <= Freeable::Unneeded {
            MakeRoom::Prune
        } else {
            MakeRoom::DropRollback
        }
    }
}

/// What one kind of [`Freeable`] would free, as the device measured it:
/// bytes that only freeing it gives back, by volume (`st_dev`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub what: Freeable,
    pub bytes: BTreeMap<u64, u64>,
}

/// Bytes on one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeBytes {
    pub dev: u64,
    /// The first path of the fit report on this volume.
    pub path: String,
    pub bytes: u64,
}

/// One entry of the list of what could be freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomItem {
    pub what: Freeable,
    pub label: String,
    pub consequence: String,
    pub volumes: Vec<VolumeBytes>,
    pub bytes: u64,
}

/// The plan to make room for an update that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPlan {
    /// Everything that could be freed, in order of harm (empty kinds left out).
    pub items: Vec<RoomItem>,
    /// How many of `items`, from the first, the plan frees: the fewest that
    /// make the update fit, or all of them when none do.
    pub free_first: usize,
    /// Whether the update fits once those are freed.
    pub fits_after: bool,
    /// The least `--make-room` policy that carries the plan out, when it
    /// makes the update fit.
    pub make_room: Option<MakeRoom>,
    /// Bytes each volume still lacks once the plan is carried out (empty
    /// when it fits).
    pub still_short: Vec<VolumeBytes>,
    /// Volumes that no freeing helps (short of inodes, or a figure larger
    /// than the whole volume), with why.
    pub unfixable: Vec<String>,
}

impl RoomPlan {
    /// The plan's items as freed: the first `free_first`.
    pub fn chosen(&self) -> &[RoomItem] {
        &self.items[..self.free_first]
    }

    /// Whether `policy` may carry out the plan.
    pub fn allowed_by(&self, policy: MakeRoom) -> bool {
        policy != MakeRoom::None
            && self.fits_after
            && self.chosen().iter().all(|i| policy.allows(i.what))
    }

    /// The plan for people, one line each.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.items.is_empty() {
            out.push_str("nothing could be freed to make room\n");
        } else {
            out.push_str("what could be freed, in order of harm:\n");
        }
        for (n, item) in self.items.iter().enumerate() {
            let mark = if n < self.free_first { "*" } else { " " };
            out.push_str(&format!(
                " {mark}{}. {}: {} (consequence: {})\n",
                n + 1,
                item.label,
                volumes_text(&item.volumes),
                item.consequence
            ));
        }
        if self.fits_after {
            let last = self.free_first;
            let which = if last == 1 {
                "1".to_string()
            } else {
                format!("1 to {last}")
            };
            out.push_str(&format!(
                "freeing {which} (marked *) makes the update fit: stowage update --make-room={}\n",
                self.make_room.unwrap_or(MakeRoom::DropRollback)
            ));
        } else {
            out.push_str("even freeing all of it, the update does not fit");
            if !self.still_short.is_empty() {
                out.push_str(&format!(": {} short", volumes_text(&self.still_short)));
            }
            for why in &self.unfixable {
                out.push_str(&format!("; {why}"));
            }
            out.push('\n');
        }
        out
    }
}

fn volumes_text(volumes: &[VolumeBytes]) -> String {
    volumes
        .iter()
        .map(|v| format!("{} on the volume of {}", human_bytes(v.bytes), v.path))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The smallest prefix of `candidates` (taken in order of harm, whatever
/// order they come in) that makes the update `fit` describes fit.
///
/// A volume fits once the bytes freed on it cover what its peak lacks;
/// freeing never gives back inodes here (not counted), so a volume short of
/// inodes, or refused for a figure larger than the whole volume, stays short.
pub fn plan_room(fit: &FitReport, candidates: &[Candidate]) -> RoomPlan {
    let path_of = |dev: u64| {
        fit.volumes
            .iter()
            .find(|v| v.dev == dev)
            .and_then(|v| v.paths.first())
            .map(|p| p.split(" (").next().unwrap_or(p).to_string())
            .unwrap_or_else(|| format!("device {dev}"))
    };
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by_key(|c| c.what);
    let mut items: Vec<RoomItem> = Vec::new();
    for candidate in sorted {
        // Bytes on volumes the update does not write to do not help it.
        let volumes: Vec<VolumeBytes> = candidate
            .bytes
            .iter()
            .filter(|(dev, bytes)| **bytes > 0 && fit.volumes.iter().any(|v| v.dev == **dev))
            .map(|(dev, bytes)| VolumeBytes {
                dev: *dev,
                path: path_of(*dev),
                bytes: *bytes,
            })
            .collect();
        if volumes.is_empty() {
            continue;
        }
        if let Some(same) = items.iter_mut().find(|i| i.what == candidate.what) {
            for v in volumes {
                match same.volumes.iter_mut().find(|s| s.dev == v.dev) {
                    Some(s) => s.bytes = s.bytes.saturating_add(v.bytes),
                    None => same.volumes.push(v),
                }
            }
            same.bytes = same
                .volumes
                .iter()
                .map(|v| v.bytes)
                .fold(0, u64::saturating_add);
            continue;
        }
        items.push(RoomItem {
            what: candidate.what,
            label: candidate.what.label().to_string(),
            consequence: candidate.what.consequence().to_string(),
            bytes: volumes.iter().map(|v| v.bytes).fold(0, u64::saturating_add),
            volumes,
        });
    }

    let mut unfixable = Vec::new();
    for v in fit.volumes.iter().filter(|v| !v.fits) {
        let bytes_short = v.required > v.available;
        if v.inodes_required > v.inodes_free || !bytes_short {
            unfixable.push(v.reason.clone());
        }
    }
    if !fit.fits && fit.volumes.iter().all(|v| v.fits) {
        unfixable.push("the update does not fit for a reason no freeing changes".to_string());
    }
    let short_after = |n: usize| -> Vec<VolumeBytes> {
        fit.volumes
            .iter()
            .filter(|v| !v.fits)
            .filter_map(|v| {
                let freed = items[..n]
                    .iter()
                    .flat_map(|i| &i.volumes)
                    .filter(|b| b.dev == v.dev)
                    .map(|b| b.bytes)
                    .fold(0u64, u64::saturating_add);
                let lacking = v.required.saturating_sub(v.available.saturating_add(freed));
                (lacking > 0).then(|| VolumeBytes {
                    dev: v.dev,
                    path: path_of(v.dev),
                    bytes: lacking,
                })
            })
            .collect()
    };
    let fits_with = |n: usize| unfixable.is_empty() && short_after(n).is_empty();
    let chosen = (0..=items.len()).find(|n| fits_with(*n));
    let (free_first, fits_after) = match chosen {
        Some(n) => (n, true),
        None => (items.len(), false),
    };
    let make_room = fits_after.then(|| {
        items[..free_first]
            .iter()
            .map(|i| MakeRoom::least_for(i.what))
            .max()
            .unwrap_or(MakeRoom::None)
    });
    RoomPlan {
        still_short: if fits_after {
            Vec::new()
        } else {
            short_after(free_first)
        },
        items,
        free_first,
        fits_after,
        make_room,
        unfixable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::space::{Demand, Part, Policy, SpaceError, Volume, plan};
    use std::path::{Path, PathBuf};

    const BLOCK: u64 = 4096;

    /// Two volumes: /store (dev 1) and /docker (dev 2), each 1000 blocks
    /// with 500 free; at the 99% watermark the reserve is 10 blocks, so
    /// 490 blocks are available on each.
    fn fake(path: &Path) -> Result<Volume, SpaceError> {
        let dev = if path.starts_with("/docker") { 2 } else { 1 };
        Ok(Volume {
            dev,
            block_size: BLOCK,
            total_bytes: 1000 * BLOCK,
            free_bytes: 500 * BLOCK,
            total_inodes: 1000,
            free_inodes: 100,
        })
    }

    fn fit(store_blocks: u64, docker_blocks: u64) -> FitReport {
        let demand = |path: &str, part, blocks: u64| Demand {
            path: PathBuf::from(path),
            part,
            bytes: blocks * BLOCK,
            inodes: 1,
            written: blocks * BLOCK,
        };
        plan(
            &[
                demand("/store", Part::Blobs, store_blocks),
                demand("/docker", Part::DockerLayers, docker_blocks),
            ],
            Policy::new(99, 0).unwrap(),
            &fake,
        )
        .unwrap()
    }

    fn candidate(what: Freeable, store_blocks: u64, docker_blocks: u64) -> Candidate {
        Candidate {
            what,
            bytes: [(1, store_blocks * BLOCK), (2, docker_blocks * BLOCK)]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn the_plan_is_the_smallest_prefix_in_order_of_harm() {
        // Docker's volume lacks 30 blocks; the store's fits.
        let report = fit(100, 520);
        assert!(!report.fits);
        // Given out of order: the plan sorts them by harm.
        let plan = plan_room(
            &report,
            &[
                candidate(Freeable::RollbackCopy, 50, 200),
                candidate(Freeable::StalePartials, 3, 0),
                candidate(Freeable::Unneeded, 10, 40),
            ],
        );
        let order: Vec<Freeable> = plan.items.iter().map(|i| i.what).collect();
        assert_eq!(
            order,
            [
                Freeable::StalePartials,
                Freeable::Unneeded,
                Freeable::RollbackCopy
            ]
        );
        // The partials are on the store's volume: they do not help Docker's.
        assert_eq!(plan.free_first, 2);
        assert!(plan.fits_after);
        assert_eq!(plan.make_room, Some(MakeRoom::Prune));
        assert!(plan.allowed_by(MakeRoom::Prune));
        assert!(!plan.allowed_by(MakeRoom::None));
        assert_eq!(plan.items[1].bytes, 50 * BLOCK);
        assert_eq!(
            plan.items[1].volumes,
            [
                VolumeBytes {
                    dev: 1,
                    path: "/store".into(),
                    bytes: 10 * BLOCK
                },
                VolumeBytes {
                    dev: 2,
                    path: "/docker".into(),
                    bytes: 40 * BLOCK
                }
            ]
        );
        let text = plan.render();
        assert!(text.contains(" *1. stale partial downloads"), "{text}");
        assert!(
            text.contains(" *2. blobs and images no app needs"),
            "{text}"
        );
        assert!(text.contains("  3. the rollback copy"), "{text}");
        assert!(text.contains("no rollback for this update"), "{text}");
        assert!(text.contains("--make-room=prune"), "{text}");
    }

    #[test]
    fn an_update_that_needs_the_rollback_copy_asks_for_drop_rollback() {
        let report = fit(100, 600);
        let plan = plan_room(
            &report,
            &[
                candidate(Freeable::Unneeded, 0, 40),
                candidate(Freeable::RollbackCopy, 0, 200),
                candidate(Freeable::DroppedApps, 0, 500),
            ],
        );
        assert!(plan.fits_after);
        assert_eq!(plan.free_first, 2);
        assert_eq!(plan.make_room, Some(MakeRoom::DropRollback));
        assert!(!plan.allowed_by(MakeRoom::Prune));
        assert!(plan.allowed_by(MakeRoom::DropRollback));
        // Exactly enough counts: 110 blocks short, 40 + 70 freed.
        let exact = plan_room(
            &report,
            &[
                candidate(Freeable::Unneeded, 0, 40),
                candidate(Freeable::RollbackCopy, 0, 70),
            ],
        );
        assert!(exact.fits_after);
        let just_short = plan_room(
            &report,
            &[
                candidate(Freeable::Unneeded, 0, 40),
                candidate(Freeable::RollbackCopy, 0, 69),
            ],
        );
        assert!(!just_short.fits_after);
        assert_eq!(just_short.still_short[0].bytes, BLOCK);
    }

    #[test]
    fn when_even_all_of_it_does_not_fit_the_plan_says_so() {
        let report = fit(100, 900);
        let plan = plan_room(
            &report,
            &[
                candidate(Freeable::StalePartials, 0, 10),
                candidate(Freeable::Unneeded, 0, 40),
            ],
        );
        assert!(!plan.fits_after);
        assert_eq!(plan.free_first, 2);
        assert_eq!(plan.make_room, None);
        assert!(!plan.allowed_by(MakeRoom::DropRollback));
        assert_eq!(plan.still_short.len(), 1);
        assert_eq!(plan.still_short[0].bytes, (900 - 490 - 50) * BLOCK);
        let text = plan.render();
        assert!(
            text.contains("even freeing all of it, the update does not fit"),
            "{text}"
        );
    }

    #[test]
    fn nothing_to_free_and_inodes_are_never_made_by_freeing() {
        let report = fit(100, 600);
        let plan = plan_room(&report, &[]);
        assert!(plan.items.is_empty());
        assert!(!plan.fits_after);
        assert!(plan.render().contains("nothing could be freed"));

        let mut report = fit(100, 100);
        report.volumes[0].inodes_required = 101;
        report.volumes[0].fits = false;
        report.volumes[0].reason = "short of inodes".into();
        report.fits = false;
        let plan = plan_room(&report, &[candidate(Freeable::Unneeded, 400, 0)]);
        assert!(!plan.fits_after);
        assert_eq!(plan.unfixable, ["short of inodes"]);
    }

    #[test]
    fn policies_parse_and_allow_in_order() {
        for name in MakeRoom::NAMES {
            let policy: MakeRoom = name.parse().unwrap();
            assert_eq!(policy.to_string(), name);
        }
        assert!("all".parse::<MakeRoom>().is_err());
        assert!(!MakeRoom::None.allows(Freeable::StalePartials));
        assert!(MakeRoom::Prune.allows(Freeable::Unneeded));
        assert!(!MakeRoom::Prune.allows(Freeable::RollbackCopy));
        assert!(MakeRoom::DropRollback.allows(Freeable::DroppedApps));
    }
}
