//! The `--chart` SVGs: for fanout, publish msgs/s and deliveries acked/s of
//! each run against its number of subscriptions, as one standalone line
//! chart with round axis ticks and a legend; for scale, a panel per curve.

use super::report::{ScalePoint, WorkloadResult};

/// One fanout run on the chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ChartPoint {
    subscriptions: u32,
    publish_msgs_per_s: f64,
    deliveries_acked_per_s: f64,
}

/// The fanout runs among `results`, by subscription count.
pub(super) fn chart_points(results: &[WorkloadResult]) -> Vec<ChartPoint> {
    let mut points: Vec<ChartPoint> = results
        .iter()
        .filter_map(|r| match r {
            WorkloadResult::Fanout(f) => Some(ChartPoint {
                subscriptions: f.params.subscriptions,
                publish_msgs_per_s: f.publish_msgs_per_s,
                deliveries_acked_per_s: f.deliveries_acked_per_s,
            }),
            _ => None,
        })
        .collect();
    points.sort_by_key(|p| p.subscriptions);
    points
}

/// The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10^k) at
/// least `x` (and at least 1): an axis maximum whose fifths are round too.
fn nice_ceiling(x: f64) -> f64 {
    if x <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(x.log10().floor());
    for step in [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if step * magnitude >= x {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

/// A rate for an axis label: `500`, `25k`, `1.5M`.
fn short_rate(x: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if x >= 1e6 {
        format!("{}M", trim(format!("{:.2}", x / 1e6)))
    } else if x >= 1e3 {
        format!("{}k", trim(format!("{:.1}", x / 1e3)))
    } else {
        trim(format!("{x:.1}"))
    }
}

/// `s` with the XML special characters escaped.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The opening of a chart `w` by `h`: the svg element, a white
/// background, a title at `title_y` and a grey `subtitle` (already
/// escaped) under it.
fn svg_open(
    put: &mut impl FnMut(String),
    w: f64,
    h: f64,
    title_y: f64,
    title: &str,
    subtitle: &str,
) {
    put(format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    ));
    put(format!(r#"<rect width="{w}" height="{h}" fill="white"/>"#));
    put(format!(
        r#"<text x="{}" y="{title_y}" text-anchor="middle" font-size="16">{}</text>"#,
        w / 2.0,
        xml_escape(title)
    ));
    put(format!(
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">{subtitle}</text>"##,
        w / 2.0,
        title_y + 18.0
    ));
}

/// Horizontal grid lines with their y labels (`label_gap` left of the
/// axis) and the two axes of the plot area `(left, top, width, height)`,
/// whose y axis goes from 0 to `y_max` in `ticks` steps.
fn grid_and_axes(
    put: &mut impl FnMut(String),
    (left, top, pw, ph): (f64, f64, f64, f64),
    y_max: f64,
    ticks: u32,
    label_gap: f64,
) {
    for i in 0..=ticks {
        let v = y_max * f64::from(i) / f64::from(ticks);
        let yy = top + ph - v / y_max * ph;
        put(format!(
            r##"<line x1="{left:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
            left + pw
        ));
        put(format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - label_gap,
            yy + 4.0,
            short_rate(v)
        ));
    }
    put(format!(
        r#"<line x1="{left:.1}" y1="{top}" x2="{left:.1}" y2="{:.1}" stroke="black"/>"#,
        top + ph
    ));
    put(format!(
        r#"<line x1="{left:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        top + ph,
        left + pw,
        top + ph
    ));
}

/// A chart series: legend label, colour, value of a point.
type Series = (&'static str, &'static str, fn(&ChartPoint) -> f64);

/// A line chart of publish msgs/s and deliveries acked/s against the
/// number of subscriptions, as standalone SVG text.
pub(super) fn chart_svg(points: &[ChartPoint], fsync_mode: &str) -> String {
    const W: f64 = 760.0;
    const H: f64 = 490.0;
    const LEFT: f64 = 90.0;
    const RIGHT: f64 = 30.0;
    const TOP: f64 = 60.0;
    const BOTTOM: f64 = 100.0;
    const Y_TICKS: u32 = 5;
    let series: [Series; 2] = [
        ("publish msgs/s", "#1f77b4", |p| p.publish_msgs_per_s),
        ("deliveries acked/s (all subscriptions)", "#d62728", |p| {
            p.deliveries_acked_per_s
        }),
    ];
    let x_max = f64::from(
        points
            .iter()
            .map(|p| p.subscriptions)
            .max()
            .unwrap_or(1)
            .max(1),
    );
    let y_top = points
        .iter()
        .flat_map(|p| [p.publish_msgs_per_s, p.deliveries_acked_per_s])
        .fold(0.0, f64::max);
    let y_max = nice_ceiling(y_top * 1.05);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |subs: u32| LEFT + f64::from(subs) / x_max * pw;
    let y = |v: f64| TOP + ph - v / y_max * ph;

    let mut svg = String::new();
    let mut put = |s: String| {
        svg.push_str(&s);
        svg.push('\n');
    };
    svg_open(
        &mut put,
        W,
        H,
        28.0,
        "courier bench fanout: throughput vs subscriptions",
        &format!(
            "fsync {}; publish = messages confirmed/s; deliveries = acks confirmed/s summed over subscriptions",
            xml_escape(fsync_mode)
        ),
    );
    grid_and_axes(&mut put, (LEFT, TOP, pw, ph), y_max, Y_TICKS, 8.0);
    // X ticks at each measured subscription count, plus 0.
    let mut ticks: Vec<u32> = points.iter().map(|p| p.subscriptions).collect();
    ticks.insert(0, 0);
    ticks.dedup();
    for t in ticks {
        let xx = x(t);
        put(format!(
            r#"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="black"/>"#,
            TOP + ph,
            TOP + ph + 5.0
        ));
        put(format!(
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t}</text>"#,
            TOP + ph + 20.0
        ));
    }
    put(format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">subscriptions</text>"#,
        LEFT + pw / 2.0,
        TOP + ph + 42.0
    ));
    put(format!(
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">messages / s</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    ));
    // The series: a polyline and a dot per point.
    for (_, color, value) in &series {
        let coords: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.subscriptions), y(value(p))))
            .collect();
        put(format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            coords.join(" ")
        ));
        for p in points {
            put(format!(
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{} subscriptions: {:.0}/s</title></circle>"#,
                x(p.subscriptions),
                y(value(p)),
                p.subscriptions,
                value(p)
            ));
        }
    }
    // Legend, in one row below the axis label, outside the plot.
    let ly = TOP + ph + 72.0;
    let mut lx = LEFT;
    for (label, color, _) in &series {
        put(format!(
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/>"#,
            lx + 24.0
        ));
        put(format!(
            r#"<circle cx="{:.1}" cy="{ly:.1}" r="3.5" fill="{color}"/>"#,
            lx + 12.0
        ));
        put(format!(
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 32.0,
            ly + 4.0,
            xml_escape(label)
        ));
        lx += 32.0 + 7.0 * label.len() as f64 + 30.0;
    }
    put("</svg>".to_string());
    svg
}

