//! Who wrote a bundle: ed25519 keys, the signature over a sealed manifest, and the set of keys a node
//! trusts. See `docs/security.md`.
//!
//! A node signs every manifest it seals with its signing key (PKCS#8 PEM, as `openssl genpkey
//! -algorithm ed25519` writes it, or [`SigningKey::generate`]). The signature goes into
//! [`SIGNATURE_FILE`] beside the manifest; since the manifest holds the SHA-256 of every other file,
//! it covers the whole bundle. A restore checks it against the node's [`TrustedKeys`] (public keys in
//! SPKI PEM, `openssl pkey -pubout`) before any file is hashed, parsed or handed to CRIU.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The signature of a bundle's manifest, beside it (not listed in the manifest itself).
pub const SIGNATURE_FILE: &str = "kybernate.json.sig";
/// The only signature algorithm written and accepted.
pub const ALGORITHM: &str = "ed25519";
/// What a manifest signature signs before the manifest's bytes, so that a signature made for one
/// purpose (a grant, see [`crate::tenant`]) never passes for another.
const MANIFEST_CONTEXT: &[u8] = b"kybernate manifest v1\0";

/// A key's short name: the first 8 bytes of the SHA-256 of its 32 public key bytes, in hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    fn of(key: &ed25519_dalek::VerifyingKey) -> Self {
        KeyId(hex::encode(&Sha256::digest(key.as_bytes())[..8]))
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Key { path: path.to_path_buf(), reason: reason.into() }
}

/// A private ed25519 key that signs manifests (and grants). Its bytes are wiped when dropped and never
/// printed: `Debug` shows the key id only.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    id: KeyId,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a PKCS#8 PEM private key, which must be readable by its owner only.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).map_err(|e| {
            key_error(
                path,
                format!(
                    "{e}; create it with `make deps` or `kybernate-sidecar keygen --signing --out {}`",
                    path.display()
                ),
            )
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(key_error(
                path,
                format!(
                    "it is readable by others (mode {:o}); run `chmod 600 {}`",
                    meta.permissions().mode() & 0o777,
                    path.display()
                ),
            ));
        }
        let text = zeroize::Zeroizing::new(fs::read_to_string(path).map_err(|e| key_error(path, e.to_string()))?);
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(&text)
            .map_err(|e| key_error(path, format!("it is not an ed25519 private key in PKCS#8 PEM ({e})")))?;
        Ok(Self::from_key(key))
    }

    /// A new random key.
    pub fn generate() -> Result<Self> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::getrandom(seed.as_mut())
            .map_err(|e| Error::io("reading random bytes for a new key", std::io::Error::other(e.to_string())))?;
        Ok(Self::from_key(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    fn from_key(key: ed25519_dalek::SigningKey) -> Self {
        let id = KeyId::of(&key.verifying_key());
        SigningKey { key, id }
    }

    /// Writes the key to `path` (mode 0600, refusing to replace a file) and its public half to `public`
    /// (mode 0644, replaced if there).
    pub fn write(&self, path: &Path, public: &Path) -> Result<()> {
        let pem = self.key.to_pkcs8_pem(LineEnding::LF).map_err(|e| key_error(path, format!("encoding: {e}")))?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
            key_error(path, format!("{e}; a key that exists is never replaced: remove it first to rotate"))
        })?;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        if let Some(dir) = public.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        fs::write(public, self.public_pem()).map_err(|e| Error::io(format!("writing {}", public.display()), e))
    }

    /// The key id of the public half.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The public half, as SPKI PEM.
    pub fn public_pem(&self) -> String {
        self.key.verifying_key().to_public_key_pem(LineEnding::LF).expect("an ed25519 public key encodes")
    }

    /// The public half, as a key this node trusts.
    pub fn trusted(&self) -> TrustedKey {
        TrustedKey { key: self.key.verifying_key(), id: self.id.clone(), source: "this node's signing key".into() }
    }

    /// Signs `context` followed by `message`.
    pub(crate) fn sign(&self, context: &[u8], message: &[u8]) -> Signature {
        let signature = self.key.sign(&[context, message].concat());
        Signature {
            algorithm: ALGORITHM.into(),
            key_id: self.id.clone(),
            signature: URL_SAFE_NO_PAD.encode(signature.to_bytes()),
        }
    }

    /// The signature of a manifest's bytes, as [`SIGNATURE_FILE`] holds it.
    pub fn sign_manifest(&self, manifest: &[u8]) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.sign(MANIFEST_CONTEXT, manifest)).expect("a signature serializes")
    }
}

