//! Builds Kybernate's container images without a registry or a container builder: one OCI image
//! archive per component (for `ctr -n k8s.io images import`), from the release binaries.
//!
//! Each image is one layer: the component's binary at /usr/local/bin/<name> (with the binaries it
//! runs, see [`COMPONENTS`]), every shared library `ldd` says they load, at the path `ldd` names, the
//! host's CA bundle (for the S3 store and the Kubernetes API over TLS), and an empty /tmp. Its
//! Entrypoint is the binary; it is named `<registry>/<name>:<version>`. Entries are owned by root and
//! dated 0, so the same binaries give the same digests.
//!
//! Usage: kybernate-build-images [--release-dir DIR] [--out DIR] [--registry REG] [--version V] [NAME...]
//! (defaults: target/release, target/images, ghcr.io/kybernate, this workspace's version, every
//! component). scripts/build-images.sh runs it.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use kybernate_tests::images::{oci_digest, oci_image_archive, Layer};

/// Every component: its binary, and the other binaries its image carries.
const COMPONENTS: &[(&str, &[&str])] = &[
    // The agent pushes checkpoints by running `kybernate-sidecar push`; criu (when the host has it)
    // answers Status's CRIU version.
    ("kybernate-agent", &["kybernate-sidecar", "criu?"]),
    ("kybernate-sidecar", &[]),
    ("kybernate-device-plugin", &[]),
    ("kybernate-operator", &[]),
    ("containerd-shim-kybernate-v1", &[]),
    // The installer copies the shim from its own image onto the node.
    ("kybernate-install", &["containerd-shim-kybernate-v1"]),
];

/// Libraries an image needs although its binaries do not link them: the device plugin dlopens the
/// host's libnvidia-ml.so.1, which links these (glibc's, found next to libc).
const DLOPEN_DEPS: &[(&str, &[&str])] =
    &[("kybernate-device-plugin", &["libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1"])];

/// The CA bundle of Debian's ca-certificates, included when the host has it.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

struct Args {
    release_dir: PathBuf,
    out: PathBuf,
    registry: String,
    version: String,
    names: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        release_dir: PathBuf::from("target/release"),
        out: PathBuf::from("target/images"),
        registry: "ghcr.io/kybernate".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        names: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| it.next().with_context(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--release-dir" => args.release_dir = value("--release-dir")?.into(),
            "--out" => args.out = value("--out")?.into(),
            "--registry" => args.registry = value("--registry")?,
            "--version" => args.version = value("--version")?,
            "-h" | "--help" => {
                println!(
                    "usage: kybernate-build-images [--release-dir DIR] [--out DIR] [--registry REG] [--version V] [NAME...]\n\
                     components: {}",
                    COMPONENTS.iter().map(|c| c.0).collect::<Vec<_>>().join(" ")
                );
                std::process::exit(0);
            }
            flag if flag.starts_with('-') => bail!("unknown flag {flag} (see --help)"),
            name => {
                if !COMPONENTS.iter().any(|c| c.0 == name) {
                    bail!("unknown component {name} (see --help)");
                }
                args.names.push(name.to_string());
            }
        }
    }
    if args.names.is_empty() {
        args.names = COMPONENTS.iter().map(|c| c.0.to_string()).collect();
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for name in &args.names {
        let reference = format!("{}/{name}:{}", args.registry, args.version);
        let archive = build(&args.release_dir, name, &reference, &args.version)?;
        let path = args.out.join(format!("{name}.oci.tar"));
        let tmp = path.with_extension("tar.tmp");
        fs::write(&tmp, &archive).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path)?;
        println!("{reference} {} ({} MiB)", path.display(), archive.len() / (1 << 20));
    }
    Ok(())
}

