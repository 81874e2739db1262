//! Small PNG drawing for heat maps and neuron grids: a diverging colormap
//! (blue negative, white 0, red positive, symmetric about 0), image cells,
//! colour bars and a 5×7 bitmap font for labels.

use image::{Rgb, RgbImage};

/// 5×7 glyphs, rows top to bottom, `#` set.
fn glyph(c: char) -> [&'static str; 7] {
    match c.to_ascii_uppercase() {
        '0' => [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
        '1' => ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        '2' => [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
        '3' => ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
        '4' => ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
        '5' => ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
        '6' => ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
        '7' => ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
        '8' => [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
        '9' => [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
        'A' => [" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
        'B' => ["#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "],
        'C' => [" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "],
        'D' => ["#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "],
        'E' => ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"],
        'F' => ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "],
        'G' => [" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"],
        'H' => ["#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
        'I' => [" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        'J' => ["  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "],
        'K' => ["#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"],
        'L' => ["#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"],
        'M' => ["#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"],
        'N' => ["#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"],
        'O' => [" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "],
        'P' => ["#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "],
        'Q' => [" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"],
        'R' => ["#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"],
        'S' => [" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "],
        'T' => ["#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "],
        'U' => ["#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "],
        'V' => ["#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "],
        'W' => ["#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "],
        'X' => ["#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"],
        'Y' => ["#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "],
        'Z' => ["#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"],
        '.' => ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "],
        ',' => ["     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "],
        '-' => ["     ", "     ", "     ", "#####", "     ", "     ", "     "],
        '+' => ["     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "],
        '=' => ["     ", "     ", "#####", "     ", "#####", "     ", "     "],
        ':' => ["     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "],
        '*' => ["     ", "  #  ", "# # #", " ### ", "# # #", "  #  ", "     "],
        '(' => ["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "],
        ')' => [" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "],
        '/' => ["     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "],
        '|' => ["  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "],
        '[' => [" ### ", " #   ", " #   ", " #   ", " #   ", " #   ", " ### "],
        ']' => [" ### ", "   # ", "   # ", "   # ", "   # ", "   # ", " ### "],
        '_' => ["     ", "     ", "     ", "     ", "     ", "     ", "#####"],
        '\'' => ["  #  ", "  #  ", " #   ", "     ", "     ", "     ", "     "],
        _ => ["     "; 7],
    }
}

/// Width in pixels of `text` at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * 6 * scale
}

/// Draws `text` with its top-left corner at `(x, y)`.
pub fn text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, color: [u8; 3]) {
    for (k, c) in text.chars().enumerate() {
        let g = glyph(c);
        for (row, line) in g.iter().enumerate() {
            for (col, ch) in line.chars().enumerate() {
                if ch == '#' {
                    let (px, py) =
                        (x + (k as u32 * 6 + col as u32) * scale, y + row as u32 * scale);
                    fill(img, px, py, scale, scale, color);
                }
            }
        }
    }
}

/// Fills a rectangle (clipped to the image).
pub fn fill(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, color: [u8; 3]) {
    for yy in y..(y + h).min(img.height()) {
        for xx in x..(x + w).min(img.width()) {
            img.put_pixel(xx, yy, Rgb(color));
        }
    }
}

/// Blue (−vmax) → white (0) → red (+vmax).
pub fn diverging(v: f64, vmax: f64) -> [u8; 3] {
    let t = if vmax > 0.0 { (v / vmax).clamp(-1.0, 1.0) } else { 0.0 };
    let fade = |a: f64| (255.0 * (1.0 - a)).round() as u8;
    if t >= 0.0 { [255, fade(t), fade(t)] } else { [fade(-t), fade(-t), 255] }
}

/// Gray level of `v` in `[lo, hi]`.
pub fn gray(v: f64, lo: f64, hi: f64) -> [u8; 3] {
    let t = if hi > lo { ((v - lo) / (hi - lo)).clamp(0.0, 1.0) } else { 0.5 };
    let g = (255.0 * t).round() as u8;
    [g, g, g]
}

/// Draws an `h × w` map (row-major `values`), each value a `cell`-pixel
/// square, colored by `color`; with a thin frame.
pub fn map(
    img: &mut RgbImage,
    x: u32,
    y: u32,
    h: usize,
    w: usize,
    values: &[f64],
    cell: u32,
    color: impl Fn(f64) -> [u8; 3],
) {
    fill(
        img,
        x.saturating_sub(1),
        y.saturating_sub(1),
        w as u32 * cell + 2,
        h as u32 * cell + 2,
        [120, 120, 120],
    );
    for r in 0..h {
        for c in 0..w {
            fill(
                img,
                x + c as u32 * cell,
                y + r as u32 * cell,
                cell,
                cell,
                color(values[r * w + c]),
            );
        }
    }
}

/// A vertical colour bar for `[-vmax, vmax]` with labelled ends and 0.
pub fn colorbar(img: &mut RgbImage, x: u32, y: u32, height: u32, vmax: f64) {
    let w = 10;
    fill(img, x - 1, y - 1, w + 2, height + 2, [120, 120, 120]);
    for k in 0..height {
        let v = vmax * (1.0 - 2.0 * f64::from(k) / f64::from(height.max(2) - 1));
        fill(img, x, y + k, w, 1, diverging(v, vmax));
    }
    let black = [0, 0, 0];
    text(img, x + w + 4, y, &format_num(vmax), 1, black);
    text(img, x + w + 4, y + height / 2 - 3, "0", 1, black);
    text(img, x + w + 4, y + height - 7, &format_num(-vmax), 1, black);
}

/// Compact number: 3 significant digits.
pub fn format_num(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (1e-2..1e4).contains(&a) {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        format!("{v:.2e}")
    }
}

/// A white canvas.
pub fn canvas(w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb([255, 255, 255]))
}

/// PNG bytes of an image.
pub fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("PNG encoding into memory");
    out.into_inner()
}
