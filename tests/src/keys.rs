//! The signing key of the tests' "node" for checkpoint-core calls made directly (the shim has its own,
//! see [`crate::containerd`]), and the trust that accepts it.

use std::sync::{Arc, OnceLock};

use checkpoint_core::trust::{SigningKey, TrustedKeys};

/// One key per test process, which signs every bundle the tests seal through checkpoint-core.
pub fn node_key() -> Arc<SigningKey> {
    static KEY: OnceLock<Arc<SigningKey>> = OnceLock::new();
    Arc::clone(KEY.get_or_init(|| Arc::new(SigningKey::generate().expect("a random key"))))
}

/// Trust in [`node_key`] alone.
pub fn trusted() -> TrustedKeys {
    TrustedKeys::default().with(node_key().trusted())
}
