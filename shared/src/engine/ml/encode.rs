//! Categorical encoders: OneHotEncoder, LabelEncoder (ml opsets 1, 2 and 4) and
//! CategoryMapper, as onnxruntime's CPU kernels compute them.

use std::collections::HashMap;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::{NodeProto, TensorProto};
use tract_onnx::tract_hir::internal::*;

use crate::engine::op::{expansion, slice, tensor, Fact, Kernel};

pub(crate) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("OneHotEncoder", one_hot_encoder);
    reg.insert("LabelEncoder", label_encoder);
    reg.insert("CategoryMapper", category_mapper);
}

/// C++ `static_cast<int64_t>` of a float as x86-64 performs it: truncation toward zero,
/// with NaN and out-of-range values giving `i64::MIN`.
pub(crate) fn c_cast_i64(v: f64) -> i64 {
    // [-2^63, 2^63) converts; everything else is the "integer indefinite" value
    const LOW: f64 = i64::MIN as f64;
    if (LOW..-LOW).contains(&v) {
        v as i64
    } else {
        i64::MIN
    }
}

/// The value of an element for error messages.
fn describe(t: &Tensor, i: usize) -> String {
    match t.datum_type() {
        DatumType::String => slice::<String>(t)
            .ok()
            .and_then(|s| s.get(i))
            .map(|s| format!("{s:?}")),
        DatumType::F32 => slice::<f32>(t)
            .ok()
            .and_then(|s| s.get(i))
            .map(|v| v.to_string()),
        DatumType::F64 => slice::<f64>(t)
            .ok()
            .and_then(|s| s.get(i))
            .map(|v| v.to_string()),
        DatumType::I64 => slice::<i64>(t)
            .ok()
            .and_then(|s| s.get(i))
            .map(|v| v.to_string()),
        DatumType::I32 => slice::<i32>(t)
            .ok()
            .and_then(|s| s.get(i))
            .map(|v| v.to_string()),
        _ => None,
    }
    .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// OneHotEncoder
// ---------------------------------------------------------------------------------------

/// `Y[..., k] = 1` where `k` is the input's category; shape `input_shape + [categories]`,
/// f32. Numeric inputs are cast to int64 (truncation) and looked up in `cats_int64s`,
/// strings in `cats_strings`. An unknown category gives all zeros (`zeros = 1`, the
/// default) or an error (`zeros = 0`).
#[derive(Debug)]
struct OneHotEncoder {
    ints: HashMap<i64, usize>,
    strings: HashMap<String, usize>,
    categories: usize,
    zeros: bool,
}

fn one_hot_encoder(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(OneHotEncoder::from_node(node)?), vec![]))
}

impl OneHotEncoder {
    fn from_node(node: &NodeProto) -> TractResult<OneHotEncoder> {
        let cats_ints: Vec<i64> = node.get_attr_opt_vec("cats_int64s")?.unwrap_or_default();
        let cats_strings: Vec<String> = node.get_attr_opt_vec("cats_strings")?.unwrap_or_default();
        node.expect_attr(
            "cats_int64s",
            cats_ints.is_empty() != cats_strings.is_empty(),
            "exactly one of cats_int64s and cats_strings, non-empty",
        )?;
        let zeros: i64 = node.get_attr_opt("zeros")?.unwrap_or(1);
        // later duplicates win, as onnxruntime's `map[cat] = index`
        let ints: HashMap<i64, usize> =
            cats_ints.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let strings: HashMap<String, usize> = cats_strings
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        Ok(OneHotEncoder {
            ints,
            strings,
            categories: cats_ints.len().max(cats_strings.len()),
            zeros: zeros != 0,
        })
    }

    fn fill<T>(
        &self,
        x: &Tensor,
        values: &[T],
        lookup: impl Fn(&T) -> Option<usize>,
    ) -> TractResult<Vec<f32>> {
        let len = values
            .len()
            .checked_mul(self.categories)
            .context("OneHotEncoder output is too large")?;
        let mut out = vec![0.0f32; len];
        for (i, v) in values.iter().enumerate() {
            match lookup(v) {
                Some(k) => {
                    if let Some(slot) = out.get_mut(i * self.categories + k) {
                        *slot = 1.0;
                    }
                }
                None if !self.zeros => {
                    bail!(
                        "OneHotEncoder: unknown category {} (and zeros = 0)",
                        describe(x, i)
                    )
                }
                None => {}
            }
        }
        Ok(out)
    }
}

