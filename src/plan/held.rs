//! What the plan knows of how the engine stores and loads images: the
//! layers it holds (by chain), and the temporary disk a load takes. The
//! engine's client fills [`HeldLayers`]; the plan only reads it.

use std::collections::HashSet;

use crate::Digest;
use crate::oci::digest::chain_ids;

/// Images loaded at once. Each image is loaded one layer per load (the
/// engine's temporary copy is one layer's file); two images at once keep a
/// small device's cores busy (the engine applies a load on about one), and
/// a [`LoadBudget`] keeps the two within the one-at-a-time peak.
pub const IMAGES_AT_ONCE: usize = 2;

/// Whether a layer of this media type is handed to the engine as stored
/// (compressed) rather than inflated, unless [`inflate_within_peak`] picks
/// it. See the README ("Installing into Docker") for the measurements
/// behind the choice.
pub fn sent_compressed(media_type: &str) -> bool {
    send_gzip() && media_type.ends_with("gzip")
}

/// The chosen path: gzip layers go to the engine as stored, but those
/// [`inflate_within_peak`] picks. For measurements only,
/// `STOWAGE_LOAD_LAYERS=plain` hands every one inflated and
/// `STOWAGE_LOAD_LAYERS=stored` every one as stored (the check then counts
/// that, too); see docs/benchmarks.md.
pub fn send_gzip() -> bool {
    load_layers() != Some(LoadLayers::Plain)
}

/// Whether the lean way may hand some gzip layers inflated (see
/// [`inflate_within_peak`]).
pub fn inflate_some() -> bool {
    load_layers().is_none()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadLayers {
    Plain,
    Stored,
}

fn load_layers() -> Option<LoadLayers> {
    static CHOICE: std::sync::OnceLock<Option<LoadLayers>> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("STOWAGE_LOAD_LAYERS").as_deref() {
        Ok("plain") => Some(LoadLayers::Plain),
        Ok("stored") => Some(LoadLayers::Stored),
        _ => None,
    })
}

/// The bytes of the intermediate config stowage makes for an image's first
/// `layers` layers (architecture, OS, a label naming the image, the
/// `diff_id`s), rounded up: each layer but the last is loaded under one.
pub fn intermediate_config_len(layers: usize) -> u64 {
    // {"architecture":..,"os":..,"config":{"Labels":{label: id}},"rootfs":..}
    // is under 250 bytes, and each diff_id adds 74.
    256 + 74 * layers as u64
}

/// One load of a layer-by-layer install: the disk it leaves applied, the
/// disk held until its image is whole (the intermediate config), and its
/// temporary copy, all in bytes for Docker's volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLoad {
    pub usage: u64,
    pub until_image_done: u64,
    pub temp: u64,
}

/// One image's loads, in order, and the images (by index, all earlier) it
/// waits for because it needs a layer chain they load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageLoads {
    pub loads: Vec<LayerLoad>,
    pub after: Vec<usize>,
}

/// The peak extra disk on Docker's volume of loading `images` in this
/// order, `at_once` images at a time. One at a time (install then loads
/// them strictly in order), it is exactly the largest "applied so far plus
/// this load's layer and its temporary copy". Two at a time, two images
/// that do not wait for one another may overlap in any way: every usage
/// plus the largest copy of each of the two is counted for the worst such
/// pair; images that all wait for one another load one after the other.
pub fn install_peak(images: &[ImageLoads], at_once: usize) -> u64 {
    let sequential = {
        let (mut applied, mut peak) = (0u64, 0u64);
        for image in images {
            let mut pending = 0u64;
            for load in &image.loads {
                applied = applied.saturating_add(load.usage);
                pending = pending.saturating_add(load.until_image_done);
                peak = peak.max(applied.saturating_add(pending).saturating_add(load.temp));
            }
        }
        peak
    };
    if at_once <= 1 || images.len() < 2 {
        return sequential;
    }
    // Which images transitively wait for which.
    let n = images.len();
    let mut waits = vec![vec![false; n]; n];
    for (i, image) in images.iter().enumerate() {
        for &j in &image.after {
            if j < i {
                waits[i][j] = true;
                let inherited = waits[j].clone();
                for (k, _) in inherited.iter().enumerate().take(j).filter(|(_, w)| **w) {
                    waits[i][k] = true;
                }
            }
        }
    }
    let largest = |image: &ImageLoads| image.loads.iter().map(|l| l.temp).max().unwrap_or(0);
    let mut pair = None::<u64>;
    for i in 0..n {
        for j in 0..i {
            if !waits[i][j] {
                let both = largest(&images[i]).saturating_add(largest(&images[j]));
                pair = Some(pair.map_or(both, |p| p.max(both)));
            }
        }
    }
    let Some(pair) = pair else {
        return sequential;
    };
    let applied = images
        .iter()
        .flat_map(|i| &i.loads)
        .map(|l| l.usage.saturating_add(l.until_image_done))
        .fold(0u64, u64::saturating_add);
    sequential.max(applied.saturating_add(pair))
}

