//! Line plots (perplexity against bits per weight) rendered to SVG with plotters.

use anyhow::{bail, Result};
use plotters::prelude::*;
use std::path::Path;

/// One named series of (x, y) points, drawn in x order.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A horizontal reference line (e.g. the f32 perplexity) and its label.
    pub baseline: Option<(f64, String)>,
    pub log_y: bool,
}

fn to_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}

impl LinePlot {
    /// The plot as an SVG document.
    pub fn svg(&self) -> Result<String> {
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .chain(self.baseline.iter().map(|(y, _)| (f64::NAN, *y)))
            .collect();
        let xs: Vec<f64> = pts.iter().map(|p| p.0).filter(|x| x.is_finite()).collect();
        let ys: Vec<f64> = pts
            .iter()
            .map(|p| p.1)
            .filter(|y| y.is_finite() && (!self.log_y || *y > 0.0))
            .collect();
        if xs.is_empty() || ys.is_empty() {
            bail!("nothing to plot: no finite points");
        }
        let (x0, x1) = min_max(&xs);
        let (y0, y1) = min_max(&ys);
        let xpad = ((x1 - x0) * 0.05).max(0.25);
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (900, 560)).into_drawing_area();
            root.fill(&WHITE).map_err(to_err)?;
            let mut b = ChartBuilder::on(&root);
            b.caption(&self.title, ("sans-serif", 20))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(70);
            let xr = (x0 - xpad)..(x1 + xpad);
            if self.log_y {
                let yr = (y0 / 1.1)..(y1 * 1.1);
                let mut chart = b.build_cartesian_2d(xr, yr.log_scale()).map_err(to_err)?;
                chart
                    .configure_mesh()
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .draw()
                    .map_err(to_err)?;
                self.draw_series(&mut chart, x0 - xpad, x1 + xpad)?;
            } else {
                let pad = ((y1 - y0) * 0.05).max(1e-6);
                let mut chart = b
                    .build_cartesian_2d(xr, (y0 - pad)..(y1 + pad))
                    .map_err(to_err)?;
                chart
                    .configure_mesh()
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .draw()
                    .map_err(to_err)?;
                self.draw_series(&mut chart, x0 - xpad, x1 + xpad)?;
            }
            root.present().map_err(to_err)?;
        }
        Ok(out)
    }

    fn draw_series<'a, X, Y>(
        &self,
        chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
        xa: f64,
        xb: f64,
    ) -> Result<()>
    where
        X: Ranged<ValueType = f64>,
        Y: Ranged<ValueType = f64>,
    {
        for (i, s) in self.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut p = s.points.clone();
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
                .map_err(to_err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    p.iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                )
                .map_err(to_err)?;
        }
        if let Some((y, name)) = &self.baseline {
            let grey = RGBColor(90, 90, 90);
            chart
                .draw_series(LineSeries::new(
                    vec![(xa, *y), (xb, *y)],
                    grey.stroke_width(1),
                ))
                .map_err(to_err)?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(to_err)?;
        Ok(())
    }

    /// Writes the SVG atomically (no half-written plot on failure).
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        let svg = self.svg()?;
        crate::quant::io::write_atomically(path, svg.as_bytes())
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_the_series_and_refuses_empty_plots() {
        let mut p = LinePlot {
            title: "ppl vs bits".into(),
            x_label: "bits per weight".into(),
            y_label: "perplexity".into(),
            series: vec![Series {
                name: "rtn g64".into(),
                points: vec![(8.5, 19.2), (4.5, 21.0), (2.5, 900.0)],
            }],
            baseline: Some((19.18, "f32".into())),
            log_y: true,
        };
        let svg = p.svg().unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("rtn g64") && svg.contains("f32"));
        assert!(svg.contains("<circle"), "points are drawn");
        p.series.clear();
        p.baseline = None;
        assert!(p.svg().is_err());
    }
}
