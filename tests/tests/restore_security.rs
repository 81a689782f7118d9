//! Restore only what you may, through `ctr`, a private containerd, the shim, runc and CRIU: a bundle
//! taken in one containerd namespace is refused in another unless a grant names that pair; references
//! outside the restore roots are refused (`/etc`, `/proc/self/root/…`, `..`, a symlink pointing out);
//! a bundle whose manifest was rewritten (with a recomputed COMPLETE), or re-signed by a key the node
//! does not trust, or not signed at all, is refused by the signature check. Every refusal leaves no
//! task behind and names the problem and the fix.

use std::fs;
use std::path::{Path, PathBuf};

use checkpoint_core::bundle::{self, COMPLETE_MARKER, MANIFEST_FILE};
use checkpoint_core::tenant::{Grant, Tenant};
use checkpoint_core::trust::{SigningKey, SIGNATURE_FILE};
use common::*;
use kybernate_tests::{read_counter, wait_for, Containerd, COUNTER_SCRIPT};
use sha2::Digest;

mod common;

/// Runs `id` with `kybernate.io/restore-from=<reference>` and `flags`; the failed run's output, after
/// checking that it failed and left no task.
fn refused(c: &Containerd, image: &str, id: &str, reference: &str, flags: &[&str]) -> String {
    let restore = format!("kybernate.io/restore-from={reference}");
    let all = [&["-d", "--annotation", &restore][..], flags].concat();
    let out = ctr_run(c, &all, image, id, &["sh", "-c", COUNTER_SCRIPT]).unwrap();
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(1), "ctr run should fail: {text}");
    assert!(text.contains("is refused: "), "the refusal is named: {text}");
    assert_eq!(c.task_status(id), None, "a refused restore left a task behind");
    c.ctr_ok(&["containers", "rm", id]).unwrap();
    text
}

/// Runs `id` restored from `reference` with `flags` and checks its counter went on from `last`.
fn resumes(c: &Containerd, image: &str, id: &str, reference: &str, flags: &[&str], last: u64) {
    let restore = format!("kybernate.io/restore-from={reference}");
    let all = [&["-d", "--annotation", &restore][..], flags].concat();
    ctr_run(c, &all, image, id, &["sh", "-c", COUNTER_SCRIPT]).unwrap().ok("ctr run restoring").unwrap();
    let first = wait_for("the restored counter", TIMEOUT, || read_counter(&c.bundle(id))).unwrap();
    assert!(first >= last, "{id} started fresh ({first}) instead of resuming from {last}");
    counter_past(c, id, first);
    remove_task(c, id);
}

#[test]
fn another_tenants_bundle_is_refused_and_a_grant_allows_exactly_its_pair() {
    let operator_dir = tempfile::tempdir().unwrap();
    let operator = SigningKey::generate().unwrap();
    let operator_pub = operator_dir.path().join("operator.pub");
    operator.write(&operator_dir.path().join("operator.key"), &operator_pub).unwrap();
    let (mut c, image) = setup_with(&format!("{CHECKPOINTS}grant_keys = [{:?}]\n", operator_pub.display().to_string()));
    let (bundle_dir, last) = checkpointed_bundle(&c, image, "tenant-a");
    let owner = Tenant::Containerd(c.namespace.clone());
    assert_eq!(Tenant::of(&bundle::verify(&bundle_dir).unwrap().container), owner, "the manifest records its tenant");
    let reference = bundle_dir.display().to_string();

    // The issue's scenario: a container in namespace `other` names a bundle of another namespace.
    let image = c.use_namespace("other").unwrap();
    let text = refused(&c, image, "thief", &reference, &[]);
    assert!(
        text.contains(&format!("the bundle belongs to tenant {owner}, and this container is in containerd/other")),
        "{text}"
    );
    assert!(text.contains("tenant_grants") && text.contains("kybernate.io/restore-grant"), "names the fixes: {text}");

    // A grant for another pair, or one made by a key the node does not trust for grants, does not help.
    let to_third =
        Grant { from: owner.clone(), to: Tenant::Containerd("third".into()), reference: None, not_after: None };
    let grant = format!("kybernate.io/restore-grant={}", to_third.issue(&operator));
    let text = refused(&c, image, "thief", &reference, &["--annotation", &grant]);
    assert!(text.contains(&format!("it grants {owner} → containerd/third, not {owner} → containerd/other")), "{text}");
    let to_other = Grant { to: Tenant::Containerd("other".into()), ..to_third };
    let forged = format!("kybernate.io/restore-grant={}", to_other.issue(&SigningKey::generate().unwrap()));
    let text = refused(&c, image, "thief", &reference, &["--annotation", &forged]);
    assert!(text.contains("which this node does not trust"), "{text}");

    // The operator's grant for exactly this pair lets it restore, and the counter goes on.
    let grant = format!("kybernate.io/restore-grant={}", to_other.issue(&operator));
    resumes(&c, image, "granted", &reference, &["--annotation", &grant], last);
}