/// A signature and the key that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Signature {
    /// Always [`ALGORITHM`].
    pub algorithm: String,
    /// The signing key's id.
    pub key_id: KeyId,
    /// The 64 signature bytes, base64url without padding.
    pub signature: String,
}

/// A public key this node accepts signatures from, and where it came from (for messages).
#[derive(Debug, Clone)]
pub struct TrustedKey {
    key: ed25519_dalek::VerifyingKey,
    id: KeyId,
    source: String,
}

impl TrustedKey {
    /// Reads an SPKI PEM public key file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| key_error(path, e.to_string()))?;
        let key = ed25519_dalek::VerifyingKey::from_public_key_pem(&text)
            .map_err(|e| key_error(path, format!("it is not an ed25519 public key in SPKI PEM ({e})")))?;
        Ok(TrustedKey { id: KeyId::of(&key), key, source: path.display().to_string() })
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }
}

/// Who signed a bundle that was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Signed by this trusted key (its id and where the node has it from).
    Signed {
        /// The signing key's id.
        key_id: KeyId,
        /// The trusted key file (or "this node's signing key").
        source: String,
    },
    /// Unsigned, accepted because the node allows unsigned bundles.
    Unsigned,
}

/// The public keys whose signatures a node accepts, and whether it accepts unsigned bundles at all.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
    /// Accept bundles without a signature (`allow_unsigned`); a signature that is there must still
    /// verify.
    pub allow_unsigned: bool,
}