/// A `scale` series: legend label, colour, value of a point.
type ScaleSeries = (&'static str, &'static str, fn(&ScalePoint) -> f64);

/// A `scale` panel: one curve, its points evenly spaced in order (the
/// counts grow tenfold), one or two series, and under each point the
/// broker's threads and resident memory.
struct Panel<'a> {
    title: &'static str,
    x_label: &'static str,
    unit: &'static str,
    points: Vec<&'a ScalePoint>,
    series: Vec<ScaleSeries>,
    tick: fn(&ScalePoint) -> String,
}

/// The `--chart` SVG of `scale`: a panel per curve, side by side.
pub(super) fn scale_svg(results: &[WorkloadResult], fsync_mode: &str) -> String {
    const PANEL_W: f64 = 400.0;
    const H: f64 = 470.0;
    let points: Vec<&ScalePoint> = results
        .iter()
        .filter_map(|r| match r {
            WorkloadResult::Scale(s) => Some(s.points.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let of = |curve: &str| -> Vec<&ScalePoint> {
        points
            .iter()
            .copied()
            .filter(|p| p.curve == curve)
            .collect()
    };
    let panels = [
        Panel {
            title: "single-message publishers vs topics",
            x_label: "topics",
            unit: "messages / s",
            points: of("topics"),
            series: vec![("publish msgs/s", "#1f77b4", |p| p.publish_msgs_per_s)],
            tick: |p| short_rate(f64::from(p.topics)),
        },
        Panel {
            title: "fan-out vs subscriptions",
            x_label: "subscriptions",
            unit: "messages / s",
            points: of("subscriptions"),
            series: vec![
                ("publish msgs/s", "#1f77b4", |p| p.publish_msgs_per_s),
                ("deliveries acked/s", "#d62728", |p| {
                    p.deliveries_acked_per_s.unwrap_or(0.0)
                }),
            ],
            tick: |p| short_rate(f64::from(p.subscriptions)),
        },
        Panel {
            title: "publish bandwidth vs message size",
            x_label: "message size",
            unit: "MB / s",
            points: of("size"),
            series: vec![("publish MB/s", "#2ca02c", |p| p.publish_mb_per_s)],
            tick: |p| short_bytes(p.size),
        },
    ];
    let w = PANEL_W * panels.len() as f64;
    let mut svg = String::new();
    let mut put = |s: String| {
        svg.push_str(&s);
        svg.push('\n');
    };
    svg_open(
        &mut put,
        w,
        H,
        26.0,
        "courier bench scale",
        &format!(
            "fsync {}; under each point: the broker's threads and resident memory after it",
            xml_escape(fsync_mode)
        ),
    );
    for (i, panel) in panels.iter().enumerate() {
        panel_svg(&mut put, panel, PANEL_W * i as f64, PANEL_W, H);
    }
    put("</svg>".to_string());
    svg
}

fn panel_svg(put: &mut impl FnMut(String), panel: &Panel<'_>, x0: f64, w: f64, h: f64) {
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 80.0;
    const BOTTOM: f64 = 130.0;
    const Y_TICKS: u32 = 5;
    let (pw, ph) = (w - LEFT - RIGHT, h - TOP - BOTTOM);
    let left = x0 + LEFT;
    let n = panel.points.len().max(1);
    let x = |i: usize| left + (i as f64 + 0.5) / n as f64 * pw;
    let y_top = panel
        .points
        .iter()
        .flat_map(|p| panel.series.iter().map(|(_, _, v)| v(p)))
        .fold(0.0, f64::max);
    let y_max = nice_ceiling(y_top * 1.05);
    let y = |v: f64| TOP + ph - v / y_max * ph;
    put(format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14">{}</text>"#,
        left + pw / 2.0,
        TOP - 16.0,
        xml_escape(panel.title)
    ));
    grid_and_axes(put, (left, TOP, pw, ph), y_max, Y_TICKS, 6.0);
    for (i, p) in panel.points.iter().enumerate() {
        let xx = x(i);
        put(format!(
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 18.0,
            (panel.tick)(p)
        ));
        let threads = p.threads.map_or("?".to_string(), |t| t.to_string());
        let memory = p.vm_rss_bytes.unwrap_or(p.resident_memory_bytes) / (1024 * 1024);
        put(format!(
            r##"<text x="{xx:.1}" y="{:.1}" text-anchor="middle" fill="#555" font-size="10">{threads} thr</text>"##,
            TOP + ph + 32.0
        ));
        put(format!(
            r##"<text x="{xx:.1}" y="{:.1}" text-anchor="middle" fill="#555" font-size="10">{memory} MiB</text>"##,
            TOP + ph + 44.0
        ));
    }
    put(format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        TOP + ph + 64.0,
        panel.x_label
    ));
    let (ax, ay) = (x0 + 16.0, TOP + ph / 2.0);
    put(format!(
        r#"<text x="{ax:.1}" y="{ay:.1}" text-anchor="middle" transform="rotate(-90 {ax:.1} {ay:.1})">{}</text>"#,
        panel.unit
    ));
    for (_, color, value) in &panel.series {
        let coords: Vec<String> = panel
            .points
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:.1},{:.1}", x(i), y(value(p))))
            .collect();
        put(format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            coords.join(" ")
        ));
        for (i, p) in panel.points.iter().enumerate() {
            put(format!(
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{}: {:.1}</title></circle>"#,
                x(i),
                y(value(p)),
                (panel.tick)(p),
                value(p)
            ));
        }
    }
    let mut ly = TOP + ph + 86.0;
    for (label, color, _) in &panel.series {
        put(format!(
            r#"<line x1="{left:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/>"#,
            left + 24.0
        ));
        put(format!(
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            left + 32.0,
            ly + 4.0,
            xml_escape(label)
        ));
        ly += 16.0;
    }
}

