//! Feature plumbing: ArrayFeatureExtractor, FeatureVectorizer and CastMap (whose map input
//! arrives as a keys tensor and a values tensor), as onnxruntime's CPU kernels compute them.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::encode::c_cast_i64;
use crate::engine::op::{expansion, slice, tensor, Fact, Kernel};

pub(crate) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("ArrayFeatureExtractor", array_feature_extractor);
    reg.insert("FeatureVectorizer", feature_vectorizer);
    reg.insert("CastMap", cast_map);
}

/// Sanity bound on the row width an attribute can ask for (FeatureVectorizer's total,
/// CastMap's `max_map`), so a corrupt model is an error rather than an allocation failure.
const MAX_COLUMNS: usize = 1 << 24;

// ---------------------------------------------------------------------------------------
// ArrayFeatureExtractor
// ---------------------------------------------------------------------------------------

/// `Z[..., j] = X[..., Y[j]]`: selects along the last axis; a vector X gives `[1, len(Y)]`.
#[derive(Debug)]
struct ArrayFeatureExtractor;

fn array_feature_extractor(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(ArrayFeatureExtractor), vec![]))
}

fn gather_last<T: Datum + Clone>(x: &Tensor, indices: &[usize]) -> TractResult<Vec<T>> {
    let data = slice::<T>(x)?;
    let stride = x.shape().last().copied().unwrap_or(1);
    let mut out = Vec::with_capacity(indices.len() * (data.len() / stride.max(1)));
    if stride > 0 {
        for row in data.chunks(stride) {
            for &i in indices {
                out.push(row.get(i).cloned().context("index out of range")?);
            }
        }
    }
    Ok(out)
}

impl Kernel for ArrayFeatureExtractor {
    fn op_type(&self) -> &'static str {
        "ArrayFeatureExtractor"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 2,
            "ArrayFeatureExtractor takes two inputs (X, Y), got {}",
            inputs.len()
        );
        let (x, y) = (&inputs[0], &inputs[1]);
        ensure!(
            matches!(
                x.dt,
                DatumType::F32
                    | DatumType::F64
                    | DatumType::I64
                    | DatumType::I32
                    | DatumType::String
            ),
            "ArrayFeatureExtractor X must be float, double, int64, int32 or string, got {:?}",
            x.dt
        );
        ensure!(
            y.dt == i64::datum_type(),
            "ArrayFeatureExtractor Y (indices) must be int64, got {:?}",
            y.dt
        );
        ensure!(
            !x.shape.is_empty(),
            "ArrayFeatureExtractor X must have at least one dimension"
        );
        let k: TDim = y.shape.iter().product();
        let mut shape = x.shape.clone();
        if shape.len() == 1 {
            shape = tvec!(1.into(), k);
        } else if let Some(last) = shape.last_mut() {
            *last = k;
        }
        Ok(vec![Fact::new(x.dt, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let (Some(x), Some(y)) = (inputs.first(), inputs.get(1)) else {
            bail!("ArrayFeatureExtractor takes two inputs (X, Y)")
        };
        ensure!(
            x.rank() > 0,
            "ArrayFeatureExtractor X must have at least one dimension"
        );
        let stride = x.shape().last().copied().unwrap_or(0);
        let y = slice::<i64>(y).context("ArrayFeatureExtractor Y (indices) must be int64")?;
        ensure!(!y.is_empty(), "ArrayFeatureExtractor Y (indices) is empty");
        let mut indices = Vec::with_capacity(y.len());
        for (j, &v) in y.iter().enumerate() {
            ensure!(
                v >= 0 && (v as u64) < stride as u64,
                "ArrayFeatureExtractor index Y[{j}] = {v} is out of range for the last dimension of X ({stride})"
            );
            indices.push(v as usize);
        }
        let mut shape = x.shape().to_vec();
        if shape.len() == 1 {
            shape = vec![1, indices.len()];
        } else if let Some(last) = shape.last_mut() {
            *last = indices.len();
        }
        let out = match x.datum_type() {
            DatumType::F32 => tensor(&shape, gather_last::<f32>(x, &indices)?)?,
            DatumType::F64 => tensor(&shape, gather_last::<f64>(x, &indices)?)?,
            DatumType::I64 => tensor(&shape, gather_last::<i64>(x, &indices)?)?,
            DatumType::I32 => tensor(&shape, gather_last::<i32>(x, &indices)?)?,
            DatumType::String => tensor(&shape, gather_last::<String>(x, &indices)?)?,
            dt => bail!(
                "ArrayFeatureExtractor X must be float, double, int64, int32 or string, got {dt:?}"
            ),
        };
        Ok(vec![out])
    }
}

// ---------------------------------------------------------------------------------------
// FeatureVectorizer
// ---------------------------------------------------------------------------------------

/// Concatenates its inputs' rows into `[N, sum(inputdimensions)]` f32: each input takes
/// `inputdimensions[i]` columns, truncated when wider and zero-padded when narrower; N is
/// the first input's row count (an input with fewer rows is zero-padded).
#[derive(Debug)]
struct FeatureVectorizer {
    dims: Vec<usize>,
    total: usize,
}

fn feature_vectorizer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(FeatureVectorizer::from_node(node)?), vec![]))
}

