//! `kybernate-install`: puts Kybernate's containerd shim and its containerd config drop-in on a node.
//!
//! It runs as the node DaemonSet's init container (deploy/node/daemonset.yaml) with the host's
//! `/usr/local/bin` and `/etc/containerd` mounted, and:
//!
//! - copies `containerd-shim-kybernate-v1` into the host's binary directory (containerd finds the shim
//!   on its PATH), mode 0755;
//! - writes `conf.d/kybernate-runtime.toml` into the host's containerd directory, mode 0644: the
//!   runtime handler `kybernate` (deploy/containerd/kybernate-runtime.toml for containerd 1.6 / 1.7,
//!   kybernate-runtime.v3.toml for containerd 2.x), read by containerd through an `imports` entry of
//!   its config.toml.
//!
//! Every file is written atomically (a temporary file in the same directory, fsynced, renamed over
//! the old one, and the directory fsynced): a running containerd or a starting shim sees the old
//! file or the new one, never part of one. A file whose content and mode are already right is not
//! touched, so running it again changes nothing. It does not edit config.toml and does not restart
//! containerd: it warns when config.toml imports no file that matches the drop-in, and says when a
//! changed drop-in needs a containerd restart.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, Result};

/// The shim's binary name: containerd runs `containerd-shim-kybernate-v1` for the runtime
/// `io.containerd.kybernate.v1`.
pub const SHIM_NAME: &str = "containerd-shim-kybernate-v1";
/// The drop-in's path under the containerd directory.
pub const DROP_IN: &str = "conf.d/kybernate-runtime.toml";
/// The drop-in for containerd 1.6 / 1.7 (config version 2).
pub const RUNTIME_V2: &str = include_str!("../../deploy/containerd/kybernate-runtime.toml");
/// The drop-in for containerd 2.x (config version 3).
pub const RUNTIME_V3: &str = include_str!("../../deploy/containerd/kybernate-runtime.v3.toml");
/// The shim's mode.
pub const SHIM_MODE: u32 = 0o755;
/// The drop-in's mode.
pub const DROP_IN_MODE: u32 = 0o644;
/// Where the host keeps containerd's configuration; `imports` entries name host paths.
pub const HOST_CONTAINERD_DIR: &str = "/etc/containerd";

/// containerd's configuration version, which picks the drop-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigVersion {
    /// Version 2: containerd 1.6 and 1.7.
    V2,
    /// Version 3: containerd 2.x.
    V3,
}

impl ConfigVersion {
    /// The drop-in's content for this version.
    pub fn drop_in(self) -> &'static str {
        match self {
            ConfigVersion::V2 => RUNTIME_V2,
            ConfigVersion::V3 => RUNTIME_V3,
        }
    }
}

/// What to install, and where.
#[derive(Clone, Debug)]
pub struct Options {
    /// The shim binary to copy (the one in the installer's image).
    pub shim: PathBuf,
    /// The host's binary directory, as mounted here.
    pub host_bin_dir: PathBuf,
    /// The host's containerd directory (`/etc/containerd`), as mounted here.
    pub host_containerd_dir: PathBuf,
    /// Which drop-in to write.
    pub config_version: ConfigVersion,
}

/// What happened to one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It did not exist and was written.
    Created,
    /// It existed with another content or mode and was replaced.
    Updated,
    /// It already had this content and mode; it was not written.
    Unchanged,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
        })
    }
}

/// What [`install`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Every file it is responsible for, with what happened to it.
    pub files: Vec<(PathBuf, Outcome)>,
    /// Things the operator of the node should know (nothing failed).
    pub warnings: Vec<String>,
}

impl Report {
    /// Whether any file was written.
    pub fn changed(&self) -> bool {
        self.files.iter().any(|(_, o)| *o != Outcome::Unchanged)
    }
}

/// Installs the shim and the drop-in (see the crate documentation).
pub fn install(options: &Options) -> Result<Report> {
    let shim = fs::read(&options.shim).with_context(|| format!("reading the shim {}", options.shim.display()))?;
    let bin_dir = &options.host_bin_dir;
    if !bin_dir.is_dir() {
        anyhow::bail!("the host binary directory {} is not a directory (is it mounted?)", bin_dir.display());
    }
    let containerd_dir = &options.host_containerd_dir;
    if !containerd_dir.is_dir() {
        anyhow::bail!("the host containerd directory {} is not a directory (is it mounted?)", containerd_dir.display());
    }
    let mut files = Vec::new();
    let shim_path = bin_dir.join(SHIM_NAME);
    let outcome = write_if_changed(&shim_path, &shim, SHIM_MODE)?;
    files.push((shim_path, outcome));

    let drop_in = containerd_dir.join(DROP_IN);
    let conf_d = drop_in.parent().expect("the drop-in has a directory");
    fs::create_dir_all(conf_d).with_context(|| format!("creating {}", conf_d.display()))?;
    let outcome = write_if_changed(&drop_in, options.config_version.drop_in().as_bytes(), DROP_IN_MODE)?;
    files.push((drop_in, outcome));

    let mut warnings = Vec::new();
    if let Some(warning) = import_warning(containerd_dir)? {
        warnings.push(warning);
    }
    if outcome != Outcome::Unchanged {
        warnings.push(format!(
            "restart containerd on this node to load the runtime `kybernate` (the drop-in was {outcome})"
        ));
    }
    Ok(Report { files, warnings })
}

