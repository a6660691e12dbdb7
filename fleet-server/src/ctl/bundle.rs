//! `fleetctl bundle verify` and `fleetctl bundle inspect`.

use std::path::Path;

use serde_json::json;
use shared::bundle::{self, golden, BundleError, Limits};
use shared::engine::Model;
use shared::trust::{KeyringFile, PublicKey, Trust};
use time::OffsetDateTime;

use super::{fmt_metric, no_input, trust_file_error, CtlError, Output, VerifyArgs};

fn bundle_error(path: &Path, e: BundleError) -> CtlError {
    match e {
        BundleError::Read { source, .. } => no_input(path, source),
        BundleError::Write { path, source } => CtlError::CantCreate {
            path,
            message: source.to_string(),
        },
        other => CtlError::Rejected(format!("{}: {other}", path.display())),
    }
}

/// `fleetctl bundle verify`.
pub fn verify(args: &VerifyArgs) -> Result<Output, CtlError> {
    let root = PublicKey::load(&args.root).map_err(trust_file_error)?;
    let trust = match &args.keyring {
        Some(path) => {
            let file = KeyringFile::load(path).map_err(trust_file_error)?;
            Trust::with_keyring(root, &file, 0)
                .map_err(|e| CtlError::Rejected(format!("{}: {e}", path.display())))?
        }
        None => Trust::root_only(root),
    };
    let scratch = if args.golden {
        Some(
            tempfile::tempdir()
                .map_err(|e| super::cant_create(Path::new("temporary directory"), e))?,
        )
    } else {
        None
    };
    let v = bundle::verify(
        &args.bundle,
        &trust,
        &Limits::default(),
        scratch.as_ref().map(|d| d.path()),
        OffsetDateTime::now_utc(),
    )
    .map_err(|e| bundle_error(&args.bundle, e))?;
    let m = &v.manifest;
    let mut golden_checked = None;
    if let Some(st) = &v.staging {
        let model = Model::load(&st.file(&m.model))
            .map_err(|e| CtlError::Rejected(format!("{}: model: {e}", args.bundle.display())))?;
        let n = golden::check(&model, &m.golden)
            .map_err(|e| CtlError::Rejected(format!("{}: {e}", args.bundle.display())))?;
        golden_checked = Some(n);
    }
    let mut human = format!(
        "OK {}: {} {} (release {}), signed by key {}, {} file(s), {} bytes",
        args.bundle.display(),
        m.name,
        m.version,
        m.release,
        v.signer,
        m.files.len(),
        m.total_size()
    );
    if let Some(s) = &m.signoff {
        let metrics: Vec<String> = s
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {}", fmt_metric(*v)))
            .collect();
        human.push_str(&format!(
            "\nsignoff on {} rows: {}",
            s.rows,
            metrics.join(", ")
        ));
    }
    if let Some(n) = golden_checked {
        human.push_str(&format!("\ngolden samples: {n} of {n} match"));
    }
    Ok(Output {
        human,
        json: json!({
            "valid": true,
            "name": m.name,
            "version": m.version,
            "release": m.release,
            "signer": v.signer.to_string(),
            "files": m.files,
            "bytes": v.compressed_bytes,
            "golden_checked": golden_checked,
        }),
    })
}

/// `fleetctl bundle inspect`: the manifest as JSON, without trusting it.
pub fn inspect(path: &Path) -> Result<Output, CtlError> {
    let (manifest, sig) =
        bundle::read_unverified(path, &Limits::default()).map_err(|e| bundle_error(path, e))?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).map_err(|e| {
        CtlError::Data(format!(
            "{}: manifest.json is not JSON: {e}",
            path.display()
        ))
    })?;
    let sig: serde_json::Value = serde_json::from_slice(&sig).unwrap_or(serde_json::Value::Null);
    Ok(Output {
        human: serde_json::to_string_pretty(&manifest).unwrap_or_default(),
        json: json!({"manifest": manifest, "signature": sig, "verified": false}),
    })
}
