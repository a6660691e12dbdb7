//! Reading an MLflow model directory (the `MLmodel` file of the `onnx` flavor).

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use super::{no_input, CtlError};

/// Largest `MLmodel` file read.
const MAX_MLMODEL_BYTES: u64 = 1024 * 1024;

/// What the builder takes from an MLflow model.
#[derive(Debug, Clone)]
pub struct MlflowModel {
    pub model_path: PathBuf,
    pub run_id: Option<String>,
    pub model_uuid: Option<String>,
}

/// Reads `DIR/MLmodel`: the onnx flavor's `data` file, `run_id` and `model_uuid`.
pub fn read(dir: &Path) -> Result<MlflowModel, CtlError> {
    let path = dir.join("MLmodel");
    let meta = std::fs::metadata(&path).map_err(|e| no_input(&path, e))?;
    if meta.len() > MAX_MLMODEL_BYTES {
        return Err(CtlError::Data(format!(
            "{}: {} bytes, larger than the {MAX_MLMODEL_BYTES}-byte limit",
            path.display(),
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| no_input(&path, e))?;
    let bad = |m: String| CtlError::Data(format!("{}: {m}", path.display()));
    let docs = YamlLoader::load_from_str(&text).map_err(|e| bad(format!("not YAML: {e}")))?;
    let doc = docs.first().ok_or_else(|| bad("empty file".into()))?;
    let flavors = &doc["flavors"];
    if flavors.is_badvalue() {
        return Err(bad("no `flavors` section".into()));
    }
    let onnx = &flavors["onnx"];
    if onnx.is_badvalue() {
        let names: Vec<String> = flavors
            .as_hash()
            .map(|h| {
                h.keys()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        return Err(bad(format!(
            "no onnx flavor (flavors: {}); export the model with mlflow.onnx.log_model",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    let data = onnx["data"]
        .as_str()
        .ok_or_else(|| bad("flavors.onnx.data is missing or not a string".into()))?;
    let rel = Path::new(data);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(bad(format!(
            "flavors.onnx.data {data:?} must be a relative path inside the model directory"
        )));
    }
    let text_field = |y: &Yaml| y.as_str().map(String::from);
    Ok(MlflowModel {
        model_path: dir.join(rel),
        run_id: text_field(&doc["run_id"]),
        model_uuid: text_field(&doc["model_uuid"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_example_and_refuses_bad_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/pdm/mlflow-model");
        let m = read(&dir).unwrap();
        assert!(m.model_path.ends_with("model.onnx"));
        assert_eq!(
            m.run_id.as_deref(),
            Some("5d1c7e0a9b3f4e6c8a2d71f0c4b9e853")
        );
        let tmp = tempfile::tempdir().unwrap();
        let err = read(tmp.path()).unwrap_err();
        assert!(matches!(err, CtlError::NoInput { .. }), "{err}");
        for (text, expect) in [
            (
                "flavors:\n  sklearn:\n    pickled_model: model.pkl\n",
                "no onnx flavor (flavors: sklearn)",
            ),
            (
                "flavors:\n  onnx:\n    data: ../../etc/passwd\n",
                "relative path inside",
            ),
            (
                "flavors:\n  onnx:\n    code: null\n",
                "flavors.onnx.data is missing",
            ),
            ("a: [unclosed", "not YAML"),
            ("run_id: x\n", "no `flavors` section"),
        ] {
            std::fs::write(tmp.path().join("MLmodel"), text).unwrap();
            let err = read(tmp.path()).unwrap_err().to_string();
            assert!(err.contains(expect), "{expect:?} in {err}");
        }
    }
}
