//! The `kybernate-sidecar` binary end to end: push, pull, ls, rm, gc, daemon; fs store and S3.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_kybernate-sidecar");

/// The binary with a clean environment (no config file, no AWS settings of the host).
fn sidecar(ckpt: &Path, store: &str) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", ckpt)
        .env("RUST_LOG", "warn")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["--config", "/dev/null"])
        .arg("--checkpoint-dir")
        .arg(ckpt)
        .args(["--store", store]);
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("runs the binary")
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn ls(ckpt: &Path, store: &str) -> Vec<String> {
    ok(sidecar(ckpt, store).arg("ls")).lines().map(|l| l.split('\t').next().unwrap().to_string()).collect()
}

#[test]
fn push_pull_ls_rm_gc_with_the_filesystem_store() {
    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", store_dir.path().display());
    let a: Vec<String> = (1..=3).map(|d| format!("team/web-0/app/2024-04-0{d}T08:00:00Z")).collect();
    let b = "team/db-0/postgres/2024-04-01T08:00:00Z".to_string();
    for (i, r) in a.iter().chain([&b]).enumerate() {
        let dir = make_bundle(ckpt.path(), r, 256 << 10, 400 + i as u64, true);
        let out = ok(sidecar(ckpt.path(), &store).arg("push").arg(&dir));
        assert!(out.starts_with("shipped "), "{out}");
    }
    let again = ok(sidecar(ckpt.path(), &store).arg("push").arg(ckpt.path().join(&b)));
    assert!(again.starts_with("already shipped"), "{again}");
    assert_eq!(ls(ckpt.path(), &store).len(), 4);

    // pull: exact destination, byte-identical; refuses to overwrite.
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("restored");
    let key = format!("{}.tar.zst", a[0]);
    let reference = format!("{store}/{key}");
    let out = ok(sidecar(ckpt.path(), &store).args(["pull", &reference]).arg(&target));
    assert_eq!(out.trim(), target.display().to_string());
    assert_eq!(tree(&target), tree(&ckpt.path().join(&a[0])));
    let err = fails(sidecar(ckpt.path(), &store).args(["pull", &reference]).arg(&target));
    assert!(err.contains("already exists"), "{err}");

    // gc: per container, keep the newest; dry run first.
    let out = ok(sidecar(ckpt.path(), &store).args(["gc", "--keep-last", "1", "--dry-run"]));
    assert!(out.contains("would delete 2, kept 2"), "{out}");
    assert_eq!(ls(ckpt.path(), &store).len(), 4);
    let out = ok(sidecar(ckpt.path(), &store).args(["gc", "--max-age", "100000d"]));
    assert!(out.contains("deleted 0, kept 4"), "{out}");
    let out = ok(sidecar(ckpt.path(), &store).args(["gc", "--keep-last", "1", "--max-age", "1h"]));
    assert!(out.contains("deleted 2, kept 2"), "{out}");
    assert_eq!(ls(ckpt.path(), &store), [format!("{b}.tar.zst"), format!("{}.tar.zst", a[2])]);
    let err = fails(sidecar(ckpt.path(), &store).arg("gc"));
    assert!(err.contains("--keep-last"), "{err}");

    // rm
    ok(sidecar(ckpt.path(), &store).args(["rm", &format!("{b}.tar.zst")]));
    assert_eq!(ls(ckpt.path(), &store), [format!("{}.tar.zst", a[2])]);
    let err = fails(sidecar(ckpt.path(), &store).args(["rm", &format!("{b}.tar.zst")]));
    assert!(err.contains("not found"), "{err}");

    // An incomplete bundle is refused with a clear message.
    let partial = make_bundle(ckpt.path(), "team/web-0/app/2024-04-09T08:00:00Z", 1000, 9, false);
    let err = fails(sidecar(ckpt.path(), &store).arg("push").arg(&partial));
    assert!(err.contains("no COMPLETE marker"), "{err}");
    // A bundle outside the checkpoint directory needs --key.
    let elsewhere = tempfile::tempdir().unwrap();
    let stray = make_bundle(elsewhere.path(), "x", 1000, 10, true);
    let err = fails(sidecar(ckpt.path(), &store).arg("push").arg(&stray));
    assert!(err.contains("--key"), "{err}");
    let out =
        ok(sidecar(ckpt.path(), &store).args(["push", "--key", "other/pod/ctr/2024-04-01T00:00:00Z"]).arg(&stray));
    assert!(out.starts_with("shipped"), "{out}");
}

