//! `make bench`: Kybernate's checkpoint and restore against the floor (a write + fsync of the same
//! bytes), raw CRIU, containerd's stock runc shim through the same `ctr` commands, and Podman, with
//! an incompressible workload whose memory is verified after every restore. Every side is measured
//! the same number of times, in the same rounds; the table gives median, min and max, and the ratio
//! to raw CRIU. Writes `results.csv`, `chart.png` and `report.txt` under the output directory, and
//! says which of the targets in docs/benchmarks.md are met.

mod report;
mod sides;
mod stats;
mod workload;

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

use sides::Bench;
use stats::Results;

/// Command-line flags.
#[derive(Parser, Debug)]
#[command(about = "Kybernate's checkpoint/restore benchmark against raw CRIU, the stock runc shim and Podman")]
struct Args {
    /// Workload sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,2048")]
    sizes: Vec<u64>,
    /// Also run 8 GiB.
    #[arg(long)]
    with_8g: bool,
    /// Rounds per size; every side runs once per round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Idle containers per runtime for the shim memory figures.
    #[arg(long, default_value_t = 10)]
    idle: usize,
    /// Where results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// A TrueType font for the chart's labels.
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    font: PathBuf,
    /// The Kybernate shim binary.
    #[arg(long, env = "SHIM")]
    shim: PathBuf,
    /// The Kybernate sidecar binary (ships bundles to a store; the shim fetches them with it).
    #[arg(long, env = "SIDECAR")]
    sidecar: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut sizes = args.sizes.clone();
    if args.with_8g {
        sizes.push(8192);
    }
    if args.rounds == 0 || sizes.is_empty() {
        bail!("--rounds and --sizes must not be empty");
    }
    kybernate_tests::require_tools(&["criu", "gcc", "podman", "sync"])?;
    fs::create_dir_all(&args.out)?;
    let scratch = tempfile::Builder::new().prefix("kybernate-bench-").tempdir_in("/var/tmp")?;
    let work = scratch.path().to_path_buf();
    let hog_dir = work.join("hog");
    workload::build(&hog_dir)?;
    let dir = tempfile::Builder::new().prefix("kybernate-bench-ctd-").tempdir_in("/var/tmp")?;
    // Under the instance's directory, which is its shim's restore root.
    let checkpoints = dir.path().join("checkpoints");
    let store = dir.path().join("store");
    let sidecar =
        fs::canonicalize(&args.sidecar).with_context(|| format!("the sidecar binary {}", args.sidecar.display()))?;
    let quoted = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    let options = kybernate_tests::ContainerdOptions {
        shim_config: format!(
            "log_level = \"info\"\ncheckpoint_dir = {}\nrestore_dir = {}\nsidecar_binary = {}\n",
            quoted(&checkpoints),
            quoted(&dir.path().join("restore")),
            quoted(&sidecar)
        ),
        ..Default::default()
    };
    let shim = fs::canonicalize(&args.shim).with_context(|| format!("the shim binary {}", args.shim.display()))?;
    let containerd = kybernate_tests::Containerd::start_with(dir, &shim, &options)?;
    let image = containerd.import_busybox()?;
    let podman = kybernate_tests::Podman::new(&work.join("podman"))?;
    podman.load_busybox(image, &work)?;
    let bench = Bench { work: work.clone(), hog_dir, containerd, image, podman, checkpoints, sidecar, store };

    let mut results = Results::default();
    eprintln!("shim memory: {} idle containers per runtime", args.idle);
    bench.shim_memory(args.idle, &mut results)?;
    let largest = *sizes.iter().max().context("no sizes")?;
    let data = random_bytes(largest << 20);
    for &mib in &sizes {
        for round in 1..=args.rounds {
            eprintln!("{mib} MiB, round {round}/{}", args.rounds);
            bench.disk(mib, &data, &mut results)?;
            bench.raw(mib, &mut results).context("raw criu")?;
            bench.kybernate_stop(mib, &mut results).context("kybernate checkpoint on stop / restore-from")?;
            bench.ctr_pair(mib, "io.containerd.kybernate.v1", sides::KYB_CTR, &mut results).context("kybernate ctr")?;
            bench.ctr_pair(mib, "io.containerd.runc.v2", sides::RUNC_CTR, &mut results).context("runc-v2 ctr")?;
            bench.podman(mib, &mut results).context("podman")?;
        }
    }

    let table = report::table(&results);
    let targets = report::target_lines(&report::targets(&results, &sizes));
    let machine = machine();
    let text = format!("{machine}\n{table}\ntargets:\n{targets}");
    println!("{text}");
    fs::write(args.out.join("report.txt"), &text)?;
    fs::write(args.out.join("results.csv"), report::csv(&results))?;
    report::chart(&results, &sizes, &args.font, &args.out.join("chart.png"))?;
    eprintln!("wrote {0}/report.txt, {0}/results.csv and {0}/chart.png", args.out.display());
    Ok(())
}

/// `n` incompressible bytes (xorshift), the floor's data.
fn random_bytes(n: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(n as usize);
    while (v.len() as u64) < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n as usize);
    v
}

/// The machine and versions the figures were taken on.
fn machine() -> String {
    let cmd = |c: &str, a: &[&str]| {
        std::process::Command::new(c)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
            .unwrap_or_default()
    };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem =
        fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().next().map(str::to_string)).unwrap_or_default();
    format!(
        "machine: {} cores, {}, kernel {}; {}; {}; CRIU {}; {}",
        cpus,
        mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" ") + " RAM",
        cmd("uname", &["-r"]),
        cmd("containerd", &["--version"]),
        cmd("runc", &["--version"]),
        cmd("criu", &["--version"]).trim_start_matches("Version: "),
        cmd("podman", &["--version"]),
    )
}
