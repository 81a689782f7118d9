//! End-to-end tests of the plugin against a fake kubelet over real Unix sockets, with the fake
//! GPU inventory.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use kybernate_device_plugin::inventory::{GpuInventory, Health, NvmlInventory, NvmlOptions};
use kybernate_device_plugin::DaemonError;
use kybernate_proto::deviceplugin::v1beta1::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Device, Empty,
    PreStartContainerRequest, PreferredAllocationRequest, HEALTHY, UNHEALTHY,
};

fn health_by_id(devices: &[Device]) -> Vec<(String, String)> {
    devices.iter().map(|d| (d.id.clone(), d.health.clone())).collect()
}

fn expected(healthy_a: bool, healthy_b: bool) -> Vec<(String, String)> {
    let h = |ok: bool| if ok { HEALTHY } else { UNHEALTHY }.to_string();
    seat_ids(GPU_A, 0..2)
        .into_iter()
        .map(|id| (id, h(healthy_a)))
        .chain(seat_ids(GPU_B, 0..2).into_iter().map(|id| (id, h(healthy_b))))
        .collect()
}

#[tokio::test]
async fn registers_with_resource_name_endpoint_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path());
    let mut config = test_config(dir.path(), 2);
    config.resource_name = "example.com/test-seat".into();
    config.socket_name = "test-plugin.sock".into();
    let plugin = Plugin::start(config, two_gpus());

    let registration = kubelet.next_registration().await;
    assert_eq!(registration.version, "v1beta1");
    assert_eq!(registration.resource_name, "example.com/test-seat");
    assert_eq!(registration.endpoint, "test-plugin.sock");
    let options = registration.options.expect("options sent");
    assert!(options.get_preferred_allocation_available);
    assert!(!options.pre_start_required);
    assert!(dir.path().join("test-plugin.sock").exists());

    // The endpoint works: the kubelet's ListAndWatch got the seats.
    assert_eq!(kubelet.next_list().await.len(), 4);
    let mut client = plugin.client().await;
    let opts = client.get_device_plugin_options(Empty {}).await.unwrap().into_inner();
    assert_eq!(opts, options);
    client.pre_start_container(PreStartContainerRequest { devices_ids: seat_ids(GPU_A, [0]) }).await.unwrap();

    plugin.metrics_contain("kybernate_device_plugin_registrations_total{result=\"ok\"} 1").await;
    plugin.metrics_contain("kybernate_device_plugin_seats_total 4").await;
    plugin.stop().await.unwrap();
    kubelet.stop().await;
}

#[tokio::test]
async fn list_and_watch_reports_seats_and_follows_gpu_health() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path());
    let plugin = Plugin::start(test_config(dir.path(), 2), two_gpus());
    kubelet.next_registration().await;

    assert_eq!(health_by_id(&kubelet.next_list().await), expected(true, true));

    assert!(plugin.inventory.set_health(GPU_B, Health::Unhealthy { reason: "critical XID 79".into() }));
    assert_eq!(health_by_id(&kubelet.next_list().await), expected(true, false));
    plugin.metrics_contain("kybernate_device_plugin_seats_healthy 2").await;

    assert!(plugin.inventory.set_health(GPU_B, Health::Healthy));
    assert_eq!(health_by_id(&kubelet.next_list().await), expected(true, true));

    // A second watcher (e.g. a kubelet reconnecting) gets the current list at once.
    plugin.inventory.set_health(GPU_A, Health::Unhealthy { reason: "NVML query failed".into() });
    assert_eq!(health_by_id(&kubelet.next_list().await), expected(false, true));
    let mut stream = plugin.client().await.list_and_watch(Empty {}).await.unwrap().into_inner();
    let first = within("a ListAndWatch message", stream.message()).await.unwrap().unwrap();
    assert_eq!(health_by_id(&first.devices), expected(false, true));

    plugin.stop().await.unwrap();
    kubelet.stop().await;
}