/// Which loads of the lean way go to the engine inflated rather than as
/// stored: those whose inflated copy (`inflated[i][k]`, for load `k` of
/// image `i`; `None` when it must go as stored) keeps the one-at-a-time
/// peak where it is, in the order install loads them. The engine applies an
/// inflated layer for much less CPU than one it must inflate itself, so the
/// early loads, while little is applied, go inflated for no more peak disk;
/// the later ones, when the volume is fullest, go as stored. Switches those
/// loads' temporary copies in `images` and returns them (image, load).
pub fn inflate_within_peak(
    images: &mut [ImageLoads],
    inflated: &[Vec<Option<u64>>],
) -> Vec<(usize, usize)> {
    let peak = install_peak(images, 1);
    let mut switched = Vec::new();
    let mut applied = 0u64;
    for (i, image) in images.iter_mut().enumerate() {
        let mut pending = 0u64;
        for (k, load) in image.loads.iter_mut().enumerate() {
            applied = applied.saturating_add(load.usage);
            pending = pending.saturating_add(load.until_image_done);
            let alternative = inflated.get(i).and_then(|l| l.get(k)).copied().flatten();
            if let Some(temp) = alternative
                && applied.saturating_add(pending).saturating_add(temp) <= peak
            {
                load.temp = temp;
                switched.push((i, k));
            }
        }
    }
    switched
}

/// One load of the lean way in: the image (its config digest) and the
/// index, in the image's layers, of the layer it carries.
pub type LoadKey = (Digest, usize);

/// The lean way in, as the plan counted it: every layer in a load of its
/// own, [`IMAGES_AT_ONCE`] images at a time, but a load starts only while
/// the disk the install holds on Docker's volume stays within `peak`, the
/// least any install of these layers one per load needs: the one-at-a-time
/// peak ([`install_peak`] with one image at a time). Early loads, while
/// little is applied, overlap; the last ones, when the volume is fullest,
/// go one by one. So the install is as lean as one load at a time, and
/// about as fast as two.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadBudget {
    /// Extra bytes on Docker's volume the install may hold at any moment.
    pub peak: u64,
    /// Every load in the one-at-a-time order, with the bytes it leaves
    /// applied (its layer, and the intermediate config, kept until the
    /// image is whole) and its temporary copy.
    pub order: Vec<(LoadKey, LayerLoad)>,
}

impl LoadBudget {
    /// From the plan's images (in the order install loads them), each
    /// with its config digest and the index of its first layer to load.
    pub fn new(images: &[(Digest, usize, &ImageLoads)]) -> LoadBudget {
        let loads: Vec<ImageLoads> = images.iter().map(|(_, _, l)| (*l).clone()).collect();
        // An intermediate config is held here until the install ends (it
        // is released when its image is whole): the few KiB this adds over
        // the plan's figure are allowed for, so the last loads fit as the
        // plan counted them.
        let configs: u64 = loads
            .iter()
            .flat_map(|i| &i.loads)
            .map(|l| l.until_image_done)
            .fold(0, u64::saturating_add);
        let order = images
            .iter()
            .flat_map(|(digest, first, image)| {
                image
                    .loads
                    .iter()
                    .enumerate()
                    .map(move |(i, load)| ((digest.clone(), first + i), *load))
            })
            .collect();
        LoadBudget {
            peak: install_peak(&loads, 1).saturating_add(configs),
            order,
        }
    }
}

/// What a load leaves on the volume once applied, until its image is whole.
fn held(load: &LayerLoad) -> u64 {
    load.usage.saturating_add(load.until_image_done)
}

