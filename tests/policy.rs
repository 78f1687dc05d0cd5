//! A policy decides verdicts, so a policy that cannot be applied as written
//! is bad input: every defect is exit 2 with the rule named, before any
//! engine runs.

use std::process::Command;

/// The built-in policy with `edit` applied, written to a file; `find` with
/// it: (exit code, stderr).
fn find_with(edit: impl FnOnce(&mut serde_json::Value)) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut policy: serde_json::Value =
        serde_json::from_str(divergence::compare::policy::DEFAULT_POLICY).unwrap();
    edit(&mut policy);
    let path = dir.path().join("policy.json");
    // JSON has no infinity: the marker string stands for a literal that
    // overflows f64 when parsed.
    let text = policy.to_string().replace("\"OVERFLOW\"", "1e999");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_divergence"))
        .args(["find", "-q", "--steps", "1", "--policy"])
        .arg(&path)
        .arg("--receipt")
        .arg(dir.path().join("r.json"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The index of `stage`'s rule in the list `list` (`resync`, `free_run`).
fn at(policy: &serde_json::Value, list: &str, stage: &str) -> usize {
    policy[list]
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r[0] == stage)
        .unwrap()
}

#[test]
fn the_built_in_policy_runs() {
    let (code, err) = find_with(|_| {});
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_negative_bound_is_refused_naming_the_rule() {
    let (code, err) = find_with(|p| {
        let i = at(p, "resync", "attn_scores");
        p["resync"][i][1]["max_nmse"] = serde_json::json!(-1.0);
    });
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("resync rule for `attn_scores`") && err.contains("-1"),
        "{err}"
    );
    let (code, err) = find_with(|p| {
        p["local"]["stages"][3][1]["max_over_rounding"] = serde_json::json!(-5.0);
    });
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("local.stages rule for `k_proj`"), "{err}");
    let (code, err) = find_with(|p| {
        p["local"]["across_gap"]["max_nmse"] = serde_json::json!("OVERFLOW");
    });
    assert_eq!(code, 2, "an infinite bound: {err}");
}

#[test]
fn a_class_without_the_bound_it_needs_is_refused() {
    for class in ["tight", "loose"] {
        let (code, err) = find_with(|p| {
            let i = at(p, "free_run", "ffn_up");
            p["free_run"][i][1] = serde_json::json!({"class": class});
        });
        assert_eq!(code, 2, "{class}: {err}");
        assert!(
            err.contains("free_run rule for `ffn_up`") && err.contains("needs `max_nmse`"),
            "{class}: {err}"
        );
    }
}

#[test]
fn two_rules_for_one_stage_are_refused() {
    let (code, err) = find_with(|p| {
        let i = at(p, "resync", "q_proj");
        let dup = p["resync"][i].clone();
        p["resync"].as_array_mut().unwrap().push(dup);
    });
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`q_proj`") && err.contains("two rules"),
        "{err}"
    );
}

#[test]
fn a_top1_fraction_outside_0_1_is_refused() {
    let (code, err) = find_with(|p| {
        let i = at(p, "resync", "logits");
        p["resync"][i][1]["min_top1_agreement"] = serde_json::json!(1.5);
    });
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("min_top1_agreement is 1.5"), "{err}");
}

#[test]
fn a_policy_without_local_rules_is_refused() {
    let (code, err) = find_with(|p| {
        p.as_object_mut().unwrap().remove("local");
    });
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("local"), "{err}");
}
