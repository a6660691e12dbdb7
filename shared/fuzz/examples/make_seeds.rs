//! Writes seed inputs for both fuzz targets, built from valid bundles of a tiny model
//! (`shared::engine::testing::scaler_model(3, None)`) signed with the fuzz root key.
//! Usage: `cargo run --manifest-path shared/fuzz/Cargo.toml --example make_seeds [CORPUS_DIR]`
//! (default `shared/fuzz/corpus`); writes `CORPUS_DIR/verify_bundle/*` and
//! `CORPUS_DIR/verify_signed/*`.

use std::path::PathBuf;

use shared::bundle::{testing, write_bundle, BundleFile, GoldenSample, Manifest, TensorSchema};
use shared_fuzz::{tar_entry, SignedInput, COMPRESS, STAGE};

const LABELS: &[u8] = b"ok\nfail\n";

/// `shared::bundle::testing::manifest` with a schema, a golden row and an operator, so the
/// seeds hold every kind of manifest value.
fn manifest(files: &[(&str, &[u8])]) -> Manifest {
    let row: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"f0": 1.0, "f1": 2.0, "f2": 3.0}"#).expect("json");
    let mut m = testing::manifest("pump-1", files);
    m.schema.inputs = vec![TensorSchema {
        name: "input".into(),
        elem_type: "float".into(),
        shape: vec![None, Some(3)],
    }];
    m.golden.samples = vec![GoldenSample {
        input: row.clone(),
        output: row,
    }];
    m.compatibility.operators = vec!["ai.onnx.ml:Scaler".into()];
    m
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus")));
    let model = shared::engine::testing::scaler_model(3, None);
    let files: [(&str, &[u8]); 2] = [("model.onnx", &model), ("extra/labels.txt", LABELS)];

    // verify_bundle: a bundle from the real writer, and one from the fuzz assembler.
    let dir = corpus.join("verify_bundle");
    std::fs::create_dir_all(&dir)?;
    let tmp = tempfile::tempdir()?;
    let mut sources = Vec::new();
    for (path, bytes) in files {
        let source = tmp.path().join(path.replace('/', "_"));
        std::fs::write(&source, bytes)?;
        sources.push(BundleFile {
            path: path.into(),
            source,
        });
    }
    let mut m = manifest(&[]);
    write_bundle(
        &mut m,
        &sources,
        &shared_fuzz::key(),
        &dir.join("writer.bundle"),
    )
    .map_err(|e| e.to_string())?;

    // verify_signed: the same manifest with placeholders, over a raw archive (compressed by
    // the target, with and without staging) and over a ready payload frame.
    let mut archive = Vec::new();
    for (path, bytes) in files {
        tar_entry(&mut archive, path, bytes);
    }
    archive.extend_from_slice(&[0u8; 1024]);
    let mut m = serde_json::to_value(manifest(&files))?;
    m["payload"]["size"] = "@PAYLOAD_SIZE@".into();
    m["payload"]["sha256"] = "@PAYLOAD_SHA@".into();
    for i in 0..files.len() {
        m["files"][i]["size"] = format!("@SIZE{i}@").into();
        m["files"][i]["sha256"] = format!("@SHA{i}@").into();
    }
    // numbers as bare placeholders: `"@SIZE0@"` -> `@SIZE0@`
    let unquote = |text: String| {
        let mut text = text.replace("\"@PAYLOAD_SIZE@\"", "@PAYLOAD_SIZE@");
        for i in 0..files.len() {
            text = text.replace(&format!("\"@SIZE{i}@\""), &format!("@SIZE{i}@"));
        }
        text
    };
    let pretty = unquote(serde_json::to_string_pretty(&m)? + "\n");
    let compact = unquote(serde_json::to_string(&m)?);
    let sdir = corpus.join("verify_signed");
    std::fs::create_dir_all(&sdir)?;
    let frame = zstd::bulk::compress(&archive, 10)?;
    for (name, flags, text, payload) in [
        ("archive", COMPRESS, &pretty, &archive),
        ("archive-staged", COMPRESS | STAGE, &pretty, &archive),
        ("frame", 0, &pretty, &frame),
        ("frame-staged", STAGE, &pretty, &frame),
        ("compact-archive", COMPRESS, &compact, &archive),
        (
            "compact-archive-staged",
            COMPRESS | STAGE,
            &compact,
            &archive,
        ),
        ("compact-frame", 0, &compact, &frame),
    ] {
        let input = SignedInput::encode(flags, text.as_bytes(), payload);
        std::fs::write(sdir.join(name), &input)?;
        // the bundle it makes is the valid one the verifier accepts
        let bundle = SignedInput::parse(&input).ok_or("parse")?.bundle();
        let v = shared::bundle::verify_reader(
            &bundle[..],
            name,
            &shared_fuzz::trust(),
            &Default::default(),
            None,
            shared_fuzz::now(),
        )
        .map_err(|e| format!("seed {name} does not verify: {e}"))?;
        assert_eq!(v.manifest.files.len(), 2);
        if flags == COMPRESS {
            std::fs::write(dir.join(format!("{name}.bundle")), &bundle)?;
        }
    }
    println!("seeds written to {}", corpus.display());
    Ok(())
}
