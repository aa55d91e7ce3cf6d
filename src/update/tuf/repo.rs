//! The release engineer's side: a TUF repository kept in a directory, keys
//! kept in files, and threshold signing one key file at a time.
//!
//! ```text
//! REPO/metadata/   N.root.json (every version), root.json (the newest),
//!                  N.targets.json, N.snapshot.json, timestamp.json
//! REPO/targets/    HASH.NAME: each target's file (the apps it names)
//! REPO/staged/     root.json, targets.json: the next version of a role,
//!                  collecting signatures until `publish` takes it
//! ```
//!
//! `metadata/` and `targets/` are the plain layout every TUF client reads
//! (consistent snapshots); `publish` copies them to a registry or an export.
//! Private keys are PKCS#8 files (ed25519, or ECDSA P-256 made elsewhere)
//! that never leave the machine that signs; a role's public keys go into the
//! root from `KEY.pub.json` files (or from the private key when at hand).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::key::Key;
use tough::schema::{
    Hashes, Metafile, Role, RoleKeys, RoleType, Root, Signature, Signed, Snapshot, Target, Targets,
    Timestamp,
};
use tough::sign::Sign;

use crate::Digest;
use crate::fsutil::{ensure_dir, write_atomic, write_atomic_mode};
use crate::update::target::TargetContent;
use crate::update::tuf::transport::{RepoFile, valid_target_name};
use crate::update::tuf::{METADATA_CAP, TargetCustom};

pub const SPEC_VERSION: &str = "1.0.0";

/// A key's id, as the root names it.
pub fn key_id(key: &Key) -> Result<String> {
    Ok(hex::encode(
        key.key_id().context("cannot compute the key id")?,
    ))
}

/// What `key gen` made.
#[derive(Debug, Serialize)]
pub struct KeyReport {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub keyid: String,
}

/// Makes an ed25519 key: the private key in `path` (PKCS#8 PEM, mode 0600,
/// never overwritten) and its public key in `PATH.pub.json`.
pub fn generate_key(path: &Path) -> Result<KeyReport> {
    use aws_lc_rs::signature::Ed25519KeyPair;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let der = Ed25519KeyPair::generate_pkcs8(&rng).context("cannot generate an ed25519 key")?;
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()));
    let signer = parse_private_key(pem.as_bytes(), path)?;
    let public = public_path(path);
    for p in [path, public.as_path()] {
        if std::fs::symlink_metadata(p).is_ok() {
            bail!("{} exists: a key is never overwritten", p.display());
        }
    }
    write_atomic_mode(path, pem.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let key = signer.tuf_key();
    write_atomic(&public, &serde_json::to_vec_pretty(&key)?)
        .with_context(|| format!("cannot write {}", public.display()))?;
    Ok(KeyReport {
        private_key: path.to_path_buf(),
        public_key: public,
        keyid: key_id(&key)?,
    })
}

fn public_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_os_string();
    name.push(".pub.json");
    PathBuf::from(name)
}

fn parse_private_key(bytes: &[u8], path: &Path) -> Result<Box<dyn Sign>> {
    let der = match pem::parse(bytes) {
        Ok(p) if p.tag() == "PRIVATE KEY" => p.into_contents(),
        Ok(p) => bail!(
            "{}: a {} is not a PKCS#8 private key",
            path.display(),
            p.tag()
        ),
        Err(_) => bytes.to_vec(),
    };
    let key = tough::sign::parse_keypair(&der).with_context(|| {
        format!(
            "{} is not an ed25519 or ECDSA P-256 PKCS#8 key",
            path.display()
        )
    })?;
    Ok(Box::new(key))
}

/// A private key file, to sign with.
pub struct SigningKey {
    pub path: PathBuf,
    pub signer: Box<dyn Sign>,
    pub keyid: String,
}

impl SigningKey {
    pub fn load(path: &Path) -> Result<SigningKey> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
        let signer = parse_private_key(&bytes, path)?;
        let keyid = key_id(&signer.tuf_key())?;
        Ok(SigningKey {
            path: path.to_path_buf(),
            signer,
            keyid,
        })
    }
}

