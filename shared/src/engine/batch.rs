//! Turning rows (CSV records, JSON objects) into the tensors a model takes, with errors that
//! name the line, the column and what is wrong. Rows are validated against the model's
//! inputs as they are pushed; a batch never holds a half-parsed row.

use tract_onnx::prelude::*;

use super::{ElemType, EngineError, InputInfo, Model};

/// A row that cannot be fed to the model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{message}", location(*line, column.as_deref()))]
pub struct InputError {
    /// 1-based line of the input file (0 when not from a file, e.g. the header check).
    pub line: u64,
    /// Column, feature or input name, when one is at fault.
    pub column: Option<String>,
    pub message: String,
}

fn location(line: u64, column: Option<&str>) -> String {
    match (line, column) {
        (0, None) => String::new(),
        (0, Some(c)) => format!("column {c:?}: "),
        (l, None) => format!("line {l}: "),
        (l, Some(c)) => format!("line {l}, column {c:?}: "),
    }
}

impl InputError {
    fn new(line: u64, column: Option<&str>, message: impl Into<String>) -> InputError {
        InputError {
            line,
            column: column.map(str::to_string),
            message: message.into(),
        }
    }
}

/// The values of one model input for every row of a batch, row-major.
#[derive(Debug, Clone)]
pub enum Column {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    /// One `map(int64, T)` per row.
    Map(Vec<MapRow>),
}

/// One map value of a `map(int64, T)` input.
#[derive(Debug, Clone, Default)]
pub struct MapRow {
    pub keys: Vec<i64>,
    pub values: MapValues,
}

/// The values of a [`MapRow`], in key order of `keys`.
#[derive(Debug, Clone)]
pub enum MapValues {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    Str(Vec<String>),
}

impl Default for MapValues {
    fn default() -> Self {
        MapValues::F32(Vec::new())
    }
}

impl Column {
    fn empty(info: &InputInfo) -> Column {
        if info.map_value.is_some() {
            return Column::Map(Vec::new());
        }
        match info.elem {
            ElemType::F32 => Column::F32(Vec::new()),
            ElemType::F64 => Column::F64(Vec::new()),
            ElemType::I64 => Column::I64(Vec::new()),
            ElemType::I32 => Column::I32(Vec::new()),
            ElemType::Bool => Column::Bool(Vec::new()),
            ElemType::String => Column::Str(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Column::F32(v) => v.len(),
            Column::F64(v) => v.len(),
            Column::I64(v) => v.len(),
            Column::I32(v) => v.len(),
            Column::Bool(v) => v.len(),
            Column::Str(v) => v.len(),
            Column::Map(v) => v.len(),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            Column::F32(v) => v.truncate(n),
            Column::F64(v) => v.truncate(n),
            Column::I64(v) => v.truncate(n),
            Column::I32(v) => v.truncate(n),
            Column::Bool(v) => v.truncate(n),
            Column::Str(v) => v.truncate(n),
            Column::Map(v) => v.truncate(n),
        }
    }

    /// Parses one text cell (CSV) onto the end of the column.
    fn push_text(&mut self, cell: &str) -> Result<(), String> {
        let t = cell.trim();
        match self {
            Column::F32(v) => v.push(if t.is_empty() {
                f32::NAN
            } else {
                parse_float(t)? as f32
            }),
            Column::F64(v) => v.push(if t.is_empty() {
                f64::NAN
            } else {
                parse_float(t)?
            }),
            Column::I64(v) => v.push(t.parse().map_err(|_| format!("{t:?} is not an integer"))?),
            Column::I32(v) => v.push(
                t.parse()
                    .map_err(|_| format!("{t:?} is not a 32-bit integer"))?,
            ),
            Column::Bool(v) => v.push(parse_bool(t)?),
            Column::Str(v) => v.push(cell.to_string()),
            Column::Map(_) => {
                return Err("a map input cannot be fed from CSV; use JSON lines".into())
            }
        }
        Ok(())
    }

    /// Appends one JSON scalar onto the end of the column.
    fn push_json(&mut self, value: &serde_json::Value) -> Result<(), String> {
        use serde_json::Value;
        match (self, value) {
            (Column::F32(v), Value::Null) => v.push(f32::NAN),
            (Column::F64(v), Value::Null) => v.push(f64::NAN),
            (Column::F32(v), Value::Number(n)) => v.push(n.as_f64().unwrap_or(f64::NAN) as f32),
            (Column::F64(v), Value::Number(n)) => v.push(n.as_f64().unwrap_or(f64::NAN)),
            (Column::I64(v), Value::Number(n)) => {
                v.push(n.as_i64().ok_or_else(|| format!("{n} is not an integer"))?)
            }
            (Column::I32(v), Value::Number(n)) => v.push(
                n.as_i64()
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| format!("{n} is not a 32-bit integer"))?,
            ),
            (Column::Bool(v), Value::Bool(b)) => v.push(*b),
            (Column::Str(v), Value::String(s)) => v.push(s.clone()),
            (col @ (Column::F32(_) | Column::F64(_)), Value::String(s)) if !s.trim().is_empty() => {
                // numbers sent as strings, as spreadsheets export them
                col.push_text(s)?
            }
            (Column::F32(v), Value::String(_)) => v.push(f32::NAN),
            (Column::F64(v), Value::String(_)) => v.push(f64::NAN),
            (Column::Map(_), _) => return Err("expected an object for a map input".into()),
            (col, other) => {
                return Err(format!(
                    "expected {}, got {}",
                    col.expected(),
                    json_kind(other)
                ))
            }
        }
        Ok(())
    }

