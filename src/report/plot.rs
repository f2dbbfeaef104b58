//! Plots (line plots of quality, size or speed against bits or memory; heat maps) drawn
//! with plotters, written as SVG or PNG by the file's extension.
//!
//! PNG: plotters' bitmap backend rasterises into an RGB buffer, text is drawn with
//! ab_glyph from a font embedded in the binary (a 20 KB subset of DejaVu Sans, permissive
//! Bitstream Vera licence, `assets/fonts/LICENSE-DejaVu.txt`), and the buffer is encoded
//! here as a PNG with flate2 (already a dependency). Nothing is read from the system: the
//! machines this runs on have no font or image libraries to rely on.

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// The embedded font (see the module doc).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

/// Registers the embedded font as plotters' `sans-serif` (once; text layout needs it for
/// both backends).
fn ensure_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if !ok {
        bail!("the embedded plot font could not be read");
    }
    Ok(())
}

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

/// Size of every plot, in pixels (SVG user units).
const SIZE: (u32, u32) = (900, 560);

/// Output kind chosen by a path's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Svg,
    Png,
}

fn kind_of(path: &Path) -> Result<Kind> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg") => Ok(Kind::Svg),
        Some("png") => Ok(Kind::Png),
        _ => bail!("plot file {}: use a .svg or .png name", path.display()),
    }
}

/// Something drawable on any plotters backend.
trait Draw {
    fn size(&self) -> (u32, u32) {
        SIZE
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;

    fn svg(&self) -> Result<String> {
        ensure_font()?;
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, self.size()).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(to_err)?;
        }
        Ok(out)
    }

    fn png(&self) -> Result<Vec<u8>> {
        ensure_font()?;
        let (w, h) = self.size();
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(to_err)?;
        }
        encode_png(&rgb, w, h)
    }

    fn write(&self, path: &Path) -> Result<()> {
        let bytes = match kind_of(path)? {
            Kind::Svg => self.svg()?.into_bytes(),
            Kind::Png => self.png()?,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create folder {}", dir.display()))?;
        }
        crate::quant::io::write_atomically(path, &bytes)
    }
}

impl LinePlot {
    /// The plot as an SVG document.
    pub fn svg(&self) -> Result<String> {
        Draw::svg(self)
    }

    /// The plot as PNG bytes.
    pub fn png(&self) -> Result<Vec<u8>> {
        Draw::png(self)
    }

    /// Writes the plot atomically as SVG or PNG, by `path`'s extension.
    pub fn write(&self, path: &Path) -> Result<()> {
        Draw::write(self, path)
    }

    /// Writes the SVG atomically (no half-written plot on failure).
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        crate::quant::io::write_atomically(path, self.svg()?.as_bytes())
    }

    fn draw_series<'a, DB: DrawingBackend + 'a, X, Y>(
        &self,
        chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
        xa: f64,
        xb: f64,
        legend: SeriesLabelPosition,
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
            .label_font(("sans-serif", 14))
            .position(legend)
            .draw()
            .map_err(to_err)?;
        Ok(())
    }
}

/// The corner holding the fewest points (in the plot's own scales), for the legend.
fn emptiest_corner(pts: &[(f64, f64)], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    let norm = |v: f64, (a, b): (f64, f64)| if b > a { (v - a) / (b - a) } else { 0.5 };
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let count = |right: bool, upper: bool| {
        pts.iter()
            .filter(|&&(px, py)| {
                let (u, v) = (norm(px, x), norm(py, y));
                (if right { u > 0.55 } else { u < 0.45 })
                    && (if upper { v > 0.55 } else { v < 0.45 })
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, r, u)| count(r, u))
        .map(|(p, _, _)| p)
        .unwrap_or(SeriesLabelPosition::UpperRight)
}

impl Draw for LinePlot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
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
        root.fill(&WHITE).map_err(to_err)?;
        let mut b = ChartBuilder::on(root);
        b.caption(&self.title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70);
        let xr = (x0 - xpad)..(x1 + xpad);
        let finite: Vec<(f64, f64)> = pts
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        if self.log_y {
            let yr = (y0 / 1.1)..(y1 * 1.1);
            let logged: Vec<(f64, f64)> = finite
                .iter()
                .filter(|p| p.1 > 0.0)
                .map(|&(x, y)| (x, y.ln()))
                .collect();
            let legend = emptiest_corner(&logged, (x0, x1), (y0.ln(), y1.ln()));
            let mut chart = b.build_cartesian_2d(xr, yr.log_scale()).map_err(to_err)?;
            chart
                .configure_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(to_err)?;
            self.draw_series(&mut chart, x0 - xpad, x1 + xpad, legend)?;
        } else {
            let pad = ((y1 - y0) * 0.05).max(1e-6);
            let legend = emptiest_corner(&finite, (x0, x1), (y0, y1));
            let mut chart = b
                .build_cartesian_2d(xr, (y0 - pad)..(y1 + pad))
                .map_err(to_err)?;
            chart
                .configure_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(to_err)?;
            self.draw_series(&mut chart, x0 - xpad, x1 + xpad, legend)?;
        }
        Ok(())
    }
}