impl Kernel for OneHotEncoder {
    fn op_type(&self) -> &'static str {
        "OneHotEncoder"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "OneHotEncoder takes one input, got {}",
            inputs.len()
        );
        let f = &inputs[0];
        ensure!(
            matches!(
                f.dt,
                DatumType::String
                    | DatumType::I64
                    | DatumType::I32
                    | DatumType::F32
                    | DatumType::F64
            ),
            "OneHotEncoder input must be string, int64, int32, float or double, got {:?}",
            f.dt
        );
        let mut shape = f.shape.clone();
        shape.push(self.categories.into());
        Ok(vec![Fact::new(f32::datum_type(), shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let x = inputs.first().context("OneHotEncoder needs an input")?;
        let ints = |v: i64| self.ints.get(&v).copied();
        let out = match x.datum_type() {
            DatumType::String => self.fill(x, slice::<String>(x)?, |s| {
                self.strings.get(s.as_str()).copied()
            })?,
            DatumType::I64 => self.fill(x, slice::<i64>(x)?, |v| ints(*v))?,
            DatumType::I32 => self.fill(x, slice::<i32>(x)?, |v| ints(*v as i64))?,
            DatumType::F32 => self.fill(x, slice::<f32>(x)?, |v| ints(c_cast_i64(*v as f64)))?,
            DatumType::F64 => self.fill(x, slice::<f64>(x)?, |v| ints(c_cast_i64(*v)))?,
            dt => bail!(
                "OneHotEncoder input must be string, int64, int32, float or double, got {dt:?}"
            ),
        };
        let mut shape = x.shape().to_vec();
        shape.push(self.categories);
        Ok(vec![tensor(&shape, out)?])
    }
}

// ---------------------------------------------------------------------------------------
// Lookup tables shared by LabelEncoder and CategoryMapper
// ---------------------------------------------------------------------------------------

/// Hash key of a float: ±0 are one key; NaN is one key when `nan_matches` (ml opset 4),
/// else it matches nothing.
fn f32_key(v: f32, nan_matches: bool) -> Option<u32> {
    if v.is_nan() {
        nan_matches.then_some(0x7fc0_0000)
    } else if v == 0.0 {
        Some(0)
    } else {
        Some(v.to_bits())
    }
}

fn f64_key(v: f64, nan_matches: bool) -> Option<u64> {
    if v.is_nan() {
        nan_matches.then_some(0x7ff8_0000_0000_0000)
    } else if v == 0.0 {
        Some(0)
    } else {
        Some(v.to_bits())
    }
}

/// A column of keys or values of one type.
#[derive(Debug, Clone, PartialEq)]
enum Column {
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Str(Vec<String>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::I64(v) => v.len(),
            Column::F32(v) => v.len(),
            Column::F64(v) => v.len(),
            Column::Str(v) => v.len(),
        }
    }

    fn datum_type(&self) -> DatumType {
        match self {
            Column::I64(_) => i64::datum_type(),
            Column::F32(_) => f32::datum_type(),
            Column::F64(_) => f64::datum_type(),
            Column::Str(_) => String::datum_type(),
        }
    }

    /// Appends the first value of `other` (same type).
    fn push_first(&mut self, other: &Column) -> TractResult<()> {
        match (self, other) {
            (Column::I64(a), Column::I64(b)) if !b.is_empty() => a.push(b[0]),
            (Column::F32(a), Column::F32(b)) if !b.is_empty() => a.push(b[0]),
            (Column::F64(a), Column::F64(b)) if !b.is_empty() => a.push(b[0]),
            (Column::Str(a), Column::Str(b)) if !b.is_empty() => a.push(b[0].clone()),
            (a, b) => bail!(
                "a default of type {:?} for values of type {:?}",
                b.datum_type(),
                a.datum_type()
            ),
        }
        Ok(())
    }

    /// A tensor of `shape` holding `self[ix[i]]`.
    fn gather(&self, shape: &[usize], ix: &[usize]) -> TractResult<Tensor> {
        fn pick<T: Clone + Datum>(shape: &[usize], v: &[T], ix: &[usize]) -> TractResult<Tensor> {
            let out = ix
                .iter()
                .map(|&i| v.get(i).cloned().context("lookup index out of range"))
                .collect::<TractResult<Vec<T>>>()?;
            tensor(shape, out)
        }
        match self {
            Column::I64(v) => pick(shape, v, ix),
            Column::F32(v) => pick(shape, v, ix),
            Column::F64(v) => pick(shape, v, ix),
            Column::Str(v) => pick(shape, v, ix),
        }
    }
}

