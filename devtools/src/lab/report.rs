//! The result of a run: `report.json` (the settings, the verdicts, the
//! figures and everything the lab saw) and `report.html`, one page without
//! any network access: the verdicts, the figures, the faults, and a
//! timeline in inline SVG (a lane per node with its phases coloured and its
//! reboots marked, the etcd probe's latency below, coordinator leader
//! changes and injected faults marked).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use chrono::Duration;
use serde_json::json;

use super::seen::{Seen, Time};
use super::verdicts::{Figures, Verdict};

/// The settings a run was made with (for the report's header).
#[derive(serde::Serialize, Clone, Debug)]
pub struct Settings {
    /// etcd nodes.
    pub etcd_nodes: usize,
    /// Worker nodes.
    pub workers: usize,
    /// `--max-concurrent`.
    pub max_concurrent: usize,
    /// The chaos seed, with `--chaos`.
    pub chaos_seed: Option<u64>,
    /// The coordinators' election TTL (s).
    pub election_ttl_seconds: f64,
    /// The probe's deadline (s).
    pub probe_deadline_seconds: f64,
}

/// Writes report.json and report.html into `dir`.
pub fn write(
    dir: &Path,
    settings: &Settings,
    seen: &Seen,
    figures: &Figures,
    verdicts: &[Verdict],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let report = json!({
        "passed": verdicts.iter().all(|v| v.ok),
        "settings": settings,
        "verdicts": verdicts,
        "figures": figures,
        "seen": seen,
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(
        dir.join("report.html"),
        html(settings, seen, figures, verdicts),
    )?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn color(phase: &str) -> &'static str {
    match phase {
        "waiting" => "#d9d9d9",
        "granted" | "preparing" => "#9ecae1",
        "updating" => "#fd8d3c",
        "rebooting" => "#fdd0a2",
        "verifying" => "#a1d99b",
        "finishing" => "#31a354",
        "failed" => "#de2d26",
        _ => "#bdbdbd",
    }
}

/// The page.
pub fn html(settings: &Settings, seen: &Seen, figures: &Figures, verdicts: &[Verdict]) -> String {
    let passed = verdicts.iter().all(|v| v.ok);
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Baton lab report</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:18px;color:#222}}\
         table{{border-collapse:collapse;margin:6px 0 14px}}td,th{{padding:3px 9px;border-bottom:1px solid #ddd;text-align:right}}\
         td:first-child,th:first-child,td.l{{text-align:left}}.ok{{color:#1a7f37;font-weight:600}}.bad{{color:#cf222e;font-weight:600}}\
         h1{{font-size:20px;margin:0 0 4px}}h2{{font-size:16px;margin:14px 0 4px}}.muted{{color:#666}}</style></head><body>"
    );
    let _ = write!(
        page,
        "<h1>Baton lab: {} <span class=\"{}\">{}</span></h1><div class=\"muted\">{} etcd nodes (stacked etcd) + {} workers, \
         2 coordinators (etcd store, mutual TLS), max concurrent {}, {}; rollout {:.1} s</div>",
        if settings.chaos_seed.is_some() {
            "chaos run"
        } else {
            "plain run"
        },
        if passed { "ok" } else { "bad" },
        if passed {
            "every monitor green"
        } else {
            "VIOLATIONS"
        },
        settings.etcd_nodes,
        settings.workers,
        settings.max_concurrent,
        settings
            .chaos_seed
            .map(|s| format!("chaos seed {s}"))
            .unwrap_or_else(|| "no faults".into()),
        figures.rollout_seconds
    );
    page.push_str(&svg(seen, settings));
    page.push_str("<h2>Monitors</h2><table><tr><th>monitor</th><th class=l>verdict</th><th class=l>what it saw</th></tr>");
    for v in verdicts {
        let _ = write!(
            page,
            "<tr><td>{}</td><td class=\"l {}\">{}</td><td class=l>{}</td></tr>",
            esc(&v.monitor),
            if v.ok { "ok" } else { "bad" },
            if v.ok { "PASS" } else { "FAIL" },
            esc(&v.summary)
        );
    }
    page.push_str("</table><h2>Per node (seconds)</h2><table><tr><th>node</th><th>waiting</th><th>preparing</th><th>updating</th><th>rebooting</th><th>verifying</th><th>update run</th><th>reboot</th><th>down</th><th>post-check</th><th>overhead</th><th>handoff</th></tr>");
    for f in &figures.nodes {
        let _ = write!(
            page,
            "<tr><td>{}{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td><b>{:.2}</b></td><td>{:.2}</td></tr>",
            esc(&f.node),
            if f.etcd { " (etcd)" } else { "" },
            f.waiting,
            f.preparing,
            f.updating,
            f.rebooting,
            f.verifying,
            f.update_run,
            f.reboot,
            f.down,
            f.post_check_run,
            f.overhead,
            f.handoff
        );
    }
    let _ = write!(
        page,
        "</table><div class=muted>Overhead: granted → released minus the update's run, the reboot (request → agent running again) \
         and the post-check's run, i.e. report and release round trips, state saves and the agent's start-up: mean {:.2} s, max {:.2} s per node (aim &lt; 1 s). \
         Handoff: the previous release (or the request) → the grant: workers {:.2} s, etcd nodes {:.2} s (the guard waits for the previous etcd node's member \
         to count as back, then takes a verified snapshot). etcd probe: {} writes, {:.2}% committed within the deadline, longest gap {:.2} s, slowest {:.0} ms.</div>",
        figures.mean_overhead,
        figures.max_overhead,
        figures.mean_handoff_workers,
        figures.mean_handoff_etcd,
        figures.probe_writes,
        figures.probe_success_rate * 100.0,
        figures.probe_longest_gap,
        figures.probe_max_latency_ms
    );
    if !seen.observations.is_empty() {
        page.push_str("<h2>Observations</h2><ul>");
        for o in &seen.observations {
            let _ = write!(page, "<li>{}</li>", esc(o));
        }
        page.push_str("</ul>");
    }
    if !seen.faults.is_empty() {
        page.push_str("<h2>Faults</h2><table><tr><th>at</th><th class=l>fault</th><th class=l>what</th><th class=l>what Baton did</th></tr>");
        for f in &seen.faults {
            let _ = write!(
                page,
                "<tr><td>{}</td><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td></tr>",
                f.at.format("%H:%M:%S%.3f"),
                esc(&f.kind),
                esc(&f.detail),
                esc(&f.effect)
            );
        }
        page.push_str("</table>");
    }
    page.push_str("<h2>Log</h2><details><summary>every event the lab saw</summary><pre>");
    for (at, line) in &seen.log {
        let _ = writeln!(page, "{} {}", at.format("%H:%M:%S%.3f"), esc(line));
    }
    page.push_str("</pre></details></body></html>\n");
    page
}

/// The timeline.
fn svg(seen: &Seen, settings: &Settings) -> String {
    let start = seen.started.unwrap_or_default() - Duration::seconds(2);
    let end = seen.finished.unwrap_or_else(chrono::Utc::now) + Duration::seconds(2);
    let span = ((end - start).num_milliseconds().max(1)) as f64 / 1000.0;
    let (left, width, lane) = (120.0, 1140.0, 26.0);
    let x = |t: Time| {
        left + ((t - start).num_milliseconds() as f64 / 1000.0 / span * width).clamp(0.0, width)
    };
    let top = 34.0;
    let lanes_h = lane * seen.nodes.len() as f64;
    let probe_top = top + lanes_h + 24.0;
    let probe_h = 90.0;
    let height = probe_top + probe_h + 56.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"system-ui,sans-serif\" font-size=\"11\">",
        left + width + 20.0
    );
    // Time axis.
    let step = if span > 240.0 {
        30
    } else if span > 90.0 {
        10
    } else {
        5
    };
    let mut tick = 0;
    while (tick as f64) <= span {
        let tx = left + tick as f64 / span * width;
        let _ = write!(
            s,
            "<line x1=\"{tx:.1}\" y1=\"{}\" x2=\"{tx:.1}\" y2=\"{}\" stroke=\"#eee\"/><text x=\"{tx:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#888\">{}s</text>",
            top - 4.0,
            probe_top + probe_h,
            probe_top + probe_h + 14.0,
            tick as i64 - 2
        );
        tick += step;
    }
    // Lanes.
    for (i, (name, node)) in seen.nodes.iter().enumerate() {
        let y = top + i as f64 * lane;
        let _ = write!(
            s,
            "<text x=\"4\" y=\"{:.1}\">{}{}</text>",
            y + 15.0,
            esc(name),
            if node.etcd { " ⬢" } else { "" }
        );
        let mut segments: Vec<(Time, String)> = Vec::new();
        if let Some(asked) = node.asked {
            segments.push((asked, "waiting".into()));
        }
        for (granted, token) in &node.grants {
            segments.push((*granted, "granted".into()));
            for (at, phase, t) in &node.phases {
                if t == token {
                    segments.push(((*at).max(*granted), phase.clone()));
                }
            }
            if let Some((r, ..)) = node.releases.iter().find(|(_, t, ..)| t == token) {
                segments.push((*r, "idle".into()));
            }
        }
        segments.sort_by_key(|(t, _)| *t);
        for (j, (at, phase)) in segments.iter().enumerate() {
            if phase == "idle" {
                continue;
            }
            let until = segments.get(j + 1).map(|(t, _)| *t).unwrap_or(end);
            let (x0, x1) = (x(*at), x(until));
            let _ = write!(
                s,
                "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"16\" fill=\"{}\"><title>{} {}</title></rect>",
                y + 3.0,
                (x1 - x0).max(0.5),
                color(phase),
                esc(name),
                esc(phase)
            );
        }
        for (a, b) in &node.down {
            let (x0, x1) = (x(*a), x(b.unwrap_or(end)));
            let _ = write!(
                s,
                "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"5\" fill=\"#222\"><title>{} down (host)</title></rect>\
                 <text x=\"{x0:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#222\">⟳</text>",
                y + 19.0,
                (x1 - x0).max(1.0),
                esc(name),
                y + 2.0
            );
        }
    }
    // The etcd probe.
    let deadline_ms = settings.probe_deadline_seconds * 1000.0;
    let max_ms = seen
        .probes
        .iter()
        .map(|p| p.latency_ms)
        .fold(50.0_f64, f64::max)
        .min(deadline_ms);
    let _ = write!(
        s,
        "<text x=\"4\" y=\"{:.1}\">etcd write</text><text x=\"4\" y=\"{:.1}\" fill=\"#888\">latency (max {:.0} ms)</text>\
         <rect x=\"{left}\" y=\"{probe_top}\" width=\"{width}\" height=\"{probe_h}\" fill=\"none\" stroke=\"#ccc\"/>",
        probe_top + 14.0,
        probe_top + 28.0,
        max_ms
    );
    let mut path = String::new();
    // Writes are recorded as they finish; draw them in the order they began.
    let mut probes: Vec<_> = seen.probes.iter().collect();
    probes.sort_by_key(|p| p.at);
    for p in probes {
        let px = x(p.at);
        let py = probe_top + probe_h - (p.latency_ms.min(max_ms) / max_ms) * (probe_h - 4.0);
        if p.ok {
            let _ = write!(
                path,
                "{}{px:.1},{py:.1} ",
                if path.is_empty() { "M" } else { "L" }
            );
        } else {
            let _ = write!(
                s,
                "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"#de2d26\"><title>write failed: {}</title></circle>",
                esc(&p.via)
            );
        }
    }
    let _ = write!(
        s,
        "<path d=\"{path}\" fill=\"none\" stroke=\"#3182bd\" stroke-width=\"1\"/>"
    );
    // Leader changes.
    for (at, leader) in &seen.leaders {
        let lx = x(*at);
        let _ = write!(
            s,
            "<line x1=\"{lx:.1}\" y1=\"{}\" x2=\"{lx:.1}\" y2=\"{}\" stroke=\"#6a51a3\" stroke-dasharray=\"3,3\"/>\
             <text x=\"{:.1}\" y=\"12\" fill=\"#6a51a3\">{}</text>",
            top - 8.0,
            probe_top + probe_h,
            lx + 2.0,
            esc(leader.as_deref().unwrap_or("no leader"))
        );
    }
    // Faults.
    for (i, f) in seen.faults.iter().enumerate() {
        let fx = x(f.at);
        if let Some(until) = f.until {
            let _ = write!(
                s,
                "<rect x=\"{fx:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"#de2d26\" opacity=\"0.08\"/>",
                top - 4.0,
                (x(until) - fx).max(1.0),
                probe_top + probe_h - top + 4.0
            );
        }
        let _ = write!(
            s,
            "<line x1=\"{fx:.1}\" y1=\"{}\" x2=\"{fx:.1}\" y2=\"{}\" stroke=\"#de2d26\" stroke-width=\"1.5\"><title>{}</title></line>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#de2d26\">⚡{}</text>",
            top - 4.0,
            probe_top + probe_h + 20.0,
            esc(&f.detail),
            fx + 2.0,
            probe_top + probe_h + 30.0 + (i % 2) as f64 * 12.0,
            esc(&f.kind)
        );
    }
    // Legend.
    let mut lx = left;
    let ly = height - 8.0;
    for phase in [
        "waiting",
        "preparing",
        "updating",
        "rebooting",
        "verifying",
        "finishing",
    ] {
        let _ = write!(
            s,
            "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{ly}\">{phase}</text>",
            ly - 9.0,
            color(phase),
            lx + 15.0
        );
        lx += 90.0;
    }
    let _ = write!(
        s,
        "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"5\" fill=\"#222\"/><text x=\"{}\" y=\"{ly}\">down (host records) ⟳ reboot</text>\
         <line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{ly}\" stroke=\"#6a51a3\" stroke-dasharray=\"3,3\"/><text x=\"{}\" y=\"{ly}\">leader change</text>\
         <text x=\"{}\" y=\"{ly}\" fill=\"#de2d26\">⚡ fault</text></svg>",
        ly - 6.0,
        lx + 15.0,
        lx + 200.0,
        ly - 10.0,
        lx + 200.0,
        lx + 205.0,
        lx + 300.0
    );
    s
}
