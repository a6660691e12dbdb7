//! The bundle manifest: wire types of manifest format 1 and their validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::check_path;

/// Manifest format this build reads and writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// `manifest.json` (format 1). Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Model name: `[A-Za-z0-9._-]`, 1..=64 bytes.
    pub name: String,
    /// Human version string (free-form, 1..=64 printable bytes).
    pub version: String,
    /// Monotonic per name; devices refuse a lower release unless `allow_downgrade`.
    pub release: u64,
    /// RFC 3339 build time.
    pub created: String,
    /// A signed, explicit rollback: may be installed over a higher release.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Path of the ONNX model among `files`.
    pub model: String,
    pub files: Vec<FileEntry>,
    /// The compressed bytes that follow the manifest frame in the bundle file.
    pub payload: Payload,
    pub schema: Schema,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceProfile>,
    pub golden: Golden,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signoff: Option<Signoff>,
    pub provenance: Provenance,
    pub compatibility: Compatibility,
}

/// One file of the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// Size and SHA-256 of the bundle file's bytes after the manifest frame (the zstd frame
/// holding the listed files), so no byte of the file is left unauthenticated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub size: u64,
    pub sha256: String,
}

/// The model's interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    pub inputs: Vec<TensorSchema>,
    pub outputs: Vec<TensorSchema>,
    /// Named features (from the model's `feature_names` or the data's columns), with the
    /// range observed in the reference (or holdout) data.
    pub features: Vec<FeatureSchema>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSchema {
    pub name: String,
    /// ONNX element type name (`float`, `int64`, `string`, ...), or `map(int64,float)`.
    #[serde(rename = "type")]
    pub elem_type: String,
    /// Dimensions; `null` for a symbolic one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shape: Vec<Option<u64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSchema {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// The reference distribution drift is measured against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceProfile {
    pub rows: u64,
    pub features: Vec<FeatureProfile>,
    /// The distribution of the model's prediction score over the reference rows. Optional:
    /// bundles built before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictions: Option<PredictionProfile>,
}

/// The reference distribution of a prediction score, and which score it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionProfile {
    /// The model output the score is read from.
    pub output: String,
    pub score: PredictionScore,
    /// The class whose probability is the score (`class_probability` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// The profile of the score (`name` is `prediction`).
    pub profile: FeatureProfile,
}

/// Which number of a row's output is the prediction score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionScore {
    /// A regressor's predicted value.
    Value,
    /// A classifier's probability of `class` (the positive class).
    ClassProbability,
    /// A classifier's highest class probability.
    TopProbability,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureProfile {
    pub name: String,
    /// Non-missing values seen.
    pub count: u64,
    /// Ascending bin edges (`bins + 1` values; the first is the minimum, the last the
    /// maximum). Values below the first edge fall in the first bin, above the last in the last.
    pub bin_edges: Vec<f64>,
    /// Share of non-missing values in each bin; sums to 1.
    pub proportions: Vec<f64>,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Share of rows where the value is missing (empty, NaN).
    pub missing_rate: f64,
}

/// Rows the device re-runs before activating the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// Relative and absolute tolerance for floats; labels and integers must match exactly.
    pub rtol: f64,
    pub atol: f64,
    pub samples: Vec<GoldenSample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenSample {
    /// One row as the engine's JSON input (`BatchBuilder::push_json`).
    pub input: serde_json::Map<String, serde_json::Value>,
    /// The engine's rendered outputs for that row (`Model::render_row`).
    pub output: serde_json::Map<String, serde_json::Value>,
}

/// Metrics measured on a labelled holdout at build time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signoff {
    /// `classification` or `regression`.
    pub task: String,
    pub rows: u64,
    pub label_column: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positive_label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_group: Option<String>,
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupMetrics>,
    /// Each `--require` with the measured value (all met, or the bundle was not built).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<RequirementResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupMetrics {
    pub group: String,
    pub rows: u64,
    pub selection_rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_positive_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub false_positive_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequirementResult {
    pub requirement: String,
    pub measured: Option<f64>,
    pub met: bool,
}

