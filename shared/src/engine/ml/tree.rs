//! Tree ensembles: TreeEnsembleClassifier, TreeEnsembleRegressor, TreeEnsemble (ml opset 5).

use tract_onnx::model::OnnxOpRegister;

pub(crate) fn register(_reg: &mut OnnxOpRegister) {}
