//! The `--chart` SVG: publish msgs/s and deliveries acked/s of each fanout
//! run against its number of subscriptions, as one standalone line chart
//! with round axis ticks and a legend.

use super::report::WorkloadResult;

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
    put(format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    ));
    put(format!(r#"<rect width="{W}" height="{H}" fill="white"/>"#));
    put(format!(
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">courier bench fanout: throughput vs subscriptions</text>"#,
        W / 2.0
    ));
    put(format!(
        r##"<text x="{}" y="46" text-anchor="middle" fill="#555">fsync {}; publish = messages confirmed/s; deliveries = acks confirmed/s summed over subscriptions</text>"##,
        W / 2.0,
        xml_escape(fsync_mode)
    ));
    // Horizontal grid lines and y tick labels.
    for i in 0..=Y_TICKS {
        let v = y_max * f64::from(i) / f64::from(Y_TICKS);
        let yy = y(v);
        put(format!(
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
            LEFT + pw
        ));
        put(format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            yy + 4.0,
            short_rate(v)
        ));
    }
    // Axes.
    put(format!(
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="black"/>"#,
        TOP + ph
    ));
    put(format!(
        r#"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        TOP + ph,
        LEFT + pw,
        TOP + ph
    ));
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
