//! LinearClassifier and LinearRegressor.

use tract_onnx::model::OnnxOpRegister;

pub(crate) fn register(_reg: &mut OnnxOpRegister) {}
