//! The local tags stowage loads images under, and the engine's rules for the
//! references `docker load` accepts. References are parsed with the one
//! grammar of [`crate::oci::reference`].

use crate::oci::reference::{ImageRef, InvalidReference};

use super::DockerError;

/// The local `name:tag` under which stowage loads the image a compose file
/// pins as `NAME@sha256:<hex>`: `NAME:stowage-sha256-<hex>` (79-character tag,
/// within Docker's 128).
///
/// Why: `docker load` only creates `name:tag` references, and an unpatched
/// engine has no way to record `NAME@sha256:...` without pulling from a
/// registry, so compose would try to pull a digest-pinned image. stowage
/// therefore loads each image under this tag and starts the app with an
/// override file that maps every service to it (see `compose`). The tag keeps
/// the repository name, so `docker images` says what the image is, and it
/// carries the whole pinned digest, so the mapping is exact and a tag
/// starting with `stowage-` marks an image stowage loaded.
pub fn local_tag_for(pinned: &str) -> Result<String, DockerError> {
    let invalid = |reason: String| DockerError::InvalidReference {
        reference: pinned.to_string(),
        reason,
    };
    let reference: ImageRef = pinned
        .parse()
        .map_err(|e: InvalidReference| invalid(e.reason))?;
    // A pinned reference may keep its tag (`repo:v1@sha256:...`); the digest wins.
    let Some(digest) = &reference.digest else {
        return Err(invalid(
            "it is not pinned by digest (NAME@sha256:...)".to_string(),
        ));
    };
    Ok(format!(
        "{}:stowage-sha256-{}",
        reference.familiar_name(),
        digest.hex()
    ))
}

/// Checks a `name:tag` reference that `docker load` accepts: a tag, and no
/// digest (the engine's load cannot create digest references).
pub(super) fn validate_tag_reference(reference: &str) -> Result<(), String> {
    let parsed: ImageRef = reference.parse().map_err(|e: InvalidReference| e.reason)?;
    if parsed.digest.is_some() {
        return Err("docker load cannot create digest references; use a name:tag".into());
    }
    if parsed.tag.is_none() {
        return Err("it has no :tag".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_tag_keeps_the_repository_and_the_whole_digest() {
        let hex = "a".repeat(64);
        assert_eq!(
            local_tag_for(&format!("registry.local:5000/team/app@sha256:{hex}")).unwrap(),
            format!("registry.local:5000/team/app:stowage-sha256-{hex}")
        );
        assert_eq!(
            local_tag_for(&format!("registry.local:5000/app:v3@sha256:{hex}")).unwrap(),
            format!("registry.local:5000/app:stowage-sha256-{hex}")
        );
        let tag = local_tag_for(&format!("app@sha256:{hex}")).unwrap();
        assert!(validate_tag_reference(&tag).is_ok());
    }

    #[test]
    fn local_tag_refuses_what_is_not_pinned() {
        for bad in [
            "registry.local/app:v3",
            "registry.local/app@sha256:abc",
            "Registry.local/App@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(local_tag_for(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn tag_references_are_checked_like_the_engine() {
        assert!(validate_tag_reference("localhost:5000/a/b:v1").is_ok());
        assert!(validate_tag_reference("localhost:5000/a/b").is_err());
        assert!(validate_tag_reference("a/b:").is_err());
        assert!(validate_tag_reference(&format!("a:{}", "x".repeat(129))).is_err());
        assert!(validate_tag_reference("a@sha256:00:x").is_err());
    }
}