#[test]
fn references_outside_the_restore_roots_are_refused() {
    let (c, image) = setup_with(&format!("{CHECKPOINTS}restore_roots = [\"{{dir}}/checkpoints\"]\n"));
    let (bundle_dir, last) = checkpointed_bundle(&c, image, "rooted");
    // A sealed, signed copy of the bundle outside the roots, and ways to reach it from inside.
    let outside = c.dir.path().join("outside");
    copy_dir(&bundle_dir, &outside);
    let root = checkpoint_root(&c);
    std::os::unix::fs::symlink(&outside, root.join("link-out")).unwrap();
    let dot_dot = format!("{}/../outside", root.display());
    for reference in ["/etc", "/proc/self/root/etc", &outside.display().to_string(), &dot_dot] {
        let text = refused(&c, image, "escape", reference, &[]);
        assert!(text.contains("this node restores only from its restore roots"), "{reference}: {text}");
        assert!(text.contains(&format!("({})", root.display())) && text.contains("restore_roots"), "{text}");
    }
    let text = refused(&c, image, "escape", &root.join("link-out").display().to_string(), &[]);
    assert!(text.contains(&format!("it resolves to {}", outside.display())), "{text}");
    let text = refused(&c, image, "escape", &dot_dot, &[]);
    assert!(text.contains("`..`"), "{text}");
    // The bundle itself, inside the root, restores.
    resumes(&c, image, "inside", &bundle_dir.display().to_string(), &[], last);
}

#[test]
fn a_rewritten_manifest_or_an_untrusted_signer_is_refused_by_the_signature() {
    let (c, image) = setup_with(CHECKPOINTS);
    let (bundle_dir, _) = checkpointed_bundle(&c, image, "signed");
    let forge = |name: &str| {
        let copy = checkpoint_root(&c).join(name);
        copy_dir(&bundle_dir, &copy);
        copy
    };

    // Crafted images: a page image changed, its hash in the manifest updated and COMPLETE recomputed.
    // The hash chain holds again; only the signature tells.
    let crafted = forge("crafted");
    let (pages, bytes) = corrupt_pages(&crafted);
    let mut manifest = bundle::verify(&bundle_dir).unwrap();
    let rel = pages.strip_prefix(&crafted).unwrap().display().to_string();
    manifest.files.get_mut(&rel).unwrap().sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    let json = serde_json::to_vec_pretty(&manifest).unwrap();
    fs::write(crafted.join(MANIFEST_FILE), &json).unwrap();
    fs::write(
        crafted.join(COMPLETE_MARKER),
        format!("{MANIFEST_FILE} sha256:{}\n", hex::encode(sha2::Sha256::digest(&json))),
    )
    .unwrap();
    bundle::verify(&crafted).expect("the forged hash chain verifies");
    let text = refused(&c, image, "crafted", &crafted.display().to_string(), &[]);
    assert!(text.contains("does not match its contents: it was altered"), "{text}");

    // Re-signed by a key this node does not trust.
    let stranger = SigningKey::generate().unwrap();
    fs::write(crafted.join(SIGNATURE_FILE), stranger.sign_manifest(&json)).unwrap();
    let text = refused(&c, image, "crafted", &crafted.display().to_string(), &[]);
    assert!(text.contains(&format!("it is signed by key {}, which this node does not trust", stranger.id())), "{text}");
    assert!(text.contains("trusted_keys"), "names the fix: {text}");

    // Not signed at all.
    let unsigned = forge("unsigned");
    fs::remove_file(unsigned.join(SIGNATURE_FILE)).unwrap();
    let text = refused(&c, image, "unsigned", &unsigned.display().to_string(), &[]);
    assert!(text.contains("it is not signed") && text.contains("allow_unsigned"), "{text}");
}

/// Copies the bundle directory `from` to `to` (files and directories only, as bundles are).
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap().flatten() {
        let target: PathBuf = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}
