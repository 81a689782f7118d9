//! GPU discovery, the manifest's GPU section, the restore compatibility check, CRIU CUDA plugin
//! detection and backend choice. Inventory-based logic runs against fakes (no GPU on CI); the `/proc`
//! fallback scans real processes that hold a device-like file open and map a library named like the
//! CUDA driver; NVML is tried for real (a clear error here, a GPU listing on a GPU node); the backend
//! dispatch runs real CRIU dumps and restores.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use checkpoint_core::bundle::{GpuDevice, GpuProcess, GpuSection};
use checkpoint_core::gpu::{
    check_restore, checkpoint_with_backend, find_gpu_processes, gpu_section, parse_gpu_uuid, restore_with_backend,
    select_backend, ComputeProcess, ContainerGpuProcess, CriuPluginDir, DiscoveryMethod, GpuAssignment, GpuBackend,
    GpuBackendChoice, GpuCompatError, GpuInfo, GpuInventory, GpuMapping, GpuMatch, GpuPair, GpuStep, InventoryError,
    NodeProbe, NvmlInventory, PluginDirSource, ProcScanner, CUDA_PLUGIN,
};
use checkpoint_core::{CheckpointOptions, Criu, Error, RestoreOptions};
use kybernate_tests::gpu_fakes::{fake_gpu, FakeDriver, FakeInventory, FakeProbe, GIB};
use kybernate_tests::{alive, become_subreaper, kill_and_reap, spawn_workload, wait_for, WorkloadState};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_kybernate-test-workload");
const H100: &str = "NVIDIA H100 80GB HBM3";
const UUID_A: &str = "GPU-aaaaaaaa-0000-0000-0000-000000000000";
const UUID_B: &str = "GPU-bbbbbbbb-0000-0000-0000-000000000000";
const UUID_C: &str = "GPU-cccccccc-0000-0000-0000-000000000000";
const UUID_D: &str = "GPU-dddddddd-0000-0000-0000-000000000000";
const UUID_E: &str = "GPU-eeeeeeee-0000-0000-0000-000000000000";

// ---------------------------------------------------------------------------------------------
// Fakes (kybernate_tests::gpu_fakes) and what the tests build with them

/// A node with driver 580.95.05 and `gpus`, with no compute processes.
fn node(gpus: Vec<GpuInfo>) -> FakeInventory {
    FakeInventory { driver: "580.95.05".into(), gpus, ..Default::default() }
}

fn device(uuid: &str, name: &str, cc: &str) -> GpuDevice {
    GpuDevice { uuid: uuid.into(), name: name.into(), compute_capability: cc.into(), memory_bytes: 80 * GIB }
}

fn process(pid: i32, uuid: &str, gib: u64) -> GpuProcess {
    GpuProcess { pid, gpu_uuid: Some(uuid.into()), memory_bytes: Some(gib * GIB), ns_pid: None }
}

fn section(devices: Vec<GpuDevice>, processes: Vec<GpuProcess>) -> GpuSection {
    GpuSection { driver_version: Some("580.95.05".into()), backend: "driver-api".into(), devices, processes }
}