/// A size for an axis label: `256 B`, `4 KiB`, `1 MiB`.
fn short_bytes(b: u64) -> String {
    if b >= 1024 * 1024 && b % (1024 * 1024) == 0 {
        format!("{} MiB", b / (1024 * 1024))
    } else if b >= 1024 && b % 1024 == 0 {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_axes() {
        assert_eq!(short_rate(25_000.0), "25k");
        assert_eq!(short_rate(1_500_000.0), "1.5M");
        assert_eq!(short_rate(0.0), "0");
        assert_eq!(nice_ceiling(73_000.0), 80_000.0);
        assert_eq!(nice_ceiling(593_000.0), 600_000.0);
        assert_eq!(nice_ceiling(151.0), 200.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn the_chart_has_axes_legend_and_both_series() {
        let points: Vec<ChartPoint> = super::super::CHART_SUBSCRIPTIONS
            .iter()
            .map(|&n| ChartPoint {
                subscriptions: n,
                publish_msgs_per_s: 50_000.0,
                deliveries_acked_per_s: 10_000.0 * f64::from(n),
            })
            .collect();
        let svg = chart_svg(&points, "always");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 10 + 2);
        assert!(svg.contains(">subscriptions</text>"));
        assert!(svg.contains("publish msgs/s"));
        assert!(svg.contains(">200k</text>"));
    }
}