/// One panel of a heat map: `cells[row][col]` (None: not measured).
pub struct Panel {
    pub title: String,
    pub cells: Vec<Vec<Option<f64>>>,
}

/// Panels side by side sharing rows, columns and one logarithmic colour scale (values ≤ 0
/// are drawn at the scale's bottom), with a colour bar.
pub struct HeatMap {
    pub title: String,
    pub row_label: String,
    pub col_label: String,
    pub row_names: Vec<String>,
    pub col_names: Vec<String>,
    pub panels: Vec<Panel>,
    pub value_label: String,
}

impl HeatMap {
    pub fn svg(&self) -> Result<String> {
        Draw::svg(self)
    }

    pub fn png(&self) -> Result<Vec<u8>> {
        Draw::png(self)
    }

    /// Writes the plot atomically as SVG or PNG, by `path`'s extension.
    pub fn write(&self, path: &Path) -> Result<()> {
        Draw::write(self, path)
    }

    fn range(&self) -> Option<(f64, f64)> {
        let v: Vec<f64> = self
            .panels
            .iter()
            .flat_map(|p| p.cells.iter().flatten().flatten().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
            .map(f64::log10)
            .collect();
        if v.is_empty() {
            return None;
        }
        let (a, b) = min_max(&v);
        Some((a, if b > a { b } else { a + 1.0 }))
    }
}

/// Viridis-like colour ramp for t in [0, 1] (dark blue → green → yellow).
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

impl Draw for HeatMap {
    fn size(&self) -> (u32, u32) {
        let rows = self.row_names.len().max(1) as u32;
        let h = (rows * 18 + 170).clamp(360, 4000);
        let cols = (self.col_names.len() * self.panels.len()).max(1) as u32;
        let w = (cols * 48 + 120 * self.panels.len() as u32 + 200).clamp(600, 3000);
        (w, h)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let (lo, hi) = self
            .range()
            .context("nothing to plot: no positive values")?;
        if self.panels.iter().any(|p| {
            p.cells.len() != self.row_names.len()
                || p.cells.iter().any(|r| r.len() != self.col_names.len())
        }) {
            bail!("heat map: a panel's cells do not match the row and column names");
        }
        root.fill(&WHITE).map_err(to_err)?;
        let root = root
            .titled(&self.title, ("sans-serif", 20))
            .map_err(to_err)?;
        let (w, _) = root.dim_in_pixel();
        let (main, bar) = root.split_horizontally(w.saturating_sub(130));
        let areas = main.split_evenly((1, self.panels.len().max(1)));
        let (nr, nc) = (self.row_names.len(), self.col_names.len());
        let color = |v: f64| {
            let t = if v > 0.0 {
                (v.log10() - lo) / (hi - lo)
            } else {
                0.0
            };
            ramp(t)
        };
        let row_names = self.row_names.clone();
        let col_names = self.col_names.clone();
        for (k, (p, area)) in self.panels.iter().zip(&areas).enumerate() {
            let mut b = ChartBuilder::on(area);
            b.margin(8)
                .x_label_area_size(40)
                .y_label_area_size(if k == 0 { 60 } else { 30 });
            if !p.title.is_empty() {
                b.caption(&p.title, ("sans-serif", 15));
            }
            let mut chart = b
                .build_cartesian_2d(0f64..nc as f64, nr as f64..0f64)
                .map_err(to_err)?;
            let (rn, cn) = (row_names.clone(), col_names.clone());
            let step = nr.div_ceil(40).max(1);
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(nc * 2 + 1)
                .y_labels(nr * 2 + 1)
                .x_label_formatter(&move |x| {
                    let i = x.floor() as usize;
                    if (x - i as f64 - 0.5).abs() < 1e-6 && i < cn.len() {
                        cn[i].clone()
                    } else {
                        String::new()
                    }
                })
                .y_label_formatter(&move |y| {
                    let i = y.floor() as usize;
                    if (y - i as f64 - 0.5).abs() < 1e-6 && i < rn.len() && i.is_multiple_of(step) {
                        rn[i].clone()
                    } else {
                        String::new()
                    }
                })
                .x_desc(&self.col_label)
                .y_desc(if k == 0 { self.row_label.as_str() } else { "" })
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(to_err)?;
            let mut rects = Vec::new();
            for (i, row) in p.cells.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    let style = match v {
                        Some(v) if v.is_finite() => color(*v).filled(),
                        _ => RGBColor(220, 220, 220).filled(),
                    };
                    rects.push(Rectangle::new(
                        [(j as f64, i as f64), (j as f64 + 1.0, i as f64 + 1.0)],
                        style,
                    ));
                }
            }
            chart.draw_series(rects).map_err(to_err)?;
        }
        // Colour bar: log10 of the value, bottom to top.
        let mut b = ChartBuilder::on(&bar);
        b.margin(8)
            .margin_top(40)
            .margin_bottom(50)
            .y_label_area_size(60)
            .caption("log10", ("sans-serif", 13));
        let mut chart = b.build_cartesian_2d(0f64..1f64, lo..hi).map_err(to_err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_desc(&self.value_label)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(to_err)?;
        let steps = 64;
        chart
            .draw_series((0..steps).map(|i| {
                let a = lo + (hi - lo) * i as f64 / steps as f64;
                let b = lo + (hi - lo) * (i + 1) as f64 / steps as f64;
                Rectangle::new(
                    [(0.0, a), (1.0, b)],
                    ramp(i as f64 / (steps - 1) as f64).filled(),
                )
            }))
            .map_err(to_err)?;
        Ok(())
    }
}

