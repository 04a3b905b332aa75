//! The run's curves as a PNG: training loss per step (grey) with its moving average (blue) and
//! the validation loss (red) in the left panel; the validation metrics (accuracy green, macro-F1
//! orange, others purple) against steps in the right panel. Axis ranges are printed at the
//! corners with a built-in digit font, so the picture needs no font files.

use crate::error::{Result, TuneError};
use std::path::Path;

const W: usize = 960;
const H: usize = 400;
const PANEL_W: usize = W / 2;
const MARGIN: usize = 36;

type Rgb = [u8; 3];
const GREY: Rgb = [190, 190, 190];
const BLUE: Rgb = [31, 119, 180];
const RED: Rgb = [214, 39, 40];
const GREEN: Rgb = [44, 160, 44];
const ORANGE: Rgb = [255, 127, 14];
const PURPLE: Rgb = [148, 103, 189];
const BLACK: Rgb = [0, 0, 0];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let x = (x0 + (x1 - x0) * t).round() as i64;
            let y = (y0 + (y1 - y0) * t).round() as i64;
            self.set(x, y, c);
            self.set(x, y + 1, c);
        }
    }

    fn dot(&mut self, x: f64, y: f64, c: Rgb) {
        for dy in -2..=2 {
            for dx in -2..=2 {
                self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
            }
        }
    }

    /// Draws `text` (digits, `.`, `-`, `e`, `+`) at `(x, y)`, 3×5 glyphs scaled by 2.
    fn text(&mut self, x: usize, y: usize, text: &str) {
        for (k, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for s in 0..4 {
                            let px = x + k * 8 + col * 2 + s % 2;
                            let py = y + r * 2 + s / 2;
                            self.set(px as i64, py as i64, BLACK);
                        }
                    }
                }
            }
        }
    }
}

fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel: a frame and series drawn into its value ranges.
struct Panel {
    x0: f64,
    x_range: (f64, f64),
    y_range: (f64, f64),
}

impl Panel {
    fn new(index: usize, x_range: (f64, f64), y_range: (f64, f64), canvas: &mut Canvas) -> Self {
        let x0 = (index * PANEL_W) as f64;
        let p = Panel {
            x0,
            x_range,
            y_range,
        };
        let (l, r) = (x0 + MARGIN as f64, x0 + (PANEL_W - MARGIN / 2) as f64);
        let (t, b) = (MARGIN as f64 / 2.0, (H - MARGIN) as f64);
        canvas.line((l, t), (l, b), BLACK);
        canvas.line((l, b), (r, b), BLACK);
        canvas.text(l as usize + 4, t as usize, &fmt_num(y_range.1));
        canvas.text(l as usize + 4, b as usize - 14, &fmt_num(y_range.0));
        canvas.text(l as usize, b as usize + 6, &fmt_num(x_range.0));
        let xs = fmt_num(x_range.1);
        canvas.text(r as usize - xs.len() * 8, b as usize + 6, &xs);
        p
    }

    fn map(&self, x: f64, y: f64) -> (f64, f64) {
        let (l, r) = (
            self.x0 + MARGIN as f64,
            self.x0 + (PANEL_W - MARGIN / 2) as f64,
        );
        let (t, b) = (MARGIN as f64 / 2.0, (H - MARGIN) as f64);
        let fx = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0).max(1e-12);
        let fy = (y - self.y_range.0) / (self.y_range.1 - self.y_range.0).max(1e-12);
        (l + fx * (r - l), b - fy * (b - t))
    }

    fn series(&self, canvas: &mut Canvas, pts: &[(f64, f64)], c: Rgb, dots: bool) {
        for w in pts.windows(2) {
            canvas.line(self.map(w[0].0, w[0].1), self.map(w[1].0, w[1].1), c);
        }
        if dots {
            for &(x, y) in pts {
                let (px, py) = self.map(x, y);
                canvas.dot(px, py, c);
            }
        }
    }
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