impl FeatureVectorizer {
    fn from_node(node: &NodeProto) -> TractResult<FeatureVectorizer> {
        let dims: Vec<i64> = node
            .get_attr_opt_vec("inputdimensions")?
            .unwrap_or_default();
        node.expect_attr("inputdimensions", !dims.is_empty(), "a non-empty list")?;
        node.expect_attr(
            "inputdimensions",
            dims.iter().all(|d| *d >= 0),
            "non-negative dimensions",
        )?;
        let dims: Vec<usize> = dims.iter().map(|d| *d as usize).collect();
        let total = dims.iter().try_fold(0usize, |a, d| a.checked_add(*d));
        let Some(total) = total.filter(|t| *t <= MAX_COLUMNS) else {
            return node.bail_attr(
                "inputdimensions",
                &format!("at most {MAX_COLUMNS} columns in all"),
            );
        };
        Ok(FeatureVectorizer { dims, total })
    }
}

/// (rows, values per row) of a FeatureVectorizer input: a vector is one row.
fn rows_width(shape: &[usize]) -> TractResult<(usize, usize)> {
    match shape {
        [] => bail!("FeatureVectorizer inputs must have at least one dimension"),
        [d] => Ok((1, *d)),
        [n, rest @ ..] => Ok((*n, rest.iter().product())),
    }
}

/// Where one input's rows go in the output: its own rows and width, the columns it owns
/// (`dim` from `offset`) in rows of `total`.
struct Placement {
    rows: usize,
    width: usize,
    dim: usize,
    offset: usize,
    total: usize,
}

impl Placement {
    fn copy<T: Copy>(&self, x: &[T], out: &mut [f32], cast: impl Fn(T) -> f32) {
        let take = self.width.min(self.dim);
        for r in 0..self.rows {
            let src = r * self.width;
            let dst = r * self.total + self.offset;
            let (Some(src), Some(dst)) = (x.get(src..src + take), out.get_mut(dst..dst + take))
            else {
                break;
            };
            for (d, s) in dst.iter_mut().zip(src) {
                *d = cast(*s);
            }
        }
    }
}

impl Kernel for FeatureVectorizer {
    fn op_type(&self) -> &'static str {
        "FeatureVectorizer"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == self.dims.len(),
            "FeatureVectorizer has {} inputs but {} inputdimensions",
            inputs.len(),
            self.dims.len()
        );
        for (i, f) in inputs.iter().enumerate() {
            ensure!(
                matches!(
                    f.dt,
                    DatumType::F32 | DatumType::F64 | DatumType::I64 | DatumType::I32
                ),
                "FeatureVectorizer input {i} must be float, double, int64 or int32, got {:?}",
                f.dt
            );
            ensure!(
                !f.shape.is_empty(),
                "FeatureVectorizer input {i} must have at least one dimension"
            );
        }
        let n: TDim = if inputs[0].shape.len() == 1 {
            1.into()
        } else {
            inputs[0].shape[0].clone()
        };
        Ok(vec![Fact::new(f32::datum_type(), [n, self.total.into()])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        ensure!(
            inputs.len() == self.dims.len(),
            "FeatureVectorizer has {} inputs but {} inputdimensions",
            inputs.len(),
            self.dims.len()
        );
        let (n, _) = rows_width(
            inputs
                .first()
                .context("FeatureVectorizer needs inputs")?
                .shape(),
        )?;
        let len = n
            .checked_mul(self.total)
            .context("FeatureVectorizer output is too large")?;
        let mut out = vec![0.0f32; len];
        let mut offset = 0;
        for (i, (x, &dim)) in inputs.iter().zip(&self.dims).enumerate() {
            let (n_in, width) = rows_width(x.shape())?;
            ensure!(
                n_in <= n,
                "FeatureVectorizer input {i} has {n_in} rows, more than the first input's {n}"
            );
            let place = Placement {
                rows: n_in,
                width,
                dim,
                offset,
                total: self.total,
            };
            match x.datum_type() {
                DatumType::F32 => place.copy(slice::<f32>(x)?, &mut out, |v| v),
                DatumType::F64 => place.copy(slice::<f64>(x)?, &mut out, |v| v as f32),
                DatumType::I64 => place.copy(slice::<i64>(x)?, &mut out, |v| v as f32),
                DatumType::I32 => place.copy(slice::<i32>(x)?, &mut out, |v| v as f32),
                dt => bail!(
                    "FeatureVectorizer input {i} must be float, double, int64 or int32, got {dt:?}"
                ),
            }
            offset += dim;
        }
        Ok(vec![tensor(&[n, self.total], out)?])
    }
}