/// `pull` takes a path relative to the working directory, runs the manifest pass by default and
/// skips it with `--skip-manifest-check` (as the shim calls it).
#[test]
fn pull_relative_reference_and_skip_manifest_check() {
    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", store_dir.path().display());
    let r = "team/web-0/app/2024-04-01T08:00:00Z";
    let bundle = make_bundle(ckpt.path(), r, 256 << 10, 700, true);
    std::fs::write(bundle.join("spec.dump"), b"altered after the seal").unwrap();
    ok(sidecar(ckpt.path(), &store).arg("push").arg(&bundle));
    let relative = format!("{r}.tar.zst");
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("restored");

    let err = fails(sidecar(ckpt.path(), &store).current_dir(store_dir.path()).args(["pull", &relative]).arg(&target));
    assert!(err.contains("does not verify"), "{err}");
    assert!(!target.exists());
    let out = ok(sidecar(ckpt.path(), &store)
        .current_dir(store_dir.path())
        .args(["pull", "--skip-manifest-check", &relative])
        .arg(&target));
    assert_eq!(out.trim(), target.display().to_string());
    assert_eq!(tree(&target), tree(&bundle));

    // A path that names nothing is said to name nothing.
    let err = fails(sidecar(ckpt.path(), &store).current_dir(store_dir.path()).args(["pull", "missing.tar", "x"]));
    assert!(err.contains("neither a bundle directory nor an archive file"), "{err}");
}

#[test]
fn s3_with_credentials_from_the_environment() {
    let server = S3Server::start();
    let ckpt = tempfile::tempdir().unwrap();
    let store = format!("s3://{BUCKET}/cluster-b");
    let with_env = |secret: &str| {
        let mut c = sidecar(ckpt.path(), &store);
        c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_REGION", "us-east-1")
            .args(["--s3-endpoint", &server.endpoint(), "--s3-part-size-mib", "5"]);
        c
    };
    let r = "team/gpu-0/trainer/2024-05-05T05:05:05Z";
    let bundle = make_bundle(ckpt.path(), r, 12 * MIB, 500, true);
    let before = tree(&bundle);

    // Wrong secret: a clear error, the secret never printed, the bundle kept, nothing recorded.
    let err = fails(with_env("wrong-secret-value").arg("push").arg(&bundle));
    assert!(err.contains("rejected the credentials"), "{err}");
    assert!(err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    assert!(!err.contains("wrong-secret-value"), "{err}");
    assert_eq!(tree(&bundle), before);
    assert!(!ckpt.path().join(".kybernate-sidecar/shipped").join(format!("{r}.json")).exists());

    let out = ok(with_env(SECRET_KEY).args(["--compression", "none", "push"]).arg(&bundle));
    assert!(out.contains(&format!("s3://{BUCKET}/cluster-b/{r}.tar")), "{out}");
    let listed = ok(with_env(SECRET_KEY).arg("ls"));
    assert!(listed.starts_with(&format!("{r}.tar\t")), "{listed}");

    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("b");
    ok(with_env(SECRET_KEY).args(["pull", &format!("s3://{BUCKET}/cluster-b/{r}.tar")]).arg(&target));
    assert_eq!(tree(&target), before);

    let out = ok(with_env(SECRET_KEY).args(["gc", "--keep-last", "0"]));
    assert!(out.contains("deleted 1, kept 0"), "{out}");
    assert_eq!(ok(with_env(SECRET_KEY).arg("ls")), "");
}

/// Kills the daemon process on drop.
struct DaemonProcess(Child);

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_daemon(ckpt: &Path, store: &str, port: u16) -> DaemonProcess {
    let child = sidecar(ckpt, store)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}"), "daemon"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the daemon's metrics endpoint", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    DaemonProcess(child)
}

fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn daemon_process_survives_sigkill() {
    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", store_dir.path().display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let shipped = |r: &str| ckpt.path().join(".kybernate-sidecar/shipped").join(format!("{r}.json")).exists();

    let first = spawn_daemon(ckpt.path(), &store, port);
    let r1 = "ns/a/c/2024-07-01T00:00:00Z";
    make_bundle(ckpt.path(), r1, MIB, 600, true);
    wait_for("the first bundle to ship", Duration::from_secs(30), || shipped(r1));
    // The record is written just before the daemon counts the shipment.
    wait_for("the shipment to be counted", Duration::from_secs(10), || {
        metrics(port).contains("kybernate_sidecar_bundles_shipped_total 1\n")
    });
    drop(first); // SIGKILL

    // Finished while no daemon was running.
    let r2 = "ns/b/c/2024-07-02T00:00:00Z";
    make_bundle(ckpt.path(), r2, MIB, 601, true);
    let _second = spawn_daemon(ckpt.path(), &store, port);
    wait_for("the second bundle to ship", Duration::from_secs(30), || shipped(r2));
    wait_for("the shipment to be counted", Duration::from_secs(10), || {
        metrics(port).contains("kybernate_sidecar_bundles_shipped_total 1\n")
    });
    // Nothing queued or in flight: the first bundle was not shipped again, and will not be.
    wait_for("the daemon to be idle", Duration::from_secs(10), || {
        let m = metrics(port);
        m.contains("kybernate_sidecar_queue_length 0\n") && m.contains("kybernate_sidecar_uploads_in_flight 0\n")
    });
    let m = metrics(port);
    assert!(m.contains("kybernate_sidecar_bundles_shipped_total 1\n"), "only the new bundle: {m}");
    assert_eq!(ls(ckpt.path(), &store), [format!("{r1}.tar.zst"), format!("{r2}.tar.zst")]);
}