/// Where the model and its data came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Where the model file came from (a path, an MLflow model directory).
    pub source: String,
    pub data: Vec<DataFile>,
    /// `fleetctl <version>`.
    pub builder: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    /// `reference` or `holdout`.
    pub role: String,
    /// File name as given to the builder.
    pub path: String,
    pub sha256: String,
    pub rows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compatibility {
    /// `domain:OpType` of every operator the model uses.
    pub operators: Vec<String>,
    /// Oldest agent version that can run the bundle.
    pub min_agent_version: String,
}

fn check_name(what: &str, value: &str, free: bool) -> Result<(), String> {
    if value.is_empty() || value.len() > 64 {
        return Err(format!("{what} must be 1 to 64 bytes, got {}", value.len()));
    }
    let bad = if free {
        value.chars().find(|c| c.is_control())
    } else {
        value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    };
    if let Some(c) = bad {
        return Err(format!("{what} {value:?} contains {c:?}"));
    }
    Ok(())
}

/// Checks a model name (`[A-Za-z0-9._-]`, 1..=64 bytes).
pub fn check_model_name(name: &str) -> Result<(), String> {
    check_name("name", name, false)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    /// Parses manifest bytes: the format number first (so a newer format gets a clear
    /// error), then the strict format-1 structure, then [`Manifest::validate`].
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        #[derive(Deserialize)]
        struct Probe {
            format: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        match probe.format.as_ref().and_then(|f| f.as_u64()) {
            Some(f) if f == u64::from(MANIFEST_FORMAT) => {}
            Some(f) => {
                return Err(format!(
                    "unknown format version {f} (this build reads format {MANIFEST_FORMAT})"
                ))
            }
            None => {
                return Err(format!(
                    "format version missing or not a number: {}",
                    probe
                        .format
                        .map_or("(missing)".to_string(), |f| f.to_string())
                ))
            }
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid: {e}"))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Structural checks that do not need the archive.
    pub fn validate(&self) -> Result<(), String> {
        check_model_name(&self.name)?;
        check_name("version", &self.version, true)?;
        crate::trust::parse_time(&self.created).map_err(|e| format!("created: {e}"))?;
        if self.files.is_empty() {
            return Err("lists no files".into());
        }
        if self.files.len() > 64 {
            return Err(format!("lists {} files (limit 64)", self.files.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            check_path(&f.path).map_err(|e| format!("file {:?}: {e}", f.path))?;
            if !seen.insert(f.path.as_str()) {
                return Err(format!("file {:?} is listed twice", f.path));
            }
            if !is_sha256_hex(&f.sha256) {
                return Err(format!(
                    "file {:?}: sha256 must be 64 lowercase hex digits",
                    f.path
                ));
            }
        }
        // a file must not also be a directory of another ("a" and "a/b")
        for f in &self.files {
            let dir = format!("{}/", f.path);
            if let Some(g) = self.files.iter().find(|g| g.path.starts_with(&dir)) {
                return Err(format!(
                    "file {:?} is also the directory of {:?}",
                    f.path, g.path
                ));
            }
        }
        if !is_sha256_hex(&self.payload.sha256) {
            return Err("payload: sha256 must be 64 lowercase hex digits".into());
        }
        if !self.files.iter().any(|f| f.path == self.model) {
            return Err(format!("model {:?} is not among the files", self.model));
        }
        if !(self.golden.rtol.is_finite()
            && self.golden.atol.is_finite()
            && self.golden.rtol >= 0.0
            && self.golden.atol >= 0.0)
        {
            return Err("golden tolerances must be finite and non-negative".into());
        }
        Ok(())
    }

    /// Sum of the listed file sizes.
    pub fn total_size(&self) -> u64 {
        self.files
            .iter()
            .fold(0u64, |acc, f| acc.saturating_add(f.size))
    }

    /// The manifest as it is written into a bundle (pretty JSON, trailing newline).
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let mut out = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        out.push(b'\n');
        Ok(out)
    }
}