// ---------------------------------------------------------------------------------------
// CastMap
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CastTo {
    Float,
    String,
    Int64,
}

/// A `map(int64, T)` (given as keys `[K]` and values `[K]`) to a `[1, M]` tensor in
/// ascending key order: DENSE gives every value (M = K); SPARSE puts the value of key `k`
/// at column `k` for `0 <= k < max_map`, pads the others (0, or "0.f" for strings, as
/// onnxruntime does), ignores keys `>= max_map` and refuses negative keys.
#[derive(Debug)]
struct CastMap {
    cast_to: CastTo,
    sparse: bool,
    max_map: usize,
}

fn cast_map(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(CastMap::from_node(node)?), vec![]))
}

impl CastMap {
    fn from_node(node: &NodeProto) -> TractResult<CastMap> {
        let cast_to = match node.get_attr_opt::<&str>("cast_to")?.unwrap_or("TO_FLOAT") {
            "TO_FLOAT" => CastTo::Float,
            "TO_STRING" => CastTo::String,
            "TO_INT64" => CastTo::Int64,
            other => {
                return node.bail_attr(
                    "cast_to",
                    &format!("{other:?} is not one of TO_FLOAT, TO_STRING, TO_INT64"),
                )
            }
        };
        let sparse = match node.get_attr_opt::<&str>("map_form")?.unwrap_or("DENSE") {
            "DENSE" => false,
            "SPARSE" => true,
            other => {
                return node.bail_attr(
                    "map_form",
                    &format!("{other:?} is not one of DENSE, SPARSE"),
                )
            }
        };
        let max_map: i64 = node.get_attr_opt("max_map")?.unwrap_or(1);
        if sparse {
            node.expect_attr("max_map", max_map > 0, || {
                format!("a positive size with map_form SPARSE, got {max_map}")
            })?;
            node.expect_attr("max_map", max_map <= MAX_COLUMNS as i64, || {
                format!("at most {MAX_COLUMNS} columns, got {max_map}")
            })?;
        }
        Ok(CastMap {
            cast_to,
            sparse,
            max_map: max_map.max(0) as usize,
        })
    }

    fn out_dt(&self) -> DatumType {
        match self.cast_to {
            CastTo::Float => f32::datum_type(),
            CastTo::String => String::datum_type(),
            CastTo::Int64 => i64::datum_type(),
        }
    }
}

/// `std::to_string(double)`: printf's `%f`.
fn c_to_string(v: f64) -> String {
    if v.is_nan() {
        if v.is_sign_negative() { "-nan" } else { "nan" }.to_string()
    } else if v.is_infinite() {
        if v < 0.0 { "-inf" } else { "inf" }.to_string()
    } else {
        format!("{v:.6}")
    }
}

/// The longest prefix of `s` (after leading whitespace) that `strtod` would read as a
/// decimal number, `inf`/`infinity` or `nan`, with its parsed value.
fn c_float_prefix(s: &str) -> Option<f64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let b = t.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i = 1;
    }
    let rest = t[i..].to_ascii_lowercase();
    let neg = b.first() == Some(&b'-');
    if rest.starts_with("inf") {
        return Some(if neg {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    if rest.starts_with("nan") {
        return Some(if neg { -f64::NAN } else { f64::NAN });
    }
    let mut digits = 0;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
        digits += 1;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
            digits += 1;
        }
    }
    if digits == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            while b.get(j).is_some_and(u8::is_ascii_digit) {
                j += 1;
            }
            i = j;
        }
    }
    t[..i].parse::<f64>().ok()
}