/// Where an install stands against its [`LoadBudget`]: what is applied,
/// what is loading. Pure bookkeeping; the engine's gate waits on it.
#[derive(Debug, Clone, Default)]
pub struct BudgetState {
    budget: LoadBudget,
    applied: u64,
    loading: Vec<(LoadKey, LayerLoad)>,
    /// The one load streaming its archive before it may be applied (see
    /// [`Self::admits_early`]); it is in `loading` too.
    early: Option<LoadKey>,
    /// Loads ended (applied, or found held and skipped, or failed).
    ended: HashSet<LoadKey>,
    failed: HashSet<LoadKey>,
}

impl BudgetState {
    pub fn new(budget: LoadBudget) -> BudgetState {
        BudgetState {
            budget,
            ..BudgetState::default()
        }
    }

    fn cost(&self, key: &LoadKey) -> Option<LayerLoad> {
        self.budget
            .order
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, load)| *load)
    }

    /// Whether the load `key` may start now: when the disk held now, with
    /// it, stays within the peak AND every load not started yet, run one
    /// by one in the plan's order once these end, still fits. The first
    /// load in the plan's order not started yet always may once nothing
    /// loads, so an install always goes on (one load at a time at worst).
    /// A load the plan did not count (the engine's layers changed
    /// meanwhile) waits until nothing else loads. While a load streams
    /// early, no other starts: it is applied next.
    pub fn admits(&self, key: &LoadKey) -> bool {
        if self.early.is_some() {
            return false;
        }
        let this = self.cost(key);
        if self.loading.is_empty() && (this.is_none() || self.first_pending() == Some(key)) {
            return true;
        }
        let Some(this) = this else {
            return false;
        };
        self.held_now()
            .saturating_add(held(&this))
            .saturating_add(this.temp)
            <= self.budget.peak
            && self.rest_fits(key, &this)
    }

    /// Whether the load `key`, which may not start now, may stream its
    /// archive early: the engine then holds only its temporary copy (it
    /// applies nothing before the archive ends, and install holds back the
    /// archive's last bytes until [`Self::admits_apply`]). So the next
    /// archive is sent while the engine applies the one before. It may when
    /// its copy fits now, it fits applied once the loads running end, and
    /// every load after it still fits, one by one. One load at a time
    /// streams early, and only beside a load being applied.
    pub fn admits_early(&self, key: &LoadKey) -> bool {
        if self.early.is_some() || self.loading.is_empty() {
            return false;
        }
        let Some(this) = self.cost(key) else {
            return false;
        };
        let after_running = self
            .loading
            .iter()
            .map(|(_, l)| held(l))
            .fold(self.applied, u64::saturating_add);
        self.held_now().saturating_add(this.temp) <= self.budget.peak
            && after_running
                .saturating_add(held(&this))
                .saturating_add(this.temp)
                <= self.budget.peak
            && self.rest_fits(key, &this)
    }

    /// Whether the load `key`, streaming early, may be applied now (its
    /// archive's last bytes sent): always once it is the only load.
    pub fn admits_apply(&self, key: &LoadKey) -> bool {
        let Some((_, this)) = self.loading.iter().find(|(k, _)| k == key) else {
            return true;
        };
        self.loading.len() == 1 || self.held_now().saturating_add(held(this)) <= self.budget.peak
    }

    /// The disk the install holds now: what is applied, and what the loads
    /// running hold (a load streaming early: only its copy).
    fn held_now(&self) -> u64 {
        self.loading
            .iter()
            .map(|(k, l)| {
                if self.early.as_ref() == Some(k) {
                    l.temp
                } else {
                    held(l).saturating_add(l.temp)
                }
            })
            .fold(self.applied, u64::saturating_add)
    }

    /// Whether, with `key` (costing `this`) started and the loads running
    /// ended, every load not started yet fits, one by one in the plan's
    /// order.
    fn rest_fits(&self, key: &LoadKey, this: &LayerLoad) -> bool {
        let mut applied = self
            .loading
            .iter()
            .map(|(_, l)| held(l))
            .fold(self.applied, u64::saturating_add)
            .saturating_add(held(this));
        for (k, load) in &self.budget.order {
            if k == key || self.ended.contains(k) || self.loading.iter().any(|(l, _)| l == k) {
                continue;
            }
            if applied.saturating_add(held(load)).saturating_add(load.temp) > self.budget.peak {
                return false;
            }
            applied = applied.saturating_add(held(load));
        }
        true
    }

    /// The figures, for the log: applied, loading, the peak.
    pub fn describe(&self) -> String {
        format!(
            "{} bytes applied, {} load(s) running, peak {}",
            self.applied,
            self.loading.len(),
            self.budget.peak
        )
    }

    fn first_pending(&self) -> Option<&LoadKey> {
        self.budget
            .order
            .iter()
            .map(|(k, _)| k)
            .find(|k| !self.ended.contains(*k) && !self.loading.iter().any(|(l, _)| l == *k))
    }

    /// `key` starts streaming early (after [`Self::admits_early`]).
    pub fn start_early(&mut self, key: LoadKey) {
        self.start(key.clone());
        self.early = Some(key);
    }

    /// `key`, streaming early, is applied now (after [`Self::admits_apply`]).
    pub fn apply(&mut self, key: &LoadKey) {
        if self.early.as_ref() == Some(key) {
            self.early = None;
        }
    }

    /// `key` starts loading (after [`Self::admits`]).
    pub fn start(&mut self, key: LoadKey) {
        let cost = self.cost(&key).unwrap_or(LayerLoad {
            usage: 0,
            until_image_done: 0,
            temp: 0,
        });
        self.loading.push((key, cost));
    }

    /// `key` ended: applied (`applied`), or failed and left nothing.
    pub fn end(&mut self, key: &LoadKey, applied: bool) {
        self.apply(key);
        if let Some(at) = self.loading.iter().position(|(k, _)| k == key) {
            let (_, load) = self.loading.swap_remove(at);
            if applied {
                self.applied = self
                    .applied
                    .saturating_add(load.usage)
                    .saturating_add(load.until_image_done);
            }
        }
        if !applied {
            self.failed.insert(key.clone());
        }
        self.ended.insert(key.clone());
    }

    /// Whether the load `key` ended, and then whether the engine holds its
    /// layer. A load the plan did not count has ended.
    pub fn ended(&self, key: &LoadKey) -> Option<bool> {
        if self.cost(key).is_none() || self.ended.contains(key) {
            return Some(!self.failed.contains(key));
        }
        None
    }

    /// The engine holds `key`'s layer already: it is not loaded.
    pub fn skip(&mut self, key: LoadKey) {
        self.ended.insert(key);
    }

    /// Every load of the image `digest` ended (it is whole, or failed:
    /// then the loads it did not make failed too).
    pub fn image_done(&mut self, digest: &Digest) {
        let keys: Vec<LoadKey> = self
            .budget
            .order
            .iter()
            .filter(|((d, _), _)| d == digest)
            .map(|(k, _)| k.clone())
            .filter(|k| !self.ended.contains(k))
            .collect();
        self.failed.extend(keys.iter().cloned());
        self.ended.extend(keys);
    }
}

