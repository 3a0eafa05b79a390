//! Live progress: on a terminal, a line per node (phase, token, why it
//! waits), a line with the leading coordinator, who holds the baton and the
//! etcd members' health, and an overall bar (indicatif); otherwise (a pipe,
//! CI) plain lines as things happen.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::seen::{Seen, Shared};

/// One line about the cluster: leader, holders, etcd members.
fn cluster_line(seen: &Seen) -> String {
    let holders: Vec<String> = seen
        .nodes
        .iter()
        .filter(|(_, n)| n.token != 0)
        .map(|(name, n)| format!("{name}#{}", n.token))
        .collect();
    let members: Vec<String> = seen
        .members
        .iter()
        .map(|(name, m)| {
            format!(
                "{name}:{}",
                match (m.up, m.leader) {
                    (true, true) => "leader",
                    (true, false) => "up",
                    (false, _) => "DOWN",
                }
            )
        })
        .collect();
    format!(
        "coordinator {} | baton: {} | etcd {}",
        seen.leader().unwrap_or("(none ready)"),
        if holders.is_empty() {
            "-".to_string()
        } else {
            holders.join(" ")
        },
        members.join(" ")
    )
}

fn node_line(name: &str, seen: &Seen) -> String {
    let Some(n) = seen.nodes.get(name) else {
        return name.to_string();
    };
    let down = n.down.last().is_some_and(|d| d.1.is_none());
    let mut line = format!(
        "{name:<10} {:<10}{}",
        if down { "DOWN" } else { n.phase.as_str() },
        if n.token != 0 {
            format!(" token {}", n.token)
        } else {
            String::new()
        }
    );
    if !n.reason.is_empty() {
        let reason: String = n
            .reason
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(110)
            .collect();
        line.push_str(&format!("  ({reason})"));
    }
    line
}

/// Shows progress until `cancel`.
pub async fn show(shared: Shared, cancel: CancellationToken) {
    if std::io::stdout().is_terminal() {
        bars(shared, cancel).await
    } else {
        plain(shared, cancel).await
    }
}

async fn plain(shared: Shared, cancel: CancellationToken) {
    let mut printed = 0usize;
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => false,
            _ = cancel.cancelled() => true,
        };
        {
            let seen = shared.lock();
            for (at, line) in &seen.log[printed..] {
                println!("[{}] {line}", at.format("%H:%M:%S%.3f"));
            }
            printed = seen.log.len();
        }
        if stop {
            return;
        }
    }
}

async fn bars(shared: Shared, cancel: CancellationToken) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template("{msg}").expect("static template");
    let header = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
    let names: Vec<String> = shared.lock().nodes.keys().cloned().collect();
    let lines: Vec<ProgressBar> = names
        .iter()
        .map(|_| multi.add(ProgressBar::new_spinner().with_style(style.clone())))
        .collect();
    let overall = multi.add(
        ProgressBar::new(names.len() as u64).with_style(
            ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:40} {pos}/{len} nodes done  {msg}",
            )
            .expect("static template"),
        ),
    );
    let mut printed = shared.lock().log.len();
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => false,
            _ = cancel.cancelled() => true,
        };
        {
            let seen = shared.lock();
            header.set_message(cluster_line(&seen));
            for (bar, name) in lines.iter().zip(&names) {
                bar.set_message(node_line(name, &seen));
            }
            overall.set_position(seen.done() as u64);
            // Faults and violations scroll above the bars.
            for (_, line) in &seen.log[printed..] {
                if line.starts_with("CHAOS") || line.starts_with("VIOLATION") {
                    let _ = multi.println(line);
                }
            }
            printed = seen.log.len();
            overall.set_message(format!(
                "{} faults, {} violations",
                seen.faults.len(),
                seen.violations.len()
            ));
        }
        if stop {
            break;
        }
    }
    for bar in lines.iter().chain([&header, &overall]) {
        bar.finish();
    }
}