/// A PNG file of an 8-bit RGB buffer: one IDAT of zlib-compressed scanlines (filter 0).
pub fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    use std::io::Write;
    if w == 0 || h == 0 || rgb.len() != (w as usize) * (h as usize) * 3 {
        bail!(
            "PNG of {w}x{h} pixels needs {} RGB bytes, got {}",
            w as usize * h as usize * 3,
            rgb.len()
        );
    }
    let mut raw = Vec::with_capacity(rgb.len() + h as usize);
    for row in rgb.chunks_exact(w as usize * 3) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw)?;
    let idat = z.finish()?;
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    // 8 bits per channel, colour type 2 (RGB), deflate, filter set 0, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&[kind.as_slice(), data].concat());
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (ISO 3309, reflected polynomial 0xEDB88320), as PNG chunks use.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
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

    fn line() -> LinePlot {
        LinePlot {
            title: "ppl vs bits".into(),
            x_label: "bits per weight".into(),
            y_label: "perplexity".into(),
            series: vec![Series {
                name: "rtn g64".into(),
                points: vec![(8.5, 19.2), (4.5, 21.0), (2.5, 900.0)],
            }],
            baseline: Some((19.18, "f32".into())),
            log_y: true,
        }
    }

    #[test]
    fn svg_has_the_series_and_refuses_empty_plots() {
        let mut p = line();
        let svg = p.svg().unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("rtn g64") && svg.contains("f32"));
        assert!(svg.contains("<circle"), "points are drawn");
        p.series.clear();
        p.baseline = None;
        assert!(p.svg().is_err());
        assert!(p.png().is_err());
    }

    #[test]
    fn crc32_of_known_strings() {
        // The standard check value of CRC-32/ISO-HDLC, and PNG's IEND chunk CRC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    /// The PNG's header says the plot's size, and the pixels decode back (zlib) to the
    /// buffer with one filter byte per row.
    #[test]
    fn png_is_a_valid_rgb_image_of_the_plot_size() {
        let png = line().png().unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((w, h), SIZE);
        let mut pos = 8;
        let mut idat = Vec::new();
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &png[pos + 4..pos + 8];
            let data = &png[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            assert_eq!(crc, crc32(&png[pos + 4..pos + 8 + len]));
            if kind == b"IDAT" {
                idat.extend_from_slice(data);
            }
            pos += 12 + len;
        }
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&idat[..]), &mut raw)
            .unwrap();
        assert_eq!(raw.len(), (h * (3 * w + 1)) as usize);
        // Not blank: text and lines were drawn in something other than white.
        assert!(raw.iter().any(|&b| b < 128));
    }

    #[test]
    fn heat_maps_draw_and_check_their_shape() {
        let mut m = HeatMap {
            title: "sensitivity".into(),
            row_label: "block".into(),
            col_label: "layer".into(),
            row_names: vec!["0".into(), "1".into()],
            col_names: vec!["q".into(), "k".into(), "v".into()],
            panels: vec![Panel {
                title: "i4".into(),
                cells: vec![
                    vec![Some(1e-4), Some(2e-3), None],
                    vec![Some(0.5), Some(0.0), Some(3e-2)],
                ],
            }],
            value_label: "mean KL".into(),
        };
        let svg = m.svg().unwrap();
        assert!(svg.contains("sensitivity") && svg.contains("<rect"));
        assert!(m.png().unwrap().starts_with(b"\x89PNG"));
        m.panels[0].cells.pop();
        assert!(m.svg().is_err());
    }

    #[test]
    fn the_extension_picks_the_format() {
        let dir = tempfile::tempdir().unwrap();
        line().write(&dir.path().join("a.png")).unwrap();
        line().write(&dir.path().join("a.svg")).unwrap();
        assert!(std::fs::read(dir.path().join("a.png"))
            .unwrap()
            .starts_with(b"\x89PNG"));
        assert!(std::fs::read_to_string(dir.path().join("a.svg"))
            .unwrap()
            .starts_with("<svg"));
        assert!(line().write(&dir.path().join("a.jpg")).is_err());
    }
}