/// The layers the engine holds.
///
/// Docker stores a layer under its *chain ID* (the digest of the layer
/// together with every layer beneath it), not under its `diff_id` alone. So a
/// layer with a held `diff_id` saves nothing when it sits on a different base:
/// it counts as held only when an image holding the same chain prefix exists.
/// Use [`HeldLayers::held_prefix_len`] to know how many leading layers of an
/// image the engine will not need; `diff_ids` is the looser set, for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldLayers {
    pub diff_ids: HashSet<Digest>,
    pub chain_ids: HashSet<Digest>,
}

impl HeldLayers {
    /// How many leading layers of an image with these `diff_ids` the engine
    /// holds as a chain (all of them when the image is fully present).
    pub fn held_prefix_len(&self, diff_ids: &[Digest]) -> usize {
        chain_ids(diff_ids)
            .iter()
            .take_while(|chain| self.chain_ids.contains(chain))
            .count()
    }

    /// How many layers of an image a load must send.
    pub fn layers_to_load(&self, diff_ids: &[Digest]) -> usize {
        diff_ids.len() - self.held_prefix_len(diff_ids)
    }

    /// Adds an image the engine holds, by its layers' `diff_id`s.
    pub fn add_image(&mut self, diff_ids: &[Digest]) {
        self.diff_ids.extend(diff_ids.iter().cloned());
        self.chain_ids.extend(chain_ids(diff_ids));
    }
}

