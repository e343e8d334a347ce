//! The charts of `cargo xtask bench peers`: grouped bars with min-max whiskers, drawn by
//! `plotters` into SVG files that BENCHMARKS.md links to.
//!
//! No font files: the SVG backend writes `<text>` elements and the viewer lays them out
//! (plotters' own text measure is an estimate then, good enough for axis labels).

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::prelude::*;

/// One bar: the median of the repeats of `series` in `group`, with their min and max.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub group: String,
    pub series: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 540;
/// The share of a group's slot the bars take; the rest is the gap between groups.
const GROUP_FILL: f64 = 0.8;
/// Half the width of a whisker's caps, as a share of one bar's width.
const CAP: f64 = 0.25;
const FONT: &str = "sans-serif";

/// Grouped bar chart, one colour per series, min-max whiskers, SVG at `path`.
///
/// Groups and series keep the order of their first appearance in `bars`; a series missing
/// from a group leaves its slot empty. Bars start at zero (negative medians go down).
pub fn bars(path: &Path, title: &str, y_label: &str, bars: &[Bar]) -> Result<()> {
    let groups = first_seen(bars.iter().map(|b| b.group.as_str()));
    let series = first_seen(bars.iter().map(|b| b.series.as_str()));
    if groups.is_empty() {
        return Err(anyhow!("{}: no bars to draw", path.display()));
    }
    let (y_low, y_high) = y_range(bars);
    let n = groups.len();
    let slot = GROUP_FILL / series.len() as f64;

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    // Group `i` is centred on x = i; its label is written at that key point only (plotters
    // picks unit steps for n + 1 labels over a span of n).
    let x_axis = -0.5..n as f64 - 0.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_axis, y_low..y_high)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .y_desc(y_label)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-9 && i >= 0.0 && (i as usize) < n {
                groups[i as usize].to_owned()
            } else {
                String::new()
            }
        })
        .label_style((FONT, 13))
        .draw()
        .map_err(|e| draw(&e))?;

    for (s, name) in series.iter().enumerate() {
        let colour = Palette99::pick(s).to_rgba();
        let mine: Vec<(f64, &Bar)> = bars
            .iter()
            .filter(|b| b.series == *name)
            .filter_map(|b| {
                let g = groups.iter().position(|g| *g == b.group)?;
                Some((g as f64 - GROUP_FILL / 2.0 + s as f64 * slot, b))
            })
            .collect();
        chart
            .draw_series(mine.iter().map(|(left, b)| {
                Rectangle::new([(*left, 0.0), (left + slot, b.median)], colour.filled())
            }))
            .map_err(|e| draw(&e))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled()));
        // Whiskers: a vertical line from min to max with caps at both ends.
        chart
            .draw_series(mine.iter().flat_map(|(left, b)| {
                let mid = left + slot / 2.0;
                let cap = slot * CAP;
                [
                    PathElement::new(vec![(mid, b.min), (mid, b.max)], BLACK),
                    PathElement::new(vec![(mid - cap, b.min), (mid + cap, b.min)], BLACK),
                    PathElement::new(vec![(mid - cap, b.max), (mid + cap, b.max)], BLACK),
                ]
            }))
            .map_err(|e| draw(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(|e| draw(&e))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The distinct values of `items`, in the order they first appear.
fn first_seen<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen
}

/// From zero (or the lowest value below it) to the highest value (or zero), with headroom
/// for the legend; a chart of zeros gets a unit range.
fn y_range(bars: &[Bar]) -> (f64, f64) {
    let values = bars.iter().flat_map(|b| [b.median, b.min, b.max]);
    let finite: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    let low = finite.iter().copied().fold(0.0_f64, f64::min);
    let high = finite.iter().copied().fold(0.0_f64, f64::max);
    let span = high - low;
    if span == 0.0 {
        return (0.0, 1.0);
    }
    // Headroom for the legend above the bars, and a margin below negative bars.
    let below = if low < 0.0 { span * 0.05 } else { 0.0 };
    (low - below, high + span * 0.3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(group: &str, series: &str, median: f64, min: f64, max: f64) -> Bar {
        Bar {
            group: group.into(),
            series: series.into(),
            median,
            min,
            max,
        }
    }

    #[test]
    fn a_grouped_chart_is_written_with_every_label() {
        let dir = std::env::temp_dir().join(format!("peers-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.svg");
        let bars = [
            bar("1 key", "agent, native XDP", 12.0, 11.0, 13.5),
            bar("1 key", "nftables meter", 40.0, 38.0, 45.0),
            bar("1,000 keys", "agent, native XDP", 14.0, 13.0, 15.0),
            bar("1,000 keys", "nftables meter", 55.0, 50.0, 61.0),
            bar("100,000 keys", "nftables meter", -3.0, -4.0, -1.0),
        ];
        super::bars(&path, "CPU per offered packet", "ns", &bars).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for label in [
            "CPU per offered packet",
            "ns",
            "1 key",
            "1,000 keys",
            "100,000 keys",
            "agent, native XDP",
            "nftables meter",
        ] {
            assert!(svg.contains(label), "{label:?} missing from the SVG");
        }
        // One filled rectangle per bar, plus the legend's two and the background.
        let rects = svg.matches("<rect").count();
        assert!(
            rects >= bars.len() + 2,
            "{rects} rectangles for {} bars",
            bars.len()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let path = std::env::temp_dir().join("peers-plot-empty.svg");
        let err = super::bars(&path, "t", "y", &[]).unwrap_err();
        assert!(err.to_string().contains("no bars"), "{err}");
    }

    #[test]
    fn the_y_range_holds_every_whisker() {
        assert_eq!(y_range(&[]), (0.0, 1.0));
        let (low, high) = y_range(&[bar("g", "s", 10.0, 8.0, 20.0)]);
        assert_eq!(low, 0.0);
        assert!(high >= 20.0);
        let (low, high) = y_range(&[bar("g", "s", -10.0, -12.0, -8.0)]);
        assert!(low <= -12.0 && high >= 0.0, "{low}..{high}");
    }
}