/// A public key from a `.pub.json` file, or from a private key file.
pub fn load_public_key(path: &Path) -> Result<Key> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
    if let Ok(key) = serde_json::from_slice::<Key>(&bytes) {
        return Ok(key);
    }
    Ok(parse_private_key(&bytes, path)?.tuf_key())
}

/// When metadata expires: `90d`, `12h`, `30m`, `45s` from now, or an RFC
/// 3339 time (`2030-01-01T00:00:00Z`, which may be in the past: a test
/// repository's expired timestamp). Whole seconds: the TUF specification's
/// format has no fraction, and python-tuf refuses one.
pub fn parse_expiry(s: &str) -> Result<jiff::Timestamp> {
    let t = parse_time(s)?;
    jiff::Timestamp::from_second(t.as_second()).context("expiry out of range")
}

fn parse_time(s: &str) -> Result<jiff::Timestamp> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = number
        .parse()
        .with_context(|| format!("expiry {s:?}: give e.g. 90d, 12h, 30m or an RFC 3339 time"))?;
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        other => bail!("expiry {s:?}: unknown unit {other:?} (d, h, m, s)"),
    };
    let span = jiff::SignedDuration::from_secs(n.saturating_mul(seconds));
    jiff::Timestamp::now()
        .checked_add(span)
        .with_context(|| format!("expiry {s:?} is out of range"))
}

/// Default lifetimes of each role.
pub const ROOT_EXPIRY: &str = "365d";
pub const TARGETS_EXPIRY: &str = "90d";
pub const SNAPSHOT_EXPIRY: &str = "30d";
pub const TIMESTAMP_EXPIRY: &str = "1d";

/// A repository directory.
pub struct RepoDir {
    pub dir: PathBuf,
}

/// What a repository holds now, as `tuf show` and the editing verbs report it.
#[derive(Debug, Serialize)]
pub struct RepoReport {
    pub dir: PathBuf,
    pub roles: Vec<RoleReport>,
    pub staged: Vec<RoleReport>,
    pub targets: Vec<TargetReport>,
}

#[derive(Debug, Serialize)]
pub struct RoleReport {
    pub role: String,
    pub version: u64,
    pub expires: String,
    /// Valid signatures and the threshold, when the root is known.
    pub signatures: usize,
    pub threshold: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct TargetReport {
    pub name: String,
    pub sha256: String,
    pub custom: TargetCustom,
    pub apps: Vec<String>,
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            crate::oci::format::check_cap(
                &path.display().to_string(),
                bytes.len() as u64,
                METADATA_CAP,
            )?;
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not valid TUF metadata", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The bytes a role is written as (and hashed as, in the snapshot and the
/// timestamp).
fn role_bytes<T: Serialize>(signed: &Signed<T>) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(signed)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The role's keys and threshold in `root`.
fn role_keys(root: &Root, role: RoleType) -> Result<&RoleKeys> {
    root.roles
        .get(&role)
        .with_context(|| format!("the root names no {role} keys"))
}

/// Adds the signature of each key in `keys` that `holders` lets sign
/// `role` (a root is signed by its own root keys and by its predecessor's).
/// A key of no holder is an error that names it.
async fn add_signatures<T: Role + Serialize>(
    signed: &mut Signed<T>,
    holders: &[&Root],
    keys: &[&SigningKey],
) -> Result<()> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let data = signed
        .signed
        .canonical_form()
        .context("cannot serialise the role to sign it")?;
    for key in keys {
        let keyid: Decoded<Hex> = hex::decode(&key.keyid)?.into();
        let allowed = holders.iter().any(|root| {
            root.roles
                .get(&T::TYPE)
                .is_some_and(|r| r.keyids.contains(&keyid))
        });
        if !allowed {
            bail!(
                "key {} ({}) is not a {} key of this repository's root",
                key.path.display(),
                key.keyid,
                T::TYPE
            );
        }
        let sig = key
            .signer
            .sign(&data, &rng)
            .await
            .map_err(|e| anyhow::anyhow!("cannot sign with {}: {e}", key.path.display()))?;
        signed.signatures.retain(|s| s.keyid != keyid);
        signed.signatures.push(Signature {
            keyid,
            sig: sig.into(),
        });
    }
    Ok(())
}

fn count_valid<T: Role + Serialize>(root: &Root, signed: &Signed<T>) -> (usize, Option<u64>) {
    let threshold = root.roles.get(&T::TYPE).map(|r| r.threshold.get());
    let valid = match root.verify_role(signed) {
        Ok(()) => threshold.unwrap_or(0) as usize,
        Err(tough::schema::Error::SignatureThreshold { valid, .. }) => valid as usize,
        Err(_) => 0,
    };
    (valid, threshold)
}

fn next(version: NonZeroU64) -> NonZeroU64 {
    version.saturating_add(1)
}

impl RepoDir {
    pub fn new(dir: &Path) -> RepoDir {
        RepoDir {
            dir: dir.to_path_buf(),
        }
    }