/// The extra disk the engine's temporary copy of a load takes, in bytes, when
/// the archive carries layer files of these sizes (as sent: uncompressed tar
/// sizes for stowage) and a config of `config_len` bytes, on a file system
/// with `block_size` blocks. It is on the data root's volume, and lasts until
/// every layer of the load is applied.
///
/// Measured on dockerd 20.10 (overlay2 on ext4): the engine's
/// `tmp/docker-import-*` directory holds `manifest.json`, the config, and one
/// directory with a `layer.tar` per layer sent, exactly the archive's files.
pub fn load_temp_bytes(sent_layer_sizes: &[u64], config_len: u64, block_size: u64) -> u64 {
    let block_size = block_size.max(1);
    let round = |n: u64| crate::oci::format::round_up(n, block_size);
    // The import directory itself, manifest.json (a few hundred bytes) and the config.
    let fixed = block_size
        .saturating_add(round(1024))
        .saturating_add(round(config_len));
    // Each layer sent: its directory and its layer.tar; a file of more than
    // a few extents (ext4 keeps four in the inode) also takes an extent
    // block, so one is counted for every file over 1 MiB.
    sent_layer_sizes
        .iter()
        .map(|&size| {
            let extent_block = if size > 1 << 20 { block_size } else { 0 };
            block_size
                .saturating_add(round(size))
                .saturating_add(extent_block)
        })
        .fold(fixed, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn a_held_layer_on_another_base_is_not_held() {
        let mut held = HeldLayers::default();
        held.add_image(&[digest(1), digest(2), digest(3)]);
        assert_eq!(held.held_prefix_len(&[digest(1), digest(2), digest(9)]), 2);
        assert_eq!(held.layers_to_load(&[digest(1), digest(2), digest(9)]), 1);
        // Layer 2 is held, but only on top of layer 1.
        assert!(held.diff_ids.contains(&digest(2)));
        assert_eq!(held.held_prefix_len(&[digest(2), digest(3)]), 0);
        assert_eq!(held.held_prefix_len(&[digest(1), digest(2), digest(3)]), 3);
    }

    #[test]
    fn one_at_a_time_the_peak_is_the_worst_load_on_what_is_applied() {
        let load = |usage, temp| LayerLoad {
            usage,
            until_image_done: 0,
            temp,
        };
        let image = |loads: Vec<LayerLoad>, after: Vec<usize>| ImageLoads { loads, after };
        // A big first layer, then small ones: the first load's copy is the peak
        // until enough is applied after it.
        let images = vec![
            image(vec![load(100, 100), load(10, 10)], vec![]),
            image(vec![load(20, 20)], vec![]),
        ];
        assert_eq!(install_peak(&images, 1), 200);
        // Two at once, independent: every usage plus each one's largest copy.
        assert_eq!(install_peak(&images, 2), 130 + 100 + 20);
        // The second waits for the first: one after the other even with two slots.
        let chained = vec![images[0].clone(), image(vec![load(20, 20)], vec![0])];
        assert_eq!(install_peak(&chained, 2), 200);
        let images = vec![
            image(vec![load(10, 10)], vec![]),
            image(vec![load(100, 100)], vec![]),
        ];
        assert_eq!(install_peak(&images, 1), 210);
        // An intermediate config is held until the image is whole.
        let with_config = vec![image(
            vec![
                LayerLoad {
                    usage: 10,
                    until_image_done: 4,
                    temp: 10,
                },
                load(10, 10),
            ],
            vec![],
        )];
        assert_eq!(install_peak(&with_config, 1), 34);
        assert_eq!(install_peak(&[], 1), 0);
        assert_eq!(
            install_peak(&[image(vec![load(u64::MAX, 1)], vec![])], 1),
            u64::MAX
        );
    }

    fn layer(usage: u64, temp: u64) -> LayerLoad {
        LayerLoad {
            usage,
            until_image_done: 0,
            temp,
        }
    }

    /// Three images of a small base (held after the first), a big layer and
    /// a small one, as the benchmark's pull app.
    fn three_images() -> (Vec<Digest>, LoadBudget) {
        let ids: Vec<Digest> = (10..13).map(digest).collect();
        let first = ImageLoads {
            loads: vec![layer(1, 1), layer(44, 44), layer(13, 10)],
            after: vec![],
        };
        let other = ImageLoads {
            loads: vec![layer(44, 44), layer(13, 10)],
            after: vec![],
        };
        let budget = LoadBudget::new(&[
            (ids[0].clone(), 0, &first),
            (ids[1].clone(), 1, &other),
            (ids[2].clone(), 1, &other),
        ]);
        (ids, budget)
    }

    #[test]
    fn the_budget_overlaps_early_loads_and_keeps_the_last_ones_one_by_one() {
        let (ids, budget) = three_images();
        // One at a time: 115 applied when the last big layer comes, plus its 88.
        assert_eq!(budget.peak, 203);
        let mut state = BudgetState::new(budget);
        let key = |image: usize, index: usize| (ids[image].clone(), index);
        assert!(state.admits(&key(0, 0)));
        state.start(key(0, 0));
        // The second image's big layer fits beside it, and so does the rest after.
        assert!(state.admits(&key(1, 1)));
        state.start(key(1, 1));
        state.end(&key(0, 0), true);
        // The first image's big layer beside the second's: 1 + 88 + 88.
        assert!(state.admits(&key(0, 1)));
        state.start(key(0, 1));
        state.end(&key(1, 1), true);
        assert!(state.admits(&key(1, 2)));
        state.start(key(1, 2));
        state.end(&key(0, 1), true);
        state.end(&key(1, 2), true);
        state.image_done(&ids[1]);
        assert!(state.admits(&key(0, 2)));
        state.start(key(0, 2));
        // The third image's big layer beside the first's small one: 102 +
        // 23 + 88 = 213 > 203: it waits until that one ends.
        assert!(!state.admits(&key(2, 1)));
        state.end(&key(0, 2), true);
        state.image_done(&ids[0]);
        assert!(state.admits(&key(2, 1)));
        // A load the plan did not count waits while another loads.
        state.start(key(2, 1));
        assert!(!state.admits(&(digest(99), 0)));
        state.end(&key(2, 1), false);
        assert!(state.admits(&(digest(99), 0)));
    }

    #[test]
    fn a_load_that_would_leave_an_earlier_one_no_room_waits() {
        // In the plan's order: a small image, a big one, then one whose
        // copy is small. The third beside the first fits now, but the big
        // one would then no longer fit after them: the third waits.
        let ids: Vec<Digest> = (20..23).map(digest).collect();
        let image = |usage, temp| ImageLoads {
            loads: vec![layer(usage, temp)],
            after: vec![],
        };
        let (a, b, c) = (image(10, 10), image(50, 50), image(40, 5));
        let budget = LoadBudget::new(&[
            (ids[0].clone(), 0, &a),
            (ids[1].clone(), 0, &b),
            (ids[2].clone(), 0, &c),
        ]);
        assert_eq!(budget.peak, 110);
        let mut state = BudgetState::new(budget);
        state.start((ids[0].clone(), 0));
        assert!(!state.admits(&(ids[2].clone(), 0)));
        // Nothing loading: still not the third, which is not next in order.
        state.end(&(ids[0].clone(), 0), true);
        assert!(!state.admits(&(ids[2].clone(), 0)));
        assert!(state.admits(&(ids[1].clone(), 0)));
        state.start((ids[1].clone(), 0));
        // 60 applied + 100 loading: no room for it beside the big one.
        assert!(!state.admits(&(ids[2].clone(), 0)));
        state.end(&(ids[1].clone(), 0), true);
        assert!(state.admits(&(ids[2].clone(), 0)));
    }

    #[test]
    fn two_images_at_a_time_never_hold_more_than_the_budget() {
        // Random sizes and random moments at which loads end, for a fixed
        // set of seeds: the disk held never passes the one-at-a-time peak.
        let mut early_starts = 0;
        for seed in 1..200u64 {
            let mut rng = seed;
            let mut next = |n: u64| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (rng >> 33) % n
            };
            let mut images: Vec<ImageLoads> = (0..2 + next(4))
                .map(|_| ImageLoads {
                    loads: (0..1 + next(4))
                        .map(|_| {
                            let usage = 1 + next(100);
                            layer(usage, 1 + next(usage + 1))
                        })
                        .collect(),
                    after: vec![],
                })
                .collect();
            if seed % 2 == 1 {
                // Some layers could go inflated, with a larger copy: those
                // picked leave the one-at-a-time peak where it was.
                let alternatives: Vec<Vec<Option<u64>>> = images
                    .iter()
                    .map(|image| {
                        image
                            .loads
                            .iter()
                            .map(|l| (next(3) > 0).then(|| l.temp + next(2 * l.usage + 1)))
                            .collect()
                    })
                    .collect();
                let before = install_peak(&images, 1);
                inflate_within_peak(&mut images, &alternatives);
                assert_eq!(install_peak(&images, 1), before, "seed {seed}");
            }
            let ids: Vec<Digest> = (0..images.len() as u8).map(|i| digest(100 + i)).collect();
            let keyed: Vec<(Digest, usize, &ImageLoads)> = ids
                .iter()
                .zip(&images)
                .map(|(id, image)| (id.clone(), 0, image))
                .collect();
            let budget = LoadBudget::new(&keyed);
            let peak = budget.peak;
            let mut state = BudgetState::new(budget);
            // Two workers take images in order; each loads its image's
            // layers in order; a started load ends at a random later step.
            let mut queue: std::collections::VecDeque<usize> = (0..images.len()).collect();
            // A worker's load: not started, streaming early, or applying.
            #[derive(Clone, Copy, PartialEq)]
            enum Phase {
                Waiting,
                Early,
                Applying,
            }
            let mut workers: Vec<Option<(usize, usize, Phase)>> = vec![None, None];
            let held_now = |state: &BudgetState, applied: u64| {
                state
                    .loading
                    .iter()
                    .map(|(k, l)| {
                        if state.early.as_ref() == Some(k) {
                            l.temp
                        } else {
                            l.usage + l.temp
                        }
                    })
                    .sum::<u64>()
                    + applied
            };
            let (mut applied, mut steps) = (0u64, 0);
            loop {
                steps += 1;
                assert!(steps < 10_000, "seed {seed}: stuck");
                for w in workers.iter_mut() {
                    if w.is_none() {
                        *w = queue.pop_front().map(|i| (i, 0, Phase::Waiting));
                    }
                }
                if workers.iter().all(Option::is_none) {
                    break;
                }
                let w = next(2) as usize;
                let Some((image, index, phase)) = workers[w] else {
                    continue;
                };
                let key = (ids[image].clone(), index);
                let load = images[image].loads[index];
                let started = match phase {
                    Phase::Waiting if state.admits(&key) => {
                        state.start(key.clone());
                        Some(Phase::Applying)
                    }
                    // Early streams on odd seeds only: the even ones keep
                    // the plain way covered.
                    Phase::Waiting if seed % 2 == 1 && state.admits_early(&key) => {
                        state.start_early(key.clone());
                        early_starts += 1;
                        Some(Phase::Early)
                    }
                    Phase::Early if state.admits_apply(&key) => {
                        state.apply(&key);
                        Some(Phase::Applying)
                    }
                    _ => None,
                };
                if let Some(phase) = started {
                    workers[w] = Some((image, index, phase));
                    let held = held_now(&state, applied);
                    assert!(held <= peak, "seed {seed}: {held} held, peak {peak}");
                } else if phase == Phase::Applying && next(3) == 0 {
                    state.end(&key, true);
                    applied += load.usage;
                    workers[w] = if index + 1 < images[image].loads.len() {
                        Some((image, index + 1, Phase::Waiting))
                    } else {
                        state.image_done(&ids[image]);
                        None
                    };
                }
            }
        }
        assert!(early_starts > 0, "no archive streamed early");
    }

    #[test]
    fn early_layers_go_inflated_where_that_keeps_the_peak() {
        // The pull app's shape: a big layer that does not compress and a
        // small one that does, in each of three images.
        let image = |first: bool| ImageLoads {
            loads: if first {
                vec![layer(1, 1), layer(44, 44), layer(13, 10)]
            } else {
                vec![layer(44, 44), layer(13, 10)]
            },
            after: vec![],
        };
        let alternatives = |first: bool| {
            let mut temps = vec![Some(45), Some(13)];
            if first {
                temps.insert(0, None);
            }
            temps
        };
        let mut images = vec![image(true), image(false), image(false)];
        let alternatives = vec![alternatives(true), alternatives(false), alternatives(false)];
        let before = install_peak(&images, 1);
        assert_eq!(before, 1 + 57 + 57 + 44 + 44);
        let switched = inflate_within_peak(&mut images, &alternatives);
        // All but the last image's big layer: inflated, it would pass the
        // peak (1 + 57 + 57 + 44 + 45).
        assert_eq!(switched, vec![(0, 1), (0, 2), (1, 0), (1, 1), (2, 1)]);
        assert_eq!(images[2].loads[0].temp, 44);
        assert_eq!(images[2].loads[1].temp, 13);
        assert_eq!(install_peak(&images, 1), before);
        // No alternative, nothing switched.
        let mut plain = vec![image(true), image(false)];
        assert!(inflate_within_peak(&mut plain, &[vec![], vec![None, None]]).is_empty());
    }

    #[test]
    fn the_next_archive_streams_early_while_the_engine_applies_one() {
        // The files app's shape (MB): a base and a big layer in the first
        // image, one layer in each of two more; the first three inflated.
        let ids: Vec<Digest> = (20..23).map(digest).collect();
        let first = ImageLoads {
            loads: vec![layer(2, 2), layer(79, 67)],
            after: vec![],
        };
        let a = ImageLoads {
            loads: vec![layer(63, 63)],
            after: vec![],
        };
        let b = ImageLoads {
            loads: vec![layer(63, 23)],
            after: vec![],
        };
        let budget = LoadBudget::new(&[
            (ids[0].clone(), 0, &first),
            (ids[1].clone(), 1, &a),
            (ids[2].clone(), 1, &b),
        ]);
        assert_eq!(budget.peak, 2 + 79 + 63 + 63 + 23);
        let mut state = BudgetState::new(budget);
        let [base, c, a, b] = [(0, 0), (0, 1), (1, 1), (2, 1)].map(|(i, k)| (ids[i].clone(), k));
        assert!(state.admits(&base));
        state.start(base.clone());
        state.end(&base, true);
        assert!(state.admits(&c));
        state.start(c.clone());
        // Applied beside c, a would pass the peak; its archive alone fits,
        // and a fits applied once c is.
        assert!(!state.admits(&a));
        assert!(state.admits_early(&a));
        state.start_early(a.clone());
        // Nothing else starts while a streams early, and a waits for c.
        assert!(!state.admits(&b) && !state.admits_early(&b));
        assert!(!state.admits_apply(&a));
        state.end(&c, true);
        assert!(state.admits_apply(&a));
        state.apply(&a);
        // b's archive (as stored) fits beside a being applied: to the byte.
        assert!(!state.admits(&b));
        assert!(state.admits_early(&b));
        state.start_early(b.clone());
        state.end(&a, true);
        assert!(state.admits_apply(&b));
        state.apply(&b);
        state.end(&b, true);
        assert_eq!(state.applied, 2 + 79 + 63 + 63);
    }

    #[test]
    fn an_early_load_that_fails_leaves_nothing_held() {
        let (ids, budget) = three_images();
        let mut state = BudgetState::new(budget);
        let first = (ids[0].clone(), 0);
        state.start(first.clone());
        let other = (ids[1].clone(), 1);
        assert!(state.admits_early(&other));
        state.start_early(other.clone());
        assert!(!state.admits(&(ids[2].clone(), 1)));
        state.end(&other, false);
        assert!(state.early.is_none());
        assert_eq!(state.loading.len(), 1);
        assert_eq!(state.ended(&other), Some(false));
        assert!(state.admits(&(ids[2].clone(), 1)));
    }

    #[test]
    fn temp_copy_counts_every_file_of_the_archive_in_blocks() {
        // Two layers of 1 byte and 5000 bytes, a 300-byte config, 4 KiB blocks:
        // import dir + manifest + config + 2 x (dir + layer.tar).
        let bytes = load_temp_bytes(&[1, 5000], 300, 4096);
        assert_eq!(bytes, 4096 + 4096 + 4096 + (4096 + 4096) + (4096 + 8192));
        assert_eq!(load_temp_bytes(&[], 300, 4096), 3 * 4096);
        // A file over 1 MiB may need an extent block.
        assert_eq!(
            load_temp_bytes(&[2 << 20], 300, 4096),
            3 * 4096 + 4096 + (2 << 20) + 4096
        );
        assert_eq!(load_temp_bytes(&[1 << 63, 1 << 63], 300, 4096), u64::MAX);
        assert_eq!(load_temp_bytes(&[u64::MAX], u64::MAX, 4096), u64::MAX);
    }
}
