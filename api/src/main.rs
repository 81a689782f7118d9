//! `kybernate-crdgen DIR`: writes the CRDs of `kybernate.io/v1alpha1` into `DIR` (`deploy/crds/`),
//! one file each, with a `kustomization.yaml` listing them.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: kybernate-crdgen DIR   (e.g. deploy/crds)");
        return ExitCode::from(2);
    };
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let crds = kybernate_api::crds();
        for (file, crd) in &crds {
            std::fs::write(dir.join(file), kybernate_api::render(crd))?;
        }
        std::fs::write(dir.join("kustomization.yaml"), kybernate_api::kustomization(&crds))
    };
    match write() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kybernate-crdgen: writing {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