/// Key -> index into the values.
#[derive(Debug, Clone)]
enum KeyIndex {
    I64(HashMap<i64, usize>),
    F32(HashMap<u32, usize>, bool),
    F64(HashMap<u64, usize>, bool),
    Str(HashMap<String, usize>),
}

impl KeyIndex {
    /// Indexes `keys`; with `first_wins` a repeated key keeps its first index (`emplace`),
    /// else its last (`map[key] = index`).
    fn new(keys: &Column, nan_matches: bool, first_wins: bool) -> KeyIndex {
        fn build<K: std::hash::Hash + Eq>(
            keys: impl Iterator<Item = Option<K>>,
            first_wins: bool,
        ) -> HashMap<K, usize> {
            let mut map = HashMap::new();
            for (i, k) in keys.enumerate() {
                let Some(k) = k else { continue };
                if first_wins {
                    map.entry(k).or_insert(i);
                } else {
                    map.insert(k, i);
                }
            }
            map
        }
        match keys {
            Column::I64(k) => KeyIndex::I64(build(k.iter().map(|v| Some(*v)), first_wins)),
            Column::F32(k) => KeyIndex::F32(
                build(k.iter().map(|v| f32_key(*v, nan_matches)), first_wins),
                nan_matches,
            ),
            Column::F64(k) => KeyIndex::F64(
                build(k.iter().map(|v| f64_key(*v, nan_matches)), first_wins),
                nan_matches,
            ),
            Column::Str(k) => KeyIndex::Str(build(k.iter().map(|v| Some(v.clone())), first_wins)),
        }
    }

    fn datum_type(&self) -> DatumType {
        match self {
            KeyIndex::I64(_) => i64::datum_type(),
            KeyIndex::F32(..) => f32::datum_type(),
            KeyIndex::F64(..) => f64::datum_type(),
            KeyIndex::Str(_) => String::datum_type(),
        }
    }

    /// Index of each element of `x` (of this key type), `missing` where it is not a key.
    fn lookup(&self, x: &Tensor, missing: usize) -> TractResult<Vec<usize>> {
        Ok(match self {
            KeyIndex::I64(m) => slice::<i64>(x)?
                .iter()
                .map(|v| m.get(v).copied().unwrap_or(missing))
                .collect(),
            KeyIndex::F32(m, nan) => slice::<f32>(x)?
                .iter()
                .map(|v| {
                    f32_key(*v, *nan)
                        .and_then(|k| m.get(&k).copied())
                        .unwrap_or(missing)
                })
                .collect(),
            KeyIndex::F64(m, nan) => slice::<f64>(x)?
                .iter()
                .map(|v| {
                    f64_key(*v, *nan)
                        .and_then(|k| m.get(&k).copied())
                        .unwrap_or(missing)
                })
                .collect(),
            KeyIndex::Str(m) => slice::<String>(x)?
                .iter()
                .map(|v| m.get(v.as_str()).copied().unwrap_or(missing))
                .collect(),
        })
    }
}

/// One key type -> value type mapping with a default; the default is stored as the last
/// value.
#[derive(Debug, Clone)]
struct Table {
    keys: KeyIndex,
    /// The values followed by the default.
    values: Column,
}