#[tokio::test]
async fn allocate_one_and_several_seats() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path());
    let mut config = test_config(dir.path(), 2);
    config.cdi.enabled = true;
    let plugin = Plugin::start(config, two_gpus());
    kubelet.next_registration().await;
    let mut client = plugin.client().await;

    let request = AllocateRequest {
        container_requests: vec![
            ContainerAllocateRequest { devices_ids: seat_ids(GPU_A, [1]) },
            ContainerAllocateRequest { devices_ids: seat_ids(GPU_A, [0]) },
            ContainerAllocateRequest {
                devices_ids: vec![seat_ids(GPU_B, [0]).remove(0), seat_ids(GPU_B, [1]).remove(0)],
            },
        ],
    };
    let response = client.allocate(request).await.unwrap().into_inner();
    assert_eq!(response.container_responses.len(), 3);

    let one = &response.container_responses[0];
    assert_eq!(one.envs["NVIDIA_VISIBLE_DEVICES"], GPU_A);
    assert_eq!(one.envs["KYBERNATE_GPU_SEATS"], "1");
    assert_eq!(one.envs["KYBERNATE_SEAT_VRAM_BYTES"], (8 * GIB).to_string(), "16 GiB / 2 seats");
    let cdi: Vec<&str> = one.cdi_devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(cdi, vec![format!("nvidia.com/gpu={GPU_A}")]);

    let two = &response.container_responses[2];
    assert_eq!(two.envs["NVIDIA_VISIBLE_DEVICES"], GPU_B);
    assert_eq!(two.envs["KYBERNATE_GPU_SEATS"], "2");
    assert_eq!(two.envs["KYBERNATE_SEAT_VRAM_BYTES"], (8 * GIB).to_string(), "2 × 4 GiB");

    // Seats on two GPUs under the default "pack" policy: both GPUs, per-GPU shares in order.
    let mut ids = seat_ids(GPU_B, [1]);
    ids.extend(seat_ids(GPU_A, [0]));
    let spread = client
        .allocate(AllocateRequest { container_requests: vec![ContainerAllocateRequest { devices_ids: ids }] })
        .await
        .unwrap()
        .into_inner();
    let envs = &spread.container_responses[0].envs;
    assert_eq!(envs["NVIDIA_VISIBLE_DEVICES"], format!("{GPU_A},{GPU_B}"));
    assert_eq!(envs["KYBERNATE_GPU_SEATS"], "1,1");
    assert_eq!(envs["KYBERNATE_SEAT_VRAM_BYTES"], format!("{},{}", 8 * GIB, 4 * GIB));

    // A device this plugin never advertised.
    let status = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest { devices_ids: vec!["GPU-nope::seat-0".into()] }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("GPU-nope::seat-0"), "{}", status.message());

    plugin.metrics_contain("kybernate_device_plugin_allocations_total{result=\"ok\"} 4").await;
    plugin.metrics_contain("kybernate_device_plugin_allocations_total{result=\"error\"} 1").await;
    plugin.stop().await.unwrap();
    kubelet.stop().await;
}

#[tokio::test]
async fn multi_seat_policies_and_unhealthy_seats_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path());
    let mut config = test_config(dir.path(), 2);
    config.multi_seat = kybernate_device_plugin::config::MultiSeatPolicy::SingleGpu;
    let plugin = Plugin::start(config, two_gpus());
    kubelet.next_registration().await;
    let mut client = plugin.client().await;
    let allocate =
        |ids: Vec<String>| AllocateRequest { container_requests: vec![ContainerAllocateRequest { devices_ids: ids }] };

    let same_gpu = client.allocate(allocate(seat_ids(GPU_A, 0..2))).await.unwrap().into_inner();
    assert_eq!(same_gpu.container_responses[0].envs["KYBERNATE_GPU_SEATS"], "2");

    let mut across = seat_ids(GPU_A, [0]);
    across.extend(seat_ids(GPU_B, [0]));
    let status = client.allocate(allocate(across)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("single-gpu"), "{}", status.message());

    plugin.inventory.set_health(GPU_B, Health::Unhealthy { reason: "critical XID 48".into() });
    let status = client.allocate(allocate(seat_ids(GPU_B, [1]))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("critical XID 48"), "{}", status.message());

    plugin.stop().await.unwrap();
    kubelet.stop().await;
}