    fn metadata(&self) -> PathBuf {
        self.dir.join("metadata")
    }
    fn staged(&self, role: &str) -> PathBuf {
        self.dir.join("staged").join(format!("{role}.json"))
    }
    fn ensure_dirs(&self) -> Result<()> {
        for d in ["metadata", "targets", "staged"] {
            ensure_dir(&self.dir.join(d), 0o755)?;
        }
        Ok(())
    }

    /// The newest version `N` of `N.ROLE.json` in `metadata/`.
    fn newest(&self, role: &str) -> Result<Option<u64>> {
        let mut newest = None;
        let entries = match std::fs::read_dir(self.metadata()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let suffix = format!(".{role}.json");
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(v) = name
                .strip_suffix(&suffix)
                .and_then(|v| v.parse::<u64>().ok())
            {
                newest = newest.max(Some(v));
            }
        }
        Ok(newest)
    }

    fn published<T: DeserializeOwned>(&self, role: &str) -> Result<Option<Signed<T>>> {
        match self.newest(role)? {
            Some(v) => read_json(&self.metadata().join(format!("{v}.{role}.json"))),
            None => Ok(None),
        }
    }

    /// The newest published root.
    pub fn root(&self) -> Result<Signed<Root>> {
        self.published("root")?.with_context(|| {
            format!(
                "{} has no published root: `stowage tuf init`, sign it, then `stowage tuf publish`",
                self.dir.display()
            )
        })
    }

    fn staged_root(&self) -> Result<Option<Signed<Root>>> {
        read_json(&self.staged("root"))
    }

    /// The root that signs the other roles from the next publish on: the
    /// staged one when there is one.
    fn next_root(&self) -> Result<Signed<Root>> {
        match self.staged_root()? {
            Some(r) => Ok(r),
            None => self.root(),
        }
    }

    fn write_staged<T: Serialize>(&self, role: &str, signed: &Signed<T>) -> Result<()> {
        self.ensure_dirs()?;
        write_atomic(&self.staged(role), &role_bytes(signed)?)?;
        Ok(())
    }

    /// Stages root version 1 with the given keys; the root keys then sign
    /// it (`sign --role root`), one file each.
    pub fn init(
        &self,
        keys: &HashMap<RoleType, (Vec<Key>, u64)>,
        expires: jiff::Timestamp,
    ) -> Result<()> {
        if self.newest("root")?.is_some() || self.staged("root").exists() {
            bail!("{} already holds a repository", self.dir.display());
        }
        let mut root = Root {
            spec_version: SPEC_VERSION.to_string(),
            consistent_snapshot: true,
            version: NonZeroU64::MIN,
            expires,
            keys: HashMap::new(),
            roles: HashMap::new(),
            _extra: HashMap::new(),
        };
        for role in [
            RoleType::Root,
            RoleType::Targets,
            RoleType::Snapshot,
            RoleType::Timestamp,
        ] {
            let Some((role_keys, threshold)) = keys.get(&role) else {
                bail!("give at least one {role} key");
            };
            set_role(&mut root, role, role_keys, Some(*threshold))?;
        }
        self.write_staged(
            "root",
            &Signed {
                signed: root,
                signatures: Vec::new(),
            },
        )
    }