#[test]
fn pull_takes_a_containers_bundle_from_the_newest_pod_checkpoint_or_says_it_is_not_covered() {
    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", store_dir.path().display());
    let (t1, t2) = ("2026-12-02T01:00:00.000Z", "2026-12-02T02:00:00.000Z");
    for (rel, seed) in
        [(format!("ns/web/app/{t1}"), 1), (format!("ns/web/side/{t1}"), 2), (format!("ns/web/app/{t2}"), 3)]
    {
        let dir = make_bundle(ckpt.path(), &rel, 64 << 10, seed, true);
        ok(sidecar(ckpt.path(), &store).arg("push").arg(&dir));
    }
    let pod = store_dir.path().join("ns/web").display().to_string();
    let pulled = |container: &str, reference: &str, dest: &Path| {
        run(sidecar(ckpt.path(), &store).args(["pull", "--container", container, reference]).arg(dest))
    };

    let dest = ckpt.path().join("restore-app");
    let out = pulled("app", &pod, &dest);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tree(&dest), tree(&ckpt.path().join(format!("ns/web/app/{t2}"))), "the newest pod checkpoint's bundle");

    // the newest pod checkpoint holds app only: side is not covered (exit 3), unless t1 is named
    let out = pulled("side", &pod, &ckpt.path().join("restore-side"));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not cover container `side`") && stderr.contains("holds bundles of app only"),
        "{stderr}"
    );
    assert!(!ckpt.path().join("restore-side").exists(), "nothing is written for an uncovered container");
    let dest = ckpt.path().join("restore-side-t1");
    let out = pulled("side", &format!("{pod}#{t1}"), &dest);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tree(&dest), tree(&ckpt.path().join(format!("ns/web/side/{t1}"))));
}