impl Table {
    fn new(
        keys: &Column,
        mut values: Column,
        default: &Column,
        nan_matches: bool,
        first_wins: bool,
    ) -> TractResult<Table> {
        values.push_first(default)?;
        Ok(Table {
            keys: KeyIndex::new(keys, nan_matches, first_wins),
            values,
        })
    }

    fn encode(&self, x: &Tensor) -> TractResult<Tensor> {
        let default = self.values.len() - 1;
        let ix = self.keys.lookup(x, default)?;
        self.values.gather(x.shape(), &ix)
    }
}

/// A kernel mapping each element through one of its tables, chosen by the input type.
#[derive(Debug)]
struct Lookup {
    op: &'static str,
    tables: Vec<Table>,
}

impl Lookup {
    fn table(&self, dt: DatumType) -> TractResult<&Table> {
        self.tables
            .iter()
            .find(|t| t.keys.datum_type() == dt)
            .with_context(|| {
                let want: Vec<String> = self
                    .tables
                    .iter()
                    .map(|t| format!("{:?}", t.keys.datum_type()))
                    .collect();
                format!(
                    "{} keys are {}, the input is {dt:?}",
                    self.op,
                    want.join(" or ")
                )
            })
    }
}

impl Kernel for Lookup {
    fn op_type(&self) -> &'static str {
        self.op
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "{} takes one input, got {}",
            self.op,
            inputs.len()
        );
        let table = self.table(inputs[0].dt)?;
        Ok(vec![Fact::new(
            table.values.datum_type(),
            inputs[0].shape.iter().cloned(),
        )])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let x = inputs
            .first()
            .with_context(|| format!("{} needs an input", self.op))?;
        Ok(vec![self.table(x.datum_type())?.encode(x)?])
    }
}

// ---------------------------------------------------------------------------------------
// LabelEncoder
// ---------------------------------------------------------------------------------------

fn label_encoder(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ml_opset = ctx
        .model
        .opset_import
        .iter()
        .find(|o| o.domain == "ai.onnx.ml")
        .map(|o| o.version)
        .unwrap_or(1);
    Ok((
        expansion(label_encoder_kernel(node, ml_opset, &|t| {
            ctx.load_tensor(t)
        })?),
        vec![],
    ))
}

/// Reads a tensor attribute as a column (int64, float, double or string).
fn tensor_column(node: &NodeProto, name: &str, t: Tensor) -> TractResult<Column> {
    Ok(match t.datum_type() {
        DatumType::I64 => Column::I64(slice::<i64>(&t)?.to_vec()),
        DatumType::F32 => Column::F32(slice::<f32>(&t)?.to_vec()),
        DatumType::F64 => Column::F64(slice::<f64>(&t)?.to_vec()),
        DatumType::String => Column::Str(slice::<String>(&t)?.to_vec()),
        dt => {
            return node.bail_attr(
                name,
                &format!("tensors of {dt:?} are not supported (int64, float, double, string)"),
            )
        }
    })
}

/// The one `<prefix>_{strings,int64s,floats}` or `<prefix>_tensor` attribute given.
fn one_column(
    node: &NodeProto,
    prefix: &str,
    load: &dyn Fn(&TensorProto) -> TractResult<Tensor>,
) -> TractResult<Column> {
    let mut found: Vec<(String, Column)> = Vec::new();
    let name = |suffix: &str| format!("{prefix}_{suffix}");
    if let Some(v) = node.get_attr_opt_vec::<String>(&name("strings"))? {
        found.push((name("strings"), Column::Str(v)));
    }
    if let Some(v) = node.get_attr_opt_vec::<i64>(&name("int64s"))? {
        found.push((name("int64s"), Column::I64(v)));
    }
    if let Some(v) = node.get_attr_opt_vec::<f32>(&name("floats"))? {
        found.push((name("floats"), Column::F32(v)));
    }
    if let Some(t) = node.get_attr_opt::<&TensorProto>(&name("tensor"))? {
        let t = load(t).or_else(|e| node.bail_attr(&name("tensor"), &format!("{e:#}")))?;
        found.push((name("tensor"), tensor_column(node, &name("tensor"), t)?));
    }
    match found.len() {
        1 => Ok(found.remove(0).1),
        0 => node.bail_attr(
            &name("*"),
            &format!(
                "one of {0}_strings, {0}_int64s, {0}_floats, {0}_tensor is required",
                prefix
            ),
        ),
        _ => {
            let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
            node.bail_attr(
                &names[1..].join(", "),
                &format!("only one of {} may be given", names.join(", ")),
            )
        }
    }
}

