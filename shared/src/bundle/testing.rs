//! A minimal valid manifest, for tests, benchmarks and fuzz targets of every crate.

use sha2::Digest;

use super::manifest::*;

/// A manifest named `name` (release 3) listing `files` (path, content); `model.onnx` is the
/// model path, the payload is left for the writer to fill.
pub fn manifest(name: &str, files: &[(&str, &[u8])]) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: name.into(),
        version: "1.0.0".into(),
        release: 3,
        created: "2026-11-26T10:00:00Z".into(),
        allow_downgrade: false,
        model: "model.onnx".into(),
        payload: Payload {
            size: 0,
            sha256: "0".repeat(64),
        },
        files: files
            .iter()
            .map(|(p, b)| FileEntry {
                path: p.to_string(),
                size: b.len() as u64,
                sha256: crate::trust::hex(&sha2::Sha256::digest(b)),
            })
            .collect(),
        schema: Schema {
            inputs: vec![],
            outputs: vec![],
            features: vec![],
        },
        reference: None,
        golden: Golden {
            rtol: 1e-4,
            atol: 1e-5,
            samples: vec![],
        },
        signoff: None,
        provenance: Provenance {
            git_commit: None,
            run_id: None,
            source: "test".into(),
            data: vec![],
            builder: "test".into(),
        },
        compatibility: Compatibility {
            operators: vec![],
            min_agent_version: "0.1.0".into(),
        },
    }
}
