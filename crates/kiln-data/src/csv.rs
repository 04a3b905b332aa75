//! A reader for numeric CSV tables (`.csv` or gzipped), with an optional integer label column.

use crate::error::{DataError, Result};
use crate::file::read_file;
use kiln_core::alloc::Buffer;
use kiln_core::Tensor;
use std::path::Path;

/// Which column holds the labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelColumn {
    /// The column at this 0-based index.
    Index(usize),
    /// The last column.
    Last,
}

/// How to read a CSV table; build with the methods, starting from `Default`.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvOptions {
    /// The cell separator (default `b','`).
    pub delimiter: u8,
    /// Whether the first line is a header to skip (default false).
    pub has_header: bool,
    /// The integer label column, taken out of the features (default none).
    pub label_column: Option<LabelColumn>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: b',',
            has_header: false,
            label_column: None,
        }
    }
}

impl CsvOptions {
    /// Sets the cell separator.
    pub fn delimiter(mut self, delimiter: u8) -> Self {
        self.delimiter = delimiter;
        self
    }

    /// Sets whether the first line is a header.
    pub fn has_header(mut self, has_header: bool) -> Self {
        self.has_header = has_header;
        self
    }

    /// Takes the labels from `column`.
    pub fn label_column(mut self, column: LabelColumn) -> Self {
        self.label_column = Some(column);
        self
    }
}

/// A numeric table read from CSV.
#[derive(Clone, Debug)]
pub struct CsvTable {
    /// The non-label columns, f32 `[rows, columns]`.
    pub features: Tensor,
    /// The label column as i64 `[rows]`, when one was asked for.
    pub labels: Option<Tensor>,
    /// The header's cells (label column included), when the file has one.
    pub header: Option<Vec<String>>,
}

/// Reads the numeric table at `path` (plain or gzipped). Ragged rows, non-numeric cells,
/// non-integer labels, a label column out of range and a file without data rows are errors
/// naming the file, the 1-based line and the 1-based column. Blank lines are skipped.
pub fn read_csv(path: impl AsRef<Path>, options: &CsvOptions) -> Result<CsvTable> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    parse_csv(path, &bytes, options)
}

