//! Hardened-verification tests: every way a bundle can be tampered with, malformed or
//! malicious. Malicious archives are made with the `tar` crate (not our writer), and signed
//! with the trusted key, so each rejection comes from the check under test.

use std::io::Write;
use std::path::Path;

use time::OffsetDateTime;

use super::*;
use crate::trust::{KeyEntry, KeyringBody, KeyringFile, SecretKey, Trust};

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn root() -> SecretKey {
    SecretKey::from_seed([9; 32])
}

fn model() -> Vec<u8> {
    crate::engine::testing::scaler_model(3, Some(&["a", "b", "c"]))
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    crate::trust::hex(&sha2::Sha256::digest(bytes))
}

fn manifest_for(name: &str, files: &[(&str, &[u8])]) -> Manifest {
    super::testing::manifest(name, files)
}

#[derive(Clone)]
struct E {
    name: Vec<u8>,
    data: Vec<u8>,
    kind: tar::EntryType,
    /// Size to claim in the header (default: data length).
    size: Option<u64>,
    link: Option<&'static str>,
}

fn e(name: &str, data: &[u8]) -> E {
    E {
        name: name.as_bytes().to_vec(),
        data: data.to_vec(),
        kind: tar::EntryType::Regular,
        size: None,
        link: None,
    }
}

/// The signed manifest and signature entries, then the given file entries.
fn signed(m: &Manifest, key: &SecretKey) -> Vec<E> {
    let mb = m.to_bytes().unwrap();
    let sig = serde_json::to_vec(&key.sign(&mb)).unwrap();
    vec![e(MANIFEST_NAME, &mb), e(SIGNATURE_NAME, &sig)]
}