fn mismatch(result: Result<GpuMapping, GpuCompatError>) -> String {
    match result {
        Err(e @ GpuCompatError::Mismatch(_)) => e.to_string(),
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Discovery and the manifest section

#[test]
fn nvml_processes_of_the_container_fill_the_manifest_section() {
    let mut inv = node(vec![
        fake_gpu(0, UUID_A, H100, "9.0", 70),
        fake_gpu(1, UUID_B, H100, "9.0", 70),
        fake_gpu(2, UUID_C, H100, "9.0", 80),
    ]);
    inv.processes.insert(
        0,
        vec![
            ComputeProcess { pid: 100, used_memory: Some(GIB) },
            ComputeProcess { pid: 999, used_memory: Some(5 * GIB) }, // another container's
        ],
    );
    inv.processes.insert(
        1,
        vec![ComputeProcess { pid: 101, used_memory: Some(2 * GIB) }, ComputeProcess { pid: 100, used_memory: None }],
    );
    let found = find_gpu_processes(Ok(&inv), &[100, 101, 102], &ProcScanner::default()).unwrap();
    assert_eq!(found.method, DiscoveryMethod::Nvml);
    assert_eq!(found.pids(), [100, 101]);
    assert_eq!(
        found.processes,
        [
            ContainerGpuProcess { pid: 100, gpu_uuid: Some(UUID_A.into()), memory_bytes: Some(GIB) },
            ContainerGpuProcess { pid: 101, gpu_uuid: Some(UUID_B.into()), memory_bytes: Some(2 * GIB) },
            ContainerGpuProcess { pid: 100, gpu_uuid: Some(UUID_B.into()), memory_bytes: None },
        ]
    );

    let s = gpu_section(Some(&inv), &found, "driver-api").unwrap().expect("a GPU section");
    assert_eq!(s.driver_version.as_deref(), Some("580.95.05"));
    assert_eq!(s.backend, "driver-api");
    assert_eq!(s.devices, [device(UUID_A, H100, "9.0"), device(UUID_B, H100, "9.0")], "only the GPUs in use");
    assert_eq!(s.processes[0], process(100, UUID_A, 1));
    assert_eq!(
        s.processes[2],
        GpuProcess { pid: 100, gpu_uuid: Some(UUID_B.into()), memory_bytes: None, ns_pid: None }
    );
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["devices"][0]["compute_capability"], "9.0");
    assert_eq!(json["processes"][1]["gpu_uuid"], UUID_B);
    assert_eq!(serde_json::from_value::<GpuSection>(json).unwrap(), s);

    let cpu_only = find_gpu_processes(Ok(&inv), &[102], &ProcScanner::default()).unwrap();
    assert!(cpu_only.is_empty());
    assert_eq!(gpu_section(Some(&inv), &cpu_only, "driver-api").unwrap(), None);
}

/// A copy of a harmless shared library this test binary has mapped, to be preloaded under the CUDA
/// driver's name.
fn harmless_library() -> PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libgcc_s.so")))
        .expect("this test binary maps libgcc_s")
}