#[tokio::test]
async fn preferred_allocation_packs_seats_on_fewest_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path());
    let plugin = Plugin::start(test_config(dir.path(), 4), two_gpus());
    kubelet.next_registration().await;
    let mut client = plugin.client().await;

    // GPU-A has seats 0..4 free, GPU-B only seats 2 and 3.
    let mut available = seat_ids(GPU_A, 0..4);
    available.extend(seat_ids(GPU_B, 2..4));
    let request = |must: Vec<String>, size: i32| PreferredAllocationRequest {
        container_requests: vec![ContainerPreferredAllocationRequest {
            available_device_i_ds: available.clone(),
            must_include_device_i_ds: must,
            allocation_size: size,
        }],
    };
    let gpus = |ids: &[String]| -> BTreeSet<String> {
        ids.iter().map(|id| id.split("::").next().unwrap().to_string()).collect()
    };

    let two = client.get_preferred_allocation(request(vec![], 2)).await.unwrap().into_inner();
    let ids = &two.container_responses[0].device_i_ds;
    assert_eq!(ids, &seat_ids(GPU_B, 2..4), "best fit: the GPU with exactly two free seats");

    let three = client.get_preferred_allocation(request(vec![], 3)).await.unwrap().into_inner();
    let ids = &three.container_responses[0].device_i_ds;
    assert_eq!(ids.len(), 3);
    assert_eq!(gpus(ids), BTreeSet::from([GPU_A.to_string()]));

    let must = seat_ids(GPU_B, [3]);
    let with_must = client.get_preferred_allocation(request(must.clone(), 2)).await.unwrap().into_inner();
    let ids = &with_must.container_responses[0].device_i_ds;
    assert_eq!(ids, &seat_ids(GPU_B, [3, 2]), "must_include first, then its GPU");

    let five = client.get_preferred_allocation(request(vec![], 5)).await.unwrap().into_inner();
    let ids = &five.container_responses[0].device_i_ds;
    assert_eq!(ids.len(), 5);
    assert_eq!(gpus(ids).len(), 2);

    let status = client.get_preferred_allocation(request(vec![], -1)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    plugin.stop().await.unwrap();
    kubelet.stop().await;
}

#[tokio::test]
async fn registers_again_when_the_kubelet_socket_is_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = FakeKubelet::start(dir.path());
    let mut config = test_config(dir.path(), 2);
    // Far longer than the test's waits: the restart must be noticed through the directory watch.
    config.kubelet_poll_interval_secs = 3600.0;
    let plugin = Plugin::start(config, two_gpus());
    first.next_registration().await;
    first.next_list().await;
    first.stop().await;

    let mut second = FakeKubelet::start(dir.path());
    let registration = second.next_registration().await;
    assert_eq!(registration.resource_name, "kybernate.io/gpu-seat");
    assert_eq!(health_by_id(&second.next_list().await), expected(true, true));

    plugin.metrics_contain("kybernate_device_plugin_registrations_total{result=\"ok\"} 2").await;
    plugin.stop().await.unwrap();
    second.stop().await;
}

#[tokio::test]
async fn serves_again_when_a_restarting_kubelet_removes_the_plugin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = FakeKubelet::start(dir.path());
    let plugin = Plugin::start(test_config(dir.path(), 2), two_gpus());
    first.next_registration().await;
    first.stop().await;
    // A starting kubelet clears the directory, the plugin's socket included.
    std::fs::remove_file(&plugin.socket).unwrap();

    let mut second = FakeKubelet::start(dir.path());
    second.next_registration().await;
    assert_eq!(health_by_id(&second.next_list().await), expected(true, true));
    assert!(plugin.socket.exists());

    plugin.stop().await.unwrap();
    second.stop().await;
}

#[tokio::test]
async fn waits_for_a_kubelet_that_starts_later() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(test_config(dir.path(), 1), two_gpus());
    // Served before any kubelet exists.
    let mut client = plugin.client().await;
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    let devices = within("a ListAndWatch message", stream.message()).await.unwrap().unwrap().devices;
    assert_eq!(devices.len(), 2);

    let mut kubelet = FakeKubelet::start(dir.path());
    assert_eq!(kubelet.next_registration().await.version, "v1beta1");
    plugin.stop().await.unwrap();
    kubelet.stop().await;
}

#[tokio::test]
async fn clean_shutdown_removes_the_plugin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path());
    let plugin = Plugin::start(test_config(dir.path(), 2), two_gpus());
    kubelet.next_registration().await;
    // An open ListAndWatch stream must not hold up the shutdown.
    kubelet.next_list().await;
    let socket = plugin.socket.clone();
    assert!(socket.exists());
    plugin.stop().await.unwrap();
    assert!(!socket.exists(), "socket {} left behind", socket.display());
    assert!(dir.path().join("kubelet.sock").exists(), "the kubelet's socket is not ours to remove");
    kubelet.stop().await;
}

