//! Seeds and random numbers for tests. A randomised test takes its seed from
//! [`test_seed`], which prints it (libtest shows the output of a failed test)
//! with the command that replays the run: `STOWAGE_TEST_SEED=N` makes every
//! test that asks for a seed get N instead of a fresh one.
//!
//! [`Rng`] (SplitMix64) and [`noise`] are deterministic for a seed, so the
//! same seed gives the same decisions and the same bytes in every run and
//! with every version of the `rand` crate.

/// The environment variable that replays a run.
pub const SEED_VAR: &str = "STOWAGE_TEST_SEED";

/// The seed of the calling test: `STOWAGE_TEST_SEED` when set, else a fresh
/// random one. Printed either way, with the test's name when libtest runs it
/// on a thread of its own.
pub fn test_seed() -> u64 {
    let seed = match std::env::var(SEED_VAR) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={text:?} is not an unsigned integer")),
        Err(_) => {
            u64::from(stowage::fsutil::random_u32()) << 32
                | u64::from(stowage::fsutil::random_u32())
        }
    };
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or("TEST");
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| stem.split('-').next().unwrap_or("it").to_string())
        .unwrap_or_else(|| "it".into());
    println!(
        "seed {seed} (replay: {SEED_VAR}={seed} cargo test --test {binary} -- --exact {test})"
    );
    seed
}

/// A small seeded generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `range` (`start..end`, end excluded).
    pub fn range(&mut self, range: std::ops::Range<u64>) -> u64 {
        range.start + self.below(range.end.saturating_sub(range.start))
    }
}

/// `len` incompressible bytes, the same for the same seed (so a layer's gzip
/// is about as large as the file it holds, and two seeds never share a layer).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A seed derived from a text (FNV-1a), for content that must differ per
/// name but stay the same for the same name.
pub fn seed_of(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
