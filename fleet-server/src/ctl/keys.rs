//! `fleetctl keygen` and `fleetctl keyring ...`: key pairs and the root-signed keyring.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use shared::trust::{
    format_time, parse_time, write_atomic, KeyEntry, KeyringBody, KeyringFile, PublicKey,
    SecretKey, Trust,
};
use time::OffsetDateTime;

use super::{cant_create, trust_file_error, CtlError, KeyringCommand, Output};

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

/// Writes a new file (refusing to overwrite unless `force`) with `mode`, fsynced.
fn write_new(path: &Path, bytes: &[u8], secret: bool, force: bool) -> Result<(), CtlError> {
    if force {
        return write_atomic(path, bytes, secret).map_err(|e| cant_create(path, e));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            cant_create(path, "already exists (use --force to replace it)")
        } else {
            cant_create(path, e)
        }
    })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| cant_create(path, e))
}

/// `fleetctl keygen --out NAME`.
pub fn keygen(out: &Path, force: bool) -> Result<Output, CtlError> {
    let key = SecretKey::generate().map_err(|e| CtlError::Data(e.to_string()))?;
    let secret = with_ext(out, ".key");
    let public = with_ext(out, ".pub");
    if !force {
        for p in [&secret, &public] {
            if p.exists() {
                return Err(cant_create(p, "already exists (use --force to replace it)"));
            }
        }
    }
    write_new(&secret, &key.to_file_bytes(), true, force)?;
    if let Err(e) = write_new(&public, &key.public().to_file_bytes(), false, force) {
        let _ = std::fs::remove_file(&secret);
        return Err(e);
    }
    Ok(Output {
        human: format!(
            "key {}: secret {} (keep it offline), public {}",
            key.id,
            secret.display(),
            public.display()
        ),
        json: json!({"key_id": key.id.to_string(), "secret": secret, "public": public}),
    })
}

fn load_keyring(path: &Path) -> Result<(KeyringFile, KeyringBody), CtlError> {
    let file = KeyringFile::load(path).map_err(trust_file_error)?;
    let body = file
        .body()
        .map_err(|e| CtlError::Data(format!("{}: {e}", path.display())))?;
    Ok((file, body))
}

/// A signed keyring becomes the next, unsigned version when edited.
fn next_version(file: &KeyringFile, body: &mut KeyringBody) -> Result<(), CtlError> {
    if !file.signatures.is_empty() {
        body.version = body
            .version
            .checked_add(1)
            .ok_or_else(|| CtlError::Data("keyring version overflows".into()))?;
        body.created = format_time(OffsetDateTime::now_utc());
    }
    Ok(())
}

fn save(path: &Path, file: &mut KeyringFile, body: &KeyringBody) -> Result<(), CtlError> {
    file.set_body(body)
        .map_err(|e| CtlError::Data(e.to_string()))?;
    file.save(path).map_err(|e| cant_create(path, e))
}

fn body_json(body: &KeyringBody, signed_by: &[String]) -> serde_json::Value {
    json!({
        "version": body.version,
        "created": body.created,
        "keys": body.keys,
        "signed_by": signed_by,
    })
}

fn check_pattern(p: &str) -> Result<(), CtlError> {
    let name = p.strip_suffix('*').unwrap_or(p);
    if p == "*" || name.is_empty() {
        return Ok(());
    }
    shared::bundle::manifest::check_model_name(name)
        .map_err(|e| CtlError::Usage(format!("--model {p:?}: {e}")))
}