/// LabelEncoder for the node's attributes: opset 1 (`classes_strings`, string <-> int64 by
/// position) when `classes_strings` is given, else opsets 2-4 (`keys_*` / `values_*` /
/// `default_*`, tensors since opset 4). NaN keys match NaN inputs from ml opset 4 on, as
/// in onnxruntime; ±0 always match each other. Repeated keys keep their first value.
fn label_encoder_kernel(
    node: &NodeProto,
    ml_opset: i64,
    load: &dyn Fn(&TensorProto) -> TractResult<Tensor>,
) -> TractResult<Lookup> {
    if let Some(classes) = node.get_attr_opt_vec::<String>("classes_strings")? {
        let default_int: i64 = node.get_attr_opt("default_int64")?.unwrap_or(-1);
        let default_string: String = node
            .get_attr_opt("default_string")?
            .unwrap_or_else(|| "_Unused".into());
        let indices: Vec<i64> = (0..classes.len() as i64).collect();
        let strings = Column::Str(classes);
        let to_int = Table::new(
            &strings,
            Column::I64(indices.clone()),
            &Column::I64(vec![default_int]),
            false,
            false,
        )?;
        let to_str = Table::new(
            &Column::I64(indices),
            strings,
            &Column::Str(vec![default_string]),
            false,
            false,
        )?;
        return Ok(Lookup {
            op: "LabelEncoder",
            tables: vec![to_int, to_str],
        });
    }
    let keys = one_column(node, "keys", load)?;
    let values = one_column(node, "values", load)?;
    node.expect_attr("values_*", keys.len() == values.len(), || {
        format!(
            "as many values as keys ({}), got {}",
            keys.len(),
            values.len()
        )
    })?;
    let default = match node.get_attr_opt::<&TensorProto>("default_tensor")? {
        Some(t) => {
            let t = load(t).or_else(|e| node.bail_attr("default_tensor", &format!("{e:#}")))?;
            node.expect_attr("default_tensor", t.len() == 1, || {
                format!("one element, got {}", t.len())
            })?;
            let d = tensor_column(node, "default_tensor", t)?;
            node.expect_attr(
                "default_tensor",
                d.datum_type() == values.datum_type(),
                || {
                    format!(
                        "the values' type {:?}, got {:?}",
                        values.datum_type(),
                        d.datum_type()
                    )
                },
            )?;
            d
        }
        None => match &values {
            Column::I64(_) => Column::I64(vec![node.get_attr_opt("default_int64")?.unwrap_or(-1)]),
            Column::F32(_) => {
                Column::F32(vec![node.get_attr_opt("default_float")?.unwrap_or(-0.0)])
            }
            Column::F64(_) => Column::F64(vec![-0.0]),
            Column::Str(_) => Column::Str(vec![node
                .get_attr_opt("default_string")?
                .unwrap_or_else(|| "_Unused".to_string())]),
        },
    };
    let table = Table::new(&keys, values, &default, ml_opset >= 4, true)?;
    Ok(Lookup {
        op: "LabelEncoder",
        tables: vec![table],
    })
}

// ---------------------------------------------------------------------------------------
// CategoryMapper
// ---------------------------------------------------------------------------------------

fn category_mapper(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(category_mapper_kernel(node)?), vec![]))
}

