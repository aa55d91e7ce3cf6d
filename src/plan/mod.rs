//! `stowage check`: plan an update and say, per volume, whether it fits,
//! before a single byte is downloaded. `pull` and `install` run the same
//! plan first and refuse with exit code 100 what does not fit.
//!
//! What is counted, per file system (paths grouped by `st_dev`):
//! - the blob store: every blob not yet stored, rounded up to the volume's
//!   block size, minus what a partial download already holds;
//! - Docker's data root: the unpacked usage of every layer the engine does
//!   not hold as part of the same layer chain, for the volume's block size,
//!   plus the engine's temporary copies: one layer per load (its file, as
//!   sent, is the copy), at the worst moment of loading them one at a time
//!   ([`held::install_peak`]), the least any order of such loads needs.
//!   Install loads [`IMAGES_AT_ONCE`] images at a time, but holds them to
//!   that figure ([`held::LoadBudget`]). Whole images (each image's new
//!   layers in one load, inflated, the tars its copy, two at once) are
//!   counted instead only when asked for (`--load-path whole`) and
//!   they fit;
//! - the apps directory: the extracted bundle.
//!
//! Each volume's figure is the most the update holds there at any one of
//! its steps (pull, install, switch, commit, prune), not the sum of all it
//! writes: the temporary copies are gone after the install
//! ([`space::Step`]).

pub mod held;
pub mod room;
pub mod space;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::app::{App, LayerNeed};
use crate::oci::format::{self, LayerMeta};
use crate::plan::held::{
    HeldLayers, IMAGES_AT_ONCE, ImageLoads, LayerLoad, LoadBudget, inflate_some,
    inflate_within_peak, install_peak, intermediate_config_len, load_temp_bytes, sent_compressed,
};
use crate::plan::space::{Demand, FitReport, Part, Policy, Volume, human_bytes};
use crate::store::Store;

/// What Docker looks like to the plan.
#[derive(Debug, Clone, Serialize)]
pub struct DockerView {
    pub reachable: bool,
    pub data_root: PathBuf,
    #[serde(skip)]
    pub held: HeldLayers,
}

impl DockerView {
    /// An engine that could not be asked: it is assumed to hold nothing, so
    /// every layer is counted, and the note says why.
    pub fn unreachable(why: &str) -> (DockerView, Option<String>) {
        (
            DockerView {
                reachable: false,
                data_root: PathBuf::from("/var/lib/docker"),
                held: HeldLayers::default(),
            },
            Some(format!(
                "Docker is not reachable ({why}): every layer is counted as missing from /var/lib/docker"
            )),
        )
    }
}

/// A planned update: what is missing where, and whether it fits.
#[derive(Debug, Clone)]
pub struct UpdatePlan {
    /// Layers not yet in the store, de-duplicated across apps.
    pub missing_layers: Vec<LayerNeed>,
    /// Metadata blobs not yet in the store.
    pub missing_meta: usize,
    /// Layers Docker must load (not held in the same chain), by digest.
    pub docker_layers: Vec<Digest>,
    /// What the plan counted for each of those layers, by blob digest.
    pub docker_counts: BTreeMap<Digest, LayerCount>,
    /// Docker's volume: its block size, and the bytes and inodes it has
    /// beyond all the plan counted there (0 when it does not fit).
    pub docker_block_size: u64,
    pub docker_room: (u64, u64),
    /// Each image's new layers in one load, inflated (faster, with the
    /// largest temporary copy): only when asked for and its peak fits.
    pub whole_images: bool,
    /// Otherwise, what keeps the loads within the lean peak the check counted.
    pub load_budget: Option<LoadBudget>,
    /// The gzip layers (by diff_id) the lean way hands the engine inflated,
    /// not as stored: their copy keeps the peak where it is.
    pub inflated: BTreeSet<Digest>,
    /// The images (config digests) in the order the check counted their
    /// loads: install loads them in this order, either way.
    pub load_order: Vec<Digest>,
    pub fit: FitReport,
}