    fn expected(&self) -> &'static str {
        match self {
            Column::F32(_) | Column::F64(_) => "a number",
            Column::I64(_) | Column::I32(_) => "an integer",
            Column::Bool(_) => "a boolean",
            Column::Str(_) => "a string",
            Column::Map(_) => "an object",
        }
    }
}

fn parse_float(t: &str) -> Result<f64, String> {
    t.parse::<f64>()
        .map_err(|_| format!("{t:?} is not a number"))
}

fn parse_bool(t: &str) -> Result<bool, String> {
    match t.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{t:?} is not a boolean (true/false/1/0)")),
    }
}

/// How a JSON value is named in error messages ("a string", "an array", ...).
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Rows ready to score: one [`Column`] per model input, in the model's input order.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: usize,
    pub columns: Vec<Column>,
    widths: Vec<usize>,
}

impl Batch {
    /// Tensors for rows `range` (all rows when the batch is fed whole).
    pub(crate) fn tensors(&self, model: &Model) -> Result<TVec<TValue>, EngineError> {
        self.slice_tensors(model, 0, self.rows)
    }

    pub(crate) fn row_tensors(
        &self,
        model: &Model,
        row: usize,
    ) -> Result<TVec<TValue>, EngineError> {
        self.slice_tensors(model, row, 1)
    }