/// CategoryMapper: `cats_strings[i] <-> cats_int64s[i]`, string inputs to int64, int64
/// inputs to string, with `default_int64` (-1) / `default_string` ("_Unused"); repeated
/// entries keep the last mapping.
fn category_mapper_kernel(node: &NodeProto) -> TractResult<Lookup> {
    let strings: Vec<String> = node.get_attr_vec("cats_strings")?;
    let ints: Vec<i64> = node.get_attr_vec("cats_int64s")?;
    node.expect_attr("cats_int64s", strings.len() == ints.len(), || {
        format!(
            "as many values as cats_strings ({}), got {}",
            strings.len(),
            ints.len()
        )
    })?;
    let default_int: i64 = node.get_attr_opt("default_int64")?.unwrap_or(-1);
    let default_string: String = node
        .get_attr_opt("default_string")?
        .unwrap_or_else(|| "_Unused".into());
    let (strings, ints) = (Column::Str(strings), Column::I64(ints));
    let to_int = Table::new(
        &strings,
        ints.clone(),
        &Column::I64(vec![default_int]),
        false,
        false,
    )?;
    let to_str = Table::new(
        &ints,
        strings,
        &Column::Str(vec![default_string]),
        false,
        false,
    )?;
    Ok(Lookup {
        op: "CategoryMapper",
        tables: vec![to_int, to_str],
    })
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // reference values as onnxruntime printed them
mod tests {
    use super::super::linear::test_util::*;
    use super::*;
    use tract_onnx::pb::tensor_proto::DataType;

    fn load(t: &TensorProto) -> TractResult<Tensor> {
        tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::MmapDataResolver, t, None)
    }

    fn strings_tensor(v: &[&str]) -> Tensor {
        tensor(&[v.len()], v.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    fn le(attrs: Vec<tract_onnx::pb::AttributeProto>, opset: i64) -> TractResult<Lookup> {
        label_encoder_kernel(&node("LabelEncoder", attrs), opset, &load)
    }

    #[test]
    fn one_hot_strings_unknown_gives_zeros_or_an_error() {
        let attrs = vec![strings("cats_strings", &["a", "b", "c"])];
        let k = OneHotEncoder::from_node(&node("OneHotEncoder", attrs)).unwrap();
        let x = tensor(
            &[2, 2],
            ["a", "zz", "c", "b"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
        .unwrap();
        let out = run(&k, std::slice::from_ref(&x)).unwrap();
        assert_eq!(out[0].shape(), [2, 2, 3]);
        assert_eq!(
            f32s(&out[0]),
            [1., 0., 0., 0., 0., 0., 0., 0., 1., 0., 1., 0.]
        );
        let attrs = vec![strings("cats_strings", &["a", "b", "c"]), int("zeros", 0)];
        let k = OneHotEncoder::from_node(&node("OneHotEncoder", attrs)).unwrap();
        let err = k.eval(&[&x]).unwrap_err();
        assert!(err.to_string().contains("\"zz\""), "{err}");
    }

    #[test]
    fn one_hot_casts_floats_like_cpp() {
        let attrs = vec![ints("cats_int64s", &[1, 2, 3, 0, -1, i64::MIN, 1])];
        let k = OneHotEncoder::from_node(&node("OneHotEncoder", attrs)).unwrap();
        let x = mat(1, 4, &[1.7, f32::NAN, -1.5, 1e30]);
        let out = f32s(&run(&k, &[x]).unwrap()[0]);
        // 1.7 -> 1 (the later duplicate, index 6); NaN and 1e30 -> i64::MIN (5); -1.5 -> -1 (4)
        let hot: Vec<usize> = out
            .chunks(7)
            .map(|c| c.iter().position(|v| *v == 1.0).unwrap())
            .collect();
        assert_eq!(hot, [6, 5, 4, 5]);
    }

    #[test]
    fn one_hot_needs_exactly_one_category_list() {
        assert!(OneHotEncoder::from_node(&node("OneHotEncoder", vec![])).is_err());
        let attrs = vec![ints("cats_int64s", &[1]), strings("cats_strings", &["a"])];
        assert!(OneHotEncoder::from_node(&node("OneHotEncoder", attrs)).is_err());
    }

    #[test]
    fn label_encoder_opset1_defaults_and_duplicates() {
        let k = le(vec![strings("classes_strings", &["a", "c", "a"])], 1).unwrap();
        let out = run(&k, &[strings_tensor(&["a", "b", "c"])]).unwrap();
        assert_eq!(i64s(&out[0]), [2, -1, 1]);
        let out = run(&k, &[tensor(&[5], vec![0i64, 1, 2, 7, -1]).unwrap()]).unwrap();
        assert_eq!(strs(&out[0]), ["a", "c", "a", "_Unused", "_Unused"]);
        let attrs = vec![
            strings("classes_strings", &["a"]),
            int("default_int64", 99),
            string("default_string", "zz"),
        ];
        let k = le(attrs, 1).unwrap();
        assert_eq!(i64s(&run(&k, &[strings_tensor(&["b"])]).unwrap()[0]), [99]);
        assert_eq!(
            strs(&run(&k, &[tensor(&[1], vec![3i64]).unwrap()]).unwrap()[0]),
            ["zz"]
        );
    }

    #[test]
    fn label_encoder_float_keys_nan_matching_depends_on_opset() {
        let attrs = || {
            vec![
                floats("keys_floats", &[1.0, f32::NAN, -0.0, 2.5, 2.5]),
                floats("values_floats", &[10., 20., 30., 40., 50.]),
            ]
        };
        let x = tensor(&[6], vec![1.0f32, f32::NAN, 0.0, -0.0, 5.0, 2.5]).unwrap();
        let v2 = f32s(&run(&le(attrs(), 2).unwrap(), std::slice::from_ref(&x)).unwrap()[0]);
        assert_eq!(&v2[..1], &[10.0]);
        assert!(
            v2[1] == 0.0 && v2[1].is_sign_negative(),
            "NaN is not a key in opset 2: default -0.0"
        );
        assert_eq!(&v2[2..], &[30., 30., -0.0, 40.]);
        let v4 = f32s(&run(&le(attrs(), 4).unwrap(), &[x]).unwrap()[0]);
        assert_eq!(v4, [10., 20., 30., 30., -0.0, 40.]);
    }

    #[test]
    fn label_encoder_defaults_per_value_type() {
        let k = le(
            vec![strings("keys_strings", &["a"]), ints("values_int64s", &[1])],
            2,
        )
        .unwrap();
        assert_eq!(
            i64s(&run(&k, &[strings_tensor(&["a", "b"])]).unwrap()[0]),
            [1, -1]
        );
        let k = le(
            vec![ints("keys_int64s", &[1]), strings("values_strings", &["x"])],
            2,
        )
        .unwrap();
        assert_eq!(
            strs(&run(&k, &[tensor(&[2], vec![1i64, 2]).unwrap()]).unwrap()[0]),
            ["x", "_Unused"]
        );
        let attrs = vec![
            ints("keys_int64s", &[1]),
            floats("values_floats", &[2.5]),
            float("default_float", 7.0),
        ];
        let k = le(attrs, 4).unwrap();
        assert_eq!(
            f32s(&run(&k, &[tensor(&[2], vec![1i64, 2]).unwrap()]).unwrap()[0]),
            [2.5, 7.0]
        );
    }

    #[test]
    fn label_encoder_opset4_tensors() {
        let dt = |name: &str, v: &[f64]| TensorProto {
            name: name.into(),
            data_type: DataType::Double as i32,
            dims: vec![v.len() as i64],
            double_data: v.to_vec(),
            ..TensorProto::default()
        };
        let attrs = vec![
            tensor_attr("keys_tensor", dt("k", &[1.0, f64::NAN, 0.0])),
            tensor_attr("values_tensor", dt("v", &[5.0, 6.0, 7.0])),
        ];
        let k = le(attrs, 4).unwrap();
        let x = tensor(&[4], vec![1.0f64, f64::NAN, 3.0, -0.0]).unwrap();
        let out = run(&k, std::slice::from_ref(&x)).unwrap();
        assert_eq!(
            crate::engine::op::slice::<f64>(&out[0]).unwrap(),
            [5.0, 6.0, -0.0, 7.0]
        );
        let attrs = vec![
            tensor_attr("keys_tensor", dt("k", &[1.0])),
            tensor_attr("values_tensor", dt("v", &[5.0])),
            tensor_attr("default_tensor", dt("d", &[42.0])),
        ];
        let out = run(&le(attrs, 4).unwrap(), &[x]).unwrap();
        assert_eq!(
            crate::engine::op::slice::<f64>(&out[0]).unwrap(),
            [5.0, 42.0, 42.0, 42.0]
        );
    }

    #[test]
    fn label_encoder_malformed_attributes() {
        let bad = [
            vec![
                ints("keys_int64s", &[1, 2]),
                floats("values_floats", &[1.0]),
            ],
            vec![
                ints("keys_int64s", &[1]),
                strings("keys_strings", &["a"]),
                floats("values_floats", &[1.0]),
            ],
            vec![ints("keys_int64s", &[1])],
            vec![floats("values_floats", &[1.0])],
        ];
        for attrs in bad {
            let err = le(attrs, 2).unwrap_err();
            assert!(format!("{err:?}").contains("attribute"), "{err:?}");
        }
        let k = le(
            vec![ints("keys_int64s", &[1]), floats("values_floats", &[1.0])],
            2,
        )
        .unwrap();
        let facts = [Fact::new(String::datum_type(), [TDim::from(2)])];
        assert!(
            k.output_facts(&facts).is_err(),
            "string input for int64 keys"
        );
        assert!(k.eval(&[&strings_tensor(&["a"])]).is_err());
    }

    #[test]
    fn the_engine_uses_these_encoders_not_tracts() {
        use serde_json::json;
        // tract's CategoryMapper needs a default attribute; onnxruntime fills in "_Unused"
        let attrs = vec![
            strings("cats_strings", &["a", "b"]),
            ints("cats_int64s", &[1, 2]),
        ];
        let bytes = model_bytes(
            node("CategoryMapper", attrs),
            &[("X", DataType::Int64, &[None])],
            &[("Y", DataType::String, &[None])],
            3,
        );
        let got = score(&bytes, &[r#"{"X": 2}"#, r#"{"X": 5}"#]);
        assert_eq!(got[0]["Y"], json!("b"));
        assert_eq!(got[1]["Y"], json!("_Unused"));

        let attrs = vec![
            floats("keys_floats", &[f32::NAN, 1.0]),
            ints("values_int64s", &[7, 8]),
        ];
        let bytes = model_bytes(
            node("LabelEncoder", attrs),
            &[("X", DataType::Float, &[None])],
            &[("Y", DataType::Int64, &[None])],
            4,
        );
        let got = score(&bytes, &[r#"{"X": null}"#, r#"{"X": 1}"#, r#"{"X": 2}"#]);
        assert_eq!(
            [&got[0]["Y"], &got[1]["Y"], &got[2]["Y"]],
            [&json!(7), &json!(8), &json!(-1)]
        );

        let bytes = model_bytes(
            node("Normalizer", vec![string("norm", "L1")]),
            &[("X", DataType::Float, &[None, Some(2)])],
            &[("Y", DataType::Float, &[None, Some(2)])],
            3,
        );
        assert_eq!(
            score(&bytes, &[r#"{"X": [1, -3]}"#])[0]["Y"],
            json!([0.25, -0.75])
        );
    }

    #[test]
    fn category_mapper_both_ways() {
        let attrs = vec![
            strings("cats_strings", &["a", "b", "a"]),
            ints("cats_int64s", &[1, 2, 3]),
            int("default_int64", -7),
        ];
        let k = category_mapper_kernel(&node("CategoryMapper", attrs)).unwrap();
        assert_eq!(
            i64s(&run(&k, &[strings_tensor(&["a", "b", "c"])]).unwrap()[0]),
            [3, 2, -7]
        );
        let out = run(&k, &[tensor(&[4], vec![1i64, 2, 3, 4]).unwrap()]).unwrap();
        assert_eq!(strs(&out[0]), ["a", "b", "a", "_Unused"]);
        let attrs = vec![
            strings("cats_strings", &["a", "b"]),
            ints("cats_int64s", &[1]),
        ];
        assert!(category_mapper_kernel(&node("CategoryMapper", attrs)).is_err());
    }
}
