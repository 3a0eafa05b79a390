//! A small hand-written SVG of the fleet bench: handoff latency (p50 solid,
//! p99 dashed, log scale) and the coordinator's peak RSS against the number
//! of waiters (log scale), one colour per `--max-concurrent`. Runs that did
//! not finish are drawn hollow with the figures they reached.

use std::fmt::Write;

/// One point of a series.
pub struct Point {
    /// Waiters.
    pub waiters: f64,
    /// Handoff p50, ms.
    pub p50_ms: f64,
    /// Handoff p99, ms.
    pub p99_ms: f64,
    /// Coordinator peak RSS, MiB.
    pub rss_mib: f64,
    /// False when the run hit its deadline.
    pub finished: bool,
}

/// A series: the runs with one `--max-concurrent`.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Its points, by waiters.
    pub points: Vec<Point>,
}

const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
const W: f64 = 460.0;
const H: f64 = 300.0;
const LEFT: f64 = 64.0;
const TOP: f64 = 40.0;
const PLOT_W: f64 = W - LEFT - 20.0;
const PLOT_H: f64 = H - TOP - 50.0;

/// An axis: maps values to pixels, linear or log10.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Self {
        let (mut lo, mut hi) = values
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if lo > hi {
            (lo, hi) = (1.0, 10.0);
        }
        if log {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil().max(lo.log10() + 1.0));
        } else {
            lo = 0.0;
            hi = nice_ceiling(hi);
        }
        Self { lo, hi, log }
    }

    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut t = Vec::new();
            let mut v = self.lo;
            while v <= self.hi * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            (0..=4)
                .map(|i| self.lo + (self.hi - self.lo) * i as f64 / 4.0)
                .collect()
        }
    }
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * magnitude)
}

fn label(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", v / 1000.0)
    } else if v >= 1.0 || v == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.2}")
    }
}

/// One line of a panel: the value it plots and its dash pattern.
type Line<'a> = (&'a dyn Fn(&Point) -> f64, &'a str);

/// A panel offset by `dx`, plotting `y` of every series.
fn panel(
    svg: &mut String,
    dx: f64,
    title: &str,
    series: &[Series],
    x: &Axis,
    y: &Axis,
    lines: &[Line<'_>],
) {
    let px = |v: f64| dx + LEFT + x.frac(v) * PLOT_W;
    let py = |v: f64| TOP + PLOT_H - y.frac(v) * PLOT_H;
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" font-size="14" font-weight="bold">{title}</text>"#,
        dx + LEFT
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#444"/>"##,
        dx + LEFT
    );
    for t in y.ticks() {
        let _ = writeln!(
            svg,
            r##"<line x1="{0}" x2="{1}" y1="{2}" y2="{2}" stroke="#ddd"/><text x="{3}" y="{4}" font-size="11" text-anchor="end">{5}</text>"##,
            dx + LEFT,
            dx + LEFT + PLOT_W,
            py(t),
            dx + LEFT - 6.0,
            py(t) + 4.0,
            label(t)
        );
    }
    for t in x.ticks() {
        let _ = writeln!(
            svg,
            r##"<line x1="{0}" x2="{0}" y1="{TOP}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" font-size="11" text-anchor="middle">{3}</text>"##,
            px(t),
            TOP + PLOT_H,
            TOP + PLOT_H + 16.0,
            label(t)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">waiters</text>"#,
        dx + LEFT + PLOT_W / 2.0,
        TOP + PLOT_H + 34.0
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        for (value, dash) in lines {
            let path: Vec<String> = s
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", px(p.waiters), py(value(p))))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
                path.join(" ")
            );
            for p in &s.points {
                let fill = if p.finished { colour } else { "white" };
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{fill}" stroke="{colour}" stroke-width="2"/>"#,
                    px(p.waiters),
                    py(value(p))
                );
            }
        }
    }
}

/// Renders the two panels with a legend.
pub fn render(title: &str, series: &[Series]) -> String {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let x = Axis::new(points().map(|p| p.waiters), true);
    let latency = Axis::new(points().flat_map(|p| [p.p50_ms, p.p99_ms]), true);
    let rss = Axis::new(points().map(|p| p.rss_mib), false);
    let width = 2.0 * W;
    let height = H + 24.0 + 18.0 * series.len() as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/><title>{title}</title>"#
    );
    let p50 = |p: &Point| p.p50_ms;
    let p99 = |p: &Point| p.p99_ms;
    let mib = |p: &Point| p.rss_mib;
    panel(
        &mut svg,
        0.0,
        "handoff latency, ms (p50 solid, p99 dashed)",
        series,
        &x,
        &latency,
        &[(&p50, "none"), (&p99, "6 4")],
    );
    panel(
        &mut svg,
        W,
        "coordinator peak RSS, MiB",
        series,
        &x,
        &rss,
        &[(&mib, "none")],
    );
    for (i, s) in series.iter().enumerate() {
        let y = H + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{LEFT}" y="{}" width="14" height="4" fill="{}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            y - 4.0,
            COLOURS[i % COLOURS.len()],
            LEFT + 20.0,
            y,
            s.label
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" font-size="11" fill="#555">hollow: the run hit its deadline (figures up to then)</text>"##,
        W + LEFT,
        H + 14.0
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_point_and_a_closed_document() {
        let series = vec![Series {
            label: "max 1".into(),
            points: vec![
                Point {
                    waiters: 1000.0,
                    p50_ms: 2.0,
                    p99_ms: 5.0,
                    rss_mib: 20.0,
                    finished: true,
                },
                Point {
                    waiters: 10000.0,
                    p50_ms: 30.0,
                    p99_ms: 90.0,
                    rss_mib: 80.0,
                    finished: false,
                },
            ],
        }];
        let svg = render("fleet", &series);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        // Two points on each of three lines (p50, p99, RSS).
        assert_eq!(svg.matches("<circle").count(), 6);
        assert_eq!(svg.matches(r#"fill="white" stroke"#).count(), 3);
        assert!(!svg.contains("NaN"));
    }
}