    fn slice_tensors(
        &self,
        model: &Model,
        start: usize,
        len: usize,
    ) -> Result<TVec<TValue>, EngineError> {
        let mut out = TVec::new();
        for ((info, col), &width) in model.inputs().iter().zip(&self.columns).zip(&self.widths) {
            let err = |e: anyhow::Error| EngineError::Input {
                input: info.name.clone(),
                message: e.to_string(),
            };
            let shape: Vec<usize> = match info.shape.first() {
                None => vec![],
                Some(Some(fixed)) => {
                    if *fixed != len {
                        return Err(EngineError::Input {
                            input: info.name.clone(),
                            message: format!(
                                "the model takes exactly {fixed} rows per run, got {len}"
                            ),
                        });
                    }
                    info.shape.iter().map(|d| d.unwrap_or(1)).collect()
                }
                Some(None) if info.shape.len() == 1 => vec![len],
                Some(None) => {
                    let mut s = vec![len];
                    s.extend(info.shape[1..].iter().map(|d| d.unwrap_or(width)));
                    s
                }
            };
            let (a, b) = (start * width, (start + len) * width);
            // Rows of different widths cannot be stacked; say so rather than index past the end.
            let range_err = || EngineError::Input {
                input: info.name.clone(),
                message: format!(
                    "rows {start}..{} do not all have {width} values",
                    start + len
                ),
            };
            let t: Tensor = match col {
                Column::F32(v) => {
                    tensor_of(&shape, v.get(a..b).ok_or_else(range_err)?).map_err(err)?
                }
                Column::F64(v) => {
                    tensor_of(&shape, v.get(a..b).ok_or_else(range_err)?).map_err(err)?
                }
                Column::I64(v) => {
                    tensor_of(&shape, v.get(a..b).ok_or_else(range_err)?).map_err(err)?
                }
                Column::I32(v) => {
                    tensor_of(&shape, v.get(a..b).ok_or_else(range_err)?).map_err(err)?
                }
                Column::Bool(v) => {
                    tensor_of(&shape, v.get(a..b).ok_or_else(range_err)?).map_err(err)?
                }
                Column::Str(v) => tract_ndarray::ArrayD::from_shape_vec(
                    shape.clone(),
                    v.get(a..b).ok_or_else(range_err)?.to_vec(),
                )
                .map_err(|e| err(e.into()))?
                .into_tensor(),
                Column::Map(rows) => {
                    let row = match rows.get(start..start + len).ok_or_else(range_err)? {
                        [row] => row,
                        _ => {
                            return Err(EngineError::Input {
                                input: info.name.clone(),
                                message: "a map input is scored one row at a time".into(),
                            })
                        }
                    };
                    let k = row.keys.len();
                    out.push(tensor_of(&[k], &row.keys).map_err(err)?.into_tvalue());
                    let values = match &row.values {
                        MapValues::F32(v) => tensor_of(&[k], v).map_err(err)?,
                        MapValues::F64(v) => tensor_of(&[k], v).map_err(err)?,
                        MapValues::I64(v) => tensor_of(&[k], v).map_err(err)?,
                        MapValues::Str(v) => {
                            tract_ndarray::Array1::from_vec(v.clone()).into_tensor()
                        }
                    };
                    out.push(values.into_tvalue());
                    continue;
                }
            };
            out.push(t.into_tvalue());
        }
        Ok(out)
    }
}

fn tensor_of<T: Datum + Copy>(shape: &[usize], data: &[T]) -> anyhow::Result<Tensor> {
    Tensor::from_shape(shape, data)
}

#[derive(Debug, Clone)]
enum Layout {
    /// The model has one 2-D input; every column is one of its features, in order.
    Single,
    /// Column `i` of the file feeds input `inputs[i]`.
    PerInput(Vec<usize>),
}

/// Collects validated rows for a model. Errors leave the builder as it was before the row.
#[derive(Debug)]
pub struct BatchBuilder<'m> {
    model: &'m Model,
    layout: Option<Layout>,
    widths: Vec<usize>,
    columns: Vec<Column>,
    rows: usize,
    header: Vec<String>,
}

impl<'m> BatchBuilder<'m> {
    pub(crate) fn new(model: &'m Model) -> BatchBuilder<'m> {
        let columns = model.inputs().iter().map(Column::empty).collect();
        let widths = model.inputs().iter().map(|i| i.width()).collect();
        BatchBuilder {
            model,
            layout: None,
            widths,
            columns,
            rows: 0,
            header: Vec::new(),
        }
    }

    /// Rows collected so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn single_input(&self) -> Option<&'m InputInfo> {
        match self.model.inputs() {
            [only] if only.map_value.is_none() && only.shape.len() == 2 => Some(only),
            _ => None,
        }
    }