/// A ustar archive made with the `tar` crate (raw names, so `..` and `/x` can be written).
fn pack(entries: &[E]) -> Vec<u8> {
    let mut out = pack_entries(entries);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Entries without the end-of-archive blocks.
fn pack_entries(entries: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for en in entries {
        let mut h = tar::Header::new_ustar();
        {
            let u = h.as_ustar_mut().unwrap();
            u.name = [0; 100];
            u.name[..en.name.len()].copy_from_slice(&en.name);
        }
        h.set_mode(0o644);
        h.set_entry_type(en.kind);
        h.set_size(en.size.unwrap_or(en.data.len() as u64));
        if let Some(l) = en.link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&en.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out
}

fn zst(raw: &[u8]) -> Vec<u8> {
    zstd::encode_all(raw, 3).unwrap()
}

/// A bundle file: the stored manifest frame with `head`, then `payload` as is.
fn assemble(head: &[E], payload: &[u8]) -> Vec<u8> {
    let mut out = stored::encode(&pack_entries(head));
    out.extend_from_slice(payload);
    out
}

/// A bundle whose payload is `body` (a raw archive), compressed, with `m` signed by `key`
/// and listing that payload.
fn bundle_raw(m: &Manifest, key: &SecretKey, body: &[u8]) -> Vec<u8> {
    let z = zst(body);
    let mut m = m.clone();
    m.payload = Payload {
        size: z.len() as u64,
        sha256: sha(&z),
    };
    assemble(&signed(&m, key), &z)
}

fn bundle(m: &Manifest, key: &SecretKey, files: &[E]) -> Vec<u8> {
    bundle_raw(m, key, &pack(files))
}

fn valid() -> (Manifest, Vec<E>) {
    let model = model();
    let m = manifest_for(
        "pump-1",
        &[("model.onnx", &model), ("extra/labels.txt", b"ok\nfail\n")],
    );
    let files = vec![
        e("model.onnx", &model),
        e("extra/labels.txt", b"ok\nfail\n"),
    ];
    (m, files)
}

fn valid_bytes() -> Vec<u8> {
    let (m, files) = valid();
    bundle(&m, &root(), &files)
}

fn verify_bytes(bytes: &[u8], trust: &Trust, limits: &Limits) -> Result<Verified, BundleError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    std::fs::write(&path, bytes).unwrap();
    let staging_parent = dir.path().join("staging");
    std::fs::create_dir(&staging_parent).unwrap();
    let res = verify(&path, trust, limits, Some(&staging_parent), now());
    if res.is_err() {
        // nothing left behind, nothing written beside the bundle
        assert_eq!(std::fs::read_dir(&staging_parent).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
    res
}

fn reject(bytes: &[u8], expect: &str) {
    let trust = Trust::root_only(root().public());
    match verify_bytes(bytes, &trust, &Limits::default()) {
        Ok(_) => panic!("accepted a bundle that should fail with {expect:?}"),
        Err(err) => {
            let msg = err.to_string();
            assert!(msg.contains(expect), "expected {expect:?} in {msg:?}");
        }
    }
}

#[test]
fn valid_bundle_verifies_and_keeps_exact_files() {
    let (m, _) = valid();
    let trust = Trust::root_only(root().public());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    std::fs::write(&path, valid_bytes()).unwrap();
    let v = verify(&path, &trust, &Limits::default(), Some(dir.path()), now()).unwrap();
    assert_eq!(v.manifest.files, m.files);
    assert_eq!(v.signer, root().id);
    let st = v.staging.as_ref().unwrap();
    assert_eq!(std::fs::read(st.file("model.onnx")).unwrap(), model());
    assert_eq!(
        std::fs::read(st.file("extra/labels.txt")).unwrap(),
        b"ok\nfail\n"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(st.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    // any zstd decoder reads a bundle as one tar stream
    let raw = zstd::decode_all(&valid_bytes()[..]).unwrap();
    let names: Vec<String> = tar::Archive::new(&raw[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "manifest.json",
            "manifest.sig",
            "model.onnx",
            "extra/labels.txt"
        ]
    );
    // without staging nothing is written at all
    let before = std::fs::read_dir(dir.path()).unwrap().count();
    let v = verify(&path, &trust, &Limits::default(), None, now()).unwrap();
    assert!(v.staging.is_none());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), before);
}

#[test]
fn writer_output_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("m.onnx");
    std::fs::write(&model_path, model()).unwrap();
    let mut m = manifest_for("pump-1", &[]);
    let out = dir.path().join("out.bundle");
    let files = [BundleFile {
        path: "model.onnx".into(),
        source: model_path,
    }];
    write_bundle(&mut m, &files, &root(), &out).unwrap();
    let trust = Trust::root_only(root().public());
    let v = verify(&out, &trust, &Limits::default(), None, now()).unwrap();
    assert_eq!(v.manifest.files[0].sha256, sha(&model()));
    assert_eq!(v.manifest, m);
    // no temporary file left beside the output
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn every_flipped_byte_is_rejected() {
    let good = valid_bytes();
    let trust = Trust::root_only(root().public());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b");
    let mut accepted = Vec::new();
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            std::fs::write(&p, &bad).unwrap();
            if verify(&p, &trust, &Limits::default(), None, now()).is_ok() {
                accepted.push((i, mask));
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted flips at {accepted:?} of {}",
        good.len()
    );
}

#[test]
fn every_truncation_is_rejected() {
    let good = valid_bytes();
    let trust = Trust::root_only(root().public());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b");
    for len in 0..good.len() {
        std::fs::write(&p, &good[..len]).unwrap();
        assert!(
            verify(&p, &trust, &Limits::default(), None, now()).is_err(),
            "accepted a bundle truncated to {len} of {} bytes",
            good.len()
        );
    }
    // a truncated archive inside a complete, signed zstd frame
    let (m, files) = valid();
    let raw = pack(&files);
    reject(
        &bundle_raw(&m, &root(), &raw[..raw.len() - 1024 - 700]),
        "truncated",
    );
}

#[test]
fn archive_structure_attacks_are_rejected() {
    let (m, files) = valid();
    let model = model();
    let with = |extra: E| {
        let mut v = files.clone();
        v.insert(1, extra);
        bundle(&m, &root(), &v)
    };
    reject(&with(e("other.bin", b"x")), "not listed in the manifest");
    reject(&with(e("model.onnx", &model)), "appears twice");
    reject(&with(e("../evil", b"x")), "\"..\" is not allowed");
    reject(&with(e("/etc/evil", b"x")), "absolute path");
    for (kind, what) in [
        (tar::EntryType::Symlink, "symbolic link"),
        (tar::EntryType::Link, "hard link"),
        (tar::EntryType::Char, "character device"),
        (tar::EntryType::Block, "block device"),
        (tar::EntryType::Fifo, "FIFO"),
        (tar::EntryType::Directory, "directory"),
        (tar::EntryType::XHeader, "PAX extended header"),
        (tar::EntryType::GNULongName, "GNU long name"),
    ] {
        let mut en = e("model.onnx", b"");
        en.kind = kind;
        if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            en.link = Some("/etc/passwd");
        }
        reject(&with(en), what);
    }
    // a listed file missing
    reject(
        &bundle(&m, &root(), &files[..1]),
        "missing from the archive",
    );
    // content changed, same size
    let mut v = files.clone();
    v[0].data[0] ^= 1;
    reject(&bundle(&m, &root(), &v), "sha256 mismatch");
    // size differs from the manifest
    let mut v = files.clone();
    v[0].data.push(0);
    reject(&bundle(&m, &root(), &v), "the manifest says");
    // manifest not first, signature not second, extra entry in the manifest frame
    let mut signed_m = m.clone();
    let z = zst(&pack(&files));
    signed_m.payload = Payload {
        size: z.len() as u64,
        sha256: sha(&z),
    };
    let head = signed(&signed_m, &root());
    assert!(verify_bytes(
        &assemble(&head, &z),
        &Trust::root_only(root().public()),
        &Limits::default()
    )
    .is_ok());
    reject(
        &assemble(&[head[1].clone(), head[0].clone()], &z),
        "must be manifest.json",
    );
    reject(
        &assemble(&[head[0].clone(), head[0].clone()], &z),
        "must be manifest.sig",
    );
    reject(&assemble(&head[..1], &z), "ends inside manifest.sig");
    let mut three = head.clone();
    three.push(e("model.onnx", &model));
    reject(
        &assemble(&three, &z),
        "more than manifest.json and manifest.sig",
    );
    // the whole archive in one ordinary zstd frame (no stored manifest frame)
    let mut all = head.clone();
    all.extend(files.iter().cloned());
    reject(&zst(&pack(&all)), "canonical stored frame");
    // a manifest path that is unsafe, even if signed
    for (path, why) in [("../model.onnx", "not allowed"), ("/abs", "absolute path")] {
        let mut m2 = m.clone();
        m2.files[1].path = path.into();
        reject(&bundle(&m2, &root(), &files[..1]), why);
    }
    // garbage after the end-of-archive marker, inside the frame
    let mut raw = pack(&files);
    raw.extend_from_slice(b"garbage");
    reject(
        &bundle_raw(&m, &root(), &raw),
        "non-zero bytes after the end-of-archive",
    );
    // bytes after the signed payload: garbage, or a second frame
    let mut z = valid_bytes();
    z.extend_from_slice(b"garbage");
    reject(&z, "after the signed payload");
    let mut z = valid_bytes();
    z.extend_from_slice(&zst(&[0u8; 512]));
    reject(&z, "after the signed payload");
    // a second zstd frame inside the signed payload
    let mut z2 = zst(&pack(&files));
    z2.extend_from_slice(&zst(&[0u8; 512]));
    let mut m2 = m.clone();
    m2.payload = Payload {
        size: z2.len() as u64,
        sha256: sha(&z2),
    };
    reject(
        &assemble(&signed(&m2, &root()), &z2),
        "after the end of the zstd frame",
    );
    // a payload replaced by another one (valid zstd, valid tar, wrong bytes)
    let z3 = zstd::encode_all(&pack(&files)[..], 9).unwrap();
    assert_ne!(z3, zst(&pack(&files)));
    reject(&assemble(&head, &z3), "payload");
    // non-zero padding after a file's content
    let mut raw = pack(&files);
    let off = raw.len() - 1024 - 512 + b"ok\nfail\n".len();
    raw[off] = b'!';
    reject(&bundle_raw(&m, &root(), &raw), "padding");
    // not zstd, not tar
    reject(b"hello world", "does not start with a zstd frame");
    reject(
        &bundle_raw(
            &m,
            &root(),
            b"hello world, this is not a tar archive at all",
        ),
        "truncated",
    );
    reject(&bundle_raw(&m, &root(), &[7u8; 4096]), "checksum");
}

#[test]
fn oversized_content_stops_early_with_bounded_memory() {
    let (m, files) = valid();
    let trust = Trust::root_only(root().public());
    // 1. a header claiming a 4 GiB manifest: refused from the header
    let mut head = signed(&m, &root());
    head[0].size = Some(1 << 32);
    head[0].data.clear();
    reject(
        &assemble(&head[..1], b""),
        "manifest.json is 4294967296 bytes",
    );
    // a manifest frame claiming 1 TB of content: refused from the frame header
    let mut frame = stored::encode(b"");
    frame[5..13].copy_from_slice(&(1u64 << 40).to_le_bytes());
    reject(&frame, "the manifest frame holds 1099511627776 bytes");
    // 2. zeros beyond tar padding after the archive (a 64 MiB zstd bomb of a few KB)
    let mut raw = pack(&files);
    raw.resize(raw.len() + 64 * 1024 * 1024, 0);
    let bomb = bundle_raw(&m, &root(), &raw);
    assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
    reject(&bomb, "more data after the end-of-archive marker");
    // 3. an entry whose header claims more than the manifest lists
    let mut v = files.clone();
    v[0].size = Some(1 << 32);
    reject(
        &bundle(&m, &root(), &v),
        "4294967296 bytes, the manifest says",
    );
    // 4. manifest totals above the configured cap
    let limits = Limits {
        max_total_bytes: 100,
        ..Limits::default()
    };
    let err = verify_bytes(&valid_bytes(), &trust, &limits).unwrap_err();
    assert!(err.to_string().contains("exceeds 100 bytes"), "{err}");
    // 5. a manifest above the manifest cap
    let limits = Limits {
        max_manifest_bytes: 100,
        ..Limits::default()
    };
    let err = verify_bytes(&valid_bytes(), &trust, &limits).unwrap_err();
    assert!(err.to_string().contains("manifest.json is"), "{err}");
    // 6. a payload frame whose window is larger than the cap
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.window_log(27).unwrap();
    enc.long_distance_matching(true).unwrap();
    let mut raw = pack(&files);
    raw.resize(raw.len() + 200 * 1024 * 1024, 0);
    enc.write_all(&raw).unwrap();
    let z = enc.finish().unwrap();
    let mut m2 = m.clone();
    m2.payload = Payload {
        size: z.len() as u64,
        sha256: sha(&z),
    };
    reject(&assemble(&signed(&m2, &root()), &z), "zstd");
}

#[test]
fn manifest_and_signature_rules() {
    let model = model();
    let files: &[(&str, &[u8])] = &[("model.onnx", &model)];
    let body = vec![e("model.onnx", &model)];
    let z = zst(&pack(&body));
    let payload = Payload {
        size: z.len() as u64,
        sha256: sha(&z),
    };
    let build = |m: &Manifest, key: &SecretKey| bundle(m, key, &body);
    let mut m = manifest_for("pump-1", files);
    m.payload = payload.clone();
    // unknown key (no keyring)
    reject(&build(&m, &SecretKey::from_seed([5; 32])), "unknown key id");
    // unknown format version, unknown field: signed, so only the parser can refuse them
    let sign_text = |text: String| {
        let sig = serde_json::to_vec(&root().sign(text.as_bytes())).unwrap();
        assemble(
            &[e(MANIFEST_NAME, text.as_bytes()), e(SIGNATURE_NAME, &sig)],
            &z,
        )
    };
    let text = String::from_utf8(m.to_bytes().unwrap()).unwrap();
    reject(
        &sign_text(text.replace("\"format\": 1", "\"format\": 2")),
        "unknown format version 2",
    );
    reject(
        &sign_text(text.replacen('{', "{\"surprise\": 1,", 1)),
        "unknown field",
    );
    assert!(verify_bytes(
        &sign_text(text.clone()),
        &Trust::root_only(root().public()),
        &Limits::default()
    )
    .is_ok());
    // a signature over other bytes
    let mut es = signed(&m, &root());
    let mut m2 = m.clone();
    m2.release = 99;
    es[0] = e(MANIFEST_NAME, &m2.to_bytes().unwrap());
    reject(&assemble(&es, &z), "signature does not match");
    // garbage signature file
    let mut es = signed(&m, &root());
    es[1] = e(SIGNATURE_NAME, b"not json");
    reject(&assemble(&es, &z), "not a signature file");
    // keyring cases
    let a = SecretKey::from_seed([21; 32]);
    let b = SecretKey::from_seed([22; 32]);
    let c = SecretKey::from_seed([23; 32]);
    let entry = |k: &SecretKey, models: &[&str]| KeyEntry {
        key_id: k.id.to_string(),
        public_key: k.public().to_base64(),
        models: models.iter().map(|s| s.to_string()).collect(),
        not_after: None,
        revoked: false,
    };
    let mut body = KeyringBody::new(2, now());
    let mut rb = entry(&b, &["*"]);
    rb.revoked = true;
    let mut ec = entry(&c, &["*"]);
    ec.not_after = Some("2021-01-01T00:00:00Z".into());
    body.keys = vec![entry(&a, &["pump-*"]), rb, ec];
    let mut ring = KeyringFile::unsigned(&body).unwrap();
    ring.sign(&root()).unwrap();
    let trust = Trust::with_keyring(root().public(), &ring, 0).unwrap();
    let check = |bytes: Vec<u8>, expect: Option<&str>| {
        let r = verify_bytes(&bytes, &trust, &Limits::default());
        match (r, expect) {
            (Ok(_), None) => {}
            (Err(err), Some(x)) => assert!(err.to_string().contains(x), "{x:?} in {err}"),
            (Ok(_), Some(x)) => panic!("accepted, expected {x:?}"),
            (Err(err), None) => panic!("rejected: {err}"),
        }
    };
    check(build(&m, &a), None);
    check(
        build(&manifest_for("press-1", files), &a),
        Some("may not sign model \"press-1\""),
    );
    check(build(&m, &b), Some("revoked"));
    check(build(&m, &c), Some("expired"));
    check(build(&m, &root()), Some("must be signed by a keyring key"));
    check(
        build(&m, &SecretKey::from_seed([24; 32])),
        Some("unknown key id"),
    );
}

#[test]
fn release_rules() {
    let mut m = manifest_for("pump-1", &[("model.onnx", b"x")]);
    assert!(check_release(&m, None).is_ok());
    assert!(check_release(&m, Some(3)).is_ok());
    assert!(check_release(&m, Some(2)).is_ok());
    let err = check_release(&m, Some(4)).unwrap_err().to_string();
    assert!(err.contains("lower than the running release 4"), "{err}");
    m.allow_downgrade = true;
    assert!(check_release(&m, Some(4)).is_ok());
}

#[test]
fn paths_are_checked() {
    for ok in ["model.onnx", "a/b/c.txt", "x-1_2.bin"] {
        assert!(check_path(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "/a",
        "a/../b",
        "..",
        "./a",
        "a//b",
        "a/b/c/d/e",
        "a b",
        "a\\b",
        "manifest.json",
        "é",
    ] {
        assert!(check_path(bad).is_err(), "{bad:?}");
    }
    let _ = Path::new("");
}