/// `sleep 60`, optionally holding `device` open as fd 7 and preloading `library`.
fn sleeper(device: Option<&Path>, library: Option<&Path>) -> Child {
    let mut cmd = Command::new("sh");
    let script = if device.is_some() { "exec 7<\"$DEV\"; exec sleep 60" } else { "exec sleep 60" };
    cmd.args(["-c", script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(d) = device {
        cmd.env("DEV", d);
    }
    if let Some(l) = library {
        cmd.env("LD_PRELOAD", l);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    wait_for("the child to become sleep", Duration::from_secs(10), || {
        fs::read_to_string(format!("/proc/{pid}/comm")).ok().filter(|c| c.trim() == "sleep")
    })
    .unwrap();
    child
}

#[test]
fn proc_scan_finds_processes_with_the_driver_mapped_and_a_device_open() {
    let dir = tempfile::tempdir().unwrap();
    let fake_device = dir.path().join("nvidia0");
    fs::write(&fake_device, b"").unwrap();
    let fake_cuda = dir.path().join("libcuda.so.1");
    fs::copy(harmless_library(), &fake_cuda).unwrap();
    // The real library patterns; only the device prefix points at our stand-in for /dev/nvidia0.
    let scanner = ProcScanner { device_prefixes: vec![dir.path().join("nvidia")], ..Default::default() };

    let mut both = sleeper(Some(&fake_device), Some(&fake_cuda));
    let mut device_only = sleeper(Some(&fake_device), None);
    let mut library_only = sleeper(None, Some(&fake_cuda));
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let [b, d, l, g] = [&both, &device_only, &library_only, &gone].map(|c| c.id() as i32);

    let evidence = scanner.scan(b).unwrap().unwrap();
    assert_eq!(evidence.devices, std::slice::from_ref(&fake_device));
    assert_eq!(evidence.libraries, std::slice::from_ref(&fake_cuda));
    assert!(evidence.is_cuda_process());
    assert!(!scanner.scan(d).unwrap().unwrap().is_cuda_process(), "an open device alone is not CUDA");
    assert!(!scanner.scan(l).unwrap().unwrap().is_cuda_process(), "a mapped driver alone is not CUDA");
    assert_eq!(scanner.scan(g).unwrap(), None, "an exited process is skipped");
    assert!(!ProcScanner::default().scan(b).unwrap().unwrap().is_cuda_process(), "no real /dev/nvidia* open");

    // NVML absent: the container's pids are scanned instead.
    let absent = InventoryError::NotAvailable { library: "libnvidia-ml.so.1".into(), detail: "not found".into() };
    let found = find_gpu_processes(Err(&absent), &[b, d, l, g], &scanner).unwrap();
    assert!(matches!(&found.method, DiscoveryMethod::ProcScan { reason } if reason.contains("NVML not available")));
    assert_eq!(found.processes, [ContainerGpuProcess { pid: b, gpu_uuid: None, memory_bytes: None }]);
    let s = gpu_section(None, &found, "cuda-checkpoint").unwrap().unwrap();
    assert_eq!(s.driver_version, None);
    assert!(s.devices.is_empty());
    assert_eq!(s.processes, [GpuProcess { pid: b, gpu_uuid: None, memory_bytes: None, ns_pid: None }]);

    // NVML present but failing: the same fallback, with NVML's error as the reason.
    let broken = FakeInventory { broken: true, ..node(vec![]) };
    let found = find_gpu_processes(Ok(&broken), &[b, d], &scanner).unwrap();
    assert!(matches!(&found.method, DiscoveryMethod::ProcScan { reason } if reason.contains("GPU is lost")));
    assert_eq!(found.pids(), [b]);

    for child in [&mut both, &mut device_only, &mut library_only] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn real_nvml_lists_gpus_or_says_it_is_not_available() {
    match NvmlInventory::open(None) {
        Ok(nvml) => {
            let gpus = nvml.gpus().unwrap();
            assert!(!gpus.is_empty(), "NVML loaded but lists no GPU");
            for g in &gpus {
                assert!(parse_gpu_uuid(&g.uuid).is_some(), "{g:?}");
                assert!(g.compute_capability.contains('.') && g.memory_total > 0 && !g.name.is_empty(), "{g:?}");
                nvml.compute_processes(g.index).unwrap();
            }
            assert!(!nvml.driver_version().unwrap().is_empty());
            eprintln!("NVML: driver {} with {gpus:?}", nvml.driver_version().unwrap());
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("NVML not available: ") && text.contains("libnvidia-ml.so.1"), "{text}");
            eprintln!("no NVML here: {text}");
        }
    }
    let missing = NvmlInventory::open(Some(Path::new("/nonexistent/libnvidia-ml.so.1"))).unwrap_err().to_string();
    assert!(missing.starts_with("NVML not available: could not load /nonexistent/libnvidia-ml.so.1"), "{missing}");
    assert!(missing.contains("install the NVIDIA driver"), "{missing}");
}

// ---------------------------------------------------------------------------------------------
// Compatibility before restore

#[test]
fn restore_on_the_same_gpus_needs_no_mapping() {
    let s = section(vec![device(UUID_A, H100, "9.0")], vec![process(1, UUID_A, 10)]);
    let mapping = check_restore(
        &s,
        &node(vec![fake_gpu(0, UUID_B, H100, "9.0", 80), fake_gpu(1, UUID_A, H100, "9.0", 70)]),
        GpuMatch::SameName,
    )
    .unwrap();
    assert!(mapping.is_identity());
    assert_eq!(mapping.assignments[0].new_index, 1);
    assert!(mapping.gpu_pairs().is_empty(), "the driver restores onto the same GPU by itself");
}

#[test]
fn other_gpus_of_the_same_model_get_every_pair() {
    let s = section(
        vec![device(UUID_A, H100, "9.0"), device(UUID_B, H100, "9.0")],
        vec![process(1, UUID_A, 30), process(1, UUID_B, 10)],
    );
    // Only E has room for A's 30 GiB; D takes B.
    let inv = node(vec![fake_gpu(0, UUID_D, H100, "9.0", 20), fake_gpu(1, UUID_E, H100, "9.0", 40)]);
    let mapping = check_restore(&s, &inv, GpuMatch::SameName).unwrap();
    let moves: Vec<(&str, &str, u32)> =
        mapping.assignments.iter().map(|a| (a.old_uuid.as_str(), a.new_uuid.as_str(), a.new_index)).collect();
    assert_eq!(moves, [(UUID_A, UUID_E, 1), (UUID_B, UUID_D, 0)]);
    let pairs = mapping.gpu_pairs();
    assert_eq!(pairs.len(), 2, "the driver wants every checkpointed GPU once any moves");
    assert_eq!(
        pairs[0],
        GpuPair { old_uuid: parse_gpu_uuid(UUID_A).unwrap(), new_uuid: parse_gpu_uuid(UUID_E).unwrap() }
    );
    assert_eq!(pairs[0].old_uuid[..4], [0xaa; 4]);
}

#[test]
fn another_model_is_refused_unless_compute_capability_is_enough() {
    let s = section(vec![device(UUID_A, H100, "9.0")], vec![process(1, UUID_A, 10)]);
    let a100 = node(vec![fake_gpu(0, UUID_D, "NVIDIA A100-SXM4-80GB", "8.0", 80)]);
    let text = mismatch(check_restore(&s, &a100, GpuMatch::SameName));
    assert!(text.starts_with("the checkpoint's GPU state cannot be restored on this node: "), "{text}");
    assert!(
        text.contains(&format!("GPU {UUID_A} ({H100}, compute capability 9.0): this node has no GPU of that model"))
            && text.contains("(it has: GPU 0 NVIDIA A100-SXM4-80GB (compute capability 8.0))")
            && text.contains("restore on a node that has a GPU of that model"),
        "{text}"
    );

    let pcie = node(vec![fake_gpu(0, UUID_D, "NVIDIA H100 PCIe", "9.0", 80)]);
    assert!(mismatch(check_restore(&s, &pcie, GpuMatch::SameName)).contains("no GPU of that model"));
    let mapping = check_restore(&s, &pcie, GpuMatch::SameComputeCapability).unwrap();
    assert_eq!(mapping.assignments[0].new_uuid, UUID_D);
    let text = mismatch(check_restore(&s, &a100, GpuMatch::SameComputeCapability));
    assert!(text.contains("no GPU of that compute capability"), "{text}");
}

#[test]
fn too_little_free_memory_names_the_numbers_and_the_fix() {
    let s = section(vec![device(UUID_A, H100, "9.0")], vec![process(1, UUID_A, 40), process(2, UUID_A, 20)]);
    let inv = node(vec![fake_gpu(0, UUID_D, H100, "9.0", 10), fake_gpu(1, UUID_E, H100, "9.0", 20)]);
    let text = mismatch(check_restore(&s, &inv, GpuMatch::SameName));
    assert!(
        text.contains(&format!("GPU {UUID_A} ({H100}): the checkpointed processes held 60.0 GiB (64424509440 bytes)"))
            && text.contains(&format!("GPU 1 ({UUID_E}), has only 20.0 GiB (21474836480 bytes) free"))
            && text.contains("stop other work on that GPU or restore on a node with 60.0 GiB"),
        "{text}"
    );
}

#[test]
fn every_problem_is_listed_at_once() {
    let s = GpuSection {
        driver_version: Some("570.86.10".into()),
        ..section(
            vec![device(UUID_A, H100, "9.0"), device(UUID_B, H100, "9.0"), device(UUID_C, "NVIDIA L4", "8.9")],
            vec![process(1, UUID_A, 1)],
        )
    };
    let text = mismatch(check_restore(&s, &node(vec![fake_gpu(0, UUID_D, H100, "9.0", 80)]), GpuMatch::SameName));
    assert!(
        text.contains("driver: the checkpoint was taken with NVIDIA driver 570.86.10, this node runs 580.95.05; restore on a node with driver 570.86.10"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "GPU count: the checkpoint used 2 {H100} GPU(s), this node has 1; restore on a node with at least 2"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("GPU {UUID_C} (NVIDIA L4, compute capability 8.9): this node has no GPU of that model")),
        "{text}"
    );
    assert_eq!(text.matches("; GPU ").count() + 1, 3, "three problems, each once: {text}");
}

#[test]
fn a_checkpoint_found_without_nvml_needs_only_some_gpu() {
    let s = GpuSection {
        driver_version: None,
        backend: "cuda-checkpoint".into(),
        devices: vec![],
        processes: vec![GpuProcess { pid: 7, gpu_uuid: None, memory_bytes: None, ns_pid: None }],
    };
    assert_eq!(
        check_restore(&s, &node(vec![fake_gpu(0, UUID_D, H100, "9.0", 80)]), GpuMatch::SameName).unwrap(),
        GpuMapping::default()
    );
    let text = mismatch(check_restore(&s, &node(vec![]), GpuMatch::SameName));
    assert!(text.contains("the checkpoint used 1 NVIDIA GPU(s), this node has 0"), "{text}");
}

#[test]
fn bad_uuids_and_inventory_failures_are_reported() {
    let s = section(vec![device("MIG-1234", H100, "9.0")], vec![]);
    let text = mismatch(check_restore(&s, &node(vec![fake_gpu(0, UUID_D, H100, "9.0", 80)]), GpuMatch::SameName));
    assert!(text.contains("GPU UUID \"MIG-1234\" in the manifest is not of the form GPU-"), "{text}");

    let broken = FakeInventory { broken: true, ..node(vec![]) };
    let err = check_restore(&section(vec![], vec![]), &broken, GpuMatch::SameName).unwrap_err();
    assert!(matches!(err, GpuCompatError::Inventory(_)), "{err:?}");
    assert!(err.to_string().contains("nvmlDeviceGetCount_v2 failed for the system: GPU is lost"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// CRIU's plugin and the backend choice

#[test]
fn criu_cuda_plugin_is_found_in_the_plugin_directory() {
    let dir = tempfile::tempdir().unwrap();
    let criu = Criu::from_path();
    let plugin_dir = CriuPluginDir::for_criu(&criu, Some(dir.path()));
    assert_eq!(plugin_dir, CriuPluginDir { path: dir.path().into(), source: PluginDirSource::Libdir });
    assert_eq!(plugin_dir.cuda_plugin(), None);
    let probe = NodeProbe { plugin_dir: plugin_dir.clone(), spawner: Default::default() };
    let err = select_backend(GpuBackendChoice::CriuPlugin, &probe).unwrap_err().to_string();
    assert!(
        err.starts_with("GPU backend criu-plugin was chosen but cannot be used on this node: no cuda_plugin.so in CRIU's plugin directory")
            && err.contains("install CRIU's cuda_plugin.so into that directory"),
        "{err}"
    );

    fs::write(dir.path().join("other_plugin.so"), b"").unwrap();
    assert_eq!(plugin_dir.cuda_plugin(), None);
    fs::write(dir.path().join(CUDA_PLUGIN), b"").unwrap();
    assert_eq!(plugin_dir.cuda_plugin(), Some(dir.path().join(CUDA_PLUGIN)));
    match select_backend(GpuBackendChoice::CriuPlugin, &probe).unwrap() {
        GpuBackend::CriuPlugin { plugin } => assert_eq!(plugin, dir.path().join(CUDA_PLUGIN)),
        other => panic!("{other:?}"),
    }
    // On this node, auto finds the driver API or cuda-checkpoint where they exist, else the plugin.
    match select_backend(GpuBackendChoice::Auto, &probe).unwrap() {
        GpuBackend::Driver { criu_plugin, .. } => assert_eq!(criu_plugin, Some(dir.path().join(CUDA_PLUGIN))),
        GpuBackend::CriuPlugin { plugin } => assert_eq!(plugin, dir.path().join(CUDA_PLUGIN)),
        other => panic!("{other:?}"),
    }

    // Without --libdir, CRIU's own default as this binary prints it (or CRIU_LIBS_DIR when set).
    let default = CriuPluginDir::for_criu(&criu, None);
    match std::env::var_os("CRIU_LIBS_DIR") {
        Some(env) => assert_eq!(default, CriuPluginDir { path: env.into(), source: PluginDirSource::Environment }),
        None => assert_eq!(default.source, PluginDirSource::CompiledIn, "criu --help names its plugin directory"),
    }
}

#[test]
fn auto_prefers_driver_api_then_cli_then_criu_plugin() {
    let pick = |api, cli, plugin| select_backend(GpuBackendChoice::Auto, &FakeProbe { api, cli, plugin }).unwrap();
    match pick(true, true, true) {
        GpuBackend::Driver { driver, criu_plugin } => {
            assert_eq!(driver.name(), "driver-api");
            assert_eq!(
                criu_plugin,
                Some(PathBuf::from("/usr/lib/criu/cuda_plugin.so")),
                "noted, so work is not doubled"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pick(false, true, false).name(), "cuda-checkpoint");
    assert!(matches!(pick(false, true, false), GpuBackend::Driver { criu_plugin: None, .. }));
    assert_eq!(pick(false, false, true).name(), "criu-plugin");
    match pick(false, false, false) {
        GpuBackend::Off { reason } => assert_eq!(
            reason,
            "no GPU checkpoint backend on this node: driver-api: libcuda.so.1 not found; cuda-checkpoint: \
             cuda-checkpoint not found on PATH; criu-plugin: no cuda_plugin.so in /usr/lib/criu"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_explicit_choice_never_falls_back() {
    let none = FakeProbe { api: false, cli: false, plugin: true };
    let err = select_backend(GpuBackendChoice::DriverApi, &none).unwrap_err();
    assert_eq!(err.choice, GpuBackendChoice::DriverApi);
    assert!(err.to_string().contains("libcuda.so.1 not found; install NVIDIA driver 570 or newer"), "{err}");
    let err = select_backend(GpuBackendChoice::Cli, &none).unwrap_err().to_string();
    assert!(err.starts_with("GPU backend cuda-checkpoint was chosen") && err.contains("on PATH"), "{err}");
    let all = FakeProbe { api: true, cli: true, plugin: true };
    assert_eq!(select_backend(GpuBackendChoice::Cli, &all).unwrap().name(), "cuda-checkpoint");
    assert_eq!(select_backend(GpuBackendChoice::CriuPlugin, &all).unwrap().name(), "criu-plugin");
    assert_eq!(select_backend(GpuBackendChoice::Off, &all).unwrap().name(), "off");
}

// ---------------------------------------------------------------------------------------------
// The backend decides who does the GPU steps (real CRIU, fake or absent GPU)

fn start(dir: &Path) -> (i32, PathBuf) {
    become_subreaper();
    let state = dir.join("state");
    let pid = spawn_workload(Path::new(WORKLOAD), &state, 4).unwrap();
    WorkloadState::wait_past(&state, 2).unwrap();
    (pid, state)
}

fn moved_mapping() -> GpuMapping {
    GpuMapping {
        assignments: vec![GpuAssignment {
            old_uuid: UUID_A.into(),
            new_uuid: UUID_D.into(),
            new_index: 0,
            pair: GpuPair { old_uuid: parse_gpu_uuid(UUID_A).unwrap(), new_uuid: parse_gpu_uuid(UUID_D).unwrap() },
        }],
    }
}

#[test]
fn gpu_processes_without_a_backend_are_not_touched() {
    let dir = tempfile::tempdir().unwrap();
    let (pid, state) = start(dir.path());
    let off = GpuBackend::Off { reason: "gpu_backend = off".into() };
    let images = dir.path().join("images");
    let opts = CheckpointOptions::default();
    let err = checkpoint_with_backend(&off, &Criu::from_path(), pid, &[pid], &images, &opts, Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, Error::Gpu { step: GpuStep::Backend, .. }), "{err}");
    assert!(err.to_string().contains("GPU checkpointing is unavailable (gpu_backend = off)"), "{err}");
    assert!(!images.join("inventory.img").exists());
    let before = WorkloadState::read(&state).unwrap();
    WorkloadState::wait_past(&state, before.counter).unwrap();
    let err =
        restore_with_backend(&off, &Criu::from_path(), &images, &RestoreOptions::default(), &GpuMapping::default())
            .unwrap_err();
    assert!(err.to_string().contains("the checkpoint holds GPU state but GPU checkpointing is unavailable"), "{err}");
    kill_and_reap(pid);
}

#[test]
fn with_criu_plugin_kybernate_runs_no_gpu_step_and_moves_no_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let (pid, state) = start(dir.path());
    let criu = Criu::from_path();
    let images = dir.path().join("images");
    // CRIU does the GPU steps through its plugin; there is no driver here for Kybernate to call.
    let plugin = GpuBackend::CriuPlugin { plugin: dir.path().join(CUDA_PLUGIN) };
    let opts = CheckpointOptions::default();
    checkpoint_with_backend(&plugin, &criu, pid, &[pid], &images, &opts, Duration::from_secs(5)).unwrap();
    kill_and_reap(pid);
    let frozen = WorkloadState::read(&state).unwrap();

    let err = restore_with_backend(&plugin, &criu, &images, &RestoreOptions::default(), &moved_mapping()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Gpu { step: GpuStep::Backend, .. }), "{text}");
    assert!(text.contains(&format!("({UUID_A} -> {UUID_D})")) && text.contains("nothing was restored"), "{text}");
    assert!(!alive(pid));

    let restored =
        restore_with_backend(&plugin, &criu, &images, &RestoreOptions::default(), &GpuMapping::default()).unwrap();
    WorkloadState::wait_past(&state, frozen.counter).unwrap();
    kill_and_reap(restored.pid);
}

#[test]
fn with_a_driver_kybernate_runs_the_steps_unless_criu_plugin_would_fight_a_move() {
    let dir = tempfile::tempdir().unwrap();
    let (pid, _state) = start(dir.path());
    let driver = FakeDriver::default();
    let calls = driver.log();
    let backend = GpuBackend::Driver { driver: Box::new(driver), criu_plugin: None };
    let opts = CheckpointOptions { leave_running: true, ..Default::default() };
    let images = dir.path().join("images");
    checkpoint_with_backend(&backend, &Criu::from_path(), pid, &[pid], &images, &opts, Duration::from_secs(5)).unwrap();
    let want: Vec<String> =
        ["lock", "checkpoint", "restore", "unlock"].iter().map(|op| format!("{op} {pid}")).collect();
    assert_eq!(calls.calls(), want);
    assert!(alive(pid));
    kill_and_reap(pid);

    let plugin = PathBuf::from("/usr/lib/criu/cuda_plugin.so");
    let with_plugin = GpuBackend::Driver { driver: Box::new(FakeDriver::default()), criu_plugin: Some(plugin) };
    let err =
        restore_with_backend(&with_plugin, &Criu::from_path(), &images, &RestoreOptions::default(), &moved_mapping())
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("CRIU's CUDA plugin /usr/lib/criu/cuda_plugin.so restores it onto the checkpoint's own GPUs"),
        "{err}"
    );
}