    /// Fixes how CSV columns map to inputs, from the header row.
    pub fn set_header<S: AsRef<str>>(&mut self, header: &[S]) -> Result<(), InputError> {
        let names: Vec<String> = header
            .iter()
            .map(|h| h.as_ref().trim().to_string())
            .collect();
        let inputs = self.model.inputs();
        let is_input_names = names.iter().all(|n| inputs.iter().any(|i| i.name == *n));
        let layout = match self.single_input() {
            Some(only) if !(is_input_names && names.len() == 1 && only.width() == 1) => {
                if let Some(w) = only.shape[1] {
                    if names.len() != w {
                        return Err(InputError::new(
                            1,
                            None,
                            format!(
                                "the header has {} columns, the model's input {:?} takes {w} features",
                                names.len(),
                                only.name
                            ),
                        ));
                    }
                }
                self.widths[0] = names.len();
                Layout::Single
            }
            _ => {
                let mut map = Vec::with_capacity(names.len());
                for name in &names {
                    let Some(ix) = inputs.iter().position(|i| i.name == *name) else {
                        return Err(InputError::new(
                            1,
                            Some(name),
                            format!(
                                "not an input of the model (inputs: {})",
                                input_list(self.model)
                            ),
                        ));
                    };
                    if map.contains(&ix) {
                        return Err(InputError::new(
                            1,
                            Some(name),
                            "appears twice in the header",
                        ));
                    }
                    if self.widths[ix] != 1 {
                        return Err(InputError::new(
                            1,
                            Some(name),
                            format!(
                                "input takes {} values per row; a CSV column holds one",
                                self.widths[ix]
                            ),
                        ));
                    }
                    map.push(ix);
                }
                if let Some(missing) = (0..inputs.len()).find(|ix| !map.contains(ix)) {
                    return Err(InputError::new(
                        1,
                        None,
                        format!(
                            "the model's input {:?} has no column in the header",
                            inputs[missing].name
                        ),
                    ));
                }
                Layout::PerInput(map)
            }
        };
        self.layout = Some(layout);
        self.header = names;
        Ok(())
    }

    /// Adds one CSV record (after [`BatchBuilder::set_header`]).
    pub fn push_csv<S: AsRef<str>>(&mut self, record: &[S], line: u64) -> Result<(), InputError> {
        let Some(layout) = self.layout.clone() else {
            return Err(InputError::new(line, None, "no header was set"));
        };
        if record.len() != self.header.len() {
            return Err(InputError::new(
                line,
                None,
                format!(
                    "{} fields, the header has {}",
                    record.len(),
                    self.header.len()
                ),
            ));
        }
        let before: Vec<usize> = self.columns.iter().map(Column::len).collect();
        let result = (|| {
            for (i, cell) in record.iter().enumerate() {
                let target = match &layout {
                    Layout::Single => 0,
                    Layout::PerInput(map) => map[i],
                };
                self.columns[target]
                    .push_text(cell.as_ref())
                    .map_err(|m| InputError::new(line, Some(&self.header[i]), m))?;
            }
            Ok(())
        })();
        self.finish_row(result, &before)
    }

    /// Adds one JSON object: keys are input names, or feature names for a single 2-D input.
    pub fn push_json(
        &mut self,
        obj: &serde_json::Map<String, serde_json::Value>,
        line: u64,
    ) -> Result<(), InputError> {
        let before: Vec<usize> = self.columns.iter().map(Column::len).collect();
        let result = self.push_json_inner(obj, line);
        self.finish_row(result, &before)
    }