impl TrustedKeys {
    /// The keys in `paths`: each a PEM file, or a directory whose `*.pub` and `*.pem` files are read.
    /// A path that does not exist holds no keys; a file that is not a public key is an error.
    pub fn load(paths: &[PathBuf], allow_unsigned: bool) -> Result<Self> {
        let mut keys = Vec::new();
        for path in paths {
            if path.is_dir() {
                let mut files: Vec<PathBuf> = fs::read_dir(path)
                    .map_err(|e| key_error(path, e.to_string()))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "pub" || x == "pem"))
                    .collect();
                files.sort();
                for file in files {
                    keys.push(TrustedKey::load(&file)?);
                }
            } else if path.exists() {
                keys.push(TrustedKey::load(path)?);
            }
        }
        Ok(TrustedKeys { keys, allow_unsigned })
    }

    /// These keys and `key` too.
    pub fn with(mut self, key: TrustedKey) -> Self {
        if !self.keys.iter().any(|k| k.id == key.id) {
            self.keys.push(key);
        }
        self
    }

    /// The ids of the keys, for messages.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.to_string()).collect()
    }

    /// Checks `signature` (the bytes of a [`SIGNATURE_FILE`], or `None` when there is none) over
    /// `manifest`, the manifest's bytes, of the bundle `dir`.
    pub fn check_manifest(&self, dir: &Path, manifest: &[u8], signature: Option<&[u8]>) -> Result<Provenance> {
        let refuse = |reason: String| Error::Refused { subject: format!("bundle {}", dir.display()), reason };
        let Some(signature) = signature else {
            if self.allow_unsigned {
                tracing::warn!(bundle = %dir.display(), "restoring an unsigned bundle (allow_unsigned = true)");
                return Ok(Provenance::Unsigned);
            }
            return Err(refuse(format!(
                "it is not signed ({SIGNATURE_FILE} is missing), so nothing says which node wrote it; restore bundles \
                 written by Kybernate nodes whose keys this node trusts, or set allow_unsigned = true in the shim config \
                 to accept unsigned ones"
            )));
        };
        let signature: Signature = serde_json::from_slice(signature)
            .map_err(|e| refuse(format!("{SIGNATURE_FILE} does not parse ({e}); the bundle was altered")))?;
        self.check(MANIFEST_CONTEXT, manifest, &signature).map_err(refuse)
    }

    /// Checks that `signature` over `context` + `message` was made by one of these keys; the error
    /// says why not.
    pub(crate) fn check(
        &self,
        context: &[u8],
        message: &[u8],
        signature: &Signature,
    ) -> std::result::Result<Provenance, String> {
        if signature.algorithm != ALGORITHM {
            return Err(format!("it is signed with {:?}; only {ALGORITHM} is accepted", signature.algorithm));
        }
        let Some(key) = self.keys.iter().find(|k| k.id == signature.key_id) else {
            return Err(format!(
                "it is signed by key {}, which this node does not trust (trusted: {}); add that node's public key to \
                 trusted_keys in the shim config if it should be",
                signature.key_id,
                if self.keys.is_empty() { "none".to_string() } else { self.ids().join(", ") }
            ));
        };
        let bytes: [u8; 64] = URL_SAFE_NO_PAD
            .decode(&signature.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| "its signature is not 64 bytes of base64url".to_string())?;
        key.key
            .verify(&[context, message].concat(), &ed25519_dalek::Signature::from_bytes(&bytes))
            .map_err(|_| format!("its signature by key {} does not match its contents: it was altered", key.id))?;
        Ok(Provenance::Signed { key_id: key.id.clone(), source: key.source.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_signature_verifies_only_unchanged_and_by_a_trusted_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let signature = key.sign_manifest(b"{\"files\":{}}");
        let trusted = TrustedKeys::default().with(key.trusted());
        let ok = trusted.check_manifest(dir.path(), b"{\"files\":{}}", Some(&signature)).unwrap();
        assert_eq!(ok, Provenance::Signed { key_id: key.id().clone(), source: "this node's signing key".into() });

        let err = trusted.check_manifest(dir.path(), b"{\"files\":{ }}", Some(&signature)).unwrap_err().to_string();
        assert!(err.contains("does not match its contents"), "{err}");
        let other = TrustedKeys::default().with(SigningKey::generate().unwrap().trusted());
        let err = other.check_manifest(dir.path(), b"{\"files\":{}}", Some(&signature)).unwrap_err().to_string();
        assert!(err.contains(&format!("signed by key {}, which this node does not trust", key.id())), "{err}");
        let err = trusted.check_manifest(dir.path(), b"{}", None).unwrap_err().to_string();
        assert!(err.contains("is not signed") && err.contains("allow_unsigned"), "{err}");
        let lax = TrustedKeys { allow_unsigned: true, ..trusted.clone() };
        assert_eq!(lax.check_manifest(dir.path(), b"{}", None).unwrap(), Provenance::Unsigned);
        // allow_unsigned does not accept a bad signature
        assert!(lax.check_manifest(dir.path(), b"{ }", Some(&signature)).is_err());
        // a manifest signature is not a signature over the same bytes in another context
        let grant = key.sign(b"kybernate grant v1\0", b"{\"files\":{}}");
        let grant = serde_json::to_vec(&grant).unwrap();
        assert!(trusted.check_manifest(dir.path(), b"{\"files\":{}}", Some(&grant)).is_err());
    }

    #[test]
    fn keys_made_by_openssl_as_make_deps_makes_them_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = (dir.path().join("signing.key"), dir.path().join("signing.pub"));
        let openssl = |args: &[&str]| {
            let status = std::process::Command::new("openssl").args(args).status().expect("openssl (make deps)");
            assert!(status.success(), "openssl {args:?}: {status}");
        };
        openssl(&["genpkey", "-algorithm", "ed25519", "-out", private.to_str().unwrap()]);
        openssl(&["pkey", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
        fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
        let key = SigningKey::load(&private).unwrap();
        let trusted = TrustedKeys::load(&[public], false).unwrap();
        assert_eq!(trusted.ids(), vec![key.id().to_string()]);
        let signature = key.sign_manifest(b"{}");
        assert!(matches!(
            trusted.check_manifest(dir.path(), b"{}", Some(&signature)).unwrap(),
            Provenance::Signed { .. }
        ));
    }

    #[test]
    fn keys_round_trip_through_pem_files_and_private_ones_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = (dir.path().join("k/signing.key"), dir.path().join("trusted/node-a.pub"));
        let key = SigningKey::generate().unwrap();
        key.write(&private, &public).unwrap();
        assert_eq!(fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        let err = key.write(&private, &public).unwrap_err().to_string();
        assert!(err.contains("never replaced"), "{err}");
        let loaded = SigningKey::load(&private).unwrap();
        assert_eq!(loaded.id(), key.id());
        assert!(!format!("{loaded:?}").contains("key:"), "Debug shows the id only: {loaded:?}");

        let trusted = TrustedKeys::load(&[dir.path().join("trusted"), dir.path().join("absent")], false).unwrap();
        assert_eq!(trusted.ids(), vec![key.id().to_string()]);

        fs::set_permissions(&private, fs::Permissions::from_mode(0o640)).unwrap();
        let err = SigningKey::load(&private).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        fs::write(dir.path().join("trusted/junk.pub"), "not a key").unwrap();
        let err = TrustedKeys::load(&[dir.path().join("trusted")], false).unwrap_err().to_string();
        assert!(err.contains("junk.pub") && err.contains("SPKI PEM"), "{err}");
    }
}