#[tokio::test]
async fn missing_device_plugin_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 1);
    config.device_plugin_dir = dir.path().join("not-there");
    let err = Plugin::start(config, two_gpus()).stop().await.unwrap_err();
    assert!(matches!(err, DaemonError::DirMissing(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("not-there") && msg.contains("--device-plugin-dir"), "{msg}");
}

const FAKE_NVML_GPU0: &str = "GPU-fa4e0000-0000-4000-8000-000000000000";
const FAKE_NVML_GPU1: &str = "GPU-fa4e0000-0000-4000-8000-000000000001";

/// The NVML inventory against a fake `libnvidia-ml.so.1`: discovery, a GPU that stops answering,
/// critical XIDs with recovery, and an ignored (application) XID.
#[tokio::test]
async fn nvml_inventory_follows_a_fake_driver() {
    let dir = tempfile::tempdir().unwrap();
    let library = build_fake_nvml(dir.path());
    let inventory = NvmlInventory::open(NvmlOptions {
        library: Some(library),
        poll_interval: Duration::from_millis(50),
        xid_events: true,
        ignored_xids: vec![13],
        xid_recovery: Duration::from_millis(300),
    })
    .unwrap();
    let gpus = inventory.list();
    let summary: Vec<(u32, &str, &str, u64, bool)> = gpus
        .iter()
        .map(|g| (g.index, g.uuid.as_str(), g.name.as_str(), g.memory_bytes, g.health.is_healthy()))
        .collect();
    assert_eq!(
        summary,
        vec![(0, FAKE_NVML_GPU0, "Fake GPU 16G", 16 * GIB, true), (1, FAKE_NVML_GPU1, "Fake GPU 8G", 8 * GIB, true),]
    );

    let mut gpus = inventory.watch();
    let mut health_of = async |i: usize, want: fn(&Health) -> bool| -> Health {
        within("a GPU health change", gpus.wait_for(|g| want(&g[i].health))).await.expect("inventory alive")[i]
            .health
            .clone()
    };
    let sick = |h: &Health| !h.is_healthy();
    let well = |h: &Health| h.is_healthy();

    write_control(dir.path(), "lost-1", "");
    let health = health_of(1, sick).await;
    assert!(matches!(&health, Health::Unhealthy { reason } if reason.contains("NVML query failed")), "{health:?}");
    std::fs::remove_file(dir.path().join("lost-1")).unwrap();
    health_of(1, well).await;

    write_control(dir.path(), "xid-0", "79");
    assert_eq!(health_of(0, sick).await, Health::Unhealthy { reason: "critical XID 79".into() });
    // Back after xid_recovery, once polling finds the GPU answering.
    health_of(0, well).await;

    // An ignored XID is consumed without effect: once a later change (GPU 1 lost) is published,
    // GPU 0 is still healthy.
    write_control(dir.path(), "xid-0", "13");
    within("the fake driver to deliver the XID", async {
        while dir.path().join("xid-0").exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    write_control(dir.path(), "lost-1", "");
    health_of(1, sick).await;
    assert!(inventory.list()[0].health.is_healthy(), "XID 13 is in ignored_xids");
}

/// The real binary on the fake driver: registers with the fake kubelet, advertises seats by VRAM,
/// reports a lost GPU, and removes its socket on SIGTERM.
#[tokio::test]
async fn binary_serves_seats_and_removes_its_socket_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let library = build_fake_nvml(dir.path());
    let plugin_dir = dir.path().join("device-plugins");
    std::fs::create_dir(&plugin_dir).unwrap();
    let config = dir.path().join("dp.toml");
    std::fs::write(&config, "[seats]\nvram_gib_per_seat = 4.0\n").unwrap();
    let log = dir.path().join("plugin.log");
    let mut kubelet = FakeKubelet::start(&plugin_dir);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kybernate-device-plugin"))
        .arg("--config")
        .arg(&config)
        .arg("--device-plugin-dir")
        .arg(&plugin_dir)
        .arg("--nvml-library")
        .arg(&library)
        .args(["--metrics-listen", "127.0.0.1:0", "--health-poll-interval-secs", "0.1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let show_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let registration = kubelet.next_registration().await;
    assert_eq!(registration.resource_name, "kybernate.io/gpu-seat");
    assert_eq!(registration.endpoint, "kybernate-gpu-seat.sock");
    let devices = kubelet.next_list().await;
    let mut want = seat_ids(FAKE_NVML_GPU0, 0..4);
    want.extend(seat_ids(FAKE_NVML_GPU1, 0..2));
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids, want, "{}", show_log());
    assert!(devices.iter().all(|d| d.health == HEALTHY));

    write_control(dir.path(), "lost-1", "");
    let devices = kubelet.next_list().await;
    let unhealthy: Vec<&str> = devices.iter().filter(|d| d.health == UNHEALTHY).map(|d| d.id.as_str()).collect();
    assert_eq!(unhealthy, seat_ids(FAKE_NVML_GPU1, 0..2), "{}", show_log());

    let socket = plugin_dir.join("kybernate-gpu-seat.sock");
    assert!(socket.exists());
    let kill = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = within("the plugin to exit after SIGTERM", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(status.success(), "exit {status}: {}", show_log());
    assert!(!socket.exists(), "socket left behind: {}", show_log());
    assert!(show_log().contains("SIGTERM"), "{}", show_log());
    kubelet.stop().await;
}
