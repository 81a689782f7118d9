//! Whose a bundle is: the tenant its signed manifest records, the tenant a container is restored
//! into, and the grants that let one restore the other's bundle. See `docs/security.md`.
//!
//! A tenant is the Kubernetes namespace of a pod's container (`k8s/<namespace>`), else the containerd
//! namespace (`containerd/<namespace>`). A restore into another tenant is refused unless the node's
//! configuration grants that pair, or the restore carries a grant token: a statement `from → to`
//! (optionally for one reference, until a time) signed by a key the node trusts for grants (the
//! operator's).

use std::fmt;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::bundle::ContainerIdentity;
use crate::error::{Error, Result};
use crate::trust::{Provenance, Signature, SigningKey, TrustedKeys};

/// What a grant signature signs before the grant's bytes (see [`crate::trust`]).
const GRANT_CONTEXT: &[u8] = b"kybernate grant v1\0";
/// The prefix of a grant token.
const TOKEN_PREFIX: &str = "kgrant1.";

/// Who a bundle belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tenant {
    /// A Kubernetes namespace (containers of pods).
    Kubernetes(String),
    /// A containerd namespace (containers outside Kubernetes).
    Containerd(String),
}

impl Tenant {
    /// The tenant of a checkpointed (or to-be-restored) container: its pod's Kubernetes namespace,
    /// else its containerd namespace.
    pub fn of(identity: &ContainerIdentity) -> Self {
        match identity.kube_namespace.as_deref().filter(|n| !n.is_empty()) {
            Some(namespace) => Tenant::Kubernetes(namespace.to_string()),
            None => Tenant::Containerd(identity.namespace.clone()),
        }
    }

    /// Parses `k8s/<namespace>` or `containerd/<namespace>`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidOptions(format!("tenant {text:?} {reason}"));
        let (kind, name) =
            text.split_once('/').ok_or_else(|| bad("must be k8s/<namespace> or containerd/<namespace>"))?;
        if name.is_empty() || name.contains('/') {
            return Err(bad("needs one namespace name after the /"));
        }
        match kind {
            "k8s" => Ok(Tenant::Kubernetes(name.to_string())),
            "containerd" => Ok(Tenant::Containerd(name.to_string())),
            _ => Err(bad("must start with k8s/ or containerd/")),
        }
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tenant::Kubernetes(n) => write!(f, "k8s/{n}"),
            Tenant::Containerd(n) => write!(f, "containerd/{n}"),
        }
    }
}