    fn push_json_inner(
        &mut self,
        obj: &serde_json::Map<String, serde_json::Value>,
        line: u64,
    ) -> Result<(), InputError> {
        let model = self.model;
        let inputs = model.inputs();
        for key in obj.keys() {
            let known = inputs.iter().any(|i| i.name == *key)
                || model
                    .feature_names()
                    .is_some_and(|f| f.iter().any(|n| n == key) && self.single_input().is_some());
            if !known {
                return Err(InputError::new(
                    line,
                    Some(key),
                    format!(
                        "not an input{} of the model (inputs: {})",
                        if model.feature_names().is_some() {
                            " or feature"
                        } else {
                            ""
                        },
                        input_list(model)
                    ),
                ));
            }
        }
        for (ix, info) in inputs.iter().enumerate() {
            match obj.get(&info.name) {
                Some(value) => self.push_json_input(ix, value, line)?,
                None => {
                    match (self.single_input(), model.feature_names()) {
                        (Some(_), Some(features)) => {
                            if self.widths[0] != features.len() && info.shape[1].is_some() {
                                return Err(InputError::new(
                                    line,
                                    Some(&info.name),
                                    format!(
                                        "the model has {} feature names for {} features",
                                        features.len(),
                                        self.widths[0]
                                    ),
                                ));
                            }
                            if self.rows > 0 && self.widths[0] != features.len() {
                                return Err(InputError::new(
                                line,
                                Some(&info.name),
                                format!("earlier rows had {} values, the model has {} feature names", self.widths[0], features.len()),
                            ));
                            }
                            self.widths[0] = features.len();
                            for f in features {
                                let v = obj
                                    .get(f)
                                    .ok_or_else(|| InputError::new(line, Some(f), "missing"))?;
                                self.columns[0]
                                    .push_json(v)
                                    .map_err(|m| InputError::new(line, Some(f), m))?;
                            }
                        }
                        _ => {
                            return Err(InputError::new(
                                line,
                                Some(&info.name),
                                if self.single_input().is_some() {
                                    format!("missing (the model has no feature names; give \"{}\": [{} values])", info.name, self.widths[ix])
                                } else {
                                    "missing".to_string()
                                },
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn push_json_input(
        &mut self,
        ix: usize,
        value: &serde_json::Value,
        line: u64,
    ) -> Result<(), InputError> {
        use serde_json::Value;
        let info = &self.model.inputs()[ix];
        let name = info.name.as_str();
        if let Some(vt) = info.map_value {
            let Value::Object(map) = value else {
                return Err(InputError::new(
                    line,
                    Some(name),
                    format!("expected an object (a map), got {}", json_kind(value)),
                ));
            };
            let mut row = MapRow {
                keys: Vec::with_capacity(map.len()),
                values: MapValues::default(),
            };
            let mut col = match vt {
                ElemType::F32 => Column::F32(Vec::new()),
                ElemType::F64 => Column::F64(Vec::new()),
                ElemType::I64 => Column::I64(Vec::new()),
                _ => Column::Str(Vec::new()),
            };
            for (k, v) in map {
                let key: i64 = k.trim().parse().map_err(|_| {
                    InputError::new(line, Some(name), format!("map key {k:?} is not an integer"))
                })?;
                row.keys.push(key);
                col.push_json(v)
                    .map_err(|m| InputError::new(line, Some(name), format!("key {k}: {m}")))?;
            }
            row.values = match col {
                Column::F32(v) => MapValues::F32(v),
                Column::F64(v) => MapValues::F64(v),
                Column::I64(v) => MapValues::I64(v),
                Column::Str(v) => MapValues::Str(v),
                _ => MapValues::default(),
            };
            if let Column::Map(rows) = &mut self.columns[ix] {
                rows.push(row);
            }
            return Ok(());
        }
        let mut flat = Vec::new();
        flatten(value, &mut flat);
        let width = if self.single_input().is_some()
            && info.shape.get(1).is_some_and(|d| d.is_none())
            && self.rows == 0
        {
            flat.len()
        } else {
            self.widths[ix]
        };
        if flat.len() != width {
            return Err(InputError::new(
                line,
                Some(name),
                format!("expected {width} values, got {}", flat.len()),
            ));
        }
        self.widths[ix] = width;
        for v in flat {
            self.columns[ix]
                .push_json(v)
                .map_err(|m| InputError::new(line, Some(name), m))?;
        }
        Ok(())
    }

    fn finish_row(
        &mut self,
        result: Result<(), InputError>,
        before: &[usize],
    ) -> Result<(), InputError> {
        match result {
            Ok(()) => {
                self.rows += 1;
                Ok(())
            }
            Err(e) => {
                for (c, n) in self.columns.iter_mut().zip(before) {
                    c.truncate(*n);
                }
                Err(e)
            }
        }
    }

    /// Takes the rows collected so far, leaving the builder empty (layout kept).
    pub fn take(&mut self) -> Batch {
        let empty: Vec<Column> = self.model.inputs().iter().map(Column::empty).collect();
        let columns = std::mem::replace(&mut self.columns, empty);
        let rows = std::mem::take(&mut self.rows);
        Batch {
            rows,
            columns,
            widths: self.widths.clone(),
        }
    }
}

fn flatten<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match v {
        serde_json::Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

fn input_list(model: &Model) -> String {
    model
        .inputs()
        .iter()
        .map(|i| i.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
