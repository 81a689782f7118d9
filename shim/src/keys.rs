//! The node's keys and restore policy as the configuration names them: the key that signs what this
//! shim seals, the keys whose bundles it restores, and the tenant grants (see `docs/security.md`).

use std::sync::Arc;

use checkpoint_core::tenant::TenantPolicy;
use checkpoint_core::trust::{SigningKey, TrustedKeys};

use crate::config::ShimConfig;
use crate::error::Result;

/// The node's signing key; an error (naming the fix) when it is missing or unusable, before anything
/// of a checkpoint has started.
pub fn signer(config: &ShimConfig) -> Result<Arc<SigningKey>> {
    Ok(Arc::new(SigningKey::load(&config.signing_key)?))
}

/// The keys whose signatures a restore accepts: `trusted_keys` and this node's own public key.
pub fn trusted(config: &ShimConfig) -> Result<TrustedKeys> {
    let keys = TrustedKeys::load(&config.trusted_keys, config.allow_unsigned)?;
    Ok(match SigningKey::load(&config.signing_key) {
        Ok(own) => keys.with(own.trusted()),
        Err(e) => {
            tracing::warn!(error = %e, "this node's signing key is unusable; its own bundles are not trusted");
            keys
        }
    })
}

/// Which tenants may restore which others' bundles: `tenant_grants`, and grant tokens signed by a key
/// in `grant_keys`.
pub fn tenant_policy(config: &ShimConfig) -> Result<TenantPolicy> {
    Ok(TenantPolicy { grants: config.tenant_grants(), grant_keys: TrustedKeys::load(&config.grant_keys, false)? })
}
