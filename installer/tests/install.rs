//! `kybernate-install` run as the init container runs it, against temporary host directories: the
//! exact files and modes it leaves, what it reports, and that a second run changes nothing.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kybernate-install");

struct Node {
    _dir: tempfile::TempDir,
    shim: PathBuf,
    bin: PathBuf,
    containerd: PathBuf,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let (bin, containerd) = (dir.path().join("host/usr/local/bin"), dir.path().join("host/etc/containerd"));
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&containerd).unwrap();
        let shim = dir.path().join("image/containerd-shim-kybernate-v1");
        fs::create_dir_all(shim.parent().unwrap()).unwrap();
        fs::write(&shim, b"\x7fELF the shim, version 1").unwrap();
        Node { _dir: dir, shim, bin, containerd }
    }

    fn run(&self, version: &str) -> Output {
        let out = Command::new(BIN)
            .arg("--shim")
            .arg(&self.shim)
            .arg("--host-bin-dir")
            .arg(&self.bin)
            .arg("--host-containerd-dir")
            .arg(&self.containerd)
            .args(["--containerd-config-version", version])
            .output()
            .unwrap();
        assert!(out.status.success(), "kybernate-install failed: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn installed_shim(&self) -> PathBuf {
        self.bin.join("containerd-shim-kybernate-v1")
    }

    fn drop_in(&self) -> PathBuf {
        self.containerd.join("conf.d/kybernate-runtime.toml")
    }

    /// `<outcome> <shim>` and `<outcome> <drop-in>`, as the installer prints them.
    fn report(&self, shim: &str, drop_in: &str) -> String {
        format!("{shim} {}\n{drop_in} {}\n", self.installed_shim().display(), self.drop_in().display())
    }
}

fn deploy(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/containerd").join(name)).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Names in `dir`: no temporary file may be left behind.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_fresh_node_gets_the_shim_and_the_containerd_1_x_drop_in_and_a_second_run_changes_nothing() {
    let node = Node::new();
    let out = node.run("2");
    assert_eq!(stdout(&out), node.report("created", "created"));
    assert_eq!(fs::read(node.installed_shim()).unwrap(), fs::read(&node.shim).unwrap());
    assert_eq!(mode(&node.installed_shim()), 0o755);
    assert_eq!(fs::read_to_string(node.drop_in()).unwrap(), deploy("kybernate-runtime.toml"));
    assert_eq!(mode(&node.drop_in()), 0o644);
    assert_eq!(names(&node.bin), ["containerd-shim-kybernate-v1"]);
    assert_eq!(names(&node.containerd), ["conf.d"]);
    assert_eq!(names(&node.containerd.join("conf.d")), ["kybernate-runtime.toml"]);
    let err = stderr(&out);
    assert!(err.contains("containerd reads no drop-in without a config.toml"), "{err}");
    assert!(err.contains("restart containerd"), "{err}");

    let before = [fs::metadata(node.installed_shim()).unwrap(), fs::metadata(node.drop_in()).unwrap()];
    let again = node.run("2");
    assert_eq!(stdout(&again), node.report("unchanged", "unchanged"));
    assert!(!stderr(&again).contains("restart containerd"), "{}", stderr(&again));
    let after = [fs::metadata(node.installed_shim()).unwrap(), fs::metadata(node.drop_in()).unwrap()];
    for (b, a) in before.iter().zip(&after) {
        // Not rewritten: the same inode, not touched since.
        assert_eq!((b.ino(), b.mtime(), b.mtime_nsec()), (a.ino(), a.mtime(), a.mtime_nsec()));
    }
}

#[test]
fn containerd_2_gets_the_version_3_drop_in_and_switching_versions_replaces_only_the_drop_in() {
    let node = Node::new();
    assert_eq!(stdout(&node.run("3")), node.report("created", "created"));
    assert_eq!(fs::read_to_string(node.drop_in()).unwrap(), deploy("kybernate-runtime.v3.toml"));
    assert_eq!(stdout(&node.run("2")), node.report("unchanged", "updated"));
    assert_eq!(fs::read_to_string(node.drop_in()).unwrap(), deploy("kybernate-runtime.toml"));
    assert_eq!(mode(&node.drop_in()), 0o644);
}

#[test]
fn a_new_shim_a_wrong_mode_and_a_symlink_are_replaced_atomically() {
    let node = Node::new();
    node.run("2");
    fs::write(&node.shim, b"\x7fELF the shim, version 2").unwrap();
    assert_eq!(stdout(&node.run("2")), node.report("updated", "unchanged"));
    assert_eq!(fs::read(node.installed_shim()).unwrap(), b"\x7fELF the shim, version 2");

    fs::set_permissions(node.drop_in(), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(node.installed_shim(), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(stdout(&node.run("2")), node.report("updated", "updated"));
    assert_eq!((mode(&node.installed_shim()), mode(&node.drop_in())), (0o755, 0o644));

    // A symlink where the shim goes is replaced by the file; its target is left alone.
    let elsewhere = node.bin.parent().unwrap().join("elsewhere");
    fs::write(&elsewhere, b"someone else's file").unwrap();
    fs::remove_file(node.installed_shim()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, node.installed_shim()).unwrap();
    assert_eq!(stdout(&node.run("2")), node.report("updated", "unchanged"));
    assert!(fs::symlink_metadata(node.installed_shim()).unwrap().is_file());
    assert_eq!(fs::read(&elsewhere).unwrap(), b"someone else's file");
    assert_eq!(names(&node.bin), ["containerd-shim-kybernate-v1"]);
}

#[test]
fn it_warns_unless_config_toml_imports_the_drop_in_and_never_edits_config_toml() {
    let node = Node::new();
    let config = node.containerd.join("config.toml");
    let without = "version = 2\n\n[plugins]\n";
    fs::write(&config, without).unwrap();
    let err = stderr(&node.run("2"));
    assert!(err.contains("imports [], not /etc/containerd/conf.d/kybernate-runtime.toml"), "{err}");
    assert!(err.contains("add `imports = [\"/etc/containerd/conf.d/*.toml\"]`"), "{err}");
    assert_eq!(fs::read_to_string(&config).unwrap(), without);

    let with = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
    fs::write(&config, with).unwrap();
    let out = node.run("2");
    assert_eq!(stdout(&out), node.report("unchanged", "unchanged"));
    assert_eq!(stderr(&out), "", "nothing to warn about");
    assert_eq!(fs::read_to_string(&config).unwrap(), with);
}

#[test]
fn a_missing_host_directory_or_shim_fails_and_writes_nothing() {
    let node = Node::new();
    let out = Command::new(BIN)
        .arg("--shim")
        .arg(&node.shim)
        .arg("--host-bin-dir")
        .arg(node.bin.join("missing"))
        .arg("--host-containerd-dir")
        .arg(&node.containerd)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not a directory (is it mounted?)"), "{}", stderr(&out));
    assert_eq!(names(&node.containerd), Vec::<String>::new());

    let out = Command::new(BIN)
        .arg("--shim")
        .arg(node.shim.with_file_name("absent"))
        .arg("--host-bin-dir")
        .arg(&node.bin)
        .arg("--host-containerd-dir")
        .arg(&node.containerd)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("reading the shim"), "{}", stderr(&out));
    assert_eq!(names(&node.bin), Vec::<String>::new());
}

#[test]
fn an_unknown_config_version_is_refused() {
    let out = Command::new(BIN).args(["--containerd-config-version", "1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid value '1'"), "{}", stderr(&out));
}