impl Serialize for Tenant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Tenant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Tenant::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A statement that containers of tenant `to` may restore bundles of tenant `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Whose bundles.
    pub from: Tenant,
    /// Who may restore them.
    pub to: Tenant,
    /// Only a restore from exactly this reference (the `kybernate.io/restore-from` value); any
    /// reference when absent.
    #[serde(default)]
    pub reference: Option<String>,
    /// Until when (RFC 3339); forever when absent.
    #[serde(default)]
    pub not_after: Option<String>,
}

impl Grant {
    /// The grant as a token, signed by `key`: what an operator puts into a pod's
    /// `kybernate.io/restore-grant` annotation.
    pub fn issue(&self, key: &SigningKey) -> String {
        let payload = serde_json::to_vec(self).expect("a grant serializes");
        let signature = serde_json::to_vec(&key.sign(GRANT_CONTEXT, &payload)).expect("a signature serializes");
        format!("{TOKEN_PREFIX}{}.{}", URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(signature))
    }

    /// Reads a token, checking its signature against `keys`; the error says what is wrong with it.
    pub fn verify(token: &str, keys: &TrustedKeys) -> std::result::Result<(Grant, Provenance), String> {
        let body = token.trim().strip_prefix(TOKEN_PREFIX).ok_or("it is not a Kybernate grant (kgrant1.…)")?;
        let (payload, signature) = body.split_once('.').ok_or("it is cut short")?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| "its grant is not base64url")?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| "its signature is not base64url")?;
        let signature: Signature =
            serde_json::from_slice(&signature).map_err(|e| format!("its signature does not parse ({e})"))?;
        let provenance = keys.check(GRANT_CONTEXT, &payload, &signature)?;
        let grant: Grant = serde_json::from_slice(&payload).map_err(|e| format!("its grant does not parse ({e})"))?;
        Ok((grant, provenance))
    }

    /// Whether the grant covers a restore of `from`'s bundle into `to` from `reference` at `now`; why
    /// not, when it does not.
    fn covers(&self, from: &Tenant, to: &Tenant, reference: &str, now: SystemTime) -> std::result::Result<(), String> {
        if (&self.from, &self.to) != (from, to) {
            return Err(format!("it grants {} → {}, not {from} → {to}", self.from, self.to));
        }
        if self.reference.as_deref().is_some_and(|r| r != reference) {
            return Err(format!("it is for {:?} only", self.reference.as_deref().unwrap_or_default()));
        }
        if let Some(until) = &self.not_after {
            let until = humantime::parse_rfc3339_weak(until).map_err(|e| format!("its not_after {until:?}: {e}"))?;
            if now > until {
                return Err(format!("it expired at {}", humantime::format_rfc3339_seconds(until)));
            }
        }
        Ok(())
    }
}

/// Why a restore into another tenant (or the same) was allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The bundle is the restoring container's tenant's own.
    Own,
    /// The node's configuration grants the pair.
    Configured,
    /// A grant token signed by a trusted grant key allows it.
    Granted(Provenance),
}

/// Which tenants may restore which others' bundles on this node.
#[derive(Debug, Clone, Default)]
pub struct TenantPolicy {
    /// Pairs (`from`, `to`) the configuration allows.
    pub grants: Vec<(Tenant, Tenant)>,
    /// Keys whose grant tokens are accepted (the operator's); none by default.
    pub grant_keys: TrustedKeys,
}

impl TenantPolicy {
    /// Whether a container of `to` may restore `from`'s bundle from `reference`, with the grant
    /// `token` the restore carries, if any. The error names both tenants and the ways to allow it.
    pub fn check(&self, from: &Tenant, to: &Tenant, reference: &str, token: Option<&str>) -> Result<Access> {
        if from == to {
            return Ok(Access::Own);
        }
        if self.grants.iter().any(|(f, t)| f == from && t == to) {
            return Ok(Access::Configured);
        }
        let refuse = |why: String| Error::Refused {
            subject: format!("restoring {reference}"),
            reason: format!(
                "the bundle belongs to tenant {from}, and this container is in {to}{why}; a bundle is restored only \
                 into the tenant it was taken in, unless the shim config grants the pair (tenant_grants = [{{ from = \
                 \"{from}\", to = \"{to}\" }}]) or the pod carries a grant from the operator \
                 (kybernate.io/restore-grant)"
            ),
        };
        let Some(token) = token else { return Err(refuse(String::new())) };
        let (grant, provenance) = Grant::verify(token, &self.grant_keys)
            .map_err(|why| refuse(format!("; its restore grant was not accepted: {why}")))?;
        grant
            .covers(from, to, reference, SystemTime::now())
            .map_err(|why| refuse(format!("; its restore grant does not cover this: {why}")))?;
        Ok(Access::Granted(provenance))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn k8s(n: &str) -> Tenant {
        Tenant::Kubernetes(n.into())
    }

    #[test]
    fn tenants_parse_print_and_come_from_identities() {
        for text in ["k8s/team-a", "containerd/default"] {
            assert_eq!(Tenant::parse(text).unwrap().to_string(), text);
        }
        for bad in ["team-a", "k8s/", "pod/x", "k8s/a/b"] {
            assert!(Tenant::parse(bad).is_err(), "{bad}");
        }
        let mut identity = ContainerIdentity { namespace: "k8s.io".into(), ..Default::default() };
        assert_eq!(Tenant::of(&identity), Tenant::Containerd("k8s.io".into()));
        identity.kube_namespace = Some("team-a".into());
        assert_eq!(Tenant::of(&identity), k8s("team-a"));
    }

    #[test]
    fn a_grant_allows_exactly_the_pair_it_names() {
        let operator = SigningKey::generate().unwrap();
        let policy = TenantPolicy { grants: vec![], grant_keys: TrustedKeys::default().with(operator.trusted()) };
        let (a, b, c) = (k8s("a"), k8s("b"), k8s("c"));
        assert_eq!(policy.check(&a, &a, "/r", None).unwrap(), Access::Own);
        let err = policy.check(&a, &b, "/r", None).unwrap_err().to_string();
        assert!(err.contains("belongs to tenant k8s/a, and this container is in k8s/b"), "{err}");

        let grant = Grant { from: a.clone(), to: b.clone(), reference: None, not_after: None };
        let token = grant.issue(&operator);
        assert!(matches!(policy.check(&a, &b, "/r", Some(&token)).unwrap(), Access::Granted(_)));
        for (from, to) in [(&b, &a), (&a, &c), (&c, &b)] {
            let err = policy.check(from, to, "/r", Some(&token)).unwrap_err().to_string();
            assert!(err.contains("it grants k8s/a → k8s/b"), "{from}->{to}: {err}");
        }
        let bound = Grant { reference: Some("/r".into()), ..grant.clone() }.issue(&operator);
        policy.check(&a, &b, "/r", Some(&bound)).unwrap();
        assert!(policy.check(&a, &b, "/other", Some(&bound)).unwrap_err().to_string().contains("for \"/r\" only"));
        let past = humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(60)).to_string();
        let expired = Grant { not_after: Some(past), ..grant.clone() }.issue(&operator);
        assert!(policy.check(&a, &b, "/r", Some(&expired)).unwrap_err().to_string().contains("expired"));

        // a token by a key the node does not trust for grants, or altered, is refused
        let forged = grant.issue(&SigningKey::generate().unwrap());
        assert!(policy.check(&a, &b, "/r", Some(&forged)).unwrap_err().to_string().contains("does not trust"));
        let widened = Grant { to: c.clone(), ..grant.clone() };
        let (_, sig) = token.rsplit_once('.').unwrap();
        let tampered = format!("{TOKEN_PREFIX}{}.{sig}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&widened).unwrap()));
        assert!(policy.check(&a, &c, "/r", Some(&tampered)).unwrap_err().to_string().contains("altered"));

        let configured = TenantPolicy { grants: vec![(a.clone(), b.clone())], ..policy };
        assert_eq!(configured.check(&a, &b, "/r", None).unwrap(), Access::Configured);
        assert!(configured.check(&b, &a, "/r", None).is_err());
    }
}