/// Encryption from the command line: keygen, key files (refused unless private), the key in the
/// environment, wrong and missing keys (exit status 1, nothing at the destination, no key text in
/// the output), pod references to encrypted archives, require_encryption.
#[test]
fn encrypted_push_and_pull_with_key_files_and_the_environment() {
    use std::os::unix::fs::PermissionsExt;

    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", store_dir.path().display());
    let keys = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (keys.path().join("a.key"), keys.path().join("b.key"));
    let id_of = |out: &str| out.trim().rsplit_once("key id ").unwrap().1.trim_end_matches(')').to_string();
    let id_a = id_of(&ok(sidecar(ckpt.path(), &store).arg("keygen").arg("--out").arg(&key_a)));
    let id_b = id_of(&ok(sidecar(ckpt.path(), &store).arg("keygen").arg("--out").arg(&key_b)));
    assert_eq!(std::fs::metadata(&key_a).unwrap().permissions().mode() & 0o777, 0o600);
    let text_a = std::fs::read_to_string(&key_a).unwrap();
    let err = fails(sidecar(ckpt.path(), &store).arg("keygen").arg("--out").arg(&key_a));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&key_a).unwrap(), text_a, "keygen never replaces a key");

    let r = "team/web-0/app/2024-04-01T08:00:00Z";
    let bundle = make_bundle(ckpt.path(), r, 3 * MIB, 800, true);
    let with_key = |file: &Path| {
        let mut c = sidecar(ckpt.path(), &store);
        c.arg("--encryption-key-file").arg(file);
        c
    };

    std::fs::set_permissions(&key_a, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(with_key(&key_a).arg("push").arg(&bundle));
    assert!(err.contains(&format!("chmod 600 {}", key_a.display())), "{err}");
    std::fs::set_permissions(&key_a, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = ok(with_key(&key_a).arg("push").arg(&bundle));
    assert!(out.contains(".tar.zst.kenc (") && out.contains(&format!("encrypted with key id {id_a}")), "{out}");
    assert_eq!(ls(ckpt.path(), &store), [format!("{r}.tar.zst.kenc")]);

    let reference = format!("{store}/{r}.tar.zst.kenc");
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("restored");
    let nothing_written = || assert_eq!(listing(dest.path()), Vec::<String>::new(), "nothing written");

    let out = run(sidecar(ckpt.path(), &store).args(["pull", &reference]).arg(&target));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("encrypted (key id {id_a}), but no decryption key is configured")), "{err}");
    nothing_written();

    let out = run(sidecar(ckpt.path(), &store)
        .env("KYBERNATE_ENCRYPTION_KEY", std::fs::read_to_string(&key_b).unwrap())
        .args(["pull", &reference])
        .arg(&target));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("encrypted with key id {id_a}, which is none of the configured keys ({id_b})")),
        "{err}"
    );
    assert!(!err.contains(text_a.trim()) && !err.contains(std::fs::read_to_string(&key_b).unwrap().trim()), "{err}");
    nothing_written();

    // The key itself in the environment (a Kubernetes Secret through secretKeyRef).
    let out = ok(sidecar(ckpt.path(), &store)
        .env("KYBERNATE_ENCRYPTION_KEY", &text_a)
        .args(["pull", &reference])
        .arg(&target));
    assert_eq!(out.trim(), target.display().to_string());
    assert_eq!(tree(&target), tree(&bundle));
    let err = fails(with_key(&key_a).env("KYBERNATE_ENCRYPTION_KEY", &text_a).arg("ls"));
    assert!(err.contains("set one of them"), "{err}");

    // A pod reference finds the encrypted archive of the container; an older key still decrypts it.
    let pod = store_dir.path().join("team/web-0").display().to_string();
    let pod_target = dest.path().join("pod-restored");
    ok(with_key(&key_b)
        .arg("--decryption-key-file")
        .arg(&key_a)
        .args(["pull", "--container", "app", &pod])
        .arg(&pod_target));
    assert_eq!(tree(&pod_target), tree(&bundle));

    // require_encryption: an unencrypted archive is refused.
    let plain = make_bundle(ckpt.path(), "team/web-0/app/2024-04-02T08:00:00Z", 64 << 10, 801, true);
    ok(sidecar(ckpt.path(), &store).arg("push").arg(&plain));
    let plain_ref = format!("{store}/team/web-0/app/2024-04-02T08:00:00Z.tar.zst");
    let err =
        fails(with_key(&key_a).args(["--require-encryption", "true", "pull", &plain_ref]).arg(dest.path().join("p")));
    assert!(err.contains("is not encrypted, and require_encryption is set"), "{err}");
    assert!(!dest.path().join("p").exists());
    let err = fails(sidecar(ckpt.path(), &store).args(["--require-encryption", "true", "ls"]));
    assert!(err.contains("require_encryption") && err.contains("needs an encryption key"), "{err}");
}

#[test]
fn keygen_makes_signing_keys_and_grant_issues_tokens_the_nodes_accept() {
    use checkpoint_core::tenant::{Access, Tenant, TenantPolicy};
    use checkpoint_core::trust::TrustedKeys;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("grant.key");
    let said = ok(sidecar(dir.path(), "file:///nonexistent").args(["keygen", "--signing", "--out"]).arg(&key));
    assert!(said.contains("grant.key") && said.contains("grant.pub"), "{said}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let err = fails(sidecar(dir.path(), "file:///nonexistent").args(["keygen", "--signing", "--out"]).arg(&key));
    assert!(err.contains("never replaced"), "{err}");

    let token = ok(sidecar(dir.path(), "file:///nonexistent")
        .args(["grant", "--from", "k8s/team-a", "--to", "k8s/team-b", "--valid-for", "1h", "--key"])
        .arg(&key));
    let policy =
        TenantPolicy { grants: vec![], grant_keys: TrustedKeys::load(&[dir.path().join("grant.pub")], false).unwrap() };
    let (a, b) = (Tenant::Kubernetes("team-a".into()), Tenant::Kubernetes("team-b".into()));
    assert!(matches!(policy.check(&a, &b, "s3://b/x", Some(token.trim())).unwrap(), Access::Granted(_)));
    assert!(policy.check(&b, &a, "s3://b/x", Some(token.trim())).is_err(), "only the pair it names");
    let err = fails(
        sidecar(dir.path(), "file:///nonexistent")
            .args(["grant", "--from", "team-a", "--to", "k8s/team-b", "--key"])
            .arg(&key),
    );
    assert!(err.contains("must be k8s/<namespace> or containerd/<namespace>"), "{err}");
}