/// What the plan counted for one layer Docker must load: the figures a
/// load is held to while it streams the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerCount {
    pub diff_id: Digest,
    /// Disk bytes once unpacked, for Docker's volume's block size.
    pub usage: u64,
    pub inodes: u64,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
    /// Bytes of the layer's file in the archive (the engine's temporary
    /// copy): the blob when sent as stored, else the tar.
    pub sent_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSummary {
    pub name: String,
    pub reference: String,
    pub architecture: String,
    pub layers: usize,
    pub layers_missing: usize,
    pub download_bytes: u64,
    /// Layers whose disk usage is an estimate: the app's layers-meta lacks
    /// them (or lacks the architecture), and no install measured them.
    #[serde(default)]
    pub layers_estimated: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckReport {
    pub apps: Vec<AppSummary>,
    pub docker_reachable: bool,
    pub docker_data_root: PathBuf,
    #[serde(flatten)]
    pub fit: FitReport,
    /// When it does not fit: what could be freed, in order of harm, and
    /// the smallest part of that which makes it fit (see [`room`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub make_room: Option<room::RoomPlan>,
}

/// Where an update writes, on the device.
pub struct Paths {
    pub store: PathBuf,
    pub apps: PathBuf,
}

impl Paths {
    pub fn under(root: &Path) -> Paths {
        Paths {
            store: root.join("store"),
            apps: root.join("apps"),
        }
    }
}

/// The update does not fit: the CLI exits with code 100.
#[derive(Debug, thiserror::Error)]
#[error("the update does not fit: {}", report.fit.shortfall())]
pub struct DoesNotFit {
    pub report: Box<CheckReport>,
}

impl DoesNotFit {
    /// The exit code of a command refused for space.
    pub const EXIT_CODE: u8 = 100;
}

/// Plans the update of `apps` and says what it needs, as `stowage check` does.
pub fn check_update(
    apps: &[App],
    store: &Store,
    paths: &Paths,
    docker: &DockerView,
    policy: Policy,
) -> Result<(UpdatePlan, CheckReport)> {
    let plan = plan_update(apps, store, paths, docker, policy)?;
    let report = summarise(apps, &plan, docker, &store.layer_facts());
    Ok((plan, report))
}

/// The report back when the update fits; [`DoesNotFit`] carrying it when not.
pub fn refuse_unless_fits(report: CheckReport) -> Result<CheckReport> {
    if report.fit.fits {
        Ok(report)
    } else {
        Err(DoesNotFit {
            report: Box::new(report),
        }
        .into())
    }
}

/// Plans the update of `apps` against what `store` and Docker hold.
///
/// A layer's figures are what stowage measured of it when it unpacked it
/// before (the store's layer facts), else what the app's layers-meta
/// declares, else FORMAT.md's estimate. Every sum saturates, so figures a
/// publisher made huge cannot wrap round to "fits"; a single figure larger
/// than the whole volume is named in the refusal.
pub fn plan_update(
    apps: &[App],
    store: &Store,
    paths: &Paths,
    docker: &DockerView,
    policy: Policy,
) -> Result<UpdatePlan> {
    let store_volume = Volume::of(&paths.store)?;
    let docker_volume = Volume::of(&docker.data_root)?;
    let apps_volume = Volume::of(&paths.apps)?;
    let facts = store.layer_facts();
    let mut demands = Vec::new();
    // (volume, sentence) for each figure no volume of that size could hold.
    let mut absurd: Vec<(u64, String)> = Vec::new();

    // The blob store: metadata and layers not stored yet, minus partials.
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut missing_layers = Vec::new();
    let mut missing_meta = 0;
    let mut blob_bytes = 0u64;
    let mut blob_inodes = 0u64;
    let mut count_blob = |digest: &Digest, size: u64, absurd: &mut Vec<(u64, String)>| -> bool {
        if !seen.insert(digest.clone()) || store.has(digest) {
            return false;
        }
        if size > store_volume.total_bytes {
            absurd.push((
                store_volume.dev,
                format!(
                    "blob {digest} is declared {}, more than the whole volume ({})",
                    human_bytes(size),
                    human_bytes(store_volume.total_bytes)
                ),
            ));
        }
        // A partial download (and the space preallocated for it) is
        // already taken from the volume: count only the rest.
        let have = store.partial_taken_bytes(digest);
        let left = size.saturating_sub(have);
        blob_bytes = blob_bytes.saturating_add(store_volume.round_up(left));
        blob_inodes = blob_inodes.saturating_add(1);
        true
    };
    for app in apps {
        let meta = app.meta_blobs.iter().map(|b| &b.descriptor);
        for descriptor in meta.chain(&app.unfetched) {
            if count_blob(&descriptor.digest, descriptor.size, &mut absurd) {
                missing_meta += 1;
            }
        }
        for layer in &app.layers {
            if count_blob(&layer.descriptor.digest, layer.descriptor.size, &mut absurd) {
                missing_layers.push(layer.clone());
            }
        }
    }
    demands.push(Demand {
        path: paths.store.clone(),
        part: Part::Blobs,
        bytes: blob_bytes,
        inodes: blob_inodes,
        written: blob_bytes,
    });

    // Docker: layers whose chain the engine lacks, loaded one per load in
    // the order install loads them (images by ID), and each load's
    // temporary copy.
    let mut docker_layers: BTreeMap<Digest, LayerNeed> = BTreeMap::new();
    let mut images_by_id: BTreeMap<&Digest, &crate::app::ServiceImage> = BTreeMap::new();
    let mut by_digest: BTreeMap<&Digest, &LayerNeed> = BTreeMap::new();
    for app in apps {
        by_digest.extend(app.layers.iter().map(|l| (&l.descriptor.digest, l)));
        images_by_id.extend(app.images.iter().map(|i| (&i.config.digest, i)));
    }
    let block = docker_volume.block_size;
    let mut loading = docker.held.clone();
    let mut loads: Vec<ImageLoads> = Vec::new();
    let mut whole: Vec<ImageLoads> = Vec::new();
    // Which image loads each missing chain first: a later image needing it
    // waits for that one (as install schedules them).
    let mut owner: BTreeMap<Digest, usize> = BTreeMap::new();
    // Each image's config digest and first layer to load, as `loads`.
    let mut load_keys: Vec<(Digest, usize)> = Vec::new();
    // Per load, as `loads`: its temporary copy were it handed inflated
    // (gzip layers only), and its blob.
    let mut inflated_temps: Vec<Vec<Option<u64>>> = Vec::new();
    let mut load_blobs: Vec<Vec<Digest>> = Vec::new();
    // The image with the largest temporary copy first: the last loads go
    // one by one (the volume is fullest then), so the peak and the time
    // are least when the one left for last has the smallest copy.
    let mut ordered: Vec<&crate::app::ServiceImage> = images_by_id.values().copied().collect();
    let largest_copy = |image: &crate::app::ServiceImage| {
        let diff_ids: Vec<Digest> = image.layers.iter().map(|(_, d)| d.clone()).collect();
        image
            .layers
            .iter()
            .skip(docker.held.held_prefix_len(&diff_ids))
            .filter_map(|(layer, _)| by_digest.get(&layer.digest))
            .map(|need| sent_size(need))
            .max()
            .unwrap_or(0)
    };
    ordered.sort_by_key(|image| std::cmp::Reverse(largest_copy(image)));
    for image in ordered {
        let diff_ids: Vec<Digest> = image.layers.iter().map(|(_, d)| d.clone()).collect();
        let held = loading.held_prefix_len(&diff_ids);
        let mut after = Vec::new();
        for chain in crate::oci::digest::chain_ids(&diff_ids) {
            if docker.held.chain_ids.contains(&chain) {
                continue;
            }
            match owner.get(&chain) {
                Some(&first) => after.push(first),
                None => {
                    owner.insert(chain, loads.len());
                }
            }
        }
        let mut image_loads = Vec::new();
        let mut image_inflated = Vec::new();
        let mut image_blobs = Vec::new();
        let mut whole_tars = Vec::new();
        for (i, (layer, _)) in image.layers.iter().enumerate().skip(held) {
            let Some(need) = by_digest.get(&layer.digest) else {
                continue;
            };
            let mut need = (*need).clone();
            if let Some(measured) = facts.get(&layer.digest) {
                need.meta = Some(measured.clone());
            }
            let last = i + 1 == image.layers.len();
            let config_len = if last {
                image.config.size
            } else {
                intermediate_config_len(i + 1)
            };
            let sent = sent_size(&need);
            whole_tars.push(need.tar_size());
            // Handed inflated instead, when its figures are known (a load is
            // held to them as it streams).
            image_inflated.push(
                (sent != need.tar_size() && need.meta.is_some() && inflate_some())
                    .then(|| load_temp_bytes(&[need.tar_size()], config_len, block)),
            );
            image_blobs.push(layer.digest.clone());
            image_loads.push(LayerLoad {
                usage: need.usage(block),
                until_image_done: if last {
                    0
                } else {
                    docker_volume.round_up(config_len)
                },
                temp: load_temp_bytes(&[sent], config_len, block),
            });
            docker_layers.insert(layer.digest.clone(), need);
        }
        loading.add_image(&diff_ids);
        after.sort_unstable();
        after.dedup();
        // The same image in one load: every new layer's tar, one config.
        whole.push(ImageLoads {
            loads: if image_loads.is_empty() {
                Vec::new()
            } else {
                vec![LayerLoad {
                    usage: saturating_sum(image_loads.iter().map(|l| l.usage)),
                    until_image_done: 0,
                    temp: load_temp_bytes(&whole_tars, image.config.size, block),
                }]
            },
            after: after.clone(),
        });
        loads.push(ImageLoads {
            loads: image_loads,
            after,
        });
        inflated_temps.push(image_inflated);
        load_blobs.push(image_blobs);
        load_keys.push((image.config.digest.clone(), held));
    }
    // The early loads go inflated where that keeps the peak (the engine
    // applies them for less CPU); the rest as stored.
    let inflated: BTreeSet<Digest> = inflate_within_peak(&mut loads, &inflated_temps)
        .into_iter()
        .filter_map(|(i, k)| load_blobs.get(i)?.get(k).cloned())
        .collect();
    let every_load = || loads.iter().flat_map(|i| &i.loads);
    let layers_usage = saturating_sum(every_load().map(|l| l.usage));
    let all_temps = |loads: &[ImageLoads]| {
        saturating_sum(
            loads
                .iter()
                .flat_map(|i| &i.loads)
                .map(|l| l.temp.saturating_add(l.until_image_done)),
        )
    };
    let mut docker_counts = BTreeMap::new();
    for (digest, need) in &docker_layers {
        let count = LayerCount {
            diff_id: need.diff_id.clone(),
            usage: need.usage(docker_volume.block_size),
            inodes: need.inodes(),
            tar_size: need.tar_size(),
            sent_size: if inflated.contains(digest) {
                need.tar_size()
            } else {
                sent_size(need)
            },
        };
        for (what, figure, whole) in [
            ("usage", count.usage, docker_volume.total_bytes),
            ("tar size", count.tar_size, docker_volume.total_bytes),
        ] {
            if figure > whole {
                absurd.push((
                    docker_volume.dev,
                    format!(
                        "layer {digest} is declared a {what} of {}, more than the whole volume ({})",
                        human_bytes(figure),
                        human_bytes(whole)
                    ),
                ));
            }
        }
        if count.inodes > docker_volume.total_inodes {
            absurd.push((
                docker_volume.dev,
                format!(
                    "layer {digest} is declared {} inodes, more than the whole volume has ({})",
                    count.inodes, docker_volume.total_inodes
                ),
            ));
        }
        docker_counts.insert(digest.clone(), count);
    }
    let layer_demand = Demand {
        path: docker.data_root.clone(),
        part: Part::DockerLayers,
        bytes: saturating_sum(docker_counts.values().map(|c| c.usage)),
        inodes: saturating_sum(docker_counts.values().map(|c| c.inodes)),
        written: saturating_sum(docker_counts.values().map(|c| c.usage)),
    };
    demands.push(layer_demand.clone());
    // What the install holds beyond the layers at its worst moment.
    let temp_demand = |loads: &[ImageLoads], at_once: usize| Demand {
        path: docker.data_root.clone(),
        part: Part::DockerTemp,
        bytes: install_peak(loads, at_once).saturating_sub(layers_usage),
        inodes: 0,
        written: all_temps(loads),
    };
    // The lean way (the default): the loads are held to the one-at-a-time peak.
    demands.push(temp_demand(&loads, 1));
    // The apps directory: each extracted bundle.
    let (mut bundle_bytes, mut bundle_inodes) = (0u64, 0u64);
    for app in apps {
        let (b, i) = app.bundle_footprint(apps_volume.block_size);
        bundle_bytes = bundle_bytes.saturating_add(b);
        bundle_inodes = bundle_inodes.saturating_add(i);
    }
    demands.push(Demand {
        path: paths.apps.clone(),
        part: Part::Bundle,
        bytes: bundle_bytes,
        inodes: bundle_inodes,
        written: bundle_bytes,
    });

    let mut fit = space::plan(&demands, policy, &Volume::of)?;
    // Layer by layer, two images at once while the disk held stays within
    // the one-at-a-time peak (the least any order of one-layer loads
    // needs). Whole images, inflated, two at once, only when asked for
    // (`--load-path whole`) and their larger peak fits.
    let mut whole_images = false;
    if fit.fits
        && policy.load_path == space::LoadPath::Whole
        && !whole.iter().all(|i| i.loads.is_empty())
    {
        let mut fast = demands.clone();
        if let Some(slot) = fast.iter_mut().find(|d| d.part == Part::DockerTemp) {
            *slot = temp_demand(&whole, IMAGES_AT_ONCE);
        }
        let whole_fit = space::plan(&fast, policy, &Volume::of)?;
        if whole_fit.fits {
            whole_images = true;
            fit = whole_fit;
            fit.notes.push(
                "images are loaded whole, layers inflated (load path whole): there is room for its larger temporary copy".into(),
            );
        }
    }
    if !whole_images && !inflated.is_empty() {
        fit.notes.push(format!(
            "{} of {} layer(s) to load go to the engine inflated, not as stored: their larger copy keeps the peak where it is, and the engine applies them for less CPU",
            inflated.len(),
            docker_layers.len()
        ));
    }
    let load_budget = (!whole_images).then(|| {
        let images: Vec<(Digest, usize, &ImageLoads)> = load_keys
            .iter()
            .zip(&loads)
            .map(|((digest, first), image)| (digest.clone(), *first, image))
            .collect();
        LoadBudget::new(&images)
    });
    // Layers no layers-meta describes and no install measured: their usage
    // is FORMAT.md's guess, and the report says so.
    let guessed: Vec<&LayerNeed> = docker_layers
        .values()
        .filter(|l| l.meta.is_none())
        .collect();
    if !guessed.is_empty() {
        fit.notes.push(format!(
            "{} layer(s) ({} compressed) are not described by the app's layers-meta for this architecture: their disk usage is an estimate, {}x their compressed size as Foundries' readers assume, not a measure (a layer that compresses better than that needs more)",
            guessed.len(),
            human_bytes(saturating_sum(guessed.iter().map(|l| l.descriptor.size))),
            format::fallback_usage(1)
        ));
    }
    for (dev, sentence) in absurd {
        if let Some(volume) = fit.volumes.iter_mut().find(|v| v.dev == dev) {
            volume.fits = false;
            volume.reason = if volume.reason.is_empty() {
                sentence
            } else {
                format!("{}; {sentence}", volume.reason)
            };
        }
        fit.fits = false;
    }
    let docker_room = fit
        .volumes
        .iter()
        .find(|v| v.dev == docker_volume.dev)
        .map_or((0, 0), |v| {
            (
                v.available.saturating_sub(v.required),
                v.inodes_free.saturating_sub(v.inodes_required),
            )
        });
    if whole_images {
        // Each layer's file in the archive is its tar.
        for count in docker_counts.values_mut() {
            count.sent_size = count.tar_size;
        }
    }
    let inflated_diff_ids = inflated
        .iter()
        .filter_map(|blob| docker_layers.get(blob).map(|l| l.diff_id.clone()))
        .collect();
    Ok(UpdatePlan {
        missing_layers,
        missing_meta,
        docker_layers: docker_layers.into_keys().collect(),
        docker_counts,
        docker_block_size: docker_volume.block_size,
        docker_room,
        whole_images,
        load_budget,
        inflated: inflated_diff_ids,
        load_order: load_keys.into_iter().map(|(digest, _)| digest).collect(),
        fit,
    })
}

/// The bytes of a layer's file in the archive install hands the engine:
/// the blob when it goes as stored, else the uncompressed tar.
fn sent_size(need: &LayerNeed) -> u64 {
    if sent_compressed(&need.descriptor.media_type) {
        need.descriptor.size
    } else {
        need.tar_size()
    }
}

fn saturating_sum(figures: impl Iterator<Item = u64>) -> u64 {
    figures.fold(0u64, u64::saturating_add)
}

pub fn summarise(
    apps: &[App],
    plan: &UpdatePlan,
    docker: &DockerView,
    facts: &BTreeMap<Digest, LayerMeta>,
) -> CheckReport {
    let missing: HashSet<&Digest> = plan
        .missing_layers
        .iter()
        .map(|l| &l.descriptor.digest)
        .collect();
    CheckReport {
        apps: apps
            .iter()
            .map(|a| AppSummary {
                name: a.name.clone(),
                reference: a.reference.to_string(),
                architecture: a.architecture.clone(),
                layers: a.layers.len(),
                layers_missing: a
                    .layers
                    .iter()
                    .filter(|l| missing.contains(&l.descriptor.digest))
                    .count(),
                download_bytes: saturating_sum(
                    a.layers
                        .iter()
                        .filter(|l| missing.contains(&l.descriptor.digest))
                        .map(|l| l.descriptor.size),
                ),
                layers_estimated: a
                    .layers
                    .iter()
                    .filter(|l| l.meta.is_none() && !facts.contains_key(&l.descriptor.digest))
                    .count(),
            })
            .collect(),
        docker_reachable: docker.reachable,
        docker_data_root: docker.data_root.clone(),
        fit: plan.fit.clone(),
        make_room: None,
    }
}