/// The image archive of component `name`.
fn build(release_dir: &Path, name: &str, reference: &str, version: &str) -> Result<Vec<u8>> {
    let (_, extras) = COMPONENTS.iter().find(|c| c.0 == name).expect("a known component");
    let mut binaries: Vec<(String, PathBuf)> = vec![(name.to_string(), release_binary(release_dir, name)?)];
    for extra in extras.iter() {
        match extra.strip_suffix('?') {
            Some(optional) => match host_binary(optional) {
                Some(path) => binaries.push((optional.to_string(), path)),
                None => eprintln!("note: {name}: no {optional} on this host; the image has none"),
            },
            None => binaries.push((extra.to_string(), release_binary(release_dir, extra)?)),
        }
    }
    let mut libraries = BTreeSet::new();
    for (_, path) in &binaries {
        libraries.extend(shared_libraries(path)?);
    }
    if let Some((_, names)) = DLOPEN_DEPS.iter().find(|d| d.0 == name) {
        let libc = libraries.iter().find(|l| l.file_name().is_some_and(|f| f == "libc.so.6")).cloned();
        let dir = libc.as_deref().and_then(Path::parent).context("no libc.so.6 among the libraries")?;
        for lib in names.iter() {
            let path = dir.join(lib);
            if path.exists() {
                libraries.insert(path);
            }
        }
    }

    let mut layer = Layer::new();
    let mut dirs = BTreeSet::new();
    let mut parents = |layer: &mut Layer, path: &Path| -> Result<()> {
        for dir in path.ancestors().skip(1).collect::<Vec<_>>().into_iter().rev() {
            let dir = relative(dir);
            if !dir.is_empty() && dirs.insert(dir.clone()) {
                layer.dir(&dir)?;
            }
        }
        Ok(())
    };
    layer.dir_with_mode("tmp", 0o1777)?;
    for (bin, path) in &binaries {
        let target = Path::new("/usr/local/bin").join(bin);
        parents(&mut layer, &target)?;
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        layer.file(&relative(&target), 0o755, &data)?;
    }
    for lib in &libraries {
        parents(&mut layer, lib)?;
        // fs::read follows a symlink: the image gets the file under the name the loader asks for.
        let data = fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        layer.file(&relative(lib), 0o755, &data)?;
    }
    if let Ok(data) = fs::read(CA_BUNDLE) {
        parents(&mut layer, Path::new(CA_BUNDLE))?;
        layer.file(&relative(Path::new(CA_BUNDLE)), 0o644, &data)?;
    }
    let layer = layer.finish()?;
    let config = serde_json::json!({
        "Entrypoint": [format!("/usr/local/bin/{name}")],
        "Env": ["PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
        "Labels": {
            "org.opencontainers.image.title": name,
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.source": "https://github.com/kybernate/kybernate",
            "org.opencontainers.image.licenses": "Apache-2.0"
        }
    });
    let archive = oci_image_archive(reference, version, &layer, config)?;
    eprintln!("{name}: layer {} ({} files)", oci_digest(&layer), binaries.len() + libraries.len());
    Ok(archive)
}

fn release_binary(release_dir: &Path, name: &str) -> Result<PathBuf> {
    let path = release_dir.join(name);
    if !path.is_file() {
        bail!("{} is missing: build it first (cargo build --release, see scripts/build-images.sh)", path.display());
    }
    Ok(path)
}

fn host_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/local/sbin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The shared libraries `binary` loads, as `ldd` names them (the dynamic loader included); none for
/// a static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd (Debian: libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("statically linked") {
            return Ok(Vec::new());
        }
        let path = match line.split_once("=>") {
            Some((lib, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("{} needs {}, which this host does not have", binary.display(), lib.trim());
                }
                target.split(" (").next().unwrap_or_default().trim()
            }
            // The loader (`/lib64/ld-linux-x86-64.so.2 (0x…)`) and the vDSO (no path).
            None => line.split(" (").next().unwrap_or_default().trim(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// `path` without its leading `/`, as a layer names it.
fn relative(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').to_string()
}