    /// Stages the next root with `role`'s keys changed: `add` and `remove`
    /// (public keys), and its threshold.
    pub fn rotate(
        &self,
        role: RoleType,
        add: &[Key],
        remove: &[String],
        threshold: Option<u64>,
        expires: Option<jiff::Timestamp>,
    ) -> Result<()> {
        let mut root = match self.staged_root()? {
            Some(staged) => staged.signed,
            None => {
                let mut root = self.root()?.signed;
                root.version = next(root.version);
                root
            }
        };
        let entry = root.roles.entry(role).or_insert_with(|| RoleKeys {
            keyids: Vec::new(),
            threshold: NonZeroU64::MIN,
            _extra: HashMap::new(),
        });
        for id in remove {
            let before = entry.keyids.len();
            entry.keyids.retain(|k| hex::encode(k) != *id);
            if entry.keyids.len() == before {
                bail!("key {id} is not a {role} key of the root");
            }
        }
        let mut keys: Vec<Key> = entry
            .keyids
            .iter()
            .filter_map(|id| root.keys.get(id).cloned())
            .collect();
        keys.extend(add.iter().cloned());
        let threshold = threshold.or_else(|| root.roles.get(&role).map(|r| r.threshold.get()));
        set_role(&mut root, role, &keys, threshold)?;
        // Keys no role uses any more leave the root.
        let used: Vec<Decoded<Hex>> = root.roles.values().flat_map(|r| r.keyids.clone()).collect();
        root.keys.retain(|id, _| used.contains(id));
        if let Some(e) = expires {
            root.expires = e;
        }
        self.write_staged(
            "root",
            &Signed {
                signed: root,
                signatures: Vec::new(),
            },
        )
    }

    fn staged_targets(&self) -> Result<Signed<Targets>> {
        if let Some(staged) = read_json(&self.staged("targets"))? {
            return Ok(staged);
        }
        let signed = match self.published::<Targets>("targets")? {
            Some(mut current) => {
                current.signed.version = next(current.signed.version);
                current.signed
            }
            None => Targets::new(
                SPEC_VERSION.to_string(),
                NonZeroU64::MIN,
                parse_expiry(TARGETS_EXPIRY)?,
            ),
        };
        Ok(Signed {
            signed,
            signatures: Vec::new(),
        })
    }

    /// Stages a target named `name` naming `apps` (pinned references).
    pub fn add_target(
        &self,
        name: &str,
        apps: Vec<String>,
        custom: &TargetCustom,
        expires: Option<jiff::Timestamp>,
    ) -> Result<TargetReport> {
        if !valid_target_name(name) {
            bail!("target name {name:?}: use letters, digits, '.', '_' and '-' (at most 100)");
        }
        let content = crate::oci::format::to_json(&TargetContent { apps: apps.clone() })?;
        let sha256 = Digest::of(&content).hex().to_string();
        self.ensure_dirs()?;
        let file = RepoFile::Target {
            sha256: sha256.clone(),
            name: name.to_string(),
        };
        write_atomic(&self.dir.join(file.path()), &content)?;
        let mut targets = self.staged_targets()?;
        targets.signatures.clear();
        targets.signed.targets.insert(
            tough::TargetName::new(name.to_string()).context("target name")?,
            Target {
                length: content.len() as u64,
                hashes: Hashes {
                    sha256: hex::decode(&sha256)?.into(),
                    _extra: HashMap::new(),
                },
                custom: custom.to_custom(),
                _extra: HashMap::new(),
            },
        );
        if let Some(e) = expires {
            targets.signed.expires = e;
        }
        self.write_staged("targets", &targets)?;
        Ok(TargetReport {
            name: name.to_string(),
            sha256,
            custom: custom.clone(),
            apps,
        })
    }

    /// Stages the targets without `name`.
    pub fn remove_target(&self, name: &str) -> Result<()> {
        let mut targets = self.staged_targets()?;
        let key = tough::TargetName::new(name.to_string()).context("target name")?;
        if targets.signed.targets.remove(&key).is_none() {
            bail!("the targets of {} name no {name:?}", self.dir.display());
        }
        targets.signatures.clear();
        self.write_staged("targets", &targets)
    }

