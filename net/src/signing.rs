//! Signed manifests: the engine signs every manifest it deploys with an ed25519 key of its
//! own, kept apart from its TLS keys; agents check the signature against the key they
//! pinned when they enrolled.
//!
//! Why a second key when the connection is already authenticated: TLS proves who is at the
//! other end of this connection, not that the engine's catalog made this version. Whoever
//! holds the TLS server key (or a relay in between, later) could otherwise hand a site any
//! image; with signatures they can only replay versions the engine signed, and each agent
//! refuses a version older than the newest it has applied for that image (a floor kept in
//! its database): TUF's arbitrary-image and rollback attacks.
//!
//! What is signed is the manifest id (BLAKE3 of its canonical encoding, which names the
//! global id, the version and every file's content hash), behind a context string so a
//! signature made here means nothing anywhere else.

use std::fmt;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::pki::{PkiError, write_private};

/// An ed25519 public key's length.
pub const PUBLIC_KEY_LEN: usize = 32;
/// An ed25519 signature's length.
pub const SIGNATURE_LEN: usize = 64;

/// Prefixed to what is signed: a signature over a manifest id is only that.
const CONTEXT: &[u8] = b"seedcast manifest signature v1\0";

/// The engine's manifest signing key.
pub struct ManifestSigner {
    key: Ed25519KeyPair,
}

impl fmt::Debug for ManifestSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ManifestSigner({})",
            hex::encode(&self.public_key()[..6])
        )
    }
}

/// A signature that does not verify (or is not one).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("manifest signature does not verify against the engine's signing key")]
pub struct BadSignature;

impl ManifestSigner {
    /// Load the key from `path` (PKCS#8), creating it (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, PkiError> {
        let io = |source| PkiError::Io {
            path: PathBuf::from(path),
            source,
        };
        let corrupt = || PkiError::Corrupt {
            path: path.to_path_buf(),
            what: "ed25519 signing key (PKCS#8)",
        };
        match std::fs::read(path) {
            Ok(bytes) => Ok(ManifestSigner {
                key: Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| corrupt())?,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pkcs8 =
                    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| corrupt())?;
                write_private(path, pkcs8.as_ref(), 0o600)?;
                Ok(ManifestSigner {
                    key: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| corrupt())?,
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.key
            .public_key()
            .as_ref()
            .try_into()
            .expect("ed25519 public keys are 32 bytes")
    }

    /// Sign a manifest id.
    pub fn sign(&self, manifest_id: &[u8; 32]) -> Vec<u8> {
        self.key.sign(&message(manifest_id)).as_ref().to_vec()
    }
}

/// Check `signature` over `manifest_id` against the engine's `public_key`.
pub fn verify(
    public_key: &[u8; PUBLIC_KEY_LEN],
    manifest_id: &[u8; 32],
    signature: &[u8],
) -> Result<(), BadSignature> {
    if signature.len() != SIGNATURE_LEN {
        return Err(BadSignature);
    }
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&message(manifest_id), signature)
        .map_err(|_| BadSignature)
}

fn message(manifest_id: &[u8; 32]) -> Vec<u8> {
    [CONTEXT, manifest_id.as_slice()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_key_and_manifest_and_the_key_persists() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("signing.key");
        let s = ManifestSigner::load_or_create(&p).unwrap();
        let again = ManifestSigner::load_or_create(&p).unwrap();
        assert_eq!(s.public_key(), again.public_key());
        let other = ManifestSigner::load_or_create(&dir.path().join("other.key")).unwrap();

        let id = [7u8; 32];
        let sig = s.sign(&id);
        assert_eq!(sig.len(), SIGNATURE_LEN);
        verify(&s.public_key(), &id, &sig).unwrap();
        assert_eq!(verify(&s.public_key(), &[8; 32], &sig), Err(BadSignature));
        assert_eq!(verify(&other.public_key(), &id, &sig), Err(BadSignature));
        let mut flipped = sig.clone();
        flipped[10] ^= 1;
        assert_eq!(verify(&s.public_key(), &id, &flipped), Err(BadSignature));
        for bad in [vec![], vec![0; 63], vec![0; 65], vec![0; 64]] {
            assert_eq!(verify(&s.public_key(), &id, &bad), Err(BadSignature));
        }
        // A file that is not a key is named, not replaced.
        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(
            ManifestSigner::load_or_create(&p),
            Err(PkiError::Corrupt { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("other.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
