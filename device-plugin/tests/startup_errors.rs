//! What a user sees when the plugin cannot start: bad configuration and a node without NVML.
//! These run the real binary and the real NVML loader.

use std::path::Path;
use std::process::{Command, Output};

use kybernate_device_plugin::inventory::{GpuInventory, InventoryError, NvmlInventory, NvmlOptions};
use kybernate_device_plugin::Config;

const NVML_NOT_FOUND: &str = "NVML not found: is the NVIDIA driver installed?";

fn run_binary(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kybernate-device-plugin"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run kybernate-device-plugin")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn bad_config_value_names_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "dp.toml", "[seats]\ndefault_per_gpu = 0\n");
    let out = run_binary(&["--config", &config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid config key `seats.default_per_gpu (--seats-per-gpu)` = 0"), "{stderr}");
    assert!(stderr.contains("fix:"), "{stderr}");
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "dp.toml", "[seats]\nseats_per_gpu = 2\n");
    let out = run_binary(&["--config", &config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid config file"), "{stderr}");
    assert!(stderr.contains("unknown field `seats_per_gpu`"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
}

#[test]
fn bad_flag_overrides_a_good_file_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "dp.toml", "resource_name = \"example.com/seat\"\n");
    let out = run_binary(&["--config", &config, "--resource-name", "no-slash"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("resource_name (--resource-name)"), "{stderr}");
    assert!(stderr.contains("\"no-slash\""), "{stderr}");
}

#[test]
fn missing_explicit_config_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let out = run_binary(&["--config", missing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot read config file"), "{stderr}");
}

/// The real NVML path: on a node with the driver it lists the GPUs; without one (as in CI) it
/// must fail with the clear "NVML not found" message.
#[test]
fn real_nvml_lists_gpus_or_says_nvml_not_found() {
    match NvmlInventory::open(NvmlOptions::from_config(&Config::default())) {
        Ok(inventory) => {
            let gpus = inventory.list();
            assert!(!gpus.is_empty(), "NVML loaded but listed no GPU");
            for gpu in gpus {
                assert!(gpu.uuid.starts_with("GPU-"), "{gpu:?}");
                assert!(gpu.memory_bytes > 0, "{gpu:?}");
            }
        }
        Err(err) => {
            let msg = err.to_string();
            assert!(
                matches!(err, InventoryError::NvmlNotFound { .. }),
                "with no loadable NVML the error must be NvmlNotFound, got: {msg}"
            );
            assert!(msg.starts_with(NVML_NOT_FOUND), "{msg}");
            assert!(msg.contains("libnvidia-ml.so.1"), "{msg}");
        }
    }
}

#[test]
fn nvml_library_that_cannot_be_loaded_says_nvml_not_found() {
    let config =
        Config { nvml_library: Some("/nonexistent/kybernate-test/libnvidia-ml.so.1".into()), ..Config::default() };
    let err = NvmlInventory::open(NvmlOptions::from_config(&config)).unwrap_err();
    assert!(matches!(err, InventoryError::NvmlNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with(NVML_NOT_FOUND), "{msg}");
    assert!(msg.contains("/nonexistent/kybernate-test/libnvidia-ml.so.1"), "{msg}");
}

#[test]
fn binary_on_a_node_without_nvml_exits_with_the_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "dp.toml", "");
    let out = run_binary(&[
        "--config",
        &config,
        "--device-plugin-dir",
        dir.path().to_str().unwrap(),
        "--nvml-library",
        "/nonexistent/kybernate-test/libnvidia-ml.so.1",
        "--metrics",
        "false",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(NVML_NOT_FOUND), "{stderr}");
}

/// The config file shipped in the DaemonSet's ConfigMap must load.
#[test]
fn deployed_config_map_is_a_valid_config() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/device-plugin/daemonset.yaml");
    let yaml = std::fs::read_to_string(manifest).unwrap();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "device-plugin.toml: |").skip(1);
    let toml: String = lines
        .by_ref()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    assert!(toml.contains("resource_name"), "ConfigMap block not found in {manifest}");
    let config = Config::from_toml(&toml, Path::new(manifest)).unwrap();
    config.validate().unwrap();
    assert_eq!(config.resource_name, "kybernate.io/gpu-seat");
}