    /// Adds the signatures of `keys` to the staged `role` (root or targets;
    /// the current targets are staged again when none are, to be signed
    /// by keys a rotation brought in).
    pub async fn sign(
        &self,
        role: RoleType,
        keys: &[SigningKey],
        expires: Option<jiff::Timestamp>,
    ) -> Result<()> {
        match role {
            RoleType::Root => {
                let mut staged = self.staged_root()?.with_context(|| {
                    format!(
                        "{} has no staged root to sign (`tuf init` or `tuf rotate`)",
                        self.dir.display()
                    )
                })?;
                if let Some(e) = expires {
                    staged.signed.expires = e;
                    staged.signatures.clear();
                }
                let previous = self.published::<Root>("root")?;
                let own = staged.signed.clone();
                let mut holders = vec![&own];
                if let Some(p) = &previous {
                    holders.push(&p.signed);
                }
                let keys: Vec<&SigningKey> = keys.iter().collect();
                add_signatures(&mut staged, &holders, &keys).await?;
                self.write_staged("root", &staged)
            }
            RoleType::Targets => {
                let root = self.next_root()?;
                let mut staged = self.staged_targets()?;
                if let Some(e) = expires {
                    staged.signed.expires = e;
                    staged.signatures.clear();
                }
                let keys: Vec<&SigningKey> = keys.iter().collect();
                add_signatures(&mut staged, &[&root.signed], &keys).await?;
                self.write_staged("targets", &staged)
            }
            other => {
                bail!("{other} is signed by `tuf publish` and `tuf timestamp` with their keys")
            }
        }
    }

    /// Takes the staged roles (each must meet its threshold), makes the next
    /// snapshot and timestamp signed with `keys`, and writes them all into
    /// `metadata/`. Returns the files a client will read, timestamp last.
    pub async fn commit(
        &self,
        keys: &[SigningKey],
        snapshot_expires: jiff::Timestamp,
        timestamp_expires: jiff::Timestamp,
    ) -> Result<()> {
        self.ensure_dirs()?;
        let previous = self.published::<Root>("root")?;
        let root = match self.staged_root()? {
            Some(staged) => {
                staged.signed.verify_role(&staged).map_err(|e| {
                    anyhow::anyhow!(
                        "the staged root is not signed by enough of its own root keys: {e}"
                    )
                })?;
                if let Some(p) = &previous {
                    if staged.signed.version != next(p.signed.version) {
                        bail!(
                            "the staged root is version {}, the next is {}",
                            staged.signed.version,
                            next(p.signed.version)
                        );
                    }
                    p.signed.verify_role(&staged).map_err(|e| {
                        anyhow::anyhow!(
                            "the staged root is not signed by enough of the previous root's keys: {e}"
                        )
                    })?;
                }
                let bytes = role_bytes(&staged)?;
                write_atomic(
                    &self
                        .metadata()
                        .join(format!("{}.root.json", staged.signed.version)),
                    &bytes,
                )?;
                write_atomic(&self.metadata().join("root.json"), &bytes)?;
                std::fs::remove_file(self.staged("root"))?;
                staged
            }
            None => previous.context("no root: `stowage tuf init` first")?,
        };
        let staged_targets = read_json::<Signed<Targets>>(&self.staged("targets"))?;
        let targets = match staged_targets {
            Some(staged) => {
                root.signed.verify_role(&staged).map_err(|e| {
                    anyhow::anyhow!("the staged targets are not signed by enough targets keys (`tuf sign --role targets`): {e}")
                })?;
                let bytes = role_bytes(&staged)?;
                write_atomic(
                    &self
                        .metadata()
                        .join(format!("{}.targets.json", staged.signed.version)),
                    &bytes,
                )?;
                std::fs::remove_file(self.staged("targets"))?;
                staged
            }
            None => self.published::<Targets>("targets")?.context(
                "no targets yet: `stowage tuf add-target`, then `tuf sign --role targets`",
            )?,
        };
        root.signed.verify_role(&targets).map_err(|e| {
            anyhow::anyhow!("the targets are not signed by enough of the root's targets keys (sign them again: `tuf sign --role targets`): {e}")
        })?;
        let targets_bytes = role_bytes(&targets)?;
        let targets_meta = Metafile {
            length: Some(targets_bytes.len() as u64),
            hashes: Some(Hashes {
                sha256: hex::decode(Digest::of(&targets_bytes).hex())?.into(),
                _extra: HashMap::new(),
            }),
            version: targets.signed.version,
            _extra: HashMap::new(),
        };
        let snapshot_version = match self.published::<Snapshot>("snapshot")? {
            Some(s) => next(s.signed.version),
            None => NonZeroU64::MIN,
        };
        let mut snapshot =
            Snapshot::new(SPEC_VERSION.to_string(), snapshot_version, snapshot_expires);
        snapshot
            .meta
            .insert("targets.json".to_string(), targets_meta);
        let mut snapshot = Signed {
            signed: snapshot,
            signatures: Vec::new(),
        };
        add_signatures(
            &mut snapshot,
            &[&root.signed],
            keys_for(&root.signed, RoleType::Snapshot, keys)?.as_slice(),
        )
        .await?;
        root.signed
            .verify_role(&snapshot)
            .map_err(|e| anyhow::anyhow!("give enough snapshot keys (--key): {e}"))?;
        let snapshot_bytes = role_bytes(&snapshot)?;
        write_atomic(
            &self
                .metadata()
                .join(format!("{snapshot_version}.snapshot.json")),
            &snapshot_bytes,
        )?;
        self.write_timestamp(
            &root.signed,
            &snapshot_bytes,
            snapshot_version,
            keys,
            timestamp_expires,
        )
        .await
    }

