//! Runs a corpus (or crash artifacts) through the same verification as a fuzz target outside
//! libFuzzer and prints how often each outcome occurs (the error message with numbers and
//! quoted names blanked), to see which checks a corpus reaches.
//! Usage: `cargo run --manifest-path shared/fuzz/Cargo.toml --example triage --
//! verify_bundle|verify_signed DIR_OR_FILE...`

use std::collections::BTreeMap;
use std::path::PathBuf;

use shared::bundle::{verify_reader, Limits};
use shared_fuzz::SignedInput;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args.next().ok_or("usage: triage TARGET DIR_OR_FILE...")?;
    let mut files: Vec<PathBuf> = Vec::new();
    for a in args {
        let p = PathBuf::from(a);
        if p.is_dir() {
            for e in std::fs::read_dir(&p)? {
                files.push(e?.path());
            }
        } else {
            files.push(p);
        }
    }
    files.sort();
    let staging = tempfile::tempdir()?;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for f in &files {
        let data = std::fs::read(f)?;
        let (bundle, stage, limits) = match target.as_str() {
            "verify_bundle" => (data, false, Limits::default()),
            "verify_signed" => {
                let Some(input) = SignedInput::parse(&data) else {
                    *outcomes.entry("(empty input)".into()).or_default() += 1;
                    continue;
                };
                let limits = Limits {
                    max_total_bytes: 16 << 20,
                    ..Limits::default()
                };
                (input.bundle(), input.stage(), limits)
            }
            other => return Err(format!("unknown target {other}").into()),
        };
        let res = verify_reader(
            &bundle[..],
            "fuzz",
            &shared_fuzz::trust(),
            &limits,
            stage.then(|| staging.path()),
            shared_fuzz::now(),
        );
        let key = match res {
            Ok(_) => "OK (verified)".to_string(),
            Err(e) => blank(&e.to_string()),
        };
        if std::env::var_os("TRIAGE_VERBOSE").is_some() {
            println!("{}: {key}", f.display());
        }
        *outcomes.entry(key).or_default() += 1;
    }
    let mut sorted: Vec<_> = outcomes.into_iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.1));
    for (what, n) in sorted {
        println!("{n:6}  {what}");
    }
    Ok(())
}

/// The message with digits, quoted text and hex runs replaced, and cut at 120 characters.
fn blank(msg: &str) -> String {
    let mut out = String::new();
    let mut in_quote = false;
    let mut last_digit = false;
    for c in msg.chars() {
        if c == '"' {
            in_quote = !in_quote;
            if in_quote {
                out.push_str("\"…\"");
            }
            continue;
        }
        if in_quote {
            continue;
        }
        if c.is_ascii_hexdigit() && (c.is_ascii_digit() || last_digit) {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
            continue;
        }
        last_digit = false;
        out.push(c);
    }
    out.chars().take(120).collect()
}
