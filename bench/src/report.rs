//! The results: a JSON document and an SVG plot of throughput and latency
//! over time (hand-written SVG: no plotting dependency).

use std::fmt::Write as _;

use serde::Serialize;

use crate::Recorder;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Quantiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub records: u64,
    pub bytes: u64,
    pub errors: u64,
    pub records_per_sec: f64,
    /// 10^6 bytes per second of record values.
    pub mb_per_sec: f64,
    /// `None` when nothing was measured (acks=0, or consume only).
    pub latency: Option<Quantiles>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    pub t_s: u64,
    pub produce_mb_per_sec: f64,
    pub consume_mb_per_sec: f64,
    pub produce_p50_ms: Option<f64>,
    pub produce_p99_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub fn quantiles(h: &hdrhistogram::Histogram<u64>) -> Option<Quantiles> {
    (!h.is_empty()).then(|| Quantiles {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        mean_ms: h.mean() / 1000.0,
    })
}

pub fn summary(r: &Recorder, secs: f64) -> Summary {
    let secs = secs.max(1e-9);
    Summary {
        records: r.records,
        bytes: r.bytes,
        errors: r.errors,
        records_per_sec: r.records as f64 / secs,
        mb_per_sec: r.bytes as f64 / secs / 1e6,
        latency: quantiles(&r.latency),
    }
}

/// One point per second from the produce, consume and end-to-end recorders.
pub fn series(produce: &Recorder, consume: &Recorder, e2e: &Recorder) -> Vec<Point> {
    let n = produce.buckets.len().max(consume.buckets.len());
    (0..n)
        .map(|i| {
            let p = produce.buckets.get(i);
            let c = consume.buckets.get(i);
            let e = e2e.buckets.get(i);
            let q = |b: Option<&crate::Bucket>, at: f64| {
                b.filter(|b| !b.latency.is_empty())
                    .map(|b| ms(b.latency.value_at_quantile(at)))
            };
            Point {
                t_s: i as u64,
                produce_mb_per_sec: p.map_or(0.0, |b| b.bytes as f64 / 1e6),
                consume_mb_per_sec: c.map_or(0.0, |b| b.bytes as f64 / 1e6),
                produce_p50_ms: q(p, 0.5),
                produce_p99_ms: q(p, 0.99),
                e2e_p99_ms: q(e, 0.99),
            }
        })
        .collect()
}

const W: f64 = 900.0;
const PANEL_H: f64 = 240.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 160.0;

/// A named, coloured line of (seconds, value) points.
type Line<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Draws one panel of lines sharing a y axis from zero.
fn panel(out: &mut String, top: f64, title: &str, unit: &str, lines: &[Line<'_>], t_max: f64) {
    let y_max = lines
        .iter()
        .flat_map(|(_, _, pts)| pts.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = PANEL_H - 50.0;
    let x = |t: f64| LEFT + t / t_max.max(1.0) * plot_w;
    let y = |v: f64| top + 30.0 + plot_h - v / y_max * plot_h;
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"#,
        top + 18.0
    );
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##,
        top + 30.0
    );
    for k in 0..=4 {
        let v = y_max * f64::from(k) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{v:.1}</text>"##,
            LEFT + plot_w,
            LEFT - 5.0,
            y(v) + 4.0,
            y = y(v)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{:.1}" font-size="11" text-anchor="end">{unit}</text><text x="{}" y="{:.1}" font-size="11" text-anchor="middle">seconds</text>"#,
        LEFT - 5.0,
        top + 24.0,
        LEFT + plot_w / 2.0,
        top + PANEL_H - 4.0
    );
    for (i, (name, colour, pts)) in lines.iter().enumerate() {
        if !pts.is_empty() {
            let path: Vec<String> = pts
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = top + 45.0 + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}" font-size="12">{name}</text>"#,
            W - RIGHT + 10.0,
            W - RIGHT + 30.0,
            W - RIGHT + 35.0,
            ly + 4.0
        );
    }
}

/// The plot a person looks at: throughput (top) and latency (bottom).
pub fn svg(points: &[Point], title: &str) -> String {
    let t_max = points.len().saturating_sub(1) as f64;
    let pick = |f: &dyn Fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| f(p).map(|v| (p.t_s as f64, v)))
            .collect()
    };
    let mut out = String::new();
    let h = 2.0 * PANEL_H + 40.0;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#,
        xml_escape(title)
    );
    panel(
        &mut out,
        30.0,
        "throughput",
        "MB/s",
        &[
            ("produce", "#1f77b4", pick(&|p| Some(p.produce_mb_per_sec))),
            ("consume", "#2ca02c", pick(&|p| Some(p.consume_mb_per_sec))),
        ],
        t_max,
    );
    panel(
        &mut out,
        30.0 + PANEL_H,
        "latency",
        "ms",
        &[
            ("produce p50", "#9ecae1", pick(&|p| p.produce_p50_ms)),
            ("produce p99", "#1f77b4", pick(&|p| p.produce_p99_ms)),
            ("end-to-end p99", "#d62728", pick(&|p| p.e2e_p99_ms)),
        ],
        t_max,
    );
    out.push_str("</svg>\n");
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn summary_series_and_plot() {
        let t0 = Instant::now();
        let mut p = Recorder::new(t0);
        for s in 0..3u64 {
            let at = t0 + Duration::from_millis(s * 1000 + 10);
            p.count(at, 100, 1_000_000);
            p.latency(at, Duration::from_millis(10 + s), 100);
        }
        let c = Recorder::new(t0);
        let e = Recorder::new(t0);
        let s = summary(&p, 3.0);
        assert_eq!(s.records, 300);
        assert!((s.mb_per_sec - 1.0).abs() < 1e-9);
        let q = s.latency.expect("latency");
        assert!(q.p50_ms >= 10.9 && q.p50_ms <= 11.1, "{q:?}");
        assert!(q.max_ms >= 11.9);
        let pts = series(&p, &c, &e);
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[2].produce_mb_per_sec, 1.0);
        assert_eq!(pts[1].e2e_p99_ms, None);
        let svg = svg(&pts, "a <test>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("&lt;test&gt;") && svg.contains("polyline"));
        assert_eq!(summary(&c, 3.0).latency, None);
    }
}