    async fn write_timestamp(
        &self,
        root: &Root,
        snapshot_bytes: &[u8],
        snapshot_version: NonZeroU64,
        keys: &[SigningKey],
        expires: jiff::Timestamp,
    ) -> Result<()> {
        let version = match read_json::<Signed<Timestamp>>(&self.metadata().join("timestamp.json"))?
        {
            Some(t) => next(t.signed.version),
            None => NonZeroU64::MIN,
        };
        let mut timestamp = Timestamp::new(SPEC_VERSION.to_string(), version, expires);
        timestamp.meta.insert(
            "snapshot.json".to_string(),
            Metafile {
                length: Some(snapshot_bytes.len() as u64),
                hashes: Some(Hashes {
                    sha256: hex::decode(Digest::of(snapshot_bytes).hex())?.into(),
                    _extra: HashMap::new(),
                }),
                version: snapshot_version,
                _extra: HashMap::new(),
            },
        );
        let mut timestamp = Signed {
            signed: timestamp,
            signatures: Vec::new(),
        };
        add_signatures(
            &mut timestamp,
            &[root],
            keys_for(root, RoleType::Timestamp, keys)?.as_slice(),
        )
        .await?;
        root.verify_role(&timestamp)
            .map_err(|e| anyhow::anyhow!("give enough timestamp keys (--key): {e}"))?;
        write_atomic(
            &self.metadata().join("timestamp.json"),
            &role_bytes(&timestamp)?,
        )?;
        Ok(())
    }

    /// Signs the next timestamp for the current snapshot (its expiry moved).
    pub async fn timestamp(&self, keys: &[SigningKey], expires: jiff::Timestamp) -> Result<()> {
        let root = self.root()?;
        let version = self
            .newest("snapshot")?
            .context("nothing published yet: `stowage tuf publish` first")?;
        let snapshot_bytes =
            std::fs::read(self.metadata().join(format!("{version}.snapshot.json")))?;
        let version = NonZeroU64::new(version).context("snapshot version 0")?;
        self.write_timestamp(&root.signed, &snapshot_bytes, version, keys, expires)
            .await
    }

    /// Verifies the repository as a device would, from its first root, and
    /// reads every target: what is published is what devices accept.
    pub async fn verify_all(&self) -> Result<()> {
        use crate::update::tuf::client::{classify, limits};
        use crate::update::tuf::transport::{Source, TufTransport, metadata_url, targets_url};
        use tough::IntoVec as _;
        let what = self.dir.display().to_string();
        let root = std::fs::read(self.metadata().join("1.root.json"))
            .with_context(|| format!("{what} has no metadata/1.root.json"))?;
        let transport = TufTransport::new(Source::Dir(self.dir.clone()), None);
        let repository = tough::RepositoryLoader::new(&root, metadata_url(), targets_url())
            .transport(transport)
            .limits(limits())
            .load()
            .await
            .map_err(|e| classify(e, &what))?;
        for name in repository.targets().signed.targets.keys() {
            if let Some(stream) = repository
                .read_target(name)
                .await
                .map_err(|e| classify(e, &what))?
            {
                stream.into_vec().await.map_err(|e| classify(e, &what))?;
            }
        }
        Ok(())
    }