/// Reads a `metrics.jsonl` written by the Trainer and draws `png`.
pub fn write_curves(jsonl: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(jsonl).map_err(|e| TuneError::io(jsonl, e))?;
    let mut train: Vec<(f64, f64)> = Vec::new();
    let mut evals: Vec<(f64, serde_json::Map<String, serde_json::Value>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| TuneError::io(jsonl, format!("line {}: {e}", i + 1)))?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        match v["kind"].as_str() {
            Some("train") => {
                if let Some(l) = v["loss"].as_f64() {
                    train.push((step, l));
                }
            }
            Some("eval") => {
                if let Some(m) = v.as_object() {
                    evals.push((step, m.clone()));
                }
            }
            _ => {}
        }
    }
    // A resumed run appends to the log: keep the last record of every step.
    train.sort_by(|a, b| a.0.total_cmp(&b.0));
    train.dedup_by(|b, a| {
        a.0 == b.0 && {
            a.1 = b.1;
            true
        }
    });
    let mut canvas = Canvas::new();
    let max_step = train.last().map_or(1.0, |p| p.0).max(1.0);
    let eval_loss: Vec<(f64, f64)> = evals
        .iter()
        .filter_map(|(s, m)| m.get("loss").and_then(|v| v.as_f64()).map(|l| (*s, l)))
        .collect();
    let y = range(train.iter().chain(&eval_loss).map(|p| p.1));
    let left = Panel::new(0, (0.0, max_step), (y.0.min(0.0), y.1), &mut canvas);
    left.series(&mut canvas, &train, GREY, false);
    let k = (train.len() / 50).max(1);
    let smooth: Vec<(f64, f64)> = (0..train.len())
        .map(|i| {
            let lo = i.saturating_sub(k);
            let w = &train[lo..=i];
            (
                train[i].0,
                w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
            )
        })
        .collect();
    left.series(&mut canvas, &smooth, BLUE, false);
    left.series(&mut canvas, &eval_loss, RED, true);
    let mut names: Vec<String> = evals
        .iter()
        .flat_map(|(_, m)| m.keys().cloned())
        .filter(|k| !matches!(k.as_str(), "kind" | "step" | "epoch" | "loss"))
        .collect();
    names.sort();
    names.dedup();
    let series: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .map(|n| {
            let pts = evals
                .iter()
                .filter_map(|(s, m)| m.get(n).and_then(|v| v.as_f64()).map(|v| (*s, v)))
                .collect();
            (n.clone(), pts)
        })
        .collect();
    let y = range(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    let right = Panel::new(1, (0.0, max_step), y, &mut canvas);
    for (name, pts) in &series {
        let c = match name.as_str() {
            "accuracy" => GREEN,
            "macro_f1" => ORANGE,
            _ => PURPLE,
        };
        right.series(&mut canvas, pts, c, true);
    }
    let tmp = png.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| TuneError::io(&tmp, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| TuneError::io(&tmp, e))?;
    w.write_image_data(&canvas.px)
        .map_err(|e| TuneError::io(&tmp, e))?;
    w.finish().map_err(|e| TuneError::io(&tmp, e))?;
    std::fs::rename(&tmp, png).map_err(|e| TuneError::io(png, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_from_a_log() {
        let dir = std::env::temp_dir().join(format!("kiln-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("metrics.jsonl");
        let mut text = String::new();
        for s in 1..=40 {
            text.push_str(&format!(
                "{{\"kind\":\"train\",\"step\":{s},\"loss\":{}}}\n",
                1.0 / s as f64
            ));
        }
        text.push_str("{\"kind\":\"eval\",\"step\":20,\"accuracy\":0.7,\"loss\":0.6}\n");
        text.push_str("{\"kind\":\"eval\",\"step\":40,\"accuracy\":0.8,\"loss\":0.5}\n");
        std::fs::write(&log, text).unwrap();
        let png_path = dir.join("curves.png");
        write_curves(&log, &png_path).unwrap();
        let bytes = std::fs::read(&png_path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        // The curves put coloured pixels on the white canvas.
        let coloured = buf.chunks(3).filter(|p| p == &BLUE || p == &GREEN).count();
        assert!(coloured > 100, "{coloured}");
        assert!(write_curves(&dir.join("missing.jsonl"), &png_path).is_err());
    }
}
