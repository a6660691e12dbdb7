//! Golden samples: rows whose outputs were recorded at build time, re-run on the device
//! before a model is activated.

use serde_json::Value;

use super::manifest::Golden;
use crate::engine::Model;

/// Compares an actual rendered output with the expected one: strings, booleans, nulls and
/// integers exactly; floats within `atol + rtol * |expected|`. Returns the first difference.
pub fn compare(
    expected: &Value,
    actual: &Value,
    rtol: f64,
    atol: f64,
    at: &str,
) -> Result<(), String> {
    match (expected, actual) {
        (Value::Number(e), Value::Number(a)) => {
            if e.is_f64() || a.is_f64() {
                let (e, a) = (
                    e.as_f64().unwrap_or(f64::NAN),
                    a.as_f64().unwrap_or(f64::NAN),
                );
                if (e - a).abs() <= atol + rtol * e.abs() {
                    return Ok(());
                }
            } else if e == a {
                return Ok(());
            }
            Err(format!("{at}: expected {e}, got {a}"))
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!(
                    "{at}: expected {} values, got {}",
                    e.len(),
                    a.len()
                ));
            }
            for (i, (e, a)) in e.iter().zip(a).enumerate() {
                compare(e, a, rtol, atol, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Object(e), Value::Object(a)) => {
            if let Some(k) = a.keys().find(|k| !e.contains_key(*k)) {
                return Err(format!("{at}: unexpected key {k:?}"));
            }
            for (k, ev) in e {
                let av = a.get(k).ok_or_else(|| format!("{at}: missing key {k:?}"))?;
                compare(ev, av, rtol, atol, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{at}: expected {e}, got {a}")),
    }
}

/// Runs every golden sample through `model` and compares; returns the number checked, or
/// the first failing sample with the difference.
pub fn check(model: &Model, golden: &Golden) -> Result<usize, String> {
    for (i, sample) in golden.samples.iter().enumerate() {
        let mut b = model.batch_builder();
        b.push_json(&sample.input, i as u64 + 1)
            .map_err(|e| format!("golden sample {}: input refused: {e}", i + 1))?;
        let batch = b.take();
        let out = model
            .run(&batch)
            .map_err(|e| format!("golden sample {}: {e}", i + 1))?;
        let actual = Value::Object(model.render_row(&out, 0));
        compare(
            &Value::Object(sample.output.clone()),
            &actual,
            golden.rtol,
            golden.atol,
            &format!("golden sample {}", i + 1),
        )?;
    }
    Ok(golden.samples.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compare_rules() {
        let ok = |e: Value, a: Value| compare(&e, &a, 1e-4, 1e-5, "o").is_ok();
        assert!(ok(
            json!({"label": 1, "p": [0.25, 0.75]}),
            json!({"label": 1, "p": [0.250001, 0.75]})
        ));
        assert!(!ok(json!({"label": 1}), json!({"label": 2})));
        assert!(!ok(json!({"p": [0.25, 0.75]}), json!({"p": [0.26, 0.74]})));
        assert!(!ok(json!({"p": [0.25]}), json!({"p": [0.25, 0.75]})));
        assert!(!ok(json!({"a": "x"}), json!({"a": "y"})));
        assert!(!ok(json!({"a": null}), json!({"a": 0.0})));
        assert!(!ok(json!({"a": 1}), json!({"a": 1, "b": 2})));
        let err = compare(
            &json!({"p": [0.25, 0.75]}),
            &json!({"p": [0.25, 0.5]}),
            1e-4,
            1e-5,
            "s",
        )
        .unwrap_err();
        assert!(err.contains("s.p[1]"), "{err}");
    }
}