/// `std::stof`: an error when nothing converts or the value is out of float range.
fn c_stof(s: &str) -> TractResult<f32> {
    let v =
        c_float_prefix(s).with_context(|| format!("CastMap cannot convert {s:?} to a float"))?;
    let f = v as f32;
    let overflow = v.is_finite() && f.is_infinite();
    let underflow = v != 0.0 && v.is_finite() && (f == 0.0 || f.is_subnormal());
    ensure!(
        !overflow && !underflow,
        "CastMap: {s:?} is out of float range"
    );
    Ok(f)
}

/// `std::stoll`: leading whitespace, a sign, decimal digits; an error when nothing converts
/// or the value overflows.
fn c_stoll(s: &str) -> TractResult<i64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let b = t.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let first_digit = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    ensure!(
        i > first_digit,
        "CastMap cannot convert {s:?} to an integer"
    );
    t[..i]
        .parse::<i64>()
        .map_err(|_| format_err!("CastMap: {s:?} is out of int64 range"))
}

/// The map's values in a form every cast can read.
enum MapValues<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    I64(&'a [i64]),
    Str(&'a [String]),
}

impl MapValues<'_> {
    fn to_f32(&self, i: usize) -> TractResult<f32> {
        Ok(match self {
            MapValues::F32(v) => v[i],
            MapValues::F64(v) => v[i] as f32,
            MapValues::I64(v) => v[i] as f32,
            MapValues::Str(v) => c_stof(&v[i])?,
        })
    }

    fn to_i64(&self, i: usize) -> TractResult<i64> {
        Ok(match self {
            MapValues::F32(v) => c_cast_i64(v[i] as f64),
            MapValues::F64(v) => c_cast_i64(v[i]),
            MapValues::I64(v) => v[i],
            MapValues::Str(v) => c_stoll(&v[i])?,
        })
    }

    fn to_string(&self, i: usize) -> String {
        match self {
            MapValues::F32(v) => c_to_string(v[i] as f64),
            MapValues::F64(v) => c_to_string(v[i]),
            MapValues::I64(v) => v[i].to_string(),
            MapValues::Str(v) => v[i].clone(),
        }
    }
}

