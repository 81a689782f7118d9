//! Checkpoint archives other runtimes write, restored through `kybernate.io/restore-from` by a private
//! containerd, the shim, runc and CRIU: a Podman 4.3 `container checkpoint --export` archive of a
//! container of the same image, on a node that allows unsigned checkpoints, and the same archive
//! refused on a node that does not.

use std::fs;
use std::io::Read;
use std::path::Path;

use common::*;
use kybernate_tests::{read_counter, wait_for, Podman, BUSYBOX_IMAGE, COUNTER_SCRIPT, KYBERNATE_RUNTIME};

mod common;

/// The counter a container wrote into its writable layer, read from the `rootfs-diff.tar` inside
/// Podman's zstd-compressed export.
fn counter_in_export(archive: &Path) -> u64 {
    let export = zstd::stream::read::Decoder::new(fs::File::open(archive).unwrap()).unwrap();
    let mut outer = tar::Archive::new(export);
    let layer =
        outer.entries().unwrap().map(Result::unwrap).find(|e| e.path().unwrap().as_os_str() == "rootfs-diff.tar");
    let mut inner = tar::Archive::new(layer.expect("the export holds rootfs-diff.tar"));
    for entry in inner.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().as_os_str() == "state/counter" {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            return text.trim().parse().unwrap();
        }
    }
    panic!("rootfs-diff.tar in {} holds no state/counter", archive.display());
}

#[test]
fn a_podman_export_restores_through_restore_from_and_is_refused_where_unsigned_is_not_allowed() {
    let sidecar = kybernate_tests::kybernate_sidecar_binary().unwrap();
    let (c, image) = setup_with(&format!(
        "allow_unsigned = true\nsidecar_binary = {:?}\nrestore_dir = \"{{dir}}/restore\"\n",
        sidecar.display().to_string()
    ));
    assert_eq!(image, BUSYBOX_IMAGE);
    let podman = Podman::new(&c.dir.path().join("podman")).unwrap();
    podman.load_busybox(image, c.dir.path()).unwrap();
    podman.run_detached("counter", image, COUNTER_SCRIPT).unwrap();
    wait_for("podman's counter to pass 3", TIMEOUT, || {
        let out = podman.run(&["exec", "counter", "cat", "/state/counter"]).ok()?;
        out.stdout.trim().parse::<u64>().ok().filter(|v| *v > 3)
    })
    .unwrap();
    let archive = c.dir.path().join("podman-counter.tar.zst");
    podman.ok(&["container", "checkpoint", "--export", archive.to_str().unwrap(), "counter"]).unwrap();
    let last = counter_in_export(&archive);

    // Where unsigned checkpoints are not allowed (the default), the archive is refused: nothing says
    // who wrote it.
    let restore = format!("kybernate.io/restore-from={}", archive.display());
    let strict = c.dir.path().join("strict.toml");
    let config = fs::read_to_string(&c.shim_config).unwrap();
    fs::write(&strict, config.replace("allow_unsigned = true\n", "")).unwrap();
    let out = c
        .ctr_run(
            &[
                "run",
                "-d",
                "--annotation",
                &restore,
                "--runtime",
                KYBERNATE_RUNTIME,
                "--runtime-config-path",
                strict.to_str().unwrap(),
                image,
                "strict",
                "sh",
                "-c",
                COUNTER_SCRIPT,
            ],
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("it has no Kybernate manifest") && out.stderr.contains("allow_unsigned"), "{out:?}");
    assert_eq!(c.task_status("strict"), None);

    ctr_run(&c, &["-d", "--annotation", &restore], image, "from-podman", &["sh", "-c", COUNTER_SCRIPT])
        .unwrap()
        .ok("ctr run restoring the Podman archive")
        .unwrap();
    let first = wait_for("the restored counter", TIMEOUT, || read_counter(&c.bundle("from-podman"))).unwrap();
    assert!(first >= last && first < last + 50, "resumed from {first}, checkpointed at {last}");
    counter_past(&c, "from-podman", first);
    remove_task(&c, "from-podman");
}
