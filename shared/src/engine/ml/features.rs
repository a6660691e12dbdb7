//! ArrayFeatureExtractor, FeatureVectorizer and CastMap.

use tract_onnx::model::OnnxOpRegister;

pub(crate) fn register(_reg: &mut OnnxOpRegister) {}