impl Kernel for CastMap {
    fn op_type(&self) -> &'static str {
        "CastMap"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 2,
            "CastMap takes a map input, fed as keys and values tensors; got {} inputs",
            inputs.len()
        );
        let (k, v) = (&inputs[0], &inputs[1]);
        ensure!(
            k.dt == i64::datum_type(),
            "CastMap map keys must be int64, got {:?}",
            k.dt
        );
        ensure!(
            matches!(
                v.dt,
                DatumType::F32 | DatumType::F64 | DatumType::I64 | DatumType::String
            ),
            "CastMap map values must be float, double, int64 or string, got {:?}",
            v.dt
        );
        ensure!(
            k.shape.len() == 1 && v.shape.len() == 1,
            "CastMap keys and values must be vectors"
        );
        let m: TDim = if self.sparse {
            self.max_map.into()
        } else {
            k.shape[0].clone()
        };
        Ok(vec![Fact::new(self.out_dt(), [1.into(), m])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let (Some(keys), Some(values)) = (inputs.first(), inputs.get(1)) else {
            bail!("CastMap takes a map input, fed as keys and values tensors")
        };
        let keys = slice::<i64>(keys).context("CastMap map keys must be int64")?;
        let values = match values.datum_type() {
            DatumType::F32 => MapValues::F32(slice::<f32>(values)?),
            DatumType::F64 => MapValues::F64(slice::<f64>(values)?),
            DatumType::I64 => MapValues::I64(slice::<i64>(values)?),
            DatumType::String => MapValues::Str(slice::<String>(values)?),
            dt => bail!("CastMap map values must be float, double, int64 or string, got {dt:?}"),
        };
        let len = match &values {
            MapValues::F32(v) => v.len(),
            MapValues::F64(v) => v.len(),
            MapValues::I64(v) => v.len(),
            MapValues::Str(v) => v.len(),
        };
        ensure!(
            keys.len() == len,
            "CastMap map has {} keys but {len} values",
            keys.len()
        );
        // ascending keys; a repeated key keeps its last value
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by_key(|&i| keys[i]);
        let mut entries: Vec<(i64, usize)> = Vec::with_capacity(len);
        for i in order {
            match entries.last_mut() {
                Some(last) if last.0 == keys[i] => last.1 = i,
                _ => entries.push((keys[i], i)),
            }
        }
        // the output columns: (column, value index)
        let (width, slots): (usize, Vec<Option<usize>>) = if self.sparse {
            if let Some((k, _)) = entries.first() {
                ensure!(
                    *k >= 0,
                    "CastMap: negative map key {k} with map_form SPARSE"
                );
            }
            let mut slots = vec![None; self.max_map];
            for (k, i) in &entries {
                if let Some(s) = usize::try_from(*k).ok().and_then(|k| slots.get_mut(k)) {
                    *s = Some(*i);
                }
            }
            (self.max_map, slots)
        } else {
            (
                entries.len(),
                entries.iter().map(|(_, i)| Some(*i)).collect(),
            )
        };
        let out = match self.cast_to {
            CastTo::Float => {
                let v = slots
                    .iter()
                    .map(|s| s.map_or(Ok(0.0), |i| values.to_f32(i)))
                    .collect::<TractResult<Vec<_>>>()?;
                tensor(&[1, width], v)?
            }
            CastTo::Int64 => {
                let v = slots
                    .iter()
                    .map(|s| s.map_or(Ok(0), |i| values.to_i64(i)))
                    .collect::<TractResult<Vec<_>>>()?;
                tensor(&[1, width], v)?
            }
            CastTo::String => {
                let v: Vec<String> = slots
                    .iter()
                    .map(|s| s.map_or_else(|| "0.f".to_string(), |i| values.to_string(i)))
                    .collect();
                tensor(&[1, width], v)?
            }
        };
        Ok(vec![out])
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // reference values as onnxruntime printed them
mod tests {
    use super::super::linear::test_util::*;
    use super::*;

    fn cast_map(cast_to: &str, form: &str, max_map: i64) -> CastMap {
        let attrs = vec![
            string("cast_to", cast_to),
            string("map_form", form),
            int("max_map", max_map),
        ];
        CastMap::from_node(&node("CastMap", attrs)).unwrap()
    }

    fn map(keys: &[i64], values: &[f32]) -> [Tensor; 2] {
        [
            tensor(&[keys.len()], keys.to_vec()).unwrap(),
            tensor(&[values.len()], values.to_vec()).unwrap(),
        ]
    }

    #[test]
    fn cast_map_dense_sorts_keys() {
        let m = map(&[2, 0, 7], &[1.5, -2.7, 3.0]);
        let out = run(&cast_map("TO_FLOAT", "DENSE", 1), &m).unwrap();
        assert_eq!(out[0].shape(), [1, 3]);
        assert_eq!(f32s(&out[0]), [-2.7, 1.5, 3.0]);
        assert_eq!(
            strs(&run(&cast_map("TO_STRING", "DENSE", 1), &m).unwrap()[0]),
            ["-2.700000", "1.500000", "3.000000"]
        );
        assert_eq!(
            i64s(&run(&cast_map("TO_INT64", "DENSE", 1), &m).unwrap()[0]),
            [-2, 1, 3]
        );
    }

    #[test]
    fn cast_map_sparse_pads_and_ignores_keys_past_max_map() {
        let m = map(&[2, 0, 7], &[1.5, -2.7, 3.0]);
        let out = run(&cast_map("TO_FLOAT", "SPARSE", 3), &m).unwrap();
        assert_eq!(out[0].shape(), [1, 3]);
        assert_eq!(f32s(&out[0]), [-2.7, 0.0, 1.5]);
        assert_eq!(
            strs(&run(&cast_map("TO_STRING", "SPARSE", 3), &m).unwrap()[0]),
            ["-2.700000", "0.f", "1.500000"]
        );
        assert_eq!(
            i64s(&run(&cast_map("TO_INT64", "SPARSE", 4), &m).unwrap()[0]),
            [-2, 0, 1, 0]
        );
        let err = run(
            &cast_map("TO_FLOAT", "SPARSE", 3),
            &map(&[-1, 0], &[1.0, 2.0]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("-1"), "{err}");
    }

    #[test]
    fn cast_map_string_values_parse_like_stof_and_stoll() {
        let keys = tensor(&[3], vec![0i64, 1, 2]).unwrap();
        let values = tensor(
            &[3],
            vec![" 12.5e1xyz".to_string(), "-7".into(), "+3.9".into()],
        )
        .unwrap();
        let out = run(
            &cast_map("TO_FLOAT", "DENSE", 1),
            &[keys.clone(), values.clone()],
        )
        .unwrap();
        assert_eq!(f32s(&out[0]), [125.0, -7.0, 3.9]);
        let out = run(&cast_map("TO_INT64", "DENSE", 1), &[keys.clone(), values]).unwrap();
        assert_eq!(i64s(&out[0]), [12, -7, 3]);
        let bad = tensor(&[3], vec!["abc".to_string(), "1".into(), "1e50".into()]).unwrap();
        assert!(run(
            &cast_map("TO_FLOAT", "DENSE", 1),
            &[keys.clone(), bad.clone()]
        )
        .is_err());
        assert!(run(&cast_map("TO_INT64", "DENSE", 1), &[keys, bad]).is_err());
        assert_eq!(c_stof("inf").unwrap(), f32::INFINITY);
        assert!(c_stof(" nan").unwrap().is_nan());
        assert!(c_stoll("99999999999999999999").is_err());
        assert_eq!(c_to_string(f64::NAN), "nan");
        assert_eq!(c_to_string(1e20), "100000000000000000000.000000");
    }

    #[test]
    fn cast_map_bad_attributes_and_inputs() {
        for attrs in [
            vec![string("cast_to", "TO_DOUBLE")],
            vec![string("map_form", "COMPACT")],
            vec![string("map_form", "SPARSE"), int("max_map", 0)],
        ] {
            let err = CastMap::from_node(&node("CastMap", attrs)).unwrap_err();
            assert!(format!("{err:?}").contains("attribute"), "{err:?}");
        }
        let k = cast_map("TO_FLOAT", "DENSE", 1);
        let keys = tensor(&[2], vec![0i64, 1]).unwrap();
        let values = tensor(&[1], vec![1.0f32]).unwrap();
        assert!(k.eval(&[&keys, &values]).is_err(), "length mismatch");
        assert!(k.eval(&[&keys]).is_err(), "one input");
    }

    #[test]
    fn array_feature_extractor_selects_on_the_last_axis() {
        let x = mat(2, 4, &[0., 1., 2., 3., 10., 11., 12., 13.]);
        let y = tensor(&[3], vec![2i64, 0, 2]).unwrap();
        let out = run(&ArrayFeatureExtractor, &[x.clone(), y]).unwrap();
        assert_eq!(out[0].shape(), [2, 3]);
        assert_eq!(f32s(&out[0]), [2., 0., 2., 12., 10., 12.]);
        let v = tensor(&[3], vec!["a".to_string(), "b".into(), "c".into()]).unwrap();
        let out = run(
            &ArrayFeatureExtractor,
            &[v, tensor(&[1], vec![1i64]).unwrap()],
        )
        .unwrap();
        assert_eq!(out[0].shape(), [1, 1]);
        assert_eq!(strs(&out[0]), ["b"]);
        for bad in [4i64, -1] {
            let err = ArrayFeatureExtractor
                .eval(&[&x, &tensor(&[2], vec![0i64, bad]).unwrap()])
                .unwrap_err();
            assert!(err.to_string().contains(&format!("Y[1] = {bad}")), "{err}");
        }
        assert!(ArrayFeatureExtractor
            .eval(&[&x, &tensor(&[0], Vec::<i64>::new()).unwrap()])
            .is_err());
    }

    #[test]
    fn feature_vectorizer_truncates_and_pads() {
        let k = FeatureVectorizer::from_node(&node(
            "FeatureVectorizer",
            vec![ints("inputdimensions", &[2, 3])],
        ))
        .unwrap();
        let a = mat(2, 3, &[1., 2., 3., 4., 5., 6.]);
        let b = tensor(&[2, 2], vec![7i64, 8, 9, 10]).unwrap();
        let out = run(&k, &[a, b]).unwrap();
        assert_eq!(out[0].shape(), [2, 5]);
        assert_eq!(f32s(&out[0]), [1., 2., 7., 8., 0., 4., 5., 9., 10., 0.]);
        assert!(FeatureVectorizer::from_node(&node("FeatureVectorizer", vec![])).is_err());
        assert!(FeatureVectorizer::from_node(&node(
            "FeatureVectorizer",
            vec![ints("inputdimensions", &[2, -1])]
        ))
        .is_err());
        let one = mat(1, 2, &[1., 2.]);
        assert!(
            k.eval(&[&one]).is_err(),
            "input count differs from inputdimensions"
        );
    }
}
