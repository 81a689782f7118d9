//! The CRIU configuration file runc hands to CRIU for a container: the one its spec names in the
//! `org.criu.config` annotation (runc's `/etc/criu/runc.conf` when it names none).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The spec annotation runc reads for the CRIU configuration file of a checkpoint or restore.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// The CRIU configuration file `spec` names, if any.
pub(crate) fn named(spec: &Value) -> Option<PathBuf> {
    spec.get("annotations")?.get(CRIU_CONFIG_ANNOTATION)?.as_str().map(PathBuf::from)
}

/// Points `spec` (read from `spec_path`) at the CRIU configuration file `config`.
pub(crate) fn point_at(spec: &mut Value, spec_path: &Path, config: &Path) -> Result<()> {
    let annotations = spec
        .as_object_mut()
        .map(|spec| spec.entry("annotations").or_insert_with(|| serde_json::json!({})))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| Error::Bundle {
            path: spec_path.to_path_buf(),
            reason: "it is not an OCI spec object".into(),
        })?;
    annotations.insert(CRIU_CONFIG_ANNOTATION.into(), config.display().to_string().into());
    Ok(())
}
