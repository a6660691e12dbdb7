//! The project's own implementations of the `ai.onnx.ml` operators, registered into
//! tract's ONNX loader in place of tract's (partial) ones.
//!
//! Every operator is a [`Kernel`](super::op::Kernel): a builder parses and validates the
//! node's attributes once, at load time, with errors naming the node; `eval` then runs
//! without allocating beyond its outputs. Semantics follow onnxruntime's CPU kernels, which
//! is what the conformance corpus compares against.

pub(crate) mod encode;
pub(crate) mod features;
pub(crate) mod linear;
pub(crate) mod preprocess;
pub(crate) mod svm;
pub(crate) mod transform;
pub(crate) mod tree;
pub(crate) mod zipmap;

use tract_onnx::model::OnnxOpRegister;

/// Op types this module provides (the `ai.onnx.ml` domain).
pub const OPERATORS: &[&str] = &[
    "ArrayFeatureExtractor",
    "Binarizer",
    "CastMap",
    "FeatureVectorizer",
    "Imputer",
    "LabelEncoder",
    "LinearClassifier",
    "LinearRegressor",
    "Normalizer",
    "OneHotEncoder",
    "SVMClassifier",
    "SVMRegressor",
    "Scaler",
    "TreeEnsemble",
    "TreeEnsembleClassifier",
    "TreeEnsembleRegressor",
    "ZipMap",
];

/// Adds (or replaces) every operator of [`OPERATORS`] in tract's ONNX op register.
pub(crate) fn register(reg: &mut OnnxOpRegister) {
    encode::register(reg);
    features::register(reg);
    linear::register(reg);
    preprocess::register(reg);
    svm::register(reg);
    tree::register(reg);
    zipmap::register(reg);
}