/// Parses CSV bytes; `path` only names the file in errors.
pub fn parse_csv(path: &Path, bytes: &[u8], options: &CsvOptions) -> Result<CsvTable> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        DataError::Csv {
            path: path.into(),
            line,
            column: 1,
            msg: "not valid UTF-8".into(),
        }
    })?;
    let csv_err = |line: usize, column: usize, msg: String| DataError::Csv {
        path: path.into(),
        line,
        column,
        msg,
    };
    let delim = options.delimiter as char;
    let mut header = None;
    let mut width: Option<(usize, usize)> = None; // (columns, line that fixed it)
    let mut label_at = usize::MAX;
    let mut features: Vec<f32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    let mut rows = 0usize;
    for (i, raw_line) in text.split('\n').enumerate() {
        let line_no = i + 1;
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        if line.trim().is_empty() {
            continue;
        }
        if options.has_header && header.is_none() && width.is_none() {
            header = Some(
                line.split(delim)
                    .map(|c| c.trim().to_string())
                    .collect::<Vec<_>>(),
            );
            continue;
        }
        let n_cells = line.split(delim).count();
        let (cols, first_line) = *width.get_or_insert((n_cells, line_no));
        if n_cells != cols {
            return Err(csv_err(
                line_no,
                n_cells.min(cols) + 1,
                format!("row has {n_cells} columns, line {first_line} has {cols} (ragged table)"),
            ));
        }
        if rows == 0 {
            label_at = match options.label_column {
                None => usize::MAX,
                Some(LabelColumn::Last) => cols - 1,
                Some(LabelColumn::Index(c)) if c < cols => c,
                Some(LabelColumn::Index(c)) => {
                    return Err(csv_err(
                        line_no,
                        cols,
                        format!("label column index {c} is out of range for {cols} columns"),
                    ))
                }
            };
            if label_at != usize::MAX && cols == 1 {
                return Err(csv_err(
                    line_no,
                    1,
                    "the label column is the only column: no features are left".into(),
                ));
            }
            features.reserve(cols * (text.len() / (line.len() + 1)).max(1));
        }
        for (c, cell) in line.split(delim).enumerate() {
            let cell = cell.trim();
            if c == label_at {
                let v: f64 = cell.parse().map_err(|_| {
                    csv_err(line_no, c + 1, format!("label {cell:?} is not a number"))
                })?;
                if v.fract() != 0.0 || !v.is_finite() || v.abs() > 9.0e15 {
                    return Err(csv_err(
                        line_no,
                        c + 1,
                        format!("label {cell:?} is not an integer"),
                    ));
                }
                labels.push(v as i64);
            } else {
                let v: f32 = cell
                    .parse()
                    .map_err(|_| csv_err(line_no, c + 1, format!("{cell:?} is not a number")))?;
                features.push(v);
            }
        }
        rows += 1;
    }
    let Some((cols, _)) = width else {
        return Err(DataError::invalid(
            path,
            if header.is_some() {
                "no data rows after the header"
            } else {
                "no data rows"
            },
        ));
    };
    let n_feat = cols - usize::from(label_at != usize::MAX);
    Ok(CsvTable {
        features: Tensor::from_buffer(Buffer::from_slice(&features), [rows, n_feat]),
        labels: (label_at != usize::MAX)
            .then(|| Tensor::from_buffer(Buffer::from_slice(&labels), [rows])),
        header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::test_util::TempDir;

    fn err(dir: &TempDir, name: &str, text: &str, opts: &CsvOptions) -> String {
        let e = read_csv(dir.write(name, text.as_bytes()), opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "error does not name the file: {e}");
        e
    }

    #[test]
    fn reads_features_and_labels_plain_and_gzipped() {
        let dir = TempDir::new("csv");
        let text = "a;b;y\r\n1.5; -2;3\n\n0;1e2;0\n";
        let opts = CsvOptions::default()
            .delimiter(b';')
            .has_header(true)
            .label_column(LabelColumn::Last);
        for name in ["t.csv", "t.csv.gz"] {
            let t = read_csv(dir.write(name, text.as_bytes()), &opts).unwrap();
            assert_eq!(t.features.dims(), &[2, 2]);
            assert_eq!(t.features.to_vec::<f32>(), vec![1.5, -2.0, 0.0, 100.0]);
            assert_eq!(t.labels.unwrap().to_vec::<i64>(), vec![3, 0]);
            assert_eq!(t.header.unwrap(), ["a", "b", "y"]);
        }
        let t = read_csv(
            dir.write("first.csv", b"7,1,2\n8,3,4"),
            &CsvOptions::default().label_column(LabelColumn::Index(0)),
        )
        .unwrap();
        assert_eq!(t.features.to_vec::<f32>(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(t.labels.unwrap().to_vec::<i64>(), vec![7, 8]);
        let t = read_csv(
            dir.write("nolabel.csv", b"1,2\n3,4\n"),
            &CsvOptions::default(),
        )
        .unwrap();
        assert_eq!(t.features.dims(), &[2, 2]);
        assert!(t.labels.is_none() && t.header.is_none());
    }

    #[test]
    fn bad_tables_name_file_line_and_column() {
        let dir = TempDir::new("csv-bad");
        let d = CsvOptions::default();
        let e = err(&dir, "ragged.csv", "1,2,3\n\n4,5\n", &d);
        assert!(
            e.ends_with("ragged.csv:3: column 3: row has 2 columns, line 1 has 3 (ragged table)"),
            "{e}"
        );
        let e = err(&dir, "long.csv", "1,2\n4,5,6\n", &d);
        assert!(e.contains("long.csv:2: column 3: row has 3 columns"), "{e}");
        let e = err(
            &dir,
            "nan.csv.gz",
            "h1,h2\n1,2\n3,x\n",
            &d.clone().has_header(true),
        );
        assert!(
            e.ends_with("nan.csv.gz:3: column 2: \"x\" is not a number"),
            "{e}"
        );
        let e = err(&dir, "empty.csv", "", &d);
        assert!(e.ends_with("empty.csv: file is empty"), "{e}");
        let e = err(&dir, "blank.csv", "\n\n", &d);
        assert!(e.ends_with("blank.csv: no data rows"), "{e}");
        let e = err(&dir, "header.csv", "a,b\n", &d.clone().has_header(true));
        assert!(
            e.ends_with("header.csv: no data rows after the header"),
            "{e}"
        );
        let lab = d.clone().label_column(LabelColumn::Last);
        let e = err(&dir, "frac.csv", "1,2\n1,2.5\n", &lab);
        assert!(
            e.ends_with("frac.csv:2: column 2: label \"2.5\" is not an integer"),
            "{e}"
        );
        let e = err(&dir, "cat.csv", "1,cat\n", &lab);
        assert!(
            e.ends_with("cat.csv:1: column 2: label \"cat\" is not a number"),
            "{e}"
        );
        let e = err(
            &dir,
            "range.csv",
            "1,2\n",
            &d.clone().label_column(LabelColumn::Index(2)),
        );
        assert!(
            e.contains("label column index 2 is out of range for 2 columns"),
            "{e}"
        );
        let e = err(&dir, "one.csv", "1\n2\n", &lab);
        assert!(e.contains("no features are left"), "{e}");
        let e = err(&dir, "utf.csv", "1,2\n3,\u{0}\n", &d);
        assert!(e.contains("utf.csv:2: column 2"), "{e}");
        let path = dir.write("bytes.csv", b"1,2\n3,\xff\n");
        let e = read_csv(path, &d).unwrap_err().to_string();
        assert!(e.ends_with("bytes.csv:2: column 1: not valid UTF-8"), "{e}");
    }
}
