//! Time-series line charts drawn as SVG on the server: no script, no inline style (colours
//! come from classes in the stylesheet, so brands recolour them), and a text summary for
//! screen readers. Points are `(unix ms, value)`; a gap longer than three steps breaks
//! the line rather than drawing across missing data.

use crate::escape;
use std::fmt::Write;

/// How values are labelled on the axis and in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// 0-100, axis fixed at 100.
    Percent,
    Bytes,
    BytesPerSecond,
    Plain,
}

impl Unit {
    /// `value` as text in this unit (`42.0 %`, `1.5 GiB`, `320 KiB/s`).
    pub fn format(self, value: f64) -> String {
        match self {
            Unit::Percent => format!("{value:.1} %"),
            Unit::Bytes => bytes(value),
            Unit::BytesPerSecond => format!("{}/s", bytes(value)),
            Unit::Plain => {
                if value.fract() == 0.0 {
                    format!("{value:.0}")
                } else {
                    format!("{value:.2}")
                }
            }
        }
    }
}

/// Bytes in binary units (`512 B`, `1.5 KiB`, `3.2 GiB`).
pub fn bytes(value: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = value;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One line of a chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Legend text (`/`, `eth0 received`).
    pub label: String,
    /// `(unix ms, value)` in time order.
    pub points: Vec<(i64, f64)>,
}

/// A chart: a title, a unit, the time range shown and up to four series (more are cut).
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub unit: Unit,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Width of one bucket, for finding gaps.
    pub step_ms: i64,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 170.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 8.0;
const BOTTOM: f64 = 22.0;
/// Most series drawn in one chart (one colour each).
pub const MAX_SERIES: usize = 4;

/// The chart as a `<figure>` with an inline `<svg>` (role `img`, titled, with the latest
/// values as its description) and a legend; a "no data" note when nothing was collected.
pub fn render(chart: &Chart, id: &str) -> String {
    let id = escape(id);
    let title = escape(&chart.title);
    let series: Vec<&Series> = chart.series.iter().filter(|s| !s.points.is_empty()).take(MAX_SERIES).collect();
    let mut html = format!("<figure class=\"card chart-card\" aria-labelledby=\"{id}-t\"><figcaption id=\"{id}-t\"><strong>{title}</strong></figcaption>");
    if series.is_empty() {
        html.push_str("<p class=\"muted\">No data in this period. Agents send host metrics every few seconds once connected.</p></figure>");
        return html;
    }
    let span = (chart.to_ms - chart.from_ms).max(1) as f64;
    let max_value = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0_f64, f64::max);
    let top = match chart.unit {
        Unit::Percent => 100.0_f64.max(max_value),
        _ => nice_ceiling(max_value),
    };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ms: i64| LEFT + ((ms - chart.from_ms) as f64 / span).clamp(0.0, 1.0) * plot_w;
    let y = |v: f64| TOP + plot_h - (v / top).clamp(0.0, 1.0) * plot_h;
    let summary: Vec<String> = series
        .iter()
        .map(|s| {
            let last = s.points.last().map(|p| p.1).unwrap_or(0.0);
            let peak = s.points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
            format!("{}: now {}, peak {}", s.label, chart.unit.format(last), chart.unit.format(peak))
        })
        .collect();
    let _ = write!(
        html,
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-labelledby=\"{id}-t {id}-d\" preserveAspectRatio=\"none\"><desc id=\"{id}-d\">{}</desc>",
        escape(&summary.join("; "))
    );
    for i in 0..=4 {
        let value = top * f64::from(i) / 4.0;
        let gy = y(value);
        let _ = write!(
            html,
            "<line class=\"grid-line\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{gy:.1}\" y2=\"{gy:.1}\"/><text class=\"axis-label\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            gy + 4.0,
            escape(&chart.unit.format(value))
        );
    }
    let _ = write!(
        html,
        "<text class=\"axis-label\" x=\"{LEFT}\" y=\"{}\">{}</text><text class=\"axis-label\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        HEIGHT - 6.0,
        clock(chart.from_ms),
        WIDTH - RIGHT,
        HEIGHT - 6.0,
        clock(chart.to_ms)
    );
    let gap = chart.step_ms.max(1) * 3;
    for (index, s) in series.iter().enumerate() {
        let mut path = String::with_capacity(s.points.len() * 14);
        let mut previous: Option<i64> = None;
        for &(ms, value) in &s.points {
            let command = if previous.is_none_or(|p| ms - p > gap) { 'M' } else { 'L' };
            let _ = write!(path, "{command}{:.1} {:.1}", x(ms), y(value));
            previous = Some(ms);
        }
        let _ = write!(html, "<path class=\"series series-{index}\" d=\"{path}\"/>");
    }
    html.push_str("</svg><ul class=\"legend\">");
    for (index, text) in summary.iter().enumerate() {
        let _ = write!(html, "<li><span class=\"swatch swatch-{index}\" aria-hidden=\"true\"></span>{}</li>", escape(text));
    }
    html.push_str("</ul></figure>");
    html
}

/// The smallest of 1, 2, 2.5 or 5 times a power of ten at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    for factor in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if factor * magnitude >= value {
            return factor * magnitude;
        }
    }
    10.0 * magnitude
}

/// `HH:MM` UTC of a Unix-milliseconds time.
fn clock(ms: i64) -> String {
    let minutes = ms.div_euclid(60_000);
    format!("{:02}:{:02} UTC", minutes.div_euclid(60).rem_euclid(24), minutes.rem_euclid(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series>) -> Chart {
        Chart { title: "CPU <all>".into(), unit: Unit::Percent, from_ms: 0, to_ms: 600_000, step_ms: 60_000, series }
    }

    #[test]
    fn draws_lines_with_an_accessible_summary() {
        let s = Series { label: "cpu".into(), points: vec![(0, 10.0), (60_000, 50.0), (120_000, 25.0)] };
        let html = render(&chart(vec![s]), "cpu");
        assert!(html.contains("role=\"img\"") && html.contains("<desc id=\"cpu-d\">cpu: now 25.0 %, peak 50.0 %</desc>"), "{html}");
        assert!(html.contains("class=\"series series-0\" d=\"M64.0 "));
        assert!(html.contains("CPU &lt;all&gt;"));
        assert!(!html.contains("style="), "the CSP blocks inline styles");
    }

    #[test]
    fn gaps_break_the_line_and_no_data_says_so() {
        let s = Series { label: "cpu".into(), points: vec![(0, 10.0), (60_000, 10.0), (500_000, 10.0)] };
        let html = render(&chart(vec![s]), "c");
        let path = html.split("series-0\" d=\"").nth(1).unwrap();
        assert_eq!(path.split('"').next().unwrap().matches('M').count(), 2, "{path}");
        assert!(render(&chart(vec![]), "c").contains("No data in this period"));
    }

    #[test]
    fn units_and_scales() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(Unit::BytesPerSecond.format(3.0 * 1024.0 * 1024.0), "3.0 MiB/s");
        assert_eq!(nice_ceiling(3.2e9), 5e9);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(clock(3_600_000 * 25 + 60_000 * 7), "01:07 UTC");
    }
}