/// Writes `data` with `mode` to `path` unless it is there already; atomically when it is written.
pub fn write_if_changed(path: &Path, data: &[u8], mode: u32) -> Result<Outcome> {
    let outcome = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {
            let same = meta.permissions().mode() & 0o7777 == mode
                && meta.len() == data.len() as u64
                && fs::read(path).with_context(|| format!("reading {}", path.display()))? == data;
            if same {
                return Ok(Outcome::Unchanged);
            }
            Outcome::Updated
        }
        // A symlink or anything else in the way is replaced by the file.
        Ok(_) => Outcome::Updated,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Outcome::Created,
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    };
    write_atomically(path, data, mode).with_context(|| format!("writing {}", path.display()))?;
    Ok(outcome)
}

/// Writes `path` through a temporary file next to it: write, fsync, rename, fsync the directory.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::other("no file name"))?;
    let tmp = dir.join(format!(".{}.kybernate-install-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        // A leftover of an installer killed at this pid is ours to replace.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(data)?;
        // The umask may have cleared bits of `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A warning when containerd's config.toml (in `containerd_dir`) does not import the drop-in.
pub fn import_warning(containerd_dir: &Path) -> Result<Option<String>> {
    let config = containerd_dir.join("config.toml");
    let host_drop_in = Path::new(HOST_CONTAINERD_DIR).join(DROP_IN);
    let advice = format!(
        "add `imports = [\"{}/*.toml\"]` at the top of {HOST_CONTAINERD_DIR}/config.toml, or merge {} into it",
        host_drop_in.parent().unwrap().display(),
        host_drop_in.display()
    );
    let text = match fs::read_to_string(&config) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Some(format!("containerd reads no drop-in without a config.toml: {advice}")))
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", config.display())),
    };
    let table: toml::Table = match text.parse() {
        Ok(table) => table,
        Err(e) => return Ok(Some(format!("{} is not valid TOML ({e}); cannot check its imports", config.display()))),
    };
    let imports: Vec<&str> = match table.get("imports") {
        Some(toml::Value::Array(items)) => items.iter().filter_map(|i| i.as_str()).collect(),
        _ => Vec::new(),
    };
    if imports.iter().any(|pattern| imports_path(pattern, &host_drop_in)) {
        Ok(None)
    } else {
        Ok(Some(format!(
            "{HOST_CONTAINERD_DIR}/config.toml imports {imports:?}, not {}: {advice}",
            host_drop_in.display()
        )))
    }
}

/// Whether containerd's `imports` entry `pattern` (a glob; relative to the config's directory)
/// names `path`.
fn imports_path(pattern: &str, path: &Path) -> bool {
    let pattern = Path::new(HOST_CONTAINERD_DIR).join(pattern);
    let parts = |p: &Path| -> Vec<String> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect()
    };
    let (pattern, path) = (parts(&pattern), parts(path));
    pattern.len() == path.len() && pattern.iter().zip(&path).all(|(p, s)| glob_match(p.as_bytes(), s.as_bytes()))
}

/// `*` and `?` wildcards within one path element (as Go's filepath.Match, without classes).
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob_match(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && glob_match(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && glob_match(rest, &name[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_within_one_path_element() {
        let drop_in = Path::new("/etc/containerd/conf.d/kybernate-runtime.toml");
        assert!(imports_path("/etc/containerd/conf.d/*.toml", drop_in));
        assert!(imports_path("conf.d/*.toml", drop_in), "relative to config.toml's directory");
        assert!(imports_path("/etc/containerd/conf.d/*", drop_in));
        assert!(imports_path("/etc/containerd/conf.d/kybernate-runtime.toml", drop_in));
        assert!(imports_path("/etc/containerd/conf.d/kybernate-?untime.toml", drop_in));
        assert!(!imports_path("/etc/containerd/*.toml", drop_in), "`*` does not cross a `/`");
        assert!(!imports_path("/etc/containerd/conf.d/*.conf", drop_in));
        assert!(!imports_path("/etc/containerd/other.d/*.toml", drop_in));
    }
}