/// `fleetctl keyring ...`.
pub fn keyring(cmd: KeyringCommand) -> Result<Output, CtlError> {
    match cmd {
        KeyringCommand::Create {
            out,
            version,
            force,
        } => {
            let body = KeyringBody::new(version, OffsetDateTime::now_utc());
            let file = KeyringFile::unsigned(&body).map_err(|e| CtlError::Data(e.to_string()))?;
            write_new(&out, &file.to_file_bytes(), false, force)?;
            Ok(Output {
                human: format!(
                    "keyring {} version {version} created (empty, unsigned)",
                    out.display()
                ),
                json: body_json(&body, &[]),
            })
        }
        KeyringCommand::Add {
            keyring,
            public,
            models,
            not_after,
        } => {
            for m in &models {
                check_pattern(m)?;
            }
            if let Some(t) = &not_after {
                parse_time(t).map_err(|e| CtlError::Usage(format!("--not-after: {e}")))?;
            }
            let key = PublicKey::load(&public).map_err(trust_file_error)?;
            let (mut file, mut body) = load_keyring(&keyring)?;
            if body.keys.iter().any(|k| k.key_id == key.id.as_str()) {
                return Err(CtlError::Data(format!(
                    "key {} is already in keyring {} (revoke it, or generate a new key)",
                    key.id,
                    keyring.display()
                )));
            }
            next_version(&file, &mut body)?;
            body.keys.push(KeyEntry {
                key_id: key.id.to_string(),
                public_key: key.to_base64(),
                models: models.clone(),
                not_after: not_after.clone(),
                revoked: false,
            });
            save(&keyring, &mut file, &body)?;
            Ok(Output {
                human: format!(
                    "key {} added to keyring version {} (models: {}); sign it with `fleetctl keyring sign`",
                    key.id,
                    body.version,
                    models.join(", ")
                ),
                json: body_json(&body, &[]),
            })
        }
        KeyringCommand::Revoke { keyring, key_id } => {
            let (mut file, mut body) = load_keyring(&keyring)?;
            let Some(ix) = body.keys.iter().position(|k| k.key_id == key_id) else {
                let ids: Vec<&str> = body.keys.iter().map(|k| k.key_id.as_str()).collect();
                return Err(CtlError::Data(format!(
                    "key {key_id} is not in keyring {} (keys: {})",
                    keyring.display(),
                    if ids.is_empty() {
                        "none".to_string()
                    } else {
                        ids.join(", ")
                    }
                )));
            };
            if body.keys[ix].revoked {
                return Err(CtlError::Data(format!("key {key_id} is already revoked")));
            }
            next_version(&file, &mut body)?;
            body.keys[ix].revoked = true;
            save(&keyring, &mut file, &body)?;
            Ok(Output {
                human: format!(
                    "key {key_id} revoked in keyring version {}; sign it with `fleetctl keyring sign`",
                    body.version
                ),
                json: body_json(&body, &[]),
            })
        }
        KeyringCommand::Sign { keyring, root } => {
            let key = SecretKey::load(&root).map_err(trust_file_error)?;
            let (mut file, body) = load_keyring(&keyring)?;
            file.sign(&key).map_err(|e| CtlError::Data(e.to_string()))?;
            file.save(&keyring).map_err(|e| cant_create(&keyring, e))?;
            let by: Vec<String> = file.signatures.iter().map(|s| s.key_id.clone()).collect();
            Ok(Output {
                human: format!(
                    "keyring {} version {} signed by root key {}",
                    keyring.display(),
                    body.version,
                    key.id
                ),
                json: body_json(&body, &by),
            })
        }
        KeyringCommand::Show { keyring, root } => {
            let (file, body) = load_keyring(&keyring)?;
            let by: Vec<String> = file.signatures.iter().map(|s| s.key_id.clone()).collect();
            let mut json = body_json(&body, &by);
            let mut human = format!(
                "keyring {} version {} created {}\n",
                keyring.display(),
                body.version,
                body.created
            );
            if let Some(root) = root {
                let root = PublicKey::load(&root).map_err(trust_file_error)?;
                Trust::with_keyring(root.clone(), &file, 0)
                    .map_err(|e| CtlError::Rejected(e.to_string()))?;
                human.push_str(&format!("signature: valid (root key {})\n", root.id));
                json["verified"] = json!(true);
            } else {
                human.push_str(&format!(
                    "signed by: {}\n",
                    if by.is_empty() {
                        "nobody (unsigned)".to_string()
                    } else {
                        by.join(", ")
                    }
                ));
            }
            for k in &body.keys {
                human.push_str(&format!(
                    "  {}  models {}{}{}\n",
                    k.key_id,
                    k.models.join(","),
                    k.not_after
                        .as_ref()
                        .map_or(String::new(), |t| format!("  not after {t}")),
                    if k.revoked { "  REVOKED" } else { "" }
                ));
            }
            Ok(Output {
                human: human.trim_end().to_string(),
                json,
            })
        }
    }
}