    /// Every file a client may read: the roots, the newest targets and
    /// snapshot, the target files, then the timestamp.
    pub fn files(&self) -> Result<Vec<(RepoFile, Vec<u8>)>> {
        let mut files = Vec::new();
        let mut roots: Vec<u64> = Vec::new();
        for entry in std::fs::read_dir(self.metadata())? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(v) = name.strip_suffix(".root.json").and_then(|v| v.parse().ok()) {
                roots.push(v);
            }
        }
        roots.sort();
        let mut names: Vec<String> = roots.iter().map(|v| format!("{v}.root.json")).collect();
        if let Some(v) = self.newest("targets")? {
            names.push(format!("{v}.targets.json"));
        }
        if let Some(v) = self.newest("snapshot")? {
            names.push(format!("{v}.snapshot.json"));
        }
        let mut target_files = Vec::new();
        if let Some(targets) = self.published::<Targets>("targets")? {
            for (name, target) in &targets.signed.targets {
                target_files.push(RepoFile::Target {
                    sha256: hex::encode(&target.hashes.sha256),
                    name: name.raw().to_string(),
                });
            }
        }
        for file in target_files {
            let bytes = std::fs::read(self.dir.join(file.path()))
                .with_context(|| format!("cannot read target file {}", file.path().display()))?;
            files.push((file, bytes));
        }
        for name in names {
            let bytes = std::fs::read(self.metadata().join(&name))?;
            files.push((RepoFile::Metadata(name), bytes));
        }
        let timestamp = self.metadata().join("timestamp.json");
        if let Ok(bytes) = std::fs::read(&timestamp) {
            files.push((RepoFile::Metadata("timestamp.json".into()), bytes));
        }
        Ok(files)
    }

    /// The repository's roles, staged roles and targets.
    pub fn report(&self) -> Result<RepoReport> {
        let root = self.published::<Root>("root")?;
        let mut roles = Vec::new();
        let mut staged = Vec::new();
        fn report<T: Role + Serialize>(root: Option<&Root>, s: &Signed<T>) -> RoleReport {
            let (signatures, threshold) = match root {
                Some(r) => count_valid(r, s),
                None => (s.signatures.len(), None),
            };
            RoleReport {
                role: T::TYPE.to_string(),
                version: s.signed.version().get(),
                expires: s.signed.expires().to_string(),
                signatures,
                threshold,
            }
        }
        let r = root.as_ref().map(|r| &r.signed);
        if let Some(root) = &root {
            roles.push(report(r, root));
        }
        let targets = self.published::<Targets>("targets")?;
        if let Some(t) = &targets {
            roles.push(report(r, t));
        }
        if let Some(s) = self.published::<Snapshot>("snapshot")? {
            roles.push(report(r, &s));
        }
        if let Some(t) = read_json::<Signed<Timestamp>>(&self.metadata().join("timestamp.json"))? {
            roles.push(report(r, &t));
        }
        if let Some(sr) = self.staged_root()? {
            let mut rep = report(Some(&sr.signed), &sr);
            if let Some(p) = r {
                let (valid, _) = count_valid(p, &sr);
                rep.signatures = rep.signatures.min(valid);
            }
            staged.push(rep);
        }
        if let Some(st) = read_json::<Signed<Targets>>(&self.staged("targets"))? {
            let next_root = self.next_root().ok();
            staged.push(report(next_root.as_ref().map(|r| &r.signed), &st));
        }
        let mut target_reports = Vec::new();
        if let Some(t) = &targets {
            for (name, target) in &t.signed.targets {
                let sha256 = hex::encode(&target.hashes.sha256);
                let file = RepoFile::Target {
                    sha256: sha256.clone(),
                    name: name.raw().to_string(),
                };
                let apps = std::fs::read(self.dir.join(file.path()))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<TargetContent>(&b).ok())
                    .map(|c| c.apps)
                    .unwrap_or_default();
                target_reports.push(TargetReport {
                    name: name.raw().to_string(),
                    sha256,
                    custom: TargetCustom::from_custom(&target.custom).unwrap_or_default(),
                    apps,
                });
            }
        }
        target_reports.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(RepoReport {
            dir: self.dir.clone(),
            roles,
            staged,
            targets: target_reports,
        })
    }
}

