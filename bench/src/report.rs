//! The results as a table with ratios, a CSV, a PNG chart, and the targets met or not.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::sides::*;
use crate::stats::{Results, Summary};

/// The side each operation's ratios are taken against.
fn reference(op: &str) -> &'static str {
    match op {
        CHECKPOINT | TO_RUNNING | TO_FULL_RSS => RAW,
        _ => RUNC_CTR,
    }
}

/// The table: per size and operation, each side's median, min and max, and its ratio to the
/// reference side's median.
pub fn table(results: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<32} {:<34} {:>5} {:>9} {:>9} {:>9} {:>8}",
        "operation", "side", "runs", "median", "min", "max", "ratio"
    );
    let mut last = None;
    for (key, sum) in results.all() {
        if last != Some((key.mib, key.op)) {
            let size = if key.mib == 0 { String::new() } else { format!(" @ {} MiB", key.mib) };
            let _ = writeln!(s, "-- {}{size}", key.op);
            last = Some((key.mib, key.op));
        }
        let ratio = results
            .get(key.mib, key.op, reference(key.op))
            .map(|r| format!("{:.2}x", sum.median / r.median))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<32} {:<34} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            "", key.side, sum.runs, sum.median, sum.min, sum.max, ratio
        );
    }
    s
}

/// `size_mib,operation,side,runs,median,min,max` (seconds, or MiB for the shim memory rows).
pub fn csv(results: &Results) -> String {
    let mut s = String::from("size_mib,operation,side,runs,median,min,max\n");
    for (k, v) in results.all() {
        let _ = writeln!(s, "{},{},{},{},{:.4},{:.4},{:.4}", k.mib, k.op, k.side, v.runs, v.median, v.min, v.max);
    }
    s
}

/// One target: what it compares, the figures, and whether it is met.
pub struct Target {
    /// What is promised.
    pub what: String,
    /// The measured figures, or why they are missing.
    pub figures: String,
    /// `Some(met)`, or `None` when it was not measured.
    pub met: Option<bool>,
}

/// A target that a ratio `a / b` be at most (`le`) or at least `limit`.
fn ratio_target(what: String, a: Option<f64>, b: Option<f64>, limit: f64, le: bool) -> Target {
    let (figures, met) = match (a, b) {
        (Some(a), Some(b)) => {
            let r = a / b;
            (format!("{a:.3} vs {b:.3} = {r:.2}x"), Some(if le { r <= limit } else { r >= limit }))
        }
        _ => ("not measured".into(), None),
    };
    Target { what, figures, met }
}

/// Checks the targets against the medians.
pub fn targets(results: &Results, sizes: &[u64]) -> Vec<Target> {
    let m = |mib, op, side| results.get(mib, op, side).map(|s: Summary| s.median);
    let mut out = Vec::new();
    for &mib in sizes {
        let lazy = m(mib, TO_RUNNING, KYB_LAZY);
        out.push(ratio_target(format!("lazy restore to running <= 0.3 s @ {mib} MiB"), lazy, Some(0.3), 1.0, true));
        let remote = m(mib, TO_RUNNING, KYB_REMOTE_LAZY);
        out.push(ratio_target(
            format!("remote lazy restore to running <= 0.3 s @ {mib} MiB"),
            remote,
            Some(0.3),
            1.0,
            true,
        ));
        out.push(ratio_target(
            format!("lazy restore to full RSS <= 1.2x a full restore @ {mib} MiB"),
            m(mib, TO_FULL_RSS, KYB_LAZY),
            m(mib, TO_FULL_RSS, KYB_STOP),
            1.2,
            true,
        ));
        out.push(ratio_target(
            format!("stop-to-durable <= 1.1x raw criu dump + fsync @ {mib} MiB"),
            m(mib, CHECKPOINT, KYB_STOP),
            m(mib, CHECKPOINT, RAW),
            1.1,
            true,
        ));
        out.push(ratio_target(
            format!("full restore <= 1.2x raw criu restore @ {mib} MiB"),
            m(mib, TO_RUNNING, KYB_STOP),
            m(mib, TO_RUNNING, RAW),
            1.2,
            true,
        ));
    }
    if let Some(&big) = sizes.iter().find(|&&s| s == 2048) {
        out.push(ratio_target(
            "stop-to-durable >= 3x faster than the stock shim's ctr checkpoint @ 2048 MiB".into(),
            m(big, CHECKPOINT, RUNC_CTR),
            m(big, CHECKPOINT, KYB_STOP),
            3.0,
            false,
        ));
    }
    out.push(Target {
        what: "diskless stop-to-durable on S3 <= 1.3x the local-only time".into(),
        figures:
            "not measured: make bench has no diskless side yet (checkpoint_mode = diskless, tests/tests/diskless.rs)"
                .into(),
        met: None,
    });
    let rss = m(0, SHIM_RSS, KYB_CTR);
    out.push(ratio_target("shim RSS <= 4 MiB per container".into(), rss, Some(4.0), 1.0, true));
    out
}

/// The targets as lines: `met`, `NOT MET` or `not measured`.
pub fn target_lines(targets: &[Target]) -> String {
    targets
        .iter()
        .map(|t| {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "NOT MET",
                None => "not measured",
            };
            format!("{verdict:<13} {} ({})\n", t.what, t.figures)
        })
        .collect()
}

/// A PNG with one horizontal bar chart of median seconds per operation and size.
pub fn chart(results: &Results, sizes: &[u64], font: &Path, out: &Path) -> Result<()> {
    let bytes: &'static [u8] = Box::leak(fs::read(font)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a font plotters can use", font.display()))?;
    let ops = [CHECKPOINT, TO_RUNNING, TO_FULL_RSS];
    let root = BitMapBackend::new(out, (900 * sizes.len() as u32, 1200)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((ops.len(), sizes.len()));
    for (i, panel) in panels.iter().enumerate() {
        let (op, mib) = (ops[i / sizes.len()], sizes[i % sizes.len()]);
        let bars: Vec<(&str, f64)> = results
            .all()
            .into_iter()
            .filter(|(k, _)| k.mib == mib && k.op == op)
            .map(|(k, s)| (k.side, s.median))
            .collect();
        let top = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(0.01) * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{op}, {mib} MiB (median s)"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(230)
            .build_cartesian_2d(0.0..top, (0..bars.len()).into_segmented())?;
        let names: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(bars.len().max(1))
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .label_style(("sans-serif", 14))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (side, v))| {
            let color = if side.starts_with("kybernate") { BLUE.mix(0.7) } else { BLACK.mix(0.35) };
            let mut bar =
                Rectangle::new([(0.0, SegmentValue::Exact(i)), (*v, SegmentValue::Exact(i + 1))], color.filled());
            bar.set_margin(4, 4, 0, 0);
            bar
        }))?;
        chart.draw_series(
            bars.iter()
                .enumerate()
                .map(|(i, (_, v))| Text::new(format!("{v:.2}"), (*v, SegmentValue::CenterOf(i)), ("sans-serif", 13))),
        )?;
    }
    root.present()?;
    Ok(())
}
