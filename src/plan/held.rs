//! What the plan knows of how the engine stores and loads images: the
//! layers it holds (by chain), and the temporary disk a load takes. The
//! engine's client fills [`HeldLayers`]; the plan only reads it.

use std::collections::HashSet;

use crate::Digest;
use crate::oci::digest::chain_ids;

/// Images loaded at once by default. The engine writes each archive to a
/// temporary directory and then applies its layers one by one, on about one
/// core; two loads keep a small device's cores busy, and each more adds a
/// temporary copy to the disk's peak. The fit check counts this many copies.
pub const IMAGES_AT_ONCE: usize = 2;

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
    // Each layer sent: its directory and its layer.tar.
    sent_layer_sizes
        .iter()
        .map(|size| block_size.saturating_add(round(*size)))
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
    fn temp_copy_counts_every_file_of_the_archive_in_blocks() {
        // Two layers of 1 byte and 5000 bytes, a 300-byte config, 4 KiB blocks:
        // import dir + manifest + config + 2 x (dir + layer.tar).
        let bytes = load_temp_bytes(&[1, 5000], 300, 4096);
        assert_eq!(bytes, 4096 + 4096 + 4096 + (4096 + 4096) + (4096 + 8192));
        assert_eq!(load_temp_bytes(&[], 300, 4096), 3 * 4096);
        assert_eq!(load_temp_bytes(&[1 << 63, 1 << 63], 300, 4096), u64::MAX);
        assert_eq!(load_temp_bytes(&[u64::MAX], u64::MAX, 4096), u64::MAX);
    }
}
