//! Signed targets: TUF metadata (root, targets, snapshot, timestamp) made and
//! verified with the `tough` crate.
//!
//! A TUF target is a small file, the JSON of [`TargetContent`] (the apps,
//! pinned by digest), whose `custom` fields carry what a fleet needs to pick
//! it: the hardware or group tag it is for and the minimum stowage version
//! that may apply it ([`TargetCustom`]).
//!
//! - [`repo`]: the release engineer's side: keys in files, a repository in a
//!   directory (`metadata/`, `targets/`, the plain layout python-tuf reads),
//!   threshold signing one key file at a time, root and key rotation, the
//!   timestamp re-signed, and publishing to a registry or an export.
//! - [`transport`]: where a device reads the metadata: the same OCI
//!   registry as the apps (one artifact per file, capped as manifests are)
//!   or an export's `tuf/` directory; both behind one tough `Transport`.
//! - [`client`]: the device's side: the full TUF client workflow from the
//!   trusted root installed at provisioning, the metadata it trusts kept
//!   durably under the stowage root (rollback protection), and the target
//!   checked against the device's tag and stowage's version.

pub mod client;
pub mod repo;
pub mod transport;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::oci::format;

/// Every metadata file and target file is capped as a manifest is: the
/// endless-data attack stops there, before anything is parsed.
pub const METADATA_CAP: u64 = format::MANIFEST_CAP;

/// The key of stowage's fields in a TUF target's `custom` object.
pub const CUSTOM_KEY: &str = "stowage";

/// The fields stowage reads from a TUF target's `custom.stowage`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetCustom {
    /// The hardware or group tag of the devices the target is for; `None`
    /// means every device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
    /// The oldest stowage that may apply the target ("0.2.0").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_stowage_version: Option<String>,
}

impl TargetCustom {
    pub fn to_custom(&self) -> HashMap<String, serde_json::Value> {
        let mut custom = HashMap::new();
        if let Ok(value) = serde_json::to_value(self) {
            custom.insert(CUSTOM_KEY.to_string(), value);
        }
        custom
    }

    pub fn from_custom(custom: &HashMap<String, serde_json::Value>) -> Result<Self, String> {
        match custom.get(CUSTOM_KEY) {
            None => Ok(TargetCustom::default()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| e.to_string()),
        }
    }
}

/// The lowest version of the running stowage is `have`'s, compared as dotted
/// numbers ("0.10.0" > "0.9.1"); a part that is not a number compares as 0.
pub fn version_at_least(have: &str, needs: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> {
        v.split(['.', '-', '+'])
            .take(3)
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    let (mut have, mut needs) = (parts(have), parts(needs));
    have.resize(3, 0);
    needs.resize(3, 0);
    have >= needs
}

/// What the device refused, and why. Each is a refusal of metadata or of a
/// target, never a failure to reach the repository: the exit code is
/// [`TrustError::EXIT_CODE`], and nothing was downloaded or changed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "refused: the {role} metadata of {repo} expired (the repository may be frozen at an old state; its {role} must be signed again)"
    )]
    Expired { repo: String, role: String },
    #[error(
        "refused: the {role} metadata of {repo} has {valid} valid signature(s) of the {threshold} its root requires (signature threshold not met)"
    )]
    Threshold {
        repo: String,
        role: String,
        threshold: u64,
        valid: u64,
    },
    #[error("refused: the {role} metadata of {repo} went backwards: {detail} (rollback)")]
    Rollback {
        repo: String,
        role: String,
        detail: String,
    },
    #[error("refused: {what} from {repo} does not match the signed metadata: {detail}")]
    HashMismatch {
        repo: String,
        what: String,
        detail: String,
    },
    #[error(
        "refused: the {role} metadata of {repo} is not the version the signed snapshot names: {detail} (mix-and-match)"
    )]
    Mismatch {
        repo: String,
        role: String,
        detail: String,
    },
    #[error("refused: {what} from {repo} is larger than the {cap}-byte limit (endless data)")]
    TooLarge {
        repo: String,
        what: String,
        cap: u64,
    },
    #[error(
        "refused: target {target:?} is not signed: the verified targets metadata of {repo} does not name it"
    )]
    NotSigned { repo: String, target: String },
    #[error(
        "refused: target {target:?} is for hardware {target_tag:?}, and this device's tag is {device_tag}"
    )]
    WrongHardware {
        target: String,
        target_tag: String,
        device_tag: String,
    },
    #[error(
        "refused: target {target:?} needs stowage {needs} or later, and this is stowage {have}"
    )]
    StowageTooOld {
        target: String,
        needs: String,
        have: String,
    },
    #[error(
        "refused: a trusted root is configured ({root}), and {what} is not signed: update from a signed target (`--target REPO:NAME` or `oci:DIR`)"
    )]
    Unsigned { root: String, what: String },
    #[error("refused: the metadata of {repo} does not verify: {detail}")]
    Invalid { repo: String, detail: String },
}

impl TrustError {
    /// The exit code of a refusal for trust (0 done, 1 failed, 2 usage,
    /// 100 does not fit).
    pub const EXIT_CODE: u8 = 101;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers() {
        assert!(version_at_least("0.10.0", "0.9.1"));
        assert!(version_at_least("1.0.0", "1"));
        assert!(version_at_least("0.1.0", "0.1.0"));
        assert!(!version_at_least("0.1.0", "0.2.0"));
        assert!(!version_at_least("0.1.9", "0.1.10"));
    }

    #[test]
    fn custom_fields_round_trip_under_their_key() {
        let custom = TargetCustom {
            hardware: Some("rpi4".into()),
            min_stowage_version: Some("0.2.0".into()),
        };
        let map = custom.to_custom();
        assert_eq!(map[CUSTOM_KEY]["hardware"], "rpi4");
        assert_eq!(TargetCustom::from_custom(&map).unwrap(), custom);
        assert_eq!(
            TargetCustom::from_custom(&HashMap::new()).unwrap(),
            TargetCustom::default()
        );
        let bad = HashMap::from([(CUSTOM_KEY.to_string(), serde_json::json!(3))]);
        assert!(TargetCustom::from_custom(&bad).is_err());
    }
}
