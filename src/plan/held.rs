//! What the plan knows of how the engine stores and loads images: the
//! layers it holds (by chain), and the temporary disk a load takes. The
//! engine's client fills [`HeldLayers`]; the plan only reads it.

use std::collections::HashSet;

use crate::Digest;
use crate::oci::digest::chain_ids;

/// Images loaded at once when space is plentiful. Each image is loaded one
/// layer per load (the engine's temporary copy is one layer's file); two
/// images at once keep a small device's cores busy, and each more adds a
/// temporary copy to the disk's peak. When the update fits only with one
/// copy at a time, the plan says so ([`crate::plan::UpdatePlan::loads_at_once`]).
pub const IMAGES_AT_ONCE: usize = 2;

/// Whether a layer of this media type is handed to the engine as stored
/// (compressed) rather than inflated. See the README ("Installing into
/// Docker") for the measurements behind the choice.
pub fn sent_compressed(media_type: &str) -> bool {
    send_gzip() && media_type.ends_with("gzip")
}

/// The chosen path: gzip layers go to the engine as stored. For
/// measurements only, `STOWAGE_LOAD_LAYERS=plain` hands them inflated (the
/// check then counts that, too); see docs/benchmarks.md.
pub fn send_gzip() -> bool {
    static GZIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GZIP.get_or_init(|| std::env::var("STOWAGE_LOAD_LAYERS").map_or(true, |v| v != "plain"))
}

/// Whether the plan may choose whole images (each image's new layers in
/// one load, inflated) when their larger peak fits: the fastest way in.
/// `STOWAGE_LOAD_PATH=layers` keeps every install layer by layer (for
/// measurements, and for tests of that path's exact figures).
pub fn whole_images_allowed() -> bool {
    static WHOLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WHOLE.get_or_init(|| std::env::var("STOWAGE_LOAD_PATH").map_or(true, |v| v != "layers"))
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
