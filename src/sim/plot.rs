//! Hand-written SVG line charts (no plotting crate): hit rate vs TTL and the
//! TTFT CDF per policy.

use std::fmt::Write;

/// One line of a chart.
pub struct Series {
    /// Legend label.
    pub name: String,
    /// (x, y) points, x increasing.
    pub points: Vec<(f64, f64)>,
    /// Draw markers only (no line).
    pub markers: bool,
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
/// Past eight series the colours repeat with another dash pattern (lines)
/// or marker shape (points), so every series stays distinguishable.
const DASHES: [&str; 4] = ["", "6 3", "2 2", "8 3 2 3"];

fn marker(o: &mut String, shape: usize, x: f64, y: f64, c: &str) {
    let _ = match shape % 4 {
        0 => writeln!(o, r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{c}"/>"#),
        1 => writeln!(
            o,
            r#"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="{c}"/>"#,
            x - 4.0,
            y - 4.0
        ),
        2 => writeln!(
            o,
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{c}"/>"#,
            x,
            y - 5.0,
            x - 5.0,
            y + 4.0,
            x + 5.0,
            y + 4.0
        ),
        _ => writeln!(
            o,
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{c}"/>"#,
            x,
            y - 5.0,
            x + 5.0,
            y,
            x,
            y + 5.0,
            x - 5.0,
            y
        ),
    };
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart, x on a log10 axis when `log_x`; y from `y_range`.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
    y_range: (f64, f64),
) -> String {
    let (w, h) = (720.0, 440.0);
    let (l, r, t, b) = (70.0, 170.0, 40.0, 50.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let fx = |x: f64| if log_x { x.max(1e-12).log10() } else { x };
    // on a log axis, values ≤ 0 do not set the range; they are drawn at the left edge
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .filter(|p| !log_x || p.0 > 0.0)
                .map(|p| fx(p.0))
        })
        .filter(|v| v.is_finite())
        .collect();
    let (mut x0, mut x1) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
    if !(x0.is_finite() && x1.is_finite()) || x1 <= x0 {
        x0 = 0.0;
        x1 = 1.0;
    }
    if log_x {
        x0 = x0.floor();
        x1 = x1.ceil();
    }
    let (y0, y1) = y_range;
    let px = |x: f64| l + (fx(x).clamp(x0, x1) - x0) / (x1 - x0) * pw;
    let py = |y: f64| t + ph - (y.clamp(y0, y1) - y0) / (y1 - y0) * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        l + pw / 2.0,
        esc(title)
    );
    // grid and ticks
    for i in 0..=5 {
        let y = y0 + (y1 - y0) * i as f64 / 5.0;
        let yy = py(y);
        let _ = writeln!(
            o,
            r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
            l + pw
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            l - 6.0,
            yy + 4.0,
            fmt_tick(y)
        );
    }
    if log_x {
        let mut e = x0 as i64;
        while e as f64 <= x1 {
            let xx = l + (e as f64 - x0) / (x1 - x0) * pw;
            let _ = writeln!(
                o,
                r##"<line x1="{xx:.1}" y1="{t}" x2="{xx:.1}" y2="{:.1}" stroke="#ddd"/>"##,
                t + ph
            );
            let _ = writeln!(
                o,
                r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                t + ph + 16.0,
                fmt_tick(10f64.powi(e as i32))
            );
            e += 1;
        }
    } else {
        for i in 0..=5 {
            let x = x0 + (x1 - x0) * i as f64 / 5.0;
            let xx = l + (x - x0) / (x1 - x0) * pw;
            let _ = writeln!(
                o,
                r##"<line x1="{xx:.1}" y1="{t}" x2="{xx:.1}" y2="{:.1}" stroke="#ddd"/>"##,
                t + ph
            );
            let _ = writeln!(
                o,
                r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                t + ph + 16.0,
                fmt_tick(x)
            );
        }
    }
    let _ = writeln!(
        o,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        l + pw / 2.0,
        h - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        o,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        t + ph / 2.0,
        t + ph / 2.0,
        esc(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let style = i / COLORS.len();
        let dash = DASHES[style % DASHES.len()];
        let dash_attr = if dash.is_empty() {
            String::new()
        } else {
            format!(r#" stroke-dasharray="{dash}""#)
        };
        if s.markers {
            for &(x, y) in &s.points {
                marker(&mut o, style, px(x), py(y), c);
            }
        } else if !s.points.is_empty() {
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                o,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2"{dash_attr} points="{}"/>"#,
                pts.join(" ")
            );
        }
        let ly = t + 14.0 + 18.0 * i as f64;
        if s.markers {
            marker(&mut o, style, l + pw + 19.0, ly - 2.0, c);
        } else {
            let _ = writeln!(
                o,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="3"{dash_attr}/>"#,
                l + pw + 8.0,
                ly - 2.0,
                l + pw + 28.0,
                ly - 2.0
            );
        }
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#,
            l + pw + 32.0,
            esc(&s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.0e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_one_polyline_per_line_series() {
        let s = vec![
            Series {
                name: "a<b".into(),
                points: vec![(1.0, 0.5), (10.0, 0.9)],
                markers: false,
            },
            Series {
                name: "pts".into(),
                points: vec![(60.0, 0.8)],
                markers: true,
            },
        ];
        let svg = line_chart("t", "x", "y", &s, true, (0.0, 1.0));
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        // the point and its legend entry
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("a&lt;b"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn more_than_eight_series_stay_distinguishable() {
        let s: Vec<Series> = (0..20)
            .map(|i| Series {
                name: format!("p{i}"),
                points: vec![(1.0, 0.1), (10.0, 0.05 * i as f64)],
                markers: false,
            })
            .collect();
        let svg = line_chart("t", "x", "y", &s, true, (0.0, 1.0));
        let styles: std::collections::HashSet<String> = svg
            .lines()
            .filter(|l| l.starts_with("<polyline"))
            .map(|l| l.split(" points=").next().unwrap().to_string())
            .collect();
        assert_eq!(styles.len(), 20, "every line has its own colour and dash");
    }
}