/// The keys of `keys` that sign `role` in `root` (others are for other roles).
fn keys_for<'a>(
    root: &Root,
    role: RoleType,
    keys: &'a [SigningKey],
) -> Result<Vec<&'a SigningKey>> {
    let ids = &role_keys(root, role)?.keyids;
    Ok(keys
        .iter()
        .filter(|k| ids.iter().any(|id| hex::encode(id) == k.keyid))
        .collect())
}

fn set_role(root: &mut Root, role: RoleType, keys: &[Key], threshold: Option<u64>) -> Result<()> {
    if keys.is_empty() {
        bail!("the {role} role needs at least one key");
    }
    let threshold = threshold.unwrap_or(1);
    if threshold == 0 || threshold > keys.len() as u64 {
        bail!(
            "the {role} threshold must be 1-{} (the number of its keys), not {threshold}",
            keys.len()
        );
    }
    let mut keyids = Vec::new();
    for key in keys {
        let id = key.key_id().context("cannot compute a key id")?;
        if !keyids.contains(&id) {
            keyids.push(id.clone());
        }
        root.keys.insert(id, key.clone());
    }
    if (keyids.len() as u64) < threshold {
        bail!(
            "the {role} role has {} distinct keys, fewer than its threshold {threshold}",
            keyids.len()
        );
    }
    root.roles.insert(
        role,
        RoleKeys {
            keyids,
            threshold: NonZeroU64::new(threshold).context("threshold 0")?,
            _extra: HashMap::new(),
        },
    );
    Ok(())
}

/// Where `publish` puts a repository.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A registry repository (the one the devices follow).
    Registry(crate::oci::reference::ImageRef),
    /// An export directory: the files go to `DIR/tuf/`.
    Export(PathBuf),
}

impl Destination {
    pub fn parse(s: &str) -> Result<Destination> {
        Ok(match s.strip_prefix("oci:") {
            Some(dir) => Destination::Export(PathBuf::from(dir)),
            None => Destination::Registry(s.parse()?),
        })
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Registry(r) => write!(f, "{}", r.name()),
            Destination::Export(d) => write!(f, "oci:{}", d.display()),
        }
    }
}

/// Copies `files` (the timestamp last, so that a client never sees a
/// timestamp naming a snapshot not there yet) to `to`.
pub async fn upload(
    client: &crate::oci::registry::RegistryClient,
    files: &[(RepoFile, Vec<u8>)],
    to: &Destination,
) -> Result<()> {
    match to {
        Destination::Registry(repo) => {
            for (file, bytes) in files {
                crate::update::tuf::transport::push_file(client, repo, file, bytes)
                    .await
                    .with_context(|| {
                        format!("cannot publish {} to {}", file.file_name(), repo.name())
                    })?;
            }
        }
        Destination::Export(dir) => {
            let dir = dir.join("tuf");
            let files = files.to_vec();
            crate::fsutil::blocking(move || -> Result<()> {
                for sub in ["metadata", "targets"] {
                    std::fs::create_dir_all(dir.join(sub))?;
                }
                for (file, bytes) in &files {
                    write_atomic(&dir.join(file.path()), bytes).with_context(|| {
                        format!("cannot write {}", dir.join(file.path()).display())
                    })?;
                }
                Ok(())
            })
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_whole_seconds_from_now_or_a_time() {
        let now = jiff::Timestamp::now().as_second();
        let day = parse_expiry("1d").unwrap();
        assert_eq!(day.subsec_nanosecond(), 0);
        assert!((day.as_second() - now - 86_400).abs() <= 2);
        assert_eq!(
            parse_expiry("2001-01-01T00:00:00Z").unwrap().as_second(),
            978_307_200
        );
        assert!(parse_expiry("12x").is_err());
        assert!(parse_expiry("soon").is_err());
    }
}
